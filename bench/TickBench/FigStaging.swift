// Figure 2: staging against the raw INSERT of the same row into a table with
// the same columns and indexes (CREATE TABLE ... LIKE staged_jobs INCLUDING ALL).
import DispatchPolicy
import Foundation
import Logging
import PostgresNIO

enum StagingFigures {
    @Sendable static func run(_ bench: Bench) async throws -> [Row] {
        let logger = bench.logger
        let (settings, db) = try await bench.freshDatabase("staging")
        defer { Task { try? await db.close() } }
        try await bench.declare(
            db, "staging",
            PolicyConfig(roundRobinBy: "{tenant}") {
                Gate.throttle(rate: 100, per: 1, partitionBy: "{tenant}")
            })
        _ = try await db.rows("CREATE TABLE raw_staged (LIKE dispatch_policy.staged_jobs INCLUDING ALL)", logger: logger)
        _ = try await db.rows("CREATE SEQUENCE raw_ids", logger: logger)
        let window = bench.pick(Duration.seconds(2), smoke: .seconds(1))
        let rounds = bench.pick(3, smoke: 1)

        // The same row both ways: what stage() stores is the caller's context
        // plus queue_name and priority, and the round-robin key from the template.
        let spec = JobSpec(argsJSON: #"{"n": 1}"#, contextJSON: #"{"tenant": "t1"}"#)
        let storedContext = #"{"tenant": "t1", "priority": 0, "queue_name": "default"}"#
        let conns = [try await settings.connect(logger: logger), try await settings.connect(logger: logger)]
        defer { for c in conns { Task { try? await c.close() } } }

        /// Calls made by both connections in `window`.
        func calls(_ body: @escaping @Sendable (PostgresConnection) async throws -> Void) async throws -> Double {
            let deadline = ContinuousClock.now + window
            let counts = try await withThrowingTaskGroup(of: Int.self) { group in
                for conn in conns {
                    group.addTask {
                        var n = 0
                        while ContinuousClock.now < deadline {
                            try await body(conn)
                            n += 1
                        }
                        return n
                    }
                }
                return try await group.reduce(0, +)
            }
            return Double(counts) / seconds(window)
        }
        var stageRates: [Double] = []
        var rawRates: [Double] = []
        for _ in 0..<rounds {
            stageRates.append(
                try await calls { conn in
                    _ = try await Stager(executor: conn, logger: logger).stage(policy: "staging", spec)
                })
            rawRates.append(
                try await calls { conn in
                    _ = try await conn.rows(
                        """
                        INSERT INTO raw_staged (id, policy, queue, priority, args, context, round_robin_key, partitions)
                        VALUES (nextval('raw_ids'), 'staging', 'default', 0, \(spec.argsJSON)::jsonb, \(storedContext)::jsonb, 't1',
                                '{"tenant": "t1"}')
                        """, logger: logger)
                })
        }

        // stage_many, 1,000 jobs a call, vs INSERT ... SELECT of the same
        // array of rows, one connection, alternating.
        let specs = (0..<1000).map { i in JobSpec(argsJSON: #"{"n": \#(i)}"#, contextJSON: #"{"tenant": "t\#(i % 100)"}"#) }
        let array = "[" + specs.map { #"{"args":\#($0.argsJSON),"context":\#($0.contextJSON)}"# }.joined(separator: ",") + "]"
        let stager = Stager(executor: conns[0], logger: logger)
        var manyRates: [Double] = []
        var rawManyRates: [Double] = []
        for _ in 0..<rounds {
            for side in 0..<2 {
                let deadline = ContinuousClock.now + window
                let start = ContinuousClock.now
                var rows = 0
                while ContinuousClock.now < deadline {
                    if side == 0 {
                        rows += try await stager.stageMany(policy: "staging", specs).count
                    } else {
                        rows += try await conns[0].rows(
                            """
                            INSERT INTO raw_staged (id, policy, queue, priority, args, context, round_robin_key, partitions)
                            SELECT nextval('raw_ids'), 'staging', 'default', 0, e -> 'args',
                                   (e -> 'context') || '{"priority": 0, "queue_name": "default"}', e -> 'context' ->> 'tenant',
                                   jsonb_build_object('tenant', e -> 'context' ->> 'tenant')
                            FROM jsonb_array_elements(\(array)::jsonb) e
                            RETURNING 1
                            """, logger: logger
                        ).count
                    }
                }
                let rate = Double(rows) / seconds(ContinuousClock.now - start)
                if side == 0 { manyRates.append(rate) } else { rawManyRates.append(rate) }
            }
        }
        let one = Samples.ratios(Samples(stageRates), Samples(rawRates))
        let many = Samples.ratios(Samples(manyRates), Samples(rawManyRates))
        return [
            Row(
                id: "2a", figure: "`stage()` calls/s vs raw single-row `INSERT` of the same row, same indexes, 2 connections",
                measured: "\(Samples(stageRates).format(Fmt.n)) vs \(Samples(rawRates).format(Fmt.n)) rows/s",
                result: one.format(Fmt.ratio),
                target: "≥ 0.7", met: one.median >= 0.7),
            Row(
                id: "2b", figure: "`stage_many`, 1,000 jobs a call, vs raw `INSERT … SELECT` of the same rows",
                measured: "\(Samples(manyRates).format(Fmt.n)) vs \(Samples(rawManyRates).format(Fmt.n)) rows/s",
                result: many.format(Fmt.ratio),
                target: "≥ 0.7", met: many.median >= 0.7),
        ]
    }
}
