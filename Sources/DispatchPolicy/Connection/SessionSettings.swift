/// Server settings for the sessions a runner or worker opens, sent with the
/// connection's startup packet (no extra round trip).
///
/// They bound what a session can hold when its client is gone or stuck:
/// * `connectionCheckInterval` (`client_connection_check_interval`): while a
///   statement runs, the server checks this often that the client is still
///   there, and ends the statement when it is not, so a runner killed during
///   a slow `sql` target gives its policy lock back within seconds instead of
///   when the target returns;
/// * `idleInTransactionTimeout` (`idle_in_transaction_session_timeout`): a
///   session left idle inside a transaction this long is ended, releasing
///   its row locks;
/// * `statementTimeout` (`statement_timeout`): the longest one statement may
///   run (a tick sets its own, `TickSettings.timeout`, for its transaction).
///
/// nil leaves the server's setting. Each is whole milliseconds, at most
/// 24 hours.
public struct SessionSettings: Sendable, Equatable {
    public var statementTimeout: Duration?
    public var idleInTransactionTimeout: Duration?
    public var connectionCheckInterval: Duration?

    public init(statementTimeout: Duration? = nil, idleInTransactionTimeout: Duration? = nil, connectionCheckInterval: Duration? = nil) {
        self.statementTimeout = statementTimeout
        self.idleInTransactionTimeout = idleInTransactionTimeout
        self.connectionCheckInterval = connectionCheckInterval
    }

    /// The runner's defaults: statements up to 5 minutes (maintenance over a
    /// long history), a transaction idle for a minute ended, the client
    /// checked every 2 s.
    public static let runner = SessionSettings(
        statementTimeout: .seconds(300), idleInTransactionTimeout: .seconds(60), connectionCheckInterval: .seconds(2))

    /// The worker's defaults: its calls are short (30 s), the rest as the runner.
    public static let worker = SessionSettings(
        statementTimeout: .seconds(30), idleInTransactionTimeout: .seconds(60), connectionCheckInterval: .seconds(2))

    /// The admin UI and `/metrics`: every page's queries are read-only and
    /// short; one that takes longer than 10 s is cancelled by the server.
    public static let admin = SessionSettings(
        statementTimeout: .seconds(10), idleInTransactionTimeout: .seconds(30), connectionCheckInterval: .seconds(2))

    /// The startup parameters, in milliseconds (0 turns a setting off).
    public var parameters: [(String, String)] {
        [
            ("statement_timeout", statementTimeout), ("idle_in_transaction_session_timeout", idleInTransactionTimeout),
            ("client_connection_check_interval", connectionCheckInterval),
        ]
        .compactMap { name, value in value.map { (name, String($0.settingMilliseconds)) } }
    }
}

extension Duration {
    /// Whole milliseconds within [0, 24 h], as a server setting takes them
    /// (`statement_timeout`, `lock_timeout`, ...): never traps.
    var settingMilliseconds: Int64 {
        let (seconds, attoseconds) = components
        guard seconds >= 0 else { return 0 }
        guard seconds < 86_400 else { return 86_400_000 }
        return seconds * 1000 + attoseconds / 1_000_000_000_000_000
    }
}

extension Duration {
    /// `seconds` rounded up to whole milliseconds within [0, 24 h] (a server
    /// answer, a computed wait): never traps, NaN is 0.
    static func clamped(seconds: Double) -> Duration {
        let ms = (seconds * 1000).rounded(.up)
        guard ms > 0 else { return .zero }
        return .milliseconds(Int64(min(ms, 86_400_000)))
    }
}

extension ConnectionSettings {
    /// These settings, with `session` sent at startup on every connection.
    public func with(session: SessionSettings) -> ConnectionSettings {
        var copy = self
        copy.session = session
        return copy
    }
}
