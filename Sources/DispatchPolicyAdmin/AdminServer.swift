import DispatchPolicy
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import Mustache
import PostgresNIO
import Prometheus

/// The admin's request context: the client's address, for the limit of
/// failed attempts with a wrong token.
public struct AdminRequestContext: RequestContext, RemoteAddressRequestContext {
    public var coreContext: CoreRequestContextStorage
    public let remoteAddress: SocketAddress?

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.remoteAddress = source.channel.remoteAddress
    }

    /// The client's IP address ("unknown" when the channel has none).
    /// Behind a proxy every client is the proxy.
    var client: String { remoteAddress?.ipAddress ?? "unknown" }
}

/// How the admin behaves.
public struct AdminOptions: Sendable {
    /// Actions need this token (from `--token-file` or `DISPATCH_POLICY_ADMIN_TOKEN`); nil: read-only.
    public var token: String?
    /// Export per-partition series on `/metrics` (their number grows with
    /// the tenants: off by default).
    public var partitionMetrics = false
    /// At most this many partition series per scrape.
    public var partitionMetricsLimit = 1000
    /// Rows per page of the partition and dead-job lists.
    public var pageSize = 50

    public init(token: String? = nil) {
        self.token = token
    }
}

/// The admin web UI and `/metrics`, as a Hummingbird router. Every page is
/// rendered on the server from Mustache templates; tenant-chosen values
/// (partition keys, args, errors) are HTML-escaped. Actions are POST only,
/// need the admin token, and carry a CSRF field.
public struct AdminServer: Sendable {
    public let store: AdminStore
    public let options: AdminOptions
    public let registry: PrometheusCollectorRegistry
    let auth: AdminAuth
    let templates: MustacheLibrary
    let exported = ExportedGauges()
    let signIns = SignInLimiter()
    let logger: Logger

    public init(store: AdminStore, options: AdminOptions, registry: PrometheusCollectorRegistry, logger: Logger) throws {
        self.store = store
        self.options = options
        self.registry = registry
        self.auth = try AdminAuth(token: options.token)
        self.templates = try Templates.library()
        self.logger = logger
    }

    public func router() -> Router<AdminRequestContext> {
        let router = Router(context: AdminRequestContext.self)
        router.add(middleware: SecurityHeaders())
        router.get("/") { request, _ in try await self.page(request) { session in try await self.overview(session) } }
        router.get("/policies/:name") { request, context in
            let name = try context.parameters.require("name")
            return try await self.page(request) { session in try await self.policy(name, request: request, session: session) }
        }
        router.get("/jobs") { request, _ -> Response in
            guard let text = Self.query(request).value("id"), let id = Int64(text.trimmingCharacters(in: .whitespaces)) else {
                return redirect("/", flashError: "A job id is a whole number.")
            }
            return redirect("/jobs/\(id)")
        }
        router.get("/jobs/:id") { request, context in
            let text = try context.parameters.require("id")
            return try await self.page(request) { session in try await self.job(text, session: session) }
        }
        router.get("/dead") { request, _ in try await self.page(request) { session in try await self.dead(request, session: session) } }
        router.get("/login") { request, _ in
            try await self.page(request) { session in
                guard self.auth.actionsEnabled else { throw PageError(.notFound, "Actions are off: start the admin with --allow-actions.") }
                return ("login", ["title": "Sign in"])
            }
        }
        router.post("/login") { request, context in try await self.login(request, client: context.client) }
        router.post("/logout") { request, _ in try await self.logout(request) }
        router.post("/actions/:action") { request, context in
            let action = try context.parameters.require("action")
            return try await self.act(action, request: request, client: context.client)
        }
        router.get("/assets/admin.css") { _, _ in Self.asset(Assets.css, type: "text/css; charset=utf-8") }
        router.get("/assets/admin.js") { _, _ in Self.asset(Assets.js, type: "text/javascript; charset=utf-8") }
        router.get("/metrics") { _, _ in await self.metrics() }
        router.get("/healthz") { _, _ in await self.databaseHealth() }
        return router
    }

