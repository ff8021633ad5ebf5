# Postgres for the store tests (sourced by scripts/test.sh; see scripts/lib/README.md).
#
# Exports:
#   FP_TEST_PG_URL          a Postgres whose role may CREATE DATABASE: $DATABASE_URL if set, else
#                           127.0.0.1:5432 if it answers, else a throwaway cluster started here.
#   FP_TEST_PG_TLS_URL      superuser URL of a PRIVATE throwaway cluster with TLS on and password
#                           (scram) auth over TCP, listening on 127.0.0.1 and 127.0.0.2; its
#                           certificate (SAN DNS:localhost, IP:127.0.0.1) is signed by
#   FP_TEST_PG_TLS_CA       a throwaway CA; FP_TEST_PG_OTHER_CA is an unrelated CA.
#   FP_TEST_PG_RESTART_URL  a second private cluster, same setup, that the restart test stops and
#   FP_TEST_PG_RESTART_DATA starts (its data directory), so that it never disturbs the TLS tests
#                           running at the same time; FP_TEST_PG_RESTART_LOG is its server log.
#   FP_TEST_PG_CTL          pg_ctl; FP_TEST_PG_OS_USER the OS user to run it as ("" = ourselves).
# A piece that cannot be provided is not fatal here: FP_TEST_PG_ERROR / FP_TEST_PG_TLS_ERROR
# carry the reason, and every Postgres test then FAILS with it (never a silent skip).
# Private clusters are stopped and deleted on exit.

# Finds a PostgreSQL program on PATH or in Debian's versioned directories (newest first).
fp_pg_bin() {
  local name=$1 p
  if p=$(command -v "$name" 2>/dev/null) && [ -n "$p" ]; then
    # Debian puts wrappers for client programs on PATH, but not initdb / pg_ctl.
    echo "$p"
    return 0
  fi
  for p in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
    if [ -x "$p/$name" ]; then
      echo "$p/$name"
      return 0
    fi
  done
  return 1
}

# The OS user that owns private clusters: Postgres refuses to run as root.
fp_pg_os_user() {
  if [ "$(id -u)" -eq 0 ]; then
    echo postgres
  else
    echo ""
  fi
}

# Runs a command as the cluster owner.
fp_pg_as_owner() {
  local user
  user=$(fp_pg_os_user)
  if [ -z "$user" ]; then
    "$@"
  elif command -v runuser >/dev/null 2>&1; then
    runuser -u "$user" -- "$@"
  else
    su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
  fi
}

fp_pg_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' 2>/dev/null && return 0
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

# Whether a URL accepts a query (psql is a client: present even without a server).
fp_pg_answers() {
  local psql
  psql=$(fp_pg_bin psql) || return 1
  PGCONNECT_TIMEOUT=3 "$psql" "$1" -XAtqc 'SELECT 1' >/dev/null 2>&1
}

# A throwaway CA, a server certificate it signed, and an unrelated CA.
fp_pg_make_certs() {
  local dir=$1
  mkdir -p "$dir"
  (
    set -e
    cd "$dir"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 3 \
      -subj "/CN=feedback-proxy test CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -x509 "${ec[@]}" -keyout other-ca.key -out other-ca.crt -days 3 \
      -subj "/CN=some other CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req "${ec[@]}" -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out server.crt -days 3 -extfile server.ext 2>/dev/null
    chmod 644 ca.crt other-ca.crt server.crt
  )
}

# Starts a private cluster NAME with TLS (certificates from $2) and scram auth for TCP; sets
# FP_PG_PORT and FP_PG_PASSWORD and registers its clean-up. Not to be run in a subshell (the
# clean-up hook would be lost).
fp_pg_start_cluster() {
  local name=$1 certs=$2 initdb pg_ctl owner dir port pw
  initdb=$(fp_pg_bin initdb) || { echo "initdb not found (install the PostgreSQL server: apt-get install postgresql)" >&2; return 1; }
  pg_ctl=$(fp_pg_bin pg_ctl) || { echo "pg_ctl not found" >&2; return 1; }
  owner=$(fp_pg_os_user)
  if [ -n "$owner" ] && ! id "$owner" >/dev/null 2>&1; then
    echo "running as root but there is no '$owner' OS user to own a Postgres cluster" >&2
    return 1
  fi
  dir="$FP_TEST_TMP/pg-$name"
  mkdir -p "$dir"
  chmod 755 "$dir"
  pw=$(openssl rand -hex 16)
  printf '%s\n' "$pw" >"$dir/pwfile"
  if [ -n "$owner" ]; then
    chown "$owner" "$dir" "$dir/pwfile"
  fi
  chmod 600 "$dir/pwfile"
  fp_pg_as_owner "$initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 || {
    echo "initdb failed for the $name cluster (log: $dir/initdb.log)" >&2
    return 1
  }
  install -m 600 "$certs/server.key" "$dir/data/server.key"
  install -m 644 "$certs/server.crt" "$dir/data/server.crt"
  if [ -n "$owner" ]; then
    chown "$owner" "$dir/data/server.key" "$dir/data/server.crt"
  fi
  fp_pg_as_owner tee "$dir/data/pg_hba.conf" >/dev/null <<EOF
