import Foundation

/// Inline SVG charts, rendered by the server: completions per minute as bars
/// behind the average queue lag per minute as a line. Each minute has a
/// `<title>` (the browser's tooltip) with its numbers. No script, no
/// external resource.
public enum Chart {
    public struct Point: Sendable, Equatable {
        public var minute: Date
        public var completed: Int64
        public var failed: Int64
        public var avgLagMs: Double?

        public init(minute: Date, completed: Int64, failed: Int64, avgLagMs: Double?) {
            self.minute = minute
            self.completed = completed
            self.failed = failed
            self.avgLagMs = avgLagMs
        }
    }

    /// The full chart of a policy page, `width` × `height` pixels.
    public static func svg(_ points: [Point], width: Int = 720, height: Int = 160, label: String) -> String {
        render(points, width: width, height: height, axes: true, label: label)
    }

    /// A sparkline for a table row.
    public static func sparkline(_ points: [Point], label: String) -> String {
        render(points, width: 120, height: 24, axes: false, label: label)
    }

    static func render(_ points: [Point], width: Int, height: Int, axes: Bool, label: String) -> String {
        let left = axes ? 44.0 : 0
        let right = axes ? 44.0 : 0
        let top = axes ? 8.0 : 1
        let bottom = axes ? 18.0 : 1
        let plotWidth = Double(width) - left - right
        let plotHeight = Double(height) - top - bottom
        var out =
            "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(width)\" height=\"\(height)\" viewBox=\"0 0 \(width) \(height)\" role=\"img\" aria-label=\"\(HTML.escape(label))\">"
        guard !points.isEmpty else { return out + "</svg>" }
        let maxDone = max(points.map { $0.completed + $0.failed }.max() ?? 0, 1)
        let lags = points.compactMap(\.avgLagMs).filter { $0.isFinite && $0 >= 0 }
        let maxLag = max(lags.max() ?? 0, 1)
        let step = plotWidth / Double(points.count)
        let barWidth = max(step - 1, 1)
        for (index, point) in points.enumerated() {
            // A sparkline draws (and titles) only the minutes that had something.
            if !axes && point.completed == 0 && point.failed == 0 && point.avgLagMs == nil { continue }
            let x = left + Double(index) * step
            let doneHeight = plotHeight * Double(point.completed) / Double(maxDone)
            let failHeight = plotHeight * Double(point.failed) / Double(maxDone)
            let lagText = point.avgLagMs.map { Format.milliseconds($0) } ?? "no lag samples"
            let tip = "\(hhmm(point.minute)) UTC: \(point.completed) completed, \(point.failed) failed, average lag \(lagText)"
            out += "<g><title>\(HTML.escape(tip))</title>"
            out += "<rect class=\"hit\" x=\(q(x)) y=\(q(top)) width=\(q(step)) height=\(q(plotHeight))/>"
            if point.completed > 0 {
                out += "<rect class=\"done\" x=\(q(x)) y=\(q(top + plotHeight - doneHeight)) width=\(q(barWidth)) height=\(q(doneHeight))/>"
            }
            if point.failed > 0 {
                out +=
                    "<rect class=\"failed\" x=\(q(x)) y=\(q(top + plotHeight - doneHeight - failHeight)) width=\(q(barWidth)) height=\(q(failHeight))/>"
            }
            out += "</g>"
        }
        // The lag line: one segment per run of minutes that have samples.
        var path = ""
        var drawing = false
        for (index, point) in points.enumerated() {
            guard let lag = point.avgLagMs, lag.isFinite, lag >= 0 else {
                drawing = false
                continue
            }
            let x = left + (Double(index) + 0.5) * step
            let y = top + plotHeight - plotHeight * min(lag / maxLag, 1)
            path += "\(drawing ? "L" : "M")\(f(x)) \(f(y)) "
            drawing = true
        }
        if !path.isEmpty {
            out += "<path class=\"lag\" d=\"\(path.trimmingCharacters(in: .whitespaces))\"/>"
        }
        if axes {
            out += "<text class=\"axis\" x=\"\(f(left - 4))\" y=\"\(f(top + 10))\" text-anchor=\"end\">\(maxDone)/min</text>"
            out += "<text class=\"axis\" x=\"\(f(left - 4))\" y=\"\(f(top + plotHeight))\" text-anchor=\"end\">0</text>"
            out +=
                "<text class=\"axis lag-axis\" x=\"\(f(left + plotWidth + 4))\" y=\"\(f(top + 10))\">\(HTML.escape(Format.milliseconds(maxLag)))</text>"
            if let first = points.first, let last = points.last {
                out += "<text class=\"axis\" x=\"\(f(left))\" y=\"\(height - 4)\">\(hhmm(first.minute))</text>"
                out +=
                    "<text class=\"axis\" x=\"\(f(left + plotWidth))\" y=\"\(height - 4)\" text-anchor=\"end\">\(hhmm(last.minute)) UTC</text>"
            }
        }
        return out + "</svg>"
    }

