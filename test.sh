#!/usr/bin/env bash
# The whole ringcast test suite: Rust unit and integration tests against the release binary,
# then the official iii SDKs (npm and PyPI) against the same binary. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")"

echo "== building ringcast (release) =="
cargo build --release --workspace --all-targets

echo "== Rust unit and integration tests =="
cargo test --release --workspace

export RINGCAST_BIN="$PWD/target/release/ringcast"

for sdk in node python; do
  if [ -f "tests/sdk/$sdk/run.sh" ]; then
    echo "== $sdk SDK suite (official iii-sdk package) =="
    bash "tests/sdk/$sdk/run.sh"
  fi
done
