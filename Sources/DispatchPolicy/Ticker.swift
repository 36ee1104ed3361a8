import Foundation
import Logging
import PostgresNIO

/// Defaults for what a policy's config leaves out (the reference's values).
public struct TickSettings: Sendable, Equatable {
    public var batchSize: Int = 500
    public var roundRobinQuantum: Int = 50
    public var leaseSeconds: Int = 900
    /// Most observations folded per adaptive gate and tick.
    public var maxObservationsPerTick: Int = 10_000

    public init(batchSize: Int = 500, roundRobinQuantum: Int = 50, leaseSeconds: Int = 900) {
        self.batchSize = batchSize
        self.roundRobinQuantum = roundRobinQuantum
        self.leaseSeconds = leaseSeconds
    }
}

/// What one tick of one policy did.
public struct TickResult: Sendable, Equatable {
    public enum Outcome: String, Sendable {
        /// The tick ran (it may have admitted nothing).
        case ran
        /// The policy is paused.
        case paused
        /// Another runner holds the policy's tick lock.
        case busy
        /// No such policy.
        case unknown
    }

    public var policy: String
    public var outcome: Outcome
    public var fetched = 0
    public var admitted = 0
    public var reaped = 0
    public var observationsFolded = 0
    public var refusedByGate: [String: Int] = [:]
    /// Tokens left after the tick, summed over the partitions it touched, per throttle gate.
    public var tokensLeft: [String: Double] = [:]
    public var duration: Duration = .zero

    public init(policy: String, outcome: Outcome) {
        self.policy = policy
        self.outcome = outcome
    }
}

/// Runs ticks: one policy, one transaction, on one connection.
///
/// Lock the policy (single writer), reap expired leases, fold new adaptive
/// observations (AIMD), promote due scheduled jobs, fetch a batch (round-robin
/// by key), order it (fair_interleave), read the gate state it needs, decide
/// (pure ``Admission``), admit, commit.
public struct Ticker: Sendable {
    public let connection: PostgresConnection
    public let settings: TickSettings
    public let logger: Logger

    public init(connection: PostgresConnection, settings: TickSettings = TickSettings(), logger: Logger) {
        self.connection = connection
        self.settings = settings
        self.logger = logger
    }

    /// Policies that are not paused and have work: jobs eligible now,
    /// scheduled jobs now due, expired leases, or observations to fold.
    public func policiesWithWork(only: String? = nil) async throws -> [String] {
        try await connection.rows(
            """
            SELECT p.name FROM dispatch_policy.policies p
            WHERE NOT p.paused AND (\(only)::text IS NULL OR p.name = \(only))
              AND (EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s WHERE s.policy = p.name AND s.not_before IS NULL)
                   OR EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s WHERE s.policy = p.name
                              AND s.not_before IS NOT NULL AND s.not_before <= now())
                   OR EXISTS (SELECT 1 FROM dispatch_policy.admitted_jobs a WHERE a.policy = p.name AND a.lease_expires_at < now())
                   OR EXISTS (SELECT 1 FROM dispatch_policy.observations o WHERE o.policy = p.name))
            ORDER BY p.name
            """,
            logger: logger
        ).map { try $0.decode(String.self) }
    }

    /// One tick of `policy`.
    public func tick(policy: String) async throws -> TickResult {
        let started = ContinuousClock.now
        var result = TickResult(policy: policy, outcome: .ran)
        var log = logger
        log[metadataKey: "policy.name"] = "\(policy)"
        _ = try await connection.rows("BEGIN", logger: log)
        do {
            result = try await tickInTransaction(policy: policy, logger: log)
            _ = try await connection.rows(result.outcome == .ran ? "COMMIT" : "ROLLBACK", logger: log)
        } catch {
            _ = try? await connection.rows("ROLLBACK", logger: log)
            throw error
        }
        result.duration = ContinuousClock.now - started
        if result.admitted > 0 || result.reaped > 0 {
            log.info("tick", metadata: [
                "tick.admitted": "\(result.admitted)", "tick.fetched": "\(result.fetched)", "tick.reaped": "\(result.reaped)",
            ])
        }
        return result
    }

