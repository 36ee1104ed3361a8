import ArgumentParser
import DispatchPolicy
import DispatchPolicyAdmin
import Foundation
import Logging
import Metrics
import PostgresNIO
import ServiceLifecycle
import Synchronization
import UnixSignals

#if canImport(Glibc)
    import Glibc
#endif

@main
struct DispatchPolicyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dispatch-policy",
        abstract: "Per-partition admission control for background jobs, native to PostgreSQL.",
        discussion: """
            Connects with --database-url, else DATABASE_URL, else the PG* variables \
            (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE).

            \(ExitStatus.help)
            """,
        version: DispatchPolicyVersion.current,
        subcommands: [
            Demo.self, Migrate.self, PolicyCommand.self, Stage.self, Tick.self, Run.self, Pause.self, Resume.self, AdmitNow.self, Work.self,
            Status.self, Explain.self, Check.self, Admin.self,
        ]
    )
}

enum DispatchPolicyVersion {
    static let current = "0.2.0-dev"
}

/// Options every command that talks to the database shares.
struct ConnectionOptions: ParsableArguments {
    @Option(
        name: .customLong("database-url"), help: "postgres://user:password@host:port/database (default: DATABASE_URL, then PG* variables).")
    var databaseURL: String?

    @Flag(name: .shortAndLong, help: "Log more to standard error: info level (debug for the services run, work and admin).")
    var verbose = false

    /// The connection settings, with `dispatch-policy COMMAND` as the
    /// application name unless one is given. Settings that cannot be used
    /// (an unparsable URL, a missing TLS file) are a ``ConfigurationError``.
    func settings() throws -> ConnectionSettings {
        do {
            let settings = try ConnectionSettings.resolve(url: databaseURL, fallbackApplicationName: Self.applicationName)
            try settings.checkTLSFiles()
            return settings
        } catch let error as DispatchPolicyError where error.code == .invalidConnectionSettings {
            throw ConfigurationError(error)
        }
    }

    /// `dispatch-policy` and the command run (`dispatch-policy run`, `dispatch-policy policy apply`).
    static var applicationName: String {
        let words = CommandLine.arguments.dropFirst().prefix { !$0.hasPrefix("-") }
        let command = words.first == "policy" ? words.prefix(2) : words.prefix(1)
        return (["dispatch-policy"] + command).joined(separator: " ")
    }

    /// A logger to standard error. Commands log warnings and errors; the
    /// services (`run`, `work`, `admin`) pass `.info`, so a lost and
    /// restored connection shows. `--verbose` goes one level further.
    func makeLogger(defaultLevel: Logger.Level = .warning) -> Logger {
        let level: Logger.Level = verbose ? (defaultLevel == .info ? .debug : .info) : defaultLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        return Logger(label: "dispatch-policy")
    }

    /// Connects, runs `body`, closes; any error becomes one line on standard
    /// error and a non-zero exit.
    ///
    /// A query on a session the server ended may never return
    /// (postgres-nio#487): when the connection closes before the command is
    /// done, the command gets 2 s to fail by itself, then the process prints
    /// the error and exits 1 instead of hanging.
    func withConnection<T>(_ body: (PostgresConnection, Logger) async throws -> T) async throws -> T {
        let logger = makeLogger()
        return try await reportingErrors {
            try await settings().withConnection(logger: logger) { connection in
                let done = CommandDone()
                connection.closeFuture.whenComplete { _ in
                    DispatchQueue.global().asyncAfter(deadline: .now() + 2) {
                        guard !done.value else { return }
                        printError(
                            "the database session ended before the command finished; nothing after its last completed statement was done")
                        Foundation.exit(1)
                    }
                }
                defer { done.set() }
                return try await body(connection, logger)
            }
        }
    }
}

/// Set once a command's work is over (its connection may then close).
final class CommandDone: Sendable {
    private let state = Mutex(false)
    func set() { state.withLock { $0 = true } }
    var value: Bool { state.withLock { $0 } }
}

/// Prints an error as one line (`dispatch-policy: ...`) and exits non-zero:
/// 78 for a ``ConfigurationError``, 1 for the others (``ExitStatus``).
func reportingErrors<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let configuration as ConfigurationError {
        printError(configuration.error.description)
        if let hint = configuration.error.hint, !hint.isEmpty { printError("hint: \(hint)") }
        throw ExitStatus.configuration
    } catch let error as DispatchPolicyError {
        printError(error.description)
        // The server's HINT (the migrations and validators write one where
        // there is something to do about it), on a line of its own.
        if let hint = error.hint, !hint.isEmpty { printError("hint: \(hint)") }
        throw ExitCode.failure
    } catch let error as ExitCode {
        throw error
    } catch let error as PSQLError {
        printError(DispatchPolicyErrorDescription.describe(error))
        if let hint = error.serverInfo?[.hint], !hint.isEmpty { printError("hint: \(hint)") }
        throw ExitCode.failure
    } catch {
        printError(DispatchPolicyErrorDescription.describe(error))
        throw ExitCode.failure
    }
}

