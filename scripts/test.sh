#!/usr/bin/env bash
# The whole test suite, on a fresh machine or this one. Installs or starts what it needs:
#   - a Postgres (DATABASE_URL, else 127.0.0.1:5432 if it answers, else a throwaway cluster),
#     plus a private throwaway cluster with TLS for the TLS / restart tests;
#   - a Python venv with mlflow==3.17.2 (cached under .cache/), an `mlflow server` and the
#     example agent;
# then runs formatting and lint checks, the Rust tests, and the browser test. Everything it
# starts is stopped on exit. Arguments are passed to the test runner as a filter
# (e.g. `scripts/test.sh feedback`), which also skips the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export FP_REPO_ROOT=$ROOT
export FP_TEST_TMP=${FP_TEST_TMP:-$(mktemp -d /tmp/feedback-proxy-test.XXXXXX)}
# The postgres user must be able to enter the cluster directories we create here.
chmod 755 "$FP_TEST_TMP"

cleanup_hooks=()
on_exit() {
  local status=$?
  # Nothing may cut the clean-up short: not a second Ctrl-C, and not SIGPIPE when the output
  # was piped (e.g. through tee) and the reader died with the first Ctrl-C.
  trap '' INT TERM PIPE
  for ((i=${#cleanup_hooks[@]}-1; i>=0; i--)); do eval "${cleanup_hooks[i]}" || true; done
  if [ $status = 0 ] && [ -z "${FP_KEEP_TMP:-}" ]; then
    rm -rf "$FP_TEST_TMP"
  else
    printf '\nlogs and data of this run: %s\n' "$FP_TEST_TMP" >&2
  fi
  exit $status
}
trap on_exit EXIT
trap 'exit 130' INT TERM

step() { printf '\n==> %s\n' "$*"; }

step "format and lint"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
python3 scripts/check-layers.py

for lib in scripts/lib/*.sh; do
  # shellcheck source=/dev/null
  source "$lib"
done
for setup in "${FP_TEST_SETUP[@]:-}"; do
  [ -n "$setup" ] && "$setup"
done

step "rust tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --all-targets --no-fail-fast "$@"
else
  cargo test --all-targets --no-fail-fast "$@"
fi

# With a test filter (a developer's focused run), the after-steps (browser test, benchmark
# smoke run) are skipped.
if [ $# -eq 0 ]; then
  for t in "${FP_TEST_AFTER[@]:-}"; do
    [ -n "$t" ] && "$t"
  done
fi
step "all tests passed"
