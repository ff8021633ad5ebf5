# shellcheck shell=bash
# An MLflow tracking server and the example agent, for the tests and the demo.
#
# Sourced by scripts/test.sh after 20-python.sh; defines functions only. The building blocks
# are meant for the demo script as well:
#
#   fp_free_port                       print a free loopback TCP port
#   fp_start_mlflow PORT DIR           start `mlflow server` on 127.0.0.1:PORT with its SQLite
#                                      db and artifacts under DIR, log DIR/mlflow.log; sets
#                                      FP_MLFLOW_PID (a process group id: stop with fp_stop)
#   fp_start_agent PORT TRACKING_URL EXPERIMENT_ID DIR
#                                      start examples/agent/agent.py on 127.0.0.1:PORT, log
#                                      DIR/agent.log; sets FP_AGENT_PID
#   fp_wait_http URL PID NAME LOG [SECONDS]
#                                      poll URL until it answers 2xx; fail early if the process
#                                      group PID dies; progress lines; log tail on failure
#   fp_create_experiment URL NAME      print the id of experiment NAME (created if missing)
#   fp_stop PID NAME                   stop the process group PID (TERM, then KILL)
#
# Every process is started in its own session (setsid) so that stopping it stops its children
# too: `mlflow server` runs uvicorn (and, unless disabled, job runners) as child processes,
# and killing only the parent would leave the port bound. Everything binds 127.0.0.1 only.
#
# fp_setup_mlflow (registered in FP_TEST_SETUP) starts both for the Rust tests and exports
# FP_TEST_MLFLOW_URL, FP_TEST_EXPERIMENT_ID and FP_TEST_AGENT_URL. When FP_TEST_MLFLOW_URL /
# FP_TEST_AGENT_URL are already set and answer, they are reused (a developer's long-running
# servers: saves ~20 s per run).

