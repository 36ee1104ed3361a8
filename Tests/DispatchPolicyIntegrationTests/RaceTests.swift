import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import Testing

/// Test-only triggers: every admission is recorded, and an in-flight counter
/// that rises above its gate's cap is recorded as a violation the moment it
/// happens.
private let auditSQL: [PostgresQuery] = [
    "CREATE TABLE public.audit_admissions (job_id bigint, attempt int, admitted_at timestamptz, context jsonb)",
    """
    CREATE FUNCTION public.audit_admit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO public.audit_admissions VALUES (NEW.id, NEW.attempt, NEW.admitted_at, NEW.context);
      RETURN NEW;
    END $$
    """,
    "CREATE TRIGGER audit_admit AFTER INSERT ON dispatch_policy.admitted_jobs FOR EACH ROW EXECUTE FUNCTION public.audit_admit()",
    "CREATE TABLE public.audit_violations (gate text, partition text, in_flight int, cap numeric)",
    """
    CREATE FUNCTION public.audit_counter() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
      g jsonb;
      cap numeric;
    BEGIN
      IF TG_OP = 'UPDATE' AND NEW.in_flight <= OLD.in_flight THEN RETURN NEW; END IF;
      SELECT x INTO g FROM dispatch_policy.policies p, jsonb_array_elements(p.config -> 'gates') x
      WHERE p.name = NEW.policy AND coalesce(x ->> 'name', x ->> 'type') = NEW.gate;
      IF g ->> 'type' IN ('concurrency', 'global_cap') THEN
        cap := (g ->> 'max')::numeric;
      ELSE
        SELECT greatest(a.current_max, coalesce((g ->> 'initial_max')::int, 3)) INTO cap
        FROM dispatch_policy.adaptive_stats a
        WHERE a.policy = NEW.policy AND a.gate = NEW.gate AND a.partition = NEW.partition;
      END IF;
      IF NEW.in_flight > cap THEN
        INSERT INTO public.audit_violations VALUES (NEW.gate, NEW.partition, NEW.in_flight, cap);
      END IF;
      RETURN NEW;
    END $$
    """,
    "CREATE TRIGGER audit_counter AFTER INSERT OR UPDATE ON dispatch_policy.inflight_counters FOR EACH ROW EXECUTE FUNCTION public.audit_counter()",
]

private let raceConfig = PolicyConfig(roundRobinBy: "{acct}", batchSize: 40, roundRobinQuantum: 5, maxAttempts: 3) {
    Gate.throttle(name: "per_endpoint", rate: 25, per: 1, burst: 5, partitionBy: "{ep}")
    Gate.concurrency(max: 3, partitionBy: "{acct}")
    Gate.globalCap(max: 8)
    Gate.fairInterleave()
    Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 2, targetLagMs: 200, min: 1)
}

/// Claims, works briefly, completes (or fails one in ten) until every job is
/// finished or the deadline passes.
private func work(_ settings: ConnectionSettings, jobs: Int, until deadline: ContinuousClock.Instant) async throws {
    try await TestServer.withConnection(settings) { conn in
        var n = 0
        while ContinuousClock.now < deadline {
            let finished = try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs", as: Int.self)
            if finished >= jobs { return }
            let claimed = try await conn.rows("SELECT id FROM dispatch_policy.claim('default', 'test-worker', 4)", logger: TestServer.logger)
                .map { try $0.decode(Int64.self) }
            if claimed.isEmpty {
                try await Task.sleep(for: .milliseconds(5))
                continue
            }
            try await Task.sleep(for: .milliseconds(Int.random(in: 1...15)))
            for id in claimed {
                n += 1
                if n % 10 == 0 {
                    _ = try await conn.rows("SELECT dispatch_policy.fail(\(id), 'flaky', interval '0')", logger: TestServer.logger)
                } else {
                    _ = try await conn.rows("SELECT dispatch_policy.complete(\(id))", logger: TestServer.logger)
                }
            }
        }
        Issue.record("workers did not finish \(jobs) jobs in time")
    }
}

@Suite("Admission: invariants under racing runners", .timeLimit(.minutes(8)))
struct RaceTests {
    @Test("runners racing with workers: no double admission, no cap exceeded, throttle window held, every job finished", arguments: [1, 4])
    func racingRunners(runners: Int) async throws { try await LiveTests.exclusive { try await racingRunnersLive(runners: runners) } }

