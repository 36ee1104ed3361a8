import Foundation

/// Operator hints: one sentence per thing that limits a policy now. Each is
/// shown only while it is true; a policy with nothing to say gets none.
public enum Hints {
    /// A failure rate at or above this (over the last hour, at least
    /// ``minimumFinished`` jobs finished) is worth a hint.
    public static let failingRate = 0.10
    public static let minimumFinished: Int64 = 10
    /// Pending growing this many minutes in a row is worth a hint.
    public static let growingMinutes = 10

    public static func of(_ policy: AdminStore.PolicyRow, limits: AdminStore.Limits?) -> [String] {
        var hints: [String] = []
        if policy.paused { hints.append("paused: nothing is admitted until resumed") }
        if let failures = policy.tickFailures, failures > 0 {
            hints.append("ticks failing (\(failures) in a row): \(policy.lastError ?? "see status")")
        }
        guard let limits else { return hints }
        if let cap = limits.globalCap, let inFlight = limits.globalInFlight, Double(inFlight) >= cap, policy.pending > 0 {
            hints.append("at global cap: \(inFlight) in flight of \(Format.number(cap))")
        }
        for (gate, lanes) in limits.throttleBoundLanes.sorted(by: { $0.key < $1.key }) where lanes > 0 {
            hints.append("throttle-bound: \(lanes) lane\(lanes == 1 ? "" : "s") waiting for tokens (\(gate))")
        }
        for (gate, lanes) in limits.capBoundLanes.sorted(by: { $0.key < $1.key }) where lanes > 0 {
            hints.append("at concurrency cap: \(lanes) lane\(lanes == 1 ? "" : "s") waiting for a slot of \(gate)")
        }
        if let worst = limits.adaptiveWorst, worst.targetMs > 0, worst.ewmaMs > worst.targetMs {
            hints.append(
                "adaptive cap shrinking on \(worst.gate) [\(worst.partition)]: EWMA \(Format.milliseconds(worst.ewmaMs)) > target \(Format.milliseconds(worst.targetMs)), cap \(worst.cap)"
            )
        }
        if limits.growingMinutes >= growingMinutes, policy.pending > 0 {
            hints.append("pending growing for \(limits.growingMinutes) min: more staged than admitted each minute")
        }
        let finished = limits.completedHour + limits.failedHour
        if finished >= minimumFinished {
            let rate = Double(limits.failedHour) / Double(finished)
            if rate >= failingRate {
                hints.append("failing \(Int((rate * 100).rounded())) % of attempts in the last hour")
            }
        }
        return hints
    }
}
