import DispatchPolicy
import DispatchPolicyTestSupport
import Foundation
import PostgresNIO
import PropertyBased
import Testing

/// A digest of everything stored: any change shows.
private let fingerprintSQL: PostgresQuery = """
    SELECT md5(coalesce(string_agg(t, '|' ORDER BY t), '')) FROM (
      SELECT 'policy ' || p::text FROM dispatch_policy.policies p
      UNION ALL SELECT 'staged ' || s::text FROM dispatch_policy.staged_jobs s
      UNION ALL SELECT 'admitted ' || a::text FROM dispatch_policy.admitted_jobs a
      UNION ALL SELECT 'finished ' || f::text FROM dispatch_policy.finished_jobs f
      UNION ALL SELECT 'dedupe ' || d::text FROM dispatch_policy.dedupe_keys d
      UNION ALL SELECT 'counter ' || c::text FROM dispatch_policy.inflight_counters c
      UNION ALL SELECT 'bucket ' || b::text FROM dispatch_policy.throttle_buckets b
      UNION ALL SELECT 'failure ' || j::text FROM dispatch_policy.job_failures j
      UNION ALL SELECT 'observation ' || o::text FROM dispatch_policy.observations o
      UNION ALL SELECT 'adaptive ' || x::text FROM dispatch_policy.adaptive_stats x
    ) z(t)
    """

/// One hostile call and what must come of it.
struct HostileCase: Sendable, CustomTestStringConvertible {
    var name: String
    var sql: String
    /// The SQLSTATE it must fail with, or nil when it is accepted as data (and then may store).
    var sqlState: String?
    var message: String = ""
    var testDescription: String { name }
}

/// The policy every case runs against: gates of each kind, one job admitted
/// and claimed (attempt 1, id 1), one waiting.
private let hostileSetup: [PostgresQuery] = [
    """
    SELECT dispatch_policy.declare_policy('p', '{"round_robin_by": "{t}", "gates": [
      {"type": "throttle", "rate": {"context": "r", "default": 10}, "per": 1, "partition_by": "{t}"},
      {"type": "concurrency", "max": {"context": "m", "default": 2}, "partition_by": "{t}"},
      {"type": "adaptive_concurrency", "partition_by": "{t}", "target_lag_ms": 100}]}')
    """,
    #"SELECT dispatch_policy.stage('p', '{"n": 1}', '{"t": "a"}')"#,
    #"SELECT dispatch_policy.stage('p', '{"n": 2}', '{"t": "b"}', dedupe_key => 'held')"#,
]

/// After the setup's jobs are admitted and one is claimed: a job still waiting (id 3).
private let hostileWaiting: PostgresQuery = #"SELECT dispatch_policy.stage('p', '{"n": 3}', '{"t": "c"}')"#

private let big = "repeat('x', 10000)"

