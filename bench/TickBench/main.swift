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
        return try rows.first!.decode(Int.self)
    }

    static func ms(_ d: Duration) -> Double {
        Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
    }
}
