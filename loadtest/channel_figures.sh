#!/usr/bin/env bash
# Channel figures against a fresh ringcast on loopback, harness and engine sharing this machine:
# one channel's throughput (1 GiB in 64 KiB frames) next to a plain loopback TCP copy of the
# same bytes measured in the same run, then RPC latency (1 call in flight) alone and during
# back-to-back 1 GiB channel transfers.
# Usage: loadtest/channel_figures.sh [channel flags…], e.g. --bytes 268435456 --rpc-inflight 16
# Env: PORT (default: a free loopback port), DURATION of each RPC run in s (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ringcast -p ringcast-loadtest
ENGINE=target/release/ringcast
LT=target/release/ringcast-loadtest
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
DIR=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$DIR"' EXIT
cat > "$DIR/config.yaml" <<YAML
metrics: false
workers:
  - name: iii-worker-manager
    config: {host: 127.0.0.1, port: $PORT}
YAML
"$ENGINE" --config "$DIR/config.yaml" --shards 1 2>"$DIR/engine.log" &
PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
echo "machine: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB"
"$LT" --worker-url "ws://127.0.0.1:$PORT/" --duration "${DURATION:-5}" channel "$@"
kill -INT $PID; wait $PID || true; PID=
