import DispatchPolicy
import Foundation
import Logging
import OTel
import ServiceLifecycle
import Tracing

/// Spans of ticks (and of the demo's jobs) exported over OTLP/HTTP, only
/// when an endpoint is configured the OpenTelemetry way:
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (and `OTEL_TRACES_EXPORTER` is not `none`). Unset, no tracer is installed
/// and nothing is sent anywhere. The other `OTEL_*` variables
/// (`OTEL_SERVICE_NAME`, headers, sampler, batch settings) apply as
/// swift-otel reads them.
enum ProcessTracing {
    static func isConfigured(_ environment: [String: String] = ProcessInfo.processInfo.environment) -> Bool {
        let endpoint = environment["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] ?? environment["OTEL_EXPORTER_OTLP_ENDPOINT"]
        return !(endpoint ?? "").isEmpty && environment["OTEL_TRACES_EXPORTER"]?.lowercased() != "none"
    }

    /// Installs the tracer; the service exports what was recorded, and
    /// flushes on graceful shutdown. nil when tracing is not configured.
    static func makeService() throws -> (any Service)? {
        guard isConfigured() else { return nil }
        var configuration = OTel.Configuration.default
        configuration.serviceName = "dispatch-policy"
        configuration.logs.enabled = false
        configuration.metrics.enabled = false
        configuration.traces.otlpExporter.protocol = .httpProtobuf
        let (tracer, service) = try OTel.makeTracingBackend(configuration: configuration)
        InstrumentationSystem.bootstrap(tracer)
        return service
    }

    /// Runs `body` with the exporter running beside it, then flushes what it
    /// recorded (waiting 15 s at most): for commands that end by themselves.
    static func around<T: Sendable>(logger: Logger, _ body: @Sendable () async throws -> T) async throws -> T {
        guard let service = try makeService() else { return try await body() }
        let group = ServiceGroup(configuration: .init(services: [.init(service: service)], logger: logger))
        return try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            let result: Result<T, any Error>
            do { result = .success(try await body()) } catch { result = .failure(error) }
            await group.triggerGracefulShutdown()
            // Whichever ends first: the exporter's flush, or 15 s.
            tasks.addTask { try? await Task.sleep(for: .seconds(15)) }
            _ = try? await tasks.next()
            tasks.cancelAll()
            return try result.get()
        }
    }
}
