#!/usr/bin/env bash
# Runs every performance figure quoted in README.md and tuning.md against a fresh ringcast on
# loopback, harness and engine sharing this machine.
# Usage: loadtest/figures.sh [shards [engine flags…]], e.g. loadtest/figures.sh 2 --spin-us 20000
# Prints one line per figure; every run is bounded (about 2 minutes in all).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ringcast -p ringcast-loadtest
ENGINE=target/release/ringcast
LT=target/release/ringcast-loadtest
SHARDS=${1:-1}
ENGINE_FLAGS=("${@:2}")
DIR=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT

start() { # $1 = extra iii-stream config lines
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
YAML
  $ENGINE --config "$DIR/config.yaml" --shards "$SHARDS" "${ENGINE_FLAGS[@]}" 2>"$DIR/engine.log" &
  PID=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/3112) 2>/dev/null && return; sleep 0.05; done
  echo "engine did not start"; cat "$DIR/engine.log"; exit 1
}
stop() { kill -INT $PID; wait $PID || true; }
field() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(' '.join(f'{k}={d[k]}' for k in sys.argv[1:] if k in d))" "$@"; }

echo "machine: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB; shards: $SHARDS; engine flags: ${ENGINE_FLAGS[*]:-none}"
echo -n "limit (bare writer, 1000 sockets, 64 frames/write): "
$LT limit --subscribers 1000 --payload 128 --duration 5 --json 2>/dev/null | field deliveries_per_s

start ""
echo -n "fanout max (1000 subs, 1 group, 128 B, 64 in flight): "
$LT fanout --subscribers 1000 --payload 128 --inflight 64 --duration 5 --server-pid $PID --json 2>/dev/null \
  | field deliveries_per_s loss delivery_latency_p99_us server_rss_end_mb server_cpu_cores
# Latency comes from kernel receive timestamps; at idle priority the harness only uses CPU time
# the engine leaves, as a separate client machine would.
echo -n "fanout 100 sets/s (100k deliveries/s): "
$LT fanout --idle-priority --subscribers 1000 --payload 128 --rate 100 --duration 5 --server-pid $PID --json 2>/dev/null \
  | field deliveries_per_s loss delivery_latency_p50_us delivery_latency_p90_us delivery_latency_p99_us
echo -n "stream::set over 64 groups, 1 subscriber (64 in flight): "
$LT fanout --subscribers 1 --groups 64 --payload 128 --inflight 64 --duration 5 --json 2>/dev/null | field sets_per_s set_ack_latency_p50_us loss
echo -n "rpc (64 in flight): "
$LT rpc --inflight 64 --duration 5 --server-pid $PID --json 2>/dev/null | field calls_per_s call_latency_p50_us call_latency_p99_us
echo -n "rpc (1 in flight): "
$LT rpc --inflight 1 --duration 3 --json 2>/dev/null | field calls_per_s call_latency_p50_us call_latency_p99_us
echo -n "connect 10000 idle subscribers: "
$LT connect --subscribers 10000 --groups 10 --server-pid $PID --json 2>/dev/null | field ready server_rss_per_connection_kb server_rss_after_close_mb connections_per_s
stop

for durability in batch none; do
  start "      adapter:
        name: kv
        config: {store_method: file_based, file_path: $DIR/store-$durability, durability: $durability}"
  echo -n "file_based $durability: stream::set, 64 writers in flight: "
  $LT fanout --subscribers 1 --groups 64 --payload 128 --inflight 64 --duration 5 --json 2>/dev/null | field sets_per_s set_ack_latency_p50_us set_ack_latency_p99_us loss
  stop
done
