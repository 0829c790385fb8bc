#!/usr/bin/env bash
# One-command benchmark: direct PostgreSQL vs PgBouncer vs hotrepart, with
# pgbench, transaction pooling, the same pool size for both proxies.
#
#   bench/pgbench.sh                      # defaults: 10 s per point, 2 repeats
#   DURATION=3 REPEAT=1 bench/pgbench.sh  # quick run
#
# What it does (see bench/README.md):
#   1. installs what is missing (deploy/setup.sh --bench: PostgreSQL, pgbench,
#      PgBouncer) and builds target/release/hotrepart;
#   2. starts, on free 127.0.0.1 ports under a temp dir, one PostgreSQL
#      (scram-sha-256, fsync=off), one PgBouncer (transaction mode, trust
#      for clients) and one hotrepart node (transaction mode, trust for
#      clients), PostgreSQL and PgBouncer as the `postgres` user when run as
#      root; everything is stopped at exit, also on failure;
#   3. pgbench -i -s SCALE, then a correctness sanity: the TPC-B-like script
#      through hotrepart with -M simple/extended/prepared must have 0 failed
#      transactions;
#   4. pgbench -S for each mode x clients, the three targets interleaved per
#      point, REPEAT times; median TPS, proxies' CPU time per transaction;
#   5. prints a markdown table and writes it to bench/out/pgbench-<date>.md.
#
# Environment knobs (defaults in brackets):
#   DURATION [10]  seconds per pgbench -S run      REPEAT [2]   runs per point
#   CLIENTS ["10 100 1000"]  MODES ["simple extended prepared"]
#   SCALE [10]  POOL_SIZE [20]  THREADS [2]  SANITY_DURATION [5]
#   HOTREPART_BIN [build target/release/hotrepart]  KEEP [0: delete temp dir]
#   BASELINE_BIN [none]: a second hotrepart binary (e.g. built from an older
#     commit) run as a fourth target "baseline" beside the others, same
#     config, interleaved per point: before/after comparisons in one run
#   SKIP_SETUP [0]  OUT_DIR [bench/out]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-10}
REPEAT=${REPEAT:-2}
CLIENTS=${CLIENTS:-"10 100 1000"}
MODES=${MODES:-"simple extended prepared"}
SCALE=${SCALE:-10}
POOL_SIZE=${POOL_SIZE:-20}
THREADS=${THREADS:-2}
SANITY_DURATION=${SANITY_DURATION:-5}
KEEP=${KEEP:-0}
OUT_DIR=${OUT_DIR:-$ROOT/bench/out}
PG_PASSWORD=${PG_PASSWORD:-benchpw}

