import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("dispatch-policy work: a command per job", .timeLimit(.minutes(3)))
struct WorkCommandTests {
    @Test(
        "runs the command once per job with its args on stdin and its identity in the environment; exit 0 completes, another status fails with stderr's tail; SIGTERM drains"
    )
    func runsJobs() async throws {
        try await withTestDatabase { conn, settings in
            try await conn.exec(#"SELECT dispatch_policy.declare_policy('jobs', '{"max_attempts": 1}')"#)
            for n in 1...4 {
                try await conn.exec(
                    PostgresQuery(unsafeSQL: #"SELECT dispatch_policy.stage('jobs', '{"n": \#(n)}', '{"tenant": "t\#(n)"}')"#))
            }
            try await conn.exec(#"SELECT dispatch_policy.stage('jobs', '{"fail": true}')"#)
            // Runs for a while: SIGTERM comes while it runs, and the worker waits for it.
            try await conn.exec(#"SELECT dispatch_policy.stage('jobs', '{"slow": true}')"#)
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "jobs")

            let out = FileManager.default.temporaryDirectory.path + "/dp-work-\(UUID().uuidString)"
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: out) }
            let script = #"""
                args=$(cat)
                printf '%s|%s|%s|%s|%s\n' "$args" "$DISPATCH_POLICY_POLICY" "$DISPATCH_POLICY_QUEUE" "$DISPATCH_POLICY_ATTEMPT" "$DISPATCH_POLICY_CONTEXT" > "$OUT/$DISPATCH_POLICY_JOB_ID"
                case "$args" in
                  *fail*) echo "noise that scrolls away" >&2; echo "cannot reach the endpoint" >&2; exit 3 ;;
                  *slow*) touch "$OUT/slow-started"; sleep 3; echo done > "$OUT/slow-finished" ;;
                esac
                """#
            var env = ProcessInfo.processInfo.environment
            env["DATABASE_URL"] = databaseURL(settings)
            env["OUT"] = out
            let worker = try await spawnChild(
                cliPath, ["work", "--policy", "jobs", "--concurrency", "3", "--", "/bin/sh", "-c", script], environment: env)
            let started = try await waitUntil(60) { FileManager.default.fileExists(atPath: out + "/slow-started") }
            #expect(started, "the slow job did not start: \(worker.output().stderr)")
            // Everything but the slow job is done, then SIGTERM: the slow job still ends completed.
            _ = try await waitUntil(60) {
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.finished_jobs", as: Int.self) == 5
            }
            worker.signal(SIGTERM)
            let ending = await worker.wait()
            #expect(ending == .exited(0), "\(worker.output().stderr)")
            #expect(FileManager.default.fileExists(atPath: out + "/slow-finished"), "the worker did not wait for the running command")

            let rows = try await conn.rows(
                "SELECT id, status, args::text, coalesce(last_error, '') FROM dispatch_policy.finished_jobs ORDER BY id",
                logger: TestServer.logger)
            var statuses: [String: String] = [:]
            for row in rows {
                let (id, status, args, error) = try row.decode((Int64, String, String, String).self)
                statuses[args] = status
                let seen = try String(contentsOfFile: "\(out)/\(id)", encoding: .utf8).split(separator: "|").map(String.init)
                #expect(seen.count == 5)
                #expect(
                    try JSONSerialization.jsonObject(with: Data(seen[0].utf8)) as? NSDictionary
                        == JSONSerialization.jsonObject(with: Data(args.utf8)) as? NSDictionary, "args on stdin")
                #expect(seen[1] == "jobs" && seen[2] == "default" && seen[3] == "1")
                if args.contains("fail") {
                    #expect(error == "/bin/sh exited with status 3: noise that scrolls away\ncannot reach the endpoint")
                }
                if args.contains("\"n\": 2") { #expect(seen[4].contains("\"tenant\": \"t2\"")) }
            }
            #expect(statuses.count == 6, "\(statuses)")
            #expect(statuses.filter { $0.value == "completed" }.count == 5)
            #expect(statuses[#"{"fail": true}"#] == "dead")
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs", as: Int.self) == 0)
        }
    }

    /// Found by a hostile pass: a command that exits without reading its
    /// args (true) made the worker trap on the unwritten pipe.
    @Test("a command that never reads its args, with large args, completes its jobs and the worker lives on")
    func ignoresStdin() async throws {
        try await withTestDatabase { conn, settings in
            try await conn.exec(#"SELECT dispatch_policy.declare_policy('quiet', '{}')"#)
            let big = String(repeating: "x", count: 1_000_000)
            for _ in 1...6 {
                try await conn.exec(
                    PostgresQuery(unsafeSQL: #"SELECT dispatch_policy.stage('quiet', jsonb_build_object('blob', '\#(big)'))"#))
            }
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "quiet")
            var env = ProcessInfo.processInfo.environment
            env["DATABASE_URL"] = databaseURL(settings)
            let worker = try await spawnChild(cliPath, ["work", "--policy", "quiet", "--concurrency", "6", "--", "true"], environment: env)
            let done = try await waitUntil(60) {
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE status = 'completed'", as: Int.self)
                    == 6
            }
            #expect(done, "\(worker.output().stderr.suffix(2000))")
            worker.signal(SIGTERM)
            #expect(await worker.wait() == .exited(0), "\(worker.output().stderr.suffix(2000))")
        }
    }

    /// Issue 11: commands are started through swift-subprocess.
    @Test("a command has its standard input, output and error, and no other descriptor of the worker (its database sessions above all)")
    func commandInheritsNothing() async throws {
        try await withTestDatabase { conn, settings in
            try await conn.exec(#"SELECT dispatch_policy.declare_policy('fds', '{}')"#)
            try await conn.exec(#"SELECT dispatch_policy.stage('fds', '{}')"#)
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "fds")
            var env = ProcessInfo.processInfo.environment
            env["DATABASE_URL"] = databaseURL(settings)
            // The shell's own descriptors, while the worker holds its sessions,
            // onto the worker's standard output (a redirection would add the
            // shell's saved copy of it).
            let worker = try await spawnChild(
                cliPath, ["work", "--policy", "fds", "--", "/bin/sh", "-c", "ls /proc/$$/fd; true"], environment: env)
            let done = try await waitUntil(60) {
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE status = 'completed'", as: Int.self)
                    == 1
            }
            #expect(done, "\(worker.output().stderr.suffix(2000))")
            let workerFDs = openDescriptors(String(worker.pid))
            worker.signal(SIGTERM)
            #expect(await worker.wait() == .exited(0), "\(worker.output().stderr.suffix(2000))")
            let fds = worker.output().stdout.split(separator: "\n").compactMap { Int($0) }.sorted()
            #expect(fds == [0, 1, 2], "the worker had \(workerFDs)")
            #expect(workerFDs.count > 3, "the worker had nothing else to pass on")
        }
    }

    @Test("usage: at least one --policy, a command after --, a bounded concurrency (exit 64)")
    func usage() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        for arguments in [
            ["work", "--", "true"], ["work", "--policy", "p"], ["work", "--policy", "p", "--concurrency", "0", "--", "true"],
            // A typo would turn every job dead: refused at the start.
            ["work", "--policy", "p", "--", "/nonexistent/cmd"], ["work", "--policy", "p", "--", "no-such-command-here"],
        ] {
            let result = try await cli(arguments, settings: settings)
            #expect(result.status == 64, "\(arguments): \(result.stderr)")
        }
    }
}
