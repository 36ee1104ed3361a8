-- dispatch-policy: check() and repair().
--
-- The state of a job and of its gates is spread over tables that every
-- writer changes together: a job is in exactly one of staged_jobs,
-- admitted_jobs and finished_jobs; an in-flight counter is the number of
-- admitted jobs holding a slot in its partition; a dedupe key is held while
-- its job is pending or admitted; gate state exists only for gates the
-- policy has. Each writer is one transaction, so a crash cannot break this,
-- but a hand edit, a partial restore or a bug can. check() lists every such
-- inconsistency; repair() fixes all of them in one transaction and returns
-- what it changed.
--
-- The rules are the ones the writers use, not copies: the slot a job holds
-- is what the redeclare (_rebuild_gate_state) computes, _gate_partitions of
-- the job's context under the policy's current config for the gates
-- _slot_gates names; a bucket's level is _bucket_tokens; orphaned gate state
-- is what prune() and the redeclare delete.

-- Every slot each in-flight job holds under its policy's current config,
-- with the partition the job recorded at admission. A job that is also in
-- finished_jobs holds nothing (repair keeps the finished copy).
CREATE FUNCTION dispatch_policy._job_slots()
RETURNS TABLE (job_id bigint, policy text, gate text, partition text, recorded text)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  WITH slot_gates AS MATERIALIZED (
    SELECT p.name, p.config, dispatch_policy._slot_gates(p.config) AS gates
    FROM dispatch_policy.policies p
  )
  SELECT a.id, a.policy, s.key, s.value, a.partitions ->> s.key
  FROM slot_gates g
  JOIN dispatch_policy.admitted_jobs a ON a.policy = g.name
  -- In FROM, the call can be memoized per distinct context.
  CROSS JOIN LATERAL jsonb_each_text(dispatch_policy._gate_partitions(g.config, a.context)) AS s
  WHERE cardinality(g.gates) > 0 AND s.key = ANY (g.gates)
    AND NOT EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f WHERE f.id = a.id)
$$;
COMMENT ON FUNCTION dispatch_policy._job_slots() IS
  'Internal: every (gate, partition) slot each admitted, unfinished job holds under its policy''s current config (_gate_partitions for the _slot_gates, as a redeclare computes them), with the partition the job recorded (admitted_jobs.partitions).';

-- From one pass over the in-flight jobs: the slots a job records otherwise
-- than its config gives (job_slot_mismatch), and the counters of current
-- slot gates that differ from the slots held (counter_mismatch), or are
-- missing where jobs hold slots (counter_missing).
CREATE FUNCTION dispatch_policy._slot_findings()
RETURNS TABLE (finding text, policy text, gate text, partition text, job_id bigint, recorded text, counted integer,
               held integer)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  WITH slots AS MATERIALIZED (
    SELECT * FROM dispatch_policy._job_slots()
  ), held AS (
    SELECT s.policy, s.gate, s.partition, count(*)::integer AS n FROM slots s GROUP BY 1, 2, 3
  ), counters AS (
    SELECT c.policy, c.gate, c.partition, c.in_flight
    FROM dispatch_policy.inflight_counters c
    JOIN dispatch_policy.policies p ON p.name = c.policy
    WHERE c.gate = ANY (dispatch_policy._slot_gates(p.config))
  )
  SELECT 'job_slot_mismatch'::text, s.policy, s.gate, s.partition, s.job_id, s.recorded, NULL::integer, NULL::integer
  FROM slots s
  WHERE s.recorded IS DISTINCT FROM s.partition
  UNION ALL
  SELECT CASE WHEN c.in_flight IS NULL THEN 'counter_missing' ELSE 'counter_mismatch' END,
         coalesce(c.policy, h.policy), coalesce(c.gate, h.gate), coalesce(c.partition, h.partition), NULL, NULL,
         c.in_flight, coalesce(h.n, 0)
  FROM counters c
  FULL JOIN held h ON h.policy = c.policy AND h.gate = c.gate AND h.partition = c.partition
  WHERE c.in_flight IS DISTINCT FROM coalesce(h.n, 0)
$$;
COMMENT ON FUNCTION dispatch_policy._slot_findings() IS
  'Internal: in one pass over the admitted jobs (_job_slots): job_slot_mismatch rows (a job records another partition than its current config gives, for a slot-holding gate), counter_mismatch rows (a counter of a current slot-holding gate says counted, held jobs hold a slot there) and counter_missing rows (no counter row, held jobs hold a slot there).';

