import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

private func declare(_ conn: PostgresConnection, _ name: String, _ config: PolicyConfig) async throws {
    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: try config.json())
}

private func tick(_ conn: PostgresConnection, _ policy: String) async throws -> TickResult {
    try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: policy)
}

@Suite("Gate state stays true", .timeLimit(.minutes(15)))
struct GateStateTests {
    /// Regression (5): with cap 2 and the NFD partition full, an NFC job and
    /// another NFD job were both admitted; the counter showed 3 under cap 2.
    @Test("canonically equivalent and confusable keys are separate partitions on both sides, and no cap is exceeded")
    func keyIdentity() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig { Gate.concurrency(max: 2, partitionBy: "{t}") })
            let nfd = "cafe\u{301}"
            let nfc = "caf\u{E9}"
            for key in [nfd, nfd] { try await conn.exec("SELECT dispatch_policy.stage('p', '1', jsonb_build_object('t', \(key)::text))") }
            #expect(try await tick(conn, "p").admitted == 2)
            for key in [nfc, nfd, "\u{212B}", "\u{C5}", "a", "\u{430}"] {
                try await conn.exec("SELECT dispatch_policy.stage('p', '1', jsonb_build_object('t', \(key)::text))")
            }
            #expect(try await tick(conn, "p").admitted == 5)
            #expect(try await conn.scalar("SELECT max(in_flight) FROM dispatch_policy.inflight_counters", as: Int.self) == 2)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.inflight_counters", as: Int.self) == 6)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.staged_jobs", as: Int.self) == 1)
            try await expectCountersConsistent(conn)
        }
    }

    /// Regression (6): reap_leases released job after job, out of (gate,
    /// partition) order: with 4 sessions completing against the reaper over
    /// 1,000 expired jobs, 10 complete() calls and 5 of 6 reaper runs died
    /// with "deadlock detected".
    @Test("the lease reaper and complete() never deadlock: every path locks counters in one sorted statement")
    func reaperAndCompleteDoNotDeadlock() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let partitions = 40
        try await TestServer.withConnection(settings) { conn async throws in
            try await declare(
                conn, "p",
                PolicyConfig(batchSize: 2000) {
                    Gate.concurrency(max: 1000, partitionBy: "{a}")
                    Gate.concurrency(name: "second", max: 1000, partitionBy: "{b}")
                    Gate.globalCap(max: 10_000)
                })
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i,
                  'context', jsonb_build_object('a', 'a' || (i % \(partitions)), 'b', 'b' || ((i * 7) % \(partitions))))) FROM generate_series(1, 1200) i))
                """)
            #expect(try await tick(conn, "p").admitted == 1200)
            try await conn.exec("UPDATE dispatch_policy.admitted_jobs SET lease_expires_at = now() - interval '1 minute' WHERE id % 6 <> 0")
        }
        let ids = try await TestServer.withConnection(settings) { conn async throws in
            try await conn.rows("SELECT id FROM dispatch_policy.admitted_jobs ORDER BY random()", logger: TestServer.logger)
                .map { try $0.decode(Int64.self) }
        }
        let errors = try await withThrowingTaskGroup(of: [String].self) { group in
            for worker in 0..<4 {
                group.addTask {
                    try await TestServer.withConnection(settings) { conn async throws in
                        var errors: [String] = []
                        for (index, id) in ids.enumerated() where index % 4 == worker {
                            do {
                                _ = try await conn.rows("SELECT dispatch_policy.complete(\(id))", logger: TestServer.logger)
                            } catch let error as DispatchPolicyError {
                                if error.sqlState != "P0002" { errors.append(error.description) }
                            }
                        }
                        return errors
                    }
                }
            }
            for _ in 0..<6 {
                group.addTask {
                    try await TestServer.withConnection(settings) { conn async throws in
                        do {
                            _ = try await conn.rows("SELECT dispatch_policy.reap_leases(NULL, now(), 200)", logger: TestServer.logger)
                            return []
                        } catch {
                            return ["\(error)"]
                        }
                    }
                }
            }
            var all: [String] = []
            for try await errors in group { all += errors }
            return all
        }
        #expect(errors.filter { $0.contains("deadlock") } == [], "\(errors.prefix(3))")
        #expect(errors == [])
        try await TestServer.withConnection(settings) { conn async throws in try await expectCountersConsistent(conn) }
    }

    /// Found by hostile testing: a tick that reaped an expired job inside
    /// its admission transaction held that job's counters while read_counters
    /// waited for the batch's, out of order against a complete(): 40P01.
    /// Made deterministic here with a third session holding one counter.
    @Test("a tick that reaps never deadlocks with a concurrent complete()")
    func tickReapingAndComplete() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let (j2, _) = try await TestServer.withConnection(settings) { conn async throws -> (Int64, Int64) in
            try await declare(
                conn, "p",
                PolicyConfig(leaseSeconds: 60) {
                    Gate.concurrency(max: 10, partitionBy: "{k}")
                    Gate.globalCap(max: 10)
                })
            let j1 = try await conn.scalar(#"SELECT dispatch_policy.stage('p', '1', '{"k": "b"}')"#, as: Int64.self)
            let j2 = try await conn.scalar(#"SELECT dispatch_policy.stage('p', '2', '{"k": "a"}')"#, as: Int64.self)
            #expect(try await tick(conn, "p").admitted == 2)
            _ = try await conn.rows("SELECT * FROM dispatch_policy.claim('default', 'w', 2)", logger: TestServer.logger)
            // j1's lease ran out; a new job of partition a waits.
            try await conn.exec("UPDATE dispatch_policy.admitted_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = \(j1)")
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '3', '{"k": "a"}')"#)
            return (j2, j1)
        }
        try await TestServer.withConnection(settings) { holder async throws in
            // Hold counter concurrency/a, so the worker and the tick queue behind it.
            try await holder.exec("BEGIN")
            try await holder.exec(
                "SELECT 1 FROM dispatch_policy.inflight_counters WHERE gate = 'concurrency' AND partition = 'a' FOR UPDATE")
            try await withThrowingTaskGroup(of: String?.self) { group in
                group.addTask {
                    try await TestServer.withConnection(settings) { worker async throws in
                        do {
                            _ = try await worker.rows("SELECT dispatch_policy.complete(\(j2), attempt => 1)", logger: TestServer.logger)
                            return nil
                        } catch let error as DispatchPolicyError { return "complete: \(error)" }
                    }
                }
                try await Task.sleep(for: .milliseconds(300))
                group.addTask {
                    try await TestServer.withConnection(settings) { runner async throws in
                        do {
                            _ = try await tick(runner, "p")
                            return nil
                        } catch let error as DispatchPolicyError { return "tick: \(error)" }
                    }
                }
                try await Task.sleep(for: .milliseconds(500))
                try await holder.exec("COMMIT")
                var errors: [String] = []
                for try await error in group { if let error { errors.append(error) } }
                #expect(errors == [])
            }
        }
        try await TestServer.withConnection(settings) { conn async throws in try await expectCountersConsistent(conn) }
    }

    /// Found by hostile testing: hashtext's 32 bits made p250493 and p272813
    /// share one tick lock.
    @Test("tick locks of different policies are independent (64-bit keys)")
    func tickLocksDoNotCollide() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { first async throws in
            try await TestServer.withConnection(settings) { second async throws in
                #expect(
                    try await first.scalar(
                        "SELECT hashtext('dispatch_policy.tick.p250493') = hashtext('dispatch_policy.tick.p272813')", as: Bool.self))
                try await first.exec("BEGIN")
                #expect(try await first.scalar("SELECT dispatch_policy.try_lock_policy('p250493')", as: Bool.self))
                #expect(try await second.scalar("SELECT dispatch_policy.try_lock_policy('p272813')", as: Bool.self))
                #expect(try await second.scalar("SELECT dispatch_policy.try_lock_policy('p250493')", as: Bool.self) == false)
                try await first.exec("COMMIT")
            }
        }
    }

    /// Regression (7): a cosmetic template change left 4 in flight under max 2.
    @Test(
        "redeclaring a policy keeps in-flight jobs counted under the new gates",
        arguments: [
            // (new template, new gate name)
            ("acct:{acct}", "concurrency"), ("{acct}", "per_account"),
        ])
    func redeclareKeepsInFlight(template: String, name: String) async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig { Gate.concurrency(max: 2, partitionBy: "{acct}") })
            try await conn.exec(
                #"SELECT dispatch_policy.stage_many('p', '[{"args": 1, "context": {"acct": "a"}}, {"args": 2, "context": {"acct": "a"}}, {"args": 3, "context": {"acct": "a"}}, {"args": 4, "context": {"acct": "a"}}]')"#
            )
            #expect(try await tick(conn, "p").admitted == 2)
            try await declare(conn, "p", PolicyConfig { Gate.concurrency(name: name, max: 2, partitionBy: template) })
            #expect(try await tick(conn, "p").admitted == 0)
            #expect(
                try await conn.scalar("SELECT sum(in_flight) FROM dispatch_policy.inflight_counters WHERE gate = \(name)", as: Int.self)
                    == 2)
            try await expectCountersConsistent(conn)
            // Completing a job releases the slot it holds under the new config.
            let id = try await conn.scalar("SELECT min(id) FROM dispatch_policy.admitted_jobs", as: Int64.self)
            try await conn.exec("SELECT dispatch_policy.complete(\(id))")
            #expect(try await tick(conn, "p").admitted == 1)
            try await expectCountersConsistent(conn)
            // A gate removed while its slots are held: its counters go, the jobs keep running.
            try await declare(conn, "p", PolicyConfig())
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.inflight_counters", as: Int.self) == 0)
            #expect(try await tick(conn, "p").admitted == 1)
            try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
            try await expectCountersConsistent(conn)
        }
    }

    /// Regression (8): jobs without a round-robin key were never fetched while
    /// keyed jobs filled the batch (50 ticks, priority −100, fetched 0 times).
    @Test("jobs without a round-robin key have a lane of their own and are not starved")
    func keylessJobsHaveALane() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig(batchSize: 10, roundRobinQuantum: 5))
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '"old"', priority => -100)"#)
            try await declare(
                conn, "p",
                PolicyConfig(roundRobinBy: "{t}", batchSize: 10, roundRobinQuantum: 5) {
                    Gate.globalCap(max: 1000)
                })
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('t', 't' || (i % 20))))
                                                        FROM generate_series(1, 400) i))
                """)
            var ticks = 0
            while try await conn.scalar(#"SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE args = '"old"'"#, as: Int.self) == 0
                && ticks < 20
            {
                _ = try await tick(conn, "p")
                ticks += 1
            }
            #expect(ticks <= 11, "the keyless job waited \(ticks) ticks: 20 keys + its lane, 2 lanes a tick")
            #expect(try await conn.scalar(#"SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE args = '"old"'"#, as: Int.self) == 1)
        }
    }

    /// Regression (11): observations of a removed adaptive gate were never
    /// folded or pruned, and the policy counted as "has work" forever.
    @Test("observations of a removed adaptive gate are dropped, and the policy no longer has work")
    func orphanedObservations() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", PolicyConfig { Gate.adaptiveConcurrency(partitionBy: "{a}", targetLagMs: 100) })
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '1', '{"a": "x"}')"#)
            _ = try await tick(conn, "p")
            try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.observations", as: Int.self) == 1)
            try await declare(conn, "p", PolicyConfig())
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.observations", as: Int.self) == 0)
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).policiesWithWork() == [])
            // Left by an older version: prune removes them.
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.observations (policy, gate, partition, job_id, lag_ms, success)
                VALUES ('p', 'gone', 'x', 1, 5, true), ('nobody', 'adaptive_concurrency', 'x', 2, 5, true)
                """)
            let removed = try await conn.scalar(
                "SELECT removed FROM dispatch_policy.prune() WHERE what = 'orphaned_observations'", as: Int.self)
            #expect(removed == 2)
        }
    }
}
