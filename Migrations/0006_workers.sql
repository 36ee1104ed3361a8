-- dispatch-policy: heartbeat for long-running jobs of the ready queue.

CREATE FUNCTION dispatch_policy.heartbeat(id bigint, now timestamptz DEFAULT now())
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  expires timestamptz;
BEGIN
  UPDATE dispatch_policy.admitted_jobs a
  SET heartbeat_at = heartbeat.now,
      lease_expires_at = heartbeat.now + coalesce(
        make_interval(secs => (SELECT (p.config ->> 'lease_seconds')::integer FROM dispatch_policy.policies p WHERE p.name = a.policy)),
        interval '900 seconds')
  WHERE a.id = heartbeat.id
  RETURNING a.lease_expires_at INTO expires;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % is not admitted', heartbeat.id
      USING ERRCODE = 'P0002',
            DETAIL = CASE WHEN EXISTS (SELECT 1 FROM dispatch_policy.finished_jobs f WHERE f.id = heartbeat.id)
                          THEN 'It has already finished.'
                          WHEN EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s WHERE s.id = heartbeat.id)
                          THEN 'Its lease expired and it was re-staged: stop working on it.'
                          ELSE 'No job has this id.' END;
  END IF;
  RETURN expires;
END
$$;
COMMENT ON FUNCTION dispatch_policy.heartbeat(bigint, timestamptz) IS
  'Extends the lease of an admitted job by its policy''s lease_seconds and returns the new expiry. SQLSTATE P0002 when the job is not admitted (finished, re-staged after its lease expired, or unknown): the worker should stop.';