    /// The pending jobs at the end of each minute as a line (a row's pending
    /// trend), with a tooltip per minute; `scheduled` are included in the
    /// tooltip only.
    public static func pendingLine(_ samples: [(minute: Date, pending: Int64, scheduled: Int64)], label: String) -> String {
        let width = 120.0
        let height = 24.0
        var out =
            "<svg class=\"chart pending\" xmlns=\"http://www.w3.org/2000/svg\" width=\"120\" height=\"24\" viewBox=\"0 0 120 24\" role=\"img\" aria-label=\"\(HTML.escape(label))\">"
        guard !samples.isEmpty else { return out + "</svg>" }
        let top = max(samples.map(\.pending).max() ?? 0, 1)
        let step = width / Double(samples.count)
        var path = ""
        for (index, sample) in samples.enumerated() {
            let x = (Double(index) + 0.5) * step
            let y = 1 + (height - 2) * (1 - Double(max(sample.pending, 0)) / Double(top))
            path += "\(index == 0 ? "M" : "L")\(f(x)) \(f(y)) "
            let tip = "\(hhmm(sample.minute)) UTC: \(sample.pending) pending, \(sample.scheduled) scheduled"
            out +=
                "<g><title>\(HTML.escape(tip))</title><rect class=\"hit\" x=\(q(Double(index) * step)) y=\"0\" width=\(q(step)) height=\"24\"/></g>"
        }
        out += "<path class=\"pending\" d=\"\(path.trimmingCharacters(in: .whitespaces))\"/>"
        return out + "</svg>"
    }

    /// One decimal, without a formatter (this runs for every bar of every sparkline).
    private static func f(_ value: Double) -> String {
        guard value.isFinite else { return "0" }
        let tenths = Int((value * 10).rounded())
        return "\(tenths < 0 ? "-" : "")\(abs(tenths) / 10).\(abs(tenths) % 10)"
    }

    /// The UTC hour and minute of a date, as HH:mm.
    static func hhmm(_ date: Date) -> String {
        let minutes = Int((date.timeIntervalSince1970 / 60).rounded(.down)) % 1440
        let m = minutes < 0 ? minutes + 1440 : minutes
        return (m / 60 < 10 ? "0" : "") + "\(m / 60):" + (m % 60 < 10 ? "0" : "") + "\(m % 60)"
    }
    private static func q(_ value: Double) -> String { "\"\(f(value))\"" }
}

/// Numbers as a person reads them.
public enum Format {
    public static func milliseconds(_ ms: Double) -> String {
        guard ms.isFinite else { return "-" }
        if ms < 1000 { return "\(Int(ms.rounded())) ms" }
        return seconds(ms / 1000)
    }

    public static func seconds(_ s: Double) -> String {
        guard s.isFinite, s >= 0 else { return "-" }
        if s < 60 { return s < 10 ? String(format: "%.1f s", s) : "\(Int(s.rounded())) s" }
        let total = Int(min(s, 1e12).rounded())
        let days = total / 86_400
        let hours = total % 86_400 / 3600
        let minutes = total % 3600 / 60
        let secs = total % 60
        if days > 0 { return "\(days)d \(hours)h" }
        if hours > 0 { return "\(hours)h \(minutes)m" }
        return "\(minutes)m \(secs)s"
    }

    public static func number(_ value: Double?) -> String {
        guard let value, value.isFinite else { return "-" }
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return String(format: "%.2f", value)
    }
}

/// HTML escaping for text and attribute values.
public enum HTML {
    public static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for scalar in text.unicodeScalars {
            switch scalar {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}
