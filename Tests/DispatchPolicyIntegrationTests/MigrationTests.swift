import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

/// Every object of the schema, with its definition and comment, one per line.
let schemaFingerprintSQL: PostgresQuery = """
    WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = 'dispatch_policy')
    SELECT coalesce(string_agg(line, E'\\n' ORDER BY line), '') FROM (
      SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' ' || coalesce(array_to_string(c.reloptions, ','), '')
             || ' -- ' || coalesce(obj_description(c.oid, 'pg_class'), '') AS line
      FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM ns)
      UNION ALL
      SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
             || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
             || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
             || ' -- ' || coalesce(col_description(c.oid, a.attnum), '')
      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
      WHERE c.relnamespace = (SELECT oid FROM ns) AND a.attnum > 0 AND NOT a.attisdropped
      UNION ALL
      SELECT 'function ' || p.oid::regprocedure::text || ' ' || pg_get_function_result(p.oid)
             || ' ' || p.provolatile::text || p.prosecdef::text || ' ' || md5(p.prosrc)
             || ' -- ' || coalesce(obj_description(p.oid, 'pg_proc'), '')
      FROM pg_proc p WHERE p.pronamespace = (SELECT oid FROM ns)
      UNION ALL
      SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'dispatch_policy'
      UNION ALL
      SELECT 'constraint ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
      FROM pg_constraint WHERE connamespace = (SELECT oid FROM ns)
      UNION ALL
      SELECT 'view ' || viewname || ' ' || md5(definition) FROM pg_views WHERE schemaname = 'dispatch_policy'
    ) objects
    """

@Suite("Migrations", .timeLimit(.minutes(15)))
struct MigrationTests {
    @Test("migrate applies every file, in order, and records version and checksum")
    func appliesEveryFile() async throws {
        try await withTestDatabase(migrated: false) { conn, _ in
            let report = try await Migrator(logger: TestServer.logger).migrate(on: conn)
            #expect(report.applied == Migration.embedded.map(\.fileName))
            #expect(report.alreadyApplied.isEmpty)
            let recorded = try await conn.rows(
                "SELECT version, name, length(checksum) FROM dispatch_policy.schema_migrations ORDER BY version",
                logger: TestServer.logger
            ).map { try $0.decode((Int, String, Int).self) }
            #expect(recorded.map(\.0) == Migration.embedded.map { $0.version! })
            #expect(recorded.map(\.1) == Migration.embedded.map(\.fileName))
            #expect(recorded.allSatisfy { $0.2 == 64 })
            #expect(try await conn.scalar("SELECT to_regclass('dispatch_policy.staged_jobs') IS NOT NULL", as: Bool.self))
        }
    }

