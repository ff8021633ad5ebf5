#!/usr/bin/env bash
# The review benchmark (issue 15): 1,000,000 votes across 100,000 users and 90 days, on SQLite
# and on Postgres; the p50/p99 of the review summary and listing through the running proxy;
# and what the review surface costs POST /api/feedback (votes/s with its trigger and index
# against the same store without them, interleaved rounds, same binary).
#
#   bash bench/review/run.sh            # both backends
#   BACKENDS=sqlite bash bench/review/run.sh
#   REVIEW_VOTES=100000 bash bench/review/run.sh   # fewer votes, for quicker iteration
#   REVIEW_SPLIT=1 bash bench/review/run.sh        # also: the triggers alone, the indexes alone
#   REVIEW_PROXY=path/to/feedback-proxy bash bench/review/run.sh   # that binary, not a build
#
# The review objects on `votes` (its triggers, its indexes other than the primary key and
# votes_chat_user, and on Postgres its stored generated columns) are read from the migrated
# database itself, dropped and re-created between rounds. Re-adding a stored column rewrites the
# table, so on Postgres both arms start each round on a freshly written table.
#
# Needs: a release build (made here), wrk, psql and a Postgres at DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/postgres) for the Postgres half, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BACKENDS=${BACKENDS:-"sqlite postgres"}
N=${REVIEW_SAMPLES:-200}
ROUNDS=${REVIEW_ROUNDS:-3}
SECS=${REVIEW_WRK_SECS:-10}
CONNS=${REVIEW_WRK_CONNS:-16}
VOTES=${REVIEW_VOTES:-1000000}
SPLIT=${REVIEW_SPLIT:-0}
ADMIN_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
REVIEWER=reviewer@bench.example
RUN=$(mktemp -d /tmp/fp-review-bench.XXXXXX)
PIDS=()
log() { printf '==> %s\n' "$*" >&2; }
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
command -v wrk >/dev/null || { log "wrk is needed (apt-get install wrk)"; exit 1; }

# REVIEW_PROXY=PATH measures that binary instead of building one (an A/B of two builds).
if [ -n "${REVIEW_PROXY:-}" ]; then
  BIN=$REVIEW_PROXY
  [ -x "$BIN" ] || { log "REVIEW_PROXY=$BIN is not an executable"; exit 1; }
else
  log "building (release)"
  cargo build -q --release --bin feedback-proxy
  BIN=$ROOT/target/release/feedback-proxy
fi
cargo build -q --release --manifest-path bench/Cargo.toml --target-dir "$ROOT/target"
FPB=$ROOT/target/release/fpbench
read -r P_UP P_PROXY < <("$FPB" ports 2 | tr "\n" " "; echo)
"$FPB" upstream --threads 2 > "$RUN/upstream.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q listening "$RUN/upstream.log" && break; sleep 0.1; done
UPSTREAM=$(sed -n 's/^listening //p' "$RUN/upstream.log" | head -1)

http_ok() {
  ( exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' "$2" >&3
    IFS= read -r -t 2 line <&3 || exit 1
    [[ $line == "HTTP/1.1 200"* ]] ) 2>/dev/null
}

config() { # FILE STORE_URL
  cat > "$1" <<EOF
listen = "127.0.0.1:$P_PROXY"
[log]
level = "warn"
[identity]
trust_forwarded_headers = true
[agent]
url = "http://$UPSTREAM"
[store]
url = "$2"
pool_size = 16
[feedback.rate_limit]
per_second = 0
[review]
users = ["$REVIEWER"]
EOF
}

wrk_votes() { # -> requests/s
  wrk -t2 -c"$CONNS" -d"${SECS}s" --timeout 10s -s bench/wrk/feedback.lua "http://127.0.0.1:$P_PROXY" \
    -- a 100 10 2>&1 | sed -n 's/^Requests\/sec: *//p'
}

