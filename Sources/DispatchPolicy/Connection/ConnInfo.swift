import Foundation

/// libpq's connection strings, parsed as libpq parses them: a URI
/// (`postgres://…` or `postgresql://…`) or keyword/value pairs
/// (`host=db port=5432 sslmode=require`), the files libpq reads
/// (`pg_service.conf`, `.pgpass`) and the `PG*` variables. Pure: every
/// function takes the text it parses.
///
/// The result of a parse is the keywords the string sets, by their libpq
/// names; several hosts stay one comma-separated `host` (and `port`), as in
/// libpq.
enum ConnInfo {
    /// The keywords dispatch-policy acts on.
    static let keywords: Set<String> = [
        "host", "port", "dbname", "user", "password", "passfile", "connect_timeout", "options",
        "application_name", "fallback_application_name", "sslmode", "sslrootcert", "sslcert", "sslkey",
        "target_session_attrs", "service",
    ]
    /// Keywords libpq knows that have no effect here, accepted (with the
    /// values that mean "nothing to do") so a string written for psql works.
    static let ignored: [String: Set<String>?] = [
        "keepalives": nil, "keepalives_idle": nil, "keepalives_interval": nil, "keepalives_count": nil,
        "tcp_user_timeout": nil, "sslcompression": nil, "sslsni": nil, "gssencmode": ["disable", "prefer"],
        "channel_binding": ["disable", "prefer"], "client_encoding": ["UTF8", "utf8", "auto"],
    ]

    /// The `PG*` variable of each keyword (libpq's table).
    static let environmentNames: [(keyword: String, variable: String)] = [
        ("host", "PGHOST"), ("port", "PGPORT"), ("dbname", "PGDATABASE"), ("user", "PGUSER"),
        ("password", "PGPASSWORD"), ("passfile", "PGPASSFILE"), ("connect_timeout", "PGCONNECT_TIMEOUT"),
        ("options", "PGOPTIONS"), ("application_name", "PGAPPNAME"), ("sslmode", "PGSSLMODE"),
        ("sslrootcert", "PGSSLROOTCERT"), ("sslcert", "PGSSLCERT"), ("sslkey", "PGSSLKEY"),
        ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ]

    struct ParseError: Error, Equatable {
        var message: String
    }

    /// Parses a URI or a keyword/value string.
    static func parse(_ text: String) throws(ParseError) -> [String: String] {
        let trimmed = text.drop { $0 == " " || $0 == "\t" || $0 == "\n" }
        for prefix in ["postgresql://", "postgres://"] where trimmed.lowercased().hasPrefix(prefix) {
            return try parseURI(String(trimmed.dropFirst(prefix.count)))
        }
        if trimmed.contains("://") {
            throw ParseError(message: "a database URL must start with postgres:// or postgresql://")
        }
        return try parseKeywordValue(String(trimmed))
    }

