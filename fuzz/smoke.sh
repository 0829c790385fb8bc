#!/usr/bin/env bash
# Short coverage-guided fuzzing of every target in fuzz/fuzz_targets/
# and fuzz/wasm/fuzz_targets/ (cargo-fuzz, libFuzzer; nightly toolchain),
# starting from the kept corpora in fuzz/corpus/<target>/. A crash fails
# the run; libFuzzer writes the input to fuzz/artifacts/<target>/ (or
# fuzz/wasm/artifacts/) — minimise it (`cargo +nightly fuzz tmin <target>
# <file>`), copy it into fuzz/corpus/<target>/ (the stable suite replays
# it: router/tests/fuzz_corpus.rs, proxy/wire/tests/fuzz_corpus.rs,
# udf-wasm/tests/fuzz_corpus.rs) and fix the defect.
#
#   fuzz/smoke.sh                 # FUZZ_SECS=30 per target
#   FUZZ_SECS=3600 fuzz/smoke.sh  # a long run; corpora grow in place
#
# Needs the nightly toolchain (rustup toolchain install nightly) and
# cargo-fuzz (installed here when missing). Under CI=true a missing
# nightly toolchain fails the run; elsewhere it skips with a message.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${FUZZ_SECS:-30}
if ! cargo +nightly --version >/dev/null 2>&1; then
  if [ "${CI:-}" = true ]; then
    echo "fuzz/smoke.sh: no nightly toolchain; CI needs it for cargo-fuzz" >&2
    exit 1
  fi
  echo "fuzz/smoke.sh: no nightly toolchain: fuzzing skipped" >&2
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# Two cargo-fuzz workspaces: `.` (router and hotrepart-wire targets,
# address sanitizer) and `wasm/` (wasm_load over wasmtime, built without
# sanitizer: the crates' own code has no unsafe, and an instrumented
# wasmtime/cranelift costs minutes of build for little). Every target's
# corpus is corpus/<target>/.
#   <fuzz dir> <extra build/run flags>
WORKSPACES=(". -O" "wasm -O --sanitizer none")
for ws in "${WORKSPACES[@]}"; do
  read -r dir flags <<<"$ws"
  # shellcheck disable=SC2086
  cargo +nightly fuzz build --fuzz-dir "$dir" $flags
done
for ws in "${WORKSPACES[@]}"; do
  read -r dir flags <<<"$ws"
  # shellcheck disable=SC2086
  for t in $(cargo +nightly fuzz list --fuzz-dir "$dir"); do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    # shellcheck disable=SC2086
    if ! cargo +nightly fuzz run --fuzz-dir "$dir" $flags "$t" "corpus/$t" -- \
      -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
      tail -40 "$log" >&2
      echo "fuzz target $t: CRASH (input in fuzz/$dir/artifacts/$t/)" >&2
      rm -f "$log"
      exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    echo "fuzz target $t: ${runs:-?} runs in ${SECS} s, $cov, 0 crashes, corpus $(ls "corpus/$t" | wc -l) inputs"
    rm -f "$log"
  done
done
