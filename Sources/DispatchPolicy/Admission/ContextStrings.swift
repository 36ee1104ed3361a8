/// Reads a job context (a JSON object as PostgreSQL prints jsonb) into the
/// strings templates and gate values use: strings decoded, JSON null left
/// out, every other value as its JSON text exactly as PostgreSQL printed it.
/// Keys that are not pure ASCII are left out: no template or gate value can
/// name them.
///
/// This is the same conversion as the SQL `dispatch_policy._context_text`
/// (`value::text` of a number prints as it does inside the document), done
/// client-side so a tick does not build a jsonb per row.
public enum ContextStrings {
    /// Whether `text` is one JSON value with nothing after it. Lenient about
    /// numbers (any size: `1e400` is valid JSON though no double holds it);
    /// the database checks the rest.
    public static func isOneJSONValue(_ text: String) -> Bool {
        var scanner = Scanner(Array(text.utf8))
        return scanner.kindOfValue() != nil && scanner.atEnd()
    }

    public static func parse(_ json: String) -> [String: String]? {
        var scanner = Scanner(Array(json.utf8))
        return scanner.object()
    }

    struct Scanner {
        let bytes: [UInt8]
        var i = 0

        init(_ bytes: [UInt8]) { self.bytes = bytes }

        mutating func skipSpace() {
            while i < bytes.count, bytes[i] == 0x20 || bytes[i] == 0x0A || bytes[i] == 0x0D || bytes[i] == 0x09 { i += 1 }
        }

        /// The object at `i` as template strings: strings decoded, null left
        /// out, any other value as its JSON text.
        mutating func object() -> [String: String]? {
            guard
                let members = members(value: { scanner -> String?? in
                    guard scanner.i < scanner.bytes.count else { return nil }
                    if scanner.bytes[scanner.i] == UInt8(ascii: "\"") { return scanner.string().map { .some($0) } }
                    let start = scanner.i
                    guard scanner.skipValue(), scanner.i > start else { return nil }
                    let raw = String(decoding: scanner.bytes[start..<scanner.i], as: UTF8.self).trimmingWhitespace()
                    return .some(raw == "null" ? nil : raw)
                })
            else { return nil }
            var result: [String: String] = [:]
            // Only ASCII keys: templates and gate values can name no other,
            // and Swift's String equality would merge keys PostgreSQL keeps
            // apart (the Kelvin sign U+212A is canonically "K").
            for (key, value) in members where key.utf8.allSatisfy({ $0 < 0x80 }) {
                if let value { result[key] = value }
            }
            return result
        }

        /// The members of the object at `i`, each value read by `value`
        /// (nil: malformed); nil if the object is malformed.
        mutating func members<T>(value: (inout Scanner) -> T?) -> [(key: String, value: T)]? {
            skipSpace()
            guard i < bytes.count, bytes[i] == UInt8(ascii: "{") else { return nil }
            i += 1
            var result: [(key: String, value: T)] = []
            skipSpace()
            if i < bytes.count, bytes[i] == UInt8(ascii: "}") {
                i += 1
                return result
            }
            while true {
                skipSpace()
                guard let key = string() else { return nil }
                skipSpace()
                guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else { return nil }
                i += 1
                skipSpace()
                guard let item = value(&self) else { return nil }
                result.append((key, item))
                skipSpace()
                guard i < bytes.count else { return nil }
                if bytes[i] == UInt8(ascii: ",") {
                    i += 1
                    continue
                }
                if bytes[i] == UInt8(ascii: "}") {
                    i += 1
                    return result
                }
                return nil
            }
        }

