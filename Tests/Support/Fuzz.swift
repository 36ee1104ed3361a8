import PropertyBased

/// Characters that break naive string handling: braces, quotes, escapes,
/// combining marks (alone and precomposed), confusables, emoji sequences,
/// control characters.
public let trickyCharacters: [Character] = [
    "a", "b", "Z", "0", "9", "_", "-", ":", " ", "{", "}", "\"", "\\", "/", "\n", "\t", "\u{1}",
    "\u{E9}", "e\u{301}", "\u{301}", "\u{212B}", "\u{C5}", "\u{430}", "\u{1F600}", "\u{1F3F3}\u{FE0F}\u{200D}\u{1F308}",
    "\u{FFFD}", "\u{200B}", "\u{10FFFF}", "ß", "İ", "ﬁ",
]

/// Strings of ``trickyCharacters``.
public func trickyString(_ length: ClosedRange<Int>) -> Generator<String, AnySequence<Any>> {
    Gen<Int>.int(in: 0...(trickyCharacters.count - 1)).array(of: length).map { String($0.map { trickyCharacters[$0] }) }.eraseToAny()
}
