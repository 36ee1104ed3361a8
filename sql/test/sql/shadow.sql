-- pg_regress tests of shadow policies (issue 12): validation of mode, the
-- shadow_refusals table and the columns it adds to the views, what the
-- tick's last statement records (_record_shadow beside _record_refusals, as
-- the runner sends it), that check() takes a deficit and over-cap counters
-- of a shadow policy for what they are, back to enforce, explain, prune.
\set SHOW_CONTEXT never
\set VERBOSITY default
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
CREATE EXTENSION dispatch_policy;
RESET client_min_messages;

-- ===========================================================================
-- validation

SELECT dispatch_policy.validate_policy('s', '{"mode": "dry_run"}');
SELECT dispatch_policy.validate_policy('s', '{"mode": 1}');
SELECT dispatch_policy.validate_policy('s', '{"mode": null}');
-- Other fields are still checked, mode or not.
SELECT dispatch_policy.validate_policy('s', '{"mode": "shadow", "batch_size": 0}');
SELECT dispatch_policy.validate_policy('s', '{"mode": "shadow", "nope": 1}');
SELECT dispatch_policy.validate_policy('s', '{"mode": "enforce"}');
SELECT count(*) AS policies FROM dispatch_policy.policies;

SELECT dispatch_policy.declare_policy('sh', '{
  "mode": "shadow",
  "gates": [
    {"type": "throttle", "name": "per_min", "rate": 1, "per": 60, "burst": 1},
    {"type": "concurrency", "max": 1}
  ]
}');
SELECT dispatch_policy.declare_policy('plain', '{"gates": [{"type": "concurrency", "max": 1}]}');
SELECT policy, mode FROM dispatch_policy.policy_overview ORDER BY policy;

-- ===========================================================================
-- a tick of the shadow policy, as the runner makes it: three jobs, all
-- admitted though the throttle and the cap have room for one.

SELECT count(dispatch_policy.stage('sh', jsonb_build_object('n', i))) AS staged FROM generate_series(1, 3) AS i;
CREATE TEMP TABLE t AS
SELECT kind, id, now FROM dispatch_policy.tick_begin('sh', 100, 10) AS b(kind, id, priority, round_robin_key, context,
  lane, gate, partition, lag_ms, success, observed_at, config, now);
SELECT kind, count(*) FROM t GROUP BY kind ORDER BY kind;
SELECT kind, gate, partition, tokens, in_flight
FROM dispatch_policy.tick_state('sh', (SELECT now FROM t WHERE kind = 'tick'),
  '{per_min}', '{default}', '{1}', '{60}', '{1}', '{concurrency}', '{default}', '{}', '{}', '{}')
ORDER BY kind;
-- The throttle would refuse jobs 2 and 3 (1 token), the cap as well (max
-- 1): 3 tokens taken, 2 in deficit (120 s behind at 1 a minute); 3 in
-- flight, 2 over the cap.
SELECT dispatch_policy.tick_finish('sh', (SELECT now FROM t WHERE kind = 'tick'),
  (SELECT array_agg(id ORDER BY id) FROM t WHERE kind = 'job'), '{per_min,concurrency}',
  (SELECT array_agg(p ORDER BY id, k) FROM t, unnest('{default,default}'::text[]) WITH ORDINALITY AS u(p, k) WHERE kind = 'job'),
  '{per_min}', '{default}', '{3}')
FROM dispatch_policy._record_refusals('sh', (SELECT now FROM t WHERE kind = 'tick'), '{}', '{}', '{}'),
     dispatch_policy._record_shadow('sh', (SELECT now FROM t WHERE kind = 'tick'), '[
       {"gate": "concurrency", "partition": "default", "would_refuse": 2, "lag_seconds": null, "over_cap": 2},
       {"gate": "per_min", "partition": "default", "would_refuse": 2, "lag_seconds": 120, "over_cap": null}]');
SELECT gate, partition, would_refuse, first_at = last_at AS once, would_be_lag_seconds, over_cap
FROM dispatch_policy.shadow_refusals ORDER BY gate;
-- (Figures that refill with the clock are shown as ranges: tokens near -2,
-- the lag near 120 s.)
SELECT gate, in_flight, cap, tokens BETWEEN -2 AND -1.5 AS tokens_near_minus_2, would_refuse,
       last_would_refuse_at IS NOT NULL AS recorded, would_be_lag_seconds BETWEEN 90 AND 120 AS lag_near_120, over_cap
FROM dispatch_policy.partition_overview WHERE policy = 'sh' ORDER BY gate;
-- The bucket is below 0 and the counter above the cap, by design: no finding.
SELECT policy, gate, tokens >= -1000000 AND tokens < 0 AS deficit FROM dispatch_policy.throttle_buckets;
SELECT * FROM dispatch_policy.check();

-- Recording adds up; entries of 0 are skipped; duplicates are summed.
SELECT dispatch_policy._record_shadow('sh', now(), '[
  {"gate": "concurrency", "partition": "default", "would_refuse": 1, "over_cap": 3},
  {"gate": "concurrency", "partition": "default", "would_refuse": 1, "over_cap": 2},
  {"gate": "per_min", "partition": "other", "would_refuse": 0}]');
