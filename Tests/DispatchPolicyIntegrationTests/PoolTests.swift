import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle
import Testing

/// The runner and the worker on the application's `PostgresClient`: they
/// lease its connections per call, keep one each only for LISTEN, and open
/// none of their own.
@Suite("The application's pool", .timeLimit(.minutes(15)))
struct PoolTests {
    /// Backends of the test database other than the asking one.
    private func backends(_ settings: ConnectionSettings) async throws -> Int {
        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.scalar(
                "SELECT count(*)::int FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()", as: Int.self)
        }
    }

    private func finished(_ settings: ConnectionSettings) async throws -> Int {
        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE status = 'completed'", as: Int.self)
        }
    }

    /// A runner and a worker that wake only by notification: their pauses are
    /// a minute, so a job run within seconds proves both LISTENs work.
    private func services(_ client: PostgresClient, ledger: Ledger) -> (TickRunner, Worker) {
        var runnerOptions = TickRunnerOptions()
        runnerOptions.busyPause = .milliseconds(20)
        runnerOptions.idlePause = .seconds(600)
        let runner = TickRunner(client: client, options: runnerOptions, logger: TestServer.logger)
        var workerOptions = WorkerOptions()
        workerOptions.concurrency = 4
        workerOptions.pollInterval = .seconds(600)
        var worker = Worker(client: client, options: workerOptions, logger: TestServer.logger)
        worker.register("p") { job in await ledger.record(job.id) }
        return (runner, worker)
    }

    @Test("a runner, a worker and the application's staging share one pool of 4; every job runs once; no connection of their own")
    func sharedPool() async throws { try await LiveTests.exclusive { try await sharedPoolLive() } }

    func sharedPoolLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p", config: try PolicyConfig { Gate.concurrency(max: 2, partitionBy: "{acct}") }.json())
        }
        let client = PostgresClient(
            configuration: try settings.clientConfiguration(maximumConnections: 4), backgroundLogger: TestServer.logger)
        let ledger = Ledger()
        let (runner, worker) = services(client, ledger: ledger)
        // The pool first: a service group stops its services in reverse order.
        let group = DetachedServices([client, runner, worker])
        defer { Task { await group.shutDown() } }
        // Both are idle (their first passes made) before anything is staged.
        try await Task.sleep(for: .milliseconds(500))
        let stager = Stager(executor: client, logger: TestServer.logger)
        let jobs = 60
        for i in 0..<jobs {
            _ = try await stager.stage(policy: "p", try JobSpec(args: ["n": i], context: ["acct": "a\(i % 3)"]))
        }
        let done = try await waitUntil(120) { try await finished(settings) == jobs }
        #expect(done, "jobs staged on an idle runner and worker were not run within 120 s: a LISTEN on the pool does not wake them")
        #expect(await ledger.runs.count == jobs)
        #expect(await ledger.total == jobs)
        // Every session of the database is the pool's: none is the runner's or the worker's own.
        #expect(try await backends(settings) <= 4)
        await group.shutDown()
        let stopped = try await waitUntil(20) { group.isFinished }
        #expect(stopped)
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs", as: Int.self) == 0)
            #expect(
                try await conn.scalar("SELECT coalesce(sum(in_flight), 0)::int FROM dispatch_policy.inflight_counters", as: Int.self) == 0)
            // A clean stop forgets the processes.
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.processes", as: Int.self) == 0)
        }
    }

    @Test("every pooled session terminated under a runner and a worker: they lease new ones, LISTEN again, and run what is staged after")
    func pooledSessionsKilled() async throws { try await LiveTests.exclusive { try await pooledSessionsKilledLive() } }

    func pooledSessionsKilledLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
        }
        let client = PostgresClient(
            configuration: try settings.clientConfiguration(maximumConnections: 4), backgroundLogger: TestServer.logger)
        let ledger = Ledger()
        let (runner, worker) = services(client, ledger: ledger)
        let group = DetachedServices([client, runner, worker])
        defer { Task { await group.shutDown() } }
        let stager = Stager(executor: client, logger: TestServer.logger)
        _ = try await stager.stage(policy: "p", try JobSpec(args: ["n": 0]))
        #expect(try await waitUntil(120) { try await finished(settings) == 1 })
        let killed = try await TestServer.withConnection(settings) { conn async throws in
            try await conn.scalar(
                """
                SELECT count(pg_terminate_backend(pid))::int FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                """, as: Int.self)
        }
        // At least the two LISTEN sessions were the pool's.
        #expect(killed >= 2)
        // The LISTENs come back (each reports itself after re-subscribing by
        // looking for work), then staging wakes both again.
        try await Task.sleep(for: .seconds(2))
        for i in 1...10 { _ = try await stager.stage(policy: "p", try JobSpec(args: ["n": i])) }
        let done = try await waitUntil(120) { try await finished(settings) == 11 }
        #expect(done, "after its pooled sessions were terminated, the runner or the worker no longer ran staged jobs")
        #expect(await ledger.total == 11)
        await group.shutDown()
        #expect(try await waitUntil(20) { group.isFinished })
    }

    @Test("a pool that is not running: a one-shot runner fails within its bound, saying so, instead of waiting for ever")
    func poolNotRunning() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let client = PostgresClient(
            configuration: try settings.clientConfiguration(maximumConnections: 2), backgroundLogger: Logger(label: "quiet"))
        var options = TickRunnerOptions()
        options.once = true
        options.connectTimeout = .milliseconds(500)
        options.callTimeout = .seconds(1)
        let started = ContinuousClock.now
        await #expect {
            _ = try await TickRunner(client: client, options: options, logger: TestServer.logger).runLoop()
        } throws: { error in
            guard let error = error as? DispatchPolicyError else { return false }
            return error.code == .connectionLost && error.message.contains("the pool lent no connection")
                && (error.hint ?? "").contains("must be running")
        }
        #expect(ContinuousClock.now - started < .seconds(20))
    }
}
