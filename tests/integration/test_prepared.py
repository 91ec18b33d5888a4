"""Named (protocol-level) prepared statements in transaction mode: clients keep their
statements while servers change hands between their transactions and between workers."""

from __future__ import annotations

import asyncio
import re
import struct
import subprocess
import threading

import asyncpg
import psycopg
import pytest

from tests import wire
from tests.helpers import wait_read_by_peer
from tests.wire import FLUSH, RawClient, bind, data_rows, errors_in, execute, message, parse

TXN_ONE = {"pool_mode": "transaction", "default_pool_size": 1}


def test_pgbench_prepared_through_two_workers(pg, pgherd, pgbench_db):
    # pgbench prepares each command with a BLOCKING call on first use: a thread whose
    # client waits for a server stops its other clients too. With TPC-B's multi-statement
    # transactions holding servers, a pool smaller than the clients would deadlock pgbench
    # itself (PgBouncer alike), so the pool here is as large as the client count.
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 8}, workers=2)
    for script in (["-S"], []):
        out = subprocess.run(
            [pg.pgbench_path, "-n", "-h", h.host, "-p", str(h.port), "-U", "postgres",
             "-c", "8", "-j", "2", "-T", "3", "-M", "prepared", *script, pgbench_db],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "number of failed transactions: 0" in out.stdout
        assert int(re.search(r"processed: (\d+)", out.stdout).group(1)) > 100
    stats = [r for r in h.admin_dicts("SHOW STATS") if r["database"] == pgbench_db][0]
    assert stats["total_client_parse_count"] > 0
    assert stats["total_bind_count"] > stats["total_server_parse_count"] > 0


def test_psycopg_auto_prepare_with_clients_sharing_one_server(pgherd):
    """psycopg prepares a query after 5 runs (named '_pg3_0' on every connection)."""
    h = pgherd(settings=TXN_ONE, workers=2)
    errors = []

    def run(k):
        try:
            with h.connect() as conn:
                for i in range(30):
                    assert conn.execute("SELECT %s::int + %s", (i, k)).fetchone() == (i + k,)
                    assert conn.execute("SELECT %s::text", (str(k),)).fetchone() == (str(k),)
        except Exception as exc:  # collected: a thread's exception must fail the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    servers = h.admin_dicts("SHOW SERVERS")
    assert len(servers) == 1 and servers[0]["prepared_statements"] >= 2


def test_asyncpg_statement_cache_in_transaction_mode(pgherd):
    h = pgherd(settings=TXN_ONE, workers=4)

    async def one(k):
        conn = await asyncpg.connect(h.dsn())  # default statement_cache_size: named statements
        try:
            for i in range(20):
                assert await conn.fetchval("SELECT $1::int * 2", i) == 2 * i
                async with conn.transaction():
                    assert await conn.fetchval("SELECT $1::text || $2", "a", str(k)) == "a%d" % k
            stmt = await conn.prepare("SELECT $1::int + 100")
            assert await stmt.fetchval(k) == 100 + k
        finally:
            await conn.close()

    async def main():
        await asyncio.gather(*(one(k) for k in range(8)))

    asyncio.run(main())


def test_eviction_keeps_clients_working(pgherd):
    h = pgherd(settings={**TXN_ONE, "max_prepared_statements": 2}, workers=1)
    with h.connect(prepare_threshold=0) as conn:  # prepare every query at once
        for round_ in range(3):
            for k in range(5):
                assert conn.execute("SELECT %s::int + " + str(k), (round_,)).fetchone() == (
                    round_ + k,)
    servers = h.admin_dicts("SHOW SERVERS")
    assert servers[0]["prepared_statements"] <= 2


def test_deallocate_all_and_close_are_honoured(pgherd):
    h = pgherd(settings=TXN_ONE, workers=1)
    with h.connect(prepare_threshold=0) as a, h.connect(prepare_threshold=0) as b:
        assert a.execute("SELECT %s::int", (1,)).fetchone() == (1,)
        a.execute("DEALLOCATE ALL")  # psycopg forgets its statements; the server drops all
        assert b.execute("SELECT %s::int", (2,)).fetchone() == (2,)  # re-prepared for b
        assert a.execute("SELECT %s::int", (3,)).fetchone() == (3,)


def test_pgbouncers_errors_for_misused_names(pgherd):
    h = pgherd(settings={"pool_mode": "transaction"}, workers=1)
    with RawClient(h.host, h.port) as c:
        c.login("postgres", "p0")
        c.send(parse("SELECT 1", "s1") + message(b"S"))
        assert [t for t, _ in c.read_until_ready()] == [b"1", b"Z"]
        c.send(parse("SELECT 2", "s1") + message(b"S"))  # the same name again
        errors = errors_in(c.read_until_eof())
        assert errors and errors[0]["M"] == "prepared statement name is already in use"
    with RawClient(h.host, h.port) as c:
        c.login("postgres", "p0")
        c.send(message(b"B", b"\x00nosuch\x00\x00\x00\x00\x00\x00\x00") + message(b"S"))
        errors = errors_in(c.read_until_eof())
        assert errors and errors[0]["M"] == "prepared statement did not exist"


@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_pipeline_with_named_statements_and_an_error(pgherd, mode):
    h = pgherd(settings={"pool_mode": mode}, workers=2)
    with h.connect(prepare_threshold=0) as conn:
        with conn.pipeline():
            c1 = conn.execute("SELECT %s::int", (1,))
            with pytest.raises(psycopg.errors.DivisionByZero):
                with conn.pipeline():
                    conn.execute("SELECT %s::int / 0", (1,))
            c3 = conn.execute("SELECT %s::int + 1", (2,))
        assert c1.fetchone() == (1,) and c3.fetchone() == (3,)


# --------------------------------------------------------------------------- issue 12


@pytest.mark.timeout(60)
@pytest.mark.parametrize("query", ["wat (%s, %s)", "insert into nosuchtable values (%s, %s)"])
def test_failed_parse_in_a_pipeline_does_not_hang(pgherd, query):
    """psycopg's executemany pipelines a named Parse, Binds and one Sync: when the Parse
    fails, the ReadyForQuery after the error must reach the client."""
    h = pgherd(settings={"pool_mode": "transaction"}, workers=1)
    with h.connect(prepare_threshold=0) as conn:
        cur = conn.cursor()
        for _ in range(2):
            with pytest.raises(psycopg.errors.ProgrammingError):
                cur.executemany(query, [(10, "hello"), (20, "world")])
            assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)


