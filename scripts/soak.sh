#!/usr/bin/env bash
# The soak harness (reliability issue 14): chats and votes at a steady modest rate for a long
# time while MLflow flaps and Postgres restarts; then it checks that every accepted vote reached
# MLflow exactly once with the right value, and reports the proxy's RSS and fd slope.
#
#   bash scripts/soak.sh                     # 30 minutes, release build (`make soak`)
#   bash scripts/soak.sh --seconds 60        # the CI version (an after-step of scripts/test.sh)
#   bash scripts/soak.sh --seconds 300 --profile debug --out DIR
#
# Starts on 127.0.0.1 only, each in its own session, all stopped on exit (Ctrl-C included):
#   - Postgres: the test setup's restartable cluster when FP_TEST_PG_RESTART_URL is set (run as
#     an after-step of scripts/test.sh, whose tests are finished by then), else a private one;
#     a fresh database on it either way;
#   - its OWN `mlflow server` (it is stopped and started during the run, so never the test
#     suite's) and its own example agent tracing to it;
#   - feedback-proxy (`serve` with a generated config: Postgres store, MLflow, the agent, trusted
#     x-forwarded-email so that the driver can be many users).
# The driver, scripts/soak.py (the venv's Python: standard library + httpx), makes the load,
# the MLflow flaps and Postgres restarts (through `soak.sh ctl …`), samples the proxy's RSS and
# open fds, waits for the outbox to drain and compares the outcome with MLflow. Exit status:
# 0 when nothing was lost, duplicated or wrong and everything was delivered; 1 otherwise.
#
# Results: DIR/report.txt, DIR/report.json, DIR/samples.jsonl and the logs of every service
# (default DIR: target/soak/<date>-<seconds>s).
# Environment: SOAK_SECONDS (default 1800), SOAK_PROFILE (release | debug), SOAK_RATE (chats/s,
# default 2), SOAK_USERS (default 8), SOAK_SEED, SOAK_DRAIN_SECONDS (default 300), SOAK_BIN (a
# prebuilt feedback-proxy to soak instead of building one), SOAK_SELF_TEST=1 (tamper with MLflow
# before the check, which must then count exactly that), and the test setup's FP_VENV /
# FP_TEST_PYTHON (the venv with mlflow).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export FP_REPO_ROOT=$ROOT

soak_log() { printf '    [soak] %s\n' "$*" >&2; }

# The libraries only define functions (and append to FP_TEST_SETUP / FP_TEST_AFTER, which
# nothing here runs).
# shellcheck source=lib/10-postgres.sh
source "$ROOT/scripts/lib/10-postgres.sh"
# shellcheck source=lib/20-python.sh
source "$ROOT/scripts/lib/20-python.sh"
# shellcheck source=lib/30-mlflow.sh
source "$ROOT/scripts/lib/30-mlflow.sh"

