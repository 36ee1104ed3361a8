import DispatchPolicy
import EmbeddedPostgres
import Foundation
import Logging
import PostgresNIO
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A private cluster with TLS on (a certificate authority and certificates
/// made for the test by openssl), read-only by default, and a pg_hba.conf
/// that gives each user one way in:
/// `ssluser` over TLS only, `plainuser` without TLS only, `certuser` by
/// client certificate, `pwuser` by password, `postgres` any way.
actor TLSServer {
    static let shared = TLSServer()

    struct Server: Sendable {
        var cluster: EmbeddedPostgres
        var port: Int
        /// Holds ca.crt, other-ca.crt (a stranger), client.crt and client.key.
        var certs: String
        /// A home directory with no `.postgresql/` or `.pgpass`.
        var emptyHome: String
    }

    private var server: Task<Server, any Error>?

    func get() async throws -> Server {
        if server == nil { server = Task { try await Self.start() } }
        return try await server!.value
    }

    private static func openssl(_ arguments: [String], in dir: String) async throws {
        let result = try await runProcess("/usr/bin/openssl", arguments, environment: ProcessInfo.processInfo.environment)
        guard result.status == 0 else {
            throw EmbeddedPostgresError(message: "openssl \(arguments.joined(separator: " ")): \(result.stderr)")
        }
    }

    private static func start() async throws -> Server {
        let dir = FileManager.default.temporaryDirectory.path + "/dp-tls-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir + "/home", withIntermediateDirectories: true)
        func path(_ name: String) -> String { "\(dir)/\(name)" }
        for ca in ["ca", "other-ca"] {
            try await openssl(
                [
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=dispatch-policy test \(ca)",
                    "-keyout", path("\(ca).key"), "-out", path("\(ca).crt"),
                ], in: dir)
        }
        // The server's certificate names localhost only (not 127.0.0.1): verify-full
        // passes for one and fails for the other.
        try "subjectAltName=DNS:localhost\n".write(toFile: path("server.ext"), atomically: true, encoding: .utf8)
        try await openssl(
            ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", path("server.key"), "-out", path("server.csr")],
            in: dir)
        try await openssl(
            [
                "x509", "-req", "-in", path("server.csr"), "-CA", path("ca.crt"), "-CAkey", path("ca.key"), "-CAcreateserial",
                "-days", "2", "-extfile", path("server.ext"), "-out", path("server.crt"),
            ], in: dir)
        try await openssl(
            ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=certuser", "-keyout", path("client.key"), "-out", path("client.csr")],
            in: dir)
        try await openssl(
            [
                "x509", "-req", "-in", path("client.csr"), "-CA", path("ca.crt"), "-CAkey", path("ca.key"), "-CAcreateserial",
                "-days", "2", "-out", path("client.crt"),
            ], in: dir)
        try """
        local all all trust
        hostssl all ssluser 127.0.0.1/32 trust
        hostnossl all ssluser 127.0.0.1/32 reject
        hostnossl all plainuser 127.0.0.1/32 trust
        hostssl all plainuser 127.0.0.1/32 reject
        hostssl all certuser 127.0.0.1/32 cert
        host all pwuser 127.0.0.1/32 scram-sha-256
        host all all 127.0.0.1/32 trust
        """.write(toFile: path("pg_hba.conf"), atomically: true, encoding: .utf8)
        for file in ["server.key", "client.key"] {
            try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: path(file))
        }
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: dir)
        if geteuid() == 0, let pw = getpwnam("postgres") {
            // The server reads its key as the postgres user; the key must be its own.
            for file in ["server.key", "server.crt", "ca.crt", "pg_hba.conf"] { chown(path(file), pw.pointee.pw_uid, pw.pointee.pw_gid) }
        }
        let port = try freePort()
        let cluster = try await EmbeddedPostgres.start(
            .init(
                tcpPort: port,
                settings: [
                    "ssl": "on", "ssl_cert_file": path("server.crt"), "ssl_key_file": path("server.key"), "ssl_ca_file": path("ca.crt"),
                    "hba_file": path("pg_hba.conf"), "password_encryption": "scram-sha-256",
                ]), logger: TestServer.logger)
        let admin = try ConnectionSettings(url: cluster.url())
        try await admin.withConnection(logger: TestServer.logger) { conn in
            for user in ["ssluser", "plainuser", "certuser"] {
                _ = try await conn.rows(PostgresQuery(unsafeSQL: "CREATE ROLE \(user) LOGIN"), logger: TestServer.logger)
            }
            _ = try await conn.rows("CREATE ROLE pwuser LOGIN PASSWORD 'pw:secret'", logger: TestServer.logger)
        }
        return Server(cluster: cluster, port: port, certs: dir, emptyHome: dir + "/home")
    }
}

