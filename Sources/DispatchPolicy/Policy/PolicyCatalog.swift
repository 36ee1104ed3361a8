import Foundation
import Logging
import PostgresNIO

/// A declared policy as stored in `dispatch_policy.policies`.
public struct PolicyRecord: Sendable, Equatable {
    public var name: String
    /// The config as JSON text (keys in PostgreSQL's jsonb order).
    public var config: String
    public var paused: Bool
    public var createdAt: Date
    public var updatedAt: Date
}

/// Declares, lists and pauses policies through the SQL API
/// (`declare_policy`, `pause`, `resume`); validation happens in the database,
/// so every client is held to the same rules.
public struct PolicyCatalog: Sendable {
    public let executor: any SQLExecutor
    public let logger: Logger

    public init(executor: any SQLExecutor, logger: Logger = Logger(label: "dispatch-policy")) {
        self.executor = executor
        self.logger = logger
    }

    /// Creates or replaces a policy. `config` is the JSON text of the config.
    /// An invalid config throws a ``DispatchPolicyError`` with SQLSTATE 22023
    /// naming the field; nothing is stored.
    public func declare(name: String, config: String) async throws {
        _ = try await executor.rows("SELECT dispatch_policy.declare_policy(\(name), \(config)::jsonb)", logger: logger)
    }

    /// Every policy, by name.
    public func list() async throws -> [PolicyRecord] {
        try await executor.rows(
            "SELECT name, config::text, paused, created_at, updated_at FROM dispatch_policy.policies ORDER BY name",
            logger: logger
        ).map(Self.record)
    }

    /// The policy called `name`, or nil.
    public func policy(named name: String) async throws -> PolicyRecord? {
        try await executor.rows(
            "SELECT name, config::text, paused, created_at, updated_at FROM dispatch_policy.policies WHERE name = \(name)",
            logger: logger
        ).first.map(Self.record)
    }

    /// Stops admission for the policy (staging continues).
    public func pause(_ name: String) async throws {
        _ = try await executor.rows("SELECT dispatch_policy.pause(\(name))", logger: logger)
    }

    /// Resumes admission for the policy.
    public func resume(_ name: String) async throws {
        _ = try await executor.rows("SELECT dispatch_policy.resume(\(name))", logger: logger)
    }

    /// Drops the policy and every row of its state (`dispatch_policy.drop_policy`);
    /// returns how many jobs were cancelled. Refused (SQLSTATE 2BP01) while
    /// it has staged or admitted jobs, unless `force`, which finishes them as
    /// `cancelled` first. Its history stays until pruned. Only the schema's
    /// owner may call it.
    @discardableResult
    public func drop(_ name: String, force: Bool = false) async throws -> Int {
        try await executor.rows("SELECT dispatch_policy.drop_policy(\(name), force => \(force))", logger: logger)
            .first?.decode(Int.self) ?? 0
    }

    private static func record(_ row: PostgresRow) throws -> PolicyRecord {
        let (name, config, paused, created, updated) = try row.decode((String, String, Bool, Date, Date).self)
        return PolicyRecord(name: name, config: config, paused: paused, createdAt: created, updatedAt: updated)
    }
}

extension PolicyCatalog {
    /// A policy file: `{"name": ..., "config": {...}}` or an array of them.
    ///
    /// Only the shape is checked client-side; the file text goes to the
    /// database as it is, so numbers keep their exact value, and each config
    /// is validated by `declare_policy`.
    public struct PolicyFile: Sendable, Equatable {
        /// The file's JSON text, unchanged.
        public var json: String
        /// The policy names, in file order.
        public var names: [String]
        /// Whether the file is an array of policies (else a single object).
        public var isArray: Bool

