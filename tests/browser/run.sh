#!/usr/bin/env bash
# Real-browser test of ringcast's RBAC worker listener: headless Chromium (Debian's `chromium`
# package) driven by playwright-core against the built engine. Installs what it needs: the
# chromium package when /usr/bin/chromium is missing (apt-get, non-interactive) and the npm
# packages (npm ci). Engine binary: $RINGCAST_BIN (default: <repo>/target/release/ringcast).
# Screenshots: <repo>/target/browser-artifacts/.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -n "${RINGCAST_BIN:-}" ]]; then
  RINGCAST_BIN="$(realpath -m -- "$RINGCAST_BIN")"
else
  RINGCAST_BIN="$(realpath -m -- "$HERE/../../target/release/ringcast")"
fi
export RINGCAST_BIN
if [[ ! -x "$RINGCAST_BIN" ]]; then
  echo "ringcast binary not found or not executable: $RINGCAST_BIN" >&2
  exit 1
fi

CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [[ ! -x "$CHROMIUM_PATH" ]]; then
  echo "installing Debian's chromium (for the browser test)"
  SUDO=""
  if [[ "$(id -u)" -ne 0 ]]; then SUDO="sudo -n"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
export CHROMIUM_PATH

cd "$HERE"
npm ci --no-audit --no-fund --loglevel=error >/dev/null

export OTEL_ENABLED=false
unset III_URL III_WORKER_NAME III_NAMESPACE || true

exec node --test --test-concurrency=1 --test-reporter=spec test/*.test.mjs
