import Foundation

/// A policy's config: the JSON stored in `dispatch_policy.policies.config`.
///
/// Decodes what `declare_policy` accepted, and is also the Swift DSL: build
/// one in code and ``json()`` gives the same JSON a file or psql would.
///
/// ```swift
/// let webhooks = PolicyConfig(roundRobinBy: "{account_id}", batchSize: 500) {
///     Gate.throttle(name: "per_endpoint", rate: .context("rate_limit", default: 60), per: 60, burst: 100,
///                   partitionBy: "{endpoint_id}")
///     Gate.concurrency(max: 5, partitionBy: "acct:{account_id}")
///     Gate.globalCap(max: 200)
///     Gate.fairInterleave()
///     Gate.adaptiveConcurrency(partitionBy: "{account_id}", initialMax: 3, targetLagMs: 1000, min: 1)
/// }
/// ```
public struct PolicyConfig: Codable, Sendable, Equatable {
    public var gates: [Gate]
    public var roundRobinBy: String?
    public var batchSize: Int?
    public var roundRobinQuantum: Int?
    /// A round-robin key's weight (a value read from the job's context): its
    /// lane gets `round_robin_quantum × weight` rows per fetch and `weight`
    /// rows per round of the batch, as does its partition in fair_interleave.
    /// Default 1; ``FieldLimits/roundRobinWeight`` bounds it.
    public var roundRobinWeight: GateValue?
    public var leaseSeconds: Int?
    public var maxAttempts: Int?
    public var target: Target?
    /// What staging does with the dedupe key of a job still pending:
    /// `keep` it (the default) or `replace` its args and context.
    public var dedupeMode: DedupeMode?
    /// Under `replace`: seconds a replaced job waits from the replacement
    /// (its `not_before` only moves later). ``FieldLimits/debounce``.
    public var debounce: Double?
    /// Most jobs one partition (the job's round-robin key) may have staged.
    /// ``FieldLimits/maxPendingPerPartition``.
    public var maxPendingPerPartition: Int?
    /// What staging into a full partition does: `reject` (SQLSTATE DP002,
    /// the default) or `drop_oldest`.
    public var onOverflow: Overflow?
    /// Seconds a job may wait to be admitted before it is finished as
    /// `expired`; a job's own `expires_at` may be earlier. ``FieldLimits/maxWait``.
    public var maxWait: Double?
    /// `enforce` (the default, nil) or `shadow`: every fetched job is
    /// admitted while the gates record what they would have refused.
    public var mode: Mode?

    /// Whether a policy's gates refuse jobs (`enforce`) or only record what
    /// they would have refused (`shadow`: every fetched job is admitted, gate
    /// state moves as if the gates had let them through).
    public enum Mode: String, Codable, Sendable, Equatable {
        case enforce, shadow
    }

    /// Whether the policy is in shadow mode.
    public var isShadow: Bool { mode == .shadow }

    public enum DedupeMode: String, Codable, Sendable, Equatable {
        case keep, replace
    }

    public enum Overflow: String, Codable, Sendable, Equatable {
        case reject
        case dropOldest = "drop_oldest"
    }

    public struct Target: Codable, Sendable, Equatable {
        public var type: String
        public var function: String?

        public static let readyQueue = Target(type: "ready_queue")
        public static func sql(function: String) -> Target { Target(type: "sql", function: function) }
    }

    enum CodingKeys: String, CodingKey {
        case gates
        case roundRobinBy = "round_robin_by"
        case batchSize = "batch_size"
        case roundRobinQuantum = "round_robin_quantum"
        case roundRobinWeight = "round_robin_weight"
        case leaseSeconds = "lease_seconds"
        case maxAttempts = "max_attempts"
        case target
        case dedupeMode = "dedupe_mode"
        case debounce
        case maxPendingPerPartition = "max_pending_per_partition"
        case onOverflow = "on_overflow"
        case maxWait = "max_wait"
        case mode
    }

    public init(
        gates: [Gate] = [], roundRobinBy: String? = nil, batchSize: Int? = nil, roundRobinQuantum: Int? = nil,
        roundRobinWeight: GateValue? = nil, leaseSeconds: Int? = nil, maxAttempts: Int? = nil, target: Target? = nil,
        dedupeMode: DedupeMode? = nil, debounce: Double? = nil, maxPendingPerPartition: Int? = nil, onOverflow: Overflow? = nil,
        maxWait: Double? = nil, mode: Mode? = nil
    ) {
        self.gates = gates
        self.roundRobinBy = roundRobinBy
        self.batchSize = batchSize
        self.roundRobinQuantum = roundRobinQuantum
        self.roundRobinWeight = roundRobinWeight
        self.leaseSeconds = leaseSeconds
        self.maxAttempts = maxAttempts
        self.target = target
        self.dedupeMode = dedupeMode
        self.debounce = debounce
        self.maxPendingPerPartition = maxPendingPerPartition
        self.onOverflow = onOverflow
        self.maxWait = maxWait
        self.mode = mode
    }

