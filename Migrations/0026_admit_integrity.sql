-- Admission integrity: a tick admits only the jobs as it decided on them.
--
-- A tick is three statements in autocommit: tick_begin fetches a batch and
-- commits (the rows are not locked after it), the runner decides in memory
-- from the contexts it fetched, tick_finish admits. Since 0023 a stager can
-- change a staged job in between: dedupe_mode replace gives it other args,
-- context (so other partitions and costs), round-robin key, priority and
-- not_before (debounce); drop_oldest (and cancel) finishes it. _admit used
-- to admit whatever the row held by then, with the slots and tokens the
-- runner counted for the old context (a cap was overfilled, check() found
-- counter and slot mismatches), and failed the whole tick (55000) for a job
-- gone meanwhile.
--
-- Now tick_begin keeps, in session settings until the tick ends, the ids of
-- the jobs it returns with their row versions (xmin: every write of a row
-- gives it a new one, so an equal xmin is an unchanged row), and the
-- throttle costs the runner derives from their contexts (policies with cost
-- gates only). _admit's DELETE of the jobs to admit (which locks them, and
-- re-reads a row replaced while it waited) takes a fetched job only with
-- its fetched xmin; the others are skipped without an error: their slots
-- are not counted and the tokens the runner took for them are given back
-- (min(cost, burst) in each throttle partition). A replaced job stays
-- staged and a later tick decides on it as it is now. Staging does not wait
-- for ticks for this (nothing is locked between the calls; as before, the
-- admission waits for a stager holding a row it admits). tick_finish
-- returns the number admitted, which does not count the skipped jobs; no
-- signature changes. The comparison is exact: a row written after the
-- fetch has the xmin of a transaction still running when tick_begin
-- committed, never the fetched one (xids do not wrap within a tick, which
-- its timeouts bound to seconds); a write that changes nothing still counts
-- as a change (the job waits for the next tick); freezing keeps the xmin
-- that the column shows.
--
-- Expiry runs once a tick: in fetch_batch (in tick_begin when it does not
-- call fetch_batch), no longer also in promote_scheduled, which now never
-- makes a job past its deadline eligible.

