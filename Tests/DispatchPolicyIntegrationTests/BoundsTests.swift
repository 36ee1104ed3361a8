import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

/// A config field and how to place a value in a config (and where the error points).
struct ConfigField: Sendable, CustomTestStringConvertible {
    var limit: FieldLimit
    var path: String
    var config: @Sendable (String) -> String
    var testDescription: String { path }
}

private func gate(_ body: String) -> String { #"{"gates": [{\#(body)}]}"# }

/// Every numeric field of a policy config, with where it goes.
let configFields: [ConfigField] = [
    .init(limit: FieldLimits.batchSize, path: "batch_size") { #"{"batch_size": \#($0)}"# },
    .init(limit: FieldLimits.roundRobinQuantum, path: "round_robin_quantum") { #"{"round_robin_quantum": \#($0)}"# },
    .init(limit: FieldLimits.leaseSeconds, path: "lease_seconds") { #"{"lease_seconds": \#($0)}"# },
    .init(limit: FieldLimits.maxAttempts, path: "max_attempts") { #"{"max_attempts": \#($0)}"# },
    .init(limit: FieldLimits.throttleRate, path: "gates[0].rate") { gate(#""type": "throttle", "rate": \#($0), "per": 1"#) },
    .init(limit: FieldLimits.throttleRate, path: "gates[0].rate.default") {
        gate(#""type": "throttle", "rate": {"context": "r", "default": \#($0)}, "per": 1"#)
    },
    .init(limit: FieldLimits.throttlePer, path: "gates[0].per") { gate(#""type": "throttle", "rate": 1, "per": \#($0)"#) },
    .init(limit: FieldLimits.throttlePer, path: "gates[0].per.default") {
        gate(#""type": "throttle", "rate": 1, "per": {"context": "w", "default": \#($0)}"#)
    },
    .init(limit: FieldLimits.throttleBurst, path: "gates[0].burst") { gate(#""type": "throttle", "rate": 1, "per": 1, "burst": \#($0)"#) },
    .init(limit: FieldLimits.concurrencyMax, path: "gates[0].max") { gate(#""type": "concurrency", "max": \#($0)"#) },
    .init(limit: FieldLimits.throttleCost, path: "gates[0].cost") {
        gate(#""type": "throttle", "rate": 1, "per": 1, "burst": 1000000, "cost": \#($0)"#)
    },
    .init(limit: FieldLimits.throttleCost, path: "gates[0].cost.default") {
        gate(#""type": "throttle", "rate": 1, "per": 1, "burst": 1000000, "cost": {"context": "c", "default": \#($0)}"#)
    },
    .init(limit: FieldLimits.roundRobinWeight, path: "round_robin_weight") {
        #"{"round_robin_by": "{t}", "round_robin_weight": \#($0)}"#
    },
    .init(limit: FieldLimits.roundRobinWeight, path: "round_robin_weight.default") {
        #"{"round_robin_by": "{t}", "round_robin_weight": {"context": "w", "default": \#($0)}}"#
    },
    .init(limit: FieldLimits.concurrencyMax, path: "gates[0].max.default") {
        gate(#""type": "concurrency", "max": {"context": "m", "default": \#($0)}"#)
    },
    .init(limit: FieldLimits.globalCapMax, path: "gates[0].max") { gate(#""type": "global_cap", "max": \#($0)"#) },
    .init(limit: FieldLimits.adaptiveInitialMax, path: "gates[0].initial_max") {
        gate(#""type": "adaptive_concurrency", "target_lag_ms": 100, "initial_max": \#($0)"#)
    },
    .init(limit: FieldLimits.adaptiveMin, path: "gates[0].min") {
        gate(#""type": "adaptive_concurrency", "target_lag_ms": 100, "min": \#($0)"#)
    },
    .init(limit: FieldLimits.adaptiveMax, path: "gates[0].max") {
        gate(#""type": "adaptive_concurrency", "target_lag_ms": 100, "max": \#($0)"#)
    },
    .init(limit: FieldLimits.adaptiveTargetLagMs, path: "gates[0].target_lag_ms") {
        gate(#""type": "adaptive_concurrency", "target_lag_ms": \#($0)"#)
    },
    .init(limit: FieldLimits.adaptiveEWMAAlpha, path: "gates[0].ewma_alpha") {
        gate(#""type": "adaptive_concurrency", "target_lag_ms": 100, "ewma_alpha": \#($0)"#)
    },
    .init(limit: FieldLimits.adaptiveFailureDecrease, path: "gates[0].failure_decrease_factor") {
        gate(#""type": "adaptive_concurrency", "target_lag_ms": 100, "failure_decrease_factor": \#($0)"#)
    },
    .init(limit: FieldLimits.adaptiveOverloadDecrease, path: "gates[0].overload_decrease_factor") {
        gate(#""type": "adaptive_concurrency", "target_lag_ms": 100, "overload_decrease_factor": \#($0)"#)
    },
]

/// A JSON number for a Double, written exactly.
private func json(_ value: Double) -> String {
    if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
    return "\(value)"
}

extension FieldLimit {
    /// Values the config must accept: the bounds (when inclusive) and one inside.
    var inside: [Double] {
        var values: [Double] = []
        if !minimumExclusive { values.append(minimum) }
        let middle = (minimum + maximum) / 2
        values.append(integral ? middle.rounded(.down) : middle)
        if !maximumExclusive { values.append(maximum) }
        return values
    }

    /// Values it must refuse: just beyond each bound, huge and tiny numbers,
    /// and a fraction for integral fields.
    var beyond: [Double] {
        var values: [Double] = [
            minimumExclusive ? minimum : minimum - (integral ? 1 : minimum == 0 ? 0.5 : minimum / 2),
            maximumExclusive ? maximum : maximum + (integral ? 1 : 0.5),
            1e300, -1e300,
        ]
        if integral { values.append(minimum + 0.5) }
        return values
    }
}

@Suite("Bounds: every numeric field, at, inside and beyond its limits", .timeLimit(.minutes(15)))
struct BoundsTests {
    @Test("the runner's limits table is the database's", .timeLimit(.minutes(3)))
    func sameLimits() async throws {
        try await withTestDatabase { conn, _ in
            let rows = try await conn.rows(
                """
                SELECT field, minimum::float8, minimum_exclusive, maximum::float8, maximum_exclusive, integral,
                       default_value::float8, unit
                FROM dispatch_policy.limits()
                """, logger: TestServer.logger
            ).map { row in
                let (field, lo, loEx, hi, hiEx, integral, value, unit) =
                    try row.decode((String, Double, Bool, Double, Bool, Bool, Double?, String).self)
                return FieldLimit(
                    field, lo, hi, integral: integral, default: value, unit: unit, minimumExclusive: loEx, maximumExclusive: hiEx)
            }
            #expect(rows == FieldLimits.database)
        }
    }

    @Test("the README's Limits table states every bound of dispatch_policy.limits()")
    func readmeTable() async throws {
        let readme = try String(contentsOf: packageRoot.appending(path: "README.md"), encoding: .utf8)
        try await withTestDatabase { conn, _ in
            let rows = try await conn.rows(
                """
                SELECT field, CASE WHEN minimum_exclusive THEN '(' ELSE '[' END || trim_scale(minimum) || ', '
                              || trim_scale(maximum) || CASE WHEN maximum_exclusive THEN ')' ELSE ']' END
                FROM dispatch_policy.limits()
                """, logger: TestServer.logger
            ).map { try $0.decode((String, String).self) }
            for (field, bounds) in rows {
                #expect(readme.contains("| `\(field)` | \(bounds)"), "README lacks \(field) \(bounds)")
            }
        }
    }

    /// Regression (4): adaptive "max": 1e20 killed the runner with SIGILL;
    /// initial_max 3e9, per 1e-400, global_cap 1e400 and more failed every tick.
    @Test("each field accepts its bounds and refuses what is beyond, naming the field; accepted configs tick", arguments: configFields)
    func walk(_ field: ConfigField) async throws {
        try await withTestDatabase { conn, _ in
            let catalog = PolicyCatalog(executor: conn, logger: TestServer.logger)
            for value in field.limit.beyond {
                let error = await expectSQLError("22023", "\(field.path) ") {
                    try await catalog.declare(name: "p", config: field.config(json(value)))
                }
                #expect(error?.message.contains("must be") == true, "\(value): \(error?.message ?? "")")
            }
            #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.policies", as: Int.self) == 0)
            for (index, value) in field.limit.inside.enumerated() {
                let name = "p\(index)"
                try await catalog.declare(name: name, config: field.config(json(value)))
                try await conn.exec(#"SELECT dispatch_policy.stage(\#(name), '1', '{"r": 1e308, "w": -5, "m": 2.5}')"#)
                let result = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: name)
                #expect(result.outcome == .ran)
            }
        }
    }

    /// Regression (4): a config that bypassed validation (written before
    /// these bounds existed, or with the trigger disabled) must not trap the
    /// runner: its policy fails alone or runs clamped.
    @Test("a stored config beyond the bounds never traps the runner")
    func storedBadConfig() async throws {
        try await withTestDatabase { conn, _ in
            try await conn.exec("ALTER TABLE dispatch_policy.policies DISABLE TRIGGER policies_validate")
            let configs = [
                gate(#""type": "adaptive_concurrency", "target_lag_ms": 100, "max": 1e20, "initial_max": 3000000000"#),
                gate(#""type": "throttle", "rate": 1e308, "per": 1e-300, "burst": 1e300"#),
                gate(#""type": "global_cap", "max": 1e300"#),
                gate(#""type": "concurrency", "max": -5"#),
                #"{"batch_size": 1e20, "round_robin_quantum": -1, "lease_seconds": 1e12}"#,
                gate(#""type": "throttle", "rate": 1, "per": 1e-400"#),
            ]
            for (index, config) in configs.enumerated() {
                try await conn.exec("INSERT INTO dispatch_policy.policies (name, config) VALUES (\("bad\(index)"), \(config)::jsonb)")
                try await conn.exec("SELECT dispatch_policy.stage(\("bad\(index)"), '1')")
                do {
                    _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "bad\(index)")
                } catch {
                    // Failing this one policy is fine; trapping is not.
                }
            }
            try await conn.exec("ALTER TABLE dispatch_policy.policies ENABLE TRIGGER policies_validate")
        }
    }

    /// Regression (3): "rate_limit": 1e308 in one job's context was stored in
    /// the bucket; every later refill overflowed, and an hour later prune did too.
    @Test("a context value beyond the bounds takes the default and cannot poison a bucket or maintenance")
    func contextCannotPoison() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p",
                config: try PolicyConfig {
                    Gate.throttle(
                        rate: .context("rate_limit", default: 5), per: .context("window", default: 1),
                        burst: .context("rate_limit", default: 5), partitionBy: "{ep}")
                }.json())
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '1', '{"ep": "x", "rate_limit": 1e308, "window": 1e-308}')"#)
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '2', '{"ep": "x", "rate_limit": 2}')"#)
            let ticker = Ticker(connection: conn, logger: TestServer.logger)
            // The bucket takes the first job's values: rate and window fall back to their defaults.
            #expect(try await ticker.tick(policy: "p").admitted == 2)
            let (rate, per, burst) = try #require(
                try await conn.rows(
                    "SELECT rate, per_seconds, burst FROM dispatch_policy.throttle_buckets", logger: TestServer.logger
                ).first
            ).decode((Double, Double, Double).self)
            #expect(rate == 5 && per == 1 && burst == 5)
            // An hour later refill and prune still work.
            #expect(
                try await conn.scalar(
                    "SELECT count(*) FROM dispatch_policy.prune('7 days', '1 hour', now() + interval '2 hours')", as: Int.self) > 0)
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '3', '{"ep": "x"}')"#)
            #expect(try await ticker.tick(policy: "p").outcome == .ran)
            // The database refuses a poisoned bucket outright.
            await expectSQLError("23514", "throttle_buckets_rate_check") {
                try await conn.exec("UPDATE dispatch_policy.throttle_buckets SET rate = 1e308")
            }
        }
    }

    /// Regression (12): per could not come from the context.
    @Test("per comes from the job's context when it is within bounds")
    func perFromContext() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p",
                config: try PolicyConfig {
                    Gate.throttle(rate: 1, per: .context("window", default: 3600), burst: 1, partitionBy: "{ep}")
                }.json())
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '1', '{"ep": "fast", "window": 0.5}')"#)
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '2', '{"ep": "slow"}')"#)
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            let windows = try await conn.rows(
                "SELECT partition, per_seconds FROM dispatch_policy.throttle_buckets ORDER BY 1", logger: TestServer.logger
            ).map { try $0.decode((String, Double).self) }
            #expect(windows.map(\.0) == ["fast", "slow"] && windows.map(\.1) == [0.5, 3600])
        }
    }

    /// Regression (2): a 9,000-character queue name failed pg_notify in admit
    /// and a ~3,800-character partition value overflowed the counter index:
    /// every tick of the policy failed.
    @Test("nothing one job carries can stop its policy: long keys are stored shortened, long names refused at staging")
    func oneJobCannotBlock() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p",
                config: try PolicyConfig(roundRobinBy: "{acct}") {
                    Gate.concurrency(max: 5, partitionBy: "{acct}")
                    Gate.throttle(rate: 100, per: 1, partitionBy: "ep:{acct}")
                }.json())
            let long = String(repeating: "x", count: 3800) + "\u{E9}"
            try await conn.exec("SELECT dispatch_policy.stage('p', '1', jsonb_build_object('acct', \(long)::text))")
            try await conn.exec(#"SELECT dispatch_policy.stage('p', '2', '{"acct": "short"}')"#)
            // (A queue name from before the limit existed is kept as dead by
            // migration 0008, and a constraint refuses new ones: MigrationTests.)
            let result = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            #expect(result.admitted == 2)
            let fitted = PartitionKey.fit(long)
            #expect(
                try await conn.scalar("SELECT count(*) FROM dispatch_policy.inflight_counters WHERE partition = \(fitted)", as: Int.self)
                    == 1)
            // Swift (which admitted) and SQL (which the views and redeclare use) agree on the key.
            #expect(
                try await conn.scalar(
                    "SELECT partition = dispatch_policy._partition_key('ep:{acct}', jsonb_build_object('acct', \(long)::text)) FROM dispatch_policy.throttle_buckets WHERE partition LIKE 'ep:xxx%'",
                    as: Bool.self))
            #expect(
                try await conn.scalar(
                    "SELECT partition FROM dispatch_policy.throttle_buckets WHERE partition LIKE 'ep:xxx%'", as: String.self)
                    == PartitionKey.fit("ep:" + long))
            try await expectCountersConsistent(conn)
            for (field, call) in [
                ("queue", "SELECT dispatch_policy.stage('p', '1', queue => repeat('q', 9000))"),
                ("dedupe_key", "SELECT dispatch_policy.stage('p', '1', dedupe_key => repeat('k', 10000))"),
                ("round_robin_key", "SELECT dispatch_policy.stage('p', '1', round_robin_key => repeat('k', 10000))"),
            ] {
                let error = await expectSQLError("22023", "\(field) must be a string of 1 to") {
                    try await conn.exec(PostgresQuery(unsafeSQL: call))
                }
                #expect(error?.hint == "Nothing was stored.")
            }
        }
    }

    /// Regression (18): partition_overview showed 0 in flight for throttle partitions.
    @Test("partition_overview shows what is in flight for every gate type")
    func inFlightForEveryGate() async throws {
        try await withTestDatabase { conn, _ in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: "p",
                config: try PolicyConfig {
                    Gate.throttle(rate: 10, per: 1, partitionBy: "{ep}")
                    Gate.concurrency(max: 5, partitionBy: "{acct}")
                    Gate.fairInterleave()
                }.json())
            try await conn.exec(
                #"SELECT dispatch_policy.stage_many('p', '[{"args": 1, "context": {"ep": "e", "acct": "a"}}, {"args": 2, "context": {"ep": "e", "acct": "b"}}]')"#
            )
            #expect(try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p").admitted == 2)
            let rows = try await conn.rows(
                "SELECT gate, partition, in_flight FROM dispatch_policy.partition_overview ORDER BY 1, 2", logger: TestServer.logger
            ).map { try $0.decode((String, String, Int).self) }
            #expect(
                rows.map { "\($0.0)/\($0.1)=\($0.2)" } == [
                    "concurrency/a=1", "concurrency/b=1", "fair_interleave/e=2", "throttle/e=2",
                ])
        }
    }
}
