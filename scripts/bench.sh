#!/usr/bin/env bash
# Runs the benchmarks (targets in BENCHMARKS.md#targets) against the local PostgreSQL and Redis and
# prints markdown tables, each with its baselines measured in the same run, after a description of
# the machine. Record the output in BENCHMARKS.md.
#
#   scripts/bench.sh                     every benchmark
#   scripts/bench.sh outbox              one of them (outbox, chats, admission, …)
#   scripts/bench.sh outbox -- --rows 50000 --samples 200   arguments for the benchmark
#
# A copy of the output is kept in target/bench/<bench>-<timestamp>.md. Each benchmark creates
# and drops a database of its own (worker_bench_*); leftovers of interrupted runs are dropped here.
# Adding a benchmark: a `[[bench]] harness = false` target in benches/ (shared helpers in
# benches/common/), and its name in BENCHES below.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh

BENCHES=(outbox chats gitsync prebuilds agent_memory admission idle)

selected=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do selected+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#selected[@]} -eq 0 ] && selected=("${BENCHES[@]}")
for bench in "${selected[@]}"; do
  if [[ ! " ${BENCHES[*]} " =~ " ${bench} " ]]; then
    echo "error: unknown benchmark '$bench'; known: ${BENCHES[*]}" >&2
    exit 2
  fi
done

ensure_postgres
ensure_redis
# The outbox benchmark's Redis Cluster row (exports WORKER_TEST_REDIS_CLUSTER_URL).
if [[ " ${selected[*]} " =~ " outbox " ]]; then
  ensure_redis_cluster
fi
for db in $(psql -h 127.0.0.1 -U postgres -d postgres -tAc \
    "SELECT datname FROM pg_database WHERE datname LIKE 'worker_bench_%'"); do
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" || true
done

machine() {
  echo "## Machine"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- CPU: $(nproc) × $(uname -m) $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), memory $(free -g | awk '/^Mem:/ {print $2}') GiB, kernel $(uname -r)"
  echo "- $(psql -h 127.0.0.1 -U postgres -d postgres -tAc 'SELECT version()' | cut -d, -f1)," \
       "fsync=$(psql -h 127.0.0.1 -U postgres -d postgres -tAc 'SHOW fsync')," \
       "synchronous_commit=$(psql -h 127.0.0.1 -U postgres -d postgres -tAc 'SHOW synchronous_commit')," \
       "shared_buffers=$(psql -h 127.0.0.1 -U postgres -d postgres -tAc 'SHOW shared_buffers')"
  echo "- Redis $(redis-cli -h 127.0.0.1 info server | sed -n 's/^redis_version:\(.*\)\r$/\1/p')," \
       "PostgreSQL, Redis and the benchmark share the same cores"
  echo "- $(rustc --version), cargo bench profile (release)"
}

mkdir -p target/bench
echo "== building benchmarks"
cargo bench --locked --no-run "${selected[@]/#/--bench=}" >/dev/null
for bench in "${selected[@]}"; do
  out="target/bench/${bench}-$(date -u +%Y%m%dT%H%M%SZ).md"
  {
    echo "# Benchmark: $bench"
    echo
    machine
    cargo bench --locked --bench "$bench" -q -- "$@"
  } | tee "$out"
  echo
  echo "(saved to $out)"
done
