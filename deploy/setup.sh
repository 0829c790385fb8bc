#!/usr/bin/env bash
# Installs what hotrepart's demo and tests need on a fresh Debian machine:
# PostgreSQL server binaries (initdb, pg_ctl) and clients (psql, pgbench),
# and the interpreters the driver tests run real clients with (python3 with
# venv, node and npm; the tests install the pinned drivers themselves, see
# tests/src/drivers.rs), and Chromium for the dashboard's headless browser
# test. Idempotent; does nothing when everything is present.
set -euo pipefail

have_pg() {
  [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ] && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
  command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
  return 1
}

need=()
have_pg || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || need+=(postgresql-contrib)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
# The dashboard's browser test (tests/tests/it/dashboard.rs).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# The deployment files' checks (tests/tests/it/deploy.rs).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ "${1:-}" = "--bench" ]; then
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2 || true
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
  # Debian starts a cluster on install; hotrepart runs its own servers.
  if command -v pg_lsclusters >/dev/null 2>&1; then
    $SUDO service postgresql stop >/dev/null 2>&1 || true
  fi
fi
have_pg || { echo "setup: PostgreSQL server binaries still missing" >&2; exit 1; }
# PyYAML for the deployment files' checks (the python3 on PATH may not be
# Debian's, so pip rather than python3-yaml).
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
  echo "setup: installing PyYAML" >&2
  python3 -m pip install -q --user pyyaml >&2 || python3 -m pip install -q --user --break-system-packages pyyaml >&2
fi
