import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

/// The admin's reads and actions, one SQL statement each. Every read is
/// O(rows shown): the counters and per-minute samples of migration 0016, the
/// gate state tables, and index range scans bounded by a LIMIT.
public struct AdminStore: Sendable {
    public let executor: any SQLExecutor
    public let logger: Logger

    public init(executor: any SQLExecutor, logger: Logger) {
        self.executor = executor
        self.logger = logger
    }

    // MARK: Overview

    public struct PolicyRow: Sendable, Equatable {
        public var name: String
        public var pending: Int64
        public var scheduled: Int64
        public var inFlight: Int64
        public var admitted24h: Int64
        public var completed24h: Int64
        public var failed24h: Int64
        public var dead: Int64
        public var oldestPendingSeconds: Double?
        public var paused: Bool
        public var tickFailures: Int?
        public var lastError: String?
        public var lagP50ms: Double?
        public var lagP95ms: Double?
        public var throughputPerMinute: Double
        /// Jobs finished as expired (deadline passed before admission) in 24 h.
        public var expired24h: Int64 = 0
        /// Jobs finished as dropped (backlog over its cap) in 24 h.
        public var dropped24h: Int64 = 0
        /// Deferrals by workers (a handler threw `Defer`) in 24 h.
        public var deferred24h: Int64 = 0
        /// `enforce`, or `shadow`: the policy admits every job it fetches and
        /// records what its gates would have refused.
        public var mode = "enforce"

        /// Whether the policy is in shadow mode.
        public var isShadow: Bool { mode == "shadow" }
    }

    /// Every policy's overview, or only the one named `only`.
    public func policies(only: String? = nil) async throws -> [PolicyRow] {
        try await executor.rows(
            """
            SELECT policy, pending, scheduled, in_flight, admitted_24h, completed_24h, failed_24h, dead,
                   extract(epoch FROM oldest_pending_age)::float8 AS oldest_pending_seconds, paused, tick_failures, last_error,
                   lag_p50_ms::float8 AS lag_p50_ms, lag_p95_ms::float8 AS lag_p95_ms,
                   coalesce(throughput_per_min, 0)::float8 AS throughput_per_min, expired_24h, dropped_24h, deferred_24h, mode
            FROM dispatch_policy.policy_overview
            WHERE \(only)::text IS NULL OR policy = \(only)::text
            ORDER BY policy
            """, logger: logger
        ).map { row in
            // By name: the view gains columns, and a tuple decode stops at 15.
            let r = row.makeRandomAccess()
            return PolicyRow(
                name: try r["policy"].decode(String.self), pending: try r["pending"].decode(Int64.self),
                scheduled: try r["scheduled"].decode(Int64.self), inFlight: try r["in_flight"].decode(Int64.self),
                admitted24h: try r["admitted_24h"].decode(Int64.self), completed24h: try r["completed_24h"].decode(Int64.self),
                failed24h: try r["failed_24h"].decode(Int64.self), dead: try r["dead"].decode(Int64.self),
                oldestPendingSeconds: try r["oldest_pending_seconds"].decode(Double?.self), paused: try r["paused"].decode(Bool.self),
                tickFailures: try r["tick_failures"].decode(Int?.self), lastError: try r["last_error"].decode(String?.self),
                lagP50ms: try r["lag_p50_ms"].decode(Double?.self), lagP95ms: try r["lag_p95_ms"].decode(Double?.self),
                throughputPerMinute: try r["throughput_per_min"].decode(Double.self), expired24h: try r["expired_24h"].decode(Int64.self),
                dropped24h: try r["dropped_24h"].decode(Int64.self), deferred24h: try r["deferred_24h"].decode(Int64.self),
                mode: try r["mode"].decode(String?.self) ?? "enforce")
        }
    }

    /// What limits each policy now, from the gate state (cheap: keyed rows).
    public struct Limits: Sendable, Equatable {
        /// Lanes waiting for a throttle's next token, per gate.
        public var throttleBoundLanes: [String: Int] = [:]
        /// Lanes waiting for a slot of a full concurrency or adaptive partition, per gate.
        public var capBoundLanes: [String: Int] = [:]
        /// The global cap's in-flight count and max, when the policy has one.
        public var globalInFlight: Int64?
        public var globalCap: Double?
        /// The adaptive partition with the highest EWMA lag and the gate's target.
        public var adaptiveWorst: (gate: String, partition: String, ewmaMs: Double, targetMs: Double, cap: Int)?
        /// Per-minute pending growth: minutes in a row (newest first) that staged more than they admitted.
        public var growingMinutes = 0
        /// Completions and failures in the last hour.
        public var completedHour: Int64 = 0
        public var failedHour: Int64 = 0

