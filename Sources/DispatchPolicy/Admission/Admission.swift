/// A fetched job, as gates see it.
public struct BatchRow: Sendable, Equatable {
    public var id: Int64
    public var priority: Int
    public var roundRobinKey: String?
    /// Context values as strings (what templates and gate values read).
    public var context: [String: String]
    /// The round-robin lane the fetch took the job from (1 = the first after
    /// the cursor); 0 for top-up rows and fetches without round-robin.
    public var lane: Int

    public init(id: Int64, priority: Int = 0, roundRobinKey: String? = nil, context: [String: String] = [:], lane: Int = 0) {
        self.id = id
        self.priority = priority
        self.roundRobinKey = roundRobinKey
        self.context = context
        self.lane = lane
    }
}

/// A string compared byte for byte, as PostgreSQL compares keys.
///
/// Swift's `String` equality merges canonically equivalent strings (`é` and
/// `e` + U+0301); PostgreSQL's does not. Keys that are two counters in the
/// database must be two keys here too.
public struct ExactString: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let string: String

    public init(_ string: String) { self.string = string }

    public static func == (a: ExactString, b: ExactString) -> Bool { a.string.utf8.elementsEqual(b.string.utf8) }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(string.utf8.count)
        for byte in string.utf8 { hasher.combine(byte) }
    }

    public static func < (a: ExactString, b: ExactString) -> Bool { a.string.utf8.lexicographicallyPrecedes(b.string.utf8) }

    public var description: String { string }
}

/// A gate partition: the gate's name and the partition key, compared byte
/// for byte (see ``ExactString``).
public struct GateKey: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var gate: String
    public var partition: String

    public init(gate: String, partition: String) {
        self.gate = gate
        self.partition = partition
    }

    public static func == (a: GateKey, b: GateKey) -> Bool {
        ExactString(a.gate) == ExactString(b.gate) && ExactString(a.partition) == ExactString(b.partition)
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(ExactString(gate))
        hasher.combine(ExactString(partition))
    }

    public static func < (a: GateKey, b: GateKey) -> Bool {
        (ExactString(a.gate), ExactString(a.partition)) < (ExactString(b.gate), ExactString(b.partition))
    }

    public var description: String { "\(gate)/\(partition)" }
}

/// A throttle bucket the tick must read: its partition and the rate, window
/// and capacity in effect (from the first job of the partition in the batch,
/// each within its ``FieldLimits`` bounds).
public struct BucketRequest: Sendable, Equatable {
    public var key: GateKey
    public var rate: Double
    public var per: Double
    public var burst: Double
}

/// The gate state a tick reads before deciding.
public struct GateState: Sendable, Equatable {
    /// Tokens available now, per throttle partition.
    public var tokens: [GateKey: Double] = [:]
    /// Jobs holding a slot, per concurrency, global_cap and adaptive partition.
    public var inFlight: [GateKey: Int] = [:]
    /// current_max per adaptive partition.
    public var adaptiveCap: [GateKey: Int] = [:]
    /// Partitions an operator paused (`dispatch_policy.pause_partition`):
    /// they admit nothing until resumed or their pause runs out.
    public var paused: Set<GateKey> = []

    public init(
        tokens: [GateKey: Double] = [:], inFlight: [GateKey: Int] = [:], adaptiveCap: [GateKey: Int] = [:], paused: Set<GateKey> = []
    ) {
        self.tokens = tokens
        self.inFlight = inFlight
        self.adaptiveCap = adaptiveCap
        self.paused = paused
    }
}

/// Where the round-robin rotation of a policy continues after a tick.
public enum CursorMove: Sendable, Equatable {
    /// Start the next tick where this one started: the first lane found no
    /// room that others had not taken in this tick.
    case hold
    /// Continue after this lane: a round-robin key, or nil for the lane of
    /// jobs without a key.
    case after(String?)
}

/// What the tick admits.
public struct AdmissionDecision: Sendable, Equatable {
    public struct Admitted: Sendable, Equatable {
        public var id: Int64
        /// Gate name → partition, for every gate (what `admitted_jobs.partitions` keeps).
        public var partitions: [String: String]
        /// Gate name → partition, for the gates whose slot the job holds.
        public var slots: [String: String]
    }

