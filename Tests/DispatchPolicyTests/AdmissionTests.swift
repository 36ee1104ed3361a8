import DispatchPolicy
import Foundation
import Testing

private func rows(_ specs: [(Int64, [String: String])]) -> [BatchRow] {
    specs.map { BatchRow(id: $0.0, context: $0.1) }
}

func evaluate(_ config: PolicyConfig, _ batch: [BatchRow], state: GateState = GateState()) -> AdmissionDecision {
    let admission = Admission(config: config)
    let ordered = admission.order(admission.prepare(batch))
    let needed = admission.requiredState(for: ordered)
    var state = state
    // Buckets not in the given state start full, as refill_buckets creates them.
    for bucket in needed.buckets where state.tokens[bucket.key] == nil { state.tokens[bucket.key] = bucket.burst }
    for (key, initial) in needed.adaptive where state.adaptiveCap[key] == nil { state.adaptiveCap[key] = initial }
    return admission.evaluate(ordered, state: state, buckets: needed.buckets)
}

@Suite("Templates")
struct TemplateTests {
    @Test(
        "placeholders are replaced from the context; missing keys render empty",
        arguments: [
            ("{account_id}", ["account_id": "42"], "42"),
            ("acct:{account_id}", ["account_id": "42"], "acct:42"),
            ("{queue_name}:{account_id}", ["queue_name": "urgent", "account_id": "7"], "urgent:7"),
            ("{missing}", [:], ""),
            ("shared", ["a": "1"], "shared"),
            ("a{x}b{y}c", ["x": "1", "y": "two"], "a1btwoc"),
            // A combining mark right after a brace is text of its own: rendering
            // works on bytes, not on grapheme clusters.
            ("{x}\u{301}", ["x": "e"], "e\u{301}"),
            (
                "\u{301}{x}:{y}", ["x": "\u{1F3F3}\u{FE0F}\u{200D}\u{1F308}", "y": "caf\u{E9}"],
                "\u{301}\u{1F3F3}\u{FE0F}\u{200D}\u{1F308}:caf\u{E9}"
            ),
        ] as [(String, [String: String], String)])
    func renders(_ template: String, _ context: [String: String], _ expected: String) {
        #expect(Array(Template.render(template, context: context).utf8) == Array(expected.utf8))
    }

    @Test("canonically equivalent values render to different bytes, as in PostgreSQL")
    func noNormalization() {
        let nfc = Template.render("{a}", context: ["a": "caf\u{E9}"])
        let nfd = Template.render("{a}", context: ["a": "cafe\u{301}"])
        #expect(nfc == nfd)  // Swift's String equality merges them...
        #expect(GateKey(gate: "g", partition: nfc) != GateKey(gate: "g", partition: nfd))  // ...keys do not.
        #expect(Set([ExactString(nfc), ExactString(nfd), ExactString("caf\u{E9}")]).count == 2)
    }

    @Test("keys longer than 256 bytes are stored as 64 characters, '...' and 32 hex digits of their SHA-256")
    func longKeys() {
        #expect(PartitionKey.fit(String(repeating: "a", count: 256)) == String(repeating: "a", count: 256))
        let long = String(repeating: "\u{E9}", count: 129)  // 258 bytes
        let fitted = PartitionKey.fit(long)
        #expect(fitted.unicodeScalars.count == 64 + 3 + 32)
        #expect(fitted.hasPrefix(String(repeating: "\u{E9}", count: 64) + "..."))
        #expect(PartitionKey.fit(long + "x") != fitted)
        #expect(PartitionKey.fit(long) == fitted)
        #expect(PartitionKey.of(template: nil, context: [:]) == "default")
    }
}

@Suite("Gate values")
struct GateValueTests {
    @Test("a constant, or the context value with a default")
    func values() {
        let limit = FieldLimits.throttleRate
        #expect(GateValue.constant(5).value(in: [:], within: limit) == 5)
        let value = GateValue.context("rate_limit", default: 60)
        #expect(value.value(in: ["rate_limit": "120"], within: limit) == 120)
        #expect(value.value(in: ["rate_limit": "1.5"], within: limit) == 1.5)
        #expect(value.value(in: [:], within: limit) == 60)
        #expect(value.value(in: ["rate_limit": "fast"], within: limit) == 60)
    }

