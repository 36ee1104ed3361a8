import Foundation
import NIOSSL
import PostgresNIO
import Synchronization

/// Where and how to connect, resolved the way libpq resolves a connection
/// string: a URL or keyword/value string, then the service it names
/// (`pg_service.conf`), then the `PG*` variables, then libpq's defaults; the
/// password from `.pgpass` when none is given. Parsing needs no network and
/// is unit-tested; files are read through ``FileAccess`` so tests can supply
/// them.
public struct ConnectionSettings: Sendable, Equatable, CustomStringConvertible {
    public enum Endpoint: Sendable, Equatable, CustomStringConvertible {
        case tcp(host: String, port: Int)
        /// The socket file itself, such as `/var/run/postgresql/.s.PGSQL.5432`.
        case unixSocket(path: String)

        public var description: String {
            switch self {
            case .tcp(let host, let port): "\(host.contains(":") ? "[\(host)]" : host):\(port)"
            case .unixSocket(let path): path
            }
        }

        /// The host and port as libpq names them (`.pgpass` lines, errors).
        var hostAndPort: (host: String, port: String) {
            switch self {
            case .tcp(let host, let port): return (host, String(port))
            case .unixSocket(let path):
                guard let range = path.range(of: "/.s.PGSQL.", options: .backwards) else { return (path, "5432") }
                return (String(path[..<range.lowerBound]), String(path[range.upperBound...]))
            }
        }
    }

    /// libpq's `sslmode`.
    public enum SSLMode: String, Sendable, Equatable, CaseIterable {
        /// No TLS.
        case disable
        /// Plain first; TLS when the server refuses a plain session. No verification.
        case allow
        /// TLS when the server offers it, plain when not (or when it refuses
        /// the TLS session). No verification.
        case prefer
        /// TLS or nothing. No verification, unless a root certificate is
        /// there (`sslrootcert`, or `~/.postgresql/root.crt`): then as `verify-ca`.
        case require
        /// TLS, the server's certificate signed by the root certificate.
        case verifyCA = "verify-ca"
        /// As `verify-ca`, and the certificate names the host.
        case verifyFull = "verify-full"
    }

    /// libpq's `target_session_attrs`: which of several hosts to settle on.
    public enum TargetSessionAttributes: String, Sendable, Equatable, CaseIterable {
        case any
        /// A session that can write (`transaction_read_only` off): the primary.
        case readWrite = "read-write"
        case readOnly = "read-only"
        /// A server not in recovery.
        case primary
        /// A server in recovery.
        case standby
        /// A standby when one answers, else any.
        case preferStandby = "prefer-standby"
    }

    /// The hosts to try, in order; at least one.
    public var hosts: [Endpoint]
    public var username: String
    /// The password given (URL, `password=`, `PGPASSWORD`); when nil, the
    /// password file is read for each host as it is tried.
    public var password: String?
    public var database: String
    public var sslMode: SSLMode
    /// `sslrootcert`: a PEM file of trusted roots, or `system` for the
    /// operating system's. Default `~/.postgresql/root.crt` when that exists.
    public var sslRootCert: String?
    /// `sslcert` and `sslkey`: a client certificate and its key (PEM).
    /// Default `~/.postgresql/postgresql.crt` and `.key` when they exist.
    public var sslCert: String?
    public var sslKey: String?
    /// `application_name`, shown in `pg_stat_activity`.
    public var applicationName: String?
    /// Used when no `application_name` is given (the CLI's is
    /// `dispatch-policy COMMAND`).
    public var fallbackApplicationName: String?
    /// `connect_timeout`: the longest one host's connection attempt may take
    /// (libpq's minimum, 2 s, applies). nil: 10 s.
    public var connectTimeout: Duration?
    public var targetSessionAttributes: TargetSessionAttributes
    /// `options`: command-line options for the server (`-c name=value`).
    public var options: String?
    /// The password file (`passfile`, `PGPASSFILE`, `~/.pgpass`).
    public var passfile: String?
    /// The home directory the `~/.postgresql/` defaults are read from.
    public var homeDirectory: String?
    /// Server settings sent with every connection's startup (none by default).
    public var session = SessionSettings()
    /// How files (password, service, certificates) are read.
    public var files = FileAccess.system