    public var admitted: [Admitted] = []
    /// Tokens to take, per throttle partition.
    public var takes: [GateKey: Double] = [:]
    /// Rows refused, by the first gate (in declared order) that had no room.
    public var refusedByGate: [String: Int] = [:]
    /// The same refusals per gate partition (the history's `refused`).
    public var refusedByPartition: [GateKey: Int] = [:]
    /// Adaptive partitions whose cap turned a job away in this tick: their cap
    /// is what limits them, so successes may grow it.
    public var adaptiveLimited: Set<GateKey> = []
    /// Where the round-robin rotation continues (nil: no lanes in the batch).
    public var cursor: CursorMove?
    /// The first starved job (see ``Admission/cursor(rows:firstStarvedLane:)``)
    /// when its lane's weight is above 1: how far into its weighted round the
    /// lane got, so the next tick gives it only the rest of that round.
    public var starved: StarvedRow?
    /// Seconds until the bucket holds the cost of a job it refused (one
    /// token unless the gate has a `cost`), per throttle partition, the
    /// soonest of its refused jobs (rate above 0): when a tick could admit
    /// again.
    public var tokenWaits: [GateKey: Double] = [:]
    /// Lanes of the batch that nothing can leave before their block ends: the
    /// fetch passes them over until then.
    public var laneBlocks: [LaneBlock] = []
    /// Shadow mode: per gate partition, the jobs it had no room for (they
    /// were admitted anyway) and how far over its limit the batch left it.
    public var wouldRefuse: [GateKey: WouldRefuse] = [:]
    /// Shadow mode: jobs each gate had no room for, by gate name (a job
    /// counts for every gate that would have refused it).
    public var wouldRefuseByGate: [String: Int] = [:]
}

/// What a gate partition of a shadow policy would have done in one tick.
public struct WouldRefuse: Sendable, Equatable {
    /// Jobs it had no room for (admitted anyway).
    public var count = 0
    /// A throttle: the token deficit the batch left over the refill rate, in
    /// seconds (how far behind an enforcing throttle would be); nil for
    /// other gates and for a rate of 0.
    public var lagSeconds: Double?
    /// A concurrency, global_cap or adaptive gate: jobs in flight beyond the
    /// cap after the batch; nil for a throttle.
    public var overCap: Int?

    public init(count: Int = 0, lagSeconds: Double? = nil, overCap: Int? = nil) {
        self.count = count
        self.lagSeconds = lagSeconds
        self.overCap = overCap
    }
}

/// The first job of the batch refused for want of room this tick's own
/// admissions took, in a lane of weight above 1 (`round_robin_weight`).
public struct StarvedRow: Sendable, Equatable {
    /// The lane: a round-robin key, or nil for the lane of jobs without one.
    public var lane: String?
    /// The job's place among its lane's jobs in the batch, from 1.
    public var index: Int
    /// The lane's weight (rows per round).
    public var weight: Int

    public init(lane: String?, index: Int, weight: Int) {
        self.lane = lane
        self.index = index
        self.weight = weight
    }
}

/// A lane of the batch that can admit nothing more until a partition that
/// refused its jobs has room again (see ``Admission/LaneTally``).
public struct LaneBlock: Sendable, Equatable {
    /// The lane: a round-robin key, or nil for the lane of jobs without one.
    public var lane: String?
    /// How long the block lasts; `.infinity` until ``releasedBy`` releases a slot.
    public var seconds: Double
    /// The partition whose released slot (or, for a throttle of rate 0, a
    /// changed config) ends the block; nil: time alone.
    public var releasedBy: GateKey?
    /// The in-flight count of ``releasedBy`` the decision saw (nil: no
    /// counter): the block applies only while the counter still holds that many.
    public var inFlight: Int?

    public init(lane: String?, seconds: Double, releasedBy: GateKey? = nil, inFlight: Int? = nil) {
        self.lane = lane
        self.seconds = seconds
        self.releasedBy = releasedBy
        self.inFlight = inFlight
    }
}

