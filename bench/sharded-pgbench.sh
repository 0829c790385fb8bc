#!/usr/bin/env bash
# One-command sharded benchmark: pgbench through hotrepart with
# pgbench_accounts (and pgbench_history) sharded by aid over 2 shards,
# beside the same pgbench runs through a single-shard hotrepart node.
#
#   bench/sharded-pgbench.sh                      # defaults: 10 s per run, 2 repeats
#   DURATION=5 REPEAT=1 bench/sharded-pgbench.sh  # quick run
#
# What it does (see bench/README.md):
#   1. installs what is missing (deploy/setup.sh: PostgreSQL, pgbench) and
#      builds target/release/hotrepart (HOTREPART_BIN skips the build);
#   2. starts, on free 127.0.0.1 ports under a temp dir, three PostgreSQL
#      servers (scram-sha-256, fsync=off; as the `postgres` user when run as
#      root): shard0 and shard1 of the sharded layout, and a separate
#      `single` server for the single-shard baseline; then two hotrepart
#      nodes (transaction mode, pool 20 per shard, trust for clients): one in
#      front of shard0+shard1, one in front of `single`. Everything is
#      stopped at exit, also on failure;
#   3. pgbench -i -s SCALE directly on each server; on shard0/shard1 deletes
#      the pgbench_accounts rows the shard does not own (2 shards, default
#      initial_ranges: shard0 owns points [0, 2^63) = hashint4extended(aid, 0)
#      >= 0, shard1 owns [2^63, 2^64) = hashint4extended(aid, 0) < 0),
#      truncates pgbench_history, drops pgbench_branches/pgbench_tellers on
#      shard1 (they live on the home shard, shard0: a statement misrouted to
#      shard1 fails loudly); checks the counts add up, each shard holds only
#      rows it owns, and point lookups through the sharded node find rows of
#      both shards;
#   4. pgbench -S (select-only) and -N (simple-update: UPDATE/SELECT accounts,
#      INSERT history, all by aid: single-shard transactions) for each mode x
#      clients, sharded and single-shard runs interleaved per point (order
#      rotated per repeat), REPEAT times; every run must exit 0 with
#      "number of failed transactions: 0" (-M prepared used to need one
#      pgbench thread per client, PREPARED_THREADS: pgbench prepares with a
#      blocking PQprepare; the node now answers the Parse of a statement its
#      pool has validated without a backend, so the default is THREADS);
#   5. the default TPC-B-like script through the sharded node: it writes
#      pgbench_accounts (shard of the aid) and pgbench_tellers/branches (home
#      shard) in one transaction, committed by two-phase commit when the
#      account is on shard1: one pgbench run and an exact count with psql
#      (TPCB_TX transactions, every one must COMMIT);
#   6. consistency after the runs: per shard, sum(abalance) = sum(history
#      delta), history rows only on their owner, no backend left in a
#      transaction;
#   7. prints a markdown table and writes it to
#      bench/out/sharded-pgbench-<date>.md (+ .tsv with the raw runs).
#
# Environment knobs (defaults in brackets):
#   DURATION [10]  seconds per pgbench run        REPEAT [2]  runs per point
#   CLIENTS ["10 100"]  MODES ["simple prepared"]  WORKLOADS ["select-only simple-update"]
#   SCALE [10]  POOL_SIZE [20]  THREADS [2]  TPCB_DURATION [5]  TPCB_TX [1000]
#   PREPARED_THREADS [THREADS; 'clients': -j = number of clients for -M prepared]
#   LOOKUPS [200 per shard]  SHARED_BUFFERS [256MB]  POOL_TIMEOUT_MS [60000]
#   HOTREPART_BIN [build target/release/hotrepart]  KEEP [0: delete temp dir]
#   SKIP_SETUP [0]  OUT_DIR [bench/out]  HOTREPART_LOG [warn]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-10}
REPEAT=${REPEAT:-2}
CLIENTS=${CLIENTS:-"10 100"}
MODES=${MODES:-"simple prepared"}
WORKLOADS=${WORKLOADS:-"select-only simple-update"}
SCALE=${SCALE:-10}
POOL_SIZE=${POOL_SIZE:-20}
THREADS=${THREADS:-2}
TPCB_DURATION=${TPCB_DURATION:-5}
TPCB_TX=${TPCB_TX:-1000}
LOOKUPS=${LOOKUPS:-200}
SHARED_BUFFERS=${SHARED_BUFFERS:-256MB}
PREPARED_THREADS=${PREPARED_THREADS:-$THREADS}
POOL_TIMEOUT_MS=${POOL_TIMEOUT_MS:-60000}
KEEP=${KEEP:-0}
OUT_DIR=${OUT_DIR:-$ROOT/bench/out}
PG_PASSWORD=${PG_PASSWORD:-benchpw}
SEED=0

