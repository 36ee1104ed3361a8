-- Why a job waits (issue 10): dispatch_policy.explain(id).

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

CREATE FUNCTION dispatch_policy.explain(id bigint)
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
  estimate double precision := 0;
  estimable boolean := true;
  reasons text[] := '{}';
  a dispatch_policy.adaptive_stats;
  initial integer;
  ceiling integer;
  floor_ integer;
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
  IF pol.name IS NULL THEN
    RETURN QUERY SELECT 'policy'::text, NULL::text, NULL::text, 'waits'::text,
      format('policy %s is not declared: nothing admits this job until it is', quote_literal(j.policy)), NULL::float8;
    RETURN;
  END IF;
  IF pol.paused THEN
    waits := true; estimable := false; reasons := array_append(reasons, 'the policy is paused'::text);
    RETURN QUERY SELECT 'policy'::text, NULL::text, NULL::text, 'waits'::text,
      'the policy is paused: nothing is admitted until dispatch_policy.resume(policy)'::text, NULL::float8;
  END IF;
  IF j.not_before > at THEN
    waits := true; estimate := greatest(estimate, extract(epoch FROM j.not_before - at));
    reasons := array_append(reasons, 'scheduled for later'::text);
    RETURN QUERY SELECT 'schedule'::text, NULL::text, NULL::text, 'waits'::text,
      format('scheduled: not before %s', j.not_before), extract(epoch FROM j.not_before - at)::float8;
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
    waits := true;
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
                WHEN ln.blocked_until = 'infinity' AND ln.blocked_gate IS NOT NULL
                  THEN format(', blocked by %s partition %s until it has room (a slot released, a config change)',
                              ln.blocked_gate, quote_literal(ln.blocked_partition))
                WHEN ln.blocked_until > at AND ln.blocked_gate IS NOT NULL
                  THEN format(', blocked until %s by %s partition %s', ln.blocked_until, ln.blocked_gate, quote_literal(ln.blocked_partition))
                WHEN ln.blocked_until > at THEN format(', passed over until %s', ln.blocked_until)
                ELSE ', ready' END,
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
    IF kind = 'throttle' THEN
      SELECT * INTO b FROM dispatch_policy.throttle_buckets t
      WHERE t.policy = j.policy AND t.gate = name AND t.partition = part;
      rate := coalesce(b.rate, dispatch_policy._gate_number(g -> 'rate', j.context, 'throttle.rate'));
      per := coalesce(b.per_seconds, dispatch_policy._gate_number(g -> 'per', j.context, 'throttle.per'));
      burst := coalesce(b.burst, CASE WHEN g ? 'burst' THEN dispatch_policy._gate_number(g -> 'burst', j.context, 'throttle.burst')
                                      ELSE least(greatest(rate, 1), 1000000) END);
      tokens := CASE WHEN b.policy IS NULL THEN burst
                     ELSE dispatch_policy._bucket_tokens(b.tokens, b.rate, b.per_seconds, b.burst, b.refilled_at, at) END;
      SELECT count(*) INTO ahead_in_partition
      FROM unnest(ahead_contexts) AS c(context)
      WHERE dispatch_policy._partition_key(g ->> 'partition_by', c.context) = part;
      at_least := CASE WHEN scanned >= 2000 THEN 'at least ' ELSE '' END;
      -- Seconds until the bucket holds a token for it and for every job of
      -- its partition ahead of it (numeric: a tiny rate must not overflow);
      -- NULL beyond a century.
      IF rate > 0 THEN
        needed := greatest((ahead_in_partition + 1)::numeric - tokens::numeric, 0) * per::numeric / rate::numeric;
        IF needed > 3153600000 THEN needed := NULL; END IF;
        to_token := CASE WHEN tokens >= 1 THEN 0 ELSE (1 - tokens::numeric) * per::numeric / rate::numeric END;
        IF to_token > 3153600000 THEN to_token := NULL; END IF;
      END IF;
      IF rate = 0 THEN
        -- The runner admits nothing through a throttle of rate 0.
        waits := true; estimable := false;
        reasons := array_append(reasons, format('throttle %s has a rate of 0', name)::text);
        RETURN QUERY SELECT 'gate'::text, name, part, 'waits'::text,
          'throttle: a rate of 0 admits nothing (declare a rate above 0)'::text, NULL::float8;
      ELSIF tokens >= 1 THEN
        RETURN QUERY SELECT 'gate'::text, name, part, 'ok'::text,
          format('throttle: %s token(s) of %s now (%s per %s s); %s%s job(s) of this partition ahead of it',
                 round(tokens::numeric, 2), burst, rate, per, at_least, ahead_in_partition), NULL::float8;
      ELSE
        waits := true; reasons := array_append(reasons, format('throttle %s on %s', name, quote_literal(part))::text);
        RETURN QUERY SELECT 'gate'::text, name, part, 'waits'::text,
          format('throttle: %s token(s) of %s (%s per %s s): the next whole token in %s; %s%s job(s) of this partition ahead of it',
                 round(tokens::numeric, 2), burst, rate, per,
                 CASE WHEN to_token IS NULL THEN 'more than a century' ELSE round(to_token, 3) || ' s' END,
                 at_least, ahead_in_partition),
          to_token::float8;
      END IF;
      IF rate > 0 AND ahead_in_partition + 1 > tokens THEN
        IF needed IS NULL THEN
          estimable := false;
        ELSE
          estimate := greatest(estimate, needed::double precision);
          IF tokens >= 1 THEN
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
        cap := coalesce(a.current_max, initial);
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
      RETURN QUERY SELECT 'gate'::text, name, part, CASE WHEN held < cap THEN 'ok' ELSE 'waits' END,
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
    waits := true; estimable := false; reasons := array_append(reasons, 'its ticks fail'::text);
    RETURN QUERY SELECT 'policy'::text, NULL::text, NULL::text, 'waits'::text,
      (SELECT format('the policy''s ticks fail (%s in a row, retry at %s): %s', f.failures, f.retry_at, left(f.error, 300))
       FROM dispatch_policy.runner_failures f WHERE f.policy = j.policy), NULL::float8;
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
  'Why a job is where it is. For a pending or scheduled job, one row per reason (aspect job, policy, schedule, lane, gate, estimate): for each gate of its policy, in its partition, ok or waits with the numbers (tokens now and the time to the next whole token; in flight against the cap; the adaptive cap and EWMA lag), whether it is scheduled or the policy paused or failing, its place in its lane, and an estimated wait in seconds (wait_seconds) where one can be computed (throttles and schedules; a full cap has none). For an admitted or finished job, one row saying so. P0002 for an id with no job.';