let hostileCases: [HostileCase] = [
    // declare_policy
    .init(
        name: "declare: NULL config", sql: "SELECT dispatch_policy.declare_policy('q', NULL)", sqlState: "22023",
        message: "config must be a JSON object"),
    .init(
        name: "declare: empty name", sql: "SELECT dispatch_policy.declare_policy('', '{}')", sqlState: "22023",
        message: "invalid policy name"),
    .init(
        name: "declare: SQL in the name",
        sql: "SELECT dispatch_policy.declare_policy('x''; DROP TABLE dispatch_policy.policies; --', '{}')",
        sqlState: "22023", message: "invalid policy name"),
    .init(
        name: "declare: 10 kB name", sql: "SELECT dispatch_policy.declare_policy(\(big), '{}')", sqlState: "22023",
        message: "invalid policy name"),
    .init(name: "declare: NaN is not JSON", sql: #"SELECT dispatch_policy.declare_policy('q', '{"batch_size": NaN}')"#, sqlState: "22P02"),
    .init(
        name: "declare: Infinity as a string",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "throttle", "rate": "Infinity", "per": 1}]}')"#,
        sqlState: "22023", message: "gates[0].rate must be a number"),
    .init(
        name: "declare: negative rate",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "throttle", "rate": -1, "per": 1}]}')"#,
        sqlState: "22023", message: "gates[0].rate must be a number from 0 to 1000000"),
    .init(
        name: "declare: rate 1e308",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "throttle", "rate": 1e308, "per": 1}]}')"#,
        sqlState: "22023", message: "gates[0].rate"),
    .init(
        name: "declare: per 1e-308",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "throttle", "rate": 1, "per": 1e-308}]}')"#,
        sqlState: "22023", message: "gates[0].per"),
    .init(
        name: "declare: per 1e-400",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "throttle", "rate": 1, "per": 1e-400}]}')"#,
        sqlState: "22023", message: "gates[0].per"),
    .init(
        name: "declare: burst 1e400",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "throttle", "rate": 1, "per": 1, "burst": 1e400}]}')"#,
        sqlState: "22023", message: "gates[0].burst"),
    .init(
        name: "declare: max 2.5", sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "concurrency", "max": 2.5}]}')"#,
        sqlState: "22023", message: "gates[0].max must be an integer"),
    .init(
        name: "declare: adaptive max 1e20",
        sql:
            #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 1, "max": 1e20}]}')"#,
        sqlState: "22023", message: "gates[0].max"),
    .init(
        name: "declare: initial_max 3e9",
        sql:
            #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 1, "initial_max": 3000000000}]}')"#,
        sqlState: "22023", message: "gates[0].initial_max"),
    .init(
        name: "declare: global_cap 1e400",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "global_cap", "max": 1e400}]}')"#,
        sqlState: "22023", message: "gates[0].max"),
    .init(
        name: "declare: unknown field",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "global_cap", "max": 1, "maxx": 2}]}')"#,
        sqlState: "22023", message: "gates[0].maxx is not a known field"),
    .init(
        name: "declare: SQL in the target function",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"target": {"type": "sql", "function": "public.f(); DROP TABLE x; --"}}')"#,
        sqlState: "22023", message: "target.function"),
    .init(
        name: "declare: 33 gates",
        sql: """
            SELECT dispatch_policy.declare_policy('q', jsonb_build_object('gates', (SELECT jsonb_agg(jsonb_build_object('type', 'global_cap', 'name', 'g' || i, 'max', 1)) FROM generate_series(1, 33) i)))
            """, sqlState: "22023", message: "gates must hold at most 32 gates"),
    .init(
        name: "declare: non-ASCII placeholder", sql: #"SELECT dispatch_policy.declare_policy('q', '{"round_robin_by": "{é}"}')"#,
        sqlState: "22023", message: "round_robin_by"),
    .init(
        name: "declare: redeclare p with a bad config leaves p unchanged",
        sql: #"SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "concurrency", "max": -1}]}')"#,
        sqlState: "22023", message: "gates[0].max"),
    .init(
        name: "declare: direct UPDATE of a config", sql: #"UPDATE dispatch_policy.policies SET config = '{"lease_seconds": 0}'"#,
        sqlState: "22023", message: "lease_seconds"),
    .init(
        name: "declare: rate 1e-400, which no double holds",
        sql: #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "throttle", "rate": 1e-400, "per": 1}]}')"#,
        sqlState: "22023", message: "0 or at least 1e-300 in magnitude"),
    .init(
        name: "declare: ewma_alpha 1e-400",
        sql:
            #"SELECT dispatch_policy.declare_policy('q', '{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 5, "ewma_alpha": 1e-400}]}')"#,
        sqlState: "22023", message: "gates[0].ewma_alpha"),
    // stage / stage_many
    .init(name: "stage: unknown policy", sql: "SELECT dispatch_policy.stage('nope', '{}')", sqlState: "42704", message: "unknown policy"),
    .init(name: "stage: NULL args", sql: "SELECT dispatch_policy.stage('p', NULL)", sqlState: "22004", message: "args must not be null"),
    .init(
        name: "stage: context an array", sql: "SELECT dispatch_policy.stage('p', '{}', '[1]')", sqlState: "22023",
        message: "context must be a JSON object"),
    .init(
        name: "stage: context of 70 kB", sql: "SELECT dispatch_policy.stage('p', '{}', jsonb_build_object('t', repeat('x', 70000)))",
        sqlState: "22023", message: "context must be at most 65536 bytes"),
    .init(
        name: "stage: empty queue", sql: "SELECT dispatch_policy.stage('p', '{}', queue => '')", sqlState: "22023",
        message: "queue must be a string of 1 to 128 bytes"),
    .init(
        name: "stage: 10 kB queue", sql: "SELECT dispatch_policy.stage('p', '{}', queue => \(big))", sqlState: "22023",
        message: "queue must be"),
    .init(
        name: "stage: empty dedupe key", sql: "SELECT dispatch_policy.stage('p', '{}', dedupe_key => '')", sqlState: "22023",
        message: "dedupe_key must be"),
    .init(
        name: "stage: 10 kB dedupe key", sql: "SELECT dispatch_policy.stage('p', '{}', dedupe_key => \(big))", sqlState: "22023",
        message: "dedupe_key must be"),
    .init(
        name: "stage: 10 kB round-robin key", sql: "SELECT dispatch_policy.stage('p', '{}', round_robin_key => \(big))", sqlState: "22023",
        message: "round_robin_key must be"),
    .init(name: "stage: NUL in a key", sql: #"SELECT dispatch_policy.stage('p', '{}', dedupe_key => E'a\000b')"#, sqlState: "22021"),
    .init(name: "stage: NUL in the context", sql: #"SELECT dispatch_policy.stage('p', '{}', '{"t": "a\u0000b"}')"#, sqlState: "22P05"),
    .init(
        name: "stage: infinite not_before", sql: "SELECT dispatch_policy.stage('p', '{}', not_before => 'infinity')", sqlState: "22023",
        message: "not_before must be a finite timestamp"),
    .init(
        name: "stage_many: not an array", sql: #"SELECT dispatch_policy.stage_many('p', '{"args": 1}')"#, sqlState: "22023",
        message: "jobs must be a JSON array"),
    .init(
        name: "stage_many: priority beyond 32 bits",
        sql: #"SELECT dispatch_policy.stage_many('p', '[{"args": 1}, {"args": 2, "priority": 2147483648}]')"#,
        sqlState: "22023", message: "jobs[1].priority must be an integer"),
    .init(
        name: "stage_many: priority as a string", sql: #"SELECT dispatch_policy.stage_many('p', '[{"args": 1, "priority": "1"}]')"#,
        sqlState: "22023", message: "jobs[0].priority"),
    .init(
        name: "stage_many: not_before not a time",
        sql: #"SELECT dispatch_policy.stage_many('p', '[{"args": 1}, {"args": 2, "not_before": "someday"}]')"#,
        sqlState: "22023", message: "jobs[1].not_before"),
    .init(
        name: "stage_many: time zone displacement out of range",
        sql: #"SELECT dispatch_policy.stage_many('p', '[{"args": 1, "not_before": "2020-01-01 +99:00"}]')"#,
        sqlState: "22023", message: "jobs[0].not_before must be a finite timestamp"),
    .init(
        name: "stage_many: unknown time zone",
        sql: #"SELECT dispatch_policy.stage_many('p', '[{"args": 1, "not_before": "2020-01-01 America/Nowhere"}]')"#,
        sqlState: "22023", message: "jobs[0].not_before must be a finite timestamp"),
    .init(
        name: "direct insert: context not an object",
        sql: "INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context) VALUES (900, 'p', 'default', '1', '[1, 2]')",
        sqlState: "23514", message: "staged_jobs_context_check"),
    .init(
        name: "direct insert: 20 kB queue",
        sql: "INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context) VALUES (900, 'p', repeat('q', 20000), '1', '{}')",
        sqlState: "23514", message: "staged_jobs_queue_check"),
    .init(
        name: "direct insert: infinite staged_at",
        sql:
            "INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context, staged_at) VALUES (900, 'p', 'q', '1', '{}', '-infinity')",
        sqlState: "23514", message: "staged_jobs_times_check"),
    .init(
        name: "direct insert: an admitted job with an empty queue",
        sql: """
            INSERT INTO dispatch_policy.admitted_jobs (id, policy, queue, priority, args, context, attempt, created_at, staged_at, admitted_at,
              lease_expires_at, lease_seconds, target) VALUES (901, 'p', '', 0, '1', '{}', 1, now(), now(), now(), now(), 60, 'ready_queue')
            """, sqlState: "23514", message: "admitted_jobs_queue_check"),
    .init(
        name: "direct insert: an admitted job whose partitions are not an object",
        sql: """
            INSERT INTO dispatch_policy.admitted_jobs (id, policy, queue, priority, args, context, attempt, created_at, staged_at, admitted_at,
              lease_expires_at, lease_seconds, target, partitions) VALUES (901, 'p', 'q', 0, '1', '{}', 1, now(), now(), now(), now(), 60, 'ready_queue', '[]')
            """, sqlState: "23514", message: "admitted_jobs_partitions_check"),
    .init(
        name: "direct insert: an admitted job at attempt -1",
        sql: """
            INSERT INTO dispatch_policy.admitted_jobs (id, policy, queue, priority, args, context, attempt, created_at, staged_at, admitted_at,
              lease_expires_at, lease_seconds, target) VALUES (901, 'p', 'q', 0, '1', '{}', -1, now(), now(), now(), now(), 60, 'ready_queue')
            """, sqlState: "23514", message: "admitted_jobs_attempt_check"),
    .init(
        name: "direct update: a policy updated at infinity", sql: "UPDATE dispatch_policy.policies SET updated_at = 'infinity'",
        sqlState: "23514", message: "policies_times_check"),
    .init(
        name: "promote_scheduled: now infinity", sql: "SELECT dispatch_policy.promote_scheduled('p', 10, 'infinity')", sqlState: "22023",
        message: "now must be a finite time"),
    .init(
        name: "fetch_batch: now infinity", sql: "SELECT * FROM dispatch_policy.fetch_batch('p', 10, 5, 'infinity')", sqlState: "22023",
        message: "now must be a finite time"),
    .init(
        name: "record_runner_failure: retry at infinity",
        sql: "SELECT dispatch_policy.record_runner_failure('p', 'x', retry_at => 'infinity')",
        sqlState: "22023", message: "now must be a finite time"),
    .init(
        name: "direct insert: a bucket refilled at -infinity",
        sql: "INSERT INTO dispatch_policy.throttle_buckets VALUES ('p', 'throttle', 'v', 1, 1, 1, 1, '-infinity')",
        sqlState: "23514", message: "throttle_buckets_refilled_at_check"),
    .init(
        name: "stage_many: unknown field", sql: #"SELECT dispatch_policy.stage_many('p', '[{"args": 1, "delay": 5}]')"#,
        sqlState: "22023", message: "jobs[0].delay is not a known field"),
    .init(
        name: "stage: SQL in a dedupe key is data",
        sql: "SELECT dispatch_policy.stage('p', '{}', dedupe_key => ''');DROP TABLE dispatch_policy.policies;--')", sqlState: nil),
    .init(
        name: "stage: SQL and braces in the context are data",
        sql: #"SELECT dispatch_policy.stage('p', '{}', '{"t": "{t}'');DROP TABLE x;--", "r": "1e308", "m": "NaN"}')"#, sqlState: nil),
    // worker calls
    .init(name: "complete: unknown job", sql: "SELECT dispatch_policy.complete(424242)", sqlState: "P0002", message: "is not admitted"),
    .init(
        name: "complete: wrong attempt", sql: "SELECT dispatch_policy.complete(1, attempt => 2)", sqlState: "DP001",
        message: "is not the current attempt"),
    .init(name: "complete: negative attempt", sql: "SELECT dispatch_policy.complete(1, attempt => -1)", sqlState: "DP001"),
    .init(
        name: "fail: negative retry", sql: "SELECT dispatch_policy.fail(1, 'x', interval '-1 second')", sqlState: "22023",
        message: "retry_in must be"),
    .init(
        name: "fail: retry in ten years", sql: "SELECT dispatch_policy.fail(1, 'x', interval '10 years')", sqlState: "22023",
        message: "retry_in must be"),
    .init(name: "fail: stale attempt", sql: "SELECT dispatch_policy.fail(1, 'x', attempt => 9)", sqlState: "DP001"),
    .init(name: "heartbeat: unknown job", sql: "SELECT dispatch_policy.heartbeat(424242)", sqlState: "P0002"),
    .init(name: "heartbeat: staged job", sql: "SELECT dispatch_policy.heartbeat(3)", sqlState: "P0002", message: "is not admitted"),
    .init(name: "started: stale attempt", sql: "SELECT dispatch_policy.started(1, attempt => 3)", sqlState: "DP001"),
    .init(
        name: "claim: max 0", sql: "SELECT * FROM dispatch_policy.claim('default', 'w', 0)", sqlState: "22023",
        message: "max must be an integer from 1 to 10000"),
    .init(
        name: "claim: max 100000", sql: "SELECT * FROM dispatch_policy.claim('default', 'w', 100000)", sqlState: "22023",
        message: "max must be"),
    .init(
        name: "claim: 10 kB worker name", sql: "SELECT * FROM dispatch_policy.claim('default', \(big), 1)", sqlState: "22023",
        message: "worker must be at most 256 bytes"),
    .init(
        name: "complete: now infinity", sql: "SELECT dispatch_policy.complete(1, now => 'infinity', attempt => 1)", sqlState: "22023",
        message: "now must be a finite time"),
    .init(
        name: "fail: now -infinity", sql: "SELECT dispatch_policy.fail(1, 'x', now => '-infinity')", sqlState: "22023",
        message: "now must be a finite time"),
    .init(
        name: "heartbeat: now infinity", sql: "SELECT dispatch_policy.heartbeat(1, now => 'infinity')", sqlState: "22023",
        message: "now must be a finite time"),
    .init(
        name: "started: now -infinity", sql: "SELECT dispatch_policy.started(1, now => '-infinity')", sqlState: "22023",
        message: "now must be a finite time"),
    .init(
        name: "claim: now infinity", sql: "SELECT * FROM dispatch_policy.claim('default', 'w', 1, now => 'infinity')", sqlState: "22023",
        message: "now must be a finite time"),
    .init(
        name: "reap_leases: now infinity", sql: "SELECT dispatch_policy.reap_leases(NULL, 'infinity')", sqlState: "22023",
        message: "now must be a finite time"),
    .init(
        name: "prune: retention of a million years", sql: "SELECT * FROM dispatch_policy.prune('1000000 years')", sqlState: "22023",
        message: "retention must be"),
    .init(
        name: "prune: negative idle", sql: "SELECT * FROM dispatch_policy.prune('1 day', '-1 hour')", sqlState: "22023",
        message: "idle must be"),
    .init(name: "pause: unknown policy", sql: "SELECT dispatch_policy.pause('nope')", sqlState: "42704"),
]

/// A CLI invocation and its documented outcome.
struct HostileCommand: Sendable, CustomTestStringConvertible {
    var arguments: [String]
    var stdin: String? = nil
    var status: Int32
    var stderr: String
    var testDescription: String { arguments.joined(separator: " ") }
}

let hostileCommands: [HostileCommand] = [
    .init(arguments: ["tick", "--for", "100000000000000000000s"], status: 64, stderr: "--for must be a duration from 1ms to 365d"),
    .init(arguments: ["tick", "--idle-pause", "100000000000000000000s"], status: 64, stderr: "--idle-pause must be a duration"),
    .init(arguments: ["run", "--busy-pause", "-5ms"], status: 64, stderr: "--busy-pause"),
    .init(arguments: ["run", "--busy-pause", "2h"], status: 64, stderr: "--busy-pause must be a duration from 0ms to 1h"),
    .init(arguments: ["tick", "--retention", "3000000d"], status: 64, stderr: "--retention must be a duration"),
    .init(arguments: ["tick", "--lease", "25000d"], status: 64, stderr: "--lease must be a duration from 1s to 365d"),
    .init(arguments: ["tick", "--lease", "0s"], status: 64, stderr: "--lease must be"),
    .init(arguments: ["tick", "--batch-size", "0"], status: 64, stderr: "--batch-size must be an integer from 1 to 100000"),
    .init(arguments: ["tick", "--quantum", "1000000"], status: 64, stderr: "--quantum must be"),
    .init(arguments: ["tick", "--batch-size", "99999999999999999999999"], status: 64, stderr: "batch-size"),
    .init(arguments: ["stage", "p", "--args", "{}", "--delay", "1000000000d"], status: 64, stderr: "--delay must be a duration"),
    .init(arguments: ["stage", "p", "--args", "{}", "--priority", "99999999999"], status: 64, stderr: "priority"),
    .init(arguments: ["stage", "p", "--args", "{"], status: 1, stderr: "--args is not valid JSON"),
    .init(
        arguments: ["stage", "p", "--args", "{}", "--queue", String(repeating: "q", count: 9000)], status: 1,
        stderr: "queue must be a string of 1 to 128 bytes"),
    .init(arguments: ["stage", "p", "--args", "{}", "--dedupe-key", ""], status: 1, stderr: "dedupe_key must be"),
    .init(
        arguments: ["stage", "p", "--args", "{}", "--not-before", "someday"], status: 64, stderr: "--not-before must be an ISO 8601 time"),
    .init(
        arguments: ["policy", "apply", "-"], stdin: #"{"name": "q", "config": {"gates": [{"type": "global_cap", "max": 1e400}]}}"#,
        status: 1, stderr: "gates[0].max must be an integer from 0 to 1000000"),
    .init(
        arguments: ["policy", "apply", "-"], stdin: #"{"name": "q", "config": {"lease_seconds": 2160000000}}"#, status: 1,
        stderr: "lease_seconds must be"),
    .init(arguments: ["policy", "apply", "-"], stdin: "{nope", status: 1, stderr: "policy file is not valid JSON"),
    .init(arguments: ["policy", "apply", "/nonexistent/file.json"], status: 1, stderr: "cannot read /nonexistent/file.json"),
    .init(arguments: ["demo", "--duration", "0s"], status: 64, stderr: "--duration must be a duration from 1s to 1d"),
    .init(arguments: ["tick", "--policy", "nope"], status: 1, stderr: "unknown policy: 'nope'"),
    .init(arguments: ["tick", "--tick-timeout", "0s"], status: 64, stderr: "--tick-timeout must be a duration from 1s to 1h"),
    .init(arguments: ["stage", "p", "--args", "{}", "--not-before", "300000-01-01T00:00:00Z"], status: 64, stderr: "--not-before must be"),
    .init(arguments: ["tick", "--lease", "1.5s"], status: 64, stderr: "--lease must be whole seconds"),
    .init(arguments: ["tick", "--batch-size", "-1"], status: 64, stderr: "--batch-size must be an integer from 1 to 100000"),
    .init(arguments: ["tick", "--lease", "-1s"], status: 64, stderr: "--lease must be a duration"),
    .init(
        arguments: ["status", "--database-url", "postgres://u@localhost:9223372036854775808/db"], status: 78,
        stderr: "port must be a number from 1 to 65535"),
]

@Suite("Hostile input", .timeLimit(.minutes(15)))
struct HostileInputTests {
    @Test("each hostile SQL call gets its documented error and changes nothing (or is stored as plain data)", arguments: hostileCases)
    func sql(_ hostile: HostileCase) async throws {
        try await withTestDatabase { conn, _ in
            for statement in hostileSetup { try await conn.exec(statement) }
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            _ = try await conn.rows("SELECT * FROM dispatch_policy.claim('default', 'w', 1)", logger: TestServer.logger)
            try await conn.exec(hostileWaiting)
            let before = try await conn.scalar(fingerprintSQL, as: String.self)
            if let sqlState = hostile.sqlState {
                do {
                    try await conn.exec(PostgresQuery(unsafeSQL: hostile.sql))
                    Issue.record("accepted; expected SQLSTATE \(sqlState)")
                } catch let error as DispatchPolicyError {
                    #expect(error.sqlState == sqlState, "\(error)")
                    #expect(hostile.message.isEmpty || error.message.contains(hostile.message), "\(error.message)")
                }
                #expect(try await conn.scalar(fingerprintSQL, as: String.self) == before, "something stored changed")
            } else {
                try await conn.exec(PostgresQuery(unsafeSQL: hostile.sql))
                // Stored as data: the tables are all still there and the runner still runs.
                #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.policies", as: Int.self) == 1)
                #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p").outcome == .ran)
            }
        }
    }

    @Test(
        "each hostile CLI invocation is a usage error (64), a configuration error (78) or a one-line error (1), and changes nothing",
        arguments: hostileCommands)
    func commands(_ command: HostileCommand) async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            for statement in hostileSetup { try await conn.exec(statement) }
        }
        let before = try await TestServer.withConnection(settings) { conn async throws in
            try await conn.scalar(fingerprintSQL, as: String.self)
        }
        let result = try await cli(command.arguments, settings: settings, stdin: command.stdin)
        #expect(result.status == command.status, "\(result.stderr)")
        #expect(result.stderr.contains(command.stderr), "\(result.stderr)")
        let after = try await TestServer.withConnection(settings) { conn async throws in
            try await conn.scalar(fingerprintSQL, as: String.self)
        }
        #expect(after == before, "something stored changed")
    }
}

