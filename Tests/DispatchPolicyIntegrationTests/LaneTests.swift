import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import Testing

private func declare(_ conn: PostgresConnection, _ name: String, _ config: PolicyConfig) async throws {
    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: try config.json())
}

private func tick(_ conn: PostgresConnection, _ policy: String) async throws -> TickResult {
    try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: policy)
}

/// Pending jobs the round-robin fetch cannot reach: eligible, with no lane.
private func jobsWithoutLane(_ conn: PostgresConnection) async throws -> Int {
    try await conn.scalar(
        """
        SELECT count(*)::int FROM dispatch_policy.staged_jobs s
        WHERE s.not_before IS NULL
          AND NOT EXISTS (SELECT 1 FROM dispatch_policy.lanes l WHERE l.policy = s.policy
                          AND l.lane IS NOT DISTINCT FROM s.round_robin_key)
        """)
}

/// No head-of-line blocking: partitions known to be blocked take no batch
/// slot, and a policy without round_robin_by still reaches every partition.
@Suite("Lanes: no head-of-line blocking", .timeLimit(.minutes(15)))
struct LaneTests {
    /// The README's first example: a throttle per endpoint, no round_robin_by.
    /// Before lanes, the fetch took the oldest jobs: 2,000 of the throttled
    /// endpoint filled every batch and the other endpoint's job waited for
    /// them all (about 24 minutes at that endpoint's rate).
    @Test("a job of a free partition is admitted in the first tick behind 2,000 jobs of a throttled one")
    func freePartitionBehindThrottledBacklog() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "webhooks",
                PolicyConfig(batchSize: 100) {
                    Gate.throttle(rate: 1, per: 60, burst: 1, partitionBy: "{endpoint}")
                })
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('webhooks', (SELECT jsonb_agg(jsonb_build_object(
                  'args', i, 'context', jsonb_build_object('endpoint', 'slow.example')))
                  FROM generate_series(1, 2000) i))
                """)
            try await conn.exec(#"SELECT dispatch_policy.stage('webhooks', '"fast"', '{"endpoint": "fast.example"}')"#)
            let first = try await tick(conn, "webhooks")
            #expect(first.admitted == 2)  // one token each
            #expect(try await conn.scalar(#"SELECT count(*)::int FROM dispatch_policy.admitted_jobs WHERE args = '"fast"'"#) == 1)
            // The slow endpoint's bucket is empty now: its lane waits for the
            // next token, and the next tick fetches nothing of it.
            #expect(first.lanesBlocked == 1)
            #expect(
                try await conn.scalar(
                    "SELECT blocked_until > now() AND blocked_gate IS NULL FROM dispatch_policy.lanes WHERE lane = 'slow.example'",
                    as: Bool.self))
            #expect(try await tick(conn, "webhooks").fetched == 0)
        }
    }

    /// O(batch): finding the one ready lane among 100,000 blocked ones reads
    /// a bounded number of rows, counted in this transaction's statistics.
    @Test("100,000 blocked partitions and one free one: the free one is admitted in the first tick, reading O(batch) rows")
    func oneFreeAmongManyBlocked() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                PolicyConfig(batchSize: 50) {
                    Gate.throttle(rate: 1, per: 3600, burst: 1, partitionBy: "{tenant}")
                })
            // 100,000 tenants, each blocked (an empty bucket, its lane blocked
            // for the hour its next token takes), staged first; one free tenant last.
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object(
                  'args', i, 'context', jsonb_build_object('tenant', 't' || lpad(i::text, 6, '0'))))
                  FROM generate_series(1, 100000) i))
                """)
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.throttle_buckets (policy, gate, partition, tokens, rate, per_seconds, burst, refilled_at)
                SELECT 'p', 'throttle', lane, 0, 1, 3600, 1, now() FROM dispatch_policy.lanes WHERE policy = 'p'
                """)
            try await conn.exec("UPDATE dispatch_policy.lanes SET blocked_until = now() + interval '1 hour' WHERE policy = 'p'")
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '"free"', '{"tenant": "zzz"}')"#)
            try await conn.exec("ANALYZE dispatch_policy.staged_jobs")
            try await conn.exec("ANALYZE dispatch_policy.lanes")

            // What the fetch reads, in its own transaction's statistics.
            try await conn.exec("BEGIN")
            let fetched = try await conn.rows(
                "SELECT id FROM dispatch_policy.fetch_batch('p', 50, 50, now())", logger: TestServer.logger
            ).count
            let read = try await conn.scalar(
                """
                SELECT (coalesce(sum(seq_tup_read), 0) + coalesce(sum(idx_tup_fetch), 0))::int FROM pg_stat_xact_user_tables
                WHERE schemaname = 'dispatch_policy' AND relname IN ('staged_jobs', 'lanes')
                """, as: Int.self)
            try await conn.exec("ROLLBACK")
            #expect(fetched == 1)
            #expect(read < 500, "the fetch read \(read) rows to find one ready lane among 100,000 blocked")

            let result = try await tick(conn, "p")
            #expect(result.admitted == 1)
            #expect(try await conn.scalar(#"SELECT count(*)::int FROM dispatch_policy.admitted_jobs WHERE args = '"free"'"#) == 1)
        }
    }

    /// A lane waiting for a slot of its partition is blocked until a slot is
    /// released, then ready at once; and a slot released between the state
    /// read and the block (the race tick_finish guards) leaves it ready.
    @Test("a lane at its concurrency cap is blocked until complete() releases a slot, never past it")
    func blockedUntilReleased() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig { Gate.concurrency(max: 1, partitionBy: "{tenant}") })
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('tenant', 'a')))
                                                         FROM generate_series(1, 3) i))
                """)
            let first = try await tick(conn, "p")
            #expect(first.admitted == 1)
            // The other two found the cap full: the lane waits for a release.
            #expect(first.lanesBlocked == 1)
            #expect(
                try await conn.scalar(
                    "SELECT blocked_until = 'infinity' AND blocked_gate = 'concurrency' AND blocked_partition = 'a' FROM dispatch_policy.lanes WHERE lane = 'a'",
                    as: Bool.self))
            #expect(try await tick(conn, "p").fetched == 0)
            try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
            #expect(try await conn.scalar("SELECT blocked_until IS NULL FROM dispatch_policy.lanes WHERE lane = 'a'", as: Bool.self))
            #expect(try await tick(conn, "p").admitted == 1)

            // The decision saw 1 in flight; a slot was released before the
            // block was written: the lane must stay ready.
            try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.tick_begin('p', 10, NULL) WHERE kind = 'job'") == 1)
            _ = try await conn.scalar(
                """
                SELECT dispatch_policy.tick_finish('p', now(), '{}', '{}', '{}', '{}', '{}', '{}',
                  block_lanes => '{a}', block_keyless => '{f}', block_seconds => '{Infinity}',
                  block_gates => '{concurrency}', block_partitions => '{a}', block_in_flight => '{1}')
                """, as: Int.self)
            #expect(try await conn.scalar("SELECT blocked_until IS NULL FROM dispatch_policy.lanes WHERE lane = 'a'", as: Bool.self))
            #expect(try await tick(conn, "p").admitted == 1)
            try await expectCountersConsistent(conn)
        }
    }

    /// Found by the bench: sync_lanes probed each next key with "key IS NULL
    /// OR round_robin_key > key", which no index bound serves, so every probe
    /// read from the first key (quadratic: minutes at 10,000 lanes, before a
    /// new runner's first tick).
    @Test("sync_lanes finds the lanes of jobs written directly with about one row read per lane")
    func syncLanesIsLinear() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig(roundRobinBy: "{t}"))
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context, round_robin_key)
                SELECT nextval('dispatch_policy.job_ids'), 'p', 'default', to_jsonb(i), '{}', 'k' || lpad((i % 2000)::text, 4, '0')
                FROM generate_series(1, 4000) i
                """)
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.lanes") == 0)
            try await conn.exec("ANALYZE dispatch_policy.staged_jobs")
            try await conn.exec("BEGIN")
            #expect(try await conn.scalar("SELECT dispatch_policy.sync_lanes()", as: Int.self) == 2000)
            let read = try await conn.scalar(
                """
                SELECT (coalesce(sum(seq_tup_read), 0) + coalesce(sum(idx_tup_fetch), 0))::int FROM pg_stat_xact_user_tables
                WHERE schemaname = 'dispatch_policy' AND relname = 'staged_jobs'
                """, as: Int.self)
            try await conn.exec("COMMIT")
            #expect(read < 10_000, "sync_lanes read \(read) rows of staged_jobs for 2,000 lanes")
            #expect(try await jobsWithoutLane(conn) == 0)
        }
    }

    /// Jobs made eligible other than by stage() get lanes: by promotion, by
    /// an UPDATE, and (written directly) by sync_lanes.
    @Test("jobs made eligible by promotion, by hand, or written directly are reached")
    func everyEligibleJobHasALane() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig(roundRobinBy: "{t}"))
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '1', '{"t": "a"}', not_before => now() + interval '1 hour')"#)
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.lanes") == 0)
            try await conn.exec("UPDATE dispatch_policy.staged_jobs SET not_before = NULL")
            #expect(try await jobsWithoutLane(conn) == 0)
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context, round_robin_key)
                VALUES (nextval('dispatch_policy.job_ids'), 'p', 'default', '2', '{}', 'b'),
                       (nextval('dispatch_policy.job_ids'), 'p', 'default', '3', '{}', NULL)
                """)
            #expect(try await jobsWithoutLane(conn) == 2)
            #expect(try await conn.scalar("SELECT dispatch_policy.sync_lanes()", as: Int.self) == 2)
            #expect(try await jobsWithoutLane(conn) == 0)
            #expect(try await tick(conn, "p").admitted == 3)
            // Admission deleted the lanes it emptied: no work left.
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.lanes") == 0)
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).policiesWithWork().allSatisfy { !$0.hasWork })
        }
    }

    /// Stagers racing the fetch that deletes empty lanes never leave a job
    /// without a lane: each round, lanes are drained empty while stagers add
    /// jobs to them.
    @Test("stagers racing the deletion of empty lanes never strand a job")
    func stagingRacesLaneDeletion() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "p", PolicyConfig(roundRobinBy: "{t}", batchSize: 50))
            for _ in 0..<15 {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for stager in 0..<3 {
                        group.addTask {
                            try await TestServer.withConnection(settings) { c in
                                for i in 0..<20 {
                                    try await c.exec(
                                        "SELECT dispatch_policy.stage('p', to_jsonb(\(i)), jsonb_build_object('t', 'k' || \(i % 4 + stager)))"
                                    )
                                }
                            }
                        }
                    }
                    group.addTask {
                        try await TestServer.withConnection(settings) { c in
                            for _ in 0..<20 { _ = try await Ticker(connection: c, logger: TestServer.logger).tick(policy: "p") }
                        }
                    }
                    try await group.waitForAll()
                }
                #expect(try await jobsWithoutLane(conn) == 0)
            }
            // Lanes found empty while a stager was in flight are passed over for
            // a second, then fetched again.
            let drained = try await waitUntil(60) {
                _ = try await tick(conn, "p")
                return try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.staged_jobs", as: Int.self) == 0
            }
            #expect(drained)
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs") == 15 * 60)
        }
    }

    /// Found by hostile testing: while any stager was in flight, empty lanes
    /// were never deleted, and once there were more of them than a batch the
    /// fetch saw nothing else.
    @Test("empty lanes a stager keeps from being deleted are passed over, not fetched forever")
    func emptyLanesUnderStaging() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "p", PolicyConfig(roundRobinBy: "{t}", batchSize: 20))
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('t', 'a' || lpad(i::text, 3, '0'))))
                                                         FROM generate_series(1, 100) i))
                """)
            try await TestServer.withConnection(settings) { stager in
                // A stager's open transaction holds the lanes lock shared.
                try await stager.exec("BEGIN")
                try await stager.exec(#"SELECT dispatch_policy.stage('p', '"hot"', '{"t": "hot"}')"#)
                for _ in 0..<5 { _ = try await tick(conn, "p") }
                // The 100 lanes are empty now, and blocked for a second each time
                // a tick finds them so: a new ready lane is reached within the
                // few ticks it takes to pass them all, not never.
                try await conn.exec(#"SELECT dispatch_policy.stage('p', '"late"', '{"t": "zzz"}')"#)
                var ticks = 0
                while try await conn.scalar(#"SELECT count(*)::int FROM dispatch_policy.admitted_jobs WHERE args = '"late"'"#, as: Int.self)
                    == 0,
                    ticks < 20
                {
                    _ = try await tick(conn, "p")
                    ticks += 1
                }
                #expect(ticks <= 6, "the new lane waited \(ticks) ticks behind 100 empty lanes")
                try await stager.exec("COMMIT")
            }
            // The staged job of the empty-looking lane is admitted when its second is up.
            let drained = try await waitUntil(60) {
                _ = try await tick(conn, "p")
                return try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.staged_jobs", as: Int.self) == 0
            }
            #expect(drained)
        }
    }

    /// Found by hostile testing: a fetch cancelled while it deleted empty
    /// lanes kept the lanes lock (a session lock), and every stager of the
    /// policy then waited for it.
    @Test("a cancelled fetch gives the lanes lock back")
    func cancelledFetchUnlocks() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "p", PolicyConfig(roundRobinBy: "{t}"))
            try await conn.exec("INSERT INTO dispatch_policy.lanes (policy, lane) VALUES ('p', 'ghost')")
            try await TestServer.withConnection(settings) { holder in
                try await holder.exec("BEGIN")
                try await holder.exec("SELECT 1 FROM dispatch_policy.lanes WHERE lane = 'ghost' FOR UPDATE")
                try await conn.exec("SET statement_timeout = '300ms'")
                await #expect(throws: (any Error).self) {
                    try await conn.exec("SELECT count(*) FROM dispatch_policy.fetch_batch('p', 10, 5)")
                }
                try await conn.exec("RESET statement_timeout")
                try await holder.exec("ROLLBACK")
            }
            #expect(
                try await conn.scalar(
                    "SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()") == 0)
        }
    }

    /// Found by hostile testing: blocks that nothing would ever lift.
    @Test("no block outlives its cause: a tiny rate, a job's own cap of 0, a repaired counter, a redeclared or re-created policy")
    func blocksEnd() async throws {
        try await withTestDatabase { conn, _ in
            // One token a year: the block is capped (a timestamp overflowed), the tick works.
            try await declare(
                conn, "yearly",
                PolicyConfig {
                    Gate.throttle(rate: 0.000001, per: 31_536_000, partitionBy: "{t}")
                })
            try await conn.exec(#"SELECT dispatch_policy.stage('yearly', '1', '{"t": "a"}') FROM generate_series(1, 2)"#)
            try await conn.exec(#"SELECT dispatch_policy.stage('yearly', '1', '{"t": "b"}')"#)
            #expect(try await tick(conn, "yearly").admitted == 2)
            #expect(
                try await conn.scalar(
                    "SELECT blocked_until BETWEEN now() + interval '29 days' AND now() + interval '31 days' FROM dispatch_policy.lanes WHERE lane = 'a'",
                    as: Bool.self))

            // A job whose own cap is 0 holds no slot: its lane is looked at again, not parked.
            try await declare(conn, "own", PolicyConfig { Gate.concurrency(max: .context("max", default: 5), partitionBy: "{t}") })
            try await conn.exec(#"SELECT dispatch_policy.stage('own', '1', '{"t": "a", "max": 0}')"#)
            _ = try await tick(conn, "own")
            #expect(
                try await conn.scalar(
                    "SELECT blocked_until < now() + interval '2 seconds' FROM dispatch_policy.lanes WHERE policy = 'own'", as: Bool.self))

            // A counter corrected by hand (or by repair()) unblocks its lanes.
            try await declare(conn, "drift", PolicyConfig { Gate.concurrency(max: 1, partitionBy: "{t}") })
            try await conn.exec(#"SELECT dispatch_policy.stage('drift', '1', '{"t": "a"}') FROM generate_series(1, 2)"#)
            #expect(try await tick(conn, "drift").admitted == 1)
            #expect(
                try await conn.scalar("SELECT blocked_until = 'infinity' FROM dispatch_policy.lanes WHERE policy = 'drift'", as: Bool.self))
            try await conn.exec("DELETE FROM dispatch_policy.admitted_jobs WHERE policy = 'drift'")
            try await conn.exec("SELECT * FROM dispatch_policy.repair()")
            #expect(try await tick(conn, "drift").admitted == 1)

            // Deleted and declared again: the old lanes go with the policy.
            try await conn.exec("DELETE FROM dispatch_policy.admitted_jobs WHERE policy = 'drift'")
            try await conn.exec("DELETE FROM dispatch_policy.inflight_counters WHERE policy = 'drift'")
            try await conn.exec("DELETE FROM dispatch_policy.policies WHERE name = 'drift'")
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.lanes WHERE policy = 'drift'") == 0)
        }
    }

    /// Found by hostile testing: jobs staged before a policy had partitioned
    /// gates sat in one keyless lane, behind whichever partition was blocked.
    @Test("jobs pending without a key get their partition's lane when the policy gains partitioned gates")
    func redeclareKeysPendingJobs() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig(batchSize: 50))
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '"a"', '{"tenant": "A"}') FROM generate_series(1, 100)"#)
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '"b"', '{"tenant": "B"}')"#)
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.staged_jobs WHERE round_robin_key IS NULL") == 101)
            try await declare(
                conn, "p",
                PolicyConfig(batchSize: 50, roundRobinQuantum: 10) {
                    Gate.throttle(rate: 1, per: 60, partitionBy: "{tenant}")
                })
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.staged_jobs WHERE round_robin_key IS NULL") == 0)
            #expect(try await tick(conn, "p").admitted == 2)
            #expect(try await conn.scalar(#"SELECT count(*)::int FROM dispatch_policy.admitted_jobs WHERE args = '"b"'"#) == 1)
        }
    }

    /// The issue's measurement: 20 tenants × 200 jobs throttled 5/s each,
    /// 4 runners. Before lanes only the first 3 tenants were ever admitted.
    @Test("20 throttled tenants, 4 runners: every tenant comes back for its tokens, none over its rate")
    func everyTenantAdvances() async throws { try await LiveTests.exclusive { try await everyTenantAdvancesLive() } }

    func everyTenantAdvancesLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await declare(conn, "p", PolicyConfig { Gate.throttle(rate: 5, per: 1, burst: 1, partitionBy: "{tenant}") })
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('tenant', 't' || (i / 200))))
                                                         FROM generate_series(0, 3999) i))
                """)
        }
        var options = TickRunnerOptions()
        options.idlePause = .seconds(30)
        options.busyPause = .seconds(30)
        let started = ContinuousClock.now
        let services = DetachedServices((0..<4).map { _ in TickRunner(connection: settings, options: options, logger: TestServer.logger) })
        // Every tenant past its burst: each lane comes back for its tokens.
        let everyone = try await waitUntil(120) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar(
                    """
                    SELECT count(*)::int FROM (SELECT FROM dispatch_policy.admitted_jobs
                                               GROUP BY context ->> 'tenant' HAVING count(*) >= 3) t
                    """, as: Int.self) == 20
            }
        }
        await services.shutDown()
        let elapsed = ContinuousClock.now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        try await TestServer.withConnection(settings) { conn async throws in
            let perTenant = try await conn.rows(
                "SELECT count(*)::int FROM dispatch_policy.admitted_jobs GROUP BY context ->> 'tenant'", logger: TestServer.logger
            ).map { try $0.decode(Int.self) }
            #expect(everyone, "not every tenant came back for its tokens in \(seconds) s: \(perTenant.sorted())")
            #expect(perTenant.count == 20)
            // None beyond its bound.
            #expect(perTenant.allSatisfy { Double($0) <= 1 + 5 * seconds + 1e-9 })
        }
    }
}
