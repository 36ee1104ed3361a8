-- pg_regress tests of pending jobs per gate partition and the pending trend
-- (migration 0020): staged_jobs.partitions, partition_counters,
-- partition_pending(), partition_overview, pending_minutes(), and what keeps
-- them exact: every writer of staged_jobs (stage, stage_many, admission,
-- cancel, drain, fail and the reaper re-staging, retry, promote_scheduled,
-- a direct INSERT or UPDATE, TRUNCATE) and a redeclared policy whose
-- templates change. The counts are compared with a brute-force count that
-- renders every staged job's partitions as the runner does (_gate_partitions).
\set SHOW_CONTEXT never
\set VERBOSITY default
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
CREATE EXTENSION dispatch_policy;
RESET client_min_messages;

-- The truth: every staged job's partition of every partitioned gate of its
-- policy, rendered from its context as the runner renders it.
CREATE TEMP VIEW truth AS
SELECT s.policy, k.key AS gate, k.value AS partition, count(*) AS pending, max(s.staged_at) AS last_staged_at
FROM dispatch_policy.staged_jobs s
JOIN dispatch_policy.policies p ON p.name = s.policy
CROSS JOIN LATERAL jsonb_each_text(dispatch_policy._gate_partitions(p.config, s.context)) AS k
WHERE dispatch_policy._partitioned_gate(p.config, k.key) IS NOT NULL
GROUP BY 1, 2, 3;
-- What partition_pending says of every partition the truth, the counters or
-- the unfolded deltas know, gate by gate.
CREATE TEMP VIEW said AS
SELECT x.policy, x.gate, r.partition, r.pending, r.last_staged_at
FROM (SELECT k.policy, k.gate, array_agg(k.partition ORDER BY k.partition) AS parts
      FROM (SELECT policy, gate, partition FROM truth
            UNION SELECT policy, gate, partition FROM dispatch_policy.partition_counters
            UNION SELECT policy, gate, partition FROM dispatch_policy.stat_deltas WHERE gate <> '' AND d_pending <> 0) k
      JOIN dispatch_policy.policies p ON p.name = k.policy
      WHERE dispatch_policy._partitioned_gate(p.config, k.gate) IS NOT NULL
      GROUP BY 1, 2) x
CROSS JOIN LATERAL dispatch_policy.partition_pending(x.policy, x.gate, x.parts) r;
-- One line: partitions with jobs and their jobs; whether every count is
-- exact (partitions without jobs say 0); whether no count is left on a gate
-- that is not a partitioned gate of its policy; whether each partition's
-- last_staged_at is at least the latest staging of its jobs; whether every
-- staged job stores the partitions its config renders.
CREATE TEMP VIEW compare AS
SELECT (SELECT count(*) FROM truth) AS partitions, (SELECT coalesce(sum(pending), 0) FROM truth) AS jobs,
       (SELECT coalesce(bool_and(coalesce(s.pending, -1) = coalesce(t.pending, 0)), true)
        FROM said s FULL JOIN truth t USING (policy, gate, partition)) AS exact,
       (SELECT coalesce(sum(x.n), 0) = 0
        FROM (SELECT c.policy, c.gate, c.pending AS n FROM dispatch_policy.partition_counters c
              UNION ALL SELECT d.policy, d.gate, d.d_pending FROM dispatch_policy.stat_deltas d WHERE d.gate <> '') x
        LEFT JOIN dispatch_policy.policies p ON p.name = x.policy
        WHERE p.name IS NULL OR dispatch_policy._partitioned_gate(p.config, x.gate) IS NULL) AS no_stray,
       (SELECT coalesce(bool_and(s.last_staged_at >= t.last_staged_at), true)
        FROM truth t JOIN said s USING (policy, gate, partition)) AS last_ok,
       (SELECT coalesce(bool_and(s.partitions = (
                 SELECT coalesce(jsonb_object_agg(k.key, k.value), '{}'::jsonb)
                 FROM jsonb_each_text(dispatch_policy._gate_partitions(p.config, s.context)) AS k
                 WHERE dispatch_policy._partitioned_gate(p.config, k.key) IS NOT NULL)), true)
        FROM dispatch_policy.staged_jobs s JOIN dispatch_policy.policies p ON p.name = s.policy) AS stored_ok;