SELECT gate, partition, would_refuse, over_cap FROM dispatch_policy.shadow_refusals ORDER BY gate, partition;
SELECT dispatch_policy._record_shadow('sh', now(), NULL);
SELECT dispatch_policy._record_shadow('sh', now(), '[]');
-- Malformed entries record nothing.
SELECT dispatch_policy._record_shadow('sh', now(), '{"gate": "x"}');
SELECT dispatch_policy._record_shadow('sh', now(), '[{"gate": "", "partition": "p", "would_refuse": 1}]');
SELECT dispatch_policy._record_shadow('sh', now(), '[{"gate": "g", "partition": "p", "would_refuse": -1}]');
SELECT dispatch_policy._record_shadow('sh', now(), '[{"gate": "g", "partition": "p", "would_refuse": 1, "lag_seconds": "soon"}]');
SELECT dispatch_policy._record_shadow('sh', 'infinity', '[{"gate": "g", "partition": "p", "would_refuse": 1}]');
SELECT count(*) AS rows FROM dispatch_policy.shadow_refusals;

-- ===========================================================================
-- explain: a pending job of a shadow policy would wait, admitted anyway.

SELECT dispatch_policy.stage('sh', '{"n": 4}') AS fourth \gset
SELECT aspect, gate, verdict, left(explanation, 48) AS explanation, wait_seconds
FROM dispatch_policy.explain(:fourth);

-- ===========================================================================
-- back to enforce: the counter is over the cap and the bucket in deficit;
-- the job waits for both, and nothing is a finding.

SELECT dispatch_policy.declare_policy('sh', '{
  "gates": [
    {"type": "throttle", "name": "per_min", "rate": 1, "per": 60, "burst": 1},
    {"type": "concurrency", "max": 1}
  ]
}');
SELECT policy, mode FROM dispatch_policy.policy_overview WHERE policy = 'sh';
SELECT aspect, gate, verdict FROM dispatch_policy.explain(:fourth);
SELECT * FROM dispatch_policy.check();
SELECT count(*) AS repaired FROM dispatch_policy.repair();
SELECT gate, in_flight, tokens BETWEEN -2 AND -1.5 AS tokens_near_minus_2, over_cap FROM dispatch_policy.partition_overview
WHERE policy = 'sh' ORDER BY gate;
-- A deficit in a partition that recorded nothing is still a finding.
UPDATE dispatch_policy.throttle_buckets SET tokens = -5 WHERE policy = 'sh';
DELETE FROM dispatch_policy.shadow_refusals WHERE gate = 'per_min';
SELECT finding, gate FROM dispatch_policy.check();
UPDATE dispatch_policy.throttle_buckets SET tokens = -2 WHERE policy = 'sh';
SELECT dispatch_policy._record_shadow('sh', now() - interval '30 days',
  '[{"gate": "per_min", "partition": "default", "would_refuse": 2, "lag_seconds": 120}]');

-- ===========================================================================
-- prune: rows older than the retention go once their bucket has no deficit
-- left; rows of a gate no longer declared go at once.

SELECT what, removed FROM dispatch_policy.prune() WHERE what = 'shadow_refusals';
SELECT gate, partition FROM dispatch_policy.shadow_refusals ORDER BY gate, partition;
UPDATE dispatch_policy.throttle_buckets SET tokens = 1 WHERE policy = 'sh';
UPDATE dispatch_policy.shadow_refusals SET first_at = now() - interval '30 days', last_at = now() - interval '30 days'
WHERE gate = 'per_min';
SELECT what, removed FROM dispatch_policy.prune() WHERE what = 'shadow_refusals';
SELECT dispatch_policy.declare_policy('sh', '{"mode": "shadow", "gates": [{"type": "throttle", "name": "per_min", "rate": 1, "per": 60}]}');
SELECT what, removed FROM dispatch_policy.prune(policies => '{plain}') WHERE what = 'shadow_refusals';
SELECT what, removed FROM dispatch_policy.prune() WHERE what = 'shadow_refusals';
SELECT count(*) AS rows FROM dispatch_policy.shadow_refusals;

-- drop_policy takes the policy's rows with it.
SELECT dispatch_policy._record_shadow('sh', now(), '[{"gate": "per_min", "partition": "x", "would_refuse": 1}]');
SELECT dispatch_policy.drop_policy('sh', force => true);
SELECT count(*) AS rows FROM dispatch_policy.shadow_refusals;
-- A job of a shadow policy whose deadline passed: its gate would make it
-- wait, but the estimate is not the next tick's admission: it expires.
SELECT dispatch_policy.declare_policy('sh_late', '{"mode": "shadow", "gates": [{"type": "global_cap", "max": 0}]}');
SELECT dispatch_policy.stage('sh_late', '1', expires_at => clock_timestamp() + interval '100 milliseconds') AS sh_late1 \gset
SELECT pg_sleep(0.2);
SELECT aspect, verdict, wait_seconds FROM dispatch_policy.explain(:sh_late1) WHERE aspect IN ('gate', 'estimate') ORDER BY aspect;
-- Found by the second hostile pass: a shadow policy admits every job, so
-- staging refuses none for its cost (an enforcing one does: 22023).
SELECT dispatch_policy.declare_policy('sh_cost', '{"mode": "shadow", "gates": [{"type": "throttle", "rate": 10, "per": 60, "burst": 10, "cost": {"context": "units", "default": 1}}]}');
SELECT outcome FROM dispatch_policy.stage_outcome('sh_cost', '1', '{"units": 50}');
SELECT cardinality(dispatch_policy.stage_many('sh_cost', '[{"args": 2, "context": {"units": 60}}]')) AS staged;
SELECT dispatch_policy.declare_policy('sh_cost', '{"gates": [{"type": "throttle", "rate": 10, "per": 60, "burst": 10, "cost": {"context": "units", "default": 1}}]}');
SELECT outcome FROM dispatch_policy.stage_outcome('sh_cost', '3', '{"units": 50}');
\echo :SQLSTATE
