-- Staging rules: debounce, backlog caps per partition, deadlines (issue 12,
-- SQL level).
--
--   dedupe_mode "replace"      staging with the dedupe_key of a job that is
--   (+ debounce)               still staged replaces its args and context
--                              (keeping its id); an admitted job is never
--                              touched; debounce pushes its not_before out
--   stage_outcome,             every staging call says what happened to each
--   stage_many_outcomes        job: inserted, replaced, kept or dropped, and
--                              stage/stage_many always return an id (the job
--                              that holds the key after the call)
--   max_pending_per_partition  a cap on a policy's staged jobs per lane key
--   + on_overflow              (round_robin_key as stored; keyless jobs are
--                              one partition): reject (DP002, all or nothing)
--                              or drop_oldest (finished as 'dropped')
--   expires_at, max_wait       a staged job not admitted by then is finished
--                              as 'expired' (promote_scheduled, and the fetch
--                              itself), never admitted late
--
-- Backlog counts. Counting a partition's staged jobs on every stage would
-- cost O(backlog); backlog_counters keeps one row per (policy, lane key) of
-- the policies that declare max_pending_per_partition only (other policies
-- pay one statement trigger without rows to write). Statement triggers on
-- staged_jobs add what is inserted and take away what is deleted (admission,
-- cancel, expiry, a drop, drop_policy); a replace that moves a job to another
-- lane moves its count itself. A stager of a capped policy locks the
-- counter rows of all the lanes of its call, in sorted order (policy, lane,
-- NULL last), before it stages anything, and holds them until commit: two
-- stagers of one partition queue there, and stagers of several partitions
-- cannot deadlock with each other. The delete trigger locks its rows in the
-- same order. A tick that admits jobs of a partition therefore waits for a
-- stager of that partition to commit (and the stager for the tick's
-- transaction). Lock order of a stager of a policy with staging rules:
-- the policy's partitions lock (shared, before it reads the config; a
-- redeclare that changes what staging reads and drop_policy hold it
-- exclusively, after the tick lock and the admitted jobs), advisory locks
-- of its dedupe keys (sorted), the staged jobs that hold them (by id;
-- replace only), the counter rows (sorted); after that it waits for
-- nothing (a holder staged meanwhile is taken SKIP LOCKED, or kept; so
-- are drop_oldest's victims, and when too few are free the new job is
-- dropped itself, so the cap holds). A tick locks its jobs SKIP LOCKED, then their counter rows (sorted,
-- one statement), in tick_begin's transaction (expiry) and again in
-- tick_finish's (admission). A transaction that deletes or inserts staged
-- jobs of a capped policy in several statements holds counter rows taken
-- out of order and can deadlock with a stager (one of them is rolled
-- back); the runner does not (sql/test/race/backlog_race.sh).
-- A retry, a deferral or retry() puts an accepted job back: it counts,
-- but no cap refuses or drops for it, so a partition can hold more than
-- its cap for a while (as after a replace that moves a job into a full
-- partition, or a redeclare that lowers the cap); the next new job under
-- drop_oldest then drops it down to the cap, oldest first, the jobs that
-- came back included. Not a check() finding: staging never causes it.
--
-- Deadlines survive re-staging: staged_jobs.expires_at is the column the
-- expiry scan reads (a partial index of the jobs that have one), and
-- job_deadlines keeps the deadline by job id, so a retry (fail, the reaper,
-- retry()) or a deferred job staged again gets it back from a row trigger.