/// A batch row with its partition for every gate, computed once.
/// Where a `fair_interleave` gate's round stopped: the partition of the
/// last job admitted in it, and how many jobs that partition had of its
/// weighted round with it (1 to its weight). Kept between ticks in
/// `round_robin_cursors.interleave`.
public struct InterleaveCursor: Sendable, Equatable, Codable {
    public var key: String
    public var served: Int

    public init(key: String, served: Int) {
        self.key = key
        self.served = served
    }

    /// Keys compare byte for byte, as partitions do (``ExactString``):
    /// found by hostile testing, `String`'s `==` took two spellings of "José"
    /// for one key, the runner kept the old cursor, and every tick made the
    /// same admissions.
    public static func == (a: InterleaveCursor, b: InterleaveCursor) -> Bool {
        a.served == b.served && ExactString(a.key) == ExactString(b.key)
    }
}

/// Each row's place in the rounds of every `fair_interleave` gate that
/// regrouped a batch (``Admission/interleave(_:cursors:)``).
public struct InterleaveRounds: Sendable, Equatable {
    struct Place: Sendable, Equatable {
        var id: Int64
        var key: String
        var served: Int
    }
    /// Per gate name, the rows in that gate's order.
    var sequences: [String: [Place]] = [:]

    /// The cursors to keep once `admitted` are admitted: per regrouping gate,
    /// past the last row admitted in its order; a gate that admitted none
    /// keeps its `previous` cursor. Gates that did not regroup are left out.
    public func cursors(admitted: some Sequence<Int64>, previous: [String: InterleaveCursor]) -> [String: InterleaveCursor] {
        moved(admitted: admitted, previous: previous) ?? previous
    }

    /// ``cursors(admitted:previous:)`` when they differ from `previous` (the
    /// cursors of gates that regroup no more dropped too), else nil: what a
    /// tick writes back.
    public func moved(admitted: some Sequence<Int64>, previous: [String: InterleaveCursor]) -> [String: InterleaveCursor]? {
        let kept = next(admitted: admitted, previous: previous)
        return kept == previous ? nil : kept
    }

    private func next(admitted: some Sequence<Int64>, previous: [String: InterleaveCursor]) -> [String: InterleaveCursor] {
        let admitted = Set(admitted)
        var result: [String: InterleaveCursor] = [:]
        for (gate, sequence) in sequences {
            if let last = sequence.last(where: { admitted.contains($0.id) }) {
                result[gate] = InterleaveCursor(key: last.key, served: last.served)
            } else if let kept = previous[gate] {
                result[gate] = kept
            }
        }
        return result
    }
}

public struct PreparedRow: Sendable, Equatable {
    public var row: BatchRow
    /// The partition of each gate, in the order of ``Admission/gates``.
    public var partitions: [String]
}

/// Gate evaluation over an in-memory batch. Pure: no I/O, no clock.
public struct Admission: Sendable {
    public let config: PolicyConfig
    /// Every gate of the policy, in declared order.
    public let gates: [Gate]
    /// The template each gate partitions by (nil: the single partition `default`).
    let templates: [String?]

    public init(config: PolicyConfig) {
        self.config = config
        gates = config.gates
        // fair_interleave without its own partition_by uses that of the first
        // gate that has one; global_cap is always one partition.
        let inherited = config.gates.first { $0.type != .fairInterleave && $0.type != .globalCap && $0.partitionBy != nil }?.partitionBy
        templates = config.gates.map { gate in
            switch gate.type {
            case .globalCap: nil
            case .fairInterleave: gate.partitionBy ?? inherited
            default: gate.partitionBy
            }
        }
    }

    /// Every gate's partition of a row: the same map `dispatch_policy._gate_partitions` computes.
    public func partitions(of row: BatchRow) -> [String: String] {
        let prepared = prepare([row])[0]
        return Dictionary(zip(gates.map(\.effectiveName), prepared.partitions), uniquingKeysWith: { a, _ in a })
    }

