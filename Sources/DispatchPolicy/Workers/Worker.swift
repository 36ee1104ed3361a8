import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle
import Tracing

/// A claimed job, as a handler sees it.
public struct Job: Sendable, Equatable {
    public var id: Int64
    public var policy: String
    public var queue: String
    /// The job arguments as JSON text.
    public var argsJSON: String
    /// The job context as JSON text.
    public var contextJSON: String
    /// Which attempt this is (1 for the first): the fencing token every
    /// worker call of this attempt carries.
    public var attempt: Int
    public var leaseExpiresAt: Date
    /// The lease the job was admitted with; heartbeats renew it by this much.
    public var leaseSeconds: Int

    /// The arguments decoded into `T`.
    public func args<T: Decodable>(as type: T.Type = T.self) throws -> T {
        try JSONDecoder().decode(T.self, from: Data(argsJSON.utf8))
    }
}

/// Thrown by a handler whose downstream said "not now" (an HTTP 429 with
/// Retry-After, a maintenance window): the job goes back to staging until
/// `until` without counting an attempt (`dispatch_policy.defer`), its slots
/// are released, and nothing is reported as a failure. With
/// `pausePartition`, the job's throttle partitions are paused until then
/// too, so its partition's other jobs wait as well; the pause ends by
/// itself.
///
/// `until` is at most 30 days away (`FieldLimits.deferUntil`), `reason` 1
/// to 1024 characters (`FieldLimits.deferReason`); the server refuses
/// others (SQLSTATE 22023), and the attempt is then failed with that error.
/// An `until` that has passed by the time the worker reports the deferral
/// (a report delayed by a loaded machine, or a date in the past) defers the
/// job to the server's now: it is eligible again at once, still without
/// counting an attempt.
///
/// ```swift
/// worker.register("send_webhook") { job in
///     let response = try await post(job)
///     if response.status == 429 { throw Defer(for: .seconds(response.retryAfter), reason: "429 from the endpoint", pausePartition: true) }
/// }
/// ```
public struct Defer: Error, Sendable, Equatable {
    public var until: Date
    public var reason: String
    public var pausePartition: Bool

    public init(until: Date, reason: String, pausePartition: Bool = false) {
        self.until = until
        self.reason = reason
        self.pausePartition = pausePartition
    }

    /// Deferred for `delay` from now.
    public init(for delay: Duration, reason: String, pausePartition: Bool = false) {
        let (seconds, attoseconds) = delay.components
        self.init(
            until: Date().addingTimeInterval(Double(seconds) + Double(attoseconds) / 1e18), reason: reason,
            pausePartition: pausePartition)
    }
}

/// How a ``Worker`` claims and runs jobs.
public struct WorkerOptions: Sendable {
    /// Queues to claim from, in turn.
    public var queues: [String] = ["default"]
    /// Recorded on claimed jobs (`admitted_jobs.worker`).
    public var name: String = "\(ProcessInfo.processInfo.hostName):\(getpid())"
    /// Jobs run at once.
    public var concurrency: Int = 4
    /// How long to wait for work before claiming again (cut short by NOTIFY).
    public var pollInterval: Duration = .seconds(1)
    /// How often to extend the lease of a running job; nil (the default): a
    /// third of the job's lease. Whatever it is, a handler whose lease was
    /// not confirmed in time is cancelled before the lease runs out.
    public var heartbeatInterval: Duration?
    /// Delay before a failed job is retried; nil uses the exponential backoff.
    public var retryIn: Duration?
    /// Server settings of the worker's sessions (see ``SessionSettings``).
    public var session = SessionSettings.worker
    /// The longest a connection attempt may take.
    public var connectTimeout: Duration = .seconds(10)
    /// The longest the worker waits for a claim or an outcome call before it
    /// takes the session for lost, closes it and reconnects: the session's
    /// statement timeout (30 s) plus 5 s by default.
    public var callTimeout: Duration?
    /// How often the worker reports itself alive in `dispatch_policy.processes`.
    public var reportInterval: Duration = .seconds(60)
    /// Where outcomes are counted (``DispatchPolicyMetrics``).
    public var metrics = DispatchPolicyMetrics()

