// dispatch-policy-bench: admission cost measured as ratios within one run.
//
//   swift run -c release dispatch-policy-bench [--quick]
//   swift run -c release dispatch-policy-bench --fairness    # shares under a binding cap (live runner + workers)
//   swift run -c release dispatch-policy-bench --adaptive    # AIMD convergence (live runner + workers)
//
// Uses DATABASE_URL when set, else starts a private cluster. Prints:
//   1. tick time with 10k and with 1M jobs pending (same policy, all gates):
//      the ratio shows the cost does not grow with the backlog;
//   2. jobs admitted per second through all five gates vs the raw
//      SELECT ... FOR UPDATE SKIP LOCKED + DELETE + INSERT of the same batch.
import DispatchPolicy
import EmbeddedPostgres
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle

@main
struct TickBench {
    static let logger: Logger = {
        var logger = Logger(label: "bench")
        logger.logLevel = .warning
        return logger
    }()

    static func main() async throws {
        let quick = CommandLine.arguments.contains("--quick")
        let big = quick ? 200_000 : 1_000_000
        var cluster: EmbeddedPostgres?
        let admin: ConnectionSettings
        if let url = ProcessInfo.processInfo.environment["DATABASE_URL"], !url.isEmpty {
            admin = try ConnectionSettings(url: url)
        } else {
            cluster = try await EmbeddedPostgres.start()
            admin = try ConnectionSettings(url: cluster?.url() ?? "")
        }
        let conn = try await admin.connect(logger: logger)
        _ = try await conn.rows("DROP DATABASE IF EXISTS dispatch_policy_bench", logger: logger)
        _ = try await conn.rows("CREATE DATABASE dispatch_policy_bench", logger: logger)
        try await conn.close()
        let db = try await admin.with(database: "dispatch_policy_bench").connect(logger: logger)
        try await Migrator(logger: logger).migrate(on: db)
        if CommandLine.arguments.contains("--fairness") {
            for fairInterleave in [false, true] {
                try await fairness(db, settings: admin.with(database: "dispatch_policy_bench"), fairInterleave: fairInterleave)
            }
            try await db.close()
            try cluster?.stop()
            return
        }
        if CommandLine.arguments.contains("--adaptive") {
            try await adaptive(db, settings: admin.with(database: "dispatch_policy_bench"))
            try await db.close()
            try cluster?.stop()
            return
        }

        // Every gate at its bound (limits()), so every fetched row is admitted.
        let gates = PolicyConfig(roundRobinBy: "{tenant}", batchSize: 500, roundRobinQuantum: 50) {
            Gate.throttle(rate: 1_000_000, per: 1, burst: 1_000_000, partitionBy: "{tenant}")
            Gate.concurrency(max: 1_000_000, partitionBy: "{tenant}")
            Gate.globalCap(max: 1_000_000)
            Gate.fairInterleave()
            Gate.adaptiveConcurrency(partitionBy: "{tenant}", initialMax: 1_000_000, targetLagMs: 86_400_000)
        }
        print("dispatch-policy-bench (\(quick ? "quick" : "full")), PostgreSQL \(try await db.rows("SHOW server_version", logger: logger).first?.decode(String.self) ?? "?")")

        // Stage everything first, then settle (vacuum, checkpoint), so both
        // sides of each ratio are measured in the same machine state, with
        // their steps interleaved.
        let jobs = quick ? 20_000 : 50_000
        for (policy, count) in [("small", 10_000), ("large", big), ("rate", jobs)] {
            try await PolicyCatalog(executor: db, logger: logger).declare(name: policy, config: try gates.json())
            try await stage(db, policy: policy, count: count)
        }
        try await makeRawTables(db, jobs: jobs)
        for statement in ["VACUUM ANALYZE", "CHECKPOINT"] {
            _ = try await db.rows(PostgresQuery(unsafeSQL: statement), logger: logger)
        }
        let ticker = Ticker(connection: db, logger: logger)

        // 1. Tick time at 10k and at `big` pending: 15 ticks each, alternating.
        _ = try await ticker.tick(policy: "small")
        _ = try await ticker.tick(policy: "large")
        var small: [Double] = [], large: [Double] = []
        for _ in 0..<15 {
            small.append(try await timedTick(ticker, "small"))
            large.append(try await timedTick(ticker, "large"))
        }
        let smallMedian = median(small), largeMedian = median(large)
        print(String(format: "tick (500 rows, 5 gates, 100 tenants, median of 15): %.1f ms at 10k pending, %.1f ms at %dk pending: ratio %.2f",
                     smallMedian, largeMedian, big / 1000, largeMedian / smallMedian))

        // 2. Jobs admitted per second through the gates vs the raw statement on
        //    the same batch size, alternating one batch of each.
        var gatedTime = 0.0, rawTime = 0.0, admitted = 0, moved = 0
        while admitted < jobs || moved < jobs {
            if admitted < jobs {
                let start = ContinuousClock.now
                admitted += try await ticker.tick(policy: "rate").admitted
                gatedTime += ms(ContinuousClock.now - start)
            }
            if moved < jobs {
                let start = ContinuousClock.now
                moved += try await rawBatch(db)
                rawTime += ms(ContinuousClock.now - start)
            }
        }
        let gated = Double(admitted) / (gatedTime / 1000), raw = Double(moved) / (rawTime / 1000)
        print(String(format: "admission: %.0f jobs/s through 5 gates vs %.0f jobs/s raw SKIP LOCKED + DELETE + INSERT: ratio %.2f",
                     gated, raw, gated / raw))
        try await db.close()
        try cluster?.stop()
    }

