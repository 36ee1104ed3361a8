-- pg_regress tests of the roles (issue 11): what migration 0021 leaves to
-- PUBLIC (nothing) and makes SECURITY DEFINER, then sql/roles.sql, and a
-- login of each role showing what it can and cannot do (42501 where not).
-- Roles are cluster-wide: the four dispatch_policy_* roles are created if
-- missing and never dropped; the test's logins (dp_regress_*) are dropped at
-- the start, in case an earlier run died, and at the end.
\set SHOW_CONTEXT never
\set VERBOSITY default
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
DROP SCHEMA IF EXISTS dp_regress_targets CASCADE;
DROP ROLE IF EXISTS dp_regress_stager, dp_regress_worker, dp_regress_operator, dp_regress_runner,
                    dp_regress_operator_runner;
CREATE EXTENSION dispatch_policy;
RESET client_min_messages;

-- The functions that run as the schema's owner, each with a pinned
-- search_path. A later migration that replaces one without restating
-- SECURITY DEFINER and the SET clause changes this list.
SELECT p.oid::regprocedure AS security_definer, p.proconfig
FROM pg_proc p
WHERE p.pronamespace = 'dispatch_policy'::regnamespace AND p.prosecdef
ORDER BY p.proname;

-- Nothing of the schema is left to PUBLIC: no function (a new one is
-- executable by PUBLIC until a migration revokes it), table, view,
-- sequence, nor the schema itself.
SELECT p.oid::regprocedure AS executable_by_public
FROM pg_proc p
WHERE p.pronamespace = 'dispatch_policy'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE');
SELECT c.oid::regclass AS relation_granted_to_public
FROM pg_class c
WHERE c.relnamespace = 'dispatch_policy'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
  AND c.relacl IS NOT NULL AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0);
SELECT has_schema_privilege('public', 'dispatch_policy', 'USAGE') AS public_usage,
       has_schema_privilege('public', 'dispatch_policy', 'CREATE') AS public_create;

-- roles.sql, twice (idempotent), its output left out.
\set ECHO none
\o /dev/null
\i roles.sql
\i roles.sql
\o
\set ECHO all
SELECT rolname, rolcanlogin, rolinherit FROM pg_roles WHERE rolname LIKE 'dispatch\_policy\_%' ORDER BY 1;

-- What each role may do to each relation (r SELECT, a INSERT, w UPDATE,
-- d DELETE; '-' nothing).
CREATE FUNCTION pg_temp.rights(role name, relation oid) RETURNS text
LANGUAGE sql AS $$
  SELECT coalesce(nullif(
    CASE WHEN has_table_privilege(role, relation, 'SELECT') THEN 'r' ELSE '' END ||
    CASE WHEN has_table_privilege(role, relation, 'INSERT') THEN 'a' ELSE '' END ||
    CASE WHEN has_table_privilege(role, relation, 'UPDATE') THEN 'w' ELSE '' END ||
    CASE WHEN has_table_privilege(role, relation, 'DELETE') THEN 'd' ELSE '' END ||
    CASE WHEN has_table_privilege(role, relation, 'TRUNCATE') THEN 'D' ELSE '' END, ''), '-')
$$;
SELECT c.relname, c.relkind,
       pg_temp.rights('dispatch_policy_stager', c.oid) AS stager,
       pg_temp.rights('dispatch_policy_worker', c.oid) AS worker,
       pg_temp.rights('dispatch_policy_operator', c.oid) AS operator,
       pg_temp.rights('dispatch_policy_runner', c.oid) AS runner
FROM pg_class c
WHERE c.relnamespace = 'dispatch_policy'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
ORDER BY c.relkind, c.relname;

-- The functions that change something (VOLATILE) each role may call. The
-- operator also calls every IMMUTABLE or STABLE function (they only read);
-- the runner every function but declare_policy and drop_policy.
SELECT p.proname,
       has_function_privilege('dispatch_policy_stager', p.oid, 'EXECUTE') AS stager,
       has_function_privilege('dispatch_policy_worker', p.oid, 'EXECUTE') AS worker,
       has_function_privilege('dispatch_policy_operator', p.oid, 'EXECUTE') AS operator,
       has_function_privilege('dispatch_policy_runner', p.oid, 'EXECUTE') AS runner