    /// `[user[:password]@][host[:port][,host[:port]...]][/dbname][?name=value&...]`
    /// after the scheme; every part percent-decoded, as libpq does.
    static func parseURI(_ rest: String) throws(ParseError) -> [String: String] {
        var result: [String: String] = [:]
        var remainder = Substring(rest)
        var query: Substring?
        if let q = remainder.firstIndex(of: "?") {
            query = remainder[remainder.index(after: q)...]
            remainder = remainder[..<q]
        }
        var authority = remainder
        if let slash = remainder.firstIndex(of: "/") {
            authority = remainder[..<slash]
            let db = remainder[remainder.index(after: slash)...]
            if !db.isEmpty { result["dbname"] = try decode(db, "the database name") }
        }
        if let at = authority.lastIndex(of: "@") {
            let userinfo = authority[..<at]
            authority = authority[authority.index(after: at)...]
            if let colon = userinfo.firstIndex(of: ":") {
                let user = userinfo[..<colon]
                if !user.isEmpty { result["user"] = try decode(user, "the user name") }
                result["password"] = try decode(userinfo[userinfo.index(after: colon)...], "the password")
            } else if !userinfo.isEmpty {
                result["user"] = try decode(userinfo, "the user name")
            }
        }
        if !authority.isEmpty {
            var hosts: [String] = []
            var ports: [String] = []
            for spec in authority.split(separator: ",", omittingEmptySubsequences: false) {
                var host = Substring("")
                var port = Substring("")
                if spec.hasPrefix("[") {
                    guard let close = spec.firstIndex(of: "]") else {
                        throw ParseError(message: "an IPv6 host address in the URL has no closing bracket")
                    }
                    host = spec[spec.index(after: spec.startIndex)..<close]
                    guard !host.isEmpty else { throw ParseError(message: "an IPv6 host address in the URL is empty") }
                    let after = spec[spec.index(after: close)...]
                    if after.hasPrefix(":") {
                        port = after.dropFirst()
                    } else if !after.isEmpty {
                        throw ParseError(message: "unexpected text after an IPv6 host address in the URL")
                    }
                } else if let colon = spec.lastIndex(of: ":") {
                    host = spec[..<colon]
                    port = spec[spec.index(after: colon)...]
                } else {
                    host = spec
                }
                hosts.append(try decode(host, "a host"))
                ports.append(try decode(port, "a port"))
            }
            if hosts.contains(where: { !$0.isEmpty }) { result["host"] = hosts.joined(separator: ",") }
            if ports.contains(where: { !$0.isEmpty }) { result["port"] = ports.joined(separator: ",") }
        }
        for (number, item) in (query ?? "").split(separator: "&").enumerated() {
            // The text is not quoted back: it may be part of a password.
            guard let eq = item.firstIndex(of: "=") else {
                throw ParseError(message: "URL parameter \(number + 1) has no \"=\"")
            }
            var name = try decode(item[..<eq], "a parameter name")
            var value = try decode(item[item.index(after: eq)...], "a parameter value")
            // libpq takes the JDBC spelling too.
            if name == "ssl", value == "true" { (name, value) = ("sslmode", "require") }
            result[name] = value
        }
        return result
    }

    private static func decode(_ text: Substring, _ what: String) throws(ParseError) -> String {
        guard let decoded = String(text).removingPercentEncoding else {
            throw ParseError(message: "\(what) in the URL has an invalid percent-encoding")
        }
        // As libpq: a NUL would cut the value short (or forge a startup parameter).
        guard !decoded.contains("\u{0}") else {
            throw ParseError(message: "forbidden value %00 in \(what) of the URL")
        }
        return decoded
    }

    /// `name = value` pairs separated by spaces; a value may be in single
    /// quotes, with `\'` and `\\` inside.
    static func parseKeywordValue(_ text: String) throws(ParseError) -> [String: String] {
        var result: [String: String] = [:]
        var chars = Array(text)[...]
        func skipSpaces() { while let c = chars.first, c.isWhitespace { chars = chars.dropFirst() } }
        var words = 0
        while true {
            skipSpaces()
            guard !chars.isEmpty else { break }
            words += 1
            var name = ""
            while let c = chars.first, c != "=", !c.isWhitespace {
                name.append(c)
                chars = chars.dropFirst()
            }
            skipSpaces()
            guard chars.first == "=" else {
                // The word is not quoted back: it may be part of a password.
                throw ParseError(message: "missing \"=\" after word \(words) of the connection string")
            }
            chars = chars.dropFirst()
            skipSpaces()
            var value = ""
            if chars.first == "'" {
                chars = chars.dropFirst()
                var closed = false
                while let c = chars.first {
                    chars = chars.dropFirst()
                    if c == "\\", let next = chars.first {
                        value.append(next)
                        chars = chars.dropFirst()
                        continue
                    }
                    if c == "'" {
                        closed = true
                        break
                    }
                    value.append(c)
                }
                guard closed else { throw ParseError(message: "unterminated quoted value in the connection string") }
            } else {
                while let c = chars.first, !c.isWhitespace {
                    chars = chars.dropFirst()
                    if c == "\\", let next = chars.first {
                        value.append(next)
                        chars = chars.dropFirst()
                        continue
                    }
                    value.append(c)
                }
            }
            guard !name.isEmpty else { throw ParseError(message: "an empty keyword in the connection string") }
            result[name] = value
        }
        return result
    }

    /// The keywords of service `name` in a `pg_service.conf` text, nil when
    /// the file has no such section.
    static func service(_ name: String, in text: String) throws(ParseError) -> [String: String]? {
        var found: [String: String]?
        var inSection = false
        for (number, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = rawLine.trimmingCharacters(in: .whitespacesAndNewlines)
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("[") {
                guard line.hasSuffix("]") else { throw ParseError(message: "syntax error in service file, line \(number + 1)") }
                if inSection { break }
                inSection = line.dropFirst().dropLast() == name
                if inSection { found = [:] }
                continue
            }
            guard inSection else { continue }
            guard let eq = line.firstIndex(of: "=") else {
                throw ParseError(message: "syntax error in service file, line \(number + 1)")
            }
            let key = line[..<eq].trimmingCharacters(in: .whitespaces)
            if key == "service" {
                throw ParseError(message: "nested service specifications are not supported (service file, line \(number + 1))")
            }
            found?[key] = String(line[line.index(after: eq)...]).trimmingCharacters(in: .whitespaces)
        }
        return found
    }

