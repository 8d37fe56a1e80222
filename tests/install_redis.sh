#!/usr/bin/env bash
# Installs redis-server for tests/redis.rs (the redis adapter's multi-node tests) when it is
# missing. Those tests skip, saying so, only if it still cannot be found afterwards.
set -uo pipefail
if command -v redis-server >/dev/null 2>&1 || [ -x /usr/sbin/redis-server ] || [ -x /usr/bin/redis-server ]; then
    exit 0
fi
echo "redis: installing redis-server"
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
elif command -v dnf >/dev/null 2>&1; then
    $SUDO dnf install -y redis
elif command -v apk >/dev/null 2>&1; then
    $SUDO apk add --no-cache redis
elif command -v brew >/dev/null 2>&1; then
    brew install redis
fi
# The Debian package starts a system service on 6379; the tests start their own servers.
command -v redis-server >/dev/null 2>&1 || echo "redis: redis-server could not be installed; tests/redis.rs will be skipped"
exit 0
