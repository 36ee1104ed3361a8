import DispatchPolicy
import Foundation
import Testing

/// The README's examples, run as a reader would copy them: Tests/readme/run_readme.py
/// creates a scratch database on the test server, migrates it with the CLI,
/// runs every `sql` block through psql and every CLI block through the CLI,
/// in README order, and drops it. Blocks that cannot run as they are carry
/// a `<!-- readme-test: ... -->` marker (the script's header has the rule).
@Suite("README examples", .timeLimit(.minutes(5)))
struct ReadmeTests {
    @Test("every SQL and CLI example of the README runs against a scratch database")
    func readmeExamples() async throws {
        let server = try await TestServer.shared.get()
        var env = libpqEnvironment(server.admin)
        env["DISPATCH_POLICY_BIN"] = cliPath
        // psql of the server's PostgreSQL first (the private cluster's binaries, else the newest installed).
        let bin = try await TestServer.shared.binDirectory()
        env["PATH"] = bin + ":" + (env["PATH"] ?? "/usr/bin:/bin")
        let script = packageRoot.appending(path: "Tests/readme/run_readme.py").path
        let result = try await runProcess("/usr/bin/env", ["python3", script], environment: env)
        if result.status != 0 {
            Issue.record("run_readme.py failed (status \(result.status)):\n\(result.stdout)\n\(result.stderr)")
        } else {
            #expect(result.stdout.contains(" 0 failed"), "\(result.stdout)")
        }
    }
}
