#!/usr/bin/env bash
# The REAL chat app template behind feedback-proxy, driven in Chromium (issue 17, acceptance 3
# and 4). Not part of CI: it needs a checkout of databricks/app-templates, whose code this
# repository does not contain (its license limits its use to Databricks services).
#
#   TEMPLATE_DIR=/path/to/app-templates scripts/template-e2e.sh
#
# Builds e2e-chatbot-app-next (npm ci with PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1, build:client,
# build:server; REBUILD=1 forces it) and runs, on free loopback ports:
#   - a private `mlflow server` and the example agent (examples/agent/);
#   - the template's server (`node dist/index.mjs` from server/, production mode) with
#     API_PROXY=<agent>/invocations, MLFLOW_EXPERIMENT_ID (feedback buttons on), a throwaway
#     Postgres database (its chat history; migrated with its own db:migrate), and dummy
#     Databricks credentials: DATABRICKS_TOKEN for its model calls, and a stand-in for the
#     workspace's token endpoint (its database code mints a service-principal token first);
#   - feedback-proxy in front of it (`kind = "ai-sdk-app"` at `/`), store in SQLite;
# then drives the template's own UI (tests/browser/template.mjs): chat, 👍, reload (shown), 👎;
# restart the template's server and the proxy; 👎 shown, 👍 → exactly one user_feedback
# assessment in MLflow, value true. Then a second chat, MLflow stopped, 👍 (stored, shown after
# reload), MLflow started → its assessment lands, still one per message.
#
# Env: TEMPLATE_DIR (required), TEMPLATE_PG_ADMIN_URL (default
# postgres://postgres@127.0.0.1:5432/postgres: a role that may CREATE DATABASE), CHROMIUM,
# KEEP=1 keeps the scratch directory.
set -euo pipefail

FP_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export FP_REPO_ROOT
: "${TEMPLATE_DIR:?set TEMPLATE_DIR to a checkout of databricks/app-templates}"
APP=$TEMPLATE_DIR
[ -d "$APP/e2e-chatbot-app-next" ] && APP=$APP/e2e-chatbot-app-next
[ -f "$APP/server/package.json" ] || { echo "no e2e-chatbot-app-next under $TEMPLATE_DIR" >&2; exit 1; }
PG_ADMIN=${TEMPLATE_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}

