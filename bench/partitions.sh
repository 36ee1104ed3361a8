#!/usr/bin/env bash
# Pending jobs per gate partition and the pending trend (migration 0020):
# what the stored partitions and their counters cost the writers, staging
# and admission, against the schema before 0020 (a database migrated up to
# 0019, measured in the same run, interleaved round by round), and what the
# readers cost at a large backlog against counting the jobs as before.
# Self-contained: builds its two databases from Migrations/ with psql.
#
#   PGHOST=... PGPORT=... PGUSER=... bench/partitions.sh [staged, default 1000000] [rounds, default 7]
#
# The policy has two partitioned gates, a throttle by tenant ({tenant}) and
# a concurrency gate by account (acct:{account}). Prints a Markdown table.
# Every figure is a median over the rounds of server-side time
# (clock_timestamp() around the call, each call in a session of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGED=${1:-1000000}
ROUNDS=${2:-7}
BEFORE=${PARTITIONS_BENCH_DB:-dispatch_policy_partitions_bench}_before
AFTER=${PARTITIONS_BENCH_DB:-dispatch_policy_partitions_bench}_after
PSQL=(psql -X -q -v ON_ERROR_STOP=1)
for db in "$BEFORE" "$AFTER"; do
  "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" 2>/dev/null
done
for f in Migrations/*.sql; do
  [[ $(basename "$f") < 0020 ]] && "${PSQL[@]}" -d "$BEFORE" -1 -f "$f" >/dev/null
  "${PSQL[@]}" -d "$AFTER" -1 -f "$f" >/dev/null
done
q() { "${PSQL[@]}" -d "$1" -At -c "$2"; }

for db in "$BEFORE" "$AFTER"; do
  "${PSQL[@]}" -d "$db" >/dev/null <<'SQL'
CREATE SCHEMA bench;
-- n jobs over the given numbers of tenants and accounts.
CREATE FUNCTION bench.jobs(n integer, tenants integer, accounts integer) RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('tenant', 't' || (i % tenants),
                                                                               'account', i % accounts)))
  FROM generate_series(1, n) i
$$;
-- ms of one stage_many (the array is built before the clock starts).
CREATE FUNCTION bench.stage_many_ms(policy text, n integer, tenants integer, accounts integer)
RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE jobs jsonb := bench.jobs(n, tenants, accounts); t0 timestamptz;
BEGIN
  t0 := clock_timestamp();
  PERFORM dispatch_policy.stage_many(policy, jobs);
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
-- ms per call of n single-row stage() calls.
CREATE FUNCTION bench.stage_one_ms(policy text, n integer) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  FOR i IN 1 .. n LOOP
    PERFORM dispatch_policy.stage(policy, to_jsonb(i), jsonb_build_object('tenant', 't' || (i % 100), 'account', i % 37));
  END LOOP;
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000 / n;
END $$;
-- ms of admit() of the n oldest staged jobs of a policy, with their
-- partitions as the runner gives them (computed before the clock starts),
-- as the tick's last call does it.
CREATE FUNCTION bench.admit_ms(policy text, n integer) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE jobs jsonb; t0 timestamptz;
BEGIN
  jobs := (SELECT jsonb_agg(jsonb_build_object('id', s.id, 'partitions', dispatch_policy._gate_partitions(p.config, s.context)))
           FROM (SELECT j.id, j.context FROM dispatch_policy.staged_jobs j WHERE j.policy = admit_ms.policy
                 ORDER BY j.id LIMIT n) s
           JOIN dispatch_policy.policies p ON p.name = admit_ms.policy);
  t0 := clock_timestamp();
  PERFORM dispatch_policy.admit(policy, jobs);
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
CREATE FUNCTION bench.fold_ms() RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  PERFORM dispatch_policy.fold_stats(now(), 10000000);
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
-- ms of one run of a query, every column of every row computed.
CREATE FUNCTION bench.ms(query text) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  EXECUTE 'SELECT sum(length(x::text)) FROM (' || query || ') x';
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
CREATE FUNCTION bench.reset() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM dispatch_policy.staged_jobs;
  DELETE FROM dispatch_policy.admitted_jobs;
  DELETE FROM dispatch_policy.inflight_counters;
  DELETE FROM dispatch_policy.lanes;
  PERFORM dispatch_policy.fold_stats(now(), 10000000);
END $$;
SELECT dispatch_policy.declare_policy('two', '{"gates": [
  {"type": "throttle", "name": "per_tenant", "rate": 1000000, "per": 1, "partition_by": "{tenant}"},
  {"type": "concurrency", "name": "per_acct", "max": 1000000, "partition_by": "acct:{account}"}]}');
SQL
done

median() { sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.3f", m}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT

# Writers, before and after, interleaved (which database goes first
# alternates): stage_many of 1,000 jobs over 1,000 distinct pairs of
# partitions (100 tenants, 37 accounts) and over 20 (jobs staged together
# that share their partitions); 1,000 stage() calls; admit() of 1,000 jobs
# (distinct pairs, then 20 pairs: a tick's batch drawn from 20 lanes), and
# the fold of the deltas that admission wrote.
for r in $(seq 1 "$ROUNDS"); do
  for side in before after; do
    [[ $((r % 2)) == 0 ]] && side=$([[ $side == before ]] && echo after || echo before)
    db=$([[ $side == before ]] && echo "$BEFORE" || echo "$AFTER")
    q "$db" "SELECT bench.reset()" >/dev/null
    q "$db" "SELECT bench.stage_many_ms('two', 1000, 100, 37)" >> "$t/many_$side"
    q "$db" "SELECT bench.fold_ms()" >/dev/null
    q "$db" "SELECT bench.admit_ms('two', 1000)" >> "$t/admit_$side"
    q "$db" "SELECT bench.fold_ms()" >> "$t/fold_$side"
    q "$db" "SELECT bench.reset()" >/dev/null
    q "$db" "SELECT bench.stage_many_ms('two', 1000, 20, 20)" >> "$t/many20_$side"
    q "$db" "SELECT bench.fold_ms()" >/dev/null
    q "$db" "SELECT bench.admit_ms('two', 1000)" >> "$t/admit20_$side"
    q "$db" "SELECT bench.reset()" >/dev/null
    q "$db" "SELECT bench.stage_one_ms('two', 1000)" >> "$t/one_$side"
  done
done
for m in many many20 one admit admit20 fold; do
  eval "${m}_before=$(median < "$t/${m}_before")"
  eval "${m}_after=$(median < "$t/${m}_after")"
done
q "$BEFORE" "SELECT bench.reset()" >/dev/null
q "$AFTER" "SELECT bench.reset()" >/dev/null

# Readers, after 0020, at a large backlog: STAGED jobs in one policy over
# 10,000 tenants and 1,000 accounts, staged with stage_many in chunks of
# 10,000 and not folded (as when no runner runs), then folded.
t0=$(date +%s)
left=$STAGED
while (( left > 0 )); do
  n=$(( left < 10000 ? left : 10000 ))
  q "$AFTER" "SELECT bench.stage_many_ms('two', $n, 10000, 1000)" >/dev/null
  left=$(( left - n ))
done
staged_s=$(( $(date +%s) - t0 ))
q "$AFTER" "VACUUM ANALYZE" >/dev/null
"${PSQL[@]}" -d "$AFTER" >/dev/null <<'SQL'
-- The 50 partitions a page shows, and the old way of counting them: render
-- every staged job of the policy (0008's partition_overview did that).
CREATE TABLE bench.page AS SELECT array_agg('t' || i) AS parts FROM generate_series(0, 49) i;
CREATE VIEW bench.counted_by_rendering AS
SELECT k.partition, count(s.id) AS pending, max(s.staged_at) AS last_staged_at
FROM unnest((SELECT parts FROM bench.page)) AS k(partition)
LEFT JOIN dispatch_policy.staged_jobs s
  ON s.policy = 'two' AND dispatch_policy._partition_key('{tenant}', s.context) = k.partition
GROUP BY 1;
CREATE VIEW bench.counted AS
SELECT * FROM dispatch_policy.partition_pending('two', 'per_tenant', (SELECT parts FROM bench.page));
-- 0008's partition_overview, as it was before 0020.
CREATE VIEW bench.old_partition_overview AS
WITH gates AS (
  SELECT p.name AS policy, coalesce(g ->> 'name', g ->> 'type') AS gate, g ->> 'type' AS gate_type, g AS config
  FROM dispatch_policy.policies p
  CROSS JOIN LATERAL jsonb_array_elements(coalesce(p.config -> 'gates', '[]'::jsonb)) AS g
), waiting AS (
  SELECT s.policy, k.key AS gate, k.value AS partition,
         count(*) FILTER (WHERE s.not_before IS NULL OR s.not_before <= now()) AS pending, max(s.staged_at) AS last_staged_at
  FROM dispatch_policy.staged_jobs s
  JOIN dispatch_policy.policies p ON p.name = s.policy
  CROSS JOIN LATERAL jsonb_each_text(dispatch_policy._gate_partitions(p.config, s.context)) AS k
  GROUP BY 1, 2, 3
), held AS (
  SELECT a.policy, k.key AS gate, k.value AS partition, count(*) AS in_flight
  FROM dispatch_policy.admitted_jobs a, jsonb_each_text(a.partitions) AS k
  GROUP BY 1, 2, 3
), known AS (
  SELECT policy, gate, partition FROM waiting
  UNION SELECT policy, gate, partition FROM held
  UNION SELECT policy, gate, partition FROM dispatch_policy.throttle_buckets
  UNION SELECT policy, gate, partition FROM dispatch_policy.inflight_counters
  UNION SELECT policy, gate, partition FROM dispatch_policy.adaptive_stats
)
SELECT k.policy, k.gate, gt.gate_type, k.partition, coalesce(w.pending, 0) AS pending, w.last_staged_at
FROM known k
JOIN gates gt ON gt.policy = k.policy AND gt.gate = k.gate
LEFT JOIN waiting w ON w.policy = k.policy AND w.gate = k.gate AND w.partition = k.partition;
SQL
unfolded=$(q "$AFTER" "SELECT count(*) FROM dispatch_policy.stat_deltas")
for r in $(seq 1 "$ROUNDS"); do
  q "$AFTER" "SELECT bench.ms('SELECT * FROM bench.counted')" >> "$t/pp_unfolded"
  q "$AFTER" "SELECT bench.ms('SELECT * FROM dispatch_policy.pending_minutes(''two'', now() - interval ''1 hour'')')" >> "$t/pm_unfolded"
done
fold_s=$(q "$AFTER" "SELECT round((bench.fold_ms() / 1000)::numeric, 1)")
q "$AFTER" "VACUUM ANALYZE dispatch_policy.stat_deltas, dispatch_policy.partition_counters" >/dev/null
for r in $(seq 1 "$ROUNDS"); do
  q "$AFTER" "SELECT bench.ms('SELECT * FROM bench.counted_by_rendering')" >> "$t/pp_old"
  q "$AFTER" "SELECT bench.ms('SELECT * FROM bench.counted')" >> "$t/pp"
  q "$AFTER" "SELECT bench.ms('SELECT * FROM dispatch_policy.pending_minutes(''two'', now() - interval ''1 hour'')')" >> "$t/pm"
  q "$AFTER" "SELECT bench.ms('SELECT * FROM bench.old_partition_overview WHERE policy = ''two''')" >> "$t/po_old"
  q "$AFTER" "SELECT bench.ms('SELECT * FROM dispatch_policy.partition_overview WHERE policy = ''two''')" >> "$t/po"
done
for m in pp_unfolded pm_unfolded pp_old pp pm po_old po; do eval "${m}=$(median < "$t/$m")"; done
same=$(q "$AFTER" "SELECT (SELECT array_agg((partition, pending)::text ORDER BY partition) FROM bench.counted_by_rendering)
                        = (SELECT array_agg((partition, pending)::text ORDER BY partition) FROM bench.counted)")
partitions=$(q "$AFTER" "SELECT count(*) FROM dispatch_policy.partition_counters WHERE policy = 'two' AND gate = 'per_tenant' AND pending > 0")
# A redeclare that changes a partitioned gate's template renders every
# staged job of the policy again (once: it rewrites the rows).
redeclare_s=$(q "$AFTER" "SELECT round(extract(epoch FROM clock_timestamp() - now())::numeric, 1) FROM (SELECT dispatch_policy.declare_policy('two', '{\"gates\": [
  {\"type\": \"throttle\", \"name\": \"per_tenant\", \"rate\": 1000000, \"per\": 1, \"partition_by\": \"{tenant}\"},
  {\"type\": \"concurrency\", \"name\": \"per_acct\", \"max\": 1000000, \"partition_by\": \"account:{account}\"}]}')) x")

cat <<TABLE
| measure (median of $ROUNDS, server-side) | before 0020 / old way | after 0020 | ratio |
| --- | ---: | ---: | ---: |
| \`stage_many\` of 1,000 jobs, 2 partitioned gates, 1,000 distinct pairs of partitions | $many_before ms | $many_after ms | $(ratio "$many_after" "$many_before")× the time |
| the same, 20 pairs | $many20_before ms | $many20_after ms | $(ratio "$many20_after" "$many20_before")× the time |
| one \`stage()\` call (1,000 in a row) | $one_before ms | $one_after ms | $(ratio "$one_after" "$one_before")× the time |
| \`admit\` of 1,000 jobs (a tick's write), 1,000 distinct pairs | $admit_before ms | $admit_after ms | $(ratio "$admit_after" "$admit_before")× the time |
| the same, 20 pairs | $admit20_before ms | $admit20_after ms | $(ratio "$admit20_after" "$admit20_before")× the time |
| \`fold_stats\` of what that admission wrote (1,000 pairs) | $fold_before ms | $fold_after ms | $(ratio "$fold_after" "$fold_before")× the time |
| pending and last staging of 50 partitions at $STAGED staged ($partitions partitions of the throttle), rendering every job vs \`partition_pending\` (folded) | $pp_old ms | $pp ms | $(ratio "$pp_old" "$pp")× faster |
| \`partition_pending\` of 50 partitions, $unfolded deltas not folded | | $pp_unfolded ms | |
| \`partition_overview WHERE policy = ...\`, 0008's view vs 0020's (folded) | $po_old ms | $po ms | $(ratio "$po_old" "$po")× faster |
| \`pending_minutes\`, the last hour (61 rows), folded / $unfolded deltas not folded | | $pm ms / $pm_unfolded ms | |

Counts by rendering and by \`partition_pending\` equal: $same. Staging the
$STAGED jobs took ${staged_s} s; folding their $unfolded deltas ${fold_s} s; a
redeclare that changed the concurrency gate's template (rendering every
staged job again) ${redeclare_s} s.
TABLE