    public init(
        roundRobinBy: String? = nil, batchSize: Int? = nil, roundRobinQuantum: Int? = nil,
        roundRobinWeight: GateValue? = nil, leaseSeconds: Int? = nil, maxAttempts: Int? = nil, target: Target? = nil,
        dedupeMode: DedupeMode? = nil, debounce: Double? = nil, maxPendingPerPartition: Int? = nil, onOverflow: Overflow? = nil,
        maxWait: Double? = nil, mode: Mode? = nil,
        @GatesBuilder gates: () -> [Gate]
    ) {
        self.init(
            gates: gates(), roundRobinBy: roundRobinBy, batchSize: batchSize, roundRobinQuantum: roundRobinQuantum,
            roundRobinWeight: roundRobinWeight, leaseSeconds: leaseSeconds, maxAttempts: maxAttempts, target: target,
            dedupeMode: dedupeMode, debounce: debounce, maxPendingPerPartition: maxPendingPerPartition, onOverflow: onOverflow,
            maxWait: maxWait, mode: mode)
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        gates = try c.decodeIfPresent([Gate].self, forKey: .gates) ?? []
        roundRobinBy = try c.decodeIfPresent(String.self, forKey: .roundRobinBy)
        batchSize = try c.decodeIfPresent(Int.self, forKey: .batchSize)
        roundRobinQuantum = try c.decodeIfPresent(Int.self, forKey: .roundRobinQuantum)
        roundRobinWeight = try c.decodeIfPresent(GateValue.self, forKey: .roundRobinWeight)
        leaseSeconds = try c.decodeIfPresent(Int.self, forKey: .leaseSeconds)
        maxAttempts = try c.decodeIfPresent(Int.self, forKey: .maxAttempts)
        target = try c.decodeIfPresent(Target.self, forKey: .target)
        dedupeMode = try c.decodeIfPresent(DedupeMode.self, forKey: .dedupeMode)
        debounce = try c.decodeIfPresent(Double.self, forKey: .debounce)
        maxPendingPerPartition = try c.decodeIfPresent(Int.self, forKey: .maxPendingPerPartition)
        onOverflow = try c.decodeIfPresent(Overflow.self, forKey: .onOverflow)
        maxWait = try c.decodeIfPresent(Double.self, forKey: .maxWait)
        mode = try c.decodeIfPresent(Mode.self, forKey: .mode)
    }

    /// The round-robin weight of a job (1 without `round_robin_weight`),
    /// within ``FieldLimits/roundRobinWeight``.
    public func weight(of context: [String: String]) -> Int {
        guard let roundRobinWeight else { return 1 }
        return FieldLimits.roundRobinWeight.clampInt(roundRobinWeight.value(in: context, within: FieldLimits.roundRobinWeight))
    }

    /// Parses stored config JSON.
    public init(json: String) throws {
        do {
            self = try JSONDecoder().decode(PolicyConfig.self, from: Data(json.utf8))
        } catch {
            throw DispatchPolicyError(code: .invalidArgument, message: "cannot read policy config: \(error)")
        }
    }

    /// The config as JSON text, as `declare_policy` takes it.
    public func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(self), as: UTF8.self)
    }
}

@resultBuilder
public enum GatesBuilder {
    public static func buildExpression(_ gate: Gate) -> [Gate] { [gate] }
    public static func buildBlock(_ parts: [Gate]...) -> [Gate] { parts.flatMap { $0 } }
    public static func buildOptional(_ gates: [Gate]?) -> [Gate] { gates ?? [] }
    public static func buildEither(first: [Gate]) -> [Gate] { first }
    public static func buildEither(second: [Gate]) -> [Gate] { second }
    public static func buildArray(_ parts: [[Gate]]) -> [Gate] { parts.flatMap { $0 } }
}

/// A number, or a number read from each job's context with a default.
public enum GateValue: Codable, Sendable, Equatable, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral {
    case constant(Double)
    case context(String, default: Double)

    public init(integerLiteral value: Int) { self = .constant(Double(value)) }
    public init(floatLiteral value: Double) { self = .constant(value) }

    /// The value for a job, within `limit`.
    ///
    /// A context value is used when it is a JSON number (or a string holding
    /// one) that the config itself would accept for this field: within the
    /// bounds, and an integer where the field is integral. Anything else
    /// (missing, text, NaN, 1e308, a negative rate, 2.5 for a cap) falls back
    /// to the default: one job cannot poison a partition's state. A constant
    /// or default outside the bounds (impossible through `declare_policy`) is
    /// clamped into them.
    public func value(in context: [String: String], within limit: FieldLimit) -> Double {
        switch self {
        case .constant(let value):
            return limit.clamp(value)
        case .context(let key, let fallback):
            if let text = context[key], let value = Self.decimal(text), limit.contains(value),
                !limit.integral || Self.isIntegerLiteral(text)
            {
                return value
            }
            return limit.clamp(fallback)
        }
    }

