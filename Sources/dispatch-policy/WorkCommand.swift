import ArgumentParser
import DispatchPolicy
import Foundation
import Logging
import ServiceLifecycle
import Subprocess

#if canImport(System)
    import System
#else
    import SystemPackage
    import UnixSignals
#endif

/// `dispatch-policy work`: a worker for any language. Claims jobs of the
/// given policies from the ready queue and runs a command once per job.
///
/// Unix only (Linux, macOS): a command whose lease is lost is stopped with
/// SIGTERM, then SIGKILL (swift-subprocess's teardown sequence, which
/// Windows does not have).
struct Work: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "work",
        abstract: "Run a command for each admitted job of the ready queue.",
        discussion: """
            Claims jobs of the named policies and runs COMMAND once per job, up to \
            --concurrency at once: the job's args (JSON) on standard input; \
            DISPATCH_POLICY_JOB_ID, DISPATCH_POLICY_POLICY, DISPATCH_POLICY_QUEUE, \
            DISPATCH_POLICY_ATTEMPT and DISPATCH_POLICY_CONTEXT (JSON) in its environment; \
            its standard output and error go to the worker's. Exit status 0 completes \
            the job; any other status (or a signal) fails the attempt, with the last \
            2 kB of its standard error as the error, and the job is retried through \
            admission or dead after max_attempts. The lease is renewed while the \
            command runs; when it is lost, the command gets SIGTERM (SIGKILL after \
            --kill-after). SIGTERM or SIGINT to the worker stops claiming and waits \
            for running commands (up to --shutdown-timeout), then exits 0. \
            Needs the dispatch_policy_worker role.
            """
    )

    @OptionGroup var connection: ConnectionOptions

    @Option(name: .customLong("policy"), help: "A policy whose jobs to run (repeat for several; at least one).")
    var policies: [String] = []

    @Option(name: .customLong("queue"), help: "A queue to claim from (repeat for several; default: default).")
    var queues: [String] = []

    @Option(help: "Commands run at once (1 to 1000).")
    var concurrency: Int = 4

    @Option(
        name: .customLong("kill-after"), parsing: .unconditional,
        help: "After SIGTERM to a command whose lease was lost, SIGKILL after this long (0s to 1h).")
    var killAfter: String = "10s"

    @Option(
        name: .customLong("shutdown-timeout"), parsing: .unconditional,
        help: "On SIGTERM or SIGINT, wait this long for running commands (1s to 1h).")
    var shutdownTimeout: String = "60s"

    @Argument(parsing: .postTerminator, help: "The command and its arguments, after --.")
    var command: [String] = []

    static let killAfterRange: ClosedRange<Duration> = .zero ... .seconds(3600)

    func validate() throws {
        guard !policies.isEmpty else { throw ValidationError("at least one --policy is needed") }
        guard !command.isEmpty else {
            throw ValidationError("the command to run comes after --, as in: dispatch-policy work --policy p -- ./handle-job")
        }
        guard JobCommand.resolve(command[0]) != nil else {
            // Else every job would burn through its attempts and end dead.
            throw ValidationError("\(command[0]) is not an executable file\(command[0].contains("/") ? "" : " on PATH")")
        }
        guard (1...1000).contains(concurrency) else { throw ValidationError("--concurrency must be from 1 to 1000, got \(concurrency)") }
        do {
            _ = try DurationParser.parse(killAfter, flag: "--kill-after", within: Self.killAfterRange)
            _ = try DurationParser.parse(shutdownTimeout, flag: "--shutdown-timeout", within: CLILimits.shutdownTimeout)
        } catch let error as DispatchPolicyError {
            throw ValidationError(error.message)
        }
    }

    func run() async throws {
        // A closed standard output or error (a log reader gone) is not a reason to die.
        signal(SIGPIPE, SIG_IGN)
        let logger = connection.makeLogger(defaultLevel: .info)
        try await reportingErrors {
            let settings = try connection.settings()
            var options = WorkerOptions()
            if !queues.isEmpty { options.queues = queues }
            options.concurrency = concurrency
            let runner = JobCommand(
                command: command,
                killAfter: try DurationParser.parse(killAfter, flag: "--kill-after", within: Self.killAfterRange))
            var worker = Worker(connection: settings, options: options, logger: logger)
            for policy in Set(policies) {
                worker.register(policy) { job in try await runner.run(job) }
            }
            var configuration = ServiceGroupConfiguration(
                services: [.init(service: worker)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
            configuration.maximumGracefulShutdownDuration = try DurationParser.parse(
                shutdownTimeout, flag: "--shutdown-timeout", within: CLILimits.shutdownTimeout)
            configuration.maximumCancellationDuration = runner.killAfter + .seconds(5)
            try await ServiceGroup(configuration: configuration).run()
        }
    }
}

/// Runs one job's command; throws (failing the attempt) unless it exits 0.
struct JobCommand: Sendable {
    var command: [String]
    var killAfter: Duration

    /// What the attempt's error says when the command does not exit 0.
    struct Failed: Error, CustomStringConvertible {
        var description: String
    }

    static let tailBytes = 2048

    /// The job's args in an unlinked temporary file (mode 0600), open for
    /// reading from its start.
    static func argsFile(_ job: Job) throws -> FileDescriptor {
        let directory = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        let path = "\(directory)/dispatch-policy-job-\(job.id)-\(UUID().uuidString)"
        let fd = try FileDescriptor.open(
            FilePath(path), .readWrite, options: [.create, .exclusiveCreate], permissions: [.ownerReadWrite])
        unlink(path)
        do {
            try fd.writeAll(Array(job.argsJSON.utf8))
            try fd.seek(offset: 0, from: .start)
        } catch {
            try? fd.close()
            throw error
        }
        return fd
    }

    /// Where `name` would be run from: itself when it holds a slash, else
    /// the first executable file of that name on PATH; nil when none.
    static func resolve(_ name: String, path: String? = ProcessInfo.processInfo.environment["PATH"]) -> String? {
        func runnable(_ file: String) -> Bool {
            var isDirectory: ObjCBool = false
            return FileManager.default.fileExists(atPath: file, isDirectory: &isDirectory) && !isDirectory.boolValue
                && access(file, X_OK) == 0
        }
        if name.contains("/") { return runnable(name) ? name : nil }
        for dir in (path ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":") where runnable("\(dir)/\(name)") {
            return "\(dir)/\(name)"
        }
        return nil
    }

    func run(_ job: Job) async throws {
        let executable: Executable = command[0].contains("/") ? .path(FilePath(command[0])) : .name(command[0])
        // The args from a file, not a pipe: a command may exit without reading
        // them (a pipe written after its reader is gone is an error).
        let input = try Self.argsFile(job)
        var platform = PlatformOptions()
        // Cancelled (the lease was lost, or the worker is cancelled): SIGTERM, then SIGKILL.
        platform.teardownSequence = [.gracefulShutDown(allowedDurationToNextStep: killAfter)]
        let result = try await Subprocess.run(
            executable,
            arguments: Arguments(Array(command.dropFirst())),
            environment: .inherit.updating([
                "DISPATCH_POLICY_JOB_ID": String(job.id),
                "DISPATCH_POLICY_POLICY": job.policy,
                "DISPATCH_POLICY_QUEUE": job.queue,
                "DISPATCH_POLICY_ATTEMPT": String(job.attempt),
                "DISPATCH_POLICY_CONTEXT": job.contextJSON,
            ]),
            platformOptions: platform,
            input: .fileDescriptor(input, closeAfterSpawningProcess: true),
            output: .currentStandardOutput,
            error: .sequence
        ) { execution in
            // Passed on to the worker's standard error as it comes; the tail kept for the error.
            var tail: [UInt8] = []
            for try await chunk in execution.standardError {
                let bytes = chunk.withUnsafeBytes { Array($0) }
                // A closed standard error (a log reader gone) must not end the worker.
                try? FileHandle.standardError.write(contentsOf: Data(bytes))
                tail.append(contentsOf: bytes)
                if tail.count > Self.tailBytes { tail.removeFirst(tail.count - Self.tailBytes) }
            }
            return String(decoding: tail, as: UTF8.self)
        }
        let stderrTail = result.closureResult.trimmingCharacters(in: .whitespacesAndNewlines)
        switch result.terminationStatus {
        case .exited(0):
            return
        case .exited(let code):
            throw Failed(description: "\(command[0]) exited with status \(code)" + (stderrTail.isEmpty ? "" : ": \(stderrTail)"))
        case .signaled(let signal):
            throw Failed(description: "\(command[0]) was killed by signal \(signal)" + (stderrTail.isEmpty ? "" : ": \(stderrTail)"))
        }
    }
}
