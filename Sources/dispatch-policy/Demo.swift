import ArgumentParser
import DispatchPolicy
import DispatchPolicyAdmin
import EmbeddedPostgres
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
    import Glibc
    import UnixSignals
#endif

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Watch admission control work: a private PostgreSQL, policies with every gate, a noisy tenant, live numbers.",
        discussion: """
            Without --database-url (or DATABASE_URL) it starts a throwaway PostgreSQL cluster with the \
            system's binaries and removes it at the end (unless --keep). It stages a burst across many \
            tenants, one of them noisy, runs the runner and simulated workers in this process, shows a \
            table refreshed about once a second, and ends with a summary of what each gate held: the throttle, the \
            per-account and global caps, fairness, the adaptive caps, a cost-weighted budget shared by two accounts \
            of weights 3 and 1, and an endpoint's 429s deferred with backpressure. Ctrl-C ends it early.
            """)

    @Option(name: .customLong("database-url"), help: "Use this database instead of a private cluster.")
    var databaseURL: String?

    @Option(help: "How long to run, such as 30s (1s to 1d).")
    var duration: String = "30s"

    func validate() throws {
        do { _ = try DurationParser.parse(duration, flag: "--duration", within: CLILimits.demo) } catch let error as DispatchPolicyError {
            throw ValidationError(error.message)
        }
        if let admin, AdminServer.parseBind(admin) == nil {
            throw ValidationError("--admin must be HOST:PORT, [IPv6]:PORT or :PORT, got \(admin)")
        }
    }

    @Flag(help: "Leave the private cluster running at the end and print its URL.")
    var keep = false

    @Option(help: "Also serve the admin web UI (read-only) on HOST:PORT while the demo runs, such as 127.0.0.1:8080.")
    var admin: String?

    func run() async throws {
        var logger = Logger(label: "dispatch-policy.demo")
        logger.logLevel = .warning
        try await reportingErrors {
            let runFor = try DurationParser.parse(duration, flag: "--duration", within: CLILimits.demo)
            var cluster: EmbeddedPostgres?
            var settings: ConnectionSettings
            if let url = databaseURL ?? ProcessInfo.processInfo.environment["DATABASE_URL"], !url.isEmpty {
                settings = try ConnectionSettings.resolve(url: url)
            } else {
                print("starting a private PostgreSQL cluster...")
                do {
                    cluster = try await EmbeddedPostgres.start(.init(keepRunning: keep), logger: logger)
                } catch {
                    throw DispatchPolicyError(code: .invalidConnectionSettings, message: "cannot start a private PostgreSQL: \(error)")
                }
                settings = try ConnectionSettings(url: cluster!.url())
            }
            settings.fallbackApplicationName = "dispatch-policy demo"
            let adminURL = SharedAddress()
            let driver = DemoDriver(settings: settings, runFor: runFor, logger: logger, adminURL: adminURL)
            try await driver.prepare()
            var runnerOptions = TickRunnerOptions()
            // Only the demo's own policies: a shared database's others are not ours.
            runnerOptions.policies = ["demo_api", "demo_reports", "demo_webhooks"]
            runnerOptions.busyPause = .milliseconds(20)
            runnerOptions.idlePause = .milliseconds(250)
            let runner = TickRunner(connection: settings, options: runnerOptions, logger: logger)
            var webhookOptions = WorkerOptions()
            // More workers than the global cap: the cap, not the workers, is what binds.
            webhookOptions.concurrency = 32
            webhookOptions.name = "demo-webhooks"
            var webhooks = Worker(connection: settings, options: webhookOptions, logger: logger)
            // Four small tenants' endpoints are slow: their account's
            // concurrency cap binds. The others answer fast.
            // One tenant's endpoint answers 429 with Retry-After: 1 to the
            // first try of every webhook: the handler defers the job (no
            // attempt counted) and pauses the endpoint's throttle partition.
            let answered429 = Mutex(Set<Int64>())
            webhooks.register("demo_webhooks") { job in
                let slow = DemoDriver.slowTenants.contains { job.contextJSON.contains(#""account": "\#($0)""#) }
                if job.contextJSON.contains(#""account": "\#(DemoDriver.backpressureTenant)""#),
                    answered429.withLock({ $0.insert(job.id).inserted })
                {
                    throw Defer(for: .seconds(1), reason: "429 Too Many Requests (Retry-After: 1)", pausePartition: true)
                }
                try await Task.sleep(for: .milliseconds(slow ? Int.random(in: 100...250) : Int.random(in: 20...80)))
            }
            // Calls to a partner API, on workers of their own (the webhooks'
            // must all be free for their global cap to bind): quick, and
            // never the bottleneck; the budget of units per second is.
            var apiOptions = WorkerOptions()
            apiOptions.concurrency = 8
            apiOptions.name = "demo-api"
            var api = Worker(connection: settings, options: apiOptions, logger: logger)
            api.register("demo_api") { _ in
                try await Task.sleep(for: .milliseconds(Int.random(in: 5...20)))
            }
            var reportOptions = WorkerOptions()
            reportOptions.queues = ["reports"]
            reportOptions.concurrency = 10
            reportOptions.retryIn = .seconds(1)
            reportOptions.name = "demo-reports"
            var reports = Worker(connection: settings, options: reportOptions, logger: logger)
            reports.register("demo_reports") { _ in
                try await Task.sleep(for: .milliseconds(Int.random(in: 60...240)))
                if Int.random(in: 0..<100) < 3 { throw DemoFailure() }
            }
            var services: [ServiceGroupConfiguration.ServiceConfiguration] = [
                .init(service: runner), .init(service: webhooks), .init(service: reports), .init(service: api),
                .init(service: driver, successTerminationBehavior: .gracefullyShutdownGroup),
            ]
            if let admin {
                // The admin UI on the demo's database, read-only, for as long as the demo runs.
                let client = PostgresClient(
                    configuration: try settings.with(session: .admin).clientConfiguration(), backgroundLogger: logger)
                let server = try AdminServer(
                    store: AdminStore(executor: client, logger: logger), options: AdminOptions(),
                    registry: ProcessMetrics.registry, logger: logger)
                services.append(.init(service: client))
                services.append(
                    .init(
                        service: try httpService(
                            router: server.router(), bind: admin, flag: "--admin", logger: logger,
                            onListening: { address in adminURL.set(address) })))
            }
            let group = ServiceGroup(
                configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
            try await group.run()
            try await driver.printSummary()
            if let cluster {
                if keep {
                    print("\nthe database is still running: \(cluster.url())")
                    print("look at it in the admin UI: dispatch-policy admin --database-url '\(cluster.url())'")
                    print(
                        "stop it with: \(geteuid() == 0 ? "runuser -u postgres -- " : "")\(cluster.binDirectory)/pg_ctl -D \(cluster.dataDirectory) stop"
                    )
                } else {
                    try? await cluster.stop()
                }
            }
        }
    }
}

/// An address a listener reports once it is up.
final class SharedAddress: Sendable {
    private let state = Mutex<String?>(nil)
    func set(_ address: String) { state.withLock { $0 = address } }
    var value: String? { state.withLock { $0 } }
}

struct DemoFailure: Error, CustomStringConvertible {
    var description: String { "simulated report failure" }
}

/// Declares the demo policies, stages the burst, shows the live table until
/// the time is up, then returns (which shuts the group down).
struct DemoDriver: Service {
    let settings: ConnectionSettings
    let runFor: Duration
    let logger: Logger
    /// Where the admin UI is served during the demo (nil: it is not, or not yet).
    let adminURL: SharedAddress
    /// When the demo began (its history starts here).
    let startedAt = Date()

    static let smallTenants = (1...12).map { String(format: "t%02d", $0) }
    /// Small tenants whose endpoints are slow and who have more to send:
    /// their account's concurrency cap binds.
    static let slowTenants: Set<String> = ["t01", "t02", "t03", "t04"]
    /// A small tenant whose endpoint answers 429 to each webhook's first try.
    static let backpressureTenant = "t05"
    static let noisyRate = 5.0
    static let noisyBurst = 5.0
    static let accountCap = 4
    /// The partner API's budget: units per second, and its burst.
    static let apiRate = 40.0
    static let globalCap = 24

    func prepare() async throws {
        try await settings.withConnection(logger: logger) { conn in try await prepare(conn) }
    }

    private func prepare(_ conn: PostgresConnection) async throws {
        try await Migrator(logger: logger).migrate(on: conn)
        let webhooks = PolicyConfig(roundRobinBy: "{account}", batchSize: 200) {
            Gate.throttle(
                name: "per_endpoint", rate: .context("rate_limit", default: 30), per: 1,
                burst: .context("rate_limit", default: 30), partitionBy: "{endpoint}")
            Gate.concurrency(name: "per_account", max: .constant(Double(Self.accountCap)), partitionBy: "{account}")
            Gate.globalCap(max: Self.globalCap)
            Gate.fairInterleave()
        }
        let reports = PolicyConfig(roundRobinBy: "{account}", batchSize: 100, maxAttempts: 5) {
            Gate.adaptiveConcurrency(name: "adaptive", partitionBy: "{account}", initialMax: 2, targetLagMs: 250, min: 1, max: 12)
        }
        // A partner API's budget, shared by every account: 40 units a second.
        // A lookup costs 1 unit, an export 5; gold accounts (weight 3) get
        // three turns of the round-robin for a free account's one.
        let api = PolicyConfig(roundRobinBy: "{account}", batchSize: 100, roundRobinWeight: .context("weight", default: 1)) {
            Gate.throttle(
                name: "partner_budget", rate: .constant(Self.apiRate), per: 1, burst: .constant(Self.apiRate),
                cost: .context("units", default: 1))
        }
        let catalog = PolicyCatalog(executor: conn, logger: logger)
        try await catalog.declare(name: "demo_api", config: try api.json())
        try await catalog.declare(name: "demo_webhooks", config: try webhooks.json())
        try await catalog.declare(name: "demo_reports", config: try reports.json())
        // Start from a clean slate when run twice against the same database.
        for table in [
            "staged_jobs", "admitted_jobs", "finished_jobs", "job_failures", "throttle_buckets",
            "inflight_counters", "adaptive_stats", "observations", "observation_minutes", "job_deferrals",
        ] {
            _ = try await conn.rows(
                PostgresQuery(unsafeSQL: "DELETE FROM dispatch_policy.\(table) WHERE policy LIKE 'demo\\_%'"), logger: logger)
        }
        _ = try await conn.rows("DELETE FROM dispatch_policy.dedupe_keys WHERE policy LIKE 'demo\\_%'", logger: logger)
        let stager = Stager(executor: conn, logger: logger)
        // The noisy tenant first: 3,000 webhooks to one endpoint limited to 20/s, and 300 reports.
        let noisy = try (0..<3000).map { i in
            try JobSpec(args: ["event": i], context: ["account": "acme", "endpoint": "acme-hook", "rate_limit": "\(Int(Self.noisyRate))"])
        }
        _ = try await stager.stageMany(policy: "demo_webhooks", noisy)
        _ = try await stager.stageMany(
            policy: "demo_reports", try (0..<300).map { try JobSpec(args: ["report": $0], context: ["account": "acme"], queue: "reports") })
        // Two accounts of the partner API, both far more than the budget
        // allows: every fourth call is an export (5 units).
        for (account, weight) in [("gold", 3), ("free", 1)] {
            _ = try await stager.stageMany(
                policy: "demo_api",
                try (0..<2000).map {
                    try JobSpec(
                        args: ["call": $0],
                        context: ["account": account, "weight": "\(weight)", "units": $0 % 4 == 3 ? "5" : "1"])
                })
        }
        // Then twelve small tenants behind it: at first they all want more
        // slots than the global cap has; four of them, with slow endpoints
        // and 40 webhooks each, then keep their account's cap full.
        for tenant in Self.smallTenants {
            _ = try await stager.stageMany(
                policy: "demo_webhooks",
                try (0..<(Self.slowTenants.contains(tenant) ? 40 : 15)).map {
                    try JobSpec(args: ["event": $0], context: ["account": tenant, "endpoint": "\(tenant)-hook"])
                })
            _ = try await stager.stageMany(
                policy: "demo_reports",
                try (0..<10).map {
                    try JobSpec(args: ["report": $0], context: ["account": tenant], queue: "reports")
                })
        }
    }

    struct Sample {
        var adaptiveCaps: [String: (min: Int, max: Int)] = [:]
    }

    func run() async throws {
        try await settings.withConnection(logger: logger) { conn in try await show(conn) }
    }

    private func show(_ conn: PostgresConnection) async throws {
        let started = ContinuousClock.now
        var previous: [String: Int] = [:]
        var sample = Sample()
        let live = isatty(STDOUT_FILENO) != 0
        while !Task.isShuttingDownGracefully {
            let elapsed = ContinuousClock.now - started
            if elapsed >= runFor { break }
            do {
                try await render(conn, elapsed: elapsed, previous: &previous, sample: &sample, live: live)
            } catch {
                logger.warning("demo display failed", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: .seconds(1))
            // A trickle of new work from the small tenants keeps the table moving.
            let tenant = Self.smallTenants.randomElement() ?? "t01"
            _ = try? await Stager(executor: conn, logger: logger).stage(
                policy: "demo_webhooks", try JobSpec(args: ["event": "live"], context: ["account": tenant, "endpoint": "\(tenant)-hook"]))
        }
        DemoDriver.lastSample.withLock { $0 = sample }
    }

    static let lastSample = Mutex(Sample())

    /// Admissions so far, per policy: every attempt that was ever admitted.
    func admissions(_ conn: PostgresConnection) async throws -> [String: Int] {
        var result: [String: Int] = [:]
        for row in try await conn.rows(
            """
            SELECT policy, sum(n)::int FROM (
              SELECT policy, count(*) AS n FROM dispatch_policy.admitted_jobs GROUP BY 1
              UNION ALL SELECT policy, sum(attempts) FROM dispatch_policy.finished_jobs GROUP BY 1
              UNION ALL SELECT policy, sum(attempt - 1) FROM dispatch_policy.staged_jobs GROUP BY 1) x
            WHERE policy LIKE 'demo\\_%' GROUP BY 1
            """, logger: logger
        ) {
            let (policy, n) = try row.decode((String, Int).self)
            result[policy] = n
        }
        return result
    }

    func render(_ conn: PostgresConnection, elapsed: Duration, previous: inout [String: Int], sample: inout Sample, live: Bool) async throws
    {
        let admitted = try await admissions(conn)
        var lines: [String] = []
        lines.append(
            "dispatch-policy demo — \(elapsed.components.seconds)s of \(runFor.components.seconds)s   (Ctrl-C ends it)"
                + (adminURL.value.map { "   admin UI: \($0)" } ?? ""))
        lines.append("")
        var rows: [[String]] = []
        for row in try await conn.rows(
            """
            SELECT policy, pending, in_flight, completed_24h, failed_24h FROM dispatch_policy.policy_overview
            WHERE policy LIKE 'demo\\_%' ORDER BY policy
            """, logger: logger
        ) {
            let (policy, pending, inFlight, done, failed) = try row.decode((String, Int, Int, Int, Int).self)
            let rate = (admitted[policy] ?? 0) - (previous[policy] ?? admitted[policy] ?? 0)
            rows.append([policy, "\(pending)", "\(rate)", "\(inFlight)", "\(done)", "\(failed)"])
        }
        previous = admitted
        lines.append(TextTable.render(header: ["POLICY", "PENDING", "ADMITTED/S", "IN FLIGHT", "DONE", "FAILED"], rows: rows))
        lines.append("")
        var partitions: [[String]] = []
        for row in try await conn.rows(
            """
            SELECT c.gate || '/' || c.partition, c.in_flight,
                   coalesce(a.current_max::text, CASE c.gate WHEN 'per_account' THEN '4' WHEN 'global_cap' THEN '24' END, '-'),
                   coalesce(round(a.ewma_lag_ms)::text || ' ms', '-')
            FROM dispatch_policy.inflight_counters c
            LEFT JOIN dispatch_policy.adaptive_stats a USING (policy, gate, partition)
            WHERE c.policy LIKE 'demo\\_%' AND (c.partition IN ('acme', 't01', 't02', 'default'))
            ORDER BY c.gate, c.partition
            """, logger: logger
        ) {
            let (key, inFlight, cap, ewma) = try row.decode((String, Int, String, String).self)
            partitions.append([key, "\(inFlight)", cap, "-", ewma])
        }
        for row in try await conn.rows(
            """
            SELECT gate || '/' || partition,
                   round(dispatch_policy._bucket_tokens(tokens, rate, per_seconds, burst, refilled_at, now())::numeric, 1)::text
            FROM dispatch_policy.throttle_buckets WHERE policy = 'demo_webhooks' AND partition IN ('acme-hook', 't01-hook')
            ORDER BY 1
            """, logger: logger
        ) {
            let (key, tokens) = try row.decode((String, String).self)
            partitions.append([key, "-", "-", tokens, "-"])
        }
        lines.append(TextTable.render(header: ["GATE/PARTITION", "IN FLIGHT", "CAP", "TOKENS", "EWMA LAG"], rows: partitions))

        for row in try await conn.rows(
            "SELECT partition, current_max FROM dispatch_policy.adaptive_stats WHERE policy = 'demo_reports'", logger: logger)
        {
            let (partition, cap) = try row.decode((String, Int).self)
            let seen = sample.adaptiveCaps[partition] ?? (cap, cap)
            sample.adaptiveCaps[partition] = (min(seen.min, cap), max(seen.max, cap))
        }
        if live {
            print("\u{1B}[H\u{1B}[2J" + lines.joined(separator: "\n"))
        } else {
            // Not a terminal (CI, a pipe): one compact line a second.
            print(
                "t=\(elapsed.components.seconds)s "
                    + rows.map { "\($0[0]): pending \($0[1]), admitted/s \($0[2]), in flight \($0[3]), done \($0[4])" }.joined(
                        separator: "; "))
        }
        fflush(nil)
    }

    /// What each gate held, from the database.
    func printSummary() async throws {
        try await settings.withConnection(logger: logger) { conn in try await printSummary(conn) }
    }

    private func printSummary(_ conn: PostgresConnection) async throws {
        let sample = DemoDriver.lastSample.withLock { $0 }
        print("\n=== summary ===")
        // Throttle: admissions of the noisy endpoint against burst + rate × t.
        guard
            let throttled = try await conn.rows(
                """
                SELECT count(*)::int, coalesce(extract(epoch FROM max(t) - min(t)), 0)::float8 FROM (
                  SELECT admitted_at AS t FROM dispatch_policy.admitted_jobs WHERE context ->> 'endpoint' = 'acme-hook'
                  UNION ALL SELECT admitted_at FROM dispatch_policy.finished_jobs WHERE context ->> 'endpoint' = 'acme-hook') x
                """, logger: logger
            ).first?.decode((Int, Double).self)
        else { return }
        let (allowed, throttleHeld) = Self.bucketBound(
            taken: Double(throttled.0), burst: Self.noisyBurst, rate: Self.noisyRate, over: throttled.1)
        let throttleRefusals = try await Self.refusals(
            conn, gate: "per_endpoint", partitions: ["acme-hook"], since: startedAt, logger: logger)
        print(
            String(
                format: "throttle     acme-hook: %d admitted in %.1f s (limit %.0f/s, burst %.0f: at most %.0f); %@ %@",
                throttled.0, throttled.1, Self.noisyRate, Self.noisyBurst, allowed, Self.refusedText(throttleRefusals),
                throttleHeld ? "HELD" : "EXCEEDED"))
        // Fairness: how long small tenants waited for their first admission, behind acme's 3,000.
        let waits = try await conn.rows(
            """
            SELECT context ->> 'account', extract(epoch FROM min(admitted_at) - min(created_at))::float8 FROM (
              SELECT context, admitted_at, created_at FROM dispatch_policy.admitted_jobs WHERE policy = 'demo_webhooks'
              UNION ALL SELECT context, admitted_at, created_at FROM dispatch_policy.finished_jobs WHERE policy = 'demo_webhooks') x
            GROUP BY 1
            """, logger: logger
        ).map { try $0.decode((String, Double).self) }
        let small = waits.filter { $0.0 != "acme" }
        let worst = small.map(\.1).max() ?? .infinity
        print(
            String(
                format: "fairness     %d of %d small tenants admitted; the slowest waited %.2f s for its first job, behind acme's 3,000",
                small.count, Self.smallTenants.count, worst))
        let pendingAcme = try await conn.scalar(
            "SELECT count(*)::int FROM dispatch_policy.staged_jobs WHERE context ->> 'account' = 'acme' AND policy = 'demo_webhooks'")
        print(
            "             acme still has \(pendingAcme) webhooks waiting"
                + (throttleRefusals > 0 ? ": its endpoint's limit, not the other tenants, sets its pace" : ""))
        // Caps, from every attempt's run: [started_at, finished_at) of the
        // webhooks (still running: until now). A run lies within the time its
        // job held a slot (claimed after its admission committed, finished
        // before its release committed), so two runs that overlap held two
        // slots at once: the peak is never above what the gate let through.
        // (Admission times would not do: admitted_at is the tick's clock,
        // read before a slot released in the same instant.)
        // Whether a gate bound: the refusals the ticks recorded in the history.
        let perAccount = try await Self.runPeak(conn, partitionBy: "account", logger: logger)
        let global = try await Self.runPeak(conn, partitionBy: nil, logger: logger)
        let accountRefusals = try await Self.refusals(
            conn, gate: "per_account", partitions: ["acme"] + Self.smallTenants, since: startedAt, logger: logger)
        let globalRefusals = try await Self.refusals(conn, gate: "global_cap", partitions: ["default"], since: startedAt, logger: logger)
        print(
            "concurrency  at most \(perAccount) webhooks ran at once per account (cap \(Self.accountCap)); "
                + Self.refusedText(accountRefusals) + (perAccount <= Self.accountCap ? " HELD" : " EXCEEDED"))
        print(
            "global cap   at most \(global) webhooks ran at once in all (cap \(Self.globalCap)); "
                + Self.refusedText(globalRefusals) + (global <= Self.globalCap ? " HELD" : " EXCEEDED"))
        let caps = sample.adaptiveCaps.sorted { $0.key < $1.key }.prefix(4).map { "\($0.key) \($0.value.min)–\($0.value.max)" }
        let final = try await conn.rows(
            "SELECT partition, current_max, coalesce(round(ewma_lag_ms)::int, 0) FROM dispatch_policy.adaptive_stats WHERE policy = 'demo_reports' AND partition = 'acme'",
            logger: logger
        ).first.map { try $0.decode((String, Int, Int).self) }
        print(
            "adaptive     caps seen (min–max): \(caps.joined(separator: ", "))"
                + (final.map { "; acme now \($0.1) with EWMA lag \($0.2) ms (target 250 ms)" } ?? ""))
        // Cost-weighted throttle: units admitted against burst + rate × t,
        // and the weighted round-robin's shares.
        guard
            let (units, jobs, span, gold) = try await conn.rows(
                """
                SELECT coalesce(sum((context ->> 'units')::int), 0)::int, count(*)::int,
                       coalesce(extract(epoch FROM max(t) - min(t)), 0)::float8,
                       count(*) FILTER (WHERE context ->> 'account' = 'gold')::int
                FROM (SELECT context, admitted_at AS t FROM dispatch_policy.admitted_jobs WHERE policy = 'demo_api'
                      UNION ALL SELECT context, admitted_at FROM dispatch_policy.finished_jobs WHERE policy = 'demo_api') x
                """, logger: logger
            ).first?.decode((Int, Int, Double, Int).self)
        else { return }
        let (budget, budgetHeld) = Self.bucketBound(taken: Double(units), burst: Self.apiRate, rate: Self.apiRate, over: span)
        let costRefusals = try await Self.refusals(
            conn, policy: "demo_api", gate: "partner_budget", partitions: ["default"], since: startedAt, logger: logger)
        print(
            String(
                format: "cost         partner API: %d units in %d calls over %.1f s (budget %.0f units/s, burst %.0f: at most %.0f); %@ %@",
                units, jobs, span, Self.apiRate, Self.apiRate, budget, Self.refusedText(costRefusals),
                budgetHeld ? "HELD" : "EXCEEDED"))
        print(
            String(
                format: "weights      gold (weight 3) got %.1f %% of the partner API's calls, free (weight 1) %.1f %% (3:1 is 75 / 25)",
                jobs > 0 ? Double(gold) * 100 / Double(jobs) : 0, jobs > 0 ? Double(jobs - gold) * 100 / Double(jobs) : 0))
        // Backpressure: the 429s the handler turned into deferrals.
        guard
            let (deferrals, deferredJobs, ranAgain, extraAttempts) = try await conn.rows(
                """
                SELECT count(*)::int, count(DISTINCT d.job_id)::int,
                       count(DISTINCT d.job_id) FILTER (WHERE f.status = 'completed')::int,
                       count(DISTINCT d.job_id) FILTER (WHERE f.attempts > 1)::int
                FROM dispatch_policy.job_deferrals d
                LEFT JOIN dispatch_policy.finished_jobs f ON f.id = d.job_id
                WHERE d.policy = 'demo_webhooks' AND d.deferred_at >= \(startedAt)
                """, logger: logger
            ).first?.decode((Int, Int, Int, Int).self)
        else { return }
        print(
            "backpressure \(Self.backpressureTenant)-hook answered 429 \(deferrals) time\(deferrals == 1 ? "" : "s"): \(deferredJobs) "
                + "webhook\(deferredJobs == 1 ? "" : "s") deferred 1 s with the endpoint paused, \(ranAgain) ran again and completed; "
                + (extraAttempts == 0 ? "no attempt counted" : "\(extraAttempts) counted an attempt (UNEXPECTED)"))
        let totals = try await conn.rows(
            "SELECT policy, count(*) FILTER (WHERE status = 'completed')::int, count(*) FILTER (WHERE status = 'dead')::int FROM dispatch_policy.finished_jobs WHERE policy LIKE 'demo\\_%' GROUP BY 1 ORDER BY 1",
            logger: logger
        ).map { try $0.decode((String, Int, Int).self) }
        let failures = try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.job_failures WHERE policy LIKE 'demo\\_%'")
        print(
            "done         " + totals.map { "\($0.0): \($0.1) completed, \($0.2) dead" }.joined(separator: "; ")
                + "; \(failures) failed attempts retried through admission")
    }
}

extension DemoDriver {
    /// The most webhooks that ran at once, in one partition (the value of
    /// `key` in their context) or in all (nil), from every attempt's run:
    /// [started_at, finished_at), or until now for a run not over. A run lies
    /// within the time its job held a slot (claimed after its admission
    /// committed, finished before its release committed), so runs that
    /// overlap held slots at once: the peak is never above what the gates
    /// let through. (Admission times would not do: admitted_at is the tick's
    /// clock, read before a slot released in the same instant.)
    static func runPeak(_ conn: PostgresConnection, partitionBy key: String?, logger: Logger) async throws -> Int {
        try await conn.rows(
            """
            WITH runs AS (
              SELECT coalesce(context ->> \(key)::text, '') AS part, started_at AS s, finished_at AS e
              FROM dispatch_policy.finished_jobs WHERE policy = 'demo_webhooks' AND started_at IS NOT NULL
              UNION ALL
              SELECT coalesce(context ->> \(key)::text, ''), started_at, clock_timestamp()
              FROM dispatch_policy.admitted_jobs WHERE policy = 'demo_webhooks' AND started_at IS NOT NULL
            ), events AS (
              SELECT part, s AS t, 1 AS d FROM runs UNION ALL SELECT part, e, -1 FROM runs
            )
            -- An end before a start at the same instant: the slot was free.
            SELECT coalesce(max(n), 0)::int FROM (
              SELECT sum(d) OVER (PARTITION BY part ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS n FROM events) x
            """, logger: logger
        ).first?.decode(Int.self) ?? 0
    }

    /// Refusals of a gate's partitions since `since`, as the ticks recorded
    /// them in the history (a waiting job counts once per tick that refused it).
    static func refusals(
        _ conn: PostgresConnection, policy: String = "demo_webhooks", gate: String, partitions: [String], since: Date, logger: Logger
    ) async throws -> Int64 {
        try await conn.rows(
            """
            SELECT coalesce(sum(m.refused), 0)::bigint
            FROM unnest(\(partitions)::text[]) AS k(partition)
            CROSS JOIN LATERAL dispatch_policy.partition_minutes(\(policy), \(gate), k.partition, \(since)) m
            """, logger: logger
        ).first?.decode(Int64.self) ?? 0
    }

    /// The most a token bucket lets through between the first and the last
    /// admission `over` seconds apart (a full bucket, then its refill), and
    /// whether `taken` stayed within it.
    static func bucketBound(taken: Double, burst: Double, rate: Double, over seconds: Double) -> (allowed: Double, held: Bool) {
        let allowed = burst + rate * seconds
        return (allowed, taken <= allowed + 1e-9)
    }

    /// Whether the gate bound in this run.
    static func refusedText(_ refusals: Int64) -> String {
        refusals > 0 ? "it bound: \(refusals) refusals" : "it never bound: not reached in this run"
    }
}

extension PostgresConnection {
    func scalar(_ query: PostgresQuery) async throws -> Int {
        try await rows(query, logger: Logger(label: "dispatch-policy.demo")).first?.decode(Int.self) ?? 0
    }
}