-- One policy's partitions, as the admin page reads them.
CREATE TEMP VIEW page AS
SELECT x.gate, r.partition, r.pending, r.last_staged_at IS NOT NULL AS staged_once
FROM (VALUES ('per_tenant'), ('per_acct'), ('adaptive')) AS x(gate)
CROSS JOIN LATERAL dispatch_policy.partition_pending('p', x.gate, ARRAY['t1', 't2', 'acct:a', 'acct:b', 'acct:', 't1:eu', 't2:', 'none']) r
WHERE r.pending > 0 OR r.partition = 'none'
ORDER BY 1, 2;

-- A throttle by tenant, a concurrency by account (two templates with one
-- placeholder each), an adaptive gate whose template has two (the general
-- rendering path), and gates that are not partitioned.
SELECT dispatch_policy.declare_policy('p', '{
  "gates": [
    {"type": "throttle", "name": "per_tenant", "rate": 100, "per": 1, "partition_by": "{tenant}"},
    {"type": "concurrency", "name": "per_acct", "max": 5, "partition_by": "acct:{account}"},
    {"type": "adaptive_concurrency", "name": "adaptive", "partition_by": "{tenant}:{region}", "target_lag_ms": 100},
    {"type": "global_cap", "max": 100},
    {"type": "fair_interleave"}
  ],
  "max_attempts": 2
}');
SELECT dispatch_policy.declare_policy('q', '{}');
SELECT name, partition_gates, partition_templates, partition_prefixes, partition_keys, partition_suffixes
FROM dispatch_policy.policies ORDER BY 1;

