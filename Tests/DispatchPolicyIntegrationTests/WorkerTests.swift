import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle
import Synchronization
import Testing

/// Waiters resume when it opens, and not before: cancellation does not end the wait.
actor Latch {
    private var isOpen = false
    private var waiters: [CheckedContinuation<Void, Never>] = []
    func wait() async {
        if isOpen { return }
        await withCheckedContinuation { waiters.append($0) }
    }
    func open() {
        isOpen = true
        for waiter in waiters { waiter.resume() }
        waiters = []
    }
}

/// Records which jobs a handler ran, and how often.
actor Ledger {
    private(set) var runs: [Int64: Int] = [:]
    func record(_ id: Int64) { runs[id, default: 0] += 1 }
    var total: Int { runs.values.reduce(0, +) }
}

private func finishedCount(_ settings: ConnectionSettings) async throws -> Int {
    try await TestServer.withConnection(settings) { conn async throws in
        try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs", as: Int.self)
    }
}

/// Runs a runner and `worker` in one service group until `done`, then shuts
/// them down gracefully.
private func runServices(_ settings: ConnectionSettings, worker: Worker, until done: () async throws -> Bool) async throws -> Bool {
    var runnerOptions = TickRunnerOptions()
    runnerOptions.busyPause = .milliseconds(5)
    runnerOptions.idlePause = .milliseconds(100)
    let runner = TickRunner(connection: settings, options: runnerOptions, logger: TestServer.logger)
    let group = ServiceGroup(configuration: .init(services: [runner, worker], logger: TestServer.logger))
    return try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        let finished = try await waitUntil(90, done)
        await group.triggerGracefulShutdown()
        try await tasks.waitForAll()
        return finished
    }
}

@Suite("Workers", .timeLimit(.minutes(15)))
struct WorkerTests {
    @Test("end to end: jobs staged from SQL are admitted, run once each by the Swift worker, and release every slot")
    func endToEnd() async throws { try await LiveTests.exclusive { try await endToEndLive() } }

