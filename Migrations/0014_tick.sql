-- A tick in few round trips (issue 9).
--
-- The primitives (refill_buckets, read_counters, read_adaptive, save_adaptive,
-- admit) stay the documented SQL API, with their jsonb arguments. Each is now
-- a thin wrapper over an array-taking core (_refill_buckets, _read_counters,
-- _read_adaptive, _save_adaptive, _admit): one implementation, two ways in.
-- The runner calls the cores through three consolidated entry points, in
-- autocommit (no BEGIN, no COMMIT: a tick is three round trips, one when
-- there is nothing to do):
--
--   tick_begin   lock (session level), read observations, promote, fetch
--   tick_state   refill buckets, read counters and adaptive state of the
--                batch's partitions
--   tick_finish  admit, move the rotation, save adaptive, remove the folded
--                observations, unlock
--   tick_abort   unlock after a failure (nothing admitted)
--
-- Counters are read without a lock by tick_state and locked, in sorted order,
-- only by _admit: between the two calls only complete(), fail() and reaping
-- change them, and they only lower them, so a decision made on the earlier
-- read never exceeds a cap; a worker's complete() no longer waits for the
-- runner's network round trips.

-- ---------------------------------------------------------------------------
-- fair_interleave's round, carried across ticks (0.2.0): tick_state returns
-- it, tick_finish keeps where the admissions stopped.

ALTER TABLE dispatch_policy.round_robin_cursors ADD COLUMN interleave jsonb;
COMMENT ON COLUMN dispatch_policy.round_robin_cursors.interleave IS
  'Where each fair_interleave gate''s round stopped, as the runner left it: {"<gate name>": {"key": <partition>, "served": <jobs that partition had of its weighted round, 1 to its weight>}}. The next tick orders the gate''s partitions by key from that one on (its rest of the round first, or the next partition once the round gave it its weight). NULL: none yet (the first partition in key order starts).';

-- ---------------------------------------------------------------------------
-- Array length checks: bad input is an error naming the argument.

CREATE FUNCTION dispatch_policy._require_same_length(what text, lengths integer[])
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  IF (SELECT count(DISTINCT coalesce(l, 0)) FROM unnest(lengths) AS l) > 1 THEN
    RAISE EXCEPTION '% must be arrays of the same length', what
      USING ERRCODE = '22023', DETAIL = format('Their lengths are %s.', array_to_string(lengths, ', ', '0')),
            HINT = 'Nothing was changed.';
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_same_length(text, integer[]) IS
  'Internal: raises 22023 naming the arguments unless the given array lengths are equal (NULL counts as 0).';

-- ---------------------------------------------------------------------------
-- Buckets.

CREATE FUNCTION dispatch_policy._refill_buckets(
  policy text, gates text[], partitions text[], rates double precision[], pers double precision[],
  bursts double precision[], now timestamptz
)
RETURNS TABLE (gate text, partition text, tokens double precision)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_now(_refill_buckets.now);
  PERFORM dispatch_policy._require_same_length('gates, partitions, rates, pers and bursts', ARRAY[
    cardinality(gates), cardinality(partitions), cardinality(rates), cardinality(pers), cardinality(bursts)]);
  INSERT INTO dispatch_policy.throttle_buckets AS t (policy, gate, partition, tokens, rate, per_seconds, burst, refilled_at)
  SELECT DISTINCT ON (b.g, b.p) _refill_buckets.policy, b.g, b.p, b.burst, b.rate, b.per, b.burst, _refill_buckets.now
  FROM unnest(gates, partitions, rates, pers, bursts) AS b(g, p, rate, per, burst)
  ORDER BY b.g, b.p
  ON CONFLICT ON CONSTRAINT throttle_buckets_pkey DO NOTHING;

  PERFORM 1 FROM dispatch_policy.throttle_buckets t
  WHERE t.policy = _refill_buckets.policy
    AND (t.gate, t.partition) IN (SELECT k.g, k.p FROM unnest(gates, partitions) AS k(g, p))
  ORDER BY t.gate, t.partition
  FOR UPDATE;

  RETURN QUERY
  UPDATE dispatch_policy.throttle_buckets t
  SET tokens = least(b.burst, dispatch_policy._bucket_tokens(t.tokens, t.rate, t.per_seconds, t.burst, t.refilled_at,
                                                             _refill_buckets.now)),
      refilled_at = greatest(t.refilled_at, _refill_buckets.now),
      rate = b.rate,
      per_seconds = b.per,
      burst = b.burst
  FROM (SELECT DISTINCT ON (x.g, x.p) x.* FROM unnest(gates, partitions, rates, pers, bursts) AS x(g, p, rate, per, burst)
        ORDER BY x.g, x.p) b
  WHERE t.policy = _refill_buckets.policy AND t.gate = b.g AND t.partition = b.p
  RETURNING t.gate, t.partition, t.tokens;
