-- dispatch-policy: gate state that stays true.
--
-- * Every statement that changes gate state takes all its rows in one
--   statement sorted by (policy, gate, partition): completion, failure and the
--   lease reaper can no longer deadlock with each other or with a tick.
-- * Worker calls are fenced by attempt: a stale worker cannot finish, fail or
--   extend a later attempt of its job.
-- * A job keeps the lease length it was admitted with, and whether a worker
--   may claim it (ready queue) or it was handed to another queue (sql).
-- * Redeclaring a policy rebuilds its in-flight counters from the admitted
--   jobs under the new config, in the same transaction.
-- * Jobs without a round-robin key get a lane of their own in the rotation,
--   and the rotation moves past what a tick actually served.

-- A policy setting with its limits() default.
CREATE FUNCTION dispatch_policy._policy_setting(config jsonb, field text)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(dispatch_policy._json_number(config -> field),
                  (SELECT l.default_value FROM dispatch_policy.limits() l WHERE l.field = _policy_setting.field))::integer
$$;
COMMENT ON FUNCTION dispatch_policy._policy_setting(jsonb, text) IS
  'Internal: an integer policy setting (lease_seconds, max_attempts, batch_size, round_robin_quantum) from the config, else its limits() default.';

-- A bound as a constant: IMMUTABLE, so a CHECK constraint or a query folds
-- it once instead of looking it up per row.
CREATE FUNCTION dispatch_policy._limit_max(field text)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT l.maximum FROM dispatch_policy.limits() l WHERE l.field = _limit_max.field
$$;
COMMENT ON FUNCTION dispatch_policy._limit_max(text) IS
  'Internal: the maximum limits() gives for field.';

-- Every function that takes `now` from its caller checks it: an infinite
-- time stored once (an observation, a staged_at) would break every later
-- tick or view.
CREATE FUNCTION dispatch_policy._require_now(now timestamptz)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  IF now IS NULL OR NOT isfinite(now) THEN
    RAISE EXCEPTION 'now must be a finite time'
      USING ERRCODE = '22023', DETAIL = format('now is %s.', coalesce(now::text, 'NULL')),
            HINT = 'Leave it out: it defaults to now(). Nothing was changed.';
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_now(timestamptz) IS
  'Internal: raises 22023 unless the now a caller passed is a finite time.';

-- The single-writer lock of a policy's tick: a 64-bit key, so two policies
-- practically never share one (hashtext's 32 bits collide among a few
-- thousand names).
CREATE FUNCTION dispatch_policy._tick_lock_key(policy text)
RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT hashtextextended('dispatch_policy.tick.' || policy, 0)
$$;
COMMENT ON FUNCTION dispatch_policy._tick_lock_key(text) IS
  'Internal: the advisory-lock key of a policy''s tick (try_lock_policy, and redeclare waiting for a running tick).';

CREATE OR REPLACE FUNCTION dispatch_policy.try_lock_policy(policy text)
RETURNS boolean
LANGUAGE sql VOLATILE STRICT SECURITY INVOKER
AS $$
  SELECT pg_try_advisory_xact_lock(dispatch_policy._tick_lock_key(try_lock_policy.policy))
$$;

-- promote_scheduled checks now (_require_now). (Its one definition in 0.2.0
-- is in 0026_admit_integrity.sql.)

-- The gates whose partitions hold a slot until the job finishes.
CREATE FUNCTION dispatch_policy._slot_gates(config jsonb)
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(array_agg(coalesce(g ->> 'name', g ->> 'type')), '{}')
  FROM jsonb_array_elements(coalesce(config -> 'gates', '[]'::jsonb)) AS g
  WHERE g ->> 'type' IN ('concurrency', 'global_cap', 'adaptive_concurrency')
$$;
COMMENT ON FUNCTION dispatch_policy._slot_gates(jsonb) IS
  'Internal: names of the gates of a config whose partitions admitted jobs hold a slot in (concurrency, global_cap, adaptive_concurrency).';

CREATE FUNCTION dispatch_policy._gates_of_type(config jsonb, gate_type text)
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(array_agg(coalesce(g ->> 'name', g ->> 'type')), '{}')
  FROM jsonb_array_elements(coalesce(config -> 'gates', '[]'::jsonb)) AS g
  WHERE g ->> 'type' = gate_type
$$;
COMMENT ON FUNCTION dispatch_policy._gates_of_type(jsonb, text) IS
  'Internal: names of the gates of one type in a config.';

-- Admitted jobs: the lease they were admitted with, and their target.
ALTER TABLE dispatch_policy.admitted_jobs ADD COLUMN lease_seconds integer, ADD COLUMN target text;
UPDATE dispatch_policy.admitted_jobs a
SET lease_seconds = dispatch_policy._policy_setting(p.config, 'lease_seconds'),
    target = CASE WHEN p.config -> 'target' ->> 'type' = 'sql' THEN 'sql' ELSE 'ready_queue' END
FROM (SELECT a2.id, p2.config FROM dispatch_policy.admitted_jobs a2
      LEFT JOIN dispatch_policy.policies p2 ON p2.name = a2.policy) p
WHERE p.id = a.id;
ALTER TABLE dispatch_policy.admitted_jobs
  ALTER COLUMN lease_seconds SET NOT NULL,
  ALTER COLUMN target SET NOT NULL,
  ADD CONSTRAINT admitted_jobs_lease_seconds_check CHECK (lease_seconds BETWEEN 1 AND 31536000),
  ADD CONSTRAINT admitted_jobs_target_check CHECK (target IN ('ready_queue', 'sql'));
COMMENT ON COLUMN dispatch_policy.admitted_jobs.lease_seconds IS
  'The lease this attempt was admitted with (the policy''s lease_seconds, else the runner''s): claim, started and heartbeat extend the lease by it.';
