import Testing

@testable import DispatchPolicy

@Suite("The tick line")
struct PolicySummaryTests {
    /// Found in review: two buckets of 99 tokens printed as 198.0, which no
    /// partition had.
    @Test("tokens show the lowest partition and how many are throttle-bound, never a sum")
    func tokens() {
        var result = TickResult(policy: "webhooks", outcome: .ran)
        result.admitted = 3
        result.refusedByGate = ["per_endpoint": 40, "concurrency": 3]
        for left in [99.0, 99.0] { result.tokens["per_endpoint", default: TokenSummary()].add(left: left) }
        var summary = PolicySummary(policy: "webhooks")
        summary.add(result)
        #expect(summary.line.contains("refused concurrency=3 per_endpoint=40; tokens per_endpoint=99.0 (lowest of 2)"))
        #expect(!summary.line.contains("198"))

        var later = TickResult(policy: "webhooks", outcome: .ran)
        for left in [0.4, 12.0, 0.0] { later.tokens["per_endpoint", default: TokenSummary()].add(left: left) }
        later.tokens["per_key", default: TokenSummary()].add(left: 3)
        summary.add(later)
        #expect(summary.line.hasSuffix("tokens per_endpoint=0.0 (lowest of 3, 2 throttle-bound) per_key=3.0 (lowest of 1)"))
    }
}
