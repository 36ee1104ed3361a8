-- pg_regress tests of the staging rules (issue 12, migration 0023):
-- outcomes (inserted, kept, replaced, dropped) of stage, stage_outcome,
-- stage_many and stage_many_outcomes; dedupe_mode replace never touching an
-- admitted job; debounce; a replace moving a job to another partition with
-- every count right; max_pending_per_partition with reject (DP002, all or
-- nothing) and drop_oldest; deadlines (expires_at, max_wait) through
-- the fetch (once a tick), through a tick and through the fetch alone; the
-- counts in policy_overview and prune; every bound refused. Every refusal
-- shows its error text, its SQLSTATE, and that nothing changed.
\set SHOW_CONTEXT never
\set VERBOSITY default
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dispatch_policy CASCADE;
CREATE EXTENSION dispatch_policy;
RESET client_min_messages;

-- Where every job is, with what a replace changes.
CREATE TEMP VIEW jobs AS
  SELECT 'staged' AS state, s.policy, s.id, s.args, s.round_robin_key AS lane, s.not_before IS NOT NULL AS scheduled,
         NULL::text AS status, NULL::text AS last_error
  FROM dispatch_policy.staged_jobs s
  UNION ALL
  SELECT 'admitted', a.policy, a.id, a.args, NULL, NULL, NULL, NULL FROM dispatch_policy.admitted_jobs a
  UNION ALL
  SELECT 'finished', f.policy, f.id, f.args, NULL, NULL, f.status,
         regexp_replace(f.last_error, '\d{4}-\d\d-\d\dT[0-9:.]+Z', 'TIME', 'g') FROM dispatch_policy.finished_jobs f;
-- A fingerprint of every job row and every counter staging keeps, to show
-- that a refusal changed nothing.
CREATE FUNCTION pg_temp.state() RETURNS text
LANGUAGE sql AS $$
  SELECT md5(coalesce((SELECT string_agg(j::text, ';' ORDER BY j.id) FROM jobs j), '')
             || coalesce((SELECT string_agg(c::text, ';' ORDER BY c.policy, c.lane) FROM dispatch_policy.backlog_counters c), '')
             || coalesce((SELECT string_agg(d::text, ';' ORDER BY d.policy, d.dedupe_key) FROM dispatch_policy.dedupe_keys d), '')
             || coalesce((SELECT string_agg(l.policy || ':' || coalesce(l.lane, '-'), ';' ORDER BY l.policy, l.lane)
                          FROM dispatch_policy.lanes l), '')
             || coalesce((SELECT string_agg(p.name || p.config::text, ';' ORDER BY p.name) FROM dispatch_policy.policies p), ''))
$$;

