-- dispatch-policy: limits that hold.
--
-- Every numeric field and every length has one documented bound, kept in
-- one place (dispatch_policy.limits()); validation, staging and the rule
-- texts of the errors are derived from it. Long rendered keys are stored in
-- a form that always fits an index. The token-bucket refill is one function
-- that every reader calls, over columns whose CHECK constraints make
-- overflow impossible.

-- An upgrade from 0.1.0 (this file begins version 0.2.0; "migrate" applies
-- a run's files in one transaction, as ALTER EXTENSION UPDATE applies the
-- script) takes the lock of every 0.1.0 table before it changes anything,
-- all at once and without waiting (NOWAIT, tried again every 50 ms for up
-- to 30 s): an upgrade that waited for a table while holding another could
-- deadlock with a live stager, tick or worker, and be rolled back whole.
-- Calls of the live system wait for the upgrade's commit.
DO $$
BEGIN
  FOR attempt IN 1 .. 600 LOOP
    BEGIN
      LOCK TABLE dispatch_policy.policies, dispatch_policy.dedupe_keys, dispatch_policy.staged_jobs,
                 dispatch_policy.admitted_jobs, dispatch_policy.finished_jobs, dispatch_policy.job_failures,
                 dispatch_policy.inflight_counters, dispatch_policy.throttle_buckets, dispatch_policy.adaptive_stats,
                 dispatch_policy.observations, dispatch_policy.observation_minutes, dispatch_policy.round_robin_cursors
        IN ACCESS EXCLUSIVE MODE NOWAIT;
      RETURN;
    EXCEPTION WHEN lock_not_available THEN
      PERFORM pg_sleep(0.05);
    END;
  END LOOP;
  RAISE EXCEPTION 'the upgrade to 0.2.0 could not lock the dispatch_policy tables within 30 s: they were never all free at once'
    USING ERRCODE = '55P03', HINT = 'Nothing was changed. Run the upgrade again when the system is less busy, or stop its runners and workers for the moment.';
END
$$;

-- The bounds. The Swift library has the same table (FieldLimits) and a test
-- compares the two.
CREATE FUNCTION dispatch_policy.limits()
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
     'Idle gate rows untouched this long are deleted by prune().')
$$;
COMMENT ON FUNCTION dispatch_policy.limits() IS
  'Every bound of a config field, job field, worker call argument and key length, in one place: validation and error texts are derived from it. unit ''bytes'' bounds a string''s UTF-8 length.';

CREATE FUNCTION dispatch_policy._limit(field text)
RETURNS record
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT l.* FROM dispatch_policy.limits() l WHERE l.field = _limit.field
$$;
COMMENT ON FUNCTION dispatch_policy._limit(text) IS 'Internal: the limits() row of a field.';

