#!/usr/bin/env bash
# Bounded soaks of the built engine with ringcast-loadtest.
#  1. subscribers join and leave all the time while a publisher writes; every subscriber must get
#     every event of its group since its join, in order, and no socket may be dropped.
#  2. the same with chaos, against a freshly started engine: subscribers that vanish with FIN or
#     RST, subscribers that stall, workers killed mid-call; then the engine's open fds must come
#     back to their baseline, its RSS stay within a bound, and every call to a killed worker must
#     be answered with an error.
# Exits non-zero on any violation.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${RINGCAST_BIN:-target/release/ringcast}
LOADTEST=${RINGCAST_LOADTEST_BIN:-target/release/ringcast-loadtest}

# The chaos soak's engine: stalled subscribers (held 2 s, then drained for up to 2 s) are closed by
# its ping timeout or stall timer meanwhile, so the soak can insist that every one was closed.
CHAOS_ENGINE_CONFIG=""
CHAOS_STREAM_CONFIG="      slow_subscriber_timeout_ms: 1000
      ping_interval_ms: 400
      ping_timeout_ms: 800"
CHAOS_WORKER_CONFIG=""
CHAOS_FLAGS="--stall-must-close --stall-hold 2"

DIR=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$DIR"' EXIT

# lines TEXT: prints TEXT as lines of the config, if any
lines() { if [ -n "$1" ]; then printf '%s\n' "$1"; fi; }

# start_engine NAME STREAM_EXTRA WORKER_EXTRA TOP_EXTRA: writes a config on two free loopback
# ports, starts the engine, waits (bounded) for the stream port; sets PID, WORKER, STREAM.
start_engine() {
  read -r WORKER STREAM < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
  {
    echo "metrics: false"
    lines "$4"
    echo "workers:"
    echo "  - name: iii-worker-manager"
    echo "    config:"
    echo "      host: 127.0.0.1"
    echo "      port: $WORKER"
    lines "$3"
    echo "  - name: iii-stream"
    echo "    config:"
    echo "      host: 127.0.0.1"
    echo "      port: $STREAM"
    lines "$2"
  } > "$DIR/$1.yaml"
  "$ENGINE" --config "$DIR/$1.yaml" --shards 2 2>"$DIR/$1.log" &
  PID=$!
  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$STREAM) 2>/dev/null && return 0; sleep 0.05; done
  echo "engine did not open its stream port; its log:"; cat "$DIR/$1.log"; return 1
}

# stop_engine: SIGINT, then a bounded wait; an engine that does not exit cleanly is a failure.
stop_engine() {
  kill -INT $PID
  for _ in $(seq 100); do kill -0 $PID 2>/dev/null || break; sleep 0.1; done
  local rc=0
  if kill -0 $PID 2>/dev/null; then
    echo "engine did not stop within 10 s of SIGINT"; kill -KILL $PID; rc=1
  fi
  wait $PID || rc=$?
  PID=
  if [ $rc -ne 0 ]; then echo "engine exit status $rc"; failed=$((failed+1)); fi
}

passed=0 failed=0

start_engine soak "" "" ""
if "$LOADTEST" soak --duration 6 --subscribers 100 \
  --worker-url "ws://127.0.0.1:$WORKER/" --stream-url "ws://127.0.0.1:$STREAM/" --server-pid $PID \
  2>/dev/null >"$DIR/soak.out"; then passed=$((passed+1)); else failed=$((failed+1)); fi
grep -E "joins|frames_checked|violations|dropped|result" "$DIR/soak.out" || cat "$DIR/soak.out"
stop_engine

echo "-- chaos soak"
start_engine chaos "$CHAOS_STREAM_CONFIG" "$CHAOS_WORKER_CONFIG" "$CHAOS_ENGINE_CONFIG"
# shellcheck disable=SC2086 # CHAOS_FLAGS is a list of flags
if "$LOADTEST" soak --duration 8 --subscribers 60 --chaos $CHAOS_FLAGS \
  --worker-url "ws://127.0.0.1:$WORKER/" --stream-url "ws://127.0.0.1:$STREAM/" --engine-pid $PID \
  2>/dev/null >"$DIR/chaos.out"; then passed=$((passed+1)); else failed=$((failed+1)); fi
grep -E "frames_checked|violations|dropped|chaos_|engine_|failed_checks|^      |result" "$DIR/chaos.out" \
  || cat "$DIR/chaos.out"
stop_engine

echo "soak: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