@Suite("Fuzzing against PostgreSQL", .timeLimit(.minutes(15)))
struct KeyParityFuzzTests {
    /// The runner (Swift) renders the partition keys it admits under; the
    /// views, redeclare and the round-robin key use the SQL functions. They
    /// must agree on every key, byte for byte, long or short.
    @Test("Swift and SQL compute the same partitions for every generated context and config")
    func parity() async throws {
        try await withTestDatabase { conn, _ in
            let config = PolicyConfig {
                Gate.throttle(rate: 1, per: 1, partitionBy: "{a}:{_x9}")
                Gate.concurrency(max: 1, partitionBy: "x:{acct_id}{a}")
                Gate.globalCap(max: 1)
                Gate.fairInterleave()
                Gate.adaptiveConcurrency(partitionBy: "{_x9}", targetLagMs: 1)
            }
            let configJSON = try config.json()
            let admission = Admission(config: config)
            let value = Gen<Int>.int(in: 0...3).array(of: 3).map { $0 }
            let text = trickyString(0...8)
            let long = trickyString(60...140)
            await propertyCheck(count: 30, input: Gen<Int>.int(in: 0...Int.max).array(of: 40), value, text, long) {
                seeds, kinds, short, longText in
                var contexts: [String] = []
                for (index, seed) in seeds.enumerated() {
                    var fields: [String] = []
                    for (position, key) in ["a", "acct_id", "_x9"].enumerated() {
                        let kind = (seed >> (position * 3)) % 6
                        let string = (seed >> 20) % 3 == 0 ? longText : short + String(index)
                        switch (kind + kinds[position]) % 6 {
                        case 0: fields.append("\"\(key)\": \(jsonString(string))")
                        case 1: fields.append("\"\(key)\": \(seed % 1000)")
                        case 2: fields.append("\"\(key)\": 1.50e\(seed % 5)")
                        case 3: fields.append("\"\(key)\": null")
                        case 4: fields.append("\"\(key)\": {\"k\": [true, \(jsonString(short))]}")
                        default: break
                        }
                    }
                    contexts.append("{" + fields.joined(separator: ", ") + "}")
                }
                do {
                    let rows = try await conn.rows(
                        """
                        SELECT c::jsonb::text, dispatch_policy._gate_partitions(\(configJSON)::jsonb, c::jsonb)::text
                        FROM unnest(\(contexts)::text[]) WITH ORDINALITY AS t(c, n) ORDER BY n
                        """, logger: TestServer.logger)
                    for row in rows {
                        let (contextText, sqlPartitions) = try row.decode((String, String).self)
                        let strings = try #require(ContextStrings.parse(contextText))
                        let swift = admission.partitions(of: BatchRow(id: 1, context: strings))
                        let sql = try JSONDecoder().decode([String: String].self, from: Data(sqlPartitions.utf8))
                        #expect(swift.count == sql.count)
                        for (gate, key) in sql {
                            #expect(Array((swift[gate] ?? "<missing>").utf8) == Array(key.utf8), "\(gate) for \(contextText)")
                        }
                    }
                } catch {
                    Issue.record("\(error)")
                }
            }
        }
    }
}

