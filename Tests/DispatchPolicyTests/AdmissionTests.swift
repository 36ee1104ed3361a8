import DispatchPolicy
import Foundation
import Testing

private func rows(_ specs: [(Int64, [String: String])]) -> [BatchRow] {
    specs.map { BatchRow(id: $0.0, context: $0.1) }
}

private func evaluate(_ config: PolicyConfig, _ batch: [BatchRow], state: GateState = GateState()) -> AdmissionDecision {
    let admission = Admission(config: config)
    let ordered = admission.order(batch)
    let needed = admission.requiredState(for: ordered)
    var state = state
    // Buckets not in the given state start full, as refill_buckets creates them.
    for bucket in needed.buckets where state.tokens[bucket.key] == nil { state.tokens[bucket.key] = bucket.burst }
    for entry in needed.adaptive where state.adaptiveCap[entry.key] == nil { state.adaptiveCap[entry.key] = entry.initialMax }
    return admission.evaluate(ordered, state: state, buckets: needed.buckets)
}

@Suite("Templates")
struct TemplateTests {
    @Test("placeholders are replaced from the context; missing keys render empty", arguments: [
        ("{account_id}", ["account_id": "42"], "42"),
        ("acct:{account_id}", ["account_id": "42"], "acct:42"),
        ("{queue_name}:{account_id}", ["queue_name": "urgent", "account_id": "7"], "urgent:7"),
        ("{missing}", [:], ""),
        ("shared", ["a": "1"], "shared"),
        ("a{x}b{y}c", ["x": "1", "y": "two"], "a1btwoc"),
    ] as [(String, [String: String], String)])
    func renders(_ template: String, _ context: [String: String], _ expected: String) {
        #expect(Template.render(template, context: context) == expected)
    }
}

@Suite("Gate values")
struct GateValueTests {
    @Test("a constant, or the context value with a default")
    func values() {
        #expect(GateValue.constant(5).value(in: [:]) == 5)
        let value = GateValue.context("rate_limit", default: 60)
        #expect(value.value(in: ["rate_limit": "120"]) == 120)
        #expect(value.value(in: ["rate_limit": "1.5"]) == 1.5)
        #expect(value.value(in: [:]) == 60)
        #expect(value.value(in: ["rate_limit": "fast"]) == 60)
    }
}

@Suite("Policy config and DSL")
struct PolicyConfigTests {
    @Test("the DSL encodes to the same config as the JSON of DESIGN.md")
    func dslMatchesJSON() throws {
        let dsl = PolicyConfig(roundRobinBy: "{account_id}", batchSize: 500, roundRobinQuantum: 50, leaseSeconds: 900,
                               maxAttempts: 25, target: .readyQueue) {
            Gate.throttle(name: "per_endpoint", rate: .context("rate_limit", default: 60), per: 60, burst: 100,
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
        let partial = evaluate(config, rows([(1, ["ep": "a"])]),
                               state: GateState(tokens: [GateKey(gate: "throttle", partition: "a"): 0.99]))
        #expect(partial.admitted.isEmpty)
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
        let decision = evaluate(config, rows([
            (1, ["acct": "a", "ep": "x"]), (2, ["acct": "a", "ep": "x"]), (3, ["acct": "b", "ep": "x"]),
        ]))
        #expect(decision.admitted.map(\.id) == [1, 3])
        #expect(decision.takes == [GateKey(gate: "throttle", partition: "x"): 2])
        #expect(decision.refusedByGate == ["concurrency": 1])
        #expect(decision.admitted[0].slots == ["concurrency": "a"])
    }

    @Test("concurrency counts what is already in flight, with max from the context")
    func concurrency() {
        let config = PolicyConfig { Gate.concurrency(max: .context("max", default: 2), partitionBy: "{acct}") }
        let state = GateState(inFlight: [GateKey(gate: "concurrency", partition: "a"): 1])
        let decision = evaluate(config, rows([
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
        let decision = evaluate(config, rows([(1, ["acct": "a"]), (2, ["acct": "b"]), (3, ["acct": "c"]), (4, ["acct": "d"])]),
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
        let busy = evaluate(config, rows([(1, ["acct": "a"]), (2, ["acct": "a"])]),
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
        let ordered = Admission(config: config).order(batch)
        #expect(ordered.map(\.id) == [1, 7, 8, 2, 3, 4, 5, 6])
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

@Suite("AIMD controller")
struct AdaptiveControllerTests {
    let settings = AdaptiveSettings(initialMax: 3, min: 1, max: 6, targetLagMs: 100)

    @Test("fast successes add one up to max")
    func growth() {
        var c = AdaptiveController(currentMax: 3, ewmaLagMs: nil)
        for _ in 0..<5 { c.observe(lagMs: 10, success: true, settings: settings) }
        #expect(c.currentMax == 6)
        #expect(c.ewmaLagMs == 10)
        #expect(c.observations == 5)
    }

    @Test("EWMA over target shrinks by the overload factor, never below min")
    func overload() {
        var c = AdaptiveController(currentMax: 40, ewmaLagMs: 50)
        c.observe(lagMs: 250, success: true, settings: settings)  // ewma = 50 × 0.5 + 250 × 0.5 = 150 > 100
        #expect(c.ewmaLagMs == 150)
        #expect(c.currentMax == 38)  // floor(40 × 0.95)
        for _ in 0..<100 { c.observe(lagMs: 1000, success: true, settings: settings) }
        #expect(c.currentMax == 1)
    }

    @Test("a failure halves the cap")
    func failure() {
        var c = AdaptiveController(currentMax: 6, ewmaLagMs: 0)
        c.observe(lagMs: 0, success: false, settings: settings)
        #expect(c.currentMax == 3)
        #expect(c.failures == 1)
        c.observe(lagMs: 0, success: false, settings: settings)
        c.observe(lagMs: 0, success: false, settings: settings)
        #expect(c.currentMax == 1)
    }

    @Test("converges: the cap settles where lag meets the target")
    func convergence() {
        // A queue whose lag grows with the cap: lag = 30 ms per slot above 2.
        var c = AdaptiveController(currentMax: 1, ewmaLagMs: nil)
        let unbounded = AdaptiveSettings(initialMax: 1, min: 1, targetLagMs: 100)
        var caps: [Int] = []
        for _ in 0..<200 {
            c.observe(lagMs: Double(max(c.currentMax - 2, 0)) * 30, success: true, settings: unbounded)
            caps.append(c.currentMax)
        }
        let tail = caps.suffix(50)
        #expect(tail.min()! >= 4 && tail.max()! <= 7)
    }
}