    @Test(
        "a context value outside the field's bounds falls back to the default",
        arguments: [
            "1e308", "1000001", "-1", "NaN", "nan", "inf", "Infinity", "0x10", "1e", ".5", "1.", "--1", "1e400", "",
        ])
    func outOfBounds(_ text: String) {
        let rate = GateValue.context("r", default: 60)
        #expect(rate.value(in: ["r": text], within: FieldLimits.throttleRate) == 60)
        #expect(!rate.usesContextValue(in: ["r": text], within: FieldLimits.throttleRate))
    }

    @Test("a context number no double holds, or that is not exactly an integer, falls back like in SQL")
    func precision() {
        let rate = GateValue.context("r", default: 60)
        #expect(rate.value(in: ["r": "1e-400"], within: FieldLimits.throttleRate) == 60)
        #expect(rate.value(in: ["r": "0.0"], within: FieldLimits.throttleRate) == 0)
        #expect(rate.value(in: ["r": "1e-301"], within: FieldLimits.throttleRate) == 60)
        let max = GateValue.context("m", default: 1)
        #expect(max.value(in: ["m": "2.0000000000000001"], within: FieldLimits.concurrencyMax) == 1)
        #expect(max.value(in: ["m": "2.000"], within: FieldLimits.concurrencyMax) == 2)
        #expect(max.value(in: ["m": "25e-1"], within: FieldLimits.concurrencyMax) == 1)
        #expect(max.value(in: ["m": "250e-2"], within: FieldLimits.concurrencyMax) == 1)
        #expect(max.value(in: ["m": "300e-2"], within: FieldLimits.concurrencyMax) == 3)
        #expect(max.value(in: ["m": "0.3e1"], within: FieldLimits.concurrencyMax) == 3)
        #expect(max.value(in: ["m": "-0"], within: FieldLimits.concurrencyMax) == 0)
    }

    @Test("context keys that are not ASCII are left out: a Kelvin sign is not a K")
    func asciiKeys() throws {
        let strings = try #require(ContextStrings.parse(#"{"\u212a": "x", "K": "y", "é": "z"}"#))
        #expect(strings == ["K": "y"])
        let only = try #require(ContextStrings.parse(#"{"\u212a": "x"}"#))
        #expect(Template.render("{K}", context: only) == "")
    }

    @Test("integral fields take only integers from the context; bounds are inclusive")
    func integral() {
        let max = GateValue.context("m", default: 2)
        #expect(max.value(in: ["m": "2.5"], within: FieldLimits.concurrencyMax) == 2)
        #expect(max.value(in: ["m": "7"], within: FieldLimits.concurrencyMax) == 7)
        #expect(max.value(in: ["m": "1e3"], within: FieldLimits.concurrencyMax) == 1000)
        #expect(max.value(in: ["m": "1000000"], within: FieldLimits.concurrencyMax) == 1_000_000)
        #expect(max.value(in: ["m": "1000001"], within: FieldLimits.concurrencyMax) == 2)
        #expect(GateValue.context("p", default: 60).value(in: ["p": "0.0009"], within: FieldLimits.throttlePer) == 60)
        #expect(GateValue.context("p", default: 60).value(in: ["p": "0.001"], within: FieldLimits.throttlePer) == 0.001)
    }

    @Test("constants out of bounds (a config that bypassed validation) are clamped, never trap")
    func clamps() {
        #expect(GateValue.constant(1e300).value(in: [:], within: FieldLimits.throttleRate) == 1_000_000)
        #expect(GateValue.constant(-.infinity).value(in: [:], within: FieldLimits.throttleRate) == 0)
        #expect(GateValue.constant(.nan).value(in: [:], within: FieldLimits.throttleRate) == 0)
        #expect(FieldLimits.adaptiveMax.clampInt(1e20) == 1_000_000)
        #expect(FieldLimits.adaptiveMax.clampInt(.nan) == 1)
        var gate = Gate.adaptiveConcurrency(targetLagMs: 1e30, min: Int.max, max: Int.max)
        gate.max = .constant(1e20)
        gate.initialMax = 3_000_000_000
        gate.ewmaAlpha = 7
        let settings = gate.adaptiveSettings
        #expect(settings.min == 1_000_000 && settings.max == 1_000_000 && settings.initialMax == 1_000_000)
        #expect(settings.targetLagMs == 86_400_000 && settings.ewmaAlpha == 0.5)
    }
}

