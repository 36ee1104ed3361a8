import Foundation
import Logging
import PostgresNIO
import Synchronization
import Testing

@testable import DispatchPolicy

private func declare(_ conn: PostgresConnection, _ name: String, _ config: PolicyConfig) async throws {
    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: try config.json())
}

/// Stages `count` jobs whose context is built from the job number.
private func stage(
    _ conn: PostgresConnection, _ policy: String, _ count: Int, context: (Int) -> [String: String] = { _ in [:] },
    priority: (Int) -> Int32? = { _ in nil }
) async throws {
    let jobs = try (0..<count).map { i in try JobSpec(args: ["n": i], context: context(i), priority: priority(i)) }
    _ = try await Stager(executor: conn, logger: TestServer.logger).stageMany(policy: policy, jobs)
}

private func tick(_ conn: PostgresConnection, _ policy: String) async throws -> TickResult {
    try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: policy)
}

private func admittedIDs(_ conn: PostgresConnection) async throws -> [Int64] {
    try await conn.rows("SELECT id FROM dispatch_policy.admitted_jobs ORDER BY id", logger: TestServer.logger).map {
        try $0.decode(Int64.self)
    }
}

private func count(_ conn: PostgresConnection, _ sql: PostgresQuery) async throws -> Int {
    try await conn.scalar(sql, as: Int.self)
}

/// In-flight counters must equal the slots admitted jobs actually hold.
func expectCountersConsistent(_ conn: PostgresConnection, sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let mismatches = try await conn.rows(
        """
        WITH held AS (
          SELECT a.policy, s.key AS gate, s.value AS partition, count(*) AS n
          FROM dispatch_policy.admitted_jobs a
          JOIN dispatch_policy.policies p ON p.name = a.policy
          CROSS JOIN LATERAL jsonb_each_text(a.partitions) s
          WHERE s.key = ANY (dispatch_policy._slot_gates(p.config))
          GROUP BY 1, 2, 3
        )
        SELECT coalesce(c.gate, h.gate) || '/' || coalesce(c.partition, h.partition) || ': counter '
               || coalesce(c.in_flight, 0) || ', held ' || coalesce(h.n, 0)
        FROM dispatch_policy.inflight_counters c
        FULL JOIN held h ON h.policy = c.policy AND h.gate = c.gate AND h.partition = c.partition
        WHERE coalesce(c.in_flight, 0) <> coalesce(h.n, 0)
        """, logger: TestServer.logger
    ).map { try $0.decode(String.self) }
    #expect(mismatches == [], sourceLocation: sourceLocation)
}

