import DispatchPolicy
import Foundation
import PostgresNIO
import Prometheus
import Testing

private func declare(_ conn: PostgresConnection, _ name: String, _ config: PolicyConfig) async throws {
    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: try config.json())
}

private func int(_ conn: PostgresConnection, _ sql: PostgresQuery) async throws -> Int {
    try await conn.scalar(sql, as: Int.self)
}

private func statuses(_ conn: PostgresConnection, _ policy: String) async throws -> [String: Int] {
    var out: [String: Int] = [:]
    for row in try await conn.rows(
        "SELECT status, count(*)::int FROM dispatch_policy.finished_jobs WHERE policy = \(policy) GROUP BY 1", logger: TestServer.logger)
    {
        let (status, n) = try row.decode((String, Int).self)
        out[status] = n
    }
    return out
}

/// Debounce, backlog caps and deadlines (issue 12) through the Swift API and
/// the runner's tick; the SQL-level cases are in sql/test/sql/staging_rules.sql.
@Suite("Staging rules: debounce, backlog caps, deadlines", .timeLimit(.minutes(15)))
struct StagingRulesTests {
    @Test("replace: a pending job takes the new args and context, keeps its id and waits debounce longer; an admitted one is kept")
    func replace() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "r",
                PolicyConfig(dedupeMode: .replace, debounce: 30) {
                    Gate.concurrency(max: 1, partitionBy: "{acct}")
                })
            let registry = PrometheusCollectorRegistry()
            let stager = Stager(
                executor: conn, logger: TestServer.logger,
                metrics: DispatchPolicyMetrics(factory: PrometheusMetricsFactory(registry: registry)))
            let first = try await stager.stage(policy: "r", try JobSpec(args: ["v": 1], context: ["acct": "a"], dedupeKey: "k"))
            #expect(first.outcome == .inserted)
            let staged = Date()
            let second = try await stager.stage(policy: "r", try JobSpec(args: ["v": 2], context: ["acct": "b"], dedupeKey: "k"))
            #expect(second == StagedJob(id: first.id, outcome: .replaced))
            let (args, acct, wait) = try #require(
                try await conn.rows(
                    """
                    SELECT args::text, context ->> 'acct', extract(epoch FROM not_before - \(staged))::float8
                    FROM dispatch_policy.staged_jobs
                    """, logger: TestServer.logger
                ).first
            ).decode((String, String, Double).self)
            #expect(args == #"{"v": 2}"#)
            #expect(acct == "b")
            #expect(wait > 25 && wait < 40, "not_before \(wait) s after the replace")
            #expect(try await int(conn, "SELECT count(*)::int FROM dispatch_policy.staged_jobs") == 1)
            // Moved to partition b: the runner admits it there once it is due.
            try await conn.exec("UPDATE dispatch_policy.staged_jobs SET not_before = NULL")
            let result = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "r")
            #expect(result.admitted == 1)
            #expect(
                try await conn.scalar("SELECT partition FROM dispatch_policy.inflight_counters WHERE in_flight > 0", as: String.self) == "b"
            )
            // Admitted: never touched.
            let third = try await stager.stage(policy: "r", try JobSpec(args: ["v": 3], context: ["acct": "c"], dedupeKey: "k"))
            #expect(third == StagedJob(id: first.id, outcome: .kept))
            #expect(try await conn.scalar("SELECT args::text FROM dispatch_policy.admitted_jobs", as: String.self) == #"{"v": 2}"#)
            try await expectCountersConsistent(conn)
            #expect(try await checkFindings(conn) == [])
            var bytes: [UInt8] = []
            registry.emit(into: &bytes)
            let text = String(decoding: bytes, as: UTF8.self)
            for outcome in ["inserted", "replaced", "kept"] {
                #expect(text.contains(#"dispatch_policy_staged_total{policy="r",result="\#(outcome)"} 1"#), "\(text)")
            }
        }
    }

    @Test("backlog cap, reject: DP002 naming the partition, stage_many all or nothing, other partitions unaffected")
    func backlogReject() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "b", PolicyConfig(roundRobinBy: "{acct}", maxPendingPerPartition: 2))
            let stager = Stager(executor: conn, logger: TestServer.logger)
            for n in 0..<2 { _ = try await stager.stage(policy: "b", try JobSpec(args: ["n": n], context: ["acct": "a"])) }
            let refused = await #expect(throws: DispatchPolicyError.self) {
                try await stager.stage(policy: "b", try JobSpec(args: ["n": 2], context: ["acct": "a"]))
            }
            #expect(refused?.isBacklogFull == true)
            #expect(refused?.description.contains("max_pending_per_partition") == true, "\(String(describing: refused))")
            // One job of a full partition refuses the whole call.
            let many = await #expect(throws: DispatchPolicyError.self) {
                try await stager.stageMany(
                    policy: "b", [try JobSpec(args: ["n": 3], context: ["acct": "z"]), try JobSpec(args: ["n": 4], context: ["acct": "a"])])
            }
            #expect(many?.isBacklogFull == true)
            #expect(try await int(conn, "SELECT count(*)::int FROM dispatch_policy.staged_jobs") == 2)
            #expect(try await stager.stage(policy: "b", try JobSpec(args: ["n": 5], context: ["acct": "z"])).outcome == .inserted)
            // Admission makes room.
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "b").admitted == 3)
            #expect(try await stager.stage(policy: "b", try JobSpec(args: ["n": 6], context: ["acct": "a"])).outcome == .inserted)
            #expect(try await checkFindings(conn) == [])
            // Found by hostile testing: a cap written 2.0 (valid JSON for 2)
            // made every stage fail with 22P02.
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(name: "b2", config: #"{"round_robin_by": "{acct}", "max_pending_per_partition": 2.0}"#)
            for n in 0..<2 { _ = try await stager.stage(policy: "b2", try JobSpec(args: ["n": n], context: ["acct": "a"])) }
            let full = await #expect(throws: DispatchPolicyError.self) {
                try await stager.stage(policy: "b2", try JobSpec(args: ["n": 2], context: ["acct": "a"]))
            }
            #expect(full?.isBacklogFull == true, "\(String(describing: full))")
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "b2").admitted == 2)
        }
    }

    @Test("backlog cap, drop_oldest: the partition's oldest staged jobs are finished as dropped and counted")
    func backlogDropOldest() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "d", PolicyConfig(roundRobinBy: "{acct}", maxPendingPerPartition: 2, onOverflow: .dropOldest))
            let stager = Stager(executor: conn, logger: TestServer.logger)
            var ids: [Int64] = []
            for n in 0..<3 { ids.append(try await stager.stage(policy: "d", try JobSpec(args: ["n": n], context: ["acct": "a"])).id) }
            #expect(
                try await conn.scalar("SELECT status FROM dispatch_policy.finished_jobs WHERE id = \(ids[0])", as: String.self) == "dropped"
            )
            let many = try await stager.stageMany(
                policy: "d",
                try (3..<6).map { try JobSpec(args: ["n": $0], context: ["acct": "a"]) } + [
                    try JobSpec(args: ["n": 9], context: ["acct": "b"])
                ])
            #expect(many.filter { $0.outcome == .dropped }.count == 1, "\(many)")
            #expect(many.last?.outcome == .inserted)
            #expect(try await int(conn, "SELECT count(*)::int FROM dispatch_policy.staged_jobs WHERE round_robin_key = 'a'") == 2)
            #expect(try await statuses(conn, "d") == ["dropped": 4])
            #expect(try await int(conn, "SELECT dropped_24h::int FROM dispatch_policy.policy_overview WHERE policy = 'd'") == 4)
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "d").admitted == 3)
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("deadlines: a job not admitted by expires_at or max_wait is finished as expired by the runner, never admitted late")
    func deadlines() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            // One slot: the first job holds it and the others wait.
            // w gains its max_wait once its slot holder is admitted (a
            // loaded machine took over 1.5 s to stage and tick it).
            try await declare(conn, "w", PolicyConfig { Gate.globalCap(max: 1) })
            try await declare(conn, "e", PolicyConfig { Gate.globalCap(max: 1) })
            let stager = Stager(executor: conn, logger: TestServer.logger)
            // The slot holders are admitted before the others are staged,
            // however slow the machine.
            _ = try await stager.stage(policy: "w", try JobSpec(args: ["n": 0]))
            _ = try await stager.stage(policy: "e", try JobSpec(args: ["n": 0]))
            for policy in ["w", "e"] {
                #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: policy).admitted == 1)
            }
            try await declare(conn, "w", PolicyConfig(maxWait: 1.5) { Gate.globalCap(max: 1) })
            for n in 1..<3 { _ = try await stager.stage(policy: "w", try JobSpec(args: ["n": n])) }
            // A later expires_at than max_wait: the earlier wins.
            _ = try await stager.stage(policy: "w", try JobSpec(args: ["n": 3], expiresAt: Date().addingTimeInterval(3600)))
            _ = try await stager.stage(policy: "e", try JobSpec(args: ["n": 1], expiresAt: Date().addingTimeInterval(1.5)))
            _ = try await stager.stage(policy: "e", try JobSpec(args: ["n": 2], expiresAt: Date().addingTimeInterval(3600)))
        }
        var options = TickRunnerOptions()
        options.busyPause = .milliseconds(5)
        options.idlePause = .milliseconds(100)
        let group = DetachedServices([TickRunner(connection: settings, options: options, logger: TestServer.logger)])
        defer { Task { await group.shutDown() } }
        let expired = try await waitUntil(30) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await int(conn, "SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE status = 'expired'") >= 4
            }
        }
        #expect(expired)
        try await TestServer.withConnection(settings) { conn async throws in
            // Their slots freed now, the survivor of e is admitted; nothing
            // that expired ever was.
            try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
            let admittedAll = try await waitUntil(30) {
                try await int(conn, "SELECT count(*)::int FROM dispatch_policy.staged_jobs") == 0
            }
            #expect(admittedAll)
            await group.shutDown()
            #expect(try await statuses(conn, "w") == ["expired": 3, "completed": 1])
            #expect(try await statuses(conn, "e")["expired"] == 1)
            #expect(
                try await int(
                    conn,
                    "SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE status = 'expired' AND (attempts > 0 OR last_error IS NULL)"
                ) == 0)
            #expect(
                try await int(conn, "SELECT sum(expired_24h)::int FROM dispatch_policy.policy_overview WHERE policy IN ('w', 'e')") == 4)
            try await expectCountersConsistent(conn)
        }
        // status shows them.
        let status = try await cli(["status"], settings: settings)
        #expect(status.stdout.contains("EXPIRED/DROPPED/DEFERRED 24H"), "\(status.stdout)")
    }

    /// Found by hostile testing: max_wait's deadline ran from a replace,
    /// not from staged_at (which a replace keeps); and prune deleted the
    /// kept deadline of a job in flight, so its retry never expired.
    @Test("max_wait runs from staged_at through replaces; prune keeps the deadline of a job in flight")
    func deadlineThroughReplaceAndPrune() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "m", PolicyConfig(dedupeMode: .replace, maxWait: 600))
            let stager = Stager(executor: conn, logger: TestServer.logger)
            let first = try await stager.stage(policy: "m", try JobSpec(args: ["v": 1], dedupeKey: "k"))
            try await Task.sleep(for: .milliseconds(300))
            #expect(try await stager.stage(policy: "m", try JobSpec(args: ["v": 2], dedupeKey: "k")).outcome == .replaced)
            #expect(
                try await conn.scalar(
                    "SELECT expires_at = staged_at + interval '600 seconds' FROM dispatch_policy.staged_jobs WHERE id = \(first.id)",
                    as: Bool.self))
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "m").admitted == 1)
            _ = try await conn.rows(
                "SELECT * FROM dispatch_policy.prune(retention => interval '0 seconds', now => now() + interval '1 hour')",
                logger: TestServer.logger)
            #expect(try await int(conn, "SELECT count(*)::int FROM dispatch_policy.job_deadlines WHERE job_id = \(first.id)") == 1)
        }
    }

    @Test("explain shows a deferred job's until and reason and its deadline; the overview counts the deferral")
    func explainDeferralAndDeadline() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "x", PolicyConfig())
            let staged = try await Stager(executor: conn, logger: TestServer.logger)
                .stage(policy: "x", try JobSpec(args: ["n": 1], expiresAt: Date().addingTimeInterval(3600)))
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "x").admitted == 1)
            try await conn.exec("SELECT dispatch_policy.defer(\(staged.id), now() + interval '10 minutes', '429 from the endpoint')")
            let explained = try await JobExplanation.load(id: staged.id, on: conn, logger: TestServer.logger)
            let deferred = try #require(explained.rows.first { $0.aspect == "deferred" }, "\(explained.text)")
            #expect(deferred.explanation.contains("429 from the endpoint") && deferred.explanation.contains("1 deferral"))
            let deadline = try #require(explained.rows.first { $0.aspect == "deadline" }, "\(explained.text)")
            #expect(deadline.verdict == "ok")
            #expect(explained.state == "scheduled")
            #expect(try await int(conn, "SELECT deferred_24h::int FROM dispatch_policy.policy_overview WHERE policy = 'x'") == 1)
        }
    }

    @Test("the new fields are refused beyond their bounds at declare time, naming the field; JSON round-trips")
    func validation() async throws {
        try await withTestDatabase { conn, _ in
            for (config, field) in [
                (#"{"dedupe_mode": "merge"}"#, "dedupe_mode"),
                (#"{"dedupe_mode": "replace", "debounce": 86401}"#, "debounce"),
                (#"{"debounce": 5}"#, "debounce"),
                (#"{"max_pending_per_partition": 0}"#, "max_pending_per_partition"),
                (#"{"max_pending_per_partition": 1.5}"#, "max_pending_per_partition"),
                (#"{"on_overflow": "drop_oldest"}"#, "on_overflow"),
                (#"{"max_pending_per_partition": 5, "on_overflow": "drop_newest"}"#, "on_overflow"),
                (#"{"max_wait": 0}"#, "max_wait"),
                (#"{"max_wait": 31536001}"#, "max_wait"),
            ] {
                let error = await #expect(throws: DispatchPolicyError.self, "\(config)") {
                    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "v", config: config)
                }
                #expect(error?.sqlState == "22023", "\(config): \(String(describing: error))")
                #expect(error?.description.contains(field) == true, "\(config): \(String(describing: error))")
            }
            #expect(try await int(conn, "SELECT count(*)::int FROM dispatch_policy.policies") == 0)
            let config = PolicyConfig(
                dedupeMode: .replace, debounce: 2.5, maxPendingPerPartition: 100, onOverflow: .dropOldest, maxWait: 600)
            try await declare(conn, "v", config)
            let stored = try await conn.scalar("SELECT config::text FROM dispatch_policy.policies WHERE name = 'v'", as: String.self)
            #expect(try PolicyConfig(json: stored) == config)
        }
    }
}
