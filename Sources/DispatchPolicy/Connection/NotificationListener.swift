import Logging
import PostgresNIO
import Synchronization

/// LISTENs on channels over a session of its own, and opens a new session
/// and LISTENs again whenever that one ends.
///
/// The loss is noticed when the connection closes (its `closeFuture`) or,
/// for a network that silently drops packets, when a probe (`SELECT 1`,
/// every `probeInterval`) does not answer in time. `handler` is called with
/// each notification's channel and payload, and with `nil` after every
/// (re)subscription: notifications sent while no session listened are lost,
/// so the owner should look for work then.
struct NotificationListener: Sendable {
    let connection: ManagedConnection
    let channels: [String]
    let logger: Logger
    var probeInterval: Duration = .seconds(30)
    var probeTimeout: Duration = .seconds(10)

    /// Runs until cancelled.
    func run(_ handler: @escaping @Sendable (_ channel: String?, _ payload: String) async -> Void) async {
        // Sessions that end soon after subscribing (LISTEN refused, as on a
        // standby) are retried with backoff, not in a loop.
        var quickFailures = 0
        while !Task.isCancelled {
            let conn: PostgresConnection
            do {
                conn = try await connection.connection()
            } catch {
                // ManagedConnection logged it and set when to try again.
                let retryAt = await connection.retryAt ?? .now + .seconds(1)
                try? await Task.sleep(until: retryAt, clock: .continuous)
                continue
            }
            let ended = OneShot()
            let failure = FirstError()
            let subscribedAt = ContinuousClock.now
            conn.closeFuture.whenComplete { _ in ended.fire() }
            // Unstructured: a listen on a connection that died may never end
            // (vapor/postgres-nio#601), and a task group would wait for it.
            let listeners = channels.map { channel in
                Task {
                    defer { ended.fire() }
                    do {
                        try await conn.listen(on: channel) { notifications in
                            for try await notification in notifications {
                                await handler(channel, notification.payload)
                            }
                        }
                    } catch {
                        failure.record(DispatchPolicyError.from(error).description)
                    }
                }
            }
            await handler(nil, "")
            let prober = Task {
                while !Task.isCancelled {
                    try await Task.sleep(for: probeInterval)
                    do {
                        _ = try await connection.run("a liveness probe", timeout: probeTimeout) { conn in
                            try await conn.rows("SELECT 1", logger: logger)
                        }
                    } catch let error as DispatchPolicyError where error.code == .connectionLost {
                        ended.fire()
                        return
                    }
                }
            }
            await ended.wait()
            prober.cancel()
            for listener in listeners { listener.cancel() }
            if Task.isCancelled { return }
            let reason = failure.value
            await connection.drop(conn, reason: reason.map { "LISTEN failed: \($0)" } ?? "the notification session ended")
            if ContinuousClock.now - subscribedAt < .seconds(5) {
                quickFailures += 1
                let delay = min(Duration.seconds(1) * (1 << min(quickFailures - 1, 5)), .seconds(30))
                if quickFailures == 1 {
                    logger.warning(
                        "notifications unavailable; the owner polls meanwhile, retrying with backoff",
                        metadata: [
                            "error": "\(reason ?? "the session ended")", "retry.in": "\(delay)",
                        ])
                }
                try? await Task.sleep(for: delay)
            } else {
                quickFailures = 0
            }
        }
    }
}

/// The first error reported by any of several tasks.
final class FirstError: Sendable {
    private let state = Mutex<String?>(nil)
    func record(_ message: String) { state.withLock { $0 = $0 ?? message } }
    var value: String? { state.withLock { $0 } }
}

/// Fires once; `wait()` returns when it has fired or the caller is cancelled.
final class OneShot: Sendable {
    private struct State {
        var fired = false
        var waiters: [CheckedContinuation<Void, Never>] = []
    }
    private let state = Mutex(State())

    func fire() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            guard !state.fired else { return [] }
            state.fired = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    func wait() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let now = state.withLock { state -> Bool in
                    if state.fired { return true }
                    state.waiters.append(continuation)
                    return false
                }
                if now { continuation.resume() }
            }
        } onCancel: {
            fire()
        }
    }
}