COMMENT ON COLUMN dispatch_policy.admitted_jobs.target IS
  '''ready_queue'': claimable with claim(); ''sql'': handed to the policy''s sql target function at admission (never claimable).';
COMMENT ON COLUMN dispatch_policy.admitted_jobs.partitions IS
  'Gate name -> partition key of this job for every gate of its policy. The entries of slot-holding gates (concurrency, global_cap, adaptive_concurrency) are the slots completion releases; redeclaring the policy recomputes them.';
-- Jobs admitted before recorded their slots only. Their other gates'
-- partitions (throttle, fair_interleave) are added as admission renders
-- them, so that what reads a job's partitions (partition_overview's jobs in
-- flight per partition, the history per partition) counts these jobs too.
-- The slots stay as recorded: the counters count them.
UPDATE dispatch_policy.admitted_jobs a
SET partitions = (SELECT coalesce(jsonb_object_agg(g.key, g.value), '{}'::jsonb)
                  FROM jsonb_each(dispatch_policy._gate_partitions(p.config, a.context)) AS g
                  WHERE NOT (g.key = ANY (dispatch_policy._slot_gates(p.config)))) || a.partitions
FROM dispatch_policy.policies p
WHERE p.name = a.policy AND jsonb_typeof(a.partitions) = 'object' AND jsonb_typeof(a.context) = 'object';
DROP INDEX dispatch_policy.admitted_jobs_claim_idx;
CREATE INDEX admitted_jobs_claim_idx
  ON dispatch_policy.admitted_jobs (queue, priority, id)
  WHERE started_at IS NULL AND target = 'ready_queue';
-- A policy's expired leases are one index range: the runner probes it every
-- pass and reap_leases(policy) walks it, whatever other policies hold.
DROP INDEX dispatch_policy.admitted_jobs_policy_idx;
CREATE INDEX admitted_jobs_policy_idx
  ON dispatch_policy.admitted_jobs (policy, lease_expires_at);

-- One index serves every lane, keyed or not: jobs without a round-robin key
-- (NULL sorts last) have a lane of their own in the rotation.
DROP INDEX dispatch_policy.staged_jobs_round_robin_idx;
CREATE INDEX staged_jobs_round_robin_idx
  ON dispatch_policy.staged_jobs (policy, round_robin_key, priority, id)
  WHERE not_before IS NULL;

-- ---------------------------------------------------------------------------
-- Releasing slots, recording outcomes: set-based, counters locked in order.

DROP FUNCTION dispatch_policy._fail_attempt(dispatch_policy.admitted_jobs, text, interval, timestamptz);
DROP FUNCTION dispatch_policy._release_slots(text, jsonb, timestamptz);
DROP FUNCTION dispatch_policy._observe(dispatch_policy.admitted_jobs, boolean, timestamptz);

CREATE FUNCTION dispatch_policy._release_slots(jobs dispatch_policy.admitted_jobs[], now timestamptz,
                                               restaged boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  -- One statement locks every counter the jobs hold, in (policy, gate,
  -- partition) order, as every other writer does; then one update.
  PERFORM 1 FROM dispatch_policy.inflight_counters c
  WHERE (c.policy, c.gate, c.partition) IN (
    SELECT j.policy, s.key, s.value FROM unnest(jobs) AS j, jsonb_each_text(j.partitions) AS s)
  ORDER BY c.policy, c.gate, c.partition
  FOR UPDATE;
  -- Jobs about to be staged again (a retry, a deferral): the backlog
  -- counter rows of their lanes (0023, capped policies) next, sorted as
  -- stagers sort them, before the update below unblocks lanes (a trigger
  -- writes dispatch_policy.lanes). Every path so takes in-flight counters,
  -- then backlog counters, then lanes (found by hostile testing: a fail()
  -- holding a lanes row waited for the counter of a replacing stager, which
  -- waited for that lanes row). The table exists from 0023 on; this body
  -- runs only once every migration is applied.
  IF restaged THEN
    PERFORM 1 FROM dispatch_policy.backlog_counters b
    WHERE EXISTS (SELECT 1 FROM unnest(jobs) AS j WHERE j.policy = b.policy AND j.round_robin_key IS NOT DISTINCT FROM b.lane)
    ORDER BY b.policy, b.lane NULLS LAST
    FOR UPDATE;
  END IF;
  UPDATE dispatch_policy.inflight_counters c
  SET in_flight = greatest(c.in_flight - h.n, 0), updated_at = _release_slots.now
  FROM (SELECT j.policy, s.key AS gate, s.value AS partition, count(*)::integer AS n
        FROM unnest(jobs) AS j, jsonb_each_text(j.partitions) AS s
        GROUP BY 1, 2, 3) h
  WHERE c.policy = h.policy AND c.gate = h.gate AND c.partition = h.partition;
  PERFORM pg_notify('dispatch_policy_released', x.policy)
  FROM (SELECT DISTINCT j.policy FROM unnest(jobs) AS j) x;
END
$$;
COMMENT ON FUNCTION dispatch_policy._release_slots(dispatch_policy.admitted_jobs[], timestamptz, boolean) IS
  'Internal: gives back the slots of many jobs: locks every counter they hold in one statement sorted by (policy, gate, partition), then (restaged: jobs a retry or a deferral stages again) the backlog counter rows of their lanes, sorted, then decrements (which unblocks lanes); wakes runners (NOTIFY dispatch_policy_released). The lock order of every path: in-flight counters, staged jobs by id, backlog counters, lanes.';

CREATE FUNCTION dispatch_policy._observe(jobs dispatch_policy.admitted_jobs[], success boolean, now timestamptz)
RETURNS void
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  INSERT INTO dispatch_policy.observations (policy, gate, partition, job_id, lag_ms, success, observed_at)
  SELECT j.policy, s.key, s.value, j.id,
         greatest(extract(epoch FROM coalesce(j.started_at, now) - j.admitted_at) * 1000, 0), success, now
  FROM unnest(jobs) AS j
  JOIN dispatch_policy.policies p ON p.name = j.policy
  CROSS JOIN LATERAL jsonb_each_text(j.partitions) AS s
  WHERE s.key = ANY (dispatch_policy._gates_of_type(p.config, 'adaptive_concurrency'))
  ORDER BY j.id, s.key
$$;
COMMENT ON FUNCTION dispatch_policy._observe(dispatch_policy.admitted_jobs[], boolean, timestamptz) IS
  'Internal: records the queue lag (started_at - admitted_at, or until now when never started) of finished attempts for each adaptive gate of their policy.';

-- Ends failed attempts (already removed from admitted_jobs): release,
-- record, then re-stage with backoff or keep as dead.
CREATE FUNCTION dispatch_policy._fail_attempts(jobs dispatch_policy.admitted_jobs[], error text, retry_in interval, now timestamptz)
RETURNS TABLE (id bigint, state text)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  message text := left(coalesce(_fail_attempts.error, 'failed'),
                       (SELECT l.maximum FROM dispatch_policy.limits() l WHERE l.field = 'fail.error')::integer);
BEGIN
  PERFORM dispatch_policy._release_slots(jobs, _fail_attempts.now, restaged => true);
  PERFORM dispatch_policy._observe(jobs, false, _fail_attempts.now);
  INSERT INTO dispatch_policy.job_failures (job_id, policy, attempt, error, failed_at)
  SELECT j.id, j.policy, j.attempt, message, _fail_attempts.now FROM unnest(jobs) AS j ORDER BY j.id;

  RETURN QUERY
  WITH fate AS (
    SELECT j.*, j.attempt >= dispatch_policy._policy_setting(p.config, 'max_attempts') AS dead
    FROM unnest(jobs) AS j
    LEFT JOIN dispatch_policy.policies p ON p.name = j.policy
  ), buried AS (
    INSERT INTO dispatch_policy.finished_jobs
      (id, policy, queue, priority, args, context, dedupe_key, attempts, status, last_error, created_at, admitted_at,
       started_at, finished_at)
    SELECT f.id, f.policy, f.queue, f.priority, f.args, f.context, f.dedupe_key, f.attempt, 'dead', message,
           f.created_at, f.admitted_at, f.started_at, _fail_attempts.now
    FROM fate f WHERE f.dead
    ORDER BY f.id
    RETURNING finished_jobs.id
  ), freed AS (
    DELETE FROM dispatch_policy.dedupe_keys d
    USING fate f
    WHERE f.dead AND f.dedupe_key IS NOT NULL
      AND d.policy = f.policy AND d.dedupe_key = f.dedupe_key AND d.job_id = f.id
  ), restaged AS (
    -- Retries go back through admission, so they respect every gate.
    INSERT INTO dispatch_policy.staged_jobs
      (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, attempt, created_at,
       staged_at, last_error)
    SELECT f.id, f.policy, f.queue, f.priority, f.args, f.context, f.dedupe_key, f.round_robin_key,
           _fail_attempts.now + coalesce(retry_in, least(power(2, least(f.attempt, 30)), 3600) * interval '1 second'),
           f.attempt + 1, f.created_at, _fail_attempts.now, message
    FROM fate f WHERE NOT f.dead
    ORDER BY f.id
    RETURNING staged_jobs.id
  )
  SELECT b.id, 'dead'::text FROM buried b
  UNION ALL
  SELECT r.id, 'retrying'::text FROM restaged r;

  PERFORM pg_notify('dispatch_policy_staged', x.policy)
  FROM (SELECT DISTINCT j.policy FROM unnest(jobs) AS j) x;
END
$$;
COMMENT ON FUNCTION dispatch_policy._fail_attempts(dispatch_policy.admitted_jobs[], text, interval, timestamptz) IS
  'Internal: ends failed attempts removed from admitted_jobs: releases their slots (one sorted statement), records failures and failed observations, re-stages each job after retry_in (default 2^attempt s, at most an hour) or, after max_attempts, keeps it as dead. Returns each job''s state: retrying or dead.';

-- Why a worker call found no admitted attempt (the attempt, when given, is
-- not the one admitted now): the one rule complete, complete_many, fail,
-- heartbeat and started report by.
CREATE FUNCTION dispatch_policy._attempt_status(id bigint, attempt integer)
RETURNS TABLE (outcome text, detail text)
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
DECLARE
  current_attempt integer;
  finished record;
BEGIN
  SELECT a.attempt INTO current_attempt FROM dispatch_policy.admitted_jobs a WHERE a.id = _attempt_status.id;
  IF FOUND THEN
    RETURN QUERY SELECT 'stale'::text,
      format('Attempt %s holds the job now: the lease of attempt %s ran out and the job was admitted again.',
             current_attempt, _attempt_status.attempt);
    RETURN;
  END IF;
  SELECT s.attempt INTO current_attempt FROM dispatch_policy.staged_jobs s WHERE s.id = _attempt_status.id;
  IF FOUND THEN
    IF _attempt_status.attempt IS NOT NULL THEN
      RETURN QUERY SELECT 'stale'::text,
        format('The job waits for admission as attempt %s (its lease ran out, or it failed).', current_attempt);
    ELSE
      RETURN QUERY SELECT 'not_admitted'::text, 'It is staged, waiting for admission (or for a retry).'::text;
    END IF;
    RETURN;
  END IF;
  SELECT f.status, f.attempts INTO finished FROM dispatch_policy.finished_jobs f WHERE f.id = _attempt_status.id;
  IF FOUND THEN
    IF _attempt_status.attempt IS NULL OR (finished.status = 'completed' AND _attempt_status.attempt = finished.attempts) THEN
      RETURN QUERY SELECT 'already_finished'::text, 'It has already finished.'::text;
    ELSE
      RETURN QUERY SELECT 'stale'::text,
        format('The job already finished: %s after attempt %s.', finished.status, finished.attempts);
    END IF;
    RETURN;
  END IF;
  RETURN QUERY SELECT 'not_admitted'::text, 'No job has this id.'::text;
END
$$;
COMMENT ON FUNCTION dispatch_policy._attempt_status(bigint, integer) IS
  'Internal: why job id (attempt, when given) is not admitted now: already_finished (the job finished; with attempt, that attempt completed), stale (another attempt holds the job, or it waits, or it finished otherwise) or not_admitted (staged without attempt, or unknown), with a detail.';

-- _raise_not_admitted raises the documented error for a worker call that
-- found no admitted attempt (it is defined once in 0.2.0, in
-- 0023_staging_rules.sql).

-- Ends completed attempts (already removed from admitted_jobs).
CREATE FUNCTION dispatch_policy._complete_attempts(jobs dispatch_policy.admitted_jobs[], now timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._release_slots(jobs, _complete_attempts.now);
  PERFORM dispatch_policy._observe(jobs, true, _complete_attempts.now);
  INSERT INTO dispatch_policy.finished_jobs
    (id, policy, queue, priority, args, context, dedupe_key, attempts, status, created_at, admitted_at, started_at, finished_at)
  SELECT j.id, j.policy, j.queue, j.priority, j.args, j.context, j.dedupe_key, j.attempt, 'completed',
         j.created_at, j.admitted_at, j.started_at, _complete_attempts.now
  FROM unnest(jobs) AS j ORDER BY j.id;
  DELETE FROM dispatch_policy.dedupe_keys d
  USING unnest(jobs) AS j
  WHERE j.dedupe_key IS NOT NULL AND d.policy = j.policy AND d.dedupe_key = j.dedupe_key AND d.job_id = j.id;
END
$$;
COMMENT ON FUNCTION dispatch_policy._complete_attempts(dispatch_policy.admitted_jobs[], timestamptz) IS
  'Internal: ends completed attempts removed from admitted_jobs: releases their slots (one sorted statement), records their queue lag for adaptive gates, keeps them in finished_jobs and frees their dedupe keys.';

DROP FUNCTION dispatch_policy.complete(bigint, timestamptz);
CREATE FUNCTION dispatch_policy.complete(id bigint, now timestamptz DEFAULT now(), attempt integer DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  job dispatch_policy.admitted_jobs;
BEGIN
  PERFORM dispatch_policy._require_now(complete.now);
  DELETE FROM dispatch_policy.admitted_jobs a
  WHERE a.id = complete.id AND (complete.attempt IS NULL OR a.attempt = complete.attempt)
  RETURNING a.* INTO job;
  IF NOT FOUND THEN
    -- Completing a completed attempt again changes nothing.
    IF (SELECT s.outcome FROM dispatch_policy._attempt_status(complete.id, complete.attempt) s) = 'already_finished' THEN
      RETURN false;
    END IF;
    PERFORM dispatch_policy._raise_not_admitted(complete.id, complete.attempt);
  END IF;
  PERFORM dispatch_policy._complete_attempts(ARRAY[job], complete.now);
  RETURN true;
END
$$;
COMMENT ON FUNCTION dispatch_policy.complete(bigint, timestamptz, integer) IS
  'Finishes an admitted job: releases every slot it holds, records its queue lag for adaptive gates, frees its dedupe key, keeps it in finished_jobs; true. Completing it again returns false and changes nothing. With attempt (from claim; complete(id, attempt => n)) only that attempt is completed: SQLSTATE DP001 when it is not the current one (its lease ran out), and nothing changes. P0002 when the job is not admitted. To finish many jobs in one call, see complete_many.';

CREATE FUNCTION dispatch_policy.complete_many(ids bigint[], attempts integer[], now timestamptz DEFAULT now())
RETURNS TABLE (id bigint, outcome text)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  done dispatch_policy.admitted_jobs[];
BEGIN
  PERFORM dispatch_policy._require_now(complete_many.now);
  IF ids IS NULL OR attempts IS NULL OR cardinality(ids) <> cardinality(attempts) THEN
    RAISE EXCEPTION 'ids and attempts must be arrays of the same length'
      USING ERRCODE = '22023', HINT = 'Pass each job''s attempt (NULL: whichever attempt is current). Nothing was changed.';
  END IF;
  IF NOT dispatch_policy._within_limit(cardinality(ids), 'complete_many.jobs') THEN
    RAISE EXCEPTION 'ids must hold at most % jobs', dispatch_policy._limit_max('complete_many.jobs')
      USING ERRCODE = '22023', DETAIL = format('%s ids were given.', cardinality(ids)), HINT = 'Nothing was changed.';
  END IF;
  IF array_ndims(ids) > 1 OR array_ndims(attempts) > 1 THEN
    RAISE EXCEPTION 'ids and attempts must be one-dimensional arrays'
      USING ERRCODE = '22023', HINT = 'Nothing was changed.';
  END IF;
  IF array_position(ids, NULL) IS NOT NULL THEN
    RAISE EXCEPTION 'ids must not contain NULL'
      USING ERRCODE = '22004', DETAIL = format('Element %s is NULL.', array_position(ids, NULL)), HINT = 'Nothing was changed.';
  END IF;
  -- Rows in id order, as every multi-job writer locks them.
  PERFORM 1 FROM dispatch_policy.admitted_jobs a WHERE a.id = ANY (ids) ORDER BY a.id FOR UPDATE;
  WITH gone AS (
    DELETE FROM dispatch_policy.admitted_jobs a
    USING unnest(ids, attempts) AS r(id, attempt)
    WHERE a.id = r.id AND (r.attempt IS NULL OR a.attempt = r.attempt)
    RETURNING a
  )
  SELECT coalesce(array_agg(g.a ORDER BY (g.a).id), '{}') INTO done FROM gone g;
  PERFORM dispatch_policy._complete_attempts(done, complete_many.now);
  RETURN QUERY
  SELECT r.id,
         CASE WHEN r.id IN (SELECT d.id FROM unnest(done) AS d) THEN 'completed'
              ELSE (SELECT s.outcome FROM dispatch_policy._attempt_status(r.id, r.attempt) s) END
  FROM (SELECT DISTINCT ON (u.id) u.id, u.attempt FROM unnest(ids, attempts) AS u(id, attempt) ORDER BY u.id, u.attempt) r
  ORDER BY r.id;
END
$$;
COMMENT ON FUNCTION dispatch_policy.complete_many(bigint[], integer[], timestamptz) IS
  'Finishes many admitted jobs in one call, as complete() each, in one transaction: slots released in one sorted statement. attempts[i] is the attempt of ids[i] (NULL: whichever is current). Returns one row per distinct id: completed, already_finished (the job had finished: with an attempt, that attempt completed; nothing changes, as complete() returns false), stale (another attempt holds the job: DP001 for complete) or not_admitted (P0002 for complete); only completed rows change anything. Up to 10000 ids; 22023 when the arrays differ in length or are not one-dimensional, 22004 for a NULL id.';

DROP FUNCTION dispatch_policy.fail(bigint, text, interval, timestamptz);
CREATE FUNCTION dispatch_policy.fail(
  id bigint, error text, retry_in interval DEFAULT NULL, now timestamptz DEFAULT now(), attempt integer DEFAULT NULL
)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  job dispatch_policy.admitted_jobs;
BEGIN
  PERFORM dispatch_policy._require_now(fail.now);
  IF retry_in IS NOT NULL AND NOT dispatch_policy._within_limit(extract(epoch FROM retry_in), 'fail.retry_in') THEN
    RAISE EXCEPTION 'retry_in %', dispatch_policy._limit_rule('fail.retry_in')
      USING ERRCODE = '22023', DETAIL = format('retry_in is %s seconds.', trim_scale(extract(epoch FROM retry_in))),
            HINT = 'Nothing was changed.';
  END IF;
  DELETE FROM dispatch_policy.admitted_jobs a
  WHERE a.id = fail.id AND (fail.attempt IS NULL OR a.attempt = fail.attempt)
  RETURNING a.* INTO job;
  IF NOT FOUND THEN
    PERFORM dispatch_policy._raise_not_admitted(fail.id, fail.attempt);
  END IF;
  RETURN (SELECT f.state FROM dispatch_policy._fail_attempts(ARRAY[job], fail.error, fail.retry_in, fail.now) f);
END
$$;
COMMENT ON FUNCTION dispatch_policy.fail(bigint, text, interval, timestamptz, integer) IS
  'Fails the current attempt of an admitted job: releases its slots, records a failed observation (adaptive caps shrink), and re-stages it through admission after retry_in (0 to 365 days; default exponential backoff) until the policy''s max_attempts, then keeps it as dead. error is kept up to 8192 characters. Returns ''retrying'' or ''dead''. With attempt: DP001 when it is not the current attempt (nothing changes). P0002 when the job is not admitted.';

CREATE OR REPLACE FUNCTION dispatch_policy.reap_leases(policy text DEFAULT NULL, now timestamptz DEFAULT now(), max_rows integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  jobs dispatch_policy.admitted_jobs[];
BEGIN
  PERFORM dispatch_policy._require_now(reap_leases.now);
  -- Jobs a worker is finishing right now are locked: skip them.
  WITH expired AS (
    SELECT a.id FROM dispatch_policy.admitted_jobs a
    WHERE a.lease_expires_at < reap_leases.now AND (reap_leases.policy IS NULL OR a.policy = reap_leases.policy)
    ORDER BY a.lease_expires_at
    LIMIT greatest(max_rows, 0)
    FOR UPDATE SKIP LOCKED
  ), taken AS (
    DELETE FROM dispatch_policy.admitted_jobs a USING expired e WHERE a.id = e.id
    RETURNING a AS job
  )
  SELECT array_agg(t.job ORDER BY (t.job).id) INTO jobs FROM taken t;
  IF jobs IS NULL THEN
    RETURN 0;
  END IF;
  PERFORM 1 FROM dispatch_policy._fail_attempts(jobs, 'lease expired', NULL, reap_leases.now);
  RETURN cardinality(jobs);
END
$$;
COMMENT ON FUNCTION dispatch_policy.reap_leases(text, timestamptz, integer) IS
  'Treats admitted jobs whose lease expired (the worker died) as failed attempts: releases their slots in one sorted statement and re-stages them (or buries them after max_attempts). Skips jobs being finished concurrently. NULL policy: every policy. Returns how many.';

-- claim's arguments within limits(), or 22023 naming the argument.
CREATE FUNCTION dispatch_policy._require_claim_arguments(max integer, worker text, now timestamptz)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_now(now);
  IF NOT coalesce(dispatch_policy._within_limit(max, 'claim.max'), false) THEN
    RAISE EXCEPTION 'max %', dispatch_policy._limit_rule('claim.max')
      USING ERRCODE = '22023', DETAIL = format('max is %s.', coalesce(max::text, 'NULL')), HINT = 'Nothing was claimed.';
  END IF;
  IF octet_length(worker) > (SELECT l.maximum FROM dispatch_policy.limits() l WHERE l.field = 'claim.worker') THEN
    RAISE EXCEPTION 'worker %', dispatch_policy._limit_rule('claim.worker')
      USING ERRCODE = '22023', DETAIL = format('worker is %s bytes long.', octet_length(worker)), HINT = 'Nothing was claimed.';
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_claim_arguments(integer, text, timestamptz) IS
  'Internal: raises 22023 naming max, worker or now when claim() is called outside the limits() bounds.';

DROP FUNCTION dispatch_policy.claim(text, text, integer, timestamptz);
CREATE FUNCTION dispatch_policy.claim(
  queue text, worker text, max integer DEFAULT 1, now timestamptz DEFAULT now(), policies text[] DEFAULT NULL
)
RETURNS TABLE (id bigint, policy text, queue text, args jsonb, context jsonb, attempt integer,
               lease_expires_at timestamptz, lease_seconds integer)
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT dispatch_policy._require_claim_arguments(claim.max, claim.worker, claim.now);
  WITH claimed AS (
    UPDATE dispatch_policy.admitted_jobs a
    SET started_at = claim.now, worker = claim.worker, heartbeat_at = claim.now,
        lease_expires_at = claim.now + make_interval(secs => a.lease_seconds)
    -- By primary key from an array: an IN (subquery) is planned for a generic
    -- LIMIT and joined by a scan of every admitted job.
    WHERE a.id = ANY (ARRAY(SELECT x.id FROM dispatch_policy.admitted_jobs x
                            WHERE x.queue = claim.queue AND x.started_at IS NULL AND x.target = 'ready_queue'
                              AND (claim.policies IS NULL OR x.policy = ANY (claim.policies))
                            ORDER BY x.priority, x.id
                            LIMIT claim.max
                            FOR UPDATE SKIP LOCKED))
    RETURNING a.id, a.policy, a.queue, a.args, a.context, a.attempt, a.lease_expires_at, a.lease_seconds, a.priority
  )
  SELECT c.id, c.policy, c.queue, c.args, c.context, c.attempt, c.lease_expires_at, c.lease_seconds
  FROM claimed c ORDER BY c.priority, c.id;
$$;
COMMENT ON FUNCTION dispatch_policy.claim(text, text, integer, timestamptz, text[]) IS
  'Claims up to max (1 to 10000) admitted, not yet started ready-queue jobs of a queue for a worker (lower priority first, SKIP LOCKED; returned in that order), only of the given policies when policies is not NULL, marking them started (queue lag = started_at - admitted_at) with a fresh lease of the job''s lease_seconds. Jobs handed to a sql target are never claimable. Pass the returned attempt to heartbeat, complete and fail.';

DROP FUNCTION dispatch_policy.heartbeat(bigint, timestamptz);
CREATE FUNCTION dispatch_policy.heartbeat(id bigint, now timestamptz DEFAULT now(), attempt integer DEFAULT NULL)
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  expires timestamptz;
BEGIN
  PERFORM dispatch_policy._require_now(heartbeat.now);
  UPDATE dispatch_policy.admitted_jobs a
  SET heartbeat_at = heartbeat.now, lease_expires_at = heartbeat.now + make_interval(secs => a.lease_seconds)
  WHERE a.id = heartbeat.id AND (heartbeat.attempt IS NULL OR a.attempt = heartbeat.attempt)
  RETURNING a.lease_expires_at INTO expires;
  IF NOT FOUND THEN
    IF heartbeat.attempt IS NULL AND EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s WHERE s.id = heartbeat.id) THEN
      RAISE EXCEPTION 'job % is not admitted', heartbeat.id
        USING ERRCODE = 'P0002', DETAIL = 'Its lease expired and it was re-staged: stop working on it.';
    END IF;
    PERFORM dispatch_policy._raise_not_admitted(heartbeat.id, heartbeat.attempt);
  END IF;
  RETURN expires;
END
$$;
COMMENT ON FUNCTION dispatch_policy.heartbeat(bigint, timestamptz, integer) IS
  'Extends the lease of an admitted job by the lease_seconds it was admitted with and returns the new expiry. With attempt: DP001 when that attempt is no longer current. P0002 when the job is not admitted (finished, re-staged after its lease expired, or unknown). Either way the worker must stop.';

DROP FUNCTION dispatch_policy.started(bigint, timestamptz);
CREATE FUNCTION dispatch_policy.started(id bigint, now timestamptz DEFAULT now(), attempt integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  current_attempt integer;
BEGIN
  PERFORM dispatch_policy._require_now(started.now);
  UPDATE dispatch_policy.admitted_jobs a
  SET started_at = coalesce(a.started_at, started.now), heartbeat_at = started.now,
      lease_expires_at = greatest(a.lease_expires_at, started.now + make_interval(secs => a.lease_seconds))
  WHERE a.id = started.id AND (started.attempt IS NULL OR a.attempt = started.attempt)
  RETURNING a.attempt INTO current_attempt;
  IF NOT FOUND THEN
    PERFORM dispatch_policy._raise_not_admitted(started.id, started.attempt);
  END IF;
  RETURN current_attempt;
END
$$;
COMMENT ON FUNCTION dispatch_policy.started(bigint, timestamptz, integer) IS
  'For jobs handed to another queue: records that a worker started the job (its queue lag feeds the adaptive gate), renews its lease, and returns the attempt, to pass to complete and fail. With attempt: DP001 when that attempt is no longer current. P0002 when the job is not admitted.';

-- ---------------------------------------------------------------------------
-- Redeclaring a policy: in-flight jobs keep counting against the new caps.

CREATE FUNCTION dispatch_policy._rebuild_gate_state(policy text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  config jsonb;
  slot_gates text[];
BEGIN
  SELECT p.config INTO config FROM dispatch_policy.policies p WHERE p.name = _rebuild_gate_state.policy;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  slot_gates := dispatch_policy._slot_gates(config);
  -- Wait for a running tick of the policy; later ticks see the new config.
  PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(_rebuild_gate_state.policy));

  PERFORM 1 FROM dispatch_policy.admitted_jobs a WHERE a.policy = _rebuild_gate_state.policy ORDER BY a.id FOR UPDATE;
  UPDATE dispatch_policy.admitted_jobs a SET partitions = n.partitions
  FROM (SELECT a2.id, dispatch_policy._gate_partitions(config, a2.context) AS partitions
        FROM dispatch_policy.admitted_jobs a2 WHERE a2.policy = _rebuild_gate_state.policy) n
  WHERE a.id = n.id AND a.partitions IS DISTINCT FROM n.partitions;

  PERFORM 1 FROM dispatch_policy.inflight_counters c WHERE c.policy = _rebuild_gate_state.policy
  ORDER BY c.policy, c.gate, c.partition FOR UPDATE;
  WITH held AS (
    SELECT s.key AS gate, s.value AS partition, count(*)::integer AS n
    FROM dispatch_policy.admitted_jobs a, jsonb_each_text(a.partitions) AS s
    WHERE a.policy = _rebuild_gate_state.policy AND s.key = ANY (slot_gates)
    GROUP BY 1, 2
  )
  UPDATE dispatch_policy.inflight_counters c
  SET in_flight = coalesce((SELECT h.n FROM held h WHERE h.gate = c.gate AND h.partition = c.partition), 0),
      updated_at = now()
  WHERE c.policy = _rebuild_gate_state.policy;
  INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight, updated_at)
  SELECT _rebuild_gate_state.policy, s.key, s.value, count(*), now()
  FROM dispatch_policy.admitted_jobs a, jsonb_each_text(a.partitions) AS s
  WHERE a.policy = _rebuild_gate_state.policy AND s.key = ANY (slot_gates)
  GROUP BY 2, 3
  ORDER BY 2, 3
  ON CONFLICT ON CONSTRAINT inflight_counters_pkey DO NOTHING;
  DELETE FROM dispatch_policy.inflight_counters c
  WHERE c.policy = _rebuild_gate_state.policy AND NOT (c.gate = ANY (slot_gates));

  -- State of gates that are gone (or changed type).
  DELETE FROM dispatch_policy.adaptive_stats a
  WHERE a.policy = _rebuild_gate_state.policy
    AND NOT (a.gate = ANY (dispatch_policy._gates_of_type(config, 'adaptive_concurrency')));
  DELETE FROM dispatch_policy.observations o
  WHERE o.policy = _rebuild_gate_state.policy
    AND NOT (o.gate = ANY (dispatch_policy._gates_of_type(config, 'adaptive_concurrency')));
  DELETE FROM dispatch_policy.throttle_buckets t
  WHERE t.policy = _rebuild_gate_state.policy
    AND NOT (t.gate = ANY (dispatch_policy._gates_of_type(config, 'throttle')));
END
$$;
COMMENT ON FUNCTION dispatch_policy._rebuild_gate_state(text) IS
  'Internal: after a policy''s config changed, waits for its running tick, recomputes every admitted job''s partitions under the new config and sets the in-flight counters to what those jobs hold, so in-flight jobs keep counting against the new caps; drops state of gates that are gone. Throttle buckets of unchanged gates and templates are kept.';

CREATE FUNCTION dispatch_policy._policy_config_changed()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  IF OLD.config IS DISTINCT FROM NEW.config THEN
    PERFORM dispatch_policy._rebuild_gate_state(NEW.name);
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._policy_config_changed() IS
  'Internal trigger: rebuilds a policy''s gate state from its admitted jobs when its config changes (declare_policy or a direct UPDATE).';
CREATE TRIGGER policies_config_changed
  AFTER UPDATE OF config ON dispatch_policy.policies
  FOR EACH ROW EXECUTE FUNCTION dispatch_policy._policy_config_changed();

-- declare_policy leaves validation to the policies_validate trigger (0007),
-- and a config it replaces waits for a running tick and has the in-flight
-- counters recomputed (the trigger above). (declare_policy is defined once
-- in 0.2.0, in 0023_staging_rules.sql.)

-- ---------------------------------------------------------------------------
-- Adaptive state: windowed AIMD (see AdaptiveController in the Swift library).

UPDATE dispatch_policy.adaptive_stats SET current_max = least(greatest(current_max, 1), 1000000);
ALTER TABLE dispatch_policy.adaptive_stats
  ADD COLUMN growth_credit double precision NOT NULL DEFAULT 0,
  ADD COLUMN since_decrease bigint NOT NULL DEFAULT 0,
  ADD CONSTRAINT adaptive_stats_current_max_check CHECK (current_max BETWEEN 1 AND 1000000);
COMMENT ON COLUMN dispatch_policy.adaptive_stats.growth_credit IS
  'Successful observations toward the next +1 of current_max (one window = current_max of them).';
COMMENT ON COLUMN dispatch_policy.adaptive_stats.since_decrease IS
  'Observations since current_max last shrank; it shrinks at most once per window of current_max observations.';

-- ---------------------------------------------------------------------------
-- Round-robin: lanes, and a cursor that moves past what was served.

-- fetch_batch returns each job's lane (its place in the rotation; a new
-- result column, so 0.1.0's is dropped first), with a round_robin_quantum
-- from the next lanes after the policy's cursor, interleaved, then the
-- oldest remaining rows (lane 0). (fetch_batch is defined once in 0.2.0,
-- in 0024_cost_weights.sql.)

-- ---------------------------------------------------------------------------
-- Runner failures: a failing policy is shown, not silent.

CREATE TABLE dispatch_policy.runner_failures (
  policy          text PRIMARY KEY,
  error           text NOT NULL,
  sqlstate        text,
  failures        integer NOT NULL DEFAULT 1,
  first_failed_at timestamptz NOT NULL,
  last_failed_at  timestamptz NOT NULL,
  retry_at        timestamptz
);
COMMENT ON TABLE dispatch_policy.runner_failures IS
  'Policies whose last tick failed (a raising sql target, a config the runner cannot read, ...): the runner backs off and retries; a successful tick deletes the row. Shown by policy_overview and "dispatch-policy status".';
COMMENT ON COLUMN dispatch_policy.runner_failures.policy IS 'Policy name.';
COMMENT ON COLUMN dispatch_policy.runner_failures.error IS 'The last error (up to 2000 characters).';
COMMENT ON COLUMN dispatch_policy.runner_failures.sqlstate IS 'Its SQLSTATE, when the database raised it.';
COMMENT ON COLUMN dispatch_policy.runner_failures.failures IS 'Failed ticks in a row (over all runners).';
COMMENT ON COLUMN dispatch_policy.runner_failures.first_failed_at IS 'When the policy started failing.';
COMMENT ON COLUMN dispatch_policy.runner_failures.last_failed_at IS 'When its tick last failed.';
COMMENT ON COLUMN dispatch_policy.runner_failures.retry_at IS 'When the runner that recorded it tries again (capped exponential backoff).';
ALTER TABLE dispatch_policy.runner_failures
  ADD CONSTRAINT runner_failures_times_check
    CHECK (isfinite(first_failed_at) AND isfinite(last_failed_at) AND (retry_at IS NULL OR isfinite(retry_at)));

CREATE FUNCTION dispatch_policy.record_runner_failure(
  policy text, error text, sqlstate text DEFAULT NULL, retry_at timestamptz DEFAULT NULL, now timestamptz DEFAULT now()
)
RETURNS integer
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  SELECT dispatch_policy._require_now(record_runner_failure.now),
         dispatch_policy._require_now(coalesce(record_runner_failure.retry_at, record_runner_failure.now));
  INSERT INTO dispatch_policy.runner_failures AS f (policy, error, sqlstate, failures, first_failed_at, last_failed_at, retry_at)
  VALUES (record_runner_failure.policy, left(coalesce(record_runner_failure.error, 'failed'), 2000),
          record_runner_failure.sqlstate, 1, record_runner_failure.now, record_runner_failure.now, record_runner_failure.retry_at)
  ON CONFLICT ON CONSTRAINT runner_failures_pkey DO UPDATE
  SET error = EXCLUDED.error, sqlstate = EXCLUDED.sqlstate, failures = f.failures + 1,
      last_failed_at = EXCLUDED.last_failed_at, retry_at = EXCLUDED.retry_at
  RETURNING failures
$$;
COMMENT ON FUNCTION dispatch_policy.record_runner_failure(text, text, text, timestamptz, timestamptz) IS
  'Called by a runner after a policy''s tick failed (in its own transaction): records the error and when it retries; returns the failures in a row.';

CREATE FUNCTION dispatch_policy.clear_runner_failure(policy text)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  WITH gone AS (DELETE FROM dispatch_policy.runner_failures f WHERE f.policy = clear_runner_failure.policy RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM gone)
$$;
COMMENT ON FUNCTION dispatch_policy.clear_runner_failure(text) IS
  'Called by a runner after a successful tick of a policy that had failed: deletes its runner_failures row. Returns whether there was one.';

-- ---------------------------------------------------------------------------
-- Maintenance that cannot overflow, waits for nobody, and cleans orphans.
-- (prune: its one definition in 0.2.0 is in 0025_shadow.sql.)

-- ---------------------------------------------------------------------------
-- Stored rows within bounds, also when written directly: a row no function
-- would write (a context that is not an object, a 20 kB queue name, an
-- infinite time) would otherwise fail every tick of its policy, or a view.

-- Jobs already staged that could never be admitted are kept as dead, with
-- the reason, instead of blocking their policy.
WITH bad AS (
  SELECT s.*, CASE
      WHEN jsonb_typeof(s.context) IS DISTINCT FROM 'object' THEN 'its context is not a JSON object'
      WHEN octet_length(s.queue) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.queue') THEN 'its queue name is empty or too long'
      WHEN octet_length(s.dedupe_key) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.dedupe_key') THEN 'its dedupe key is empty or too long'
      WHEN octet_length(s.round_robin_key) > dispatch_policy._limit_max('job.round_robin_key') THEN 'its round-robin key is too long'
      WHEN NOT isfinite(s.staged_at) OR NOT isfinite(s.created_at) OR NOT coalesce(isfinite(s.not_before), true)
        THEN 'a time of it is infinite'
      WHEN s.attempt < 1 THEN 'its attempt is below 1'
    END AS reason
  FROM dispatch_policy.staged_jobs s
), buried AS (
  DELETE FROM dispatch_policy.staged_jobs s USING bad b WHERE s.id = b.id AND b.reason IS NOT NULL
  RETURNING b.*
), kept AS (
  INSERT INTO dispatch_policy.finished_jobs
    (id, policy, queue, priority, args, context, dedupe_key, attempts, status, last_error, created_at, finished_at)
  SELECT b.id, b.policy, b.queue, b.priority, b.args, b.context, b.dedupe_key, greatest(b.attempt, 1), 'dead',
         'could not be admitted: ' || b.reason, CASE WHEN isfinite(b.created_at) THEN b.created_at ELSE now() END, now()
  FROM buried b
  ON CONFLICT DO NOTHING
)
DELETE FROM dispatch_policy.dedupe_keys d USING buried b
WHERE d.policy = b.policy AND d.dedupe_key = b.dedupe_key AND d.job_id = b.id;
DELETE FROM dispatch_policy.observations o WHERE NOT isfinite(o.observed_at) OR NOT (o.lag_ms >= 0 AND o.lag_ms < 'Infinity');
UPDATE dispatch_policy.throttle_buckets SET refilled_at = now() WHERE NOT isfinite(refilled_at);
UPDATE dispatch_policy.adaptive_stats SET ewma_lag_ms = NULL WHERE NOT (ewma_lag_ms >= 0 AND ewma_lag_ms < 'Infinity');
UPDATE dispatch_policy.admitted_jobs SET lease_expires_at = now() WHERE NOT isfinite(lease_expires_at);
UPDATE dispatch_policy.admitted_jobs SET admitted_at = now() WHERE NOT isfinite(admitted_at);
UPDATE dispatch_policy.admitted_jobs SET started_at = now() WHERE NOT isfinite(started_at);
UPDATE dispatch_policy.admitted_jobs SET heartbeat_at = now() WHERE NOT isfinite(heartbeat_at);

ALTER TABLE dispatch_policy.staged_jobs
  ADD CONSTRAINT staged_jobs_context_check CHECK (jsonb_typeof(context) = 'object'),
  ADD CONSTRAINT staged_jobs_queue_check CHECK (octet_length(queue) BETWEEN 1 AND dispatch_policy._limit_max('job.queue')),
  ADD CONSTRAINT staged_jobs_dedupe_key_check
    CHECK (octet_length(dedupe_key) BETWEEN 1 AND dispatch_policy._limit_max('job.dedupe_key')),
  ADD CONSTRAINT staged_jobs_round_robin_key_check
    CHECK (octet_length(round_robin_key) <= dispatch_policy._limit_max('job.round_robin_key')),
  ADD CONSTRAINT staged_jobs_times_check
    CHECK (isfinite(staged_at) AND isfinite(created_at) AND (not_before IS NULL OR isfinite(not_before))),
  ADD CONSTRAINT staged_jobs_attempt_check CHECK (attempt >= 1);
-- Admitted jobs no admission would have written are kept as dead too, and
-- the counters of their policies rebuilt.
WITH bad AS (
  SELECT a.id, a.policy FROM dispatch_policy.admitted_jobs a
  WHERE jsonb_typeof(a.context) IS DISTINCT FROM 'object' OR jsonb_typeof(a.partitions) IS DISTINCT FROM 'object'
     OR octet_length(a.queue) NOT BETWEEN 1 AND 2048 OR a.attempt < 1
     OR NOT isfinite(a.created_at) OR NOT isfinite(a.staged_at)
), gone AS (
  DELETE FROM dispatch_policy.admitted_jobs a USING bad b WHERE a.id = b.id RETURNING a.*
), kept AS (
  INSERT INTO dispatch_policy.finished_jobs
    (id, policy, queue, priority, args, context, dedupe_key, attempts, status, last_error, created_at, finished_at)
  SELECT g.id, g.policy, g.queue, g.priority, g.args, g.context, g.dedupe_key, greatest(g.attempt, 1), 'dead',
         'could not be kept in flight: a field of it is beyond its bounds', now(), now()
  FROM gone g
  ON CONFLICT DO NOTHING
)
SELECT dispatch_policy._rebuild_gate_state(p.policy) FROM (SELECT DISTINCT g.policy FROM gone g) p;

ALTER TABLE dispatch_policy.admitted_jobs
  ADD CONSTRAINT admitted_jobs_context_check CHECK (jsonb_typeof(context) = 'object'),
  ADD CONSTRAINT admitted_jobs_partitions_check CHECK (jsonb_typeof(partitions) = 'object'),
  -- Up to 2048 bytes (an index row holds it): queue names admitted before the 128-byte limit stay.
  ADD CONSTRAINT admitted_jobs_queue_check CHECK (octet_length(queue) BETWEEN 1 AND 2048),
  ADD CONSTRAINT admitted_jobs_attempt_check CHECK (attempt >= 1),
  ADD CONSTRAINT admitted_jobs_times_check
    CHECK (isfinite(created_at) AND isfinite(staged_at) AND isfinite(admitted_at) AND isfinite(lease_expires_at)
           AND (started_at IS NULL OR isfinite(started_at)) AND (heartbeat_at IS NULL OR isfinite(heartbeat_at)));
UPDATE dispatch_policy.policies SET created_at = now() WHERE NOT isfinite(created_at);
UPDATE dispatch_policy.policies SET updated_at = now() WHERE NOT isfinite(updated_at);
ALTER TABLE dispatch_policy.policies
  ADD CONSTRAINT policies_times_check CHECK (isfinite(created_at) AND isfinite(updated_at));
ALTER TABLE dispatch_policy.throttle_buckets
  ADD CONSTRAINT throttle_buckets_refilled_at_check CHECK (isfinite(refilled_at));
ALTER TABLE dispatch_policy.observations
  ADD CONSTRAINT observations_check CHECK (isfinite(observed_at) AND lag_ms >= 0 AND lag_ms < 'Infinity');
ALTER TABLE dispatch_policy.adaptive_stats
  ADD CONSTRAINT adaptive_stats_ewma_check CHECK (ewma_lag_ms >= 0 AND ewma_lag_ms < 'Infinity');

-- ---------------------------------------------------------------------------
-- Views.

-- policy_overview shows failing ticks (runner_failures: failing_since,
-- tick_failures, last_error, retry_at); partition_overview renders
-- partitions as admission does (_gate_partitions), counts in_flight from
-- the admitted jobs for throttle and fair_interleave gates, and refills
-- tokens by _bucket_tokens. (Both views are defined once in 0.2.0, in
-- 0025_shadow.sql.)

