#!/usr/bin/env bash
# Stop a redis-server started by scripts/start-redis.sh PORT.
set -euo pipefail
pidfile="${TMPDIR:-/tmp}/kvsqueeze-redis-$1.pid"
if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
fi
