-- pg_regress test of upgrades: dispatch_policy installed at 0.1.0 (the first
-- release, Migrations/0001 to 0006) and used with the 0.1.0 API as its
-- runner and workers used it, then ALTER EXTENSION dispatch_policy UPDATE
-- to the default version.
--
-- At the update there are policies (one paused, one handing jobs to a sql
-- target, one partitioned by keys longer than 256 bytes) and jobs in every
-- state: pending, scheduled, due for a retry, admitted, started, completed
-- and dead, a dedupe key held, gate state, an observation not folded yet.
-- Afterwards every row must be there unchanged, what later migrations
-- added must be filled in from the rows (stored partitions, counters,
-- lanes, leases, targets), check() must find nothing, ticks of the new API
-- must admit the pending jobs under the gates as the 0.1.0 admissions left
-- them, and the updated extension must have the catalog of a fresh
-- CREATE EXTENSION of the same version.
\set SHOW_CONTEXT never
\set VERBOSITY default
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
DROP FUNCTION IF EXISTS public.upgrade_outbox(bigint, text, jsonb, jsonb);
DROP TABLE IF EXISTS public.upgrade_outbox;
RESET client_min_messages;

CREATE EXTENSION dispatch_policy VERSION '0.1.0';
SELECT extversion FROM pg_extension WHERE extname = 'dispatch_policy';

-- ---------------------------------------------------------------------------
-- 0.1.0 in use.

SELECT dispatch_policy.declare_policy('webhooks', '{
  "gates": [
    {"type": "throttle", "name": "per_endpoint", "rate": 3, "per": 3600, "burst": 3, "partition_by": "{endpoint_id}"},
    {"type": "concurrency", "max": 2, "partition_by": "acct:{account_id}"},
    {"type": "global_cap", "max": 4},
    {"type": "adaptive_concurrency", "partition_by": "{account_id}", "initial_max": 3, "target_lag_ms": 60000, "min": 1}
  ],
  "round_robin_by": "{account_id}",
  "batch_size": 100,
  "round_robin_quantum": 10,
  "lease_seconds": 600,
  "max_attempts": 3
}');
SELECT dispatch_policy.declare_policy('reports', '{"max_attempts": 1, "target": {"type": "ready_queue"}}');
SELECT dispatch_policy.declare_policy('held', '{"gates": [{"type": "concurrency", "max": 1}]}');
SELECT dispatch_policy.pause('held');
-- 0.1.0 rendered partition and round-robin keys at any length; later
-- versions store a key over 256 bytes as 64 characters, "..." and a hash.
SELECT dispatch_policy.declare_policy('long_keys', '{
  "gates": [
    {"type": "concurrency", "name": "per_tenant", "max": 1, "partition_by": "{tenant}"},
    {"type": "throttle", "name": "tenant_rate", "rate": 5, "per": 3600, "burst": 5, "partition_by": "{tenant}"},
    {"type": "adaptive_concurrency", "name": "tenant_adaptive", "partition_by": "{tenant}", "initial_max": 2,
     "target_lag_ms": 60000}
  ],
  "round_robin_by": "{tenant}"
}');
-- A sql target, and partitioned gates without round_robin_by (later
-- versions give such jobs a lane per partition).
CREATE TABLE public.upgrade_outbox (id bigint, queue text, args jsonb);
CREATE FUNCTION public.upgrade_outbox(id bigint, queue text, args jsonb, context jsonb) RETURNS void
LANGUAGE sql AS $$ INSERT INTO public.upgrade_outbox VALUES (id, queue, args) $$;
SELECT dispatch_policy.declare_policy('mailer', '{
  "gates": [{"type": "throttle", "name": "per_domain", "rate": 100, "per": 1, "partition_by": "{domain}"}],
  "target": {"type": "sql", "function": "public.upgrade_outbox"}
}');

-- Jobs 1 to 8; 9 is a duplicate of 1's dedupe key (NULL, nothing stored);
-- 7 is scheduled far ahead.
SELECT dispatch_policy.stage('webhooks', jsonb_build_object('n', n),
                             jsonb_build_object('account_id', acct, 'endpoint_id', ep),
                             dedupe_key => key, not_before => at) AS id
