-- dispatch-policy: a dump keeps everything.
--
-- pg_dump leaves out the rows of an extension's tables and the state of
-- its sequences unless the extension marks them as configuration: installed
-- with CREATE EXTENSION, the schema's every table and sequence is marked, so
-- pg_dump / pg_restore keep policies, jobs, gate state and history. (With
-- `dispatch-policy migrate` the schema belongs to no extension and pg_dump
-- keeps it as it keeps any other.)
DO $$
DECLARE
  object regclass;
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'dispatch_policy') THEN
    FOR object IN
      SELECT c.oid::regclass FROM pg_class c
      WHERE c.relnamespace = 'dispatch_policy'::regnamespace AND c.relkind IN ('r', 'S')
      ORDER BY c.relname
    LOOP
      PERFORM pg_catalog.pg_extension_config_dump(object, '');
    END LOOP;
  END IF;
END
$$;
