// Figure 10: fairness. Jain's index of admissions across 100 equally
// backlogged tenants under a binding global cap, with a live runner and
// workers; and in how many ticks each of 99 small tenants is first admitted
// when they were staged behind one tenant's 100,000 jobs.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum FairnessFigures {
    static func jain(_ shares: [Double]) -> Double {
        let total = shares.reduce(0, +)
        let squares = shares.map { $0 * $0 }.reduce(0, +)
        return squares == 0 ? .nan : total * total / (Double(shares.count) * squares)
    }

    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        let logger = bench.logger
        let (settings, db) = try await bench.freshDatabase("fairness")
        defer { Task { try? await db.close() } }
        let tenants = 100
        let perTenant = bench.pick(1_000, smoke: 200)
        let duration = bench.pick(Duration.seconds(60), smoke: .seconds(8))
        try await bench.declare(
            db, "fair",
            PolicyConfig(roundRobinBy: "{t}", roundRobinQuantum: 5) {
                Gate.globalCap(max: 40)
                Gate.fairInterleave(partitionBy: "{t}")
            })
        // Tenant by tenant, so staging order alone would serve them one after the other.
        for tenant in 0..<tenants {
            try await bench.stage(
                db, policy: "fair", count: perTenant, context: "jsonb_build_object('t', 't\(String(format: "%03d", tenant))')")
        }
        let tracker = JobTracker()
        let w = worker(bench, settings, concurrency: 40, handlers: ["fair": tracker.handler(sleepMs: 10)])
        @Sendable func shares() async throws -> [Double] {
            let counts = try await db.rows(
                """
                SELECT count(*)::float8 FROM (
                  SELECT context FROM dispatch_policy.admitted_jobs WHERE policy = 'fair'
                  UNION ALL SELECT context FROM dispatch_policy.finished_jobs WHERE policy = 'fair') x
                GROUP BY context ->> 't'
                """, logger: logger
            ).map { try $0.decode(Double.self) }
            return counts + Array(repeating: 0, count: max(0, tenants - counts.count))
        }
        let every = duration / 6
        let indexes = try await withLive([runner(bench, settings, policies: ["fair"]), w], logger: logger) {
            var indexes: [Double] = []
            for _ in 0..<6 {
                try await Task.sleep(for: every)
                indexes.append(jain(try await shares()))
            }
            return indexes
        }
        let final = try await shares()
        let total = final.reduce(0, +)
        guard (final.max() ?? 0) < Double(perTenant) else {
            throw BenchError("a tenant ran out of jobs: stage more than \(perTenant) each")
        }
        let j = indexes.last ?? .nan
        var rows = [
            Row(
                id: "10a",
                figure:
                    "fairness: Jain's index of admissions across 100 equally backlogged tenants, global cap 40, round-robin + `fair_interleave`, 40 worker slots × 10 ms, \(Int(seconds(duration))) s",
                measured: String(
                    format: "%@ admissions (%@/s), %@–%@ per tenant; index every %.0f s: %@", Fmt.n(total),
                    Fmt.n(total / seconds(duration)),
                    Fmt.n(final.min() ?? 0), Fmt.n(final.max() ?? 0), seconds(every),
                    indexes.map { String(format: "%.4f", $0) }.joined(separator: " ")),
                result: String(format: "%.4f", j), target: "≥ 0.99", met: j >= 0.99)
        ]

        // 99 small tenants staged behind 100,000 jobs of one tenant: ticks
        // (no runner, the Ticker by hand) until each small tenant has had a job admitted.
        let big = bench.pick(100_000, smoke: 20_000)
        let variants: [(String, String, PolicyConfig)] = [
            (
                "10b", "round-robin by tenant, batch 500",
                PolicyConfig(roundRobinBy: "{t}", batchSize: 500) {
                    Gate.concurrency(max: 1_000_000, partitionBy: "{t}")
                }
            ),
            (
                "10c", "no round-robin, throttle 1/s per tenant (the big tenant blocked after its first job), batch 500",
                PolicyConfig(batchSize: 500) {
                    Gate.throttle(rate: 1, per: 1, burst: 1, partitionBy: "{t}")
                }
            ),
        ]
        for (id, shape, config) in variants {
            let policy = "behind_\(id)"
            try await bench.declare(db, policy, config)
            try await bench.stage(db, policy: policy, count: big, context: "jsonb_build_object('t', 'big')")
            try await bench.stage(db, policy: policy, count: 99 * 10, context: "jsonb_build_object('t', 's' || (i % 99))")
            let ticker = Ticker(connection: db, logger: logger)
            var firsts: [Int] = []
            var seen = 0
            let maxTicks = 50
            for tick in 1...maxTicks {
                _ = try await ticker.tick(policy: policy)
                let now =
                    try await db.rows(
                        """
                        SELECT count(DISTINCT context ->> 't')::int FROM dispatch_policy.admitted_jobs
                        WHERE policy = \(policy) AND context ->> 't' <> 'big'
                        """, logger: logger
                    ).first?.decode(Int.self) ?? 0
                firsts += Array(repeating: tick, count: now - seen)
                seen = now
                if seen >= 99 { break }
            }
            let reached = firsts.count
            rows.append(
                Row(
                    id: id,
                    figure: "first admission of each of 99 small tenants staged behind a \(Fmt.n(Double(big)))-job tenant: \(shape)",
                    measured: reached == 99
                        ? "every small tenant by tick \(firsts.last ?? 0) (median tick \(firsts[firsts.count / 2]))"
                        : "\(reached) of 99 small tenants admitted within \(maxTicks) ticks",
                    result: reached == 99 ? "\(firsts.last ?? 0) ticks" : "> \(maxTicks) ticks", target: "report", met: nil))
        }
        return rows
    }
}
