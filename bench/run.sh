#!/usr/bin/env bash
# The benchmark harness (issue 8): direct vs feedback-proxy vs nginx, side by side, interleaved.
#
#   bash bench/run.sh            # the full run (a few minutes once built); `make bench`
#   bash bench/run.sh --smoke    # seconds; keeps the harness working (CI); figures meaningless
#   bash bench/run.sh --only latency,sse --out DIR
#   scenarios: latency throughput sse idle feedback remote-chat remote-votes startup inspector
#
# Starts on 127.0.0.1 only: the fast upstream (bench/, Rust), the proxy (release build,
# embedded SQLite store), nginx (Debian's package, bench/nginx.conf.in), and for the feedback
# scenario a private Postgres cluster (or BENCH_PG_URL), two more proxies on it and the MLflow
# stand-in. Load: wrk (Debian) for plain HTTP, fpbench for SSE timing and idle streams, pgbench
# for the SQL baseline. The remote-store scenarios put `fpbench relay` (5 ms each way) between
# the proxy and Postgres; the start-up scenario starts the proxy binary itself, 20 times. Every
# load is bounded in time and stops by itself; every process started here is stopped on exit,
# Ctrl-C included. Installs nginx, wrk and PostgreSQL from Debian's
# packages if they are missing (and says so).
#
# Results: DIR/raw.jsonl (one line per measurement), DIR/results.md (the tables), logs in DIR.
# Environment: BENCH_PROFILE=release|debug (default: release; debug for --smoke),
#   BENCH_PG_URL=postgres://… (use that server instead of a private cluster), BENCH_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODE=full
ONLY=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --only) ONLY=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ---------------------------------------------------------------- sizes
WORKERS=2                 # nginx worker_processes = proxy tokio workers = upstream threads
if [ "$MODE" = smoke ]; then
  PROFILE=${BENCH_PROFILE:-debug}
  ROUNDS=1; LAT_SECS=1; THR_SECS=1; THR_CONNS=16
  SSE_CONCURRENCY="1 20"; SSE_EVENTS=8; SSE_INTERVAL_MS=5; SSE_REPEAT_C1=2
  IDLE_WANT=200; IDLE_INTERVAL_S=1; IDLE_HOLD_S=2
  FB_SECS=1; FB_ROUNDS=1; FB_USERS=4; FB_MESSAGES=4; FB_CONNS=8
  RC_ROUNDS=1; RC_REPEAT=3; RV_SECS=1; RV_ROUNDS=1; RTT_SECS=1
  STARTS=3; IDLE_STARTS=1; IDLE_MS=500
  # Not part of a plain smoke run (seconds of seeding and loads through the relay; `--smoke
  # --only remote-votes` runs it).
  SMOKE_LEAVES_OUT=remote-votes
else
  PROFILE=${BENCH_PROFILE:-release}
  ROUNDS=3; LAT_SECS=5; THR_SECS=8; THR_CONNS=64
  SSE_CONCURRENCY="1 100 1000"; SSE_EVENTS=64; SSE_INTERVAL_MS=20; SSE_REPEAT_C1=5
  IDLE_WANT=10000; IDLE_INTERVAL_S=10; IDLE_HOLD_S=12
  FB_SECS=6; FB_ROUNDS=5; FB_USERS=32; FB_MESSAGES=16; FB_CONNS=32
  RC_ROUNDS=3; RC_REPEAT=100; RV_SECS=6; RV_ROUNDS=3; RTT_SECS=2
  STARTS=20; IDLE_STARTS=3; IDLE_MS=2000
  SMOKE_LEAVES_OUT=""
fi
# The remote store: the delay each way, and the chat the TTFB scenario asks for (4 events 5 ms
# apart: only the first byte matters).
REMOTE_DELAY_MS=5; RC_EVENTS=4; RC_INTERVAL_MS=5
wants() {
  if [ -z "$ONLY" ]; then [[ ",$SMOKE_LEAVES_OUT," != *",$1,"* ]]
  else [[ ",$ONLY," == *",$1,"* ]]; fi
}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

RUN=$(mktemp -d /tmp/fp-bench.XXXXXX)
chmod 755 "$RUN"   # the postgres user must enter it (private cluster)
OUT=${OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)-$MODE}
mkdir -p "$OUT"
RAW=$OUT/raw.jsonl
: > "$RAW"
T_START=$(date +%s)

