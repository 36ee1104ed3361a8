import DispatchPolicy
import Testing

@Suite("Context strings")
struct ContextStringsTests {
    @Test("strings are decoded, other values keep PostgreSQL's text, nulls are left out")
    func parses() {
        let parsed = ContextStrings.parse(
            #"{"a": "x\"y\\z \u00e9\ud83d\ude00", "n": 42, "f": 1.50, "t": true, "nil": null, "o": {"k": [1, "}"]}, "e": ""}"#)
        #expect(parsed == ["a": "x\"y\\z é😀", "n": "42", "f": "1.50", "t": "true", "o": #"{"k": [1, "}"]}"#, "e": ""])
    }

    @Test("anything but an object is refused", arguments: ["[]", "1", "", "{\"a\": }", "{\"a\" 1}"])
    func refuses(_ text: String) {
        #expect(ContextStrings.parse(text) == nil)
    }

    @Test("an empty object is an empty context")
    func empty() {
        #expect(ContextStrings.parse("{}") == [:])
    }
}