log() { printf '==> %s\n' "$*"; }
FP_TEST_TMP=$(mktemp -d /tmp/template-e2e.XXXXXX)
export FP_TEST_TMP
step() { log "$*"; }
cleanup_hooks=()
cleanup() {
  local rc=$? i
  for ((i = ${#cleanup_hooks[@]} - 1; i >= 0; i--)); do eval "${cleanup_hooks[$i]}" || true; done
  if [ "$rc" = 0 ] && [ -z "${KEEP:-}" ]; then rm -rf "$FP_TEST_TMP"; else echo "scratch kept: $FP_TEST_TMP" >&2; fi
}
trap cleanup EXIT

# shellcheck source=lib/20-python.sh
source "$FP_REPO_ROOT/scripts/lib/20-python.sh"
fp_ensure_venv
export FP_TEST_PYTHON=${FP_TEST_PYTHON:-$FP_REPO_ROOT/.cache/venv/bin/python}
# shellcheck source=lib/30-mlflow.sh
source "$FP_REPO_ROOT/scripts/lib/30-mlflow.sh"
FP_TEST_AFTER=()
# shellcheck source=lib/80-browser.sh
source "$FP_REPO_ROOT/scripts/lib/80-browser.sh"
fp_ensure_chromium
fp_ensure_playwright

log "template at $(git -C "$APP" rev-parse --short HEAD 2>/dev/null || echo '?') ($APP)"
if [ -n "${REBUILD:-}" ] || [ ! -f "$APP/server/dist/index.mjs" ] || [ ! -d "$APP/client/dist" ]; then
  log "building the template (npm ci, build:client, build:server)"
  (cd "$APP" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error &&
    npm run build:client && npm run build:server) >"$FP_TEST_TMP/template-build.log" 2>&1 || {
    tail -n 30 "$FP_TEST_TMP/template-build.log" >&2; exit 1; }
fi
log "building feedback-proxy"
(cd "$FP_REPO_ROOT" && cargo build --quiet)
BIN=$FP_REPO_ROOT/target/debug/feedback-proxy

# A throwaway database for the template's chat history.
DB=tmpl_e2e_$$
PG_URL=${PG_ADMIN%/*}/$DB
psql "$PG_ADMIN" -qc "CREATE DATABASE $DB" >/dev/null
cleanup_hooks+=("psql '$PG_ADMIN' -qc 'DROP DATABASE IF EXISTS $DB WITH (FORCE)' >/dev/null")
(cd "$APP" && POSTGRES_URL=$PG_URL npm run db:migrate) >"$FP_TEST_TMP/template-migrate.log" 2>&1 || {
  tail -n 20 "$FP_TEST_TMP/template-migrate.log" >&2; exit 1; }

MLFLOW_PORT=$(fp_free_port); AGENT_PORT=$(fp_free_port); TEMPLATE_PORT=$(fp_free_port); PROXY_PORT=$(fp_free_port)
MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
fp_start_mlflow "$MLFLOW_PORT" "$FP_TEST_TMP/mlflow"
cleanup_hooks+=('fp_stop $FP_MLFLOW_PID "mlflow server"')
fp_wait_http "$MLFLOW_URL/health" "$FP_MLFLOW_PID" "mlflow server" "$FP_TEST_TMP/mlflow/mlflow.log" 180
EXP=$(fp_create_experiment "$MLFLOW_URL" template-e2e)
fp_start_agent "$AGENT_PORT" "$MLFLOW_URL" "$EXP" "$FP_TEST_TMP/agent"
cleanup_hooks+=('fp_stop $FP_AGENT_PID agent')
fp_wait_http "http://127.0.0.1:$AGENT_PORT/health" "$FP_AGENT_PID" agent "$FP_TEST_TMP/agent/agent.log" 120

# The template mints its service principal's token at <DATABRICKS_HOST>/oidc/v1/token (https
# only) before it uses its database: a stand-in for that endpoint, on a throwaway certificate
# that node is told to trust. Nothing else of Databricks is needed (the agent is API_PROXY).
OIDC_PORT=$(fp_free_port)
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$FP_TEST_TMP/oidc.key" \
  -out "$FP_TEST_TMP/oidc.crt" >/dev/null 2>&1
OIDC_PID=$(fp_spawn "$FP_TEST_TMP/oidc.pid" "$FP_TEST_TMP/oidc.log" "$FP_TEST_PYTHON" -I -c '
import json, ssl, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        ok = self.path.startswith("/oidc/v1/token")
        b = json.dumps({"access_token": "app-sp-token", "token_type": "Bearer", "expires_in": 3600}).encode() if ok else b""
        self.send_response(200 if ok else 404)
        self.send_header("content-type", "application/json"); self.send_header("content-length", str(len(b)))
        self.end_headers(); self.wfile.write(b)
    do_GET = do_POST
    def log_message(self, *a): print(self.command, self.path, flush=True)
srv = HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()' "$OIDC_PORT" "$FP_TEST_TMP/oidc.crt" "$FP_TEST_TMP/oidc.key")
cleanup_hooks+=('fp_stop $OIDC_PID "token endpoint stand-in"')

start_template() {
  TEMPLATE_PID=$(cd "$APP/server" && fp_spawn "$FP_TEST_TMP/template.pid" "$FP_TEST_TMP/template.log" \
    env NODE_ENV=production CHAT_APP_PORT="$TEMPLATE_PORT" \
    API_PROXY="http://127.0.0.1:$AGENT_PORT/invocations" MLFLOW_EXPERIMENT_ID="$EXP" \
    DATABRICKS_HOST="https://localhost:$OIDC_PORT" NODE_EXTRA_CA_CERTS="$FP_TEST_TMP/oidc.crt" \
    DATABRICKS_CLIENT_ID=unused DATABRICKS_CLIENT_SECRET=unused DATABRICKS_TOKEN=unused \
    POSTGRES_URL="$PG_URL" PGUSER=postgres \
    PGHOST= PGDATABASE= PGPASSWORD= node dist/index.mjs)
  fp_wait_http "http://127.0.0.1:$TEMPLATE_PORT/ping" "$TEMPLATE_PID" "template server" "$FP_TEST_TMP/template.log" 60
}
cat >"$FP_TEST_TMP/proxy.toml" <<TOML
listen = "127.0.0.1:$PROXY_PORT"
[log]
level = "info"
[identity]
trust_forwarded_headers = true
[agent]
url = "http://127.0.0.1:$TEMPLATE_PORT"
[[agent.routes]]
path = "/"
kind = "ai-sdk-app"
[mlflow]
tracking_uri = "$MLFLOW_URL"
experiment_id = "$EXP"
timeout = "3s"
[store]
url = "sqlite://$FP_TEST_TMP/feedback-proxy.db"
[delivery]
poll_interval = "200ms"
backoff_initial = "500ms"
backoff_max = "2s"
TOML
PROXY_RUN=0
start_proxy() {
  PROXY_RUN=$((PROXY_RUN + 1))
  PROXY_LOG=$FP_TEST_TMP/proxy.$PROXY_RUN.log
  PROXY_PID=$(fp_spawn "$FP_TEST_TMP/proxy.pid" "$PROXY_LOG" "$BIN" serve --config "$FP_TEST_TMP/proxy.toml")
  fp_wait_http "http://127.0.0.1:$PROXY_PORT/healthz" "$PROXY_PID" feedback-proxy "$PROXY_LOG" 30
}
start_template
cleanup_hooks+=('fp_stop $TEMPLATE_PID "template server"')
start_proxy
cleanup_hooks+=('fp_stop $PROXY_PID feedback-proxy')

# Every user_feedback assessment in the experiment: "<trace> <source> <value> <assessment>".
assessments() {
  fp_py - "$MLFLOW_URL" "$EXP" <<'PY'
import json, sys, urllib.request
base, exp = sys.argv[1], sys.argv[2]
op = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"content-type": "application/json"})
    return json.load(op.open(req, timeout=10))
traces = call("POST", "/api/3.0/mlflow/traces/search", {"locations": [{"type": "MLFLOW_EXPERIMENT",
              "mlflow_experiment": {"experiment_id": exp}}], "max_results": 100}).get("traces", [])
for t in traces:
    info = call("GET", f"/api/3.0/mlflow/traces/{t['trace_id']}")["trace"]["trace_info"]
    for a in info.get("assessments", []):
        if a.get("assessment_name") == "user_feedback" and a.get("valid", True):
            print(t["trace_id"], a["source"]["source_id"], json.dumps(a["feedback"]["value"]), a["assessment_id"])
PY
}
# Waits until the assessments are exactly $1 (a sorted "source value" per line).
wait_assessments() {
  local want=$1 got start=$SECONDS
  while :; do
    got=$(assessments 2>/dev/null | awk '{print $2, $3}' | sort || true)
    [ "$got" = "$want" ] && { log "MLflow: $(echo "$got" | tr '\n' ';')"; return 0; }
    ((SECONDS - start < 90)) || { echo "MLflow holds [$got], expected [$want]" >&2; assessments >&2 || true; return 1; }
    sleep 0.5
  done
}
ui() {
  APP_URL=http://127.0.0.1:$PROXY_PORT STATE=$FP_TEST_TMP/state.json CHROMIUM=$FP_CHROMIUM \
    SCREENSHOT_DIR="$FP_REPO_ROOT/target/browser" node "$FP_REPO_ROOT/tests/browser/template.mjs" "$1"
}

log "phase 1: chat, 👍, reload, 👎"
ui first
wait_assessments "ada@example.com false"
log "restarting the template's server and the proxy"
fp_stop "$TEMPLATE_PID" "template server"; start_template
fp_stop "$PROXY_PID" feedback-proxy; start_proxy
log "phase 2: the vote is still shown; change it again"
ui second
wait_assessments "ada@example.com true"
log "exactly one assessment, value true: $(assessments | wc -l) in the experiment"

log "phase 3: a second chat, then MLflow stops while the user votes"
ui chat
# Waits until the experiment holds $1 traces (the agent flushes them asynchronously).
wait_traces() {
  local start=$SECONDS
  until [ "$(fp_py - "$MLFLOW_URL" "$EXP" <<'PY'
import json, sys, urllib.request
op = urllib.request.build_opener(urllib.request.ProxyHandler({}))
body = {"locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": sys.argv[2]}}], "max_results": 100}
req = urllib.request.Request(sys.argv[1] + "/api/3.0/mlflow/traces/search", method="POST",
                             headers={"content-type": "application/json"}, data=json.dumps(body).encode())
print(len(json.load(op.open(req, timeout=10)).get("traces", [])))
PY
)" -ge "$1" ]; do
    ((SECONDS - start < 60)) || { echo "fewer than $1 traces after 60 s" >&2; return 1; }
    sleep 0.5
  done
}
wait_traces 2
fp_stop "$FP_MLFLOW_PID" "mlflow server"
ui vote
log "MLflow is down: the vote is stored (see mlflowStatus above); starting MLflow again"
fp_start_mlflow "$MLFLOW_PORT" "$FP_TEST_TMP/mlflow"
fp_wait_http "$MLFLOW_URL/health" "$FP_MLFLOW_PID" "mlflow server" "$FP_TEST_TMP/mlflow/mlflow.log" 180
wait_assessments "ada@example.com true
ada@example.com true"
log "every user_feedback assessment in MLflow (trace source value id):"
assessments
log "OK"