T0=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log() { printf '[%4ds] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$PREPARED_THREADS" = clients ] || [[ $PREPARED_THREADS =~ ^[1-9][0-9]*$ ]] ||
  die "PREPARED_THREADS must be 'clients' or a positive integer (got '$PREPARED_THREADS')"
for v in DURATION REPEAT SCALE POOL_SIZE THREADS TPCB_DURATION TPCB_TX LOOKUPS POOL_TIMEOUT_MS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
MAX_CLIENTS=0
for c in $CLIENTS; do
  [[ $c =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be positive integers (got '$c')"
  [ "$c" -gt "$MAX_CLIENTS" ] && MAX_CLIENTS=$c
done
for m in $MODES; do
  case $m in simple | extended | prepared) ;; *) die "unknown mode '$m'" ;; esac
done
for w in $WORKLOADS; do
  case $w in select-only | simple-update) ;; *) die "unknown workload '$w' (select-only, simple-update)" ;; esac
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

need_fd=$((MAX_CLIENTS * 2 + 200))
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$need_fd" ] ||
  die "ulimit -n is $(ulimit -n), need >= $need_fd for $MAX_CLIENTS clients"

CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- helpers
# (copied from bench/pgbench.sh)
IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
FD_LIMIT=$(ulimit -n)
as_pg() {
  if [ "$IS_ROOT" = 1 ]; then
    runuser -u postgres -- bash -c 'ulimit -n "$0" 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$@"' "$FD_LIMIT" "$@"
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
WORK=$(mktemp -d /tmp/hrshard.XXXXXX)
chmod 755 "$WORK"
[ "$IS_ROOT" = 1 ] && chown postgres:postgres "$WORK"
cp "$HR_BIN" "$WORK/hotrepart"
HR_BIN_SHA=$(sha256sum "$WORK/hotrepart" | cut -c1-12)
HR_BIN=$WORK/hotrepart
PG_NODES="shard0 shard1 single"
PG_STARTED=""
declare -A PG_PORT HR_PORT HR_PID HR_STARTS
HR_PID[sharded]="" HR_PID[single]=""
HR_STARTS[sharded]=0 HR_STARTS[single]=0
PROBLEMS=$WORK/problems
: >"$PROBLEMS"
cleanup() {
  local rc=$? n
  trap - EXIT INT TERM
  set +e
  for n in sharded single; do
    if [ -n "${HR_PID[$n]}" ] && kill -0 "${HR_PID[$n]}" 2>/dev/null; then
      stop_pid "${HR_PID[$n]}" INT 15 || echo "hotrepart ($n) did not stop on SIGINT within 15 s" >>"$PROBLEMS"
      wait "${HR_PID[$n]}" 2>/dev/null
    fi
  done
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
for n in $PG_NODES; do
  free_port "PG_PORT[$n]" || die "no free port"
done
free_port "HR_PORT[sharded]" || die "no free port"
free_port "HR_PORT[single]" || die "no free port"
log "ports: shard0 ${PG_PORT[shard0]}, shard1 ${PG_PORT[shard1]}, single ${PG_PORT[single]}, hotrepart sharded ${HR_PORT[sharded]}, single ${HR_PORT[single]}; temp dir $WORK"

printf '%s\n' "$PG_PASSWORD" >"$WORK/pwfile"
[ "$IS_ROOT" = 1 ] && chown postgres:postgres "$WORK/pwfile"
chmod 600 "$WORK/pwfile"
PG_MAXCONN=200
export PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=30
for n in $PG_NODES; do
  as_pg "$PG_BIN/initdb" -D "$WORK/$n" -N -U postgres -E UTF8 --locale=C \
    --auth=scram-sha-256 --pwfile="$WORK/pwfile" >"$WORK/initdb-$n.log" 2>&1 ||
    { cat "$WORK/initdb-$n.log" >&2; die "initdb ($n) failed"; }
  opts="-p ${PG_PORT[$n]} -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=$PG_MAXCONN -c max_prepared_transactions=100"
  opts="$opts -c shared_buffers=$SHARED_BUFFERS -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  PG_STARTED="$PG_STARTED $n"
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/$n" -l "$WORK/postgres-$n.log" -w -t 120 -o "$opts" start >/dev/null ||
    { tail -20 "$WORK/postgres-$n.log" >&2; die "PostgreSQL ($n) did not start"; }
  wait_port "${PG_PORT[$n]}" 30 || die "PostgreSQL ($n) not listening on ${PG_PORT[$n]}"
done
PG_VERSION=$("$PG_BIN/postgres" --version | awk '{print $3}')
log "PostgreSQL $PG_VERSION up x3 (fsync=off, shared_buffers=$SHARED_BUFFERS)"

# q NODE SQL: one value (or rows) from a server, directly; bounded.
q() { timeout 600 "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${PG_PORT[$1]}" -U postgres -d postgres -c "$2"; }
# qhr NODE SQL: the same through a hotrepart node (sharded|single).
qhr() { timeout 600 "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${HR_PORT[$1]}" -U bench -d postgres -c "$2"; }

# ---------------------------------------------------------------- load
ROWS=$((100000 * SCALE))
for n in $PG_NODES; do
  log "pgbench -i -s $SCALE on $n"
  timeout 1200 "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "${PG_PORT[$n]}" -U postgres postgres \
    >"$WORK/init-$n.log" 2>&1 || { tail -20 "$WORK/init-$n.log" >&2; die "pgbench -i on $n failed"; }
done
# Ownership, as PostgreSQL computes it: the point is hashint4extended(aid, 0)
# read as unsigned 64-bit; 2 equal ranges: shard0 [0, 2^63) = hash >= 0.
OWN_shard0="hashint4extended(aid, $SEED) >= 0"
OWN_shard1="hashint4extended(aid, $SEED) < 0"
log "deleting rows each shard does not own; pgbench_branches/tellers only on shard0 (home)"
q shard0 "DELETE FROM pgbench_accounts WHERE NOT ($OWN_shard0); TRUNCATE pgbench_history" >/dev/null
q shard1 "DELETE FROM pgbench_accounts WHERE NOT ($OWN_shard1); TRUNCATE pgbench_history; DROP TABLE pgbench_branches, pgbench_tellers" >/dev/null
for n in $PG_NODES; do
  q "$n" "VACUUM ANALYZE" >/dev/null
done

CHECKS=$WORK/checks.txt
: >"$CHECKS"
CHECK_OK=1
check() { # check OK|FAIL TEXT
  echo "$1: $2" | tee -a "$CHECKS" >&2
  if [ "$1" != PASS ]; then
    CHECK_OK=0
    echo "check failed: $2" >>"$PROBLEMS"
  fi
}
N0=$(q shard0 "SELECT count(*) FROM pgbench_accounts")
N1=$(q shard1 "SELECT count(*) FROM pgbench_accounts")
W0=$(q shard0 "SELECT count(*) FROM pgbench_accounts WHERE NOT ($OWN_shard0)")
W1=$(q shard1 "SELECT count(*) FROM pgbench_accounts WHERE NOT ($OWN_shard1)")
NS=$(q single "SELECT count(*) FROM pgbench_accounts")
r=PASS; [ $((N0 + N1)) = "$ROWS" ] && [ "$N0" -gt 0 ] && [ "$N1" -gt 0 ] || r=FAIL
check $r "after load: pgbench_accounts shard0 $N0 + shard1 $N1 = $((N0 + N1)) rows (expected $ROWS)"
r=PASS; [ "$W0" = 0 ] && [ "$W1" = 0 ] || r=FAIL
check $r "after load: rows a shard does not own: shard0 $W0, shard1 $W1 (expected 0, 0)"
r=PASS; [ "$NS" = "$ROWS" ] || r=FAIL
check $r "after load: single-shard baseline holds $NS rows (expected $ROWS)"

# ---------------------------------------------------------------- hotrepart
write_hr_config() { # NAME SHARDS...
  local name=$1 s
  shift
  {
    echo "listen = \"127.0.0.1:${HR_PORT[$name]}\""
    echo "pool_mode = \"transaction\""
    echo "pool_size = $POOL_SIZE"
    echo "pool_timeout_ms = $POOL_TIMEOUT_MS"
    echo "max_client_connections = 5000"
    if [ "$name" = sharded ]; then
      echo "home_shard = \"shard0\""
      echo
      echo "[[sharded_tables]]"
      echo "name = \"pgbench_accounts\""
      echo "key = \"aid\""
      echo "type = \"int4\""
      echo "seed = $SEED"
      echo
      echo "[[sharded_tables]]"
      echo "name = \"pgbench_history\""
      echo "key = \"aid\""
      echo "type = \"int4\""
      echo "seed = $SEED"
    fi
    for s in "$@"; do
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
  } >"$WORK/hotrepart-$name.toml"
}
write_hr_config sharded shard0 shard1
write_hr_config single single
start_hotrepart() { # sharded|single
  local n=$1
  HR_STARTS[$n]=$((HR_STARTS[$n] + 1))
  HOTREPART_LOG=${HOTREPART_LOG:-warn} "$HR_BIN" serve --config "$WORK/hotrepart-$n.toml" \
    >>"$WORK/hotrepart-$n.log" 2>&1 &
  HR_PID[$n]=$!
  wait_port "${HR_PORT[$n]}" 30 "${HR_PID[$n]}" || { tail -20 "$WORK/hotrepart-$n.log" >&2; die "hotrepart ($n) did not start"; }
}
start_hotrepart sharded
start_hotrepart single
log "hotrepart up: sharded (pid ${HR_PID[sharded]}, shard0+shard1), single (pid ${HR_PID[single]})"

# Routing check: rows of both shards are found through the sharded node by
# point lookup (the aids are sampled on each shard directly), and a keyless
# read is answered from both shards.
for n in shard0 shard1; do
  q "$n" "SELECT aid FROM pgbench_accounts ORDER BY random() LIMIT $LOOKUPS" >"$WORK/sample-$n.txt"
  sed 's/.*/SELECT aid FROM pgbench_accounts WHERE aid = &;/' "$WORK/sample-$n.txt" >"$WORK/lookup-$n.sql"
  set +e
  timeout 300 "$PSQL" -X -q -At -h 127.0.0.1 -p "${HR_PORT[sharded]}" -U bench -d postgres \
    -f "$WORK/lookup-$n.sql" >"$WORK/lookup-$n.out" 2>"$WORK/lookup-$n.err"
  set -e
  found=$(sort -u "$WORK/lookup-$n.out" | comm -12 - <(sort -u "$WORK/sample-$n.txt") | wc -l)
  errs=$(grep -c ERROR "$WORK/lookup-$n.err" || true)
  r=PASS; [ "$found" = "$LOOKUPS" ] && [ "$errs" = 0 ] || r=FAIL
  check $r "routing: $found of $LOOKUPS aids sampled on $n found by point lookup through the sharded node, $errs errors$( [ "$errs" = 0 ] || echo "; first: $(grep -m1 ERROR "$WORK/lookup-$n.err")")"
done
set +e
kl=$(qhr sharded "SELECT aid FROM pgbench_accounts WHERE aid <= 1000" 2>"$WORK/keyless.err" | sort -n | uniq | wc -l)
set -e
r=PASS; [ "$kl" = 1000 ] || r=FAIL
check $r "routing: keyless read (aid <= 1000) through the sharded node returned $kl distinct rows (expected 1000)$( [ -s "$WORK/keyless.err" ] && echo "; $(head -1 "$WORK/keyless.err")")"
[ "$CHECK_OK" = 1 ] || die "load/routing checks failed (see above); not benchmarking"

# ---------------------------------------------------------------- pgbench
RAW=$WORK/raw.tsv
: >"$RAW"
RUN_NO=0

# threads_for MODE CLIENTS: pgbench -j for a run.
threads_for() {
  local j=$THREADS
  if [ "$1" = prepared ]; then
    j=$PREPARED_THREADS
    [ "$j" = clients ] && j=$2
  fi
  [ "$j" -gt "$2" ] && j=$2
  echo "$j"
}

# run_pgbench NODE MODE CLIENTS DURATION OUTFILE [extra pgbench args...]
# Sets: R_RC R_TPS R_NTX R_FAILED R_CPU R_ERR R_ABORTED R_THREADS
run_pgbench() {
  local node=$1 mode=$2 clients=$3 dur=$4 out=$5
  shift 5
  local pid c0 c1
  R_THREADS=$(threads_for "$mode" "$clients")
  if ! kill -0 "${HR_PID[$node]}" 2>/dev/null; then
    echo "hotrepart ($node, pid ${HR_PID[$node]}) was not running before a $mode/$clients run; restarted it" >>"$PROBLEMS"
    start_hotrepart "$node"
  fi
  pid=${HR_PID[$node]}
  c0=$(cpu_ticks "$pid")
  set +e
  timeout --kill-after=10 $((dur + 240)) "$PGBENCH" -h 127.0.0.1 -p "${HR_PORT[$node]}" \
    -U bench -n -M "$mode" -c "$clients" -j "$R_THREADS" -T "$dur" "$@" postgres \
    >"$out" 2>&1
  R_RC=$?
  set -e
  c1=$(cpu_ticks "$pid")
  R_CPU=-1
  [ "$c0" -ge 0 ] && [ "$c1" -ge 0 ] && R_CPU=$((c1 - c0))
  R_TPS=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | head -1)
  R_NTX=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -1)
  R_FAILED=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -1)
  R_ABORTED=$(grep -c 'aborted in command' "$out" || true)
  grep -q '^pgbench: error: Run was aborted' "$out" && [ "$R_ABORTED" = 0 ] && R_ABORTED="?"
  R_ERR=$(grep -m1 -E 'error|ERROR|FATAL|abort' "$out" | cut -c1-240 || true)
  [ "$R_RC" = 124 ] && R_ERR="pgbench timed out after $((dur + 240)) s; $R_ERR"
  if [ "$R_RC" = 0 ] && { [ -z "$R_TPS" ] || [ "${R_NTX:-0}" = 0 ]; }; then
    R_RC=100
    R_ERR="pgbench exited 0 but processed no transactions"
  fi
  if ! kill -0 "${HR_PID[$node]}" 2>/dev/null; then
    echo "hotrepart ($node, pid ${HR_PID[$node]}) died during a $mode/$clients run (see log)" >>"$PROBLEMS"
  fi
  return 0
}

