#!/usr/bin/env bash
# The drain-rate row of docs/BENCHMARKS.md (issue 14): a backlog of votes delivered by the proxy
# to a real `mlflow server`, against the best create rate of a direct client on the same server
# in the same run. `make bench-drain`; BENCH_VOTES (default 2000), BENCH_PROFILE (release).
# Starts (and stops on exit) its own mlflow server on 127.0.0.1; prints the JSON line of
# bench/drain/drain.py and keeps it in target/bench/drain-*.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
export FP_REPO_ROOT=$ROOT
cleanup_hooks=()
on_exit() {
  trap '' INT TERM PIPE
  for ((i=${#cleanup_hooks[@]}-1; i>=0; i--)); do eval "${cleanup_hooks[i]}" || true; done
}
trap on_exit EXIT
trap 'exit 130' INT TERM
# shellcheck source=/dev/null
source scripts/lib/20-python.sh
# shellcheck source=/dev/null
source scripts/lib/30-mlflow.sh
fp_ensure_venv
PROFILE=${BENCH_PROFILE:-release}
if [ "$PROFILE" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
BIN=$ROOT/target/$PROFILE/feedback-proxy
RUN=$(mktemp -d /tmp/fp-drain.XXXXXX)
fp_start_mlflow_anywhere "$RUN/mlflow"
URL=http://127.0.0.1:$FP_MLFLOW_PORT
EXP=$(fp_create_experiment "$URL" drain-bench)
mkdir -p target/bench
OUT=target/bench/drain-$(date +%Y%m%d-%H%M%S).json
"$FP_TEST_PYTHON" bench/drain/drain.py --mlflow "$URL" --experiment "$EXP" --proxy "$BIN" \
  --dir "$RUN/proxy" --port "$(fp_free_port)" --votes "${BENCH_VOTES:-2000}" "$@" | tee "$OUT"
