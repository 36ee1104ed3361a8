# Sourced by the race scripts (from the repository's root): psql as they
# call it, and a fresh database built from Migrations/.
#
#   race_database DB [BEFORE]   drops and creates DB, then applies every
#                               migration in order, each in one transaction
#                               (only those whose file name sorts before
#                               BEFORE, when given: the script applies the
#                               rest itself, during the race)
psql=(psql -X -q -v ON_ERROR_STOP=1)

race_database() {
  local db=$1 before=${2:-} f
  "${psql[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" 2>/dev/null
  for f in Migrations/*.sql; do
    if [[ -z $before || $(basename "$f") < $before ]]; then
      "${psql[@]}" -d "$db" -1 -f "$f" >/dev/null
    fi
  done
}
