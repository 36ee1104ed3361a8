#!/usr/bin/env bash
# Races every writer of staged_jobs against migration 0020 and then against
# each other, and checks that the pending count of every gate partition
# (partition_pending, partition_counters plus the unfolded deltas) equals a
# brute-force count that renders every staged job's partitions, and that
# every staged job stores the partitions its policy's config renders.
#
#  1. Applies 0.1.0's migrations, then upgrades to the newest (every later
#     migration in one transaction, as "dispatch-policy migrate" does; 0020
#     backfills the partition counts) while pgbench clients stage through
#     the 0.1.0 API: the backfill and the triggers count each job exactly
#     once.
#  2. Several stagers (stage and stage_many, some in transactions that stay
#     open a moment), admissions (promote_scheduled
#     and admit, as a tick does), completions, failures, the reaper, cancel
#     and drain, a DBA's UPDATE of a job's context, folds, prune, and
#     redeclares that switch a partitioned gate's template back and forth,
#     all at once for some seconds; checked before and after a final fold.
#
#   PGHOST=... PGPORT=... PGUSER=... sql/test/race/partition_race.sh [seconds] [clients]
#
# Builds its own database from Migrations/ with psql (uses and drops
# dispatch_policy_partition_race). pg_regress runs one session, so this
# lives outside it.
set -euo pipefail
cd "$(dirname "$0")/../../.."
seconds=${1:-20}
clients=${2:-8}
db=dispatch_policy_partition_race
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
source sql/test/race/lib.sh
race_database $db 0007
"${psql[@]}" -d $db >/dev/null <<'SQL'
SELECT dispatch_policy.declare_policy('r', '{"gates": [
  {"type": "throttle", "name": "t", "rate": 1000000, "per": 1, "partition_by": "{a}"},
  {"type": "concurrency", "name": "c", "max": 1000000, "partition_by": "acct:{b}"},
  {"type": "adaptive_concurrency", "name": "ad", "partition_by": "{a}/{b}", "target_lag_ms": 1000}],
  "max_attempts": 3}');
SELECT dispatch_policy.declare_policy('s', '{}');
SQL

# The check: one line per policy and gate, EXACT or WRONG.
check() {
  "${psql[@]}" -d $db -At <<'SQL'
WITH truth AS (
  SELECT s.policy, k.key AS gate, k.value AS partition, count(*) AS pending
  FROM dispatch_policy.staged_jobs s
  JOIN dispatch_policy.policies p ON p.name = s.policy
  CROSS JOIN LATERAL jsonb_each_text(dispatch_policy._gate_partitions(p.config, s.context)) AS k
  WHERE dispatch_policy._partitioned_gate(p.config, k.key) IS NOT NULL
  GROUP BY 1, 2, 3
), known AS (
  SELECT policy, gate, partition FROM truth
  UNION SELECT policy, gate, partition FROM dispatch_policy.partition_counters
  UNION SELECT policy, gate, partition FROM dispatch_policy.stat_deltas WHERE gate <> '' AND d_pending <> 0
), asked AS (
  SELECT k.policy, k.gate, array_agg(k.partition) AS parts FROM known k
  JOIN dispatch_policy.policies p ON p.name = k.policy
  WHERE dispatch_policy._partitioned_gate(p.config, k.gate) IS NOT NULL
  GROUP BY 1, 2
), said AS (
  SELECT a.policy, a.gate, r.partition, r.pending FROM asked a,
  LATERAL dispatch_policy.partition_pending(a.policy, a.gate, a.parts) r
), stray AS (
  -- Counts left on gates that are no partitioned gate of their policy now.
  SELECT coalesce(sum(x.n), 0) AS n
  FROM (SELECT c.policy, c.gate, c.pending AS n FROM dispatch_policy.partition_counters c
        UNION ALL SELECT d.policy, d.gate, d.d_pending FROM dispatch_policy.stat_deltas d WHERE d.gate <> '') x
  LEFT JOIN dispatch_policy.policies p ON p.name = x.policy
  WHERE p.name IS NULL OR dispatch_policy._partitioned_gate(p.config, x.gate) IS NULL
), stored AS (
  SELECT count(*) FILTER (WHERE s.partitions IS DISTINCT FROM (
           SELECT coalesce(jsonb_object_agg(k.key, k.value), '{}'::jsonb)
           FROM jsonb_each_text(dispatch_policy._gate_partitions(p.config, s.context)) AS k
           WHERE dispatch_policy._partitioned_gate(p.config, k.key) IS NOT NULL)) AS wrong
  FROM dispatch_policy.staged_jobs s JOIN dispatch_policy.policies p ON p.name = s.policy
)
SELECT format('%s.%s: %s partitions, %s jobs, %s wrong counts -> %s', g.policy, g.gate, g.partitions, g.jobs, g.wrong,
              CASE WHEN g.wrong = 0 THEN 'EXACT' ELSE 'WRONG' END)
FROM (SELECT policy, gate, count(t.pending) AS partitions, coalesce(sum(t.pending), 0) AS jobs,
             count(*) FILTER (WHERE coalesce(s.pending, -1) <> coalesce(t.pending, 0)) AS wrong
      FROM said s FULL JOIN truth t USING (policy, gate, partition)
      GROUP BY 1, 2) g
UNION ALL
SELECT format('counts on gates no longer partitioned: %s -> %s', n, CASE WHEN n = 0 THEN 'EXACT' ELSE 'WRONG' END) FROM stray
UNION ALL
SELECT format('staged jobs storing other partitions than their config renders: %s -> %s', wrong,
              CASE WHEN wrong = 0 THEN 'EXACT' ELSE 'WRONG' END) FROM stored
ORDER BY 1;
SQL
}

