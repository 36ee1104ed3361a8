-- dispatch-policy: faster staging (issue 9).
--
-- A profile of stage() and stage_many() (pg_stat_statements with
-- track = all, auto_explain with log_nested_statements) showed:
--
--   * _job_spec_problem was not inlined: it is declared IMMUTABLE but its
--     body calls STABLE functions (format, pg_column_size), so the planner
--     ran it as a separate SQL function for every element, twice per
--     element in the worst case: about three quarters of a stage_many call.
--   * stage() built a one-element JSON array only for _stage to take it
--     apart again, read the bounds from limits() on every call (a scan of
--     its VALUES list), looked the policy up through a second PL/pgSQL
--     function and ran the insert inside an exception block (a
--     subtransaction) for the sake of not_before parsing, which a
--     timestamptz argument never needs.
--
-- stage() now checks its arguments directly and inserts one row; anything
-- it does not accept at a glance (a bad or borderline value) goes to the
-- general path, _stage, which raises the same error as before naming the
-- field, so there is one implementation of every error. stage_many keeps
-- its single statement, with the element check inlined and the bounds
-- folded into the cached plan. The round-robin key of a job is derived in
-- one place, _round_robin_key, for both.

-- The bounds in the CHECK constraints of staged_jobs are _limit_max calls
-- with constant arguments. PostgreSQL folds them once per statement, not
-- once per session: every INSERT into staged_jobs (also a raw one) ran
-- _limit_max three times, and a SQL function is parsed and planned afresh
-- on each such call (limits() with it): about 0.7 ms each, 20 to 40 times
-- the cost of the insert itself. As PL/pgSQL, the lookup's plan is cached
-- for the session. Same result, still IMMUTABLE, still read from limits().
CREATE OR REPLACE FUNCTION dispatch_policy._limit_max(field text)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
BEGIN
  RETURN (SELECT l.maximum FROM dispatch_policy.limits() l WHERE l.field = _limit_max.field);
END
$$;
COMMENT ON FUNCTION dispatch_policy._limit_max(text) IS
  'Internal: the maximum limits() gives for field (PL/pgSQL so that its plan is cached: CHECK constraints fold it on every insert).';