FROM pg_proc p
WHERE p.pronamespace = 'dispatch_policy'::regnamespace AND p.provolatile = 'v' AND p.proname !~ '^_'
  AND p.prorettype <> 'trigger'::regtype
ORDER BY p.proname;
SELECT count(*) FILTER (WHERE p.provolatile <> 'v') AS reading_functions,
       count(*) FILTER (WHERE p.provolatile <> 'v' AND NOT has_function_privilege('dispatch_policy_operator', p.oid, 'EXECUTE'))
         AS operator_cannot_call,
       array_agg(p.proname ORDER BY p.proname) FILTER (WHERE NOT has_function_privilege('dispatch_policy_runner', p.oid, 'EXECUTE'))
         AS runner_cannot_call
FROM pg_proc p
WHERE p.pronamespace = 'dispatch_policy'::regnamespace;

-- The test's logins, one per role, and an operator who may also admit now.
CREATE ROLE dp_regress_stager LOGIN IN ROLE dispatch_policy_stager;
CREATE ROLE dp_regress_worker LOGIN IN ROLE dispatch_policy_worker;
CREATE ROLE dp_regress_operator LOGIN IN ROLE dispatch_policy_operator;
CREATE ROLE dp_regress_runner LOGIN IN ROLE dispatch_policy_runner;
CREATE ROLE dp_regress_operator_runner LOGIN IN ROLE dispatch_policy_operator, dispatch_policy_runner;

-- sql targets: one the runner role may execute, which records who called
-- it; one nobody but the owner may.
CREATE SCHEMA dp_regress_targets;
CREATE TABLE dp_regress_targets.calls (job bigint, current_role_name name, session_role_name name);
CREATE FUNCTION dp_regress_targets.record(id bigint, queue text, args jsonb, context jsonb) RETURNS void
LANGUAGE sql AS $$ INSERT INTO dp_regress_targets.calls VALUES (id, current_user, session_user) $$;
CREATE FUNCTION dp_regress_targets.denied(id bigint, queue text, args jsonb, context jsonb) RETURNS void
LANGUAGE sql AS $$ INSERT INTO dp_regress_targets.calls VALUES (id, current_user, session_user) $$;
REVOKE ALL ON FUNCTION dp_regress_targets.record(bigint, text, jsonb, jsonb),
                       dp_regress_targets.denied(bigint, text, jsonb, jsonb) FROM PUBLIC;
-- What the README tells a DBA to grant for a target:
GRANT USAGE ON SCHEMA dp_regress_targets TO dispatch_policy_runner;
GRANT EXECUTE ON FUNCTION dp_regress_targets.record(bigint, text, jsonb, jsonb) TO dispatch_policy_runner;
GRANT INSERT ON dp_regress_targets.calls TO dispatch_policy_runner;

-- Policies are the owner's.
SELECT dispatch_policy.declare_policy('jobs', '{"gates": [
  {"type": "concurrency", "name": "per_tenant", "max": 5, "partition_by": "{tenant}"}], "max_attempts": 1}');
SELECT dispatch_policy.declare_policy('to_record', '{"target": {"type": "sql", "function": "dp_regress_targets.record"}}');
SELECT dispatch_policy.declare_policy('to_denied', '{"target": {"type": "sql", "function": "dp_regress_targets.denied"}}');

