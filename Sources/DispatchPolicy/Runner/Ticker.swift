import Foundation
import Logging
import PostgresNIO

/// Defaults for what a policy's config leaves out. `nil` leaves the choice
/// to the database (`dispatch_policy.limits()` defaults), so a value has one
/// source.
public struct TickSettings: Sendable, Equatable {
    public var batchSize: Int
    public var roundRobinQuantum: Int
    /// Lease of admitted jobs of policies without `lease_seconds`; nil: the
    /// `lease_seconds` default of `dispatch_policy.limits()` (900 s).
    public var leaseSeconds: Int?
    /// Most observations folded per adaptive gate and tick.
    public var maxObservationsPerTick: Int = 10_000
    /// Longest one tick's transaction may take (its statement_timeout): a
    /// slow `sql` target fails its policy's tick instead of holding the
    /// runner. nil: the session's setting.
    public var timeout: Duration? = .seconds(60)

    public init(
        batchSize: Int = FieldLimits.batchSize.clampInt(FieldLimits.batchSize.defaultValue ?? 500),
        roundRobinQuantum: Int = FieldLimits.roundRobinQuantum.clampInt(FieldLimits.roundRobinQuantum.defaultValue ?? 50),
        leaseSeconds: Int? = nil
    ) {
        self.batchSize = FieldLimits.batchSize.clampInt(Double(batchSize))
        self.roundRobinQuantum = FieldLimits.roundRobinQuantum.clampInt(Double(roundRobinQuantum))
        self.leaseSeconds = leaseSeconds.map { FieldLimits.leaseSeconds.clampInt(Double($0)) }
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
    /// Jobs the gates let through that were not admitted because a stager
    /// replaced, dropped or cancelled them after the fetch (`tick_finish`
    /// skips a job whose row changed since `tick_begin` read it; it took
    /// nothing and is looked at again by a later tick).
    public var skipped = 0
    public var reaped = 0
    public var observationsFolded = 0
    public var refusedByGate: [String: Int] = [:]
    /// The policy is in shadow mode: every fetched job was admitted, and
    /// ``wouldRefuseByGate`` says what the gates would have refused.
    public var shadow = false
    /// Shadow mode: jobs each gate had no room for and that were admitted
    /// anyway (a job counts for every such gate).
    public var wouldRefuseByGate: [String: Int] = [:]
    /// Per throttle gate, its partitions this tick touched: the fewest
    /// tokens left, and how many are throttle-bound.
    public var tokens: [String: TokenSummary] = [:]
    /// Where the round-robin rotation continues (nil: not moved).
    public var cursor: CursorMove?
    /// When a throttle partition that refused jobs of this batch next holds a
    /// whole token (nil: none refused for tokens).
    public var nextTokenIn: Duration?
    /// Lanes this tick found blocked (they can admit nothing more until a
    /// partition that refused them has room): the fetch passes them over
    /// until their block ends.
    public var lanesBlocked = 0
    /// Set by ``Ticker/admitNow(policy:gate:partition:maxJobs:wait:)`` when
    /// nothing was fetched because a global cap of the policy is full.
    public var globalCapFull = false
    public var duration: Duration = .zero

    public init(policy: String, outcome: Outcome) {
        self.policy = policy
        self.outcome = outcome
    }
}

/// A sentence on what an admit-now did, for the CLI and the admin UI.
public struct AdmitNowReport: Sendable {
    public let result: TickResult
    public let requested: Int

    public init(_ result: TickResult, requested: Int) {
        self.result = result
        self.requested = requested
    }

