-- pg_regress tests of the policy lifecycle and of backpressure (issue 12):
-- drop_policy (refused with jobs, forced, unknown) and defer (no attempt
-- counted, slot freed, fencing, bounds, pausing the throttle partition,
-- admitted again after until). Every refusal shows its error text, its
-- SQLSTATE, and that nothing changed.
\set SHOW_CONTEXT never
\set VERBOSITY default
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
CREATE EXTENSION dispatch_policy;
RESET client_min_messages;

-- Where every job is.
CREATE TEMP VIEW jobs AS
  SELECT 'staged' AS state, s.policy, s.id, s.attempt, NULL::text AS status, s.not_before IS NOT NULL AS scheduled,
         s.last_error
  FROM dispatch_policy.staged_jobs s
  UNION ALL
  SELECT 'admitted', a.policy, a.id, a.attempt, NULL, NULL, NULL FROM dispatch_policy.admitted_jobs a
  UNION ALL
  SELECT 'finished', f.policy, f.id, f.attempts, f.status, NULL, f.last_error FROM dispatch_policy.finished_jobs f;
-- Every row of a policy, in every table with a policy column (found in the
-- catalog, so a table added later is covered): table name and count.
CREATE FUNCTION pg_temp.rows_of(of_policy text) RETURNS TABLE (tbl text, n bigint)
LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  FOR r IN
    SELECT c.relname, a.attname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
    WHERE c.relnamespace = 'dispatch_policy'::regnamespace AND c.relkind = 'r' AND NOT a.attisdropped
      AND (a.attname = 'policy' OR (c.relname = 'policies' AND a.attname = 'name'))
    ORDER BY 1
  LOOP
    tbl := r.relname;
    EXECUTE format('SELECT count(*) FROM dispatch_policy.%I WHERE %I = $1', r.relname, r.attname) INTO n USING of_policy;
    RETURN NEXT;
  END LOOP;
END
$$;
-- The history a dropped policy keeps (documented): everything else is state.
CREATE TEMP TABLE history_tables (tbl text PRIMARY KEY);
INSERT INTO history_tables VALUES ('finished_jobs'), ('job_failures'), ('job_deferrals'), ('stat_deltas'),
  ('stat_minutes'), ('observation_minutes'), ('policy_counters');
-- A snapshot of every row of every policy table, to show a refusal changed nothing.
CREATE FUNCTION pg_temp.digest() RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  r record;
  part text;
  acc text := '';
