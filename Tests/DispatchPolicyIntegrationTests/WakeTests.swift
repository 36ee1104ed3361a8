import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

/// The runner sleeps until the next thing that can change by the clock —
/// a scheduled job becoming due, a throttle's next whole token — not for a
/// fixed pause. The pauses here are 30 s: only that wake-up can explain an
/// admission within seconds.
@Suite("Runner: wakes when something is due", .timeLimit(.minutes(15)))
struct WakeTests {
    private func options() -> TickRunnerOptions {
        var options = TickRunnerOptions()
        // Long enough that no wait below (60 s at most) can end by the pause.
        options.idlePause = .seconds(300)
        options.busyPause = .seconds(300)
        return options
    }

    @Test("an idle runner admits a scheduled job when it becomes due, not at its next pause")
    func scheduledJobIsOnTime() async throws { try await LiveTests.exclusive { try await scheduledJobIsOnTimeLive() } }

    func scheduledJobIsOnTimeLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
        }
        let services = DetachedServices([TickRunner(connection: settings, options: options(), logger: TestServer.logger)])
        defer { Task { await services.shutDown() } }
        // The runner is idle (it has made its first pass) before the job is staged.
        try await Task.sleep(for: .milliseconds(300))
        try await TestServer.withConnection(settings) { conn async throws in
            try await conn.exec("SELECT dispatch_policy.stage('p', '1', not_before => clock_timestamp() + interval '1.5 seconds')")
        }
        let admitted = try await waitUntil(60) {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs", as: Int.self) == 1
            }
        }
        #expect(admitted, "the scheduled job waited for the runner's 300 s pause")
        try await TestServer.withConnection(settings) { conn async throws in
            // Not early: admitted at or after its not_before.
            let early = try await conn.scalar(
                "SELECT count(*)::int FROM dispatch_policy.admitted_jobs WHERE admitted_at < created_at + interval '1.5 seconds'",
                as: Int.self)
            #expect(early == 0)
        }
        await services.shutDown()
    }

    @Test("with burst 1 the runner comes back for each new token instead of sleeping its pause")
    func throttleWakesForTokens() async throws { try await LiveTests.exclusive { try await throttleWakesForTokensLive() } }

    func throttleWakesForTokensLive() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p", config: try PolicyConfig { Gate.throttle(rate: 20, per: 1, burst: 1) }.json())
            try await conn.exec("SELECT dispatch_policy.stage('p', to_jsonb(i)) FROM generate_series(1, 200) i")
        }
        func admitted() async throws -> Int {
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.admitted_jobs", as: Int.self)
            }
        }
        let started = ContinuousClock.now
        let services = DetachedServices([TickRunner(connection: settings, options: options(), logger: TestServer.logger)])
        // The window starts at the first admission (the burst), however long a
        // loaded machine takes to start the runner.
        #expect(try await waitUntil(30) { try await admitted() >= 1 }, "the runner admitted nothing")
        let first = try await admitted()
        // Each further job needs a wake-up for a new token: a runner that
        // slept its 300 s pause would admit none in 60 s. Five are enough to
        // tell; the throttle allows 20 a second, but a machine loaded by the
        // whole suite once made a pass take over 300 ms (26 in 10 s), so this
        // waits for a count rather than timing a window.
        let cameBack = try await waitUntil(60) { try await admitted() >= first + 5 }
        let later = try await admitted()
        await services.shutDown()
        let elapsed = ContinuousClock.now - started
        let all = try await admitted()
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        #expect(cameBack, "only \(later - first) admitted in 60 s at 20/s")
        #expect(Double(all) <= 1 + 20 * seconds + 1e-9)
    }
}
