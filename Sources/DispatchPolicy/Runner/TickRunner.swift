import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle
import Tracing

/// How a ``TickRunner`` loops.
public struct TickRunnerOptions: Sendable {
    /// Tick only these policies (default: every policy with work); reaping
    /// and pruning are restricted to them too.
    public var policies: [String]?
    /// Tick only this policy (`policies` with one element).
    public var policy: String? {
        get { policies?.first }
        set { policies = newValue.map { [$0] } }
    }
    /// One pass over the policies, then return.
    public var once = false
    /// Return after this long (cron: `--for 55s`); nil runs until shutdown.
    public var runFor: Duration?
    /// Pause after a pass that admitted something, or found a policy being
    /// ticked by another runner (its work goes on). Either pause is cut short
    /// by NOTIFY and ends when the next thing is due by the clock: a
    /// scheduled job, a lease running out, the next whole token of a
    /// throttle partition that refused jobs.
    public var busyPause: Duration = .milliseconds(50)
    /// Pause after a pass that admitted nothing.
    public var idlePause: Duration = .seconds(1)
    /// How often to reap leases of every policy and prune old rows.
    public var maintenanceInterval: Duration = .seconds(60)
    /// Completed jobs, failures and per-minute aggregates older than this are deleted.
    public var retentionSeconds: Int = FieldLimits.pruneRetention.clampInt(FieldLimits.pruneRetention.defaultValue ?? 604_800)
    /// Full buckets and empty counters untouched this long are deleted.
    public var idleGateSeconds: Int = FieldLimits.pruneIdle.clampInt(FieldLimits.pruneIdle.defaultValue ?? 3600)
    /// A policy whose tick failed is retried after this, doubling with each
    /// further failure up to ``maxFailureBackoff``; other policies keep their pace.
    public var failureBackoff: Duration = .seconds(1)
    public var maxFailureBackoff: Duration = .seconds(60)
    public var tick = TickSettings()
    /// Where ticks are counted and timed (``DispatchPolicyMetrics``).
    public var metrics = DispatchPolicyMetrics()
    /// Where the runner says whether it is connected and when its last pass
    /// completed (``RunnerHealth``; `run --metrics` serves it as `/healthz`).
    public var health = RunnerHealth()
    /// Server settings of the runner's sessions (see ``SessionSettings``).
    public var session = SessionSettings.runner
    /// How this runner is listed in `dispatch_policy.processes`.
    public var name = "\(ProcessInfo.processInfo.hostName):\(getpid()) runner"
    /// The longest a connection attempt may take.
    public var connectTimeout: Duration = .seconds(10)
    /// The longest the runner waits for one of its short calls (looking for
    /// work, bookkeeping) before it takes the session for lost, closes it
    /// and reconnects. A tick waits up to its `tick.timeout` plus
    /// ``callGrace``, pruning up to the session's statement timeout plus
    /// ``callGrace``; neither less than this.
    public var callTimeout: Duration = .seconds(30)
    /// How long after the server should have ended a statement (its
    /// statement timeout) the runner still waits for the answer.
    public var callGrace: Duration = .seconds(5)
    /// How long a run with `runFor` may go on past it: a call still waiting
    /// then is abandoned and its session closed (rolling it back).
    public var overrun: Duration = .seconds(2)

    /// A tick's statements are bounded by the server (`tick.timeout`); the
    /// client waits that plus the grace, and never less than `callTimeout`
    /// (a loaded machine can be slow to read an answer that came in time).
    var tickCallTimeout: Duration { max(callTimeout, (tick.timeout ?? session.statementTimeout ?? .seconds(300)) + callGrace) }
    var maintenanceCallTimeout: Duration { max(session.statementTimeout ?? .seconds(300) + callGrace, tickCallTimeout) }

    public init() {}
}

/// Totals of one policy over a runner's life.
public struct PolicySummary: Sendable, Equatable {
    public var policy: String
    public var ticks = 0
    public var admitted = 0
    public var reaped = 0
    public var skippedBusy = 0
    public var refusedByGate: [String: Int] = [:]
    /// The last tick found the policy in shadow mode.
    public var shadow = false
    /// Shadow mode: jobs each gate would have refused (admitted anyway).
    public var wouldRefuseByGate: [String: Int] = [:]
    /// Per throttle gate, as its last tick left it.
    public var tokens: [String: TokenSummary] = [:]
    public var duration: Duration = .zero
    /// Ticks that failed (their transaction rolled back), and the last error.
    public var failures = 0
    public var lastError: String?

