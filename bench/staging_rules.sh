#!/usr/bin/env bash
# What the staging rules of 0023 (dedupe_mode replace, max_pending_per_partition,
# max_wait/expires_at) cost on staging and in a tick's path. Self-contained:
# builds its own database from Migrations/ with psql.
#
#   PGHOST=... PGPORT=... PGUSER=... bench/staging_rules.sh [rounds, default 7] [backlog, default 100000]
#
# Staging, each variant once per round, the variants' order rotated round by
# round (interleaved), 100 tenants via round_robin_by:
#   plain       a policy without rules (the baseline)
#   pre-tables  the same policy, with 0023's two new staged_jobs indexes
#               dropped (staged_jobs_expires_idx, staged_jobs_backlog_idx) and
#               its staged_jobs triggers disabled (staged_jobs_restaged_deadline,
#               staged_jobs_backlog_insert, staged_jobs_backlog_delete; the
#               truncate trigger is left: nothing truncates), 0023's functions
#   pre-0023    the same tables as pre-tables, staged through 0022's stage()
#               and stage_many() (kept in the script as bench.old_stage and
#               bench.old_stage_many: _stage directly, no _stage_outcomes)
#   capped      max_pending_per_partition 1000000 (counters kept, never refusing)
#   replace     dedupe_mode replace; half the jobs carry the dedupe key of a
#               job already staged (replaced), the other half a fresh key
#   deadline    max_wait 3600 (every job gets a deadline and a job_deadlines row)
# measured as stage_many of 10,000 jobs in one call, and as 2,000 stage()
# calls in one PL/pgSQL loop (one transaction). Between measurements the
# policy's jobs are deleted and the tables vacuumed (not timed).
#
# Tick path: two policies with `backlog` staged jobs each (round_robin_by
# tenant, 100 tenants), one without rules and one with max_wait 3600:
# promote_scheduled(policy, 1000) on both, with no deadline passed;
# fetch_batch(policy, 500, 50) on both with no deadline passed, and on the
# deadline one with 1,000 passed (made so before each call, not timed), which
# the call expires (since 0026 the fetch expires, once a tick;
# promote_scheduled does not). Each call after a warm-up call (on an empty
# policy) in the same session, as a runner's would be.
#
# Prints a Markdown table. Every figure is a median over the rounds of
# server-side time (clock_timestamp() around the call), and every ratio
# compares two things measured in the same run, interleaved round by round.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-7}
BACKLOG=${2:-100000}
DB=${STAGING_RULES_BENCH_DB:-dispatch_policy_staging_rules_bench}
TMP=$(mktemp -d /tmp/staging_rules_bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
PSQL=(psql -X -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
for f in Migrations/*.sql; do "${PSQL[@]}" -d "$DB" -1 -f "$f" >/dev/null; done
q() { "${PSQL[@]}" -d "$DB" -At -c "$1"; }

"${PSQL[@]}" -d "$DB" >/dev/null <<'SQL'
CREATE SCHEMA bench;

-- 0022's stage_many (0003's body, 0021's privileges): _stage directly.
CREATE FUNCTION bench.old_stage_many(policy text, jobs jsonb)
RETURNS bigint[]
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, dispatch_policy, pg_temp
AS $$
  SELECT dispatch_policy._stage(old_stage_many.policy, old_stage_many.jobs, 'jobs[%s].')
$$;

-- 0022's stage (0020's body, 0021's privileges), copied.
CREATE FUNCTION bench.old_stage(
  policy          text,
  args            jsonb,
  context         jsonb DEFAULT '{}',
  dedupe_key      text DEFAULT NULL,
  round_robin_key text DEFAULT NULL,
  queue           text DEFAULT NULL,
  priority        integer DEFAULT NULL,
  not_before      timestamptz DEFAULT NULL
)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, dispatch_policy, pg_temp
AS $$
DECLARE
  template text;
  part_gates text[];
  part_templates text[];
  part_prefixes text[];
  part_keys text[];
  part_suffixes text[];
  job_context jsonb;
  job_partitions jsonb;
  job_id bigint;
  lane text;
  due timestamptz;
BEGIN
  PERFORM pg_advisory_xact_lock_shared(dispatch_policy._partitions_lock_key(old_stage.policy));
  SELECT p.lane_template, p.partition_gates, p.partition_templates, p.partition_prefixes, p.partition_keys,
         p.partition_suffixes
  INTO template, part_gates, part_templates, part_prefixes, part_keys, part_suffixes
  FROM dispatch_policy.policies p WHERE p.name = old_stage.policy;
  IF NOT FOUND
     OR old_stage.args IS NULL OR jsonb_typeof(old_stage.args) = 'null'
     OR jsonb_typeof(old_stage.context) NOT IN ('object', 'null')
     OR pg_column_size(old_stage.context) > dispatch_policy._limit_max('job.context') - 8
     OR pg_column_compression(old_stage.context) IS NOT NULL
     OR octet_length(old_stage.dedupe_key) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.dedupe_key')
     OR octet_length(old_stage.round_robin_key) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.round_robin_key')
     OR octet_length(old_stage.queue) NOT BETWEEN 1 AND dispatch_policy._limit_max('job.queue')
     OR NOT isfinite(old_stage.not_before)
  THEN
    RETURN (dispatch_policy._stage(
      old_stage.policy,
      jsonb_build_array(jsonb_build_object(
        'args', old_stage.args, 'context', old_stage.context, 'dedupe_key', old_stage.dedupe_key,
        'round_robin_key', old_stage.round_robin_key, 'queue', old_stage.queue, 'priority', old_stage.priority,
        'not_before', old_stage.not_before)),
      ''))[1];
  END IF;
  job_context := jsonb_build_object('queue_name', coalesce(old_stage.queue, 'default'), 'priority', coalesce(old_stage.priority, 0))
                 || coalesce(nullif(old_stage.context, 'null'::jsonb), '{}'::jsonb);
  job_partitions := dispatch_policy._render_partitions(part_gates, part_templates, part_prefixes, part_keys, part_suffixes,
                                                       job_context);
  job_id := nextval('dispatch_policy.job_ids');
  IF old_stage.dedupe_key IS NOT NULL THEN
    INSERT INTO dispatch_policy.dedupe_keys (policy, dedupe_key, job_id)
    VALUES (old_stage.policy, old_stage.dedupe_key, job_id)
    ON CONFLICT ON CONSTRAINT dedupe_keys_pkey DO NOTHING;
    IF NOT FOUND THEN
      RETURN NULL;
    END IF;
  END IF;
  INSERT INTO dispatch_policy.staged_jobs
    (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before, partitions)
  VALUES (job_id, old_stage.policy, coalesce(old_stage.queue, 'default'), coalesce(old_stage.priority, 0), old_stage.args, job_context,
          old_stage.dedupe_key, dispatch_policy._round_robin_key(template, job_context, old_stage.round_robin_key),
          CASE WHEN old_stage.not_before > now() THEN old_stage.not_before END, job_partitions)
  RETURNING staged_jobs.round_robin_key, staged_jobs.not_before INTO lane, due;
  IF due IS NULL THEN
    PERFORM dispatch_policy._add_lanes(old_stage.policy, ARRAY[lane]);
  END IF;
  PERFORM pg_notify('dispatch_policy_staged', old_stage.policy);
  RETURN job_id;
END
$$;

-- Staging as before 0023 (pre = true): its two new staged_jobs indexes
-- dropped and its staged_jobs triggers that do nothing for an uncapped
-- policy disabled; pre = false puts them back as 0023 made them.
CREATE FUNCTION bench.set_pre(pre boolean) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  is_pre boolean := NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'staged_jobs_backlog_idx');
BEGIN
  IF pre = is_pre THEN
    RETURN;
  END IF;
  IF pre THEN
    DROP INDEX dispatch_policy.staged_jobs_expires_idx;
    DROP INDEX dispatch_policy.staged_jobs_backlog_idx;
    ALTER TABLE dispatch_policy.staged_jobs DISABLE TRIGGER staged_jobs_restaged_deadline,
      DISABLE TRIGGER staged_jobs_backlog_insert, DISABLE TRIGGER staged_jobs_backlog_delete;
  ELSE
    CREATE INDEX staged_jobs_expires_idx ON dispatch_policy.staged_jobs (policy, expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX staged_jobs_backlog_idx ON dispatch_policy.staged_jobs (policy, round_robin_key, id);
    ALTER TABLE dispatch_policy.staged_jobs ENABLE TRIGGER staged_jobs_restaged_deadline,
      ENABLE TRIGGER staged_jobs_backlog_insert, ENABLE TRIGGER staged_jobs_backlog_delete;
  END IF;
END $$;

-- The jobs of a stage_many: n jobs, tenant i % 100; with a key prefix, job
-- i carries the dedupe key prefix || i.
CREATE FUNCTION bench.jobs(n integer, key_prefix text DEFAULT NULL) RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_agg(jsonb_build_object('args', i, 'context', jsonb_build_object('tenant', i % 100))
                   || CASE WHEN key_prefix IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('dedupe_key', key_prefix || i) END
                   ORDER BY i)
  FROM generate_series(1, n) i
$$;

-- ms of one stage_many of n jobs (the array is built before the clock starts).
CREATE FUNCTION bench.stage_many_ms(policy text, n integer, key_prefix text, old boolean)
RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE jobs jsonb := bench.jobs(n, key_prefix);
        t0 timestamptz;
BEGIN
  t0 := clock_timestamp();
  IF old THEN
    PERFORM bench.old_stage_many(policy, jobs);
  ELSE
    PERFORM dispatch_policy.stage_many(policy, jobs);
  END IF;
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;

-- ms per call of n stage() calls in a row, one transaction.
CREATE FUNCTION bench.stage_one_ms(policy text, n integer, key_prefix text, old boolean)
RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  IF old THEN
    FOR i IN 1 .. n LOOP
      PERFORM bench.old_stage(policy, to_jsonb(i), jsonb_build_object('tenant', i % 100), key_prefix || i);
    END LOOP;
  ELSE
    FOR i IN 1 .. n LOOP
      PERFORM dispatch_policy.stage(policy, to_jsonb(i), jsonb_build_object('tenant', i % 100), key_prefix || i);
    END LOOP;
  END IF;
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000 / n;
END $$;

-- ms of one run of a query, after one run of the warm-up query in the same
-- session (plans and PL/pgSQL functions compiled, as in a runner's session).
CREATE FUNCTION bench.ms(warm text, query text) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz;
BEGIN
  EXECUTE 'SELECT count(*) FROM (' || warm || ') x';
  t0 := clock_timestamp();
  EXECUTE 'SELECT count(*) FROM (' || query || ') x';
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;

SELECT dispatch_policy.declare_policy('plain', '{"round_robin_by": "{tenant}"}');
SELECT dispatch_policy.declare_policy('pre', '{"round_robin_by": "{tenant}"}');
SELECT dispatch_policy.declare_policy('capped', '{"round_robin_by": "{tenant}", "max_pending_per_partition": 1000000}');
SELECT dispatch_policy.declare_policy('replace', '{"round_robin_by": "{tenant}", "dedupe_mode": "replace"}');
SELECT dispatch_policy.declare_policy('deadline', '{"round_robin_by": "{tenant}", "max_wait": 3600}');
SELECT dispatch_policy.declare_policy('tick_plain', '{"round_robin_by": "{tenant}"}');
SELECT dispatch_policy.declare_policy('tick_deadline', '{"round_robin_by": "{tenant}", "max_wait": 3600}');
SELECT dispatch_policy.declare_policy('warm', '{"round_robin_by": "{tenant}", "max_wait": 3600}');
SQL

median() { sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.3f", m}'; }
cleanup() {
  q "DELETE FROM dispatch_policy.staged_jobs WHERE policy = '$1';
     DELETE FROM dispatch_policy.dedupe_keys WHERE policy = '$1';
     DELETE FROM dispatch_policy.job_deadlines WHERE policy = '$1'" >/dev/null
  q "VACUUM dispatch_policy.staged_jobs, dispatch_policy.dedupe_keys, dispatch_policy.job_deadlines, dispatch_policy.backlog_counters" >/dev/null
}

# One measurement of variant $1, kind $2 (many: stage_many of 10,000; one:
# 2,000 stage() calls).
measure() {
  local v=$1 kind=$2 policy=$1 keys=NULL old=false n
  [[ $kind == many ]] && n=10000 || n=2000
  case $v in
    pre-tables) policy=pre ;;
    pre-0023) policy=pre; old=true ;;
  esac
  q "SELECT bench.set_pre($([[ $v == pre-* ]] && echo true || echo false))" >/dev/null
  if [[ $v == replace ]]; then
    # Half of the call's keys (k1 .. k(n/2)) held by staged jobs already.
    q "SELECT dispatch_policy.stage_many('replace', bench.jobs($n / 2, 'k'))" >/dev/null
    keys="'k'"
  fi
  q "SELECT bench.stage_${kind}_ms('$policy', $n, $keys, $old)" >> "$TMP/$kind.$v"
  cleanup "$policy"
}

VARIANTS=(plain pre-tables pre-0023 capped replace deadline)
t0=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
  for i in "${!VARIANTS[@]}"; do
    v=${VARIANTS[$(( (i + r - 1) % ${#VARIANTS[@]} ))]}
    measure "$v" many
    measure "$v" one
  done
done
q "SELECT bench.set_pre(false)" >/dev/null
staging_s=$(( $(date +%s) - t0 ))
q "SELECT cardinality(dispatch_policy.stage_many('replace', bench.jobs(10, 'c')))" >/dev/null
replaced=$(q "SELECT count(*) FILTER (WHERE outcome = 'replaced') || ' replaced, ' || count(*) FILTER (WHERE outcome = 'inserted') || ' inserted'
              FROM dispatch_policy.stage_many_outcomes('replace', bench.jobs(20, 'c'))")
cleanup replace

# The tick path: BACKLOG staged jobs in each policy, through stage_many in
# chunks of 10,000.
t0=$(date +%s)
for p in tick_plain tick_deadline; do
  left=$BACKLOG
  while (( left > 0 )); do
    n=$(( left < 10000 ? left : 10000 ))
    q "SELECT cardinality(dispatch_policy.stage_many('$p', bench.jobs($n)))" >/dev/null
    left=$(( left - n ))
  done
done
q "VACUUM ANALYZE" >/dev/null
backlog_s=$(( $(date +%s) - t0 ))
WARM_P="SELECT dispatch_policy.promote_scheduled('warm', 1000)"
WARM_F="SELECT * FROM dispatch_policy.fetch_batch('warm', 500, 50)"
expired_total=0
for r in $(seq 1 "$ROUNDS"); do
  # 1,000 of tick_deadline's jobs past their deadline: staged now, their
  # expires_at set back a second (not timed); the timed fetch expires them.
  past() {
    q "SELECT cardinality(dispatch_policy.stage_many('tick_deadline', bench.jobs(1000)))" >/dev/null
    q "UPDATE dispatch_policy.staged_jobs SET expires_at = now() - interval '1 second'
       WHERE policy = 'tick_deadline' AND id > (SELECT max(id) - 1000 FROM dispatch_policy.staged_jobs WHERE policy = 'tick_deadline')" >/dev/null
  }
  steps=(p_plain p_none f_plain f_deadline f_expired)
  for i in "${!steps[@]}"; do
    s=${steps[$(( (i + r - 1) % ${#steps[@]} ))]}
    case $s in
      p_plain) q "SELECT bench.ms(\$\$$WARM_P\$\$, \$\$SELECT dispatch_policy.promote_scheduled('tick_plain', 1000)\$\$)" >> "$TMP/$s" ;;
      p_none) q "SELECT bench.ms(\$\$$WARM_P\$\$, \$\$SELECT dispatch_policy.promote_scheduled('tick_deadline', 1000)\$\$)" >> "$TMP/$s" ;;
      f_expired)
        past
        before=$(q "SELECT count(*) FROM dispatch_policy.finished_jobs WHERE policy = 'tick_deadline' AND status = 'expired'")
        q "SELECT bench.ms(\$\$$WARM_F\$\$, \$\$SELECT * FROM dispatch_policy.fetch_batch('tick_deadline', 500, 50)\$\$)" >> "$TMP/$s"
        after=$(q "SELECT count(*) FROM dispatch_policy.finished_jobs WHERE policy = 'tick_deadline' AND status = 'expired'")
        expired_total=$(( expired_total + after - before )) ;;
      f_plain) q "SELECT bench.ms(\$\$$WARM_F\$\$, \$\$SELECT * FROM dispatch_policy.fetch_batch('tick_plain', 500, 50)\$\$)" >> "$TMP/$s" ;;
      f_deadline) q "SELECT bench.ms(\$\$$WARM_F\$\$, \$\$SELECT * FROM dispatch_policy.fetch_batch('tick_deadline', 500, 50)\$\$)" >> "$TMP/$s" ;;
    esac
  done
done
fetched=$(q "SELECT count(*) || ' and ' || (SELECT count(*) FROM dispatch_policy.fetch_batch('tick_deadline', 500, 50)) FROM dispatch_policy.fetch_batch('tick_plain', 500, 50)")
pending=$(q "SELECT string_agg(policy || ' ' || n, ', ' ORDER BY policy) FROM (SELECT policy, count(*) n FROM dispatch_policy.staged_jobs
             WHERE policy LIKE 'tick_%' GROUP BY 1) x")

m() { median < "$TMP/$1"; }
range() { sort -n "$TMP/$1" | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.3f–%.3f", lo, hi}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
row() { # label, file, baseline file: medians (min–max), ratio of the medians
  local a b; a=$(m "$2"); b=$(m "$3")
  printf '| %s | %s ms (%s) | %s ms | %s× |\n' "$1" "$a" "$(range "$2")" "$b" "$(ratio "$a" "$b")"
}
fsync=$(q "SHOW fsync"); sc=$(q "SHOW synchronous_commit"); ver=$(q "SHOW server_version")
cat <<HEAD
| measure (median of $ROUNDS, server-side) | time (min–max) | plain policy | ratio |
| --- | ---: | ---: | ---: |
HEAD
for kind in many one; do
  if [[ $kind == many ]]; then what='`stage_many`, 10,000 jobs in one call'; else what='one `stage()` call (2,000 in one transaction)'; fi
  row "$what, plain policy (no rules)" "$kind.plain" "$kind.plain"
  row "$what, 0023's indexes dropped, its staged_jobs triggers disabled" "$kind.pre-tables" "$kind.plain"
  row "$what, the same with 0022's \`stage\`/\`stage_many\`" "$kind.pre-0023" "$kind.plain"
  row "$what, \`max_pending_per_partition\` 1,000,000" "$kind.capped" "$kind.plain"
  row "$what, \`dedupe_mode\` replace, half replacing" "$kind.replace" "$kind.plain"
  row "$what, \`max_wait\` 3600" "$kind.deadline" "$kind.plain"
done
cat <<TABLE

| tick path, $BACKLOG staged jobs (median of $ROUNDS, server-side) | time (min–max) | without deadlines | ratio |
| --- | ---: | ---: | ---: |
TABLE
row '`promote_scheduled(p, 1000)`, no deadlines' p_plain p_plain
row '`promote_scheduled(p, 1000)`, every job a deadline, none passed' p_none p_plain
row '`fetch_batch(p, 500, 50)`, no deadlines' f_plain f_plain
row '`fetch_batch(p, 500, 50)`, every job a deadline, none passed' f_deadline f_plain
row '`fetch_batch(p, 500, 50)`, every job a deadline, 1,000 passed (expired by the call)' f_expired f_plain
cat <<TAIL

PostgreSQL $ver, fsync $fsync, synchronous_commit $sc, load average at the end $(cut -d' ' -f1-3 /proc/loadavg). Staging rounds took ${staging_s} s; the two
backlogs ${backlog_s} s to stage. Replace check (10 keys staged, then 20 with the same first 10): $replaced.
Expired by the timed fetch_batch calls: $expired_total (of $(( ROUNDS * 1000 ))). Rows a fetch returned
(plain and deadline): $fetched. Staged at the end: $pending.
TAIL