@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_requests_after_a_failed_parse_until_the_sync(pgherd, mode):
    """A pipeline whose named Parse failed: what the client sends after the error, up to its
    Sync, the server skips -- and its ReadyForQuery must still reach the client."""
    h = pgherd(settings={"pool_mode": mode}, workers=1)
    with RawClient(h.host, h.port) as c:
        c.login("postgres", "p0")
        c.send(parse("wat", "s1") + bind(statement="s1") + execute() + FLUSH)
        assert errors_in(c.read_types(b"E"))[0]["C"] == "42601"
        c.send(bind(statement="s1") + execute() + parse("SELECT 1", "s2") + message(b"S"))
        assert c.read_types(b"Z") == [(b"Z", b"I")]
        # the server has neither statement, and nor does the client
        c.send(parse("SELECT 2", "s2") + bind(statement="s2") + execute() + message(b"S"))
        assert [t for t, _ in c.read_until_ready()] == [b"1", b"2", b"D", b"C", b"Z"]


def test_a_failed_parse_leaves_the_name_free(pgherd):
    h = pgherd(settings={"pool_mode": "transaction"}, workers=1)
    with RawClient(h.host, h.port) as c:
        c.login("postgres", "p0")
        c.send(parse("SELEKT 1", "s1") + message(b"S"))
        msgs = c.read_until_ready()
        assert [t for t, _ in msgs] == [b"E", b"Z"]
        c.send(parse("SELECT 1", "s1") + message(b"S"))  # the name is free, as directly
        assert [t for t, _ in c.read_until_ready()] == [b"1", b"Z"]
        # and so is one whose Parse the server skipped after an earlier error
        c.send(parse("SELEKT 2", "s2") + parse("SELECT 3", "s3") + message(b"S"))
        assert [t for t, _ in c.read_until_ready()] == [b"E", b"Z"]
        c.send(parse("SELECT 3", "s3") + message(b"S"))
        assert [t for t, _ in c.read_until_ready()] == [b"1", b"Z"]