        /// Adds the last hour's minutes: completions, failures, and how many
        /// whole minutes in a row, newest first, staged more than they
        /// admitted (the current minute is not over: it neither counts nor
        /// breaks the run).
        public mutating func add(hour samples: [MinuteSample], now: Date = Date()) {
            var growing = true
            for sample in samples.sorted(by: { $0.minute > $1.minute }) {
                completedHour += sample.completed
                failedHour += sample.failed
                guard now.timeIntervalSince(sample.minute) >= 60, growing else { continue }
                if sample.staged > sample.admitted { growingMinutes += 1 } else { growing = false }
            }
        }

        public static func == (a: Limits, b: Limits) -> Bool {
            a.throttleBoundLanes == b.throttleBoundLanes && a.capBoundLanes == b.capBoundLanes && a.globalInFlight == b.globalInFlight
                && a.globalCap == b.globalCap && a.adaptiveWorst?.gate == b.adaptiveWorst?.gate
                && a.adaptiveWorst?.partition == b.adaptiveWorst?.partition && a.adaptiveWorst?.ewmaMs == b.adaptiveWorst?.ewmaMs
                && a.growingMinutes == b.growingMinutes && a.completedHour == b.completedHour && a.failedHour == b.failedHour
        }
    }

    /// What limits each policy (or only the one named `only`) now.
    /// `minutes`: the policies' last hour, as ``recentMinutes(only:since:)``
    /// gives it (read once, shared with the charts).
    public func limits(only: String? = nil, minutes: [String: [MinuteSample]]) async throws -> [String: Limits] {
        var result: [String: Limits] = [:]
        // Blocked lanes, by the gate that blocks them ('' = by a throttle's clock).
        for row in try await executor.rows(
            """
            SELECT l.policy, coalesce(l.blocked_gate, ''), (l.blocked_until = 'infinity') AS by_slot, count(*)
            FROM dispatch_policy.lanes l
            WHERE l.blocked_until > now() AND (\(only)::text IS NULL OR l.policy = \(only)::text)
            GROUP BY 1, 2, 3
            """, logger: logger)
        {
            let (policy, gate, bySlot, count) = try row.decode((String, String, Bool, Int64).self)
            if bySlot && !gate.isEmpty {
                result[policy, default: Limits()].capBoundLanes[gate, default: 0] += Int(count)
            } else {
                result[policy, default: Limits()].throttleBoundLanes[gate.isEmpty ? "throttle" : gate, default: 0] += Int(count)
            }
        }
        // Global caps.
        for row in try await executor.rows(
            """
            SELECT p.name, coalesce(g ->> 'name', g ->> 'type'), dispatch_policy._json_number(g -> 'max')::float8,
                   coalesce((SELECT c.in_flight FROM dispatch_policy.inflight_counters c
                             WHERE c.policy = p.name AND c.gate = coalesce(g ->> 'name', g ->> 'type')
                             ORDER BY c.in_flight DESC LIMIT 1), 0)::bigint
            FROM dispatch_policy.policies p
            CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
            WHERE g ->> 'type' = 'global_cap' AND (\(only)::text IS NULL OR p.name = \(only)::text)
            """, logger: logger)
        {
            let (policy, _, cap, inFlight) = try row.decode((String, String, Double?, Int64).self)
            result[policy, default: Limits()].globalCap = cap
            result[policy, default: Limits()].globalInFlight = inFlight
        }
        // The adaptive partition furthest over its target, per policy.
        for row in try await executor.rows(
            """
            SELECT DISTINCT ON (a.policy) a.policy, a.gate, a.partition, a.ewma_lag_ms,
                   coalesce(dispatch_policy._json_number(g -> 'target_lag_ms'), 0)::float8, a.current_max
            FROM dispatch_policy.adaptive_stats a
            JOIN dispatch_policy.policies p ON p.name = a.policy
            CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
            WHERE g ->> 'type' = 'adaptive_concurrency' AND coalesce(g ->> 'name', g ->> 'type') = a.gate
              -- No EWMA before the partition's first observation.
              AND a.ewma_lag_ms IS NOT NULL
              AND (\(only)::text IS NULL OR a.policy = \(only)::text)
            ORDER BY a.policy, a.ewma_lag_ms / greatest(coalesce(dispatch_policy._json_number(g -> 'target_lag_ms'), 1), 1) DESC
            """, logger: logger)
        {
            let (policy, gate, partition, ewma, target, cap) = try row.decode((String, String, String, Double, Double, Int).self)
            result[policy, default: Limits()].adaptiveWorst = (gate, partition, ewma, target, cap)
        }
        // The last hour, per minute, newest first.
        for (policy, samples) in minutes where only == nil || policy == only {
            result[policy, default: Limits()].add(hour: samples)
        }
        return result
    }