    /// Renders each row's partitions, once.
    public func prepare(_ rows: [BatchRow]) -> [PreparedRow] {
        rows.map { row in PreparedRow(row: row, partitions: templates.map { PartitionKey.of(template: $0, context: row.context) }) }
    }

    /// Applies every fair_interleave gate: rows are regrouped round-robin
    /// across the gate's partitions, in key order (bytes), keeping the order
    /// within a partition. A partition takes as many rows per round as its
    /// weight (the policy's `round_robin_weight` for the partition's first
    /// row; 1 without one), so weights 1 and 3 share 1 : 3. Without any
    /// template there is nothing to regroup.
    ///
    /// The round goes on across ticks: `cursors` says, per gate, where the
    /// last tick's admissions stopped (``InterleaveCursor``), and the rounds
    /// start there: that partition first with the rest of its round, or the
    /// next partition in key order once it had its weight. A tick with room
    /// for fewer jobs than a round holds (a cap of 2, weights 1 and 3) thus
    /// does not start every round afresh, which gave the first partitions
    /// every turn. ``InterleaveRounds/cursors(admitted:previous:)`` gives
    /// the cursors to keep.
    ///
    /// A gate partitioned by the policy's `round_robin_by` leaves a batch of
    /// the round-robin fetch (rows with `lane > 0`, then top-up rows) as it is:
    /// the fetch has interleaved it by the same key already, with the same
    /// weights, and has carried a round the last tick cut short
    /// (`round_robin_cursors.served`).
    public func order(_ rows: [PreparedRow], cursors: [String: InterleaveCursor] = [:]) -> [PreparedRow] {
        interleave(rows, cursors: cursors).rows
    }

    /// The fair_interleave gates (their indexes) that regroup `rows`: those
    /// with a template, but not one partitioned by `round_robin_by` over a
    /// batch of the round-robin fetch.
    public func regrouping(_ rows: [PreparedRow]) -> [Int] {
        let fetchedInRounds = config.roundRobinBy != nil && rows.contains { $0.row.lane > 0 }
        return gates.indices.filter { index in
            gates[index].type == .fairInterleave && templates[index] != nil
                && !(fetchedInRounds && templates[index] == config.roundRobinBy)
        }
    }

    /// ``order(_:cursors:)``, with each row's place in every regrouping
    /// gate's rounds.
    public func interleave(_ rows: [PreparedRow], cursors: [String: InterleaveCursor] = [:]) -> (
        rows: [PreparedRow], rounds: InterleaveRounds
    ) {
        var rows = rows
        var rounds = InterleaveRounds()
        for index in regrouping(rows) {
            let gate = gates[index]
            var groups: [ExactString: [PreparedRow]] = [:]
            var weights: [ExactString: Int] = [:]
            for row in rows {
                let key = ExactString(row.partitions[index])
                if groups[key] == nil { weights[key] = config.weight(of: row.row.context) }
                groups[key, default: []].append(row)
            }
            var keys = groups.keys.sorted()
            // Where the last round stopped: that partition with the rest of
            // its round, or the next one.
            var carried = 0
            if let cursor = cursors[gate.effectiveName] {
                let last = ExactString(cursor.key)
                var start = keys.firstIndex { !($0 < last) } ?? keys.count
                if start < keys.count && keys[start] == last {
                    if cursor.served < (weights[last] ?? 1) { carried = Swift.max(cursor.served, 0) } else { start += 1 }
                }
                keys = Array(keys[start...] + keys[..<start])
            }
            var interleaved: [PreparedRow] = []
            interleaved.reserveCapacity(rows.count)
            var sequence: [InterleaveRounds.Place] = []
            sequence.reserveCapacity(rows.count)
            var taken: [ExactString: Int] = [:]
            // Partitions with rows left, in round order: a round visits only
            // those (found by hostile testing: visiting every partition in
            // every round cost rounds x partitions, 11.6 s for a tenant of
            // 20,000 jobs beside 4,000 of one job).
            var active = keys
            var first = true
            while !active.isEmpty {
                var left: [ExactString] = []
                left.reserveCapacity(active.count)
                for key in active {
                    guard let group = groups[key] else { continue }
                    let had = first && key == keys.first ? carried : 0
                    let begin = taken[key] ?? 0
                    let end = Swift.min(begin + (weights[key] ?? 1) - had, group.count)
                    for (offset, row) in group[begin..<end].enumerated() {
                        interleaved.append(row)
                        sequence.append(.init(id: row.row.id, key: key.string, served: had + offset + 1))
                    }
                    taken[key] = end
                    if end < group.count { left.append(key) }
                }
                active = left
                first = false
            }
            rows = interleaved
            rounds.sequences[gate.effectiveName] = sequence
        }
        return (rows, rounds)
    }

