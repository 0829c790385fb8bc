"""psycopg 3 scenarios (issue 14): `python psycopg_scenarios.py DSN [scenario...]`.

Prints one JSON line per scenario (see common.py). Tables are named drv_*;
each scenario drops and creates its own. `drv_kv` is the table the tests
shard by `id`.
"""

import asyncio
import datetime
import sys
import threading
import time
from decimal import Decimal

import psycopg
from psycopg import errors
from psycopg.types.json import Jsonb

from common import Fail, describe, eq, run

DSN = sys.argv[1]


def connect(**kw):
    kw.setdefault("autocommit", True)
    return psycopg.connect(DSN, connect_timeout=10, **kw)


VALUES = [
    42,
    2**40,
    "héllo ✓ 'quoted' \\ \"x\"",
    Decimal("12345.678901"),
    datetime.datetime(2024, 2, 29, 12, 34, 56, 789000, tzinfo=datetime.timezone.utc),
    b"\x00\x01\xffbin",
    {"a": [1, 2, {"b": None}], "é": "ü"},
    [1, 2, None, 4],
    ["x", "y z", None],
    None,
    True,
    1.5,
]
TYPES = ["int4", "int8", "text", "numeric", "timestamptz", "bytea", "jsonb",
         "int4[]", "text[]", "int4", "bool", "float8"]


def types():
    sql = "SELECT " + ", ".join(f"%s::{t}" for t in TYPES)
    params = [Jsonb(v) if isinstance(v, dict) else v for v in VALUES]
    with connect() as c:
        for binary in (False, True):
            row = c.cursor(binary=binary).execute(sql, params).fetchone()
            got = list(row)
            eq(f"round trip (binary={binary})", got, VALUES)
        # The same values come back from a table.
        c.execute("DROP TABLE IF EXISTS drv_types")
        c.execute("CREATE TABLE drv_types (i int4, b int8, t text, n numeric, ts timestamptz, "
                  "by bytea, j jsonb, ia int4[], ta text[], nul int4, bo bool, f float8)")
        c.execute("INSERT INTO drv_types VALUES (" + ", ".join(["%s"] * len(VALUES)) + ")", params)
        eq("from a table", list(c.execute("SELECT * FROM drv_types").fetchone()), VALUES)
        eq("NULL is NULL", c.execute("SELECT %s::text IS NULL", [None]).fetchone(), (True,))
    return f"{len(VALUES)} values of {len(set(TYPES))} types round-trip in text and binary"


def transactions():
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_tx")
        c.execute("CREATE TABLE drv_tx (id int PRIMARY KEY)")
    with connect(autocommit=False) as c:
        c.execute("INSERT INTO drv_tx VALUES (1)")
        c.commit()
        c.execute("INSERT INTO drv_tx VALUES (2)")
        c.rollback()
        with c.transaction():
            c.execute("INSERT INTO drv_tx VALUES (3)")
            try:
                with c.transaction():  # a savepoint
                    c.execute("INSERT INTO drv_tx VALUES (4)")
                    c.execute("INSERT INTO drv_tx VALUES (3)")
            except errors.UniqueViolation:
                pass
            else:
                raise Fail("duplicate key not reported")
        # An error aborts the transaction until rollback, as directly.
        try:
            c.execute("SELECT 1/0")
        except errors.DivisionByZero:
            pass
        try:
            c.execute("SELECT 1")
            raise Fail("statement after an error ran")
        except errors.InFailedSqlTransaction as e:
            aborted = describe(e)
        c.rollback()
        ids = [r[0] for r in c.execute("SELECT id FROM drv_tx ORDER BY id")]
        c.commit()
    eq("committed rows", ids, [1, 3])
    return f"rows {ids}; {aborted}"


def executemany():
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_many")
        c.execute("CREATE TABLE drv_many (id int PRIMARY KEY, v text)")
        cur = c.cursor()
        cur.executemany("INSERT INTO drv_many VALUES (%s, %s)", [(i, f"v{i}") for i in range(100)])
        eq("rowcount", cur.rowcount, 100)
        cur.executemany("UPDATE drv_many SET v = %s WHERE id = %s RETURNING id",
                        [(f"w{i}", i) for i in range(0, 100, 10)], returning=True)
        ret = []
        while True:
            ret.extend(r[0] for r in cur.fetchall())
            if not cur.nextset():
                break
        eq("returned ids", ret, list(range(0, 100, 10)))
        got = c.execute("SELECT count(*), sum(id), count(*) FILTER (WHERE v LIKE 'w%%') FROM drv_many").fetchone()
        eq("rows", got, (100, 4950, 10))
    return f"count, sum, updated: {list(got)}"