-- A tick that admits every fetched job (or only those given): tick_begin,
-- then tick_finish with each job's partition of every gate. Returns how
-- many were admitted.
CREATE FUNCTION pg_temp.admit(pol text, only_ids bigint[] DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
  r record;
  at timestamptz;
  cfg jsonb;
  ids bigint[] := '{}';
  names text[];
  parts text[] := '{}';
BEGIN
  FOR r IN SELECT * FROM dispatch_policy.tick_begin(pol, 100, 10) LOOP
    IF r.kind = 'tick' THEN
      at := r.now;
      cfg := r.config::jsonb;
    ELSIF r.kind = 'job' AND (only_ids IS NULL OR r.id = ANY (only_ids)) THEN
      ids := ids || r.id;
      parts := parts || ARRAY(SELECT dispatch_policy._gate_partitions(cfg, r.context::jsonb) ->> coalesce(g ->> 'name', g ->> 'type')
                              FROM jsonb_array_elements(coalesce(cfg -> 'gates', '[]')) WITH ORDINALITY AS x(g, n) ORDER BY x.n);
    ELSIF r.kind = 'done' THEN
      RETURN 0;
    END IF;
  END LOOP;
  names := ARRAY(SELECT coalesce(g ->> 'name', g ->> 'type') FROM jsonb_array_elements(coalesce(cfg -> 'gates', '[]')) WITH ORDINALITY AS x(g, n)
                 ORDER BY x.n);
  RETURN dispatch_policy.tick_finish(pol, at, ids, names, parts, '{}', '{}', '{}');
END
$$;

-- ---------------------------------------------------------------------------
-- keep (the default): a caller always gets an id.
SELECT dispatch_policy.declare_policy('keep', '{}');
SELECT * FROM dispatch_policy.stage_outcome('keep', '{"v": 1}', dedupe_key => 'k') \gset k1_
SELECT :'k1_outcome' AS outcome;
SELECT id = :k1_id AS same_job, outcome FROM dispatch_policy.stage_outcome('keep', '{"v": 2}', dedupe_key => 'k');
SELECT dispatch_policy.stage('keep', '{"v": 3}', dedupe_key => 'k') = :k1_id AS stage_returns_holder;
SELECT idx, id = :k1_id AS holder, outcome FROM dispatch_policy.stage_many_outcomes('keep', '[
  {"args": 4, "dedupe_key": "k"},
  {"args": 5, "dedupe_key": "k2"},
  {"args": 6, "dedupe_key": "k2"},
  {"args": 7}
]') ORDER BY idx;
-- stage_many: never a NULL any more.
SELECT array_position(dispatch_policy.stage_many('keep', '[{"args": 8, "dedupe_key": "k"}, {"args": 9, "dedupe_key": "k"}]'), NULL)
  IS NULL AS no_null;
SELECT state, args FROM jobs WHERE policy = 'keep' ORDER BY id;

-- ---------------------------------------------------------------------------
-- replace: a staged job's args and context are replaced, its id kept.
SELECT dispatch_policy.declare_policy('rep', '{"dedupe_mode": "replace", "round_robin_by": "{t}",
  "gates": [{"type": "concurrency", "max": 5, "partition_by": "{t}"}]}');
SELECT * FROM dispatch_policy.stage_outcome('rep', '{"v": 1}', '{"t": "a"}', dedupe_key => 'r') \gset r1_
SELECT :'r1_outcome' AS outcome;
SELECT dispatch_policy.stage('rep', '{"v": 0}', '{"t": "a"}') AS other_a \gset
-- The same key with a context of partition b: the job moves to b.
SELECT id = :r1_id AS same_job, outcome
FROM dispatch_policy.stage_outcome('rep', '{"v": 2}', '{"t": "b"}', dedupe_key => 'r', priority => 3, queue => 'q2');
SELECT s.args, s.context, s.priority, s.queue, s.round_robin_key, s.partitions FROM dispatch_policy.staged_jobs s WHERE s.id = :r1_id;
-- Every count follows it: the gate partitions (0020), the lanes (0012).
SELECT partition, pending FROM dispatch_policy.partition_pending('rep', 'concurrency', ARRAY['a', 'b']) ORDER BY 1;
SELECT lane FROM dispatch_policy.lanes WHERE policy = 'rep' ORDER BY lane;
-- Within one call: a later element replaces an earlier one.
SELECT idx, outcome FROM dispatch_policy.stage_many_outcomes('rep', '[
  {"args": 10, "dedupe_key": "m", "context": {"t": "a"}},
  {"args": 11, "dedupe_key": "m", "context": {"t": "a"}},
  {"args": 12, "dedupe_key": "r", "context": {"t": "b"}}
]') ORDER BY idx;
SELECT s.args FROM dispatch_policy.staged_jobs s WHERE s.dedupe_key IN ('m', 'r') ORDER BY s.dedupe_key;
-- An admitted job is never touched: the call reports it kept.
SELECT pg_temp.admit('rep', ARRAY[:r1_id]::bigint[]) AS admitted;
SELECT state FROM jobs WHERE id = :r1_id;
SELECT id = :r1_id AS same_job, outcome FROM dispatch_policy.stage_outcome('rep', '{"v": 99}', '{"t": "a"}', dedupe_key => 'r');
SELECT a.args FROM dispatch_policy.admitted_jobs a WHERE a.id = :r1_id;
SELECT dispatch_policy.complete(:r1_id) AS completed;
-- Freed: the key stages a new job.
SELECT outcome, id <> :r1_id AS new_job FROM dispatch_policy.stage_outcome('rep', '{"v": 100}', '{"t": "a"}', dedupe_key => 'r');

-- ---------------------------------------------------------------------------
-- debounce: a replace pushes not_before to now + debounce, never earlier.
SELECT dispatch_policy.declare_policy('deb', '{"dedupe_mode": "replace", "debounce": 30}');
SELECT dispatch_policy.stage('deb', '1', dedupe_key => 'd') AS d1 \gset
SELECT not_before IS NULL AS pending_at_first FROM dispatch_policy.staged_jobs WHERE id = :d1;
SELECT outcome FROM dispatch_policy.stage_outcome('deb', '2', dedupe_key => 'd');
SELECT not_before - now() BETWEEN interval '29 seconds' AND interval '30 seconds' AS pushed_by_30s FROM dispatch_policy.staged_jobs WHERE id = :d1;
-- A not_before later than now + debounce is kept.
SELECT outcome FROM dispatch_policy.stage_outcome('deb', '3', dedupe_key => 'd', not_before => now() + interval '1 hour');
SELECT outcome FROM dispatch_policy.stage_outcome('deb', '4', dedupe_key => 'd');
SELECT not_before - now() BETWEEN interval '59 minutes' AND interval '1 hour' AS kept_later, args FROM dispatch_policy.staged_jobs WHERE id = :d1;

-- ---------------------------------------------------------------------------
-- max_pending_per_partition, reject: DP002, and stage_many all or nothing.
SELECT dispatch_policy.declare_policy('cap', '{"round_robin_by": "{t}", "max_pending_per_partition": 2}');
SELECT dispatch_policy.stage_many('cap', '[{"args": 1, "context": {"t": "a"}}, {"args": 2, "context": {"t": "a"}},
                                          {"args": 3, "context": {"t": "b"}}]') IS NOT NULL AS staged;
SELECT * FROM dispatch_policy.backlog_counters WHERE policy = 'cap' ORDER BY lane;
SELECT pg_temp.state() AS before \gset
SELECT dispatch_policy.stage('cap', '4', '{"t": "a"}');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('cap', '[{"args": 5, "context": {"t": "b"}}, {"args": 6, "context": {"t": "c"}},
                                          {"args": 7, "context": {"t": "a"}}]');
\echo :SQLSTATE
SELECT pg_temp.state() = :'before' AS nothing_changed;
-- Keep mode with rules (the rules path): a staged duplicate is kept, untouched.
SELECT dispatch_policy.stage('cap', '"kept"', '{"t": "c"}', dedupe_key => 'kx') AS kx \gset
SELECT id = :kx AS same_job, outcome FROM dispatch_policy.stage_outcome('cap', '"new"', '{"t": "c"}', dedupe_key => 'kx');
SELECT args FROM dispatch_policy.staged_jobs WHERE id = :kx;
-- Keeping or replacing is not a new job: no refusal.
SELECT dispatch_policy.declare_policy('cap', '{"round_robin_by": "{t}", "max_pending_per_partition": 2, "dedupe_mode": "replace"}');
SELECT dispatch_policy.stage('cap', '8', '{"t": "b"}', dedupe_key => 'x') IS NOT NULL AS staged;
SELECT outcome FROM dispatch_policy.stage_outcome('cap', '9', '{"t": "b"}', dedupe_key => 'x');
-- Jobs without a key count as one partition.
SELECT dispatch_policy.declare_policy('keyless', '{"max_pending_per_partition": 1}');
SELECT dispatch_policy.stage('keyless', '1') IS NOT NULL AS staged;
SELECT dispatch_policy.stage('keyless', '2');
\echo :SQLSTATE
-- Admission frees room.
SELECT pg_temp.admit('keyless') AS admitted;
SELECT * FROM dispatch_policy.backlog_counters WHERE policy = 'keyless';
SELECT dispatch_policy.stage('keyless', '3') IS NOT NULL AS staged_after_admission;
-- The cap declared on a policy with a backlog counts it.
SELECT dispatch_policy.declare_policy('late', '{"round_robin_by": "{t}"}');
SELECT dispatch_policy.stage_many('late', '[{"args": 1, "context": {"t": "a"}}, {"args": 2, "context": {"t": "a"}}]') IS NOT NULL AS staged;
SELECT count(*) AS counted_before FROM dispatch_policy.backlog_counters WHERE policy = 'late';
SELECT dispatch_policy.declare_policy('late', '{"round_robin_by": "{t}", "max_pending_per_partition": 2}');
SELECT lane, staged FROM dispatch_policy.backlog_counters WHERE policy = 'late';
SELECT dispatch_policy.declare_policy('late', '{"round_robin_by": "{t}"}');
SELECT count(*) AS counted_after_removal FROM dispatch_policy.backlog_counters WHERE policy = 'late';

-- ---------------------------------------------------------------------------
-- drop_oldest: the oldest staged jobs of the partition are finished as dropped.
SELECT dispatch_policy.declare_policy('drop', '{"round_robin_by": "{t}", "max_pending_per_partition": 2,
  "on_overflow": "drop_oldest", "dedupe_mode": "replace"}');
SELECT dispatch_policy.stage('drop', '1', '{"t": "a"}', dedupe_key => 'one') AS o1 \gset
SELECT dispatch_policy.stage('drop', '2', '{"t": "a"}') AS o2 \gset
SELECT dispatch_policy.stage('drop', '3', '{"t": "b"}') AS o3 \gset
SELECT outcome FROM dispatch_policy.stage_outcome('drop', '4', '{"t": "a"}');
SELECT state, args, status, last_error FROM jobs WHERE policy = 'drop' ORDER BY id;
-- Its key is free again.
SELECT outcome FROM dispatch_policy.stage_outcome('drop', '5', '{"t": "b"}', dedupe_key => 'one');
-- In one call: an element dropped by a later one says dropped.
SELECT idx, outcome FROM dispatch_policy.stage_many_outcomes('drop', '[
  {"args": 6, "context": {"t": "c"}}, {"args": 7, "context": {"t": "c"}}, {"args": 8, "context": {"t": "c"}}
]') ORDER BY idx;
SELECT lane, staged FROM dispatch_policy.backlog_counters WHERE policy = 'drop' ORDER BY lane;
SELECT round_robin_key AS lane, count(*) FROM dispatch_policy.staged_jobs WHERE policy = 'drop' GROUP BY 1 ORDER BY 1;
-- A replace moving a job into a full partition moves its count, drops nothing.
SELECT outcome FROM dispatch_policy.stage_outcome('drop', '9', '{"t": "c"}', dedupe_key => 'one');
SELECT lane, staged FROM dispatch_policy.backlog_counters WHERE policy = 'drop' ORDER BY lane;
SELECT round_robin_key AS lane, count(*) FROM dispatch_policy.staged_jobs WHERE policy = 'drop' GROUP BY 1 ORDER BY 1;

-- ---------------------------------------------------------------------------
-- Deadlines.
SELECT dispatch_policy.declare_policy('dl', '{}');
SELECT dispatch_policy.stage('dl', '1', expires_at => now() + interval '1 minute') AS e1 \gset
SELECT dispatch_policy.stage('dl', '2', expires_at => now() + interval '1 hour') AS e2 \gset
SELECT dispatch_policy.stage('dl', '3') AS e3 \gset
SELECT args, expires_at - staged_at AS deadline FROM dispatch_policy.staged_jobs WHERE policy = 'dl' ORDER BY id;
-- A scheduled job whose deadline passes before its not_before: promote_scheduled
-- (run by tick_begin before each fetch) does not make it eligible ...
SELECT dispatch_policy.stage('dl', '5', expires_at => now() + interval '1 minute',
                             not_before => now() + interval '30 seconds') AS e5 \gset
SELECT dispatch_policy.promote_scheduled('dl', 100, now() + interval '2 minutes');
SELECT state, args, scheduled, status FROM jobs WHERE policy = 'dl' ORDER BY id;
-- ... and the fetch (once a tick) finishes it and e1 as expired.
SELECT count(*) AS fetched FROM dispatch_policy.fetch_batch('dl', 100, NULL, now() + interval '2 minutes') f;
SELECT state, args, status, last_error FROM jobs WHERE policy = 'dl' ORDER BY id;
-- The fetch never returns an expired job.
SELECT array_agg(f.id ORDER BY f.id) = ARRAY[:e3]::bigint[] AS only_e3
FROM dispatch_policy.fetch_batch('dl', 100, NULL, now() + interval '2 hours') f;
SELECT state, args, status FROM jobs WHERE policy = 'dl' ORDER BY id;
-- Through a tick: a job whose deadline passed a moment ago is not fetched.
SELECT dispatch_policy.stage('dl', '4', expires_at => clock_timestamp() + interval '200 milliseconds') AS e4 \gset
SELECT pg_sleep(0.3);
SELECT array_agg(k.id ORDER BY k.id) = ARRAY[:e3]::bigint[] AS fetched_e3_only FROM dispatch_policy.tick_begin('dl', 100, 10) k WHERE k.kind = 'job';
SELECT dispatch_policy.tick_abort('dl');
SELECT status FROM jobs WHERE id = :e4;
-- max_wait: staged_at + max_wait, or the earlier expires_at.
SELECT dispatch_policy.declare_policy('mw', '{"max_wait": 60}');
SELECT dispatch_policy.stage('mw', '1') AS m1 \gset
SELECT dispatch_policy.stage('mw', '2', expires_at => now() + interval '10 seconds') AS m2 \gset
SELECT dispatch_policy.stage('mw', '3', expires_at => now() + interval '1 hour') AS m3 \gset
SELECT args, expires_at - staged_at AS deadline FROM dispatch_policy.staged_jobs WHERE policy = 'mw' ORDER BY id;
-- explain shows a staged job's deadline, and an expired job as finished.
SELECT aspect, verdict, explanation LIKE 'expires at % (in %): finished as expired if not admitted by then' AS says
FROM dispatch_policy.explain(:m2) WHERE aspect = 'deadline';
SELECT aspect, verdict, explanation LIKE 'expired at % after 0 attempt(s): expired at % (expires_at) before it was admitted' AS says
FROM dispatch_policy.explain(:e4);
-- A retry keeps its deadline.
SELECT expires_at AS m1_expires FROM dispatch_policy.staged_jobs WHERE id = :m1 \gset
SELECT pg_temp.admit('mw', ARRAY[:m1]::bigint[]) AS admitted;
SELECT dispatch_policy.fail(:m1, 'boom', retry_in => interval '0');
SELECT expires_at = :'m1_expires' AS same_deadline, attempt FROM dispatch_policy.staged_jobs WHERE id = :m1;
-- The reason names what set the deadline: max_wait (m1, a retry too, and
-- m3, whose expires_at was later) or expires_at (m2).
SELECT count(*) AS fetched FROM dispatch_policy.fetch_batch('mw', 100, NULL, now() + interval '2 hours');
SELECT args, status, last_error FROM jobs WHERE policy = 'mw' ORDER BY id;

-- A job scheduled at or after its deadline can never be admitted: the next
-- fetch finishes it as expired at once, saying why (a not_before past
-- max_wait, a deferral past the deadline); one scheduled before it waits.
SELECT dispatch_policy.stage('mw', '4', not_before => now() + interval '2 minutes') AS m4 \gset
SELECT dispatch_policy.stage('mw', '5', not_before => now() + interval '30 seconds') AS m5 \gset
SELECT aspect, verdict, explanation LIKE '%can never be admitted%' OR explanation LIKE '%not before its deadline%' AS says
FROM dispatch_policy.explain(:m4) WHERE aspect IN ('deadline', 'estimate') ORDER BY aspect;
SELECT dispatch_policy.stage('mw', '6') AS m6 \gset
SELECT pg_temp.admit('mw', ARRAY[:m6]::bigint[]) AS admitted;
SELECT state FROM dispatch_policy.defer(:m6, now() + interval '1 hour', '429');
SELECT count(*) AS fetched FROM dispatch_policy.fetch_batch('mw', 100, NULL);
SELECT state, args, status, last_error FROM jobs WHERE id IN (:m4, :m5, :m6) ORDER BY id;

-- Counted.
SELECT policy, expired_24h, dropped_24h FROM dispatch_policy.policy_overview WHERE policy IN ('dl', 'drop', 'keep') ORDER BY 1;
SELECT what, removed FROM dispatch_policy.prune(now => now() + interval '8 days')
WHERE what IN ('expired_jobs', 'dropped_jobs', 'deadlines') ORDER BY what;
SELECT count(*) AS expired_or_dropped_left FROM dispatch_policy.finished_jobs WHERE status IN ('expired', 'dropped');

-- ---------------------------------------------------------------------------
-- Refusals, nothing changed.
SELECT pg_temp.state() AS before \gset
-- (terse: the DETAIL shows the time)
\set VERBOSITY terse
SELECT dispatch_policy.stage('dl', '1', expires_at => now());
\echo :SQLSTATE
SELECT dispatch_policy.stage('dl', '1', expires_at => now() - interval '1 second');
\echo :SQLSTATE
\set VERBOSITY default
SELECT dispatch_policy.stage('dl', '1', expires_at => 'infinity');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('dl', '[{"args": 1}, {"args": 2, "expires_at": "tomorrow-ish"}]');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('dl', '[{"args": 1}, {"args": 2, "expires_at": 1700000000}]');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('dl', '[{"args": 1}, {"args": 2, "expires_in": 5}]');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"dedupe_mode": "merge"}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"dedupe_mode": true}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"debounce": 5}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"dedupe_mode": "replace", "debounce": 86401}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"dedupe_mode": "replace", "debounce": -1}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"dedupe_mode": "replace", "debounce": "5"}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"max_pending_per_partition": 0}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"max_pending_per_partition": 10000001}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"max_pending_per_partition": 2.5}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"max_pending_per_partition": "2"}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"on_overflow": "reject"}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"max_pending_per_partition": 2, "on_overflow": "drop_newest"}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"max_wait": 0}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"max_wait": 31536001}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"max_wait": null}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"max_waits": 5}');
\echo :SQLSTATE
SELECT pg_temp.state() = :'before' AS nothing_changed;
-- The bounds, from limits() (0024 appends its rows after these).
SELECT field, minimum, minimum_exclusive, maximum, integral, default_value, unit
FROM dispatch_policy.limits() WITH ORDINALITY l
WHERE l.field IN ('debounce', 'max_pending_per_partition', 'max_wait') ORDER BY l.ordinality DESC;
-- explain of a job whose deadline passed, still staged until the next tick
-- finishes it: no admission is estimated, even when every gate has room.
SELECT dispatch_policy.declare_policy('late', '{}');
SELECT dispatch_policy.stage('late', '1', expires_at => clock_timestamp() + interval '100 milliseconds') AS late1 \gset
SELECT pg_sleep(0.2);
SELECT aspect, verdict,
       CASE aspect WHEN 'deadline' THEN explanation LIKE 'expired at %: the next tick finishes it as expired instead of admitting it'
                   ELSE explanation LIKE 'not admitted: its deadline passed at %; the next tick finishes it as expired' END AS says,
       wait_seconds
