-- Privileges (issue 11): nothing of the schema is left to PUBLIC, and the
-- functions that a role without table privileges calls run as the schema's
-- owner.
--
-- sql/roles.sql creates the roles a DBA grants to application logins
-- (dispatch_policy_stager, _worker, _operator, _runner) and grants them
-- what they need; this migration creates no role. It makes that possible:
--
--   * No function of the schema is executable by PUBLIC. PostgreSQL grants
--     EXECUTE to PUBLIC on every new function, and every role with USAGE on
--     the schema (all four) could otherwise call any of them.
--   * The functions a stager, a worker or an operator calls to change jobs
--     or gate state are SECURITY DEFINER with a pinned search_path, so those
--     roles need no privilege on the tables: a stager stages without being
--     able to read any job. Their bodies reach no policy's `sql` target and
--     build no SQL from input (the one dynamic statement, _hand_off, is
--     reached from admission only).
--   * A tick stays SECURITY INVOKER (tick_begin, tick_state, tick_finish,
--     tick_abort, admit, everything they call): a policy's `sql` target runs
--     inside the tick with the rights of the role that ticks, never the
--     owner's, so declaring a policy cannot run a function as the owner. The
--     runner role gets the table privileges a tick needs instead. Reading
--     functions (explain, check, the views, the history) stay INVOKER too:
--     the operator role reads the tables.
--
-- For later migrations: CREATE OR REPLACE FUNCTION keeps a function's grants
-- but resets SECURITY DEFINER and its SET clauses to what it states, so a
-- migration that replaces one of the functions below states both again; a
-- new function is executable by PUBLIC until revoked (ALTER DEFAULT
-- PRIVILEGES ... IN SCHEMA cannot revoke what PostgreSQL grants by default,
-- and a global one would change the owner's functions in every schema), so
-- a migration that creates functions ends with the REVOKE below. The
-- pg_regress test `roles` lists the SECURITY DEFINER functions and fails
-- when any function of the schema is executable by PUBLIC.

REVOKE ALL ON SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA dispatch_policy FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch_policy FROM PUBLIC;

-- Stager: staging writes staged_jobs, dedupe_keys, lanes and the history
-- deltas, which a stager may not read.
ALTER FUNCTION dispatch_policy.stage(text, jsonb, jsonb, text, text, text, integer, timestamptz)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.stage_many(text, jsonb)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;

-- Worker: claim and the outcomes move jobs and release slots; the process
-- report is the Worker's row in processes.
ALTER FUNCTION dispatch_policy.claim(text, text, integer, timestamptz, text[])
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.heartbeat(bigint, timestamptz, integer)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.started(bigint, timestamptz, integer)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.complete(bigint, timestamptz, integer)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.complete_many(bigint[], integer[], timestamptz)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.fail(bigint, text, interval, timestamptz, integer)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.report_process(text, text, timestamptz, timestamptz, integer, timestamptz, text)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.forget_process(text)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;

-- Operator: the actions change policies, jobs and pauses; the operator
-- role only reads the tables.
ALTER FUNCTION dispatch_policy.pause(text)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.resume(text)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.cancel(bigint, text)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.retry(bigint)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.drain(text, text, text, integer, text)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.pause_partition(text, text, text, timestamptz, text)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
ALTER FUNCTION dispatch_policy.resume_partition(text, text, text)
  SECURITY DEFINER SET search_path = pg_catalog, dispatch_policy, pg_temp;
-- repair() too: its one definition in 0.2.0, in 0026_admit_integrity.sql,
-- states SECURITY DEFINER and the search_path.