enum DispatchPolicyErrorDescription {
    static func describe(_ error: any Error) -> String {
        if let psql = error as? PSQLError, let message = psql.serverInfo?[.message] {
            return message + (psql.serverInfo?[.sqlState].map { " (SQLSTATE \($0))" } ?? "")
        }
        return String(describing: error)
    }
}

/// Prints one line to standard error: control characters in it (a newline
/// or an escape sequence in an error a `sql` target raised) are shown
/// escaped, so nothing can break the line or forge another.
func printError(_ line: String) {
    FileHandle.standardError.write(Data("dispatch-policy: \(DispatchPolicyError.oneLine(line))\n".utf8))
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply pending migrations (safe to run twice, or from two places at once).")

    @OptionGroup var connection: ConnectionOptions

    func run() async throws {
        try await connection.withConnection { conn, logger in
            let report = try await Migrator(logger: logger).migrate(on: conn)
            for file in report.applied {
                print("applied \(file)")
            }
            if report.applied.isEmpty {
                print("up to date (\(report.alreadyApplied.count) migrations applied)")
            }
        }
    }
}

struct PolicyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy",
        abstract: "Declare and inspect policies.",
        subcommands: [Apply.self, List.self, Show.self, Drop.self]
    )

    struct Drop: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Drop a policy and all its state (its history stays until pruned).",
            discussion: """
                Refused (SQLSTATE 2BP01, nothing changed) while the policy has staged or admitted jobs, \
                unless --force, which finishes them as cancelled first. Needs the schema owner's rights.
                """)

        @OptionGroup var connection: ConnectionOptions

        @Argument(help: "The policy name.")
        var name: String

        @Flag(help: "Cancel the policy's staged and admitted jobs, then drop it.")
        var force = false

        func run() async throws {
            try await connection.withConnection { conn, logger in
                let cancelled = try await PolicyCatalog(executor: conn, logger: logger).drop(name, force: force)
                print("dropped \(name)" + (cancelled > 0 ? " (\(cancelled) job\(cancelled == 1 ? "" : "s") cancelled)" : ""))
            }
        }
    }

    struct Apply: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Declare the policies of a JSON file: {\"name\": ..., \"config\": {...}} or an array of them (all or nothing).")

        @OptionGroup var connection: ConnectionOptions

        @Argument(help: "The JSON file, or - for standard input.")
        var file: String

        func run() async throws {
            try await connection.withConnection { conn, logger in
                // The same bytes, from a pipe or a path, give the same result.
                let data: Data
                if file == "-" {
                    data = FileHandle.standardInput.readDataToEndOfFile()
                } else {
                    do {
                        data = try Data(contentsOf: URL(fileURLWithPath: file))
                    } catch {
                        throw DispatchPolicyError(code: .invalidArgument, message: "cannot read \(file): \(error.localizedDescription)")
                    }
                }
                let policies = try PolicyCatalog.PolicyFile(data: data, source: file == "-" ? "standard input" : file)
                try await PolicyCatalog.apply(policies, on: conn, logger: logger)
                for name in policies.names {
                    print("declared \(name)")
                }
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List declared policies.")

        @OptionGroup var connection: ConnectionOptions

        func run() async throws {
            try await connection.withConnection { conn, logger in
                var rows: [[String]] = []
                for try await (name, gates, paused, updated) in try await conn.query(
                    """
                    SELECT p.name,
                           coalesce((SELECT string_agg(coalesce(g ->> 'name', g ->> 'type')
                                                       || CASE WHEN g ? 'name' THEN ' (' || (g ->> 'type') || ')' ELSE '' END, ', ')
                                     FROM jsonb_array_elements(coalesce(p.config -> 'gates', '[]')) g), ''),
                           p.paused, to_char(p.updated_at, 'YYYY-MM-DD HH24:MI:SS')
                    FROM dispatch_policy.policies p ORDER BY p.name
                    """, logger: logger
                ).decode((String, String, Bool, String).self) {
                    rows.append([name, paused ? "paused" : "active", gates.isEmpty ? "-" : gates, updated])
                }
                print(TextTable.render(header: ["POLICY", "STATE", "GATES", "UPDATED"], rows: rows))
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a policy as JSON, in the format policy apply reads.")

        @OptionGroup var connection: ConnectionOptions

        @Argument(help: "The policy name.")
        var name: String

        func run() async throws {
            try await connection.withConnection { conn, logger in
                let rows = try await conn.query(
                    """
                    SELECT jsonb_pretty(jsonb_build_object('name', name, 'config', config)), paused
                    FROM dispatch_policy.policies WHERE name = \(name)
                    """, logger: logger
                ).collect()
                guard let row = rows.first else {
                    throw DispatchPolicyError(code: .server, message: "unknown policy: '\(name)'", sqlState: "42704")
                }
                let (json, paused) = try row.decode((String, Bool).self)
                print(json)
                if paused {
                    printError("note: policy \(name) is paused")
                }
            }
        }
    }
}

struct Stage: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Stage one job; prints the id of the job holding its place: the new one, or for a duplicate the one holding its dedupe key (kept or replaced, said on standard error; exit 0)."
    )

    @OptionGroup var connection: ConnectionOptions

    @Argument(help: "The policy name.")
    var policy: String

    @Option(help: "Job arguments as JSON.")
    var args: String

    @Option(help: "Context as a JSON object (values gates read).")
    var context: String = "{}"

    @Option(
        name: .customLong("dedupe-key"),
        help: "While a job with this key is pending or admitted, keep it (or, under dedupe_mode replace, replace a pending one's args).")
    var dedupeKey: String?

    @Option(name: .customLong("round-robin-key"), help: "Tenant key for round-robin fetch (default: from the policy's round_robin_by).")
    var roundRobinKey: String?

    @Option(help: "Queue the job goes to once admitted (default: default).")
    var queue: String?

    @Option(parsing: .unconditional, help: "Lower is admitted first (default 0).")
    var priority: Int32?

    @Option(name: .customLong("not-before"), parsing: .unconditional, help: "Do not admit before this ISO 8601 time.")
    var notBefore: String?

    @Option(
        parsing: .unconditional,
        help: "Do not admit before this delay from now, such as 30s or 5m (at most \(DurationParser.describe(CLILimits.delay.upperBound)))."
    )
    var delay: String?

    @Option(
        name: .customLong("expires-at"), parsing: .unconditional,
        help: "Finish the job as expired if it is not admitted by this ISO 8601 time.")
    var expiresAt: String?

    var delayDuration: Duration? {
        get throws { try delay.map { try DurationParser.parse($0, flag: "--delay", within: CLILimits.delay) } }
    }

    func validate() throws {
        if notBefore != nil && delay != nil { throw ValidationError("--not-before and --delay exclude each other") }
        if let expiresAt {
            guard let date = Self.parseTime(expiresAt), Stager.notBeforeRange.contains(date) else {
                throw ValidationError("--expires-at must be an ISO 8601 time from year 1 to 9999, got \(expiresAt.prefix(80))")
            }
        }
        do { _ = try delayDuration } catch let error as DispatchPolicyError { throw ValidationError(error.message) }
        if let notBefore {
            guard let date = Self.parseTime(notBefore) else {
                throw ValidationError("--not-before must be an ISO 8601 time such as 2026-01-31T12:00:00Z, got \(notBefore.prefix(80))")
            }
            guard Stager.notBeforeRange.contains(date) else {
                throw ValidationError("--not-before must be a time from year 1 to year 9999, got \(notBefore.prefix(80))")
            }
        }
    }

    static func parseTime(_ text: String) -> Date? {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.date(from: text) ?? ISO8601DateFormatter().date(from: text)
    }

    func run() async throws {
        try await connection.withConnection { conn, logger in
            for (flag, value) in [("--args", args), ("--context", context)] {
                guard ContextStrings.isOneJSONValue(value) else {
                    throw DispatchPolicyError(code: .invalidArgument, message: "\(flag) is not valid JSON: \(value)")
                }
            }
            var when = notBefore.flatMap(Self.parseTime)
            if let delayDuration = try delayDuration {
                let (seconds, attoseconds) = delayDuration.components
                when = Date().addingTimeInterval(Double(seconds) + Double(attoseconds) / 1e18)
            }
            let job = JobSpec(
                argsJSON: args, contextJSON: context, dedupeKey: dedupeKey, roundRobinKey: roundRobinKey,
                queue: queue, priority: priority, notBefore: when, expiresAt: expiresAt.flatMap(Self.parseTime))
            let staged = try await Stager(executor: conn, logger: logger).stage(policy: policy, job)
            // Standard output is always the id of the job holding the place:
            // `id=$(dispatch-policy stage ...)`; what happened goes to
            // standard error unless it is a plain insert. Exit status 0.
            print(staged.id)
            let key = dedupeKey ?? ""
            switch staged.outcome {
            case .inserted: break
            case .kept: printError("kept: job \(staged.id) of \(policy) holds dedupe key \(key); nothing was staged")
            case .replaced:
                printError("replaced: pending job \(staged.id) of \(policy) with dedupe key \(key) now has these args and context")
            case .dropped: printError("dropped: job \(staged.id) was finished as dropped to keep its partition's backlog at the cap")
            }
        }
    }
}

