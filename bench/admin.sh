#!/usr/bin/env bash
# The admin's pages at a large backlog (issue 10): every page should read
# O(rows shown), so its time should not grow with the pending jobs. Renders
# each page at a small backlog and at a large one, in one run, on the same
# database, and prints the ratio large/small (1.0: independent of backlog).
#
#   PGHOST=... PGPORT=... PGUSER=... bench/admin.sh [small, default 10000] [large, default 1000000] [rounds, default 7]
#
# Needs a built dispatch-policy (swift build; DISPATCH_POLICY_BIN to use
# another) and curl. The backlog is one policy with a throttle partitioned by
# tenant (1,000 tenants, so 1,000 gate partitions and lanes): the policy
# page lists 50 partitions and 50 lanes, each with a sparkline.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=${1:-10000}
LARGE=${2:-1000000}
ROUNDS=${3:-7}
BIN=${DISPATCH_POLICY_BIN:-.build/debug/dispatch-policy}
DB=${ADMIN_BENCH_DB:-dispatch_policy_admin_bench}
PSQL=(psql -X -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
export DATABASE_URL="postgres://${PGUSER:-postgres}@/$DB?host=${PGHOST:-/tmp}&port=${PGPORT:-5432}"
"$BIN" migrate >/dev/null
"${PSQL[@]}" -d "$DB" -c "SELECT dispatch_policy.declare_policy('p', '{\"gates\": [{\"type\": \"throttle\", \"name\": \"per_tenant\", \"rate\": 1, \"per\": 3600, \"partition_by\": \"{tenant}\"}]}')" >/dev/null

stage_to() {  # stage until the policy has $1 pending jobs, 10,000 per call
  local have
  have=$("${PSQL[@]}" -d "$DB" -At -c "SELECT pending FROM dispatch_policy.policy_overview WHERE policy = 'p'")
  while [ "$have" -lt "$1" ]; do
    local n=$(( $1 - have < 10000 ? $1 - have : 10000 ))
    "${PSQL[@]}" -d "$DB" -c "SELECT count(*) FROM unnest(dispatch_policy.stage_many('p', (SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('tenant', 't' || (i % 1000)))) FROM generate_series(1, $n) i)))" >/dev/null
    have=$(( have + n ))
  done
}

port=$(( 20000 + RANDOM % 20000 ))
"$BIN" admin --bind "127.0.0.1:$port" 2>/dev/null &
admin=$!
trap 'kill $admin 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done

median_ms() {  # median over $ROUNDS of curl's total time for one URL, in ms
  for _ in $(seq "$ROUNDS"); do
    curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$port$1"
  done | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)] * 1000}'
}

pages=("/" "/policies/p" "/metrics" "/dead")
declare -A small large
stage_to "$SMALL"
"$BIN" tick --once >/dev/null   # one token per tenant: 1,000 admitted, the rest waits
for page in "${pages[@]}"; do curl -s -o /dev/null "http://127.0.0.1:$port$page"; small[$page]=$(median_ms "$page"); done
stage_to "$LARGE"
"${PSQL[@]}" -d "$DB" -c "VACUUM ANALYZE" >/dev/null
for page in "${pages[@]}"; do curl -s -o /dev/null "http://127.0.0.1:$port$page"; large[$page]=$(median_ms "$page"); done

echo "| page | $SMALL pending | $LARGE pending | ratio |"
echo "| --- | ---: | ---: | ---: |"
for page in "${pages[@]}"; do
  awk -v p="$page" -v s="${small[$page]}" -v l="${large[$page]}" 'BEGIN { printf "| `%s` | %.1f ms | %.1f ms | %.2f |\n", p, s, l, l / s }'
done