T0=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log() { printf '[%4ds] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for v in DURATION REPEAT SCALE POOL_SIZE THREADS SANITY_DURATION; do
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

# ---------------------------------------------------------------- install
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  log "checking/installing PostgreSQL, pgbench, PgBouncer (deploy/setup.sh --bench)"
  "$ROOT/deploy/setup.sh" --bench
fi
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PG_BIN/initdb" ] || die "no PostgreSQL server binaries (looked in /usr/lib/postgresql/*/bin)"
PGBENCH=$PG_BIN/pgbench
[ -x "$PGBENCH" ] || PGBENCH=$(command -v pgbench) || die "pgbench not found"
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$PGBOUNCER" ] || die "pgbouncer not found"

GIT_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(cd "$ROOT" && git status --porcelain 2>/dev/null | grep -qv '^??' && echo "+uncommitted changes" || true)
if [ -n "${HOTREPART_BIN:-}" ]; then
  HR_BIN=$HOTREPART_BIN
  HR_BIN_FROM="HOTREPART_BIN=$HOTREPART_BIN, built $(date -u -r "$HR_BIN" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo '?'); repo at $GIT_REV$GIT_DIRTY"
else
  HR_BIN_FROM="built from $GIT_REV$GIT_DIRTY"
  log "building hotrepart (cargo build --release)"
  (cd "$ROOT" && cargo build --release -p hotrepart-proxy --bin hotrepart) >&2
  HR_BIN=$ROOT/target/release/hotrepart
fi
[ -x "$HR_BIN" ] || die "hotrepart binary $HR_BIN missing"
BASE_BIN=${BASELINE_BIN:-}
[ -z "$BASE_BIN" ] || [ -x "$BASE_BIN" ] || die "baseline binary $BASE_BIN missing"

# Enough file descriptors for MAX_CLIENTS pgbench connections (and the
# proxies, which inherit the limit).
need_fd=$((MAX_CLIENTS * 2 + 200))
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$need_fd" ] ||
  die "ulimit -n is $(ulimit -n), need >= $need_fd for $MAX_CLIENTS clients"

CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- helpers
IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
# PostgreSQL and PgBouncer refuse (or should not) run as root. runuser's PAM
# session resets the soft open-files limit (to 1024 here), too few for
# PgBouncer with 1,000 clients: raise it again inside.
FD_LIMIT=$(ulimit -n)
as_pg() {
  if [ "$IS_ROOT" = 1 ]; then
    runuser -u postgres -- bash -c 'ulimit -n "$0" 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$@"' "$FD_LIMIT" "$@"
  else
    "$@"
  fi
}

port_in_use() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
# Ports are picked below the kernel's ephemeral range, so that the client
# side of the benchmark's own connections cannot take them first.
EPH_LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
PORT_LO=10000 PORT_HI=$EPH_LOW
[ "$EPH_LOW" -gt 12000 ] || { PORT_LO=61000; PORT_HI=65000; }
USED_PORTS=" "
# free_port VAR: sets VAR to a port nothing listens on.
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
# wait_port PORT SECONDS [PID]: until something accepts on 127.0.0.1:PORT.
wait_port() {
  local deadline=$(($(date +%s) + $2))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    port_in_use "$1" && return 0
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
    sleep 0.2
  done
  return 1
}
# perf stat with the syscall tracepoint works here (root or
# perf_event_paranoid low enough)? Then syscalls and context switches per
# transaction are measured too.
PERF_OK=0
if command -v perf >/dev/null 2>&1 \
  && perf stat -x, -e raw_syscalls:sys_enter,context-switches -- true 2>&1 | grep -q '^[0-9]*,,raw_syscalls'; then
  PERF_OK=1
fi
# cpu_ticks PID: utime+stime of the process (all threads), in clock ticks.
cpu_ticks() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo -1; return; }
  s=${s##*) }                 # drop "pid (comm) "; field 3 (state) is $1
  awk '{print $12 + $13}' <<<"$s"
}
# sys_ticks PID: stime alone (time in the kernel: syscalls, the loopback
# TCP stack run on the sender's CPU, wake-ups).
sys_ticks() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo -1; return; }
  s=${s##*) }
  awk '{print $13}' <<<"$s"
}
# stop_pid PID SIGNAL SECONDS: signal, wait up to SECONDS, then SIGKILL.
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
WORK=$(mktemp -d /tmp/hrbench.XXXXXX)
chmod 755 "$WORK"
[ "$IS_ROOT" = 1 ] && chown postgres:postgres "$WORK"
# A private copy, so a rebuild of the shared target dir during the run
# changes nothing.
cp "$HR_BIN" "$WORK/hotrepart"
HR_BIN_SHA=$(sha256sum "$WORK/hotrepart" | cut -c1-12)
HR_BIN=$WORK/hotrepart
if [ -n "$BASE_BIN" ]; then
  cp "$BASE_BIN" "$WORK/baseline"
  BASE_BIN_SHA=$(sha256sum "$WORK/baseline" | cut -c1-12)
  BASE_BIN_FROM="BASELINE_BIN=$BASELINE_BIN, built $(date -u -r "$BASELINE_BIN" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo '?')"
  BASE_BIN=$WORK/baseline
fi
BASE_PID=""
PG_STARTED=0
BOUNCER_PID=""
HR_PID=""
HR_STOP_NOTE=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$HR_PID" ] && kill -0 "$HR_PID" 2>/dev/null; then
    stop_pid "$HR_PID" INT 15 || echo "hotrepart did not stop on SIGINT within 15 s" >>"$WORK/problems"
    wait "$HR_PID" 2>/dev/null
  fi
  if [ -n "$BASE_PID" ] && kill -0 "$BASE_PID" 2>/dev/null; then
    stop_pid "$BASE_PID" INT 15 || echo "baseline did not stop on SIGINT within 15 s" >>"$WORK/problems"
    wait "$BASE_PID" 2>/dev/null
  fi
  [ -n "$BOUNCER_PID" ] && stop_pid "$BOUNCER_PID" TERM 10
  if [ "$PG_STARTED" = 1 ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -m fast -w -t 30 stop >/dev/null 2>&1 ||
      as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -m immediate -w -t 30 stop >/dev/null 2>&1
  fi
  if [ -s "$WORK/problems" ]; then
    log "problems seen during shutdown:"
    cat "$WORK/problems" >&2
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
free_port PG_PORT || die "no free port"
free_port BOUNCER_PORT || die "no free port"
free_port HR_PORT || die "no free port"
BASE_PORT=""
[ -n "$BASE_BIN" ] && { free_port BASE_PORT || die "no free port"; }
log "ports: postgres $PG_PORT, pgbouncer $BOUNCER_PORT, hotrepart $HR_PORT; temp dir $WORK"

printf '%s\n' "$PG_PASSWORD" >"$WORK/pwfile"
[ "$IS_ROOT" = 1 ] && chown postgres:postgres "$WORK/pwfile"
chmod 600 "$WORK/pwfile"
as_pg "$PG_BIN/initdb" -D "$WORK/pg" -N -U postgres -E UTF8 --locale=C \
  --auth=scram-sha-256 --pwfile="$WORK/pwfile" >"$WORK/initdb.log" 2>&1 ||
  { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
PG_MAXCONN=$((MAX_CLIENTS + 100))
[ "$PG_MAXCONN" -lt 1100 ] && PG_MAXCONN=1100
PG_OPTS="-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=$PG_MAXCONN"
PG_OPTS="$PG_OPTS -c shared_buffers=512MB -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
PG_STARTED=1
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/postgres.log" -w -t 120 -o "$PG_OPTS" start >/dev/null ||
  { tail -20 "$WORK/postgres.log" >&2; die "PostgreSQL did not start"; }
wait_port "$PG_PORT" 30 || die "PostgreSQL not listening on $PG_PORT"
export PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=30
PG_VERSION=$("$PG_BIN/postgres" --version | awk '{print $3}')
log "PostgreSQL $PG_VERSION up (max_connections=$PG_MAXCONN, fsync=off); pgbench -i -s $SCALE"
timeout 1200 "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres \
  >"$WORK/init.log" 2>&1 || { tail -20 "$WORK/init.log" >&2; die "pgbench -i failed"; }

# ---------------------------------------------------------------- PgBouncer
cat >"$WORK/userlist.txt" <<EOF
"bench" ""
EOF
cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres user=postgres password=$PG_PASSWORD

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = $((MAX_CLIENTS + 100))
max_db_connections = 0
server_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
EOF
[ "$IS_ROOT" = 1 ] && chown postgres:postgres "$WORK/userlist.txt" "$WORK/pgbouncer.ini"
as_pg "$PGBOUNCER" -d "$WORK/pgbouncer.ini" >"$WORK/pgbouncer.out" 2>&1 ||
  { cat "$WORK/pgbouncer.out" "$WORK/pgbouncer.log" >&2 2>/dev/null; die "PgBouncer did not start"; }
for _ in $(seq 1 100); do
  [ -s "$WORK/pgbouncer.pid" ] && break
  grep -q FATAL "$WORK/pgbouncer.log" 2>/dev/null && break
  sleep 0.1
done
BOUNCER_PID=$(cat "$WORK/pgbouncer.pid" 2>/dev/null || true)
[ -n "$BOUNCER_PID" ] || { cat "$WORK/pgbouncer.log" >&2; die "PgBouncer did not start (no pidfile)"; }
wait_port "$BOUNCER_PORT" 30 "$BOUNCER_PID" ||
  { cat "$WORK/pgbouncer.log" >&2; die "PgBouncer not listening on $BOUNCER_PORT"; }
BOUNCER_VERSION=$("$PGBOUNCER" --version | head -1 | awk '{print $2}')
BOUNCER_NOFILE=$(awk '/^Max open files/{print $4}' "/proc/$BOUNCER_PID/limits")
[ "$BOUNCER_NOFILE" = unlimited ] || [ "$BOUNCER_NOFILE" -ge "$need_fd" ] ||
  die "PgBouncer's open-files limit is $BOUNCER_NOFILE, need >= $need_fd"
log "PgBouncer $BOUNCER_VERSION up (pid $BOUNCER_PID, transaction mode, pool $POOL_SIZE, open files $BOUNCER_NOFILE)"

# ---------------------------------------------------------------- hotrepart
cat >"$WORK/hotrepart.toml" <<EOF
listen = "127.0.0.1:$HR_PORT"
pool_mode = "transaction"
pool_size = $POOL_SIZE
pool_timeout_ms = 60000
max_client_connections = 5000

[[shards]]
name = "s0"
dsn = "postgres://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT/postgres"

[[users]]
name = "bench"
auth = "trust"
server_user = "postgres"
EOF
HR_STARTS=0
start_hotrepart() {
  HR_STARTS=$((HR_STARTS + 1))
  HOTREPART_LOG=${HOTREPART_LOG:-warn} "$HR_BIN" serve --config "$WORK/hotrepart.toml" \
    >>"$WORK/hotrepart.log" 2>&1 &
  HR_PID=$!
  wait_port "$HR_PORT" 30 "$HR_PID" || { tail -20 "$WORK/hotrepart.log" >&2; die "hotrepart did not start"; }
}
start_hotrepart
log "hotrepart up (pid $HR_PID, transaction mode, pool $POOL_SIZE)"
BASE_STARTS=0
start_baseline() {
  BASE_STARTS=$((BASE_STARTS + 1))
  sed "s/^listen = .*/listen = \"127.0.0.1:$BASE_PORT\"/" "$WORK/hotrepart.toml" >"$WORK/baseline.toml"
  HOTREPART_LOG=${HOTREPART_LOG:-warn} "$BASE_BIN" serve --config "$WORK/baseline.toml" \
    >>"$WORK/baseline.log" 2>&1 &
  BASE_PID=$!
  wait_port "$BASE_PORT" 30 "$BASE_PID" || { tail -20 "$WORK/baseline.log" >&2; die "baseline did not start"; }
}
if [ -n "$BASE_BIN" ]; then
  start_baseline
  log "baseline hotrepart up (pid $BASE_PID, port $BASE_PORT)"
fi

# ---------------------------------------------------------------- pgbench
target_port() {
  case $1 in direct) echo "$PG_PORT" ;; pgbouncer) echo "$BOUNCER_PORT" ;; hotrepart) echo "$HR_PORT" ;; baseline) echo "$BASE_PORT" ;; esac
}
target_user() { [ "$1" = direct ] && echo postgres || echo bench; }
target_pid() {
  case $1 in pgbouncer) echo "$BOUNCER_PID" ;; hotrepart) echo "$HR_PID" ;; baseline) echo "$BASE_PID" ;; *) echo "" ;; esac
}

