// Figures 1 and 5: jobs admitted per second through five gates against the
// raw SKIP LOCKED + DELETE + INSERT of the same batch; tick time with a small
// and a large backlog.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum AdmissionFigures {
    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        let logger = bench.logger
        let (_, db) = try await bench.freshDatabase("admission")
        defer { Task { try? await db.close() } }
        let big = bench.pick(1_000_000, smoke: 50_000)
        let small = bench.pick(10_000, smoke: 5_000)
        let jobs = bench.pick(50_000, smoke: 10_000)
        let rounds = bench.pick(5, smoke: 2)

        // Every gate at its bound (limits high enough), so every fetched row is admitted.
        let gates = PolicyConfig(roundRobinBy: "{tenant}", batchSize: 500, roundRobinQuantum: 50) {
            Gate.throttle(rate: 1_000_000, per: 1, burst: 1_000_000, partitionBy: "{tenant}")
            Gate.concurrency(max: 1_000_000, partitionBy: "{tenant}")
            Gate.globalCap(max: 1_000_000)
            Gate.fairInterleave()
            Gate.adaptiveConcurrency(partitionBy: "{tenant}", initialMax: 1_000_000, targetLagMs: 86_400_000)
        }
        // Stage everything first, then settle (vacuum, checkpoint), so both
        // sides of each ratio are measured in the same machine state.
        let tenant = "jsonb_build_object('tenant', 't' || (i % 100))"
        for (policy, count) in [("small", small), ("large", big), ("rate", jobs)] {
            try await bench.declare(db, policy, gates)
            try await bench.stage(db, policy: policy, count: count, context: tenant)
        }
        try await makeRawTables(db, jobs: jobs, logger: logger)
        for statement in ["VACUUM ANALYZE", "CHECKPOINT"] {
            _ = try await db.rows(PostgresQuery(unsafeSQL: statement), logger: logger)
        }
        let ticker = Ticker(connection: db, logger: logger)

        // Jobs admitted per second vs the raw statement, one batch of each in
        // turn; `rounds` rounds, a ratio each.
        var gatedRates: [Double] = []
        var rawRates: [Double] = []
        let perRound = jobs / rounds
        for _ in 0..<rounds {
            var gatedTime = 0.0
            var rawTime = 0.0
            var admitted = 0
            var moved = 0
            while admitted < perRound || moved < perRound {
                if admitted < perRound {
                    let start = ContinuousClock.now
                    let n = try await ticker.tick(policy: "rate").admitted
                    gatedTime += seconds(ContinuousClock.now - start)
                    guard n > 0 else { throw BenchError("a tick of 'rate' admitted nothing") }
                    admitted += n
                }
                if moved < perRound {
                    let start = ContinuousClock.now
                    moved += try await rawBatch(db, logger: logger)
                    rawTime += seconds(ContinuousClock.now - start)
                }
            }
            gatedRates.append(Double(admitted) / gatedTime)
            rawRates.append(Double(moved) / rawTime)
        }
        let gated = Samples(gatedRates)
        let raw = Samples(rawRates)
        let ratio = Samples.ratios(gated, raw)

        // Tick time at `small` and at `big` pending, alternating.
        _ = try await ticker.tick(policy: "small")
        _ = try await ticker.tick(policy: "large")
        var smallMs: [Double] = []
        var largeMs: [Double] = []
        for _ in 0..<bench.pick(15, smoke: 5) {
            smallMs.append(try await timedTick(ticker, "small"))
            largeMs.append(try await timedTick(ticker, "large"))
        }
        let tickRatio = Samples.ratios(Samples(largeMs), Samples(smallMs))
        return [
            Row(
                id: "1", figure: "admitted jobs/s through 5 gates vs raw `SKIP LOCKED` + `DELETE` + `INSERT` of the same batch (500)",
                measured: "\(gated.format(Fmt.n)) vs \(raw.format(Fmt.n)) jobs/s", result: ratio.format(Fmt.ratio),
                target: "≥ 0.5", met: ratio.median >= 0.5),
            Row(
                id: "5",
                figure: "tick time (500 rows, 5 gates, 100 tenants) at \(Fmt.n(Double(big))) pending vs \(Fmt.n(Double(small))) pending",
                measured: "\(Samples(largeMs).format(Fmt.ms)) vs \(Samples(smallMs).format(Fmt.ms))", result: tickRatio.format(Fmt.ratio),
                target: "≤ 1.3", met: tickRatio.median <= 1.3),
        ]
    }

    static func timedTick(_ ticker: Ticker, _ policy: String) async throws -> Double {
        let start = ContinuousClock.now
        let result = try await ticker.tick(policy: policy)
        guard result.admitted == 500 else { throw BenchError("a tick of '\(policy)' admitted \(result.admitted), not 500") }
        return seconds(ContinuousClock.now - start) * 1000
    }

    static func makeRawTables(_ db: PostgresConnection, jobs: Int, logger: Logger) async throws {
        _ = try await db.rows("CREATE TABLE raw_pending (id bigint PRIMARY KEY, priority int, args jsonb, context jsonb)", logger: logger)
        _ = try await db.rows("CREATE INDEX ON raw_pending (priority, id)", logger: logger)
        _ = try await db.rows(
            "CREATE TABLE raw_admitted (id bigint PRIMARY KEY, priority int, args jsonb, context jsonb, admitted_at timestamptz)",
            logger: logger)
        _ = try await db.rows(
            """
            INSERT INTO raw_pending SELECT i, 0, jsonb_build_object('i', i), jsonb_build_object('tenant', 't' || (i % 100))
            FROM generate_series(1, \(jobs)::int) i
            """, logger: logger)
    }

    /// The raw baseline: lock 500 rows, move them, in one transaction.
    static func rawBatch(_ db: PostgresConnection, logger: Logger) async throws -> Int {
        let rows = try await db.rows(
            """
            WITH picked AS (SELECT id FROM raw_pending ORDER BY priority, id LIMIT 500 FOR UPDATE SKIP LOCKED),
                 gone AS (DELETE FROM raw_pending r USING picked p WHERE r.id = p.id RETURNING r.*),
                 done AS (INSERT INTO raw_admitted SELECT id, priority, args, context, now() FROM gone RETURNING 1)
            SELECT count(*) FROM done
            """, logger: logger)
        return try rows.first?.decode(Int.self) ?? 0
    }
}