FROM (VALUES (1, 'a', 'e1', 'order-1', NULL::timestamptz), (2, 'a', 'e1', NULL, NULL), (3, 'a', 'e2', NULL, NULL),
             (4, 'b', 'e1', NULL, NULL), (5, 'b', 'e2', NULL, NULL), (6, 'c', 'e3', NULL, NULL),
             (7, 'a', 'e2', NULL, '2100-01-01 00:00:00+00'), (8, 'a', 'e4', NULL, NULL),
             (9, 'a', 'e1', 'order-1', NULL)) AS j(n, acct, ep, key, at)
ORDER BY n;
SELECT dispatch_policy.stage_many('reports', '[{"args": {"r": 1}}, {"args": {"r": 2}, "priority": -1}, {"args": {"r": 3}, "priority": 5}]');
SELECT dispatch_policy.stage_many('held', '[{"args": {"h": 1}}, {"args": {"h": 2}, "queue": "slow"}]');
SELECT dispatch_policy.stage_many('long_keys', jsonb_build_array(
  jsonb_build_object('args', 1, 'context', jsonb_build_object('tenant', repeat('t', 300))),
  jsonb_build_object('args', 2, 'context', jsonb_build_object('tenant', repeat('t', 300)))));
SELECT dispatch_policy.stage_many('mailer', '[{"args": {"to": "a@x.org"}, "context": {"domain": "x.org"}},
                                              {"args": {"to": "b@y.org"}, "context": {"domain": "y.org"}}]');

-- A tick of 0.1.0, as its Swift runner made one, gates evaluated by hand in
-- id order: 1 and 2 fill acct:a (max 2), so 3 and 8 wait; 4 takes e1's
-- last token; 5 fills the global cap (4), so 6 waits.
BEGIN;
SELECT dispatch_policy.try_lock_policy('webhooks');
SELECT dispatch_policy.reap_leases('webhooks');
SELECT dispatch_policy.promote_scheduled('webhooks', 100);
SELECT id, round_robin_key, context ->> 'endpoint_id' AS endpoint FROM dispatch_policy.fetch_batch('webhooks', 100, 10)
ORDER BY id;
SELECT gate, partition, tokens FROM dispatch_policy.refill_buckets('webhooks', '[
  {"gate": "per_endpoint", "partition": "e1", "rate": 3, "per": 3600, "burst": 3},
  {"gate": "per_endpoint", "partition": "e2", "rate": 3, "per": 3600, "burst": 3},
  {"gate": "per_endpoint", "partition": "e3", "rate": 3, "per": 3600, "burst": 3},
  {"gate": "per_endpoint", "partition": "e4", "rate": 3, "per": 3600, "burst": 3}]') ORDER BY 1, 2;
SELECT * FROM dispatch_policy.read_counters('webhooks', '[
  {"gate": "concurrency", "partition": "acct:a"}, {"gate": "concurrency", "partition": "acct:b"},
  {"gate": "concurrency", "partition": "acct:c"}, {"gate": "global_cap", "partition": "default"}]') ORDER BY 1, 2;
SELECT gate, partition, current_max FROM dispatch_policy.read_adaptive('webhooks', '[
  {"gate": "adaptive_concurrency", "partition": "a", "initial_max": 3},
  {"gate": "adaptive_concurrency", "partition": "b", "initial_max": 3},
  {"gate": "adaptive_concurrency", "partition": "c", "initial_max": 3}]') ORDER BY 1, 2;
SELECT dispatch_policy.admit('webhooks', '[
  {"id": 1, "slots": {"concurrency": "acct:a", "global_cap": "default", "adaptive_concurrency": "a"}},
  {"id": 2, "slots": {"concurrency": "acct:a", "global_cap": "default", "adaptive_concurrency": "a"}},
  {"id": 4, "slots": {"concurrency": "acct:b", "global_cap": "default", "adaptive_concurrency": "b"}},
  {"id": 5, "slots": {"concurrency": "acct:b", "global_cap": "default", "adaptive_concurrency": "b"}}]',
  '[{"gate": "per_endpoint", "partition": "e1", "tokens": 3}, {"gate": "per_endpoint", "partition": "e2", "tokens": 1}]',
  600);
COMMIT;

