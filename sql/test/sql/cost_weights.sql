-- pg_regress tests of cost-weighted throttles and weighted fairness
-- (issue 12): the bounds of cost and round_robin_weight, validate_policy
-- (in and out of bounds, a cost above the burst), staging refusing a job
-- whose cost exceeds its burst (stage, stage_many all or nothing),
-- fetch_batch's weighted quanta and rounds (and the cursor's served), the
-- served kept by admit, and explain showing a job's cost.
\set SHOW_CONTEXT never
\set VERBOSITY default
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
CREATE EXTENSION dispatch_policy;
RESET client_min_messages;

-- The bounds, appended at the end of limits().
SELECT field, minimum, minimum_exclusive, maximum, integral, default_value, unit
FROM dispatch_policy.limits() WHERE field IN ('throttle.cost', 'round_robin_weight');

-- Accepted: a constant cost, a cost from the context, equal to the burst,
-- fractional; weights as a number and from the context.
SELECT dispatch_policy.validate_policy('ok1', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "burst": 10, "cost": 2.5}]}');
SELECT dispatch_policy.validate_policy('ok2', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "burst": 10, "cost": {"context": "units", "default": 10}}]}');
SELECT dispatch_policy.validate_policy('ok3', '{"gates": [{"type": "throttle", "rate": 5, "per": 1, "cost": 5}]}');
SELECT dispatch_policy.validate_policy('ok4', '{"round_robin_by": "{t}", "round_robin_weight": 1000}');
SELECT dispatch_policy.validate_policy('ok5', '{"round_robin_by": "{t}", "round_robin_weight": {"context": "w", "default": 1}}');

-- Refused, naming the field: cost 0 or negative or above its bound, a cost
-- (or its default) above the burst (or, without burst, the rate), weights
-- out of [1, 1000] or not integers.
SELECT dispatch_policy.validate_policy('bad', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "cost": 0}]}');
\echo :SQLSTATE
SELECT dispatch_policy.validate_policy('bad', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "cost": -1}]}');
SELECT dispatch_policy.validate_policy('bad', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "burst": 1000000, "cost": 1000001}]}');
SELECT dispatch_policy.validate_policy('bad', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "cost": "5"}]}');
SELECT dispatch_policy.validate_policy('bad', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "burst": 10, "cost": 11}]}');
\echo :SQLSTATE
SELECT dispatch_policy.validate_policy('bad', '{"gates": [{"type": "throttle", "rate": 5, "per": 60, "cost": 6}]}');
SELECT dispatch_policy.validate_policy('bad', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "burst": {"context": "b", "default": 4}, "cost": {"context": "units", "default": 5}}]}');
SELECT dispatch_policy.validate_policy('bad', '{"gates": [{"type": "concurrency", "max": 1, "cost": 1}]}');
SELECT dispatch_policy.validate_policy('bad', '{"round_robin_weight": 0}');
\echo :SQLSTATE
SELECT dispatch_policy.validate_policy('bad', '{"round_robin_weight": 1001}');
SELECT dispatch_policy.validate_policy('bad', '{"round_robin_weight": 2.5}');
SELECT dispatch_policy.validate_policy('bad', '{"round_robin_weight": {"context": "w", "default": 0}}');
SELECT dispatch_policy.validate_policy('bad', '{"round_robin_weight": {"context": "w"}}');
SELECT count(*) AS policies FROM dispatch_policy.policies;

-- Staging: a job whose cost (from its context) exceeds its bucket's burst
-- is refused with 22023 naming the gate, the cost and the burst; nothing is
-- stored. stage_many is all or nothing.
SELECT dispatch_policy.declare_policy('api', '{"gates": [{"type": "throttle", "name": "units", "rate": 100, "per": 60, "burst": 10, "cost": {"context": "units", "default": 1}, "partition_by": "{ep}"}]}');
SELECT dispatch_policy.stage('api', '{}', '{"ep": "a", "units": 10}') IS NOT NULL AS staged;
SELECT dispatch_policy.stage('api', '{}', '{"ep": "a", "units": 11}');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('api', '[{"args": {}, "context": {"units": 2}}, {"args": {}, "context": {"units": 2}}, {"args": {}, "context": {"units": 20}}]');
\echo :SQLSTATE
-- A context value out of cost's bounds is not used (the default applies,
-- as in the runner): staged.
SELECT dispatch_policy.stage('api', '{}', '{"ep": "a", "units": -5}') IS NOT NULL AS staged;
-- A burst from the context counts too.
SELECT dispatch_policy.declare_policy('api2', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "burst": {"context": "b", "default": 5}, "cost": {"context": "units", "default": 1}}]}');
SELECT dispatch_policy.stage('api2', '{}', '{"units": 8, "b": 8}') IS NOT NULL AS staged;
SELECT dispatch_policy.stage('api2', '{}', '{"units": 8}');
SELECT policy, count(*) FROM dispatch_policy.staged_jobs GROUP BY 1 ORDER BY 1;
-- Policies without a cost: nothing to check.
SELECT name, cost_gates FROM dispatch_policy.policies ORDER BY name;

