import Foundation
import Logging
import PostgresNIO

/// One job to stage: the fields of `dispatch_policy.stage(...)`.
///
/// `args` and `context` are JSON text; ``init(args:context:dedupeKey:roundRobinKey:queue:priority:notBefore:expiresAt:)``
/// builds them from `Encodable` values. `expiresAt` is the job's deadline:
/// not admitted by then, it is finished as `expired` (a policy's `max_wait`
/// may set an earlier one).
public struct JobSpec: Sendable, Equatable {
    public var argsJSON: String
    public var contextJSON: String
    public var dedupeKey: String?
    public var roundRobinKey: String?
    public var queue: String?
    public var priority: Int32?
    public var notBefore: Date?
    public var expiresAt: Date?

    public init(
        argsJSON: String, contextJSON: String = "{}", dedupeKey: String? = nil, roundRobinKey: String? = nil,
        queue: String? = nil, priority: Int32? = nil, notBefore: Date? = nil, expiresAt: Date? = nil
    ) {
        self.argsJSON = argsJSON
        self.contextJSON = contextJSON
        self.dedupeKey = dedupeKey
        self.roundRobinKey = roundRobinKey
        self.queue = queue
        self.priority = priority
        self.notBefore = notBefore
        self.expiresAt = expiresAt
    }

    public init(
        args: some Encodable, context: some Encodable = [String: String](), dedupeKey: String? = nil,
        roundRobinKey: String? = nil, queue: String? = nil, priority: Int32? = nil, notBefore: Date? = nil,
        expiresAt: Date? = nil
    ) throws {
        self.init(
            argsJSON: try Self.json(args), contextJSON: try Self.json(context), dedupeKey: dedupeKey,
            roundRobinKey: roundRobinKey, queue: queue, priority: priority, notBefore: notBefore, expiresAt: expiresAt)
    }

    static func json(_ value: some Encodable) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        do {
            return String(decoding: try encoder.encode(value), as: UTF8.self)
        } catch {
            throw DispatchPolicyError(code: .invalidArgument, message: "cannot encode job value as JSON: \(error)")
        }
    }

    /// This spec as an element of `stage_many`'s array.
    func jsonObject() throws -> String {
        var fields = ["\"args\":\(argsJSON)", "\"context\":\(contextJSON)"]
        if let dedupeKey { fields.append("\"dedupe_key\":\(try Self.json(dedupeKey))") }
        if let roundRobinKey { fields.append("\"round_robin_key\":\(try Self.json(roundRobinKey))") }
        if let queue { fields.append("\"queue\":\(try Self.json(queue))") }
        if let priority { fields.append("\"priority\":\(priority)") }
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let notBefore { fields.append("\"not_before\":\"\(formatter.string(from: notBefore))\"") }
        if let expiresAt { fields.append("\"expires_at\":\"\(formatter.string(from: expiresAt))\"") }
        return "{" + fields.joined(separator: ",") + "}"
    }

    func checkTimes(prefix: String = "") throws {
        try Stager.checkNotBefore(notBefore, field: prefix + "not_before")
        try Stager.checkNotBefore(expiresAt, field: prefix + "expires_at")
    }
}

/// What staging did with a job (`dispatch_policy.stage_outcome`).
public enum StageOutcome: String, Sendable, Equatable, CaseIterable {
    /// A new job holds the key (or the job had no key).
    case inserted
    /// The policy's `dedupe_mode` is `replace` and a pending job held the
    /// key: that job now has the new args and context (and may wait
    /// `debounce` longer). The id is that job's.
    case replaced
    /// A job held the key (pending under `dedupe_mode` `keep`, or admitted
    /// under either mode) and was left as it was. The id is that job's.
    case kept
    /// The job was staged, then finished as `dropped` in the same call to
    /// keep its partition's backlog at `max_pending_per_partition`
    /// (`on_overflow` `drop_oldest`).
    case dropped
}

/// The id of the job that holds a staged job's place, and what staging did.
public struct StagedJob: Sendable, Equatable {
    public var id: Int64
    public var outcome: StageOutcome

    public init(id: Int64, outcome: StageOutcome) {
        self.id = id
        self.outcome = outcome
    }

