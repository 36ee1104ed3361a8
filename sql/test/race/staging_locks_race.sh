#!/usr/bin/env bash
# Races stagers of policies with staging rules (0023) against what changes
# or holds those policies, and checks that nothing deadlocked and that no
# partition of a policy whose cap never changes went over its cap:
#   * policy 'redecl': max_pending_per_partition, redeclared in a loop by
#     one session (the cap taken away and given back in turns, its value
#     and on_overflow changed); stage and stage_many of 3 jobs over 4
#     partitions;
#   * policy 'rp': dedupe_mode replace, cap 5, drop_oldest; declared,
#     staged into and dropped with drop_policy(force => true) in a loop by
#     one session while stagers stage with keys (unknown-policy and DP002
#     refusals are expected and ignored);
#   * policy 'fixed': cap 2, drop_oldest, no retries; its ticks admit
#     (promote_scheduled, then admit, each under the tick lock) and one
#     session holds its oldest jobs a moment (SELECT ... FOR UPDATE), so a
#     stage's oldest jobs are often held; a sampler records any committed
#     state with a partition over 2.
#
#   PGHOST=... PGPORT=... PGUSER=... sql/test/race/staging_locks_race.sh [seconds] [stagers]
#
# Builds its own database from Migrations/ with psql (uses and drops
# dispatch_policy_staging_locks_race). Exits 1 on a deadlock, an unexpected
# error or a partition of 'fixed' seen over its cap.
set -euo pipefail
cd "$(dirname "$0")/../../.."
seconds=${1:-10}
stagers=${2:-4}
db=dispatch_policy_staging_locks_race
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
source sql/test/race/lib.sh
race_database $db
"${psql[@]}" -d $db >/dev/null <<'SQL'
SELECT dispatch_policy.declare_policy('redecl', '{"round_robin_by": "{a}", "max_pending_per_partition": 50}');
SELECT dispatch_policy.declare_policy('rp', '{"round_robin_by": "{a}", "max_pending_per_partition": 5,
  "on_overflow": "drop_oldest", "dedupe_mode": "replace"}');
SELECT dispatch_policy.declare_policy('fixed', '{"round_robin_by": "{a}", "max_pending_per_partition": 2,
  "on_overflow": "drop_oldest", "max_attempts": 1}');
CREATE TABLE over_cap (seen_at timestamptz NOT NULL DEFAULT clock_timestamp(), lane text, staged bigint);
-- Refusals that are expected here (a policy being dropped, a full
-- partition under reject) end the call, not pgbench's client.
CREATE FUNCTION try_many(policy text, jobs jsonb) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM dispatch_policy.stage_many(policy, jobs);
EXCEPTION WHEN SQLSTATE '42704' OR SQLSTATE 'DP002' THEN
  NULL;
END
$$;
CREATE FUNCTION try_one(policy text, a integer, key text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM dispatch_policy.stage(policy, '1', jsonb_build_object('a', a), dedupe_key => key);
EXCEPTION WHEN SQLSTATE '42704' OR SQLSTATE 'DP002' THEN
  NULL;
END
$$;
SQL

cat > "$dir/stage_redecl.sql" <<'SQL'
SELECT try_many('redecl', jsonb_build_array(
  jsonb_build_object('args', 1, 'context', jsonb_build_object('a', (random() * 3)::int)),
  jsonb_build_object('args', 2, 'context', jsonb_build_object('a', (random() * 3)::int)),
  jsonb_build_object('args', 3, 'context', jsonb_build_object('a', (random() * 3)::int))));
SELECT try_one('redecl', (random() * 3)::int, NULL);
SQL
cat > "$dir/stage_rp.sql" <<'SQL'
SELECT try_many('rp', jsonb_build_array(
  jsonb_build_object('args', 1, 'context', jsonb_build_object('a', (random() * 3)::int), 'dedupe_key', 'k' || (random() * 6)::int),
  jsonb_build_object('args', 2, 'context', jsonb_build_object('a', (random() * 3)::int))));
SELECT try_one('rp', (random() * 3)::int, 'k' || (random() * 6)::int);
SQL
cat > "$dir/stage_fixed.sql" <<'SQL'
SELECT dispatch_policy.stage_many('fixed', jsonb_build_array(
  jsonb_build_object('args', 1, 'context', jsonb_build_object('a', (random() * 2)::int)),
  jsonb_build_object('args', 2, 'context', jsonb_build_object('a', (random() * 2)::int))));
SELECT dispatch_policy.stage('fixed', '3', jsonb_build_object('a', (random() * 2)::int));
SQL
cat > "$dir/declare.sql" <<'SQL'
-- The cap taken away and given back in turns (another value, another
-- on_overflow each time).
SELECT dispatch_policy.declare_policy('redecl', CASE
  WHEN (SELECT p.config ? 'max_pending_per_partition' FROM dispatch_policy.policies p WHERE p.name = 'redecl')
  THEN '{"round_robin_by": "{a}"}'::jsonb
  ELSE (ARRAY['{"round_robin_by": "{a}", "max_pending_per_partition": 50}',
              '{"round_robin_by": "{a}", "max_pending_per_partition": 40, "on_overflow": "drop_oldest"}',
              '{"round_robin_by": "{a}", "max_pending_per_partition": 30, "on_overflow": "drop_oldest", "dedupe_mode": "replace"}'])[1 + (random() * 2)::int]::jsonb
  END);
SELECT dispatch_policy.declare_policy('rp', '{"round_robin_by": "{a}", "max_pending_per_partition": 5,
  "on_overflow": "drop_oldest", "dedupe_mode": "replace"}');
SELECT pg_sleep(0.005);
SELECT dispatch_policy.drop_policy('rp', force => true);
SQL
# A tick's writes as a runner makes them (see backlog_race.sh), and a
# session that holds the oldest jobs of 'fixed' a moment.
cat > "$dir/tick.sql" <<'SQL'
BEGIN;
SELECT pg_advisory_xact_lock(dispatch_policy._tick_lock_key('fixed'));
SELECT dispatch_policy.promote_scheduled('fixed', 20);
COMMIT;
BEGIN;
SELECT pg_advisory_xact_lock(dispatch_policy._tick_lock_key('fixed'));
SELECT dispatch_policy.admit('fixed', (
  SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'partitions', '{}'::jsonb)), '[]')
  FROM (SELECT j.id FROM dispatch_policy.staged_jobs j WHERE j.policy = 'fixed' AND j.not_before IS NULL
        ORDER BY j.id LIMIT 2 FOR UPDATE SKIP LOCKED) s));
