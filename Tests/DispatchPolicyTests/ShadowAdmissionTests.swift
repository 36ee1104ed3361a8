import DispatchPolicy
import Foundation
import Testing

/// Shadow policies (issue 12), pure: the decision admits every row and
/// reports, per gate partition, what the gates would have refused.
@Suite("Shadow admission")
struct ShadowAdmissionTests {
    private func batch(_ n: Int, _ context: (Int) -> [String: String] = { _ in [:] }) -> [BatchRow] {
        (1...n).map { BatchRow(id: Int64($0), context: context($0)) }
    }

    @Test("a shadow concurrency of 1 admits all 10 rows and reports 9 would-refusals, 9 over the cap")
    func concurrency() {
        let config = PolicyConfig(mode: .shadow) { Gate.concurrency(max: 1) }
        let decision = evaluate(config, batch(10))
        #expect(decision.admitted.map(\.id) == Array(1...10))
        #expect(decision.refusedByGate.isEmpty)
        let key = GateKey(gate: "concurrency", partition: "default")
        #expect(decision.wouldRefuse == [key: WouldRefuse(count: 9, overCap: 9)])
        #expect(decision.wouldRefuseByGate == ["concurrency": 9])
        // Every admitted row holds its slot: the counter goes to 10.
        #expect(decision.admitted.allSatisfy { $0.slots == ["concurrency": "default"] })
    }

    @Test("the same policy enforcing admits 1 and refuses 9, and reports no would-refusal")
    func enforcing() {
        let decision = evaluate(PolicyConfig { Gate.concurrency(max: 1) }, batch(10))
        #expect(decision.admitted.count == 1)
        #expect(decision.refusedByGate == ["concurrency": 9])
        #expect(decision.wouldRefuse.isEmpty)
        #expect(decision.wouldRefuseByGate.isEmpty)
    }

    @Test("a shadow throttle takes a token per row into a deficit and reports the would-be lag")
    func throttle() {
        // 2 tokens, 1 a minute: 5 rows leave the bucket at -3, 180 s behind.
        let config = PolicyConfig(mode: .shadow) { Gate.throttle(name: "t", rate: 1, per: 60, burst: 2) }
        let decision = evaluate(config, batch(5))
        let key = GateKey(gate: "t", partition: "default")
        #expect(decision.admitted.count == 5)
        #expect(decision.takes == [key: 5])
        #expect(decision.wouldRefuse[key]?.count == 3)
        #expect(abs((decision.wouldRefuse[key]?.lagSeconds ?? 0) - 180) < 1e-6)
        #expect(decision.wouldRefuse[key]?.overCap == nil)
        // Nothing waits for a token, and no lane is blocked.
        #expect(decision.tokenWaits.isEmpty)
        #expect(decision.laneBlocks.isEmpty)
    }

    @Test("a shadow throttle with a cost takes the cost of every row (0024): the deficit and lag count in tokens")
    func cost() {
        // 10 tokens, 60 a minute (1 a second), 5 a job: 4 jobs take 20, two
        // would wait, and the bucket is 10 short: 10 s behind.
        let config = PolicyConfig(mode: .shadow) { Gate.throttle(name: "api", rate: 60, per: 60, burst: 10, cost: 5) }
        let decision = evaluate(config, batch(4))
        let key = GateKey(gate: "api", partition: "default")
        #expect(decision.admitted.count == 4)
        #expect(decision.takes == [key: 20])
        #expect(decision.wouldRefuse[key]?.count == 2)
        #expect(abs((decision.wouldRefuse[key]?.lagSeconds ?? 0) - 10) < 1e-9)
    }

    @Test("a shadow bucket stops at the floor of throttle_buckets_tokens_check")
    func floor() {
        let config = PolicyConfig(mode: .shadow) { Gate.throttle(name: "t", rate: 1, per: 60, burst: 2) }
        let key = GateKey(gate: "t", partition: "default")
        let decision = evaluate(config, batch(3), state: GateState(tokens: [key: Admission.shadowTokenFloor + 1.5]))
        #expect(decision.admitted.count == 3)
        #expect(decision.takes == [key: 1.5])
        #expect(decision.wouldRefuse[key]?.count == 3)
    }

    @Test("every gate without room counts the row, per partition; rate 0 has no lag")
    func perGateAndPartition() {
        let config = PolicyConfig(mode: .shadow) {
            Gate.throttle(name: "stopped", rate: 0, per: 1, partitionBy: "{acct}")
            Gate.concurrency(name: "per_acct", max: 2, partitionBy: "{acct}")
            Gate.globalCap(max: 3)
        }
        let decision = evaluate(config, batch(6) { ["acct": $0 <= 4 ? "a" : "b"] })
        #expect(decision.admitted.count == 6)
        #expect(decision.wouldRefuseByGate == ["stopped": 6, "per_acct": 2, "global_cap": 3])
        #expect(decision.wouldRefuse[GateKey(gate: "stopped", partition: "a")] == WouldRefuse(count: 4, lagSeconds: nil))
        #expect(decision.wouldRefuse[GateKey(gate: "per_acct", partition: "a")] == WouldRefuse(count: 2, overCap: 2))
        #expect(decision.wouldRefuse[GateKey(gate: "per_acct", partition: "b")] == nil)
        #expect(decision.wouldRefuse[GateKey(gate: "global_cap", partition: "default")] == WouldRefuse(count: 3, overCap: 3))
    }

    @Test("a paused partition still holds a shadow policy's rows")
    func pauseStillPauses() {
        let config = PolicyConfig(mode: .shadow) { Gate.concurrency(max: 1, partitionBy: "{acct}") }
        let paused = GateKey(gate: "concurrency", partition: "a")
        let decision = evaluate(config, batch(4) { ["acct": $0 % 2 == 0 ? "a" : "b"] }, state: GateState(paused: [paused]))
        #expect(decision.admitted.map(\.id) == [1, 3])
        #expect(decision.refusedByGate == ["concurrency": 2])
        #expect(decision.wouldRefuse == [GateKey(gate: "concurrency", partition: "b"): WouldRefuse(count: 1, overCap: 1)])
    }

    @Test("mode is JSON \"mode\"; enforce is the default and left out")
    func json() throws {
        let shadow = PolicyConfig(mode: .shadow) { Gate.concurrency(max: 1) }
        #expect(try shadow.json().contains(#""mode":"shadow""#))
        #expect(try PolicyConfig(json: shadow.json()).mode == .shadow)
        #expect(try PolicyConfig(json: shadow.json()).isShadow)
        #expect(!(try PolicyConfig { Gate.concurrency(max: 1) }.json().contains("mode")))
        #expect(try PolicyConfig(json: #"{"mode": "enforce"}"#).isShadow == false)
        #expect(throws: DispatchPolicyError.self) { try PolicyConfig(json: #"{"mode": "dry_run"}"#) }
    }
}
