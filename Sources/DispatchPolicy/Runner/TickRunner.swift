import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle

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
    /// Pause after a pass that admitted something.
    public var busyPause: Duration = .milliseconds(50)
    /// Pause after a pass that admitted nothing (cut short by NOTIFY).
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
    /// Server settings of the runner's sessions (see ``SessionSettings``).
    public var session = SessionSettings.runner

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
    public var tokensLeft: [String: Double] = [:]
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
            if !result.tokensLeft.isEmpty { tokensLeft = result.tokensLeft }
        case .paused, .unknown: break
        }
    }

    /// One line: `webhooks: admitted 120 in 3 ticks (2.1 ms/tick); refused per_endpoint=40; tokens per_endpoint=0.4`.
    public var line: String {
        var parts = ["\(policy): admitted \(admitted) in \(ticks) tick\(ticks == 1 ? "" : "s")"]
        if ticks > 0 {
            let ms = Double(duration.components.seconds) * 1000 + Double(duration.components.attoseconds) / 1e15
            parts[0] += String(format: " (%.1f ms/tick)", ms / Double(ticks))
        }
        let refused = refusedByGate.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        parts.append("refused " + (refused.isEmpty ? "none" : refused.joined(separator: " ")))
        if !tokensLeft.isEmpty {
            parts.append("tokens " + tokensLeft.sorted { $0.key < $1.key }.map { String(format: "%@=%.1f", $0.key, $0.value) }.joined(separator: " "))
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

    /// Whether any tick or maintenance step failed.
    public var hadFailures: Bool { maintenanceFailures > 0 || policies.contains { $0.failures > 0 } }
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
public struct TickRunner: Service {
    public let connection: ConnectionSettings
    public let options: TickRunnerOptions
    public let logger: Logger

    public init(connection: ConnectionSettings, options: TickRunnerOptions = TickRunnerOptions(), logger: Logger) {
        self.connection = connection
        self.options = options
        self.logger = logger
    }

    public func run() async throws {
        _ = try await runLoop()
    }

    /// Runs until `once`, `runFor`, graceful shutdown or cancellation; returns
    /// what it did. An unknown `options.policy` is an error (SQLSTATE 42704).
    public func runLoop() async throws -> RunReport {
        let deadline = options.runFor.map { ContinuousClock.now + $0 }
        let wake = WakeSignal()
        return try await connection.with(session: options.session).withConnection(logger: logger) { conn in
            for only in options.policies ?? [] {
                guard try await Ticker(connection: conn, settings: options.tick, logger: logger).exists(policy: only) else {
                    throw DispatchPolicyError(
                        code: .server, message: "unknown policy: '\(only)'", sqlState: "42704",
                        hint: "Declare it first with dispatch_policy.declare_policy(name, config) or \"dispatch-policy policy apply FILE\".")
                }
            }
            if options.once {
                return try await loop(conn: conn, listener: nil, deadline: deadline, wake: wake)
            }
            return try await connection.with(session: options.session).withConnection(logger: logger) { listener in
                try await loop(conn: conn, listener: listener, deadline: deadline, wake: wake)
            }
        }
    }

    /// A failing policy: when to try it again, and what it failed with.
    struct Failing {
        var failures: Int
        var message: String
        var retryAt: ContinuousClock.Instant
    }

    private func loop(
        conn: PostgresConnection, listener: PostgresConnection?, deadline: ContinuousClock.Instant?, wake: WakeSignal
    ) async throws -> RunReport {
        var summaries: [String: PolicySummary] = [:]
        var report = RunReport()
        var failing: [String: Failing] = [:]
        var maintenanceErrors: [String: String] = [:]
        let original = conn
        var conn = conn
        var ticker = Ticker(connection: conn, settings: options.tick, logger: logger)
        return try await withThrowingTaskGroup(of: Void.self) { group in
            if let listener {
                for channel in ["dispatch_policy_staged", "dispatch_policy_released"] {
                    group.addTask {
                        try await listener.listen(on: channel) { notifications in
                            for try await _ in notifications { await wake.signal() }
                        }
                    }
                }
            }
            var lastMaintenance: ContinuousClock.Instant?
            var passes = 0
            while !Task.isCancelled && !Task.isShuttingDownGracefully {
                // At least one pass, however long connecting took.
                if let deadline, ContinuousClock.now >= deadline, passes > 0 { break }
                passes += 1
                var admitted = 0
                var failed = false
                do {
                    if lastMaintenance.map({ ContinuousClock.now - $0 >= options.maintenanceInterval }) ?? true {
                        try await maintain(conn, report: &report, errors: &maintenanceErrors)
                        lastMaintenance = .now
                    }
                    for work in try await ticker.policiesWithWork(only: options.policies) {
                        let policy = work.name
                        if let state = failing[policy], ContinuousClock.now < state.retryAt { continue }
                        do {
                            let result = try await ticker.tick(policy: policy, reap: work.expiredLeases)
                            summaries[policy, default: PolicySummary(policy: policy)].add(result)
                            admitted += result.admitted
                            if failing.removeValue(forKey: policy) != nil {
                                logger.info("policy recovered", metadata: ["policy.name": "\(policy)"])
                            }
                            if work.failing && result.outcome == .ran {
                                _ = try? await conn.rows("SELECT dispatch_policy.clear_runner_failure(\(policy))", logger: logger)
                            }
                        } catch {
                            let wrapped = DispatchPolicyError.from(error)
                            // A lost connection is not the policy's fault: end the pass.
                            if wrapped.sqlState == nil && conn.isClosed { throw error }
                            // A deadlock or serialization abort is retried at the next pass.
                            if wrapped.sqlState == "40P01" || wrapped.sqlState == "40001" {
                                logger.info("tick aborted; retrying", metadata: ["policy.name": "\(policy)", "error": "\(wrapped)"])
                                continue
                            }
                            summaries[policy, default: PolicySummary(policy: policy)].failures += 1
                            summaries[policy, default: PolicySummary(policy: policy)].lastError = wrapped.description
                            await recordFailure(policy: policy, error: wrapped, conn: conn, failing: &failing)
                            failed = true
                        }
                    }
                } catch {
                    // The pass failed outside one policy's tick (a dropped
                    // connection): its transaction rolled back, so nothing is
                    // lost. A one-shot run reports it; a long-running one logs
                    // it and tries again after the idle pause.
                    if options.once || Task.isCancelled { throw error }
                    logger.error("admission pass failed; retrying", metadata: ["error": "\(error)"])
                    failed = true
                }
                if options.once { break }
                if failed && conn.isClosed {
                    if let fresh = try? await connection.with(session: options.session).connect(logger: logger) {
                        conn = fresh
                        ticker = Ticker(connection: fresh, settings: options.tick, logger: logger)
                    }
                }
                var pause = admitted > 0 ? options.busyPause : options.idlePause
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
            group.cancelAll()
            // A connection opened after the original dropped is ours to close
            // (runLoop closes the original).
            if conn !== original { try? await conn.close() }
            report.policies = summaries.values.sorted { $0.policy < $1.policy }
            return report
        }
    }

    /// Backs a failing policy off, logs a new or changed error once, and
    /// records it where `status` shows it.
    private func recordFailure(policy: String, error: DispatchPolicyError, conn: PostgresConnection, failing: inout [String: Failing]) async {
        let previous = failing[policy]
        let failures = (previous?.failures ?? 0) + 1
        let exponent = min(failures - 1, 30)
        var backoff = options.failureBackoff * (1 << exponent)
        if backoff > options.maxFailureBackoff || backoff < .zero { backoff = options.maxFailureBackoff }
        let message = error.description
        failing[policy] = Failing(failures: failures, message: message, retryAt: .now + backoff)
        if previous?.message != message {
            logger.error("policy tick failed; other policies continue", metadata: [
                "policy.name": "\(policy)", "error": "\(message)", "retry.in": "\(backoff)",
            ])
        }
        let seconds = Double(backoff.components.seconds) + Double(backoff.components.attoseconds) / 1e18
        _ = try? await conn.rows(
            """
            SELECT dispatch_policy.record_runner_failure(\(policy), \(message), \(error.sqlState),
                                                         now() + make_interval(secs => \(seconds)::float8))
            """, logger: logger)
    }

    /// Reaps expired leases, one policy at a time, and prunes old rows: each
    /// step on its own, so one policy's bad row never stops the others.
    func maintain(_ conn: PostgresConnection, report: inout RunReport, errors: inout [String: String]) async throws {
        var reaped = 0
        let expired = try await conn.rows(
            """
            SELECT DISTINCT policy FROM dispatch_policy.admitted_jobs
            WHERE lease_expires_at < now() AND (\(options.policies)::text[] IS NULL OR policy = ANY (\(options.policies)::text[]))
            ORDER BY 1
            """, logger: logger
        ).map { try $0.decode(String.self) }
        for policy in expired {
            await step("reap:\(policy)", report: &report, errors: &errors, conn: conn) {
                reaped += try await Ticker(connection: conn, settings: options.tick, logger: logger).reapLeases(policy: policy)
            }
        }
        var removed: [String: Int] = [:]
        await step("prune", report: &report, errors: &errors, conn: conn) {
            for row in try await conn.rows(
                """
                SELECT what, removed FROM dispatch_policy.prune(make_interval(secs => \(options.retentionSeconds)),
                                                                make_interval(secs => \(options.idleGateSeconds)),
                                                                policies => \(options.policies)::text[])
                """,
                logger: logger
            ) {
                let (what, n) = try row.decode((String, Int).self)
                if n > 0 { removed[what] = n }
            }
        }
        if reaped > 0 || !removed.isEmpty {
            logger.info("maintenance", metadata: ["maintenance.reaped": "\(reaped)", "maintenance.pruned": "\(removed)"])
        }
    }

    private func step(
        _ name: String, report: inout RunReport, errors: inout [String: String], conn: PostgresConnection,
        _ body: () async throws -> Void
    ) async {
        do {
            try await body()
            if errors.removeValue(forKey: name) != nil {
                logger.info("maintenance step recovered", metadata: ["maintenance.step": "\(name)"])
            }
        } catch {
            let message = DispatchPolicyError.from(error).description
            report.maintenanceFailures += 1
            report.lastMaintenanceError = "\(name): \(message)"
            if errors[name] != message {
                logger.error("maintenance step failed; the others continue", metadata: [
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
