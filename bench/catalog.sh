#!/usr/bin/env bash
# Catalog benchmark: latency of catalog changes through the admin API on 3
# local hotrepart node processes (through a follower and through the
# leader), and the time from kill -9 of the leader to the next committed
# change. Writes bench/out/catalog-<stamp>.json; figures go to RESULTS.md.
#
#   CATALOG_BENCH_CHANGES=200 CATALOG_BENCH_FAILOVERS=3 bench/catalog.sh
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh >/dev/null
mkdir -p bench/out
stamp=$(date -u +%Y%m%d-%H%M%S)
out=bench/out/catalog-$stamp.json
cargo build -q --release -p hotrepart-proxy --bins
cargo test -q --release -p hotrepart-tests --test cluster_bench -- --ignored --nocapture 2>&1 \
  | tee /dev/stderr | sed -n 's/^CATALOG-BENCH //p' > "$out"
echo "wrote $out:"; cat "$out"
