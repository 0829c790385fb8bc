"""asyncpg scenarios (issue 14): `python asyncpg_scenarios.py DSN [scenario...]`.

Prints one JSON line per scenario (see common.py). Tables are named drva_*;
`drv_kv` is the table the tests shard by `id`.
"""

import asyncio
import datetime
import json
import sys
import time
from decimal import Decimal

import asyncpg

from common import Fail, describe, eq, run

DSN = sys.argv[1]


async def connect(**kw):
    return await asyncpg.connect(DSN, timeout=10, **kw)


def sync(coro_fn):
    """A scenario: an async function run with a bound on its time."""
    def f():
        return asyncio.run(asyncio.wait_for(coro_fn(), 20))
    f.__name__ = coro_fn.__name__
    return f


VALUES = [
    42,
    2**40,
    "héllo ✓ 'quoted' \\ \"x\"",
    Decimal("12345.678901"),
    datetime.datetime(2024, 2, 29, 12, 34, 56, 789000, tzinfo=datetime.timezone.utc),
    b"\x00\x01\xffbin",
    json.dumps({"a": [1, 2, {"b": None}], "é": "ü"}, sort_keys=True),
    [1, 2, None, 4],
    ["x", "y z", None],
    None,
    True,
    1.5,
]
TYPES = ["int4", "int8", "text", "numeric", "timestamptz", "bytea", "jsonb",
         "int4[]", "text[]", "int4", "bool", "float8"]


@sync
async def types():
    c = await connect()
    try:
        sql = "SELECT " + ", ".join(f"${i + 1}::{t}" for i, t in enumerate(TYPES))
        row = await c.fetchrow(sql, *VALUES)
        got = list(row)
        got[6] = json.dumps(json.loads(got[6]), sort_keys=True)
        eq("round trip", got, VALUES)
        eq("NULL is NULL", await c.fetchval("SELECT $1::text IS NULL", None), True)
    finally:
        await c.close()
    return f"{len(VALUES)} values of {len(set(TYPES))} types round-trip"


@sync
async def transactions():
    c = await connect()
    try:
        await c.execute("DROP TABLE IF EXISTS drva_tx; CREATE TABLE drva_tx (id int PRIMARY KEY)")
        async with c.transaction():
            await c.execute("INSERT INTO drva_tx VALUES (1)")
        try:
            async with c.transaction():
                await c.execute("INSERT INTO drva_tx VALUES (2)")
                raise ZeroDivisionError
        except ZeroDivisionError:
            pass
        async with c.transaction():
            await c.execute("INSERT INTO drva_tx VALUES (3)")
            try:
                async with c.transaction():  # a savepoint
                    await c.execute("INSERT INTO drva_tx VALUES (4)")
                    await c.execute("INSERT INTO drva_tx VALUES (3)")
            except asyncpg.UniqueViolationError:
                pass
            else:
                raise Fail("duplicate key not reported")
        ids = [r[0] for r in await c.fetch("SELECT id FROM drva_tx ORDER BY id")]
    finally:
        await c.close()
    eq("committed rows", ids, [1, 3])
    return f"rows {ids}"


@sync
async def executemany():
    c = await connect()
    try:
        await c.execute("DROP TABLE IF EXISTS drva_many; CREATE TABLE drva_many (id int PRIMARY KEY, v text)")
        await c.executemany("INSERT INTO drva_many VALUES ($1, $2)", [(i, f"v{i}") for i in range(100)])
        got = tuple(await c.fetchrow("SELECT count(*), sum(id) FROM drva_many"))
        eq("rows", got, (100, 4950))
    finally:
        await c.close()
    return list(got)


@sync
async def executemany_error():
    c = await connect()
    try:
        await c.execute("DROP TABLE IF EXISTS drva_many_err; CREATE TABLE drva_many_err (id int PRIMARY KEY)")
        try:
            await c.executemany("INSERT INTO drva_many_err VALUES ($1)", [(1,), (2,), (3,), (2,), (5,)])
            raise Fail("duplicate key not reported")
        except asyncpg.UniqueViolationError as e:
            err = describe(e)
        kept = [r[0] for r in await c.fetch("SELECT id FROM drva_many_err ORDER BY id")]
        eq("rows kept (executemany is atomic)", kept, [])
        eq("usable after", await c.fetchval("SELECT 7"), 7)
    finally:
        await c.close()
    return f"{err}; kept {kept}"