cat > "$dir/stage.sql" <<'SQL'
SELECT dispatch_policy.stage_many(CASE WHEN random() < 0.8 THEN 'r' ELSE 's' END,
  jsonb_build_array(jsonb_build_object('args', 1, 'context', jsonb_build_object('a', (random() * 5)::int, 'b', (random() * 3)::int)),
                    jsonb_build_object('args', 2, 'context', jsonb_build_object('a', (random() * 5)::int)),
                    jsonb_build_object('args', 3, 'context', jsonb_build_object('b', 'x'), 'not_before', now() + interval '1 second')));
SELECT dispatch_policy.stage('r', '4', jsonb_build_object('a', (random() * 5)::int, 'b', (random() * 3)::int));
SQL
# A tick's writes: promote, then admit what it fetched (its partitions as the
# runner computes them).
cat > "$dir/admit.sql" <<'SQL'
BEGIN;
SELECT dispatch_policy.promote_scheduled('r', 20);
SELECT dispatch_policy.admit('r', (
  SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'partitions', dispatch_policy._gate_partitions(p.config, s.context))), '[]')
  FROM (SELECT j.id, j.context FROM dispatch_policy.staged_jobs j WHERE j.policy = 'r' AND j.not_before IS NULL
        ORDER BY j.id LIMIT 7 FOR UPDATE SKIP LOCKED) s,
       dispatch_policy.policies p WHERE p.name = 'r'));
COMMIT;
SQL
cat > "$dir/finish.sql" <<'SQL'
WITH c AS (SELECT id, attempt FROM dispatch_policy.claim('default', 'w', 10))
SELECT * FROM dispatch_policy.complete_many(ARRAY(SELECT id FROM c ORDER BY id), ARRAY(SELECT attempt FROM c ORDER BY id));
SELECT dispatch_policy.fail(c.id, 'boom', interval '0 seconds', attempt => c.attempt) FROM dispatch_policy.claim('default', 'w', 1) c;
SQL