# A free loopback port below the kernel's ephemeral range (32768+ on Linux): MLflow is stopped
# and started again on the same port, and a port from the ephemeral range could meanwhile
# become the local end of some unrelated outgoing connection on this busy machine.
soak_stable_port() {
  fp_py - <<'EOF'
import random, socket
for _ in range(200):
    port = random.randint(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
else:
    raise SystemExit("no free port in 20000-32000")
EOF
}

# ---------------------------------------------------------------- ctl: called by the driver
# `soak.sh ctl mlflow-stop | mlflow-start | pg-restart`, with SOAK_* from the environment the
# driver inherited. Each waits for its event (MLflow answering /health, pg_ctl -w) and fails
# with the log's tail when it does not come.
soak_ctl() {
  case "$1" in
    mlflow-stop)
      fp_stop "$(cat "$SOAK_MLFLOW_DIR/mlflow.pid" 2>/dev/null || true)" "soak mlflow server"
      ;;
    mlflow-start)
      # fp_start_mlflow starts a fresh log: keep the previous starts' logs too.
      [ -f "$SOAK_MLFLOW_DIR/mlflow.log" ] && cat "$SOAK_MLFLOW_DIR/mlflow.log" >>"$SOAK_MLFLOW_DIR/mlflow-earlier.log"
      fp_start_mlflow "$SOAK_MLFLOW_PORT" "$SOAK_MLFLOW_DIR" || return 1
      fp_wait_http "http://127.0.0.1:$SOAK_MLFLOW_PORT/health" "$FP_MLFLOW_PID" \
        "soak mlflow server" "$SOAK_MLFLOW_DIR/mlflow.log" "$FP_MLFLOW_START_TIMEOUT"
      ;;
    pg-restart)
      local log=()
      [ -n "${SOAK_PG_LOG:-}" ] && log=(-l "$SOAK_PG_LOG")
      fp_pg_as_owner "$SOAK_PG_CTL" -D "$SOAK_PG_DATA" -m fast -w -t 60 stop >/dev/null &&
        fp_pg_as_owner "$SOAK_PG_CTL" -D "$SOAK_PG_DATA" "${log[@]}" -w -t 60 start >/dev/null
      ;;
    *)
      echo "soak.sh ctl: unknown action $1" >&2
      return 2
      ;;
  esac
}

if [ "${1:-}" = ctl ]; then
  soak_ctl "$2"
  exit
fi

# ---------------------------------------------------------------- arguments
SECONDS_WANTED=${SOAK_SECONDS:-1800}
PROFILE=${SOAK_PROFILE:-}
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_WANTED=$2; shift ;;
    --profile) PROFILE=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$SECONDS_WANTED" =~ ^[0-9]+$ ]] && [ "$SECONDS_WANTED" -ge 30 ] ||
  { echo "--seconds: a whole number of at least 30, not '$SECONDS_WANTED'" >&2; exit 2; }
PROFILE=${PROFILE:-release}
case "$PROFILE" in release|debug) ;; *) echo "--profile: release or debug, not '$PROFILE'" >&2; exit 2 ;; esac
OUT=${OUT:-$ROOT/target/soak/$(date +%Y%m%d-%H%M%S)-${SECONDS_WANTED}s}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The run directory holds the private cluster (if any), so the postgres user must enter it.
RUN=$(mktemp -d /tmp/fp-soak.XXXXXX)
chmod 755 "$RUN"
export FP_TEST_TMP=$RUN

