-- History that is cheap to read (issue 10).
--
-- policy_overview used to count the rows it showed: a scan of every pending
-- job of every policy on each read, seconds at a million pending. It now
-- reads counters and per-minute samples kept as jobs move:
--
--   stat_deltas      insert-only changes, one aggregated row per statement
--                    and (policy[, gate, partition], minute), written by
--                    statement-level AFTER triggers (transition tables) on
--                    staged_jobs, admitted_jobs, finished_jobs and
--                    job_failures: every writer (stage, the tick, complete,
--                    fail, the reaper, repair, a DBA's DELETE) is counted by
--                    the one set of triggers, and no writer updates a shared
--                    row (concurrent stagers never wait for each other here);
--   policy_counters  per policy: pending, scheduled, in flight, dead (exact);
--   stat_minutes     per policy (gate = partition = '') and per gate
--                    partition, per minute: events and queue-lag samples.
--
-- fold_stats() moves deltas into the two tables (DELETE ... RETURNING, then
-- upserts that add; safe when folds race). Readers never depend on it: what
-- they show is the folded rows plus the sum of the deltas not folded yet.
-- Folding runs in prune() and, at most once a second per runner session,
-- at the end of a tick (_tick_release), so the deltas a reader sums stay few.

-- ---------------------------------------------------------------------------
-- Queue-lag histogram: 56 fixed buckets on a log scale.

-- The lower bounds of buckets 2 to 56, in ms: 2^0, 2^0.5, 2^1, ..., 2^27.
-- Bucket 1 is [0, 1) ms; bucket k (2 to 55) is [2^((k-2)/2), 2^((k-1)/2))
-- ms; bucket 56 is 2^27 ms (37.3 hours) and more. Neighbouring bounds are
-- a factor of sqrt(2) apart: a percentile read from the histogram is within
-- that factor of the true one (interpolated inside its bucket).
CREATE FUNCTION dispatch_policy._lag_bucket_bounds()
RETURNS double precision[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT ARRAY(SELECT power(2::double precision, i / 2.0) FROM generate_series(0, 54) AS i ORDER BY i)
$$;
COMMENT ON FUNCTION dispatch_policy._lag_bucket_bounds() IS
  'Internal: the 55 lower bounds, in ms, of lag histogram buckets 2 to 56 (2^0, 2^0.5, ..., 2^27). Bucket 1 is [0, 1) ms; bucket k is [2^((k-2)/2), 2^((k-1)/2)) ms; bucket 56 is 2^27 ms (37.3 hours) and more. The one definition of the buckets of every lag_hist.';

CREATE FUNCTION dispatch_policy._lag_bucket(ms double precision)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT width_bucket(greatest(coalesce(ms, 0), 0), dispatch_policy._lag_bucket_bounds()) + 1
$$;
COMMENT ON FUNCTION dispatch_policy._lag_bucket(double precision) IS
  'Internal: the lag histogram bucket (1 to 56) of a queue lag in ms (see _lag_bucket_bounds; negative or NULL counts as 0 ms).';

CREATE FUNCTION dispatch_policy.lag_buckets()
RETURNS TABLE (bucket integer, lower_ms double precision, upper_ms double precision)
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT 1, 0::double precision, 1::double precision
  UNION ALL
  SELECT b.n::integer + 1, b.lower, lead(b.lower) OVER (ORDER BY b.n)
  FROM unnest(dispatch_policy._lag_bucket_bounds()) WITH ORDINALITY AS b(lower, n)
  ORDER BY 1
$$;
COMMENT ON FUNCTION dispatch_policy.lag_buckets() IS
  'The 56 buckets of every lag_hist column: bucket number, lower bound (inclusive) and upper bound (exclusive; NULL for the last) in ms. Log scale, sqrt(2) apart, from 1 ms to 2^27 ms (37.3 hours).';

-- A histogram of bucket numbers (each element one sample).
CREATE FUNCTION dispatch_policy._lag_hist(buckets integer[])
RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
DECLARE
  hist integer[] := array_fill(0, ARRAY[56]);
  b integer;
BEGIN
  IF buckets IS NULL OR cardinality(buckets) = 0 THEN
    RETURN NULL;
  END IF;
  FOREACH b IN ARRAY buckets LOOP
    b := least(greatest(coalesce(b, 1), 1), 56);
    hist[b] := hist[b] + 1;
  END LOOP;
  RETURN hist;
END
$$;
COMMENT ON FUNCTION dispatch_policy._lag_hist(integer[]) IS
  'Internal: the 56-bucket lag histogram of the given bucket numbers (one per sample); NULL for no samples.';

CREATE FUNCTION dispatch_policy._lag_hist_add(a integer[], b integer[])
RETURNS integer[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i) FROM unnest(a, b) WITH ORDINALITY AS u(x, y, i)
$$;
COMMENT ON FUNCTION dispatch_policy._lag_hist_add(integer[], integer[]) IS
  'Internal: two lag histograms added bucket by bucket.';

CREATE AGGREGATE dispatch_policy._lag_hist_sum(integer[]) (
  SFUNC = dispatch_policy._lag_hist_add,
  STYPE = integer[]
);
COMMENT ON AGGREGATE dispatch_policy._lag_hist_sum(integer[]) IS
  'Internal: the bucket-by-bucket sum of lag histograms (NULLs skipped; NULL when there are none).';

CREATE FUNCTION dispatch_policy._lag_percentile(hist integer[], fraction double precision)
RETURNS double precision
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
DECLARE
  bounds double precision[] := dispatch_policy._lag_bucket_bounds();
  total bigint := 0::bigint;
  rank double precision;
  seen bigint := 0::bigint;
  lower double precision;
  upper double precision;
BEGIN
  IF hist IS NULL OR fraction IS NULL OR fraction < 0 OR fraction > 1 THEN
    RETURN NULL;
  END IF;
  SELECT coalesce(sum(h), 0) INTO total FROM unnest(hist) AS h;
  IF total <= 0 THEN
    RETURN NULL;
  END IF;
  rank := fraction * total;
  FOR i IN 1 .. cardinality(hist) LOOP
    CONTINUE WHEN coalesce(hist[i], 0) <= 0;
    IF seen + hist[i] >= rank THEN
      lower := CASE WHEN i = 1 THEN 0 ELSE bounds[i - 1] END;
      upper := CASE WHEN i = 1 THEN 1 ELSE bounds[i] END;
      IF upper IS NULL THEN
        RETURN lower;
      END IF;
      RETURN lower + (upper - lower) * greatest(rank - seen, 0) / hist[i];
    END IF;
    seen := seen + hist[i];
  END LOOP;
  RETURN bounds[cardinality(bounds)];
END
$$;
COMMENT ON FUNCTION dispatch_policy._lag_percentile(integer[], double precision) IS
  'Internal: the lag (ms) below which the given fraction (0 to 1) of a histogram''s samples fall, interpolated linearly inside its bucket (so within a factor of sqrt(2) of the true value; the last bucket reports its lower bound, 2^27 ms). NULL for an empty histogram.';

-- The minute a time falls in, whatever the session's TimeZone.
CREATE FUNCTION dispatch_policy._minute(at timestamptz)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT date_bin('1 minute', at, timestamptz '2000-01-01 00:00:00+00')
$$;
COMMENT ON FUNCTION dispatch_policy._minute(timestamptz) IS
  'Internal: the start of the UTC minute a time falls in (date_bin; independent of the session''s TimeZone).';

-- ---------------------------------------------------------------------------
-- Tables.

CREATE TABLE dispatch_policy.policy_counters (
  policy     text PRIMARY KEY,
  pending    bigint NOT NULL DEFAULT 0,
  scheduled  bigint NOT NULL DEFAULT 0,
  in_flight  bigint NOT NULL DEFAULT 0,
  dead       bigint NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dispatch_policy.policy_counters IS
  'Jobs per policy as of the last fold_stats(): the exact count is this row plus the sum of the policy''s rows in stat_deltas (gate ''''). Written only by fold_stats() (and by the migration that created it, from the rows then present); read by policy_overview.';
COMMENT ON COLUMN dispatch_policy.policy_counters.policy IS 'Policy name (rows of a deleted policy stay until prune() finds them all zero).';
COMMENT ON COLUMN dispatch_policy.policy_counters.pending IS 'Staged jobs with no not_before (eligible), as folded.';
COMMENT ON COLUMN dispatch_policy.policy_counters.scheduled IS 'Staged jobs with a not_before (including ones whose time has come but that are not promoted yet), as folded.';
COMMENT ON COLUMN dispatch_policy.policy_counters.in_flight IS 'Rows in admitted_jobs, as folded.';
COMMENT ON COLUMN dispatch_policy.policy_counters.dead IS 'Rows in finished_jobs with status ''dead'', as folded.';
COMMENT ON COLUMN dispatch_policy.policy_counters.updated_at IS 'When a fold last changed the row (the now given to fold_stats).';
ALTER TABLE dispatch_policy.policy_counters SET (fillfactor = 70);

CREATE TABLE dispatch_policy.stat_minutes (
  policy     text NOT NULL,
  gate       text NOT NULL,
  partition  text NOT NULL,
  minute     timestamptz NOT NULL,
  staged     bigint NOT NULL DEFAULT 0,
  admitted   bigint NOT NULL DEFAULT 0,
  refused    bigint NOT NULL DEFAULT 0,
  finished   bigint NOT NULL DEFAULT 0,
  completed  bigint NOT NULL DEFAULT 0,
  failed     bigint NOT NULL DEFAULT 0,
  dead       bigint NOT NULL DEFAULT 0,
  lag_count  bigint NOT NULL DEFAULT 0,
  lag_ms_sum double precision NOT NULL DEFAULT 0,
  lag_hist   integer[],
  CONSTRAINT stat_minutes_pkey PRIMARY KEY (policy, gate, partition, minute),
  CONSTRAINT stat_minutes_lag_hist_check CHECK (cardinality(lag_hist) = 56)
);
CREATE INDEX stat_minutes_minute_idx ON dispatch_policy.stat_minutes (minute);
COMMENT ON TABLE dispatch_policy.stat_minutes IS
  'Per-minute history, folded from stat_deltas by fold_stats(): one row per policy and minute (gate = partition = ''''), and one per gate partition and minute for what the job''s gate partitions are known for (admitted, refused, finished, queue lag). Minutes with nothing have no row. prune() deletes policy rows older than its retention and gate partition rows older than the retention or a day, whichever is shorter. Read with policy_minutes() and partition_minutes(), which add what is not folded yet.';
COMMENT ON COLUMN dispatch_policy.stat_minutes.policy IS 'Policy name.';
COMMENT ON COLUMN dispatch_policy.stat_minutes.gate IS 'Gate name; '''' for the row of the whole policy.';
COMMENT ON COLUMN dispatch_policy.stat_minutes.partition IS 'The gate''s partition key (as in admitted_jobs.partitions); '''' for the row of the whole policy.';
COMMENT ON COLUMN dispatch_policy.stat_minutes.minute IS 'Start of the UTC minute; each event counts in the minute of its own time (staged_at, admitted_at, started_at, finished_at, failed_at, the tick''s now).';
COMMENT ON COLUMN dispatch_policy.stat_minutes.staged IS 'Policy rows only: new jobs staged (attempt 1; retries re-staged by fail or the reaper are not counted again).';
COMMENT ON COLUMN dispatch_policy.stat_minutes.admitted IS 'Attempts admitted (rows inserted into admitted_jobs).';
COMMENT ON COLUMN dispatch_policy.stat_minutes.refused IS 'Jobs a tick fetched and its gates turned away, as recorded by _record_refusals (per gate partition; the policy row holds their sum).';
COMMENT ON COLUMN dispatch_policy.stat_minutes.finished IS 'Attempts that left admitted_jobs (completed, failed, reaped, deleted), counted in the minute the deletion ran (now()).';
COMMENT ON COLUMN dispatch_policy.stat_minutes.completed IS 'Policy rows only: jobs completed (finished_jobs rows with status ''completed'', by finished_at).';
COMMENT ON COLUMN dispatch_policy.stat_minutes.failed IS 'Policy rows only: failed attempts, expired leases included (job_failures rows, by failed_at).';
COMMENT ON COLUMN dispatch_policy.stat_minutes.dead IS 'Policy rows only: jobs that died after their last attempt (finished_jobs rows with status ''dead'', by finished_at).';
COMMENT ON COLUMN dispatch_policy.stat_minutes.lag_count IS 'Attempts that started (started_at set by claim or started), by started_at.';
COMMENT ON COLUMN dispatch_policy.stat_minutes.lag_ms_sum IS 'Sum of their queue lag (started_at - admitted_at, at least 0) in ms: the average is lag_ms_sum / lag_count.';
COMMENT ON COLUMN dispatch_policy.stat_minutes.lag_hist IS 'Their queue lags as a 56-bucket histogram (see lag_buckets(): log scale, sqrt(2) apart, 1 ms to 37.3 hours); NULL when none started.';

CREATE TABLE dispatch_policy.stat_deltas (
  policy      text NOT NULL,
  gate        text NOT NULL DEFAULT '',
  partition   text NOT NULL DEFAULT '',
  minute      timestamptz,
  d_pending   bigint NOT NULL DEFAULT 0,
  d_scheduled bigint NOT NULL DEFAULT 0,
  d_in_flight bigint NOT NULL DEFAULT 0,
  d_dead      bigint NOT NULL DEFAULT 0,
  staged      bigint NOT NULL DEFAULT 0,
  admitted    bigint NOT NULL DEFAULT 0,
  refused     bigint NOT NULL DEFAULT 0,
  finished    bigint NOT NULL DEFAULT 0,
  completed   bigint NOT NULL DEFAULT 0,
  failed      bigint NOT NULL DEFAULT 0,
  dead        bigint NOT NULL DEFAULT 0,
  lag_count   bigint NOT NULL DEFAULT 0,
  lag_ms_sum  double precision NOT NULL DEFAULT 0,
  lag_hist    integer[]
);
COMMENT ON TABLE dispatch_policy.stat_deltas IS
  'Changes not yet folded into policy_counters and stat_minutes: insert-only, one row per writing statement and (policy, gate, partition, minute), written by the history triggers on staged_jobs, admitted_jobs, finished_jobs and job_failures (and by _record_refusals). fold_stats() deletes the rows it folds. Readers add these rows to the folded ones, so they are exact whether or not a fold ran.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.policy IS 'Policy name.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.gate IS 'Gate name; '''' for the whole policy (the only rows with d_* changes).';
COMMENT ON COLUMN dispatch_policy.stat_deltas.partition IS 'Partition key of the gate; '''' for the whole policy.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.minute IS 'Minute of the events of the row (see stat_minutes.minute); NULL when the row only changes counters.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.d_pending IS 'Change of policy_counters.pending.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.d_scheduled IS 'Change of policy_counters.scheduled.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.d_in_flight IS 'Change of policy_counters.in_flight.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.d_dead IS 'Change of policy_counters.dead.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.staged IS 'Adds to stat_minutes.staged.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.admitted IS 'Adds to stat_minutes.admitted.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.refused IS 'Adds to stat_minutes.refused.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.finished IS 'Adds to stat_minutes.finished.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.completed IS 'Adds to stat_minutes.completed.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.failed IS 'Adds to stat_minutes.failed.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.dead IS 'Adds to stat_minutes.dead.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.lag_count IS 'Adds to stat_minutes.lag_count.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.lag_ms_sum IS 'Adds to stat_minutes.lag_ms_sum.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.lag_hist IS 'Adds to stat_minutes.lag_hist, bucket by bucket.';
ALTER TABLE dispatch_policy.stat_deltas SET (
  autovacuum_vacuum_scale_factor = 0.0,
  autovacuum_vacuum_threshold = 5000,
  autovacuum_vacuum_insert_scale_factor = 0.0,
  autovacuum_vacuum_insert_threshold = 20000,
  autovacuum_vacuum_cost_delay = 0
);

-- ---------------------------------------------------------------------------
-- The triggers: one aggregated insert per statement, no shared row updated.
--
-- Creating a trigger takes a SHARE ROW EXCLUSIVE lock on its table, which
-- conflicts with the ROW EXCLUSIVE lock every INSERT, UPDATE and DELETE
-- holds until its transaction ends. So the CREATE TRIGGERs below wait for
-- every transaction writing a job table (a stager committing now is either
-- finished before the trigger exists, and counted by the backfill, or
-- blocked until this migration commits, and counted by the trigger, which
-- it sees once it gets its lock), and no job row changes between them and
-- the backfill below: every row is counted exactly once.
--
-- Writers take the job tables in varying orders (a stager staged_jobs; the
-- tick staged_jobs then admitted_jobs; fail() admitted_jobs, job_failures,
-- finished_jobs, then staged_jobs), so taking the four locks one at a time,
-- waiting for each, can deadlock with a writer. They are taken first, in one
-- LOCK statement under a lock_timeout shorter than the deadlock_timeout: a
-- conflict gives every lock back (the subtransaction rolls back) and the
-- migration tries again a moment later, for up to about 30 seconds; while
-- it waits, new writers queue behind it, so the transactions in its way end
-- and it gets in. The CREATE TRIGGERs then find the locks already held.
DO $$
DECLARE
  saved text := current_setting('lock_timeout');
  tries integer := 0;
BEGIN
  LOOP
    BEGIN
      PERFORM set_config('lock_timeout', '200ms', true);
      LOCK TABLE dispatch_policy.staged_jobs, dispatch_policy.admitted_jobs, dispatch_policy.finished_jobs,
                 dispatch_policy.job_failures IN SHARE ROW EXCLUSIVE MODE;
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

CREATE FUNCTION dispatch_policy._history_staged()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO dispatch_policy.stat_deltas (policy, minute, d_pending, d_scheduled, staged)
    SELECT n.policy, CASE WHEN n.attempt = 1 THEN dispatch_policy._minute(n.staged_at) END,
           count(*) FILTER (WHERE n.not_before IS NULL), count(*) FILTER (WHERE n.not_before IS NOT NULL),
           count(*) FILTER (WHERE n.attempt = 1)
    FROM new_rows n
    GROUP BY 1, 2;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO dispatch_policy.stat_deltas (policy, d_pending, d_scheduled)
    SELECT o.policy, -count(*) FILTER (WHERE o.not_before IS NULL), -count(*) FILTER (WHERE o.not_before IS NOT NULL)
    FROM old_rows o
    GROUP BY 1;
  ELSE
    -- Only what moved between pending and scheduled (promote_scheduled, a
    -- DBA setting not_before) or between policies; a key or priority
    -- change writes nothing.
    INSERT INTO dispatch_policy.stat_deltas (policy, d_pending, d_scheduled)
    SELECT c.policy, sum(c.p), sum(c.s)
    FROM (SELECT n.policy, (n.not_before IS NULL)::integer AS p, (n.not_before IS NOT NULL)::integer AS s FROM new_rows n
          UNION ALL
          SELECT o.policy, -(o.not_before IS NULL)::integer, -(o.not_before IS NOT NULL)::integer FROM old_rows o) c
    GROUP BY 1
    HAVING sum(c.p) <> 0 OR sum(c.s) <> 0;
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._history_staged() IS
  'Internal trigger (statement level, transition tables) of staged_jobs: records the change of pending and scheduled jobs per policy in stat_deltas, and new jobs (attempt 1) as staged in the minute of their staged_at.';

CREATE FUNCTION dispatch_policy._history_admitted()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO dispatch_policy.stat_deltas (policy, gate, partition, minute, d_in_flight, admitted)
    SELECT n.policy, '', '', dispatch_policy._minute(n.admitted_at), count(*), count(*)
    FROM new_rows n
    GROUP BY 1, 4
    UNION ALL
    SELECT n.policy, p.key, p.value, dispatch_policy._minute(n.admitted_at), 0, count(*)
    FROM new_rows n, jsonb_each_text(CASE WHEN jsonb_typeof(n.partitions) = 'object' THEN n.partitions END) AS p
    WHERE p.key <> '' AND p.value IS NOT NULL
    GROUP BY 1, 2, 3, 4;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO dispatch_policy.stat_deltas (policy, gate, partition, minute, d_in_flight, finished)
    SELECT o.policy, '', '', dispatch_policy._minute(now()), -count(*), count(*)
    FROM old_rows o
    GROUP BY 1
    UNION ALL
    SELECT o.policy, p.key, p.value, dispatch_policy._minute(now()), 0, count(*)
    FROM old_rows o, jsonb_each_text(CASE WHEN jsonb_typeof(o.partitions) = 'object' THEN o.partitions END) AS p
    WHERE p.key <> '' AND p.value IS NOT NULL
    GROUP BY 1, 2, 3;
  ELSE
    -- Attempts that started (claim, started): their queue lag. Heartbeats
    -- and lease changes write nothing.
    WITH moved AS (
      SELECT n.policy, n.partitions, dispatch_policy._minute(n.started_at) AS minute,
             greatest(extract(epoch FROM n.started_at - n.admitted_at)::double precision * 1000, 0) AS lag_ms
      FROM new_rows n JOIN old_rows o ON o.id = n.id
      WHERE o.started_at IS NULL AND n.started_at IS NOT NULL
    )
    INSERT INTO dispatch_policy.stat_deltas (policy, gate, partition, minute, lag_count, lag_ms_sum, lag_hist)
    SELECT m.policy, '', '', m.minute, count(*), sum(m.lag_ms),
           dispatch_policy._lag_hist(array_agg(dispatch_policy._lag_bucket(m.lag_ms)))
    FROM moved m
    GROUP BY 1, 4
    UNION ALL
    SELECT m.policy, p.key, p.value, m.minute, count(*), sum(m.lag_ms),
           dispatch_policy._lag_hist(array_agg(dispatch_policy._lag_bucket(m.lag_ms)))
    FROM moved m, jsonb_each_text(CASE WHEN jsonb_typeof(m.partitions) = 'object' THEN m.partitions END) AS p
    WHERE p.key <> '' AND p.value IS NOT NULL
    GROUP BY 1, 2, 3, 4;
    -- A job moved to another policy by hand.
    INSERT INTO dispatch_policy.stat_deltas (policy, d_in_flight)
    SELECT c.policy, sum(c.n)
    FROM (SELECT n.policy, 1 AS n FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE o.policy <> n.policy
          UNION ALL
          SELECT o.policy, -1 FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE o.policy <> n.policy) c
    GROUP BY 1;
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._history_admitted() IS
  'Internal trigger (statement level, transition tables) of admitted_jobs: records in stat_deltas the change of in-flight jobs per policy; admissions (by admitted_at) and finished attempts (deleted rows, by now()) per policy and per gate partition of the job (admitted_jobs.partitions); and, for attempts an UPDATE started, their queue lag (started_at - admitted_at) per policy and gate partition, by started_at.';

CREATE FUNCTION dispatch_policy._history_finished()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO dispatch_policy.stat_deltas (policy, minute, d_dead, completed, dead)
    SELECT n.policy, dispatch_policy._minute(n.finished_at), count(*) FILTER (WHERE n.status = 'dead'),
           count(*) FILTER (WHERE n.status = 'completed'), count(*) FILTER (WHERE n.status = 'dead')
    FROM new_rows n
    GROUP BY 1, 2;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO dispatch_policy.stat_deltas (policy, d_dead)
    SELECT o.policy, -count(*) FROM old_rows o WHERE o.status = 'dead' GROUP BY 1;
  ELSE
    INSERT INTO dispatch_policy.stat_deltas (policy, d_dead)
    SELECT c.policy, sum(c.n)
    FROM (SELECT n.policy, 1 AS n FROM new_rows n WHERE n.status = 'dead'
          UNION ALL
          SELECT o.policy, -1 FROM old_rows o WHERE o.status = 'dead') c
    GROUP BY 1
    HAVING sum(c.n) <> 0;
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._history_finished() IS
  'Internal trigger (statement level, transition tables) of finished_jobs: records in stat_deltas the change of dead jobs per policy, and jobs completed and died per policy in the minute of their finished_at.';

CREATE FUNCTION dispatch_policy._history_failures()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  INSERT INTO dispatch_policy.stat_deltas (policy, minute, failed)
  SELECT n.policy, dispatch_policy._minute(n.failed_at), count(*)
  FROM new_rows n
  GROUP BY 1, 2;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._history_failures() IS
  'Internal trigger (statement level, transition table) of job_failures: records failed attempts per policy in stat_deltas, in the minute of their failed_at.';

-- TRUNCATE fires no row triggers and has no transition table: its trigger
-- takes back everything the table had counted. TRUNCATE holds ACCESS
-- EXCLUSIVE on the table, so every writer of it has committed or rolled
-- back, and the counters plus the deltas (read in one snapshot; a fold only
-- moves amounts from one to the other) are exactly what the table held.
CREATE FUNCTION dispatch_policy._history_truncated()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  INSERT INTO dispatch_policy.stat_deltas (policy, d_pending, d_scheduled, d_in_flight, d_dead)
  SELECT t.policy,
         CASE WHEN TG_TABLE_NAME = 'staged_jobs' THEN -sum(t.pending) ELSE 0 END,
         CASE WHEN TG_TABLE_NAME = 'staged_jobs' THEN -sum(t.scheduled) ELSE 0 END,
         CASE WHEN TG_TABLE_NAME = 'admitted_jobs' THEN -sum(t.in_flight) ELSE 0 END,
         CASE WHEN TG_TABLE_NAME = 'finished_jobs' THEN -sum(t.dead) ELSE 0 END
  FROM (SELECT c.policy, c.pending, c.scheduled, c.in_flight, c.dead FROM dispatch_policy.policy_counters c
        UNION ALL
        SELECT d.policy, d.d_pending, d.d_scheduled, d.d_in_flight, d.d_dead FROM dispatch_policy.stat_deltas d
        WHERE d.gate = '') t
  GROUP BY 1
  HAVING CASE TG_TABLE_NAME WHEN 'staged_jobs' THEN sum(t.pending) <> 0 OR sum(t.scheduled) <> 0
                            WHEN 'admitted_jobs' THEN sum(t.in_flight) <> 0
                            ELSE sum(t.dead) <> 0 END;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._history_truncated() IS
  'Internal trigger of TRUNCATE on staged_jobs, admitted_jobs and finished_jobs: records in stat_deltas the change that brings the counters of that table (pending and scheduled, in flight, dead) to zero for every policy.';

CREATE TRIGGER staged_jobs_history_insert
  AFTER INSERT ON dispatch_policy.staged_jobs
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_staged();
CREATE TRIGGER staged_jobs_history_delete
  AFTER DELETE ON dispatch_policy.staged_jobs
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_staged();
CREATE TRIGGER staged_jobs_history_update
  AFTER UPDATE ON dispatch_policy.staged_jobs
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_staged();
CREATE TRIGGER staged_jobs_history_truncate
  AFTER TRUNCATE ON dispatch_policy.staged_jobs
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_truncated();

CREATE TRIGGER admitted_jobs_history_insert
  AFTER INSERT ON dispatch_policy.admitted_jobs
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_admitted();
CREATE TRIGGER admitted_jobs_history_delete
  AFTER DELETE ON dispatch_policy.admitted_jobs
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_admitted();
CREATE TRIGGER admitted_jobs_history_update
  AFTER UPDATE ON dispatch_policy.admitted_jobs
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_admitted();
CREATE TRIGGER admitted_jobs_history_truncate
  AFTER TRUNCATE ON dispatch_policy.admitted_jobs
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_truncated();

CREATE TRIGGER finished_jobs_history_insert
  AFTER INSERT ON dispatch_policy.finished_jobs
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_finished();
CREATE TRIGGER finished_jobs_history_delete
  AFTER DELETE ON dispatch_policy.finished_jobs
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_finished();
CREATE TRIGGER finished_jobs_history_update
  AFTER UPDATE ON dispatch_policy.finished_jobs
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_finished();
CREATE TRIGGER finished_jobs_history_truncate
  AFTER TRUNCATE ON dispatch_policy.finished_jobs
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_truncated();

CREATE TRIGGER job_failures_history_insert
  AFTER INSERT ON dispatch_policy.job_failures
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._history_failures();

-- ---------------------------------------------------------------------------
-- Backfill, under the locks the CREATE TRIGGERs above took (see there).

INSERT INTO dispatch_policy.policy_counters (policy, pending, scheduled, in_flight, dead)
SELECT c.policy, sum(c.pending), sum(c.scheduled), sum(c.in_flight), sum(c.dead)
FROM (SELECT s.policy, count(*) FILTER (WHERE s.not_before IS NULL) AS pending,
             count(*) FILTER (WHERE s.not_before IS NOT NULL) AS scheduled, 0 AS in_flight, 0 AS dead
      FROM dispatch_policy.staged_jobs s GROUP BY 1
      UNION ALL
      SELECT a.policy, 0, 0, count(*), 0 FROM dispatch_policy.admitted_jobs a GROUP BY 1
      UNION ALL
      SELECT f.policy, 0, 0, 0, count(*) FROM dispatch_policy.finished_jobs f WHERE f.status = 'dead' GROUP BY 1) c
GROUP BY 1
ORDER BY 1;

-- The history the job tables still hold: completions and deaths (finished
-- jobs are kept for prune's retention), failed attempts, and the queue lag
-- of the last attempt of finished jobs. Admissions, stagings and refusals
-- before this migration are not known.
INSERT INTO dispatch_policy.stat_minutes AS m (policy, gate, partition, minute, completed, dead, failed, lag_count, lag_ms_sum, lag_hist)
SELECT e.policy, '', '', e.minute, sum(e.completed), sum(e.dead), sum(e.failed), sum(e.lag_count), sum(e.lag_ms_sum),
       dispatch_policy._lag_hist(array_agg(e.bucket) FILTER (WHERE e.bucket IS NOT NULL))
FROM (SELECT f.policy, dispatch_policy._minute(f.finished_at) AS minute,
             (f.status = 'completed')::integer AS completed, (f.status = 'dead')::integer AS dead, 0 AS failed,
             0 AS lag_count, 0::double precision AS lag_ms_sum, NULL::integer AS bucket
      FROM dispatch_policy.finished_jobs f
      WHERE isfinite(f.finished_at)
      UNION ALL
      SELECT f.policy, dispatch_policy._minute(f.started_at), 0, 0, 0, 1,
             greatest(extract(epoch FROM f.started_at - f.admitted_at)::double precision * 1000, 0),
             dispatch_policy._lag_bucket(greatest(extract(epoch FROM f.started_at - f.admitted_at)::double precision * 1000, 0))
      FROM dispatch_policy.finished_jobs f
      WHERE isfinite(f.started_at) AND isfinite(f.admitted_at)
      UNION ALL
      SELECT jf.policy, dispatch_policy._minute(jf.failed_at), 0, 0, 1, 0, 0, NULL
      FROM dispatch_policy.job_failures jf
      WHERE isfinite(jf.failed_at)) e
GROUP BY 1, 4
ORDER BY 1, 4;

-- ---------------------------------------------------------------------------
-- Folding.

CREATE FUNCTION dispatch_policy.fold_stats(now timestamptz DEFAULT now(), max_rows integer DEFAULT 100000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  folded bigint;
BEGIN
  PERFORM dispatch_policy._require_now(fold_stats.now);
  IF max_rows IS NULL OR max_rows < 1 OR max_rows > 10000000 THEN
    RAISE EXCEPTION 'max_rows must be from 1 to 10000000'
      USING ERRCODE = '22023', DETAIL = format('max_rows is %s.', coalesce(max_rows::text, 'NULL')),
            HINT = 'Nothing was folded.';
  END IF;
  -- Rows another fold holds are skipped, and a row it deleted since this
  -- statement's snapshot is not returned: each delta is folded once. The
  -- upserts add, in sorted key order (no deadlock between folds).
  WITH taken AS (
    DELETE FROM dispatch_policy.stat_deltas d
    WHERE d.ctid = ANY (ARRAY(SELECT x.ctid FROM dispatch_policy.stat_deltas x LIMIT fold_stats.max_rows
                              FOR UPDATE SKIP LOCKED))
    RETURNING d.*
  ), levels AS (
    INSERT INTO dispatch_policy.policy_counters AS c (policy, pending, scheduled, in_flight, dead, updated_at)
    SELECT t.policy, sum(t.d_pending), sum(t.d_scheduled), sum(t.d_in_flight), sum(t.d_dead), fold_stats.now
    FROM taken t
    WHERE t.gate = ''
    GROUP BY 1
    HAVING sum(t.d_pending) <> 0 OR sum(t.d_scheduled) <> 0 OR sum(t.d_in_flight) <> 0 OR sum(t.d_dead) <> 0
    ORDER BY 1
    ON CONFLICT ON CONSTRAINT policy_counters_pkey DO UPDATE
    SET pending = c.pending + EXCLUDED.pending, scheduled = c.scheduled + EXCLUDED.scheduled,
        in_flight = c.in_flight + EXCLUDED.in_flight, dead = c.dead + EXCLUDED.dead, updated_at = EXCLUDED.updated_at
  ), minutes AS (
    INSERT INTO dispatch_policy.stat_minutes AS m
      (policy, gate, partition, minute, staged, admitted, refused, finished, completed, failed, dead, lag_count, lag_ms_sum, lag_hist)
    SELECT t.policy, t.gate, t.partition, t.minute, sum(t.staged), sum(t.admitted), sum(t.refused), sum(t.finished),
           sum(t.completed), sum(t.failed), sum(t.dead), sum(t.lag_count), sum(t.lag_ms_sum), dispatch_policy._lag_hist_sum(t.lag_hist)
    FROM taken t
    WHERE t.minute IS NOT NULL
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT ON CONSTRAINT stat_minutes_pkey DO UPDATE
    SET staged = m.staged + EXCLUDED.staged, admitted = m.admitted + EXCLUDED.admitted,
        refused = m.refused + EXCLUDED.refused, finished = m.finished + EXCLUDED.finished,
        completed = m.completed + EXCLUDED.completed, failed = m.failed + EXCLUDED.failed, dead = m.dead + EXCLUDED.dead,
        lag_count = m.lag_count + EXCLUDED.lag_count, lag_ms_sum = m.lag_ms_sum + EXCLUDED.lag_ms_sum,
        lag_hist = coalesce(dispatch_policy._lag_hist_add(m.lag_hist, EXCLUDED.lag_hist), m.lag_hist, EXCLUDED.lag_hist)
  )
  SELECT count(*) INTO folded FROM taken;
  RETURN folded;
END
$$;
COMMENT ON FUNCTION dispatch_policy.fold_stats(timestamptz, integer) IS
  'Moves up to max_rows (1 to 10,000,000; default 100,000) rows of stat_deltas into policy_counters and stat_minutes, in one statement: the rows are deleted and their sums added. Safe to run concurrently (rows another fold holds are skipped; every delta is added exactly once). Readers never depend on it: they add the deltas not folded yet. now is stored as policy_counters.updated_at. Returns the number of delta rows folded. prune() folds first; a runner folds at most once a second at the end of a tick.';

-- A runner folds at the end of its ticks, at most once a second per
-- session, and only when no other session is folding: the deltas readers sum
-- stay few while a runner runs. A fold that fails never fails the tick.
CREATE FUNCTION dispatch_policy._fold_stats_if_due()
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  last text := current_setting('dispatch_policy.folded_at', true);
BEGIN
  IF last IS NOT NULL AND last <> '' AND clock_timestamp() - last::timestamptz < interval '1 second' THEN
    RETURN;
  END IF;
  PERFORM set_config('dispatch_policy.folded_at', clock_timestamp()::text, false);
  IF NOT pg_try_advisory_xact_lock(hashtextextended('dispatch_policy.fold_stats', 0)) THEN
    RETURN;
  END IF;
  BEGIN
    PERFORM dispatch_policy.fold_stats(now(), 20000);
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'dispatch_policy: folding history failed: %', SQLERRM;
  END;
END
$$;
COMMENT ON FUNCTION dispatch_policy._fold_stats_if_due() IS
  'Internal: at the end of a tick, folds up to 20,000 deltas (fold_stats) if this session has not tried for a second and no other session holds the fold lock; a failure is a WARNING, never the tick''s error.';

-- _tick_release folds the history deltas first, at the end of a tick
-- (_fold_stats_if_due). (0014 defines it, for tick_abort; its last
-- definition, the one in force, is in 0026_admit_integrity.sql.)

CREATE FUNCTION dispatch_policy._record_refusals(
  policy text, now timestamptz, gates text[], partitions text[], counts integer[]
)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  PERFORM dispatch_policy._require_now(_record_refusals.now);
  PERFORM dispatch_policy._require_same_length('gates, partitions and counts', ARRAY[
    cardinality(gates), cardinality(partitions), cardinality(counts)]);
  IF EXISTS (SELECT 1 FROM unnest(gates, partitions, counts) AS r(g, p, n)
             WHERE r.g IS NULL OR r.g = '' OR r.p IS NULL OR r.n IS NULL OR r.n < 0) THEN
    RAISE EXCEPTION 'gates and partitions must be non-empty and counts 0 or more'
      USING ERRCODE = '22023', HINT = 'Nothing was recorded.';
  END IF;
  INSERT INTO dispatch_policy.stat_deltas (policy, gate, partition, minute, refused)
  SELECT _record_refusals.policy, r.g, r.p, dispatch_policy._minute(_record_refusals.now), sum(r.n)
  FROM unnest(gates, partitions, counts) AS r(g, p, n)
  WHERE r.n > 0
  GROUP BY 2, 3
  UNION ALL
  SELECT _record_refusals.policy, '', '', dispatch_policy._minute(_record_refusals.now), sum(r.n)
  FROM unnest(gates, partitions, counts) AS r(g, p, n)
  HAVING sum(r.n) > 0;
END
$$;
COMMENT ON FUNCTION dispatch_policy._record_refusals(text, timestamptz, text[], text[], integer[]) IS
  'Internal (for the tick runner): records that counts[i] fetched jobs were refused by gate gates[i] in partition partitions[i] in the minute of now; the policy''s row gets their sum, so count each refused job once, under the gate that refused it first. 22023 for an empty gate, a NULL partition or a negative count (nothing recorded).';

-- ---------------------------------------------------------------------------
-- Reading: folded rows plus the deltas not folded yet.

-- A policy's minute rows of one gate partition ('' '' for the policy) in
-- [since, until), folded and not yet folded, summed per minute.
CREATE FUNCTION dispatch_policy._stat_minutes(policy text, gate text, partition text, since timestamptz, until timestamptz)
RETURNS TABLE (minute timestamptz, staged bigint, admitted bigint, refused bigint, finished bigint, completed bigint,
               failed bigint, dead bigint, lag_count bigint, lag_ms_sum double precision, lag_hist integer[])
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  SELECT x.minute, sum(x.staged)::bigint, sum(x.admitted)::bigint, sum(x.refused)::bigint, sum(x.finished)::bigint,
         sum(x.completed)::bigint, sum(x.failed)::bigint, sum(x.dead)::bigint, sum(x.lag_count)::bigint, sum(x.lag_ms_sum),
         dispatch_policy._lag_hist_sum(x.lag_hist)
  FROM (SELECT m.minute, m.staged, m.admitted, m.refused, m.finished, m.completed, m.failed, m.dead, m.lag_count,
               m.lag_ms_sum, m.lag_hist
        FROM dispatch_policy.stat_minutes m
        WHERE m.policy = _stat_minutes.policy AND m.gate = _stat_minutes.gate AND m.partition = _stat_minutes.partition
          AND m.minute >= _stat_minutes.since AND m.minute < _stat_minutes.until
        UNION ALL
        SELECT d.minute, d.staged, d.admitted, d.refused, d.finished, d.completed, d.failed, d.dead, d.lag_count,
               d.lag_ms_sum, d.lag_hist
        FROM dispatch_policy.stat_deltas d
        WHERE d.policy = _stat_minutes.policy AND d.gate = _stat_minutes.gate AND d.partition = _stat_minutes.partition
          AND d.minute >= _stat_minutes.since AND d.minute < _stat_minutes.until) x
  GROUP BY 1
$$;
COMMENT ON FUNCTION dispatch_policy._stat_minutes(text, text, text, timestamptz, timestamptz) IS
  'Internal: stat_minutes rows of a policy (gate = partition = '''') or of one gate partition with minute in [since, until), with the deltas not folded yet added: exact whether or not a fold ran. Minutes without a row are absent.';

CREATE FUNCTION dispatch_policy._require_minute_range(since timestamptz, until timestamptz)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER
AS $$
BEGIN
  IF NOT isfinite(since) OR NOT isfinite(until) THEN
    RAISE EXCEPTION 'since and until must be finite times'
      USING ERRCODE = '22023', DETAIL = format('since is %s, until is %s.', since, until);
  END IF;
  IF until - since > interval '31 days' THEN
    RAISE EXCEPTION 'since and until must be at most 31 days apart'
      USING ERRCODE = '22023', DETAIL = format('They are %s apart.', until - since),
            HINT = 'Ask for a shorter range (one row per minute: at most 44,641 rows).';
  END IF;
END
$$;
COMMENT ON FUNCTION dispatch_policy._require_minute_range(timestamptz, timestamptz) IS
  'Internal: raises 22023 unless since and until are finite and at most 31 days apart.';

CREATE FUNCTION dispatch_policy.policy_minutes(policy text, since timestamptz, until timestamptz DEFAULT now())
RETURNS TABLE (minute timestamptz, staged bigint, admitted bigint, refused bigint, completed bigint, failed bigint,
               dead bigint, avg_lag_ms double precision, p95_lag_ms double precision)
LANGUAGE plpgsql STABLE STRICT SECURITY INVOKER
SET jit = off
AS $$
BEGIN
  PERFORM dispatch_policy._require_minute_range(since, until);
  RETURN QUERY
  SELECT g.minute, coalesce(s.staged, 0), coalesce(s.admitted, 0), coalesce(s.refused, 0), coalesce(s.completed, 0),
         coalesce(s.failed, 0), coalesce(s.dead, 0),
         CASE WHEN s.lag_count > 0 THEN s.lag_ms_sum / s.lag_count END,
         dispatch_policy._lag_percentile(s.lag_hist, 0.95)
  FROM generate_series(dispatch_policy._minute(policy_minutes.since), dispatch_policy._minute(policy_minutes.until),
                       interval '1 minute') AS g(minute)
  LEFT JOIN dispatch_policy._stat_minutes(policy_minutes.policy, '', '', dispatch_policy._minute(policy_minutes.since),
                                          dispatch_policy._minute(policy_minutes.until) + interval '1 minute') s
    ON s.minute = g.minute
  ORDER BY g.minute;
END
$$;
COMMENT ON FUNCTION dispatch_policy.policy_minutes(text, timestamptz, timestamptz) IS
  'A policy''s history for a chart: one row per minute from the minute of since to the minute of until (UTC minutes; at most 31 days, else 22023), minutes without events as zeros: new jobs staged, attempts admitted, jobs refused by the tick, jobs completed, failed attempts, jobs that died, and the average and 95th percentile queue lag (ms, NULL when no attempt started; the percentile from the lag histogram, within a factor of sqrt(2)). Reads the minute rows and the deltas not folded yet: O(minutes asked for), whatever the backlog.';

CREATE FUNCTION dispatch_policy.partition_minutes(
  policy text, gate text, partition text, since timestamptz, until timestamptz DEFAULT now()
)
RETURNS TABLE (minute timestamptz, admitted bigint, refused bigint, finished bigint, avg_lag_ms double precision,
               p95_lag_ms double precision)
LANGUAGE plpgsql STABLE STRICT SECURITY INVOKER
SET jit = off
AS $$
BEGIN
  PERFORM dispatch_policy._require_minute_range(since, until);
  RETURN QUERY
  SELECT g.minute, coalesce(s.admitted, 0), coalesce(s.refused, 0), coalesce(s.finished, 0),
         CASE WHEN s.lag_count > 0 THEN s.lag_ms_sum / s.lag_count END,
         dispatch_policy._lag_percentile(s.lag_hist, 0.95)
  FROM generate_series(dispatch_policy._minute(partition_minutes.since), dispatch_policy._minute(partition_minutes.until),
                       interval '1 minute') AS g(minute)
  LEFT JOIN dispatch_policy._stat_minutes(partition_minutes.policy, partition_minutes.gate, partition_minutes.partition,
                                          dispatch_policy._minute(partition_minutes.since),
                                          dispatch_policy._minute(partition_minutes.until) + interval '1 minute') s
    ON s.minute = g.minute
  ORDER BY g.minute;
END
$$;
COMMENT ON FUNCTION dispatch_policy.partition_minutes(text, text, text, timestamptz, timestamptz) IS
  'One gate partition''s history for a chart (partition as in admitted_jobs.partitions and partition_overview): one row per minute as policy_minutes (at most 31 days, else 22023): attempts admitted, jobs refused, attempts finished (left admitted_jobs: completed, failed, reaped or deleted; completed and failed are not told apart per partition), average and 95th percentile queue lag in ms. Partition rows are kept for a day at most (prune).';

-- The overview's query, in a function only to turn JIT off: without
-- statistics (a new database, a policies table analyzed never) the planner
-- prices the per-policy probes far above jit_above_cost and spends a second
-- compiling a query that runs in milliseconds.
CREATE FUNCTION dispatch_policy._policy_overview()
RETURNS TABLE (policy text, pending bigint, scheduled bigint, in_flight bigint, completed_24h bigint, failed_24h bigint,
               dead bigint, oldest_pending_age interval, paused boolean, failing_since timestamptz, tick_failures integer,
               last_error text, retry_at timestamptz, admitted_24h bigint, lag_p50_ms double precision,
               lag_p95_ms double precision, throughput_per_min double precision)
LANGUAGE sql STABLE SECURITY INVOKER
SET jit = off
AS $$
WITH unfolded AS (
  -- Deltas not folded yet, all policies in one pass (a runner keeps them few).
  SELECT d.policy, sum(d.d_pending) AS pending, sum(d.d_scheduled) AS scheduled, sum(d.d_in_flight) AS in_flight,
         sum(d.d_dead) AS dead,
         sum(d.completed) FILTER (WHERE d.minute > now() - interval '24 hours 1 minute') AS completed_24h,
         sum(d.failed) FILTER (WHERE d.minute > now() - interval '24 hours 1 minute') AS failed_24h,
         sum(d.admitted) FILTER (WHERE d.minute > now() - interval '24 hours 1 minute') AS admitted_24h,
         sum(d.completed) FILTER (WHERE d.minute >= dispatch_policy._minute(now()) - interval '10 minutes'
                                    AND d.minute < dispatch_policy._minute(now())) AS completed_10m,
         dispatch_policy._lag_hist_sum(d.lag_hist) FILTER (WHERE d.minute > now() - interval '1 hour 1 minute') AS lag_hist_1h
  FROM dispatch_policy.stat_deltas d
  WHERE d.gate = ''
  GROUP BY 1
)
SELECT
  p.name AS policy,
  (coalesce(c.pending, 0) + coalesce(u.pending, 0) + due.n)::bigint AS pending,
  (coalesce(c.scheduled, 0) + coalesce(u.scheduled, 0) - due.n)::bigint AS scheduled,
  (coalesce(c.in_flight, 0) + coalesce(u.in_flight, 0))::bigint AS in_flight,
  (coalesce(h.completed_24h, 0) + coalesce(u.completed_24h, 0))::bigint AS completed_24h,
  (coalesce(h.failed_24h, 0) + coalesce(u.failed_24h, 0))::bigint AS failed_24h,
  (coalesce(c.dead, 0) + coalesce(u.dead, 0))::bigint AS dead,
  now() - least(head.staged_at, due.staged_at) AS oldest_pending_age,
  p.paused,
  rf.first_failed_at AS failing_since,
  rf.failures AS tick_failures,
  rf.error AS last_error,
  rf.retry_at,
  (coalesce(h.admitted_24h, 0) + coalesce(u.admitted_24h, 0))::bigint AS admitted_24h,
  dispatch_policy._lag_percentile(
    coalesce(dispatch_policy._lag_hist_add(h.lag_hist_1h, u.lag_hist_1h), h.lag_hist_1h, u.lag_hist_1h), 0.5) AS lag_p50_ms,
  dispatch_policy._lag_percentile(
    coalesce(dispatch_policy._lag_hist_add(h.lag_hist_1h, u.lag_hist_1h), h.lag_hist_1h, u.lag_hist_1h), 0.95) AS lag_p95_ms,
  ((coalesce(h.completed_10m, 0) + coalesce(u.completed_10m, 0)) / 10.0)::double precision AS throughput_per_min
FROM dispatch_policy.policies p
LEFT JOIN dispatch_policy.runner_failures rf ON rf.policy = p.name
LEFT JOIN dispatch_policy.policy_counters c ON c.policy = p.name
LEFT JOIN unfolded u ON u.policy = p.name
-- Scheduled jobs whose time has come but that no tick has promoted yet are
-- pending: the range of staged_jobs_scheduled_idx up to now (few rows:
-- every tick promotes them).
CROSS JOIN LATERAL (
  SELECT count(*) AS n, min(s.staged_at) AS staged_at FROM dispatch_policy.staged_jobs s
  WHERE s.policy = p.name AND s.not_before IS NOT NULL AND s.not_before <= now()) due
-- The longest wait among eligible jobs: the first job in staging order of
-- each priority (one probe of staged_jobs_ready_idx per distinct priority).
CROSS JOIN LATERAL (
  WITH RECURSIVE priorities AS (
    (SELECT s.priority FROM dispatch_policy.staged_jobs s
     WHERE s.policy = p.name AND s.not_before IS NULL ORDER BY s.priority LIMIT 1)
    UNION ALL
    SELECT (SELECT s.priority FROM dispatch_policy.staged_jobs s
            WHERE s.policy = p.name AND s.not_before IS NULL AND s.priority > r.priority ORDER BY s.priority LIMIT 1)
    FROM priorities r WHERE r.priority IS NOT NULL
  )
  SELECT min((SELECT s.staged_at FROM dispatch_policy.staged_jobs s
              -- The policy as a range, not =: with =, the primary key also
              -- gives id order, and the planner may walk it through every
              -- other policy's rows (and the dead ones of admitted jobs).
              WHERE s.policy >= p.name AND s.policy <= p.name AND s.not_before IS NULL AND s.priority = r.priority
              ORDER BY s.policy, s.priority, s.id LIMIT 1)) AS staged_at
  FROM priorities r WHERE r.priority IS NOT NULL) head
-- The last day of minute rows (at most 1,441), one pass.
CROSS JOIN LATERAL (
  SELECT sum(m.completed) AS completed_24h, sum(m.failed) AS failed_24h, sum(m.admitted) AS admitted_24h,
         sum(m.completed) FILTER (WHERE m.minute >= dispatch_policy._minute(now()) - interval '10 minutes'
                                    AND m.minute < dispatch_policy._minute(now())) AS completed_10m,
         dispatch_policy._lag_hist_sum(m.lag_hist) FILTER (WHERE m.minute > now() - interval '1 hour 1 minute') AS lag_hist_1h
  FROM dispatch_policy.stat_minutes m
  WHERE m.policy = p.name AND m.gate = '' AND m.partition = '' AND m.minute > now() - interval '24 hours 1 minute') h
ORDER BY p.name
$$;
COMMENT ON FUNCTION dispatch_policy._policy_overview() IS
  'Internal: the rows of policy_overview (see there), computed with JIT off.';

-- policy_overview reads its rows from _policy_overview and appends
-- admitted_24h, lag_p50_ms, lag_p95_ms and throughput_per_min (it is
-- defined once in 0.2.0, in 0025_shadow.sql).

-- ---------------------------------------------------------------------------
-- Maintenance: prune() folds these deltas first, then deletes old minute
-- rows, a bounded number per call. It is redefined once, in 0018, with what
-- the actions of 0017 leave behind as well.

-- ---------------------------------------------------------------------------
-- Dumps. policy_counters, stat_deltas and stat_minutes are not marked as
-- extension configuration (0009 marks every other table): with CREATE
-- EXTENSION, pg_restore creates these triggers before it loads the job
-- tables, so the loaded rows are counted again by the triggers. Left out of
-- the dump, the counters come back exact, rebuilt by the triggers from the
-- restored rows, and the history comes back as far as the restored rows tell
-- it (completions, deaths and failures since the retention; stagings and
-- admissions of the jobs still held). Dumped too, every restored row would
-- be counted twice. (Installed by "dispatch-policy migrate", pg_dump keeps
-- the three tables and creates the triggers after the data: exact as well.)