local all all trust
host  all all 127.0.0.0/8 scram-sha-256
host  all all ::1/128     scram-sha-256
EOF
  local attempt
  for attempt in 1 2 3; do
    port=$(fp_pg_free_port) || { echo "no free port" >&2; return 1; }
    fp_pg_as_owner tee "$dir/data/postgresql.auto.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1,127.0.0.2'
port = $port
unix_socket_directories = '$dir'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
max_connections = 80
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    if fp_pg_as_owner "$pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 start >/dev/null 2>&1; then
      cleanup_hooks+=("fp_pg_stop_cluster '$dir'")
      FP_PG_PORT=$port
      FP_PG_PASSWORD=$pw
      return 0
    fi
    # Most likely someone took the port between our probe and the bind: try another.
  done
  echo "the $name cluster did not start (log: $dir/server.log)" >&2
  return 1
}

fp_pg_stop_cluster() {
  local dir=$1 pg_ctl
  pg_ctl=$(fp_pg_bin pg_ctl) || return 0
  fp_pg_as_owner "$pg_ctl" -D "$dir/data" -m immediate -w -t 20 stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

fp_pg_setup() {
  if declare -F step >/dev/null; then step "postgres"; fi
  local certs="$FP_TEST_TMP/pg-certs"
  export FP_TEST_PG_OS_USER
  FP_TEST_PG_OS_USER=$(fp_pg_os_user)
  FP_TEST_PG_CTL=$(fp_pg_bin pg_ctl || true)
  export FP_TEST_PG_CTL

  # The shared Postgres the conformance tests use (each test creates its own database).
  if [ -n "${DATABASE_URL:-}" ]; then
    if fp_pg_answers "$DATABASE_URL"; then
      export FP_TEST_PG_URL="$DATABASE_URL"
      echo "using DATABASE_URL"
    else
      export FP_TEST_PG_ERROR="DATABASE_URL is set but does not answer"
    fi
  elif fp_pg_answers "postgresql://postgres@127.0.0.1:5432/postgres"; then
    export FP_TEST_PG_URL="postgresql://postgres@127.0.0.1:5432/postgres"
    echo "using the Postgres at 127.0.0.1:5432"
  fi

  cleanup_hooks+=("rm -rf '$certs'")
  if ! fp_pg_make_certs "$certs"; then
    export FP_TEST_PG_TLS_ERROR="cannot make test certificates (is openssl installed?)"
  else
    export FP_TEST_PG_TLS_CA="$certs/ca.crt" FP_TEST_PG_OTHER_CA="$certs/other-ca.crt"
    # The same server certificate (localhost, 127.0.0.1) serves the HTTPS agent tests.
    export FP_TEST_TLS_CERT="$certs/server.crt" FP_TEST_TLS_KEY="$certs/server.key"
    if fp_pg_start_cluster tls "$certs"; then
      export FP_TEST_PG_TLS_URL="postgresql://postgres:$FP_PG_PASSWORD@127.0.0.1:$FP_PG_PORT/postgres"
      export FP_TEST_PG_TLS_DATA="$FP_TEST_TMP/pg-tls/data"
      echo "private TLS cluster on 127.0.0.1:$FP_PG_PORT"
    else
      export FP_TEST_PG_TLS_ERROR="cannot start a private Postgres cluster (see the output above)"
    fi
    if [ -z "${FP_TEST_PG_TLS_ERROR:-}" ] && fp_pg_start_cluster restart "$certs"; then
      export FP_TEST_PG_RESTART_URL="postgresql://postgres:$FP_PG_PASSWORD@127.0.0.1:$FP_PG_PORT/postgres"
      export FP_TEST_PG_RESTART_DATA="$FP_TEST_TMP/pg-restart/data"
      export FP_TEST_PG_RESTART_LOG="$FP_TEST_TMP/pg-restart/server.log"
      echo "private restartable cluster on 127.0.0.1:$FP_PG_PORT"
    else
      export FP_TEST_PG_TLS_ERROR="${FP_TEST_PG_TLS_ERROR:-cannot start a second private Postgres cluster (see the output above)}"
    fi
  fi

  # No shared Postgres: the private TLS cluster serves the conformance tests too.
  if [ -z "${FP_TEST_PG_URL:-}" ] && [ -z "${FP_TEST_PG_ERROR:-}" ]; then
    if [ -n "${FP_TEST_PG_TLS_URL:-}" ]; then
      export FP_TEST_PG_URL="$FP_TEST_PG_TLS_URL"
      echo "no Postgres at 127.0.0.1:5432: the conformance tests use the private cluster"
    else
      export FP_TEST_PG_ERROR="no Postgres: DATABASE_URL is unset, 127.0.0.1:5432 does not answer, and no throwaway cluster could be started (install the PostgreSQL server: apt-get install postgresql)"
    fi
  fi
  if [ -n "${FP_TEST_PG_ERROR:-}" ]; then echo "WARNING: $FP_TEST_PG_ERROR; the Postgres tests will fail" >&2; fi
  if [ -n "${FP_TEST_PG_TLS_ERROR:-}" ]; then echo "WARNING: $FP_TEST_PG_TLS_ERROR; the TLS / rotation / restart tests will fail" >&2; fi
  return 0
}

FP_TEST_SETUP+=(fp_pg_setup)