-- stage_many: missing keys render '', a JSON null too, a number as its
-- text, a nested object as its JSON; a scheduled job counts as well.
SELECT cardinality(dispatch_policy.stage_many('p', '[
  {"args": 1, "context": {"tenant": "t1", "account": "a", "region": "eu"}},
  {"args": 2, "context": {"tenant": "t1", "account": "a", "region": "eu"}},
  {"args": 3, "context": {"tenant": "t2", "account": "b"}},
  {"args": 4, "context": {"tenant": "t2", "account": null}},
  {"args": 5, "context": {"tenant": 7, "account": {"x": [1, "y"]}}},
  {"args": 6, "context": {"tenant": "t1", "account": "b"}, "not_before": "2999-01-01T00:00:00Z"}]')) AS staged;
SELECT dispatch_policy.stage_many('q', '[{"args": 1}, {"args": 2}]') IS NOT NULL AS staged;
SELECT * FROM compare;
SELECT * FROM page;
SELECT args, partitions FROM dispatch_policy.staged_jobs WHERE policy = 'p' ORDER BY id;
SELECT DISTINCT partitions FROM dispatch_policy.staged_jobs WHERE policy = 'q';
-- stage(), one job, and one scheduled; a key longer than 256 bytes is
-- stored fitted, as the runner fits it.
SELECT dispatch_policy.stage('p', '7', '{"tenant": "t2", "account": "a"}') IS NOT NULL AS staged;
SELECT dispatch_policy.stage('p', '8', '{"tenant": "t2"}', not_before => now() + interval '1 day') IS NOT NULL AS staged;
SELECT dispatch_policy.stage('p', '9', jsonb_build_object('tenant', repeat('x', 300), 'account', 'a')) IS NOT NULL AS staged;
SELECT octet_length(partitions ->> 'per_tenant') AS fitted_bytes, partitions ->> 'per_tenant' = dispatch_policy._fit_key(repeat('x', 300)) AS fitted
FROM dispatch_policy.staged_jobs WHERE policy = 'p' AND args = '9';
SELECT * FROM compare;
SELECT * FROM page;
-- The latest staging, exactly, where the latest job is still staged.
SELECT bool_and(s.last_staged_at = t.last_staged_at) AS last_exact FROM truth t JOIN said s USING (policy, gate, partition);

-- Folded, the same.
SELECT dispatch_policy.fold_stats() > 0 AS folded;
SELECT count(*) AS delta_rows FROM dispatch_policy.stat_deltas;
SELECT * FROM compare;
SELECT gate, partition, pending FROM dispatch_policy.partition_counters WHERE policy = 'p' AND gate = 'per_acct' ORDER BY 2;

-- promote_scheduled (an UPDATE of not_before) moves no job between
-- partitions, and writes no partition delta.
UPDATE dispatch_policy.staged_jobs SET not_before = now() - interval '1 second' WHERE policy = 'p' AND args = '8';
SELECT dispatch_policy.promote_scheduled('p', 10) AS promoted;
SELECT count(*) AS partition_deltas FROM dispatch_policy.stat_deltas WHERE gate <> '';
SELECT * FROM compare;

-- Admission: the rows leave staged_jobs with their partitions.
SELECT dispatch_policy.admit('p', (
  SELECT jsonb_agg(jsonb_build_object('id', s.id, 'partitions', dispatch_policy._gate_partitions(p.config, s.context)) ORDER BY s.id)
  FROM dispatch_policy.staged_jobs s JOIN dispatch_policy.policies p ON p.name = s.policy
  WHERE s.policy = 'p' AND s.args IN ('1', '3', '7'))) AS admitted;
SELECT * FROM compare;
SELECT * FROM page;
-- An admitted partition keeps when it was last staged into.
SELECT partition, pending, last_staged_at IS NOT NULL AS staged_once
FROM dispatch_policy.partition_pending('p', 'per_tenant', ARRAY['t1', 't2']);

-- A failed attempt is staged again (no partitions given: the row trigger
-- renders them), and so is an expired lease; a dead job by retry().
SELECT count(*) AS claimed FROM dispatch_policy.claim('default', 'w', 3);
SELECT dispatch_policy.fail(a.id, 'boom', interval '0 seconds') FROM dispatch_policy.admitted_jobs a WHERE a.policy = 'p' AND a.args = '1';
SELECT dispatch_policy.reap_leases('p', now() + interval '1 day') AS reaped;
SELECT s.args, s.attempt FROM dispatch_policy.staged_jobs s WHERE s.policy = 'p' AND s.args IN ('1', '3', '7') ORDER BY 1;
SELECT * FROM compare;
SELECT dispatch_policy.admit('p', (
  SELECT jsonb_agg(jsonb_build_object('id', s.id, 'partitions', dispatch_policy._gate_partitions(p.config, s.context)))
  FROM dispatch_policy.staged_jobs s JOIN dispatch_policy.policies p ON p.name = s.policy WHERE s.policy = 'p' AND s.args = '1')) AS admitted;
SELECT dispatch_policy.fail(a.id, 'boom again') FROM dispatch_policy.admitted_jobs a WHERE a.policy = 'p' AND a.args = '1';
SELECT status FROM dispatch_policy.finished_jobs WHERE policy = 'p' AND args = '1';
SELECT * FROM compare;
SELECT dispatch_policy.retry((SELECT id FROM dispatch_policy.finished_jobs WHERE policy = 'p' AND args = '1')) IS NOT NULL AS retried;
SELECT * FROM compare;

-- cancel and drain (of one partition, and of the whole policy 'q').
SELECT dispatch_policy.cancel((SELECT id FROM dispatch_policy.staged_jobs WHERE policy = 'p' AND args = '2'));
SELECT dispatch_policy.drain('p', 'per_acct', 'acct:b') AS drained;
SELECT dispatch_policy.drain('q') AS drained_q;
SELECT * FROM compare;
SELECT * FROM page;

-- Rows written without stage(): a direct INSERT gets its partitions from the
-- row trigger; a value it gives is kept as given (a restore); an UPDATE of
-- the context renders them again; a job moved to another policy too.
INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context)
SELECT nextval('dispatch_policy.job_ids'), 'p', 'default', to_jsonb(i), jsonb_build_object('tenant', 't' || i, 'account', 'a')
FROM generate_series(1, 3) AS i;
SELECT * FROM compare;
INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context, partitions)
VALUES (nextval('dispatch_policy.job_ids'), 'p', 'default', '"restored"', '{"tenant": "t1", "account": "a", "region": "eu"}',
        '{"per_tenant": "t1", "per_acct": "acct:a", "adaptive": "t1:eu"}');
