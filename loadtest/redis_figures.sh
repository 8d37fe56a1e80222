#!/usr/bin/env bash
# The redis adapter end to end: one redis-server and two ringcast nodes on loopback, the
# harness writing through node A and subscribing on node B, so every delivery crosses Redis.
# Usage: loadtest/redis_figures.sh [profile]   (release by default; `debug` for a quick check)
# Prints one line per figure; the soak fails the script on any gap, duplicate or reorder.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-release}
if [ "$PROFILE" = release ]; then cargo build --release -q -p ringcast -p ringcast-loadtest; else cargo build -q -p ringcast -p ringcast-loadtest; fi
ENGINE=target/$PROFILE/ringcast
LT=target/$PROFILE/ringcast-loadtest
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { echo "redis-server and redis-cli are not installed (tests/install_redis.sh)"; exit 1; }
DIR=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$DIR"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >/dev/null 2>&1 &
PIDS+=($!)
REDIS_PID=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$RPORT) 2>/dev/null && break; sleep 0.05; done

node() { # node <name> <worker port> <stream port>
  cat > "$DIR/$1.yaml" <<YAML
metrics: false
workers:
  - name: iii-worker-manager
    config: {host: 127.0.0.1, port: $2}
  - name: iii-stream
    config:
      host: 127.0.0.1
      port: $3
      adapter:
        name: redis
        config:
          redis_url: redis://127.0.0.1:$RPORT
YAML
  $ENGINE --config "$DIR/$1.yaml" --shards 1 2>"$DIR/$1.log" &
  PIDS+=($!)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$3) 2>/dev/null && return; sleep 0.05; done
  echo "node $1 did not start"; cat "$DIR/$1.log"; exit 1
}
AW=$(free_port) AS=$(free_port) BW=$(free_port) BS=$(free_port)
node a "$AW" "$AS"
node b "$BW" "$BS"
A=ws://127.0.0.1:$AW/ B=ws://127.0.0.1:$BS/ AL=ws://127.0.0.1:$AS/
field() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(' '.join(f'{k}={d[k]}' for k in sys.argv[1:] if k in d))" "$@"; }

echo "machine: $(nproc) CPUs; redis $(redis-server --version | awk '{print $3}'); two nodes, one shard each; $PROFILE build"
# Sets are acknowledged once Redis has them, so a writer is not slowed by a node that cannot
# deliver as fast as Redis publishes: that node is cut off by Redis (client-output-buffer-limit)
# and resyncs its subscribers. The rows therefore use fixed rates the receiving node keeps up with.
for rate in 100 1000; do
  echo -n "fanout across nodes at $rate sets/s (set on A, 1000 subscribers on B, 1 group, 128 B): "
  $LT fanout --worker-url $A --stream-url $B --subscribers 1000 --payload 128 --rate $rate --duration 5 --json 2>/dev/null \
    | field deliveries_per_s loss delivery_latency_p50_us delivery_latency_p99_us
done
# Same-node against cross-node in one run: the publisher on A, half the subscribers on A (node0)
# and half on B (node1), so both see the same events at the same moment; Redis' own CPU time per
# set is what cross-node fanout costs Redis (one publish per event, whatever the node count).
# Redis' own account of the scripts (each stores, counts and publishes one event): its
# commandstats, reset before each run, give calls and microseconds per call.
script_cost() {
  redis-cli -p "$RPORT" INFO commandstats | tr -d '\r' | python3 -c "import sys
calls = usec = 0
for line in sys.stdin:
    if line.startswith(('cmdstat_evalsha:', 'cmdstat_eval:')):
        f = dict(kv.split('=') for kv in line.split(':', 1)[1].split(','))
        calls += int(f['calls']); usec += float(f['usec'])
print(f'redis_script_calls={calls} redis_script_us_per_call={usec / max(calls, 1):.1f}')"
}
for rate in 100 200; do
  echo -n "same node (A) against cross node (B) at $rate sets/s, 1000 subscribers split over A and B: "
  redis-cli -p "$RPORT" CONFIG RESETSTAT >/dev/null
  $LT fanout --worker-url $A --stream-url "$AL,$B" --subscribers 1000 --payload 128 --rate $rate --duration 5 \
      --server-pid "$REDIS_PID" --json 2>/dev/null \
    | python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); g=lambda k: d.get(k, 'n/a'); \
print(f\"deliveries_per_s={g('deliveries_per_s')} loss={g('loss')} local_p50_us={g('node0_delivery_latency_p50_us')} local_p99_us={g('node0_delivery_latency_p99_us')} \
remote_p50_us={g('node1_delivery_latency_p50_us')} remote_p99_us={g('node1_delivery_latency_p99_us')} \
sets_acked={d.get('sets_acked')} redis_cpu_us_per_set={d['server_cpu_s'] * 1e6 / max(d['sets_acked'], 1):.1f}\" if 'server_cpu_s' in d else 'redis CPU not measured', end=' ')"
  script_cost
done
echo -n "stream::set through A over 64 groups, 1 subscriber on B (64 in flight): "
$LT fanout --worker-url $A --stream-url $B --subscribers 1 --groups 64 --payload 128 --inflight 64 --duration 5 --json 2>/dev/null \
  | field sets_per_s set_ack_latency_p50_us loss
echo -n "soak across nodes (churning subscribers on B, sets on A, every frame checked): "
$LT soak --worker-url $A --stream-url $B --subscribers 200 --groups 8 --rate 2000 --duration 6 --json 2>/dev/null | tee "$DIR/soak.json" \
  | field frames_checked violations
python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); sys.exit(1 if d.get('violations',1) else 0)" "$DIR/soak.json" \
  || { echo "soak found violations"; exit 1; }
