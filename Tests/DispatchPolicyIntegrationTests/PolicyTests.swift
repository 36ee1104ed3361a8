import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

let designExampleConfig = """
    {
      "gates": [
        {"type": "throttle", "name": "per_endpoint",
         "rate": {"context": "rate_limit", "default": 60}, "per": 60, "burst": 100,
         "partition_by": "{endpoint_id}"},
        {"type": "concurrency", "max": 5, "partition_by": "acct:{account_id}"},
        {"type": "global_cap", "max": 200},
        {"type": "fair_interleave"},
        {"type": "adaptive_concurrency", "partition_by": "{account_id}",
         "initial_max": 3, "target_lag_ms": 1000, "min": 1}
      ],
      "round_robin_by": "{account_id}",
      "batch_size": 500,
      "round_robin_quantum": 50,
      "lease_seconds": 900,
      "max_attempts": 25,
      "target": {"type": "ready_queue"}
    }
    """

/// An invalid config, the field its error must name, and the rule.
struct InvalidConfig: Sendable, CustomTestStringConvertible {
    var config: String
    var field: String
    var rule: String
    var testDescription: String { "\(field) \(rule)" }
}

let invalidConfigs: [InvalidConfig] = [
    .init(config: #"[]"#, field: "config", rule: "must be a JSON object"),
    .init(config: #"{"gatez": []}"#, field: "gatez", rule: "is not a known field"),
    .init(config: #"{"gates": {}}"#, field: "gates", rule: "must be an array"),
    .init(config: #"{"gates": [42]}"#, field: "gates[0]", rule: "must be an object"),
    .init(config: #"{"gates": [{"type": "leaky_bucket"}]}"#, field: "gates[0].type", rule: "must be one of"),
    .init(config: #"{"gates": [{"name": "x"}]}"#, field: "gates[0].type", rule: "must be one of"),
    .init(config: #"{"gates": [{"type": "throttle", "per": 60}]}"#, field: "gates[0].rate", rule: "is required"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": -1, "per": 60}]}"#, field: "gates[0].rate",
        rule: "must be a number from 0 to 1000000"),
    .init(config: #"{"gates": [{"type": "throttle", "rate": "fast", "per": 60}]}"#, field: "gates[0].rate", rule: "must be a number or"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": {"context": "r"}, "per": 60}]}"#, field: "gates[0].rate",
        rule: "must be a number or"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": {"context": "", "default": 1}, "per": 60}]}"#, field: "gates[0].rate.context",
        rule: "must name a context key"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": {"context": "r", "default": -2}, "per": 60}]}"#, field: "gates[0].rate.default",
        rule: "must be a number from 0 to 1000000"),
    .init(config: #"{"gates": [{"type": "throttle", "rate": 1}]}"#, field: "gates[0].per", rule: "is required"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": 1, "per": 0}]}"#, field: "gates[0].per",
        rule: "must be a number from 0.001 to 31536000"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": 1, "per": -5}]}"#, field: "gates[0].per",
        rule: "must be a number from 0.001 to 31536000"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": 1, "per": 1, "burst": 0}]}"#, field: "gates[0].burst",
        rule: "must be a number from 1 to 1000000"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": 1, "per": 1, "every": 1}]}"#, field: "gates[0].every",
        rule: "is not a known field"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": 1, "per": 1, "partition_by": ""}]}"#, field: "gates[0].partition_by",
        rule: "non-empty template"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": 1, "per": 1, "partition_by": "a{b"}]}"#, field: "gates[0].partition_by",
        rule: "template"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": 1, "per": 1, "partition_by": "{a b}"}]}"#, field: "gates[0].partition_by",
        rule: "template"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": 1, "per": 1, "partition_by": 7}]}"#, field: "gates[0].partition_by",
        rule: "template"),
    .init(config: #"{"gates": [{"type": "concurrency"}]}"#, field: "gates[0].max", rule: "is required"),
    .init(
        config: #"{"gates": [{"type": "concurrency", "max": 1.5}]}"#, field: "gates[0].max", rule: "must be an integer from 0 to 1000000"),
    .init(config: #"{"gates": [{"type": "concurrency", "max": -1}]}"#, field: "gates[0].max", rule: "must be an integer from 0 to 1000000"),
    .init(config: #"{"gates": [{"type": "global_cap"}]}"#, field: "gates[0].max", rule: "is required"),
    .init(
        config: #"{"gates": [{"type": "global_cap", "max": {"context": "m", "default": 3}}]}"#, field: "gates[0].max",
        rule: "must be a number"),
    .init(
        config: #"{"gates": [{"type": "global_cap", "max": 3, "partition_by": "{a}"}]}"#, field: "gates[0].partition_by",
        rule: "is not a known field"),
    .init(config: #"{"gates": [{"type": "fair_interleave", "max": 3}]}"#, field: "gates[0].max", rule: "is not a known field"),
    .init(config: #"{"gates": [{"type": "adaptive_concurrency"}]}"#, field: "gates[0].target_lag_ms", rule: "is required"),
    .init(
        config: #"{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 0}]}"#, field: "gates[0].target_lag_ms",
        rule: "must be a number from 1 to 86400000"),
    .init(
        config: #"{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 9, "min": 0}]}"#, field: "gates[0].min",
        rule: "must be an integer from 1 to 1000000"),
    .init(
        config: #"{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 9, "min": 4, "max": 3}]}"#, field: "gates[0].max",
        rule: "at least min"),
    .init(
        config: #"{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 9, "initial_max": 0}]}"#, field: "gates[0].initial_max",
        rule: "must be an integer from 1 to 1000000"),
    .init(
        config: #"{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 9, "max": 5, "initial_max": 6}]}"#,
        field: "gates[0].initial_max", rule: "from min"),
    .init(
        config: #"{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 9, "ewma_alpha": 0}]}"#, field: "gates[0].ewma_alpha",
        rule: "(0, 1]"),
    .init(
        config: #"{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 9, "ewma_alpha": 1.5}]}"#, field: "gates[0].ewma_alpha",
        rule: "(0, 1]"),
    .init(
        config: #"{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 9, "failure_decrease_factor": 1}]}"#,
        field: "gates[0].failure_decrease_factor", rule: "(0, 1)"),
    .init(
        config: #"{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 9, "overload_decrease_factor": 0}]}"#,
        field: "gates[0].overload_decrease_factor", rule: "(0, 1)"),
    .init(
        config: #"{"gates": [{"type": "throttle", "rate": 1, "per": 1}, {"type": "throttle", "rate": 9, "per": 9}]}"#,
        field: "gates[1].name", rule: "must be unique"),
    .init(
        config: #"{"gates": [{"type": "throttle", "name": "t", "rate": 1, "per": 1}, {"type": "concurrency", "name": "t", "max": 1}]}"#,
        field: "gates[1].name", rule: "must be unique"),
    .init(
        config: #"{"gates": [{"type": "throttle", "name": "a b", "rate": 1, "per": 1}]}"#, field: "gates[0].name",
        rule: "1 to 64 characters"),
    .init(config: #"{"round_robin_by": "{"}"#, field: "round_robin_by", rule: "template"),
    .init(config: #"{"batch_size": 0}"#, field: "batch_size", rule: "integer from 1"),
    .init(config: #"{"batch_size": 10.5}"#, field: "batch_size", rule: "integer from 1"),
    .init(config: #"{"round_robin_quantum": 0}"#, field: "round_robin_quantum", rule: "integer from 1"),
    .init(config: #"{"lease_seconds": 0}"#, field: "lease_seconds", rule: "integer from 1"),
    .init(config: #"{"max_attempts": 0}"#, field: "max_attempts", rule: "integer from 1"),
    .init(config: #"{"target": "ready_queue"}"#, field: "target", rule: "must be an object"),
    .init(config: #"{"target": {"type": "kafka"}}"#, field: "target.type", rule: "must be one of ready_queue, sql"),
    .init(config: #"{"target": {"type": "ready_queue", "function": "x.y"}}"#, field: "target.function", rule: "is not a known field"),
    .init(config: #"{"target": {"type": "sql", "function": "insert_event"}}"#, field: "target.function", rule: "schema.name"),
]

@Suite("Policies", .timeLimit(.minutes(15)))
struct PolicyTests {
    @Test("declare_policy stores the DESIGN example and reads it back")
    func declaresDesignExample() async throws {
        try await withTestDatabase { conn, _ async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "webhooks", config: designExampleConfig)
            let stored = try #require(try await catalog.policy(named: "webhooks"))
            #expect(stored.paused == false)
            #expect(
                try await conn.scalar(
                    "SELECT config = \(designExampleConfig)::jsonb FROM dispatch_policy.policies WHERE name = 'webhooks'", as: Bool.self))
            #expect(try await catalog.list().map(\.name) == ["webhooks"])
        }
    }

    @Test("a policy without gates is valid")
    func noGates() async throws {
        try await withTestDatabase { conn, _ async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "plain", config: "{}")
            try await catalog.declare(name: "ordered", config: #"{"gates": [], "round_robin_by": "{tenant}"}"#)
            #expect(try await catalog.list().map(\.name) == ["ordered", "plain"])
        }
    }

    @Test("two throttles with different names on one policy are both accepted")
    func namedGatesOfOneType() async throws {
        try await withTestDatabase { conn, _ async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(
                name: "p",
                config: """
                    {"gates": [{"type": "throttle", "name": "per_minute", "rate": 10, "per": 60},
                               {"type": "throttle", "name": "per_hour", "rate": 600, "per": 3600}]}
                    """)
            // Stored as declared: both gates, in order, with their own numbers.
            let stored = try PolicyConfig(json: try #require(try await catalog.policy(named: "p")).config)
            #expect(stored.gates.map(\.effectiveName) == ["per_minute", "per_hour"])
            #expect(stored.gates.map(\.type) == [.throttle, .throttle])
            #expect(
                try await conn.scalar(
                    """
                    SELECT jsonb_agg(g ->> 'rate' || '/' || (g ->> 'per') ORDER BY n)::text
                    FROM dispatch_policy.policies, jsonb_array_elements(config -> 'gates') WITH ORDINALITY AS x(g, n)
                    WHERE name = 'p'
                    """, as: String.self) == #"["10/60", "600/3600"]"#)
        }
    }

    @Test("validate_policy checks a name and config as declare_policy does, and stores nothing")
    func validatePolicy() async throws {
        try await withTestDatabase { conn, _ async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await conn.exec(#"SELECT dispatch_policy.validate_policy('new', '{"gates": [{"type": "concurrency", "max": 2}]}')"#)
            #expect(try await catalog.list().isEmpty)
            try await catalog.declare(name: "p", config: #"{"batch_size": 10}"#)
            let before = try #require(try await catalog.policy(named: "p"))
            try await conn.exec(#"SELECT dispatch_policy.validate_policy('p', '{"batch_size": 20}')"#)
            let after = try #require(try await catalog.policy(named: "p"))
            #expect(after.config == before.config && after.updatedAt == before.updatedAt)
            let error = await expectSQLError(
                "22023", "invalid policy config: gates[0].per must be a number from 0.001 to 31536000 (seconds)"
            ) {
                try await conn.exec(
                    #"SELECT dispatch_policy.validate_policy('p', '{"gates": [{"type": "throttle", "rate": 1, "per": 0}]}')"#)
            }
            #expect(error?.detail == "gates[0].per is 0.")
            await expectSQLError("22023", "gatez is not a known field") {
                try await conn.exec(#"SELECT dispatch_policy.validate_policy('p', '{"gatez": []}')"#)
            }
            await expectSQLError("22023", "invalid policy name") {
                try await conn.exec("SELECT dispatch_policy.validate_policy('has space', '{}')")
            }
            #expect(try await catalog.list().map(\.name) == ["p"])
            #expect(try await catalog.policy(named: "p")?.config == before.config)
        }
    }

    @Test("declaring again replaces the config; the same config changes nothing")
    func redeclare() async throws {
        try await withTestDatabase { conn, _ async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "p", config: #"{"batch_size": 10}"#)
            let first = try #require(try await catalog.policy(named: "p"))
            try await catalog.declare(name: "p", config: #"{"batch_size": 10}"#)
            #expect(try await catalog.policy(named: "p")?.updatedAt == first.updatedAt)
            try await conn.exec("SELECT pg_sleep(0.01)")
            try await catalog.declare(name: "p", config: #"{"batch_size": 20}"#)
            let second = try #require(try await catalog.policy(named: "p"))
            #expect(second.config.contains("20"))
            #expect(second.updatedAt > first.updatedAt)
            #expect(second.createdAt == first.createdAt)
        }
    }

    @Test("every invalid config is refused with 22023 naming the field, and nothing is stored", arguments: invalidConfigs)
    func refusesInvalidConfig(_ invalid: InvalidConfig) async throws {
        try await withTestDatabase { conn, _ async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "existing", config: #"{"batch_size": 7}"#)
            for name in ["fresh", "existing"] {
                let error = await expectSQLError("22023", "invalid policy config: \(invalid.field) ") {
                    try await catalog.declare(name: name, config: invalid.config)
                }
                #expect(error?.message.contains(invalid.rule) == true, "\(error?.message ?? "")")
                #expect(error?.detail?.hasPrefix("\(invalid.field) is ") == true)
            }
            #expect(try await catalog.list().map(\.name) == ["existing"])
            #expect(try await catalog.policy(named: "existing")?.config == #"{"batch_size": 7}"#)
        }
    }

    @Test(
        "an invalid policy name is refused with 22023",
        arguments: ["", " padded", "has space", String(repeating: "x", count: 129), "-leading"])
    func refusesInvalidName(_ name: String) async throws {
        try await withTestDatabase { conn, _ async throws in
            await expectSQLError("22023", "invalid policy name") {
                try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: "{}")
            }
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.policies", as: Int.self) == 0)
        }
    }

    @Test("pause and resume flip the flag; an unknown policy is 42704")
    func pauseResume() async throws {
        try await withTestDatabase { conn, _ async throws in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            try await catalog.declare(name: "p", config: "{}")
            try await catalog.pause("p")
            #expect(try await catalog.policy(named: "p")?.paused == true)
            #expect(try await conn.scalar("SELECT paused FROM dispatch_policy.policy_overview WHERE policy = 'p'", as: Bool.self))
            try await catalog.pause("p")
            try await catalog.resume("p")
            #expect(try await catalog.policy(named: "p")?.paused == false)
            await expectSQLError("42704", "unknown policy") { try await catalog.pause("nope") }
            await expectSQLError("42704", "unknown policy") { try await catalog.resume("nope") }
        }
    }

    @Test("a policy file is applied all or nothing")
    func policyFileAllOrNothing() async throws {
        try await withTestDatabase { conn, _ async throws in
            let file = try PolicyCatalog.PolicyFile(
                json: """
                    [{"name": "good", "config": {"gates": [{"type": "global_cap", "max": 3}]}},
                     {"name": "bad", "config": {"gates": [{"type": "global_cap", "max": -3}]}}]
                    """)
            #expect(file.names == ["good", "bad"])
            do {
                try await PolicyCatalog.apply(file, on: conn, logger: TestServer.logger)
                Issue.record("an invalid file was applied")
            } catch let error as DispatchPolicyError {
                #expect(error.sqlState == "22023")
                #expect(error.message.hasPrefix("policy bad: invalid policy config: gates[0].max"))
            }
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.policies", as: Int.self) == 0)

            let single = try PolicyCatalog.PolicyFile(json: #"{"name": "one", "config": {"lease_seconds": 30}}"#)
            try await PolicyCatalog.apply(single, on: conn, logger: TestServer.logger)
            #expect(
                try await conn.scalar("SELECT config ->> 'lease_seconds' FROM dispatch_policy.policies WHERE name = 'one'", as: String.self)
                    == "30")
        }
    }
}