    public init(policy: String) {
        self.policy = policy
    }

    mutating func add(_ result: TickResult) {
        switch result.outcome {
        case .busy: skippedBusy += 1
        case .ran:
            ticks += 1
            admitted += result.admitted
            reaped += result.reaped
            duration += result.duration
            for (gate, n) in result.refusedByGate { refusedByGate[gate, default: 0] += n }
            shadow = result.shadow
            for (gate, n) in result.wouldRefuseByGate { wouldRefuseByGate[gate, default: 0] += n }
            for (gate, summary) in result.tokens { tokens[gate] = summary }
        case .paused, .unknown: break
        }
    }

    /// One line: `webhooks: admitted 120 in 3 ticks (2.1 ms/tick); refused
    /// per_endpoint=40; tokens per_endpoint=0.4 (lowest of 2, 1 throttle-bound)`.
    /// A shadow policy's says so and what its gates would have refused:
    /// `trial: admitted 10 in 1 tick (1.2 ms/tick); shadow: would refuse
    /// concurrency=9; refused none`.
    public var line: String {
        var parts = ["\(policy): admitted \(admitted) in \(ticks) tick\(ticks == 1 ? "" : "s")"]
        if ticks > 0 {
            let ms = Double(duration.components.seconds) * 1000 + Double(duration.components.attoseconds) / 1e15
            parts[0] += String(format: " (%.1f ms/tick)", ms / Double(ticks))
        }
        if shadow || !wouldRefuseByGate.isEmpty {
            let would = wouldRefuseByGate.filter { $0.value > 0 }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
            parts.append("shadow: would refuse " + (would.isEmpty ? "none" : would.joined(separator: " ")))
        }
        let refused = refusedByGate.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        parts.append("refused " + (refused.isEmpty ? "none" : refused.joined(separator: " ")))
        if !tokens.isEmpty {
            parts.append("tokens " + tokens.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value.text)" }.joined(separator: " "))
        }
        if reaped > 0 { parts.append("reaped \(reaped)") }
        if skippedBusy > 0 { parts.append("skipped \(skippedBusy) (another runner)") }
        if failures > 0 { parts.append("FAILED \(failures) tick\(failures == 1 ? "" : "s"): \(lastError ?? "")") }
        return parts.joined(separator: "; ")
    }
}

/// What a runner did over its life.
public struct RunReport: Sendable, Equatable {
    /// Per policy, by name.
    public var policies: [PolicySummary] = []
    /// Maintenance steps that failed (reaping a policy, pruning), and the last error.
    public var maintenanceFailures = 0
    public var lastMaintenanceError: String?

    /// Passes cut short because the database session was lost or could not
    /// be opened (the runner reconnected with backoff), and the last error.
    public var connectionFailures = 0
    public var lastConnectionError: String?

    /// Whether any tick, maintenance step or connection failed.
    public var hadFailures: Bool {
        maintenanceFailures > 0 || connectionFailures > 0 || policies.contains { $0.failures > 0 }
    }
}

/// The admission loop: ticks every policy with work, pauses briefly after
/// productive passes and longer after idle ones (woken early by the
/// `dispatch_policy_staged` and `dispatch_policy_released` notifications),
/// and runs maintenance on a schedule. As a swift-service-lifecycle
/// `Service`, graceful shutdown (SIGTERM) ends it after the current tick.
///
/// Each policy is isolated: a tick that fails (a `sql` target that raises, a
/// config the runner cannot read) is rolled back, logged once per distinct
/// error, recorded in `dispatch_policy.runner_failures` (shown by `status`)
/// and retried with capped exponential backoff, while every other policy
/// keeps its pace. Maintenance is isolated the same way, per policy.
///
/// It opens its own sessions from ``ConnectionSettings``, or uses the
/// application's `PostgresClient` (``init(client:options:logger:)``): each
/// call then leases a pooled connection and gives it back, and only the
/// LISTEN for wake-ups keeps one for the runner's life.
public struct TickRunner: Service {
    /// The settings its sessions are opened with; nil when it uses the
    /// application's pool.
    public let connection: ConnectionSettings?
    public let options: TickRunnerOptions
    public let logger: Logger
    private let source: ManagedConnection.Source

