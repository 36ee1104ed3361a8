import DispatchPolicy
import Foundation
import Testing

@testable import DispatchPolicyAdmin

@Suite("Admin pieces without a database")
struct AdminUnitTests {
    static func policy(
        pending: Int64 = 10, paused: Bool = false, tickFailures: Int? = nil
    ) -> AdminStore.PolicyRow {
        AdminStore.PolicyRow(
            name: "p", pending: pending, scheduled: 0, inFlight: 0, admitted24h: 0, completed24h: 0, failed24h: 0, dead: 0,
            oldestPendingSeconds: nil, paused: paused, tickFailures: tickFailures, lastError: "boom", lagP50ms: nil, lagP95ms: nil,
            throughputPerMinute: 0)
    }

    @Test("a policy with nothing limiting it gets no hint")
    func noHints() {
        #expect(Hints.of(Self.policy(), limits: nil).isEmpty)
        #expect(Hints.of(Self.policy(), limits: AdminStore.Limits()).isEmpty)
    }

    @Test("each hint appears exactly while its condition holds")
    func hints() {
        #expect(Hints.of(Self.policy(paused: true), limits: nil) == ["paused: nothing is admitted until resumed"])
        #expect(Hints.of(Self.policy(tickFailures: 3), limits: nil).first?.hasPrefix("ticks failing (3 in a row)") == true)

        var limits = AdminStore.Limits()
        limits.globalCap = 5
        limits.globalInFlight = 5
        #expect(Hints.of(Self.policy(), limits: limits) == ["at global cap: 5 in flight of 5"])
        #expect(Hints.of(Self.policy(pending: 0), limits: limits).isEmpty, "a full cap with nothing waiting limits nothing")
        limits.globalInFlight = 4
        #expect(Hints.of(Self.policy(), limits: limits).isEmpty)

        limits = AdminStore.Limits()
        limits.throttleBoundLanes = ["per_tenant": 3]
        #expect(Hints.of(Self.policy(), limits: limits) == ["throttle-bound: 3 lanes waiting for tokens (per_tenant)"])

        limits = AdminStore.Limits()
        limits.adaptiveWorst = ("adaptive", "acme", 2100, 1000, 3)
        #expect(Hints.of(Self.policy(), limits: limits) == ["adaptive cap shrinking on adaptive [acme]: EWMA 2.1 s > target 1.0 s, cap 3"])
        limits.adaptiveWorst = ("adaptive", "acme", 900, 1000, 3)
        #expect(Hints.of(Self.policy(), limits: limits).isEmpty)

        limits = AdminStore.Limits()
        limits.growingMinutes = 10
        #expect(Hints.of(Self.policy(), limits: limits) == ["pending growing for 10 min: more staged than admitted each minute"])
        limits.growingMinutes = 9
        #expect(Hints.of(Self.policy(), limits: limits).isEmpty)

        limits = AdminStore.Limits()
        limits.completedHour = 70
        limits.failedHour = 30
        #expect(Hints.of(Self.policy(), limits: limits) == ["failing 30 % of attempts in the last hour"])
        limits.completedHour = 6
        limits.failedHour = 3
        #expect(Hints.of(Self.policy(), limits: limits).isEmpty, "too few jobs to call it failing")
        limits.completedHour = 95
        limits.failedHour = 5
        #expect(Hints.of(Self.policy(), limits: limits).isEmpty)
    }

    @Test("the chart escapes its label and tooltips, draws a bar per minute, and breaks the lag line at gaps")
    func chart() {
        let start = Date(timeIntervalSince1970: 1_800_000_000)
        let points = [
            Chart.Point(minute: start, completed: 4, failed: 1, avgLagMs: 120),
            Chart.Point(minute: start + 60, completed: 0, failed: 0, avgLagMs: nil),
            Chart.Point(minute: start + 120, completed: 2, failed: 0, avgLagMs: 2500),
        ]
        let svg = Chart.svg(points, label: "<script>alert(1)</script>")
        #expect(!svg.contains("<script>"))
        #expect(svg.contains("&lt;script&gt;"))
        #expect(svg.components(separatedBy: "<rect class=\"done\"").count - 1 == 2)
        #expect(svg.components(separatedBy: "<rect class=\"failed\"").count - 1 == 1)
        #expect(svg.contains("4 completed, 1 failed, average lag 120 ms"))
        #expect(svg.contains("average lag no lag samples"))
        // Two runs of the line: M…, then M… again after the gap.
        let path = svg.components(separatedBy: "<path class=\"lag\" d=\"").last?.components(separatedBy: "\"").first ?? ""
        #expect(path.filter { $0 == "M" }.count == 2)
        #expect(Chart.sparkline([], label: "x").hasSuffix("</svg>"))
        let nan = Chart.svg([Chart.Point(minute: start, completed: 1, failed: 0, avgLagMs: .nan)], label: "n")
        #expect(!nan.contains("nan") && !nan.contains("NaN"))
    }

    @Test("HTML escaping covers the five characters that matter in text and attributes")
    func escape() {
        #expect(HTML.escape(#"<a href="x" onclick='y'>&</a>"#) == "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;")
    }

