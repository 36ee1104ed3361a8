-- dispatch-policy: templates, policy validation, declare_policy, pause, resume.

-- A context value as template text: strings as they are, JSON null as NULL,
-- anything else as its JSON text (42, 1.5, true, {"a":1}).
CREATE FUNCTION dispatch_policy._context_text(value jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE jsonb_typeof(value)
           WHEN 'string' THEN value #>> '{}'
           WHEN 'null' THEN NULL
           ELSE value::text
         END
$$;
COMMENT ON FUNCTION dispatch_policy._context_text(jsonb) IS
  'Internal: the text a context value contributes to a template (strings unquoted, null as NULL, other JSON as its text).';

-- Renders "{key}" placeholders from the context; a missing or null key
-- renders as the empty string. A template without placeholders is returned
-- unchanged (one shared partition). Templates are validated by
-- validate_policy, so braces always form {key} placeholders here.
CREATE FUNCTION dispatch_policy._render_template_general(template text, context jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(string_agg(
           CASE WHEN m[1] IS NULL THEN m[2]
                ELSE coalesce(dispatch_policy._context_text(context -> m[1]), '')
           END, '' ORDER BY n), '')
  FROM regexp_matches(template, '\{([A-Za-z_][A-Za-z0-9_]*)\}|([^{}]+)', 'g') WITH ORDINALITY AS t(m, n)
$$;
COMMENT ON FUNCTION dispatch_policy._render_template_general(text, jsonb) IS
  'Internal: renders a template with any number of {key} placeholders (the slow path of _render_template).';

-- Inlinable: templates with no placeholder or exactly one (the usual
-- "{account_id}" or "acct:{account_id}") are rendered without a regexp.
CREATE FUNCTION dispatch_policy._render_template(template text, context jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE
    WHEN template IS NULL THEN NULL
    WHEN strpos(template, '{') = 0 THEN template
    WHEN strpos(substr(template, strpos(template, '{') + 1), '{') = 0 THEN
      left(template, strpos(template, '{') - 1)
      || coalesce(dispatch_policy._context_text(
           context -> substr(template, strpos(template, '{') + 1,
                             strpos(template, '}') - strpos(template, '{') - 1)), '')
      || substr(template, strpos(template, '}') + 1)
    ELSE dispatch_policy._render_template_general(template, coalesce(context, '{}'::jsonb))
  END
$$;
COMMENT ON FUNCTION dispatch_policy._render_template(text, jsonb) IS
  'Internal: replaces each {key} in template with the context value of key (strings unquoted, other JSON as text; missing or null: empty string). NULL template gives NULL.';

-- Raises the validation error for one config field.
CREATE FUNCTION dispatch_policy._config_error(field text, rule text, got jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  RAISE EXCEPTION 'invalid policy config: % %', field, rule
    USING ERRCODE = '22023',
          DETAIL = format('%s is %s.', field, coalesce(got::text, 'missing')),
          HINT = 'See "Policy configuration" in the dispatch-policy README. Nothing was stored.';
END
$$;
COMMENT ON FUNCTION dispatch_policy._config_error(text, text, jsonb) IS
  'Internal: raises SQLSTATE 22023 naming the config field and the rule it breaks.';

-- The numeric value of a JSON number, else NULL.
CREATE FUNCTION dispatch_policy._json_number(value jsonb)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE WHEN jsonb_typeof(value) = 'number' THEN (value #>> '{}')::numeric END
$$;
COMMENT ON FUNCTION dispatch_policy._json_number(jsonb) IS
  'Internal: the numeric value of a JSON number, NULL for anything else.';

-- Checks one field: when check is not true, raises the error for it.
CREATE FUNCTION dispatch_policy._require(check_passed boolean, field text, rule text, got jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  IF check_passed IS NOT TRUE THEN
    PERFORM dispatch_policy._config_error(field, rule, got);
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require(boolean, text, text, jsonb) IS
  'Internal: raises the config error for field unless check_passed is true.';

-- Refuses keys of an object that are not in allowed (catches typos).
CREATE FUNCTION dispatch_policy._require_known_keys(object jsonb, allowed text[], path text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
DECLARE
  unknown text;
BEGIN
  SELECT k INTO unknown
  FROM jsonb_object_keys(object) AS k
  WHERE k <> ALL (allowed)
  ORDER BY k
  LIMIT 1;
  IF unknown IS NOT NULL THEN
    PERFORM dispatch_policy._config_error(path || unknown,
      format('is not a known field (known: %s)', array_to_string(allowed, ', ')), object -> unknown);
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_known_keys(jsonb, text[], text) IS
  'Internal: raises the config error for the first key of object not in allowed.';

-- A gate value: a number, or {"context": KEY, "default": NUMBER}. Checks the
-- shape, and that the number (or the default) passes minimum/integer rules.
CREATE FUNCTION dispatch_policy._require_value(value jsonb, field text, minimum numeric, integral boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
DECLARE
  shape_rule constant text := 'must be a number or {"context": KEY, "default": NUMBER}';
  number_rule text := format('must be %s of at least %s',
                             CASE WHEN integral THEN 'an integer' ELSE 'a number' END, minimum);
  n numeric;
BEGIN
  IF jsonb_typeof(value) = 'object' THEN
    PERFORM dispatch_policy._require(
      (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(value) k) = ARRAY['context', 'default'],
      field, shape_rule, value);
    PERFORM dispatch_policy._require(
      jsonb_typeof(value -> 'context') = 'string' AND value ->> 'context' <> '',
      field || '.context', 'must be a non-empty string naming a context key', value -> 'context');
    field := field || '.default';
    value := value -> 'default';
  ELSE
    PERFORM dispatch_policy._require(jsonb_typeof(value) = 'number', field, shape_rule, value);
  END IF;
  n := dispatch_policy._json_number(value);
  PERFORM dispatch_policy._require(n >= minimum AND (NOT integral OR n = trunc(n)), field, number_rule, value);
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_value(jsonb, text, numeric, boolean) IS
  'Internal: validates a gate value (number or {"context", "default"}) against a minimum and an integer rule.';

CREATE FUNCTION dispatch_policy._require_template(value jsonb, field text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require(
    jsonb_typeof(value) = 'string'
      AND value #>> '{}' <> ''
      AND value #>> '{}' ~ '^([^{}]|\{[A-Za-z_][A-Za-z0-9_]*\})*$',
    field,
    'must be a non-empty template string; placeholders are {key} with key made of letters, digits and _',
    value);
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_template(jsonb, text) IS
  'Internal: validates a partition template such as "acct:{account_id}".';

-- Validates a whole policy config. Raises SQLSTATE 22023 on the first
-- problem, naming the field (gates[1].per) and the rule.
CREATE FUNCTION dispatch_policy.validate_policy(name text, config jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
DECLARE
  gate jsonb;
  i integer := 0;
  path text;
  gate_type text;
  gate_name text;
  seen jsonb := '{}';
  n numeric;
  lo numeric;
  hi numeric;
BEGIN
  IF validate_policy.name IS NULL OR validate_policy.name !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' THEN
    RAISE EXCEPTION 'invalid policy name: %', coalesce(quote_literal(validate_policy.name), 'NULL')
      USING ERRCODE = '22023',
            DETAIL = 'A policy name is 1 to 128 characters: letters, digits, _ . : -, starting with a letter or digit.',
            HINT = 'Nothing was stored.';
  END IF;
  IF config IS NULL OR jsonb_typeof(config) <> 'object' THEN
    PERFORM dispatch_policy._config_error('config', 'must be a JSON object', config);
  END IF;

  PERFORM dispatch_policy._require_known_keys(config,
    ARRAY['gates', 'round_robin_by', 'batch_size', 'round_robin_quantum',
          'lease_seconds', 'max_attempts', 'target'], '');

  IF config ? 'batch_size' THEN
    n := dispatch_policy._json_number(config -> 'batch_size');
    PERFORM dispatch_policy._require(n BETWEEN 1 AND 100000 AND n = trunc(n),
      'batch_size', 'must be an integer from 1 to 100000', config -> 'batch_size');
  END IF;
  IF config ? 'round_robin_quantum' THEN
    n := dispatch_policy._json_number(config -> 'round_robin_quantum');
    PERFORM dispatch_policy._require(n BETWEEN 1 AND 100000 AND n = trunc(n),
      'round_robin_quantum', 'must be an integer from 1 to 100000', config -> 'round_robin_quantum');
  END IF;
  IF config ? 'lease_seconds' THEN
    n := dispatch_policy._json_number(config -> 'lease_seconds');
    PERFORM dispatch_policy._require(n >= 1 AND n <= 31536000 AND n = trunc(n),
      'lease_seconds', 'must be an integer from 1 to 31536000', config -> 'lease_seconds');
  END IF;
  IF config ? 'max_attempts' THEN
    n := dispatch_policy._json_number(config -> 'max_attempts');
    PERFORM dispatch_policy._require(n BETWEEN 1 AND 1000 AND n = trunc(n),
      'max_attempts', 'must be an integer from 1 to 1000', config -> 'max_attempts');
  END IF;
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
        config -> 'target' ->> 'function' ~ '^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*$',
        'target.function', 'must name a function as schema.name', config -> 'target' -> 'function');
    END IF;
  END IF;

  IF config ? 'gates' THEN
    PERFORM dispatch_policy._require(jsonb_typeof(config -> 'gates') = 'array',
      'gates', 'must be an array of gate objects', config -> 'gates');
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
          WHEN 'throttle' THEN ARRAY['type', 'name', 'partition_by', 'rate', 'per', 'burst']
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
          PERFORM dispatch_policy._require_value(gate -> 'rate', path || '.rate', 0, false);
          PERFORM dispatch_policy._require(gate ? 'per', path || '.per', 'is required (seconds)', NULL);
          n := dispatch_policy._json_number(gate -> 'per');
          PERFORM dispatch_policy._require(n > 0, path || '.per',
            'must be a number of seconds greater than 0', gate -> 'per');
          IF gate ? 'burst' THEN
            PERFORM dispatch_policy._require_value(gate -> 'burst', path || '.burst', 1, false);
          END IF;
        WHEN 'concurrency' THEN
          PERFORM dispatch_policy._require(gate ? 'max', path || '.max', 'is required', NULL);
          PERFORM dispatch_policy._require_value(gate -> 'max', path || '.max', 0, true);
        WHEN 'global_cap' THEN
          PERFORM dispatch_policy._require(gate ? 'max', path || '.max', 'is required', NULL);
          n := dispatch_policy._json_number(gate -> 'max');
          PERFORM dispatch_policy._require(n >= 0 AND n = trunc(n), path || '.max',
            'must be an integer of at least 0', gate -> 'max');
        WHEN 'fair_interleave' THEN
          NULL;
        WHEN 'adaptive_concurrency' THEN
          PERFORM dispatch_policy._require(gate ? 'target_lag_ms', path || '.target_lag_ms',
            'is required (the acceptable queue lag in ms)', NULL);
          n := dispatch_policy._json_number(gate -> 'target_lag_ms');
          PERFORM dispatch_policy._require(n > 0, path || '.target_lag_ms',
            'must be a number of milliseconds greater than 0', gate -> 'target_lag_ms');
          lo := coalesce(dispatch_policy._json_number(gate -> 'min'), 1);
          IF gate ? 'min' THEN
            PERFORM dispatch_policy._require(lo >= 1 AND lo = trunc(lo), path || '.min',
              'must be an integer of at least 1', gate -> 'min');
          END IF;
          IF gate ? 'max' THEN
            hi := dispatch_policy._json_number(gate -> 'max');
            PERFORM dispatch_policy._require(hi >= lo AND hi = trunc(hi), path || '.max',
              format('must be an integer of at least min (%s)', lo), gate -> 'max');
          END IF;
          IF gate ? 'initial_max' THEN
            n := dispatch_policy._json_number(gate -> 'initial_max');
            PERFORM dispatch_policy._require(n >= lo AND n = trunc(n) AND (hi IS NULL OR n <= hi),
              path || '.initial_max',
              format('must be an integer from min (%s) to max (%s)', lo, coalesce(hi::text, 'unbounded')),
              gate -> 'initial_max');
          ELSE
            -- The default initial_max (3) is clamped into [min, max] when the gate is read.
            NULL;
          END IF;
          IF gate ? 'ewma_alpha' THEN
            n := dispatch_policy._json_number(gate -> 'ewma_alpha');
            PERFORM dispatch_policy._require(n > 0 AND n <= 1, path || '.ewma_alpha',
              'must be a number in (0, 1]', gate -> 'ewma_alpha');
          END IF;
          IF gate ? 'failure_decrease_factor' THEN
            n := dispatch_policy._json_number(gate -> 'failure_decrease_factor');
            PERFORM dispatch_policy._require(n > 0 AND n < 1, path || '.failure_decrease_factor',
              'must be a number in (0, 1)', gate -> 'failure_decrease_factor');
          END IF;
          IF gate ? 'overload_decrease_factor' THEN
            n := dispatch_policy._json_number(gate -> 'overload_decrease_factor');
            PERFORM dispatch_policy._require(n > 0 AND n < 1, path || '.overload_decrease_factor',
              'must be a number in (0, 1)', gate -> 'overload_decrease_factor');
          END IF;
      END CASE;
      i := i + 1;
    END LOOP;
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.validate_policy(text, jsonb) IS
  'Checks a policy name and config without storing anything; raises SQLSTATE 22023 naming the first invalid field (for example gates[1].per) and the rule it breaks.';

CREATE FUNCTION dispatch_policy.declare_policy(name text, config jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy.validate_policy(declare_policy.name, declare_policy.config);
  INSERT INTO dispatch_policy.policies AS p (name, config)
  VALUES (declare_policy.name, declare_policy.config)
  ON CONFLICT ON CONSTRAINT policies_pkey
  DO UPDATE SET config = EXCLUDED.config, updated_at = now()
  WHERE p.config IS DISTINCT FROM EXCLUDED.config;
END
$$;
COMMENT ON FUNCTION dispatch_policy.declare_policy(text, jsonb) IS
  'Creates or replaces a policy after validating its config (SQLSTATE 22023 naming the field on any problem; nothing is stored then). Declaring the same config again changes nothing.';

CREATE FUNCTION dispatch_policy._require_policy(policy text)
RETURNS dispatch_policy.policies
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
DECLARE
  found_policy dispatch_policy.policies;
BEGIN
  SELECT * INTO found_policy FROM dispatch_policy.policies p WHERE p.name = _require_policy.policy;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown policy: %', coalesce(quote_literal(_require_policy.policy), 'NULL')
      USING ERRCODE = '42704',
            HINT = 'Declare it first with dispatch_policy.declare_policy(name, config) or "dispatch-policy policy apply FILE".';
  END IF;
  RETURN found_policy;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_policy(text) IS
  'Internal: the policy row, or SQLSTATE 42704 when no such policy is declared.';

CREATE FUNCTION dispatch_policy.pause(policy text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_policy(pause.policy);
  UPDATE dispatch_policy.policies p SET paused = true, updated_at = now()
  WHERE p.name = pause.policy AND NOT p.paused;
END
$$;
COMMENT ON FUNCTION dispatch_policy.pause(text) IS
  'Stops admission for a policy; staging continues. Unknown policy: SQLSTATE 42704.';

CREATE FUNCTION dispatch_policy.resume(policy text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_policy(resume.policy);
  UPDATE dispatch_policy.policies p SET paused = false, updated_at = now()
  WHERE p.name = resume.policy AND p.paused;
  IF FOUND THEN
    PERFORM pg_notify('dispatch_policy_staged', resume.policy);
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.resume(text) IS
  'Resumes admission for a paused policy and wakes listening runners. Unknown policy: SQLSTATE 42704.';
