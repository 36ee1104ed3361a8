import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

#if canImport(FoundationNetworking)
    import FoundationNetworking
#endif

@Suite("Demo", .timeLimit(.minutes(15)))
struct DemoTests {
    @Test("dispatch-policy demo starts its own PostgreSQL, runs, and its summary shows every gate held")
    func demo() async throws { try await LiveTests.exclusive { try await demoLive() } }

    func demoLive() async throws {
        var env = ProcessInfo.processInfo.environment
        env["DATABASE_URL"] = nil
        let result = try await runProcess(cliPath, ["demo", "--duration", "10s"], environment: env)
        #expect(result.status == 0, "\(result.stderr)")
        let out = result.stdout
        #expect(out.contains("starting a private PostgreSQL cluster"))
        #expect(out.contains(/t=\d+s demo_api: pending/) && out.contains("; demo_reports: pending"), "\(out)")
        #expect(out.contains("=== summary ==="))
        #expect(out.contains("throttle     acme-hook:") && out.contains("HELD"))
        #expect(!out.contains("EXCEEDED"))
        #expect(out.contains("12 of 12 small tenants admitted"))
        // Every cap binds in the demo's workload, and the summary judges it from the runs.
        // How many ran at once is the workers' doing, and under load they may
        // not overlap all 24 runs; that the gate refused (it bound) and the
        // peak never went over the cap is the demo's claim.
        for (line, cap) in [("concurrency  at most ", 4), ("global cap   at most ", 24)] {
            let rest = out.components(separatedBy: line).dropFirst().first ?? ""
            let peak = rest.prefix { $0.isNumber }
            #expect(Int(peak).map { (1...cap).contains($0) } == true, "\(line)\(peak) (cap \(cap))\n\(out)")
            #expect(rest.components(separatedBy: "\n").first?.contains("(cap \(cap)); it bound: ") == true, "\(out)")
        }
        #expect(!out.contains("not reached"), "\(out)")
        #expect(out.contains("adaptive     caps seen"))
        // The partner API's cost-weighted budget held, and the weights shared it 3:1.
        #expect(out.contains("cost         partner API: ") && !out.contains("EXCEEDED"), "\(out)")
        let share = out.components(separatedBy: "weights      gold (weight 3) got ").dropFirst().first?
            .components(separatedBy: " %").first.flatMap(Double.init)
        #expect(share.map { (70...80).contains($0) } == true, "gold's share: \(String(describing: share))\n\(out)")
        // The backpressure tenant's 429s: deferred, ran again, no attempt counted.
        #expect(out.contains("backpressure t05-hook answered 429 "), "\(out)")
        #expect(out.contains("ran again and completed; no attempt counted"), "\(out)")
        #expect(!out.contains("UNEXPECTED"), "\(out)")
    }

    /// Found in review (issue 10): Ctrl-C during the demo's initdb left an
    /// empty temporary cluster directory behind (the watchdog that removes
    /// it was started only after initdb).
    @Test("a demo interrupted while it makes its cluster leaves no directory behind")
    func demoInterrupted() async throws {
        let parent = FileManager.default.temporaryDirectory.appending(path: "dp-demo-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o777])
        defer { try? FileManager.default.removeItem(atPath: parent) }
        var env = ProcessInfo.processInfo.environment
        env["DATABASE_URL"] = nil
        env["TMPDIR"] = parent
        let child = try await spawnChild(cliPath, ["demo", "--duration", "30s"], environment: env)
        defer { child.signal(SIGKILL) }
        let made = try await waitUntil(30) {
            ((try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? []).contains { $0.hasPrefix("dispatch-policy-pg-") }
        }
        try #require(made, "the demo made no cluster directory in TMPDIR: \(child.output().stderr)")
        child.signal(SIGINT)
        _ = await child.wait()
        #expect(
            try await waitUntil(20) { ((try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? []).isEmpty },
            "left behind: \((try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? [])")
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
            return try await conn.scalar(
                """
                SELECT string_agg(x::text, '|' ORDER BY x::text) FROM (
                  SELECT row(a.*)::text FROM dispatch_policy.admitted_jobs a WHERE policy = 'billing'
                  UNION ALL SELECT row(s.*)::text FROM dispatch_policy.staged_jobs s WHERE policy = 'billing') x
                """, as: String.self)
        }
        let url = databaseURL(settings)
        // With the admin UI served while it runs (read-only): its overview lists the demo's policies.
        let child = try await spawnChild(
            cliPath, ["demo", "--duration", "6s", "--database-url", url, "--admin", "127.0.0.1:0"],
            environment: ProcessInfo.processInfo.environment)
        var address: String?
        _ = try await waitUntil(60) {
            address =
                child.output().stderr.components(separatedBy: "dispatch-policy: listening on ").dropFirst().first?.components(
                    separatedBy: "\n"
                ).first
            return address != nil
        }
        let base = try #require(address, "\(child.output().stderr)")
        let (data, response) = try await URLSession.shared.data(from: try #require(URL(string: "\(base)/")))
        #expect((response as? HTTPURLResponse)?.statusCode == 200)
        #expect(String(decoding: data, as: UTF8.self).contains("demo_webhooks"))
        let ending = await child.wait()
        #expect(ending == .exited(0), "\(child.output().stderr)")
        #expect(child.output().stdout.contains("=== summary ==="))
        // Gone with the demo.
        await #expect(throws: (any Error).self) { _ = try await URLSession.shared.data(from: URL(string: "\(base)/")!) }
        #expect(try await cli(["demo", "--admin", "nowhere"], settings: settings).status == 64)
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(
                try await conn.scalar(
                    """
                    SELECT string_agg(x::text, '|' ORDER BY x::text) FROM (
                      SELECT row(a.*)::text FROM dispatch_policy.admitted_jobs a WHERE policy = 'billing'
                      UNION ALL SELECT row(s.*)::text FROM dispatch_policy.staged_jobs s WHERE policy = 'billing') x
                    """, as: String.self) == before)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.job_failures WHERE policy = 'billing'", as: Int.self) == 0)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.finished_jobs WHERE policy LIKE 'demo%'", as: Int.self) > 0)
        }
    }
}
