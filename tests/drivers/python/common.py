"""What the driver scripts share: one JSON line per scenario on stdout.

Each scenario is a function returning its observed values (the `detail`
compared between a run through the node and a run directly on PostgreSQL);
it checks exact values with `eq` and fails by raising. A scenario that
raises is reported `ok: false` with the error, the script goes on with the
next one, and exits 0: the Rust test reads the lines and decides.
"""

import json
import sys
import time
import traceback


class Fail(Exception):
    pass


def eq(what, got, want):
    if got != want:
        raise Fail(f"{what}: got {got!r}, want {want!r}")


def emit(name, ok, detail):
    print(json.dumps({"name": name, "ok": ok, "detail": detail}), flush=True)


def describe(e):
    """An error as a client sees it: SQLSTATE (when it has one) and words."""
    code = getattr(e, "sqlstate", None)
    return f"{type(e).__name__} {code}: {str(e).strip()}" if code else f"{type(e).__name__}: {e}"


def run(scenarios, argv):
    """Runs the named scenarios (all when none is named) in order."""
    only = set(argv)
    for name, fn in scenarios:
        if only and name not in only:
            continue
        start = time.monotonic()
        try:
            detail = fn()
            emit(name, True, detail)
        except Fail as e:
            emit(name, False, str(e))
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            tb = traceback.format_exc(limit=3).strip().splitlines()
            emit(name, False, f"{describe(e)} | {tb[-3:] if len(tb) > 3 else tb}")
        spent = time.monotonic() - start
        print(f"{name}: {spent:.2f}s", file=sys.stderr, flush=True)
