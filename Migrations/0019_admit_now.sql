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

-- tick_begin gains only_gate and only_partition (it is defined once in
-- 0.2.0, in 0026_admit_integrity.sql).
