import Logging
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// A pool of sessions on the host that `target_session_attrs` picks among
/// several, which moves when that host stops being the right one (a
/// failover).
///
/// A `PostgresClient` connects to the one host it was made for. This holds
/// one for the host ``ConnectionSettings/settle(logger:)`` picks, checks
/// every ``checkInterval`` that its sessions are still what the settings
/// ask for (writable for `read-write`, in recovery for `standby`, ...), and
/// checks at once when a call fails because its session ended or was
/// read-only. When another host is the right one now, it starts a pool there
/// and stops the old one (calls still on it fail, as they would have on the
/// old host). With one host, or `target_session_attrs=any`, it is a plain
/// pool that never moves.
///
/// Make it with ``settle(_:maximumConnections:checkInterval:logger:)`` and
/// run it as a `Service` (or `run()` in a task) before using it.
public final class FailoverClient: ConnectionPool, Service, Sendable {
    public let settings: ConnectionSettings
    /// How often the sessions are checked against `target_session_attrs`.
    public let checkInterval: Duration
    private let maximumConnections: Int
    private let logger: Logger

    private struct State {
        var client: PostgresClient
        var endpoint: ConnectionSettings.Endpoint
        /// Set by a call that failed the way a failover makes calls fail.
        var suspect = false
        var moves = 0
    }
    private let state: Mutex<State>
    private let wake = WakeSignal()

    private init(
        settings: ConnectionSettings, endpoint: ConnectionSettings.Endpoint, maximumConnections: Int,
        checkInterval: Duration, logger: Logger
    ) throws {
        self.settings = settings
        self.maximumConnections = maximumConnections
        self.checkInterval = checkInterval
        self.logger = logger
        let client = PostgresClient(
            configuration: try settings.clientConfiguration(maximumConnections: maximumConnections, endpoint: endpoint),
            backgroundLogger: logger)
        self.state = Mutex(State(client: client, endpoint: endpoint))
    }

    /// A pool on the host `target_session_attrs` picks now (connecting to
    /// find it when the settings list several hosts).
    public static func settle(
        _ settings: ConnectionSettings, maximumConnections: Int = 4, checkInterval: Duration = .seconds(10), logger: Logger
    ) async throws -> FailoverClient {
        try FailoverClient(
            settings: settings, endpoint: try await settings.settle(logger: logger), maximumConnections: maximumConnections,
            checkInterval: checkInterval, logger: logger)
    }

    /// The host the pool is on now.
    public var endpoint: ConnectionSettings.Endpoint { state.withLock { $0.endpoint } }
    /// How many times it moved to another host.
    public var moves: Int { state.withLock { $0.moves } }

    /// Whether it can ever move: several hosts, and a choice among them.
    private var follows: Bool { settings.hosts.count > 1 && settings.targetSessionAttributes != .any }

    public func run(_ query: PostgresQuery, logger: Logger) async throws -> PostgresRowSequence {
        let client = state.withLock { $0.client }
        do {
            return try await client.query(query, logger: logger)
        } catch {
            noteFailure(error)
            throw error
        }
    }

    public func withSession<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        let client = state.withLock { $0.client }
        do {
            return try await client.withSession(body)
        } catch {
            noteFailure(error)
            throw error
        }
    }

    /// A call that failed as calls fail after a failover (the session ended,
    /// it is read-only, no connection) makes the next check come now.
    private func noteFailure(_ error: any Error) {
        guard follows else { return }
        let wrapped = DispatchPolicyError.from(error)
        let sessionFault =
            ManagedConnection.endsSession(error) || ManagedConnection.needsNewSession(error)
            || wrapped.code == .connectionLost || wrapped.code == .client || (error as? PSQLError).map { $0.serverInfo == nil } == true
        guard sessionFault else { return }
        state.withLock { $0.suspect = true }
        Task { await wake.signal() }
    }

    /// Runs the pool, and moves it when its host stops being the right one,
    /// until graceful shutdown or cancellation.
    public func run() async throws {
        var running: [Task<Void, Never>] = []
        let first = state.withLock { $0.client }
        running.append(Task { await first.run() })
        defer { for task in running { task.cancel() } }
        await withGracefulShutdownHandler {
            while !Task.isCancelled && !Task.isShuttingDownGracefully {
                let suspect = state.withLock { $0.suspect }
                if !suspect { await wake.wait(upTo: checkInterval) }
                if Task.isCancelled || Task.isShuttingDownGracefully { break }
                guard follows else { continue }
                state.withLock { $0.suspect = false }
                if let moved = await check() {
                    running.append(Task { await moved.run() })
                    // The old pool's task is the one before: stop it.
                    if running.count >= 2 { running[running.count - 2].cancel() }
                }
                // Not in a loop: at most one check a second, whatever fails.
                try? await Task.sleep(for: .seconds(1))
            }
        } onGracefulShutdown: {
            Task { await self.wake.signal() }
        }
    }

    /// Checks the current pool's sessions; when they are not what the
    /// settings ask for, or cannot be had, finds the right host again and,
    /// when it is another, returns a new pool there (already current).
    private func check() async -> PostgresClient? {
        let (client, endpoint) = state.withLock { ($0.client, $0.endpoint) }
        let wanted = settings.targetSessionAttributes
        let logger = logger
        let verdict: String?
        do {
            verdict =
                try await untilDeadline(.now + settings.perHostTimeout) {
                    try await client.withConnection { conn in
                        try await ConnectionSettings.mismatch(conn, wanted: wanted, logger: logger)
                    }
                } ?? "no session within \(settings.perHostTimeout)"
        } catch {
            verdict = DispatchPolicyError.from(error).description
        }
        guard let verdict else { return nil }
        let found: ConnectionSettings.Endpoint
        do {
            found = try await settings.settle(logger: logger)
        } catch {
            logger.warning(
                "the pool's host is no longer usable, and no other is",
                metadata: [
                    "connection.host": "\(endpoint)", "reason": "\(verdict)", "error": "\(error)",
                ])
            return nil
        }
        guard found != endpoint else { return nil }
        let moved: PostgresClient
        do {
            moved = PostgresClient(
                configuration: try settings.clientConfiguration(maximumConnections: maximumConnections, endpoint: found),
                backgroundLogger: logger)
        } catch {
            logger.warning("cannot make a pool for the new host", metadata: ["connection.host": "\(found)", "error": "\(error)"])
            return nil
        }
        state.withLock { state in
            state.client = moved
            state.endpoint = found
            state.moves += 1
        }
        logger.info(
            "the pool follows target_session_attrs to another host",
            metadata: [
                "connection.from": "\(endpoint)", "connection.to": "\(found)", "reason": "\(verdict)",
            ])
        return moved
    }
}