-- reports has no gates: all three admitted, with no slots.
BEGIN;
SELECT dispatch_policy.try_lock_policy('reports');
SELECT id FROM dispatch_policy.fetch_batch('reports', 100) ORDER BY id;
SELECT dispatch_policy.admit('reports', '[{"id": 10, "slots": {}}, {"id": 11, "slots": {}}, {"id": 12, "slots": {}}]');
COMMIT;
-- held is paused: its runner takes the lock and skips it.

-- long_keys: 15 takes the tenant's one slot (and a token), under the
-- 300-byte keys the 0.1.0 runner rendered; 16 waits for the slot.
BEGIN;
SELECT dispatch_policy.try_lock_policy('long_keys');
SELECT id, octet_length(round_robin_key) AS key_bytes FROM dispatch_policy.fetch_batch('long_keys', 100) ORDER BY id;
SELECT gate, octet_length(partition) AS key_bytes, tokens FROM dispatch_policy.refill_buckets('long_keys',
  jsonb_build_array(jsonb_build_object('gate', 'tenant_rate', 'partition', repeat('t', 300), 'rate', 5, 'per', 3600,
                                       'burst', 5)));
SELECT gate, octet_length(partition) AS key_bytes, in_flight FROM dispatch_policy.read_counters('long_keys',
  jsonb_build_array(jsonb_build_object('gate', 'per_tenant', 'partition', repeat('t', 300))));
SELECT gate, octet_length(partition) AS key_bytes, current_max FROM dispatch_policy.read_adaptive('long_keys',
  jsonb_build_array(jsonb_build_object('gate', 'tenant_adaptive', 'partition', repeat('t', 300), 'initial_max', 2)));
SELECT dispatch_policy.admit('long_keys',
  jsonb_build_array(jsonb_build_object('id', 15, 'slots', jsonb_build_object('per_tenant', repeat('t', 300),
                                                                             'tenant_adaptive', repeat('t', 300)))),
  jsonb_build_array(jsonb_build_object('gate', 'tenant_rate', 'partition', repeat('t', 300), 'tokens', 1)));
COMMIT;

-- mailer: 17 is handed to the sql target; 18 waits.
BEGIN;
SELECT dispatch_policy.try_lock_policy('mailer');
SELECT count(*) FROM dispatch_policy.refill_buckets('mailer',
  '[{"gate": "per_domain", "partition": "x.org", "rate": 100, "per": 1, "burst": 100}]');
SELECT dispatch_policy.admit('mailer', '[{"id": 17, "slots": {}}]',
                             '[{"gate": "per_domain", "partition": "x.org", "tokens": 1}]');
COMMIT;
SELECT * FROM public.upgrade_outbox;

-- Workers. w1 claims 11 (priority -1), 1 and 2; 2 completes (acct:a gives
-- a slot back); 1 stays started, holding its dedupe key.
SELECT id, policy, attempt FROM dispatch_policy.claim('default', 'w1', 3) ORDER BY id;
SELECT dispatch_policy.complete(2);
-- The 0.1.0 runner folds the observation of 2 into the adaptive state.
BEGIN;
SELECT dispatch_policy.try_lock_policy('webhooks');
CREATE TEMP TABLE taken ON COMMIT DROP AS
SELECT * FROM dispatch_policy.take_observations('webhooks', 'adaptive_concurrency');
SELECT partition, success FROM taken;
SELECT dispatch_policy.save_adaptive('webhooks', (
  SELECT jsonb_agg(jsonb_build_object('gate', 'adaptive_concurrency', 'partition', t.partition, 'current_max', 3,
                                      'ewma_lag_ms', t.lag_ms, 'observations', 1, 'failures', 0,
                                      'last_observed_at', t.observed_at))
  FROM taken t));
COMMIT;
-- w2 claims 4 and 5; 4 fails and is re-staged as attempt 2, due at once
-- (its failure is observed, not folded yet); 10 fails for good
-- (max_attempts 1) without having started; 12 stays admitted, unclaimed.
SELECT id, policy, attempt FROM dispatch_policy.claim('default', 'w2', 2) ORDER BY id;
SELECT dispatch_policy.fail(4, 'boom', interval '0 seconds');
SELECT dispatch_policy.fail(10, 'fatal');
SELECT dispatch_policy.heartbeat(11) > now() AS extended;

