// Figure 4: with an idle live runner, the time from staging a job to the
// `dispatch_policy_admitted` notification a worker would wake on; and how
// late a scheduled job (`not_before`) is admitted, to the same notification.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum LatencyFigures {
    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        let logger = bench.logger
        let (settings, db) = try await bench.freshDatabase("latency")
        defer { Task { try? await db.close() } }
        try await bench.declare(db, "latency", PolicyConfig { Gate.concurrency(max: 1_000_000, partitionBy: "{k}") })
        let listener = try await settings.connect(logger: logger)
        defer { Task { try? await listener.close() } }
        let (stream, continuation) = AsyncStream.makeStream(of: Date.self)
        // LISTEN is in place once the closure runs: the first stage waits for it.
        let (listening, isListening) = AsyncStream.makeStream(of: Void.self)
        let reader = Task {
            try await listener.listen(on: "dispatch_policy_admitted") { notifications in
                isListening.finish()
                for try await _ in notifications { continuation.yield(Date()) }
            }
        }
        defer { reader.cancel() }
        for await _ in listening {}
        let stager = Stager(executor: db, logger: logger)
        let samples = bench.pick(100, smoke: 15)
        let scheduled = bench.pick(30, smoke: 6)

        let (staged, late) = try await withLive([runner(bench, settings, policies: ["latency"])], logger: logger) {
            var arrivals = stream.makeAsyncIterator()
            /// The next notification, or nil after 5 s.
            func next() async -> Date? {
                let timeout = Task {
                    try await Task.sleep(for: .seconds(5))
                    continuation.yield(.distantPast)
                }
                defer { timeout.cancel() }
                guard let at = await arrivals.next(), at != .distantPast else { return nil }
                return at
            }
            var staged: [Double] = []
            var late: [Double] = []
            try await Task.sleep(for: .milliseconds(300))
            for i in 0...samples {
                // Idle: the runner has gone back to its idle pause.
                try await Task.sleep(for: .milliseconds(Int.random(in: 60...160)))
                let sentAt = Date()
                _ = try await stager.stage(policy: "latency", JobSpec(argsJSON: "{\"i\": \(i)}", contextJSON: #"{"k": "a"}"#))
                guard let at = await next() else { throw BenchError("no admission notification within 5 s of stage()") }
                if i > 0 { staged.append(at.timeIntervalSince(sentAt) * 1000) }  // the first is a warm-up
            }
            for i in 0..<scheduled {
                let due = Date().addingTimeInterval(Double.random(in: 0.2...0.4))
                _ = try await stager.stage(
                    policy: "latency", JobSpec(argsJSON: "{\"s\": \(i)}", contextJSON: #"{"k": "a"}"#, notBefore: due))
                guard let at = await next() else { throw BenchError("scheduled job not admitted within 5 s of its not_before") }
                late.append(at.timeIntervalSince(due) * 1000)
            }
            return (staged, late)
        }
        let p50 = percentile(staged, 0.5)
        let p99 = percentile(staged, 0.99)
        let l50 = percentile(late, 0.5)
        let l99 = percentile(late, 0.99)
        return [
            Row(
                id: "4a", figure: "idle `stage()` → admitted notification, live runner (\(staged.count) jobs, one at a time)",
                measured: String(format: "p50 %@, p99 %@, max %@", Fmt.ms(p50), Fmt.ms(p99), Fmt.ms(staged.max() ?? .nan)),
                result: "p50 \(Fmt.ms(p50)), p99 \(Fmt.ms(p99))", target: "p50 ≤ 5 ms, p99 ≤ 25 ms", met: p50 <= 5 && p99 <= 25),
            Row(
                id: "4b",
                figure:
                    "lateness of a scheduled job (`not_before` 0.2–0.4 s ahead) to its admitted notification, idle runner (\(late.count) jobs)",
                measured: String(format: "p50 %@, p99 %@, max %@", Fmt.ms(l50), Fmt.ms(l99), Fmt.ms(late.max() ?? .nan)),
                result: "p50 \(Fmt.ms(l50)), p99 \(Fmt.ms(l99))", target: "p50 ≤ 5 ms, p99 ≤ 25 ms", met: l50 <= 5 && l99 <= 25),
        ]
    }
}