RAW=$WORK/raw.tsv
: >"$RAW"
PROBLEMS=$WORK/problems
: >"$PROBLEMS"
RUN_NO=0

# run_pgbench TARGET MODE CLIENTS DURATION OUTFILE [extra pgbench args...]
# Sets: R_RC R_TPS R_NTX R_FAILED R_CPU (ticks, -1 if not measured) R_ERR
run_pgbench() {
  local target=$1 mode=$2 clients=$3 dur=$4 out=$5
  shift 5
  local pid c0 c1 k0 k1
  pid=$(target_pid "$target")
  if [ "$target" = hotrepart ] && ! kill -0 "$HR_PID" 2>/dev/null; then
    echo "hotrepart (pid $HR_PID) was not running before $mode/$clients; restarted it" >>"$PROBLEMS"
    start_hotrepart
    pid=$HR_PID
  fi
  if [ "$target" = baseline ] && ! kill -0 "$BASE_PID" 2>/dev/null; then
    echo "baseline (pid $BASE_PID) was not running before $mode/$clients; restarted it" >>"$PROBLEMS"
    start_baseline
    pid=$BASE_PID
  fi
  c0=-1
  k0=-1
  [ -n "$pid" ] && { c0=$(cpu_ticks "$pid"); k0=$(sys_ticks "$pid"); }
  # Syscalls and context switches of the proxy over the run (every thread:
  # perf stat -p counts the threads present at its start; the runtime's
  # workers live as long as the process). Counting mode, no recording.
  local perf_pid=""
  R_SYS=-1
  R_CS=-1
  if [ -n "$pid" ] && [ "$PERF_OK" = 1 ]; then
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pid" -o "$out.perf" &
    perf_pid=$!
  fi
  set +e
  timeout --kill-after=10 $((dur + 240)) "$PGBENCH" -h 127.0.0.1 -p "$(target_port "$target")" \
    -U "$(target_user "$target")" -n -M "$mode" -c "$clients" -j "$THREADS" -T "$dur" "$@" postgres \
    >"$out" 2>&1
  R_RC=$?
  set -e
  c1=-1
  k1=-1
  [ -n "$pid" ] && { c1=$(cpu_ticks "$pid"); k1=$(sys_ticks "$pid"); }
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    R_SYS=$(awk -F, '$3 == "raw_syscalls:sys_enter" && $1 ~ /^[0-9]+$/ {print $1}' "$out.perf" 2>/dev/null | head -1)
    R_CS=$(awk -F, '$3 == "context-switches" && $1 ~ /^[0-9]+$/ {print $1}' "$out.perf" 2>/dev/null | head -1)
    R_SYS=${R_SYS:--1}
    R_CS=${R_CS:--1}
  fi
  R_CPU=-1
  [ "$c0" -ge 0 ] && [ "$c1" -ge 0 ] && R_CPU=$((c1 - c0))
  R_KCPU=-1
  [ "$k0" -ge 0 ] && [ "$k1" -ge 0 ] && R_KCPU=$((k1 - k0))
  R_TPS=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | head -1)
  R_NTX=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -1)
  R_FAILED=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -1)
  R_ERR=$(grep -m1 -E 'error|ERROR|FATAL|abort' "$out" | cut -c1-200 || true)
  [ "$R_RC" = 124 ] && R_ERR="pgbench timed out after $((dur + 240)) s; $R_ERR"
  # Exit 0 without a result counts as a failure too (exit 100 is ours).
  if [ "$R_RC" = 0 ] && { [ -z "$R_TPS" ] || [ "${R_NTX:-0}" = 0 ]; }; then
    R_RC=100
    R_ERR="pgbench exited 0 but processed no transactions (did connecting take the whole -T $dur s?)"
  fi
  if [ "$target" = hotrepart ] && ! kill -0 "$HR_PID" 2>/dev/null; then
    echo "hotrepart (pid $HR_PID) died during $mode/$clients run (see log)" >>"$PROBLEMS"
  fi
  return 0
}

