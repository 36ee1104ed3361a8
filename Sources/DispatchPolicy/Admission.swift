/// A fetched job, as gates see it.
public struct BatchRow: Sendable, Equatable {
    public var id: Int64
    public var priority: Int
    public var roundRobinKey: String?
    /// Context values as strings (what templates and gate values read).
    public var context: [String: String]

    public init(id: Int64, priority: Int = 0, roundRobinKey: String? = nil, context: [String: String] = [:]) {
        self.id = id
        self.priority = priority
        self.roundRobinKey = roundRobinKey
        self.context = context
    }
}

/// A gate partition: the gate's name and the rendered partition key.
public struct GateKey: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var gate: String
    public var partition: String

    public init(gate: String, partition: String) {
        self.gate = gate
        self.partition = partition
    }

    public static func < (a: GateKey, b: GateKey) -> Bool { (a.gate, a.partition) < (b.gate, b.partition) }
    public var description: String { "\(gate)/\(partition)" }
}

/// A throttle bucket the tick must read: its partition and the rate, window
/// and capacity in effect (from the first job of the partition in the batch).
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

    public init(tokens: [GateKey: Double] = [:], inFlight: [GateKey: Int] = [:], adaptiveCap: [GateKey: Int] = [:]) {
        self.tokens = tokens
        self.inFlight = inFlight
        self.adaptiveCap = adaptiveCap
    }
}

/// What the tick admits.
public struct AdmissionDecision: Sendable, Equatable {
    public struct Admitted: Sendable, Equatable {
        public var id: Int64
        /// Gate name → partition, for the gates whose slot the job holds.
        public var slots: [String: String]
    }

    public var admitted: [Admitted] = []
    /// Tokens to take, per throttle partition.
    public var takes: [GateKey: Double] = [:]
    /// Rows refused, by the first gate (in declared order) that had no room.
    public var refusedByGate: [String: Int] = [:]
}

/// Gate evaluation over an in-memory batch. Pure: no I/O, no clock.
public struct Admission: Sendable {
    public let config: PolicyConfig

    public init(config: PolicyConfig) {
        self.config = config
    }

    /// The partition of a row for a gate: its template rendered, or `default`.
    public func partition(of row: BatchRow, for gate: Gate) -> String {
        guard gate.type != .globalCap, let template = gate.partitionBy else { return "default" }
        return Template.render(template, context: row.context)
    }

    /// The key fair_interleave groups by: its own partition_by, else that of
    /// the first gate that has one; nil when there is none (no reordering).
    func interleaveTemplate(_ gate: Gate) -> String? {
        gate.partitionBy ?? config.gates.first { $0.type != .fairInterleave && $0.type != .globalCap && $0.partitionBy != nil }?.partitionBy
    }

    /// Applies every fair_interleave gate: rows are regrouped round-robin
    /// across partitions (first row of each partition in order of first
    /// appearance, then every partition's second row, ...), keeping the order
    /// within a partition.
    public func order(_ rows: [BatchRow]) -> [BatchRow] {
        var rows = rows
        for gate in config.gates where gate.type == .fairInterleave {
            guard let template = interleaveTemplate(gate) else { continue }
            var groups: [String: [BatchRow]] = [:]
            var firstSeen: [String] = []
            for row in rows {
                let key = Template.render(template, context: row.context)
                if groups[key] == nil { firstSeen.append(key) }
                groups[key, default: []].append(row)
            }
            var interleaved: [BatchRow] = []
            interleaved.reserveCapacity(rows.count)
            var round = 0
            while interleaved.count < rows.count {
                for key in firstSeen where round < groups[key]!.count {
                    interleaved.append(groups[key]![round])
                }
                round += 1
            }
            rows = interleaved
        }
        return rows
    }

    /// The state this batch needs: buckets (with the first row's rate, per,
    /// burst), counters and adaptive caps, each sorted by key.
    public func requiredState(for rows: [BatchRow]) -> (buckets: [BucketRequest], counters: [GateKey], adaptive: [(key: GateKey, initialMax: Int)]) {
        var buckets: [GateKey: BucketRequest] = [:]
        var counters = Set<GateKey>()
        var adaptive: [GateKey: Int] = [:]
        for gate in config.gates {
            switch gate.type {
            case .throttle:
                for row in rows {
                    let key = GateKey(gate: gate.effectiveName, partition: partition(of: row, for: gate))
                    if buckets[key] == nil {
                        let rate = gate.rate?.value(in: row.context) ?? 0
                        let burst = gate.burst?.value(in: row.context) ?? Swift.max(rate, 1)
                        buckets[key] = BucketRequest(key: key, rate: Swift.max(rate, 0), per: gate.per ?? 1, burst: Swift.max(burst, 1))
                    }
                }
            case .concurrency, .globalCap:
                for row in rows { counters.insert(GateKey(gate: gate.effectiveName, partition: partition(of: row, for: gate))) }
            case .adaptiveConcurrency:
                let initial = gate.adaptiveSettings.initialMax
                for row in rows {
                    let key = GateKey(gate: gate.effectiveName, partition: partition(of: row, for: gate))
                    counters.insert(key)
                    adaptive[key] = initial
                }
            case .fairInterleave:
                break
            }
        }
        return (
            buckets.values.sorted { $0.key < $1.key },
            counters.sorted(),
            adaptive.map { (key: $0.key, initialMax: $0.value) }.sorted { $0.key < $1.key }
        )
    }

    /// Decides which rows to admit, in batch order. A row is admitted when
    /// every gate has room for it in the row's partition; a refused row takes
    /// nothing, so later rows of other partitions can still go through.
    public func evaluate(_ rows: [BatchRow], state: GateState, buckets: [BucketRequest]) -> AdmissionDecision {
        let rates = Dictionary(buckets.map { ($0.key, $0.rate) }, uniquingKeysWith: { a, _ in a })
        var tokens = state.tokens
        var inFlight = state.inFlight
        var decision = AdmissionDecision()
        let gates = config.gates.filter { $0.type != .fairInterleave }
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

        rows: for row in rows {
            var slots: [String: String] = [:]
            var throttleKeys: [GateKey] = []
            for gate in gates {
                let key = GateKey(gate: gate.effectiveName, partition: partition(of: row, for: gate))
                let room: Bool
                switch gate.type {
                case .throttle:
                    room = (rates[key] ?? 0) > 0 && (tokens[key] ?? 0) >= 1
                    throttleKeys.append(key)
                case .concurrency, .globalCap:
                    let max = gate.max?.value(in: row.context) ?? 0
                    room = Double(inFlight[key] ?? 0) < max
                    slots[key.gate] = key.partition
                case .adaptiveConcurrency:
                    room = (inFlight[key] ?? 0) < (adaptiveLimit[key] ?? gate.adaptiveSettings.initialMax)
                    slots[key.gate] = key.partition
                case .fairInterleave:
                    room = true
                }
                if !room {
                    decision.refusedByGate[gate.effectiveName, default: 0] += 1
                    continue rows
                }
            }
            for key in throttleKeys {
                tokens[key, default: 0] -= 1
                decision.takes[key, default: 0] += 1
            }
            for (gate, partition) in slots {
                inFlight[GateKey(gate: gate, partition: partition), default: 0] += 1
            }
            decision.admitted.append(.init(id: row.id, slots: slots))
        }
        return decision
    }
}
