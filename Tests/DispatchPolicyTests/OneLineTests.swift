import DispatchPolicy
import Testing

@Suite("One-line output")
struct OneLineTests {
    /// Found by a hostile pass: C1 controls, the line separators and the
    /// bidirectional overrides printed raw, so a partition key could move or
    /// hide text on an operator's terminal.
    @Test("control characters of every kind are escaped; other text is kept")
    func escapes() {
        #expect(DispatchPolicyError.oneLine("plain — ünïcode ✓") == "plain — ünïcode ✓")
        #expect(DispatchPolicyError.oneLine("a\nb") == "a\\nb")
        #expect(DispatchPolicyError.oneLine("\u{1B}[31mred") == "\\u{1b}[31mred")
        #expect(DispatchPolicyError.oneLine("x\u{9B}2Jy\u{85}z") == "x\\u{9b}2Jy\\u{85}z")
        #expect(DispatchPolicyError.oneLine("l\u{2028}p\u{2029}") == "l\\u{2028}p\\u{2029}")
        #expect(DispatchPolicyError.oneLine("abc\u{202E}fed\u{2066}\u{200F}") == "abc\\u{202e}fed\\u{2066}\\u{200f}")
    }
}

@Suite("Errors keep what they were made from")
struct UnderlyingErrorTests {
    struct Broken: Error {}

    @Test("a client-side fault is .client, not .server, and the original error is kept")
    func clientSide() {
        let wrapped = DispatchPolicyError.from(Broken(), context: "reading")
        #expect(wrapped.code == .client)
        #expect(wrapped.underlying is Broken)
        #expect(wrapped.message.hasPrefix("reading: "))
        // A code the caller chose is kept.
        #expect(DispatchPolicyError.from(Broken(), code: .migrationFailed).code == .migrationFailed)
        // A DispatchPolicyError passes through unchanged.
        let own = DispatchPolicyError(code: .invalidArgument, message: "x")
        #expect(DispatchPolicyError.from(own).code == .invalidArgument)
    }
}
