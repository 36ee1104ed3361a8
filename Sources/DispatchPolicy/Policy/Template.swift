import Crypto

/// Partition templates: `"acct:{account_id}"` with `{key}` placeholders
/// replaced by the job's context values.
///
/// Same rules as the SQL `dispatch_policy._render_template`: the context
/// values are already strings (as `fetch_batch` returns them); a missing key
/// renders as the empty string; text outside placeholders is kept byte for
/// byte. Works on UTF-8 bytes, never on `Character`s: a combining mark after
/// a `}` must not swallow the brace, and nothing is normalized.
public enum Template {
    public static func render(_ template: String, context: [String: String]) -> String {
        let bytes = Array(template.utf8)
        guard bytes.contains(UInt8(ascii: "{")) else { return template }
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count + 16)
        var i = 0
        while i < bytes.count {
            let b = bytes[i]
            guard b == UInt8(ascii: "{"), let close = bytes[(i + 1)...].firstIndex(of: UInt8(ascii: "}")) else {
                out.append(b)
                i += 1
                continue
            }
            let key = bytes[(i + 1)..<close]
            if isKey(key) {
                out.append(contentsOf: (context[String(decoding: key, as: UTF8.self)] ?? "").utf8)
            } else {
                out.append(contentsOf: bytes[i...close])
            }
            i = close + 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// `[A-Za-z_][A-Za-z0-9_]*`, as validation allows in placeholders.
    static func isKey(_ key: ArraySlice<UInt8>) -> Bool {
        func letter(_ b: UInt8) -> Bool { (b | 0x20) >= UInt8(ascii: "a") && (b | 0x20) <= UInt8(ascii: "z") || b == UInt8(ascii: "_") }
        guard let first = key.first, letter(first) else { return false }
        return key.allSatisfy { letter($0) || ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) }
    }
}

/// Partition and round-robin keys as stored: what `dispatch_policy._fit_key`
/// and `_partition_key` compute in SQL.
///
/// A rendered key can be as long as a context value; stored as it is, it
/// could overflow an index row and fail every tick of its policy. Longer than
/// ``maximumBytes`` (UTF-8), a key becomes its first 64 Unicode scalars, `...`,
/// and 32 hex digits of its SHA-256.
public enum PartitionKey {
    public static var maximumBytes: Int { Int(FieldLimits.partitionKey.maximum) }

    public static func fit(_ key: String) -> String {
        guard key.utf8.count > maximumBytes else { return key }
        var prefix = String.UnicodeScalarView()
        prefix.append(contentsOf: key.unicodeScalars.prefix(64))
        let digest = SHA256.hash(data: Array(key.utf8))
        let hex = digest.prefix(16).map { byte in
            let digits = Array("0123456789abcdef".utf8)
            return String(decoding: [digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]], as: UTF8.self)
        }.joined()
        return String(prefix) + "..." + hex
    }

    /// The key of a job for a template; no template is the single partition `default`.
    public static func of(template: String?, context: [String: String]) -> String {
        guard let template else { return "default" }
        return fit(Template.render(template, context: context))
    }
}
