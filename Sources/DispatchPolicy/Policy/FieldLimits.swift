/// The documented bound of one numeric field or length.
///
/// The SQL function `dispatch_policy.limits()` is the source; this table is
/// its copy for the runner, which checks per-job context values against it,
/// and a test keeps the two equal.
public struct FieldLimit: Sendable, Equatable, CustomStringConvertible {
    public var field: String
    public var minimum: Double
    public var minimumExclusive: Bool
    public var maximum: Double
    public var maximumExclusive: Bool
    public var integral: Bool
    public var defaultValue: Double?
    public var unit: String

    public init(
        _ field: String, _ minimum: Double, _ maximum: Double, integral: Bool, default defaultValue: Double? = nil,
        unit: String = "", minimumExclusive: Bool = false, maximumExclusive: Bool = false
    ) {
        self.field = field
        self.minimum = minimum
        self.minimumExclusive = minimumExclusive
        self.maximum = maximum
        self.maximumExclusive = maximumExclusive
        self.integral = integral
        self.defaultValue = defaultValue
        self.unit = unit
    }

    /// Whether `value` is within the bounds (and an integer where the field is).
    public func contains(_ value: Double) -> Bool {
        // A non-zero number must be at least 1e-300 in magnitude, as in SQL.
        guard value.isFinite, value == 0 || abs(value) >= 1e-300 else { return false }
        guard value > minimum || (value == minimum && !minimumExclusive) else { return false }
        guard value < maximum || (value == maximum && !maximumExclusive) else { return false }
        return !integral || value == value.rounded(.towardZero)
    }

    /// `value` moved into the bounds (NaN goes to the minimum).
    public func clamp(_ value: Double) -> Double {
        guard !value.isNaN else { return minimum }
        return Swift.min(Swift.max(value, minimum), maximum)
    }

    /// `value` clamped into the bounds, as an `Int`: never traps.
    public func clampInt(_ value: Double) -> Int {
        let clamped = clamp(value).rounded(.towardZero)
        // The bounds of every integral field are far inside Int's range.
        return Int(exactly: clamped) ?? Int(minimum)
    }

    public var description: String {
        let lo = minimumExclusive ? "(" : "["
        let hi = maximumExclusive ? ")" : "]"
        return "\(field) in \(lo)\(minimum), \(maximum)\(hi)\(unit.isEmpty ? "" : " \(unit)")"
    }
}

