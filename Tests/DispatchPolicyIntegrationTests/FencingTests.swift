import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle
import Synchronization
import Testing

/// Handler runs as intervals on one clock, to check that none overlap.
final class Intervals: Sendable {
    let runs = Mutex<[(id: Int64, attempt: Int, start: ContinuousClock.Instant, end: ContinuousClock.Instant?)]>([])

    func start(_ job: Job) -> Int {
        runs.withLock { runs in
            runs.append((job.id, job.attempt, .now, nil))
            return runs.count - 1
        }
    }

    func end(_ index: Int) {
        runs.withLock { $0[index].end = .now }
    }

    /// Pairs of runs that were under way at the same time.
    var overlaps: [String] {
        runs.withLock { runs in
            var found: [String] = []
            for i in runs.indices {
                for j in runs.indices where j > i {
                    let a = runs[i]
                    let b = runs[j]
                    let aEnd = a.end ?? .now
                    let bEnd = b.end ?? .now
                    if a.start < bEnd && b.start < aEnd {
                        found.append("job \(a.id)#\(a.attempt) and job \(b.id)#\(b.attempt)")
                    }
                }
            }
            return found
        }
    }

    var count: Int { runs.withLock { $0.count } }

    /// How long each run that ended took.
    var durations: [Duration] { runs.withLock { $0.compactMap { run in run.end.map { $0 - run.start } } } }
}

