// What every figure shares: the run's options, a fresh database per figure,
// live runners (in-process or `dispatch-policy run` children), samples and
// their median/min/max, and the rows of the table.
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle
import Subprocess
import Synchronization

#if canImport(System)
    import System
#else
    import SystemPackage
#endif

#if canImport(Glibc)
    import Glibc
#endif

/// Median, min and max of several measurements of one thing.
struct Samples: Sendable {
    var values: [Double]

    init(_ values: [Double]) { self.values = values }

    var median: Double {
        let sorted = values.sorted()
        guard !sorted.isEmpty else { return .nan }
        let mid = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
    }
    var min: Double { values.min() ?? .nan }
    var max: Double { values.max() ?? .nan }

    /// `12.3` or, with several values, `12.3 (11.9–12.8)`.
    func format(_ f: (Double) -> String) -> String {
        values.count <= 1 || min == max ? f(median) : "\(f(median)) (\(f(min))–\(f(max)))"
    }

    /// The ratio of each pair (a[i] / b[i]): pairs are measured one after the other.
    static func ratios(_ a: Samples, _ b: Samples) -> Samples {
        Samples(zip(a.values, b.values).map { $0 / $1 })
    }
}

enum Fmt {
    /// 1234 -> "1.23k", 12345 -> "12.3k", 123 -> "123", 1.234 -> "1.23".
    static func n(_ x: Double) -> String {
        guard x.isFinite else { return "?" }
        let a = abs(x)
        if a >= 1_000_000 { return String(format: "%.2fM", x / 1_000_000) }
        if a >= 10_000 { return String(format: "%.1fk", x / 1000) }
        if a >= 1000 { return String(format: "%.2fk", x / 1000) }
        if a >= 100 { return String(format: "%.0f", x) }
        if a >= 10 { return String(format: "%.1f", x) }
        return String(format: "%.2f", x)
    }
    static func ratio(_ x: Double) -> String { x.isFinite ? String(format: "%.2f", x) : "?" }
    static func ms(_ x: Double) -> String { x.isFinite ? (x >= 100 ? String(format: "%.0f ms", x) : String(format: "%.1f ms", x)) : "?" }
    static func pct(_ x: Double) -> String { x.isFinite ? String(format: "%.1f %%", x * 100) : "?" }
}

/// One row of the table.
struct Row: Sendable {
    var id: String
    var figure: String
    /// What was measured, with its baseline: "10.2k vs 37.6k jobs/s".
    var measured: String
    /// The figure (a ratio, a percentile...), median (min–max).
    var result: String
    var target: String
    /// nil: no target (reported only), or not measured.
    var met: Bool?
    /// A hard invariant (a limit) that broke: the run fails.
    var breach: String? = nil

    var metText: String {
        if let breach { return "**BREACH** \(breach)" }
        switch met {
        case .some(true): return "met"
        case .some(false): return "missed"
        case .none: return "—"
        }
    }
}

struct BenchOptions: Sendable {
    var smoke = false
    var long = false
    var only: Set<String> = []
    var cliPath: String?
    var python: String?
    var peerScript: String?

    /// Full-mode and smoke-mode values of one parameter.
    func pick<T>(_ full: T, smoke value: T) -> T { smoke ? value : full }

    static func parse(_ arguments: [String]) throws -> BenchOptions {
        var options = BenchOptions()
        var it = arguments.dropFirst().makeIterator()
        while let arg = it.next() {
            switch arg {
            case "--smoke", "--quick": options.smoke = true
            case "--long": options.long = true
            case "--only":
                guard let names = it.next() else { throw BenchError("--only needs a name") }
                options.only.formUnion(names.split(separator: ",").map(String.init))
            case "--cli": options.cliPath = it.next()
            case "--python": options.python = it.next()
            case "--peer-script": options.peerScript = it.next()
            case "--help", "-h":
                print(
                    """
                    usage: dispatch-policy-bench [--smoke] [--long] [--only NAME[,NAME]] [--cli PATH] [--python PATH --peer-script PATH]
                    figures: \(Figures.all.map(\.name).joined(separator: " "))
                    """)
                exit(0)
            default: throw BenchError("unknown argument \(arg) (try --help)")
            }
        }
        return options
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ message: String) { description = message }
}

