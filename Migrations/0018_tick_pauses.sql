-- The tick refuses jobs of paused partitions (issue 10).
--
-- pause_partition (0017) blocks the lane that is exactly the paused
-- partition; a lane that mixes partitions (round_robin_by, several
-- partitioned gates) cannot be blocked for one of them. tick_state, the
-- call that reads the gate state of a batch's partitions, now also returns
-- the paused ones among them (kind 'paused'), and the runner refuses every
-- job with a paused partition, counted against the gate that holds it.
-- Nothing of the result's shape changes: a runner that does not know the
-- kind fails its tick (it checks every kind), so runner and schema move
-- together, as with every migration.

CREATE OR REPLACE FUNCTION dispatch_policy.tick_state(
  policy text, now timestamptz,
  bucket_gates text[], bucket_partitions text[], rates double precision[], pers double precision[],
  bursts double precision[],
  counter_gates text[], counter_partitions text[],
  adaptive_gates text[], adaptive_partitions text[], initial_max integer[]
)
RETURNS TABLE (kind text, gate text, partition text, tokens double precision, in_flight integer, current_max integer,
               ewma_lag_ms double precision, growth_credit double precision, since_decrease bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_policy(tick_state.policy);
  IF coalesce(cardinality(bucket_gates), 0) > 0 THEN
    RETURN QUERY
    SELECT 'bucket'::text, b.gate, b.partition, b.tokens, NULL::integer, NULL::integer, NULL::float8, NULL::float8, NULL::bigint
    FROM dispatch_policy._refill_buckets(tick_state.policy, bucket_gates, bucket_partitions, rates, pers, bursts,
                                         tick_state.now) b;
  END IF;
  IF coalesce(cardinality(counter_gates), 0) > 0 THEN
    RETURN QUERY
    SELECT 'counter'::text, c.gate, c.partition, NULL::float8, c.in_flight, NULL::integer, NULL::float8, NULL::float8, NULL::bigint
    FROM dispatch_policy._read_counters(tick_state.policy, counter_gates, counter_partitions, false) c;
  END IF;
  IF coalesce(cardinality(adaptive_gates), 0) > 0 THEN
    RETURN QUERY
    SELECT 'adaptive'::text, a.gate, a.partition, NULL::float8, NULL::integer, a.current_max, a.ewma_lag_ms,
           a.growth_credit, a.since_decrease
    FROM dispatch_policy._read_adaptive(tick_state.policy, adaptive_gates, adaptive_partitions, initial_max) a;
  END IF;
  -- Paused partitions among the batch's (a probe of the primary key each;
  -- none at all when the policy has no pause).
  IF EXISTS (SELECT 1 FROM dispatch_policy.paused_partitions pp WHERE pp.policy = tick_state.policy) THEN
    RETURN QUERY
    SELECT DISTINCT 'paused'::text, k.g, k.p, NULL::float8, NULL::integer, NULL::integer, NULL::float8, NULL::float8, NULL::bigint
    FROM (SELECT * FROM unnest(bucket_gates, bucket_partitions) AS x(g, p)
          UNION ALL SELECT * FROM unnest(counter_gates, counter_partitions) AS y(g, p)
          UNION ALL SELECT * FROM unnest(adaptive_gates, adaptive_partitions) AS z(g, p)) k
    JOIN dispatch_policy.paused_partitions pp
      ON pp.policy = tick_state.policy AND pp.gate = k.g AND pp.partition = k.p
    WHERE pp.until IS NULL OR pp.until > tick_state.now;
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.tick_state(text, timestamptz, text[], text[], double precision[], double precision[], double precision[], text[], text[], text[], text[], integer[]) IS
  'The second call of a tick: the gate state of a batch''s partitions in one call, from parallel arrays. Buckets are refilled (refill_buckets: created full, locked, returned as kind bucket with tokens); counters are read without locking (kind counter, in_flight; 0 for a missing one: only admission raises a counter, and it locks); adaptive state as read_adaptive (kind adaptive); partitions among them paused by pause_partition, while the pause lasts (kind paused, gate and partition only): the tick refuses their jobs.';