-- explain: the job's cost, and the wait until the bucket holds it.
SELECT verdict, explanation FROM dispatch_policy.explain(
  (SELECT min(id) FROM dispatch_policy.staged_jobs WHERE policy = 'api')) WHERE aspect = 'gate';
SELECT dispatch_policy.refill_buckets('api', '[{"gate": "units", "partition": "a", "rate": 100, "per": 60, "burst": 10}]', now());
-- 4 tokens, 6 to go at 100 per 60 s: 3.6 s.
BEGIN;
UPDATE dispatch_policy.throttle_buckets SET tokens = 4, refilled_at = now() WHERE policy = 'api';
SELECT verdict, explanation, wait_seconds
FROM dispatch_policy.explain((SELECT min(id) FROM dispatch_policy.staged_jobs WHERE policy = 'api')) WHERE aspect = 'gate';
SELECT aspect, verdict, explanation, wait_seconds
FROM dispatch_policy.explain((SELECT min(id) FROM dispatch_policy.staged_jobs WHERE policy = 'api')) WHERE aspect = 'estimate';
COMMIT;

-- Weighted fairness in the fetch: tenant a (weight 1) and b (weight 3),
-- 20 jobs each. A lane gets quantum x weight rows, weight rows per round.
SELECT dispatch_policy.declare_policy('fair', '{"round_robin_by": "{t}", "round_robin_weight": {"context": "w", "default": 1}}');
SELECT cardinality(dispatch_policy.stage_many('fair',
  (SELECT jsonb_agg(jsonb_build_object('args', '{}'::jsonb, 'context', jsonb_build_object('t', t, 'w', w)))
   FROM (VALUES ('a', 1), ('b', 3)) AS v(t, w), generate_series(1, 20)))) AS staged;
BEGIN;
SELECT string_agg(f.round_robin_key, '' ORDER BY f.n) AS batch_of_12_quantum_2
FROM dispatch_policy.fetch_batch('fair', 12, 2) WITH ORDINALITY AS f(id, priority, round_robin_key, context, lane, n);
ROLLBACK;
BEGIN;
SELECT string_agg(f.round_robin_key, '' ORDER BY f.n) AS batch_of_40_quantum_50
FROM dispatch_policy.fetch_batch('fair', 40, 50) WITH ORDINALITY AS f(id, priority, round_robin_key, context, lane, n);
ROLLBACK;
-- Quantum 1: a gives 1 row and b gives 3 (then the top-up).
BEGIN;
SELECT f.round_robin_key, count(*) FROM (SELECT * FROM dispatch_policy.fetch_batch('fair', 4, 1)) f GROUP BY 1 ORDER BY 1;
ROLLBACK;
-- A constant weight applies to every lane: the same rounds as without one.
SELECT dispatch_policy.declare_policy('even', '{"round_robin_by": "{t}", "round_robin_weight": 2}');
SELECT cardinality(dispatch_policy.stage_many('even',
  (SELECT jsonb_agg(jsonb_build_object('args', '{}'::jsonb, 'context', jsonb_build_object('t', t)))
   FROM (VALUES ('a'), ('b')) AS v(t), generate_series(1, 5)))) AS staged;
BEGIN;
SELECT string_agg(f.round_robin_key, '' ORDER BY f.n) AS even_batch
FROM dispatch_policy.fetch_batch('even', 10, 2) WITH ORDINALITY AS f(id, priority, round_robin_key, context, lane, n);
ROLLBACK;

-- The cursor's served: a tick that admitted a's job and the first of b's
-- round of three, then ran out of room at b's second job (index 2 in lane
-- b), continues after a with served 1: the next fetch gives b the 2 rows
-- left of its round first, then a.
SELECT dispatch_policy.admit('fair', '[]', '[]', NULL, now(),
  '{"last_key": "a", "starved": {"lane": "b", "index": 2, "weight": 3}}');
SELECT last_key, served, served_lane FROM dispatch_policy.round_robin_cursors WHERE policy = 'fair';
BEGIN;
SELECT string_agg(f.round_robin_key, '' ORDER BY f.n) AS after_served_1
FROM dispatch_policy.fetch_batch('fair', 8, 2) WITH ORDINALITY AS f(id, priority, round_robin_key, context, lane, n);
ROLLBACK;
-- Held on b, cut at its 2nd job again: b had 1 + 1 of its round: served 2.
SELECT dispatch_policy.admit('fair', '[]', '[]', NULL, now(),
  '{"hold": true, "starved": {"lane": "b", "index": 2, "weight": 3}}');
SELECT last_key, served, served_lane FROM dispatch_policy.round_robin_cursors WHERE policy = 'fair';
-- Cut at a round's end: served 0. Without starved: served 0.
SELECT dispatch_policy.admit('fair', '[]', '[]', NULL, now(),
  '{"hold": true, "starved": {"lane": "b", "index": 2, "weight": 3}}');
