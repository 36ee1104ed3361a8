import DispatchPolicyAdmin
import Foundation
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Prometheus
import Testing

@testable import DispatchPolicy

private func declare(_ conn: PostgresConnection, _ name: String, _ config: PolicyConfig) async throws {
    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: try config.json())
}

private func stageJobs(_ conn: PostgresConnection, _ policy: String, _ n: Int) async throws {
    try await conn.exec(
        "SELECT dispatch_policy.stage_many(\(policy), (SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, \(n)) i))")
}

/// What partition_overview shows of one gate's partition 'default'.
private func overview(_ conn: PostgresConnection, _ policy: String, _ gate: String) async throws -> (
    inFlight: Int, tokens: Double?, wouldRefuse: Int64?, lag: Double?, overCap: Int?
) {
    try #require(
        try await conn.rows(
            """
            SELECT in_flight, tokens::float8, would_refuse, would_be_lag_seconds::float8, over_cap
            FROM dispatch_policy.partition_overview WHERE policy = \(policy) AND gate = \(gate) AND partition = 'default'
            """, logger: TestServer.logger
        ).first
    ).decode((Int, Double?, Int64?, Double?, Int?).self)
}

/// Shadow policies (issue 12) through the runner's tick; the SQL-level
/// cases are in sql/test/sql/shadow.sql, the decision in ShadowAdmissionTests.
@Suite("Shadow policies", .timeLimit(.minutes(15)))
struct ShadowTests {
    @Test("a shadow concurrency of 1 admits 10 staged jobs in one tick of 3 statements and records 9 would-refusals")
    func concurrency() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "trial", PolicyConfig(mode: .shadow) { Gate.concurrency(max: 1) })
            try await stageJobs(conn, "trial", 10)
            let counting = CountingExecutor(conn)
            let ticker = Ticker(connection: conn, session: counting, logger: TestServer.logger)
            let result = try await ticker.tick(policy: "trial", reap: false)
            #expect(result.admitted == 10)
            #expect(result.shadow)
            #expect(result.wouldRefuseByGate == ["concurrency": 9])
            #expect(result.refusedByGate.isEmpty)
            #expect(counting.statements.count == 3, "\(counting.statements.map { $0.prefix(60) })")

            let row = try await overview(conn, "trial", "concurrency")
            #expect(row.inFlight == 10)
            #expect(row.wouldRefuse == 9)
            #expect(row.overCap == 9)
            #expect(
                try await conn.scalar(
                    "SELECT over_cap FROM dispatch_policy.shadow_refusals WHERE policy = 'trial' AND gate = 'concurrency'", as: Int.self)
                    == 9)
            #expect(
                try await conn.scalar("SELECT mode FROM dispatch_policy.policy_overview WHERE policy = 'trial'", as: String.self)
                    == "shadow")
            // Over the cap by design: nothing is wrong.
            try await expectCountersConsistent(conn)
            #expect(try await checkFindings(conn) == [])

            // The runner's counter and its summary line.
            let registry = PrometheusCollectorRegistry()
            DispatchPolicyMetrics(factory: PrometheusMetricsFactory(registry: registry)).record(result)
            var bytes: [UInt8] = []
            registry.emit(into: &bytes)
            let text = String(decoding: bytes, as: UTF8.self)
            #expect(text.contains(#"dispatch_policy_would_refuse_total{policy="trial",gate="concurrency"} 9"#), "\(text)")
            #expect(!text.contains("dispatch_policy_refused_total"), "\(text)")
            var summary = PolicySummary(policy: "trial")
            summary.add(result)
            #expect(summary.line.contains("shadow: would refuse concurrency=9"), "\(summary.line)")
        }
    }

    @Test("back to enforce: the over-cap partition refuses until it drains below the cap")
    func backToEnforce() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "trial", PolicyConfig(mode: .shadow) { Gate.concurrency(max: 2) })
            try await stageJobs(conn, "trial", 5)
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            #expect(try await ticker.tick(policy: "trial").admitted == 5)
            try await declare(conn, "trial", PolicyConfig { Gate.concurrency(max: 2) })
            #expect(
                try await conn.scalar("SELECT mode FROM dispatch_policy.policy_overview WHERE policy = 'trial'", as: String.self)
                    == "enforce")
            try await stageJobs(conn, "trial", 1)
            let refused = try await ticker.tick(policy: "trial")
            #expect(refused.admitted == 0)
            #expect(refused.refusedByGate == ["concurrency": 1])
            #expect(refused.wouldRefuseByGate.isEmpty)
            #expect(try await checkFindings(conn) == [])
            // 5 in flight: 3 completions leave 2, still the cap; a 4th frees a slot.
            let ids = try await conn.rows("SELECT id FROM dispatch_policy.admitted_jobs ORDER BY id", logger: TestServer.logger)
                .map { try $0.decode(Int64.self) }
            for id in ids.prefix(3) { try await conn.exec("SELECT dispatch_policy.complete(\(id))") }
            #expect(try await ticker.tick(policy: "trial").admitted == 0)
            try await conn.exec("SELECT dispatch_policy.complete(\(ids[3]))")
            #expect(try await ticker.tick(policy: "trial").admitted == 1)
            #expect(try await overview(conn, "trial", "concurrency").overCap == 0)
            try await expectCountersConsistent(conn)
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("a shadow throttle records its deficit and would-be lag; back to enforce it refuses until the deficit refills")
    func throttle() async throws {
        try await withTestDatabase { conn, _ in
            // 1 token a minute, burst 2: 5 jobs leave the bucket 3 tokens short, 180 s behind.
            try await declare(conn, "trial", PolicyConfig(mode: .shadow) { Gate.throttle(name: "per_min", rate: 1, per: 60, burst: 2) })
            try await stageJobs(conn, "trial", 5)
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            let result = try await ticker.tick(policy: "trial")
            #expect(result.admitted == 5)
            #expect(result.wouldRefuseByGate == ["per_min": 3])
            #expect(result.nextTokenIn == nil)
            let row = try await overview(conn, "trial", "per_min")
            #expect(row.wouldRefuse == 3)
            // Live: the deficit refills a token a minute while the test runs
            // (a loaded machine took 5.5 s, and CI over 6 s, to get here).
            #expect((-3.01 ... -2.5).contains(try #require(row.tokens)), "\(String(describing: row.tokens))")
            #expect((150...180.5).contains(try #require(row.lag)), "\(String(describing: row.lag))")
            let stored = try await conn.scalar(
                "SELECT would_be_lag_seconds FROM dispatch_policy.shadow_refusals WHERE policy = 'trial'", as: Double.self)
            #expect(abs(stored - 180) < 1)
            #expect(try await checkFindings(conn) == [])

            // explain: the job would wait, and is admitted anyway.
            try await stageJobs(conn, "trial", 1)
            let pending = try await conn.scalar("SELECT id FROM dispatch_policy.staged_jobs", as: Int64.self)
            let verdict = try await conn.scalar(
                "SELECT verdict FROM dispatch_policy.explain(\(pending)) WHERE aspect = 'gate'", as: String.self)
            #expect(verdict == "would wait")

            // Enforcing: the deficit must refill first (and that is no finding).
            try await declare(conn, "trial", PolicyConfig { Gate.throttle(name: "per_min", rate: 1, per: 60, burst: 2) })
            let refused = try await ticker.tick(policy: "trial")
            #expect(refused.admitted == 0)
            #expect(refused.refusedByGate == ["per_min": 1])
            #expect(try await checkFindings(conn) == [])
            // 4 minutes later the bucket holds a whole token again.
            try await conn.exec("UPDATE dispatch_policy.throttle_buckets SET refilled_at = refilled_at - interval '4 minutes'")
            try await conn.exec("UPDATE dispatch_policy.lanes SET blocked_until = NULL")
            #expect(try await ticker.tick(policy: "trial").admitted == 1)
            #expect(try await checkFindings(conn) == [])
        }
    }

    @Test("status prints the state shadow, tick prints would-refuse per gate, and the admin shows the badge and the column")
    func surfaces() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "trial", PolicyConfig(mode: .shadow) { Gate.concurrency(max: 1, partitionBy: "{n}") })
            try await conn.exec(
                #"SELECT dispatch_policy.stage_many('trial', '[{"args": 1, "context": {"n": "a"}}, {"args": 2, "context": {"n": "a"}}, {"args": 3, "context": {"n": "a"}}]')"#
            )
            let tick = try await cli(["tick", "--policy", "trial"], settings: settings)
            #expect(tick.status == 0, "\(tick.stderr)")
            #expect(
                tick.stdout.contains("trial: admitted 3") && tick.stdout.contains("shadow: would refuse concurrency=2"), "\(tick.stdout)")
            let status = try await cli(["status"], settings: settings)
            let line = status.stdout.split(separator: "\n").first { $0.hasPrefix("trial ") } ?? ""
            #expect(line.split(separator: " ").dropFirst().first == "shadow", "\(status.stdout)")

            var options = AdminOptions(token: nil)
            options.partitionMetrics = true
            let server = try AdminServer(
                store: AdminStore(executor: conn, logger: TestServer.logger), options: options,
                registry: PrometheusCollectorRegistry(),
                logger: TestServer.logger)
            let app = Application(router: server.router())
            let (overview, page, metrics) = try await app.test(.router) { client in
                (
                    try await client.execute(uri: "/", method: .get) { String(buffer: $0.body) },
                    try await client.execute(uri: "/policies/trial", method: .get) { String(buffer: $0.body) },
                    try await client.execute(uri: "/metrics", method: .get) { String(buffer: $0.body) }
                )
            }
            // Found in the hostile pass: would-refusals were on the page but not in the per-partition gauges.
            #expect(
                metrics.contains(#"dispatch_policy_partition_would_refuse{policy="trial",gate="concurrency",partition="a"} 2"#),
                "\(metrics)")
            #expect(overview.contains(#"<span class="state shadow">shadow</span>"#))
            #expect(page.contains(#"<span class="state shadow">shadow</span>"#))
            #expect(page.contains("Shadow mode: every job the fetch reaches is admitted"))
            #expect(page.contains(">Would refuse</th>"))
            #expect(page.contains(#"<td class="n">2</td>"#), "\(page)")
        }
    }
}
