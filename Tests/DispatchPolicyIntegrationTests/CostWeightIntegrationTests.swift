import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import Testing

/// Cost-weighted throttles and weighted fairness through the runner's tick
/// (Ticker) against a real PostgreSQL (issue 12).
@Suite("Cost-weighted throttle and weighted fairness, through the tick")
struct CostWeightIntegrationTests {
    @Test("a job takes its cost from the bucket; a refused job takes nothing; staging refuses a cost above the burst")
    func costThroughTheTick() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            // 1 token a minute: nothing refills during the test.
            let config = PolicyConfig {
                Gate.throttle(name: "units", rate: 1, per: 60, burst: 10, cost: .context("units", default: 1))
            }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "api", config: try config.json())
            let stager = Stager(executor: conn, logger: TestServer.logger)
            var ids: [Int64] = []
            for units in [4, 4, 4, 1] {
                ids.append(try await stager.stage(policy: "api", try JobSpec(args: ["n": units], context: ["units": units])).id)
            }
            // 11 units never fit a bucket of 10: refused, nothing stored, and
            // stage_many is all or nothing.
            _ = await expectSQLError("22023", "cost 11 of throttle units exceeds its burst 10") {
                _ = try await stager.stage(policy: "api", try JobSpec(args: [String: Int](), context: ["units": 11]))
            }
            _ = await expectSQLError("22023", "jobs[1]: cost 12 of throttle units exceeds its burst 10") {
                _ = try await stager.stageMany(
                    policy: "api",
                    [try JobSpec(args: [String: Int](), context: ["units": 1]), try JobSpec(args: [String: Int](), context: ["units": 12])])
            }
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.staged_jobs", as: Int.self) == 4)

            let result = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "api")
            // 10 tokens: 4 + 4 admitted, the third 4 refused (2 left), the 1 admitted.
            #expect(result.admitted == 3)
            let admitted = try await conn.rows("SELECT id FROM dispatch_policy.admitted_jobs ORDER BY id", logger: TestServer.logger)
                .map { try $0.decode(Int64.self) }
            #expect(admitted == [ids[0], ids[1], ids[3]])
            let tokens = try await conn.scalar("SELECT tokens FROM dispatch_policy.throttle_buckets WHERE policy = 'api'", as: Double.self)
            #expect(abs(tokens - 1) < 0.1, "10 tokens less 4 + 4 + 1: \(tokens)")
            // explain shows the waiting job's cost.
            let explanation = try await conn.scalar(
                "SELECT explanation FROM dispatch_policy.explain(\(ids[2])) WHERE aspect = 'gate'", as: String.self)
            #expect(explanation.contains("this job costs 4 token(s)"), "\(explanation)")
        }
    }

    /// Ticks policy `fair` until 400 or more jobs were admitted, every
    /// admitted job finishing between ticks (the cap binds again in the
    /// next); returns how many were admitted, in how many ticks.
    private func tickUntil400(_ conn: PostgresConnection) async throws -> (admitted: Int, ticks: Int) {
        let ticker = Ticker(connection: conn, logger: TestServer.logger)
        var total = 0
        var ticks = 0
        while total < 400 {
            total += try await ticker.tick(policy: "fair").admitted
            ticks += 1
            try #require(ticks < 1000, "the tick stopped admitting")
            try await conn.exec(
                """
                SELECT count(*) FROM (SELECT dispatch_policy.complete_many(array_agg(a.id), array_agg(a.attempt))
                                      FROM dispatch_policy.admitted_jobs a) x
                """)
        }
        return (total, ticks)
    }

    /// Two backlogged tenants of weights 1 and 3 behind a global cap that
    /// binds every tick; all admitted jobs complete between ticks. A cap of 2
    /// cuts every tick inside b's round (the cursor's served carries it to
    /// the next), 7 does not divide into rounds of 4, 40 holds ten rounds.
    /// With a fair_interleave gate by the same key (the README's example),
    /// the batch keeps the fetch's order: found in review (issue 12), the
    /// gate restarted the weighted round every tick and behind a cap of 2
    /// tenant a got nothing after the first tick.
    @Test(
        "weights 1 and 3 share 400 admissions 100 / 300 (± 4) behind a binding global cap, with or without fair_interleave",
        arguments: [2, 7, 40], [false, true])
    func weightedShares(cap: Int, interleave: Bool) async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            let config = PolicyConfig(roundRobinBy: "{tenant}", roundRobinQuantum: 10, roundRobinWeight: .context("weight", default: 1)) {
                Gate.globalCap(max: cap)
                if interleave { Gate.fairInterleave(partitionBy: "{tenant}") }
            }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "fair", config: try config.json())
            for (tenant, weight) in [("a", 1), ("b", 3)] {
                try await conn.exec(
                    """
                    SELECT dispatch_policy.stage_many('fair', (SELECT jsonb_agg(jsonb_build_object('args', i,
                      'context', jsonb_build_object('tenant', \(tenant)::text, 'weight', \(weight)::int))) FROM generate_series(1, 600) i))
                    """)
            }
            let (total, ticks) = try await tickUntil400(conn)
            let a = try await conn.scalar(
                "SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE context ->> 'tenant' = 'a'", as: Int.self)
            let b = try await conn.scalar(
                "SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE context ->> 'tenant' = 'b'", as: Int.self)
            #expect(a + b == total)
            // The first `total` admissions, scaled to 400.
            let share = Double(a) / Double(a + b)
            #expect(abs(share - 0.25) <= 4.0 / 400.0, "a \(a), b \(b) in \(ticks) ticks of cap \(cap): a's share \(share)")
        }
    }

    /// Found by the second hostile pass on issue 12 (documented then, fixed
    /// since): a fair_interleave gate by another key than round_robin_by, or
    /// without round_robin_by, started its weighted round afresh every tick,
    /// so behind a cap smaller than a round one tenant took every turn (a
    /// 0.6 % or 50 % instead of 25 %). Its round now goes on across ticks
    /// (round_robin_cursors.interleave).
    @Test(
        "fair_interleave by tenant, with lanes by region or no lanes: weights 1 and 3 share 400 admissions 100 / 300 (± 4) behind a cap",
        arguments: [2, 7], [true, false])
    func interleaveCarriesItsRound(cap: Int, regionLanes: Bool) async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            let config = PolicyConfig(
                roundRobinBy: regionLanes ? "{region}" : nil, roundRobinQuantum: regionLanes ? 10 : nil,
                roundRobinWeight: .context("weight", default: 1)
            ) {
                Gate.globalCap(max: cap)
                Gate.fairInterleave(partitionBy: "{tenant}")
            }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "fair", config: try config.json())
            // One region; the tenants' jobs staged alternately, so every
            // batch holds both.
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('fair', (SELECT jsonb_agg(jsonb_build_object('args', i,
                  'context', jsonb_build_object('region', 'eu', 'tenant', CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END,
                                                'weight', CASE WHEN i % 2 = 0 THEN 1 ELSE 3 END)) ORDER BY i)
                  FROM generate_series(1, 2400) i))
                """)
            let (total, ticks) = try await tickUntil400(conn)
            let a = try await conn.scalar(
                "SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE context ->> 'tenant' = 'a'", as: Int.self)
            let share = Double(a) / Double(total)
            #expect(abs(share - 0.25) <= 4.0 / 400.0, "a \(a) of \(total) in \(ticks) ticks of cap \(cap): a's share \(share)")
            // Where the round stopped is kept for the next tick.
            #expect(
                try await conn.scalar(
                    "SELECT jsonb_typeof(interleave -> 'fair_interleave' -> 'served') FROM dispatch_policy.round_robin_cursors WHERE policy = 'fair'",
                    as: String.self) == "number")
            #expect(try await checkFindings(conn) == [])
        }
    }

}
