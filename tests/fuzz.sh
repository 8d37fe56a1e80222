#!/usr/bin/env bash
# Bounded coverage-guided fuzzing (cargo fuzz, libFuzzer) of every parser of network, disk and
# config input: each target in fuzz/ runs FUZZ_SECONDS (default 10) from its seed corpus. New
# corpus entries go to a temporary directory (the committed corpus is only read); a crash input
# is kept in fuzz/artifacts/<target>/ and fails this script after all targets ran. A crash input
# goes into corpus/<target>/ once it is fixed, so it is replayed on every run.
# Without nightly Rust or cargo-fuzz it says so and replays the seeds as unit tests instead.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_PER_TARGET="${FUZZ_SECONDS:-10}"
TARGETS=(worker_frame subscriber_frame upgrade_request update_ops config store_recovery telemetry_frame http_function rbac_rules channel_request redis_reply redis_message)
# -s none: the engine's unsafe code is memory maps and syscalls, where AddressSanitizer sees
# nothing a segfault would not show; without it the build takes a fraction of the time.
# -a: debug assertions (and, with the profile in fuzz/Cargo.toml, overflow checks) stay on.
FUZZ_FLAGS=(-s none -a)

replay_seeds() {
    echo "fuzz: $1; replaying every seed as a unit test instead (no fuzzing)"
    cargo test --test corpus
    exit 0
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
        rustup toolchain install nightly --profile minimal >/dev/null 2>&1 || true
    fi
    cargo +nightly --version >/dev/null 2>&1 || replay_seeds "no nightly Rust toolchain"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked || replay_seeds "cargo-fuzz could not be installed"
fi

echo "== fuzz: building all targets =="
build_start=$SECONDS
cargo +nightly fuzz build "${FUZZ_FLAGS[@]}"
echo "fuzz: build took $((SECONDS - build_start)) s"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
report=()
for target in "${TARGETS[@]}"; do
    echo "== fuzz: $target (${SECONDS_PER_TARGET} s) =="
    mkdir -p "$work/$target" "artifacts/$target"
    log="$work/$target.log"
    # The first corpus directory receives new inputs; corpus/<target> is only read.
    if cargo +nightly fuzz run "${FUZZ_FLAGS[@]}" "$target" "$work/$target" "corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
        -artifact_prefix="artifacts/$target/" -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$target")
        grep -m1 -A2 "panicked at" "$log" || tail -n 20 "$log"
        grep "Test unit written to" "$log" || true
    fi
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
    added="$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -n1)"
    execs="${execs:-0}"
    report+=("$(printf '%-18s %-7s %10s execs %8s exec/s %6s new inputs' \
        "$target" "$status" "$execs" "$((execs / SECONDS_PER_TARGET))" "${added:-0}")")
done

echo "== fuzz: executions per target (${SECONDS_PER_TARGET} s each) =="
printf '%s\n' "${report[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]} (inputs under fuzz/artifacts/)"
    exit 1
fi
