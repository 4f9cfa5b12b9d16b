#!/usr/bin/env bash
# Container entrypoint: scripts/start.sh [BIN] [ARGS...]   (BIN defaults to `worker`)
# Raises the open-file limit, then execs ./BIN or target/release/BIN (or BIN itself when it is a
# path) in its place: signals reach the worker itself, and its exit status is the container's.
set -uo pipefail

bin="${1:-worker}"
[ $# -gt 0 ] && shift
[ $# -eq 0 ] && [ "$bin" = worker ] && set -- run

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [[ "$bin" == */* ]]; then
  exe="$bin"
elif [ -x "./$bin" ]; then
  exe="./$bin"
elif [ -x "target/release/$bin" ]; then
  exe="target/release/$bin"
else
  echo "start.sh: no executable ./$bin or target/release/$bin" >&2
  exit 127
fi

# exec: nothing stays behind holding the environment (DATABASE_URL, REDIS_URL, WORKER__*), which
# a process of the same user (an agent) could read from /proc/<pid>/environ. In a container the
# worker is then PID 1 and keeps a minimal init of its own that reaps orphans and forwards
# SIGTERM/SIGINT (src/init.rs); the worker drains on the first signal.
exec "$exe" "$@"