    /// Pending jobs at the end of each minute from `since`, per policy (or
    /// only `only`), reconstructed from the history (`pending_minutes`), one statement.
    public func pendingMinutes(only: String? = nil, since: Date) async throws -> [String: [(
        minute: Date, pending: Int64, scheduled: Int64
    )]] {
        var result: [String: [(minute: Date, pending: Int64, scheduled: Int64)]] = [:]
        for row in try await executor.rows(
            """
            SELECT p.name, m.minute, m.pending, m.scheduled
            FROM dispatch_policy.policies p
            CROSS JOIN LATERAL dispatch_policy.pending_minutes(p.name, \(since)) m
            WHERE \(only)::text IS NULL OR p.name = \(only)::text
            ORDER BY p.name, m.minute
            """, logger: logger)
        {
            let (policy, minute, pending, scheduled) = try row.decode((String, Date, Int64, Int64).self)
            result[policy, default: []].append((minute, pending, scheduled))
        }
        return result
    }

    /// The last minutes of every policy (or only `only`), one statement: one
    /// row per minute from `since`, gaps as zeros, keyed by policy.
    public func recentMinutes(only: String? = nil, since: Date) async throws -> [String: [MinuteSample]] {
        var result: [String: [MinuteSample]] = [:]
        for row in try await executor.rows(
            """
            SELECT p.name, m.minute, m.staged, m.admitted, m.refused, m.completed, m.failed, m.avg_lag_ms::float8, m.p95_lag_ms::float8
            FROM dispatch_policy.policies p
            CROSS JOIN LATERAL dispatch_policy.policy_minutes(p.name, \(since)) m
            WHERE \(only)::text IS NULL OR p.name = \(only)::text
            ORDER BY p.name, m.minute
            """, logger: logger)
        {
            let (policy, minute, staged, admitted, refused, completed, failed, avg, p95) =
                try row.decode((String, Date, Int64, Int64, Int64, Int64, Int64, Double?, Double?).self)
            result[policy, default: []].append(
                MinuteSample(
                    minute: minute, staged: staged, admitted: admitted, refused: refused, completed: completed, failed: failed,
                    avgLagMs: avg, p95LagMs: p95))
        }
        return result
    }

    // MARK: Policy page

    public struct MinuteSample: Sendable, Equatable {
        public var minute: Date
        /// Jobs staged that minute (0 where not known: partition rows).
        public var staged: Int64 = 0
        public var admitted: Int64
        public var refused: Int64
        public var completed: Int64
        public var failed: Int64
        public var avgLagMs: Double?
        public var p95LagMs: Double?
    }

    /// Per-minute rows of many gate partitions in one statement (the
    /// sparklines of a page), keyed by gate and partition. Attempts that
    /// finished, completed or failed, are not told apart per partition:
    /// `completed` holds them all.
    public func minutes(policy: String, partitions: [(gate: String, partition: String)], since: Date) async throws
        -> [String: [String: [MinuteSample]]]
    {
        guard !partitions.isEmpty else { return [:] }
        var result: [String: [String: [MinuteSample]]] = [:]
        for row in try await executor.rows(
            """
            SELECT k.gate, k.partition, m.minute, m.admitted, m.refused, m.finished, 0::bigint, m.avg_lag_ms::float8, m.p95_lag_ms::float8
            FROM unnest(\(partitions.map(\.gate))::text[], \(partitions.map(\.partition))::text[]) WITH ORDINALITY AS k(gate, partition, n)
            CROSS JOIN LATERAL dispatch_policy.partition_minutes(\(policy), k.gate, k.partition, \(since)) m
            ORDER BY k.n, m.minute
            """, logger: logger)
        {
            let (gate, partition, minute, admitted, refused, completed, failed, avg, p95) =
                try row.decode((String, String, Date, Int64, Int64, Int64, Int64, Double?, Double?).self)
            result[gate, default: [:]][partition, default: []].append(
                MinuteSample(
                    minute: minute, admitted: admitted, refused: refused, completed: completed, failed: failed, avgLagMs: avg, p95LagMs: p95
                ))
        }
        return result
    }

