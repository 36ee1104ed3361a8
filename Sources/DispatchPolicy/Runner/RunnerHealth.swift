import Foundation
import Logging
import PostgresNIO
import Synchronization

/// A read-only view of a running ``TickRunner``: whether its session to the
/// database is open, and when its last admission pass completed. The runner
/// updates it after every pass and when its session is lost; anything may
/// read it (`dispatch-policy run --metrics` serves it as `/healthz`).
///
/// Give the same instance to the runner (``TickRunnerOptions/health``) and
/// to whatever reports on it; it is a reference, shared by every copy of
/// the options.
public final class RunnerHealth: Sendable {
    /// What the runner last said about itself.
    public struct Snapshot: Sendable, Equatable {
        /// When the runner started (nil: not started yet).
        public var startedAt: Date?
        /// When its last admission pass completed.
        public var lastPassAt: Date?
        /// Since when its session has been lost (nil while it is open).
        public var connectionLostAt: Date?
        /// Why the last pass failed, or the session was lost.
        public var lastError: String?
        /// A runner whose last pass is older than this is unhealthy
        /// (``TickRunnerOptions/healthBound``).
        public var bound: Duration = .seconds(60)

        public init() {}

        /// Healthy at `now`: the session is open and a pass completed
        /// within ``bound``. Otherwise `healthy` is false and `reason` says
        /// why, in one line.
        public func verdict(now: Date = Date()) -> (healthy: Bool, reason: String) {
            let limit = Double(bound.components.seconds) + Double(bound.components.attoseconds) / 1e18
            func ago(_ date: Date) -> String { Self.seconds(now.timeIntervalSince(date)) }
            let error = lastError.map { ": \(DispatchPolicyError.oneLine($0))" } ?? ""
            guard let startedAt else { return (false, "the runner has not started") }
            if let lost = connectionLostAt {
                return (false, "database connection lost since \(Self.timestamp(lost)) (\(ago(lost)) ago)\(error)")
            }
            guard let lastPassAt else {
                return (false, "no pass completed yet (the runner started \(ago(startedAt)) ago)\(error)")
            }
            if now.timeIntervalSince(lastPassAt) > limit {
                return (false, "no pass completed for \(ago(lastPassAt)) (bound \(Self.seconds(limit)))\(error)")
            }
            return (true, "ok")
        }

        static func seconds(_ value: Double) -> String { "\(Int(max(value, 0).rounded())) s" }

        static func timestamp(_ date: Date) -> String {
            let formatter = ISO8601DateFormatter()
            formatter.formatOptions = [.withInternetDateTime]
            return formatter.string(from: date)
        }
    }

    private let state = Mutex(Snapshot())

    public init() {}

    /// The runner's state now.
    public var snapshot: Snapshot { state.withLock { $0 } }

    /// ``Snapshot/verdict(now:)`` of the current snapshot.
    public func verdict(now: Date = Date()) -> (healthy: Bool, reason: String) { snapshot.verdict(now: now) }

    /// The runner starts, and holds itself to `bound`.
    func started(bound: Duration, at now: Date = Date()) {
        state.withLock { state in
            state = Snapshot()
            state.startedAt = now
            state.bound = bound
        }
    }

    /// A pass completed: the session is open.
    func passCompleted(at now: Date = Date()) {
        state.withLock { state in
            state.lastPassAt = now
            state.connectionLostAt = nil
            state.lastError = nil
        }
    }

    /// A pass failed; `lost` when its session is gone (kept from the first
    /// loss until a pass completes).
    func passFailed(_ error: String, lost: Bool, at now: Date = Date()) {
        state.withLock { state in
            if lost, state.connectionLostAt == nil { state.connectionLostAt = now }
            state.lastError = error
        }
    }

    /// The runner's session closed (it reconnects on its next pass).
    func connectionClosed(at now: Date = Date()) {
        state.withLock { state in
            if state.connectionLostAt == nil { state.connectionLostAt = now }
        }
    }
}

extension TickRunnerOptions {
    /// How stale the last completed pass may be before ``RunnerHealth``
    /// calls the runner unhealthy: three of the longer pause, plus the
    /// longest a tick may take (`tick.timeout` and ``callGrace``, at least
    /// ``callTimeout``). With the defaults (pauses 50 ms and 1 s, tick
    /// timeout 60 s): 68 s.
    public var healthBound: Duration { max(idlePause, busyPause) * 3 + tickCallTimeout }
}

/// A bounded `SELECT 1`, for health checks.
public enum DatabaseProbe {
    /// Nil when `executor` answers `SELECT 1` within `bound`; else why not, in one line.
    public static func check(_ executor: any SQLExecutor, within bound: Duration = .seconds(2), logger: Logger) async -> String? {
        do {
            let answered = try await untilDeadline(.now + bound) {
                _ = try await executor.rows("SELECT 1", logger: logger)
                return true
            }
            return answered == nil ? "the database did not answer SELECT 1 within \(DurationParser.describe(bound))" : nil
        } catch {
            return "the database did not answer: \(DispatchPolicyError.from(error).message)"
        }
    }
}