NODES=(sharded single)
n_w=$(wc -w <<<"$WORKLOADS")
n_m=$(wc -w <<<"$MODES")
n_c=$(wc -w <<<"$CLIENTS")
TOTAL_RUNS=$((n_w * n_m * n_c * REPEAT * 2))
BENCH_OK=1
log "pgbench: workloads [$WORKLOADS] x modes [$MODES] x clients [$CLIENTS] x $REPEAT repeats x 2 nodes = $TOTAL_RUNS runs of ${DURATION} s"
for wl in $WORKLOADS; do
  case $wl in select-only) wflag=-S ;; simple-update) wflag=-N ;; esac
  for mode in $MODES; do
    for clients in $CLIENTS; do
      for rep in $(seq 1 "$REPEAT"); do
        off=$(((rep - 1) % 2))
        for k in 0 1; do
          node=${NODES[$(((k + off) % 2))]}
          RUN_NO=$((RUN_NO + 1))
          out=$WORK/run-$wl-$mode-$clients-$node-$rep.log
          run_pgbench "$node" "$mode" "$clients" "$DURATION" "$out" "$wflag"
          printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$mode" "$clients" "$node" "$rep" \
            "$R_RC" "${R_TPS:-}" "${R_NTX:-}" "$R_CPU" "${R_FAILED:-}" "$R_ABORTED" "${R_ERR:-}" >>"$RAW"
          status="tps ${R_TPS:-?}, failed tx ${R_FAILED:-?}"
          if [ "$R_RC" != 0 ] || [ "${R_FAILED:-x}" != 0 ]; then
            BENCH_OK=0
            status="FAILED (exit $R_RC, failed tx ${R_FAILED:-?}, aborted clients $R_ABORTED): ${R_ERR:-no error line}"
            echo "$node $wl -M $mode -c $clients #$rep: exit $R_RC, failed transactions ${R_FAILED:-?}, aborted clients $R_ABORTED: $R_ERR" >>"$PROBLEMS"
          fi
          log "[$RUN_NO/$TOTAL_RUNS] $wl -M $mode -c $clients -j $R_THREADS $node #$rep: $status"
          sleep 1
        done
      done
    done
  done
