-- Policy lifecycle and backpressure from downstream (issue 12, SQL level).
--
--   drop_policy(name, force)   deletes a policy and all its per-policy state;
--                              refuses (2BP01) while it has staged or
--                              admitted jobs, unless force, which first
--                              finishes every one of them as 'cancelled'
--   defer(id, until, reason, pause_partition, attempt, now)
--                              a worker hands its admitted job back to
--                              staging until `until` without counting an
--                              attempt (HTTP 429 with Retry-After), and
--                              optionally pauses the job's throttle
--                              partitions until then
--   job_deferrals              one row per deferral, as job_failures has one
--                              per failure
--
-- Renaming a policy is not a function: a policy's name is the key of every
-- row of it (jobs, gate state, history, pauses, the lanes), and of its tick
-- and partition advisory locks, so a rename would rewrite all of them under
-- every lock at once and leave runners and stagers that still use the old
-- name staging into nothing. The README says how to move to a new name
-- (declare it, stage into it, let the old one empty, drop it).

-- ---------------------------------------------------------------------------
-- Bounds of defer's arguments, with the others (0007: limits() is the one
-- place; FieldLimits in Swift mirrors it and a test compares the two).
-- (limits: its one definition after 0007 is in 0024_cost_weights.sql.)

-- ---------------------------------------------------------------------------
-- Deferrals: the history of defer(), apart from failures.

CREATE TABLE dispatch_policy.job_deferrals (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  job_id      bigint NOT NULL,
  policy      text NOT NULL,
  attempt     integer NOT NULL,
  reason      text NOT NULL,
  until       timestamptz NOT NULL,
  paused      jsonb,
  deferred_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT job_deferrals_until_check CHECK (isfinite(until)),
  CONSTRAINT job_deferrals_deferred_at_check CHECK (isfinite(deferred_at)),
  CONSTRAINT job_deferrals_paused_check CHECK (paused IS NULL OR jsonb_typeof(paused) = 'object')
);
CREATE INDEX job_deferrals_job_idx ON dispatch_policy.job_deferrals (job_id);
CREATE INDEX job_deferrals_policy_idx ON dispatch_policy.job_deferrals (policy, deferred_at);
COMMENT ON TABLE dispatch_policy.job_deferrals IS
  'One row per deferral (defer(): a worker handed its admitted job back until a time, usually after HTTP 429 with Retry-After). A deferral is not a failure: it is not in job_failures, does not count as an attempt and does not feed the adaptive controller. Deleted by prune() after its retention; kept when the policy is dropped, as the other history.';
COMMENT ON COLUMN dispatch_policy.job_deferrals.id IS 'Deferral id.';
COMMENT ON COLUMN dispatch_policy.job_deferrals.job_id IS 'The job deferred.';
COMMENT ON COLUMN dispatch_policy.job_deferrals.policy IS 'The job''s policy.';
COMMENT ON COLUMN dispatch_policy.job_deferrals.attempt IS 'The attempt that was deferred (the job waits for admission again as the same attempt).';
COMMENT ON COLUMN dispatch_policy.job_deferrals.reason IS 'Why, as the worker said (e.g. ''HTTP 429'').';
COMMENT ON COLUMN dispatch_policy.job_deferrals.until IS 'The job''s new not_before: it is not admitted again before this.';
COMMENT ON COLUMN dispatch_policy.job_deferrals.paused IS 'Gate name -> partition of each throttle partition this deferral paused until at least until (pause_partition => true; ''{}'' when the policy has no partitioned throttle); NULL when no pause was asked for.';
COMMENT ON COLUMN dispatch_policy.job_deferrals.deferred_at IS 'When the job was deferred (the now given to defer).';

-- A dump keeps the deferrals (see 0009_dump.sql).
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'dispatch_policy') THEN
    PERFORM pg_catalog.pg_extension_config_dump('dispatch_policy.job_deferrals'::regclass, '');
    PERFORM pg_catalog.pg_extension_config_dump('dispatch_policy.job_deferrals_id_seq'::regclass, '');
  END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- Pausing a partition for a deferral: pause_partition (0017) that never
-- shortens a pause. An operator's pause without an end, or one that ends
-- later, is kept as it is; otherwise the pause (new, ended, or ending
-- sooner) lasts until `until` with this reason, and the partition's lane is
-- blocked as pause_partition blocks it. The caller holds the tick lock.

CREATE FUNCTION dispatch_policy._extend_partition_pause(
  pol dispatch_policy.policies, gate jsonb, partition text, until timestamptz, reason text, now timestamptz
)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
DECLARE
  gate_name text := coalesce(gate ->> 'name', gate ->> 'type');