    public struct PolicyDetail: Sendable, Equatable {
        public var name: String
        public var configJSON: String
        public var paused: Bool
        public var gates: [Gate]
        public struct Gate: Sendable, Equatable {
            public var name: String
            public var type: String
            public var partitionBy: String?
        }
    }

    public func policy(_ name: String) async throws -> PolicyDetail? {
        guard
            let row = try await executor.rows(
                "SELECT name, jsonb_pretty(config), paused FROM dispatch_policy.policies WHERE name = \(name)", logger: logger
            ).first
        else { return nil }
        let (policy, config, paused) = try row.decode((String, String, Bool).self)
        let gates = try await executor.rows(
            """
            SELECT coalesce(g ->> 'name', g ->> 'type'), g ->> 'type', g ->> 'partition_by'
            FROM dispatch_policy.policies p
            CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) WITH ORDINALITY AS x(g, n)
            WHERE p.name = \(name) ORDER BY x.n
            """, logger: logger
        ).map { row in
            let (gate, type, by) = try row.decode((String, String, String?).self)
            return PolicyDetail.Gate(name: gate, type: type, partitionBy: by)
        }
        return PolicyDetail(name: policy, configJSON: config, paused: paused, gates: gates)
    }

    /// A gate partition as its state rows describe it.
    public struct PartitionRow: Sendable, Equatable {
        public var gate: String
        public var gateType: String
        /// A gate with a partition_by (throttle, concurrency, adaptive): its
        /// partitions can be paused, drained and admitted from.
        public var partitioned = true
        public var partition: String
        public var inFlight: Int64
        public var cap: Double?
        public var tokens: Double?
        public var burst: Double?
        public var ewmaLagMs: Double?
        public var lastAdmitted: Date?
        public var paused: Bool
        /// Staged jobs (eligible and scheduled) in the partition, and when one
        /// was last staged into it (`partition_pending`).
        public var pending: Int64 = 0
        public var lastStaged: Date?
        /// Shadow policies: jobs this partition would have refused (admitted
        /// anyway); nil when none was recorded.
        public var wouldRefuse: Int64?
        /// A throttle: its token deficit over the refill rate, in seconds (how
        /// far behind an enforcing throttle would be now).
        public var wouldBeLagSeconds: Double?
    }

    /// The orders the partition list offers, each with keyset pagination.
    public enum PartitionSort: String, Sendable, CaseIterable {
        /// By gate, then partition key.
        case partition
        /// Most jobs in flight first, then by gate and partition key.
        case inFlight = "in_flight"
    }

    /// Where a page of partitions starts: after this row of the previous page.
    public struct PartitionCursor: Sendable, Equatable {
        public var gate: String
        public var partition: String
        public var inFlight: Int64

        public init(gate: String, partition: String, inFlight: Int64) {
            self.gate = gate
            self.partition = partition
            self.inFlight = inFlight
        }

        /// URL-safe text form (base64url of the fields).
        public var token: String {
            let text = "\(inFlight)\u{1F}\(gate)\u{1F}\(partition)"
            return Data(text.utf8).base64EncodedString().replacingOccurrences(of: "+", with: "-")
                .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        }

        public init?(token: String) {
            var base64 = token.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
            while base64.count % 4 != 0 { base64 += "=" }
            // PostgreSQL text holds no NUL: a cursor with one is no cursor (not a query error).
            guard base64.count <= 4096, let data = Data(base64Encoded: base64), let text = String(data: data, encoding: .utf8),
                !text.contains("\u{0}")
            else { return nil }
            let parts = text.split(separator: "\u{1F}", maxSplits: 2, omittingEmptySubsequences: false)
            // in_flight is an integer column: a forged cursor beyond it is no cursor.
            guard parts.count == 3, let inFlight = Int64(parts[0]), (0...Int64(Int32.max)).contains(inFlight) else { return nil }
            self.init(gate: String(parts[1]), partition: String(parts[2]), inFlight: inFlight)
        }
    }