done

# ---------------------------------------------------------------- TPC-B-like
# 1) pgbench's default script through the sharded node, 10 clients.
log "TPC-B-like (pgbench default script) through the sharded node, 10 clients, ${TPCB_DURATION} s (two-phase commit when the account is on shard1)"
run_pgbench sharded simple 10 "$TPCB_DURATION" "$WORK/tpcb-pgbench.log"
TPCB_PGBENCH="exit $R_RC, transactions processed ${R_NTX:-?}, number of failed transactions ${R_FAILED:-?}, clients aborted $R_ABORTED of 10, tps ${R_TPS:-?}"
TPCB_PGBENCH_ERR=$(grep -m1 'aborted in command' "$WORK/tpcb-pgbench.log" | cut -c1-300 || true)
log "tpcb-like pgbench: $TPCB_PGBENCH"
# 2) The same transaction TPCB_TX times with psql (which, unlike pgbench,
#    goes on after an error), to count outcomes exactly: every transaction
#    commits, those whose aid is on shard1 by two-phase commit (they write
#    shard1 and the home shard, shard0).
log "TPC-B-like: $TPCB_TX transactions with psql through the sharded node"
awk -v n="$TPCB_TX" -v rows="$ROWS" -v scale="$SCALE" 'BEGIN {
  srand(42)
  for (i = 0; i < n; i++) {
    aid = 1 + int(rand() * rows); bid = 1 + int(rand() * scale)
    tid = 1 + int(rand() * 10 * scale); d = int(rand() * 10001) - 5000
    print "BEGIN;"
    printf "UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d;\n", d, aid
    printf "SELECT abalance FROM pgbench_accounts WHERE aid = %d;\n", aid
    printf "UPDATE pgbench_tellers SET tbalance = tbalance + %d WHERE tid = %d;\n", d, tid
    printf "UPDATE pgbench_branches SET bbalance = bbalance + %d WHERE bid = %d;\n", d, bid
    printf "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (%d, %d, %d, %d, CURRENT_TIMESTAMP);\n", tid, bid, aid, d
    print "END;"
    print aid > "/dev/stderr"
  }
}' >"$WORK/tpcb.sql" 2>"$WORK/tpcb-aids.txt"
EXPECT_REFUSED=$(q shard0 "SELECT count(*) FROM unnest('{$(paste -sd, "$WORK/tpcb-aids.txt")}'::int[]) AS t(aid) WHERE NOT ($OWN_shard0)")
set +e
timeout 600 "$PSQL" -X -At -v VERBOSITY=verbose -h 127.0.0.1 -p "${HR_PORT[sharded]}" -U bench -d postgres \
  -f "$WORK/tpcb.sql" >"$WORK/tpcb-psql.out" 2>"$WORK/tpcb-psql.err"