-- Jobs present in more than one of the three job tables.
CREATE FUNCTION dispatch_policy._jobs_in_two_states()
RETURNS TABLE (job_id bigint, policy text, staged boolean, admitted boolean, finished text)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  SELECT x.id, coalesce(f.policy, a.policy, s.policy), s.id IS NOT NULL, a.id IS NOT NULL, f.status
  FROM (
    SELECT s2.id FROM dispatch_policy.staged_jobs s2
    WHERE EXISTS (SELECT 1 FROM dispatch_policy.admitted_jobs a2 WHERE a2.id = s2.id)
       OR EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f2 WHERE f2.id = s2.id)
    UNION
    SELECT a2.id FROM dispatch_policy.admitted_jobs a2
    WHERE EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f2 WHERE f2.id = a2.id)
  ) x
  LEFT JOIN dispatch_policy.staged_jobs s ON s.id = x.id
  LEFT JOIN dispatch_policy.admitted_jobs a ON a.id = x.id
  LEFT JOIN dispatch_policy.finished_jobs f ON f.id = x.id
$$;
COMMENT ON FUNCTION dispatch_policy._jobs_in_two_states() IS
  'Internal: jobs whose id is in more than one of staged_jobs, admitted_jobs and finished_jobs: where they are, and the status of the finished copy.';

-- A throttle gate's burst when the config fixes it: the burst number, or
-- without one the rate number, at least 1 (README: burst defaults to
-- max(rate, 1)). NULL when it comes from each job's context.
CREATE FUNCTION dispatch_policy._throttle_burst(gate jsonb)
RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE
    WHEN gate ? 'burst' THEN dispatch_policy._json_number(gate -> 'burst')::double precision
    WHEN jsonb_typeof(gate -> 'rate') = 'number' THEN greatest(dispatch_policy._json_number(gate -> 'rate'), 1)::double precision
  END
$$;
COMMENT ON FUNCTION dispatch_policy._throttle_burst(jsonb) IS
  'Internal: the burst a throttle gate config fixes (its burst, else max(rate, 1)); NULL when the burst or the rate is read from each job''s context.';

-- Buckets of current throttle gates whose tokens are not a number, below 0,
-- or above the burst. The burst is the config's when it fixes one and the
-- bucket was refilled since the config last changed; before that refill the
-- bucket keeps the burst it was refilled with (a redeclare keeps buckets,
-- and their next refill clamps them to the new burst).
-- (_bucket_problems: its one definition in 0.2.0 is in 0025_shadow.sql.)

-- Dedupe keys nobody should hold, and jobs whose key nobody holds. A key is
-- held from staging until the job completes or dies, through retries: by a
-- job in staged_jobs or admitted_jobs, of the same policy and key.
CREATE FUNCTION dispatch_policy._dedupe_problems()
RETURNS TABLE (problem text, policy text, dedupe_key text, job_id bigint, job_state text, job_key text)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  WITH live AS (
    SELECT a.id, a.policy, a.dedupe_key, 'admitted'::text AS state
    FROM dispatch_policy.admitted_jobs a
    WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f WHERE f.id = a.id)
    UNION ALL
    SELECT s.id, s.policy, s.dedupe_key, 'staged'::text
    FROM dispatch_policy.staged_jobs s
    WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.admitted_jobs a WHERE a.id = s.id)
      AND NOT EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f WHERE f.id = s.id)
  ), keys AS (
    SELECT d.policy, d.dedupe_key, d.job_id, f.status AS finished, l.id AS live_id, l.policy AS live_policy,
           l.dedupe_key AS live_key, l.state AS live_state,
           -- live holds no finished job: a job in finished_jobs holds no key.
           l.id IS NOT NULL AND l.policy = d.policy AND l.dedupe_key IS NOT DISTINCT FROM d.dedupe_key AS held
    FROM dispatch_policy.dedupe_keys d
    LEFT JOIN dispatch_policy.finished_jobs f ON f.id = d.job_id
    LEFT JOIN live l ON l.id = d.job_id
  )
  SELECT CASE WHEN k.finished IS NOT NULL THEN 'dedupe_key_of_finished_job'
              WHEN k.live_id IS NULL THEN 'dedupe_key_without_job'
              ELSE 'dedupe_key_mismatch' END,
         k.policy, k.dedupe_key, k.job_id, coalesce(k.finished, k.live_state), k.live_key
  FROM keys k
  WHERE NOT k.held
  UNION ALL
  SELECT * FROM (
    SELECT DISTINCT ON (l.policy, l.dedupe_key)
           'dedupe_key_missing'::text, l.policy, l.dedupe_key, l.id, l.state, l.dedupe_key
    FROM live l
    WHERE l.dedupe_key IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM keys k WHERE k.policy = l.policy AND k.dedupe_key = l.dedupe_key AND k.held)
    ORDER BY l.policy, l.dedupe_key, l.id
  ) m
$$;
COMMENT ON FUNCTION dispatch_policy._dedupe_problems() IS
  'Internal: dedupe_keys rows held by a finished job (dedupe_key_of_finished_job), by an id in no job table (dedupe_key_without_job) or by a pending or admitted job of another policy or key (dedupe_key_mismatch); and, once per policy and key, a pending or admitted job whose key no such job holds (dedupe_key_missing).';

