import DispatchPolicy
import Foundation
import PostgresNIO
import ServiceLifecycle
import Synchronization
import Testing

/// When each job's handler started, by job id.
private actor Starts {
    private(set) var times: [(id: Int64, acct: String, at: Date)] = []
    func record(_ id: Int64, _ acct: String) -> Int {
        times.append((id, acct, Date()))
        return times.filter { $0.id == id }.count
    }
}

/// A handler that throws `Defer` hands its job back: staged again until
/// then, no attempt counted, its slot free for the partition's next job; with
/// `pausePartition` the partition's other jobs wait too.
@Suite("Worker: Defer", .timeLimit(.minutes(15)))
struct DeferTests {
    @Test(
        "Defer: the job runs again after until as the same attempt; its slot goes to the next job at once; pausePartition holds the partition; out of bounds fails the attempt"
    )
    func deferral() async throws { try await LiveTests.exclusive { try await deferralLive() } }

    func deferralLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            let config = PolicyConfig(maxAttempts: 1) {
                Gate.throttle(rate: 1000, per: 1, partitionBy: "{acct}")
                Gate.concurrency(max: 1, partitionBy: "{acct}")
            }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: try config.json())
            // a: defers itself once (no pause); b: defers itself once, pausing
            // its partition; c: defers 40 days ahead (out of bounds); d: defers to
            // a time already past (deferred to now).
            try await conn.exec(
                """
                SELECT dispatch_policy.stage('p', jsonb_build_object('n', n), jsonb_build_object('acct', acct))
                FROM (VALUES (1, 'a'), (2, 'a'), (3, 'b'), (4, 'b'), (5, 'c'), (6, 'd')) v(n, acct) ORDER BY n
                """)
        }
        let starts = Starts()
        let deferredAt = Mutex<[String: Date]>([:])
        var options = WorkerOptions()
        options.concurrency = 4
        options.pollInterval = .milliseconds(100)
        var worker = Worker(connection: settings, options: options, logger: TestServer.logger)
        struct Args: Decodable { var n: Int }
        worker.register("p") { job in
            let n = try job.args(as: Args.self).n
            let acct = n <= 2 ? "a" : n <= 4 ? "b" : n == 5 ? "c" : "d"
            let run = await starts.record(job.id, acct)
            guard run == 1 else { return }
            switch n {
            case 1, 3:
                deferredAt.withLock { $0[acct] = Date() }
                // a's deferral is long enough that job 2 takes the freed slot
                // before job 1 is back ahead of it (lower id), however slow
                // the machine's ticks.
                throw Defer(for: .seconds(n == 1 ? 15 : 2), reason: "429 from the endpoint", pausePartition: n == 3)
            case 6:
                // An until already past when reported (a late report): the
                // job is deferred to now, not failed.
                throw Defer(until: Date().addingTimeInterval(-5), reason: "Retry-After already over")
            case 5:
                throw Defer(for: .seconds(40 * 86_400), reason: "far")
            default:
                return
            }
        }
        var runnerOptions = TickRunnerOptions()
        runnerOptions.busyPause = .milliseconds(5)
        runnerOptions.idlePause = .milliseconds(100)
        let group = DetachedServices([TickRunner(connection: settings, options: runnerOptions, logger: TestServer.logger), worker])
        defer { Task { await group.shutDown() } }
        let done = try await waitUntil(120) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.finished_jobs", as: Int.self) == 6
            }
        }
        #expect(done)
        await group.shutDown()

        let times = await starts.times
        func started(_ n: Int64) -> [Date] { times.filter { $0.id == n }.map(\.at) }
        // Deferred jobs ran twice, the second time not before until.
        #expect(started(1).count == 2 && started(3).count == 2 && started(6).count == 2)
        if let a = deferredAt.withLock({ $0["a"] }), started(1).count == 2 {
            #expect(started(1)[1].timeIntervalSince(a) >= 14.9)
        }
        // Without the pause, job 2 took the freed slot at once: before job 1
        // came back (with the slot held, it would have waited for job 1's
        // second run to finish).
        if let second = started(2).first, started(1).count == 2 {
            #expect(second < started(1)[1], "the deferred job's slot was not freed")
        }
        // With the pause, job 4 waited for the partition to resume.
        if let fourth = started(4).first, let b = deferredAt.withLock({ $0["b"] }) {
            #expect(fourth.timeIntervalSince(b) >= 1.9, "job 4 ran while its partition was paused")
        }
        try await TestServer.withConnection(settings) { conn async throws in
            // No attempt counted: completed at attempt 1, no failure recorded.
            #expect(
                try await conn.scalar(
                    "SELECT count(*)::int FROM dispatch_policy.finished_jobs WHERE status = 'completed' AND attempts = 1", as: Int.self)
                    == 5)
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.job_failures WHERE job_id <> 5", as: Int.self) == 0)
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.job_deferrals", as: Int.self) == 3)
            #expect(
                try await conn.scalar(
                    "SELECT count(*)::int FROM dispatch_policy.job_deferrals WHERE paused IS NOT NULL AND paused <> '{}'", as: Int.self)
                    == 1)
            // 40 days is beyond defer.until: the attempt failed with why (max_attempts 1: dead).
            let error = try await conn.scalar("SELECT error FROM dispatch_policy.job_failures WHERE job_id = 5", as: String.self)
            #expect(error.contains("defer refused"), "\(error)")
            #expect(try await conn.scalar("SELECT status FROM dispatch_policy.finished_jobs WHERE id = 5", as: String.self) == "dead")
            #expect(
                try await conn.scalar("SELECT coalesce(sum(in_flight), 0)::int FROM dispatch_policy.inflight_counters", as: Int.self) == 0)
        }
    }
}
