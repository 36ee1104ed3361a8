-- Operator actions (issue 10): cancel, retry, drain, pause_partition and
-- resume_partition.
--
-- Every action checks its arguments first (an error naming the argument,
-- HINT 'Nothing was changed.'), then takes the policy's tick lock at
-- transaction level, as pause() does: it waits for a tick of the policy under
-- way and no tick starts until it commits, so an action never interleaves
-- with an admission. Each is one statement's worth of work, all or nothing.
--
--   cancel(id, reason)           a staged job (pending or scheduled) becomes
--                                finished with status 'cancelled'
--   retry(id)                    a dead job is staged again, as attempt 1
--   drain(policy, gate, partition, max_jobs, reason)
--                                cancel() for up to max_jobs staged jobs of a
--                                policy, or of one gate partition
--   pause_partition(policy, gate, partition, until, reason)
--   resume_partition(policy, gate, partition)
--                                stop / restart admission of one partition
--
-- A cancelled job is recorded like a finished one: the row leaves
-- staged_jobs for finished_jobs (status 'cancelled', the reason in
-- last_error), its dedupe key is freed and the lanes it emptied are dropped,
-- as admission drops them.
--
-- Paused partitions. Admission decisions are made by the runner (Swift) from
-- the state tick_begin and tick_state return; this migration does not change
-- them. paused_partitions_now(policy, now) is what a tick reads to refuse
-- the jobs of paused partitions. Until the runner does, a pause is enforced
-- through the lanes where a lane is exactly a partition: when the policy's
-- lane template (round_robin_by, else its gates' partition_by templates) is
-- the paused gate's partition_by, the lane whose key is the partition is
-- blocked until the pause ends ('infinity' without until) and kept blocked
-- while the pause lasts (a trigger refuses to unblock it: a released slot, a
-- config change, an adaptive cap that grew), so the fetch passes it over.
-- A lane of round-robin keys (round_robin_by other than the gate's
-- template, several partitioned templates, a key given to stage()) mixes
-- partitions: blocking it would hold jobs of partitions that are not paused,
-- so such lanes are left alone and the pause is only reported (explain,
-- paused_partitions_now) until the runner refuses by it.

-- ---------------------------------------------------------------------------
-- Cancelled jobs are finished jobs.

ALTER TABLE dispatch_policy.finished_jobs DROP CONSTRAINT finished_jobs_status_check;
ALTER TABLE dispatch_policy.finished_jobs
  ADD CONSTRAINT finished_jobs_status_check CHECK (status IN ('completed', 'dead', 'cancelled'));
COMMENT ON TABLE dispatch_policy.finished_jobs IS
  'Completed jobs, dead jobs (failed max_attempts times) and jobs cancelled while staged (cancel, drain). Completed rows are pruned after the retention period; dead rows stay until deleted or retried (retry).';
COMMENT ON COLUMN dispatch_policy.finished_jobs.status IS
  '''completed'', ''dead'' or ''cancelled'' (by cancel() or drain() while staged).';
COMMENT ON COLUMN dispatch_policy.finished_jobs.attempts IS
  'How many attempts were made (for a cancelled job, the attempts before the one it waited for: 0 when it never ran).';
COMMENT ON COLUMN dispatch_policy.finished_jobs.last_error IS
  'Error of the last failed attempt; for a cancelled job, the reason given to cancel or drain. Every attempt''s error is in job_failures.';

-- The reason an operator gives is kept as fail() keeps an error: cut to the
-- limits() length of fail.error.
CREATE FUNCTION dispatch_policy._action_reason(reason text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT left(reason, dispatch_policy._limit_max('fail.error')::integer)
$$;
COMMENT ON FUNCTION dispatch_policy._action_reason(text) IS
  'Internal: an operator''s reason as stored, cut to limits() fail.error characters (as fail() cuts an error).';

-- The one implementation behind cancel and drain: the caller holds the
-- policy's tick lock.
CREATE FUNCTION dispatch_policy._cancel_staged(policy text, ids bigint[], reason text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  cancelled bigint;
  keys text[];
  keyless boolean;
BEGIN
  WITH gone AS (
    DELETE FROM dispatch_policy.staged_jobs s
    WHERE s.id = ANY (_cancel_staged.ids) AND s.policy = _cancel_staged.policy
    RETURNING s.*
  ), kept AS (
    INSERT INTO dispatch_policy.finished_jobs
      (id, policy, queue, priority, args, context, dedupe_key, attempts, status, last_error, created_at, finished_at)
    SELECT g.id, g.policy, g.queue, g.priority, g.args, g.context, g.dedupe_key, g.attempt - 1, 'cancelled',
           dispatch_policy._action_reason(_cancel_staged.reason), g.created_at, now()
    FROM gone g
    ORDER BY g.id
  ), freed AS (
    DELETE FROM dispatch_policy.dedupe_keys d
    USING gone g
    WHERE g.dedupe_key IS NOT NULL AND d.policy = g.policy AND d.dedupe_key = g.dedupe_key AND d.job_id = g.id
  )
  SELECT count(*),
         coalesce(array_agg(DISTINCT g.round_robin_key) FILTER (WHERE g.not_before IS NULL AND g.round_robin_key IS NOT NULL), '{}'),
         coalesce(bool_or(g.not_before IS NULL AND g.round_robin_key IS NULL), false)
  INTO cancelled, keys, keyless
  FROM gone g;
  -- Lanes the cancellation emptied go now, as admission drops the lanes it
  -- emptied (else the next fetch finds them empty and drops them).
  IF cardinality(keys) > 0 OR keyless THEN
    PERFORM dispatch_policy._drop_empty_lanes(_cancel_staged.policy, keys, keyless);
  END IF;
  RETURN cancelled;
END
$$;
COMMENT ON FUNCTION dispatch_policy._cancel_staged(text, bigint[], text) IS
  'Internal: moves the staged jobs of a policy with these ids to finished_jobs as cancelled (reason in last_error, attempts made = attempt - 1), frees their dedupe keys and drops the lanes they emptied. The caller holds the policy''s tick lock. Returns how many.';

-- ---------------------------------------------------------------------------
-- cancel

CREATE FUNCTION dispatch_policy.cancel(id bigint, reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  job_policy text;
  running dispatch_policy.admitted_jobs;
BEGIN
  IF cancel.id IS NULL THEN
    RAISE EXCEPTION 'cancel: id must not be NULL' USING ERRCODE = '22004', HINT = 'Nothing was changed.';
  END IF;
  SELECT s.policy INTO job_policy FROM dispatch_policy.staged_jobs s WHERE s.id = cancel.id;
  IF FOUND THEN
    -- Waits for a tick under way: it may be admitting this very job.
    PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(job_policy));
    IF dispatch_policy._cancel_staged(job_policy, ARRAY[cancel.id], cancel.reason) = 1 THEN
      RETURN true;
    END IF;
  END IF;
  -- Not staged, or no longer once the lock was ours (admitted by that tick).
  SELECT * INTO running FROM dispatch_policy.admitted_jobs a WHERE a.id = cancel.id;
  IF FOUND THEN
    RAISE EXCEPTION 'job % is admitted: only a staged job can be cancelled', cancel.id
      USING ERRCODE = '55000',
            DETAIL = format('Attempt %s is in flight (%s).', running.attempt,
                            CASE WHEN running.started_at IS NULL THEN 'admitted, not started yet' ELSE 'started' END),
            HINT = 'Its worker ends it with complete() or fail() (a failure of its last attempt keeps it dead). Nothing was changed.';
  END IF;
  IF EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f WHERE f.id = cancel.id) THEN
    RETURN false;
  END IF;
  RAISE EXCEPTION 'job % does not exist', cancel.id
    USING ERRCODE = 'P0002', DETAIL = 'No job has this id (completed jobs are deleted by prune() after its retention).',
          HINT = 'Nothing was changed.';
END
$$;
COMMENT ON FUNCTION dispatch_policy.cancel(bigint, text) IS
  'Cancels a staged job (pending or scheduled): it leaves staged_jobs for finished_jobs with status ''cancelled'' and the reason in last_error, its dedupe key is freed (the same key can be staged again) and a lane it emptied is dropped. Waits for a tick of its policy under way (the policy''s tick lock, until commit). Returns true; false, changing nothing, when the job has already finished (completed, dead or cancelled), so cancelling twice is safe. Errors, nothing changed: NULL id 22004; the job is admitted (running) 55000, its worker ends it with complete() or fail(); no job has this id P0002.';

-- ---------------------------------------------------------------------------
-- retry

CREATE FUNCTION dispatch_policy.retry(id bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  job dispatch_policy.finished_jobs;
  job_policy dispatch_policy.policies;
  holder bigint;
  lane text;
  state text;
BEGIN
  IF retry.id IS NULL THEN
    RAISE EXCEPTION 'retry: id must not be NULL' USING ERRCODE = '22004', HINT = 'Nothing was changed.';
  END IF;
  SELECT * INTO job FROM dispatch_policy.finished_jobs f WHERE f.id = retry.id;
  IF FOUND AND job.status = 'dead' THEN
    job_policy := dispatch_policy._require_policy(job.policy);
    PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(job.policy));
    -- Under the lock: another retry of the same job may have come first.
    SELECT * INTO job FROM dispatch_policy.finished_jobs f WHERE f.id = retry.id AND f.status = 'dead' FOR UPDATE;
  END IF;
  IF job.id IS NULL OR job.status IS DISTINCT FROM 'dead' THEN
    state := CASE WHEN job.id IS NOT NULL THEN job.status
                  WHEN EXISTS (SELECT 1 FROM dispatch_policy.admitted_jobs a WHERE a.id = retry.id) THEN 'admitted'
                  WHEN EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s WHERE s.id = retry.id) THEN 'staged' END;
    IF state IS NULL THEN
      RAISE EXCEPTION 'job % does not exist', retry.id
        USING ERRCODE = 'P0002', HINT = 'Nothing was changed.';
    END IF;
    RAISE EXCEPTION 'job % is %, not dead: only a dead job can be retried', retry.id, state
      USING ERRCODE = '55000',
            HINT = CASE state
                     WHEN 'staged' THEN 'It waits for admission already (dispatch_policy.explain(id) says why).'
                     WHEN 'admitted' THEN 'It is running.'
                     ELSE 'Stage it again with stage() for a new run.' END || ' Nothing was changed.';
  END IF;

  -- The dedupe key first: held by another pending or admitted job, the
  -- retry would be a duplicate of it.
  IF job.dedupe_key IS NOT NULL THEN
    INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
    VALUES (job.policy, job.dedupe_key, job.id)
    ON CONFLICT ON CONSTRAINT dedupe_keys_pkey DO NOTHING;
    IF NOT FOUND THEN
      SELECT d.job_id INTO holder FROM dispatch_policy.dedupe_keys d WHERE d.policy = job.policy AND d.dedupe_key = job.dedupe_key;
      RAISE EXCEPTION 'job % cannot be retried: its dedupe key % is held by job %', job.id, quote_literal(job.dedupe_key), holder
        USING ERRCODE = '23505',
              DETAIL = 'A job of the same policy with the same dedupe key is pending or admitted.',
              HINT = 'Wait for that job to finish, or cancel it, then retry. Nothing was changed.';
    END IF;
  END IF;

  DELETE FROM dispatch_policy.finished_jobs f WHERE f.id = job.id;
  BEGIN
    -- A new cycle of attempts: attempt 1, the policy's full max_attempts and
    -- backoff; created_at kept; the last error kept for explain.
    INSERT INTO dispatch_policy.staged_jobs
      (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, attempt, created_at,
       staged_at, last_error)
    VALUES (job.id, job.policy, job.queue, job.priority, job.args, job.context, job.dedupe_key,
            dispatch_policy._round_robin_key(job_policy.lane_template, job.context, NULL), NULL, 1, job.created_at,
            now(), job.last_error)
    RETURNING staged_jobs.round_robin_key INTO lane;
  EXCEPTION WHEN check_violation THEN
    -- A job kept dead because a field of it is beyond its bounds (0008).
    RAISE EXCEPTION 'job % cannot be staged again: a field of it is beyond its bounds', job.id
      USING ERRCODE = '55000', DETAIL = SQLERRM, HINT = 'Stage a corrected copy with stage(). Nothing was changed.';
  END;
  PERFORM dispatch_policy._add_lanes(job.policy, ARRAY[lane]);
  PERFORM pg_notify('dispatch_policy_staged', job.policy);
  RETURN job.id;
END
$$;
COMMENT ON FUNCTION dispatch_policy.retry(bigint) IS
  'Stages a dead job again, keeping its id (explain and the job''s history continue): it leaves finished_jobs and waits for admission as attempt 1 of a new cycle (the policy''s full max_attempts and backoff again; its earlier failures stay in job_failures), eligible now, with its created_at and last error; it takes its dedupe key again; its round-robin key (lane) is derived from the policy''s lane_template (a key given to stage() is not kept by finished_jobs). Waits for a tick of its policy under way. Returns the job id. Errors, nothing changed: NULL id 22004; the job is staged, admitted, completed or cancelled 55000; its dedupe key is held by another pending or admitted job 23505 (the message names it); its policy no longer exists 42704; no job has this id P0002.';

-- ---------------------------------------------------------------------------
-- Gates whose partitions can be paused or drained.

-- The gate named `gate` in a config when it is a throttle, concurrency or
-- adaptive_concurrency gate with a partition_by, else NULL.
CREATE FUNCTION dispatch_policy._partitioned_gate(config jsonb, gate text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT g FROM jsonb_array_elements(coalesce(config -> 'gates', '[]'::jsonb)) AS g
  WHERE coalesce(g ->> 'name', g ->> 'type') = _partitioned_gate.gate
    AND g ->> 'type' IN ('throttle', 'concurrency', 'adaptive_concurrency') AND g ? 'partition_by'
$$;
COMMENT ON FUNCTION dispatch_policy._partitioned_gate(jsonb, text) IS
  'Internal: the config of a partitioned gate (throttle, concurrency or adaptive_concurrency with a partition_by) of this name, else NULL.';

-- The gate, or the error naming it: NULL 22004, not in the policy 42704,
-- not partitioned 22023.
CREATE FUNCTION dispatch_policy._require_partitioned_gate(policy dispatch_policy.policies, gate text)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
DECLARE
  found_gate jsonb;
  names text;
BEGIN
  IF gate IS NULL THEN
    RAISE EXCEPTION 'gate must not be NULL' USING ERRCODE = '22004', HINT = 'Nothing was changed.';
  END IF;
  SELECT g INTO found_gate FROM jsonb_array_elements(coalesce(policy.config -> 'gates', '[]'::jsonb)) AS g
  WHERE coalesce(g ->> 'name', g ->> 'type') = gate;
  IF found_gate IS NULL THEN
    SELECT string_agg(coalesce(g ->> 'name', g ->> 'type'), ', ') INTO names
    FROM jsonb_array_elements(coalesce(policy.config -> 'gates', '[]'::jsonb)) AS g;
    RAISE EXCEPTION 'unknown gate % in policy %', quote_literal(gate), quote_literal(policy.name)
      USING ERRCODE = '42704', DETAIL = format('Its gates: %s.', coalesce(names, 'none')),
            HINT = 'Nothing was changed.';
  END IF;
  IF dispatch_policy._partitioned_gate(policy.config, gate) IS NULL THEN
    RAISE EXCEPTION 'gate % of policy % is not partitioned', quote_literal(gate), quote_literal(policy.name)
      USING ERRCODE = '22023',
            DETAIL = format('It is a %s gate%s.', found_gate ->> 'type',
                            CASE WHEN found_gate ->> 'type' IN ('throttle', 'concurrency', 'adaptive_concurrency')
                                 THEN ' without partition_by: its one partition is the whole policy' ELSE '' END),
            HINT = 'Name a throttle, concurrency or adaptive_concurrency gate with a partition_by, or pause the whole policy with dispatch_policy.pause(policy). Nothing was changed.';
  END IF;
  RETURN found_gate;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_partitioned_gate(dispatch_policy.policies, text) IS
  'Internal: the config of a partitioned gate of the policy, or 22004 (NULL), 42704 (no gate of that name; the gates are listed) or 22023 (a global_cap, fair_interleave or unpartitioned gate).';

CREATE FUNCTION dispatch_policy._require_partition(partition text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  IF partition IS NULL THEN
    RAISE EXCEPTION 'partition must not be NULL' USING ERRCODE = '22004', HINT = 'Nothing was changed.';
  END IF;
  IF octet_length(partition) > dispatch_policy._limit_max('partition_key') THEN
    RAISE EXCEPTION 'partition %', dispatch_policy._limit_rule('partition_key')
      USING ERRCODE = '22023', DETAIL = format('partition is %s bytes.', octet_length(partition)),
            HINT = 'Give the partition key as partition_overview shows it (longer keys are stored shortened). Nothing was changed.';
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_partition(text) IS
  'Internal: 22004 for a NULL partition, 22023 for one longer than limits() partition_key (no stored key is).';

-- ---------------------------------------------------------------------------
-- drain

CREATE FUNCTION dispatch_policy.drain(
  policy text, gate text DEFAULT NULL, partition text DEFAULT NULL, max_jobs integer DEFAULT 10000,
  reason text DEFAULT 'drained'
)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  pol dispatch_policy.policies;
  template text;
  ids bigint[];
BEGIN
  pol := dispatch_policy._require_policy(drain.policy);
  IF max_jobs IS NULL OR max_jobs NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION 'max_jobs must be an integer from 1 to 100000'
      USING ERRCODE = '22023', DETAIL = format('max_jobs is %s.', coalesce(max_jobs::text, 'NULL')),
            HINT = 'Call drain again for more. Nothing was changed.';
  END IF;
  IF (drain.gate IS NULL) <> (drain.partition IS NULL) THEN
    RAISE EXCEPTION 'gate and partition must be given together'
      USING ERRCODE = '22023',
            DETAIL = format('%s is NULL.', CASE WHEN drain.gate IS NULL THEN 'gate' ELSE 'partition' END),
            HINT = 'Give both to drain one gate partition, neither to drain the whole policy. Nothing was changed.';
  END IF;
  IF drain.gate IS NOT NULL THEN
    template := dispatch_policy._require_partitioned_gate(pol, drain.gate) ->> 'partition_by';
    PERFORM dispatch_policy._require_partition(drain.partition);
  END IF;

  PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(drain.policy));
  -- A job's partition of the gate as _gate_partitions (partition_overview,
  -- explain, the runner) gives it for these gate types: _partition_key of
  -- the gate's partition_by (rendered, then fitted).
  ids := ARRAY(
    SELECT s.id FROM dispatch_policy.staged_jobs s
    WHERE s.policy = drain.policy
      AND (template IS NULL OR dispatch_policy._partition_key(template, s.context) = drain.partition)
    ORDER BY s.id
    LIMIT max_jobs
    FOR UPDATE);
  RETURN dispatch_policy._cancel_staged(drain.policy, ids, drain.reason);
END
$$;
COMMENT ON FUNCTION dispatch_policy.drain(text, text, text, integer, text) IS
  'Cancels up to max_jobs (1 to 100000) staged jobs (pending and scheduled) of a policy, oldest id first, or only those whose partition of gate is partition (as partition_overview shows it); each as cancel() does (status ''cancelled'', reason in last_error, default ''drained''), in one transaction. Returns how many: fewer than max_jobs when none is left; call again for more. Admitted jobs are left running. Waits for a tick of the policy under way. A partition is found by rendering every staged job of the policy until max_jobs match: a large backlog takes a while. Errors, nothing changed: unknown policy or gate 42704; max_jobs out of bounds, gate without partition or the reverse, a gate that is not partitioned, a partition longer than 256 bytes 22023; NULL max_jobs 22023.';

-- ---------------------------------------------------------------------------
-- Paused partitions.

CREATE TABLE dispatch_policy.paused_partitions (
  policy    text NOT NULL,
  gate      text NOT NULL,
  partition text NOT NULL,
  until     timestamptz,
  reason    text,
  paused_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT paused_partitions_pkey PRIMARY KEY (policy, gate, partition),
  CONSTRAINT paused_partitions_until_check CHECK (until IS NULL OR isfinite(until)),
  CONSTRAINT paused_partitions_paused_at_check CHECK (isfinite(paused_at)),
  CONSTRAINT paused_partitions_partition_check CHECK (octet_length(partition) <= 256)
);
COMMENT ON TABLE dispatch_policy.paused_partitions IS
  'Gate partitions an operator paused (pause_partition, resume_partition): their jobs wait while the pause lasts. A row whose until has passed, or whose gate is no longer a partitioned gate of its policy, is ignored and deleted by the maintenance (_expire_partition_pauses). Read by paused_partitions_now and explain.';
COMMENT ON COLUMN dispatch_policy.paused_partitions.policy IS 'Policy.';
COMMENT ON COLUMN dispatch_policy.paused_partitions.gate IS 'Gate name (a throttle, concurrency or adaptive_concurrency gate with a partition_by).';
COMMENT ON COLUMN dispatch_policy.paused_partitions.partition IS 'Partition key, as partition_overview shows it.';
COMMENT ON COLUMN dispatch_policy.paused_partitions.until IS 'When the pause ends by itself; NULL: at resume_partition.';
COMMENT ON COLUMN dispatch_policy.paused_partitions.reason IS 'Why, as the operator said.';
COMMENT ON COLUMN dispatch_policy.paused_partitions.paused_at IS 'When the partition was first paused (a later pause_partition changes until and reason, not this).';

-- A dump keeps the pauses (see 0009_dump.sql).
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'dispatch_policy') THEN
    PERFORM pg_catalog.pg_extension_config_dump('dispatch_policy.paused_partitions'::regclass, '');
  END IF;
END
$$;

-- Whether a policy's lanes are exactly the partitions of a gate: its lane
-- template (round_robin_by, else the partition_by templates of its gates)
-- is the gate's partition_by. A job staged without a round-robin key is then
-- in the lane whose key is its partition of the gate (both are the template
-- rendered, then fitted).
CREATE FUNCTION dispatch_policy._lanes_are_partitions(lane_template text, gate jsonb)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(lane_template = gate ->> 'partition_by'
                  AND gate ->> 'type' IN ('throttle', 'concurrency', 'adaptive_concurrency'), false)
$$;
COMMENT ON FUNCTION dispatch_policy._lanes_are_partitions(text, jsonb) IS
  'Internal: whether a policy''s lanes (lane_template) are exactly the partitions of this gate, so that a paused partition can block its lane without holding jobs of other partitions.';

CREATE FUNCTION dispatch_policy.paused_partitions_now(policy text, now timestamptz DEFAULT now())
RETURNS TABLE (gate text, partition text, until timestamptz)
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
DECLARE
  pol dispatch_policy.policies;
BEGIN
  PERFORM dispatch_policy._require_now(paused_partitions_now.now);
  pol := dispatch_policy._require_policy(paused_partitions_now.policy);
  RETURN QUERY
  SELECT pp.gate, pp.partition, pp.until
  FROM dispatch_policy.paused_partitions pp
  WHERE pp.policy = pol.name
    AND (pp.until IS NULL OR pp.until > paused_partitions_now.now)
    AND dispatch_policy._partitioned_gate(pol.config, pp.gate) IS NOT NULL
  ORDER BY pp.gate, pp.partition;
END
$$;
COMMENT ON FUNCTION dispatch_policy.paused_partitions_now(text, timestamptz) IS
  'The partitions of a policy paused at now, one row each (gate, partition, until; until NULL: until resume_partition), of gates the policy still has. A tick refuses every job whose partition of such a gate is listed. Unknown policy 42704; a now that is not finite 22023.';

CREATE FUNCTION dispatch_policy.pause_partition(
  policy text, gate text, partition text, until timestamptz DEFAULT NULL, reason text DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
DECLARE
  pol dispatch_policy.policies;
  g jsonb;
BEGIN
  pol := dispatch_policy._require_policy(pause_partition.policy);
  g := dispatch_policy._require_partitioned_gate(pol, pause_partition.gate);
  PERFORM dispatch_policy._require_partition(pause_partition.partition);
  IF pause_partition.until IS NOT NULL AND (NOT isfinite(pause_partition.until) OR pause_partition.until <= now()) THEN
    RAISE EXCEPTION 'until must be a finite time in the future (NULL: until resume_partition)'
      USING ERRCODE = '22023',
            DETAIL = CASE WHEN isfinite(pause_partition.until) THEN 'until is not after now().'
                          ELSE format('until is %s.', pause_partition.until) END,
            HINT = 'Nothing was changed.';
  END IF;

  PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(pause_partition.policy));
  INSERT INTO dispatch_policy.paused_partitions AS pp (policy, gate, partition, until, reason, paused_at)
  VALUES (pause_partition.policy, pause_partition.gate, pause_partition.partition, pause_partition.until,
          dispatch_policy._action_reason(pause_partition.reason), now())
  ON CONFLICT ON CONSTRAINT paused_partitions_pkey
  DO UPDATE SET until = EXCLUDED.until, reason = EXCLUDED.reason;

  -- Where a lane is exactly the partition, block it for as long as the pause
  -- lasts (created blocked when it has no jobs yet: a job staged into it
  -- finds it blocked; a blocked lane is never dropped as empty).
  IF dispatch_policy._lanes_are_partitions(pol.lane_template, g) THEN
    PERFORM pg_advisory_xact_lock_shared(dispatch_policy._lanes_lock_key(pause_partition.policy));
    INSERT INTO dispatch_policy.lanes AS l (policy, lane, blocked_until, blocked_gate, blocked_partition, updated_at)
    VALUES (pause_partition.policy, pause_partition.partition, coalesce(pause_partition.until, 'infinity'),
            pause_partition.gate, pause_partition.partition, now())
    ON CONFLICT (policy, lane)
    DO UPDATE SET blocked_until = EXCLUDED.blocked_until, blocked_gate = EXCLUDED.blocked_gate,
                  blocked_partition = EXCLUDED.blocked_partition, updated_at = EXCLUDED.updated_at;
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.pause_partition(text, text, text, timestamptz, text) IS
  'Pauses one partition of a gate (as partition_overview shows it): its jobs stay staged and are not admitted until until (NULL: until resume_partition); staging continues; pausing a paused partition again replaces until and reason. Waits for a tick of the policy under way. Enforced by the tick through paused_partitions_now; where the policy''s lanes are exactly the gate''s partitions (its round_robin_by, else its only partition_by template, is the gate''s partition_by), also by blocking the partition''s lane until the pause ends. explain reports the pause as the refusing gate. Errors, nothing changed: unknown policy or gate 42704; NULL gate or partition 22004; a gate that is not a throttle, concurrency or adaptive_concurrency gate with a partition_by 22023; a partition longer than 256 bytes 22023; an until not in the future or infinite 22023.';

CREATE FUNCTION dispatch_policy.resume_partition(policy text, gate text, partition text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  pol dispatch_policy.policies;
BEGIN
  pol := dispatch_policy._require_policy(resume_partition.policy);
  -- A pause of a gate the policy no longer has can still be lifted.
  IF NOT EXISTS (SELECT 1 FROM dispatch_policy.paused_partitions pp
                 WHERE pp.policy = resume_partition.policy AND pp.gate = resume_partition.gate
                   AND pp.partition = resume_partition.partition) THEN
    PERFORM dispatch_policy._require_partitioned_gate(pol, resume_partition.gate);
    PERFORM dispatch_policy._require_partition(resume_partition.partition);
  END IF;

  PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(resume_partition.policy));
  DELETE FROM dispatch_policy.paused_partitions pp
  WHERE pp.policy = resume_partition.policy AND pp.gate = resume_partition.gate
    AND pp.partition = resume_partition.partition;
  IF FOUND THEN
    -- Lanes blocked on the partition are ready again (one blocked on it by a
    -- full cap is looked at again by the next tick, as after a config change).
    UPDATE dispatch_policy.lanes l
    SET blocked_until = NULL, blocked_gate = NULL, blocked_partition = NULL, updated_at = now()
    WHERE l.policy = resume_partition.policy AND l.blocked_gate = resume_partition.gate
      AND l.blocked_partition = resume_partition.partition AND l.blocked_until IS NOT NULL;
    PERFORM pg_notify('dispatch_policy_staged', resume_partition.policy);
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy.resume_partition(text, text, text) IS
  'Lifts the pause of a gate partition (pause_partition): its lanes are ready again and listening runners are woken (NOTIFY dispatch_policy_staged). Resuming a partition that is not paused changes nothing. Waits for a tick of the policy under way. Errors, nothing changed (when no such pause exists): unknown policy or gate 42704; NULL gate or partition 22004; a gate that is not partitioned or a partition longer than 256 bytes 22023.';

-- A lane blocked by a pause stays blocked while the pause lasts: a released
-- slot of the partition, a config change or an adaptive cap that grew would
-- otherwise make it ready again (and the tick, which does not read the pauses
-- yet, admit its jobs). Only lanes that are exactly the paused partition.
CREATE FUNCTION dispatch_policy._keep_paused_lanes()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  IF OLD.lane = OLD.blocked_partition AND EXISTS (
       SELECT 1 FROM dispatch_policy.paused_partitions pp
       JOIN dispatch_policy.policies p ON p.name = pp.policy
       WHERE pp.policy = OLD.policy AND pp.gate = OLD.blocked_gate AND pp.partition = OLD.blocked_partition
         AND (pp.until IS NULL OR pp.until > now())
         AND dispatch_policy._lanes_are_partitions(p.lane_template, dispatch_policy._partitioned_gate(p.config, pp.gate))) THEN
    RETURN NULL;
  END IF;
  RETURN NEW;
END
$$;
COMMENT ON FUNCTION dispatch_policy._keep_paused_lanes() IS
  'Internal trigger: an update that would make ready a lane blocked by a paused partition (the lane is that partition) is skipped while the pause lasts; resume_partition deletes the pause first.';
CREATE TRIGGER lanes_keep_paused
  BEFORE UPDATE ON dispatch_policy.lanes
  FOR EACH ROW WHEN (OLD.blocked_gate IS NOT NULL AND NEW.blocked_until IS NULL)
  EXECUTE FUNCTION dispatch_policy._keep_paused_lanes();

-- Maintenance, for prune: pauses that ended, and pauses of policies or
-- gates that no longer exist.
CREATE FUNCTION dispatch_policy._expire_partition_pauses(now timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  removed bigint;
BEGIN
  PERFORM dispatch_policy._require_now(_expire_partition_pauses.now);
  DELETE FROM dispatch_policy.paused_partitions pp
  WHERE pp.until <= _expire_partition_pauses.now
     OR NOT EXISTS (SELECT 1 FROM dispatch_policy.policies p
                    WHERE p.name = pp.policy AND dispatch_policy._partitioned_gate(p.config, pp.gate) IS NOT NULL);
  GET DIAGNOSTICS removed = ROW_COUNT;
  RETURN removed;
END
$$;
COMMENT ON FUNCTION dispatch_policy._expire_partition_pauses(timestamptz) IS
  'Internal (maintenance, called by prune): deletes the paused_partitions rows whose until has passed at now and those whose policy or gate no longer exists (or is no longer partitioned). Their lanes unblock by themselves (a block ends at until; a config change unblocks). Returns how many.';

-- ---------------------------------------------------------------------------
-- explain (0015) reports a paused partition as the gate that refuses the job,
-- with the pause's end and reason, and a lane blocked by a pause as such.
-- (explain is defined once in 0.2.0, in 0025_shadow.sql.)