-- tick_begin, defined once in 0.2.0 (the first call of a tick, 0014; an
-- idle_session_timeout of at least 10 s between a tick's calls, 0018;
-- only_gate and only_partition, 0019): it keeps what it fetched (ids, row
-- versions, throttle costs) for _admit, and expires when it does not fetch.
CREATE FUNCTION dispatch_policy.tick_begin(
  policy text, batch_size integer, round_robin_quantum integer, max_observations integer DEFAULT 10000,
  timeout_ms integer DEFAULT NULL, only_gate text DEFAULT NULL, only_partition text DEFAULT NULL
)
RETURNS TABLE (kind text, id bigint, priority integer, round_robin_key text, context text, lane integer,
               gate text, partition text, lag_ms double precision, success boolean, observed_at timestamptz,
               config text, now timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  pol dispatch_policy.policies;
  at timestamptz;
  batch integer;
  quantum integer;
  adaptive_gate text;
  fetched integer := 0;
  only_template text;
  observed integer := 0;
  got_ids bigint[] := '{}'::bigint[];
  got_versions bigint[] := '{}'::bigint[];
  version_ids bigint[] := '{}'::bigint[];
  got_priorities integer[];
  got_keys text[];
  got_contexts jsonb[];
  got_lanes integer[];
BEGIN
  IF timeout_ms IS NOT NULL AND timeout_ms < 1 THEN
    RAISE EXCEPTION 'timeout_ms must be 1 or more (NULL: the session''s statement_timeout)'
      USING ERRCODE = '22023', DETAIL = format('timeout_ms is %s.', timeout_ms);
  END IF;
  -- An admission from one gate partition (admit_now): checked before the
  -- lock, so a bad argument takes nothing.
  IF only_gate IS NOT NULL OR only_partition IS NOT NULL THEN
    IF (only_gate IS NULL) <> (only_partition IS NULL) THEN
      RAISE EXCEPTION 'only_gate and only_partition must be given together'
        USING ERRCODE = '22023',
              DETAIL = format('%s is NULL.', CASE WHEN only_gate IS NULL THEN 'only_gate' ELSE 'only_partition' END),
              HINT = 'Give both to admit from one gate partition, neither for a tick of the whole policy.';
    END IF;
    only_template := dispatch_policy._require_partitioned_gate(dispatch_policy._require_policy(tick_begin.policy), only_gate)
                       ->> 'partition_by';
    PERFORM dispatch_policy._require_partition(only_partition);
    IF tick_begin.batch_size IS NULL OR NOT dispatch_policy._within_limit(tick_begin.batch_size, 'batch_size') THEN
      RAISE EXCEPTION 'batch_size %', dispatch_policy._limit_rule('batch_size')
        USING ERRCODE = '22023', DETAIL = format('batch_size is %s.', coalesce(tick_begin.batch_size::text, 'NULL'));
    END IF;
  END IF;
  IF coalesce(current_setting('dispatch_policy.tick_locked', true), '') <> '' THEN
    RAISE EXCEPTION 'this session is in the tick of policy %', quote_literal(current_setting('dispatch_policy.tick_locked'))
      USING ERRCODE = '55000', HINT = 'End it with tick_finish or tick_abort first.';
  END IF;
  -- A tick_begin rolled back with its transaction (BEGIN ... ROLLBACK) keeps
  -- the lock, which is not transactional: taking it again would stack a
  -- level that tick_finish never gives back.
  IF dispatch_policy._holds_tick_lock(tick_begin.policy) THEN
    RAISE EXCEPTION 'this session still holds the tick lock of policy % from a tick that did not end', quote_literal(tick_begin.policy)
      USING ERRCODE = '55000', HINT = 'Call dispatch_policy.tick_abort(policy) (a tick_begin rolled back with its transaction keeps the lock).';
  END IF;
  -- Session level: the lock outlives this call's transaction, until
  -- tick_finish or tick_abort (or the session's end).
  IF NOT pg_try_advisory_lock(dispatch_policy._tick_lock_key(tick_begin.policy)) THEN
    RETURN QUERY SELECT 'busy'::text, NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::integer, NULL::text,
                        NULL::text, NULL::float8, NULL::boolean, NULL::timestamptz, NULL::text, NULL::timestamptz;
    RETURN;
  END IF;
  PERFORM set_config('dispatch_policy.tick_locked', tick_begin.policy, false);
  -- Bounds the tick's later calls (tick_state, tick_finish): a slow sql
  -- target fails its policy's tick instead of holding the runner.
  IF timeout_ms IS NOT NULL THEN
    PERFORM set_config('dispatch_policy.timeout_outside_tick', current_setting('statement_timeout'), false);
    PERFORM set_config('statement_timeout', timeout_ms::text, false);
  END IF;
  -- Between the calls the session is idle, not in a transaction: a client
  -- that stops answering (frozen, partitioned away) would keep the lock
  -- until TCP gives up. The server ends a session idle this long (at least
  -- a second; 60 s without timeout_ms) and the lock with it.
  PERFORM set_config('dispatch_policy.idle_outside_tick', current_setting('idle_session_timeout'), false);
  -- At least 10 s: the client works between the calls (a loaded machine
  -- once took over a second), and a session ended mid-tick fails the tick.
  PERFORM set_config('idle_session_timeout', greatest(coalesce(timeout_ms, 60000), 10000)::text, false);
  -- Time is read after the lock, so it never goes backwards between ticks of
  -- one policy; every primitive gets this same time.
  at := clock_timestamp();
  SELECT * INTO pol FROM dispatch_policy.policies p WHERE p.name = tick_begin.policy;
  IF NOT FOUND OR pol.paused THEN
    PERFORM dispatch_policy._tick_release(tick_begin.policy, false);
    RETURN QUERY SELECT CASE WHEN pol.name IS NULL THEN 'unknown' ELSE 'paused' END, NULL::bigint, NULL::integer,
                        NULL::text, NULL::text, NULL::integer, NULL::text, NULL::text, NULL::float8, NULL::boolean,
                        NULL::timestamptz, NULL::text, NULL::timestamptz;
    RETURN;
  END IF;
  -- From one partition: exactly as many as asked (checked above).
  -- The gate as the policy is now (it may have been redeclared since the
  -- check): a gate no longer partitioned fetches nothing.
  IF only_gate IS NOT NULL THEN
    only_template := dispatch_policy._partitioned_gate(pol.config, only_gate) ->> 'partition_by';
  END IF;
  batch := CASE WHEN only_gate IS NOT NULL THEN tick_begin.batch_size
                ELSE coalesce(dispatch_policy._json_number(pol.config -> 'batch_size')::integer, tick_begin.batch_size,
                              dispatch_policy._policy_setting(pol.config, 'batch_size')) END;
  quantum := coalesce(dispatch_policy._json_number(pol.config -> 'round_robin_quantum')::integer, tick_begin.round_robin_quantum);
  IF NOT dispatch_policy._within_limit(batch, 'batch_size') THEN
    PERFORM dispatch_policy._tick_release(tick_begin.policy, false);
    RAISE EXCEPTION 'batch_size %', dispatch_policy._limit_rule('batch_size')
      USING ERRCODE = '22023', DETAIL = format('batch_size is %s.', batch);
  END IF;
  IF quantum IS NOT NULL AND NOT dispatch_policy._within_limit(quantum, 'round_robin_quantum') THEN
    PERFORM dispatch_policy._tick_release(tick_begin.policy, false);
    RAISE EXCEPTION 'round_robin_quantum %', dispatch_policy._limit_rule('round_robin_quantum')
      USING ERRCODE = '22023', DETAIL = format('round_robin_quantum is %s.', quantum);
  END IF;

  RETURN QUERY SELECT 'tick'::text, NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::integer, NULL::text,
                      NULL::text, NULL::float8, NULL::boolean, NULL::timestamptz, pol.config::text, at;

  -- Read, not removed: tick_finish deletes the ones it folded.
  FOREACH adaptive_gate IN ARRAY dispatch_policy._gates_of_type(pol.config, 'adaptive_concurrency') LOOP
    RETURN QUERY
    SELECT 'observation'::text, o.id, NULL::integer, NULL::text, NULL::text, NULL::integer, adaptive_gate, o.partition,
           o.lag_ms, o.success, o.observed_at, NULL::text, NULL::timestamptz
    FROM dispatch_policy.observations o
    WHERE o.policy = tick_begin.policy AND o.gate = adaptive_gate
    ORDER BY o.id LIMIT greatest(coalesce(max_observations, 10000), 0);
    GET DIAGNOSTICS fetched = ROW_COUNT;
    observed := observed + fetched;
  END LOOP;
  fetched := 0;

  PERFORM dispatch_policy.promote_scheduled(tick_begin.policy, batch, at);

  -- A full global cap admits nothing: fetch nothing (no batch slot taken, no
  -- lane blocked for it); a released slot wakes the runner.
  IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(pol.config -> 'gates', '[]'::jsonb)) AS g
                 JOIN dispatch_policy.inflight_counters c
                   ON c.policy = tick_begin.policy AND c.gate = coalesce(g ->> 'name', g ->> 'type') AND c.partition = 'default'
                 WHERE g ->> 'type' = 'global_cap' AND c.in_flight >= dispatch_policy._json_number(g -> 'max')) THEN
    IF only_gate IS NULL THEN
      SELECT coalesce(array_agg(f.id ORDER BY f.n), '{}'), array_agg(f.priority ORDER BY f.n), array_agg(f.round_robin_key ORDER BY f.n),
             array_agg(f.context ORDER BY f.n), array_agg(f.lane ORDER BY f.n)
      INTO got_ids, got_priorities, got_keys, got_contexts, got_lanes
      FROM dispatch_policy.fetch_batch(tick_begin.policy, batch, quantum, at)
             WITH ORDINALITY AS f(id, priority, round_robin_key, context, lane, n);
    ELSE
      -- fetch_batch expires the policy's jobs whose deadline passed; this
      -- fetch does not.
      PERFORM dispatch_policy._expire_staged(tick_begin.policy, at);
      SELECT coalesce(array_agg(f.id ORDER BY f.n), '{}'), array_agg(f.priority ORDER BY f.n), array_agg(f.round_robin_key ORDER BY f.n),
             array_agg(f.context ORDER BY f.n), array_agg(f.lane ORDER BY f.n)
      INTO got_ids, got_priorities, got_keys, got_contexts, got_lanes
      FROM dispatch_policy._fetch_partition(tick_begin.policy, only_template, only_partition, batch)
             WITH ORDINALITY AS f(id, priority, round_robin_key, context, lane, n);
    END IF;
    fetched := cardinality(got_ids);
    -- Each fetched row's version, read in a statement after the fetch
    -- locked it (so as the fetch returned it): xmin, which every write of
    -- the row changes. By primary key (= ANY of an array), in index order.
    SELECT coalesce(array_agg(s.id), '{}'), coalesce(array_agg(s.xmin::text::bigint), '{}') INTO version_ids, got_versions
    FROM dispatch_policy.staged_jobs s WHERE s.id = ANY (got_ids);
  ELSE
    -- No fetch: expiry still runs every tick.
    PERFORM dispatch_policy._expire_staged(tick_begin.policy, at);
  END IF;
  -- What _admit compares in tick_finish: the rows are not locked between
  -- the calls, and a stager may replace (dedupe_mode replace) or drop
  -- (drop_oldest) one meanwhile. With the throttle costs the runner reads
  -- from the contexts returned here, _admit gives back what the runner took
  -- for a job it skips.
  PERFORM set_config('dispatch_policy.tick_fetched_ids', version_ids::text, false);
  PERFORM set_config('dispatch_policy.tick_fetched_versions', got_versions::text, false);
  PERFORM set_config('dispatch_policy.tick_fetched_costs',
                     CASE WHEN pol.cost_gates IS NULL OR fetched = 0 THEN ''
                          ELSE (SELECT jsonb_object_agg(g.id::text, (
                                         SELECT jsonb_object_agg(c.g ->> 'name',
                                                                 dispatch_policy._gate_number(c.g -> 'cost', g.context, 'throttle.cost'))
                                         FROM jsonb_array_elements(pol.cost_gates) AS c(g)))
                                FROM unnest(got_ids, got_contexts) AS g(id, context))::text END,
                     false);
  RETURN QUERY
  SELECT 'job'::text, g.id, g.priority, g.round_robin_key, g.context::text, g.lane, NULL::text, NULL::text,
         NULL::float8, NULL::boolean, NULL::timestamptz, NULL::text, NULL::timestamptz
  FROM unnest(got_ids, got_priorities, got_keys, got_contexts, got_lanes) WITH ORDINALITY
         AS g(id, priority, round_robin_key, context, lane, n)
  ORDER BY g.n;

  -- Nothing to admit or fold: the tick ends here (one round trip).
  IF fetched = 0 AND observed = 0 THEN
    PERFORM dispatch_policy._tick_release(tick_begin.policy, false);
    RETURN QUERY SELECT 'done'::text, NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::integer, NULL::text,
                        NULL::text, NULL::float8, NULL::boolean, NULL::timestamptz, NULL::text, NULL::timestamptz;
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.tick_begin(text, integer, integer, integer, integer, text, text) IS
  'The first call of a tick; the tick''s calls run in autocommit, each its own transaction. Takes the policy''s tick lock at session level (held until tick_finish, tick_abort or the session''s end; 55000 if this session is already in a tick or still holds the lock) and, until then, sets the session''s statement_timeout to timeout_ms and its idle_session_timeout to timeout_ms (at least 10 s; 60 s without timeout_ms), so a client that stops answering between the calls loses its session and the lock; then, if the policy is not paused: reads (does not remove) up to max_observations observations of every adaptive gate, promote_scheduled and fetch_batch (without a fetch, _expire_staged), with the policy''s batch_size and round_robin_quantum (else the arguments); no fetch while a global_cap is full. With only_gate and only_partition (both or neither; admit now): the fetch is instead up to batch_size (1 to limits() batch_size, the policy''s own ignored) eligible jobs whose partition of that gate is only_partition (_fetch_partition), outside the rotation; the caller should finish with round_robin_cursor {"hold": true} and no lane blocks. Errors then, before any lock: unknown policy or gate 42704, NULL gate or partition 22004, a gate that is not partitioned, a partition over limits() partition_key, batch_size out of bounds, one of the pair without the other 22023. Rows by kind: busy, unknown or paused (one row; nothing else done, no lock kept); tick (config and the tick''s time, first); observation (id, gate, partition, lag_ms, success, observed_at); job (id, priority, round_robin_key, context, lane, in fetch order); done (last: nothing fetched or observed, the lock is given back and the tick is over). The ids and row versions of the jobs returned (and their throttle costs, for a policy with cost gates) are kept in the session (settings dispatch_policy.tick_fetched_*) until the tick ends: tick_finish admits a job only if its row is unchanged since (see _admit).';