-- Every row of the tables 0.1.0 has, as JSON, keyed (gate state by the
-- first 64 characters of its partition, which a fitted key keeps).
CREATE TEMP VIEW rows_now AS
SELECT 'policies' AS tbl, p.name AS key, to_jsonb(p) AS row FROM dispatch_policy.policies p
UNION ALL SELECT 'staged_jobs', s.id::text, to_jsonb(s) FROM dispatch_policy.staged_jobs s
UNION ALL SELECT 'admitted_jobs', a.id::text, to_jsonb(a) FROM dispatch_policy.admitted_jobs a
UNION ALL SELECT 'finished_jobs', f.id::text, to_jsonb(f) FROM dispatch_policy.finished_jobs f
UNION ALL SELECT 'job_failures', j.id::text, to_jsonb(j) FROM dispatch_policy.job_failures j
UNION ALL SELECT 'dedupe_keys', d.policy || '/' || d.dedupe_key, to_jsonb(d) FROM dispatch_policy.dedupe_keys d
UNION ALL SELECT 'throttle_buckets', b.policy || '/' || b.gate || '/' || left(b.partition, 64), to_jsonb(b)
          FROM dispatch_policy.throttle_buckets b
UNION ALL SELECT 'inflight_counters', c.policy || '/' || c.gate || '/' || left(c.partition, 64), to_jsonb(c)
          FROM dispatch_policy.inflight_counters c
UNION ALL SELECT 'adaptive_stats', s.policy || '/' || s.gate || '/' || left(s.partition, 64), to_jsonb(s)
          FROM dispatch_policy.adaptive_stats s
UNION ALL SELECT 'observations', o.id::text, to_jsonb(o) FROM dispatch_policy.observations o
UNION ALL SELECT 'observation_minutes', m.policy || '/' || m.gate || '/' || left(m.partition, 64) || '/' || m.minute, to_jsonb(m)
          FROM dispatch_policy.observation_minutes m
UNION ALL SELECT 'round_robin_cursors', r.policy, to_jsonb(r) FROM dispatch_policy.round_robin_cursors r
UNION ALL SELECT 'job_ids', 'last_value', to_jsonb(last_value) FROM dispatch_policy.job_ids;
CREATE TEMP TABLE before_update AS SELECT * FROM rows_now;
SELECT tbl, count(*) AS rows FROM before_update GROUP BY 1 ORDER BY 1;
SELECT s.policy, s.id, s.attempt, s.context ->> 'account_id' AS account, s.context ->> 'endpoint_id' AS endpoint,
       s.dedupe_key, s.not_before IS NOT NULL AS scheduled, s.last_error
FROM dispatch_policy.staged_jobs s ORDER BY s.id;
SELECT a.policy, a.id, a.partitions ->> 'concurrency' AS concurrency, a.worker, a.started_at IS NOT NULL AS started,
       a.dedupe_key
FROM dispatch_policy.admitted_jobs a ORDER BY a.id;
SELECT f.policy, f.id, f.status, f.attempts, f.last_error FROM dispatch_policy.finished_jobs f ORDER BY f.id;
SELECT c.policy, c.gate, left(c.partition, 10) AS partition, c.in_flight
FROM dispatch_policy.inflight_counters c ORDER BY 1, 2, 3;

-- ---------------------------------------------------------------------------
-- The update.

ALTER EXTENSION dispatch_policy UPDATE;
SELECT e.extversion = v.default_version AS at_default_version
FROM pg_extension e JOIN pg_available_extensions v ON v.name = e.extname
WHERE e.extname = 'dispatch_policy';

-- Every row 0.1.0 left is still there with the values it had (columns may
-- have been added, and the admitted jobs' partitions now hold every gate's
-- partition, not only their slots: see below), but for these changes: keys
-- longer than 256 bytes are stored fitted (below); the pending job of
-- mailer, a policy with partitioned gates and no round_robin_by, has the
-- lane later versions give such a job.
SELECT b.tbl, left(b.key, 20) AS key,
       coalesce((SELECT array_agg(k.key ORDER BY k.key) FROM jsonb_each(b.row) AS k WHERE a.row -> k.key IS DISTINCT FROM k.value),
                '{missing}') AS changed