for backend in $BACKENDS; do
  case $backend in
    sqlite)
      URL="sqlite://$RUN/review.db"
      sql() { python3 -c 'import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.stdin.read()); c.commit()' "$RUN/review.db"; }
      sqlq() { python3 -c 'import sqlite3,sys; print("\n".join(str(r[0]) for r in sqlite3.connect(sys.argv[1]).execute(sys.argv[2]) if r[0] is not None))' "$RUN/review.db" "$1"; }
      Q_TRIGGERS="SELECT sql || ';' FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'votes'"
      Q_DROP_TRIGGERS="SELECT 'DROP TRIGGER ' || name || ';' FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'votes'"
      Q_INDEXES="SELECT sql || ';' FROM sqlite_master WHERE type = 'index' AND tbl_name = 'votes' AND sql IS NOT NULL AND name <> 'votes_chat_user'"
      Q_DROP_INDEXES="SELECT 'DROP INDEX ' || name || ';' FROM sqlite_master WHERE type = 'index' AND tbl_name = 'votes' AND sql IS NOT NULL AND name <> 'votes_chat_user'"
      Q_COLUMNS="SELECT NULL WHERE 0"; Q_DROP_COLUMNS=$Q_COLUMNS
      SETTLE="PRAGMA wal_checkpoint(TRUNCATE);"
      GENERATE() { sed "s/i < 1000000/i < $VOTES/" bench/review/generate-sqlite.sql | sql; }
      ;;
    postgres)
      command -v psql >/dev/null || { log "no psql: Postgres skipped"; continue; }
      psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS fp_review_bench" -c "CREATE DATABASE fp_review_bench"
      DB_URL="${ADMIN_URL%/*}/fp_review_bench"
      URL="$DB_URL?sslmode=disable"
      sql() { psql -q -v ON_ERROR_STOP=1 "$DB_URL" -c "SET search_path = feedback_proxy" -f -; }
      sqlq() { psql -qAt -v ON_ERROR_STOP=1 "$DB_URL" -c "SET search_path = feedback_proxy" -c "$1"; }
      Q_TRIGGERS="SELECT pg_get_triggerdef(oid) || ';' FROM pg_trigger WHERE tgrelid = 'votes'::regclass AND NOT tgisinternal"
      Q_DROP_TRIGGERS="SELECT 'DROP TRIGGER ' || quote_ident(tgname) || ' ON votes;' FROM pg_trigger WHERE tgrelid = 'votes'::regclass AND NOT tgisinternal"
      Q_INDEXES="SELECT pg_get_indexdef(indexrelid) || ';' FROM pg_index WHERE indrelid = 'votes'::regclass AND NOT indisprimary AND indexrelid::regclass::text <> 'votes_chat_user'"
      Q_DROP_INDEXES="SELECT 'DROP INDEX ' || indexrelid::regclass::text || ';' FROM pg_index WHERE indrelid = 'votes'::regclass AND NOT indisprimary AND indexrelid::regclass::text <> 'votes_chat_user'"
      # The stored generated columns of votes (version 6's updated_minute, the listing's key).
      GENERATED="FROM pg_attribute JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum WHERE attrelid = 'votes'::regclass AND attgenerated = 's' AND NOT attisdropped"
      Q_COLUMNS="SELECT 'ALTER TABLE votes ADD COLUMN ' || quote_ident(attname) || ' ' || format_type(atttypid, atttypmod) || ' GENERATED ALWAYS AS (' || pg_get_expr(adbin, adrelid) || ') STORED;' $GENERATED"
      Q_DROP_COLUMNS="SELECT 'ALTER TABLE votes DROP COLUMN ' || quote_ident(attname) || ';' $GENERATED"
      SETTLE="ANALYZE votes; CHECKPOINT;"
      GENERATE() { sed "s/set n 1000000/set n $VOTES/" bench/review/generate-postgres.sql | sql; }
      ;;
    *) log "unknown backend $backend"; exit 1 ;;
  esac
  config "$RUN/$backend.toml" "$URL"
  "$BIN" migrate --config "$RUN/$backend.toml" >/dev/null
  log "$backend: generating $VOTES votes (with links and deliveries)"
  t0=$(date +%s)
  GENERATE
  log "$backend: generated in $(( $(date +%s) - t0 )) s"
  "$BIN" serve --config "$RUN/$backend.toml" > "$RUN/proxy-$backend.log" 2>&1 &
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
  for _ in $(seq 200); do http_ok "$P_PROXY" /healthz && break; sleep 0.1; done
  http_ok "$P_PROXY" /healthz || { log "the proxy did not start: $(tail -3 "$RUN/proxy-$backend.log")"; exit 1; }

  log "$backend: review queries, $N requests each, one connection"
  python3 bench/review/timing.py "http://127.0.0.1:$P_PROXY" "$REVIEWER" "$N"

  TRIGGERS=$(sqlq "$Q_TRIGGERS"); DROP_TRIGGERS=$(sqlq "$Q_DROP_TRIGGERS")
  INDEXES=$(sqlq "$Q_INDEXES"); DROP_INDEXES=$(sqlq "$Q_DROP_INDEXES")
  COLUMNS=$(sqlq "$Q_COLUMNS"); DROP_COLUMNS=$(sqlq "$Q_DROP_COLUMNS")
  log "$backend: the review objects on votes:"$'\n'"$TRIGGERS"$'\n'"$INDEXES"$'\n'"$COLUMNS"
  log "$backend: POST /api/feedback, wrk -c$CONNS ${SECS}s × $ROUNDS rounds, with and without the review triggers and indexes"
  "$FPB" feedback-seed --url "http://127.0.0.1:$P_PROXY" --users 100 --messages 10 --tag a \
    --check-status no_experiment_id >&2
  arms=(with without); [ "$SPLIT" = 1 ] && arms+=(triggers-only indexes-only)
  declare -A rates=()
  for r in $(seq "$ROUNDS"); do
    line="    round $r:"
    # Odd rounds run the arms in order, even rounds in reverse: neither arm always comes first.
    order=("${arms[@]}"); (( r % 2 == 0 )) && for ((i=${#arms[@]}-1, j=0; i>=0; i--, j++)); do order[j]=${arms[i]}; done
    for arm in "${order[@]}"; do
      case $arm in
        without) sql <<<"$DROP_TRIGGERS"$'\n'"$DROP_INDEXES"$'\n'"$DROP_COLUMNS" ;;
        triggers-only) sql <<<"$DROP_INDEXES" ;;
        indexes-only) sql <<<"$DROP_TRIGGERS" ;;
      esac
      # Each arm starts from settled storage: the DDL before it (a table rewrite on Postgres)
      # leaves dirty pages and WAL that would otherwise be flushed during its run, and a
      # re-added column has no statistics until analyzed (the listing's plans need them).
      sql <<<"$SETTLE"
      rate=$(wrk_votes)
      case $arm in
        without) sql <<<"$COLUMNS"$'\n'"$INDEXES"$'\n'"$TRIGGERS" ;;
        triggers-only) sql <<<"$INDEXES" ;;
        indexes-only) sql <<<"$TRIGGERS" ;;
      esac
      rates[$arm]="${rates[$arm]:-} $rate"
      line+=" $arm $rate"
    done
    printf '%s votes/s\n' "$line" >&2
  done
  args=(); for arm in "${arms[@]}"; do args+=("$arm=${rates[$arm]}"); done
  python3 - "${args[@]}" <<'EOF'
import statistics, sys
med = {a.split("=")[0]: statistics.median(float(x) for x in a.split("=")[1].split()) for a in sys.argv[1:]}
base = med["without"]
for arm, m in med.items():
    print(f"    votes/s median, {arm}: {m:.0f} = {m / base:.3f}x of without ({(1 - m / base) * 100:+.1f} % cost)")
EOF
  kill "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true
done
rm -rf "$RUN"
