import FoundationEssentials
import Testing

@testable import DispatchPolicy

@Suite("SQL statement splitter")
struct SQLStatementSplitterTests {
    @Test("splits at top-level semicolons and drops empty pieces")
    func basic() {
        #expect(SQLStatementSplitter.split("SELECT 1; SELECT 2;\n\n;  ") == ["SELECT 1", "SELECT 2"])
        #expect(SQLStatementSplitter.split("SELECT 1") == ["SELECT 1"])
        #expect(SQLStatementSplitter.split("") == [])
    }

    @Test("keeps semicolons inside strings, identifiers and comments")
    func quoted() {
        let sql = """
            SELECT 'a;b', 'it''s; fine', E'esc\\';still', "odd;name" FROM t; -- trailing; comment
            /* block; /* nested; */ still comment; */ SELECT 2;
            """
        let statements = SQLStatementSplitter.split(sql)
        #expect(statements.count == 2)
        #expect(statements[0] == #"SELECT 'a;b', 'it''s; fine', E'esc\';still', "odd;name" FROM t"#)
        #expect(statements[1].hasSuffix("SELECT 2"))
    }

    @Test("keeps dollar-quoted bodies whole, with or without a tag")
    func dollarQuotes() {
        let sql = """
            CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$
            BEGIN
              PERFORM 1; RETURN 2;
            END
            $$;
            CREATE FUNCTION g() RETURNS text LANGUAGE sql AS $body$ SELECT '$$;' $body$;
            SELECT $1, a$b FROM x;
            """
        let statements = SQLStatementSplitter.split(sql)
        #expect(statements.count == 3)
        #expect(statements[0].contains("PERFORM 1; RETURN 2;"))
        #expect(statements[1].hasSuffix("$body$ SELECT '$$;' $body$"))
        #expect(statements[2] == "SELECT $1, a$b FROM x")
    }

    @Test("a comment-only file has no statements")
    func commentsOnly() {
        #expect(SQLStatementSplitter.split("-- nothing;\n/* here; */\n") == [])
    }

    @Test("every embedded migration splits so that each function body stays in one statement")
    func embeddedMigrations() {
        #expect(!Migration.embedded.isEmpty)
        for migration in Migration.embedded {
            let statements = migration.statements
            let functions = statements.filter { $0.contains("CREATE FUNCTION") }
            #expect(functions.count == migration.sql.components(separatedBy: "CREATE FUNCTION").count - 1, "\(migration.fileName)")
            for function in functions {
                // Every dollar-quoted body is closed within its statement.
                #expect(function.components(separatedBy: "$$").count % 2 == 1, "\(function.prefix(80))")
            }
        }
    }
}

@Suite("Migration files")
struct MigrationFileTests {
    @Test("versions come from the NNNN_ prefix")
    func versions() {
        #expect(Migration(fileName: "0001_tables.sql", sql: "").version == 1)
        #expect(Migration(fileName: "0042_x.sql", sql: "").version == 42)
        #expect(Migration(fileName: "tables.sql", sql: "").version == nil)
        #expect(Migration(fileName: "0001tables.sql", sql: "").version == nil)
    }

    @Test("embedded migrations are numbered 1, 2, 3... in order, with no BEGIN or COMMIT")
    func embedded() {
        #expect(Migration.embedded.map { $0.version } == Array(1...Migration.embedded.count).map { $0 })
        for migration in Migration.embedded {
            for statement in migration.statements {
                let head = statement.uppercased().split(whereSeparator: { $0 == " " || $0 == "\n" }).first ?? ""
                #expect(!["BEGIN", "COMMIT", "ROLLBACK"].contains(head), "\(migration.fileName)")
                #expect(!statement.hasPrefix("\\"), "psql meta-command in \(migration.fileName)")
            }
        }
    }
}
