#!/usr/bin/env bash
# Races ticks (tick_begin, then tick_finish in a transaction of its own, as
# a runner makes them) against the paths that re-stage admitted jobs and
# against replacing stagers, and fails on any deadlock. The global lock
# order these paths keep: inflight_counters rows, then staged_jobs rows (by
# id), then backlog_counters rows (each table's rows sorted):
#   * policy 'f': max_pending_per_partition (so staging and deleting staged
#     jobs lock backlog counters) and a concurrency gate (so admitting and
#     releasing lock an in-flight counter); 40 jobs that go round: workers
#     claim and fail them (retry_in 0), or defer them (until a moment
#     later), a reaper takes back leases (made to run out), ticks
#     admit them again. fail, defer and the reaper release slots and then
#     re-stage (inflight, then backlog); a tick used to delete the staged
#     jobs (backlog) before it locked the counters (inflight);
#   * policy 'r': dedupe_mode replace, round_robin_by, a cap; stage_many of
#     two keyed jobs in random lanes while its ticks admit: a tick deletes
#     the jobs it fetched, which it used to lock in batch (lane) order, a
#     replacing stager locks the holders of its keys by id; a session
#     holds the oldest job a moment, so that both queue up behind it. (This
#     one is rare here: 1 deadlock in 20 s with 8 clients with the tick's
#     old order; sql/test/specs/lock_order.spec pins it every time.)
# Expected refusals (a job reaped or re-staged under a worker: DP001,
# P0002) are caught; any other error, a deadlock failure in pgbench or in
# pg_stat_database (deadlocks) for the database fails the run.
#
#   PGHOST=... PGPORT=... PGUSER=... sql/test/race/lock_order_race.sh [seconds] [clients]
#
# Builds its own database from Migrations/ with psql (uses and drops
# dispatch_policy_lock_order_race). Prints a last line starting "OK:" and
# exits 0, or prints FAILED and exits 1.
set -euo pipefail
cd "$(dirname "$0")/../../.."
seconds=${1:-6}
clients=${2:-6}
db=dispatch_policy_lock_order_race
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
source sql/test/race/lib.sh
race_database $db
"${psql[@]}" -d $db >/dev/null <<'SQL'
SELECT dispatch_policy.declare_policy('f', '{"max_pending_per_partition": 1000, "max_attempts": 1000,
  "gates": [{"type": "concurrency", "name": "c", "max": 50}]}');
SELECT dispatch_policy.stage_many('f', (SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, 40) i));
SELECT dispatch_policy.declare_policy('r', '{"round_robin_by": "{a}", "dedupe_mode": "replace",
  "max_pending_per_partition": 1000, "max_attempts": 1000}');

