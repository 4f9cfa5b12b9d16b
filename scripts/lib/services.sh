# Shared by scripts/dev.sh and scripts/test.sh: make sure the local services are up.
# shellcheck shell=bash

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq 1 $((seconds * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "error: $what did not come up within ${seconds}s" >&2
  return 1
}

ensure_postgres() {
  if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then return 0; fi
  echo "starting PostgreSQL"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  wait_for 30 "PostgreSQL on 127.0.0.1:5432" pg_isready -h 127.0.0.1 -p 5432 -q
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then return 0; fi
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  wait_for 30 "Redis on 127.0.0.1:6379" sh -c 'redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG'
}

ensure_pgbouncer() {
  if command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ]; then return 0; fi
  echo "installing pgbouncer"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
}

# `tc` (iproute2): chaos scenario 6b drops a path's packets with a BPF filter on loopback.
ensure_tc() {
  if command -v tc >/dev/null || [ -x /usr/sbin/tc ] || [ -x /sbin/tc ]; then return 0; fi
  echo "installing iproute2 (tc)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
}

# `promtool` (Debian's prometheus package): unit tests of deploy/prometheus/alerts.yml. Only the
# tool is wanted; the package's service is not started (policy-rc.d, or no init in containers).
ensure_promtool() {
  if command -v promtool >/dev/null; then return 0; fi
  echo "installing prometheus (for promtool)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

ensure_database() { # ensure_database NAME
  if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$1'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE \"$1\""
  fi
}