FROM dispatch_policy.explain(:late1) WHERE aspect IN ('deadline', 'estimate') ORDER BY aspect;
-- Set-based staging gives the outcomes of staging the jobs one at a time:
-- a replace earlier in the call that moves a job out of or into a full
-- partition counts for the new jobs after it, not before it (DP002 names
-- the element and what its partition held then); a key twice under
-- dedupe_mode keep is kept by the first element's job.
SELECT dispatch_policy.declare_policy('sb', '{"round_robin_by": "{t}", "dedupe_mode": "replace", "max_pending_per_partition": 2}');
SELECT array_agg(outcome ORDER BY idx) FROM dispatch_policy.stage_many_outcomes('sb',
  '[{"args": 1, "context": {"t": "a"}, "dedupe_key": "m"}, {"args": 2, "context": {"t": "a"}}]');
SELECT array_agg(outcome ORDER BY idx) FROM dispatch_policy.stage_many_outcomes('sb',
  '[{"args": 3, "context": {"t": "b"}, "dedupe_key": "m"}, {"args": 4, "context": {"t": "a"}}]');
-- b holds m; m moves to a (full: a replace is never refused), making room in b.
SELECT array_agg(outcome ORDER BY idx) FROM dispatch_policy.stage_many_outcomes('sb',
  '[{"args": 5, "context": {"t": "b"}}, {"args": 6, "context": {"t": "a"}, "dedupe_key": "m"}, {"args": 7, "context": {"t": "b"}}]');
