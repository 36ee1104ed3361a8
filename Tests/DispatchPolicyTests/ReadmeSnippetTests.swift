import Foundation
import Testing

@Suite("README Swift examples")
struct ReadmeSnippetTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// `text`'s lines with their common leading spaces removed, blank lines dropped.
    static func dedented(_ lines: [Substring]) -> [String] {
        let content = lines.filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }
        let indent = content.map { $0.prefix { $0 == " " }.count }.min() ?? 0
        return content.map { String($0.dropFirst(indent)) }
    }

    @Test("every ```swift block of the README is in Examples/ReadmeSwift/main.swift, which the build compiles")
    func snippetsCompile() throws {
        let readme = try String(contentsOf: Self.root.appending(path: "README.md"), encoding: .utf8)
        let example = try String(contentsOf: Self.root.appending(path: "Examples/ReadmeSwift/main.swift"), encoding: .utf8)
        let exampleLines = Self.dedented(example.split(separator: "\n", omittingEmptySubsequences: false)).map {
            $0.trimmingCharacters(in: .whitespaces)
        }
        var blocks: [[Substring]] = []
        var current: [Substring]?
        for line in readme.split(separator: "\n", omittingEmptySubsequences: false) {
            if current == nil, line == "```swift" {
                current = []
                continue
            }
            if current != nil, line.hasPrefix("```") {
                blocks.append(current!)
                current = nil
                continue
            }
            current?.append(line)
        }
        #expect(blocks.count >= 3, "the README's Swift blocks were not found")
        var searchFrom = 0
        for (index, block) in blocks.enumerated() {
            // Imports sit at the top of the example file; the rest, in order, in its body.
            let body = Self.dedented(block).filter { !$0.hasPrefix("import ") }.map { $0.trimmingCharacters(in: .whitespaces) }
            for importLine in block where importLine.hasPrefix("import ") {
                #expect(
                    exampleLines.contains(String(importLine)),
                    "README Swift block \(index + 1): \(importLine) is not imported by the example")
            }
            guard let first = body.first else { continue }
            let start = exampleLines[searchFrom...].indices.first { i in
                i + body.count <= exampleLines.count && Array(exampleLines[i..<(i + body.count)]) == body
            }
            #expect(
                start != nil,
                "README Swift block \(index + 1) (\(first)) is not in Examples/ReadmeSwift/main.swift as written: the example no longer compiles what the README shows"
            )
            if let start { searchFrom = start + body.count }
        }
    }
}
