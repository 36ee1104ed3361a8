-- dispatch-policy: admission primitives, called by a tick runner (the Swift
-- orchestrator, or any client) inside one transaction per policy:
--
--   try_lock_policy -> reap_leases -> take_observations / save_adaptive
--   -> promote_scheduled -> fetch_batch -> refill_buckets / read_counters /
--   read_adaptive -> (evaluate gates) -> admit -> COMMIT
--
-- Every primitive takes `now` (default now()). Gate-state rows are locked in
-- (gate, partition) order. Completion and failure (complete, fail, the
-- reaper) release exactly the slots admission recorded on the job.

CREATE TABLE dispatch_policy.round_robin_cursors (
  policy     text PRIMARY KEY,
  last_key   text,
  updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dispatch_policy.round_robin_cursors IS
  'Where the round-robin batch fetch of each policy stopped: the next tick starts with the keys after last_key, so with more active keys than fit in a batch every key still gets its turn.';
COMMENT ON COLUMN dispatch_policy.round_robin_cursors.policy IS 'Policy name.';
COMMENT ON COLUMN dispatch_policy.round_robin_cursors.last_key IS 'The last round-robin key served by the previous tick.';
COMMENT ON COLUMN dispatch_policy.round_robin_cursors.updated_at IS 'When the cursor last moved.';

CREATE FUNCTION dispatch_policy.try_lock_policy(policy text)
RETURNS boolean
LANGUAGE sql VOLATILE STRICT SECURITY INVOKER
AS $$
  SELECT pg_try_advisory_xact_lock(hashtext('dispatch_policy.tick.' || try_lock_policy.policy))
$$;
COMMENT ON FUNCTION dispatch_policy.try_lock_policy(text) IS
  'Takes the single-writer lock of a policy''s tick for the current transaction; false when another runner is ticking the policy (skip it then).';

CREATE FUNCTION dispatch_policy.promote_scheduled(policy text, max_rows integer, now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  promoted integer;
BEGIN
  UPDATE dispatch_policy.staged_jobs s SET not_before = NULL
  WHERE s.id IN (
    SELECT d.id FROM dispatch_policy.staged_jobs d
    WHERE d.policy = promote_scheduled.policy AND d.not_before IS NOT NULL AND d.not_before <= promote_scheduled.now
    ORDER BY d.not_before
    LIMIT max_rows
    FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS promoted = ROW_COUNT;
  RETURN promoted;
END
$$;
COMMENT ON FUNCTION dispatch_policy.promote_scheduled(text, integer, timestamptz) IS
  'Makes up to max_rows scheduled jobs whose not_before has passed eligible (clears not_before), oldest first. Returns how many.';

-- The next n distinct round-robin keys after `after` (wrapping around), each
-- found by one index probe: O(n log N), not O(backlog).
CREATE FUNCTION dispatch_policy._next_round_robin_keys(policy text, after text, n integer)
RETURNS text[]
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
DECLARE
  keys text[] := '{}';
  key text := after;
  wrapped boolean := after IS NULL;
BEGIN
  WHILE cardinality(keys) < n LOOP
    IF key IS NULL THEN
      SELECT min(s.round_robin_key) INTO key FROM dispatch_policy.staged_jobs s
      WHERE s.policy = _next_round_robin_keys.policy AND s.not_before IS NULL AND s.round_robin_key IS NOT NULL;
    ELSE
      SELECT min(s.round_robin_key) INTO key FROM dispatch_policy.staged_jobs s
      WHERE s.policy = _next_round_robin_keys.policy AND s.not_before IS NULL AND s.round_robin_key > key;
    END IF;
    IF key IS NULL THEN
      EXIT WHEN wrapped;
      wrapped := true;
      CONTINUE;
    END IF;
    EXIT WHEN key = ANY (keys);
    EXIT WHEN wrapped AND after IS NOT NULL AND key > after;
    keys := keys || key;
  END LOOP;
  RETURN keys;
END
$$;
COMMENT ON FUNCTION dispatch_policy._next_round_robin_keys(text, text, integer) IS
  'Internal: up to n distinct round-robin keys with eligible jobs, starting after the given key and wrapping around.';

CREATE FUNCTION dispatch_policy.fetch_batch(
  policy text, batch_size integer, round_robin_quantum integer DEFAULT NULL, now timestamptz DEFAULT now()
)
RETURNS TABLE (id bigint, priority integer, round_robin_key text, context jsonb)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  keys text[];
  cursor_key text;
  quantum integer;
BEGIN
  IF round_robin_quantum IS NULL THEN
    RETURN QUERY
      SELECT s.id, s.priority, s.round_robin_key, s.context
      FROM (SELECT j.id, j.priority, j.round_robin_key, j.context FROM dispatch_policy.staged_jobs j
            WHERE j.policy = fetch_batch.policy AND j.not_before IS NULL
            ORDER BY j.priority, j.id
            LIMIT batch_size
            FOR UPDATE SKIP LOCKED) s
      ORDER BY s.priority, s.id;
    RETURN;
  END IF;

  SELECT c.last_key INTO cursor_key FROM dispatch_policy.round_robin_cursors c WHERE c.policy = fetch_batch.policy;
  -- Never more than batch_size rows: a quantum above the batch size is the batch size.
  quantum := least(round_robin_quantum, batch_size);
  keys := dispatch_policy._next_round_robin_keys(fetch_batch.policy, cursor_key,
                                                 greatest(1, ceil(batch_size::numeric / quantum)::integer));

  -- Phase 1: up to `quantum` rows of each key; phase 2: top up with the
  -- oldest remaining rows. Rows come out interleaved: every key's first row,
  -- then every key's second row, and so on (within each priority).
  RETURN QUERY
  WITH per_key AS MATERIALIZED (
    SELECT j.id, j.priority, j.round_robin_key, j.context, k.n AS key_order
    FROM unnest(keys) WITH ORDINALITY AS k(key, n)
    CROSS JOIN LATERAL (
      SELECT s.id, s.priority, s.round_robin_key, s.context FROM dispatch_policy.staged_jobs s
      WHERE s.policy = fetch_batch.policy AND s.not_before IS NULL AND s.round_robin_key = k.key
      ORDER BY s.priority, s.id
      LIMIT quantum
      FOR UPDATE SKIP LOCKED) j
  ), top_up AS MATERIALIZED (
    SELECT j.id, j.priority, j.round_robin_key, j.context FROM dispatch_policy.staged_jobs j
    WHERE j.policy = fetch_batch.policy AND j.not_before IS NULL AND j.id NOT IN (SELECT p.id FROM per_key p)
    ORDER BY j.priority, j.id
    LIMIT greatest(batch_size - (SELECT count(*) FROM per_key), 0)
    FOR UPDATE SKIP LOCKED
  ), batch AS (
    SELECT p.id, p.priority, p.round_robin_key, p.context,
           row_number() OVER (PARTITION BY p.key_order ORDER BY p.priority, p.id) AS rank, p.key_order
    FROM per_key p
    UNION ALL
    SELECT t.id, t.priority, t.round_robin_key, t.context, quantum + 1, 0 FROM top_up t
  )
  SELECT b.id, b.priority, b.round_robin_key, b.context
  FROM batch b
  ORDER BY b.priority, b.rank, b.key_order, b.id
  LIMIT batch_size;

  IF cardinality(keys) > 0 THEN
    INSERT INTO dispatch_policy.round_robin_cursors AS c (policy, last_key, updated_at)
    VALUES (fetch_batch.policy, keys[cardinality(keys)], fetch_batch.now)
    ON CONFLICT ON CONSTRAINT round_robin_cursors_pkey
    DO UPDATE SET last_key = EXCLUDED.last_key, updated_at = EXCLUDED.updated_at;
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.fetch_batch(text, integer, integer, timestamptz) IS
  'Locks (FOR UPDATE SKIP LOCKED) and returns up to batch_size eligible jobs of a policy, lower priority first, then staging order. With round_robin_quantum: up to that many rows for each of the next ceil(batch_size / quantum) round-robin keys (rotating across ticks), interleaved, then the oldest remaining rows.';

-- Throttle buckets: [{"gate", "partition", "rate", "per", "burst"}].
-- Creates missing buckets full, locks all in order, refills them to `now`
-- at the rate stored since the last refill, stores the new rate, and
-- returns the tokens available.
CREATE FUNCTION dispatch_policy.refill_buckets(policy text, buckets jsonb, now timestamptz DEFAULT now())
RETURNS TABLE (gate text, partition text, tokens double precision)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  INSERT INTO dispatch_policy.throttle_buckets AS t (policy, gate, partition, tokens, rate, per_seconds, burst, refilled_at)
  SELECT refill_buckets.policy, b ->> 'gate', b ->> 'partition', (b ->> 'burst')::float8,
         (b ->> 'rate')::float8, (b ->> 'per')::float8, (b ->> 'burst')::float8, refill_buckets.now
  FROM jsonb_array_elements(buckets) AS b
  ORDER BY 2, 3
  ON CONFLICT ON CONSTRAINT throttle_buckets_pkey DO NOTHING;

  PERFORM 1 FROM dispatch_policy.throttle_buckets t
  WHERE t.policy = refill_buckets.policy
    AND (t.gate, t.partition) IN (SELECT b ->> 'gate', b ->> 'partition' FROM jsonb_array_elements(buckets) b)
  ORDER BY t.gate, t.partition
  FOR UPDATE;

  RETURN QUERY
  UPDATE dispatch_policy.throttle_buckets t
  SET tokens = least((b ->> 'burst')::float8,
                     t.tokens + t.rate * greatest(extract(epoch FROM refill_buckets.now - t.refilled_at)::float8, 0) / t.per_seconds),
      refilled_at = greatest(t.refilled_at, refill_buckets.now),
      rate = (b ->> 'rate')::float8,
      per_seconds = (b ->> 'per')::float8,
      burst = (b ->> 'burst')::float8
  FROM jsonb_array_elements(buckets) AS b
  WHERE t.policy = refill_buckets.policy AND t.gate = b ->> 'gate' AND t.partition = b ->> 'partition'
  RETURNING t.gate, t.partition, t.tokens;
END
$$;
COMMENT ON FUNCTION dispatch_policy.refill_buckets(text, jsonb, timestamptz) IS
  'Token-bucket refill for many partitions in one call: buckets is [{"gate","partition","rate","per","burst"}]; missing buckets start full; rows are locked in (gate, partition) order; returns the tokens available now.';

-- In-flight counters: [{"gate", "partition"}]. Creates missing rows at 0,
-- locks all in order, returns in_flight.
CREATE FUNCTION dispatch_policy.read_counters(policy text, keys jsonb)
RETURNS TABLE (gate text, partition text, in_flight integer)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition)
  SELECT read_counters.policy, k ->> 'gate', k ->> 'partition'
  FROM jsonb_array_elements(keys) AS k
  ORDER BY 2, 3
  ON CONFLICT ON CONSTRAINT inflight_counters_pkey DO NOTHING;

  RETURN QUERY
  SELECT c.gate, c.partition, c.in_flight
  FROM dispatch_policy.inflight_counters c
  WHERE c.policy = read_counters.policy
    AND (c.gate, c.partition) IN (SELECT k ->> 'gate', k ->> 'partition' FROM jsonb_array_elements(keys) k)
  ORDER BY c.gate, c.partition
  FOR UPDATE;
END
$$;
COMMENT ON FUNCTION dispatch_policy.read_counters(text, jsonb) IS
  'In-flight counters for many partitions in one call: keys is [{"gate","partition"}]; missing rows start at 0; rows are locked in (gate, partition) order.';

-- Adaptive caps: [{"gate", "partition", "initial_max"}]. Creates missing
-- stats rows at initial_max, returns current_max and ewma_lag_ms.
CREATE FUNCTION dispatch_policy.read_adaptive(policy text, keys jsonb)
RETURNS TABLE (gate text, partition text, current_max integer, ewma_lag_ms double precision)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  INSERT INTO dispatch_policy.adaptive_stats (policy, gate, partition, current_max)
  SELECT read_adaptive.policy, k ->> 'gate', k ->> 'partition', (k ->> 'initial_max')::integer
  FROM jsonb_array_elements(keys) AS k
  ORDER BY 2, 3
  ON CONFLICT ON CONSTRAINT adaptive_stats_pkey DO NOTHING;

  RETURN QUERY
  SELECT a.gate, a.partition, a.current_max, a.ewma_lag_ms
  FROM dispatch_policy.adaptive_stats a
  WHERE a.policy = read_adaptive.policy
    AND (a.gate, a.partition) IN (SELECT k ->> 'gate', k ->> 'partition' FROM jsonb_array_elements(keys) k)
  ORDER BY a.gate, a.partition
  FOR UPDATE;
END
$$;
COMMENT ON FUNCTION dispatch_policy.read_adaptive(text, jsonb) IS
  'Adaptive caps for many partitions in one call: keys is [{"gate","partition","initial_max"}]; missing rows start at initial_max; rows are locked in (gate, partition) order.';

-- Takes (deletes) up to max_rows unfolded observations of an adaptive gate,
-- adds them to the per-minute aggregates, and returns them in order. The
-- caller folds them into adaptive_stats in the same transaction, so each
-- observation is folded exactly once.
CREATE FUNCTION dispatch_policy.take_observations(policy text, gate text, max_rows integer DEFAULT 10000)
RETURNS TABLE (id bigint, partition text, lag_ms double precision, success boolean, observed_at timestamptz)
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  WITH taken AS (
    DELETE FROM dispatch_policy.observations o
    WHERE o.id IN (SELECT x.id FROM dispatch_policy.observations x
                   WHERE x.policy = take_observations.policy AND x.gate = take_observations.gate
                   ORDER BY x.id LIMIT max_rows FOR UPDATE SKIP LOCKED)
    RETURNING o.id, o.partition, o.lag_ms, o.success, o.observed_at
  ), minutes AS (
    INSERT INTO dispatch_policy.observation_minutes AS m (policy, gate, partition, minute, completions, failures, lag_ms_sum)
    SELECT take_observations.policy, take_observations.gate, t.partition, date_trunc('minute', t.observed_at),
           count(*) FILTER (WHERE t.success), count(*) FILTER (WHERE NOT t.success), sum(t.lag_ms)
    FROM taken t
    GROUP BY 3, 4
    ORDER BY 3, 4
    ON CONFLICT ON CONSTRAINT observation_minutes_pkey DO UPDATE
    SET completions = m.completions + EXCLUDED.completions,
        failures = m.failures + EXCLUDED.failures,
        lag_ms_sum = m.lag_ms_sum + EXCLUDED.lag_ms_sum
  )
  SELECT t.id, t.partition, t.lag_ms, t.success, t.observed_at FROM taken t ORDER BY t.id
$$;
COMMENT ON FUNCTION dispatch_policy.take_observations(text, text, integer) IS
  'Removes and returns up to max_rows unfolded observations of an adaptive gate, oldest first, adding them to observation_minutes. Fold them into adaptive_stats (save_adaptive) in the same transaction.';

-- Stores folded AIMD state: [{"gate", "partition", "current_max",
-- "ewma_lag_ms", "observations", "failures", "last_observed_at"}].
CREATE FUNCTION dispatch_policy.save_adaptive(policy text, updates jsonb, now timestamptz DEFAULT now())
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  INSERT INTO dispatch_policy.adaptive_stats AS a
    (policy, gate, partition, current_max, ewma_lag_ms, observations, failures, last_observed_at, updated_at)
  SELECT save_adaptive.policy, u ->> 'gate', u ->> 'partition', (u ->> 'current_max')::integer,
         (u ->> 'ewma_lag_ms')::float8, (u ->> 'observations')::bigint, (u ->> 'failures')::bigint,
         (u ->> 'last_observed_at')::timestamptz, save_adaptive.now
  FROM jsonb_array_elements(updates) AS u
  ORDER BY 2, 3
  ON CONFLICT ON CONSTRAINT adaptive_stats_pkey DO UPDATE
  SET current_max = EXCLUDED.current_max,
      ewma_lag_ms = EXCLUDED.ewma_lag_ms,
      observations = a.observations + EXCLUDED.observations,
      failures = a.failures + EXCLUDED.failures,
      last_observed_at = greatest(a.last_observed_at, EXCLUDED.last_observed_at),
      updated_at = EXCLUDED.updated_at;

  UPDATE dispatch_policy.observation_minutes m
  SET current_max = (u ->> 'current_max')::integer
  FROM jsonb_array_elements(updates) AS u
  WHERE m.policy = save_adaptive.policy AND m.gate = u ->> 'gate' AND m.partition = u ->> 'partition'
    AND m.minute = date_trunc('minute', (u ->> 'last_observed_at')::timestamptz);
END
$$;
COMMENT ON FUNCTION dispatch_policy.save_adaptive(text, jsonb, timestamptz) IS
  'Stores AIMD results for many partitions: updates is [{"gate","partition","current_max","ewma_lag_ms","observations","failures","last_observed_at"}] (observations and failures are increments).';

-- Calls a `sql` target function for one admitted job.
CREATE FUNCTION dispatch_policy._hand_off(target_function text, id bigint, queue text, args jsonb, context jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  EXECUTE format('SELECT %I.%I($1, $2, $3, $4)',
                 split_part(target_function, '.', 1), split_part(target_function, '.', 2))
  USING id, queue, args, context;
END
$$;
COMMENT ON FUNCTION dispatch_policy._hand_off(text, bigint, text, jsonb, jsonb) IS
  'Internal: calls the policy''s sql target function (schema.name) with (id bigint, queue text, args jsonb, context jsonb).';

-- Admits jobs: jobs is [{"id", "slots": {"gate": "partition", ...}}] (the
-- slot-holding gates: concurrency, global_cap, adaptive_concurrency), takes
-- is [{"gate", "partition", "tokens"}]. Moves the rows to admitted_jobs with
-- their lease, adds to the counters, takes the tokens, hands the jobs to the
-- target, and notifies workers; all in the caller's transaction.
CREATE FUNCTION dispatch_policy.admit(
  policy text, jobs jsonb, takes jsonb DEFAULT '[]', lease_seconds integer DEFAULT 900, now timestamptz DEFAULT now()
)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  admitted integer;
  target jsonb;
  job record;
  ids bigint[];
  queues text[];
  queue_name text;
BEGIN
  -- Look rows up by primary key (= ANY of an array), never by joining the
  -- staged table against a set the planner cannot size: that would be a
  -- sequential scan of the whole backlog.
  ids := ARRAY(SELECT (j ->> 'id')::bigint FROM jsonb_array_elements(jobs) AS j);
  WITH moved AS (
    DELETE FROM dispatch_policy.staged_jobs s
    WHERE s.id = ANY (ids) AND s.policy = admit.policy
    RETURNING s.*
  ), slots AS (
    SELECT (j ->> 'id')::bigint AS id, coalesce(j -> 'slots', '{}'::jsonb) AS slots
    FROM jsonb_array_elements(jobs) AS j
  ), inserted AS (
    INSERT INTO dispatch_policy.admitted_jobs
      (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, attempt, created_at, staged_at,
       admitted_at, lease_expires_at, partitions)
    SELECT m.id, m.policy, m.queue, m.priority, m.args, m.context, m.dedupe_key, m.round_robin_key, m.attempt,
           m.created_at, m.staged_at, admit.now, admit.now + make_interval(secs => lease_seconds), sl.slots
    FROM moved m JOIN slots sl ON sl.id = m.id
    RETURNING queue
  )
  SELECT count(*), array_agg(DISTINCT i.queue) INTO admitted, queues FROM inserted i;
  IF admitted <> cardinality(ids) THEN
    RAISE EXCEPTION 'admit: % of % jobs are not staged for policy %', cardinality(ids) - admitted,
                    cardinality(ids), quote_literal(admit.policy)
      USING ERRCODE = '55000',
            HINT = 'Admit only jobs this transaction fetched with fetch_batch (they are locked until it ends).';
  END IF;
  IF admitted = 0 THEN
    RETURN 0;
  END IF;

  UPDATE dispatch_policy.inflight_counters c
  SET in_flight = c.in_flight + n.count, last_admitted_at = admit.now, updated_at = admit.now
  FROM (SELECT s.key AS gate, s.value AS partition, count(*) AS count
        FROM jsonb_array_elements(jobs) AS j, jsonb_each_text(j -> 'slots') AS s
        GROUP BY 1, 2) n
  WHERE c.policy = admit.policy AND c.gate = n.gate AND c.partition = n.partition;

  INSERT INTO dispatch_policy.inflight_counters AS c (policy, gate, partition, in_flight, last_admitted_at, updated_at)
  SELECT admit.policy, s.key, s.value, count(*), admit.now, admit.now
  FROM jsonb_array_elements(jobs) AS j, jsonb_each_text(j -> 'slots') AS s
  WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.inflight_counters x
                    WHERE x.policy = admit.policy AND x.gate = s.key AND x.partition = s.value)
  GROUP BY 2, 3
  ORDER BY 2, 3;

  UPDATE dispatch_policy.throttle_buckets t
  SET tokens = t.tokens - (k ->> 'tokens')::float8, last_admitted_at = admit.now
  FROM jsonb_array_elements(takes) AS k
  WHERE t.policy = admit.policy AND t.gate = k ->> 'gate' AND t.partition = k ->> 'partition';

  SELECT p.config -> 'target' INTO target FROM dispatch_policy.policies p WHERE p.name = admit.policy;
  IF target ->> 'type' = 'sql' THEN
    FOR job IN
      SELECT a.id, a.queue, a.args, a.context FROM dispatch_policy.admitted_jobs a
      WHERE a.id = ANY (ids)
      ORDER BY a.priority, a.id
    LOOP
      PERFORM dispatch_policy._hand_off(target ->> 'function', job.id, job.queue, job.args, job.context);
    END LOOP;
  ELSE
    FOREACH queue_name IN ARRAY queues LOOP
      PERFORM pg_notify('dispatch_policy_admitted', queue_name);
    END LOOP;
  END IF;
  RETURN admitted;
END
$$;
COMMENT ON FUNCTION dispatch_policy.admit(text, jsonb, jsonb, integer, timestamptz) IS
  'Admits fetched jobs in the caller''s transaction: jobs is [{"id","slots":{"gate":"partition"}}], takes is [{"gate","partition","tokens"}]. Moves rows to admitted_jobs with a lease, adds to in-flight counters, takes tokens, calls the sql target function or notifies ready-queue workers (NOTIFY dispatch_policy_admitted, queue). SQLSTATE 55000 if a job is not staged.';

-- Releases the slots a job holds, in (gate, partition) order.
CREATE FUNCTION dispatch_policy._release_slots(policy text, slots jsonb, now timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  slot record;
BEGIN
  FOR slot IN SELECT s.key, s.value FROM jsonb_each_text(slots) AS s ORDER BY s.key, s.value LOOP
    UPDATE dispatch_policy.inflight_counters c
    SET in_flight = c.in_flight - 1, updated_at = now
    WHERE c.policy = _release_slots.policy AND c.gate = slot.key AND c.partition = slot.value;
  END LOOP;
  PERFORM pg_notify('dispatch_policy_released', _release_slots.policy);
END
$$;
COMMENT ON FUNCTION dispatch_policy._release_slots(text, jsonb, timestamptz) IS
  'Internal: gives back one slot of each (gate, partition) in slots, in order, and wakes runners (NOTIFY dispatch_policy_released).';

-- Records one observation per adaptive gate the job held a slot in.
CREATE FUNCTION dispatch_policy._observe(job dispatch_policy.admitted_jobs, success boolean, now timestamptz)
RETURNS void
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  INSERT INTO dispatch_policy.observations (policy, gate, partition, job_id, lag_ms, success, observed_at)
  SELECT job.policy, s.key, s.value, job.id,
         greatest(extract(epoch FROM coalesce(job.started_at, now) - job.admitted_at) * 1000, 0), success, now
  FROM jsonb_each_text(job.partitions) AS s
  JOIN dispatch_policy.policies p ON p.name = job.policy
  CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
  WHERE g ->> 'type' = 'adaptive_concurrency' AND coalesce(g ->> 'name', g ->> 'type') = s.key
$$;
COMMENT ON FUNCTION dispatch_policy._observe(dispatch_policy.admitted_jobs, boolean, timestamptz) IS
  'Internal: records the queue lag (started_at - admitted_at, or until now when the job never started) of a finished attempt for each adaptive gate it was admitted under.';

-- Ends a failed attempt: release, record, then re-stage with backoff or bury.
CREATE FUNCTION dispatch_policy._fail_attempt(job dispatch_policy.admitted_jobs, error text, retry_in interval, now timestamptz)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  max_attempts integer;
BEGIN
  DELETE FROM dispatch_policy.admitted_jobs a WHERE a.id = job.id;
  PERFORM dispatch_policy._release_slots(job.policy, job.partitions, now);
  PERFORM dispatch_policy._observe(job, false, now);
  INSERT INTO dispatch_policy.job_failures (job_id, policy, attempt, error, failed_at)
  VALUES (job.id, job.policy, job.attempt, coalesce(error, 'failed'), now);

  SELECT coalesce((p.config ->> 'max_attempts')::integer, 25) INTO max_attempts
  FROM dispatch_policy.policies p WHERE p.name = job.policy;
  IF job.attempt >= coalesce(max_attempts, 25) THEN
    INSERT INTO dispatch_policy.finished_jobs
      (id, policy, queue, priority, args, context, dedupe_key, attempts, status, last_error, created_at, admitted_at, started_at, finished_at)
    VALUES (job.id, job.policy, job.queue, job.priority, job.args, job.context, job.dedupe_key, job.attempt, 'dead',
            error, job.created_at, job.admitted_at, job.started_at, now);
    IF job.dedupe_key IS NOT NULL THEN
      DELETE FROM dispatch_policy.dedupe_keys d WHERE d.policy = job.policy AND d.dedupe_key = job.dedupe_key AND d.job_id = job.id;
    END IF;
    RETURN 'dead';
  END IF;

  -- Retries go back through admission, so they respect every gate.
  INSERT INTO dispatch_policy.staged_jobs
    (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, attempt, created_at, staged_at, last_error)
  VALUES (job.id, job.policy, job.queue, job.priority, job.args, job.context, job.dedupe_key, job.round_robin_key,
          now + coalesce(retry_in, least(power(2, job.attempt), 3600) * interval '1 second'),
          job.attempt + 1, job.created_at, now, error);
  PERFORM pg_notify('dispatch_policy_staged', job.policy);
  RETURN 'retrying';
END
$$;
COMMENT ON FUNCTION dispatch_policy._fail_attempt(dispatch_policy.admitted_jobs, text, interval, timestamptz) IS
  'Internal: ends a failed attempt (releases slots, records the failure and a failed observation) and re-stages the job after retry_in (default 2^attempt seconds, at most an hour) or, after max_attempts, keeps it as dead. Returns ''retrying'' or ''dead''.';

CREATE FUNCTION dispatch_policy.reap_leases(policy text DEFAULT NULL, now timestamptz DEFAULT now(), max_rows integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  job dispatch_policy.admitted_jobs;
  reaped integer := 0;
BEGIN
  FOR job IN
    SELECT a.* FROM dispatch_policy.admitted_jobs a
    WHERE a.lease_expires_at < reap_leases.now AND (reap_leases.policy IS NULL OR a.policy = reap_leases.policy)
    ORDER BY a.lease_expires_at
    LIMIT max_rows
    FOR UPDATE SKIP LOCKED
  LOOP
    PERFORM dispatch_policy._fail_attempt(job, 'lease expired', NULL, reap_leases.now);
    reaped := reaped + 1;
  END LOOP;
  RETURN reaped;
END
$$;
COMMENT ON FUNCTION dispatch_policy.reap_leases(text, timestamptz, integer) IS
  'Treats admitted jobs whose lease expired (the worker died) as failed attempts: releases their slots and re-stages them (or buries them after max_attempts). NULL policy: every policy. Returns how many.';

CREATE FUNCTION dispatch_policy.complete(id bigint, now timestamptz DEFAULT now())
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  job dispatch_policy.admitted_jobs;
BEGIN
  DELETE FROM dispatch_policy.admitted_jobs a WHERE a.id = complete.id RETURNING a.* INTO job;
  IF NOT FOUND THEN
    IF EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f WHERE f.id = complete.id) THEN
      RETURN false;
    END IF;
    RAISE EXCEPTION 'job % is not admitted', complete.id
      USING ERRCODE = 'P0002',
            DETAIL = CASE WHEN EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s WHERE s.id = complete.id)
                          THEN 'It is staged, waiting for admission (or for a retry).' ELSE 'No job has this id.' END;
  END IF;
  PERFORM dispatch_policy._release_slots(job.policy, job.partitions, complete.now);
  PERFORM dispatch_policy._observe(job, true, complete.now);
  INSERT INTO dispatch_policy.finished_jobs
    (id, policy, queue, priority, args, context, dedupe_key, attempts, status, created_at, admitted_at, started_at, finished_at)
  VALUES (job.id, job.policy, job.queue, job.priority, job.args, job.context, job.dedupe_key, job.attempt, 'completed',
          job.created_at, job.admitted_at, job.started_at, complete.now);
  IF job.dedupe_key IS NOT NULL THEN
    DELETE FROM dispatch_policy.dedupe_keys d WHERE d.policy = job.policy AND d.dedupe_key = job.dedupe_key AND d.job_id = job.id;
  END IF;
  RETURN true;
END
$$;
COMMENT ON FUNCTION dispatch_policy.complete(bigint, timestamptz) IS
  'Finishes an admitted job: releases every slot it holds, records its queue lag for adaptive gates, frees its dedupe key, keeps it in finished_jobs. Returns true; false (and changes nothing) when the job already finished. SQLSTATE P0002 when the job is not admitted.';

CREATE FUNCTION dispatch_policy.fail(id bigint, error text, retry_in interval DEFAULT NULL, now timestamptz DEFAULT now())
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  job dispatch_policy.admitted_jobs;
BEGIN
  SELECT a.* INTO job FROM dispatch_policy.admitted_jobs a WHERE a.id = fail.id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % is not admitted', fail.id
      USING ERRCODE = 'P0002', HINT = 'fail() applies to admitted jobs; a finished job cannot fail again.';
  END IF;
  RETURN dispatch_policy._fail_attempt(job, fail.error, fail.retry_in, fail.now);
END
$$;
COMMENT ON FUNCTION dispatch_policy.fail(bigint, text, interval, timestamptz) IS
  'Fails the current attempt of an admitted job: releases its slots, records a failed observation (adaptive caps shrink), and re-stages it through admission after retry_in (default exponential backoff) until the policy''s max_attempts, then keeps it as dead. Returns ''retrying'' or ''dead''. SQLSTATE P0002 when the job is not admitted.';

CREATE FUNCTION dispatch_policy.claim(queue text, worker text, max integer DEFAULT 1, now timestamptz DEFAULT now())
RETURNS TABLE (id bigint, policy text, queue text, args jsonb, context jsonb, attempt integer, lease_expires_at timestamptz)
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  UPDATE dispatch_policy.admitted_jobs a
  SET started_at = claim.now, worker = claim.worker, heartbeat_at = claim.now,
      lease_expires_at = claim.now + coalesce(
        make_interval(secs => (SELECT (p.config ->> 'lease_seconds')::integer FROM dispatch_policy.policies p WHERE p.name = a.policy)),
        interval '900 seconds')
  WHERE a.id IN (SELECT x.id FROM dispatch_policy.admitted_jobs x
                 WHERE x.queue = claim.queue AND x.started_at IS NULL
                 ORDER BY x.priority, x.id
                 LIMIT greatest(claim.max, 0)
                 FOR UPDATE SKIP LOCKED)
  RETURNING a.id, a.policy, a.queue, a.args, a.context, a.attempt, a.lease_expires_at
$$;
COMMENT ON FUNCTION dispatch_policy.claim(text, text, integer, timestamptz) IS
  'Claims up to max admitted, not yet started jobs of a queue for a worker (lower priority first, SKIP LOCKED), marking them started (queue lag = started_at - admitted_at) with a fresh lease.';

CREATE FUNCTION dispatch_policy.started(id bigint, now timestamptz DEFAULT now())
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  UPDATE dispatch_policy.admitted_jobs a SET started_at = coalesce(a.started_at, started.now), heartbeat_at = started.now
  WHERE a.id = started.id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % is not admitted', started.id USING ERRCODE = 'P0002';
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.started(bigint, timestamptz) IS
  'For jobs handed to another queue: records that a worker started the job (its queue lag feeds the adaptive gate). SQLSTATE P0002 when the job is not admitted.';

-- Maintenance: idle gate rows, rows of gates no longer declared, old history.
CREATE FUNCTION dispatch_policy.prune(retention interval DEFAULT '7 days', idle interval DEFAULT '1 hour', now timestamptz DEFAULT now())
RETURNS TABLE (what text, removed bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  n bigint;
BEGIN
  -- Gate rows whose gate is no longer in its policy (or whose policy is gone).
  DELETE FROM dispatch_policy.throttle_buckets t
  WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p, jsonb_array_elements(coalesce(p.config -> 'gates', '[]')) g
                    WHERE p.name = t.policy AND g ->> 'type' = 'throttle' AND coalesce(g ->> 'name', g ->> 'type') = t.gate);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'removed_gate_buckets'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.inflight_counters c
  WHERE c.in_flight = 0
    AND NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p, jsonb_array_elements(coalesce(p.config -> 'gates', '[]')) g
                    WHERE p.name = c.policy AND coalesce(g ->> 'name', g ->> 'type') = c.gate);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'removed_gate_counters'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.adaptive_stats a
  WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p, jsonb_array_elements(coalesce(p.config -> 'gates', '[]')) g
                    WHERE p.name = a.policy AND g ->> 'type' = 'adaptive_concurrency' AND coalesce(g ->> 'name', g ->> 'type') = a.gate);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'removed_gate_adaptive'; removed := n; RETURN NEXT;

  -- Idle partitions: a full bucket or an empty counter untouched for `idle`
  -- is the same as no row (a missing bucket starts full, a missing counter at 0).
  DELETE FROM dispatch_policy.throttle_buckets t
  WHERE t.refilled_at < now - idle
    AND t.tokens + t.rate * extract(epoch FROM now - t.refilled_at) / t.per_seconds >= t.burst;
  GET DIAGNOSTICS n = ROW_COUNT; what := 'idle_buckets'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.inflight_counters c WHERE c.in_flight = 0 AND c.updated_at < now - idle;
  GET DIAGNOSTICS n = ROW_COUNT; what := 'idle_counters'; removed := n; RETURN NEXT;

  DELETE FROM dispatch_policy.finished_jobs f WHERE f.status = 'completed' AND f.finished_at < now - retention;
  GET DIAGNOSTICS n = ROW_COUNT; what := 'completed_jobs'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.job_failures jf
  WHERE jf.failed_at < now - retention
    AND NOT EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f WHERE f.id = jf.job_id AND f.status = 'dead');
  GET DIAGNOSTICS n = ROW_COUNT; what := 'failures'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.observation_minutes m WHERE m.minute < now - retention;
  GET DIAGNOSTICS n = ROW_COUNT; what := 'observation_minutes'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.round_robin_cursors r WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p WHERE p.name = r.policy);
END
$$;
COMMENT ON FUNCTION dispatch_policy.prune(interval, interval, timestamptz) IS
  'Maintenance: deletes gate state of gates no longer in their policy, idle partitions (full buckets, empty counters untouched for idle), and completed jobs, failures of non-dead jobs and per-minute aggregates older than retention. Dead jobs and their failures are kept. Returns counts.';