    public init(connection: ConnectionSettings, options: TickRunnerOptions = TickRunnerOptions(), logger: Logger) {
        self.connection = connection
        self.source = .settings(connection.with(session: options.session))
        self.options = options
        self.logger = logger
    }

    /// A runner on the application's pool, which must be running
    /// (`client.run()`, or in the same `ServiceGroup`). It leases a
    /// connection per call, and keeps one for LISTEN unless `options.once`;
    /// a pool of 2 connections is enough, more lets the application's own
    /// queries go on alongside. `options.session` is not applied: the
    /// pool's configuration sets its sessions' parameters (see
    /// ``SessionSettings/parameters``).
    public init(client: any ConnectionPool, options: TickRunnerOptions = TickRunnerOptions(), logger: Logger) {
        self.connection = nil
        self.source = .pool(client)
        self.options = options
        self.logger = logger
    }

    public func run() async throws {
        do {
            _ = try await runLoop()
        } catch is CancellationError {
            // Cancelled at shutdown (the graceful shutdown timed out): stop quietly.
        }
    }

    /// Runs until `once`, `runFor`, graceful shutdown or cancellation; returns
    /// what it did. An unknown `options.policy` is an error (SQLSTATE 42704).
    ///
    /// A lost session is replaced with backoff (see ``ManagedConnection``):
    /// `once` reports a session it cannot open or loses as an error; the
    /// other modes log it, count it in the report and keep trying until their
    /// end. No wait lasts past `runFor` by more than `options.overrun`.
    public func runLoop() async throws -> RunReport {
        let deadline = options.runFor.map { ContinuousClock.now + $0 }
        let wake = WakeSignal()
        let db = ManagedConnection(source, role: "runner", logger: logger, connectTimeout: options.connectTimeout)
        options.health.started(bound: options.healthBound)
        // A session that closes wakes the loop, which then reconnects.
        await db.onConnect { [health = options.health] conn in
            conn.closeFuture.whenComplete { _ in
                health.connectionClosed()
                Task { await wake.signal() }
            }
        }
        let listening = ManagedConnection(source, role: "runner notifications", logger: logger, connectTimeout: options.connectTimeout)
        let listener: Task<Void, Never>? =
            options.once
            ? nil
            : Task {
                await NotificationListener(
                    connection: listening, channels: ["dispatch_policy_staged", "dispatch_policy_released"], logger: logger
                ).run { _, _ in await wake.signal() }
                await listening.close()
            }
        defer { listener?.cancel() }
        var report = RunReport()
        do {
            try await loop(db: db, others: [listening], deadline: deadline, wake: wake, report: &report)
        } catch {
            await db.close()
            throw error
        }
        if !Task.isCancelled { await db.forgetProcess(name: options.name, until: deadline.map { $0 + options.overrun }) }
        await db.close()
        return report
    }

    /// A failing policy: when to try it again, and what it failed with.
    struct Failing {
        var failures: Int
        var message: String
        var retryAt: ContinuousClock.Instant
    }