    /// Only `/metrics` and `/healthz`, for `dispatch-policy run --metrics`.
    /// With `health` (the runner's), `/healthz` answers for the runner:
    /// 200 while its session is open and its last pass is recent, else 503
    /// with the reason. Without, it answers for the database, as the admin's.
    public func metricsRouter(health: RunnerHealth? = nil) -> Router<BasicRequestContext> {
        let router = Router()
        router.get("/metrics") { _, _ in await self.metrics() }
        router.get("/healthz") { _, _ -> Response in
            guard let health else { return await self.databaseHealth() }
            let verdict = health.verdict()
            return Self.health(verdict.healthy ? nil : verdict.reason)
        }
        return router
    }

    /// How long `/healthz` waits for the database's `SELECT 1`.
    public static let healthProbeBound: Duration = .seconds(2)

    /// 200 `ok` when the database answers `SELECT 1` within
    /// ``healthProbeBound``, else 503 with the reason.
    func databaseHealth() async -> Response {
        Self.health(await DatabaseProbe.check(store.executor, within: Self.healthProbeBound, logger: logger))
    }

    /// 200 `ok`, or 503 and the reason (one line).
    static func health(_ failure: String?) -> Response {
        Response(
            status: failure == nil ? .ok : .serviceUnavailable, headers: [.contentType: "text/plain; charset=utf-8"],
            body: .init(byteBuffer: ByteBuffer(string: (failure.map(DispatchPolicyError.oneLine) ?? "ok") + "\n")))
    }