@Suite("Policy config and DSL")
struct PolicyConfigTests {
    @Test("the DSL encodes to the same config as the JSON of DESIGN.md")
    func dslMatchesJSON() throws {
        let dsl = PolicyConfig(
            roundRobinBy: "{account_id}", batchSize: 500, roundRobinQuantum: 50, leaseSeconds: 900,
            maxAttempts: 25, target: .readyQueue
        ) {
            Gate.throttle(
                name: "per_endpoint", rate: .context("rate_limit", default: 60), per: 60, burst: 100,
                partitionBy: "{endpoint_id}")
            Gate.concurrency(max: 5, partitionBy: "acct:{account_id}")
            Gate.globalCap(max: 200)
            Gate.fairInterleave()
            Gate.adaptiveConcurrency(partitionBy: "{account_id}", initialMax: 3, targetLagMs: 1000, min: 1)
        }
        let json = """
            {"gates": [
              {"type": "throttle", "name": "per_endpoint", "rate": {"context": "rate_limit", "default": 60}, "per": 60, "burst": 100,
               "partition_by": "{endpoint_id}"},
              {"type": "concurrency", "max": 5, "partition_by": "acct:{account_id}"},
              {"type": "global_cap", "max": 200},
              {"type": "fair_interleave"},
              {"type": "adaptive_concurrency", "partition_by": "{account_id}", "initial_max": 3, "target_lag_ms": 1000, "min": 1}],
             "round_robin_by": "{account_id}", "batch_size": 500, "round_robin_quantum": 50, "lease_seconds": 900,
             "max_attempts": 25, "target": {"type": "ready_queue"}}
            """
        #expect(try PolicyConfig(json: json) == dsl)
        let encoded = try JSONSerialization.jsonObject(with: Data(try dsl.json().utf8)) as! NSDictionary
        let expected = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! NSDictionary
        #expect(encoded == expected)
    }

    @Test("the staging rules' fields have their JSON names both ways")
    func stagingRulesJSON() throws {
        let json = """
            {"dedupe_mode": "replace", "debounce": 2.5, "max_pending_per_partition": 100, "on_overflow": "drop_oldest",
             "max_wait": 600, "gates": []}
            """
        let dsl = PolicyConfig(dedupeMode: .replace, debounce: 2.5, maxPendingPerPartition: 100, onOverflow: .dropOldest, maxWait: 600) {}
        #expect(try PolicyConfig(json: json) == dsl)
        let encoded = try #require(try JSONSerialization.jsonObject(with: Data(try dsl.json().utf8)) as? NSDictionary)
        let expected = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? NSDictionary)
        #expect(encoded == expected)
        // An unknown mode is an error, never a trap.
        #expect(throws: DispatchPolicyError.self) { try PolicyConfig(json: #"{"dedupe_mode": "merge"}"#) }
    }

    @Test("adaptive defaults: initial_max 3 clamped into [min, max], alpha 0.5, factors 0.5 and 0.95")
    func adaptiveDefaults() {
        let gate = Gate.adaptiveConcurrency(targetLagMs: 250)
        #expect(gate.adaptiveSettings == AdaptiveSettings(initialMax: 3, min: 1, max: nil, targetLagMs: 250))
        #expect(Gate.adaptiveConcurrency(targetLagMs: 1, min: 5).adaptiveSettings.initialMax == 5)
        #expect(Gate.adaptiveConcurrency(targetLagMs: 1, max: 2).adaptiveSettings.initialMax == 2)
    }
}

