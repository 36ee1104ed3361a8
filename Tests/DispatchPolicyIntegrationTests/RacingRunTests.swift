import Foundation
import Logging
import PostgresNIO
import Synchronization
import Testing

@testable import DispatchPolicy

/// 4 runners and 8 workers on several policies for a sustained period,
/// shaped so that every kind of cap binds; every admission and release is
/// recorded and replayed offline in commit order (AdmissionAudit).
@Suite("Racing run: 4 runners, 8 workers, every cap binding", .timeLimit(.minutes(15)))
struct RacingRunTests {
    private struct Workload {
        var policy: String
        var config: PolicyConfig
        var jobs: Int
        /// Context of job i.
        var context: @Sendable (Int) -> [String: String]
    }

    private static let workloads: [Workload] = [
        Workload(
            policy: "conc",
            config: PolicyConfig(roundRobinBy: "{acct}") {
                Gate.concurrency(name: "per_acct", max: 2, partitionBy: "{acct}")
            }, jobs: 360, context: { ["acct": "a\($0 % 6)"] }),
        Workload(
            policy: "adapt",
            config: PolicyConfig {
                Gate.adaptiveConcurrency(name: "adaptive", partitionBy: "{acct}", initialMax: 2, targetLagMs: 15, min: 1, max: 4)
            }, jobs: 240, context: { ["acct": "a\($0 % 4)"] }),
        Workload(
            policy: "global",
            config: PolicyConfig {
                Gate.globalCap(name: "global", max: 3)
            }, jobs: 150, context: { _ in [:] }),
        Workload(
            policy: "throttle",
            config: PolicyConfig {
                Gate.throttle(name: "per_ep", rate: 20, per: 1, burst: 3, partitionBy: "{ep}")
            }, jobs: 200, context: { ["ep": "e\($0 % 2)"] }),
        Workload(
            policy: "mixed",
            config: PolicyConfig(roundRobinBy: "{acct}") {
                Gate.throttle(name: "per_ep", rate: 40, per: 1, burst: 5, partitionBy: "{ep}")
                Gate.concurrency(name: "per_acct", max: 2, partitionBy: "{acct}")
                Gate.globalCap(name: "global", max: 4)
                Gate.fairInterleave()
                Gate.adaptiveConcurrency(name: "adaptive", partitionBy: "{acct}", initialMax: 2, targetLagMs: 15, min: 1, max: 3)
            }, jobs: 200, context: { ["acct": "a\($0 % 5)", "ep": "e\($0 % 2)"] }),
    ]

    @Test("no cap exceeded at any instant, no throttle window over its bound, no job lost or admitted twice, no failed pass")
    func racingRun() async throws { try await LiveTests.exclusive { try await racingRunLive() } }

