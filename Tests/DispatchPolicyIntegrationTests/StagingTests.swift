import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

private func declare(_ conn: PostgresConnection, _ name: String, _ config: String = "{}") async throws {
    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: config)
}

private func stagedCount(_ conn: PostgresConnection) async throws -> Int {
    try await conn.scalar("SELECT count(*) FROM dispatch_policy.staged_jobs", as: Int.self)
}

/// Moves a staged job to admitted_jobs the way admission does, keeping its
/// dedupe key held (admission itself arrives with the tick primitives).
private func moveToAdmitted(_ conn: PostgresConnection, id: Int64) async throws {
    try await conn.exec(
        """
        WITH moved AS (DELETE FROM dispatch_policy.staged_jobs WHERE id = \(id) RETURNING *)
        INSERT INTO dispatch_policy.admitted_jobs
          (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, attempt, created_at, staged_at,
           admitted_at, lease_expires_at, lease_seconds, target)
        SELECT id, policy, queue, priority, args, context, dedupe_key, round_robin_key, attempt, created_at, staged_at,
               now(), now() + interval '15 minutes', 900, 'ready_queue'
        FROM moved
        """)
}

@Suite("Staging", .timeLimit(.minutes(15)))
struct StagingTests {
    @Test("stage stores the job with defaults and adds queue_name and priority to the context")
    func stageStoresJob() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p")
            let stager = Stager(executor: conn, logger: TestServer.logger)
            let first = try await stager.stage(policy: "p", JobSpec(argsJSON: #"{"n": 1}"#, contextJSON: #"{"account_id": 42}"#))
            let second = try await stager.stage(policy: "p", JobSpec(argsJSON: "[1, 2]", queue: "urgent", priority: -5))
            #expect(first.outcome == .inserted && second.outcome == .inserted)
            #expect(second.id > first.id)
            let rows = try await conn.rows(
                "SELECT queue, priority, args::text, context::text, not_before IS NULL FROM dispatch_policy.staged_jobs ORDER BY id",
                logger: TestServer.logger
            ).map { try $0.decode((String, Int, String, String, Bool).self) }
            #expect(rows.count == 2)
            #expect(rows[0].0 == "default" && rows[0].1 == 0 && rows[0].2 == #"{"n": 1}"#)
            #expect(rows[0].3 == #"{"priority": 0, "account_id": 42, "queue_name": "default"}"#)
            #expect(rows[1].0 == "urgent" && rows[1].1 == -5 && rows[1].2 == "[1, 2]")
            #expect(rows[1].3 == #"{"priority": -5, "queue_name": "urgent"}"#)
            #expect(rows.allSatisfy { $0.4 })
        }
    }