@Suite("Gate evaluation")
struct GateEvaluationTests {
    @Test("throttle: each admitted row takes a token; an empty bucket refuses")
    func throttle() {
        let config = PolicyConfig { Gate.throttle(rate: 10, per: 60, burst: 3, partitionBy: "{ep}") }
        let decision = evaluate(config, rows((1...5).map { ($0, ["ep": "a"]) }))
        #expect(decision.admitted.map(\.id) == [1, 2, 3])
        #expect(decision.takes == [GateKey(gate: "throttle", partition: "a"): 3])
        #expect(decision.refusedByGate == ["throttle": 2])
        // Fractional tokens do not admit.
        let partial = evaluate(
            config, rows([(1, ["ep": "a"])]),
            state: GateState(tokens: [GateKey(gate: "throttle", partition: "a"): 0.99]))
        #expect(partial.admitted.isEmpty)
    }

    @Test("a throttle that refuses for want of a token says when the next whole one comes; rate 0 never")
    func tokenWaits() {
        let config = PolicyConfig { Gate.throttle(rate: 10, per: 2, burst: 3, partitionBy: "{ep}") }
        let a = GateKey(gate: "throttle", partition: "a")
        let b = GateKey(gate: "throttle", partition: "b")
        // 0.25 tokens at 5 per second: 0.15 s to the next whole one. b admits and refuses nothing.
        let decision = evaluate(config, rows([(1, ["ep": "a"]), (2, ["ep": "b"])]), state: GateState(tokens: [a: 0.25, b: 3]))
        #expect(decision.admitted.map(\.id) == [2])
        #expect(decision.tokenWaits.count == 1)
        #expect(abs((decision.tokenWaits[a] ?? 0) - 0.15) < 1e-9)
        // Tokens taken within the tick count: 1.5 → admit one, 0.5 left → 0.1 s.
        let taken = evaluate(config, rows([(1, ["ep": "a"]), (2, ["ep": "a"])]), state: GateState(tokens: [a: 1.5]))
        #expect(abs((taken.tokenWaits[a] ?? 0) - 0.1) < 1e-9)
        let still = PolicyConfig { Gate.throttle(rate: 0, per: 1, burst: 5) }
        #expect(evaluate(still, rows([(1, [:])])).tokenWaits.isEmpty)
    }

    @Test("throttle with rate 0 admits nothing, even with tokens")
    func rateZero() {
        let config = PolicyConfig { Gate.throttle(rate: .context("rate", default: 0), per: 1, burst: 5) }
        #expect(evaluate(config, rows([(1, [:]), (2, [:])])).admitted.isEmpty)
        #expect(evaluate(config, rows([(1, ["rate": "2"])])).admitted.map(\.id) == [1])
    }

    @Test("a refused row consumes nothing: later rows of other partitions still go through")
    func refusedRowConsumesNothing() {
        let config = PolicyConfig {
            Gate.throttle(rate: 100, per: 1, burst: 100, partitionBy: "{ep}")
            Gate.concurrency(max: 1, partitionBy: "{acct}")
        }
        let decision = evaluate(
            config,
            rows([
                (1, ["acct": "a", "ep": "x"]), (2, ["acct": "a", "ep": "x"]), (3, ["acct": "b", "ep": "x"]),
            ]))
        #expect(decision.admitted.map(\.id) == [1, 3])
        #expect(decision.takes == [GateKey(gate: "throttle", partition: "x"): 2])
        #expect(decision.refusedByGate == ["concurrency": 1])
        #expect(decision.admitted[0].slots == ["concurrency": "a"])
        #expect(decision.admitted[0].partitions == ["concurrency": "a", "throttle": "x"])
    }

    @Test("concurrency counts what is already in flight, with max from the context")
    func concurrency() {
        let config = PolicyConfig { Gate.concurrency(max: .context("max", default: 2), partitionBy: "{acct}") }
        let state = GateState(inFlight: [GateKey(gate: "concurrency", partition: "a"): 1])
        let decision = evaluate(
            config,
            rows([
                (1, ["acct": "a"]), (2, ["acct": "a"]), (3, ["acct": "b", "max": "3"]), (4, ["acct": "b", "max": "3"]),
                (5, ["acct": "b", "max": "3"]), (6, ["acct": "b", "max": "3"]),
            ]), state: state)
        #expect(decision.admitted.map(\.id) == [1, 3, 4, 5])
    }