-- A runner's tick in two transactions: begin_tick (tick_begin, keeping what
-- it fetched in a temporary table), then finish_tick (tick_finish admitting
-- all of it, with each job's partitions of every gate of the policy).
CREATE FUNCTION begin_tick(p text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE r record; at timestamptz;
BEGIN
  IF to_regclass('pg_temp.fetched') IS NULL THEN
    CREATE TEMP TABLE fetched (n serial, id bigint, context jsonb, at timestamptz);
  END IF;
  DELETE FROM fetched;
  -- After a failed finish_tick, as a runner does.
  IF coalesce(current_setting('dispatch_policy.tick_locked', true), '') <> '' THEN
    PERFORM dispatch_policy.tick_abort(current_setting('dispatch_policy.tick_locked'));
  END IF;
  FOR r IN SELECT * FROM dispatch_policy.tick_begin(p, 10, 2) LOOP
    IF r.kind = 'tick' THEN at := r.now;
    ELSIF r.kind = 'job' THEN INSERT INTO fetched (id, context, at) VALUES (r.id, r.context::jsonb, at);
    END IF;
  END LOOP;
  RETURN (SELECT count(*) FROM fetched);
END $$;
CREATE FUNCTION finish_tick(p text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE cfg jsonb := (SELECT config FROM dispatch_policy.policies WHERE name = p); gates text[];
BEGIN
  IF current_setting('dispatch_policy.tick_locked', true) IS DISTINCT FROM p THEN RETURN -1; END IF;
  gates := ARRAY(SELECT coalesce(g ->> 'name', g ->> 'type') FROM jsonb_array_elements(coalesce(cfg -> 'gates', '[]')) g);
  -- In fetch order (lane by lane), as a runner passes them.
  RETURN dispatch_policy.tick_finish(p, (SELECT max(f.at) FROM fetched f),
    ARRAY(SELECT f.id FROM fetched f ORDER BY f.n), gates,
    ARRAY(SELECT dispatch_policy._gate_partitions(cfg, f.context) ->> g.g
          FROM fetched f CROSS JOIN unnest(gates) WITH ORDINALITY AS g(g, k) ORDER BY f.n, g.k),
    '{}', '{}', '{}');
END $$;
-- Workers: a job reaped or handed back meanwhile is refused (DP001,
-- P0002); that ends the call, not pgbench's client.
CREATE FUNCTION work(q text, how text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE j record;
BEGIN
  FOR j IN SELECT c.id, c.attempt FROM dispatch_policy.claim(q, 'w', 1) c LOOP
    IF how = 'fail' THEN
      PERFORM dispatch_policy.fail(j.id, 'x', retry_in => '0'::interval, attempt => j.attempt);
    ELSE
      PERFORM dispatch_policy.defer(j.id, now() + interval '10 milliseconds', 'later', attempt => j.attempt);
    END IF;
  END LOOP;
EXCEPTION WHEN SQLSTATE 'DP001' OR SQLSTATE 'P0002' THEN
  NULL;
END $$;
SQL

cat > "$dir/tick_f.sql" <<'SQL'
SELECT begin_tick('f');
SELECT finish_tick('f');
SQL
cat > "$dir/tick_r.sql" <<'SQL'
SELECT begin_tick('r');
SELECT finish_tick('r');
SQL
cat > "$dir/fail.sql" <<'SQL'
SELECT work('default', 'fail');
SELECT work('r', 'fail');
SQL
cat > "$dir/defer.sql" <<'SQL'
SELECT work('default', 'defer');
SELECT work('r', 'defer');
SQL
# The reaper: a lease made to run out (a worker died), then reaped; the
# backoff of reaped jobs (2^attempt s) cut short, so that they come round.
cat > "$dir/reap.sql" <<'SQL'
UPDATE dispatch_policy.admitted_jobs a SET lease_expires_at = now() - interval '1 second'
FROM (SELECT x.id FROM dispatch_policy.admitted_jobs x ORDER BY random() LIMIT 2 FOR UPDATE SKIP LOCKED) r WHERE a.id = r.id;
SELECT dispatch_policy.reap_leases(NULL, now(), 5);
UPDATE dispatch_policy.staged_jobs s SET not_before = now()
FROM (SELECT x.id FROM dispatch_policy.staged_jobs x WHERE x.not_before > now() + interval '1 second'
      ORDER BY x.id FOR UPDATE SKIP LOCKED) r WHERE s.id = r.id;
SQL
cat > "$dir/stage_r.sql" <<'SQL'
SELECT count(*) FROM dispatch_policy.stage_many_outcomes('r', jsonb_build_array(
  jsonb_build_object('args', 1, 'context', jsonb_build_object('a', (random())::int), 'dedupe_key', 'k' || (random())::int, 'queue', 'r'),
  jsonb_build_object('args', 2, 'context', jsonb_build_object('a', (random())::int), 'dedupe_key', 'k' || (random())::int, 'queue', 'r')));
SQL
# A session holding the oldest staged job of 'r' a moment (as a replacing
# stager in an application's transaction would): ticks and stagers queue
# up on it.
cat > "$dir/hold_r.sql" <<'SQL'
BEGIN;
SELECT count(*) FROM (SELECT s.id FROM dispatch_policy.staged_jobs s WHERE s.policy = 'r' ORDER BY s.id LIMIT 1 FOR UPDATE) x;
SELECT pg_sleep(0.02);
COMMIT;
SQL

before=$("${psql[@]}" -d $db -At -c "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
pgbench -n -c "$clients" -j 2 -T "$seconds" --failures-detailed --verbose-errors \
  -f "$dir/tick_f.sql@4" -f "$dir/tick_r.sql@4" -f "$dir/fail.sql@4" -f "$dir/defer.sql@2" -f "$dir/reap.sql@1" \
  -f "$dir/stage_r.sql@4" -f "$dir/hold_r.sql@3" $db > "$dir/pgbench.out" 2>&1 || true
sleep 1  # the clients' statistics reach pg_stat_database as they exit
grep -E "^number of (transactions actually processed|failed transactions)" "$dir/pgbench.out" | sed 's/^/  /'
server=$("${psql[@]}" -d $db -At -c "SELECT deadlocks - $before FROM pg_stat_database WHERE datname = current_database()")
failures=$(sed -n 's/^number of deadlock failures: \([0-9]*\).*/\1/p' "$dir/pgbench.out")
said=$(grep -c "deadlock detected" "$dir/pgbench.out" || true)
other=$(grep -E "ERROR|error:" "$dir/pgbench.out" | grep -v -c "deadlock detected" || true)
grep -E "ERROR|error:|DETAIL|CONTEXT" "$dir/pgbench.out" | sort | uniq -c | sort -rn | head -8 | sed 's/^/  /' || true
failed=$("${psql[@]}" -d $db -At -c "SELECT count(*) FROM dispatch_policy.job_failures")
echo "deadlocks: server $server, pgbench failures ${failures:-?}, reported $said; other errors: $other; failures recorded: $failed"
"${psql[@]}" -d postgres -c "DROP DATABASE $db" 2>/dev/null
if [ "$server" != 0 ] || [ "${failures:-1}" != 0 ] || [ "$said" != 0 ] || [ "$other" != 0 ]; then
  echo "FAILED"
  exit 1
fi
echo "OK: no deadlock among ticks, fail, defer, the reaper and replacing stagers"
