#!/usr/bin/env bash
# Every check CI runs: formatting, clippy, the alert rules' unit tests (promtool), and all tests
# against real PostgreSQL, Redis, a local Redis Cluster (3 masters + 3 replicas on
# 127.0.0.1:7101-7106, REDIS_CLUSTER_PORT moves it) and a private pgbouncer (pgbouncer and
# promtool are installed here when missing). Safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

ensure_postgres
ensure_redis
ensure_pgbouncer
ensure_promtool
ensure_redis_cluster # exports WORKER_TEST_REDIS_CLUSTER_URL for tests/redis_cluster.rs

# Databases left behind by interrupted runs (in use ones are skipped: no FORCE).
for db in $(psql -h 127.0.0.1 -U postgres -d postgres -tAc \
    "SELECT datname FROM pg_database WHERE datname LIKE 'worker_test_%' OR datname LIKE 'worker_tpl_%'"); do
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\"" 2>/dev/null || true
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
# The library and binary as shipped: without the dev-dependency's `test-support` feature.
cargo clippy --locked -- -D warnings
echo "== promtool: alert rules and their unit tests"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
echo "== cargo test"
log=$(mktemp)
cluster_figures=$(mktemp)
trap 'rm -f "$log" "$cluster_figures"' EXIT
export WORKER_REDIS_CLUSTER_FIGURES=$cluster_figures
set +e
cargo test --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The reliability suite runs after the rest, alone (it restarts PostgreSQL); not when the
# arguments select particular tests.
if [ "$#" -eq 0 ]; then
  set +e
  bash scripts/chaos.sh 2>&1 | tee -a "$log"
  chaos_status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -eq 0 ]; then status=$chaos_status; fi
fi
# One closing line for the whole run (cargo's own last line is the doc-test binary's).
passed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
failed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
echo
if [ -s "$cluster_figures" ]; then
  echo "== redis cluster figures (tests/redis_cluster.rs)"
  cat "$cluster_figures"
fi
echo "total: ${passed} passed, ${failed} failed"
exit "$status"
