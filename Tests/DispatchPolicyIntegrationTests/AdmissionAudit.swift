import DispatchPolicy
import Foundation
import PostgresNIO
import Testing

/// An offline verifier of admission limits, for racing tests.
///
/// `install` adds triggers that record, in the transaction that does it,
/// every admission and every release (an admitted job leaving
/// `admitted_jobs`: completed, failed, reaped) and every adaptive cap
/// change, with the transaction id. `events` reads them back in commit
/// order, from the server's commit timestamps (the cluster needs
/// `track_commit_timestamp = on`): the order in which other sessions could
/// see them. Replaying that order shows the number of jobs holding a slot
/// at every instant, exactly, whatever the counters say.
struct AdmissionAudit {
    struct Event: Sendable, Equatable {
        enum Kind: String, Sendable { case admit, release, cap }
        var kind: Kind
        var policy: String
        var jobID: Int64
        var attempt: Int
        /// The job's context (admit, release), or `{"gate": ..., "partition": ...}` (cap).
        var context: [String: String]
        /// The admission's `admitted_at` (the tick's clock), for throttle windows.
        var admittedAt: Double
        /// current_max, for cap events.
        var cap: Int
        /// The transaction that recorded it (its events are contiguous in commit order).
        var xid: Int64 = 0
    }

    static let installSQL: [PostgresQuery] = [
        """
        CREATE TABLE public.audit_events (
          seq bigserial PRIMARY KEY, xid xid NOT NULL, kind text NOT NULL, policy text NOT NULL,
          job_id bigint, attempt int, context jsonb, admitted_at timestamptz, cap int)
        """,
        """
        CREATE FUNCTION public.audit_job() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF TG_OP = 'INSERT' THEN
            INSERT INTO public.audit_events (xid, kind, policy, job_id, attempt, context, admitted_at)
            VALUES ((pg_current_xact_id()::text::bigint % 4294967296)::text::xid, 'admit', NEW.policy, NEW.id, NEW.attempt, NEW.context, NEW.admitted_at);
            RETURN NEW;
          END IF;
          INSERT INTO public.audit_events (xid, kind, policy, job_id, attempt, context, admitted_at)
          VALUES ((pg_current_xact_id()::text::bigint % 4294967296)::text::xid, 'release', OLD.policy, OLD.id, OLD.attempt, OLD.context, OLD.admitted_at);
          RETURN OLD;
        END $$
        """,
        "CREATE TRIGGER audit_job AFTER INSERT OR DELETE ON dispatch_policy.admitted_jobs FOR EACH ROW EXECUTE FUNCTION public.audit_job()",
        """
        CREATE FUNCTION public.audit_cap() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF TG_OP = 'UPDATE' AND NEW.current_max = OLD.current_max THEN RETURN NEW; END IF;
          INSERT INTO public.audit_events (xid, kind, policy, context, cap)
          VALUES ((pg_current_xact_id()::text::bigint % 4294967296)::text::xid, 'cap', NEW.policy,
                  jsonb_build_object('gate', NEW.gate, 'partition', NEW.partition), NEW.current_max);
          RETURN NEW;
        END $$
        """,
        "CREATE TRIGGER audit_cap AFTER INSERT OR UPDATE ON dispatch_policy.adaptive_stats FOR EACH ROW EXECUTE FUNCTION public.audit_cap()",
    ]

    static func install(on conn: PostgresConnection) async throws {
        for statement in installSQL { try await conn.exec(statement) }
    }

    /// The recorded events in commit order (ties: the transaction id, then
    /// the order within the transaction).
    static func events(_ conn: PostgresConnection) async throws -> [Event] {
        try await conn.rows(
            """
            SELECT kind, policy, coalesce(job_id, 0), coalesce(attempt, 0),
                   coalesce((SELECT jsonb_object_agg(key, value) FROM jsonb_each_text(context)), '{}')::text,
                   coalesce(extract(epoch FROM admitted_at)::float8, 0), coalesce(cap, 0), xid::text::bigint
            FROM public.audit_events
            ORDER BY pg_xact_commit_timestamp(xid), xid::text::bigint, seq
            """, logger: TestServer.logger
        ).map { row in
            let (kind, policy, job, attempt, context, at, cap, xid) = try row.decode(
                (String, String, Int64, Int, String, Double, Int, Int64).self)
            let fields = try JSONDecoder().decode([String: String].self, from: Data(context.utf8))
            return Event(
                kind: try #require(Event.Kind(rawValue: kind)), policy: policy, jobID: job, attempt: attempt,
                context: fields, admittedAt: at, cap: cap, xid: xid)
        }
    }

