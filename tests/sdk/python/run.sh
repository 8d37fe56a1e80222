#!/usr/bin/env bash
# Python SDK (PyPI iii-sdk 0.25.0) compatibility suite for the ringcast engine.
# Usage: bash tests/sdk/python/run.sh [extra pytest args]
# Env:   RINGCAST_BIN  engine binary (default: <repo>/target/release/ringcast);
#                      a relative value is taken relative to the caller's directory.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ -n "${RINGCAST_BIN:-}" ]; then
    RINGCAST_BIN="$(realpath -m -- "$RINGCAST_BIN")"
else
    RINGCAST_BIN="$(realpath -m -- "$here/../../../target/release/ringcast")"
fi
export RINGCAST_BIN

cd "$here"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt

if [ "$#" -eq 0 ]; then
    .venv/bin/python -m pytest -q
    # The stream scenarios again, on the redis adapter (test.sh installs redis-server).
    echo "== Python SDK stream scenarios on the redis adapter =="
    RINGCAST_STREAM_ADAPTER=redis exec .venv/bin/python -m pytest -q test_streams.py
fi
exec .venv/bin/python -m pytest -q "$@"