    /// `host:port`, `[v6]:port` or `:port` (all interfaces) as a bind address.
    public static func parseBind(_ text: String) -> (host: String, port: Int)? {
        var host: Substring
        var portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else { return nil }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            if host.contains(":") { return nil }
        }
        if host.isEmpty { host = "0.0.0.0" }
        guard let port = Int(portText), (0...65_535).contains(port), portText.allSatisfy(\.isASCII) else { return nil }
        return (String(host), port)
    }

    // MARK: Page plumbing

    struct Session {
        var signedIn: Bool
        var canSignIn: Bool
        var csrf: String?
        var flash: String?
        var flashError: String?
    }

    struct PageError: Error {
        var status: HTTPResponse.Status
        var message: String
        init(_ status: HTTPResponse.Status, _ message: String) {
            self.status = status
            self.message = message
        }
    }

    func session(_ request: Request) -> Session {
        let cookie = request.cookies[AdminAuth.sessionCookie]?.value
        let signedIn = auth.acceptsSession(cookie)
        let query = Self.query(request)
        // Only messages this admin signed: a link with a made-up message shows nothing.
        let signature = query.value("sig")
        func signed(_ name: String) -> String? {
            guard let text = query.value(name), auth.acceptsFlash(name + ":" + text, signature: signature) else { return nil }
            return String(text.prefix(300))
        }
        return Session(
            signedIn: signedIn, canSignIn: auth.actionsEnabled && !signedIn,
            csrf: signedIn ? cookie.flatMap { auth.csrfValue(session: $0) } : nil,
            flash: signed("flash"), flashError: signed("error"))
    }

    func page(_ request: Request, _ build: (Session) async throws -> (String, [String: Any])) async throws -> Response {
        let started = ContinuousClock.now
        let session = session(request)
        var status = HTTPResponse.Status.ok
        var template: String
        var values: [String: Any]
        do {
            (template, values) = try await build(session)
        } catch let error as PageError {
            (status, template, values) = (
                error.status, "error",
                ["title": "\(error.status.code)", "status": "\(error.status.code) \(error.status.reasonPhrase)", "message": error.message]
            )
        } catch {
            let wrapped = DispatchPolicyError.from(error)
            logger.warning("admin page failed", metadata: ["path": "\(request.uri.path)", "error": "\(wrapped)"])
            (status, template, values) = (
                .serviceUnavailable, "error",
                [
                    "title": "Unavailable", "status": "503 Service Unavailable",
                    "message": "The database did not answer: \(wrapped.description)",
                ]
            )
        }
        values["session"] = ["signedIn": session.signedIn, "canSignIn": session.canSignIn, "csrf": session.csrf ?? ""] as [String: Any]
        if let flash = session.flash { values["flash"] = flash }
        if let flashError = session.flashError { values["flashError"] = flashError }
        values["renderedAt"] = Self.timeFormatter.string(from: Date())
        let elapsed = ContinuousClock.now - started
        values["renderMs"] = "\(elapsed.components.seconds * 1000 + elapsed.components.attoseconds / 1_000_000_000_000_000)"
        let html = templates.render(values, withTemplate: template) ?? "template \(template) missing"
        return Response(
            status: status, headers: [.contentType: "text/html; charset=utf-8", .cacheControl: "no-store"],
            body: .init(byteBuffer: ByteBuffer(string: html)))
    }

    /// The query string, decoded as a browser's form encodes it ('+' is a
    /// space); a query that cannot be decoded counts as none.
    static func query(_ request: Request) -> FormFields {
        // PostgreSQL text holds no NUL: a query string with one counts as none.
        request.uri.query.flatMap { FormFields($0) }.flatMap { $0.containsNUL ? nil : $0 } ?? FormFields("")!
    }

    static func asset(_ text: String, type: String) -> Response {
        Response(
            status: .ok, headers: [.contentType: type, .cacheControl: "max-age=300"], body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    /// A 303 to `location`, with a message to show there (signed, so only
    /// this admin's own messages are shown).
    func redirect(_ location: String, flash: String? = nil, flashError: String? = nil) -> Response {
        var target = location
        var items: [URLQueryItem] = []
        if let flash {
            items.append(URLQueryItem(name: "flash", value: flash))
            items.append(URLQueryItem(name: "sig", value: auth.flashSignature("flash:" + flash)))
        } else if let flashError {
            items.append(URLQueryItem(name: "error", value: flashError))
            items.append(URLQueryItem(name: "sig", value: auth.flashSignature("error:" + flashError)))
        }
        if !items.isEmpty {
            var components = URLComponents()
            components.queryItems = items
            target += (target.contains("?") ? "&" : "?") + (components.percentEncodedQuery ?? "")
        }
        return Response(status: .seeOther, headers: [.location: target])
    }

    static let timeFormatter: DateFormatter = {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyy-MM-dd HH:mm:ss"
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.locale = Locale(identifier: "en_US_POSIX")
        return formatter
    }()

    static func time(_ date: Date?) -> String { date.map { timeFormatter.string(from: $0) } ?? "-" }

    static func path(_ segment: String) -> String {
        segment.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/?#"))) ?? segment
    }

    static func query(_ pairs: [(String, String)]) -> String {
        var components = URLComponents()
        components.queryItems = pairs.map { URLQueryItem(name: $0.0, value: $0.1) }
        return components.percentEncodedQuery ?? ""
    }

    // MARK: Pages

    func overview(_ session: Session) async throws -> (String, [String: Any]) {
        let policies = try await store.policies()
        let since = Date().addingTimeInterval(-3600)
        let minutes = try await store.recentMinutes(since: since)
        let pending = try await store.pendingMinutes(since: since)
        let limits = try await store.limits(minutes: minutes)
        var rows: [[String: Any]] = []
        for policy in policies {
            let limit = limits[policy.name]
            let finished = policy.completed24h + policy.failed24h
            let headroom: String
            if let cap = limit?.globalCap, let inFlight = limit?.globalInFlight {
                headroom = "\(max(Int64(cap) - inFlight, 0)) of \(Format.number(cap)) (global)"
            } else {
                headroom = "per partition"
            }
            let samples = minutes[policy.name] ?? []
            rows.append([
                "name": policy.name, "urlName": Self.path(policy.name),
                "state": policy.paused ? "paused" : (policy.tickFailures ?? 0) > 0 ? "failing" : policy.isShadow ? "shadow" : "active",
                "pending": policy.pending, "scheduled": policy.scheduled, "inFlight": policy.inFlight, "admitted24h": policy.admitted24h,
                "completed24h": policy.completed24h, "failed24h": policy.failed24h,
                "failurePercent": finished > 0 ? String(format: "%.1f %%", Double(policy.failed24h) * 100 / Double(finished)) : "-",
                "dead": policy.dead, "expired24h": policy.expired24h, "dropped24h": policy.dropped24h,
                "deferred24h": policy.deferred24h, "throughput": Format.number((policy.throughputPerMinute * 10).rounded() / 10),
                "lagP50": policy.lagP50ms.map(Format.milliseconds) ?? "-", "lagP95": policy.lagP95ms.map(Format.milliseconds) ?? "-",
                "oldest": policy.oldestPendingSeconds.map(Format.seconds) ?? "-", "headroom": headroom,
                "trend": Chart.sparkline(samples.map(Self.point), label: "completions and lag of \(policy.name), last hour"),
                "pendingTrend": Chart.pendingLine(pending[policy.name] ?? [], label: "pending jobs of \(policy.name), last hour"),
                "hints": Hints.of(policy, limits: limit),
            ])
        }
        return ("overview", ["title": "Policies", "policies": rows])
    }

    static func point(_ sample: AdminStore.MinuteSample) -> Chart.Point {
        Chart.Point(minute: sample.minute, completed: sample.completed, failed: sample.failed, avgLagMs: sample.avgLagMs)
    }

    func policy(_ name: String, request: Request, session: Session) async throws -> (String, [String: Any]) {
        guard let detail = try await store.policy(name) else { throw PageError(.notFound, "No policy named \(name).") }
        let query = Self.query(request)
        let search = query.value("q").map { String($0.prefix(200)) }
        let onlyBusy = query.value("busy") == "1"
        let onlyPending = query.value("pending") == "1"
        let sort = query.value("sort").flatMap(AdminStore.PartitionSort.init(rawValue:)) ?? .partition
        let after = query.value("after").flatMap { AdminStore.PartitionCursor(token: $0) }
        let watch = Array(query.values("watch").map { String($0.prefix(1024)) }.prefix(50))
        let since = Date().addingTimeInterval(-3600)
        let pageSize = options.pageSize

        let overview = try await store.policies(only: name).first
        let samples = try await store.recentMinutes(only: name, since: since)[name] ?? []
        let limits = try await store.limits(only: name, minutes: [name: samples])[name]
        let partitions = try await store.partitions(
            policy: name, search: search, sort: sort, after: after, onlyBusy: onlyBusy, onlyPending: onlyPending, limit: pageSize + 1)
        let watched =
            watch.isEmpty
            ? []
            : try await store.partitions(
                policy: name, search: nil, after: nil, onlyBusy: false, only: watch, limit: 200)
        let laneAfter = query.value("lane_after").map { String($0.prefix(1024)) }
        let lanes = try await store.lanes(policy: name, search: nil, after: laneAfter, limit: pageSize + 1)

        let actions: [String: Any]? =
            session.signedIn
            ? [
                "csrf": session.csrf ?? "", "pauseAction": detail.paused ? "resume" : "pause",
                "pauseLabel": detail.paused ? "Resume" : "Pause",
            ]
            : nil
        let shown = Array(partitions.prefix(pageSize)) + watched
        // Shadow mode (or back from it, with would-refusals still on record):
        // the partitions show what the gates would have refused.
        let shadow = overview?.isShadow == true || shown.contains { $0.wouldRefuse != nil }
        let sparks = try await store.minutes(policy: name, partitions: shown.map { ($0.gate, $0.partition) }, since: since)
        func row(_ partition: AdminStore.PartitionRow) -> [String: Any] {
            let spark = sparks[partition.gate]?[partition.partition] ?? []
            var values: [String: Any] = [
                "gate": partition.gate, "gateType": partition.gateType, "partition": partition.partition, "inFlight": partition.inFlight,
                "cap": Format.number(partition.cap),
                "tokens": partition.tokens.map { t in
                    partition.burst.map { "\(Format.number((t * 10).rounded(.down) / 10)) / \(Format.number($0))" } ?? Format.number(t)
                } ?? "-",
                "ewma": partition.ewmaLagMs.map(Format.milliseconds) ?? "-", "lastAdmitted": Self.time(partition.lastAdmitted),
                "pending": partition.pending, "lastStaged": Self.time(partition.lastStaged),
                "spark": Chart.sparkline(spark.map(Self.point), label: "completions and lag of \(partition.partition), last hour"),
                "paused": partition.paused, "policy": name, "shadow": shadow,
                "wouldRefuse": partition.wouldRefuse.map { "\($0)" } ?? "-",
            ]
            if let lag = partition.wouldBeLagSeconds { values["wouldBeLag"] = Format.seconds(lag) + " behind" }
            // Actions only where they can work: a partitioned gate's partition.
            if session.signedIn && partition.partitioned {
                values["actions"] =
                    [
                        "csrf": session.csrf ?? "", "pauseAction": partition.paused ? "resume" : "pause",
                        "pauseLabel": partition.paused ? "Resume" : "Pause",
                    ] as [String: Any]
            }
            return values
        }
        var partitionRows: [[String: Any]] = []
        for partition in partitions.prefix(pageSize) { partitionRows.append(row(partition)) }
        var watchedRows: [[String: Any]] = []
        for partition in watched { watchedRows.append(row(partition)) }

        var values: [String: Any] = [
            "title": name, "name": name, "urlName": Self.path(name),
            "state": detail.paused ? "paused" : overview?.isShadow == true ? "shadow" : "active", "shadow": shadow,
            "shadowMode": overview?.isShadow == true,
            "hints": overview.map { Hints.of($0, limits: limits) } ?? [],
            "chart": Chart.svg(samples.map(Self.point), label: "completions per minute and average queue lag of \(name), last hour"),
            "partitions": partitionRows, "watched": watchedRows, "watchParams": watch, "query": search ?? "",
            "onlyBusy": onlyBusy, "onlyPending": onlyPending, "sortPartition": sort == .partition, "sortInFlight": sort == .inFlight,
            "gates": detail.gates.map { ["name": $0.name, "type": $0.type, "partitionBy": $0.partitionBy ?? "-"] },
            "config": detail.configJSON,
            "lanes": lanes.prefix(pageSize).map { lane -> [String: Any] in
                var blocked = "-"
                if let until = lane.blockedUntil {
                    blocked =
                        until == .distantFuture || until.timeIntervalSince1970 > 1e11
                        ? "until \(lane.blockedGate ?? "a gate") [\(lane.blockedPartition ?? "")] frees a slot"
                        : "until \(Self.time(until)) UTC" + (lane.blockedGate.map { " (\($0))" } ?? "")
                }
                return [
                    "lane": lane.lane ?? "(jobs without a key)",
                    "pending": lane.pending > AdminStore.laneCountCap ? "\(AdminStore.laneCountCap)+" : "\(lane.pending)",
                    "blocked": blocked,
                ]
            },
        ]
        if let actions { values["actions"] = actions }
        if partitions.count > pageSize, let last = partitions.prefix(pageSize).last {
            var pairs: [(String, String)] = [
                ("sort", sort.rawValue),
                ("after", AdminStore.PartitionCursor(gate: last.gate, partition: last.partition, inFlight: last.inFlight).token),
            ]
            if let search { pairs.append(("q", search)) }
            if onlyBusy { pairs.append(("busy", "1")) }
            if onlyPending { pairs.append(("pending", "1")) }
            pairs += watch.map { ("watch", $0) }
            values["next"] = "/policies/\(Self.path(name))?\(Self.query(pairs))"
        }
        if lanes.count > pageSize, let last = lanes.prefix(pageSize).last, let key = last.lane {
            values["lanesNext"] = "/policies/\(Self.path(name))?\(Self.query([("lane_after", key)] + watch.map { ("watch", $0) }))"
        }
        return ("policy", values)
    }

    func job(_ text: String, session: Session) async throws -> (String, [String: Any]) {
        guard let id = Int64(text) else { throw PageError(.badRequest, "A job id is a whole number.") }
        guard let job = try await store.job(id) else {
            throw PageError(.notFound, "No job \(id): never staged, or pruned after it completed.")
        }
        let explanation = try await store.explain(id)
        let failures = try await store.failures(job: id)
        var timeline: [(Date, String)] = []
        if let at = job.createdAt { timeline.append((at, "staged")) }
        if let at = job.notBefore { timeline.append((at, "eligible (not_before)")) }
        for failure in failures { timeline.append((failure.failedAt, "attempt \(failure.attempt) failed")) }
        if let at = job.admittedAt { timeline.append((at, "admitted (attempt \(job.attempt))")) }
        if let at = job.startedAt { timeline.append((at, "started by a worker")) }
        if let at = job.finishedAt { timeline.append((at, job.state)) }
        var values: [String: Any] = [
            "title": "Job \(id)", "id": id, "state": job.state, "policy": job.policy, "urlPolicy": Self.path(job.policy),
            "queue": job.queue,
            "attempt": job.attempt, "args": job.argsJSON, "context": job.contextJSON,
            "explain": explanation.rows.map { row -> [String: Any] in
                [
                    "verdict": row.verdict, "aspect": row.aspect, "gate": row.gate ?? "", "partition": row.partition ?? "",
                    "explanation": row.explanation, "wait": row.waitSeconds.map(Format.seconds) ?? "",
                ]
            },
            "partitions": job.partitions.map { ["gate": $0.gate, "partition": $0.partition] },
            "timeline": timeline.sorted { $0.0 < $1.0 }.map { ["at": Self.time($0.0), "what": $0.1] },
            "failures": failures.map { ["attempt": $0.attempt, "at": Self.time($0.failedAt), "error": $0.error] as [String: Any] },
        ]
        if let key = job.dedupeKey { values["dedupeKey"] = key }
        if let key = job.roundRobinKey { values["roundRobinKey"] = key }
        if session.signedIn {
            values["actions"] =
                [
                    "csrf": session.csrf ?? "", "canCancel": job.state == "pending" || job.state == "scheduled",
                    "canRetry": job.state == "dead",
                ] as [String: Any]
        }
        return ("job", values)
    }

    func dead(_ request: Request, session: Session) async throws -> (String, [String: Any]) {
        let query = Self.query(request)
        let policy = query.value("policy").flatMap { $0.isEmpty ? nil : $0 }
        var before: (Date, Int64)?
        if let text = query.value("before") {
            let parts = text.split(separator: "_")
            if parts.count == 2, let micros = Int64(parts[0]), let id = Int64(parts[1]) {
                before = (Date(timeIntervalSince1970: Double(micros) / 1e6), id)
            }
        }
        let jobs = try await store.deadJobs(policy: policy, before: before, limit: options.pageSize + 1)
        var values: [String: Any] = [
            "title": "Dead jobs",
            "jobs": jobs.prefix(options.pageSize).map { job -> [String: Any] in
                var row: [String: Any] = [
                    "id": job.id, "policy": job.policy, "attempts": job.attempt, "at": Self.time(job.finishedAt),
                    "error": job.lastError.map { String($0.prefix(500)) } ?? "",
                ]
                if session.signedIn { row["actions"] = ["csrf": session.csrf ?? ""] }
                return row
            },
        ]
        if let policy { values["policy"] = policy }
        if jobs.count > options.pageSize, let last = jobs.prefix(options.pageSize).last {
            let micros = Int64((last.finishedAt.timeIntervalSince1970 * 1e6).rounded(.down))
            var pairs = [("before", "\(micros)_\(last.id)")]
            if let policy { pairs.append(("policy", policy)) }
            values["next"] = "/dead?\(Self.query(pairs))"
        }
        return ("dead", values)
    }

    // MARK: Sign-in and actions

    static let maximumFormBytes = 16 * 1024

    /// The fields of a form body (application/x-www-form-urlencoded); a
    /// body that is not one gives a 400, never a crash.
    func form(_ request: Request) async throws -> [String: String] {
        let body = try await request.body.collect(upTo: Self.maximumFormBytes)
        guard let fields = FormFields(String(buffer: body)) else {
            throw HTTPError(.badRequest, message: "The body is not a form (application/x-www-form-urlencoded).")
        }
        return fields.first
    }

    /// 429 while `client` has failed too often (``SignInLimiter``).
    func limited(_ client: String) -> Response? {
        guard let wait = signIns.retryAfter(client: client) else { return nil }
        let seconds = max(1, wait.components.seconds + (wait.components.attoseconds > 0 ? 1 : 0))
        return Response(
            status: .tooManyRequests, headers: [.contentType: "text/plain; charset=utf-8", .retryAfter: "\(seconds)"],
            body: .init(byteBuffer: ByteBuffer(string: "Too many failed attempts with a wrong token: try again in \(seconds) s.\n")))
    }

    func login(_ request: Request, client: String) async throws -> Response {
        guard auth.actionsEnabled else { return redirect("/", flashError: "Actions are off: start the admin with --allow-actions.") }
        if let response = limited(client) { return response }
        let fields = try await form(request)
        guard let token = fields["token"], auth.accepts(token: token), let value = auth.sessionValue() else {
            signIns.recordFailure(client: client)
            logger.warning("admin sign-in refused", metadata: ["client": "\(client)"])
            return redirect("/login", flashError: "That token is not the admin token.")
        }
        var response = redirect("/", flash: "Signed in: actions are available.")
        response.setCookie(
            Cookie(
                name: AdminAuth.sessionCookie, value: value, maxAge: Int(AdminAuth.sessionLifetime.components.seconds), path: "/",
                secure: Self.isHTTPS(request), httpOnly: true, sameSite: .strict))
        return response
    }

    /// Whether the browser reached the admin over HTTPS (through a proxy
    /// that says so): the session cookie is then marked Secure.
    static func isHTTPS(_ request: Request) -> Bool {
        if request.uri.scheme?.rawValue == "https" { return true }
        guard let name = HTTPField.Name("X-Forwarded-Proto"), let proto = request.headers[name] else { return false }
        return proto.split(separator: ",").first?.trimmingCharacters(in: .whitespaces).lowercased() == "https"
    }

    func logout(_ request: Request) async throws -> Response {
        let fields = try await form(request)
        guard auth.acceptsCSRF(fields["csrf"], session: request.cookies[AdminAuth.sessionCookie]?.value) else {
            return Self.forbidden("The form is stale or forged (CSRF check failed).")
        }
        var response = redirect("/", flash: "Signed out.")
        response.setCookie(
            Cookie(
                name: AdminAuth.sessionCookie, value: "", maxAge: 0, path: "/", secure: Self.isHTTPS(request),
                httpOnly: true, sameSite: .strict))
        return response
    }

    static func forbidden(_ message: String) -> Response {
        Response(
            status: .forbidden, headers: [.contentType: "text/plain; charset=utf-8"],
            body: .init(byteBuffer: ByteBuffer(string: message + "\n")))
    }

    /// Whether the request may act: the bearer token (scripts), or the
    /// session cookie with the CSRF field (browsers).
    func mayAct(_ request: Request, fields: [String: String]) -> Bool {
        if let token = Self.bearer(request) { return auth.accepts(token: token) }
        return auth.acceptsCSRF(fields["csrf"], session: request.cookies[AdminAuth.sessionCookie]?.value)
    }

    /// The bearer token of the request, if it sends one. The scheme is
    /// case-insensitive (RFC 9110); the token is what follows its spaces.
    static func bearer(_ request: Request) -> String? {
        guard let header = request.headers[.authorization], header.lowercased().hasPrefix("bearer ") else { return nil }
        return header.dropFirst("bearer ".count).trimmingCharacters(in: .whitespaces)
    }

    func act(_ action: String, request: Request, client: String) async throws -> Response {
        guard auth.actionsEnabled else {
            return Self.forbidden(
                "Actions are off: start the admin with --allow-actions and a token (--token-file or DISPATCH_POLICY_ADMIN_TOKEN).")
        }
        // A wrong bearer token counts as a failed sign-in of its client.
        let bearer = Self.bearer(request)
        if bearer != nil, let response = limited(client) { return response }
        let fields = try await form(request)
        guard mayAct(request, fields: fields) else {
            if bearer != nil {
                signIns.recordFailure(client: client)
                logger.warning("admin action refused: wrong bearer token", metadata: ["client": "\(client)"])
            }
            return Self.forbidden(
                "Sign in with the admin token first (or send Authorization: Bearer TOKEN); the form may be stale or forged.")
        }
        let back = request.headers[.referer].flatMap(Self.sameOriginPath) ?? "/"
        do {
            let message = try await AdminActions(store: store).run(action, fields: fields)
            logger.notice("admin action", metadata: ["action": "\(action)", "fields": "\(fields.filter { $0.key != "csrf" })"])
            return redirect(back, flash: message)
        } catch let error as AdminActions.Refusal {
            return redirect(back, flashError: error.message)
        } catch {
            let wrapped = DispatchPolicyError.from(error)
            return redirect(back, flashError: wrapped.description + (wrapped.hint.map { " " + $0 } ?? ""))
        }
    }

    /// The path and query of a same-site referer (never redirect elsewhere).
    static func sameOriginPath(_ referer: String) -> String? {
        guard let url = URLComponents(string: referer), url.path.hasPrefix("/") else { return nil }
        var path = url.percentEncodedPath
        if let items = url.queryItems?.filter({ !["flash", "error", "sig"].contains($0.name) }), !items.isEmpty {
            var components = URLComponents()
            components.queryItems = items
            path += "?" + (components.percentEncodedQuery ?? "")
        }
        return path.hasPrefix("//") ? nil : path
    }

    // MARK: Metrics

    /// The process's metrics plus per-policy gauges read now (and
    /// per-partition ones when enabled). A database that does not answer
    /// gives `dispatch_policy_up 0` and the process's own series.
    func metrics() async -> Response {
        await PolicyGauges(store: store, registry: registry, options: options, exported: exported, logger: logger).update()
        return Response(
            status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
            body: .init(byteBuffer: ByteBuffer(bytes: registry.emitToBuffer())))
    }
}

/// Content-Security-Policy and friends on every response: scripts and styles
/// from this origin only, no framing, no sniffing.
struct SecurityHeaders<Context: RequestContext>: RouterMiddleware {
    static var referrerPolicy: HTTPField.Name { HTTPField.Name("Referrer-Policy")! }
    static var frameOptions: HTTPField.Name { HTTPField.Name("X-Frame-Options")! }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var response = try await next(request, context)
        response.headers[.contentSecurityPolicy] =
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        response.headers[.xContentTypeOptions] = "nosniff"
        response.headers[Self.referrerPolicy] = "same-origin"
        response.headers[Self.frameOptions] = "DENY"
        return response
    }
}