@sync
async def prepared_after_alter():
    """asyncpg's statement cache, and an explicit prepared statement, after
    ALTER TABLE: asyncpg re-prepares on InvalidCachedStatementError."""
    c = await connect()
    out = []
    try:
        await c.execute("DROP TABLE IF EXISTS drva_prep; CREATE TABLE drva_prep (a int)")
        await c.execute("INSERT INTO drva_prep VALUES (1)")
        sel = "SELECT * FROM drva_prep WHERE a = $1"
        stmt = await c.prepare(sel)

        async def step():
            try:
                return str([tuple(r) for r in await c.fetch(sel, 1)])
            except asyncpg.PostgresError as e:
                return describe(e)

        async def explicit():
            try:
                return "explicit " + str([tuple(r) for r in await stmt.fetch(1)])
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                return "explicit " + describe(e)

        out += [await step(), await step(), await explicit()]
        await c.execute("ALTER TABLE drva_prep ADD COLUMN b text DEFAULT 'x'")
        out += [await step(), await step(), await explicit()]
        await c.execute("ALTER TABLE drva_prep ALTER COLUMN a TYPE bigint")
        out += [await step(), await step()]
        # Inside a transaction asyncpg cannot retry: the error reaches the
        # client as it does directly.
        await c.execute("ALTER TABLE drva_prep ADD COLUMN c int DEFAULT 3")
        try:
            async with c.transaction():
                out.append(await step())
        except asyncpg.PostgresError as e:
            out.append(describe(e))
        out.append(await step())
    finally:
        await c.close()
    # What PostgreSQL 15 gives directly with asyncpg's retry.
    invalid = ("InvalidCachedStatementError 0A000: cached statement plan is invalid "
               "due to a database schema or configuration change")
    eq("outcomes", out, [
        "[(1,)]", "[(1,)]", "explicit [(1,)]",
        "[(1, 'x')]", "[(1, 'x')]", "explicit " + invalid,
        "[(1, 'x')]", "[(1, 'x')]",
        invalid, "[(1, 'x', 3)]",
    ])
    return out


@sync
async def listen_notify():
    lis = await connect()
    other = await connect()
    try:
        q = asyncio.Queue()
        await lis.add_listener("drv_ch", lambda conn, pid, ch, payload: q.put_nowait((ch, payload)))
        await other.execute("NOTIFY drv_ch, 'hello'")
        await other.execute("SELECT pg_notify('drv_ch', $1)", "from pg_notify")
        async with other.transaction():
            await other.execute("NOTIFY drv_ch, 'in a transaction'")
        got = [await asyncio.wait_for(q.get(), 10) for _ in range(3)]
        eq("notifications", got, [("drv_ch", "hello"), ("drv_ch", "from pg_notify"), ("drv_ch", "in a transaction")])
        await lis.remove_listener("drv_ch", lambda *a: None)
    finally:
        await lis.close()
        await other.close()
    return [p for _, p in got]


@sync
async def client_encoding():
    # asyncpg asks for client_encoding 'utf-8' in its startup message.
    c = await connect()
    try:
        setting = c.get_settings().client_encoding
        shown = await c.fetchval("SHOW client_encoding")
        text = await c.fetchval("SELECT $1::text", "żółw €")
    finally:
        await c.close()
    eq("ParameterStatus client_encoding", setting, "UTF8")
    eq("SHOW client_encoding", shown, "UTF8")
    eq("text", text, "żółw €")
    return [setting, shown]


