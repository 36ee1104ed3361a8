#!/usr/bin/env bash
# History that is cheap to read (issue 10): what policy_overview costs at a
# million pending jobs before (0008's view, which counts the jobs) and after
# (0016's, which reads counters), and what the history triggers add to
# staging. Self-contained: builds its own database from Migrations/ with psql.
#
#   PGHOST=... PGPORT=... PGUSER=... bench/history.sh [pending, default 1000000] [rounds, default 7]
#
# Prints a Markdown table. Every figure is a median over the rounds of
# server-side time (clock_timestamp() around the statement), and every ratio
# compares two things measured in the same run, interleaved round by round.
set -euo pipefail
cd "$(dirname "$0")/.."
PENDING=${1:-1000000}
ROUNDS=${2:-7}
DB=${HISTORY_BENCH_DB:-dispatch_policy_history_bench}
PSQL=(psql -X -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
for f in Migrations/*.sql; do "${PSQL[@]}" -d "$DB" -1 -f "$f" >/dev/null; done
q() { "${PSQL[@]}" -d "$DB" -At -c "$1"; }

"${PSQL[@]}" -d "$DB" >/dev/null <<'SQL'
CREATE SCHEMA bench;
-- 0008's policy_overview, as it was: it counts the policy's rows.
CREATE VIEW bench.old_policy_overview AS
SELECT
  p.name AS policy,
  (SELECT count(*) FROM dispatch_policy.staged_jobs s
    WHERE s.policy = p.name AND (s.not_before IS NULL OR s.not_before <= now())) AS pending,
  (SELECT count(*) FROM dispatch_policy.staged_jobs s
    WHERE s.policy = p.name AND s.not_before > now()) AS scheduled,
  (SELECT count(*) FROM dispatch_policy.admitted_jobs a
    WHERE a.policy = p.name) AS in_flight,
  (SELECT count(*) FROM dispatch_policy.finished_jobs f
    WHERE f.policy = p.name AND f.status = 'completed' AND f.finished_at > now() - interval '24 hours') AS completed_24h,
  (SELECT count(*) FROM dispatch_policy.job_failures jf
    WHERE jf.policy = p.name AND jf.failed_at > now() - interval '24 hours') AS failed_24h,
  (SELECT count(*) FROM dispatch_policy.finished_jobs f
    WHERE f.policy = p.name AND f.status = 'dead') AS dead,
  now() - (SELECT min(s.staged_at) FROM dispatch_policy.staged_jobs s
    WHERE s.policy = p.name AND (s.not_before IS NULL OR s.not_before <= now())) AS oldest_pending_age,
  p.paused,
  rf.first_failed_at AS failing_since,
  rf.failures AS tick_failures,
  rf.error AS last_error,
  rf.retry_at
FROM dispatch_policy.policies p
LEFT JOIN dispatch_policy.runner_failures rf ON rf.policy = p.name;

-- ms of one run of a query, every column of every row computed (a bare
-- count(*) would let the planner skip the view's scalar subqueries).
CREATE FUNCTION bench.ms(query text) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  EXECUTE 'SELECT sum(length(x::text)) FROM (' || query || ') x';
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
-- ms of one stage_many of n jobs (the array is built before the clock starts).
CREATE FUNCTION bench.stage_many_ms(policy text, n integer) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE jobs jsonb := (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('tenant', i % 100)))
                       FROM generate_series(1, n) i);
        t0 timestamptz;
BEGIN
  t0 := clock_timestamp();
  PERFORM dispatch_policy.stage_many(policy, jobs);
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
-- ms per call of n single-row stage() calls (each a statement of its own,
-- so each fires the statement trigger once).
CREATE FUNCTION bench.stage_one_ms(policy text, n integer) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  FOR i IN 1 .. n LOOP
    PERFORM dispatch_policy.stage(policy, to_jsonb(i), jsonb_build_object('tenant', i % 100));
  END LOOP;
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000 / n;
END $$;
CREATE FUNCTION bench.history_triggers(enable boolean) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  -- Insert and delete alike: the rows a run without it stages are deleted
  -- uncounted too, so the counters stay exact.
  EXECUTE format('ALTER TABLE dispatch_policy.staged_jobs %1$s TRIGGER staged_jobs_history_insert, %1$s TRIGGER staged_jobs_history_delete',
                 CASE WHEN enable THEN 'ENABLE' ELSE 'DISABLE' END);
END $$;
SELECT dispatch_policy.declare_policy('big', '{"round_robin_by": "{tenant}"}');
SELECT dispatch_policy.declare_policy('other', '{}');
SELECT dispatch_policy.declare_policy('staging', '{"round_robin_by": "{tenant}"}');
SQL

median() { sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.3f", m}'; }

# Staging cost with and without the history trigger, interleaved: ROUNDS x
# (stage_many of 10,000 jobs, and 1,000 stage() calls), each with the trigger
# and without, alternating which goes first.
: > /tmp/history_bench_many_on; : > /tmp/history_bench_many_off
: > /tmp/history_bench_one_on; : > /tmp/history_bench_one_off
for r in $(seq 1 "$ROUNDS"); do
  for mode in on off; do
    [[ $((r % 2)) == 0 ]] && mode=$([[ $mode == on ]] && echo off || echo on)
    q "SELECT bench.history_triggers($([[ $mode == on ]] && echo true || echo false))" >/dev/null
    q "SELECT bench.stage_many_ms('staging', 10000)" >> /tmp/history_bench_many_$mode
    q "SELECT bench.stage_one_ms('staging', 1000)" >> /tmp/history_bench_one_$mode
    q "DELETE FROM dispatch_policy.staged_jobs WHERE policy = 'staging'" >/dev/null
  done
done
q "SELECT bench.history_triggers(true); SELECT dispatch_policy.fold_stats()" >/dev/null
q "VACUUM dispatch_policy.staged_jobs" >/dev/null
many_on=$(median < /tmp/history_bench_many_on); many_off=$(median < /tmp/history_bench_many_off)
one_on=$(median < /tmp/history_bench_one_on); one_off=$(median < /tmp/history_bench_one_off)

# A million pending jobs in one policy, through stage_many in chunks of
# 10,000 (the triggers count them as they come), and a little of everything
# else so that no count is of an empty table.
t0=$(date +%s)
left=$PENDING
while (( left > 0 )); do
  n=$(( left < 10000 ? left : 10000 ))
  q "SELECT bench.stage_many_ms('big', $n)" >/dev/null
  left=$(( left - n ))
done
staged_s=$(( $(date +%s) - t0 ))
"${PSQL[@]}" -d "$DB" >/dev/null <<'SQL'
SELECT dispatch_policy.stage_many('other', (SELECT jsonb_agg(jsonb_build_object('args', i)) FROM generate_series(1, 2000) i));
SELECT dispatch_policy.admit('other', (SELECT jsonb_agg(jsonb_build_object('id', id)) FROM
  (SELECT id FROM dispatch_policy.staged_jobs WHERE policy = 'other' ORDER BY id LIMIT 1500) s));
SELECT count(*) FROM dispatch_policy.claim('default', 'w', 1500);
SELECT count(*) FROM dispatch_policy.complete_many(ARRAY(SELECT id FROM dispatch_policy.admitted_jobs ORDER BY id LIMIT 1000),
                                                   array_fill(NULL::integer, ARRAY[1000]));
VACUUM ANALYZE;
SQL
unfolded=$(q "SELECT count(*) FROM dispatch_policy.stat_deltas")

# The overviews, interleaved: old, new (deltas not folded), new after a fold.
: > /tmp/history_bench_old; : > /tmp/history_bench_new; : > /tmp/history_bench_folded
for r in $(seq 1 "$ROUNDS"); do
  q "SELECT bench.ms('SELECT * FROM bench.old_policy_overview')" >> /tmp/history_bench_old
  q "SELECT bench.ms('SELECT * FROM dispatch_policy.policy_overview')" >> /tmp/history_bench_new
done
q "SELECT dispatch_policy.fold_stats()" >/dev/null
for r in $(seq 1 "$ROUNDS"); do
  q "SELECT bench.ms('SELECT * FROM dispatch_policy.policy_overview')" >> /tmp/history_bench_folded
done
old=$(median < /tmp/history_bench_old); new=$(median < /tmp/history_bench_new); folded=$(median < /tmp/history_bench_folded)
same=$(q "SELECT (SELECT array_agg((policy, pending, scheduled, in_flight, dead)::text ORDER BY policy) FROM bench.old_policy_overview)
              = (SELECT array_agg((policy, pending, scheduled, in_flight, dead)::text ORDER BY policy) FROM dispatch_policy.policy_overview)")
pending=$(q "SELECT pending FROM dispatch_policy.policy_overview WHERE policy = 'big'")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }
cat <<TABLE
| measure (median of $ROUNDS, server-side) | before / without | after / with | ratio |
| --- | ---: | ---: | ---: |
| \`SELECT * FROM policy_overview\`, $pending pending in one policy (3 policies), old view vs new ($unfolded deltas not folded) | $old ms | $new ms | $(ratio "$old" "$new")× faster |
| the same, new view after a fold | $old ms | $folded ms | $(ratio "$old" "$folded")× faster |
| \`stage_many\` of 10,000 jobs, history trigger off vs on | $many_off ms | $many_on ms | $(ratio "$many_on" "$many_off")× the time |
| one \`stage()\` call (1,000 in a row), trigger off vs on | $one_off ms | $one_on ms | $(ratio "$one_on" "$one_off")× the time |

Counts of the old and new view equal: $same. Staging the $pending jobs took ${staged_s} s.
TABLE
rm -f /tmp/history_bench_*