SELECT * FROM compare;
UPDATE dispatch_policy.staged_jobs SET context = context || '{"account": "c"}' WHERE args = '"restored"';
SELECT partitions ->> 'per_acct' AS per_acct FROM dispatch_policy.staged_jobs WHERE args = '"restored"';
SELECT * FROM compare;
UPDATE dispatch_policy.staged_jobs SET policy = 'q' WHERE args = '"restored"';
SELECT partitions FROM dispatch_policy.staged_jobs WHERE args = '"restored"';
SELECT * FROM compare;
UPDATE dispatch_policy.staged_jobs SET policy = 'p' WHERE args = '"restored"';
SELECT * FROM compare;
-- A value a DBA writes is counted as written; sync_partitions puts it back.
UPDATE dispatch_policy.staged_jobs SET partitions = '{"per_tenant": "wrong"}' WHERE args = '"restored"';
SELECT pending FROM dispatch_policy.partition_pending('p', 'per_tenant', ARRAY['wrong']);
SELECT dispatch_policy.sync_partitions() AS synced;
SELECT dispatch_policy.sync_partitions() AS synced_again;
SELECT * FROM compare;
-- A job staged for a policy not declared yet has none, until it is declared.
INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context)
VALUES (nextval('dispatch_policy.job_ids'), 'later', 'default', '1', '{"k": "v"}');
SELECT partitions FROM dispatch_policy.staged_jobs WHERE policy = 'later';
SELECT dispatch_policy.declare_policy('later', '{"gates": [{"type": "concurrency", "max": 1, "partition_by": "k:{k}"}]}');
SELECT partitions FROM dispatch_policy.staged_jobs WHERE policy = 'later';
SELECT * FROM compare;
-- An INSERT whose partitions are not a JSON object is refused.
\set VERBOSITY terse
INSERT INTO dispatch_policy.staged_jobs (id, policy, queue, args, context, partitions)
VALUES (nextval('dispatch_policy.job_ids'), 'p', 'default', '1', '{}', '[]');
\echo :SQLSTATE
\set VERBOSITY default

-- Redeclared. A change that leaves the partitioned gates and templates as
-- they were renders nothing again and leaves stagers alone; a changed
-- template, a renamed gate, a removed one render the policy's staged jobs
-- again, holding its partitions lock until commit (stagers of the policy
-- wait).
CREATE TEMP VIEW partitions_lock AS
SELECT l.mode, count(*) FROM pg_locks l
WHERE l.pid = pg_backend_pid() AND l.locktype = 'advisory' AND l.objsubid = 1
  AND l.classid::text::bigint = (dispatch_policy._partitions_lock_key('p') >> 32) & 4294967295
  AND l.objid::text::bigint = dispatch_policy._partitions_lock_key('p') & 4294967295
GROUP BY 1 ORDER BY 1;
SELECT dispatch_policy.fold_stats() > 0 AS folded;
BEGIN;
SELECT dispatch_policy.declare_policy('p', (SELECT jsonb_set(config, '{gates,1,max}', '6') FROM dispatch_policy.policies WHERE name = 'p'));
SELECT * FROM partitions_lock;
SELECT count(*) AS partition_deltas FROM dispatch_policy.stat_deltas WHERE gate <> '';
COMMIT;
SELECT dispatch_policy.fold_stats() > 0 AS folded;
BEGIN;
SELECT dispatch_policy.declare_policy('p', (SELECT jsonb_set(config, '{gates,0,partition_by}', '"tenant:{tenant}"')
                                            FROM dispatch_policy.policies WHERE name = 'p'));
SELECT * FROM partitions_lock;
COMMIT;
SELECT * FROM compare;
SELECT partition, pending FROM dispatch_policy.partition_pending('p', 'per_tenant', ARRAY['t1', 'tenant:t1', 'tenant:t2']);
-- A gate renamed, one removed, one added.
SELECT dispatch_policy.declare_policy('p', '{
  "gates": [
    {"type": "throttle", "name": "by_tenant", "rate": 100, "per": 1, "partition_by": "{tenant}"},
    {"type": "concurrency", "name": "per_acct", "max": 5, "partition_by": "acct:{account}"},
    {"type": "concurrency", "name": "per_region", "max": 5, "partition_by": "{region}"},
    {"type": "global_cap", "max": 100},
    {"type": "fair_interleave"}
  ],
  "max_attempts": 2
}');
SELECT * FROM compare;
SELECT DISTINCT jsonb_object_keys(partitions) AS stored_gates FROM dispatch_policy.staged_jobs WHERE policy = 'p' ORDER BY 1;
SELECT gate, sum(pending) AS pending FROM dispatch_policy.partition_counters WHERE policy = 'p' GROUP BY 1
UNION ALL SELECT gate || ' (unfolded)', sum(d_pending) FROM dispatch_policy.stat_deltas WHERE policy = 'p' AND gate <> '' GROUP BY 1
ORDER BY 1;
SELECT dispatch_policy.fold_stats() > 0 AS folded;
SELECT gate, sum(pending) AS pending FROM dispatch_policy.partition_counters WHERE policy = 'p' GROUP BY 1 ORDER BY 1;

