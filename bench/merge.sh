#!/usr/bin/env bash
# One-command merge benchmark: multi-shard ORDER BY … LIMIT, GROUP BY and
# count(*) through a hotrepart node in front of 4 PostgreSQL shards, against
# the same queries on one PostgreSQL holding all the rows.
#
#   bench/merge.sh                         # defaults: 4M rows, 10 s per query and target
#   ROWS=1000000 DURATION=3 bench/merge.sh # quick run
#
# What it does (see bench/README.md):
#   1. installs what is missing (deploy/setup.sh: PostgreSQL, pgbench) and
#      builds target/release/hotrepart (HOTREPART_BIN skips the build; the
#      binary is copied into the temp dir);
#   2. starts, on free 127.0.0.1 ports under a temp dir, five PostgreSQL
#      servers (initdb --locale=C, scram-sha-256, fsync=off; as the
#      `postgres` user when run as root): shard0..shard3 and `single`; then a
#      hotrepart node (pool_size 4 per shard, client auth trust) in front of
#      the four shards with `mbench` sharded by k (int8, seed 0, 4 equal
#      ranges). Everything is stopped at exit, also on failure;
#   3. loads mbench(k int8 primary key, a int, b int, v text) with
#      k = 1..ROWS, a = k % 16, b = k % GROUPS_MANY, v = md5(k::text):
#      all rows on `single`, and on each shard only the rows it owns
#      (PostgreSQL computes hashint8extended(k, 0)); VACUUM ANALYZE; checks
#      the counts add up, and that keys sampled on every shard are found by
#      point lookups through the node;
#   4. for each query: the answer through the node must equal the answer of
#      `single` (psql, compared as text); then pgbench -n -c 1 -T DURATION
#      -f <query> against `single` (direct) and against the node, with
#      per-transaction latency logs (-l): median, 90th percentile and max
#      latency, transactions; the node's CPU time (utime+stime) per query;
#      the node's VmRSS before the query's first run and after its pgbench
#      run, and its peak RSS (VmHWM) meanwhile — reset before the query's
#      first run by writing 5 to /proc/PID/clear_refs (when the kernel
#      refuses, the peak is the peak since start);
#   5. prints a markdown table and writes it to bench/out/merge-<date>.md.
#
# Environment knobs (defaults in brackets):
#   ROWS [4000000]  GROUPS_MANY [100000]  DURATION [10] seconds per pgbench run
#   MAX_MERGE_ROWS [200000]  POOL_SIZE [4]  SHARED_BUFFERS [256MB]
#   QUERIES [all: limit10 offset1000 textlimit10 groupfew groupmany count]
#   HOTREPART_BIN [build target/release/hotrepart]  KEEP [0: delete temp dir]
#   SKIP_SETUP [0]  OUT_DIR [bench/out]  HOTREPART_LOG [warn]  PG_BIN
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROWS=${ROWS:-4000000}
GROUPS_MANY=${GROUPS_MANY:-100000}
DURATION=${DURATION:-10}
MAX_MERGE_ROWS=${MAX_MERGE_ROWS:-200000}
POOL_SIZE=${POOL_SIZE:-4}
SHARED_BUFFERS=${SHARED_BUFFERS:-256MB}
QUERIES=${QUERIES:-"limit10 offset1000 textlimit10 groupfew groupmany count"}
KEEP=${KEEP:-0}
OUT_DIR=${OUT_DIR:-$ROOT/bench/out}
PG_PASSWORD=${PG_PASSWORD:-benchpw}
SHARDS="shard0 shard1 shard2 shard3"
PG_NODES="$SHARDS single"