/// The run's shared state: the server, the options, a logger.
struct Bench: Sendable {
    let admin: ConnectionSettings
    let options: BenchOptions
    let logger: Logger

    var smoke: Bool { options.smoke }
    func pick<T>(_ full: T, smoke value: T) -> T { options.pick(full, smoke: value) }

    /// A new, migrated database for one figure (dropped first if left over).
    func freshDatabase(_ name: String) async throws -> (ConnectionSettings, PostgresConnection) {
        let database = "bench_\(name)"
        try await admin.withConnection(logger: logger) { conn in
            _ = try await conn.rows(PostgresQuery(unsafeSQL: "DROP DATABASE IF EXISTS \(database) WITH (FORCE)"), logger: logger)
            _ = try await conn.rows(PostgresQuery(unsafeSQL: "CREATE DATABASE \(database)"), logger: logger)
        }
        let settings = admin.with(database: database)
        let db = try await settings.connect(logger: logger)
        try await Migrator(logger: logger).migrate(on: db)
        return (settings, db)
    }

    func dropDatabase(_ name: String) async {
        try? await admin.withConnection(logger: logger) { conn in
            _ = try await conn.rows(PostgresQuery(unsafeSQL: "DROP DATABASE IF EXISTS bench_\(name) WITH (FORCE)"), logger: logger)
        }
    }

    func declare(_ db: PostgresConnection, _ name: String, _ config: PolicyConfig) async throws {
        try await PolicyCatalog(executor: db, logger: logger).declare(name: name, config: try config.json())
    }

    /// `count` jobs for `policy` with `stage_many`, in calls of at most 50,000;
    /// `context(i)` is a SQL expression over `i` (jsonb).
    func stage(_ db: PostgresConnection, policy: String, count: Int, context: String = "'{}'::jsonb", from: Int = 0) async throws {
        var staged = 0
        while staged < count {
            let n = Swift.min(50_000, count - staged)
            _ = try await db.rows(
                PostgresQuery(
                    unsafeSQL: """
                        SELECT cardinality(dispatch_policy.stage_many('\(policy)', (
                          SELECT jsonb_agg(jsonb_build_object('args', jsonb_build_object('i', i), 'context', \(context)))
                          FROM generate_series(\(from + staged)::int, \(from + staged + n - 1)::int) i)))
                        """), logger: logger)
            staged += n
        }
    }

    /// Admissions of `policy` (admitted or finished since) with admitted_at in [from, to).
    func admissions(_ db: PostgresConnection, policy: String, from: Date, to: Date) async throws -> Int {
        try await db.rows(
            """
            SELECT (SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE policy = \(policy) AND admitted_at >= \(from) AND admitted_at < \(to))
                 + (SELECT count(*) FROM dispatch_policy.finished_jobs WHERE policy = \(policy) AND admitted_at >= \(from) AND admitted_at < \(to))
            """, logger: logger
        ).first?.decode(Int.self) ?? 0
    }

    /// The server's clock, and the tokens then in the throttle buckets of
    /// `policy` (from the `partition_overview` view, refilled to that time):
    /// what a throttle allows in a window is these plus rate × its length.
    func windowStart(_ db: PostgresConnection, policy: String) async throws -> (Date, Double) {
        do {
            let row = try await db.rows(
                """
                SELECT now(), coalesce(sum(tokens), 0)::float8 FROM dispatch_policy.partition_overview
                WHERE policy = \(policy) AND gate_type = 'throttle'
                """, logger: logger
            ).first
            return try row?.decode((Date, Double).self) ?? (Date(), 0)
        } catch {
            // The view changed shape: count from now, with no tokens (a bound a little low).
            log("cannot read the buckets' tokens from partition_overview (\(error)): counted as 0")
            return (try await now(db), 0)
        }
    }

    /// The server's clock.
    func now(_ db: PostgresConnection) async throws -> Date {
        try await db.rows("SELECT clock_timestamp()", logger: logger).first?.decode(Date.self) ?? Date()
    }

    /// The CLI binary beside this one, or --cli.
    var cli: String? {
        let path = options.cliPath ?? (URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path + "/dispatch-policy")
        return FileManager.default.isExecutableFile(atPath: path) ? path : nil
    }
}

func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}