COMMIT;
BEGIN;
SELECT count(*) FROM (SELECT j.id FROM dispatch_policy.staged_jobs j WHERE j.policy = 'fixed'
                      ORDER BY j.id LIMIT 3 FOR UPDATE SKIP LOCKED) x;
SELECT pg_sleep(0.01);
COMMIT;
INSERT INTO over_cap (lane, staged)
SELECT s.round_robin_key, count(*) FROM dispatch_policy.staged_jobs s WHERE s.policy = 'fixed' GROUP BY 1 HAVING count(*) > 2;
SQL

run() { pgbench -n -T "$seconds" --failures-detailed "$@" $db; }
run -c "$stagers" -j 2 -f "$dir/stage_redecl.sql@3" -f "$dir/stage_rp.sql@3" -f "$dir/stage_fixed.sql@2" > "$dir/stage.out" 2>&1 &
run -c 1 -f "$dir/declare.sql" > "$dir/declare.out" 2>&1 &
run -c 1 -f "$dir/tick.sql" > "$dir/tick.out" 2>&1 &
wait
deadlocks=0
other=0
for who in stage declare tick; do
  n=$(sed -n 's/^number of deadlock failures: \([0-9]*\).*/\1/p' "$dir/$who.out")
  processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$dir/$who.out")
  e=$(grep -E "ERROR|error:|aborted" "$dir/$who.out" | grep -v -c "deadlock detected" || true)
  echo "  $who: ${processed:-?} transactions, ${n:-?} deadlocks, $e other errors"
  [ -n "$n" ] || { cat "$dir/$who.out"; e=$((e + 1)); n=0; }
  deadlocks=$((deadlocks + n))
  other=$((other + e))
  grep -E "ERROR|error:" "$dir/$who.out" | grep -v "deadlock detected" | sort | uniq -c | head -5 | sed 's/^/    /' || true
done
over=$("${psql[@]}" -d $db -At -c "SELECT count(*) FROM over_cap")
now_over=$("${psql[@]}" -d $db -At -c "SELECT count(*) FROM (SELECT 1 FROM dispatch_policy.staged_jobs s WHERE s.policy = 'fixed' GROUP BY s.round_robin_key HAVING count(*) > 2) x")
dropped=$("${psql[@]}" -d $db -At -c "SELECT count(*) FROM dispatch_policy.finished_jobs WHERE status = 'dropped'")
echo "deadlocks: $deadlocks; other errors: $other; 'fixed' over its cap: $over times sampled, $now_over partitions at the end; dropped jobs: $dropped"
"${psql[@]}" -d postgres -c "DROP DATABASE $db" 2>/dev/null
if [ "$deadlocks" != 0 ] || [ "$other" != 0 ] || [ "$over" != 0 ] || [ "$now_over" != 0 ]; then
  echo "FAILED"
  exit 1
fi
echo "OK: no deadlock, no partition over its cap"