    public static func == (a: ConnectionSettings, b: ConnectionSettings) -> Bool {
        a.hosts == b.hosts && a.username == b.username && a.password == b.password && a.database == b.database
            && a.sslMode == b.sslMode && a.sslRootCert == b.sslRootCert && a.sslCert == b.sslCert && a.sslKey == b.sslKey
            && a.applicationName == b.applicationName && a.fallbackApplicationName == b.fallbackApplicationName
            && a.connectTimeout == b.connectTimeout && a.targetSessionAttributes == b.targetSessionAttributes
            && a.options == b.options && a.passfile == b.passfile && a.homeDirectory == b.homeDirectory && a.session == b.session
    }

    public init(
        endpoint: Endpoint, username: String, password: String? = nil, database: String? = nil, sslMode: SSLMode = .prefer
    ) {
        self.hosts = [endpoint]
        self.username = username
        self.password = password
        self.database = database ?? username
        self.sslMode = sslMode
        self.targetSessionAttributes = .any
    }

    /// The first host (all of them, when set).
    public var endpoint: Endpoint {
        get { hosts[0] }
        set { hosts = [newValue] }
    }

    /// The settings the CLI and the library use: `url` if given, else
    /// `DATABASE_URL`, else the `PG*` variables alone. `url` may be a URL or
    /// a keyword/value string, as psql takes.
    public static func resolve(
        url: String?, environment: [String: String] = ProcessInfo.processInfo.environment,
        fallbackApplicationName: String? = nil, files: FileAccess = .system
    ) throws -> ConnectionSettings {
        let text = [url, environment["DATABASE_URL"]].compactMap { $0 }.first { !$0.isEmpty } ?? ""
        var settings = try ConnectionSettings(conninfo: text, environment: environment, files: files)
        settings.fallbackApplicationName = fallbackApplicationName
        return settings
    }

    /// From the `PG*` variables alone; unset ones take libpq's defaults.
    public init(environment: [String: String]) throws {
        try self.init(conninfo: "", environment: environment)
    }

    /// From a URL (`postgres://user:password@host:port,host2:port2/database?sslmode=...`).
    /// Parts the URL leaves out fall back to the service it names, then `PG*`.
    public init(url: String, environment: [String: String] = [:]) throws {
        try self.init(conninfo: url.isEmpty ? "postgres://" : url, environment: environment)
    }

