import Foundation
import Testing

@testable import DispatchPolicy

@Suite("Runner health without a database")
struct RunnerHealthTests {
    let start = Date(timeIntervalSince1970: 1_800_000_000)

    @Test("healthy only after a pass, while the session is open and the last pass is within the bound")
    func verdicts() {
        let health = RunnerHealth()
        #expect(health.verdict(now: start).reason == "the runner has not started")
        #expect(!health.verdict(now: start).healthy)
        health.started(bound: .seconds(10), at: start)
        let starting = health.verdict(now: start + 1)
        #expect(!starting.healthy && starting.reason.hasPrefix("no pass completed yet"))

        health.passCompleted(at: start + 2)
        #expect(health.verdict(now: start + 12).healthy)
        let stale = health.verdict(now: start + 13)
        #expect(!stale.healthy)
        #expect(stale.reason == "no pass completed for 11 s (bound 10 s)")

        // Lost: unhealthy at once, and since the first loss, until a pass completes.
        health.connectionClosed(at: start + 3)
        health.passFailed("runner: cannot connect", lost: true, at: start + 4)
        let lost = health.verdict(now: start + 5)
        #expect(!lost.healthy)
        #expect(lost.reason == "database connection lost since 2027-01-15T08:00:03Z (2 s ago): runner: cannot connect")
        health.passCompleted(at: start + 6)
        #expect(health.verdict(now: start + 7).healthy)
        #expect(health.verdict(now: start + 7).reason == "ok")

        // A pass that fails for another reason leaves the session open; it
        // turns unhealthy once the last completed pass is too old.
        health.passFailed("relation \"dispatch_policy.policies\" does not exist\nsecond line", lost: false, at: start + 8)
        #expect(health.verdict(now: start + 9).healthy)
        let failing = health.verdict(now: start + 30)
        #expect(!failing.healthy && failing.reason.hasSuffix(#": relation "dispatch_policy.policies" does not exist\nsecond line"#))
        #expect(!failing.reason.contains("\n"))
    }

    @Test("the bound: three of the longer pause plus the longest a tick may take")
    func bound() {
        var options = TickRunnerOptions()
        #expect(options.healthBound == .seconds(68))
        options.idlePause = .seconds(10)
        options.tick.timeout = .seconds(1)
        #expect(options.healthBound == .seconds(60))
        options.busyPause = .seconds(20)
        #expect(options.healthBound == .seconds(90))
    }
}
