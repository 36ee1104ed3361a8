import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

/// The admin's actions, each one call of a documented SQL function (see the
/// README's "Operator actions"), so psql, the CLI and the browser do the
/// same thing under the same locks.
struct AdminActions {
    let store: AdminStore

    /// Jobs one drain from the UI cancels (drain's default).
    static let drainBatch = 10_000

    struct Refusal: Error {
        var message: String
    }

    /// Runs `action` with the form's fields; returns the message to show.
    func run(_ action: String, fields: [String: String]) async throws -> String {
        let logger = store.logger
        let executor = store.executor
        func field(_ name: String) throws -> String {
            guard let value = fields[name], !value.isEmpty else { throw Refusal(message: "\(action): the field \(name) is missing.") }
            return value
        }
        /// A partition key: present, and possibly empty (a job without the
        /// template's key renders to the empty partition).
        func partitionField() throws -> String {
            guard let value = fields["partition"] else { throw Refusal(message: "\(action): the field partition is missing.") }
            return value
        }
        func id() throws -> Int64 {
            guard let id = Int64(try field("id")), id > 0 else {
                throw Refusal(message: "\(action): id must be a job id (a positive whole number).")
            }
            return id
        }
        switch action {
        case "pause":
            let policy = try field("policy")
            _ = try await executor.rows("SELECT dispatch_policy.pause(\(policy))", logger: logger)
            return "Paused \(policy): nothing more is admitted until it is resumed."
        case "resume":
            let policy = try field("policy")
            _ = try await executor.rows("SELECT dispatch_policy.resume(\(policy))", logger: logger)
            return "Resumed \(policy)."
        case "pause-partition":
            let (policy, gate, partition) = (try field("policy"), try field("gate"), try partitionField())
            _ = try await executor.rows(
                "SELECT dispatch_policy.pause_partition(\(policy), \(gate), \(partition), reason => 'paused from the admin UI')",
                logger: logger)
            return "Paused partition \(partition) of \(gate) in \(policy)."
        case "resume-partition":
            let (policy, gate, partition) = (try field("policy"), try field("gate"), try partitionField())
            _ = try await executor.rows("SELECT dispatch_policy.resume_partition(\(policy), \(gate), \(partition))", logger: logger)
            return "Resumed partition \(partition) of \(gate) in \(policy)."
        case "admit-now":
            let (policy, gate, partition) = (try field("policy"), try field("gate"), try partitionField())
            let text = fields["max"].flatMap { $0.isEmpty ? nil : $0 } ?? "1"
            guard let maxJobs = Int(text), FieldLimits.batchSize.contains(Double(maxJobs)) else {
                throw Refusal(message: "admit-now: max must be a whole number from 1 to 100000.")
            }
            let result = try await executor.withSession { conn in
                try await Ticker(connection: conn, logger: logger).admitNow(
                    policy: policy, gate: gate, partition: partition, maxJobs: maxJobs)
            }
            let report = AdmitNowReport(result, requested: maxJobs).text
            return "Partition \(partition) of \(gate) in \(policy): \(report)."
        case "cancel":
            let job = try id()
            let cancelled =
                try await executor.rows(
                    "SELECT dispatch_policy.cancel(\(job), 'cancelled from the admin UI')", logger: logger
                ).first?.decode(Bool.self) ?? false
            return cancelled ? "Cancelled job \(job)." : "Job \(job) was not waiting: nothing to cancel."
        case "retry":
            let job = try id()
            _ = try await executor.rows("SELECT dispatch_policy.retry(\(job))", logger: logger)
            return "Job \(job) is staged again."
        case "drain":
            let policy = try field("policy")
            // A partition of a gate, or (neither given) the whole policy.
            let gate = fields["gate"].flatMap { $0.isEmpty ? nil : $0 }
            let partition = gate == nil ? nil : fields["partition"]
            let count =
                try await executor.rows(
                    """
                    SELECT dispatch_policy.drain(\(policy), \(gate)::text, \(partition)::text, \(Self.drainBatch)::integer,
                                                 reason => 'drained from the admin UI')
                    """, logger: logger
                ).first?.decode(Int64.self) ?? 0
            let more = count >= Self.drainBatch ? " That is the most one drain cancels: more may remain, drain again." : ""
            return "Cancelled \(count) staged job\(count == 1 ? "" : "s") of \(policy)\(partition.map { " [\($0)]" } ?? "").\(more)"
        default:
            throw Refusal(message: "There is no action \(action).")
        }
    }
}