SANITY=$WORK/sanity.txt
: >"$SANITY"
SANITY_OK=1
log "sanity: TPC-B-like script through hotrepart, 10 clients, ${SANITY_DURATION} s per mode"
for mode in simple extended prepared; do
  run_pgbench hotrepart "$mode" 10 "$SANITY_DURATION" "$WORK/sanity-$mode.log"
  ok=PASS
  { [ "$R_RC" = 0 ] && [ "${R_FAILED:-x}" = 0 ] && [ -n "$R_TPS" ]; } || { ok=FAIL; SANITY_OK=0; }
  line="sanity -M $mode: $ok, exit $R_RC, number of failed transactions: ${R_FAILED:-?}, transactions: ${R_NTX:-?}, tps ${R_TPS:-?}"
  [ "$ok" = FAIL ] && line="$line; first error: ${R_ERR:-none}"
  echo "$line" | tee -a "$SANITY" >&2
  [ "$ok" = FAIL ] && echo "sanity -M $mode failed: $R_ERR" >>"$PROBLEMS"
done

TARGETS=(direct pgbouncer hotrepart)
[ -n "$BASE_BIN" ] && TARGETS+=(baseline)
NT=${#TARGETS[@]}
n_modes=$(wc -w <<<"$MODES")
n_clients=$(wc -w <<<"$CLIENTS")
TOTAL_RUNS=$((n_modes * n_clients * REPEAT * NT))
log "pgbench -S: modes [$MODES] x clients [$CLIENTS] x $REPEAT repeats x $NT targets = $TOTAL_RUNS runs of ${DURATION} s"
for mode in $MODES; do
  for clients in $CLIENTS; do
    for rep in $(seq 1 "$REPEAT"); do
      # Rotate the order per repeat so no target always runs first.
      off=$(((rep - 1) % NT))
      for k in $(seq 0 $((NT - 1))); do
        target=${TARGETS[$(((k + off) % NT))]}
        RUN_NO=$((RUN_NO + 1))
        out=$WORK/run-$mode-$clients-$target-$rep.log
        run_pgbench "$target" "$mode" "$clients" "$DURATION" "$out" -S
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$clients" "$target" "$rep" \
          "$R_RC" "${R_TPS:-}" "${R_NTX:-}" "$R_CPU" "${R_FAILED:-}" "${R_ERR:-}" "$R_SYS" "$R_CS" "$R_KCPU" >>"$RAW"
        status="tps ${R_TPS:-?}"
        [ "$R_RC" != 0 ] && status="FAILED (exit $R_RC): ${R_ERR:-no error line}"
        [ "$R_RC" = 0 ] && [ "${R_FAILED:-0}" != 0 ] && status="$status, $R_FAILED failed tx"
        log "[$RUN_NO/$TOTAL_RUNS] -M $mode -c $clients $target #$rep: $status"
        if [ "$R_RC" != 0 ] && { [ "$target" = hotrepart ] || [ "$target" = baseline ]; }; then
          echo "hotrepart -M $mode -c $clients #$rep: pgbench exit $R_RC: $R_ERR" >>"$PROBLEMS"
        fi
        if [ "$R_RC" = 0 ] && [ "${R_FAILED:-0}" != 0 ]; then
          echo "$target -M $mode -c $clients #$rep: $R_FAILED failed transactions" >>"$PROBLEMS"
        fi
        sleep 1
      done
    done
  done
done

# ---------------------------------------------------------------- report
# agg MODE CLIENTS TARGET -> "median_tps|median_cpu_us_per_tx|ok_runs|runs|first_err|min_tps|max_tps|median_syscalls_per_tx|median_cs_per_tx|median_kernel_cpu_us_per_tx"
agg() {
  awk -F'\t' -v m="$1" -v c="$2" -v t="$3" -v hz="$CLK_TCK" '
    function median(a, n,   i, j, x) {
      for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j+1] = a[j]; a[j+1] = x }
      if (n == 0) return ""
      return (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
    }
    $1 == m && $2 == c && $3 == t {
      runs++
      if ($5 == 0 && $6 != "") { nt++; tps[nt] = $6
        if (lo == "" || $6 + 0 < lo) lo = $6 + 0
        if (hi == "" || $6 + 0 > hi) hi = $6 + 0
        if ($8 >= 0 && $7 > 0) { nc++; cpu[nc] = ($8 / hz) * 1e6 / $7 }
        if ($13 != "" && $13 >= 0 && $7 > 0) { nk++; kcpu[nk] = ($13 / hz) * 1e6 / $7 }
        if ($11 != "" && $11 >= 0 && $7 > 0) { ns++; sys[ns] = $11 / $7 }
        if ($12 != "" && $12 >= 0 && $7 > 0) { nw++; csw[nw] = $12 / $7 } }
      else if (err == "") err = $10
    }
    END {
      gsub(/\|/, "/", err)
      printf "%s|%s|%d|%d|%s|%s|%s|%s|%s|%s\n", median(tps, nt), median(cpu, nc), nt, runs, err, lo, hi, median(sys, ns), median(csw, nw), median(kcpu, nk)
    }' "$RAW"
}
fmt_spread() { [ -z "$1" ] && echo "" || awk -v a="$1" -v b="$2" 'BEGIN{printf "%.0f–%.0f", a, b}'; }
fmt_per() { awk -v x="$1" 'BEGIN{ if (x == "") print "n/a"; else printf "%.2f", x }'; }
fmt_tps() { [ -z "$1" ] && echo "" || awk -v x="$1" 'BEGIN{printf "%.0f", x}'; }
fmt_ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
fmt_cpu() { awk -v x="$1" 'BEGIN{ if (x == "") print "n/a"; else printf "%.1f (%.0f)", x, x * 1000 }'; }
cell_tps() { # MEDIAN OK RUNS
  if [ "$2" = 0 ]; then echo "n/a (fails)"
  elif [ "$2" != "$3" ]; then echo "$(fmt_tps "$1") ($(($3 - $2))/$3 runs failed)"
  else fmt_tps "$1"; fi
}

