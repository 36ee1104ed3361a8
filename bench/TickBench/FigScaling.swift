// Figures 7 and 8: more runners. A mixed policy (concurrency + global cap +
// throttle) with 1 and with 4 runners; two policies with one runner each
// against one runner for both. Runners are `dispatch-policy run` children.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum ScalingFigures {
    static func skipped(_ id: String, _ figure: String) -> [Row] {
        [
            Row(
                id: id, figure: figure, measured: "skipped: the dispatch-policy CLI is not built beside the bench", result: "—",
                target: "—", met: nil)
        ]
    }

    @Sendable static func mixed(_ bench: Bench) async throws -> [Row] {
        guard let cli = bench.cli else { return skipped("7", "one policy, 10 keys, 1 and 4 runners") }
        let (settings, db) = try await bench.freshDatabase("mixed")
        defer { Task { try? await db.close() } }
        let keys = 10
        let perKey = 3
        let cap = 20
        let rate = 40.0
        let bound = rate * Double(keys)
        try await bench.declare(
            db, "mixed",
            PolicyConfig {
                Gate.concurrency(max: .constant(Double(perKey)), partitionBy: "{k}")
                Gate.globalCap(max: cap)
                Gate.throttle(rate: .constant(rate), per: 1, partitionBy: "{k}")
            })
        let warmup = Duration.seconds(1)
        let window = bench.pick(Duration.seconds(4), smoke: .seconds(2))
        let rounds = bench.pick(2, smoke: 1)
        try await bench.stage(
            db, policy: "mixed", count: Int(bound * seconds(warmup + window) * Double(rounds) * 2 * 1.3) + 500,
            context: "jsonb_build_object('k', 'k' || (i % \(keys)))")
        let tracker = JobTracker()
        var one: [Double] = []
        var four: [Double] = []
        var oneUse: [Double] = []
        var fourUse: [Double] = []
        var inFlightMax = 0
        var totalMax = 0
        for _ in 0..<rounds {
            for count in [1, 4] {
                let sampler = InFlightSampler()
                let w = worker(bench, settings, concurrency: 30, handlers: ["mixed": tracker.handler(sleepMs: 5)])
                let runners = try await ChildRunners(cli: cli, settings: settings, policies: Array(repeating: "mixed", count: count))
                let span: (Date, Double, Date)
                do {
                    span = try await withLive([w], logger: bench.logger) {
                        let side = Task {
                            try await sampler.run(settings, policy: "mixed", key: "k", every: .milliseconds(20), logger: bench.logger)
                        }
                        defer { side.cancel() }
                        try await Task.sleep(for: warmup)
                        let (from, tokens) = try await bench.windowStart(db, policy: "mixed")
                        try await Task.sleep(for: window)
                        return (from, tokens, try await bench.now(db))
                    }
                } catch {
                    await runners.stop()
                    throw error
                }
                await runners.stop()
                let n = try await bench.admissions(db, policy: "mixed", from: span.0, to: span.2)
                let length = span.2.timeIntervalSince(span.0)
                let perSecond = Double(n) / length
                // Of what the throttles allowed: their tokens at the window's start plus 400/s.
                let use = Double(n) / (span.1 + bound * length)
                if count == 1 {
                    one.append(perSecond)
                    oneUse.append(use)
                } else {
                    four.append(perSecond)
                    fourUse.append(use)
                }
                inFlightMax = max(inFlightMax, await sampler.maxPerKey)
                totalMax = max(totalMax, await sampler.maxTotal)
            }
        }
        let times = try await ThrottleFigures.admissionTimes(bench, db, policy: "mixed")
        let excess = times.values.map { throttleExcess($0, ratePerSecond: rate) }.max() ?? 0
        var breaches: [String] = []
        let handlerMax = await tracker.maxPerKey
        if max(inFlightMax, handlerMax) > perKey { breaches.append("\(max(inFlightMax, handlerMax)) in flight for one key, cap \(perKey)") }
        if totalMax > cap { breaches.append("\(totalMax) in flight, global cap \(cap)") }
        if excess > rate + 1e-6 { breaches.append(String(format: "throttle exceeded by %.2f", excess - rate)) }
        let breach = breaches.isEmpty ? nil : breaches.joined(separator: "; ")
        let oneRatio = Samples(oneUse)
        let fourRatio = Samples(fourUse)
        let scale = Samples.ratios(fourRatio, oneRatio)
        let shape = "one policy, 10 keys, concurrency 3 + global cap 20 + throttle 40/s per key, 30 worker slots × 5 ms"
        return [
            Row(
                id: "7a",
                figure: "\(shape): admissions vs the throttles' bound (400/s + the tokens in the buckets at the window's start), 1 runner",
                measured: "\(Samples(one).format(Fmt.n)) admissions/s; most in flight: \(inFlightMax) per key, \(totalMax) in all",
                result: oneRatio.format(Fmt.ratio), target: "≥ 0.9", met: oneRatio.median >= 0.9, breach: breach),
            Row(
                id: "7b", figure: "the same, 4 runners", measured: "\(Samples(four).format(Fmt.n)) admissions/s",
                result: fourRatio.format(Fmt.ratio), target: "≥ 0.9", met: fourRatio.median >= 0.9),
            Row(
                id: "7c", figure: "the same, 4 runners vs 1 runner (share of the bound)",
                measured: "\(Samples(four).format(Fmt.n)) vs \(Samples(one).format(Fmt.n)) admissions/s",
                result: scale.format(Fmt.ratio), target: "≥ 1.0", met: scale.median >= 1.0),
        ]
    }

    @Sendable static func separatePolicies(_ bench: Bench) async throws -> [Row] {
        guard let cli = bench.cli else { return skipped("8", "2 runners on separate policies vs 1 runner") }
        let (settings, db) = try await bench.freshDatabase("runners")
        defer { Task { try? await db.close() } }
        let gates = PolicyConfig(roundRobinBy: "{tenant}", batchSize: 500, roundRobinQuantum: 50) {
            Gate.throttle(rate: 1_000_000, per: 1, burst: 1_000_000, partitionBy: "{tenant}")
            Gate.concurrency(max: 1_000_000, partitionBy: "{tenant}")
            Gate.globalCap(max: 1_000_000)
            Gate.fairInterleave()
            Gate.adaptiveConcurrency(partitionBy: "{tenant}", initialMax: 1_000_000, targetLagMs: 86_400_000)
        }
        let warmup = Duration.seconds(1)
        let window = bench.pick(Duration.seconds(4), smoke: .seconds(2))
        let rounds = bench.pick(2, smoke: 1)
        let backlog = bench.pick(150_000, smoke: 90_000)
        for policy in ["left", "right"] {
            try await bench.declare(db, policy, gates)
            try await bench.stage(db, policy: policy, count: backlog, context: "jsonb_build_object('tenant', 't' || (i % 100))")
        }
        _ = try await db.rows("VACUUM ANALYZE", logger: bench.logger)
        var single: [Double] = []
        var split: [Double] = []
        for _ in 0..<rounds {
            for separate in [false, true] {
                let runners = try await ChildRunners(cli: cli, settings: settings, policies: separate ? ["left", "right"] : [nil])
                let from: Date
                let to: Date
                do {
                    try await Task.sleep(for: warmup)
                    from = try await bench.now(db)
                    try await Task.sleep(for: window)
                    to = try await bench.now(db)
                } catch {
                    await runners.stop()
                    throw error
                }
                await runners.stop()
                var n = 0
                for policy in ["left", "right"] { n += try await bench.admissions(db, policy: policy, from: from, to: to) }
                let left =
                    try await db.rows("SELECT count(*)::int FROM dispatch_policy.staged_jobs", logger: bench.logger).first?.decode(Int.self)
                    ?? 0
                if left == 0 { throw BenchError("the backlog ran out: stage more for this figure") }
                let rate = Double(n) / to.timeIntervalSince(from)
                if separate { split.append(rate) } else { single.append(rate) }
            }
        }
        let ratio = Samples.ratios(Samples(split), Samples(single))
        return [
            Row(
                id: "8", figure: "2 runners on separate policies vs 1 runner running both (5 gates each, backlog, no workers)",
                measured: "\(Samples(split).format(Fmt.n)) vs \(Samples(single).format(Fmt.n)) admissions/s",
                result: ratio.format(Fmt.ratio), target: "≥ 1.6", met: ratio.median >= 1.6)
        ]
    }
}
