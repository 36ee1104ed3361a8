import Foundation
import Logging
import PostgresNIO
import Synchronization

/// One database session of a runner or worker that is opened on first use
/// and replaced when it dies.
///
/// A session can end under its owner at any time: PostgreSQL restarted, the
/// backend terminated (`pg_terminate_backend`), a failover, a network that
/// drops packets. postgres-nio then marks the connection closed, but a query
/// issued on it, or in flight when it died, may never return and may ignore
/// cancellation (vapor/postgres-nio#487, #601). So every call goes through
/// ``run(_:timeout:until:_:)``: a connection found closed is replaced first, a
/// call is bounded by a deadline, and a call that fails with the connection
/// closed or does not return in time drops the connection (closing it, which
/// ends the server session and rolls its transaction back) and throws
/// ``DispatchPolicyError/Code/connectionLost``. The next call reconnects,
/// with backoff while the server cannot be reached. Each loss and each
/// reconnect is logged once, and counted (``reconnects``, ``lastLoss``) for
/// `dispatch_policy.runners`.
///
/// Sessions come from connection settings (each opened by this), or from
/// the application's pool (``init(client:role:logger:connectTimeout:)``):
/// then every call leases a connection for its own length and gives it back,
/// and a connection that died, timed out or cannot serve (read-only) is
/// closed so that the pool replaces it instead of lending it again. Only
/// ``connection()`` keeps a leased connection (LISTEN needs a session of its
/// own); calls then run on it until it is dropped.
public actor ManagedConnection {
    /// Where sessions come from.
    enum Source: Sendable {
        case settings(ConnectionSettings)
        case pool(any ConnectionPool)

        var settings: ConnectionSettings? {
            if case .settings(let settings) = self { return settings }
            return nil
        }
    }
    nonisolated let source: Source
    /// The settings sessions are opened with; nil when they are leased from
    /// the application's pool.
    public nonisolated var settings: ConnectionSettings? { source.settings }
    /// The server, in messages.
    private nonisolated var target: String {
        switch source {
        case .settings(let settings): return "\(settings)"
        case .pool: return "the application's pool"
        }
    }
    /// What this session is for, in log lines: "runner", "worker claims", ...
    public let role: String
    private let logger: Logger
    /// The longest a connection attempt may take.
    public let connectTimeout: Duration
    private let backoff: ClosedRange<Duration>

    private struct Session {
        var conn: PostgresConnection
        var watch: CloseWatch
        var isClosed: Bool { conn.isClosed }
    }
    private var current: Session?
    private var connectFailures = 0
    private var lastConnectError: String?
    /// When the next connection attempt may be made (after a failed one).
    public private(set) var retryAt: ContinuousClock.Instant?
    /// Connections opened after the first.
    public private(set) var reconnects = 0
    private var opened = 0
    private var lossRepeated = false
    /// When the current session was opened.
    public private(set) var connectedAt: Date?
    /// When and why the last session was lost.
    public private(set) var lastLoss: (at: Date, reason: String)?
    /// Called with each new connection (to watch its closeFuture, to LISTEN).
    private var onConnect: (@Sendable (PostgresConnection) -> Void)?

    public init(
        settings: ConnectionSettings, role: String, logger: Logger,
        connectTimeout: Duration = .seconds(10), backoff: ClosedRange<Duration> = .milliseconds(100) ... .seconds(5)
    ) {
        self.source = .settings(settings)
        self.role = role
        self.logger = logger
        self.connectTimeout = connectTimeout
        self.backoff = backoff
    }

    /// Sessions leased from the application's pool: each call leases one
    /// for its own length (waiting at most `connectTimeout` for it, on top of
    /// the call's timeout). The pool's owner runs it (`client.run()`, or a
    /// `ServiceGroup`) and chooses its sessions' settings.
    public init(client: any ConnectionPool, role: String, logger: Logger, connectTimeout: Duration = .seconds(10)) {
        self.source = .pool(client)
        self.role = role
        self.logger = logger
        self.connectTimeout = connectTimeout
        self.backoff = .milliseconds(100) ... .seconds(5)
    }

    init(_ source: Source, role: String, logger: Logger, connectTimeout: Duration) {
        switch source {
        case .settings(let settings): self.init(settings: settings, role: role, logger: logger, connectTimeout: connectTimeout)
        case .pool(let client): self.init(client: client, role: role, logger: logger, connectTimeout: connectTimeout)
        }
    }

    /// Calls `handler` with every connection this opens from now on.
    public func onConnect(_ handler: @escaping @Sendable (PostgresConnection) -> Void) {
        onConnect = handler
    }

    /// The live connection, opening one when there is none or it closed (or,
    /// on a pool, leasing one and keeping it until it is dropped or closed).
    /// While backing off after a failed attempt, throws at once.
    public func connection() async throws -> PostgresConnection {
        try await session().conn
    }

    /// The current session when it is open (no waiting, no connecting).
    private func liveSession() -> (conn: PostgresConnection, watch: CloseWatch)? {
        guard let current, !current.isClosed else { return nil }
        return (current.conn, current.watch)
    }

    /// The longest opening a session may take: `connectTimeout`, or more
    /// when the settings list several hosts, each of which may take its own
    /// connect_timeout (twice over TCP with sslmode allow or prefer, which
    /// try again the other way; twice over with prefer-standby).
    nonisolated var connectBound: Duration {
        guard let settings else { return connectTimeout }
        let rounds = settings.targetSessionAttributes == .preferStandby ? 2 : 1
        let attempts = settings.hosts.reduce(0) { sum, host in
            if case .tcp = host, [.allow, .prefer].contains(settings.sslMode) { return sum + 2 }
            return sum + 1
        }
        return max(connectTimeout, settings.perHostTimeout * (rounds * attempts))
    }

    /// The live connection and the watch of its closing.
    private func session() async throws -> (conn: PostgresConnection, watch: CloseWatch) {
        if let current, !current.isClosed { return (current.conn, current.watch) }
        if let current {
            self.current = nil
            lost(current.conn, reason: "the connection closed")
        }
        if let connecting { return try await settle(connecting) }
        if let retryAt, ContinuousClock.now < retryAt {
            throw DispatchPolicyError(
                code: .connectionLost, message: lastConnectError ?? "\(role): cannot connect to \(target)",
                detail: "next attempt in \(Self.describe(retryAt - .now))")
        }
        let task = Task { [source, logger, role, target] in
            // A connection that opens after the deadline is closed, not leaked.
            let late = Mutex<(abandoned: Bool, conn: PostgresConnection?)>((false, nil))
            let bound = connectBound
            let attempt: PostgresConnection? = try await untilDeadline(.now + bound) {
                let conn = try await Self.open(source, logger: logger)
                if late.withLock({ state in
                    state.conn = conn
                    return state.abandoned
                }) {
                    Self.closeUnawaited(conn)
                }
                return conn
            }
            if attempt == nil,
                let conn = late.withLock({ state in
                    state.abandoned = true
                    return state.conn
                })
            {
                Self.closeUnawaited(conn)
            }
            guard let attempt else {
                throw DispatchPolicyError(
                    code: .connectionLost, message: "\(role): cannot connect to \(target)",
                    detail: "no answer within \(Self.describe(bound))")
            }
            return attempt
        }
        attempts += 1
        let attempt = Attempt(id: attempts, task: task)
        connecting = attempt
        return try await settle(attempt)
    }

    /// Opens a session: connects with the settings, or leases a connection
    /// from the pool and keeps the lease until the connection closes (the
    /// pool then discards it and opens another when it needs one).
    private static func open(_ source: Source, logger: Logger) async throws -> PostgresConnection {
        switch source {
        case .settings(let settings):
            return try await settings.connect(logger: logger)
        case .pool(let client):
            let handOver = HandOver()
            Task {
                do {
                    try await client.withSession { conn in
                        handOver.give(.success(conn))
                        // Held until whoever has it closes it.
                        try? await conn.closeFuture.get()
                    }
                } catch {
                    handOver.give(.failure(error))
                }
            }
            return try await handOver.take()
        }
    }

    /// A connection attempt that callers may share.
    private struct Attempt {
        var id: Int
        var task: Task<PostgresConnection, any Error>
    }
    private var connecting: Attempt?
    private var attempts = 0
    /// Attempts up to this id were started before ``close(timeout:)``: a
    /// connection one of them opens afterwards is closed, not adopted.
    private var discardedAttempts = 0
    private var settled = 0
    private var lastAttemptError: DispatchPolicyError?

    /// Waits for an attempt; the first caller to see it end does the
    /// bookkeeping (adopting the connection, or backing off), every caller
    /// gets the same outcome.
    private func settle(_ attempt: Attempt) async throws -> (conn: PostgresConnection, watch: CloseWatch) {
        let result = await attempt.task.result
        if case .failure(let error) = result, error is CancellationError {
            if connecting?.id == attempt.id { connecting = nil }
            throw CancellationError()
        }
        if settled < attempt.id {
            settled = attempt.id
            if connecting?.id == attempt.id { connecting = nil }
            switch result {
            case .success(let conn) where attempt.id <= discardedAttempts:
                // Opened after close(): its owner is done with this session.
                Self.closeUnawaited(conn)
            case .success(let conn):
                let watch = CloseWatch()
                conn.closeFuture.whenComplete { _ in watch.fire() }
                current = Session(conn: conn, watch: watch)
                connectedAt = Date()
                opened += 1
                if opened > 1 { reconnects += 1 }
                if connectFailures > 0 || opened > 1 {
                    // At warning level, like the loss it ends (debug when that was not logged).
                    logger.log(
                        level: lossRepeated && connectFailures == 0 ? .debug : .info, "database connection restored",
                        metadata: [
                            "connection.role": "\(role)", "connection.failed_attempts": "\(connectFailures)",
                        ])
                }
                connectFailures = 0
                lastConnectError = nil
                retryAt = nil
                onConnect?(conn)
            case .failure(let error):
                connectFailures += 1
                let message = DispatchPolicyError.from(error).description
                let exponent = min(connectFailures - 1, 20)
                let delay = min(backoff.lowerBound * (1 << exponent), backoff.upperBound)
                retryAt = .now + delay
                if lastConnectError != message {
                    logger.warning(
                        "cannot connect to the database; retrying with backoff",
                        metadata: [
                            "connection.role": "\(role)", "error": "\(message)", "retry.in": "\(Self.describe(delay))",
                        ])
                }
                lastConnectError = message
                lastAttemptError = DispatchPolicyError(code: .connectionLost, message: message)
            }
        }
        switch result {
        case .success(let conn):
            if let current, current.conn === conn { return (conn, current.watch) }
            throw DispatchPolicyError(code: .connectionLost, message: "\(role): the database session ended as it opened")
        case .failure(let error):
            throw lastAttemptError ?? DispatchPolicyError.from(error)
        }
    }

    /// Runs `body` on the live connection, waiting for it at most `timeout`
    /// and never past `until`. A call that does not return in time, or fails
    /// because the connection closed, drops the connection and throws
    /// ``DispatchPolicyError/Code/connectionLost``; other errors pass
    /// through. Cancelling the caller ends the wait at once.
    public nonisolated func run<T: Sendable>(
        _ what: String, timeout: Duration, until hardDeadline: ContinuousClock.Instant? = nil,
        _ body: @escaping @Sendable (PostgresConnection) async throws -> T
    ) async throws -> T {
        if let hardDeadline, ContinuousClock.now >= hardDeadline {
            throw DispatchPolicyError(code: .connectionLost, message: "\(role): no time left for \(what)")
        }
        if case .pool(let client) = source, await liveSession() == nil {
            return try await runLeased(client, what, timeout: timeout, until: hardDeadline, body)
        }
        // Opening a session is bounded too (by its connect timeout, the
        // caller's deadline and cancellation): a server that accepts and
        // never answers must not hold a shutdown or a `--for` run.
        let (conn, watch): (PostgresConnection, CloseWatch)
        if let live = await liveSession() {
            (conn, watch) = live
        } else {
            var connectBy = ContinuousClock.now + connectBound
            if let hardDeadline { connectBy = min(connectBy, hardDeadline) }
            guard let opened = try await untilDeadline(connectBy, { try await self.session() }) else {
                throw DispatchPolicyError(
                    code: .connectionLost, message: "\(role): cannot connect to \(target)",
                    detail: "no answer in time for \(what)")
            }
            (conn, watch) = opened
        }
        let start = ContinuousClock.now
        var deadline = start + timeout
        if let hardDeadline { deadline = min(deadline, hardDeadline) }
        let value: T?
        do {
            // A call in flight when the session ends, or one issued on it after
            // (a ROLLBACK after the error), may never return: once the channel
            // has closed, the call has a moment to fail by itself, then is abandoned.
            var token: Int?
            defer { if let token { watch.remove(token) } }
            value = try await untilDeadline(deadline, abandon: { giveUp in token = watch.add(giveUp) }, { try await body(conn) })
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            guard conn.isClosed || Self.endsSession(error) || Self.needsNewSession(error) else { throw error }
            let reason = DispatchPolicyError.from(error).description
            await drop(conn, reason: "\(what) failed: \(reason)")
            throw DispatchPolicyError(
                code: .connectionLost, message: "\(role): the database session ended during \(what)",
                detail: reason)
        }
        guard let value else {
            let reason = "\(what) did not return within \(Self.describe(deadline - start))"
            await drop(conn, reason: reason)
            throw DispatchPolicyError(
                code: .connectionLost, message: "\(role): \(reason)",
                detail: "the connection was closed; the next call opens a new one")
        }
        return value
    }

    /// ``run(_:timeout:until:_:)`` on a connection leased from the pool for
    /// the call: the lease and the call together are bounded by
    /// `connectTimeout` plus `timeout`. A connection that died, did not
    /// answer in time or cannot serve is closed before it goes back, so the
    /// pool never lends it again, and the call throws
    /// ``DispatchPolicyError/Code/connectionLost``; so does a pool that lends
    /// nothing in time.
    private nonisolated func runLeased<T: Sendable>(
        _ client: any ConnectionPool, _ what: String, timeout: Duration, until hardDeadline: ContinuousClock.Instant?,
        _ body: @escaping @Sendable (PostgresConnection) async throws -> T
    ) async throws -> T {
        let start = ContinuousClock.now
        var deadline = start + connectTimeout + timeout
        if let hardDeadline { deadline = min(deadline, hardDeadline) }
        let leased = Mutex<PostgresConnection?>(nil)
        let value: T?
        do {
            value = try await untilDeadline(deadline) {
                try await client.withSession { conn in
                    leased.withLock { $0 = conn }
                    do {
                        return try await body(conn)
                    } catch {
                        if Self.endsSession(error) || Self.needsNewSession(error) { Self.closeUnawaited(conn) }
                        throw error
                    }
                }
            }
        } catch is CancellationError {
            // Abandoned mid-call: its answer may never come, so the pool must not get it back.
            if let conn = leased.withLock({ $0 }) { Self.closeUnawaited(conn) }
            throw CancellationError()
        } catch {
            let reason = DispatchPolicyError.from(error).description
            guard let conn = leased.withLock({ $0 }) else {
                await poolFailed(reason)
                throw DispatchPolicyError(
                    code: .connectionLost, message: "\(role): the pool lent no connection for \(what)",
                    detail: reason)
            }
            guard conn.isClosed || Self.endsSession(error) || Self.needsNewSession(error) else { throw error }
            await leaseLost(conn, reason: "\(what) failed: \(reason)")
            throw DispatchPolicyError(
                code: .connectionLost, message: "\(role): the database session ended during \(what)",
                detail: reason)
        }
        guard let value else {
            guard let conn = leased.withLock({ $0 }) else {
                let reason = "no connection within \(Self.describe(deadline - start))"
                await poolFailed(reason)
                throw DispatchPolicyError(
                    code: .connectionLost, message: "\(role): the pool lent no connection for \(what)", detail: reason,
                    hint: "The PostgresClient must be running (client.run(), or in the ServiceGroup) and able to connect.")
            }
            let reason = "\(what) did not return within \(Self.describe(deadline - start))"
            await leaseLost(conn, reason: reason)
            throw DispatchPolicyError(
                code: .connectionLost, message: "\(role): \(reason)",
                detail: "the connection was closed; the pool opens another")
        }
        await leaseServed()
        return value
    }

    /// The pool could not lend a connection: logged once per distinct reason.
    private func poolFailed(_ reason: String) {
        connectFailures += 1
        if lastConnectError != reason {
            logger.warning(
                "no connection from the application's pool; retrying",
                metadata: [
                    "connection.role": "\(role)", "error": "\(reason)",
                ])
        }
        lastConnectError = reason
    }

    /// A leased connection was lost: closed (so the pool discards it),
    /// logged and counted as a loss and a reconnect.
    private func leaseLost(_ conn: PostgresConnection, reason: String) {
        lost(conn, reason: reason)
        reconnects += 1
    }

    /// A call on a leased connection came back: the pool serves again.
    private func leaseServed() {
        if connectedAt == nil { connectedAt = Date() }
        if connectFailures > 0 {
            logger.info(
                "database connection restored",
                metadata: [
                    "connection.role": "\(role)", "connection.failed_attempts": "\(connectFailures)",
                ])
        }
        connectFailures = 0
        lastConnectError = nil
    }

    /// The wait for a call ended because its connection closed.
    struct SessionClosed: Error, CustomStringConvertible {
        var description: String { "the connection closed while the call was waiting for its answer" }
    }

    /// Whether the server ended the session with this error: an operator or
    /// a shutdown terminated it (SQLSTATE 57P01, 57P02, 57P03), or a
    /// connection exception (class 08). The connection may not be marked
    /// closed yet when the error arrives.
    static func endsSession(_ error: any Error) -> Bool {
        guard let state = DispatchPolicyError.from(error).sqlState else { return false }
        return ["57P01", "57P02", "57P03"].contains(state) || state.hasPrefix("08")
    }

    /// Whether the session can no longer do what it is for, though the
    /// server keeps it: it is read-only (25006: a standby after a failover,
    /// or `default_transaction_read_only` set when it opened). A new session
    /// may land on a writable server, or see the setting reset.
    /// A tick that could not give its session-level lock back
    /// (``Ticker/SessionUnusable``) also ends the session.
    static func needsNewSession(_ error: any Error) -> Bool {
        error is Ticker.SessionUnusable || DispatchPolicyError.from(error).sqlState == "25006"
    }

    /// Drops `conn` if it is still the current connection: closes it (without
    /// waiting: a dead channel may not answer) and logs the loss.
    public func drop(_ conn: PostgresConnection, reason: String) {
        guard let current, current.conn === conn else { return }
        self.current = nil
        lost(conn, reason: reason)
    }

    private func lost(_ conn: PostgresConnection, reason: String) {
        // The same loss again within a minute (a session that keeps landing
        // on a read-only server) is logged at debug level, not every time.
        let repeated = lastLoss.map { $0.reason == reason && Date().timeIntervalSince($0.at) < 60 } ?? false
        lastLoss = (Date(), reason)
        logger.log(
            level: repeated ? .debug : .info, "database connection lost; reconnecting",
            metadata: [
                "connection.role": "\(role)", "reason": "\(reason)",
            ])
        lossRepeated = repeated
        Self.closeUnawaited(conn)
    }

    /// Closes `conn` without waiting (a dead channel may not answer), keeping
    /// it alive until the close completes.
    static func closeUnawaited(_ conn: PostgresConnection) {
        guard !conn.isClosed else { return }
        conn.close().whenComplete { _ in withExtendedLifetime(conn) {} }
    }

    /// Records, in `dispatch_policy.processes`, that the process `name` is
    /// alive, with this session's reconnects and last loss (see
    /// `dispatch_policy.report_process`). Errors are logged and dropped: the
    /// report is for operators, never a reason to stop.
    /// `others` are the process's other sessions (LISTEN, outcomes): their
    /// reconnects are added, and the latest loss of any is reported.
    public nonisolated func reportAlive(
        name: String, kind: String, startedAt: Date, others: [ManagedConnection] = [],
        timeout: Duration = .seconds(10), until hardDeadline: ContinuousClock.Instant? = nil
    ) async {
        var (connectedAt, reconnects, loss) = await (self.connectedAt, self.reconnects, self.lastLoss)
        for other in others {
            reconnects += await other.reconnects
            if let theirs = await other.lastLoss, theirs.at > (loss?.at ?? .distantPast) { loss = theirs }
        }
        do {
            _ = try await run("reporting the process", timeout: timeout, until: hardDeadline) {
                [logger, connectedAt, reconnects, loss] conn in
                try await conn.rows(
                    """
                    SELECT dispatch_policy.report_process(\(name), \(kind), \(startedAt), \(connectedAt ?? Date()),
                                                          \(reconnects)::integer, \(loss?.at), \(loss?.reason))
                    """, logger: logger)
            }
        } catch {
            logger.debug("could not report the process", metadata: ["error": "\(error)"])
        }
    }

    /// Deletes the process's `dispatch_policy.processes` row, as a process
    /// that stops cleanly does; errors are dropped.
    public nonisolated func forgetProcess(name: String, until hardDeadline: ContinuousClock.Instant? = nil) async {
        await run("forgetting the process", timeout: .seconds(2), until: hardDeadline) { [logger] conn in
            _ = try await conn.rows("SELECT dispatch_policy.forget_process(\(name))", logger: logger)
        } ifFails: { _ in
        }
    }

    /// Closes the connection, waiting at most `timeout` for the server to
    /// acknowledge.
    /// An attempt still connecting is abandoned: the connection it opens is
    /// closed at once.
    public func close(timeout: Duration = .seconds(2)) async {
        discardedAttempts = attempts
        guard let conn = current?.conn else { return }
        current = nil
        guard !conn.isClosed else { return }
        _ = try? await untilDeadline(.now + timeout) { try await conn.close() }
    }

    static func describe(_ duration: Duration) -> String {
        DurationParser.describe(max(duration, .zero))
    }

    /// Whether a session is open now (for tests).
    var isOpen: Bool { liveSession() != nil }

    /// An owner that drops this without ``close(timeout:)`` (or a call
    /// abandoned at its deadline that outlives the owner) must not leak the
    /// server session, nor trip postgres-nio's check that a connection is
    /// closed before it is freed.
    deinit {
        if let conn = current?.conn { Self.closeUnawaited(conn) }
    }
}