def executemany_error():
    """A duplicate key in the middle of the batch: PostgreSQL skips to the
    Sync; what the client sees (the error, the rows kept) must be the same
    through the node."""
    out = []
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_many_err")
        c.execute("CREATE TABLE drv_many_err (id int PRIMARY KEY)")
        for autocommit in (True, False):
            c.autocommit = autocommit
            c.execute("DELETE FROM drv_many_err")
            if not autocommit:
                c.commit()
            try:
                c.cursor().executemany("INSERT INTO drv_many_err VALUES (%s)",
                                       [(1,), (2,), (3,), (2,), (5,)])
                raise Fail("duplicate key not reported")
            except errors.UniqueViolation as e:
                err = describe(e)
            if not autocommit:
                c.rollback()
            kept = [r[0] for r in c.execute("SELECT id FROM drv_many_err ORDER BY id")]
            if not autocommit:
                c.commit()
            out.append(f"autocommit={autocommit}: {err}; kept {kept}")
            eq(f"rows kept (autocommit={autocommit})", kept, [])
        c.autocommit = True
        eq("usable after", c.execute("SELECT 7").fetchone(), (7,))
    return out


async def _pipeline_aborted():
    # psycopg's own test_pipeline_aborted, in autocommit.
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True, connect_timeout=10) as aconn:
        async with aconn.pipeline() as p:
            c1 = await aconn.execute("select 1")
            try:
                await (await aconn.execute("select * from doesnotexist")).fetchone()
                raise Fail("select from doesnotexist did not fail")
            except errors.UndefinedTable as e:
                e1 = describe(e)
            try:
                await (await aconn.execute("select 'aborted'")).fetchone()
                raise Fail("the statement after the error was not aborted")
            except errors.PipelineAborted as e:
                e2 = type(e).__name__
            await p.sync()
            c2 = await aconn.execute("select 2")
        eq("c1", await c1.fetchone(), (1,))
        eq("c2", await c2.fetchone(), (2,))
        eq("after the pipeline", await (await aconn.execute("select 3")).fetchone(), (3,))
    return [e1, e2, "(1,)", "(2,)"]


def pipeline_aborted():
    return asyncio.run(asyncio.wait_for(_pipeline_aborted(), 15))


async def _pipeline_mixed():
    # A pipeline mixing a keyed write, a keyless read and DDL, in one Sync.
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True, connect_timeout=10) as aconn:
        await aconn.execute("DROP TABLE IF EXISTS drv_pipe")
        async with aconn.pipeline():
            await aconn.execute("CREATE TABLE drv_pipe (id int)")
            await aconn.execute("INSERT INTO drv_pipe VALUES (%s)", [1])
            c = await aconn.execute("SELECT count(*) FROM drv_pipe")
        eq("count", await c.fetchone(), (1,))
    return "create, insert, select in one pipeline: count 1"


def pipeline_mixed():
    return asyncio.run(asyncio.wait_for(_pipeline_mixed(), 15))


def prepared_after_alter():
    """Auto-prepared (prepare_threshold=0) statements after ALTER TABLE."""
    out = []
    with connect(prepare_threshold=0) as c:
        c.execute("DROP TABLE IF EXISTS drv_prep")
        c.execute("CREATE TABLE drv_prep (a int)")
        c.execute("INSERT INTO drv_prep VALUES (1)")
        sel = "SELECT * FROM drv_prep WHERE a = %s"

        def step():
            try:
                return str(c.execute(sel, [1]).fetchall())
            except psycopg.Error as e:
                return describe(e)

        out.append(step())
        out.append(step())
        c.execute("ALTER TABLE drv_prep ADD COLUMN b text DEFAULT 'x'")
        out.append(step())
        out.append(step())
        c.execute("ALTER TABLE drv_prep ALTER COLUMN a TYPE bigint")
        out.append(step())
        out.append(step())
    # What PostgreSQL 15 answers directly: the statement is re-planned.
    eq("outcomes", out, ["[(1,)]"] * 2 + ["[(1, 'x')]"] * 4)
    return out


def listen_notify():
    with connect() as lis, connect() as other:
        lis.execute("LISTEN drv_ch")
        other.execute("NOTIFY drv_ch, 'hello'")
        other.execute("SELECT pg_notify('drv_ch', %s)", ["from pg_notify"])
        with other.transaction():
            other.execute("NOTIFY drv_ch, 'in a transaction'")
        got = [(n.channel, n.payload) for n in lis.notifies(timeout=10, stop_after=3)]
        want = [("drv_ch", "hello"), ("drv_ch", "from pg_notify"), ("drv_ch", "in a transaction")]
        eq("notifications", got, want)
        lis.execute("UNLISTEN drv_ch")
        other.execute("NOTIFY drv_ch, 'after unlisten'")
        eq("after UNLISTEN", [n.payload for n in lis.notifies(timeout=0.5)], [])
    return [p for _, p in got]


