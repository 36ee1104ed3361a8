// Figure 13: a peer, side by side: pgqueuer (its `concurrency_limit`) on the
// limited workload and on no-op end-to-end throughput, against
// dispatch-policy on the same, alternating. pgqueuer runs from the
// virtualenv bench/run creates (bench/peer/pgqueuer_bench.py drives it).
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import Subprocess

#if canImport(System)
    import System
#else
    import SystemPackage
#endif

enum PeerFigures {
    struct PeerResult: Decodable {
        var rate: Double
        var mostRunning: Int

        enum CodingKeys: String, CodingKey {
            case rate
            case mostRunning = "most_running"
        }
    }

    static func pgqueuer(_ bench: Bench, python: String, script: String, dsn: String, jobs: Int, seconds: Double, limit: Int, jobMs: Int)
        async throws -> PeerResult
    {
        let arguments = [
            script, "--dsn", dsn, "--jobs", "\(jobs)", "--seconds", "\(seconds)", "--limit", "\(limit)", "--job-ms", "\(jobMs)",
        ]
        let result = try await Subprocess.run(
            .path(FilePath(python)), arguments: Arguments(arguments), input: .none, output: .string(limit: 1 << 20),
            error: .string(limit: 1 << 20))
        guard result.terminationStatus.isSuccess, let line = result.standardOutput.split(separator: "\n").last else {
            throw BenchError("pgqueuer run failed (\(result.terminationStatus)): \(result.standardError.suffix(600))")
        }
        return try JSONDecoder().decode(PeerResult.self, from: Data(line.utf8))
    }

    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        guard let python = bench.options.python, let script = bench.options.peerScript,
            FileManager.default.isExecutableFile(atPath: python)
        else {
            return [
                Row(
                    id: "13", figure: "peer: pgqueuer",
                    measured: "skipped: no pgqueuer virtualenv (bench/run creates bench/.venv; pass --python and --peer-script)",
                    result: "—", target: "report", met: nil)
            ]
        }
        let (settings, db) = try await bench.freshDatabase("peer")
        defer { Task { try? await db.close() } }
        let window = bench.pick(Duration.seconds(4), smoke: .seconds(2))
        let rounds = bench.pick(2, smoke: 1)
        try await bench.declare(db, "limited", PolicyConfig { Gate.concurrency(max: 5, partitionBy: "{k}") })
        try await bench.declare(db, "noop", PolicyConfig())
        try await bench.stage(db, policy: "limited", count: 2_000 * rounds, context: "jsonb_build_object('k', 'a')")
        try await bench.stage(db, policy: "noop", count: 30_000 * rounds)
        // The DSN without the password; a password goes by PGPASSWORD, as for libpq.
        let dsn = settings.description

        var dpLimited: [Double] = []
        var pqLimited: [Double] = []
        var dpNoop: [Double] = []
        var pqNoop: [Double] = []
        var dpMost = 0
        var pqMost = 0
        for _ in 0..<rounds {
            let a = try await LimitedFigures.workload(bench, settings, policy: "limited", jobMs: 20, workers: 5, duration: window)
            dpLimited.append(a.rate)
            dpMost = max(dpMost, max(a.handlerMax, a.inFlightMax))
            let b = try await pgqueuer(
                bench, python: python, script: script, dsn: dsn, jobs: 2_000, seconds: seconds(window), limit: 5, jobMs: 20)
            pqLimited.append(b.rate)
            pqMost = max(pqMost, b.mostRunning)
            dpNoop.append(try await LimitedFigures.workload(bench, settings, policy: "noop", jobMs: 0, workers: 10, duration: window).rate)
            pqNoop.append(
                try await pgqueuer(
                    bench, python: python, script: script, dsn: dsn, jobs: 30_000, seconds: seconds(window), limit: 0, jobMs: 0
                )
                .rate)
        }
        let limitedRatio = Samples.ratios(Samples(dpLimited), Samples(pqLimited))
        let noopRatio = Samples.ratios(Samples(dpNoop), Samples(pqNoop))
        return [
            Row(
                id: "13a",
                figure:
                    "peer, limited workload (concurrency 5, 20 ms jobs, ideal 250 jobs/s): dispatch-policy (live runner, 5 worker slots) vs pgqueuer `concurrency_limit` 5",
                measured:
                    "\(Samples(dpLimited).format(Fmt.n)) vs \(Samples(pqLimited).format(Fmt.n)) jobs/s (\(Fmt.ratio(Samples(dpLimited).median / 250)) vs \(Fmt.ratio(Samples(pqLimited).median / 250)) of ideal); most running: \(dpMost) vs \(pqMost)",
                result: limitedRatio.format(Fmt.ratio), target: "report", met: nil,
                breach: dpMost > 5 ? "dispatch-policy ran \(dpMost) at once, cap 5" : nil),
            Row(
                id: "13b",
                figure:
                    "peer, no-op jobs end to end (backlog → done): dispatch-policy (no gate, live runner, 10 worker slots) vs pgqueuer (no limit, batch 10)",
                measured: "\(Samples(dpNoop).format(Fmt.n)) vs \(Samples(pqNoop).format(Fmt.n)) jobs/s",
                result: noopRatio.format(Fmt.ratio), target: "report", met: nil),
        ]
    }
}