END
$$;
COMMENT ON FUNCTION dispatch_policy._refill_buckets(text, text[], text[], double precision[], double precision[], double precision[], timestamptz) IS
  'Internal: refill_buckets with parallel arrays (the one implementation; the first entry of a repeated partition counts).';

CREATE OR REPLACE FUNCTION dispatch_policy.refill_buckets(policy text, buckets jsonb, now timestamptz DEFAULT now())
RETURNS TABLE (gate text, partition text, tokens double precision)
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT r.gate, r.partition, r.tokens FROM dispatch_policy._refill_buckets(
    refill_buckets.policy,
    ARRAY(SELECT b ->> 'gate' FROM jsonb_array_elements(buckets) WITH ORDINALITY AS t(b, n) ORDER BY n),
    ARRAY(SELECT b ->> 'partition' FROM jsonb_array_elements(buckets) WITH ORDINALITY AS t(b, n) ORDER BY n),
    ARRAY(SELECT (b ->> 'rate')::float8 FROM jsonb_array_elements(buckets) WITH ORDINALITY AS t(b, n) ORDER BY n),
    ARRAY(SELECT (b ->> 'per')::float8 FROM jsonb_array_elements(buckets) WITH ORDINALITY AS t(b, n) ORDER BY n),
    ARRAY(SELECT (b ->> 'burst')::float8 FROM jsonb_array_elements(buckets) WITH ORDINALITY AS t(b, n) ORDER BY n),
    refill_buckets.now) AS r
$$;
COMMENT ON FUNCTION dispatch_policy.refill_buckets(text, jsonb, timestamptz) IS
  'Token-bucket refill for many partitions in one call: buckets is [{"gate","partition","rate","per","burst"}] within the limits() bounds (a CHECK constraint refuses others); missing buckets start full; rows are locked in (gate, partition) order; returns the tokens available now.';

-- ---------------------------------------------------------------------------
-- Counters.

CREATE FUNCTION dispatch_policy._read_counters(policy text, gates text[], partitions text[], lock boolean)
RETURNS TABLE (gate text, partition text, in_flight integer)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_same_length('gates and partitions', ARRAY[cardinality(gates), cardinality(partitions)]);
  IF NOT lock THEN
    -- A counter that does not exist yet holds no slot.
    RETURN QUERY
    SELECT k.g, k.p, coalesce(c.in_flight, 0)
    FROM (SELECT DISTINCT x.g, x.p FROM unnest(gates, partitions) AS x(g, p)) k
    LEFT JOIN dispatch_policy.inflight_counters c
      ON c.policy = _read_counters.policy AND c.gate = k.g AND c.partition = k.p
    ORDER BY k.g, k.p;
    RETURN;
  END IF;
  INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition)
  SELECT DISTINCT _read_counters.policy, k.g, k.p FROM unnest(gates, partitions) AS k(g, p)
  ORDER BY 2, 3
  ON CONFLICT ON CONSTRAINT inflight_counters_pkey DO NOTHING;

  RETURN QUERY
  SELECT c.gate, c.partition, c.in_flight
  FROM dispatch_policy.inflight_counters c
  WHERE c.policy = _read_counters.policy
    AND (c.gate, c.partition) IN (SELECT k.g, k.p FROM unnest(gates, partitions) AS k(g, p))
  ORDER BY c.gate, c.partition
  FOR UPDATE;
END
$$;
COMMENT ON FUNCTION dispatch_policy._read_counters(text, text[], text[], boolean) IS
  'Internal: read_counters with parallel arrays. lock false reads without creating or locking rows (a missing counter reads 0): what tick_state does, since only admission raises a counter.';

CREATE OR REPLACE FUNCTION dispatch_policy.read_counters(policy text, keys jsonb)
RETURNS TABLE (gate text, partition text, in_flight integer)
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT r.gate, r.partition, r.in_flight FROM dispatch_policy._read_counters(
    read_counters.policy,
    ARRAY(SELECT k ->> 'gate' FROM jsonb_array_elements(keys) WITH ORDINALITY AS t(k, n) ORDER BY n),
    ARRAY(SELECT k ->> 'partition' FROM jsonb_array_elements(keys) WITH ORDINALITY AS t(k, n) ORDER BY n),
    true) AS r