-- Rows of gone policies and gone gates: gate state (what prune() and a
-- redeclare delete), unfolded observations, and per-policy rows. Per-minute
-- aggregates are history of gates that existed (prune() ages them out), so
-- only those of a policy that no longer exists are orphans.
CREATE FUNCTION dispatch_policy._orphaned_state()
RETURNS TABLE (finding text, tbl text, policy text, gate text, partition text, rows bigint, in_flight integer, reason text)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  SELECT 'orphaned_gate_state'::text, 'throttle_buckets'::text, t.policy, t.gate, t.partition, 1::bigint, NULL::integer,
         CASE WHEN p.name IS NULL THEN 'the policy does not exist'
              ELSE format('the policy has no throttle gate %I', t.gate) END
  FROM dispatch_policy.throttle_buckets t
  LEFT JOIN dispatch_policy.policies p ON p.name = t.policy
  WHERE p.name IS NULL OR NOT (t.gate = ANY (dispatch_policy._gates_of_type(p.config, 'throttle')))
  UNION ALL
  SELECT 'orphaned_gate_state', 'inflight_counters', c.policy, c.gate, c.partition, 1, c.in_flight,
         CASE WHEN p.name IS NULL THEN 'the policy does not exist'
              ELSE format('the policy has no concurrency, global_cap or adaptive_concurrency gate %I', c.gate) END
  FROM dispatch_policy.inflight_counters c
  LEFT JOIN dispatch_policy.policies p ON p.name = c.policy
  WHERE p.name IS NULL OR NOT (c.gate = ANY (dispatch_policy._slot_gates(p.config)))
  UNION ALL
  SELECT 'orphaned_gate_state', 'adaptive_stats', a.policy, a.gate, a.partition, 1, NULL,
         CASE WHEN p.name IS NULL THEN 'the policy does not exist'
              ELSE format('the policy has no adaptive_concurrency gate %I', a.gate) END
  FROM dispatch_policy.adaptive_stats a
  LEFT JOIN dispatch_policy.policies p ON p.name = a.policy
  WHERE p.name IS NULL OR NOT (a.gate = ANY (dispatch_policy._gates_of_type(p.config, 'adaptive_concurrency')))
  UNION ALL
  SELECT 'orphaned_observation', 'observations', o.policy, o.gate, o.partition, count(*), NULL,
         CASE WHEN p.name IS NULL THEN 'the policy does not exist'
              ELSE format('the policy has no adaptive_concurrency gate %I', o.gate) END
  FROM dispatch_policy.observations o
  LEFT JOIN dispatch_policy.policies p ON p.name = o.policy
  WHERE p.name IS NULL OR NOT (o.gate = ANY (dispatch_policy._gates_of_type(p.config, 'adaptive_concurrency')))
  GROUP BY o.policy, o.gate, o.partition, p.name, p.config
  UNION ALL
  SELECT 'orphaned_observation', 'observation_minutes', m.policy, m.gate, m.partition, count(*), NULL,
         'the policy does not exist'
  FROM dispatch_policy.observation_minutes m
  WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p WHERE p.name = m.policy)
  GROUP BY m.policy, m.gate, m.partition
  UNION ALL
  SELECT 'orphaned_policy_state', 'round_robin_cursors', r.policy, NULL, NULL, 1, NULL, 'the policy does not exist'
  FROM dispatch_policy.round_robin_cursors r
  WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p WHERE p.name = r.policy)
  UNION ALL
  SELECT 'orphaned_policy_state', 'runner_failures', r.policy, NULL, NULL, 1, NULL, 'the policy does not exist'
  FROM dispatch_policy.runner_failures r
  WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p WHERE p.name = r.policy)
$$;
COMMENT ON FUNCTION dispatch_policy._orphaned_state() IS
  'Internal: rows of policies that no longer exist or of gates their policy no longer has: throttle_buckets, inflight_counters, adaptive_stats (one row each), observations (per partition), observation_minutes of a policy that no longer exists (per partition; those of a removed gate are history that prune() ages out), round_robin_cursors and runner_failures.';

-- A token count for a message: three decimals at most.
CREATE FUNCTION dispatch_policy._tokens_text(tokens double precision)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE WHEN tokens > '-Infinity'::double precision AND tokens < 'Infinity'::double precision
              THEN trim_scale(round(tokens::numeric, 3))::text
              ELSE tokens::text END
$$;
COMMENT ON FUNCTION dispatch_policy._tokens_text(double precision) IS
  'Internal: a token count as check() and repair() print it (at most three decimals; NaN and infinities as such).';

-- check() lists these findings and repair() fixes them: both are defined
-- once in 0.2.0, in 0026_admit_integrity.sql, where they also compare
-- backlog_counters (0023) with the staged jobs.
