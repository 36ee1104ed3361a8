// Figure 10d: weighted fairness. Two backlogged tenants of round_robin_weight
// 1 and 3 behind a binding global cap, with a live runner and workers: each
// tenant's share of the admissions over the run.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum WeightedFigures {
    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        let logger = bench.logger
        let (settings, db) = try await bench.freshDatabase("weighted")
        defer { Task { try? await db.close() } }
        let perTenant = bench.pick(40_000, smoke: 4_000)
        let duration = bench.pick(Duration.seconds(60), smoke: .seconds(8))
        try await bench.declare(
            db, "weighted",
            PolicyConfig(roundRobinBy: "{t}", roundRobinQuantum: 5, roundRobinWeight: .context("weight", default: 1)) {
                Gate.globalCap(max: 8)
            })
        for (tenant, weight) in [("light", 1), ("heavy", 3)] {
            try await bench.stage(
                db, policy: "weighted", count: perTenant, context: "jsonb_build_object('t', '\(tenant)', 'weight', \(weight))")
        }
        let tracker = JobTracker()
        let w = worker(bench, settings, concurrency: 8, handlers: ["weighted": tracker.handler(sleepMs: 10)])
        @Sendable func counts() async throws -> [String: Double] {
            let rows = try await db.rows(
                """
                SELECT context ->> 't', count(*)::float8 FROM (
                  SELECT context FROM dispatch_policy.admitted_jobs WHERE policy = 'weighted'
                  UNION ALL SELECT context FROM dispatch_policy.finished_jobs WHERE policy = 'weighted') x
                GROUP BY 1
                """, logger: logger)
            var result: [String: Double] = [:]
            for row in rows {
                let (tenant, n) = try row.decode((String, Double).self)
                result[tenant] = n
            }
            return result
        }
        let every = duration / 4
        let shares = try await withLive([runner(bench, settings, policies: ["weighted"]), w], logger: logger) {
            var shares: [Double] = []
            for _ in 0..<4 {
                try await Task.sleep(for: every)
                let c = try await counts()
                let light = c["light"] ?? 0
                let total = light + (c["heavy"] ?? 0)
                shares.append(total == 0 ? .nan : light / total)
            }
            return shares
        }
        let final = try await counts()
        let light = final["light"] ?? 0
        let heavy = final["heavy"] ?? 0
        guard max(light, heavy) < Double(perTenant) else {
            throw BenchError("a tenant ran out of jobs: stage more than \(perTenant) each")
        }
        let share = light / max(light + heavy, 1)
        return [
            Row(
                id: "10d",
                figure:
                    "weighted fairness: 2 backlogged tenants of `round_robin_weight` 1 and 3, global cap 8, round-robin quantum 5, 8 worker slots × 10 ms, \(Int(seconds(duration))) s",
                measured: String(
                    format: "%@ admissions (%@/s): weight 1 %@, weight 3 %@; weight 1's share every %.0f s: %@", Fmt.n(light + heavy),
                    Fmt.n((light + heavy) / seconds(duration)), Fmt.n(light), Fmt.n(heavy), seconds(every),
                    shares.map { String(format: "%.3f", $0) }.joined(separator: " ")),
                result: String(format: "%.1f %% / %.1f %%", share * 100, (1 - share) * 100), target: "25 % / 75 % ± 2 %",
                met: abs(share - 0.25) <= 0.02)
        ]
    }
}
