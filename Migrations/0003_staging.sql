-- dispatch-policy: staging (stage, stage_many).

CREATE FUNCTION dispatch_policy._first_unknown_key(job jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT min(k) FROM jsonb_object_keys(job) AS k
  WHERE k NOT IN ('args', 'context', 'dedupe_key', 'round_robin_key', 'queue', 'priority', 'not_before')
$$;
COMMENT ON FUNCTION dispatch_policy._first_unknown_key(jsonb) IS
  'Internal: the first key of a job spec that stage_many does not know.';

-- The first problem with one job spec (an element of stage_many's array), as
-- {sqlstate, field, rule}, or NULL when the spec is valid. Inlinable (no
-- subqueries) so that checking 100,000 specs stays cheap.
CREATE FUNCTION dispatch_policy._job_spec_problem(job jsonb)
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
    WHEN coalesce(jsonb_typeof(job -> 'dedupe_key'), 'null') NOT IN ('null', 'string') THEN
      ARRAY['22023', 'dedupe_key', 'must be a string or null']
    WHEN coalesce(jsonb_typeof(job -> 'round_robin_key'), 'null') NOT IN ('null', 'string') THEN
      ARRAY['22023', 'round_robin_key', 'must be a string or null']
    WHEN coalesce(jsonb_typeof(job -> 'queue'), 'null') NOT IN ('null', 'string')
         OR job ->> 'queue' = '' THEN
      ARRAY['22023', 'queue', 'must be a non-empty string or null']
    WHEN coalesce(jsonb_typeof(job -> 'priority'), 'null') NOT IN ('null', 'number')
         OR (jsonb_typeof(job -> 'priority') = 'number'
             AND NOT ((job ->> 'priority')::numeric BETWEEN -2147483648 AND 2147483647
                      AND (job ->> 'priority')::numeric = trunc((job ->> 'priority')::numeric))) THEN
      ARRAY['22023', 'priority', 'must be an integer (32-bit) or null']
    WHEN coalesce(jsonb_typeof(job -> 'not_before'), 'null') NOT IN ('null', 'string') THEN
      ARRAY['22023', 'not_before', 'must be a timestamp string or null']
  END
$$;
COMMENT ON FUNCTION dispatch_policy._job_spec_problem(jsonb) IS
  'Internal: the first problem of a job spec as {sqlstate, field, rule}, NULL when valid.';

-- Stages an array of job specs: validates all of them first (nothing is
-- stored if one is bad), dedupes against pending/admitted jobs and within the
-- call (first occurrence wins), inserts, and notifies runners once.
-- field_prefix is how errors name an element: 'jobs[%s].' for stage_many,
-- '' for stage.
CREATE FUNCTION dispatch_policy._stage(policy text, jobs jsonb, field_prefix text)
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  staging_policy dispatch_policy.policies;
  bad record;
  ids bigint[];
BEGIN
  staging_policy := dispatch_policy._require_policy(_stage.policy);
  IF jobs IS NULL OR jsonb_typeof(jobs) <> 'array' THEN
    RAISE EXCEPTION 'jobs must be a JSON array of job objects'
      USING ERRCODE = '22023', DETAIL = format('jobs is %s.', coalesce('a JSON ' || jsonb_typeof(jobs), 'NULL')),
            HINT = 'Pass [{"args": ...}, ...]. Nothing was stored.';
  END IF;

  SELECT t.n - 1 AS idx, dispatch_policy._job_spec_problem(t.job) AS problem, t.job
  INTO bad
  FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n)
  WHERE dispatch_policy._job_spec_problem(t.job) IS NOT NULL
  ORDER BY t.n
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION '% %', rtrim(format(field_prefix, bad.idx) || bad.problem[2], '.'), bad.problem[3]
      USING ERRCODE = bad.problem[1],
            DETAIL = format('%s is %s.', rtrim(format(field_prefix, bad.idx) || bad.problem[2], '.'),
                            coalesce(CASE WHEN bad.problem[2] = '' THEN bad.job ELSE bad.job -> bad.problem[2] END::text,
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
    ), prepared AS (
      SELECT i.n, i.id, i.args, i.queue, i.priority, i.dedupe_key, i.round_robin_key, i.not_before,
             jsonb_build_object('queue_name', i.queue, 'priority', i.priority) || i.context AS context
      FROM input i
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
                      dispatch_policy._render_template(staging_policy.config ->> 'round_robin_by', p.context)),
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
    WHEN invalid_datetime_format OR datetime_field_overflow THEN
      -- Only on this error path: find the element whose not_before does not parse.
      SELECT t.n - 1 AS idx, t.job -> 'not_before' AS value INTO bad
      FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n)
      WHERE NOT dispatch_policy._is_timestamptz(t.job ->> 'not_before')
      ORDER BY t.n LIMIT 1;
      RAISE EXCEPTION '% must be a timestamp', format(field_prefix, bad.idx) || 'not_before'
        USING ERRCODE = '22023',
              DETAIL = format('%snot_before is %s.', format(field_prefix, bad.idx), bad.value),
              HINT = 'Use ISO 8601, such as 2026-01-31T12:00:00Z. Nothing was stored.';
  END;

  IF cardinality(array_remove(ids, NULL)) > 0 THEN
    PERFORM pg_notify('dispatch_policy_staged', _stage.policy);
  END IF;
  RETURN ids;
END
$$;
COMMENT ON FUNCTION dispatch_policy._stage(text, jsonb, text) IS
  'Internal: the one implementation behind stage() and stage_many().';

CREATE FUNCTION dispatch_policy._is_timestamptz(value text)
RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
BEGIN
  PERFORM value::timestamptz;
  RETURN true;
EXCEPTION
  WHEN invalid_datetime_format OR datetime_field_overflow OR invalid_text_representation THEN
    RETURN false;
END
$$;
COMMENT ON FUNCTION dispatch_policy._is_timestamptz(text) IS
  'Internal: whether value parses as timestamptz (NULL counts as valid).';

CREATE FUNCTION dispatch_policy.stage(
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
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT (dispatch_policy._stage(
    stage.policy,
    -- SQL NULLs become JSON nulls, which the spec check reads as "not given"
    -- (and as the 22004 error for args).
    jsonb_build_array(jsonb_build_object(
      'args', stage.args,
      'context', stage.context,
      'dedupe_key', stage.dedupe_key,
      'round_robin_key', stage.round_robin_key,
      'queue', stage.queue,
      'priority', stage.priority,
      'not_before', stage.not_before
    )),
    ''))[1]
$$;
COMMENT ON FUNCTION dispatch_policy.stage(text, jsonb, jsonb, text, text, text, integer, timestamptz) IS
  'Stages one job and returns its id, or NULL when a job of the same policy with the same dedupe_key is pending or admitted. Adds queue_name and priority to the context unless set; derives round_robin_key from the policy round_robin_by template when not given; a not_before in the future schedules the job. Errors: unknown policy 42704, NULL args 22004, non-object context or other bad field 22023.';

CREATE FUNCTION dispatch_policy.stage_many(policy text, jobs jsonb)
RETURNS bigint[]
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT dispatch_policy._stage(stage_many.policy, stage_many.jobs, 'jobs[%s].')
$$;
COMMENT ON FUNCTION dispatch_policy.stage_many(text, jsonb) IS
  'Stages a JSON array of jobs, each an object with the fields of stage() (args, context, dedupe_key, round_robin_key, queue, priority, not_before). Returns ids in input order, NULL where deduped (also against an earlier element of the same call). All or nothing: one invalid element (named as jobs[i].field) stores nothing.';
