-- pg_regress tests of dispatch_policy.check() and dispatch_policy.repair():
-- nothing to report through normal operation; each kind of corruption
-- reported exactly, repaired, and reported no more.
\set SHOW_CONTEXT never
\set VERBOSITY sqlstate
-- A database of its own state (the api test may have run before).
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
CREATE EXTENSION dispatch_policy;
RESET client_min_messages;

-- Policies with every gate type. The throttles refill one token a year, so
-- token counts do not move while the test runs.
SELECT dispatch_policy.declare_policy('mixed', '{
  "gates": [
    {"type": "throttle", "name": "per_endpoint", "rate": 1, "per": 31536000, "burst": 5, "partition_by": "{endpoint}"},
    {"type": "concurrency", "name": "per_account", "max": 3, "partition_by": "acct:{account}"},
    {"type": "global_cap", "max": 10},
    {"type": "fair_interleave"},
    {"type": "adaptive_concurrency", "name": "adaptive", "partition_by": "{account}", "initial_max": 2,
     "target_lag_ms": 1000}
  ],
  "round_robin_by": "{account}",
  "max_attempts": 3
}');
SELECT dispatch_policy.declare_policy('plain', '{"gates": [
  {"type": "throttle", "rate": 2, "per": 31536000},
  {"type": "concurrency", "max": 2}]}');
SELECT dispatch_policy.stage_many('mixed', '[
  {"args": 1, "context": {"account": "a", "endpoint": "e1"}, "dedupe_key": "k1"},
  {"args": 2, "context": {"account": "a", "endpoint": "e1"}, "dedupe_key": "k2"},
  {"args": 3, "context": {"account": "b", "endpoint": "e2"}, "dedupe_key": "k3"},
  {"args": 4, "context": {"account": "b", "endpoint": "e2"}},
  {"args": 5, "context": {"account": "c", "endpoint": "e1"}},
  {"args": 6, "context": {"account": "c", "endpoint": "e3"}}
]');
SELECT dispatch_policy.stage_many('plain', '[{"args": 1}, {"args": 2}, {"args": 3, "dedupe_key": "p"}]');
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;

