import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import Synchronization
import Testing

private func declare(_ conn: PostgresConnection, _ name: String, _ config: String) async throws {
    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: config)
}

private func admitNow(
    _ conn: PostgresConnection, _ policy: String, gate: String, partition: String, max: Int, wait: Duration = .seconds(10)
) async throws -> TickResult {
    try await Ticker(connection: conn, logger: TestServer.logger).admitNow(
        policy: policy, gate: gate, partition: partition, maxJobs: max, wait: wait)
}

/// Tenants of the admitted jobs, in admission order.
private func admittedTenants(_ conn: PostgresConnection) async throws -> [String] {
    try await conn.rows(
        "SELECT context ->> 'tenant' FROM dispatch_policy.admitted_jobs ORDER BY admitted_at, id", logger: TestServer.logger
    )
    .map { try $0.decode(String.self) }
}

/// Three tenants, jobs interleaved: a0 b0 c0 a1 b1 c1 ...; tenant c's are last
/// in the rotation after a tick that admits one per lane.
private let policy = #"""
    {"round_robin_by": "{tenant}",
     "gates": [{"type": "throttle", "name": "t", "rate": 1, "per": 3600, "burst": 4, "partition_by": "{tenant}"},
               {"type": "concurrency", "name": "c", "max": 3, "partition_by": "{tenant}"}]}
    """#

@Suite("Admit now from one partition", .timeLimit(.minutes(15)))
struct AdmitNowTests {
    @Test("admits only the partition's jobs, through every gate: slots and tokens taken, a cap never passed, the rotation untouched")
    func admitsThroughTheGates() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", policy)
            try await conn.exec(
                """
                SELECT dispatch_policy.stage('p', to_jsonb(i), jsonb_build_object('tenant', (ARRAY['a','b','c'])[i % 3 + 1]))
                FROM generate_series(0, 29) i
                """)
            try await conn.exec("SELECT dispatch_policy.pause('p')")
            // A paused policy admits nothing, from any partition.
            let paused = try await admitNow(conn, "p", gate: "c", partition: "c", max: 2)
            #expect(paused.outcome == .paused && paused.admitted == 0)
            try await conn.exec("SELECT dispatch_policy.resume('p')")
            let cursorBefore = try await conn.rows(
                "SELECT last_key FROM dispatch_policy.round_robin_cursors WHERE policy = 'p'", logger: TestServer.logger
            )
            .map { try $0.decode(String?.self) }

            let first = try await admitNow(conn, "p", gate: "c", partition: "c", max: 2)
            #expect(first.outcome == .ran)
            #expect(first.admitted == 2 && first.fetched == 2)
            #expect(try await admittedTenants(conn) == ["c", "c"])
            // Asked for 5: the concurrency cap of 3 lets one more through, the others are refused and stay staged.
            let second = try await admitNow(conn, "p", gate: "c", partition: "c", max: 5)
            #expect(second.admitted == 1)
            #expect(second.refusedByGate["c"] == 4)
            #expect(try await admittedTenants(conn) == ["c", "c", "c"])
            #expect(
                try await conn.scalar(
                    "SELECT in_flight FROM dispatch_policy.inflight_counters WHERE gate = 'c' AND partition = 'c'", as: Int.self) == 3)
            // The throttle's tokens were taken: 4 - 3 left.
            let tokens = try await conn.scalar(
                "SELECT tokens FROM dispatch_policy.throttle_buckets WHERE gate = 't' AND partition = 'c'", as: Double.self)
            #expect(tokens < 1.01 && tokens > 0.99)
            // Nothing more while the slots are taken.
            let third = try await admitNow(conn, "p", gate: "c", partition: "c", max: 5)
            #expect(third.admitted == 0 && third.refusedByGate["c"] == 5)
            // The rotation has not moved, and no lane was blocked.
            #expect(
                try await conn.rows(
                    "SELECT last_key FROM dispatch_policy.round_robin_cursors WHERE policy = 'p'", logger: TestServer.logger
                )
                .map { try $0.decode(String?.self) } == cursorBefore)
            #expect(
                try await conn.scalar(
                    "SELECT count(*) FROM dispatch_policy.lanes WHERE policy = 'p' AND blocked_until IS NOT NULL", as: Int64.self) == 0)
            // A slot freed by complete(): one more, and its token is the last whole one.
            let id = try await conn.scalar("SELECT min(id) FROM dispatch_policy.admitted_jobs", as: Int64.self)
            try await conn.exec("SELECT dispatch_policy.complete(\(id))")
            #expect(try await admitNow(conn, "p", gate: "c", partition: "c", max: 5).admitted == 1)
            let empty = try await admitNow(conn, "p", gate: "c", partition: "nobody", max: 5)
            #expect(empty.outcome == .ran && empty.fetched == 0 && empty.admitted == 0)
            #expect(AdmitNowReport(empty, requested: 5).text.contains("no pending job"))
            // A regular tick takes the other tenants' jobs as before.
            let tick = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            #expect(tick.admitted == 6)
            #expect(try await admittedTenants(conn).filter { $0 != "c" }.count == 6)
        }
    }

    @Test("a paused partition stays paused; scheduled jobs are not admitted early")
    func pausedAndScheduled() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", policy)
            try await conn.exec("SELECT dispatch_policy.stage('p', '{}', '{\"tenant\": \"a\"}')")
            try await conn.exec("SELECT dispatch_policy.stage('p', '{}', '{\"tenant\": \"a\"}', not_before => now() + interval '1 hour')")
            try await conn.exec("SELECT dispatch_policy.pause_partition('p', 'c', 'a')")
            let refused = try await admitNow(conn, "p", gate: "c", partition: "a", max: 5)
            #expect(refused.admitted == 0 && refused.fetched == 1)
            try await conn.exec("SELECT dispatch_policy.resume_partition('p', 'c', 'a')")
            let admitted = try await admitNow(conn, "p", gate: "c", partition: "a", max: 5)
            #expect(admitted.admitted == 1 && admitted.fetched == 1, "the scheduled job waits for its time")
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.staged_jobs", as: Int64.self) == 1)
        }
    }

    @Test("bad arguments are errors with an SQLSTATE and change nothing; a runner's tick under way is waited for, up to a bound")
    func errorsAndBusy() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "p", policy)
            try await declare(conn, "flat", #"{"gates": [{"type": "global_cap", "max": 2}]}"#)
            try await conn.exec("SELECT dispatch_policy.stage('p', '{}', '{\"tenant\": \"a\"}')")
            for (policy, gate, partition, max, state) in [
                ("nope", "c", "a", 1, "42704"), ("p", "nope", "a", 1, "42704"), ("flat", "global_cap", "default", 1, "22023"),
                ("p", "c", "a", 0, "22023"), ("p", "c", "a", 100_001, "22023"), ("p", "c", String(repeating: "x", count: 300), 1, "22023"),
            ] {
                do {
                    _ = try await admitNow(conn, policy, gate: gate, partition: partition, max: max)
                    Issue.record("admitNow(\(policy), \(gate), \(max)) did not fail")
                } catch let error as DispatchPolicyError {
                    #expect(error.sqlState == state, "\(policy) \(gate) \(max): \(error)")
                }
            }
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs", as: Int64.self) == 0)
            // The session is usable afterwards: no lock left behind.
            #expect(
                try await conn.scalar(
                    "SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", as: Int.self) == 0)

            // Another session holds the policy's tick lock: busy after the wait; admitted once it is given back.
            try await TestServer.withConnection(settings) { other in
                try await other.exec("SELECT pg_advisory_lock(dispatch_policy._tick_lock_key('p'))")
                let busy = try await admitNow(conn, "p", gate: "c", partition: "a", max: 1, wait: .milliseconds(300))
                #expect(busy.outcome == .busy && busy.admitted == 0)
                #expect(AdmitNowReport(busy, requested: 1).text.contains("try again"))
                try await other.exec("SELECT pg_advisory_unlock(dispatch_policy._tick_lock_key('p'))")
            }
            #expect(try await admitNow(conn, "p", gate: "c", partition: "a", max: 1).admitted == 1)
        }
    }

    @Test("with the global cap full, admit-now says so")
    func globalCapFull() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                #"""
                {"gates": [{"type": "concurrency", "name": "c", "max": 5, "partition_by": "{tenant}"}, {"type": "global_cap", "max": 2}]}
                """#)
            try await conn.exec(
                "SELECT dispatch_policy.stage('p', to_jsonb(i), jsonb_build_object('tenant', 't' || (i % 2))) FROM generate_series(1, 6) i")
            #expect(try await admitNow(conn, "p", gate: "c", partition: "t0", max: 5).admitted == 2)
            let full = try await admitNow(conn, "p", gate: "c", partition: "t1", max: 5)
            #expect(full.admitted == 0 && full.globalCapFull)
            #expect(AdmitNowReport(full, requested: 5).text.contains("global cap is full"))
        }
    }

    @Test("admit-now racing runners never passes a cap")
    func racingRunners() async throws { try await LiveTests.exclusive { try await racingRunnersLive() } }

    /// Counts progress in time (60 admissions in a minute): a live test.
    func racingRunnersLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn in
            try await declare(
                conn, "p",
                #"""
                {"round_robin_by": "{tenant}",
                 "gates": [{"type": "concurrency", "name": "c", "max": 2, "partition_by": "{tenant}"},
                           {"type": "global_cap", "max": 5}]}
                """#)
            try await conn.exec(
                """
                SELECT dispatch_policy.stage('p', to_jsonb(i), jsonb_build_object('tenant', 't' || (i % 4)))
                FROM generate_series(1, 400) i
                """)
        }
        // Two runners and two operators admitting now; a watcher checks the
        // caps after every completion round.
        // Until 60 jobs went through (runners and operators together), or a
        // minute on a machine too loaded to get there (then the count fails).
        final class Progress: Sendable {
            let admitted = Atomic<Int>(0)
            let deadline = Date().addingTimeInterval(60)
            var going: Bool { admitted.load(ordering: .relaxed) < 60 && Date() < deadline }
            func add(_ n: Int) { admitted.add(n, ordering: .relaxed) }
        }
        let progress = Progress()
        try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<2 {
                group.addTask {
                    try await TestServer.withConnection(settings) { conn in
                        var admitted = 0
                        while progress.going {
                            let n = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p").admitted
                            admitted += n
                            progress.add(n)
                            // A runner's busy pause (a tight loop would keep the lock from the operators).
                            try await Task.sleep(for: .milliseconds(20))
                        }
                        return admitted
                    }
                }
            }
            for operatorIndex in 0..<2 {
                group.addTask {
                    try await TestServer.withConnection(settings) { conn in
                        var admitted = 0
                        var round = 0
                        while progress.going {
                            round += 1
                            let n = try await admitNow(
                                conn, "p", gate: "c", partition: "t\((round + operatorIndex) % 4)", max: 3, wait: .seconds(2)
                            ).admitted
                            admitted += n
                            progress.add(n)
                        }
                        return admitted
                    }
                }
            }
            group.addTask {
                try await TestServer.withConnection(settings) { conn in
                    var worst = 0
                    while progress.going {
                        let (perTenant, total) = try #require(
                            try await conn.rows(
                                """
                                SELECT coalesce(max(n), 0)::int, coalesce(sum(n), 0)::int
                                FROM (SELECT count(*) AS n FROM dispatch_policy.admitted_jobs GROUP BY context ->> 'tenant') x
                                """, logger: TestServer.logger
                            ).first
                        ).decode((Int, Int).self)
                        #expect(perTenant <= 2, "a tenant had \(perTenant) in flight")
                        #expect(total <= 5, "\(total) in flight under a global cap of 5")
                        worst = max(worst, total)
                        // Free the slots so admission goes on (in one call, slots in order).
                        try await conn.exec(
                            """
                            WITH a AS (SELECT array_agg(id) AS ids, array_agg(NULL::integer) AS attempts FROM dispatch_policy.admitted_jobs)
                            SELECT count(*) FROM a, dispatch_policy.complete_many(coalesce(a.ids, '{}'), coalesce(a.attempts, '{}'))
                            """)
                        try await Task.sleep(for: .milliseconds(20))
                    }
                    return worst
                }
            }
            for try await _ in group {}
            #expect(progress.admitted.load(ordering: .relaxed) >= 60, "the race admitted too little to tell in a minute")
        }
        let problems = try await TestServer.withConnection(settings) { conn in
            try await conn.scalar("SELECT count(*) FROM dispatch_policy.check()", as: Int64.self)
        }
        #expect(problems == 0)
    }

    @Test("dispatch-policy admit-now prints what it admitted and what refused; exits 1 when nothing was admitted")
    func command() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn in
            try await declare(conn, "p", policy)
            try await conn.exec("SELECT dispatch_policy.stage('p', to_jsonb(i), '{\"tenant\": \"a\"}') FROM generate_series(1, 5) i")
        }
        let run = try await cli(["admit-now", "p", "--gate", "c", "--partition", "a", "--max", "5"], settings: settings)
        #expect(run.status == 0, "\(run.stderr)")
        #expect(run.stdout == "admitted 3 of 5 fetched (asked for 5); refused c=2\n")
        let none = try await cli(["admit-now", "p", "--gate", "c", "--partition", "a", "--max", "5"], settings: settings)
        #expect(none.status == 1)
        #expect(none.stdout.hasPrefix("admitted 0 of 2 fetched"))
        let bad = try await cli(["admit-now", "p", "--gate", "nope", "--partition", "a"], settings: settings)
        #expect(bad.status == 1 && bad.stderr.contains("42704"), "\(bad.stderr)")
        #expect(try await cli(["admit-now", "p", "--gate", "c", "--partition", "a", "--max", "0"], settings: settings).status == 64)
    }
}