    private func tickInTransaction(policy: String, logger: Logger) async throws -> TickResult {
        var result = TickResult(policy: policy, outcome: .ran)
        guard try await connection.rows("SELECT dispatch_policy.try_lock_policy(\(policy))", logger: logger)
            .first!.decode(Bool.self)
        else {
            result.outcome = .busy
            return result
        }
        // Time is read after the lock, so it never goes backwards between
        // ticks of one policy; every primitive gets this same `now`.
        guard let row = try await connection.rows(
            "SELECT config::text, paused, clock_timestamp() FROM dispatch_policy.policies WHERE name = \(policy)",
            logger: logger
        ).first else {
            result.outcome = .unknown
            return result
        }
        let (configJSON, paused, now) = try row.decode((String, Bool, Date).self)
        if paused {
            result.outcome = .paused
            return result
        }
        let config = try PolicyConfig(json: configJSON)
        let batchSize = config.batchSize ?? settings.batchSize
        let quantum = config.roundRobinQuantum ?? settings.roundRobinQuantum
        let lease = config.leaseSeconds ?? settings.leaseSeconds

        result.reaped = try await connection.rows(
            "SELECT dispatch_policy.reap_leases(\(policy), \(now))", logger: logger
        ).first!.decode(Int.self)

        result.observationsFolded = try await foldObservations(policy: policy, config: config, now: now, logger: logger)

        _ = try await connection.rows(
            "SELECT dispatch_policy.promote_scheduled(\(policy), \(batchSize)::integer, \(now))", logger: logger)

        let rows = try await connection.rows(
            "SELECT id, priority, round_robin_key, context::text FROM dispatch_policy.fetch_batch(\(policy), \(batchSize)::integer, \(quantum)::integer, \(now))",
            logger: logger
        ).map { row in
            let (id, priority, key, context) = try row.decode((Int64, Int, String?, String).self)
            return BatchRow(id: id, priority: priority, roundRobinKey: key, context: try Self.decodeStrings(context))
        }
        result.fetched = rows.count
        guard !rows.isEmpty else { return result }

        let admission = Admission(config: config)
        let ordered = admission.order(rows)
        let needed = admission.requiredState(for: ordered)
        var state = GateState()
        if !needed.buckets.isEmpty {
            let json = try Self.json(needed.buckets.map {
                ["gate": .string($0.key.gate), "partition": .string($0.key.partition),
                 "rate": .number($0.rate), "per": .number($0.per), "burst": .number($0.burst)] as [String: JSONScalar]
            })
            for row in try await connection.rows(
                "SELECT gate, partition, tokens FROM dispatch_policy.refill_buckets(\(policy), \(json)::jsonb, \(now))",
                logger: logger
            ) {
                let (gate, partition, tokens) = try row.decode((String, String, Double).self)
                state.tokens[GateKey(gate: gate, partition: partition)] = tokens
            }
        }
        if !needed.counters.isEmpty {
            let json = try Self.json(needed.counters.map { ["gate": JSONScalar.string($0.gate), "partition": .string($0.partition)] })
            for row in try await connection.rows(
                "SELECT gate, partition, in_flight FROM dispatch_policy.read_counters(\(policy), \(json)::jsonb)", logger: logger
            ) {
                let (gate, partition, inFlight) = try row.decode((String, String, Int).self)
                state.inFlight[GateKey(gate: gate, partition: partition)] = inFlight
            }
        }
        if !needed.adaptive.isEmpty {
            let json = try Self.json(needed.adaptive.map {
                ["gate": JSONScalar.string($0.key.gate), "partition": .string($0.key.partition), "initial_max": .number(Double($0.initialMax))]
            })
            for row in try await connection.rows(
                "SELECT gate, partition, current_max FROM dispatch_policy.read_adaptive(\(policy), \(json)::jsonb)", logger: logger
            ) {
                let (gate, partition, cap) = try row.decode((String, String, Int).self)
                state.adaptiveCap[GateKey(gate: gate, partition: partition)] = cap
            }
        }

        let decision = admission.evaluate(ordered, state: state, buckets: needed.buckets)
        result.refusedByGate = decision.refusedByGate
        for (key, tokens) in state.tokens {
            result.tokensLeft[key.gate, default: 0] += tokens - (decision.takes[key] ?? 0)
        }
        guard !decision.admitted.isEmpty else { return result }

        let jobs = try Self.json(decision.admitted.map { AdmitJob(id: $0.id, slots: $0.slots) })
        let takes = try Self.json(decision.takes.sorted { $0.key < $1.key }.map {
            ["gate": JSONScalar.string($0.key.gate), "partition": .string($0.key.partition), "tokens": .number($0.value)]
        })
        result.admitted = try await connection.rows(
            "SELECT dispatch_policy.admit(\(policy), \(jobs)::jsonb, \(takes)::jsonb, \(lease)::integer, \(now))", logger: logger
        ).first!.decode(Int.self)
        return result
    }

