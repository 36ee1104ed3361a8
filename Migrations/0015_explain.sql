-- Why a job waits (issue 10): dispatch_policy.explain(id). (explain: its one
-- definition in 0.2.0 is in 0025_shadow.sql; the helpers are here.)

-- A gate value for a job, resolved as the runner resolves it
-- (GateValue.value(in:within:) in Swift): a number is clamped into the
-- field's bounds; {"context": key, "default": d} uses the job's context value
-- when it is a JSON number (or a string holding one) that the config would
-- accept for the field, else the default.
CREATE FUNCTION dispatch_policy._gate_number(value jsonb, context jsonb, field text)
RETURNS double precision
LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  WITH l AS (
    SELECT x.minimum, x.maximum FROM dispatch_policy.limits() x WHERE x.field = _gate_number.field
  ), given AS (
    SELECT CASE WHEN jsonb_typeof(value) = 'object'
                THEN dispatch_policy._context_text(context -> (value ->> 'context')) END AS text
  ), trimmed AS (
    -- Unicode White_Space at either end, as the runner trims it.
    SELECT regexp_replace(g.text,
             '^[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+|[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$',
             '', 'g') AS text
    FROM given g
  ), parsed AS (
    -- A JSON number's form only (no hexadecimal, inf or nan). An exponent of
    -- more than four digits (after leading zeros) is beyond every bound:
    -- the runner's double overflows or underflows there, and so would numeric.
    SELECT CASE WHEN t.text ~ '^-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$'
                 AND length(coalesce(substring(t.text FROM '[eE][+-]?0*([0-9]+)$'), '')) <= 4
                THEN t.text::numeric END AS n
    FROM trimmed t
  )
  SELECT CASE
           WHEN jsonb_typeof(value) = 'object' AND dispatch_policy._within_limit(p.n, _gate_number.field)
             THEN p.n::double precision
           ELSE least(greatest(dispatch_policy._json_number(
                  CASE WHEN jsonb_typeof(value) = 'object' THEN value -> 'default' ELSE value END), l.minimum), l.maximum)::double precision
         END
  FROM parsed p, l
$$;
COMMENT ON FUNCTION dispatch_policy._gate_number(jsonb, jsonb, text) IS
  'Internal: a gate field''s value (a number, or {"context": key, "default": d}) for a job context, within the bounds limits() gives field: what the runner uses.';