-- _tick_release (0014's, which tick_abort needs when it is created; folding
-- the history deltas first, 0016) forgets what the tick fetched.
CREATE OR REPLACE FUNCTION dispatch_policy._tick_release(policy text, all_levels boolean)
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
    PERFORM set_config('dispatch_policy.tick_fetched_ids', '', false);
    PERFORM set_config('dispatch_policy.tick_fetched_versions', '', false);
    PERFORM set_config('dispatch_policy.tick_fetched_costs', '', false);
  END IF;
  IF NOT all_levels THEN
    PERFORM dispatch_policy._fold_stats_if_due();
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
  'Internal: gives back the session-level tick lock of a policy (once, or every level held: all_levels), holding it at transaction level until this transaction ends, and restores the statement_timeout and idle_session_timeout tick_begin replaced and forgets the jobs it fetched (when the tick under way is of this policy). At the end of a tick (not all_levels) it first folds history deltas when due (_fold_stats_if_due).';

-- promote_scheduled, defined once in 0.2.0 (0.1.0's, now checked by
-- _require_now, 0008): it expires nothing (the fetch does, see above) and
-- never makes a job whose deadline passed eligible.
CREATE OR REPLACE FUNCTION dispatch_policy.promote_scheduled(policy text, max_rows integer, now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  promoted integer;
BEGIN
  PERFORM dispatch_policy._require_now(promote_scheduled.now);
  UPDATE dispatch_policy.staged_jobs s SET not_before = NULL
  WHERE s.id IN (
    SELECT d.id FROM dispatch_policy.staged_jobs d
    WHERE d.policy = promote_scheduled.policy AND d.not_before IS NOT NULL AND d.not_before <= promote_scheduled.now
      AND (d.expires_at IS NULL OR d.expires_at > promote_scheduled.now)
    ORDER BY d.not_before
    LIMIT max_rows
    FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS promoted = ROW_COUNT;
  RETURN promoted;
END
$$;
COMMENT ON FUNCTION dispatch_policy.promote_scheduled(text, integer, timestamptz) IS
  'Makes up to max_rows scheduled jobs of a policy whose not_before has passed eligible (earliest first; rows locked elsewhere are skipped), never one whose expires_at has passed (the fetch finishes those as expired). Returns how many were made eligible. Run by tick_begin before each fetch.';

-- _admit, defined once in 0.2.0: the one implementation of admit and of
-- tick_finish's admission (0014). jobs: ids; for each job its partition of
-- every gate in gate_names, as one flat array (job 1's partitions, then job
-- 2's, ...; NULL: the job has no partition for that gate). The round-robin
-- cursor also keeps served and served_lane (weighted lanes, 0024). In a
-- tick, jobs changed or gone since the fetch are skipped (see the top of
-- this file).
CREATE FUNCTION dispatch_policy._admit(
  policy text, ids bigint[], gate_names text[], partitions text[],
  take_gates text[], take_partitions text[], take_tokens double precision[],
  lease_seconds integer, now timestamptz, round_robin_cursor jsonb,
  lock_gates text[] DEFAULT '{}', lock_partitions text[] DEFAULT '{}'
)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  admitted integer := 0;
  config jsonb;
  lease integer;
  slot_gates text[];
  job record;
  queues text[];
  queue_name text;
  keys text[];
  cursor_key text;
  slot_g text[];
  slot_p text[];
  slot_n integer[];
  width integer := coalesce(cardinality(gate_names), 0);
  starved jsonb := round_robin_cursor -> 'starved';
  starved_weight integer;
  starved_offset integer := 0;
  new_served integer := 0;
  old_served integer;
  old_served_lane text;
  fetched_ids bigint[];
  fetched_versions bigint[];
  fetched_costs jsonb;
  admitted_ids bigint[];
  expected bigint[];
  skipped_at bigint[];
BEGIN
  PERFORM dispatch_policy._require_now(_admit.now);
  ids := coalesce(ids, '{}');
  IF coalesce(cardinality(partitions), 0) <> cardinality(ids) * width THEN
    RAISE EXCEPTION 'partitions must hold one entry per job and gate name'
      USING ERRCODE = '22023',
            DETAIL = format('%s jobs and %s gate names need %s partitions; there are %s.', cardinality(ids), width,
                            cardinality(ids) * width, coalesce(cardinality(partitions), 0)),
            HINT = 'Nothing was admitted.';
  END IF;
  PERFORM dispatch_policy._require_same_length('take_gates, take_partitions and take_tokens', ARRAY[
    cardinality(take_gates), cardinality(take_partitions), cardinality(take_tokens)]);
  PERFORM dispatch_policy._require_same_length('lock_gates and lock_partitions', ARRAY[
    cardinality(lock_gates), cardinality(lock_partitions)]);
  config := (dispatch_policy._require_policy(_admit.policy)).config;
  lease := coalesce(_admit.lease_seconds, dispatch_policy._policy_setting(config, 'lease_seconds'));
  IF NOT dispatch_policy._within_limit(lease, 'lease_seconds') THEN
    RAISE EXCEPTION 'lease_seconds %', dispatch_policy._limit_rule('lease_seconds')
      USING ERRCODE = '22023', DETAIL = format('lease_seconds is %s.', lease), HINT = 'Nothing was admitted.';
  END IF;
  slot_gates := dispatch_policy._slot_gates(config);

  -- In a tick, the jobs were fetched (and decided on) in an earlier
  -- transaction and were not locked since: a stager may have replaced one
  -- (other context, partitions, cost, not_before) or finished it (dropped,
  -- cancelled). tick_begin kept the ids and row versions (xmin) it fetched;
  -- only a row still staged with its fetched version is admitted below. The
  -- others are skipped: not admitted, nothing taken for them, no error; a
  -- replaced job stays staged for a later tick, which decides on it as it
  -- is now.
  IF cardinality(ids) > 0 AND current_setting('dispatch_policy.tick_locked', true) IS NOT DISTINCT FROM _admit.policy
     AND coalesce(current_setting('dispatch_policy.tick_fetched_ids', true), '') <> '' THEN
    fetched_ids := current_setting('dispatch_policy.tick_fetched_ids')::bigint[];
    fetched_versions := current_setting('dispatch_policy.tick_fetched_versions')::bigint[];
    -- Each id's fetched version (a hash join of two arrays; -1: not fetched
    -- by this tick, not checked).
    expected := ARRAY(SELECT coalesce(v.version, -1)
                      FROM unnest(ids) WITH ORDINALITY AS j(id, n)
                      LEFT JOIN unnest(fetched_ids, fetched_versions) AS v(id, version) ON v.id = j.id
                      ORDER BY j.n);
  END IF;

  -- Lock order. Every path that writes these tables takes their rows in
  -- this order, each table's rows in one sorted statement, so none
  -- deadlocks with another: inflight_counters (policy, gate, partition),
  -- then staged_jobs (by id), then backlog_counters (policy, lane, NULL
  -- last: the staged_jobs statement triggers). Here: the counters first;
  -- fail, defer and the reaper release slots (inflight_counters) and then
  -- re-stage (backlog_counters); a stager locks the staged jobs it replaces
  -- by id and then its backlog counters; complete takes in-flight counters
  -- alone.
  IF cardinality(ids) > 0 THEN
    -- The counters of every job's slots (a skipped job's too: which jobs
    -- are skipped is known only once their rows are locked, below), created
    -- when missing, locked with lock_gates/lock_partitions in one sorted
    -- statement.
    SELECT coalesce(array_agg(s.g ORDER BY s.g, s.p), '{}'), coalesce(array_agg(s.p ORDER BY s.g, s.p), '{}')
    INTO slot_g, slot_p
    FROM (SELECT DISTINCT gate_names[((e.n - 1) % width) + 1] AS g, e.p
          FROM unnest(partitions) WITH ORDINALITY AS e(p, n)
          WHERE e.p IS NOT NULL AND gate_names[((e.n - 1) % width) + 1] = ANY (slot_gates)) s;
    IF cardinality(slot_g) > 0 THEN
      INSERT INTO dispatch_policy.inflight_counters AS c (policy, gate, partition, in_flight, updated_at)
      SELECT _admit.policy, k.g, k.p, 0, _admit.now FROM unnest(slot_g, slot_p) AS k(g, p)
      ORDER BY 2, 3
      ON CONFLICT ON CONSTRAINT inflight_counters_pkey DO NOTHING;
    END IF;
  END IF;
  IF coalesce(cardinality(slot_g), 0) + coalesce(cardinality(lock_gates), 0) > 0 THEN
    PERFORM 1 FROM dispatch_policy.inflight_counters c
    WHERE c.policy = _admit.policy
      AND (c.gate, c.partition) IN (SELECT k.g, k.p FROM unnest(slot_g, slot_p) AS k(g, p)
                                    UNION SELECT k.g, k.p FROM unnest(lock_gates, lock_partitions) AS k(g, p))
    ORDER BY c.policy, c.gate, c.partition
    FOR UPDATE;
  END IF;

  IF cardinality(ids) > 0 THEN
    -- Then the jobs' rows, by id (as a replacing stager locks the jobs it
    -- replaces), not in batch order. Rows are looked up by primary key (=
    -- ANY of an array), never by joining the staged table against a set the
    -- planner cannot size. A row replaced while this waited for it is
    -- locked as it is now, and its new xmin is checked below.
    PERFORM 1 FROM dispatch_policy.staged_jobs s
    WHERE s.id = ANY (ids) AND s.policy = _admit.policy
    ORDER BY s.id
    FOR UPDATE;
    WITH moved AS (
      DELETE FROM dispatch_policy.staged_jobs s
      USING unnest(ids, coalesce(expected, array_fill(-1::bigint, ARRAY[cardinality(ids)]))) AS e(id, version)
      WHERE s.id = ANY (ids) AND s.id = e.id AND s.policy = _admit.policy
        -- A job the tick fetched, only as it was fetched: with the xmin it
        -- had.
        AND (e.version = -1 OR e.version = s.xmin::text::bigint)
      RETURNING s.*
    ), parts AS (
      SELECT j.id,
             coalesce(jsonb_strip_nulls(jsonb_object(gate_names, partitions[(j.n - 1) * width + 1 : j.n * width])),
                      '{}'::jsonb) AS partitions
      FROM unnest(ids) WITH ORDINALITY AS j(id, n)
    ), inserted AS (
      INSERT INTO dispatch_policy.admitted_jobs
        (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, attempt, created_at, staged_at,
         admitted_at, lease_expires_at, partitions, lease_seconds, target)
      SELECT m.id, m.policy, m.queue, m.priority, m.args, m.context, m.dedupe_key, m.round_robin_key, m.attempt,
             m.created_at, m.staged_at, _admit.now, _admit.now + make_interval(secs => lease), pa.partitions, lease,
             CASE WHEN config -> 'target' ->> 'type' = 'sql' THEN 'sql' ELSE 'ready_queue' END
      FROM moved m JOIN parts pa ON pa.id = m.id
      RETURNING id, queue, round_robin_key
    )
    SELECT count(*)::integer, array_agg(DISTINCT i.queue), array_agg(DISTINCT i.round_robin_key), coalesce(array_agg(i.id), '{}')
    INTO admitted, queues, keys, admitted_ids FROM inserted i;
    IF admitted <> cardinality(ids) AND fetched_ids IS NOT NULL THEN
      -- Skipped: fetched jobs not admitted (changed or gone since the fetch).
      skipped_at := ARRAY(SELECT j.n FROM unnest(ids) WITH ORDINALITY AS j(id, n)
                          WHERE j.id = ANY (fetched_ids) AND NOT j.id = ANY (admitted_ids));
    END IF;
    IF admitted <> cardinality(ids) - coalesce(cardinality(skipped_at), 0) THEN
      RAISE EXCEPTION 'admit: % of % jobs are not staged for policy %', cardinality(ids) - admitted,
                      cardinality(ids), quote_literal(_admit.policy)
        USING ERRCODE = '55000',
              HINT = 'Admit only jobs fetched with fetch_batch while holding the policy''s tick lock; a job deleted since cannot be admitted (fetch again). After a failed tick_finish, call tick_abort.';
    END IF;
    IF cardinality(skipped_at) > 0 THEN
      IF coalesce(cardinality(take_gates), 0) > 0 THEN
        -- Give back what the runner took for them: min(cost, burst) in each
        -- of their throttle partitions (cost 1 unless the gate has one, as
        -- tick_begin saw it).
        fetched_costs := nullif(current_setting('dispatch_policy.tick_fetched_costs', true), '')::jsonb;
        WITH refunds AS (
          SELECT sp.g, sp.p, sum(least(coalesce((fetched_costs -> sp.id::text ->> sp.g)::float8, 1),
                                       coalesce(b.burst, 'Infinity'::float8))) AS tokens
          FROM (SELECT gate_names[k.k] AS g, partitions[(j.n - 1) * width + k.k] AS p, j.id
                FROM unnest(ids) WITH ORDINALITY AS j(id, n) CROSS JOIN generate_series(1, width) AS k(k)
                WHERE j.n = ANY (skipped_at)) sp
          LEFT JOIN dispatch_policy.throttle_buckets b ON b.policy = _admit.policy AND b.gate = sp.g AND b.partition = sp.p
          WHERE sp.p IS NOT NULL
            AND sp.g IN (SELECT coalesce(x.g ->> 'name', x.g ->> 'type')
                         FROM jsonb_array_elements(coalesce(config -> 'gates', '[]'::jsonb)) AS x(g)
                         WHERE x.g ->> 'type' = 'throttle')
          GROUP BY 1, 2
        )
        SELECT coalesce(array_agg(t.g ORDER BY t.g, t.p), '{}'), coalesce(array_agg(t.p ORDER BY t.g, t.p), '{}'),
               coalesce(array_agg(t.tokens ORDER BY t.g, t.p), '{}')
        INTO take_gates, take_partitions, take_tokens
        FROM (SELECT x.g, x.p, sum(x.tokens) - coalesce(max(r.tokens), 0) AS tokens
              FROM unnest(take_gates, take_partitions, take_tokens) AS x(g, p, tokens)
              LEFT JOIN refunds r ON r.g = x.g AND r.p = x.p
              GROUP BY 1, 2) t
        WHERE t.tokens > 0;
      END IF;
      -- And count no slot for them.
      partitions := ARRAY(SELECT partitions[(j.n - 1) * width + k.k]
                          FROM unnest(ids) WITH ORDINALITY AS j(id, n) CROSS JOIN generate_series(1, width) AS k(k)
                          WHERE NOT j.n = ANY (skipped_at)
                          ORDER BY j.n, k.k);
      ids := ARRAY(SELECT j.id FROM unnest(ids) WITH ORDINALITY AS j(id, n) WHERE NOT j.n = ANY (skipped_at) ORDER BY j.n);
    END IF;

    -- Slots per counter, of the jobs admitted.
    SELECT coalesce(array_agg(s.g ORDER BY s.g, s.p), '{}'), coalesce(array_agg(s.p ORDER BY s.g, s.p), '{}'),
           coalesce(array_agg(s.n ORDER BY s.g, s.p), '{}')
    INTO slot_g, slot_p, slot_n
    FROM (SELECT gate_names[((e.n - 1) % width) + 1] AS g, e.p, count(*)::integer AS n
          FROM unnest(partitions) WITH ORDINALITY AS e(p, n)
          WHERE e.p IS NOT NULL AND gate_names[((e.n - 1) % width) + 1] = ANY (slot_gates)
          GROUP BY 1, 2) s;
  END IF;
  IF cardinality(ids) > 0 THEN
    IF cardinality(slot_g) > 0 THEN
      UPDATE dispatch_policy.inflight_counters c
      SET in_flight = c.in_flight + k.n, last_admitted_at = _admit.now, updated_at = _admit.now
      FROM unnest(slot_g, slot_p, slot_n) AS k(g, p, n)
      WHERE c.policy = _admit.policy AND c.gate = k.g AND c.partition = k.p;
    END IF;

    IF coalesce(cardinality(take_gates), 0) > 0 THEN
      PERFORM 1 FROM dispatch_policy.throttle_buckets t
      WHERE t.policy = _admit.policy
        AND (t.gate, t.partition) IN (SELECT k.g, k.p FROM unnest(take_gates, take_partitions) AS k(g, p))
      ORDER BY t.policy, t.gate, t.partition
      FOR UPDATE;
      UPDATE dispatch_policy.throttle_buckets t
      SET tokens = t.tokens - k.tokens, last_admitted_at = _admit.now
      FROM (SELECT x.g, x.p, sum(x.tokens) AS tokens FROM unnest(take_gates, take_partitions, take_tokens) AS x(g, p, tokens)
            GROUP BY 1, 2) k
      WHERE t.policy = _admit.policy AND t.gate = k.g AND t.partition = k.p;
    END IF;

    IF config -> 'target' ->> 'type' = 'sql' THEN
      FOR job IN
        SELECT a.id, a.queue, a.args, a.context FROM dispatch_policy.admitted_jobs a
        WHERE a.id = ANY (ids)
        ORDER BY a.priority, a.id
      LOOP
        PERFORM dispatch_policy._hand_off(config -> 'target' ->> 'function', job.id, job.queue, job.args, job.context);
      END LOOP;
    ELSE
      FOREACH queue_name IN ARRAY queues LOOP
        -- A queue name staged before the length limit existed could overflow
        -- the NOTIFY payload; workers still poll for it.
        IF octet_length(queue_name) <= 1024 THEN
          PERFORM pg_notify('dispatch_policy_admitted', queue_name);
        END IF;
      END LOOP;
    END IF;
    -- Lanes this admission emptied go now, not at the next fetch (which
    -- would be a tick for nothing).
    PERFORM dispatch_policy._drop_empty_lanes(_admit.policy, array_remove(keys, NULL), array_position(keys, NULL) IS NOT NULL);
  END IF;

  -- The round-robin cursor: as the runner decided, else past the last key
  -- admitted (in rotation order after the current cursor).
  IF round_robin_cursor IS NOT NULL THEN
    -- Weighted lanes: the first starved job's place in its lane's round
    -- (its index in the batch, after what the lane had of that round before
    -- this tick when the tick held on it) is what the lane has had of the
    -- round: the next fetch gives it the rest first.
    IF jsonb_typeof(starved) = 'object' AND jsonb_typeof(starved -> 'index') = 'number'
       AND jsonb_typeof(starved -> 'weight') = 'number' THEN
      starved_weight := least(greatest((starved ->> 'weight')::numeric, 1), 1000)::integer;
      IF coalesce((round_robin_cursor ->> 'hold')::boolean, false) THEN
        SELECT c.served, c.served_lane INTO old_served, old_served_lane
        FROM dispatch_policy.round_robin_cursors c WHERE c.policy = _admit.policy;
        IF old_served > 0 AND old_served_lane IS NOT DISTINCT FROM starved ->> 'lane' THEN
          starved_offset := old_served;
        END IF;
      END IF;
      new_served := ((least(greatest((starved ->> 'index')::numeric, 1), 1000000)::integer - 1 + starved_offset)
                     % starved_weight);
    END IF;
    IF NOT coalesce((round_robin_cursor ->> 'hold')::boolean, false) THEN
      INSERT INTO dispatch_policy.round_robin_cursors AS c (policy, last_key, updated_at, served, served_lane)
      VALUES (_admit.policy, round_robin_cursor ->> 'last_key', _admit.now, new_served,
              CASE WHEN new_served > 0 THEN starved ->> 'lane' END)
      ON CONFLICT ON CONSTRAINT round_robin_cursors_pkey
      DO UPDATE SET last_key = EXCLUDED.last_key, updated_at = EXCLUDED.updated_at, served = EXCLUDED.served,
                    served_lane = EXCLUDED.served_lane;
    ELSIF jsonb_typeof(starved) = 'object' THEN
      -- Held on a weighted lane: only the round's progress changes.
      INSERT INTO dispatch_policy.round_robin_cursors AS c (policy, last_key, updated_at, served, served_lane)
      VALUES (_admit.policy, NULL, _admit.now, new_served, CASE WHEN new_served > 0 THEN starved ->> 'lane' END)
      ON CONFLICT ON CONSTRAINT round_robin_cursors_pkey
      DO UPDATE SET served = EXCLUDED.served, served_lane = EXCLUDED.served_lane
      WHERE c.served IS DISTINCT FROM EXCLUDED.served OR c.served_lane IS DISTINCT FROM EXCLUDED.served_lane;
    END IF;
  ELSIF admitted > 0 THEN
    SELECT c.last_key INTO cursor_key FROM dispatch_policy.round_robin_cursors c WHERE c.policy = _admit.policy;
    SELECT k INTO cursor_key FROM unnest(keys) AS k
    ORDER BY CASE WHEN k IS NULL THEN 1 WHEN cursor_key IS NULL OR k > cursor_key THEN 0 ELSE 2 END DESC, k DESC NULLS LAST
    LIMIT 1;
    INSERT INTO dispatch_policy.round_robin_cursors AS c (policy, last_key, updated_at)
    VALUES (_admit.policy, cursor_key, _admit.now)
    ON CONFLICT ON CONSTRAINT round_robin_cursors_pkey
    DO UPDATE SET last_key = EXCLUDED.last_key, updated_at = EXCLUDED.updated_at, served = 0, served_lane = NULL;
  END IF;
  RETURN admitted;
