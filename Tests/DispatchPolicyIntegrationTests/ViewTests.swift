import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

@Suite("Views", .timeLimit(.minutes(15)))
struct ViewTests {
    @Test("policy_overview counts pending, scheduled, in flight, finished, failed and dead per policy")
    func policyOverview() async throws {
        try await withTestDatabase { conn, _ in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "a", config: "{}")
            try await catalog.declare(name: "b", config: "{}")
            try await catalog.pause("b")
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('a', '[{"args": 1}, {"args": 2}, {"args": 3, "not_before": "2999-01-01T00:00:00Z"}]')
                """)
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.admitted_jobs (id, policy, queue, priority, args, context, attempt, created_at, staged_at, admitted_at, lease_expires_at, lease_seconds, target)
                VALUES (1001, 'a', 'default', 0, '{}', '{}', 1, now(), now(), now(), now() + interval '1 minute', 60, 'ready_queue');
                """)
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.finished_jobs (id, policy, queue, priority, args, context, attempts, status, created_at, finished_at)
                VALUES (2001, 'a', 'default', 0, '{}', '{}', 1, 'completed', now(), now()),
                       (2002, 'a', 'default', 0, '{}', '{}', 1, 'completed', now(), now() - interval '2 days'),
                       (2003, 'a', 'default', 0, '{}', '{}', 3, 'dead', now(), now() - interval '2 days')
                """)
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.job_failures (job_id, policy, attempt, error, failed_at)
                VALUES (2003, 'a', 3, 'boom', now()), (2003, 'a', 2, 'boom', now() - interval '3 days')
                """)
            let rows = try await conn.rows(
                """
                SELECT policy, pending, scheduled, in_flight, completed_24h, failed_24h, dead,
                       oldest_pending_age IS NOT NULL, paused
                FROM dispatch_policy.policy_overview ORDER BY policy
                """, logger: TestServer.logger
            ).map { try $0.decode((String, Int, Int, Int, Int, Int, Int, Bool, Bool).self) }
            #expect(rows.count == 2)
            let a = rows[0]
            let b = rows[1]
            #expect(a.0 == "a" && a.1 == 2 && a.2 == 1 && a.3 == 1 && a.4 == 1 && a.5 == 1 && a.6 == 1 && a.7 && !a.8)
            #expect(b.0 == "b" && b.1 == 0 && b.2 == 0 && b.3 == 0 && !b.7 && b.8)
        }
    }

    @Test("partition_overview renders each gate's partitions with pending jobs, in-flight slots, caps and tokens")
    func partitionOverview() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "w",
                config: """
                    {"gates": [
                      {"type": "throttle", "rate": 60, "per": 60, "burst": 10, "partition_by": "ep:{endpoint}"},
                      {"type": "concurrency", "max": 5, "partition_by": "{account}"},
                      {"type": "global_cap", "max": 100},
                      {"type": "adaptive_concurrency", "partition_by": "{account}", "target_lag_ms": 500}
                    ]}
                    """)
            try await conn.exec(
                """
                SELECT dispatch_policy.stage_many('w', '[
                  {"args": 1, "context": {"account": "a1", "endpoint": "x"}},
                  {"args": 2, "context": {"account": "a1", "endpoint": "y"}},
                  {"args": 3, "context": {"account": "a2", "endpoint": "x"}}]')
                """)
            // Gate state as admission leaves it: 2 tokens 30 s ago at 1 token/s (capped by burst 10),
            // 3 slots taken in a1, an adaptive cap of 4. One transaction, so now() is the same
            // for the rows and the view.
            try await conn.exec("BEGIN")
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.throttle_buckets (policy, gate, partition, tokens, rate, per_seconds, burst, refilled_at)
                VALUES ('w', 'throttle', 'ep:x', 2, 60, 60, 10, now() - interval '30 seconds'),
                       ('w', 'throttle', 'ep:z', 1, 60, 60, 10, now() - interval '2 seconds')
                """)
            try await conn.exec(
                "INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight) VALUES ('w', 'concurrency', 'a1', 3)")
            try await conn.exec(
                "INSERT INTO dispatch_policy.adaptive_stats (policy, gate, partition, current_max, ewma_lag_ms) VALUES ('w', 'adaptive_concurrency', 'a1', 4, 120.5)"
            )
            // State of a gate no longer in the policy is not shown.
            try await conn.exec(
                "INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight) VALUES ('w', 'removed', 'a1', 1)")

            let rows = try await conn.rows(
                """
                SELECT gate, gate_type, partition, pending, in_flight, cap::float8, round(tokens::numeric, 3)::float8, ewma_lag_ms
                FROM dispatch_policy.partition_overview WHERE policy = 'w' ORDER BY gate, partition
                """, logger: TestServer.logger
            ).map { try $0.decode((String, String, String, Int, Int, Double?, Double?, Double?).self) }
            try await conn.exec("COMMIT")
            let summary = rows.map { "\($0.0)/\($0.2) pending=\($0.3) in_flight=\($0.4) cap=\($0.5.map { "\(Int($0))" } ?? "-")" }
            #expect(
                summary == [
                    "adaptive_concurrency/a1 pending=2 in_flight=0 cap=4",
                    "adaptive_concurrency/a2 pending=1 in_flight=0 cap=-",
                    "concurrency/a1 pending=2 in_flight=3 cap=5",
                    "concurrency/a2 pending=1 in_flight=0 cap=5",
                    "global_cap/default pending=3 in_flight=0 cap=100",
                    "throttle/ep:x pending=2 in_flight=0 cap=-",
                    "throttle/ep:y pending=1 in_flight=0 cap=-",
                    "throttle/ep:z pending=0 in_flight=0 cap=-",
                ])
            let byKey = Dictionary(rows.map { ("\($0.0)/\($0.2)", $0) }, uniquingKeysWith: { a, _ in a })
            #expect(byKey["throttle/ep:x"]?.6 == 10)  // 2 + 30 s × 1/s, capped at burst 10
            #expect(byKey["throttle/ep:z"]?.6 == 3)  // 1 + 2 s × 1/s
            #expect(byKey["throttle/ep:y"]?.6 == nil)
            #expect(byKey["adaptive_concurrency/a1"]?.7 == 120.5)
        }
    }
}