    @Test("durations read as a person reads them")
    func format() {
        #expect(Format.seconds(93_600) == "1d 2h")
        #expect(Format.seconds(3_725) == "1h 2m")
        #expect(Format.seconds(5.25) == "5.2 s" || Format.seconds(5.25) == "5.3 s")
        #expect(Format.milliseconds(999) == "999 ms")
        #expect(Format.milliseconds(.infinity) == "-")
        #expect(Format.number(3) == "3")
        #expect(Format.number(nil) == "-")
    }

    @Test("a token shorter than 16 characters is refused; checks accept only the token's own values")
    func auth() throws {
        #expect(throws: AdminAuthError.self) { try AdminAuth(token: "short") }
        let off = try AdminAuth(token: nil)
        #expect(!off.actionsEnabled)
        #expect(!off.accepts(token: ""))
        #expect(!off.acceptsSession(nil))
        let auth = try AdminAuth(token: "0123456789abcdef0123")
        #expect(auth.accepts(token: "0123456789abcdef0123"))
        #expect(!auth.accepts(token: "0123456789abcdef012"))
        #expect(!auth.accepts(token: "0123456789abcdef0124"))
        let session = try #require(auth.sessionValue())
        #expect(auth.acceptsSession(session))
        let csrf = try #require(auth.csrfValue(session: session))
        #expect(!auth.acceptsSession(csrf), "the CSRF field is not a session")
        #expect(auth.acceptsCSRF(csrf, session: session))
        #expect(!auth.acceptsCSRF(session, session: session))
        #expect(!auth.acceptsCSRF(csrf, session: nil), "a CSRF field without its session")
        let other = try AdminAuth(token: "another-token-of-length")
        #expect(!auth.acceptsSession(other.sessionValue()))
        #expect(!auth.acceptsCSRF(other.csrfValue(session: session), session: session))
        // Another session's CSRF field does not pass.
        let later = try #require(auth.sessionValue(now: Date().addingTimeInterval(5)))
        #expect(!auth.acceptsCSRF(auth.csrfValue(session: later), session: session))
        // Tampered or malformed cookies.
        #expect(!auth.acceptsSession("1" + session))
        #expect(!auth.acceptsSession(session.replacingOccurrences(of: ".", with: "")))
        #expect(!auth.acceptsSession(".\(session.split(separator: ".")[1])"))
        #expect(!auth.acceptsSession("99999999999999999999.\(session.split(separator: ".")[1])"))
    }

    @Test("pending growth: whole minutes in a row, newest first, that staged more than they admitted; the current minute does not count")
    func growth() {
        let now = Date(timeIntervalSince1970: 1_800_000_030)
        let thisMinute = Date(timeIntervalSince1970: 1_800_000_000)
        func sample(_ minutesAgo: Int, staged: Int64, admitted: Int64) -> AdminStore.MinuteSample {
            AdminStore.MinuteSample(
                minute: thisMinute.addingTimeInterval(Double(-60 * minutesAgo)), staged: staged, admitted: admitted,
                refused: 0, completed: admitted, failed: 1, avgLagMs: nil, p95LagMs: nil)
        }
        // The current minute admitted more (not over: ignored); 3 growing minutes, then one that kept up.
        var samples = [sample(0, staged: 0, admitted: 50)]
        samples += (1...3).map { sample($0, staged: 10, admitted: 5) }
        samples.append(sample(4, staged: 5, admitted: 5))
        samples += (5...20).map { sample($0, staged: 10, admitted: 5) }
        var limits = AdminStore.Limits()
        limits.add(hour: samples.shuffled(), now: now)
        #expect(limits.growingMinutes == 3)
        #expect(limits.completedHour == 50 + 5 * 19 + 5)
        #expect(limits.failedHour == 21)
        var steady = AdminStore.Limits()
        steady.add(hour: [sample(1, staged: 5, admitted: 5), sample(2, staged: 9, admitted: 1)], now: now)
        #expect(steady.growingMinutes == 0)
    }

    @Test("a session cookie expires after its lifetime; one from the future beyond the clock skew is refused")
    func sessionExpiry() throws {
        let auth = try AdminAuth(token: "0123456789abcdef0123")
        let issued = Date(timeIntervalSince1970: 1_800_000_000)
        let session = try #require(auth.sessionValue(now: issued))
        let lifetime = TimeInterval(AdminAuth.sessionLifetime.components.seconds)
        #expect(auth.acceptsSession(session, now: issued.addingTimeInterval(lifetime - 1)))
        #expect(!auth.acceptsSession(session, now: issued.addingTimeInterval(lifetime + 1)))
        #expect(auth.acceptsSession(session, now: issued.addingTimeInterval(-30)))
        #expect(!auth.acceptsSession(session, now: issued.addingTimeInterval(-120)))
        let csrf = try #require(auth.csrfValue(session: session))
        #expect(!auth.acceptsCSRF(csrf, session: session, now: issued.addingTimeInterval(lifetime + 1)))
    }