END
$$;
COMMENT ON FUNCTION dispatch_policy._admit(text, bigint[], text[], text[], text[], text[], double precision[], integer, timestamptz, jsonb, text[], text[]) IS
  'Internal: admit with parallel arrays (the one implementation): ids (in a tick, of jobs tick_begin fetched: a job whose row changed since the fetch or is gone is skipped, with its slots and its takes, and stays as it is; other ids must be staged, 55000 otherwise); gate_names; partitions, one entry per job and gate name, job after job (NULL: none); takes as (take_gates, take_partitions, take_tokens); lock_gates/lock_partitions: further counters to lock in the same sorted statement as the slots (the tick checks them before blocking a lane); round_robin_cursor {"last_key": K} or {"hold": true}, with weighted lanes also "starved": {"lane", "index", "weight"} (the first starved job: its lane, its place among the lane''s jobs in the batch from 1, the lane''s weight), from which the cursor''s served is kept. Locks in the order every path keeps (in-flight counters, then staged jobs by id, then backlog counters): the counters of every job''s slots (a skipped job''s too, created at 0 when missing) with lock_gates/lock_partitions in one sorted statement, then the jobs'' staged rows by id, then deletes them (their backlog counters, by the delete trigger).';

COMMENT ON COLUMN dispatch_policy.staged_jobs.expires_at IS
  'The job''s deadline: if not admitted by then it is finished as expired (by the next tick''s fetch, fetch_batch), never admitted. The expires_at given to stage, or staged_at + the policy''s max_wait, whichever is earlier; NULL: none. Kept when the job is re-staged (retry, deferral) through job_deadlines.';

