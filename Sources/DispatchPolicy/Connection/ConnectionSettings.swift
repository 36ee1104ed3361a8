import Foundation
import NIOSSL
import PostgresNIO

/// Where and how to connect, from a `postgres://` URL or the libpq `PG*`
/// environment variables. Pure: parsing needs no network and is unit-tested.
public struct ConnectionSettings: Sendable, Equatable, CustomStringConvertible {
    public enum Endpoint: Sendable, Equatable {
        case tcp(host: String, port: Int)
        /// The socket file itself, such as `/var/run/postgresql/.s.PGSQL.5432`.
        case unixSocket(path: String)
    }

    /// libpq's `sslmode`, reduced to what postgres-nio can do.
    public enum TLSMode: String, Sendable, Equatable {
        case disable, prefer, require
    }

    public var endpoint: Endpoint
    public var username: String
    public var password: String?
    public var database: String
    public var tls: TLSMode
    /// Server settings sent with every connection's startup (none by default).
    public var session = SessionSettings()

    public init(endpoint: Endpoint, username: String, password: String? = nil, database: String? = nil, tls: TLSMode = .prefer) {
        self.endpoint = endpoint
        self.username = username
        self.password = password
        self.database = database ?? username
        self.tls = tls
    }

    /// The settings the CLI and the library use: `url` if given, else
    /// `DATABASE_URL`, else the `PG*` variables (`PGHOST`, `PGPORT`,
    /// `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`).
    public static func resolve(url: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> ConnectionSettings {
        if let url, !url.isEmpty { return try ConnectionSettings(url: url, environment: environment) }
        if let url = environment["DATABASE_URL"], !url.isEmpty { return try ConnectionSettings(url: url, environment: environment) }
        return try ConnectionSettings(environment: environment)
    }

    /// From the `PG*` variables alone; unset ones take libpq's defaults
    /// (host `localhost`, port 5432, user the OS user, database the user).
    public init(environment: [String: String]) throws {
        try self.init(parts: Parts(
            host: environment["PGHOST"], port: environment["PGPORT"], user: environment["PGUSER"],
            password: environment["PGPASSWORD"], database: environment["PGDATABASE"], sslmode: environment["PGSSLMODE"]
        ), environment: environment)
    }

    /// From `postgres://user:password@host:port/database?sslmode=...`.
    /// `postgresql://` works too, and so does `?host=/socket/dir` for a Unix
    /// socket, as in libpq. Parts the URL leaves out fall back to `PG*`.
    public init(url: String, environment: [String: String] = [:]) throws {
        guard let components = URLComponents(string: url),
              let scheme = components.scheme, ["postgres", "postgresql"].contains(scheme.lowercased())
        else {
            throw DispatchPolicyError(
                code: .invalidConnectionSettings,
                message: "database URL must look like postgres://user:password@host:port/database",
                detail: "got \(Self.redact(url))")
        }
        var query: [String: String] = [:]
        for item in components.queryItems ?? [] { query[item.name] = item.value ?? "" }
        let path = components.percentEncodedPath.removingPercentEncoding ?? components.path
        let database = path.hasPrefix("/") ? String(path.dropFirst()) : path
        try self.init(parts: Parts(
            // An IPv6 literal is written in brackets ([::1]); the address is what is inside.
            host: query["host"] ?? components.percentEncodedHost.flatMap { $0.isEmpty ? nil : Self.unbracketed($0.removingPercentEncoding ?? $0) }
                ?? environment["PGHOST"],
            // A port URLComponents cannot hold (beyond Int) is kept as text, to be refused.
            port: query["port"] ?? components.port.map(String.init) ?? components.rangeOfPort.map { String(url[$0]) }
                ?? environment["PGPORT"],
            user: query["user"] ?? components.percentEncodedUser.flatMap { $0.removingPercentEncoding } ?? environment["PGUSER"],
            password: query["password"] ?? components.percentEncodedPassword.flatMap { $0.removingPercentEncoding } ?? environment["PGPASSWORD"],
            database: query["dbname"] ?? (database.isEmpty ? nil : database) ?? environment["PGDATABASE"],
            sslmode: query["sslmode"] ?? environment["PGSSLMODE"]
        ), environment: environment)
    }

    static func unbracketed(_ host: String) -> String {
        host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
    }

    private struct Parts {
        var host, port, user, password, database, sslmode: String?
    }

    private init(parts: Parts, environment: [String: String]) throws {
        let portText = parts.port.flatMap { $0.isEmpty ? nil : $0 } ?? "5432"
        guard let port = Int(portText), (1...65535).contains(port) else {
            throw DispatchPolicyError(code: .invalidConnectionSettings, message: "port must be a number from 1 to 65535", detail: "got \(portText)")
        }
        let host = parts.host.flatMap { $0.isEmpty ? nil : $0 } ?? "localhost"
        let endpoint: Endpoint = host.hasPrefix("/")
            ? .unixSocket(path: "\(host.hasSuffix("/") ? String(host.dropLast()) : host)/.s.PGSQL.\(port)")
            : .tcp(host: host, port: port)
        let sslmode = parts.sslmode.flatMap { $0.isEmpty ? nil : $0 } ?? "prefer"
        let tls: TLSMode
        switch sslmode {
        case "disable": tls = .disable
        case "allow", "prefer": tls = .prefer
        case "require", "verify-ca", "verify-full": tls = .require
        default:
            throw DispatchPolicyError(
                code: .invalidConnectionSettings,
                message: "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full", detail: "got \(sslmode)")
        }
        let user = parts.user.flatMap { $0.isEmpty ? nil : $0 }
            ?? environment["USER"].flatMap { $0.isEmpty ? nil : $0 }
            ?? ProcessInfo.processInfo.userName
        // TLS does not apply to Unix sockets.
        let isTCP = if case .tcp = endpoint { true } else { false }
        self.init(
            endpoint: endpoint, username: user, password: parts.password,
            database: parts.database.flatMap { $0.isEmpty ? nil : $0 }, tls: isTCP ? tls : .disable)
    }

    /// The postgres-nio configuration for these settings.
    public func postgresConfiguration() throws -> PostgresConnection.Configuration {
        var configuration = try endpointConfiguration()
        configuration.options.additionalStartupParameters = session.parameters
        return configuration
    }

    private func endpointConfiguration() throws -> PostgresConnection.Configuration {
        switch endpoint {
        case .unixSocket(let path):
            return .init(unixSocketPath: path, username: username, password: password, database: database)
        case .tcp(let host, let port):
            let tlsConfig: PostgresConnection.Configuration.TLS
            switch tls {
            case .disable:
                tlsConfig = .disable
            case .prefer:
                tlsConfig = .prefer(try NIOSSLContext(configuration: .makeClientConfiguration()))
            case .require:
                tlsConfig = .require(try NIOSSLContext(configuration: .makeClientConfiguration()))
            }
            return .init(host: host, port: port, username: username, password: password, database: database, tls: tlsConfig)
        }
    }

    /// The same settings for a `PostgresClient` (a pool of up to
    /// `maximumConnections` sessions), as the admin UI uses.
    public func clientConfiguration(maximumConnections: Int = 4) throws -> PostgresClient.Configuration {
        let single = try postgresConfiguration()
        var configuration: PostgresClient.Configuration
        switch endpoint {
        case .unixSocket(let path):
            configuration = .init(unixSocketPath: path, username: username, password: password, database: database)
        case .tcp(let host, let port):
            let tls: PostgresClient.Configuration.TLS
            switch self.tls {
            case .disable: tls = .disable
            case .prefer: tls = .prefer(.makeClientConfiguration())
            case .require: tls = .require(.makeClientConfiguration())
            }
            configuration = .init(host: host, port: port, username: username, password: password, database: database, tls: tls)
        }
        configuration.options.additionalStartupParameters = single.options.additionalStartupParameters
        configuration.options.maximumConnections = maximumConnections
        return configuration
    }

    /// Opens a connection with these settings.
    public func connect(logger: Logger) async throws -> PostgresConnection {
        let configuration = try postgresConfiguration()
        do {
            return try await PostgresConnection.connect(configuration: configuration, id: 1, logger: logger)
        } catch {
            var wrapped = DispatchPolicyError.from(error, context: "cannot connect to \(self)")
            wrapped.hint = wrapped.hint ?? "Set --database-url, DATABASE_URL or the PG* variables."
            throw wrapped
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
        switch endpoint {
        case .tcp(let host, let port):
            return "postgres://\(user)@\(host.contains(":") ? "[\(host)]" : host):\(port)/\(db)"
        case .unixSocket(let path):
            var dir = path
            var port = "5432"
            if let range = path.range(of: "/.s.PGSQL.", options: .backwards) {
                dir = String(path[..<range.lowerBound])
                port = String(path[range.upperBound...])
            }
            return "postgres://\(user)@/\(db)?host=\(dir)&port=\(port)"
        }
    }

    /// The URL with any password shown as `***`: the one in the user
    /// information and a `password=` parameter. A string that is not a URL
    /// keeps only what comes before a `:` in the user information.
    static func redact(_ url: String) -> String { ConnectionSettingsRedaction.of(url) }
}

/// How an error shows a database URL: its password never.
public enum ConnectionSettingsRedaction {
    /// The URL with any password shown as `***`.
    public static func of(_ url: String) -> String {
        guard var components = URLComponents(string: url), components.scheme != nil else {
            guard let schemeEnd = url.range(of: "://") else { return "(not shown: it is not a URL)" }
            let rest = url[schemeEnd.upperBound...]
            guard let at = rest.lastIndex(of: "@") else {
                return url.contains("password") ? "(not shown: it cannot be parsed and may hold a password)" : url
            }
            let user = rest[..<at].prefix { $0 != ":" }
            return String(url[..<schemeEnd.upperBound]) + user + (rest[..<at].contains(":") ? ":***" : "") + "@(not shown)"
        }
        if components.password != nil { components.password = "***" }
        if let items = components.queryItems, items.contains(where: { $0.name == "password" }) {
            components.queryItems = items.map { $0.name == "password" ? URLQueryItem(name: "password", value: "***") : $0 }
        }
        return components.string ?? "(not shown: it cannot be printed)"
    }
}