BEGIN
  INSERT INTO dispatch_policy.paused_partitions AS pp (policy, gate, partition, until, reason, paused_at)
  VALUES (pol.name, gate_name, _extend_partition_pause.partition, _extend_partition_pause.until,
          dispatch_policy._action_reason(_extend_partition_pause.reason), _extend_partition_pause.now)
  ON CONFLICT ON CONSTRAINT paused_partitions_pkey
  DO UPDATE SET until = EXCLUDED.until, reason = EXCLUDED.reason,
                paused_at = CASE WHEN pp.until <= EXCLUDED.paused_at THEN EXCLUDED.paused_at ELSE pp.paused_at END
  WHERE pp.until IS NOT NULL AND pp.until < EXCLUDED.until;
  IF FOUND AND dispatch_policy._lanes_are_partitions(pol.lane_template, gate) THEN
    PERFORM pg_advisory_xact_lock_shared(dispatch_policy._lanes_lock_key(pol.name));
    INSERT INTO dispatch_policy.lanes AS l (policy, lane, blocked_until, blocked_gate, blocked_partition, updated_at)
    VALUES (pol.name, _extend_partition_pause.partition, _extend_partition_pause.until, gate_name,
            _extend_partition_pause.partition, _extend_partition_pause.now)
    ON CONFLICT (policy, lane)
    DO UPDATE SET blocked_until = EXCLUDED.blocked_until, blocked_gate = EXCLUDED.blocked_gate,
                  blocked_partition = EXCLUDED.blocked_partition, updated_at = EXCLUDED.updated_at
    WHERE l.blocked_until IS NULL OR l.blocked_until < EXCLUDED.blocked_until;
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._extend_partition_pause(dispatch_policy.policies, jsonb, text, timestamptz, text, timestamptz) IS
  'Internal (defer): pauses a partition of a partitioned gate until until, as pause_partition does, but never shortens a pause: one without an end or ending later is kept with its reason. Where the policy''s lanes are the gate''s partitions, blocks the partition''s lane until then (a longer block is kept). The caller holds the policy''s tick lock.';

-- ---------------------------------------------------------------------------
-- defer

CREATE FUNCTION dispatch_policy.defer(
  id bigint, until timestamptz, reason text, pause_partition boolean DEFAULT false, attempt integer DEFAULT NULL,
  now timestamptz DEFAULT now()
)
RETURNS TABLE (state text, not_before timestamptz, paused jsonb)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
DECLARE
  job dispatch_policy.admitted_jobs;
  job_policy text;
  pol dispatch_policy.policies;
  g jsonb;
  part text;
  done jsonb;
