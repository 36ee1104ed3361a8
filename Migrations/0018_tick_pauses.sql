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
