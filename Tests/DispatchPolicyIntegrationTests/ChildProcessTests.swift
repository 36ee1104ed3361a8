import EmbeddedPostgres
import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The descriptors process `pid` has open, by number (Linux: /proc).
func openDescriptors(_ pid: String) -> [Int] {
    ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).compactMap { Int($0) }.sorted()
}

/// A descriptor of this process, as a socket or a file opened by any code
/// might be: without close-on-exec, so only the spawner keeps it from a child.
private func withInheritableDescriptor<T>(_ body: (Int32) async throws -> T) async throws -> T {
    let fd = open("/dev/null", O_RDONLY)
    try #require(fd >= 0)
    defer { close(fd) }
    try #require(fcntl(fd, F_GETFD) & FD_CLOEXEC == 0, "the descriptor would not be inherited anyway")
    return try await body(fd)
}

/// Issue 11: children are started through swift-subprocess. A descriptor a
/// child inherits stays open as long as the child: a database socket kept
/// its session (and "template is being accessed by other users") alive.
@Suite("Child processes: nothing inherited, a detached watchdog", .timeLimit(.minutes(3)))
struct ChildProcessTests {
    @Test("a child of the tests has standard input, output and error open, and no other descriptor of the test process")
    func childInheritsNothing() async throws {
        let server = try await TestServer.shared.get()
        try await withInheritableDescriptor { held in
            // A database session open while it starts, too.
            try await TestServer.withConnection(server.admin) { _ in
                let child = try await spawnChild("/bin/sh", ["-c", "ls /proc/$$/fd; true"], environment: [:])
                #expect(await child.wait() == .exited(0))
                let fds = child.output().stdout.split(separator: "\n").compactMap { Int($0) }.sorted()
                #expect(fds == [0, 1, 2], "the test process held \(held) and a database socket; the child had \(fds)")
            }
        }
    }

    @Test("the embedded cluster's watchdog runs detached, in a session of its own, with no descriptor of the process that started it")
    func watchdogInheritsNothing() async throws {
        let bin = try await TestServer.shared.binDirectory()
        let server = try await TestServer.shared.get()
        try await withInheritableDescriptor { held in
            try await TestServer.withConnection(server.admin) { _ in
                let cluster = try await EmbeddedPostgres.start(.init(binDirectory: bin))
                let checked = Result { try checkWatchdogs(of: cluster, held: held) }
                try await cluster.stop()
                try checked.get()
            }
        }
    }

    /// Checks the watchdog of `cluster`: the watching shell (and a fork of it
    /// not yet `sleep`, if caught at that moment).
    private func checkWatchdogs(of cluster: EmbeddedPostgres, held: Int32) throws {
        let watchdogs = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).filter { name in
            guard Int32(name) != nil, let cmdline = FileManager.default.contents(atPath: "/proc/\(name)/cmdline") else { return false }
            let args = cmdline.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            // It waits in the cluster's directory.
            return args.contains("watchdog")
                && (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(name)/cwd")) == cluster.directory
        }
        try #require(!watchdogs.isEmpty, "no watchdog process for \(cluster.directory)")
        for pid in watchdogs {
            let fds = openDescriptors(pid)
            #expect(fds == [0, 1, 2], "this process held \(held) and a database socket; the watchdog \(pid) had \(fds)")
            for fd in fds {
                #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)")) == "/dev/null")
            }
            // Not our child: nothing here waits on it, and it outlives us.
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            let parent = stat.split(separator: ")").last?.split(separator: " ").dropFirst().first.flatMap { Int32($0) }
            #expect(parent != nil && parent != getpid())
            // Out of our session: a Ctrl-C or a hangup that ends us does not end it.
            #expect(getsid(Int32(pid)!) != getsid(0))
        }
    }
}