FROM before_update b
LEFT JOIN rows_now a ON a.tbl = b.tbl AND a.key = b.key
WHERE a.row IS NULL OR NOT a.row @> b.row
ORDER BY 1, 2;
-- Keys longer than 256 bytes, as later versions store them, in every place
-- 0.1.0 kept one: the lane, the gate state, the job's slots.
SELECT 'round_robin_key' AS place, s.id::text AS row, s.round_robin_key = dispatch_policy._fit_key(repeat('t', 300)) AS fitted
FROM dispatch_policy.staged_jobs s WHERE s.policy = 'long_keys'
UNION ALL SELECT 'lanes', 'lane', l.lane = dispatch_policy._fit_key(repeat('t', 300))
FROM dispatch_policy.lanes l WHERE l.policy = 'long_keys'
UNION ALL SELECT 'throttle_buckets', b.gate, b.partition = dispatch_policy._fit_key(repeat('t', 300))
FROM dispatch_policy.throttle_buckets b WHERE b.policy = 'long_keys'
UNION ALL SELECT 'inflight_counters', c.gate, c.partition = dispatch_policy._fit_key(repeat('t', 300))
FROM dispatch_policy.inflight_counters c WHERE c.policy = 'long_keys'
UNION ALL SELECT 'adaptive_stats', s.gate, s.partition = dispatch_policy._fit_key(repeat('t', 300))
FROM dispatch_policy.adaptive_stats s WHERE s.policy = 'long_keys'
UNION ALL SELECT 'admitted_jobs', a.id || ' ' || k.key, k.value = dispatch_policy._fit_key(repeat('t', 300))
FROM dispatch_policy.admitted_jobs a, jsonb_each_text(a.partitions) k WHERE a.policy = 'long_keys'
ORDER BY 1, 2;

-- What the later migrations added, filled in from the rows.
SELECT p.name, p.paused, p.lane_template, p.partition_gates FROM dispatch_policy.policies p ORDER BY 1;
SELECT s.id, s.round_robin_key, s.partitions FROM dispatch_policy.staged_jobs s WHERE s.policy <> 'long_keys'
ORDER BY s.id;
SELECT a.id, a.lease_seconds, a.target, a.partitions FROM dispatch_policy.admitted_jobs a WHERE a.policy <> 'long_keys'
ORDER BY a.id;
SELECT l.policy, l.lane, l.blocked_until IS NOT NULL AS blocked FROM dispatch_policy.lanes l
WHERE l.policy <> 'long_keys' ORDER BY 1, 2;

-- The counters later migrations keep, against the rows: jobs per policy
-- (policy_overview, from policy_counters and the deltas), the history the
-- job tables still tell (stat_minutes), staged and admitted jobs per gate
-- partition (partition_pending from partition_counters and the deltas;
-- partition_overview).
CREATE TEMP VIEW per_policy AS
SELECT o.policy, o.pending, o.scheduled, o.in_flight, o.dead,
       (o.pending, o.scheduled, o.in_flight, o.dead) = (
         (SELECT count(*) FROM dispatch_policy.staged_jobs s
          WHERE s.policy = o.policy AND (s.not_before IS NULL OR s.not_before <= now())),
         (SELECT count(*) FROM dispatch_policy.staged_jobs s WHERE s.policy = o.policy AND s.not_before > now()),
         (SELECT count(*) FROM dispatch_policy.admitted_jobs a WHERE a.policy = o.policy),
         (SELECT count(*) FROM dispatch_policy.finished_jobs f WHERE f.policy = o.policy AND f.status = 'dead')) AS exact
FROM dispatch_policy.policy_overview o;
SELECT * FROM per_policy ORDER BY 1;
-- 0020 set each policy's latest staging from the jobs staged then.
SELECT c.policy, c.last_staged_at IS NOT DISTINCT FROM (SELECT max(s.staged_at) FROM dispatch_policy.staged_jobs s
                                                      WHERE s.policy = c.policy) AS last_staged_ok
FROM dispatch_policy.policy_counters c ORDER BY 1;
SELECT h.policy, sum(h.completed) AS completed, sum(h.failed) AS failed, sum(h.dead) AS dead,
       sum(h.lag_count) AS started
FROM (SELECT m.policy, m.completed, m.failed, m.dead, m.lag_count FROM dispatch_policy.stat_minutes m WHERE m.gate = ''
      UNION ALL
      SELECT d.policy, d.completed, d.failed, d.dead, d.lag_count FROM dispatch_policy.stat_deltas d WHERE d.gate = '') h
