import Foundation
import PostgresNIO
import Testing

@testable import DispatchPolicy

/// The findings of `dispatch_policy.check()`, as "finding policy/gate/partition" lines.
func checkFindings(_ conn: PostgresConnection) async throws -> [String] {
    try await conn.rows(
        #"SELECT finding || ' ' || coalesce(policy, '-') || '/' || coalesce(gate, '-') || '/' || coalesce(partition_key, '-') FROM dispatch_policy."check"()"#,
        logger: TestServer.logger
    ).map { try $0.decode(String.self) }
}

@Suite("Reconciliation: check and repair", .timeLimit(.minutes(15)))
struct CheckTests {
    /// pg_regress (sql/test/sql/check.sql) corrupts the state one way at a
    /// time; this drives the CLI over a database the runner and a worker
    /// really used, then broke by hand.
    @Test("dispatch-policy check lists what is wrong and exits 1; --repair fixes it in one go and prints each change")
    func checkAndRepairCLI() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p",
                config: try PolicyConfig {
                    Gate.concurrency(max: 2, partitionBy: "{t}")
                    Gate.throttle(rate: 5, per: 1, burst: 5, partitionBy: "{t}")
                }.json())
            try await conn.exec(
                "SELECT dispatch_policy.stage('p', to_jsonb(i), jsonb_build_object('t', i % 2), dedupe_key => 'k' || i) FROM generate_series(1, 6) i"
            )
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            _ = try await conn.rows(
                "SELECT dispatch_policy.complete(id) FROM dispatch_policy.claim('default', 'w', 1)", logger: TestServer.logger)
            #expect(try await checkFindings(conn) == [], "a state only the product wrote must be consistent")
        }
        let clean = try await cli(["check"], settings: settings)
        #expect(clean.status == 0, "\(clean.stderr)")
        #expect(clean.stdout.contains("consistent: no findings"))

        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.exec("UPDATE dispatch_policy.inflight_counters SET in_flight = in_flight + 1 WHERE partition = '1'")
            try await conn.exec(
                "UPDATE dispatch_policy.throttle_buckets SET burst = 50, tokens = 50, refilled_at = now() WHERE partition = '0'")
            // A finished job whose dedupe key was left behind.
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
                SELECT policy, 'left-behind', id FROM dispatch_policy.finished_jobs LIMIT 1
                """)
        }
        let broken = try await cli(["check"], settings: settings)
        #expect(broken.status == 1)
        for finding in ["counter_mismatch", "bucket_over_burst", "dedupe_key_of_finished_job"] {
            #expect(broken.stdout.contains(finding), "\(broken.stdout)")
        }
        #expect(broken.stdout.contains("3 findings"), "\(broken.stdout)")

        let repaired = try await cli(["check", "--repair"], settings: settings)
        #expect(repaired.status == 0, "\(repaired.stdout)\(repaired.stderr)")
        #expect(repaired.stdout.contains("set in_flight from"), "\(repaired.stdout)")
        #expect(repaired.stdout.contains("3 changes made"), "\(repaired.stdout)")
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await checkFindings(conn) == [])
            try await expectCountersConsistent(conn)
            #expect(
                try await conn.scalar(
                    "SELECT count(*)::int FROM dispatch_policy.dedupe_keys WHERE dedupe_key = 'left-behind'", as: Int.self) == 0)
            // Nothing a user staged was lost.
            #expect(
                try await conn.scalar(
                    """
                    SELECT (SELECT count(*) FROM dispatch_policy.staged_jobs) + (SELECT count(*) FROM dispatch_policy.admitted_jobs)
                         + (SELECT count(*) FROM dispatch_policy.finished_jobs)
                    """, as: Int.self) == 6)
        }
        let again = try await cli(["check", "--repair"], settings: settings)
        #expect(again.status == 0)
        #expect(again.stdout.contains("nothing to repair"), "\(again.stdout)")
    }

    /// Found by hostile testing: repair waited without limit for a policy's
    /// tick lock while holding the locks of the policies before it.
    @Test("check --repair gives up when its locks are not free within --lock-timeout, and changes nothing")
    func repairLockTimeout() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
            try await conn.exec(
                "INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight) VALUES ('p', 'gone', 'x', 1)")
            // A tick of p in progress: its lock held.
            try await conn.exec("BEGIN")
            #expect(try await conn.scalar("SELECT dispatch_policy.try_lock_policy('p')", as: Bool.self))
            let started = ContinuousClock.now
            let repair = try await cli(["check", "--repair", "--lock-timeout", "1s"], settings: settings)
            #expect(ContinuousClock.now - started < .seconds(20))
            #expect(repair.status == 1)
            #expect(repair.stderr.contains("55P03") && repair.stderr.contains("could not take its locks within 1s"), "\(repair.stderr)")
            try await conn.exec("COMMIT")
            #expect(try await checkFindings(conn).count == 1, "a repair that gave up changed something")
        }
    }
}
