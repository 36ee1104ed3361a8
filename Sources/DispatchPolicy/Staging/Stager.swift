import Foundation
import Logging
import PostgresNIO

/// One job to stage: the fields of `dispatch_policy.stage(...)`.
///
/// `args` and `context` are JSON text; ``init(args:context:dedupeKey:roundRobinKey:queue:priority:notBefore:)``
/// builds them from `Encodable` values.
public struct JobSpec: Sendable, Equatable {
    public var argsJSON: String
    public var contextJSON: String
    public var dedupeKey: String?
    public var roundRobinKey: String?
    public var queue: String?
    public var priority: Int32?
    public var notBefore: Date?

    public init(
        argsJSON: String, contextJSON: String = "{}", dedupeKey: String? = nil, roundRobinKey: String? = nil,
        queue: String? = nil, priority: Int32? = nil, notBefore: Date? = nil
    ) {
        self.argsJSON = argsJSON
        self.contextJSON = contextJSON
        self.dedupeKey = dedupeKey
        self.roundRobinKey = roundRobinKey
        self.queue = queue
        self.priority = priority
        self.notBefore = notBefore
    }

    public init(
        args: some Encodable, context: some Encodable = [String: String](), dedupeKey: String? = nil,
        roundRobinKey: String? = nil, queue: String? = nil, priority: Int32? = nil, notBefore: Date? = nil
    ) throws {
        self.init(
            argsJSON: try Self.json(args), contextJSON: try Self.json(context), dedupeKey: dedupeKey,
            roundRobinKey: roundRobinKey, queue: queue, priority: priority, notBefore: notBefore)
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
        if let notBefore {
            let formatter = ISO8601DateFormatter()
            formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            fields.append("\"not_before\":\"\(formatter.string(from: notBefore))\"")
        }
        return "{" + fields.joined(separator: ",") + "}"
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

    /// Stages one job; returns its id, or nil when deduplicated (a job of the
    /// same policy with the same dedupe key is pending or admitted).
    public func stage(policy: String, _ job: JobSpec) async throws -> Int64? {
        try Self.checkNotBefore(job.notBefore)
        let rows = try await executor.rows(
            """
            SELECT dispatch_policy.stage(
              policy => \(policy), args => \(job.argsJSON)::jsonb, context => \(job.contextJSON)::jsonb,
              dedupe_key => \(job.dedupeKey), round_robin_key => \(job.roundRobinKey), queue => \(job.queue),
              priority => \(job.priority.map(Int.init))::integer, not_before => \(job.notBefore)::timestamptz)
            """,
            logger: logger)
        let id = try rows.first?.decode(Int64?.self) ?? nil
        metrics.recordStaged(policy: policy, inserted: id != nil)
        return id
    }

    /// Stages many jobs in one call (all or nothing); ids in input order, nil
    /// where deduplicated, also against an earlier job of the same call.
    public func stageMany(policy: String, _ jobs: [JobSpec]) async throws -> [Int64?] {
        guard !jobs.isEmpty else { return [] }
        for (index, job) in jobs.enumerated() { try Self.checkNotBefore(job.notBefore, field: "jobs[\(index)].not_before") }
        let array = "[" + (try jobs.map { try $0.jsonObject() }).joined(separator: ",") + "]"
        let rows = try await executor.rows(
            """
            SELECT t.id FROM unnest(dispatch_policy.stage_many(\(policy), \(array)::jsonb)) WITH ORDINALITY AS t(id, n)
            ORDER BY t.n
            """,
            logger: logger)
        let ids = try rows.map { try $0.decode(Int64?.self) }
        for id in ids { metrics.recordStaged(policy: policy, inserted: id != nil) }
        return ids
    }
}
