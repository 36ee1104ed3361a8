import DispatchPolicy
import Foundation
import Testing

/// A worker pool behind an adaptive gate, simulated in 1 ms steps with the
/// tick loop of `dispatch-policy run`: every tick admits up to the cap
/// (with the safety valve), then folds the observations that arrived since
/// the last tick, as the runner does. Deterministic: no clock, no database.
struct PoolSimulation {
    var workers = 10
    var jobMs = 20
    /// Time between ticks while jobs keep completing (busy pause + tick time).
    var tickEveryMs = 60
    /// LISTEN wake-up plus claim round trip.
    var claimLatencyMs = 2
    var backlog = 40_000
    var settings: AdaptiveSettings

    struct Result {
        /// (ms, cap) every 100 ms.
        var caps: [(ms: Int, cap: Int)] = []
        var completions = 0
        var capacity = 0.0
        var utilization: Double { Double(completions) / capacity }
    }

    func run(seconds: Int) -> Result {
        var result = Result()
        var controller = AdaptiveController(currentMax: settings.initialMax, ewmaLagMs: nil)
        var backlog = self.backlog
        var ready: [Int] = []  // admitted_at of jobs waiting for a worker, FIFO
        var readyHead = 0
        var busyUntil = Array(repeating: 0, count: workers)
        var running: [(admitted: Int, started: Int, ends: Int)] = []
        var inFlight = 0
        var observations: [(lag: Double, success: Bool)] = []
        var nextTick = 0
        for t in 0..<(seconds * 1000) {
            // Completions free their slot and record the queue lag.
            running.removeAll { job in
                guard job.ends <= t else { return false }
                inFlight -= 1
                result.completions += 1
                observations.append((Double(job.started - job.admitted), true))
                return true
            }
            // Free workers claim the oldest ready job.
            for w in 0..<workers where busyUntil[w] <= t && readyHead < ready.count && ready[readyHead] + claimLatencyMs <= t {
                let admitted = ready[readyHead]
                readyHead += 1
                busyUntil[w] = t + jobMs
                running.append((admitted, t, t + jobMs))
            }
            if t == nextTick {
                let cap = controller.currentMax
                let limit = inFlight == 0 ? max(cap, settings.initialMax) : cap
                let room = max(limit - inFlight, 0)
                let admitted = min(room, backlog)
                let limited = backlog > admitted
                for _ in 0..<admitted { ready.append(t) }
                backlog -= admitted
                inFlight += admitted
                for observation in observations {
                    controller.observe(lagMs: observation.lag, success: observation.success, limited: limited, settings: settings)
                }
                observations.removeAll()
                nextTick = t + tickEveryMs
            }
            if t % 100 == 0 { result.caps.append((t, controller.currentMax)) }
        }
        result.capacity = Double(seconds * 1000 * workers) / Double(jobMs)
        return result
    }
}

@Suite("AIMD controller")
struct AdaptiveControllerTests {
    let settings = AdaptiveSettings(initialMax: 3, min: 1, max: 6, targetLagMs: 100)

    @Test("grows by one per window of fast successes (cap observations), up to max, only while the cap turns jobs away")
    func growthPerWindow() {
        var c = AdaptiveController(currentMax: 3, ewmaLagMs: nil)
        for _ in 0..<3 { c.observe(lagMs: 10, success: true, limited: true, settings: settings) }
        #expect(c.currentMax == 4)
        for _ in 0..<3 { c.observe(lagMs: 10, success: true, limited: true, settings: settings) }
        #expect(c.currentMax == 4)  // a window is now 4 observations
        c.observe(lagMs: 10, success: true, limited: true, settings: settings)
        #expect(c.currentMax == 5)
        for _ in 0..<100 { c.observe(lagMs: 10, success: true, limited: true, settings: settings) }
        #expect(c.currentMax == 6)
        #expect(c.observations == 107)

        var idle = AdaptiveController(currentMax: 3, ewmaLagMs: nil)
        for _ in 0..<100 { idle.observe(lagMs: 10, success: true, limited: false, settings: settings) }
        #expect(idle.currentMax == 3, "without demand above the cap, it must not grow")
    }

