// dispatch-policy-bench: the benchmark suite. Every figure is measured in
// this run against a baseline measured in the same run, their steps
// interleaved; prints one Markdown table.
//
//   bench/run [--smoke] [--long] [--only NAME[,NAME]]
//
// Uses DATABASE_URL when set, else starts a private cluster (fsync off).
// Exits non-zero when a figure crashes or a limit is breached (a concurrency
// cap or a throttle exceeded), never because a throughput target is missed.
import DispatchPolicy
import EmbeddedPostgres
import Foundation
import Logging
import PostgresNIO

struct Figure: Sendable {
    let name: String
    let run: @Sendable (Bench) async throws -> [Row]
}

enum Figures {
    static let all: [Figure] = [
        Figure(name: "admission", run: AdmissionFigures.run),
        Figure(name: "staging", run: StagingFigures.run),
        Figure(name: "limited", run: LimitedFigures.run),
        Figure(name: "latency", run: LatencyFigures.run),
        Figure(name: "throttle", run: ThrottleFigures.utilization),
        Figure(name: "mixed", run: ScalingFigures.mixed),
        Figure(name: "runners", run: ScalingFigures.separatePolicies),
        Figure(name: "memory", run: MemoryFigures.run),
        Figure(name: "fairness", run: FairnessFigures.run),
        Figure(name: "weighted", run: WeightedFigures.run),
        Figure(name: "exactness", run: ThrottleFigures.exactness),
        Figure(name: "adaptive", run: AdaptiveFigures.run),
        Figure(name: "peer", run: PeerFigures.run),
        Figure(name: "sustained", run: SustainedFigures.run),
    ]
}

@main
struct TickBench {
    static func main() async throws {
        let options: BenchOptions
        do { options = try BenchOptions.parse(CommandLine.arguments) } catch {
            FileHandle.standardError.write(Data("dispatch-policy-bench: \(error)\n".utf8))
            exit(2)
        }
        var logger = Logger(label: "bench")
        logger.logLevel = .error
        let unknown = options.only.subtracting(Figures.all.map(\.name))
        guard unknown.isEmpty else {
            FileHandle.standardError.write(
                Data(
                    "dispatch-policy-bench: unknown figure \(unknown.sorted()) (figures: \(Figures.all.map(\.name).joined(separator: " ")))\n"
                        .utf8))
            exit(2)
        }
        var cluster: EmbeddedPostgres?
        let admin: ConnectionSettings
        if let url = ProcessInfo.processInfo.environment["DATABASE_URL"], !url.isEmpty {
            admin = try ConnectionSettings(url: url)
        } else {
            cluster = try await EmbeddedPostgres.start(logger: logger)
            admin = try ConnectionSettings(url: cluster?.url() ?? "")
        }
        let bench = Bench(admin: admin, options: options, logger: logger)
        let version = try await admin.withConnection(logger: logger) { conn in
            try await conn.rows("SHOW server_version", logger: logger).first?.decode(String.self) ?? "?"
        }
        let started = Date()
        let mode = options.smoke ? "smoke" : (options.long ? "full, long" : "full")
        FileHandle.standardError.write(
            Data("dispatch-policy-bench (\(mode)), PostgreSQL \(version), \(ProcessInfo.processInfo.activeProcessorCount) cores\n".utf8))

        var rows: [Row] = []
        var crashed: [String] = []
        for figure in Figures.all where options.only.isEmpty || options.only.contains(figure.name) {
            let t0 = ContinuousClock.now
            FileHandle.standardError.write(Data("[\(figure.name)]\n".utf8))
            do {
                let got = try await figure.run(bench)
                rows += got
                for row in got { log("\(row.figure): \(row.measured) → \(row.result) [\(row.metText)]") }
            } catch {
                crashed.append(figure.name)
                rows.append(
                    Row(
                        id: figure.name, figure: "\(figure.name): crashed", measured: "\(error)".replacingOccurrences(of: "\n", with: " "),
                        result: "—", target: "—", met: nil, breach: "crashed"))
                log("CRASHED: \(error)")
            }
            await bench.dropDatabase(figure.name)
            log(String(format: "(%.0f s)", seconds(ContinuousClock.now - t0)))
        }

        let elapsed = Date().timeIntervalSince(started)
        let date = ISO8601DateFormatter.string(from: started, timeZone: .current, formatOptions: [.withFullDate])
        print(
            """
            dispatch-policy-bench, \(mode) mode, \(date), \(ProcessInfo.processInfo.activeProcessorCount)-core machine, \
            PostgreSQL \(version)\(cluster != nil ? " (private cluster, fsync off)" : ""), \(String(format: "%.0f", elapsed)) s

            | # | figure | measured: median (min–max) | result | target | |
            | --- | --- | --- | --- | --- | --- |
            """)
        for row in rows {
            print("| \(row.id) | \(row.figure) | \(row.measured) | \(row.result) | \(row.target) | \(row.metText) |")
        }
        let breaches = rows.filter { $0.breach != nil && !crashed.contains($0.id) }
        let missed = rows.filter { $0.met == false }
        print("")
        print(
            "\(rows.filter { $0.met == true }.count) targets met, \(missed.count) missed, \(breaches.count) limits breached, \(crashed.count) figures crashed"
        )
        try? await cluster?.stop()
        if !breaches.isEmpty || !crashed.isEmpty { exit(1) }
    }
}