/// A connection leased in one task and handed to another: the first
/// outcome given is the one taken.
private final class HandOver: Sendable {
    private struct State {
        var result: Result<PostgresConnection, any Error>?
        var taker: CheckedContinuation<PostgresConnection, any Error>?
    }
    private let state = Mutex(State())

    func give(_ result: Result<PostgresConnection, any Error>) {
        let taker: CheckedContinuation<PostgresConnection, any Error>? = state.withLock { state in
            guard state.result == nil else { return nil }
            state.result = result
            defer { state.taker = nil }
            return state.taker
        }
        taker?.resume(with: result)
    }

    func take() async throws -> PostgresConnection {
        try await withCheckedThrowingContinuation { taker in
            let ready: Result<PostgresConnection, any Error>? = state.withLock { state in
                if let result = state.result { return result }
                state.taker = taker
                return nil
            }
            if let ready { taker.resume(with: ready) }
        }
    }
}

/// Ends the waits of the calls on one connection when it closes: a call
/// then has a moment (200 ms) to fail by itself, then is abandoned.
final class CloseWatch: Sendable {
    private struct State {
        var closed = false
        var next = 0
        var waiters: [Int: @Sendable (any Error) -> Void] = [:]
    }
    private let state = Mutex(State())

    /// Registers a call's give-up; returns its token for `remove`.
    func add(_ giveUp: @escaping @Sendable (any Error) -> Void) -> Int {
        let (token, closed) = state.withLock { state in
            state.next += 1
            state.waiters[state.next] = giveUp
            return (state.next, state.closed)
        }
        if closed { fire() }
        return token
    }

    func remove(_ token: Int) {
        _ = state.withLock { $0.waiters.removeValue(forKey: token) }
    }

    func fire() {
        state.withLock { $0.closed = true }
        Task {
            try? await Task.sleep(for: .milliseconds(200))
            let waiters = state.withLock { state in
                defer { state.waiters = [:] }
                return Array(state.waiters.values)
            }
            for giveUp in waiters { giveUp(ManagedConnection.SessionClosed()) }
        }
    }
}

extension ManagedConnection {
    /// ``run(_:timeout:until:_:)`` for bookkeeping whose failure must not
    /// stop the caller: an error goes to `ifFails`, cancellation included.
    nonisolated func run(
        _ what: String, timeout: Duration, until hardDeadline: ContinuousClock.Instant?,
        _ body: @escaping @Sendable (PostgresConnection) async throws -> Void, ifFails: (any Error) -> Void
    ) async {
        do { try await run(what, timeout: timeout, until: hardDeadline, body) } catch { ifFails(error) }
    }
}
