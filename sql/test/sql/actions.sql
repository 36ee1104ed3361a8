-- pg_regress tests of the operator actions (issue 10): cancel, retry, drain,
-- pause_partition, resume_partition, paused_partitions_now, explain of a
-- paused partition. Every refusal shows its error text, then its SQLSTATE
-- (\echo :SQLSTATE, as in api.sql), then that nothing changed. That an
-- action waits for a tick under way is the isolation test actions_lock.
\set SHOW_CONTEXT never
\set VERBOSITY default
-- A database of its own state (the other tests may have run before).
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
CREATE EXTENSION dispatch_policy;
RESET client_min_messages;

-- Where every job is, the dedupe keys, the lanes, the pauses; and whether
-- check() finds anything (a key held by a finished job, a job in two tables).
CREATE TEMP VIEW jobs AS
  SELECT 'staged' AS state, s.id, s.attempt, NULL::text AS status, s.dedupe_key, s.round_robin_key AS lane,
         s.not_before IS NOT NULL AS scheduled, s.last_error
  FROM dispatch_policy.staged_jobs s
  UNION ALL
  SELECT 'admitted', a.id, a.attempt, NULL, a.dedupe_key, a.round_robin_key, NULL, NULL FROM dispatch_policy.admitted_jobs a
  UNION ALL
  SELECT 'finished', f.id, f.attempts, f.status, f.dedupe_key, NULL, NULL, f.last_error FROM dispatch_policy.finished_jobs f;
CREATE TEMP VIEW keys AS
  SELECT d.policy, d.dedupe_key, d.job_id FROM dispatch_policy.dedupe_keys d;
CREATE TEMP VIEW lanes AS
  SELECT l.policy, l.lane,
         CASE WHEN l.blocked_until IS NULL THEN 'ready' WHEN l.blocked_until = 'infinity' THEN 'infinity'
              ELSE 'until' END AS blocked, l.blocked_gate, l.blocked_partition
  FROM dispatch_policy.lanes l;
CREATE TEMP VIEW pauses AS
  SELECT p.policy, p.gate, p.partition, p.until IS NOT NULL AS has_until, p.reason FROM dispatch_policy.paused_partitions p;
CREATE TEMP VIEW findings AS
  SELECT count(*) AS check_findings FROM dispatch_policy."check"();
-- A snapshot of all of it, to show that a refusal changed nothing.
CREATE TEMP VIEW everything AS
  SELECT md5(string_agg(x, '|' ORDER BY x)) AS digest FROM (
    SELECT j::text AS x FROM jobs j UNION ALL SELECT k::text FROM keys k
    UNION ALL SELECT l::text FROM lanes l UNION ALL SELECT p::text FROM pauses p) t;

