#!/usr/bin/env bash
# deploy/try.sh: tries every file of deploy/ for real against a database.
#
#   DISPATCH_POLICY_BIN=.build/debug/dispatch-policy DATABASE_URL=postgres://... deploy/try.sh
#
# DATABASE_URL names a database where `dispatch-policy migrate` ran, as its
# owner (the script declares a policy of its own, deploy-try-..., and stages
# jobs of it); the PG* variables of the caller are passed on too. When
# sql/roles.sql ran there, every process runs under its role (the
# dispatch_policy_* role is set at connection with PGOPTIONS='-c role=...'),
# so the grants of README "Roles" are tried as well; otherwise as the owner,
# and the script says so. Needs bash, coreutils, curl and awk; uses
# systemd-analyze, strace and setsid when they are there.
#
# What it checks:
# * systemd-analyze verify on a copy of each unit with ExecStart's
#   /usr/local/bin/dispatch-policy replaced by DISPATCH_POLICY_BIN (verify
#   wants an executable there). That checks every directive and value of the
#   real files; not User= (verify does not look the user up), nor the
#   EnvironmentFile= paths, nor the sandbox at run time (systemd is not
#   asked to start anything). Any warning fails, since verify exits 0 on
#   unknown keys. The exposure score of systemd-analyze security is shown.
# * Each unit's ExecStart, taken from the unit file and expanded as systemd
#   would (%i, $VAR split at spaces, ${VAR} as one word, the unit's
#   Environment= first), with the EnvironmentFile= replaced by the test's
#   DATABASE_URL and a few variables of the test (a port 0 to listen on, the
#   policy, an admin token, the worker's command); each variable ExecStart
#   uses must be set by Environment= or named in deploy/env's example.
#   LoadCredential=ID:PATH (PATH in /etc/dispatch-policy) is played as
#   systemd would: a file ID, mode 0400, in a directory of the unit's own,
#   named by CREDENTIALS_DIRECTORY. Each unit's RestartPreventExitStatus=
#   must hold 64 and 78 (usage and configuration errors, which a restart
#   cannot cure).
#   Started in the background with only PATH, HOME, LANG, the PG* variables
#   and those, as systemd would:
#   - the runner admits the jobs staged, serves /metrics and /healthz;
#   - the worker (when the binary has `dispatch-policy work`) runs the
#     command once per job with the job on stdin and in its environment, the
#     jobs end completed, and on SIGTERM it waits for a running command;
#   - the admin answers /healthz, its pages and /metrics, refuses a wrong
#     token and pauses and resumes the policy with the right one (read from
#     its credential), and exits 78 with an empty token file;
#   then each gets SIGTERM alone (KillMode=mixed) and must exit 0 within the
#   unit's TimeoutStopSec; the runner's TimeoutStopSec must exceed its
#   --shutdown-timeout and the 5 s it may take after. Their standard error
#   must hold no error line.
# * The cron line of deploy/cron/dispatch-policy, with its --for shortened
#   to 3s and --policy added, run twice at once through the line's SHELL:
#   both exit 0 within --for and 2 s (plus start-up), print nothing to mail,
#   and admit every job.
# * With strace (and systemd-analyze, to expand syscall groups): the runner
#   and the admin run traced, and every system call, socket family and
#   mapping they made must pass their unit's SystemCallFilter=,
#   RestrictAddressFamilies= and MemoryDenyWriteExecute=. Only the paths the
#   run took are checked. DISPATCH_POLICY_TRY_STRACE=0 turns it off.
#
# Bounded: everything is over within DISPATCH_POLICY_TRY_TIMEOUT (240 s); a
# run takes about 10 s (15 with the worker). Exits 0 when every check
# passed, 1 otherwise, 2 when it could not start (no binary, no database,
# not the owner). DISPATCH_POLICY_TRY_KEEP=1 keeps its scratch directory.
# The policy it declares stays in the database (the CLI cannot remove one):
# give it a scratch database.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LIMIT=${DISPATCH_POLICY_TRY_TIMEOUT:-240}
SYS_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { printf 'try.sh: %s\n' "$*"; }
die() { printf 'try.sh: %s\n' "$*" >&2; exit 2; }

[[ -n ${DISPATCH_POLICY_BIN:-} ]] || die "set DISPATCH_POLICY_BIN to the dispatch-policy binary"
[[ -n ${DATABASE_URL:-} ]] || die "set DATABASE_URL to a database where dispatch-policy migrate ran"
BIN=$(cd "$(dirname "$DISPATCH_POLICY_BIN")" && pwd)/$(basename "$DISPATCH_POLICY_BIN")
[[ -x $BIN ]] || die "DISPATCH_POLICY_BIN is not an executable: $DISPATCH_POLICY_BIN"
command -v curl >/dev/null || die "needs curl"

# Each process started runs in a session of its own (setsid execs in place:
# a background job is no group leader), so that what it started goes with it.
SETSID=$(command -v setsid || true)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dispatch-policy-try.XXXXXX") || die "cannot make a scratch directory"
declare -A PID=()
FAILURES=0
CHECKS=0