BEGIN
  PERFORM dispatch_policy._require_now(defer.now);
  IF defer.id IS NULL OR defer.until IS NULL OR defer.reason IS NULL OR defer.pause_partition IS NULL THEN
    RAISE EXCEPTION 'defer: % must not be NULL',
      CASE WHEN defer.id IS NULL THEN 'id' WHEN defer.until IS NULL THEN 'until' WHEN defer.reason IS NULL THEN 'reason'
           ELSE 'pause_partition' END
      USING ERRCODE = '22004', HINT = 'Nothing was changed.';
  END IF;
  IF NOT isfinite(defer.until) THEN
    RAISE EXCEPTION 'until must be a finite time after now, at most % seconds (30 days) later',
                    trim_scale(dispatch_policy._limit_max('defer.until'))
      USING ERRCODE = '22023', DETAIL = format('until is %s.', defer.until), HINT = 'Nothing was changed.';
  END IF;
  IF NOT dispatch_policy._within_limit(extract(epoch FROM defer.until - defer.now), 'defer.until') THEN
    RAISE EXCEPTION 'until must be a finite time after now, at most % seconds (30 days) later',
                    trim_scale(dispatch_policy._limit_max('defer.until'))
      USING ERRCODE = '22023',
            DETAIL = format('until is %s seconds %s now.', trim_scale(abs(extract(epoch FROM defer.until - defer.now))),
                            CASE WHEN defer.until > defer.now THEN 'after' ELSE 'before' END),
            HINT = 'Pass the time the downstream asked for (Retry-After), within the bound. Nothing was changed.';
  END IF;
  IF NOT dispatch_policy._within_limit(char_length(defer.reason), 'defer.reason') THEN
    RAISE EXCEPTION 'reason %', dispatch_policy._limit_rule('defer.reason')
      USING ERRCODE = '22023', DETAIL = format('reason is %s characters long.', char_length(defer.reason)),
            HINT = 'Nothing was changed.';
  END IF;

  IF defer.pause_partition THEN
    -- A pause is an action on the policy: wait for a tick under way (it
    -- may be admitting from the partition), before the job's row is taken
    -- (a redeclare holds the tick lock and then takes the admitted rows).
    SELECT a.policy INTO job_policy FROM dispatch_policy.admitted_jobs a WHERE a.id = defer.id;
    IF FOUND THEN
      PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(job_policy));
    END IF;
  END IF;

  -- Fenced as complete and fail are: a stale attempt changes nothing.
  DELETE FROM dispatch_policy.admitted_jobs a
  WHERE a.id = defer.id AND (defer.attempt IS NULL OR a.attempt = defer.attempt)
  RETURNING a.* INTO job;
  IF NOT FOUND THEN
    PERFORM dispatch_policy._raise_not_admitted(defer.id, defer.attempt);
  END IF;
  IF defer.pause_partition AND job.policy IS DISTINCT FROM job_policy THEN
    -- Admitted after the first look (never for the same id: a job keeps its
    -- policy); take the lock now.
    PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(job.policy));
  END IF;

  -- Its slots go back as at completion; no observation: a deferral says
  -- nothing about this queue's lag, and is not a success or a failure.
  PERFORM dispatch_policy._release_slots(ARRAY[job], defer.now, restaged => true);
  -- Back to staging as the same attempt, scheduled for until; its dedupe
  -- key stays held; its partitions are rendered again by the row trigger
  -- (as a retry's are).
  INSERT INTO dispatch_policy.staged_jobs
    (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, attempt, created_at,
     staged_at, last_error)
  VALUES (job.id, job.policy, job.queue, job.priority, job.args, job.context, job.dedupe_key, job.round_robin_key,
          defer.until, job.attempt, job.created_at, defer.now, NULL);

  IF defer.pause_partition THEN
    done := '{}'::jsonb;
    SELECT * INTO pol FROM dispatch_policy.policies p WHERE p.name = job.policy;
    IF FOUND THEN
      FOR g IN
        SELECT x FROM jsonb_array_elements(coalesce(pol.config -> 'gates', '[]'::jsonb)) AS x
        WHERE x ->> 'type' = 'throttle' AND x ? 'partition_by'
      LOOP
        part := coalesce(job.partitions ->> coalesce(g ->> 'name', g ->> 'type'),
                         dispatch_policy._gate_partitions(pol.config, job.context) ->> coalesce(g ->> 'name', g ->> 'type'));
        IF part IS NOT NULL THEN
          PERFORM dispatch_policy._extend_partition_pause(pol, g, part, defer.until, defer.reason, defer.now);
          done := done || jsonb_build_object(coalesce(g ->> 'name', g ->> 'type'), part);
        END IF;
      END LOOP;
    END IF;
  END IF;

  INSERT INTO dispatch_policy.job_deferrals (job_id, policy, attempt, reason, until, paused, deferred_at)
  VALUES (job.id, job.policy, job.attempt, defer.reason, defer.until, done, defer.now);
  PERFORM pg_notify('dispatch_policy_staged', job.policy);
  RETURN QUERY SELECT 'scheduled'::text, defer.until, done;
END
$$;
COMMENT ON FUNCTION dispatch_policy.defer(bigint, timestamptz, text, boolean, integer, timestamptz) IS
  'For a worker whose downstream said "not now" (HTTP 429 with Retry-After): hands an admitted job back to staging, scheduled for until, without counting an attempt (it is admitted again as the same attempt, through every gate; its dedupe key stays held). Releases its concurrency, global and adaptive slots as complete does, records no observation (not a success, not a failure: the adaptive cap does not move) and no failure; records the deferral in job_deferrals. With pause_partition => true, also pauses each partitioned throttle of the job''s policy in the job''s partition until until (as pause_partition, waiting for a tick under way; a pause without an end or ending later is kept; the pause ends by itself); a policy without a partitioned throttle pauses nothing (paused is ''{}''). Returns one row: state ''scheduled'', not_before (= until), paused (gate -> partition paused; NULL without pause_partition). Errors, nothing changed: NULL id, until, reason or pause_partition 22004; until not finite, not after now or more than limits() defer.until (30 days) after now, reason longer than limits() defer.reason (1024 characters) or empty 22023; with attempt, DP001 when it is not the current attempt; P0002 when the job is not admitted (staged, finished or unknown).';

-- ---------------------------------------------------------------------------
-- drop_policy

-- Finishes admitted jobs of a policy as cancelled (drop_policy with force):
-- their slots are released as at completion, no observation or failure is
-- recorded. Their dedupe keys are left to the caller, which frees them
-- under the policy's partitions lock (a stager waiting on a key must not
-- hold that lock while this transaction waits for it). The caller holds
-- the policy's tick lock.
CREATE FUNCTION dispatch_policy._cancel_admitted(policy text, reason text, now timestamptz)
RETURNS dispatch_policy.admitted_jobs[]
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  jobs dispatch_policy.admitted_jobs[];
BEGIN
  -- Rows in id order, as every multi-job writer locks them.
  PERFORM 1 FROM dispatch_policy.admitted_jobs a WHERE a.policy = _cancel_admitted.policy ORDER BY a.id FOR UPDATE;
  WITH gone AS (
    DELETE FROM dispatch_policy.admitted_jobs a WHERE a.policy = _cancel_admitted.policy RETURNING a
  )
  SELECT coalesce(array_agg(g.a ORDER BY (g.a).id), '{}') INTO jobs FROM gone g;
  IF cardinality(jobs) = 0 THEN
    RETURN jobs;
  END IF;
  PERFORM dispatch_policy._release_slots(jobs, _cancel_admitted.now);
  INSERT INTO dispatch_policy.finished_jobs
    (id, policy, queue, priority, args, context, dedupe_key, attempts, status, last_error, created_at, admitted_at,
     started_at, finished_at)
  SELECT j.id, j.policy, j.queue, j.priority, j.args, j.context, j.dedupe_key, j.attempt, 'cancelled',
         dispatch_policy._action_reason(_cancel_admitted.reason), j.created_at, j.admitted_at, j.started_at,
         _cancel_admitted.now
  FROM unnest(jobs) AS j ORDER BY j.id;
  RETURN jobs;