/// Runs `services` (runners, workers) in-process while `body` runs, then
/// shuts them down gracefully and returns what `body` returned.
func withLive<T: Sendable>(
    _ services: [any Service], logger: Logger, _ body: @Sendable () async throws -> T
) async throws -> T {
    let group = ServiceGroup(configuration: .init(services: services, logger: logger))
    return try await withThrowingTaskGroup(of: T?.self) { tasks in
        tasks.addTask {
            try await group.run()
            return nil
        }
        let result: Result<T, any Error>
        do { result = .success(try await body()) } catch { result = .failure(error) }
        await group.triggerGracefulShutdown()
        for try await _ in tasks {}
        return try result.get()
    }
}

/// Runs `services` in-process for `duration`; `during` runs beside them and
/// is cancelled at the end.
func runLive(
    _ services: [any Service], for duration: Duration, logger: Logger,
    during: (@Sendable () async throws -> Void)? = nil
) async throws {
    try await withLive(services, logger: logger) {
        let side = during.map { body in
            Task {
                // An error at cancellation is expected (a sampler's query cut short).
                do { try await body() } catch { if !Task.isCancelled { log("side task failed: \(error)") } }
            }
        }
        try await Task.sleep(for: duration)
        side?.cancel()
        await side?.value
    }
}

/// `dispatch-policy run` child processes (swift-subprocess): started, then
/// stopped with SIGTERM (SIGKILL after 10 s). Each child's task runs it to
/// its end and reaps it; it is signalled only while that task runs.
final class ChildRunners: Sendable {
    final class Child: Sendable {
        let pid: pid_t
        let ending: Task<Void, Never>
        let reaped: Reaped

        init(pid: pid_t, ending: Task<Void, Never>, reaped: Reaped) {
            self.pid = pid
            self.ending = ending
            self.reaped = reaped
        }
    }

    final class Reaped: Sendable {
        let state = Mutex(false)
    }

    let children: [Child]

    init(cli: String, settings: ConnectionSettings, policies: [String?], extra: [String] = []) async throws {
        var started: [Child] = []
        do {
            for policy in policies {
                let arguments = ["run", "--database-url", settings.description] + (policy.map { ["--policy", $0] } ?? []) + extra
                started.append(try await Self.start(cli, arguments))
            }
        } catch {
            for child in started { Self.signal(child, SIGKILL) }
            throw error
        }
        children = started
    }

    private static func start(_ cli: String, _ arguments: [String]) async throws -> Child {
        let (pids, started) = AsyncThrowingStream<pid_t, any Error>.makeStream()
        let reaped = Reaped()
        let ending = Task {
            defer { reaped.state.withLock { $0 = true } }
            do {
                _ = try await Subprocess.run(
                    .path(FilePath(cli)), arguments: Arguments(arguments), input: .none, output: .discarded, error: .discarded
                ) { execution in
                    started.yield(execution.processIdentifier.value)
                    started.finish()
                }
            } catch {
                started.finish(throwing: error)
            }
        }
        for try await pid in pids { return Child(pid: pid, ending: ending, reaped: reaped) }
        throw BenchError("\(cli) did not start")
    }

    private static func signal(_ child: Child, _ signal: Int32) {
        child.reaped.state.withLock { if !$0 { _ = kill(child.pid, signal) } }
    }

    /// Resident set size of each child now, and its peak, in MB (/proc/PID/status).
    func memory() -> [(rss: Double, peak: Double)] {
        children.map { child in
            let status = (try? String(contentsOfFile: "/proc/\(child.pid)/status", encoding: .utf8)) ?? ""
            func kb(_ key: String) -> Double {
                guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(key + ":") }) else { return .nan }
                return Double(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? .nan
            }
            return (kb("VmRSS") / 1024, kb("VmHWM") / 1024)
        }
    }

    func stop() async {
        for child in children { Self.signal(child, SIGTERM) }
        for _ in 0..<200 where children.contains(where: { child in child.reaped.state.withLock { !$0 } }) {
            try? await Task.sleep(for: .milliseconds(50))
        }
        for child in children { Self.signal(child, SIGKILL) }
        for child in children { await child.ending.value }
    }
}

/// The in-process live runner with the defaults a user gets, restricted to `policies`.
func runner(_ bench: Bench, _ settings: ConnectionSettings, policies: [String]) -> TickRunner {
    var options = TickRunnerOptions()
    options.policies = policies
    return TickRunner(connection: settings, options: options, logger: bench.logger)
}

