import DispatchPolicy
import Foundation
import Logging
import PostgresNIO
import Testing

private func declare(_ conn: PostgresConnection, _ name: String, _ config: String) async throws {
    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: config)
}

private func tick(_ conn: PostgresConnection, _ policy: String) async throws -> TickResult {
    try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: policy)
}

private func stage(_ conn: PostgresConnection, _ policy: String, _ context: String, key: String? = nil) async throws -> Int64 {
    try await conn.scalar(
        "SELECT dispatch_policy.stage(\(policy), '{}', \(context)::jsonb, round_robin_key => \(key))", as: Int64.self)
}

private func admittedTenants(_ conn: PostgresConnection) async throws -> [String] {
    try await conn.rows("SELECT context ->> 'tenant' FROM dispatch_policy.admitted_jobs ORDER BY id", logger: TestServer.logger)
        .map { try $0.decode(String.self) }
}

@Suite("Operator actions through the runner", .timeLimit(.minutes(15)))
struct ActionTests {
    /// A lane that mixes partitions cannot be blocked for one of them: the
    /// tick itself must refuse the paused partition's jobs and admit the
    /// others of the same lane.
    @Test("a paused partition admits nothing, even inside a lane it shares; the others of the lane go on; resume lets it through")
    func pausedPartitionInMixedLane() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                #"""
                {"round_robin_by": "{region}",
                 "gates": [{"type": "concurrency", "name": "per_tenant", "max": 10, "partition_by": "{tenant}"}]}
                """#)
            for tenant in ["a", "b", "a", "b"] {
                _ = try await stage(conn, "p", #"{"tenant": "\#(tenant)", "region": "eu"}"#)
            }
            try await conn.exec("SELECT dispatch_policy.pause_partition('p', 'per_tenant', 'a', reason => 'incident 42')")
            let result = try await tick(conn, "p")
            #expect(result.admitted == 2)
            #expect(result.refusedByGate["per_tenant"] == 2)
            #expect(try await admittedTenants(conn) == ["b", "b"])
            // Still refused at the next ticks (the lane is looked at again after a second at most).
            try await Task.sleep(for: .milliseconds(1100))
            #expect(try await tick(conn, "p").admitted == 0)
            let waiting = try await conn.scalar("SELECT min(id) FROM dispatch_policy.staged_jobs", as: Int64.self)
            let why = try await JobExplanation.load(id: waiting, on: conn, logger: TestServer.logger)
            #expect(why.waitingOn.contains { $0.gate == "per_tenant" && $0.partition == "a" && $0.explanation.contains("paused") })

            try await conn.exec("SELECT dispatch_policy.resume_partition('p', 'per_tenant', 'a')")
            try await Task.sleep(for: .milliseconds(1100))
            #expect(try await tick(conn, "p").admitted == 2)
            #expect(try await admittedTenants(conn).sorted() == ["a", "a", "b", "b"])
        }
    }

    @Test("a pause that runs out admits again by itself")
    func pauseRunsOut() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p", #"{"gates": [{"type": "throttle", "name": "t", "rate": 100, "per": 1, "partition_by": "{tenant}"}]}"#)
            _ = try await stage(conn, "p", #"{"tenant": "a"}"#)
            // While the pause lasts, ticks admit nothing; pausing again with a
            // near end replaces it (no timing to win on a loaded machine);
            // once that end passes, a tick admits the job by itself.
            try await conn.exec("SELECT dispatch_policy.pause_partition('p', 't', 'a', until => now() + interval '1 hour')")
            #expect(try await tick(conn, "p").admitted == 0)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.staged_jobs", as: Int64.self) == 1)
            try await conn.exec("SELECT dispatch_policy.pause_partition('p', 't', 'a', until => now() + interval '1 second')")
            var admitted = 0
            #expect(
                try await waitUntil(20) {
                    admitted += try await tick(conn, "p").admitted
                    return admitted == 1
                })
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.paused_partitions_now('p')", as: Int64.self) == 0)
        }
    }

    @Test("a pause ends with its gate: declaring the gate again later does not bring it back")
    func pauseEndsWithItsGate() async throws {
        try await withTestDatabase { conn, _ in
            let withGate = #"{"gates": [{"type": "throttle", "name": "t", "rate": 100, "per": 1, "partition_by": "{tenant}"}]}"#
            try await declare(conn, "p", withGate)
            try await conn.exec("SELECT dispatch_policy.pause_partition('p', 't', 'a')")
            try await declare(conn, "p", #"{"gates": [{"type": "global_cap", "max": 10}]}"#)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.paused_partitions", as: Int64.self) == 0)
            try await declare(conn, "p", withGate)
            _ = try await stage(conn, "p", #"{"tenant": "a"}"#)
            #expect(try await tick(conn, "p").admitted == 1)
        }
    }

    @Test("cancel and drain finish staged jobs as cancelled and free their dedupe keys; retry stages a dead job again under the same id")
    func cancelDrainRetry() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p", #"{"max_attempts": 1, "gates": [{"type": "concurrency", "name": "c", "max": 5, "partition_by": "{tenant}"}]}"#)
            let keyed = try await conn.scalar(
                "SELECT dispatch_policy.stage('p', '{}', '{\"tenant\": \"a\"}', dedupe_key => 'k')", as: Int64.self)
            #expect(try await conn.scalar("SELECT dispatch_policy.cancel(\(keyed), 'not needed')", as: Bool.self))
            #expect(
                try await conn.scalar(
                    "SELECT status || ':' || last_error FROM dispatch_policy.finished_jobs WHERE id = \(keyed)", as: String.self)
                    == "cancelled:not needed")
            // The key is free again.
            let again = try await conn.scalar(
                "SELECT dispatch_policy.stage('p', '{}', '{\"tenant\": \"a\"}', dedupe_key => 'k')", as: Int64?.self)
            #expect(again != nil)
            for tenant in ["a", "b", "b"] { _ = try await stage(conn, "p", #"{"tenant": "\#(tenant)"}"#) }
            #expect(try await conn.scalar("SELECT dispatch_policy.drain('p', 'c', 'b')", as: Int64.self) == 2)
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.staged_jobs", as: Int64.self) == 2)

            // A job that dies is staged again by retry, as attempt 1, and admitted.
            #expect(try await tick(conn, "p").admitted == 2)
            let id = try await conn.scalar("SELECT min(id) FROM dispatch_policy.admitted_jobs", as: Int64.self)
            #expect(try await conn.scalar("SELECT dispatch_policy.fail(\(id), 'boom')", as: String.self) == "dead")
            #expect(try await conn.scalar("SELECT dispatch_policy.retry(\(id))", as: Int64.self) == id)
            #expect(try await tick(conn, "p").admitted == 1)
            #expect(try await conn.scalar("SELECT attempt FROM dispatch_policy.admitted_jobs WHERE id = \(id)", as: Int.self) == 1)
            #expect(try await conn.scalar(#"SELECT count(*) FROM dispatch_policy."check"()"#, as: Int64.self) == 0)
        }
    }
}