    /// A cap to hold: jobs of `policy` holding a slot in one partition
    /// (the value of `partitionBy` in their context; nil: one partition for
    /// the policy) never more than the cap in effect when each is admitted:
    /// `max`, or for an adaptive gate the README's rule: the gate's last
    /// recorded current_max (`initial` before any), at least `initial` when
    /// the partition held nothing as the admitting transaction began (the
    /// safety valve), and never above `max(ceiling, min)`. Returns what
    /// broke, and the highest count seen per partition (to show the cap bound).
    struct Cap: Sendable {
        var policy: String
        var gate: String
        var partitionBy: String?
        var max: Int?
        var adaptiveInitial: Int?
        var adaptiveMin = 1
        var adaptiveCeiling: Int?
    }

    struct CapReport: Sendable {
        var violations: [String] = []
        /// Per partition: the most jobs holding a slot at once, and the cap then.
        var peak: [String: (held: Int, cap: Int)] = [:]
        /// Admissions made with the partition at its cap afterwards.
        var admissionsAtCap = 0
    }

    static func verify(_ cap: Cap, events: [Event]) -> CapReport {
        var report = CapReport()
        var held: [String: Set<String>] = [:]
        var adaptive: [String: Int] = [:]
        // What each partition held as the current transaction began.
        var transaction: Int64?
        var heldAtStart: [String: Int] = [:]
        for event in events where event.policy == cap.policy {
            if event.xid != transaction {
                transaction = event.xid
                heldAtStart = held.mapValues(\.count)
            }
            let attemptKey = "\(event.jobID)#\(event.attempt)"
            switch event.kind {
            case .cap:
                if event.context["gate"] == cap.gate, let partition = event.context["partition"] {
                    adaptive[partition] = event.cap
                }
            case .admit:
                let partition = cap.partitionBy.map { event.context[$0] ?? "" } ?? ""
                var limit = cap.max ?? adaptive[partition] ?? cap.adaptiveInitial ?? Int.max
                if cap.max == nil, let initial = cap.adaptiveInitial {
                    if (heldAtStart[partition] ?? 0) == 0 { limit = Swift.max(limit, initial) }
                    if let ceiling = cap.adaptiveCeiling { limit = Swift.min(limit, Swift.max(ceiling, cap.adaptiveMin)) }
                }
                let inserted = held[partition, default: []].insert(attemptKey).inserted
                if !inserted { report.violations.append("\(cap.gate): job \(attemptKey) admitted twice") }
                let count = held[partition, default: []].count
                if count > limit {
                    report.violations.append(
                        "\(cap.gate)/\(partition): \(count) jobs holding a slot after admitting \(attemptKey), cap \(limit)")
                }
                if count == limit { report.admissionsAtCap += 1 }
                if count > (report.peak[partition]?.held ?? 0) { report.peak[partition] = (count, limit) }
            case .release:
                let partition = cap.partitionBy.map { event.context[$0] ?? "" } ?? ""
                if held[partition, default: []].remove(attemptKey) == nil {
                    report.violations.append("\(cap.gate)/\(partition): \(attemptKey) released without being admitted")
                }
            }
        }
        return report
    }

    /// Throttle: in every window [t_i, t_j] of admission times (the tick's
    /// clock) of one partition, at most `burst + rate × (t_j − t_i) / per`
    /// admissions. Returns the worst excess (≤ 0 when held) and the fullest
    /// window relative to its bound.
    static func throttleExcess(
        policy: String, partitionBy: String, rate: Double, per: Double, burst: Double, events: [Event]
    ) -> (worst: Double, partitions: Int, fullest: Double) {
        var times: [String: [Double]] = [:]
        for event in events where event.policy == policy && event.kind == .admit {
            times[event.context[partitionBy] ?? "", default: []].append(event.admittedAt)
        }
        var worst = -Double.infinity
        var fullest = 0.0
        for (_, list) in times {
            let sorted = list.sorted()
            for i in sorted.indices {
                for j in i..<sorted.count {
                    let bound = burst + rate * (sorted[j] - sorted[i]) / per
                    let count = Double(j - i + 1)
                    worst = max(worst, count - bound)
                    fullest = max(fullest, count / bound)
                }
            }
        }
        return (worst, times.count, fullest)
    }
}