-- ---------------------------------------------------------------------------
-- check() and repair(), defined once in 0.2.0 (0011; repair() runs as the
-- owner, 0021), also compare backlog_counters with the staged jobs: a
-- counter that drifted (a hand edit, a bug) lets a partition past its
-- max_pending_per_partition when it counts too few, and refuses or drops
-- jobs under the cap when it counts too many, without an error either way.

-- The backlog counters of capped policies that differ from their staged
-- jobs per lane key (backlog_counter_mismatch; counted, staged), and the
-- lane keys with staged jobs but no counter row (backlog_counter_missing),
-- as _rebuild_backlog counts them. Rows at 0 are right (they stay), rows of
-- policies without the cap are not read.
CREATE FUNCTION dispatch_policy._backlog_findings()
RETURNS TABLE (finding text, policy text, lane text, counted bigint, staged bigint)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  WITH capped AS (
    SELECT p.name FROM dispatch_policy.policies p WHERE p.config ? 'max_pending_per_partition'
  ), actual AS (
    SELECT s.policy, s.round_robin_key AS lane, count(*) AS n
    FROM dispatch_policy.staged_jobs s
    WHERE s.policy IN (SELECT c.name FROM capped c)
    GROUP BY 1, 2
  ), counters AS (
    SELECT b.policy, b.lane, b.staged
    FROM dispatch_policy.backlog_counters b
    WHERE b.policy IN (SELECT c.name FROM capped c)
  )
  SELECT CASE WHEN b.staged IS NULL THEN 'backlog_counter_missing' ELSE 'backlog_counter_mismatch' END,
         coalesce(b.policy, a.policy), CASE WHEN b.policy IS NOT NULL THEN b.lane ELSE a.lane END,
         b.staged, coalesce(a.n, 0)
  FROM counters b
  -- Hash-joinable conditions (a FULL JOIN takes no IS NOT DISTINCT FROM);
  -- together they match a NULL lane (keyless jobs) with NULL only.
  FULL JOIN actual a ON a.policy = b.policy AND (a.lane IS NULL) = (b.lane IS NULL)
                        AND coalesce(a.lane, '') = coalesce(b.lane, '')
  WHERE b.staged IS DISTINCT FROM coalesce(a.n, 0)
