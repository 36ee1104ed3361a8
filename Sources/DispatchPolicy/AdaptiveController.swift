/// Settings of an adaptive_concurrency gate, defaults applied.
public struct AdaptiveSettings: Sendable, Equatable {
    public var initialMax: Int
    public var min: Int
    public var max: Int?
    public var targetLagMs: Double
    public var ewmaAlpha: Double
    public var failureDecreaseFactor: Double
    public var overloadDecreaseFactor: Double

    public init(
        initialMax: Int = 3, min: Int = 1, max: Int? = nil, targetLagMs: Double, ewmaAlpha: Double = 0.5,
        failureDecreaseFactor: Double = 0.5, overloadDecreaseFactor: Double = 0.95
    ) {
        self.initialMax = initialMax
        self.min = min
        self.max = max
        self.targetLagMs = targetLagMs
        self.ewmaAlpha = ewmaAlpha
        self.failureDecreaseFactor = failureDecreaseFactor
        self.overloadDecreaseFactor = overloadDecreaseFactor
    }
}

/// AIMD on queue lag, one partition at a time. Pure: the tick runner feeds it
/// the observations it took from the database and stores the result.
///
/// For each observation, in order:
/// ```
/// ewma = ewma × (1 − α) + α × lag        (the first observation sets ewma = lag)
/// failure:            cap = max(min, floor(cap × failure_decrease_factor))
/// else ewma > target: cap = max(min, floor(cap × overload_decrease_factor))
/// else:               cap = min(cap + 1, max)
/// ```
public struct AdaptiveController: Sendable, Equatable {
    public var currentMax: Int
    public var ewmaLagMs: Double?
    public var observations: Int = 0
    public var failures: Int = 0

    public init(currentMax: Int, ewmaLagMs: Double?) {
        self.currentMax = currentMax
        self.ewmaLagMs = ewmaLagMs
    }

    public mutating func observe(lagMs: Double, success: Bool, settings: AdaptiveSettings) {
        let ewma = ewmaLagMs.map { $0 * (1 - settings.ewmaAlpha) + settings.ewmaAlpha * lagMs } ?? lagMs
        ewmaLagMs = ewma
        observations += 1
        if !success {
            failures += 1
            currentMax = Swift.max(settings.min, Int((Double(currentMax) * settings.failureDecreaseFactor).rounded(.down)))
        } else if ewma > settings.targetLagMs {
            currentMax = Swift.max(settings.min, Int((Double(currentMax) * settings.overloadDecreaseFactor).rounded(.down)))
        } else {
            currentMax += 1
            if let ceiling = settings.max { currentMax = Swift.min(currentMax, ceiling) }
        }
    }
}