    /// The state a batch needs.
    public struct RequiredState: Sendable, Equatable {
        /// Buckets, with the first row's rate, per and burst, sorted by key.
        public var buckets: [BucketRequest] = []
        /// Counters of slot-holding gates, sorted.
        public var counters: [GateKey] = []
        /// Adaptive partitions with the initial cap of a new one, sorted.
        public var adaptive: [GateKey: Int] = [:]
    }

    /// The rate, window and capacity of a throttle for a row, within bounds.
    public func bucket(of gate: Gate, for row: BatchRow) -> (rate: Double, per: Double, burst: Double) {
        let rate = gate.rate?.value(in: row.context, within: FieldLimits.throttleRate) ?? 0
        let per = gate.per?.value(in: row.context, within: FieldLimits.throttlePer) ?? 1
        let burst =
            gate.burst?.value(in: row.context, within: FieldLimits.throttleBurst)
            ?? FieldLimits.throttleBurst.clamp(Swift.max(rate, 1))
        return (rate, per, burst)
    }

    /// Tokens a row takes from a throttle (`cost`, default 1, within
    /// bounds), never more than `burst`: a job staged under an older config
    /// whose cost exceeds the bucket takes a full bucket instead of waiting
    /// forever (staging refuses such a job under the current config).
    public func cost(of gate: Gate, for row: BatchRow, burst: Double) -> Double {
        let cost = gate.cost?.value(in: row.context, within: FieldLimits.throttleCost) ?? 1
        return Swift.min(cost, burst)
    }

    public func requiredState(for rows: [PreparedRow]) -> RequiredState {
        var buckets: [GateKey: BucketRequest] = [:]
        var counters = Set<GateKey>()
        var adaptive: [GateKey: Int] = [:]
        for (index, gate) in gates.enumerated() {
            let name = gate.effectiveName
            switch gate.type {
            case .throttle:
                for row in rows {
                    let key = GateKey(gate: name, partition: row.partitions[index])
                    if buckets[key] == nil {
                        let b = bucket(of: gate, for: row.row)
                        buckets[key] = BucketRequest(key: key, rate: b.rate, per: b.per, burst: b.burst)
                    }
                }
            case .concurrency, .globalCap:
                for row in rows { counters.insert(GateKey(gate: name, partition: row.partitions[index])) }
            case .adaptiveConcurrency:
                let initial = gate.adaptiveSettings.initialMax
                for row in rows {
                    let key = GateKey(gate: name, partition: row.partitions[index])
                    counters.insert(key)
                    adaptive[key] = initial
                }
            case .fairInterleave:
                break
            }
        }
        return RequiredState(buckets: buckets.values.sorted { $0.key < $1.key }, counters: counters.sorted(), adaptive: adaptive)
    }

    /// The lowest a shadow policy's bucket may go: the bound of
    /// `throttle_buckets_tokens_check`. A take that would pass it takes less.
    public static let shadowTokenFloor: Double = -1_000_000