    /// A page of a policy's gate partitions, keyset-paginated on (gate,
    /// partition): `after` is the last row of the previous page. `search`
    /// keeps partitions whose key contains it (case-insensitive).
    /// `onlyBusy` keeps partitions with jobs in flight or a bucket below
    /// its burst. `only` restricts to these partition keys (the watched list).
    public func partitions(
        policy: String, search: String?, sort: PartitionSort = .partition, after: PartitionCursor?, onlyBusy: Bool,
        onlyPending: Bool = false, only: [String]? = nil, limit: Int
    ) async throws -> [PartitionRow] {
        let pattern = search.flatMap { $0.isEmpty ? nil : "%" + Self.escapeLike($0) + "%" }
        // Where the rows without jobs in flight (all rows, sorted by
        // partition) start: after the cursor, or from the first when the
        // cursor is still among the busy rows. ('' sorts before every gate name.)
        let idleAfter: (gate: String, partition: String) =
            if let after, sort == .partition || after.inFlight == 0 { (after.gate, after.partition) } else { ("", "") }
        var binds = PostgresBindings()
        binds.append(policy)  // $1
        binds.append(pattern)  // $2
        binds.append(only)  // $3
        binds.append(onlyBusy)  // $4
        binds.append(idleAfter.gate)  // $5
        binds.append(idleAfter.partition)  // $6
        binds.append(sort == .inFlight)  // $7: busy rows come first, from their own branch
        binds.append(after?.gate)  // $8
        binds.append(after?.partition)  // $9
        binds.append(after.map { Int64($0.inFlight) })  // $10
        binds.append(limit)  // $11
        binds.append(onlyPending)  // $12
        // A row of a gate-state table (alias x) that may be on the page.
        let candidate = """
            (x.gate, x.partition) > ($5::text, $6::text)
            AND ($2::text IS NULL OR x.partition ILIKE $2::text)
            AND ($3::text[] IS NULL OR x.partition = ANY ($3::text[]))
            AND (NOT $7 OR NOT EXISTS (SELECT 1 FROM dispatch_policy.inflight_counters y
                                       WHERE y.policy = $1 AND y.gate = x.gate AND y.partition = x.partition AND y.in_flight > 0))
            AND (NOT $12 OR EXISTS (SELECT 1 FROM dispatch_policy.partition_counters y
                                    WHERE y.policy = $1 AND y.gate = x.gate AND y.partition = x.partition AND y.pending > 0))
            AND (NOT $4 OR EXISTS (SELECT 1 FROM dispatch_policy.inflight_counters y
                                   WHERE y.policy = $1 AND y.gate = x.gate AND y.partition = x.partition AND y.in_flight > 0)
                        OR EXISTS (SELECT 1 FROM dispatch_policy.throttle_buckets y
                                   WHERE y.policy = $1 AND y.gate = x.gate AND y.partition = x.partition AND y.tokens < y.burst))
            """
        let branches = ["throttle_buckets", "inflight_counters", "adaptive_stats", "partition_counters"].map { table in
            "(SELECT x.gate, x.partition FROM dispatch_policy.\(table) x WHERE x.policy = $1 AND \(candidate) ORDER BY x.gate, x.partition LIMIT $11)"
        }
        let sql = """
            WITH gates AS (
              SELECT coalesce(g ->> 'name', g ->> 'type') AS gate, g ->> 'type' AS gate_type, g AS config, p.config AS config_all
              FROM dispatch_policy.policies p
              CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
              WHERE p.name = $1
            ), known AS (
              -- The page's candidates, O(page): from each gate-state table the
              -- first rows of the order after the cursor (its primary key
              -- gives them in order and starts at the cursor), and with sort
              -- in_flight the busy ones (in_flight > 0: at most one per job in
              -- flight) before all the others. The query below orders them again.
              \(branches.joined(separator: "\nUNION\n"))
              UNION
              (SELECT x.gate, x.partition FROM dispatch_policy.inflight_counters x
               WHERE $7 AND x.policy = $1 AND x.in_flight > 0
                 AND (NOT $12 OR EXISTS (SELECT 1 FROM dispatch_policy.partition_counters y
                                         WHERE y.policy = $1 AND y.gate = x.gate AND y.partition = x.partition AND y.pending > 0))
                 AND ($2::text IS NULL OR x.partition ILIKE $2::text)
                 AND ($3::text[] IS NULL OR x.partition = ANY ($3::text[]))
                 AND ($8::text IS NULL OR (-x.in_flight, x.gate, x.partition) > (-$10::bigint, $8::text, $9::text))
               ORDER BY x.in_flight DESC, x.gate, x.partition LIMIT $11)
            )
            SELECT k.gate, gt.gate_type, dispatch_policy._partitioned_gate(gt.config_all, k.gate) IS NOT NULL,
                   k.partition, coalesce(c.in_flight, 0)::bigint,
                   CASE gt.gate_type WHEN 'adaptive_concurrency' THEN a.current_max::float8
                                     ELSE dispatch_policy._json_number(gt.config -> 'max')::float8 END,
                   dispatch_policy._bucket_tokens(b.tokens, b.rate, b.per_seconds, b.burst, b.refilled_at, now())::float8,
                   b.burst::float8, a.ewma_lag_ms::float8,
                   greatest(c.last_admitted_at, b.last_admitted_at),
                   EXISTS (SELECT 1 FROM dispatch_policy.paused_partitions pp
                           WHERE pp.policy = $1 AND pp.gate = k.gate AND pp.partition = k.partition
                             AND (pp.until IS NULL OR pp.until > now())),
                   r.would_refuse,
                   CASE WHEN b.rate > 0 THEN
                     (greatest(-dispatch_policy._bucket_tokens(b.tokens, b.rate, b.per_seconds, b.burst, b.refilled_at, now()), 0)
                      * b.per_seconds / b.rate)::float8 END
            FROM known k
            JOIN gates gt ON gt.gate = k.gate
            LEFT JOIN dispatch_policy.throttle_buckets b ON b.policy = $1 AND b.gate = k.gate AND b.partition = k.partition
            LEFT JOIN dispatch_policy.inflight_counters c ON c.policy = $1 AND c.gate = k.gate AND c.partition = k.partition
            LEFT JOIN dispatch_policy.adaptive_stats a ON a.policy = $1 AND a.gate = k.gate AND a.partition = k.partition
            LEFT JOIN dispatch_policy.shadow_refusals r ON r.policy = $1 AND r.gate = k.gate AND r.partition = k.partition
            WHERE ($8::text IS NULL
                   OR (NOT $7 AND (k.gate, k.partition) > ($8::text, $9::text))
                   OR ($7 AND (-coalesce(c.in_flight, 0), k.gate, k.partition) > (-$10::bigint, $8::text, $9::text)))
              AND (NOT $4 OR coalesce(c.in_flight, 0) > 0 OR b.tokens < b.burst)
            ORDER BY CASE WHEN $7 THEN -coalesce(c.in_flight, 0) ELSE 0 END, k.gate, k.partition
            LIMIT $11
            """
        var rows = try await executor.rows(PostgresQuery(unsafeSQL: sql, binds: binds), logger: logger).map { row in
            let (gate, type, isPartitioned, partition, inFlight, cap, tokens, burst, ewma, last, paused) =
                try row.decode((String, String, Bool, String, Int64, Double?, Double?, Double?, Double?, Date?, Bool).self)
            let columns = Array(row)
            let (wouldRefuse, lag) = try (columns[11].decode(Int64?.self), columns[12].decode(Double?.self))
            return PartitionRow(
                gate: gate, gateType: type, partitioned: isPartitioned, partition: partition, inFlight: inFlight, cap: cap, tokens: tokens,
                burst: burst, ewmaLagMs: ewma, lastAdmitted: last, paused: paused, wouldRefuse: wouldRefuse,
                wouldBeLagSeconds: lag.flatMap { $0 > 0 ? $0 : nil })
        }
        // Pending and last staged of the page's partitions, exact, one statement.
        let partitioned = rows.filter(\.partitioned)
        guard !partitioned.isEmpty else { return rows }
        var counts: [String: (pending: Int64, last: Date?)] = [:]
        for row in try await executor.rows(
            """
            SELECT x.gate, pp.partition, pp.pending, pp.last_staged_at
            FROM (SELECT u.gate, array_agg(u.partition) AS keys
                  FROM unnest(\(partitioned.map(\.gate))::text[], \(partitioned.map(\.partition))::text[]) AS u(gate, partition)
                  -- The gate as the policy is now (redeclared since the page's query: no count).
                  WHERE dispatch_policy._partitioned_gate((SELECT p.config FROM dispatch_policy.policies p WHERE p.name = \(policy)), u.gate) IS NOT NULL
                  GROUP BY u.gate) x
            CROSS JOIN LATERAL dispatch_policy.partition_pending(\(policy), x.gate, x.keys) pp
            """, logger: logger)
        {
            let (gate, partition, pending, last) = try row.decode((String, String, Int64, Date?).self)
            counts[gate + "\u{1F}" + partition] = (pending, last)
        }
        for index in rows.indices {
            if let count = counts[rows[index].gate + "\u{1F}" + rows[index].partition] {
                rows[index].pending = count.pending
                rows[index].lastStaged = count.last
            }
        }
        return rows
    }