    var boundedCallTimeout: Duration { callTimeout ?? (session.statementTimeout ?? .seconds(30)) + .seconds(5) }

    public init() {}
}

/// Runs jobs of the built-in ready queue: claims jobs of the policies it has
/// handlers for, with bounded concurrency, runs the handler, heartbeats,
/// completes them, or fails them when the handler throws (the job is then
/// retried through admission, or dead after `max_attempts`).
///
/// Every call about a job carries its attempt, so a worker whose lease ran
/// out can never complete, fail or extend the attempt another worker now
/// runs. The worker heartbeats at a third of the job's lease and cancels the
/// handler when the lease is lost (the server says the attempt is no longer
/// current) or when it could not renew the lease before it runs out: with a
/// concurrency cap of 1, two handlers of one partition never run at once —
/// provided handlers honour cancellation (one that ignores it runs on past
/// its lease).
///
/// A swift-service-lifecycle `Service`: on graceful shutdown it stops
/// claiming and returns once the running jobs have finished.
///
/// ```swift
/// var worker = Worker(connection: settings, logger: logger)
/// worker.register("send_webhook") { job in
///     let event = try job.args(as: WebhookEvent.self)
///     try await deliver(event)
/// }
/// ```
public struct Worker: Service {
    public typealias Handler = @Sendable (Job) async throws -> Void

    /// The settings its sessions are opened with; nil when it uses the
    /// application's pool.
    public var connection: ConnectionSettings? { source.settings }
    private let source: ManagedConnection.Source
    public var options: WorkerOptions
    public let logger: Logger
    private var handlers: [String: Handler] = [:]

    public init(connection: ConnectionSettings, options: WorkerOptions = WorkerOptions(), logger: Logger) {
        self.source = .settings(connection)
        self.options = options
        self.logger = logger
    }

    /// A worker on the application's pool, which must be running
    /// (`client.run()`, or in the same `ServiceGroup`). Claims, heartbeats
    /// and outcomes each lease a connection for the call; only the LISTEN
    /// for admitted jobs keeps one. Size the pool for the LISTEN, a claim,
    /// and the heartbeats and outcomes of `concurrency` jobs at once (they
    /// wait for a connection otherwise, within their timeouts).
    /// `options.session` is not applied: the pool's configuration sets its
    /// sessions' parameters (see ``SessionSettings/parameters``).
    public init(client: any ConnectionPool, options: WorkerOptions = WorkerOptions(), logger: Logger) {
        self.source = .pool(client)
        self.options = options
        self.logger = logger
    }

    /// Runs `handler` for jobs of `policy`. The worker claims only jobs of
    /// policies it has a handler for.
    public mutating func register(_ policy: String, _ handler: @escaping Handler) {
        handlers[policy] = handler
    }

    public func run() async throws {
        // Claims, outcomes and notifications each have a session: a claim
        // never queues behind completions that wait on a counter row the tick
        // holds, which would idle the worker while admitted jobs wait. Each
        // session is reopened with backoff when it is lost (ManagedConnection).
        // On a pool, each call leases a connection of its own instead.
        let source: ManagedConnection.Source =
            switch self.source {
            case .settings(let settings): .settings(settings.with(session: options.session))
            case .pool: self.source
            }
        let claimer = ManagedConnection(source, role: "worker claims", logger: logger, connectTimeout: options.connectTimeout)
        let reporter = ManagedConnection(source, role: "worker outcomes", logger: logger, connectTimeout: options.connectTimeout)
        let listener = ManagedConnection(source, role: "worker notifications", logger: logger, connectTimeout: options.connectTimeout)
        await loop(claimer: claimer, reporter: reporter, listener: listener)
        if !Task.isCancelled { await claimer.forgetProcess(name: options.name) }
        for db in [claimer, reporter, listener] { await db.close() }
    }

