-- pg_regress tests of the history (issue 10): counters kept by triggers for
-- every writer, folding, per-minute samples, lag percentiles, prune.
-- Events are timed by the now passed in (2100-01-01 here); the test prints
-- minute offsets and counts, never timestamps.
\set SHOW_CONTEXT never
\set VERBOSITY default
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
CREATE EXTENSION dispatch_policy;
RESET client_min_messages;

-- What policy_overview must show, counted from the job tables (the old
-- definition's counts).
CREATE TEMP VIEW truth AS
SELECT p.name AS policy,
  (SELECT count(*) FROM dispatch_policy.staged_jobs s
    WHERE s.policy = p.name AND (s.not_before IS NULL OR s.not_before <= now())) AS pending,
  (SELECT count(*) FROM dispatch_policy.staged_jobs s WHERE s.policy = p.name AND s.not_before > now()) AS scheduled,
  (SELECT count(*) FROM dispatch_policy.admitted_jobs a WHERE a.policy = p.name) AS in_flight,
  (SELECT count(*) FROM dispatch_policy.finished_jobs f WHERE f.policy = p.name AND f.status = 'dead') AS dead,
  now() - (SELECT min(s.staged_at) FROM dispatch_policy.staged_jobs s
    WHERE s.policy = p.name AND (s.not_before IS NULL OR s.not_before <= now())) AS oldest_pending_age
FROM dispatch_policy.policies p;
-- One line per policy: the overview's counts, and whether they equal the truth.
CREATE TEMP VIEW compare AS
SELECT o.policy, o.pending, o.scheduled, o.in_flight, o.dead,
       (o.pending, o.scheduled, o.in_flight, o.dead) = (t.pending, t.scheduled, t.in_flight, t.dead) AS exact,
       o.oldest_pending_age IS NOT DISTINCT FROM t.oldest_pending_age AS same_age
FROM dispatch_policy.policy_overview o JOIN truth t USING (policy)
ORDER BY 1;
-- Sums of everything recorded for a policy, folded or not.
CREATE TEMP VIEW recorded AS
SELECT policy, gate, partition, sum(staged) AS staged, sum(admitted) AS admitted, sum(refused) AS refused,
       sum(finished) AS finished, sum(completed) AS completed, sum(failed) AS failed, sum(dead) AS dead,
       sum(lag_count) AS lag_count, sum(lag_ms_sum) AS lag_ms_sum
FROM (SELECT policy, gate, partition, staged, admitted, refused, finished, completed, failed, dead, lag_count, lag_ms_sum
      FROM dispatch_policy.stat_minutes
      UNION ALL
      SELECT policy, gate, partition, staged, admitted, refused, finished, completed, failed, dead, lag_count, lag_ms_sum
      FROM dispatch_policy.stat_deltas WHERE minute IS NOT NULL) x
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3;

SELECT dispatch_policy.declare_policy('h', '{"gates": [{"type": "concurrency", "max": 100, "partition_by": "{a}"}], "max_attempts": 2}');
SELECT dispatch_policy.declare_policy('quiet', '{}');

-- Staging: stage_many (one statement: one delta row for the policy, and since
-- 0020 one per gate partition: x, y and the empty key) and stage; a future
-- not_before is scheduled, a past one pending.
SELECT cardinality(dispatch_policy.stage_many('h', '[
  {"args": 1, "context": {"a": "x"}}, {"args": 2, "context": {"a": "x"}}, {"args": 3, "context": {"a": "y"}},
  {"args": 4, "context": {"a": "y"}, "priority": -1}, {"args": 5, "not_before": "2999-01-01T00:00:00Z"}]')) AS staged;
SELECT count(*) AS delta_rows FROM dispatch_policy.stat_deltas;
SELECT dispatch_policy.stage('h', '6', '{"a": "z"}') IS NOT NULL AS staged;
SELECT dispatch_policy.stage('h', '7', '{"a": "z"}', not_before => now() - interval '1 hour') IS NOT NULL AS staged_past;
SELECT * FROM compare;

-- A scheduled job whose time has come is pending before a tick promotes it.
UPDATE dispatch_policy.staged_jobs SET not_before = now() - interval '1 second' WHERE args = '5';
SELECT * FROM compare;
SELECT dispatch_policy.promote_scheduled('h', 10) AS promoted;
SELECT * FROM compare;
UPDATE dispatch_policy.staged_jobs SET not_before = '2999-01-01' WHERE args = '5';

-- Admission at 00:00:00, claims 250 ms and 3 s later.
SELECT dispatch_policy.admit('h', (
  SELECT jsonb_agg(jsonb_build_object('id', s.id, 'partitions', jsonb_build_object('concurrency', s.context ->> 'a')) ORDER BY s.id)
  FROM dispatch_policy.staged_jobs s WHERE s.args IN ('1', '2', '3', '4')), now => '2100-01-01 00:00:00+00') AS admitted;
SELECT * FROM compare;
SELECT count(*) AS claimed FROM dispatch_policy.claim('default', 'w1', 1, now => '2100-01-01 00:00:00.25+00');
SELECT count(*) AS claimed FROM dispatch_policy.claim('default', 'w2', 2, now => '2100-01-01 00:00:03+00');
-- A heartbeat or a second start records no further lag.
SELECT dispatch_policy.heartbeat(id, now => '2100-01-01 00:00:04+00') IS NOT NULL AS beat
FROM dispatch_policy.admitted_jobs WHERE worker = 'w1';
SELECT * FROM recorded;

-- Complete one at 00:01, fail one twice (retry, then dead: max_attempts 2).
SELECT dispatch_policy.complete(id, now => '2100-01-01 00:01:00+00') FROM dispatch_policy.admitted_jobs WHERE worker = 'w1';
SELECT dispatch_policy.fail(min(id), 'boom', now => '2100-01-01 00:01:10+00') FROM dispatch_policy.admitted_jobs WHERE worker = 'w2';
SELECT * FROM compare;
SELECT dispatch_policy.admit('h', (
  SELECT jsonb_agg(jsonb_build_object('id', s.id, 'partitions', jsonb_build_object('concurrency', s.context ->> 'a')))
  FROM dispatch_policy.staged_jobs s WHERE s.attempt = 2), now => '2100-01-01 00:02:00+00') AS readmitted;
SELECT dispatch_policy.fail(id, 'boom again', now => '2100-01-01 00:02:30+00') FROM dispatch_policy.admitted_jobs WHERE attempt = 2;
SELECT * FROM compare;
-- The retry was not counted as staged again; two failures, one death.
SELECT * FROM recorded WHERE gate = '';

-- The reaper: an expired lease is a failed attempt.
SELECT dispatch_policy.reap_leases('h', now => '2100-01-01 01:00:00+00') AS reaped;
SELECT * FROM compare;

-- A DBA deleting and inserting rows by hand is counted too.
DELETE FROM dispatch_policy.staged_jobs WHERE args = '6';
DELETE FROM dispatch_policy.finished_jobs WHERE status = 'dead';
INSERT INTO dispatch_policy.admitted_jobs (id, policy, queue, priority, args, context, attempt, created_at, staged_at,
                                           admitted_at, lease_expires_at, lease_seconds, target)
VALUES (1001, 'quiet', 'default', 0, '{}', '{}', 1, now(), now(), '2100-01-01 00:00:00+00', '2100-01-01 00:01:00+00', 60, 'ready_queue');
SELECT * FROM compare;

-- Folding: everything moves, nothing changes, a second fold finds nothing.
SELECT dispatch_policy.fold_stats('2100-01-01 02:00:00+00') > 0 AS folded;
SELECT count(*) AS delta_rows FROM dispatch_policy.stat_deltas;
SELECT * FROM compare;
SELECT dispatch_policy.fold_stats('2100-01-01 02:00:00+00') AS folded_again;
SELECT * FROM compare;
SELECT * FROM recorded WHERE gate = '';
SELECT dispatch_policy.fold_stats(max_rows => 0);
\echo :SQLSTATE
SELECT dispatch_policy.fold_stats('infinity');
\echo :SQLSTATE

-- A fold in the same transaction as a writer, rolled back with it, loses nothing.
BEGIN;
SELECT dispatch_policy.stage('h', '8', '{"a": "x"}') IS NOT NULL AS staged;
SELECT dispatch_policy.fold_stats() AS folded;
ROLLBACK;
SELECT * FROM compare;

-- policy_minutes: one row per minute, gaps as zeros.
SELECT (extract(epoch FROM minute - '2100-01-01 00:00:00+00') / 60)::integer AS minute, admitted, refused, completed, failed, dead,
       round(avg_lag_ms::numeric, 1) AS avg_lag_ms, round(p95_lag_ms::numeric, 1) AS p95_lag_ms
FROM dispatch_policy.policy_minutes('h', '2099-12-31 23:58:30+00', '2100-01-01 00:03:00+00');
SELECT count(*) AS minutes FROM dispatch_policy.policy_minutes('h', '2100-01-01 00:00:00+00', '2100-01-01 23:59:59+00');
SELECT count(*) FROM dispatch_policy.policy_minutes('h', '2100-01-01 00:00:00+00', '2100-03-01 00:00:00+00');
\echo :SQLSTATE
SELECT count(*) FROM dispatch_policy.policy_minutes('h', NULL);

-- Per gate partition: admitted and the queue lag of each.
SELECT gate, partition, admitted, finished > 0 AS finished, lag_count, lag_ms_sum FROM recorded WHERE gate <> '';
SELECT (extract(epoch FROM minute - '2100-01-01 00:00:00+00') / 60)::integer AS minute, admitted, refused,
       round(avg_lag_ms::numeric, 1) AS avg_lag_ms
FROM dispatch_policy.partition_minutes('h', 'concurrency', 'y', '2100-01-01 00:00:00+00', '2100-01-01 00:02:00+00');

-- Refusals recorded by the tick, per partition and summed for the policy.
SELECT dispatch_policy._record_refusals('h', '2100-01-01 00:02:10+00', '{concurrency,concurrency}', '{x,y}', '{3,2}');
SELECT (extract(epoch FROM minute - '2100-01-01 00:00:00+00') / 60)::integer AS minute, refused
FROM dispatch_policy.partition_minutes('h', 'concurrency', 'x', '2100-01-01 00:02:00+00', '2100-01-01 00:02:00+00');
SELECT (extract(epoch FROM minute - '2100-01-01 00:00:00+00') / 60)::integer AS minute, refused
FROM dispatch_policy.policy_minutes('h', '2100-01-01 00:02:00+00', '2100-01-01 00:02:00+00');
SELECT dispatch_policy._record_refusals('h', now(), '{concurrency}', '{x}', '{-1}');
\echo :SQLSTATE
SELECT dispatch_policy._record_refusals('h', now(), '{concurrency}', '{x,y}', '{1}');
\echo :SQLSTATE

-- Lag buckets: sqrt(2) apart from 1 ms; bucket 1 is below 1 ms, 56 from 2^27 ms.
SELECT count(*) AS buckets, min(lower_ms) AS first_lower, max(lower_ms) = 2 ^ 27 AS last_is_2_27,
       count(*) FILTER (WHERE upper_ms IS NULL) AS open_ended
FROM dispatch_policy.lag_buckets();
SELECT ms, dispatch_policy._lag_bucket(ms) AS bucket
FROM unnest(ARRAY[-5, 0, 0.999, 1, 1.41, 1.42, 2, 3, 250, 3000, 134217727, 134217728, 1e12]::float8[]) AS ms;
-- Percentiles from a histogram: 100 samples of 250 ms (bucket 17, [181, 256)),
-- then one of 3 s: the median and p95 fall in the 250 ms bucket, p100 in 3 s's.
SELECT round(dispatch_policy._lag_percentile(h, 0.5)::numeric, 1) AS p50,
       round(dispatch_policy._lag_percentile(h, 0.95)::numeric, 1) AS p95,
       round(dispatch_policy._lag_percentile(h, 1)::numeric, 1) AS p100,
       dispatch_policy._lag_percentile(h, 0.5) BETWEEN 250 / sqrt(2) AND 250 * sqrt(2) AS p50_within_sqrt2
FROM (SELECT dispatch_policy._lag_hist(array_agg(dispatch_policy._lag_bucket(CASE WHEN i <= 100 THEN 250 ELSE 3000 END))) AS h
      FROM generate_series(1, 101) AS i) x;
SELECT dispatch_policy._lag_percentile(NULL, 0.5) AS empty,
       dispatch_policy._lag_percentile(array_fill(0, ARRAY[56]), 0.5) AS zeros,
       dispatch_policy._lag_hist_add('{1,2}', '{3,4}') AS added;

-- The overview's lag and throughput columns read the same minutes: claims
-- and completions now, folded or not.
SELECT dispatch_policy.admit('h', (
  SELECT jsonb_agg(jsonb_build_object('id', s.id, 'partitions', jsonb_build_object('concurrency', s.context ->> 'a')))
  FROM dispatch_policy.staged_jobs s WHERE s.not_before IS NULL), now => now() - interval '100 milliseconds') AS admitted_now;
SELECT count(*) AS claimed FROM dispatch_policy.claim('default', 'w3', 10);
SELECT admitted_24h >= 2 AS admitted, lag_p50_ms BETWEEN 100 / sqrt(2) AND 200 * sqrt(2) AS p50_near_100ms,
       lag_p95_ms >= lag_p50_ms AS p95_above_p50, throughput_per_min
FROM dispatch_policy.policy_overview WHERE policy = 'h';

-- prune folds first, then deletes minute rows older than the retention (a
-- gate partition's after a day), and keeps the counters.
SELECT dispatch_policy.stage('h', '9', '{"a": "x"}') IS NOT NULL AS staged;
SELECT count(*) > 0 AS deltas_before FROM dispatch_policy.stat_deltas;
SELECT what, removed > 0 AS removed FROM dispatch_policy.prune('7 days', '1 hour', '2100-01-03 00:00:00+00')
WHERE what IN ('stat_deltas', 'stat_minutes');
SELECT count(*) AS delta_rows FROM dispatch_policy.stat_deltas;
SELECT gate = '' AS policy_row, count(*) FROM dispatch_policy.stat_minutes
WHERE minute < '2100-01-02' GROUP BY 1 ORDER BY 1;
SELECT what, removed FROM dispatch_policy.prune('7 days', '1 hour', '2100-01-09 00:00:00+00')
WHERE what = 'stat_minutes';
SELECT count(*) AS minute_rows_of_2100 FROM dispatch_policy.stat_minutes WHERE minute >= '2100-01-01';
SELECT sum(completed) AS completed FROM dispatch_policy.policy_minutes('h', '2100-01-01 00:00:00+00', '2100-01-01 00:05:00+00');
SELECT * FROM compare;

-- TRUNCATE takes back what the table had counted.
TRUNCATE dispatch_policy.staged_jobs;
TRUNCATE dispatch_policy.admitted_jobs;
SELECT * FROM compare;

-- Every new object is documented.
SELECT c.relname, c.relkind FROM pg_class c
WHERE c.relnamespace = 'dispatch_policy'::regnamespace AND c.relkind IN ('r', 'v')
  AND obj_description(c.oid, 'pg_class') IS NULL;
SELECT c.relname, a.attname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relnamespace = 'dispatch_policy'::regnamespace AND c.relkind IN ('r', 'v')
  AND c.relname IN ('policy_counters', 'stat_minutes', 'stat_deltas', 'policy_overview')
  AND col_description(c.oid, a.attnum) IS NULL;
SELECT p.oid::regprocedure FROM pg_proc p
WHERE p.pronamespace = 'dispatch_policy'::regnamespace AND obj_description(p.oid, 'pg_proc') IS NULL;
