import DispatchPolicy
import DispatchPolicyAdmin
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import Metrics
import PostgresNIO
import Prometheus
import Synchronization
import Testing

#if canImport(FoundationNetworking)
    import FoundationNetworking
#endif

private let token = "test-admin-token-0123456789"

private func declare(_ conn: PostgresConnection, _ name: String, _ config: String) async throws {
    try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: name, config: config)
}

private func stage(_ conn: PostgresConnection, _ policy: String, _ context: String) async throws -> Int64 {
    try await conn.scalar("SELECT dispatch_policy.stage(\(policy), '{\"n\": 1}', \(context)::jsonb)", as: Int64.self)
}

/// The admin router on `conn`'s database, tested in process.
private func withAdmin<T: Sendable>(
    _ conn: PostgresConnection, token: String? = nil, pageSize: Int = 50, registry: PrometheusCollectorRegistry = .init(),
    _ body: @Sendable @escaping (any TestClientProtocol) async throws -> T
) async throws -> T {
    var options = AdminOptions(token: token)
    options.pageSize = pageSize
    let server = try AdminServer(
        store: AdminStore(executor: conn, logger: TestServer.logger), options: options,
        registry: registry, logger: TestServer.logger)
    let app = Application(router: server.router())
    return try await app.test(.router) { client in try await body(client) }
}

private func html(_ response: TestResponse) -> String { String(buffer: response.body) }

private func form(_ fields: [(String, String)]) -> ByteBuffer {
    var components = URLComponents()
    components.queryItems = fields.map { URLQueryItem(name: $0.0, value: $0.1) }
    return ByteBuffer(string: components.percentEncodedQuery ?? "")
}

private let formHeaders: HTTPFields = [.contentType: "application/x-www-form-urlencoded"]

