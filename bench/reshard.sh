#!/usr/bin/env bash
# Live-reshard benchmark: a range holding ~1M rows (RESHARD_BENCH_ROWS=2M
# in total, half per shard) moves between two shards while 6 writers run
# through 3 hotrepart nodes. Writes bench/out/reshard-live-<stamp>.json:
# job duration, rows/s, write throughput before/during/after, and the
# latency of writes into the moving range during the job (p50/p99/max).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh >/dev/null
mkdir -p bench/out
stamp=$(date -u +%Y%m%d-%H%M%S)
out=bench/out/reshard-live-$stamp.json
cargo build -q --release -p hotrepart-proxy --bins
cargo test -q --release -p hotrepart-tests --test it -- --ignored --nocapture reshard_bench:: 2>&1 \
  | tee /dev/stderr | sed -n 's/^RESHARD-BENCH //p' > "$out"
echo "wrote $out:"; cat "$out"
