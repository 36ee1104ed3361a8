// swift-format-ignore-file
// (Its lines are the README's, as written there: ReadmeSnippetTests.)
// The README's Swift examples, compiled with the package so they cannot
// drift: ReadmeSnippetTests checks that every ```swift block of the README
// appears here verbatim (imports at the top of this file, the rest in
// readmeExamples() below, in order). Built, never run.
import DispatchPolicy
import ServiceLifecycle
import Logging
import PostgresNIO
import UnixSignals

struct WebhookEvent: Decodable {
    var eventID: Int
}

func deliver(_ event: WebhookEvent) async throws {}

func readmeExamples(logger: Logger, json: String) async throws {
    let settings = try ConnectionSettings.resolve(url: nil)      // DATABASE_URL or PG*
    let connection = try await settings.connect(logger: logger)
    try await Migrator(logger: logger).migrate(on: connection)
    try await PolicyCatalog(executor: connection).declare(name: "webhooks", config: json)
    let staged = try await Stager(executor: connection).stage(
        policy: "webhooks",
        try JobSpec(args: ["event_id": 123], context: ["account_id": "42"], dedupeKey: "event:123"))
    // staged.id: the job holding the key; staged.outcome: .inserted, .replaced, .kept or .dropped

    let webhooks = PolicyConfig(roundRobinBy: "{account_id}") {
        Gate.throttle(name: "per_endpoint", rate: .context("rate_limit", default: 60), per: 60,
                      partitionBy: "{endpoint_id}")
        Gate.concurrency(max: 5, partitionBy: "acct:{account_id}")
        Gate.adaptiveConcurrency(partitionBy: "{account_id}", initialMax: 3, targetLagMs: 1000)
    }
    try await PolicyCatalog(executor: connection).declare(name: "webhooks", config: try webhooks.json())

    // Admission inside your own service group (TickRunnerOptions.policies
    // restricts it, and its reaping and pruning, to some policies):
    let runner = TickRunner(connection: settings, logger: logger)
    try await ServiceGroup(configuration: .init(services: [runner], gracefulShutdownSignals: [.sigterm], logger: logger)).run()

    var worker = Worker(connection: settings, logger: logger)   // WorkerOptions: queues, concurrency, ...
    worker.register("webhooks") { job in
        let event = try job.args(as: WebhookEvent.self)
        try await deliver(event)
    }
    try await ServiceGroup(configuration: .init(services: [runner, worker],
                                                gracefulShutdownSignals: [.sigterm], logger: logger)).run()
    // A service with a pool of its own: the runner, the worker and staging
    // lease its connections, only their LISTENs keep one each. The pool must
    // be running (here in the same group, listed first so it stops last).
    let client = PostgresClient(configuration: try settings.clientConfiguration(maximumConnections: 8), backgroundLogger: logger)
    var pooledWorker = Worker(client: client, logger: logger)
    pooledWorker.register("webhooks") { job in try await deliver(try job.args(as: WebhookEvent.self)) }
    let services: [any Service] = [client, TickRunner(client: client, logger: logger), pooledWorker]
    // ... and in a request handler: try await Stager(executor: client).stage(policy: "webhooks", spec)
    try await ServiceGroup(configuration: .init(services: services, gracefulShutdownSignals: [.sigterm], logger: logger)).run()
    _ = staged
}

// Built, never run: running it needs a database and runs until stopped.
if CommandLine.arguments.contains("--run") {
    try await readmeExamples(logger: Logger(label: "readme"), json: "{}")
}