    /// Whether a context value would be used for a job (see ``value(in:within:)``).
    public func usesContextValue(in context: [String: String], within limit: FieldLimit) -> Bool {
        guard case .context(let key, _) = self, let text = context[key], let value = Self.decimal(text) else { return false }
        return limit.contains(value) && (!limit.integral || Self.isIntegerLiteral(text))
    }

    /// A number written as JSON writes it (optionally inside a string):
    /// `-12`, `0.5`, `1e3`. Not hexadecimal, not `inf` or `nan`, which
    /// `Double(String)` would also accept.
    static func decimal(_ text: String) -> Double? {
        let trimmed = text.trimmingWhitespace()
        var bytes = Substring(trimmed).utf8[...]
        func digits() -> Int {
            let count = bytes.prefix { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }.count
            bytes = bytes.dropFirst(count)
            return count
        }
        if bytes.first == UInt8(ascii: "-") { bytes = bytes.dropFirst() }
        guard digits() > 0 else { return nil }
        if bytes.first == UInt8(ascii: ".") {
            bytes = bytes.dropFirst()
            guard digits() > 0 else { return nil }
        }
        if bytes.first == UInt8(ascii: "e") || bytes.first == UInt8(ascii: "E") {
            bytes = bytes.dropFirst()
            if bytes.first == UInt8(ascii: "+") || bytes.first == UInt8(ascii: "-") { bytes = bytes.dropFirst() }
            guard digits() > 0 else { return nil }
        }
        guard bytes.isEmpty, let value = Double(trimmed), value.isFinite else { return nil }
        // 1e-400 parses as 0: a value no double holds is not 0.
        if value == 0,
            trimmed.utf8.prefix(while: { $0 != UInt8(ascii: "e") && $0 != UInt8(ascii: "E") })
                .contains(where: { $0 >= UInt8(ascii: "1") && $0 <= UInt8(ascii: "9") })
        {
            return nil
        }
        return value
    }

    /// Whether the decimal `text` is an integer exactly (`2.0000000000000001`
    /// is not, though it parses as the double 2).
    static func isIntegerLiteral(_ text: String) -> Bool {
        var rest = Substring(text.trimmingWhitespace())
        if rest.hasPrefix("-") { rest = rest.dropFirst() }
        var exponent = 0
        if let e = rest.firstIndex(where: { $0 == "e" || $0 == "E" }) {
            guard let value = Int(rest[rest.index(after: e)...]) else { return false }
            exponent = Swift.min(Swift.max(value, -1_000_000), 1_000_000)
            rest = rest[..<e]
        }
        let parts = rest.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        let integer = parts.first ?? ""
        let digits = Array((integer + (parts.count > 1 ? parts[1] : "")).utf8)
        // The digits from `point` on are the fraction; all zeros: an integer.
        let point = integer.count + exponent
        return point >= digits.count || digits[Swift.max(point, 0)...].allSatisfy { $0 == UInt8(ascii: "0") }
    }

    private enum Keys: String, CodingKey { case context, `default` }

    public init(from decoder: any Decoder) throws {
        if let number = try? decoder.singleValueContainer().decode(Double.self) {
            self = .constant(number)
            return
        }
        let c = try decoder.container(keyedBy: Keys.self)
        self = .context(try c.decode(String.self, forKey: .context), default: try c.decode(Double.self, forKey: .default))
    }

    public func encode(to encoder: any Encoder) throws {
        switch self {
        case .constant(let value):
            var c = encoder.singleValueContainer()
            if let integer = Self.exactInteger(value) { try c.encode(integer) } else { try c.encode(value) }
        case .context(let key, let fallback):
            var c = encoder.container(keyedBy: Keys.self)
            try c.encode(key, forKey: .context)
            if let integer = Self.exactInteger(fallback) {
                try c.encode(integer, forKey: .default)
            } else {
                try c.encode(fallback, forKey: .default)
            }
        }
    }

    /// `value` as an integer when it is one that JSON can carry exactly.
    static func exactInteger(_ value: Double) -> Int64? {
        guard value.isFinite, value == value.rounded(), abs(value) < 1e15 else { return nil }
        return Int64(exactly: value)
    }
}

