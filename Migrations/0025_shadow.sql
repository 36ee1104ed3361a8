-- Shadow policies (issue 12): try a limit on production traffic before it
-- bites.
--
-- A policy declared with "mode": "shadow" ("enforce" is the default) is
-- ticked as usual (fetch, batch_size, round-robin, pause), and its gates are
-- evaluated against the real gate state, but every job the fetch returns is
-- admitted. Gate state moves as if the jobs passed (Envoy's shadow mode for
-- rate limits): in-flight counters count the admitted jobs, so they may
-- exceed a cap; throttle tokens are taken, so a bucket may go below 0 (a
-- deficit, stored as negative tokens and floored at -1,000,000, the bound of
-- throttle_buckets_tokens_check); adaptive gates observe as usual. A
-- partition pause (pause_partition) still refuses: it is an operator's
-- action, not a gate's limit.
--
-- What the gates would have done is kept per gate partition in
-- shadow_refusals, written by the tick's last statement (_record_shadow, in
-- FROM beside _record_refusals: no round trip added): how many jobs each
-- gate would have refused (a job counts for every gate that had no room for
-- it, not only the first), when last, and the would-be lag at that tick.
-- partition_overview shows them (would_refuse, last_would_refuse_at) with
-- two live figures: would_be_lag_seconds (a throttle: the deficit now over
-- the refill rate, the seconds an enforcing throttle would still be behind)
-- and over_cap (a cap: jobs in flight beyond it now).
--
-- Back to enforce (redeclare without mode): nothing is reset. Over-cap
-- partitions refuse until enough jobs finish; a deficit refills by the one
-- formula (_bucket_tokens) before the throttle admits again. check() does
-- not report a deficit of a shadow policy's bucket, or of a partition that
-- recorded would-refusals, as bucket_negative_tokens (repair() leaves it
-- too); over-cap counters were never a finding (check() compares counters
-- with the jobs holding slots).
--
-- validate_policy, explain and prune are defined here whole, once in 0.2.0
-- (the migrations before this one that changed them point here).

-- ---------------------------------------------------------------------------
-- What the gates of shadow policies would have done.

CREATE TABLE dispatch_policy.shadow_refusals (
  policy               text NOT NULL REFERENCES dispatch_policy.policies (name) ON DELETE CASCADE,
  gate                 text NOT NULL,
  partition            text NOT NULL,
  would_refuse         bigint NOT NULL CHECK (would_refuse >= 0),
  first_at             timestamptz NOT NULL CHECK (isfinite(first_at)),
  last_at              timestamptz NOT NULL CHECK (isfinite(last_at)),
  would_be_lag_seconds double precision CHECK (would_be_lag_seconds >= 0 AND would_be_lag_seconds < 'Infinity'),
  over_cap             integer CHECK (over_cap >= 0),
  PRIMARY KEY (policy, gate, partition)
);
COMMENT ON TABLE dispatch_policy.shadow_refusals IS
  'What the gates of shadow policies ("mode": "shadow") would have refused, per gate partition: written by the tick that admitted the jobs anyway (_record_shadow), deleted with the policy, pruned by prune() (row shadow_refusals) once older than the retention with no token deficit left, or when the gate is gone.';
COMMENT ON COLUMN dispatch_policy.shadow_refusals.policy IS 'Policy name.';
COMMENT ON COLUMN dispatch_policy.shadow_refusals.gate IS 'Gate name within the policy.';
COMMENT ON COLUMN dispatch_policy.shadow_refusals.partition IS 'Partition key of the gate.';
COMMENT ON COLUMN dispatch_policy.shadow_refusals.would_refuse IS
  'Jobs this gate partition had no room for and that were admitted anyway, since first_at (a job counts for every gate that would have refused it).';
COMMENT ON COLUMN dispatch_policy.shadow_refusals.first_at IS 'The tick (its now) that first recorded a would-refusal here.';
COMMENT ON COLUMN dispatch_policy.shadow_refusals.last_at IS 'The tick (its now) that last recorded a would-refusal here.';
COMMENT ON COLUMN dispatch_policy.shadow_refusals.would_be_lag_seconds IS
  'A throttle, as of last_at: the token deficit the tick left over the refill rate (tokens per second): how many seconds an enforcing throttle would have been behind. NULL for other gates and for a rate of 0 (never).';
COMMENT ON COLUMN dispatch_policy.shadow_refusals.over_cap IS
  'A concurrency, global_cap or adaptive_concurrency gate, as of last_at: jobs in flight beyond the cap after the tick. NULL for a throttle.';

