-- pg_regress tests of the dispatch_policy SQL API: results and error texts.
-- After every statement that fails, \echo :SQLSTATE pins the error's code:
-- the default verbosity shows the message, DETAIL and HINT but no SQLSTATE,
-- and VERBOSITY verbose would add a LOCATION line (a C file and line of the
-- server) that changes from one PostgreSQL build to the next.
\set SHOW_CONTEXT never
\set VERBOSITY default
CREATE EXTENSION dispatch_policy;

-- declare_policy: a valid policy with every gate type.
SELECT dispatch_policy.declare_policy('webhooks', '{
  "gates": [
    {"type": "throttle", "name": "per_endpoint", "rate": {"context": "rate_limit", "default": 60},
     "per": 60, "burst": 100, "partition_by": "{endpoint_id}"},
    {"type": "concurrency", "max": 5, "partition_by": "acct:{account_id}"},
    {"type": "global_cap", "max": 200},
    {"type": "fair_interleave"},
    {"type": "adaptive_concurrency", "partition_by": "{account_id}", "initial_max": 3,
     "target_lag_ms": 1000, "min": 1}
  ],
  "round_robin_by": "{account_id}",
  "batch_size": 500,
  "round_robin_quantum": 50,
  "lease_seconds": 900,
  "max_attempts": 25,
  "target": {"type": "ready_queue"}
}');
SELECT name, paused, jsonb_array_length(config -> 'gates') AS gates FROM dispatch_policy.policies;

-- declare_policy: every rule refuses with 22023 and names the field.
SELECT dispatch_policy.declare_policy('', '{}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '[]');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gatez": []}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": {}}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "leaky_bucket"}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "per": 60}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "rate": -1, "per": 60}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "rate": 1, "per": 0}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "rate": 1, "per": 1, "burst": 0.5}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "rate": {"context": "r"}, "per": 1}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "rate": 1, "per": 1, "partition_by": "{a"}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "concurrency", "max": 1.5}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "global_cap", "max": 1, "partition_by": "{a}"}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "adaptive_concurrency", "initial_max": 3}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 10, "ewma_alpha": 0}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 10, "failure_decrease_factor": 1}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 10, "min": 5, "max": 2}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "rate": 10, "per": 60}, {"type": "throttle", "rate": 600, "per": 3600}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"batch_size": 0}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"target": {"type": "sql", "function": "no schema"}}');
\echo :SQLSTATE
SELECT count(*) AS policies_after_errors FROM dispatch_policy.policies;

-- Two throttles with different names are fine.
SELECT dispatch_policy.declare_policy('two_throttles', '{"gates": [
  {"type": "throttle", "name": "per_minute", "rate": 10, "per": 60},
  {"type": "throttle", "name": "per_hour", "rate": 600, "per": 3600}]}');

-- stage: ids, context injection, round-robin key from the template.
SELECT dispatch_policy.stage('webhooks', '{"event": 1}', '{"account_id": 7, "endpoint_id": "e1"}');
SELECT dispatch_policy.stage('webhooks', '{"event": 2}', '{"account_id": 7, "queue_name": "mine"}', queue => 'urgent', priority => -1);
SELECT id, queue, priority, context, round_robin_key, not_before FROM dispatch_policy.staged_jobs ORDER BY id;

-- stage: dedupe returns NULL and stores nothing.
SELECT dispatch_policy.stage('webhooks', '{}', dedupe_key => 'event:1');
SELECT outcome = 'kept' AS deduped FROM dispatch_policy.stage_outcome('webhooks', '{}', dedupe_key => 'event:1');
SELECT count(*) AS staged FROM dispatch_policy.staged_jobs;

-- stage: errors.
SELECT dispatch_policy.stage('nope', '{}');
\echo :SQLSTATE
SELECT dispatch_policy.stage('webhooks', NULL);
\echo :SQLSTATE
SELECT dispatch_policy.stage('webhooks', '{}', '[1, 2]');
\echo :SQLSTATE
SELECT dispatch_policy.stage('webhooks', '{}', queue => '');
\echo :SQLSTATE

-- stage_many: order, dedupe within the call and against staged jobs.
SELECT dispatch_policy.stage_many('webhooks', '[
  {"args": 1, "dedupe_key": "a"},
  {"args": 2, "dedupe_key": "a"},
  {"args": 3},
  {"args": 4, "dedupe_key": "event:1"}
]');
SELECT dispatch_policy.stage_many('webhooks', '[]');

-- stage_many: one bad element stores nothing and is named.
SELECT dispatch_policy.stage_many('webhooks', '{"args": 1}');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('webhooks', '[{"args": 1}, 7]');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('webhooks', '[{"args": 1}, {"args": 2, "priority": 1.5}]');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('webhooks', '[{"args": 1}, {"args": 2, "not_before": "someday"}]');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('webhooks', '[{"args": 1}, {"args": 2, "delay": 5}]');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('webhooks', '[{"args": 1}, {"context": {}}]');
\echo :SQLSTATE
SELECT count(*) AS staged FROM dispatch_policy.staged_jobs;

