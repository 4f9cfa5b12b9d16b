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

# PostgreSQL on 127.0.0.1:5432 with trust auth for `postgres` (what the tests and dev.sh use).
# Missing entirely (Debian or Ubuntu): installs the `postgresql` package and creates a cluster if
# the package did not; only a cluster this script created gets trust auth on 127.0.0.1 and ::1 (an
# existing cluster's pg_hba.conf is never changed). Says what it did.
ensure_postgres() {
  if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then return 0; fi
  local created=""
  if ! command -v pg_ctlcluster >/dev/null; then
    echo "installing PostgreSQL (apt-get install postgresql)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    created=yes # the package creates its first cluster with peer/scram auth
  fi
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
  if [ -z "$version" ] || [ ! -f "/etc/postgresql/$version/main/postgresql.conf" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    echo "creating PostgreSQL cluster $version/main"
    as_root pg_createcluster "$version" main >/dev/null
    created=yes
  fi
  if [ -n "$created" ]; then
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    echo "allowing trust auth from 127.0.0.1 and ::1 in $hba (a development and test cluster)"
    as_root sh -c "{ printf '# added by worker scripts/lib/services.sh: local development and tests\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n'; cat '$hba'; } > '$hba.new' && mv '$hba.new' '$hba' && chown postgres:postgres '$hba'"
  fi
  echo "starting PostgreSQL $version/main"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_for 30 "PostgreSQL on 127.0.0.1:5432" pg_isready -h 127.0.0.1 -p 5432 -q
}

# Redis on 127.0.0.1:6379, nothing kept on disk; installs `redis-server` when it is missing.
ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then return 0; fi
  if ! command -v redis-server >/dev/null; then
    echo "installing Redis (apt-get install redis-server)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
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

# A local Redis Cluster of 3 masters + 3 replicas for tests/redis_cluster.rs, on ports
# REDIS_CLUSTER_PORT .. +5 (default 7101..7106; cluster bus on port + 10000), data under
# $REDIS_CLUSTER_DIR (no persistence: each node keeps only its nodes.conf, a log and a pid file).
# Idempotent: a healthy cluster is reused (the failover tests leave it healthy, roles maybe
# swapped); a broken one is torn down and created again. Waits for cluster_state:ok on every node
# and one connected replica per master. A short cluster-node-timeout (2 s, default 15 s) lets the
# kill -9 test fail over in seconds. Prints the URL to use on stdout's last line.
REDIS_CLUSTER_PORT=${REDIS_CLUSTER_PORT:-7101}
REDIS_CLUSTER_DIR=${REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}/worker-redis-cluster-${REDIS_CLUSTER_PORT}}

redis_cluster_ports() { seq "$REDIS_CLUSTER_PORT" $((REDIS_CLUSTER_PORT + 5)); }

# Healthy: every node answers, sees the cluster ok with 6 nodes and 3 masters, and every master
# has a connected replica (CLUSTER NODES: 3 connected masters with slots, 3 connected replicas,
# no node flagged fail).
redis_cluster_healthy() {
  local port info nodes
  for port in $(redis_cluster_ports); do
    info=$(redis-cli -p "$port" cluster info 2>/dev/null) || return 1
    grep -q '^cluster_state:ok' <<<"$info" || return 1
    grep -q '^cluster_known_nodes:6' <<<"$info" || return 1
    grep -q '^cluster_size:3' <<<"$info" || return 1
  done
  nodes=$(redis-cli -p "$REDIS_CLUSTER_PORT" cluster nodes 2>/dev/null) || return 1
  if grep -Eq 'fail|handshake|noaddr|disconnected' <<<"$nodes"; then return 1; fi
  [ "$(grep -Ec '(^| |,)slave( |,)' <<<"$nodes")" -eq 3 ] || return 1
  # Each replica finished its sync with its master.
  for port in $(redis_cluster_ports); do
    info=$(redis-cli -p "$port" info replication 2>/dev/null) || return 1
    if grep -q '^role:slave' <<<"$info"; then
      grep -q '^master_link_status:up' <<<"$info" || return 1
      grep -q '^master_sync_in_progress:0' <<<"$info" || return 1
    fi
  done
}

# Stops the nodes this script started (by their pid files: never another server on the ports).
stop_redis_cluster() {
  local port pid
  for port in $(redis_cluster_ports); do
    pid=$(cat "$REDIS_CLUSTER_DIR/$port/redis.pid" 2>/dev/null) || continue
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = redis-server ]; then
      kill -9 "$pid" 2>/dev/null || true
      wait_for 10 "redis-server $pid to exit" sh -c "! kill -0 $pid"
    fi
  done
  rm -rf "$REDIS_CLUSTER_DIR"
}

start_redis_cluster_node() { # start_redis_cluster_node PORT (nodes.conf kept: it rejoins)
  local port=$1 dir="$REDIS_CLUSTER_DIR/$1"
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --dir "$dir" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --appendonly no --save '' --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null
  wait_for 10 "Redis cluster node on 127.0.0.1:$port" sh -c "redis-cli -p $port ping | grep -q PONG"
}

ensure_redis_cluster() {
  export WORKER_TEST_REDIS_CLUSTER_URL="redis-cluster://127.0.0.1:${REDIS_CLUSTER_PORT}"
  if redis_cluster_healthy; then return 0; fi
  echo "starting a Redis Cluster (3 masters + 3 replicas) on 127.0.0.1:${REDIS_CLUSTER_PORT}-$((REDIS_CLUSTER_PORT + 5))"
  stop_redis_cluster
  local port hosts=()
  for port in $(redis_cluster_ports); do
    if ss -ltn 2>/dev/null | grep -Eq "[:.]($port|$((port + 10000)))\b"; then
      echo "error: port $port or $((port + 10000)) is taken; set REDIS_CLUSTER_PORT to a free range" >&2
      return 1
    fi
    start_redis_cluster_node "$port"
    hosts+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${hosts[@]}" --cluster-replicas 1 --cluster-yes >"$REDIS_CLUSTER_DIR/create.log" 2>&1 || {
    cat "$REDIS_CLUSTER_DIR/create.log" >&2
    return 1
  }
  wait_for 60 "the Redis Cluster on 127.0.0.1:${REDIS_CLUSTER_PORT} (cluster_state:ok, 3 masters with a replica each)" \
    redis_cluster_healthy
}
