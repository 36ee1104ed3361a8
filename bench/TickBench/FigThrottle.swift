// Figures 6 and 11: throttle utilization under backlog with a live runner,
// and throttle exactness with 4 runners: every run of admissions, taken from
// `admitted_at`, against `burst + rate × t / per`.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum ThrottleFigures {
    /// Admission times (epoch seconds) of `policy`, per context key `k`.
    static func admissionTimes(_ bench: Bench, _ db: PostgresConnection, policy: String) async throws -> [String: [Double]] {
        var times: [String: [Double]] = [:]
        let rows = try await db.rows(
            """
            SELECT coalesce(context ->> 'k', ''), extract(epoch FROM admitted_at)::float8 FROM (
              SELECT context, admitted_at FROM dispatch_policy.admitted_jobs WHERE policy = \(policy)
              UNION ALL SELECT context, admitted_at FROM dispatch_policy.finished_jobs WHERE policy = \(policy)) x
            """, logger: bench.logger)
        for row in rows {
            let (key, t) = try row.decode((String, Double).self)
            times[key, default: []].append(t)
        }
        return times
    }

    @Sendable static func utilization(_ bench: Bench) async throws -> [Row] {
        let (settings, db) = try await bench.freshDatabase("throttle")
        defer { Task { try? await db.close() } }
        let rate = 50.0
        let warmup = Duration.seconds(1)
        let window = bench.pick(Duration.seconds(4), smoke: .seconds(2))
        let rounds = bench.pick(2, smoke: 1)
        var rows: [Row] = []
        for burst in [1, 5, 50] {
            let policy = "burst_\(burst)"
            try await bench.declare(
                db, policy, PolicyConfig { Gate.throttle(rate: .constant(rate), per: 1, burst: .constant(Double(burst))) })
            try await bench.stage(db, policy: policy, count: Int(rate * seconds(warmup + window) * Double(rounds) * 1.5) + 100)
            var utils: [Double] = []
            var rates: [Double] = []
            for _ in 0..<rounds {
                let (from, tokens, to) = try await withLive([runner(bench, settings, policies: [policy])], logger: bench.logger) {
                    try await Task.sleep(for: warmup)
                    let (from, tokens) = try await bench.windowStart(db, policy: policy)
                    try await Task.sleep(for: window)
                    return (from, tokens, try await bench.now(db))
                }
                let n = try await bench.admissions(db, policy: policy, from: from, to: to)
                // What the throttle allowed in the window: the tokens at its start plus the refill.
                utils.append(Double(n) / (tokens + rate * to.timeIntervalSince(from)))
                rates.append(Double(n) / to.timeIntervalSince(from))
            }
            let excess = throttleExcess(try await admissionTimes(bench, db, policy: policy)[""] ?? [], ratePerSecond: rate)
            let u = Samples(utils)
            rows.append(
                Row(
                    id: "6", figure: "throttle utilization under backlog, live runner, rate 50/s, burst \(burst)",
                    measured:
                        "\(Samples(rates).format(Fmt.n)) admissions/s; of what the bucket allowed in the window (its tokens at the start + 50/s)",
                    result: u.format(Fmt.ratio), target: "≥ 0.98", met: u.median >= 0.98,
                    breach: excess > Double(burst) + 1e-6
                        ? String(format: "%.2f admissions over burst + rate × t", excess - Double(burst)) : nil))
        }
        return rows
    }

    @Sendable static func exactness(_ bench: Bench) async throws -> [Row] {
        guard let cli = bench.cli else {
            return [
                Row(
                    id: "11", figure: "throttle exactness, 4 runners",
                    measured: "skipped: the dispatch-policy CLI is not built beside the bench",
                    result: "—", target: "0 breaches, ≥ 98 %", met: nil)
            ]
        }
        let (settings, db) = try await bench.freshDatabase("exactness")
        defer { Task { try? await db.close() } }
        // Per key: 30 per 2 s (15/s), burst 5; 4 keys, so 60 admissions/s in all.
        let rate = 30.0
        let per = 2.0
        let burst = 5.0
        let keys = 4
        let duration = bench.pick(Duration.seconds(120), smoke: .seconds(10))
        let warmup = Duration.seconds(2)
        try await bench.declare(
            db, "exact",
            PolicyConfig {
                Gate.throttle(rate: .constant(rate), per: .constant(per), burst: .constant(burst), partitionBy: "{k}")
            })
        let need = Int(rate / per * seconds(duration + warmup) * Double(keys) * 1.3) + 100
        try await bench.stage(db, policy: "exact", count: need, context: "jsonb_build_object('k', 'k' || (i % \(keys)))")
        let runners = try await ChildRunners(cli: cli, settings: settings, policies: Array(repeating: "exact", count: 4))
        let from: Date
        let to: Date
        do {
            try await Task.sleep(for: warmup)
            from = try await bench.now(db)
            try await Task.sleep(for: duration)
            to = try await bench.now(db)
        } catch {
            await runners.stop()
            throw error
        }
        await runners.stop()
        let times = try await admissionTimes(bench, db, policy: "exact")
        var worst = 0.0
        var utils: [Double] = []
        for (_, ts) in times {
            worst = max(worst, throttleExcess(ts, ratePerSecond: rate / per))
            let inWindow = ts.filter { $0 >= from.timeIntervalSince1970 && $0 < to.timeIntervalSince1970 }.count
            utils.append(Double(inWindow) / (rate / per * to.timeIntervalSince(from)))
        }
        let breaches = worst > burst + 1e-6
        let u = Samples(utils)
        return [
            Row(
                id: "11",
                figure:
                    "throttle exactness: \(keys) keys × (30 per 2 s, burst 5), 4 runners (`dispatch-policy run`), \(Int(seconds(duration))) s under backlog",
                measured: String(
                    format: "%d admissions; most in any interval beyond rate × t: %.2f (burst 5); utilization per key",
                    times.values.map(\.count).reduce(0, +), worst),
                result: u.format(Fmt.pct), target: "0 breaches, ≥ 98 %", met: u.median >= 0.98,
                breach: breaches ? String(format: "%.2f admissions over burst + rate × t", worst - burst) : nil)
        ]
    }
}