    /// The password of the first `.pgpass` line that matches, libpq's way:
    /// `host:port:database:user:password`, `*` matching anything, `\`
    /// escaping `:` and `\`.
    static func password(in text: String, host: String, port: String, database: String, user: String) -> String? {
        for rawLine in text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }) {
            if rawLine.hasPrefix("#") { continue }
            var fields: [String] = [""]
            var escaped = false
            for c in rawLine {
                if escaped {
                    fields[fields.count - 1].append(c)
                    escaped = false
                    continue
                }
                if c == "\\" {
                    escaped = true
                    continue
                }
                if c == ":" && fields.count < 5 {
                    fields.append("")
                    continue
                }
                fields[fields.count - 1].append(c)
            }
            guard fields.count == 5 else { continue }
            func matches(_ field: String, _ value: String) -> Bool { field == "*" || field == value }
            if matches(fields[0], host) && matches(fields[1], port) && matches(fields[2], database) && matches(fields[3], user) {
                return fields[4]
            }
        }
        return nil
    }

    /// `text` with any password replaced by `***`, for an error that shows
    /// a string that may not parse: in a URL, everything between the user
    /// name and the last `@`, and the value of every parameter whose name
    /// (percent-decoded) contains "pass"; in a keyword/value string, the
    /// value of every such keyword, quoted or not, escapes included.
    static func redact(_ text: String) -> String {
        var out = text
        if let scheme = out.range(of: "://") {
            let rest = out[scheme.upperBound...]
            if let at = rest.lastIndex(of: "@"), let colon = rest[..<at].firstIndex(of: ":") {
                out.replaceSubrange(out.index(after: colon)..<at, with: "***")
            }
        }
        // name = value pairs, in a URL's query or a keyword/value string.
        var result = ""
        var chars = Substring(out)
        while !chars.isEmpty {
            // A run of name characters, then optional whitespace and "=".
            let nameEnd = chars.firstIndex { $0 == "=" || $0 == "&" || $0 == "?" || $0.isWhitespace } ?? chars.endIndex
            let name = chars[..<nameEnd]
            var probe = chars[nameEnd...].drop { $0 == " " || $0 == "\t" }
            guard !name.isEmpty, probe.first == "=" else {
                let step = nameEnd == chars.startIndex ? chars.index(after: chars.startIndex) : nameEnd
                result += chars[..<step]
                chars = chars[step...]
                continue
            }
            probe = probe.dropFirst()
            let spaces = probe.prefix { $0 == " " || $0 == "\t" }
            probe = probe.dropFirst(spaces.count)
            // The value: quoted (to the closing quote, \ escaping) or to the next space or "&".
            var end = probe.startIndex
            if probe.first == "'" {
                end = probe.index(after: end)
                while end < probe.endIndex, probe[end] != "'" {
                    if probe[end] == "\\" { end = probe.index(after: end) }
                    if end < probe.endIndex { end = probe.index(after: end) }
                }
                if end < probe.endIndex { end = probe.index(after: end) }
            } else {
                while end < probe.endIndex, !probe[end].isWhitespace, probe[end] != "&" {
                    if probe[end] == "\\" { end = probe.index(after: end) }
                    if end < probe.endIndex { end = probe.index(after: end) }
                }
            }
            let decodedName = (String(name).removingPercentEncoding ?? String(name)).lowercased()
            result += chars[..<probe.startIndex]
            let isPassword = decodedName.contains("pass")
            result += isPassword ? "***" : String(probe[..<end])
            chars = probe[end...]
            // Words after an unquoted password that are not name=value pairs
            // were probably meant as part of it (a password with spaces).
            while isPassword, !chars.isEmpty {
                let next = chars.drop { $0 == " " || $0 == "\t" }
                let word = next.prefix { !$0.isWhitespace }
                guard !word.isEmpty, !word.contains("="), !word.contains("&") else { break }
                chars = next.dropFirst(word.count)
            }
        }
        return result
    }
}
