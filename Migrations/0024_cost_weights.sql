-- Cost-weighted throttles and weighted fairness (issue 12).
--
--   throttle gate field cost      a value (a number, or {"context", "default"}):
--                                 the tokens one job takes from its bucket
--                                 instead of one; limits() throttle.cost,
--                                 (0, 1000000], default 1. A cost above the
--                                 burst is refused when the policy is
--                                 declared (constants, or the defaults of
--                                 context values) and when a job is staged
--                                 (its own values; 22023, nothing stored,
--                                 stage_many all or nothing).
--   policy field round_robin_weight
--                                 a value: a round-robin key's share. Its
--                                 lane fetches round_robin_quantum x weight
--                                 rows and gives weight rows per round of the
--                                 batch; fair_interleave gives its partition
--                                 weight rows per round (the runner). The
--                                 weight is read from the lane's first
--                                 eligible job (one index probe per lane).
--                                 limits() round_robin_weight, integers
--                                 [1, 1000], default 1.
--   round_robin_cursors.served    what the first lane of the next rotation
--                                 already had of its weighted round, so a
--                                 tick that admits fewer jobs than a round
--                                 holds still shares by weight over ticks.
--
-- The runner charges the cost (tick_finish's take_tokens); explain shows it.

-- ---------------------------------------------------------------------------
-- Bounds (limits() is the one place).

-- limits(): 0007's rows, those of 0022 (defer) and 0023 (staging rules),
-- and throttle.cost and round_robin_weight appended (FieldLimits in Swift
-- appends the same rows). 0007 defines it first: the DDL of 0008 and 0012
-- needs its bounds.
CREATE OR REPLACE FUNCTION dispatch_policy.limits()
RETURNS TABLE (field text, minimum numeric, minimum_exclusive boolean, maximum numeric, maximum_exclusive boolean,
               integral boolean, default_value numeric, unit text, description text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  VALUES
    ('batch_size', 1::numeric, false, 100000::numeric, false, true, 500::numeric, 'rows',
     'Most jobs one tick fetches for the policy.'),
    ('round_robin_quantum', 1, false, 100000, false, true, 50, 'rows',
     'Most jobs one tick fetches per round-robin key before topping up.'),
    ('lease_seconds', 1, false, 31536000, false, true, 900, 'seconds',
     'How long an admitted job may run without a heartbeat before it is reaped.'),
    ('max_attempts', 1, false, 1000, false, true, 25, 'attempts',
     'Attempts before a failing job is kept as dead.'),
    ('throttle.rate', 0, false, 1000000, false, false, NULL, 'tokens',
     'Tokens added per window (per); 0 admits nothing.'),
    ('throttle.per', 0.001, false, 31536000, false, false, NULL, 'seconds',
     'The refill window of rate.'),
    ('throttle.burst', 1, false, 1000000, false, false, NULL, 'tokens',
     'Bucket capacity; default: the rate, at least 1.'),
    ('concurrency.max', 0, false, 1000000, false, true, NULL, 'jobs',
     'Jobs in flight per partition; 0 admits nothing.'),
    ('global_cap.max', 0, false, 1000000, false, true, NULL, 'jobs',
     'Jobs in flight in the whole policy; 0 admits nothing.'),
    ('adaptive_concurrency.initial_max', 1, false, 1000000, false, true, 3, 'jobs',
     'Starting cap of a partition, and its floor while nothing is in flight (clamped into [min, max]).'),
    ('adaptive_concurrency.min', 1, false, 1000000, false, true, 1, 'jobs',
     'The cap never shrinks below this.'),
    ('adaptive_concurrency.max', 1, false, 1000000, false, true, NULL, 'jobs',
     'The cap never grows above this (default: no ceiling but the bound).'),
    ('adaptive_concurrency.target_lag_ms', 1, false, 86400000, false, false, NULL, 'ms',
     'Queue lag above which the cap shrinks.'),
    ('adaptive_concurrency.ewma_alpha', 0, true, 1, false, false, 0.5, '',
     'Weight of one window of observations in the lag average.'),
    ('adaptive_concurrency.failure_decrease_factor', 0, true, 1, true, false, 0.5, '',
     'The cap is multiplied by this after a failure (at most once per window).'),
    ('adaptive_concurrency.overload_decrease_factor', 0, true, 1, true, false, 0.95, '',
     'The cap is multiplied by this while the lag is above target (at most once per window).'),
    ('job.priority', -2147483648, false, 2147483647, false, true, 0, '',
     'Lower is admitted first.'),
    ('job.queue', 1, false, 128, false, true, NULL, 'bytes',
     'Queue name (default ''default'').'),
    ('job.dedupe_key', 1, false, 512, false, true, NULL, 'bytes',
     'Dedupe key given to stage.'),
    ('job.round_robin_key', 1, false, 512, false, true, NULL, 'bytes',
     'Round-robin key given to stage.'),
    ('job.context', 0, false, 65536, false, true, NULL, 'bytes',
     'Size of the context object (as stored).'),
    ('partition_key', 0, false, 256, false, true, NULL, 'bytes',
     'Rendered partition and round-robin keys longer than this are stored as their first 64 characters, "...", and 32 hex digits of their SHA-256.'),
    ('claim.max', 1, false, 10000, false, true, 1, 'jobs',
     'Most jobs one claim() returns.'),
    ('claim.worker', 0, false, 256, false, true, NULL, 'bytes',
     'Worker name recorded on claimed jobs.'),
    ('complete_many.jobs', 0, false, 10000, false, true, NULL, 'jobs',
     'Most jobs one complete_many() finishes.'),
    ('fail.retry_in', 0, false, 31536000, false, false, NULL, 'seconds',
     'Delay before a failed job is retried (default 2^attempt s, at most 3600).'),
    ('fail.error', 0, false, 8192, false, true, NULL, 'characters',
     'Error text kept per failed attempt; longer text is cut to this length.'),
    ('prune.retention', 0, false, 3153600000, false, false, 604800, 'seconds',
     'History older than this is deleted by prune().'),
    ('prune.idle', 0, false, 3153600000, false, false, 3600, 'seconds',
     'Idle gate rows untouched this long are deleted by prune().'),
    ('defer.until', 0, true, 2592000, false, false, NULL, 'seconds',
     'How far after now defer() may hold a job back (and pause its throttle partitions): at most 30 days.'),
    ('defer.reason', 1, false, 1024, false, true, NULL, 'characters',
     'Why a job was deferred (defer()); longer text is refused.'),
    ('debounce', 0, false, 86400, false, false, 0, 'seconds',
     'dedupe_mode replace: a replaced staged job is not admitted before this long after the replace (its not_before is pushed out, never pulled in).'),
    ('max_pending_per_partition', 1, false, 10000000, false, true, NULL, 'jobs',
     'Most staged jobs (pending and scheduled) per lane key of a policy (its keyless jobs count as one partition); on_overflow says what staging one more does.'),
    ('max_wait', 0, true, 31536000, false, false, NULL, 'seconds',
     'A job staged without expires_at expires this long after it was staged (with expires_at: the earlier of the two); an expired job is finished as expired, never admitted.'),
    ('throttle.cost', 0, true, 1000000, false, false, 1, 'tokens',
     'Tokens one job takes from a throttle''s bucket (a value: a number or {"context", "default"}); at most its burst.'),
    ('round_robin_weight', 1, false, 1000, false, true, 1, '',
     'A round-robin key''s share (a value): its lane gets round_robin_quantum x weight rows per fetch and weight rows per round, as its partition does in fair_interleave.')
$$;
COMMENT ON FUNCTION dispatch_policy.limits() IS
  'Every bound of a config field, job field, worker call argument and key length, in one place: validation and error texts are derived from it. unit ''bytes'' bounds a string''s UTF-8 length.';

-- ---------------------------------------------------------------------------
-- Validation.

-- A throttle's cost: a value within throttle.cost, and not above the
-- burst. Compared are the numbers the config gives (a constant, or the
-- default of a context value); without burst, the bucket holds the rate (at
-- least 1). A job whose own context makes its cost exceed its bucket is
-- refused when it is staged (_job_cost_problem).
CREATE FUNCTION dispatch_policy._require_throttle_cost(gate jsonb, path text)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
DECLARE
  cost numeric := dispatch_policy._require_gate_value(gate -> 'cost', path || '.cost', 'throttle.cost', true);
  burst numeric;
BEGIN
  IF gate ? 'burst' THEN
    burst := dispatch_policy._json_number(CASE WHEN jsonb_typeof(gate -> 'burst') = 'object' THEN gate -> 'burst' -> 'default'
                                               ELSE gate -> 'burst' END);
  ELSE
    burst := least(greatest(dispatch_policy._json_number(CASE WHEN jsonb_typeof(gate -> 'rate') = 'object'
                                                              THEN gate -> 'rate' -> 'default' ELSE gate -> 'rate' END), 1),
                   dispatch_policy._limit_max('throttle.burst'));
  END IF;
  IF cost > burst THEN
    PERFORM dispatch_policy._config_error(path || '.cost',
      format('must be at most the burst (%s%s): a job that costs more tokens than its bucket holds could never be admitted',
             burst, CASE WHEN gate ? 'burst' THEN '' ELSE ', the rate, as no burst is given' END),
      gate -> 'cost');
  END IF;
  RETURN cost;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_throttle_cost(jsonb, text) IS
  'Internal: validates a throttle gate''s cost (a value within limits() throttle.cost) and that it (or its default) is at most the gate''s burst (or its default; without burst the rate, at least 1); raises the config error (22023) naming path.cost; returns the cost.';

-- Validates round_robin_weight (a value within limits() round_robin_weight) and
-- each throttle's cost (_require_throttle_cost); validate_policy calls it
-- once its gates are checked.
CREATE FUNCTION dispatch_policy._validate_cost_weights(config jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
DECLARE
  gate jsonb;
  i bigint;
BEGIN
  IF config ? 'round_robin_weight' THEN
    PERFORM dispatch_policy._require_gate_value(config -> 'round_robin_weight', 'round_robin_weight', 'round_robin_weight', true);
  END IF;
  IF jsonb_typeof(config -> 'gates') = 'array' THEN
    FOR gate, i IN SELECT x.g, x.n - 1 FROM jsonb_array_elements(config -> 'gates') WITH ORDINALITY AS x(g, n) LOOP
      IF gate ->> 'type' = 'throttle' AND gate ? 'cost' THEN
        PERFORM dispatch_policy._require_throttle_cost(gate, format('gates[%s]', i));
      END IF;
    END LOOP;
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._validate_cost_weights(jsonb) IS
  'Internal: validates a config''s round_robin_weight (a value, limits() round_robin_weight) and the cost of each throttle gate (limits() throttle.cost, at most the burst); 22023 naming the field.';

-- validate_policy knows round_robin_weight and a throttle's cost, checked by
-- _validate_cost_weights (its one definition in 0.2.0 is in 0025_shadow.sql).

-- ---------------------------------------------------------------------------
-- Staging refuses a job whose cost exceeds its bucket's burst: it could
-- never be admitted (the bucket never holds more than burst tokens).

-- The throttle gates of a config that have a cost, with what staging needs
-- to check a job against them; NULL when none has (staging then checks
-- nothing). Computed once per config write (policies.cost_gates).
CREATE FUNCTION dispatch_policy._cost_gates(config jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT jsonb_agg(jsonb_build_object('index', x.n - 1, 'name', coalesce(x.g ->> 'name', 'throttle'),
                                      'cost', x.g -> 'cost', 'burst', x.g -> 'burst', 'rate', x.g -> 'rate')
                   ORDER BY x.n)
  FROM jsonb_array_elements(CASE WHEN jsonb_typeof(config -> 'gates') = 'array' THEN config -> 'gates' ELSE '[]'::jsonb END)
       WITH ORDINALITY AS x(g, n)
  WHERE x.g ->> 'type' = 'throttle' AND x.g ? 'cost'
$$;
COMMENT ON FUNCTION dispatch_policy._cost_gates(jsonb) IS
  'Internal: the throttle gates of a config that have a cost, as [{"index", "name", "cost", "burst", "rate"}] in gate order; NULL when none has one.';

ALTER TABLE dispatch_policy.policies
  ADD COLUMN cost_gates jsonb GENERATED ALWAYS AS (dispatch_policy._cost_gates(config)) STORED;
COMMENT ON COLUMN dispatch_policy.policies.cost_gates IS
  'The throttle gates with a cost (see _cost_gates), read by staging to refuse a job whose cost exceeds its burst; NULL: none.';

-- What staging reads of a config: a redeclare that changes it must not
-- overlap a stager (declare_policy, 0023). Defined once in 0.2.0, here,
-- with the cost gates (staging refuses a job above its burst).
CREATE FUNCTION dispatch_policy._staging_config(config jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT jsonb_build_object('lane_template', dispatch_policy._lane_template(config),
                            'partition_gates', dispatch_policy._partition_gates(config),
                            'partition_templates', dispatch_policy._partition_templates(config),
                            'cost_gates', dispatch_policy._cost_gates(config))
         || jsonb_strip_nulls(jsonb_build_object('dedupe_mode', config -> 'dedupe_mode', 'debounce', config -> 'debounce',
                                                 'max_pending_per_partition', config -> 'max_pending_per_partition',
                                                 'on_overflow', config -> 'on_overflow', 'max_wait', config -> 'max_wait'))
$$;
COMMENT ON FUNCTION dispatch_policy._staging_config(jsonb) IS
  'Internal: the parts of a config that staging reads (lane template, partitioned gates and their templates, the cost gates, the staging rules), as one value to compare: a redeclare that changes it holds the policy''s stagers off (declare_policy).';

-- The first cost gate a job's context makes cost more than its bucket's
-- burst, as the runner resolves both (_gate_number; without burst: the rate,
-- at least 1): {"gate", "path", "cost", "burst"}; NULL when it fits them all.
CREATE FUNCTION dispatch_policy._job_cost_problem(cost_gates jsonb, context jsonb)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT jsonb_build_object('gate', c.g ->> 'name', 'path', format('gates[%s].cost', c.g ->> 'index'),
                            'cost', c.cost, 'burst', c.burst)
  FROM (SELECT x.g, x.n,
               dispatch_policy._gate_number(x.g -> 'cost', context, 'throttle.cost') AS cost,
               CASE WHEN x.g -> 'burst' IS NOT NULL AND jsonb_typeof(x.g -> 'burst') <> 'null'
                    THEN dispatch_policy._gate_number(x.g -> 'burst', context, 'throttle.burst')
                    ELSE least(greatest(dispatch_policy._gate_number(x.g -> 'rate', context, 'throttle.rate'), 1),
                               dispatch_policy._limit_max('throttle.burst'))
               END AS burst
        FROM jsonb_array_elements(cost_gates) WITH ORDINALITY AS x(g, n)) c
  WHERE c.cost > c.burst
  ORDER BY c.n
  LIMIT 1
$$;
COMMENT ON FUNCTION dispatch_policy._job_cost_problem(jsonb, jsonb) IS
  'Internal: for a job context (as stored, with queue_name and priority), the first throttle of cost_gates (policies.cost_gates) whose cost for the job exceeds its burst for the job, as {"gate", "path", "cost", "burst"}; NULL when none does.';

-- Raises the staging error for the first job of jobs (contexts as stored;
-- NULL for an element the staging paths refuse on their own) whose cost
-- exceeds a burst. field_prefix names the job as _stage does
-- ('jobs[%s].' for stage_many, '' for stage).
CREATE FUNCTION dispatch_policy._require_job_costs(cost_gates jsonb, contexts jsonb[], field_prefix text)
RETURNS void
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
DECLARE
  bad record;
  job text;
BEGIN
  IF cost_gates IS NULL THEN
    RETURN;
  END IF;
  SELECT c.n - 1 AS idx, dispatch_policy._job_cost_problem(cost_gates, c.context) AS problem INTO bad
  FROM unnest(contexts) WITH ORDINALITY AS c(context, n)
  WHERE c.context IS NOT NULL AND dispatch_policy._job_cost_problem(cost_gates, c.context) IS NOT NULL
  ORDER BY c.n
  LIMIT 1;
  IF FOUND THEN
    job := rtrim(format(coalesce(field_prefix, ''), bad.idx), '.');
    RAISE EXCEPTION '%cost % of throttle % exceeds its burst %: the job could never be admitted',
      CASE WHEN job <> '' THEN job || ': ' ELSE '' END, bad.problem ->> 'cost', bad.problem ->> 'gate', bad.problem ->> 'burst'
      USING ERRCODE = '22023',
            DETAIL = format('%s is %s for this job and its bucket holds at most %s tokens.',
                            bad.problem ->> 'path', bad.problem ->> 'cost', bad.problem ->> 'burst'),
            HINT = 'Nothing was stored. Give the job a lower cost in its context, or declare a larger burst.';
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_job_costs(jsonb, jsonb[], text) IS
  'Internal: raises 22023 for the first job (by its context as stored) whose cost exceeds its burst for one of cost_gates (policies.cost_gates), naming the job (field_prefix formatted with its index), the gate, the cost and the burst; nothing when cost_gates is NULL.';

-- _stage_outcomes as in 0023, copied; change: the cost check first, of
-- every job that will be stored; a duplicate that may be kept is checked
-- after staging, and only if it was stored or replaced its holder after all.
CREATE OR REPLACE FUNCTION dispatch_policy._stage_outcomes(policy text, jobs jsonb, field_prefix text)
RETURNS TABLE (idx integer, id bigint, outcome text)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
DECLARE
  config jsonb;
  ids bigint[];
  cost_gates jsonb;
  holder bigint;
  kept integer[] := '{}'::integer[];
  inserted integer[] := '{}'::integer[];
  contexts jsonb[];
  later integer[] := '{}'::integer[];
  outcomes text[];
BEGIN
  -- The config read here decides the path below: it stays the policy's
  -- until commit (a redeclare or drop_policy takes this lock exclusively
  -- before it writes the policy row; found by hostile testing: read
  -- without it, a stager took the path without staging rules while a cap
  -- was being declared, staged past the cap and deadlocked).
  PERFORM pg_advisory_xact_lock_shared(dispatch_policy._partitions_lock_key(_stage_outcomes.policy));
  SELECT p.config, p.cost_gates INTO config, cost_gates FROM dispatch_policy.policies p WHERE p.name = _stage_outcomes.policy;
  -- A shadow policy admits every job, whatever its cost: nothing to refuse
  -- (found by hostile testing: trying a cost throttle in shadow mode
  -- refused production jobs at staging).
  IF config ->> 'mode' = 'shadow' THEN
    cost_gates := NULL;
  END IF;
  -- A job that costs more than its bucket holds could never be admitted
  -- (0024): refused before anything is stored, naming the job. Elements
  -- that are not objects with an object context are left to the checks of
  -- the paths below. An element whose dedupe_key is held now, or by an
  -- earlier element, is most likely kept (the held job is what runs, its
  -- context is ignored): it is checked after staging, if it was stored or
  -- replaced the holder (found by hostile testing: a kept duplicate was
  -- refused with 22023 for a cost nothing would charge).
  IF cost_gates IS NOT NULL AND jsonb_typeof(jobs) = 'array' THEN
    contexts := ARRAY(
      SELECT CASE WHEN jsonb_typeof(t.job) = 'object' AND coalesce(jsonb_typeof(t.job -> 'context'), 'null') IN ('object', 'null')
                  THEN jsonb_build_object('queue_name', coalesce(t.job ->> 'queue', 'default'),
                                          'priority', coalesce(dispatch_policy._json_number(t.job -> 'priority'), 0))
                       || coalesce(nullif(t.job -> 'context', 'null'::jsonb), '{}'::jsonb) END
      FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n) ORDER BY t.n);
    later := ARRAY(
      SELECT k.n::integer
      FROM (SELECT t.n, t.job ->> 'dedupe_key' AS key,
                   row_number() OVER (PARTITION BY t.job ->> 'dedupe_key' ORDER BY t.n) AS nth
            FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n)
            WHERE jsonb_typeof(t.job) = 'object' AND jsonb_typeof(t.job -> 'dedupe_key') = 'string') k
      WHERE k.nth > 1
         OR EXISTS (SELECT 1 FROM dispatch_policy.dedupe_keys d WHERE d.policy = _stage_outcomes.policy AND d.dedupe_key = k.key)
      ORDER BY k.n);
    PERFORM dispatch_policy._require_job_costs(cost_gates,
      ARRAY(SELECT CASE WHEN c.n::integer = ANY (later) THEN NULL ELSE c.context END
            FROM unnest(contexts) WITH ORDINALITY AS c(context, n) ORDER BY c.n),
      field_prefix);
  END IF;
  IF dispatch_policy._staging_rules_apply(config)
     OR (jsonb_typeof(jobs) = 'array'
         AND EXISTS (SELECT 1 FROM jsonb_array_elements(jobs) AS t(job)
                     WHERE CASE WHEN jsonb_typeof(t.job) = 'object'
                                THEN t.job - ARRAY['args', 'context', 'dedupe_key', 'round_robin_key', 'queue', 'priority',
                                                   'not_before'] <> '{}'::jsonb
                                ELSE false END)) THEN
    SELECT array_agg(r.id ORDER BY r.idx), array_agg(r.outcome ORDER BY r.idx) INTO ids, outcomes
    FROM dispatch_policy._stage_rules(_stage_outcomes.policy, jobs, field_prefix) r;
  ELSE
    ids := dispatch_policy._stage(_stage_outcomes.policy, jobs, field_prefix);
    FOR i IN 1 .. coalesce(cardinality(ids), 0) LOOP
      IF ids[i] IS NULL THEN
        holder := (SELECT d.job_id FROM dispatch_policy.dedupe_keys d
                   WHERE d.policy = _stage_outcomes.policy AND d.dedupe_key = jobs -> (i - 1) ->> 'dedupe_key');
        IF holder IS NULL THEN
          -- Its key was freed since (the job holding it finished): staged now.
          ids[i] := (dispatch_policy._stage(_stage_outcomes.policy, jsonb_build_array(jobs -> (i - 1)), field_prefix))[1];
          IF ids[i] IS NOT NULL THEN
            inserted := inserted || i;
          ELSE
            ids[i] := (SELECT d.job_id FROM dispatch_policy.dedupe_keys d
                       WHERE d.policy = _stage_outcomes.policy AND d.dedupe_key = jobs -> (i - 1) ->> 'dedupe_key');
          END IF;
        ELSE
          ids[i] := holder;
        END IF;
        kept := kept || i;
      END IF;
    END LOOP;
    outcomes := ARRAY(SELECT CASE WHEN t.n::integer = ANY (kept) AND NOT t.n::integer = ANY (inserted) THEN 'kept' ELSE 'inserted' END
                      FROM unnest(ids) WITH ORDINALITY AS t(id, n) ORDER BY t.n);
  END IF;
  -- The duplicates left out above that were stored after all, or replaced
  -- their holder: their cost is what runs (the call is undone if too high).
  IF cardinality(later) > 0 THEN
    PERFORM dispatch_policy._require_job_costs(cost_gates,
      ARRAY(SELECT CASE WHEN c.n::integer = ANY (later) AND outcomes[c.n::integer] IN ('inserted', 'replaced') THEN c.context END
            FROM unnest(contexts) WITH ORDINALITY AS c(context, n) ORDER BY c.n),
      field_prefix);
  END IF;
  RETURN QUERY
    SELECT t.n::integer, t.id, outcomes[t.n::integer]
    FROM unnest(ids) WITH ORDINALITY AS t(id, n)
    ORDER BY t.n;
END
$$;
COMMENT ON FUNCTION dispatch_policy._stage_outcomes(text, jsonb, text) IS
  'Internal: refuses (22023) the first job whose cost exceeds its burst for a throttle with a cost (0024; a duplicate that is kept is not checked: its context is ignored), then stages a JSON array of job specs and returns (idx, id, outcome) per element: through _stage_rules when the policy declares a staging rule or a job has expires_at (or a field _stage does not know, so the error lists expires_at), else through _stage (one statement), where a job not stored is kept and its id is the job that holds its key.';

-- stage_outcome as in 0023, copied; change: the cost check (0024).
CREATE OR REPLACE FUNCTION dispatch_policy.stage_outcome(
  policy          text,
  args            jsonb,
  context         jsonb DEFAULT '{}',
  dedupe_key      text DEFAULT NULL,
  round_robin_key text DEFAULT NULL,
  queue           text DEFAULT NULL,
  priority        integer DEFAULT NULL,
  not_before      timestamptz DEFAULT NULL,
  expires_at      timestamptz DEFAULT NULL,
  OUT id          bigint,
  OUT outcome     text
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, dispatch_policy, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
  template text;
  config jsonb;
  part_gates text[];
  part_templates text[];
  part_prefixes text[];
  part_keys text[];
  part_suffixes text[];
  job_context jsonb;
  job_partitions jsonb;
  job_id bigint;
  lane text;
  due timestamptz;
  r record;
  cost_gates jsonb;
BEGIN
  -- As _stage: the templates read next stay the policy's until commit.
  PERFORM pg_advisory_xact_lock_shared(dispatch_policy._partitions_lock_key(stage_outcome.policy));
  SELECT p.lane_template, p.config, p.partition_gates, p.partition_templates, p.partition_prefixes, p.partition_keys,
         p.partition_suffixes, p.cost_gates
  INTO template, config, part_gates, part_templates, part_prefixes, part_keys, part_suffixes, cost_gates
  FROM dispatch_policy.policies p WHERE p.name = stage_outcome.policy;
  -- A shadow policy admits every job, whatever its cost (see _stage_outcomes).
  IF config ->> 'mode' = 'shadow' THEN
    cost_gates := NULL;
  END IF;
  IF NOT FOUND
     OR stage_outcome.expires_at IS NOT NULL
     OR dispatch_policy._staging_rules_apply(config)
     OR stage_outcome.args IS NULL OR jsonb_typeof(stage_outcome.args) = 'null'
     OR jsonb_typeof(stage_outcome.context) NOT IN ('object', 'null')
     OR pg_column_size(stage_outcome.context) > dispatch_policy._limit_max('job.context') - 8
     OR pg_column_compression(stage_outcome.context) IS NOT NULL
     OR octet_length(stage_outcome.dedupe_key) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.dedupe_key')
     OR octet_length(stage_outcome.round_robin_key) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.round_robin_key')
     OR octet_length(stage_outcome.queue) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.queue')
     OR NOT isfinite(stage_outcome.not_before)
  THEN
    -- The general path, which raises the errors naming the field. An
    -- infinite expires_at is passed as text, which the check refuses.
    SELECT o.id, o.outcome INTO r
    FROM dispatch_policy._stage_outcomes(
      stage_outcome.policy,
      jsonb_build_array(jsonb_build_object(
        'args', stage_outcome.args,
        'context', stage_outcome.context,
        'dedupe_key', stage_outcome.dedupe_key,
        'round_robin_key', stage_outcome.round_robin_key,
        'queue', stage_outcome.queue,
        'priority', stage_outcome.priority,
        'not_before', stage_outcome.not_before
      ) || CASE WHEN stage_outcome.expires_at IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('expires_at', stage_outcome.expires_at) END),
      '') o;
    id := r.id;
    outcome := r.outcome;
    RETURN;
  END IF;

  job_context := jsonb_build_object('queue_name', coalesce(stage_outcome.queue, 'default'),
                                    'priority', coalesce(stage_outcome.priority, 0))
                 || coalesce(nullif(stage_outcome.context, 'null'::jsonb), '{}'::jsonb);
  job_partitions := dispatch_policy._render_partitions(part_gates, part_templates, part_prefixes, part_keys, part_suffixes,
                                                       job_context);
  job_id := nextval('dispatch_policy.job_ids');
  IF stage_outcome.dedupe_key IS NOT NULL THEN
    -- Only with a key: the primary key makes concurrent stages of the same
    -- key store one job. A key freed between the insert and the lookup (its
    -- job finished) is taken on the next turn.
    LOOP
      INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
      VALUES (stage_outcome.policy, stage_outcome.dedupe_key, job_id)
      ON CONFLICT ON CONSTRAINT dedupe_keys_pkey DO NOTHING;
      EXIT WHEN FOUND;
      SELECT d.job_id INTO id FROM dispatch_policy.dedupe_keys d
      WHERE d.policy = stage_outcome.policy AND d.dedupe_key = stage_outcome.dedupe_key;
      IF id IS NOT NULL THEN
        outcome := 'kept';
        RETURN;
      END IF;
    END LOOP;
  END IF;
  -- A job that costs more than its bucket holds could never be admitted
  -- (0024); a kept duplicate (above) is not checked: its context is ignored.
  IF cost_gates IS NOT NULL THEN
    PERFORM dispatch_policy._require_job_costs(cost_gates, ARRAY[job_context], '');
  END IF;
  INSERT INTO dispatch_policy.staged_jobs
    (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, partitions)
  VALUES (job_id, stage_outcome.policy, coalesce(stage_outcome.queue, 'default'), coalesce(stage_outcome.priority, 0),
          stage_outcome.args, job_context, stage_outcome.dedupe_key,
          dispatch_policy._round_robin_key(template, job_context, stage_outcome.round_robin_key),
          CASE WHEN stage_outcome.not_before > now() THEN stage_outcome.not_before END, job_partitions)
  RETURNING staged_jobs.round_robin_key, staged_jobs.not_before INTO lane, due;
  IF due IS NULL THEN
    PERFORM dispatch_policy._add_lanes(stage_outcome.policy, ARRAY[lane]);
  END IF;
  PERFORM pg_notify('dispatch_policy_staged', stage_outcome.policy);
  id := job_id;
  outcome := 'inserted';
END
$$;
COMMENT ON FUNCTION dispatch_policy.stage_outcome(text, jsonb, jsonb, text, text, text, integer, timestamptz, timestamptz) IS
  'Stages one job as stage() does and says what happened: outcome inserted (a new job, id), kept (a job of the same policy with the same dedupe_key is admitted, or staged under dedupe_mode keep: nothing changed, id is that job), replaced (dedupe_mode replace and that job is still staged: its args, context, queue, priority, round-robin key, partitions and expires_at are now this call''s, its not_before is pushed to now + debounce if later; id is that job) or dropped (under on_overflow drop_oldest: the job itself, finished as dropped right away, when its partition is full and every older job of it is held by another transaction, such as a tick admitting it; in stage_many_outcomes also a job dropped by a later element of the same call). expires_at: the job''s deadline (must be later than now; the policy''s max_wait gives created_at (first staged) + max_wait, the earlier of the two applies); a job not admitted by then is finished as expired. With max_pending_per_partition, a new job in a partition (lane key) at the cap is refused with DP002 (on_overflow reject) or the partition''s oldest staged jobs (lowest id) are finished as dropped (drop_oldest). Errors, nothing changed: unknown policy 42704, NULL args 22004, a cost above its burst for a throttle with a cost (0024; not for a kept duplicate, whose context is ignored) 22023, a field out of its limits() bounds or otherwise invalid (an expires_at not later than now) 22023 naming the field, a full partition DP002.';

-- ---------------------------------------------------------------------------
-- Weighted fairness.

ALTER TABLE dispatch_policy.round_robin_cursors
  ADD COLUMN served integer NOT NULL DEFAULT 0,
  ADD COLUMN served_lane text,
  ADD CONSTRAINT round_robin_cursors_served_check CHECK (served >= 0 AND served < 1000);
COMMENT ON COLUMN dispatch_policy.round_robin_cursors.served IS
  'With round_robin_weight: how many jobs served_lane already had of its current weighted round when the last tick ran out of room; the next fetch, if it starts with that lane, gives it only the rest of the round first. 0: none.';
COMMENT ON COLUMN dispatch_policy.round_robin_cursors.served_lane IS
  'The lane served counts for (NULL: the lane of jobs without a key, or none when served is 0).';

-- A lane's weight: round_robin_weight (a value) for the lane's first
-- eligible job, in fetch order; 1 without round_robin_weight. A constant
-- weight reads no job; a weight from the context reads one row by the
-- lane's index (O(1) per lane, whatever its backlog).
CREATE FUNCTION dispatch_policy._lane_weight(policy text, lane text, weight_value jsonb)
RETURNS integer
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
DECLARE
  first_context jsonb;
BEGIN
  IF weight_value IS NULL OR jsonb_typeof(weight_value) = 'null' THEN
    RETURN 1;
  END IF;
  IF jsonb_typeof(weight_value) = 'object' THEN
    IF _lane_weight.lane IS NULL THEN
      SELECT s.context INTO first_context FROM dispatch_policy.staged_jobs s
      WHERE s.policy = _lane_weight.policy AND s.not_before IS NULL AND s.round_robin_key IS NULL
      ORDER BY s.priority, s.id LIMIT 1;
    ELSE
      SELECT s.context INTO first_context FROM dispatch_policy.staged_jobs s
      WHERE s.policy = _lane_weight.policy AND s.not_before IS NULL
        AND s.round_robin_key >= _lane_weight.lane AND s.round_robin_key <= _lane_weight.lane
      ORDER BY s.round_robin_key, s.priority, s.id LIMIT 1;
    END IF;
  END IF;
  RETURN greatest(1, least(1000, floor(coalesce(
    dispatch_policy._gate_number(weight_value, coalesce(first_context, '{}'::jsonb), 'round_robin_weight'), 1))))::integer;
END
$$;
COMMENT ON FUNCTION dispatch_policy._lane_weight(text, text, jsonb) IS
  'Internal: the round_robin_weight (weight_value, from the policy config) of a policy''s lane, read from the context of the lane''s first eligible job when it is {"context", "default"}; 1 without a weight; within limits() round_robin_weight.';

-- fetch_batch, defined once in 0.2.0: each job's lane in the result (0008,
-- so 0.1.0's, of another result type, is dropped), the lanes of
-- dispatch_policy.lanes (0012), expiry first (0023), and round_robin_weight:
-- a lane of weight w fetches quantum x w rows and gives w rows per round of
-- the batch; the cursor's served (what the first lane already had of its
-- round) is taken off its first round.
DROP FUNCTION dispatch_policy.fetch_batch(text, integer, integer, timestamptz);
CREATE FUNCTION dispatch_policy.fetch_batch(
  policy text, batch_size integer, round_robin_quantum integer DEFAULT NULL, now timestamptz DEFAULT now()
)
RETURNS TABLE (id bigint, priority integer, round_robin_key text, context jsonb, lane integer)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
-- Each lane asks for rows ordered by (round_robin_key, priority, id), which
-- only staged_jobs_round_robin_idx gives without sorting; with sorts priced
-- out, it is the plan whatever the statistics say (right after a large
-- stage_many they may believe the policy holds a row or two).
SET enable_sort = off
-- Pricing sorts out inflates the plan's cost past jit_above_cost: no JIT for
-- a few hundred rows (it costs half a second).
SET jit = off
AS $$
DECLARE
  keys text[];
  chunk text[];
  cursor_key text;
  quantum integer;
  taken integer := 0;
  pos integer := 0;
  width integer;
  got_ids bigint[] := '{}'::bigint[];
  got_lanes integer[] := '{}'::integer[];
  got_ranks integer[] := '{}'::integer[];
  full_lanes integer[] := '{}'::integer[];
  empty_lanes text[] := '{}'::text[];
  keyless_empty boolean := false;
  more bigint[];
  lane_of integer;
  weight_value jsonb;
  weights integer[] := '{}'::integer[];
  served integer := 0;
  served_lane text;
  first_offset integer := 0;
BEGIN
  PERFORM dispatch_policy._require_now(fetch_batch.now);
  -- Deadlines (0023): jobs whose expires_at has passed are finished as
  -- expired first, so the fetch below never returns one.
  PERFORM dispatch_policy._expire_staged(fetch_batch.policy, fetch_batch.now);
  IF batch_size IS NULL OR NOT dispatch_policy._within_limit(batch_size, 'batch_size') THEN
    RAISE EXCEPTION 'batch_size %', dispatch_policy._limit_rule('batch_size')
      USING ERRCODE = '22023', DETAIL = format('batch_size is %s.', coalesce(batch_size::text, 'NULL'));
  END IF;
  IF round_robin_quantum IS NOT NULL AND NOT dispatch_policy._within_limit(round_robin_quantum, 'round_robin_quantum') THEN
    RAISE EXCEPTION 'round_robin_quantum %', dispatch_policy._limit_rule('round_robin_quantum')
      USING ERRCODE = '22023', DETAIL = format('round_robin_quantum is %s.', round_robin_quantum);
  END IF;
  IF round_robin_quantum IS NULL THEN
    RETURN QUERY
      SELECT s.id, s.priority, s.round_robin_key, s.context, 0
      FROM (SELECT j.id, j.priority, j.round_robin_key, j.context FROM dispatch_policy.staged_jobs j
            WHERE j.policy = fetch_batch.policy AND j.not_before IS NULL
            ORDER BY j.priority, j.id
            LIMIT batch_size
            FOR UPDATE SKIP LOCKED) s
      ORDER BY s.priority, s.id;
    RETURN;
  END IF;

  -- Lanes whose block has run out are ready again.
  UPDATE dispatch_policy.lanes l SET blocked_until = NULL, blocked_gate = NULL, blocked_partition = NULL,
                                     updated_at = fetch_batch.now
  WHERE l.policy = fetch_batch.policy AND l.blocked_until <= fetch_batch.now;

  SELECT c.last_key, c.served, c.served_lane INTO cursor_key, served, served_lane
  FROM dispatch_policy.round_robin_cursors c WHERE c.policy = fetch_batch.policy;
  SELECT p.config -> 'round_robin_weight' INTO weight_value FROM dispatch_policy.policies p WHERE p.name = fetch_batch.policy;
  -- Never more than batch_size rows: a quantum above the batch size is the batch size.
  quantum := least(round_robin_quantum, batch_size);
  -- A lane with jobs gives at least one: batch_size lanes are always enough.
  keys := dispatch_policy._ready_lanes(fetch_batch.policy, cursor_key, batch_size);
  -- The first lane may have had part of its weighted round in the last tick
  -- (the cursor's served): it gets the rest of that round first.
  IF coalesce(served, 0) > 0 AND cardinality(keys) > 0 AND keys[1] IS NOT DISTINCT FROM served_lane THEN
    first_offset := served;
  END IF;

  -- Up to `quantum` rows from each lane, as many lanes at a time as could
  -- fill the rest of the batch, until it is full or the lanes run out.
  WHILE pos < cardinality(keys) AND taken < batch_size LOOP
    width := least(ceil((batch_size - taken)::numeric / quantum)::integer, cardinality(keys) - pos);
    chunk := keys[pos + 1 : pos + width];
    -- Each lane's weight (round_robin_weight), from its first eligible job:
    -- it gives quantum x weight rows.
    weights := weights || ARRAY(SELECT dispatch_policy._lane_weight(fetch_batch.policy, k.key, weight_value)
                                FROM unnest(chunk) WITH ORDINALITY AS k(key, n) ORDER BY k.n);
    WITH fetched AS MATERIALIZED (
      SELECT k.n::integer AS lane, j.id, row_number() OVER (PARTITION BY k.n ORDER BY j.priority, j.id)::integer AS rank
      FROM unnest(chunk) WITH ORDINALITY AS k(key, n)
      CROSS JOIN LATERAL (
        -- The key as a range, not =: with =, the key is a constant and the
        -- (priority, id) order of staged_jobs_ready_idx would do unsorted.
        SELECT s.id, s.priority FROM dispatch_policy.staged_jobs s
        WHERE s.policy = fetch_batch.policy AND s.not_before IS NULL
          AND s.round_robin_key >= k.key AND s.round_robin_key <= k.key
        ORDER BY s.round_robin_key, s.priority, s.id
        LIMIT least(quantum * weights[pos + k.n], batch_size)
        FOR UPDATE SKIP LOCKED) j
      WHERE k.key IS NOT NULL
      UNION ALL
      SELECT array_position(chunk, NULL), s.id, (row_number() OVER (ORDER BY s.priority, s.id))::integer
      FROM (SELECT s.id, s.priority FROM dispatch_policy.staged_jobs s
            WHERE array_position(chunk, NULL) IS NOT NULL
              AND s.policy = fetch_batch.policy AND s.not_before IS NULL AND s.round_robin_key IS NULL
            ORDER BY s.priority, s.id
            LIMIT least(quantum * weights[pos + array_position(chunk, NULL)], batch_size)
            FOR UPDATE SKIP LOCKED) s
    )
    SELECT got_ids || coalesce(array_agg(r.id ORDER BY r.lane, r.rank), '{}'),
           got_lanes || coalesce(array_agg(pos + r.lane ORDER BY r.lane, r.rank), '{}'),
           got_ranks || coalesce(array_agg(r.rank ORDER BY r.lane, r.rank), '{}'),
           full_lanes || coalesce(array_agg(pos + r.lane) FILTER (WHERE r.rank = least(quantum * weights[pos + r.lane], batch_size)),
                                  '{}'),
           empty_lanes || coalesce(ARRAY(SELECT k.key FROM unnest(chunk) WITH ORDINALITY AS k(key, n)
                                         WHERE k.key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM fetched x WHERE x.lane = k.n)), '{}'),
           keyless_empty OR coalesce(array_position(chunk, NULL) IS NOT NULL
                                     AND NOT EXISTS (SELECT 1 FROM fetched x WHERE x.lane = array_position(chunk, NULL)), false)
    INTO got_ids, got_lanes, got_ranks, full_lanes, empty_lanes, keyless_empty
    FROM fetched r;
    taken := cardinality(got_ids);
    pos := pos + width;
  END LOOP;

  -- The batch is not full and lanes that gave a whole quantum may have more:
  -- their oldest further rows, interleaved after the first rounds.
  IF taken < batch_size AND cardinality(full_lanes) > 0 THEN
    FOREACH lane_of IN ARRAY full_lanes LOOP
      IF keys[lane_of] IS NULL THEN
        more := ARRAY(SELECT s.id FROM dispatch_policy.staged_jobs s
                      WHERE s.policy = fetch_batch.policy AND s.not_before IS NULL AND s.round_robin_key IS NULL
                        AND s.id <> ALL (got_ids)
                      ORDER BY s.priority, s.id LIMIT batch_size - taken FOR UPDATE SKIP LOCKED);
      ELSE
        more := ARRAY(SELECT s.id FROM dispatch_policy.staged_jobs s
                      WHERE s.policy = fetch_batch.policy AND s.not_before IS NULL
                        AND s.round_robin_key >= keys[lane_of] AND s.round_robin_key <= keys[lane_of]
                        AND s.id <> ALL (got_ids)
                      ORDER BY s.round_robin_key, s.priority, s.id LIMIT batch_size - taken FOR UPDATE SKIP LOCKED);
      END IF;
      FOR i IN 1 .. coalesce(cardinality(more), 0) LOOP
        got_ids := got_ids || more[i];
        got_lanes := got_lanes || lane_of;
        got_ranks := got_ranks || (least(quantum * weights[lane_of], batch_size) + i);
      END LOOP;
      taken := cardinality(got_ids);
      EXIT WHEN taken >= batch_size;
    END LOOP;
  END IF;

  IF cardinality(empty_lanes) > 0 OR keyless_empty THEN
    PERFORM dispatch_policy._drop_empty_lanes(fetch_batch.policy, empty_lanes, keyless_empty);
  END IF;

  RETURN QUERY
  SELECT s.id, s.priority, s.round_robin_key, s.context, g.lane
  FROM unnest(got_ids, got_lanes, got_ranks) AS g(id, lane, rank)
  JOIN dispatch_policy.staged_jobs s ON s.id = g.id
  WHERE s.id = ANY (got_ids)
  -- Round by round: a lane of weight w gives w rows per round.
  ORDER BY s.priority, (g.rank - 1 + CASE WHEN g.lane = 1 THEN first_offset ELSE 0 END) / weights[g.lane], g.lane, g.rank
  LIMIT batch_size;
END
$$;
COMMENT ON FUNCTION dispatch_policy.fetch_batch(text, integer, integer, timestamptz) IS
  'Finishes the policy''s jobs whose deadline passed as expired (0023), then locks (FOR UPDATE SKIP LOCKED) and returns up to batch_size eligible jobs of a policy, lower priority first, then staging order. With round_robin_quantum: from the policy''s ready lanes (dispatch_policy.lanes) in rotation order after its cursor, up to that many rows of each, as many lanes as fill the batch, then more rows of lanes that gave a whole quantum; rows interleaved (every lane''s first row, then every lane''s second, ...; with round_robin_weight, a lane of weight w gives quantum x w rows and w rows per round, its weight read from its first eligible job; the first lane gives first what is left of a round the last tick cut short, round_robin_cursors.served), lane = the lane''s place in this rotation. Blocked lanes are passed over without a look; lanes whose block ran out are unblocked first; lanes found empty are deleted. Without round_robin_quantum: the oldest rows, lane 0. The cursor is moved by admit.';

-- _admit: the round-robin cursor also keeps served and served_lane
-- (weighted lanes, round_robin_weight). (_admit is defined once in 0.2.0,
-- in 0026_admit_integrity.sql.)

-- ---------------------------------------------------------------------------
-- explain shows a throttle's cost.

-- explain: a throttle gate's row shows the job's cost (gate field cost) and
-- waits until the bucket holds it, and the estimate adds up the costs of the
-- jobs ahead in its partition (explain is defined once in 0.2.0, in
-- 0025_shadow.sql).

-- ---------------------------------------------------------------------------
-- Privileges (see 0021): the new functions are PUBLIC's until revoked
-- (stage_outcome states its SECURITY DEFINER and search_path itself).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch_policy FROM PUBLIC;