$$;
COMMENT ON FUNCTION dispatch_policy._backlog_findings() IS
  'Internal: for policies with max_pending_per_partition, backlog_counters rows whose staged differs from the policy''s staged jobs with that lane key (backlog_counter_mismatch: counted, staged) and lane keys with staged jobs and no row (backlog_counter_missing: counted NULL), counted as _rebuild_backlog counts them.';

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
    UNION ALL
    SELECT b.finding, b.policy, NULL, b.lane, NULL,
           format('%s, %s job%s staged in this partition%s', coalesce('counter says ' || b.counted, 'no counter row'),
                  b.staged, CASE WHEN b.staged = 1 THEN ' is' ELSE 's are' END,
                  CASE WHEN b.lane IS NULL THEN ' (the jobs without a lane key)' ELSE '' END)
    FROM dispatch_policy._backlog_findings() b
  ) x
  ORDER BY x.finding, x.policy, x.gate, x.partition_key, x.job_id, x.detail
$$;
COMMENT ON FUNCTION dispatch_policy."check"(timestamptz) IS
  'Lists every inconsistency of the stored state, one row each, none when it is consistent; changes nothing. finding is one of: job_in_two_states (a job id in two of staged_jobs, admitted_jobs, finished_jobs), job_slot_mismatch (an admitted job records another partition than its current config gives, for a slot-holding gate), counter_mismatch and counter_missing (an in-flight counter differs from the admitted jobs holding a slot there under the current config, or is missing), bucket_over_burst, bucket_negative_tokens, bucket_not_finite (throttle tokens above the burst, below 0, NaN or infinite at now), dedupe_key_of_finished_job, dedupe_key_without_job, dedupe_key_mismatch, dedupe_key_missing (a key held by a finished or unknown job or by a job with another key, or a pending or admitted job whose key nobody holds), orphaned_gate_state, orphaned_observation, orphaned_policy_state (rows of policies or gates that no longer exist), backlog_counter_mismatch and backlog_counter_missing (a backlog counter of a policy with max_pending_per_partition differs from its jobs staged with that lane key, partition_key, or is missing). detail says what disagrees, with the numbers. Reads every job table and renders the partitions of every admitted job (as a redeclare does): for inspection, not for polling. dispatch_policy.repair() fixes all of it.';