def client_encoding():
    with psycopg.connect(DSN, autocommit=True, connect_timeout=10, client_encoding="utf-8") as c:
        status = c.info.parameter_status("client_encoding")
        shown = c.execute("SHOW client_encoding").fetchone()[0]
        text = c.execute("SELECT %s::text", ["żółw €"]).fetchone()[0]
    eq("ParameterStatus client_encoding", status, "UTF8")
    eq("SHOW client_encoding", shown, "UTF8")
    eq("text", text, "żółw €")
    return [status, shown]


def encoded_keys(encoding, rows):
    """A table sharded by a text key (`drv_enc`), written and read in a
    client encoding other than UTF-8: text and binary parameters, a simple
    query with the key as a literal, a count over every shard."""
    with connect(client_encoding=encoding) as c:
        status = c.info.parameter_status("client_encoding")
        c.execute("DROP TABLE IF EXISTS drv_enc")
        c.execute("CREATE TABLE drv_enc (k text PRIMARY KEY, v text)")
        with c.cursor() as cur:
            cur.executemany("INSERT INTO drv_enc (k, v) VALUES (%s, %s)", rows)
        got = []
        for k, v in rows:
            got.append(list(c.execute("SELECT k, v FROM drv_enc WHERE k = %s", [k]).fetchone()))
            got.append(c.execute("SELECT v FROM drv_enc WHERE k = %b", [k]).fetchone()[0])
            lit = k.replace("'", "''")
            got.append(c.execute(f"SELECT length(v) FROM drv_enc WHERE k = '{lit}'").fetchone()[0])
        n = c.execute("SELECT count(*) FROM drv_enc").fetchone()[0]
    eq("rows read back", [g for g in got if isinstance(g, list)], [list(r) for r in rows])
    eq("count", n, len(rows))
    return [status, n, got]


def executemany_sharded():
    """executemany into a table sharded by key (drv_kv), in autocommit:
    psycopg pipelines it, the rows go to both shards; then a batch with a
    duplicate key in its middle. What is kept must be what PostgreSQL
    keeps."""
    out = []
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_kv")
        c.execute("CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text)")
        cur = c.cursor()
        cur.executemany("INSERT INTO drv_kv (id, v) VALUES (%s, %s)", [(i, f"v{i}") for i in range(1, 21)])
        out.append([int(x) for x in c.execute("SELECT count(*), sum(id) FROM drv_kv").fetchone()])
        try:
            cur.executemany("INSERT INTO drv_kv (id, v) VALUES (%s, %s)",
                            [(100 + i, "w") for i in range(10)] + [(5, "dup")] + [(200, "after")])
            out.append("no error")
        except errors.UniqueViolation as e:
            out.append(describe(e).split(":")[0])
        out.append([int(x) for x in c.execute("SELECT count(*), sum(id) FROM drv_kv").fetchone()])
        c.execute("DELETE FROM drv_kv WHERE id >= 20")
    return out


def executemany_in_transaction():
    """executemany inside a transaction (SQLAlchemy's executemany, its ORM
    bulk update): psycopg pipelines it and sends a Flush after the Sync;
    rows on both shards, then COMMIT. Then a savepoint after executemany,
    a duplicate key, ROLLBACK TO SAVEPOINT."""
    out = []
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_kv")
        c.execute("CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text)")
    with connect(autocommit=False) as c:
        for r in range(3):
            c.cursor().executemany("INSERT INTO drv_kv (id, v) VALUES (%s, %s)",
                                   [(r * 6 + i, "v") for i in range(1, 7)])
            c.commit()
        cur = c.cursor()
        cur.executemany("UPDATE drv_kv SET v = v || '+' WHERE id = %s", [(i,) for i in (1, 2, 3, 4)])
        c.execute("SAVEPOINT s1")
        try:
            c.execute("INSERT INTO drv_kv (id, v) VALUES (1, 'dup')")
            out.append("no error")
        except errors.UniqueViolation as e:
            out.append(describe(e).split(":")[0])
        c.execute("ROLLBACK TO SAVEPOINT s1")
        c.commit()
        out.append(c.execute("SELECT count(*), count(*) FILTER (WHERE v LIKE '%+') FROM drv_kv").fetchone())
        c.commit()
    return [list(x) if isinstance(x, tuple) else x for x in out]


