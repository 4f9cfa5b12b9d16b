#!/usr/bin/env bash
# The reliability suite (requirements in docs/reliability.md): real worker processes against real
# PostgreSQL, Redis and pgbouncer under SIGKILL, SIGTERM, a PostgreSQL restart, a stopped Redis, a
# frozen network path and bad input. One scenario at a time: a PostgreSQL restart would break tests
# running beside it. Prints one line of figures per scenario at the end. Extra arguments go to the
# test harness (e.g. `scripts/chaos.sh scenario_5`). Safe on a fresh machine; `scripts/test.sh` runs
# it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

ensure_postgres
ensure_redis
ensure_pgbouncer
ensure_tc

figures=$(mktemp)
log=$(mktemp)
trap 'rm -f "$figures" "$log"' EXIT
export WORKER_CHAOS_FIGURES=$figures

echo "== chaos (reliability suite)"
set +e
cargo test --locked \
  --test chaos_outbox --test chaos_pgbouncer --test chaos_chats --test chaos_network --test chaos_input --test chaos_boundary \
  -- --test-threads=1 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The restart scenario leaves PostgreSQL up, but make sure of it for whatever runs next.
ensure_postgres

passed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
failed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
echo
echo "== chaos figures (one line per scenario)"
sort "$figures"
echo "chaos: ${passed} passed, ${failed} failed"
exit "$status"
