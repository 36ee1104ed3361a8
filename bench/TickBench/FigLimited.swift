// Figure 3: a limited workload (a concurrency gate, workers that claim, sleep
// and complete) with a live runner, against the same workers on a policy
// with no gate.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle

/// What one live run of runner + workers did.
struct WorkloadResult {
    /// Handler completions per second after the warm-up.
    var rate: Double
    /// Most handlers of one key running at once (worker side).
    var handlerMax: Int
    /// Most admitted, unfinished jobs of one key at a sample (server side).
    var inFlightMax: Int
    var inFlightTotalMax: Int
}

enum LimitedFigures {
    static let warmup = Duration.milliseconds(500)

    /// A live in-process runner for `policy` and one Worker of `workers`
    /// slots running `jobMs` jobs, for `duration`; the server's in-flight
    /// count per context key `k` sampled meanwhile.
    static func workload(
        _ bench: Bench, _ settings: ConnectionSettings, policy: String, jobMs: Int, workers: Int, duration: Duration,
        runners: ChildRunners? = nil
    ) async throws -> WorkloadResult {
        let tracker = JobTracker()
        let sampler = InFlightSampler()
        let w = worker(bench, settings, concurrency: workers, handlers: [policy: tracker.handler(sleepMs: jobMs)])
        let services: [any Service] = runners == nil ? [runner(bench, settings, policies: [policy]), w] : [w]
        let start = ContinuousClock.now
        try await runLive(services, for: duration, logger: bench.logger) {
            try await sampler.run(settings, policy: policy, key: "k", every: .milliseconds(20), logger: bench.logger)
        }
        let done = await tracker.completed(from: start + warmup, to: start + duration)
        return WorkloadResult(
            rate: Double(done) / seconds(duration - warmup), handlerMax: await tracker.maxPerKey,
            inFlightMax: await sampler.maxPerKey, inFlightTotalMax: await sampler.maxTotal)
    }

    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        let (settings, db) = try await bench.freshDatabase("limited")
        defer { Task { try? await db.close() } }
        var rows: [Row] = []
        rows.append(try await limitedCase(bench, settings, db, id: "3a", keys: 1, max: 5, jobMs: 20, workers: 5))
        rows.append(try await limitedCase(bench, settings, db, id: "3b", keys: 20, max: 5, jobMs: 100, workers: 100))
        return rows
    }

    static func limitedCase(
        _ bench: Bench, _ settings: ConnectionSettings, _ db: PostgresConnection, id: String,
        keys: Int, max: Int, jobMs: Int, workers: Int
    ) async throws -> Row {
        let limited = "limited_\(id)"
        let unlimited = "unlimited_\(id)"
        let window = bench.pick(Duration.seconds(3), smoke: .seconds(2))
        let rounds = bench.pick(3, smoke: 1)
        let ideal = Double(Swift.min(keys * max, workers)) * 1000 / Double(jobMs)
        let backlog = Int(ideal * seconds(window) * Double(rounds) * 1.5) + 1000
        try await bench.declare(db, limited, PolicyConfig { Gate.concurrency(max: .constant(Double(max)), partitionBy: "{k}") })
        try await bench.declare(db, unlimited, PolicyConfig())
        for policy in [limited, unlimited] {
            try await bench.stage(db, policy: policy, count: backlog, context: "jsonb_build_object('k', 'k' || (i % \(keys)))")
        }
        var gated: [Double] = []
        var free: [Double] = []
        var handlerMax = 0
        var inFlightMax = 0
        for _ in 0..<rounds {
            let a = try await workload(bench, settings, policy: limited, jobMs: jobMs, workers: workers, duration: window)
            gated.append(a.rate)
            handlerMax = Swift.max(handlerMax, a.handlerMax)
            inFlightMax = Swift.max(inFlightMax, a.inFlightMax)
            free.append(try await workload(bench, settings, policy: unlimited, jobMs: jobMs, workers: workers, duration: window).rate)
        }
        let ratio = Samples.ratios(Samples(gated), Samples(free))
        let breach =
            Swift.max(handlerMax, inFlightMax) > max
            ? "\(Swift.max(handlerMax, inFlightMax)) of one key in flight, cap \(max)" : nil
        return Row(
            id: id,
            figure:
                "limited workload: \(keys == 1 ? "one key" : "\(keys) keys") × concurrency \(max), \(jobMs) ms jobs, \(workers) worker slots, live runner vs the same workers with no limit",
            measured:
                "\(Samples(gated).format(Fmt.n)) vs \(Samples(free).format(Fmt.n)) jobs/s (ideal \(Fmt.n(ideal))); most in flight per key: \(inFlightMax) (server), \(handlerMax) (handlers)",
            result: ratio.format(Fmt.ratio), target: keys == 1 ? "≥ 0.8" : "≥ 0.9",
            met: ratio.median >= (keys == 1 ? 0.8 : 0.9), breach: breach)
    }
}
