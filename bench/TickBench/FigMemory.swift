// Figure 9: the resident memory of a `dispatch-policy run` child process
// with 10,000 active partitions (a job in flight in each, one more waiting
// behind each), against the same process with one partition.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum MemoryFigures {
    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        guard let cli = bench.cli else { return ScalingFigures.skipped("9", "runner memory at 10,000 active partitions") }
        let (settings, db) = try await bench.freshDatabase("memory")
        defer { Task { try? await db.close() } }
        let partitions = 10_000
        let config = PolicyConfig {
            Gate.concurrency(max: 1, partitionBy: "{k}")
            Gate.throttle(rate: 1000, per: 1, partitionBy: "{k}")
        }
        try await bench.declare(db, "one", config)
        try await bench.declare(db, "many", config)
        try await bench.stage(db, policy: "one", count: 2, context: "jsonb_build_object('k', 'k0')")
        try await bench.stage(db, policy: "many", count: 2 * partitions, context: "jsonb_build_object('k', 'k' || (i % \(partitions)))")
        let settle = bench.pick(Duration.seconds(5), smoke: .seconds(2))

        /// Peak RSS (VmHWM) of a runner on `policy` once `admitted` jobs are in and it ticked on for `settle`.
        func peak(_ policy: String, admitted: Int) async throws -> (peak: Double, rss: Double) {
            let child = try await ChildRunners(cli: cli, settings: settings, policies: [policy])
            do {
                let deadline = ContinuousClock.now + .seconds(60)
                while try await db.rows(
                    "SELECT count(*)::int FROM dispatch_policy.admitted_jobs WHERE policy = \(policy)", logger: bench.logger
                )
                .first?.decode(Int.self) ?? 0 < admitted {
                    guard ContinuousClock.now < deadline else {
                        throw BenchError("the runner did not admit \(admitted) jobs of \(policy) within 60 s")
                    }
                    try await Task.sleep(for: .milliseconds(200))
                }
                // Keep it busy: a staged job wakes it, and it looks at every blocked partition.
                let end = ContinuousClock.now + settle
                while ContinuousClock.now < end {
                    _ = try await Stager(executor: db, logger: bench.logger).stage(
                        policy: policy, JobSpec(argsJSON: "{}", contextJSON: #"{"k": "k1"}"#))
                    try await Task.sleep(for: .milliseconds(250))
                }
            } catch {
                await child.stop()
                throw error
            }
            let memory: (rss: Double, peak: Double) = child.memory().first ?? (rss: .nan, peak: .nan)
            await child.stop()
            return (memory.peak, memory.rss)
        }
        let small = try await peak("one", admitted: 1)
        let large = try await peak("many", admitted: partitions)
        let ratio = large.peak / small.peak
        return [
            Row(
                id: "9", figure: "runner memory, `dispatch-policy run` child process (peak RSS, VmHWM): 10,000 active partitions vs 1",
                measured: String(
                    format: "%.1f MB vs %.1f MB (RSS at the end %.1f vs %.1f MB)", large.peak, small.peak, large.rss, small.rss),
                result: String(format: "%.1f MB (×%.2f)", large.peak, ratio), target: "≤ 64 MB", met: large.peak <= 64)
        ]
    }
}