-- Same body, no longer STRICT (it returns NULL for NULL all the same), so
-- that the planner inlines it into _render_template: a STRICT SQL function
-- whose body is a CASE is run as a function call for every job.
CREATE OR REPLACE FUNCTION dispatch_policy._context_text(value jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE CALLED ON NULL INPUT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE jsonb_typeof(value)
           WHEN 'string' THEN value #>> '{}'
           WHEN 'null' THEN NULL
           ELSE value::text
         END
$$;

-- The round-robin key a job is stored with: the one given to stage, else
-- rendered from the policy's lane template (policies.lane_template:
-- round_robin_by, else its gates' partition_by templates) and fitted by
-- _fit_key, else NULL. Inlinable. _fit_key leaves a key of at most
-- limits() partition_key bytes unchanged, so it is only called (a function
-- call per job: its body is not inlinable) for a longer one.
CREATE FUNCTION dispatch_policy._round_robin_key(template text, context jsonb, given text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(
    given,
    CASE WHEN octet_length(dispatch_policy._render_template(template, context))
              <= dispatch_policy._limit_max('partition_key')
         THEN dispatch_policy._render_template(template, context)
         ELSE dispatch_policy._fit_key(dispatch_policy._render_template(template, context))
    END)
$$;
COMMENT ON FUNCTION dispatch_policy._round_robin_key(text, jsonb, text) IS
  'Internal: the round_robin_key (lane) a job is staged with, given the policy''s lane_template and the job context as stored (with queue_name and priority): the key given to stage, else the template rendered and fitted by _fit_key, else NULL. The one place staging derives it.';

-- Same body; STABLE instead of IMMUTABLE, because format and pg_column_size
-- are STABLE and the planner refuses to inline an IMMUTABLE SQL function
-- whose body is not.
CREATE OR REPLACE FUNCTION dispatch_policy._job_spec_problem(
  job jsonb, max_queue integer, max_dedupe_key integer, max_round_robin_key integer, max_context integer
)
RETURNS text[]
LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
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
  'Internal: the first problem of a job spec as {sqlstate, field, rule}, NULL when valid; the length bounds are passed in (from limits()). STABLE so that the planner inlines it.';

-- The general path: stage_many, and stage() for input it does not accept
-- at a glance. Changes from 0007: the policy is read here (its error still
-- comes from _require_policy), the bounds are _limit_max calls with
-- constant arguments (folded once into the cached plan instead of a scan of
-- limits() per call), and the round-robin key comes from _round_robin_key.
CREATE OR REPLACE FUNCTION dispatch_policy._stage(policy text, jobs jsonb, field_prefix text)
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  template text;
  bad record;
  ids bigint[];
  lanes text[];
BEGIN
  SELECT p.lane_template INTO template FROM dispatch_policy.policies p WHERE p.name = _stage.policy;
  IF NOT FOUND THEN
    PERFORM dispatch_policy._require_policy(_stage.policy);
  END IF;
  IF jobs IS NULL OR jsonb_typeof(jobs) <> 'array' THEN
    RAISE EXCEPTION 'jobs must be a JSON array of job objects'
      USING ERRCODE = '22023', DETAIL = format('jobs is %s.', coalesce('a JSON ' || jsonb_typeof(jobs), 'NULL')),
            HINT = 'Pass [{"args": ...}, ...]. Nothing was stored.';
  END IF;

  SELECT t.n - 1 AS idx, t.job,
         dispatch_policy._job_spec_problem(
           t.job, dispatch_policy._limit_max('job.queue')::integer, dispatch_policy._limit_max('job.dedupe_key')::integer,
           dispatch_policy._limit_max('job.round_robin_key')::integer, dispatch_policy._limit_max('job.context')::integer
         ) AS problem
  INTO bad
  FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n)
  WHERE dispatch_policy._job_spec_problem(
          t.job, dispatch_policy._limit_max('job.queue')::integer, dispatch_policy._limit_max('job.dedupe_key')::integer,
          dispatch_policy._limit_max('job.round_robin_key')::integer, dispatch_policy._limit_max('job.context')::integer
        ) IS NOT NULL
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
             dispatch_policy._round_robin_key(template, p.context, p.round_robin_key),
             CASE WHEN p.not_before > now() THEN p.not_before END
      FROM prepared p
      WHERE p.dedupe_key IS NULL OR p.id IN (SELECT k.job_id FROM keyed k)
      ORDER BY p.n
      RETURNING id, round_robin_key, not_before
    )
    SELECT coalesce(array_agg(s.id ORDER BY p.n), '{}'),
           coalesce(array_agg(DISTINCT s.round_robin_key) FILTER (WHERE s.id IS NOT NULL AND s.not_before IS NULL), '{}')
    INTO ids, lanes
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

  -- The lanes of the jobs eligible now (scheduled ones get theirs when promoted).
  PERFORM dispatch_policy._add_lanes(_stage.policy, lanes);
  IF cardinality(array_remove(ids, NULL)) > 0 THEN
    PERFORM pg_notify('dispatch_policy_staged', _stage.policy);
  END IF;
  RETURN ids;
END
$$;
COMMENT ON FUNCTION dispatch_policy._stage(text, jsonb, text) IS
  'Internal: stages a JSON array of job specs (stage_many, and stage() for input its own check does not accept at a glance): checks every element first (nothing is stored if one is bad; the error names the field), dedupes, inserts in one statement, adds the lanes of the jobs eligible now, notifies dispatch_policy_staged once.';

-- stage(): one row, no JSON array. The check below accepts only input that
-- is certainly valid; everything else (an unknown policy, a NULL args, a
-- value out of its limits() bounds or near one) goes to _stage, which
-- raises the error naming the field as before (or stages the job when it
-- was valid after all, such as a compressed context within the bound).
CREATE OR REPLACE FUNCTION dispatch_policy.stage(
  policy          text,
  args            jsonb,
  context         jsonb DEFAULT '{}',
  dedupe_key      text DEFAULT NULL,
  round_robin_key text DEFAULT NULL,
  queue           text DEFAULT NULL,
  priority        integer DEFAULT NULL,
  not_before      timestamptz DEFAULT NULL
)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  template text;
  job_context jsonb;
  job_id bigint;
  lane text;
  due timestamptz;