@Suite("Admin web UI", .timeLimit(.minutes(15)))
struct AdminTests {
    @Test("pages render from the database; every value a tenant chose is escaped; unknown things are 404")
    func pages() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "hooks",
                #"""
                {"max_attempts": 1,
                 "gates": [{"type": "throttle", "name": "per_tenant", "rate": 1, "per": 86400, "partition_by": "{tenant}"},
                           {"type": "global_cap", "max": 50}]}
                """#)
            let evil = #"<script>alert("x")</script>"#
            let first = try await stage(conn, "hooks", #"{"tenant": "\u003cscript\u003ealert(\"x\")\u003c/script\u003e"}"#)
            _ = try await stage(conn, "hooks", #"{"tenant": "\u003cscript\u003ealert(\"x\")\u003c/script\u003e"}"#)
            for tenant in ["a", "b", "c"] { _ = try await stage(conn, "hooks", #"{"tenant": "\#(tenant)"}"#) }
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "hooks")
            // One that dies, with a hostile error text.
            let dead = try await conn.scalar(
                "SELECT id FROM dispatch_policy.admitted_jobs WHERE context ->> 'tenant' = 'a'", as: Int64.self)
            _ = try await conn.scalar("SELECT dispatch_policy.fail(\(dead), \(evil))", as: String.self)
            let waiting = try await conn.scalar("SELECT min(id) FROM dispatch_policy.staged_jobs", as: Int64.self)
            // An adaptive partition that has admitted but observed nothing yet has
            // no EWMA (NULL): the overview once failed to decode it (503).
            try await declare(
                conn, "adapt",
                #"{"gates": [{"type": "adaptive_concurrency", "partition_by": "{tenant}", "initial_max": 2, "target_lag_ms": 100}]}"#)
            _ = try await stage(conn, "adapt", #"{"tenant": "a"}"#)
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "adapt")
            #expect(
                try await conn.scalar("SELECT count(*) FROM dispatch_policy.adaptive_stats WHERE ewma_lag_ms IS NULL", as: Int64.self) == 1)

            try await withAdmin(conn, pageSize: 2) { client in
                try await client.execute(uri: "/", method: .get) { response in
                    #expect(response.status == .ok)
                    let page = html(response)
                    #expect(page.contains(#"<a href="/policies/hooks">hooks</a>"#))
                    #expect(page.contains(#"<a href="/policies/adapt">adapt</a>"#))
                    #expect(!page.contains("<script>alert"))
                    #expect(response.headers[.contentSecurityPolicy]?.contains("script-src 'self'") == true)
                    #expect(page.contains("<svg"), "a trend sparkline per policy")
                }
                // Partitions, two per page, cursor-paginated; the hostile key escaped.
                let first = try await client.execute(uri: "/policies/hooks", method: .get) { response in
                    #expect(response.status == .ok)
                    return html(response)
                }
                #expect(!first.contains("<script>alert"))
                #expect(first.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"))
                #expect(first.contains("Lanes with jobs waiting"))
                let next = try #require(
                    first.components(separatedBy: #"<p class="pager"><a href=""#).dropFirst().first?
                        .components(separatedBy: "\"").first)
                let second = try await client.execute(uri: next.replacingOccurrences(of: "&amp;", with: "&"), method: .get) { html($0) }
                // 1 global_cap partition + 4 tenants' throttle partitions = 5 rows: the second page has 2 more.
                #expect(second.components(separatedBy: "<button class=\"watch\"").count - 1 == 2)
                #expect(second.contains(#"data-partition="b""#) || second.contains(#"data-partition="c""#))
                // Search, and the watched list from the address.
                let searched = try await client.execute(uri: "/policies/hooks?q=scr", method: .get) { html($0) }
                // A browser's form sends a space as '+'.
                let spaced = try await client.execute(uri: "/policies/hooks?q=ipt%3Ealert%28%22x%22%29%3C%2Fscr", method: .get) { html($0) }
                #expect(spaced.components(separatedBy: "<button class=\"watch\"").count - 1 == 1)
                #expect(searched.components(separatedBy: "<button class=\"watch\"").count - 1 == 1)
                let watched = try await client.execute(uri: "/policies/hooks?watch=c", method: .get) { html($0) }
                #expect(watched.contains("Watched partitions") && !watched.contains("None. Press"))

                try await client.execute(uri: "/jobs/\(waiting)", method: .get) { response in
                    #expect(response.status == .ok)
                    let page = html(response)
                    #expect(page.contains("Why it is where it is"))
                    #expect(page.contains("waits"))
                    #expect(!page.contains("<script>alert"))
                }
                try await client.execute(uri: "/dead", method: .get) { response in
                    let page = html(response)
                    #expect(page.contains("/jobs/\(dead)"))
                    #expect(page.contains("&lt;script&gt;"))
                    #expect(!page.contains("<script>alert"))
                }
                try await client.execute(uri: "/jobs/\(dead)", method: .get) { response in
                    #expect(html(response).contains("Attempts that failed"))
                }
                try await client.execute(uri: "/jobs/99999999", method: .get) { #expect($0.status == .notFound) }
                try await client.execute(uri: "/jobs/x", method: .get) { #expect($0.status == .badRequest) }
                try await client.execute(uri: "/policies/nope", method: .get) { #expect($0.status == .notFound) }
                try await client.execute(uri: "/assets/admin.js", method: .get) { #expect(html($0).contains("localStorage")) }
                try await client.execute(uri: "/assets/admin.css", method: .get) { #expect(html($0).contains("prefers-color-scheme")) }
            }
            _ = first
        }
    }

    @Test("actions: off without a token; with one they need the bearer token or a signed-in session and its CSRF field")
    func actions() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", #"{"gates": [{"type": "concurrency", "name": "c", "max": 5, "partition_by": "{tenant}"}]}"#)
            let job = try await stage(conn, "p", #"{"tenant": "a"}"#)
            @Sendable func paused() async throws -> Bool {
                try await conn.scalar("SELECT paused FROM dispatch_policy.policies WHERE name = 'p'", as: Bool.self)
            }

            try await withAdmin(conn) { client in
                try await client.execute(uri: "/actions/pause", method: .post, headers: formHeaders, body: form([("policy", "p")])) {
                    #expect($0.status == .forbidden)
                }
                try await client.execute(uri: "/login", method: .get) { #expect($0.status == .notFound) }
            }
            #expect(try await paused() == false)

            try await withAdmin(conn, token: token) { client in
                // No credentials; a wrong bearer token.
                try await client.execute(uri: "/actions/pause", method: .post, headers: formHeaders, body: form([("policy", "p")])) {
                    #expect($0.status == .forbidden)
                }
                var wrong = formHeaders
                wrong[.authorization] = "Bearer not-the-token-at-all"
                try await client.execute(uri: "/actions/pause", method: .post, headers: wrong, body: form([("policy", "p")])) {
                    #expect($0.status == .forbidden)
                }
                #expect(try await paused() == false)
                // A script with the token.
                var bearer = formHeaders
                bearer[.authorization] = "Bearer \(token)"
                try await client.execute(uri: "/actions/pause", method: .post, headers: bearer, body: form([("policy", "p")])) {
                    #expect($0.status == .seeOther)
                    #expect($0.headers[.location]?.contains("flash=") == true)
                }
                #expect(try await paused())
                // A browser: a wrong token signs nobody in.
                try await client.execute(uri: "/login", method: .post, headers: formHeaders, body: form([("token", "wrong")])) {
                    #expect($0.headers[.setCookie] == nil)
                }
                let cookie = try await client.execute(uri: "/login", method: .post, headers: formHeaders, body: form([("token", token)])) {
                    response -> String in
                    let header = try #require(response.headers[.setCookie])
                    #expect(header.contains("HttpOnly") && header.contains("SameSite=Strict"))
                    return String(header.split(separator: ";")[0])
                }
                var session = formHeaders
                session[.cookie] = cookie
                // The session alone is not enough: a forged form has no CSRF field.
                try await client.execute(uri: "/actions/resume", method: .post, headers: session, body: form([("policy", "p")])) {
                    #expect($0.status == .forbidden)
                }
                #expect(try await paused())
                // The page gives the signed-in browser its CSRF field.
                let page = try await client.execute(uri: "/policies/p", method: .get, headers: [.cookie: cookie]) { html($0) }
                let csrf = try #require(
                    page.components(separatedBy: #"name="csrf" value=""#).dropFirst().first?.components(separatedBy: "\"").first)
                try await client.execute(
                    uri: "/actions/resume", method: .post, headers: session, body: form([("csrf", csrf), ("policy", "p")])
                ) {
                    #expect($0.status == .seeOther)
                }
                #expect(try await paused() == false)
                // Cancel through the form; a refusal comes back as a message, not a 500.
                try await client.execute(
                    uri: "/actions/cancel", method: .post, headers: session, body: form([("csrf", csrf), ("id", "\(job)")])
                ) {
                    #expect($0.status == .seeOther)
                }
                #expect(
                    try await conn.scalar("SELECT status FROM dispatch_policy.finished_jobs WHERE id = \(job)", as: String.self)
                        == "cancelled")
                try await client.execute(
                    uri: "/actions/retry", method: .post, headers: session, body: form([("csrf", csrf), ("id", "\(job)")])
                ) {
                    #expect($0.status == .seeOther)
                    #expect($0.headers[.location]?.contains("error=") == true, "a cancelled job is not dead: refused")
                }
                try await client.execute(
                    uri: "/actions/pause-partition", method: .post, headers: session,
                    body: form([("csrf", csrf), ("policy", "p"), ("gate", "c"), ("partition", "a")])
                ) {
                    #expect($0.status == .seeOther)
                }
                #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.paused_partitions", as: Int64.self) == 1)
                try await client.execute(uri: "/actions/nonsense", method: .post, headers: session, body: form([("csrf", csrf)])) {
                    #expect($0.headers[.location]?.contains("error=") == true)
                }
                // A body that is not a form is a 400, signed in or not, and the admin lives on.
                for body in ["csrf=%", "token=%zz", "{\"policy\": \"p\"}%"] {
                    try await client.execute(uri: "/logout", method: .post, headers: formHeaders, body: ByteBuffer(string: body)) {
                        #expect($0.status == .badRequest, "\(body)")
                    }
                    try await client.execute(uri: "/actions/pause", method: .post, headers: bearer, body: ByteBuffer(string: body)) {
                        #expect($0.status == .badRequest, "\(body)")
                    }
                }
                // The scheme of the Authorization header is case-insensitive.
                var lower = formHeaders
                lower[.authorization] = "bearer  \(token)"
                try await client.execute(uri: "/actions/resume", method: .post, headers: lower, body: form([("policy", "p")])) {
                    #expect($0.status == .seeOther)
                }
            }
        }
    }

    @Test("admit now from the policy page; messages shown only when the admin signed them; sign-ins limited; the cookie expires")
    func admitNowAndSessions() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(conn, "p", #"{"gates": [{"type": "concurrency", "name": "c", "max": 2, "partition_by": "{tenant}"}]}"#)
            for _ in 0..<3 { _ = try await stage(conn, "p", #"{"tenant": "a"}"#) }
            _ = try await stage(conn, "p", #"{"tenant": "b"}"#)
            try await withAdmin(conn, token: token) { client in
                var bearer = formHeaders
                bearer[.authorization] = "Bearer \(token)"
                bearer[.referer] = "http://127.0.0.1:8080/policies/p"
                let location = try await client.execute(
                    uri: "/actions/admit-now", method: .post, headers: bearer,
                    body: form([("policy", "p"), ("gate", "c"), ("partition", "a"), ("max", "3")])
                ) {
                    response -> String in
                    #expect(response.status == .seeOther)
                    return try #require(response.headers[.location])
                }
                #expect(location.hasPrefix("/policies/p?flash="))
                #expect(
                    try await conn.scalar(
                        "SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE context ->> 'tenant' = 'a'", as: Int64.self) == 2)
                #expect(
                    try await conn.scalar(
                        "SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE context ->> 'tenant' = 'b'", as: Int64.self) == 0)
                // The redirect's message is shown; the same text with another signature, or none, is not.
                let shown = try await client.execute(uri: location, method: .get) { html($0) }
                #expect(shown.contains("admitted 2 of 3 fetched (asked for 3); refused c=1"))
                let forged = location.replacingOccurrences(of: "sig=", with: "sig=0")
                #expect(!(try await client.execute(uri: forged, method: .get) { html($0) }).contains("admitted 2 of 3"))
                let unsigned = "/policies/p?flash=Cancelled%20every%20job"
                #expect(!(try await client.execute(uri: unsigned, method: .get) { html($0) }).contains("Cancelled every job"))
                // Bad max: a message, nothing admitted.
                try await client.execute(
                    uri: "/actions/admit-now", method: .post, headers: bearer,
                    body: form([("policy", "p"), ("gate", "c"), ("partition", "b"), ("max", "lots")])
                ) {
                    #expect($0.headers[.location]?.contains("error=") == true)
                }
                #expect(try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs", as: Int64.self) == 2)

                // The session cookie lasts 12 hours, and is Secure behind an HTTPS proxy.
                var proxied = formHeaders
                proxied[HTTPField.Name("X-Forwarded-Proto")!] = "https"
                try await client.execute(uri: "/login", method: .post, headers: proxied, body: form([("token", token)])) {
                    let header = try #require($0.headers[.setCookie])
                    #expect(header.contains("Max-Age=43200") && header.contains("Secure"), "\(header)")
                }
                try await client.execute(uri: "/login", method: .post, headers: formHeaders, body: form([("token", token)])) {
                    let header = try #require($0.headers[.setCookie])
                    #expect(!header.contains("Secure"))
                }
                // The empty partition (a job without the template's key) can be acted on.
                _ = try await stage(conn, "p", #"{"other": 1}"#)
                try await client.execute(
                    uri: "/actions/admit-now", method: .post, headers: bearer,
                    body: form([("policy", "p"), ("gate", "c"), ("partition", ""), ("max", "1")])
                ) {
                    #expect($0.headers[.location]?.contains("flash=") == true, "\($0.headers[.location] ?? "")")
                }
                #expect(
                    try await conn.scalar("SELECT count(*) FROM dispatch_policy.admitted_jobs WHERE NOT context ? 'tenant'", as: Int64.self)
                        == 1)
                // A cursor or search with a NUL is ignored, not a database error.
                try await client.execute(uri: "/policies/p?q=%00&after=MB9jAB9h", method: .get) { #expect($0.status == .ok) }
                // Ten wrong tokens in a minute, then this client is refused for a while, even with the right token.
                for _ in 0..<10 {
                    try await client.execute(uri: "/login", method: .post, headers: formHeaders, body: form([("token", "wrong")])) {
                        #expect($0.status == .seeOther)
                    }
                }
                try await client.execute(uri: "/login", method: .post, headers: formHeaders, body: form([("token", token)])) {
                    #expect($0.status == .tooManyRequests)
                    #expect($0.headers[.retryAfter] != nil)
                    #expect($0.headers[.setCookie] == nil)
                }
                try await client.execute(uri: "/actions/pause", method: .post, headers: bearer, body: form([("policy", "p")])) {
                    #expect($0.status == .tooManyRequests, "a bearer token from the same client too")
                }
            }
            // Wrong bearer tokens count too (a fresh admin: its own limiter).
            try await withAdmin(conn, token: token) { client in
                var wrong = formHeaders
                wrong[.authorization] = "Bearer not-the-token-at-all"
                for _ in 0..<10 {
                    try await client.execute(uri: "/actions/resume", method: .post, headers: wrong, body: form([("policy", "p")])) {
                        #expect($0.status == .forbidden)
                    }
                }
                try await client.execute(uri: "/actions/resume", method: .post, headers: wrong, body: form([("policy", "p")])) {
                    #expect($0.status == .tooManyRequests)
                }
            }
        }
    }

    /// The partition list reads only what a page needs (the candidates of
    /// each gate-state table after the cursor): paging through it must give
    /// exactly the brute-force order, every sort and filter, across the
    /// boundary between busy and idle rows.
    @Test("partition pages: every sort and filter, page after page, equal the whole list ordered by brute force")
    func partitionPages() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                #"""
                {"gates": [{"type": "throttle", "name": "t", "rate": 10, "per": 60, "burst": 10, "partition_by": "{tenant}"},
                           {"type": "concurrency", "name": "c", "max": 5, "partition_by": "{tenant}"},
                           {"type": "adaptive_concurrency", "name": "a", "initial_max": 2, "target_lag_ms": 500, "partition_by": "{tenant}"}]}
                """#)
            // Gate state as ticks would leave it: buckets for 0–199 (some spent),
            // counters for every third of 0–299 (0 to 3 in flight), adaptive 100–150.
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.throttle_buckets (policy, gate, partition, tokens, rate, per_seconds, burst, refilled_at)
                SELECT 'p', 't', 'k' || lpad(i::text, 3, '0'), CASE WHEN i % 7 = 0 THEN 3 ELSE 10 END, 10, 60, 10, now()
                FROM generate_series(0, 199) i
                """)
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight)
                SELECT 'p', 'c', 'k' || lpad(i::text, 3, '0'), (i * 7) % 4 FROM generate_series(0, 299, 3) i
                """)
            try await conn.exec(
                """
                INSERT INTO dispatch_policy.adaptive_stats (policy, gate, partition, current_max)
                SELECT 'p', 'a', 'k' || lpad(i::text, 3, '0'), 2 FROM generate_series(100, 150) i
                """)
            struct Row: Equatable {
                var gate: String
                var partition: String
                var inFlight: Int64
                var busy: Bool
            }
            var all: [String: Row] = [:]
            for row in try await conn.rows(
                "SELECT gate, partition, tokens < burst FROM dispatch_policy.throttle_buckets", logger: TestServer.logger)
            {
                let (gate, partition, spent) = try row.decode((String, String, Bool).self)
                all[gate + "/" + partition] = Row(gate: gate, partition: partition, inFlight: 0, busy: spent)
            }
            for row in try await conn.rows(
                "SELECT gate, partition, in_flight FROM dispatch_policy.inflight_counters", logger: TestServer.logger)
            {
                let (gate, partition, inFlight) = try row.decode((String, String, Int64).self)
                all[gate + "/" + partition] = Row(gate: gate, partition: partition, inFlight: inFlight, busy: inFlight > 0)
            }
            for row in try await conn.rows("SELECT gate, partition FROM dispatch_policy.adaptive_stats", logger: TestServer.logger) {
                let (gate, partition) = try row.decode((String, String).self)
                all[gate + "/" + partition] = Row(gate: gate, partition: partition, inFlight: 0, busy: false)
            }
            let store = AdminStore(executor: conn, logger: TestServer.logger)
            for sort in AdminStore.PartitionSort.allCases {
                for onlyBusy in [false, true] {
                    for search in [nil, "1", "K05"] {
                        let expected = all.values
                            .filter { !onlyBusy || $0.busy }
                            .filter { search == nil || $0.partition.lowercased().contains(search!.lowercased()) }
                            .sorted { a, b in
                                if sort == .inFlight, a.inFlight != b.inFlight { return a.inFlight > b.inFlight }
                                return (a.gate, a.partition) < (b.gate, b.partition)
                            }
                            .map { "\($0.gate)/\($0.partition)" }
                        var paged: [String] = []
                        var after: AdminStore.PartitionCursor?
                        var pages = 0
                        while pages < 200 {
                            pages += 1
                            let page = try await store.partitions(
                                policy: "p", search: search, sort: sort, after: after, onlyBusy: onlyBusy, limit: 7)
                            paged += page.map { "\($0.gate)/\($0.partition)" }
                            guard page.count == 7, let last = page.last else { break }
                            after = AdminStore.PartitionCursor(gate: last.gate, partition: last.partition, inFlight: last.inFlight)
                        }
                        #expect(
                            paged == expected,
                            "sort \(sort), only busy \(onlyBusy), search \(search ?? "-"): \(paged.count) paged, \(expected.count) expected"
                        )
                        #expect(!expected.isEmpty)
                    }
                }
            }
            // The watched list: only those keys, whatever else there is.
            let watched = try await store.partitions(
                policy: "p", search: nil, after: nil, onlyBusy: false, only: ["k003", "k120"], limit: 50)
            #expect(watched.map { "\($0.gate)/\($0.partition)" } == ["a/k120", "c/k003", "c/k120", "t/k003", "t/k120"])
        }
    }

    @Test(
        "partitions show their pending jobs and last staged time; one with jobs but no gate state yet is listed; only-with-jobs filter; the overview's pending trend"
    )
    func partitionPending() async throws {
        try await withTestDatabase { conn, _ in
            try await declare(
                conn, "p",
                #"{"gates": [{"type": "throttle", "name": "t", "rate": 1, "per": 3600, "burst": 1, "partition_by": "{tenant}"}]}"#)
            for tenant in ["a", "a", "a", "b"] { _ = try await stage(conn, "p", #"{"tenant": "\#(tenant)"}"#) }
            // One token each: a keeps 2 waiting, b none.
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            // c is staged after the tick: no gate state, only its counter (once folded).
            _ = try await stage(conn, "p", #"{"tenant": "c"}"#)
            let store = AdminStore(executor: conn, logger: TestServer.logger)
            func listed(onlyPending: Bool) async throws -> [String: (Int64, Bool)] {
                var seen: [String: (Int64, Bool)] = [:]
                for row in try await store.partitions(
                    policy: "p", search: nil, after: nil, onlyBusy: false, onlyPending: onlyPending, limit: 50)
                {
                    seen[row.partition] = (row.pending, row.lastStaged != nil)
                }
                return seen
            }
            var all = try await listed(onlyPending: false)
            #expect(all["a"]?.0 == 2 && all["a"]?.1 == true)
            #expect(all["b"]?.0 == 0 && all["b"]?.1 == true, "b's job was admitted; it was staged, so it has a last staged time")
            try await conn.exec("SELECT dispatch_policy.fold_stats()")
            all = try await listed(onlyPending: false)
            #expect(all["c"]?.0 == 1, "\(all)")
            let waiting = try await listed(onlyPending: true)
            #expect(Set(waiting.keys) == ["a", "c"])
            // The page and its filter link.
            try await withAdmin(conn) { client in
                let page = try await client.execute(uri: "/policies/p?pending=1", method: .get) { html($0) }
                #expect(page.contains("Last staged") && page.contains("only with jobs waiting"))
                #expect(page.contains(#"name="pending" value="1" checked"#))
                let overview = try await client.execute(uri: "/", method: .get) { html($0) }
                #expect(overview.contains("pending jobs of p, last hour"))
                #expect(overview.contains("3 pending, 0 scheduled"), "the trend's last minute")
            }
        }
    }

    @Test("/metrics: the runner's counters and tick histogram, per-policy gauges read at scrape time, partition series only when asked")
    func metrics() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(
                conn, "p", #"{"gates": [{"type": "throttle", "name": "t", "rate": 2, "per": 3600, "partition_by": "{tenant}"}]}"#)
            for _ in 0..<5 { _ = try await stage(conn, "p", #"{"tenant": "a"}"#) }
            let registry = PrometheusCollectorRegistry()
            var options = TickRunnerOptions()
            options.once = true
            options.metrics = DispatchPolicyMetrics(factory: PrometheusMetricsFactory(registry: registry))
            _ = try await TickRunner(connection: settings, options: options, logger: TestServer.logger).runLoop()

            let text = try await withAdmin(conn, registry: registry) { client in
                try await client.execute(uri: "/metrics", method: .get) { html($0) }
            }
            #expect(text.contains(#"dispatch_policy_admitted_total{policy="p"} 2"#))
            #expect(text.contains(#"dispatch_policy_refused_total{policy="p",gate="t"} 3"#))
            #expect(text.contains(#"dispatch_policy_tick_duration_seconds_count{policy="p"}"#))
            #expect(text.contains(#"dispatch_policy_pending{policy="p"} 3"#))
            #expect(text.contains(#"dispatch_policy_in_flight{policy="p"} 2"#))
            #expect(text.contains("dispatch_policy_up 1"))
            #expect(!text.contains("dispatch_policy_partition_"))
            // The same refusals are in the history, per policy and per partition.
            #expect(
                try await conn.scalar(
                    "SELECT sum(refused)::int FROM dispatch_policy.policy_minutes('p', now() - interval '5 minutes')", as: Int.self) == 3)
            #expect(
                try await conn.scalar(
                    "SELECT sum(refused)::int FROM dispatch_policy.partition_minutes('p', 't', 'a', now() - interval '5 minutes')",
                    as: Int.self) == 3)

            var partitionOptions = AdminOptions()
            partitionOptions.partitionMetrics = true
            let server = try AdminServer(
                store: AdminStore(executor: conn, logger: TestServer.logger), options: partitionOptions,
                registry: registry, logger: TestServer.logger)
            let withPartitions = try await Application(router: server.router()).test(.router) { client in
                try await client.execute(uri: "/metrics", method: .get) { html($0) }
            }
            // A policy that is gone is no longer exported (nor its partitions).
            try await conn.exec("DELETE FROM dispatch_policy.staged_jobs")
            try await conn.exec("DELETE FROM dispatch_policy.admitted_jobs")
            try await conn.exec("DELETE FROM dispatch_policy.throttle_buckets")
            try await conn.exec("DELETE FROM dispatch_policy.policies")
            let after = try await Application(router: server.router()).test(.router) { client in
                try await client.execute(uri: "/metrics", method: .get) { html($0) }
            }
            #expect(!after.contains(#"policy="p""#) || after.contains("dispatch_policy_admitted_total"), "\(after)")
            #expect(!after.contains(#"dispatch_policy_pending{policy="p"}"#))
            #expect(!after.contains("dispatch_policy_partition_tokens"))
            // 2 tokens taken, refilling at 2 an hour: nearly none left.
            let tokens = withPartitions.components(separatedBy: #"dispatch_policy_partition_tokens{policy="p",gate="t",partition="a"} "#)
                .dropFirst().first?.components(separatedBy: "\n").first.flatMap(Double.init)
            #expect(tokens.map { $0 >= 0 && $0 < 0.1 } == true, "\(withPartitions)")
        }
    }

    @Test("status --policy: the policy's counts, what limits it now, and its busiest partitions; an unknown policy is an error")
    func statusPolicy() async throws {
        try await withTestDatabase { conn, settings in
            try await declare(conn, "p", #"{"gates": [{"type": "concurrency", "name": "c", "max": 1, "partition_by": "{tenant}"}]}"#)
            for tenant in ["a", "a", "b"] { _ = try await stage(conn, "p", #"{"tenant": "\#(tenant)"}"#) }
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            let status = try await cli(["status", "--policy", "p"], settings: settings)
            #expect(status.status == 0, "\(status.stderr)")
            #expect(status.stdout.contains("limits now:"))
            #expect(status.stdout.contains("at concurrency cap: 1 lane waiting for a slot of c"), "\(status.stdout)")
            let table = status.stdout.components(separatedBy: "GATE  PARTITION").last ?? ""
            #expect(table.contains("c     a") && table.contains("c     b"), "\(status.stdout)")
            let unknown = try await cli(["status", "--policy", "nope"], settings: settings)
            #expect(unknown.status == 1 && unknown.stderr.contains("no policy named nope"))
        }
    }

    @Test("dispatch-policy admin and run --metrics listen where asked and stop on SIGTERM; --allow-actions without a token is refused")
    func commands() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        let refused = try await cli(["admin", "--allow-actions", "--bind", "127.0.0.1:0"], settings: settings)
        #expect(refused.status == 78)
        #expect(refused.stderr.contains("DISPATCH_POLICY_ADMIN_TOKEN"))
        let bad = try await cli(["run", "--metrics", "nowhere"], settings: settings)
        #expect(bad.status != 0 && bad.stderr.contains("--metrics"))

        for arguments in [["admin", "--bind", "127.0.0.1:0"], ["run", "--metrics", "127.0.0.1:0", "--idle-pause", "100ms"]] {
            var environment = ProcessInfo.processInfo.environment
            environment["DATABASE_URL"] = databaseURL(settings)
            let child = try await spawnChild(cliPath, arguments, environment: environment)
            var address: String?
            _ = try await waitUntil(30) {
                address =
                    child.output().stderr.components(separatedBy: "dispatch-policy: listening on ").dropFirst().first?
                    .components(separatedBy: "\n").first
                return address != nil
            }
            let base = try #require(address, "\(arguments): \(child.output().stderr)")
            let (data, response) = try await URLSession.shared.data(from: try #require(URL(string: "\(base)/metrics")))
            #expect((response as? HTTPURLResponse)?.statusCode == 200)
            #expect(String(decoding: data, as: UTF8.self).contains("dispatch_policy_up 1"), "\(arguments)")
            child.signal(SIGTERM)
            let ending = await child.wait()
            #expect(ending == .exited(0), "\(arguments): \(child.output().stderr)")
        }
    }
}

/// The admin in a real browser: Tests/browser/admin_browser.py drives
/// Debian's chromium through Playwright (scripts/test installs both).
@Suite("Admin in a browser", .timeLimit(.minutes(5)))
struct AdminBrowserTests {
    @Test(
        "on a demo's database: charts, theme, auto-refresh with the scroll kept, watched partitions in localStorage and the address, a job's explain, sign-in and an action; nothing from another origin; screenshots"
    )
    func browser() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        var environment = ProcessInfo.processInfo.environment
        environment["DATABASE_URL"] = databaseURL(settings)
        // A short demo leaves a live database: completions, failures, jobs waiting.
        let demo = try await runProcess(cliPath, ["demo", "--duration", "6s"], environment: environment)
        #expect(demo.status == 0, "\(demo.stderr)")
        let job = try await TestServer.withConnection(settings) { conn async throws in
            try await conn.scalar("SELECT min(id) FROM dispatch_policy.staged_jobs WHERE policy = 'demo_webhooks'", as: Int64.self)
        }
        environment["DISPATCH_POLICY_ADMIN_TOKEN"] = token
        let admin = try await spawnChild(cliPath, ["admin", "--allow-actions", "--bind", "127.0.0.1:0"], environment: environment)
        defer { admin.signal(SIGKILL) }
        var address: String?
        _ = try await waitUntil(30) {
            address =
                admin.output().stderr.components(separatedBy: "dispatch-policy: listening on ").dropFirst().first?.components(
                    separatedBy: "\n"
                ).first
            return address != nil
        }
        let base = try #require(address, "\(admin.output().stderr)")
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        let shots = FileManager.default.temporaryDirectory.appending(path: "dp-shots-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: shots, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: shots) }
        let result = try await runProcess(
            "/usr/bin/env", ["python3", root.appending(path: "browser/admin_browser.py").path, base, token, "\(job)", shots.path],
            environment: ProcessInfo.processInfo.environment)
        #expect(result.status == 0, "\(result.stdout)\n\(result.stderr)")
        #expect(result.stdout.contains("all browser checks passed"))
        for name in ["overview.png", "policy.png", "job.png"] {
            #expect(FileManager.default.fileExists(atPath: shots.appending(path: name).path), "\(name)")
        }
        admin.signal(SIGTERM)
        #expect(await admin.wait() == .exited(0))
    }
}

/// What an OTLP/HTTP collector received.
private final class Received: Sendable {
    private let bodies = Mutex<[(path: String, body: [UInt8])]>([])
    func add(_ path: String, _ body: [UInt8]) { bodies.withLock { $0.append((path, body)) } }
    var all: [(path: String, body: [UInt8])] { bodies.withLock { $0 } }
}

@Suite("Traces over OTLP", .timeLimit(.minutes(5)))
struct TracingTests {
    @Test("with an OTLP endpoint set, tick exports a span per tick (policy, admitted); without one it sends nothing")
    func ticksAreTraced() async throws {
        let settings = try await TestServer.shared.freshDatabase()
        try await TestServer.withConnection(settings) { conn async throws in
            try await declare(conn, "traced", #"{"gates": [{"type": "global_cap", "max": 10}]}"#)
            for _ in 0..<3 { _ = try await stage(conn, "traced", "{}") }
        }
        let received = Received()
        let router = Router()
        router.post("/v1/traces") { request, _ -> Response in
            let body = try await request.body.collect(upTo: 10 << 20)
            received.add(request.uri.path, Array(buffer: body))
            return Response(status: .ok)
        }
        try await Application(router: router).test(.live) { client in
            let port = try #require(client.port)
            var environment = ProcessInfo.processInfo.environment
            environment["DATABASE_URL"] = databaseURL(settings)
            environment.removeValue(forKey: "OTEL_EXPORTER_OTLP_ENDPOINT")
            environment.removeValue(forKey: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            // No endpoint: nothing is sent.
            let plain = try await runProcess(cliPath, ["tick", "--once"], environment: environment)
            #expect(plain.status == 0, "\(plain.stderr)")
            #expect(received.all.isEmpty)

            try await TestServer.withConnection(settings) { conn async throws in
                for _ in 0..<2 { _ = try await stage(conn, "traced", "{}") }
            }
            environment["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:\(port)"
            // Export while the tick runs too, not only at the flush on exit.
            environment["OTEL_BSP_SCHEDULE_DELAY"] = "200"
            let traced = try await runProcess(cliPath, ["tick", "--once"], environment: environment)
            #expect(traced.status == 0, "\(traced.stderr)")
            #expect(traced.stdout.contains("admitted 2"))
            let exports = received.all
            #expect(exports.count >= 1)
            #expect(exports.allSatisfy { $0.path == "/v1/traces" })
            let bytes = exports.flatMap(\.body)
            func has(_ text: String) -> Bool {
                let needle = Array(text.utf8)
                return bytes.indices.contains { start in
                    start + needle.count <= bytes.count && Array(bytes[start..<start + needle.count]) == needle
                }
            }
            #expect(has("dispatch_policy.tick"))
            #expect(has("dispatch_policy.policy") && has("traced"))
            #expect(has("dispatch_policy.admitted"))
            #expect(has("dispatch-policy"), "the service name")
        }
    }
}
