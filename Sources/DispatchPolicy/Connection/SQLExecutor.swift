import Logging
import PostgresNIO

/// Something that runs a query: a `PostgresConnection` or a pooled
/// `PostgresClient`. The SQL-access types of this module take either.
public protocol SQLExecutor: Sendable {
    func run(_ query: PostgresQuery, logger: Logger) async throws -> PostgresRowSequence
    /// Runs `body` on one session throughout (what needs a session-level
    /// lock, such as a tick): the connection itself, or one leased from the
    /// pool for the call.
    func withSession<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T
}

extension PostgresConnection: SQLExecutor {
    public func run(_ query: PostgresQuery, logger: Logger) async throws -> PostgresRowSequence {
        try await self.query(query, logger: logger)
    }

    public func withSession<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        try await body(self)
    }
}

/// A pool of sessions that lends one per call: a `PostgresClient`, or a
/// ``FailoverClient``. ``TickRunner``, ``Worker`` and ``ManagedConnection``
/// take either.
public protocol ConnectionPool: SQLExecutor {}

extension PostgresClient: ConnectionPool {}

extension PostgresClient: SQLExecutor {
    public func run(_ query: PostgresQuery, logger: Logger) async throws -> PostgresRowSequence {
        try await self.query(query, logger: logger)
    }

    /// A session that could not give a tick's lock back is closed, never
    /// returned to the pool holding it.
    public func withSession<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        try await withConnection { conn in
            do {
                return try await body(conn)
            } catch let error as Ticker.SessionUnusable {
                try? await conn.close()
                throw error
            }
        }
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