    /// A round-robin lane with jobs waiting, its pending count (counted up to
    /// `countCap` through the lane's index) and whether it is blocked.
    public struct LaneRow: Sendable, Equatable {
        public var lane: String?
        public var pending: Int64
        public var blockedUntil: Date?
        public var blockedGate: String?
        public var blockedPartition: String?
    }

    public static let laneCountCap = 10_000

    public func lanes(policy: String, search: String?, after: String?, limit: Int) async throws -> [LaneRow] {
        let pattern = search.flatMap { $0.isEmpty ? nil : "%" + Self.escapeLike($0) + "%" }
        return try await executor.rows(
            """
            SELECT l.lane,
                   -- Each through its lane's index (IS NOT DISTINCT FROM would use none).
                   CASE WHEN l.lane IS NULL THEN
                     (SELECT count(*) FROM (SELECT 1 FROM dispatch_policy.staged_jobs s
                        WHERE s.policy = l.policy AND s.not_before IS NULL AND s.round_robin_key IS NULL
                        LIMIT \(Self.laneCountCap + 1)) x)
                   ELSE
                     (SELECT count(*) FROM (SELECT 1 FROM dispatch_policy.staged_jobs s
                        WHERE s.policy = l.policy AND s.not_before IS NULL AND s.round_robin_key = l.lane
                        LIMIT \(Self.laneCountCap + 1)) x)
                   END::bigint,
                   CASE WHEN l.blocked_until > now() THEN l.blocked_until END, l.blocked_gate, l.blocked_partition
            FROM dispatch_policy.lanes l
            WHERE l.policy = \(policy)
              AND (\(pattern)::text IS NULL OR l.lane ILIKE \(pattern)::text)
              AND (\(after)::text IS NULL OR l.lane > \(after)::text)
            ORDER BY l.lane NULLS LAST
            LIMIT \(limit)
            """, logger: logger
        ).map { row in
            let (lane, pending, until, gate, partition) = try row.decode((String?, Int64, Date?, String?, String?).self)
            return LaneRow(lane: lane, pending: pending, blockedUntil: until, blockedGate: gate, blockedPartition: partition)
        }
    }

