-- dispatch-policy roles: four NOLOGIN roles a DBA grants to application
-- logins, and what each may do in this database's dispatch_policy schema.
--
--   psql -v ON_ERROR_STOP=1 -d DB -f "$(pg_config --sharedir)/extension/dispatch_policy_roles.sql"
--   psql -v ON_ERROR_STOP=1 -d DB -f sql/roles.sql           (from a checkout)
--
-- Run it as a superuser, or as the schema's owner (with CREATEROLE if the
-- roles do not exist in the cluster yet), in each database where the
-- schema exists (`dispatch-policy migrate` or CREATE EXTENSION
-- dispatch_policy, migration 0021 or later), and again after every migrate
-- or extension update: it grants on the objects that exist when it runs.
-- It is idempotent and all or nothing (one transaction). Roles are
-- cluster-wide: a missing one is created, an existing one kept as it is.
-- Every privilege of the four roles on the schema is revoked and granted
-- again, so a privilege removed from this file is removed from the roles.
-- Then, for example:
--
--   GRANT dispatch_policy_stager TO app;
--   GRANT dispatch_policy_worker TO worker;
--   GRANT dispatch_policy_runner TO runner;
--   GRANT dispatch_policy_operator TO ops;   -- and dispatch_policy_runner to admit now
--
-- dispatch_policy_stager    stage, stage_outcome, stage_many, stage_many_outcomes. Nothing else: it reads no
--                           table, not even the jobs it staged.
-- dispatch_policy_worker    claim, heartbeat, started, complete,
--                           complete_many, fail, defer, report_process,
--                           forget_process (all a Swift Worker calls).
-- dispatch_policy_operator  reads every table and view (job args and
--                           context included), every function that only
--                           reads (explain, check, the history, the
--                           admin's helpers), and the actions pause, resume,
--                           cancel, retry, drain, pause_partition,
--                           resume_partition, repair (and tick_abort).
--                           Admit now is a tick: it needs
--                           dispatch_policy_runner as well.
-- dispatch_policy_runner    the tick runner (run, tick, admit-now) and its
--                           maintenance: every function but declare_policy
--                           and drop_policy,
--                           reads every table, writes every table but
--                           policies and schema_migrations. A tick calls
--                           a policy's `sql` target with the runner's
--                           rights: grant it EXECUTE on the target (and
--                           what the target writes, e.g. pgq.insert_event).
--
-- Policies (declare_policy, drop_policy, `dispatch-policy policy apply`)
-- and migrations are the schema owner's. The functions the first three roles call to
-- change jobs are SECURITY DEFINER (migration 0021); a tick is not.

BEGIN;
SET LOCAL search_path = pg_catalog, pg_temp;

DO $$
DECLARE
  r record;
BEGIN
  IF to_regnamespace('dispatch_policy') IS NULL THEN
    RAISE EXCEPTION 'schema dispatch_policy does not exist in database %', current_database()
      USING ERRCODE = '3F000',
            HINT = 'Install it first (dispatch-policy migrate, or CREATE EXTENSION dispatch_policy), then run this file in the same database.';
  END IF;
  IF NOT (SELECT p.prosecdef FROM pg_catalog.pg_proc p
          WHERE p.oid = to_regprocedure('dispatch_policy.stage_many(text, jsonb)')) THEN
    RAISE EXCEPTION 'the dispatch_policy schema predates migration 0021 (privileges)'
      USING ERRCODE = '55000',
            HINT = 'Upgrade the schema first (dispatch-policy migrate), then run this file again.';
  END IF;
  -- Roles that exist are left as they are (another database's run created
  -- them, or a DBA did): only creating one needs CREATEROLE.
  FOR r IN
    SELECT * FROM (VALUES
      ('dispatch_policy_stager',
       'dispatch-policy: stages jobs (stage, stage_outcome, stage_many, stage_many_outcomes); reads nothing. Created by dispatch_policy_roles.sql.'),
      ('dispatch_policy_worker',
       'dispatch-policy: claims jobs and reports their outcome (claim, heartbeat, started, complete, complete_many, fail, defer). Created by dispatch_policy_roles.sql.'),
      ('dispatch_policy_operator',
       'dispatch-policy: reads everything (views, tables, explain, check) and runs the operator actions; admit now also needs dispatch_policy_runner. Created by dispatch_policy_roles.sql.'),
      ('dispatch_policy_runner',
       'dispatch-policy: ticks and maintenance (run, tick, admit-now); needs EXECUTE on the policies'' sql targets. Created by dispatch_policy_roles.sql.')
    ) AS roles (name, comment)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles x WHERE x.rolname = r.name) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', r.name);
        EXECUTE format('COMMENT ON ROLE %I IS %L', r.name, r.comment);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL;  -- created meanwhile by another session running this file
      END;
    END IF;
  END LOOP;
END
$$;

