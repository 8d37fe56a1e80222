#!/usr/bin/env bash
# Worker-to-worker RPC throughput with 1 KiB and 64 KiB payloads, for one or more engine
# binaries in the same run (e.g. before and after a change), harness and engine on this machine.
# Usage: loadtest/rpc_payloads.sh ENGINE [ENGINE…]   (LT=path of ringcast-loadtest; default the
# release build). Each run is bounded: 5 s per payload size and engine.
set -euo pipefail
cd "$(dirname "$0")/.."
LT=${LT:-target/release/ringcast-loadtest}
DIR=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$DIR"' EXIT
field() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(' '.join(f'{k}={d[k]}' for k in sys.argv[1:] if k in d))" "$@"; }
echo "machine: $(nproc) CPUs"
for engine in "$@"; do
  cat > "$DIR/config.yaml" <<YAML
metrics: false
workers:
  - name: iii-worker-manager
    config: {host: 127.0.0.1, port: 49134}
YAML
  "$engine" --config "$DIR/config.yaml" --shards 1 2>"$DIR/engine.log" &
  PID=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/49134) 2>/dev/null && break; sleep 0.05; done
  for payload in 1024 65536; do
    echo -n "$engine: rpc, $payload B payload, 64 in flight: "
    "$LT" rpc --inflight 64 --payload "$payload" --duration 5 --json 2>/dev/null | field calls_per_s call_latency_p50_us call_latency_p99_us
  done
  kill -INT $PID; wait $PID || true; PID=
done