-- Lanes are the endpoints (round_robin_by is per_ep's partition_by); the
-- throttle's partitions are accounts, across lanes. One attempt: a failure
-- is dead.
SELECT dispatch_policy.declare_policy('acts', '{
  "gates": [
    {"type": "concurrency", "name": "per_ep", "max": 1, "partition_by": "{endpoint}"},
    {"type": "throttle", "name": "per_acct", "rate": 1000, "per": 1, "partition_by": "acct:{account}"},
    {"type": "global_cap", "max": 100},
    {"type": "fair_interleave"},
    {"type": "concurrency", "name": "flat", "max": 50}
  ],
  "round_robin_by": "{endpoint}",
  "max_attempts": 1
}');
SELECT dispatch_policy.stage_many('acts', '[
  {"args": 1, "context": {"endpoint": "e1", "account": "a"}, "dedupe_key": "k1"},
  {"args": 2, "context": {"endpoint": "e1", "account": "a"}, "dedupe_key": "k2"},
  {"args": 3, "context": {"endpoint": "e2", "account": "b"}, "dedupe_key": "k3"},
  {"args": 4, "context": {"endpoint": "e2", "account": "b"}, "dedupe_key": "k4", "not_before": "2999-01-01T00:00:00Z"},
  {"args": 5, "context": {"endpoint": "e3", "account": "a"}}
]');
SELECT * FROM jobs ORDER BY id;
SELECT * FROM keys ORDER BY 1, 2;
SELECT * FROM lanes ORDER BY 1, 2;

-- cancel: a pending job is finished as cancelled, its key freed.
SELECT dispatch_policy.cancel(1, 'customer asked');
SELECT * FROM jobs ORDER BY id;
SELECT * FROM keys ORDER BY 1, 2;
SELECT * FROM lanes ORDER BY 1, 2;
SELECT * FROM findings;
-- Twice: false, nothing changed.
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.cancel(1, 'again');
SELECT digest = :'before' AS unchanged FROM everything;
-- The key is free: the same key stages a new job.
SELECT dispatch_policy.stage('acts', '{"args": 6}', '{"endpoint": "e1", "account": "a"}', dedupe_key => 'k1');
-- The last job of a lane: the lane goes with it.
SELECT dispatch_policy.cancel(5);
-- A scheduled job; NULL reason.
SELECT dispatch_policy.cancel(4);
SELECT * FROM jobs ORDER BY id;
SELECT * FROM keys ORDER BY 1, 2;
SELECT * FROM lanes ORDER BY 1, 2;
SELECT * FROM findings;
SELECT explain.verdict, explain.explanation ~ '^cancelled at .* after 0 attempt\(s\): customer asked$' AS says_why
FROM dispatch_policy.explain(1);

-- cancel: refusals.
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.cancel(NULL);
\echo :SQLSTATE
SELECT dispatch_policy.cancel(999999);
\echo :SQLSTATE
-- An admitted job: its worker ends it.
BEGIN;
SELECT dispatch_policy.try_lock_policy('acts');
SELECT dispatch_policy.admit('acts', '[{"id": 2, "partitions": {"per_ep": "e1", "per_acct": "acct:a", "global_cap": "default",
                                                               "fair_interleave": "e1", "flat": "default"}}]');
COMMIT;
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.cancel(2, 'too late');
\echo :SQLSTATE
SELECT digest = :'before' AS unchanged FROM everything;

-- retry: job 2 fails its only attempt and is dead; its key is free.
SELECT dispatch_policy.fail(2, 'boom');
SELECT * FROM jobs WHERE id = 2;
-- Another job takes key k2 meanwhile: the retry would duplicate it.
SELECT dispatch_policy.stage('acts', '{"args": 7}', '{"endpoint": "e2", "account": "b"}', dedupe_key => 'k2');
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.retry(2);
\echo :SQLSTATE
SELECT digest = :'before' AS unchanged FROM everything;
-- Cancel the holder: the key is free, the retry takes it.
SELECT dispatch_policy.cancel(7, 'duplicate of 2');
SELECT dispatch_policy.retry(2);
SELECT * FROM jobs ORDER BY id;
SELECT * FROM keys ORDER BY 1, 2;
SELECT * FROM lanes ORDER BY 1, 2;
SELECT * FROM findings;
-- Its history continues: failures of the first cycle stay.
SELECT job_id, attempt, error FROM dispatch_policy.job_failures ORDER BY id;
-- While it waits, its key dedupes as any staged job's does.
SELECT outcome = 'kept' AS deduped FROM dispatch_policy.stage_outcome('acts', '{}', '{"endpoint": "e1"}', dedupe_key => 'k2');

-- retry: refusals, nothing changed.
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.retry(2);
\echo :SQLSTATE
SELECT dispatch_policy.retry(1);
\echo :SQLSTATE
SELECT dispatch_policy.retry(NULL);
\echo :SQLSTATE
SELECT dispatch_policy.retry(999999);
\echo :SQLSTATE
-- An admitted job, then a completed one.
BEGIN;
SELECT dispatch_policy.try_lock_policy('acts');
SELECT dispatch_policy.admit('acts', '[{"id": 3, "partitions": {"per_ep": "e2", "per_acct": "acct:b", "global_cap": "default",
                                                               "fair_interleave": "e2", "flat": "default"}}]');
COMMIT;
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.retry(3);
\echo :SQLSTATE
SELECT dispatch_policy.complete(3);
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.retry(3);
\echo :SQLSTATE
SELECT digest = :'before' AS unchanged FROM everything;
SELECT * FROM findings;

