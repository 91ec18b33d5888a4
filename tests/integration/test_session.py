"""Session mode as a direct connection (issue 12, item 9): the client's own backend pid in
BackendKeyData, cancels still routed through pgherd by its own secret; ParameterStatus in the
server's spelling; startup parameters as the server's own defaults, so RESET returns to them.
Transaction mode's share of it: canonical values from the login on."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

SESSION = {"pool_mode": "session"}


def connect(h, **params) -> psycopg.Connection:
    return psycopg.connect(h.dsn(), autocommit=True, **params)


def test_backend_pid_is_the_real_one_and_cancel_still_works(pgherd, pg):
    h = pgherd(settings=SESSION, workers=2)
    conns = [connect(h) for _ in range(6)]  # spread over both workers
    try:
        for conn in conns:
            assert conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        for conn in conns:
            # a cancel through pgherd, whichever worker the kernel hands it to
            timer = threading.Timer(0.3, conn.cancel_safe)
            timer.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
            timer.join()
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # what applications do with the pid: end the session, match notifications
        victim = conns.pop()
        conns[0].execute("SELECT pg_terminate_backend(%s)", [victim.info.backend_pid])
        with pytest.raises(psycopg.OperationalError, match="terminating connection"):
            victim.execute("SELECT 1")
        victim.close()
        listener = conns[0]
        listener.execute("LISTEN here")
        listener.execute("NOTIFY here, 'hi'")
        note = next(listener.notifies(timeout=5, stop_after=1))
        assert (note.pid, note.payload) == (listener.info.backend_pid, "hi")
    finally:
        for conn in conns:
            conn.close()


def test_parameter_status_in_the_servers_spelling(pgherd):
    h = pgherd(settings=SESSION, workers=1)
    with connect(h, client_encoding="utf-8", options="-c DateStyle=german") as conn:
        assert conn.info.parameter_status("client_encoding") == "UTF8"
        assert conn.info.parameter_status("DateStyle") == "German, DMY"

    async def main():
        conn = await asyncpg.connect(h.dsn())  # asks for client_encoding 'utf-8'
        try:
            assert conn.get_settings().client_encoding == "UTF8"
        finally:
            await conn.close()

    asyncio.run(main())


def test_reset_returns_to_the_startup_values(pgherd):
    """The server got them in its startup packet: RESET (and DISCARD ALL, RESET ALL) go back
    to them, as directly; and only clients asking for the same ones share that server."""
    h = pgherd(settings={**SESSION, "default_pool_size": 1}, workers=1)
    asked = {"options": "-c DateStyle=German -c statement_timeout=5s"}
    with connect(h, **asked) as conn:
        pid = conn.info.backend_pid
        conn.execute("SET DateStyle = 'ISO'")
        conn.execute("SET statement_timeout = '1s'")
        assert conn.execute("SHOW DateStyle").fetchone() == ("ISO, DMY",)
        conn.execute("RESET DateStyle")
        conn.execute("RESET statement_timeout")
        assert conn.execute("SHOW DateStyle").fetchone() == ("German, DMY",)
        assert conn.info.parameter_status("DateStyle") == "German, DMY"
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
    with connect(h, **asked) as conn:  # the same parameters: the same server, reset
        assert conn.info.backend_pid == pid
        assert conn.execute("SHOW DateStyle").fetchone() == ("German, DMY",)
    with connect(h) as conn:  # none: a server of its own (the pool has room for one)
        assert conn.info.backend_pid != pid
        assert conn.execute("SHOW DateStyle").fetchone() == ("ISO, MDY",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
        conn.execute("RESET ALL")
        assert conn.execute("SHOW DateStyle").fetchone() == ("ISO, MDY",)


def test_a_login_waits_for_its_server_and_hears_why_it_fails(pgherd):
    """Session mode links the server at login: with the pool busy the login waits (up to
    query_wait_timeout), and a server refusing the client's parameters refuses the login."""
    h = pgherd(settings={**SESSION, "default_pool_size": 1, "query_wait_timeout": 2},
               workers=1)
    with connect(h) as first:
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            connect(h, connect_timeout=10)
        assert first.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match='unrecognized configuration parameter'):
        connect(h, options="-c no_such_thing=1")
    with connect(h) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_transaction_mode_reports_canonical_values_from_login(pgherd):
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 1}, workers=1)
    with connect(h, client_encoding="utf8") as conn:  # no SET: it differs only in case
        assert conn.info.parameter_status("client_encoding") == "UTF8"
    for _ in range(2):  # a server tries the values first, then the pool knows them
        with connect(h, client_encoding="utf-8", options="-c DateStyle=german") as conn:
            assert conn.info.parameter_status("client_encoding") == "UTF8"
            assert conn.info.parameter_status("DateStyle") == "German, DMY"
            assert conn.execute("SHOW DateStyle").fetchone() == ("German, DMY",)
