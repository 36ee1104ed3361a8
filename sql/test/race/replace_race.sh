#!/usr/bin/env bash
# Races stagers that replace and drop staged jobs against ticks made as a
# runner makes them (tick_begin, then tick_finish in the next transaction,
# with the partitions computed from the contexts tick_begin returned), and
# workers completing (migration 0026):
#   * policy 'rep': dedupe_mode replace over 4 keys whose context moves the
#     job between 3 accounts, and jobs without a key;
#     max_pending_per_partition 2 with drop_oldest (drops fetched jobs); a
#     concurrency gate of 2 per account;
#   * an auditor records, while it runs, any account with more admitted
#     jobs than its cap (by the job's context, not the partition stored)
#     and any admitted job whose stored partition is not its context's.
# Then checks: no tick failed, no over-cap sighting, no partition mismatch,
# check() clean (EXACT or WRONG).
#
#   PGHOST=... PGPORT=... PGUSER=... sql/test/race/replace_race.sh [seconds]
#
# Builds its own database from Migrations/ with psql (uses and drops
# dispatch_policy_replace_race).
set -euo pipefail
cd "$(dirname "$0")/../../.."
seconds=${1:-12}
db=dispatch_policy_replace_race
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
source sql/test/race/lib.sh
race_database $db
"${psql[@]}" -d $db >/dev/null <<'SQL'
SELECT dispatch_policy.declare_policy('rep', '{"dedupe_mode": "replace", "round_robin_by": "{acct}",
  "max_pending_per_partition": 2, "on_overflow": "drop_oldest",
  "gates": [{"type": "concurrency", "name": "per_acct", "max": 2, "partition_by": "{acct}"}]}');
CREATE TABLE fetched (id bigint, context jsonb, config jsonb, at timestamptz);
CREATE TABLE sightings (what text, n bigint, at timestamptz DEFAULT clock_timestamp());
-- tick_begin, keeping what it returned (the runner's memory).
CREATE FUNCTION begin_tick() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  r record;
  cfg jsonb;
  at timestamptz;
BEGIN
  DELETE FROM fetched;
  FOR r IN SELECT * FROM dispatch_policy.tick_begin('rep', 50, 10) LOOP
    IF r.kind = 'tick' THEN
      cfg := r.config::jsonb;
      at := r.now;
    ELSIF r.kind = 'job' THEN
      INSERT INTO fetched VALUES (r.id, r.context::jsonb, cfg, at);
    END IF;
  END LOOP;
  RETURN (SELECT count(*) FROM fetched);
END
$$;
-- The decision from what was fetched (counters read now, as tick_state
-- does; first come first served within each account's room), and
-- tick_finish.
CREATE FUNCTION finish_tick() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  at timestamptz := (SELECT max(f.at) FROM fetched f);
  ids bigint[];
  parts text[];
BEGIN
  IF current_setting('dispatch_policy.tick_locked', true) IS DISTINCT FROM 'rep' THEN
    RETURN 0;
  END IF;
  SELECT coalesce(array_agg(x.id ORDER BY x.id), '{}'), coalesce(array_agg(x.p ORDER BY x.id), '{}') INTO ids, parts
  FROM (SELECT f.id, f.context ->> 'acct' AS p,
               row_number() OVER (PARTITION BY f.context ->> 'acct' ORDER BY f.id) AS n
        FROM fetched f) x
  WHERE x.n <= 2 - coalesce((SELECT c.in_flight FROM dispatch_policy.inflight_counters c
                             WHERE c.policy = 'rep' AND c.gate = 'per_acct' AND c.partition = x.p), 0);
  RETURN dispatch_policy.tick_finish('rep', at, ids, ARRAY['per_acct'], parts, '{}', '{}', '{}');
END
$$;
SQL

cat > "$dir/tick.sql" <<'SQL'
SELECT begin_tick();
SELECT finish_tick();
SQL
cat > "$dir/stage.sql" <<'SQL'
SELECT outcome FROM dispatch_policy.stage_outcome('rep', '1', jsonb_build_object('acct', (random() * 2)::int),
                                                  dedupe_key => 'k' || (random() * 3)::int);
SELECT dispatch_policy.stage('rep', '2', jsonb_build_object('acct', (random() * 2)::int));
SQL
cat > "$dir/work.sql" <<'SQL'
INSERT INTO sightings
SELECT 'over cap', count(*) FROM dispatch_policy.admitted_jobs a WHERE a.policy = 'rep'
GROUP BY a.context ->> 'acct' HAVING count(*) > 2;
INSERT INTO sightings
SELECT 'partition mismatch', count(*) FROM dispatch_policy.admitted_jobs a
WHERE a.policy = 'rep' AND a.partitions ->> 'per_acct' IS DISTINCT FROM a.context ->> 'acct' HAVING count(*) > 0;
WITH c AS (SELECT id, attempt FROM dispatch_policy.claim('default', 'w', 2))
SELECT * FROM dispatch_policy.complete_many(ARRAY(SELECT id FROM c ORDER BY id), ARRAY(SELECT attempt FROM c ORDER BY id));
SQL

pgbench -n -c 1 -T "$seconds" -f "$dir/tick.sql" $db > "$dir/tick.out" 2>&1 &
tick=$!
pgbench -n -c 2 -T "$seconds" -f "$dir/stage.sql" $db > "$dir/stage.out" 2>&1 &
stage=$!
pgbench -n -c 1 -T "$seconds" -f "$dir/work.sql" $db > "$dir/work.out" 2>&1 || true
wait $tick || true
wait $stage || true
for f in tick stage work; do
  echo "  $f: $(grep -E "^number of transactions actually processed|^number of failed" "$dir/$f.out" | tr '\n' ' ')"
done
errors=$(cat "$dir/tick.out" "$dir/stage.out" "$dir/work.out" | grep -c -E "ERROR|error:|aborted" || true)
grep -h -E "ERROR|error:" "$dir/tick.out" | head -3 | sed 's/^/  /' || true
result=$("${psql[@]}" -d $db -At <<'SQL'
SELECT format('sightings: %s over cap, %s partition mismatch; check(): %s findings; jobs: %s',
              (SELECT count(*) FROM sightings WHERE what = 'over cap'),
              (SELECT count(*) FROM sightings WHERE what = 'partition mismatch'),
              (SELECT count(*) FROM dispatch_policy.check()),
              (SELECT string_agg(x, ', ' ORDER BY x) FROM (
                 SELECT 'staged ' || count(*) AS x FROM dispatch_policy.staged_jobs
                 UNION ALL SELECT 'admitted ' || count(*) FROM dispatch_policy.admitted_jobs
                 UNION ALL SELECT f.status || ' ' || count(*) FROM dispatch_policy.finished_jobs f GROUP BY f.status) y));
SQL
)
echo "  $result; errors: $errors"
"${psql[@]}" -d postgres -c "DROP DATABASE $db" 2>/dev/null
if [ "$errors" != 0 ] || ! grep -q "sightings: 0 over cap, 0 partition mismatch; check(): 0 findings" <<<"$result"; then
  echo "FAILED"
  exit 1
fi
echo "OK: no tick failed, no cap exceeded, every admitted job counted where its context says, check() clean"
