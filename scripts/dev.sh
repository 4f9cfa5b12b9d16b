#!/usr/bin/env bash
# One command for local development: ensures PostgreSQL and Redis are up, creates the `worker`
# database, builds, migrates and runs the worker with config/worker.toml, whose chat runner is the
# demo agent (scripts/demo-agent; python3). Ctrl-C drains it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

ensure_postgres
ensure_redis
ensure_database worker
cargo build --bin worker
target/debug/worker migrate --config config/worker.toml
exec scripts/start.sh target/debug/worker run --config config/worker.toml "$@"