-- ---------------------------------------------------------------------------
-- Locks. The ALTER TABLEs and CREATE TRIGGERs below take ACCESS EXCLUSIVE
-- (or SHARE ROW EXCLUSIVE) locks on finished_jobs, staged_jobs and
-- policies, which stagers, ticks and workers write in varying orders;
-- taken one at a time they can deadlock with a writer (seen under
-- partition_race.sh's load). As in 0016 and 0020: all at once, under a
-- lock_timeout shorter than the deadlock_timeout, trying again for up to
-- about 30 s; held until the migration commits.
DO $$
DECLARE
  saved text := current_setting('lock_timeout');
  tries integer := 0;
BEGIN
  LOOP
    BEGIN
      PERFORM set_config('lock_timeout', '200ms', true);
      LOCK TABLE dispatch_policy.policies, dispatch_policy.staged_jobs, dispatch_policy.admitted_jobs,
                 dispatch_policy.finished_jobs, dispatch_policy.dedupe_keys IN ACCESS EXCLUSIVE MODE;
      EXIT;
    EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
      tries := tries + 1;
      IF tries >= 120 THEN
        RAISE;
      END IF;
      PERFORM pg_sleep(0.02 + random() * 0.05);
    END;
  END LOOP;
  PERFORM set_config('lock_timeout', saved, true);
END
$$;

-- ---------------------------------------------------------------------------
-- Bounds of the new policy fields, appended to the others (0007: limits() is
-- the one place; FieldLimits in Swift mirrors it row by row).
-- (limits: its one definition after 0007 is in 0024_cost_weights.sql.)

-- ---------------------------------------------------------------------------
-- Finished as expired or dropped.

ALTER TABLE dispatch_policy.finished_jobs DROP CONSTRAINT finished_jobs_status_check;
ALTER TABLE dispatch_policy.finished_jobs
  ADD CONSTRAINT finished_jobs_status_check CHECK (status IN ('completed', 'dead', 'cancelled', 'expired', 'dropped'));
COMMENT ON TABLE dispatch_policy.finished_jobs IS
  'Completed jobs, dead jobs (failed max_attempts times), jobs cancelled while staged (cancel, drain, drop_policy with force), jobs that expired while staged (expires_at passed before admission) and jobs dropped by a full partition (on_overflow drop_oldest). Completed, cancelled, expired and dropped rows are pruned after the retention period; dead rows stay until deleted or retried (retry).';
COMMENT ON COLUMN dispatch_policy.finished_jobs.status IS
  '''completed'', ''dead'', ''cancelled'' (by cancel(), drain() or drop_policy() while staged), ''expired'' (its expires_at passed while it was staged) or ''dropped'' (the oldest of a partition at max_pending_per_partition with on_overflow drop_oldest).';
COMMENT ON COLUMN dispatch_policy.finished_jobs.last_error IS
  'Error of the last failed attempt; for a cancelled job, the reason given to cancel or drain; for an expired or dropped job, why (when it expired; which partition was at which cap). Every attempt''s error is in job_failures.';
-- policy_overview counts the last day's expired and dropped jobs per policy.
CREATE INDEX finished_jobs_expired_dropped_idx ON dispatch_policy.finished_jobs (policy, status, finished_at)
  WHERE status IN ('expired', 'dropped');

-- ---------------------------------------------------------------------------
-- Deadlines.

ALTER TABLE dispatch_policy.staged_jobs ADD COLUMN expires_at timestamptz;
ALTER TABLE dispatch_policy.staged_jobs
  ADD CONSTRAINT staged_jobs_expires_at_check CHECK (isfinite(expires_at));
COMMENT ON COLUMN dispatch_policy.staged_jobs.expires_at IS
  'The job''s deadline: if not admitted by then it is finished as expired (promote_scheduled, fetch_batch), never admitted. The expires_at given to stage, or created_at (when the job was first staged) + the policy''s max_wait, whichever is earlier; NULL: none. Kept when the job is re-staged (retry, deferral) through job_deadlines.';
CREATE INDEX staged_jobs_expires_idx ON dispatch_policy.staged_jobs (policy, expires_at) WHERE expires_at IS NOT NULL;
-- Jobs scheduled at or after their deadline (a deferral, a retry's delay,
-- debounces or a not_before past max_wait): they can never be admitted, and
-- the next fetch finishes them as expired at once.
CREATE INDEX staged_jobs_unreachable_idx ON dispatch_policy.staged_jobs (policy) WHERE not_before >= expires_at;
-- The oldest staged jobs of a partition, for on_overflow drop_oldest.
CREATE INDEX staged_jobs_backlog_idx ON dispatch_policy.staged_jobs (policy, round_robin_key, id);

CREATE TABLE dispatch_policy.job_deadlines (
  job_id     bigint PRIMARY KEY,
  policy     text NOT NULL,
  expires_at timestamptz NOT NULL,
  CONSTRAINT job_deadlines_expires_at_check CHECK (isfinite(expires_at))
);
COMMENT ON TABLE dispatch_policy.job_deadlines IS
  'The deadline of every job staged with one (expires_at or max_wait), by job id, so that a job staged again after admission (a retry by fail, the reaper or retry(); a deferral) keeps it. Written by staging; deleted by prune() once the deadline is older than the retention.';
COMMENT ON COLUMN dispatch_policy.job_deadlines.job_id IS 'The job.';
COMMENT ON COLUMN dispatch_policy.job_deadlines.policy IS 'Its policy.';
COMMENT ON COLUMN dispatch_policy.job_deadlines.expires_at IS 'Its deadline (staged_jobs.expires_at while staged).';

-- A dump keeps the deadlines (see 0009_dump.sql). backlog_counters is not
-- dumped: a restored policy counts its (then empty) backlog afresh and the
-- insert trigger counts the restored staged jobs, as 0016's counters.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'dispatch_policy') THEN
    PERFORM pg_catalog.pg_extension_config_dump('dispatch_policy.job_deadlines'::regclass, '');
  END IF;
END
$$;

-- A job staged again (created before it was staged: never a fresh stage,
-- whose created_at and staged_at are both the transaction's now()) gets its
-- deadline back.
CREATE FUNCTION dispatch_policy._restaged_deadline()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  NEW.expires_at := (SELECT d.expires_at FROM dispatch_policy.job_deadlines d WHERE d.job_id = NEW.id);
  RETURN NEW;
END
$$;
COMMENT ON FUNCTION dispatch_policy._restaged_deadline() IS
  'Internal row trigger (BEFORE INSERT) of staged_jobs: a job staged again without expires_at (a retry, a deferral: its created_at is before its staged_at) gets the deadline job_deadlines kept for it, if any.';
CREATE TRIGGER staged_jobs_restaged_deadline
  BEFORE INSERT ON dispatch_policy.staged_jobs
  FOR EACH ROW WHEN (NEW.expires_at IS NULL AND NEW.created_at < NEW.staged_at)
  EXECUTE FUNCTION dispatch_policy._restaged_deadline();

-- ---------------------------------------------------------------------------
-- Backlog counters.

CREATE TABLE dispatch_policy.backlog_counters (
  policy text NOT NULL,
  lane   text,
  staged bigint NOT NULL DEFAULT 0,
  CONSTRAINT backlog_counters_staged_check CHECK (staged >= 0)
);
CREATE UNIQUE INDEX backlog_counters_key ON dispatch_policy.backlog_counters (policy, lane) NULLS NOT DISTINCT;
COMMENT ON TABLE dispatch_policy.backlog_counters IS
  'Staged jobs (pending and scheduled) per lane key, of the policies that declare max_pending_per_partition only: what the cap is checked against, in O(1). Kept by statement triggers on staged_jobs (inserts add, deletes take away) and by a replace that moves a job to another lane; rebuilt from staged_jobs when a policy gains the cap or its lane_template changes; deleted when it loses the cap or is dropped. A stager of a capped policy holds the rows of its lanes (sorted) until commit. Every path locks them last, after the in-flight counters and the staged jobs (by id) it takes. Rows at 0 stay (a stager counts on finding its row; prune() does not delete them): one per lane key a capped policy has had. staged may exceed the cap: retries and deferrals come back past it (never refused or dropped), as do replaces moving a job into a full partition and a redeclare lowering the cap; a new job never leaves it above the cap.';
COMMENT ON COLUMN dispatch_policy.backlog_counters.policy IS 'Policy.';
COMMENT ON COLUMN dispatch_policy.backlog_counters.lane IS 'The lane key (staged_jobs.round_robin_key); NULL: the policy''s jobs without one.';
COMMENT ON COLUMN dispatch_policy.backlog_counters.staged IS 'How many of its jobs are staged.';

CREATE FUNCTION dispatch_policy._backlog_inserted()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
#variable_conflict use_column
BEGIN
  INSERT INTO dispatch_policy.backlog_counters AS c (policy, lane, staged)
  SELECT n.policy, n.round_robin_key, count(*)
  FROM new_jobs n JOIN dispatch_policy.policies p ON p.name = n.policy AND p.config ? 'max_pending_per_partition'
  GROUP BY 1, 2
  ORDER BY 1, 2 NULLS LAST
  ON CONFLICT (policy, lane) DO UPDATE SET staged = c.staged + EXCLUDED.staged;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._backlog_inserted() IS
  'Internal statement trigger (AFTER INSERT) of staged_jobs: adds the inserted jobs of capped policies to backlog_counters, rows in sorted order.';

CREATE FUNCTION dispatch_policy._backlog_deleted()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
#variable_conflict use_column
BEGIN
  -- The rows first, in sorted order; then the update by key (its
  -- statement sees what a stager that held a row committed meanwhile).
  PERFORM 1
  FROM dispatch_policy.backlog_counters c
  JOIN (SELECT DISTINCT o.policy, o.round_robin_key AS lane
        FROM old_jobs o JOIN dispatch_policy.policies p ON p.name = o.policy AND p.config ? 'max_pending_per_partition') g
    ON g.policy = c.policy AND g.lane IS NOT DISTINCT FROM c.lane
  ORDER BY c.policy, c.lane NULLS LAST
  FOR UPDATE OF c;
  UPDATE dispatch_policy.backlog_counters c SET staged = greatest(c.staged - g.n, 0)
  FROM (SELECT o.policy, o.round_robin_key AS lane, count(*) AS n
        FROM old_jobs o JOIN dispatch_policy.policies p ON p.name = o.policy AND p.config ? 'max_pending_per_partition'
        GROUP BY 1, 2) g
  WHERE g.policy = c.policy AND g.lane IS NOT DISTINCT FROM c.lane;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._backlog_deleted() IS
  'Internal statement trigger (AFTER DELETE) of staged_jobs: takes the deleted jobs of capped policies off backlog_counters, locking the rows in sorted order (policy, lane, NULL last), as stagers do.';

CREATE FUNCTION dispatch_policy._backlog_truncated()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  DELETE FROM dispatch_policy.backlog_counters;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._backlog_truncated() IS
  'Internal statement trigger (AFTER TRUNCATE) of staged_jobs: no job is staged any more, so no backlog is counted.';

CREATE TRIGGER staged_jobs_backlog_insert
  AFTER INSERT ON dispatch_policy.staged_jobs
  REFERENCING NEW TABLE AS new_jobs
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._backlog_inserted();
CREATE TRIGGER staged_jobs_backlog_delete
  AFTER DELETE ON dispatch_policy.staged_jobs
  REFERENCING OLD TABLE AS old_jobs
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._backlog_deleted();
CREATE TRIGGER staged_jobs_backlog_truncate
  AFTER TRUNCATE ON dispatch_policy.staged_jobs
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._backlog_truncated();

-- Counts a policy's backlog again from its staged jobs.
CREATE FUNCTION dispatch_policy._rebuild_backlog(policy text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
BEGIN
  -- A tick's admissions and stagers of the policy are waited for (the tick
  -- lock first, as a redeclare takes them), and wait for this until commit.
  PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(_rebuild_backlog.policy));
  PERFORM pg_advisory_xact_lock(dispatch_policy._partitions_lock_key(_rebuild_backlog.policy));
  DELETE FROM dispatch_policy.backlog_counters c WHERE c.policy = _rebuild_backlog.policy;
  INSERT INTO dispatch_policy.backlog_counters (policy, lane, staged)
  SELECT s.policy, s.round_robin_key, count(*)
  FROM dispatch_policy.staged_jobs s WHERE s.policy = _rebuild_backlog.policy
  GROUP BY 1, 2 ORDER BY 1, 2 NULLS LAST;
END
$$;
COMMENT ON FUNCTION dispatch_policy._rebuild_backlog(text) IS
  'Internal: counts a policy''s staged jobs per lane key into backlog_counters afresh, holding its tick lock and its partitions lock (exclusively) until commit. One scan of the policy''s staged jobs.';

CREATE FUNCTION dispatch_policy._policy_backlog_changed()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  -- Counter rows are deleted only while no stager of the policy runs (its
  -- partitions lock, exclusively: declare_policy and drop_policy hold it
  -- already; a direct write of the row takes it here): a stager holds them
  -- in sorted order, a DELETE would take them in any order.
  IF TG_OP = 'DELETE' THEN
    PERFORM pg_advisory_xact_lock(dispatch_policy._partitions_lock_key(OLD.name));
    DELETE FROM dispatch_policy.backlog_counters c WHERE c.policy = OLD.name;
    RETURN NULL;
  END IF;
  IF NOT NEW.config ? 'max_pending_per_partition' THEN
    IF TG_OP = 'UPDATE' AND OLD.config ? 'max_pending_per_partition' THEN
      PERFORM pg_advisory_xact_lock(dispatch_policy._partitions_lock_key(NEW.name));
      DELETE FROM dispatch_policy.backlog_counters c WHERE c.policy = NEW.name;
    END IF;
  ELSIF TG_OP = 'INSERT' OR NOT OLD.config ? 'max_pending_per_partition'
        OR OLD.lane_template IS DISTINCT FROM NEW.lane_template THEN
    PERFORM dispatch_policy._rebuild_backlog(NEW.name);
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._policy_backlog_changed() IS
  'Internal trigger: a policy that gains max_pending_per_partition, or keeps it with a changed lane_template (its keyless staged jobs get keys, 0012), has its backlog counted afresh; one that loses it, or is deleted, has its counters deleted.';
-- AFTER triggers fire in name order: after policies_lanes, which keys the
-- keyless staged jobs of a new lane_template.
CREATE TRIGGER policies_zz_backlog
  AFTER INSERT OR UPDATE OF config OR DELETE ON dispatch_policy.policies
  FOR EACH ROW EXECUTE FUNCTION dispatch_policy._policy_backlog_changed();

-- Policies declared before this migration have no cap; nothing to count.

-- What staging reads of a config (_staging_config, defined once in 0.2.0,
-- in 0024_cost_weights.sql, with the cost gates): a redeclare that changes
-- it must not overlap a stager (see declare_policy below).

-- declare_policy, defined once in 0.2.0 (validation in the policies_validate
-- trigger too, 0007; a replaced config recomputes the in-flight counters,
-- 0008): it validates first, so a bad config waits for nothing, then takes
-- the locks a redeclare needs before the config is written, in the order
-- every writer of a policy takes them: its tick lock (a tick under way ends
-- first; pause and drop_policy take it first too), its admitted jobs by id
-- (a worker failing or deferring a job holds its row, then takes the
-- partitions lock to stage it again), and, when what staging reads changes
-- (_staging_config), its partitions lock exclusively (a stager holds it
-- shared from before it reads the config until commit); then the policy row.
-- A stager therefore never stages under a config that a redeclare changes
-- before the stager commits (found by hostile testing: a stager that had
-- read the config without the lock staged past a cap being added, and its
-- triggers took counter rows out of order with the redeclare: deadlocks),
-- and never waits for a tick (the redeclare takes the partitions lock once
-- the tick lock is its own). A declare that changes nothing takes no lock.
CREATE OR REPLACE FUNCTION dispatch_policy.declare_policy(name text, config jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  old_config jsonb;
BEGIN
  -- Validation is the policies_validate trigger (so a direct write is
  -- checked too); here first as well, so a bad config waits for nothing.
  PERFORM dispatch_policy.validate_policy(declare_policy.name, declare_policy.config);
  IF EXISTS (SELECT 1 FROM dispatch_policy.policies p
             WHERE p.name = declare_policy.name AND p.config IS NOT DISTINCT FROM declare_policy.config) THEN
    RETURN;
  END IF;
  PERFORM pg_advisory_xact_lock(dispatch_policy._tick_lock_key(declare_policy.name));
  PERFORM 1 FROM dispatch_policy.admitted_jobs a WHERE a.policy = declare_policy.name ORDER BY a.id FOR UPDATE;
  SELECT p.config INTO old_config FROM dispatch_policy.policies p WHERE p.name = declare_policy.name;
  IF NOT FOUND OR dispatch_policy._staging_config(old_config) IS DISTINCT FROM dispatch_policy._staging_config(declare_policy.config) THEN
    PERFORM pg_advisory_xact_lock(dispatch_policy._partitions_lock_key(declare_policy.name));
  END IF;
  INSERT INTO dispatch_policy.policies AS p (name, config)
  VALUES (declare_policy.name, declare_policy.config)
  ON CONFLICT ON CONSTRAINT policies_pkey
  DO UPDATE SET config = EXCLUDED.config, updated_at = now()
  WHERE p.config IS DISTINCT FROM EXCLUDED.config;
END
$$;
COMMENT ON FUNCTION dispatch_policy.declare_policy(text, jsonb) IS
  'Creates or replaces a policy after validating its config (SQLSTATE 22023 naming the field on any problem; nothing is stored then). Replacing a config waits for a running tick of the policy, for workers finishing its admitted jobs and, when what staging reads changes (lane, partitioned gates, staging rules, costs), for its stagers under way, holding off new ones until commit (they then stage under the new config), and recomputes the in-flight counters from the admitted jobs under the new gates, in the same transaction. Declaring the same config again changes nothing and waits for nothing.';

-- ---------------------------------------------------------------------------
-- Finishing staged jobs as expired or dropped.

CREATE FUNCTION dispatch_policy._finish_staged(policy text, ids bigint[], status text, reasons text[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  n bigint;
BEGIN
  WITH gone AS (
    DELETE FROM dispatch_policy.staged_jobs s
    WHERE s.id = ANY (_finish_staged.ids) AND s.policy = _finish_staged.policy
    RETURNING s.*
  ), kept AS (
    INSERT INTO dispatch_policy.finished_jobs
      (id, policy, queue, priority, args, context, dedupe_key, attempts, status, last_error, created_at, finished_at)
    SELECT g.id, g.policy, g.queue, g.priority, g.args, g.context, g.dedupe_key, g.attempt - 1, _finish_staged.status,
           dispatch_policy._action_reason(r.reason), g.created_at, now()
    FROM gone g JOIN unnest(_finish_staged.ids, _finish_staged.reasons) AS r(id, reason) ON r.id = g.id
    ORDER BY g.id
  ), freed AS (
    DELETE FROM dispatch_policy.dedupe_keys d
    USING gone g
    WHERE g.dedupe_key IS NOT NULL AND d.policy = g.policy AND d.dedupe_key = g.dedupe_key AND d.job_id = g.id
  )
  SELECT count(*) INTO n FROM gone;
  RETURN n;
END
$$;
COMMENT ON FUNCTION dispatch_policy._finish_staged(text, bigint[], text, text[]) IS
  'Internal: moves the staged jobs of a policy with these ids (locked by the caller) to finished_jobs with this status (expired, dropped) and reasons[i] as the last_error of ids[i], and frees their dedupe keys. Their lanes are left to the fetch, which drops lanes it finds empty. Returns how many.';

CREATE FUNCTION dispatch_policy._expire_staged(policy text, now timestamptz)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
-- fetch_batch calls this with sorts priced out (enable_sort = off), which
-- would turn the sort by id below into a scan of the whole table in id
-- order (the primary key): found by LaneTests, 100,004 rows read for one
-- ready lane. The few expired rows sort in memory.
SET enable_sort = on
AS $$
DECLARE
  ids bigint[];
  reasons text[];
  max_wait interval;
BEGIN
  max_wait := (SELECT make_interval(secs => (p.config ->> 'max_wait')::double precision)
               FROM dispatch_policy.policies p WHERE p.name = _expire_staged.policy);
  -- Jobs a stager holds (replacing one) are skipped: the fetch skips them too.
  -- The reason names what set the deadline: max_wait when it is the time
  -- the job was staged (created_at: a retry's staged_at is later; a
  -- replace keeps both) + max_wait (found by hostile testing: it always
  -- said expires_at), else expires_at.
  -- Jobs scheduled at or after their deadline can never be admitted: they
  -- expire now, saying so (staged_jobs_unreachable_idx finds them).
  SELECT coalesce(array_agg(x.id ORDER BY x.id), '{}'),
         coalesce(array_agg(format('expired at %s (%s) before it was admitted%s',
                                   to_char(x.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                                   CASE WHEN x.expires_at = x.created_at + max_wait
                                        THEN format('max_wait %s s after it was staged',
                                                    trim_scale(extract(epoch FROM max_wait)))
                                        ELSE 'expires_at' END,
                                   CASE WHEN x.expires_at > _expire_staged.now
                                        THEN format(': finished early, at %s, since it was not to be admitted before %s',
                                                    to_char(_expire_staged.now AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                                                    to_char(x.not_before AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
                                        ELSE '' END) ORDER BY x.id), '{}')
  INTO ids, reasons
  FROM (SELECT * FROM (SELECT s.id, s.expires_at, s.created_at, s.not_before FROM dispatch_policy.staged_jobs s
                       WHERE s.policy = _expire_staged.policy AND s.expires_at IS NOT NULL
                         AND s.expires_at <= _expire_staged.now
                       ORDER BY s.id
                       FOR UPDATE SKIP LOCKED) passed
        UNION ALL
        SELECT * FROM (SELECT s.id, s.expires_at, s.created_at, s.not_before FROM dispatch_policy.staged_jobs s
                       WHERE s.policy = _expire_staged.policy AND s.not_before >= s.expires_at
                         AND s.expires_at > _expire_staged.now
                       ORDER BY s.id
                       FOR UPDATE SKIP LOCKED) unreachable) x;
  IF cardinality(ids) = 0 THEN
    RETURN 0::bigint;
  END IF;
  RETURN dispatch_policy._finish_staged(_expire_staged.policy, ids, 'expired', reasons);
END
$$;
COMMENT ON FUNCTION dispatch_policy._expire_staged(text, timestamptz) IS
  'Internal: finishes every staged job of a policy whose expires_at is at or before now as expired (last_error: when it expired, and whether max_wait or expires_at set the deadline), through staged_jobs_expires_idx, and every job scheduled at or after its deadline (not_before >= expires_at: it can never be admitted; last_error says it was finished early and why), through staged_jobs_unreachable_idx; jobs locked by another transaction are skipped (the fetch skips them as well). Returns how many.';

-- (promote_scheduled: its one definition in 0.2.0 is in
-- 0026_admit_integrity.sql, where the expiry is the fetch's alone.)

-- fetch_batch first expires the policy's jobs whose deadline passed, so it
-- returns none even when promote_scheduled did not run. (fetch_batch is
-- defined once in 0.2.0, in 0024_cost_weights.sql.)

-- ---------------------------------------------------------------------------
-- Staging with the rules: set-based (a statement per step for the whole
-- call: keys, replaces, the cap's check, one INSERT of the new jobs), with
-- the outcomes of staging the jobs one at a time in input order; the per-job
-- loop only for a single job (fewer statements) and where an element
-- depends on what an earlier one of the call did beyond counting:
-- drop_oldest in a partition that may overflow, and a key twice under
-- dedupe_mode replace.

-- The settings of the staging rules in a config (validated: see
-- validate_policy below).
CREATE FUNCTION dispatch_policy._staging_rules_apply(config jsonb)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT config ->> 'dedupe_mode' = 'replace' OR config ? 'max_pending_per_partition' OR config ? 'max_wait'
$$;
COMMENT ON FUNCTION dispatch_policy._staging_rules_apply(jsonb) IS
  'Internal: whether a config declares a staging rule (dedupe_mode replace, max_pending_per_partition, max_wait): its stagings go through _stage_rules.';

CREATE FUNCTION dispatch_policy._expires_at_problem(job jsonb, now timestamptz)
RETURNS text[]
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
BEGIN
  IF coalesce(jsonb_typeof(job -> 'expires_at'), 'null') = 'null' THEN
    RETURN NULL;
  END IF;
  IF jsonb_typeof(job -> 'expires_at') <> 'string' OR NOT dispatch_policy._is_timestamptz(job ->> 'expires_at')
     OR NOT isfinite((job ->> 'expires_at')::timestamptz) THEN
    RETURN ARRAY['22023', 'expires_at', 'must be a finite timestamp string or null'];
  END IF;
  IF (job ->> 'expires_at')::timestamptz <= now THEN
    RETURN ARRAY['22023', 'expires_at', 'must be later than now'];
  END IF;
  -- A job scheduled past its deadline could never be admitted (found by
  -- hostile testing: it was accepted, then expired unseen).
  IF jsonb_typeof(job -> 'not_before') = 'string' AND dispatch_policy._is_timestamptz(job ->> 'not_before')
     AND (job ->> 'expires_at')::timestamptz <= (job ->> 'not_before')::timestamptz THEN
    RETURN ARRAY['22023', 'expires_at', 'must be later than not_before (a job scheduled after its deadline could never be admitted)'];
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._expires_at_problem(jsonb, timestamptz) IS
  'Internal: the problem of a job spec''s expires_at as {sqlstate, field, rule} (22023: not a finite timestamp string, not later than now, or not later than the job''s not_before), NULL when absent, null or valid.';

CREATE FUNCTION dispatch_policy._stage_rules(policy text, jobs jsonb, field_prefix text)
RETURNS TABLE (idx integer, id bigint, outcome text)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
DECLARE
  pol dispatch_policy.policies;
  bad record;
  problem text[];
  replace_mode boolean;
  debounce interval;
  cap bigint;
  drop_oldest boolean;
  max_wait interval;
  total integer;
  job jsonb;
  job_context jsonb;
  job_queue text;
  job_priority integer;
  job_lane text;
  job_due timestamptz;
  job_expires timestamptz;
  job_key text;
  new_id bigint;
  holder bigint;
  old dispatch_policy.staged_jobs;
  backlog bigint;
  victims bigint[];
  drop_new boolean := false;
  ids bigint[] := '{}'::bigint[];
  outcomes text[] := '{}'::text[];
  dropped bigint[] := '{}'::bigint[];
  notify boolean := false;
  lanes_now text[] := '{}'::text[];
  lane_keys text[];
  old_lanes text[] := '{}'::text[];
  -- The set-based path: the elements, as arrays in input order.
  set_based boolean;
  e_job jsonb[];
  e_context jsonb[];
  e_lane text[];
  e_key text[];
  e_id bigint[];
  -- Each key's first element (f_keys sorted), the keys taken, their holders.
  f_keys text[];
  f_ns integer[];
  todo text[];
  got_keys text[];
  got_ids bigint[];
  h_keys text[] := '{}'::text[];
  h_ids bigint[] := '{}'::bigint[];
  extra text[];
  -- The elements that replace a staged job: element, job, its lane, its staged_at.
  rp_n integer[] := '{}'::integer[];
  rp_id bigint[];
  rp_old_lane text[];
  rp_created timestamptz[];
  over_cap boolean := false;
BEGIN
  -- As _stage: the templates read next stay the policy's until commit.
  PERFORM pg_advisory_xact_lock_shared(dispatch_policy._partitions_lock_key(_stage_rules.policy));
  SELECT * INTO pol FROM dispatch_policy.policies p WHERE p.name = _stage_rules.policy;
  IF NOT FOUND THEN
    PERFORM dispatch_policy._require_policy(_stage_rules.policy);
  END IF;
  IF jobs IS NULL OR jsonb_typeof(jobs) <> 'array' THEN
    RAISE EXCEPTION 'jobs must be a JSON array of job objects'
      USING ERRCODE = '22023', DETAIL = format('jobs is %s.', coalesce('a JSON ' || jsonb_typeof(jobs), 'NULL')),
            HINT = 'Pass [{"args": ...}, ...]. Nothing was stored.';
  END IF;

  -- Every element first, as _stage: the first problem, named.
  SELECT t.n - 1 AS idx, t.job,
         coalesce(
           dispatch_policy._job_spec_problem(
             CASE WHEN jsonb_typeof(t.job) = 'object' THEN t.job - 'expires_at' ELSE t.job END,
             dispatch_policy._limit_max('job.queue')::integer, dispatch_policy._limit_max('job.dedupe_key')::integer,
             dispatch_policy._limit_max('job.round_robin_key')::integer, dispatch_policy._limit_max('job.context')::integer),
           CASE WHEN coalesce(jsonb_typeof(t.job -> 'not_before'), 'null') = 'string'
                     AND NOT (dispatch_policy._is_timestamptz(t.job ->> 'not_before')
                              AND isfinite((t.job ->> 'not_before')::timestamptz))
                THEN ARRAY['22023', 'not_before', 'must be a finite timestamp'] END,
           dispatch_policy._expires_at_problem(t.job, now())) AS problem
  INTO bad
  FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n)
  WHERE coalesce(
          dispatch_policy._job_spec_problem(
            CASE WHEN jsonb_typeof(t.job) = 'object' THEN t.job - 'expires_at' ELSE t.job END,
            dispatch_policy._limit_max('job.queue')::integer, dispatch_policy._limit_max('job.dedupe_key')::integer,
            dispatch_policy._limit_max('job.round_robin_key')::integer, dispatch_policy._limit_max('job.context')::integer),
          CASE WHEN coalesce(jsonb_typeof(t.job -> 'not_before'), 'null') = 'string'
                    AND NOT (dispatch_policy._is_timestamptz(t.job ->> 'not_before')
                             AND isfinite((t.job ->> 'not_before')::timestamptz))
               THEN ARRAY['22023', 'not_before', 'must be a finite timestamp'] END,
          dispatch_policy._expires_at_problem(t.job, now())) IS NOT NULL
  ORDER BY t.n
  LIMIT 1;
  IF FOUND THEN
    problem := bad.problem;
    IF problem[3] LIKE 'is not a known field (known: %' THEN
      problem[3] := 'is not a known field (known: args, context, dedupe_key, round_robin_key, queue, priority, not_before, expires_at)';
    END IF;
    RAISE EXCEPTION '% %', rtrim(format(field_prefix, bad.idx) || problem[2], '.'), problem[3]
      USING ERRCODE = problem[1],
            DETAIL = format('%s is %s.', rtrim(format(field_prefix, bad.idx) || problem[2], '.'),
                            coalesce(left(CASE WHEN problem[2] = '' THEN bad.job ELSE bad.job -> problem[2] END::text, 200),
                                     'missing')),
            HINT = CASE WHEN problem[3] LIKE 'must be later than not_before%'
                        THEN 'Give the job an expires_at after its not_before, or none. Nothing was stored.'
                        WHEN problem[2] IN ('not_before', 'expires_at')
                        THEN 'Use ISO 8601, such as 2026-01-31T12:00:00Z. Nothing was stored.'
                        ELSE 'Nothing was stored.' END;
  END IF;

  replace_mode := coalesce(pol.config ->> 'dedupe_mode' = 'replace', false);
  debounce := make_interval(secs => coalesce((pol.config ->> 'debounce')::double precision, 0));
  cap := (pol.config ->> 'max_pending_per_partition')::numeric::bigint;  -- 5.0 is valid JSON for 5
  drop_oldest := coalesce(pol.config ->> 'on_overflow' = 'drop_oldest', false);
  max_wait := make_interval(secs => (pol.config ->> 'max_wait')::double precision);
  total := jsonb_array_length(jobs);

  -- The elements once: their keys; their contexts and lanes too for the
  -- set-based path and the cap's counter rows (a statement that costs a
  -- single job about as much as staging it: not for one without a cap).
  e_key := ARRAY(SELECT t.job ->> 'dedupe_key' FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n) ORDER BY t.n);
  IF total > 1 OR cap IS NOT NULL THEN
    SELECT coalesce(array_agg(y.job ORDER BY y.n), '{}'), coalesce(array_agg(y.context ORDER BY y.n), '{}'),
           coalesce(array_agg(dispatch_policy._round_robin_key(pol.lane_template, y.context, y.job ->> 'round_robin_key')
                              ORDER BY y.n), '{}')
    INTO e_job, e_context, e_lane
    FROM (SELECT t.n, t.job,
                 jsonb_build_object('queue_name', coalesce(t.job ->> 'queue', 'default'),
                                    'priority', coalesce((t.job ->> 'priority')::numeric::integer, 0))
                   || coalesce(nullif(t.job -> 'context', 'null'::jsonb), '{}'::jsonb) AS context
          FROM jsonb_array_elements(jobs) WITH ORDINALITY AS t(job, n)) y;
  END IF;
  -- Set-based for two jobs or more (for one, the loop takes fewer
  -- statements), unless an element replaces a job an earlier element of
  -- the same call staged or replaced (a key twice under dedupe_mode
  -- replace); drop_oldest decides below, once the counters are held.
  set_based := total > 1 AND NOT (replace_mode AND (SELECT count(k) <> count(DISTINCT k) FROM unnest(e_key) AS k));

  -- This call's dedupe keys, in sorted order, before anything else: the
  -- staging below takes them in input order (the per-job loop) or in
  -- sorted order, and two calls with the same keys in opposite orders
  -- would take them crosswise. Namespaced advisory locks, held until
  -- commit; only this path takes them (every staging of a policy with
  -- staging rules comes here).
  PERFORM pg_advisory_xact_lock(hashtext('dispatch_policy.dedupe.' || _stage_rules.policy || '.' || k.key))
  FROM (SELECT DISTINCT k AS key FROM unnest(e_key) AS k WHERE k IS NOT NULL ORDER BY 1) k;

  -- Replace: the staged jobs that hold this call's keys, locked first (by
  -- id), before any counter row: a tick locks the jobs it fetched before it
  -- takes their counter rows (the delete trigger), so taking them in the
  -- same order cannot deadlock with it; a job the tick admits meanwhile is
  -- gone when this lock is granted, and is kept. A holder not locked here
  -- (one staged by another transaction since) is locked in the loop below
  -- only if free (SKIP LOCKED), else kept: nothing waits while counter rows
  -- are held.
  IF replace_mode THEN
    SELECT coalesce(array_agg(x.round_robin_key), '{}') INTO old_lanes
    FROM (SELECT s.round_robin_key FROM dispatch_policy.staged_jobs s
          WHERE s.id IN (SELECT d.job_id FROM dispatch_policy.dedupe_keys d
                         WHERE d.policy = _stage_rules.policy
                           AND d.dedupe_key IN (SELECT unnest(e_key)))
          ORDER BY s.id
          FOR UPDATE) x;
  END IF;

  -- The cap: the counter rows of every lane of this call (and of the jobs
  -- it may replace), locked in sorted order before anything is staged
  -- (stagers of several partitions cannot deadlock), held until commit.
  IF cap IS NOT NULL THEN
    SELECT coalesce(array_agg(DISTINCT k), '{}') INTO lane_keys
    FROM (SELECT e FROM unnest(e_lane) AS e
          UNION ALL
          SELECT o FROM unnest(old_lanes) AS o) l(k);
    INSERT INTO dispatch_policy.backlog_counters AS c (policy, lane, staged)
    SELECT _stage_rules.policy, k, 0 FROM unnest(lane_keys) AS k ORDER BY k NULLS LAST
    ON CONFLICT (policy, lane) DO NOTHING;
    PERFORM 1 FROM dispatch_policy.backlog_counters c
    WHERE c.policy = _stage_rules.policy AND (c.lane = ANY (lane_keys) OR (c.lane IS NULL AND array_position(lane_keys, NULL) IS NOT NULL))
    ORDER BY c.lane NULLS LAST
    FOR UPDATE;
  END IF;

  -- drop_oldest: set-based when no partition can overflow, even if every
  -- element were a new job (its counter plus its elements at most the cap);
  -- else the loop below, job by job. reject: the exact check below, only
  -- when that bound is passed.
  IF set_based AND cap IS NOT NULL THEN
    SELECT EXISTS (SELECT 1
                   FROM (SELECT l.lane, count(*) AS n FROM unnest(e_lane) AS l(lane) GROUP BY 1) g
                   LEFT JOIN dispatch_policy.backlog_counters c
                     ON c.policy = _stage_rules.policy AND c.lane IS NOT DISTINCT FROM g.lane
                   WHERE coalesce(c.staged, 0) + g.n > cap)
    INTO over_cap;
    IF over_cap AND drop_oldest THEN
      set_based := false;
    END IF;
  END IF;

  IF set_based THEN
    -- Set-based: the same outcomes as the loop below, in a few statements.
    -- An id for every element, in input order, as the loop takes them.
    e_id := ARRAY(SELECT nextval('dispatch_policy.job_ids') FROM generate_series(1, total));
    -- Each key's first element takes it (its id), or finds the job that
    -- holds it; a key freed between the two (its job finished) is tried
    -- again. A later element with the same key (dedupe_mode keep only) is
    -- kept by whichever job holds it.
    SELECT coalesce(array_agg(f.key ORDER BY f.key), '{}'), coalesce(array_agg(f.n ORDER BY f.key), '{}')
    INTO f_keys, f_ns
    FROM (SELECT DISTINCT ON (e.key) e.key, e.n::integer AS n
          FROM unnest(e_key) WITH ORDINALITY AS e(key, n)
          WHERE e.key IS NOT NULL
          ORDER BY e.key, e.n) f;
    todo := f_keys;
    WHILE cardinality(todo) > 0 LOOP
      WITH taken AS (
        INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
        SELECT _stage_rules.policy, f.key, e_id[f.n]
        FROM unnest(f_keys, f_ns) AS f(key, n)
        WHERE f.key IN (SELECT unnest(todo))
        ORDER BY f.key
        ON CONFLICT ON CONSTRAINT dedupe_keys_pkey DO NOTHING
        RETURNING dedupe_keys.dedupe_key
      )
      SELECT coalesce(array_agg(t.dedupe_key), '{}') INTO got_keys FROM taken t;
      todo := ARRAY(SELECT unnest(todo) EXCEPT SELECT unnest(got_keys));
      CONTINUE WHEN cardinality(todo) = 0;
      SELECT coalesce(array_agg(d.dedupe_key), '{}'), coalesce(array_agg(d.job_id), '{}') INTO got_keys, got_ids
      FROM dispatch_policy.dedupe_keys d
      WHERE d.policy = _stage_rules.policy AND d.dedupe_key IN (SELECT unnest(todo));
      h_keys := h_keys || got_keys;
      h_ids := h_ids || got_ids;
      todo := ARRAY(SELECT unnest(todo) EXCEPT SELECT unnest(got_keys));
    END LOOP;

    -- Replace: the holders still staged, locked if free (the ones locked
    -- above are this transaction's); one moving out of a lane whose counter
    -- row is not held takes it only if free, else it is kept.
    IF replace_mode AND cardinality(h_ids) > 0 THEN
      SELECT coalesce(array_agg(f.n ORDER BY f.n), '{}'), coalesce(array_agg(x.id ORDER BY f.n), '{}'),
             coalesce(array_agg(x.round_robin_key ORDER BY f.n), '{}'), coalesce(array_agg(x.created_at ORDER BY f.n), '{}')
      INTO rp_n, rp_id, rp_old_lane, rp_created
      FROM (SELECT s.id, s.round_robin_key, s.created_at FROM dispatch_policy.staged_jobs s
            WHERE s.id IN (SELECT unnest(h_ids))
            ORDER BY s.id
            FOR UPDATE SKIP LOCKED) x
      JOIN unnest(h_keys, h_ids) AS h(key, id) ON h.id = x.id
      JOIN unnest(f_keys, f_ns) AS f(key, n) ON f.key = h.key;
      IF cap IS NOT NULL AND cardinality(rp_n) > 0 THEN
        extra := ARRAY(SELECT DISTINCT r.old_lane
                       FROM unnest(rp_n, rp_old_lane) AS r(n, old_lane)
                       JOIN unnest(e_lane) WITH ORDINALITY AS e(lane, n) ON e.n = r.n
                       WHERE r.old_lane IS DISTINCT FROM e.lane AND array_position(lane_keys, r.old_lane) IS NULL);
        IF cardinality(extra) > 0 THEN
          SELECT lane_keys || coalesce(array_agg(x.lane), '{}') INTO lane_keys
          FROM (SELECT c.lane FROM dispatch_policy.backlog_counters c
                WHERE c.policy = _stage_rules.policy
                  AND (c.lane = ANY (extra) OR (c.lane IS NULL AND array_position(extra, NULL) IS NOT NULL))
                ORDER BY c.lane NULLS LAST
                FOR UPDATE SKIP LOCKED) x;
          SELECT coalesce(array_agg(r.n ORDER BY r.n), '{}'), coalesce(array_agg(r.id ORDER BY r.n), '{}'),
                 coalesce(array_agg(r.old_lane ORDER BY r.n), '{}'), coalesce(array_agg(r.created_at ORDER BY r.n), '{}')
          INTO rp_n, rp_id, rp_old_lane, rp_created
          FROM unnest(rp_n, rp_id, rp_old_lane, rp_created) AS r(n, id, old_lane, created_at)
          JOIN unnest(e_lane) WITH ORDINALITY AS e(lane, n) ON e.n = r.n
          WHERE r.old_lane IS NOT DISTINCT FROM e.lane OR array_position(lane_keys, r.old_lane) IS NOT NULL;
        END IF;
      END IF;
    END IF;

    -- Each element's outcome and id.
    SELECT array_agg(CASE WHEN e.key IS NULL OR (f.n = e.n AND h.id IS NULL) THEN e.id
                          WHEN h.id IS NOT NULL THEN h.id
                          ELSE e_id[f.n] END ORDER BY e.n),
           array_agg(CASE WHEN e.key IS NULL OR (f.n = e.n AND h.id IS NULL) THEN 'inserted'
                          WHEN f.n = e.n AND r.n IS NOT NULL THEN 'replaced'
                          ELSE 'kept' END ORDER BY e.n)
    INTO ids, outcomes
    FROM unnest(e_key, e_id) WITH ORDINALITY AS e(key, id, n)
    LEFT JOIN unnest(f_keys, f_ns) AS f(key, n) ON f.key = e.key
    LEFT JOIN unnest(h_keys, h_ids) AS h(key, id) ON h.key = e.key
    LEFT JOIN unnest(rp_n) AS r(n) ON r.n = e.n;

    -- reject: the first new job over the cap, counted as the loop counts
    -- (the partition's counter, the new jobs before it, the replaces before
    -- it moving a job in or out), refuses the call.
    IF over_cap THEN
      SELECT x.n, x.lane, x.backlog INTO bad
      FROM (SELECT v.n, v.lane, v.is_new,
                   coalesce((SELECT c.staged FROM dispatch_policy.backlog_counters c
                             WHERE c.policy = _stage_rules.policy AND c.lane IS NOT DISTINCT FROM v.lane), 0)
                   + coalesce(sum(v.delta) OVER (PARTITION BY v.lane ORDER BY v.n ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                     AS backlog
            FROM (SELECT e.n::integer AS n, e.lane, 1 AS delta, true AS is_new
                  FROM unnest(e_lane, outcomes) WITH ORDINALITY AS e(lane, outcome, n)
                  WHERE e.outcome = 'inserted'
                  UNION ALL
                  SELECT r.n, m.lane, m.delta, false
                  FROM unnest(rp_n, rp_old_lane) AS r(n, old_lane)
                  JOIN unnest(e_lane) WITH ORDINALITY AS e(lane, n) ON e.n = r.n
                  CROSS JOIN LATERAL (VALUES (r.old_lane, -1), (e.lane, 1)) AS m(lane, delta)
                  WHERE r.old_lane IS DISTINCT FROM e.lane) v) x
      WHERE x.is_new AND x.backlog + 1 > cap
      ORDER BY x.n
      LIMIT 1;
      IF FOUND THEN
        RAISE EXCEPTION 'partition % of policy % is full: max_pending_per_partition is %',
                        coalesce(quote_literal(bad.lane), '(jobs without a round-robin key)'), quote_literal(_stage_rules.policy), cap
          USING ERRCODE = 'DP002',
                DETAIL = format('%s: the partition holds %s staged job(s) and on_overflow is reject.',
                                CASE WHEN field_prefix = '' THEN 'the job' ELSE format('jobs[%s]', bad.n - 1) END, bad.backlog),
                HINT = 'Stage it again once the partition''s backlog is admitted (or raise max_pending_per_partition, or declare on_overflow drop_oldest). Nothing was stored.';
      END IF;
    END IF;

    -- The replaces: one UPDATE (the row triggers render the partitions
    -- again and move their counts, 0020; a lane made eligible is added by
    -- the staged_jobs_lanes trigger, 0012), their deadlines, and the counts
    -- of the jobs moving between partitions (their counter rows are held).
    IF cardinality(rp_n) > 0 THEN
      WITH r AS (
        SELECT r.id, e.job, e.context, e.lane,
               CASE WHEN (e.job ->> 'not_before')::timestamptz > now() THEN (e.job ->> 'not_before')::timestamptz END AS due,
               -- The deadline of max_wait runs from the job's created_at,
               -- which a replace, a retry and a deferral keep.
               CASE WHEN max_wait IS NULL THEN (e.job ->> 'expires_at')::timestamptz
                    ELSE least((e.job ->> 'expires_at')::timestamptz, r.created_at + max_wait) END AS expires
        FROM unnest(rp_n, rp_id, rp_created) AS r(n, id, created_at)
        JOIN unnest(e_job, e_context, e_lane) WITH ORDINALITY AS e(job, context, lane, n) ON e.n = r.n
      ), replaced AS (
        UPDATE dispatch_policy.staged_jobs s
        SET args = r.job -> 'args', context = r.context, queue = coalesce(r.job ->> 'queue', 'default'),
            priority = coalesce((r.job ->> 'priority')::numeric::integer, 0),
            round_robin_key = r.lane, partitions = NULL, expires_at = r.expires,
            not_before = greatest(s.not_before, r.due, CASE WHEN debounce > interval '0' THEN now() + debounce END)
        FROM r
        WHERE s.id = r.id
      ), kept_deadlines AS (
        INSERT INTO dispatch_policy.job_deadlines AS d (job_id, policy, expires_at)
        SELECT r.id, _stage_rules.policy, r.expires FROM r WHERE r.expires IS NOT NULL ORDER BY r.id
        ON CONFLICT (job_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
      )
      DELETE FROM dispatch_policy.job_deadlines d
      WHERE d.job_id IN (SELECT r.id FROM r WHERE r.expires IS NULL);
      IF cap IS NOT NULL THEN
        UPDATE dispatch_policy.backlog_counters c SET staged = greatest(c.staged + m.delta, 0)
        FROM (SELECT m.lane, sum(m.delta) AS delta
              FROM unnest(rp_n, rp_old_lane) AS r(n, old_lane)
              JOIN unnest(e_lane) WITH ORDINALITY AS e(lane, n) ON e.n = r.n
              CROSS JOIN LATERAL (VALUES (r.old_lane, -1), (e.lane, 1)) AS m(lane, delta)
              WHERE r.old_lane IS DISTINCT FROM e.lane
              GROUP BY 1) m
        WHERE c.policy = _stage_rules.policy AND c.lane IS NOT DISTINCT FROM m.lane AND m.delta <> 0;
      END IF;
    END IF;

    -- The new jobs: one INSERT (the statement triggers count them once),
    -- and their deadlines.
    WITH staged AS (
      INSERT INTO dispatch_policy.staged_jobs
        (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, partitions, expires_at)
      SELECT e.id, _stage_rules.policy, coalesce(e.job ->> 'queue', 'default'), coalesce((e.job ->> 'priority')::numeric::integer, 0),
             e.job -> 'args', e.context, e.key, e.lane,
             CASE WHEN (e.job ->> 'not_before')::timestamptz > now() THEN (e.job ->> 'not_before')::timestamptz END,
             dispatch_policy._render_partitions(pol.partition_gates, pol.partition_templates, pol.partition_prefixes,
                                                pol.partition_keys, pol.partition_suffixes, e.context),
             CASE WHEN max_wait IS NULL THEN (e.job ->> 'expires_at')::timestamptz
                  ELSE least((e.job ->> 'expires_at')::timestamptz, now() + max_wait) END
      FROM unnest(e_job, e_context, e_lane, e_key, e_id, outcomes) WITH ORDINALITY AS e(job, context, lane, key, id, outcome, n)
      WHERE e.outcome = 'inserted'
      ORDER BY e.n
      RETURNING staged_jobs.id, staged_jobs.expires_at
    )
    INSERT INTO dispatch_policy.job_deadlines (job_id, policy, expires_at)
    SELECT s.id, _stage_rules.policy, s.expires_at FROM staged s WHERE s.expires_at IS NOT NULL ORDER BY s.id;

    PERFORM dispatch_policy._add_lanes(_stage_rules.policy,
      ARRAY(SELECT e.lane FROM unnest(e_lane, outcomes, e_job) WITH ORDINALITY AS e(lane, outcome, job, n)
            WHERE e.outcome = 'inserted' AND NOT coalesce((e.job ->> 'not_before')::timestamptz > now(), false)
            ORDER BY e.n));
    IF 'inserted' = ANY (outcomes) OR cardinality(rp_n) > 0 THEN
      PERFORM pg_notify('dispatch_policy_staged', _stage_rules.policy);
    END IF;
    RETURN QUERY
      SELECT t.n::integer, t.id, t.outcome
      FROM unnest(ids, outcomes) WITH ORDINALITY AS t(id, outcome, n)
      ORDER BY t.n;
    RETURN;
  END IF;

  -- The loop: one job, a policy with drop_oldest whose partitions may
  -- overflow, or a call with a key twice under dedupe_mode replace.
  FOR n IN 1 .. total LOOP
    job := jobs -> (n - 1);
    job_queue := coalesce(job ->> 'queue', 'default');
    job_priority := coalesce((job ->> 'priority')::numeric::integer, 0);
    job_context := jsonb_build_object('queue_name', job_queue, 'priority', job_priority)
                   || coalesce(nullif(job -> 'context', 'null'::jsonb), '{}'::jsonb);
    job_lane := dispatch_policy._round_robin_key(pol.lane_template, job_context, job ->> 'round_robin_key');
    job_due := (job ->> 'not_before')::timestamptz;
    IF job_due <= now() THEN
      job_due := NULL;
    END IF;
    job_expires := (job ->> 'expires_at')::timestamptz;
    IF max_wait IS NOT NULL AND (job_expires IS NULL OR now() + max_wait < job_expires) THEN
      job_expires := now() + max_wait;
    END IF;
    job_key := job ->> 'dedupe_key';
    new_id := nextval('dispatch_policy.job_ids');

    IF job_key IS NOT NULL THEN
      -- The key, or the job that holds it; a key freed between the two
      -- (its job finished) is taken on the next turn.
      holder := NULL;
      LOOP
        INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
        VALUES (_stage_rules.policy, job_key, new_id)
        ON CONFLICT ON CONSTRAINT dedupe_keys_pkey DO NOTHING;
        EXIT WHEN FOUND;
        SELECT d.job_id INTO holder FROM dispatch_policy.dedupe_keys d
        WHERE d.policy = _stage_rules.policy AND d.dedupe_key = job_key;
        EXIT WHEN holder IS NOT NULL;
      END LOOP;
      IF holder IS NOT NULL THEN
        old := NULL;
        IF replace_mode AND holder IS NOT NULL THEN
          SELECT * INTO old FROM dispatch_policy.staged_jobs s WHERE s.id = holder FOR UPDATE SKIP LOCKED;
        END IF;
        IF old.id IS NOT NULL AND cap IS NOT NULL AND old.round_robin_key IS DISTINCT FROM job_lane
           AND array_position(lane_keys, old.round_robin_key) IS NULL THEN
          -- A holder staged since the locks above, moving out of a lane
          -- whose counter row is not held: taken only if free, else kept.
          PERFORM 1 FROM dispatch_policy.backlog_counters c
          WHERE c.policy = _stage_rules.policy AND c.lane IS NOT DISTINCT FROM old.round_robin_key
          FOR UPDATE SKIP LOCKED;
          IF FOUND THEN
            lane_keys := lane_keys || old.round_robin_key;
          ELSE
            old := NULL;
          END IF;
        END IF;
        IF old.id IS NOT NULL AND max_wait IS NOT NULL THEN
          -- The deadline of max_wait runs from the job's created_at, which
          -- a replace, a retry and a deferral keep (found by hostile
          -- testing: it ran from the replace, so a job replaced often
          -- enough never expired; then from staged_at, which a retry or a
          -- deferral resets).
          job_expires := least((job ->> 'expires_at')::timestamptz, old.created_at + max_wait);
        END IF;
        IF old.id IS NOT NULL THEN
          -- Replace: args, context and what derives from it; the id, the
          -- attempt and staged_at stay. The row triggers render the
          -- partitions again and move their counts (0020); a lane made
          -- eligible is added by the staged_jobs_lanes trigger (0012).
          UPDATE dispatch_policy.staged_jobs s
          SET args = job -> 'args', context = job_context, queue = job_queue, priority = job_priority,
              round_robin_key = job_lane, partitions = NULL, expires_at = job_expires,
              not_before = greatest(s.not_before, job_due, CASE WHEN debounce > interval '0' THEN now() + debounce END)
          WHERE s.id = old.id;
          IF job_expires IS NOT NULL THEN
            INSERT INTO dispatch_policy.job_deadlines AS d (job_id, policy, expires_at)
            VALUES (old.id, _stage_rules.policy, job_expires)
            ON CONFLICT (job_id) DO UPDATE SET expires_at = EXCLUDED.expires_at;
          ELSE
            DELETE FROM dispatch_policy.job_deadlines d WHERE d.job_id = old.id;
          END IF;
          IF cap IS NOT NULL AND old.round_robin_key IS DISTINCT FROM job_lane THEN
            -- The job moves between partitions: its count moves with it (the
            -- new lane's row is held already; the old one is taken now).
            UPDATE dispatch_policy.backlog_counters c SET staged = greatest(c.staged - 1, 0)
            WHERE c.policy = _stage_rules.policy AND c.lane IS NOT DISTINCT FROM old.round_robin_key;
            UPDATE dispatch_policy.backlog_counters c SET staged = c.staged + 1
            WHERE c.policy = _stage_rules.policy AND c.lane IS NOT DISTINCT FROM job_lane;
          END IF;
          ids := ids || old.id;
          outcomes := outcomes || 'replaced'::text;
          notify := true;
          CONTINUE;
        END IF;
        ids := ids || holder;
        outcomes := outcomes || 'kept'::text;
        CONTINUE;
      END IF;
    END IF;

    -- A new job. Over the cap: refuse (the whole call), or drop the oldest.
    IF cap IS NOT NULL THEN
      SELECT c.staged INTO backlog FROM dispatch_policy.backlog_counters c
      WHERE c.policy = _stage_rules.policy AND c.lane IS NOT DISTINCT FROM job_lane;
      IF coalesce(backlog, 0) + 1 > cap THEN
        IF NOT drop_oldest THEN
          RAISE EXCEPTION 'partition % of policy % is full: max_pending_per_partition is %',
                          coalesce(quote_literal(job_lane), '(jobs without a round-robin key)'), quote_literal(_stage_rules.policy), cap
            USING ERRCODE = 'DP002',
                  DETAIL = format('%s: the partition holds %s staged job(s) and on_overflow is reject.',
                                  CASE WHEN field_prefix = '' THEN 'the job' ELSE format('jobs[%s]', n - 1) END, coalesce(backlog, 0)),
                  HINT = 'Stage it again once the partition''s backlog is admitted (or raise max_pending_per_partition, or declare on_overflow drop_oldest). Nothing was stored.';
        END IF;
        -- The oldest jobs that are free, down to the cap (one more than
        -- the cap's excess: the new job takes a place). A job another
        -- transaction holds (a tick admitting it, a cancel, a SELECT ...
        -- FOR UPDATE) is passed over, never waited for: this holds the
        -- partition's counter row, which a tick admitting that job takes
        -- next (found by hostile testing: waiting deadlocks, and taking
        -- fewer victims left 3 jobs in a partition capped at 2). When too
        -- few are free, the new job is dropped as well, right after it is
        -- stored (below): a stage never leaves its partition above the cap.
        IF job_lane IS NULL THEN
          SELECT coalesce(array_agg(x.id ORDER BY x.id), '{}') INTO victims
          FROM (SELECT s.id FROM dispatch_policy.staged_jobs s
                WHERE s.policy = _stage_rules.policy AND s.round_robin_key IS NULL
                ORDER BY s.id LIMIT coalesce(backlog, 0) + 1 - cap FOR UPDATE SKIP LOCKED) x;
        ELSE
          SELECT coalesce(array_agg(x.id ORDER BY x.id), '{}') INTO victims
          FROM (SELECT s.id FROM dispatch_policy.staged_jobs s
                WHERE s.policy = _stage_rules.policy AND s.round_robin_key = job_lane
                ORDER BY s.round_robin_key, s.id LIMIT coalesce(backlog, 0) + 1 - cap FOR UPDATE SKIP LOCKED) x;
        END IF;
        drop_new := cardinality(victims) < coalesce(backlog, 0) + 1 - cap;
        PERFORM dispatch_policy._finish_staged(
          _stage_rules.policy, victims, 'dropped',
          array_fill(format('dropped: partition %s of policy %s was at max_pending_per_partition %s (on_overflow drop_oldest)',
                            coalesce(quote_literal(job_lane), '(jobs without a round-robin key)'),
                            quote_literal(_stage_rules.policy), cap)::text,
                     ARRAY[cardinality(victims)]));
        dropped := dropped || victims;
      END IF;
    END IF;

    INSERT INTO dispatch_policy.staged_jobs
      (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, partitions, expires_at)
    VALUES (new_id, _stage_rules.policy, job_queue, job_priority, job -> 'args', job_context, job_key, job_lane, job_due,
            dispatch_policy._render_partitions(pol.partition_gates, pol.partition_templates, pol.partition_prefixes,
                                               pol.partition_keys, pol.partition_suffixes, job_context),
            job_expires);
    IF job_expires IS NOT NULL THEN
      INSERT INTO dispatch_policy.job_deadlines (job_id, policy, expires_at) VALUES (new_id, _stage_rules.policy, job_expires);
    END IF;
    ids := ids || new_id;
    outcomes := outcomes || 'inserted'::text;
    IF drop_new THEN
      -- Too few older jobs were free to drop (above): the new job goes.
      PERFORM dispatch_policy._finish_staged(
        _stage_rules.policy, ARRAY[new_id], 'dropped',
        ARRAY[format('dropped: partition %s of policy %s was at max_pending_per_partition %s (on_overflow drop_oldest) and every older job of it was held by another transaction (a tick admitting it, for one)',
                     coalesce(quote_literal(job_lane), '(jobs without a round-robin key)'),
                     quote_literal(_stage_rules.policy), cap)]);
      dropped := dropped || new_id;
      drop_new := false;
      CONTINUE;
    END IF;
    IF job_due IS NULL THEN
      lanes_now := lanes_now || job_lane;
    END IF;
    notify := true;
  END LOOP;

  PERFORM dispatch_policy._add_lanes(_stage_rules.policy, lanes_now);
  IF notify THEN
    PERFORM pg_notify('dispatch_policy_staged', _stage_rules.policy);
  END IF;
  RETURN QUERY
    SELECT t.n::integer, t.id, CASE WHEN t.id = ANY (dropped) THEN 'dropped' ELSE t.outcome END
    FROM unnest(ids, outcomes) WITH ORDINALITY AS t(id, outcome, n)
    ORDER BY t.n;
END
$$;
COMMENT ON FUNCTION dispatch_policy._stage_rules(text, jsonb, text) IS
  'Internal: stages a JSON array of job specs with the policy''s staging rules (dedupe_mode and debounce, max_pending_per_partition and on_overflow, max_wait) and each job''s expires_at, with the outcomes of staging them one at a time in order; checks every element first (nothing stored if one is bad). Returns (idx, id, outcome) per element. Locks the backlog counter rows of its lanes in sorted order before staging anything (capped policies). Set-based (one INSERT of the new jobs, one UPDATE of the replaced ones, counters written once per statement), except for a single job, under drop_oldest when a partition''s counter plus its elements exceeds the cap, and for a dedupe_key twice in the call under dedupe_mode replace: one job at a time then. A reject (DP002) aborts the whole call.';

-- The one place outcomes are made: the rules path for a policy with rules
-- or a job with expires_at; else _stage (0020), whose NULLs are keys held
-- already: kept, by the job that holds the key.
CREATE FUNCTION dispatch_policy._stage_outcomes(policy text, jobs jsonb, field_prefix text)
RETURNS TABLE (idx integer, id bigint, outcome text)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
DECLARE
  config jsonb;
  ids bigint[];
  holder bigint;
  kept integer[] := '{}'::integer[];
  inserted integer[] := '{}'::integer[];
BEGIN
  SELECT p.config INTO config FROM dispatch_policy.policies p WHERE p.name = _stage_outcomes.policy;
  IF dispatch_policy._staging_rules_apply(config)
     OR (jsonb_typeof(jobs) = 'array'
         AND EXISTS (SELECT 1 FROM jsonb_array_elements(jobs) AS t(job)
                     WHERE CASE WHEN jsonb_typeof(t.job) = 'object'
                                THEN t.job - ARRAY['args', 'context', 'dedupe_key', 'round_robin_key', 'queue', 'priority',
                                                   'not_before'] <> '{}'::jsonb
                                ELSE false END)) THEN
    RETURN QUERY SELECT r.idx, r.id, r.outcome FROM dispatch_policy._stage_rules(_stage_outcomes.policy, jobs, field_prefix) r;
    RETURN;
  END IF;
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
  RETURN QUERY
    SELECT t.n::integer, t.id,
           CASE WHEN t.n::integer = ANY (kept) AND NOT t.n::integer = ANY (inserted) THEN 'kept' ELSE 'inserted' END
    FROM unnest(ids) WITH ORDINALITY AS t(id, n)
    ORDER BY t.n;
END
$$;
COMMENT ON FUNCTION dispatch_policy._stage_outcomes(text, jsonb, text) IS
  'Internal: stages a JSON array of job specs and returns (idx, id, outcome) per element: through _stage_rules when the policy declares a staging rule or a job has expires_at (or a field _stage does not know, so the error lists expires_at), else through _stage (one statement), where a job not stored is kept and its id is the job that holds its key.';

-- stage_outcome: stage() with what happened.
CREATE FUNCTION dispatch_policy.stage_outcome(
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
BEGIN
  -- As _stage: the templates read next stay the policy's until commit.
  PERFORM pg_advisory_xact_lock_shared(dispatch_policy._partitions_lock_key(stage_outcome.policy));
  SELECT p.lane_template, p.config, p.partition_gates, p.partition_templates, p.partition_prefixes, p.partition_keys,
         p.partition_suffixes
  INTO template, config, part_gates, part_templates, part_prefixes, part_keys, part_suffixes
  FROM dispatch_policy.policies p WHERE p.name = stage_outcome.policy;
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
  'Stages one job as stage() does and says what happened: outcome inserted (a new job, id), kept (a job of the same policy with the same dedupe_key is admitted, or staged under dedupe_mode keep: nothing changed, id is that job), replaced (dedupe_mode replace and that job is still staged: its args, context, queue, priority, round-robin key, partitions and expires_at are now this call''s, its not_before is pushed to now + debounce if later; id is that job) or dropped (only in stage_many_outcomes). expires_at: the job''s deadline (must be later than now; the policy''s max_wait gives created_at (first staged) + max_wait, the earlier of the two applies); a job not admitted by then is finished as expired. With max_pending_per_partition, a new job in a partition (lane key) at the cap is refused with DP002 (on_overflow reject) or the partition''s oldest staged jobs (lowest id) are finished as dropped (drop_oldest). Errors, nothing changed: unknown policy 42704, NULL args 22004, a field out of its limits() bounds or otherwise invalid (an expires_at not later than now) 22023 naming the field, a full partition DP002.';

-- stage: now always an id, and expires_at. A new argument: a new signature.
DROP FUNCTION dispatch_policy.stage(text, jsonb, jsonb, text, text, text, integer, timestamptz);
CREATE FUNCTION dispatch_policy.stage(
  policy          text,
  args            jsonb,
  context         jsonb DEFAULT '{}',
  dedupe_key      text DEFAULT NULL,
  round_robin_key text DEFAULT NULL,
  queue           text DEFAULT NULL,
  priority        integer DEFAULT NULL,
  not_before      timestamptz DEFAULT NULL,
  expires_at      timestamptz DEFAULT NULL
)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, dispatch_policy, pg_temp
AS $$
  SELECT o.id FROM dispatch_policy.stage_outcome(stage.policy, stage.args, stage.context, stage.dedupe_key, stage.round_robin_key,
                                                 stage.queue, stage.priority, stage.not_before, stage.expires_at) o
$$;
COMMENT ON FUNCTION dispatch_policy.stage(text, jsonb, jsonb, text, text, text, integer, timestamptz, timestamptz) IS
  'Stages one job and returns the id of the job that holds its dedupe key after the call: the new job, or the job of the same policy with the same dedupe_key that is staged or admitted (kept under dedupe_mode keep, the default; replaced under dedupe_mode replace while it is staged). Never NULL. stage_outcome says which happened. Adds queue_name and priority to the context unless set; derives round_robin_key (the job''s lane) from the policy''s lane_template (round_robin_by, else its gates'' partition_by templates) when not given; stores the job''s partition of each partitioned gate (staged_jobs.partitions); a not_before in the future schedules the job; expires_at (or the policy''s max_wait) sets its deadline. Errors, nothing changed: unknown policy 42704, NULL args 22004, a field out of its limits() bounds or otherwise invalid (an expires_at not later than now) 22023 (the message names the field), a partition at max_pending_per_partition with on_overflow reject DP002.';

CREATE FUNCTION dispatch_policy.stage_many_outcomes(policy text, jobs jsonb)
RETURNS TABLE (idx integer, id bigint, outcome text)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, dispatch_policy, pg_temp
AS $$
  SELECT o.idx, o.id, o.outcome FROM dispatch_policy._stage_outcomes(stage_many_outcomes.policy, stage_many_outcomes.jobs, 'jobs[%s].') o
  ORDER BY o.idx
$$;
COMMENT ON FUNCTION dispatch_policy.stage_many_outcomes(text, jsonb) IS
  'Stages a JSON array of jobs as stage_many() and returns one row per element: idx (1-based position), id (the job that holds its key after the call) and outcome (inserted, kept, replaced, as stage_outcome; dropped: under on_overflow drop_oldest, inserted by this call and then dropped by a later element of the same call, or dropped right away because its partition was full and every older job of it was held by another transaction). A later element with the key of an earlier one is kept (dedupe_mode keep) or replaces it (replace). Job objects take the fields of stage(): args, context, dedupe_key, round_robin_key, queue, priority, not_before, expires_at. All or nothing: one invalid element (jobs[i].field, 22023 or 22004), or one that a full partition refuses (DP002, on_overflow reject), stores nothing. Unknown policy 42704.';

CREATE OR REPLACE FUNCTION dispatch_policy.stage_many(policy text, jobs jsonb)
RETURNS bigint[]
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, dispatch_policy, pg_temp
AS $$
  SELECT coalesce(array_agg(o.id ORDER BY o.idx), '{}')
  FROM dispatch_policy._stage_outcomes(stage_many.policy, stage_many.jobs, 'jobs[%s].') o
$$;
COMMENT ON FUNCTION dispatch_policy.stage_many(text, jsonb) IS
  'Stages a JSON array of jobs, each an object with the fields of stage() (args, context, dedupe_key, round_robin_key, queue, priority, not_before, expires_at). Returns ids in input order, never NULL: for a deduped element (also against an earlier element of the same call) the id of the job that holds the key (stage_many_outcomes says inserted, kept, replaced or dropped). All or nothing: one invalid element (named as jobs[i].field) stores nothing; with max_pending_per_partition and on_overflow reject, an element over the cap raises DP002 and nothing is stored.';

-- ---------------------------------------------------------------------------
-- The new policy fields are validated by validate_policy (its one
-- definition in 0.2.0 is in 0025_shadow.sql).

-- ---------------------------------------------------------------------------
-- Counted: the last day's expired and dropped jobs per policy, appended to
-- policy_overview. Read from finished_jobs through a partial index (policy,
-- status, finished_at) of those two statuses only, not from the per-minute
-- history: one index range per policy and status, as long as the last day's
-- expired or dropped jobs of the policy.
-- (policy_overview is defined once in 0.2.0, in 0025_shadow.sql.)

-- ---------------------------------------------------------------------------
-- explain gives a staged job with a deadline a row of aspect deadline after
-- its schedule (explain is defined once in 0.2.0, in 0025_shadow.sql).

-- ---------------------------------------------------------------------------
-- prune gets three more steps (rows expired_jobs, dropped_jobs, deadlines)
-- after partition_counters (it is defined once in 0.2.0, in 0025_shadow.sql).

-- ---------------------------------------------------------------------------
-- A worker's call on a job it deferred: _raise_not_admitted, defined once
-- in 0.2.0 (the documented error for a worker call that found no admitted
-- attempt, 0008), says that a job that defer() handed back to staging, and
-- that waits as the same attempt, was deferred (found by hostile testing: a
-- second defer() of the job got DP001 "attempt 1 ... is not the current
-- attempt", detail "waits for admission as attempt 1 (its lease ran out,
-- or it failed)", when 1 is its current attempt and neither happened).
-- Same SQLSTATEs: DP001 with attempt, P0002 without.
CREATE FUNCTION dispatch_policy._raise_not_admitted(id bigint, attempt integer)
RETURNS void
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
DECLARE
  status record;
  deferral record;
BEGIN
  SELECT s.attempt, d.reason INTO deferral
  FROM dispatch_policy.staged_jobs s
  CROSS JOIN LATERAL (SELECT jd.reason, jd.deferred_at FROM dispatch_policy.job_deferrals jd
                      WHERE jd.job_id = s.id AND jd.attempt = s.attempt
                      ORDER BY jd.deferred_at DESC LIMIT 1) d
  WHERE s.id = _raise_not_admitted.id AND s.staged_at = d.deferred_at;
  IF FOUND AND (_raise_not_admitted.attempt IS NULL OR _raise_not_admitted.attempt = deferral.attempt) THEN
    RAISE EXCEPTION 'job % was deferred: attempt % is staged again, not admitted', _raise_not_admitted.id, deferral.attempt
      USING ERRCODE = CASE WHEN _raise_not_admitted.attempt IS NULL THEN 'P0002' ELSE 'DP001' END,
            DETAIL = format('defer() handed attempt %s back to staging (reason: %s); after its until it is admitted again as the same attempt, through every gate, and claimed anew.',
                            deferral.attempt, left(deferral.reason, 200)),
            HINT = 'Stop working on it: nothing was changed. A deferred job is deferred (or completed, or failed) again only once it is admitted again.';
  END IF;
  SELECT * INTO status FROM dispatch_policy._attempt_status(_raise_not_admitted.id, _raise_not_admitted.attempt);
  IF status.outcome = 'stale' THEN
    RAISE EXCEPTION 'attempt % of job % is not the current attempt', attempt, id
      USING ERRCODE = 'DP001', DETAIL = status.detail, HINT = 'Stop working on it: nothing was changed.';
  END IF;
  RAISE EXCEPTION 'job % is not admitted', id USING ERRCODE = 'P0002', DETAIL = status.detail;
END
$$;
COMMENT ON FUNCTION dispatch_policy._raise_not_admitted(bigint, integer) IS
  'Internal: raises DP001 (the given attempt is not the current one) or P0002 (the job is not admitted: staged, finished or unknown), with a DETAIL saying which; a job that defer() handed back to staging and that waits as that attempt is said to be deferred (DP001 with attempt, P0002 without).';
-- defer's comment (0022), with what a second defer gets.
COMMENT ON FUNCTION dispatch_policy.defer(bigint, timestamptz, text, boolean, integer, timestamptz) IS
  'For a worker whose downstream said "not now" (HTTP 429 with Retry-After): hands an admitted job back to staging, scheduled for until, without counting an attempt (it is admitted again as the same attempt, through every gate; its dedupe key stays held). Releases its concurrency, global and adaptive slots as complete does, records no observation (not a success, not a failure: the adaptive cap does not move) and no failure; records the deferral in job_deferrals. With pause_partition => true, also pauses each partitioned throttle of the job''s policy in the job''s partition until until (as pause_partition, waiting for a tick under way; a pause without an end or ending later is kept; the pause ends by itself); a policy without a partitioned throttle pauses nothing (paused is ''{}''). Returns one row: state ''scheduled'', not_before (= until), paused (gate -> partition paused; NULL without pause_partition). Errors, nothing changed: NULL id, until, reason or pause_partition 22004; until not finite, not after now or more than limits() defer.until (30 days) after now, reason longer than limits() defer.reason (1024 characters) or empty 22023; with attempt, DP001 when it is not the current attempt; P0002 when the job is not admitted (staged, finished or unknown); a job deferred already, waiting to be admitted again as that attempt, gets the same codes with a message saying it was deferred (a second defer applies once it is admitted again).';

-- ---------------------------------------------------------------------------
-- Privileges (0021): stage, stage_outcome, stage_many and
-- stage_many_outcomes run as the owner (stated in their CREATE above);
-- sql/roles.sql grants them to dispatch_policy_stager.

REVOKE ALL ON ALL TABLES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch_policy FROM PUBLIC;