TPCB_PSQL_RC=$?
set -e
T_COMMIT=$(grep -cx COMMIT "$WORK/tpcb-psql.out" || true)
T_ROLLBACK=$(grep -cx ROLLBACK "$WORK/tpcb-psql.out" || true)
T_0A000=$(grep -c 'ERROR:  0A000' "$WORK/tpcb-psql.err" || true)
T_25P02=$(grep -c 'ERROR:  25P02' "$WORK/tpcb-psql.err" || true)
T_OTHER=$(grep 'ERROR:' "$WORK/tpcb-psql.err" | grep -vc -e 'ERROR:  0A000' -e 'ERROR:  25P02' || true)
TPCB_MSG=$(grep -m1 'ERROR:  0A000' "$WORK/tpcb-psql.err" | cut -c1-300 || true)
TPCB_PSQL="$TPCB_TX transactions: $T_COMMIT COMMIT, $T_ROLLBACK ROLLBACK; aids on shard1 (two-shard transactions, two-phase commit): $EXPECT_REFUSED; errors: $T_0A000 x 0A000, $T_25P02 x 25P02 (statements after the refusal), $T_OTHER other; psql exit $TPCB_PSQL_RC"
r=PASS
{ [ "$T_COMMIT" = "$TPCB_TX" ] && [ "$T_ROLLBACK" = 0 ] && [ "$T_0A000" = 0 ] && [ "$T_OTHER" = 0 ]; } || r=FAIL
check $r "tpcb-like via psql: $TPCB_PSQL"

