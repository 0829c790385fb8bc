#!/usr/bin/env bash
# Soak run (issue 17): one hour of `proxyctl loadtest` at 100 clients
# through three release node processes over two shards, a live reshard
# every five minutes and a node restart every ten (kill -9 and SIGTERM in
# turn), RSS / file descriptors / shard backends sampled every 10 s.
# Passes when the verifying load generator reports OK and the numbers stay
# flat (tests/tests/it/soak.rs says how). Writes
# bench/out/soak-<stamp>.json and .md.
#
#   bench/soak.sh                          # the hour
#   SOAK_SECS=600 SOAK_RESHARD_SECS=120 SOAK_RESTART_SECS=200 bench/soak.sh
#
# Nodes and proxyctl run in release; the test binary that drives them (and
# only samples and schedules) in debug. All three are copied first.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh >/dev/null
mkdir -p bench/out
stamp=$(date -u +%Y%m%d-%H%M%S)
cargo build -q --release -p hotrepart-proxy --bins
# Copies of the binaries (node restarts exec them again): builds during
# the hour change nothing, and no cargo lock is held while it runs.
bins=$(mktemp -d)
trap 'rm -rf "$bins"' EXIT
cp target/release/hotrepart target/release/proxyctl "$bins/"
test_exe=$(cargo test -q -p hotrepart-tests --test it --no-run --message-format=json \
  | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
cp "$test_exe" "$bins/it"
log=bench/out/soak-$stamp.log
echo "soak: ${SOAK_SECS:-3600} s; log in $log" >&2
status=0
HOTREPART_BIN_DIR="$bins" "$bins/it" --ignored --nocapture --exact \
  soak::an_hour_at_100_clients_with_reshards_and_node_restarts >"$log" 2>&1 || status=$?
sed -n 's/^SOAK //p' "$log" >"bench/out/soak-$stamp.json"
sed -n 's/^SOAK-MD //p' "$log" >"bench/out/soak-$stamp.md"
cat "bench/out/soak-$stamp.md"
[ "$status" = 0 ] || { tail -60 "$log" >&2; echo "soak: FAILED (exit $status)" >&2; }
exit "$status"
