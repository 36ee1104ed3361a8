#!/bin/bash
# Interleaved pgbench runs of the staging benchmark; prints a Markdown table.
#
#   PGHOST=... PGPORT=... PGUSER=... ./run.sh [seconds per run, default 20] [rounds, default 5] [pairs...]
#
# A pair NAME is raw_NAME.sql (the baseline) against stage_NAME.sql; the
# default pairs are: one many one_rr one_dedupe. DATABASES (default
# "staging_before staging_after", made by prepare.sh) are measured in the
# same rounds: each round runs, for every pair and every database, the raw
# script and then the stage script. Before every run the job tables are
# emptied and a CHECKPOINT is taken. CLIENTS (default 2) connections, -M
# prepared. PGOPTIONS applies to every run (e.g. '-c synchronous_commit=off').
# The ratio of a round is stage/raw of that round; the table shows medians
# with min–max over the rounds.
#
# Besides throughput it reports server CPU per transaction: the user+system
# time of the backends pgbench used (read from the postmaster's cumulative
# child times in /proc, so the server must run on this machine and the
# caller must be able to read its data directory's postmaster.pid), divided
# by the transactions. On a machine shared with other work, throughput moves
# with the neighbours' load while CPU per call barely does; the CPU ratio is
# raw CPU/call over stage CPU/call, the throughput ratio a CPU-bound run
# would reach.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-20}; ROUNDS=${2:-5}; shift 2 || true
PAIRS=${*:-one many one_rr one_dedupe}
DATABASES=${DATABASES:-staging_before staging_after}
CLIENTS=${CLIENTS:-2}
PSQL="psql -X -q -v ON_ERROR_STOP=1"
OUT=$(mktemp -d)
db1=$(echo "$DATABASES" | awk '{print $1}')
POSTMASTER=$(head -1 "$($PSQL -d "$db1" -tAc 'SHOW data_directory')/postmaster.pid")
TICK=$(getconf CLK_TCK)
child_cpu() { awk '{print $16 + $17}' "/proc/$POSTMASTER/stat"; }  # cutime + cstime of reaped backends
for r in $(seq "$ROUNDS"); do
  for p in $PAIRS; do
    for db in $DATABASES; do
      for side in raw stage; do
        $PSQL -d "$db" -c "TRUNCATE bench.raw_jobs, dispatch_policy.staged_jobs, dispatch_policy.dedupe_keys" -c "CHECKPOINT" >/dev/null
        sleep 0.5; cpu0=$(child_cpu)
        result=$(pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECS" -f "${side}_${p}.sql" "$db" 2>/dev/null)
        sleep 0.5; cpu1=$(child_cpu)
        tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' <<<"$result")
        xacts=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*$/\1/p' <<<"$result")
        cpu_us=$(echo "($cpu1 - $cpu0) * 1000000 / $TICK / $xacts" | bc -l)
        echo "$tps" >> "$OUT/${p}_${db}_${side}"
        echo "$cpu_us" >> "$OUT/${p}_${db}_${side}_cpu"
        echo "round $r $p $db $side: $tps tps, $(printf %.0f "$cpu_us") us server CPU per transaction" >&2
      done
      paste -d' ' <(tail -1 "$OUT/${p}_${db}_raw") <(tail -1 "$OUT/${p}_${db}_stage") | awk '{printf "%.4f\n", $2/$1}' >> "$OUT/${p}_${db}_ratio"
      paste -d' ' <(tail -1 "$OUT/${p}_${db}_raw_cpu") <(tail -1 "$OUT/${p}_${db}_stage_cpu") | awk '{printf "%.4f\n", $1/$2}' >> "$OUT/${p}_${db}_cpuratio"
    done
  done
done
stats() { sort -g "$1" | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2; printf "%s|%s|%s", m, a[1], a[NR]}'; }
echo
echo "$(date -u +%Y-%m-%d) · $(nproc) cores · PostgreSQL $($PSQL -d "$db1" -tAc 'SHOW server_version') · fsync=$($PSQL -d "$db1" -tAc 'SHOW fsync')" \
     "· synchronous_commit=$($PSQL -d "$db1" -tAc 'SHOW synchronous_commit') · $CLIENTS clients · $ROUNDS rounds of ${SECS} s"
echo
echo "| pair | database | unit | raw median (min–max) | stage median (min–max) | ratio median (min–max) | server CPU µs/call raw · stage | CPU ratio median (min–max) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for p in $PAIRS; do
  for db in $DATABASES; do
    mult=1; unit="calls/s"; [ "$p" = many ] && { mult=1000; unit="rows/s"; }
    IFS='|' read -r rm rl rh <<<"$(stats "$OUT/${p}_${db}_raw")"
    IFS='|' read -r sm sl sh <<<"$(stats "$OUT/${p}_${db}_stage")"
    IFS='|' read -r qm ql qh <<<"$(stats "$OUT/${p}_${db}_ratio")"
    IFS='|' read -r rc _ _ <<<"$(stats "$OUT/${p}_${db}_raw_cpu")"
    IFS='|' read -r sc _ _ <<<"$(stats "$OUT/${p}_${db}_stage_cpu")"
    IFS='|' read -r cm cl ch <<<"$(stats "$OUT/${p}_${db}_cpuratio")"
    printf '| %s | %s | %s | %.0f (%.0f–%.0f) | %.0f (%.0f–%.0f) | %.2f (%.2f–%.2f) | %.0f · %.0f | %.2f (%.2f–%.2f) |\n' "$p" "$db" "$unit" \
      "$(echo "$rm*$mult" | bc)" "$(echo "$rl*$mult" | bc)" "$(echo "$rh*$mult" | bc)" \
      "$(echo "$sm*$mult" | bc)" "$(echo "$sl*$mult" | bc)" "$(echo "$sh*$mult" | bc)" "$qm" "$ql" "$qh" \
      "$rc" "$sc" "$cm" "$cl" "$ch"
  done
done
rm -rf "$OUT"
