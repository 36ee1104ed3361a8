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
    public var leaseSeconds: Int?
    public var maxAttempts: Int?
    public var target: Target?

    public struct Target: Codable, Sendable, Equatable {
        public var type: String
        public var function: String?

        public static let readyQueue = Target(type: "ready_queue")
        public static func sql(function: String) -> Target { Target(type: "sql", function: function) }
    }

    enum CodingKeys: String, CodingKey {
        case gates, roundRobinBy = "round_robin_by", batchSize = "batch_size", roundRobinQuantum = "round_robin_quantum"
        case leaseSeconds = "lease_seconds", maxAttempts = "max_attempts", target
    }

    public init(
        gates: [Gate] = [], roundRobinBy: String? = nil, batchSize: Int? = nil, roundRobinQuantum: Int? = nil,
        leaseSeconds: Int? = nil, maxAttempts: Int? = nil, target: Target? = nil
    ) {
        self.gates = gates
        self.roundRobinBy = roundRobinBy
        self.batchSize = batchSize
        self.roundRobinQuantum = roundRobinQuantum
        self.leaseSeconds = leaseSeconds
        self.maxAttempts = maxAttempts
        self.target = target
    }

    public init(
        roundRobinBy: String? = nil, batchSize: Int? = nil, roundRobinQuantum: Int? = nil,
        leaseSeconds: Int? = nil, maxAttempts: Int? = nil, target: Target? = nil,
        @GatesBuilder gates: () -> [Gate]
    ) {
        self.init(gates: gates(), roundRobinBy: roundRobinBy, batchSize: batchSize, roundRobinQuantum: roundRobinQuantum,
                  leaseSeconds: leaseSeconds, maxAttempts: maxAttempts, target: target)
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        gates = try c.decodeIfPresent([Gate].self, forKey: .gates) ?? []
        roundRobinBy = try c.decodeIfPresent(String.self, forKey: .roundRobinBy)
        batchSize = try c.decodeIfPresent(Int.self, forKey: .batchSize)
        roundRobinQuantum = try c.decodeIfPresent(Int.self, forKey: .roundRobinQuantum)
        leaseSeconds = try c.decodeIfPresent(Int.self, forKey: .leaseSeconds)
        maxAttempts = try c.decodeIfPresent(Int.self, forKey: .maxAttempts)
        target = try c.decodeIfPresent(Target.self, forKey: .target)
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

    /// The value for a job: its context value of the key when that is a
    /// number, else the default.
    public func value(in context: [String: String]) -> Double {
        switch self {
        case .constant(let value):
            return value
        case .context(let key, let fallback):
            return context[key].flatMap { Double($0.trimmingWhitespace()) }.flatMap { $0.isFinite ? $0 : nil } ?? fallback
        }
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
            if value == value.rounded(), abs(value) < 1e15 { try c.encode(Int64(value)) } else { try c.encode(value) }
        case .context(let key, let fallback):
            var c = encoder.container(keyedBy: Keys.self)
            try c.encode(key, forKey: .context)
            if fallback == fallback.rounded(), abs(fallback) < 1e15 {
                try c.encode(Int64(fallback), forKey: .default)
            } else {
                try c.encode(fallback, forKey: .default)
            }
        }
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
    public var per: Double?
    public var burst: GateValue?
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
        case type, name, partitionBy = "partition_by", rate, per, burst, max, initialMax = "initial_max"
        case targetLagMs = "target_lag_ms", min, ewmaAlpha = "ewma_alpha"
        case failureDecreaseFactor = "failure_decrease_factor", overloadDecreaseFactor = "overload_decrease_factor"
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

    public static func throttle(name: String? = nil, rate: GateValue, per: Double, burst: GateValue? = nil, partitionBy: String? = nil) -> Gate {
        var gate = Gate(type: .throttle, name: name, partitionBy: partitionBy)
        gate.rate = rate
        gate.per = per
        gate.burst = burst
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

    /// The AIMD settings of an adaptive gate, with the documented defaults.
    public var adaptiveSettings: AdaptiveSettings {
        let floor = Swift.max(min ?? 1, 1)
        let ceiling = max.map { Int($0.value(in: [:])) }
        var initial = initialMax ?? 3
        initial = Swift.max(initial, floor)
        if let ceiling { initial = Swift.min(initial, ceiling) }
        return AdaptiveSettings(
            initialMax: initial, min: floor, max: ceiling, targetLagMs: targetLagMs ?? 1000,
            ewmaAlpha: ewmaAlpha ?? 0.5, failureDecreaseFactor: failureDecreaseFactor ?? 0.5,
            overloadDecreaseFactor: overloadDecreaseFactor ?? 0.95)
    }
}
