#!/usr/bin/env bash
# The test command: formatting, lints, unit and integration tests (the
# integration tests start their own PostgreSQL servers on free loopback ports),
# then a short fuzzing run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --profile ci
else
  cargo test --workspace --no-fail-fast
fi
# Coverage-guided fuzzing of every target (router, wire decoders, WASM
# module loading), 30 s each from the kept corpora (nightly toolchain +
# cargo-fuzz; see fuzz/smoke.sh).
fuzz/smoke.sh