    private func loop(claimer: ManagedConnection, reporter: ManagedConnection, listener: ManagedConnection) async {
        let wake = WakeSignal()
        // Handlers running (what `concurrency` bounds), and jobs claimed whose
        // outcome is not recorded yet: when outcomes cannot be recorded, the
        // worker stops claiming after one more round instead of running jobs
        // whose completion is lost.
        let running = Gauge()
        let unreported = Gauge()
        let completions = CompletionBatcher()
        let queues = Set(options.queues)
        let policies = handlers.keys.sorted()
        if policies.isEmpty {
            logger.warning("worker has no handlers registered: it claims nothing")
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                // Without notifications the worker still polls every pollInterval.
                await NotificationListener(connection: listener, channels: ["dispatch_policy_admitted"], logger: logger).run {
                    channel, payload in
                    if channel == nil || queues.contains(payload) { await wake.signal() }
                }
            }
            group.addTask {
                // Runs until the jobs have drained and the group is cancelled.
                await completions.run(db: reporter, timeout: options.boundedCallTimeout, logger: logger)
            }
            let startedAt = Date()
            await withDiscardingTaskGroup { jobs in
                var next = 0
                var lastReport: ContinuousClock.Instant?
                var reportedReconnects = 0
                while !Task.isCancelled && !Task.isShuttingDownGracefully {
                    let reconnects = await claimer.reconnects + reporter.reconnects + listener.reconnects
                    if reconnects != reportedReconnects || lastReport.map({ ContinuousClock.now - $0 >= options.reportInterval }) ?? true {
                        await claimer.reportAlive(name: options.name, kind: "worker", startedAt: startedAt, others: [reporter, listener])
                        lastReport = .now
                        reportedReconnects = reconnects
                    }
                    var free = min(
                        options.concurrency - (await running.value),
                        2 * options.concurrency - (await unreported.value))
                    var claimedAny = false
                    var tried = 0
                    while free > 0 && tried < options.queues.count && !policies.isEmpty {
                        let queue = options.queues[next % options.queues.count]
                        next += 1
                        tried += 1
                        let claimed: [(job: Job, sentAt: ContinuousClock.Instant)]
                        do {
                            let sentAt = ContinuousClock.now
                            let want = free
                            claimed = try await claimer.run("claiming jobs", timeout: options.boundedCallTimeout) { conn in
                                try await claim(conn, queue: queue, max: want, policies: policies)
                            }.map { ($0, sentAt) }
                        } catch {
                            // A lost session was logged by ManagedConnection; the next
                            // round reconnects (with backoff). A claim in flight when it
                            // was lost is rolled back: its jobs stay admitted, unclaimed.
                            if DispatchPolicyError.from(error).code != .connectionLost {
                                logger.warning("claim failed", metadata: ["worker.queue": "\(queue)", "error": "\(error)"])
                            }
                            break
                        }
                        for (job, sentAt) in claimed {
                            claimedAny = true
                            free -= 1
                            await running.add(1)
                            await unreported.add(1)
                            jobs.addTask {
                                // The slot frees when the handler ends, not when its outcome
                                // is recorded: completions queue on the connection, and a slot
                                // held through that queue idles the worker while jobs wait.
                                await process(job, claimedAt: sentAt, conn: reporter, completions: completions) {
                                    await running.add(-1)
                                    await wake.signal()
                                }
                                await unreported.add(-1)
                                await wake.signal()
                            }
                        }
                    }
                    if !claimedAny || free == 0 {
                        var pause = options.pollInterval
                        if let retryAt = await claimer.retryAt { pause = min(pause, max(retryAt - .now, .milliseconds(1))) }
                        await withGracefulShutdownHandler {
                            await wake.wait(upTo: pause)
                        } onGracefulShutdown: {
                            Task { await wake.signal() }
                        }
                    }
                }
                // Leaving the discarding group waits for the running jobs: the drain.
            }
            group.cancelAll()
        }
    }

    private func claim(_ conn: PostgresConnection, queue: String, max: Int, policies: [String]) async throws -> [Job] {
        let limit = FieldLimits.claimMax.clampInt(Double(max))
        return try await conn.rows(
            """
            SELECT id, policy, queue, args::text, context::text, attempt, lease_expires_at, lease_seconds
            FROM dispatch_policy.claim(\(queue), \(options.name), \(limit)::integer, policies => \(policies)::text[])
            """,
            logger: logger
        ).map { row in
            let (id, policy, queue, args, context, attempt, expires, lease) =
                try row.decode((Int64, String, String, String, String, Int, Date, Int).self)
            return Job(
                id: id, policy: policy, queue: queue, argsJSON: args, contextJSON: context, attempt: attempt,
                leaseExpiresAt: expires, leaseSeconds: lease)
        }
    }

    /// How a handler run ended.
    enum Outcome {
        case finished(Result<Void, any Error>)
        /// The lease is gone: the server moved on, or it could not be renewed
        /// in time. The handler was cancelled; nothing is reported.
        case leaseLost(String)
    }

    /// Runs a job's handler under its lease guard, calls `handlerEnded`,
    /// then records the outcome.
    private func process(
        _ job: Job, claimedAt: ContinuousClock.Instant, conn: ManagedConnection, completions: CompletionBatcher,
        handlerEnded: () async -> Void
    ) async {
        let log = {
            var log = logger
            log[metadataKey: "job.id"] = "\(job.id)"
            log[metadataKey: "job.attempt"] = "\(job.attempt)"
            log[metadataKey: "policy.name"] = "\(job.policy)"
            return log
        }()
        guard let handler = handlers[job.policy] else {  // claim is filtered by these policies
            await handlerEnded()
            return
        }
        let lease = Duration.seconds(max(job.leaseSeconds, 1))
        // At least 10 ms apart, whatever heartbeatInterval says.
        let interval = max(options.heartbeatInterval ?? lease / 3, .milliseconds(10))
        // A heartbeat waits this long at most for its job's row (a session
        // holding it locked): heartbeats share a connection, and one waiting
        // on its row would hold back every other job's.
        let lockWait = min(interval / 2, .seconds(1))
        let lockTimeout = "\(lockWait.settingMilliseconds)ms"
        // Stop a little before the lease runs out: the reaper may hand the job
        // to another worker right after it does.
        let margin = min(lease / 20, .milliseconds(250))
        // A claim that took longer than the lease (a slow server): the job
        // may already be reaped and admitted again; do not start it.
        if ContinuousClock.now >= claimedAt + lease - margin {
            await handlerEnded()
            log.warning("lease ran out before the handler started: not run")
            return
        }
        let outcome: Outcome = await withTaskGroup(of: Outcome?.self) { group in
            group.addTask {
                do {
                    // A span per attempt (a no-op unless a tracer is bootstrapped);
                    // an error thrown by the handler is recorded on it.
                    try await withSpan("dispatch_policy.job", ofKind: .consumer) { span in
                        span.attributes["dispatch_policy.policy"] = job.policy
                        span.attributes["dispatch_policy.queue"] = job.queue
                        span.attributes["dispatch_policy.job.id"] = Int(job.id)
                        span.attributes["dispatch_policy.job.attempt"] = job.attempt
                        try await handler(job)
                    }
                    return .finished(.success(()))
                } catch {
                    return .finished(.failure(error))
                }
            }
            group.addTask {
                // The lease guard: heartbeats, and the deadline they move.
                var deadline = claimedAt + lease - margin
                var nextBeat = claimedAt + interval
                while !Task.isCancelled {
                    let wakeAt = min(nextBeat, deadline)
                    do { try await Task.sleep(until: wakeAt, clock: .continuous) } catch { return nil }
                    if ContinuousClock.now >= deadline {
                        return .leaseLost("the lease could not be renewed before it ran out")
                    }
                    let sentAt = ContinuousClock.now
                    nextBeat = sentAt + interval
                    do {
                        // Bounded by the deadline: a heartbeat on a connection that
                        // died may never return, and the handler must still stop in time
                        // (the session is then closed and reopened for the next call).
                        try await conn.run("a heartbeat", timeout: deadline - sentAt, until: deadline) { conn in
                            _ = try await conn.rows(
                                """
                                SELECT dispatch_policy.heartbeat(\(job.id), attempt => \(job.attempt)::integer)
                                FROM (SELECT set_config('lock_timeout', \(lockTimeout), true)) t
                                """, logger: log)
                        }
                        deadline = sentAt + lease - margin
                    } catch is CancellationError {
                        return nil
                    } catch {
                        let wrapped = DispatchPolicyError.from(error)
                        if wrapped.sqlState == "P0002" || wrapped.sqlState == "DP001" {
                            return .leaseLost(wrapped.description)
                        }
                        log.warning("heartbeat failed; retrying", metadata: ["error": "\(wrapped)"])
                    }
                }
                return nil
            }
            var outcome: Outcome = .leaseLost("cancelled")
            if let first = await group.next(), let value = first { outcome = value }
            group.cancelAll()
            return outcome
        }
        await handlerEnded()
        switch outcome {
        case .leaseLost(let reason):
            log.warning("lease lost: the handler was cancelled and its outcome is not reported", metadata: ["reason": "\(reason)"])
        case .finished(.success):
            switch await completions.complete(id: job.id, attempt: job.attempt) {
            case .success(.completed):
                options.metrics.recordCompleted(policy: job.policy)
            case .success(.alreadyFinished):
                break
            case .success(let outcome):
                log.warning("outcome not recorded: the attempt is no longer current", metadata: ["job.outcome": "\(outcome.rawValue)"])
            case .failure(let error):
                log.error("could not record the job's outcome", metadata: ["error": "\(error)"])
            }
        case .finished(.failure(let deferral as Defer)):
            await report(job, log: log) {
                do {
                    let paused = try await conn.run("deferring a job", timeout: options.boundedCallTimeout) { conn in
                        try await conn.rows(
                            """
                            SELECT paused::text FROM dispatch_policy.defer(\(job.id),
                                                                          greatest(\(deferral.until)::timestamptz,
                                                                                   now() + interval '1 millisecond'),
                                                                          \(deferral.reason),
                                                                          pause_partition => \(deferral.pausePartition),
                                                                          attempt => \(job.attempt)::integer)
                            """,
                            logger: log
                        ).first?.decode(String?.self)
                    }
                    log.info(
                        "job deferred",
                        metadata: [
                            "job.until": "\(deferral.until)", "reason": "\(deferral.reason)", "paused": "\((paused ?? nil) ?? "-")",
                        ])
                    options.metrics.recordDeferred(policy: job.policy)
                } catch let refused as DispatchPolicyError where refused.sqlState == "22023" || refused.sqlState == "22004" {
                    // A deferral out of bounds (too far, no reason): the attempt fails with why.
                    try await fail(job, error: "defer refused: \(refused.message)", conn: conn, log: log)
                }
            }
        case .finished(.failure(let error)):
            await report(job, log: log) {
                try await fail(job, error: String(describing: error), conn: conn, log: log)
            }
        }
    }

    /// Fails the attempt: staged again after the backoff (or `retryIn`), or dead.
    private func fail(_ job: Job, error message: String, conn: ManagedConnection, log: Logger) async throws {
        let retry = options.retryIn.map { Double($0.components.seconds) + Double($0.components.attoseconds) / 1e18 }
            .map { FieldLimits.failRetryIn.clamp($0) }
        let state = try await conn.run("recording a failure", timeout: options.boundedCallTimeout) { conn in
            try await conn.rows(
                """
                SELECT dispatch_policy.fail(\(job.id), \(message),
                                            make_interval(secs => \(retry)::float8), attempt => \(job.attempt)::integer)
                """,
                logger: log
            ).first?.decode(String.self)
        }
        log.info("job failed", metadata: ["error": "\(message)", "job.state": "\(state ?? "")"])
        if let state { options.metrics.recordFailed(policy: job.policy, dead: state == "dead") }
    }

    /// Records an outcome, retrying a deadlock or serialization abort; an
    /// attempt that is no longer current is logged and dropped.
    private func report(_ job: Job, log: Logger, _ call: () async throws -> Void) async {
        var delay = Duration.milliseconds(10)
        for attempt in 1...6 {
            do {
                try await call()
                return
            } catch {
                let wrapped = DispatchPolicyError.from(error)
                if wrapped.code == .connectionLost && attempt < 6 {
                    // Retried on a new session for a few seconds; a call that did
                    // commit answers DP001 the second time, logged below.
                    try? await Task.sleep(for: .milliseconds(250) * (1 << (attempt - 1)))
                    continue
                }
                switch wrapped.sqlState {
                case "40P01" where attempt < 6, "40001" where attempt < 6:
                    try? await Task.sleep(for: delay)
                    delay *= 2
                case "DP001", "P0002":
                    log.warning("outcome not recorded: the attempt is no longer current", metadata: ["error": "\(wrapped)"])
                    return
                default:
                    log.error("could not record the job's outcome", metadata: ["error": "\(wrapped)"])
                    return
                }
            }
        }
    }
}

