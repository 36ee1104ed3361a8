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
  -- Where each fair_interleave gate's round stopped (round_robin_cursors.
  -- interleave): partition as partition, served as in_flight (NULL when it
  -- is not a count from 1 to 1000: the runner then starts a new round).
  RETURN QUERY
  SELECT 'interleave'::text, e.key, e.value ->> 'key', NULL::float8,
         CASE WHEN jsonb_typeof(e.value -> 'served') = 'number' AND (e.value ->> 'served')::numeric BETWEEN 1 AND 1000
              THEN (e.value ->> 'served')::numeric::integer END,
         NULL::integer, NULL::float8, NULL::float8, NULL::bigint
  FROM dispatch_policy.round_robin_cursors c
  CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(c.interleave) = 'object' THEN c.interleave ELSE '{}'::jsonb END) e
  WHERE c.policy = tick_state.policy AND jsonb_typeof(e.value) = 'object' AND jsonb_typeof(e.value -> 'key') = 'string';
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
  'The second call of a tick: the gate state of a batch''s partitions in one call, from parallel arrays. Buckets are refilled (refill_buckets: created full, locked, returned as kind bucket with tokens); counters are read without locking (kind counter, in_flight; 0 for a missing one: only admission raises a counter, and it locks); adaptive state as read_adaptive (kind adaptive); partitions among them paused by pause_partition, while the pause lasts (kind paused, gate and partition only): the tick refuses their jobs; where each fair_interleave gate''s round stopped (kind interleave: gate, partition, served as in_flight; round_robin_cursors.interleave), whatever the arrays.';

-- prune: history first (0016: fold the deltas, row stat_deltas; trim the
-- minute rows, row stat_minutes, a gate partition's after a day at most, at
-- most 1,000,000 a call), then what the actions of 0017 leave behind:
-- cancelled jobs past the retention (as completed ones; row cancelled_jobs)
-- and partition pauses that ended or whose gate is gone (row
-- partition_pauses, when no policies are named).
-- (prune: its one definition in 0.2.0 is in 0025_shadow.sql.)

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

-- _drop_empty_lanes (0012 says what it does), with the lanes joined from unnest() instead
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

-- tick_begin keeps the idle_session_timeout between a tick's
-- calls at least 10 s instead of 1 s: with a tick timeout of 500 ms, a
-- runner on a loaded machine that took over a second to decide between two
-- calls lost its session mid-tick (seen on a CI run). A frozen runner still
-- loses its session, and the policy's lock, after at most that long.
-- (tick_begin is defined once in 0.2.0, in 0026_admit_integrity.sql.)