    // MARK: Jobs

    public struct JobDetail: Sendable, Equatable {
        public var id: Int64
        public var policy: String
        public var queue: String
        public var state: String
        public var attempt: Int
        public var argsJSON: String
        public var contextJSON: String
        public var dedupeKey: String?
        public var roundRobinKey: String?
        public var createdAt: Date?
        public var stagedAt: Date?
        public var notBefore: Date?
        public var admittedAt: Date?
        public var startedAt: Date?
        public var finishedAt: Date?
        public var lastError: String?
        public var partitions: [(gate: String, partition: String)]

        public static func == (a: JobDetail, b: JobDetail) -> Bool {
            a.id == b.id && a.state == b.state && a.attempt == b.attempt && a.argsJSON == b.argsJSON
        }
    }

    public func job(_ id: Int64) async throws -> JobDetail? {
        guard
            let row = try await executor.rows(
                """
                SELECT j.id, j.policy, j.queue, j.state, j.attempt, jsonb_pretty(j.args), jsonb_pretty(j.context), j.dedupe_key,
                       j.round_robin_key, j.created_at, j.staged_at, j.not_before, j.admitted_at, j.started_at, j.finished_at, j.last_error
                FROM (
                  SELECT s.id, s.policy, s.queue, CASE WHEN s.not_before > now() THEN 'scheduled' ELSE 'pending' END AS state,
                         s.attempt, s.args, s.context, s.dedupe_key, s.round_robin_key, s.created_at, s.staged_at, s.not_before,
                         NULL::timestamptz AS admitted_at, NULL::timestamptz AS started_at, NULL::timestamptz AS finished_at, s.last_error
                  FROM dispatch_policy.staged_jobs s WHERE s.id = \(id)
                  UNION ALL
                  SELECT a.id, a.policy, a.queue, 'admitted', a.attempt, a.args, a.context, a.dedupe_key, a.round_robin_key, a.created_at,
                         a.staged_at, NULL, a.admitted_at, a.started_at, NULL, NULL
                  FROM dispatch_policy.admitted_jobs a WHERE a.id = \(id)
                  UNION ALL
                  SELECT f.id, f.policy, f.queue, f.status, f.attempts, f.args, f.context, f.dedupe_key, NULL, f.created_at, NULL, NULL,
                         f.admitted_at, f.started_at, f.finished_at, f.last_error
                  FROM dispatch_policy.finished_jobs f WHERE f.id = \(id)
                ) j LIMIT 1
                """, logger: logger
            ).first
        else { return nil }
        let decoded = try row.decode(
            (Int64, String, String, String, Int, String, String, String?, String?, Date?, Date?, Date?, Date?, Date?, Date?, String?).self)
        let partitions = try await executor.rows(
            """
            SELECT coalesce(g ->> 'name', g ->> 'type'),
                   CASE WHEN g ->> 'type' = 'global_cap' THEN 'default'
                        ELSE coalesce(dispatch_policy._render_template(g ->> 'partition_by', j.context), 'default') END
            FROM (SELECT policy, context FROM dispatch_policy.staged_jobs WHERE id = \(id)
                  UNION ALL SELECT policy, context FROM dispatch_policy.admitted_jobs WHERE id = \(id)
                  UNION ALL SELECT policy, context FROM dispatch_policy.finished_jobs WHERE id = \(id) LIMIT 1) j
            JOIN dispatch_policy.policies p ON p.name = j.policy
            CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) WITH ORDINALITY AS x(g, n)
            ORDER BY x.n
            """, logger: logger
        ).map { try $0.decode((String, String).self) }
        return JobDetail(
            id: decoded.0, policy: decoded.1, queue: decoded.2, state: decoded.3, attempt: decoded.4, argsJSON: decoded.5,
            contextJSON: decoded.6, dedupeKey: decoded.7, roundRobinKey: decoded.8, createdAt: decoded.9, stagedAt: decoded.10,
            notBefore: decoded.11, admittedAt: decoded.12, startedAt: decoded.13, finishedAt: decoded.14, lastError: decoded.15,
            partitions: partitions.map { (gate: $0.0, partition: $0.1) })
    }

