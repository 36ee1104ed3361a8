#!/usr/bin/env bash
# Upgrades a 0.1.0 schema to the newest (every later migration in one
# transaction, as "dispatch-policy migrate" and ALTER EXTENSION UPDATE do)
# while pgbench clients stage, admit, complete and fail jobs through the
# 0.1.0 API, then checks that the counters the upgrade backfilled (0016's
# history) plus what its triggers recorded equal the job tables: no row
# lost or counted twice by a writer committing during the upgrade.
#
#   PGHOST=... PGPORT=... PGUSER=... sql/test/race/migration_race.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
db=dispatch_policy_migration_race
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
source sql/test/race/lib.sh
race_database $db 0007
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
cat $(ls Migrations/*.sql | awk -F/ '$2 >= "0007"') | "${psql[@]}" -d $db -1 >/dev/null
echo "upgrade applied under load"
# A call parsed just before the upgrade commits and run just after may find
# a function the upgrade dropped and created again ("cache lookup failed
# for function", XX000: PostgreSQL does not lock functions in use); pgbench
# stops such a client. That one error is expected of an online upgrade (the
# README says so; runners and workers retry), any other is not.
if ! wait $bench; then
  if grep -E "aborted" "$dir/pgbench.out" | grep -vq "cache lookup failed for function"; then
    grep -E "error|aborted" "$dir/pgbench.out" | head -5
    exit 1
  fi
  echo "clients stopped by a call racing the upgrade's commit: $(grep -c 'cache lookup failed' "$dir/pgbench.out")"
fi
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
