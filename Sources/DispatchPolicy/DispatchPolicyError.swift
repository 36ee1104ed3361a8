import PostgresNIO

/// The one error type of the `DispatchPolicy` module.
///
/// Shaped like `PSQLError`: a ``Code`` you can switch on (new codes can be
/// added without breaking you), a message a person can act on, and, for errors
/// the database raised, the SQLSTATE with its detail and hint.
public struct DispatchPolicyError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: String, Sendable {
            case invalidArgument
            case invalidConnectionSettings
            case server
            case migrationChecksumMismatch
            case migrationUnknownToThisBuild
            case migrationFailed
            case schemaInstalledAsExtension
            case connectionLost
            case client
        }

        private let base: Base
        private init(_ base: Base) { self.base = base }

        /// A value passed by the caller is malformed (bad JSON, bad duration...).
        public static let invalidArgument = Self(.invalidArgument)
        /// The database URL or `PG*` variables cannot be used.
        public static let invalidConnectionSettings = Self(.invalidConnectionSettings)
        /// PostgreSQL raised an error; see ``DispatchPolicyError/sqlState``.
        public static let server = Self(.server)
        /// An applied migration file was edited afterwards.
        public static let migrationChecksumMismatch = Self(.migrationChecksumMismatch)
        /// The database has a migration this build does not know (it is newer).
        public static let migrationUnknownToThisBuild = Self(.migrationUnknownToThisBuild)
        /// A migration statement failed; nothing of that file was applied.
        public static let migrationFailed = Self(.migrationFailed)
        /// The schema was installed with `CREATE EXTENSION`; upgrade it with `ALTER EXTENSION`.
        public static let schemaInstalledAsExtension = Self(.schemaInstalledAsExtension)

        /// The database session ended, or a call on it did not return in time
        /// (the connection was then closed); a ``ManagedConnection`` reconnects
        /// on its next call.
        public static let connectionLost = Self(.connectionLost)

        /// The client failed without an answer from the server: a connection
        /// that could not be made, a TLS handshake, a protocol error. See
        /// ``DispatchPolicyError/underlying``.
        public static let client = Self(.client)

        public var description: String { base.rawValue }
    }

    public var code: Code
    /// What went wrong, in words a user can act on.
    public var message: String
    /// The SQLSTATE PostgreSQL reported, for ``Code/server`` and ``Code/migrationFailed``.
    public var sqlState: String?
    /// Staging was refused because the job's partition already holds
    /// `max_pending_per_partition` staged jobs (`on_overflow` `reject`,
    /// SQLSTATE `DP002`); nothing was staged.
    public var isBacklogFull: Bool { sqlState == "DP002" }
    public var detail: String?
    public var hint: String?
    /// The error this one was made from (a `PSQLError`, a TLS error...), when there was one.
    public var underlying: (any Error)?

    public init(
        code: Code, message: String, sqlState: String? = nil, detail: String? = nil, hint: String? = nil, underlying: (any Error)? = nil
    ) {
        self.underlying = underlying
        self.code = code
        self.message = message
        self.sqlState = sqlState
        self.detail = detail
        self.hint = hint
    }

    /// One line: the message, then the SQLSTATE when there is one. Control
    /// characters (a newline, an escape sequence from a raised error) are
    /// shown escaped, so the line cannot break or forge another.
    public var description: String {
        var line = message
        if let detail { line += " — \(detail)" }
        if let sqlState { line += " (SQLSTATE \(sqlState))" }
        return Self.oneLine(line)
    }

    /// `text` with every control character written as `\u{…}` (`\n` for a
    /// newline): C0, DEL and C1 controls (U+0085 NEL, U+009B CSI), the line
    /// and paragraph separators, and the bidirectional controls that reorder
    /// what a terminal shows.
    public static func oneLine(_ text: String) -> String {
        guard text.unicodeScalars.contains(where: needsEscape) else { return text }
        var out = String.UnicodeScalarView()
        for scalar in text.unicodeScalars {
            if scalar == "\n" {
                out.append(contentsOf: "\\n".unicodeScalars)
            } else if needsEscape(scalar) {
                out.append(contentsOf: "\\u{\(String(scalar.value, radix: 16))}".unicodeScalars)
            } else {
                out.append(scalar)
            }
        }
        return String(out)
    }

    static func needsEscape(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0..<0x20, 0x7F...0x9F, 0x2028, 0x2029, 0x200E, 0x200F, 0x202A...0x202E, 0x2066...0x2069, 0x061C: true
        default: false
        }
    }
}

extension DispatchPolicyError {
    /// Converts a postgres-nio error into a ``DispatchPolicyError``, keeping
    /// the server's SQLSTATE, message, detail and hint.
    public static func from(_ error: any Error, code: Code = .server, context: String? = nil) -> DispatchPolicyError {
        if let error = error as? DispatchPolicyError { return error }
        if let error = error as? PostgresTransactionError {
            return from(
                error.closureError ?? error.commitError ?? error.beginError ?? error.rollbackError ?? error,
                code: code, context: context)
        }
        let prefix = context.map { "\($0): " } ?? ""
        if let psql = error as? PSQLError {
            if let info = psql.serverInfo {
                return DispatchPolicyError(
                    code: code,
                    message: prefix + (info[.message] ?? "server error"),
                    sqlState: info[.sqlState],
                    detail: info[.detail],
                    hint: info[.hint],
                    underlying: error
                )
            }
            // Not the server's: the client's side of the connection failed.
            return DispatchPolicyError(
                code: code == .server ? .client : code, message: prefix + "\(psql.code)" + (psql.underlying.map { ": \($0)" } ?? ""),
                underlying: error)
        }
        return DispatchPolicyError(code: code == .server ? .client : code, message: prefix + String(describing: error), underlying: error)
    }
}

/// Runs `body`, turning postgres-nio errors into ``DispatchPolicyError``s.
@discardableResult
func withServerErrors<T>(
    context: String? = nil,
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> sending T
) async throws -> sending T {
    do {
        return try await body()
    } catch {
        throw DispatchPolicyError.from(error, context: context)
    }
}