    @Test("global_cap counts across partitions")
    func globalCap() {
        let config = PolicyConfig {
            Gate.concurrency(max: 10, partitionBy: "{acct}")
            Gate.globalCap(max: 3)
        }
        let decision = evaluate(
            config, rows([(1, ["acct": "a"]), (2, ["acct": "b"]), (3, ["acct": "c"]), (4, ["acct": "d"])]),
            state: GateState(inFlight: [GateKey(gate: "global_cap", partition: "default"): 1]))
        #expect(decision.admitted.map(\.id) == [1, 2])
        #expect(decision.admitted[0].slots == ["concurrency": "a", "global_cap": "default"])
    }

    @Test("two throttles of one policy are both enforced")
    func twoThrottles() {
        let config = PolicyConfig {
            Gate.throttle(name: "per_minute", rate: 10, per: 60, burst: 10)
            Gate.throttle(name: "per_hour", rate: 600, per: 3600, burst: 4)
        }
        let decision = evaluate(config, rows((1...20).map { ($0, [:]) }))
        #expect(decision.admitted.count == 4)
        #expect(decision.refusedByGate == ["per_hour": 16])
        #expect(decision.takes[GateKey(gate: "per_minute", partition: "default")] == 4)
    }

    @Test("adaptive: in flight below current_max; the safety valve lifts an idle partition to initial_max")
    func adaptive() {
        let config = PolicyConfig { Gate.adaptiveConcurrency(partitionBy: "{acct}", initialMax: 3, targetLagMs: 100) }
        let a = GateKey(gate: "adaptive_concurrency", partition: "a")
        // Busy partition: the cap (1) holds.
        let busy = evaluate(
            config, rows([(1, ["acct": "a"]), (2, ["acct": "a"])]),
            state: GateState(inFlight: [a: 1], adaptiveCap: [a: 2]))
        #expect(busy.admitted.map(\.id) == [1])
        // Idle partition whose cap fell to 1: up to initial_max (3) this tick.
        let idle = evaluate(config, rows((1...5).map { ($0, ["acct": "a"]) }), state: GateState(adaptiveCap: [a: 1]))
        #expect(idle.admitted.map(\.id) == [1, 2, 3])
    }

    @Test("fair_interleave reorders round-robin across partitions so a burst cannot starve others")
    func fairInterleave() {
        let config = PolicyConfig {
            Gate.concurrency(max: 100, partitionBy: "{acct}")
            Gate.globalCap(max: 4)
            Gate.fairInterleave()
        }
        let batch = rows((1...6).map { ($0, ["acct": "big"]) } + [(7, ["acct": "small"]), (8, ["acct": "tiny"])])
        let admission = Admission(config: config)
        let ordered = admission.order(admission.prepare(batch))
        #expect(ordered.map(\.row.id) == [1, 7, 8, 2, 3, 4, 5, 6])
        #expect(evaluate(config, batch).admitted.map(\.id) == [1, 7, 8, 2])
        // Without the gate, the burst takes every slot.
        let plain = PolicyConfig {
            Gate.concurrency(max: 100, partitionBy: "{acct}")
            Gate.globalCap(max: 4)
        }
        #expect(evaluate(plain, batch).admitted.map(\.id) == [1, 2, 3, 4])
    }

    @Test("no gates: everything is admitted in batch order")
    func noGates() {
        #expect(evaluate(PolicyConfig(), rows([(3, [:]), (1, [:])])).admitted.map(\.id) == [3, 1])
    }
}

/// Which lanes a tick blocks, and until what: pure, from the decision alone.
@Suite("Lane blocks")
struct LaneBlockTests {
    private func lane(_ key: String?, _ n: Int, _ ids: ClosedRange<Int64>, _ context: [String: String]) -> [BatchRow] {
        ids.map { BatchRow(id: $0, roundRobinKey: key, context: context, lane: n) }
    }