    public struct Failure: Sendable, Equatable {
        public var attempt: Int
        public var failedAt: Date
        public var error: String
    }

    public func failures(job id: Int64, limit: Int = 50) async throws -> [Failure] {
        try await executor.rows(
            """
            SELECT attempt, failed_at, error FROM dispatch_policy.job_failures
            WHERE job_id = \(id) ORDER BY failed_at DESC LIMIT \(limit)
            """, logger: logger
        ).map { row in
            let (attempt, at, error) = try row.decode((Int, Date, String).self)
            return Failure(attempt: attempt, failedAt: at, error: error)
        }
    }

    public struct DeadJob: Sendable, Equatable {
        public var id: Int64
        public var policy: String
        public var attempt: Int
        public var finishedAt: Date
        public var lastError: String?
    }

    /// Dead jobs, newest first, keyset-paginated on (finished_at, id).
    public func deadJobs(policy: String?, before: (Date, Int64)?, limit: Int) async throws -> [DeadJob] {
        try await executor.rows(
            """
            SELECT id, policy, attempts, finished_at, last_error FROM dispatch_policy.finished_jobs
            WHERE status = 'dead' AND (\(policy)::text IS NULL OR policy = \(policy)::text)
              AND (\(before?.0)::timestamptz IS NULL OR (finished_at, id) < (\(before?.0)::timestamptz, \(before?.1)::bigint))
            ORDER BY finished_at DESC, id DESC LIMIT \(limit)
            """, logger: logger
        ).map { row in
            let (id, policy, attempt, at, error) = try row.decode((Int64, String, Int, Date, String?).self)
            return DeadJob(id: id, policy: policy, attempt: attempt, finishedAt: at, lastError: error)
        }
    }

    public func explain(_ id: Int64) async throws -> JobExplanation {
        try await JobExplanation.load(id: id, on: executor, logger: logger)
    }

    static func escapeLike(_ text: String) -> String {
        text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "%", with: "\\%").replacingOccurrences(
            of: "_", with: "\\_")
    }
}