        public init(json text: String) throws {
            // The shape is read without converting numbers: a number beyond
            // Double's range is valid JSON, and the database gives it the
            // error that names its field and bounds.
            var scanner = ContextStrings.Scanner(Array(text.utf8))
            let entries: [[(key: String, kind: ContextStrings.Scanner.Kind)]?]
            var probe = scanner
            probe.skipSpace()
            let isArray = probe.i < probe.bytes.count && probe.bytes[probe.i] == UInt8(ascii: "[")
            if isArray {
                guard let elements = scanner.arrayOfObjects(), scanner.atEnd() else { throw Self.notJSON }
                entries = elements
            } else {
                guard let members = scanner.members() else {
                    var value = ContextStrings.Scanner(Array(text.utf8))
                    if value.kindOfValue() != nil, value.atEnd() {
                        throw DispatchPolicyError(
                            code: .invalidArgument, message: "policy file must be an object {\"name\": ..., \"config\": {...}}")
                    }
                    throw Self.notJSON
                }
                guard scanner.atEnd() else { throw Self.notJSON }
                entries = [members]
            }
            guard !entries.isEmpty else {
                throw DispatchPolicyError(code: .invalidArgument, message: "policy file holds no policy")
            }
            json = text
            self.isArray = isArray
            names = try entries.enumerated().map { index, members in
                let at = isArray ? "[\(index)]" : ""
                guard let members else {
                    throw DispatchPolicyError(
                        code: .invalidArgument, message: "policy file\(at) must be an object {\"name\": ..., \"config\": {...}}")
                }
                if let unknown = members.map(\.key).sorted().first(where: { $0 != "name" && $0 != "config" }) {
                    throw DispatchPolicyError(
                        code: .invalidArgument, message: "policy file\(at).\(unknown) is not a known field (known: name, config)")
                }
                guard case .string(let name)? = members.last(where: { $0.key == "name" })?.kind else {
                    throw DispatchPolicyError(code: .invalidArgument, message: "policy file\(at).name must be a string")
                }
                guard members.last(where: { $0.key == "config" })?.kind == .object else {
                    throw DispatchPolicyError(code: .invalidArgument, message: "policy file\(at).config must be an object")
                }
                return name
            }
            // Two entries for one policy: which would win is an accident of
            // order, so neither does.
            var seen: [String: Int] = [:]
            for (index, name) in names.enumerated() {
                if let first = seen[name] {
                    throw DispatchPolicyError(
                        code: .invalidArgument,
                        message: "policy file[\(index)].name repeats \(name) of policy file[\(first)]: declare each policy once",
                        hint: "Nothing was declared.")
                }
                seen[name] = index
            }
        }

        /// Reads a policy file's bytes: they must be UTF-8, from a path or a
        /// pipe alike (a byte that is not is an error naming its offset, never
        /// stored as U+FFFD).
        public init(data: Data, source: String) throws {
            guard let text = String(validating: data, as: UTF8.self) else {
                var parser = Unicode.UTF8.ForwardParser()
                var bytes = data.makeIterator()
                var offset = 0
                decoding: while true {
                    switch parser.parseScalar(from: &bytes) {
                    case .valid(let scalar): offset += scalar.count
                    case .emptyInput, .error: break decoding
                    }
                }
                throw DispatchPolicyError(
                    code: .invalidArgument, message: "\(source) is not UTF-8 text (byte \(offset) does not begin a UTF-8 character)",
                    hint: "Save the file as UTF-8. Nothing was declared.")
            }
            try self.init(json: text)
        }

        static let notJSON = DispatchPolicyError(
            code: .invalidArgument, message: "policy file is not valid JSON (one policy object, or an array of them)")
    }

    /// Declares every policy of a file in one transaction: all or nothing.
    public static func apply(_ file: PolicyFile, on connection: PostgresConnection, logger: Logger) async throws {
        try await withServerErrors {
            try await connection.withTransaction(logger: logger) { connection in
                for (index, name) in file.names.enumerated() {
                    let json = file.json
                    let element = file.isArray ? index : -1
                    do {
                        _ = try await connection.rows(
                            """
                            SELECT dispatch_policy.declare_policy(\(name),
                                   (CASE WHEN \(element)::integer >= 0 THEN \(json)::jsonb -> \(element)::integer ELSE \(json)::jsonb END) -> 'config')
                            """,
                            logger: logger)
                    } catch {
                        var wrapped = DispatchPolicyError.from(error)
                        wrapped.message = "policy \(name): \(wrapped.message)"
                        throw wrapped
                    }
                }
            }
        }
    }
}
