-- Pending jobs per gate partition, and the pending trend (issue 10).
--
-- The admin's policy page lists gate partitions with their pending jobs and
-- when a job was last staged into each; the overview charts pending jobs per
-- minute. Counting a partition's jobs meant rendering the partition template
-- of every staged job of the policy (partition_overview did, on every read):
-- seconds at a million staged jobs. Now:
--
--   staged_jobs.partitions  each staged job's partition of every partitioned
--                           gate of its policy ({"gate": "partition"}: the
--                           throttle, concurrency and adaptive_concurrency
--                           gates with a partition_by), rendered once when
--                           the job is staged (stage, stage_many: in the
--                           INSERT; any other INSERT: a row trigger) and
--                           again only when the policy's templates change;
--   stat_deltas             the staged_jobs triggers of 0016 also write one
--                           row per statement and (policy, gate, partition):
--                           d_pending (+ inserted, - deleted, moved by an
--                           UPDATE that changes the stored partitions) and
--                           last_staged_at. The rows they delete carry their
--                           partitions, so admission renders nothing;
--   partition_counters      per (policy, gate, partition): staged jobs and
--                           when one was last staged, kept by fold_stats();
--   stat_minutes            policy rows also hold d_pending and d_scheduled,
--                           the net change per minute of the policy's
--                           pending and scheduled jobs, from which
--                           pending_minutes() reconstructs the count at the
--                           end of each minute backwards from the exact
--                           count now.
--
-- Readers: partition_pending(policy, gate, partitions) (folded rows plus the
-- deltas not folded yet, for just the partitions asked for),
-- pending_minutes(policy, since, until), and partition_overview, which now
-- reads these counters instead of rendering every staged job.
--
-- A job's pending count belongs to the partition stored with it. Exactness
-- therefore rests on the stored partitions being what the policy's config
-- renders, which these rules keep:
--   * a redeclared policy whose partitioned gates' templates changed (a
--     gate added, removed or renamed, or a partition_by changed) has the
--     partitions of its staged jobs rendered again in the same transaction
--     (sync_partitions), and the UPDATE trigger moves their counts. That
--     costs one render and one row update per staged job of the policy
--     (see bench/partitions.sh). Stagers and the re-render agree through
--     an advisory lock per policy (_partitions_lock_key): whatever renders
--     a job's partitions (stage, stage_many, the row trigger) holds it
--     shared from before it reads the policy's templates until it commits;
--     the re-render holds it exclusively until the redeclare commits. So a
--     stager either committed before the re-render (which then sees its
--     jobs) or waits for the redeclare and reads the new templates. Only
--     stagers of that policy wait, for as long as the re-render takes;
--     ticks and other policies do not. The redeclare takes it after the
--     tick lock and the admitted jobs' rows (_rebuild_gate_state), which a
--     failing worker re-staging a job takes in that order too: no deadlock;
--   * a direct INSERT without partitions (a restore of an old dump, fail()
--     and the reaper re-staging a retry, retry(), a DBA's INSERT) gets them
--     from a row trigger; an UPDATE of a job's policy or context renders
--     them again;
--   * TRUNCATE brings the counters to zero (0016's TRUNCATE trigger).
-- A stager in a REPEATABLE READ or SERIALIZABLE transaction that began
-- before a redeclare committed, or a value a DBA writes into partitions,
-- can leave a job counted in a partition the config no longer renders;
-- sync_partitions() repairs that.

-- ---------------------------------------------------------------------------
-- Locks. The ALTER TABLEs below take ACCESS EXCLUSIVE locks on policies,
-- staged_jobs, stat_deltas, policy_counters and stat_minutes; writers take
-- those tables in varying orders (a stager reads policies and inserts into
-- staged_jobs and, by trigger, stat_deltas; a fold writes stat_deltas,
-- policy_counters and stat_minutes), so taking them one at a time can
-- deadlock with a writer. As in 0016: all at once, under a lock_timeout
-- shorter than the deadlock_timeout, trying again for up to about 30 s.
-- Held until the migration commits, they also keep every staged row still
-- while the backfill below renders its partitions: counted exactly once.
DO $$
DECLARE
  saved text := current_setting('lock_timeout');
  tries integer := 0;
BEGIN
  LOOP
    BEGIN
      PERFORM set_config('lock_timeout', '200ms', true);
      LOCK TABLE dispatch_policy.policies, dispatch_policy.staged_jobs, dispatch_policy.stat_deltas,
                 dispatch_policy.policy_counters, dispatch_policy.stat_minutes IN ACCESS EXCLUSIVE MODE;
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

-- The deltas written before this migration are folded as 0016 folds them:
-- their policy rows carry changes of pending and scheduled jobs without a
-- minute (a deletion's) or in the minute of staged_at (a staging's), which
-- pending_minutes could not tell apart from the ones it reads. Under the
-- locks above no delta is written meanwhile (every writer of stat_deltas
-- waits), so the new ones all start from here.
DO $$
BEGIN
  WHILE dispatch_policy.fold_stats(now(), 1000000) > 0 LOOP
  END LOOP;
END
$$;

-- ---------------------------------------------------------------------------
-- A policy's partitioned gates, computed once when its config is written.

-- The throttle, concurrency and adaptive_concurrency gates with a
-- partition_by, in config order (as _partitioned_gate defines them). Never
-- raises, also for a config that is not valid (it is a generated column).
CREATE FUNCTION dispatch_policy._partition_gates(config jsonb)
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(array_agg(coalesce(g ->> 'name', g ->> 'type') ORDER BY x.n), '{}')
  FROM jsonb_array_elements(CASE WHEN jsonb_typeof(config -> 'gates') = 'array' THEN config -> 'gates' ELSE '[]'::jsonb END)
       WITH ORDINALITY AS x(g, n)
  WHERE jsonb_typeof(g) = 'object' AND g ->> 'type' IN ('throttle', 'concurrency', 'adaptive_concurrency')
    AND g ? 'partition_by'
$$;
COMMENT ON FUNCTION dispatch_policy._partition_gates(jsonb) IS
  'Internal: the names of a config''s partitioned gates (throttle, concurrency and adaptive_concurrency gates with a partition_by), in config order; ''{}'' for none. Never raises. policies.partition_gates.';

CREATE FUNCTION dispatch_policy._partition_templates(config jsonb)
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(array_agg(g ->> 'partition_by' ORDER BY x.n), '{}')
  FROM jsonb_array_elements(CASE WHEN jsonb_typeof(config -> 'gates') = 'array' THEN config -> 'gates' ELSE '[]'::jsonb END)
       WITH ORDINALITY AS x(g, n)
  WHERE jsonb_typeof(g) = 'object' AND g ->> 'type' IN ('throttle', 'concurrency', 'adaptive_concurrency')
    AND g ? 'partition_by'
$$;
COMMENT ON FUNCTION dispatch_policy._partition_templates(jsonb) IS
  'Internal: the partition_by templates of a config''s partitioned gates, in the order of _partition_gates; ''{}'' for none. Never raises. policies.partition_templates.';

-- Of templates with exactly one placeholder (the usual "{account_id}" or
-- "acct:{account_id}"), what precedes it, its key or what follows it, so
-- that staging renders such a template with one lookup in the job's
-- context; NULL for any other template (rendered by _render_template).
-- Self-contained (it calls no function of the schema): a generated column
-- of policies uses it, and pg_restore creates that table, inlining this
-- body, before functions it has no recorded dependency on.
CREATE FUNCTION dispatch_policy._template_parts(templates text[], part text)
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(array_agg(
           CASE
             WHEN t.template IS NULL OR strpos(t.template, '{') = 0 OR strpos(t.template, '}') < strpos(t.template, '{')
                  OR strpos(substr(t.template, strpos(t.template, '{') + 1), '{') <> 0 THEN NULL
             WHEN part = 'prefix' THEN left(t.template, strpos(t.template, '{') - 1)
             WHEN part = 'key' THEN substr(t.template, strpos(t.template, '{') + 1, strpos(t.template, '}') - strpos(t.template, '{') - 1)
             WHEN part = 'suffix' THEN substr(t.template, strpos(t.template, '}') + 1)
           END ORDER BY t.n), '{}')
  FROM unnest(templates) WITH ORDINALITY AS t(template, n)
$$;
COMMENT ON FUNCTION dispatch_policy._template_parts(text[], text) IS
  'Internal: of each template with exactly one {key} placeholder, the text before it (part ''prefix''), its key (''key'') or the text after it (''suffix''), as _render_template renders such a template; NULL for a template with none or several; in order. Calls no other function (see the migration: pg_restore inlines it when it creates policies).';

ALTER TABLE dispatch_policy.policies
  ADD COLUMN partition_gates text[] GENERATED ALWAYS AS (dispatch_policy._partition_gates(config)) STORED,
  ADD COLUMN partition_templates text[] GENERATED ALWAYS AS (dispatch_policy._partition_templates(config)) STORED,
  ADD COLUMN partition_prefixes text[]
    GENERATED ALWAYS AS (dispatch_policy._template_parts(dispatch_policy._partition_templates(config), 'prefix')) STORED,
  ADD COLUMN partition_keys text[]
    GENERATED ALWAYS AS (dispatch_policy._template_parts(dispatch_policy._partition_templates(config), 'key')) STORED,
  ADD COLUMN partition_suffixes text[]
    GENERATED ALWAYS AS (dispatch_policy._template_parts(dispatch_policy._partition_templates(config), 'suffix')) STORED;
COMMENT ON COLUMN dispatch_policy.policies.partition_gates IS
  'The policy''s partitioned gates (throttle, concurrency and adaptive_concurrency gates with a partition_by), in config order: the keys of staged_jobs.partitions.';
COMMENT ON COLUMN dispatch_policy.policies.partition_templates IS
  'Their partition_by templates, in the same order: what staging renders staged_jobs.partitions from.';
COMMENT ON COLUMN dispatch_policy.policies.partition_prefixes IS
  'For each of partition_templates with exactly one placeholder, the text before it (else NULL): with partition_keys and partition_suffixes, what lets staging render such a template with one lookup per job.';
COMMENT ON COLUMN dispatch_policy.policies.partition_keys IS
  'For each of partition_templates with exactly one placeholder, its context key (else NULL).';
COMMENT ON COLUMN dispatch_policy.policies.partition_suffixes IS
  'For each of partition_templates with exactly one placeholder, the text after it (else NULL).';

-- ---------------------------------------------------------------------------
-- Rendering a job's partitions.

-- A job's partition for a template with no placeholder or several: as
-- _partition_key computes it, behind a PL/pgSQL call, so that the
-- expression the planner inlines into staging stays small (it is planned
-- on every stage_many call).
CREATE FUNCTION dispatch_policy._partition_key_general(template text, context jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
BEGIN
  RETURN dispatch_policy._partition_key(template, context);
END
$$;
COMMENT ON FUNCTION dispatch_policy._partition_key_general(text, jsonb) IS
  'Internal: _partition_key(template, context), not inlinable (the path of _partition_of for templates with no placeholder or several).';

-- One gate's partition: with the template split (prefix, key, suffix), one
-- lookup of the key (->> gives what _context_text gives: a string
-- unquoted, null as NULL, other JSON as its text); else the template
-- rendered. Fitted by _fit_key beyond 256 bytes, as _partition_key.
CREATE FUNCTION dispatch_policy._partition_of(prefix text, key text, suffix text, template text, context jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE
    WHEN key IS NULL THEN dispatch_policy._partition_key_general(template, context)
    WHEN octet_length(context ->> key) > 256 - octet_length(prefix) - octet_length(suffix)
      THEN dispatch_policy._fit_key(prefix || (context ->> key) || suffix)
    ELSE prefix || coalesce(context ->> key, '') || suffix
  END
$$;
COMMENT ON FUNCTION dispatch_policy._partition_of(text, text, text, text, jsonb) IS
  'Internal: _partition_key(template, context), given the template''s prefix, key and suffix (_template_parts) (all NULL: _partition_key_general). Inlinable.';

CREATE FUNCTION dispatch_policy._render_partitions_general(
  gates text[], templates text[], prefixes text[], keys text[], suffixes text[], context jsonb
)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(jsonb_object_agg(x.gate, dispatch_policy._partition_of(x.prefix, x.key, x.suffix, x.template, context)),
                  '{}'::jsonb)
  FROM unnest(gates, templates, prefixes, keys, suffixes) AS x(gate, template, prefix, key, suffix)
  WHERE x.gate IS NOT NULL AND x.template IS NOT NULL
$$;
COMMENT ON FUNCTION dispatch_policy._render_partitions_general(text[], text[], text[], text[], text[], jsonb) IS
  'Internal: the general path of _render_partitions (any number of gates).';

-- Up to three partitioned gates (a throttle, a concurrency and an adaptive
-- gate) without a subquery, so that the planner inlines it into the
-- staging INSERT; more go through the general path. The arrays are a
-- policy's partition_gates, partition_templates, partition_prefixes,
-- partition_keys and partition_suffixes; staging passes them as
-- parameters (read from a table row, each subscript would copy the array).
CREATE FUNCTION dispatch_policy._render_partitions(
  gates text[], templates text[], prefixes text[], keys text[], suffixes text[], context jsonb
)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT CASE coalesce(cardinality(gates), 0)
    WHEN 0 THEN '{}'::jsonb
    WHEN 1 THEN jsonb_build_object(
      gates[1], dispatch_policy._partition_of(prefixes[1], keys[1], suffixes[1], templates[1], context))
    WHEN 2 THEN jsonb_build_object(
      gates[1], dispatch_policy._partition_of(prefixes[1], keys[1], suffixes[1], templates[1], context),
      gates[2], dispatch_policy._partition_of(prefixes[2], keys[2], suffixes[2], templates[2], context))
    WHEN 3 THEN jsonb_build_object(
      gates[1], dispatch_policy._partition_of(prefixes[1], keys[1], suffixes[1], templates[1], context),
      gates[2], dispatch_policy._partition_of(prefixes[2], keys[2], suffixes[2], templates[2], context),
      gates[3], dispatch_policy._partition_of(prefixes[3], keys[3], suffixes[3], templates[3], context))
    ELSE dispatch_policy._render_partitions_general(gates, templates, prefixes, keys, suffixes, context)
  END
$$;
COMMENT ON FUNCTION dispatch_policy._render_partitions(text[], text[], text[], text[], text[], jsonb) IS
  'Internal: {"gate": "partition"} of a job context under a policy''s partition_gates, partition_templates, partition_prefixes, partition_keys and partition_suffixes: each partitioned gate''s partition as _gate_partitions (and so the runner, explain, drain and pause_partition) computes it; ''{}'' without partitioned gates. What staged_jobs.partitions holds. Inlined by the planner for up to three gates.';

-- ---------------------------------------------------------------------------
-- The stored partitions.

-- Added with a default so that existing rows need no rewrite here (the
-- backfill below renders them); the default is dropped at once, so that an
-- INSERT that does not name the column gets NULL, which the row trigger
-- below fills in.
ALTER TABLE dispatch_policy.staged_jobs ADD COLUMN partitions jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE dispatch_policy.staged_jobs ALTER COLUMN partitions DROP DEFAULT;
ALTER TABLE dispatch_policy.staged_jobs
  ADD CONSTRAINT staged_jobs_partitions_check CHECK (jsonb_typeof(partitions) = 'object');
COMMENT ON COLUMN dispatch_policy.staged_jobs.partitions IS
  'The job''s partition of each partitioned gate of its policy, {"gate": "partition"} (''{}'' when it has none): rendered from the policy''s partition_templates when the job is staged (by stage and stage_many, else by a row trigger for an INSERT that leaves it NULL), again when its policy or context is updated, and for every staged job of a policy whose partitioned gates'' templates change (sync_partitions). Its pending count in partition_counters is kept under these keys. A value an INSERT gives is kept as given (a restore brings back the dumped one).';

ALTER TABLE dispatch_policy.stat_deltas ADD COLUMN last_staged_at timestamptz;
COMMENT ON COLUMN dispatch_policy.stat_deltas.last_staged_at IS
  'Latest finite staged_at of the jobs the row''s statement inserted (or moved into the partition), for policy_counters.last_staged_at and partition_counters.last_staged_at; NULL when none.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.gate IS
  'Gate name; '''' for the whole policy. Gate rows change only partition_counters.pending (d_pending; pending and scheduled together) among the counters.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.d_pending IS
  'Policy rows (gate ''''): change of policy_counters.pending (eligible jobs), in the minute of the writing transaction''s now(). Gate rows: change of partition_counters.pending (staged jobs, eligible and scheduled), minute NULL.';
COMMENT ON COLUMN dispatch_policy.stat_deltas.d_scheduled IS
  'Change of policy_counters.scheduled (policy rows only), in the minute of the writing transaction''s now().';
COMMENT ON COLUMN dispatch_policy.stat_deltas.minute IS
  'Minute of the events of the row (see stat_minutes.minute); a policy row''s d_pending and d_scheduled count in it too. NULL when the row only changes counters (gate partition pending rows, and policy rows written before 0020).';
COMMENT ON TABLE dispatch_policy.stat_deltas IS
  'Changes not yet folded into policy_counters, partition_counters and stat_minutes: insert-only, one row per writing statement and (policy, gate, partition, minute), written by the history triggers on staged_jobs, admitted_jobs, finished_jobs and job_failures (and by _record_refusals). fold_stats() deletes the rows it folds. Readers add these rows to the folded ones, so they are exact whether or not a fold ran.';

ALTER TABLE dispatch_policy.policy_counters ADD COLUMN last_staged_at timestamptz;
COMMENT ON COLUMN dispatch_policy.policy_counters.last_staged_at IS
  'Latest staged_at of a job staged into the policy (new or a retry), as folded; NULL when none since 0020 (which set it from the jobs then staged).';

ALTER TABLE dispatch_policy.stat_minutes
  ADD COLUMN d_pending bigint NOT NULL DEFAULT 0,
  ADD COLUMN d_scheduled bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN dispatch_policy.stat_minutes.d_pending IS
  'Policy rows only: net change of the policy''s pending (eligible) jobs in the minute, by the writing transaction''s now() (0 before 0020). pending_minutes() reads the count at the end of a minute as the count now minus the changes of the minutes after it.';
COMMENT ON COLUMN dispatch_policy.stat_minutes.d_scheduled IS
  'Policy rows only: net change of the policy''s scheduled jobs in the minute, as d_pending.';

CREATE TABLE dispatch_policy.partition_counters (
  policy         text NOT NULL,
  gate           text NOT NULL,
  partition      text NOT NULL,
  pending        bigint NOT NULL DEFAULT 0,
  last_staged_at timestamptz,
  updated_at     timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT partition_counters_pkey PRIMARY KEY (policy, gate, partition)
);
ALTER TABLE dispatch_policy.partition_counters SET (fillfactor = 70);
COMMENT ON TABLE dispatch_policy.partition_counters IS
  'Staged jobs per gate partition (partitioned gates: throttle, concurrency and adaptive_concurrency gates with a partition_by), as of the last fold_stats(): the exact count is this row plus the sum of the deltas not folded yet (stat_deltas rows of the gate and partition). Keyed by staged_jobs.partitions. Written only by fold_stats(); prune() deletes a row whose pending is 0 and whose last_staged_at is older than its retention. Read by partition_pending() and partition_overview. Not in a dump (as policy_counters, see 0016): the triggers count restored jobs again.';
COMMENT ON COLUMN dispatch_policy.partition_counters.policy IS 'Policy name.';
COMMENT ON COLUMN dispatch_policy.partition_counters.gate IS 'Gate name.';
COMMENT ON COLUMN dispatch_policy.partition_counters.partition IS 'Partition key, as staged_jobs.partitions, admitted_jobs.partitions and partition_overview show it.';
COMMENT ON COLUMN dispatch_policy.partition_counters.pending IS 'Staged jobs in the partition, eligible and scheduled, as folded.';
COMMENT ON COLUMN dispatch_policy.partition_counters.last_staged_at IS 'Latest staged_at of a job staged into the partition (new, a retry, or moved into it by a changed template), as folded; the job may have been admitted since.';
COMMENT ON COLUMN dispatch_policy.partition_counters.updated_at IS 'When a fold last changed the row (the now given to fold_stats).';

-- ---------------------------------------------------------------------------
-- Rows written without stage(), and jobs whose policy or context changes.

CREATE FUNCTION dispatch_policy._partitions_lock_key(policy text)
RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT hashtextextended('dispatch_policy.partitions.' || policy, 0)
$$;
COMMENT ON FUNCTION dispatch_policy._partitions_lock_key(text) IS
  'Internal: the advisory lock of a policy''s partition templates: held shared (until commit) by whatever renders a staged job''s partitions, from before it reads the templates; exclusively by sync_partitions (and so a redeclare that changes them) while it renders the policy''s staged jobs again.';

CREATE FUNCTION dispatch_policy._staged_partitions()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  -- Then the policy's templates as a redeclare under way leaves them (the
  -- next statement's snapshot is taken after the lock, in READ COMMITTED).
  PERFORM pg_advisory_xact_lock_shared(dispatch_policy._partitions_lock_key(NEW.policy));
  NEW.partitions := coalesce(
    (SELECT dispatch_policy._render_partitions(p.partition_gates, p.partition_templates, p.partition_prefixes,
                                               p.partition_keys, p.partition_suffixes, NEW.context)
     FROM dispatch_policy.policies p WHERE p.name = NEW.policy),
    '{}'::jsonb);
  RETURN NEW;
END
$$;
COMMENT ON FUNCTION dispatch_policy._staged_partitions() IS
  'Internal row trigger (BEFORE) of staged_jobs: renders a row''s partitions from its policy''s partition_templates (''{}'' for a policy not declared) for an INSERT that leaves them NULL (fail and the reaper re-staging a retry, retry(), a restore or a DBA''s INSERT; stage and stage_many render them in the INSERT) and for an UPDATE of the job''s policy or context.';
CREATE TRIGGER staged_jobs_partitions_insert
  BEFORE INSERT ON dispatch_policy.staged_jobs
  FOR EACH ROW WHEN (NEW.partitions IS NULL)
  EXECUTE FUNCTION dispatch_policy._staged_partitions();
-- A column list: an UPDATE that sets only other columns (promote_scheduled's
-- not_before, a key or priority) does not even evaluate the condition.
CREATE TRIGGER staged_jobs_partitions_update
  BEFORE UPDATE OF policy, context, partitions ON dispatch_policy.staged_jobs
  FOR EACH ROW WHEN (NEW.policy IS DISTINCT FROM OLD.policy OR NEW.context IS DISTINCT FROM OLD.context
                     OR NEW.partitions IS NULL)
  EXECUTE FUNCTION dispatch_policy._staged_partitions();

-- ---------------------------------------------------------------------------
-- The staged_jobs history trigger (0016), with partitions. Copied from 0016
-- and changed: policy rows record their change of pending and scheduled in
-- the minute of now() (for pending_minutes), every statement records
-- last_staged_at, and gate partition rows carry d_pending. Rows are first
-- grouped by (policy, partitions): jobs that share their partitions (a
-- batch of one tenant's jobs, a lane's jobs admitted together) are expanded
-- once.
CREATE OR REPLACE FUNCTION dispatch_policy._history_staged()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
DECLARE
  this_minute timestamptz := dispatch_policy._minute(now());
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO dispatch_policy.stat_deltas (policy, gate, partition, minute, d_pending, d_scheduled, staged, last_staged_at)
    -- The policy: new jobs as staged in the minute of their staged_at;
    -- pending and scheduled jobs in the minute of now() (the same minute,
    -- unless the writer set staged_at).
    SELECT g.policy, '', '', v.minute, sum(v.pending), sum(v.scheduled), sum(v.staged), max(v.last_staged_at)
    FROM (SELECT n.policy, CASE WHEN n.attempt = 1 THEN dispatch_policy._minute(n.staged_at) END AS staged_minute,
                 count(*) FILTER (WHERE n.not_before IS NULL) AS pending,
                 count(*) FILTER (WHERE n.not_before IS NOT NULL) AS scheduled,
                 count(*) FILTER (WHERE n.attempt = 1) AS staged,
                 max(n.staged_at) FILTER (WHERE isfinite(n.staged_at)) AS last_staged_at
          FROM new_rows n
          GROUP BY 1, 2) g
    CROSS JOIN LATERAL (VALUES (g.staged_minute, 0::bigint, 0::bigint, g.staged, NULL::timestamptz),
                               (this_minute, g.pending, g.scheduled, 0::bigint, g.last_staged_at))
                       AS v(minute, pending, scheduled, staged, last_staged_at)
    WHERE v.pending <> 0 OR v.scheduled <> 0 OR v.staged <> 0
    GROUP BY 1, 4
    UNION ALL
    -- Each gate partition (the rows grouped by their partitions first: jobs
    -- staged together often share them).
    SELECT g.policy, p.key,
           CASE WHEN octet_length(p.value) <= 256 THEN p.value ELSE dispatch_policy._fit_key(p.value) END,
           NULL, sum(g.n), 0, 0, max(g.last_staged_at)
    FROM (SELECT n.policy, n.partitions, count(*) AS n, max(n.staged_at) FILTER (WHERE isfinite(n.staged_at)) AS last_staged_at
          FROM new_rows n
          WHERE n.partitions <> '{}'::jsonb
          GROUP BY 1, 2) g,
         jsonb_each_text(g.partitions) AS p
    WHERE p.key <> '' AND p.value IS NOT NULL
    GROUP BY 1, 2, 3;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO dispatch_policy.stat_deltas (policy, gate, partition, minute, d_pending, d_scheduled)
    SELECT o.policy, '', '', this_minute, -count(*) FILTER (WHERE o.not_before IS NULL),
           -count(*) FILTER (WHERE o.not_before IS NOT NULL)
    FROM old_rows o
    GROUP BY 1
    UNION ALL
    SELECT g.policy, p.key,
           CASE WHEN octet_length(p.value) <= 256 THEN p.value ELSE dispatch_policy._fit_key(p.value) END,
           NULL, -sum(g.n), 0
    FROM (SELECT o.policy, o.partitions, count(*) AS n
          FROM old_rows o
          WHERE o.partitions <> '{}'::jsonb
          GROUP BY 1, 2) g,
         jsonb_each_text(g.partitions) AS p
    WHERE p.key <> '' AND p.value IS NOT NULL
    GROUP BY 1, 2, 3;
  ELSE
    -- What moved between pending and scheduled (promote_scheduled, a DBA
    -- setting not_before) or between policies, and between partitions (a
    -- changed template rendered again, a job's context or policy updated):
    -- rows counted out with their old values and in with their new ones,
    -- netted per (policy, partitions) first, so that an UPDATE that changes
    -- neither (a promotion, a key or priority) expands no partitions.
    WITH c AS (
      SELECT n.policy, n.partitions, 1 AS n, (n.not_before IS NULL)::integer AS p, (n.not_before IS NOT NULL)::integer AS s,
             CASE WHEN isfinite(n.staged_at) THEN n.staged_at END AS staged_at
      FROM new_rows n
      UNION ALL
      SELECT o.policy, o.partitions, -1, -(o.not_before IS NULL)::integer, -(o.not_before IS NOT NULL)::integer, NULL
      FROM old_rows o
    ), g AS MATERIALIZED (
      SELECT c.policy, c.partitions, sum(c.n) AS n, sum(c.p) AS p, sum(c.s) AS s, max(c.staged_at) AS last_staged_at
      FROM c
      GROUP BY 1, 2
      HAVING sum(c.n) <> 0 OR sum(c.p) <> 0 OR sum(c.s) <> 0
    )
    INSERT INTO dispatch_policy.stat_deltas (policy, gate, partition, minute, d_pending, d_scheduled, last_staged_at)
    SELECT g.policy, '', '', this_minute, sum(g.p), sum(g.s), NULL
    FROM g
    GROUP BY 1
    HAVING sum(g.p) <> 0 OR sum(g.s) <> 0
    UNION ALL
    SELECT g.policy, k.key,
           CASE WHEN octet_length(k.value) <= 256 THEN k.value ELSE dispatch_policy._fit_key(k.value) END,
           NULL, sum(g.n), 0, max(g.last_staged_at) FILTER (WHERE g.n > 0)
    FROM g, jsonb_each_text(g.partitions) AS k
    WHERE g.n <> 0 AND k.key <> '' AND k.value IS NOT NULL
    GROUP BY 1, 2, 3
    HAVING sum(g.n) <> 0;
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._history_staged() IS
  'Internal trigger (statement level, transition tables) of staged_jobs: records in stat_deltas the change of pending and scheduled jobs per policy (in the minute of now()), new jobs (attempt 1) as staged in the minute of their staged_at, the change of staged jobs per gate partition of staged_jobs.partitions (inserted, deleted, or moved by an UPDATE of the stored partitions or of the policy), and the latest staged_at of the jobs inserted (or moved into a partition).';

-- The TRUNCATE trigger of 0016, copied and extended: also brings every
-- gate partition's pending count to zero, and records the policy's drop of
-- pending and scheduled jobs in the minute of now() (for pending_minutes).
CREATE OR REPLACE FUNCTION dispatch_policy._history_truncated()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  INSERT INTO dispatch_policy.stat_deltas (policy, minute, d_pending, d_scheduled, d_in_flight, d_dead)
  SELECT t.policy,
         CASE WHEN TG_TABLE_NAME = 'staged_jobs' THEN dispatch_policy._minute(now()) END,
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
  IF TG_TABLE_NAME = 'staged_jobs' THEN
    INSERT INTO dispatch_policy.stat_deltas (policy, gate, partition, d_pending)
    SELECT t.policy, t.gate, t.partition, -sum(t.pending)
    FROM (SELECT c.policy, c.gate, c.partition, c.pending FROM dispatch_policy.partition_counters c
          UNION ALL
          SELECT d.policy, d.gate, d.partition, d.d_pending FROM dispatch_policy.stat_deltas d
          WHERE d.gate <> '' AND d.d_pending <> 0) t
    GROUP BY 1, 2, 3
    HAVING sum(t.pending) <> 0;
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._history_truncated() IS
  'Internal trigger of TRUNCATE on staged_jobs, admitted_jobs and finished_jobs: records in stat_deltas the change that brings the counters of that table (pending and scheduled, and every gate partition''s pending count; in flight; dead) to zero for every policy.';

-- ---------------------------------------------------------------------------
-- Folding (0016's fold_stats, copied and extended: policy_counters keeps
-- last_staged_at, stat_minutes d_pending and d_scheduled, and gate
-- partition rows go to partition_counters).

CREATE OR REPLACE FUNCTION dispatch_policy.fold_stats(now timestamptz DEFAULT now(), max_rows integer DEFAULT 100000)
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
    INSERT INTO dispatch_policy.policy_counters AS c (policy, pending, scheduled, in_flight, dead, last_staged_at, updated_at)
    SELECT t.policy, sum(t.d_pending), sum(t.d_scheduled), sum(t.d_in_flight), sum(t.d_dead), max(t.last_staged_at),
           fold_stats.now
    FROM taken t
    WHERE t.gate = ''
    GROUP BY 1
    HAVING sum(t.d_pending) <> 0 OR sum(t.d_scheduled) <> 0 OR sum(t.d_in_flight) <> 0 OR sum(t.d_dead) <> 0
           OR max(t.last_staged_at) IS NOT NULL
    ORDER BY 1
    ON CONFLICT ON CONSTRAINT policy_counters_pkey DO UPDATE
    SET pending = c.pending + EXCLUDED.pending, scheduled = c.scheduled + EXCLUDED.scheduled,
        in_flight = c.in_flight + EXCLUDED.in_flight, dead = c.dead + EXCLUDED.dead,
        last_staged_at = greatest(c.last_staged_at, EXCLUDED.last_staged_at), updated_at = EXCLUDED.updated_at
  ), partitions AS (
    INSERT INTO dispatch_policy.partition_counters AS c (policy, gate, partition, pending, last_staged_at, updated_at)
    SELECT t.policy, t.gate, t.partition, sum(t.d_pending), max(t.last_staged_at), fold_stats.now
    FROM taken t
    WHERE t.gate <> '' AND (t.d_pending <> 0 OR t.last_staged_at IS NOT NULL)
    GROUP BY 1, 2, 3
    HAVING sum(t.d_pending) <> 0 OR max(t.last_staged_at) IS NOT NULL
    ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT partition_counters_pkey DO UPDATE
    SET pending = c.pending + EXCLUDED.pending, last_staged_at = greatest(c.last_staged_at, EXCLUDED.last_staged_at),
        updated_at = EXCLUDED.updated_at
  ), minutes AS (
    INSERT INTO dispatch_policy.stat_minutes AS m
      (policy, gate, partition, minute, staged, admitted, refused, finished, completed, failed, dead, lag_count, lag_ms_sum,
       lag_hist, d_pending, d_scheduled)
    SELECT t.policy, t.gate, t.partition, t.minute, sum(t.staged), sum(t.admitted), sum(t.refused), sum(t.finished),
           sum(t.completed), sum(t.failed), sum(t.dead), sum(t.lag_count), sum(t.lag_ms_sum), dispatch_policy._lag_hist_sum(t.lag_hist),
           coalesce(sum(t.d_pending) FILTER (WHERE t.gate = ''), 0), coalesce(sum(t.d_scheduled) FILTER (WHERE t.gate = ''), 0)
    FROM taken t
    WHERE t.minute IS NOT NULL
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT ON CONSTRAINT stat_minutes_pkey DO UPDATE
    SET staged = m.staged + EXCLUDED.staged, admitted = m.admitted + EXCLUDED.admitted,
        refused = m.refused + EXCLUDED.refused, finished = m.finished + EXCLUDED.finished,
        completed = m.completed + EXCLUDED.completed, failed = m.failed + EXCLUDED.failed, dead = m.dead + EXCLUDED.dead,
        lag_count = m.lag_count + EXCLUDED.lag_count, lag_ms_sum = m.lag_ms_sum + EXCLUDED.lag_ms_sum,
        lag_hist = coalesce(dispatch_policy._lag_hist_add(m.lag_hist, EXCLUDED.lag_hist), m.lag_hist, EXCLUDED.lag_hist),
        d_pending = m.d_pending + EXCLUDED.d_pending, d_scheduled = m.d_scheduled + EXCLUDED.d_scheduled
  )
  SELECT count(*) INTO folded FROM taken;
  RETURN folded;
END
$$;
COMMENT ON FUNCTION dispatch_policy.fold_stats(timestamptz, integer) IS
  'Moves up to max_rows (1 to 10,000,000; default 100,000) rows of stat_deltas into policy_counters, partition_counters and stat_minutes, in one statement: the rows are deleted and their sums added. Safe to run concurrently (rows another fold holds are skipped; every delta is added exactly once). Readers never depend on it: they add the deltas not folded yet. now is stored as the counters'' updated_at. Returns the number of delta rows folded. prune() folds first; a runner folds at most once a second at the end of a tick.';

-- ---------------------------------------------------------------------------
-- Staging renders the partitions in its INSERT.

-- _stage as in 0013, copied; changes: it takes the policy's partitions lock
-- shared first, the INSERT into staged_jobs also stores partitions,
-- rendered with the templates read with the lane_template, and its plans
-- are generic (see below).
CREATE OR REPLACE FUNCTION dispatch_policy._stage(policy text, jobs jsonb, field_prefix text)
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
-- With the templates as constants, a custom plan of the INSERT looks much
-- cheaper than the generic one (every branch of _render_partitions folds
-- away), so the plan cache made a new plan on every call: 1 ms more for a
-- call of 10 jobs. The generic plan renders a job's partitions in about
-- 2 us; the other statements here were generic plans already.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  template text;
  part_gates text[];
  part_templates text[];
  part_prefixes text[];
  part_keys text[];
  part_suffixes text[];
  bad record;
  ids bigint[];
  lanes text[];
BEGIN
  -- Until commit: a redeclare does not render the policy's staged jobs
  -- again before these are visible to it, nor change the templates read
  -- below meanwhile (see _partitions_lock_key).
  PERFORM pg_advisory_xact_lock_shared(dispatch_policy._partitions_lock_key(_stage.policy));
  SELECT p.lane_template, p.partition_gates, p.partition_templates, p.partition_prefixes, p.partition_keys,
         p.partition_suffixes
  INTO template, part_gates, part_templates, part_prefixes, part_keys, part_suffixes
  FROM dispatch_policy.policies p WHERE p.name = _stage.policy;
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
        (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, partitions)
      SELECT p.id, _stage.policy, p.queue, p.priority, p.args, p.context, p.dedupe_key,
             dispatch_policy._round_robin_key(template, p.context, p.round_robin_key),
             CASE WHEN p.not_before > now() THEN p.not_before END,
             dispatch_policy._render_partitions(part_gates, part_templates, part_prefixes, part_keys, part_suffixes,
                                                p.context)
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
  'Internal: stages a JSON array of job specs (stage_many, and stage() for input its own check does not accept at a glance): checks every element first (nothing is stored if one is bad; the error names the field), dedupes, inserts in one statement (with each job''s partitions of the policy''s partitioned gates), adds the lanes of the jobs eligible now, notifies dispatch_policy_staged once.';

-- stage() as in 0013, copied; changes: it takes the policy's partitions lock
-- shared first, and the INSERT also stores the job's partitions, rendered
-- with the templates read with the lane_template.
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
BEGIN
  -- As _stage: the templates read next stay the policy's until commit.
  PERFORM pg_advisory_xact_lock_shared(dispatch_policy._partitions_lock_key(stage.policy));
  SELECT p.lane_template, p.partition_gates, p.partition_templates, p.partition_prefixes, p.partition_keys,
         p.partition_suffixes
  INTO template, part_gates, part_templates, part_prefixes, part_keys, part_suffixes
  FROM dispatch_policy.policies p WHERE p.name = stage.policy;
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
  -- An assignment (a plan made once per session) rather than in the
  -- INSERT, whose plan would be made again on every call.
  job_partitions := dispatch_policy._render_partitions(part_gates, part_templates, part_prefixes, part_keys, part_suffixes,
                                                       job_context);
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
    (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, partitions)
  VALUES (job_id, stage.policy, coalesce(stage.queue, 'default'), coalesce(stage.priority, 0), stage.args, job_context,
          stage.dedupe_key, dispatch_policy._round_robin_key(template, job_context, stage.round_robin_key),
          CASE WHEN stage.not_before > now() THEN stage.not_before END, job_partitions)
  RETURNING staged_jobs.round_robin_key, staged_jobs.not_before INTO lane, due;
  IF due IS NULL THEN
    PERFORM dispatch_policy._add_lanes(stage.policy, ARRAY[lane]);
  END IF;
  PERFORM pg_notify('dispatch_policy_staged', stage.policy);
  RETURN job_id;
END
$$;
COMMENT ON FUNCTION dispatch_policy.stage(text, jsonb, jsonb, text, text, text, integer, timestamptz) IS
  'Stages one job and returns its id, or NULL when a job of the same policy with the same dedupe_key is pending or admitted. Adds queue_name and priority to the context unless set; derives round_robin_key (the job''s lane) from the policy''s lane_template (round_robin_by, else its gates'' partition_by templates) when not given; stores the job''s partition of each partitioned gate (staged_jobs.partitions); a not_before in the future schedules the job. Errors: unknown policy 42704, NULL args 22004, a field out of its limits() bounds or otherwise invalid 22023 (the message names the field).';

-- ---------------------------------------------------------------------------
-- A policy whose partitioned gates' templates change: its staged jobs'
-- partitions are rendered again.

CREATE FUNCTION dispatch_policy.sync_partitions(policies text[] DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  pol dispatch_policy.policies;
  changed bigint := 0::bigint;
  n bigint;
BEGIN
  FOR pol IN SELECT * FROM dispatch_policy.policies p
             WHERE sync_partitions.policies IS NULL OR p.name = ANY (sync_partitions.policies) ORDER BY p.name LOOP
    -- Stagers of the policy wait from here until commit (and this waits
    -- for those in flight); policies in name order.
    PERFORM pg_advisory_xact_lock(dispatch_policy._partitions_lock_key(pol.name));
    -- The arrays as parameters (see _render_partitions). The staged_jobs
    -- triggers move the counts (_history_staged).
    UPDATE dispatch_policy.staged_jobs s
    SET partitions = dispatch_policy._render_partitions(pol.partition_gates, pol.partition_templates, pol.partition_prefixes,
                                                        pol.partition_keys, pol.partition_suffixes, s.context)
    WHERE s.policy = pol.name
      AND s.partitions IS DISTINCT FROM dispatch_policy._render_partitions(
            pol.partition_gates, pol.partition_templates, pol.partition_prefixes, pol.partition_keys, pol.partition_suffixes,
            s.context);
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
  END LOOP;
  RETURN changed;
END
$$;
COMMENT ON FUNCTION dispatch_policy.sync_partitions(text[]) IS
  'Maintenance: renders again the stored partitions (staged_jobs.partitions) of the staged jobs of the given policies (NULL: all declared policies) and updates those that differ from what the policy''s config renders; the staged_jobs triggers move their pending counts between partitions. Returns how many jobs changed. Holds each policy''s partitions lock (_partitions_lock_key) exclusively until commit: its stagers wait. A redeclare that changes a partitioned gate''s template runs it for its policy; call it by hand only after writing partitions directly, or after a stager in a REPEATABLE READ transaction raced a redeclare. Costs one render per staged job of those policies (it reads them all) and one row update per job that changed; jobs of policies not declared are left as they are.';

-- After policies_config_changed (AFTER triggers fire in name order), whose
-- _rebuild_gate_state takes the tick lock and the admitted jobs' rows first:
-- the order in which a failing worker, re-staging a job, takes a row and
-- then the partitions lock (see the top of this file).
CREATE FUNCTION dispatch_policy._policy_partitions_changed()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  -- A new policy: jobs written for it before it was declared (a direct
  -- INSERT) were stored without partitions; usually none (an index probe).
  IF TG_OP = 'INSERT' OR OLD.partition_gates IS DISTINCT FROM NEW.partition_gates
     OR OLD.partition_templates IS DISTINCT FROM NEW.partition_templates THEN
    PERFORM dispatch_policy.sync_partitions(ARRAY[NEW.name]);
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._policy_partitions_changed() IS
  'Internal trigger: a policy declared, or redeclared with other partitioned gates or templates, has its staged jobs'' partitions rendered again (sync_partitions; one render and, where it changed, one row update per staged job of the policy; the policy''s stagers wait until the redeclare commits).';
CREATE TRIGGER policies_partitions
  AFTER INSERT OR UPDATE OF config ON dispatch_policy.policies
  FOR EACH ROW EXECUTE FUNCTION dispatch_policy._policy_partitions_changed();

-- ---------------------------------------------------------------------------
-- Backfill, under the locks taken at the top: the partitions of the jobs
-- staged now (the UPDATE trigger counts them into their partitions, with
-- their latest staged_at), and each policy's latest staged_at.

SELECT dispatch_policy.sync_partitions();

INSERT INTO dispatch_policy.policy_counters AS c (policy, last_staged_at)
SELECT s.policy, max(s.staged_at) FILTER (WHERE isfinite(s.staged_at))
FROM dispatch_policy.staged_jobs s
GROUP BY 1
HAVING max(s.staged_at) FILTER (WHERE isfinite(s.staged_at)) IS NOT NULL
ORDER BY 1
ON CONFLICT ON CONSTRAINT policy_counters_pkey DO UPDATE
SET last_staged_at = greatest(c.last_staged_at, EXCLUDED.last_staged_at);

-- ---------------------------------------------------------------------------
-- Reading.

CREATE FUNCTION dispatch_policy.partition_pending(policy text, gate text, partitions text[])
RETURNS TABLE (partition text, pending bigint, last_staged_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY INVOKER
SET jit = off
AS $$
DECLARE
  bad bigint;
BEGIN
  PERFORM dispatch_policy._require_partitioned_gate(dispatch_policy._require_policy(partition_pending.policy),
                                                    partition_pending.gate);
  IF partitions IS NULL THEN
    RAISE EXCEPTION 'partitions must not be NULL'
      USING ERRCODE = '22004', HINT = 'Pass an array of partition keys, as partition_overview shows them.';
  END IF;
  IF cardinality(partitions) > 10000 THEN
    RAISE EXCEPTION 'partitions must hold at most 10000 keys'
      USING ERRCODE = '22023', DETAIL = format('partitions holds %s.', cardinality(partitions)),
            HINT = 'Ask for a page of partitions at a time.';
  END IF;
  SELECT k.n INTO bad FROM unnest(partitions) WITH ORDINALITY AS k(key, n) WHERE k.key IS NULL ORDER BY k.n LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'partitions[%] must not be NULL', bad USING ERRCODE = '22004';
  END IF;
  SELECT k.n INTO bad FROM unnest(partitions) WITH ORDINALITY AS k(key, n)
  WHERE octet_length(k.key) > dispatch_policy._limit_max('partition_key') ORDER BY k.n LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'partitions[%] %', bad, dispatch_policy._limit_rule('partition_key')
      USING ERRCODE = '22023', DETAIL = format('partitions[%s] is %s bytes.', bad, octet_length(partitions[bad])),
            HINT = 'Give the partition key as partition_overview shows it (longer keys are stored shortened).';
  END IF;
  RETURN QUERY
  WITH keys AS MATERIALIZED (
    SELECT k.key, k.n FROM unnest(partition_pending.partitions) WITH ORDINALITY AS k(key, n)
  ), unfolded AS (
    -- The deltas not folded yet, of these partitions (one pass; a runner keeps them few).
    SELECT d.partition, sum(d.d_pending) AS pending, max(d.last_staged_at) AS last_staged_at
    FROM dispatch_policy.stat_deltas d
    WHERE d.policy = partition_pending.policy AND d.gate = partition_pending.gate
      AND d.partition = ANY (partition_pending.partitions)
    GROUP BY 1
  )
  SELECT k.key, (coalesce(c.pending, 0) + coalesce(u.pending, 0))::bigint,
         greatest(c.last_staged_at, u.last_staged_at)
  FROM keys k
  -- A probe of the primary key per partition.
  LEFT JOIN dispatch_policy.partition_counters c
    ON c.policy = partition_pending.policy AND c.gate = partition_pending.gate AND c.partition = k.key
  LEFT JOIN unfolded u ON u.partition = k.key
  ORDER BY k.n;
END
$$;
COMMENT ON FUNCTION dispatch_policy.partition_pending(text, text, text[]) IS
  'Staged jobs (eligible and scheduled) in each of the given partitions of a partitioned gate (throttle, concurrency or adaptive_concurrency with a partition_by), and when a job was last staged into it (NULL: never since 0020, or longer ago than prune''s retention while it held none): one row per key, in the order given (0 and NULL for a partition with no jobs). Exact: partition_counters plus the deltas not folded yet; reads one primary-key probe per key and the unfolded deltas, never the jobs. Errors: unknown policy or gate 42704; NULL gate or partitions, or a NULL key 22004; a gate that is not partitioned, more than 10,000 keys, a key longer than 256 bytes 22023.';

CREATE FUNCTION dispatch_policy.pending_minutes(policy text, since timestamptz, until timestamptz DEFAULT now())
RETURNS TABLE (minute timestamptz, pending bigint, scheduled bigint)
LANGUAGE plpgsql STABLE STRICT SECURITY INVOKER
SET jit = off
AS $$
DECLARE
  first_minute timestamptz;
  last_minute timestamptz;
BEGIN
  PERFORM dispatch_policy._require_minute_range(since, until);
  first_minute := dispatch_policy._minute(pending_minutes.since);
  last_minute := dispatch_policy._minute(pending_minutes.until);
  RETURN QUERY
  WITH now_counts AS (
    -- The exact counts now: folded plus not folded yet.
    SELECT coalesce(sum(x.pending), 0)::bigint AS pending, coalesce(sum(x.scheduled), 0)::bigint AS scheduled
    FROM (SELECT c.pending, c.scheduled FROM dispatch_policy.policy_counters c WHERE c.policy = pending_minutes.policy
          UNION ALL
          SELECT d.d_pending, d.d_scheduled FROM dispatch_policy.stat_deltas d
          WHERE d.policy = pending_minutes.policy AND d.gate = '') x
  ), changes AS (
    -- Net changes per minute after the first minute shown (minute rows by
    -- the primary key, then the deltas not folded yet).
    SELECT x.minute, sum(x.d_pending) AS d_pending, sum(x.d_scheduled) AS d_scheduled
    FROM (SELECT m.minute, m.d_pending, m.d_scheduled FROM dispatch_policy.stat_minutes m
          WHERE m.policy = pending_minutes.policy AND m.gate = '' AND m.partition = '' AND m.minute > first_minute
          UNION ALL
          SELECT d.minute, d.d_pending, d.d_scheduled FROM dispatch_policy.stat_deltas d
          WHERE d.policy = pending_minutes.policy AND d.gate = '' AND d.minute > first_minute) x
    GROUP BY 1
  ), merged AS (
    SELECT coalesce(g.minute, c.minute) AS minute, g.minute IS NOT NULL AS shown,
           coalesce(c.d_pending, 0) AS d_pending, coalesce(c.d_scheduled, 0) AS d_scheduled
    FROM generate_series(first_minute, last_minute, interval '1 minute') AS g(minute)
    FULL JOIN changes c ON c.minute = g.minute
  ), later AS (
    -- What changed in the minutes after each one (one row per minute).
    SELECT m.minute, m.shown,
           coalesce(sum(m.d_pending) OVER after_it, 0) AS d_pending,
           coalesce(sum(m.d_scheduled) OVER after_it, 0) AS d_scheduled
    FROM merged m
    WINDOW after_it AS (ORDER BY m.minute DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
  )
  SELECT l.minute, (n.pending - l.d_pending)::bigint, (n.scheduled - l.d_scheduled)::bigint
  FROM later l CROSS JOIN now_counts n
  WHERE l.shown
  ORDER BY l.minute;
END
$$;
COMMENT ON FUNCTION dispatch_policy.pending_minutes(text, timestamptz, timestamptz) IS
  'A policy''s pending trend for a chart: one row per UTC minute from the minute of since to the minute of until (at most 31 days, else 22023; NULL arguments: no rows), with the policy''s pending (eligible) and scheduled jobs at the end of that minute, as policy_counters counts them (a scheduled job is pending from the tick that promotes it). Reconstructed backwards from the exact counts now minus the net changes (stat_minutes.d_pending, d_scheduled, and the deltas not folded yet) of the minutes after it; a change counts in the minute of its writer''s now(). Minutes before the history kept (prune''s retention, or 0020) repeat the earliest value it gives. Reads the minute rows from since to now and the deltas not folded yet, never the jobs.';

-- partition_overview counted each partition's waiting jobs by rendering every
-- staged job: now from partition_counters (and policy_counters for the one
-- partition of an unpartitioned gate). Columns unchanged; pending now also
-- counts scheduled jobs, and last_staged_at is when a job was last staged
-- into the partition, admitted since or not.
-- (partition_overview is defined once in 0.2.0, in 0025_shadow.sql.)

-- ---------------------------------------------------------------------------
-- prune gets one more step (it is defined once in 0.2.0, in
-- 0025_shadow.sql): gate partitions that hold no
-- staged job and had none staged within the retention lose their
-- partition_counters row (row partition_counters; at most 1,000,000 a
-- call). A row deleted while a delta for it is still unfolded comes back
-- with the next fold, as the delta says.