-- pause_partition: refusals, nothing changed.
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.pause_partition('nope', 'per_ep', 'e1');
\echo :SQLSTATE
SELECT dispatch_policy.pause_partition('acts', 'per_endpoint', 'e1');
\echo :SQLSTATE
SELECT dispatch_policy.pause_partition('acts', 'global_cap', 'default');
\echo :SQLSTATE
SELECT dispatch_policy.pause_partition('acts', 'fair_interleave', 'e1');
\echo :SQLSTATE
SELECT dispatch_policy.pause_partition('acts', 'flat', 'default');
\echo :SQLSTATE
SELECT dispatch_policy.pause_partition('acts', NULL, 'e1');
\echo :SQLSTATE
SELECT dispatch_policy.pause_partition('acts', 'per_ep', NULL);
\echo :SQLSTATE
SELECT dispatch_policy.pause_partition('acts', 'per_ep', repeat('x', 257));
\echo :SQLSTATE
SELECT dispatch_policy.pause_partition('acts', 'per_ep', 'e1', now() - interval '1 second');
\echo :SQLSTATE
SELECT dispatch_policy.pause_partition('acts', 'per_ep', 'e1', 'infinity');
\echo :SQLSTATE
SELECT digest = :'before' AS unchanged FROM everything;

-- pause_partition: the lane of a partition of per_ep is that partition, so
-- it is blocked (until resumed); a lane is made blocked for a partition
-- without jobs yet (e9, for an hour).
SELECT dispatch_policy.pause_partition('acts', 'per_ep', 'e1', reason => 'vendor outage');
SELECT dispatch_policy.pause_partition('acts', 'per_ep', 'e9', now() + interval '1 hour');
SELECT * FROM pauses ORDER BY 1, 2, 3;
SELECT * FROM lanes ORDER BY 1, 2;
-- A job staged into a paused partition finds its lane blocked.
SELECT dispatch_policy.stage('acts', '{"args": 8}', '{"endpoint": "e9", "account": "c"}');
SELECT * FROM lanes ORDER BY 1, 2;
-- The throttle's partitions are accounts, across lanes: no lane is blocked
-- for acct:b; the tick reads it from paused_partitions_now.
SELECT dispatch_policy.pause_partition('acts', 'per_acct', 'acct:b', now() + interval '1 hour', 'quota');
SELECT * FROM lanes ORDER BY 1, 2;
SELECT gate, partition, until IS NOT NULL AS has_until FROM dispatch_policy.paused_partitions_now('acts') ORDER BY 1, 2;
SELECT gate, partition FROM dispatch_policy.paused_partitions_now('acts', now() + interval '2 hours') ORDER BY 1, 2;
SELECT * FROM dispatch_policy.paused_partitions_now('nope');
\echo :SQLSTATE
-- A paused lane stays blocked while the pause lasts: not by a direct
-- unblock, not by a config change (which readies every other lane, here e2
-- blocked for a minute).
SELECT dispatch_policy.stage('acts', '{"args": 12}', '{"endpoint": "e2", "account": "b"}') AS b_job \gset
WITH u AS (UPDATE dispatch_policy.lanes SET blocked_until = NULL, blocked_gate = NULL, blocked_partition = NULL
           WHERE policy = 'acts' AND lane = 'e1' RETURNING 1)
SELECT count(*) AS unblocked FROM u;
UPDATE dispatch_policy.lanes SET blocked_until = now() + interval '1 minute' WHERE policy = 'acts' AND lane = 'e2';
SELECT * FROM lanes ORDER BY 1, 2;
SELECT dispatch_policy.declare_policy('acts', (SELECT config || '{"batch_size": 400}' FROM dispatch_policy.policies WHERE name = 'acts'));
SELECT * FROM lanes ORDER BY 1, 2;
-- Pausing again replaces until and reason.
SELECT dispatch_policy.pause_partition('acts', 'per_ep', 'e9', reason => 'until further notice');
SELECT * FROM pauses ORDER BY 1, 2, 3;
SELECT * FROM lanes WHERE lane = 'e9';

-- explain: the paused partition is the gate that refuses the job, with the
-- pause's end; the lane says it is blocked by the pause.
SELECT aspect, gate, partition, verdict,
       regexp_replace(explanation, 'pause_partition at [^)]*', 'pause_partition at T') AS explanation
FROM dispatch_policy.explain(6) WHERE aspect IN ('lane', 'gate', 'estimate');
-- With an end: a wait of about an hour.
SELECT aspect, gate, verdict, wait_seconds BETWEEN 3000 AND 3600 AS about_an_hour
FROM dispatch_policy.explain(:b_job) WHERE verdict IN ('waits', 'estimated', 'unknown') ORDER BY aspect;

