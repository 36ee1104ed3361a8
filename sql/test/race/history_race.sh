#!/usr/bin/env bash
# Races every writer of the job tables against concurrent fold_stats() calls
# (pgbench, several clients) and checks that the history counters are exact
# afterwards: policy_overview against counts of the job tables, before and
# after a final fold, and the per-minute event sums against the rows they
# count. pg_regress runs one session, so this lives outside it.
#
#   PGHOST=... PGPORT=... PGUSER=... sql/test/race/history_race.sh [seconds] [clients]
#
# Needs the extension installed (make -C sql install). Uses (and drops) the
# database dispatch_policy_history_race.
set -euo pipefail
seconds=${1:-20}
clients=${2:-8}
db=dispatch_policy_history_race
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
psql=(psql -X -q -v ON_ERROR_STOP=1)

"${psql[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
"${psql[@]}" -d $db <<'SQL'
CREATE EXTENSION dispatch_policy;
SELECT dispatch_policy.declare_policy('r', '{"gates": [{"type": "concurrency", "max": 1000000, "partition_by": "{a}"}], "max_attempts": 3}');
SELECT dispatch_policy.declare_policy('s', '{}');
SQL

cat > "$dir/stage.sql" <<'SQL'
SELECT dispatch_policy.stage_many(CASE WHEN random() < 0.8 THEN 'r' ELSE 's' END,
  jsonb_build_array(jsonb_build_object('args', 1, 'context', jsonb_build_object('a', (random() * 5)::int)),
                    jsonb_build_object('args', 2, 'context', jsonb_build_object('a', (random() * 5)::int)),
                    jsonb_build_object('args', 3, 'not_before', now() + interval '2 seconds')));
SELECT dispatch_policy.stage('r', '4', '{"a": 1}');
SQL
cat > "$dir/admit.sql" <<'SQL'
BEGIN;
SELECT dispatch_policy.promote_scheduled('r', 20);
SELECT dispatch_policy.admit('r', (
  SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'partitions', jsonb_build_object('concurrency', s.context ->> 'a'))), '[]')
  FROM (SELECT j.id, j.context FROM dispatch_policy.staged_jobs j WHERE j.policy = 'r' AND j.not_before IS NULL
        ORDER BY j.id LIMIT 7 FOR UPDATE SKIP LOCKED) s));
COMMIT;
SQL
cat > "$dir/complete.sql" <<'SQL'
WITH c AS (SELECT id, attempt FROM dispatch_policy.claim('default', 'w', 4))
SELECT * FROM dispatch_policy.complete_many(ARRAY(SELECT id FROM c ORDER BY id), ARRAY(SELECT attempt FROM c ORDER BY id));
SQL
cat > "$dir/fail.sql" <<'SQL'
SELECT dispatch_policy.fail(c.id, 'boom', interval '0 seconds', attempt => c.attempt) FROM dispatch_policy.claim('default', 'w', 1) c;
SQL
cat > "$dir/reap.sql" <<'SQL'
SELECT dispatch_policy.reap_leases('r', now() + interval '2 hours', 2);
SQL
cat > "$dir/dba.sql" <<'SQL'
DELETE FROM dispatch_policy.staged_jobs WHERE id IN (
  SELECT id FROM dispatch_policy.staged_jobs WHERE policy = 's' ORDER BY id DESC LIMIT 2 FOR UPDATE SKIP LOCKED);
UPDATE dispatch_policy.staged_jobs SET not_before = NULL WHERE id IN (
  SELECT id FROM dispatch_policy.staged_jobs WHERE policy = 's' AND not_before IS NOT NULL LIMIT 1 FOR UPDATE SKIP LOCKED);
SQL
cat > "$dir/fold.sql" <<'SQL'
SELECT dispatch_policy.fold_stats(max_rows => 25);
SQL
cat > "$dir/prune.sql" <<'SQL'
SELECT * FROM dispatch_policy.prune();
SQL

pgbench -n -d $db -c "$clients" -j 2 -T "$seconds" --max-tries=20 \
  -f "$dir/stage.sql@6" -f "$dir/admit.sql@4" -f "$dir/complete.sql@3" -f "$dir/fail.sql@1" -f "$dir/reap.sql@1" \
  -f "$dir/dba.sql@1" -f "$dir/fold.sql@3" -f "$dir/prune.sql@1" 2>&1 | grep -E "transactions|failed|retried|tps" || true

check() {
  "${psql[@]}" -d $db -At <<'SQL'
WITH truth AS (
  SELECT p.name AS policy,
    (SELECT count(*) FROM dispatch_policy.staged_jobs s WHERE s.policy = p.name AND (s.not_before IS NULL OR s.not_before <= now())) AS pending,
    (SELECT count(*) FROM dispatch_policy.staged_jobs s WHERE s.policy = p.name AND s.not_before > now()) AS scheduled,
    (SELECT count(*) FROM dispatch_policy.admitted_jobs a WHERE a.policy = p.name) AS in_flight,
    (SELECT count(*) FROM dispatch_policy.finished_jobs f WHERE f.policy = p.name AND f.status = 'dead') AS dead,
    (SELECT count(*) FROM dispatch_policy.finished_jobs f WHERE f.policy = p.name AND f.status = 'completed') AS completed,
    (SELECT count(*) FROM dispatch_policy.job_failures f WHERE f.policy = p.name) AS failed
  FROM dispatch_policy.policies p
), events AS (
  SELECT policy, sum(staged) AS staged, sum(admitted) AS admitted, sum(finished) AS finished, sum(completed) AS completed,
         sum(failed) AS failed, sum(dead) AS died
  FROM (SELECT policy, staged, admitted, finished, completed, failed, dead FROM dispatch_policy.stat_minutes WHERE gate = ''
        UNION ALL
        SELECT policy, staged, admitted, finished, completed, failed, dead FROM dispatch_policy.stat_deltas WHERE gate = '') x
  GROUP BY 1
)
SELECT format('%s: pending %s/%s scheduled %s/%s in_flight %s/%s dead %s/%s completed %s/%s failed %s/%s admitted=in_flight+finished %s deleted-by-dba %s -> %s',
              t.policy, o.pending, t.pending, o.scheduled, t.scheduled, o.in_flight, t.in_flight, o.dead, t.dead,
              e.completed, t.completed, e.failed, t.failed, e.admitted = t.in_flight + e.finished,
              e.staged - (t.pending + t.scheduled + t.in_flight + t.completed + t.dead),
              CASE WHEN (o.pending, o.scheduled, o.in_flight, o.dead, e.completed, e.failed, e.died)
                        = (t.pending, t.scheduled, t.in_flight, t.dead, t.completed, t.failed, t.dead)
                        AND e.admitted = t.in_flight + e.finished
                   THEN 'EXACT' ELSE 'WRONG' END)
FROM truth t JOIN dispatch_policy.policy_overview o USING (policy) LEFT JOIN events e USING (policy)
ORDER BY 1;
SQL
}
echo "deltas not folded: $("${psql[@]}" -d $db -At -c 'SELECT count(*) FROM dispatch_policy.stat_deltas')"
echo "-- before the final fold"; check
"${psql[@]}" -d $db -At -c "SELECT 'folded ' || dispatch_policy.fold_stats(max_rows => 10000000) || ' delta rows'"
echo "-- after"; check
if check | grep -q WRONG; then echo "FAILED"; exit 1; fi
echo "OK: every counter exact"