-- pause / resume.
SELECT dispatch_policy.pause('webhooks');
SELECT policy, pending, scheduled, in_flight, paused FROM dispatch_policy.policy_overview ORDER BY policy;
SELECT dispatch_policy.resume('webhooks');
SELECT dispatch_policy.pause('nope');
\echo :SQLSTATE

-- partition_overview: one row per gate partition with waiting jobs.
SELECT policy, gate, gate_type, partition, pending, in_flight, cap
FROM dispatch_policy.partition_overview ORDER BY policy, gate, partition;

-- Admission primitives and worker calls: errors.
SELECT dispatch_policy.complete(999999);
\echo :SQLSTATE
SELECT dispatch_policy.fail(999999, 'boom');
\echo :SQLSTATE
SELECT dispatch_policy.started(999999);
\echo :SQLSTATE
BEGIN;
SELECT dispatch_policy.admit('webhooks', '[{"id": 999999, "slots": {}}]');
\echo :SQLSTATE
ROLLBACK;
-- A staged (not admitted) job cannot be completed.
SELECT dispatch_policy.complete(1);
\echo :SQLSTATE
-- Admit through the primitives, then complete twice: the second is a no-op.
BEGIN;
SELECT dispatch_policy.try_lock_policy('two_throttles');
SELECT count(*) FROM dispatch_policy.fetch_batch('webhooks', 2, 50);
SELECT dispatch_policy.admit('webhooks', '[{"id": 1, "slots": {"concurrency": "acct:7"}}]');
COMMIT;
SELECT dispatch_policy.complete(1), dispatch_policy.complete(1);
SELECT gate, partition, in_flight FROM dispatch_policy.inflight_counters ORDER BY 1, 2;

-- Limits: every bound in one place, and the errors derived from it.
SELECT field, minimum, minimum_exclusive, maximum, maximum_exclusive, integral, default_value, unit
FROM dispatch_policy.limits() ORDER BY field;
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "rate": 1e308, "per": 1}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "rate": 1, "per": 1e-308}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "throttle", "rate": 1, "per": {"context": "w", "default": 0}}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 10, "max": 1e20}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "adaptive_concurrency", "target_lag_ms": 10, "initial_max": 3000000000}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"gates": [{"type": "global_cap", "max": 1e400}]}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('p', '{"lease_seconds": 2160000000}');
\echo :SQLSTATE
-- per may come from the context, like rate, burst and max.
SELECT dispatch_policy.validate_policy('p', '{"gates": [{"type": "throttle", "rate": 1, "per": {"context": "window", "default": 60}}]}');
-- A direct write is validated like declare_policy.
INSERT INTO dispatch_policy.policies (name, config) VALUES ('direct', '{"batch_size": 0}');
\echo :SQLSTATE
SELECT count(*) AS policies FROM dispatch_policy.policies;

-- Staging limits.
SELECT dispatch_policy.stage('webhooks', '{}', queue => repeat('q', 129));
\echo :SQLSTATE
SELECT dispatch_policy.stage('webhooks', '{}', dedupe_key => repeat('k', 513));
\echo :SQLSTATE
SELECT dispatch_policy.stage('webhooks', '{}', dedupe_key => '');
\echo :SQLSTATE
SELECT dispatch_policy.stage('webhooks', '{}', round_robin_key => repeat('r', 513));
\echo :SQLSTATE
SELECT dispatch_policy.stage('webhooks', '{}', not_before => 'infinity');
\echo :SQLSTATE
SELECT dispatch_policy.stage('webhooks', '{}', jsonb_build_object('big', repeat('x', 70000)));
\echo :SQLSTATE
-- A rendered round-robin key that would not fit an index is stored shortened.
SELECT dispatch_policy.stage('webhooks', '{}', jsonb_build_object('account_id', repeat('x', 3000))) AS long_id \gset
SELECT octet_length(round_robin_key) AS bytes, left(round_robin_key, 5) || right(round_robin_key, 35) AS key
FROM dispatch_policy.staged_jobs WHERE id = :long_id;

-- Worker calls: arguments within bounds, attempts fenced.
SELECT dispatch_policy.complete(999999, attempt => 1);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.claim('default', 'w', 0);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.claim('default', repeat('w', 300), 1);
\echo :SQLSTATE
SELECT dispatch_policy.fail(1, 'x', interval '-1 second');
\echo :SQLSTATE
SELECT dispatch_policy.complete(1, attempt => 2);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.complete_many(ARRAY[1, 999999], ARRAY[2, NULL]);
SELECT * FROM dispatch_policy.complete_many(ARRAY[1], '{}');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.complete_many(ARRAY[1, NULL], ARRAY[1, 1]);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.complete_many(array_fill(1::bigint, ARRAY[10001]), array_fill(1, ARRAY[10001]));
\echo :SQLSTATE
SELECT * FROM dispatch_policy.prune('1000000 years');
\echo :SQLSTATE