cleanup_hooks=()
on_exit() {
  local status=$?
  trap '' INT TERM PIPE
  for ((i=${#cleanup_hooks[@]}-1; i>=0; i--)); do eval "${cleanup_hooks[i]}" || true; done
  # Service logs are worth keeping next to the report; the cluster's data is not.
  cp "$RUN"/*.log "$OUT"/ 2>/dev/null || true
  rm -rf "$RUN"
  [ $status = 0 ] || printf '\nsoak: logs and report in %s\n' "$OUT" >&2
  exit $status
}
trap on_exit EXIT
trap 'exit 130' INT TERM

T0=$SECONDS
fp_ensure_venv >/dev/null

# ---------------------------------------------------------------- MLflow (starting)
# Its start-up is the slowest step (10-40 s on a busy machine): Postgres and the build go on
# meanwhile.
export SOAK_MLFLOW_DIR="$RUN/mlflow"
mkdir -p "$SOAK_MLFLOW_DIR"
cleanup_hooks+=("fp_stop \"\$(cat '$SOAK_MLFLOW_DIR/mlflow.pid' 2>/dev/null)\" 'soak mlflow server'")
SOAK_MLFLOW_PORT=$(soak_stable_port)
export SOAK_MLFLOW_PORT
fp_start_mlflow "$SOAK_MLFLOW_PORT" "$SOAK_MLFLOW_DIR"

# ---------------------------------------------------------------- Postgres
if [ -n "${FP_TEST_PG_RESTART_URL:-}" ] && [ -n "${FP_TEST_PG_RESTART_DATA:-}" ] && [ -n "${FP_TEST_PG_CTL:-}" ]; then
  PG_URL=$FP_TEST_PG_RESTART_URL
  export SOAK_PG_DATA=$FP_TEST_PG_RESTART_DATA SOAK_PG_LOG=${FP_TEST_PG_RESTART_LOG:-} SOAK_PG_CTL=$FP_TEST_PG_CTL
  soak_log "using the test setup's restartable Postgres cluster"
  # Whatever happens to this run, the test script's later steps find it running.
  cleanup_hooks+=("fp_pg_as_owner '$SOAK_PG_CTL' -D '$SOAK_PG_DATA' status >/dev/null 2>&1 || fp_pg_as_owner '$SOAK_PG_CTL' -D '$SOAK_PG_DATA' \${SOAK_PG_LOG:+-l \"\$SOAK_PG_LOG\"} -w -t 60 start >/dev/null 2>&1")
else
  fp_pg_make_certs "$RUN/pg-certs" || { echo "soak: cannot make certificates for Postgres (openssl)" >&2; exit 1; }
  fp_pg_start_cluster soak "$RUN/pg-certs" || exit 1
  PG_URL="postgresql://postgres:$FP_PG_PASSWORD@127.0.0.1:$FP_PG_PORT/postgres"
  SOAK_PG_CTL=$(fp_pg_bin pg_ctl)
  export SOAK_PG_DATA="$RUN/pg-soak/data" SOAK_PG_LOG="$RUN/pg-soak/server.log" SOAK_PG_CTL
  cleanup_hooks+=("cp '$RUN/pg-soak/server.log' '$OUT/postgres.log' 2>/dev/null || true")
  soak_log "private Postgres cluster on 127.0.0.1:$FP_PG_PORT"
fi
DB="soak_$(date +%s)_$$"
PSQL=$(fp_pg_bin psql) || { echo "soak: psql not found" >&2; exit 1; }
"$PSQL" "$PG_URL" -XAtqc "CREATE DATABASE $DB" >/dev/null
# The store URL carries the password: it goes to the proxy through the environment, not the
# config file in the report directory.
export SOAK_STORE_URL="${PG_URL%/*}/$DB?sslmode=require&application_name=feedback-proxy-soak"

# ---------------------------------------------------------------- the build
if [ -n "${SOAK_BIN:-}" ]; then
  # A binary built elsewhere (another commit, another machine's build): nothing is compiled.
  BIN=$(realpath "$SOAK_BIN")
  [ -x "$BIN" ] || { echo "soak: SOAK_BIN=$SOAK_BIN is not an executable" >&2; exit 2; }
  soak_log "using $BIN"
else
  flag=()
  [ "$PROFILE" = release ] && flag=(--release)
  soak_log "building feedback-proxy ($PROFILE)…"
  cargo build -q "${flag[@]}" --bin feedback-proxy
  BIN="$ROOT/target/$PROFILE/feedback-proxy"
fi

# ---------------------------------------------------------------- MLflow (answering) and the agent
for attempt in 1 2 3; do
  fp_wait_http "http://127.0.0.1:$SOAK_MLFLOW_PORT/health" "$FP_MLFLOW_PID" "soak mlflow server" \
    "$SOAK_MLFLOW_DIR/mlflow.log" "$FP_MLFLOW_START_TIMEOUT" && break
  soak_ctl mlflow-stop || true
  grep -qi "address already in use" "$SOAK_MLFLOW_DIR/mlflow.log" && [ $attempt -lt 3 ] || exit 1
  SOAK_MLFLOW_PORT=$(soak_stable_port)
  soak_log "the port was taken; starting MLflow on $SOAK_MLFLOW_PORT"
  fp_start_mlflow "$SOAK_MLFLOW_PORT" "$SOAK_MLFLOW_DIR"
done
MLFLOW_URL="http://127.0.0.1:$SOAK_MLFLOW_PORT"
EXPERIMENT=$(fp_create_experiment "$MLFLOW_URL" "feedback-proxy-soak")
cleanup_hooks+=("cat '$SOAK_MLFLOW_DIR/mlflow-earlier.log' '$SOAK_MLFLOW_DIR/mlflow.log' >'$OUT/mlflow.log' 2>/dev/null || true")
# The agent is the test's stand-in; the proxy is what is measured, so the agent must not lose
# traces on its own: its trace export retries while MLflow is down (MLflow's HTTP client: 7
# retries, backoff factor 2, up to ~4 min). Factor 1 with 9 retries covers outages as long (~8
# min) but retries sooner once MLflow is back, so the traces of chats made during a flap land,
# and the votes on them drain, within seconds instead of a minute; and its export queue (1000 by
# default, then traces are discarded) holds a whole flap's backlog.
MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1 MLFLOW_HTTP_REQUEST_MAX_RETRIES=9 \
  MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE=100000 \
  fp_start_agent_anywhere "$MLFLOW_URL" "$EXPERIMENT" "$RUN/agent"
cleanup_hooks+=("cp '$RUN/agent/agent.log' '$OUT/agent.log' 2>/dev/null || true")
AGENT_URL="http://127.0.0.1:$FP_AGENT_PORT"

# ---------------------------------------------------------------- the proxy
PROXY_PORT=$(fp_free_port)
CONFIG="$OUT/proxy.toml"
cat >"$CONFIG" <<EOF
# Generated by scripts/soak.sh. The store URL (with its password) comes from the environment.
listen = "127.0.0.1:$PROXY_PORT"
shutdown_grace = "5s"

[log]
level = "info"

[identity]
# The driver is many users: x-forwarded-email, as the Databricks Apps platform sets it.
trust_forwarded_headers = true

[agent]
url = "$AGENT_URL"
paths = ["/invocations", "/responses"]
# An agent whose tracking server is down may stall before its first byte (CONTRACT 5.5): wait
# that long rather than fail the chat.
response_header_timeout = "60s"

[[agent.routes]]
path = "/api/chat"
upstream_path = "/invocations"
context = true
client_request_id = true
events = true

[mlflow]
tracking_uri = "$MLFLOW_URL"
experiment_id = "$EXPERIMENT"
timeout = "5s"

[delivery]
# Capped well below the default 5m so that the final drain after the last MLflow flap takes
# seconds to a minute, not up to five: the soak measures correctness, not the backoff curve.
backoff_max = "15s"

[store]
url = "\${SOAK_STORE_URL}"
pool_size = 8
connect_timeout = "2s"

[metrics]
on_main_port = true
EOF
"$BIN" check-config --config "$CONFIG" >/dev/null
mapfile -t np < <(fp_no_proxy_env)
PROXY_PID=$(fp_spawn "$RUN/proxy.pid" "$RUN/proxy.log" env "${np[@]}" "$BIN" serve --config "$CONFIG")
cleanup_hooks+=("cp '$RUN/proxy.log' '$OUT/proxy.log' 2>/dev/null || true")
cleanup_hooks+=("fp_stop $PROXY_PID 'feedback-proxy (soak)'")
fp_wait_http "http://127.0.0.1:$PROXY_PORT/readyz" "$PROXY_PID" "feedback-proxy (soak)" "$RUN/proxy.log" 60
soak_log "services ready after $((SECONDS - T0)) s; driving for $SECONDS_WANTED s"

# ---------------------------------------------------------------- the run
"$FP_TEST_PYTHON" -I "$ROOT/scripts/soak.py" \
  --seconds "$SECONDS_WANTED" \
  --proxy "http://127.0.0.1:$PROXY_PORT" \
  --proxy-pid "$PROXY_PID" \
  --mlflow "$MLFLOW_URL" \
  --bin "$BIN" --config "$CONFIG" \
  --ctl "$ROOT/scripts/soak.sh" \
  --agent-log "$RUN/agent/agent.log" \
  --out "$OUT" \
  --setup-seconds "$((SECONDS - T0))" \
  --profile "$PROFILE"