struct Pause: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Stop admitting a policy's jobs (staging continues).")

    @OptionGroup var connection: ConnectionOptions

    @Argument(help: "The policy name.")
    var policy: String

    func run() async throws {
        try await connection.withConnection { conn, logger in
            try await PolicyCatalog(executor: conn, logger: logger).pause(policy)
            print("paused \(policy)")
        }
    }
}

struct Resume: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Resume admitting a paused policy's jobs.")

    @OptionGroup var connection: ConnectionOptions

    @Argument(help: "The policy name.")
    var policy: String

    func run() async throws {
        try await connection.withConnection { conn, logger in
            try await PolicyCatalog(executor: conn, logger: logger).resume(policy)
            print("resumed \(policy)")
        }
    }
}

struct AdmitNow: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "admit-now",
        abstract: "Admit up to N pending jobs of one gate partition now, outside the round-robin rotation.",
        discussion: """
            A tick restricted to the partition: the policy's lock, every gate checked, tokens and slots taken \
            as for any admission. Jobs a gate refuses stay staged; the line says which gate refused how many. \
            Jobs scheduled for later are not admitted; a paused policy or partition admits nothing. \
            Waits up to 10 s for a runner's tick of the policy under way. Exits 1 when nothing was admitted.
            """)

    @OptionGroup var connection: ConnectionOptions

    @Argument(help: "The policy name.")
    var policy: String

    @Option(help: "A partitioned gate of the policy (throttle, concurrency or adaptive_concurrency with partition_by).")
    var gate: String

    @Option(help: "The partition key, as status --policy and partition_overview show it.")
    var partition: String

    @Option(name: .customLong("max"), parsing: .unconditional, help: "At most this many jobs (1 to 100000).")
    var maxJobs: Int = 1

    func validate() throws {
        guard FieldLimits.batchSize.contains(Double(maxJobs)) else {
            throw ValidationError("--max must be an integer from 1 to 100000, got \(maxJobs)")
        }
    }

    func run() async throws {
        let result = try await connection.withConnection { conn, logger in
            try await Ticker(connection: conn, logger: logger).admitNow(
                policy: policy, gate: gate, partition: partition, maxJobs: maxJobs)
        }
        print(AdmitNowReport(result, requested: maxJobs).text)
        if result.admitted == 0 { throw ExitCode.failure }
    }
}