END
$$;
COMMENT ON FUNCTION dispatch_policy._cancel_admitted(text, text, timestamptz) IS
  'Internal (drop_policy): moves every admitted job of a policy to finished_jobs as cancelled (attempts: the attempt in flight counts; the reason in last_error), releasing their slots in one sorted statement; no observation, no failure. Returns the jobs; their dedupe keys are still held (the caller frees them). The caller holds the policy''s tick lock.';

CREATE FUNCTION dispatch_policy.drop_policy(name text, force boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  reason text;
  running dispatch_policy.admitted_jobs[] := '{}'::dispatch_policy.admitted_jobs[];
  pending bigint;
  scheduled bigint;
  in_flight bigint;
  cancelled bigint := 0::bigint;
BEGIN
  IF drop_policy.name IS NULL OR drop_policy.force IS NULL THEN
    RAISE EXCEPTION 'drop_policy: % must not be NULL', CASE WHEN drop_policy.name IS NULL THEN 'name' ELSE 'force' END
      USING ERRCODE = '22004', HINT = 'Nothing was changed.';
  END IF;
  PERFORM dispatch_policy._require_policy(drop_policy.name);
  reason := format('policy %s dropped', drop_policy.name);

  -- Waits for a tick under way; no tick (or action) of the policy starts
  -- until this commits.
  PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(drop_policy.name));
  IF drop_policy.force THEN
    -- Before the partitions lock: a worker failing a job holds its row,
    -- then takes that lock to re-stage it (as a redeclare orders them).
    running := dispatch_policy._cancel_admitted(drop_policy.name, reason, now());
  END IF;
  -- No job of the policy is staged from here until commit: a stager holds
  -- this lock shared from before it reads the policy (and then finds none).
  PERFORM pg_advisory_xact_lock(dispatch_policy._partitions_lock_key(drop_policy.name));

  SELECT count(*) FILTER (WHERE s.not_before IS NULL), count(*) FILTER (WHERE s.not_before IS NOT NULL)
  INTO pending, scheduled
  FROM dispatch_policy.staged_jobs s WHERE s.policy = drop_policy.name;
  SELECT count(*) INTO in_flight FROM dispatch_policy.admitted_jobs a WHERE a.policy = drop_policy.name;
  IF NOT drop_policy.force AND pending + scheduled + in_flight > 0 THEN
    RAISE EXCEPTION 'policy % has % pending, % scheduled and % admitted job(s)', quote_literal(drop_policy.name),
                    pending, scheduled, in_flight
      USING ERRCODE = '2BP01',
            DETAIL = 'A policy is dropped only when no job of it is staged or admitted.',
            HINT = 'Let them finish (pause() stops new admissions; drain() cancels staged jobs), or call drop_policy(name, force => true) to finish every one of them as cancelled. Nothing was changed.';
  END IF;

  IF drop_policy.force THEN
    DELETE FROM dispatch_policy.dedupe_keys d
    USING unnest(running) AS j
    WHERE j.dedupe_key IS NOT NULL AND d.policy = j.policy AND d.dedupe_key = j.dedupe_key AND d.job_id = j.id;
    cancelled := cardinality(running) + dispatch_policy._cancel_staged(
      drop_policy.name,
      ARRAY(SELECT s.id FROM dispatch_policy.staged_jobs s WHERE s.policy = drop_policy.name ORDER BY s.id FOR UPDATE),
      reason);
  END IF;

  -- Every row of the policy's state. Gate rows in one sorted statement each.
  DELETE FROM dispatch_policy.inflight_counters c
  WHERE (c.policy, c.gate, c.partition) IN (
    SELECT x.policy, x.gate, x.partition FROM dispatch_policy.inflight_counters x WHERE x.policy = drop_policy.name
    ORDER BY x.policy, x.gate, x.partition FOR UPDATE);
  DELETE FROM dispatch_policy.throttle_buckets t
  WHERE (t.policy, t.gate, t.partition) IN (
    SELECT x.policy, x.gate, x.partition FROM dispatch_policy.throttle_buckets x WHERE x.policy = drop_policy.name
    ORDER BY x.policy, x.gate, x.partition FOR UPDATE);
  DELETE FROM dispatch_policy.adaptive_stats a
  WHERE (a.policy, a.gate, a.partition) IN (
    SELECT x.policy, x.gate, x.partition FROM dispatch_policy.adaptive_stats x WHERE x.policy = drop_policy.name
    ORDER BY x.policy, x.gate, x.partition FOR UPDATE);
  DELETE FROM dispatch_policy.observations o WHERE o.policy = drop_policy.name;
  DELETE FROM dispatch_policy.dedupe_keys d WHERE d.policy = drop_policy.name;
  DELETE FROM dispatch_policy.paused_partitions pp WHERE pp.policy = drop_policy.name;
  DELETE FROM dispatch_policy.lanes l WHERE l.policy = drop_policy.name;
  DELETE FROM dispatch_policy.round_robin_cursors r WHERE r.policy = drop_policy.name;
  DELETE FROM dispatch_policy.runner_failures r WHERE r.policy = drop_policy.name;
  -- Pending jobs per gate partition (0020): the counted rows and the
  -- deltas not folded yet (gate rows without a minute carry only those).
  -- The deltas first: a fold holding some is waited for, and its rows in
  -- partition_counters are then visible to the next statement.
  DELETE FROM dispatch_policy.stat_deltas d WHERE d.policy = drop_policy.name AND d.gate <> '' AND d.minute IS NULL;
  DELETE FROM dispatch_policy.partition_counters c WHERE c.policy = drop_policy.name;

  DELETE FROM dispatch_policy.policies p WHERE p.name = drop_policy.name;
  RETURN cancelled;