-- Whether n is within the bounds of field.
CREATE FUNCTION dispatch_policy._within_limit(n numeric, field text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT n IS NOT NULL
         -- A non-zero number must survive conversion to a double (the runner's type).
         AND (n = 0 OR abs(n) >= 1e-300)
         AND (n > l.minimum OR (n = l.minimum AND NOT l.minimum_exclusive))
         AND (n < l.maximum OR (n = l.maximum AND NOT l.maximum_exclusive))
         AND (NOT l.integral OR n = trunc(n))
  FROM dispatch_policy.limits() l WHERE l.field = _within_limit.field
$$;
COMMENT ON FUNCTION dispatch_policy._within_limit(numeric, text) IS
  'Internal: whether n is within the bounds limits() gives for field (integral fields: only integers; non-zero numbers at least 1e-300 in magnitude, so a double holds them).';

-- The rule an error message states for a field, from its bounds.
CREATE FUNCTION dispatch_policy._limit_rule(field text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE
    WHEN l.unit IN ('bytes', 'characters') AND l.minimum = 0 THEN format('must be at most %s %s', trim_scale(l.maximum), l.unit)
    WHEN l.unit IN ('bytes', 'characters')
      THEN format('must be a string of %s to %s %s', trim_scale(l.minimum), trim_scale(l.maximum), l.unit)
    WHEN l.integral THEN format('must be an integer from %s to %s', trim_scale(l.minimum), trim_scale(l.maximum))
    WHEN NOT l.minimum_exclusive AND NOT l.maximum_exclusive
      THEN format('must be a number from %s to %s', trim_scale(l.minimum), trim_scale(l.maximum))
    ELSE format('must be a number in %s%s, %s%s',
                CASE WHEN l.minimum_exclusive THEN '(' ELSE '[' END, trim_scale(l.minimum),
                trim_scale(l.maximum), CASE WHEN l.maximum_exclusive THEN ')' ELSE ']' END)
  END || CASE WHEN l.unit IN ('', 'bytes', 'characters') THEN '' ELSE ' (' || l.unit || ')' END
  FROM dispatch_policy.limits() l WHERE l.field = _limit_rule.field
$$;
COMMENT ON FUNCTION dispatch_policy._limit_rule(text) IS
  'Internal: the rule text of a field''s bounds, such as "must be an integer from 1 to 100000 (rows)".';

-- The config error, with the offending value cut to 200 characters (a 10 kB
-- value or a 300-digit number would drown the message).
CREATE OR REPLACE FUNCTION dispatch_policy._config_error(field text, rule text, got jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  RAISE EXCEPTION 'invalid policy config: % %', field, rule
    USING ERRCODE = '22023',
          DETAIL = format('%s is %s.', field,
                          coalesce(CASE WHEN length(got::text) > 200 THEN left(got::text, 200) || '...' ELSE got::text END,
                                   'missing')),
          HINT = 'See "Policy configuration" in the dispatch-policy README. Nothing was stored.';
END
$$;

CREATE FUNCTION dispatch_policy._limit_min(field text)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT l.minimum FROM dispatch_policy.limits() l WHERE l.field = _limit_min.field
$$;
COMMENT ON FUNCTION dispatch_policy._limit_min(text) IS 'Internal: the minimum limits() gives for field.';

-- Raises the config error unless value is a JSON number within field's bounds.
CREATE FUNCTION dispatch_policy._require_limit(value jsonb, path text, field text)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
DECLARE
  n numeric := dispatch_policy._json_number(value);
BEGIN
  IF NOT coalesce(dispatch_policy._within_limit(n, field), false) THEN
    PERFORM dispatch_policy._config_error(path,
      dispatch_policy._limit_rule(field)
        || CASE WHEN n <> 0 AND abs(n) < 1e-300 AND dispatch_policy._limit_min(field) <= 0
                THEN ', and 0 or at least 1e-300 in magnitude' ELSE '' END,
      value);
  END IF;
  RETURN n;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_limit(jsonb, text, text) IS
  'Internal: the number in value, or the config error (22023) naming path when it is not a number within the bounds of field.';

-- A gate value: a number, or {"context": KEY, "default": NUMBER} when the
-- field may come from the job's context. The number (or the default) must be
-- within the field's bounds; a context value is checked per job by the runner
-- against the same bounds (out of bounds: the default applies).
CREATE FUNCTION dispatch_policy._require_gate_value(value jsonb, path text, field text, from_context boolean)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  IF from_context AND jsonb_typeof(value) = 'object' THEN
    PERFORM dispatch_policy._require(
      (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(value) k) = ARRAY['context', 'default'],
      path, 'must be a number or {"context": KEY, "default": NUMBER}', value);
    PERFORM dispatch_policy._require(
      jsonb_typeof(value -> 'context') = 'string' AND value ->> 'context' ~ '^[A-Za-z_][A-Za-z0-9_]{0,63}$',
      path || '.context', 'must name a context key (letters, digits and _, at most 64 characters)', value -> 'context');
    RETURN dispatch_policy._require_limit(value -> 'default', path || '.default', field);
  END IF;
  PERFORM dispatch_policy._require(jsonb_typeof(value) = 'number', path,
    CASE WHEN from_context THEN 'must be a number or {"context": KEY, "default": NUMBER}' ELSE 'must be a number' END, value);
  RETURN dispatch_policy._require_limit(value, path, field);
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_gate_value(jsonb, text, text, boolean) IS
  'Internal: validates a gate value (a number, or {"context", "default"} where from_context) against the bounds of field; returns the number (the default of a context value).';

DROP FUNCTION dispatch_policy._require_value(jsonb, text, numeric, boolean);

-- Every write of a config is validated, also a direct INSERT or UPDATE.
CREATE FUNCTION dispatch_policy._validate_policy_row()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy.validate_policy(NEW.name, NEW.config);
  RETURN NEW;
END
$$;
COMMENT ON FUNCTION dispatch_policy._validate_policy_row() IS
  'Internal trigger: validates every inserted or updated policy row, so a direct write cannot store a config the runner cannot run.';
CREATE TRIGGER policies_validate
  BEFORE INSERT OR UPDATE OF name, config ON dispatch_policy.policies
  FOR EACH ROW EXECUTE FUNCTION dispatch_policy._validate_policy_row();

-- Keys rendered from templates can be as long as a context value; stored as
-- they are they could overflow an index row. Longer than limits() allows,
-- a key becomes its first 64 characters, "...", and 32 hex digits of its
-- SHA-256: still readable, unique in practice, and always small.
CREATE FUNCTION dispatch_policy._fit_key(key text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE WHEN octet_length(key) <= 256 THEN key
              ELSE left(key, 64) || '...' || left(encode(sha256(convert_to(key, 'UTF8')), 'hex'), 32) END
$$;
COMMENT ON FUNCTION dispatch_policy._fit_key(text) IS
  'Internal: a rendered key as stored: unchanged up to 256 bytes, else its first 64 characters, "..." and 32 hex digits of its SHA-256 (the Swift runner computes the same).';

-- The partition of a job for a template: rendered and fitted; no template is
-- the single partition 'default'.
CREATE FUNCTION dispatch_policy._partition_key(template text, context jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE WHEN template IS NULL THEN 'default'
              ELSE dispatch_policy._fit_key(dispatch_policy._render_template(template, coalesce(context, '{}'::jsonb))) END
$$;
COMMENT ON FUNCTION dispatch_policy._partition_key(text, jsonb) IS
  'Internal: the partition key of a job for a template (rendered, then fitted by _fit_key); ''default'' without a template.';

-- Every gate's partition of a job under a config: {"gate name": "partition"}.
-- global_cap is always 'default'; fair_interleave uses its own partition_by,
-- else that of the first gate (other than global_cap) that has one.
CREATE FUNCTION dispatch_policy._gate_partitions(config jsonb, context jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(jsonb_object_agg(
           coalesce(g ->> 'name', g ->> 'type'),
           dispatch_policy._partition_key(
             CASE g ->> 'type'
               WHEN 'global_cap' THEN NULL
               WHEN 'fair_interleave' THEN coalesce(g ->> 'partition_by', f.template)
               ELSE g ->> 'partition_by'
             END, context)), '{}'::jsonb)
  FROM jsonb_array_elements(coalesce(config -> 'gates', '[]'::jsonb)) AS g
  CROSS JOIN (
    SELECT (SELECT x ->> 'partition_by'
            FROM jsonb_array_elements(coalesce(config -> 'gates', '[]'::jsonb)) WITH ORDINALITY AS t(x, n)
            WHERE x ->> 'type' NOT IN ('fair_interleave', 'global_cap') AND x ? 'partition_by'
            ORDER BY t.n LIMIT 1) AS template
  ) f
$$;
COMMENT ON FUNCTION dispatch_policy._gate_partitions(jsonb, jsonb) IS
  'Internal: {"gate": "partition"} of a job context under a policy config, for every gate (the same keys the runner computes).';

-- Keys stored before: 0.1.0 rendered them at any length. Fitted as every
-- writer fits them from now on, so that a job admitted before still holds
-- its slot in the partition later admissions count (else its tenant's cap
-- would admit again), and a bucket, an adaptive cap and its observations
-- keep their state. A round-robin key is fitted where it is the rendering
-- of round_robin_by (one given to stage() is kept as given), so the jobs of
-- a tenant stay in one lane. A fitted key cannot collide with another: 0.1.0
-- stored none of this form.
UPDATE dispatch_policy.throttle_buckets SET partition = dispatch_policy._fit_key(partition)
WHERE octet_length(partition) > 256;
UPDATE dispatch_policy.inflight_counters SET partition = dispatch_policy._fit_key(partition)
WHERE octet_length(partition) > 256;
UPDATE dispatch_policy.adaptive_stats SET partition = dispatch_policy._fit_key(partition)
WHERE octet_length(partition) > 256;
UPDATE dispatch_policy.observations SET partition = dispatch_policy._fit_key(partition)
WHERE octet_length(partition) > 256;
UPDATE dispatch_policy.observation_minutes SET partition = dispatch_policy._fit_key(partition)
WHERE octet_length(partition) > 256;
UPDATE dispatch_policy.admitted_jobs a
SET partitions = (SELECT jsonb_object_agg(s.key, dispatch_policy._fit_key(s.value)) FROM jsonb_each_text(a.partitions) AS s)
WHERE CASE WHEN jsonb_typeof(a.partitions) = 'object'
           THEN EXISTS (SELECT 1 FROM jsonb_each_text(a.partitions) AS s WHERE octet_length(s.value) > 256) END;
UPDATE dispatch_policy.staged_jobs s SET round_robin_key = dispatch_policy._fit_key(s.round_robin_key)
FROM dispatch_policy.policies p
WHERE p.name = s.policy AND octet_length(s.round_robin_key) > 256
  AND s.round_robin_key = dispatch_policy._render_template(p.config ->> 'round_robin_by', s.context);

-- Staging limits. The bounds are read once per call and passed in, so the
-- per-job check stays inlinable.
DROP FUNCTION dispatch_policy._job_spec_problem(jsonb);
CREATE FUNCTION dispatch_policy._job_spec_problem(
  job jsonb, max_queue integer, max_dedupe_key integer, max_round_robin_key integer, max_context integer
)
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE
    WHEN jsonb_typeof(job) IS DISTINCT FROM 'object' THEN
      ARRAY['22023', '', 'must be a JSON object with at least "args"']
    WHEN job - ARRAY['args', 'context', 'dedupe_key', 'round_robin_key',
                     'queue', 'priority', 'not_before'] <> '{}'::jsonb THEN
      ARRAY['22023',
            dispatch_policy._first_unknown_key(job),
            'is not a known field (known: args, context, dedupe_key, round_robin_key, queue, priority, not_before)']
    WHEN coalesce(jsonb_typeof(job -> 'args'), 'null') = 'null' THEN
      ARRAY['22004', 'args', 'must not be null']
    WHEN coalesce(jsonb_typeof(job -> 'context'), 'null') NOT IN ('null', 'object') THEN
      ARRAY['22023', 'context', 'must be a JSON object']
    WHEN pg_column_size(job -> 'context') > max_context THEN
      ARRAY['22023', 'context', format('must be at most %s bytes', max_context)]
    WHEN coalesce(jsonb_typeof(job -> 'dedupe_key'), 'null') NOT IN ('null', 'string')
         OR octet_length(job ->> 'dedupe_key') NOT BETWEEN 1 AND max_dedupe_key THEN
      ARRAY['22023', 'dedupe_key', format('must be a string of 1 to %s bytes, or null', max_dedupe_key)]
    WHEN coalesce(jsonb_typeof(job -> 'round_robin_key'), 'null') NOT IN ('null', 'string')
         OR octet_length(job ->> 'round_robin_key') NOT BETWEEN 1 AND max_round_robin_key THEN
      ARRAY['22023', 'round_robin_key', format('must be a string of 1 to %s bytes, or null', max_round_robin_key)]
    WHEN coalesce(jsonb_typeof(job -> 'queue'), 'null') NOT IN ('null', 'string')
         OR octet_length(job ->> 'queue') NOT BETWEEN 1 AND max_queue THEN
      ARRAY['22023', 'queue', format('must be a string of 1 to %s bytes, or null', max_queue)]
    WHEN coalesce(jsonb_typeof(job -> 'priority'), 'null') NOT IN ('null', 'number')
         OR (jsonb_typeof(job -> 'priority') = 'number'
             AND NOT ((job ->> 'priority')::numeric BETWEEN -2147483648 AND 2147483647
                      AND (job ->> 'priority')::numeric = trunc((job ->> 'priority')::numeric))) THEN
      ARRAY['22023', 'priority', 'must be an integer from -2147483648 to 2147483647, or null']
    WHEN coalesce(jsonb_typeof(job -> 'not_before'), 'null') NOT IN ('null', 'string') THEN
      ARRAY['22023', 'not_before', 'must be a timestamp string or null']
  END
$$;
COMMENT ON FUNCTION dispatch_policy._job_spec_problem(jsonb, integer, integer, integer, integer) IS
  'Internal: the first problem of a job spec as {sqlstate, field, rule}, NULL when valid; the length bounds are passed in (from limits()).';

CREATE OR REPLACE FUNCTION dispatch_policy._stage(policy text, jobs jsonb, field_prefix text)
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  staging_policy dispatch_policy.policies;
  bad record;
  ids bigint[];
  max_queue integer;
  max_dedupe_key integer;
  max_round_robin_key integer;
  max_context integer;
BEGIN
  staging_policy := dispatch_policy._require_policy(_stage.policy);
  IF jobs IS NULL OR jsonb_typeof(jobs) <> 'array' THEN
    RAISE EXCEPTION 'jobs must be a JSON array of job objects'
      USING ERRCODE = '22023', DETAIL = format('jobs is %s.', coalesce('a JSON ' || jsonb_typeof(jobs), 'NULL')),
            HINT = 'Pass [{"args": ...}, ...]. Nothing was stored.';
  END IF;
  SELECT max(l.maximum) FILTER (WHERE l.field = 'job.queue'),
         max(l.maximum) FILTER (WHERE l.field = 'job.dedupe_key'),
         max(l.maximum) FILTER (WHERE l.field = 'job.round_robin_key'),
         max(l.maximum) FILTER (WHERE l.field = 'job.context')
  INTO max_queue, max_dedupe_key, max_round_robin_key, max_context
  FROM dispatch_policy.limits() l;

  SELECT t.n - 1 AS idx, dispatch_policy._job_spec_problem(t.job, max_queue, max_dedupe_key, max_round_robin_key, max_context) AS problem, t.job
  INTO bad
  FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n)
  WHERE dispatch_policy._job_spec_problem(t.job, max_queue, max_dedupe_key, max_round_robin_key, max_context) IS NOT NULL
  ORDER BY t.n
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION '% %', rtrim(format(field_prefix, bad.idx) || bad.problem[2], '.'), bad.problem[3]
      USING ERRCODE = bad.problem[1],
            DETAIL = format('%s is %s.', rtrim(format(field_prefix, bad.idx) || bad.problem[2], '.'),
                            coalesce(left(CASE WHEN bad.problem[2] = '' THEN bad.job ELSE bad.job -> bad.problem[2] END::text, 200),
                                     'missing')),
            HINT = 'Nothing was stored.';
  END IF;

  BEGIN
    WITH input AS MATERIALIZED (
      SELECT t.n,
             nextval('dispatch_policy.job_ids') AS id,
             t.job -> 'args' AS args,
             coalesce(t.job ->> 'queue', 'default') AS queue,
             coalesce((t.job ->> 'priority')::numeric::integer, 0) AS priority,
             coalesce(nullif(t.job -> 'context', 'null'::jsonb), '{}'::jsonb) AS context,
             t.job ->> 'dedupe_key' AS dedupe_key,
             t.job ->> 'round_robin_key' AS round_robin_key,
             (t.job ->> 'not_before')::timestamptz AS not_before
      FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n)
      ORDER BY t.n
    ), checked AS (
      -- 'infinity' parses but would keep a job waiting forever.
      SELECT i.*, CASE WHEN isfinite(i.not_before) OR i.not_before IS NULL THEN i.not_before
                       ELSE ('not a finite time: ' || i.not_before::text)::timestamptz END AS due
      FROM input i
    ), prepared AS (
      SELECT i.n, i.id, i.args, i.queue, i.priority, i.dedupe_key, i.round_robin_key, i.due AS not_before,
             jsonb_build_object('queue_name', i.queue, 'priority', i.priority) || i.context AS context
      FROM checked i
    ), keyed AS (
      INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
      SELECT DISTINCT ON (p.dedupe_key) _stage.policy, p.dedupe_key, p.id
      FROM prepared p
      WHERE p.dedupe_key IS NOT NULL
      ORDER BY p.dedupe_key, p.n
      ON CONFLICT ON CONSTRAINT dedupe_keys_pkey DO NOTHING
      RETURNING job_id
    ), staged AS (
      INSERT INTO dispatch_policy.staged_jobs
        (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before)
      SELECT p.id, _stage.policy, p.queue, p.priority, p.args, p.context, p.dedupe_key,
             coalesce(p.round_robin_key,
                      dispatch_policy._fit_key(
                        dispatch_policy._render_template(staging_policy.config ->> 'round_robin_by', p.context))),
             CASE WHEN p.not_before > now() THEN p.not_before END
      FROM prepared p
      WHERE p.dedupe_key IS NULL OR p.id IN (SELECT k.job_id FROM keyed k)
      ORDER BY p.n
      RETURNING id
    )
    SELECT coalesce(array_agg(s.id ORDER BY p.n), '{}')
    INTO ids
    FROM prepared p LEFT JOIN staged s ON s.id = p.id;
  EXCEPTION
    -- A not_before that does not parse ('someday', '+99:00', an unknown time
    -- zone) or is infinite. Only on this error path: find the element.
    WHEN invalid_datetime_format OR datetime_field_overflow OR invalid_time_zone_displacement_value
         OR invalid_parameter_value THEN
      SELECT t.n - 1 AS idx, t.job -> 'not_before' AS value INTO bad
      FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n)
      WHERE CASE WHEN dispatch_policy._is_timestamptz(t.job ->> 'not_before')
                 THEN NOT isfinite((t.job ->> 'not_before')::timestamptz) ELSE true END
      ORDER BY t.n LIMIT 1;
      IF NOT FOUND THEN
        RAISE;
      END IF;
      RAISE EXCEPTION '% must be a finite timestamp', format(field_prefix, bad.idx) || 'not_before'
        USING ERRCODE = '22023',
              DETAIL = format('%snot_before is %s.', format(field_prefix, bad.idx), left(bad.value::text, 200)),
              HINT = 'Use ISO 8601, such as 2026-01-31T12:00:00Z. Nothing was stored.';
  END;

  IF cardinality(array_remove(ids, NULL)) > 0 THEN
    PERFORM pg_notify('dispatch_policy_staged', _stage.policy);
  END IF;
  RETURN ids;
END
$$;

CREATE OR REPLACE FUNCTION dispatch_policy._is_timestamptz(value text)
RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
BEGIN
  PERFORM value::timestamptz;
  RETURN true;
EXCEPTION
  WHEN invalid_datetime_format OR datetime_field_overflow OR invalid_text_representation
       OR invalid_time_zone_displacement_value OR invalid_parameter_value THEN
    RETURN false;
END
$$;

COMMENT ON FUNCTION dispatch_policy.stage(text, jsonb, jsonb, text, text, text, integer, timestamptz) IS
  'Stages one job and returns its id, or NULL when a job of the same policy with the same dedupe_key is pending or admitted. Adds queue_name and priority to the context unless set; derives round_robin_key from the policy round_robin_by template when not given; a not_before in the future schedules the job. Errors: unknown policy 42704, NULL args 22004, a field out of its limits() bounds or otherwise invalid 22023 (the message names the field).';

-- Token buckets. One formula, read by refill_buckets, prune and the views.
-- The CHECK constraints bound every operand, so it cannot overflow: at most
-- 1e6 tokens × ~3e11 s / 0.001 s.
UPDATE dispatch_policy.throttle_buckets SET
  rate = least(greatest(rate, 0), 1000000),
  per_seconds = least(greatest(per_seconds, 0.001), 31536000),
  burst = least(greatest(burst, 1), 1000000);
UPDATE dispatch_policy.throttle_buckets SET tokens = least(greatest(tokens, 0), burst);
ALTER TABLE dispatch_policy.throttle_buckets
  ADD CONSTRAINT throttle_buckets_rate_check CHECK (rate >= 0 AND rate <= 1000000),
  ADD CONSTRAINT throttle_buckets_per_check CHECK (per_seconds >= 0.001 AND per_seconds <= 31536000),
  ADD CONSTRAINT throttle_buckets_burst_check CHECK (burst >= 1 AND burst <= 1000000),
  ADD CONSTRAINT throttle_buckets_tokens_check CHECK (tokens >= -1000000 AND tokens <= burst);

CREATE FUNCTION dispatch_policy._bucket_tokens(
  tokens double precision, rate double precision, per_seconds double precision, burst double precision,
  refilled_at timestamptz, at timestamptz
)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT least(burst, tokens + rate * greatest(extract(epoch FROM at - refilled_at)::double precision, 0) / per_seconds)
$$;
COMMENT ON FUNCTION dispatch_policy._bucket_tokens(double precision, double precision, double precision, double precision, timestamptz, timestamptz) IS
  'Internal: the token level of a bucket at time at: min(burst, tokens + rate × elapsed / per); time going back adds nothing. The one refill formula.';

