-- dispatch-policy: runners and workers say they are alive, and when their
-- database session was lost and restored.
--
-- A runner or worker whose session ends (PostgreSQL restarted, a failover,
-- pg_terminate_backend) reconnects with backoff by itself. What it went
-- through cannot be written while the database is unreachable, so each
-- process reports it once it is back (and then about once a minute):
-- `dispatch-policy status` lists them, and an operator sees a runner that
-- keeps reconnecting, or one that stopped reporting.

CREATE TABLE dispatch_policy.processes (
  name            text PRIMARY KEY,
  kind            text NOT NULL,
  started_at      timestamptz NOT NULL,
  last_seen_at    timestamptz NOT NULL,
  connected_at    timestamptz NOT NULL,
  reconnects      integer NOT NULL DEFAULT 0,
  last_lost_at    timestamptz,
  last_lost_error text,
  CONSTRAINT processes_kind_check CHECK (kind IN ('runner', 'worker')),
  CONSTRAINT processes_name_check CHECK (length(name) BETWEEN 1 AND 256),
  CONSTRAINT processes_reconnects_check CHECK (reconnects >= 0),
  CONSTRAINT processes_error_check CHECK (length(last_lost_error) <= 2000),
  CONSTRAINT processes_times_check CHECK (
    isfinite(started_at) AND isfinite(last_seen_at) AND isfinite(connected_at)
    AND (last_lost_at IS NULL OR isfinite(last_lost_at)))
);
COMMENT ON TABLE dispatch_policy.processes IS
  'Runners and workers that reported in the last day: when they started, when they were last seen (about once a minute while alive), how often their database session was lost and restored, and the last loss. Written by dispatch_policy.report_process; a process that stops cleanly deletes its row. Shown by "dispatch-policy status".';
COMMENT ON COLUMN dispatch_policy.processes.name IS 'The process: host:pid and a role, such as "db1:4242 runner".';
COMMENT ON COLUMN dispatch_policy.processes.kind IS 'runner or worker.';
COMMENT ON COLUMN dispatch_policy.processes.started_at IS 'When the process started.';
COMMENT ON COLUMN dispatch_policy.processes.last_seen_at IS 'Its last report (about once a minute while it runs).';
COMMENT ON COLUMN dispatch_policy.processes.connected_at IS 'When its current database session was opened.';
COMMENT ON COLUMN dispatch_policy.processes.reconnects IS 'Sessions it opened after its first: each one follows a lost session.';
COMMENT ON COLUMN dispatch_policy.processes.last_lost_at IS 'When it last lost a session (NULL: never).';
COMMENT ON COLUMN dispatch_policy.processes.last_lost_error IS 'Why (up to 2000 characters).';

CREATE FUNCTION dispatch_policy.report_process(
  name text, kind text, started_at timestamptz, connected_at timestamptz, reconnects integer DEFAULT 0,
  last_lost_at timestamptz DEFAULT NULL, last_lost_error text DEFAULT NULL
)
RETURNS void
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  -- Processes silent for a day are gone; a report clears them out.
  DELETE FROM dispatch_policy.processes p WHERE p.last_seen_at < now() - interval '1 day';
  INSERT INTO dispatch_policy.processes AS p
    (name, kind, started_at, last_seen_at, connected_at, reconnects, last_lost_at, last_lost_error)
  VALUES (left(report_process.name, 256), report_process.kind, report_process.started_at, now(),
          report_process.connected_at, greatest(report_process.reconnects, 0), report_process.last_lost_at,
          left(report_process.last_lost_error, 2000))
  ON CONFLICT ON CONSTRAINT processes_pkey DO UPDATE
  SET kind = EXCLUDED.kind, started_at = EXCLUDED.started_at, last_seen_at = EXCLUDED.last_seen_at,
      connected_at = EXCLUDED.connected_at, reconnects = EXCLUDED.reconnects,
      last_lost_at = EXCLUDED.last_lost_at, last_lost_error = EXCLUDED.last_lost_error;
$$;
COMMENT ON FUNCTION dispatch_policy.report_process(text, text, timestamptz, timestamptz, integer, timestamptz, text) IS
  'Called by a runner or worker when its session opens and about once a minute: records that it is alive and its reconnects and last lost session; deletes processes silent for a day.';

CREATE FUNCTION dispatch_policy.forget_process(name text)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
  WITH gone AS (DELETE FROM dispatch_policy.processes p WHERE p.name = forget_process.name RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM gone)
$$;
COMMENT ON FUNCTION dispatch_policy.forget_process(text) IS
  'Called by a runner or worker that stops cleanly: deletes its processes row. Returns whether there was one.';

-- Installed as an extension, the new table is kept by pg_dump too (0009).
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'dispatch_policy') THEN
    PERFORM pg_catalog.pg_extension_config_dump('dispatch_policy.processes'::regclass, '');
  END IF;
END
$$;
