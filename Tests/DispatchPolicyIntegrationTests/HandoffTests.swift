import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

/// Sets up PgQ (Debian's postgresql-15-pgq3, installed by scripts/test) with
/// a queue, a consumer, and the adapter a `sql` target calls.
private func setUpPgQ(_ conn: PostgresConnection) async throws {
    let available = try await conn.scalar("SELECT count(*) FROM pg_available_extensions WHERE name = 'pgq'", as: Int.self)
    try #require(available == 1, "PgQ is not installed: apt-get install postgresql-15-pgq3 (scripts/test does)")
    for statement: PostgresQuery in [
        "CREATE EXTENSION pgq",
        "SELECT pgq.create_queue('jobs')",
        "SELECT pgq.register_consumer('jobs', 'test_consumer')",
        """
        CREATE FUNCTION public.to_pgq(id bigint, queue text, args jsonb, context jsonb) RETURNS void
        LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pgq.insert_event('jobs', queue, jsonb_build_object('id', id, 'args', args)::text);
        END $$
        """,
    ] {
        try await conn.exec(statement)
    }
}

/// Everything the consumer can read from the queue now: (job id, event time).
/// One forced tick closes the open batch; next_batch is NULL once caught up.
private func consume(_ conn: PostgresConnection) async throws -> [(Int64, Date)] {
    try await conn.exec("SELECT pgq.force_tick('jobs')")
    try await conn.exec("SELECT pgq.ticker()")
    var events: [(Int64, Date)] = []
    while let batch = try await conn.scalar("SELECT pgq.next_batch('jobs', 'test_consumer')", as: Int64?.self) {
        for row in try await conn.rows(
            "SELECT (ev_data::jsonb ->> 'id')::bigint, ev_time FROM pgq.get_batch_events(\(batch)) ORDER BY ev_id",
            logger: TestServer.logger
        ) {
            events.append(try row.decode((Int64, Date).self))
        }
        try await conn.exec("SELECT pgq.finish_batch(\(batch))")
    }
    return events
}

// Serialized: PgQ's install script creates cluster-wide roles, and two databases
// installing it at the same moment collide on them.
@Suite("Handoff to another queue (PgQ)", .serialized, .timeLimit(.minutes(15)))
struct HandoffTests {
    @Test("jobs admitted under a throttle arrive in PgQ at the admitted rate, exactly once; its worker reports back")
    func pgqUnderThrottle() async throws { try await LiveTests.exclusive { try await pgqUnderThrottleLive() } }

    func pgqUnderThrottleLive() async throws {
        try await withTestDatabase { conn, _ in
            try await setUpPgQ(conn)
            let config = PolicyConfig(target: .sql(function: "public.to_pgq")) {
                Gate.throttle(rate: 10, per: 1, burst: 3)
                Gate.concurrency(max: 100)
            }
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: try config.json())
            try await conn.exec(
                "SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, 12) i))")
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            let start = ContinuousClock.now
            var admitted = 0
            while admitted < 12 && ContinuousClock.now - start < .seconds(20) {
                admitted += try await ticker.tick(policy: "p").admitted
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(admitted == 12)
            let events = try await consume(conn)
            #expect(events.count == 12)
            #expect(Set(events.map(\.0)).count == 12)
            let ids = try await conn.rows("SELECT id FROM dispatch_policy.admitted_jobs ORDER BY id", logger: TestServer.logger).map {
                try $0.decode(Int64.self)
            }
            #expect(events.map(\.0).sorted() == ids)
            // The throttle shows: at most burst + rate × t admissions in any window t,
            // on the clock the bucket uses (the tick's; PgQ stamps its events with
            // the transaction's start, a few ms earlier, and by a varying amount).
            let times = try await conn.rows(
                "SELECT extract(epoch FROM admitted_at)::float8 FROM dispatch_policy.admitted_jobs ORDER BY 1", logger: TestServer.logger
            ).map { try $0.decode(Double.self) }
            for i in times.indices {
                for j in i..<times.count {
                    #expect(Double(j - i + 1) <= 3 + 10 * (times[j] - times[i]) + 1e-6)
                }
            }
            #expect((times.last ?? 0) - (times.first ?? 0) >= 0.85)  // 12 admissions at 10/s after a burst of 3
            // PgQ's consumer runs the jobs and reports back: slots are released.
            for id in ids {
                try await conn.exec("SELECT dispatch_policy.started(\(id))")
                #expect(try await conn.scalar("SELECT dispatch_policy.complete(\(id))", as: Bool.self))
            }
            #expect(try await conn.scalar("SELECT in_flight FROM dispatch_policy.inflight_counters", as: Int.self) == 0)
        }
    }

    @Test("a rolled-back admission leaves nothing in PgQ and keeps the jobs staged")
    func rollbackLeavesNothing() async throws {
        try await withTestDatabase { conn, _ in
            try await setUpPgQ(conn)
            try await PolicyCatalog(executor: conn, logger: TestServer.logger)
                .declare(name: "p", config: try PolicyConfig(target: .sql(function: "public.to_pgq")).json())
            try await conn.exec("SELECT dispatch_policy.stage_many('p', '[{\"args\": 1}, {\"args\": 2}]')")
            try await conn.exec("BEGIN")
            try await conn.exec(
                """
                SELECT dispatch_policy.admit('p', (SELECT jsonb_agg(jsonb_build_object('id', id)) FROM dispatch_policy.fetch_batch('p', 10)))
                """)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs", as: Int.self) == 2)
            try await conn.exec("ROLLBACK")
            #expect(try await consume(conn).isEmpty)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.staged_jobs", as: Int.self) == 2)
            // A target that fails aborts the whole admission the same way.
            try await conn.exec(
                "CREATE OR REPLACE FUNCTION public.to_pgq(id bigint, queue text, args jsonb, context jsonb) RETURNS void LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'queue down'; END $$"
            )
            await expectSQLError("P0001", "queue down") {
                _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            }
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.staged_jobs", as: Int.self) == 2)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs", as: Int.self) == 0)
        }
    }
}