@Suite("Admission: gates", .timeLimit(.minutes(15)))
struct GateEnforcementTests {
    @Test("concurrency caps each partition and frees a slot on complete")
    func concurrency() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig { Gate.concurrency(max: 2, partitionBy: "{acct}") })
            try await stage(conn, "p", 10) { ["acct": $0 < 5 ? "a" : "b"] }
            let first = try await tick(conn, "p")
            #expect(first.admitted == 4)
            #expect(first.refusedByGate == ["concurrency": 6])
            #expect(try await tick(conn, "p").admitted == 0)
            let a = try await admittedIDs(conn).first!
            #expect(try await conn.scalar("SELECT dispatch_policy.complete(\(a))", as: Bool.self))
            #expect(try await conn.scalar("SELECT dispatch_policy.complete(\(a))", as: Bool.self) == false)
            #expect(try await tick(conn, "p").admitted == 1)
            #expect(try await count(conn, "SELECT in_flight FROM dispatch_policy.inflight_counters WHERE partition = 'a'") == 2)
            try await expectCountersConsistent(conn)
        }
    }

    @Test("global_cap caps the whole policy")
    func globalCap() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.concurrency(max: 10, partitionBy: "{acct}")
                    Gate.globalCap(max: 3)
                })
            try await stage(conn, "p", 10) { ["acct": "t\($0)"] }
            #expect(try await tick(conn, "p").admitted == 3)
            #expect(try await count(conn, "SELECT in_flight FROM dispatch_policy.inflight_counters WHERE gate = 'global_cap'") == 3)
            try await expectCountersConsistent(conn)
        }
    }

    /// The Ticker reads the clock itself (clock_timestamp() after the policy
    /// lock), so time is advanced by moving the bucket's last refill back.
    /// One token per 10^6 s, so the real seconds the test takes add next to
    /// nothing (a minute: 0.00006 tokens).
    @Test("throttle admits the burst, then only what has refilled; rate 0 admits nothing")
    func throttle() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.throttle(rate: .context("rate", default: 1), per: 1_000_000, burst: 4, partitionBy: "{ep}")
                })
            try await stage(conn, "p", 16) { ["ep": $0 < 10 ? "x" : "y", "rate": $0 < 10 ? "1" : "0"] }
            let first = try await tick(conn, "p")
            #expect(first.admitted == 4)  // x: burst 4; y: rate 0
            #expect(first.refusedByGate == ["throttle": 12])
            #expect(try await tick(conn, "p").admitted == 0)
            func tokens(_ partition: String) async throws -> Double {
                try await conn.scalar("SELECT tokens FROM dispatch_policy.throttle_buckets WHERE partition = \(partition)", as: Double.self)
            }
            #expect(try await tokens("x") < 0.01)
            // Time moves for the buckets and for the lanes they blocked alike.
            func advance(_ interval: String) async throws {
                try await conn.exec("UPDATE dispatch_policy.throttle_buckets SET refilled_at = refilled_at - \(interval)::interval")
                try await conn.exec("UPDATE dispatch_policy.lanes SET blocked_until = blocked_until - \(interval)::interval")
            }
            // 2.5 × 10^6 s: 2.5 tokens, so exactly floor(2.5) = 2 more; half a token stays.
            try await advance("2500000 seconds")
            let refilled = try await tick(conn, "p")
            #expect(refilled.admitted == 2)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE context ->> 'ep' = 'y'") == 0)
            #expect(abs(try await tokens("x") - 0.5) < 0.001)
            // 0.4 × 10^6 s more: 0.9 tokens, not a whole one; 0.1 × 10^6 s more: one.
            try await advance("400000 seconds")
            #expect(try await tick(conn, "p").admitted == 0)
            try await advance("100000 seconds")
            #expect(try await tick(conn, "p").admitted == 1)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.admitted_jobs") == 7)
            // The bucket never exceeds its burst, however long it waited.
            try await advance("100000000 seconds")
            #expect(try await tick(conn, "p").admitted == 3)  // what x has left: 10 - 7
            #expect(abs(try await tokens("x") - 1) < 0.001)  // burst 4, 3 taken
            try await expectCountersConsistent(conn)
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("a throttle's rate and burst for a partition come from the partition's first job in the batch")
    func bucketFromFirstJob() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.throttle(rate: .context("rate", default: 1), per: 3600, burst: .context("burst", default: 1), partitionBy: "{ep}")
                })
            // x's first job says rate 2, burst 2; the five after it say 100 and 5.
            try await stage(conn, "p", 6) { $0 == 0 ? ["ep": "x", "rate": "2", "burst": "2"] : ["ep": "x", "rate": "100", "burst": "5"] }
            // y's first job says nothing (the defaults); the next one says burst 5.
            try await stage(conn, "p", 2) { $0 == 0 ? ["ep": "y"] : ["ep": "y", "rate": "100", "burst": "5"] }
            let result = try await tick(conn, "p")
            #expect(result.admitted == 3)  // x: 2 of its burst 2; y: 1 of its burst 1
            let buckets = try await conn.rows(
                "SELECT partition, rate, burst FROM dispatch_policy.throttle_buckets ORDER BY partition", logger: TestServer.logger
            ).map { try $0.decode((String, Double, Double).self) }
            #expect(buckets.map(\.0) == ["x", "y"])
            #expect(buckets.map(\.1) == [2, 1] && buckets.map(\.2) == [2, 1])
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("throttle tokens refill only with time, never on completion")
    func noRefillOnCompletion() async throws {
        try await withTestDatabase { conn, _ in
            // One token per 10^6 s: the seconds the test takes add next to nothing.
            try await declare(conn, "p", PolicyConfig { Gate.throttle(rate: 1, per: 1_000_000, burst: 2) })
            try await stage(conn, "p", 4)
            #expect(try await tick(conn, "p").admitted == 2)
            try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.finished_jobs") == 2)
            // The lane still waits for its next token (a completion does not
            // end a throttle's block): nothing is even fetched.
            #expect(try await conn.scalar("SELECT blocked_until > now() + interval '1 day' FROM dispatch_policy.lanes", as: Bool.self))
            let after = try await tick(conn, "p")
            #expect(after.admitted == 0)
            #expect(after.fetched == 0)
            #expect(try await conn.scalar("SELECT tokens FROM dispatch_policy.throttle_buckets", as: Double.self) < 0.01)
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("two throttles with different names on one partition are both enforced")
    func twoThrottles() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.throttle(name: "per_minute", rate: 10, per: 60)
                    Gate.throttle(name: "per_hour", rate: 600, per: 3600, burst: 3)
                })
            try await stage(conn, "p", 20)
            let result = try await tick(conn, "p")
            #expect(result.admitted == 3)
            #expect(result.refusedByGate == ["per_hour": 17])
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.throttle_buckets") == 2)
        }
    }

    @Test("fair_interleave lets small tenants in ahead of a burst that arrived first")
    func fairInterleave() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.concurrency(max: 100, partitionBy: "{acct}")
                    Gate.globalCap(max: 3)
                    Gate.fairInterleave()
                })
            try await stage(conn, "p", 50) { _ in ["acct": "big"] }
            try await stage(conn, "p", 2) { ["acct": "small\($0)"] }
            #expect(try await tick(conn, "p").admitted == 3)
            let tenants = try await conn.rows(
                "SELECT context ->> 'acct' FROM dispatch_policy.admitted_jobs ORDER BY 1", logger: TestServer.logger
            ).map { try $0.decode(String.self) }
            #expect(tenants == ["big", "small0", "small1"])
        }
    }

    /// The fetch rotates over accounts (the caps' partitions): a, b, c, d,
    /// a, b, ... The gate interleaves that by region while the caps count by
    /// account: a (eu), d (us), b (eu) by region; a, b, c had it used the
    /// account (the first partitioned gate's template) or not interleaved.
    @Test("fair_interleave with its own partition_by interleaves by that, not by the other gates' partitions")
    func fairInterleaveOwnPartition() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.concurrency(max: 100, partitionBy: "{acct}")
                    Gate.globalCap(max: 3)
                    Gate.fairInterleave(partitionBy: "{region}")
                })
            for acct in ["a", "b", "c"] {
                try await stage(conn, "p", 10) { _ in ["acct": acct, "region": "eu"] }
            }
            try await stage(conn, "p", 2) { _ in ["acct": "d", "region": "us"] }
            #expect(try await tick(conn, "p").admitted == 3)
            let accounts = try await conn.rows(
                "SELECT context ->> 'acct' FROM dispatch_policy.admitted_jobs ORDER BY 1", logger: TestServer.logger
            ).map { try $0.decode(String.self) }
            #expect(accounts == ["a", "b", "d"])
            #expect(try await checkFindings(conn) == [])
        }
    }

    /// claim and complete take `now`, so the lag is exact.
    @Test("the lag an adaptive gate records is admitted to started, not to finished (until finished only for a job never started)")
    func lagIsAdmittedToStarted() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 5, targetLagMs: 60_000)
                })
            try await stage(conn, "p", 3) { _ in ["acct": "a"] }
            #expect(try await tick(conn, "p").admitted == 3)
            let admittedAt = "(SELECT min(admitted_at) FROM dispatch_policy.admitted_jobs)"
            // Job 1: started 1.5 s after admission, completed a minute after it.
            try await conn.exec(
                PostgresQuery(
                    unsafeSQL: """
                        SELECT dispatch_policy.complete(c.id, now => \(admittedAt) + interval '60 seconds')
                        FROM dispatch_policy.claim('default', 'w', 1, now => \(admittedAt) + interval '1.5 seconds') c
                        """))
            // Job 2: never started, completed 2 s after admission.
            try await conn.exec(
                PostgresQuery(
                    unsafeSQL: """
                        SELECT dispatch_policy.complete(min(id), now => \(admittedAt) + interval '2 seconds')
                        FROM dispatch_policy.admitted_jobs WHERE started_at IS NULL
                        """))
            // Job 3: started 0.25 s after admission, failed 10 s after it.
            try await conn.exec(
                PostgresQuery(
                    unsafeSQL: """
                        SELECT dispatch_policy.fail(c.id, 'boom', now => \(admittedAt) + interval '10 seconds')
                        FROM dispatch_policy.claim('default', 'w', 1, now => \(admittedAt) + interval '0.25 seconds') c
                        """))
            let lags = try await conn.rows(
                "SELECT lag_ms, success FROM dispatch_policy.observations ORDER BY id", logger: TestServer.logger
            )
            .map { try $0.decode((Double, Bool).self) }
            #expect(lags.map(\.0) == [1500, 2000, 250])
            #expect(lags.map(\.1) == [true, true, false])
            #expect(try await checkFindings(conn) == [])
        }
    }

    /// Each setting shows in one step with state set by hand (claim takes
    /// `now`, so the lags are exact): alpha 0.2 moves the EWMA over a window
    /// of 4 by 1 − 0.8^(1/4) of the difference (0.5 would move it by
    /// 1 − 0.5^(1/4)); a failure quarters the cap (0.5 would halve it); the
    /// lag above target halves it (0.95 would take 1 off).
    @Test("adaptive_concurrency applies its own ewma_alpha, failure_decrease_factor and overload_decrease_factor")
    func adaptiveSettings() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.adaptiveConcurrency(
                        partitionBy: "{acct}", initialMax: 4, targetLagMs: 1000,
                        ewmaAlpha: 0.2, failureDecreaseFactor: 0.25, overloadDecreaseFactor: 0.5)
                })
            try await stage(conn, "p", 12) { _ in ["acct": "a"] }
            #expect(try await tick(conn, "p").admitted == 4)
            func claimAndComplete(lag seconds: Double) async throws {
                try await conn.exec(
                    PostgresQuery(
                        unsafeSQL: """
                            SELECT dispatch_policy.complete(c.id)
                            FROM dispatch_policy.claim('default', 'w', 1, now => (
                              SELECT admitted_at FROM dispatch_policy.admitted_jobs WHERE started_at IS NULL ORDER BY priority, id LIMIT 1
                            ) + make_interval(secs => \(seconds))) c
                            """))
            }
            func stats() async throws -> (cap: Int, ewma: Double) {
                try #require(
                    try await conn.rows("SELECT current_max, ewma_lag_ms FROM dispatch_policy.adaptive_stats", logger: TestServer.logger)
                        .first
                ).decode((Int, Double).self)
            }
            // EWMA: the first lag (0 ms) sets it, the second (2000 ms) moves it by alpha' = 1 - 0.8^(1/4).
            try await claimAndComplete(lag: 0)
            try await claimAndComplete(lag: 2)
            _ = try await tick(conn, "p")
            let folded = try await stats()
            #expect(folded.cap == 4)
            #expect(abs(folded.ewma - 2000 * (1 - pow(0.8, 0.25))) < 0.001, "EWMA \(folded.ewma)")
            // A failure, a window after the last decrease: 4 × 0.25 = 1.
            try await conn.exec("UPDATE dispatch_policy.adaptive_stats SET since_decrease = 100")
            try await conn.exec(
                """
                SELECT dispatch_policy.fail(min(id), 'boom', retry_in => interval '1 hour')
                FROM dispatch_policy.admitted_jobs WHERE started_at IS NULL
                """)
            _ = try await tick(conn, "p")
            #expect(try await stats().cap == 1)
            // The lag above the target, a window after the last decrease: 8 × 0.5 = 4.
            try await conn.exec("UPDATE dispatch_policy.adaptive_stats SET current_max = 8, since_decrease = 100, ewma_lag_ms = 5000")
            try await claimAndComplete(lag: 5)
            _ = try await tick(conn, "p")
            let overloaded = try await stats()
            #expect(overloaded.cap == 4)
            #expect(overloaded.ewma == 5000)
            try await expectCountersConsistent(conn)
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("adaptive_concurrency never grows past its max, though fast completions keep coming while it binds")
    func adaptiveCeiling() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 2, targetLagMs: 60_000, max: 3)
                })
            try await stage(conn, "p", 40) { _ in ["acct": "a"] }
            var admitted: [Int] = []
            var caps: [Int] = []
            for _ in 0..<8 {
                admitted.append(try await tick(conn, "p").admitted)
                caps.append(try await count(conn, "SELECT current_max FROM dispatch_policy.adaptive_stats"))
                try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
            }
            // It grew from 2 to the ceiling (so the ceiling was what stopped it), and no further.
            #expect(caps.first == 2 && caps.last == 3, "caps \(caps)")
            #expect(caps.allSatisfy { $0 <= 3 }, "caps \(caps)")
            #expect(admitted.allSatisfy { $0 <= 3 } && admitted.contains(3), "admitted \(admitted)")
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test(
        "adaptive_concurrency folds observations once: the cap grows by a window of fast completions while it binds, and halves on failure")
    func adaptive() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 2, targetLagMs: 60_000)
                })
            try await stage(conn, "p", 20) { _ in ["acct": "a"] }
            #expect(try await tick(conn, "p").admitted == 2)
            for id in try await admittedIDs(conn) {
                _ = try await conn.rows("SELECT dispatch_policy.complete(\(id))", logger: TestServer.logger)
            }
            // Two fast successes while the cap (2) turned jobs away: one window, +1.
            // This tick still decides under the cap it read (2); the next one uses 3.
            let second = try await tick(conn, "p")
            #expect(second.observationsFolded == 2)
            #expect(second.admitted == 2)
            #expect(try await count(conn, "SELECT current_max FROM dispatch_policy.adaptive_stats") == 3)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.observations") == 0)
            #expect(try await count(conn, "SELECT sum(completions) FROM dispatch_policy.observation_minutes") == 2)
            let third = try await tick(conn, "p")
            #expect(third.observationsFolded == 0 && third.admitted == 1)
            // A failure once a window has passed since the last decrease: the cap halves.
            try await conn.exec("UPDATE dispatch_policy.adaptive_stats SET since_decrease = 100")
            let failing = try await admittedIDs(conn).first ?? 0
            #expect(try await conn.scalar("SELECT dispatch_policy.fail(\(failing), 'boom')", as: String.self) == "retrying")
            _ = try await tick(conn, "p")
            #expect(try await count(conn, "SELECT current_max FROM dispatch_policy.adaptive_stats") == 1)
            #expect(try await count(conn, "SELECT failures FROM dispatch_policy.adaptive_stats") == 1)
            try await expectCountersConsistent(conn)
        }
    }

    /// Admitted rows share one admitted_at, so the order shows where it
    /// matters: the order a sql target receives the jobs in.
    @Test("a policy without gates admits its batch in priority, then staging, order; scheduled jobs wait")
    func ordering() async throws {
        try await withTestDatabase { conn, _ in
            try await conn.exec("CREATE TABLE public.handed (seq serial PRIMARY KEY, arg text)")
            try await conn.exec(
                """
                CREATE FUNCTION public.hand(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE sql
                AS $$ INSERT INTO public.handed (arg) VALUES (coalesce(args ->> 'n', args #>> '{}')) $$
                """)
            try await declare(conn, "p", PolicyConfig(batchSize: 3, target: .sql(function: "public.hand")))
            try await stage(conn, "p", 5) { _ in
                [:]
            } priority: {
                $0 == 4 ? -1 : nil
            }
            _ = try await Stager(executor: conn, logger: TestServer.logger)
                .stage(policy: "p", JobSpec(argsJSON: "\"later\"", priority: -5, notBefore: Date().addingTimeInterval(3600)))
            func handed() async throws -> [String] {
                try await conn.rows("SELECT arg FROM public.handed ORDER BY seq", logger: TestServer.logger).map {
                    try $0.decode(String.self)
                }
            }
            let result = try await tick(conn, "p")
            #expect(result.admitted == 3)
            #expect(try await handed() == ["4", "0", "1"])
            // Make the scheduled job due: the next tick promotes and admits it first.
            try await conn.exec(
                "UPDATE dispatch_policy.staged_jobs SET not_before = now() - interval '1 second' WHERE not_before IS NOT NULL")
            #expect(try await tick(conn, "p").admitted == 3)
            #expect(try await handed() == ["4", "0", "1", "later", "2", "3"])
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("a paused policy admits nothing until resumed")
    func paused() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig())
            try await stage(conn, "p", 3)
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).pause("p")
            #expect(try await tick(conn, "p").outcome == .paused)
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).policiesWithWork() == [])
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).resume("p")
            #expect(try await tick(conn, "p").admitted == 3)
        }
    }

    @Test("a tenant with 10 pending jobs is admitted in the first tick behind another tenant's 100,000")
    func roundRobinFairness() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig(roundRobinBy: "{tenant}", batchSize: 500, roundRobinQuantum: 50))
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', '{"tenant": "noisy"}'::jsonb))
                                                        FROM generate_series(1, 100000) i))
                """)
            try await stage(conn, "p", 10) { _ in ["tenant": "small"] }
            let result = try await tick(conn, "p")
            #expect(result.admitted == 500)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE round_robin_key = 'small'") == 10)
        }
    }

    @Test("the round-robin fetch rotates across more tenants than fit in one batch")
    func roundRobinRotation() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig(roundRobinBy: "{tenant}", batchSize: 4, roundRobinQuantum: 2))
            try await stage(conn, "p", 30) { ["tenant": "t\($0 % 6)"] }
            var seen: [Set<String>] = []
            for _ in 0..<3 {
                _ = try await tick(conn, "p")
                let tenants = try await conn.rows(
                    "SELECT DISTINCT round_robin_key FROM dispatch_policy.admitted_jobs", logger: TestServer.logger
                ).map { try $0.decode(String.self) }
                seen.append(Set(tenants))
                try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
            }
            #expect(seen.map(\.count) == [2, 2, 2])
            #expect(seen.reduce(Set<String>()) { $0.union($1) } == Set((0..<6).map { "t\($0)" }))
        }
    }
}

@Suite("Admission: primitives", .timeLimit(.minutes(15)))
struct AdmissionPrimitiveTests {
    @Test("token buckets refill fractionally at rate/per up to burst, at the given now")
    func refill() async throws {
        try await withTestDatabase { conn, _ in
            let bucket = #"[{"gate": "t", "partition": "x", "rate": 0.5, "per": 1, "burst": 2}]"#
            func refill(_ at: String) async throws -> Double {
                try await conn.scalar(
                    "SELECT tokens FROM dispatch_policy.refill_buckets('p', \(bucket)::jsonb, \(at)::timestamptz)", as: Double.self)
            }
            #expect(try await refill("2030-01-01 00:00:00+00") == 2)  // new bucket: full
            try await conn.exec("UPDATE dispatch_policy.throttle_buckets SET tokens = 0")
            #expect(try await refill("2030-01-01 00:00:01+00") == 0.5)
            #expect(try await refill("2030-01-01 00:00:02+00") == 1.0)
            #expect(try await refill("2030-01-01 00:00:01+00") == 1.0)  // time going back adds nothing
            #expect(try await refill("2030-01-01 00:01:00+00") == 2)  // capped at burst
        }
    }

    @Test("fetch_batch never returns more than batch_size rows, whatever the quantum", arguments: [(2, 50), (5, 2), (7, 3), (40, 5)])
    func fetchBound(batch: Int, quantum: Int) async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig(roundRobinBy: "{t}"))
            try await stage(conn, "p", 60) { ["t": "t\($0 % 4)"] }
            try await stage(conn, "p", 5) { _ in [:] }
            try await conn.exec("BEGIN")
            let fetched = try await conn.scalar(
                "SELECT count(*) FROM dispatch_policy.fetch_batch('p', \(batch)::integer, \(quantum)::integer)", as: Int.self)
            try await conn.exec("COMMIT")
            #expect(fetched == batch)
        }
    }

    @Test("expired leases are reaped: slots released, the attempt recorded, the job re-staged or dead")
    func reaping() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig(maxAttempts: 2) { Gate.concurrency(max: 1, partitionBy: "{acct}") })
            try await stage(conn, "p", 1) { _ in ["acct": "a"] }
            #expect(try await tick(conn, "p").admitted == 1)
            #expect(try await conn.scalar("SELECT dispatch_policy.reap_leases('p', now() + interval '1 hour')", as: Int.self) == 1)
            #expect(try await count(conn, "SELECT in_flight FROM dispatch_policy.inflight_counters") == 0)
            #expect(try await count(conn, "SELECT attempt FROM dispatch_policy.staged_jobs") == 2)
            #expect(try await conn.scalar("SELECT last_error FROM dispatch_policy.staged_jobs", as: String.self) == "lease expired")
            // Second attempt also expires: max_attempts 2, so the job is dead, its history kept.
            try await conn.exec("UPDATE dispatch_policy.staged_jobs SET not_before = NULL")
            #expect(try await tick(conn, "p").admitted == 1)
            #expect(try await conn.scalar("SELECT dispatch_policy.reap_leases(NULL, now() + interval '1 hour')", as: Int.self) == 1)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.finished_jobs WHERE status = 'dead'") == 1)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.job_failures") == 2)
            #expect(try await count(conn, "SELECT dead FROM dispatch_policy.policy_overview") == 1)
            try await expectCountersConsistent(conn)
        }
    }

    @Test("dedupe: the key is held while admitted and free again after completion")
    func dedupeAfterCompletion() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig())
            let stager = Stager(executor: conn, logger: TestServer.logger)
            let id = try await stager.stage(policy: "p", JobSpec(argsJSON: "1", dedupeKey: "k")).id
            _ = try await tick(conn, "p")
            #expect(try await stager.stage(policy: "p", JobSpec(argsJSON: "2", dedupeKey: "k")) == StagedJob(id: id, outcome: .kept))
            _ = try await conn.rows("SELECT dispatch_policy.complete(\(id))", logger: TestServer.logger)
            let again = try await stager.stage(policy: "p", JobSpec(argsJSON: "3", dedupeKey: "k"))
            #expect(again.outcome == .inserted && again.id != id)
        }
    }

    @Test("dedupe: the key is held while the job waits for a retry, and free again when it dies")
    func dedupeThroughRetryAndDeath() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig(maxAttempts: 2))
            let stager = Stager(executor: conn, logger: TestServer.logger)
            let id = try await stager.stage(policy: "p", JobSpec(argsJSON: "1", dedupeKey: "k")).id
            _ = try await tick(conn, "p")
            #expect(
                try await conn.scalar("SELECT dispatch_policy.fail(\(id), 'boom', retry_in => interval '1 hour')", as: String.self)
                    == "retrying")
            // Waiting for its retry, the job still holds its key.
            #expect(try await stager.stage(policy: "p", JobSpec(argsJSON: "2", dedupeKey: "k")) == StagedJob(id: id, outcome: .kept))
            #expect(try await conn.scalar("SELECT job_id FROM dispatch_policy.dedupe_keys WHERE dedupe_key = 'k'", as: Int64.self) == id)
            try await conn.exec("UPDATE dispatch_policy.staged_jobs SET not_before = NULL")
            #expect(try await tick(conn, "p").admitted == 1)
            #expect(try await stager.stage(policy: "p", JobSpec(argsJSON: "3", dedupeKey: "k")) == StagedJob(id: id, outcome: .kept))
            // Its last attempt fails: dead, and the key is free.
            #expect(try await conn.scalar("SELECT dispatch_policy.fail(\(id), 'boom again')", as: String.self) == "dead")
            let next = try await stager.stage(policy: "p", JobSpec(argsJSON: "4", dedupeKey: "k")).id
            #expect(next != id)
            #expect(try await conn.scalar("SELECT job_id FROM dispatch_policy.dedupe_keys WHERE dedupe_key = 'k'", as: Int64.self) == next)
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("prune removes state of gates no longer declared, idle partitions and old history")
    func prune() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig { Gate.throttle(name: "old", rate: 1, per: 1, partitionBy: "{x}") })
            try await stage(conn, "p", 2) { ["x": "\($0)"] }
            _ = try await tick(conn, "p")
            try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
            try await declare(conn, "p", PolicyConfig { Gate.concurrency(max: 1) })
            // Redeclaring removed the old gate's buckets already; state left by
            // an older version is pruned.
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.throttle_buckets") == 0)
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.throttle_buckets (policy, gate, partition, tokens, rate, per_seconds, burst, refilled_at)
                VALUES ('p', 'old', '0', 1, 1, 1, 1, now()), ('p', 'old', '1', 1, 1, 1, 1, now())
                """)
            try await conn.exec(
                "INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight, updated_at) VALUES ('p', 'concurrency', 'idle', 0, now() - interval '2 hours')"
            )
            // Restricted to other policies, it leaves p alone (the history fold,
            // row stat_deltas, is of every policy: it only moves counts).
            #expect(
                try await count(
                    conn,
                    """
                    SELECT sum(removed)::int FROM dispatch_policy.prune('7 days', '1 hour', now() + interval '8 days', policies => '{other}')
                    WHERE what <> 'stat_deltas'
                    """) == 0)
            let removed = try await conn.rows(
                "SELECT what, removed FROM dispatch_policy.prune('7 days', '1 hour', now() + interval '8 days')", logger: TestServer.logger
            ).reduce(into: [String: Int]()) { removed, row in
                let (what, n) = try row.decode((String, Int).self)
                removed[what] = n
            }
            #expect(removed["removed_gate_buckets"] == 2)
            #expect(removed["idle_counters"] == 1)
            #expect(removed["completed_jobs"] == 2)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.throttle_buckets") == 0)
        }
    }
}