def orm_generated_keys():
    """What ORMs send for a table whose key is generated (bigserial) and
    sharded by it (drv_orm): one INSERT … RETURNING id (Django's save()), a
    multi-row VALUES with parameters and RETURNING (bulk_create, SQLAlchemy's
    insertmanyvalues) whose ids come back in VALUES order, executemany with
    returning=True, DEFAULT in the key's place, client-side binding
    (literals), and a rolled-back transaction. Ids and order as PostgreSQL's."""
    out = []
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_orm")
        c.execute("CREATE TABLE drv_orm (id bigserial PRIMARY KEY, name text, n int)")
        out.append(c.execute("INSERT INTO drv_orm (name, n) VALUES (%s, %s) RETURNING id", ["a", 1]).fetchone()[0])
        names = [f"b{i}" for i in range(12)]
        sql = ("INSERT INTO drv_orm (name, n) VALUES " + ", ".join(["(%s, %s)"] * len(names))
               + " RETURNING id, name")
        params = [x for i, nm in enumerate(names) for x in (nm, i)]
        bulk = c.execute(sql, params).fetchall()
        eq("bulk ids in VALUES order", [r[1] for r in bulk], names)
        out.append(bulk)
        cur = c.cursor()
        cur.executemany("INSERT INTO drv_orm (name) VALUES (%s) RETURNING id",
                        [("c1",), ("c2",), ("c3",)], returning=True)
        ids = []
        while True:
            ids.append(cur.fetchone()[0])
            if not cur.nextset():
                break
        out.append(ids)
        out.append(c.execute("INSERT INTO drv_orm (id, name) VALUES (DEFAULT, %s), (DEFAULT, %s) RETURNING id",
                             ["d1", "d2"]).fetchall())
        # SQLAlchemy's insertmanyvalues, as it sends it (rows listed out of
        # the sentinel's order, to show the ORDER BY is followed).
        out.append(c.execute(
            "INSERT INTO drv_orm (name, n) SELECT p0::VARCHAR, p1::INTEGER FROM "
            "(VALUES (%s::VARCHAR, %s::INTEGER, 1), (%s::VARCHAR, %s::INTEGER, 0), (%s::VARCHAR, %s::INTEGER, 2)) "
            "AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING drv_orm.id, drv_orm.name",
            ["s1", 1, "s0", 0, "s2", 2]).fetchall())
        with psycopg.ClientCursor(c) as cc:
            cc.execute("INSERT INTO drv_orm (name) VALUES (%s), (%s), (%s) RETURNING id, name", ["e1", "e2", "e3"])
            out.append(cc.fetchall())
        try:
            with c.transaction():
                c.execute("INSERT INTO drv_orm (name) VALUES (%s)", ["gone"])
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        out.append(c.execute("SELECT id, name FROM drv_orm ORDER BY id").fetchall())
    return out


def sqlalchemy_orm():
    """SQLAlchemy 2's ORM over psycopg on a table whose key it lets
    PostgreSQL generate (drv_sa, sharded by that key): add_all (its
    insertmanyvalues: INSERT … SELECT … FROM (VALUES …) ORDER BY a sentinel,
    RETURNING the keys in order), get, update, delete, count, a flush
    rolled back. Keys and values as PostgreSQL's."""
    from sqlalchemy import BigInteger, String, create_engine, func, select
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "drv_sa"
        id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
        name: Mapped[str] = mapped_column(String(50))
        n: Mapped[int] = mapped_column(default=0)

    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(DSN, connect_timeout=10))
    out = []
    try:
        # (IF EXISTS: the direct run left the table on the first shard only)
        with connect() as c:
            c.execute("DROP TABLE IF EXISTS drv_sa")
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            users = [User(name=f"u{i}", n=i) for i in range(10)]
            s.add_all(users)
            s.commit()
            out.append([(u.id, u.name) for u in users])
            u = s.get(User, users[3].id)
            u.name = "changed"
            s.commit()
            out.append(s.scalars(select(User.name).where(User.id == users[3].id)).one())
            s.delete(users[5])
            s.commit()
            out.append(sorted(s.scalars(select(User.id)).all()))
            one = User(name="single")
            s.add(one)
            s.flush()
            out.append(one.id)
            s.rollback()
            out.append(s.scalar(select(func.count()).select_from(User)))
    finally:
        engine.dispose()
    return out