def test_asyncpg_sees_schema_changes_in_transaction_mode(pg, pgherd):
    """After ALTER TABLE ... TYPE, asyncpg's re-prepared statement (Close, then Parse of the
    same text under a new name) is a fresh server statement on every server and worker."""
    pg.sql("DROP TABLE IF EXISTS altered")
    pg.sql("CREATE TABLE altered (a int, b int)")
    pg.sql("INSERT INTO altered VALUES (1, 2)")
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 2}, workers=2)

    async def main():
        conns = [await asyncpg.connect(h.dsn()) for _ in range(4)]
        try:
            for conn in conns:
                assert tuple(await conn.fetchrow("SELECT * FROM altered")) == (1, 2)
            await conns[0].execute("ALTER TABLE altered ALTER COLUMN b SET DATA TYPE text")
            for conn in conns:  # asyncpg re-prepares once, outside a transaction
                assert tuple(await conn.fetchrow("SELECT * FROM altered")) == (1, "2")
            await conns[0].execute("ALTER TABLE altered ALTER COLUMN b SET DATA TYPE int "
                                   "USING b::int")
            for conn in conns:  # inside one, the error reaches it; the next try works
                with pytest.raises(asyncpg.InvalidCachedStatementError):
                    async with conn.transaction():
                        await conn.fetchrow("SELECT * FROM altered")
                assert tuple(await conn.fetchrow("SELECT * FROM altered")) == (1, 2)
        finally:
            for conn in conns:
                await conn.close()

    asyncio.run(main())


def test_close_and_parse_again_prepares_afresh(pg, pgherd):
    """A client's Close and a new Parse of the same text see the table as it is now."""
    pg.sql("DROP TABLE IF EXISTS widened")
    pg.sql("CREATE TABLE widened (a int)")
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 1}, workers=1)

    def columns(c, name):
        c.send(parse("SELECT * FROM widened", name) + message(b"D", b"S" + name.encode() + b"\0")
               + message(b"S"))
        msgs = c.read_until_ready()
        body = next(b for t, b in msgs if t == b"T")
        return struct.unpack_from("!H", body)[0]

    with RawClient(h.host, h.port) as a, RawClient(h.host, h.port) as b:
        a.login("postgres", "p0")
        b.login("postgres", "p0")
        assert columns(a, "s1") == 1
        pg.sql("ALTER TABLE widened ADD COLUMN b int")
        a.send(message(b"C", b"Ss1\0") + message(b"S"))
        assert [t for t, _ in a.read_until_ready()] == [b"3", b"Z"]
        assert columns(a, "s1") == 2
        assert columns(b, "other") == 2  # another client's first Parse of the text, too


def test_a_stale_statement_fails_for_every_client_bound_to_it(pg, pgherd):
    """Two clients share a statement; a schema change makes it stale. The first meets the
    server's error; the second, whose server no longer has it, meets the same error (rather
    than a statement prepared again behind its back with another result type) -- inside
    its transaction, which fails as it would directly. Both prepare afresh afterwards."""
    pg.sql("DROP TABLE IF EXISTS retyped")
    pg.sql("CREATE TABLE retyped (a int)")
    pg.sql("INSERT INTO retyped VALUES (1)")
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 1}, workers=1)
    select = parse("SELECT a FROM retyped", "s1")
    run = bind(statement="s1") + execute() + message(b"S")
    with RawClient(h.host, h.port) as a, RawClient(h.host, h.port) as b:
        for c in (a, b):
            c.login("postgres", "p0")
            c.send(select + run)
            assert data_rows(c.read_until_ready()) == [["1"]]
        pg.sql("ALTER TABLE retyped ALTER COLUMN a SET DATA TYPE text")
        a.send(run)
        errors = errors_in(a.read_until_ready())
        assert [(e["C"], e.get("R")) for e in errors] == [("0A000", "RevalidateCachedQuery")]
        b.send(wire.query("BEGIN") + run)
        msgs = b.read_until_ready() + b.read_until_ready()
        assert [(e["C"], e.get("R")) for e in errors_in(msgs)] == [
            ("0A000", "RevalidateCachedQuery")]
        assert msgs[-1] == (b"Z", b"E")  # the transaction failed, as on its own backend
        b.send(wire.query("ROLLBACK"))
        b.read_until_ready()
        for c in (a, b):
            c.send(message(b"C", b"Ss1\0") + select + run)
            msgs = c.read_until_ready()
            assert [t for t, _ in msgs if t in b"E3"] == [b"3"] and data_rows(msgs) == [["1"]]


