import DispatchPolicy
import PostgresNIO
import Testing

@Suite("Connection settings")
struct ConnectionSettingsTests {
    @Test("a full URL")
    func fullURL() throws {
        let s = try ConnectionSettings(url: "postgres://app:s%40cret@db.example:6543/jobs?sslmode=require")
        #expect(s.endpoint == .tcp(host: "db.example", port: 6543))
        #expect(s.username == "app")
        #expect(s.password == "s@cret")
        #expect(s.database == "jobs")
        #expect(s.sslMode == .require)
        #expect(s.description == "postgres://app@db.example:6543/jobs")
    }

    @Test("an IPv6 literal host, as psql takes it: the address without its brackets, printed back with them")
    func ipv6() throws {
        let s = try ConnectionSettings(url: "postgres://u@[::1]:5433/db")
        #expect(s.endpoint == .tcp(host: "::1", port: 5433))
        #expect(s.description == "postgres://u@[::1]:5433/db")
        #expect(try ConnectionSettings(url: s.description).endpoint == s.endpoint)
    }

    @Test("an error about a URL never prints its password, whether or not the URL parses")
    func redactionOfUnparsable() {
        for url in [
            "postgres://app:hunter2@[db.example/jobs", "mysql://app:hunter2@db/jobs?password=hunter2",
            "not a url at all password=hunter2", "mysql://app:hun ter2@db/x",
        ] {
            let error = #expect(throws: DispatchPolicyError.self) { try ConnectionSettings(url: url) }
            #expect(
                error.map { !$0.description.contains("hunter2") && !$0.description.contains("hun ter2") } == true,
                "\(url): \(String(describing: error))")
        }
        #expect(ConnectionSettingsRedaction.of("postgres://app:hunter2@[db.example/jobs") == "postgres://app:***@[db.example/jobs")
        #expect(ConnectionSettingsRedaction.of("host=h password='a b\\'c' user=u") == "host=h password=*** user=u")
        #expect(
            ConnectionSettingsRedaction.of("postgres://u@h/db?sslmode=require&password=x%20y&a=b")
                == "postgres://u@h/db?sslmode=require&password=***&a=b")
    }

    @Test("postgresql:// and a Unix socket directory in ?host=")
    func socketURL() throws {
        let s = try ConnectionSettings(url: "postgresql://postgres@/postgres?host=/tmp/pg-dir&port=5433")
        #expect(s.endpoint == .unixSocket(path: "/tmp/pg-dir/.s.PGSQL.5433"))
        #expect(s.sslMode == .prefer, "as given; TLS does not apply to a socket")
        #expect(s.description == "postgres://postgres@/postgres?host=/tmp/pg-dir&port=5433")
        #expect(try ConnectionSettings(url: s.description).endpoint == s.endpoint)
    }

    @Test("parts the URL leaves out come from PG* variables, then libpq defaults")
    func fallbacks() throws {
        let env = ["PGPORT": "7777", "PGUSER": "envuser", "PGPASSWORD": "pw", "PGDATABASE": "envdb"]
        let s = try ConnectionSettings(url: "postgres://localhost", environment: env)
        #expect(s.endpoint == .tcp(host: "localhost", port: 7777))
        #expect(s.username == "envuser")
        #expect(s.password == "pw")
        #expect(s.database == "envdb")
        #expect(s.sslMode == .prefer)
    }

    @Test("PG* variables alone; the database defaults to the user")
    func environmentOnly() throws {
        let s = try ConnectionSettings(environment: ["PGHOST": "/var/run/postgresql", "PGUSER": "worker"])
        #expect(s.endpoint == .unixSocket(path: "/var/run/postgresql/.s.PGSQL.5432"))
        #expect(s.database == "worker")
        let t = try ConnectionSettings(environment: ["USER": "me"])
        #expect(t.endpoint == .unixSocket(path: "\(ConnectionSettings.defaultHost)/.s.PGSQL.5432"), "libpq's default: the socket directory")
        #expect(t.username == "me")
    }

    @Test("resolve: explicit URL, else DATABASE_URL, else PG*")
    func resolveOrder() throws {
        let env = ["DATABASE_URL": "postgres://u@from-env/db", "PGHOST": "from-pghost", "PGUSER": "u"]
        #expect(
            try ConnectionSettings.resolve(url: "postgres://u@from-flag/db", environment: env).endpoint
                == .tcp(host: "from-flag", port: 5432))
        #expect(try ConnectionSettings.resolve(url: nil, environment: env).endpoint == .tcp(host: "from-env", port: 5432))
        var noURL = env
        noURL["DATABASE_URL"] = nil
        #expect(try ConnectionSettings.resolve(url: nil, environment: noURL).endpoint == .tcp(host: "from-pghost", port: 5432))
    }

    @Test(
        "bad settings are refused with a clear message",
        arguments: [
            "mysql://u@h/db", "not a url", "postgres://u@h:99999/db", "postgres://u@h/db?sslmode=sometimes",
            "postgres://u@h:9223372036854775808/db", "postgres://u@h:-1/db",
        ])
    func refused(_ url: String) {
        #expect(throws: DispatchPolicyError.self) { try ConnectionSettings(url: url) }
    }

    @Test("a password never appears in the description or in an error")
    func redaction() throws {
        let settings = try ConnectionSettings(url: "postgres://u:hunter2@h/db")
        #expect(settings.password == "hunter2", "the password was read, so leaving it out of the text is what is tested")
        #expect(settings.description == "postgres://u@h:5432/db")
        let error = try #require(#expect(throws: DispatchPolicyError.self) { try ConnectionSettings(url: "mysql://u:hunter2@h/db") })
        // The error shows the URL it refused, with the password masked.
        #expect(error.description.contains("mysql://u:***@h/db"), "\(error.description)")
        #expect(!error.description.contains("hunter2"), "\(error.description)")
    }
}

