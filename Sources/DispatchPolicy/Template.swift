/// Partition templates: `"acct:{account_id}"` with `{key}` placeholders
/// replaced by the job's context values.
///
/// Same rules as the SQL `dispatch_policy._render_template`: the context
/// values are already strings (as `fetch_batch` returns them); a missing key
/// renders as the empty string; text outside placeholders is kept.
public enum Template {
    public static func render(_ template: String, context: [String: String]) -> String {
        guard template.contains("{") else { return template }
        var result = ""
        var rest = Substring(template)
        while let open = rest.firstIndex(of: "{") {
            result += rest[..<open]
            let afterOpen = rest.index(after: open)
            guard let close = rest[afterOpen...].firstIndex(of: "}") else {
                result += rest[open...]
                return result
            }
            let key = rest[afterOpen..<close]
            if isKey(key) {
                result += context[String(key)] ?? ""
            } else {
                result += rest[open...close]
            }
            rest = rest[rest.index(after: close)...]
        }
        result += rest
        return result
    }

    static func isKey(_ key: Substring) -> Bool {
        guard let first = key.unicodeScalars.first, first == "_" || (first.isASCII && first.properties.isAlphabetic) else {
            return false
        }
        return key.unicodeScalars.allSatisfy { $0 == "_" || ($0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0))) }
    }
}