    func racingRunnersLive(runners: Int) async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let jobs = 300
        let staged = try await TestServer.withConnection(settings) { conn in
            for statement in auditSQL { try await conn.exec(statement) }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "race", config: try raceConfig.json())
            let specs = try (0..<jobs).map { i in
                try JobSpec(args: ["n": i], context: ["acct": "a\(i % 5)", "ep": "e\(i % 2)"])
            }
            return try await Stager(executor: conn, logger: TestServer.logger).stageMany(policy: "race", specs).compactMap { $0 }
        }
        #expect(staged.count == jobs)

        let deadline = ContinuousClock.now + .seconds(90)
        let options = {
            var options = TickRunnerOptions()
            options.runFor = .seconds(90)
            options.busyPause = .milliseconds(2)
            options.idlePause = .milliseconds(20)
            return options
        }()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<runners {
                group.addTask {
                    _ = try await TickRunner(connection: settings, options: options, logger: TestServer.logger).runLoop()
                }
            }
            try await work(settings, jobs: jobs, until: deadline)
            group.cancelAll()
            while let next = await group.nextResult() {
                if case .failure(let error) = next, !(error is CancellationError) {
                    // A runner cancelled mid-query reports the cancelled query; anything else is a failure.
                    let text = String(describing: error)
                    if !text.contains("cancel") && !text.contains("Cancel") { Issue.record("runner failed: \(error)") }
                }
            }
        }

        try await TestServer.withConnection(settings) { conn in
            // Every job ended exactly once: completed, or dead after 3 attempts. The
            // ledger is the ids stage_many returned: none lost, none made up.
            let finished = try await conn.rows("SELECT id FROM dispatch_policy.finished_jobs ORDER BY id", logger: TestServer.logger)
                .map { try $0.decode(Int64.self) }
            #expect(finished == staged.sorted())
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.staged_jobs", as: Int.self) == 0)
            // Per job: each attempt admitted once, and ended once: all but a completed last one as a recorded failure.
            let unbalanced = try await conn.rows("""
                SELECT f.id || ': ' || f.status || ' after ' || f.attempts || ' attempts, admitted '
                       || (SELECT count(*) FROM public.audit_admissions a WHERE a.job_id = f.id) || ' times, failed '
                       || (SELECT count(*) FROM dispatch_policy.job_failures j WHERE j.job_id = f.id) || ' times'
                FROM dispatch_policy.finished_jobs f
                WHERE f.attempts <> (SELECT count(*) FROM public.audit_admissions a WHERE a.job_id = f.id)
                   OR f.attempts - (f.status = 'completed')::int <> (SELECT count(*) FROM dispatch_policy.job_failures j WHERE j.job_id = f.id)
                ORDER BY f.id
                """, logger: TestServer.logger).map { try $0.decode(String.self) }
            #expect(unbalanced == [])
            // No attempt was admitted twice.
            #expect(try await conn.scalar(
                "SELECT count(*) FROM (SELECT job_id, attempt FROM public.audit_admissions GROUP BY 1, 2 HAVING count(*) > 1) d", as: Int.self) == 0)
            #expect(try await conn.scalar("SELECT count(*) FROM public.audit_admissions", as: Int.self)
                    == (try await conn.scalar("SELECT sum(attempts) FROM dispatch_policy.finished_jobs", as: Int.self)))
            // No cap was ever exceeded, and every slot was given back.
            let violations = try await conn.rows("SELECT gate || '/' || partition || ' ' || in_flight || ' > ' || cap FROM public.audit_violations", logger: TestServer.logger)
                .map { try $0.decode(String.self) }
            #expect(violations == [])
            #expect(try await conn.scalar("SELECT coalesce(sum(in_flight), 0) FROM dispatch_policy.inflight_counters", as: Int.self) == 0)

            // Throttle: in any window of length t, at most burst + rate × t / per admissions per endpoint.
            for endpoint in ["e0", "e1"] {
                let times = try await conn.rows(
                    "SELECT extract(epoch FROM admitted_at)::float8 FROM public.audit_admissions WHERE context ->> 'ep' = \(endpoint) ORDER BY admitted_at",
                    logger: TestServer.logger
                ).map { try $0.decode(Double.self) }
                var worst = 0.0
                for i in times.indices {
                    for j in i..<times.count {
                        let allowed = 5 + 25 * (times[j] - times[i]) / 1
                        worst = max(worst, Double(j - i + 1) - allowed)
                    }
                }
                #expect(worst <= 1e-6, "endpoint \(endpoint) exceeded its throttle by \(worst) admissions")
            }
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("a runner killed mid-tick (SIGKILL) loses no job and leaks no slot")
    func killedRunner() async throws { try await LiveTests.exclusive { try await killedRunnerLive() } }

    func killedRunnerLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let jobs = 3000
        try await TestServer.withConnection(settings) { conn in
            let config = PolicyConfig(roundRobinBy: "{acct}", batchSize: 500) {
                Gate.concurrency(max: 200, partitionBy: "{acct}")
                Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 150, targetLagMs: 60_000)
            }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "k", config: try config.json())
            try await conn.exec("""
                SELECT dispatch_policy.stage_many('k', (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('acct', 'a' || (i % 7))))
                                                        FROM generate_series(1, \(jobs)) i))
                """)
        }
        var env = libpqEnvironment(settings)
        env["DATABASE_URL"] = nil
        for round in 0..<4 {
            let child = try spawnChild(cliPath, ["run", "--busy-pause", "0ms", "--idle-pause", "10ms"], environment: env)
            // Complete jobs meanwhile, one per transaction as a worker does, so
            // slots are released while ticks take them.
            try await TestServer.withConnection(settings) { conn in
                for _ in 0..<(10 + round * 7) {
                    for id in try await conn.rows("SELECT id FROM dispatch_policy.admitted_jobs ORDER BY random() LIMIT 20", logger: TestServer.logger)
                        .map({ try $0.decode(Int64.self) }) {
                        _ = try await conn.rows("SELECT dispatch_policy.complete(\(id))", logger: TestServer.logger)
                    }
                    try await Task.sleep(for: .milliseconds(15))
                }
            }
            kill(child.pid, SIGKILL)
            let ending = await child.wait()
            #expect(ending == .signaled(SIGKILL), "the runner ended before it was killed: \(child.output().stderr)")
        }
        try await TestServer.withConnection(settings) { conn in
            let total = try await conn.scalar("""
                SELECT (SELECT count(*) FROM dispatch_policy.staged_jobs) + (SELECT count(*) FROM dispatch_policy.admitted_jobs)
                     + (SELECT count(*) FROM dispatch_policy.finished_jobs)
                """, as: Int.self)
            #expect(total == jobs)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs", as: Int.self) > 0)
            try await expectCountersConsistent(conn)
        }
    }
}

