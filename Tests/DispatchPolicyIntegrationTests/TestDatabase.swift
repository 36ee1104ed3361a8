import DispatchPolicy
import EmbeddedPostgres
import Foundation
import Logging
import PostgresNIO
import Testing

/// The PostgreSQL server the integration tests use: the one `DATABASE_URL`
/// names, or a private cluster started once per test process (and stopped by
/// its watchdog when the process ends).
///
/// Every test gets its own database, cloned from a template that was migrated
/// once, so tests run in parallel without seeing each other's rows.
actor TestServer {
    static let shared = TestServer()

    struct Server: Sendable {
        /// Settings for the maintenance database (`postgres`).
        var admin: ConnectionSettings
        var cluster: EmbeddedPostgres?
    }

    static let logger: Logger = {
        var logger = Logger(label: "dispatch-policy.tests")
        logger.logLevel = .warning
        return logger
    }()

    private var server: Task<Server, any Error>?
    private var template: Task<String, any Error>?
    private var counter = 0

    func get() async throws -> Server {
        if server == nil {
            server = Task {
                // Connecting is not what these tests measure: at the suite's
                // start, dozens of CREATE DATABASE at once on two cores have
                // kept a connection waiting past the default 10 s.
                func generous(_ settings: ConnectionSettings) -> ConnectionSettings {
                    var settings = settings
                    if settings.connectTimeout == nil { settings.connectTimeout = .seconds(30) }
                    return settings
                }
                if let url = ProcessInfo.processInfo.environment["DATABASE_URL"], !url.isEmpty {
                    return Server(admin: generous(try ConnectionSettings(url: url)), cluster: nil)
                }
                let cluster = try await EmbeddedPostgres.start()
                return Server(admin: generous(try ConnectionSettings(url: cluster.url())), cluster: cluster)
            }
        }
        return try await server!.value
    }

    /// Name of the migrated template database (made on first use).
    private func templateName() async throws -> String {
        if template == nil {
            template = Task {
                let server = try await get()
                let name = "dp_template_\(getpid())"
                try await Self.withConnection(server.admin) { conn in
                    _ = try await conn.rows(PostgresQuery(unsafeSQL: "DROP DATABASE IF EXISTS \(name)"), logger: Self.logger)
                    _ = try await conn.rows(PostgresQuery(unsafeSQL: "CREATE DATABASE \(name) TEMPLATE template0"), logger: Self.logger)
                }
                _ = try await Self.withConnection(server.admin.with(database: name)) { conn in
                    try await Migrator(logger: Self.logger).migrate(on: conn)
                }
                return name
            }
        }
        return try await template!.value
    }

    /// Where the PostgreSQL client programs are: the private cluster's, else
    /// the newest `/usr/lib/postgresql/*/bin`.
    func binDirectory() async throws -> String {
        if let cluster = try await get().cluster { return cluster.binDirectory }
        let versions = (try? FileManager.default.contentsOfDirectory(atPath: "/usr/lib/postgresql")) ?? []
        let newest = versions.compactMap { Int($0) }.max().map { "/usr/lib/postgresql/\($0)/bin" }
        return newest ?? "/usr/bin"
    }

    /// Creates a new database, migrated unless `migrated` is false.
    func freshDatabase(migrated: Bool = true) async throws -> ConnectionSettings {
        let server = try await get()
        let source = migrated ? try await templateName() : "template0"
        counter += 1
        let name = "dp_test_\(getpid())_\(counter)"
        try await Self.withConnection(server.admin) { conn in
            _ = try await conn.rows(PostgresQuery(unsafeSQL: "CREATE DATABASE \(name) TEMPLATE \(source)"), logger: Self.logger)
        }
        return server.admin.with(database: name)
    }

    static func withConnection<T: Sendable>(
        _ settings: ConnectionSettings, _ body: (PostgresConnection) async throws -> T
    ) async throws -> T {
        try await settings.withConnection(logger: logger) { try await body($0) }
    }
}

/// Runs `body` with a connection to a new, migrated database.
func withTestDatabase<T: Sendable>(
    migrated: Bool = true,
    _ body: (PostgresConnection, ConnectionSettings) async throws -> T
) async throws -> T {
    let settings = try await TestServer.shared.freshDatabase(migrated: migrated)
    return try await TestServer.withConnection(settings) { try await body($0, settings) }
}