def django_orm():
    """Django 5.2's ORM over psycopg (client-side binding, its default),
    configured here with a tiny app of its own: an author table sharded by
    its BigAutoField key (drv_dj_author) and a book table co-located with
    its author (drv_dj_book, sharded by author_id), made by the schema
    editor. create, bulk_create (`INSERT … SELECT * FROM UNNEST(…)
    RETURNING id`: ids in the objects' order), get, filter on a column that
    is not the key, update with F(), a cascading delete, get_or_create and
    update_or_create on a column that is not the key (`SELECT … LIMIT 21
    FOR UPDATE`) in atomic(), a nested atomic() rolled back after an
    IntegrityError while the outer one commits, aggregates, count, order_by
    with a slice, values_list, a join to the co-located author,
    iterator() (a server-side cursor WITH HOLD in autocommit) with other
    queries between its chunks, and inside atomic(). Ids and values as
    PostgreSQL's."""
    import os
    import types as pytypes

    import django
    from django.conf import settings
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(DSN)
    # An app of our own: INSTALLED_APPS imports it by name.
    app = pytypes.ModuleType("drv_dj")
    app.__file__ = os.path.abspath(__file__)
    sys.modules["drv_dj"] = app
    settings.configure(
        DATABASES={"default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": info.get("dbname", "postgres"),
            "USER": info.get("user", ""),
            "PASSWORD": info.get("password", ""),
            "HOST": info.get("host", ""),
            "PORT": info.get("port", ""),
            "OPTIONS": {"connect_timeout": 10},
        }},
        INSTALLED_APPS=["drv_dj"],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    from django.db import IntegrityError, connection, models, transaction
    from django.db.models import Avg, Count, F, Max, Sum

    class Author(models.Model):
        id = models.BigAutoField(primary_key=True)
        name = models.CharField(max_length=50)
        email = models.CharField(max_length=80)
        n = models.IntegerField(default=0)

        class Meta:
            app_label = "drv_dj"
            db_table = "drv_dj_author"

    class Book(models.Model):
        # Sharded by author_id, beside its author (the foreign key and joins
        # stay on one shard). On a sharded table every unique index must
        # include the shard key, so `id` alone cannot be the primary key:
        # Django 5.2's CompositePrimaryKey (author_id, id), `id` still an
        # identity column the ORM reads back from RETURNING (Django's system
        # check would flag an AutoField outside the primary key, fields.E100;
        # the ORM and schema editor handle it, and the checks are not run).
        pk = models.CompositePrimaryKey("author_id", "id")
        author = models.ForeignKey(Author, on_delete=models.CASCADE)
        id = models.BigAutoField(primary_key=False)
        title = models.CharField(max_length=50)

        class Meta:
            app_label = "drv_dj"
            db_table = "drv_dj_book"

    out = {}
    try:
        with connection.cursor() as cur:
            # (IF EXISTS: the direct run left the tables on the first shard only)
            cur.execute("DROP TABLE IF EXISTS drv_dj_book")
            cur.execute("DROP TABLE IF EXISTS drv_dj_author")
        with connection.schema_editor() as se:
            se.create_model(Author)
            se.create_model(Book)

        ann = Author.objects.create(name="ann", email="ann@x", n=1)
        out["create"] = ann.id
        many = Author.objects.bulk_create(
            [Author(name=f"a{i}", email=f"a{i}@x", n=i) for i in range(2, 10)])
        out["bulk_create"] = [a.id for a in many]
        eq("bulk_create ids", out["bulk_create"], list(range(2, 10)))
        b1 = Book.objects.create(author=ann, title="first")
        books = Book.objects.bulk_create([Book(author=a, title=f"t{a.id}") for a in many])
        out["books"] = [list(b1.pk)] + [list(b.pk) for b in books]
        eq("book keys", out["books"], [[i, i] for i in range(1, 10)])

        out["get"] = Author.objects.get(pk=5).name
        out["filter"] = list(Author.objects.filter(n__gte=6).order_by("id").values_list("id", flat=True))
        out["update"] = Author.objects.filter(n__lt=4).update(n=F("n") + 10)
        out["after_update"] = list(Author.objects.filter(n__gte=10).order_by("id").values_list("id", "n"))
        deleted, per_model = Author.objects.filter(pk=9).delete()
        out["delete"] = [deleted, sorted(per_model.items())]

        with transaction.atomic():
            got, created = Author.objects.get_or_create(email="ann@x", defaults={"name": "no"})
            out["get_or_create_found"] = [got.id, created]
            got, created = Author.objects.get_or_create(email="new@x", defaults={"name": "new", "n": 5})
            out["get_or_create_created"] = [got.id, created]
        with transaction.atomic():
            got, created = Author.objects.update_or_create(email="a3@x", defaults={"n": 33})
            out["update_or_create_found"] = [got.id, created, got.n]
            got, created = Author.objects.update_or_create(email="z@x", defaults={"name": "z", "n": 7})
            out["update_or_create_created"] = [got.id, created]

        # A nested atomic(): a savepoint; its rows (on both shards) are
        # undone by the IntegrityError's rollback, the outer block commits.
        with transaction.atomic():
            outer = Author.objects.create(name="outer", email="outer@x")
            try:
                with transaction.atomic():
                    inner = Author.objects.bulk_create(
                        [Author(name=f"inner{i}", email="inner@x") for i in range(4)])
                    Book.objects.create(author=inner[0], title="inner")
                    Author.objects.create(id=2, name="dup", email="dup@x")
                raise Fail("duplicate id not reported")
            except IntegrityError as e:
                out["inner_error"] = describe(e.__cause__ or e).split(":")[0]
                out["inner_ids"] = [a.id for a in inner]
            after = Author.objects.create(name="after", email="after@x")
        out["outer"] = [outer.id, after.id]
        eq("inner rows undone", Author.objects.filter(email="inner@x").count(), 0)
        eq("inner book undone", Book.objects.filter(title="inner").count(), 0)

        agg = Author.objects.aggregate(c=Count("id"), s=Sum("n"), a=Avg("n"), m=Max("n"))
        out["aggregate"] = [agg["c"], agg["s"], str(agg["a"]), agg["m"]]
        out["count"] = Author.objects.count()
        out["top3"] = list(Author.objects.order_by("-n", "id")[:3].values_list("id", "n"))
        out["names"] = list(Author.objects.order_by("name").values_list("name", flat=True))
        out["join"] = list(Book.objects.filter(author__n__gte=30).order_by("id").values_list("title", flat=True))
        out["select_related"] = [(b.title, b.author.name)
                                 for b in Book.objects.select_related("author").filter(author_id__in=[1, 2])
                                 .order_by("author_id")]
        out["ids"] = list(Author.objects.order_by("id").values_list("id", flat=True))
        # A composite primary key's update through a join: Django sends
        # `WHERE (author_id, id) IN (SELECT U0.author_id, U0.id …)` (its
        # delete too; the rows stay for the placement check).
        out["pk_update"] = Book.objects.filter(author__n__gte=30).update(title="big")
        out["pk_titles"] = list(Book.objects.order_by("author_id", "id").values_list("title", flat=True))
        out["count_distinct"] = Book.objects.aggregate(c=Count("title", distinct=True))["c"]
        # iterator(): a server-side cursor, WITH HOLD outside atomic()
        # (autocommit), fetched chunk_size rows at a time, with other
        # queries between the chunks; without hold inside atomic().
        seen = []
        for a in Author.objects.order_by("-n", "id").iterator(chunk_size=3):
            seen.append([a.id, a.n])
            if len(seen) == 4:
                out["iterator_count_between"] = Author.objects.count()
        out["iterator"] = seen
        with transaction.atomic():
            out["iterator_atomic"] = [a.id for a in Author.objects.order_by("id").iterator(chunk_size=4)]
    finally:
        connection.close()
    return out