T0=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log() { printf '[%4ds] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for v in ROWS GROUPS_MANY DURATION MAX_MERGE_ROWS POOL_SIZE; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[ "$ROWS" -ge 100000 ] || die "ROWS must be at least 100000"

declare -A Q QDESC
Q[limit10]="SELECT k, v FROM mbench ORDER BY k LIMIT 10"
QDESC[limit10]="ORDER BY k (primary key) LIMIT 10: k-way merge, LIMIT pushed down"
Q[offset1000]="SELECT k, v FROM mbench ORDER BY k LIMIT 1000 OFFSET 1000"
QDESC[offset1000]="ORDER BY k LIMIT 1000 OFFSET 1000: shards send 2000 rows each, the node skips 1000"
Q[textlimit10]="SELECT k, v FROM mbench ORDER BY v DESC LIMIT 10"
QDESC[textlimit10]="ORDER BY v (text, no index, C collation) DESC LIMIT 10: a top-N sort over every row on each shard"
Q[groupfew]="SELECT a, count(*), sum(b), avg(k) FROM mbench GROUP BY a ORDER BY a"
QDESC[groupfew]="GROUP BY a (16 groups): count, sum, avg combined from partials"
Q[groupmany]="SELECT b, count(*), sum(k) FROM mbench GROUP BY b ORDER BY 3 DESC, 1 LIMIT 10"
QDESC[groupmany]="GROUP BY b ($GROUPS_MANY groups) ORDER BY sum DESC LIMIT 10: every group combined and sorted in the node"
Q[count]="SELECT count(*) FROM mbench"
QDESC[count]="count(*): one partial count per shard"
for q in $QUERIES; do
  [ -n "${Q[$q]:-}" ] || die "unknown query '$q' (known: ${!Q[*]})"
done

# ---------------------------------------------------------------- install
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  log "checking/installing PostgreSQL, pgbench (deploy/setup.sh)"
  "$ROOT/deploy/setup.sh"
fi
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PG_BIN/initdb" ] || die "no PostgreSQL server binaries (looked in /usr/lib/postgresql/*/bin)"
PGBENCH=$PG_BIN/pgbench
[ -x "$PGBENCH" ] || PGBENCH=$(command -v pgbench) || die "pgbench not found"
PSQL=$PG_BIN/psql
[ -x "$PSQL" ] || PSQL=$(command -v psql) || die "psql not found"

GIT_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(cd "$ROOT" && git status --porcelain 2>/dev/null | grep -qv '^??' && echo "+uncommitted changes" || true)
if [ -n "${HOTREPART_BIN:-}" ]; then
  HR_BIN=$HOTREPART_BIN
  HR_BIN_FROM="HOTREPART_BIN=$HOTREPART_BIN, built $(date -u -r "$HR_BIN" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo '?'); repo at $GIT_REV$GIT_DIRTY"
else
  HR_BIN_FROM="built from $GIT_REV$GIT_DIRTY"
  log "building hotrepart (cargo build --release)"
  (cd "$ROOT" && timeout 3600 cargo build --release -p hotrepart-proxy --bin hotrepart) >&2
  HR_BIN=$ROOT/target/release/hotrepart
fi
[ -x "$HR_BIN" ] || die "hotrepart binary $HR_BIN missing"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- helpers
# (as in bench/sharded-pgbench.sh)
IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
as_pg() {
  if [ "$IS_ROOT" = 1 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}
port_in_use() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
EPH_LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
PORT_LO=10000 PORT_HI=$EPH_LOW
[ "$EPH_LOW" -gt 12000 ] || { PORT_LO=61000; PORT_HI=65000; }
USED_PORTS=" "
free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$((PORT_LO + (RANDOM * 32768 + RANDOM) % (PORT_HI - PORT_LO)))
    case $USED_PORTS in *" $p "*) continue ;; esac
    if ! port_in_use "$p" && ! ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then
      USED_PORTS="$USED_PORTS$p "
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  return 1
}
wait_port() {
  local deadline=$(($(date +%s) + $2))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    port_in_use "$1" && return 0
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
    sleep 0.2
  done
  return 1
}
cpu_ticks() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo -1; return; }
  s=${s##*) }
  awk '{print $12 + $13}' <<<"$s"
}
# status_kb PID FIELD: a /proc/PID/status field in kB (VmRSS, VmHWM).
status_kb() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
stop_pid() {
  local pid=$1 sig=$2 secs=$3 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for i in $(seq 1 $((secs * 10))); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "pid $pid did not exit $secs s after SIG$sig; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  return 1
}

# ---------------------------------------------------------------- cleanup
WORK=$(mktemp -d /tmp/hrmerge.XXXXXX)
chmod 755 "$WORK"
[ "$IS_ROOT" = 1 ] && chown postgres:postgres "$WORK"
cp "$HR_BIN" "$WORK/hotrepart"
HR_BIN_SHA=$(sha256sum "$WORK/hotrepart" | cut -c1-12)
HR_BIN=$WORK/hotrepart
PG_STARTED=""
HR_PID=""
PROBLEMS=$WORK/problems
: >"$PROBLEMS"
cleanup() {
  local rc=$? n
  trap - EXIT INT TERM
  set +e
  # background loads still running (on failure)
  for n in $(jobs -p); do
    [ "$n" != "$HR_PID" ] && kill "$n" 2>/dev/null
  done
  if [ -n "$HR_PID" ] && kill -0 "$HR_PID" 2>/dev/null; then
    stop_pid "$HR_PID" INT 15 || echo "hotrepart did not stop on SIGINT within 15 s" >>"$PROBLEMS"
    wait "$HR_PID" 2>/dev/null
  fi
  for n in $PG_STARTED; do
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/$n" -m fast -w -t 30 stop >/dev/null 2>&1 ||
      as_pg "$PG_BIN/pg_ctl" -D "$WORK/$n" -m immediate -w -t 30 stop >/dev/null 2>&1
  done
  if [ -s "$PROBLEMS" ]; then
    log "problems seen during the run:"
    cat "$PROBLEMS" >&2
  fi
  if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
    log "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  log "stopped everything (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- PostgreSQL
declare -A PG_PORT
for n in $PG_NODES; do
  free_port "PG_PORT[$n]" || die "no free port"
done
free_port HR_PORT || die "no free port"
log "ports: $(for n in $PG_NODES; do printf '%s %s, ' "$n" "${PG_PORT[$n]}"; done)hotrepart $HR_PORT; temp dir $WORK"

printf '%s\n' "$PG_PASSWORD" >"$WORK/pwfile"
[ "$IS_ROOT" = 1 ] && chown postgres:postgres "$WORK/pwfile"
chmod 600 "$WORK/pwfile"
export PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=30
for n in $PG_NODES; do
  as_pg "$PG_BIN/initdb" -D "$WORK/$n" -N -U postgres -E UTF8 --locale=C \
    --auth=scram-sha-256 --pwfile="$WORK/pwfile" >"$WORK/initdb-$n.log" 2>&1 ||
    { cat "$WORK/initdb-$n.log" >&2; die "initdb ($n) failed"; }
  opts="-p ${PG_PORT[$n]} -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=50"
  opts="$opts -c shared_buffers=$SHARED_BUFFERS -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  PG_STARTED="$PG_STARTED $n"
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/$n" -l "$WORK/postgres-$n.log" -w -t 120 -o "$opts" start >/dev/null ||
    { tail -20 "$WORK/postgres-$n.log" >&2; die "PostgreSQL ($n) did not start"; }
  wait_port "${PG_PORT[$n]}" 30 || die "PostgreSQL ($n) not listening on ${PG_PORT[$n]}"
done
PG_VERSION=$("$PG_BIN/postgres" --version | awk '{print $3}')
log "PostgreSQL $PG_VERSION up x5 (fsync=off, shared_buffers=$SHARED_BUFFERS, --locale=C)"

# q NODE SQL: rows from a server, directly; bounded.
q() { timeout 1800 "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${PG_PORT[$1]}" -U postgres -d postgres -c "$2"; }
# qhr SQL: the same through the hotrepart node.
qhr() { timeout 600 "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$HR_PORT" -U bench -d postgres -c "$1"; }

# ---------------------------------------------------------------- load
# Ownership, as PostgreSQL computes it: the point of k is
# hashint8extended(k, 0) read as unsigned 64-bit; 4 equal ranges, shard i
# owns [i*2^62, (i+1)*2^62). As signed bigint h:
H="hashint8extended(k, 0)"
declare -A OWN
OWN[shard0]="$H >= 0 AND $H < 4611686018427387904"
OWN[shard1]="$H >= 4611686018427387904"
OWN[shard2]="$H < -4611686018427387904"
OWN[shard3]="$H >= -4611686018427387904 AND $H < 0"
OWN[single]="true"
SCHEMA="CREATE TABLE mbench (k int8 NOT NULL, a int NOT NULL, b int NOT NULL, v text NOT NULL)"
log "loading $ROWS rows (a = k % 16, b = k % $GROUPS_MANY, v = md5(k)): all on single, owned rows on each shard (in parallel)"
LOAD_T0=$(date +%s)
LOAD_PIDS=""
for n in $PG_NODES; do
  # (the primary key is added after the rows: faster; VACUUM needs its own statement)
  { q "$n" "$SCHEMA; INSERT INTO mbench SELECT k, k % 16, k % $GROUPS_MANY, md5(k::text) FROM generate_series(1, $ROWS) k WHERE ${OWN[$n]}; ALTER TABLE mbench ADD PRIMARY KEY (k)" &&
    q "$n" "VACUUM ANALYZE mbench"; } >"$WORK/load-$n.log" 2>&1 &
  LOAD_PIDS="$LOAD_PIDS $!"
done
for p in $LOAD_PIDS; do
  wait "$p" || die "loading failed (see $WORK/load-*.log: $(cat "$WORK"/load-*.log | head -3))"
done
LOAD_SECS=$(($(date +%s) - LOAD_T0))
declare -A COUNT
SUM=0
for n in $SHARDS; do
  COUNT[$n]=$(q "$n" "SELECT count(*) FROM mbench")
  SUM=$((SUM + COUNT[$n]))
done
COUNT[single]=$(q single "SELECT count(*) FROM mbench")
SIZES=$(for n in $PG_NODES; do printf '%s %s rows (%s), ' "$n" "${COUNT[$n]}" "$(q "$n" "SELECT pg_size_pretty(pg_total_relation_size('mbench'))")"; done)
log "loaded in ${LOAD_SECS} s: ${SIZES%, }"
[ "$SUM" = "$ROWS" ] && [ "${COUNT[single]}" = "$ROWS" ] || die "row counts do not add up: shards $SUM, single ${COUNT[single]}, expected $ROWS"

# ---------------------------------------------------------------- hotrepart
{
  echo "listen = \"127.0.0.1:$HR_PORT\""
  echo "pool_mode = \"transaction\""
  echo "pool_size = $POOL_SIZE"
  echo "max_merge_rows = $MAX_MERGE_ROWS"
  echo
  echo "[[sharded_tables]]"
  echo "name = \"mbench\""
  echo "key = \"k\""
  echo "type = \"int8\""
  echo "seed = 0"
  for s in $SHARDS; do
    echo
    echo "[[shards]]"
    echo "name = \"$s\""
    echo "dsn = \"postgres://postgres:$PG_PASSWORD@127.0.0.1:${PG_PORT[$s]}/postgres\""
  done
  echo
  echo "[[users]]"
  echo "name = \"bench\""
  echo "auth = \"trust\""
  echo "server_user = \"postgres\""
} >"$WORK/hotrepart.toml"
HOTREPART_LOG=${HOTREPART_LOG:-warn} "$HR_BIN" serve --config "$WORK/hotrepart.toml" >>"$WORK/hotrepart.log" 2>&1 &
HR_PID=$!
wait_port "$HR_PORT" 30 "$HR_PID" || { tail -20 "$WORK/hotrepart.log" >&2; die "hotrepart did not start"; }
log "hotrepart up (pid $HR_PID) in front of $SHARDS"

CHECKS=$WORK/checks.txt
: >"$CHECKS"
CHECK_OK=1
check() { # check PASS|FAIL TEXT
  echo "$1: $2" | tee -a "$CHECKS" >&2
  if [ "$1" != PASS ]; then
    CHECK_OK=0
    echo "check failed: $2" >>"$PROBLEMS"
  fi
}
# Routing: keys sampled on each shard are found through the node.
for n in $SHARDS; do
  q "$n" "SELECT k FROM mbench ORDER BY random() LIMIT 50" >"$WORK/sample-$n.txt"
  sed 's/.*/SELECT k FROM mbench WHERE k = &;/' "$WORK/sample-$n.txt" >"$WORK/lookup-$n.sql"
  set +e
  timeout 300 "$PSQL" -X -q -At -h 127.0.0.1 -p "$HR_PORT" -U bench -d postgres \
    -f "$WORK/lookup-$n.sql" >"$WORK/lookup-$n.out" 2>"$WORK/lookup-$n.err"
  set -e
  found=$(sort -u "$WORK/lookup-$n.out" | comm -12 - <(sort -u "$WORK/sample-$n.txt") | wc -l)
  r=PASS; [ "$found" = 50 ] || r=FAIL
  check $r "routing: $found of 50 keys sampled on $n found by point lookup through the node"
done
[ "$CHECK_OK" = 1 ] || die "rows are not where the node looks for them; not benchmarking"

# ---------------------------------------------------------------- queries
RAW=$WORK/raw.tsv
: >"$RAW"
HWM_RESET=yes
# run_pgbench TARGET(single|node) NAME: sets R_* (median/p90/max ms, tx, failed, exit, err)
run_pgbench() {
  local target=$1 name=$2 host_args out
  if [ "$target" = single ]; then
    host_args=(-h 127.0.0.1 -p "${PG_PORT[single]}" -U postgres)
  else
    host_args=(-h 127.0.0.1 -p "$HR_PORT" -U bench)
  fi
  out=$WORK/pgbench-$name-$target.log
  rm -f "$WORK/lat-$name-$target".*
  set +e
  (cd "$WORK" && timeout --kill-after=10 $((DURATION + 600)) "$PGBENCH" "${host_args[@]}" -n -c 1 -j 1 \
    -T "$DURATION" -f "$WORK/$name.sql" -l --log-prefix="$WORK/lat-$name-$target" postgres) >"$out" 2>&1
  R_RC=$?
  set -e
  R_NTX=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -1)
  R_FAILED=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -1)
  R_ERR=$(grep -m1 -E 'error|ERROR|FATAL|abort' "$out" | cut -c1-240 || true)
  # log line: client_id transaction_no latency_us script_no epoch us
  # (pgbench's per-transaction time is lazy: a fast transaction may log 0 µs;
  # the minimum means nothing, so median, 90th percentile and maximum)
  read -r R_MED R_P90 R_MAX R_N <<<"$(cat "$WORK/lat-$name-$target".* 2>/dev/null | awk '{print $3}' | sort -n | awk '
    { a[NR] = $1 }
    END { if (NR == 0) { print "NA NA NA 0"; exit }
          m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
          p = int(NR * 0.9); if (p < NR * 0.9) p++; if (p < 1) p = 1
          printf "%.3f %.3f %.3f %d\n", m / 1000, a[p] / 1000, a[NR] / 1000, NR }')"
  if [ "$R_RC" = 0 ] && [ "${R_N:-0}" = 0 ]; then
    R_RC=100
    R_ERR="pgbench exited 0 but logged no transaction"
  fi
}

