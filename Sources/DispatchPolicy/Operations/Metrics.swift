import CoreMetrics

/// What the runner, the workers and the stager report through swift-metrics.
///
/// The library only emits; the application chooses the backend
/// (`MetricsSystem.bootstrap`, for example swift-prometheus's
/// `PrometheusMetricsFactory`). Series are per policy (and per gate for
/// refusals), never per partition: partitions are tenant-chosen and
/// unbounded. Per-partition numbers are read from the database at scrape time
/// by the admin's `/metrics`, behind an opt-in flag.
///
/// | name | type | labels |
/// |---|---|---|
/// | `dispatch_policy_ticks_total` | counter | policy, outcome (`ran`, `paused`, `busy`, `unknown`) |
/// | `dispatch_policy_tick_failures_total` | counter | policy |
/// | `dispatch_policy_tick_duration_seconds` | histogram | policy |
/// | `dispatch_policy_admitted_total` | counter | policy |
/// | `dispatch_policy_refused_total` | counter | policy, gate |
/// | `dispatch_policy_would_refuse_total` | counter | policy, gate (shadow policies: jobs a gate had no room for, admitted anyway) |
/// | `dispatch_policy_reaped_total` | counter | policy |
/// | `dispatch_policy_staged_total` | counter | policy, result (``StageOutcome``: `inserted`, `replaced`, `kept`, `dropped`) |
/// | `dispatch_policy_jobs_completed_total` | counter | policy |
/// | `dispatch_policy_jobs_failed_total` | counter | policy, result (`retry`, `dead`) |
/// | `dispatch_policy_jobs_deferred_total` | counter | policy |
public struct DispatchPolicyMetrics: Sendable {
    let factory: any MetricsFactory

    /// Emits through `factory` (default: the one `MetricsSystem.bootstrap`
    /// installed; without a bootstrap, nothing is recorded).
    public init(factory: any MetricsFactory = MetricsSystem.factory) {
        self.factory = factory
    }

    /// One tick's outcome.
    public func record(_ result: TickResult) {
        let policy = [("policy", result.policy)]
        Counter(label: "dispatch_policy_ticks_total", dimensions: policy + [("outcome", result.outcome.rawValue)], factory: factory)
            .increment()
        guard result.outcome == .ran else { return }
        Timer(label: "dispatch_policy_tick_duration_seconds", dimensions: policy, factory: factory)
            .recordNanoseconds(Self.nanoseconds(result.duration))
        if result.admitted > 0 {
            Counter(label: "dispatch_policy_admitted_total", dimensions: policy, factory: factory).increment(by: result.admitted)
        }
        if result.reaped > 0 {
            Counter(label: "dispatch_policy_reaped_total", dimensions: policy, factory: factory).increment(by: result.reaped)
        }
        for (gate, count) in result.refusedByGate where count > 0 {
            Counter(label: "dispatch_policy_refused_total", dimensions: policy + [("gate", gate)], factory: factory)
                .increment(by: count)
        }
        for (gate, count) in result.wouldRefuseByGate where count > 0 {
            Counter(label: "dispatch_policy_would_refuse_total", dimensions: policy + [("gate", gate)], factory: factory)
                .increment(by: count)
        }
    }

    /// A tick of `policy` that failed (its transaction rolled back).
    public func recordTickFailure(policy: String) {
        Counter(label: "dispatch_policy_tick_failures_total", dimensions: [("policy", policy)], factory: factory).increment()
    }

    /// A staged job and what became of it (``StageOutcome``).
    public func recordStaged(policy: String, outcome: StageOutcome) {
        Counter(
            label: "dispatch_policy_staged_total", dimensions: [("policy", policy), ("result", outcome.rawValue)], factory: factory
        )
        .increment()
    }

    /// A job a worker completed (as recorded by the database).
    public func recordCompleted(policy: String) {
        Counter(label: "dispatch_policy_jobs_completed_total", dimensions: [("policy", policy)], factory: factory).increment()
    }

    /// A failed attempt: staged again for a retry, or dead.
    public func recordFailed(policy: String, dead: Bool) {
        Counter(
            label: "dispatch_policy_jobs_failed_total",
            dimensions: [("policy", policy), ("result", dead ? "dead" : "retry")], factory: factory
        )
        .increment()
    }

    /// A job a handler deferred (``Defer``): staged again, no attempt counted.
    public func recordDeferred(policy: String) {
        Counter(label: "dispatch_policy_jobs_deferred_total", dimensions: [("policy", policy)], factory: factory).increment()
    }

    /// Whole nanoseconds, 0 for a negative duration, saturating at `Int64.max`.
    static func nanoseconds(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        guard seconds >= 0, attoseconds >= 0 else { return 0 }
        guard seconds < Int64.max / 1_000_000_000 else { return .max }
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}