@Suite("Templates: Swift and SQL agree", .timeLimit(.minutes(15)))
struct TemplateParityTests {
    @Test("a partition rendered by the tick runner equals the one the SQL views render")
    func parity() async throws {
        try await withTestDatabase { conn, _ in
            let contexts = [
                #"{"a": "plain", "n": 42, "f": 1.50, "big": 1e3, "t": true, "o": {"k": [1, 2]}, "s": "x\"y"}"#,
                #"{"a": null}"#, "{}",
            ]
            let templates = ["{a}", "{n}:{f}", "{big}", "t={t}/{o}", "{s}{missing}", "plain"]
            for context in contexts {
                let text = try await conn.scalar("SELECT \(context)::jsonb::text", as: String.self)
                let strings = try #require(ContextStrings.parse(text))
                for template in templates {
                    let sql = try await conn.scalar(
                        "SELECT dispatch_policy._render_template(\(template), \(context)::jsonb)", as: String.self)
                    #expect(Template.render(template, context: strings) == sql, "\(template) with \(context)")
                }
            }
        }
    }
}

/// Passes every statement to a connection and keeps its text: a statement
/// is a round trip.
final class CountingExecutor: SQLExecutor {
    let base: PostgresConnection
    private let seen = Mutex<[String]>([])
    init(_ base: PostgresConnection) { self.base = base }
    var statements: [String] { seen.withLock { $0 } }
    func reset() { seen.withLock { $0 = [] } }
    func run(_ query: PostgresQuery, logger: Logger) async throws -> PostgresRowSequence {
        seen.withLock { $0.append(query.sql) }
        return try await base.run(query, logger: logger)
    }
    func withSession<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        try await body(base)
    }
}

