#!/usr/bin/env bash
# Builds the Linux x86_64 release binary and assembles the Databricks Apps bundle:
#
#   dist/databricks-app/app.yaml
#   dist/databricks-app/feedback-proxy            (stripped: app files must be <= 10 MiB)
#   dist/databricks-app/config/databricks.toml
#
# then checks the bundle against what the Apps runtime needs (docs/deploy.md, "Build"):
#   - every file <= 10485760 bytes (the platform refuses larger app files);
#   - an x86-64 ELF whose interpreter is the loader app.yaml starts it with;
#   - no glibc symbol version newer than 2.35 (Ubuntu 22.04, the Apps runtime) and no shared
#     library beyond libc, libm, libgcc_s and the loader;
#   - the bundled binary accepts the bundled config with a realistic platform environment, and
#     names the missing variables without one.
#
# Usage: scripts/build-release.sh                 (bundle keeps the AGENT_URL placeholder)
#        AGENT_URL=https://my-agent-123.aws.databricksapps.com scripts/build-release.sh
# Output directory: $OUT (default dist/databricks-app). Needs cargo and binutils.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-dist/databricks-app}
MAX_FILE_BYTES=10485760
MAX_GLIBC=2.35
LOADER=/lib64/ld-linux-x86-64.so.2
PLACEHOLDER=REPLACE-WITH-AGENT-APP-URL
BIN=target/release/feedback-proxy

fail() { echo "build-release: $*" >&2; exit 1; }
step() { printf '==> %s\n' "$*"; }

# Refuse a bad AGENT_URL before building anything.
if [ -n "${AGENT_URL:-}" ]; then
  case "$AGENT_URL" in
    https://*) ;;
    *) fail "AGENT_URL must be an https:// URL, got: $AGENT_URL" ;;
  esac
  case "$AGENT_URL" in
    *'"'* | *'|'* | *' '* | *'&'* | *'\'*) fail "AGENT_URL contains a character it cannot: $AGENT_URL" ;;
  esac
fi

step "cargo build --release --locked"
cargo build --release --locked --bin feedback-proxy
[ -x "$BIN" ] || fail "$BIN was not produced"

step "assemble $OUT"
rm -rf "$OUT"
mkdir -p "$OUT/config"
# Debug line tables stay in target/release for local backtraces; the app gets a stripped copy.
strip --strip-all -o "$OUT/feedback-proxy" "$BIN"
cp app.yaml "$OUT/app.yaml"
cp config/databricks.toml "$OUT/config/databricks.toml"
if [ -n "${AGENT_URL:-}" ]; then
  sed -i "s|\"$PLACEHOLDER\"|\"$AGENT_URL\"|" "$OUT/app.yaml"
fi
if grep -q "$PLACEHOLDER" "$OUT/app.yaml"; then
  echo "WARNING: $OUT/app.yaml still has AGENT_URL = $PLACEHOLDER; the app will refuse to start" >&2
  echo "         until it is set (rerun with AGENT_URL=https://… or edit the bundled app.yaml)." >&2
fi

step "check file sizes (<= $MAX_FILE_BYTES bytes each)"
while IFS= read -r -d '' f; do
  size=$(stat -c %s "$f")
  printf '  %10d  %s\n' "$size" "${f#"$OUT"/}"
  [ "$size" -le "$MAX_FILE_BYTES" ] || fail "$f is $size bytes; Databricks Apps refuses files over $MAX_FILE_BYTES"
done < <(find "$OUT" -type f -print0 | sort -z)

step "check the binary: architecture, loader, shared libraries, glibc"
readelf -h "$OUT/feedback-proxy" | grep -q 'Machine:.*X86-64' || fail "not an x86-64 binary"
interp=$(readelf -l "$OUT/feedback-proxy" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ "$interp" = "$LOADER" ] || fail "interpreter is '$interp', app.yaml starts $LOADER"
grep -q -- "- $LOADER" "$OUT/app.yaml" || fail "app.yaml does not start the binary through $LOADER"
needed=$(readelf -d "$OUT/feedback-proxy" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
for lib in $needed; do
  case "$lib" in
    libc.so.6 | libm.so.6 | libgcc_s.so.1 | ld-linux-x86-64.so.2) ;;
    *) fail "needs $lib, which the Apps runtime is not known to have" ;;
  esac
done
glibc=$(objdump -T "$OUT/feedback-proxy" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
newest=$(printf '%s\n%s\n' "$glibc" "$MAX_GLIBC" | sort -V | tail -1)
[ "$newest" = "$MAX_GLIBC" ] || fail "needs glibc $glibc; Ubuntu 22.04 (Apps runtime) has $MAX_GLIBC"
echo "  shared libraries: $needed"
echo "  newest glibc symbol version: $glibc (runtime has $MAX_GLIBC)"

step "check-config with a sample platform environment"
platform_env=(
  DATABRICKS_APP_NAME=feedback-proxy
  DATABRICKS_APP_PORT=8000
  DATABRICKS_WORKSPACE_ID=1234567890123456
  DATABRICKS_HOST=example.cloud.databricks.com
  DATABRICKS_CLIENT_ID=00000000-0000-0000-0000-000000000000
  DATABRICKS_CLIENT_SECRET=sample-secret-not-real
  PGHOST=instance-00000000.database.cloud.databricks.com
  PGPORT=5432
  PGUSER=00000000-0000-0000-0000-000000000000
  PGDATABASE=databricks_postgres
  PGSSLMODE=require
  PGAPPNAME=feedback-proxy
  MLFLOW_EXPERIMENT_ID=1234567890
  AGENT_URL="${AGENT_URL:-https://agent-1234567890123456.aws.databricksapps.com}"
)
# Run exactly as app.yaml does: from the bundle directory, through the loader.
(cd "$OUT" && env -i "${platform_env[@]}" "$LOADER" ./feedback-proxy check-config --config config/databricks.toml >/dev/null) \
  || fail "the bundled binary rejects the bundled config with a full platform environment"
if (cd "$OUT" && env -i "$LOADER" ./feedback-proxy check-config --config config/databricks.toml >/dev/null 2>&1); then
  fail "check-config accepted the bundled config without any platform variable"
fi
echo "  ok (and refused without the platform variables)"

step "bundle ready"
(cd "$OUT" && sha256sum feedback-proxy)
echo "Deploy it: docs/deploy.md, step 'Upload and deploy' (source: $OUT)"