    private func loop(
        db: ManagedConnection, others: [ManagedConnection], deadline: ContinuousClock.Instant?, wake: WakeSignal, report: inout RunReport
    ) async throws {
        var summaries: [String: PolicySummary] = [:]
        var failing: [String: Failing] = [:]
        var maintenanceErrors: [String: String] = [:]
        let startedAt = Date()
        // No wait outlives the --for deadline by more than the overrun.
        let hardDeadline = deadline.map { $0 + options.overrun }
        let settings = options.tick
        let logger = logger
        var lastMaintenance: ContinuousClock.Instant?
        var lastReport: ContinuousClock.Instant?
        var reportedReconnects = 0
        var lastPassError: String?
        var checkedPolicies = false
        var passes = 0
        defer { report.policies = summaries.values.sorted { $0.policy < $1.policy } }
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            // At least one pass, however long connecting took.
            if let deadline, ContinuousClock.now >= deadline, passes > 0 { break }
            passes += 1
            var admitted = 0
            var sawBusy = false
            var nextWake: Duration?
            let passStarted = ContinuousClock.now
            do {
                if !checkedPolicies {
                    for only in options.policies ?? [] {
                        let exists = try await db.run("looking up the policy", timeout: options.callTimeout, until: hardDeadline) { conn in
                            try await Ticker(connection: conn, settings: settings, logger: logger).exists(policy: only)
                        }
                        guard exists else {
                            throw DispatchPolicyError(
                                code: .server, message: "unknown policy: '\(only)'", sqlState: "42704",
                                hint:
                                    "Declare it first with dispatch_policy.declare_policy(name, config) or \"dispatch-policy policy apply FILE\"."
                            )
                        }
                    }
                    checkedPolicies = true
                }
                // Alive, and any lost session, reported at start, after a
                // reconnect, and once per maintenance interval.
                var reconnects = await db.reconnects
                for other in others { reconnects += await other.reconnects }
                if !options.once,
                    reconnects != reportedReconnects
                        || lastReport.map({ ContinuousClock.now - $0 >= options.maintenanceInterval }) ?? true
                {
                    await db.reportAlive(name: options.name, kind: "runner", startedAt: startedAt, others: others, until: hardDeadline)
                    lastReport = .now
                    reportedReconnects = reconnects
                }
                if lastMaintenance.map({ ContinuousClock.now - $0 >= options.maintenanceInterval }) ?? true {
                    try await maintain(db, until: hardDeadline, report: &report, errors: &maintenanceErrors)
                    lastMaintenance = .now
                }
                let work = try await db.run("looking for policies with work", timeout: options.callTimeout, until: hardDeadline) {
                    [only = options.policies] conn in
                    try await Ticker(connection: conn, settings: settings, logger: logger).policiesWithWork(only: only)
                }
                // The next thing due by the clock ends the pause (a scheduled job,
                // a lease); so does the next whole token of a throttle that refused.
                nextWake = work.compactMap(\.nextDueIn).min()
                for work in work where work.hasWork || work.expiredLeases {
                    let policy = work.name
                    if let state = failing[policy], ContinuousClock.now < state.retryAt { continue }
                    do {
                        // A span per tick (a no-op unless the application bootstrapped a tracer).
                        let result = try await withSpan("dispatch_policy.tick", ofKind: .internal) { span in
                            span.attributes["dispatch_policy.policy"] = policy
                            let result = try await db.run(
                                "the tick of policy \(policy)", timeout: options.tickCallTimeout, until: hardDeadline
                            ) { conn in
                                try await Ticker(connection: conn, settings: settings, logger: logger).tick(
                                    policy: policy, reap: work.expiredLeases)
                            }
                            span.attributes["dispatch_policy.outcome"] = result.outcome.rawValue
                            span.attributes["dispatch_policy.fetched"] = result.fetched
                            span.attributes["dispatch_policy.admitted"] = result.admitted
                            span.attributes["dispatch_policy.refused"] = result.refusedByGate.values.reduce(0, +)
                            return result
                        }
                        summaries[policy, default: PolicySummary(policy: policy)].add(result)
                        options.metrics.record(result)
                        admitted += result.admitted
                        // Another runner is ticking it: the work is not done,
                        // so look again after the busy pause, not the idle one.
                        if result.outcome == .busy { sawBusy = true }
                        if let next = result.nextTokenIn { nextWake = min(nextWake ?? next, next) }
                        if failing.removeValue(forKey: policy) != nil {
                            logger.info("policy recovered", metadata: ["policy.name": "\(policy)"])
                        }
                        if work.failing && result.outcome == .ran {
                            await db.run("clearing the policy's failure", timeout: options.callTimeout, until: hardDeadline) { conn in
                                _ = try await conn.rows("SELECT dispatch_policy.clear_runner_failure(\(policy))", logger: logger)
                            } ifFails: { _ in
                            }
                        }
                    } catch {
                        let wrapped = DispatchPolicyError.from(error)
                        // A lost session is not the policy's fault: end the pass.
                        if wrapped.code == .connectionLost || error is CancellationError { throw error }
                        // A deadlock or serialization abort is retried at the next pass.
                        if wrapped.sqlState == "40P01" || wrapped.sqlState == "40001" {
                            logger.info("tick aborted; retrying", metadata: ["policy.name": "\(policy)", "error": "\(wrapped)"])
                            continue
                        }
                        summaries[policy, default: PolicySummary(policy: policy)].failures += 1
                        options.metrics.recordTickFailure(policy: policy)
                        summaries[policy, default: PolicySummary(policy: policy)].lastError = wrapped.description
                        await recordFailure(policy: policy, error: wrapped, db: db, until: hardDeadline, failing: &failing)
                    }
                }
                options.health.passCompleted()
            } catch {
                let wrapped = DispatchPolicyError.from(error)
                options.health.passFailed(wrapped.description, lost: wrapped.code == .connectionLost)
                // The pass failed outside one policy's tick: its transaction
                // rolled back, so nothing is lost. A one-shot run reports it; the
                // others count it and try again (a lost session is reopened with
                // backoff, logged by ManagedConnection).
                if options.once || Task.isCancelled || error is CancellationError || wrapped.sqlState == "42704" { throw error }
                if wrapped.code == .connectionLost {
                    report.connectionFailures += 1
                    report.lastConnectionError = wrapped.description
                } else if lastPassError != wrapped.description {
                    // Once per distinct error (an unmigrated database fails every pass).
                    logger.warning("admission pass failed; retrying", metadata: ["error": "\(wrapped)"])
                }
                lastPassError = wrapped.description
            }
            if options.once { break }
            var pause = admitted > 0 || sawBusy ? options.busyPause : options.idlePause
            // Sleep until the next thing that can change by the clock, not
            // longer (measured from the start of the pass that found it).
            if let nextWake { pause = min(pause, max(passStarted + nextWake - .now, .milliseconds(1))) }
            // Reconnect as soon as the backoff allows.
            if let retryAt = await db.retryAt { pause = min(pause, max(retryAt - .now, .zero)) }
            if let deadline { pause = min(pause, max(deadline - .now, .zero)) }
            // Wake for the next retry of a failing policy, not later.
            if let next = failing.values.map(\.retryAt).min() { pause = min(pause, max(next - .now, .zero)) }
            if pause > .zero {
                await withGracefulShutdownHandler {
                    await wake.wait(upTo: pause)
                } onGracefulShutdown: {
                    Task { await wake.signal() }
                }
            }
        }
    }

    /// Backs a failing policy off, logs a new or changed error once, and
    /// records it where `status` shows it.
    private func recordFailure(
        policy: String, error: DispatchPolicyError, db: ManagedConnection, until hardDeadline: ContinuousClock.Instant?,
        failing: inout [String: Failing]
    ) async {
        let previous = failing[policy]
        let failures = (previous?.failures ?? 0) + 1
        let exponent = min(failures - 1, 30)
        var backoff = options.failureBackoff * (1 << exponent)
        if backoff > options.maxFailureBackoff || backoff < .zero { backoff = options.maxFailureBackoff }
        let message = error.description
        failing[policy] = Failing(failures: failures, message: message, retryAt: .now + backoff)
        if previous?.message != message {
            logger.warning(
                "policy tick failed; other policies continue",
                metadata: [
                    "policy.name": "\(policy)", "error": "\(message)", "retry.in": "\(backoff)",
                ])
        }
        let seconds = Double(backoff.components.seconds) + Double(backoff.components.attoseconds) / 1e18
        let sqlState = error.sqlState
        await db.run("recording the policy's failure", timeout: options.callTimeout, until: hardDeadline) { [logger] conn in
            _ = try await conn.rows(
                """
                SELECT dispatch_policy.record_runner_failure(\(policy), \(message), \(sqlState),
                                                             now() + make_interval(secs => \(seconds)::float8))
                """, logger: logger)
        } ifFails: { _ in
        }
    }

    /// Reaps expired leases, one policy at a time, and prunes old rows: each
    /// step on its own, so one policy's bad row never stops the others. A
    /// lost session ends maintenance (thrown); it runs again at the next pass.
    func maintain(
        _ db: ManagedConnection, until hardDeadline: ContinuousClock.Instant?, report: inout RunReport, errors: inout [String: String]
    ) async throws {
        var reaped = 0
        let settings = options.tick
        let logger = logger
        let expired = try await db.run("looking for expired leases", timeout: options.callTimeout, until: hardDeadline) {
            [policies = options.policies] conn in
            try await conn.rows(
                """
                SELECT DISTINCT policy FROM dispatch_policy.admitted_jobs
                WHERE lease_expires_at < now() AND (\(policies)::text[] IS NULL OR policy = ANY (\(policies)::text[]))
                ORDER BY 1
                """, logger: logger
            ).map { try $0.decode(String.self) }
        }
        for policy in expired {
            try await step("reap:\(policy)", report: &report, errors: &errors) {
                reaped += try await db.run("reaping the leases of policy \(policy)", timeout: options.tickCallTimeout, until: hardDeadline)
                { conn in
                    try await Ticker(connection: conn, settings: settings, logger: logger).reapLeases(policy: policy)
                }
            }
        }
        var removed: [String: Int] = [:]
        // Lanes of jobs written without stage() (a restore, a direct INSERT).
        try await step("sync_lanes", report: &report, errors: &errors) {
            let added = try await db.run("syncing lanes", timeout: options.maintenanceCallTimeout, until: hardDeadline) {
                [policies = options.policies] conn in
                try await conn.rows("SELECT dispatch_policy.sync_lanes(\(policies)::text[])", logger: logger)
                    .first?.decode(Int.self) ?? 0
            }
            if added > 0 { removed["lanes_added"] = added }
        }
        try await step("prune", report: &report, errors: &errors) {
            let rows = try await db.run("pruning", timeout: options.maintenanceCallTimeout, until: hardDeadline) {
                [retention = options.retentionSeconds, idle = options.idleGateSeconds, policies = options.policies] conn in
                try await conn.rows(
                    """
                    SELECT what, removed FROM dispatch_policy.prune(make_interval(secs => \(retention)),
                                                                    make_interval(secs => \(idle)),
                                                                    policies => \(policies)::text[])
                    """,
                    logger: logger
                ).map { try $0.decode((String, Int).self) }
            }
            for (what, n) in rows where n > 0 { removed[what] = n }
        }
        if reaped > 0 || !removed.isEmpty {
            logger.debug("maintenance", metadata: ["maintenance.reaped": "\(reaped)", "maintenance.pruned": "\(removed)"])
        }
    }

    /// Runs one maintenance step; its failure is recorded and logged once per
    /// distinct error. A lost session or cancellation is rethrown.
    private func step(
        _ name: String, report: inout RunReport, errors: inout [String: String], _ body: () async throws -> Void
    ) async throws {
        do {
            try await body()
            if errors.removeValue(forKey: name) != nil {
                logger.info("maintenance step recovered", metadata: ["maintenance.step": "\(name)"])
            }
        } catch {
            let wrapped = DispatchPolicyError.from(error)
            if wrapped.code == .connectionLost || error is CancellationError { throw error }
            let message = wrapped.description
            report.maintenanceFailures += 1
            report.lastMaintenanceError = "\(name): \(message)"
            if errors[name] != message {
                logger.warning(
                    "maintenance step failed; the others continue",
                    metadata: [
                        "maintenance.step": "\(name)", "error": "\(message)",
                    ])
            }
            errors[name] = message
        }
    }
}

/// A one-slot wake-up: `signal()` wakes the current `wait` (or the next one).
actor WakeSignal {
    private var pending = false
    private var waiter: (id: Int, continuation: CheckedContinuation<Void, Never>)?
    private var nextID = 0

    func signal() {
        if let waiter {
            self.waiter = nil
            waiter.continuation.resume()
        } else {
            pending = true
        }
    }

    /// Returns after `duration`, or earlier on `signal()` or cancellation.
    func wait(upTo duration: Duration) async {
        if pending {
            pending = false
            return
        }
        nextID += 1
        let id = nextID
        let timer = Task { [weak self] in
            try? await Task.sleep(for: duration)
            await self?.expire(id)
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                waiter = (id, continuation)
            }
        } onCancel: {
            Task { [weak self] in await self?.expire(id) }
        }
        timer.cancel()
    }

    private func expire(_ id: Int) {
        if let waiter, waiter.id == id {
            self.waiter = nil
            waiter.continuation.resume()
        }
    }
}
