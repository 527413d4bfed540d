#!/usr/bin/env bash
# Start a throwaway redis-server on 127.0.0.1 (nothing saved to disk) and print its URL.
#   scripts/start-redis.sh [PORT]      -> redis://127.0.0.1:PORT/0   (stop: scripts/stop-redis.sh PORT)
set -euo pipefail
port="${1:-}"
if [ -z "$port" ]; then
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
binary="$(command -v redis-server || echo /usr/bin/redis-server)"
if [ ! -x "$binary" ]; then
    echo "redis-server is not installed: run scripts/install-redis.sh (as root)" >&2
    exit 1
fi
pidfile="${TMPDIR:-/tmp}/kvsqueeze-redis-$port.pid"
"$binary" --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$pidfile" --logfile "${TMPDIR:-/tmp}/kvsqueeze-redis-$port.log"
for _ in $(seq 1 100); do
    if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
        echo "redis://127.0.0.1:$port/0"
        exit 0
    fi
    sleep 0.1
done
echo "redis-server did not answer on 127.0.0.1:$port" >&2
exit 1
