// Figure 12: adaptive convergence. A pool of known capacity (10 worker
// slots, 20 ms jobs: 500 jobs/s) behind one `adaptive_concurrency` partition
// (initial_max 3, target_lag_ms 100), a live runner. The cap that holds the
// queue lag at its target is the slots plus what the pool completes in
// 100 ms: 10 + 0.1 s × the jobs/s of the baseline, the same workers with no
// gate (nominally 500/s, so about 60).
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum AdaptiveFigures {
    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        let logger = bench.logger
        let (settings, db) = try await bench.freshDatabase("adaptive")
        defer { Task { try? await db.close() } }
        let slots = 10
        let jobMs = 20
        let targetLag = 100.0
        let capacity = Double(slots) * 1000 / Double(jobMs)
        let baselineFor = bench.pick(Duration.seconds(10), smoke: .seconds(3))
        let adaptiveFor = bench.pick(Duration.seconds(30), smoke: .seconds(8))

        try await bench.declare(db, "unlimited", PolicyConfig())
        try await bench.stage(db, policy: "unlimited", count: Int(capacity * seconds(baselineFor) * 1.5))
        let baseline = try await LimitedFigures.workload(
            bench, settings, policy: "unlimited", jobMs: jobMs, workers: slots, duration: baselineFor
        ).rate
        // The cap that holds the lag at its target: the slots, plus what the
        // measured pool completes in target_lag_ms.
        let ideal = Double(slots) + baseline * targetLag / 1000

        try await bench.declare(db, "adaptive", PolicyConfig { Gate.adaptiveConcurrency(initialMax: 3, targetLagMs: targetLag) })
        try await bench.stage(db, policy: "adaptive", count: Int(capacity * seconds(adaptiveFor) * 1.5))
        let tracker = JobTracker()
        let w = worker(bench, settings, concurrency: slots, handlers: ["adaptive": tracker.handler(sleepMs: jobMs)])
        let start = ContinuousClock.now
        let samples: [(t: Double, cap: Double, lag: Double)] = try await withLive(
            [runner(bench, settings, policies: ["adaptive"]), w], logger: logger
        ) {
            var samples: [(t: Double, cap: Double, lag: Double)] = []
            while ContinuousClock.now - start < adaptiveFor {
                try await Task.sleep(for: .milliseconds(500))
                if let row = try await db.rows(
                    "SELECT current_max::float8, coalesce(ewma_lag_ms, 'NaN')::float8 FROM dispatch_policy.adaptive_stats WHERE policy = 'adaptive'",
                    logger: logger
                ).first {
                    let (cap, lag) = try row.decode((Double, Double).self)
                    samples.append((t: seconds(ContinuousClock.now - start), cap: cap, lag: lag))
                }
            }
            return samples
        }
        // Converged: from the first sample after which every cap is within ±20 % of the ideal.
        let within = { (cap: Double) in abs(cap - ideal) <= 0.2 * ideal }
        let lastOutside = samples.lastIndex { !within($0.cap) }
        var converged: Double? =
            lastOutside == nil ? samples.first?.t : (lastOutside! + 1 < samples.count ? samples[lastOutside! + 1].t : nil)
        // Settled means staying there for at least the last quarter of the run.
        if let t = converged, seconds(adaptiveFor) - t < seconds(adaptiveFor) / 4 { converged = nil }
        let secondHalf = samples.filter { $0.t >= seconds(adaptiveFor) / 2 }
        let caps = Samples(secondHalf.map(\.cap))
        let lags = Samples(secondHalf.map(\.lag).filter { $0.isFinite })
        let done = await tracker.completed(from: start + adaptiveFor / 2, to: start + adaptiveFor)
        let rate = Double(done) / seconds(adaptiveFor / 2)
        return [
            Row(
                id: "12a",
                figure:
                    "adaptive convergence: 10 slots × 20 ms (500 jobs/s), initial_max 3, target_lag_ms 100: time until `current_max` stays within ±20 % of \(Fmt.n(ideal)) (10 slots + the baseline's jobs/s × 100 ms)",
                measured: "current_max over the second half \(caps.format(Fmt.n)); samples "
                    + samples.enumerated().filter { $0.offset % 4 == 3 }.map { String(format: "%.0f", $0.element.cap) }.joined(
                        separator: " "),
                result: converged.map { String(format: "%.1f s", $0) } ?? "not within \(Int(seconds(adaptiveFor))) s",
                target: "converges", met: converged != nil),
            Row(
                id: "12b", figure: "adaptive, second half: EWMA queue lag vs target 100 ms; jobs/s vs the same workers with no gate",
                measured: "lag \(lags.format(Fmt.ms)); \(Fmt.n(rate)) vs \(Fmt.n(baseline)) jobs/s",
                result: "lag ×\(Fmt.ratio(lags.median / targetLag)), throughput \(Fmt.ratio(rate / baseline))", target: "report", met: nil),
        ]
    }
}