extension KeyParityFuzzTests {
    /// Found by hostile testing: Swift matched the context key "\u{212A}"
    /// (Kelvin sign) to the template key K; PostgreSQL does not.
    @Test("canonically equivalent context keys: Swift and SQL agree")
    func equivalentKeys() async throws {
        try await withTestDatabase { conn, _ in
            let config = PolicyConfig { Gate.concurrency(max: 1, partitionBy: "{K}:{e}") }
            for context in [#"{"\u212a": "x"}"#, #"{"K": "y", "\u212a": "x"}"#, #"{"\u00e9": 1, "e\u0301": 2, "e": 3}"#] {
                let (text, sql) = try #require(
                    try await conn.rows(
                        "SELECT \(context)::jsonb::text, dispatch_policy._gate_partitions(\(try config.json())::jsonb, \(context)::jsonb) ->> 'concurrency'",
                        logger: TestServer.logger
                    ).first
                ).decode((String, String).self)
                let strings = try #require(ContextStrings.parse(text))
                #expect(Admission(config: config).partitions(of: BatchRow(id: 1, context: strings))["concurrency"] == sql, "\(context)")
            }
        }
    }
}

/// A JSON string literal for `text`.
func jsonString(_ text: String) -> String {
    String(decoding: (try? JSONEncoder().encode(text)) ?? Data("\"\"".utf8), as: UTF8.self)
}
