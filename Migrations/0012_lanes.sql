-- Lanes: no head-of-line blocking (issue 9).
--
-- A lane is what the round-robin fetch rotates over: one per round-robin key
-- of a policy's pending jobs, plus one for its jobs without a key. Without
-- round_robin_by, a policy whose gates are partitioned now gets a lane per
-- combination of its gates' partitions (_lane_template), so a throttled or
-- capped partition no longer hides the others behind its backlog.
--
-- dispatch_policy.lanes lists the lanes with pending jobs and whether each is
-- blocked. The fetch walks only ready lanes (an index of them), so lanes
-- known to be blocked take no batch slot and cost nothing to pass over:
-- 100,000 blocked lanes and one ready one, and the ready one is fetched first.
--
-- A lane is blocked by the tick that found every fetched job of it refused
-- by state from before the tick (not by capacity that tick's own admissions
-- took):
--   * by a throttle partition: until its next whole token (blocked_until);
--   * by a concurrency or adaptive partition at its cap: until a slot of
--     that partition is released (complete, fail, the reaper, repair: any
--     decrease of its counter, by a trigger)
--     or its adaptive cap grows (blocked_gate, blocked_partition;
--     blocked_until 'infinity');
--   * by different partitions: for a second at most.
-- A changed config unblocks every lane of its policy. A full global cap
-- blocks no lane: the tick fetches nothing while it is full.
--
-- Lane rows are added by staging and by a trigger on jobs made eligible by an
-- UPDATE (promote_scheduled, a DBA clearing not_before), and deleted by
-- the fetch when it finds a lane empty. A stager holds a shared advisory lock
-- of the policy's lanes from before it adds its lanes until it commits; the
-- fetch deletes empty lanes only if it can take that lock exclusively, at
-- once, and releases it right after the DELETE: a stager's insert that
-- arrives after the DELETE waits for the tick's commit and adds the lane
-- again; a stager in flight makes the fetch keep its lanes.

CREATE TABLE dispatch_policy.lanes (
  policy            text NOT NULL,
  lane              text,
  blocked_until     timestamptz,
  blocked_gate      text,
  blocked_partition text,
  updated_at        timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT lanes_blocked_check CHECK (blocked_until IS NOT NULL OR blocked_gate IS NULL),
  CONSTRAINT lanes_blocked_on_check CHECK ((blocked_gate IS NULL) = (blocked_partition IS NULL))
);
CREATE UNIQUE INDEX lanes_key ON dispatch_policy.lanes (policy, lane) NULLS NOT DISTINCT;
-- The rotation: ready lanes in key order (NULL, the keyless lane, last).
CREATE INDEX lanes_ready_idx ON dispatch_policy.lanes (policy, lane) WHERE blocked_until IS NULL;
CREATE INDEX lanes_blocked_idx ON dispatch_policy.lanes (policy, blocked_until) WHERE blocked_until IS NOT NULL;
CREATE INDEX lanes_blocked_on_idx ON dispatch_policy.lanes (policy, blocked_gate, blocked_partition)
  WHERE blocked_gate IS NOT NULL;
ALTER TABLE dispatch_policy.lanes SET (
  autovacuum_vacuum_scale_factor = 0.0,
  autovacuum_vacuum_threshold = 5000,
  autovacuum_vacuum_cost_delay = 0
);
COMMENT ON TABLE dispatch_policy.lanes IS
  'Round-robin lanes with pending jobs, and whether each is blocked. The fetch rotates over ready lanes only (blocked_until IS NULL), so a blocked lane takes no batch slot. Maintained by staging, a trigger on staged jobs made eligible by an UPDATE (promote_scheduled), the fetch (empty lanes are deleted), the tick (blocks), released or deleted counters and config changes (unblocks); sync_lanes re-adds lanes of jobs written without stage().';
COMMENT ON COLUMN dispatch_policy.lanes.policy IS 'Policy.';
COMMENT ON COLUMN dispatch_policy.lanes.lane IS 'The round-robin key of its jobs; NULL: the lane of jobs without a key.';
COMMENT ON COLUMN dispatch_policy.lanes.blocked_until IS 'NULL: ready. Else the fetch passes the lane over until then (''infinity'': until blocked_partition releases a slot, or the config changes).';
COMMENT ON COLUMN dispatch_policy.lanes.blocked_gate IS 'The gate whose partition blocks the lane until it releases a slot (concurrency, adaptive_concurrency) or the config changes (a throttle of rate 0); NULL: blocked by time alone.';
COMMENT ON COLUMN dispatch_policy.lanes.blocked_partition IS 'That gate''s partition.';
COMMENT ON COLUMN dispatch_policy.lanes.updated_at IS 'When the lane was added or last blocked or unblocked.';
ALTER TABLE dispatch_policy.lanes
  ADD CONSTRAINT lanes_lane_check CHECK (octet_length(lane) <= dispatch_policy._limit_max('job.round_robin_key'));