-- partition_overview reads the counters: a partitioned gate's partitions
-- as partition_pending counts them; the global cap's one partition the
-- policy's staged jobs; fair_interleave (no partition_by of its own) the
-- partitions of the first partitioned gate.
SELECT bool_and(o.pending = t.pending) AS exact, count(*) AS partitions
FROM dispatch_policy.partition_overview o JOIN truth t USING (policy, gate, partition);
SELECT o.gate, o.partition, o.pending,
       o.pending = (SELECT count(*) FROM dispatch_policy.staged_jobs s WHERE s.policy = 'p') AS all_staged
FROM dispatch_policy.partition_overview o WHERE o.policy = 'p' AND o.gate = 'global_cap';
SELECT bool_and(f.pending = b.pending) AS fair_as_by_tenant, count(*) AS partitions
FROM dispatch_policy.partition_overview f
JOIN dispatch_policy.partition_overview b ON b.policy = f.policy AND b.partition = f.partition AND b.gate = 'by_tenant'
WHERE f.policy = 'p' AND f.gate = 'fair_interleave';
SELECT count(*) FILTER (WHERE o.pending = 0 AND o.in_flight = 0) AS idle_rows_listed
FROM dispatch_policy.partition_overview o WHERE o.policy = 'p' AND o.gate IN ('by_tenant', 'per_acct', 'per_region')
  AND NOT EXISTS (SELECT 1 FROM dispatch_policy.throttle_buckets b WHERE (b.policy, b.gate, b.partition) = (o.policy, o.gate, o.partition))
  AND NOT EXISTS (SELECT 1 FROM dispatch_policy.inflight_counters c WHERE (c.policy, c.gate, c.partition) = (o.policy, o.gate, o.partition));

-- The pending trend. Live: the last minute is the exact count now, and ten
-- minutes ago, before this test staged anything, there was none; the same
-- after a fold (stat_minutes keeps the changes).
SELECT (SELECT pending FROM dispatch_policy.pending_minutes('p', now() - interval '10 minutes') ORDER BY minute LIMIT 1) AS first_pending,
       (SELECT (pending, scheduled) FROM dispatch_policy.pending_minutes('p', now() - interval '10 minutes') ORDER BY minute DESC LIMIT 1)
       = (SELECT (count(*) FILTER (WHERE not_before IS NULL), count(*) FILTER (WHERE not_before IS NOT NULL))
          FROM dispatch_policy.staged_jobs WHERE policy = 'p') AS last_exact,
       (SELECT count(*) FROM dispatch_policy.pending_minutes('p', now() - interval '10 minutes')) AS minutes;
SELECT dispatch_policy.fold_stats() >= 0 AS folded;
SELECT (SELECT pending FROM dispatch_policy.pending_minutes('p', now() - interval '10 minutes') ORDER BY minute LIMIT 1) AS first_pending,
       (SELECT (pending, scheduled) FROM dispatch_policy.pending_minutes('p', now() - interval '10 minutes') ORDER BY minute DESC LIMIT 1)
       = (SELECT (count(*) FILTER (WHERE not_before IS NULL), count(*) FILTER (WHERE not_before IS NOT NULL))
          FROM dispatch_policy.staged_jobs WHERE policy = 'p') AS last_exact;
-- Known changes (a policy of its own, written directly): 10 pending and 3
-- scheduled now (plus one pending not folded yet); +4 pending and +1
-- scheduled in 00:02, -2 in 00:04, +6 and -1 in 00:05, and the unfolded +1
-- in 00:05. Each minute shows the count at its end.
INSERT INTO dispatch_policy.policy_counters (policy, pending, scheduled) VALUES ('trend', 10, 3);
INSERT INTO dispatch_policy.stat_minutes (policy, gate, partition, minute, d_pending, d_scheduled)
VALUES ('trend', '', '', '2100-01-01 00:02:00+00', 4, 1), ('trend', '', '', '2100-01-01 00:04:00+00', -2, 0),
       ('trend', '', '', '2100-01-01 00:05:00+00', 6, -1);