cleanup() {
    local name
    # Quiet: bash would report each job it kills here.
    exec 2>/dev/null
    for name in "${!PID[@]}"; do kill -KILL -- "-${PID[$name]}" "${PID[$name]}"; done
    [[ -n ${WATCHDOG:-} ]] && kill "$WATCHDOG" 2>/dev/null
    if [[ ${DISPATCH_POLICY_TRY_KEEP:-0} == 1 ]]; then say "kept $WORK"; else chmod -R u+w "$WORK"; rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'say "over ${LIMIT}s: giving up" >&2; exit 1' USR1
trap 'exit 1' TERM INT
# The watchdog: every wait below is bounded, this bounds their sum.
# It holds no output open (a caller reading ours through a pipe would wait
# for it), and takes its sleep with it when it is ended.
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$LIMIT" &
    sleeper=$!
    wait "$sleeper" && kill -USR1 $$
) </dev/null >/dev/null 2>&1 &
WATCHDOG=$!

ok() { CHECKS=$((CHECKS + 1)); say "ok    $*"; }
fail() { CHECKS=$((CHECKS + 1)); FAILURES=$((FAILURES + 1)); say "FAIL  $*" >&2; }
show() { # show FILE: a file's last lines, indented, after a failure
    [[ -s $1 ]] && sed -e 's/^/        /' "$1" | tail -n 20 >&2
}
now() { if [[ -n ${EPOCHREALTIME:-} ]]; then printf '%s' "${EPOCHREALTIME/,/.}"; else date +%s.%N; fi; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# seconds VALUE: a systemd time span (30s, 5min, 1min 30s, 90) in seconds.
seconds() {
    awk -v v="$1" 'BEGIN {
        n = split(v, w, /[ \t]+/); total = 0
        for (i = 1; i <= n; i++) {
            if (w[i] == "") continue
            if (!match(w[i], /^[0-9.]+/)) { print "bad"; exit }
            num = substr(w[i], 1, RLENGTH); unit = substr(w[i], RLENGTH + 1)
            if (unit == "" || unit == "s" || unit == "sec" || unit == "second" || unit == "seconds") f = 1
            else if (unit == "ms" || unit == "msec") f = 0.001
            else if (unit == "m" || unit == "min" || unit == "minute" || unit == "minutes") f = 60
            else if (unit == "h" || unit == "hr" || unit == "hour" || unit == "hours") f = 3600
            else f = -1
            if (f < 0) { print "bad"; exit }
            total += num * f
        }
        print total }'
}

# duration VALUE: a dispatch-policy duration (50ms, 10s, 5m, 1h, 7d) in seconds.
duration() {
    awk -v v="$1" 'BEGIN {
        if (!match(v, /^[0-9.]+/)) { print "bad"; exit }
        num = substr(v, 1, RLENGTH); unit = substr(v, RLENGTH + 1)
        f = unit == "ms" ? 0.001 : unit == "s" ? 1 : unit == "m" ? 60 : unit == "h" ? 3600 : unit == "d" ? 86400 : -1
        print (f < 0 ? "bad" : num * f) }'
}