mkdir -p "$OUT_DIR"
STAMP=$(date +%Y%m%d-%H%M%S)
REPORT=$OUT_DIR/pgbench-$STAMP.md
ELAPSED=$(($(date +%s) - T0))
{
  echo "# pgbench: direct PostgreSQL vs PgBouncer vs hotrepart"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); hotrepart $HR_BIN_FROM (binary sha256 $HR_BIN_SHA…)"
  [ -n "$BASE_BIN" ] && echo "- baseline: a second hotrepart node, same configuration, $BASE_BIN_FROM (binary sha256 $BASE_BIN_SHA…)"
  echo "- machine: $(nproc) cores ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)), $(free -g | awk '/^Mem:/{print $2}') GiB; PostgreSQL, the proxy and pgbench all share these cores"
  echo "- PostgreSQL $PG_VERSION (fsync=off, synchronous_commit=off, full_page_writes=off, shared_buffers=512MB, max_connections=$PG_MAXCONN, scram-sha-256 on loopback); PgBouncer $BOUNCER_VERSION (pool_mode=transaction, default_pool_size=$POOL_SIZE, auth_type=trust); hotrepart (pool_mode=transaction, pool_size=$POOL_SIZE, auth=trust, backends log in with SCRAM)"
  echo "- pgbench -S (select-only), -j $THREADS, -T $DURATION s per run, scale $SCALE, $REPEAT runs per point, targets interleaved per point (order rotated per repeat); TPS = median over runs (pgbench's 'without initial connection time')"
  echo "- CPU µs/tx = the proxy's utime+stime (/proc/PID/stat, CLK_TCK=$CLK_TCK) over the whole pgbench run (connects included) / transactions processed; median over runs; in brackets: CPU µs per 1,000 transactions"
  echo "- total wall time of this benchmark: ${ELAPSED} s; load average at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg) (anything else running on the machine disturbs the numbers)"
  echo
  echo "Sanity (TPC-B-like default script through hotrepart, 10 clients, ${SANITY_DURATION} s):"
  echo
  sed 's/^/    /' "$SANITY"
  echo
  echo "| mode | clients | direct TPS | pgbouncer TPS | hotrepart TPS | hotrepart/direct | hotrepart/pgbouncer | CPU µs/tx pgbouncer | CPU µs/tx hotrepart |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for mode in $MODES; do
    for clients in $CLIENTS; do
      IFS='|' read -r d_tps _ d_ok d_runs _ <<<"$(agg "$mode" "$clients" direct)"
      IFS='|' read -r b_tps b_cpu b_ok b_runs _ <<<"$(agg "$mode" "$clients" pgbouncer)"
      IFS='|' read -r h_tps h_cpu h_ok h_runs _ <<<"$(agg "$mode" "$clients" hotrepart)"
      [ "$b_ok" = 0 ] && b_cpu=""
      [ "$h_ok" = 0 ] && h_cpu=""
      echo "| $mode | $clients | $(cell_tps "$d_tps" "$d_ok" "$d_runs") | $(cell_tps "$b_tps" "$b_ok" "$b_runs") | $(cell_tps "$h_tps" "$h_ok" "$h_runs") | $(fmt_ratio "$h_tps" "$d_tps") | $(fmt_ratio "$h_tps" "$b_tps") | $(fmt_cpu "$b_cpu") | $(fmt_cpu "$h_cpu") |"
    done
  done
  echo
  echo "CPU columns: proxy CPU µs per transaction (in brackets: µs per 1,000 transactions)."
  echo
  echo "Per target: TPS spread (min–max over the runs), and the proxy's syscalls and context switches per transaction (perf stat -e raw_syscalls:sys_enter,context-switches -p PID over each run, median; n/a: perf unavailable, or direct PostgreSQL — a process per connection)."
  echo
  echo "| mode | clients | target | TPS median | TPS min–max | CPU µs/tx | of which kernel µs/tx | syscalls/tx | context switches/tx |"
  echo "|---|---:|---|---:|---:|---:|---:|---:|---:|"
  for mode in $MODES; do
    for clients in $CLIENTS; do
      for t in "${TARGETS[@]}"; do
        IFS='|' read -r x_tps x_cpu x_ok _ _ x_lo x_hi x_sys x_cs x_k <<<"$(agg "$mode" "$clients" "$t")"
        [ "$x_ok" = 0 ] && { x_cpu=""; x_k=""; }
        echo "| $mode | $clients | $t | $(fmt_tps "$x_tps") | $(fmt_spread "$x_lo" "$x_hi") | $(fmt_cpu "$x_cpu") | $(fmt_per "$x_k") | $(fmt_per "$x_sys") | $(fmt_per "$x_cs") |"
      done
    done
  done
  if [ -n "$BASE_BIN" ]; then
    echo
    echo "Before/after, same run: hotrepart vs the baseline binary."
    echo
    echo "| mode | clients | baseline TPS | hotrepart TPS | hotrepart/baseline TPS | CPU µs/tx baseline | CPU µs/tx hotrepart | hotrepart/baseline CPU |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for mode in $MODES; do
      for clients in $CLIENTS; do
        IFS='|' read -r h_tps h_cpu h_ok h_runs _ <<<"$(agg "$mode" "$clients" hotrepart)"
        IFS='|' read -r x_tps x_cpu x_ok x_runs _ <<<"$(agg "$mode" "$clients" baseline)"
        [ "$h_ok" = 0 ] && h_cpu=""
        [ "$x_ok" = 0 ] && x_cpu=""
        echo "| $mode | $clients | $(cell_tps "$x_tps" "$x_ok" "$x_runs") | $(cell_tps "$h_tps" "$h_ok" "$h_runs") | $(fmt_ratio "$h_tps" "$x_tps") | $(fmt_cpu "$x_cpu") | $(fmt_cpu "$h_cpu") | $(fmt_ratio "$h_cpu" "$x_cpu") |"
      done
    done
  fi
  failures=$(awk -F'\t' '$5 != 0 { printf "- %s -M %s -c %s run %s: exit %s: %s\n", $3, $1, $2, $4, $5, $10 }' "$RAW")
  if [ -n "$failures" ]; then
    echo
    echo "Failed runs (pgbench exit status != 0):"
    echo
    echo "$failures"
  fi
  hr_issues=$(grep -cE ' (WARN|ERROR) ' "$WORK/hotrepart.log" 2>/dev/null || true)
  echo
  echo "hotrepart: started $HR_STARTS time(s); ${hr_issues:-0} WARN/ERROR log lines (HOTREPART_LOG=${HOTREPART_LOG:-warn})."
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
  echo
  echo "Raw runs (mode, clients, target, repeat, exit, tps, transactions, proxy CPU ticks, failed tx, first error, proxy syscalls, proxy context switches): bench/out/pgbench-$STAMP.tsv"
} >"$REPORT"
cp "$RAW" "$OUT_DIR/pgbench-$STAMP.tsv"
cat "$REPORT"
log "report written to $REPORT"
[ "$SANITY_OK" = 1 ] || { log "sanity check FAILED"; exit 1; }
exit 0