# ---------------------------------------------------------------- clean-up
PIDS=()
PG_STOP=()
POLICY_RC_CREATED=""
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local status=$? i
  set +e
  # Nothing may cut the clean-up short: not a second Ctrl-C, and not SIGPIPE when the output was
  # piped (through tee, say) and the reader died with the first Ctrl-C.
  trap '' INT TERM PIPE
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do stop_pid "${PIDS[i]}"; done
  if ((${#PG_STOP[@]})); then "${PG_STOP[@]}" >/dev/null 2>&1; fi
  [ -n "$POLICY_RC_CREATED" ] && rm -f /usr/sbin/policy-rc.d
  if [ -n "${BENCH_KEEP:-}" ]; then
    log "kept $RUN"
  else
    cp "$RUN"/*.log "$OUT"/ 2>/dev/null
    rm -rf "$RUN"
  fi
  [ $status -ne 0 ] && log "failed (exit $status); logs in $OUT"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Loads run under `timeout --foreground`: plain `timeout` moves its command into a process group
# of its own, where a Ctrl-C at the terminal never arrives (and bash, seeing its child exit
# normally, would carry on).

# ---------------------------------------------------------------- tools
ensure_tools() {
  local pkgs=()
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || pkgs+=(nginx)
  command -v wrk >/dev/null 2>&1 || pkgs+=(wrk)
  if [ -z "${BENCH_PG_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    pkgs+=(postgresql)
  elif ! command -v pgbench >/dev/null 2>&1; then
    pkgs+=(postgresql)
  fi
  ((${#pkgs[@]})) || return 0
  [ "$(id -u)" = 0 ] || die "missing: ${pkgs[*]} (install them from Debian's packages, or run as root)"
  log "installing from Debian's packages: ${pkgs[*]}"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Packages must not start their services (nginx would listen on 0.0.0.0:80).
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    POLICY_RC_CREATED=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  if [ -n "$POLICY_RC_CREATED" ]; then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=""; fi
}
ensure_tools
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
PGBENCH=$(command -v pgbench || echo "$PGBIN/pgbench")
PSQL=$(command -v psql || echo "$PGBIN/psql")

# Descriptors: as many as the machine allows (the hard limit; raising it needs CAP_SYS_RESOURCE).
HARD=$(ulimit -Hn)
[ "$HARD" = unlimited ] && HARD=1048576
ulimit -n "$HARD" 2>/dev/null || true
NOFILE=$(ulimit -n)
# Each proxied stream holds two sockets in one process (client side and upstream side).
IDLE_MAX=$(( (NOFILE - 200) / 2 ))
IDLE_STREAMS=$(( IDLE_WANT < IDLE_MAX ? IDLE_WANT : IDLE_MAX ))
log "open files: $NOFILE per process (hard limit $HARD); idle streams: $IDLE_STREAMS"

# ---------------------------------------------------------------- build
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$PROFILE" = release ]; then CARGO_PROFILE=(--release); BIN=$TARGET_DIR/release
else CARGO_PROFILE=(); BIN=$TARGET_DIR/debug; fi
log "building the proxy and the harness ($PROFILE)"
# BENCH_PROXY=PATH: measure that proxy binary instead of building this checkout's.
[ -z "${BENCH_PROXY:-}" ] && cargo build -q "${CARGO_PROFILE[@]}" --bin feedback-proxy
cargo build -q "${CARGO_PROFILE[@]}" --manifest-path bench/Cargo.toml --target-dir "$TARGET_DIR"
PROXY=${BENCH_PROXY:-$BIN/feedback-proxy}
FPB=$BIN/fpbench
HAVE_INSPECTOR_BENCH=""
if [ -f benches/inspector.rs ] && grep -Eq '^name *= *"inspector"' Cargo.toml; then
  HAVE_INSPECTOR_BENCH=1
  if [ "$MODE" = full ] && wants inspector; then
    log "building the inspector benchmark"
    cargo bench -q --bench inspector --no-run >/dev/null 2>&1 || log "building benches/inspector.rs failed"
  fi
fi

# ---------------------------------------------------------------- helpers
# Runs a command in the background with its output in $RUN/NAME.log; sets LAST_PID.
start_bg() {
  local name=$1; shift
  "$@" > "$RUN/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
# Whether GET PATH on HOST:PORT answers 200 (bash's /dev/tcp: no curl needed).
http_ok() {
  ( exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf 'GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$3" "$1" "$2" >&3
    IFS= read -r -t 2 line <&3 || exit 1
    [[ $line == "HTTP/1.1 200"* ]] ) 2>/dev/null
}
# Waits until NAME (pid) answers 200 on HOST:PORT PATH.
wait_ready() {
  local name=$1 pid=$2 host=$3 port=$4 path=$5 tries=${6:-150} i
  for i in $(seq 1 "$tries"); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited during start-up:"; tail -5 "$RUN/$name.log" >&2; return 1
    fi
    http_ok "$host" "$port" "$path" && return 0
    sleep 0.1
  done
  log "$name did not become ready"; tail -5 "$RUN/$name.log" >&2; return 1
}
# The address a stand-in printed (`listening ADDR`, or `KEY ADDR`).
listening_addr() {
  local name=$1 key=${2:-listening} i addr
  for i in $(seq 1 100); do
    addr=$(sed -n "s/^$key //p" "$RUN/$name.log" 2>/dev/null | head -1)
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    sleep 0.05
  done
  die "$name did not start: $(tail -3 "$RUN/$name.log")"
}
children() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(cut -d' ' -f4 "$p/stat" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"
  done
  return 0
}
# CPU time (ns) used so far by the given processes, summed over their threads (the first field
# of /proc/PID/task/TID/schedstat: nanoseconds on a CPU; clock-tick accounting is too coarse for
# one SSE stream).
cpu_ns() {
  local t=0 p f a
  for p in "$@"; do
    for f in /proc/"$p"/task/*/schedstat; do
      read -r a _ < "$f" 2>/dev/null && t=$((t + a))
    done
  done
  echo "$t"
}
# with_cpu METRICS_JSON NANOSECONDS OPERATIONS: adds "cpu_us_per_op" (CPU µs of the system under
# test per request or event: less sensitive to a noisy neighbour than latency).
with_cpu() {
  local per="null"
  [ "$3" -gt 0 ] && per=$(awk -v ns="$2" -v n="$3" 'BEGIN { printf "%.2f", ns / n / 1000 }')
  printf '%s,"cpu_us_per_op":%s}' "${1%\}}" "$per"
}
# record SCENARIO SYSTEM ROUND PARAM METRICS_JSON
record() {
  printf '{"scenario":"%s","system":"%s","round":%s,"param":"%s","metrics":%s}\n' \
    "$1" "$2" "$3" "$4" "$5" >> "$RAW"
}
skip() { printf '{"scenario":"%s","skipped":"%s"}\n' "$1" "$2" >> "$RAW"; log "$1 skipped: $2"; }
# The systems in round R, rotated so that no system always runs first or last.
rotate() {
  local r=$1; shift
  local a=("$@") n=$# i
  for ((i=0; i<n; i++)); do echo "${a[(i+r)%n]}"; done
}
# run_wrk SCENARIO SYSTEM ROUND THREADS CONNS SECS URL SCRIPT [SCRIPT ARGS…]
run_wrk() {
  local scenario=$1 system=$2 round=$3 threads=$4 conns=$5 secs=$6 url=$7 script=$8
  shift 8
  local out json
  local args=(-t"$threads" -c"$conns" -d"${secs}s" --timeout 10s -s "$script" "$url")
  [ $# -gt 0 ] && args+=(-- "$@")
  local pids=(${SYSPIDS[$system]:-}) t0 t1 n s0="" s1=""
  [ -n "${WRK_RELAY:-}" ] && s0=$(relay_stats "$WRK_RELAY")
  t0=$(cpu_ns "${pids[@]}")
  out=$(timeout --foreground -k 5 $((secs + 30)) wrk "${args[@]}" 2>&1) || die "wrk failed on $system: $out"
  t1=$(cpu_ns "${pids[@]}")
  [ -n "${WRK_RELAY:-}" ] && s1=$(relay_stats "$WRK_RELAY")
  json=$(sed -n 's/^WRKJSON //p' <<<"$out")
  [ -n "$json" ] || die "wrk printed no result for $system: $out"
  n=$(sed -n 's/.*"requests":\([0-9]*\).*/\1/p' <<<"$json")
  ((${#pids[@]})) && json=$(with_cpu "$json" $((t1 - t0)) "${n:-0}")
  [ -n "$s0" ] && json=$(with_relay "$json" "$s0" "$s1" "${n:-0}")
  record "$scenario" "$system" "$round" "" "$json"
  printf '    %-15s round %s  %s\n' "$system" "$round" "$json" >&2
}
# One JSON line of a relay's counters (fpbench relay's stats address).
relay_stats() {
  ( exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || exit 1
    IFS= read -r -t 5 line <&3 && printf '%s' "$line" ) 2>/dev/null || die "cannot read the relay's counters at $1"
}
counter() { sed -n "s/.*\"$2\":\([0-9]*\).*/\1/p" <<<"$1"; }
# with_relay METRICS_JSON STATS_BEFORE STATS_AFTER OPERATIONS: adds the store round trips
# (client→server flights through the relay) and statements (Postgres Execute + Query messages)
# per operation, and their totals.
with_relay() {
  local turns stmts per_t="null" per_s="null"
  turns=$(( $(counter "$3" turns) - $(counter "$2" turns) ))
  stmts=$(( $(counter "$3" pg_executes) + $(counter "$3" pg_queries) - $(counter "$2" pg_executes) - $(counter "$2" pg_queries) ))
  if [ "$4" -gt 0 ]; then
    per_t=$(awk -v a="$turns" -v n="$4" 'BEGIN { printf "%.2f", a / n }')
    per_s=$(awk -v a="$stmts" -v n="$4" 'BEGIN { printf "%.2f", a / n }')
  fi
  printf '%s,"store_turns":%s,"store_statements":%s,"store_round_trips_per_op":%s,"store_statements_per_op":%s}' \
    "${1%\}}" "$turns" "$stmts" "$per_t" "$per_s"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
LOAD_BEFORE=$(loadavg)
start_bg loadavg bash -c 'while sleep 5; do cut -d" " -f1 /proc/loadavg; done'

# ---------------------------------------------------------------- systems
read -r P_PROXY P_NGINX P_FB_A P_FB_B P_PG P_RA P_RB < <("$FPB" ports 7 | tr "\n" " "; echo)

start_bg upstream "$FPB" upstream --threads "$WORKERS"
UPSTREAM=$(listening_addr upstream)
UPSTREAM_PID=$LAST_PID

# proxy_config FILE LISTEN_PORT STORE_URL SCHEMA [MLFLOW_ADDR]
proxy_config() {
  sed -e "s|@LISTEN@|127.0.0.1:$2|" -e "s|@UPSTREAM@|$UPSTREAM|" \
      -e "s|@STORE_URL@|$3|" -e "s|@SCHEMA@|$4|" bench/proxy.toml.in > "$1"
  if [ -n "${5:-}" ]; then
    printf '\n[mlflow]\ntracking_uri = "http://%s"\nexperiment_id = "1"\nauth = "none"\n' "$5" >> "$1"
  fi
}
proxy_config "$RUN/proxy.toml" "$P_PROXY" "sqlite://$RUN/proxy.db" feedback_proxy
start_proxy() {
  start_bg proxy env TOKIO_WORKER_THREADS=$WORKERS "$PROXY" serve --config "$RUN/proxy.toml"
  PROXY_PID=$LAST_PID
  wait_ready proxy "$PROXY_PID" 127.0.0.1 "$P_PROXY" /healthz || die "the proxy did not start"
}
start_proxy

mkdir -p "$RUN"/nginx-tmp/{body,proxy,fastcgi,uwsgi,scgi}
chmod -R 777 "$RUN/nginx-tmp"
sed -e "s|@WORKERS@|$WORKERS|" -e "s|@NOFILE@|$NOFILE|" \
    -e "s|@WORKER_CONNECTIONS@|$((NOFILE - 100))|" -e "s|@RUN@|$RUN|g" \
    -e "s|@UPSTREAM@|$UPSTREAM|" -e "s|@LISTEN@|127.0.0.1:$P_NGINX|" \
    bench/nginx.conf.in > "$RUN/nginx.conf"
start_nginx() {
  start_bg nginx "$NGINX" -c "$RUN/nginx.conf" -p "$RUN" -e "$RUN/nginx-error.log" -g 'daemon off;'
  NGINX_PID=$LAST_PID
  wait_ready nginx "$NGINX_PID" 127.0.0.1 "$P_NGINX" /healthz || die "nginx did not start"
}
start_nginx

declare -A URL=(
  [direct]="http://$UPSTREAM"
  [proxy]="http://127.0.0.1:$P_PROXY"
  [nginx]="http://127.0.0.1:$P_NGINX"
)
SYSTEMS=(direct proxy nginx)
# Whose CPU time is charged to each system: direct → the upstream; proxy → the proxy process;
# nginx → its workers. (The upstream's share is the same in every column.)
declare -A SYSPIDS
set_syspids() {
  SYSPIDS=([direct]="$UPSTREAM_PID" [proxy]="$PROXY_PID" [nginx]="$(children "$NGINX_PID" | tr '\n' ' ')")
}
set_syspids
log "upstream $UPSTREAM, proxy :$P_PROXY, nginx :$P_NGINX (results: $OUT)"

# A short warm-up of every path (connections, pools, page faults).
for sys in "${SYSTEMS[@]}"; do
  timeout --foreground -k 5 30 wrk -t1 -c4 -d1s -s bench/wrk/post.lua "${URL[$sys]}" >/dev/null 2>&1 || true
done

# ---------------------------------------------------------------- 1. latency
if wants latency; then
  log "1. latency: 1 KiB JSON POST, c=1, ${LAT_SECS}s × $ROUNDS rounds"
  for r in $(seq 1 "$ROUNDS"); do
    for sys in $(rotate "$r" "${SYSTEMS[@]}"); do
      run_wrk latency "$sys" "$r" 1 1 "$LAT_SECS" "${URL[$sys]}" bench/wrk/post.lua
    done
  done
  log "1b. latency, the systems interleaved request by request (fpbench latency), ${LAT_SECS}s × $ROUNDS"
  for r in $(seq 1 "$ROUNDS"); do
    out=$(timeout --foreground -k 5 $((LAT_SECS + 30)) "$FPB" latency --seconds "$LAT_SECS" --round "$r" \
      --target direct="${URL[direct]}" --target proxy="${URL[proxy]}" --target nginx="${URL[nginx]}") \
      || die "the latency client failed"
    printf '%s\n' "$out" >> "$RAW"
    printf '    round %s  %s\n' "$r" "$(tr '\n' ' ' <<<"$out")" >&2
  done
fi

# ---------------------------------------------------------------- 2. throughput
if wants throughput; then
  log "2. throughput: 1 KiB JSON POST, c=$THR_CONNS, ${THR_SECS}s × $ROUNDS rounds"
  for r in $(seq 1 "$ROUNDS"); do
    for sys in $(rotate "$r" "${SYSTEMS[@]}"); do
      run_wrk throughput "$sys" "$r" "$WORKERS" "$THR_CONNS" "$THR_SECS" "${URL[$sys]}" bench/wrk/post.lua
    done
  done
fi

# ---------------------------------------------------------------- 3. SSE timing
if wants sse; then
  log "3. SSE: $SSE_EVENTS events ${SSE_INTERVAL_MS} ms apart at $SSE_CONCURRENCY streams × $ROUNDS rounds"
  for c in $SSE_CONCURRENCY; do
    repeat=1
    [ "$c" = 1 ] && repeat=$SSE_REPEAT_C1
    budget=$(( (SSE_EVENTS * SSE_INTERVAL_MS / 1000 + 30) ))
    for r in $(seq 1 "$ROUNDS"); do
      for sys in $(rotate "$r" "${SYSTEMS[@]}"); do
        pids=(${SYSPIDS[$sys]})
        t0=$(cpu_ns "${pids[@]}")
        json=$(timeout --foreground -k 5 $(( budget * repeat + 30 )) "$FPB" sse --url "${URL[$sys]}" \
          --streams "$c" --events "$SSE_EVENTS" --interval-ms "$SSE_INTERVAL_MS" \
          --repeat "$repeat" --timeout "$budget") || die "the SSE client failed on $sys"
        t1=$(cpu_ns "${pids[@]}")
        json=$(with_cpu "$json" $((t1 - t0)) $((c * SSE_EVENTS * repeat)))
        record sse "$sys" "$r" "streams=$c" "$json"
        printf '    %-6s c=%-5s round %s  %s\n' "$sys" "$c" "$r" "$json" >&2
      done
    done
  done
fi

# ---------------------------------------------------------------- 4. idle streams
if wants idle; then
  log "4. idle streams: $IDLE_STREAMS open streams, one event every ${IDLE_INTERVAL_S}s, held ${IDLE_HOLD_S}s"
  # Fresh processes, so that "before" is a clean baseline for both.
  stop_pid "$PROXY_PID"; start_proxy
  stop_pid "$NGINX_PID"; start_nginx
  set_syspids
  sleep 1
  idle_run() { # SYSTEM PIDS…
    local sys=$1; shift
    local pidargs=() p json
    for p in "$@"; do pidargs+=(--pid "$p"); done
    json=$(timeout --foreground -k 5 $(( IDLE_HOLD_S + 200 )) "$FPB" idle --url "${URL[$sys]}" \
      --streams "$IDLE_STREAMS" --interval-s "$IDLE_INTERVAL_S" --hold "$IDLE_HOLD_S" \
      --timeout 150 "${pidargs[@]}") || die "the idle client failed on $sys"
    record idle "$sys" 1 "" "$json"
    printf '    %-6s %s\n' "$sys" "$json" >&2
  }
  idle_run proxy "$PROXY_PID"
  # shellcheck disable=SC2046
  idle_run nginx "$NGINX_PID" $(children "$NGINX_PID")
fi

# ---------------------------------------------------------------- 5. feedback
# The Postgres server of scenarios 5 and 7: BENCH_PG_URL, or a private cluster started once.
# Sets PG_URL (and PG_HOSTPORT) or PG_FAIL (why not) and returns 1.
PG_URL=""
PG_FAIL=""
ensure_pg() {
  [ -n "$PG_URL" ] && return 0
  [ -n "$PG_FAIL" ] && return 1
  if [ -n "${BENCH_PG_URL:-}" ]; then
    PG_URL=$BENCH_PG_URL
    # host:port of the URL (the relay of scenario 7 needs an IP address there).
    local rest=${PG_URL#*://}
    rest=${rest%%[/?]*}
    PG_HOSTPORT=${rest##*@}
    [[ $PG_HOSTPORT == *:* ]] || PG_HOSTPORT=$PG_HOSTPORT:5432
    return 0
  fi
  [ -n "$PGBIN" ] || { PG_FAIL="no PostgreSQL server binaries"; return 1; }
  log "starting a private PostgreSQL cluster on 127.0.0.1:$P_PG"
  local as=()
  [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  mkdir -p "$RUN/pg"
  [ "$(id -u)" = 0 ] && chown postgres "$RUN/pg"
  "${as[@]}" "$PGBIN/initdb" -D "$RUN/pg/data" -A trust -U postgres --no-sync >"$RUN/pg-init.log" 2>&1 \
    || { PG_FAIL="initdb failed: $(tail -1 "$RUN/pg-init.log")"; return 1; }
  # Stock settings but for the connection count (pgbench 32 + four proxies × 32).
  "${as[@]}" "$PGBIN/pg_ctl" -D "$RUN/pg/data" -l "$RUN/pg/server.log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -c port=$P_PG -c unix_socket_directories=$RUN/pg -c max_connections=300" \
    start >/dev/null || { PG_FAIL="PostgreSQL did not start"; return 1; }
  PG_STOP=("${as[@]}" "$PGBIN/pg_ctl" -D "$RUN/pg/data" -m fast -w stop)
  "$PSQL" -q -h 127.0.0.1 -p "$P_PG" -U postgres -c "CREATE DATABASE fp_bench" postgres >/dev/null
  PG_HOSTPORT=127.0.0.1:$P_PG
  PG_URL="postgres://postgres@$PG_HOSTPORT/fp_bench?sslmode=disable"
}

feedback_scenario() {
  local pg_url
  ensure_pg || { skip feedback "$PG_FAIL"; return 0; }
  pg_url=$PG_URL

  start_bg mlflow "$FPB" mlflow
  local mlflow_addr
  mlflow_addr=$(listening_addr mlflow)
  proxy_config "$RUN/proxy-a.toml" "$P_FB_A" "$pg_url" bench_a
  proxy_config "$RUN/proxy-b.toml" "$P_FB_B" "$pg_url" bench_b "$mlflow_addr"
  start_bg proxy-a env TOKIO_WORKER_THREADS=$WORKERS "$PROXY" serve --config "$RUN/proxy-a.toml"
  local pid_a=$LAST_PID
  start_bg proxy-b env TOKIO_WORKER_THREADS=$WORKERS "$PROXY" serve --config "$RUN/proxy-b.toml"
  local pid_b=$LAST_PID
  SYSPIDS[proxy-nomlflow]=$pid_a
  SYSPIDS[proxy-mlflow]=$pid_b
  if ! wait_ready proxy-a "$pid_a" 127.0.0.1 "$P_FB_A" /healthz \
     || ! wait_ready proxy-b "$pid_b" 127.0.0.1 "$P_FB_B" /healthz; then
    skip feedback "the proxy cannot run on Postgres in this build: $(grep -m1 -io 'cannot open the store.*' "$RUN/proxy-a.log" | tr '"' "'" || true)"
    return 0
  fi
  log "seeding $((FB_USERS * FB_MESSAGES)) chats per proxy (message links with trace ids)"
  "$FPB" feedback-seed --url "http://127.0.0.1:$P_FB_A" --users "$FB_USERS" --messages "$FB_MESSAGES" --tag a \
    --check-status no_experiment_id >&2 || { skip feedback "seeding through the proxy failed"; return 0; }
  "$FPB" feedback-seed --url "http://127.0.0.1:$P_FB_B" --users "$FB_USERS" --messages "$FB_MESSAGES" --tag b \
    --check-status logged,updated >&2 || { skip feedback "seeding through the proxy failed"; return 0; }
  # The links are written off the request path; wait until they are all in.
  local want=$((FB_USERS * FB_MESSAGES)) i n
  for i in $(seq 1 100); do
    n=$(psql_q "$pg_url" "SELECT (SELECT count(*) FROM bench_a.message_links WHERE trace_id IS NOT NULL) + (SELECT count(*) FROM bench_b.message_links WHERE trace_id IS NOT NULL)" || echo 0)
    [ "${n:-0}" -ge $((2 * want)) ] && break
    sleep 0.1
  done
  [ "${n:-0}" -ge $((2 * want)) ] || log "only $n of $((2 * want)) links written; continuing"

  log "5. feedback: c=$FB_CONNS, ${FB_SECS}s × $FB_ROUNDS rounds (proxy without MLflow, with the stand-in, pgbench)"
  for r in $(seq 1 "$FB_ROUNDS"); do
    for sys in $(rotate "$r" proxy-nomlflow proxy-mlflow pgbench); do
      case $sys in
        proxy-nomlflow)
          run_wrk feedback "$sys" "$r" "$WORKERS" "$FB_CONNS" "$FB_SECS" "http://127.0.0.1:$P_FB_A" \
            bench/wrk/feedback.lua a "$FB_USERS" "$FB_MESSAGES" ;;
        proxy-mlflow)
          run_wrk feedback "$sys" "$r" "$WORKERS" "$FB_CONNS" "$FB_SECS" "http://127.0.0.1:$P_FB_B" \
            bench/wrk/feedback.lua b "$FB_USERS" "$FB_MESSAGES" ;;
        pgbench) run_pgbench feedback "$pg_url" "$r" a ;;
      esac
    done
  done
}
psql_q() { "$PSQL" -qtAX "$1" -c "$2" 2>/dev/null; }
# run_pgbench SCENARIO PG_URL ROUND TAG [SECONDS [RELAY_STATS_ADDR]]
run_pgbench() {
  local scenario=$1 pg_url=$2 r=$3 tag=$4 secs=${5:-$FB_SECS} relay=${6:-} out tps failed lat n s0="" s1=""
  rm -f "$RUN"/pgb.*
  [ -n "$relay" ] && s0=$(relay_stats "$relay")
  # The same transaction as the proxy's upsert_vote, on the TAG proxy's tables and keys.
  out=$(PGOPTIONS="-c search_path=bench_$tag" timeout --foreground -k 5 $((secs + 60)) "$PGBENCH" "$pg_url" \
    -n -M prepared -c "$FB_CONNS" -j "$WORKERS" -T "$secs" -f bench/pgbench/upsert_vote.sql \
    -D users="$FB_USERS" -D messages="$FB_MESSAGES" -D tag="$tag" -l --log-prefix="$RUN/pgb" 2>&1) \
    || die "pgbench failed: $out"
  [ -n "$relay" ] && s1=$(relay_stats "$relay")
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | head -1)
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
  n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
  lat=$("$FPB" pglog "$RUN"/pgb.*)
  [ -n "$tps" ] || die "pgbench printed no TPS: $out"
  local json="{\"rps\":$tps,\"errors\":${failed:-0},${lat#\{}"
  [ -n "$relay" ] && json=$(with_relay "$json" "$s0" "$s1" "${n:-0}")
  record "$scenario" pgbench "$r" "" "$json"
  printf '    %-15s round %s  %s\n' pgbench "$r" "$json" >&2
}
if wants feedback; then
  feedback_scenario
fi

# ---------------------------------------------------------------- 7. the store 5 ms away
# Postgres behind `fpbench relay` (REMOTE_DELAY_MS each way): production's store is
# milliseconds away, not on loopback. One relay per client (proxy "ra", proxy "rb", pgbench) so
# that each relay's counters (round trips, statements) belong to one system.
remote_scenario() {
  local why
  if ! ensure_pg; then
    wants remote-chat && skip remote-chat "$PG_FAIL"
    wants remote-votes && skip remote-votes "$PG_FAIL"
    return 0
  fi
  local pg_url=$PG_URL name
  declare -A RELAY RSTATS
  for name in ra rb pg; do
    start_bg "relay-$name" "$FPB" relay --to "$PG_HOSTPORT" --delay-ms "$REMOTE_DELAY_MS"
    RELAY[$name]=$(listening_addr "relay-$name")
    RSTATS[$name]=$(listening_addr "relay-$name" stats)
  done
  local via_ra=${pg_url/$PG_HOSTPORT/${RELAY[ra]}} via_rb=${pg_url/$PG_HOSTPORT/${RELAY[rb]}}
  local via_pg=${pg_url/$PG_HOSTPORT/${RELAY[pg]}}
  start_bg mlflow-r "$FPB" mlflow
  local mlflow_addr
  mlflow_addr=$(listening_addr mlflow-r)
  proxy_config "$RUN/proxy-ra.toml" "$P_RA" "$via_ra" bench_ra
  proxy_config "$RUN/proxy-rb.toml" "$P_RB" "$via_rb" bench_rb "$mlflow_addr"
  start_bg proxy-ra env TOKIO_WORKER_THREADS=$WORKERS "$PROXY" serve --config "$RUN/proxy-ra.toml"
  local pid_ra=$LAST_PID
  start_bg proxy-rb env TOKIO_WORKER_THREADS=$WORKERS "$PROXY" serve --config "$RUN/proxy-rb.toml"
  local pid_rb=$LAST_PID
  SYSPIDS[proxy-nomlflow]=$pid_ra
  SYSPIDS[proxy-mlflow]=$pid_rb
  # The migrations run through the relay too: allow a minute.
  if ! wait_ready proxy-ra "$pid_ra" 127.0.0.1 "$P_RA" /healthz 600 \
     || ! wait_ready proxy-rb "$pid_rb" 127.0.0.1 "$P_RB" /healthz 600; then
    why="the proxy did not start on Postgres behind the relay: $(grep -m1 -io 'cannot open the store.*' "$RUN/proxy-ra.log" | tr '"' "'" || true)"
    wants remote-chat && skip remote-chat "$why"
    wants remote-votes && skip remote-votes "$why"
    return 0
  fi
  local url_ra="http://127.0.0.1:$P_RA" url_rb="http://127.0.0.1:$P_RB"
  # What one store round trip costs through the relay: `SELECT 1` at c=1 (the nominal 10 ms, plus
  # the timer's 1 ms resolution and the machine's scheduling).
  local out lat
  printf 'SELECT 1;\n' > "$RUN/select1.sql"
  out=$(timeout --foreground -k 5 60 "$PGBENCH" "$via_pg" -n -M prepared -c 1 -T "$RTT_SECS" -f "$RUN/select1.sql" 2>&1) \
    || die "pgbench through the relay failed: $out"
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out")
  record remote-rtt pgbench 1 "" "{\"rtt_ms\":${lat:-null},\"delay_ms\":$REMOTE_DELAY_MS}"
  log "one store round trip through the relay (pgbench SELECT 1, c=1): ${lat:-?} ms (nominal $((2 * REMOTE_DELAY_MS)) ms)"

  if wants remote-chat; then
    log "7a. chat TTFB, store ${REMOTE_DELAY_MS} ms away: 1 stream, $RC_REPEAT sequential chats × $RC_ROUNDS rounds (direct, proxy minting the id, proxy with a client-chosen id)"
    local r sys json s0 s1 args
    for r in $(seq 1 "$RC_ROUNDS"); do
      for sys in $(rotate "$r" direct proxy-minted proxy-clientid); do
        args=(--streams 1 --events "$RC_EVENTS" --interval-ms "$RC_INTERVAL_MS" --repeat "$RC_REPEAT" --timeout 30)
        case $sys in
          direct) args+=(--url "${URL[direct]}") ;;
          proxy-minted) args+=(--url "$url_ra") ;;
          proxy-clientid) args+=(--url "$url_ra" --message-id-prefix "rc-$T_START-$r") ;;
        esac
        s0=$(relay_stats "${RSTATS[ra]}")
        json=$(timeout --foreground -k 5 $(( RC_REPEAT * 31 + 30 )) "$FPB" sse "${args[@]}") \
          || die "the SSE client failed on $sys (store behind the relay)"
        s1=$(relay_stats "${RSTATS[ra]}")
        [ "$sys" != direct ] && json=$(with_relay "$json" "$s0" "$s1" "$RC_REPEAT")
        record remote-chat "$sys" "$r" "" "$json"
        printf '    %-15s round %s  %s\n' "$sys" "$r" "$json" >&2
      done
    done
  fi

  if wants remote-votes; then
    log "seeding $((FB_USERS * FB_MESSAGES)) chats per proxy through the relay"
    "$FPB" feedback-seed --url "$url_ra" --users "$FB_USERS" --messages "$FB_MESSAGES" --tag ra \
      --check-status no_experiment_id >&2 || { skip remote-votes "seeding through the proxy failed"; return 0; }
    "$FPB" feedback-seed --url "$url_rb" --users "$FB_USERS" --messages "$FB_MESSAGES" --tag rb \
      --check-status logged,updated >&2 || { skip remote-votes "seeding through the proxy failed"; return 0; }
    local want=$((FB_USERS * FB_MESSAGES)) i n
    for i in $(seq 1 200); do
      n=$(psql_q "$pg_url" "SELECT (SELECT count(*) FROM bench_ra.message_links WHERE trace_id IS NOT NULL AND message_id LIKE 'ra-m%') + (SELECT count(*) FROM bench_rb.message_links WHERE trace_id IS NOT NULL AND message_id LIKE 'rb-m%')" || echo 0)
      [ "${n:-0}" -ge $((2 * want)) ] && break
      sleep 0.1
    done
    [ "${n:-0}" -ge $((2 * want)) ] || log "only $n of $((2 * want)) links written; continuing"
    log "7b. votes, store ${REMOTE_DELAY_MS} ms away: c=$FB_CONNS, ${RV_SECS}s × $RV_ROUNDS rounds (proxy without MLflow, with the stand-in, pgbench through the relay)"
    local r sys
    for r in $(seq 1 "$RV_ROUNDS"); do
      for sys in $(rotate "$r" proxy-nomlflow proxy-mlflow pgbench); do
        case $sys in
          proxy-nomlflow)
            WRK_RELAY=${RSTATS[ra]} run_wrk remote-votes "$sys" "$r" "$WORKERS" "$FB_CONNS" "$RV_SECS" "$url_ra" \
              bench/wrk/feedback.lua ra "$FB_USERS" "$FB_MESSAGES" ;;
          proxy-mlflow)
            WRK_RELAY=${RSTATS[rb]} run_wrk remote-votes "$sys" "$r" "$WORKERS" "$FB_CONNS" "$RV_SECS" "$url_rb" \
              bench/wrk/feedback.lua rb "$FB_USERS" "$FB_MESSAGES" ;;
          pgbench) run_pgbench remote-votes "$via_pg" "$r" ra "$RV_SECS" "${RSTATS[pg]}" ;;
        esac
      done
    done
  fi
}
if wants remote-chat || wants remote-votes; then
  remote_scenario