/// A port nothing listens on now.
func freePort() throws -> Int {
    let listener = try SilentListener()
    defer { listener.close() }
    return listener.port
}

/// A TCP socket that accepts connections (the kernel completes them) and
/// never says a word: a server that hangs.
final class SilentListener: @unchecked Sendable {
    let fd: Int32
    let port: Int

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard bound == 0, listen(fd, 16) == 0 else { throw EmbeddedPostgresError(message: "cannot listen: \(errno)") }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        self.fd = fd
        self.port = Int(UInt16(bigEndian: address.sin_port))
    }

    func close() { _ = Glibc.close(fd) }
}

@Suite("Connections like libpq: sslmode, certificates, password and service files, several hosts", .serialized, .timeLimit(.minutes(5)))
struct ConnectionTests {
    enum Outcome: Sendable, CustomStringConvertible {
        case tls, plain
        case refused(String)
        var description: String {
            switch self {
            case .tls: "TLS"
            case .plain: "no TLS"
            case .refused(let text): "refused (\(text))"
            }
        }
    }

    /// Connects with `conninfo` (`{port}`, `{certs}` and `{home}` filled in) and
    /// the variables in `environment`; whether the session uses TLS, or why it
    /// was refused.
    func outcome(_ conninfo: String, environment: [String: String] = [:]) async throws -> Outcome {
        let server = try await TLSServer.shared.get()
        func fill(_ text: String) -> String {
            text.replacingOccurrences(of: "{port}", with: String(server.port)).replacingOccurrences(of: "{certs}", with: server.certs)
                .replacingOccurrences(of: "{home}", with: server.emptyHome)
        }
        var env = ["HOME": server.emptyHome, "PGCONNECT_TIMEOUT": "20"]
        for (key, value) in environment { env[key] = fill(value) }
        do {
            let settings = try ConnectionSettings(conninfo: fill(conninfo), environment: env)
            return try await settings.withConnection(logger: TestServer.logger) { conn in
                let rows = try await conn.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", logger: TestServer.logger)
                var ssl = false
                for try await value in rows.decode(Bool.self) { ssl = value }
                return ssl ? .tls : .plain
            }
        } catch let error as DispatchPolicyError {
            return .refused(error.description)
        }
    }

    func expect(
        _ conninfo: String, environment: [String: String] = [:], _ expected: Outcome, sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        let got = try await outcome(conninfo, environment: environment)
        switch (expected, got) {
        case (.tls, .tls), (.plain, .plain): break
        case (.refused(let want), .refused(let text)) where text.contains(want): break
        default: Issue.record("\(conninfo): expected \(expected), got \(got)", sourceLocation: sourceLocation)
        }
    }

    @Test("sslmode: disable, allow, prefer, require as libpq (no verification), each against a server that demands or refuses TLS")
    func sslModes() async throws {
        let base = "host=127.0.0.1 port={port} dbname=postgres"
        try await expect("\(base) user=ssluser sslmode=disable", .refused("no encryption"))
        try await expect("\(base) user=ssluser sslmode=allow", .tls)
        try await expect("\(base) user=plainuser sslmode=allow", .plain)
        try await expect("\(base) user=ssluser sslmode=prefer", .tls)
        try await expect("\(base) user=plainuser sslmode=prefer", .plain)
        try await expect("\(base) user=plainuser", .plain)
        // A certificate from an unknown authority, as a stock server has: accepted.
        try await expect("\(base) user=ssluser sslmode=require", .tls)
        try await expect("\(base) user=plainuser sslmode=require", .refused("SSL encryption"))
    }