    init(row: PostgresRow) throws {
        let (id, outcome) = try row.decode((Int64?, String?).self)
        guard let id, let outcome, let known = StageOutcome(rawValue: outcome) else {
            throw DispatchPolicyError(
                code: .server, message: "staging answered an unexpected outcome",
                detail: "id \(id.map(String.init) ?? "NULL"), outcome \(outcome ?? "NULL").")
        }
        self.init(id: id, outcome: known)
    }
}

/// Stages jobs from Swift through `dispatch_policy.stage` and `stage_many`,
/// with the same options and errors as calling the SQL yourself.
public struct Stager: Sendable {
    public let executor: any SQLExecutor
    public let logger: Logger
    /// Where staged jobs are counted (``DispatchPolicyMetrics``). A job
    /// staged in a transaction the caller then rolls back is counted too.
    public var metrics: DispatchPolicyMetrics

    public init(
        executor: any SQLExecutor, logger: Logger = Logger(label: "dispatch-policy"),
        metrics: DispatchPolicyMetrics = DispatchPolicyMetrics()
    ) {
        self.executor = executor
        self.logger = logger
        self.metrics = metrics
    }

    /// The times `not_before` may take: years 1 to 9999. (PostgreSQL goes
    /// further, but the driver's date encoding traps beyond year 294276.)
    public static let notBeforeRange: ClosedRange<Date> =
        Date(timeIntervalSince1970: -62_135_596_800)...Date(timeIntervalSince1970: 253_402_300_799)

    static func checkNotBefore(_ date: Date?, field: String = "not_before") throws {
        guard let date else { return }
        guard notBeforeRange.contains(date) else {
            throw DispatchPolicyError(
                code: .invalidArgument, message: "\(field) must be a time from year 1 to year 9999",
                detail: "\(field) is \(date.timeIntervalSince1970) s after 1970.", hint: "Nothing was stored.")
        }
    }

    /// Stages one job: the id of the job that now holds its place (a new
    /// one, or the one holding its dedupe key) and what happened.
    ///
    /// A full backlog under `on_overflow` `reject` throws SQLSTATE `DP002`
    /// (``DispatchPolicyError/isBacklogFull``), and nothing is staged.
    public func stage(policy: String, _ job: JobSpec) async throws -> StagedJob {
        try job.checkTimes()
        let rows = try await executor.rows(
            """
            SELECT o.id, o.outcome FROM dispatch_policy.stage_outcome(
              policy => \(policy), args => \(job.argsJSON)::jsonb, context => \(job.contextJSON)::jsonb,
              dedupe_key => \(job.dedupeKey), round_robin_key => \(job.roundRobinKey), queue => \(job.queue),
              priority => \(job.priority.map(Int.init))::integer, not_before => \(job.notBefore)::timestamptz,
              expires_at => \(job.expiresAt)::timestamptz) o
            """,
            logger: logger)
        guard let row = rows.first else {
            throw DispatchPolicyError(code: .server, message: "stage_outcome returned no row")
        }
        let staged = try StagedJob(row: row)
        metrics.recordStaged(policy: policy, outcome: staged.outcome)
        return staged
    }

    /// Stages many jobs in one call, all or nothing; one result per job, in
    /// input order. A job with the dedupe key of an earlier one of the same
    /// call is kept or replaces it, as against a staged job.
    public func stageMany(policy: String, _ jobs: [JobSpec]) async throws -> [StagedJob] {
        guard !jobs.isEmpty else { return [] }
        for (index, job) in jobs.enumerated() { try job.checkTimes(prefix: "jobs[\(index)].") }
        let array = "[" + (try jobs.map { try $0.jsonObject() }).joined(separator: ",") + "]"
        let rows = try await executor.rows(
            "SELECT t.id, t.outcome FROM dispatch_policy.stage_many_outcomes(\(policy), \(array)::jsonb) t ORDER BY t.idx",
            logger: logger)
        let staged = try rows.map { try StagedJob(row: $0) }
        guard staged.count == jobs.count else {
            throw DispatchPolicyError(
                code: .server, message: "stage_many_outcomes returned \(staged.count) rows for \(jobs.count) jobs")
        }
        for job in staged { metrics.recordStaged(policy: policy, outcome: job.outcome) }
        return staged
    }
}