-- Start from nothing, so that a rerun leaves exactly what follows.
REVOKE ALL ON SCHEMA dispatch_policy
  FROM dispatch_policy_stager, dispatch_policy_worker, dispatch_policy_operator, dispatch_policy_runner;
REVOKE ALL ON ALL TABLES IN SCHEMA dispatch_policy
  FROM dispatch_policy_stager, dispatch_policy_worker, dispatch_policy_operator, dispatch_policy_runner;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA dispatch_policy
  FROM dispatch_policy_stager, dispatch_policy_worker, dispatch_policy_operator, dispatch_policy_runner;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch_policy
  FROM dispatch_policy_stager, dispatch_policy_worker, dispatch_policy_operator, dispatch_policy_runner;

GRANT USAGE ON SCHEMA dispatch_policy
  TO dispatch_policy_stager, dispatch_policy_worker, dispatch_policy_operator, dispatch_policy_runner;

-- Stager.
GRANT EXECUTE ON FUNCTION
  dispatch_policy.stage(text, jsonb, jsonb, text, text, text, integer, timestamptz, timestamptz),
  dispatch_policy.stage_outcome(text, jsonb, jsonb, text, text, text, integer, timestamptz, timestamptz),
  dispatch_policy.stage_many(text, jsonb),
  dispatch_policy.stage_many_outcomes(text, jsonb)
  TO dispatch_policy_stager;

-- Worker.
GRANT EXECUTE ON FUNCTION
  dispatch_policy.claim(text, text, integer, timestamptz, text[]),
  dispatch_policy.heartbeat(bigint, timestamptz, integer),
  dispatch_policy.started(bigint, timestamptz, integer),
  dispatch_policy.complete(bigint, timestamptz, integer),
  dispatch_policy.complete_many(bigint[], integer[], timestamptz),
  dispatch_policy.fail(bigint, text, interval, timestamptz, integer),
  dispatch_policy.defer(bigint, timestamptz, text, boolean, integer, timestamptz),
  dispatch_policy.report_process(text, text, timestamptz, timestamptz, integer, timestamptz, text),
  dispatch_policy.forget_process(text)
  TO dispatch_policy_worker;

-- Operator: reads everything; the actions run as the owner.
GRANT SELECT ON ALL TABLES IN SCHEMA dispatch_policy TO dispatch_policy_operator;
GRANT EXECUTE ON FUNCTION
  dispatch_policy.pause(text),
  dispatch_policy.resume(text),
  dispatch_policy.cancel(bigint, text),
  dispatch_policy.retry(bigint),
  dispatch_policy.drain(text, text, text, integer, text),
  dispatch_policy.pause_partition(text, text, text, timestamptz, text),
  dispatch_policy.resume_partition(text, text, text),
  dispatch_policy.repair(timestamptz)
  TO dispatch_policy_operator;
-- tick_abort gives back only this session's own tick lock: with it, admit
-- now by an operator without the runner role fails on tick_begin alone
-- (42501), instead of also failing to end the tick it never began.
GRANT EXECUTE ON FUNCTION
  dispatch_policy.tick_abort(text),
  dispatch_policy._tick_release(text, boolean),
  dispatch_policy._holds_tick_lock(text)
  TO dispatch_policy_operator;

-- Runner: reads every table and writes all but the policies and the
-- migrations' record.
GRANT SELECT ON ALL TABLES IN SCHEMA dispatch_policy TO dispatch_policy_runner;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA dispatch_policy TO dispatch_policy_runner;

DO $$
DECLARE
  object text;
BEGIN
  -- Operator: every function that only reads (IMMUTABLE or STABLE:
  -- PostgreSQL refuses a write in those): explain, check, the views'
  -- helpers, the history, partition_pending, limits, and the helpers the
  -- admin's queries call.
  FOR object IN
    SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
    WHERE p.pronamespace = 'dispatch_policy'::regnamespace AND p.provolatile IN ('i', 's')
    ORDER BY 1
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO dispatch_policy_operator', object);
  END LOOP;
  -- Runner: every function but declare_policy and drop_policy (policies
  -- are the owner's).
  FOR object IN
    SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
    WHERE p.pronamespace = 'dispatch_policy'::regnamespace AND p.proname NOT IN ('declare_policy', 'drop_policy')
    ORDER BY 1
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO dispatch_policy_runner', object);
  END LOOP;
  FOR object IN
    SELECT c.oid::regclass::text FROM pg_catalog.pg_class c
    WHERE c.relnamespace = 'dispatch_policy'::regnamespace AND c.relkind IN ('r', 'p')
      AND c.relname NOT IN ('policies', 'schema_migrations')
    ORDER BY 1
  LOOP
    EXECUTE format('GRANT INSERT, UPDATE, DELETE ON TABLE %s TO dispatch_policy_runner', object);
  END LOOP;
END
$$;

COMMIT;