    @Test("running migrate twice changes nothing")
    func secondRunIsANoOp() async throws {
        try await withTestDatabase(migrated: false) { conn, _ in
            try await Migrator(logger: TestServer.logger).migrate(on: conn)
            let before = try await conn.scalar(schemaFingerprintSQL, as: String.self)
            let appliedAt = try await conn.scalar("SELECT max(applied_at)::text FROM dispatch_policy.schema_migrations", as: String.self)
            let second = try await Migrator(logger: TestServer.logger).migrate(on: conn)
            #expect(second.applied.isEmpty)
            #expect(second.alreadyApplied.count == Migration.embedded.count)
            #expect(try await conn.scalar(schemaFingerprintSQL, as: String.self) == before)
            #expect(
                try await conn.scalar("SELECT max(applied_at)::text FROM dispatch_policy.schema_migrations", as: String.self) == appliedAt)
        }
    }

    /// The migrators start together (see ``raceFromOneStart``): each has
    /// its session open and waits at the start line, so none can finish
    /// before the others begin.
    @Test("four migrators racing on an empty database apply each file exactly once")
    func racingMigrators() async throws {
        let settings = try await TestServer.shared.freshDatabase(migrated: false)
        let key: Int64 = 7_340_003
        let reports = try await raceFromOneStart(settings, racers: 4, key: key) { _ in
            try await TestServer.withConnection(settings) { conn async throws in
                try await conn.exec("SELECT pg_advisory_lock_shared(\(key))")
                return try await Migrator(logger: TestServer.logger).migrate(on: conn)
            }
        }
        let allApplied = reports.flatMap(\.applied)
        #expect(allApplied.sorted() == Migration.embedded.map(\.fileName).sorted())
        #expect(reports.filter { !$0.applied.isEmpty }.count == 1)
        try await TestServer.withConnection(settings) { conn async throws in
            #expect(
                try await conn.scalar("SELECT count(*) FROM dispatch_policy.schema_migrations", as: Int.self) == Migration.embedded.count)
        }
    }

    @Test("an applied file that was edited afterwards is reported, not re-run")
    func editedFileIsReported() async throws {
        try await withTestDatabase { conn, _ in
            var edited = Migration.embedded
            edited[1] = Migration(fileName: edited[1].fileName, sql: edited[1].sql + "\n-- an innocent edit\n")
            let before = try await conn.scalar(schemaFingerprintSQL, as: String.self)
            do {
                try await Migrator(migrations: edited, logger: TestServer.logger).migrate(on: conn)
                Issue.record("an edited migration was accepted")
            } catch let error as DispatchPolicyError {
                #expect(error.code == .migrationChecksumMismatch)
                #expect(error.message.contains(edited[1].fileName))
            }
            #expect(try await conn.scalar(schemaFingerprintSQL, as: String.self) == before)
        }
    }

    @Test("a database migrated by a newer build is reported")
    func unknownVersionIsReported() async throws {
        try await withTestDatabase { conn, _ in
            try await conn.exec(
                "INSERT INTO dispatch_policy.schema_migrations (version, name, checksum) VALUES (9999, '9999_future.sql', 'x')")
            do {
                try await Migrator(logger: TestServer.logger).migrate(on: conn)
                Issue.record("an unknown recorded migration was ignored")
            } catch let error as DispatchPolicyError {
                #expect(error.code == .migrationUnknownToThisBuild)
                #expect(error.message.contains("9999_future.sql"))
            }
        }
    }

    @Test("a failing migration leaves nothing of itself behind and is not recorded")
    func failingMigrationRollsBack() async throws {
        try await withTestDatabase { conn, _ in
            let bad = Migration(
                fileName: "0999_bad.sql",
                sql: """
                    CREATE TABLE dispatch_policy.half_done (id int);
                    CREATE FUNCTION dispatch_policy.f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;
                    SELECT 1 / 0;
                    """)
            do {
                try await Migrator(migrations: Migration.embedded + [bad], logger: TestServer.logger).migrate(on: conn)
                Issue.record("the failing migration succeeded")
            } catch let error as DispatchPolicyError {
                #expect(error.code == .migrationFailed)
                #expect(error.sqlState == "22012")
                #expect(error.message.contains("0999_bad.sql"))
                #expect(error.message.contains("statement 3 of 3"))
            }
            #expect(try await conn.scalar("SELECT to_regclass('dispatch_policy.half_done') IS NULL", as: Bool.self))
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.schema_migrations WHERE version = 999", as: Int.self) == 0)
            // The advisory lock was released: another run goes through.
            try await Migrator(logger: TestServer.logger).migrate(on: conn)
        }
    }

    /// The files of a run apply together (issue 12's fold keeps one
    /// definition of a function per release, so no session may see the
    /// schema between two of a release's files).
    @Test("the pending files of a run apply in one transaction: one that fails leaves none of the run behind")
    func runIsOneTransaction() async throws {
        try await withTestDatabase { conn, _ in
            let good = Migration(fileName: "0998_good.sql", sql: "CREATE TABLE dispatch_policy.good_one (id int);")
            let bad = Migration(fileName: "0999_bad.sql", sql: "SELECT 1 / 0;")
            do {
                try await Migrator(migrations: Migration.embedded + [good, bad], logger: TestServer.logger).migrate(on: conn)
                Issue.record("the failing migration succeeded")
            } catch let error as DispatchPolicyError {
                #expect(error.message.contains("0999_bad.sql"), "\(error)")
                #expect(error.hint?.contains("Nothing of this run's 2 migrations was applied") == true, "\(error)")
            }
            #expect(try await conn.scalar("SELECT to_regclass('dispatch_policy.good_one') IS NULL", as: Bool.self))
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.schema_migrations WHERE version >= 998", as: Int.self) == 0)
            let report = try await Migrator(migrations: Migration.embedded + [good], logger: TestServer.logger).migrate(on: conn)
            #expect(report.applied == ["0998_good.sql"])
        }
    }

    /// Found by hostile testing: a job written directly with a context that
    /// is not an object, or a 20 kB queue name, failed every tick of its
    /// policy. 0008 keeps such jobs as dead, with the reason, and constraints
    /// keep new ones out.
    @Test("jobs staged before 0008 that could never be admitted are kept as dead, with the reason")
    func unadmittableJobsAreBuried() async throws {
        try await withTestDatabase(migrated: false) { conn, _ in
            let before = Array(Migration.embedded.prefix { ($0.version ?? 0) < 8 })
            try await Migrator(migrations: before, logger: TestServer.logger).migrate(on: conn)
            try await conn.exec("SELECT dispatch_policy.declare_policy('p', '{}')")
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context, dedupe_key)
                VALUES (1, 'p', 'default', '1', '[1, 2]', 'k1'), (2, 'p', repeat('q', 20000), '2', '{}', NULL),
                       (3, 'p', 'default', '3', '{}', NULL)
                """)
            try await conn.exec("INSERT INTO dispatch_policy.dedupe_keys VALUES ('p', 'k1', 1)")
            try await Migrator(logger: TestServer.logger).migrate(on: conn)
            let dead = try await conn.rows(
                "SELECT id, last_error FROM dispatch_policy.finished_jobs WHERE status = 'dead' ORDER BY id", logger: TestServer.logger
            )
            .map { try $0.decode((Int64, String).self) }
            #expect(dead.map(\.0) == [1, 2])
            #expect(dead.first?.1 == "could not be admitted: its context is not a JSON object")
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.dedupe_keys", as: Int.self) == 0)
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p").admitted == 1)
        }
    }

    @Test("every table, column, function and view has a COMMENT")
    func everythingIsCommented() async throws {
        try await withTestDatabase { conn, _ in
            let missing = try await conn.rows(
                """
                WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = 'dispatch_policy')
                SELECT 'relation ' || c.relname FROM pg_class c
                WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relkind IN ('r', 'v', 'S')
                  AND obj_description(c.oid, 'pg_class') IS NULL
                  -- identity sequences are part of their column
                  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'i')
                UNION ALL
                SELECT 'column ' || c.relname || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relkind IN ('r', 'v') AND a.attnum > 0
                  AND NOT a.attisdropped AND col_description(c.oid, a.attnum) IS NULL
                UNION ALL
                SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p
                WHERE p.pronamespace = (SELECT oid FROM ns) AND obj_description(p.oid, 'pg_proc') IS NULL
                UNION ALL
                SELECT 'schema' WHERE obj_description((SELECT oid FROM ns), 'pg_namespace') IS NULL
                """,
                logger: TestServer.logger
            ).map { try $0.decode(String.self) }
            #expect(missing == [])
        }
    }

    /// The catalog fingerprint of a new database after `migrate`.
    static func freshMigrateFingerprint() async throws -> String {
        let fresh = try await TestServer.shared.freshDatabase(migrated: false)
        return try await TestServer.withConnection(fresh) { other in
            try await Migrator(logger: TestServer.logger).migrate(on: other)
            return try await other.scalar(schemaFingerprintSQL, as: String.self)
        }
    }

    /// The lines of each fingerprint that the other lacks, sorted.
    static func differences(_ a: String, _ b: String) -> ([Substring], [Substring]) {
        let left = Set(a.split(separator: "\n"))
        let right = Set(b.split(separator: "\n"))
        return (left.subtracting(right).sorted(), right.subtracting(left).sorted())
    }

    /// The 0.1.0 data of the pg_regress upgrade test (sql/test/sql/upgrade.sql,
    /// between its "0.1.0 in use." and "The update." markers): policies, and
    /// jobs in every state left by the 0.1.0 API.
    static func v010InUse() throws -> String {
        let text = try String(contentsOf: packageRoot.appending(path: "sql/test/sql/upgrade.sql"), encoding: .utf8)
        let start = try #require(text.range(of: "-- 0.1.0 in use.\n"))
        let end = try #require(text.range(of: "-- The update.\n"))
        return String(text[start.upperBound..<end.lowerBound])
    }

    @Test(
        "migrate from 0.1.0 (migrations 0001-0006) with jobs in every state: rows kept, check() clean, the catalog of a fresh migrate, jobs admitted"
    )
    func migrateFrom010() async throws {
        try await withTestDatabase(migrated: false) { conn, settings in
            let released = Migration.embedded.prefix { ($0.version ?? 0) <= 6 }
            try #require(released.count == 6)
            try await Migrator(migrations: Array(released), logger: TestServer.logger).migrate(on: conn)
            let psql = try await TestServer.shared.binDirectory() + "/psql"
            let setup = try await runProcess(
                psql, ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"],
                environment: libpqEnvironment(settings), stdin: try Self.v010InUse())
            try #require(setup.status == 0, "the 0.1.0 data: \(setup.stderr)")
            let jobsSQL: PostgresQuery = """
                SELECT string_agg(id::text || ':' || policy, ',' ORDER BY id) FROM (
                  SELECT id, policy FROM dispatch_policy.staged_jobs UNION ALL
                  SELECT id, policy FROM dispatch_policy.admitted_jobs UNION ALL
                  SELECT id, policy FROM dispatch_policy.finished_jobs) j
                """
            let before = try await conn.scalar(jobsSQL, as: String.self)

            let report = try await Migrator(logger: TestServer.logger).migrate(on: conn)
            #expect(report.applied.count == Migration.embedded.count - 6)
            #expect(try await conn.scalar(jobsSQL, as: String.self) == before, "every job of 0.1.0 is still there")
            let findings = try await conn.rows("SELECT row_to_json(c)::text FROM dispatch_policy.check() c", logger: TestServer.logger)
                .map { try $0.decode(String.self) }
            #expect(findings == [], "check() after the upgrade")
            let upgraded = try await conn.scalar(schemaFingerprintSQL, as: String.self)
            let (onlyUpgraded, onlyFresh) = try await Self.differences(upgraded, Self.freshMigrateFingerprint())
            #expect(onlyUpgraded == [], "only after the upgrade")
            #expect(onlyFresh == [], "only in a fresh migrate")

            // The runner of this version admits what 0.1.0 left waiting.
            let pending = try await conn.scalar(
                "SELECT count(*)::int FROM dispatch_policy.staged_jobs WHERE not_before <= now()", as: Int.self)
            try #require(pending > 0)
            var admitted = 0
            for policy in ["webhooks", "reports", "long_keys", "mailer"] {
                admitted += try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: policy).admitted
            }
            #expect(admitted > 0)
            #expect(try await conn.rows("SELECT 1 FROM dispatch_policy.check()", logger: TestServer.logger).isEmpty)
        }
    }

    @Test("CREATE EXTENSION dispatch_policy gives the same objects as migrate")
    func extensionMatchesMigrate() async throws {
        try await withTestDatabase(migrated: false) { conn, _ in
            let available = try await conn.scalar(
                "SELECT count(*) FROM pg_available_extensions WHERE name = 'dispatch_policy'", as: Int.self)
            try #require(available == 1, "the extension is not installed: run `make -C sql install` (scripts/test does)")
            try await conn.exec("CREATE EXTENSION dispatch_policy")
            let fromExtension = try await conn.scalar(schemaFingerprintSQL, as: String.self)
            let members = try await conn.scalar(
                "SELECT count(*) FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid WHERE e.extname = 'dispatch_policy' AND d.deptype = 'e'",
                as: Int.self)
            #expect(members > 20)

            let (onlyExtension, onlyMigrate) = try await Self.differences(fromExtension, Self.freshMigrateFingerprint())
            #expect(onlyExtension == [], "only in the extension (is the installed extension stale? make -C sql install)")
            #expect(onlyMigrate == [], "only from migrate")
            #expect(fromExtension.contains("function dispatch_policy.stage("))

            // And migrate refuses to run over the extension's schema.
            do {
                try await Migrator(logger: TestServer.logger).migrate(on: conn)
                Issue.record("migrate ran over an extension-installed schema")
            } catch let error as DispatchPolicyError {
                #expect(error.code == .schemaInstalledAsExtension)
            }
        }
    }
}

/// Regression (issue 8, item 4): a dump and restore of a database that used
/// the extension lost every policy and job (no table was marked with
/// pg_extension_config_dump).
@Suite("Dump and restore", .timeLimit(.minutes(15)))
struct DumpRestoreTests {
    /// Rows of every table, and the job id sequence, as one text.
    static let contentsSQL: PostgresQuery = """
        SELECT string_agg(format('%s: %s', c.relname,
                 (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %s', c.oid::regclass), false, true, '')))[1]::text),
               E'\\n' ORDER BY c.relname)
               || E'\\njob_ids: ' || (SELECT last_value FROM dispatch_policy.job_ids)
               || E'\\npolicies: ' || (SELECT string_agg(name || '=' || config::text, ',' ORDER BY name) FROM dispatch_policy.policies)
               || E'\\ncounters: ' || (SELECT string_agg(partition || '=' || in_flight, ',' ORDER BY partition) FROM dispatch_policy.inflight_counters)
               || E'\\noverview: ' || (SELECT string_agg(format('%s pending=%s scheduled=%s in_flight=%s dead=%s', policy, pending, scheduled, in_flight, dead), ',' ORDER BY policy)
                                       FROM dispatch_policy.policy_overview)
        FROM pg_class c
        WHERE c.relnamespace = 'dispatch_policy'::regnamespace AND c.relkind = 'r' AND c.relname <> 'schema_migrations'
          -- History (0016) is not dumped with the extension: its triggers rebuild
          -- the counters from the restored jobs (compared through the overview).
          AND c.relname NOT IN ('stat_deltas', 'stat_minutes', 'policy_counters', 'partition_counters')
        """

    @Test("pg_dump and pg_restore keep every policy, job and gate state", arguments: ["migrate", "extension"])
    func dumpRestore(installedBy: String) async throws {
        let source = try await TestServer.shared.freshDatabase(migrated: installedBy == "migrate")
        let before = try await TestServer.withConnection(source) { conn async throws in
            if installedBy == "extension" { try await conn.exec("CREATE EXTENSION dispatch_policy") }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p",
                config: try PolicyConfig(maxAttempts: 1) {
                    Gate.concurrency(max: 3, partitionBy: "{acct}")
                    Gate.throttle(rate: 100, per: 1, partitionBy: "{acct}")
                    Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 5, targetLagMs: 1000)
                }.json())
            try await conn.exec(
                """
                SELECT dispatch_policy.stage('p', to_jsonb(i), jsonb_build_object('acct', 'a' || (i % 2)), dedupe_key => 'k' || i)
                FROM generate_series(1, 8) i
                """)
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            _ = try await ticker.tick(policy: "p")
            let claimed = try await conn.rows("SELECT id, attempt FROM dispatch_policy.claim('default', 'w', 3)", logger: TestServer.logger)
                .map { try $0.decode((Int64, Int).self) }
            try #require(claimed.count == 3)
            try await conn.exec("SELECT dispatch_policy.complete(\(claimed[0].0), attempt => \(claimed[0].1)::integer)")
            try await conn.exec("SELECT dispatch_policy.fail(\(claimed[1].0), 'boom', attempt => \(claimed[1].1)::integer)")
            _ = try await ticker.tick(policy: "p")
            return try await conn.scalar(Self.contentsSQL, as: String.self)
        }
        #expect(
            before.contains("finished_jobs: 2") && before.contains("admitted_jobs: 6") && before.contains("job_failures: 1"), "\(before)")

        let bin = try await TestServer.shared.binDirectory()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("dp-dump-\(getpid())-\(installedBy).dump").path
        defer { try? FileManager.default.removeItem(atPath: file) }
        try run(bin + "/pg_dump", ["--format=custom", "--file=\(file)", "--dbname=\(source.description)"])
        let target = try await TestServer.shared.freshDatabase(migrated: false)
        try run(bin + "/pg_restore", ["--exit-on-error", "--dbname=\(target.description)", file])

        try await TestServer.withConnection(target) { conn async throws in
            #expect(try await conn.scalar(Self.contentsSQL, as: String.self) == before)
            // The restored database keeps working: new ids follow the old ones,
            // dedupe keys still hold, and the gates still count what is in flight.
            let id = try await conn.scalar("SELECT dispatch_policy.stage('p', '9', '{\"acct\": \"a1\"}')", as: Int64.self)
            #expect(try await conn.scalar("SELECT max(id) FROM dispatch_policy.finished_jobs", as: Int64.self) < id)
            #expect(
                try await conn.scalar(
                    "SELECT outcome FROM dispatch_policy.stage_outcome('p', '1', dedupe_key => 'k4')", as: String.self) == "kept")
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            try await expectCountersConsistent(conn)
        }
    }

    private func run(_ executable: String, _ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let errors = Pipe()
        process.standardError = errors
        try process.run()
        let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\(executable) \(arguments.joined(separator: " ")): \(message)")
        try #require(process.terminationStatus == 0)
    }
}
