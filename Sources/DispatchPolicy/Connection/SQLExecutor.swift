import Logging
import PostgresNIO

/// Something that runs a query: a `PostgresConnection` or a pooled
/// `PostgresClient`. The SQL-access types of this module take either.
public protocol SQLExecutor: Sendable {
    func run(_ query: PostgresQuery, logger: Logger) async throws -> PostgresRowSequence
}

extension PostgresConnection: SQLExecutor {
    public func run(_ query: PostgresQuery, logger: Logger) async throws -> PostgresRowSequence {
        try await self.query(query, logger: logger)
    }
}

extension PostgresClient: SQLExecutor {
    public func run(_ query: PostgresQuery, logger: Logger) async throws -> PostgresRowSequence {
        try await self.query(query, logger: logger)
    }
}

extension SQLExecutor {
    /// Runs `query` and collects its rows, as ``DispatchPolicyError``s on failure.
    ///
    /// Always drain a result: PostgreSQL reports an error raised while
    /// producing rows (a function's RAISE) after the row description, so a
    /// result that is not read hides the error, and a later COMMIT then quietly
    /// rolls back.
    public func rows(_ query: PostgresQuery, logger: Logger) async throws -> [PostgresRow] {
        try await withServerErrors {
            try await self.run(query, logger: logger).collect()
        }
    }
}