@Suite("Admission audit: the verifier itself", .timeLimit(.minutes(1)))
struct AdmissionAuditTests {
    private func event(
        _ kind: AdmissionAudit.Event.Kind, _ job: Int64, acct: String = "a", at: Double = 0, cap: Int = 0, xid: Int64? = nil
    ) -> AdmissionAudit.Event {
        AdmissionAudit.Event(
            kind: kind, policy: "p", jobID: job, attempt: 1,
            context: kind == .cap ? ["gate": "adaptive", "partition": acct] : ["acct": acct],
            admittedAt: at, cap: cap, xid: xid ?? job)
    }

    @Test("a replay catches a cap exceeded for one instant, a double admission and a release of nothing")
    func catchesViolations() {
        let cap = AdmissionAudit.Cap(policy: "p", gate: "concurrency", partitionBy: "acct", max: 2)
        // Admit 1, 2; release 1; admit 3 (2 held: fine); admit 4 (3 held: over).
        let events = [event(.admit, 1), event(.admit, 2), event(.release, 1), event(.admit, 3), event(.admit, 4), event(.release, 9)]
        let report = AdmissionAudit.verify(cap, events: events)
        #expect(report.violations.count == 2)
        #expect(report.violations.contains { $0.contains("3 jobs holding a slot") })
        #expect(report.violations.contains { $0.contains("released without being admitted") })
        // The same admissions in an order that holds the cap.
        let fine = [event(.admit, 1), event(.admit, 2), event(.release, 1), event(.admit, 3), event(.release, 2), event(.admit, 4)]
        #expect(AdmissionAudit.verify(cap, events: fine).violations == [])
        #expect(AdmissionAudit.verify(cap, events: fine).peak["a"]?.held == 2)
    }

    @Test("an adaptive cap applies from its change on, per partition")
    func adaptiveCap() {
        let cap = AdmissionAudit.Cap(policy: "p", gate: "adaptive", partitionBy: "acct", adaptiveInitial: 1)
        let grew = [event(.admit, 1), event(.cap, 0, cap: 2), event(.admit, 2)]
        #expect(AdmissionAudit.verify(cap, events: grew).violations == [])
        let early = [event(.admit, 1), event(.admit, 2), event(.cap, 0, cap: 2)]
        #expect(AdmissionAudit.verify(cap, events: early).violations.count == 1)
        let otherPartition = [event(.cap, 0, acct: "b", cap: 5), event(.admit, 1, xid: 1), event(.admit, 2, xid: 2)]
        #expect(AdmissionAudit.verify(cap, events: otherPartition).violations.count == 1)
        // The safety valve: a partition idle as a transaction begins may take
        // initial_max in it, even under a smaller cap; not once busy.
        let valve = AdmissionAudit.Cap(policy: "p", gate: "adaptive", partitionBy: "acct", adaptiveInitial: 2)
        let idle = [event(.cap, 0, cap: 1, xid: 1), event(.admit, 1, xid: 2), event(.admit, 2, xid: 2)]
        #expect(AdmissionAudit.verify(valve, events: idle).violations == [])
        let busy = [event(.cap, 0, cap: 1, xid: 1), event(.admit, 1, xid: 2), event(.admit, 2, xid: 3)]
        #expect(AdmissionAudit.verify(valve, events: busy).violations.count == 1)
    }

    @Test("a throttle window one admission over burst + rate × t / per is caught")
    func throttleWindow() {
        // Burst 2, 1 per second: 2 at t=0, a third at t=0.5 is one half over.
        let over = [event(.admit, 1, at: 0), event(.admit, 2, at: 0), event(.admit, 3, at: 0.5)]
        #expect(AdmissionAudit.throttleExcess(policy: "p", partitionBy: "acct", rate: 1, per: 1, burst: 2, events: over).worst > 0.4)
        let held = [event(.admit, 1, at: 0), event(.admit, 2, at: 0), event(.admit, 3, at: 1.0)]
        #expect(AdmissionAudit.throttleExcess(policy: "p", partitionBy: "acct", rate: 1, per: 1, burst: 2, events: held).worst <= 1e-9)
    }
}
