import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import Testing

private func setUp(_ settings: ConnectionSettings, _ config: PolicyConfig, jobs: Int, context: [String: String] = [:]) async throws {
    try await TestServer.withConnection(settings) { conn in
        try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: try config.json())
        if jobs > 0 {
            let specs = try (0..<jobs).map { try JobSpec(args: ["n": $0], context: context) }
            _ = try await Stager(executor: conn, logger: TestServer.logger).stageMany(policy: "p", specs)
        }
    }
}

private func admittedCount(_ settings: ConnectionSettings) async throws -> Int {
    try await TestServer.withConnection(settings) { conn in
        try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs", as: Int.self)
    }
}

/// When the last job was admitted (nil before any).
private func lastAdmittedAt(_ settings: ConnectionSettings) async throws -> Date? {
    try await TestServer.withConnection(settings) { conn in
        try await conn.scalar("SELECT max(admitted_at) FROM dispatch_policy.admitted_jobs", as: Date?.self)
    }
}

/// The start of the query a runner sends to look for policies with work.
private let lookingForWork = "%SELECT name, failing, expired, work%"

/// Waits until the runner of the database is idle, as its sessions show in
/// pg_stat_activity: its notification session has subscribed (idle after a
/// `LISTEN`), and its main session is idle after a statement like
/// `lastQuery` that started after `startedAfter`, with the same start on
/// two polls in a row (no pass ran in between). Whether it got there.
private func waitUntilRunnerIdle(
    _ settings: ConnectionSettings, lastQuery: String, startedAfter: Date? = nil, seconds: Int = 30
) async throws -> Bool {
    var previous: Date?
    return try await waitUntil(seconds) {
        let start = try await TestServer.withConnection(settings) { conn in
            try await conn.rows(
                """
                SELECT main.query_start FROM pg_stat_activity main
                WHERE main.datname = current_database() AND main.pid <> pg_backend_pid() AND main.state = 'idle'
                  AND main.query LIKE \(lastQuery)
                  AND (\(startedAfter)::timestamptz IS NULL OR main.query_start > \(startedAfter)::timestamptz)
                  AND EXISTS (SELECT 1 FROM pg_stat_activity l
                              WHERE l.datname = current_database() AND l.pid <> pg_backend_pid()
                                AND l.state = 'idle' AND l.query LIKE 'LISTEN %')
                """, logger: TestServer.logger
            ).first?.decode(Date.self)
        }
        defer { previous = start }
        return start != nil && start == previous
    }
}

/// Options of a runner that, once idle, only a notification wakes within
/// the test's time: both pauses are five minutes.
private func sleepyRunnerOptions() -> TickRunnerOptions {
    var options = TickRunnerOptions()
    options.idlePause = .seconds(300)
    options.busyPause = .seconds(300)
    options.runFor = .seconds(120)
    return options
}