# ---------------------------------------------------------------- consistency
# Each transaction adds delta to one account and inserts one history row
# with that delta on the same shard (failed ones roll back both), and
# abalance starts at 0: per shard, sum(abalance) = sum(delta).
for n in shard0 shard1 single; do
  own=""
  [ "$n" != single ] && own="OWN_$n" && own=${!own}
  a=$(q "$n" "SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts")
  h=$(q "$n" "SELECT coalesce(sum(delta), 0) || ' ' || count(*) FROM pgbench_history")
  wh=0
  [ -n "$own" ] && wh=$(q "$n" "SELECT count(*) FROM pgbench_history WHERE NOT ($own)")
  idle=$(q "$n" "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'")
  r=PASS; { [ "$a" = "${h% *}" ] && [ "$wh" = 0 ] && [ "$idle" = 0 ]; } || r=FAIL
  check $r "after the runs, $n: sum(abalance) $a, sum(history.delta) ${h% *} over ${h#* } history rows, history rows not owned $wh, backends idle in transaction $idle"
done
tb=$(q shard0 "SELECT (SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || (SELECT sum(bbalance) FROM pgbench_branches)")
r=PASS; [ "${tb% *}" = "${tb#* }" ] || r=FAIL
check $r "after the runs, shard0: sum(tbalance) ${tb% *} = sum(bbalance) ${tb#* }"