END
$$;
COMMENT ON FUNCTION dispatch_policy.drop_policy(text, boolean) IS
  'Deletes a policy and all its per-policy state: gate state (in-flight counters, throttle buckets, adaptive state, observations), lanes, round-robin cursor, paused partitions, runner failures, dedupe keys and per-partition pending counts. Refuses, changing nothing, while a job of the policy is staged (pending or scheduled) or admitted: SQLSTATE 2BP01, the message giving how many. With force => true, first finishes every such job as cancelled (finished_jobs, reason ''policy NAME dropped'' in last_error; an admitted job''s attempt counts as made, its slots are released and its worker''s next call gets DP001 or P0002), freeing their dedupe keys. History stays under the name: finished_jobs, job_failures, job_deferrals, stat_minutes, observation_minutes and policy_counters (deleted by prune() after their retention; a policy declared again under the name continues it). Waits for a tick of the policy under way (its tick lock) and for stagers of it (its partitions lock), until commit. Returns how many jobs were cancelled. Owner only (as declare_policy). Errors, nothing changed: NULL name or force 22004; unknown policy 42704; jobs without force 2BP01.';

-- ---------------------------------------------------------------------------
-- prune gets one more step (it is defined once in 0.2.0, in
-- 0025_shadow.sql): deferrals older than the retention (row deferrals).

-- ---------------------------------------------------------------------------
-- Privileges (0021): defer is a worker call, run as the owner like fail;
-- drop_policy stays the owner's (no role is granted it, as declare_policy).

ALTER FUNCTION dispatch_policy.defer(bigint, timestamptz, text, boolean, integer, timestamptz)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;

REVOKE ALL ON ALL TABLES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch_policy FROM PUBLIC;
