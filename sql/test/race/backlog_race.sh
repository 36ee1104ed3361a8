#!/usr/bin/env bash
# Races stagers of capped policies (max_pending_per_partition, migration
# 0023) against each other and against ticks, workers and expiry, then
# checks that every partition's backlog counter equals its staged jobs
# (EXACT or WRONG), that no partition of 'rej' holds more than its cap (in
# 'drop', retries may come back over it), and that nothing deadlocked:
#   * policy 'rej': cap 3, on_overflow reject; stage_many of 3 jobs over
#     random partitions (DP002 refusals are expected and counted), stage;
#   * policy 'drop': cap 3, on_overflow drop_oldest, dedupe_mode replace,
#     max_wait 1 s; stage_many with keys (replaces move jobs between
#     partitions), stage;
#   * ticks (promote_scheduled and fetch_batch, which expires, then admit), workers
#     completing and failing (retries come back with their deadline);
#   * repair(), which waits for the ticks and stagers of both policies and
#     must find nothing to change (a change would be a backlog counted
#     wrongly under load, or repair recounting while a stager stages); at
#     the end check() must find nothing either.
#
#   PGHOST=... PGPORT=... PGUSER=... sql/test/race/backlog_race.sh [seconds] [clients]
#
# Builds its own database from Migrations/ with psql (uses and drops
# dispatch_policy_backlog_race).
set -euo pipefail
cd "$(dirname "$0")/../../.."
seconds=${1:-20}
clients=${2:-8}
db=dispatch_policy_backlog_race
dir=$(mktemp -d)
trap 'cp "$dir/pgbench.out" /tmp/backlog_race_pgbench.out 2>/dev/null; rm -rf "$dir"' EXIT
source sql/test/race/lib.sh
race_database $db
"${psql[@]}" -d $db >/dev/null <<'SQL'
-- rej: no retries (max_attempts 1), so that nothing but staging adds to
-- its partitions and the cap must hold exactly (a retry or a deferral
-- re-stages an accepted job, which no cap refuses).
SELECT dispatch_policy.declare_policy('rej', '{"round_robin_by": "{a}", "max_pending_per_partition": 3, "max_attempts": 1}');
SELECT dispatch_policy.declare_policy('drop', '{"round_robin_by": "{a}", "max_pending_per_partition": 3,
  "on_overflow": "drop_oldest", "dedupe_mode": "replace", "max_wait": 1, "max_attempts": 3}');
-- A refusal (DP002) is expected: counted here, so that pgbench's client
-- goes on (it stops at an error).
CREATE TABLE refusals (n bigint NOT NULL);
CREATE TABLE repaired (finding text, policy text, partition_key text, action text);
CREATE FUNCTION try_stage(jobs jsonb) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM dispatch_policy.stage_many('rej', jobs);
EXCEPTION WHEN SQLSTATE 'DP002' THEN
  INSERT INTO refusals VALUES (1);
END
$$;
SQL

cat > "$dir/stage_rej.sql" <<'SQL'
SELECT try_stage(jsonb_build_array(
  jsonb_build_object('args', 1, 'context', jsonb_build_object('a', (random() * 4)::int)),
  jsonb_build_object('args', 2, 'context', jsonb_build_object('a', (random() * 4)::int)),
  jsonb_build_object('args', 3, 'context', jsonb_build_object('a', (random() * 4)::int))));
SQL
cat > "$dir/stage_one.sql" <<'SQL'
SELECT try_stage(jsonb_build_array(jsonb_build_object('args', 4, 'context', jsonb_build_object('a', (random() * 4)::int))));
SQL
cat > "$dir/stage_drop.sql" <<'SQL'
SELECT count(*) FROM dispatch_policy.stage_many_outcomes('drop', jsonb_build_array(
  jsonb_build_object('args', 1, 'context', jsonb_build_object('a', (random() * 4)::int), 'dedupe_key', 'k' || (random() * 6)::int),
  jsonb_build_object('args', 2, 'context', jsonb_build_object('a', (random() * 4)::int)),
  jsonb_build_object('args', 3, 'context', jsonb_build_object('a', (random() * 4)::int), 'dedupe_key', 'k' || (random() * 6)::int)));
SELECT dispatch_policy.stage('drop', '4', jsonb_build_object('a', (random() * 4)::int));
SQL
# A tick's writes as a runner makes them: promote_scheduled and fetch_batch
# (which expires) in one transaction (tick_begin's), admission in the next (tick_finish's),
# each under the policy's tick lock (two ticks of one policy never overlap).
cat > "$dir/admit.sql" <<'SQL'
BEGIN;
SELECT pg_advisory_xact_lock(dispatch_policy._tick_lock_key('drop'));
SELECT dispatch_policy.promote_scheduled('drop', 20);
SELECT count(*) FROM dispatch_policy.fetch_batch('drop', 20);
COMMIT;
BEGIN;
SELECT pg_advisory_xact_lock(dispatch_policy._tick_lock_key('rej'));
SELECT dispatch_policy.promote_scheduled('rej', 20);
SELECT count(*) FROM dispatch_policy.fetch_batch('rej', 20);
COMMIT;
BEGIN;
SELECT pg_advisory_xact_lock(dispatch_policy._tick_lock_key(p)) FROM unnest(ARRAY['drop', 'rej']) AS p;
SELECT dispatch_policy.admit(p, (
  SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'partitions', '{}'::jsonb)), '[]')
  FROM (SELECT j.id FROM dispatch_policy.staged_jobs j WHERE j.policy = p AND j.not_before IS NULL
        ORDER BY j.id LIMIT 3 FOR UPDATE SKIP LOCKED) s))
