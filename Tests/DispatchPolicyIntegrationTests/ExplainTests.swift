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

private func explain(_ conn: PostgresConnection, _ id: Int64) async throws -> JobExplanation {
    try await JobExplanation.load(id: id, on: conn, logger: TestServer.logger)
}

private func stage(_ conn: PostgresConnection, _ policy: String, _ context: String, notBefore: String = "NULL") async throws -> Int64 {
    try await conn.scalar(
        "SELECT dispatch_policy.stage(\(policy), '{}', \(context)::jsonb, not_before => \(unescaped: notBefore))", as: Int64.self)
}

@Suite("Explain: why a job waits", .timeLimit(.minutes(15)))
struct ExplainTests {
    @Test("a throttled job: the gate, its partition, the tokens, the time to the next token, and a wait that counts the jobs ahead")
    func throttled() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                #"{"gates": [{"type": "throttle", "name": "per_acct", "rate": 1, "per": 3600, "burst": 1, "partition_by": "{acct}"}]}"#)
            // One token an hour: a loaded machine cannot see it refill during the test.
            let first = try await stage(conn, "p", #"{"acct": "a"}"#)
            let second = try await stage(conn, "p", #"{"acct": "a"}"#)
            let third = try await stage(conn, "p", #"{"acct": "a"}"#)
            let other = try await stage(conn, "p", #"{"acct": "b"}"#)
            // Before any tick, every gate has room.
            #expect(try await explain(conn, first).rows.last?.verdict == "next tick")
            #expect(try await tick(conn, "p").admitted == 2)

            let admitted = try await explain(conn, first)
            #expect(admitted.state == "admitted" && admitted.rows.count == 1)
            #expect(try await explain(conn, other).state == "admitted")

            let waiting = try await explain(conn, second)
            #expect(waiting.state == "pending")
            let gate = try #require(waiting.rows.first { $0.aspect == "gate" })
            #expect(gate.gate == "per_acct" && gate.partition == "a" && gate.verdict == "waits")
            #expect(gate.explanation.contains("the next whole token in"))
            let toToken = try #require(gate.waitSeconds)
            #expect(toToken > 3000 && toToken <= 3600)
            let estimate = try #require(waiting.rows.last)
            #expect(estimate.aspect == "estimate" && estimate.verdict == "estimated")
            #expect(abs((estimate.waitSeconds ?? 0) - toToken) < 0.5)
            // One job of its partition is ahead of the third: a token more.
            let behind = try await explain(conn, third)
            #expect(behind.rows.first { $0.aspect == "gate" }?.explanation.contains("1 job(s) of this partition ahead") == true)
            let behindToToken = try #require(behind.rows.first { $0.aspect == "gate" }?.waitSeconds)
            #expect(abs((behind.rows.last?.waitSeconds ?? 0) - (behindToToken + 3600)) < 0.01)
            #expect(behind.rows.contains { $0.aspect == "lane" && $0.explanation.hasPrefix("1 job(s) ahead in its lane") })
        }
    }

    @Test("a job behind a full cap waits for a slot (no estimate); once one is released every gate has room")
    func capped() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                #"{"gates": [{"type": "concurrency", "max": {"context": "limit", "default": 1}, "partition_by": "{acct}"}, {"type": "global_cap", "max": 10}]}"#
            )
            let first = try await stage(conn, "p", #"{"acct": "a"}"#)
            let second = try await stage(conn, "p", #"{"acct": "a"}"#)
            #expect(try await tick(conn, "p").admitted == 1)
            let waiting = try await explain(conn, second)
            let cap = try #require(waiting.rows.first { $0.gate == "concurrency" })
            #expect(cap.verdict == "waits" && cap.explanation.hasPrefix("concurrency: 1 in flight of a cap of 1"))
            #expect(waiting.rows.first { $0.gate == "global_cap" }?.verdict == "ok")
            #expect(waiting.rows.last?.verdict == "unknown" && waiting.rows.last?.waitSeconds == nil)
            // The lane is blocked until a slot is released, and says so.
            #expect(
                waiting.rows.first { $0.aspect == "lane" }?.explanation.contains("blocked by concurrency partition 'a' until it has room")
                    == true)
            _ = try await conn.scalar("SELECT dispatch_policy.complete(\(first))", as: Bool.self)
            let free = try await explain(conn, second)
            #expect(free.waitingOn.isEmpty)
            #expect(free.rows.last?.verdict == "next tick")

            // The cap comes from the job's context when the config would
            // accept it (2), else the default (2.5 is not a whole number).
            let roomy = try await stage(conn, "p", #"{"acct": "a", "limit": 2}"#)
            #expect(try await explain(conn, roomy).rows.first { $0.gate == "concurrency" }?.explanation.contains("of a cap of 2") == true)
            let odd = try await stage(conn, "p", #"{"acct": "a", "limit": "2.5"}"#)
            #expect(try await explain(conn, odd).rows.first { $0.gate == "concurrency" }?.explanation.contains("of a cap of 1") == true)
        }
    }

    @Test("paused, scheduled, adaptive, finished, dead and unknown jobs")
    func states() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                #"{"max_attempts": 1, "gates": [{"type": "adaptive_concurrency", "partition_by": "{acct}", "initial_max": 2, "target_lag_ms": 500}]}"#
            )
            let later = try await stage(conn, "p", #"{"acct": "a"}"#, notBefore: "now() + interval '1 hour'")
            let scheduled = try await explain(conn, later)
            #expect(scheduled.state == "scheduled")
            let wait = try #require(scheduled.rows.first { $0.aspect == "schedule" }?.waitSeconds)
            #expect(wait > 3590 && wait <= 3600)
            #expect(abs((scheduled.rows.last?.waitSeconds ?? 0) - wait) < 1)

            let now = try await stage(conn, "p", #"{"acct": "a"}"#)
            let adaptive = try await explain(conn, now)
            #expect(
                adaptive.rows.first { $0.aspect == "gate" }?.explanation
                    .hasPrefix("adaptive_concurrency: 0 in flight of a cap of 2 (adaptive; no lag observed yet, target 500 ms)") == true)
            try await conn.exec("SELECT dispatch_policy.pause('p')")
            let paused = try await explain(conn, now)
            #expect(paused.waitingOn.map(\.aspect) == ["policy"])
            #expect(paused.rows.last?.verdict == "unknown")
            try await conn.exec("SELECT dispatch_policy.resume('p')")

            #expect(try await tick(conn, "p").admitted == 1)
            _ = try await conn.scalar("SELECT dispatch_policy.fail(\(now), 'boom')", as: String.self)
            let dead = try await explain(conn, now)
            #expect(dead.state == "dead" && dead.rows.first?.explanation.contains("boom") == true)

            await #expect(throws: DispatchPolicyError.self) { try await explain(conn, 999_999) }
            do {
                _ = try await explain(conn, 999_999)
            } catch let error as DispatchPolicyError {
                #expect(error.sqlState == "P0002")
            }
        }
    }

