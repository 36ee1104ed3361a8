#!/bin/bash
# Creates the benchmark databases on a running server (PGHOST, PGPORT, PGUSER):
#   staging_before  Migrations/ up to BEFORE (default 0011, main before this work)
#   staging_after   every file in Migrations/
# Each migration file is applied with psql in one transaction, as the Swift
# migrator does (it also records a schema_migrations row; the checksum here is
# of the file as psql reads it and is not meant for the migrator).
#
#   ./prepare.sh [BEFORE]
set -euo pipefail
cd "$(dirname "$0")"
BEFORE=${1:-0011}
MIGRATIONS=../../Migrations
PSQL="psql -X -q -v ON_ERROR_STOP=1"
migrate() {  # db, last version to apply
  local db=$1 last=$2 f b v
  for f in $(ls "$MIGRATIONS"/*.sql | sort); do
    b=$(basename "$f"); v=$((10#${b%%_*}))
    [ "$v" -le "$((10#$last))" ] || break
    { echo "BEGIN;"; cat "$f"; echo
      echo "INSERT INTO dispatch_policy.schema_migrations (version, name, checksum) VALUES ($v, '$b', md5('$b'));"
      echo "COMMIT;"; } | $PSQL -d "$db" >/dev/null
  done
}
for db in staging_before staging_after; do
  $PSQL -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" 2>/dev/null
done
migrate staging_before "$BEFORE"
migrate staging_after 9999
for db in staging_before staging_after; do
  $PSQL -d "$db" -f setup.sql >/dev/null 2>&1
  echo "$db: migrations up to $($PSQL -d "$db" -tAc 'SELECT max(version) FROM dispatch_policy.schema_migrations')"
done
