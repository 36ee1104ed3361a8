import DispatchPolicy
import NIOSSL
import PostgresNIO
import Synchronization
import Testing

/// In-memory files for connection settings: path → (text, mode).
private func files(_ entries: [String: (String, Int)], home: String? = "/home/u") -> FileAccess {
    FileAccess(
        read: { entries[$0]?.0 }, exists: { entries[$0] != nil }, permissions: { entries[$0]?.1 },
        homeDirectory: { home })
}

@Suite("Connection strings as libpq reads them")
struct ConnInfoTests {
    @Test("keyword/value strings, with quoted values and escapes")
    func keywordValue() throws {
        let s = try ConnectionSettings(
            conninfo: #"host=db.example port = 6543 user='app user' password='it\'s' dbname=jobs sslmode=verify-full application_name=api"#,
            environment: [:], files: .none)
        #expect(s.hosts == [.tcp(host: "db.example", port: 6543)])
        #expect(s.username == "app user" && s.password == "it's" && s.database == "jobs")
        #expect(s.sslMode == .verifyFull && s.applicationName == "api")
    }

    @Test("several hosts in a URL and in keyword/value form; one port for all or one each")
    func severalHosts() throws {
        let url = try ConnectionSettings(
            conninfo: "postgres://u@a:5433,[::1]:5434,/tmp/sock/db?target_session_attrs=read-write", environment: [:], files: .none)
        // An empty host in the list is libpq's default host.
        #expect(url.hosts.count == 3)
        #expect(url.hosts[0] == .tcp(host: "a", port: 5433) && url.hosts[1] == .tcp(host: "::1", port: 5434))
        #expect(url.targetSessionAttributes == .readWrite)
        let kv = try ConnectionSettings(conninfo: "host=a,b,/run/pg port=7000 user=u", environment: [:], files: .none)
        #expect(kv.hosts == [.tcp(host: "a", port: 7000), .tcp(host: "b", port: 7000), .unixSocket(path: "/run/pg/.s.PGSQL.7000")])
        #expect(kv.description == "postgres://u@/u?host=a,b,/run/pg&port=7000,7000,7000")
        let mismatch = #expect(throws: DispatchPolicyError.self) {
            try ConnectionSettings(conninfo: "host=a,b,c port=1,2", environment: [:], files: .none)
        }
        #expect(mismatch?.message.contains("could not match 2 port numbers to 3 hosts") == true)
    }

    @Test("precedence: the string, then its service, then PG* variables, then defaults")
    func precedence() throws {
        let service = """
            # comment
            [other]
            host=wrong
            [jobs]
            host=svc-host
            port=6000
            dbname=svc-db
            sslmode=require
            """
        let env = [
            "PGSERVICEFILE": "/etc/svc.conf", "PGHOST": "env-host", "PGDATABASE": "env-db", "PGUSER": "env-user",
            "PGAPPNAME": "env-app", "PGCONNECT_TIMEOUT": "1", "PGSSLROOTCERT": "/ca.pem",
        ]
        let s = try ConnectionSettings(
            conninfo: "service=jobs dbname=given", environment: env,
            files: files(["/etc/svc.conf": (service, 0o644)]))
        #expect(s.hosts == [.tcp(host: "svc-host", port: 6000)])
        #expect(s.database == "given", "the string wins over the service")
        #expect(s.username == "env-user", "the service leaves it out: PGUSER")
        #expect(s.sslMode == .require && s.sslRootCert == "/ca.pem" && s.applicationName == "env-app")
        #expect(s.connectTimeout == .seconds(2), "libpq's minimum of 2 s")
        // PGSERVICE names it too; the system file is read when the user's lacks it.
        let system = try ConnectionSettings(
            conninfo: "", environment: ["PGSERVICE": "jobs", "PGSYSCONFDIR": "/sys"],
            files: files(["/home/u/.pg_service.conf": ("[x]\nhost=h", 0o600), "/sys/pg_service.conf": (service, 0o644)]))
        #expect(system.hosts == [.tcp(host: "svc-host", port: 6000)])
        let missing = #expect(throws: DispatchPolicyError.self) {
            try ConnectionSettings(conninfo: "service=nope", environment: [:], files: files([:]))
        }
        #expect(missing?.message == "definition of service \"nope\" not found")
    }

    @Test(".pgpass: first matching line, wildcards, escapes, the default socket as localhost, ignored when others can read it")
    func passfile() throws {
        let pgpass = #"""
            # host:port:db:user:password
            other:*:*:*:nope
            db.example:6543:jobs:app:s\:cr\\t
            *:*:*:app:fallback
            localhost:5432:*:sock:via-socket
            """#
        let s = try ConnectionSettings(
            conninfo: "postgres://app@db.example:6543/jobs", environment: [:],
            files: files(["/home/u/.pgpass": (pgpass, 0o600)]))
        #expect(s.password == nil, "not given: read per host at connection time")
        #expect(s.password(for: s.hosts[0]) == #"s:cr\t"#)
        #expect(s.password(for: .tcp(host: "elsewhere", port: 5432)) == "fallback")
        let socket = try ConnectionSettings(
            conninfo: "user=sock host=\(ConnectionSettings.defaultHost)", environment: [:],
            files: files(["/home/u/.pgpass": (pgpass, 0o600)]))
        #expect(socket.password(for: socket.hosts[0]) == "via-socket")
        let open = try ConnectionSettings(
            conninfo: "postgres://app@db.example:6543/jobs", environment: [:],
            files: files(["/home/u/.pgpass": (pgpass, 0o644)]))
        #expect(open.password(for: open.hosts[0]) == nil, "a password file others can read is ignored")
        let named = try ConnectionSettings(
            conninfo: "postgres://app@h/db?passfile=/p", environment: ["PGPASSFILE": "/q"],
            files: files(["/p": ("*:*:*:*:from-p", 0o600), "/q": ("*:*:*:*:from-q", 0o600)]))
        #expect(named.password(for: named.hosts[0]) == "from-p")
        let given = try ConnectionSettings(
            conninfo: "postgres://app:given@h/db", environment: [:],
            files: files(["/home/u/.pgpass": (pgpass, 0o600)]))
        #expect(given.password(for: given.hosts[0]) == "given")
    }

    @Test("sslmode, target_session_attrs and connect_timeout are checked; unknown keywords are refused, libpq's no-op ones accepted")
    func refusals() throws {
        for (text, message) in [
            ("sslmode=maybe", "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full"),
            ("target_session_attrs=rw", "target_session_attrs must be one of"),
            ("connect_timeout=-1", "connect_timeout must be whole seconds"),
            ("connect_timeout=ten", "connect_timeout must be whole seconds"),
            ("hostaddr=1.2.3.4", "unknown connection option \"hostaddr\""),
            ("gssencmode=require", "gssencmode=require is not supported"),
            ("host=h port", "missing \"=\""),
            ("password='x", "unterminated quoted value"),
            ("postgres://u@[::1/db", "no closing bracket"),
        ] {
            let error = #expect(throws: DispatchPolicyError.self, "\(text)") {
                try ConnectionSettings(conninfo: text, environment: [:], files: .none)
            }
            #expect(error?.message.contains(message) == true, "\(text): \(String(describing: error?.message))")
            #expect(error?.description.contains("'x") != true)
        }
        #expect(
            try ConnectionSettings(
                conninfo: "keepalives=1 gssencmode=disable channel_binding=prefer host=h", environment: [:], files: .none
            )
            .hosts == [.tcp(host: "h", port: 5432)])
        #expect(try ConnectionSettings(conninfo: "postgres://h/db?ssl=true", environment: [:], files: .none).sslMode == .require)
        #expect(try ConnectionSettings(conninfo: "connect_timeout=0 host=h", environment: [:], files: .none).connectTimeout == nil)
    }

    /// Found by a hostile pass: each of these printed a password, or part of one.
    @Test(
        "no error shows a password, however the string is malformed",
        arguments: [
            "postgres://pwuser:s3cr?et@127.0.0.1:55450/postgres",
            "host=127.0.0.1 password\t=\tTABSECRET bogus",
            "postgres://127.0.0.1/db?pass%77ord=PCTSECRET&bogus",
            "host=127.0.0.1 password=se#HASHSECRET bogus",
            "host=127.0.0.1 password=se\\ BSSECRET bogus",
            "host=127.0.0.1 password=a b SPACESECRET",
            "postgres://u:pw@h/db?password=QUERYSECRET&x",
        ])
    func noPasswordInErrors(_ text: String) {
        let error = #expect(throws: DispatchPolicyError.self) { try ConnectionSettings(conninfo: text, environment: [:], files: .none) }
        let shown = error.map { "\($0.description) \($0.hint ?? "")" } ?? ""
        for secret in ["s3cr", "et@", "TABSECRET", "PCTSECRET", "HASHSECRET", "BSSECRET", "SPACESECRET", "QUERYSECRET", ":pw@"] {
            #expect(!shown.contains(secret), "\(secret) shown: \(shown)")
        }
    }

    @Test("a NUL in the URL is refused, as libpq refuses it")
    func nul() {
        for url in ["postgres://postgres@127.0.0.1%00:5432/db", "postgres://u@h/post%00gres", "postgres://post%00gres@h/db"] {
            let error = #expect(throws: DispatchPolicyError.self) { try ConnectionSettings(conninfo: url, environment: [:], files: .none) }
            #expect(error?.message.contains("forbidden value %00") == true, "\(url)")
        }
    }

    @Test("the application name: given, else the fallback (the CLI's command)")
    func applicationName() throws {
        let fallback = try ConnectionSettings.resolve(
            url: "postgres://h/db", environment: [:], fallbackApplicationName: "dispatch-policy run", files: .none)
        #expect(fallback.applicationName == nil && fallback.fallbackApplicationName == "dispatch-policy run")
        let config = try fallback.postgresConfiguration()
        #expect(config.options.additionalStartupParameters.contains { $0 == ("application_name", "dispatch-policy run") })
        let given = try ConnectionSettings.resolve(
            url: "postgres://h/db?application_name=billing&options=-c%20work_mem%3D8MB", environment: [:],
            fallbackApplicationName: "dispatch-policy run", files: .none)
        let parameters = try given.postgresConfiguration().options.additionalStartupParameters
        #expect(parameters.contains { $0 == ("application_name", "billing") })
        #expect(parameters.contains { $0 == ("options", "-c work_mem=8MB") })
    }

    @Test("verify-ca and verify-full need a root certificate; require uses one when it is there")
    func rootCertificate() throws {
        let verify = try ConnectionSettings(conninfo: "host=h sslmode=verify-full", environment: ["HOME": "/nohome"], files: files([:]))
        let error = #expect(throws: DispatchPolicyError.self) { try verify.tlsConfiguration() }
        #expect(error?.message.contains("/nohome/.postgresql/root.crt does not exist") == true, "\(String(describing: error))")
        let require = try ConnectionSettings(conninfo: "host=h sslmode=require", environment: ["HOME": "/nohome"], files: files([:]))
        #expect(try require.tlsConfiguration().certificateVerification == .none)
        let system = try ConnectionSettings(conninfo: "host=h sslmode=verify-ca sslrootcert=system", environment: [:], files: files([:]))
        #expect(try system.tlsConfiguration().certificateVerification == .noHostnameVerification)
        // As libpq: a named root certificate that is missing makes require verify nothing;
        // a missing client certificate is no client certificate.
        let missing = try ConnectionSettings(
            conninfo: "host=h sslmode=require sslrootcert=/nonexistent sslcert=/missing.crt sslkey=/missing.key",
            environment: ["HOME": "/nohome"], files: files([:]))
        let relaxed = try missing.tlsConfiguration()
        #expect(relaxed.certificateVerification == .none)
        #expect(relaxed.certificateChain.isEmpty)
    }
}