/// Advisory locks this session holds, its statement_timeout and its idle_session_timeout.
private func sessionState(_ conn: PostgresConnection) async throws -> SessionState {
    let (locks, timeout, idle) = try #require(
        try await conn.rows(
            """
            SELECT (SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
                   current_setting('statement_timeout'), current_setting('idle_session_timeout')
            """, logger: TestServer.logger
        ).first
    ).decode((Int, String, String).self)
    return SessionState(locks: locks, timeout: timeout, idle: idle)
}

private struct SessionState: Equatable {
    var locks: Int
    var timeout: String
    var idle: String
}

@Suite("Tick: three round trips in autocommit", .timeLimit(.minutes(15)))
struct TickCallTests {
    @Test("a tick that admits is three statements and one with nothing to do is one; no lock or setting outlives it")
    func roundTrips() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig {
                    Gate.throttle(rate: 100, per: 1, partitionBy: "{acct}")
                    Gate.concurrency(max: 3, partitionBy: "{acct}")
                })
            try await stage(conn, "p", 10) { ["acct": $0 % 2 == 0 ? "a" : "b"] }
            let before = try await sessionState(conn)
            let counting = CountingExecutor(conn)
            var settings = TickSettings()
            // Generous: the test counts statements, and CI's load once made
            // one of them miss 7 s.
            settings.timeout = .seconds(60)
            let ticker = Ticker(connection: conn, session: counting, settings: settings, logger: TestServer.logger)
            let busy = try await ticker.tick(policy: "p", reap: false)
            #expect(busy.admitted == 6)
            #expect(counting.statements.count == 3, "\(counting.statements.map { $0.prefix(60) })")
            #expect(!counting.statements.contains { $0.contains("BEGIN") || $0.contains("COMMIT") })
            #expect(try await sessionState(conn) == before)

            // Nothing eligible (both partitions at their cap, lanes blocked).
            counting.reset()
            let idle = try await ticker.tick(policy: "p", reap: false)
            #expect(idle.admitted == 0)
            #expect(counting.statements.count == 1, "\(counting.statements.map { $0.prefix(60) })")
            #expect(try await sessionState(conn) == before)
            try await expectCountersConsistent(conn)
        }
    }

    @Test("a tick that fails gives its lock and statement_timeout back, keeps its observations, and admits nothing")
    func failedTick() async throws {
        try await withTestDatabase { conn, settings in
            try await conn.exec(
                """
                CREATE TABLE public.target_down (down boolean NOT NULL);
                """)
            try await conn.exec("INSERT INTO public.target_down VALUES (true)")
            try await conn.exec(
                """
                CREATE FUNCTION public.hand(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE plpgsql AS $$
                BEGIN IF (SELECT down FROM public.target_down) THEN RAISE EXCEPTION 'target down'; END IF; END $$
                """)
            try await declare(
                conn, "p",
                PolicyConfig(target: .sql(function: "public.hand")) {
                    Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 2, targetLagMs: 60_000)
                })
            try await stage(conn, "p", 3) { _ in ["acct": "a"] }
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.observations (policy, gate, partition, job_id, lag_ms, success)
                SELECT 'p', 'adaptive_concurrency', 'a', 0, 5, true FROM generate_series(1, 4)
                """)
            let before = try await sessionState(conn)
            var tickSettings = TickSettings()
            tickSettings.timeout = .seconds(60)
            let ticker = Ticker(connection: conn, settings: tickSettings, logger: TestServer.logger)
            await #expect(throws: DispatchPolicyError.self) { try await ticker.tick(policy: "p", reap: false) }
            #expect(try await sessionState(conn) == before)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.observations") == 4)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.admitted_jobs") == 0)
            // (tick_state may have created the partition's initial state.)
            #expect(try await count(conn, "SELECT coalesce(sum(observations), 0)::int FROM dispatch_policy.adaptive_stats") == 0)
            // Another session can tick the policy: nothing is held.
            try await TestServer.withConnection(settings) { other async throws in
                try await other.exec("UPDATE public.target_down SET down = false")
                let result = try await Ticker(connection: other, logger: TestServer.logger).tick(policy: "p", reap: false)
                #expect(result.outcome == .ran && result.admitted == 2 && result.observationsFolded == 4)
            }
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.observations") == 0)
            #expect(try await count(conn, "SELECT sum(completions) FROM dispatch_policy.observation_minutes") == 4)
            try await expectCountersConsistent(conn)
        }
    }

    @Test(
        "tick_finish without tick_begin in the session, or a second tick_begin, is 55000 and changes nothing; tick_abort is safe to repeat")
    func misuse() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "p", PolicyConfig())
            try await stage(conn, "p", 2)
            let ids = try await conn.rows("SELECT id FROM dispatch_policy.staged_jobs ORDER BY id", logger: TestServer.logger)
                .map { try $0.decode(Int64.self) }
            let finish: PostgresQuery = "SELECT dispatch_policy.tick_finish('p', now(), \(ids)::bigint[], '{}', '{}', '{}', '{}', '{}')"
            await #expect(throws: DispatchPolicyError.self) { try await conn.exec(finish) }
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.admitted_jobs") == 0)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.tick_begin('p', 10, NULL) WHERE kind = 'job'") == 2)
            await #expect(throws: DispatchPolicyError.self) {
                try await conn.exec("SELECT * FROM dispatch_policy.tick_begin('p', 10, NULL)")
            }
            // The lock is this session's: another session is turned away, and
            // cannot finish this session's tick.
            try await TestServer.withConnection(settings) { other async throws in
                #expect(try await other.scalar("SELECT kind FROM dispatch_policy.tick_begin('p', 10, NULL)", as: String.self) == "busy")
                await #expect(throws: DispatchPolicyError.self) { try await other.exec(finish) }
            }
            // Aborting another policy's tick leaves this one's alone.
            #expect(try await !conn.scalar("SELECT dispatch_policy.tick_abort('q')", as: Bool.self))
            #expect(try await sessionState(conn).locks == 1)
            #expect(try await conn.scalar("SELECT dispatch_policy.tick_abort('p')", as: Bool.self))
            #expect(try await !conn.scalar("SELECT dispatch_policy.tick_abort('p')", as: Bool.self))
            #expect(try await sessionState(conn).locks == 0)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.staged_jobs") == 2)

            // A tick_begin rolled back with its transaction keeps the lock
            // (not transactional): the next tick_begin says so instead of
            // stacking a level tick_finish would never give back.
            try await conn.exec("BEGIN")
            _ = try await conn.rows("SELECT * FROM dispatch_policy.tick_begin('p', 10, NULL)", logger: TestServer.logger)
            try await conn.exec("ROLLBACK")
            #expect(try await sessionState(conn).locks == 1)
            await #expect(throws: DispatchPolicyError.self) {
                try await conn.exec("SELECT * FROM dispatch_policy.tick_begin('p', 10, NULL)")
            }
            #expect(try await conn.scalar("SELECT dispatch_policy.tick_abort('p')", as: Bool.self))
            #expect(try await sessionState(conn).locks == 0)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.tick_begin('p', 10, NULL) WHERE kind = 'job'") == 2)
            #expect(try await conn.scalar("SELECT dispatch_policy.tick_abort('p')", as: Bool.self))
        }
    }

    /// Found by a hostile pass: tick_finish gave the session lock back in its
    /// body, before its transaction committed; a runner that got in between
    /// read the counters (and observations) from before it and admitted past
    /// the cap (observations were folded twice).
    @Test("another runner cannot tick the policy until a tick's admission is committed")
    func lockHeldUntilCommit() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "p", PolicyConfig { Gate.concurrency(max: 2, partitionBy: "{acct}") })
            try await stage(conn, "p", 6) { _ in ["acct": "a"] }
            // A commit that takes 5 s a row, in the sessions that ask for it
            // (room for the second tick on a loaded machine).
            try await conn.exec(
                """
                CREATE FUNCTION public.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$
                """)
            try await conn.exec(
                """
                CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON dispatch_policy.admitted_jobs
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                WHEN (current_setting('test.slow_commit', true) = 'on') EXECUTE FUNCTION public.slow_commit()
                """)
            try await TestServer.withConnection(settings) { slow async throws in
                try await slow.exec("SET test.slow_commit = on")
                let first = Task { try await Ticker(connection: slow, logger: TestServer.logger).tick(policy: "p", reap: false) }
                #expect(
                    try await waitUntil(20) {
                        try await conn.scalar(
                            """
                            SELECT count(*)::int FROM pg_stat_activity
                            WHERE datname = current_database() AND wait_event = 'PgSleep' AND query LIKE '%tick_finish(%'
                            """, as: Int.self) == 1
                    }, "the first tick never reached its slow commit")
                let second = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p", reap: false)
                #expect(second.outcome == .busy)
                #expect(try await first.value.admitted == 2)
            }
            #expect(try await count(conn, "SELECT in_flight FROM dispatch_policy.inflight_counters WHERE partition = 'a'") == 2)
            #expect(try await tick(conn, "p").admitted == 0)
            #expect(try await count(conn, "SELECT count(*) FROM dispatch_policy.admitted_jobs") == 2)
            try await expectCountersConsistent(conn)
        }
    }

    /// Found by a hostile pass: a runner frozen between the calls (SIGSTOP,
    /// a partition) is idle, not idle in a transaction, so nothing ended its
    /// session and the policy stayed locked for every other runner.
    @Test("a session that stops answering in the middle of a tick is ended by the server, and the lock with it")
    func frozenSession() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "p", PolicyConfig())
            try await stage(conn, "p", 1)
            let before = try await sessionState(conn)
            // A query on a connection the server ended may never return
            // (postgres-nio#487): the frozen session is watched from outside.
            let frozen = try await settings.connect(logger: TestServer.logger)
            defer { _ = Task { _ = try? await untilDeadline(.now + .seconds(2)) { try await frozen.close() } } }
            let pid = try await frozen.scalar("SELECT pg_backend_pid()", as: Int32.self)
            #expect(
                try await frozen.scalar("SELECT count(*)::int FROM dispatch_policy.tick_begin('p', 10, NULL, 100, 5000) WHERE kind = 'job'")
                    == 1)
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p", reap: false).outcome == .busy)
            // Idle for more than the tick's 5 s: the server ends the session.
            #expect(
                try await waitUntil(20) {
                    try await conn.scalar("SELECT count(*)::int FROM pg_stat_activity WHERE pid = \(pid)", as: Int.self) == 0
                }, "the frozen session was not ended")
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p", reap: false).admitted == 1)
            // A tick that ends restores the setting.
            #expect(try await sessionState(conn) == before)
        }
    }

    @Test("pause waits for a tick under way, so nothing is admitted after it returns")
    func pauseWaitsForTick() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "p", PolicyConfig())
            try await stage(conn, "p", 2)
            let ids = try await conn.rows(
                "SELECT id FROM dispatch_policy.tick_begin('p', 10, NULL) WHERE kind = 'job'", logger: TestServer.logger
            )
            .map { try $0.decode(Int64.self) }
            #expect(ids.count == 2)
            let paused = Mutex(false)
            let pausing = Task {
                try await TestServer.withConnection(settings) { other async throws in
                    try await other.exec("SELECT dispatch_policy.pause('p')")
                    paused.withLock { $0 = true }
                }
            }
            try await Task.sleep(for: .milliseconds(500))
            #expect(!paused.withLock { $0 }, "pause returned while a tick was admitting")
            let admitted = try await conn.scalar(
                """
                SELECT dispatch_policy.tick_finish('p', now(), \(ids)::bigint[], '{}', '{}', '{}', '{}', '{}')
                """, as: Int.self)
            #expect(admitted == 2)
            try await pausing.value
            #expect(paused.withLock { $0 })
            try await stage(conn, "p", 1)
            #expect(try await tick(conn, "p").outcome == .paused)
        }
    }
}