@sync
async def cancel():
    c = await connect()
    try:
        start = time.monotonic()
        try:
            await c.fetch("SELECT pg_sleep(30)", timeout=0.5)
            raise Fail("pg_sleep was not cancelled")
        except asyncio.TimeoutError:
            pass
        spent = time.monotonic() - start
        if spent > 10:
            raise Fail(f"timeout took {spent:.1f}s")
        eq("usable after", await c.fetchval("SELECT 1"), 1)
        # A task cancelled mid-query: asyncpg sends a cancel request.
        task = asyncio.ensure_future(c.fetch("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        eq("usable after a cancelled task", await c.fetchval("SELECT 2"), 2)
        # The server's 57014 as asyncpg reports it.
        await c.execute("SET statement_timeout = 200")
        try:
            await c.fetch("SELECT pg_sleep(30)")
            raise Fail("statement_timeout did not fire")
        except asyncpg.QueryCanceledError as e:
            err = describe(e)
        await c.execute("RESET statement_timeout")
        eq("usable after statement_timeout", await c.fetchval("SELECT 3"), 3)
    finally:
        await c.close()
    return ["TimeoutError", "CancelledError", err]


@sync
async def sharded_keys():
    c = await connect()
    try:
        await c.execute("DROP TABLE IF EXISTS drv_kv")
        await c.execute("CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text)")
        for i in range(1, 21):
            await c.execute("INSERT INTO drv_kv (id, v) VALUES ($1, $2)", i, f"v{i}")
        for i in range(1, 21):
            eq(f"read {i}", await c.fetchval("SELECT v FROM drv_kv WHERE id = $1", i), f"v{i}")
        # Keys on both shards in one transaction (two-phase commit there).
        async with c.transaction():
            for i in (5, 6, 7, 8):
                await c.execute("UPDATE drv_kv SET v = v || '+' WHERE id = $1", i)
        await c.execute("DELETE FROM drv_kv WHERE id = $1", 20)
        rows = [tuple(r) for r in await c.fetch("SELECT id, v FROM drv_kv ORDER BY id")]
    finally:
        await c.close()
    eq("rows", rows, [(i, f"v{i}+" if i in (5, 6, 7, 8) else f"v{i}") for i in range(1, 20)])
    return "ids 1..19, 5..8 updated in one transaction"


async def fill_kv(c):
    await c.execute("DROP TABLE IF EXISTS drv_kv")
    await c.execute("CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text)")
    await c.executemany("INSERT INTO drv_kv (id, v) VALUES ($1, $2)",
                        [(i, f"v{i % 3}") for i in range(1, 21)])


@sync
async def sharded_reads():
    """Merged reads as SQLAlchemy sends them through asyncpg: parameters
    typed by casts (`LIMIT $1::INTEGER`), only in OFFSET or HAVING (not in
    the shards' statement); asyncpg's Parse gives no types and binds what
    ParameterDescription said."""
    c = await connect()
    out = []
    try:
        await fill_kv(c)
        q = "SELECT id, v FROM drv_kv ORDER BY v DESC, id LIMIT $1::INTEGER OFFSET $2::INTEGER"
        out.append([tuple(r) for r in await c.fetch(q, 4, 3)])
        out.append([r[0] for r in await c.fetch("SELECT id FROM drv_kv ORDER BY id OFFSET $1", 16)])
        out.append([r[0] for r in await c.fetch("SELECT id FROM drv_kv ORDER BY id DESC LIMIT $1", 2)])
        # fetchrow/fetchval: Execute with a row limit of 1.
        ps = await c.prepare("SELECT count(*) FROM drv_kv WHERE id > $1::INTEGER")
        out.append([await ps.fetchval(5), await ps.fetchval(18)])
        out.append(await c.fetchval("SELECT max(id) FROM drv_kv WHERE v = $1", "v1"))
        out.append(tuple(await c.fetchrow("SELECT id, v FROM drv_kv ORDER BY id DESC")))
        # An enum column in a merged read: asyncpg takes results in
        # binary, and an enum's binary value is its label.
        await c.execute("DROP TABLE IF EXISTS drv_enum")
        await c.execute("DROP TYPE IF EXISTS drva_mood")
        await c.execute("CREATE TYPE drva_mood AS ENUM ('sad', 'ok', 'happy')")
        await c.execute("CREATE TABLE drv_enum (id bigint PRIMARY KEY, m drva_mood)")
        await c.executemany("INSERT INTO drv_enum (id, m) VALUES ($1, $2)",
                            [(i, ["sad", "ok", "happy"][i % 3]) for i in range(1, 13)])
        out.append([tuple(r) for r in await c.fetch("SELECT id, m FROM drv_enum ORDER BY id DESC LIMIT $1", 5)])
        out.append(await c.fetchval("SELECT m FROM drv_enum WHERE id > $1 ORDER BY id", 10))
        # A keyless read without a merge: any one row of it, then the rest.
        row = await c.fetchrow("SELECT id FROM drv_kv WHERE v = $1", "v2")
        out.append(row[0] % 3)
        out.append(len(await c.fetch("SELECT id FROM drv_kv WHERE v = $1", "v2")))
    finally:
        await c.close()
    return out


@sync
async def sharded_writes_in_transaction():
    """asyncpg prepares with Parse, Describe, Flush (no Sync) before its
    Bind, Execute, Sync: statements over several shards after that (an
    UPDATE of every shard, DDL) must commit; a portal bound on one shard
    and fetched a few rows at a time runs there."""
    c = await connect()
    out = []
    try:
        await fill_kv(c)
        async with c.transaction():
            rows = await c.fetch("UPDATE drv_kv SET v = v || $1 WHERE id > $2 RETURNING id", "+", 15)
            out.append(sorted(r[0] for r in rows))
        out.append(await c.fetchval("SELECT count(*) FROM drv_kv WHERE v LIKE '%+'"))
        await c.fetch("CREATE TABLE IF NOT EXISTS drva_t (id int)")
        await c.fetch("DROP TABLE drva_t")
        async with c.transaction():
            ps = await c.prepare("SELECT id, g FROM drv_kv, generate_series(1, 5) g WHERE id = $1 ORDER BY g")
            for key in (3, 4):
                cur = await ps.cursor(key)
                got = []
                while True:
                    b = await cur.fetch(2)
                    if not b:
                        break
                    got += [tuple(r) for r in b]
                out.append(got)
    finally:
        await c.close()
    return out


@sync
async def cursor_sharded():
    """Server-side cursors over every shard: a portal bound in one batch
    and executed in later ones (prepared.cursor() + fetch(n), fetchrow(),
    forward(n), and `async for` with a prefetch)."""
    c = await connect()
    try:
        await fill_kv(c)
        async with c.transaction():
            ps = await c.prepare("SELECT id FROM drv_kv WHERE id > $1")
            cur = await ps.cursor(0)
            got = []
            while True:
                b = await cur.fetch(3)
                if not b:
                    break
                got += [r[0] for r in b]
            ordered = await c.prepare(
                "SELECT id, v FROM drv_kv WHERE id > $1 ORDER BY id % 3 DESC, id")
            cur = await ordered.cursor(1)
            first = [tuple(r) for r in await cur.fetch(2)]
            row = tuple(await cur.fetchrow())
            moved = await cur.forward(2)
            rest = [tuple(r) for r in await cur.fetch(1000)]
            it = [r[0] async for r in c.cursor(
                "SELECT id FROM drv_kv WHERE id > $1 ORDER BY id DESC", 2,
                prefetch=4)]
    finally:
        await c.close()
    return [sorted(got), first, row, moved, rest, it]


@sync
async def savepoints_sharded():
    """Savepoints in a transaction over both shards, asyncpg preparing
    each new statement first (Parse, Describe, Flush; then Bind, Execute,
    Sync): SAVEPOINT and ROLLBACK TO reach every shard. (A savepoint
    statement after that Flush once ran on one shard only: ROLLBACK TO
    then failed with 3B001, or a write on another shard survived it.)"""
    c = await connect()
    out = []
    try:
        await fill_kv(c)
        q = "UPDATE drv_kv SET v = $2 WHERE id = $1"
        read = "SELECT id, v FROM drv_kv ORDER BY id"
        async with c.transaction():
            await c.fetch("SAVEPOINT warm")  # now in asyncpg's cache
        tr = c.transaction()
        await tr.start()
        try:
            for i in range(1, 21):
                await c.fetch(q, i, "a")
            await c.fetch("SAVEPOINT warm")
            for i in range(1, 21):
                await c.fetch(q, i, "b")
            await c.fetch("ROLLBACK TO SAVEPOINT warm")
            out.append([[r[0], r[1]] for r in await c.fetch(read)])
            await c.fetch("SAVEPOINT fresh")
            for i in range(1, 21):
                await c.fetch(q, i, "c")
            await c.fetch("ROLLBACK TO SAVEPOINT fresh")
            await c.fetch("RELEASE SAVEPOINT fresh")
            out.append([[r[0], r[1]] for r in await c.fetch(read)])
        finally:
            await tr.rollback()
    finally:
        await c.close()
    return out


run([
    ("types", types),
    ("transactions", transactions),
    ("executemany", executemany),
    ("executemany_error", executemany_error),
    ("prepared_after_alter", prepared_after_alter),
    ("listen_notify", listen_notify),
    ("client_encoding", client_encoding),
    ("cancel", cancel),
    ("sharded_keys", sharded_keys),
    ("sharded_reads", sharded_reads),
    ("sharded_writes_in_transaction", sharded_writes_in_transaction),
    ("cursor_sharded", cursor_sharded),
    ("savepoints_sharded", savepoints_sharded),
], sys.argv[2:])