    @Test("verify-ca checks the chain, verify-full the host name too; require with a root certificate at hand verifies the chain")
    func verification() async throws {
        let base = "port={port} dbname=postgres user=ssluser"
        try await expect("host=127.0.0.1 \(base) sslmode=verify-ca", .refused("root.crt does not exist"))
        try await expect("host=127.0.0.1 \(base) sslmode=verify-ca sslrootcert={certs}/ca.crt", .tls)
        try await expect(
            "host=127.0.0.1 \(base) sslmode=verify-ca sslrootcert={certs}/other-ca.crt", .refused("not signed by the root certificate"))
        try await expect("host=127.0.0.1 \(base) sslmode=verify-full sslrootcert={certs}/ca.crt", .refused("does not name 127.0.0.1"))
        try await expect("host=localhost \(base) sslmode=verify-full sslrootcert={certs}/ca.crt", .tls)
        // The same through PGSSLMODE and PGSSLROOTCERT.
        try await expect("host=localhost \(base)", environment: ["PGSSLMODE": "verify-full", "PGSSLROOTCERT": "{certs}/ca.crt"], .tls)
        // ~/.postgresql/root.crt of a stranger: require now verifies, and refuses.
        let home = FileManager.default.temporaryDirectory.path + "/dp-tls-home-\(getpid())"
        try FileManager.default.createDirectory(atPath: home + "/.postgresql", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: home) }
        let server = try await TLSServer.shared.get()
        try FileManager.default.copyItem(atPath: server.certs + "/other-ca.crt", toPath: home + "/.postgresql/root.crt")
        try await expect(
            "host=127.0.0.1 \(base) sslmode=require", environment: ["HOME": home], .refused("not signed by the root certificate"))
    }

    @Test("a client certificate: sslcert and sslkey (or PGSSLCERT, PGSSLKEY) for cert authentication")
    func clientCertificate() async throws {
        let base = "host=127.0.0.1 port={port} dbname=postgres user=certuser sslmode=require"
        try await expect("\(base) sslcert={certs}/client.crt sslkey={certs}/client.key", .tls)
        try await expect(base, environment: ["PGSSLCERT": "{certs}/client.crt", "PGSSLKEY": "{certs}/client.key"], .tls)
        try await expect(base, .refused("certificate"))
    }

    @Test("the password file and the service file, as libpq reads them")
    func files() async throws {
        let server = try await TLSServer.shared.get()
        let dir = FileManager.default.temporaryDirectory.path + "/dp-pgfiles-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "127.0.0.1:\(server.port):postgres:pwuser:pw\\:secret\n".write(toFile: dir + "/.pgpass", atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: dir + "/.pgpass")
        let base = "host=127.0.0.1 port={port} dbname=postgres user=pwuser sslmode=disable"
        try await expect(base, environment: ["HOME": dir], .plain)
        try await expect(base, environment: ["PGPASSFILE": dir + "/.pgpass"], .plain)
        try await expect(base, .refused("asks for a password and none was given"))
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: dir + "/.pgpass")
        try await expect(base, environment: ["HOME": dir], .refused("asks for a password and none was given"))
        try """
        [jobs-tls]
        host=localhost
        port=\(server.port)
        dbname=postgres
        sslmode=verify-full
        sslrootcert=\(server.certs)/ca.crt
        """.write(toFile: dir + "/services.conf", atomically: true, encoding: .utf8)
        try await expect("service=jobs-tls user=ssluser", environment: ["PGSERVICEFILE": dir + "/services.conf"], .tls)
        try await expect("user=ssluser", environment: ["PGSERVICEFILE": dir + "/services.conf", "PGSERVICE": "jobs-tls"], .tls)
    }

    @Test(
        "application_name: the one given, else the command's; connect_timeout bounds a host that never answers, and the next host is tried")
    func nameAndTimeout() async throws {
        let server = try await TLSServer.shared.get()
        var settings = try ConnectionSettings(
            conninfo: "host=127.0.0.1 port=\(server.port) dbname=postgres user=postgres", environment: ["HOME": server.emptyHome])
        settings.fallbackApplicationName = "dispatch-policy run"
        let name: String = try await settings.withConnection(logger: TestServer.logger) {
            try await $0.scalar("SELECT current_setting('application_name')")
        }
        #expect(name == "dispatch-policy run")
        let given = try ConnectionSettings.resolve(
            url: "postgres://postgres@127.0.0.1:\(server.port)/postgres?application_name=billing",
            environment: ["HOME": server.emptyHome], fallbackApplicationName: "dispatch-policy run")
        let givenName: String = try await given.withConnection(logger: TestServer.logger) {
            try await $0.scalar("SELECT current_setting('application_name')")
        }
        #expect(givenName == "billing")

        let silent = try SilentListener()
        defer { silent.close() }
        let hung = try ConnectionSettings(
            conninfo: "host=127.0.0.1 port=\(silent.port) user=postgres connect_timeout=2", environment: ["HOME": server.emptyHome])
        let error = await #expect(throws: DispatchPolicyError.self) { try await hung.withConnection(logger: TestServer.logger) { _ in } }
        #expect(error?.message.contains("no answer within 2") == true, "\(String(describing: error))")
        let next = try ConnectionSettings(
            conninfo:
                "host=127.0.0.1,127.0.0.1 port=\(silent.port),\(server.port) dbname=postgres user=postgres connect_timeout=10 sslmode=disable",
            environment: ["HOME": server.emptyHome])
        // (10 s and no TLS for the live host: under the suite's load its
        // handshake alone has taken more than 2 s.)
        let port: String = try await next.withConnection(logger: TestServer.logger) {
            try await $0.scalar("SELECT current_setting('port')")
        }
        #expect(port == String(server.port))
    }

    @Test("target_session_attrs=read-write settles on the writable host, and a runner's session follows a failover to the new one")
    func failover() async throws {
        let tls = try await TLSServer.shared.get()
        let shared = try await TestServer.shared.get()
        let database = "dp_failover_\(getpid())"
        let a = try ConnectionSettings(url: tls.cluster.url())
        let b = shared.admin
        for server in [a, b] {
            try await server.withConnection(logger: TestServer.logger) { conn in
                try await conn.exec(PostgresQuery(unsafeSQL: "DROP DATABASE IF EXISTS \(database)"))
                try await conn.exec(PostgresQuery(unsafeSQL: "CREATE DATABASE \(database)"))
            }
        }
        func readOnly(_ server: ConnectionSettings, _ on: Bool) async throws {
            try await server.withConnection(logger: TestServer.logger) { conn in
                try await conn.exec(
                    PostgresQuery(
                        unsafeSQL:
                            "ALTER DATABASE \(database) \(on ? "SET default_transaction_read_only = on" : "RESET default_transaction_read_only")"
                    ))
            }
        }
        try await readOnly(a, true)
        var both = b.with(database: database)
        both.hosts = [.tcp(host: "127.0.0.1", port: tls.port), b.endpoint]
        both.sslMode = .disable  // TLS is the other tests' subject; a loaded machine's handshakes only slow this one
        both.homeDirectory = tls.emptyHome
        both.targetSessionAttributes = .readWrite
        let portA = String(tls.port)
        let portB: String = try await b.withConnection(logger: TestServer.logger) { try await $0.scalar("SELECT current_setting('port')") }
        try #require(portA != portB || a.endpoint != b.endpoint)

        // The first host is read-only: the session lands on the second.
        let db = ManagedConnection(settings: both, role: "test runner", logger: TestServer.logger, connectTimeout: .seconds(60))
        let where1 = try await db.run("port", timeout: .seconds(60)) { conn in
            try await conn.scalar("SELECT current_setting('port') || ':' || current_setting('transaction_read_only')", as: String.self)
        }
        #expect(where1 == "\(portB):off")
        // read-only and primary pick accordingly; standby finds none (no server is in recovery).
        var ro = both
        ro.targetSessionAttributes = .readOnly
        #expect(
            try await ro.withConnection(logger: TestServer.logger) {
                try await $0.scalar("SELECT current_setting('port')", as: String.self)
            } == portA)
        ro.targetSessionAttributes = .standby
        let none = await #expect(throws: DispatchPolicyError.self) { try await ro.withConnection(logger: TestServer.logger) { _ in } }
        #expect(none?.message.contains("no host is usable") == true)

        // A pool (the admin's) settles there too, and checks every second.
        let pool = try await FailoverClient.settle(both, maximumConnections: 2, checkInterval: .seconds(1), logger: TestServer.logger)
        let poolTask = Task { try await pool.run() }
        defer { poolTask.cancel() }
        let poolWhere1: String = try await pool.rows("SELECT current_setting('port')", logger: TestServer.logger)[0].decode(String.self)
        #expect(poolWhere1 == portB)

        // Failover: the second host turns read-only, the first writable, the
        // session is cut. The runner's next call reconnects to the first.
        try await readOnly(b, true)
        try await readOnly(a, false)
        let pid = try await db.run("pid", timeout: .seconds(60)) { try await $0.scalar("SELECT pg_backend_pid()", as: Int32.self) }
        try await b.withConnection(logger: TestServer.logger) { try await $0.exec("SELECT pg_terminate_backend(\(pid))") }
        // The pool's sessions are cut too; the ones it opens again on the
        // second host are read-only, which its check finds: it moves.
        try await b.withConnection(logger: TestServer.logger) { conn in
            try await conn.exec(
                PostgresQuery(
                    unsafeSQL: """
                        SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '\(database)' AND pid <> pg_backend_pid()
                        """))
        }
        var poolWhere2 = ""
        let poolMoved = try await waitUntil(60) {
            poolWhere2 =
                (try? await pool.rows(
                    "SELECT current_setting('port') || ':' || current_setting('transaction_read_only')", logger: TestServer.logger
                ).first?.decode(String.self)) ?? ""
            return poolWhere2 == "\(portA):off"
        }
        #expect(poolMoved, "after the failover the pool's sessions are on \(poolWhere2)")
        #expect(pool.moves == 1)
        var where2 = ""
        let moved = try await waitUntil(60) {
            where2 =
                (try? await db.run("port", timeout: .seconds(60)) { conn in
                    try await conn.scalar(
                        "SELECT current_setting('port') || ':' || current_setting('transaction_read_only')", as: String.self)
                }) ?? ""
            return where2 == "\(portA):off"
        }
        #expect(moved, "after the failover the session is on \(where2)")
        await db.close(timeout: .seconds(5))
        try await readOnly(b, false)
        for server in [a, b] {
            try? await server.withConnection(logger: TestServer.logger) { conn in
                try await conn.exec(PostgresQuery(unsafeSQL: "DROP DATABASE IF EXISTS \(database) WITH (FORCE)"))
            }
        }
    }
}