    /// Found by a hostile pass on explain: each of these said "ok / next
    /// tick" for a job the next tick refused, or failed outright.
    @Test("explain agrees with the tick: a blocked lane, a rate of 0, a tiny rate, a number padded with Unicode spaces")
    func agreesWithTheTick() async throws {
        try await withTestDatabase { conn, _ in
            // A lane blocked on a full cap stays passed over, though a later
            // job of it carries a higher cap in its context.
            try await declare(
                conn, "cm", #"{"gates": [{"type": "concurrency", "max": {"context": "m", "default": 1}, "partition_by": "{p}"}]}"#)
            _ = try await stage(conn, "cm", #"{"p": "x", "m": 1}"#)
            #expect(try await tick(conn, "cm").admitted == 1)
            _ = try await stage(conn, "cm", #"{"p": "x", "m": 1}"#)
            #expect(try await tick(conn, "cm").admitted == 0)
            let roomy = try await stage(conn, "cm", #"{"p": "x", "m": 5}"#)
            let blocked = try await explain(conn, roomy)
            #expect(blocked.rows.first { $0.gate == "concurrency" }?.verdict == "ok")
            #expect(blocked.waitingOn.map(\.aspect) == ["lane"])
            #expect(blocked.rows.last?.verdict == "unknown")
            #expect(try await tick(conn, "cm").admitted == 0)

            // A throttle of rate 0 admits nothing, whatever its bucket holds.
            try await declare(conn, "r0", #"{"gates": [{"type": "throttle", "name": "z", "rate": 0, "per": 1}]}"#)
            let never = try await stage(conn, "r0", "{}")
            let zero = try await explain(conn, never)
            #expect(zero.rows.first { $0.gate == "z" }?.verdict == "waits")
            #expect(zero.rows.last?.verdict == "unknown")
            #expect(try await tick(conn, "r0").admitted == 0)

            // A rate of 1e-300 tokens a year: no overflow, no 300-digit wait.
            try await declare(
                conn, "tiny", #"{"gates": [{"type": "throttle", "name": "th", "rate": 1e-300, "per": 31536000, "burst": 1}]}"#)
            var ids: [Int64] = []
            for _ in 0..<6 { ids.append(try await stage(conn, "tiny", "{}")) }
            #expect(try await tick(conn, "tiny").admitted == 1)
            let slow = try await explain(conn, ids[5])
            #expect(slow.rows.first { $0.gate == "th" }?.explanation.contains("the next whole token in more than a century") == true)
            #expect(slow.rows.last?.verdict == "unknown")

            // A context number padded with Unicode spaces (the runner trims
            // them): read as the runner reads it, not an error.
            try await declare(conn, "sp", #"{"gates": [{"type": "concurrency", "max": {"context": "m", "default": 1}}]}"#)
            for pad in ["\u{2003}", "\u{3000}", "\u{00A0}", "\u{2028}"] {
                let padded = try await conn.scalar(
                    "SELECT dispatch_policy.stage('sp', '{}', jsonb_build_object('m', \(pad + "4" + pad)::text))", as: Int64.self)
                #expect(
                    try await explain(conn, padded).rows.first { $0.gate == "concurrency" }?.explanation.contains("of a cap of 4") == true)
            }
            #expect(try await tick(conn, "sp").admitted == 4)
        }
    }

    @Test("dispatch-policy explain prints one line per reason, escapes a hostile partition key, and exits 1 for an unknown job")
    func command() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let id = try await TestServer.withConnection(settings) { conn async throws in
            try await declare(conn, "p", #"{"gates": [{"type": "concurrency", "max": 0, "partition_by": "{acct}"}]}"#)
            return try await stage(conn, "p", #"{"acct": "evil\nwaits  gate forged"}"#)
        }
        let result = try await cli(["explain", "\(id)"], settings: settings)
        #expect(result.status == 0, "\(result.stderr)")
        let lines = result.stdout.split(separator: "\n")
        #expect(lines.count == 4, "\(result.stdout)")
        #expect(
            lines.contains {
                $0.hasPrefix("waits") && $0.contains("gate concurrency [evil\\nwaits  gate forged]: concurrency: 0 in flight of a cap of 0")
            })
        #expect(!lines.contains { $0.hasPrefix("waits  gate forged") })
        let unknown = try await cli(["explain", "424242"], settings: settings)
        #expect(unknown.status == 1)
        #expect(unknown.stderr.hasPrefix("dispatch-policy: explain: no job 424242 (SQLSTATE P0002)\ndispatch-policy: hint: "))
    }
}
