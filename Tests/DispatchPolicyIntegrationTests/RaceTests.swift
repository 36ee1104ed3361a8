import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import Testing

@Suite("Admission: a killed runner", .timeLimit(.minutes(15)))
struct RaceTests {
    @Test("a runner killed mid-tick (SIGKILL) loses no job and leaks no slot")
    func killedRunner() async throws { try await LiveTests.exclusive { try await killedRunnerLive() } }

    func killedRunnerLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let jobs = 3000
        try await TestServer.withConnection(settings) { conn in
            let config = PolicyConfig(roundRobinBy: "{acct}", batchSize: 500) {
                Gate.concurrency(max: 200, partitionBy: "{acct}")
                Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 150, targetLagMs: 60_000)
            }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "k", config: try config.json())
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('k', (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('acct', 'a' || (i % 7))))
                                                        FROM generate_series(1, \(jobs)) i))
                """)
        }
        var env = libpqEnvironment(settings)
        env["DATABASE_URL"] = nil
        for round in 0..<4 {
            let child = try await spawnChild(cliPath, ["run", "--busy-pause", "0ms", "--idle-pause", "10ms"], environment: env)
            // Complete jobs meanwhile, one per transaction as a worker does, so
            // slots are released while ticks take them.
            try await TestServer.withConnection(settings) { conn in
                for _ in 0..<(10 + round * 7) {
                    for id in try await conn.rows(
                        "SELECT id FROM dispatch_policy.admitted_jobs ORDER BY random() LIMIT 20", logger: TestServer.logger
                    )
                    .map({ try $0.decode(Int64.self) }) {
                        _ = try await conn.rows("SELECT dispatch_policy.complete(\(id))", logger: TestServer.logger)
                    }
                    try await Task.sleep(for: .milliseconds(15))
                }
            }
            child.signal(SIGKILL)
            let ending = await child.wait()
            #expect(ending == .signaled(SIGKILL), "the runner ended before it was killed: \(child.output().stderr)")
        }
        try await TestServer.withConnection(settings) { conn in
            let total = try await conn.scalar(
                """
                SELECT (SELECT count(*) FROM dispatch_policy.staged_jobs) + (SELECT count(*) FROM dispatch_policy.admitted_jobs)
                     + (SELECT count(*) FROM dispatch_policy.finished_jobs)
                """, as: Int.self)
            #expect(total == jobs)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs", as: Int.self) > 0)
            try await expectCountersConsistent(conn)
            #expect(try await checkFindings(conn) == [])
        }
    }
}

/// Regression (issue 8, item 3): a runner SIGKILLed while the server ran a
/// slow `sql` target kept its session, and the policy's lock, until the
/// target returned (minutes), because nothing made the server look for the
/// client.
@Suite("Sessions of a killed runner", .timeLimit(.minutes(15)))
struct KilledSessionTests {
    @Test("a runner killed during a slow sql target gives its policy lock back within seconds")
    func killedRunnerReleasesLock() async throws { try await LiveTests.exclusive { try await killedRunnerReleasesLockLive() } }

    func killedRunnerReleasesLockLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.exec(
                """
                CREATE FUNCTION public.slow(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE sql AS 'SELECT pg_sleep(60)'
                """)
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(name: "slow", config: try PolicyConfig(target: .sql(function: "public.slow")).json())
            try await conn.exec("SELECT dispatch_policy.stage('slow', '1')")
        }
        let child = try await spawnChild(cliPath, ["run", "--tick-timeout", "5m"], environment: libpqEnvironment(settings))
        let sleeping = try await waitUntil(30) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar(
                    """
                    SELECT count(*)::int FROM pg_stat_activity
                    WHERE datname = current_database() AND state = 'active' AND query LIKE '%dispatch_policy.tick_finish(%'
                      AND pid <> pg_backend_pid() AND now() - query_start > interval '1 second'
                    """, as: Int.self) == 1
            }
        }
        child.signal(SIGKILL)
        _ = await child.wait()
        try #require(sleeping, "the runner never reached the slow target: \(child.output().stderr)")
        let killedAt = ContinuousClock.now
        // The server notices the client is gone at its next check (2 s by
        // default) and ends the statement: the lock comes back. Before, it
        // stayed until the target's 60 s were over.
        let released = try await waitUntil(40) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar(
                    """
                    SELECT count(*)::int FROM pg_stat_activity
                    WHERE datname = current_database() AND query LIKE '%dispatch_policy.tick_finish(%' AND pid <> pg_backend_pid()
                    """, as: Int.self) == 0
            }
        }
        #expect(released)
        #expect(ContinuousClock.now - killedAt < .seconds(30), "the lock came back \(ContinuousClock.now - killedAt) after the kill")
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.staged_jobs", as: Int.self) == 1)
        }
    }
}