    static func stage(_ db: PostgresConnection, policy: String, count: Int) async throws {
        var staged = 0
        while staged < count {
            let n = min(100_000, count - staged)
            _ = try await db.rows("""
                SELECT cardinality(dispatch_policy.stage_many(\(policy), (
                  SELECT jsonb_agg(jsonb_build_object('args', jsonb_build_object('i', i), 'context', jsonb_build_object('tenant', 't' || (i % 100))))
                  FROM generate_series(\(staged)::int, \(staged + n - 1)::int) i)))
                """, logger: logger)
            staged += n
        }
        _ = try await db.rows("VACUUM ANALYZE dispatch_policy.staged_jobs", logger: logger)
    }

    static func timedTick(_ ticker: Ticker, _ policy: String) async throws -> Double {
        let start = ContinuousClock.now
        let result = try await ticker.tick(policy: policy)
        precondition(result.admitted == 500, "tick admitted \(result.admitted)")
        return ms(ContinuousClock.now - start)
    }

    static func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }

    static func makeRawTables(_ db: PostgresConnection, jobs: Int) async throws {
        _ = try await db.rows("CREATE TABLE raw_pending (id bigint PRIMARY KEY, priority int, args jsonb, context jsonb)", logger: logger)
        _ = try await db.rows("CREATE INDEX ON raw_pending (priority, id)", logger: logger)
        _ = try await db.rows("CREATE TABLE raw_admitted (id bigint PRIMARY KEY, priority int, args jsonb, context jsonb, admitted_at timestamptz)", logger: logger)
        _ = try await db.rows("""
            INSERT INTO raw_pending SELECT i, 0, jsonb_build_object('i', i), jsonb_build_object('tenant', 't' || (i % 100))
            FROM generate_series(1, \(jobs)::int) i
            """, logger: logger)
    }

    /// The raw baseline: lock 500 rows, move them, in one transaction.
    static func rawBatch(_ db: PostgresConnection) async throws -> Int {
        let rows = try await db.rows("""
            WITH picked AS (SELECT id FROM raw_pending ORDER BY priority, id LIMIT 500 FOR UPDATE SKIP LOCKED),
                 gone AS (DELETE FROM raw_pending r USING picked p WHERE r.id = p.id RETURNING r.*),
                 done AS (INSERT INTO raw_admitted SELECT id, priority, args, context, now() FROM gone RETURNING 1)
            SELECT count(*) FROM done
            """, logger: logger)
        return try rows.first?.decode(Int.self) ?? 0
    }

    /// Runs a runner and workers until `done` or `limit`, sampling every `every`.
    static func live(
        _ settings: ConnectionSettings, workers: [Worker], limit: Duration, every: Duration,
        sample: @escaping (Duration) async throws -> Bool
    ) async throws {
        var options = TickRunnerOptions()
        // BENCH_BUSY_PAUSE_MS: the runner's pause after a productive pass (default 20).
        let busy = ProcessInfo.processInfo.environment["BENCH_BUSY_PAUSE_MS"].flatMap { Int64($0) } ?? 20
        options.busyPause = .milliseconds(max(0, min(busy, 10_000)))
        options.idlePause = .milliseconds(100)
        let runner = TickRunner(connection: settings, options: options, logger: logger)
        let group = ServiceGroup(configuration: .init(services: [runner] + workers, logger: logger))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            let start = ContinuousClock.now
            while ContinuousClock.now - start < limit {
                try await Task.sleep(for: every)
                if try await sample(ContinuousClock.now - start) { break }
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
    }

    /// 100 tenants × 300 jobs staged tenant by tenant, round-robin by tenant
    /// with quantum 5, global_cap 40, 40 workers running 10 ms jobs: Jain's
    /// index of admissions per tenant, sampled while every tenant still waits.
    static func fairness(_ db: PostgresConnection, settings: ConnectionSettings, fairInterleave: Bool) async throws {
        let policy = fairInterleave ? "fair_interleave" : "fair_round_robin"
        let config = PolicyConfig(roundRobinBy: "{t}", roundRobinQuantum: 5) {
            Gate.globalCap(max: 40)
            if fairInterleave { Gate.fairInterleave(partitionBy: "{t}") }
        }
        try await PolicyCatalog(executor: db, logger: logger).declare(name: policy, config: try config.json())
        for tenant in 0..<100 {
            _ = try await db.rows("""
                SELECT dispatch_policy.stage_many(\(policy), (SELECT jsonb_agg(jsonb_build_object('args', i,
                  'context', jsonb_build_object('t', \(String(format: "t%03d", tenant))::text))) FROM generate_series(1, 300) i))
                """, logger: logger)
        }
        var options = WorkerOptions()
        options.concurrency = 40
        var worker = Worker(connection: settings, options: options, logger: logger)
        worker.register(policy) { _ in try await Task.sleep(for: .milliseconds(10)) }
        var line = ""
        try await live(settings, workers: [worker], limit: .seconds(60), every: .seconds(5)) { elapsed in
            let shares = try await db.rows("""
                SELECT count(*)::float8 FROM (
                  SELECT context FROM dispatch_policy.admitted_jobs WHERE policy = \(policy)
                  UNION ALL SELECT context FROM dispatch_policy.finished_jobs WHERE policy = \(policy)) x
                GROUP BY context ->> 't'
                """, logger: logger).map { try $0.decode(Double.self) }
            let all = shares + Array(repeating: 0, count: max(0, 100 - shares.count))
            let total = all.reduce(0, +)
            let jain = total * total / (Double(all.count) * all.map { $0 * $0 }.reduce(0, +))
            // Stop measuring before any tenant runs out of work.
            if (all.max() ?? 0) >= 290 { return true }
            line = String(format: "%@: %.0f s, %.0f admissions (%.0f/s), per tenant %.0f–%.0f, Jain's index %.4f",
                          policy, ms(elapsed) / 1000, total, total / (ms(elapsed) / 1000), all.min() ?? 0, all.max() ?? 0, jain)
            print(line)
            return false
        }
    }

    /// 10 workers running 20 ms jobs (nominally 500 jobs/s), one partition,
    /// initial_max 3, target_lag_ms 100, 40,000 jobs: the cap every 3 s, and
    /// completions against the same workers on a policy with no gate.
    static func adaptive(_ db: PostgresConnection, settings: ConnectionSettings) async throws {
        func pool(_ policy: String) -> Worker {
            var options = WorkerOptions()
            options.concurrency = 10
            var worker = Worker(connection: settings, options: options, logger: logger)
            worker.register(policy) { _ in try await Task.sleep(for: .milliseconds(20)) }
            return worker
        }
        func completed(_ policy: String) async throws -> Double {
            try await db.rows("SELECT count(*)::float8 FROM dispatch_policy.finished_jobs WHERE policy = \(policy)", logger: logger)
                .first?.decode(Double.self) ?? 0
        }
        // The baseline: the same workers, no limit.
        try await PolicyCatalog(executor: db, logger: logger).declare(name: "unlimited", config: "{}")
        try await stageMany(db, policy: "unlimited", count: 20_000)
        var baseline = 0.0
        try await live(settings, workers: [pool("unlimited")], limit: .seconds(20), every: .seconds(20)) { elapsed in
            baseline = try await completed("unlimited") / (ms(elapsed) / 1000)
            return true
        }
        print(String(format: "baseline: the same 10 workers, no gate: %.0f jobs/s (nominal 500)", baseline))
        // What the baseline left (it has no gates: no counters to keep true)
        // would sit in the queue the adaptive workers claim from, unserved.
        _ = try await db.query("DELETE FROM dispatch_policy.staged_jobs WHERE policy = 'unlimited'", logger: logger)
        _ = try await db.query("DELETE FROM dispatch_policy.admitted_jobs WHERE policy = 'unlimited'", logger: logger)

        let config = PolicyConfig {
            Gate.adaptiveConcurrency(initialMax: 3, targetLagMs: 100)
        }
        try await PolicyCatalog(executor: db, logger: logger).declare(name: "adaptive", config: try config.json())
        try await stageMany(db, policy: "adaptive", count: 40_000)
        var caps: [(Double, Int)] = []
        var completedAt30 = 0.0, at30 = 0.0, completedAtEnd = 0.0, seconds = 0.0
        try await live(settings, workers: [pool("adaptive")], limit: .seconds(60), every: .seconds(3)) { elapsed in
            let cap = try await db.rows("SELECT current_max FROM dispatch_policy.adaptive_stats WHERE policy = 'adaptive'", logger: logger)
                .first?.decode(Int.self) ?? 0
            let done = try await completed("adaptive")
            seconds = ms(elapsed) / 1000
            caps.append((seconds, cap))
            if seconds <= 30 { completedAt30 = done; at30 = seconds }
            completedAtEnd = done
            print(String(format: "t=%4.0f s  current_max %4d  completed %6.0f", seconds, cap, done))
            return false
        }
        let settled = caps.filter { $0.0 >= 30 }.map(\.1).sorted()
        if let low = settled.first, let high = settled.last {
            let median = Double(settled[settled.count / 2])
            let settledRate = (completedAtEnd - completedAt30) / (seconds - at30)
            print(String(format: "after 30 s: current_max %d–%d around %.0f (%.0f%% to +%.0f%%); %.0f jobs/s = %.2f of the same workers without a gate",
                         low, high, median, (Double(low) / median - 1) * 100, (Double(high) / median - 1) * 100,
                         settledRate, settledRate / baseline))
        }
    }

    static func stageMany(_ db: PostgresConnection, policy: String, count: Int) async throws {
        _ = try await db.rows("""
            SELECT cardinality(dispatch_policy.stage_many(\(policy), (
              SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, \(count)::int) i)))
            """, logger: logger)
    }

    static func ms(_ d: Duration) -> Double {
        Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
    }
}