def client_encoding_latin9():
    return encoded_keys("latin9", [("café", "crème €"), ("naïve", "œuvre"), ("Ÿ", "ž")])


def client_encoding_euc_jp():
    return encoded_keys("euc_jp", [("あい", "日本"), ("漢字", "カタカナ"), ("plain", "x")])


def cancel():
    with connect() as c:
        done = threading.Event()

        def canceller():
            # A cancel sent before the query reaches the server is lost (as
            # directly): send again until the query ends, bounded.
            deadline = time.monotonic() + 10
            while not done.wait(0.2) and time.monotonic() < deadline:
                c.cancel_safe(timeout=5)

        t = threading.Thread(target=canceller)
        start = time.monotonic()
        t.start()
        try:
            c.execute("SELECT pg_sleep(30)")
            raise Fail("pg_sleep was not cancelled")
        except errors.QueryCanceled as e:
            err = describe(e)
        finally:
            done.set()
            t.join()
        spent = time.monotonic() - start
        if spent > 12:
            raise Fail(f"cancel took {spent:.1f}s")
        eq("usable after", c.execute("SELECT 1").fetchone(), (1,))
    eq("error", err.split(":")[0], "QueryCanceled 57014")
    return err


def sharded_keys():
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_kv")
        c.execute("CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text)")
        for i in range(1, 21):
            c.execute("INSERT INTO drv_kv (id, v) VALUES (%s, %s)", [i, f"v{i}"])
        for i in range(1, 21):
            eq(f"read {i}", c.execute("SELECT v FROM drv_kv WHERE id = %s", [i]).fetchone(), (f"v{i}",))
        with c.transaction():
            c.execute("UPDATE drv_kv SET v = v || '+' WHERE id = %s", [5])
        c.execute("DELETE FROM drv_kv WHERE id = %s", [20])
        rows = c.execute("SELECT id, v FROM drv_kv ORDER BY id").fetchall()
    want = [(i, f"v{i}+" if i == 5 else f"v{i}") for i in range(1, 20)]
    eq("rows", rows, want)
    return "ids 1..19, 5 updated"


def server_cursor():
    """A named (server-side) cursor: DECLARE, FETCH, CLOSE."""
    with connect(autocommit=False) as c:
        cur = c.cursor(name="drv_cur")
        cur.execute("SELECT g FROM generate_series(1, 10) g")
        first = [r[0] for r in cur.fetchmany(3)]
        rest = [r[0] for r in cur.fetchall()]
        cur.close()
        c.commit()
    eq("first", first, [1, 2, 3])
    eq("rest", rest, list(range(4, 11)))
    return [first, rest]