fi

# ---------------------------------------------------------------- 8. start-up and idle memory
if wants startup; then
  log "8. start-up: $STARTS starts of the proxy (embedded store, fresh data directory) to the first /readyz 200; idle memory of the last $IDLE_STARTS after ${IDLE_MS} ms idle"
  sed -e "s|@UPSTREAM@|$UPSTREAM|" -e "s|@SCHEMA@|feedback_proxy|" bench/proxy.toml.in > "$RUN/startup.toml.in"
  json=$(TOKIO_WORKER_THREADS=$WORKERS timeout --foreground -k 5 $(( STARTS * 15 + 60 )) "$FPB" startup \
    --proxy "$PROXY" --template "$RUN/startup.toml.in" --work "$RUN/startup" \
    --starts "$STARTS" --idle-starts "$IDLE_STARTS" --idle-ms "$IDLE_MS") \
    || die "the start-up scenario failed"
  record startup proxy 1 "" "$json"
  printf '    %s\n' "$json" >&2
fi

# ---------------------------------------------------------------- 6. inspector
if wants inspector; then
  if [ -z "$HAVE_INSPECTOR_BENCH" ]; then
    skip inspector "benches/inspector.rs is not on this branch yet (it comes with the trace-linking change)"
  elif [ "$MODE" = smoke ]; then
    skip inspector "not part of the smoke run"
  else
    log "6. inspector: cargo bench --bench inspector"
    out=$(timeout --foreground -k 5 600 cargo bench -q --bench inspector -- --warm-up-time 1 --measurement-time 3 --noplot 2>/dev/null) \
      || die "cargo bench --bench inspector failed"
    printf '%s\n' "$out" > "$OUT/inspector.txt"
    # Criterion prints `NAME` (or `NAME time: …`) and then `thrpt: [low mid high UNIT]`; the
    # middle value is recorded, converted to MB/s (10^6 bytes per second).
    name=""
    while IFS= read -r line; do
      case $line in
        Found*|Benchmarking*|Gnuplot*|WARNING*|" "*|"") ;;
        *) name=${line%% *} ;;
      esac
      if [[ $line =~ thrpt:[[:space:]]+\[[^[:space:]]+\ [^[:space:]]+\ ([0-9.]+)\ ([A-Za-z]+/s) ]]; then
        value=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]}
        mbs=$(awk -v v="$value" -v u="$unit" 'BEGIN {
          f = (u == "GiB/s") ? 1073741824 : (u == "MiB/s") ? 1048576 : (u == "KiB/s") ? 1024 : \
              (u == "GB/s") ? 1e9 : (u == "MB/s") ? 1e6 : (u == "KB/s") ? 1e3 : 1
          printf "%.0f", v * f / 1e6 }')
        record inspector proxy 1 "$name" "{\"value\":$mbs,\"unit\":\"MB/s\",\"criterion\":\"$value $unit\"}"
        printf '    %s: %s MB/s (%s %s)\n' "$name" "$mbs" "$value" "$unit" >&2
      fi
    done <<<"$out"
  fi
