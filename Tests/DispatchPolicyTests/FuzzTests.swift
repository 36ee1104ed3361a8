import DispatchPolicy
import DispatchPolicyTestSupport
import Foundation
import PropertyBased
import Testing

/// Valid templates: literal runs without braces, and {key} placeholders.
let templateGen = Gen<Int>.int(in: 0...4).array(of: 1...5).map { parts -> String in
    parts.map { part in
        switch part {
        case 0: return "{a}"
        case 1: return "{acct_id}"
        case 2: return "{_x9}"
        case 3: return "x:"
        default: return "\u{301}e\u{301}-"
        }
    }.joined()
}

@Suite("Fuzzing")
struct FuzzTests {
    @Test("the config decoder never traps, and the settings it yields are within bounds")
    func configDecoderNeverTraps() async {
        let numbers = [
            "0", "-1", "1", "2.5", "1e20", "1e308", "1e-400", "1e400", "-1e308", "3000000000", "9223372036854775808",
            "0.0000001", "NaN", "\"5\"", "null", "true", "{}", "[]", "{\"context\": \"k\", \"default\": 1e30}",
        ]
        let fields = [
            "rate", "per", "burst", "max", "initial_max", "min", "target_lag_ms", "ewma_alpha",
            "failure_decrease_factor", "overload_decrease_factor", "batch_size", "lease_seconds",
        ]
        let types = ["throttle", "concurrency", "global_cap", "fair_interleave", "adaptive_concurrency", "nope"]
        let gen = Gen<Int>.int(in: 0...10_000).array(of: 1...6)
        await propertyCheck(count: 500, input: gen) { picks in
            var gate: [String] = ["\"type\": \"\(types[picks[0] % types.count])\""]
            for pick in picks.dropFirst() {
                gate.append("\"\(fields[pick % fields.count])\": \(numbers[(pick / fields.count) % numbers.count])")
            }
            let json = "{\"batch_size\": \(numbers[picks[0] % numbers.count]), \"gates\": [{\(gate.joined(separator: ", "))}]}"
            guard let config = try? PolicyConfig(json: json) else { return }
            let admission = Admission(config: config)
            let rows = admission.prepare([BatchRow(id: 1, context: ["k": "1e308", "m": "NaN"]), BatchRow(id: 2)])
            let needed = admission.requiredState(for: rows)
            for bucket in needed.buckets {
                #expect(
                    FieldLimits.throttleRate.contains(bucket.rate) && FieldLimits.throttlePer.contains(bucket.per)
                        && FieldLimits.throttleBurst.contains(bucket.burst), "\(json)")
            }
            for gate in config.gates where gate.type == .adaptiveConcurrency {
                let settings = gate.adaptiveSettings
                #expect(
                    settings.min >= 1 && settings.initialMax >= settings.min && settings.initialMax <= (settings.max ?? .max), "\(json)")
            }
            _ = admission.evaluate(rows, state: GateState(), buckets: needed.buckets)
        }
    }

    @Test("rendering never traps and agrees with a direct substitution on every generated template")
    func templates() async {
        let value = trickyString(0...12)
        await propertyCheck(count: 500, input: templateGen, value, value) { template, a, x in
            let context = ["a": a, "_x9": x]
            var expected = template
            for (key, replacement) in [("{a}", a), ("{acct_id}", ""), ("{_x9}", x)] {
                expected = expected.replacingOccurrences(of: key, with: "\u{0}\(replacement)\u{0}", options: .literal)
            }
            expected = expected.replacingOccurrences(of: "\u{0}", with: "", options: .literal)
            #expect(Array(Template.render(template, context: context).utf8) == Array(expected.utf8), "\(template)")
        }
    }

    @Test("durations: anything parses or is refused, never traps; bounds hold")
    func durations() async {
        let pieces = ["1", "0", "100000000000000000000", "1e9", ".", "1.5", "s", "ms", "m", "h", "d", "x", " ", "-", "999999999"]
        await propertyCheck(count: 500, input: Gen<Int>.int(in: 0...(pieces.count - 1)).array(of: 0...6)) { picks in
            let text = picks.map { pieces[$0] }.joined()
            if let duration = DurationParser.parse(text) {
                #expect(duration >= .zero && duration <= DurationParser.longest, "\(text)")
            }
            #expect(throws: (any Error).self) {
                _ = try DurationParser.parse(text + "9999999999d", flag: "--for", within: .zero ... .seconds(1))
            }
        }
        #expect(DurationParser.parse("100000000000000000000s") == nil)
        #expect(DurationParser.parse("3000000d") == nil)
        #expect(DurationParser.parse("36500d") == .seconds(36500 * 86400))
    }
}