SELECT lane, staged FROM dispatch_policy.backlog_counters WHERE policy = 'sb' ORDER BY lane;
-- m leaves a (3 to 2): the new job after it still finds a full.
SELECT dispatch_policy.stage_many('sb', '[{"args": 8, "context": {"t": "c"}, "dedupe_key": "m"}, {"args": 9, "context": {"t": "a"}}]');
-- m comes into c after a new job: the next new job finds c full.
SELECT dispatch_policy.stage_many('sb',
  '[{"args": 10, "context": {"t": "c"}}, {"args": 11, "context": {"t": "c"}, "dedupe_key": "m"}, {"args": 12, "context": {"t": "c"}}]');
SELECT lane, staged, (SELECT count(*) FROM dispatch_policy.staged_jobs s WHERE s.policy = 'sb' AND s.round_robin_key = c.lane) AS jobs
FROM dispatch_policy.backlog_counters c WHERE policy = 'sb' ORDER BY lane;
SELECT dispatch_policy.declare_policy('sbk', '{"max_pending_per_partition": 3, "max_wait": 60}');
SELECT o.idx, o.id - min(o.id) OVER () AS id, o.outcome
FROM dispatch_policy.stage_many_outcomes('sbk', '[{"args": 1, "dedupe_key": "x"}, {"args": 2, "dedupe_key": "x"}, {"args": 3}]') o
ORDER BY o.idx;
SELECT count(*) AS staged, count(*) FILTER (WHERE s.expires_at = s.staged_at + interval '60 seconds') AS with_max_wait,
       (SELECT count(*) FROM dispatch_policy.job_deadlines d WHERE d.policy = 'sbk') AS deadlines