    func racingRunLive() async throws {
        try await withPrivateCluster(settings: ["track_commit_timestamp": "on"]) { _, settings in
            let total = Self.workloads.map(\.jobs).reduce(0, +)
            try await TestServer.withConnection(settings) { conn async throws in
                try await AdmissionAudit.install(on: conn)
                let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
                let stager = Stager(executor: conn, logger: TestServer.logger)
                for workload in Self.workloads {
                    try await catalog.declare(name: workload.policy, config: try workload.config.json())
                    let specs = try (0..<workload.jobs).map { try JobSpec(args: ["n": $0], context: workload.context($0)) }
                    _ = try await stager.stageMany(policy: workload.policy, specs)
                }
            }
            let runnerOptions = {
                var options = TickRunnerOptions()
                options.runFor = .seconds(4)
                // A pass under way at the deadline may finish: under the
                // suite's load a pass over the policies once took longer
                // than the 2 s default, and was counted as failed.
                options.overrun = .seconds(20)
                options.busyPause = .milliseconds(5)
                options.idlePause = .milliseconds(50)
                options.maintenanceInterval = .seconds(1)
                return options
            }()
            let handled = Mutex(0)
            // Handlers fail one job in fifteen for the first 8 s (retries go
            // back through admission).
            let failUntil = ContinuousClock.now + .seconds(8)
            let workers: [Worker] = (0..<8).map { index in
                var options = WorkerOptions()
                options.concurrency = 3
                options.pollInterval = .milliseconds(50)
                options.retryIn = .zero
                options.name = "racer-\(index)"
                var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
                for workload in Self.workloads {
                    worker.register(workload.policy) { _ in
                        let n = handled.withLock {
                            $0 += 1
                            return $0
                        }
                        try await Task.sleep(for: .milliseconds(Int.random(in: 2...20)))
                        if n % 15 == 0 && ContinuousClock.now < failUntil { throw RacingFailure() }
                    }
                }
                return worker
            }
            let services = DetachedServices(workers)
            // Rounds of 4 runners racing for 4 s each, until nothing is left to
            // admit (however slow the machine), for at most 5 minutes.
            var reports: [RunReport] = []
            let giveUp = ContinuousClock.now + .seconds(300)
            var more = true
            while more {
                reports += try await withThrowingTaskGroup(of: RunReport.self) { group in
                    for _ in 0..<4 {
                        group.addTask {
                            try await TickRunner(connection: settings, options: runnerOptions, logger: TestServer.logger).runLoop()
                        }
                    }
                    var all: [RunReport] = []
                    for try await report in group { all.append(report) }
                    return all
                }
                let staged = try await count(settings, "SELECT count(*)::int FROM dispatch_policy.staged_jobs")
                more = (ContinuousClock.now < failUntil + .seconds(1) || staged > 0) && ContinuousClock.now < giveUp
            }
            // The runners are done; the workers finish what was admitted.
            let drained = try await waitUntil(60) {
                try await TestServer.withConnection(settings) { conn async throws in
                    try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs", as: Int.self) == 0
                }
            }
            await services.shutDown()
            #expect(try await waitUntil(30) { services.isFinished }, "the workers did not shut down")
            #expect(drained, "admitted jobs were never finished")

            // Failed passes are counted, and there are none.
            let failures = reports.map { report in
                report.maintenanceFailures + report.connectionFailures + report.policies.map(\.failures).reduce(0, +)
            }.reduce(0, +)
            #expect(
                failures == 0,
                "failed passes: \(reports.compactMap { $0.lastMaintenanceError ?? $0.lastConnectionError ?? $0.policies.compactMap(\.lastError).first })"
            )

            try await TestServer.withConnection(settings) { conn async throws in
                // Every job finished, once.
                let left = try await conn.rows(
                    "SELECT policy || ' ' || count(*) FROM dispatch_policy.staged_jobs GROUP BY policy ORDER BY 1",
                    logger: TestServer.logger
                ).map { try $0.decode(String.self) }
                #expect(left == [], "still staged when the runners stopped: \(left)")
                #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.finished_jobs", as: Int.self) == total)
                #expect(try await checkFindings(conn) == [])
                try await expectCountersConsistent(conn)

                let events = try await AdmissionAudit.events(conn)
                let admissions = events.filter { $0.kind == .admit }
                #expect(
                    admissions.count
                        == (try await conn.scalar("SELECT sum(attempts)::int FROM dispatch_policy.finished_jobs", as: Int.self)),
                    "every attempt admitted once")
                #expect(admissions.count > total, "some jobs failed and were admitted again")

                // Every cap, exactly, at every instant; and each one bound.
                let caps: [AdmissionAudit.Cap] = [
                    .init(policy: "conc", gate: "per_acct", partitionBy: "acct", max: 2),
                    .init(policy: "adapt", gate: "adaptive", partitionBy: "acct", adaptiveInitial: 2, adaptiveMin: 1, adaptiveCeiling: 4),
                    .init(policy: "global", gate: "global", partitionBy: nil, max: 3),
                    .init(policy: "mixed", gate: "per_acct", partitionBy: "acct", max: 2),
                    .init(policy: "mixed", gate: "global", partitionBy: nil, max: 4),
                    .init(policy: "mixed", gate: "adaptive", partitionBy: "acct", adaptiveInitial: 2, adaptiveMin: 1, adaptiveCeiling: 3),
                ]
                for cap in caps {
                    let report = AdmissionAudit.verify(cap, events: events)
                    #expect(report.violations == [], "\(cap.policy)/\(cap.gate): \(report.violations.prefix(5))")
                    if cap.policy != "mixed" {
                        #expect(report.admissionsAtCap > 0, "\(cap.policy)/\(cap.gate) never bound: peaks \(report.peak)")
                    }
                }
                // Adaptive caps stayed within [min, max], and moved.
                let adaptiveCaps = events.filter { $0.kind == .cap && $0.policy == "adapt" }.map(\.cap)
                #expect(adaptiveCaps.allSatisfy { (1...4).contains($0) }, "\(adaptiveCaps)")
                #expect(Set(adaptiveCaps).count > 1, "the adaptive cap never moved: \(adaptiveCaps)")

                for (policy, rate, burst) in [("throttle", 20.0, 3.0), ("mixed", 40.0, 5.0)] {
                    let throttle = AdmissionAudit.throttleExcess(
                        policy: policy, partitionBy: "ep", rate: rate, per: 1, burst: burst, events: events)
                    #expect(throttle.partitions == 2)
                    #expect(throttle.worst <= 1e-6, "\(policy): a window held \(throttle.worst) admissions over its bound")
                    if policy == "throttle" {
                        #expect(throttle.fullest > 0.9, "the throttle never bound: fullest window at \(throttle.fullest) of its bound")
                    }
                }
            }
        }
    }
}

private struct RacingFailure: Error {}

private func count(_ settings: ConnectionSettings, _ sql: String) async throws -> Int {
    try await TestServer.withConnection(settings) { conn in try await conn.scalar(PostgresQuery(unsafeSQL: sql), as: Int.self) }
}
