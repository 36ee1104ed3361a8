import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

#if canImport(FoundationNetworking)
    import FoundationNetworking
#endif

/// The dispatch-policy binary built next to the test bundle.
let cliPath: String = {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    // swift test runs .build/<triple>/debug/<package>PackageTests.xctest
    while !FileManager.default.isExecutableFile(atPath: dir.appending(path: "dispatch-policy").path), dir.path != "/" {
        dir = dir.deletingLastPathComponent()
    }
    return dir.appending(path: "dispatch-policy").path
}()

/// `settings` as the CLI's DATABASE_URL (the test clusters have no TLS).
func databaseURL(_ settings: ConnectionSettings) -> String {
    settings.description + (settings.description.contains("?") ? "&" : "?") + "sslmode=disable"
}

/// Runs the CLI against `settings` (through DATABASE_URL unless `env` says otherwise).
func cli(_ arguments: [String], settings: ConnectionSettings, env: [String: String]? = nil, stdin: String? = nil) async throws
    -> ProcessResult
{
    var environment = env ?? ProcessInfo.processInfo.environment
    if env == nil {
        environment["DATABASE_URL"] = databaseURL(settings)
        // As TestServer's own sessions: at the suite's start a loaded server
        // may take longer than libpq's 10 s to let a session in.
        environment["PGCONNECT_TIMEOUT"] = "30"
    }
    return try await runProcess(cliPath, arguments, environment: environment, stdin: stdin)
}

@Suite("CLI", .timeLimit(.minutes(15)))
struct CLITests {
    @Test("migrate applies every file, then reports the database up to date")
    func migrate() async throws {
        let settings = try await TestServer.shared.freshDatabase(migrated: false)
        let first = try await cli(["migrate"], settings: settings)
        #expect(first.status == 0, "\(first.stderr)")
        #expect(first.stdout == Migration.embedded.map { "applied \($0.fileName)\n" }.joined())
        let second = try await cli(["migrate"], settings: settings)
        #expect(second.status == 0)
        #expect(second.stdout == "up to date (\(Migration.embedded.count) migrations applied)\n")
    }