func worker(_ bench: Bench, _ settings: ConnectionSettings, concurrency: Int, handlers: [String: Worker.Handler]) -> Worker {
    var options = WorkerOptions()
    options.concurrency = concurrency
    var w = Worker(connection: settings, options: options, logger: bench.logger)
    for (policy, handler) in handlers { w.register(policy, handler) }
    return w
}

/// Handler-side view of a workload: completions in a window, and the most
/// handlers of one key that ran at once.
actor JobTracker {
    private var running: [String: Int] = [:]
    private(set) var maxRunning: [String: Int] = [:]
    private var completions: [ContinuousClock.Instant] = []

    func start(_ key: String) {
        running[key, default: 0] += 1
        maxRunning[key] = Swift.max(maxRunning[key] ?? 0, running[key] ?? 0)
    }

    func end(_ key: String) {
        running[key, default: 0] -= 1
        completions.append(.now)
    }

    func completed(from: ContinuousClock.Instant, to: ContinuousClock.Instant) -> Int {
        completions.filter { $0 >= from && $0 < to }.count
    }

    var maxPerKey: Int { maxRunning.values.max() ?? 0 }

    /// A handler that sleeps `ms` and records itself under the context key `k`.
    nonisolated func handler(sleepMs: Int, key: @escaping @Sendable (Job) -> String = JobTracker.contextKey) -> Worker.Handler {
        { job in
            let k = key(job)
            await self.start(k)
            if sleepMs > 0 { try? await Task.sleep(for: .milliseconds(sleepMs)) }
            await self.end(k)
        }
    }

    @Sendable static func contextKey(_ job: Job) -> String {
        // The context is small JSON: {"k": "..."}; no need for a decoder per job.
        guard let r = job.contextJSON.range(of: "\"k\": \"") ?? job.contextJSON.range(of: "\"k\":\"") else { return "" }
        let rest = job.contextJSON[r.upperBound...]
        return String(rest.prefix { $0 != "\"" })
    }
}

/// Samples, every `every`, the most admitted-and-unfinished jobs of one
/// partition (the context key `key`) of `policy`: the gate's in-flight count,
/// exact at each sample.
actor InFlightSampler {
    private(set) var maxPerKey = 0
    private(set) var maxTotal = 0
    private(set) var samples = 0

    func record(perKey: Int, total: Int) {
        maxPerKey = Swift.max(maxPerKey, perKey)
        maxTotal = Swift.max(maxTotal, total)
        samples += 1
    }

    nonisolated func run(_ settings: ConnectionSettings, policy: String, key: String, every: Duration, logger: Logger) async throws {
        let db = try await settings.connect(logger: logger)
        defer { Task { try? await db.close() } }
        while !Task.isCancelled {
            let row = try await db.rows(
                """
                SELECT coalesce(max(n), 0)::int, coalesce(sum(n), 0)::int FROM (
                  SELECT count(*) AS n FROM dispatch_policy.admitted_jobs WHERE policy = \(policy) GROUP BY context ->> \(key)) x
                """, logger: logger
            ).first
            let (perKey, total) = try row?.decode((Int, Int).self) ?? (0, 0)
            await record(perKey: perKey, total: total)
            try? await Task.sleep(for: every)
        }
    }
}

/// The most admissions in any interval [t_i, t_j] beyond `rate × (t_j − t_i)`:
/// a token bucket of `burst` allows at most `burst` (plus a rounding hair).
func throttleExcess(_ times: [Double], ratePerSecond rate: Double) -> Double {
    var best = -Double.infinity
    var excess = 0.0
    for (j, t) in times.sorted().enumerated() {
        best = Swift.max(best, rate * t - Double(j))
        excess = Swift.max(excess, Double(j + 1) - rate * t + best)
    }
    return excess
}

func percentile(_ values: [Double], _ p: Double) -> Double {
    let sorted = values.sorted()
    guard !sorted.isEmpty else { return .nan }
    let index = Swift.min(sorted.count - 1, Swift.max(0, Int((p * Double(sorted.count)).rounded(.up)) - 1))
    return sorted[index]
}

func log(_ message: String) {
    FileHandle.standardError.write(Data(("  " + message + "\n").utf8))
}
