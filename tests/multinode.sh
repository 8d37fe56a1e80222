#!/usr/bin/env bash
# Two ringcast nodes and one Redis, each in a network namespace of its own, joined by veth pairs
# (Redis <-> node A, Redis <-> node B, and this host <-> each node for the test clients), with
# netem latency on the Redis links. Runs the ignored test `multinode_across_network_namespaces`
# of tests/redis.rs against them: fan-out from A to B in order, joins on B while A writes, and A
# cut off from Redis (link down) and healed. Skips, saying why, without root or iproute2.
#   RINGCAST_BIN (default target/release/ringcast), NETEM_DELAY (default 1ms), PROFILE (release)
set -euo pipefail
cd "$(dirname "$0")/.."

skip() { echo "multinode: SKIPPED: $1"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root for network namespaces"
if ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "multinode: installing iproute2"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null || true
fi
command -v ip >/dev/null 2>&1 || skip "iproute2 (ip) is not installed and could not be installed"
REDIS="$(command -v redis-server || true)"
[ -n "$REDIS" ] || skip "redis-server is not installed (tests/install_redis.sh)"
PROFILE="${PROFILE:-release}"
BIN="${RINGCAST_BIN:-$PWD/target/$PROFILE/ringcast}"
[ -x "$BIN" ] || { echo "multinode: $BIN is not built"; exit 1; }
DELAY="${NETEM_DELAY:-1ms}"

P="rc$$"                       # names of this run (interface names stay under 15 bytes)
NR="${P}r" NA="${P}a" NB="${P}b"
NET=10.231                     # 10.231.1.0/24 Redis-A, .2 Redis-B, .3 host-A, .4 host-B
WORK="$(mktemp -d)"
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$NR" "$NA" "$NB"; do ip netns del "$ns" 2>/dev/null || true; done
    ip link del "${P}ha" 2>/dev/null || true
    ip link del "${P}hb" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NR" || skip "cannot create network namespaces here"
ip netns add "$NA"
ip netns add "$NB"
for ns in "$NR" "$NA" "$NB"; do ip -n "$ns" link set lo up; done

# veth <name in ns1> <ns1 or ""> <addr1> <name in ns2> <ns2> <addr2>
veth() {
    ip link add "$1" type veth peer name "$4"
    if [ -n "$2" ]; then ip link set "$1" netns "$2"; fi
    ip link set "$4" netns "$5"
    if [ -n "$2" ]; then
        ip -n "$2" addr add "$3/24" dev "$1"; ip -n "$2" link set "$1" up
    else
        ip addr add "$3/24" dev "$1"; ip link set "$1" up
    fi
    ip -n "$5" addr add "$6/24" dev "$4"; ip -n "$5" link set "$4" up
}
veth "${P}ra" "$NR" "$NET.1.1" "${P}ar" "$NA" "$NET.1.2"
veth "${P}rb" "$NR" "$NET.2.1" "${P}br" "$NB" "$NET.2.2"
veth "${P}ha" "" "$NET.3.1" "${P}ah" "$NA" "$NET.3.2"
veth "${P}hb" "" "$NET.4.1" "${P}bh" "$NB" "$NET.4.2"
if ip netns exec "$NR" tc qdisc add dev "${P}ra" root netem delay "$DELAY" 2>/dev/null &&
    ip netns exec "$NR" tc qdisc add dev "${P}rb" root netem delay "$DELAY" 2>/dev/null; then
    LATENCY="netem delay $DELAY on the Redis links"
else
    LATENCY="no added latency (tc netem is not available in this kernel)"
    echo "multinode: $LATENCY"
fi

ip netns exec "$NR" "$REDIS" --port 6379 --bind "$NET.1.1" "$NET.2.1" --protected-mode no \
    --save "" --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)

node() { # node <ns> <own address> <redis address>
    cat >"$WORK/$1.yaml" <<YAML
metrics: false
workers:
  - name: iii-worker-manager
    config: {host: $2, port: 49134}
  - name: iii-stream
    config:
      host: $2
      port: 3112
      adapter:
        name: redis
        config:
          redis_url: \${REDIS_URL:redis://$3:6379}
YAML
    # The first start may race Redis' own: a failed start (exit 2) is retried a few times.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        ip netns exec "$1" "$BIN" --config "$WORK/$1.yaml" --shards 2 >>"$WORK/$1.log" 2>&1 &
        local pid=$!
        sleep 0.5
        if kill -0 "$pid" 2>/dev/null; then PIDS+=("$pid"); return 0; fi
    done
    echo "multinode: node in $1 did not start:"; cat "$WORK/$1.log"; exit 1
}
node "$NA" "$NET.3.2" "$NET.1.1"
node "$NB" "$NET.4.2" "$NET.2.1"
for addr in "$NET.3.2" "$NET.4.2"; do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/$addr/49134") 2>/dev/null && break; sleep 0.1; done
done

export RC_MN_A_WORKER="ws://$NET.3.2:49134/" RC_MN_A_STREAM="$NET.3.2:3112"
export RC_MN_B_WORKER="ws://$NET.4.2:49134/" RC_MN_B_STREAM="$NET.4.2:3112"
export RC_MN_CUT_A="ip -n $NA link set ${P}ar down"
export RC_MN_HEAL_A="ip -n $NA link set ${P}ar up && ip -n $NA addr replace $NET.1.2/24 dev ${P}ar"
PROFILE_FLAG=(); [ "$PROFILE" = release ] && PROFILE_FLAG=(--release)
# --workspace: the same feature set as the main build, so nothing is rebuilt
if ! cargo test "${PROFILE_FLAG[@]}" --workspace --test redis -- --ignored --exact multinode_across_network_namespaces; then
    echo "--- node A log"; cat "$WORK/$NA.log"; echo "--- node B log"; cat "$WORK/$NB.log"
    exit 1
fi
echo "multinode: OK ($LATENCY)"
