#!/usr/bin/env bash
# Sets up what is missing, builds hotrepart and runs `hotrepart demo`.
# Extra arguments go to the demo, e.g.: deploy/demo.sh --shards 4 --port 6432
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
cargo build --release -p hotrepart-proxy --bin hotrepart
exec target/release/hotrepart demo "$@"
