import Testing

@testable import DispatchPolicy

@Suite("Duration conversions")
struct DurationConversionTests {
    @Test("seconds from the server or a computed wait become whole milliseconds in [0, 1 day], never trapping")
    func clampedSeconds() {
        #expect(Duration.clamped(seconds: .nan) == .zero)
        #expect(Duration.clamped(seconds: -3) == .zero)
        #expect(Duration.clamped(seconds: 0.0001) == .milliseconds(1))
        #expect(Duration.clamped(seconds: 0.15) == .milliseconds(150))
        #expect(Duration.clamped(seconds: 1e300) == .seconds(86_400))
        #expect(Duration.clamped(seconds: .infinity) == .seconds(86_400))
    }

    @Test("a duration becomes a server setting in whole milliseconds within [0, 24 h]")
    func settingMilliseconds() {
        #expect(Duration.milliseconds(1500).settingMilliseconds == 1500)
        #expect(Duration.seconds(-1).settingMilliseconds == 0)
        #expect(Duration.seconds(1_000_000).settingMilliseconds == 86_400_000)
    }
}
