#!/usr/bin/env bash
# A retry (fail) or a deferral (defer) of a job whose release unblocks a
# lane, racing a replacing stage_many on a capped policy (found by the
# second hostile pass on issue 12). The stager locks its lanes' backlog
# counters first and, replacing a job into lane X late in a long call,
# writes X's row of dispatch_policy.lanes; the retry released its slot
# (which unblocks lane X: a lanes row write) and then staged the job again
# (X's backlog counter). In opposite orders: a deadlock, every time. Every
# path now takes in-flight counters, then backlog counters, then lanes.
#
#   PGHOST=... PGPORT=... PGUSER=... sql/test/race/restage_lanes_race.sh
#
# Builds its own database from Migrations/ with psql (uses and drops
# dispatch_policy_restage_lanes_race). Exits 1 on a deadlock or any error.
set -euo pipefail
cd "$(dirname "$0")/../../.."
db=dispatch_policy_restage_lanes_race
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
source sql/test/race/lib.sh
race_database $db
failed=0
for call in "fail(1, 'boom', retry_in => '0'::interval, attempt => 1)" "defer(1, now() + interval '1 second', 'busy', attempt => 1)"; do
  "${psql[@]}" -d $db >/dev/null <<'SQL'
SELECT dispatch_policy.drop_policy('p', force => true) FROM dispatch_policy.policies WHERE name = 'p';
SELECT dispatch_policy.declare_policy('p', '{"round_robin_by": "{k}", "dedupe_mode": "replace", "max_pending_per_partition": 100000,
  "max_attempts": 10, "gates": [{"type": "concurrency", "name": "cc", "max": 1, "partition_by": "{k}"}]}');
SELECT dispatch_policy.stage('p', '1', '{"k": "X"}');
SELECT dispatch_policy.stage('p', '2', '{"k": "X"}');
-- Job 1 admitted and claimed; lane X blocked on its partition until a slot is released.
SELECT dispatch_policy.admit('p', (SELECT jsonb_agg(jsonb_build_object('id', s.id, 'partitions', s.partitions))
                                   FROM dispatch_policy.staged_jobs s WHERE s.args = '1'));
SELECT count(*) FROM dispatch_policy.claim('default', 'w', 1);
UPDATE dispatch_policy.lanes SET blocked_until = 'infinity', blocked_gate = 'cc', blocked_partition = 'X'
WHERE policy = 'p' AND lane = 'X';
SELECT dispatch_policy.stage('p', '3', '{"k": "Y"}', dedupe_key => 'r');
SQL
  id=$("${psql[@]}" -d $db -At -c "SELECT id FROM dispatch_policy.admitted_jobs WHERE policy = 'p'")
  before=$("${psql[@]}" -d $db -At -c "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
  # A long call (keys repeated: one job at a time), whose last element moves
  # job 3 into lane X; the retry lands while it runs.
  "${psql[@]}" -d $db -c "SELECT count(*) FROM dispatch_policy.stage_many_outcomes('p',
      (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('k', 'Z'), 'dedupe_key', 'z' || (i % 4000)) ORDER BY i)
       FROM generate_series(1, 8000) i) || '[{\"args\": 0, \"context\": {\"k\": \"X\"}, \"dedupe_key\": \"r\"}]')" \
    > "$dir/stager.out" 2>&1 &
  stager=$!
  sleep 0.5
  "${psql[@]}" -d $db -c "SELECT * FROM dispatch_policy.${call/1,/$id,}" > "$dir/worker.out" 2>&1 || true
  wait $stager || true
  sleep 0.3
  after=$("${psql[@]}" -d $db -At -c "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
  problems=$("${psql[@]}" -d $db -At -c "SELECT count(*) FROM dispatch_policy.check()")
  echo "${call%%(*}: deadlocks $(( after - before )), check() findings $problems"
  if (( after > before )) || grep -q ERROR "$dir/stager.out" "$dir/worker.out" || (( problems > 0 )); then
    cat "$dir/stager.out" "$dir/worker.out"
    failed=1
  fi
done
(( failed == 0 )) || { echo FAILED; exit 1; }
echo "OK: no deadlock between a retry or a deferral and a replacing stager"
