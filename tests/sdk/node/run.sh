#!/usr/bin/env bash
# Node.js SDK (npm iii-sdk 0.22.1) compatibility tests for ringcast.
# Engine binary: $RINGCAST_BIN (default: <repo>/target/release/ringcast).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# A relative RINGCAST_BIN is taken relative to the directory run.sh was started from.
if [[ -n "${RINGCAST_BIN:-}" ]]; then
  RINGCAST_BIN="$(realpath -m -- "$RINGCAST_BIN")"
else
  RINGCAST_BIN="$(realpath -m -- "$HERE/../../../target/release/ringcast")"
fi
export RINGCAST_BIN
if [[ ! -x "$RINGCAST_BIN" ]]; then
  echo "ringcast binary not found or not executable: $RINGCAST_BIN" >&2
  exit 1
fi
cd "$HERE"

npm ci --no-audit --no-fund --loglevel=error >/dev/null

# Keep SDK workers quiet and independent of the caller's environment.
export OTEL_ENABLED=false
unset III_URL III_WORKER_NAME III_NAMESPACE || true

exec node --test --test-concurrency=1 --test-reporter=spec test/*.test.mjs