FROM dispatch_policy.staged_jobs s WHERE s.policy = 'sbk';
-- Found by the second hostile pass:
-- max_wait runs from when the job was first staged (created_at), which a
-- retry or a deferral keeps: a replace after one does not push the
-- deadline out (it ran from staged_at, which they reset).
SELECT dispatch_policy.declare_policy('mwr', '{"max_wait": 60, "dedupe_mode": "replace"}');
SELECT dispatch_policy.stage('mwr', '1', dedupe_key => 'k') AS mwr1 \gset
-- As if admitted 50 s after staging and retried now: created_at kept, staged_at new.
UPDATE dispatch_policy.staged_jobs SET created_at = now() - interval '50 seconds', staged_at = now(),
       expires_at = now() + interval '10 seconds' WHERE id = :mwr1;
SELECT outcome FROM dispatch_policy.stage_outcome('mwr', '2', dedupe_key => 'k');
SELECT expires_at - created_at AS max_wait_from_created, expires_at - now() < interval '11 seconds' AS ten_seconds_left
FROM dispatch_policy.staged_jobs WHERE id = :mwr1;
SELECT array_agg(outcome) FROM dispatch_policy.stage_many_outcomes('mwr', '[{"args": 3, "dedupe_key": "k"}]');
SELECT expires_at - now() < interval '11 seconds' AS still_ten_seconds_left FROM dispatch_policy.staged_jobs WHERE id = :mwr1;
-- A job whose not_before is at or after its expires_at could never be
-- admitted: refused, nothing stored.
SELECT dispatch_policy.stage('mwr', '4', expires_at => '2999-01-01T00:00:00Z', not_before => '2999-06-01T00:00:00Z');
\echo :SQLSTATE
SELECT dispatch_policy.stage_many('mwr', '[{"args": 5, "expires_at": "2999-01-01T00:00:00Z", "not_before": "2999-01-01T00:00:00Z"}]');
\echo :SQLSTATE
SELECT count(*) AS mwr_jobs FROM dispatch_policy.staged_jobs WHERE policy = 'mwr';
-- A debounce at or over max_wait would expire every replaced job.
SELECT dispatch_policy.declare_policy('bad', '{"dedupe_mode": "replace", "debounce": 60, "max_wait": 5}');
\echo :SQLSTATE
SELECT dispatch_policy.declare_policy('bad', '{"dedupe_mode": "replace", "debounce": 5, "max_wait": 5}');
\echo :SQLSTATE
SELECT dispatch_policy.validate_policy('ok', '{"dedupe_mode": "replace", "debounce": 4.5, "max_wait": 5}');