BEGIN
  SELECT p.lane_template INTO template FROM dispatch_policy.policies p WHERE p.name = stage.policy;
  IF NOT FOUND
     OR stage.args IS NULL OR jsonb_typeof(stage.args) = 'null'
     OR jsonb_typeof(stage.context) NOT IN ('object', 'null')
     -- The general path measures the context exactly; here a compressed or
     -- borderline one is left to it.
     OR pg_column_size(stage.context) > dispatch_policy._limit_max('job.context') - 8
     OR pg_column_compression(stage.context) IS NOT NULL
     OR octet_length(stage.dedupe_key) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.dedupe_key')
     OR octet_length(stage.round_robin_key) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.round_robin_key')
     OR octet_length(stage.queue) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.queue')
     OR NOT isfinite(stage.not_before)
  THEN
    -- SQL NULLs become JSON nulls, which the spec check reads as "not given"
    -- (and as the 22004 error for args).
    RETURN (dispatch_policy._stage(
      stage.policy,
      jsonb_build_array(jsonb_build_object(
        'args', stage.args,
        'context', stage.context,
        'dedupe_key', stage.dedupe_key,
        'round_robin_key', stage.round_robin_key,
        'queue', stage.queue,
        'priority', stage.priority,
        'not_before', stage.not_before
      )),
      ''))[1];
  END IF;

  job_context := jsonb_build_object('queue_name', coalesce(stage.queue, 'default'), 'priority', coalesce(stage.priority, 0))
                 || coalesce(nullif(stage.context, 'null'::jsonb), '{}'::jsonb);
  job_id := nextval('dispatch_policy.job_ids');
  -- Only with a key: the primary key makes concurrent stages of the same
  -- key store one job (the later waits for the earlier's transaction).
  IF stage.dedupe_key IS NOT NULL THEN
    INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
    VALUES (stage.policy, stage.dedupe_key, job_id)
    ON CONFLICT ON CONSTRAINT dedupe_keys_pkey DO NOTHING;
    IF NOT FOUND THEN
      RETURN NULL;
    END IF;
  END IF;
  INSERT INTO dispatch_policy.staged_jobs
    (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before)
  VALUES (job_id, stage.policy, coalesce(stage.queue, 'default'), coalesce(stage.priority, 0), stage.args, job_context,
          stage.dedupe_key, dispatch_policy._round_robin_key(template, job_context, stage.round_robin_key),
          CASE WHEN stage.not_before > now() THEN stage.not_before END)
  RETURNING staged_jobs.round_robin_key, staged_jobs.not_before INTO lane, due;
  IF due IS NULL THEN
    PERFORM dispatch_policy._add_lanes(stage.policy, ARRAY[lane]);
  END IF;
  PERFORM pg_notify('dispatch_policy_staged', stage.policy);
  RETURN job_id;
END
$$;
COMMENT ON FUNCTION dispatch_policy.stage(text, jsonb, jsonb, text, text, text, integer, timestamptz) IS
  'Stages one job and returns its id, or NULL when a job of the same policy with the same dedupe_key is pending or admitted. Adds queue_name and priority to the context unless set; derives round_robin_key (the job''s lane) from the policy''s lane_template (round_robin_by, else its gates'' partition_by templates) when not given; a not_before in the future schedules the job. Errors: unknown policy 42704, NULL args 22004, a field out of its limits() bounds or otherwise invalid 22023 (the message names the field).';

-- Jobs pending without a key in policies whose gates are partitioned get the
-- lane their config gives them (the staged_jobs_lanes trigger adds it).
UPDATE dispatch_policy.staged_jobs s
SET round_robin_key = dispatch_policy._round_robin_key(p.lane_template, s.context, NULL)
FROM dispatch_policy.policies p
WHERE s.policy = p.name AND s.round_robin_key IS NULL AND p.lane_template IS NOT NULL;