FP_REPO_ROOT=${FP_REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# mlflow server takes 10-20 s to answer on an idle 2-core machine, more while others compile.
FP_MLFLOW_START_TIMEOUT=${FP_MLFLOW_START_TIMEOUT:-120}
FP_AGENT_START_TIMEOUT=${FP_AGENT_START_TIMEOUT:-60}

fp_svc_log() { printf '    [services] %s\n' "$*" >&2; }

# The Python that runs mlflow: FP_TEST_PYTHON (from fp_ensure_venv).
fp_py() {
  if [ -z "${FP_TEST_PYTHON:-}" ]; then
    fp_svc_log "FP_TEST_PYTHON is not set: run fp_ensure_venv (scripts/lib/20-python.sh) first"
    return 1
  fi
  "$FP_TEST_PYTHON" -I "$@"
}

# Loopback traffic must never go through a proxy configured in the environment: prints
# NAME=VALUE words for `env`.
fp_no_proxy_env() {
  local np="127.0.0.1,localhost,::1"
  printf '%s\n' "NO_PROXY=${NO_PROXY:+$NO_PROXY,}$np" "no_proxy=${no_proxy:+$no_proxy,}$np"
}

fp_free_port() {
  fp_py -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# fp_http METHOD URL [JSON_BODY] → prints the body; exit 0 on 2xx, 1 otherwise.
fp_http() {
  fp_py - "$@" <<'EOF'
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request(url, data=data, method=method)
if data is not None:
    req.add_header("Content-Type", "application/json")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=5) as r:
        sys.stdout.write(r.read().decode("utf-8", "replace"))
except urllib.error.HTTPError as e:
    sys.stdout.write(e.read().decode("utf-8", "replace"))
    sys.exit(1)
except Exception as e:
    sys.stdout.write(str(e))
    sys.exit(1)
EOF
}

# Whether the process group PGID still has a member.
fp_alive() { kill -0 -- "-$1" 2>/dev/null; }

fp_stop() {
  local pgid=$1 name=${2:-process}
  [ -n "$pgid" ] || return 0
  fp_alive "$pgid" || return 0
  kill -TERM -- "-$pgid" 2>/dev/null || true
  local i
  for ((i = 0; i < 100; i++)); do
    fp_alive "$pgid" || { fp_svc_log "stopped $name (pgid $pgid)"; return 0; }
    sleep 0.1
  done
  fp_svc_log "$name (pgid $pgid) ignored SIGTERM for 10 s; killing it"
  kill -KILL -- "-$pgid" 2>/dev/null || true
}

# fp_spawn PIDFILE LOG CMD... : runs CMD in a new session, in the background, and prints its
# pid (= its process group id). The pid is written by the new session's own shell, so it is
# right whether or not setsid had to fork (it forks when the caller runs with job control).
fp_spawn() {
  local pidfile=$1 log=$2
  shift 2
  rm -f "$pidfile"
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" >"$log" 2>&1 </dev/null &
  local i
  for ((i = 0; i < 100; i++)); do
    if [ -s "$pidfile" ]; then
      cat "$pidfile"
      return 0
    fi
    sleep 0.05
  done
  fp_svc_log "could not start a process (no pid after 5 s); log $log:"
  tail -n 20 "$log" >&2 || true
  return 1
}

fp_wait_http() {
  local url=$1 pgid=$2 name=$3 log=$4 limit=${5:-60}
  local start=$SECONDS next_note=5
  while true; do
    if fp_http GET "$url" >/dev/null 2>&1; then
      fp_svc_log "$name is up at ${url%/*} after $((SECONDS - start)) s"
      return 0
    fi
    if ! fp_alive "$pgid"; then
      fp_svc_log "$name exited before answering; last lines of $log:"
      tail -n 30 "$log" >&2 || true
      return 1
    fi
    if ((SECONDS - start >= limit)); then
      fp_svc_log "$name did not answer $url within $limit s; last lines of $log:"
      tail -n 30 "$log" >&2 || true
      return 1
    fi
    if ((SECONDS - start >= next_note)); then
      fp_svc_log "waiting for $name ($((SECONDS - start)) s)…"
      next_note=$((next_note + 5))
    fi
    sleep 0.25
  done
}

fp_start_mlflow() {
  local port=$1 dir=$2
  mkdir -p "$dir/artifacts"
  local mlflow_bin np
  mlflow_bin="$(dirname "$FP_TEST_PYTHON")/mlflow"
  mapfile -t np < <(fp_no_proxy_env)
  # Job execution (huey consumers: seven extra processes, ~1 GiB) is for server-side
  # evaluation jobs, which nothing here uses; one uvicorn worker is plenty for tests.
  FP_MLFLOW_PID=$(fp_spawn "$dir/mlflow.pid" "$dir/mlflow.log" \
    env "${np[@]}" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    "$mlflow_bin" server --host 127.0.0.1 --port "$port" --workers 1 \
    --backend-store-uri "sqlite:///$dir/mlflow.db" \
    --default-artifact-root "$dir/artifacts") || return 1
  fp_svc_log "mlflow server starting on 127.0.0.1:$port (pgid $FP_MLFLOW_PID, log $dir/mlflow.log)"
}

fp_start_agent() {
  local port=$1 tracking=$2 experiment=$3 dir=$4 np
  mkdir -p "$dir"
  mapfile -t np < <(fp_no_proxy_env)
  FP_AGENT_PID=$(fp_spawn "$dir/agent.pid" "$dir/agent.log" \
    env "${np[@]}" MLFLOW_TRACKING_URI="$tracking" MLFLOW_EXPERIMENT_ID="$experiment" \
    MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS="${MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS:-200}" \
    "$FP_TEST_PYTHON" "$FP_REPO_ROOT/examples/agent/agent.py" --host 127.0.0.1 --port "$port") || return 1
  fp_svc_log "example agent starting on 127.0.0.1:$port (pgid $FP_AGENT_PID, log $dir/agent.log)"
}

fp_create_experiment() {
  local url=$1 name=$2 out
  if out=$(fp_http POST "$url/api/2.0/mlflow/experiments/create" "{\"name\": \"$name\"}"); then
    :
  elif ! out=$(fp_http GET "$url/api/2.0/mlflow/experiments/get-by-name?experiment_name=$name"); then
    fp_svc_log "cannot create or find experiment $name: $out"
    return 1
  fi
  printf '%s' "$out" | fp_py -c 'import json, sys
d = json.load(sys.stdin)
print(d.get("experiment_id") or d["experiment"]["experiment_id"])'
}

# Starts mlflow on a fresh free port, retrying with another when the port was taken between
# choosing and binding. Sets FP_MLFLOW_PORT and FP_MLFLOW_PID.
fp_start_mlflow_anywhere() {
  local dir=$1 attempt
  for attempt in 1 2 3; do
    FP_MLFLOW_PORT=$(fp_free_port) || return 1
    fp_start_mlflow "$FP_MLFLOW_PORT" "$dir" || return 1
    cleanup_hooks+=("fp_stop $FP_MLFLOW_PID 'mlflow server'")
    if fp_wait_http "http://127.0.0.1:$FP_MLFLOW_PORT/health" "$FP_MLFLOW_PID" "mlflow server" \
      "$dir/mlflow.log" "$FP_MLFLOW_START_TIMEOUT"; then
      return 0
    fi
    fp_stop "$FP_MLFLOW_PID" "mlflow server"
    grep -qi "address already in use" "$dir/mlflow.log" || return 1
    fp_svc_log "port $FP_MLFLOW_PORT was taken; trying another (attempt $attempt)"
  done
  return 1
}

fp_start_agent_anywhere() {
  local tracking=$1 experiment=$2 dir=$3 attempt
  for attempt in 1 2 3; do
    FP_AGENT_PORT=$(fp_free_port) || return 1
    fp_start_agent "$FP_AGENT_PORT" "$tracking" "$experiment" "$dir" || return 1
    cleanup_hooks+=("fp_stop $FP_AGENT_PID 'example agent'")
    if fp_wait_http "http://127.0.0.1:$FP_AGENT_PORT/health" "$FP_AGENT_PID" "example agent" \
      "$dir/agent.log" "$FP_AGENT_START_TIMEOUT"; then
      return 0
    fi
    fp_stop "$FP_AGENT_PID" "example agent"
    grep -qi "address already in use" "$dir/agent.log" || return 1
    fp_svc_log "port $FP_AGENT_PORT was taken; trying another (attempt $attempt)"
  done
  return 1
}

fp_setup_mlflow() {
  step "mlflow server and example agent"
  local dir="$FP_TEST_TMP/mlflow"
  mkdir -p "$dir"
  if [ -n "${FP_TEST_MLFLOW_URL:-}" ] && fp_http GET "$FP_TEST_MLFLOW_URL/health" >/dev/null 2>&1; then
    fp_svc_log "reusing the mlflow server at $FP_TEST_MLFLOW_URL"
  else
    fp_start_mlflow_anywhere "$dir" || return 1
    export FP_TEST_MLFLOW_URL="http://127.0.0.1:$FP_MLFLOW_PORT"
    unset FP_TEST_EXPERIMENT_ID FP_TEST_AGENT_URL
  fi
  if [ -z "${FP_TEST_EXPERIMENT_ID:-}" ]; then
    FP_TEST_EXPERIMENT_ID=$(fp_create_experiment "$FP_TEST_MLFLOW_URL" "feedback-proxy-tests") || return 1
    export FP_TEST_EXPERIMENT_ID
  fi
  fp_svc_log "experiment $FP_TEST_EXPERIMENT_ID"
  if [ -n "${FP_TEST_AGENT_URL:-}" ] && fp_http GET "$FP_TEST_AGENT_URL/health" >/dev/null 2>&1; then
    fp_svc_log "reusing the example agent at $FP_TEST_AGENT_URL"
  else
    fp_start_agent_anywhere "$FP_TEST_MLFLOW_URL" "$FP_TEST_EXPERIMENT_ID" "$dir" || return 1
    export FP_TEST_AGENT_URL="http://127.0.0.1:$FP_AGENT_PORT"
  fi
}

FP_TEST_SETUP+=(fp_setup_mlflow)