    @Test("flash messages are shown only with this admin's signature")
    func flashSignature() throws {
        let auth = try AdminAuth(token: nil)
        let signature = auth.flashSignature("flash:Cancelled job 5.")
        #expect(auth.acceptsFlash("flash:Cancelled job 5.", signature: signature))
        #expect(!auth.acceptsFlash("flash:Cancelled job 6.", signature: signature))
        #expect(!auth.acceptsFlash("error:Cancelled job 5.", signature: signature))
        #expect(!auth.acceptsFlash("flash:Cancelled job 5.", signature: nil))
        #expect(!(try AdminAuth(token: nil)).acceptsFlash("flash:Cancelled job 5.", signature: signature), "another process's key")
    }

    @Test("wrong tokens: past the failures allowed in a window, that client is refused until it ends; others are not")
    func signInLimiter() {
        let limiter = SignInLimiter(maxFailures: 3, window: .seconds(60), maxClients: 2)
        let start = ContinuousClock.now
        #expect(limiter.retryAfter(client: "a", now: start) == nil)
        for second in 0..<3 { limiter.recordFailure(client: "a", now: start + .seconds(second)) }
        #expect(limiter.retryAfter(client: "a", now: start + .seconds(3)) == .seconds(57))
        #expect(limiter.retryAfter(client: "b", now: start + .seconds(3)) == nil, "another client is not limited")
        #expect(limiter.retryAfter(client: "a", now: start + .seconds(60)) == nil, "the first failure left the window")
        // Tracking is bounded: a third client pushes out the one that failed longest ago.
        limiter.recordFailure(client: "b", now: start + .seconds(61))
        for second in 0..<3 { limiter.recordFailure(client: "c", now: start + .seconds(62 + second)) }
        #expect(limiter.retryAfter(client: "c", now: start + .seconds(65)) != nil)
    }

    @Test("bind addresses: host:port, [v6]:port, :port; anything else is refused")
    func bind() {
        #expect(AdminServer.parseBind("127.0.0.1:8080")! == ("127.0.0.1", 8080))
        #expect(AdminServer.parseBind("[::1]:9464")! == ("::1", 9464))
        #expect(AdminServer.parseBind(":0")! == ("0.0.0.0", 0))
        #expect(AdminServer.parseBind("localhost") == nil)
        #expect(AdminServer.parseBind("::1:80") == nil)
        #expect(AdminServer.parseBind("h:65536") == nil)
        #expect(AdminServer.parseBind("h:-1") == nil)
        #expect(AdminServer.parseBind("[::1]9464") == nil)
    }

    @Test("a partition cursor survives its text form, whatever the key holds; garbage is no cursor")
    func cursor() {
        let cursor = AdminStore.PartitionCursor(gate: "g", partition: "a\u{1F}b/c?d=é", inFlight: 3)
        // Counts beyond the column's range are forged: no cursor (was a 503 from the database).
        #expect(AdminStore.PartitionCursor(token: AdminStore.PartitionCursor(gate: "g", partition: "p", inFlight: -1).token) == nil)
        #expect(AdminStore.PartitionCursor(token: AdminStore.PartitionCursor(gate: "g", partition: "p", inFlight: .min).token) == nil)
        #expect(AdminStore.PartitionCursor(token: cursor.token) == cursor)
        #expect(!cursor.token.contains("/") && !cursor.token.contains("+") && !cursor.token.contains("="))
        #expect(AdminStore.PartitionCursor(token: "!!!") == nil)
        #expect(AdminStore.PartitionCursor(token: "") == nil)
    }

    @Test("after an action the admin returns only to a path on itself, never to another site")
    func redirects() {
        #expect(AdminServer.sameOriginPath("http://127.0.0.1:8080/policies/a%20b?q=x&flash=old&sig=ab") == "/policies/a%20b?q=x")
        #expect(AdminServer.sameOriginPath("https://evil.example//evil.example/x") == nil)
        #expect(AdminServer.sameOriginPath("javascript:alert(1)") == nil)
    }
}

@Suite("Form fields")
struct FormFieldsTests {
    @Test("'+' is a space, escapes decode, the first of a name wins; a broken escape is no form (a 400, never a crash)")
    func parse() throws {
        let fields = try #require(FormFields("q=acme+corp&watch=a%20b&watch=c&x=%3Cy%3E&empty=&flag"))
        #expect(fields.value("q") == "acme corp")
        #expect(fields.values("watch") == ["a b", "c"])
        #expect(fields.value("x") == "<y>")
        #expect(fields.value("empty") == "" && fields.value("flag") == "")
        #expect(fields.first["watch"] == "a b")
        #expect(FormFields("csrf=%") == nil)
        #expect(FormFields("token=%zz") == nil)
        #expect(FormFields("a=%FF") == nil, "not UTF-8")
        #expect(FormFields("token=a b&t=<x>")?.value("t") == "<x>")
        #expect(FormFields("q=a%00b")?.value("q") == "ab", "NUL is dropped")
        #expect(FormFields("")?.pairs.isEmpty == true)
    }
}