SELECT last_key, served, served_lane FROM dispatch_policy.round_robin_cursors WHERE policy = 'fair';
SELECT dispatch_policy.admit('fair', '[]', '[]', NULL, now(), '{"last_key": "b", "starved": {"lane": "a", "index": 3, "weight": 4}}');
SELECT last_key, served, served_lane FROM dispatch_policy.round_robin_cursors WHERE policy = 'fair';
SELECT dispatch_policy.admit('fair', '[]', '[]', NULL, now(), '{"last_key": "a"}');
SELECT last_key, served, served_lane FROM dispatch_policy.round_robin_cursors WHERE policy = 'fair';
-- explain gives a job's lane its weight (round_robin_weight, read from the
-- lane's first job as the fetch reads it); a policy without one, none.
SELECT s.round_robin_key, e.verdict, e.explanation
FROM (SELECT DISTINCT ON (round_robin_key) id, round_robin_key FROM dispatch_policy.staged_jobs
      WHERE policy = 'fair' ORDER BY round_robin_key, id DESC) s,
     dispatch_policy.explain(s.id) e
WHERE e.aspect = 'lane' ORDER BY 1;
SELECT explanation NOT LIKE '%weight%' AS no_weight
FROM dispatch_policy.explain((SELECT min(id) FROM dispatch_policy.staged_jobs WHERE policy = 'api')) WHERE aspect = 'lane';

-- A duplicate that is kept (dedupe_mode keep: the job holding its key is
-- what runs) is not checked on its cost, which nothing charges: kept, its
-- holder's id. A duplicate of an earlier element of the same call too. A
-- job with a key nobody holds is checked (22023), in stage_many too,
-- as is a replace (dedupe_mode replace), whose context is what runs.
SELECT dispatch_policy.declare_policy('dup', '{"gates": [{"type": "throttle", "rate": 100, "per": 60, "burst": 10, "cost": {"context": "units", "default": 1}}]}');
SELECT dispatch_policy.stage('dup', '1', '{"units": 5}', dedupe_key => 'k') AS dup1 \gset
SELECT id = :dup1 AS holder, outcome FROM dispatch_policy.stage_outcome('dup', '2', '{"units": 50}', dedupe_key => 'k');
SELECT idx, id = :dup1 AS holder, outcome FROM dispatch_policy.stage_many_outcomes('dup',
  '[{"args": 3, "context": {"units": 50}, "dedupe_key": "k"}, {"args": 4, "context": {"units": 2}, "dedupe_key": "k2"},
    {"args": 5, "context": {"units": 60}, "dedupe_key": "k2"}]') ORDER BY idx;
SELECT dispatch_policy.stage_outcome('dup', '6', '{"units": 50}', dedupe_key => 'k3');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('dup', '[{"args": 7, "context": {"units": 50}, "dedupe_key": "k3"}]');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('dup_replace', '{"dedupe_mode": "replace", "gates": [{"type": "throttle", "rate": 100, "per": 60, "burst": 10, "cost": {"context": "units", "default": 1}}]}');
SELECT outcome FROM dispatch_policy.stage_outcome('dup_replace', '1', '{"units": 5}', dedupe_key => 'k');
SELECT dispatch_policy.stage_outcome('dup_replace', '2', '{"units": 50}', dedupe_key => 'k');
\echo :SQLSTATE
SELECT args, context ->> 'units' AS units FROM dispatch_policy.staged_jobs WHERE policy IN ('dup', 'dup_replace') ORDER BY id;

-- fair_interleave's round across ticks: tick_finish keeps the runner's
-- "interleave" (round_robin_cursors.interleave) and passes the rest of the
-- cursor to admit; tick_state returns it (kind interleave, served as
-- in_flight); a malformed one reads as none, or as a new round.
SELECT dispatch_policy.declare_policy('il', '{"gates": [{"type": "fair_interleave", "partition_by": "{t}"}]}');
SELECT cardinality(dispatch_policy.stage_many('il', '[{"args": 1, "context": {"t": "a"}}]')) AS staged;
SELECT kind FROM dispatch_policy.tick_begin('il', 10, 1) WHERE kind <> 'job';
SELECT dispatch_policy.tick_finish('il', now(), '{}', '{}', '{}', '{}', '{}', '{}', NULL,
  '{"interleave": {"fair_interleave": {"key": "b", "served": 2}}}');
SELECT last_key, interleave FROM dispatch_policy.round_robin_cursors WHERE policy = 'il';
SELECT kind, gate, partition, in_flight FROM dispatch_policy.tick_state('il', now(), '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}');
UPDATE dispatch_policy.round_robin_cursors SET interleave =
  '{"fair_interleave": {"key": "b", "served": 1e9}, "g2": {"key": 7, "served": 1}, "g3": [1], "g4": {"key": "c", "served": "x"}}'
WHERE policy = 'il';
SELECT kind, gate, partition, in_flight FROM dispatch_policy.tick_state('il', now(), '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}')
ORDER BY gate;
UPDATE dispatch_policy.round_robin_cursors SET interleave = '[1, 2]' WHERE policy = 'il';
SELECT count(*) AS rows FROM dispatch_policy.tick_state('il', now(), '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}');
