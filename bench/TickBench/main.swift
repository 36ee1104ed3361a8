// dispatch-policy-bench: admission cost measured as ratios within one run.
//
//   swift run -c release dispatch-policy-bench [--quick]
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
            admin = try ConnectionSettings(url: cluster!.url())
        }
        let conn = try await admin.connect(logger: logger)
        _ = try await conn.rows("DROP DATABASE IF EXISTS dispatch_policy_bench", logger: logger)
        _ = try await conn.rows("CREATE DATABASE dispatch_policy_bench", logger: logger)
        try await conn.close()
        let db = try await admin.with(database: "dispatch_policy_bench").connect(logger: logger)
        try await Migrator(logger: logger).migrate(on: db)

        let gates = PolicyConfig(roundRobinBy: "{tenant}", batchSize: 500, roundRobinQuantum: 50) {
            Gate.throttle(rate: 1_000_000_000, per: 1, burst: 1_000_000_000, partitionBy: "{tenant}")
            Gate.concurrency(max: 1_000_000_000, partitionBy: "{tenant}")
            Gate.globalCap(max: 1_000_000_000)
            Gate.fairInterleave()
            Gate.adaptiveConcurrency(partitionBy: "{tenant}", initialMax: 1_000_000, targetLagMs: 1e12)
        }
        print("dispatch-policy-bench (\(quick ? "quick" : "full")), PostgreSQL \(try await db.rows("SHOW server_version", logger: logger).first!.decode(String.self))")

        // 1. Tick time at 10k and at `big` pending.
        let small = try await tickTime(db, policy: "small", config: gates, pending: 10_000)
        let large = try await tickTime(db, policy: "large", config: gates, pending: big)
        print(String(format: "tick (500 rows, 5 gates, 100 tenants): %.1f ms at 10k pending, %.1f ms at %dk pending: ratio %.2f",
                     small, large, big / 1000, large / small))

        // 2. Admitted jobs/s through the gates vs the raw statement, same batch size.
        let jobs = quick ? 20_000 : 50_000
        let gated = try await admitRate(db, policy: "rate", config: gates, jobs: jobs)
        let raw = try await rawRate(db, jobs: jobs)
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

    /// Median time of 15 ticks, each admitting a full batch.
    static func tickTime(_ db: PostgresConnection, policy: String, config: PolicyConfig, pending: Int) async throws -> Double {
        try await PolicyCatalog(executor: db, logger: logger).declare(name: policy, config: try config.json())
        try await stage(db, policy: policy, count: pending)
        let ticker = Ticker(connection: db, logger: logger)
        _ = try await ticker.tick(policy: policy)  // warm up
        var times: [Double] = []
        for _ in 0..<15 {
            let start = ContinuousClock.now
            let result = try await ticker.tick(policy: policy)
            precondition(result.admitted == 500, "tick admitted \(result.admitted)")
            times.append(ms(ContinuousClock.now - start))
        }
        return times.sorted()[times.count / 2]
    }

    static func admitRate(_ db: PostgresConnection, policy: String, config: PolicyConfig, jobs: Int) async throws -> Double {
        try await PolicyCatalog(executor: db, logger: logger).declare(name: policy, config: try config.json())
        try await stage(db, policy: policy, count: jobs)
        let ticker = Ticker(connection: db, logger: logger)
        let start = ContinuousClock.now
        var admitted = 0
        while admitted < jobs {
            admitted += try await ticker.tick(policy: policy).admitted
        }
        return Double(admitted) / (ms(ContinuousClock.now - start) / 1000)
    }

    static func rawRate(_ db: PostgresConnection, jobs: Int) async throws -> Double {
        _ = try await db.rows("CREATE TABLE raw_pending (id bigint PRIMARY KEY, priority int, args jsonb, context jsonb)", logger: logger)
        _ = try await db.rows("CREATE INDEX ON raw_pending (priority, id)", logger: logger)
        _ = try await db.rows("CREATE TABLE raw_admitted (id bigint PRIMARY KEY, priority int, args jsonb, context jsonb, admitted_at timestamptz)", logger: logger)
        _ = try await db.rows("""
            INSERT INTO raw_pending SELECT i, 0, jsonb_build_object('i', i), jsonb_build_object('tenant', 't' || (i % 100))
            FROM generate_series(1, \(jobs)::int) i
            """, logger: logger)
        _ = try await db.rows("VACUUM ANALYZE raw_pending", logger: logger)
        let start = ContinuousClock.now
        var moved = 0
        while moved < jobs {
            let rows = try await db.rows("""
                WITH picked AS (SELECT id FROM raw_pending ORDER BY priority, id LIMIT 500 FOR UPDATE SKIP LOCKED),
                     gone AS (DELETE FROM raw_pending r USING picked p WHERE r.id = p.id RETURNING r.*)
                INSERT INTO raw_admitted SELECT id, priority, args, context, now() FROM gone
                """, logger: logger)
            _ = rows
            moved += 500
        }
        return Double(jobs) / (ms(ContinuousClock.now - start) / 1000)
    }

    static func ms(_ d: Duration) -> Double {
        Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
    }
}