    /// From a URL or a keyword/value string, as libpq resolves it.
    public init(conninfo: String, environment: [String: String], files: FileAccess = .system) throws {
        func refuse(_ message: String, detail: String? = nil) -> DispatchPolicyError {
            DispatchPolicyError(code: .invalidConnectionSettings, message: message, detail: detail)
        }
        var given: [String: String]
        do {
            given = try ConnInfo.parse(conninfo)
        } catch {
            throw refuse(error.message, detail: conninfo.isEmpty ? nil : "got \(ConnInfo.redact(conninfo))")
        }
        for (name, value) in given where !ConnInfo.keywords.contains(name) {
            guard let allowed = ConnInfo.ignored[name] else {
                throw refuse(
                    "unknown connection option \"\(name)\"",
                    detail: "dispatch-policy takes \(ConnInfo.keywords.sorted().joined(separator: ", "))")
            }
            if let allowed, !allowed.contains(value) {
                throw refuse(
                    "connection option \(name)=\(value) is not supported", detail: "accepted: \(allowed.sorted().joined(separator: ", "))")
            }
            given[name] = nil
        }
        let home = environment["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? files.homeDirectory()
        // The service: its keywords fill what the string left out.
        if let name = given["service"] ?? environment["PGSERVICE"].flatMap({ $0.isEmpty ? nil : $0 }) {
            let userFile = environment["PGSERVICEFILE"] ?? home.map { "\($0)/.pg_service.conf" }
            let systemFile = "\(environment["PGSYSCONFDIR"] ?? Self.defaultSysconfDirectory)/pg_service.conf"
            var found: [String: String]?
            for path in [userFile, systemFile].compactMap({ $0 }) {
                guard let text = files.read(path) else { continue }
                do { found = try ConnInfo.service(name, in: text) } catch { throw refuse("\(path): \(error.message)") }
                if found != nil { break }
            }
            guard let found else {
                throw refuse(
                    "definition of service \"\(name)\" not found",
                    detail: "looked in \([userFile, systemFile].compactMap { $0 }.joined(separator: " and "))")
            }
            for (key, value) in found where given[key] == nil {
                guard ConnInfo.keywords.contains(key) || ConnInfo.ignored[key] != nil else {
                    throw refuse("unknown connection option \"\(key)\" in service \"\(name)\"")
                }
                if ConnInfo.keywords.contains(key) { given[key] = value }
            }
        }
        for (keyword, variable) in ConnInfo.environmentNames where given[keyword] == nil {
            if let value = environment[variable], !value.isEmpty { given[keyword] = value }
        }
        func value(_ keyword: String) -> String? { given[keyword].flatMap { $0.isEmpty ? nil : $0 } }

        // Hosts and ports: one port for every host, or one per host.
        let hostNames = (value("host") ?? Self.defaultHost).split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let portTexts = (value("port") ?? "").split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard portTexts.count <= 1 || portTexts.count == hostNames.count else {
            throw refuse("could not match \(portTexts.count) port numbers to \(hostNames.count) hosts")
        }
        var endpoints: [Endpoint] = []
        for (index, rawHost) in hostNames.enumerated() {
            let portText = (portTexts.count == hostNames.count ? portTexts[index] : portTexts.first) ?? ""
            let effectivePort = portText.isEmpty ? "5432" : portText
            guard let port = Int(effectivePort), (1...65535).contains(port) else {
                throw refuse("port must be a number from 1 to 65535", detail: "got \(effectivePort)")
            }
            let host = rawHost.isEmpty ? Self.defaultHost : rawHost
            endpoints.append(
                host.hasPrefix("/")
                    ? .unixSocket(path: "\(host.hasSuffix("/") ? String(host.dropLast()) : host)/.s.PGSQL.\(port)")
                    : .tcp(host: host, port: port))
        }

        let modeText = value("sslmode") ?? "prefer"
        guard let mode = SSLMode(rawValue: modeText) else {
            throw refuse("sslmode must be one of \(SSLMode.allCases.map(\.rawValue).joined(separator: ", "))", detail: "got \(modeText)")
        }
        let attributesText = value("target_session_attrs") ?? "any"
        guard let attributes = TargetSessionAttributes(rawValue: attributesText) else {
            throw refuse(
                "target_session_attrs must be one of \(TargetSessionAttributes.allCases.map(\.rawValue).joined(separator: ", "))",
                detail: "got \(attributesText)")
        }
        var timeout: Duration?
        if let text = value("connect_timeout") {
            guard let seconds = Int(text.trimmingCharacters(in: .whitespaces)), seconds >= 0, seconds <= 86_400 else {
                throw refuse("connect_timeout must be whole seconds from 0 to 86400", detail: "got \(text)")
            }
            // As libpq: 0 is no limit (here: the default bound), 1 is 2.
            timeout = seconds == 0 ? nil : .seconds(max(seconds, 2))
        }
        let user =
            value("user")
            ?? environment["USER"].flatMap { $0.isEmpty ? nil : $0 }
            ?? ProcessInfo.processInfo.userName
        self.init(endpoint: endpoints[0], username: user, password: given["password"], database: value("dbname"), sslMode: mode)
        hosts = endpoints
        sslRootCert = value("sslrootcert")
        sslCert = value("sslcert")
        sslKey = value("sslkey")
        applicationName = given["application_name"]
        fallbackApplicationName = value("fallback_application_name")
        connectTimeout = timeout
        targetSessionAttributes = attributes
        options = value("options")
        passfile = value("passfile") ?? home.map { "\($0)/.pgpass" }
        homeDirectory = home
        self.files = files
    }

    /// libpq's compiled-in default host: the Unix socket directory of the
    /// platform's packages.
    public static var defaultHost: String {
        #if os(Linux)
            "/var/run/postgresql"
        #else
            "/tmp"
        #endif
    }
    static let defaultSysconfDirectory = "/etc/postgresql-common"

    /// The password for `endpoint`: the one given, else the password file's
    /// line for it. A file others can read is ignored, as libpq does.
    public func password(for endpoint: Endpoint) -> String? {
        if let password { return password }
        guard let passfile, let text = files.read(passfile) else { return nil }
        if let mode = files.permissions(passfile), mode & 0o077 != 0 { return nil }
        var (host, port) = endpoint.hostAndPort
        if host == Self.defaultHost { host = "localhost" }
        return ConnInfo.password(in: text, host: host, port: port, database: database, user: username)
    }

    /// The postgres-nio configuration for the first host, TLS as `sslMode`
    /// asks first (`allow` starts without).
    public func postgresConfiguration() throws -> PostgresConnection.Configuration {
        try postgresConfiguration(for: hosts[0], tls: initialTLS(for: hosts[0]))
    }

    /// Whether an attempt uses TLS.
    enum TLSChoice { case off, preferred, required }

    func initialTLS(for endpoint: Endpoint) -> TLSChoice {
        guard case .tcp = endpoint else { return .off }  // TLS does not apply to Unix sockets.
        switch sslMode {
        case .disable, .allow: return .off
        case .prefer: return .preferred
        case .require, .verifyCA, .verifyFull: return .required
        }
    }

    /// The startup parameters: the session's settings, `application_name`, `options`.
    var startupParameters: [(String, String)] {
        var parameters = session.parameters
        if let name = applicationName ?? fallbackApplicationName, !name.isEmpty { parameters.append(("application_name", name)) }
        if let options { parameters.append(("options", options)) }
        return parameters
    }

    func postgresConfiguration(for endpoint: Endpoint, tls choice: TLSChoice) throws -> PostgresConnection.Configuration {
        var configuration: PostgresConnection.Configuration
        let password = password(for: endpoint)
        switch endpoint {
        case .unixSocket(let path):
            configuration = .init(unixSocketPath: path, username: username, password: password, database: database)
        case .tcp(let host, let port):
            let tls: PostgresConnection.Configuration.TLS
            switch choice {
            case .off: tls = .disable
            case .preferred: tls = .prefer(try NIOSSLContext(configuration: tlsConfiguration()))
            case .required: tls = .require(try NIOSSLContext(configuration: tlsConfiguration()))
            }
            configuration = .init(host: host, port: port, username: username, password: password, database: database, tls: tls)
        }
        configuration.options.additionalStartupParameters = startupParameters
        // The whole attempt is bounded by perHostTimeout (connectBounded); the
        // TCP connect a little later, so one error says what ran out.
        configuration.options.connectTimeout = .nanoseconds(Int64((perHostTimeout + .seconds(1)).settingMilliseconds) * 1_000_000)
        return configuration
    }

    /// The longest one host's attempt may take.
    public var perHostTimeout: Duration { connectTimeout ?? .seconds(10) }

    /// The TLS configuration `sslMode` and the certificate files ask for.
    public func tlsConfiguration() throws -> TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        func refuse(_ message: String) -> DispatchPolicyError {
            DispatchPolicyError(code: .invalidConnectionSettings, message: message)
        }
        let defaultRoot = homeDirectory.map { "\($0)/.postgresql/root.crt" }
        let root = sslRootCert ?? defaultRoot.flatMap { files.exists($0) ? $0 : nil }
        var mode = sslMode
        // libpq: a root certificate that is there makes require verify the
        // chain; one that is named but missing verifies nothing.
        if mode == .require, let root, root == "system" || files.exists(root) { mode = .verifyCA }
        switch mode {
        case .disable, .allow, .prefer, .require:
            configuration.certificateVerification = .none
            // Nothing is verified: the system's roots are not loaded (parsing
            // them takes long enough to stall a connection attempt's thread).
            configuration.trustRoots = .certificates([])
        case .verifyCA, .verifyFull:
            guard let root else {
                throw refuse(
                    "sslmode=\(sslMode.rawValue) needs a root certificate: \(defaultRoot ?? "~/.postgresql/root.crt") does not exist; set sslrootcert (a file, or system)"
                )
            }
            configuration.certificateVerification = mode == .verifyFull ? .fullVerification : .noHostnameVerification
            if root != "system" {
                do {
                    configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(root))
                } catch {
                    throw refuse("cannot read the root certificate \(root): \(error)")
                }
            }
        }
        let defaultCert = homeDirectory.map { "\($0)/.postgresql/postgresql.crt" }
        let defaultKey = homeDirectory.map { "\($0)/.postgresql/postgresql.key" }
        // libpq: a client certificate file that is not there is no client certificate.
        if let cert = (sslCert ?? defaultCert).flatMap({ files.exists($0) ? $0 : nil }) {
            guard let key = sslKey ?? defaultKey else { throw refuse("sslcert \(cert) is set, but no sslkey") }
            if let permissions = files.permissions(key), permissions & 0o077 != 0,
                !(files.ownerIsRoot(key) && permissions & 0o037 == 0)
            {
                throw refuse(
                    "private key file \(key) has group or world access; file must have permissions u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root"
                )
            }
            do {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
            } catch {
                throw refuse("cannot read the client certificate \(cert) or its key \(key): \(error)")
            }
        }
        return configuration
    }

    /// The same settings for a `PostgresClient` (a pool of up to
    /// `maximumConnections` sessions), as the admin UI uses, on `endpoint`
    /// (default: the first host; ``settle(logger:)`` finds the one
    /// `target_session_attrs` asks for).
    public func clientConfiguration(maximumConnections: Int = 4, endpoint: Endpoint? = nil) throws -> PostgresClient.Configuration {
        let endpoint = endpoint ?? hosts[0]
        var configuration: PostgresClient.Configuration
        let password = password(for: endpoint)
        switch endpoint {
        case .unixSocket(let path):
            configuration = .init(unixSocketPath: path, username: username, password: password, database: database)
        case .tcp(let host, let port):
            let tls: PostgresClient.Configuration.TLS
            switch initialTLS(for: endpoint) {
            case .off: tls = .disable
            case .preferred: tls = .prefer(try tlsConfiguration())
            case .required: tls = .require(try tlsConfiguration())
            }
            configuration = .init(host: host, port: port, username: username, password: password, database: database, tls: tls)
        }
        configuration.options.additionalStartupParameters = startupParameters
        configuration.options.maximumConnections = maximumConnections
        configuration.options.connectTimeout = perHostTimeout
        return configuration
    }

    /// Opens a connection: each host in turn until one accepts and is what
    /// `target_session_attrs` asks for (with `prefer-standby`, a second
    /// round takes any). Each host's attempt is bounded by `connect_timeout`.
    public func connect(logger: Logger) async throws -> PostgresConnection {
        try await open(logger: logger).conn
    }

    /// The first host that `target_session_attrs` accepts, for a pool
    /// (which connects to one host): found once, now.
    public func settle(logger: Logger) async throws -> Endpoint {
        if hosts.count == 1 { return hosts[0] }
        let (endpoint, conn) = try await open(logger: logger)
        try? await conn.close()
        return endpoint
    }

    private func open(logger: Logger) async throws -> (endpoint: Endpoint, conn: PostgresConnection) {
        var failures: [(Endpoint, DispatchPolicyError)] = []
        let rounds: [TargetSessionAttributes] = targetSessionAttributes == .preferStandby ? [.standby, .any] : [targetSessionAttributes]
        for wanted in rounds {
            for endpoint in hosts {
                try Task.checkCancellation()
                do {
                    let conn = try await connect(to: endpoint, logger: logger)
                    let mismatch: String?
                    do {
                        mismatch = try await Self.mismatch(conn, wanted: wanted, logger: logger)
                    } catch {
                        try? await conn.close()
                        throw error
                    }
                    if let mismatch {
                        try? await conn.close()
                        failures.append((endpoint, DispatchPolicyError(code: .invalidConnectionSettings, message: mismatch)))
                        continue
                    }
                    return (endpoint, conn)
                } catch let error as CancellationError {
                    throw error
                } catch {
                    failures.append((endpoint, explain(error, endpoint: endpoint)))
                }
            }
        }
        if hosts.count == 1, rounds.count == 1, let (_, only) = failures.first {
            var wrapped = only
            wrapped.message = "cannot connect to \(self): \(only.message)"
            wrapped.hint = wrapped.hint ?? "Set --database-url, DATABASE_URL or the PG* variables."
            throw wrapped
        }
        throw DispatchPolicyError(
            code: .client,
            message: "cannot connect to \(self): no host is usable (target_session_attrs=\(targetSessionAttributes.rawValue))",
            detail: failures.map { "\($0.0): \($0.1.message)" }.joined(separator: "\n"),
            hint: "Set --database-url, DATABASE_URL or the PG* variables.")
    }

    /// A connection failure in words a person can act on; what postgres-nio
    /// or the TLS library said stays in the detail.
    func explain(_ error: any Error, endpoint: Endpoint) -> DispatchPolicyError {
        var wrapped = DispatchPolicyError.from(error)
        guard let psql = error as? PSQLError, psql.serverInfo == nil else { return wrapped }
        let raw = wrapped.message
        if psql.code == .authMechanismRequiresPassword {
            wrapped.message = "the server asks for a password and none was given"
            if let passfile, let mode = files.permissions(passfile), mode & 0o077 != 0 {
                wrapped.hint =
                    "The password file \(passfile) was ignored: it has group or world access; permissions should be u=rw (0600) or less."
            } else {
                wrapped.hint = "Give it in the URL, PGPASSWORD or the password file (\(passfile ?? "~/.pgpass"), mode 0600)."
            }
        } else if psql.code == .sslUnsupported {
            wrapped.message = "the server does not accept TLS connections (sslmode=\(sslMode.rawValue))"
        } else if let extra = psql.underlying as? NIOSSLExtraError, extra == .failedToValidateHostname {
            wrapped.message = "the server's certificate does not name \(endpoint.hostAndPort.host) (sslmode=verify-full)"
        } else if raw.contains("CERTIFICATE_VERIFY_FAILED") {
            wrapped.message =
                "the server's certificate is not signed by the root certificate \(sslRootCert ?? "~/.postgresql/root.crt") (sslmode=\(sslMode.rawValue); libpq verifies with sslmode=require too when a root certificate is there)"
        } else {
            return wrapped
        }
        wrapped.detail = [wrapped.detail, raw].compactMap { $0 }.joined(separator: "\n")
        return wrapped
    }

    /// One host: TLS as `sslMode` says, with libpq's second try (`allow`:
    /// TLS after a refused plain session; `prefer`: plain after a refused
    /// TLS session).
    func connect(to endpoint: Endpoint, logger: Logger) async throws -> PostgresConnection {
        let first = initialTLS(for: endpoint)
        do {
            return try await connectBounded(try postgresConfiguration(for: endpoint, tls: first), logger: logger)
        } catch let error as PSQLError where error.serverInfo != nil {
            let second: TLSChoice
            switch (sslMode, first) {
            case (.allow, .off): second = .required
            case (.prefer, .preferred): second = .off
            default: throw error
            }
            return try await connectBounded(try postgresConfiguration(for: endpoint, tls: second), logger: logger)
        }
    }

    /// A connection attempt bounded by `connect_timeout` as a whole (TCP,
    /// TLS, authentication); one that opens after the bound is closed.
    private func connectBounded(_ configuration: PostgresConnection.Configuration, logger: Logger) async throws -> PostgresConnection {
        let late = Mutex<(abandoned: Bool, conn: PostgresConnection?)>((false, nil))
        let id = Self.nextConnectionID()
        var logger = logger
        logger[metadataKey: "connection.id"] = "\(id)"
        let result: PostgresConnection? = try await untilDeadline(.now + perHostTimeout) { [logger] in
            let conn = try await PostgresConnection.connect(configuration: configuration, id: id, logger: logger)
            if late.withLock({ state in
                state.conn = conn
                return state.abandoned
            }) {
                try? await conn.close()
            }
            return conn
        }
        guard let result else {
            if let conn = late.withLock({ state in
                state.abandoned = true
                return state.conn
            }) {
                try? await conn.close()
            }
            throw DispatchPolicyError(code: .connectionLost, message: "no answer within \(perHostTimeout) (connect_timeout)")
        }
        return result
    }

    private static let connectionIDs = Atomic<Int>(0)
    /// A distinct id for every connection this process opens (in its logger metadata).
    static func nextConnectionID() -> Int { connectionIDs.add(1, ordering: .relaxed).newValue }

    /// Why `conn` is not what `wanted` asks for, or nil.
    static func mismatch(_ conn: PostgresConnection, wanted: TargetSessionAttributes, logger: Logger) async throws -> String? {
        guard wanted != .any else { return nil }
        let rows = try await conn.query(
            "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only') = 'on'", logger: logger)
        var inRecovery = false
        var readOnly = false
        for try await (recovery, ro) in rows.decode((Bool, Bool).self) { (inRecovery, readOnly) = (recovery, ro) }
        switch wanted {
        case .any, .preferStandby: return nil
        case .readWrite: return readOnly ? "the session is read-only (target_session_attrs=read-write)" : nil
        case .readOnly: return readOnly ? nil : "the session is not read-only (target_session_attrs=read-only)"
        case .primary: return inRecovery ? "the server is in recovery (target_session_attrs=primary)" : nil
        case .standby: return inRecovery ? nil : "the server is not in recovery (target_session_attrs=standby)"
        }
    }

    /// Opens a connection, runs `body` with it, and closes it whether `body`
    /// returns or throws.
    public func withConnection<T>(
        logger: Logger,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (PostgresConnection) async throws -> sending T
    ) async throws -> sending T {
        let connection = try await connect(logger: logger)
        do {
            let result = try await body(connection)
            try? await connection.close()
            return result
        } catch {
            try? await connection.close()
            throw error
        }
    }

    /// The same settings for another database on the same server.
    public func with(database: String) -> ConnectionSettings {
        var copy = self
        copy.database = database
        return copy
    }

    /// A URL for these settings, with the password left out.
    public var description: String {
        let user = username.addingPercentEncoding(withAllowedCharacters: .urlUserAllowed) ?? username
        let db = database.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? database
        var tcp: [String] = []
        var sockets: [(host: String, port: String)] = []
        for endpoint in hosts {
            switch endpoint {
            case .tcp: tcp.append(endpoint.description)
            case .unixSocket: sockets.append(endpoint.hostAndPort)
            }
        }
        if sockets.isEmpty { return "postgres://\(user)@\(tcp.joined(separator: ","))/\(db)" }
        if tcp.isEmpty, sockets.count == 1 { return "postgres://\(user)@/\(db)?host=\(sockets[0].host)&port=\(sockets[0].port)" }
        let all = hosts.map(\.hostAndPort)
        return "postgres://\(user)@/\(db)?host=\(all.map(\.host).joined(separator: ","))&port=\(all.map(\.port).joined(separator: ","))"
    }

    /// The text with any password shown as `***`.
    static func redact(_ url: String) -> String { ConnInfo.redact(url) }
}