-- A tick as the runner does it: lock, fetch, refill the buckets of the
-- batch, admit with every gate's partition (_gate_partitions is the map the
-- runner computes) and the tokens taken.
CREATE FUNCTION pg_temp.tick(policy text, batch_size integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
  cfg jsonb := (SELECT p.config FROM dispatch_policy.policies p WHERE p.name = tick.policy);
  jobs jsonb;
  buckets jsonb;
  takes jsonb;
BEGIN
  IF NOT dispatch_policy.try_lock_policy(tick.policy) THEN
    RETURN NULL;
  END IF;
  SELECT jsonb_agg(jsonb_build_object('id', b.id, 'partitions', dispatch_policy._gate_partitions(cfg, b.context)) ORDER BY b.id)
  INTO jobs FROM dispatch_policy.fetch_batch(tick.policy, tick.batch_size, 50) b;
  WITH throttles AS (
    SELECT coalesce(g ->> 'name', g ->> 'type') AS gate, g AS config
    FROM jsonb_array_elements(cfg -> 'gates') g WHERE g ->> 'type' = 'throttle'
  ), taken AS (
    SELECT t.gate, t.config, j -> 'partitions' ->> t.gate AS part, count(*) AS tokens
    FROM jsonb_array_elements(jobs) j, throttles t GROUP BY 1, 2, 3
  )
  SELECT jsonb_agg(jsonb_build_object('gate', x.gate, 'partition', x.part, 'rate', (x.config ->> 'rate')::float8,
                                      'per', (x.config ->> 'per')::float8,
                                      'burst', dispatch_policy._throttle_burst(x.config))),
         jsonb_agg(jsonb_build_object('gate', x.gate, 'partition', x.part, 'tokens', x.tokens))
  INTO buckets, takes FROM taken x;
  IF buckets IS NOT NULL THEN
    PERFORM 1 FROM dispatch_policy.refill_buckets(tick.policy, buckets);
  END IF;
  RETURN dispatch_policy.admit(tick.policy, coalesce(jobs, '[]'), coalesce(takes, '[]'));
END
$$;

-- Normal operation: admit, claim, complete, fail (the retry keeps its
-- dedupe key), fold observations. Nothing to report.
SELECT pg_temp.tick('mixed', 4) AS admitted;
SELECT pg_temp.tick('plain', 2) AS admitted;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT id, policy, partitions FROM dispatch_policy.admitted_jobs ORDER BY id;
SELECT policy, gate, partition, in_flight FROM dispatch_policy.inflight_counters ORDER BY 1, 2, 3;
SELECT policy, gate, partition, dispatch_policy._tokens_text(tokens) AS tokens, burst
FROM dispatch_policy.throttle_buckets ORDER BY 1, 2, 3;
SELECT id FROM dispatch_policy.claim('default', 'w1', 10) ORDER BY id;
SELECT dispatch_policy.complete(1);
SELECT dispatch_policy.fail(3, 'boom');
SELECT dispatch_policy.complete(7);
SELECT count(*) AS folded FROM dispatch_policy.take_observations('mixed', 'adaptive');
SELECT * FROM dispatch_policy.dedupe_keys ORDER BY 1, 2;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;

-- A redeclare that changes the gates: a lower burst (buckets keep their
-- tokens until their next refill), another concurrency template, the
-- adaptive gate gone (its per-minute history stays), the global cap renamed.
SELECT dispatch_policy.declare_policy('mixed', '{
  "gates": [
    {"type": "throttle", "name": "per_endpoint", "rate": 1, "per": 31536000, "burst": 2, "partition_by": "{endpoint}"},
    {"type": "concurrency", "name": "per_account", "max": 3, "partition_by": "{account}-{endpoint}"},
    {"type": "global_cap", "name": "all", "max": 10}
  ],
  "round_robin_by": "{account}",
  "max_attempts": 3
}');
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT policy, gate, partition, in_flight FROM dispatch_policy.inflight_counters WHERE in_flight > 0 ORDER BY 1, 2, 3;
SELECT policy, gate, partition, dispatch_policy._tokens_text(tokens) AS tokens, burst
FROM dispatch_policy.throttle_buckets ORDER BY 1, 2, 3;
SELECT count(*) AS minutes_kept FROM dispatch_policy.observation_minutes;
SELECT pg_temp.tick('mixed', 2) AS admitted;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT id, policy, partitions ->> 'per_account' AS per_account, partitions ->> 'all' AS "all"
FROM dispatch_policy.admitted_jobs ORDER BY id;
SELECT policy, gate, partition, in_flight FROM dispatch_policy.inflight_counters WHERE in_flight > 0 ORDER BY 1, 2, 3;
SELECT policy, gate, partition, dispatch_policy._tokens_text(tokens) AS tokens, burst
FROM dispatch_policy.throttle_buckets ORDER BY 1, 2, 3;

-- Corruptions, one at a time: check() reports exactly that, repair() says
-- what it changed, check() is empty again.

-- A counter off by one.
UPDATE dispatch_policy.inflight_counters SET in_flight = in_flight + 1
WHERE policy = 'mixed' AND gate = 'per_account' AND partition = 'a-e1';
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;

-- A counter row missing where jobs hold slots.
DELETE FROM dispatch_policy.inflight_counters WHERE policy = 'mixed' AND gate = 'all';
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT policy, gate, partition, in_flight FROM dispatch_policy.inflight_counters WHERE gate = 'all';

-- Counters of gates that hold no slots under the current config (the
-- adaptive gate was removed; a throttle holds none), and one of a policy
-- that does not exist.
INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight)
VALUES ('mixed', 'adaptive', 'a', 2), ('plain', 'throttle', 'default', 1), ('gone', 'concurrency', 'default', 1);
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;

-- An admitted job that records another partition than the config gives:
-- the recorded one is what completion releases.
UPDATE dispatch_policy.admitted_jobs SET partitions = partitions || '{"per_account": "x-y"}' WHERE id = 2;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT partitions ->> 'per_account' AS per_account FROM dispatch_policy.admitted_jobs WHERE id = 2;

-- Bucket tokens over the burst. The CHECK constraint keeps tokens at most
-- the bucket's stored burst, so the burst is raised with them.
UPDATE dispatch_policy.throttle_buckets SET tokens = 6 WHERE policy = 'mixed' AND partition = 'e1';
UPDATE dispatch_policy.throttle_buckets SET burst = 50, tokens = 40 WHERE policy = 'mixed' AND partition = 'e1';
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT policy, gate, partition, dispatch_policy._tokens_text(tokens) AS tokens, burst
FROM dispatch_policy.throttle_buckets WHERE partition = 'e1';

-- Tokens below 0 (the column allows down to -1000000).
UPDATE dispatch_policy.throttle_buckets SET tokens = -3 WHERE policy = 'plain';
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;

