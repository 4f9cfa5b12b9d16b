#!/usr/bin/env bash
# Every check CI runs: formatting, clippy, and all tests against real PostgreSQL, Redis and a
# private pgbouncer (installed here when missing). Safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

ensure_postgres
ensure_redis
ensure_pgbouncer

# Databases left behind by interrupted runs (in use ones are skipped: no FORCE).
for db in $(psql -h 127.0.0.1 -U postgres -d postgres -tAc \
    "SELECT datname FROM pg_database WHERE datname LIKE 'worker_test_%' OR datname LIKE 'worker_tpl_%'"); do
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\"" 2>/dev/null || true
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked "$@"
