import Logging
import PostgresNIO

/// Applies `Migrations/` to a database: in order, once, every pending file
/// of a run in ONE transaction (as `ALTER EXTENSION dispatch_policy UPDATE`
/// applies a release's script), under an advisory lock so that concurrent
/// migrators wait for each other, recording version and checksum in
/// `dispatch_policy.schema_migrations`.
///
/// One transaction: no session ever sees the schema between two files of a
/// release. A release's migrations keep one definition of each function, in
/// the last file that changes it, so such a state would have functions of
/// the old release calling what the new one has not created yet.
///
/// Before applying anything it checks what is recorded: an applied file whose
/// text changed since, or a recorded version this build does not have, stops
/// the run with an error instead of being silently re-run or ignored.
public struct Migrator: Sendable {
    public struct Report: Sendable, Equatable {
        /// Files applied by this run, in order.
        public var applied: [String]
        /// Files that were already applied before this run.
        public var alreadyApplied: [String]
    }

    public let migrations: [Migration]
    public let logger: Logger

    public init(migrations: [Migration] = Migration.embedded, logger: Logger = Logger(label: "dispatch-policy.migrate")) {
        self.migrations = migrations.sorted { ($0.version ?? .max, $0.fileName) < ($1.version ?? .max, $1.fileName) }
        self.logger = logger
    }

    /// The advisory-lock key every migrator takes (`hashtext('dispatch_policy.migrate')`).
    static let lockSQL: PostgresQuery = "SELECT pg_advisory_lock(hashtext('dispatch_policy.migrate'))"
    static let unlockSQL: PostgresQuery = "SELECT pg_advisory_unlock(hashtext('dispatch_policy.migrate'))"

    /// Applies every pending migration on `connection`.
    @discardableResult
    public func migrate(on connection: PostgresConnection) async throws -> Report {
        for migration in migrations where migration.version == nil {
            throw DispatchPolicyError(
                code: .invalidArgument,
                message: "migration file \(migration.fileName) is not named NNNN_name.sql")
        }
        _ = try await connection.rows(Self.lockSQL, logger: logger)
        do {
            let report = try await migrateLocked(on: connection)
            _ = try await connection.rows(Self.unlockSQL, logger: logger)
            return report
        } catch {
            // The lock is per session; release it even though this run failed.
            _ = try? await connection.rows(Self.unlockSQL, logger: logger)
            throw error
        }
    }

    private struct Recorded {
        var version: Int
        var name: String
        var checksum: String
    }

    private func migrateLocked(on connection: PostgresConnection) async throws -> Report {
        let recorded = try await recordedMigrations(on: connection)
        let byVersion = Dictionary(recorded.map { ($0.version, $0) }, uniquingKeysWith: { first, _ in first })
        let known = Set(migrations.compactMap(\.version))

        if let unknown = recorded.first(where: { !known.contains($0.version) }) {
            throw DispatchPolicyError(
                code: .migrationUnknownToThisBuild,
                message:
                    "the database has migration \(unknown.name) (version \(unknown.version)), which this build of dispatch-policy does not know",
                hint: "Run a dispatch-policy at least as new as the one that migrated this database.")
        }

        var pending: [Migration] = []
        var already: [String] = []
        for migration in migrations {
            let checksum = try await self.checksum(of: migration, on: connection)
            if let done = byVersion[migration.version!] {
                guard done.checksum == checksum else {
                    throw DispatchPolicyError(
                        code: .migrationChecksumMismatch,
                        message:
                            "migration \(migration.fileName) was changed after it was applied (recorded checksum \(done.checksum.prefix(12))…, file \(checksum.prefix(12))…)",
                        hint: "Applied migrations must not be edited: restore the file and add a new migration instead.")
                }
                already.append(migration.fileName)
            } else {
                pending.append(migration)
            }
        }

        guard !pending.isEmpty else { return Report(applied: [], alreadyApplied: already) }
        _ = try await connection.rows("BEGIN", logger: logger)
        do {
            for migration in pending { try await apply(migration, on: connection, of: pending.count) }
            _ = try await connection.rows("COMMIT", logger: logger)
        } catch {
            _ = try? await connection.rows("ROLLBACK", logger: logger)
            throw error
        }
        return Report(applied: pending.map(\.fileName), alreadyApplied: already)
    }

    private func recordedMigrations(on connection: PostgresConnection) async throws -> [Recorded] {
        try await withServerErrors(context: "migrate") {
            let exists = try await connection.query(
                "SELECT to_regclass('dispatch_policy.schema_migrations') IS NOT NULL, EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'dispatch_policy')",
                logger: logger
            ).collect()
            guard let (tableExists, isExtension) = try exists.first?.decode((Bool, Bool).self) else {
                throw DispatchPolicyError(code: .migrationFailed, message: "migrate: the server returned no row for the schema check")
            }
            if isExtension {
                throw DispatchPolicyError(
                    code: .schemaInstalledAsExtension,
                    message: "the dispatch_policy schema in this database was installed with CREATE EXTENSION",
                    hint: "Upgrade it with ALTER EXTENSION dispatch_policy UPDATE, or drop the extension before using migrate.")
            }
            guard tableExists else { return [] }
            var rows: [Recorded] = []
            for try await (version, name, checksum) in try await connection.query(
                "SELECT version, name, checksum FROM dispatch_policy.schema_migrations ORDER BY version",
                logger: logger
            ).decode((Int, String, String).self) {
                rows.append(Recorded(version: version, name: name, checksum: checksum))
            }
            return rows
        }
    }

    /// SHA-256 of the file text, computed by the server (no crypto dependency).
    private func checksum(of migration: Migration, on connection: PostgresConnection) async throws -> String {
        try await withServerErrors(context: "migrate") {
            let rows = try await connection.query(
                "SELECT encode(sha256(convert_to(\(migration.sql), 'UTF8')), 'hex')", logger: logger
            ).collect()
            guard let checksum = try rows.first?.decode(String.self) else {
                throw DispatchPolicyError(
                    code: .migrationFailed, message: "migrate: the server returned no checksum for \(migration.fileName)")
            }
            return checksum
        }
    }

    /// Runs one file's statements and records it, inside the run's transaction.
    private func apply(_ migration: Migration, on connection: PostgresConnection, of pending: Int) async throws {
        logger.info("applying migration", metadata: ["migration.file": "\(migration.fileName)"])
        let statements = migration.statements
        var index = 0
        do {
            for statement in statements {
                _ = try await connection.rows(PostgresQuery(unsafeSQL: statement), logger: logger)
                index += 1
            }
            _ = try await connection.rows(
                """
                INSERT INTO dispatch_policy.schema_migrations (version, name, checksum)
                VALUES (\(migration.version!), \(migration.fileName), encode(sha256(convert_to(\(migration.sql), 'UTF8')), 'hex'))
                """,
                logger: logger)
        } catch {
            let location =
                index < statements.count
                ? " at statement \(index + 1) of \(statements.count): \(statements[index].prefix(80).split(separator: "\n").first ?? "")"
                : ""
            var wrapped = DispatchPolicyError.from(error)
            wrapped.code = .migrationFailed
            wrapped.message = "migration \(migration.fileName) failed\(location): \(wrapped.message)"
            wrapped.hint =
                wrapped.hint
                ?? (pending == 1
                    ? "Nothing of \(migration.fileName) was applied."
                    : "Nothing of this run's \(pending) migrations was applied: they apply together, in one transaction.")
            throw wrapped
        }
    }
}
