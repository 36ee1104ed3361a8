import Synchronization

/// Runs `body`, but stops waiting for it at `deadline`: returns nil when the
/// deadline passed first, and throws `CancellationError` when the caller is
/// cancelled first.
///
/// A query on a connection whose server side is gone may never return, and
/// may not react to cancellation either (postgres-nio: vapor/postgres-nio#487,
/// #601), so a task group that awaits it would hang with it. Here the body
/// runs in a task of its own; when the wait ends early it is cancelled and
/// left to end on its own (at the latest when its connection is closed).
///
/// `abandon`, when given, is called once with a function that ends the wait
/// early with the error it is passed (for instance when the connection the
/// body runs on closes).
func untilDeadline<T: Sendable>(
    _ deadline: ContinuousClock.Instant,
    abandon: ((@escaping @Sendable (any Error) -> Void) -> Void)? = nil,
    _ body: @escaping @Sendable () async throws -> T
) async throws -> T? {
    let race = DeadlineRace<T>()
    return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T?, any Error>) in
            race.start(
                continuation,
                work: Task {
                    do { race.finish(.success(try await body())) } catch { race.finish(.failure(error)) }
                },
                timer: Task {
                    try? await Task.sleep(until: deadline, clock: .continuous)
                    race.finish(.success(nil))
                })
            abandon? { error in race.finish(.failure(error)) }
        }
    } onCancel: {
        race.finish(.failure(CancellationError()))
    }
}

/// The first of the body, the timer and cancellation resumes the waiter.
private final class DeadlineRace<T: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<T?, any Error>?
        var result: Result<T?, any Error>?
        var tasks: [Task<Void, Never>] = []
    }
    private let state = Mutex(State())

    func start(_ continuation: CheckedContinuation<T?, any Error>, work: Task<Void, Never>, timer: Task<Void, Never>) {
        let early: Result<T?, any Error>? = state.withLock { state in
            state.tasks = [work, timer]
            if let result = state.result { return result }
            state.continuation = continuation
            return nil
        }
        if let early {
            work.cancel()
            timer.cancel()
            continuation.resume(with: early)
        }
    }

    func finish(_ result: Result<T?, any Error>) {
        let (continuation, tasks): (CheckedContinuation<T?, any Error>?, [Task<Void, Never>]) = state.withLock { state in
            guard state.result == nil else { return (nil, []) }
            state.result = result
            defer { state.continuation = nil }
            return (state.continuation, state.tasks)
        }
        for task in tasks { task.cancel() }
        continuation?.resume(with: result)
    }
}
