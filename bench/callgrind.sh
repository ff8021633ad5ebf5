#!/usr/bin/env bash
# Instructions per proxied request of one proxy binary, under valgrind's callgrind: repeatable
# on a noisy machine (instruction counts do not move with the load), so two builds can be
# compared run against run (docs/BENCHMARKS.md, "Changes made from these findings").
#
#   bash bench/callgrind.sh [BINARY] [SECONDS]     # default: target/release/feedback-proxy, 10
#
# The 1 KiB JSON POST of scenarios 1–2 (bench/wrk/post.lua) at concurrency 8 against the fpbench
# upstream, after a 3 s warm-up that is excluded (`callgrind_control --dump` zeroes the counters).
# Counts every thread of the proxy (the SQLite link writer included). Needs valgrind and wrk
# (Debian packages) and builds fpbench (release) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/feedback-proxy}
SECS=${2:-10}
for tool in valgrind callgrind_control wrk curl; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install valgrind wrk curl)" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "no proxy binary at $BIN (cargo build --release)" >&2; exit 2; }
FPB=target/release/fpbench
[ -x "$FPB" ] || (cd bench && CARGO_TARGET_DIR=../target cargo build --release -q)
RUN=$(mktemp -d /tmp/fp-callgrind.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
read -r P_UP P_PROXY < <("$FPB" ports 2 | tr '\n' ' '; echo)
"$FPB" upstream --listen "127.0.0.1:$P_UP" --threads 1 --exit-after 600 > "$RUN/upstream.log" 2>&1 &
PIDS+=($!)
sed -e "s|@LISTEN@|127.0.0.1:$P_PROXY|" -e "s|@UPSTREAM@|127.0.0.1:$P_UP|" \
    -e "s|@STORE_URL@|sqlite://$RUN/proxy.db|" -e "s|@SCHEMA@|feedback_proxy|" \
    bench/proxy.toml.in > "$RUN/proxy.toml"
TOKIO_WORKER_THREADS=2 valgrind --tool=callgrind --callgrind-out-file="$RUN/callgrind.out" \
  "$BIN" serve --config "$RUN/proxy.toml" > "$RUN/proxy.log" 2>&1 &
PROXY=$!
PIDS+=("$PROXY")
for _ in $(seq 1 200); do
  curl -sf -o /dev/null "http://127.0.0.1:$P_PROXY/healthz" && break
  sleep 0.3
done
curl -sf -o /dev/null "http://127.0.0.1:$P_PROXY/healthz" || { echo "the proxy did not start: $(tail -3 "$RUN/proxy.log")" >&2; exit 1; }
URL="http://127.0.0.1:$P_PROXY/invocations"
wrk -t1 -c8 -d3s -s bench/wrk/post.lua "$URL" > /dev/null 2>&1
sleep 1
callgrind_control --dump=warm-up "$PROXY" > /dev/null 2>&1
OUT=$(wrk -t1 -c8 -d"${SECS}s" -s bench/wrk/post.lua "$URL" 2>&1)
sleep 1
callgrind_control --dump=load "$PROXY" > /dev/null 2>&1
N=$(sed -n 's/^WRKJSON //p' <<<"$OUT" | sed -n 's/.*"requests":\([0-9]*\).*/\1/p')
FILE=$(ls -t "$RUN"/callgrind.out.* | head -1)
TOTAL=$(grep -h '^summary:\|^totals:' "$FILE" | head -1 | awk '{print $2}')
[ -n "$N" ] && [ "$N" -gt 0 ] && [ -n "$TOTAL" ] || { echo "no result (requests: ${N:-?}, instructions: ${TOTAL:-?})" >&2; exit 1; }
echo "$BIN: $N requests, $TOTAL instructions, $((TOTAL / N)) per request (profile: $FILE)"
