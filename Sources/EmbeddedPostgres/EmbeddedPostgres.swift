import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// The one error type of the `EmbeddedPostgres` module.
public struct EmbeddedPostgresError: Error, Sendable, CustomStringConvertible {
    public var message: String
    /// The tail of the server or tool log, when there is one.
    public var log: String?

    public init(message: String, log: String? = nil) {
        self.message = message
        self.log = log
    }

    public var description: String {
        guard let log, !log.isEmpty else { return message }
        return "\(message)\n--- log ---\n\(log)"
    }
}

/// A private, throwaway PostgreSQL cluster started from the system's server
/// binaries: `initdb` into a temporary directory, then `pg_ctl start`,
/// listening on a Unix socket in that directory (and optionally on a TCP port
/// of 127.0.0.1).
///
/// PostgreSQL refuses to run as root, so when this process is root the server
/// runs as the `postgres` user. Unless ``Options/keepRunning`` is set, a small
/// watchdog stops the cluster and deletes its directory as soon as this
/// process exits, however it exits.
public final class EmbeddedPostgres: Sendable {
    public struct Options: Sendable {
        /// Where to create the cluster's directory; default the system temp directory.
        public var parentDirectory: String
        /// Directory of `initdb`, `pg_ctl` and `postgres`. Default: `PG_BINDIR`,
        /// else the newest `/usr/lib/postgresql/*/bin`, else the `PATH`.
        public var binDirectory: String?
        /// Also listen on 127.0.0.1 at this port.
        public var tcpPort: Int?
        /// Leave the cluster running after this process exits (no watchdog).
        public var keepRunning: Bool
        /// Extra server settings (`-c name=value`).
        public var settings: [String: String]

        public init(
            parentDirectory: String = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp", binDirectory: String? = nil, tcpPort: Int? = nil,
            keepRunning: Bool = false, settings: [String: String] = [:]
        ) {
            self.parentDirectory = parentDirectory
            self.binDirectory = binDirectory
            self.tcpPort = tcpPort
            self.keepRunning = keepRunning
            self.settings = settings
        }
    }

    /// The cluster's directory: data in `data/`, the socket and the log beside it.
    public let directory: String
    public let binDirectory: String
    /// The port number of the socket (and of TCP when enabled).
    public let port: Int
    public let tcpEnabled: Bool
    /// The superuser, `postgres`, with trust authentication.
    public let user = "postgres"
    private let runAsPostgres: Bool

    public var dataDirectory: String { directory + "/data" }
    public var logFile: String { directory + "/postgres.log" }

    /// A libpq-style URL for `database`, usable by psql, the CLI and
    /// `ConnectionSettings(url:)`.
    public func url(database: String = "postgres") -> String {
        if tcpEnabled {
            return "postgres://\(user)@127.0.0.1:\(port)/\(database)?sslmode=disable"
        }
        return "postgres://\(user)@/\(database)?host=\(directory)&port=\(port)"
    }

    private init(directory: String, binDirectory: String, port: Int, tcpEnabled: Bool, runAsPostgres: Bool) {
        self.directory = directory
        self.binDirectory = binDirectory
        self.port = port
        self.tcpEnabled = tcpEnabled
        self.runAsPostgres = runAsPostgres
    }

