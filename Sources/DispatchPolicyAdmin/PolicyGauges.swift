import DispatchPolicy
import Foundation
import Logging
import Prometheus

/// Per-policy gauges read from the database at scrape time (pending,
/// scheduled, in flight, dead, oldest pending age), and per-partition ones
/// (in flight, tokens, adaptive cap and EWMA) when enabled, at most
/// `partitionMetricsLimit` partitions per scrape.
struct PolicyGauges {
    let store: AdminStore
    let registry: PrometheusCollectorRegistry
    let options: AdminOptions
    let logger: Logger

    func gauge(_ name: String, _ help: String, labels: [(String, String)]) -> Gauge {
        registry.makeGauge(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help), labels: labels)
    }

    func update() async {
        let up = gauge("dispatch_policy_up", "1 when the last scrape could read the database, else 0.", labels: [])
        do {
            for policy in try await store.policies() {
                let labels = [("policy", policy.name)]
                func set(_ name: String, _ help: String, _ value: Double) {
                    gauge(name, help, labels: labels).set(value)
                }
                set("dispatch_policy_pending", "Staged jobs eligible for admission now.", Double(policy.pending))
                set("dispatch_policy_scheduled", "Staged jobs whose not_before is in the future.", Double(policy.scheduled))
                set("dispatch_policy_in_flight", "Admitted jobs not yet finished.", Double(policy.inFlight))
                set("dispatch_policy_dead", "Jobs that failed max_attempts times.", Double(policy.dead))
                set("dispatch_policy_paused", "1 when admission is paused.", policy.paused ? 1 : 0)
                set("dispatch_policy_oldest_pending_seconds", "Age of the oldest eligible staged job (0 when none).",
                      policy.oldestPendingSeconds ?? 0)
            }
            if options.partitionMetrics {
                var remaining = options.partitionMetricsLimit
                for policy in try await store.policies() where remaining > 0 {
                    let rows = try await store.partitions(policy: policy.name, search: nil, after: nil, onlyBusy: false, limit: remaining)
                    remaining -= rows.count
                    for row in rows {
                        let labels = [("policy", policy.name), ("gate", row.gate), ("partition", row.partition)]
                        gauge("dispatch_policy_partition_in_flight", "Admitted jobs holding a slot of this gate partition.", labels: labels).set(Double(row.inFlight))
                        if let tokens = row.tokens {
                            gauge("dispatch_policy_partition_tokens", "Throttle tokens available now.", labels: labels).set(tokens)
                        }
                        if let cap = row.cap {
                            gauge("dispatch_policy_partition_cap", "In-flight cap (static, or the adaptive gate's current cap).", labels: labels).set(cap)
                        }
                        if let ewma = row.ewmaLagMs {
                            gauge("dispatch_policy_partition_ewma_lag_seconds", "Adaptive gate: EWMA of queue lag.", labels: labels).set(ewma / 1000)
                        }
                    }
                }
            }
            up.set(Double(1))
        } catch {
            logger.warning("metrics: could not read the database", metadata: ["error": "\(DispatchPolicyError.from(error))"])
            up.set(Double(0))
        }
    }
}
