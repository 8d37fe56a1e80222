#!/usr/bin/env bash
# Built-in queue figures: enqueue → invoke throughput and latency, in memory and with the file
# store under `durability: batch`, harness and engine on this machine (one shard).
# Usage: loadtest/queue.sh   (ENGINE / LT: binaries to use; default the release builds, built
# here). Each run is bounded: about 40 s in all.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${ENGINE:-}" ] || [ -z "${LT:-}" ]; then
  cargo build --release -q -p ringcast -p ringcast-loadtest
fi
ENGINE=${ENGINE:-target/release/ringcast}
LT=${LT:-target/release/ringcast-loadtest}
DIR=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$DIR"' EXIT
field() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(' '.join(f'{k}={d[k]}' for k in sys.argv[1:] if k in d))" "$@"; }

start() { # $1 = iii-stream adapter lines
  cat > "$DIR/config.yaml" <<YAML
metrics: false
workers:
  - name: iii-worker-manager
    config: {host: 127.0.0.1, port: 49134}
  - name: iii-stream
    config:
      host: 127.0.0.1
      port: 3112
$1
  - name: iii-queue
    config:
      queue_configs:
        ordered: {concurrency: 1}
        wide: {concurrency: 64}
YAML
  "$ENGINE" --config "$DIR/config.yaml" --shards 1 2>"$DIR/engine.log" &
  PID=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/49134) 2>/dev/null && return; sleep 0.05; done
  echo "engine did not start"; cat "$DIR/engine.log"; exit 1
}
stop() { kill -INT $PID; wait $PID || true; PID=; }

echo "machine: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB"
# A fresh engine for every run: what one run leaves queued must not reach the next one's consumer.
for store in memory batch; do
  for run in "wide 0" "ordered 0" "wide 1000"; do
    set -- $run
    case $store in
      memory) start "" ;;
      batch) rm -rf "$DIR/store"; start "      adapter:
        name: kv
        config: {store_method: file_based, file_path: $DIR/store, durability: batch}" ;;
    esac
    if [ "$2" = 0 ]; then what="64 enqueues in flight"; else what="$2 enqueues/s"; fi
    echo -n "$store, queue $1 (concurrency $([ "$1" = wide ] && echo 64 || echo 1)), $what: "
    "$LT" queue --queue "$1" --rate "$2" --inflight 64 --duration 5 --server-pid $PID --json 2>/dev/null \
      | field enqueues_per_s deliveries_per_s enqueue_receipt_latency_p50_us enqueue_invoke_latency_p50_us enqueue_invoke_latency_p99_us
    stop
  done
done
