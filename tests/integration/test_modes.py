"""Pool modes through pgherd with real clients (psycopg 3, asyncpg, a raw wire client):
queries, transactions, errors, statement-mode refusals, server sharing, NOTICE, NOTIFY,
FunctionCall, and a client that dies in the middle of a transaction.

Reference: PgBouncer's pool modes (reference/pgbouncer.md §4.1, §4.9, §4.10).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest

from tests import wire
from tests.helpers import wait_for

MODES = ["session", "transaction", "statement"]
STATEMENT_MODE_ERROR = "transaction blocks not allowed in statement pooling mode"


def _table_name() -> str:
    return "t_" + uuid.uuid4().hex[:10]


@pytest.fixture
def table(pg):
    """A fresh table ``(id int primary key, v int)`` with rows 1..3 (v = 10 * id) in p0,
    usable by every role; dropped afterwards."""
    name = _table_name()
    pg.sql(f"CREATE TABLE {name} (id int PRIMARY KEY, v int NOT NULL)")
    pg.sql(f"INSERT INTO {name} SELECT i, 10 * i FROM generate_series(1, 3) i")
    pg.sql(f"GRANT ALL ON {name} TO PUBLIC")
    yield name
    pg.sql(f"DROP TABLE IF EXISTS {name}")


def _connect(h, mode: str, **kw) -> psycopg.Connection:
    # Named prepared statements are not supported in transaction/statement mode yet:
    # psycopg must not PREPARE (its default is to do so after 5 executions).
    if mode != "session":
        kw.setdefault("prepare_threshold", None)
    return h.connect(**kw)


def _asyncpg_kw(mode: str) -> dict:
    # asyncpg uses unnamed statements only when its statement cache is off.
    return {} if mode == "session" else {"statement_cache_size": 0}


# --------------------------------------------------------------------------------------
# psycopg: queries, transactions, errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_psycopg_queries_and_errors(pgherd, table, mode):
    h = pgherd(settings={"pool_mode": mode})
    with _connect(h, mode) as conn:
        assert conn.execute("SELECT 1, 'x'::text").fetchone() == (1, "x")
        # extended protocol with parameters, more often than psycopg's prepare threshold
        for i in range(8):
            assert conn.execute("SELECT %s::int * 2", [i]).fetchone() == (2 * i,)
        assert conn.execute(f"SELECT id, v FROM {table} ORDER BY id").fetchall() == [
            (1, 10), (2, 20), (3, 30)]
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", [4, 40])
        # a server-side error does not cost the connection
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table_here")
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SELEKT 1")
        assert conn.execute("SELECT 2").fetchone() == (2,)
        assert conn.execute(f"SELECT v FROM {table} WHERE id = 4").fetchone() == (40,)
        # several statements in one simple Query are one implicit transaction
        cur = conn.cursor()
        cur.execute(f"UPDATE {table} SET v = 41 WHERE id = 4; SELECT v FROM {table} WHERE id = 4",
                    prepare=False)
        assert cur.statusmessage == "UPDATE 1"
        assert cur.nextset()
        assert cur.fetchone() == (41,)
    assert not conn.broken


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_psycopg_transactions(pgherd, pg, table, mode):
    h = pgherd(settings={"pool_mode": mode})
    with _connect(h, mode, autocommit=False) as conn:
        # commit: visible to everyone afterwards
        conn.execute(f"INSERT INTO {table} VALUES (4, 40)")
        conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
        conn.commit()
        assert pg.sql(f"SELECT v FROM {table} WHERE id IN (1, 4) ORDER BY id") == [(11,), (40,)]

        # rollback: nothing happened
        conn.execute(f"INSERT INTO {table} VALUES (5, 50)")
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (5,)
        conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (4,)
        conn.rollback()

        # an error inside a transaction aborts it; the next transaction works
        conn.execute(f"INSERT INTO {table} VALUES (6, 60)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO {table} VALUES (1, 1)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE id = 6").fetchone() == (0,)
        conn.execute(f"INSERT INTO {table} VALUES (7, 70)")
        conn.commit()

        # a transaction context manager; an exception inside rolls back
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (8, 80)")
                conn.execute("SELECT 1/0")
        conn.rollback()
    assert pg.sql(f"SELECT id FROM {table} ORDER BY id") == [(1,), (2,), (3,), (4,), (7,)]


# --------------------------------------------------------------------------------------
# asyncpg
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_asyncpg_queries_and_transactions(pgherd, pg, table, mode):
    h = pgherd(settings={"pool_mode": mode})

    async def run() -> None:
        conn = await asyncpg.connect(h.dsn(), **_asyncpg_kw(mode))
        try:
            assert await conn.fetchval("SELECT 1") == 1
            for i in range(8):
                assert await conn.fetchval("SELECT $1::int + $2::int", i, 1) == i + 1
            rows = await conn.fetch(f"SELECT id, v FROM {table} ORDER BY id")
            assert [tuple(r) for r in rows] == [(1, 10), (2, 20), (3, 30)]
            assert await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 4, 40) == "INSERT 0 1"
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval("SELECT 1/0")
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("SELECT * FROM no_such_table_here")
            assert await conn.fetchval("SELECT 3") == 3
            if mode == "statement":
                return
            async with conn.transaction():
                await conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (5, 50)")
                    await conn.execute(f"INSERT INTO {table} VALUES (1, 1)")
            # error inside an explicit transaction: aborted until ROLLBACK
            tr = conn.transaction()
            await tr.start()
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval("SELECT 1/0")
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
            await tr.rollback()
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 4
        finally:
            await conn.close()

    asyncio.run(run())
    if mode != "statement":
        assert pg.sql(f"SELECT id, v FROM {table} ORDER BY id") == [
            (1, 11), (2, 20), (3, 30), (4, 40)]


# --------------------------------------------------------------------------------------
# statement mode: transaction blocks are refused
# --------------------------------------------------------------------------------------


def test_statement_mode_refuses_begin_psycopg(pgherd, pg):
    h = pgherd(settings={"pool_mode": "statement"}, workers=1)
    conn = h.connect(prepare_threshold=None)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.Error) as ei:
            conn.execute("BEGIN")
        err = ei.value
        assert STATEMENT_MODE_ERROR in str(err)
        assert err.sqlstate == "08P01", (err.sqlstate, str(err))
        assert err.diag.severity == "FATAL"
        # the client was disconnected
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    # the server that went into a transaction was not kept open in that state
    wait_for(lambda: not pg.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = 'p0' AND state LIKE 'idle in%'",
        dbname="postgres"), timeout=10, message="no idle-in-transaction backend left")
    # and the pooler carries on
    with h.connect(prepare_threshold=None) as c2:
        assert c2.execute("SELECT txid_current_if_assigned()").fetchone() == (None,)


def test_statement_mode_refuses_transactions_asyncpg(pgherd):
    h = pgherd(settings={"pool_mode": "statement"}, workers=1)

    async def run():
        conn = await asyncpg.connect(h.dsn(), statement_cache_size=0)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            with pytest.raises(asyncpg.PostgresError) as ei:
                async with conn.transaction():
                    await conn.fetchval("SELECT 2")
            return ei.value
        finally:
            await conn.close()

    err = asyncio.run(run())
    # asyncpg reports a FATAL error followed by the connection's end as
    # ConnectionDoesNotExistError carrying the server's message; either way the text is
    # PgBouncer's.
    assert isinstance(err, (asyncpg.ProtocolViolationError,
                            asyncpg.ConnectionDoesNotExistError)), (type(err), err)
    assert STATEMENT_MODE_ERROR in str(err)


# --------------------------------------------------------------------------------------
# who gets which server
# --------------------------------------------------------------------------------------


def test_transaction_mode_shares_few_servers(pgherd, pg):
    # Pool limits are per worker in this stage of pgherd: one worker makes the bound exact.
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 2}, workers=1)
    n_clients, rounds = 10, 5
    conns = [h.connect("p1", "app", prepare_threshold=None) for _ in range(n_clients)]
    pids: set[int] = set()
    errors: list[BaseException] = []
    max_backends = 0
    done = threading.Event()
    barrier = threading.Barrier(n_clients)

    def client(conn: psycopg.Connection) -> None:
        try:
            barrier.wait(10)
            for _ in range(rounds):
                with conn.transaction():
                    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                    conn.execute("SELECT pg_sleep(0.02)")
                pids.add(pid)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def monitor() -> None:
        nonlocal max_backends
        while not done.is_set():
            max_backends = max(max_backends, pg.backends("p1", "app"))

    threads = [threading.Thread(target=client, args=(c,)) for c in conns]
    mon = threading.Thread(target=monitor)
    mon.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    mon.join(10)
    try:
        assert not errors, errors
        assert all(not t.is_alive() for t in threads)
        # all ten clients are still connected, served by at most two backends
        assert all(c.execute("SELECT 1").fetchone() == (1,) for c in conns)
        assert 1 <= len(pids) <= 2, pids
        assert 1 <= max_backends <= 2, max_backends
        assert pg.backends("p1", "app") <= 2
    finally:
        for c in conns:
            c.close()


def test_session_mode_keeps_backend(pgherd, pg):
    h = pgherd(settings={"pool_mode": "session"})
    with h.connect() as a, h.connect() as b:
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        pid_b = b.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pid_a != pid_b
        a.execute("SET work_mem = '7MB'")  # session state that pgherd does not track
        a.execute("CREATE TEMP TABLE tmp_session (x int)")
        for _ in range(5):
            b.execute("SELECT 1")
            assert a.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_a
        with a.transaction():
            assert a.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_a
        assert a.execute("SHOW work_mem").fetchone() == ("7MB",)
        assert a.execute("SELECT count(*) FROM tmp_session").fetchone() == (0,)
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_b


def test_transaction_mode_releases_between_transactions(pgherd, pg):
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 1}, workers=1)
    a = h.connect(prepare_threshold=None)
    b = h.connect(prepare_threshold=None)
    try:
        # one server, taken in turns
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert a.execute("SELECT pg_backend_pid()").fetchone()[0] == pid

        # a's open transaction keeps the server: b waits in the pool...
        a.execute("BEGIN")
        a.execute("SELECT pg_backend_pid()")
        result: list = []
        t = threading.Thread(target=lambda: result.append(
            b.execute("SELECT pg_backend_pid(), 42").fetchone()))
        t.start()
        wait_for(lambda: any(r["cl_waiting"] == 1 for r in h.admin_dicts("SHOW POOLS")
                             if r["database"] == "p0"),
                 timeout=10, message="b waiting for the only server")
        assert not result
        # ...until a commits
        a.execute("COMMIT")
        t.join(10)
        assert result == [(pid, 42)]
        assert a.execute("SELECT 1").fetchone() == (1,)
        assert pg.backends("p0", "postgres") == 1
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------------------
# NOTICE, NOTIFY, FunctionCall
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_notice_reaches_client(pgherd, mode):
    h = pgherd(settings={"pool_mode": mode})
    notices: list[str] = []
    with _connect(h, mode) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("DO $$BEGIN RAISE NOTICE 'hello %', 42; END$$")
        assert notices == ["hello 42"]
        conn.execute("DO $$BEGIN RAISE WARNING 'careful'; END$$")
        assert notices == ["hello 42", "careful"]

    async def run() -> list[str]:
        got: list[str] = []
        conn = await asyncpg.connect(h.dsn(), **_asyncpg_kw(mode))
        try:
            conn.add_log_listener(lambda c, msg: got.append(msg.message))
            await conn.execute("DO $$BEGIN RAISE NOTICE 'from %', 'asyncpg'; END$$")
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the listener callback runs from the loop
            return got
        finally:
            await conn.close()

    assert asyncio.run(run()) == ["from asyncpg"]


def test_listen_notify_session_mode(pgherd, pg):
    h = pgherd(settings={"pool_mode": "session"})
    with h.connect() as listener, h.connect() as sender:
        listener.execute("LISTEN pgherd_chan")
        sender.execute("NOTIFY pgherd_chan, 'through pgherd'")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload) for n in got] == [("pgherd_chan", "through pgherd")]
        # from a direct connection, while the listener sits idle
        pg.sql("SELECT pg_notify('pgherd_chan', 'direct')")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload) for n in got] == [("pgherd_chan", "direct")]
        assert listener.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("mode", MODES)
def test_function_call(pgherd, pg, mode):
    """FunctionCall ('F') is relayed and ends a transaction like a query (libpq's PQfn;
    no Python driver exposes it, so a raw wire client sends it)."""
    (oid,) = pg.sql("SELECT 'int4pl'::regproc::oid")[0]
    h = pgherd(settings={"pool_mode": mode, "default_pool_size": 1}, workers=1)
    with wire.RawClient(h.host, h.port) as c:
        c.login("postgres", "p0")
        c.send(wire.function_call(oid, [b"40", b"2"]))
        msgs = c.read_until_ready()
        assert [t for t, _ in msgs] == [b"V", b"Z"], msgs
        body = msgs[0][1]
        assert body[4:] == b"42" and int.from_bytes(body[:4], "big") == 2
        assert msgs[-1][1] == b"I"
        # the only server went back to the pool: another client gets it (not in session mode,
        # where it stays with this client)
        if mode != "session":
            with h.connect(prepare_threshold=None) as other:
                assert other.execute("SELECT 7").fetchone() == (7,)
        # and the wire client still works
        assert wire.data_rows(c.simple("SELECT 'still here'")) == [["still here"]]
        c.send(wire.TERMINATE)


# --------------------------------------------------------------------------------------
# a client that dies inside a transaction
# --------------------------------------------------------------------------------------


def _idle_in_transaction(pg, user: str) -> list[tuple]:
    return pg.sql(
        "SELECT pid, state, query FROM pg_stat_activity "
        "WHERE datname = 'p0' AND usename = %s AND state LIKE 'idle in transaction%%'",
        dbname="postgres", params=[user])


def _row_lock_free(pg, table: str) -> bool:
    """Can a direct client lock row 1 now? (It rolls back: the row stays as it was.)"""
    with pg.connect(autocommit=False) as conn:
        conn.execute("SET lock_timeout = '100ms'")
        try:
            conn.execute(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE")
        except psycopg.errors.LockNotAvailable:
            return False
        finally:
            conn.rollback()
    return True


def _assert_clean_after_death(h, pg, table: str, mode: str) -> None:
    wait_for(lambda: not _idle_in_transaction(pg, "app"), timeout=10,
             message=lambda: f"no idle-in-transaction backend: {_idle_in_transaction(pg, 'app')}")
    wait_for(lambda: _row_lock_free(pg, table), timeout=10, message="row 1 unlocked")
    # the dead client's update was rolled back
    assert pg.sql(f"SELECT v FROM {table} WHERE id = 1") == [(10,)]
    # the next client through pgherd (pool_size 1) gets a clean server
    with h.connect(user="app", prepare_threshold=None) as conn:
        assert conn.execute("SELECT txid_current_if_assigned()").fetchone() == (None,)
        assert conn.execute(f"SELECT v FROM {table} WHERE id = 1").fetchone() == (10,)
        conn.execute(f"UPDATE {table} SET v = 11 WHERE id = 1")
    assert pg.sql(f"SELECT v FROM {table} WHERE id = 1") == [(11,)]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_socket_dropped_mid_transaction(pgherd, pg, table, mode):
    h = pgherd(settings={"pool_mode": mode, "default_pool_size": 1}, workers=1)
    c = wire.RawClient(h.host, h.port)
    c.login("app", "p0")
    msgs = c.simple(f"BEGIN; UPDATE {table} SET v = v + 100 WHERE id = 1")
    assert not wire.errors_in(msgs), msgs
    assert msgs[-1] == (b"Z", b"T")
    assert len(_idle_in_transaction(pg, "app")) == 1
    c.abort()  # RST, no Terminate
    _assert_clean_after_death(h, pg, table, mode)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_process_killed_mid_transaction(pgherd, pg, table, mode):
    h = pgherd(settings={"pool_mode": mode, "default_pool_size": 1}, workers=1)
    script = textwrap.dedent(f"""
        import sys, time, psycopg
        conn = psycopg.connect(sys.argv[1], prepare_threshold=None)
        conn.execute("UPDATE {table} SET v = v + 100 WHERE id = 1")
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, h.dsn(user="app")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "locked", (line, proc.stderr.read() if proc.poll() is not None else "")
        assert len(_idle_in_transaction(pg, "app")) == 1
        assert not _row_lock_free(pg, table)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _assert_clean_after_death(h, pg, table, mode)
