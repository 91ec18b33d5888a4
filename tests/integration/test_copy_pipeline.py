"""COPY both ways and extended-protocol pipelines through pgherd in transaction mode
(reference/pgbouncer.md §4.1 release rules, §4.9 COPY).

Each test runs one worker with pool_size 1 and, where it matters, a second client that uses
the same server between (or during) the first one's work: a server released too early -- in
the middle of a COPY or with Syncs still in flight -- shows up as wrong results or protocol
errors on one of the two clients.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import subprocess
import threading
import uuid

import asyncpg
import psycopg
import pytest

from tests import wire
from tests.helpers import wait_for

# query_wait_timeout bounds the wait of a client whose server is never released: such a
# bug then fails the test in seconds with "query_wait_timeout" instead of hanging it.
TXN_ONE_SERVER = {"pool_mode": "transaction", "default_pool_size": 1, "query_wait_timeout": 10}


@pytest.fixture
def table(pg):
    name = "c_" + uuid.uuid4().hex[:10]
    pg.sql(f"CREATE TABLE {name} (id int PRIMARY KEY, payload text NOT NULL)")
    pg.sql(f"GRANT ALL ON {name} TO PUBLIC")
    yield name
    pg.sql(f"DROP TABLE IF EXISTS {name}")


def connect(h, **kw) -> psycopg.Connection:
    return h.connect(prepare_threshold=None, **kw)


class Neighbour:
    """Another client hammering the same pool with small queries in a thread, checking
    every answer, until stopped."""

    def __init__(self, h) -> None:
        self.conn = connect(h)
        self.count = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                n = self.count
                got = self.conn.execute("SELECT %s::int + 1, 'neighbour'", [n]).fetchone()
                if got != (n + 1, "neighbour"):
                    raise AssertionError(f"neighbour got {got!r} for {n}")
                self.count += 1
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> "Neighbour":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.conn.close()
        assert not self._thread.is_alive(), "neighbour stuck"
        assert not self.errors, self.errors
        assert self.count > 0


def _copy_text(n: int, width: int = 100) -> bytes:
    """COPY text-format rows id<TAB>payload, ~width bytes each."""
    lines = []
    for i in range(n):
        payload = (f"row {i} " + "x" * width)[:width]
        lines.append(f"{i}\t{payload}\n")
    return "".join(lines).encode()


# --------------------------------------------------------------------------------------
# psycopg COPY
# --------------------------------------------------------------------------------------


def test_copy_in_and_out_large(pgherd, pg, table):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    n = 50_000
    data = _copy_text(n)  # ~5 MB
    assert len(data) > 5_000_000
    with Neighbour(h) as neighbour, connect(h) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, payload) FROM STDIN") as cp:
                for off in range(0, len(data), 256 * 1024):
                    cp.write(data[off : off + 256 * 1024])
            assert cur.rowcount == n
        assert pg.sql(f"SELECT count(*), sum(length(payload)) FROM {table}") == [(n, n * 100)]
        before = neighbour.count

        out = bytearray()
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT id, payload FROM {table} ORDER BY id) TO STDOUT") as cp:
                for chunk in cp:
                    out += chunk
        assert len(out) == len(data)
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()

        # COPY rows written one by one, inside an explicit transaction
        with conn.transaction():
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (id, payload) FROM STDIN") as cp:
                    for i in range(n, n + 1000):
                        cp.write_row((i, f"row {i}"))
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (n + 1000,)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert neighbour.count > before  # the neighbour got the server between COPYs
    assert pg.sql(f"SELECT count(*) FROM {table}") == [(n + 1000,)]


def test_copy_errors_leave_connection_usable(pgherd, pg, table):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    with connect(h) as conn, connect(h) as other:
        # the server rejects the data in the middle of a COPY
        good = _copy_text(2000)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (id, payload) FROM STDIN") as cp:
                    cp.write(good)
                    cp.write(b"not-a-number\tboom\n")
                    cp.write(_copy_text(10))
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert other.execute("SELECT 2").fetchone() == (2,)

        # the client gives up in the middle: psycopg sends CopyFail, re-raises its error
        with pytest.raises(RuntimeError, match="changed its mind"):
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (id, payload) FROM STDIN") as cp:
                    cp.write(good)
                    raise RuntimeError("client changed its mind")
        assert conn.execute("SELECT 3").fetchone() == (3,)
        assert other.execute("SELECT 4").fetchone() == (4,)

        # COPY TO STDOUT of a failing query
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.cursor() as cur:
                with cur.copy("COPY (SELECT 1/(g - 500) FROM generate_series(1, 1000) g) TO STDOUT") as cp:
                    for _ in cp:
                        pass
        assert conn.execute("SELECT 5").fetchone() == (5,)
        assert other.execute("SELECT 6").fetchone() == (6,)
    assert pg.sql(f"SELECT count(*) FROM {table}") == [(0,)]


def test_psql_copy(pgherd, pg, table, tmp_path):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    src = tmp_path / "rows.txt"
    src.write_bytes(_copy_text(3000))
    dst = tmp_path / "out.txt"
    script = (f"\\copy {table} (id, payload) from '{src}'\n"
              f"\\copy (SELECT id, payload FROM {table} ORDER BY id) to '{dst}'\n"
              f"SELECT count(*) FROM {table};\n")
    proc = subprocess.run([pg.psql_path, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", h.dsn()],
                          input=script, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["COPY", "3000", "COPY", "3000", "3000"]
    assert dst.read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------------------
# asyncpg COPY
# --------------------------------------------------------------------------------------


def test_asyncpg_copy(pgherd, pg, table):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    n = 20_000

    async def run():
        conn = await asyncpg.connect(h.dsn(), statement_cache_size=0)
        other = await asyncpg.connect(h.dsn(), statement_cache_size=0)
        try:
            # the neighbour uses the one server first: conn's COPY must give it back after
            assert await other.fetchval("SELECT 1") == 1
            # binary COPY FROM STDIN
            records = [(i, f"record {i} " + "y" * 50) for i in range(n)]
            status = await conn.copy_records_to_table(table, records=records,
                                                      columns=["id", "payload"])
            assert status == f"COPY {n}"
            assert await other.fetchval(f"SELECT count(*) FROM {table}") == n
            # COPY TO STDOUT into a file-like object
            out = io.BytesIO()
            status = await conn.copy_from_query(
                f"SELECT id, payload FROM {table} ORDER BY id", output=out, format="csv")
            assert status == f"COPY {n}"
            lines = out.getvalue().decode().splitlines()
            assert len(lines) == n
            assert lines[0] == f"0,record 0 {'y' * 50}"
            assert lines[-1] == f"{n - 1},record {n - 1} {'y' * 50}"
            # text COPY FROM a file-like source
            src = io.BytesIO(b"".join(f"{i},src {i}\n".encode() for i in range(n, n + 500)))
            status = await conn.copy_to_table(table, source=src, columns=["id", "payload"],
                                              format="csv")
            assert status == "COPY 500"
            assert await other.fetchval(f"SELECT count(*) FROM {table}") == n + 500
            # a failing binary COPY (duplicate key) leaves the connection usable
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.copy_records_to_table(table, records=[(1, "dup")],
                                                 columns=["id", "payload"])
            assert await conn.fetchval("SELECT 42") == 42
            assert await other.fetchval("SELECT 43") == 43
        finally:
            await conn.close()
            await other.close()

    asyncio.run(run())
    assert pg.sql(f"SELECT count(*) FROM {table}") == [(n + 500,)]


# --------------------------------------------------------------------------------------
# extended protocol: pipelines, executemany, unnamed statements
# --------------------------------------------------------------------------------------


def test_psycopg_pipeline(pgherd, pg, table):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    with Neighbour(h), connect(h) as conn:
        for rnd in range(20):
            base = rnd * 10
            with conn.pipeline() as p:
                c1 = conn.execute(f"INSERT INTO {table} VALUES (%s, %s) RETURNING id",
                                  [base, "a"])
                c2 = conn.execute("SELECT %s::text || 'x'", [str(rnd)])
                p.sync()
                c3 = conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", [base + 1, "b"])
                c4 = conn.execute(f"SELECT count(*) FROM {table} WHERE id >= %s", [base])
                p.sync()
                c5 = conn.execute("SELECT pg_backend_pid() > 0")
                c6 = conn.execute("SELECT generate_series(1, 100)")
            assert c1.fetchone() == (base,)
            assert c2.fetchone() == (f"{rnd}x",)
            assert c3.rowcount == 1
            assert c4.fetchone() == (2,)
            assert c5.fetchone() == (True,)
            assert [r[0] for r in c6.fetchall()] == list(range(1, 101))

        # an error in the middle: its sync segment is rolled back, the earlier one stays
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline() as p:
                conn.execute(f"INSERT INTO {table} VALUES (1000, 'kept')")
                p.sync()
                conn.execute(f"INSERT INTO {table} VALUES (1001, 'rolled back')")
                conn.execute("SELECT 1/0")
                conn.execute(f"INSERT INTO {table} VALUES (1002, 'never run')")
        assert conn.execute(
            f"SELECT id FROM {table} WHERE id >= 1000 ORDER BY id").fetchall() == [(1000,)]

        # and the connection carries on with pipelines
        with conn.pipeline():
            c = conn.execute("SELECT 'after'")
        assert c.fetchone() == ("after",)
    assert pg.sql(f"SELECT count(*) FROM {table}") == [(41,)]


def test_psycopg_executemany(pgherd, pg, table):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    with Neighbour(h), connect(h) as conn:
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)",
                            [(i, f"m{i}") for i in range(2000)])
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s) RETURNING id * 2",
                            [(i, "r") for i in range(2000, 2010)], returning=True)
            got = []
            while True:
                got.append(cur.fetchone()[0])
                if not cur.nextset():
                    break
            assert got == [2 * i for i in range(2000, 2010)]
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.transaction():
                conn.cursor().executemany(f"INSERT INTO {table} VALUES (%s, %s)",
                                          [(5000, "x"), (5001, "y"), (1, "dup")])
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (2010,)
    assert pg.sql(f"SELECT count(*) FROM {table}") == [(2010,)]


def test_asyncpg_executemany_and_unnamed_statements(pgherd, pg, table):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)

    async def client(tag: int) -> None:
        conn = await asyncpg.connect(h.dsn(), statement_cache_size=0)
        try:
            base = tag * 10_000
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)",
                                   [(base + i, f"c{tag}-{i}") for i in range(1000)])
            for i in range(50):
                row = await conn.fetchrow(
                    f"SELECT id, payload FROM {table} WHERE id = $1", base + i)
                assert tuple(row) == (base + i, f"c{tag}-{i}")
            async with conn.transaction():
                await conn.executemany(f"UPDATE {table} SET payload = $2 WHERE id = $1",
                                       [(base + i, "upd") for i in range(100)])
                assert await conn.fetchval(
                    f"SELECT count(*) FROM {table} WHERE payload = 'upd' AND id >= $1 AND id < $2",
                    base, base + 10_000) == 100
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)",
                                       [(base + 5000, "ok"), (base, "dup")])
            assert await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE id >= $1 AND id < $2",
                base, base + 10_000) == 1000
        finally:
            await conn.close()

    async def run() -> None:
        await asyncio.gather(*(client(t) for t in range(4)))

    asyncio.run(run())
    assert pg.sql(f"SELECT count(*) FROM {table}") == [(4000,)]


def _waiting(h, db: str = "p0") -> int:
    return sum(r["cl_waiting"] for r in h.admin_dicts("SHOW POOLS") if r["database"] == db)


def test_unnamed_statement_keeps_server_until_sync_or_query(pgherd):
    """asyncpg prepares with Parse + Describe + Flush, no Sync: the unnamed statement lives
    on that server, so the server stays with the client until the Bind/Execute/Sync that
    uses it -- or until a simple Query, at whose start PostgreSQL drops the unnamed
    statement (asyncpg's copy_records_to_table does exactly that: Flush-prepared
    introspection, then a simple-protocol COPY)."""
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    with wire.RawClient(h.host, h.port) as c, connect(h) as other:
        c.login("postgres", "p0")
        for finish in ("sync", "query"):
            c.send(wire.parse("SELECT 41 + $1::int") + wire.describe_statement() + wire.FLUSH)
            c.read_types(b"1", b"t", b"T")
            # the other client has to wait for the server...
            result: list = []

            def other_query() -> None:
                try:
                    result.append(other.execute("SELECT 'other'").fetchone())
                except psycopg.Error as exc:
                    result.append(exc)

            t = threading.Thread(target=other_query)
            t.start()
            wait_for(lambda: _waiting(h) == 1, timeout=10, message="other client waiting")
            if finish == "sync":
                c.send(wire.bind([b"1"]) + wire.execute() + wire.SYNC)
                msgs = c.read_types(b"2", b"D", b"C", b"Z")
                assert wire.data_rows(msgs) == [["42"]]
            else:
                msgs = c.simple("SELECT 'simple'")
                assert wire.data_rows(msgs) == [["simple"]]
            assert msgs[-1] == (b"Z", b"I")
            # ...and gets it once the transaction is over
            t.join(15)
            assert result == [("other",)], finish