/// Fields of an application/x-www-form-urlencoded text (a form body or a
/// query string): '&'-separated `name=value` pairs, '+' for a space,
/// percent-escapes for the rest. nil when an escape does not decode to
/// UTF-8. NUL characters are dropped (PostgreSQL text cannot hold them).
public struct FormFields: Sendable {
    public let pairs: [(name: String, value: String)]

    public init?(_ text: String) {
        var pairs: [(String, String)] = []
        for part in text.split(separator: "&", omittingEmptySubsequences: true) {
            let pieces = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let name = Self.decode(pieces[0]), let value = Self.decode(pieces.count > 1 ? pieces[1] : "") else { return nil }
            pairs.append((name, value))
        }
        self.pairs = pairs
    }

    static func decode(_ text: Substring) -> String? {
        text.replacingOccurrences(of: "+", with: " ").removingPercentEncoding?.replacingOccurrences(of: "\u{0}", with: "")
    }

    /// The first value of each name.
    public var first: [String: String] {
        var fields: [String: String] = [:]
        for (name, value) in pairs where fields[name] == nil { fields[name] = value }
        return fields
    }

    public func value(_ name: String) -> String? { pairs.first { $0.name == name }?.value }
    /// Whether a name or value holds a NUL (no PostgreSQL text can).
    public var containsNUL: Bool { pairs.contains { $0.name.contains("\u{0}") || $0.value.contains("\u{0}") } }
    public func values(_ name: String) -> [String] { pairs.filter { $0.name == name }.map(\.value) }
}
