#!/usr/bin/env bash
# A long fuzzing run: every target until it has executed TOTAL inputs (default 10 million),
# split over JOBS parallel libFuzzer jobs per target, all targets at once. Uses the binaries of
# `cargo +nightly fuzz build -s none -a` (or a directory of them: FUZZ_BIN_DIR, e.g. stripped
# copies on another machine), starts from the committed seeds, and prints executions and crash
# inputs per target. Bounded by MAX_SECONDS per job (default 450).
#   TOTAL=10000000 JOBS="update_ops=8 store_recovery=6" bash fuzz/long_run.sh
set -euo pipefail
cd "$(dirname "$0")"
BIN="$(cd "${FUZZ_BIN_DIR:-target/x86_64-unknown-linux-gnu/release}" && pwd)"
TOTAL="${TOTAL:-10000000}"
MAX_SECONDS="${MAX_SECONDS:-450}"
OUTDIR="${OUT:-$(mktemp -d)}"
TARGETS=(worker_frame subscriber_frame upgrade_request update_ops config store_recovery telemetry_frame http_function rbac_rules channel_request redis_reply redis_message)

jobs_for() { # JOBS="name=n ..." overrides the default of one job per target
    local t=$1 kv
    for kv in ${JOBS:-}; do [ "${kv%%=*}" = "$t" ] && { echo "${kv#*=}"; return; }; done
    echo 1
}

run() {
    local t=$1 jobs; jobs="$(jobs_for "$t")"
    local work="$OUTDIR/$t"
    mkdir -p "$work/corpus" "$work/crashes"
    cp corpus/"$t"/* "$work/corpus/"
    (cd "$work" && "$BIN/$t" -jobs="$jobs" -workers="$jobs" -runs=$((TOTAL / jobs)) \
        -max_total_time="$MAX_SECONDS" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
        -print_final_stats=1 -artifact_prefix="$work/crashes/" corpus >"$work/main.log" 2>&1 || true)
    local execs
    execs="$(cat "$work"/fuzz-*.log 2>/dev/null | sed -n 's/^stat::number_of_executed_units: *//p' | awk '{s+=$1} END {print s+0}')"
    printf '%-18s jobs=%-2s execs=%-10s crash inputs=%s\n' "$t" "$jobs" "$execs" "$(ls "$work/crashes" | wc -l)"
}

for t in "${TARGETS[@]}"; do run "$t" & done
wait
echo "logs and crash inputs: $OUTDIR"