/// Completions of one worker, recorded in batches: every completion that
/// arrives while a batch is on its way to the server goes into the next one,
/// one `complete_many` call each. Under load that is one round trip and one
/// update per counter row for many jobs, instead of a queue of single calls
/// each waiting its turn for the same counter row.
actor CompletionBatcher {
    enum Outcome: String {
        case completed
        case alreadyFinished = "already_finished"
        case stale
        case notAdmitted = "not_admitted"
    }

    private typealias Reply = CheckedContinuation<Result<Outcome, DispatchPolicyError>, Never>
    private var pending: [(id: Int64, attempt: Int, reply: Reply)] = []
    private let arrived = WakeSignal()
    /// Set when `run` has returned: nothing would send a completion any more.
    private var closed = false

    /// Records a completion; returns once the batch that carried it is
    /// committed (or at once with an error when the batcher has stopped).
    func complete(id: Int64, attempt: Int) async -> Result<Outcome, DispatchPolicyError> {
        if closed {
            return .failure(
                DispatchPolicyError.from(CancellationError(), context: "the worker was cancelled before the outcome was recorded"))
        }
        return await withCheckedContinuation { reply in
            pending.append((id, attempt, reply))
            Task { await arrived.signal() }
        }
    }

    private func takeAll() -> [(id: Int64, attempt: Int, reply: Reply)] {
        defer { pending = [] }
        return pending
    }

    /// Sends batches until cancelled with nothing left to send.
    func run(db: ManagedConnection, timeout: Duration, logger: Logger) async {
        while true {
            let batch = takeAll()
            if batch.isEmpty {
                // Checked and closed with no suspension in between: a completion
                // either made it into a batch or finds the batcher closed.
                if Task.isCancelled {
                    closed = true
                    return
                }
                await arrived.wait(upTo: .milliseconds(100))
                continue
            }
            let most = FieldLimits.completeManyJobs.clampInt(.infinity)
            for start in stride(from: 0, to: batch.count, by: most) {
                let part = Array(batch[start..<min(start + most, batch.count)])
                let result = await send(part, db: db, timeout: timeout, logger: logger)
                for job in part {
                    job.reply.resume(returning: result.map { $0[job.id] ?? .notAdmitted })
                }
            }
        }
    }

    /// One complete_many call, retrying a deadlock or serialization abort.
    private func send(
        _ batch: [(id: Int64, attempt: Int, reply: Reply)], db: ManagedConnection, timeout: Duration, logger: Logger
    ) async -> Result<[Int64: Outcome], DispatchPolicyError> {
        let ids = batch.map(\.id)
        let attempts = batch.map(\.attempt)
        var delay = Duration.milliseconds(10)
        for attempt in 1...6 {
            do {
                let rows = try await db.run("recording completions", timeout: timeout) { conn in
                    try await conn.rows(
                        "SELECT id, outcome FROM dispatch_policy.complete_many(\(ids)::bigint[], \(attempts)::integer[])",
                        logger: logger
                    ).map { try $0.decode((Int64, String).self) }
                }
                var outcomes: [Int64: Outcome] = [:]
                for (id, outcome) in rows { outcomes[id] = Outcome(rawValue: outcome) ?? .notAdmitted }
                return .success(outcomes)
            } catch {
                let wrapped = DispatchPolicyError.from(error)
                // A lost session is retried on a new one, for a few seconds (a
                // server restart): complete_many of a job already completed
                // answers already_finished, so a batch that did commit is harmless.
                let lost = wrapped.code == .connectionLost
                guard attempt < 6, lost || wrapped.sqlState == "40P01" || wrapped.sqlState == "40001" else { return .failure(wrapped) }
                try? await Task.sleep(for: lost ? max(delay, .milliseconds(250)) * (1 << (attempt - 1)) : delay)
                delay *= 2
            }
        }
        return .failure(DispatchPolicyError.from(CancellationError()))
    }
}

/// A counter shared by the claim loop and the job tasks.
actor Gauge {
    private(set) var value = 0
    func add(_ delta: Int) { value += delta }
}
