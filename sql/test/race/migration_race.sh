#!/usr/bin/env bash
# Applies Migrations/0016_history.sql (in one transaction, as
# "dispatch-policy migrate" does) while pgbench clients stage, admit,
# complete and fail jobs, then checks that the counters it backfilled plus
# what its triggers recorded equal the job tables: no row lost or counted
# twice by a writer committing during the migration.
#
#   PGHOST=... PGPORT=... PGUSER=... sql/test/race/migration_race.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
db=dispatch_policy_migration_race
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
psql=(psql -X -q -v ON_ERROR_STOP=1)
"${psql[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" 2>/dev/null
for f in Migrations/*.sql; do
  [[ $(basename "$f") < 0016 ]] && "${psql[@]}" -d $db -1 -f "$f" >/dev/null
done
"${psql[@]}" -d $db -c "SELECT dispatch_policy.declare_policy('m', '{\"max_attempts\": 2}')" >/dev/null
cat > "$dir/stage.sql" <<'SQL'
SELECT dispatch_policy.stage_many('m', '[{"args": 1}, {"args": 2}, {"args": 3, "not_before": "2999-01-01T00:00:00Z"}]');
SQL
cat > "$dir/admit.sql" <<'SQL'
SELECT dispatch_policy.admit('m', (
  SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id)), '[]')
  FROM (SELECT j.id FROM dispatch_policy.staged_jobs j WHERE j.policy = 'm' AND j.not_before IS NULL
        ORDER BY j.id LIMIT 5 FOR UPDATE SKIP LOCKED) s));
SQL
cat > "$dir/finish.sql" <<'SQL'
SELECT dispatch_policy.complete(c.id) FROM dispatch_policy.claim('default', 'w', 1) c;
SELECT dispatch_policy.fail(c.id, 'x') FROM dispatch_policy.claim('default', 'w', 1) c;
SQL
pgbench -n -d $db -c 4 -j 2 -T 12 -f "$dir/stage.sql@3" -f "$dir/admit.sql@2" -f "$dir/finish.sql@2" \
  > "$dir/pgbench.out" 2>&1 &
bench=$!
sleep 4
"${psql[@]}" -d $db -1 -f Migrations/0016_history.sql >/dev/null
echo "migration applied under load"
wait $bench || { cat "$dir/pgbench.out"; exit 1; }
grep -E "processed|failed transactions" "$dir/pgbench.out"
"${psql[@]}" -d $db -At <<'SQL' | tee "$dir/check.out"
SELECT format('pending %s/%s scheduled %s/%s in_flight %s/%s dead %s/%s -> %s', o.pending, t.pending, o.scheduled, t.scheduled,
              o.in_flight, t.in_flight, o.dead, t.dead,
              CASE WHEN (o.pending, o.scheduled, o.in_flight, o.dead) = (t.pending, t.scheduled, t.in_flight, t.dead)
                   THEN 'EXACT' ELSE 'WRONG' END)
FROM dispatch_policy.policy_overview o,
     LATERAL (SELECT (SELECT count(*) FROM dispatch_policy.staged_jobs WHERE not_before IS NULL OR not_before <= now()) AS pending,
                     (SELECT count(*) FROM dispatch_policy.staged_jobs WHERE not_before > now()) AS scheduled,
                     (SELECT count(*) FROM dispatch_policy.admitted_jobs) AS in_flight,
                     (SELECT count(*) FROM dispatch_policy.finished_jobs WHERE status = 'dead') AS dead) t;
SQL
! grep -q WRONG "$dir/check.out"