    public var text: String {
        switch result.outcome {
        case .busy:
            return "policy \(result.policy): a tick of another runner did not end in time; nothing admitted, try again"
        case .paused:
            return "policy \(result.policy) is paused; nothing admitted"
        case .unknown:
            return "unknown policy: '\(result.policy)'"
        case .ran:
            if result.fetched == 0 {
                return result.globalCapFull
                    ? "admitted 0: the policy's global cap is full; jobs are admitted again as slots are released"
                    : "admitted 0: no pending job of the partition is eligible now"
            }
            var text = "admitted \(result.admitted) of \(result.fetched) fetched (asked for \(requested))"
            let refused = result.refusedByGate.filter { $0.value > 0 }.sorted { $0.key < $1.key }
            if !refused.isEmpty {
                text += "; refused " + refused.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            }
            return text
        }
    }
}

/// A policy the runner should look at.
public struct PolicyWork: Sendable, Equatable {
    public var name: String
    /// A runner recorded a failed tick of it (`dispatch_policy.runner_failures`).
    public var failing: Bool
    /// Some of its admitted jobs' leases have run out.
    public var expiredLeases: Bool
    /// Jobs eligible now, due scheduled jobs or observations to fold: a tick
    /// has something to do.
    public var hasWork: Bool
    /// Until the next thing due by the clock: its earliest scheduled job
    /// becomes eligible, or its earliest lease runs out (nil: nothing).
    public var nextDueIn: Duration?

    public init(name: String, failing: Bool, expiredLeases: Bool = true, hasWork: Bool = true, nextDueIn: Duration? = nil) {
        self.name = name
        self.failing = failing
        self.expiredLeases = expiredLeases
        self.hasWork = hasWork
        self.nextDueIn = nextDueIn
    }
}

/// Runs ticks: one policy at a time, on one session.
///
/// Reap expired leases (in their own transaction), then three calls in
/// autocommit, three round trips: `tick_begin` takes the policy's lock at
/// session level (single writer), reads new adaptive observations, promotes
/// due scheduled jobs and fetches a batch (round-robin by lane); here the
/// batch is ordered (fair_interleave) and its partitions rendered;
/// `tick_state` reads the gate state they need; here the batch is decided
/// (pure ``Admission``) and the observations folded (pure
/// ``AdaptiveController``); `tick_finish` admits, moves the rotation, saves
/// the adaptive state and gives the lock back, in one transaction. A tick
/// with nothing fetched or observed is the first call alone. It needs one
/// session throughout: a connection, never a pool.
/// The tokens of one throttle gate's partitions that a tick touched.
public struct TokenSummary: Sendable, Equatable {
    /// The fewest tokens left in any of them.
    public var lowest = Double.infinity
    public var partitions = 0
    /// Partitions left with less than one whole token, or too few for the
    /// cost of a job they refused: they admit nothing more until they refill.
    public var bound = 0

    public init() {}

    mutating func add(left: Double, refused: Bool = false) {
        lowest = min(lowest, left)
        partitions += 1
        if left < 1 || refused { bound += 1 }
    }

    /// `0.4 (lowest of 2, 1 throttle-bound)`.
    public var text: String {
        String(format: "%.1f (lowest of %d", lowest, partitions) + (bound > 0 ? ", \(bound) throttle-bound)" : ")")
    }
}

public struct Ticker: Sendable {
    public let connection: PostgresConnection
    public let settings: TickSettings
    public let logger: Logger
    /// Where the statements go: `connection`, or (tests) a wrapper of it.
    let session: any SQLExecutor

    public init(connection: PostgresConnection, settings: TickSettings = TickSettings(), logger: Logger) {
        self.init(connection: connection, session: connection, settings: settings, logger: logger)
    }

    /// Statements go through `session`, which must run them on `connection`.
    init(connection: PostgresConnection, session: any SQLExecutor, settings: TickSettings = TickSettings(), logger: Logger) {
        self.connection = connection
        self.session = session
        self.settings = settings
        self.logger = logger
    }