@Suite("Durations")
struct DurationParserTests {
    @Test(
        "units and compounds",
        arguments: [
            ("55s", Duration.seconds(55)), ("5m", .seconds(300)), ("1h30m", .seconds(5400)),
            ("250ms", .milliseconds(250)), ("1.5s", .milliseconds(1500)), ("2d", .seconds(172_800)),
            // Zero needs no unit (issue 12's hostile pass: `--busy-pause 0` was refused).
            ("0", .zero), ("0.0", .zero), ("00", .zero), ("0ms", .zero),
        ])
    func parses(_ text: String, _ expected: Duration) {
        #expect(DurationParser.parse(text) == expected)
    }

    @Test("rejects what is not a duration", arguments: ["", "5", "s", "5 parsecs", "-5s", "5x", "0.5", ".", "0..0", "-0", "10"])
    func rejects(_ text: String) {
        #expect(DurationParser.parse(text) == nil)
    }
}

@Suite("Policy files")
struct PolicyFileTests {
    @Test("one policy or an array; the text is kept as written")
    func shapes() throws {
        let one = try PolicyCatalog.PolicyFile(json: #"{"name": "a", "config": {"batch_size": 1.0}}"#)
        #expect(one.names == ["a"] && !one.isArray)
        #expect(one.json.contains("1.0"))
        let many = try PolicyCatalog.PolicyFile(json: #"[{"name": "a", "config": {}}, {"name": "b", "config": {}}]"#)
        #expect(many.names == ["a", "b"] && many.isArray)
    }

    @Test(
        "shape errors name the place",
        arguments: [
            (#"[]"#, "holds no policy"),
            (#"[{"name": "a"}]"#, "policy file[0].config must be an object"),
            (#"{"config": {}}"#, "policy file.name must be a string"),
            (#"{"name": "a", "config": {}, "paused": true}"#, "policy file.paused is not a known field"),
            (#"[1]"#, "policy file[0] must be an object"),
            (#"{oops"#, "not valid JSON"),
        ])
    func errors(_ json: String, _ message: String) {
        do {
            _ = try PolicyCatalog.PolicyFile(json: json)
            Issue.record("accepted \(json)")
        } catch let error as DispatchPolicyError {
            #expect(error.code == .invalidArgument)
            #expect(error.message.contains(message), "\(error.message)")
        } catch {
            Issue.record("\(error)")
        }
    }
}

@Suite("Job specs")
struct JobSpecTests {
    @Test("Encodable args and context become JSON text")
    func encodes() throws {
        struct Args: Encodable {
            var event: Int
            var url: String
        }
        let spec = try JobSpec(args: Args(event: 7, url: "https://x/y"), context: ["account_id": "a1"], dedupeKey: "event:7")
        #expect(spec.argsJSON == #"{"event":7,"url":"https://x/y"}"#)
        #expect(spec.contextJSON == #"{"account_id":"a1"}"#)
        #expect(spec.dedupeKey == "event:7")
    }
}

@Suite("Session settings")
struct SessionSettingsTests {
    @Test("session settings go into the startup packet in whole milliseconds, bounded, and none by default")
    func parameters() throws {
        let url = try ConnectionSettings(url: "postgres://u@h/db")
        #expect(try url.postgresConfiguration().options.additionalStartupParameters.isEmpty)
        let runner = try url.with(session: .runner).postgresConfiguration().options.additionalStartupParameters
        #expect(
            runner.map { "\($0.0)=\($0.1)" } == [
                "statement_timeout=300000", "idle_in_transaction_session_timeout=60000", "client_connection_check_interval=2000",
            ])
        let odd = SessionSettings(
            statementTimeout: .milliseconds(1500.7), idleInTransactionTimeout: .seconds(-5),
            connectionCheckInterval: .seconds(Int64.max))
        #expect(
            odd.parameters.map { "\($0.0)=\($0.1)" } == [
                "statement_timeout=1500", "idle_in_transaction_session_timeout=0", "client_connection_check_interval=86400000",
            ])
        #expect(SessionSettings(statementTimeout: .zero).parameters.count == 1)
    }
}