    /// Folds each adaptive gate's new observations into its stats (AIMD).
    private func foldObservations(policy: String, config: PolicyConfig, now: Date, logger: Logger) async throws -> Int {
        var folded = 0
        for gate in config.gates where gate.type == .adaptiveConcurrency {
            let name = gate.effectiveName
            let settings = gate.adaptiveSettings
            var byPartition: [String: [(lag: Double, success: Bool, at: Date)]] = [:]
            for row in try await connection.rows(
                "SELECT partition, lag_ms, success, observed_at FROM dispatch_policy.take_observations(\(policy), \(name), \(self.settings.maxObservationsPerTick)::integer)",
                logger: logger
            ) {
                let (partition, lag, success, at) = try row.decode((String, Double, Bool, Date).self)
                byPartition[partition, default: []].append((lag, success, at))
                folded += 1
            }
            guard !byPartition.isEmpty else { continue }
            let keys = byPartition.keys.sorted()
            let json = try Self.json(keys.map { ["gate": JSONScalar.string(name), "partition": .string($0), "initial_max": .number(Double(settings.initialMax))] })
            var current: [String: (Int, Double?)] = [:]
            for row in try await connection.rows(
                "SELECT partition, current_max, ewma_lag_ms FROM dispatch_policy.read_adaptive(\(policy), \(json)::jsonb)", logger: logger
            ) {
                let (partition, cap, ewma) = try row.decode((String, Int, Double?).self)
                current[partition] = (cap, ewma)
            }
            var updates: [AdaptiveUpdate] = []
            for partition in keys {
                let (cap, ewma) = current[partition] ?? (settings.initialMax, nil)
                var controller = AdaptiveController(currentMax: cap, ewmaLagMs: ewma)
                let observations = byPartition[partition]!
                for observation in observations {
                    controller.observe(lagMs: observation.lag, success: observation.success, settings: settings)
                }
                updates.append(AdaptiveUpdate(
                    gate: name, partition: partition, current_max: controller.currentMax, ewma_lag_ms: controller.ewmaLagMs ?? 0,
                    observations: controller.observations, failures: controller.failures,
                    last_observed_at: Self.timestamp(observations.map(\.at).max()!)))
            }
            _ = try await connection.rows(
                "SELECT dispatch_policy.save_adaptive(\(policy), \(try Self.json(updates))::jsonb, \(now))", logger: logger)
        }
        return folded
    }

    // MARK: - JSON plumbing

    enum JSONScalar: Encodable {
        case string(String)
        case number(Double)

        func encode(to encoder: any Encoder) throws {
            var c = encoder.singleValueContainer()
            switch self {
            case .string(let s): try c.encode(s)
            case .number(let n): try c.encode(n)
            }
        }
    }

    struct AdmitJob: Encodable {
        var id: Int64
        var slots: [String: String]
    }

    struct AdaptiveUpdate: Encodable {
        var gate: String
        var partition: String
        var current_max: Int
        var ewma_lag_ms: Double
        var observations: Int
        var failures: Int
        var last_observed_at: String
    }

    static func json(_ value: some Encodable) throws -> String {
        String(decoding: try JSONEncoder().encode(value), as: UTF8.self)
    }

    static func decodeStrings(_ text: String) throws -> [String: String] {
        guard let strings = ContextStrings.parse(text) else {
            throw DispatchPolicyError(code: .server, message: "fetch_batch returned a context that is not a JSON object: \(text.prefix(200))")
        }
        return strings
    }

    static func timestamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: date)
    }
}
