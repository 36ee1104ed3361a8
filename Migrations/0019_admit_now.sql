-- Admit now from one gate partition (issue 10): an operator lets up to N
-- pending jobs of one partition through the gates at once, without waiting
-- for the rotation to reach their lane. It is a tick, with the tick's lock,
-- transactions, gate checks and bookkeeping, whose fetch is restricted to
-- the partition: tick_begin gains only_gate and only_partition. The jobs
-- admitted take tokens and slots like any others; a gate that refuses them
-- refuses them (a paused partition stays paused).

-- The fetch of such a tick: up to max_jobs eligible jobs of the policy whose
-- partition of the gate (template: its partition_by) is partition, lower
-- priority first, then staging order. Rows found by rendering the policy's
-- eligible jobs in that order until max_jobs match (like drain): a
-- partition whose jobs are far back in a large backlog takes a while.
CREATE FUNCTION dispatch_policy._fetch_partition(policy text, template text, partition text, max_jobs integer)
RETURNS TABLE (id bigint, priority integer, round_robin_key text, context jsonb, lane integer)
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT s.id, s.priority, s.round_robin_key, s.context, 0
  FROM dispatch_policy.staged_jobs s
  WHERE s.policy = _fetch_partition.policy AND s.not_before IS NULL AND template IS NOT NULL
    AND dispatch_policy._partition_key(template, s.context) = _fetch_partition.partition
  ORDER BY s.priority, s.id
  LIMIT greatest(max_jobs, 0)
  FOR UPDATE SKIP LOCKED
$$;
COMMENT ON FUNCTION dispatch_policy._fetch_partition(text, text, text, integer) IS
  'Internal: the fetch of tick_begin with only_gate and only_partition: locks (FOR UPDATE SKIP LOCKED) and returns up to max_jobs eligible jobs of the policy whose partition under template (the gate''s partition_by, rendered then fitted) is partition, lower priority first, then staging order; lane 0. Nothing for a NULL template. Renders the policy''s eligible jobs in that order until max_jobs match.';

-- tick_begin, defined once in 0.2.0 (the first call of a tick, 0014; an
-- idle_session_timeout of at least 10 s between a tick's calls, 0018), with
-- only_gate and only_partition.
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
      RETURN QUERY
      SELECT 'job'::text, f.id, f.priority, f.round_robin_key, f.context::text, f.lane, NULL::text, NULL::text,
             NULL::float8, NULL::boolean, NULL::timestamptz, NULL::text, NULL::timestamptz
      FROM dispatch_policy.fetch_batch(tick_begin.policy, batch, quantum, at) f;
    ELSE
      RETURN QUERY
      SELECT 'job'::text, f.id, f.priority, f.round_robin_key, f.context::text, f.lane, NULL::text, NULL::text,
             NULL::float8, NULL::boolean, NULL::timestamptz, NULL::text, NULL::timestamptz
      FROM dispatch_policy._fetch_partition(tick_begin.policy, only_template, only_partition, batch) f;
    END IF;
    GET DIAGNOSTICS fetched = ROW_COUNT;
  END IF;

  -- Nothing to admit or fold: the tick ends here (one round trip).
  IF fetched = 0 AND observed = 0 THEN
    PERFORM dispatch_policy._tick_release(tick_begin.policy, false);
    RETURN QUERY SELECT 'done'::text, NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::integer, NULL::text,
                        NULL::text, NULL::float8, NULL::boolean, NULL::timestamptz, NULL::text, NULL::timestamptz;
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.tick_begin(text, integer, integer, integer, integer, text, text) IS
  'The first call of a tick; the tick''s calls run in autocommit, each its own transaction. Takes the policy''s tick lock at session level (held until tick_finish, tick_abort or the session''s end; 55000 if this session is already in a tick or still holds the lock) and, until then, sets the session''s statement_timeout to timeout_ms and its idle_session_timeout to timeout_ms (at least 10 s; 60 s without timeout_ms), so a client that stops answering between the calls loses its session and the lock; then, if the policy is not paused: reads (does not remove) up to max_observations observations of every adaptive gate, promote_scheduled and fetch_batch, with the policy''s batch_size and round_robin_quantum (else the arguments); no fetch while a global_cap is full. With only_gate and only_partition (both or neither; admit now): the fetch is instead up to batch_size (1 to limits() batch_size, the policy''s own ignored) eligible jobs whose partition of that gate is only_partition (_fetch_partition), outside the rotation; the caller should finish with round_robin_cursor {"hold": true} and no lane blocks. Errors then, before any lock: unknown policy or gate 42704, NULL gate or partition 22004, a gate that is not partitioned, a partition over limits() partition_key, batch_size out of bounds, one of the pair without the other 22023. Rows by kind: busy, unknown or paused (one row; nothing else done, no lock kept); tick (config and the tick''s time, first); observation (id, gate, partition, lag_ms, success, observed_at); job (id, priority, round_robin_key, context, lane, in fetch order); done (last: nothing fetched or observed, the lock is given back and the tick is over).';