-- prune: history first (0016: fold the deltas, row stat_deltas; trim the
-- minute rows, row stat_minutes, a gate partition's after a day at most, at
-- most 1,000,000 a call), then what the actions of 0017 leave behind:
-- cancelled jobs past the retention (as completed ones; row cancelled_jobs)
-- and partition pauses that ended or whose gate is gone (row
-- partition_pauses, when no policies are named).
CREATE OR REPLACE FUNCTION dispatch_policy.prune(
  retention interval DEFAULT '7 days', idle interval DEFAULT '1 hour', now timestamptz DEFAULT now(), policies text[] DEFAULT NULL
)
RETURNS TABLE (what text, removed bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  n bigint;
BEGIN
  PERFORM dispatch_policy._require_now(prune.now);
  IF retention IS NULL OR NOT dispatch_policy._within_limit(extract(epoch FROM retention), 'prune.retention') THEN
    RAISE EXCEPTION 'retention %', dispatch_policy._limit_rule('prune.retention')
      USING ERRCODE = '22023',
            DETAIL = format('retention is %s.', coalesce(trim_scale(extract(epoch FROM retention)) || ' seconds', 'NULL'));
  END IF;
  IF idle IS NULL OR NOT dispatch_policy._within_limit(extract(epoch FROM idle), 'prune.idle') THEN
    RAISE EXCEPTION 'idle %', dispatch_policy._limit_rule('prune.idle')
      USING ERRCODE = '22023',
            DETAIL = format('idle is %s.', coalesce(trim_scale(extract(epoch FROM idle)) || ' seconds', 'NULL'));
  END IF;

  -- History first: the deltas written since the last fold (at most 1,000,000
  -- rows a call), every policy's (folding one policy's would not be cheaper).
  what := 'stat_deltas'; removed := dispatch_policy.fold_stats(prune.now, 1000000); RETURN NEXT;

  -- Gate rows are deleted only when nobody holds them (SKIP LOCKED), all in
  -- one sorted statement each.
  DELETE FROM dispatch_policy.throttle_buckets t
  WHERE (t.policy, t.gate, t.partition) IN (
    SELECT x.policy, x.gate, x.partition FROM dispatch_policy.throttle_buckets x
    WHERE (prune.policies IS NULL OR x.policy = ANY (prune.policies)) AND NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p
                      WHERE p.name = x.policy AND x.gate = ANY (dispatch_policy._gates_of_type(p.config, 'throttle')))
    ORDER BY x.policy, x.gate, x.partition FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'removed_gate_buckets'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.inflight_counters c
  WHERE (c.policy, c.gate, c.partition) IN (
    SELECT x.policy, x.gate, x.partition FROM dispatch_policy.inflight_counters x
    WHERE x.in_flight = 0 AND (prune.policies IS NULL OR x.policy = ANY (prune.policies))
      AND NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p
                      WHERE p.name = x.policy AND x.gate = ANY (dispatch_policy._slot_gates(p.config)))
    ORDER BY x.policy, x.gate, x.partition FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'removed_gate_counters'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.adaptive_stats a
  WHERE (a.policy, a.gate, a.partition) IN (
    SELECT x.policy, x.gate, x.partition FROM dispatch_policy.adaptive_stats x
    WHERE (prune.policies IS NULL OR x.policy = ANY (prune.policies)) AND NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p
                      WHERE p.name = x.policy AND x.gate = ANY (dispatch_policy._gates_of_type(p.config, 'adaptive_concurrency')))
    ORDER BY x.policy, x.gate, x.partition FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'removed_gate_adaptive'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.observations o
  WHERE o.id IN (
    SELECT x.id FROM dispatch_policy.observations x
    WHERE (prune.policies IS NULL OR x.policy = ANY (prune.policies)) AND NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p
                      WHERE p.name = x.policy AND x.gate = ANY (dispatch_policy._gates_of_type(p.config, 'adaptive_concurrency')))
    FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'orphaned_observations'; removed := n; RETURN NEXT;

  -- Idle partitions: a full bucket or an empty counter untouched for `idle`
  -- is the same as no row (a missing bucket starts full, a missing counter at 0).
  DELETE FROM dispatch_policy.throttle_buckets t
  WHERE (t.policy, t.gate, t.partition) IN (
    SELECT x.policy, x.gate, x.partition FROM dispatch_policy.throttle_buckets x
    WHERE (prune.policies IS NULL OR x.policy = ANY (prune.policies)) AND x.refilled_at < prune.now - idle
      AND dispatch_policy._bucket_tokens(x.tokens, x.rate, x.per_seconds, x.burst, x.refilled_at, prune.now) >= x.burst
    ORDER BY x.policy, x.gate, x.partition FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'idle_buckets'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.inflight_counters c
  WHERE (c.policy, c.gate, c.partition) IN (
    SELECT x.policy, x.gate, x.partition FROM dispatch_policy.inflight_counters x
    WHERE (prune.policies IS NULL OR x.policy = ANY (prune.policies)) AND x.in_flight = 0 AND x.updated_at < prune.now - idle
    ORDER BY x.policy, x.gate, x.partition FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'idle_counters'; removed := n; RETURN NEXT;

  DELETE FROM dispatch_policy.finished_jobs f
  WHERE f.status = 'completed' AND f.finished_at < prune.now - retention AND (prune.policies IS NULL OR f.policy = ANY (prune.policies));
  GET DIAGNOSTICS n = ROW_COUNT; what := 'completed_jobs'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.finished_jobs f
  WHERE f.status = 'cancelled' AND f.finished_at < prune.now - retention AND (prune.policies IS NULL OR f.policy = ANY (prune.policies));
  GET DIAGNOSTICS n = ROW_COUNT; what := 'cancelled_jobs'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.job_failures jf
  WHERE jf.failed_at < prune.now - retention AND (prune.policies IS NULL OR jf.policy = ANY (prune.policies))
    AND NOT EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f WHERE f.id = jf.job_id AND f.status = 'dead');
  GET DIAGNOSTICS n = ROW_COUNT; what := 'failures'; removed := n; RETURN NEXT;
  DELETE FROM dispatch_policy.observation_minutes m
  WHERE m.minute < prune.now - retention AND (prune.policies IS NULL OR m.policy = ANY (prune.policies));
  GET DIAGNOSTICS n = ROW_COUNT; what := 'observation_minutes'; removed := n; RETURN NEXT;
  -- Minute rows: a policy's for retention, a gate partition's for the
  -- retention or a day, whichever is shorter (there may be one per active
  -- partition and minute). At most 1,000,000 a call, oldest first (by
  -- stat_minutes_minute_idx); the next call goes on.
  DELETE FROM dispatch_policy.stat_minutes m
  WHERE m.ctid = ANY (ARRAY(
    SELECT x.ctid FROM dispatch_policy.stat_minutes x
    WHERE x.minute < prune.now - least(retention, interval '1 day')
      AND (x.gate <> '' OR x.minute < prune.now - retention)
      AND (prune.policies IS NULL OR x.policy = ANY (prune.policies))
    ORDER BY x.minute
    LIMIT 1000000));
  GET DIAGNOSTICS n = ROW_COUNT; what := 'stat_minutes'; removed := n; RETURN NEXT;
  IF prune.policies IS NULL THEN
    -- Pauses that ended, and pauses of gates no longer declared (0017).
    what := 'partition_pauses'; removed := dispatch_policy._expire_partition_pauses(prune.now); RETURN NEXT;
    DELETE FROM dispatch_policy.round_robin_cursors r WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p WHERE p.name = r.policy);
    DELETE FROM dispatch_policy.runner_failures r WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p WHERE p.name = r.policy);
    -- Counters of policies that are gone and hold nothing any more.
    DELETE FROM dispatch_policy.policy_counters c
    WHERE c.pending = 0 AND c.scheduled = 0 AND c.in_flight = 0 AND c.dead = 0
      AND NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p WHERE p.name = c.policy)
      AND NOT EXISTS (SELECT 1 FROM dispatch_policy.stat_deltas d WHERE d.policy = c.policy);
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.prune(interval, interval, timestamptz, text[]) IS
  'Maintenance: folds the history deltas (fold_stats, up to 1,000,000 rows; row stat_deltas), then deletes gate state of gates no longer in their policy, observations of adaptive gates that are gone, idle partitions (full buckets, empty counters untouched for idle), completed and cancelled jobs, failures of non-dead jobs and per-minute aggregates older than retention (0 to 100 years, else 22023), stat_minutes rows older than retention (a gate partition''s: older than retention or a day, whichever is shorter; at most 1,000,000 a call; row stat_minutes), and partition pauses that ended or whose gate is gone (row partition_pauses, only when policies is NULL); only of the given policies when policies is not NULL (the fold is always of every policy). Gate rows in use are skipped, never waited for. Dead jobs and their failures are kept. Returns counts.';