struct Explain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Why a job waits: each gate of its policy in its partition (ok or waits, with the numbers), its lane, schedule and an estimated wait (dispatch_policy.explain). Exits 1 for an unknown job."
    )

    @OptionGroup var connection: ConnectionOptions

    @Argument(help: "The job id.")
    var id: Int64

    func run() async throws {
        try await connection.withConnection { conn, logger in
            print(try await JobExplanation.load(id: id, on: conn, logger: logger).text)
        }
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Show dispatch_policy.policy_overview: counts per policy, the error of any policy whose ticks fail, and the runners and workers with their reconnects.",
        discussion: """
            With --policy, that policy only, what limits it now (the admin's hints) and its busiest \
            partitions. With --watch, the tables are redrawn in place every --interval until Ctrl-C.
            """)

    @OptionGroup var connection: ConnectionOptions

    @Option(help: "Show one policy: its counts, hints and busiest partitions.")
    var policy: String?

    @Flag(help: "Redraw every --interval until interrupted.")
    var watch = false

    @Option(parsing: .unconditional, help: "With --watch: how often to redraw (100ms to 1h).")
    var interval: String = "2s"

    @Option(parsing: .unconditional, help: "With --policy: how many partitions to list, busiest first (1 to 1000).")
    var partitions: Int = 10

    func validate() throws {
        do { _ = try DurationParser.parse(interval, flag: "--interval", within: .milliseconds(100) ... .seconds(3600)) } catch let error
            as DispatchPolicyError
        {
            throw ValidationError(error.message)
        }
        guard (1...1000).contains(partitions) else { throw ValidationError("--partitions must be from 1 to 1000, got \(partitions)") }
    }

    func run() async throws {
        let pause = try DurationParser.parse(interval, flag: "--interval", within: .milliseconds(100) ... .seconds(3600))
        try await connection.withConnection { conn, logger in
            let terminal = isatty(STDOUT_FILENO) == 1
            repeat {
                let text = try await render(conn, logger: logger)
                if watch && terminal {
                    // Home, draw, clear what the previous frame left below.
                    print("\u{1B}[H" + text.replacingOccurrences(of: "\n", with: "\u{1B}[K\n") + "\u{1B}[K\u{1B}[J", terminator: "\n")
                } else {
                    print(text + (watch ? "\n" : ""))
                }
                // A frame at a time, also on a pipe (block-buffered otherwise).
                fflush(nil)  // every output stream: stdout is not concurrency-safe to name
                if watch { try await Task.sleep(for: pause) }
            } while watch
        }
    }

    func render(_ conn: PostgresConnection, logger: Logger) async throws -> String {
        var out: [String] = []
        if let policy {
            guard try await conn.rows("SELECT 1 FROM dispatch_policy.policies WHERE name = \(policy)", logger: logger).first != nil else {
                throw DispatchPolicyError(
                    code: .invalidArgument, message: "no policy named \(policy)", sqlState: "42704",
                    hint: "dispatch-policy policy list shows the declared policies.")
            }
        }
        var rows: [[String]] = []
        var errors: [String] = []
        for try await (policy, pending, scheduled, inFlight, completed, failed, dead, notRun, oldest, paused, failures, error, retry, mode)
            in try await conn.query(
                """
                SELECT policy, pending, scheduled, in_flight, completed_24h, failed_24h, dead,
                       expired_24h || ' / ' || dropped_24h || ' / ' || deferred_24h,
                       coalesce(nullif(extract(day FROM oldest_pending_age)::int, 0)::text || 'd ', '')
                         || coalesce(to_char(oldest_pending_age, 'HH24:MI:SS'), '-'), paused,
                       tick_failures, last_error, to_char(retry_at, 'YYYY-MM-DD HH24:MI:SS TZ'), mode
                FROM dispatch_policy.policy_overview WHERE \(policy)::text IS NULL OR policy = \(policy)::text ORDER BY policy
                """, logger: logger
            ).decode((String, Int64, Int64, Int64, Int64, Int64, Int64, String, String, Bool, Int?, String?, String?, String?).self)
        {
            // A shadow policy admits everything: say so rather than "active".
            let state = paused ? "paused" : failures != nil ? "failing" : mode == "shadow" ? "shadow" : "active"
            rows.append([
                policy, state, "\(pending)", "\(scheduled)", "\(inFlight)",
                "\(completed)", "\(failed)", "\(dead)", notRun, oldest,
            ])
            if let failures {
                errors.append(
                    "\(policy): \(failures) failed tick\(failures == 1 ? "" : "s") in a row, retry at \(retry ?? "-"): \(error ?? "")")
            }
        }
        out.append(
            TextTable.render(
                header: [
                    "POLICY", "STATE", "PENDING", "SCHEDULED", "IN FLIGHT", "DONE 24H", "FAILED 24H", "DEAD",
                    "EXPIRED/DROPPED/DEFERRED 24H", "OLDEST",
                ],
                rows: rows))
        if !errors.isEmpty {
            out.append("\nfailing:\n" + errors.map { "  " + $0 }.joined(separator: "\n"))
        }
        // Runners and workers, with the sessions they lost and reopened.
        var processes: [[String]] = []
        for try await (name, kind, started, seen, reconnects, lost) in try await conn.query(
            """
            SELECT name, kind, to_char(started_at, 'YYYY-MM-DD HH24:MI:SS'),
                   extract(epoch FROM now() - last_seen_at)::bigint || 's ago', reconnects,
                   coalesce(to_char(last_lost_at, 'YYYY-MM-DD HH24:MI:SS') || ': ' || left(last_lost_error, 120), '-')
            FROM dispatch_policy.processes ORDER BY kind, name
            """, logger: logger
        ).decode((String, String, String, String, Int, String).self) {
            processes.append([name, kind, started, seen, "\(reconnects)", DispatchPolicyError.oneLine(lost)])
        }
        if !processes.isEmpty && policy == nil {
            out.append(
                "\n"
                    + TextTable.render(
                        header: ["PROCESS", "KIND", "STARTED", "LAST SEEN", "RECONNECTS", "LAST LOST SESSION"], rows: processes))
        }
        if let policy {
            let store = AdminStore(executor: conn, logger: logger)
            if let row = try await store.policies(only: policy).first {
                let minutes = try await store.recentMinutes(only: policy, since: Date().addingTimeInterval(-3600))
                let hints = Hints.of(row, limits: try await store.limits(only: policy, minutes: minutes)[policy])
                out.append(
                    "\nlimits now:\n"
                        + (hints.isEmpty
                            ? "  nothing: every gate has room"
                            : hints.map { "  " + DispatchPolicyError.oneLine($0) }.joined(separator: "\n")))
                out.append(
                    "\nlast 24 h: \(row.admitted24h) admitted, throughput \(Format.number((row.throughputPerMinute * 10).rounded() / 10))/min, queue lag P50 \(row.lagP50ms.map(Format.milliseconds) ?? "-"), P95 \(row.lagP95ms.map(Format.milliseconds) ?? "-")"
                )
            }
            let busiest = try await store.partitions(
                policy: policy, search: nil, sort: .inFlight, after: nil, onlyBusy: false, limit: partitions)
            if !busiest.isEmpty {
                out.append(
                    "\n"
                        + TextTable.render(
                            header: [
                                "GATE", "PARTITION", "PENDING", "IN FLIGHT", "CAP", "TOKENS", "EWMA LAG", "LAST STAGED", "LAST ADMITTED",
                            ],
                            rows: busiest.map { row in
                                [
                                    row.gate, row.partition + (row.paused ? " (paused)" : ""), "\(row.pending)", "\(row.inFlight)",
                                    Format.number(row.cap),
                                    row.tokens.map { Format.number(($0 * 10).rounded(.down) / 10) } ?? "-",
                                    row.ewmaLagMs.map(Format.milliseconds) ?? "-",
                                    row.lastStaged.map { Format.seconds(-$0.timeIntervalSinceNow) + " ago" } ?? "-",
                                    row.lastAdmitted.map { Format.seconds(-$0.timeIntervalSinceNow) + " ago" } ?? "-",
                                ].map(DispatchPolicyError.oneLine)
                            }))
            }
        }
        return out.joined(separator: "\n")
    }
}

struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Reconcile the stored state: list every inconsistency (dispatch_policy.check()); --repair fixes them all in one transaction.",
        discussion: """
            Checks that every job is in exactly one state, that in-flight counters equal the admitted jobs \
            holding a slot under each policy's current config, that no throttle bucket is above its burst, \
            negative or not finite, that no dedupe key is held by a finished or unknown job, and that no \
            gate state or observation is left of a policy or gate that no longer exists. \
            Exits 0 when the state is consistent (after --repair: when it is now), 1 when findings remain.
            """)

    @OptionGroup var connection: ConnectionOptions

    @Flag(help: "Fix everything found, atomically (dispatch_policy.repair()), and print each change.")
    var repair = false

    @Option(
        name: .customLong("lock-timeout"), parsing: .unconditional,
        help:
            "With --repair: give up when the locks repair needs (every policy's tick lock, the admitted jobs, gate state) are not free within this (1s to 1h)."
    )
    var lockTimeout: String = "10s"

    func validate() throws {
        do { _ = try DurationParser.parse(lockTimeout, flag: "--lock-timeout", within: CLILimits.shutdownTimeout) } catch let error
            as DispatchPolicyError
        {
            throw ValidationError(error.message)
        }
    }

    func run() async throws {
        let remaining = try await connection.withConnection { conn, logger -> Int in
            if repair {
                // One transaction: all of it is fixed, or nothing is. Waiting for
                // the locks is bounded, so a long tick elsewhere cannot make repair
                // hold the policies it already locked for as long.
                let wait = try DurationParser.parse(lockTimeout, flag: "--lock-timeout", within: CLILimits.shutdownTimeout)
                _ = try await conn.rows("BEGIN", logger: logger)
                let changes: [(String, String?, String?, String?, Int64?, String)]
                do {
                    _ = try await conn.rows(
                        "SELECT set_config('lock_timeout', \(String(wait.components.seconds * 1000))::text || 'ms', true)", logger: logger)
                    changes = try await conn.rows(
                        "SELECT finding, policy, gate, partition_key, job_id, action FROM dispatch_policy.repair()", logger: logger
                    ).map { try $0.decode((String, String?, String?, String?, Int64?, String).self) }
                    _ = try await conn.rows("COMMIT", logger: logger)
                } catch {
                    _ = try? await conn.rows("ROLLBACK", logger: logger)
                    if let wrapped = error as? DispatchPolicyError, wrapped.sqlState == "55P03" {
                        throw DispatchPolicyError(
                            code: .server,
                            message:
                                "repair could not take its locks within \(lockTimeout): a tick or a worker holds them; nothing was changed",
                            sqlState: "55P03", hint: "Try again, or raise --lock-timeout.")
                    }
                    throw error
                }
                if changes.isEmpty {
                    print("nothing to repair")
                } else {
                    print(
                        TextTable.render(
                            header: ["REPAIRED", "POLICY", "GATE", "PARTITION", "JOB", "CHANGE"],
                            rows: changes.map {
                                [$0.0, $0.1 ?? "-", $0.2 ?? "-", $0.3 ?? "-", $0.4.map(String.init) ?? "-", $0.5].map(
                                    DispatchPolicyError.oneLine)
                            }))
                    print("\n\(changes.count) change\(changes.count == 1 ? "" : "s") made")
                }
            }
            let findings = try await conn.rows(
                #"SELECT finding, policy, gate, partition_key, job_id, detail FROM dispatch_policy."check"()"#, logger: logger
            ).map { try $0.decode((String, String?, String?, String?, Int64?, String).self) }
            if findings.isEmpty {
                if !repair { print("consistent: no findings") }
            } else {
                if repair { print("") }
                print(
                    TextTable.render(
                        header: ["FINDING", "POLICY", "GATE", "PARTITION", "JOB", "DETAIL"],
                        rows: findings.map {
                            [$0.0, $0.1 ?? "-", $0.2 ?? "-", $0.3 ?? "-", $0.4.map(String.init) ?? "-", $0.5].map(
                                DispatchPolicyError.oneLine)
                        }))
                print(
                    "\n\(findings.count) finding\(findings.count == 1 ? "" : "s")\(repair ? " remain" : "; dispatch-policy check --repair fixes them")"
                )
            }
            return findings.count
        }
        if remaining > 0 { throw ExitCode.failure }
    }
}