    @Test("a lane of one partition blocks until its next token once its bucket is empty, whatever it admitted")
    func throttleBlocks() {
        let config = PolicyConfig { Gate.throttle(rate: 2, per: 1, burst: 1, partitionBy: "{t}") }
        let decision = evaluate(config, lane("a", 1, 1...5, ["t": "a"]) + lane("b", 2, 6...6, ["t": "b"]))
        #expect(decision.admitted.map(\.id) == [1, 6])
        // a: the token went to job 1, the next comes in half a second; b: all
        // it had was admitted, nothing refused.
        #expect(decision.laneBlocks == [LaneBlock(lane: "a", seconds: 0.5)])
    }

    @Test("a throttle of rate 0 blocks its lane until the config changes; a full counter until a release")
    func releaseBlocks() {
        let zero = PolicyConfig { Gate.throttle(rate: 0, per: 1, burst: 1, partitionBy: "{t}") }
        #expect(
            evaluate(zero, lane("a", 1, 1...2, ["t": "a"])).laneBlocks
                == [LaneBlock(lane: "a", seconds: .infinity, releasedBy: GateKey(gate: "throttle", partition: "a"))])
        let cap = PolicyConfig { Gate.concurrency(max: 2, partitionBy: "{t}") }
        let state = GateState(inFlight: [GateKey(gate: "concurrency", partition: "a"): 1])
        let decision = evaluate(cap, lane(nil, 1, 1...3, ["t": "a"]), state: state)
        #expect(decision.admitted.count == 1)
        // The keyless lane; the counter as the decision left it (1 + 1).
        #expect(
            decision.laneBlocks == [
                LaneBlock(
                    lane: nil, seconds: .infinity,
                    releasedBy: GateKey(gate: "concurrency", partition: "a"), inFlight: 2)
            ])
    }

    @Test("a lane of mixed partitions blocks only when none of it got through, for at most a second")
    func mixedLanes() {
        let config = PolicyConfig(roundRobinBy: "{tenant}") { Gate.throttle(rate: 1, per: 10, burst: 1, partitionBy: "{ep}") }
        let mixed = [
            BatchRow(id: 1, roundRobinKey: "t", context: ["tenant": "t", "ep": "x"], lane: 1),
            BatchRow(id: 2, roundRobinKey: "t", context: ["tenant": "t", "ep": "x"], lane: 1),
            BatchRow(id: 3, roundRobinKey: "t", context: ["tenant": "t", "ep": "y"], lane: 1),
        ]
        // Job 2 found x empty, but the lane's next job may be for a free endpoint.
        #expect(evaluate(config, mixed).laneBlocks == [])
        // None through: until the earliest token (y's, in half a second), a second at most.
        let low = GateState(tokens: [GateKey(gate: "throttle", partition: "x"): 0.5, GateKey(gate: "throttle", partition: "y"): 0.95])
        let blocks = evaluate(config, mixed, state: low).laneBlocks
        #expect(blocks.count == 1 && blocks[0].lane == "t" && blocks[0].releasedBy == nil && abs(blocks[0].seconds - 0.5) < 1e-9)
        let empty = GateState(tokens: [GateKey(gate: "throttle", partition: "x"): 0, GateKey(gate: "throttle", partition: "y"): 0])
        #expect(evaluate(config, mixed, state: empty).laneBlocks == [LaneBlock(lane: "t", seconds: 1)])
    }

    @Test("refusals by the global cap block no lane: a full cap stops the whole fetch instead")
    func globalCapBlocksNoLane() {
        let config = PolicyConfig {
            Gate.concurrency(max: 10, partitionBy: "{t}")
            Gate.globalCap(max: 1)
        }
        let decision = evaluate(config, lane("a", 1, 1...2, ["t": "a"]) + lane("b", 2, 3...4, ["t": "b"]))
        #expect(decision.admitted.map(\.id) == [1])
        #expect(decision.laneBlocks == [])
    }

    @Test("rows fetched without lanes (lane 0) block nothing")
    func noLanes() {
        let config = PolicyConfig { Gate.throttle(rate: 1, per: 1, burst: 1) }
        #expect(evaluate(config, [BatchRow(id: 1), BatchRow(id: 2)]).laneBlocks == [])
    }
}