    func endToEndLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let jobs = 200
        try await TestServer.withConnection(settings) { conn async throws in
            let config = PolicyConfig(roundRobinBy: "{acct}") {
                Gate.throttle(rate: 400, per: 1, burst: 50, partitionBy: "{acct}")
                Gate.concurrency(max: 3, partitionBy: "{acct}")
                Gate.globalCap(max: 6)
                Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 2, targetLagMs: 5_000)
            }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "send_webhook", config: try config.json())
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('send_webhook', (
                  SELECT jsonb_agg(jsonb_build_object('args', jsonb_build_object('n', i), 'context', jsonb_build_object('acct', 'a' || (i % 4)),
                                                      'dedupe_key', 'event:' || i))
                  FROM generate_series(1, \(jobs)) i))
                """)
        }
        let ledger = Ledger()
        var options = WorkerOptions()
        options.concurrency = 8
        options.pollInterval = .milliseconds(200)
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        struct Args: Decodable { var n: Int }
        worker.register("send_webhook") { job in
            _ = try job.args(as: Args.self)
            await ledger.record(job.id)
            try await Task.sleep(for: .milliseconds(Int.random(in: 1...10)))
        }
        let finished = try await runServices(settings, worker: worker) { try await finishedCount(settings) == jobs }
        #expect(finished)
        #expect(await ledger.runs.count == jobs)
        #expect(await ledger.total == jobs)
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(
                try await conn.scalar(
                    "SELECT count(*) FROM dispatch_policy.finished_jobs WHERE status = 'completed' AND attempts = 1", as: Int.self) == jobs)
            #expect(try await conn.scalar("SELECT coalesce(sum(in_flight), 0) FROM dispatch_policy.inflight_counters", as: Int.self) == 0)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.dedupe_keys", as: Int.self) == 0)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs", as: Int.self) == 0)
            // One observation per completion: folded into the stats, or waiting for the next tick.
            #expect(
                try await conn.scalar(
                    "SELECT (SELECT coalesce(sum(observations), 0) FROM dispatch_policy.adaptive_stats)::int + (SELECT count(*) FROM dispatch_policy.observations)::int",
                    as: Int.self) == jobs)
        }
    }

    @Test("a throwing handler fails the attempt; the job is retried through admission, then dead with its errors kept")
    func retriesThenDead() async throws { try await LiveTests.exclusive { try await retriesThenDeadLive() } }

    func retriesThenDeadLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(name: "flaky", config: try PolicyConfig(maxAttempts: 3) { Gate.concurrency(max: 1) }.json())
            try await conn.exec(#"SELECT dispatch_policy.stage_many('flaky', '[{"args": 1}, {"args": 2}]')"#)
        }
        struct Boom: Error, CustomStringConvertible {
            var attempt: Int
            var description: String { "boom on attempt \(attempt)" }
        }
        let ledger = Ledger()
        var options = WorkerOptions()
        options.retryIn = .zero
        options.pollInterval = .milliseconds(100)
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        worker.register("flaky") { job in
            await ledger.record(job.id)
            throw Boom(attempt: job.attempt)
        }
        #expect(try await runServices(settings, worker: worker) { try await finishedCount(settings) == 2 })
        #expect(await ledger.total == 6)
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(
                try await conn.scalar(
                    "SELECT count(*) FROM dispatch_policy.finished_jobs WHERE status = 'dead' AND attempts = 3", as: Int.self) == 2)
            #expect(
                try await conn.scalar("SELECT min(last_error) FROM dispatch_policy.finished_jobs", as: String.self) == "boom on attempt 3")
            let errors = try await conn.rows(
                "SELECT error FROM dispatch_policy.job_failures WHERE job_id = (SELECT min(id) FROM dispatch_policy.finished_jobs) ORDER BY attempt",
                logger: TestServer.logger
            ).map { try $0.decode(String.self) }
            #expect(errors == ["boom on attempt 1", "boom on attempt 2", "boom on attempt 3"])
            #expect(try await conn.scalar("SELECT coalesce(sum(in_flight), 0) FROM dispatch_policy.inflight_counters", as: Int.self) == 0)
            #expect(try await conn.scalar("SELECT dead FROM dispatch_policy.policy_overview", as: Int.self) == 2)
        }
    }

    @Test("heartbeats keep a job that runs longer than its lease from being reaped")
    func heartbeats() async throws { try await LiveTests.exclusive { try await heartbeatsLive() } }

    func heartbeatsLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(name: "slow", config: try PolicyConfig(leaseSeconds: 5).json())
            try await conn.exec(#"SELECT dispatch_policy.stage('slow', '{}')"#)
        }
        var options = WorkerOptions()
        options.heartbeatInterval = .milliseconds(250)
        options.pollInterval = .milliseconds(100)
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        // Two leases long: only heartbeats keep it. (A lease of 2 s was lost
        // on a loaded machine by one heartbeat 1.7 s late.)
        worker.register("slow") { _ in try await Task.sleep(for: .seconds(11)) }
        #expect(try await runServices(settings, worker: worker) { try await finishedCount(settings) == 1 })
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(
                try await conn.scalar("SELECT status || '/' || attempts FROM dispatch_policy.finished_jobs", as: String.self)
                    == "completed/1")
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.job_failures", as: Int.self) == 0)
        }
    }

    @Test("graceful shutdown stops claiming and lets running jobs finish")
    func drains() async throws { try await LiveTests.exclusive { try await drainsLive() } }

    func drainsLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
            try await conn.exec(#"SELECT dispatch_policy.stage_many('p', '[{"args": 1}, {"args": 2}, {"args": 3}]')"#)
        }
        let started = Ledger()
        var options = WorkerOptions()
        options.concurrency = 1
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        worker.register("p") { job in
            await started.record(job.id)
            try await Task.sleep(for: .milliseconds(800))
        }
        // Shut down as soon as the first job starts: it must complete; the others stay admitted, unclaimed.
        _ = try await runServices(settings, worker: worker) { await started.total >= 1 }
        #expect(await started.total == 1)
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(
                try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs WHERE status = 'completed'", as: Int.self) == 1)
            #expect(
                try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE started_at IS NOT NULL", as: Int.self) == 0)
        }
    }

    /// A cancelled worker waits for handlers that ignore cancellation, then
    /// returns (see CompletionBatcherTests for the batcher's side).
    @Test("a cancelled worker returns once handlers that ignore cancellation end")
    func cancelledWorkerReturns() async throws { try await LiveTests.exclusive { try await cancelledWorkerReturnsLive() } }

    func cancelledWorkerReturnsLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
            try await conn.exec(
                "SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, 4) i))")
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
        }
        let started = Ledger()
        let release = Latch()
        var options = WorkerOptions()
        options.concurrency = 4
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        worker.register("p") { job in
            await started.record(job.id)
            // A handler that does not react to cancellation (blocking work).
            await release.wait()
        }
        let finished = Mutex(false)
        let task = Task {
            defer { finished.withLock { $0 = true } }
            try await worker.run()
        }
        #expect(try await waitUntil(30) { await started.total == 4 })
        task.cancel()
        // Long enough for the batcher to see the cancellation with nothing to send.
        try await Task.sleep(for: .seconds(1))
        await release.open()
        #expect(try await waitUntil(20) { finished.withLock { $0 } }, "the worker did not return after cancellation")
    }

    /// fail takes `now`, so the retry time is exact. The attempt is set by
    /// hand to reach the cap without failing a job eleven times.
    @Test("fail without retry_in retries after 2^attempt seconds, at most an hour; retry_in overrides it")
    func defaultBackoff() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: #"{"max_attempts": 100}"#)
            let id = try await conn.scalar("SELECT dispatch_policy.stage('p', '{}')", as: Int64.self)
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            func failedRetryIn(attempt: Int, retryIn: String? = nil) async throws -> String {
                try await conn.exec("UPDATE dispatch_policy.staged_jobs SET attempt = \(attempt), not_before = NULL WHERE id = \(id)")
                #expect(try await ticker.tick(policy: "p").admitted == 1)
                let at = "2030-01-01 00:00:00+00"
                #expect(
                    try await conn.scalar(
                        "SELECT dispatch_policy.fail(\(id), 'boom', \(retryIn)::interval, now => \(at)::timestamptz, attempt => \(attempt)::integer)",
                        as: String.self) == "retrying")
                return try await conn.scalar(
                    "SELECT (not_before - \(at)::timestamptz)::text FROM dispatch_policy.staged_jobs WHERE id = \(id) AND attempt = \(attempt + 1)",
                    as: String.self)
            }
            #expect(try await failedRetryIn(attempt: 1) == "00:00:02")
            #expect(try await failedRetryIn(attempt: 3) == "00:00:08")
            #expect(try await failedRetryIn(attempt: 11) == "00:34:08")  // 2048 s
            #expect(try await failedRetryIn(attempt: 12) == "01:00:00")  // 4096 s, capped
            #expect(try await failedRetryIn(attempt: 40) == "01:00:00")
            #expect(try await failedRetryIn(attempt: 12, retryIn: "5 seconds") == "00:00:05")
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("heartbeat extends the lease; on a finished or unknown job it is an error (P0002)")
    func heartbeatSQL() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: #"{"lease_seconds": 60}"#)
            try await conn.exec("SELECT dispatch_policy.stage('p', '{}')")
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            let id = try await conn.scalar("SELECT id FROM dispatch_policy.claim('default', 'w', 1)", as: Int64.self)
            // At an explicit now (ten minutes on), in one transaction so that now() is one instant:
            // the new expiry is exactly that now plus the 60 s lease, returned and stored.
            try await conn.exec("BEGIN")
            let returned = try await conn.scalar(
                "SELECT (dispatch_policy.heartbeat(\(id), now => now() + interval '10 minutes', attempt => 1) - now())::text",
                as: String.self)
            #expect(returned == "00:11:00")
            let (stored, beat) = try #require(
                try await conn.rows(
                    "SELECT (lease_expires_at - now())::text, (heartbeat_at - now())::text FROM dispatch_policy.admitted_jobs WHERE id = \(id)",
                    logger: TestServer.logger
                ).first
            ).decode((String, String).self)
            #expect(stored == "00:11:00" && beat == "00:10:00")
            try await conn.exec("COMMIT")
            _ = try await conn.rows("SELECT dispatch_policy.complete(\(id))", logger: TestServer.logger)
            let error = await expectSQLError("P0002", "is not admitted") {
                try await conn.exec("SELECT dispatch_policy.heartbeat(\(id))")
            }
            #expect(error?.detail == "It has already finished.")
            await expectSQLError("P0002", "is not admitted") { try await conn.exec("SELECT dispatch_policy.heartbeat(424242)") }
            #expect(try await checkFindings(conn) == [])
        }
    }
}