BEGIN
  FOR r IN
    SELECT c.relname FROM pg_class c
    WHERE c.relnamespace = 'dispatch_policy'::regnamespace AND c.relkind = 'r' AND c.relname <> 'schema_migrations'
    ORDER BY 1
  LOOP
    EXECUTE format('SELECT coalesce(string_agg(t::text, ''|'' ORDER BY t::text), '''') FROM dispatch_policy.%I t', r.relname)
      INTO part;
    acc := acc || r.relname || ':' || part || ';';
  END LOOP;
  RETURN md5(acc);
END
$$;

-- A tick as the runner makes it (upgrade.sql's, shorter): tick_begin,
-- tick_state, the gates evaluated in fetch order against that state (a job
-- with a paused partition is refused), tick_finish.
CREATE FUNCTION pg_temp.run_tick(policy text)
RETURNS TABLE (job bigint, verdict text)
LANGUAGE plpgsql AS $$
DECLARE
  cfg jsonb;
  at timestamptz;
  j record;
  g record;
  s record;
  held integer;
  refused text;
  taken jsonb := '{}';
BEGIN
  SET LOCAL client_min_messages = warning;
  DROP TABLE IF EXISTS pg_temp.tick_rows, pg_temp.tick_gates, pg_temp.tick_state, pg_temp.tick_decision;
  SET LOCAL client_min_messages = notice;
  CREATE TEMP TABLE tick_rows AS
  SELECT * FROM dispatch_policy.tick_begin(run_tick.policy, 100, 10) WITH ORDINALITY AS t(kind, id, priority,
    round_robin_key, context, lane, gate, partition, lag_ms, success, observed_at, config, now, n);
  IF NOT EXISTS (SELECT 1 FROM tick_rows r WHERE r.kind = 'tick') OR EXISTS (SELECT 1 FROM tick_rows r WHERE r.kind = 'done') THEN
    RETURN QUERY SELECT NULL::bigint, string_agg(r.kind, ', ' ORDER BY r.n) FROM tick_rows r;
    RETURN;
  END IF;
  SELECT r.config::jsonb, r.now INTO cfg, at FROM tick_rows r WHERE r.kind = 'tick';
  CREATE TEMP TABLE tick_gates AS
  SELECT r.n, r.id, x.n AS gate_n, coalesce(x.g ->> 'name', x.g ->> 'type') AS gate, x.g ->> 'type' AS gate_type,
         dispatch_policy._gate_partitions(cfg, r.context::jsonb) ->> coalesce(x.g ->> 'name', x.g ->> 'type') AS partition,
         x.g
  FROM tick_rows r CROSS JOIN LATERAL jsonb_array_elements(cfg -> 'gates') WITH ORDINALITY AS x(g, n)
  WHERE r.kind = 'job';
  CREATE TEMP TABLE tick_state AS
  WITH buckets AS (SELECT DISTINCT t.gate, t.partition, (t.g ->> 'rate')::float8 AS rate,
                          coalesce((t.g ->> 'per')::float8, 1) AS per,
                          coalesce((t.g ->> 'burst')::float8, greatest((t.g ->> 'rate')::float8, 1)) AS burst
                   FROM tick_gates t WHERE t.gate_type = 'throttle'),
       counters AS (SELECT DISTINCT t.gate, t.partition FROM tick_gates t
                    WHERE t.gate_type IN ('concurrency', 'global_cap', 'adaptive_concurrency')),
       adaptive AS (SELECT DISTINCT t.gate, t.partition, (t.g ->> 'initial_max')::integer AS initial_max
                    FROM tick_gates t WHERE t.gate_type = 'adaptive_concurrency')
  SELECT x.* FROM dispatch_policy.tick_state(run_tick.policy, at,
    (SELECT array_agg(b.gate) FROM buckets b), (SELECT array_agg(b.partition) FROM buckets b),
    (SELECT array_agg(b.rate) FROM buckets b), (SELECT array_agg(b.per) FROM buckets b),
    (SELECT array_agg(b.burst) FROM buckets b),
    (SELECT array_agg(c.gate) FROM counters c), (SELECT array_agg(c.partition) FROM counters c),
    (SELECT array_agg(a.gate) FROM adaptive a), (SELECT array_agg(a.partition) FROM adaptive a),
    (SELECT array_agg(a.initial_max) FROM adaptive a)) x;
  CREATE TEMP TABLE tick_decision (n bigint, id bigint, refused_by text);
  FOR j IN SELECT r.n, r.id FROM tick_rows r WHERE r.kind = 'job' ORDER BY r.n LOOP
    refused := NULL;
    FOR g IN SELECT t.gate, t.gate_type, t.partition, t.g FROM tick_gates t WHERE t.n = j.n ORDER BY t.gate_n LOOP
      held := coalesce((taken ->> (g.gate || '|' || g.partition))::integer, 0);
      IF EXISTS (SELECT 1 FROM tick_state x WHERE x.kind = 'paused' AND x.gate = g.gate AND x.partition = g.partition) THEN
        refused := g.gate || ' (paused)';
        EXIT;
      END IF;
      SELECT * INTO s FROM tick_state x
      WHERE x.kind = CASE WHEN g.gate_type = 'throttle' THEN 'bucket' ELSE 'counter' END
        AND x.gate = g.gate AND x.partition = g.partition;
      IF (CASE g.gate_type
            WHEN 'throttle' THEN s.tokens - held < 1
            WHEN 'concurrency' THEN s.in_flight + held >= (g.g ->> 'max')::integer
            WHEN 'global_cap' THEN s.in_flight + held >= (g.g ->> 'max')::integer
            WHEN 'adaptive_concurrency' THEN
              s.in_flight + held >= (SELECT x.current_max FROM tick_state x
                                     WHERE x.kind = 'adaptive' AND x.gate = g.gate AND x.partition = g.partition)
            ELSE false
          END) THEN
        refused := g.gate;
        EXIT;
      END IF;
    END LOOP;
    IF refused IS NULL THEN
      SELECT taken || coalesce(jsonb_object_agg(t.gate || '|' || t.partition,
                                                coalesce((taken ->> (t.gate || '|' || t.partition))::integer, 0) + 1),
                               '{}')
      INTO taken FROM tick_gates t WHERE t.n = j.n;
    END IF;
    INSERT INTO tick_decision VALUES (j.n, j.id, refused);
  END LOOP;
  PERFORM dispatch_policy.tick_finish(run_tick.policy, at,
    ids => (SELECT coalesce(array_agg(d.id ORDER BY d.n), '{}') FROM tick_decision d WHERE d.refused_by IS NULL),
    gate_names => (SELECT coalesce(array_agg(coalesce(x.g ->> 'name', x.g ->> 'type') ORDER BY x.n), '{}')
                   FROM jsonb_array_elements(cfg -> 'gates') WITH ORDINALITY AS x(g, n)),
    partitions => (SELECT coalesce(array_agg(t.partition ORDER BY d.n, t.gate_n), '{}')
                   FROM tick_decision d JOIN tick_gates t ON t.n = d.n WHERE d.refused_by IS NULL),
    take_gates => (SELECT coalesce(array_agg(split_part(k.key, '|', 1)), '{}')
                   FROM jsonb_each_text(taken) k JOIN tick_state x ON x.kind = 'bucket' AND x.gate || '|' || x.partition = k.key),
    take_partitions => (SELECT coalesce(array_agg(x.partition), '{}')
                        FROM jsonb_each_text(taken) k JOIN tick_state x ON x.kind = 'bucket' AND x.gate || '|' || x.partition = k.key),
    take_tokens => (SELECT coalesce(array_agg(k.value::float8), '{}')
                    FROM jsonb_each_text(taken) k JOIN tick_state x ON x.kind = 'bucket' AND x.gate || '|' || x.partition = k.key));
  RETURN QUERY SELECT d.id, coalesce('refused by ' || d.refused_by, 'admitted') FROM tick_decision d ORDER BY d.n;
END
$$;

-- ===========================================================================
-- drop_policy

-- doomed: jobs in every state and state in every table; other: a
-- bystander whose rows must stay.
SELECT dispatch_policy.declare_policy('doomed', '{
  "gates": [
    {"type": "throttle", "name": "per_ep", "rate": 100, "per": 1, "partition_by": "{endpoint}"},
    {"type": "concurrency", "name": "per_acct", "max": 5, "partition_by": "acct:{account}"},
    {"type": "adaptive_concurrency", "name": "adapt", "partition_by": "{account}", "initial_max": 3, "target_lag_ms": 1000},
    {"type": "global_cap", "max": 100}
  ],
  "round_robin_by": "{endpoint}", "max_attempts": 3
}');
SELECT dispatch_policy.declare_policy('other', '{"gates": [{"type": "concurrency", "max": 5, "partition_by": "{account}"}]}');
SELECT dispatch_policy.stage_many('doomed', '[
  {"args": 1, "context": {"endpoint": "e1", "account": "a"}, "dedupe_key": "k1"},
  {"args": 2, "context": {"endpoint": "e1", "account": "a"}, "dedupe_key": "k2"},
  {"args": 3, "context": {"endpoint": "e2", "account": "b"}, "dedupe_key": "k3"},
  {"args": 4, "context": {"endpoint": "e2", "account": "b"}},
  {"args": 5, "context": {"endpoint": "e3", "account": "c"}, "dedupe_key": "k5", "not_before": "2999-01-01T00:00:00Z"}
]');
SELECT dispatch_policy.stage('other', '{"args": 6}', '{"account": "a"}', dedupe_key => 'k1');
-- Jobs 1 to 4 admitted; 1 claimed and completed (an observation, a finished
-- row), 2 claimed and failed once (a failure, re-staged), 3 claimed, 4
-- admitted only.
SELECT * FROM pg_temp.run_tick('doomed');
SELECT id, attempt FROM dispatch_policy.claim('default', 'w1', 3, policies => '{doomed}') ORDER BY id;
SELECT dispatch_policy.complete(1);
SELECT dispatch_policy.fail(2, 'boom', interval '1 hour');
SELECT * FROM pg_temp.run_tick('other');
SELECT dispatch_policy.pause_partition('doomed', 'per_ep', 'e3', reason => 'vendor down');
INSERT INTO dispatch_policy.runner_failures (policy, error, first_failed_at, last_failed_at)
VALUES ('doomed', 'a target raised', now(), now());
INSERT INTO dispatch_policy.adaptive_stats (policy, gate, partition, current_max) VALUES ('doomed', 'adapt', 'a', 4)
ON CONFLICT ON CONSTRAINT adaptive_stats_pkey DO UPDATE SET current_max = 4;
SELECT * FROM jobs ORDER BY id;
-- (folded first, so that partition_counters has its rows whatever the ticks folded)
SELECT dispatch_policy.fold_stats() IS NOT NULL AS folded;
SELECT tbl AS state FROM pg_temp.rows_of('doomed') WHERE n > 0 AND tbl NOT IN (SELECT tbl FROM history_tables);

-- Refused while jobs are staged or admitted; nothing changed.
SELECT pg_temp.digest() AS before \gset
SELECT dispatch_policy.drop_policy('doomed');
\echo :SQLSTATE
SELECT dispatch_policy.drop_policy('doomed', false);
\echo :SQLSTATE
SELECT pg_temp.digest() = :'before' AS unchanged;
-- Unknown policy, NULL arguments.
SELECT dispatch_policy.drop_policy('nope');
\echo :SQLSTATE
SELECT dispatch_policy.drop_policy('nope', force => true);
\echo :SQLSTATE
SELECT dispatch_policy.drop_policy(NULL);
\echo :SQLSTATE
SELECT dispatch_policy.drop_policy('doomed', NULL);
\echo :SQLSTATE
SELECT pg_temp.digest() = :'before' AS unchanged;

-- Forced: every staged and admitted job is finished as cancelled, with the
-- reason; then nothing of the policy is left but its history.
SELECT dispatch_policy.drop_policy('doomed', force => true) AS cancelled;
SELECT * FROM jobs ORDER BY id;
SELECT tbl AS state_left FROM pg_temp.rows_of('doomed') WHERE n > 0 AND tbl NOT IN (SELECT tbl FROM history_tables);
-- Folding the deltas the drop left brings no per-partition count back.
SELECT dispatch_policy.fold_stats() IS NOT NULL AS folded;
SELECT tbl AS state_left FROM pg_temp.rows_of('doomed') WHERE n > 0 AND tbl NOT IN (SELECT tbl FROM history_tables);
-- (the job history; the counters and minutes depend on when a fold ran)
SELECT tbl AS history_kept FROM pg_temp.rows_of('doomed')
WHERE n > 0 AND tbl IN ('finished_jobs', 'job_failures', 'job_deferrals') ORDER BY 1;
-- Counters of the policy's jobs, folded and not: nothing pending, scheduled
-- or in flight; gate partitions count nothing.
SELECT sum(pending) AS pending, sum(scheduled) AS scheduled, sum(in_flight) AS in_flight
FROM (SELECT c.pending, c.scheduled, c.in_flight FROM dispatch_policy.policy_counters c WHERE c.policy = 'doomed'
      UNION ALL
      SELECT d.d_pending, d.d_scheduled, d.d_in_flight FROM dispatch_policy.stat_deltas d
      WHERE d.policy = 'doomed' AND d.gate = '') t;
-- The keys are free: the bystander's k1 is untouched, and doomed's keys
-- are gone with its jobs.
SELECT * FROM dispatch_policy.dedupe_keys ORDER BY 1, 2;
-- Slots: the bystander's counter holds its job, nothing of doomed remains.
SELECT policy, gate, partition, in_flight FROM dispatch_policy.inflight_counters ORDER BY 1, 2, 3;
SELECT count(*) AS check_findings FROM dispatch_policy."check"();
-- A worker of a cancelled job is told to stop: DP001 with its attempt, a
-- false complete without.
SELECT dispatch_policy.heartbeat(3, attempt => 1);
\echo :SQLSTATE
SELECT dispatch_policy.complete(3);
-- Staging into it: unknown policy.
SELECT dispatch_policy.stage('doomed', '{}');
\echo :SQLSTATE
-- Declared again: it starts empty (its history continues under the name).
SELECT dispatch_policy.declare_policy('doomed', '{"gates": [{"type": "concurrency", "max": 1, "partition_by": "{account}"}]}');
SELECT policy, pending, scheduled, in_flight FROM dispatch_policy.policy_overview WHERE policy = 'doomed';
SELECT count(*) AS partitions FROM dispatch_policy.partition_overview WHERE policy = 'doomed';
-- Without jobs, no force is needed; the bystander is untouched.
SELECT dispatch_policy.drop_policy('doomed');
SELECT tbl AS state_left FROM pg_temp.rows_of('doomed') WHERE n > 0 AND tbl NOT IN (SELECT tbl FROM history_tables);
SELECT dispatch_policy.fold_stats() IS NOT NULL AS folded;
SELECT tbl AS state FROM pg_temp.rows_of('other') WHERE n > 0 AND tbl NOT IN (SELECT tbl FROM history_tables);

-- ===========================================================================
-- defer

-- One throttle partition per endpoint (the lanes are those partitions), a
-- cap of 1 per account, an adaptive gate; and a policy with no throttle.
SELECT dispatch_policy.declare_policy('hooks', '{
  "gates": [
    {"type": "throttle", "name": "per_ep", "rate": 1000, "per": 1, "partition_by": "{endpoint}"},
    {"type": "concurrency", "name": "per_acct", "max": 1, "partition_by": "acct:{account}"},
    {"type": "adaptive_concurrency", "name": "adapt", "partition_by": "{account}", "initial_max": 3, "target_lag_ms": 1000}
  ],
  "round_robin_by": "{endpoint}", "max_attempts": 2
}');
SELECT dispatch_policy.declare_policy('bare', '{"gates": [{"type": "concurrency", "max": 1}]}');
SELECT dispatch_policy.stage('hooks', '{"n": 1}', '{"endpoint": "e1", "account": "a"}', dedupe_key => 'd1') AS j1 \gset
SELECT dispatch_policy.stage('hooks', '{"n": 2}', '{"endpoint": "e2", "account": "a"}') AS j2 \gset
SELECT * FROM pg_temp.run_tick('hooks');
SELECT id, attempt FROM dispatch_policy.claim('default', 'w1', policies => '{hooks}') ORDER BY id;
SELECT policy, gate, partition, in_flight FROM dispatch_policy.inflight_counters WHERE policy = 'hooks' ORDER BY 1, 2, 3;

-- Refusals: bad until (past, now, infinite, beyond 30 days), NULL or too
-- long reason, NULL arguments; nothing changed.
SELECT pg_temp.digest() AS before \gset
SELECT * FROM dispatch_policy.defer(:j1, now() - interval '1 second', 'HTTP 429');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, now(), 'HTTP 429');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, 'infinity', 'HTTP 429');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, now() + interval '30 days 1 second', 'HTTP 429');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, now() + interval '1 minute', NULL);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, now() + interval '1 minute', '');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, now() + interval '1 minute', repeat('x', 1025));
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, NULL, 'HTTP 429');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(NULL, now() + interval '1 minute', 'HTTP 429');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, now() + interval '1 minute', 'HTTP 429', NULL);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, now() + interval '1 minute', 'HTTP 429', now => 'infinity');
\echo :SQLSTATE
-- A stale attempt: DP001; a job not admitted (staged, unknown): P0002.
SELECT * FROM dispatch_policy.defer(:j1, now() + interval '1 minute', 'HTTP 429', attempt => 2);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j2, now() + interval '1 minute', 'HTTP 429');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(999999, now() + interval '1 minute', 'HTTP 429');
\echo :SQLSTATE
SELECT pg_temp.digest() = :'before' AS unchanged;
-- 30 days exactly is within the bound (rolled back).
BEGIN;
SELECT state, not_before = now() + interval '30 days' AS thirty_days FROM dispatch_policy.defer(:j1, now() + interval '30 days', 'HTTP 429');
ROLLBACK;

-- Deferred (attempt 1, fenced): back in staging, scheduled, the same
-- attempt; its slot is free, its dedupe key still held; no failure, no
-- observation; the deferral recorded.
SELECT count(*) AS observations_before FROM dispatch_policy.observations WHERE policy = 'hooks';
SELECT state, not_before > now() AS later, paused
FROM dispatch_policy.defer(:j1, now() + interval '2 seconds', 'HTTP 429 Retry-After: 2', attempt => 1);
SELECT state, id, attempt, scheduled, last_error FROM jobs WHERE policy = 'hooks' ORDER BY id;
SELECT policy, gate, partition, in_flight FROM dispatch_policy.inflight_counters WHERE policy = 'hooks' ORDER BY 1, 2, 3;
SELECT policy, dedupe_key, job_id = :j1 AS held_by_j1 FROM dispatch_policy.dedupe_keys WHERE policy = 'hooks';
SELECT count(*) AS failures FROM dispatch_policy.job_failures WHERE policy = 'hooks';
SELECT count(*) AS observations_after FROM dispatch_policy.observations WHERE policy = 'hooks';
SELECT job_id = :j1 AS j1, policy, attempt, reason, until > deferred_at AS later, paused FROM dispatch_policy.job_deferrals;
SELECT count(*) AS check_findings FROM dispatch_policy."check"();
-- While it waits, its key dedupes; its worker's late calls are refused.
SELECT outcome = 'kept' AS deduped FROM dispatch_policy.stage_outcome('hooks', '{}', '{"endpoint": "e1", "account": "a"}', dedupe_key => 'd1');
SELECT dispatch_policy.complete(:j1, attempt => 1);
\echo :SQLSTATE
-- A second defer of it says it was deferred (DP001 with the attempt, P0002 without).
SELECT * FROM dispatch_policy.defer(:j1, now() + interval '5 seconds', 'HTTP 429 again', attempt => 1);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:j1, now() + interval '5 seconds', 'HTTP 429 again');
\echo :SQLSTATE
-- The slot it held is free: the next tick admits job 2, of the same
-- account (a cap of 1); the deferred job is not due yet.
SELECT job = :j2 AS j2, verdict FROM pg_temp.run_tick('hooks');
-- After until it is admitted again, as attempt 1 (once j2 frees the slot).
SELECT dispatch_policy.complete(:j2);
SELECT pg_sleep(2.1);
SELECT job = :j1 AS j1, verdict FROM pg_temp.run_tick('hooks');
SELECT state, id = :j1 AS j1, attempt FROM jobs WHERE policy = 'hooks' AND state <> 'finished' ORDER BY id;

-- pause_partition => true: the job's throttle partition (per_ep e1) is
-- paused until until, its lane blocked; other partitions go on.
SELECT id, attempt FROM dispatch_policy.claim('default', 'w1', policies => '{hooks}') ORDER BY id;
SELECT dispatch_policy.stage('hooks', '{"n": 3}', '{"endpoint": "e1", "account": "b"}') AS j3 \gset
SELECT dispatch_policy.stage('hooks', '{"n": 4}', '{"endpoint": "e2", "account": "b"}') AS j4 \gset
SELECT state, not_before > now() AS later, paused
FROM dispatch_policy.defer(:j1, clock_timestamp() + interval '2 seconds', 'HTTP 429', pause_partition => true, attempt => 1);
SELECT policy, gate, partition, until IS NOT NULL AS has_until, reason FROM dispatch_policy.paused_partitions;
SELECT gate, partition FROM dispatch_policy.paused_partitions_now('hooks');
SELECT gate, partition FROM dispatch_policy.paused_partitions_now('hooks', now() + interval '3 seconds');
SELECT lane, blocked_until IS NOT NULL AND blocked_until < 'infinity' AS blocked_until_then, blocked_gate, blocked_partition
FROM dispatch_policy.lanes WHERE policy = 'hooks' ORDER BY lane;
SELECT paused FROM dispatch_policy.job_deferrals ORDER BY id DESC LIMIT 1;
-- The tick admits j4 (endpoint e2); j3 (endpoint e1) waits.
SELECT job = :j4 AS j4, verdict FROM pg_temp.run_tick('hooks');
SELECT state, id = :j3 AS j3 FROM jobs WHERE id = :j3;
-- A deferral never shortens a pause: an operator's pause without an end
-- stays without an end, and a longer one stays longer.
SELECT id, attempt FROM dispatch_policy.claim('default', 'w1', policies => '{hooks}') ORDER BY id;
SELECT dispatch_policy.pause_partition('hooks', 'per_ep', 'e2', reason => 'operator');
SELECT paused FROM dispatch_policy.defer(:j4, now() + interval '1 second', 'HTTP 429', pause_partition => true);
SELECT policy, gate, partition, until IS NOT NULL AS has_until, reason FROM dispatch_policy.paused_partitions ORDER BY partition;
SELECT dispatch_policy.resume_partition('hooks', 'per_ep', 'e2');
-- The pause of e1 ends by itself at until: then j3 and j1 are admitted.
SELECT pg_sleep(2.1);
SELECT gate, partition FROM dispatch_policy.paused_partitions_now('hooks');
SELECT CASE job WHEN :j1 THEN 'j1' WHEN :j3 THEN 'j3' WHEN :j4 THEN 'j4' END AS job, verdict
FROM pg_temp.run_tick('hooks') ORDER BY 1;
SELECT count(*) AS deferrals, count(*) FILTER (WHERE paused IS NOT NULL) AS with_pause FROM dispatch_policy.job_deferrals;
SELECT count(*) AS failures FROM dispatch_policy.job_failures WHERE policy = 'hooks';
SELECT count(*) AS check_findings FROM dispatch_policy."check"();

-- A policy without a throttle: the deferral happens, nothing is paused.
SELECT dispatch_policy.stage('bare', '{"n": 5}') AS j5 \gset
SELECT * FROM pg_temp.run_tick('bare');
SELECT state, paused FROM dispatch_policy.defer(:j5, now() + interval '1 minute', 'HTTP 503', pause_partition => true);
SELECT count(*) AS pauses FROM dispatch_policy.paused_partitions WHERE policy = 'bare';
SELECT state, attempt, scheduled FROM jobs WHERE id = :j5;

-- prune: deferrals go after the retention, with the other history.
SELECT removed FROM dispatch_policy.prune(now => now() + interval '8 days') WHERE what = 'deferrals';
SELECT count(*) AS deferrals FROM dispatch_policy.job_deferrals;

-- limits(): defer's bounds are there, with the others.
SELECT field, minimum, minimum_exclusive, maximum, unit FROM dispatch_policy.limits() WHERE field LIKE 'defer.%' ORDER BY 1;