    /// Policies that are not paused and have work (a lane the fetch can
    /// reach, scheduled jobs now due, expired leases, or observations to
    /// fold), or something due later by the clock (the next scheduled job,
    /// the next lease to run out, the next blocked lane's block ending), of
    /// `only` when given. ``PolicyWork/hasWork`` and
    /// ``PolicyWork/expiredLeases`` tell a tick is due now.
    public func policiesWithWork(only: [String]? = nil) async throws -> [PolicyWork] {
        try await session.rows(
            """
            SELECT name, failing, expired, work,
                   extract(epoch FROM least(next_scheduled, next_expiry, nullif(next_unblock, 'infinity')) - now())::float8 FROM (
              -- Each probe is the first row in an index's order, so it is one index
              -- descent whatever the statistics say: an EXISTS may be planned as a
              -- scan of the table that reads every row of the other policies.
              SELECT p.name,
                     EXISTS (SELECT 1 FROM dispatch_policy.runner_failures f WHERE f.policy = p.name) AS failing,
                     (SELECT a.id FROM dispatch_policy.admitted_jobs a WHERE a.policy = p.name AND a.lease_expires_at < now()
                      ORDER BY a.policy, a.lease_expires_at LIMIT 1) IS NOT NULL AS expired,
                     -- A ready lane, or one whose block has run out: jobs the
                     -- fetch can reach (blocked lanes are not work).
                     (SELECT 1 FROM dispatch_policy.lanes l WHERE l.policy = p.name AND l.blocked_until IS NULL
                      ORDER BY l.policy, l.lane LIMIT 1) IS NOT NULL
                     OR (SELECT 1 FROM dispatch_policy.lanes l WHERE l.policy = p.name AND l.blocked_until <= now()
                         ORDER BY l.policy, l.blocked_until LIMIT 1) IS NOT NULL
                     OR (SELECT s.id FROM dispatch_policy.staged_jobs s WHERE s.policy = p.name
                         AND s.not_before IS NOT NULL AND s.not_before <= now() ORDER BY s.policy, s.not_before LIMIT 1) IS NOT NULL
                     OR (SELECT o.id FROM dispatch_policy.observations o WHERE o.policy = p.name
                         ORDER BY o.policy, o.gate, o.id LIMIT 1) IS NOT NULL AS work,
                     (SELECT s.not_before FROM dispatch_policy.staged_jobs s WHERE s.policy = p.name
                      AND s.not_before > now() ORDER BY s.policy, s.not_before LIMIT 1) AS next_scheduled,
                     (SELECT a.lease_expires_at FROM dispatch_policy.admitted_jobs a WHERE a.policy = p.name
                      AND a.lease_expires_at >= now() ORDER BY a.policy, a.lease_expires_at LIMIT 1) AS next_expiry,
                     (SELECT l.blocked_until FROM dispatch_policy.lanes l WHERE l.policy = p.name
                      AND l.blocked_until > now() ORDER BY l.policy, l.blocked_until LIMIT 1) AS next_unblock
              FROM dispatch_policy.policies p
              WHERE NOT p.paused AND (\(only)::text[] IS NULL OR p.name = ANY (\(only)::text[]))
            ) w
            WHERE work OR expired OR next_scheduled IS NOT NULL OR next_expiry IS NOT NULL
               OR nullif(next_unblock, 'infinity') IS NOT NULL
            ORDER BY name
            """,
            logger: logger
        ).map { row in
            let (name, failing, expired, work, due) = try row.decode((String, Bool, Bool, Bool, Double?).self)
            let dueIn = due.map(Duration.clamped(seconds:))
            return PolicyWork(name: name, failing: failing, expiredLeases: expired, hasWork: work, nextDueIn: dueIn)
        }
    }

    /// Whether a policy of this name is declared.
    public func exists(policy: String) async throws -> Bool {
        try await session.rows(
            "SELECT EXISTS (SELECT 1 FROM dispatch_policy.policies WHERE name = \(policy))", logger: logger
        ).first?.decode(Bool.self) ?? false
    }

    /// Reaps the expired leases of `policy` in a transaction of its own,
    /// bounded by the tick timeout (releasing slots may wait for a worker's
    /// transaction that holds a counter).
    public func reapLeases(policy: String) async throws -> Int {
        try await inTransaction(logger: logger) {
            try await scalar("SELECT dispatch_policy.reap_leases(\(policy))", as: Int.self, logger: logger)
        }
    }