    /// Decides which rows to admit, in batch order. A row is admitted when
    /// every gate has room for it in the row's partition; a refused row takes
    /// nothing, so later rows of other partitions can still go through.
    ///
    /// A shadow policy (``PolicyConfig/Mode/shadow``) admits every row a
    /// paused partition does not hold: each gate that had no room for a row
    /// counts it in ``AdmissionDecision/wouldRefuse``, and the row takes its
    /// tokens and slots all the same (a bucket may go below 0, down to
    /// ``shadowTokenFloor``; a counter above its cap).
    public func evaluate(_ rows: [PreparedRow], state: GateState, buckets: [BucketRequest]) -> AdmissionDecision {
        let rates = Dictionary(buckets.map { ($0.key, $0.rate) }, uniquingKeysWith: { a, _ in a })
        let perSecond = Dictionary(buckets.map { ($0.key, $0.per > 0 ? $0.rate / $0.per : 0) }, uniquingKeysWith: { a, _ in a })
        let bursts = Dictionary(buckets.map { ($0.key, $0.burst) }, uniquingKeysWith: { a, _ in a })
        var tokens = state.tokens
        var inFlight = state.inFlight
        var decision = AdmissionDecision()
        // The safety valve: an adaptive partition with nothing in flight at
        // the start of the tick may run at least initial_max jobs.
        var adaptiveLimit: [GateKey: Int] = [:]
        for gate in gates where gate.type == .adaptiveConcurrency {
            let settings = gate.adaptiveSettings
            for (key, cap) in state.adaptiveCap where key.gate == gate.effectiveName {
                let idle = (state.inFlight[key] ?? 0) == 0
                var limit = idle ? Swift.max(cap, settings.initialMax) : cap
                if let ceiling = settings.max { limit = Swift.min(limit, Swift.max(ceiling, settings.min)) }
                adaptiveLimit[key] = limit
            }
        }
        // Gate partitions this tick took capacity from, and the first lane
        // one of whose jobs found its partition taken by them: the rotation
        // continues just before that lane.
        var consumed = Set<GateKey>()
        var firstStarvedLane: Int?
        // Per lane: whether it admitted a job or lost one to this tick's own
        // admissions, and the refusals by state from before the tick.
        var lanes: [Int: LaneTally] = [:]
        let shadow = config.isShadow
        // Shadow mode: the cap each counter partition was measured against.
        var caps: [GateKey: Double] = [:]
        // Per lane: its jobs seen so far, and its weight (from its first job).
        var laneRows: [Int: Int] = [:]
        var laneWeights: [Int: Int] = [:]

        rows: for row in rows {
            if row.row.lane > 0 {
                laneRows[row.row.lane, default: 0] += 1
                if laneWeights[row.row.lane] == nil { laneWeights[row.row.lane] = config.weight(of: row.row.context) }
            }
            var throttleKeys: [(key: GateKey, cost: Double)] = []
            var slotKeys: [GateKey] = []
            for (index, gate) in gates.enumerated() where gate.type != .fairInterleave {
                let key = GateKey(gate: gate.effectiveName, partition: row.partitions[index])
                if state.paused.contains(key) {
                    // Paused by an operator: refused. A lane whose key is the
                    // partition was blocked by pause_partition itself; any
                    // other lane it stops is looked at again in a second (a
                    // resume, or a pause running out, is not seen sooner).
                    decision.refusedByGate[gate.effectiveName, default: 0] += 1
                    decision.refusedByPartition[key, default: 0] += 1
                    if row.row.lane > 0 {
                        var tally = lanes[row.row.lane] ?? LaneTally(key: row.row.roundRobinKey)
                        tally.see(row.partitions)
                        tally.refusals.insert(key)
                        tally.waits[key] = 1
                        lanes[row.row.lane] = tally
                    }
                    continue rows
                }
                let room: Bool
                switch gate.type {
                case .throttle:
                    let cost = self.cost(of: gate, for: row.row, burst: bursts[key] ?? FieldLimits.throttleBurst.maximum)
                    room = (rates[key] ?? 0) > 0 && (tokens[key] ?? 0) >= cost
                    throttleKeys.append((key, cost))
                    if !room, let refill = perSecond[key], refill > 0, refill.isFinite {
                        let wait = Swift.max(0, cost - (tokens[key] ?? 0)) / refill
                        if wait.isFinite { decision.tokenWaits[key] = Swift.min(decision.tokenWaits[key] ?? .infinity, wait) }
                    }
                case .concurrency:
                    let max = gate.max?.value(in: row.row.context, within: FieldLimits.concurrencyMax) ?? 0
                    room = Double(inFlight[key] ?? 0) < max
                    slotKeys.append(key)
                case .globalCap:
                    let max = gate.max?.value(in: [:], within: FieldLimits.globalCapMax) ?? 0
                    room = Double(inFlight[key] ?? 0) < max
                    slotKeys.append(key)
                case .adaptiveConcurrency:
                    room = (inFlight[key] ?? 0) < (adaptiveLimit[key] ?? gate.adaptiveSettings.initialMax)
                    slotKeys.append(key)
                    if !room { decision.adaptiveLimited.insert(key) }
                case .fairInterleave:
                    room = true
                }
                if !room && shadow {
                    // Admitted anyway: the gate only records it.
                    decision.wouldRefuse[key, default: WouldRefuse()].count += 1
                    decision.wouldRefuseByGate[gate.effectiveName, default: 0] += 1
                    switch gate.type {
                    case .concurrency:
                        caps[key] = gate.max?.value(in: row.row.context, within: FieldLimits.concurrencyMax) ?? 0
                    case .globalCap:
                        caps[key] = gate.max?.value(in: [:], within: FieldLimits.globalCapMax) ?? 0
                    case .adaptiveConcurrency:
                        caps[key] = Double(adaptiveLimit[key] ?? gate.adaptiveSettings.initialMax)
                    case .throttle, .fairInterleave:
                        break
                    }
                    continue
                }
                if !room {
                    decision.refusedByGate[gate.effectiveName, default: 0] += 1
                    decision.refusedByPartition[key, default: 0] += 1
                    let starved = consumed.contains(key)
                    if firstStarvedLane == nil, row.row.lane > 0, starved {
                        firstStarvedLane = row.row.lane
                        let weight = laneWeights[row.row.lane] ?? 1
                        if weight > 1 {
                            decision.starved = StarvedRow(
                                lane: row.row.roundRobinKey, index: laneRows[row.row.lane] ?? 1, weight: weight)
                        }
                    }
                    if row.row.lane > 0 {
                        var tally = lanes[row.row.lane] ?? LaneTally(key: row.row.roundRobinKey)
                        tally.see(row.partitions)
                        switch gate.type {
                        case .throttle:
                            tally.refusals.insert(key)
                            tally.waits[key] = decision.tokenWaits[key] ?? .infinity
                        case .concurrency, .adaptiveConcurrency:
                            tally.refusals.insert(key)
                            tally.inFlight[key] = inFlight[key] ?? 0
                        case .globalCap, .fairInterleave:
                            // A full global cap blocks the whole policy, not a
                            // lane: the next tick fetches nothing while it is full.
                            tally.shared = true
                        }
                        lanes[row.row.lane] = tally
                    }
                    continue rows
                }
            }
            for (key, cost) in throttleKeys {
                // A shadow take stops at the floor (an enforcing one never gets near).
                let take = shadow ? Swift.max(0, Swift.min(cost, (tokens[key] ?? 0) - Self.shadowTokenFloor)) : cost
                tokens[key, default: 0] -= take
                if take > 0 { decision.takes[key, default: 0] += take }
                consumed.insert(key)
            }
            for key in slotKeys {
                inFlight[key, default: 0] += 1
                consumed.insert(key)
            }
            if row.row.lane > 0 {
                var tally = lanes[row.row.lane] ?? LaneTally(key: row.row.roundRobinKey)
                tally.see(row.partitions)
                tally.admitted = true
                lanes[row.row.lane] = tally
            }
            var partitions: [String: String] = [:]
            for (index, gate) in gates.enumerated() { partitions[gate.effectiveName] = row.partitions[index] }
            decision.admitted.append(
                .init(
                    id: row.row.id, partitions: partitions,
                    slots: Dictionary(slotKeys.map { ($0.gate, $0.partition) }, uniquingKeysWith: { a, _ in a })))
        }
        // A shadow policy waits for no token: nothing was refused for one.
        if shadow { decision.tokenWaits = [:] }
        for (key, tally) in decision.wouldRefuse {
            var tally = tally
            if let cap = caps[key] {
                tally.overCap = Swift.max(0, Int(clamping: Int64((Double(inFlight[key] ?? 0) - cap).rounded(.up))))
            } else if let refill = perSecond[key], refill > 0, refill.isFinite {
                let lag = Swift.max(0, -(tokens[key] ?? 0)) / refill
                tally.lagSeconds = lag.isFinite ? lag : nil
            }
            decision.wouldRefuse[key] = tally
        }
        decision.cursor = Self.cursor(rows: rows.map(\.row), firstStarvedLane: firstStarvedLane)
        decision.laneBlocks = lanes.keys.sorted().compactMap { lanes[$0]?.block }
        return decision
    }

