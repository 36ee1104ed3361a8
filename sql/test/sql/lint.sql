-- pg_regress test: plpgsql_check finds nothing in any PL/pgSQL function of
-- the schema dispatch_policy (unused variables, implicit casts, performance
-- and other warnings, errors). The functions are found from the catalogs, so a
-- new one is checked without touching this file; a trigger function is checked
-- once per relation it is a trigger of, with the transition tables its
-- triggers there declare. The check is first shown to find planted faults.
-- A false positive is suppressed in the function's body, narrowly and with its
-- reason (-- @plpgsql_check_options: ..., or PERFORM plpgsql_check_pragma(...)).
\set SHOW_CONTEXT never
\set VERBOSITY default
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
CREATE EXTENSION dispatch_policy;
DROP EXTENSION IF EXISTS plpgsql_check;
CREATE EXTENSION plpgsql_check;
RESET client_min_messages;

CREATE TEMPORARY VIEW lint_findings AS
WITH fns AS (
  SELECT p.oid, p.prorettype = 'trigger'::regtype AS needs_relation
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
  WHERE p.pronamespace = 'dispatch_policy'::regnamespace AND l.lanname = 'plpgsql'
), targets AS (
  -- Plain and event trigger functions, on their own.
  SELECT f.oid, 0::oid AS relid, NULL::name AS oldtable, NULL::name AS newtable
  FROM fns f WHERE NOT f.needs_relation
  UNION ALL
  -- A trigger function, per relation: one body serves the INSERT (new rows),
  -- DELETE (old rows) and UPDATE (both) triggers, so it is checked with every
  -- transition table they name. (Two triggers naming them differently would
  -- show as a relation that does not exist.)
  SELECT t.tgfoid, t.tgrelid, max(t.tgoldtable), max(t.tgnewtable)
  FROM fns f JOIN pg_trigger t ON t.tgfoid = f.oid AND NOT t.tgisinternal
  WHERE f.needs_relation
  GROUP BY t.tgfoid, t.tgrelid
)
SELECT t.oid::regprocedure::text AS function, coalesce(nullif(t.relid, 0)::regclass::text, '') AS relation,
       c.lineno AS line, c.level, c.message, coalesce(c.detail, '') AS detail
FROM targets t
CROSS JOIN LATERAL plpgsql_check_function_tb(t.oid, t.relid, fatal_errors => false, other_warnings => true,
                                             performance_warnings => true, extra_warnings => true,
                                             oldtable => t.oldtable, newtable => t.newtable) c
UNION ALL
-- plpgsql_check cannot check a trigger function without its relation.
SELECT f.oid::regprocedure::text, '', NULL, 'error', 'trigger function of no trigger: not checked', ''
FROM fns f
WHERE f.needs_relation AND NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgfoid = f.oid AND NOT t.tgisinternal);

-- Planted faults: an unused variable and an implicit cast in a plain
-- function; an unused variable in a statement trigger that reads its
-- transition table (a check without it would report the table missing); a
-- trigger function attached to nothing.
CREATE FUNCTION dispatch_policy._lint_planted(x bigint) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  unused integer;
  n integer;
BEGIN
  n := x;
  RETURN n;
END
$$;
CREATE TABLE dispatch_policy._lint_planted_rows (id bigint);
CREATE FUNCTION dispatch_policy._lint_planted_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  unused integer;
BEGIN
  PERFORM count(*) FROM planted_new;
  RETURN NULL;
END
$$;
CREATE TRIGGER lint_planted AFTER INSERT ON dispatch_policy._lint_planted_rows
  REFERENCING NEW TABLE AS planted_new FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._lint_planted_trigger();
CREATE FUNCTION dispatch_policy._lint_planted_orphan() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RETURN NULL;
END
$$;
SELECT * FROM lint_findings
WHERE function LIKE 'dispatch_policy.\_lint\_planted%'
ORDER BY function COLLATE "C", relation COLLATE "C", line, level COLLATE "C", message COLLATE "C", detail COLLATE "C";
DROP TABLE dispatch_policy._lint_planted_rows;
DROP FUNCTION dispatch_policy._lint_planted(bigint), dispatch_policy._lint_planted_trigger(),
              dispatch_policy._lint_planted_orphan();

-- The schema: no findings.
SELECT * FROM lint_findings
ORDER BY function COLLATE "C", relation COLLATE "C", line, level COLLATE "C", message COLLATE "C", detail COLLATE "C";

DROP VIEW lint_findings;
DROP EXTENSION plpgsql_check;
