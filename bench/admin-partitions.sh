#!/usr/bin/env bash
# The policy page's partition list with many gate partitions (issue 10):
# a page reads the candidates of each gate-state table after its cursor, so
# its time should not grow with the partitions. Renders the first page, a
# page deep into the list, the in-flight order and the "only busy" filter
# with few partitions and with many, in one run on the same database, and
# prints the ratio many/few (1.0: independent of the number of partitions).
#
#   PGHOST=... PGPORT=... PGUSER=... bench/admin-partitions.sh [few, default 1000] [many, default 100000] [rounds, default 7]
#
# Needs a built dispatch-policy (DISPATCH_POLICY_BIN to use another) and curl.
# The gate state is written directly (a throttle and a concurrency gate per
# tenant; one partition in 50 with jobs in flight, one in 20 with a spent bucket).
set -euo pipefail
cd "$(dirname "$0")/.."
FEW=${1:-1000}
MANY=${2:-100000}
ROUNDS=${3:-7}
BIN=${DISPATCH_POLICY_BIN:-.build/debug/dispatch-policy}
DB=${ADMIN_BENCH_DB:-dispatch_policy_partitions_bench}
PSQL=(psql -X -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
export DATABASE_URL="postgres://${PGUSER:-postgres}@/$DB?host=${PGHOST:-/tmp}&port=${PGPORT:-5432}"
"$BIN" migrate >/dev/null
"${PSQL[@]}" -d "$DB" -c "SELECT dispatch_policy.declare_policy('p', '{\"gates\": [{\"type\": \"throttle\", \"name\": \"t\", \"rate\": 10, \"per\": 60, \"partition_by\": \"{tenant}\"}, {\"type\": \"concurrency\", \"name\": \"c\", \"max\": 5, \"partition_by\": \"{tenant}\"}]}')" >/dev/null

state_to() {  # gate state for tenants 0 .. $1-1
  "${PSQL[@]}" -d "$DB" <<SQL >/dev/null
INSERT INTO dispatch_policy.throttle_buckets (policy, gate, partition, tokens, rate, per_seconds, burst, refilled_at)
SELECT 'p', 't', 'tenant-' || lpad(i::text, 7, '0'), CASE WHEN i % 20 = 0 THEN 2 ELSE 10 END, 10, 60, 10, now()
FROM generate_series(0, $1 - 1) i ON CONFLICT DO NOTHING;
INSERT INTO dispatch_policy.inflight_counters (policy, gate, partition, in_flight)
SELECT 'p', 'c', 'tenant-' || lpad(i::text, 7, '0'), CASE WHEN i % 50 = 0 THEN 1 + i % 4 ELSE 0 END
FROM generate_series(0, $1 - 1) i ON CONFLICT DO NOTHING;
VACUUM ANALYZE dispatch_policy.throttle_buckets;
VACUUM ANALYZE dispatch_policy.inflight_counters;
SQL
}

port=$(( 20000 + RANDOM % 20000 ))
"$BIN" admin --bind "127.0.0.1:$port" 2>/dev/null &
admin=$!
trap 'kill $admin 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done

median_ms() {
  for _ in $(seq "$ROUNDS"); do
    curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$port$1"
  done | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)] * 1000}'
}
# A cursor in the middle of the few partitions' list (base64url of "0<US>t<US>tenant-0000500").
deep="after=$(printf '0\037t\037tenant-0000500' | base64 | tr '+/' '-_' | tr -d '=')"
pages=("/policies/p" "/policies/p?$deep" "/policies/p?sort=in_flight" "/policies/p?busy=1" "/policies/p?q=99")
declare -A few many
state_to "$FEW"
for page in "${pages[@]}"; do curl -s -o /dev/null "http://127.0.0.1:$port$page"; few[$page]=$(median_ms "$page"); done
state_to "$MANY"
for page in "${pages[@]}"; do curl -s -o /dev/null "http://127.0.0.1:$port$page"; many[$page]=$(median_ms "$page"); done

echo "| page | $FEW partitions per gate | $MANY partitions per gate | ratio |"
echo "| --- | ---: | ---: | ---: |"
for page in "${pages[@]}"; do
  awk -v p="$page" -v s="${few[$page]}" -v l="${many[$page]}" 'BEGIN { printf "| `%s` | %.1f ms | %.1f ms | %.2f |\n", p, s, l, l / s }'
done