-- A pause belongs to its gate: a config that no longer has that gate (or no
-- longer partitions it) ends the pause, so declaring the gate again later
-- does not silently bring back a pause nobody sees (found by a hostile pass).
CREATE FUNCTION dispatch_policy._end_pauses_of_removed_gates()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  DELETE FROM dispatch_policy.paused_partitions pp
  WHERE pp.policy = NEW.name AND dispatch_policy._partitioned_gate(NEW.config, pp.gate) IS NULL;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._end_pauses_of_removed_gates() IS
  'Internal trigger: when a policy''s config changes, deletes its partition pauses of gates the new config does not have (or does not partition).';
CREATE TRIGGER policies_end_pauses
  AFTER UPDATE OF config ON dispatch_policy.policies
  FOR EACH ROW WHEN (OLD.config IS DISTINCT FROM NEW.config)
  EXECUTE FUNCTION dispatch_policy._end_pauses_of_removed_gates();

-- _drop_empty_lanes as in 0012, with the lanes joined from unnest() instead
-- of filtered by "lane = ANY (lanes)": with 10,000 lanes in one batch (a
-- batch_size of 10,000 over a lane per partition) the old statement took 57 s
-- inside the function, so such a tick never finished within its timeout and
-- the policy admitted nothing (found by a hostile pass: 50,000 partitions,
-- batch_size 10,000). Joined, 67 ms.
CREATE OR REPLACE FUNCTION dispatch_policy._drop_empty_lanes(policy text, lanes text[], keyless boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  locked boolean := false;
BEGIN
  BEGIN
    locked := pg_try_advisory_lock(dispatch_policy._lanes_lock_key(_drop_empty_lanes.policy));
    IF locked THEN
      DELETE FROM dispatch_policy.lanes l
      USING (SELECT DISTINCT x.lane FROM unnest(_drop_empty_lanes.lanes) AS x(lane) WHERE x.lane IS NOT NULL) x
      WHERE l.policy = _drop_empty_lanes.policy AND l.lane = x.lane AND l.blocked_until IS NULL
        AND NOT EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s
                        WHERE s.policy = l.policy AND s.not_before IS NULL
                          AND s.round_robin_key >= l.lane AND s.round_robin_key <= l.lane);
      IF keyless THEN
        DELETE FROM dispatch_policy.lanes l
        WHERE l.policy = _drop_empty_lanes.policy AND l.lane IS NULL AND l.blocked_until IS NULL
          AND NOT EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s
                          WHERE s.policy = l.policy AND s.not_before IS NULL AND s.round_robin_key IS NULL);
      END IF;
      PERFORM pg_advisory_unlock(dispatch_policy._lanes_lock_key(_drop_empty_lanes.policy));
      RETURN;
    END IF;
  EXCEPTION WHEN query_canceled OR others THEN
    -- A session lock outlives the statement: never leave it held (a
    -- cancelled or timed-out DELETE would block every stager of the policy).
    IF locked THEN
      PERFORM pg_advisory_unlock(dispatch_policy._lanes_lock_key(_drop_empty_lanes.policy));
    END IF;
    RAISE;
  END;
  UPDATE dispatch_policy.lanes l
  SET blocked_until = now() + interval '1 second', updated_at = now()
  FROM (SELECT DISTINCT x.lane FROM unnest(_drop_empty_lanes.lanes) AS x(lane) WHERE x.lane IS NOT NULL) x
  WHERE l.policy = _drop_empty_lanes.policy AND l.lane = x.lane AND l.blocked_until IS NULL
    AND NOT EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s
                    WHERE s.policy = l.policy AND s.not_before IS NULL
                      AND s.round_robin_key >= l.lane AND s.round_robin_key <= l.lane);
  IF keyless THEN
    UPDATE dispatch_policy.lanes l
    SET blocked_until = now() + interval '1 second', updated_at = now()
    WHERE l.policy = _drop_empty_lanes.policy AND l.lane IS NULL AND l.blocked_until IS NULL
      AND NOT EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s
                      WHERE s.policy = l.policy AND s.not_before IS NULL AND s.round_robin_key IS NULL);
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._drop_empty_lanes(text, text[], boolean) IS
  'Internal: deletes the given lanes of a policy (and its keyless lane when keyless) that are ready and have no eligible job, if no stager holds the policy''s lanes lock; else blocks them for a second. Called by fetch_batch for lanes it found empty, by admission for the lanes it drew from, and by cancel and drain.';