-- A tick as the runner makes it, as the session's current role:
-- tick_begin, tick_finish, and tick_abort after a failure. It admits every
-- job fetched (no cap binds in these policies, no throttle needs
-- tick_state). Returns how many were admitted, or what tick_begin said.
CREATE FUNCTION pg_temp.tick(policy text, only_gate text DEFAULT NULL, only_partition text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  r record;
  config jsonb;
  at timestamptz;
  ids bigint[] := '{}';
  contexts jsonb[] := '{}';
  names text[];
  partitions text[] := '{}';
  i integer;
BEGIN
  BEGIN
    FOR r IN SELECT * FROM dispatch_policy.tick_begin(tick.policy, 100, 50, only_gate => tick.only_gate,
                                                      only_partition => tick.only_partition) LOOP
      CASE r.kind
        WHEN 'tick' THEN config := r.config::jsonb; at := r.now;
        WHEN 'job' THEN ids := ids || r.id; contexts := contexts || r.context::jsonb;
        WHEN 'done' THEN RETURN 'nothing to do';
        ELSE RETURN r.kind;
      END CASE;
    END LOOP;
    SELECT coalesce(array_agg(coalesce(g ->> 'name', g ->> 'type') ORDER BY n), '{}') INTO names
    FROM jsonb_array_elements(coalesce(config -> 'gates', '[]')) WITH ORDINALITY AS x(g, n);
    FOR i IN 1 .. cardinality(ids) LOOP
      partitions := partitions || ARRAY(
        SELECT dispatch_policy._gate_partitions(config, contexts[i]) ->> name FROM unnest(names) AS name);
    END LOOP;
    RETURN 'admitted ' || dispatch_policy.tick_finish(tick.policy, at, ids, names, partitions, '{}', '{}', '{}');
  EXCEPTION WHEN OTHERS THEN
    PERFORM dispatch_policy.tick_abort(tick.policy);
    RAISE;
  END;
END
$$;

-- An owner's job of tenant b, with something a stager must not see.
SELECT dispatch_policy.stage('jobs', '{"card": "tenant b secret"}', '{"tenant": "b"}') AS job_of_b \gset

-- Stager: stages, and nothing else.
SET SESSION AUTHORIZATION dp_regress_stager;
SELECT current_user;
SELECT dispatch_policy.stage('jobs', '{"card": "tenant a"}', '{"tenant": "a"}') AS job_of_a \gset
SELECT :job_of_a > :job_of_b AS staged;
SELECT ids[1] AS job_a2, ids[2] AS job_a3
FROM dispatch_policy.stage_many('jobs', '[{"args": 1, "context": {"tenant": "a"}}, {"args": 2, "context": {"tenant": "a"}}]') AS ids \gset
SELECT :job_a2 > :job_of_a AND :job_a3 > :job_a2 AS staged_many;
SELECT dispatch_policy.stage('nope', '{}');
\echo :SQLSTATE
-- Tenant b's args, through any door:
SELECT args FROM dispatch_policy.staged_jobs WHERE id = :job_of_b;
\echo :SQLSTATE
SELECT * FROM dispatch_policy.explain(:job_of_b);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.policy_overview;
\echo :SQLSTATE
SELECT * FROM dispatch_policy.partition_pending('jobs', 'per_tenant', ARRAY['b']);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.claim('default', 'stager', 10);
\echo :SQLSTATE
SELECT dispatch_policy._render_template('{card}', '{"card": 1}');
\echo :SQLSTATE
-- Nor change what is there:
UPDATE dispatch_policy.staged_jobs SET priority = -1;
\echo :SQLSTATE
INSERT INTO dispatch_policy.policies (name, config) VALUES ('mine', '{}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('jobs', '{}');
\echo :SQLSTATE
SELECT dispatch_policy.cancel(:job_of_b);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.tick_begin('jobs', 10, 10);
\echo :SQLSTATE
SELECT dispatch_policy.complete(:job_of_b);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:job_of_b, now() + interval '1 minute', 'HTTP 429');
\echo :SQLSTATE
SELECT dispatch_policy.drop_policy('jobs', force => true);
\echo :SQLSTATE
RESET SESSION AUTHORIZATION;

-- Runner: ticks and maintains.
SET SESSION AUTHORIZATION dp_regress_runner;
SELECT pg_temp.tick('jobs');
SELECT id, context ->> 'tenant' AS tenant FROM dispatch_policy.admitted_jobs ORDER BY id;
SELECT dispatch_policy.reap_leases('jobs');
SELECT count(*) >= 0 AS pruned FROM dispatch_policy.prune(interval '7 days', interval '1 hour');
SELECT dispatch_policy.fold_stats() >= 0 AS folded;
SELECT dispatch_policy.sync_lanes() AS lanes_added;
SELECT dispatch_policy.record_runner_failure('jobs', 'a test', 'XX000', now() + interval '1 second');
SELECT dispatch_policy.clear_runner_failure('jobs');
SELECT dispatch_policy.report_process('runner-1', 'runner', now(), now(), 0, NULL, NULL);
-- Policies are not the runner's:
SELECT dispatch_policy.declare_policy('jobs', '{}');
\echo :SQLSTATE
UPDATE dispatch_policy.policies SET paused = true;
\echo :SQLSTATE
SELECT dispatch_policy.drop_policy('jobs', force => true);
\echo :SQLSTATE
DELETE FROM dispatch_policy.schema_migrations;
\echo :SQLSTATE
RESET SESSION AUTHORIZATION;

-- sql targets run with the runner's rights. A target the runner role
-- cannot execute fails that policy's tick (42501), which loses nothing:
-- its jobs stay staged, the tick lock is given back, other policies are
-- admitted. A target it can execute runs as the runner's login.
SELECT dispatch_policy.stage('to_denied', '{"n": 1}') IS NOT NULL AS staged,
       dispatch_policy.stage('to_record', '{"n": 2}') IS NOT NULL AS staged;
SET SESSION AUTHORIZATION dp_regress_runner;
SELECT pg_temp.tick('to_denied');
\echo :SQLSTATE
SELECT pg_temp.tick('to_record');
SELECT pg_temp.tick('to_denied');
\echo :SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT policy, count(*) AS staged FROM dispatch_policy.staged_jobs WHERE policy LIKE 'to\_%' GROUP BY 1 ORDER BY 1;
SELECT policy, count(*) AS admitted FROM dispatch_policy.admitted_jobs WHERE policy LIKE 'to\_%' GROUP BY 1 ORDER BY 1;
SELECT current_role_name, session_role_name FROM dp_regress_targets.calls;
SELECT count(*) AS tick_locks_held FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid();

-- Worker: claims, reports, and nothing else.
SET SESSION AUTHORIZATION dp_regress_worker;
SELECT id, policy, args FROM dispatch_policy.claim('default', 'w1', 10) ORDER BY id;
SELECT dispatch_policy.heartbeat(:job_of_b) > now() AS extended;
SELECT dispatch_policy.started(:job_of_b);
SELECT dispatch_policy.complete(:job_of_b);
SELECT * FROM dispatch_policy.complete_many(ARRAY[:job_of_a], ARRAY[NULL]::integer[]);
SELECT dispatch_policy.fail(:job_a2, 'boom');
-- defer: back to staging until then, no attempt counted (this policy has
-- no throttle: nothing to pause).
SELECT state, paused FROM dispatch_policy.defer(:job_a3, now() + interval '1 hour', 'HTTP 429', pause_partition => true);
SELECT dispatch_policy.report_process('worker-1', 'worker', now(), now(), 0, NULL, NULL);
SELECT dispatch_policy.forget_process('worker-1');
SELECT args FROM dispatch_policy.staged_jobs;
\echo :SQLSTATE
SELECT * FROM dispatch_policy.finished_jobs;
\echo :SQLSTATE
SELECT dispatch_policy.stage('jobs', '{}');
\echo :SQLSTATE
SELECT * FROM dispatch_policy.tick_begin('jobs', 10, 10);
\echo :SQLSTATE
SELECT dispatch_policy.pause('jobs');
\echo :SQLSTATE
SELECT dispatch_policy.drop_policy('jobs', force => true);
\echo :SQLSTATE
RESET SESSION AUTHORIZATION;

-- Operator: reads everything, job args included, and acts.
SELECT dispatch_policy.stage('jobs', '{"n": 3}', '{"tenant": "b"}') AS job_b2,
       dispatch_policy.stage('jobs', '{"n": 4}', '{"tenant": "b"}') AS job_b3 \gset
SET SESSION AUTHORIZATION dp_regress_operator;
SELECT policy, pending, in_flight, dead FROM dispatch_policy.policy_overview ORDER BY 1;
SELECT policy, gate, partition, pending, in_flight FROM dispatch_policy.partition_overview ORDER BY 1, 2, 3;
SELECT id, args FROM dispatch_policy.staged_jobs ORDER BY id;
SELECT id, status, last_error FROM dispatch_policy.finished_jobs ORDER BY id;
SELECT verdict, aspect, gate, partition FROM dispatch_policy.explain(:job_b2) ORDER BY 1, 2;
SELECT count(*) AS findings FROM dispatch_policy."check"();
SELECT partition, pending FROM dispatch_policy.partition_pending('jobs', 'per_tenant', ARRAY['a', 'b']);
SELECT count(*) > 0 AS minutes FROM dispatch_policy.policy_minutes('jobs', now() - interval '1 hour');
SELECT name, kind FROM dispatch_policy.processes ORDER BY 1;
SELECT dispatch_policy.pause('jobs');
SELECT dispatch_policy.resume('jobs');
SELECT dispatch_policy.pause_partition('jobs', 'per_tenant', 'a', reason => 'incident');
SELECT gate, partition FROM dispatch_policy.paused_partitions_now('jobs');
SELECT dispatch_policy.resume_partition('jobs', 'per_tenant', 'a');
SELECT dispatch_policy.retry(:job_a2);
SELECT dispatch_policy.cancel(:job_b2, 'no longer needed');
SELECT dispatch_policy.drain('to_denied');
SELECT count(*) AS repaired FROM dispatch_policy.repair();
-- Not the operator's: staging, policies, writing tables, a worker's calls.
SELECT dispatch_policy.stage('jobs', '{}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('jobs', '{}');
\echo :SQLSTATE
UPDATE dispatch_policy.staged_jobs SET priority = -1;
\echo :SQLSTATE
DELETE FROM dispatch_policy.finished_jobs;
\echo :SQLSTATE
SELECT dispatch_policy.complete(:job_of_a);
\echo :SQLSTATE
SELECT * FROM dispatch_policy.defer(:job_of_a, now() + interval '1 minute', 'HTTP 429');
\echo :SQLSTATE
SELECT dispatch_policy.drop_policy('jobs', force => true);
\echo :SQLSTATE
-- Admit now is a tick: a pure operator gets 42501 and nothing changes.
SELECT id, context ->> 'tenant' AS tenant FROM dispatch_policy.staged_jobs WHERE policy = 'jobs' ORDER BY id;
SELECT * FROM dispatch_policy.tick_begin('jobs', 5, 50, only_gate => 'per_tenant', only_partition => 'a');
\echo :SQLSTATE
SELECT id, context ->> 'tenant' AS tenant FROM dispatch_policy.staged_jobs WHERE policy = 'jobs' ORDER BY id;
-- (tick_abort, which the runner calls after a failed tick, is the
-- operator's too: it only gives back this session's tick lock, if any.)
SELECT dispatch_policy.tick_abort('jobs') AS released;
RESET SESSION AUTHORIZATION;
SELECT count(*) AS tick_locks_held FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid();

-- An operator who is granted the runner role too admits now.
SET SESSION AUTHORIZATION dp_regress_operator_runner;
SELECT pg_temp.tick('jobs', 'per_tenant', 'a');
RESET SESSION AUTHORIZATION;
SELECT id, context ->> 'tenant' AS tenant FROM dispatch_policy.admitted_jobs WHERE policy = 'jobs' ORDER BY id;
SELECT id, context ->> 'tenant' AS tenant FROM dispatch_policy.staged_jobs WHERE policy = 'jobs' ORDER BY id;

-- Clean up the test's own objects and logins (the four roles stay).
SET client_min_messages = warning;
DROP SCHEMA dp_regress_targets CASCADE;
DROP ROLE dp_regress_stager, dp_regress_worker, dp_regress_operator, dp_regress_runner, dp_regress_operator_runner;
RESET client_min_messages;
