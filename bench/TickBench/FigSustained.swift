// Figure 14: a sustained run at full admission rate with staging alongside:
// a stager keeps about 20,000 jobs pending (stage_many, 1,000 a call), a
// live runner admits through gates on 100 tenants, workers complete no-op
// jobs. Admissions per period, first against last; the pending indexes and
// autovacuum as measured at the start and the end.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum SustainedFigures {
    struct TableState {
        var table: Double
        var indexes: Double
        var deadTuples: Int
        var autovacuums: Int
    }

    static func state(_ bench: Bench, _ db: PostgresConnection) async throws -> TableState {
        let row = try await db.rows(
            """
            SELECT pg_relation_size('dispatch_policy.staged_jobs')::float8 / 1048576,
                   pg_indexes_size('dispatch_policy.staged_jobs')::float8 / 1048576,
                   coalesce(n_dead_tup, 0)::int, coalesce(autovacuum_count, 0)::int
            FROM pg_stat_user_tables WHERE relid = 'dispatch_policy.staged_jobs'::regclass
            """, logger: bench.logger
        ).first
        let (ready, rr, dead, vacuums) = try row?.decode((Double, Double, Int, Int).self) ?? (.nan, .nan, 0, 0)
        return TableState(table: ready, indexes: rr, deadTuples: dead, autovacuums: vacuums)
    }

    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        let logger = bench.logger
        let (settings, db) = try await bench.freshDatabase("sustained")
        defer { Task { try? await db.close() } }
        let duration = bench.options.smoke ? Duration.seconds(20) : (bench.options.long ? .seconds(600) : .seconds(180))
        let period = bench.pick(Duration.seconds(60), smoke: .seconds(5))
        try await bench.declare(
            db, "sustained",
            PolicyConfig(roundRobinBy: "{tenant}", batchSize: 500, roundRobinQuantum: 50) {
                Gate.throttle(rate: 1_000_000, per: 1, burst: 1_000_000, partitionBy: "{tenant}")
                Gate.concurrency(max: 1_000_000, partitionBy: "{tenant}")
            })
        let options =
            try await db.rows(
                """
                SELECT coalesce(array_to_string(reloptions, ', '), '') FROM pg_class WHERE oid = 'dispatch_policy.staged_jobs'::regclass
                """, logger: logger
            ).first?.decode(String.self) ?? ""
        let server =
            try await db.rows(
                """
                SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings
                WHERE name IN ('autovacuum', 'autovacuum_naptime', 'autovacuum_vacuum_cost_limit')
                """, logger: logger
            ).first?.decode(String.self) ?? ""
        try await bench.stage(db, policy: "sustained", count: 20_000, context: "jsonb_build_object('tenant', 't' || (i % 100))")
        let before = try await state(bench, db)
        let stagerDB = try await settings.connect(logger: logger)
        defer { Task { try? await stagerDB.close() } }
        let tracker = JobTracker()
        let w = worker(bench, settings, concurrency: 50, handlers: ["sustained": tracker.handler(sleepMs: 0)])
        let start = try await bench.now(db)
        let staged = try await withLive([runner(bench, settings, policies: ["sustained"]), w], logger: logger) {
            let stager = Task {
                var next = 20_000
                var staged = 0
                let end = ContinuousClock.now + duration
                while ContinuousClock.now < end && !Task.isCancelled {
                    let pending =
                        try await stagerDB.rows("SELECT count(*)::int FROM dispatch_policy.staged_jobs", logger: logger)
                        .first?.decode(Int.self) ?? 0
                    if pending < 20_000 {
                        try await bench.stage(
                            stagerDB, policy: "sustained", count: 1000,
                            context: "jsonb_build_object('tenant', 't' || (i % 100))", from: next)
                        next += 1000
                        staged += 1000
                    } else {
                        try await Task.sleep(for: .milliseconds(20))
                    }
                }
                return staged
            }
            return try await stager.value
        }
        let end = try await bench.now(db)
        let after = try await state(bench, db)
        // Admissions per period, by admitted_at.
        let periodSeconds = seconds(period)
        let counts = try await db.rows(
            """
            SELECT floor(extract(epoch FROM admitted_at - \(start)) / \(periodSeconds))::int AS p, count(*)::float8 FROM (
              SELECT admitted_at FROM dispatch_policy.admitted_jobs WHERE policy = 'sustained'
              UNION ALL SELECT admitted_at FROM dispatch_policy.finished_jobs WHERE policy = 'sustained') x
            WHERE admitted_at >= \(start) AND admitted_at < \(end)
            GROUP BY p ORDER BY p
            """, logger: logger
        ).map { try $0.decode((Int, Double).self) }
        let whole = Int(end.timeIntervalSince(start) / periodSeconds)
        let rates = counts.filter { $0.0 < whole }.map { $0.1 / periodSeconds }
        guard let first = rates.first, let last = rates.last, rates.count >= 2 else {
            throw BenchError("the sustained run has fewer than two whole periods")
        }
        let ratio = last / first
        let p = Int(periodSeconds)
        return [
            Row(
                id: "14",
                figure:
                    "sustained: \(Int(seconds(duration))) s at full admission rate (2 gates, 100 tenants, 50 no-op worker slots), staging alongside (~20k pending): admissions/s in the last \(p) s vs the first \(p) s",
                measured: String(
                    format:
                        "%@ vs %@ admissions/s (per %d s: %@); staged %@; staged_jobs %.1f → %.1f MB, its indexes %.1f → %.1f MB, dead tuples %d → %d, autovacuums of staged_jobs %d → %d (reloptions: %@; %@)",
                    Fmt.n(last), Fmt.n(first), p, rates.map(Fmt.n).joined(separator: " "), Fmt.n(Double(staged)),
                    before.table, after.table, before.indexes, after.indexes,
                    before.deadTuples, after.deadTuples, before.autovacuums, after.autovacuums, options, server),
                result: Fmt.ratio(ratio), target: "≥ 0.9 (no decay)", met: ratio >= 0.9)
        ]
    }
}
