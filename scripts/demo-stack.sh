# shellcheck shell=bash
# The demo stack: `mlflow server` (SQLite) + the example agent + feedback-proxy on the embedded
# SQLite store with config/local.toml. Used by scripts/demo.sh (interactive) and by the browser
# test (scripts/lib/80-browser.sh). Needs scripts/lib/20-python.sh and 30-mlflow.sh sourced, and
# the caller's `cleanup_hooks` array (every process started here registers its stop there).
#
#   fp_demo_stack DIR PROFILE MLFLOW_PORT AGENT_PORT PROXY_PORT
#     PROFILE: release | debug (which build of the proxy to run). A port of 0 picks a free one.
#     Sets FP_DEMO_CHAT_URL, FP_DEMO_MLFLOW_URL, FP_DEMO_EXPERIMENT_ID, FP_DEMO_PROXY_LOG.

fp_demo_port() {
  local want=$1 name=$2
  if [ "$want" = 0 ]; then
    fp_free_port
    return
  fi
  if fp_py -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$want" 2>/dev/null; then
    echo "$want"
  else
    local other
    other=$(fp_free_port) || return 1
    fp_svc_log "port $want for $name is taken; using $other"
    echo "$other"
  fi
}

fp_demo_stack() {
  local dir=$1 profile=$2 mlflow_port agent_port proxy_port
  mkdir -p "$dir"
  fp_ensure_venv || return 1

  mlflow_port=$(fp_demo_port "$3" "mlflow") || return 1
  fp_start_mlflow "$mlflow_port" "$dir" || return 1
  cleanup_hooks+=("fp_stop $FP_MLFLOW_PID 'mlflow server'")
  fp_wait_http "http://127.0.0.1:$mlflow_port/health" "$FP_MLFLOW_PID" "mlflow server" \
    "$dir/mlflow.log" "$FP_MLFLOW_START_TIMEOUT" || return 1
  FP_DEMO_MLFLOW_URL="http://127.0.0.1:$mlflow_port"
  FP_DEMO_EXPERIMENT_ID=$(fp_create_experiment "$FP_DEMO_MLFLOW_URL" "feedback-proxy-demo") || return 1
  fp_svc_log "experiment feedback-proxy-demo has id $FP_DEMO_EXPERIMENT_ID"

  agent_port=$(fp_demo_port "$4" "agent") || return 1
  fp_start_agent "$agent_port" "$FP_DEMO_MLFLOW_URL" "$FP_DEMO_EXPERIMENT_ID" "$dir" || return 1
  cleanup_hooks+=("fp_stop $FP_AGENT_PID 'example agent'")
  fp_wait_http "http://127.0.0.1:$agent_port/health" "$FP_AGENT_PID" "example agent" \
    "$dir/agent.log" "$FP_AGENT_START_TIMEOUT" || return 1

  local flag=()
  [ "$profile" = release ] && flag=(--release)
  fp_svc_log "building feedback-proxy ($profile)…"
  (cd "$FP_REPO_ROOT" && cargo build "${flag[@]}" --bin feedback-proxy) || return 1
  local bin="$FP_REPO_ROOT/target/$profile/feedback-proxy"

  proxy_port=$(fp_demo_port "$5" "proxy") || return 1
  local np
  mapfile -t np < <(fp_no_proxy_env)
  FP_DEMO_PROXY_LOG="$dir/proxy.log"
  FP_PROXY_PID=$(cd "$FP_REPO_ROOT" && fp_spawn "$dir/proxy.pid" "$FP_DEMO_PROXY_LOG" \
    env "${np[@]}" FEEDBACK_PROXY_PORT="$proxy_port" AGENT_PORT="$agent_port" \
    MLFLOW_PORT="$mlflow_port" MLFLOW_EXPERIMENT_ID="$FP_DEMO_EXPERIMENT_ID" \
    FEEDBACK_PROXY_DB="$dir/feedback-proxy.db" \
    "$bin" serve --config "$FP_REPO_ROOT/config/local.toml") || return 1
  cleanup_hooks+=("fp_stop $FP_PROXY_PID 'feedback-proxy'")
  fp_svc_log "feedback-proxy starting on 127.0.0.1:$proxy_port (pgid $FP_PROXY_PID, log $FP_DEMO_PROXY_LOG)"
  fp_wait_http "http://127.0.0.1:$proxy_port/readyz" "$FP_PROXY_PID" "feedback-proxy" \
    "$FP_DEMO_PROXY_LOG" 60 || return 1
  FP_DEMO_CHAT_URL="http://127.0.0.1:$proxy_port/"
}
