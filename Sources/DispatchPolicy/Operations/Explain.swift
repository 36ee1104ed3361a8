import Foundation
import Logging
import PostgresNIO

/// Why a job is where it is: the rows of `dispatch_policy.explain(id)`.
public struct JobExplanation: Sendable, Equatable {
    public struct Row: Sendable, Equatable {
        /// `job`, `policy`, `schedule`, `lane`, `gate` or `estimate`.
        public var aspect: String
        public var gate: String?
        public var partition: String?
        /// `waits` (this keeps it from being admitted), `ok`, `info`; for
        /// `job` its state; for `estimate`: `next tick`, `estimated`, `unknown`.
        public var verdict: String
        public var explanation: String
        /// The wait this row accounts for, in seconds, where one is known.
        public var waitSeconds: Double?
    }

    public var id: Int64
    public var rows: [Row]

    /// The job's state (`pending`, `scheduled`, `admitted`, `completed`, `dead`).
    public var state: String? { rows.first { $0.aspect == "job" }?.verdict }
    /// What keeps it waiting (empty when nothing does).
    public var waitingOn: [Row] { rows.filter { $0.verdict == "waits" } }

    /// Reads `dispatch_policy.explain(id)`; an unknown id is SQLSTATE P0002.
    public static func load(id: Int64, on executor: some SQLExecutor, logger: Logger) async throws -> JobExplanation {
        let rows = try await executor.rows(
            "SELECT aspect, gate, partition, verdict, explanation, wait_seconds FROM dispatch_policy.explain(\(id))",
            logger: logger
        ).map { row in
            let (aspect, gate, partition, verdict, explanation, wait) = try row.decode(
                (String, String?, String?, String, String, Double?).self)
            return Row(aspect: aspect, gate: gate, partition: partition, verdict: verdict, explanation: explanation, waitSeconds: wait)
        }
        return JobExplanation(id: id, rows: rows)
    }

    /// One line per row: `waits  gate per_endpoint [acme]: throttle: ...`.
    /// Values a tenant chose (partition keys, errors) have their control
    /// characters escaped, so no line can break or forge another.
    public var text: String {
        let width = rows.map(\.verdict.count).max() ?? 0
        return rows.map { row in
            var subject = row.aspect
            if let gate = row.gate { subject += " \(gate)" }
            if let partition = row.partition { subject += " [\(partition)]" }
            let verdict = row.verdict.padding(toLength: width, withPad: " ", startingAt: 0)
            return DispatchPolicyError.oneLine("\(verdict)  \(subject): \(row.explanation)")
        }.joined(separator: "\n")
    }
}
