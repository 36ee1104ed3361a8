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
CREATE FUNCTION dispatch_policy._bucket_problems(now timestamptz)
RETURNS TABLE (policy text, gate text, partition text, problem text, tokens double precision, level double precision,
               burst double precision, stored_burst double precision, config_burst double precision)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  SELECT b.policy, b.gate, b.partition,
         CASE WHEN NOT (b.tokens > '-Infinity'::double precision AND b.tokens < 'Infinity'::double precision)
                THEN 'bucket_not_finite'
              WHEN l.level < 0 THEN 'bucket_negative_tokens'
              ELSE 'bucket_over_burst' END,
         b.tokens, l.level, l.burst, b.burst, l.config_burst
  FROM dispatch_policy.throttle_buckets b
  JOIN dispatch_policy.policies p ON p.name = b.policy
  CROSS JOIN LATERAL (
    SELECT g FROM jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
    WHERE g ->> 'type' = 'throttle' AND coalesce(g ->> 'name', g ->> 'type') = b.gate
    LIMIT 1
  ) cfg
  CROSS JOIN LATERAL (
    SELECT dispatch_policy._throttle_burst(cfg.g) AS config_burst
  ) c
  CROSS JOIN LATERAL (
    SELECT dispatch_policy._bucket_tokens(b.tokens, b.rate, b.per_seconds, b.burst, b.refilled_at, _bucket_problems.now) AS level,
           CASE WHEN b.refilled_at >= p.updated_at THEN coalesce(c.config_burst, b.burst) ELSE b.burst END AS burst,
           c.config_burst
  ) l
  WHERE NOT (b.tokens > '-Infinity'::double precision AND b.tokens < 'Infinity'::double precision)
     OR l.level < 0
     OR b.tokens > b.burst
     OR l.level > l.burst
$$;
COMMENT ON FUNCTION dispatch_policy._bucket_problems(timestamptz) IS
  'Internal: throttle buckets of current throttle gates whose tokens are NaN or infinite (bucket_not_finite), whose level at now (_bucket_tokens) is below 0 (bucket_negative_tokens) or above the burst (bucket_over_burst): the config''s fixed burst for buckets refilled since the config last changed, else the burst stored with the bucket. burst is that burst, stored_burst the bucket''s, config_burst the config''s (NULL when read from job contexts).';

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

CREATE FUNCTION dispatch_policy."check"(now timestamptz DEFAULT now())
RETURNS TABLE (finding text, policy text, gate text, partition_key text, job_id bigint, detail text)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  SELECT dispatch_policy._require_now(now);
  SELECT x.finding, x.policy, x.gate, x.partition_key, x.job_id, x.detail
  FROM (
    SELECT 'job_in_two_states'::text AS finding, d.policy, NULL::text AS gate, NULL::text AS partition_key, d.job_id,
           'in ' || array_to_string(ARRAY[CASE WHEN d.staged THEN 'staged_jobs' END,
                                          CASE WHEN d.admitted THEN 'admitted_jobs' END,
                                          CASE WHEN d.finished IS NOT NULL THEN 'finished_jobs (' || d.finished || ')' END],
                                    ' and ') AS detail
    FROM dispatch_policy._jobs_in_two_states() d
    UNION ALL
    SELECT s.finding, s.policy, s.gate, s.partition, s.job_id,
           CASE WHEN s.finding = 'job_slot_mismatch'
                THEN format('the job records %s, the current config gives %s',
                            coalesce('partition ' || quote_literal(s.recorded), 'no partition'), quote_literal(s.partition))
                ELSE format('%s, %s admitted job%s a slot here', coalesce('counter says ' || s.counted, 'no counter row'),
                            s.held, CASE WHEN s.held = 1 THEN ' holds' ELSE 's hold' END) END
    FROM dispatch_policy._slot_findings() s
    UNION ALL
    SELECT b.problem, b.policy, b.gate, b.partition, NULL,
           CASE b.problem
             WHEN 'bucket_not_finite' THEN format('tokens is %s', b.tokens)
             WHEN 'bucket_negative_tokens' THEN format('%s tokens now, below 0', dispatch_policy._tokens_text(b.level))
             ELSE format('%s tokens now, above the burst of %s',
                         dispatch_policy._tokens_text(greatest(b.tokens, b.level)), dispatch_policy._tokens_text(b.burst))
           END
    FROM dispatch_policy._bucket_problems(now) b
    UNION ALL
    SELECT k.problem, k.policy, NULL, NULL, k.job_id,
           CASE k.problem
             WHEN 'dedupe_key_of_finished_job' THEN format('key %L is still held by the job, which is %s', k.dedupe_key, k.job_state)
             WHEN 'dedupe_key_without_job' THEN format('key %L is held by a job that is in no job table', k.dedupe_key)
             WHEN 'dedupe_key_mismatch' THEN format('key %L is held by the job, which is %s with %s', k.dedupe_key,
                                                    k.job_state, coalesce('key ' || quote_literal(k.job_key), 'no key'))
             ELSE format('the job is %s with key %L, but nothing holds the key', k.job_state, k.dedupe_key)
           END
    FROM dispatch_policy._dedupe_problems() k
    UNION ALL
    SELECT o.finding, o.policy, o.gate, o.partition, NULL,
           CASE WHEN o.tbl IN ('observations', 'observation_minutes')
                THEN format('%s row%s of %s: %s', o.rows, CASE WHEN o.rows = 1 THEN '' ELSE 's' END, o.tbl, o.reason)
                ELSE format('%s row%s: %s', o.tbl, coalesce(' with in_flight ' || o.in_flight, ''), o.reason) END
    FROM dispatch_policy._orphaned_state() o
  ) x
  ORDER BY x.finding, x.policy, x.gate, x.partition_key, x.job_id, x.detail
