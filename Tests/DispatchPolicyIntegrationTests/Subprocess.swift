import Foundation
import Subprocess
import Synchronization
import Testing

#if canImport(System)
    import System
#else
    import SystemPackage
#endif

/// A child process of a test (the CLI, psql, make), run with
/// swift-subprocess. It inherits no descriptor of the test process but its
/// standard streams (swift-subprocess closes the rest in the child), so no
/// database session of the tests stays open in it.
///
/// Unlike swift-subprocess's structured `run { }`, a Child outlives the call
/// that starts it, as the tests need: they signal it by pid and wait for it
/// when they choose. A task of its own runs it to its end and reaps it;
/// ``wait()`` awaits that task.
struct Child: Sendable {
    let pid: pid_t
    let stdoutPath: String
    let stderrPath: String
    fileprivate let ending: Task<Ending, Never>
    fileprivate let reaped: ReapedFlag

    /// How the child ended: its exit status, or the signal that killed it.
    enum Ending: Sendable, Equatable {
        case exited(Int32)
        case signaled(Int32)
    }

    /// Waits for the child to end (it is reaped then: its pid may be reused).
    func wait() async -> Ending {
        await ending.value
    }

    /// Sends `signal` while the child is not yet reaped; after that its pid
    /// may belong to another process, which is left alone.
    func signal(_ signal: Int32) {
        reaped.unlessSet { _ = kill(pid, signal) }
    }

    /// What it wrote so far (all of it once it ended).
    func output() -> (stdout: String, stderr: String) {
        (
            (try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? "",
            (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? ""
        )
    }
}

/// Set once a child is reaped; `unlessSet` runs its body under the same
/// lock, so a signal is never sent after the flag is set.
final class ReapedFlag: Sendable {
    private let state = Mutex(false)

    func set() { state.withLock { $0 = true } }

    func unlessSet(_ body: () -> Void) { state.withLock { if !$0 { body() } } }
}

/// Starts `executable` (a path) with exactly `environment`; standard output
/// and error go to temporary files, standard input comes from `stdin` (or
/// /dev/null). Returns once it runs.
func spawnChild(_ executable: String, _ arguments: [String], environment: [String: String], stdin: String? = nil) async throws -> Child {
    let dir = FileManager.default.temporaryDirectory.path
    let id = UUID().uuidString
    let outPath = "\(dir)/dp-child-\(id).out"
    let errPath = "\(dir)/dp-child-\(id).err"
    var inPath = "/dev/null"
    if let stdin {
        // A file, not a pipe: a child that exits without reading all of it is no error.
        inPath = "\(dir)/dp-child-\(id).in"
        try stdin.write(toFile: inPath, atomically: true, encoding: .utf8)
    }
    let input = try FileDescriptor.open(FilePath(inPath), .readOnly)
    let output = try FileDescriptor.open(
        FilePath(outPath), .writeOnly, options: [.create, .truncate], permissions: [.ownerReadWrite, .groupRead, .otherRead])
    let error = try FileDescriptor.open(
        FilePath(errPath), .writeOnly, options: [.create, .truncate], permissions: [.ownerReadWrite, .groupRead, .otherRead])
    let environment = Dictionary(uniqueKeysWithValues: environment.map { (Environment.Key(stringLiteral: $0.key), $0.value) })

    // The pid once it runs, or why it could not be started.
    let (started, start) = AsyncThrowingStream<pid_t, any Error>.makeStream()
    let reaped = ReapedFlag()
    let ending = Task { () -> Child.Ending in
        defer { reaped.set() }
        var running = false
        do {
            let result = try await Subprocess.run(
                .path(FilePath(executable)), arguments: Arguments(arguments), environment: .custom(environment),
                input: .fileDescriptor(input, closeAfterSpawningProcess: true),
                output: .fileDescriptor(output, closeAfterSpawningProcess: true),
                error: .fileDescriptor(error, closeAfterSpawningProcess: true)
            ) { execution in
                running = true
                start.yield(execution.processIdentifier.value)
                start.finish()
            }
            switch result.terminationStatus {
            case .exited(let code): return .exited(code)
            case .signaled(let signal): return .signaled(signal)
            }
        } catch {
            start.finish(throwing: error)
            // Started, but not watched to its end (never seen): a failed test, not a hang.
            if running { Issue.record(error, "waiting for \(executable)") }
            return .exited(-1)
        }
    }
    for try await pid in started {
        return Child(pid: pid, stdoutPath: outPath, stderrPath: errPath, ending: ending, reaped: reaped)
    }
    // The stream ends with a pid or an error; only cancellation gets here.
    throw CancellationError()
}
