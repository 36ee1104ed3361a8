import DispatchPolicy
import Foundation
import Testing

private func lanes(_ specs: [(id: Int64, key: String?, lane: Int, context: [String: String])]) -> [BatchRow] {
    specs.map { BatchRow(id: $0.id, roundRobinKey: $0.key, context: $0.context, lane: $0.lane) }
}

@Suite("Partition keys: one identity on both sides")
struct KeyIdentityTests {
    /// Regression: with cap 2 and the NFD partition full, an NFC job and
    /// another NFD job were both admitted, because Swift merged the keys.
    @Test("canonically equivalent partition keys are different partitions, as PostgreSQL counts them")
    func equivalentKeysAreDistinct() {
        let config = PolicyConfig { Gate.concurrency(max: 2, partitionBy: "{t}") }
        let nfd = "cafe\u{301}"
        let nfc = "caf\u{E9}"
        let full = GateState(inFlight: [GateKey(gate: "concurrency", partition: nfd): 2])
        let decision = evaluate(
            config,
            [
                BatchRow(id: 1, context: ["t": nfc]), BatchRow(id: 2, context: ["t": nfd]),
            ], state: full)
        #expect(decision.admitted.map(\.id) == [1])
        #expect(decision.refusedByGate == ["concurrency": 1])
        // The Angstrom sign and A with ring above, Latin a and Cyrillic а: four partitions.
        let confusable = evaluate(
            PolicyConfig { Gate.concurrency(max: 1, partitionBy: "{t}") },
            [
                BatchRow(id: 1, context: ["t": "\u{212B}"]), BatchRow(id: 2, context: ["t": "\u{C5}"]),
                BatchRow(id: 3, context: ["t": "a"]), BatchRow(id: 4, context: ["t": "\u{430}"]),
            ])
        #expect(confusable.admitted.map(\.id) == [1, 2, 3, 4])
    }

    @Test("fair_interleave groups by exact key too")
    func interleaveExact() {
        let config = PolicyConfig { Gate.fairInterleave(partitionBy: "{t}") }
        let admission = Admission(config: config)
        let ordered = admission.order(
            admission.prepare([
                BatchRow(id: 1, context: ["t": "cafe\u{301}"]), BatchRow(id: 2, context: ["t": "cafe\u{301}"]),
                BatchRow(id: 3, context: ["t": "caf\u{E9}"]),
            ]))
        #expect(ordered.map(\.row.id) == [1, 3, 2])
    }
}

@Suite("Round-robin rotation")
struct RotationTests {
    @Test("under a binding global cap, the rotation continues after the last lane served")
    func globalCapContinuesAfterServed() {
        let config = PolicyConfig(roundRobinBy: "{t}") { Gate.globalCap(max: 10) }
        let rows = lanes((1...6).map { (Int64($0), "t\($0)", $0, ["t": "t\($0)"]) })
        let decision = evaluate(config, rows, state: GateState(inFlight: [GateKey(gate: "global_cap", partition: "default"): 8]))
        #expect(decision.admitted.map(\.id) == [1, 2])
        #expect(decision.cursor == .after("t2"))
    }

    @Test("the same cap full before the tick: nobody lost a turn to anyone, and the rotation moves on")
    func fullBeforeTheTick() {
        let config = PolicyConfig(roundRobinBy: "{t}") { Gate.globalCap(max: 10) }
        let rows = lanes((1...3).map { (Int64($0), "t\($0)", $0, ["t": "t\($0)"]) })
        let decision = evaluate(config, rows, state: GateState(inFlight: [GateKey(gate: "global_cap", partition: "default"): 10]))
        #expect(decision.admitted.isEmpty)
        #expect(decision.cursor == .after("t3"))
    }

    @Test("keys blocked by their own caps never hold the rotation: it passes them")
    func blockedKeysArePassed() {
        let config = PolicyConfig(roundRobinBy: "{t}") { Gate.concurrency(max: 1, partitionBy: "{t}") }
        let rows = lanes([(1, "a", 1, ["t": "a"]), (2, "b", 2, ["t": "b"]), (3, "c", 3, ["t": "c"])])
        let state = GateState(inFlight: [GateKey(gate: "concurrency", partition: "a"): 1, GateKey(gate: "concurrency", partition: "c"): 1])
        let decision = evaluate(config, rows, state: state)
        #expect(decision.admitted.map(\.id) == [2])
        #expect(decision.cursor == .after("c"))
    }