@Suite("Workers: fenced by attempt", .timeLimit(.minutes(15)))
struct FencingTests {
    /// Regression (13): complete/fail/heartbeat/started matched by id only, so
    /// a worker whose lease expired completed the next attempt, freeing a slot
    /// still in use.
    @Test("a stale attempt cannot complete, fail, extend or start the current one (DP001), and nothing changes")
    func staleAttemptIsRefused() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(name: "p", config: try PolicyConfig(leaseSeconds: 60) { Gate.concurrency(max: 1) }.json())
            try await conn.exec("SELECT dispatch_policy.stage('p', '1')")
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            _ = try await ticker.tick(policy: "p")
            let (id, first) = try #require(
                try await conn.rows("SELECT id, attempt FROM dispatch_policy.claim('default', 'w1')", logger: TestServer.logger).first
            )
            .decode((Int64, Int).self)
            #expect(first == 1)
            // The first worker stalls; its lease runs out and the job is admitted again.
            try await conn.exec("UPDATE dispatch_policy.admitted_jobs SET lease_expires_at = now() - interval '1 second'")
            try await conn.exec("SELECT dispatch_policy.reap_leases('p')")
            try await conn.exec("UPDATE dispatch_policy.staged_jobs SET not_before = NULL")
            _ = try await ticker.tick(policy: "p")
            let second = try await conn.scalar("SELECT attempt FROM dispatch_policy.claim('default', 'w2')", as: Int.self)
            #expect(second == 2)
            let before = try await conn.scalar("SELECT row(a.*)::text FROM dispatch_policy.admitted_jobs a", as: String.self)
            for call in [
                "SELECT dispatch_policy.complete(\(id), attempt => 1)",
                "SELECT dispatch_policy.fail(\(id), 'late', attempt => 1)",
                "SELECT dispatch_policy.heartbeat(\(id), attempt => 1)",
                "SELECT dispatch_policy.started(\(id), attempt => 1)",
            ] {
                let error = await expectSQLError("DP001", "attempt 1 of job \(id) is not the current attempt") {
                    try await conn.exec(PostgresQuery(unsafeSQL: call))
                }
                #expect(error?.detail?.contains("Attempt 2 holds the job now") == true)
            }
            #expect(try await conn.scalar("SELECT row(a.*)::text FROM dispatch_policy.admitted_jobs a", as: String.self) == before)
            #expect(try await conn.scalar("SELECT in_flight FROM dispatch_policy.inflight_counters", as: Int.self) == 1)
            // The current attempt finishes normally; a repeat is a no-op, a stale one still refused.
            #expect(try await conn.scalar("SELECT dispatch_policy.complete(\(id), attempt => 2)", as: Bool.self))
            #expect(try await conn.scalar("SELECT dispatch_policy.complete(\(id), attempt => 2)", as: Bool.self) == false)
            await expectSQLError("DP001", "is not the current attempt") {
                try await conn.exec("SELECT dispatch_policy.complete(\(id), attempt => 1)")
            }
            #expect(try await conn.scalar("SELECT in_flight FROM dispatch_policy.inflight_counters", as: Int.self) == 0)
        }
    }

    /// Found by hostile testing: claim took the right jobs but returned them
    /// in the order of the heap, so a worker started them out of priority.
    @Test("claim takes and returns jobs lower priority first, then in staging order")
    func claimOrder() async throws {
        try await withTestDatabase { conn, _ async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
            // Admitted in two ticks, so the table holds them out of priority order.
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            try await conn.exec("SELECT dispatch_policy.stage('p', to_jsonb(p), priority => p) FROM unnest(ARRAY[5, 4]) p")
            _ = try await ticker.tick(policy: "p")
            try await conn.exec("SELECT dispatch_policy.stage('p', to_jsonb(p), priority => p) FROM unnest(ARRAY[1, 3, 1]) p")
            _ = try await ticker.tick(policy: "p")
            let first = try await conn.rows("SELECT args::text FROM dispatch_policy.claim('default', 'w', 1)", logger: TestServer.logger)
                .map { try $0.decode(String.self) }
            #expect(first == ["1"])
            let rest = try await conn.rows("SELECT args::text FROM dispatch_policy.claim('default', 'w', 10)", logger: TestServer.logger)
                .map { try $0.decode(String.self) }
            #expect(rest == ["1", "3", "4", "5"])
        }
    }

    /// Worker A claims inside a transaction it keeps open, so its rows stay
    /// locked; worker B (lock_timeout 2 s: waiting would fail it) claims
    /// past them at once.
    @Test("concurrent claimers skip each other's locked jobs (SKIP LOCKED) and never get the same job; max bounds each claim")
    func claimSkipsLocked() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
            try await conn.exec("SELECT dispatch_policy.stage('p', to_jsonb(n), priority => n) FROM generate_series(1, 5) n")
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
        }
        func args(_ conn: PostgresConnection, _ sql: PostgresQuery) async throws -> [String] {
            try await conn.rows(sql, logger: TestServer.logger).map { try $0.decode(String.self) }
        }
        try await TestServer.withConnection(settings) { a async throws in
            try await TestServer.withConnection(settings) { b async throws in
                try await a.exec("BEGIN")
                #expect(try await args(a, "SELECT args::text FROM dispatch_policy.claim('default', 'a', 2)") == ["1", "2"])
                try await b.exec("SET lock_timeout = '2s'")
                #expect(try await args(b, "SELECT args::text FROM dispatch_policy.claim('default', 'b', 2)") == ["3", "4"])
                #expect(try await args(b, "SELECT args::text FROM dispatch_policy.claim('default', 'b', 10)") == ["5"])
                #expect(try await args(b, "SELECT args::text FROM dispatch_policy.claim('default', 'b', 10)") == [])
                try await a.exec("COMMIT")
                #expect(try await args(a, "SELECT args::text FROM dispatch_policy.claim('default', 'a', 10)") == [])
                let workers = try await args(a, "SELECT args::text || ':' || worker FROM dispatch_policy.admitted_jobs ORDER BY id")
                #expect(workers == ["1:a", "2:a", "3:b", "4:b", "5:b"])
            }
        }
    }

    /// complete_many is what the Worker reports through: it must do exactly
    /// what complete() does per job, and change nothing for the others.
    @Test("complete_many finishes many jobs as complete() would each, and reports stale and unknown ones without changing them")
    func completeMany() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p",
                config: try PolicyConfig(leaseSeconds: 60) {
                    Gate.concurrency(max: 5, partitionBy: "{acct}")
                    Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 5, targetLagMs: 60_000)
                }.json())
            for n in 1...4 {
                try await conn.exec(
                    """
                    SELECT dispatch_policy.stage('p', \(String(n))::jsonb, context => '{"acct": "a"}', dedupe_key => \("k\(n)"))
                    """)
            }
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            _ = try await ticker.tick(policy: "p")
            let claimed = try await conn.rows(
                "SELECT id, attempt FROM dispatch_policy.claim('default', 'w', 10) ORDER BY id", logger: TestServer.logger
            )
            .map { try $0.decode((Int64, Int).self) }
            try #require(claimed.count == 4)
            let (j1, j2, j3, j4) = (claimed[0].0, claimed[1].0, claimed[2].0, claimed[3].0)
            // j3's lease runs out; it is admitted again as attempt 2.
            try await conn.exec("UPDATE dispatch_policy.admitted_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = \(j3)")
            try await conn.exec("SELECT dispatch_policy.reap_leases('p')")
            try await conn.exec("UPDATE dispatch_policy.staged_jobs SET not_before = NULL")
            _ = try await ticker.tick(policy: "p")
            let before = try await conn.scalar(
                "SELECT string_agg(row(a.*)::text, ',' ORDER BY id) FROM dispatch_policy.admitted_jobs a WHERE id IN (\(j3), \(j4))",
                as: String.self)

            func completeMany(_ ids: String, _ attempts: String) async throws -> [String] {
                try await conn.rows(
                    PostgresQuery(unsafeSQL: "SELECT id || ':' || outcome FROM dispatch_policy.complete_many(\(ids), \(attempts))"),
                    logger: TestServer.logger
                ).map { try $0.decode(String.self) }
            }
            // j1 twice (one row), j2 with whichever attempt is current, j3's stale attempt, an unknown id.
            #expect(
                try await completeMany("ARRAY[\(j1), \(j2), \(j1), \(j3), 999999]::bigint[]", "ARRAY[1, NULL, 1, 1, NULL]::integer[]")
                    == ["\(j1):completed", "\(j2):completed", "\(j3):stale", "999999:not_admitted"])
            #expect(
                try await completeMany("ARRAY[\(j1), \(j2)]::bigint[]", "ARRAY[1, NULL]::integer[]")
                    == ["\(j1):already_finished", "\(j2):already_finished"])
            #expect(try await completeMany("'{}'::bigint[]", "'{}'::integer[]") == [])
            // What complete() leaves: finished rows, freed dedupe keys, released slots, observations.
            #expect(
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE status = 'completed'", as: Int.self)
                    == 2)
            #expect(
                try await conn.scalar(
                    "SELECT string_agg(dedupe_key, ',' ORDER BY dedupe_key) FROM dispatch_policy.dedupe_keys", as: String.self) == "k3,k4")
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.observations WHERE success", as: Int.self) == 2)
            #expect(
                try await conn.scalar(
                    "SELECT string_agg(row(a.*)::text, ',' ORDER BY id) FROM dispatch_policy.admitted_jobs a WHERE id IN (\(j3), \(j4))",
                    as: String.self) == before)
            try await expectCountersConsistent(conn)
            #expect(
                try await conn.scalar("SELECT in_flight FROM dispatch_policy.inflight_counters WHERE gate = 'concurrency'", as: Int.self)
                    == 2)

            // Bad arguments: an error naming them, and nothing changes.
            await expectSQLError("22023", "ids and attempts must be arrays of the same length") {
                try await conn.exec("SELECT dispatch_policy.complete_many(ARRAY[\(j4)]::bigint[], '{}'::integer[])")
            }
            await expectSQLError("22023", "ids and attempts must be arrays of the same length") {
                try await conn.exec("SELECT dispatch_policy.complete_many(NULL, NULL)")
            }
            await expectSQLError("22004", "ids must not contain NULL") {
                try await conn.exec("SELECT dispatch_policy.complete_many(ARRAY[\(j4), NULL]::bigint[], ARRAY[1, 1]::integer[])")
            }
            await expectSQLError("22023", "ids must hold at most 10000 jobs") {
                try await conn.exec(
                    """
                    SELECT dispatch_policy.complete_many(array_fill(\(j4)::bigint, ARRAY[10001]), array_fill(NULL::integer, ARRAY[10001]))
                    """)
            }
            await expectSQLError("22023", "ids and attempts must be one-dimensional arrays") {
                try await conn.exec("SELECT dispatch_policy.complete_many(ARRAY[[\(j4), \(j4)]]::bigint[], '{1, 1}'::integer[])")
            }
            await expectSQLError("22023", "ids and attempts must be one-dimensional arrays") {
                try await conn.exec("SELECT dispatch_policy.complete_many(ARRAY[\(j4), \(j4)]::bigint[], '{{1}, {1}}'::integer[])")
            }
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs", as: Int.self) == 2)
            #expect(try await completeMany("ARRAY[\(j4)]::bigint[]", "ARRAY[1]::integer[]") == ["\(j4):completed"])
            try await expectCountersConsistent(conn)

            // A dead job: completing it without an attempt changes nothing (complete() returns false);
            // with its last attempt, that attempt did not complete: stale.
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "d", config: #"{"max_attempts": 1}"#)
            let dead = try await conn.scalar("SELECT dispatch_policy.stage('d', '{}')", as: Int64.self)
            _ = try await ticker.tick(policy: "d")
            #expect(try await conn.scalar("SELECT dispatch_policy.fail(\(dead), 'boom')", as: String.self) == "dead")
            #expect(try await conn.scalar("SELECT dispatch_policy.complete(\(dead))", as: Bool.self) == false)
            #expect(try await completeMany("ARRAY[\(dead)]::bigint[]", "ARRAY[NULL]::integer[]") == ["\(dead):already_finished"])
            #expect(try await completeMany("ARRAY[\(dead)]::bigint[]", "ARRAY[1]::integer[]") == ["\(dead):stale"])
            #expect(try await conn.scalar("SELECT status FROM dispatch_policy.finished_jobs WHERE id = \(dead)", as: String.self) == "dead")
        }
    }

    /// Found by hostile testing: when the connection outcomes are recorded
    /// on died (a query on it never returns), the worker kept claiming and
    /// running jobs on its other connection, and recorded none of them.
    @Test("a worker that cannot record outcomes stops claiming after one round")
    func stopsClaimingWhenOutcomesStall() async throws { try await LiveTests.exclusive { try await stopsClaimingWhenOutcomesStallLive() } }

    func stopsClaimingWhenOutcomesStallLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
            try await conn.exec(
                "SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, 400) i))")
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
        }
        var options = WorkerOptions()
        options.concurrency = 2
        options.pollInterval = .milliseconds(20)
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        worker.register("p") { _ in try await Task.sleep(for: .milliseconds(20)) }
        // Left behind if it cannot shut down: its outcomes connection hangs.
        let services = DetachedServices([worker])
        let killed = try await waitUntil(30) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar(
                    """
                    SELECT count(pg_terminate_backend(pid))::int FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE '%dispatch_policy.complete_many(%'
                    """, as: Int.self) > 0
            }
        }
        try #require(killed)
        try await Task.sleep(for: .seconds(2))
        try await TestServer.withConnection(settings) { conn async throws in
            // Claimed and never recorded: the batch the kill rolled back (at
            // most two rounds of the pool), then at most two rounds more, stuck
            // behind the query that never returns. (Before: ~100 jobs/s, all lost.)
            let lost = try await conn.scalar(
                "SELECT count(*)::int FROM dispatch_policy.admitted_jobs WHERE started_at IS NOT NULL", as: Int.self)
            #expect(lost <= 4 * options.concurrency, "\(lost) jobs claimed after outcomes stopped being recorded")
        }
        await services.shutDown()
    }

    /// Found by hostile testing: heartbeats share a connection, and one
    /// waiting on its job's row (locked by another session) held back every
    /// other job's: all handlers of the worker lost their lease at once.
    @Test("a lock on one job's row costs only that job its lease")
    func rowLockCostsOneLease() async throws { try await LiveTests.exclusive { try await rowLockCostsOneLeaseLive() } }

    func rowLockCostsOneLeaseLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(name: "p", config: try PolicyConfig(leaseSeconds: 6).json())
            try await conn.exec(
                "SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, 4) i))")
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
        }
        let intervals = Intervals()
        var options = WorkerOptions()
        options.concurrency = 4
        options.pollInterval = .milliseconds(50)
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        worker.register("p") { job in
            let index = intervals.start(job)
            defer { intervals.end(index) }
            try await Task.sleep(for: .seconds(12))
        }
        let services = DetachedServices([worker])
        #expect(try await waitUntil(30) { intervals.count == 4 })
        // Another session holds the first job's row for 16 s: longer than its
        // lease (6 s: leases of 2 and 3 s were lost by free jobs too under
        // load, one heartbeat late).
        let locker = Task {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.exec(
                    """
                    WITH locked AS MATERIALIZED (
                      SELECT id FROM dispatch_policy.admitted_jobs WHERE id = (SELECT min(id) FROM dispatch_policy.admitted_jobs) FOR UPDATE)
                    SELECT pg_sleep(16) FROM locked
                    """)
            }
        }
        let done = try await waitUntil(60) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.finished_jobs", as: Int.self) >= 3
            }
        }
        _ = try? await locker.value
        await services.shutDown()
        #expect(done, "the jobs whose rows were free did not complete")
        try await TestServer.withConnection(settings) { conn async throws in
            // The three free jobs completed in their first attempt; the locked one lost its lease.
            #expect(
                try await conn.scalar(
                    "SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE status = 'completed' AND attempts = 1", as: Int.self)
                    == 3)
        }
        #expect(try await waitUntil(30) { services.isFinished }, "the worker did not shut down")
    }

    /// Found by hostile testing: a claim that took longer than the lease (a
    /// slow server) still started the handler, with no lease at all.
    @Test("a job whose lease ran out while it was being claimed is not started")
    func expiredOnArrival() async throws { try await LiveTests.exclusive { try await expiredOnArrivalLive() } }

    func expiredOnArrivalLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(name: "p", config: try PolicyConfig(leaseSeconds: 1).json())
            try await conn.exec("SELECT dispatch_policy.stage('p', '1')")
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            // Every claim now takes 1.5 s: longer than the lease.
            try await conn.exec(
                """
                CREATE FUNCTION public.slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$
                """)
            try await conn.exec(
                """
                CREATE TRIGGER slow_claim BEFORE UPDATE ON dispatch_policy.admitted_jobs
                FOR EACH ROW WHEN (OLD.started_at IS NULL AND NEW.started_at IS NOT NULL) EXECUTE FUNCTION public.slow_claim()
                """)
        }
        let intervals = Intervals()
        var options = WorkerOptions()
        options.pollInterval = .milliseconds(50)
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        worker.register("p") { job in
            intervals.end(intervals.start(job))
        }
        try await runUntil(worker, timeout: 30) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs WHERE started_at IS NOT NULL", as: Int.self)
                    == 1
            }
        }
        try await Task.sleep(for: .milliseconds(500))
        #expect(intervals.count == 0, "a handler started after its lease had run out")
    }

    /// Regression (13): with concurrency max 1, lease_seconds 8 and a 20 s
    /// handler, 3 handlers ran at once (heartbeats at a fixed 30 s; a lost
    /// lease only logged).
    @Test("with concurrency 1, two handlers never run at once, even when heartbeats cannot keep the lease", arguments: [false, true])
    func neverTwoHandlers(heartbeatsWork: Bool) async throws {
        try await LiveTests.exclusive { try await neverTwoHandlersLive(heartbeatsWork: heartbeatsWork) }
    }

    func neverTwoHandlersLive(heartbeatsWork: Bool) async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(
                    name: "solo",
                    config: try PolicyConfig(leaseSeconds: heartbeatsWork ? 6 : 2, maxAttempts: 50) { Gate.concurrency(max: 1) }.json())
            try await conn.exec(#"SELECT dispatch_policy.stage_many('solo', '[{"args": 1}, {"args": 2}]')"#)
        }
        let intervals = Intervals()
        var runnerOptions = TickRunnerOptions()
        runnerOptions.busyPause = .milliseconds(10)
        runnerOptions.idlePause = .milliseconds(20)
        var services: [any Service] = [TickRunner(connection: settings, options: runnerOptions, logger: TestServer.logger)]
        for n in 0..<3 {
            var options = WorkerOptions()
            options.name = "w\(n)"
            options.pollInterval = .milliseconds(20)
            // Without working heartbeats the lease (2 s) runs out under a 3 s
            // handler; with them a lease of 6 s (2 s was lost on a loaded
            // machine by one late heartbeat) is kept through an 8 s handler.
            options.heartbeatInterval = heartbeatsWork ? nil : .seconds(60)
            var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
            worker.register("solo") { job in
                let index = intervals.start(job)
                defer { intervals.end(index) }
                try await Task.sleep(for: .seconds(heartbeatsWork ? 8 : 3))
            }
            services.append(worker)
        }
        // Retries wait 2^attempt s; skip the wait so a reaped job is admitted again at once.
        let accelerator = Task {
            try await TestServer.withConnection(settings) { conn async throws in
                while !Task.isCancelled {
                    try await conn.exec("UPDATE dispatch_policy.staged_jobs SET not_before = NULL WHERE not_before IS NOT NULL")
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
        }
        // Graceful shutdown: the workers stop claiming and let running handlers end.
        try await runUntil(services, timeout: 90) {
            if heartbeatsWork {
                return try await TestServer.withConnection(settings) { conn async throws in
                    try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs", as: Int.self) == 2
                }
            }
            return intervals.count >= 3
        }
        accelerator.cancel()
        _ = await accelerator.result
        #expect(intervals.overlaps == [])
        try await TestServer.withConnection(settings) { conn async throws in
            if heartbeatsWork {
                // Heartbeats kept each lease: each job ran once and completed.
                #expect(
                    try await conn.scalar(
                        "SELECT count(*) FROM dispatch_policy.finished_jobs WHERE status = 'completed' AND attempts = 1", as: Int.self) == 2
                )
            } else {
                // Every attempt lost its lease; none reported an outcome.
                #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs", as: Int.self) == 0)
                #expect(
                    try await conn.scalar("SELECT count(*) FROM dispatch_policy.job_failures WHERE error <> 'lease expired'", as: Int.self)
                        == 0)
            }
        }
    }

    /// Regression (14): claim handed out jobs a sql target had already delivered.
    @Test("jobs handed to a sql target are never claimable")
    func sqlTargetJobsAreNotClaimable() async throws {
        try await withTestDatabase { conn, _ in
            try await conn.exec(
                "CREATE FUNCTION public.deliver(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE sql AS 'SELECT 1'")
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "handed", config: try PolicyConfig(target: .sql(function: "public.deliver")).json())
            try await catalog.declare(name: "ready", config: "{}")
            try await conn.exec("SELECT dispatch_policy.stage('handed', '1'), dispatch_policy.stage('ready', '2')")
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            _ = try await ticker.tick(policy: "handed")
            _ = try await ticker.tick(policy: "ready")
            let claimed = try await conn.rows("SELECT policy FROM dispatch_policy.claim('default', 'w', 10)", logger: TestServer.logger)
                .map { try $0.decode(String.self) }
            #expect(claimed == ["ready"])
            let id = try await conn.scalar("SELECT id FROM dispatch_policy.admitted_jobs WHERE policy = 'handed'", as: Int64.self)
            try await conn.exec("SELECT dispatch_policy.started(\(id), attempt => 1)")
            #expect(try await conn.scalar("SELECT dispatch_policy.complete(\(id), attempt => 1)", as: Bool.self))
        }
    }

    /// Regression (15): a Worker claimed every job of its queues and failed
    /// those of policies it had no handler for.
    @Test("a Worker claims only jobs of the policies it has handlers for")
    func workerClaimsOnlyItsPolicies() async throws { try await LiveTests.exclusive { try await workerClaimsOnlyItsPoliciesLive() } }

    func workerClaimsOnlyItsPoliciesLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "billing", config: "{}")
            try await catalog.declare(name: "mine", config: "{}")
            try await conn.exec("SELECT dispatch_policy.stage('billing', '1'), dispatch_policy.stage('mine', '2')")
        }
        var runnerOptions = TickRunnerOptions()
        runnerOptions.idlePause = .milliseconds(50)
        var options = WorkerOptions()
        options.pollInterval = .milliseconds(50)
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        worker.register("mine") { _ in }
        let group = ServiceGroup(
            configuration: .init(
                services: [
                    TickRunner(connection: settings, options: runnerOptions, logger: TestServer.logger), worker,
                ], logger: TestServer.logger))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            _ = try await waitUntil(60) {
                try await TestServer.withConnection(settings) { conn async throws in
                    try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs WHERE policy = 'mine'", as: Int.self) == 1
                }
            }
            try await Task.sleep(for: .milliseconds(300))
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs WHERE policy = 'mine'", as: Int.self) == 1)
            #expect(
                try await conn.scalar(
                    "SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE policy = 'billing' AND started_at IS NULL AND attempt = 1",
                    as: Int.self) == 1)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.job_failures", as: Int.self) == 0)
        }
    }

    /// Regression (16): claim and heartbeat fell back to a hard-coded 900 s,
    /// not the lease the runner admitted the job with.
    @Test("a job keeps the lease it was admitted with: claim and heartbeat renew by it")
    func leaseHasOneSource() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
            try await conn.exec(#"SELECT dispatch_policy.stage_many('p', '[{"args": 1}, {"args": 2}]')"#)
            _ = try await Ticker(connection: conn, settings: TickSettings(batchSize: 1, leaseSeconds: 3600), logger: TestServer.logger)
                .tick(policy: "p")
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            let leases = try await conn.rows(
                "SELECT lease_seconds FROM dispatch_policy.admitted_jobs ORDER BY id", logger: TestServer.logger
            )
            .map { try $0.decode(Int.self) }
            #expect(leases == [3600, 900])
            let (id, lease, seconds) = try #require(
                try await conn.rows(
                    "SELECT id, lease_seconds, extract(epoch FROM lease_expires_at - now())::float8 FROM dispatch_policy.claim('default', 'w', 1)",
                    logger: TestServer.logger
                ).first
            ).decode((Int64, Int, Double).self)
            #expect(lease == 3600 && abs(seconds - 3600) < 5)
            let extended = try await conn.scalar(
                "SELECT extract(epoch FROM dispatch_policy.heartbeat(\(id), now() + interval '100 seconds', attempt => 1) - now())::float8",
                as: Double.self)
            #expect(abs(extended - 3700) < 5)
        }
    }
}