GROUP BY 1 ORDER BY 1;
-- Every job's partition of every partitioned gate, rendered from its
-- context as the runner renders it, for jobs staged and admitted.
CREATE TEMP VIEW truth AS
SELECT x.policy, k.key AS gate, k.value AS partition,
       count(*) FILTER (WHERE x.staged) AS pending, count(*) FILTER (WHERE NOT x.staged) AS in_flight
FROM (SELECT s.policy, s.context, true AS staged FROM dispatch_policy.staged_jobs s
      UNION ALL SELECT a.policy, a.context, false FROM dispatch_policy.admitted_jobs a) x
JOIN dispatch_policy.policies p ON p.name = x.policy
CROSS JOIN LATERAL jsonb_each_text(dispatch_policy._gate_partitions(p.config, x.context)) AS k
WHERE dispatch_policy._partitioned_gate(p.config, k.key) IS NOT NULL
GROUP BY 1, 2, 3;
-- What partition_pending and partition_overview say of them; rows where
-- they disagree with the truth (none), then the partitions, counted.
CREATE TEMP VIEW per_partition AS
SELECT t.policy, t.gate, left(t.partition, 10) AS partition, t.pending, r.pending AS said_pending,
       t.in_flight, o.in_flight AS said_in_flight
FROM truth t
CROSS JOIN LATERAL dispatch_policy.partition_pending(t.policy, t.gate, ARRAY[t.partition]) r
LEFT JOIN dispatch_policy.partition_overview o ON (o.policy, o.gate, o.partition) = (t.policy, t.gate, t.partition);
SELECT * FROM per_partition WHERE pending <> said_pending OR in_flight IS DISTINCT FROM said_in_flight ORDER BY 1, 2, 3;
SELECT policy, count(*) AS partitions, sum(pending) AS pending, sum(in_flight) AS in_flight
FROM per_partition GROUP BY 1 ORDER BY 1;
SELECT (SELECT count(*) FROM dispatch_policy.partition_counters c WHERE c.pending <> 0
          AND NOT EXISTS (SELECT 1 FROM truth t WHERE (t.policy, t.gate, t.partition) = (c.policy, c.gate, c.partition)))
       AS counted_without_jobs,
       (SELECT bool_and(s.partitions = (
                 SELECT coalesce(jsonb_object_agg(k.key, k.value), '{}'::jsonb)
                 FROM jsonb_each_text(dispatch_policy._gate_partitions(p.config, s.context)) AS k
                 WHERE dispatch_policy._partitioned_gate(p.config, k.key) IS NOT NULL))
        FROM dispatch_policy.staged_jobs s JOIN dispatch_policy.policies p ON p.name = s.policy) AS stored_partitions_ok;
-- In-flight counters against the admitted jobs, dedupe keys, buckets,
-- orphans: nothing to report.
SELECT * FROM dispatch_policy.check();

-- ---------------------------------------------------------------------------
-- Ticks of the new API: tick_begin, tick_state, tick_finish, the gates
-- evaluated here as the runner evaluates them (in fetch order; each job's
-- partitions rendered as the runner renders them; against the state
-- tick_state returns; a job is admitted when every gate has room for it
-- after the jobs admitted before it in the batch). Observations are left
-- for the runner to fold.
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
  -- Numbers only (no context values here); per defaults to 1, burst to
  -- the rate (at least 1), as in the runner.
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

-- webhooks: the state 0.1.0 left decides. acct:a holds 1 of 2, e1 has no
-- token left, the global cap 2 of 4. The retry of 4 is promoted (its time
-- has come); 3 and 6 are admitted (6 fills the global cap); 4 waits for a
-- token of e1, 8 for a slot of acct:a, 7 for 2100.
SELECT * FROM pg_temp.run_tick('webhooks');
SELECT x.kind, x.gate, x.partition, floor(x.tokens) AS whole_tokens, x.in_flight, x.current_max
FROM tick_state x ORDER BY 1, 2, 3;
-- long_keys: 15 holds the tenant's one slot under the fitted key, so 16
-- waits; the tenant's bucket kept its level (4 of 5).
SELECT * FROM pg_temp.run_tick('long_keys');
SELECT x.kind, x.gate, floor(x.tokens) AS whole_tokens, x.in_flight, x.current_max FROM tick_state x ORDER BY 1, 2;
-- mailer: 18 is handed to the sql target; held is paused.
SELECT * FROM pg_temp.run_tick('mailer');
SELECT * FROM public.upgrade_outbox ORDER BY id;
SELECT * FROM pg_temp.run_tick('held');