extension PostgresConnection {
    /// The single value of a one-row, one-column query.
    func scalar<T: PostgresDecodable>(_ query: PostgresQuery, as type: T.Type = T.self) async throws -> T {
        let rows = try await self.rows(query, logger: TestServer.logger)
        return try #require(rows.first).decode(T.self)
    }

    func exec(_ query: PostgresQuery) async throws {
        _ = try await self.rows(query, logger: TestServer.logger)
    }
}

/// Polls `condition` every 50 ms for up to `seconds`; whether it became true.
@discardableResult
func waitUntil(_ seconds: Int = 60, _ condition: () async throws -> Bool) async throws -> Bool {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try await Task.sleep(for: .milliseconds(50))
    }
    return false
}

/// Sessions of the current database, other than this one, waiting for the
/// advisory lock `key` (one bigint key, as `pg_advisory_lock(key)` takes it).
func advisoryLockWaiters(_ conn: PostgresConnection, key: Int64) async throws -> Int {
    try await conn.scalar(
        """
        SELECT count(*)::int FROM pg_locks
        WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1 AND pid <> pg_backend_pid()
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND ((classid::bigint << 32) | objid::bigint) = \(key)
        """, as: Int.self)
}

/// Runs `racers` tasks that provably race: a session of the test holds the
/// advisory lock `key` while every racer's first statement waits for it
/// (each racer must take it, for example `pg_advisory_lock_shared(key)` or
/// `pg_advisory_xact_lock_shared(key)`, before the work that races). Once
/// all of them wait, the lock is released and they start at once. Results
/// in racer order.
func raceFromOneStart<T: Sendable>(
    _ settings: ConnectionSettings, racers: Int, key: Int64 = 7_340_001,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ racer: @escaping @Sendable (_ index: Int) async throws -> T
) async throws -> [T] {
    try await TestServer.withConnection(settings) { gate in
        try await gate.exec("SELECT pg_advisory_lock(\(key))")
        return try await withThrowingTaskGroup(of: (Int, T).self) { group in
            for index in 0..<racers {
                group.addTask { (index, try await racer(index)) }
            }
            let waiting: Bool
            do {
                waiting = try await waitUntil(30) { try await advisoryLockWaiters(gate, key: key) == racers }
            } catch {
                try? await gate.exec("SELECT pg_advisory_unlock(\(key))")
                throw error
            }
            // Let go whatever happened, or the racers would wait for good.
            try await gate.exec("SELECT pg_advisory_unlock(\(key))")
            #expect(waiting, "not all \(racers) racers reached the start line", sourceLocation: sourceLocation)
            var results: [(Int, T)] = []
            for try await result in group { results.append(result) }
            return results.sorted { $0.0 < $1.0 }.map(\.1)
        }
    }
}

/// Expects `body` to fail with a database error of `sqlState` whose message
/// contains `message`; returns the error for further checks.
@discardableResult
func expectSQLError(
    _ sqlState: String, _ message: String,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () async throws -> Void
) async -> DispatchPolicyError? {
    do {
        try await body()
        Issue.record("expected SQLSTATE \(sqlState) (\(message)), but it succeeded", sourceLocation: sourceLocation)
        return nil
    } catch let error as DispatchPolicyError {
        #expect(error.sqlState == sqlState, "\(error)", sourceLocation: sourceLocation)
        #expect(error.message.contains(message), "\(error.message) should contain \(message)", sourceLocation: sourceLocation)
        return error
    } catch {
        Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// Tests that run a runner, workers or the demo for a while assert on what
/// happens in time (progress, leases, pacing). Running all of them at once
/// on a 2-core machine starves each of them; they take turns instead, while
/// the quick tests still run in parallel.
actor LiveTests {
    static let shared = LiveTests()
    private var busy = false
    private var waiting: [CheckedContinuation<Void, Never>] = []

    /// Runs `body` when no other live test runs.
    static func exclusive<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        await shared.acquire()
        do {
            let result = try await body()
            await shared.release()
            return result
        } catch {
            await shared.release()
            throw error
        }
    }

    private func acquire() async {
        if !busy {
            busy = true
            return
        }
        await withCheckedContinuation { waiting.append($0) }
    }

    private func release() {
        if waiting.isEmpty {
            busy = false
        } else {
            waiting.removeFirst().resume()
        }
    }
}
