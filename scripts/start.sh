#!/usr/bin/env bash
# Container entrypoint: scripts/start.sh [BIN] [ARGS...]   (BIN defaults to `worker`)
# Raises the open-file limit, runs ./BIN or target/release/BIN (or BIN itself when it is a path),
# forwards SIGTERM/SIGINT to it and WAITS until it has drained, then exits with its status.
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

"$exe" "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
trap 'kill -INT "$child" 2>/dev/null' INT

# `wait` returns early whenever a trapped signal arrives: keep waiting until the child is gone,
# then collect its real exit status.
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
done
wait "$child"
exit $?