-- Records one tick's would-refusals. entries: [{"gate", "partition",
-- "would_refuse", "lag_seconds", "over_cap"}]; an entry of 0 is skipped.
-- Rows are written in sorted order (one statement).
CREATE FUNCTION dispatch_policy._record_shadow(policy text, now timestamptz, entries jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  IF entries IS NULL OR entries = '[]'::jsonb THEN
    RETURN;
  END IF;
  PERFORM dispatch_policy._require_now(_record_shadow.now);
  IF jsonb_typeof(entries) <> 'array' OR EXISTS (
       SELECT 1 FROM jsonb_array_elements(entries) AS e
       WHERE jsonb_typeof(e) <> 'object' OR jsonb_typeof(e -> 'gate') <> 'string' OR e ->> 'gate' = ''
          OR jsonb_typeof(e -> 'partition') <> 'string' OR jsonb_typeof(e -> 'would_refuse') <> 'number'
          OR (e ->> 'would_refuse')::numeric < 0
          OR (e ? 'lag_seconds' AND jsonb_typeof(e -> 'lag_seconds') NOT IN ('number', 'null'))
          OR (jsonb_typeof(e -> 'lag_seconds') = 'number' AND (e ->> 'lag_seconds')::numeric < 0)
          OR (e ? 'over_cap' AND jsonb_typeof(e -> 'over_cap') NOT IN ('number', 'null'))
          OR (jsonb_typeof(e -> 'over_cap') = 'number' AND (e ->> 'over_cap')::numeric < 0)) THEN
    RAISE EXCEPTION 'entries must be an array of {"gate", "partition", "would_refuse", "lag_seconds", "over_cap"}'
      USING ERRCODE = '22023',
            DETAIL = 'gate a non-empty string, partition a string, would_refuse a number of 0 or more, lag_seconds and over_cap numbers of 0 or more or null.',
            HINT = 'Nothing was recorded.';
  END IF;
  INSERT INTO dispatch_policy.shadow_refusals AS s
    (policy, gate, partition, would_refuse, first_at, last_at, would_be_lag_seconds, over_cap)
  SELECT _record_shadow.policy, x.g, x.p, x.n, _record_shadow.now, _record_shadow.now, x.lag, x.over
  FROM (SELECT e ->> 'gate' AS g, e ->> 'partition' AS p, sum((e ->> 'would_refuse')::numeric)::bigint AS n,
               -- A lag beyond a century is recorded as a century.
               CASE WHEN max((e ->> 'lag_seconds')::float8) IS NOT NULL
                    THEN least(max((e ->> 'lag_seconds')::float8), 3153600000::float8) END AS lag,
               CASE WHEN max((e ->> 'over_cap')::numeric) IS NOT NULL
                    THEN least(max((e ->> 'over_cap')::numeric), 2147483647)::integer END AS over
        FROM jsonb_array_elements(entries) AS e
        GROUP BY 1, 2) x
  WHERE x.n > 0
  ORDER BY 2, 3
  ON CONFLICT ON CONSTRAINT shadow_refusals_pkey DO UPDATE
  SET would_refuse = s.would_refuse + EXCLUDED.would_refuse,
      last_at = greatest(s.last_at, EXCLUDED.last_at),
      would_be_lag_seconds = EXCLUDED.would_be_lag_seconds,
      over_cap = EXCLUDED.over_cap;
END
$$;
COMMENT ON FUNCTION dispatch_policy._record_shadow(text, timestamptz, jsonb) IS
  'Internal (for the tick runner, in the FROM of its tick_finish statement): adds one tick''s would-refusals of a shadow policy to shadow_refusals. entries is [{"gate", "partition", "would_refuse", "lag_seconds", "over_cap"}] (duplicates summed; entries of 0 skipped; NULL or [] records nothing); lag_seconds and over_cap replace the stored ones. 22023 for a malformed entry (nothing recorded).';

-- The mode of a policy config: 'enforce' (the default) or 'shadow'.
CREATE FUNCTION dispatch_policy._policy_mode(config jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE WHEN config ->> 'mode' = 'shadow' THEN 'shadow' ELSE 'enforce' END
$$;
COMMENT ON FUNCTION dispatch_policy._policy_mode(jsonb) IS
  'Internal: a policy config''s mode: shadow when its "mode" is "shadow", else enforce (the default).';

-- ---------------------------------------------------------------------------
-- validate_policy: every field of a config, mode too. (Its one definition in
-- 0.2.0: 0007's, with the staging rules of 0023, round_robin_weight and a
-- throttle's cost of 0024, and mode.)

CREATE OR REPLACE FUNCTION dispatch_policy.validate_policy(name text, config jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
DECLARE
  -- Every top-level field of a config: the one list (the error for an
  -- unknown field names them).
  known CONSTANT text[] := ARRAY['gates', 'round_robin_by', 'batch_size', 'round_robin_quantum', 'lease_seconds',
                                 'max_attempts', 'target', 'round_robin_weight', 'dedupe_mode', 'debounce',
                                 'max_pending_per_partition', 'on_overflow', 'max_wait', 'mode'];
  gate jsonb;
  i integer := 0;
  path text;
  gate_type text;
  gate_name text;
  seen jsonb := '{}'::jsonb;
  n numeric;
  lo numeric;
  hi numeric;
BEGIN
  IF validate_policy.name IS NULL OR validate_policy.name !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' THEN
    RAISE EXCEPTION 'invalid policy name: %', coalesce(quote_literal(left(validate_policy.name, 200)), 'NULL')
      USING ERRCODE = '22023',
            DETAIL = 'A policy name is 1 to 128 characters: letters, digits, _ . : -, starting with a letter or digit.',
            HINT = 'Nothing was stored.';
  END IF;
  IF config IS NULL OR jsonb_typeof(config) <> 'object' THEN
    PERFORM dispatch_policy._config_error('config', 'must be a JSON object', config);
  END IF;

  PERFORM dispatch_policy._require_known_keys(config, known, '');

  FOREACH path IN ARRAY ARRAY['batch_size', 'round_robin_quantum', 'lease_seconds', 'max_attempts'] LOOP
    IF config ? path THEN
      PERFORM dispatch_policy._require_limit(config -> path, path, path);
    END IF;
  END LOOP;
  IF config ? 'round_robin_by' THEN
    PERFORM dispatch_policy._require_template(config -> 'round_robin_by', 'round_robin_by');
  END IF;

  IF config ? 'target' THEN
    PERFORM dispatch_policy._require(jsonb_typeof(config -> 'target') = 'object',
      'target', 'must be an object such as {"type": "ready_queue"}', config -> 'target');
    PERFORM dispatch_policy._require(config -> 'target' ->> 'type' IN ('ready_queue', 'sql'),
      'target.type', 'must be one of ready_queue, sql', config -> 'target' -> 'type');
    IF config -> 'target' ->> 'type' = 'ready_queue' THEN
      PERFORM dispatch_policy._require_known_keys(config -> 'target', ARRAY['type'], 'target.');
    ELSE
      PERFORM dispatch_policy._require_known_keys(config -> 'target', ARRAY['type', 'function'], 'target.');
      PERFORM dispatch_policy._require(
        config -> 'target' ->> 'function' ~ '^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$',
        'target.function', 'must name a function as schema.name', config -> 'target' -> 'function');
    END IF;
  END IF;

  IF config ? 'gates' THEN
    PERFORM dispatch_policy._require(jsonb_typeof(config -> 'gates') = 'array',
      'gates', 'must be an array of gate objects', config -> 'gates');
    PERFORM dispatch_policy._require(jsonb_array_length(config -> 'gates') <= 32,
      'gates', 'must hold at most 32 gates', to_jsonb(jsonb_array_length(config -> 'gates')));
    FOR gate IN SELECT g FROM jsonb_array_elements(config -> 'gates') AS g LOOP
      path := format('gates[%s]', i);
      PERFORM dispatch_policy._require(jsonb_typeof(gate) = 'object', path, 'must be an object', gate);
      gate_type := gate ->> 'type';
      PERFORM dispatch_policy._require(
        gate_type IN ('throttle', 'concurrency', 'global_cap', 'fair_interleave', 'adaptive_concurrency'),
        path || '.type',
        'must be one of throttle, concurrency, global_cap, fair_interleave, adaptive_concurrency',
        gate -> 'type');

      PERFORM dispatch_policy._require_known_keys(gate,
        CASE gate_type
          WHEN 'throttle' THEN ARRAY['type', 'name', 'partition_by', 'rate', 'per', 'burst', 'cost']
          WHEN 'concurrency' THEN ARRAY['type', 'name', 'partition_by', 'max']
          WHEN 'global_cap' THEN ARRAY['type', 'name', 'max']
          WHEN 'fair_interleave' THEN ARRAY['type', 'name', 'partition_by']
          ELSE ARRAY['type', 'name', 'partition_by', 'initial_max', 'target_lag_ms', 'min', 'max',
                     'ewma_alpha', 'failure_decrease_factor', 'overload_decrease_factor']
        END, path || '.');

      IF gate ? 'name' THEN
        PERFORM dispatch_policy._require(
          jsonb_typeof(gate -> 'name') = 'string' AND gate ->> 'name' ~ '^[A-Za-z0-9_.:-]{1,64}$',
          path || '.name', 'must be 1 to 64 characters: letters, digits, _ . : -', gate -> 'name');
      END IF;
      gate_name := coalesce(gate ->> 'name', gate_type);
      IF seen ? gate_name THEN
        PERFORM dispatch_policy._config_error(path || '.name',
          format('must be unique in the policy: %s is also the name of %s (a gate''s name defaults to its type)',
                 quote_ident(gate_name), seen ->> gate_name),
          to_jsonb(gate_name));
      END IF;
      seen := seen || jsonb_build_object(gate_name, path);

      IF gate ? 'partition_by' THEN
        PERFORM dispatch_policy._require_template(gate -> 'partition_by', path || '.partition_by');
      END IF;

      CASE gate_type
        WHEN 'throttle' THEN
          PERFORM dispatch_policy._require(gate ? 'rate', path || '.rate', 'is required', NULL);
          PERFORM dispatch_policy._require_gate_value(gate -> 'rate', path || '.rate', 'throttle.rate', true);
          PERFORM dispatch_policy._require(gate ? 'per', path || '.per', 'is required (seconds)', NULL);
          PERFORM dispatch_policy._require_gate_value(gate -> 'per', path || '.per', 'throttle.per', true);
          IF gate ? 'burst' THEN
            PERFORM dispatch_policy._require_gate_value(gate -> 'burst', path || '.burst', 'throttle.burst', true);
          END IF;
        WHEN 'concurrency' THEN
          PERFORM dispatch_policy._require(gate ? 'max', path || '.max', 'is required', NULL);
          PERFORM dispatch_policy._require_gate_value(gate -> 'max', path || '.max', 'concurrency.max', true);
        WHEN 'global_cap' THEN
          PERFORM dispatch_policy._require(gate ? 'max', path || '.max', 'is required', NULL);
          PERFORM dispatch_policy._require_gate_value(gate -> 'max', path || '.max', 'global_cap.max', false);
        WHEN 'fair_interleave' THEN
          NULL;
        WHEN 'adaptive_concurrency' THEN
          PERFORM dispatch_policy._require(gate ? 'target_lag_ms', path || '.target_lag_ms',
            'is required (the acceptable queue lag in ms)', NULL);
          PERFORM dispatch_policy._require_gate_value(gate -> 'target_lag_ms', path || '.target_lag_ms',
            'adaptive_concurrency.target_lag_ms', false);
          lo := 1;
          IF gate ? 'min' THEN
            lo := dispatch_policy._require_gate_value(gate -> 'min', path || '.min', 'adaptive_concurrency.min', false);
          END IF;
          hi := NULL;
          IF gate ? 'max' THEN
            hi := dispatch_policy._require_gate_value(gate -> 'max', path || '.max', 'adaptive_concurrency.max', false);
            PERFORM dispatch_policy._require(hi >= lo, path || '.max', format('must be at least min (%s)', lo), gate -> 'max');
          END IF;
          IF gate ? 'initial_max' THEN
            n := dispatch_policy._require_gate_value(gate -> 'initial_max', path || '.initial_max',
                                                     'adaptive_concurrency.initial_max', false);
            PERFORM dispatch_policy._require(n >= lo AND (hi IS NULL OR n <= hi), path || '.initial_max',
              format('must be an integer from min (%s) to max (%s)', lo, coalesce(hi::text, 'unbounded')),
              gate -> 'initial_max');
          END IF;
          FOREACH gate_name IN ARRAY ARRAY['ewma_alpha', 'failure_decrease_factor', 'overload_decrease_factor'] LOOP
            IF gate ? gate_name THEN
              PERFORM dispatch_policy._require_gate_value(gate -> gate_name, path || '.' || gate_name,
                                                          'adaptive_concurrency.' || gate_name, false);
            END IF;
          END LOOP;
      END CASE;
      i := i + 1;
    END LOOP;
  END IF;

  -- round_robin_weight and a throttle's cost (0024).
  PERFORM dispatch_policy._validate_cost_weights(config);

  -- The staging rules (0023).
  IF config ? 'dedupe_mode' THEN
    PERFORM dispatch_policy._require(config ->> 'dedupe_mode' IN ('keep', 'replace') AND jsonb_typeof(config -> 'dedupe_mode') = 'string',
      'dedupe_mode', 'must be one of keep, replace', config -> 'dedupe_mode');
  END IF;
  IF config ? 'debounce' THEN
    PERFORM dispatch_policy._require(jsonb_typeof(config -> 'debounce') = 'number', 'debounce', 'must be a number (seconds)',
                                     config -> 'debounce');
    PERFORM dispatch_policy._require_limit(config -> 'debounce', 'debounce', 'debounce');
    PERFORM dispatch_policy._require(config ->> 'dedupe_mode' = 'replace', 'debounce',
      'is only valid with dedupe_mode replace', config -> 'debounce');
  END IF;
  IF config ? 'max_pending_per_partition' THEN
    PERFORM dispatch_policy._require(jsonb_typeof(config -> 'max_pending_per_partition') = 'number',
      'max_pending_per_partition', 'must be a number (jobs)', config -> 'max_pending_per_partition');
    PERFORM dispatch_policy._require_limit(config -> 'max_pending_per_partition', 'max_pending_per_partition',
                                           'max_pending_per_partition');
  END IF;
  IF config ? 'on_overflow' THEN
    PERFORM dispatch_policy._require(config ->> 'on_overflow' IN ('reject', 'drop_oldest') AND jsonb_typeof(config -> 'on_overflow') = 'string',
      'on_overflow', 'must be one of reject, drop_oldest', config -> 'on_overflow');
    PERFORM dispatch_policy._require(config ? 'max_pending_per_partition', 'on_overflow',
      'is only valid with max_pending_per_partition', config -> 'on_overflow');
  END IF;
  IF config ? 'max_wait' THEN
    PERFORM dispatch_policy._require(jsonb_typeof(config -> 'max_wait') = 'number', 'max_wait', 'must be a number (seconds)',
                                     config -> 'max_wait');
    PERFORM dispatch_policy._require_limit(config -> 'max_wait', 'max_wait', 'max_wait');
    -- A replace pushes a job's not_before to now + debounce: with a
    -- max_wait no longer than that, every replaced job would expire before
    -- it could be admitted (found by hostile testing).
    IF config ? 'debounce' THEN
      PERFORM dispatch_policy._require((config ->> 'debounce')::numeric < (config ->> 'max_wait')::numeric, 'debounce',
        format('must be less than max_wait (%s s): a replaced job waits debounce seconds and would expire first',
               config ->> 'max_wait'), config -> 'debounce');
    END IF;
  END IF;

  -- mode (0025).
  IF config ? 'mode' THEN
    PERFORM dispatch_policy._require(jsonb_typeof(config -> 'mode') = 'string' AND config ->> 'mode' IN ('enforce', 'shadow'),
      'mode', 'must be one of enforce, shadow', config -> 'mode');
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.validate_policy(text, jsonb) IS
  'Checks a policy name and config without storing anything; raises SQLSTATE 22023 naming the first invalid field (for example gates[1].per) and the rule it breaks. Numeric bounds come from dispatch_policy.limits(). mode (0025): enforce (the default) or shadow (every fetched job is admitted; what the gates would have refused is recorded in shadow_refusals).';

-- ---------------------------------------------------------------------------
-- check() and repair(): a shadow deficit is not a negative-token finding.
-- _bucket_problems, defined once in 0.2.0 (0011 says what it finds), with
-- the shadow exemption.

CREATE FUNCTION dispatch_policy._bucket_problems(now timestamptz)
RETURNS TABLE (policy text, gate text, partition text, problem text, tokens double precision, level double precision,
               burst double precision, stored_burst double precision, config_burst double precision)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  SELECT b.policy, b.gate, b.partition,
         CASE WHEN NOT (b.tokens > '-Infinity'::double precision AND b.tokens < 'Infinity'::double precision)
                THEN 'bucket_not_finite'
              WHEN l.level < 0 AND NOT l.shadow THEN 'bucket_negative_tokens'
              ELSE 'bucket_over_burst' END,
         b.tokens, l.level, l.burst, b.burst, l.config_burst
  FROM dispatch_policy.throttle_buckets b
  JOIN dispatch_policy.policies p ON p.name = b.policy
  CROSS JOIN LATERAL (
    SELECT g FROM jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
    WHERE g ->> 'type' = 'throttle' AND coalesce(g ->> 'name', g ->> 'type') = b.gate
    LIMIT 1
  ) cfg
  CROSS JOIN LATERAL (
    SELECT dispatch_policy._throttle_burst(cfg.g) AS config_burst
  ) c
  CROSS JOIN LATERAL (
    SELECT dispatch_policy._bucket_tokens(b.tokens, b.rate, b.per_seconds, b.burst, b.refilled_at, _bucket_problems.now) AS level,
           CASE WHEN b.refilled_at >= p.updated_at THEN coalesce(c.config_burst, b.burst) ELSE b.burst END AS burst,
           c.config_burst,
           -- A deficit is a shadow policy's (0025): of a policy in shadow
           -- mode, or of a partition that recorded would-refusals (a policy
           -- back to enforce keeps its deficit until it refills).
           (coalesce(p.config ->> 'mode', 'enforce') = 'shadow'
            OR EXISTS (SELECT 1 FROM dispatch_policy.shadow_refusals r
                       WHERE r.policy = b.policy AND r.gate = b.gate AND r.partition = b.partition)) AS shadow
  ) l
  WHERE NOT (b.tokens > '-Infinity'::double precision AND b.tokens < 'Infinity'::double precision)
     OR (l.level < 0 AND NOT l.shadow)
     OR b.tokens > b.burst
     OR l.level > l.burst
$$;
COMMENT ON FUNCTION dispatch_policy._bucket_problems(timestamptz) IS
  'Internal: throttle buckets of current throttle gates whose tokens are NaN or infinite (bucket_not_finite), whose level at now (_bucket_tokens) is below 0 (bucket_negative_tokens; not for a shadow policy''s bucket, nor one whose partition recorded would-refusals in shadow_refusals: that deficit is shadow mode''s, and it refills) or above the burst (bucket_over_burst): the config''s fixed burst for buckets refilled since the config last changed, else the burst stored with the bucket. burst is that burst, stored_burst the bucket''s, config_burst the config''s (NULL when read from job contexts).';

-- ---------------------------------------------------------------------------
-- partition_overview, defined once in 0.2.0: 0.1.0's columns, with the
-- partitions rendered as admission renders them, in_flight of throttle and
-- fair_interleave gates counted from the admitted jobs and tokens refilled
-- by _bucket_tokens (0008), pending and last_staged_at read from the
-- counters (0020); shadow_refusals rows are listed too, and four columns
-- are appended.

CREATE OR REPLACE VIEW dispatch_policy.partition_overview AS
WITH gates AS (
  SELECT p.name AS policy,
         coalesce(g ->> 'name', g ->> 'type') AS gate,
         g ->> 'type' AS gate_type,
         g AS config,
         -- Whose counters hold the gate's pending jobs: its own (a partitioned
         -- gate); '' for the one partition 'default' of an unpartitioned gate
         -- (the policy's counts); a fair_interleave gate's partitions are those
         -- of the first partitioned gate with its template (its partition_by,
         -- else the first gate's, as _gate_partitions) when there is one.
         CASE
           WHEN g ->> 'type' IN ('throttle', 'concurrency', 'adaptive_concurrency') AND g ? 'partition_by'
             THEN coalesce(g ->> 'name', g ->> 'type')
           WHEN g ->> 'type' = 'fair_interleave' AND coalesce(g ->> 'partition_by', p.partition_templates[1]) IS NOT NULL
             THEN p.partition_gates[array_position(p.partition_templates, coalesce(g ->> 'partition_by', p.partition_templates[1]))]
           ELSE ''
         END AS source
  FROM dispatch_policy.policies p
  CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
), counted AS (
  SELECT x.policy, x.gate, x.partition, sum(x.pending) AS pending, max(x.last_staged_at) AS last_staged_at
  FROM (SELECT c.policy, c.gate, c.partition, c.pending, c.last_staged_at FROM dispatch_policy.partition_counters c
        UNION ALL
        SELECT d.policy, d.gate, d.partition, d.d_pending, d.last_staged_at FROM dispatch_policy.stat_deltas d
        WHERE d.gate <> '' AND (d.d_pending <> 0 OR d.last_staged_at IS NOT NULL)) x
  GROUP BY 1, 2, 3
), totals AS (
  SELECT x.policy, sum(x.staged) AS pending, max(x.last_staged_at) AS last_staged_at
  FROM (SELECT c.policy, c.pending + c.scheduled AS staged, c.last_staged_at FROM dispatch_policy.policy_counters c
        UNION ALL
        SELECT d.policy, d.d_pending + d.d_scheduled, d.last_staged_at FROM dispatch_policy.stat_deltas d
        WHERE d.gate = '') x
  GROUP BY 1
), waiting AS (
  SELECT gt.policy, gt.gate, c.partition, c.pending, c.last_staged_at
  FROM gates gt JOIN counted c ON c.policy = gt.policy AND c.gate = gt.source
  WHERE gt.source <> ''
  UNION ALL
  SELECT gt.policy, gt.gate, 'default', t.pending, t.last_staged_at
  FROM gates gt JOIN totals t ON t.policy = gt.policy
  WHERE gt.source = ''
), held AS (
  SELECT a.policy, k.key AS gate, k.value AS partition, count(*) AS in_flight
  FROM dispatch_policy.admitted_jobs a, jsonb_each_text(a.partitions) AS k
  GROUP BY 1, 2, 3
), known AS (
  -- Every source of a partition in one aggregation, not joined one to
  -- another (the planner cannot size these CTEs; joined, a misestimate
  -- made nested loops over 10,000 partitions take 30 s). Listed: a
  -- partition with staged jobs, or in any other source.
  SELECT x.policy, x.gate, x.partition, sum(x.pending) AS pending, max(x.last_staged_at) AS last_staged_at,
         sum(x.held) AS held
  FROM (SELECT w.policy, w.gate, w.partition, w.pending, w.last_staged_at, NULL::bigint AS held FROM waiting w
        UNION ALL SELECT h.policy, h.gate, h.partition, NULL, NULL, h.in_flight FROM held h
        UNION ALL SELECT t.policy, t.gate, t.partition, NULL, NULL, NULL FROM dispatch_policy.throttle_buckets t
        UNION ALL SELECT i.policy, i.gate, i.partition, NULL, NULL, NULL FROM dispatch_policy.inflight_counters i
        UNION ALL SELECT s.policy, s.gate, s.partition, NULL, NULL, NULL FROM dispatch_policy.adaptive_stats s
        UNION ALL SELECT r.policy, r.gate, r.partition, NULL, NULL, NULL FROM dispatch_policy.shadow_refusals r) x
  GROUP BY 1, 2, 3
  HAVING coalesce(sum(x.pending), 0) > 0 OR count(*) > count(x.pending)
)
SELECT
  k.policy,
  k.gate,
  gt.gate_type,
  k.partition,
  CASE WHEN gt.source IS NOT NULL THEN coalesce(k.pending, 0)::bigint END AS pending,
  CASE WHEN gt.gate_type IN ('concurrency', 'global_cap', 'adaptive_concurrency')
       THEN coalesce(c.in_flight, 0) ELSE coalesce(k.held, 0)::integer END AS in_flight,
  CASE gt.gate_type
    WHEN 'concurrency' THEN dispatch_policy._json_number(gt.config -> 'max')
    WHEN 'global_cap' THEN dispatch_policy._json_number(gt.config -> 'max')
    WHEN 'adaptive_concurrency' THEN a.current_max::numeric
  END AS cap,
  CASE WHEN b.partition IS NOT NULL THEN
    dispatch_policy._bucket_tokens(b.tokens, b.rate, b.per_seconds, b.burst, b.refilled_at, now())
  END AS tokens,
  a.ewma_lag_ms,
  k.last_staged_at,
  greatest(c.last_admitted_at, b.last_admitted_at) AS last_admitted_at,
  -- Appended by 0025 (shadow policies).
  r.would_refuse,
  r.last_at AS last_would_refuse_at,
  CASE WHEN b.partition IS NOT NULL AND b.rate > 0 THEN
    greatest(-dispatch_policy._bucket_tokens(b.tokens, b.rate, b.per_seconds, b.burst, b.refilled_at, now()), 0)
    * b.per_seconds / b.rate
  END AS would_be_lag_seconds,
  CASE WHEN gt.gate_type IN ('concurrency', 'global_cap', 'adaptive_concurrency') THEN
    greatest(coalesce(c.in_flight, 0)::numeric
             - CASE gt.gate_type WHEN 'adaptive_concurrency' THEN a.current_max::numeric
                                 ELSE dispatch_policy._json_number(gt.config -> 'max') END, 0)::integer
  END AS over_cap
FROM known k
JOIN gates gt ON gt.policy = k.policy AND gt.gate = k.gate
-- Primary-key probes.
LEFT JOIN dispatch_policy.throttle_buckets b ON b.policy = k.policy AND b.gate = k.gate AND b.partition = k.partition
LEFT JOIN dispatch_policy.inflight_counters c ON c.policy = k.policy AND c.gate = k.gate AND c.partition = k.partition
LEFT JOIN dispatch_policy.adaptive_stats a ON a.policy = k.policy AND a.gate = k.gate AND a.partition = k.partition
LEFT JOIN dispatch_policy.shadow_refusals r ON r.policy = k.policy AND r.gate = k.gate AND r.partition = k.partition;
COMMENT ON VIEW dispatch_policy.partition_overview IS
  'One row per gate partition with staged jobs, jobs in flight or gate state (buckets, counters, adaptive state), of gates still in their policy. Pending jobs and last staging come from counters kept as jobs move (partition_counters; policy_counters for the one partition ''default'' of an unpartitioned gate), not from the jobs: its cost grows with the partitions, the jobs in flight and the unfolded deltas, not with the backlog.';
COMMENT ON COLUMN dispatch_policy.partition_overview.pending IS
  'Staged jobs in this partition, eligible and scheduled (before 0020: eligible only). Exact. NULL for a fair_interleave gate whose own partition_by no partitioned gate shares (its partitions are not counted).';
COMMENT ON COLUMN dispatch_policy.partition_overview.in_flight IS
  'Admitted, unfinished jobs in this gate partition: the slot counter for concurrency, global_cap and adaptive_concurrency; a count of the admitted jobs for throttle and fair_interleave.';
COMMENT ON COLUMN dispatch_policy.partition_overview.last_staged_at IS
  'When a job was last staged into this partition (new, a retry, or moved into it by a changed template), admitted since or not (before 0020: the latest staging among the jobs still waiting).';
COMMENT ON COLUMN dispatch_policy.partition_overview.tokens IS
  'Throttle tokens available now (the bucket refilled to now() by the one refill formula, _bucket_tokens). Below 0 only in a shadow policy''s bucket (or one back to enforce that has not refilled yet): the deficit of the jobs admitted beyond the budget.';
COMMENT ON COLUMN dispatch_policy.partition_overview.would_refuse IS
  'Shadow policies: jobs this gate partition would have refused and that were admitted anyway (shadow_refusals.would_refuse); NULL when none was recorded.';
COMMENT ON COLUMN dispatch_policy.partition_overview.last_would_refuse_at IS
  'Shadow policies: when the last would-refusal here was recorded; NULL when none was.';
COMMENT ON COLUMN dispatch_policy.partition_overview.would_be_lag_seconds IS
  'A throttle: the token deficit now over the refill rate, in seconds: how far behind an enforcing throttle would be (0 without a deficit, which only a shadow policy makes; NULL for a rate of 0 and for other gates).';
COMMENT ON COLUMN dispatch_policy.partition_overview.over_cap IS
  'A concurrency, global_cap or adaptive_concurrency gate: jobs in flight beyond the cap now (0 within it; above 0 only through a shadow policy, and then until enough jobs finish; NULL for a cap read from job contexts and for other gates).';

-- ---------------------------------------------------------------------------
-- policy_overview, defined once in 0.2.0: 0.1.0's columns, failing ticks
-- (0008), the rows of _policy_overview with recent admissions, lag and
-- throughput (0016), the last day's expired, dropped and deferred jobs
-- (0023), and the policy's mode.
CREATE OR REPLACE VIEW dispatch_policy.policy_overview AS
SELECT o.policy, o.pending, o.scheduled, o.in_flight, o.completed_24h, o.failed_24h, o.dead, o.oldest_pending_age,
       o.paused, o.failing_since, o.tick_failures, o.last_error, o.retry_at, o.admitted_24h, o.lag_p50_ms, o.lag_p95_ms,
       o.throughput_per_min,
       (SELECT count(*) FROM dispatch_policy.finished_jobs f
        WHERE f.policy = o.policy AND f.status = 'expired' AND f.finished_at > now() - interval '24 hours') AS expired_24h,
       (SELECT count(*) FROM dispatch_policy.finished_jobs f
        WHERE f.policy = o.policy AND f.status = 'dropped' AND f.finished_at > now() - interval '24 hours') AS dropped_24h,
       (SELECT count(*) FROM dispatch_policy.job_deferrals d
        WHERE d.policy = o.policy AND d.deferred_at > now() - interval '24 hours') AS deferred_24h,
       (SELECT dispatch_policy._policy_mode(p.config) FROM dispatch_policy.policies p WHERE p.name = o.policy) AS mode
FROM dispatch_policy._policy_overview() AS o;
COMMENT ON VIEW dispatch_policy.policy_overview IS
  'One row per policy: jobs waiting, scheduled, in flight, finished in the last 24 hours, dead, how long the oldest eligible job has waited, whether its ticks are failing, and recent admissions, queue lag and throughput. Reads counters and per-minute history (policy_counters, stat_minutes, plus the deltas not folded yet) instead of the jobs: its cost does not grow with the backlog (a few index probes per policy, the policy''s minute rows of the last day, the unfolded deltas).';
COMMENT ON COLUMN dispatch_policy.policy_overview.pending IS 'Staged jobs eligible for admission now (no not_before, or one that has passed). Exact.';
COMMENT ON COLUMN dispatch_policy.policy_overview.scheduled IS 'Staged jobs whose not_before is still in the future. Exact.';
COMMENT ON COLUMN dispatch_policy.policy_overview.in_flight IS 'Admitted jobs not yet completed, failed or reaped. Exact.';
COMMENT ON COLUMN dispatch_policy.policy_overview.completed_24h IS 'Jobs completed in the last 24 hours, by whole UTC minutes (the oldest minute counted starts less than 24 hours and 1 minute ago).';
COMMENT ON COLUMN dispatch_policy.policy_overview.failed_24h IS 'Failed attempts (including expired leases) in the last 24 hours, by whole minutes as completed_24h.';
COMMENT ON COLUMN dispatch_policy.policy_overview.dead IS 'Jobs kept as dead after max_attempts (rows of finished_jobs with status dead). Exact.';
COMMENT ON COLUMN dispatch_policy.policy_overview.oldest_pending_age IS 'How long the longest-waiting eligible job has been staged (NULL when none), looking at the first job in staging order of each priority and at jobs whose not_before has passed; a retry counts from when it was re-staged.';
COMMENT ON COLUMN dispatch_policy.policy_overview.failing_since IS 'When the policy''s ticks started failing (NULL when they succeed).';
COMMENT ON COLUMN dispatch_policy.policy_overview.tick_failures IS 'Failed ticks in a row.';
COMMENT ON COLUMN dispatch_policy.policy_overview.last_error IS 'The error of the last failed tick.';
COMMENT ON COLUMN dispatch_policy.policy_overview.retry_at IS 'When a runner retries the failing policy.';
COMMENT ON COLUMN dispatch_policy.policy_overview.admitted_24h IS 'Attempts admitted in the last 24 hours, by whole minutes as completed_24h.';
COMMENT ON COLUMN dispatch_policy.policy_overview.lag_p50_ms IS 'Median queue lag (admitted to started) in ms of the attempts that started in the last hour (by whole minutes), from the lag histograms: within a factor of sqrt(2). NULL when none started.';
COMMENT ON COLUMN dispatch_policy.policy_overview.lag_p95_ms IS '95th percentile queue lag in ms over the last hour, as lag_p50_ms.';
COMMENT ON COLUMN dispatch_policy.policy_overview.throughput_per_min IS 'Jobs completed per minute, averaged over the 10 whole UTC minutes before the current one.';
COMMENT ON COLUMN dispatch_policy.policy_overview.expired_24h IS
  'Jobs finished as expired (their expires_at passed before admission) in the last 24 hours. Exact (finished_jobs, until pruned).';
COMMENT ON COLUMN dispatch_policy.policy_overview.dropped_24h IS
  'Jobs finished as dropped (the oldest of a partition at max_pending_per_partition, on_overflow drop_oldest) in the last 24 hours. Exact (finished_jobs, until pruned).';
COMMENT ON COLUMN dispatch_policy.policy_overview.deferred_24h IS
  'Deferrals by workers (defer(): backpressure from downstream) in the last 24 hours. Exact (job_deferrals, until pruned).';
COMMENT ON COLUMN dispatch_policy.policy_overview.mode IS
  'enforce, or shadow: the policy admits every job it fetches and records what its gates would have refused (partition_overview.would_refuse).';

-- ---------------------------------------------------------------------------
-- explain: its one definition in 0.2.0 (0015's, with the pauses of 0017,
-- the deadline of 0023 and a throttle's cost of 0024). For a job of a shadow
-- policy its gate rows that wait say they would (and that the job is
-- admitted anyway), a row says the policy is in shadow mode, and the
-- estimate is the next tick when nothing else holds the job. A job whose
-- deadline passed gets no estimate of an admission: the next tick finishes
-- it as expired. The lane row shows the lane's round_robin_weight.

CREATE OR REPLACE FUNCTION dispatch_policy.explain(id bigint)
RETURNS TABLE (aspect text, gate text, partition text, verdict text, explanation text, wait_seconds double precision)
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
DECLARE
  j dispatch_policy.staged_jobs;
  pol dispatch_policy.policies;
  at timestamptz := now();
  parts jsonb;
  g jsonb;
  name text;
  kind text;
  part text;
  b dispatch_policy.throttle_buckets;
  rate double precision;
  per double precision;
  burst double precision;
  tokens double precision;
  cost double precision;
  ahead_cost double precision;
  cost_text text;
  cap double precision;
  held integer;
  ahead bigint;
  ahead_in_partition bigint;
  scanned bigint;
  ahead_contexts jsonb[];
  at_least text;
  needed numeric;
  to_token numeric;
  estimate_at_least boolean := false;
  ln dispatch_policy.lanes;
  waits boolean := false;
  estimate double precision := 0::double precision;
  estimable boolean := true;
  reasons text[] := '{}'::text[];
  a dispatch_policy.adaptive_stats;
  initial integer;
  ceiling integer;
  floor_ integer;
  pp dispatch_policy.paused_partitions;
  -- A shadow policy (0025) admits the job whatever its gates say: a gate
  -- that would make it wait says would wait, and only what still holds the
  -- job (holds: a pause, a schedule, a blocked lane, failing ticks) delays
  -- its estimate.
  shadow boolean := false;
  holds boolean := false;
  would_wait CONSTANT text := 'shadow: admitted anyway; it would wait: ';
BEGIN
  IF explain.id IS NULL THEN
    RAISE EXCEPTION 'explain: id must not be NULL' USING ERRCODE = '22004';
  END IF;
  SELECT * INTO j FROM dispatch_policy.staged_jobs s WHERE s.id = explain.id;
  IF NOT FOUND THEN
    RETURN QUERY
    SELECT 'job'::text, NULL::text, NULL::text, 'admitted'::text,
           format('admitted at %s (attempt %s) into queue %s, lease until %s%s; partitions %s',
                  x.admitted_at, x.attempt, x.queue, x.lease_expires_at,
                  CASE WHEN x.started_at IS NOT NULL THEN format(', started at %s by %s', x.started_at, coalesce(x.worker, '?'))
                       ELSE ', not started' END,
                  x.partitions),
           NULL::float8
    FROM dispatch_policy.admitted_jobs x WHERE x.id = explain.id;
    IF FOUND THEN RETURN; END IF;
    RETURN QUERY
    SELECT 'job'::text, NULL::text, NULL::text, f.status,
           format('%s at %s after %s attempt(s)%s', f.status, f.finished_at, f.attempts,
                  CASE WHEN f.last_error IS NOT NULL THEN ': ' || left(f.last_error, 500) ELSE '' END),
           NULL::float8
    FROM dispatch_policy.finished_jobs f WHERE f.id = explain.id;
    IF FOUND THEN RETURN; END IF;
    RAISE EXCEPTION 'explain: no job %', explain.id
      USING ERRCODE = 'P0002', HINT = 'Completed jobs are kept for the retention prune() is given; a job id never staged has no row.';
  END IF;

  SELECT * INTO pol FROM dispatch_policy.policies p WHERE p.name = j.policy;
  RETURN QUERY SELECT 'job'::text, NULL::text, NULL::text,
    CASE WHEN j.not_before > at THEN 'scheduled' ELSE 'pending' END,
    format('job %s of policy %s, queue %s, priority %s, attempt %s, staged %s ago%s', j.id, j.policy, j.queue,
           j.priority, j.attempt, date_trunc('second', at - j.staged_at),
           CASE WHEN j.last_error IS NOT NULL THEN '; last error: ' || left(j.last_error, 300) ELSE '' END),
    NULL::float8;
  shadow := pol.name IS NOT NULL AND dispatch_policy._policy_mode(pol.config) = 'shadow';
  IF shadow THEN
    RETURN QUERY SELECT 'policy'::text, NULL::text, NULL::text, 'shadow'::text,
      'the policy is in shadow mode: its gates are evaluated and what they would refuse is recorded (partition_overview.would_refuse), but every job the fetch reaches is admitted'::text,
      NULL::float8;
  END IF;
  IF pol.name IS NULL THEN
    RETURN QUERY SELECT 'policy'::text, NULL::text, NULL::text, 'waits'::text,
      format('policy %s is not declared: nothing admits this job until it is', quote_literal(j.policy)), NULL::float8;
    RETURN;
  END IF;
  IF pol.paused THEN
    waits := true; holds := true; estimable := false; reasons := array_append(reasons, 'the policy is paused'::text);
    RETURN QUERY SELECT 'policy'::text, NULL::text, NULL::text, 'waits'::text,
      'the policy is paused: nothing is admitted until dispatch_policy.resume(policy)'::text, NULL::float8;
  END IF;
  IF j.not_before > at THEN
    waits := true; holds := true; estimate := greatest(estimate, extract(epoch FROM j.not_before - at));
    reasons := array_append(reasons, 'scheduled for later'::text);
    RETURN QUERY SELECT 'schedule'::text, NULL::text, NULL::text, 'waits'::text,
      format('scheduled: not before %s', j.not_before), extract(epoch FROM j.not_before - at)::float8;
  END IF;
  -- Deferred by its worker (0022): the latest deferral still ahead.
  RETURN QUERY SELECT 'deferred'::text, NULL::text, NULL::text, 'info'::text,
    format('deferred by its worker until %s (%s deferral%s): %s', d.until, d.n, CASE WHEN d.n = 1 THEN '' ELSE 's' END,
           left(d.reason, 300)),
    NULL::float8
  FROM (SELECT x.until, x.reason, count(*) OVER () AS n, x.id AS deferral
        FROM dispatch_policy.job_deferrals x WHERE x.job_id = j.id) d
  WHERE d.until > at
  ORDER BY d.deferral DESC LIMIT 1;
  -- Its deadline (0023).
  IF j.expires_at IS NOT NULL THEN
    RETURN QUERY SELECT 'deadline'::text, NULL::text, NULL::text,
      CASE WHEN j.expires_at <= at OR j.not_before >= j.expires_at THEN 'expired' ELSE 'ok' END,
      CASE WHEN j.expires_at <= at
           THEN format('expired at %s: the next tick finishes it as expired instead of admitting it', j.expires_at)
           WHEN j.not_before >= j.expires_at
           THEN format('expires at %s, and scheduled for %s, not before: it can never be admitted, and the next tick '
                       'finishes it as expired', j.expires_at, j.not_before)
           ELSE format('expires at %s (in %s): finished as expired if not admitted by then', j.expires_at,
                       date_trunc('second', j.expires_at - at)) END,
      NULL::float8;
  END IF;

  -- Its place in its lane (the fetch takes a lane's jobs by priority, then id).
  IF j.round_robin_key IS NULL THEN
    SELECT count(*) INTO ahead FROM dispatch_policy.staged_jobs s
    WHERE s.policy = j.policy AND s.round_robin_key IS NULL AND s.not_before IS NULL
      AND (s.priority, s.id) < (j.priority, j.id);
  ELSE
    SELECT count(*) INTO ahead FROM dispatch_policy.staged_jobs s
    WHERE s.policy = j.policy AND s.round_robin_key = j.round_robin_key AND s.not_before IS NULL
      AND (s.priority, s.id) < (j.priority, j.id);
  END IF;
  SELECT * INTO ln FROM dispatch_policy.lanes l WHERE l.policy = j.policy AND l.lane IS NOT DISTINCT FROM j.round_robin_key;
  -- The fetch passes a blocked lane over, whatever its jobs' gates say now.
  IF ln.blocked_until > at THEN
    waits := true; holds := true;
    reasons := array_append(reasons, 'its lane is blocked'::text);
    IF ln.blocked_until = 'infinity' THEN
      estimable := false;
    ELSE
      estimate := greatest(estimate, extract(epoch FROM ln.blocked_until - at)::double precision);
    END IF;
  END IF;
  RETURN QUERY SELECT 'lane'::text, NULL::text, coalesce(j.round_robin_key, '(no key)'),
    CASE WHEN ln.blocked_until > at THEN 'waits' ELSE 'info' END,
    format('%s job(s) ahead in its lane %s%s; %s lane(s) of the policy ready for the rotation', ahead,
           coalesce(quote_literal(j.round_robin_key), '(jobs without a key)'),
           CASE WHEN ln.policy IS NULL THEN ', which has no lanes row yet (the runner''s maintenance adds it)'
                WHEN ln.blocked_until > at AND ln.blocked_gate IS NOT NULL
                     AND EXISTS (SELECT 1 FROM dispatch_policy.paused_partitions x
                                 WHERE x.policy = j.policy AND x.gate = ln.blocked_gate
                                   AND x.partition = ln.blocked_partition AND (x.until IS NULL OR x.until > at))
                  THEN format(', blocked while partition %s of %s is paused (%s)', quote_literal(ln.blocked_partition),
                              ln.blocked_gate, CASE WHEN ln.blocked_until = 'infinity' THEN 'until resume_partition'
                                                    ELSE 'until ' || ln.blocked_until END)
                WHEN ln.blocked_until = 'infinity' AND ln.blocked_gate IS NOT NULL
                  THEN format(', blocked by %s partition %s until it has room (a slot released, a config change)',
                              ln.blocked_gate, quote_literal(ln.blocked_partition))
                WHEN ln.blocked_until > at AND ln.blocked_gate IS NOT NULL
                  THEN format(', blocked until %s by %s partition %s', ln.blocked_until, ln.blocked_gate, quote_literal(ln.blocked_partition))
                WHEN ln.blocked_until > at THEN format(', passed over until %s', ln.blocked_until)
                ELSE ', ready' END
           -- Its share in the rotation (0024), when the policy weighs lanes.
           || CASE WHEN pol.config ? 'round_robin_weight'
                   THEN format(', weight %s (round_robin_weight)',
                               dispatch_policy._lane_weight(j.policy, j.round_robin_key, pol.config -> 'round_robin_weight'))
                   ELSE '' END,
           (SELECT count(*) FROM dispatch_policy.lanes r WHERE r.policy = j.policy AND (r.blocked_until IS NULL OR r.blocked_until <= at))),
    CASE WHEN ln.blocked_until > at AND ln.blocked_until < 'infinity' THEN extract(epoch FROM ln.blocked_until - at)::float8 END;

  -- The nearest jobs ahead of it in the fetch order, once for every
  -- throttle: those of its partition take tokens first. Bounded: an
  -- explanation must not scan the backlog.
  SELECT coalesce(array_agg(s.context), '{}'), count(*) INTO ahead_contexts, scanned
  FROM (SELECT s.context FROM dispatch_policy.staged_jobs s
        WHERE s.policy = j.policy AND s.not_before IS NULL AND (s.priority, s.id) < (j.priority, j.id)
        ORDER BY s.priority DESC, s.id DESC LIMIT 2000) s;

  parts := dispatch_policy._gate_partitions(pol.config, j.context);
  FOR g IN SELECT x FROM jsonb_array_elements(coalesce(pol.config -> 'gates', '[]'::jsonb)) AS x LOOP
    name := coalesce(g ->> 'name', g ->> 'type');
    kind := g ->> 'type';
    part := parts ->> name;
    -- A paused partition refuses the job whatever the gate's state.
    SELECT * INTO pp FROM dispatch_policy.paused_partitions x
    WHERE x.policy = j.policy AND x.gate = name AND x.partition = part AND (x.until IS NULL OR x.until > at)
      AND dispatch_policy._partitioned_gate(pol.config, name) IS NOT NULL;
    IF FOUND THEN
      waits := true; holds := true;
      reasons := array_append(reasons, format('%s %s on %s is paused', kind, name, quote_literal(part))::text);
      IF pp.until IS NULL THEN
        estimable := false;
      ELSE
        estimate := greatest(estimate, extract(epoch FROM pp.until - at)::double precision);
      END IF;
      RETURN QUERY SELECT 'gate'::text, name, part, 'waits'::text,
        format('%s: the partition is paused (pause_partition at %s) %s%s: none of its jobs is admitted until then',
               kind, pp.paused_at, CASE WHEN pp.until IS NULL THEN 'until resume_partition' ELSE 'until ' || pp.until END,
               CASE WHEN pp.reason IS NOT NULL THEN ': ' || left(pp.reason, 300) ELSE '' END),
        extract(epoch FROM pp.until - at)::float8;
      CONTINUE;
    END IF;
    IF kind = 'throttle' THEN
      SELECT * INTO b FROM dispatch_policy.throttle_buckets t
      WHERE t.policy = j.policy AND t.gate = name AND t.partition = part;
      rate := coalesce(b.rate, dispatch_policy._gate_number(g -> 'rate', j.context, 'throttle.rate'));
      per := coalesce(b.per_seconds, dispatch_policy._gate_number(g -> 'per', j.context, 'throttle.per'));
      burst := coalesce(b.burst, CASE WHEN g ? 'burst' THEN dispatch_policy._gate_number(g -> 'burst', j.context, 'throttle.burst')
                                      ELSE least(greatest(rate, 1), 1000000) END);
      tokens := CASE WHEN b.policy IS NULL THEN burst
                     ELSE dispatch_policy._bucket_tokens(b.tokens, b.rate, b.per_seconds, b.burst, b.refilled_at, at) END;
      -- The tokens the job takes (cost, default 1), at most the burst, as the runner charges it.
      cost := least(CASE WHEN g ? 'cost' THEN dispatch_policy._gate_number(g -> 'cost', j.context, 'throttle.cost') ELSE 1 END,
                    burst);
      cost_text := CASE WHEN g ? 'cost' THEN format('; this job costs %s token(s)', cost) ELSE '' END;
      SELECT count(*), coalesce(sum(least(CASE WHEN g ? 'cost'
                                               THEN dispatch_policy._gate_number(g -> 'cost', c.context, 'throttle.cost')
                                               ELSE 1 END, burst)), 0)
      INTO ahead_in_partition, ahead_cost
      FROM unnest(ahead_contexts) AS c(context)
      WHERE dispatch_policy._partition_key(g ->> 'partition_by', c.context) = part;
      at_least := CASE WHEN scanned >= 2000 THEN 'at least ' ELSE '' END;
      -- Seconds until the bucket holds its cost and that of every job of
      -- its partition ahead of it (numeric: a tiny rate must not overflow);
      -- NULL beyond a century.
      IF rate > 0 THEN
        needed := greatest((ahead_cost + cost)::numeric - tokens::numeric, 0) * per::numeric / rate::numeric;
        IF needed > 3153600000 THEN needed := NULL; END IF;
        to_token := CASE WHEN tokens >= cost THEN 0 ELSE (cost::numeric - tokens::numeric) * per::numeric / rate::numeric END;
        IF to_token > 3153600000 THEN to_token := NULL; END IF;
      END IF;
      IF rate = 0 THEN
        -- The runner admits nothing through a throttle of rate 0.
        waits := true; estimable := false;
        reasons := array_append(reasons, format('throttle %s has a rate of 0', name)::text);
        RETURN QUERY SELECT 'gate'::text, name, part, CASE WHEN shadow THEN 'would wait' ELSE 'waits' END,
          CASE WHEN shadow THEN would_wait ELSE '' END || 'throttle: a rate of 0 admits nothing (declare a rate above 0)', NULL::float8;
      ELSIF tokens >= cost THEN
        RETURN QUERY SELECT 'gate'::text, name, part, 'ok'::text,
          format('throttle: %s token(s) of %s now (%s per %s s)%s; %s%s job(s) of this partition ahead of it',
                 round(tokens::numeric, 2), burst, rate, per, cost_text, at_least, ahead_in_partition), NULL::float8;
      ELSE
        waits := true; reasons := array_append(reasons, format('throttle %s on %s', name, quote_literal(part))::text);
        RETURN QUERY SELECT 'gate'::text, name, part, CASE WHEN shadow THEN 'would wait' ELSE 'waits' END,
          CASE WHEN shadow THEN would_wait ELSE '' END ||
          format('throttle: %s token(s) of %s (%s per %s s)%s: %s in %s; %s%s job(s) of this partition ahead of it',
                 round(tokens::numeric, 2), burst, rate, per, cost_text,
                 CASE WHEN g ? 'cost' THEN 'enough for its cost' ELSE 'the next whole token' END,
                 CASE WHEN to_token IS NULL THEN 'more than a century' ELSE round(to_token, 3) || ' s' END,
                 at_least, ahead_in_partition),
          CASE WHEN NOT shadow THEN to_token::float8 END;
      END IF;
      IF rate > 0 AND ahead_cost + cost > tokens THEN
        IF needed IS NULL THEN
          estimable := false;
        ELSE
          estimate := greatest(estimate, needed::double precision);
          IF tokens >= cost THEN
            reasons := array_append(reasons,
              format('throttle %s on %s: %s%s job(s) ahead take its tokens', name, quote_literal(part), at_least, ahead_in_partition)::text);
          END IF;
          IF at_least <> '' THEN estimate_at_least := true; END IF;
        END IF;
      END IF;
    ELSIF kind IN ('concurrency', 'global_cap', 'adaptive_concurrency') THEN
      SELECT coalesce(max(c.in_flight), 0) INTO held FROM dispatch_policy.inflight_counters c
      WHERE c.policy = j.policy AND c.gate = name AND c.partition = part;
      IF kind = 'adaptive_concurrency' THEN
        SELECT * INTO a FROM dispatch_policy.adaptive_stats s WHERE s.policy = j.policy AND s.gate = name AND s.partition = part;
        initial := coalesce(dispatch_policy._json_number(g -> 'initial_max')::integer, 3);
        floor_ := coalesce(dispatch_policy._json_number(g -> 'min')::integer, 1);
        ceiling := dispatch_policy._json_number(g -> 'max')::integer;
        cap := coalesce(a.current_max, initial)::double precision;
        -- An idle partition may run at least initial_max (the runner's safety valve).
        IF held = 0 THEN cap := greatest(cap, initial); END IF;
        IF ceiling IS NOT NULL THEN cap := least(cap, greatest(ceiling, floor_)); END IF;
      ELSE
        cap := dispatch_policy._gate_number(g -> 'max', j.context, kind || '.max');
      END IF;
      IF held >= cap THEN
        waits := true; estimable := false;
        reasons := array_append(reasons, format('%s %s on %s', kind, name, quote_literal(part))::text);
      END IF;
      RETURN QUERY SELECT 'gate'::text, name, part,
        CASE WHEN held < cap THEN 'ok' WHEN shadow THEN 'would wait' ELSE 'waits' END,
        CASE WHEN held >= cap AND shadow THEN would_wait ELSE '' END ||
        format('%s: %s in flight of a cap of %s%s%s', kind, held, cap,
               CASE WHEN kind = 'adaptive_concurrency'
                 THEN format(' (adaptive; %s, target %s ms)',
                             coalesce('EWMA lag ' || round(a.ewma_lag_ms::numeric, 1) || ' ms', 'no lag observed yet'),
                             g -> 'target_lag_ms') ELSE '' END,
               CASE WHEN held >= cap THEN ': it waits for a slot to be released (complete, fail or an expired lease)' ELSE '' END),
        NULL::float8;
    ELSE
      RETURN QUERY SELECT 'gate'::text, name, part, 'ok'::text,
        format('%s: orders a batch across partitions; it never refuses a job', kind), NULL::float8;
    END IF;
  END LOOP;

  IF pol.name IS NOT NULL AND EXISTS (SELECT 1 FROM dispatch_policy.runner_failures f WHERE f.policy = j.policy) THEN
    waits := true; holds := true; estimable := false; reasons := array_append(reasons, 'its ticks fail'::text);
    RETURN QUERY SELECT 'policy'::text, NULL::text, NULL::text, 'waits'::text,
      (SELECT format('the policy''s ticks fail (%s in a row, retry at %s): %s', f.failures, f.retry_at, left(f.error, 300))
       FROM dispatch_policy.runner_failures f WHERE f.policy = j.policy), NULL::float8;
  END IF;

  -- A deadline that passed (0023): the next tick finishes the job as
  -- expired, whatever its gates say; no admission to estimate.
  IF j.expires_at <= at THEN
    RETURN QUERY SELECT 'estimate'::text, NULL::text, NULL::text, 'expired'::text,
      format('not admitted: its deadline passed at %s; the next tick finishes it as expired', j.expires_at), NULL::float8;
    RETURN;
  END IF;
  -- Scheduled at or after its deadline: never admitted (the next fetch
  -- finishes it as expired).
  IF j.not_before >= j.expires_at THEN
    RETURN QUERY SELECT 'estimate'::text, NULL::text, NULL::text, 'expired'::text,
      format('not admitted: scheduled for %s, not before its deadline %s; the next tick finishes it as expired',
             j.not_before, j.expires_at), NULL::float8;
    RETURN;
  END IF;
  IF shadow AND NOT holds THEN
    RETURN QUERY SELECT 'estimate'::text, NULL::text, NULL::text, 'next tick'::text,
      'shadow mode: admitted by the next tick that reaches its lane, whatever its gates would say'::text, 0::float8;
    RETURN;
  END IF;
  RETURN QUERY SELECT 'estimate'::text, NULL::text, NULL::text,
    CASE WHEN NOT waits AND estimate = 0 AND estimable THEN 'next tick' WHEN estimable THEN 'estimated' ELSE 'unknown' END,
    CASE
      WHEN NOT waits AND estimate = 0 AND estimable THEN 'every gate has room: admitted by the next tick that reaches its lane'
      WHEN estimable THEN format('admitted in %sabout %s s (%s), if nothing else takes its tokens first',
                                 CASE WHEN estimate_at_least THEN 'at least ' ELSE '' END,
                                 round(estimate::numeric, 1), array_to_string(reasons, ', '))
      ELSE format('no estimate: %s', array_to_string(reasons, ', '))
    END,
    CASE WHEN estimable THEN estimate END;
END
$$;
COMMENT ON FUNCTION dispatch_policy.explain(bigint) IS
  'Why a job is where it is. For a pending or scheduled job, one row per reason (aspect job, policy, schedule, deferred, deadline, lane, gate, estimate): for each gate of its policy, in its partition, ok or waits with the numbers (tokens now and the time to the next whole token; in flight against the cap; the adaptive cap and EWMA lag) or, when an operator paused that partition (pause_partition), waits with the pause''s end (wait_seconds; none without until) and reason, the latest deferral by its worker while its until is ahead (aspect deferred: info with until, how many deferrals and the reason), its deadline (aspect deadline: ok with expires_at, or expired when it passed, or when the job is scheduled at or after it, and the next tick will finish it as expired); whether it is scheduled or the policy paused or failing, its place in its lane (and whether a pause blocks the lane), and an estimated wait in seconds (wait_seconds) where one can be computed (throttles, schedules and pauses with an end; a full cap or a pause without an end has none). A job of a shadow policy (0025) gets a row of aspect policy, verdict shadow, and its gates that would make it wait say would wait (shadow: admitted anyway) without a wait; its estimate is the next tick unless something else holds it (a pause, a schedule, a blocked lane). A job whose deadline passed, or scheduled at or after its deadline, gets an estimate row expired (the next tick finishes it as expired), not an admission. When the policy has round_robin_weight, the lane row gives the lane''s weight. For an admitted or finished (completed, dead, cancelled, expired, dropped) job, one row saying so. P0002 for an id with no job.';

-- ---------------------------------------------------------------------------
-- prune: its one definition in 0.2.0 (0008's, with the history of 0016, the
-- cancelled jobs and pauses of 0018, partition_counters of 0020, deferrals of
-- 0022, expired and dropped jobs and deadlines of 0023); then shadow_refusals.

DROP FUNCTION dispatch_policy.prune(interval, interval, timestamptz);
CREATE OR REPLACE FUNCTION dispatch_policy.prune(
  retention interval DEFAULT '7 days', idle interval DEFAULT '1 hour', now timestamptz DEFAULT now(), policies text[] DEFAULT NULL
)
RETURNS TABLE (what text, removed bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  n bigint;
  finished_status text;
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

  FOREACH finished_status IN ARRAY ARRAY['completed', 'cancelled'] LOOP
    DELETE FROM dispatch_policy.finished_jobs f
    WHERE f.status = finished_status AND f.finished_at < prune.now - retention
      AND (prune.policies IS NULL OR f.policy = ANY (prune.policies));
    GET DIAGNOSTICS n = ROW_COUNT; what := finished_status || '_jobs'; removed := n; RETURN NEXT;
  END LOOP;
  DELETE FROM dispatch_policy.job_failures jf
  WHERE jf.failed_at < prune.now - retention AND (prune.policies IS NULL OR jf.policy = ANY (prune.policies))
    AND NOT EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f WHERE f.id = jf.job_id AND f.status = 'dead');
  GET DIAGNOSTICS n = ROW_COUNT; what := 'failures'; removed := n; RETURN NEXT;
  -- Deferrals (0022), as failures but whatever became of the job.
  DELETE FROM dispatch_policy.job_deferrals jd
  WHERE jd.deferred_at < prune.now - retention AND (prune.policies IS NULL OR jd.policy = ANY (prune.policies));
  GET DIAGNOSTICS n = ROW_COUNT; what := 'deferrals'; removed := n; RETURN NEXT;
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
  -- Gate partitions with nothing staged and no staging within the retention
  -- (0020). Rows a fold holds are skipped; pending is checked again under
  -- the row lock.
  DELETE FROM dispatch_policy.partition_counters c
  WHERE c.ctid = ANY (ARRAY(
    SELECT x.ctid FROM dispatch_policy.partition_counters x
    WHERE x.pending = 0 AND (x.last_staged_at IS NULL OR x.last_staged_at < prune.now - retention)
      AND (prune.policies IS NULL OR x.policy = ANY (prune.policies))
    LIMIT 1000000
    FOR UPDATE SKIP LOCKED))
    AND c.pending = 0;
  GET DIAGNOSTICS n = ROW_COUNT; what := 'partition_counters'; removed := n; RETURN NEXT;
  -- Jobs that expired or were dropped (0023), as cancelled ones; and the
  -- deadlines kept for re-staged jobs, once past by the retention.
  FOREACH finished_status IN ARRAY ARRAY['expired', 'dropped'] LOOP
    DELETE FROM dispatch_policy.finished_jobs f
    WHERE f.status = finished_status AND f.finished_at < prune.now - retention
      AND (prune.policies IS NULL OR f.policy = ANY (prune.policies));
    GET DIAGNOSTICS n = ROW_COUNT; what := finished_status || '_jobs'; removed := n; RETURN NEXT;
  END LOOP;
  -- Not of a job still staged or admitted: a retry of it must still expire.
  DELETE FROM dispatch_policy.job_deadlines jd
  WHERE jd.expires_at < prune.now - retention AND (prune.policies IS NULL OR jd.policy = ANY (prune.policies))
    AND NOT EXISTS (SELECT 1 FROM dispatch_policy.admitted_jobs a WHERE a.id = jd.job_id)
    AND NOT EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s WHERE s.id = jd.job_id);
  GET DIAGNOSTICS n = ROW_COUNT; what := 'deadlines'; removed := n; RETURN NEXT;
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
  -- Would-refusals of gates no longer in their policy, and those older than
  -- the retention whose bucket has no deficit left (check() excuses a
  -- deficit by its row). Sorted, skipping rows a tick holds.
  WITH doomed AS (
    SELECT r.policy, r.gate, r.partition
    FROM dispatch_policy.shadow_refusals r
    JOIN dispatch_policy.policies p ON p.name = r.policy
    WHERE (prune.policies IS NULL OR r.policy = ANY (prune.policies))
      AND (NOT EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
                       WHERE coalesce(g ->> 'name', g ->> 'type') = r.gate)
           OR (r.last_at < prune.now - retention
               AND NOT EXISTS (SELECT 1 FROM dispatch_policy.throttle_buckets b
                               WHERE b.policy = r.policy AND b.gate = r.gate AND b.partition = r.partition
                                 AND dispatch_policy._bucket_tokens(b.tokens, b.rate, b.per_seconds, b.burst,
                                                                    b.refilled_at, prune.now) < 0)))
    ORDER BY r.policy, r.gate, r.partition
    FOR UPDATE OF r SKIP LOCKED
  )
  DELETE FROM dispatch_policy.shadow_refusals r
  USING doomed d
  WHERE r.policy = d.policy AND r.gate = d.gate AND r.partition = d.partition;
  GET DIAGNOSTICS n = ROW_COUNT;
  what := 'shadow_refusals'; removed := n; RETURN NEXT;
END
$$;
COMMENT ON FUNCTION dispatch_policy.prune(interval, interval, timestamptz, text[]) IS
  'Maintenance: folds the history deltas (fold_stats, up to 1,000,000 rows; row stat_deltas), then deletes gate state of gates no longer in their policy, observations of adaptive gates that are gone, idle partitions (full buckets, empty counters untouched for idle), completed and cancelled jobs, failures of non-dead jobs, deferrals (row deferrals) and per-minute aggregates older than retention (0 to 100 years, else 22023), stat_minutes rows older than retention (a gate partition''s: older than retention or a day, whichever is shorter; at most 1,000,000 a call; row stat_minutes), partition_counters rows of partitions with no staged job and none staged within retention (at most 1,000,000 a call; row partition_counters), expired and dropped jobs older than retention (rows expired_jobs, dropped_jobs), kept deadlines older than retention (row deadlines), partition pauses that ended or whose gate is gone (row partition_pauses, only when policies is NULL), and the would-refusals of shadow policies (row shadow_refusals) of gates no longer in their policy and those last recorded before the retention whose throttle bucket has no deficit left; only of the given policies when policies is not NULL (the fold is always of every policy). Rows in use are skipped, never waited for. Dead jobs and their failures are kept. Returns counts.';

-- ---------------------------------------------------------------------------
-- Privileges (0021).

REVOKE ALL ON ALL TABLES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch_policy FROM PUBLIC;
