import ArgumentParser
import DispatchPolicy
import DispatchPolicyAdmin
import Foundation
import Hummingbird
import Logging
import Metrics
import PostgresNIO
import Prometheus
import ServiceLifecycle
import UnixSignals

/// The process-wide Prometheus registry, installed as the swift-metrics
/// backend once (the library's counters and timers land in it).
enum ProcessMetrics {
    static let registry: PrometheusCollectorRegistry = {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        // Tick durations: 1 ms to 60 s.
        factory.defaultDurationHistogramBuckets = [
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
            .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10),
            .seconds(30), .seconds(60),
        ]
        MetricsSystem.bootstrap(factory)
        return registry
    }()
}

/// An HTTP listener for the admin or the runner's `/metrics`.
func httpService<Context: RequestContext>(
    router: Router<Context>, bind: String, flag: String, logger: Logger,
    onListening: (@Sendable (String) -> Void)? = nil
) throws -> some Service where Context.Source == ApplicationRequestContextSource {
    guard let (host, port) = AdminServer.parseBind(bind) else {
        throw DispatchPolicyError(code: .invalidArgument, message: "\(flag) must be HOST:PORT, [IPv6]:PORT or :PORT, got \(bind)")
    }
    return Application(
        router: router, configuration: .init(address: .hostname(host, port: port), serverName: nil),
        onServerRunning: { channel in
            let address =
                channel.localAddress.map { local -> String in
                    let ip = local.ipAddress ?? host
                    // An IPv6 address in a URL is in brackets.
                    return "\(ip.contains(":") ? "[\(ip)]" : ip):\(local.port ?? port)"
                } ?? bind
            FileHandle.standardError.write(Data("dispatch-policy: listening on http://\(address)\n".utf8))
            onListening?("http://\(address)")
        },
        logger: logger)
}

struct Admin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Serve the admin web UI and /metrics: policies, partitions, charts, jobs, explain, dead jobs; actions with --allow-actions.",
        discussion: """
            Binds 127.0.0.1:8080 by default. Viewing needs no sign-in: bind to loopback, or put the admin \
            behind your own authentication. Actions (pause/resume a policy or a partition, cancel, retry, \
            drain) are off unless --allow-actions is given with a token of 16 characters or more, \
            from --token-file PATH (mode 0600 or less; one trailing newline is ignored) or from \
            DISPATCH_POLICY_ADMIN_TOKEN, not both; a browser signs in with it once, a script sends \
            "Authorization: Bearer TOKEN". Under systemd, give it as a credential: \
            LoadCredential=admin-token:/etc/dispatch-policy/admin-token and \
            --token-file ${CREDENTIALS_DIRECTORY}/admin-token (its mode is not checked there). \
            Nothing on a page is fetched from another site. \
            /healthz answers 200 when the database answers SELECT 1 within 2 s, else 503 and why.
            """)

    @OptionGroup var connection: ConnectionOptions

    @Option(help: "Address to listen on: HOST:PORT, [IPv6]:PORT or :PORT (port 0 picks a free one).")
    var bind = "127.0.0.1:8080"

    @Flag(name: .customLong("allow-actions"), help: "Enable actions; needs --token-file or DISPATCH_POLICY_ADMIN_TOKEN.")
    var allowActions = false

    @Option(
        name: .customLong("token-file"), help: "With --allow-actions: read the token from this file (not read without --allow-actions).")
    var tokenFile: String?

    func validate() throws {
        if tokenFile != nil, let token = ProcessInfo.processInfo.environment["DISPATCH_POLICY_ADMIN_TOKEN"], !token.isEmpty {
            throw ValidationError("--token-file and DISPATCH_POLICY_ADMIN_TOKEN exclude each other: give the token one way")
        }
    }

    @Flag(name: .customLong("partition-metrics"), help: "Export per-partition gauges on /metrics (up to 1000 series per kind).")
    var partitionMetrics = false

    func run() async throws {
        let logger = connection.makeLogger(defaultLevel: .info)
        try await reportingErrors {
            var options = AdminOptions()
            options.partitionMetrics = partitionMetrics
            if allowActions {
                if let tokenFile {
                    options.token = try TokenFile.read(tokenFile)
                } else if let token = ProcessInfo.processInfo.environment["DISPATCH_POLICY_ADMIN_TOKEN"], !token.isEmpty {
                    options.token = token
                } else {
                    throw ConfigurationError(
                        "--allow-actions needs a token of 16 characters or more: --token-file PATH or DISPATCH_POLICY_ADMIN_TOKEN",
                        hint: "openssl rand -hex 24 > token && chmod 0600 token, then --token-file token")
                }
            }
            let settings = try connection.settings().with(session: .admin)
            // A pool on the host target_session_attrs picks, following a failover.
            let client = try await FailoverClient.settle(settings, logger: logger)
            let server: AdminServer
            do {
                server = try AdminServer(
                    store: AdminStore(executor: client, logger: logger), options: options,
                    registry: ProcessMetrics.registry, logger: logger)
            } catch let error as AdminAuthError {
                throw ConfigurationError(error.description)
            }
            let http = try httpService(router: server.router(), bind: bind, flag: "--bind", logger: logger)
            var configuration = ServiceGroupConfiguration(
                services: [.init(service: client), .init(service: http)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
            configuration.maximumGracefulShutdownDuration = .seconds(10)
            configuration.maximumCancellationDuration = .seconds(5)
            try await ServiceGroup(configuration: configuration).run()
        }
    }
}