-- Where every job is now, and the gate state: the new admissions hold
-- their slots next to the 0.1.0 ones.
SELECT 'staged' AS state, s.policy, s.id, s.attempt, s.not_before IS NOT NULL AS scheduled
FROM dispatch_policy.staged_jobs s
UNION ALL SELECT 'admitted', a.policy, a.id, a.attempt, NULL FROM dispatch_policy.admitted_jobs a
UNION ALL SELECT f.status, f.policy, f.id, f.attempts, NULL FROM dispatch_policy.finished_jobs f
ORDER BY 3;
SELECT c.policy, c.gate, left(c.partition, 10) AS partition, c.in_flight
FROM dispatch_policy.inflight_counters c WHERE c.in_flight > 0 ORDER BY 1, 2, 3;
SELECT * FROM per_policy ORDER BY 1;
SELECT * FROM per_partition WHERE pending <> said_pending OR in_flight IS DISTINCT FROM said_in_flight ORDER BY 1, 2, 3;
SELECT * FROM dispatch_policy.check();

-- Workers of the new API finish what 0.1.0 admitted: the dedupe key of 1
-- is held until 1 completes, and free then.
SELECT dispatch_policy.stage('webhooks', '{}', '{"account_id": "d", "endpoint_id": "e5"}', dedupe_key => 'order-1');
SELECT dispatch_policy.complete(1, attempt => 1);
SELECT dispatch_policy.stage('webhooks', '{}', '{"account_id": "d", "endpoint_id": "e5"}', dedupe_key => 'order-1')
       IS NOT NULL AS staged;
SELECT id, policy, attempt FROM dispatch_policy.claim('default', 'w3', 10) ORDER BY id;
SELECT dispatch_policy.complete(id, attempt => 1) FROM (VALUES (3), (5), (12), (15)) AS x(id);
SELECT * FROM per_policy ORDER BY 1;
SELECT * FROM dispatch_policy.check();

-- ---------------------------------------------------------------------------
-- The catalog of the updated extension is that of a fresh install: tables
-- and their columns (position, type, default, not null, generated,
-- identity), constraints, indexes, triggers, functions (signature, result,
-- body, volatility, strictness, security, parallel safety, settings),
-- views, sequences, types, rules, policies, comments on all of them,
-- privileges, the extension's members and what it marks for pg_dump.
CREATE TEMP VIEW catalog AS
WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = 'dispatch_policy'),
     ext AS (SELECT * FROM pg_extension WHERE extname = 'dispatch_policy')
SELECT 'schema' AS kind, n.nspname AS object,
       concat_ws(' ', n.nspacl::text, '--', obj_description(n.oid, 'pg_namespace')) AS description
FROM pg_namespace n WHERE n.oid = (SELECT oid FROM ns)
UNION ALL
SELECT 'relation', c.relname,
       concat_ws(' ', c.relkind, c.relpersistence, c.relreplident, c.relrowsecurity, c.relforcerowsecurity,
                 array_to_string(c.reloptions, ','), c.relacl::text, '--', obj_description(c.oid, 'pg_class'))
FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'column', c.relname || '.' || a.attname,
       concat_ws(' ', row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum), format_type(a.atttypid, a.atttypmod),
                 CASE WHEN a.attnotnull THEN 'not null' END, nullif(a.attidentity, ''), nullif(a.attgenerated, ''),
                 'default ' || pg_get_expr(d.adbin, d.adrelid), 'collate ' || nullif(a.attcollation, 0)::regcollation,
                 a.attacl::text, '--', col_description(c.oid, a.attnum))
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = (SELECT oid FROM ns) AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', co.conrelid::regclass::text || '.' || co.conname,
       concat_ws(' ', co.contype, pg_get_constraintdef(co.oid), CASE WHEN NOT co.convalidated THEN 'not valid' END,
                 CASE WHEN co.condeferrable THEN 'deferrable' END, '--', obj_description(co.oid, 'pg_constraint'))
