# shellcheck shell=bash
# The browser test: the reference chat page in headless Chromium (Debian's package, driven by
# playwright-core), against the demo stack (scripts/demo-stack.sh) on free ports.
# Registered in FP_TEST_AFTER: runs after the Rust tests. Installs Chromium (apt) and
# playwright-core (npm, pinned by tests/browser/package-lock.json) when missing.

fp_browser_log() { printf '    [browser] %s\n' "$*" >&2; }

fp_ensure_chromium() {
  FP_CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
  [ -x "$FP_CHROMIUM" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    fp_browser_log "installing Debian's chromium (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >"$FP_TEST_TMP/apt-chromium.log" 2>&1 || {
      fp_browser_log "apt-get install chromium failed; log: $FP_TEST_TMP/apt-chromium.log"
      tail -n 20 "$FP_TEST_TMP/apt-chromium.log" >&2
      return 1
    }
    [ -x "$FP_CHROMIUM" ] && return 0
  fi
  fp_browser_log "no Chromium at $FP_CHROMIUM: install Debian's chromium package or set CHROMIUM"
  return 1
}

fp_ensure_playwright() {
  command -v node >/dev/null && command -v npm >/dev/null || {
    fp_browser_log "node and npm are needed for the browser test"
    return 1
  }
  local dir="$FP_REPO_ROOT/tests/browser"
  if [ ! -d "$dir/node_modules/playwright-core" ] ||
    [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    fp_browser_log "installing playwright-core (npm ci)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || return 1
  fi
}

fp_browser_test() {
  step "browser test"
  fp_ensure_chromium || return 1
  fp_ensure_playwright || return 1
  # shellcheck source=../demo-stack.sh
  source "$FP_REPO_ROOT/scripts/demo-stack.sh"
  AGENT_CHUNK_DELAY_MS=150 fp_demo_stack "$FP_TEST_TMP/demo" debug 0 0 0 || return 1
  CHAT_URL=$FP_DEMO_CHAT_URL MLFLOW_URL=$FP_DEMO_MLFLOW_URL CHROMIUM=$FP_CHROMIUM \
    SCREENSHOT_DIR="$FP_REPO_ROOT/target/browser" \
    node "$FP_REPO_ROOT/tests/browser/feedback.mjs" || {
    fp_browser_log "failed; proxy log tail ($FP_DEMO_PROXY_LOG):"
    tail -n 30 "$FP_DEMO_PROXY_LOG" >&2 || true
    return 1
  }
  CHAT_URL=$FP_DEMO_CHAT_URL MLFLOW_URL=$FP_DEMO_MLFLOW_URL CHROMIUM=$FP_CHROMIUM \
    SCREENSHOT_DIR="$FP_REPO_ROOT/target/browser" \
    node "$FP_REPO_ROOT/tests/browser/corrections.mjs" || {
    fp_browser_log "corrections failed; proxy log tail ($FP_DEMO_PROXY_LOG):"
    tail -n 30 "$FP_DEMO_PROXY_LOG" >&2 || true
    return 1
  }
  CHAT_URL=$FP_DEMO_CHAT_URL CHROMIUM=$FP_CHROMIUM SCREENSHOT_DIR="$FP_REPO_ROOT/target/browser" \
    node "$FP_REPO_ROOT/tests/browser/review.mjs" || {
    fp_browser_log "review page failed; proxy log tail ($FP_DEMO_PROXY_LOG):"
    tail -n 30 "$FP_DEMO_PROXY_LOG" >&2 || true
    return 1
  }
}

FP_TEST_AFTER+=(fp_browser_test)