    /// Runs `body` in a transaction whose statement_timeout is the tick timeout.
    private func inTransaction<T>(logger: Logger, _ body: () async throws -> T) async throws -> T {
        _ = try await session.rows("BEGIN", logger: logger)
        do {
            _ = try await session.rows(
                "SELECT set_config('statement_timeout', coalesce(\(timeoutMilliseconds)::text, current_setting('statement_timeout')), true)",
                logger: logger)
            let result = try await body()
            _ = try await session.rows("COMMIT", logger: logger)
            return result
        } catch {
            _ = try? await session.rows("ROLLBACK", logger: logger)
            throw error
        }
    }

    /// The tick timeout in whole milliseconds, at least 1 and at most a day
    /// (no overflow whatever the setting); nil: the session's.
    private var timeoutMilliseconds: String? {
        settings.timeout.map { String(max(1, $0.settingMilliseconds)) }
    }

    /// One tick of `policy`. `reap`: first reap its expired leases (pass
    /// false when the caller knows there are none: it saves a transaction).
    public func tick(policy: String, reap: Bool = true) async throws -> TickResult {
        let started = ContinuousClock.now
        var log = logger
        log[metadataKey: "policy.name"] = "\(policy)"
        // Expired leases are reaped in a transaction of their own, first:
        // reaping locks the counters the expired jobs held, and holding those
        // while read_counters locks the batch's would take counters in two
        // statements, out of order against a concurrent complete() — a
        // deadlock. (Reaping needs no tick lock: it skips rows in use.)
        let reaped = reap ? try await reapLeases(policy: policy) : 0
        // The tick's calls run in autocommit: tick_begin holds the policy's
        // lock at session level until tick_finish gives it back. After any
        // failure tick_abort gives it back; a session that cannot must end
        // (it would keep the policy from every other runner).
        var result = try await abortingOnFailure(policy: policy, logger: log) {
            try await tickCalls(policy: policy, only: nil, logger: log)
        }
        result.reaped = reaped
        result.duration = ContinuousClock.now - started
        if result.admitted > 0 || result.reaped > 0 {
            log.info(
                "tick",
                metadata: [
                    "tick.admitted": "\(result.admitted)", "tick.fetched": "\(result.fetched)", "tick.reaped": "\(result.reaped)",
                    "tick.skipped": "\(result.skipped)",
                ])
        }
        return result
    }

    /// Admits up to `maxJobs` pending jobs of one gate partition now, outside
    /// the rotation: a tick whose fetch is restricted to the partition (see
    /// `tick_begin`'s `only_gate`, `only_partition`). Everything else is a
    /// tick's: the policy's lock, one transaction per call, every gate
    /// checked, tokens and slots taken; a job a gate refuses stays staged
    /// (``TickResult/refusedByGate`` says which). The rotation and the
    /// lanes are left as they were. Jobs scheduled for later are not
    /// admitted. While another runner ticks the policy this waits for it,
    /// up to `wait`, then returns outcome ``TickResult/Outcome/busy``.
    /// Errors (nothing changed): unknown policy or gate 42704, a gate that is
    /// not partitioned or `maxJobs` outside `limits()` batch_size 22023.
    public func admitNow(
        policy: String, gate: String, partition: String, maxJobs: Int, wait: Duration = .seconds(10)
    ) async throws -> TickResult {
        let started = ContinuousClock.now
        var log = logger
        log[metadataKey: "policy.name"] = "\(policy)"
        let target = PartitionTarget(gate: gate, partition: partition, maxJobs: maxJobs)
        while true {
            var result = try await abortingOnFailure(policy: policy, logger: log) {
                try await tickCalls(policy: policy, only: target, logger: log)
            }
            if result.outcome == .busy, ContinuousClock.now - started < wait {
                try await Task.sleep(for: .milliseconds(50))
                continue
            }
            if result.outcome == .ran && result.fetched == 0 {
                // Say why: tick_begin fetches nothing while a global cap is full.
                result.globalCapFull = try await scalar(
                    """
                    SELECT EXISTS (
                      SELECT 1 FROM dispatch_policy.policies p
                      CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
                      JOIN dispatch_policy.inflight_counters c
                        ON c.policy = p.name AND c.gate = coalesce(g ->> 'name', g ->> 'type') AND c.partition = 'default'
                      WHERE p.name = \(policy) AND g ->> 'type' = 'global_cap' AND c.in_flight >= dispatch_policy._json_number(g -> 'max'))
                    """, as: Bool.self, logger: log)
            }
            result.duration = ContinuousClock.now - started
            log.info(
                "admitted now from a partition",
                metadata: [
                    "gate.name": "\(gate)", "partition.key": "\(partition)", "tick.admitted": "\(result.admitted)",
                    "tick.fetched": "\(result.fetched)", "tick.outcome": "\(result.outcome.rawValue)",
                ])
            return result
        }
    }

