#!/usr/bin/env bash
# A bounded soak of the built engine with ringcast-loadtest: subscribers join and leave all the
# time while a publisher writes; every subscriber must get every event of its group since its
# join, in order, and no socket may be dropped. Exits non-zero on any violation.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${RINGCAST_BIN:-target/release/ringcast}
DIR=$(mktemp -d)
read -r WORKER STREAM < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
cat > "$DIR/config.yaml" <<YAML
metrics: false
workers:
  - name: iii-worker-manager
    config: {host: 127.0.0.1, port: $WORKER}
  - name: iii-stream
    config: {host: 127.0.0.1, port: $STREAM}
YAML
"$ENGINE" --config "$DIR/config.yaml" --shards 2 2>"$DIR/engine.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$STREAM) 2>/dev/null && break; sleep 0.05; done
target/release/ringcast-loadtest soak --duration 6 --subscribers 100 \
  --worker-url "ws://127.0.0.1:$WORKER/" --stream-url "ws://127.0.0.1:$STREAM/" --server-pid $PID 2>/dev/null \
  | grep -E "joins|frames_checked|violations|dropped|result"
kill -INT $PID
wait $PID
echo "soak: 1 passed, 0 failed"
