#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server on loopback for the tracker's ledger tests and
# prints its URL (postgres://postgres@127.0.0.1:PORT/postgres) on stdout.
#
#   tracker/tests/pg.sh OWNER_PID
#
# The server lives in a fresh temporary directory, trusts local connections (test
# only), listens on 127.0.0.1 on a free port, and is stopped and deleted as soon as
# OWNER_PID (the test process) exits, however it exits.
#
# Exit 77 when no PostgreSQL server binaries are installed (the tests then skip, saying
# so, except under CI=true or CI=1, where they fail); any other failure exits 1 with the
# server log on stderr. As root (initdb and postgres refuse root) the server runs as the
# `postgres` user that Debian's postgresql package creates.
set -euo pipefail
owner=${1:?usage: pg.sh OWNER_PID}

# TOLLGATE_PG_BIN overrides where the server binaries are (e.g. /nonexistent to check the skip).
bin=${TOLLGATE_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)}
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ] || [ ! -x "$bin/pg_ctl" ]; then
  echo "pg.sh: no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install postgresql)" >&2
  exit 77
fi

# PostgreSQL refuses to run as root: run it as the postgres user the Debian package creates.
as_pg=()
if [ "$(id -u)" = 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    echo "pg.sh: running as root but there is no postgres user to run the server as" >&2
    exit 1
  fi
  as_pg=(runuser -u postgres --)
fi

dir=$(mktemp -d /tmp/tollgate-pg.XXXXXX)
chmod 700 "$dir"
if [ ${#as_pg[@]} -gt 0 ]; then chown postgres: "$dir"; fi
cleanup_now() { "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" stop -m immediate >/dev/null 2>&1 || true; rm -rf "$dir"; }

"${as_pg[@]}" "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 || {
  cat "$dir/initdb.log" >&2; rm -rf "$dir"; exit 1
}

# A free port: ask the kernel for one, then let the server take it (retry on the rare race).
started=""
for _ in 1 2 3 4 5; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
    || shuf -i 20000-60000 -n 1)
  if "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=50 -c shared_buffers=32MB" \
      start >/dev/null 2>&1; then
    started=1
    break
  fi
done
if [ -z "$started" ]; then
  cat "$dir/server.log" >&2 || true
  cleanup_now
  exit 1
fi

# Watchdog: stop and delete the server when the owner exits. Detached from our stdout so
# the caller's read of the URL ends when this script does.
setsid bash -c '
  while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
  shift
  "$@"
' pg-watchdog "$owner" bash -c "$(declare -f cleanup_now); bin='$bin'; dir='$dir'; as_pg=(${as_pg[*]}); cleanup_now" \
  </dev/null >/dev/null 2>&1 &

echo "postgres://postgres@127.0.0.1:$port/postgres"
