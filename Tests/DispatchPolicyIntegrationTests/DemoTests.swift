import DispatchPolicy
import Foundation
import Testing

@Suite("Demo", .timeLimit(.minutes(8)))
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

    /// Regression (15): `demo --database-url` claimed and failed a real
    /// waiting job of another policy within seconds.
    @Test("demo --database-url touches nothing it did not create")
    func demoLeavesOthersAlone() async throws { try await LiveTests.exclusive { try await demoLeavesOthersAloneLive() } }

    func demoLeavesOthersAloneLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let before = try await TestServer.withConnection(settings) { conn async throws -> String in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "billing", config: "{}")
            try await conn.exec(#"SELECT dispatch_policy.stage_many('billing', '[{"args": 1}, {"args": 2, "queue": "reports"}]')"#)
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "billing")
            try await conn.exec(#"SELECT dispatch_policy.stage('billing', '3')"#)
            return try await conn.scalar("""
                SELECT string_agg(x::text, '|' ORDER BY x::text) FROM (
                  SELECT row(a.*)::text FROM dispatch_policy.admitted_jobs a WHERE policy = 'billing'
                  UNION ALL SELECT row(s.*)::text FROM dispatch_policy.staged_jobs s WHERE policy = 'billing') x
                """, as: String.self)
        }
        let url = settings.description + (settings.description.contains("?") ? "&" : "?") + "sslmode=disable"
        let result = try await cli(["demo", "--duration", "4s", "--database-url", url], settings: settings)
        #expect(result.status == 0, "\(result.stderr)")
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(try await conn.scalar("""
                SELECT string_agg(x::text, '|' ORDER BY x::text) FROM (
                  SELECT row(a.*)::text FROM dispatch_policy.admitted_jobs a WHERE policy = 'billing'
                  UNION ALL SELECT row(s.*)::text FROM dispatch_policy.staged_jobs s WHERE policy = 'billing') x
                """, as: String.self) == before)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.job_failures WHERE policy = 'billing'", as: Int.self) == 0)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs WHERE policy LIKE 'demo%'", as: Int.self) > 0)
        }
    }
}