$$;

-- ---------------------------------------------------------------------------
-- Adaptive state.

CREATE FUNCTION dispatch_policy._read_adaptive(policy text, gates text[], partitions text[], initial_max integer[])
RETURNS TABLE (gate text, partition text, current_max integer, ewma_lag_ms double precision,
               growth_credit double precision, since_decrease bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_same_length('gates, partitions and initial_max', ARRAY[
    cardinality(gates), cardinality(partitions), cardinality(initial_max)]);
  INSERT INTO dispatch_policy.adaptive_stats (policy, gate, partition, current_max)
  SELECT DISTINCT ON (k.g, k.p) _read_adaptive.policy, k.g, k.p, k.m
  FROM unnest(gates, partitions, initial_max) AS k(g, p, m)
  ORDER BY k.g, k.p
  ON CONFLICT ON CONSTRAINT adaptive_stats_pkey DO NOTHING;

  RETURN QUERY
  SELECT a.gate, a.partition, a.current_max, a.ewma_lag_ms, a.growth_credit, a.since_decrease
  FROM dispatch_policy.adaptive_stats a
  WHERE a.policy = _read_adaptive.policy
    AND (a.gate, a.partition) IN (SELECT k.g, k.p FROM unnest(gates, partitions) AS k(g, p))
  ORDER BY a.gate, a.partition
  FOR UPDATE;
END
$$;
COMMENT ON FUNCTION dispatch_policy._read_adaptive(text, text[], text[], integer[]) IS
  'Internal: read_adaptive with parallel arrays (the one implementation).';

DROP FUNCTION dispatch_policy.read_adaptive(text, jsonb);
CREATE OR REPLACE FUNCTION dispatch_policy.read_adaptive(policy text, keys jsonb)
RETURNS TABLE (gate text, partition text, current_max integer, ewma_lag_ms double precision,
               growth_credit double precision, since_decrease bigint)
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT r.* FROM dispatch_policy._read_adaptive(
    read_adaptive.policy,
    ARRAY(SELECT k ->> 'gate' FROM jsonb_array_elements(keys) WITH ORDINALITY AS t(k, n) ORDER BY n),
    ARRAY(SELECT k ->> 'partition' FROM jsonb_array_elements(keys) WITH ORDINALITY AS t(k, n) ORDER BY n),
    ARRAY(SELECT (k ->> 'initial_max')::integer FROM jsonb_array_elements(keys) WITH ORDINALITY AS t(k, n) ORDER BY n)) AS r
$$;
COMMENT ON FUNCTION dispatch_policy.read_adaptive(text, jsonb) IS
  'Adaptive state for many partitions in one call: keys is [{"gate","partition","initial_max"}]; missing rows start at initial_max; rows are locked in (gate, partition) order. Returns the cap, the EWMA lag and the window counters of the AIMD rule.';

CREATE FUNCTION dispatch_policy._save_adaptive(
  policy text, gates text[], partitions text[], current_max integer[], ewma_lag_ms double precision[],
  growth_credit double precision[], since_decrease bigint[], observations bigint[], failures bigint[],
  last_observed_at timestamptz[], now timestamptz
)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_now(_save_adaptive.now);
  PERFORM dispatch_policy._require_same_length(
    'gates, partitions, current_max, ewma_lag_ms, growth_credit, since_decrease, observations, failures and last_observed_at',
    ARRAY[cardinality(gates), cardinality(partitions), cardinality(current_max), cardinality(ewma_lag_ms),
          cardinality(growth_credit), cardinality(since_decrease), cardinality(observations), cardinality(failures),
          cardinality(last_observed_at)]);
  INSERT INTO dispatch_policy.adaptive_stats AS a
    (policy, gate, partition, current_max, ewma_lag_ms, observations, failures, last_observed_at, updated_at,
     growth_credit, since_decrease)
  SELECT _save_adaptive.policy, u.g, u.p, u.m, u.e, u.o, u.f, u.at, _save_adaptive.now,
         coalesce(u.c, 0), coalesce(u.s, 0)
  FROM unnest(_save_adaptive.gates, _save_adaptive.partitions, _save_adaptive.current_max, _save_adaptive.ewma_lag_ms,
              _save_adaptive.observations, _save_adaptive.failures, _save_adaptive.last_observed_at,
              _save_adaptive.growth_credit, _save_adaptive.since_decrease) AS u(g, p, m, e, o, f, at, c, s)
  ORDER BY 2, 3
  ON CONFLICT ON CONSTRAINT adaptive_stats_pkey DO UPDATE
  SET current_max = EXCLUDED.current_max,
      ewma_lag_ms = EXCLUDED.ewma_lag_ms,
      observations = a.observations + EXCLUDED.observations,
      failures = a.failures + EXCLUDED.failures,
      last_observed_at = greatest(a.last_observed_at, EXCLUDED.last_observed_at),
      updated_at = EXCLUDED.updated_at,
      growth_credit = EXCLUDED.growth_credit,
      since_decrease = EXCLUDED.since_decrease;

  UPDATE dispatch_policy.observation_minutes om
  SET current_max = u.cap
  FROM unnest(_save_adaptive.gates, _save_adaptive.partitions, _save_adaptive.current_max,
              _save_adaptive.last_observed_at) AS u(g, p, cap, at)
  WHERE om.policy = _save_adaptive.policy AND om.gate = u.g AND om.partition = u.p
    AND om.minute = date_trunc('minute', u.at);
END
$$;
COMMENT ON FUNCTION dispatch_policy._save_adaptive(text, text[], text[], integer[], double precision[], double precision[], bigint[], bigint[], bigint[], timestamptz[], timestamptz) IS
  'Internal: save_adaptive with parallel arrays (the one implementation).';

CREATE OR REPLACE FUNCTION dispatch_policy.save_adaptive(policy text, updates jsonb, now timestamptz DEFAULT now())
RETURNS void
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT dispatch_policy._save_adaptive(
    save_adaptive.policy,
    ARRAY(SELECT u ->> 'gate' FROM jsonb_array_elements(updates) WITH ORDINALITY AS t(u, n) ORDER BY n),
    ARRAY(SELECT u ->> 'partition' FROM jsonb_array_elements(updates) WITH ORDINALITY AS t(u, n) ORDER BY n),
    ARRAY(SELECT (u ->> 'current_max')::integer FROM jsonb_array_elements(updates) WITH ORDINALITY AS t(u, n) ORDER BY n),
    ARRAY(SELECT (u ->> 'ewma_lag_ms')::float8 FROM jsonb_array_elements(updates) WITH ORDINALITY AS t(u, n) ORDER BY n),
    ARRAY(SELECT (u ->> 'growth_credit')::float8 FROM jsonb_array_elements(updates) WITH ORDINALITY AS t(u, n) ORDER BY n),
    ARRAY(SELECT (u ->> 'since_decrease')::bigint FROM jsonb_array_elements(updates) WITH ORDINALITY AS t(u, n) ORDER BY n),
    ARRAY(SELECT (u ->> 'observations')::bigint FROM jsonb_array_elements(updates) WITH ORDINALITY AS t(u, n) ORDER BY n),
    ARRAY(SELECT (u ->> 'failures')::bigint FROM jsonb_array_elements(updates) WITH ORDINALITY AS t(u, n) ORDER BY n),
    ARRAY(SELECT (u ->> 'last_observed_at')::timestamptz FROM jsonb_array_elements(updates) WITH ORDINALITY AS t(u, n) ORDER BY n),
    save_adaptive.now)
$$;
COMMENT ON FUNCTION dispatch_policy.save_adaptive(text, jsonb, timestamptz) IS
  'Stores AIMD results for many partitions: updates is [{"gate","partition","current_max","ewma_lag_ms","growth_credit","since_decrease","observations","failures","last_observed_at"}] (observations and failures are increments; current_max from 1 to 1000000).';

-- ---------------------------------------------------------------------------
-- Admission.

-- _admit, the one implementation of admit and of tick_finish's admission,
-- is defined once in 0.2.0, in 0026_admit_integrity.sql.

DROP FUNCTION dispatch_policy.admit(text, jsonb, jsonb, integer, timestamptz);
CREATE OR REPLACE FUNCTION dispatch_policy.admit(
  policy text, jobs jsonb, takes jsonb DEFAULT '[]', lease_seconds integer DEFAULT NULL, now timestamptz DEFAULT now(),
  round_robin_cursor jsonb DEFAULT NULL
)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  names text[];
  entries jsonb := coalesce(jobs, '[]'::jsonb);
BEGIN
  -- Every gate any job names (the old "slots" key is read as "partitions").
  names := ARRAY(SELECT DISTINCT s.key
                 FROM jsonb_array_elements(entries) AS j, jsonb_object_keys(coalesce(j -> 'partitions', j -> 'slots', '{}')) AS s(key)
                 ORDER BY 1);
  RETURN dispatch_policy._admit(
    admit.policy,
    ARRAY(SELECT (j ->> 'id')::bigint FROM jsonb_array_elements(entries) WITH ORDINALITY AS t(j, n) ORDER BY n),
    names,
    ARRAY(SELECT coalesce(j -> 'partitions', j -> 'slots', '{}') ->> g
          FROM jsonb_array_elements(entries) WITH ORDINALITY AS t(j, n), unnest(names) WITH ORDINALITY AS u(g, m)
          ORDER BY n, m),
    ARRAY(SELECT k ->> 'gate' FROM jsonb_array_elements(coalesce(takes, '[]')) WITH ORDINALITY AS t(k, n) ORDER BY n),
    ARRAY(SELECT k ->> 'partition' FROM jsonb_array_elements(coalesce(takes, '[]')) WITH ORDINALITY AS t(k, n) ORDER BY n),
    ARRAY(SELECT (k ->> 'tokens')::float8 FROM jsonb_array_elements(coalesce(takes, '[]')) WITH ORDINALITY AS t(k, n) ORDER BY n),
    admit.lease_seconds, admit.now, admit.round_robin_cursor);
END
$$;
COMMENT ON FUNCTION dispatch_policy.admit(text, jsonb, jsonb, integer, timestamptz, jsonb) IS
  'Admits fetched jobs in the caller''s transaction: jobs is [{"id","partitions":{"gate":"partition"}}] (every gate''s partition; slot-holding gates'' entries take a slot), takes is [{"gate","partition","tokens"}]. Moves rows to admitted_jobs with the lease (lease_seconds, else the policy''s, else 900), adds to in-flight counters and takes tokens (rows locked in sorted order), calls the sql target function or notifies ready-queue workers (NOTIFY dispatch_policy_admitted, queue). round_robin_cursor {"last_key": K} (NULL key: the keyless lane) or {"hold": true} sets the rotation; without it the cursor moves past the last key admitted. SQLSTATE 55000 if a job is not staged.';

-- ---------------------------------------------------------------------------
-- The consolidated tick, in autocommit: three calls, three round trips.
--
-- tick_begin takes the policy's tick lock at session level and the calls
-- run without BEGIN/COMMIT, each its own transaction; tick_finish (or
-- tick_abort, or the session ending) gives the lock back. What makes that
-- safe, though nothing is locked between the calls but the policy:
--  * the fetched jobs are only moved by the policy's tick, which holds the
--    lock (a job deleted meanwhile by hand fails the admission: 55000, and
--    the next tick fetches again);
--  * a refill committed by tick_state and never taken is the refill the
--    next tick would make (refilling is path-independent up to the burst);
--  * counters only fall between the read and _admit, which locks them;
--  * observations are read by tick_begin and deleted by tick_finish with
--    the adaptive state they were folded into: a tick that fails loses none;
--  * a promotion committed by tick_begin is the one the next tick makes.

CREATE FUNCTION dispatch_policy._remove_observations(policy text, ids bigint[])
RETURNS TABLE (id bigint, gate text, partition text, lag_ms double precision, success boolean, observed_at timestamptz)
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  WITH taken AS (
    DELETE FROM dispatch_policy.observations o
    WHERE o.policy = _remove_observations.policy AND o.id = ANY (ids)
    RETURNING o.id, o.gate, o.partition, o.lag_ms, o.success, o.observed_at
  ), minutes AS (
    INSERT INTO dispatch_policy.observation_minutes AS m (policy, gate, partition, minute, completions, failures, lag_ms_sum)
    SELECT _remove_observations.policy, t.gate, t.partition, date_trunc('minute', t.observed_at),
           count(*) FILTER (WHERE t.success), count(*) FILTER (WHERE NOT t.success), sum(t.lag_ms)
    FROM taken t
    GROUP BY 2, 3, 4
    ORDER BY 2, 3, 4
    ON CONFLICT ON CONSTRAINT observation_minutes_pkey DO UPDATE
    SET completions = m.completions + EXCLUDED.completions,
        failures = m.failures + EXCLUDED.failures,
        lag_ms_sum = m.lag_ms_sum + EXCLUDED.lag_ms_sum
  )
  SELECT t.id, t.gate, t.partition, t.lag_ms, t.success, t.observed_at FROM taken t ORDER BY t.id
$$;
COMMENT ON FUNCTION dispatch_policy._remove_observations(text, bigint[]) IS
  'Internal: deletes the policy''s observations with these ids, adds them to observation_minutes and returns them (the one implementation behind take_observations and tick_finish).';

CREATE OR REPLACE FUNCTION dispatch_policy.take_observations(policy text, gate text, max_rows integer DEFAULT 10000)
RETURNS TABLE (id bigint, partition text, lag_ms double precision, success boolean, observed_at timestamptz)
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT r.id, r.partition, r.lag_ms, r.success, r.observed_at
  FROM dispatch_policy._remove_observations(take_observations.policy, ARRAY(
         SELECT x.id FROM dispatch_policy.observations x
         WHERE x.policy = take_observations.policy AND x.gate = take_observations.gate
         ORDER BY x.id LIMIT max_rows FOR UPDATE SKIP LOCKED)) r
$$;

-- Releases what tick_begin took: the session-level tick lock (once, or
-- every level this session holds, which pg_locks tells), and the session's
-- statement_timeout and idle_session_timeout as they were before the tick.
-- The lock is first taken at transaction level too, so it is held until
-- this transaction commits: another runner never ticks the policy before
-- the writes of this one are visible (the session lock alone is given back
-- before the commit, and a runner that got in between read counters and
-- observations from before it: caps exceeded, observations folded twice).
-- Defined here because tick_abort's SQL body below needs it when it is
-- created; the definition in force (folding first, 0016; forgetting what
-- the tick fetched) is 0026_admit_integrity.sql's.
CREATE FUNCTION dispatch_policy._tick_release(policy text, all_levels boolean)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  key bigint := dispatch_policy._tick_lock_key(_tick_release.policy);
  marker text := coalesce(current_setting('dispatch_policy.tick_locked', true), '');
  saved text;
  released boolean := false;
BEGIN
  -- The settings belong to this session's tick, of this policy only.
  IF marker IN ('', _tick_release.policy) THEN
    saved := current_setting('dispatch_policy.timeout_outside_tick', true);
    IF saved IS NOT NULL AND saved <> '' THEN
      PERFORM set_config('statement_timeout', saved, false);
      PERFORM set_config('dispatch_policy.timeout_outside_tick', '', false);
    END IF;
    saved := current_setting('dispatch_policy.idle_outside_tick', true);
    IF saved IS NOT NULL AND saved <> '' THEN
      PERFORM set_config('idle_session_timeout', saved, false);
      PERFORM set_config('dispatch_policy.idle_outside_tick', '', false);
    END IF;
    PERFORM set_config('dispatch_policy.tick_locked', '', false);
  END IF;
  IF NOT all_levels THEN
    -- Granted at once: this session holds the lock (never waits for another's).
    PERFORM pg_try_advisory_xact_lock(key);
    RETURN pg_advisory_unlock(key);
  END IF;
  -- After a failure: this transaction wrote nothing of the tick (the failed
  -- call rolled back), so no transaction-level hold is needed. pg_locks shows
  -- one row for every level held.
  WHILE dispatch_policy._holds_tick_lock(_tick_release.policy) LOOP
    EXIT WHEN NOT pg_advisory_unlock(key);
    released := true;
  END LOOP;
  RETURN released;
END
$$;
COMMENT ON FUNCTION dispatch_policy._tick_release(text, boolean) IS
  'Internal: gives back the session-level tick lock of a policy (once, or every level held: all_levels), holding it at transaction level until this transaction ends, and restores the statement_timeout and idle_session_timeout tick_begin replaced (when the tick under way is of this policy).';

-- Whether this session holds the policy's tick lock at session level.
CREATE FUNCTION dispatch_policy._holds_tick_lock(policy text)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted AND l.objsubid = 1
      AND l.mode = 'ExclusiveLock'
      AND l.classid::text::bigint = (dispatch_policy._tick_lock_key(_holds_tick_lock.policy) >> 32) & 4294967295
      AND l.objid::text::bigint = dispatch_policy._tick_lock_key(_holds_tick_lock.policy) & 4294967295)
$$;
COMMENT ON FUNCTION dispatch_policy._holds_tick_lock(text) IS
  'Internal: whether this session holds the tick lock of a policy, at any level (pg_locks).';

CREATE FUNCTION dispatch_policy.tick_abort(policy text)
RETURNS boolean
LANGUAGE sql VOLATILE STRICT SECURITY INVOKER
AS $$
  SELECT dispatch_policy._tick_release(tick_abort.policy, true)
$$;
COMMENT ON FUNCTION dispatch_policy.tick_abort(text) IS
  'Ends a tick of the policy begun in this session without admitting: gives back every level of the tick lock this session holds and, when the tick under way is of this policy, restores statement_timeout and idle_session_timeout. Whether a lock was held. Safe to call when none is (a runner calls it after any failed tick).';

CREATE FUNCTION dispatch_policy.tick_finish(
  policy text, now timestamptz,
  ids bigint[], gate_names text[], partitions text[],
  take_gates text[], take_partitions text[], take_tokens double precision[],
  lease_seconds integer DEFAULT NULL, round_robin_cursor jsonb DEFAULT NULL,
  adaptive_gates text[] DEFAULT '{}', adaptive_partitions text[] DEFAULT '{}', current_max integer[] DEFAULT '{}',
  ewma_lag_ms double precision[] DEFAULT '{}', growth_credit double precision[] DEFAULT '{}',
  since_decrease bigint[] DEFAULT '{}', observations bigint[] DEFAULT '{}', failures bigint[] DEFAULT '{}',
  last_observed_at timestamptz[] DEFAULT '{}',
  block_lanes text[] DEFAULT '{}', block_keyless boolean[] DEFAULT '{}', block_seconds double precision[] DEFAULT '{}',
  block_gates text[] DEFAULT '{}', block_partitions text[] DEFAULT '{}', block_in_flight integer[] DEFAULT '{}',
  unblock_gates text[] DEFAULT '{}', unblock_partitions text[] DEFAULT '{}', observation_ids bigint[] DEFAULT '{}'
)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  admitted integer := 0;
  check_gates text[];
  check_partitions text[];
  interleave jsonb;
BEGIN
  IF current_setting('dispatch_policy.tick_locked', true) IS DISTINCT FROM tick_finish.policy THEN
    RAISE EXCEPTION 'no tick of policy % is under way in this session', quote_literal(tick_finish.policy)
      USING ERRCODE = '55000', HINT = 'Call tick_begin first, in the same session; nothing was changed.';
  END IF;
  PERFORM dispatch_policy._require_policy(tick_finish.policy);
  PERFORM dispatch_policy._require_now(tick_finish.now);
  IF EXISTS (SELECT 1 FROM unnest(block_seconds) AS b(secs) WHERE b.secs IS NULL OR b.secs = 'NaN' OR b.secs < 0) THEN
    RAISE EXCEPTION 'block_seconds must be 0 or more (Infinity: until released)'
      USING ERRCODE = '22023', HINT = 'Nothing was changed.';
  END IF;
  PERFORM dispatch_policy._require_same_length(
    'block_lanes, block_keyless, block_seconds, block_gates, block_partitions and block_in_flight',
    ARRAY[cardinality(block_lanes), cardinality(block_keyless), cardinality(block_seconds), cardinality(block_gates),
          cardinality(block_partitions), cardinality(block_in_flight)]);
  PERFORM dispatch_policy._require_same_length('unblock_gates and unblock_partitions', ARRAY[
    cardinality(unblock_gates), cardinality(unblock_partitions)]);
  -- Counters a block waits on are locked with the admission's, in one sorted
  -- statement, and the block applies only if the counter is still where the
  -- decision saw it: a slot released since then unblocks nothing, because the
  -- lane was not blocked yet, so the lane must not be blocked now.
  SELECT coalesce(array_agg(b.g), '{}'), coalesce(array_agg(b.p), '{}') INTO check_gates, check_partitions
  FROM unnest(block_gates, block_partitions, block_in_flight) AS b(g, p, f) WHERE b.f >= 0;
  -- fair_interleave's rounds travel in the cursor; the rest is admit's.
  IF jsonb_typeof(round_robin_cursor) = 'object' AND round_robin_cursor ? 'interleave' THEN
    interleave := round_robin_cursor -> 'interleave';
    round_robin_cursor := nullif(round_robin_cursor - 'interleave', '{}'::jsonb);
  END IF;
  IF coalesce(cardinality(ids), 0) > 0 OR round_robin_cursor IS NOT NULL OR cardinality(check_gates) > 0 THEN
    admitted := dispatch_policy._admit(tick_finish.policy, ids, gate_names, partitions, take_gates, take_partitions,
                                       take_tokens, tick_finish.lease_seconds, tick_finish.now, round_robin_cursor,
                                       check_gates, check_partitions);
  END IF;
  IF jsonb_typeof(interleave) = 'object' THEN
    INSERT INTO dispatch_policy.round_robin_cursors AS c (policy, last_key, updated_at, interleave)
    VALUES (tick_finish.policy, NULL, tick_finish.now, interleave)
    ON CONFLICT ON CONSTRAINT round_robin_cursors_pkey
    DO UPDATE SET interleave = EXCLUDED.interleave WHERE c.interleave IS DISTINCT FROM EXCLUDED.interleave;
  END IF;
  IF coalesce(cardinality(block_lanes), 0) > 0 THEN
    UPDATE dispatch_policy.lanes l
    -- A block by time lasts 30 days at most (a rate of one a year would
    -- overflow a timestamp); then the lane is looked at again.
    SET blocked_until = CASE WHEN b.secs = 'Infinity' THEN 'infinity'::timestamptz
                             ELSE tick_finish.now + make_interval(secs => least(b.secs, 2592000)) END,
        blocked_gate = nullif(b.g, ''),
        blocked_partition = CASE WHEN b.g = '' THEN NULL ELSE b.p END,
        updated_at = tick_finish.now
    FROM unnest(block_lanes, block_keyless, block_seconds, block_gates, block_partitions, block_in_flight)
         AS b(lane, keyless, secs, g, p, f)
    WHERE l.policy = tick_finish.policy AND l.blocked_until IS NULL
      AND ((NOT b.keyless AND l.lane = b.lane) OR (b.keyless AND l.lane IS NULL))
      AND (b.f < 0 OR EXISTS (SELECT 1 FROM dispatch_policy.inflight_counters c
                              WHERE c.policy = tick_finish.policy AND c.gate = b.g AND c.partition = b.p
                                AND c.in_flight >= b.f));
  END IF;
  IF coalesce(cardinality(adaptive_gates), 0) > 0 THEN
    PERFORM dispatch_policy._save_adaptive(tick_finish.policy, adaptive_gates, adaptive_partitions, current_max,
                                           ewma_lag_ms, growth_credit, since_decrease, observations, failures,
                                           last_observed_at, tick_finish.now);
  END IF;
  -- Adaptive caps that grew: lanes waiting on them are ready again.
  IF coalesce(cardinality(unblock_gates), 0) > 0 THEN
    UPDATE dispatch_policy.lanes l
    SET blocked_until = NULL, blocked_gate = NULL, blocked_partition = NULL, updated_at = tick_finish.now
    FROM unnest(unblock_gates, unblock_partitions) AS u(g, p)
    WHERE l.policy = tick_finish.policy AND l.blocked_gate = u.g AND l.blocked_partition = u.p
      AND l.blocked_until IS NOT NULL;
  END IF;
  -- The observations folded into the state just saved.
  IF coalesce(cardinality(observation_ids), 0) > 0 THEN
    PERFORM FROM dispatch_policy._remove_observations(tick_finish.policy, observation_ids);
  END IF;
  PERFORM dispatch_policy._tick_release(tick_finish.policy, false);
  RETURN admitted;
END
$$;
COMMENT ON FUNCTION dispatch_policy.tick_finish(text, timestamptz, bigint[], text[], text[], text[], text[], double precision[], integer, jsonb, text[], text[], integer[], double precision[], double precision[], bigint[], bigint[], bigint[], timestamptz[], text[], boolean[], double precision[], text[], text[], integer[], text[], text[], bigint[]) IS
  'The last call of a tick begun by tick_begin in this session (55000 otherwise), in one transaction; it gives the tick lock back and restores the statement_timeout (on an error, call tick_abort). It does: admit (ids; gate_names; partitions, one per job and gate name, job after job; takes as take_gates, take_partitions, take_tokens; lease_seconds; round_robin_cursor); keep where fair_interleave''s rounds stopped (round_robin_cursor''s "interleave" object, stored as round_robin_cursors.interleave); block lanes (block_lanes, or the keyless lane where block_keyless; for block_seconds, at most 30 days, ''Infinity'' for until released; on block_gates/block_partitions ('''' for time alone), only while that counter still holds block_in_flight or more, -1 for no check); save_adaptive (parallel arrays, as its fields); unblock lanes waiting on adaptive partitions whose cap grew (unblock_gates, unblock_partitions); delete the observations folded (observation_ids, as tick_begin returned them; added to observation_minutes). Returns the number admitted.';

-- pause waits for a tick under way (its admissions are the last); a paused
-- policy's next tick_begin admits nothing.
CREATE OR REPLACE FUNCTION dispatch_policy.pause(policy text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_policy(pause.policy);
  PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(pause.policy));
  UPDATE dispatch_policy.policies p SET paused = true, updated_at = now()
  WHERE p.name = pause.policy AND NOT p.paused;
END
$$;
COMMENT ON FUNCTION dispatch_policy.pause(text) IS
  'Stops admission for a policy; staging continues. Waits for a tick of it under way to end, so nothing is admitted after pause returns. Unknown policy: SQLSTATE 42704.';