FROM unnest(ARRAY['drop', 'rej']) AS p;
COMMIT;
SQL
cat > "$dir/finish.sql" <<'SQL'
WITH c AS (SELECT id, attempt FROM dispatch_policy.claim('default', 'w', 5))
SELECT * FROM dispatch_policy.complete_many(ARRAY(SELECT id FROM c ORDER BY id), ARRAY(SELECT attempt FROM c ORDER BY id));
SELECT dispatch_policy.fail(c.id, 'boom', interval '0 seconds', attempt => c.attempt) FROM dispatch_policy.claim('default', 'w', 1) c;
SQL
cat > "$dir/repair.sql" <<'SQL'
INSERT INTO repaired SELECT r.finding, r.policy, r.partition_key, r.action FROM dispatch_policy.repair() r;
SQL

pgbench -n -c "$clients" -j 2 -T "$seconds" --failures-detailed \
  -f "$dir/stage_rej.sql@3" -f "$dir/stage_one.sql@2" -f "$dir/stage_drop.sql@3" -f "$dir/admit.sql@2" -f "$dir/finish.sql@1" -f "$dir/repair.sql@1" \
  $db > "$dir/pgbench.out" 2>&1 || true
grep -E "processed|failed|retried" "$dir/pgbench.out" | sed 's/^/  /'
refused=$("${psql[@]}" -d $db -At -c "SELECT count(*) FROM refusals")
deadlocks=$(sed -n 's/^number of deadlock failures: \([0-9]*\).*/\1/p' "$dir/pgbench.out")
other=$(grep -E "ERROR|error:" "$dir/pgbench.out" | grep -v -c "deadlock detected" || true)
echo "DP002 refusals: $refused; deadlocks: $deadlocks; other errors: $other"

result=$("${psql[@]}" -d $db -At <<'SQL'
WITH truth AS (
  SELECT s.policy, s.round_robin_key AS lane, count(*) AS staged FROM dispatch_policy.staged_jobs s GROUP BY 1, 2
), said AS (
  SELECT c.policy, c.lane, c.staged FROM dispatch_policy.backlog_counters c
)
SELECT format('%s: %s partitions, %s wrong counts, %s over the cap -> %s', p.name,
              count(*), count(*) FILTER (WHERE coalesce(s.staged, 0) <> coalesce(t.staged, 0)),
              count(*) FILTER (WHERE coalesce(t.staged, 0) > 3),
              CASE WHEN count(*) FILTER (WHERE coalesce(s.staged, 0) <> coalesce(t.staged, 0)
                                           OR (p.name = 'rej' AND coalesce(t.staged, 0) > 3)) = 0
                   THEN 'EXACT' ELSE 'WRONG' END)
FROM dispatch_policy.policies p
JOIN (SELECT policy, lane FROM truth UNION SELECT policy, lane FROM said) k ON k.policy = p.name
LEFT JOIN truth t ON t.policy = k.policy AND t.lane IS NOT DISTINCT FROM k.lane
LEFT JOIN said s ON s.policy = k.policy AND s.lane IS NOT DISTINCT FROM k.lane
GROUP BY p.name ORDER BY 1;
SELECT format('repair() changed %s, check() finds %s -> %s', r.n, c.n,
              CASE WHEN r.n = 0 AND c.n = 0 THEN 'EXACT' ELSE 'WRONG' END)
FROM (SELECT count(*) AS n FROM repaired) r, (SELECT count(*) AS n FROM dispatch_policy.check()) c;
SELECT format('repaired: %s %s %s: %s', finding, policy, partition_key, action) FROM repaired LIMIT 5;
SELECT format('finished: %s', string_agg(x, ', ' ORDER BY x)) FROM (
  SELECT f.policy || ' ' || f.status || ' ' || count(*) AS x FROM dispatch_policy.finished_jobs f GROUP BY f.policy, f.status) y;
SQL
)
echo "$result"
"${psql[@]}" -d postgres -c "DROP DATABASE $db" 2>/dev/null
if grep -q WRONG <<<"$result" || [ "$deadlocks" != 0 ] || [ "$other" != 0 ]; then
  echo "FAILED"
  exit 1
fi
echo "OK: every backlog counter exact (repair() and check() agree), no partition over its cap, no deadlock"