    /// Runs a tick's calls; after any failure gives the policy's lock back
    /// (`tick_abort`), and when even that fails throws ``SessionUnusable``:
    /// the session must end, or the policy stays locked.
    private func abortingOnFailure(policy: String, logger: Logger, _ calls: () async throws -> TickResult) async throws -> TickResult {
        do {
            return try await calls()
        } catch {
            do {
                _ = try await session.rows("SELECT dispatch_policy.tick_abort(\(policy))", logger: logger)
            } catch let abort {
                throw SessionUnusable(
                    reason:
                        "could not end the failed tick of policy \(policy) (\(DispatchPolicyError.from(abort))) after: \(DispatchPolicyError.from(error))"
                )
            }
            throw error
        }
    }

    /// The fetch of ``admitNow(policy:gate:partition:maxJobs:wait:)``.
    struct PartitionTarget {
        var gate: String
        var partition: String
        var maxJobs: Int
    }

    /// The tick's three calls (see `Migrations/0014_tick.sql`), three round
    /// trips: `tick_begin` locks, reads observations, promotes and fetches
    /// (and ends the tick when there is nothing to do); `tick_state` reads
    /// the gate state of the batch's partitions; `tick_finish` admits, saves
    /// the adaptive state and unlocks. The decision and the AIMD fold are
    /// made here, between them.
    /// With `only`, the fetch is that partition's (admit now): the rotation
    /// is held and no lane blocked, since the batch says nothing of the
    /// lanes' other jobs.
    private func tickCalls(policy: String, only: PartitionTarget?, logger: Logger) async throws -> TickResult {
        var result = TickResult(policy: policy, outcome: .ran)
        var header: (config: String, now: Date)?
        var observations: [GateKey: [Observation]] = [:]
        var observationIDs: [Int64] = []
        var rows: [BatchRow] = []
        var done = false
        for row in try await session.rows(
            """
            SELECT kind, id, priority, round_robin_key, context, lane, gate, partition, lag_ms, success, observed_at, config, now
            FROM dispatch_policy.tick_begin(\(policy), \(only?.maxJobs ?? settings.batchSize)::integer, \(settings.roundRobinQuantum)::integer,
                                            \(settings.maxObservationsPerTick)::integer, \(timeoutMilliseconds)::integer,
                                            \(only?.gate)::text, \(only?.partition)::text)
            """,
            logger: logger
        ) {
            let (kind, id, priority, key, context, lane, gate, partition, lag, success, at, config, now) = try row.decode(
                (String, Int64?, Int?, String?, String?, Int?, String?, String?, Double?, Bool?, Date?, String?, Date?).self)
            switch kind {
            case "job":
                guard let id, let priority, let context, let lane else { throw Self.malformed(kind) }
                rows.append(BatchRow(id: id, priority: priority, roundRobinKey: key, context: try Self.decodeStrings(context), lane: lane))
            case "observation":
                guard let id, let gate, let partition, let lag, let success, let at else { throw Self.malformed(kind) }
                observations[GateKey(gate: gate, partition: partition), default: []].append(Observation(lag: lag, success: success, at: at))
                observationIDs.append(id)
            case "done":
                done = true
            case "tick":
                guard let config, let now else { throw Self.malformed(kind) }
                header = (config, now)
            case "busy":
                result.outcome = .busy
                return result
            case "paused":
                result.outcome = .paused
                return result
            default:
                result.outcome = .unknown
                return result
            }
        }
        guard let (configJSON, now) = header else { throw Self.malformed("tick") }
        // Nothing fetched or observed: tick_begin ended the tick.
        if done { return result }
        let config = try PolicyConfig(json: configJSON)
        result.observationsFolded = observations.values.reduce(0) { $0 + $1.count }
        result.fetched = rows.count

        let admission = Admission(config: config)
        let prepared = admission.prepare(rows)
        // What the batch needs does not depend on its order (a throttle's
        // rate comes from its partition's first job in the batch as fetched).
        let needed = admission.requiredState(for: prepared)
        let regroups = !admission.regrouping(prepared).isEmpty
        // Adaptive state of the batch's partitions and of those with new
        // observations.
        var adaptiveKeys = needed.adaptive
        var adaptiveSettings: [String: AdaptiveSettings] = [:]
        for gate in config.gates where gate.type == .adaptiveConcurrency {
            adaptiveSettings[gate.effectiveName] = gate.adaptiveSettings
        }
        for key in observations.keys where adaptiveKeys[key] == nil {
            adaptiveKeys[key] = adaptiveSettings[key.gate]?.initialMax ?? 1
        }
        let adaptiveOrder = adaptiveKeys.sorted { $0.key < $1.key }

        var state = GateState()
        var adaptive: [GateKey: AdaptiveController] = [:]
        var interleaveCursors: [String: InterleaveCursor] = [:]
        if !needed.buckets.isEmpty || !needed.counters.isEmpty || !adaptiveOrder.isEmpty || regroups {
            for row in try await session.rows(
                """
                SELECT kind, gate, partition, tokens, in_flight, current_max, ewma_lag_ms, growth_credit, since_decrease
                FROM dispatch_policy.tick_state(
                  \(policy), \(now),
                  \(needed.buckets.map(\.key.gate))::text[], \(needed.buckets.map(\.key.partition))::text[],
                  \(needed.buckets.map(\.rate))::float8[], \(needed.buckets.map(\.per))::float8[], \(needed.buckets.map(\.burst))::float8[],
                  \(needed.counters.map(\.gate))::text[], \(needed.counters.map(\.partition))::text[],
                  \(adaptiveOrder.map(\.key.gate))::text[], \(adaptiveOrder.map(\.key.partition))::text[],
                  \(adaptiveOrder.map(\.value))::integer[])
                """,
                logger: logger
            ) {
                let (kind, gate, partition, tokens, inFlight, cap, ewma, credit, since) = try row.decode(
                    (String, String, String, Double?, Int?, Int?, Double?, Double?, Int64?).self)
                let key = GateKey(gate: gate, partition: partition)
                switch kind {
                case "bucket":
                    guard let tokens else { throw Self.malformed(kind) }
                    state.tokens[key] = tokens
                case "counter":
                    guard let inFlight else { throw Self.malformed(kind) }
                    state.inFlight[key] = inFlight
                case "paused":
                    state.paused.insert(key)
                case "interleave":
                    // A served out of bounds (NULL) starts a new round.
                    if let inFlight { interleaveCursors[gate] = InterleaveCursor(key: partition, served: inFlight) }
                case "adaptive":
                    guard let cap, let credit, let since else { throw Self.malformed(kind) }
                    state.adaptiveCap[key] = cap
                    adaptive[key] = AdaptiveController(
                        currentMax: cap, ewmaLagMs: ewma, growthCredit: credit, sinceDecrease: Int(clamping: since))
                default:
                    throw Self.malformed(kind)
                }
            }
        }

        let (ordered, rounds) = admission.interleave(prepared, cursors: interleaveCursors)
        let decision = admission.evaluate(ordered, state: state, buckets: needed.buckets)
        // Where fair_interleave's rounds stopped, kept when it moved (not by
        // an admit-now, whose batch is one partition's).
        let movedCursors = only == nil ? rounds.moved(admitted: decision.admitted.map(\.id), previous: interleaveCursors) : nil
        result.refusedByGate = decision.refusedByGate
        result.shadow = config.isShadow
        result.wouldRefuseByGate = decision.wouldRefuseByGate
        result.cursor = only != nil ? nil : decision.cursor
        result.nextTokenIn = decision.tokenWaits.values.min().map(Duration.clamped(seconds:))
        for (key, tokens) in state.tokens {
            result.tokens[key.gate, default: TokenSummary()].add(
                left: tokens - (decision.takes[key] ?? 0), refused: decision.tokenWaits[key] != nil)
        }

        // Fold after deciding: growth needs to know whether the cap turned
        // jobs away in this tick, and this tick's admissions were decided
        // under the cap read above; the new caps apply from the next tick.
        var updates: [(key: GateKey, controller: AdaptiveController, at: Date)] = []
        for (key, taken) in observations.sorted(by: { $0.key < $1.key }) {
            guard let settings = adaptiveSettings[key.gate], var controller = adaptive[key] else { continue }
            for observation in taken {
                controller.observe(
                    lagMs: observation.lag, success: observation.success,
                    limited: decision.adaptiveLimited.contains(key), settings: settings)
            }
            updates.append((key, controller, taken.map(\.at).max() ?? now))
        }

        let cursor: String? =
            switch only != nil ? .hold : decision.cursor {
            case nil: try movedCursors.map { try Self.json(CursorJSON(moves: false, interleave: $0)) }
            case .hold: try Self.json(CursorJSON(hold: true, starved: only != nil ? nil : decision.starved, interleave: movedCursors))
            case .after(let key): try Self.json(CursorJSON(lastKey: key, starved: decision.starved, interleave: movedCursors))
            }
        // Adaptive caps that grew: lanes waiting on them are ready again.
        let grown = updates.filter { $0.controller.currentMax > (state.adaptiveCap[$0.key] ?? Int.max) }.map(\.key)
        let blocks = only != nil ? [] : decision.laneBlocks
        result.lanesBlocked = blocks.count
        // Always called: it ends the tick (gives the lock back).
        do {
            let gateNames = admission.gates.map(\.effectiveName)
            var partitions: [String] = []
            partitions.reserveCapacity(decision.admitted.count * gateNames.count)
            for job in decision.admitted {
                for name in gateNames {
                    guard let partition = job.partitions[name] else { throw Self.malformed("admission (no partition of gate \(name))") }
                    partitions.append(partition)
                }
            }
            let takes = decision.takes.sorted { $0.key < $1.key }
            let refusals = decision.refusedByPartition.sorted { $0.key < $1.key }
            let wouldRefuse = try Self.json(
                decision.wouldRefuse.sorted { $0.key < $1.key }.map {
                    WouldRefuseJSON(
                        gate: $0.key.gate, partition: $0.key.partition, wouldRefuse: $0.value.count, lagSeconds: $0.value.lagSeconds,
                        overCap: $0.value.overCap)
                })
            // The refusals go into the history, and a shadow policy's
            // would-refusals into shadow_refusals, in the same statement (the
            // functions in FROM run first; all commit or nothing does).
            result.admitted = try await scalar(
                """
                SELECT dispatch_policy.tick_finish(
                  \(policy), \(now),
                  \(decision.admitted.map(\.id))::bigint[], \(gateNames)::text[], \(partitions)::text[],
                  \(takes.map(\.key.gate))::text[], \(takes.map(\.key.partition))::text[], \(takes.map(\.value))::float8[],
                  \(settings.leaseSeconds)::integer, \(cursor)::jsonb,
                  \(updates.map(\.key.gate))::text[], \(updates.map(\.key.partition))::text[],
                  \(updates.map(\.controller.currentMax))::integer[], \(updates.map { $0.controller.ewmaLagMs ?? 0 })::float8[],
                  \(updates.map(\.controller.growthCredit))::float8[], \(updates.map { Int64($0.controller.sinceDecrease) })::bigint[],
                  \(updates.map { Int64($0.controller.observations) })::bigint[], \(updates.map { Int64($0.controller.failures) })::bigint[],
                  \(updates.map(\.at))::timestamptz[],
                  \(blocks.map { $0.lane ?? "" })::text[], \(blocks.map { $0.lane == nil })::boolean[],
                  \(blocks.map(\.seconds))::float8[], \(blocks.map { $0.releasedBy?.gate ?? "" })::text[],
                  \(blocks.map { $0.releasedBy?.partition ?? "" })::text[], \(blocks.map { $0.inFlight ?? -1 })::integer[],
                  \(grown.map(\.gate))::text[], \(grown.map(\.partition))::text[], \(observationIDs)::bigint[])
                FROM dispatch_policy._record_refusals(
                  \(policy), \(now), \(refusals.map(\.key.gate))::text[], \(refusals.map(\.key.partition))::text[],
                  \(refusals.map(\.value))::integer[]),
                dispatch_policy._record_shadow(\(policy), \(now), \(wouldRefuse)::jsonb)
                """,
                as: Int.self, logger: logger)
            result.skipped = max(0, decision.admitted.count - result.admitted)
        }
        return result
    }

