import DispatchPolicy
import Foundation
import InMemoryTracing
import Logging
import PostgresNIO
import Testing
import Tracing

/// One tracer for the whole test process: `InstrumentationSystem` can be
/// bootstrapped once. Tests tell their spans apart by policy name.
enum TestTracer {
    static let shared: InMemoryTracer = {
        let tracer = InMemoryTracer()
        InstrumentationSystem.bootstrap(tracer)
        return tracer
    }()

    static func finished(policy: String) -> [FinishedInMemorySpan] {
        shared.finishedSpans.filter { $0.attributes["dispatch_policy.policy"]?.toSpanAttribute() == .string(policy) }
    }
}

struct HandlerFailure: Error, CustomStringConvertible {
    var description: String { "the endpoint said 500" }
}

@Suite("Spans of the library (in-memory tracer)", .timeLimit(.minutes(4)))
struct SpanTests {
    @Test(
        "a span per tick (policy, outcome, fetched, admitted, refused) and per job attempt (policy, queue, id, attempt), the handler's error recorded"
    )
    func tickAndJobSpans() async throws {
        let tracer = TestTracer.shared
        let policy = "traced_\(UInt32.random(in: 0 ... .max))"
        let settings = try await TestServer.shared.freshDatabase()
        let ids = try await TestServer.withConnection(settings) { conn in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(
                name: policy, config: #"{"max_attempts": 1, "gates": [{"type": "concurrency", "name": "c", "max": 1}]}"#)
            return try await conn.rows(
                "SELECT dispatch_policy.stage(\(policy), to_jsonb(i)) FROM generate_series(1, 2) i", logger: TestServer.logger
            ).map { try $0.decode(Int64.self) }
        }
        var options = TickRunnerOptions()
        options.busyPause = .milliseconds(20)
        options.idlePause = .milliseconds(100)
        options.policy = policy
        let runner = TickRunner(connection: settings, options: options, logger: TestServer.logger)
        var workerOptions = WorkerOptions()
        workerOptions.pollInterval = .milliseconds(50)
        var worker = Worker(connection: settings, options: workerOptions, logger: TestServer.logger)
        worker.register(policy) { job in
            if job.id == ids[1] { throw HandlerFailure() }
        }
        try await runUntil([runner, worker], timeout: 60) {
            try await TestServer.withConnection(settings) { conn in
                try await conn.scalar("SELECT count(*) = 2 FROM dispatch_policy.finished_jobs", as: Bool.self)
            }
        }
        _ = tracer
        let spans = TestTracer.finished(policy: policy)
        let jobs = spans.filter { $0.operationName == "dispatch_policy.job" }
        #expect(jobs.count == 2, "\(spans.map(\.operationName))")
        for span in jobs {
            #expect(span.kind == .consumer)
            #expect(span.attributes["dispatch_policy.queue"]?.toSpanAttribute() == .string("default"))
            #expect(span.attributes["dispatch_policy.job.attempt"]?.toSpanAttribute() == .int64(1))
        }
        let failed = jobs.filter { $0.attributes["dispatch_policy.job.id"]?.toSpanAttribute() == .int64(ids[1]) }
        #expect(failed.count == 1)
        #expect(failed.first?.errors.map { "\($0.error)" } == ["the endpoint said 500"])
        let succeeded = jobs.filter { $0.attributes["dispatch_policy.job.id"]?.toSpanAttribute() == .int64(ids[0]) }
        #expect(succeeded.first?.errors.isEmpty == true)

        let ticks = spans.filter { $0.operationName == "dispatch_policy.tick" }
        #expect(!ticks.isEmpty)
        let admitted = ticks.compactMap { span -> Int64? in
            guard case .int64(let n) = span.attributes["dispatch_policy.admitted"]?.toSpanAttribute() else { return nil }
            return n
        }
        #expect(admitted.reduce(0, +) == 2, "each job admitted once, in some tick: \(admitted)")
        #expect(ticks.allSatisfy { $0.attributes["dispatch_policy.outcome"]?.toSpanAttribute() == .string("ran") })
        // With a concurrency of 1, the second job was refused at least once while the first ran.
        let refused = ticks.compactMap { span -> Int64? in
            guard case .int64(let n) = span.attributes["dispatch_policy.refused"]?.toSpanAttribute() else { return nil }
            return n
        }
        #expect(refused.count == ticks.count)
    }
}
