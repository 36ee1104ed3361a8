import DispatchPolicy
import Foundation
import Testing

/// deploy/try.sh: the systemd units (systemd-analyze verify where it is
/// there), each unit's ExecStart and the cron line's command run for real,
/// each process under its dispatch_policy_* role.
@Suite("Deploying: the units and the cron line, tried", .timeLimit(.minutes(5)))
struct DeployTests {
    @Test("deploy/try.sh passes against a migrated database with the roles granted")
    func tryDeploy() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        var env = libpqEnvironment(settings)
        let psql = try await TestServer.shared.binDirectory() + "/psql"
        let roles = try await runProcess(
            psql, ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", packageRoot.appending(path: "sql/roles.sql").path], environment: env)
        try #require(roles.status == 0, "roles.sql: \(roles.stderr)")
        env["DISPATCH_POLICY_BIN"] = cliPath
        env["DATABASE_URL"] = databaseURL(settings)
        let result = try await runProcess("/bin/bash", [packageRoot.appending(path: "deploy/try.sh").path], environment: env)
        #expect(result.status == 0, "deploy/try.sh failed (status \(result.status)):\n\(result.stdout)\n\(result.stderr)")
        #expect((result.stdout + result.stderr).contains("worker: the 3 admitted jobs end completed"), "the worker part ran")
    }
}