def test_first_named_statement_in_the_middle_of_a_pipeline(pgherd):
    """psycopg prepares a query after its fifth run, in the middle of a pipeline: the replies
    owed to the unnamed requests before it, not yet synced, reach the client as they are."""
    h = pgherd(settings={"pool_mode": "transaction"}, workers=1)
    unnamed = parse("SELECT 1") + bind() + message(b"D", b"P\0") + execute()
    with RawClient(h.host, h.port) as c:
        c.login("postgres", "p0")
        c.send(unnamed * 3 + FLUSH)
        assert [t for t, _ in c.read_types(*[b"1", b"2", b"T", b"D", b"C"] * 3)]
        c.send(unnamed + FLUSH)  # still unanswered when the named Parse comes
        c.send(parse("SELECT 2", "s1") + bind(statement="s1") + execute() + message(b"S"))
        msgs = c.read_until_ready()
        assert [t for t, _ in msgs] == [b"1", b"2", b"T", b"D", b"C", b"1", b"2", b"D", b"C", b"Z"]
        assert data_rows(msgs) == [["1"], ["2"]]

    async def main():  # what found it: psycopg's test_auto_prepare
        async with await psycopg.AsyncConnection.connect(h.dsn(), prepare_threshold=5) as conn:
            async with conn.pipeline():
                cursors = [await conn.execute("SELECT %s::int", [i]) for i in range(10)]
            return [(await cur.fetchone())[0] for cur in cursors]

    assert asyncio.run(asyncio.wait_for(main(), 10)) == list(range(10))


def _group(value: str, sql: str = "SELECT $1::int") -> bytes:
    return parse(sql) + bind([value.encode()]) + message(b"D", b"P\0") + execute()


@pytest.mark.parametrize("first", ["answered", "failed"])
def test_first_named_statement_read_in_two_pieces_anywhere(pgherd, first):
    """The pipeline that names its first statement arrives in two reads, cut at every byte;
    the requests before it were flushed and answered (or failed) already. Before: a Sync in
    the second piece, or replies already sent, shifted which reply belongs to which request
    -- a request's replies vanished (the client hung) or pgherd's own leaked to it."""
    h = pgherd(settings={"pool_mode": "transaction"}, workers=1)
    stream = b"".join(_group(str(i)) for i in range(1, 5)) + parse("SELECT $1::int", "s1") \
        + bind([b"5"], "s1") + message(b"D", b"P\0") + execute() + message(b"S")
    if first == "answered":
        before, expected = _group("0") + FLUSH, [b"1", b"2", b"T", b"D", b"C"] * 5 + [b"Z"]
        answered = [b"1", b"2", b"T", b"D", b"C"]
    else:  # the server skips everything up to the Sync
        before, expected = _group("0", "SELECT 1/$1::int") + FLUSH, [b"Z"]
        answered = [b"1", b"E"]  # the Bind fails (a constant folded at planning)
    wrong = []
    for cut in range(1, len(stream)):
        with RawClient(h.host, h.port, timeout=5) as c:
            c.login("postgres", "p0")
            c.send(before)
            assert [t for t, _ in c.read_types(*answered)] == answered
            c.send(stream[:cut])
            wait_read_by_peer(c.sock)
            c.send(stream[cut:])
            try:
                got = [t for t, _ in c.read_until_ready()]
            except wire.WireError as exc:
                got = [str(exc)]
            if got != expected:
                wrong.append((cut, got))
    assert not wrong, wrong[:5]


def test_a_table_made_again_alike_is_no_schema_change(pg, pgherd):
    """Tests drop and create their tables again: a statement prepared before, bound where a
    newer preparation of the same text exists, is the same statement if its columns are."""
    pg.sql("DROP TABLE IF EXISTS remade")
    pg.sql("CREATE TABLE remade (id text)")
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 1}, workers=1)
    run = bind(statement="s1") + execute() + message(b"S")
    with RawClient(h.host, h.port) as a, RawClient(h.host, h.port) as b:
        a.login("postgres", "p0")
        b.login("postgres", "p0")
        a.send(parse("SELECT * FROM remade", "s1") + run)
        assert errors_in(a.read_until_ready()) == []
        pg.sql("DROP TABLE remade")
        pg.sql("CREATE TABLE remade (id text)")
        pg.sql("INSERT INTO remade VALUES ('x')")
        b.send(parse("SELECT * FROM remade", "s1") + run)  # prepared anew on the one server
        assert data_rows(b.read_until_ready()) == [["x"]]
        a.send(run)
        msgs = a.read_until_ready()
        assert errors_in(msgs) == [] and data_rows(msgs) == [["x"]]