    @Test("a first lane starved by this tick's admissions holds the rotation; the keyless lane is a lane")
    func holdsAndKeyless() {
        let config = PolicyConfig { Gate.throttle(rate: 1, per: 60, burst: 1) }
        // Top-up rows (lane 0) took the only token before the first lane.
        let rows = [BatchRow(id: 9, lane: 0), BatchRow(id: 1, roundRobinKey: nil, lane: 1)]
        let decision = evaluate(config, rows)
        #expect(decision.admitted.map(\.id) == [9])
        #expect(decision.cursor == .hold)

        let keyless = evaluate(
            PolicyConfig(), [BatchRow(id: 1, roundRobinKey: "a", lane: 1), BatchRow(id: 2, roundRobinKey: nil, lane: 2)])
        #expect(keyless.cursor == .after(nil))
        #expect(evaluate(PolicyConfig(), [BatchRow(id: 1, lane: 0)]).cursor == nil)
    }

    /// Found by hostile testing: A (priority 0) sorts first in the rotation but
    /// loses every slot to B and C (priority -1); holding the rotation at A
    /// kept B before C forever (B 235 jobs, C 0).
    @Test("tenants of equal priority share a binding cap even behind a higher-priority one")
    func equalPriorityRotates() {
        let admission = Admission(config: PolicyConfig(roundRobinBy: "{t}") { Gate.globalCap(max: 1) })
        let tenants = [("A", 0), ("B", -1), ("C", -1)]
        var cursor: String?
        var served: [String: Int] = [:]
        var nextID: Int64 = 0
        for _ in 0..<100 {
            let start = cursor.flatMap { c in tenants.firstIndex { $0.0 == c }.map { $0 + 1 } } ?? 0
            var rows: [BatchRow] = []
            for rank in 0..<2 {
                for index in 0..<tenants.count {
                    let (tenant, priority) = tenants[(start + index) % tenants.count]
                    nextID += 1
                    rows.append(
                        BatchRow(
                            id: nextID, priority: priority, roundRobinKey: tenant, context: ["t": tenant, "rank": "\(rank)"],
                            lane: index + 1))
                }
            }
            // fetch_batch's order: priority, then rank, then lane.
            rows.sort { ($0.priority, $0.context["rank"] ?? "", $0.lane) < ($1.priority, $1.context["rank"] ?? "", $1.lane) }
            let decision = admission.evaluate(admission.order(admission.prepare(rows)), state: GateState(), buckets: [])
            for admitted in decision.admitted {
                served[rows.first { $0.id == admitted.id }?.roundRobinKey ?? "", default: 0] += 1
            }
            if case .after(let key)? = decision.cursor { cursor = key }
        }
        #expect(served["A"] == nil)
        #expect(served["B"] == 50 && served["C"] == 50, "\(served)")
    }

    /// 100 equally backlogged tenants, 5 rows each per tick, a global cap
    /// that frees a few slots per tick: every tenant must get its turn.
    @Test("equal shares under a binding cap: Jain's index ≥ 0.99 over many ticks")
    func jainUnderBindingCap() {
        let config = PolicyConfig(roundRobinBy: "{t}") { Gate.globalCap(max: 40) }
        let admission = Admission(config: config)
        let tenants = (0..<100).map { String(format: "t%03d", $0) }
        var cursor: String? = nil
        var served = [String: Int]()
        var inFlight = 40
        var nextID: Int64 = 0
        for tick in 0..<500 {
            inFlight -= 3 + tick % 5  // completions since the last tick
            // The fetch: lanes after the cursor, all tenants fit in one batch.
            let start = cursor.flatMap { c in tenants.firstIndex(of: c).map { $0 + 1 } } ?? 0
            // Rank-major, as fetch_batch orders them: every lane's first row, then every lane's second.
            var rows: [BatchRow] = []
            for _ in 0..<5 {
                for index in 0..<tenants.count {
                    let tenant = tenants[(start + index) % tenants.count]
                    nextID += 1
                    rows.append(BatchRow(id: nextID, roundRobinKey: tenant, context: ["t": tenant], lane: index + 1))
                }
            }
            let ordered = admission.order(admission.prepare(rows))
            let decision = admission.evaluate(
                ordered, state: GateState(inFlight: [GateKey(gate: "global_cap", partition: "default"): inFlight]), buckets: [])
            let byID = Dictionary(uniqueKeysWithValues: rows.map { ($0.id, $0.roundRobinKey ?? "") })
            for admitted in decision.admitted { served[byID[admitted.id] ?? "", default: 0] += 1 }
            inFlight += decision.admitted.count
            switch decision.cursor {
            case .after(let key)?: cursor = key
            case .hold?, nil: break
            }
        }
        let shares = tenants.map { Double(served[$0] ?? 0) }
        let jain = pow(shares.reduce(0, +), 2) / (Double(shares.count) * shares.map { $0 * $0 }.reduce(0, +))
        #expect(jain >= 0.99, "Jain's index \(jain); shares \(shares.min() ?? 0)–\(shares.max() ?? 0)")
    }
}