BENCH_OK=1
for name in $QUERIES; do
  sql=${Q[$name]}
  printf '%s;\n' "$sql" >"$WORK/$name.sql"
  if ! kill -0 "$HR_PID" 2>/dev/null; then
    die "hotrepart died (see $WORK/hotrepart.log)"
  fi
  # the node's memory from before the query's first run (the check below)
  # to the end of its pgbench run
  if [ "$HWM_RESET" = yes ] && ! { echo 5 >"/proc/$HR_PID/clear_refs"; } 2>/dev/null; then
    HWM_RESET=no
  fi
  rss0=$(status_kb "$HR_PID" VmRSS)
  # correctness: the node's answer = single's answer
  set +e
  q single "$sql" >"$WORK/answer-$name-single.txt" 2>&1
  qhr "$sql" >"$WORK/answer-$name-node.txt" 2>&1
  set -e
  if cmp -s "$WORK/answer-$name-single.txt" "$WORK/answer-$name-node.txt"; then
    check PASS "$name: the node's answer equals single's ($(wc -l <"$WORK/answer-$name-single.txt") rows)"
  else
    check FAIL "$name: the node's answer differs from single's: node '$(head -c 300 "$WORK/answer-$name-node.txt")' vs single '$(head -c 300 "$WORK/answer-$name-single.txt")'"
  fi
  # direct, on the server holding all rows
  log "$name: pgbench -T $DURATION on single: $sql"
  run_pgbench single "$name"
  s_line="$R_MED|$R_P90|$R_MAX|$R_N|$R_RC|${R_FAILED:-}|${R_ERR:-}"
  # through the node, with its CPU time
  c0=$(cpu_ticks "$HR_PID")
  log "$name: pgbench -T $DURATION through the node"
  run_pgbench node "$name"
  c1=$(cpu_ticks "$HR_PID")
  rss1=$(status_kb "$HR_PID" VmRSS)
  hwm=$(status_kb "$HR_PID" VmHWM)
  cpu_ms=NA
  [ "${R_N:-0}" -gt 0 ] && [ "$c0" -ge 0 ] && [ "$c1" -ge 0 ] &&
    cpu_ms=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$R_N" 'BEGIN{printf "%.3f", t / hz * 1000 / n}')
  n_line="$R_MED|$R_P90|$R_MAX|$R_N|$R_RC|${R_FAILED:-}|${R_ERR:-}"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$s_line" "$n_line" "$rss0" "$rss1" "$hwm" "$cpu_ms" >>"$RAW"
  for line in "single|$s_line" "node|$n_line"; do
    IFS='|' read -r t med _ _ n rc failed err <<<"$line"
    if [ "$rc" != 0 ] || [ "${failed:-0}" != 0 ]; then
      BENCH_OK=0
      echo "$name on $t: pgbench exit $rc, failed transactions ${failed:-?}: $err" >>"$PROBLEMS"
    fi
  done
  log "$name: median single ${s_line%%|*} ms, node ${n_line%%|*} ms; node VmRSS ${rss0} -> ${rss1} kB, VmHWM ${hwm} kB (reset before run: $HWM_RESET), CPU ${cpu_ms} ms/query"