# ---------------------------------------------------------------- report
# agg WL MODE CLIENTS NODE -> "median_tps|median_cpu_us|ok_runs|runs|failed_tx_sum|aborted_clients_sum"
agg() {
  awk -F'\t' -v w="$1" -v m="$2" -v c="$3" -v t="$4" -v hz="$CLK_TCK" '
    function median(a, n,   i, j, x) {
      for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j+1] = a[j]; a[j+1] = x }
      if (n == 0) return ""
      return (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
    }
    $1 == w && $2 == m && $3 == c && $4 == t {
      runs++; f += ($10 == "" ? 0 : $10); ab += ($11 ~ /^[0-9]+$/ ? $11 : 0)
      if ($6 == 0 && $7 != "") { nt++; tps[nt] = $7
        if ($9 >= 0 && $8 > 0) { nc++; cpu[nc] = ($9 / hz) * 1e6 / $8 } }
    }
    END { printf "%s|%s|%d|%d|%d|%d\n", median(tps, nt), median(cpu, nc), nt, runs, f, ab }' "$RAW"
}
fmt_tps() { [ -z "$1" ] && echo "" || awk -v x="$1" 'BEGIN{printf "%.0f", x}'; }
fmt_ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
fmt_cpu() { awk -v x="$1" 'BEGIN{ if (x == "") print "n/a"; else printf "%.1f", x }'; }
cell_failed() { # FAILED_TX ABORTED_CLIENTS OK RUNS
  local c=$1
  [ "$2" != 0 ] && c="$c (+$2 clients aborted)"
  [ "$3" != "$4" ] && [ "$2" = 0 ] && c="$c (+$(($4 - $3)) runs failed)"
  echo "$c"
}
cell_tps() {
  if [ "$2" = 0 ]; then echo "n/a (fails)"
  elif [ "$2" != "$3" ]; then echo "$(fmt_tps "$1") ($(($3 - $2))/$3 runs failed)"
  else fmt_tps "$1"; fi
}

