#!/usr/bin/env bash
# Reshard engine benchmark: moves a range of ~1,000,000 rows (of ~2,000,000)
# between two local PostgreSQL servers (the test harness's: fsync off,
# synchronous_commit off, shared_buffers 64MB) with hotrepart_proxy::reshard,
# then catches up 200,000 updates made after the copy. Prints a markdown
# table (copy rows/s, catch-up changes/s, verify, cleanup) and keeps it in
# bench/out/.
#
#   bench/reshard-copy.sh                              # defaults
#   HR_BENCH_ROWS=200000 HR_BENCH_CHANGES=20000 bench/reshard-copy.sh
#   HR_BENCH_MAX_CHANGES=10000 bench/reshard-copy.sh   # catch-up batch size
#
# Needs the PostgreSQL server binaries (deploy/setup.sh). Builds the tests
# in release mode (CARGO_TARGET_DIR is honoured).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
out="bench/out/reshard-$(date -u +%Y%m%d-%H%M%S).md"
cargo test --release -p hotrepart-tests --test it -- \
    --ignored --nocapture --exact reshard_engine::bench_move_range 2>&1 | tee "$out.log"
grep '^|' "$out.log" > "$out"
echo "results: $out"