        /// A JSON string starting at `i`, decoded.
        mutating func string() -> String? {
            guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else { return nil }
            i += 1
            var out: [UInt8] = []
            while i < bytes.count {
                let b = bytes[i]
                if b == UInt8(ascii: "\"") {
                    i += 1
                    return String(decoding: out, as: UTF8.self)
                }
                if b != UInt8(ascii: "\\") {
                    out.append(b)
                    i += 1
                    continue
                }
                i += 1
                guard i < bytes.count else { return nil }
                let e = bytes[i]
                i += 1
                switch e {
                case UInt8(ascii: "\""): out.append(0x22)
                case UInt8(ascii: "\\"): out.append(0x5C)
                case UInt8(ascii: "/"): out.append(0x2F)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    guard var scalar = hex4() else { return nil }
                    if (0xD800..<0xDC00).contains(scalar), i + 1 < bytes.count, bytes[i] == UInt8(ascii: "\\"),
                        bytes[i + 1] == UInt8(ascii: "u")
                    {
                        i += 2
                        guard let low = hex4(), (0xDC00..<0xE000).contains(low) else { return nil }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    }
                    guard let unicode = Unicode.Scalar(scalar) else { return nil }
                    out.append(contentsOf: Array(String(Character(unicode)).utf8))
                default:
                    return nil
                }
            }
            return nil
        }

        mutating func hex4() -> UInt32? {
            guard i + 4 <= bytes.count, let value = UInt32(String(decoding: bytes[i..<(i + 4)], as: UTF8.self), radix: 16) else {
                return nil
            }
            i += 4
            return value
        }

        /// The kind of a JSON value, read without converting numbers (so
        /// `1e400` is a number here, though no `Double` holds it).
        enum Kind: Equatable {
            case string(String)
            case object
            case array
            case other
        }

        /// The value at `i`, skipped, and its kind; nil if malformed.
        mutating func kindOfValue() -> Kind? {
            skipSpace()
            guard i < bytes.count else { return nil }
            switch bytes[i] {
            case UInt8(ascii: "\""): return string().map { .string($0) }
            case UInt8(ascii: "{"): return skipValue() ? .object : nil
            case UInt8(ascii: "["): return skipValue() ? .array : nil
            default:
                let start = i
                return skipValue() && i > start ? .other : nil
            }
        }

        /// The members of the object at `i` (keys and the kinds of their values).
        mutating func members() -> [(key: String, kind: Kind)]? {
            members(value: { $0.kindOfValue() })?.map { ($0.key, $0.value) }
        }

        /// The elements of the array at `i`: each one's members when it is an
        /// object, nil for an element that is not.
        mutating func arrayOfObjects() -> [[(key: String, kind: Kind)]?]? {
            skipSpace()
            guard i < bytes.count, bytes[i] == UInt8(ascii: "[") else { return nil }
            i += 1
            var result: [[(key: String, kind: Kind)]?] = []
            skipSpace()
            if i < bytes.count, bytes[i] == UInt8(ascii: "]") {
                i += 1
                return result
            }
            while true {
                skipSpace()
                guard i < bytes.count else { return nil }
                if bytes[i] == UInt8(ascii: "{") {
                    guard let members = members() else { return nil }
                    result.append(members)
                } else {
                    guard kindOfValue() != nil else { return nil }
                    result.append(nil)
                }
                skipSpace()
                guard i < bytes.count else { return nil }
                if bytes[i] == UInt8(ascii: ",") {
                    i += 1
                    continue
                }
                if bytes[i] == UInt8(ascii: "]") {
                    i += 1
                    return result
                }
                return nil
            }
        }

        /// Whether only whitespace is left.
        mutating func atEnd() -> Bool {
            skipSpace()
            return i == bytes.count
        }

        /// Skips any JSON value (nested objects and arrays included).
        mutating func skipValue() -> Bool {
            var depth = 0
            while i < bytes.count {
                let b = bytes[i]
                if b == UInt8(ascii: "\"") {
                    guard string() != nil else { return false }
                    if depth == 0 { return true }
                    continue
                }
                if b == UInt8(ascii: "{") || b == UInt8(ascii: "[") {
                    depth += 1
                } else if b == UInt8(ascii: "}") || b == UInt8(ascii: "]") {
                    if depth == 0 { return true }
                    depth -= 1
                    if depth == 0 {
                        i += 1
                        return true
                    }
                } else if depth == 0 && (b == UInt8(ascii: ",")) {
                    return true
                }
                i += 1
            }
            return depth == 0
        }
    }
}
