#!/usr/bin/env bash
# One Databricks App, two processes: the chat app template's server on a loopback port, and
# feedback-proxy on DATABRICKS_APP_PORT in front of it. If either exits, the other is stopped
# and the app exits (the platform restarts it). SIGTERM from the platform reaches both.
set -euo pipefail
export TEMPLATE_PORT=${TEMPLATE_PORT:-3001}

# The template's server (`npm run start` of the template runs the same file). It listens on
# every interface; only DATABRICKS_APP_PORT is reachable from outside the app [unverified].
(cd server && CHAT_APP_PORT=$TEMPLATE_PORT NODE_ENV=production exec node dist/index.mjs) &
template=$!
# The proxy (the bundle of scripts/build-release.sh: binary started through the loader).
/lib64/ld-linux-x86-64.so.2 ./feedback-proxy serve --config feedback-proxy.toml &
proxy=$!

trap 'kill -TERM "$template" "$proxy" 2>/dev/null || true' TERM INT
wait -n "$template" "$proxy" || true
kill -TERM "$template" "$proxy" 2>/dev/null || true
wait
