import EmbeddedPostgres
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A child process started with posix_spawn. Tests do not use Foundation's
/// Process: on Linux its exit monitoring can miss a child's exit when many
/// run at once (seen here: waitUntilExit hung on a zombie).
struct Child: Sendable {
    let pid: pid_t
    let stdoutPath: String
    let stderrPath: String

    /// How the child ended: its exit status, or the signal that killed it.
    enum Ending: Sendable, Equatable {
        case exited(Int32)
        case signaled(Int32)
    }

    /// Waits for the child on a dedicated thread (never a cooperative one).
    func wait() async -> Ending {
        await withCheckedContinuation { (continuation: CheckedContinuation<Ending, Never>) in
            let pid = self.pid
            Thread {
                var status: Int32 = 0
                while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
                let ending: Ending = (status & 0x7f) == 0 ? .exited((status >> 8) & 0xff) : .signaled(status & 0x7f)
                continuation.resume(returning: ending)
            }.start()
        }
    }

    func output() -> (stdout: String, stderr: String) {
        ((try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? "",
         (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "")
    }
}

/// Starts `executable`; standard output and error go to temporary files,
/// standard input comes from `stdin` (or /dev/null).
func spawnChild(_ executable: String, _ arguments: [String], environment: [String: String], stdin: String? = nil) throws -> Child {
    let dir = FileManager.default.temporaryDirectory.path
    let id = UUID().uuidString
    let outPath = "\(dir)/dp-child-\(id).out", errPath = "\(dir)/dp-child-\(id).err"
    var inPath = "/dev/null"
    if let stdin {
        inPath = "\(dir)/dp-child-\(id).in"
        try stdin.write(toFile: inPath, atomically: true, encoding: .utf8)
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, inPath, O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    // No other descriptor of the test process (its database sessions above all).
    Spawn.closeInherited(&actions)
    let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
    let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
        argv.forEach { free($0) }
        envp.forEach { free($0) }
    }
    var pid: pid_t = 0
    let result = posix_spawn(&pid, executable, &actions, nil, argv, envp)
    guard result == 0 else {
        throw NSError(domain: "spawn", code: Int(result), userInfo: [NSLocalizedDescriptionKey: "cannot run \(executable): \(String(cString: strerror(result)))"])
    }
    return Child(pid: pid, stdoutPath: outPath, stderrPath: errPath)
}
