import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle

/// A claimed job, as a handler sees it.
public struct Job: Sendable, Equatable {
    public var id: Int64
    public var policy: String
    public var queue: String
    /// The job arguments as JSON text.
    public var argsJSON: String
    /// The job context as JSON text.
    public var contextJSON: String
    /// Which attempt this is (1 for the first).
    public var attempt: Int
    public var leaseExpiresAt: Date

    /// The arguments decoded into `T`.
    public func args<T: Decodable>(as type: T.Type = T.self) throws -> T {
        try JSONDecoder().decode(T.self, from: Data(argsJSON.utf8))
    }
}

/// How a ``Worker`` claims and runs jobs.
public struct WorkerOptions: Sendable {
    /// Queues to claim from, in turn.
    public var queues: [String] = ["default"]
    /// Recorded on claimed jobs (`admitted_jobs.worker`).
    public var name: String = "\(ProcessInfo.processInfo.hostName):\(getpid())"
    /// Jobs run at once.
    public var concurrency: Int = 4
    /// How long to wait for work before claiming again (cut short by NOTIFY).
    public var pollInterval: Duration = .seconds(1)
    /// How often to extend the lease of a running job.
    public var heartbeatInterval: Duration = .seconds(30)
    /// Delay before a failed job is retried; nil uses the exponential backoff.
    public var retryIn: Duration?

    public init() {}
}

/// Runs jobs of the built-in ready queue: claims with bounded concurrency,
/// runs the handler registered for the job's policy, heartbeats long jobs,
/// completes them, or fails them when the handler throws (the job is then
/// retried through admission, or dead after `max_attempts`).
///
/// A swift-service-lifecycle `Service`: on graceful shutdown it stops
/// claiming and returns once the running jobs have finished.
///
/// ```swift
/// var worker = Worker(connection: settings, logger: logger)
/// worker.register("send_webhook") { job in
///     let event = try job.args(as: WebhookEvent.self)
///     try await deliver(event)
/// }
/// ```
public struct Worker: Service {
    public typealias Handler = @Sendable (Job) async throws -> Void

    public let connection: ConnectionSettings
    public var options: WorkerOptions
    public let logger: Logger
    private var handlers: [String: Handler] = [:]

    public init(connection: ConnectionSettings, options: WorkerOptions = WorkerOptions(), logger: Logger) {
        self.connection = connection
        self.options = options
        self.logger = logger
    }

    /// Runs `handler` for jobs of `policy`.
    public mutating func register(_ policy: String, _ handler: @escaping Handler) {
        handlers[policy] = handler
    }

    public func run() async throws {
        try await connection.withConnection(logger: logger) { conn in
            try await connection.withConnection(logger: logger) { listener in
                await loop(conn: conn, listener: listener)
            }
        }
    }

    private func loop(conn: PostgresConnection, listener: PostgresConnection) async {
        let wake = WakeSignal()
        let running = Gauge()
        let queues = Set(options.queues)
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                // Without notifications the worker still polls every pollInterval.
                try? await listener.listen(on: "dispatch_policy_admitted") { notifications in
                    for try await notification in notifications where queues.contains(notification.payload) {
                        await wake.signal()
                    }
                }
            }
            await withDiscardingTaskGroup { jobs in
                var next = 0
                while !Task.isCancelled && !Task.isShuttingDownGracefully {
                    var free = options.concurrency - (await running.value)
                    var claimedAny = false
                    var tried = 0
                    while free > 0 && tried < options.queues.count {
                        let queue = options.queues[next % options.queues.count]
                        next += 1
                        tried += 1
                        let claimed: [Job]
                        do {
                            claimed = try await claim(conn, queue: queue, max: free)
                        } catch {
                            logger.error("claim failed", metadata: ["worker.queue": "\(queue)", "error": "\(error)"])
                            break
                        }
                        for job in claimed {
                            claimedAny = true
                            free -= 1
                            await running.add(1)
                            jobs.addTask {
                                await process(job, conn: conn)
                                await running.add(-1)
                                await wake.signal()
                            }
                        }
                    }
                    if !claimedAny || free == 0 {
                        await withGracefulShutdownHandler {
                            await wake.wait(upTo: options.pollInterval)
                        } onGracefulShutdown: {
                            Task { await wake.signal() }
                        }
                    }
                }
                // Leaving the discarding group waits for the running jobs: the drain.
            }
            group.cancelAll()
        }
    }

    private func claim(_ conn: PostgresConnection, queue: String, max: Int) async throws -> [Job] {
        try await conn.rows(
            """
            SELECT id, policy, queue, args::text, context::text, attempt, lease_expires_at
            FROM dispatch_policy.claim(\(queue), \(options.name), \(max)::integer)
            """,
            logger: logger
        ).map { row in
            let (id, policy, queue, args, context, attempt, expires) = try row.decode((Int64, String, String, String, String, Int, Date).self)
            return Job(id: id, policy: policy, queue: queue, argsJSON: args, contextJSON: context, attempt: attempt, leaseExpiresAt: expires)
        }
    }

    private func process(_ job: Job, conn: PostgresConnection) async {
        let log = {
            var log = logger
            log[metadataKey: "job.id"] = "\(job.id)"
            log[metadataKey: "policy.name"] = "\(job.policy)"
            return log
        }()
        let outcome: Result<Void, any Error>
        if let handler = handlers[job.policy] {
            outcome = await withTaskGroup(of: Result<Void, any Error>?.self) { group in
                group.addTask {
                    do {
                        try await handler(job)
                        return .success(())
                    } catch {
                        return .failure(error)
                    }
                }
                group.addTask {
                    // Heartbeats until the handler is done (this task is then cancelled).
                    while !Task.isCancelled {
                        try? await Task.sleep(for: options.heartbeatInterval)
                        if Task.isCancelled { break }
                        do {
                            _ = try await conn.rows("SELECT dispatch_policy.heartbeat(\(job.id))", logger: log)
                        } catch {
                            log.warning("heartbeat failed", metadata: ["error": "\(error)"])
                        }
                    }
                    return nil
                }
                let first = await group.next()!!
                group.cancelAll()
                return first
            }
        } else {
            outcome = .failure(DispatchPolicyError(code: .invalidArgument, message: "no handler registered for policy \(job.policy)"))
        }
        do {
            switch outcome {
            case .success:
                _ = try await conn.rows("SELECT dispatch_policy.complete(\(job.id))", logger: log)
            case .failure(let error):
                let retry = options.retryIn.map { Double($0.components.seconds) + Double($0.components.attoseconds) / 1e18 }
                let state = try await conn.rows(
                    "SELECT dispatch_policy.fail(\(job.id), \(String(describing: error)), make_interval(secs => \(retry)::float8))",
                    logger: log
                ).first?.decode(String.self)
                log.info("job failed", metadata: ["error": "\(error)", "job.state": "\(state ?? "")"])
            }
        } catch {
            log.error("could not record the job's outcome", metadata: ["error": "\(error)"])
        }
    }
}

/// A counter shared by the claim loop and the job tasks.
actor Gauge {
    private(set) var value = 0
    func add(_ delta: Int) { value += delta }
}