/// Regression (issue 8, item 3): a runner SIGKILLed while the server ran a
/// slow `sql` target kept its session, and the policy's lock, until the
/// target returned (minutes), because nothing made the server look for the
/// client.
@Suite("Sessions of a killed runner", .timeLimit(.minutes(8)))
struct KilledSessionTests {
    @Test("a runner killed during a slow sql target gives its policy lock back within seconds")
    func killedRunnerReleasesLock() async throws { try await LiveTests.exclusive { try await killedRunnerReleasesLockLive() } }

    func killedRunnerReleasesLockLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.exec("""
                CREATE FUNCTION public.slow(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE sql AS 'SELECT pg_sleep(60)'
                """)
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(name: "slow", config: try PolicyConfig(target: .sql(function: "public.slow")).json())
            try await conn.exec("SELECT dispatch_policy.stage('slow', '1')")
        }
        let child = try spawnChild(cliPath, ["run", "--tick-timeout", "5m"], environment: libpqEnvironment(settings))
        let sleeping = try await waitUntil(30) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar("""
                    SELECT count(*)::int FROM pg_stat_activity
                    WHERE datname = current_database() AND state = 'active' AND query LIKE '%dispatch_policy.admit(%'
                      AND pid <> pg_backend_pid() AND now() - query_start > interval '1 second'
                    """, as: Int.self) == 1
            }
        }
        kill(child.pid, SIGKILL)
        _ = await child.wait()
        try #require(sleeping, "the runner never reached the slow target: \(child.output().stderr)")
        let killedAt = ContinuousClock.now
        // The server notices the client is gone at its next check (2 s by
        // default) and ends the statement: the lock comes back. Before, it
        // stayed until the target's 60 s were over.
        let released = try await waitUntil(40) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar("""
                    SELECT count(*)::int FROM pg_stat_activity
                    WHERE datname = current_database() AND query LIKE '%dispatch_policy.admit(%' AND pid <> pg_backend_pid()
                    """, as: Int.self) == 0
            }
        }
        #expect(released)
        #expect(ContinuousClock.now - killedAt < .seconds(20), "the lock came back \(ContinuousClock.now - killedAt) after the kill")
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.staged_jobs", as: Int.self) == 1)
        }
    }
}