$$;
COMMENT ON FUNCTION dispatch_policy."check"(timestamptz) IS
  'Lists every inconsistency of the stored state, one row each, none when it is consistent; changes nothing. finding is one of: job_in_two_states (a job id in two of staged_jobs, admitted_jobs, finished_jobs), job_slot_mismatch (an admitted job records another partition than its current config gives, for a slot-holding gate), counter_mismatch and counter_missing (an in-flight counter differs from the admitted jobs holding a slot there under the current config, or is missing), bucket_over_burst, bucket_negative_tokens, bucket_not_finite (throttle tokens above the burst, below 0, NaN or infinite at now), dedupe_key_of_finished_job, dedupe_key_without_job, dedupe_key_mismatch, dedupe_key_missing (a key held by a finished or unknown job or by a job with another key, or a pending or admitted job whose key nobody holds), orphaned_gate_state, orphaned_observation, orphaned_policy_state (rows of policies or gates that no longer exist). detail says what disagrees, with the numbers. Reads every job table and renders the partitions of every admitted job (as a redeclare does): for inspection, not for polling. dispatch_policy.repair() fixes all of it.';

CREATE FUNCTION dispatch_policy.repair(now timestamptz DEFAULT now())
RETURNS TABLE (finding text, policy text, gate text, partition_key text, job_id bigint, action text)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  policy_name text;
BEGIN
  PERFORM dispatch_policy._require_now(repair.now);

  -- No tick admits, refills or folds while the state is rebuilt: wait for
  -- each policy's running tick, in name order, as a redeclare does for one.
  FOR policy_name IN SELECT p.name FROM dispatch_policy.policies p ORDER BY p.name LOOP
    PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(policy_name));
  END LOOP;

  -- Jobs first, then gate state, as complete, fail and the reaper lock.
  -- Every admitted job is locked, in id order, as a redeclare locks those of
  -- its policy: a worker finishing one waits, and then releases its slots
  -- from the counters as repaired. (Claims skip them meanwhile.)
  PERFORM 1 FROM dispatch_policy.admitted_jobs a ORDER BY a.id FOR UPDATE;
  PERFORM 1 FROM dispatch_policy.staged_jobs s
  WHERE s.id IN (SELECT d.job_id FROM dispatch_policy._jobs_in_two_states() d WHERE d.staged)
  ORDER BY s.id
  FOR UPDATE;

  -- A job in two tables: the finished copy wins, else the admitted one (it
  -- holds slots, a worker may run it). The only copy of a job is never deleted.
  RETURN QUERY
  WITH twice AS MATERIALIZED (
    SELECT * FROM dispatch_policy._jobs_in_two_states()
  ), staged_copies AS (
    DELETE FROM dispatch_policy.staged_jobs s USING twice d WHERE s.id = d.job_id AND d.staged
  ), admitted_copies AS (
    DELETE FROM dispatch_policy.admitted_jobs a USING twice d
    WHERE a.id = d.job_id AND d.admitted AND d.finished IS NOT NULL
  )
  SELECT 'job_in_two_states'::text, d.policy, NULL::text, NULL::text, d.job_id,
         format('deleted the %s, kept the one in %s',
                CASE WHEN d.staged AND d.admitted AND d.finished IS NOT NULL THEN 'copies in staged_jobs and admitted_jobs'
                     WHEN d.staged THEN 'copy in staged_jobs'
                     ELSE 'copy in admitted_jobs' END,
                CASE WHEN d.finished IS NOT NULL THEN 'finished_jobs' ELSE 'admitted_jobs' END)
  FROM twice d;

  -- In-flight counters, every row locked in one statement sorted by
  -- (policy, gate, partition) (with the jobs locked, only prune could touch
  -- them). Then, from one pass over the jobs: the partitions recorded on
  -- admitted jobs recomputed under the current config, as a redeclare does,
  -- so completion releases the right slots; counters set to the slots held,
  -- missing ones inserted, those of gates that hold no slot deleted.
  PERFORM 1 FROM dispatch_policy.inflight_counters c ORDER BY c.policy, c.gate, c.partition FOR UPDATE;
  RETURN QUERY
  WITH found AS MATERIALIZED (
    SELECT * FROM dispatch_policy._slot_findings()
  ), orphans AS MATERIALIZED (
    SELECT * FROM dispatch_policy._orphaned_state() o WHERE o.tbl = 'inflight_counters'
  ), recomputed AS (
    UPDATE dispatch_policy.admitted_jobs a SET partitions = dispatch_policy._gate_partitions(p.config, a.context)
    FROM dispatch_policy.policies p
    WHERE p.name = a.policy AND a.id IN (SELECT f.job_id FROM found f WHERE f.finding = 'job_slot_mismatch')
  ), recounted AS (
    UPDATE dispatch_policy.inflight_counters c SET in_flight = f.held, updated_at = repair.now
    FROM found f
    WHERE f.finding = 'counter_mismatch' AND c.policy = f.policy AND c.gate = f.gate AND c.partition = f.partition
  ), inserted AS (
    INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight, updated_at)
    SELECT f.policy, f.gate, f.partition, f.held, repair.now FROM found f WHERE f.finding = 'counter_missing'
    ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT inflight_counters_pkey DO NOTHING
  ), deleted AS (
    DELETE FROM dispatch_policy.inflight_counters c USING orphans o
    WHERE c.policy = o.policy AND c.gate = o.gate AND c.partition = o.partition
  )
  SELECT f.finding, f.policy, f.gate, f.partition, f.job_id,
         CASE f.finding
           WHEN 'job_slot_mismatch'
             THEN format('set the job''s partition from %s to %s (all its partitions recomputed under the current config)',
                         coalesce(quote_literal(f.recorded), 'none'), quote_literal(f.partition))
           WHEN 'counter_missing' THEN format('inserted the counter with in_flight %s', f.held)
           ELSE format('set in_flight from %s to %s', f.counted, f.held) END
  FROM found f
  UNION ALL
  SELECT o.finding, o.policy, o.gate, o.partition, NULL::bigint,
         format('deleted the inflight_counters row (in_flight %s)', o.in_flight)
  FROM orphans o;

  -- Throttle buckets: locked in one sorted statement; clamped into
  -- [0, burst] at now (not a number: full), those of gone gates deleted.
  PERFORM 1 FROM dispatch_policy.throttle_buckets t
  WHERE (t.policy, t.gate, t.partition) IN (
    SELECT b.policy, b.gate, b.partition FROM dispatch_policy._bucket_problems(repair.now) b
    UNION ALL
    SELECT o.policy, o.gate, o.partition FROM dispatch_policy._orphaned_state() o WHERE o.tbl = 'throttle_buckets')
  ORDER BY t.policy, t.gate, t.partition
  FOR UPDATE;
  RETURN QUERY
  -- A repaired bucket counts as refilled now, so it takes the config's
  -- burst, as refill_buckets would.
  WITH problems AS MATERIALIZED (
    SELECT b.policy, b.gate, b.partition, b.problem, b.tokens, b.level, b.stored_burst, t.burst,
           CASE b.problem
             WHEN 'bucket_not_finite' THEN t.burst
             WHEN 'bucket_negative_tokens' THEN 0
             ELSE least(t.burst, b.level) END AS repaired
    FROM dispatch_policy._bucket_problems(repair.now) b
    CROSS JOIN LATERAL (SELECT coalesce(b.config_burst, b.stored_burst) AS burst) t
  ), orphans AS MATERIALIZED (
    SELECT * FROM dispatch_policy._orphaned_state() o WHERE o.tbl = 'throttle_buckets'
  ), clamped AS (
    UPDATE dispatch_policy.throttle_buckets t
    SET tokens = b.repaired, burst = b.burst, refilled_at = greatest(t.refilled_at, repair.now)
    FROM problems b
    WHERE t.policy = b.policy AND t.gate = b.gate AND t.partition = b.partition
  ), deleted AS (
    DELETE FROM dispatch_policy.throttle_buckets t USING orphans o
    WHERE t.policy = o.policy AND t.gate = o.gate AND t.partition = o.partition
  )
  SELECT b.problem, b.policy, b.gate, b.partition, NULL::bigint,
         format('set tokens from %s to %s%s',
                dispatch_policy._tokens_text(CASE WHEN b.problem = 'bucket_not_finite' THEN b.tokens
                                                  ELSE greatest(b.tokens, b.level) END),
                dispatch_policy._tokens_text(b.repaired),
                CASE WHEN b.burst IS DISTINCT FROM b.stored_burst
                     THEN format(' and burst from %s to %s', dispatch_policy._tokens_text(b.stored_burst),
                                 dispatch_policy._tokens_text(b.burst))
                     ELSE '' END)
  FROM problems b
  UNION ALL
  SELECT o.finding, o.policy, o.gate, o.partition, NULL::bigint, 'deleted the throttle_buckets row'
  FROM orphans o;

  -- Adaptive state and observations of gone gates, rows of gone policies.
  PERFORM 1 FROM dispatch_policy.adaptive_stats a
  WHERE (a.policy, a.gate, a.partition) IN (
    SELECT o.policy, o.gate, o.partition FROM dispatch_policy._orphaned_state() o WHERE o.tbl = 'adaptive_stats')
  ORDER BY a.policy, a.gate, a.partition
  FOR UPDATE;
  RETURN QUERY
  WITH orphans AS MATERIALIZED (
    SELECT * FROM dispatch_policy._orphaned_state() o
    WHERE o.tbl IN ('adaptive_stats', 'observations', 'observation_minutes', 'round_robin_cursors', 'runner_failures')
  ), stats AS (
    DELETE FROM dispatch_policy.adaptive_stats a USING orphans o
    WHERE o.tbl = 'adaptive_stats' AND a.policy = o.policy AND a.gate = o.gate AND a.partition = o.partition
  ), observed AS (
    DELETE FROM dispatch_policy.observations x USING orphans o
    WHERE o.tbl = 'observations' AND x.policy = o.policy AND x.gate = o.gate AND x.partition = o.partition
  ), minutes AS (
    DELETE FROM dispatch_policy.observation_minutes m USING orphans o
    WHERE o.tbl = 'observation_minutes' AND m.policy = o.policy AND m.gate = o.gate AND m.partition = o.partition
  ), cursors AS (
    DELETE FROM dispatch_policy.round_robin_cursors r USING orphans o
    WHERE o.tbl = 'round_robin_cursors' AND r.policy = o.policy
  ), failures AS (
    DELETE FROM dispatch_policy.runner_failures r USING orphans o
    WHERE o.tbl = 'runner_failures' AND r.policy = o.policy
  )
  SELECT o.finding, o.policy, o.gate, o.partition, NULL::bigint,
         CASE WHEN o.tbl IN ('observations', 'observation_minutes')
              THEN format('deleted %s row%s of %s', o.rows, CASE WHEN o.rows = 1 THEN '' ELSE 's' END, o.tbl)
              ELSE format('deleted the %s row', o.tbl) END
  FROM orphans o;

  -- Dedupe keys: those nobody should hold deleted, then the missing ones
  -- inserted (after the deletes: a job may take back its key from a row
  -- that was wrong).
  RETURN QUERY
  WITH wrong AS MATERIALIZED (
    SELECT * FROM dispatch_policy._dedupe_problems() k WHERE k.problem <> 'dedupe_key_missing'
  ), deleted AS (
    DELETE FROM dispatch_policy.dedupe_keys d USING wrong k
    WHERE d.policy = k.policy AND d.dedupe_key = k.dedupe_key AND d.job_id = k.job_id
  )
  SELECT k.problem, k.policy, NULL::text, NULL::text, k.job_id, format('deleted key %L', k.dedupe_key)
  FROM wrong k;
  RETURN QUERY
  WITH missing AS MATERIALIZED (
    SELECT * FROM dispatch_policy._dedupe_problems() k WHERE k.problem = 'dedupe_key_missing'
  ), inserted AS (
    INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
    SELECT k.policy, k.dedupe_key, k.job_id FROM missing k
    ORDER BY 1, 2
    ON CONFLICT ON CONSTRAINT dedupe_keys_pkey DO NOTHING
  )
  SELECT k.problem, k.policy, NULL::text, NULL::text, k.job_id, format('inserted key %L for the job', k.dedupe_key)
  FROM missing k;
END
$$;
COMMENT ON FUNCTION dispatch_policy.repair(timestamptz) IS
  'Fixes everything dispatch_policy.check() reports, in the caller''s transaction, and returns one row per change (the check() finding and the action taken); afterwards check() returns no rows. Waits for running ticks (in policy name order), then locks the admitted jobs in id order (as a redeclare does) and gate-state rows in (policy, gate, partition) order, as admission and completion do: workers finishing jobs wait for it. A job in two tables keeps its finished copy, else its admitted copy (the only copy of a job is never deleted); admitted jobs'' partitions are recomputed under the current config and in-flight counters set to the slots held (missing rows inserted); throttle tokens are clamped into [0, burst] at now (NaN or infinite: burst); wrong dedupe keys are deleted and missing ones inserted; state of policies and gates that no longer exist is deleted.';