def server_cursor_sharded():
    """A named cursor over a sharded table with ORDER BY and a parameter:
    on several shards, declared on each and merged by the node."""
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_curs")
        c.execute("CREATE TABLE drv_curs (id bigint PRIMARY KEY, v text)")
        values = ", ".join(f"({i}, 'v{i}')" for i in range(1, 31))
        c.execute(f"INSERT INTO drv_curs (id, v) VALUES {values}")
    with connect(autocommit=False) as c:
        cur = c.cursor(name="drv_cur_s")
        cur.execute("SELECT id, v FROM drv_curs WHERE id > %s ORDER BY id DESC", [5])
        first = cur.fetchmany(4)
        rest = cur.fetchall()
        cur.close()
        c.commit()
    eq("first", first, [(i, f"v{i}") for i in range(30, 26, -1)])
    eq("rest", rest, [(i, f"v{i}") for i in range(26, 5, -1)])
    return [list(first[0]), list(rest[-1]), len(rest)]


def server_cursor_withhold():
    """A named cursor WITH HOLD in autocommit (Django's `.iterator()`
    outside `atomic()`), over a sharded table: declared outside a
    transaction block, fetched in parts across statements in the query's
    order, every row once; other statements in between; closed."""
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_curh")
        c.execute("CREATE TABLE drv_curh (id bigint PRIMARY KEY, v text)")
        values = ", ".join(f"({i}, 'v{i}')" for i in range(1, 41))
        c.execute(f"INSERT INTO drv_curh (id, v) VALUES {values}")
        cur = c.cursor(name="drv_cur_h", withhold=True)
        cur.itersize = 7
        cur.execute("SELECT id, v FROM drv_curh WHERE id > %s ORDER BY id DESC", [3])
        first = cur.fetchmany(5)
        # Other statements of the same connection in between.
        c.execute("UPDATE drv_curh SET v = 'changed' WHERE id = 30")
        n = c.execute("SELECT count(*) FROM drv_curh").fetchone()[0]
        rest = list(cur)
        cur.close()
        again = c.execute("SELECT v FROM drv_curh WHERE id = 30").fetchone()[0]
    eq("first", first, [(i, f"v{i}") for i in range(40, 35, -1)])
    eq("rest", rest, [(i, f"v{i}") for i in range(35, 3, -1)])
    eq("count", n, 40)
    eq("changed", again, "changed")
    return [list(first[0]), list(rest[-1]), len(rest), n]


def subqueries_first():
    """Subqueries that need every shard's rows, run first by the node: an
    average compared with (a parameter beside it: psycopg binds on the
    server), a count over DISTINCT of another column, IN (… LIMIT n)
    (drv_kv, sharded by id)."""
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_kv")
        c.execute("CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text, g int)")
        values = ", ".join(f"({i}, 'v{i}', {i % 7})" for i in range(1, 61))
        c.execute(f"INSERT INTO drv_kv (id, v, g) VALUES {values}")
        # Seven times: past psycopg's prepare_threshold (5) the statement
        # is prepared under a name and bound by it.
        counts = [c.execute(
            "SELECT count(*) FROM drv_kv WHERE id > (SELECT avg(id) FROM drv_kv) AND g <> %s",
            [0],
        ).fetchone()[0] for _ in range(7)]
        above = counts[-1]
        eq("counts", counts, [26] * 7)
        groups = c.execute("SELECT count(*) FROM (SELECT DISTINCT g FROM drv_kv) s").fetchone()[0]
        top = [r[0] for r in c.execute(
            "SELECT id FROM drv_kv WHERE id IN (SELECT id FROM drv_kv ORDER BY v DESC LIMIT 3) ORDER BY id"
        ).fetchall()]
    eq("above", above, 26)
    eq("groups", groups, 7)
    eq("top", top, [7, 8, 9])
    return [above, groups, top]


def enum_type():
    """A user enum type, its OID fetched once by the driver (EnumInfo) and
    used for every row of a sharded table, in binary."""
    import enum
    from psycopg.types.enum import EnumInfo, register_enum

    class Mood(enum.Enum):
        sad = "sad"
        ok = "ok"
        happy = "happy"

    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_enum")
        c.execute("DROP TYPE IF EXISTS drv_mood")
        c.execute("CREATE TYPE drv_mood AS ENUM ('sad', 'ok', 'happy')")
        c.execute("CREATE TABLE drv_enum (id bigint PRIMARY KEY, m drv_mood)")
        info = EnumInfo.fetch(c, "drv_mood")
        register_enum(info, c, Mood)
        moods = list(Mood)
        for i in range(1, 11):
            c.execute("INSERT INTO drv_enum (id, m) VALUES (%s, %s)", [i, moods[i % 3]])
        cur = c.cursor(binary=True)
        got = [cur.execute("SELECT m FROM drv_enum WHERE id = %s", [i]).fetchone()[0] for i in range(1, 11)]
    eq("moods", got, [moods[i % 3] for i in range(1, 11)])
    return [m.value for m in got]