done
FINAL_RSS=$(status_kb "$HR_PID" VmRSS)

# ---------------------------------------------------------------- report
mkdir -p "$OUT_DIR"
STAMP=$(date +%Y%m%d-%H%M%S)
REPORT=$OUT_DIR/merge-$STAMP.md
ELAPSED=$(($(date +%s) - T0))
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "NA" || b == "NA" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
mb() { awk -v k="$1" 'BEGIN{ if (k == "" || k == 0) print "n/a"; else printf "%.1f", k / 1024 }'; }
{
  echo "# Multi-shard merges through hotrepart: 4 shards vs one PostgreSQL"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); hotrepart $HR_BIN_FROM (binary sha256 $HR_BIN_SHA…)"
  echo "- machine: $(nproc) cores ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)), $(free -g | awk '/^Mem:/{print $2}') GiB; the 4 shards, the single server, the node and pgbench all share these cores (the shards cannot run in parallel beyond them)"
  echo "- PostgreSQL $PG_VERSION x5 (shard0..shard3, single), initdb --locale=C, fsync=off, synchronous_commit=off, shared_buffers=$SHARED_BUFFERS, default parallel query settings; hotrepart pool_mode=transaction, pool_size=$POOL_SIZE per shard, max_merge_rows=$MAX_MERGE_ROWS, client auth trust"
  echo "- data: mbench(k int8 primary key, a int, b int, v text), $ROWS rows, a = k % 16, b = k % $GROUPS_MANY, v = md5(k::text); loaded in ${LOAD_SECS} s; ${SIZES%, }"
  echo "- each query: pgbench -n -c 1 -j 1 -T $DURATION -f query.sql (simple protocol), one client, queries one after another; latency per query from pgbench's per-transaction log (-l): median (90th percentile, maximum) over the run; first direct on single, then through the node"
  echo "- node memory: VmRSS before the query's first run through the node (the correctness check) and after its pgbench run; peak = VmHWM after the run, $( [ "$HWM_RESET" = yes ] && echo "reset before the query's first run (echo 5 > /proc/PID/clear_refs), so it is the peak while that query ran" || echo "the kernel refused the reset (clear_refs), so it is the peak since the node started")"
  echo "- node CPU: utime+stime of the hotrepart process over the run / queries run"
  echo "- total wall time: ${ELAPSED} s; load average at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "| query | single: median ms (p90, max) | 4 shards via node: median ms (p90, max) | node/single (medians) | runs single / node | node VmRSS before → after MiB | node peak RSS MiB | node CPU ms/query |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  while IFS=$'\t' read -r name s n rss0 rss1 hwm cpu; do
    IFS='|' read -r s_med s_p90 s_max s_n _ <<<"$s"
    IFS='|' read -r n_med n_p90 n_max n_n _ <<<"$n"
    echo "| $name | $s_med ($s_p90, $s_max) | $n_med ($n_p90, $n_max) | $(ratio "$n_med" "$s_med") | $s_n / $n_n | $(mb "$rss0") → $(mb "$rss1") | $(mb "$hwm") | $cpu |"
  done <"$RAW"
  echo
  echo "Queries:"
  echo
  for name in $QUERIES; do
    echo "- $name — ${QDESC[$name]}: \`${Q[$name]}\`"
  done
  echo
  echo "Node VmRSS at the end: $(mb "$FINAL_RSS") MiB."
  echo
  echo "Checks:"
  echo
  sed 's/^/- /' "$CHECKS"
  hr_issues=$(grep -cE ' (WARN|ERROR) ' "$WORK/hotrepart.log" 2>/dev/null || true)
  echo
  echo "hotrepart: ${hr_issues:-0} WARN/ERROR log lines (HOTREPART_LOG=${HOTREPART_LOG:-warn})."
  if [ "${hr_issues:-0}" != 0 ]; then
    echo
    echo '```'
    grep -E ' (WARN|ERROR) ' "$WORK/hotrepart.log" | sed 's/\x1b\[[0-9;]*m//g' | head -20
    echo '```'
  fi
  if [ -s "$PROBLEMS" ]; then
    echo
    echo "Problems:"
    echo
    sed 's/^/- /' "$PROBLEMS"
  fi
} >"$REPORT"
cat "$REPORT"
log "report written to $REPORT"
[ "$BENCH_OK" = 1 ] || { log "some pgbench run failed"; exit 1; }
[ "$CHECK_OK" = 1 ] || { log "a correctness check FAILED"; exit 1; }
exit 0
