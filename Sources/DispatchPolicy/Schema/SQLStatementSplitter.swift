/// Splits a SQL script into statements at top-level semicolons.
///
/// postgres-nio sends one statement per call (extended protocol), so a
/// migration file must be cut up client-side. Understands what PostgreSQL's
/// own lexer does for this purpose: `'strings'` (with `''`), `E'strings'`
/// (with backslash escapes), `"identifiers"`, `-- comments`, nested
/// `/* comments */` and `$tag$ dollar-quoted $tag$` bodies. Pieces holding
/// only whitespace and comments are dropped.
public enum SQLStatementSplitter {
    public static func split(_ sql: String) -> [String] {
        let chars = Array(sql.unicodeScalars)
        var statements: [String] = []
        var start = 0
        var hasCode = false  // the current piece has something besides comments/whitespace
        var i = 0

        func isIdentifierChar(_ c: Unicode.Scalar) -> Bool {
            c == "_" || c == "$" || c.properties.isAlphabetic || ("0"..."9").contains(c)
        }
        func isTagStart(_ c: Unicode.Scalar) -> Bool {
            c == "_" || c.properties.isAlphabetic
        }
        func flush(upTo end: Int) {
            if hasCode {
                let text = String(String.UnicodeScalarView(chars[start..<end]))
                statements.append(text.trimmingWhitespace())
            }
            hasCode = false
        }

        while i < chars.count {
            let c = chars[i]
            let next: Unicode.Scalar? = i + 1 < chars.count ? chars[i + 1] : nil
            switch c {
            case "-" where next == "-":
                while i < chars.count && chars[i] != "\n" { i += 1 }
            case "/" where next == "*":
                var depth = 1
                i += 2
                while i < chars.count && depth > 0 {
                    if chars[i] == "/" && i + 1 < chars.count && chars[i + 1] == "*" {
                        depth += 1
                        i += 2
                    } else if chars[i] == "*" && i + 1 < chars.count && chars[i + 1] == "/" {
                        depth -= 1
                        i += 2
                    } else {
                        i += 1
                    }
                }
            case "'":
                hasCode = true
                let backslashEscapes =
                    i > 0 && (chars[i - 1] == "E" || chars[i - 1] == "e")
                    && !(i > 1 && isIdentifierChar(chars[i - 2]))
                i += 1
                while i < chars.count {
                    if backslashEscapes && chars[i] == "\\" {
                        i += 2
                    } else if chars[i] == "'" {
                        if i + 1 < chars.count && chars[i + 1] == "'" {
                            i += 2
                        } else {
                            i += 1
                            break
                        }
                    } else {
                        i += 1
                    }
                }
            case "\"":
                hasCode = true
                i += 1
                while i < chars.count {
                    if chars[i] == "\"" {
                        if i + 1 < chars.count && chars[i + 1] == "\"" {
                            i += 2
                        } else {
                            i += 1
                            break
                        }
                    } else {
                        i += 1
                    }
                }
            case "$" where !(i > 0 && isIdentifierChar(chars[i - 1])):
                hasCode = true
                // $tag$ or $$; $1 (a parameter) is not a quote.
                var j = i + 1
                if j < chars.count && isTagStart(chars[j]) {
                    while j < chars.count && chars[j] != "$" && isIdentifierChar(chars[j]) { j += 1 }
                }
                if j < chars.count && chars[j] == "$" {
                    let tag = Array(chars[i...j])
                    i = j + 1
                    while i < chars.count {
                        if chars[i] == "$" && i + tag.count <= chars.count && Array(chars[i..<(i + tag.count)]) == tag {
                            i += tag.count
                            break
                        }
                        i += 1
                    }
                } else {
                    i += 1
                }
            case ";":
                flush(upTo: i)
                i += 1
                start = i
            default:
                if !c.properties.isWhitespace { hasCode = true }
                i += 1
            }
        }
        flush(upTo: chars.count)
        return statements
    }
}

extension String {
    func trimmingWhitespace() -> String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { !$0.properties.isWhitespace }),
            let last = scalars.lastIndex(where: { !$0.properties.isWhitespace })
        else { return "" }
        return String(scalars[first...last])
    }
}