def copy_rows():
    """COPY FROM STDIN and COPY TO STDOUT through psycopg's copy API."""
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_copy")
        c.execute("CREATE TABLE drv_copy (id int, t text, b bytea)")
        cur = c.cursor()
        with cur.copy("COPY drv_copy (id, t, b) FROM STDIN") as cp:
            for i in range(1, 101):
                cp.write_row((i, f"row {i}\ttab", bytes([i % 256])))
        eq("rowcount", cur.rowcount, 100)
        out = []
        with cur.copy("COPY (SELECT id, t FROM drv_copy WHERE id <= 3 ORDER BY id) TO STDOUT") as cp:
            for row in cp.rows():
                out.append(row)
        eq("copied out", out, [(str(i), f"row {i}\ttab") for i in range(1, 4)])
        got = c.execute("SELECT count(*), sum(id) FROM drv_copy").fetchone()
        eq("rows", got, (100, 5050))
    return [list(got), len(out)]


def temp_table():
    """A temporary table used by later statements of the session, in
    autocommit, while another client holds a transaction open (PostgreSQL
    keeps the table for the session, whatever other clients do)."""
    with connect() as c, connect(autocommit=False) as other:
        c.execute("CREATE TEMP TABLE drv_tmp (a int)")
        other.execute("SELECT 1")  # a transaction stays open
        c.execute("INSERT INTO drv_tmp VALUES (1), (2)")
        got = c.execute("SELECT sum(a) FROM drv_tmp").fetchone()
        other.rollback()
    eq("sum", got, (3,))
    return list(got)


def tpc():
    """psycopg's two-phase commit API, as a transaction manager uses it:
    four transactions prepared (their rows on different shards), found
    again by tpc_recover() from another connection as a recovery after a
    crash does, then two committed and two rolled back by identifier."""
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS drv_kv")
        c.execute("CREATE TABLE drv_kv (id bigint PRIMARY KEY, v text)")
    xids = {}
    for i in (1, 2, 3, 4):
        # Not a `with` block: leaving one would commit, which psycopg
        # forbids after tpc_prepare(); the prepared transaction outlives
        # the connection.
        c = connect(autocommit=False)
        try:
            xids[i] = c.xid(7, f"drv-gtrid-{i}", "drv-bqual")
            c.tpc_begin(xids[i])
            c.execute("INSERT INTO drv_kv (id, v) VALUES (%s, %s)", [i, f"tpc{i}"])
            c.tpc_prepare()
        finally:
            c.close()
    with connect(autocommit=False) as other:
        found = sorted(
            x.gtrid for x in other.tpc_recover() if x.gtrid.startswith("drv-gtrid-")
        )
        eq("recovered", found, [f"drv-gtrid-{i}" for i in (1, 2, 3, 4)])
        for i in (1, 2, 3, 4):
            if i % 2:
                other.tpc_commit(xids[i])
            else:
                other.tpc_rollback(xids[i])
        left = [x.gtrid for x in other.tpc_recover() if x.gtrid.startswith("drv-gtrid-")]
        eq("left prepared", left, [])
    with connect() as c:
        rows = c.execute("SELECT id, v FROM drv_kv ORDER BY id").fetchall()
    eq("rows", rows, [(1, "tpc1"), (3, "tpc3")])
    return [found, [list(r) for r in rows]]


def sql_prepare():
    """SQL-level PREPARE / EXECUTE / DEALLOCATE, in autocommit, while
    another client holds a transaction open."""
    with connect() as c, connect(autocommit=False) as other:
        c.execute("PREPARE drv_q (int) AS SELECT $1 + 1")
        other.execute("SELECT 1")  # a transaction stays open
        got = [c.execute("EXECUTE drv_q (%s)" % i).fetchone()[0] for i in (1, 2)]
        c.execute("DEALLOCATE drv_q")
        other.rollback()
    eq("results", got, [2, 3])
    return got


run([
    ("types", types),
    ("transactions", transactions),
    ("executemany", executemany),
    ("executemany_error", executemany_error),
    ("pipeline_aborted", pipeline_aborted),
    ("pipeline_mixed", pipeline_mixed),
    ("prepared_after_alter", prepared_after_alter),
    ("listen_notify", listen_notify),
    ("client_encoding", client_encoding),
    ("executemany_sharded", executemany_sharded),
    ("executemany_in_transaction", executemany_in_transaction),
    ("orm_generated_keys", orm_generated_keys),
    ("sqlalchemy_orm", sqlalchemy_orm),
    ("django_orm", django_orm),
    ("client_encoding_latin9", client_encoding_latin9),
    ("client_encoding_euc_jp", client_encoding_euc_jp),
    ("cancel", cancel),
    ("sharded_keys", sharded_keys),
    ("server_cursor", server_cursor),
    ("server_cursor_sharded", server_cursor_sharded),
    ("server_cursor_withhold", server_cursor_withhold),
    ("enum_type", enum_type),
    ("subqueries_first", subqueries_first),
    ("copy_rows", copy_rows),
    ("temp_table", temp_table),
    ("sql_prepare", sql_prepare),
    ("tpc", tpc),
], sys.argv[2:])