fi

# ---------------------------------------------------------------- report
T_END=$(date +%s)
LOAD_AFTER=$(loadavg)
LOAD_SAMPLES=$(tr '\n' ' ' < "$RUN/loadavg.log" 2>/dev/null || true)
LOAD_RANGE=$(tr ' ' '\n' <<<"$LOAD_SAMPLES" | sed '/^$/d' | sort -n | sed -n '1p;$p' | tr '\n' ' ')
NOTE="Run: $(date -u +%Y-%m-%dT%H:%MZ), $MODE, $((T_END - T_START)) s, $PROFILE build of $(git rev-parse --short HEAD 2>/dev/null || echo '?'). \
Machine: $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), shared with other work. \
Load average (1, 5, 15 min) before the run: $LOAD_BEFORE; after: $LOAD_AFTER; 1-min samples during it ranged ${LOAD_RANGE:-?}(the harness itself keeps 2–4 busy). \
Versions: $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $("$PGBENCH" --version 2>/dev/null | head -1 || echo 'pgbench ?'), $(rustc --version | cut -d' ' -f1-2). \
Open-file limit $NOFILE per process; idle streams $IDLE_STREAMS."
REPORT_ARGS=()
[ "$MODE" = smoke ] && REPORT_ARGS+=(--no-verdict)
"$FPB" report --raw "$RAW" --out "$OUT/results.md" --note "$NOTE" "${REPORT_ARGS[@]}"
log "results: $OUT/results.md (raw: $RAW); $((T_END - T_START)) s"
