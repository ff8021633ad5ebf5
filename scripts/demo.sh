#!/usr/bin/env bash
# The demo: chat with a small deterministic MLflow agent through feedback-proxy, vote, and find
# the vote on the trace in the MLflow UI. Installs what it needs (a venv with mlflow under
# .cache/), keeps its state under .cache/demo/, and on Ctrl-C stops exactly what it started.
#
#   make demo                      # ports 8000 (chat), 5055 (MLflow), 5056 (agent)
#   DEMO_PROFILE=debug make demo   # run a debug build (faster first build)
set -euo pipefail
cd "$(dirname "$0")/.."
FP_REPO_ROOT=$(pwd)

cleanup_hooks=()
on_exit() {
  local status=$?
  # Nothing may cut the clean-up short: not a second Ctrl-C, and not SIGPIPE when the output
  # was piped (e.g. through tee) and the reader died with the first Ctrl-C.
  trap '' INT TERM PIPE
  for ((i = ${#cleanup_hooks[@]} - 1; i >= 0; i--)); do eval "${cleanup_hooks[i]}" || true; done
  exit $status
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# shellcheck source=lib/20-python.sh
source scripts/lib/20-python.sh
# shellcheck source=lib/30-mlflow.sh
source scripts/lib/30-mlflow.sh
# shellcheck source=demo-stack.sh
source scripts/demo-stack.sh

printf '==> starting the demo stack (first run: a Python venv and a release build take a few minutes)\n'
# A visible pause between streamed chunks, so the answer is seen arriving.
export AGENT_CHUNK_DELAY_MS=${AGENT_CHUNK_DELAY_MS:-120}
fp_demo_stack "$FP_REPO_ROOT/.cache/demo" "${DEMO_PROFILE:-release}" \
  "${MLFLOW_PORT:-5055}" "${AGENT_PORT:-5056}" "${FEEDBACK_PROXY_PORT:-8000}"

cat <<MSG

  Chat (through feedback-proxy):  $FP_DEMO_CHAT_URL
  MLflow UI (traces, feedback):   $FP_DEMO_MLFLOW_URL/#/experiments/$FP_DEMO_EXPERIMENT_ID/traces
  Logs:                           $FP_REPO_ROOT/.cache/demo/{proxy,agent,mlflow}.log

  Ask something, vote 👍/👎 on the answer, then open the trace in the MLflow UI and look at
  its "user_feedback" assessment. Ctrl-C stops everything.

MSG
while true; do
  for pgid in "$FP_MLFLOW_PID" "$FP_AGENT_PID" "$FP_PROXY_PID"; do
    if ! fp_alive "$pgid"; then
      echo "a demo process (pgid $pgid) exited; see the logs above. Stopping." >&2
      exit 1
    fi
  done
  sleep 2
done