-- tick_begin as in 0014, with the idle_session_timeout between a tick's
-- calls at least 10 s instead of 1 s: with a tick timeout of 500 ms, a
-- runner on a loaded machine that took over a second to decide between two
-- calls lost its session mid-tick (seen on a CI run). A frozen runner still
-- loses its session, and the policy's lock, after at most that long.
CREATE OR REPLACE FUNCTION dispatch_policy.tick_begin(
  policy text, batch_size integer, round_robin_quantum integer, max_observations integer DEFAULT 10000,
  timeout_ms integer DEFAULT NULL
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
  observed integer := 0;
BEGIN
  IF timeout_ms IS NOT NULL AND timeout_ms < 1 THEN
    RAISE EXCEPTION 'timeout_ms must be 1 or more (NULL: the session''s statement_timeout)'
      USING ERRCODE = '22023', DETAIL = format('timeout_ms is %s.', timeout_ms);
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
  batch := coalesce(dispatch_policy._json_number(pol.config -> 'batch_size')::integer, tick_begin.batch_size,
                    dispatch_policy._policy_setting(pol.config, 'batch_size'));
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
    RETURN QUERY
    SELECT 'job'::text, f.id, f.priority, f.round_robin_key, f.context::text, f.lane, NULL::text, NULL::text,
           NULL::float8, NULL::boolean, NULL::timestamptz, NULL::text, NULL::timestamptz
    FROM dispatch_policy.fetch_batch(tick_begin.policy, batch, quantum, at) f;
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
COMMENT ON FUNCTION dispatch_policy.tick_begin(text, integer, integer, integer, integer) IS
  'The first call of a tick; the tick''s calls run in autocommit, each its own transaction. Takes the policy''s tick lock at session level (held until tick_finish, tick_abort or the session''s end; 55000 if this session is already in a tick or still holds the lock) and, until then, sets the session''s statement_timeout to timeout_ms and its idle_session_timeout to timeout_ms (at least 10 s; 60 s without timeout_ms), so a client that stops answering between the calls loses its session and the lock; then, if the policy is not paused: reads (does not remove) up to max_observations observations of every adaptive gate, promote_scheduled and fetch_batch, with the policy''s batch_size and round_robin_quantum (else the arguments); no fetch while a global_cap is full. Rows by kind: busy, unknown or paused (one row; nothing else done, no lock kept); tick (config and the tick''s time, first); observation (id, gate, partition, lag_ms, success, observed_at); job (id, priority, round_robin_key, context, lane, in fetch order); done (last: nothing fetched or observed, the lock is given back and the tick is over).';