# 1. The upgrade under load (stagers of 0.1.0's API).
pgbench -n -c 4 -j 2 -T 12 -f "$dir/stage.sql" $db > "$dir/pgbench.out" 2>&1 &
bench=$!
sleep 4
cat $(ls Migrations/*.sql | awk -F/ '$2 >= "0007"') | "${psql[@]}" -d $db -1 >/dev/null
echo "upgrade applied under load"
wait $bench || { grep -E "error|aborted" "$dir/pgbench.out" | head -5; exit 1; }
grep -E "processed|failed transactions" "$dir/pgbench.out"
check | tee "$dir/check1.out"

# 2. Everything at once.
cat > "$dir/reap.sql" <<'SQL'
SELECT dispatch_policy.reap_leases('r', now() + interval '2 hours', 2);
SQL
# A job picked may be admitted before cancel gets the tick lock (55000).
cat > "$dir/cancel.sql" <<'SQL'
DO $$
BEGIN
  PERFORM dispatch_policy.cancel(id) FROM dispatch_policy.staged_jobs WHERE policy = 'r' ORDER BY random() LIMIT 1;
EXCEPTION WHEN object_not_in_prerequisite_state THEN
  NULL;
END
$$;
SELECT dispatch_policy.drain('r', (SELECT g FROM dispatch_policy.policies p, unnest(p.partition_gates) AS g
                                   WHERE p.name = 'r' AND g LIKE 't%'), ((random() * 5)::int)::text, 3);
SQL
cat > "$dir/dba.sql" <<'SQL'
UPDATE dispatch_policy.staged_jobs SET context = context || jsonb_build_object('b', (random() * 3)::int) WHERE id IN (
  SELECT id FROM dispatch_policy.staged_jobs WHERE policy = 'r' ORDER BY random() LIMIT 2 FOR UPDATE SKIP LOCKED);
DELETE FROM dispatch_policy.staged_jobs WHERE id IN (
  SELECT id FROM dispatch_policy.staged_jobs WHERE policy = 's' ORDER BY id DESC LIMIT 2 FOR UPDATE SKIP LOCKED);
SQL
# A redeclare that switches the concurrency gate's template (or renames the
# throttle), so that every staged job of 'r' is rendered again.
cat > "$dir/redeclare.sql" <<'SQL'
SELECT dispatch_policy.declare_policy('r', jsonb_build_object('gates', jsonb_build_array(
  jsonb_build_object('type', 'throttle', 'name', CASE WHEN random() < 0.5 THEN 't' ELSE 't2' END, 'rate', 1000000, 'per', 1,
                     'partition_by', '{a}'),
  jsonb_build_object('type', 'concurrency', 'name', 'c', 'max', 1000000,
                     'partition_by', CASE WHEN random() < 0.5 THEN 'acct:{b}' ELSE 'b={b}' END),
  jsonb_build_object('type', 'adaptive_concurrency', 'name', 'ad', 'partition_by', '{a}/{b}', 'target_lag_ms', 1000)),
  'max_attempts', 3));
SQL
# A stager whose transaction stays open a moment after it staged: a
# redeclare's re-render must not miss its job (it waits for it).
cat > "$dir/slow_stage.sql" <<'SQL'
BEGIN;
SELECT dispatch_policy.stage('r', '5', jsonb_build_object('a', (random() * 5)::int, 'b', (random() * 3)::int));
SELECT pg_sleep(random() * 0.2);
COMMIT;
SQL
# In any snapshot, every committed staged job stores what the committed
# config renders (a stager commits before a redeclare's re-render, which
# then sees it, or renders with the new templates): a job seen stale here
# fails the run.
cat > "$dir/stale.sql" <<'SQL'
DO $$
DECLARE
  stale bigint;
BEGIN
  SELECT count(*) INTO stale
  FROM dispatch_policy.staged_jobs s JOIN dispatch_policy.policies p ON p.name = s.policy
  WHERE s.partitions IS DISTINCT FROM (
          SELECT coalesce(jsonb_object_agg(k.key, k.value), '{}'::jsonb)
          FROM jsonb_each_text(dispatch_policy._gate_partitions(p.config, s.context)) AS k
          WHERE dispatch_policy._partitioned_gate(p.config, k.key) IS NOT NULL);
  IF stale > 0 THEN
    RAISE EXCEPTION 'STALE: % staged jobs store partitions their config does not render', stale;
  END IF;
END
$$;
SQL
cat > "$dir/fold.sql" <<'SQL'
SELECT dispatch_policy.fold_stats(max_rows => 25);
SQL
cat > "$dir/prune.sql" <<'SQL'
SELECT * FROM dispatch_policy.prune();
SQL
pgbench -n -c "$clients" -j 2 -T "$seconds" --max-tries=20 \
  -f "$dir/stage.sql@8" -f "$dir/slow_stage.sql@3" -f "$dir/admit.sql@5" -f "$dir/finish.sql@3" -f "$dir/reap.sql@1" -f "$dir/cancel.sql@1" \
  -f "$dir/dba.sql@1" -f "$dir/redeclare.sql@1" -f "$dir/fold.sql@3" -f "$dir/prune.sql@1" -f "$dir/stale.sql@2" $db > "$dir/pgbench2.out" 2>&1 || true
if grep -q STALE "$dir/pgbench2.out"; then grep -m1 STALE "$dir/pgbench2.out"; echo "stale partitions seen -> WRONG" > "$dir/check0.out"; fi
grep -E "^(number of|tps)|aborted|ERROR" "$dir/pgbench2.out" | sort | uniq -c | sort -rn | head -12
echo "deltas not folded: $("${psql[@]}" -d $db -At -c 'SELECT count(*) FROM dispatch_policy.stat_deltas')"
echo "-- before the final fold"; check | tee "$dir/check2.out"
"${psql[@]}" -d $db -At -c "SELECT 'folded ' || dispatch_policy.fold_stats(max_rows => 10000000) || ' delta rows'"
echo "-- after"; check | tee "$dir/check3.out"
if cat "$dir"/check*.out | grep -q WRONG; then echo "FAILED"; exit 1; fi
echo "OK: every partition's count exact"