-- A dump keeps the lanes (see 0009_dump.sql).
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'dispatch_policy') THEN
    PERFORM pg_catalog.pg_extension_config_dump('dispatch_policy.lanes'::regclass, '');
  END IF;
END
$$;

-- Jobs without a round-robin key, in fetch order: the keyless lane's own
-- index (else finding them walks past every keyed job of the policy).
CREATE INDEX staged_jobs_keyless_idx
  ON dispatch_policy.staged_jobs (policy, priority, id)
  WHERE not_before IS NULL AND round_robin_key IS NULL;

CREATE FUNCTION dispatch_policy._lanes_lock_key(policy text)
RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT hashtextextended('dispatch_policy.lanes.' || policy, 0)
$$;
COMMENT ON FUNCTION dispatch_policy._lanes_lock_key(text) IS
  'Internal: the advisory lock of a policy''s lanes: stagers hold it shared, the fetch takes it exclusively to delete empty lanes.';

-- The template of a job's lane: round_robin_by; else, when gates are
-- partitioned, their distinct partition_by templates in gate order joined by
-- '|' (a lane per combination of partitions); else none.
CREATE FUNCTION dispatch_policy._lane_template(config jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SECURITY INVOKER
AS $$
  SELECT coalesce(config ->> 'round_robin_by',
                  (SELECT string_agg(t.template, '|' ORDER BY t.first)
                   FROM (SELECT g ->> 'partition_by' AS template, min(n) AS first
                         FROM jsonb_array_elements(coalesce(config -> 'gates', '[]'::jsonb)) WITH ORDINALITY AS x(g, n)
                         WHERE g ->> 'type' IN ('throttle', 'concurrency', 'adaptive_concurrency') AND g ? 'partition_by'
                         GROUP BY 1) t))
$$;
COMMENT ON FUNCTION dispatch_policy._lane_template(jsonb) IS
  'Internal: the template staging renders a job''s round-robin key from when none is given: round_robin_by, else the distinct partition_by templates of the throttle, concurrency and adaptive gates joined by ''|'', else NULL (no key).';

CREATE FUNCTION dispatch_policy._add_lanes(policy text, lanes text[])
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
BEGIN
  IF coalesce(cardinality(_add_lanes.lanes), 0) = 0 THEN
    RETURN;
  END IF;
  -- Held until commit: the fetch does not delete this policy's lanes meanwhile.
  PERFORM pg_advisory_xact_lock_shared(dispatch_policy._lanes_lock_key(_add_lanes.policy));
  INSERT INTO dispatch_policy.lanes AS l (policy, lane)
  SELECT DISTINCT _add_lanes.policy, k FROM unnest(_add_lanes.lanes) AS k
  ORDER BY 2
  ON CONFLICT (policy, lane) DO NOTHING;
END
$$;
COMMENT ON FUNCTION dispatch_policy._add_lanes(text, text[]) IS
  'Internal: makes sure the given lanes of a policy exist (NULL: the keyless lane), holding the policy''s lanes lock shared until commit.';

-- Each policy's lane template, computed once when its config is written,
-- read by staging.
ALTER TABLE dispatch_policy.policies
  ADD COLUMN lane_template text GENERATED ALWAYS AS (dispatch_policy._lane_template(config)) STORED;
COMMENT ON COLUMN dispatch_policy.policies.lane_template IS
  'What a job''s round-robin key (its lane) is rendered from when staged without one: round_robin_by, else the partition_by templates of the partitioned gates joined by ''|'', else NULL (see _lane_template).';

-- Jobs made eligible by an UPDATE (promote_scheduled, or a DBA clearing
-- not_before to run a job now): their lanes are added.
CREATE FUNCTION dispatch_policy._lanes_of_updated_jobs()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
DECLARE
  p text;
  keys text[];
BEGIN
  FOR p, keys IN
    SELECT n.policy, array_agg(DISTINCT n.round_robin_key)
    FROM new_jobs n WHERE n.not_before IS NULL
    GROUP BY n.policy ORDER BY n.policy
  LOOP
    PERFORM dispatch_policy._add_lanes(p, keys);
  END LOOP;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._lanes_of_updated_jobs() IS
  'Internal trigger: adds the lanes of staged jobs an UPDATE made eligible (not_before cleared by promote_scheduled or by hand).';
CREATE TRIGGER staged_jobs_lanes
  AFTER UPDATE ON dispatch_policy.staged_jobs
  REFERENCING NEW TABLE AS new_jobs
  FOR EACH STATEMENT EXECUTE FUNCTION dispatch_policy._lanes_of_updated_jobs();

-- Lanes with no eligible job are deleted, unless a stager is adding jobs to
-- the policy right now (it holds the lanes lock shared): the lock is taken at
-- once or not at all, and given back right after the DELETE (a stager's lane
-- insert after it waits for this transaction, then adds the lane again).
-- When a stager is in flight the empty lanes are passed over for a second
-- instead: a time block always ends, so a job staged into one meanwhile
-- waits a second at most, and empty lanes never crowd out the ready ones.
-- (_drop_empty_lanes: its one definition in 0.2.0 is in 0018_tick_pauses.sql.)

-- The next ready lanes in rotation order after a key: keys ascending, then
-- the keyless lane (NULL), then from the first key again up to the given one.
CREATE FUNCTION dispatch_policy._ready_lanes(policy text, after text, n integer)
RETURNS text[]
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
  SELECT coalesce(array_agg(r.lane ORDER BY r.part, r.lane NULLS LAST), '{}') FROM (
    SELECT * FROM (
      -- Two branches, not "after IS NULL OR lane > after": a generic plan
      -- can use only a plain comparison as an index bound.
      (SELECT 1 AS part, l.lane FROM dispatch_policy.lanes l
       WHERE _ready_lanes.after IS NULL AND l.policy = _ready_lanes.policy AND l.blocked_until IS NULL
         AND l.lane IS NOT NULL
       ORDER BY l.lane LIMIT n)
      UNION ALL
      (SELECT 1 AS part, l.lane FROM dispatch_policy.lanes l
       WHERE _ready_lanes.after IS NOT NULL AND l.policy = _ready_lanes.policy AND l.blocked_until IS NULL
         AND l.lane IS NOT NULL AND l.lane > _ready_lanes.after
       ORDER BY l.lane LIMIT n)
      UNION ALL
      (SELECT 2, NULL::text WHERE EXISTS (
         SELECT 1 FROM dispatch_policy.lanes l
         WHERE l.policy = _ready_lanes.policy AND l.lane IS NULL AND l.blocked_until IS NULL))
      UNION ALL
      (SELECT 3, l.lane FROM dispatch_policy.lanes l
       WHERE _ready_lanes.after IS NOT NULL AND l.policy = _ready_lanes.policy AND l.blocked_until IS NULL
         AND l.lane IS NOT NULL AND l.lane <= _ready_lanes.after
       ORDER BY l.lane LIMIT n)
    ) x ORDER BY x.part, x.lane NULLS LAST LIMIT n
  ) r
$$;
COMMENT ON FUNCTION dispatch_policy._ready_lanes(text, text, integer) IS
  'Internal: up to n ready lanes of a policy in rotation order after the given key (keys ascending, then NULL for the keyless lane, then from the first key again up to the given one), by index range scans of lanes_ready_idx.';

DROP FUNCTION dispatch_policy._next_round_robin_keys(text, text, integer);

-- fetch_batch rotates over the policy's ready lanes (dispatch_policy.lanes)
-- after its cursor, passing over blocked ones, unblocking those whose block
-- ran out and deleting those it finds empty. (fetch_batch is defined once
-- in 0.2.0, in 0024_cost_weights.sql.)

-- A counter that goes down (a slot released by complete, fail or the
-- reaper; repair() or a DBA correcting it) or goes away: lanes waiting on its
-- partition are ready again. The releasing transaction holds the counter's
-- row lock to commit, so a tick cannot block a lane on it in between (the
-- tick checks the counter under that lock before it blocks).
CREATE FUNCTION dispatch_policy._unblock_released_lanes()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  UPDATE dispatch_policy.lanes l
  SET blocked_until = NULL, blocked_gate = NULL, blocked_partition = NULL, updated_at = now()
  WHERE l.policy = OLD.policy AND l.blocked_gate = OLD.gate AND l.blocked_partition = OLD.partition
    AND l.blocked_until IS NOT NULL;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._unblock_released_lanes() IS
  'Internal trigger: when an in-flight counter goes down or is deleted, the lanes blocked until that partition releases a slot are ready again.';
CREATE TRIGGER inflight_counters_released
  AFTER UPDATE OF in_flight ON dispatch_policy.inflight_counters
  FOR EACH ROW WHEN (NEW.in_flight < OLD.in_flight) EXECUTE FUNCTION dispatch_policy._unblock_released_lanes();
CREATE TRIGGER inflight_counters_deleted
  AFTER DELETE ON dispatch_policy.inflight_counters
  FOR EACH ROW EXECUTE FUNCTION dispatch_policy._unblock_released_lanes();

-- A policy declared (again), redeclared or deleted: its lanes start over.
-- A changed config may change every cap and rate, so its lanes are ready
-- again; jobs pending without a key get the lane the new config gives them
-- (else a policy that gains partitioned gates keeps them all in one lane,
-- behind whichever partition is blocked); a deleted policy's lanes go.
CREATE FUNCTION dispatch_policy._policy_lanes_changed()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    DELETE FROM dispatch_policy.lanes l WHERE l.policy = OLD.name;
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' AND OLD.config IS NOT DISTINCT FROM NEW.config THEN
    RETURN NULL;
  END IF;
  UPDATE dispatch_policy.lanes l SET blocked_until = NULL, blocked_gate = NULL, blocked_partition = NULL, updated_at = now()
  WHERE l.policy = NEW.name AND l.blocked_until IS NOT NULL;
  IF NEW.lane_template IS NOT NULL AND (TG_OP = 'INSERT' OR OLD.lane_template IS DISTINCT FROM NEW.lane_template) THEN
    -- The staged_jobs_lanes trigger adds the new lanes.
    UPDATE dispatch_policy.staged_jobs s
    SET round_robin_key = dispatch_policy._round_robin_key(NEW.lane_template, s.context, NULL)
    WHERE s.policy = NEW.name AND s.round_robin_key IS NULL;
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch_policy._policy_lanes_changed() IS
  'Internal trigger: a policy inserted or whose config changed has every lane ready again and its pending jobs without a key keyed by its lane_template; a deleted policy''s lanes are deleted.';
CREATE TRIGGER policies_lanes
  AFTER INSERT OR UPDATE OF config OR DELETE ON dispatch_policy.policies
  FOR EACH ROW EXECUTE FUNCTION dispatch_policy._policy_lanes_changed();

-- Lanes of eligible jobs written without stage() (a restore, a direct
-- INSERT): one index probe per lane, so a policy's lanes are found in
-- O(lanes), not O(jobs). Run by the runner's maintenance.
CREATE FUNCTION dispatch_policy.sync_lanes(policies text[] DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  p text;
  found_lanes text[];
  added bigint := 0::bigint;
  n bigint;
BEGIN
  FOR p IN SELECT x.name FROM dispatch_policy.policies x
           WHERE sync_lanes.policies IS NULL OR x.name = ANY (sync_lanes.policies) ORDER BY 1 LOOP
    -- The distinct keys by a skip scan of staged_jobs_round_robin_idx: one
    -- index probe per lane, each a range scan from the key before.
    WITH RECURSIVE keys AS (
      (SELECT s.round_robin_key AS k FROM dispatch_policy.staged_jobs s
       WHERE s.policy = p AND s.not_before IS NULL AND s.round_robin_key IS NOT NULL
       ORDER BY s.round_robin_key LIMIT 1)
      UNION ALL
      SELECT (SELECT s.round_robin_key FROM dispatch_policy.staged_jobs s
              WHERE s.policy = p AND s.not_before IS NULL AND s.round_robin_key IS NOT NULL AND s.round_robin_key > keys.k
              ORDER BY s.round_robin_key LIMIT 1)
      FROM keys WHERE keys.k IS NOT NULL
    )
    SELECT coalesce(array_agg(keys.k), '{}') INTO found_lanes FROM keys WHERE keys.k IS NOT NULL;
    IF EXISTS (SELECT 1 FROM dispatch_policy.staged_jobs s
               WHERE s.policy = p AND s.not_before IS NULL AND s.round_robin_key IS NULL) THEN
      found_lanes := found_lanes || NULL::text;
    END IF;
    IF cardinality(found_lanes) > 0 THEN
      PERFORM pg_advisory_xact_lock_shared(dispatch_policy._lanes_lock_key(p));
      INSERT INTO dispatch_policy.lanes (policy, lane)
      SELECT p, k FROM unnest(found_lanes) AS k ORDER BY 2
      ON CONFLICT (policy, lane) DO NOTHING;
      GET DIAGNOSTICS n = ROW_COUNT;
      added := added + n;
    END IF;
  END LOOP;
  -- Lanes of policies that are gone.
  IF sync_lanes.policies IS NULL THEN
    DELETE FROM dispatch_policy.lanes l WHERE NOT EXISTS (SELECT 1 FROM dispatch_policy.policies x WHERE x.name = l.policy);
  END IF;
  RETURN added;
END
$$;
COMMENT ON FUNCTION dispatch_policy.sync_lanes(text[]) IS
  'Maintenance: adds the missing lanes of eligible jobs (jobs written without stage(), as by a restore or a direct INSERT, are otherwise never fetched by the round-robin fetch), of the given policies or all; deletes lanes of policies that no longer exist. One index probe per lane. Returns the number of lanes added. The runner calls it with prune.';

-- Lanes of the jobs pending now.
SELECT dispatch_policy.sync_lanes();
