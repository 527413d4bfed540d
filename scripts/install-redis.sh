#!/usr/bin/env bash
# Install the Debian package redis-server when it is missing (needs root and apt-get).
# The serve tests start their own redis-server on 127.0.0.1 from it; without it they skip with a
# reason (and fail in CI, where this script runs first).
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is not installed and this is not root with apt-get: run" >&2
    echo "  sudo apt-get install -y redis-server   (the Redis tests are skipped until then)" >&2
    exit 0
fi
echo "installing redis-server (Debian package)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# the package may start a system-wide instance on 6379; the tests never use it