@Suite("Runner", .timeLimit(.minutes(15)))
struct RunnerTests {
    @Test("dispatch-policy tick prints one line per policy: admitted, refused by gate, tokens, time per tick")
    func tickCommand() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await setUp(
            settings,
            PolicyConfig {
                Gate.throttle(name: "per_endpoint", rate: 1, per: 3600, burst: 3)
                Gate.concurrency(max: 2)
            }, jobs: 10)
        let once = try await cli(["tick"], settings: settings)
        #expect(once.status == 0, "\(once.stderr)")
        #expect(once.stdout.hasPrefix("p: admitted 2 in 1 tick ("))
        #expect(once.stdout.contains("refused concurrency=8"))
        #expect(once.stdout.contains("tokens per_endpoint=1.0 (lowest of 1)"))
        // The policy's lane now waits for a slot: no tick has anything to do.
        // --for 10s: a pass not done by the deadline plus its 2 s overrun is
        // cut short and the run exits 1; loaded machines took over 3 s for
        // the first pass (connecting, maintenance, looking for work), and
        // CI once cut pruning short at 3 s.
        let forAWhile = try await cli(["tick", "--for", "10s", "--idle-pause", "200ms"], settings: settings)
        #expect(forAWhile.status == 0, "\(forAWhile.stderr)")
        #expect(forAWhile.stdout == "nothing to admit\n")
        #expect(try await cli(["tick", "--once", "--for", "1s"], settings: settings).status != 0)
        let empty = try await TestServer.shared.freshDatabase()
        #expect(try await cli(["tick"], settings: empty).stdout == "nothing to admit\n")
    }

    /// Twice: the first wake-up could also be the pass a runner makes after
    /// it subscribes; by the second, only the notification can wake it.
    @Test("an idle runner admits a newly staged job on NOTIFY, long before its idle pause ends")
    func listenWakesRunner() async throws { try await LiveTests.exclusive { try await listenWakesRunnerLive() } }

    func listenWakesRunnerLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await setUp(settings, PolicyConfig(), jobs: 0)
        let runner = TickRunner(connection: settings, options: sleepyRunnerOptions(), logger: TestServer.logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { _ = try await runner.runLoop() }
            // Idle after an empty pass, then after the pass that admitted job 1.
            #expect(try await waitUntilRunnerIdle(settings, lastQuery: lookingForWork), "the runner did not go idle")
            for round in 1...2 {
                if round == 2 {
                    let since = try await lastAdmittedAt(settings)
                    #expect(
                        try await waitUntilRunnerIdle(settings, lastQuery: "%dispatch_policy.tick_finish(%", startedAfter: since),
                        "the runner did not go idle again")
                }
                try await TestServer.withConnection(settings) { conn in
                    _ = try await Stager(executor: conn, logger: TestServer.logger).stage(policy: "p", JobSpec(argsJSON: "\(round)"))
                }
                let admitted = try await waitUntil(60) { try await admittedCount(settings) == round }
                #expect(admitted, "job \(round) was not admitted within 60 s although the runner listens (its pauses are 300 s)")
            }
            group.cancelAll()
        }
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("an idle runner refills a slot freed by complete() on NOTIFY dispatch_policy_released")
    func releaseWakesRunner() async throws { try await LiveTests.exclusive { try await releaseWakesRunnerLive() } }

    func releaseWakesRunnerLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await setUp(settings, PolicyConfig { Gate.concurrency(max: 1) }, jobs: 0)
        let runner = TickRunner(connection: settings, options: sleepyRunnerOptions(), logger: TestServer.logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { _ = try await runner.runLoop() }
            #expect(try await waitUntilRunnerIdle(settings, lastQuery: lookingForWork), "the runner did not go idle")
            try await TestServer.withConnection(settings) { conn in
                try await conn.exec(#"SELECT dispatch_policy.stage_many('p', '[{"args": 1}, {"args": 2}]')"#)
            }
            #expect(
                try await waitUntil(60) { try await admittedCount(settings) == 1 },
                "job 1 was not admitted on NOTIFY dispatch_policy_staged")
            // Job 2 waits for the slot; the runner sleeps after the tick that admitted job 1.
            let since = try await lastAdmittedAt(settings)
            #expect(
                try await waitUntilRunnerIdle(settings, lastQuery: "%dispatch_policy.tick_finish(%", startedAfter: since),
                "the runner did not go idle again")
            try await TestServer.withConnection(settings) { conn async throws in
                #expect(try await conn.scalar("SELECT dispatch_policy.complete(min(id)) FROM dispatch_policy.admitted_jobs", as: Bool.self))
            }
            let refilled = try await waitUntil(60) {
                try await TestServer.withConnection(settings) { conn in
                    try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE args = '2'", as: Int.self) == 1
                }
            }
            #expect(refilled, "the freed slot was not refilled within 60 s although the runner listens (its pauses are 300 s)")
            group.cancelAll()
        }
        try await TestServer.withConnection(settings) { conn in
            try await expectCountersConsistent(conn)
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("with rate 0 the runner admits nothing and does not spin")
    func rateZeroDoesNotSpin() async throws { try await LiveTests.exclusive { try await rateZeroDoesNotSpinLive() } }

    func rateZeroDoesNotSpinLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await setUp(settings, PolicyConfig { Gate.throttle(rate: 0, per: 1) }, jobs: 5)
        var options = TickRunnerOptions()
        options.runFor = .milliseconds(1500)
        // A loaded machine may take seconds to connect and finish the first
        // pass; the pass must not be cut off (no pass starts after runFor).
        options.overrun = .seconds(30)
        options.idlePause = .milliseconds(500)
        let report = try await TickRunner(connection: settings, options: options, logger: TestServer.logger).runLoop()
        let summary = try #require(report.policies.first)
        #expect(summary.admitted == 0)
        // It ticked (the throttle refused the jobs), and not more than the idle pause allows.
        #expect(summary.ticks > 0, "the runner never ticked the policy (skipped \(summary.skippedBusy) as busy)")
        #expect(summary.ticks <= 4, "\(summary.ticks) ticks in 1.5 s with a 0.5 s idle pause")
        #expect(summary.refusedByGate["throttle"] == 5 * summary.ticks)
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("a failing pass is retried by a long-running runner; tick --once reports it and exits 1")
    func survivesFailingPass() async throws { try await LiveTests.exclusive { try await survivesFailingPassLive() } }

    func survivesFailingPassLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn in
            try await conn.exec("CREATE TABLE public.target_down (down boolean)")
            try await conn.exec("INSERT INTO public.target_down VALUES (true)")
            try await conn.exec("CREATE TABLE public.delivered (id bigint)")
            try await conn.exec(
                """
                CREATE FUNCTION public.deliver(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE plpgsql AS $$
                BEGIN
                  IF (SELECT down FROM public.target_down) THEN RAISE EXCEPTION 'target down'; END IF;
                  INSERT INTO public.delivered VALUES (id);
                END $$
                """)
        }
        try await setUp(settings, PolicyConfig(target: .sql(function: "public.deliver")), jobs: 3)
        let once = try await cli(["tick"], settings: settings)
        #expect(once.status == 1)
        #expect(once.stderr.contains("target down"))
        let failures = {
            try await TestServer.withConnection(settings) { conn in
                try await conn.scalar(
                    "SELECT coalesce(max(failures), 0) FROM dispatch_policy.runner_failures WHERE policy = 'p'", as: Int.self)
            }
        }
        #expect(try await failures() == 1, "tick --once records its failure")
        var options = TickRunnerOptions()
        options.idlePause = .milliseconds(100)
        options.failureBackoff = .milliseconds(100)
        // The backoff doubles per failure; noticed late on a loaded machine,
        // the next retry would otherwise be long after the repair.
        options.maxFailureBackoff = .milliseconds(500)
        options.runFor = .seconds(180)
        let runner = TickRunner(connection: settings, options: options, logger: TestServer.logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { _ = try await runner.runLoop() }
            // The long-running runner failed too, and retried after its backoff
            // (2.3 s alone; once over 20 s in the whole suite's load).
            #expect(try await waitUntil(45) { try await failures() >= 3 }, "the runner did not fail and retry the policy")
            try await TestServer.withConnection(settings) { conn in try await conn.exec("UPDATE public.target_down SET down = false") }
            let deliveredCount = {
                try await TestServer.withConnection(settings) { conn in
                    try await conn.scalar("SELECT count(*) FROM public.delivered", as: Int.self)
                }
            }
            #expect(try await waitUntil(60) { try await deliveredCount() >= 3 }, "the runner did not deliver after the repair")
            let delivered = try await deliveredCount()
            #expect(delivered == 3)
            // The first successful tick clears the failure.
            #expect(try await waitUntil(60) { try await failures() == 0 }, "the runner_failures row was not cleared")
            group.cancelAll()
        }
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("dispatch-policy run admits continuously and exits 0 on SIGTERM and on SIGINT", arguments: [SIGTERM, SIGINT])
    func runCommandStopsOnSignal(_ signal: Int32) async throws {
        try await LiveTests.exclusive { try await runCommandStopsOnSignalLive(signal) }
    }

    func runCommandStopsOnSignalLive(_ signal: Int32) async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await setUp(settings, PolicyConfig { Gate.concurrency(max: 3) }, jobs: 10)
        let child = try await spawnChild(cliPath, ["run", "--idle-pause", "100ms"], environment: libpqEnvironment(settings))
        #expect(try await waitUntil(60) { try await admittedCount(settings) >= 3 }, "run admitted nothing")
        let admitted = try await admittedCount(settings)
        #expect(admitted == 3)
        // Slots freed by completions are refilled by the running service.
        try await TestServer.withConnection(settings) { conn in
            try await conn.exec("SELECT dispatch_policy.complete(id) FROM dispatch_policy.admitted_jobs")
        }
        #expect(try await waitUntil(60) { try await admittedCount(settings) == 3 }, "the freed slots were not refilled")
        child.signal(signal)
        #expect(await child.wait() == .exited(0), "\(child.output().stderr)")
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("tick runs maintenance: it reaps expired leases and deletes completed jobs older than --retention")
    func maintenanceInRunner() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await setUp(settings, PolicyConfig(), jobs: 3)
        try await TestServer.withConnection(settings) { conn in
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            // Job 1 completed two hours ago, job 2 ten minutes ago; job 3's lease ran out.
            try await conn.exec(
                """
                SELECT dispatch_policy.complete(id, now => now() - interval '2 hours')
                FROM dispatch_policy.admitted_jobs WHERE args = '{"n": 0}'
                """)
            try await conn.exec(
                """
                SELECT dispatch_policy.complete(id, now => now() - interval '10 minutes')
                FROM dispatch_policy.admitted_jobs WHERE args = '{"n": 1}'
                """)
            try await conn.exec("UPDATE dispatch_policy.admitted_jobs SET lease_expires_at = now() - interval '1 second'")
        }
        let tick = try await cli(["tick", "--retention", "1h"], settings: settings)
        #expect(tick.status == 0, "\(tick.stderr)")
        try await TestServer.withConnection(settings) { conn in
            let finished = try await conn.rows(
                "SELECT args::text FROM dispatch_policy.finished_jobs ORDER BY id", logger: TestServer.logger
            )
            .map { try $0.decode(String.self) }
            #expect(finished == [#"{"n": 1}"#], "only the job completed within the retention is kept")
            // Reaped: a failed attempt, re-staged for a retry 2 s out. On a
            // loaded machine the same run's tick may come after those 2 s and
            // admit the retry, so the second attempt is staged or admitted.
            #expect(
                try await conn.rows(
                    "SELECT attempt, error FROM dispatch_policy.job_failures ORDER BY id", logger: TestServer.logger
                ).map { try $0.decode((Int, String).self) }.map { "\($0.0) \($0.1)" } == ["1 lease expired"])
            #expect(
                try await conn.scalar(
                    """
                    SELECT string_agg(attempt::text, ',') FROM (
                      SELECT attempt FROM dispatch_policy.staged_jobs
                      UNION ALL SELECT attempt FROM dispatch_policy.admitted_jobs) AS j
                    """, as: String.self) == "2")
            #expect(try await checkFindings(conn) == [])
        }
    }

    /// Runner A is stuck in a tick of x (its sql target waits for a lock the
    /// test holds); runner B ticks y meanwhile and passes x over as busy.
    @Test("several runners split the policies: one stuck in a policy's tick holds up no other runner, which passes that policy over")
    func runnersSplitPolicies() async throws { try await LiveTests.exclusive { try await runnersSplitPoliciesLive() } }

    func runnersSplitPoliciesLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let key: Int64 = 7_340_004
        try await TestServer.withConnection(settings) { conn in
            try await conn.exec(
                PostgresQuery(
                    unsafeSQL: """
                        CREATE FUNCTION public.held(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE plpgsql AS $$
                        BEGIN PERFORM pg_advisory_xact_lock_shared(\(key)); END $$
                        """))
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "x", config: try PolicyConfig(target: .sql(function: "public.held")).json())
            try await catalog.declare(name: "y", config: "{}")
            try await conn.exec("SELECT dispatch_policy.stage('x', '1'), dispatch_policy.stage('y', '2')")
        }
        func admitted(_ policy: String) async throws -> Int {
            try await TestServer.withConnection(settings) { conn in
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs WHERE policy = \(policy)", as: Int.self)
            }
        }
        try await TestServer.withConnection(settings) { gate in
            try await gate.exec("SELECT pg_advisory_lock(\(key))")
            var optionsA = TickRunnerOptions()
            optionsA.policies = ["x"]
            optionsA.runFor = .seconds(60)
            let runnerA = TickRunner(connection: settings, options: optionsA, logger: TestServer.logger)
            var optionsB = TickRunnerOptions()
            optionsB.idlePause = .milliseconds(50)
            optionsB.runFor = .seconds(5)
            // No pass starts after 5 s, but a loaded machine's first pass must
            // not be cut off.
            optionsB.overrun = .seconds(30)
            let runnerB = TickRunner(connection: settings, options: optionsB, logger: TestServer.logger)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { _ = try await runnerA.runLoop() }
                let stuck = try await waitUntil(30) { try await advisoryLockWaiters(gate, key: key) == 1 }
                #expect(stuck, "runner A never reached x's target")
                var reportB: RunReport?
                var yAdmitted = false
                if stuck {
                    // B ends after 5 s whatever x's tick does (if it waits for x, it waits until A is let go).
                    let b = Task { try await runnerB.runLoop() }
                    yAdmitted = try await waitUntil(30) { try await admitted("y") == 1 }
                    #expect(yAdmitted, "y was not admitted while another runner was in a tick of x")
                    #expect(try await admitted("x") == 0)
                    try await gate.exec("SELECT pg_advisory_unlock(\(key))")
                    reportB = try await b.value
                } else {
                    try await gate.exec("SELECT pg_advisory_unlock(\(key))")
                }
                #expect(try await waitUntil(20) { try await admitted("x") == 1 }, "runner A did not finish its tick of x")
                group.cancelAll()
                if let reportB {
                    let x = reportB.policies.first { $0.policy == "x" }
                    #expect((x?.skippedBusy ?? 0) >= 1, "runner B never found x busy: \(String(describing: x))")
                    #expect((x?.admitted ?? 0) == 0)
                    #expect(reportB.policies.first { $0.policy == "y" }?.admitted == 1)
                }
            }
        }
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs", as: Int.self) == 2)
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.staged_jobs", as: Int.self) == 0)
            #expect(try await checkFindings(conn) == [])
        }
    }
}