mkdir -p "$OUT_DIR"
STAMP=$(date +%Y%m%d-%H%M%S)
REPORT=$OUT_DIR/sharded-pgbench-$STAMP.md
ELAPSED=$(($(date +%s) - T0))
{
  echo "# Sharded pgbench through hotrepart: 2 shards vs 1 shard"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); hotrepart $HR_BIN_FROM (binary sha256 $HR_BIN_SHA…)"
  echo "- machine: $(nproc) cores ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)), $(free -g | awk '/^Mem:/{print $2}') GiB; all PostgreSQL servers, both hotrepart nodes and pgbench share these cores (the two shards cannot be faster than one here)"
  echo "- PostgreSQL $PG_VERSION x3 (shard0, shard1; a separate 'single' server for the baseline), fsync=off, synchronous_commit=off, full_page_writes=off, shared_buffers=$SHARED_BUFFERS, scram-sha-256 on loopback; hotrepart pool_mode=transaction, pool_size=$POOL_SIZE per shard, client auth trust, SCRAM to PostgreSQL"
  echo "- sharded layout: pgbench_accounts and pgbench_history sharded by aid (int4, seed $SEED; 2 equal ranges: shard0 = hashint4extended(aid, 0) >= 0, shard1 = < 0), pgbench_branches/pgbench_tellers on the home shard shard0 (dropped on shard1); scale $SCALE: shard0 $N0 accounts, shard1 $N1"
  echo "- pgbench -n -T $DURATION per run, -j $THREADS (-M prepared: -j $PREPARED_THREADS), $REPEAT runs per point, sharded and single-shard runs interleaved per point (order rotated per repeat); TPS = median over runs (without initial connection time); CPU µs/tx = the hotrepart process's utime+stime over the run / transactions"
  echo "- select-only = pgbench -S; simple-update = pgbench -N (BEGIN; UPDATE accounts; SELECT accounts; INSERT history; END — all by aid, one shard per transaction)"
  echo "- total wall time: ${ELAPSED} s; load average at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "| workload | mode | clients | -j | single-shard TPS | 2-shard TPS | 2-shard/single | failed tx single | failed tx 2-shard | CPU µs/tx single | CPU µs/tx 2-shard |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for wl in $WORKLOADS; do
    for mode in $MODES; do
      for clients in $CLIENTS; do
        IFS='|' read -r s_tps s_cpu s_ok s_runs s_f s_ab <<<"$(agg "$wl" "$mode" "$clients" single)"
        IFS='|' read -r m_tps m_cpu m_ok m_runs m_f m_ab <<<"$(agg "$wl" "$mode" "$clients" sharded)"
        echo "| $wl | $mode | $clients | $(threads_for "$mode" "$clients") | $(cell_tps "$s_tps" "$s_ok" "$s_runs") | $(cell_tps "$m_tps" "$m_ok" "$m_runs") | $(fmt_ratio "$m_tps" "$s_tps") | $(cell_failed "$s_f" "$s_ab" "$s_ok" "$s_runs") | $(cell_failed "$m_f" "$m_ab" "$m_ok" "$m_runs") | $(fmt_cpu "$s_cpu") | $(fmt_cpu "$m_cpu") |"
      done
    done
  done
  echo
  echo "Failed tx: sum of pgbench's \"number of failed transactions\" over the runs of the point (plus clients pgbench aborted on an error, which it does not count as failed transactions). -j: pgbench threads (-M prepared: PREPARED_THREADS=$PREPARED_THREADS)."
  failures=$(awk -F'\t' '$6 != 0 || $10 != 0 { printf "- %s %s -M %s -c %s run %s: exit %s, failed tx %s, aborted clients %s: %s\n", $4, $1, $2, $3, $5, $6, $10, $11, $12 }' "$RAW")
  if [ -n "$failures" ]; then
    echo
    echo "Failed runs:"
    echo
    echo "$failures"
  fi
  echo
  echo "TPC-B-like (default script) through the 2-shard node — a transaction whose account is on shard1 writes shard1 and shard0 (tellers, branches: home shard) and commits by two-phase commit (max_prepared_transactions = 100 on the shards):"
  echo
  echo "- pgbench, 10 clients, ${TPCB_DURATION} s: $TPCB_PGBENCH (pgbench aborts a client on a non-retryable error)"
  [ -n "$TPCB_PGBENCH_ERR" ] && echo "  - first: \`$TPCB_PGBENCH_ERR\`"
  echo "- psql, one client: $TPCB_PSQL"
  [ -n "$TPCB_MSG" ] && echo "  - refusal: \`$TPCB_MSG\`"
  echo
  echo "Checks:"
  echo
  sed 's/^/- /' "$CHECKS"
  for n in sharded single; do
    hr_issues=$(grep -cE ' (WARN|ERROR) ' "$WORK/hotrepart-$n.log" 2>/dev/null || true)
    echo
    echo "hotrepart ($n): started ${HR_STARTS[$n]} time(s); ${hr_issues:-0} WARN/ERROR log lines (HOTREPART_LOG=${HOTREPART_LOG:-warn})."
    if [ "${hr_issues:-0}" != 0 ]; then
      echo
      echo '```'
      grep -E ' (WARN|ERROR) ' "$WORK/hotrepart-$n.log" | sed 's/\x1b\[[0-9;]*m//g' | head -20
      echo '```'
    fi
  done
  if [ -s "$PROBLEMS" ]; then
    echo
    echo "Problems:"
    echo
    sed 's/^/- /' "$PROBLEMS"
  fi
  echo
  echo "Raw runs (workload, mode, clients, node, repeat, exit, tps, transactions, hotrepart CPU ticks, failed tx, aborted clients, first error): ${OUT_DIR#"$ROOT"/}/sharded-pgbench-$STAMP.tsv"
} >"$REPORT"
cp "$RAW" "$OUT_DIR/sharded-pgbench-$STAMP.tsv"
cat "$REPORT"
log "report written to $REPORT"
[ "$BENCH_OK" = 1 ] || { log "some pgbench run failed or had failed transactions"; exit 1; }
[ "$CHECK_OK" = 1 ] || { log "a correctness check FAILED"; exit 1; }
exit 0