INSERT INTO dispatch_policy.stat_deltas (policy, minute, d_pending) VALUES ('trend', '2100-01-01 00:05:00+00', 1);
SELECT to_char(minute AT TIME ZONE 'UTC', 'HH24:MI') AS minute, pending, scheduled
FROM dispatch_policy.pending_minutes('trend', '2100-01-01 00:00:30+00', '2100-01-01 00:06:00+00');
-- A window that ends before the last changes still counts them.
SELECT to_char(minute AT TIME ZONE 'UTC', 'HH24:MI') AS minute, pending, scheduled
FROM dispatch_policy.pending_minutes('trend', '2100-01-01 00:03:00+00', '2100-01-01 00:04:00+00');
SELECT dispatch_policy.fold_stats() > 0 AS folded;
SELECT to_char(minute AT TIME ZONE 'UTC', 'HH24:MI') AS minute, pending, scheduled
FROM dispatch_policy.pending_minutes('trend', '2100-01-01 00:04:00+00', '2100-01-01 00:05:00+00');
DELETE FROM dispatch_policy.stat_minutes WHERE policy = 'trend';
DELETE FROM dispatch_policy.policy_counters WHERE policy = 'trend';
-- Arguments, as policy_minutes checks them.
SELECT count(*) FROM dispatch_policy.pending_minutes('p', '2100-01-01 00:00:00+00', '2100-02-01 00:01:00+00');
\echo :SQLSTATE
SELECT count(*) FROM dispatch_policy.pending_minutes('p', '-infinity', '2100-01-01 00:00:00+00');
\echo :SQLSTATE
SELECT count(*) AS rows_for_null FROM dispatch_policy.pending_minutes('p', NULL);
SELECT count(*) AS rows_backwards FROM dispatch_policy.pending_minutes('p', now(), now() - interval '1 hour');

-- partition_pending refuses what it cannot answer.
SELECT * FROM dispatch_policy.partition_pending('nope', 'per_acct', ARRAY['a']);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.partition_pending('p', 'nope', ARRAY['a']);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.partition_pending('p', NULL, ARRAY['a']);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.partition_pending('p', 'global_cap', ARRAY['default']);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.partition_pending('p', 'per_acct', NULL);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.partition_pending('p', 'per_acct', ARRAY['acct:a', NULL]);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.partition_pending('p', 'per_acct', ARRAY[repeat('x', 257)]);
\echo :SQLSTATE
SELECT count(*) FROM dispatch_policy.partition_pending('p', 'per_acct', array_fill('x'::text, ARRAY[10001]));
\echo :SQLSTATE
SELECT count(*) AS keys_answered FROM dispatch_policy.partition_pending('p', 'per_acct', array_fill('x'::text, ARRAY[10000]));
SELECT count(*) AS none FROM dispatch_policy.partition_pending('p', 'per_acct', '{}');

-- TRUNCATE takes back every partition's count.
TRUNCATE dispatch_policy.staged_jobs;
SELECT * FROM compare;
SELECT count(*) FILTER (WHERE pending > 0) AS partitions_with_pending FROM dispatch_policy.partition_overview;
SELECT (SELECT pending FROM dispatch_policy.pending_minutes('p', now() - interval '10 minutes') ORDER BY minute DESC LIMIT 1) AS pending_now;

-- prune deletes the rows of partitions with nothing staged and no staging
-- within the retention, and keeps the others.
SELECT dispatch_policy.stage('p', '1', '{"tenant": "t1"}') IS NOT NULL AS staged;
SELECT count(*) FILTER (WHERE pending = 0) AS empty, count(*) FILTER (WHERE pending > 0) AS holding
FROM dispatch_policy.partition_counters;
SELECT removed FROM dispatch_policy.prune('7 days', '1 hour', now() + interval '8 days') WHERE what = 'partition_counters';
SELECT count(*) FILTER (WHERE pending = 0) AS empty, count(*) FILTER (WHERE pending > 0) AS holding
FROM dispatch_policy.partition_counters;
SELECT * FROM compare;

-- Every new object is documented.
SELECT c.relname, a.attname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relnamespace = 'dispatch_policy'::regnamespace
  AND (c.relname IN ('partition_counters', 'partition_overview')
       OR (c.relname, a.attname) IN (('staged_jobs', 'partitions'), ('stat_deltas', 'last_staged_at'),
                                     ('policy_counters', 'last_staged_at'), ('stat_minutes', 'd_pending'),
                                     ('stat_minutes', 'd_scheduled'), ('policies', 'partition_gates'),
                                     ('policies', 'partition_templates'), ('policies', 'partition_prefixes'),
                                     ('policies', 'partition_keys'), ('policies', 'partition_suffixes')))
  AND col_description(c.oid, a.attnum) IS NULL;
SELECT p.oid::regprocedure FROM pg_proc p
WHERE p.pronamespace = 'dispatch_policy'::regnamespace AND obj_description(p.oid, 'pg_proc') IS NULL;