    @Test("shrinks at most once per window, however many slow observations arrive")
    func decreasePerWindow() {
        let unbounded = AdaptiveSettings(initialMax: 3, min: 1, targetLagMs: 100)
        var c = AdaptiveController(currentMax: 40, ewmaLagMs: 500, sinceDecrease: 40)
        c.observe(lagMs: 500, success: true, limited: true, settings: unbounded)
        #expect(c.currentMax == 38)  // floor(40 × 0.95)
        for _ in 0..<37 { c.observe(lagMs: 500, success: true, limited: true, settings: unbounded) }
        #expect(c.currentMax == 38)
        c.observe(lagMs: 500, success: true, limited: true, settings: unbounded)
        #expect(c.currentMax == 36)
        for _ in 0..<10_000 { c.observe(lagMs: 1000, success: true, limited: true, settings: unbounded) }
        #expect(c.currentMax == 1)
    }

    @Test("a failure halves the cap, at most once per window")
    func failure() {
        var c = AdaptiveController(currentMax: 6, ewmaLagMs: 0, sinceDecrease: 6)
        c.observe(lagMs: 0, success: false, limited: true, settings: settings)
        #expect(c.currentMax == 3)
        #expect(c.failures == 1)
        c.observe(lagMs: 0, success: false, limited: true, settings: settings)
        #expect(c.currentMax == 3)
        c.observe(lagMs: 0, success: false, limited: true, settings: settings)
        c.observe(lagMs: 0, success: false, limited: true, settings: settings)
        #expect(c.currentMax == 1)
    }

    @Test("the EWMA moves by alpha per window, not per observation")
    func ewmaPerWindow() {
        let unbounded = AdaptiveSettings(initialMax: 3, min: 1, targetLagMs: 10_000)
        var c = AdaptiveController(currentMax: 50, ewmaLagMs: 0)
        for _ in 0..<50 { c.observe(lagMs: 100, success: true, limited: false, settings: unbounded) }
        #expect(abs((c.ewmaLagMs ?? 0) - 50) < 0.5)  // one window of 100 ms moved 0 halfway
    }

    @Test("never traps on odd state or input")
    func robust() {
        var c = AdaptiveController(currentMax: 0, ewmaLagMs: .nan, growthCredit: .infinity, sinceDecrease: -5)
        c.observe(lagMs: .infinity, success: true, limited: true, settings: settings)
        c.observe(lagMs: .nan, success: false, limited: true, settings: settings)
        c.observe(lagMs: -3, success: true, limited: true, settings: settings)
        #expect((1...6).contains(c.currentMax))
        #expect(c.ewmaLagMs?.isFinite == true)
    }

    /// The workload of the issue: 10 workers with 20 ms jobs (500 jobs/s),
    /// one partition, initial_max 3, target 100 ms, 40,000 backlogged.
    @Test("converges: after 30 s the cap stays within ±20 % of where it settles, and the pool runs at ≥ 90 % of capacity")
    func convergence() {
        let simulation = PoolSimulation(settings: AdaptiveSettings(initialMax: 3, min: 1, targetLagMs: 100))
        let result = simulation.run(seconds: 60)
        let settled = result.caps.filter { $0.ms >= 30_000 }.map(\.cap).sorted()
        let median = Double(settled[settled.count / 2])
        let low = Double(settled.first ?? 0)
        let high = Double(settled.last ?? 0)
        #expect(
            low >= median * 0.8 && high <= median * 1.2,
            "caps after 30 s ranged \(low)–\(high) around \(median)")
        #expect(median >= 12, "a settled cap of \(median) cannot keep 10 workers busy between ticks")
        #expect(result.utilization >= 0.9, "the pool completed \(result.completions) of \(Int(result.capacity)) possible")
    }
}
