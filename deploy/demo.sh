#!/usr/bin/env bash
# Sets up what is missing, builds hotrepart and runs `hotrepart demo`.
# Extra arguments go to the demo, e.g.: deploy/demo.sh --nodes 1 --shards 4 --port 6432
# (see `hotrepart demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
cargo build --release -p hotrepart-proxy --bins
exec target/release/hotrepart demo "$@"