-- drain: refusals, nothing changed.
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.drain('nope');
\echo :SQLSTATE
SELECT dispatch_policy.drain('acts', max_jobs => 0);
\echo :SQLSTATE
SELECT dispatch_policy.drain('acts', max_jobs => 100001);
\echo :SQLSTATE
SELECT dispatch_policy.drain('acts', max_jobs => NULL);
\echo :SQLSTATE
SELECT dispatch_policy.drain('acts', 'per_ep');
\echo :SQLSTATE
SELECT dispatch_policy.drain('acts', partition => 'e1');
\echo :SQLSTATE
SELECT dispatch_policy.drain('acts', 'nope', 'e1');
\echo :SQLSTATE
SELECT dispatch_policy.drain('acts', 'global_cap', 'default');
\echo :SQLSTATE
SELECT digest = :'before' AS unchanged FROM everything;

-- drain: one partition (its jobs found by rendering their context, as
-- partition_overview does), then the rest of the policy, max_jobs at a time.
SELECT dispatch_policy.stage_many('acts', '[
  {"args": 9, "context": {"endpoint": "e1", "account": "a"}, "dedupe_key": "k9"},
  {"args": 10, "context": {"endpoint": "e2", "account": "a"}},
  {"args": 11, "context": {"endpoint": "e2", "account": "b"}, "round_robin_key": "mine"}
]');
SELECT * FROM jobs WHERE state = 'staged' ORDER BY id;
SELECT dispatch_policy.drain('acts', 'per_acct', 'acct:a', reason => 'account closed');
SELECT * FROM jobs ORDER BY id;
SELECT * FROM keys ORDER BY 1, 2;
SELECT * FROM lanes ORDER BY 1, 2;
SELECT * FROM findings;
SELECT dispatch_policy.drain('acts', max_jobs => 1);
SELECT dispatch_policy.drain('acts');
SELECT dispatch_policy.drain('acts');
SELECT state, status, count(*), string_agg(DISTINCT last_error, ', ') AS reasons FROM jobs GROUP BY 1, 2 ORDER BY 1, 2;
SELECT * FROM keys ORDER BY 1, 2;
-- A lane blocked by a pause is kept although empty; other empty lanes went.
SELECT * FROM lanes ORDER BY 1, 2;
SELECT * FROM findings;

-- resume_partition: the lane is ready again (the next fetch drops it if
-- empty); resuming what is not paused changes nothing.
SELECT dispatch_policy.resume_partition('acts', 'per_ep', 'e1');
SELECT dispatch_policy.resume_partition('acts', 'per_ep', 'e1');
SELECT * FROM pauses ORDER BY 1, 2, 3;
SELECT * FROM lanes ORDER BY 1, 2;
SELECT digest AS before FROM everything \gset
SELECT dispatch_policy.resume_partition('acts', 'nope', 'e1');
\echo :SQLSTATE
SELECT dispatch_policy.resume_partition('nope', 'per_ep', 'e1');
\echo :SQLSTATE
SELECT digest = :'before' AS unchanged FROM everything;

-- Maintenance: pauses that ended, or of gates no longer declared, go.
SELECT dispatch_policy._expire_partition_pauses(now() + interval '2 hours');
SELECT * FROM pauses ORDER BY 1, 2, 3;
-- Declaring the policy without the paused gate ends the pause at once (a
-- trigger, 0018); the maintenance finds nothing left to expire.
SELECT dispatch_policy.declare_policy('acts', '{"gates": [{"type": "global_cap", "max": 5}]}');
SELECT dispatch_policy._expire_partition_pauses();
SELECT * FROM pauses ORDER BY 1, 2, 3;

-- finished_jobs takes 'cancelled' as a status, and nothing else new.
SELECT status, count(*) FROM dispatch_policy.finished_jobs GROUP BY 1 ORDER BY 1;
INSERT INTO dispatch_policy.finished_jobs (id, policy, queue, priority, args, context, attempts, status, created_at, finished_at)
VALUES (424242, 'acts', 'default', 0, '{}', '{}', 1, 'lost', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z');
\echo :SQLSTATE