    @Test("policy apply, list, show and drop; show prints what apply reads")
    func policyCommands() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let file = FileManager.default.temporaryDirectory.appending(path: "policies-\(UUID().uuidString).json")
        try """
        [{"name": "webhooks", "config": \(designExampleConfig)},
         {"name": "emails", "config": {"gates": [{"type": "global_cap", "max": 2}]}}]
        """.write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }

        let apply = try await cli(["policy", "apply", file.path], settings: settings)
        #expect(apply.status == 0, "\(apply.stderr)")
        #expect(apply.stdout == "declared webhooks\ndeclared emails\n")

        let list = try await cli(["policy", "list"], settings: settings)
        let lines = list.stdout.split(separator: "\n")
        #expect(lines.count == 3)
        #expect(lines[1].hasPrefix("emails") && lines[1].contains("global_cap"))
        #expect(lines[2].hasPrefix("webhooks") && lines[2].contains("per_endpoint (throttle), concurrency"))

        let show = try await cli(["policy", "show", "webhooks"], settings: settings)
        #expect(show.status == 0)
        // Round trip: what show prints, apply reads, and it is the same policy.
        let other = try await TestServer.shared.freshDatabase()
        let reapply = try await cli(["policy", "apply", "-"], settings: other, stdin: show.stdout)
        #expect(reapply.status == 0, "\(reapply.stderr)")
        try await TestServer.withConnection(other) { conn async throws in
            #expect(
                try await conn.scalar(
                    "SELECT config = \(designExampleConfig)::jsonb FROM dispatch_policy.policies WHERE name = 'webhooks'", as: Bool.self))
        }

        let missing = try await cli(["policy", "show", "nope"], settings: settings)
        #expect(missing.status != 0)
        #expect(missing.stderr == "dispatch-policy: unknown policy: 'nope' (SQLSTATE 42704)\n")

        // drop: refused while a job is staged, then forced (the job cancelled).
        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.exec("SELECT dispatch_policy.stage('emails', '{}')")
        }
        let refused = try await cli(["policy", "drop", "emails"], settings: settings)
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("2BP01"), "\(refused.stderr)")
        let forced = try await cli(["policy", "drop", "emails", "--force"], settings: settings)
        #expect(forced.status == 0, "\(forced.stderr)")
        #expect(forced.stdout == "dropped emails (1 job cancelled)\n")
        let after = try await cli(["policy", "list"], settings: settings)
        #expect(!after.stdout.contains("emails"))
    }

    @Test("an invalid policy file fails with one line naming the field and SQLSTATE, and stores nothing")
    func invalidPolicy() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let result = try await cli(
            ["policy", "apply", "-"], settings: settings,
            stdin: """
                [{"name": "ok", "config": {}}, {"name": "bad", "config": {"gates": [{"type": "throttle", "rate": 1, "per": 0}]}}]
                """)
        #expect(result.status == 1)
        // One line, then the server's hint on a line of its own when it gives one.
        let lines = result.stderr.split(separator: "\n")
        #expect((1...2).contains(lines.count))
        #expect(lines.first?.hasPrefix("dispatch-policy: policy bad: invalid policy config: gates[0].per must be") == true)
        #expect(lines.first?.hasSuffix("(SQLSTATE 22023)") == true)
        #expect(lines.dropFirst().allSatisfy { $0.hasPrefix("dispatch-policy: hint: ") })
        #expect(result.stdout.isEmpty)
        let list = try await cli(["policy", "list"], settings: settings)
        #expect(list.stdout.split(separator: "\n").count == 1)

        let notJSON = try await cli(["policy", "apply", "-"], settings: settings, stdin: "{nope")
        #expect(notJSON.status == 1)
        #expect(notJSON.stderr.hasPrefix("dispatch-policy: policy file is not valid JSON"))

        // One policy twice in an array: refused, nothing declared.
        let twice = try await cli(
            ["policy", "apply", "-"], settings: settings,
            stdin: """
                [{"name": "a", "config": {}}, {"name": "b", "config": {}}, {"name": "a", "config": {"batch_size": 5}}]
                """)
        #expect(twice.status == 1)
        #expect(twice.stderr.hasPrefix("dispatch-policy: policy file[2].name repeats a of policy file[0]"), "\(twice.stderr)")
        #expect(try await cli(["policy", "list"], settings: settings).stdout.split(separator: "\n").count == 1)

        // A Latin-1 byte: the same error from a path and from a pipe, nothing stored.
        let path = FileManager.default.temporaryDirectory.appending(path: "latin1-\(UUID().uuidString).json").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        var bytes = Array(#"{"name": "caf"#.utf8)
        bytes.append(0xE9)
        bytes += Array(#"", "config": {}}"#.utf8)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let fromPath = try await cli(["policy", "apply", path], settings: settings)
        var environment = ProcessInfo.processInfo.environment
        environment["DATABASE_URL"] = databaseURL(settings)
        let fromPipe = try await runProcess(
            "/bin/sh", ["-c", "exec \"$0\" policy apply - < \"$1\"", cliPath, path], environment: environment)
        for result in [fromPath, fromPipe] {
            #expect(result.status == 1)
            #expect(result.stderr.contains("is not UTF-8 text (byte 13 does not begin a UTF-8 character)"), "\(result.stderr)")
        }
        #expect(fromPipe.stderr.contains("standard input"))
        #expect(try await cli(["policy", "list"], settings: settings).stdout.split(separator: "\n").count == 1)
    }

    @Test("stage prints the job id, and for a duplicate the holder's id with a note on stderr (exit 0); errors exit non-zero with the hint")
    func stage() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        _ = try await cli(
            ["policy", "apply", "-"], settings: settings, stdin: #"{"name": "p", "config": {"round_robin_by": "{account}"}}"#)
        let first = try await cli(
            [
                "stage", "p", "--args", #"{"n": 1}"#, "--context", #"{"account": "a"}"#, "--dedupe-key", "k", "--queue", "q", "--priority",
                "3",
            ], settings: settings)
        #expect(first.status == 0, "\(first.stderr)")
        let id = try #require(Int64(first.stdout.trimmingCharacters(in: .whitespacesAndNewlines)))
        let again = try await cli(["stage", "p", "--args", "{}", "--dedupe-key", "k"], settings: settings)
        #expect(again.status == 0)
        #expect(again.stdout == "\(id)\n")
        #expect(again.stderr.hasPrefix("dispatch-policy: kept: job \(id) of p holds dedupe key k; nothing was staged"), "\(again.stderr)")
        let later = try await cli(["stage", "p", "--args", "{}", "--delay", "10m"], settings: settings)
        #expect(later.status == 0)
        try await TestServer.withConnection(settings) { conn async throws in
            let (queue, priority, rr) = try #require(
                try await conn.rows(
                    "SELECT queue, priority, round_robin_key FROM dispatch_policy.staged_jobs WHERE id = \(id)", logger: TestServer.logger
                ).first
            ).decode((String, Int, String).self)
            #expect(queue == "q" && priority == 3 && rr == "a")
            #expect(try await conn.scalar("SELECT scheduled FROM dispatch_policy.policy_overview", as: Int.self) == 1)
        }

        let unknown = try await cli(["stage", "nope", "--args", "{}"], settings: settings)
        #expect(unknown.status == 1)
        #expect(
            unknown.stderr == """
                dispatch-policy: unknown policy: 'nope' (SQLSTATE 42704)
                dispatch-policy: hint: Declare it first with dispatch_policy.declare_policy(name, config) or "dispatch-policy policy apply FILE".

                """)
        let badJSON = try await cli(["stage", "p", "--args", "{"], settings: settings)
        #expect(badJSON.status == 1)
        #expect(badJSON.stderr == "dispatch-policy: --args is not valid JSON: {\n")
        let badContext = try await cli(["stage", "p", "--args", "{}", "--context", "[1]"], settings: settings)
        #expect(badContext.status == 1)
        #expect(badContext.stderr.contains("context must be a JSON object") && badContext.stderr.contains("SQLSTATE 22023"))
    }

    @Test("the connection comes from --database-url, else DATABASE_URL, else the PG* variables")
    func connectionSources() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        _ = try await cli(["policy", "apply", "-"], settings: settings, stdin: #"{"name": "from_url", "config": {}}"#)

        // PG* variables only.
        let pgOnly = try await cli(["policy", "list"], settings: settings, env: libpqEnvironment(settings))
        #expect(pgOnly.status == 0, "\(pgOnly.stderr)")
        #expect(pgOnly.stdout.contains("from_url"))

        // DATABASE_URL wins over PG*: point PG* at a database that does not exist.
        var env = libpqEnvironment(settings)
        env["PGDATABASE"] = "does_not_exist"
        env["DATABASE_URL"] = databaseURL(settings)
        let viaURL = try await cli(["policy", "list"], settings: settings, env: env)
        #expect(viaURL.status == 0, "\(viaURL.stderr)")

        // --database-url wins over DATABASE_URL.
        env["DATABASE_URL"] = "postgres://nobody@127.0.0.1:1/nothing?sslmode=disable"
        let viaFlag = try await cli(["policy", "list", "--database-url", settings.description], settings: settings, env: env)
        #expect(viaFlag.status == 0, "\(viaFlag.stderr)")

        // A server that is not there: one line and its hint, non-zero.
        let refused = try await cli(["policy", "list"], settings: settings, env: env)
        #expect(refused.status == 1)
        #expect(refused.stderr.hasPrefix("dispatch-policy: cannot connect to postgres://nobody@127.0.0.1:1/nothing"))
        #expect(refused.stderr.split(separator: "\n").count == 2)
        #expect(refused.stderr.hasSuffix("dispatch-policy: hint: Set --database-url, DATABASE_URL or the PG* variables.\n"))
    }

    /// Issue 11, finding 1: configuration errors exited 1, which systemd's
    /// Restart=on-failure retried forever.
    @Test("exit statuses follow sysexits: 64 for usage, 78 for configuration, 1 for runtime failures")
    func exitStatuses() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let missing = "/nonexistent/dispatch-policy-\(UUID().uuidString)/root.crt"
        let cases: [(arguments: [String], url: String?, status: Int32, stderr: String)] = [
            (["tick", "--no-such-flag"], nil, 64, "Unknown option"),
            (["tick", "--once", "--for", "1s"], nil, 64, "--once and --for exclude each other"),
            (["run", "--idle-pause", "forever"], nil, 64, "--idle-pause"),
            (["work", "--policy", "p"], nil, 64, "the command to run comes after --"),
            (["status"], "mysql://db.example/app", 78, "a database URL must start with postgres://"),
            (["run"], "postgres://u@localhost:70000/db", 78, "port must be a number from 1 to 65535"),
            (["tick"], "postgres://u@localhost/db?sslmode=sometimes", 78, "sslmode must be one of"),
            (["run"], "postgres://u@localhost/db?sslmode=verify-full&sslrootcert=\(missing)", 78, "cannot read the root certificate"),
            (
                ["work", "--policy", "p", "--", "true"], "postgres://u@localhost/db?nonsense=1", 78,
                "unknown connection option \"nonsense\""
            ),
            (["admin", "--allow-actions", "--bind", "127.0.0.1:0"], nil, 78, "--allow-actions needs a token"),
            (["policy", "list"], "postgres://nobody@127.0.0.1:1/nothing?sslmode=disable", 1, "cannot connect to"),
            (["tick", "--policy", "nope"], nil, 1, "unknown policy: 'nope'"),
        ]
        for (arguments, url, status, stderr) in cases {
            var environment = ProcessInfo.processInfo.environment
            environment["DATABASE_URL"] = url ?? databaseURL(settings)
            environment["DISPATCH_POLICY_ADMIN_TOKEN"] = nil
            let result = try await cli(arguments, settings: settings, env: environment)
            #expect(result.status == status, "\(arguments) with \(url ?? "the test database"): \(result.stderr)")
            #expect(result.stderr.contains(stderr), "\(arguments): \(result.stderr)")
        }
        // Said in --help.
        let help = try await cli(["--help"], settings: settings)
        let words = help.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        #expect(words.contains("64 a usage error and 78 a configuration error"), "\(help.stdout)")
    }

    /// Issue 11, finding 3: the admin token came only from the environment.
    @Test("admin --token-file: read as libpq reads a password file; empty, unreadable, group-readable or doubled tokens are refused")
    func tokenFile() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
        }
        let directory = FileManager.default.temporaryDirectory.appending(path: "token-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let token = "token-\(UUID().uuidString)"
        func file(_ name: String, _ text: String, mode: Int) throws -> String {
            let path = "\(directory)/\(name)"
            try Data(text.utf8).write(to: URL(fileURLWithPath: path))
            try FileManager.default.setAttributes([.posixPermissions: mode], ofItemAtPath: path)
            return path
        }
        var environment = ProcessInfo.processInfo.environment
        environment["DATABASE_URL"] = databaseURL(settings)
        environment["DISPATCH_POLICY_ADMIN_TOKEN"] = nil
        environment["CREDENTIALS_DIRECTORY"] = nil
        let admin = ["admin", "--allow-actions", "--bind", "127.0.0.1:0", "--token-file"]
        let refusals: [(path: String, extra: [String: String], status: Int32, stderr: String)] = [
            (try file("empty", "", mode: 0o600), [:], 78, "is empty"),
            (try file("newline", "\n", mode: 0o600), [:], 78, "is empty"),
            (try file("open", token + "\n", mode: 0o644), [:], 78, "has group or world access; permissions should be u=rw (0600) or less"),
            (try file("group", token, mode: 0o640), [:], 78, "has group or world access"),
            (try file("short", "short\n", mode: 0o600), [:], 78, "at least 16 characters"),
            ("\(directory)/missing", [:], 78, "cannot read the token file"),
            (try file("both", token, mode: 0o600), ["DISPATCH_POLICY_ADMIN_TOKEN": token], 64, "exclude each other"),
        ]
        for refusal in refusals {
            // Bounded: an admin that accepted the file would serve until stopped (124 then).
            let result = try await runProcess(
                "/usr/bin/timeout", ["20", cliPath] + admin + [refusal.path],
                environment: environment.merging(refusal.extra) { $1 })
            #expect(result.status == refusal.status, "\(refusal.path): \(result.stderr)")
            #expect(result.stderr.contains(refusal.stderr), "\(refusal.path): \(result.stderr)")
        }
        // Started: from a 0600 file (its newline stripped, CRLF too), and
        // from a systemd credential, whose mode is systemd's business.
        let credentials = "\(directory)/credentials"
        try FileManager.default.createDirectory(atPath: credentials, withIntermediateDirectories: true)
        let runs: [(path: String, credentials: String?)] = [
            (try file("good", token + "\n", mode: 0o600), nil),
            (try file("crlf", token + "\r\n", mode: 0o400), nil),
            (try file("credentials/admin-token", token + "\n", mode: 0o640), credentials),
        ]
        for run in runs {
            var env = environment
            env["CREDENTIALS_DIRECTORY"] = run.credentials
            let child = try await spawnChild(cliPath, admin + [run.path], environment: env)
            var address: String?
            _ = try await waitUntil(30) {
                address =
                    child.output().stderr.components(separatedBy: "dispatch-policy: listening on ").dropFirst().first?
                    .components(separatedBy: "\n").first
                return address != nil || child.output().stderr.contains("dispatch-policy: ") && !child.output().stderr.contains("listening")
            }
            let base = try #require(address, "\(run.path): \(child.output().stderr)")
            for (bearer, expected) in [(token + "x", 403), (token, 303)] {
                var request = URLRequest(url: try #require(URL(string: "\(base)/actions/pause")))
                request.httpMethod = "POST"
                request.setValue("Bearer \(bearer)", forHTTPHeaderField: "Authorization")
                request.setValue("application/x-www-form-urlencoded", forHTTPHeaderField: "Content-Type")
                request.httpBody = Data("policy=p".utf8)
                let status = try await statusCode(request)
                #expect(status == expected, "\(run.path), token \(bearer == token ? "right" : "wrong"): \(status)")
            }
            child.signal(SIGTERM)
            #expect(await child.wait() == .exited(0), "\(child.output().stderr)")
            try await TestServer.withConnection(settings) { conn in
                try await PolicyCatalog(executor: conn, logger: TestServer.logger).resume("p")
            }
        }
    }

    /// Issue 11, finding 4: cron mailed tick's line every minute unless its
    /// output went to /dev/null.
    @Test("tick --quiet prints nothing when it succeeds; its errors still go to standard error with the same status")
    func tickQuiet() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
            try await conn.exec("SELECT dispatch_policy.stage('p', '{}')")
        }
        let loud = try await cli(["tick"], settings: settings)
        #expect(loud.status == 0 && loud.stdout.hasPrefix("p: admitted 1 in 1 tick"), "\(loud.stdout)")
        try await TestServer.withConnection(settings) { conn in try await conn.exec("SELECT dispatch_policy.stage('p', '{}')") }
        for arguments in [["tick", "--quiet"], ["tick", "-q", "--for", "10s"], ["tick", "-q"]] {
            let quiet = try await cli(arguments, settings: settings)
            #expect(quiet.status == 0 && quiet.stdout.isEmpty && quiet.stderr.isEmpty, "\(arguments): \(quiet.stdout)\(quiet.stderr)")
        }
        #expect(
            try await TestServer.withConnection(settings) { conn in
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs", as: Int.self)
            } == 2)
        let failed = try await cli(["tick", "--quiet", "--policy", "nope"], settings: settings)
        #expect(failed.status == 1 && failed.stdout.isEmpty && failed.stderr.contains("unknown policy: 'nope'"), "\(failed)")
        // A policy whose tick fails: the others admit, and the run says so.
        try await TestServer.withConnection(settings) { conn in
            try await conn.exec(
                """
                CREATE FUNCTION public.down(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'target down'; END $$
                """)
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "broken", config: try PolicyConfig(target: .sql(function: "public.down")).json())
            try await conn.exec("SELECT dispatch_policy.stage('broken', '{}')")
        }
        let broken = try await cli(["tick", "-q"], settings: settings)
        #expect(broken.status == 1 && broken.stdout.isEmpty && broken.stderr.contains("policy broken: 1 tick failed"), "\(broken)")
    }
}

/// The HTTP status of `request`, redirects not followed.
private func statusCode(_ request: URLRequest) async throws -> Int {
    final class NoRedirects: NSObject, URLSessionTaskDelegate {
        func urlSession(
            _ session: URLSession, task: URLSessionTask, willPerformHTTPRedirection response: HTTPURLResponse,
            newRequest request: URLRequest, completionHandler: @escaping (URLRequest?) -> Void
        ) {
            completionHandler(nil)
        }
    }
    let session = URLSession(configuration: .ephemeral, delegate: NoRedirects(), delegateQueue: nil)
    defer { session.finishTasksAndInvalidate() }
    let (_, response) = try await session.data(for: request)
    return (response as? HTTPURLResponse)?.statusCode ?? 0
}
