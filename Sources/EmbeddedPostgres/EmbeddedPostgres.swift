import Foundation
import Logging
import Subprocess

#if canImport(Glibc)
    import Glibc
#endif

#if canImport(System)
    import System
#else
    import SystemPackage
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
///
/// Linux only: the watchdog watches this process through /proc, and a root
/// process runs the server tools with util-linux's `runuser`. Elsewhere
/// ``start(_:logger:)`` refuses unless ``Options/keepRunning`` is set (no
/// watchdog; stop the cluster yourself).
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
            parentDirectory: String = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp",
            binDirectory: String? = nil, tcpPort: Int? = nil,
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
    public static func start(_ options: Options = Options(), logger: Logger = Logger(label: "embedded-postgres")) async throws
        -> EmbeddedPostgres
    {
        #if !os(Linux)
            guard options.keepRunning else {
                throw EmbeddedPostgresError(
                    message:
                        "the embedded cluster's watchdog runs on Linux only (it watches this process through /proc); start it with keepRunning and stop it yourself"
                )
            }
        #endif
        let bin = try findBinDirectory(options.binDirectory)
        let asPostgres = geteuid() == 0
        var postgresUser: (uid: uid_t, gid: gid_t)?
        if asPostgres {
            guard let pw = getpwnam("postgres") else {
                throw EmbeddedPostgresError(
                    message: "running as root, but there is no postgres user to run the server as (PostgreSQL refuses to run as root)")
            }
            postgresUser = (pw.pointee.pw_uid, pw.pointee.pw_gid)
        }
        // The watchdog makes the directory itself: a process interrupted
        // while the cluster is being made (Ctrl-C in the demo) leaves no
        // directory without a watchdog to remove it.
        let directory =
            options.keepRunning
            ? try makeDirectory(in: options.parentDirectory, owner: postgresUser)
            : try await startWatchdog(in: options.parentDirectory, binDirectory: bin, runAsPostgres: asPostgres)
        let port = options.tcpPort ?? 5432
        let cluster = EmbeddedPostgres(
            directory: directory, binDirectory: bin, port: port, tcpEnabled: options.tcpPort != nil, runAsPostgres: asPostgres)
        logger.debug("initdb", metadata: ["postgres.directory": "\(directory)"])
        do {
            try await cluster.runTool(
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
            try await cluster.runTool(
                "pg_ctl", ["-D", cluster.dataDirectory, "-l", cluster.logFile, "-w", "-t", "120", "-o", serverOptions, "start"])
        } catch var error as EmbeddedPostgresError {
            error.log = (error.log ?? "") + "\n" + cluster.logTail()
            throw error
        }
        logger.info("embedded PostgreSQL started", metadata: ["postgres.url": "\(cluster.url())"])
        return cluster
    }

    /// Stops the server and deletes its directory.
    public func stop() async throws {
        try await runTool("pg_ctl", ["-D", dataDirectory, "-m", "fast", "-w", "stop"])
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Restarts the server as an operator would (`pg_ctl restart -m fast`):
    /// every session is ended, open transactions roll back, and the server
    /// accepts connections again, with the same settings, when this returns.
    public func restart() async throws {
        try await runTool("pg_ctl", ["-D", dataDirectory, "-l", logFile, "-m", "fast", "-w", "-t", "120", "restart"])
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
    /// Standard input is /dev/null; output and error are collected together.
    /// swift-subprocess closes every other descriptor of this process in the
    /// child (close_range, or posix_spawn's addclosefrom), so no database
    /// session of ours ends up held open by the server `pg_ctl` starts.
    private func runTool(_ tool: String, _ arguments: [String]) async throws {
        let (executable, args) = command(tool, arguments)
        let result: ExecutionResult<Void, StringOutput<UTF8>, CombinedErrorOutput>
        do {
            result = try await Subprocess.run(
                .path(FilePath(executable)), arguments: Arguments(args),
                input: .none, output: .string(limit: Self.toolOutputLimit), error: .combinedWithOutput)
        } catch {
            throw EmbeddedPostgresError(message: "cannot run \(tool): \(error)")
        }
        switch result.terminationStatus {
        case .exited(0):
            return
        case .exited(let status):
            throw EmbeddedPostgresError(message: "\(tool) failed with status \(status)", log: result.standardOutput)
        case .signaled(let signal):
            throw EmbeddedPostgresError(message: "\(tool) was killed by signal \(signal)", log: result.standardOutput)
        }
    }

    /// Enough for initdb's chatter; a tool that writes more fails.
    private static let toolOutputLimit = 1 << 20

    /// A new directory in `parent` (for a cluster without a watchdog),
    /// handed to `owner`.
    private static func makeDirectory(in parent: String, owner: (uid: uid_t, gid: gid_t)?) throws -> String {
        var template = Array("\(parent)/dispatch-policy-pg-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else {
            throw EmbeddedPostgresError(message: "cannot create a temporary directory in \(parent): \(String(cString: strerror(errno)))")
        }
        let directory = String(cString: made)
        if let owner, chown(directory, owner.uid, owner.gid) != 0 {
            throw EmbeddedPostgresError(message: "cannot hand \(directory) to the postgres user: \(String(cString: strerror(errno)))")
        }
        return directory
    }

    /// Makes the cluster's directory in `parent` and starts a detached shell
    /// that waits for this process to end, then stops the cluster and
    /// removes the directory; returns the directory. The shell makes the
    /// directory itself (mktemp, as the user the server runs as), so the
    /// directory never exists without its watchdog, however early this
    /// process is interrupted.
    ///
    /// The shell puts the watch in the background (`&`), prints the
    /// directory and exits, so `run` returns at once and nothing of this
    /// process waits on the watch: it is reparented to init and lives as
    /// long as the cluster, in the directory (its working directory: how
    /// one is found). Its standard streams are /dev/null (no pipe of ours
    /// held open) and, as in every child of swift-subprocess, no other
    /// descriptor of this process is inherited: an inherited database
    /// socket would keep its server session alive as long as the watch
    /// ("template is being accessed by other users"). It runs in a session
    /// of its own (`createSession`), so a Ctrl-C or a hangup of our
    /// terminal, which ends us, does not reach it.
    ///
    /// Linux only: it watches this process through /proc (`kill -0` cannot,
    /// when the watch runs as postgres and we as root).
    private static func startWatchdog(in parent: String, binDirectory: String, runAsPostgres: Bool) async throws -> String {
        let script = """
            dir=$(mktemp -d "$2/dispatch-policy-pg-XXXXXX") || exit 1
            cd "$dir" || exit 1
            {
            while [ -d /proc/$1 ]; do sleep 1; done
            "$3/pg_ctl" -D "$dir/data" -m immediate -w stop
            cd /
            rm -rf "$dir"
            } </dev/null >/dev/null 2>&1 &
            printf '%s' "$dir"
            """
        let arguments = ["-c", script, "watchdog", String(getpid()), parent, binDirectory]
        let (executable, args) =
            runAsPostgres
            ? ("/usr/sbin/runuser", ["-u", "postgres", "--", "/bin/sh"] + arguments)
            : ("/bin/sh", arguments)
        var platform = PlatformOptions()
        platform.createSession = true
        let result: ExecutionResult<Void, StringOutput<UTF8>, StringOutput<UTF8>>
        do {
            result = try await Subprocess.run(
                .path(FilePath(executable)), arguments: Arguments(args), platformOptions: platform,
                input: .none, output: .string(limit: 4096), error: .string(limit: 4096))
        } catch {
            throw EmbeddedPostgresError(message: "cannot start the watchdog: \(error)")
        }
        let directory = result.standardOutput
        guard result.terminationStatus.isSuccess, directory.hasPrefix(parent + "/dispatch-policy-pg-") else {
            throw EmbeddedPostgresError(
                message: "cannot create a temporary directory in \(parent) with its watchdog (\(result.terminationStatus))",
                log: result.standardError)
        }
        return directory
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
