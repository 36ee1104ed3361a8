import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle

/// How a ``TickRunner`` loops.
public struct TickRunnerOptions: Sendable {
    /// Tick only this policy (default: every policy with work).
    public var policy: String?
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
    public var retentionSeconds: Int = 7 * 86_400
    /// Full buckets and empty counters untouched this long are deleted.
    public var idleGateSeconds: Int = 3_600
    public var tick = TickSettings()

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
        return parts.joined(separator: "; ")
    }
}

/// The admission loop: ticks every policy with work, pauses briefly after
/// productive passes and longer after idle ones (woken early by the
/// `dispatch_policy_staged` and `dispatch_policy_released` notifications),
/// and runs maintenance on a schedule. As a swift-service-lifecycle
/// `Service`, graceful shutdown (SIGTERM) ends it after the current tick.
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
    /// per-policy totals.
    public func runLoop() async throws -> [PolicySummary] {
        let deadline = options.runFor.map { ContinuousClock.now + $0 }
        let wake = WakeSignal()
        return try await connection.withConnection(logger: logger) { conn in
            if options.once {
                return try await loop(conn: conn, listener: nil, deadline: deadline, wake: wake)
            }
            return try await connection.withConnection(logger: logger) { listener in
                try await loop(conn: conn, listener: listener, deadline: deadline, wake: wake)
            }
        }
    }

    private func loop(
        conn: PostgresConnection, listener: PostgresConnection?, deadline: ContinuousClock.Instant?, wake: WakeSignal
    ) async throws -> [PolicySummary] {
        var summaries: [String: PolicySummary] = [:]
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
            while !Task.isCancelled && !Task.isShuttingDownGracefully {
                if let deadline, ContinuousClock.now >= deadline { break }
                var admitted = 0
                var failed = false
                do {
                    if lastMaintenance.map({ ContinuousClock.now - $0 >= options.maintenanceInterval }) ?? true {
                        try await maintain(conn)
                        lastMaintenance = .now
                    }
                    for policy in try await ticker.policiesWithWork(only: options.policy) {
                        let result = try await ticker.tick(policy: policy)
                        summaries[policy, default: PolicySummary(policy: policy)].add(result)
                        admitted += result.admitted
                    }
                } catch {
                    // One pass failed (a deadlock abort, a dropped connection, a
                    // policy that cannot be read): its transaction rolled back, so
                    // nothing is lost. A one-shot run reports it; a long-running
                    // one logs it and tries again after the idle pause.
                    if options.once || Task.isCancelled { throw error }
                    logger.error("admission pass failed; retrying", metadata: ["error": "\(error)"])
                    failed = true
                }
                if options.once { break }
                if failed && conn.isClosed {
                    if let fresh = try? await connection.connect(logger: logger) {
                        conn = fresh
                        ticker = Ticker(connection: fresh, settings: options.tick, logger: logger)
                    }
                }
                var pause = admitted > 0 && !failed ? options.busyPause : options.idlePause
                if let deadline { pause = min(pause, max(deadline - .now, .zero)) }
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
            return summaries.values.sorted { $0.policy < $1.policy }
        }
    }

    /// Reaps expired leases of every policy and prunes old rows.
    func maintain(_ conn: PostgresConnection) async throws {
        let reaped = try await conn.rows("SELECT dispatch_policy.reap_leases(NULL)", logger: logger).first!.decode(Int.self)
        var removed: [String: Int] = [:]
        for row in try await conn.rows(
            "SELECT what, removed FROM dispatch_policy.prune(make_interval(secs => \(options.retentionSeconds)), make_interval(secs => \(options.idleGateSeconds)))",
            logger: logger
        ) {
            let (what, n) = try row.decode((String, Int).self)
            if n > 0 { removed[what] = n }
        }
        if reaped > 0 || !removed.isEmpty {
            logger.info("maintenance", metadata: ["maintenance.reaped": "\(reaped)", "maintenance.pruned": "\(removed)"])
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