/// How an error shows a connection string: its password never.
public enum ConnectionSettingsRedaction {
    /// The URL or keyword/value string with any password shown as `***`.
    public static func of(_ url: String) -> String { ConnInfo.redact(url) }
}

/// How connection settings read files (the password file, the service file,
/// certificates' existence and modes); tests give their own.
public struct FileAccess: Sendable {
    public var read: @Sendable (String) -> String?
    public var exists: @Sendable (String) -> Bool
    /// The permission bits, nil when the file is not there.
    public var permissions: @Sendable (String) -> Int?
    public var ownerIsRoot: @Sendable (String) -> Bool
    public var homeDirectory: @Sendable () -> String?

    public init(
        read: @escaping @Sendable (String) -> String?, exists: @escaping @Sendable (String) -> Bool,
        permissions: @escaping @Sendable (String) -> Int?, ownerIsRoot: @escaping @Sendable (String) -> Bool = { _ in false },
        homeDirectory: @escaping @Sendable () -> String?
    ) {
        self.read = read
        self.exists = exists
        self.permissions = permissions
        self.ownerIsRoot = ownerIsRoot
        self.homeDirectory = homeDirectory
    }

    /// The file system, and the user's home directory from the password database.
    public static let system = FileAccess(
        read: { path in
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue else { return nil }
            return try? String(contentsOfFile: path, encoding: .utf8)
        },
        exists: { FileManager.default.fileExists(atPath: $0) },
        permissions: { path in
            (try? FileManager.default.attributesOfItem(atPath: path))?[.posixPermissions] as? Int
        },
        ownerIsRoot: { path in
            ((try? FileManager.default.attributesOfItem(atPath: path))?[.ownerAccountID] as? Int) == 0
        },
        homeDirectory: {
            guard let entry = getpwuid(geteuid()), let dir = entry.pointee.pw_dir else { return nil }
            return String(cString: dir)
        })

    /// No files at all (`~` unknown).
    public static let none = FileAccess(read: { _ in nil }, exists: { _ in false }, permissions: { _ in nil }, homeDirectory: { nil })
}
