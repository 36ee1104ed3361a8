import DispatchPolicy
import Foundation
import Logging
import Prometheus

/// The gauge series the last scrape exported, so the next one can drop
/// those whose policy or partition is gone (a deleted policy must not
/// export its last values forever, nor tenants that churn grow the
/// registry without bound).
actor ExportedGauges {
    struct Series: Hashable, Sendable {
        var name: String
        var labels: [String]
    }

    private var last: Set<Series> = []

    /// Records what this scrape exported; returns what it no longer does.
    func replace(with current: Set<Series>) -> Set<Series> {
        defer { last = current }
        return last.subtracting(current)
    }
}

/// Per-policy gauges read from the database at scrape time (pending,
/// scheduled, in flight, dead, oldest pending age), and per-partition ones
/// (in flight, tokens, adaptive cap and EWMA) when enabled, at most
/// `partitionMetricsLimit` partitions per scrape. Series of policies and
/// partitions no longer listed are unregistered.
struct PolicyGauges {
    let store: AdminStore
    let registry: PrometheusCollectorRegistry
    let options: AdminOptions
    let exported: ExportedGauges
    let logger: Logger

    static let help: [String: String] = [
        "dispatch_policy_pending": "Staged jobs eligible for admission now.",
        "dispatch_policy_scheduled": "Staged jobs whose not_before is in the future.",
        "dispatch_policy_in_flight": "Admitted jobs not yet finished.",
        "dispatch_policy_dead": "Jobs that failed max_attempts times.",
        "dispatch_policy_paused": "1 when admission is paused.",
        "dispatch_policy_expired_24h": "Jobs finished as expired (not admitted by their deadline) in the last 24 hours.",
        "dispatch_policy_dropped_24h":
            "Jobs finished as dropped (their partition's backlog over max_pending_per_partition) in the last 24 hours.",
        "dispatch_policy_deferred_24h": "Deferrals by workers (backpressure from downstream) in the last 24 hours.",
        "dispatch_policy_oldest_pending_seconds": "Age of the oldest eligible staged job (0 when none).",
        "dispatch_policy_partition_in_flight": "Admitted jobs holding a slot of this gate partition.",
        "dispatch_policy_partition_tokens": "Throttle tokens available now.",
        "dispatch_policy_partition_cap": "In-flight cap (static, or the adaptive gate's current cap).",
        "dispatch_policy_partition_ewma_lag_seconds": "Adaptive gate: EWMA of queue lag.",
        "dispatch_policy_partition_would_refuse":
            "Shadow policy: jobs this gate partition would have refused (admitted anyway), as recorded in shadow_refusals.",
        "dispatch_policy_partition_would_be_lag_seconds":
            "Shadow policy, throttle: the partition's token deficit over its refill rate (how far behind an enforcing throttle would be).",
        "dispatch_policy_up": "1 when the last scrape could read the database, else 0.",
    ]

    static let policyLabels = ["policy"]
    static let partitionLabels = ["policy", "gate", "partition"]

    func gauge(_ name: String, labels: [(String, String)]) -> Gauge {
        registry.makeGauge(
            descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: Self.help[name] ?? ""), labels: labels)
    }

    func update() async {
        let up = gauge("dispatch_policy_up", labels: [])
        var current: Set<ExportedGauges.Series> = []
        func set(_ name: String, _ names: [String], _ values: [String], _ value: Double) {
            gauge(name, labels: Array(zip(names, values))).set(value)
            current.insert(.init(name: name, labels: values))
        }
        do {
            let policies = try await store.policies()
            for policy in policies {
                let labels = [policy.name]
                set("dispatch_policy_pending", Self.policyLabels, labels, Double(policy.pending))
                set("dispatch_policy_scheduled", Self.policyLabels, labels, Double(policy.scheduled))
                set("dispatch_policy_in_flight", Self.policyLabels, labels, Double(policy.inFlight))
                set("dispatch_policy_dead", Self.policyLabels, labels, Double(policy.dead))
                set("dispatch_policy_paused", Self.policyLabels, labels, policy.paused ? 1 : 0)
                set("dispatch_policy_expired_24h", Self.policyLabels, labels, Double(policy.expired24h))
                set("dispatch_policy_dropped_24h", Self.policyLabels, labels, Double(policy.dropped24h))
                set("dispatch_policy_deferred_24h", Self.policyLabels, labels, Double(policy.deferred24h))
                set("dispatch_policy_oldest_pending_seconds", Self.policyLabels, labels, policy.oldestPendingSeconds ?? 0)
            }
            if options.partitionMetrics {
                var remaining = options.partitionMetricsLimit
                for policy in policies where remaining > 0 {
                    let rows = try await store.partitions(policy: policy.name, search: nil, after: nil, onlyBusy: false, limit: remaining)
                    remaining -= rows.count
                    for row in rows {
                        let labels = [policy.name, row.gate, row.partition]
                        set("dispatch_policy_partition_in_flight", Self.partitionLabels, labels, Double(row.inFlight))
                        if let tokens = row.tokens { set("dispatch_policy_partition_tokens", Self.partitionLabels, labels, tokens) }
                        if let cap = row.cap { set("dispatch_policy_partition_cap", Self.partitionLabels, labels, cap) }
                        if let ewma = row.ewmaLagMs {
                            set("dispatch_policy_partition_ewma_lag_seconds", Self.partitionLabels, labels, ewma / 1000)
                        }
                        if let wouldRefuse = row.wouldRefuse {
                            set("dispatch_policy_partition_would_refuse", Self.partitionLabels, labels, Double(wouldRefuse))
                        }
                        if let lag = row.wouldBeLagSeconds {
                            set("dispatch_policy_partition_would_be_lag_seconds", Self.partitionLabels, labels, lag)
                        }
                    }
                }
            }
            // What the database no longer has is no longer exported.
            for stale in await exported.replace(with: current) {
                let names = stale.labels.count == 1 ? Self.policyLabels : Self.partitionLabels
                registry.unregisterGauge(gauge(stale.name, labels: Array(zip(names, stale.labels))))
            }
            up.set(Double(1))
        } catch {
            // Nothing is dropped on a failed read: the last values stay, and up says 0.
            logger.warning("metrics: could not read the database", metadata: ["error": "\(DispatchPolicyError.from(error))"])
            up.set(Double(0))
        }
    }
}
