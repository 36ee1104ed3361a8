-- dispatch-policy: views for DBAs (psql) and the admin UI.

CREATE VIEW dispatch_policy.policy_overview AS
SELECT
  p.name AS policy,
  (SELECT count(*) FROM dispatch_policy.staged_jobs s
    WHERE s.policy = p.name AND (s.not_before IS NULL OR s.not_before <= now())) AS pending,
  (SELECT count(*) FROM dispatch_policy.staged_jobs s
    WHERE s.policy = p.name AND s.not_before > now()) AS scheduled,
  (SELECT count(*) FROM dispatch_policy.admitted_jobs a
    WHERE a.policy = p.name) AS in_flight,
  (SELECT count(*) FROM dispatch_policy.finished_jobs f
    WHERE f.policy = p.name AND f.status = 'completed' AND f.finished_at > now() - interval '24 hours') AS completed_24h,
  (SELECT count(*) FROM dispatch_policy.job_failures jf
    WHERE jf.policy = p.name AND jf.failed_at > now() - interval '24 hours') AS failed_24h,
  (SELECT count(*) FROM dispatch_policy.finished_jobs f
    WHERE f.policy = p.name AND f.status = 'dead') AS dead,
  now() - (SELECT min(s.staged_at) FROM dispatch_policy.staged_jobs s
    WHERE s.policy = p.name AND (s.not_before IS NULL OR s.not_before <= now())) AS oldest_pending_age,
  p.paused
FROM dispatch_policy.policies p;
COMMENT ON VIEW dispatch_policy.policy_overview IS
  'One row per policy: jobs waiting, scheduled, in flight, finished in the last 24 hours, dead, and how long the oldest eligible job has waited. Counts scan the policy''s rows: cheap for thousands, a few hundred ms at a million pending.';
COMMENT ON COLUMN dispatch_policy.policy_overview.policy IS 'Policy name.';
COMMENT ON COLUMN dispatch_policy.policy_overview.pending IS 'Staged jobs eligible for admission now.';
COMMENT ON COLUMN dispatch_policy.policy_overview.scheduled IS 'Staged jobs whose not_before is still in the future.';
COMMENT ON COLUMN dispatch_policy.policy_overview.in_flight IS 'Admitted jobs not yet completed, failed or reaped.';
COMMENT ON COLUMN dispatch_policy.policy_overview.completed_24h IS 'Jobs completed in the last 24 hours.';
COMMENT ON COLUMN dispatch_policy.policy_overview.failed_24h IS 'Failed attempts (including expired leases) in the last 24 hours.';
COMMENT ON COLUMN dispatch_policy.policy_overview.dead IS 'Jobs that failed max_attempts times.';
COMMENT ON COLUMN dispatch_policy.policy_overview.oldest_pending_age IS 'How long the longest-waiting eligible job has been staged (NULL when none).';
COMMENT ON COLUMN dispatch_policy.policy_overview.paused IS 'Whether admission is paused.';

CREATE VIEW dispatch_policy.partition_overview AS
WITH gates AS (
  SELECT p.name AS policy,
         coalesce(g ->> 'name', g ->> 'type') AS gate,
         g ->> 'type' AS gate_type,
         CASE WHEN g ->> 'type' <> 'global_cap' THEN g ->> 'partition_by' END AS partition_by,
         g AS config
  FROM dispatch_policy.policies p
  CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
), waiting AS (
  SELECT gt.policy, gt.gate,
         coalesce(dispatch_policy._render_template(gt.partition_by, s.context), 'default') AS partition,
         count(*) FILTER (WHERE s.not_before IS NULL OR s.not_before <= now()) AS pending,
         max(s.staged_at) AS last_staged_at
  FROM gates gt
  JOIN dispatch_policy.staged_jobs s ON s.policy = gt.policy
  GROUP BY 1, 2, 3
), known AS (
  SELECT policy, gate, partition FROM waiting
  UNION SELECT policy, gate, partition FROM dispatch_policy.throttle_buckets
  UNION SELECT policy, gate, partition FROM dispatch_policy.inflight_counters
  UNION SELECT policy, gate, partition FROM dispatch_policy.adaptive_stats
)
SELECT
  k.policy,
  k.gate,
  gt.gate_type,
  k.partition,
  coalesce(w.pending, 0) AS pending,
  coalesce(c.in_flight, 0) AS in_flight,
  CASE gt.gate_type
    WHEN 'concurrency' THEN dispatch_policy._json_number(gt.config -> 'max')
    WHEN 'global_cap' THEN dispatch_policy._json_number(gt.config -> 'max')
    WHEN 'adaptive_concurrency' THEN a.current_max::numeric
  END AS cap,
  CASE WHEN b.partition IS NOT NULL THEN
    least(b.burst, b.tokens + b.rate * greatest(extract(epoch FROM now() - b.refilled_at)::double precision, 0) / b.per_seconds)
  END AS tokens,
  a.ewma_lag_ms,
  w.last_staged_at,
  greatest(c.last_admitted_at, b.last_admitted_at) AS last_admitted_at
FROM known k
JOIN gates gt ON gt.policy = k.policy AND gt.gate = k.gate
LEFT JOIN waiting w ON w.policy = k.policy AND w.gate = k.gate AND w.partition = k.partition
LEFT JOIN dispatch_policy.throttle_buckets b ON b.policy = k.policy AND b.gate = k.gate AND b.partition = k.partition
LEFT JOIN dispatch_policy.inflight_counters c ON c.policy = k.policy AND c.gate = k.gate AND c.partition = k.partition
LEFT JOIN dispatch_policy.adaptive_stats a ON a.policy = k.policy AND a.gate = k.gate AND a.partition = k.partition;
COMMENT ON VIEW dispatch_policy.partition_overview IS
  'One row per (policy, gate, partition) that has waiting jobs or gate state: pending jobs, in-flight slots, cap, current tokens, adaptive EWMA lag. Renders each waiting job''s partition, so it costs a scan of the staged jobs: meant for inspection, not for polling at a million pending.';
COMMENT ON COLUMN dispatch_policy.partition_overview.policy IS 'Policy name.';
COMMENT ON COLUMN dispatch_policy.partition_overview.gate IS 'Gate name (defaults to the gate type).';
COMMENT ON COLUMN dispatch_policy.partition_overview.gate_type IS 'throttle, concurrency, global_cap, fair_interleave or adaptive_concurrency.';
COMMENT ON COLUMN dispatch_policy.partition_overview.partition IS 'Partition key rendered from the gate partition_by (''default'' without one).';
COMMENT ON COLUMN dispatch_policy.partition_overview.pending IS 'Eligible staged jobs in this partition.';
COMMENT ON COLUMN dispatch_policy.partition_overview.in_flight IS 'Admitted, unfinished jobs holding a slot of this gate partition.';
COMMENT ON COLUMN dispatch_policy.partition_overview.cap IS 'In-flight cap: max of concurrency/global_cap (NULL when read from each job''s context), current_max of adaptive_concurrency.';
COMMENT ON COLUMN dispatch_policy.partition_overview.tokens IS 'Throttle tokens available now (refilled to now() at the last known rate).';
COMMENT ON COLUMN dispatch_policy.partition_overview.ewma_lag_ms IS 'Adaptive gate: EWMA of queue lag in ms.';
COMMENT ON COLUMN dispatch_policy.partition_overview.last_staged_at IS 'When a job now waiting in this partition was last staged.';
COMMENT ON COLUMN dispatch_policy.partition_overview.last_admitted_at IS 'When this partition last admitted a job.';