-- NaN or infinite tokens: the column refuses them (23514). With the
-- constraint dropped, check() and repair() still handle them.
UPDATE dispatch_policy.throttle_buckets SET tokens = 'NaN' WHERE policy = 'plain';
UPDATE dispatch_policy.throttle_buckets SET tokens = '-Infinity' WHERE policy = 'plain';
BEGIN;
ALTER TABLE dispatch_policy.throttle_buckets DROP CONSTRAINT throttle_buckets_tokens_check;
UPDATE dispatch_policy.throttle_buckets SET tokens = 'NaN' WHERE policy = 'plain';
UPDATE dispatch_policy.throttle_buckets SET tokens = 'Infinity' WHERE policy = 'mixed' AND partition = 'e2';
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
ROLLBACK;

-- A throttle bucket of a gate that is not a throttle, and one of a policy
-- that does not exist.
INSERT INTO dispatch_policy.throttle_buckets (policy, gate, partition, tokens, rate, per_seconds, burst, refilled_at)
VALUES ('mixed', 'per_account', 'a-e1', 1, 1, 1, 1, now()), ('gone', 'throttle', 'default', 1, 1, 1, 1, now());
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;

-- Dedupe keys: one left by a completed job, one held by no job, one held by
-- a job with another key, and a waiting job whose key nobody holds (it
-- would let the same key be staged again).
INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
VALUES ('mixed', 'k1', 1), ('mixed', 'ghost', 999), ('mixed', 'other', 4);
DELETE FROM dispatch_policy.dedupe_keys WHERE policy = 'plain' AND dedupe_key = 'p';
SELECT outcome = 'kept' AS k1_refused FROM dispatch_policy.stage_outcome('mixed', '{}', dedupe_key => 'k1');
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.dedupe_keys ORDER BY 1, 2;
SELECT outcome = 'kept' AS p_refused FROM dispatch_policy.stage_outcome('plain', '{}', dedupe_key => 'p');

-- A job in two tables: an admitted job copied back into staged_jobs (the
-- admitted copy is kept), a completed job copied into staged_jobs and
-- admitted_jobs with its dedupe key (the finished copy is kept, the key
-- freed), and one copied into admitted_jobs only (it holds no slot).
INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, attempt)
SELECT a.id, a.policy, a.queue, a.priority, a.args, a.context, a.dedupe_key, a.round_robin_key, a.attempt
FROM dispatch_policy.admitted_jobs a WHERE a.id = 2;
INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, priority, args, context, dedupe_key, attempt)
SELECT f.id, f.policy, f.queue, f.priority, f.args, f.context, f.dedupe_key, f.attempts
FROM dispatch_policy.finished_jobs f WHERE f.id = 1;
INSERT INTO dispatch_policy.admitted_jobs
  (id, policy, queue, priority, args, context, dedupe_key, attempt, created_at, staged_at, admitted_at,
   lease_expires_at, partitions, lease_seconds, target)
SELECT f.id, f.policy, f.queue, f.priority, f.args, f.context, f.dedupe_key, f.attempts, f.created_at, f.created_at, now(),
       now() + interval '1 hour', '{}', 900, 'ready_queue'
FROM dispatch_policy.finished_jobs f WHERE f.id = 1;
INSERT INTO dispatch_policy.admitted_jobs
  (id, policy, queue, priority, args, context, dedupe_key, attempt, created_at, staged_at, admitted_at,
   lease_expires_at, partitions, lease_seconds, target)
SELECT f.id, f.policy, f.queue, f.priority, f.args, f.context, f.dedupe_key, f.attempts, f.created_at, f.created_at, now(),
       now() + interval '1 hour', '{}', 900, 'ready_queue'
FROM dispatch_policy.finished_jobs f WHERE f.id = 7;
INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id) VALUES ('mixed', 'k1', 1);
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
-- Every job is still there, in one table.
SELECT j.id, array_agg(j.tbl ORDER BY j.tbl) AS tables
FROM (SELECT id, 'staged' AS tbl FROM dispatch_policy.staged_jobs
      UNION ALL SELECT id, 'admitted' FROM dispatch_policy.admitted_jobs
      UNION ALL SELECT id, 'finished' FROM dispatch_policy.finished_jobs) j
GROUP BY j.id ORDER BY j.id;

