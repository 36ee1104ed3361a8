/// Parses durations such as `55s`, `5m`, `1h30m`, `250ms` or `1.5s`, as used
/// by CLI flags (`--for 55s`, `--delay 5m`); `0` alone needs no unit.
///
/// Never traps: a number too large for any duration (beyond 100 years in
/// all) is not a duration; ``parse(_:flag:within:)`` also applies a flag's
/// documented bounds.
public enum DurationParser {
    /// The longest duration parsed at all: 100 years.
    public static let longest: Duration = .seconds(100 * 365 * 86_400)

    public static func parse(_ text: String) -> Duration? {
        var rest = Substring(text.trimmingWhitespace())
        guard !rest.isEmpty else { return nil }
        // Zero needs no unit (`--busy-pause 0`); any other number does.
        if rest.allSatisfy({ $0 == "0" || $0 == "." }), rest.contains("0"), rest.filter({ $0 == "." }).count <= 1 { return .zero }
        var total = 0.0
        let limit = Double(longest.components.seconds)
        while !rest.isEmpty {
            let number = rest.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
            guard !number.isEmpty, let value = Double(number), value.isFinite, value >= 0 else { return nil }
            rest = rest.dropFirst(number.count)
            let unit = rest.prefix { $0.isASCII && $0.isLetter }
            rest = rest.dropFirst(unit.count)
            let scale: Double
            switch unit {
            case "ms": scale = 0.001
            case "s": scale = 1
            case "m": scale = 60
            case "h": scale = 3600
            case "d": scale = 86400
            default: return nil
            }
            total += value * scale
            guard total.isFinite, total <= limit else { return nil }
        }
        // At most 100 years: about 3.2e12 ms, far inside Int64.
        guard let milliseconds = Int64(exactly: (total * 1000).rounded()) else { return nil }
        return .milliseconds(milliseconds)
    }

    /// Parses `text` for `flag` and checks it against the flag's bounds; the
    /// error names the flag and the bounds.
    public static func parse(_ text: String, flag: String, within range: ClosedRange<Duration>) throws -> Duration {
        guard let value = parse(text), range.contains(value) else {
            throw DispatchPolicyError(
                code: .invalidArgument,
                message:
                    "\(flag) must be a duration from \(describe(range.lowerBound)) to \(describe(range.upperBound)), such as 50ms, 30s, 5m, 2h or 7d; got \(text.prefix(80))"
            )
        }
        return value
    }

    /// `250ms`, `55s`, `5m`, `2h`, `7d`: the largest unit that divides it.
    public static func describe(_ duration: Duration) -> String {
        let ms = Int64(duration.components.seconds) * 1000 + Int64(duration.components.attoseconds / 1_000_000_000_000_000)
        for (unit, size) in [("d", Int64(86_400_000)), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] where ms >= size && ms % size == 0 {
            return "\(ms / size)\(unit)"
        }
        return "\(ms)ms"
    }
}
