import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle
import Synchronization
import Testing

/// Collects log messages (level and text) for assertions.
final class LogCapture: Sendable {
    let entries = Mutex<[(level: Logger.Level, message: String)]>([])

    var logger: Logger {
        var logger = Logger(label: "capture") { _ in CapturingHandler(capture: self) }
        logger.logLevel = .info
        return logger
    }

    func count(_ level: Logger.Level, containing text: String) -> Int {
        entries.withLock { $0.filter { $0.level == level && $0.message.contains(text) }.count }
    }

    struct CapturingHandler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            capture.entries.withLock { $0.append((event.level, "\(event.message)")) }
        }
    }
}

private func runner(
    _ settings: ConnectionSettings, for duration: Duration, overrun: Duration? = nil, logger: Logger = TestServer.logger
) -> TickRunner {
    var options = TickRunnerOptions()
    options.runFor = duration
    if let overrun { options.overrun = overrun }
    options.idlePause = .milliseconds(50)
    options.busyPause = .milliseconds(10)
    options.failureBackoff = .milliseconds(200)
    options.maxFailureBackoff = .seconds(1)
    return TickRunner(connection: settings, options: options, logger: logger)
}

/// Runs `service` until `condition` holds (polled every 50 ms, at most
/// `timeout` seconds), then shuts it down gracefully.
func runUntil(_ service: some Service, timeout: Int, _ condition: @escaping () async throws -> Bool) async throws {
    try await runUntil([service], timeout: timeout, condition)
}

func runUntil(_ services: [any Service], timeout: Int, _ condition: @escaping () async throws -> Bool) async throws {
    let group = ServiceGroup(configuration: .init(services: services, logger: TestServer.logger))
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        let reached = try await waitUntil(timeout, condition)
        #expect(reached, "the condition did not hold within \(timeout) s")
        await group.triggerGracefulShutdown()
        try await tasks.waitForAll()
    }
}

/// Services run in a task the test does not wait for: a service stuck on a
/// dead connection may never return, so the test waits on `isFinished` with
/// a bound instead of hanging with it.
final class DetachedServices: Sendable {
    private let group: ServiceGroup
    private let finished = Mutex(false)

    init(_ services: [any Service]) {
        let group = ServiceGroup(configuration: .init(services: services, logger: TestServer.logger))
        self.group = group
        Task { [self] in
            defer { finished.withLock { $0 = true } }
            try await group.run()
        }
    }

    var isFinished: Bool { finished.withLock { $0 } }

    func shutDown() async { await group.triggerGracefulShutdown() }
}

@Suite("Isolation: one policy's failure never stops the others", .timeLimit(.minutes(15)))
struct IsolationTests {
    /// Regression (1): a `sql` target raising in a_hook left b_mail with 3
    /// pending through a whole `tick --for`.
    @Test("a policy whose ticks fail is backed off, logged once, shown in status; the others keep their pace")
    func failingPolicyIsIsolated() async throws { try await LiveTests.exclusive { try await failingPolicyIsIsolatedLive() } }

    func failingPolicyIsIsolatedLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.exec("CREATE TABLE public.target_down (down boolean)")
            try await conn.exec("INSERT INTO public.target_down VALUES (true)")
            try await conn.exec(
                """
                CREATE FUNCTION public.hook(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE plpgsql AS $$
                BEGIN
                  IF (SELECT down FROM public.target_down) THEN RAISE EXCEPTION 'target down'; END IF;
                END $$
                """)
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "a_hook", config: try PolicyConfig(target: .sql(function: "public.hook")).json())
            try await catalog.declare(name: "b_mail", config: "{}")
            try await conn.exec(#"SELECT dispatch_policy.stage_many('a_hook', '[{"args": 1}, {"args": 2}]')"#)
            try await conn.exec(#"SELECT dispatch_policy.stage_many('b_mail', '[{"args": 1}, {"args": 2}, {"args": 3}]')"#)
        }
        let capture = LogCapture()
        try await runUntil(runner(settings, for: .seconds(120), logger: capture.logger), timeout: 60) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar(
                    """
                    SELECT (SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE policy = 'b_mail') = 3
                       AND coalesce((SELECT failures FROM dispatch_policy.runner_failures WHERE policy = 'a_hook'), 0) >= 3
                    """, as: Bool.self)
            }
        }
        try await TestServer.withConnection(settings) { conn async throws in
            // Backoff 0.2, 0.4, 0.8, then 1 s: at most about one attempt a second,
            // where a 50 ms idle pause without backoff would give twenty.
            let (failures, seconds) = try #require(
                try await conn.rows(
                    "SELECT failures, extract(epoch FROM last_failed_at - first_failed_at)::float8 FROM dispatch_policy.runner_failures",
                    logger: TestServer.logger
                ).first
            ).decode((Int, Double).self)
            #expect(Double(failures) <= 4 + seconds, "\(failures) failed ticks in \(seconds) s")
            #expect(try await conn.scalar("SELECT error FROM dispatch_policy.runner_failures", as: String.self).contains("target down"))
        }
        #expect(capture.count(.warning, containing: "policy tick failed") == 1, "the same error is logged once")

        let status = try await cli(["status"], settings: settings)
        #expect(status.stdout.contains("a_hook") && status.stdout.contains("failing"))
        #expect(status.stdout.contains("target down"))
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(
                try await conn.scalar(
                    "SELECT tick_failures >= 2 FROM dispatch_policy.policy_overview WHERE policy = 'a_hook'", as: Bool.self))
            try await conn.exec("UPDATE public.target_down SET down = false")
        }
        // Fixed: the next run admits it and clears the failure.
        let after = try await runner(settings, for: .seconds(1), overrun: .seconds(30)).runLoop()
        #expect(after.policies.first { $0.policy == "a_hook" }?.admitted == 2)
        #expect(!after.hadFailures)
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.runner_failures", as: Int.self) == 0)
        }
        let tickOnce = try await cli(["tick"], settings: settings)
        #expect(tickOnce.status == 0)
    }

    /// Regression (1, 3): maintenance failed as a whole pass, so one bad
    /// row stopped admission for every policy.
    @Test("maintenance is isolated per policy: reaping one policy can fail without stopping the others")
    func maintenanceIsIsolated() async throws { try await LiveTests.exclusive { try await maintenanceIsIsolatedLive() } }

    func maintenanceIsIsolatedLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            for name in ["a", "b"] {
                try await catalog.declare(name: name, config: try PolicyConfig(maxAttempts: 5) { Gate.concurrency(max: 1) }.json())
                try await conn.exec("SELECT dispatch_policy.stage(\(name), '1')")
                try await conn.exec("SELECT dispatch_policy.stage(\(name), '2')")
                _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: name)
            }
            // Both policies have an admitted job whose lease ran out; reaping a's fails.
            try await conn.exec("UPDATE dispatch_policy.admitted_jobs SET lease_expires_at = now() - interval '1 minute'")
            try await conn.exec(
                """
                CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'cannot record a failure of a'; END $$
                """)
            try await conn.exec(
                """
                CREATE TRIGGER refuse BEFORE INSERT ON dispatch_policy.job_failures
                FOR EACH ROW WHEN (NEW.policy = 'a') EXECUTE FUNCTION public.refuse()
                """)
        }
        // The first pass maintains, however long connecting takes on a
        // loaded machine (CI once took over 2.5 s, the default overrun).
        let report = try await runner(settings, for: .milliseconds(500), overrun: .seconds(30)).runLoop()
        #expect(report.maintenanceFailures >= 1)
        #expect(report.lastMaintenanceError?.contains("cannot record a failure of a") == true)
        try await TestServer.withConnection(settings) { conn async throws in
            // b's expired job was reaped and retried; its slot went to a waiting job.
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.job_failures WHERE policy = 'b'", as: Int.self) == 1)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE policy = 'b'", as: Int.self) == 1)
            // a is stuck on its bad row, and shown as failing.
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.runner_failures WHERE policy = 'a'", as: Int.self) == 1)
        }
    }

    /// Found by hostile testing: a `sql` target that sleeps held the runner,
    /// and every other policy, for as long as it slept.
    @Test("a tick slower than the tick timeout fails its policy alone; the others keep admitting")
    func slowTargetTimesOut() async throws { try await LiveTests.exclusive { try await slowTargetTimesOutLive() } }

    func slowTargetTimesOutLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.exec(
                """
                CREATE FUNCTION public.slow(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE sql AS 'SELECT pg_sleep(60)'
                """)
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "a_slow", config: try PolicyConfig(target: .sql(function: "public.slow")).json())
            try await catalog.declare(name: "b_fast", config: "{}")
            try await conn.exec("SELECT dispatch_policy.stage('a_slow', '1'), dispatch_policy.stage('b_fast', '2')")
        }
        var options = TickRunnerOptions()
        options.once = true
        options.tick.timeout = .milliseconds(500)
        let started = ContinuousClock.now
        let report = try await TickRunner(connection: settings, options: options, logger: TestServer.logger).runLoop()
        // Far below the target's 60 s, with room for a loaded machine (a full
        // suite on 2 cores took 8 s for what takes 2 s alone).
        #expect(ContinuousClock.now - started < .seconds(30))
        #expect(report.policies.first { $0.policy == "b_fast" }?.admitted == 1)
        let slow = try #require(report.policies.first { $0.policy == "a_slow" })
        #expect(slow.failures == 1 && slow.lastError?.contains("57014") == true)
    }

    /// Found by hostile testing: the lease reaper ran outside the tick's
    /// timeout, so a worker's long transaction holding a counter held the
    /// runner, and every policy, for as long as it lasted.
    @Test("a worker transaction holding a counter cannot hold the runner: reaping is bounded by the tick timeout")
    func reapIsBounded() async throws { try await LiveTests.exclusive { try await reapIsBoundedLive() } }

    func reapIsBoundedLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "a_reap", config: try PolicyConfig(leaseSeconds: 60) { Gate.globalCap(max: 10) }.json())
            try await catalog.declare(name: "b_fast", config: "{}")
            try await conn.exec(#"SELECT dispatch_policy.stage_many('a_reap', '[{"args": 1}, {"args": 2}]')"#)
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "a_reap")
            try await conn.exec(
                "UPDATE dispatch_policy.admitted_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = (SELECT max(id) FROM dispatch_policy.admitted_jobs)"
            )
        }
        try await TestServer.withConnection(settings) { worker async throws in
            // A worker completes one job inside its own long transaction: it holds the global_cap counter.
            try await worker.exec("BEGIN")
            try await worker.exec("SELECT dispatch_policy.complete((SELECT min(id) FROM dispatch_policy.admitted_jobs))")
            var options = TickRunnerOptions()
            options.idlePause = .milliseconds(50)
            options.tick.timeout = .seconds(1)
            options.failureBackoff = .seconds(5)
            let runner = TickRunner(connection: settings, options: options, logger: TestServer.logger)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { _ = try await runner.runLoop() }
                try await Task.sleep(for: .milliseconds(500))
                try await TestServer.withConnection(settings) { conn async throws in
                    try await conn.exec("SELECT dispatch_policy.stage('b_fast', '1')")
                }
                let admitted = try await waitUntil(15) {
                    try await TestServer.withConnection(settings) { conn async throws in
                        try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE policy = 'b_fast'", as: Int.self)
                            == 1
                    }
                }
                #expect(admitted, "b_fast waited behind a_reap's reaping")
                // Let go first, so the runner ends even if it is stuck behind the lock.
                try await worker.exec("ROLLBACK")
                group.cancelAll()
            }
        }
    }

    /// Found by hostile testing: an error raised by a `sql` target with a
    /// newline and escape codes was printed raw, breaking "one line".
    @Test("errors print on one line, control characters escaped")
    func errorsOnOneLine() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.exec(
                #"""
                CREATE FUNCTION public.liar(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION E'down\n2026-01-01 info forged log line\033[0m'; END $$
                """#)
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p", config: try PolicyConfig(target: .sql(function: "public.liar")).json())
            try await conn.exec("SELECT dispatch_policy.stage('p', '1')")
        }
        let tick = try await cli(["tick"], settings: settings)
        #expect(tick.status == 1)
        #expect(tick.stderr.contains(#"down\n2026-01-01 info forged log line\u{1b}[0m"#), "\(tick.stderr)")
        #expect(!tick.stderr.contains("\u{1B}"))
        // No line starts with the forged text: it stays inside the line of its error.
        #expect(tick.stderr.split(separator: "\n").filter { $0.contains("forged") }.allSatisfy { $0.contains(#"down\n2026"#) })
        let status = try await cli(["status"], settings: settings)
        #expect(!status.stdout.contains("\u{1B}"))
    }

    /// Regression (17): `tick --policy nope` printed "nothing to admit" and
    /// exited 0; `run --policy nope` idled forever.
    @Test("an unknown --policy is an error (42704, exit 1) for tick and run")
    func unknownPolicy() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let tick = try await cli(["tick", "--policy", "nope"], settings: settings)
        #expect(tick.status == 1)
        #expect(tick.stderr.contains("unknown policy: 'nope'") && tick.stderr.contains("42704"))
        let run = try await cli(["run", "--policy", "nope"], settings: settings)
        #expect(run.status == 1)
        #expect(run.stderr.contains("unknown policy: 'nope'"))
    }
}
