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
            conn.closeFuture.whenComplete { _ in ended.fire() }
            // Unstructured: a listen on a connection that died may never end
            // (vapor/postgres-nio#601), and a task group would wait for it.
            let listeners = channels.map { channel in
                Task {
                    defer { ended.fire() }
                    try await conn.listen(on: channel) { notifications in
                        for try await notification in notifications {
                            await handler(channel, notification.payload)
                        }
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
            await connection.drop(conn, reason: "the notification session ended")
        }
    }
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
