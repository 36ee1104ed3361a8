import DispatchPolicy
import Foundation
import Testing

@Suite("Demo")
struct DemoTests {
    @Test("dispatch-policy demo starts its own PostgreSQL, runs, and its summary shows every gate held")
    func demo() async throws { try await LiveTests.exclusive { try await demoLive() } }

    func demoLive() async throws {
        var env = ProcessInfo.processInfo.environment
        env["DATABASE_URL"] = nil
        let result = try await runProcess(cliPath, ["demo", "--duration", "6s"], environment: env)
        #expect(result.status == 0, "\(result.stderr)")
        let out = result.stdout
        #expect(out.contains("starting a private PostgreSQL cluster"))
        #expect(out.contains("t=1s demo_reports: pending"))
        #expect(out.contains("=== summary ==="))
        #expect(out.contains("throttle     acme-hook:") && out.contains("HELD"))
        #expect(!out.contains("EXCEEDED"))
        #expect(out.contains("12 of 12 small tenants admitted"))
        #expect(out.contains("concurrency  highest sampled in flight per account:"))
        #expect(out.contains("adaptive     caps seen"))
    }
}