    /// What the jobs of one lane met in a tick.
    ///
    /// Room only shrinks within a tick, so a partition that refused a job has
    /// no room for it when the tick ends: until its next whole token, or
    /// until it releases a slot. A lane whose fetched jobs all share their
    /// partitions (a lane per partition, as without round_robin_by) can
    /// admit nothing more before then, whatever this tick admitted from it;
    /// a lane of mixed partitions only when none of its jobs got through
    /// (its next jobs may be for a partition with room).
    struct LaneTally {
        var key: String?
        var admitted = false
        /// Refused by the global cap: not the lane's to wait on.
        var shared = false
        var first: [String]?
        var mixed = false
        var refusals = Set<GateKey>()
        /// Seconds to the next whole token per refusing throttle partition
        /// (`.infinity`: it refills never, rate 0).
        var waits: [GateKey: Double] = [:]
        /// In flight per refusing counter partition, as the decision left it.
        var inFlight: [GateKey: Int] = [:]

        mutating func see(_ partitions: [String]) {
            guard let first else {
                self.first = partitions
                return
            }
            if !mixed && !partitions.elementsEqual(first, by: { ExactString($0) == ExactString($1) }) { mixed = true }
        }

        /// The block: until the one refusing partition has room (a token by
        /// the clock, a slot by a release), else, refused by several, the
        /// earliest token or a second at most.
        var block: LaneBlock? {
            guard !shared, let first = refusals.first, !admitted || !mixed else { return nil }
            if refusals.count == 1 {
                if let wait = waits[first] {
                    return wait.isFinite
                        ? LaneBlock(lane: key, seconds: wait)
                        : LaneBlock(lane: key, seconds: .infinity, releasedBy: first)
                }
                // Nothing in flight releases nothing (a job whose own cap is
                // 0): look again in a second.
                guard let held = inFlight[first], held > 0 else { return LaneBlock(lane: key, seconds: 1) }
                return LaneBlock(lane: key, seconds: .infinity, releasedBy: first, inFlight: held)
            }
            let soonest = waits.values.filter(\.isFinite).min() ?? 1
            return LaneBlock(lane: key, seconds: Swift.min(soonest, 1))
        }
    }

    /// Where the rotation continues. A job is *starved* when a gate refused
    /// it because jobs admitted earlier in this very tick took the room (a
    /// shared cap, a shared bucket); the lane of the first starved job, in
    /// the order the batch was decided, goes first next time: the rotation
    /// continues after the lane before it. Without starved jobs it continues
    /// after the last lane. A lane whose jobs were refused by state from
    /// before the tick (its own cap full, its bucket empty) is passed over,
    /// so blocked keys never hold up the rotation; and since the batch is
    /// decided in priority order, tenants of equal priority rotate among
    /// themselves even behind higher-priority ones.
    static func cursor(rows: [BatchRow], firstStarvedLane: Int?) -> CursorMove? {
        var keys: [Int: String?] = [:]
        for row in rows where row.lane > 0 && keys[row.lane] == nil { keys[row.lane] = .some(row.roundRobinKey) }
        let lanes = keys.keys.sorted()
        guard let last = lanes.last else { return nil }
        guard let starved = firstStarvedLane else { return .after(keys[last] ?? nil) }
        guard let before = lanes.last(where: { $0 < starved }) else { return .hold }
        return .after(keys[before] ?? nil)
    }
}