    @Test("context keys set by the caller win over the injected queue_name and priority")
    func callerContextWins() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p")
            _ = try await conn.rows(
                #"SELECT dispatch_policy.stage('p', '{}', '{"queue_name": "mine", "priority": "high"}', queue => 'q', priority => 3)"#,
                logger: TestServer.logger)
            #expect(
                try await conn.scalar("SELECT context::text FROM dispatch_policy.staged_jobs", as: String.self)
                    == #"{"priority": "high", "queue_name": "mine"}"#)
        }
    }

    @Test("the round-robin key comes from round_robin_by unless the caller gives one")
    func roundRobinKey() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "rr", #"{"round_robin_by": "acct:{account_id}/{region}"}"#)
            try await declare(conn, "plain")
            let stager = Stager(executor: conn, logger: TestServer.logger)
            _ = try await stager.stage(policy: "rr", JobSpec(argsJSON: "1", contextJSON: #"{"account_id": 42, "region": "eu"}"#))
            _ = try await stager.stage(policy: "rr", JobSpec(argsJSON: "2", contextJSON: #"{"account_id": 7}"#))
            _ = try await stager.stage(policy: "rr", JobSpec(argsJSON: "3", contextJSON: #"{"account_id": 7}"#, roundRobinKey: "explicit"))
            _ = try await stager.stage(policy: "plain", JobSpec(argsJSON: "4", contextJSON: #"{"account_id": 7}"#))
            let keys = try await conn.rows(
                "SELECT round_robin_key FROM dispatch_policy.staged_jobs ORDER BY id", logger: TestServer.logger
            ).map { try $0.decode(String?.self) }
            #expect(keys == ["acct:42/eu", "acct:7/", "explicit", nil])
        }
    }

    @Test("a future not_before schedules the job; a past one makes it pending")
    func notBefore() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p")
            let stager = Stager(executor: conn, logger: TestServer.logger)
            _ = try await stager.stage(policy: "p", JobSpec(argsJSON: "1", notBefore: Date().addingTimeInterval(3600)))
            _ = try await stager.stage(policy: "p", JobSpec(argsJSON: "2", notBefore: Date().addingTimeInterval(-3600)))
            _ = try await stager.stage(policy: "p", JobSpec(argsJSON: "3"))
            let (pending, scheduled) = try #require(
                try await conn.rows(
                    "SELECT pending, scheduled FROM dispatch_policy.policy_overview WHERE policy = 'p'", logger: TestServer.logger
                ).first
            ).decode((Int, Int).self)
            #expect(pending == 2)
            #expect(scheduled == 1)
        }
    }

    @Test("dedupe: kept (the holder's id) while the first job is pending or admitted; other policies and keys are independent")
    func dedupePendingAndAdmitted() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p")
            try await declare(conn, "q")
            let stager = Stager(executor: conn, logger: TestServer.logger)
            let first = try await stager.stage(policy: "p", JobSpec(argsJSON: "1", dedupeKey: "event:1"))
            #expect(first.outcome == .inserted)
            #expect(
                try await stager.stage(policy: "p", JobSpec(argsJSON: "2", dedupeKey: "event:1")) == StagedJob(id: first.id, outcome: .kept)
            )
            #expect(try await stager.stage(policy: "q", JobSpec(argsJSON: "3", dedupeKey: "event:1")).outcome == .inserted)
            #expect(try await stager.stage(policy: "p", JobSpec(argsJSON: "4", dedupeKey: "event:2")).outcome == .inserted)
            #expect(try await stager.stage(policy: "p", JobSpec(argsJSON: "5")).outcome == .inserted)
            #expect(try await stager.stage(policy: "p", JobSpec(argsJSON: "6")).outcome == .inserted)
            try await moveToAdmitted(conn, id: first.id)
            #expect(
                try await stager.stage(policy: "p", JobSpec(argsJSON: "7", dedupeKey: "event:1")) == StagedJob(id: first.id, outcome: .kept)
            )
            #expect(try await stagedCount(conn) == 4)
        }
    }

    /// The stagers start together (see ``raceFromOneStart``), each staging
    /// every key in one transaction, so they insert the same keys while the
    /// others' inserts are not yet committed: a dedupe that looked for an
    /// existing job instead of relying on the unique key would store one job
    /// per stager.
    @Test("dedupe holds under concurrent stagers: one job per key")
    func dedupeConcurrent() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { try await declare($0, "p") }
        let key: Int64 = 7_340_002
        let perStager = try await raceFromOneStart(settings, racers: 4, key: key) { stager in
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.exec("BEGIN")
                try await conn.exec("SELECT pg_advisory_xact_lock_shared(\(key))")
                var ids: [StagedJob] = []
                for n in 0..<50 {
                    ids.append(
                        try await Stager(executor: conn, logger: TestServer.logger)
                            .stage(policy: "p", JobSpec(argsJSON: "\(stager)", dedupeKey: "k\(n)")))
                }
                try await conn.exec("COMMIT")
                return ids
            }
        }
        let ids = perStager.flatMap { $0 }
        #expect(ids.filter { $0.outcome == .inserted }.count == 50)
        // Each key went to exactly one stager, and the others got its id.
        for n in 0..<50 {
            #expect(perStager.filter { $0[n].outcome == .inserted }.count == 1, "key k\(n)")
            #expect(Set(perStager.map { $0[n].id }).count == 1, "key k\(n)")
        }
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await stagedCount(conn) == 50)
            #expect(try await conn.scalar("SELECT count(DISTINCT dedupe_key) FROM dispatch_policy.staged_jobs", as: Int.self) == 50)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.dedupe_keys", as: Int.self) == 50)
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("stage errors: unknown policy 42704, NULL args 22004, non-object context 22023; nothing stored")
    func stageErrors() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p")
            await expectSQLError("42704", "unknown policy: 'nope'") {
                try await conn.exec("SELECT dispatch_policy.stage('nope', '{}')")
            }
            await expectSQLError("22004", "args must not be null") {
                try await conn.exec("SELECT dispatch_policy.stage('p', NULL)")
            }
            await expectSQLError("22004", "args must not be null") {
                try await conn.exec("SELECT dispatch_policy.stage('p', 'null')")
            }
            for context in ["[1]", "\"text\"", "3"] {
                await expectSQLError("22023", "context must be a JSON object") {
                    try await conn.exec("SELECT dispatch_policy.stage('p', '{}', \(context)::jsonb)")
                }
            }
            await expectSQLError("22023", "queue must be a string of 1 to 128 bytes") {
                try await conn.exec("SELECT dispatch_policy.stage('p', '{}', queue => '')")
            }
            #expect(try await stagedCount(conn) == 0)
            // A NULL context is the same as no context.
            try await conn.exec("SELECT dispatch_policy.stage('p', '{}', NULL)")
            #expect(try await stagedCount(conn) == 1)
        }
    }

    @Test("stage_many returns ids in input order, the holder's for duplicates, within the call and against staged jobs")
    func stageManyOrderAndDedupe() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p")
            let stager = Stager(executor: conn, logger: TestServer.logger)
            let existing = try await stager.stage(policy: "p", JobSpec(argsJSON: "0", dedupeKey: "taken")).id
            let ids = try await stager.stageMany(
                policy: "p",
                [
                    JobSpec(argsJSON: "1", dedupeKey: "a"),
                    JobSpec(argsJSON: "2", dedupeKey: "a"),
                    JobSpec(argsJSON: "3"),
                    JobSpec(argsJSON: "4", dedupeKey: "taken"),
                    JobSpec(argsJSON: "5", dedupeKey: "b", queue: "q", priority: 2),
                ])
            #expect(ids.map(\.outcome) == [.inserted, .kept, .inserted, .kept, .inserted])
            #expect(ids[1].id == ids[0].id && ids[3].id == existing)
            let stored = [ids[0].id, ids[2].id, ids[4].id]
            #expect(stored == stored.sorted() && stored[0] > existing)
            let args = try await conn.rows(
                "SELECT args::text FROM dispatch_policy.staged_jobs WHERE id <> \(existing) ORDER BY id", logger: TestServer.logger
            ).map { try $0.decode(String.self) }
            #expect(args == ["1", "3", "5"])
            #expect(try await stager.stageMany(policy: "p", []) == [])
            #expect(try await conn.scalar("SELECT cardinality(dispatch_policy.stage_many('p', '[]'))", as: Int.self) == 0)
        }
    }

    @Test("stage_many with one bad element stores nothing and names the element and field")
    func stageManyAllOrNothing() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p")
            let cases: [(String, String, String)] = [
                (#"[{"args": 1}, 5]"#, "22023", "jobs[1] must be a JSON object"),
                (#"[{"args": 1}, {"context": {}}]"#, "22004", "jobs[1].args must not be null"),
                (#"[{"args": 1}, {"args": 1, "context": [1]}]"#, "22023", "jobs[1].context must be a JSON object"),
                (#"[{"args": 1}, {"args": 1, "priority": "high"}]"#, "22023", "jobs[1].priority must be an integer"),
                (#"[{"args": 1}, {"args": 1, "priority": 3000000000}]"#, "22023", "jobs[1].priority must be an integer"),
                (#"[{"args": 1}, {"args": 1, "dedupe_key": 5}]"#, "22023", "jobs[1].dedupe_key must be a string"),
                (#"[{"args": 1}, {"args": 1, "not_before": "someday"}]"#, "22023", "jobs[1].not_before must be a finite timestamp"),
                (#"[{"args": 1}, {"args": 1, "wat": true}]"#, "22023", "jobs[1].wat is not a known field"),
                (#"{"args": 1}"#, "22023", "jobs must be a JSON array"),
            ]
            for (jobs, state, message) in cases {
                await expectSQLError(state, message) {
                    try await conn.exec("SELECT dispatch_policy.stage_many('p', \(jobs)::jsonb)")
                }
            }
            await expectSQLError("42704", "unknown policy") {
                try await conn.exec(#"SELECT dispatch_policy.stage_many('nope', '[{"args": 1}]')"#)
            }
            #expect(try await stagedCount(conn) == 0)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.dedupe_keys", as: Int.self) == 0)
        }
    }

    @Test("stage_many stages 100,000 jobs in one call")
    func stageMany100k() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "bulk", #"{"round_robin_by": "{tenant}"}"#)
            let jobs = (0..<100_000).map { i in
                JobSpec(argsJSON: #"{"i": \#(i)}"#, contextJSON: #"{"tenant": \#(i % 100)}"#, dedupeKey: i % 10 == 0 ? "k\(i)" : nil)
            }
            let ids = try await Stager(executor: conn, logger: TestServer.logger).stageMany(policy: "bulk", jobs)
            #expect(ids.count == 100_000)
            let stored = ids.map(\.id)
            #expect(ids.allSatisfy { $0.outcome == .inserted })
            #expect(stored == stored.sorted())
            #expect(try await stagedCount(conn) == 100_000)
            #expect(try await conn.scalar("SELECT count(DISTINCT round_robin_key) FROM dispatch_policy.staged_jobs", as: Int.self) == 100)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.dedupe_keys", as: Int.self) == 10_000)
        }
    }

    /// PostgreSQL itself delivers identical notifications of one transaction
    /// once, which the promise relies on; so what is checked is what a
    /// listener gets: one notification per transaction and policy, its
    /// payload the policy's name, and nothing else — no notification per job
    /// and none that tells jobs apart, which PostgreSQL would deliver each.
    @Test("staging notifies listening runners once per transaction and policy, not once per row")
    func notifiesOncePerTransaction() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { listener in
            try await declare(listener, "p")
            try await declare(listener, "q")
            let notifications = try await listener.listen(on: "dispatch_policy_staged") { notifications in
                try await TestServer.withConnection(settings) { stager in
                    // 1,000 rows in one call.
                    try await stager.exec(
                        "SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, 1000) i))"
                    )
                    // Five stage() calls for two policies in one transaction.
                    try await stager.exec("BEGIN")
                    for (policy, n) in [("p", 1), ("q", 2), ("p", 3), ("q", 4), ("p", 5)] {
                        try await stager.exec("SELECT dispatch_policy.stage(\(policy), to_jsonb(\(n)))")
                    }
                    try await stager.exec("COMMIT")
                    // Two stage_many calls in one transaction, of 3 and 2 jobs.
                    try await stager.exec("BEGIN")
                    try await stager.exec(#"SELECT dispatch_policy.stage_many('q', '[{"args": 1}, {"args": 2}, {"args": 3}]')"#)
                    try await stager.exec(#"SELECT dispatch_policy.stage_many('q', '[{"args": 4}, {"args": 5}]')"#)
                    try await stager.exec("COMMIT")
                    // A deduplicated stage notifies nothing.
                    try await stager.exec("SELECT dispatch_policy.stage('p', '1', dedupe_key => 'k')")
                    try await stager.exec("SELECT dispatch_policy.stage('p', '1', dedupe_key => 'k')")
                    // Sentinel: delivered after everything committed before it.
                    try await stager.exec("SELECT pg_notify('dispatch_policy_staged', 'sentinel')")
                }
                var received: [String] = []
                for try await notification in notifications {
                    if notification.payload == "sentinel" { break }
                    received.append(notification.payload)
                }
                return received
            }
            // One per transaction and policy, in commit order (within a transaction, in the order first sent).
            #expect(notifications == ["p", "p", "q", "q", "p"])
            #expect(try await checkFindings(listener) == [])
        }
    }
}
