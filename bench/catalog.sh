#!/usr/bin/env bash
# Catalog benchmark: latency of catalog changes through the admin API on 3
# local hotrepart node processes (through a follower and through the
# leader), the time from kill -9 of the leader to the next committed
# change, and what two-phase commit with its decision in the replicated
# catalog adds to a 2-shard write transaction (vs a 1-shard one).
# Writes bench/out/catalog-<stamp>.json (one JSON object per line);
# figures go to RESULTS.md.
#
#   CATALOG_BENCH_CHANGES=200 CATALOG_BENCH_FAILOVERS=3 TWOPC_BENCH_TXS=500 bench/catalog.sh
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh >/dev/null
mkdir -p bench/out
stamp=$(date -u +%Y%m%d-%H%M%S)
out=bench/out/catalog-$stamp.json
log=bench/out/catalog-$stamp.txt
{ date -u; uptime; nproc; } > "$log"
cargo build -q --release -p hotrepart-proxy --bins
# One test at a time: they would compete for the same cores.
cargo test -q --release -p hotrepart-tests --test it -- --ignored --nocapture --test-threads=1 cluster_bench:: 2>&1 \
  | tee -a "$log" | tee /dev/stderr | sed -n 's/^.*\(CATALOG\|TWOPC\)-BENCH //p' > "$out"
uptime >> "$log"
echo "wrote $out (log: $log):"; cat "$out"