-- Orphaned observations and per-policy state: observations of the removed
-- adaptive gate, and rows of a policy that does not exist.
INSERT INTO dispatch_policy.observations (policy, gate, partition, job_id, lag_ms, success)
VALUES ('mixed', 'adaptive', 'a', 2, 5, true), ('mixed', 'adaptive', 'a', 4, 7, true), ('gone', 'g', 'x', 1, 1, false);
INSERT INTO dispatch_policy.observation_minutes (policy, gate, partition, minute)
VALUES ('gone', 'g', 'x', '2026-01-01 00:00:00+00'), ('gone', 'g', 'x', '2026-01-01 00:01:00+00');
INSERT INTO dispatch_policy.adaptive_stats (policy, gate, partition, current_max)
VALUES ('gone', 'g', 'x', 3), ('mixed', 'adaptive', 'a', 2);
INSERT INTO dispatch_policy.round_robin_cursors (policy, last_key) VALUES ('gone', 'a');
INSERT INTO dispatch_policy.runner_failures (policy, error, first_failed_at, last_failed_at) VALUES ('gone', 'boom', now(), now());
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT count(*) AS minutes_kept FROM dispatch_policy.observation_minutes;

-- Everything at once, repaired in one call.
UPDATE dispatch_policy.inflight_counters SET in_flight = 7 WHERE policy = 'plain';
DELETE FROM dispatch_policy.inflight_counters WHERE policy = 'mixed' AND partition = 'b-e2';
INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight) VALUES ('mixed', 'fair_interleave', 'e1', 3);
UPDATE dispatch_policy.admitted_jobs SET partitions = '{}' WHERE id = 4;
UPDATE dispatch_policy.throttle_buckets SET tokens = -1 WHERE policy = 'plain';
INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id) VALUES ('plain', 'done', 7);
INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context)
SELECT f.id, f.policy, f.queue, f.args, f.context FROM dispatch_policy.finished_jobs f WHERE f.id = 7;
INSERT INTO dispatch_policy.observations (policy, gate, partition, job_id, lag_ms, success)
VALUES ('plain', 'concurrency', 'default', 7, 1, true);
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;

-- After repair, completion releases exactly what the counters hold.
SELECT dispatch_policy.complete(a.id) FROM dispatch_policy.admitted_jobs a ORDER BY a.id;
SELECT policy, gate, partition, in_flight FROM dispatch_policy.inflight_counters WHERE in_flight > 0 ORDER BY 1, 2, 3;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;

-- Backlog counters (0023): what a policy's max_pending_per_partition is
-- checked against, per lane key. One that drifted lets a partition past
-- its cap (it counts too few) or refuses jobs under it (too many). Here a
-- counted too few, b too many, c's row is gone and the keyless one is
-- right; a then takes a job past its cap of 2.
SELECT dispatch_policy.declare_policy('capped', '{"round_robin_by": "{account}", "max_pending_per_partition": 2}');
SELECT cardinality(dispatch_policy.stage_many('capped', '[
  {"args": 1, "context": {"account": "a"}}, {"args": 2, "context": {"account": "a"}},
  {"args": 3, "context": {"account": "b"}}, {"args": 4, "context": {"account": "c"}}, {"args": 5}]')) AS staged;
SELECT lane, staged FROM dispatch_policy.backlog_counters WHERE policy = 'capped' ORDER BY 1 NULLS LAST;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
UPDATE dispatch_policy.backlog_counters SET staged = 0 WHERE policy = 'capped' AND lane = 'a';
UPDATE dispatch_policy.backlog_counters SET staged = 2 WHERE policy = 'capped' AND lane = 'b';
DELETE FROM dispatch_policy.backlog_counters WHERE policy = 'capped' AND lane = 'c';
SELECT outcome FROM dispatch_policy.stage_outcome('capped', '6', '{"account": "a"}');
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.repair() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;
SELECT lane, staged FROM dispatch_policy.backlog_counters WHERE policy = 'capped' ORDER BY 1 NULLS LAST;
-- The caps hold again: a is over its cap (3 of 2), b has room for one more.
SELECT outcome FROM dispatch_policy.stage_outcome('capped', '7', '{"account": "a"}');
SELECT outcome FROM dispatch_policy.stage_outcome('capped', '8', '{"account": "b"}');
SELECT outcome FROM dispatch_policy.stage_outcome('capped', '9', '{"account": "b"}');
SELECT * FROM dispatch_policy.check() ORDER BY 1, 2, 3, 4, 5, 6;

-- now must be a finite time.
SELECT * FROM dispatch_policy.check('infinity');
SELECT * FROM dispatch_policy.repair(NULL);