    /// Creates and starts a new cluster; returns once it accepts connections.
    public static func start(_ options: Options = Options(), logger: Logger = Logger(label: "embedded-postgres")) async throws -> EmbeddedPostgres {
        let bin = try findBinDirectory(options.binDirectory)
        var template = Array("\(options.parentDirectory)/dispatch-policy-pg-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else {
            throw EmbeddedPostgresError(message: "cannot create a temporary directory in \(options.parentDirectory): \(String(cString: strerror(errno)))")
        }
        let directory = String(cString: made)
        let asPostgres = geteuid() == 0
        if asPostgres {
            guard let pw = getpwnam("postgres") else {
                throw EmbeddedPostgresError(message: "running as root, but there is no postgres user to run the server as (PostgreSQL refuses to run as root)")
            }
            guard chown(directory, pw.pointee.pw_uid, pw.pointee.pw_gid) == 0 else {
                throw EmbeddedPostgresError(message: "cannot hand \(directory) to the postgres user: \(String(cString: strerror(errno)))")
            }
        }
        let port = options.tcpPort ?? 5432
        let cluster = EmbeddedPostgres(
            directory: directory, binDirectory: bin, port: port, tcpEnabled: options.tcpPort != nil, runAsPostgres: asPostgres)
        // The watchdog starts before initdb: a process interrupted while the
        // cluster is being made (Ctrl-C in the demo) leaves no directory.
        if !options.keepRunning {
            try cluster.startWatchdog()
        }
        logger.debug("initdb", metadata: ["postgres.directory": "\(directory)"])
        do {
            try cluster.runTool(
                "initdb", ["-D", cluster.dataDirectory, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }

        var settings: [String: String] = [
            "listen_addresses": options.tcpPort != nil ? "127.0.0.1" : "",
            "unix_socket_directories": directory,
            "port": String(port),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            // The test suite runs its cases in parallel, each on its own database.
            "max_connections": "1000",
            "shared_buffers": "256MB",
        ]
        settings.merge(options.settings) { _, new in new }
        let serverOptions = settings.sorted { $0.key < $1.key }
            .map { "-c \($0.key)=\(quoteForPgCtl($0.value))" }
            .joined(separator: " ")
        do {
            try cluster.runTool("pg_ctl", ["-D", cluster.dataDirectory, "-l", cluster.logFile, "-w", "-t", "120", "-o", serverOptions, "start"])
        } catch var error as EmbeddedPostgresError {
            error.log = (error.log ?? "") + "\n" + cluster.logTail()
            throw error
        }
        logger.info("embedded PostgreSQL started", metadata: ["postgres.url": "\(cluster.url())"])
        return cluster
    }

    /// Stops the server and deletes its directory.
    public func stop() throws {
        try runTool("pg_ctl", ["-D", dataDirectory, "-m", "fast", "-w", "stop"])
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Restarts the server as an operator would (`pg_ctl restart -m fast`):
    /// every session is ended, open transactions roll back, and the server
    /// accepts connections again, with the same settings, when this returns.
    public func restart() throws {
        try runTool("pg_ctl", ["-D", dataDirectory, "-l", logFile, "-m", "fast", "-w", "-t", "120", "restart"])
    }

    /// The last lines of the server log.
    public func logTail(lines: Int = 30) -> String {
        guard let text = try? String(contentsOfFile: logFile, encoding: .utf8) else { return "" }
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    // MARK: - Processes

    private func command(_ tool: String, _ arguments: [String]) -> (String, [String]) {
        let path = binDirectory + "/" + tool
        if runAsPostgres {
            return ("/usr/sbin/runuser", ["-u", "postgres", "--", path] + arguments)
        }
        return (path, arguments)
    }

    /// Runs a server tool to completion; throws with its output when it fails.
    private func runTool(_ tool: String, _ arguments: [String]) throws {
        let (executable, args) = command(tool, arguments)
        let outputPath = directory + "/.\(tool)-output"
        let status = try Spawn.run(executable, args, outputPath: outputPath, wait: true)
        let output = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
        try? FileManager.default.removeItem(atPath: outputPath)
        guard status == 0 else {
            throw EmbeddedPostgresError(message: "\(tool) failed with status \(status)", log: output)
        }
    }

    /// Starts a detached shell that waits for this process to end, then stops
    /// the cluster and removes its directory. Its standard streams go to
    /// /dev/null so it never holds a pipe of whoever started us open.
    private func startWatchdog() throws {
        let script = """
            while [ -d /proc/$1 ]; do sleep 1; done
            "$2/pg_ctl" -D "$3/data" -m immediate -w stop >/dev/null 2>&1
            rm -rf "$3"
            """
        let (executable, args) = runAsPostgres
            ? ("/usr/sbin/runuser", ["-u", "postgres", "--", "/bin/sh", "-c", script, "watchdog", String(getpid()), binDirectory, directory])
            : ("/bin/sh", ["-c", script, "watchdog", String(getpid()), binDirectory, directory])
        _ = try Spawn.run(executable, args, outputPath: "/dev/null", wait: false)
    }

    private static func quoteForPgCtl(_ value: String) -> String {
        // pg_ctl passes -o through /bin/sh.
        "'" + value.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }

    static func findBinDirectory(_ explicit: String?) throws -> String {
        let fm = FileManager.default
        func hasServer(_ dir: String) -> Bool {
            fm.isExecutableFile(atPath: dir + "/initdb") && fm.isExecutableFile(atPath: dir + "/pg_ctl")
        }
        if let dir = explicit ?? ProcessInfo.processInfo.environment["PG_BINDIR"], !dir.isEmpty {
            guard hasServer(dir) else {
                throw EmbeddedPostgresError(message: "no initdb and pg_ctl in \(dir)")
            }
            return dir
        }
        let versions = ((try? fm.contentsOfDirectory(atPath: "/usr/lib/postgresql")) ?? [])
            .compactMap { Int($0) }
            .sorted(by: >)
        for version in versions where hasServer("/usr/lib/postgresql/\(version)/bin") {
            return "/usr/lib/postgresql/\(version)/bin"
        }
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map(String.init) where hasServer(dir) {
            return dir
        }
        throw EmbeddedPostgresError(
            message: "no PostgreSQL server binaries found (looked in PG_BINDIR, /usr/lib/postgresql/*/bin and PATH)",
            log: "On Debian: apt-get install postgresql-15")
    }
}

/// posix_spawn and waitpid, without Foundation's Process (whose child
/// monitoring on Linux can miss an exit when another Process object is
/// released while its child still runs).
public enum Spawn {
    /// Adds to `actions` the closing in the child of every descriptor from 3
    /// up (glibc's posix_spawn_file_actions_addclosefrom_np, looked up at run
    /// time as Swift's Glibc module does not export it; else each
    /// descriptor open now).
    public static func closeInherited(_ actions: inout posix_spawn_file_actions_t) {
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        if let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") {
            _ = unsafeBitCast(symbol, to: CloseFrom.self)(&actions, 3)
            return
        }
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            if let fd = Int32(name), fd > 2 { posix_spawn_file_actions_addclose(&actions, fd) }
        }
    }

    /// Runs `executable` with standard input from /dev/null and standard
    /// output and error into `outputPath`. Returns the exit status when
    /// `wait` is true, else 0 right after starting it.
    static func run(_ executable: String, _ arguments: [String], outputPath: String, wait: Bool) throws -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // Nothing else of this process: an inherited socket (a database
        // session) would stay open as long as the child (the watchdog lives
        // as long as the cluster), and its server session with it.
        Spawn.closeInherited(&actions)

        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, environ)
        guard spawned == 0 else {
            throw EmbeddedPostgresError(message: "cannot run \(executable): \(String(cString: strerror(spawned)))")
        }
        guard wait else { return 0 }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1 {
            guard errno == EINTR else {
                throw EmbeddedPostgresError(message: "waiting for \(executable) failed: \(String(cString: strerror(errno)))")
            }
        }
        // WIFEXITED / WEXITSTATUS, which Swift does not import as functions.
        return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}
