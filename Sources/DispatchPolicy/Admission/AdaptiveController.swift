import Foundation

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

    /// The highest cap: `max`, else the field's bound.
    var ceiling: Int { Swift.max(max ?? FieldLimits.adaptiveMax.clampInt(FieldLimits.adaptiveMax.maximum), min) }
}

/// AIMD on queue lag, one partition at a time, in windows of completions as
/// TCP congestion control and Netflix's concurrency-limits do. Pure: the tick
/// runner feeds it the observations it took from the database and stores the
/// result.
///
/// A *window* is `currentMax` observations: about one round of the jobs the
/// cap lets run. For each observation, in order:
/// ```
/// α' = 1 − (1 − α)^(1 / cap)             one window moves the EWMA by α
/// ewma = ewma + α' × (lag − ewma)         (the first observation sets ewma = lag)
/// failure, and a window since the last decrease:
///                      cap = max(min, floor(cap × failure_decrease_factor))
/// ewma > target, and a window since the last decrease:
///                      cap = max(min, floor(cap × overload_decrease_factor))
/// success, ewma ≤ target, and the cap turned jobs away at the last tick:
///                      credit += 1; a window of credit adds one: cap = min(cap + 1, max)
/// ```
/// So the cap grows by about one per window while it is what limits the
/// partition and the lag is fine, and shrinks at most once per window, however
/// many observations a window holds. Per-observation rules (+1 for every fast
/// completion, ×0.95 for every slow one) swing the cap by tens within a second
/// at hundreds of completions per second; windows keep the step size
/// independent of the completion rate.
public struct AdaptiveController: Sendable, Equatable {
    public var currentMax: Int
    public var ewmaLagMs: Double?
    /// Successes counted toward the next +1.
    public var growthCredit: Double
    /// Observations since the cap last shrank.
    public var sinceDecrease: Int
    /// Observations and failures folded by this controller (increments).
    public var observations: Int = 0
    public var failures: Int = 0

    public init(currentMax: Int, ewmaLagMs: Double?, growthCredit: Double = 0, sinceDecrease: Int = 0) {
        self.currentMax = currentMax
        self.ewmaLagMs = ewmaLagMs
        self.growthCredit = growthCredit.isFinite ? Swift.max(growthCredit, 0) : 0
        self.sinceDecrease = Swift.max(sinceDecrease, 0)
    }

    /// Folds one observation. `limited`: whether the cap turned jobs away at
    /// the last tick (without demand above the cap, growing it means nothing).
    public mutating func observe(lagMs: Double, success: Bool, limited: Bool, settings: AdaptiveSettings) {
        currentMax = Swift.min(Swift.max(currentMax, settings.min), settings.ceiling)
        let lag = lagMs.isNaN ? 0 : Swift.min(Swift.max(lagMs, 0), 1e12)
        let window = Double(currentMax)
        let alpha = 1 - pow(1 - settings.ewmaAlpha, 1 / window)
        if let ewma = ewmaLagMs, ewma.isFinite {
            ewmaLagMs = ewma + alpha * (lag - ewma)
        } else {
            ewmaLagMs = lag
        }
        observations += 1
        if sinceDecrease < Int.max { sinceDecrease += 1 }
        let windowSinceDecrease = sinceDecrease >= currentMax
        if !success {
            failures += 1
            if windowSinceDecrease { decrease(by: settings.failureDecreaseFactor, settings: settings) }
        } else if (ewmaLagMs ?? 0) > settings.targetLagMs {
            if windowSinceDecrease { decrease(by: settings.overloadDecreaseFactor, settings: settings) }
        } else if limited {
            growthCredit += 1
            if growthCredit >= window {
                growthCredit = 0
                currentMax = Swift.min(currentMax + 1, settings.ceiling)
            }
        }
    }

    private mutating func decrease(by factor: Double, settings: AdaptiveSettings) {
        let shrunk = (Double(currentMax) * factor).rounded(.down)
        currentMax = Swift.max(settings.min, Swift.min(currentMax - 1, Int(exactly: shrunk) ?? settings.min))
        sinceDecrease = 0
        growthCredit = 0
    }
}
