# shellcheck shell=bash
# Python for the tests and the demo: a venv with exactly the MLflow the project was verified
# against (CONTRACT.md: mlflow==3.17.2; 3.18.0's dependencies are not installable yet) plus
# httpx, which mlflow's agent server needs for its client side.
#
# Sourced by scripts/test.sh (and reusable by the demo script): defines functions only; running
# them is the caller's decision. Nothing here starts a process that outlives the call.
#
#   fp_ensure_venv [DIR]   create or reuse the venv (default: $FP_VENV, else .cache/venv in the
#                          repository) and export FP_TEST_PYTHON
#
# The fast path (venv present, right mlflow version importable) makes no pip call, so a warm
# machine pays ~1 s instead of a resolver run.

FP_MLFLOW_VERSION=${FP_MLFLOW_VERSION:-3.17.2}
FP_PY_REQUIREMENTS=("mlflow==${FP_MLFLOW_VERSION}" "httpx")

# Prints a progress line on stderr (the test script's stdout is for step headers and results).
fp_py_log() { printf '    [python] %s\n' "$*" >&2; }

# Where the venv lives: $FP_VENV, else .cache/venv under the repository root.
fp_venv_dir() {
  if [ -n "${FP_VENV:-}" ]; then
    printf '%s\n' "$FP_VENV"
  else
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    printf '%s\n' "$root/.cache/venv"
  fi
}

# Succeeds when PYTHON imports mlflow at exactly FP_MLFLOW_VERSION and has httpx.
fp_venv_ok() {
  local py=$1
  [ -x "$py" ] || return 1
  # -I: never import from the current directory (run from inside site-packages/mlflow, a
  # `types` package there would shadow the standard library's).
  "$py" -I - "$FP_MLFLOW_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
# Reading the installed metadata is enough (and fast): importing mlflow takes seconds.
assert version("mlflow") == sys.argv[1], version("mlflow")
version("httpx")
EOF
}

# Picks the interpreter to build the venv from: $FP_BASE_PYTHON, else python3 (3.10+ needed by
# mlflow 3).
fp_base_python() {
  local py=${FP_BASE_PYTHON:-python3}
  if ! command -v "$py" >/dev/null 2>&1; then
    fp_py_log "no $py on PATH: install Python 3.10+ (with venv and pip) or set FP_BASE_PYTHON"
    return 1
  fi
  if ! "$py" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    fp_py_log "$py is older than 3.10 or lacks the venv module; set FP_BASE_PYTHON to a newer one"
    return 1
  fi
  command -v "$py"
}

fp_ensure_venv() {
  local dir=${1:-$(fp_venv_dir)}
  local py="$dir/bin/python"
  if fp_venv_ok "$py"; then
    fp_py_log "reusing $dir (mlflow ${FP_MLFLOW_VERSION})"
    export FP_TEST_PYTHON=$py
    return 0
  fi
  local base
  base=$(fp_base_python) || return 1
  if [ ! -x "$py" ]; then
    mkdir -p "$(dirname "$dir")"
    local clear=()
    if [ -f "$dir/pyvenv.cfg" ]; then
      # A venv whose interpreter is gone (Python upgraded or moved): rebuild it.
      clear=(--clear)
    elif [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
      fp_py_log "$dir exists, is not empty and is not a venv: refusing to use it (set FP_VENV)"
      return 1
    fi
    fp_py_log "creating venv $dir with $base"
    "$base" -m venv "${clear[@]}" "$dir" || {
      fp_py_log "creating the venv failed (Debian: apt-get install python3-venv)"
      return 1
    }
  fi
  fp_py_log "installing ${FP_PY_REQUIREMENTS[*]} (first run: a few minutes)"
  local log="${FP_TEST_TMP:-/tmp}/pip-install.log"
  # pip's own output goes to the log; a progress line every 10 s says it is still working.
  "$py" -I -m pip install --progress-bar off "${FP_PY_REQUIREMENTS[@]}" >"$log" 2>&1 &
  local pip_pid=$! waited=0
  while kill -0 "$pip_pid" 2>/dev/null; do
    sleep 1
    waited=$((waited + 1))
    if ((waited % 10 == 0)); then
      if grep -q '^Installing collected packages' "$log"; then
        fp_py_log "pip: ${waited} s, installing…"
      else
        fp_py_log "pip: ${waited} s, $(grep -c '^Collecting' "$log" || true) packages collected…"
      fi
    fi
  done
  if ! wait "$pip_pid"; then
    fp_py_log "pip install failed; last lines of $log:"
    tail -n 30 "$log" >&2
    return 1
  fi
  if ! fp_venv_ok "$py"; then
    fp_py_log "pip finished but mlflow ${FP_MLFLOW_VERSION} is still not importable from $py"
    return 1
  fi
  fp_py_log "ready: $("$py" -I -c 'from importlib.metadata import version; print("mlflow", version("mlflow"))')"
  export FP_TEST_PYTHON=$py
}

fp_setup_python() {
  step "python venv (mlflow ${FP_MLFLOW_VERSION})"
  fp_ensure_venv
}

FP_TEST_SETUP+=(fp_setup_python)