/// One gate of a policy. Build with the static functions (`.throttle(...)`).
public struct Gate: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        case throttle
        case concurrency
        case globalCap = "global_cap"
        case fairInterleave = "fair_interleave"
        case adaptiveConcurrency = "adaptive_concurrency"
    }

    public var type: Kind
    public var name: String?
    public var partitionBy: String?
    // throttle
    public var rate: GateValue?
    public var per: GateValue?
    public var burst: GateValue?
    /// Tokens one job takes (default 1); ``FieldLimits/throttleCost`` bounds it.
    public var cost: GateValue?
    // concurrency (a value), global_cap (a number), adaptive_concurrency (the optional ceiling)
    public var max: GateValue?
    // adaptive_concurrency
    public var initialMax: Int?
    public var targetLagMs: Double?
    public var min: Int?
    public var ewmaAlpha: Double?
    public var failureDecreaseFactor: Double?
    public var overloadDecreaseFactor: Double?

    enum CodingKeys: String, CodingKey {
        case type, name
        case partitionBy = "partition_by"
        case rate, per, burst, cost, max
        case initialMax = "initial_max"
        case targetLagMs = "target_lag_ms"
        case min
        case ewmaAlpha = "ewma_alpha"
        case failureDecreaseFactor = "failure_decrease_factor"
        case overloadDecreaseFactor = "overload_decrease_factor"
    }

    public init(type: Kind, name: String? = nil, partitionBy: String? = nil) {
        self.type = type
        self.name = name
        self.partitionBy = partitionBy
    }

    /// The gate's name: its `name`, else its type.
    public var effectiveName: String { name ?? type.rawValue }

    /// Whether admitted jobs hold a slot of this gate until they finish.
    public var holdsSlots: Bool { type == .concurrency || type == .globalCap || type == .adaptiveConcurrency }

    public static func throttle(
        name: String? = nil, rate: GateValue, per: GateValue, burst: GateValue? = nil, cost: GateValue? = nil, partitionBy: String? = nil
    ) -> Gate {
        var gate = Gate(type: .throttle, name: name, partitionBy: partitionBy)
        gate.rate = rate
        gate.per = per
        gate.burst = burst
        gate.cost = cost
        return gate
    }

    public static func concurrency(name: String? = nil, max: GateValue, partitionBy: String? = nil) -> Gate {
        var gate = Gate(type: .concurrency, name: name, partitionBy: partitionBy)
        gate.max = max
        return gate
    }

    public static func globalCap(name: String? = nil, max: Int) -> Gate {
        var gate = Gate(type: .globalCap, name: name)
        gate.max = .constant(Double(max))
        return gate
    }

    public static func fairInterleave(name: String? = nil, partitionBy: String? = nil) -> Gate {
        Gate(type: .fairInterleave, name: name, partitionBy: partitionBy)
    }

    public static func adaptiveConcurrency(
        name: String? = nil, partitionBy: String? = nil, initialMax: Int? = nil, targetLagMs: Double, min: Int? = nil,
        max: Int? = nil, ewmaAlpha: Double? = nil, failureDecreaseFactor: Double? = nil, overloadDecreaseFactor: Double? = nil
    ) -> Gate {
        var gate = Gate(type: .adaptiveConcurrency, name: name, partitionBy: partitionBy)
        gate.initialMax = initialMax
        gate.targetLagMs = targetLagMs
        gate.min = min
        gate.max = max.map { .constant(Double($0)) }
        gate.ewmaAlpha = ewmaAlpha
        gate.failureDecreaseFactor = failureDecreaseFactor
        gate.overloadDecreaseFactor = overloadDecreaseFactor
        return gate
    }

    /// The AIMD settings of an adaptive gate, with the documented defaults,
    /// every value within its ``FieldLimits`` bounds (clamped, never trapping,
    /// whatever the stored config says).
    public var adaptiveSettings: AdaptiveSettings {
        let floor = FieldLimits.adaptiveMin.clampInt(Double(min ?? 1))
        let ceiling = max.map { Swift.max(FieldLimits.adaptiveMax.clampInt($0.value(in: [:], within: FieldLimits.adaptiveMax)), floor) }
        var initial = FieldLimits.adaptiveInitialMax.clampInt(Double(initialMax ?? 3))
        initial = Swift.max(initial, floor)
        if let ceiling { initial = Swift.min(initial, ceiling) }
        func factor(_ value: Double?, _ limit: FieldLimit) -> Double {
            guard let value, limit.contains(value) else { return limit.defaultValue ?? 0.5 }
            return value
        }
        return AdaptiveSettings(
            initialMax: initial, min: floor, max: ceiling,
            targetLagMs: FieldLimits.adaptiveTargetLagMs.clamp(targetLagMs ?? 1000),
            ewmaAlpha: factor(ewmaAlpha, FieldLimits.adaptiveEWMAAlpha),
            failureDecreaseFactor: factor(failureDecreaseFactor, FieldLimits.adaptiveFailureDecrease),
            overloadDecreaseFactor: factor(overloadDecreaseFactor, FieldLimits.adaptiveOverloadDecrease))
    }
}