/// Left-aligned columns separated by two spaces.
enum TextTable {
    static func render(header: [String], rows: [[String]]) -> String {
        let all = [header] + rows
        let widths = header.indices.map { column in all.map { $0[column].count }.max() ?? 0 }
        return all.map { row in
            row.enumerated().map { index, cell in
                index == row.count - 1 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }
}

/// The documented bounds of the CLI's duration flags.
enum CLILimits {
    static let busyPause: ClosedRange<Duration> = .zero ... .seconds(3600)
    static let idlePause: ClosedRange<Duration> = .zero ... .seconds(3600)
    static let retention: ClosedRange<Duration> = .zero ... .seconds(Int64(FieldLimits.pruneRetention.maximum))
    static let lease: ClosedRange<Duration> = .seconds(1) ... .seconds(Int64(FieldLimits.leaseSeconds.maximum))
    static let runFor: ClosedRange<Duration> = .milliseconds(1) ... .seconds(365 * 86_400)
    static let delay: ClosedRange<Duration> = .zero ... .seconds(3650 * 86_400)
    static let demo: ClosedRange<Duration> = .seconds(1) ... .seconds(86_400)
    static let tickTimeout: ClosedRange<Duration> = .seconds(1) ... .seconds(3600)
    static let shutdownTimeout: ClosedRange<Duration> = .seconds(1) ... .seconds(3600)
}

/// Options of the admission loop shared by `tick` and `run`.
struct RunnerOptions: ParsableArguments {
    @Option(help: "Admit only this policy; repeat for several (default: every policy with work).")
    var policy: [String] = []

    @Option(
        name: .customLong("batch-size"), parsing: .unconditional,
        help: "Rows per tick for policies that do not set batch_size (1 to 100000).")
    var batchSize: Int = TickSettings().batchSize

    @Option(
        name: .customLong("quantum"), parsing: .unconditional,
        help: "Rows per round-robin key per tick for policies that do not set round_robin_quantum (1 to 100000).")
    var quantum: Int = TickSettings().roundRobinQuantum

    @Option(
        name: .customLong("lease"), parsing: .unconditional,
        help: "Lease for policies that do not set lease_seconds, such as 15m (1s to 365d; default: the database's, 15m).")
    var lease: String?

    @Option(
        name: .customLong("busy-pause"), parsing: .unconditional,
        help:
            "Pause after a productive pass, cut short by NOTIFY and by what is due: a scheduled job, a lease, a throttle's next token (0 to 1h)."
    )
    var busyPause: String = "50ms"

    @Option(
        name: .customLong("idle-pause"), parsing: .unconditional,
        help:
            "Pause after an idle pass, cut short by NOTIFY and by what is due: a scheduled job, a lease, a throttle's next token (0 to 1h)."
    )
    var idlePause: String = "1s"

    @Option(parsing: .unconditional, help: "Delete completed jobs, failures and per-minute aggregates older than this (0 to 100 years).")
    var retention: String = "7d"

    @Option(
        name: .customLong("tick-timeout"), parsing: .unconditional,
        help: "Longest one tick may take (a slow sql target): longer fails that policy's tick (1s to 1h).")
    var tickTimeout: String = "60s"

    func validate() throws {
        do { _ = try makeOptions() } catch let error as DispatchPolicyError { throw ValidationError(error.message) }
    }

    func makeOptions() throws -> TickRunnerOptions {
        guard FieldLimits.batchSize.contains(Double(batchSize)) else {
            throw DispatchPolicyError(code: .invalidArgument, message: "--batch-size must be an integer from 1 to 100000, got \(batchSize)")
        }
        guard FieldLimits.roundRobinQuantum.contains(Double(quantum)) else {
            throw DispatchPolicyError(code: .invalidArgument, message: "--quantum must be an integer from 1 to 100000, got \(quantum)")
        }
        var options = TickRunnerOptions()
        // Each named once, in the order given (a repeated name is not an error).
        var seen = Set<String>()
        options.policies = policy.isEmpty ? nil : policy.filter { seen.insert($0).inserted }
        options.busyPause = try DurationParser.parse(busyPause, flag: "--busy-pause", within: CLILimits.busyPause)
        options.idlePause = try DurationParser.parse(idlePause, flag: "--idle-pause", within: CLILimits.idlePause)
        options.retentionSeconds = Int(
            try DurationParser.parse(retention, flag: "--retention", within: CLILimits.retention).components.seconds)
        let leaseSeconds = try lease.map { text -> Int in
            let duration = try DurationParser.parse(text, flag: "--lease", within: CLILimits.lease)
            guard duration.components.attoseconds == 0 else {
                throw DispatchPolicyError(
                    code: .invalidArgument, message: "--lease must be whole seconds (leases are stored in seconds), got \(text)")
            }
            return Int(duration.components.seconds)
        }
        options.tick = TickSettings(batchSize: batchSize, roundRobinQuantum: quantum, leaseSeconds: leaseSeconds)
        options.tick.timeout = try DurationParser.parse(tickTimeout, flag: "--tick-timeout", within: CLILimits.tickTimeout)
        return options
    }
}

struct Tick: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Admit staged jobs: one pass (--once, the default) or passes for a while (--for 55s, for cron).",
        discussion: """
            Safe to start every minute from cron while the previous run is still going: \
            runners share work through per-policy locks.
              * * * * *  dispatch-policy tick --for 55s --quiet
            Prints one line per policy: admitted, refused by gate, tokens left, time per tick \
            (nothing with --quiet). A policy whose ticks fail does not stop the others; the run \
            then exits 1 and says why on standard error, --quiet or not.
            """)