CREATE FUNCTION dispatch_policy.repair(now timestamptz DEFAULT now())
RETURNS TABLE (finding text, policy text, gate text, partition_key text, job_id bigint, action text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, dispatch_policy, pg_temp
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
  -- Stagers of capped policies wait too (their backlog counters are
  -- recounted below): each such policy's partitions lock, exclusively, in
  -- name order, after the admitted jobs, as a redeclare takes it.
  FOR policy_name IN SELECT p.name FROM dispatch_policy.policies p
                     WHERE p.config ? 'max_pending_per_partition' ORDER BY p.name LOOP
    PERFORM pg_advisory_xact_lock(dispatch_policy._partitions_lock_key(policy_name));
  END LOOP;
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

  -- Backlog counters, after the job tables are right: with no stager of a
  -- capped policy running (the partitions locks above), the rows locked in
  -- sorted order (policy, lane, NULL last), as stagers and the delete
  -- trigger lock them; then set to the jobs staged with their lane key,
  -- missing rows inserted.
  PERFORM 1 FROM dispatch_policy.backlog_counters c
  WHERE c.policy IN (SELECT p.name FROM dispatch_policy.policies p WHERE p.config ? 'max_pending_per_partition')
  ORDER BY c.policy, c.lane NULLS LAST
  FOR UPDATE;
  RETURN QUERY
  WITH found AS MATERIALIZED (
    SELECT * FROM dispatch_policy._backlog_findings()
  ), recounted AS (
    UPDATE dispatch_policy.backlog_counters c SET staged = f.staged
    FROM found f
    WHERE f.finding = 'backlog_counter_mismatch' AND c.policy = f.policy AND c.lane IS NOT DISTINCT FROM f.lane
  ), inserted AS (
    INSERT INTO dispatch_policy.backlog_counters (policy, lane, staged)
    SELECT f.policy, f.lane, f.staged FROM found f WHERE f.finding = 'backlog_counter_missing'
    ORDER BY 1, 2 NULLS LAST
    ON CONFLICT DO NOTHING
  )
  SELECT f.finding, f.policy, NULL::text, f.lane, NULL::bigint,
         CASE WHEN f.finding = 'backlog_counter_missing' THEN format('inserted the counter with staged %s', f.staged)
              ELSE format('set staged from %s to %s', f.counted, f.staged) END
  FROM found f;
END
$$;
COMMENT ON FUNCTION dispatch_policy.repair(timestamptz) IS
  'Fixes everything dispatch_policy.check() reports, in the caller''s transaction, and returns one row per change (the check() finding and the action taken); afterwards check() returns no rows. Waits for running ticks (in policy name order), then locks the admitted jobs in id order (as a redeclare does) and gate-state rows in (policy, gate, partition) order, as admission and completion do: workers finishing jobs wait for it. A job in two tables keeps its finished copy, else its admitted copy (the only copy of a job is never deleted); admitted jobs'' partitions are recomputed under the current config and in-flight counters set to the slots held (missing rows inserted); throttle tokens are clamped into [0, burst] at now (NaN or infinite: burst); wrong dedupe keys are deleted and missing ones inserted; state of policies and gates that no longer exist is deleted; backlog counters of policies with max_pending_per_partition are set to their staged jobs per lane key (missing rows inserted), with those policies'' stagers held off (their partitions locks, exclusively, after the admitted jobs, as a redeclare takes them).';

-- ---------------------------------------------------------------------------
-- Privileges (0021).

REVOKE ALL ON ALL TABLES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch_policy FROM PUBLIC;