    /// The session still holds a tick's lock it could not give back: it must
    /// end (``ManagedConnection`` closes it), or the policy stays locked.
    struct SessionUnusable: Error, CustomStringConvertible {
        var reason: String
        var description: String { reason }
    }

    struct Observation {
        var lag: Double
        var success: Bool
        var at: Date
    }

    static func malformed(_ kind: String) -> DispatchPolicyError {
        DispatchPolicyError(code: .server, message: "a malformed \(kind) row in a tick")
    }

    private func scalar<T: PostgresDecodable>(_ query: PostgresQuery, as type: T.Type, logger: Logger) async throws -> T {
        guard let row = try await session.rows(query, logger: logger).first else {
            throw DispatchPolicyError(code: .server, message: "\(query.sql.prefix(60))... returned no row")
        }
        return try row.decode(T.self)
    }

    // MARK: - JSON plumbing

    struct CursorJSON: Encodable {
        var hold = false
        var lastKey: String? = nil
        /// false: no round-robin move at all (the policy fetches without
        /// lanes), only `interleave`.
        var moves = true
        /// With weighted lanes: where in its round the first starved lane
        /// stopped (`_admit` keeps it as the cursor's `served`).
        var starved: StarvedRow? = nil
        /// Where fair_interleave's rounds stopped (tick_finish keeps it in
        /// `round_robin_cursors.interleave`); nil: unchanged.
        var interleave: [String: InterleaveCursor]? = nil

        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            if hold {
                try c.encode(true, forKey: .hold)
            } else if moves {
                // An explicit null: the lane of jobs without a key.
                try c.encode(lastKey, forKey: .lastKey)
            }
            if let interleave { try c.encode(interleave, forKey: .interleave) }
            if let starved {
                var s = c.nestedContainer(keyedBy: StarvedKeys.self, forKey: .starved)
                try s.encode(starved.lane, forKey: .lane)
                try s.encode(starved.index, forKey: .index)
                try s.encode(starved.weight, forKey: .weight)
            }
        }

        enum CodingKeys: String, CodingKey {
            case hold
            case lastKey = "last_key"
            case starved, interleave
        }
        enum StarvedKeys: String, CodingKey { case lane, index, weight }
    }

    /// One entry of `_record_shadow`'s entries.
    struct WouldRefuseJSON: Encodable {
        var gate: String
        var partition: String
        var wouldRefuse: Int
        var lagSeconds: Double?
        var overCap: Int?

        enum CodingKeys: String, CodingKey {
            case gate, partition
            case wouldRefuse = "would_refuse"
            case lagSeconds = "lag_seconds"
            case overCap = "over_cap"
        }
    }

    static func json(_ value: some Encodable) throws -> String {
        String(decoding: try JSONEncoder().encode(value), as: UTF8.self)
    }

    static func decodeStrings(_ text: String) throws -> [String: String] {
        guard let strings = ContextStrings.parse(text) else {
            throw DispatchPolicyError(
                code: .server, message: "tick_begin returned a context that is not a JSON object: \(text.prefix(200))")
        }
        return strings
    }

}