public enum FieldLimits {
    public static let batchSize = FieldLimit("batch_size", 1, 100_000, integral: true, default: 500, unit: "rows")
    public static let roundRobinQuantum = FieldLimit("round_robin_quantum", 1, 100_000, integral: true, default: 50, unit: "rows")
    public static let leaseSeconds = FieldLimit("lease_seconds", 1, 31_536_000, integral: true, default: 900, unit: "seconds")
    public static let maxAttempts = FieldLimit("max_attempts", 1, 1000, integral: true, default: 25, unit: "attempts")
    public static let throttleRate = FieldLimit("throttle.rate", 0, 1_000_000, integral: false, unit: "tokens")
    public static let throttlePer = FieldLimit("throttle.per", 0.001, 31_536_000, integral: false, unit: "seconds")
    public static let throttleBurst = FieldLimit("throttle.burst", 1, 1_000_000, integral: false, unit: "tokens")
    public static let concurrencyMax = FieldLimit("concurrency.max", 0, 1_000_000, integral: true, unit: "jobs")
    public static let globalCapMax = FieldLimit("global_cap.max", 0, 1_000_000, integral: true, unit: "jobs")
    public static let adaptiveInitialMax = FieldLimit(
        "adaptive_concurrency.initial_max", 1, 1_000_000, integral: true, default: 3, unit: "jobs")
    public static let adaptiveMin = FieldLimit("adaptive_concurrency.min", 1, 1_000_000, integral: true, default: 1, unit: "jobs")
    public static let adaptiveMax = FieldLimit("adaptive_concurrency.max", 1, 1_000_000, integral: true, unit: "jobs")
    public static let adaptiveTargetLagMs = FieldLimit("adaptive_concurrency.target_lag_ms", 1, 86_400_000, integral: false, unit: "ms")
    public static let adaptiveEWMAAlpha = FieldLimit(
        "adaptive_concurrency.ewma_alpha", 0, 1, integral: false, default: 0.5, minimumExclusive: true)
    public static let adaptiveFailureDecrease = FieldLimit(
        "adaptive_concurrency.failure_decrease_factor", 0, 1, integral: false, default: 0.5, minimumExclusive: true, maximumExclusive: true)
    public static let adaptiveOverloadDecrease = FieldLimit(
        "adaptive_concurrency.overload_decrease_factor", 0, 1, integral: false, default: 0.95, minimumExclusive: true,
        maximumExclusive: true)
    public static let jobPriority = FieldLimit("job.priority", -2_147_483_648, 2_147_483_647, integral: true, default: 0)
    public static let jobQueue = FieldLimit("job.queue", 1, 128, integral: true, unit: "bytes")
    public static let jobDedupeKey = FieldLimit("job.dedupe_key", 1, 512, integral: true, unit: "bytes")
    public static let jobRoundRobinKey = FieldLimit("job.round_robin_key", 1, 512, integral: true, unit: "bytes")
    public static let jobContext = FieldLimit("job.context", 0, 65_536, integral: true, unit: "bytes")
    public static let partitionKey = FieldLimit("partition_key", 0, 256, integral: true, unit: "bytes")
    public static let claimMax = FieldLimit("claim.max", 1, 10_000, integral: true, default: 1, unit: "jobs")
    public static let claimWorker = FieldLimit("claim.worker", 0, 256, integral: true, unit: "bytes")
    public static let completeManyJobs = FieldLimit("complete_many.jobs", 0, 10_000, integral: true, unit: "jobs")
    public static let failRetryIn = FieldLimit("fail.retry_in", 0, 31_536_000, integral: false, unit: "seconds")
    public static let failError = FieldLimit("fail.error", 0, 8192, integral: true, unit: "characters")
    public static let pruneRetention = FieldLimit("prune.retention", 0, 3_153_600_000, integral: false, default: 604_800, unit: "seconds")
    public static let pruneIdle = FieldLimit("prune.idle", 0, 3_153_600_000, integral: false, default: 3600, unit: "seconds")
    public static let deferUntil = FieldLimit("defer.until", 0, 2_592_000, integral: false, unit: "seconds", minimumExclusive: true)
    public static let deferReason = FieldLimit("defer.reason", 1, 1024, integral: true, unit: "characters")
    public static let debounce = FieldLimit("debounce", 0, 86_400, integral: false, default: 0, unit: "seconds")
    public static let maxPendingPerPartition = FieldLimit("max_pending_per_partition", 1, 10_000_000, integral: true, unit: "jobs")
    public static let maxWait = FieldLimit("max_wait", 0, 31_536_000, integral: false, unit: "seconds", minimumExclusive: true)
    /// Tokens one job takes from a throttle's bucket (issue 12); never more
    /// than the bucket's burst, which staging checks.
    public static let throttleCost = FieldLimit(
        "throttle.cost", 0, 1_000_000, integral: false, default: 1, unit: "tokens", minimumExclusive: true)
    /// A round-robin key's share: its lane gets quantum × weight rows per
    /// fetch and weight rows per round of the batch (issue 12).
    public static let roundRobinWeight = FieldLimit("round_robin_weight", 1, 1000, integral: true, default: 1)

    /// Every bound `dispatch_policy.limits()` has, in its order.
    public static let database: [FieldLimit] = [
        batchSize, roundRobinQuantum, leaseSeconds, maxAttempts, throttleRate, throttlePer, throttleBurst, concurrencyMax,
        globalCapMax, adaptiveInitialMax, adaptiveMin, adaptiveMax, adaptiveTargetLagMs, adaptiveEWMAAlpha,
        adaptiveFailureDecrease, adaptiveOverloadDecrease, jobPriority, jobQueue, jobDedupeKey, jobRoundRobinKey, jobContext,
        partitionKey, claimMax, claimWorker, completeManyJobs, failRetryIn, failError, pruneRetention, pruneIdle,
        deferUntil, deferReason, debounce, maxPendingPerPartition, maxWait, throttleCost, roundRobinWeight,
    ]
}