FROM pg_constraint co WHERE co.connamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'index', i.indexrelid::regclass::text,
       concat_ws(' ', pg_get_indexdef(i.indexrelid), CASE WHEN NOT i.indisvalid THEN 'invalid' END)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relnamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'trigger', t.tgrelid::regclass::text || '.' || t.tgname,
       concat_ws(' ', pg_get_triggerdef(t.oid), t.tgenabled, '--', obj_description(t.oid, 'pg_trigger'))
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = (SELECT oid FROM ns) AND NOT t.tgisinternal
UNION ALL
SELECT 'function', p.oid::regprocedure::text,
       concat_ws(' ', 'returns', pg_get_function_result(p.oid), 'args', pg_get_function_arguments(p.oid), p.prokind,
                 (SELECT l.lanname FROM pg_language l WHERE l.oid = p.prolang), p.provolatile, p.proisstrict,
                 p.prosecdef, p.proleakproof, p.proparallel, p.procost, p.prorows, array_to_string(p.proconfig, ','),
                 md5(p.prosrc), p.proacl::text, '--', obj_description(p.oid, 'pg_proc'))
FROM pg_proc p WHERE p.pronamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'view', v.viewname, md5(v.definition) FROM pg_views v WHERE v.schemaname = 'dispatch_policy'
UNION ALL
SELECT 'sequence', s.seqrelid::regclass::text,
       concat_ws(' ', format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache,
                 s.seqcycle,
                 (SELECT 'owned by ' || dc.relname || '.' || da.attname
                  FROM pg_depend dp JOIN pg_class dc ON dc.oid = dp.refobjid
                  JOIN pg_attribute da ON da.attrelid = dp.refobjid AND da.attnum = dp.refobjsubid
                  WHERE dp.classid = 'pg_class'::regclass AND dp.objid = s.seqrelid AND dp.deptype IN ('a', 'i')))
FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid WHERE c.relnamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'type', t.typname,
       concat_ws(' ', t.typtype, format_type(t.typbasetype, t.typtypmod),
                 (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid),
                 '--', obj_description(t.oid, 'pg_type'))
FROM pg_type t WHERE t.typnamespace = (SELECT oid FROM ns)
  AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c') AND t.typelem = 0
UNION ALL
SELECT 'rule', r.tablename || '.' || r.rulename, md5(r.definition) FROM pg_rules r WHERE r.schemaname = 'dispatch_policy'
UNION ALL
SELECT 'policy', p.tablename || '.' || p.policyname, concat_ws(' ', p.cmd, p.roles::text, p.qual, p.with_check)
FROM pg_policies p WHERE p.schemaname = 'dispatch_policy'
UNION ALL
SELECT 'statistics', s.stxname, pg_get_statisticsobjdef(s.oid)
FROM pg_statistic_ext s WHERE s.stxnamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'member', pg_describe_object(d.classid, d.objid, d.objsubid), ''
FROM pg_depend d WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = (SELECT oid FROM ext) AND d.deptype = 'e'
UNION ALL
SELECT 'dumped', c.relname, x.condition
FROM ext, unnest(ext.extconfig, ext.extcondition) AS x(config, condition) JOIN pg_class c ON c.oid = x.config
UNION ALL
SELECT 'extension', e.extname, concat_ws(' ', e.extrelocatable, e.extnamespace::regnamespace, e.extowner::regrole)
FROM ext e;

CREATE TEMP TABLE catalog_updated AS SELECT * FROM catalog;
SET client_min_messages = warning;
DROP EXTENSION dispatch_policy CASCADE;
RESET client_min_messages;
CREATE EXTENSION dispatch_policy;
CREATE TEMP TABLE catalog_fresh AS SELECT * FROM catalog;
-- What each description covers (every kind that exists has rows) ...
SELECT kind, count(*) > 0 AS described FROM catalog_fresh GROUP BY 1 ORDER BY 1;
-- ... and what differs: nothing.
(SELECT 'only updated' AS side, * FROM catalog_updated EXCEPT SELECT 'only updated', * FROM catalog_fresh)
UNION ALL
(SELECT 'only fresh', * FROM catalog_fresh EXCEPT SELECT 'only fresh', * FROM catalog_updated)
ORDER BY 2, 3, 1;

-- Later tests start from their own CREATE EXTENSION.
SET client_min_messages = warning;
DROP EXTENSION dispatch_policy CASCADE;
DROP FUNCTION public.upgrade_outbox(bigint, text, jsonb, jsonb);
DROP TABLE public.upgrade_outbox;
RESET client_min_messages;