# unit_values FILE KEY: the values of KEY= in the [Service] section of a unit
# file, one a line, continuation lines joined.
unit_values() {
    awk -v key="$2" '
        { line = (cont == "" ? $0 : cont $0) }
        line ~ /\\$/ { sub(/\\$/, " ", line); cont = line; next }
        { cont = "" }
        line ~ /^[ \t]*([#;]|$)/ { next }
        line ~ /^[ \t]*\[/ { section = line; gsub(/[ \t]/, "", section); next }
        section != "[Service]" { next }
        {
            eq = index(line, "="); if (eq == 0) next
            k = substr(line, 1, eq - 1); gsub(/[ \t]/, "", k)
            if (k == key) { v = substr(line, eq + 1); sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v); print v }
        }' "$1"
}

# ---------------------------------------------------------------------------
# The units, as systemd would run them.

declare -A UENV=()   # the environment of the unit being prepared
ARGV=()              # its ExecStart, expanded
ENVFILES=()          # its EnvironmentFile= examples in deploy/env
declare -A CREDENTIAL=()  # the value try.sh gives each credential ID of LoadCredential=

# prepare UNIT INSTANCE NAME=VALUE...: fills UENV (the unit's Environment=,
# then the test's values in place of its EnvironmentFile=), ENVFILES and ARGV.
prepare() {
    local unit=$1 instance=$2 assignment file example name value word rest
    shift 2
    UENV=() ARGV=() ENVFILES=()
    while IFS= read -r value; do
        [[ $value == *[\"\']* ]] && { fail "$(basename "$unit"): Environment=$value: try.sh does not read quotes"; return 1; }
        for assignment in $value; do UENV[${assignment%%=*}]=${assignment#*=}; done
    done < <(unit_values "$unit" Environment)
    while IFS= read -r file; do
        file=${file#-}
        example=$HERE/env/$(basename "${file//%i/POLICY}").example
        if [[ $file != /etc/dispatch-policy/*.env ]]; then
            fail "$(basename "$unit"): EnvironmentFile=$file is not in /etc/dispatch-policy"
        elif [[ ! -f $example ]]; then
            fail "$(basename "$unit"): EnvironmentFile=$file has no example ${example#"$HERE"/}"
        else
            ENVFILES+=("$example")
        fi
    done < <(unit_values "$unit" EnvironmentFile)
    for assignment in "$@"; do UENV[${assignment%%=*}]=${assignment#*=}; done
    # LoadCredential=ID:PATH, as systemd: the file's copy in a directory of the unit's own.
    local credential id source directory=$WORK/credentials/$(basename "$unit")
    while IFS= read -r credential; do
        id=${credential%%:*} source=${credential#*:}
        if [[ $source != /etc/dispatch-policy/* ]]; then
            fail "$(basename "$unit"): LoadCredential=$credential does not read from /etc/dispatch-policy"; return 1
        elif [[ -z ${CREDENTIAL[$id]+set} ]]; then
            fail "$(basename "$unit"): LoadCredential=$credential: try.sh has no value for $id"; return 1
        fi
        mkdir -p "$directory" && chmod 0700 "$directory" && rm -f "$directory/$id"
        (umask 0277 && printf '%s' "${CREDENTIAL[$id]}" >"$directory/$id")
        chmod 0500 "$directory"
        UENV[CREDENTIALS_DIRECTORY]=$directory
    done < <(unit_values "$unit" LoadCredential)
    local codes
    codes=" $(unit_values "$unit" RestartPreventExitStatus | tr '\n' ' ') "
    [[ $codes == *" 64 "* && $codes == *" 78 "* ]] && ok "$(basename "$unit"): RestartPreventExitStatus= holds 64 and 78" \
        || fail "$(basename "$unit"): RestartPreventExitStatus= must hold 64 (usage) and 78 (configuration), has${codes% }"

    local line
    line=$(unit_values "$unit" ExecStart)
    [[ $(printf '%s\n' "$line" | wc -l) == 1 && -n $line ]] || { fail "$(basename "$unit"): not one ExecStart="; return 1; }
    while [[ $line == [-@:+!]* ]]; do line=${line:1}; done
    [[ $line == *[\"\'\\]* ]] && { fail "$(basename "$unit"): ExecStart has quotes or backslashes, which try.sh does not expand"; return 1; }
    local -a words
    read -ra words <<<"$line"
    for word in "${words[@]}"; do
        # Specifiers: %i and %% only.
        word=${word//%%/$'\001'}
        word=${word//%i/$instance}
        [[ $word == *%* ]] && { fail "$(basename "$unit"): ExecStart specifier in $word: try.sh knows %i and %% only"; return 1; }
        word=${word//$'\001'/%}
        if [[ $word =~ ^\$([A-Za-z_][A-Za-z0-9_]*)$ ]]; then
            # $VAR alone: the value split at whitespace, zero or more words.
            name=${BASH_REMATCH[1]}
            check_variable "$unit" "$name" || return 1
            read -ra rest <<<"${UENV[$name]:-}"
            ARGV+=("${rest[@]}")
        else
            # ${VAR}: its value, within the word.
            while [[ $word =~ \$\{([A-Za-z_][A-Za-z0-9_]*)\} ]]; do
                name=${BASH_REMATCH[1]}
                check_variable "$unit" "$name" || return 1
                word=${word//"\${$name}"/${UENV[$name]:-}}
            done
            [[ $word == *\$* ]] && { fail "$(basename "$unit"): ExecStart word $word: try.sh expands \$VAR alone and \${VAR}"; return 1; }
            ARGV+=("$word")
        fi
    done
    if [[ ${ARGV[0]} != /usr/local/bin/dispatch-policy ]]; then
        fail "$(basename "$unit"): ExecStart runs ${ARGV[0]}, not /usr/local/bin/dispatch-policy"
        return 1
    fi
    ARGV[0]=$BIN
}

# check_variable UNIT NAME: a variable ExecStart uses is set by Environment=
# or shown in the example of one of the unit's EnvironmentFile=.
check_variable() {
    local unit=$1 name=$2 example
    for example in "${ENVFILES[@]}"; do
        grep -Eq "^#?[[:space:]]*$name=" "$example" && return 0
    done
    [[ -n ${UENV[$name]+set} ]] && unit_values "$unit" Environment | grep -Eq "(^|[[:space:]])$name=" && return 0
    # Set by systemd itself when the unit loads a credential.
    [[ $name == CREDENTIALS_DIRECTORY ]] && unit_values "$unit" LoadCredential | grep -q . && return 0
    fail "$(basename "$unit"): ExecStart uses \$$name, which neither Environment= nor ${ENVFILES[*]##*/} sets"
    return 1
}

# start NAME ROLE: runs ARGV in the background the way systemd would, with
# only PATH, HOME, LANG, the caller's PG* variables, DATABASE_URL and UENV,
# connected as ROLE (when roles are tried); traced when TRACE_NAME is NAME.
start() {
    local name=$1 role=$2 key
    local -a environment=("PATH=$SYS_PATH" "HOME=${HOME:-/}" "LANG=${LANG:-C.UTF-8}" "DATABASE_URL=$DATABASE_URL")
    for key in $(compgen -e); do
        [[ $key == PG* && $key != PGOPTIONS ]] && environment+=("$key=${!key}")
    done
    [[ -n $role ]] && environment+=("PGOPTIONS=${PGOPTIONS:+$PGOPTIONS }-c role=$role")
    for key in "${!UENV[@]}"; do environment+=("$key=${UENV[$key]}"); done
    local -a tracer=()
    if [[ $TRACE == 1 && $name == runner || $TRACE == 1 && $name == admin ]]; then
        tracer=("$STRACE" -D -f -q -o "$WORK/$name.strace" --)
    fi
    $SETSID env -i "${environment[@]}" "${tracer[@]}" "${ARGV[@]}" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PID[$name]=$!
    STARTED[$name]=$(now)
}
declare -A STARTED=()

# listening NAME: the http://HOST:PORT the process says it listens on (20 s).
listening() {
    local name=$1 deadline address
    deadline=$(( SECONDS + 20 ))
    while (( SECONDS < deadline )); do
        address=$(sed -n 's/.*listening on \(http:\/\/[^ ]*\).*/\1/p' "$WORK/$name.err" | head -n 1)
        [[ -n $address ]] && { printf '%s' "$address"; return 0; }
        kill -0 "${PID[$name]}" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# stop NAME UNIT: SIGTERM to the process alone (KillMode=mixed); it must exit
# 0 within the unit's TimeoutStopSec.
stop() {
    local name=$1 unit=$2 pid=${PID[$1]} limit t0 elapsed rc
    limit=$(seconds "$(unit_values "$unit" TimeoutStopSec | tail -n 1)")
    [[ $limit == bad || -z $limit ]] && { fail "$(basename "$unit"): no TimeoutStopSec that try.sh can read"; limit=90; }
    t0=$(now)
    kill -TERM "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null && awk -v e="$(since "$t0")" -v l="$limit" 'BEGIN { exit !(e < l) }'; do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        unset 'PID[$name]'
        fail "$name: still running ${limit}s (TimeoutStopSec) after SIGTERM"
        show "$WORK/$name.err"
        return 1
    fi
    wait "$pid"; rc=$?
    elapsed=$(since "$t0")
    unset 'PID[$name]'
    if [[ $rc == 0 ]]; then
        ok "$name: exits 0 ${elapsed}s after SIGTERM (TimeoutStopSec ${limit}s)"
    else
        fail "$name: exit status $rc after SIGTERM"
        show "$WORK/$name.err"
    fi
    if grep -Eq '^[0-9T:.+-]+ (error|critical) ' "$WORK/$name.err"; then
        fail "$name: logged errors"
        grep -E '^[0-9T:.+-]+ (error|critical) ' "$WORK/$name.err" | head -n 5 | sed -e 's/^/        /' >&2
    fi
}

# ---------------------------------------------------------------------------
# The database: the owner stages; each process runs as its role.

cli() { # cli ROLE ARGS...: a short dispatch-policy command, bounded
    local role=$1
    shift
    if [[ -n $role ]]; then
        PGOPTIONS="${PGOPTIONS:+$PGOPTIONS }-c role=$role" timeout 60 "$BIN" "$@"
    else
        timeout 60 "$BIN" "$@"
    fi
}

# state ID: admitted, pending, completed, dead, ... (dispatch-policy explain).
state() { cli "" explain "$1" 2>/dev/null | awk 'NR == 1 { print $1 }'; }

# wait_states STATE SECONDS ID...: every job reaches STATE in time.
wait_states() {
    local want=$1 deadline=$(( SECONDS + $2 )) id pending
    shift 2
    while :; do
        pending=()
        for id in "$@"; do [[ $(state "$id") == "$want" ]] || pending+=("$id"); done
        (( ${#pending[@]} == 0 )) && return 0
        (( SECONDS >= deadline )) && { LAST_PENDING="${pending[*]}"; return 1; }
        sleep 0.2
    done
}

stage() { # stage N [ARGS]: stages N jobs of the policy (as the stager), their ids in STAGED
    local i id args
    STAGED=()
    for (( i = 1; i <= $1; i++ )); do
        args=${2:-}
        [[ -n $args ]] || args="{\"try\": $i}"
        id=$(cli "$ROLE_STAGER" stage "$POLICY" --args "$args" --context '{"account_id": 42}') || return 1
        STAGED+=("$id")
    done
}

say "binary: $BIN ($("$BIN" --version 2>&1))"
cli "" status >/dev/null 2>"$WORK/status.err" || { show "$WORK/status.err"; die "cannot read the database (is it migrated?)"; }

POLICY="deploy-try-$(date +%s)-$$"
printf '{"name": "%s", "config": {"gates": [{"type": "concurrency", "max": 100, "partition_by": "{account_id}"}], "target": {"type": "ready_queue"}}}\n' "$POLICY" \
    | cli "" policy apply - >/dev/null 2>"$WORK/apply.err" || { show "$WORK/apply.err"; die "cannot declare the policy $POLICY (DATABASE_URL must be the schema's owner)"; }
say "policy $POLICY"

ROLE_RUNNER="" ROLE_WORKER="" ROLE_OPERATOR="" ROLE_STAGER=""
if cli dispatch_policy_operator status >/dev/null 2>&1; then
    if cli dispatch_policy_worker status >/dev/null 2>"$WORK/probe.err" || ! grep -q 42501 "$WORK/probe.err"; then
        fail "roles: the worker's role may read policy_overview, or the role was not applied (PGOPTIONS ignored?)"
    else
        ROLE_RUNNER=dispatch_policy_runner ROLE_WORKER=dispatch_policy_worker
        ROLE_OPERATOR=dispatch_policy_operator ROLE_STAGER=dispatch_policy_stager
        say "roles: each process runs as its dispatch_policy_* role"
    fi
else
    say "roles: not tried (no dispatch_policy_operator role here: sql/roles.sql did not run); every process runs as the owner"
fi

TRACE=0
STRACE=$(command -v strace || true)
if [[ ${DISPATCH_POLICY_TRY_STRACE:-1} == 0 ]]; then
    say "sandbox: not traced (DISPATCH_POLICY_TRY_STRACE=0)"
elif [[ -z $STRACE ]] || ! command -v systemd-analyze >/dev/null; then
    say "sandbox: not traced (needs strace and systemd-analyze)"
elif ! "$STRACE" -f -q -o /dev/null true 2>/dev/null; then
    say "sandbox: not traced (strace cannot trace here: no ptrace)"
else
    TRACE=1
fi

RUNNER_UNIT=$HERE/systemd/dispatch-policy-runner.service
WORKER_UNIT=$HERE/systemd/dispatch-policy-worker@.service
ADMIN_UNIT=$HERE/systemd/dispatch-policy-admin.service
CRON_FILE=$HERE/cron/dispatch-policy
for file in "$RUNNER_UNIT" "$WORKER_UNIT" "$ADMIN_UNIT" "$CRON_FILE"; do
    [[ -f $file ]] || die "missing ${file#"$HERE"/}"
done

# ---------------------------------------------------------------------------
say "--- systemd-analyze verify"

if command -v systemd-analyze >/dev/null; then
    mkdir -p "$WORK/units"
    for unit in "$RUNNER_UNIT" "$WORKER_UNIT" "$ADMIN_UNIT"; do
        sed "s#/usr/local/bin/dispatch-policy#$BIN#g" "$unit" >"$WORK/units/$(basename "$unit")"
    done
    # A template is verified through an instance; verify reads the template
    # from the same directory.
    for name in dispatch-policy-runner.service dispatch-policy-worker@try.service dispatch-policy-admin.service; do
        if (cd "$WORK/units" && timeout 60 systemd-analyze verify --man=no "./$name") >"$WORK/verify.out" 2>&1 && [[ ! -s $WORK/verify.out ]]; then
            exposure=$(cd "$WORK/units" && timeout 60 systemd-analyze security --offline=yes "./$name" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: *\([0-9.]* [A-Z]*\).*/\1/p')
            ok "$name: systemd-analyze verify says nothing${exposure:+ (security exposure $exposure)}"
        else
            fail "$name: systemd-analyze verify:"
            show "$WORK/verify.out"
        fi
    done
else
    say "skipped: no systemd-analyze here, the unit files are not verified"
fi

# ---------------------------------------------------------------------------
say "--- dispatch-policy-runner.service"

RUNNER_UP=0
if prepare "$RUNNER_UNIT" "" "METRICS_BIND=127.0.0.1:0" "RUNNER_OPTIONS=--policy $POLICY"; then
    # TimeoutStopSec against --shutdown-timeout (and the 5 s of cancellation after it).
    shutdown=10s
    for (( i = 1; i < ${#ARGV[@]}; i++ )); do
        [[ ${ARGV[i]} == --shutdown-timeout ]] && shutdown=${ARGV[i + 1]}
        [[ ${ARGV[i]} == --shutdown-timeout=* ]] && shutdown=${ARGV[i]#*=}
    done
    stop_limit=$(seconds "$(unit_values "$RUNNER_UNIT" TimeoutStopSec | tail -n 1)")
    if awk -v s="$(duration "$shutdown")" -v t="$stop_limit" 'BEGIN { exit !(s != "bad" && t != "bad" && t > s + 5) }'; then
        ok "runner: TimeoutStopSec ${stop_limit}s exceeds --shutdown-timeout $shutdown and 5 s"
    else
        fail "runner: TimeoutStopSec ${stop_limit}s must exceed --shutdown-timeout $shutdown plus 5 s"
    fi

    say "runs: ${ARGV[*]}"
    start runner "$ROLE_RUNNER"
    RUNNER_UP=1
    stage 3 || fail "runner: cannot stage jobs"
    RUNNER_JOBS=("${STAGED[@]}")
    if wait_states admitted 20 "${RUNNER_JOBS[@]}"; then
        ok "runner: admitted the ${#RUNNER_JOBS[@]} jobs staged (ids ${RUNNER_JOBS[*]})"
    else
        fail "runner: jobs $LAST_PENDING not admitted within 20 s"
        show "$WORK/runner.err"
    fi
    if [[ " ${ARGV[*]} " == *" --metrics "* ]]; then
        if address=$(listening runner); then
            metrics=$(curl -fsS --max-time 5 "$address/metrics" 2>&1)
            if grep -q "^dispatch_policy_admitted_total{policy=\"$POLICY\"} ${#RUNNER_JOBS[@]}\$" <<<"$metrics"; then
                ok "runner: $address/metrics counts the admissions"
            else
                fail "runner: $address/metrics has no dispatch_policy_admitted_total{policy=\"$POLICY\"} ${#RUNNER_JOBS[@]}"
            fi
            [[ $(curl -fsS --max-time 5 "$address/healthz" 2>&1) == ok ]] && ok "runner: $address/healthz says ok" \
                || fail "runner: $address/healthz does not say ok"
        else
            fail "runner: never said where /metrics listens"
            show "$WORK/runner.err"
        fi
    fi
fi

# ---------------------------------------------------------------------------
say "--- dispatch-policy-worker@.service"

if ! "$BIN" work --help 2>&1 | grep -q '^USAGE: dispatch-policy work'; then
    # (work --help exits 0 even without a work command: the parser prints the
    # top-level help, hence the USAGE line.)
    say "skipped: this binary has no 'dispatch-policy work' (work --help shows no USAGE: dispatch-policy work)"
elif (( RUNNER_UP == 0 )); then
    fail "worker: not tried, the runner did not start"
else
    OUT=$WORK/jobs.out
    cat >"$WORK/job.sh" <<EOF
#!/bin/sh
# One job: its args on stdin, the job in the environment.
input=\$(cat)
printf '%s|%s|%s|%s|%s|%s\n' "\$DISPATCH_POLICY_JOB_ID" "\$DISPATCH_POLICY_POLICY" "\$DISPATCH_POLICY_QUEUE" \\
    "\$DISPATCH_POLICY_ATTEMPT" "\$DISPATCH_POLICY_CONTEXT" "\$input" >> '$OUT'
case \$input in *slow*) sleep 3; echo "slow done \$DISPATCH_POLICY_JOB_ID" >> '$OUT' ;; esac
exit 0
EOF
    chmod +x "$WORK/job.sh"
    : >"$OUT"
    if prepare "$WORKER_UNIT" "$POLICY" "WORKER_COMMAND=$WORK/job.sh" "WORKER_OPTIONS=--concurrency 2"; then
        say "runs: ${ARGV[*]}"
        start worker "$ROLE_WORKER"
        if wait_states completed 30 "${RUNNER_JOBS[@]}"; then
            ok "worker: the ${#RUNNER_JOBS[@]} admitted jobs end completed"
        else
            fail "worker: jobs $LAST_PENDING not completed within 30 s"
            show "$WORK/worker.err"
        fi
        bad=0
        for id in "${RUNNER_JOBS[@]}"; do
            line=$(grep "^$id|" "$OUT" | head -n 1)
            IFS='|' read -r _ policy queue attempt context input <<<"$line"
            if [[ $policy != "$POLICY" || $queue != default || $attempt != 1 || $context != *account_id* || $input != *'"try"'* ]]; then
                fail "worker: job $id ran with ${line:-nothing} (want id|$POLICY|default|1|context|args)"
                bad=1
            fi
        done
        (( bad == 0 )) && ok "worker: the command ran once per job with its args on stdin and DISPATCH_POLICY_* set"
        # Drain: SIGTERM while a command runs (3 s); the worker waits for it.
        if stage 1 '{"slow": true}'; then
            slow=${STAGED[0]}
            deadline=$(( SECONDS + 20 ))
            until grep -q "^$slow|" "$OUT" || (( SECONDS >= deadline )); do sleep 0.1; done
            grep -q "^$slow|" "$OUT" || fail "worker: the slow job $slow never started"
        else
            fail "worker: cannot stage the slow job"
            slow=""
        fi
        stop worker "$WORKER_UNIT"
        if [[ -n $slow ]]; then
            if grep -q "^slow done $slow\$" "$OUT" && [[ $(state "$slow") == completed ]]; then
                ok "worker: SIGTERM let the running command finish, and its job completed"
            else
                fail "worker: after SIGTERM, the running job $slow is $(state "$slow")"
            fi
        fi
    fi
fi

if (( RUNNER_UP == 1 )); then stop runner "$RUNNER_UNIT"; fi

# ---------------------------------------------------------------------------
say "--- dispatch-policy-admin.service"

TOKEN=try-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
# An empty token file: a configuration error, which systemd must not restart.
CREDENTIAL[admin-token]=""
if prepare "$ADMIN_UNIT" "" "ADMIN_BIND=127.0.0.1:0" "ADMIN_OPTIONS=--allow-actions"; then
    $SETSID env -i "PATH=$SYS_PATH" "HOME=${HOME:-/}" "DATABASE_URL=$DATABASE_URL" \
        "CREDENTIALS_DIRECTORY=${UENV[CREDENTIALS_DIRECTORY]:-}" timeout 30 "${ARGV[@]}" >/dev/null 2>"$WORK/admin-empty.err"
    rc=$?
    [[ $rc == 78 ]] && ok "admin: an empty token file exits 78 (not restarted)" \
        || { fail "admin: an empty token file exits $rc, not 78"; show "$WORK/admin-empty.err"; }
fi
# The token as systemd hands it over: a credential file, with its newline.
CREDENTIAL[admin-token]=$TOKEN$'\n'
if prepare "$ADMIN_UNIT" "" "ADMIN_BIND=127.0.0.1:0" "ADMIN_OPTIONS=--allow-actions"; then
    say "runs: ${ARGV[*]}"
    start admin "$ROLE_OPERATOR"
    if address=$(listening admin); then
        [[ $(curl -fsS --max-time 5 "$address/healthz" 2>&1) == ok ]] && ok "admin: $address/healthz says ok" \
            || fail "admin: $address/healthz does not say ok"
        stage 1 || fail "admin: cannot stage a job"
        for page in / "/policies/$POLICY" "/jobs/${STAGED[0]:-0}"; do
            if curl -fsS --max-time 10 "$address$page" -o "$WORK/page.html" 2>"$WORK/curl.err" && grep -q "$POLICY" "$WORK/page.html"; then
                ok "admin: $page shows the policy"
            else
                fail "admin: $page does not show the policy"
                show "$WORK/curl.err"
            fi
        done
        if curl -fsS --max-time 10 "$address/metrics" -o "$WORK/metrics.txt" 2>"$WORK/curl.err" && grep -q '^dispatch_policy_up 1' "$WORK/metrics.txt"; then
            ok "admin: /metrics says dispatch_policy_up 1"
        else
            fail "admin: /metrics does not say dispatch_policy_up 1"
            show "$WORK/curl.err"
        fi
        paused() { curl -fsS --max-time 5 "$address/metrics" | sed -n "s/^dispatch_policy_paused{policy=\"$POLICY\"} //p"; }
        action() { curl -sS --max-time 10 -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $1" -d "policy=$POLICY" "$address/actions/$2"; }
        code=$(action "wrong-token-wrong-token" pause)
        [[ $code == 403 && $(paused) == 0.0 ]] && ok "admin: a wrong token is refused (403)" || fail "admin: a wrong token got $code"
        code=$(action "$TOKEN" pause)
        [[ $code == 303 && $(paused) == 1.0 ]] && ok "admin: the token pauses the policy" || fail "admin: pause with the token got $code, paused $(paused)"
        code=$(action "$TOKEN" resume)
        [[ $code == 303 && $(paused) == 0.0 ]] && ok "admin: and resumes it" || fail "admin: resume with the token got $code, paused $(paused)"
    else
        fail "admin: never said where it listens"
        show "$WORK/admin.err"
    fi
    stop admin "$ADMIN_UNIT"
fi

# ---------------------------------------------------------------------------
say "--- cron/dispatch-policy"

CRON_SHELL=/bin/sh
declare -a CRON_ENV=()
CRON_LINE=""
while IFS= read -r line; do
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    if [[ $line =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$ ]]; then
        name=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
        case $name in
            SHELL) CRON_SHELL=$value ;;
            DATABASE_URL | PG*) ;;   # the test's connection instead
            *) CRON_ENV+=("$name=$value") ;;
        esac
    elif [[ -z $CRON_LINE ]]; then
        CRON_LINE=$line
    else
        fail "cron: more than one job line; try.sh tries the first only"
    fi
done <"$CRON_FILE"

read -r m h dom mon dow user cron_command <<<"$CRON_LINE"
if [[ "$m $h $dom $mon $dow" != "* * * * *" || -z $user || $cron_command != *" tick --for "* ]]; then
    fail "cron: the job line is not '* * * * *  USER  ... tick --for D': $CRON_LINE"
else
    cron_for=$(sed -n 's/.* --for \([^ ]*\).*/\1/p' <<<"$cron_command")
    if awk -v d="$(duration "$cron_for")" 'BEGIN { exit !(d != "bad" && d < 60) }'; then
        ok "cron: every minute as $user, tick --for $cron_for (under the minute between two runs)"
    else
        fail "cron: --for $cron_for is not under a minute"
    fi
    cron_command=${cron_command//\/usr\/local\/bin\/dispatch-policy/$BIN}
    cron_command=${cron_command/ --for $cron_for/ --for 3s --policy $POLICY}
    say "runs twice at once: $CRON_SHELL -c '$cron_command'"
    stage 4 || fail "cron: cannot stage jobs"
    CRON_JOBS=("${STAGED[@]}")
    env_role=()
    [[ -n $ROLE_RUNNER ]] && env_role=("PGOPTIONS=${PGOPTIONS:+$PGOPTIONS }-c role=$ROLE_RUNNER")
    pg=()
    for key in $(compgen -e); do [[ $key == PG* && $key != PGOPTIONS ]] && pg+=("$key=${!key}"); done
    t0=$(now)
    for run in 1 2; do
        $SETSID env -i "HOME=${HOME:-/}" "LOGNAME=${LOGNAME:-root}" "PATH=/usr/bin:/bin" "${CRON_ENV[@]}" "${pg[@]}" "${env_role[@]}" \
            "DATABASE_URL=$DATABASE_URL" "$CRON_SHELL" -c "$cron_command" >"$WORK/cron$run.out" 2>"$WORK/cron$run.err" &
        PID[cron$run]=$!
    done
    for run in 1 2; do
        wait "${PID[cron$run]}"; rc=$?
        unset "PID[cron$run]"
        elapsed=$(since "$t0")
        if [[ $rc == 0 && ! -s $WORK/cron$run.out && ! -s $WORK/cron$run.err ]]; then
            ok "cron: run $run exits 0 after ${elapsed}s with nothing for cron to mail"
        else
            fail "cron: run $run exit status $rc after ${elapsed}s; its output:"
            show "$WORK/cron$run.out"
            show "$WORK/cron$run.err"
        fi
        awk -v e="$elapsed" 'BEGIN { exit !(e < 3 + 2 + 10) }' || fail "cron: run $run took ${elapsed}s for --for 3s"
    done
    if wait_states admitted 5 "${CRON_JOBS[@]}"; then
        ok "cron: the two runs admitted the ${#CRON_JOBS[@]} jobs staged"
    else
        fail "cron: jobs $LAST_PENDING not admitted"
    fi
fi

# ---------------------------------------------------------------------------
if (( TRACE == 1 )); then
    say "--- the sandbox of the runner and the admin, against what they did (strace)"

    # syscalls GROUP-OR-NAME...: the system calls they name, groups expanded.
    declare -A EXPANDED=()
    syscalls() {
        local item
        for item in "$@"; do
            if [[ $item == @* ]]; then
                if [[ -z ${EXPANDED[$item]+set} ]]; then
                    EXPANDED[$item]=$(systemd-analyze syscall-filter "$item" 2>/dev/null | tail -n +2 \
                        | sed -e 's/^[[:space:]]*//' -e '/^#/d' -e '/^$/d' | tr '\n' ' ')
                fi
                # shellcheck disable=SC2086
                syscalls ${EXPANDED[$item]}
            else
                printf '%s\n' "$item"
            fi
        done
    }

    for name in runner admin; do
        [[ -n ${STARTED[$name]:-} ]] || continue
        unit=$RUNNER_UNIT
        [[ $name == admin ]] && unit=$ADMIN_UNIT
        trace=$WORK/$name.strace
        # The tracer is a detached process: let it write its last lines.
        deadline=$(( SECONDS + 5 ))
        until grep -q '+++ exited with' "$trace" 2>/dev/null || (( SECONDS >= deadline )); do sleep 0.1; done
        [[ -s $trace ]] || { fail "$name: no trace"; continue; }
        # A name strace gives a number no kernel has (syscall_0x7feff4000000,
        # seen under load: a thread's registers read as it exited) is no call.
        used=$(grep -oE '^[0-9]+ +[a-z_0-9]+\(' "$trace" | awk '{ sub(/\(/, "", $2); print $2 }' \
            | grep -vE '^syscall_0x[0-9a-f]{9,}$' | sort -u)
        allowed=() denied=()
        while IFS= read -r value; do
            if [[ $value == ~* ]]; then
                # shellcheck disable=SC2086
                denied+=($(syscalls ${value#\~}))
            else
                # shellcheck disable=SC2206
                allowed+=($(syscalls $value))
            fi
        done < <(unit_values "$unit" SystemCallFilter)
        if (( ${#allowed[@]} + ${#denied[@]} > 0 )); then
            outside=()
            for call in $used; do
                (( ${#allowed[@]} > 0 )) && [[ " ${allowed[*]} " != *" $call "* ]] && { outside+=("$call"); continue; }
                [[ " ${denied[*]} " == *" $call "* ]] && outside+=("$call")
            done
            if (( ${#outside[@]} == 0 )); then
                ok "$name: its $(wc -w <<<"$used") system calls all pass SystemCallFilter="
            else
                fail "$name: SystemCallFilter= would refuse ${outside[*]}"
            fi
        fi
        families=$(unit_values "$unit" RestrictAddressFamilies | tr '\n' ' ')
        if [[ -n $families ]]; then
            used_families=$(grep -oE 'socket(pair)?\(AF_[A-Z0-9]+' "$trace" | sed 's/.*(//' | sort -u | tr '\n' ' ')
            outside=()
            for family in $used_families; do [[ " $families " == *" $family "* ]] || outside+=("$family"); done
            (( ${#outside[@]} == 0 )) && ok "$name: its sockets (${used_families% }) pass RestrictAddressFamilies=" \
                || fail "$name: RestrictAddressFamilies= would refuse ${outside[*]}"
        fi
        if [[ $(unit_values "$unit" MemoryDenyWriteExecute | tail -n 1) == yes ]]; then
            if grep -Eq '^[0-9]+ +(mmap|mprotect|pkey_mprotect)\(.*(PROT_WRITE\|PROT_EXEC|PROT_EXEC\|PROT_WRITE)|^[0-9]+ +(mprotect|pkey_mprotect)\(.*PROT_EXEC' "$trace"; then
                fail "$name: MemoryDenyWriteExecute= would refuse a writable and executable mapping"
            else
                ok "$name: no writable and executable mapping (MemoryDenyWriteExecute=)"
            fi
        fi
    done
fi

# ---------------------------------------------------------------------------
if (( FAILURES == 0 )); then
    say "all $CHECKS checks passed in ${SECONDS}s"
    exit 0
fi
say "$FAILURES of $CHECKS checks failed (${SECONDS}s)" >&2
exit 1
