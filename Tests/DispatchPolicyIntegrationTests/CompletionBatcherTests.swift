import Foundation
import PostgresNIO
import Synchronization
import Testing

@testable import DispatchPolicy

@Suite("Worker: completion batches", .timeLimit(.minutes(15)))
struct CompletionBatcherTests {
    /// Found by hostile testing: once cancelled, the batcher stopped; a
    /// handler that ended after that waited for good on a completion nothing
    /// would send, and the Worker never returned (2 runs in 10).
    @Test("a completion after the batcher stopped fails at once instead of waiting for good")
    func completionAfterStop() async throws {
        try await withTestDatabase { _, settings async throws in
            let batcher = CompletionBatcher()
            let db = ManagedConnection(settings: settings, role: "test", logger: TestServer.logger)
            let run = Task { await batcher.run(db: db, timeout: .seconds(30), logger: TestServer.logger) }
            run.cancel()
            await run.value
            let answered = Mutex<Result<CompletionBatcher.Outcome, DispatchPolicyError>?>(nil)
            let waiter = Task {
                let result = await batcher.complete(id: 1, attempt: 1)
                answered.withLock { $0 = result }
            }
            #expect(try await waitUntil(10) { answered.withLock { $0 != nil } }, "complete() waited on a stopped batcher")
            if case .success(let outcome) = answered.withLock({ $0 }) {
                Issue.record("a stopped batcher reported \(outcome)")
            }
            waiter.cancel()
            await db.close()
        }
    }

    @Test("completions that arrive together are recorded in batches, each with its own outcome")
    func batches() async throws {
        try await withTestDatabase { conn, settings async throws in
            try await PolicyCatalog(executor: conn, logger: TestServer.logger).declare(name: "p", config: "{}")
            try await conn.exec(
                "SELECT dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, 50) i))")
            _ = try await Ticker(connection: conn, logger: TestServer.logger).tick(policy: "p")
            let jobs = try await conn.rows("SELECT id, attempt FROM dispatch_policy.claim('default', 'w', 50)", logger: TestServer.logger)
                .map { try $0.decode((Int64, Int).self) }
            try #require(jobs.count == 50)
            let batcher = CompletionBatcher()
            let reporter = ManagedConnection(settings: settings, role: "test", logger: TestServer.logger)
            let outcomes = await {
                let run = Task { await batcher.run(db: reporter, timeout: .seconds(30), logger: TestServer.logger) }
                defer { run.cancel() }
                return await withTaskGroup(of: CompletionBatcher.Outcome?.self) { group in
                    for (id, attempt) in jobs {
                        // The last one is stale: attempt 2 was never admitted.
                        group.addTask { try? await batcher.complete(id: id, attempt: id == jobs.last?.0 ? 2 : attempt).get() }
                    }
                    var all: [CompletionBatcher.Outcome?] = []
                    for await outcome in group { all.append(outcome) }
                    return all
                }
            }()
            await reporter.close()
            #expect(outcomes.filter { $0 == .completed }.count == 49)
            #expect(outcomes.filter { $0 == .stale }.count == 1)
            #expect(try await conn.scalar("SELECT count(*)::int FROM dispatch_policy.finished_jobs", as: Int.self) == 49)
        }
    }
}