    @OptionGroup var connection: ConnectionOptions
    @OptionGroup var runner: RunnerOptions

    @Flag(help: "One pass over the policies with work (the default).")
    var once = false

    @Option(name: .customLong("for"), parsing: .unconditional, help: "Keep admitting for this long, such as 55s (1ms to 365d).")
    var runFor: String?

    @Flag(
        name: .shortAndLong, help: "Print nothing when the run succeeds (errors still go to standard error; the exit status is the same).")
    var quiet = false

    func validate() throws {
        if once && runFor != nil { throw ValidationError("--once and --for exclude each other") }
        if let runFor {
            do { _ = try DurationParser.parse(runFor, flag: "--for", within: CLILimits.runFor) } catch let error as DispatchPolicyError {
                throw ValidationError(error.message)
            }
        }
    }

    func run() async throws {
        let logger = connection.makeLogger()
        try await reportingErrors {
            var options = try runner.makeOptions()
            if let runFor {
                options.runFor = try DurationParser.parse(runFor, flag: "--for", within: CLILimits.runFor)
            } else {
                options.once = true
            }
            let settings = try connection.settings()
            let report = try await ProcessTracing.around(logger: logger) { [options] in
                try await TickRunner(connection: settings, options: options, logger: logger).runLoop()
            }
            if report.policies.isEmpty && !quiet {
                print("nothing to admit")
            }
            for summary in report.policies {
                if !quiet { print(summary.line) }
                if summary.failures > 0 {
                    printError(
                        "policy \(summary.policy): \(summary.failures) tick\(summary.failures == 1 ? "" : "s") failed: \(summary.lastError ?? "")"
                    )
                }
            }
            if let error = report.lastConnectionError {
                printError(
                    "database session lost or unavailable \(report.connectionFailures) time\(report.connectionFailures == 1 ? "" : "s"): \(error)"
                )
            }
            if let error = report.lastMaintenanceError {
                printError("maintenance failed \(report.maintenanceFailures) time\(report.maintenanceFailures == 1 ? "" : "s"): \(error)")
            }
            if report.hadFailures { throw ExitCode.failure }
        }
    }
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Admit continuously: LISTEN for new jobs, tick, pause; SIGTERM or SIGINT ends after the current tick.",
        discussion: """
            A lost database session (a restart, a failover, pg_terminate_backend) is reopened with backoff; \
            "dispatch-policy status" lists the runner with its reconnects. \
            With --metrics, /healthz answers 200 while the runner's session is open and its last pass \
            completed within 3 x max(--idle-pause, --busy-pause) plus the longest a tick may take \
            (--tick-timeout + 5 s, at least 30 s), else 503 and why. \
            On SIGTERM or SIGINT the runner finishes its current tick; one still running after \
            --shutdown-timeout is abandoned (rolled back) and the process exits.
            """)

    @OptionGroup var connection: ConnectionOptions
    @OptionGroup var runner: RunnerOptions

    @Option(
        name: .customLong("shutdown-timeout"), parsing: .unconditional,
        help: "On SIGTERM or SIGINT, wait this long for the current tick, then abandon it (1s to 1h).")
    var shutdownTimeout: String = "10s"

    @Option(help: "Serve /metrics (Prometheus text format) on HOST:PORT, such as 127.0.0.1:9464.")
    var metrics: String?

    func validate() throws {
        do { _ = try DurationParser.parse(shutdownTimeout, flag: "--shutdown-timeout", within: CLILimits.shutdownTimeout) } catch let error
            as DispatchPolicyError
        {
            throw ValidationError(error.message)
        }
        if let metrics, AdminServer.parseBind(metrics) == nil {
            throw ValidationError("--metrics must be HOST:PORT, [IPv6]:PORT or :PORT, got \(metrics)")
        }
    }

    func run() async throws {
        let logger = connection.makeLogger(defaultLevel: .info)
        try await reportingErrors {
            var options = try runner.makeOptions()
            let settings = try connection.settings()
            var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
            if let metrics {
                // The runner's counters and tick timings, and the per-policy
                // gauges read at scrape time through a one-session pool.
                _ = ProcessMetrics.registry
                options.metrics = DispatchPolicyMetrics()
                // On the host target_session_attrs picks, following a failover.
                let client = try await FailoverClient.settle(settings.with(session: .admin), maximumConnections: 1, logger: logger)
                let server = try AdminServer(
                    store: AdminStore(executor: client, logger: logger), options: AdminOptions(),
                    registry: ProcessMetrics.registry, logger: logger)
                services.append(.init(service: client))
                services.append(
                    .init(
                        service: try httpService(
                            router: server.metricsRouter(health: options.health), bind: metrics, flag: "--metrics", logger: logger)))
            }
            if let tracing = try ProcessTracing.makeService() {
                services.append(.init(service: tracing))
            }
            let service = TickRunner(connection: settings, options: options, logger: logger)
            services.append(.init(service: service))
            var configuration = ServiceGroupConfiguration(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
            configuration.maximumGracefulShutdownDuration = try DurationParser.parse(
                shutdownTimeout, flag: "--shutdown-timeout", within: CLILimits.shutdownTimeout)
            // Every wait of the runner ends on cancellation; this only bounds a bug.
            configuration.maximumCancellationDuration = .seconds(5)
            let group = ServiceGroup(configuration: configuration)
            try await group.run()
        }
    }
}
