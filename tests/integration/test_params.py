"""Tracked session parameters (reference/pgbouncer.md §4.2, DESIGN invariant 7).

In transaction mode clients take turns on the same server; each one must keep seeing its own
client_encoding, DateStyle, TimeZone, standard_conforming_strings, application_name and
track_extra_parameters (IntervalStyle by default) -- the values from its startup packet, its
``options`` and its own SETs -- in SHOW, in query results and in its ParameterStatus view.
Every test here uses one worker and pool_size 1, and checks first that the clients really
share a backend, so a leak cannot hide behind separate servers.
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tests.helpers import login_error

TXN_ONE_SERVER = {"pool_mode": "transaction", "default_pool_size": 1}


def show(conn: psycopg.Connection, name: str) -> str:
    return conn.execute(f"SHOW {name}").fetchone()[0]


def backend(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def connect(h, **params) -> psycopg.Connection:
    """psycopg through pgherd with libpq parameters (application_name, options,
    client_encoding...); never PREPAREs (named statements are a later feature).

    The parameters go as keywords, not into the URL: libpq does not decode '+' as a space
    in a URL's query string."""
    return psycopg.connect(h.dsn(), autocommit=True, prepare_threshold=None, **params)


def test_set_is_not_seen_by_another_client(pgherd):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    with connect(h) as a, connect(h) as b:
        assert backend(a) == backend(b)
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        a.execute("SET application_name = 'a'")
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert a.info.parameter_status("application_name") == "a"

        for _ in range(3):  # interleaved, on the one shared backend
            assert show(b, "TimeZone") == "UTC"
            assert show(b, "application_name") == ""
            assert b.execute(
                "SELECT timestamptz '2024-01-01 00:00:00+00'::text").fetchone() == (
                "2024-01-01 00:00:00+00",)
            assert show(a, "TimeZone") == "Asia/Tokyo"
            assert show(a, "application_name") == "a"
            assert a.execute(
                "SELECT timestamptz '2024-01-01 00:00:00+00'::text").fetchone() == (
                "2024-01-01 09:00:00+09",)
        assert b.info.parameter_status("TimeZone") == "UTC"
        assert b.info.parameter_status("application_name") == ""

        # b sets its own values; both keep theirs
        b.execute("SET TimeZone = 'Europe/Paris'")
        b.execute("SET application_name = 'b'")
        for _ in range(2):
            assert (show(a, "TimeZone"), show(a, "application_name")) == ("Asia/Tokyo", "a")
            assert (show(b, "TimeZone"), show(b, "application_name")) == ("Europe/Paris", "b")
        assert backend(a) == backend(b)

        # pg_stat_activity shows the name of whoever runs on the backend right now
        assert a.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone() == ("a",)

        # a newcomer starts from the server defaults, not from a's or b's
        with connect(h) as c:
            assert c.info.parameter_status("TimeZone") == "UTC"
            assert c.info.parameter_status("application_name") == ""
            assert show(c, "TimeZone") == "UTC"
            assert show(c, "application_name") == ""

        # RESET goes back to the default, for a only
        a.execute("RESET TimeZone")
        assert show(a, "TimeZone") == "UTC"
        assert a.info.parameter_status("TimeZone") == "UTC"
        assert show(b, "TimeZone") == "Europe/Paris"


def test_set_inside_transaction_and_rollback(pgherd):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    with connect(h) as a, connect(h) as b:
        assert backend(a) == backend(b)
        with a.transaction():
            a.execute("SET TimeZone = 'Asia/Tokyo'")
            assert show(a, "TimeZone") == "Asia/Tokyo"
        assert show(b, "TimeZone") == "UTC"
        assert show(a, "TimeZone") == "Asia/Tokyo"
        # a SET rolled back is undone for its client; the server reports the old value
        a.execute("BEGIN")
        a.execute("SET TimeZone = 'America/Chicago'")
        a.execute("ROLLBACK")
        assert show(a, "TimeZone") == "Asia/Tokyo"
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert show(b, "TimeZone") == "UTC"
        # SET LOCAL ends with its transaction
        with b.transaction():
            b.execute("SET LOCAL TimeZone = 'Asia/Kolkata'")
            assert show(b, "TimeZone") == "Asia/Kolkata"
        assert show(b, "TimeZone") == "UTC"
        assert show(a, "TimeZone") == "Asia/Tokyo"


def test_startup_parameters_are_honoured(pgherd):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    a = connect(h, application_name="app-a",
                options="-c TimeZone=America/New_York -c DateStyle=German -c IntervalStyle=sql_standard",
                client_encoding="LATIN1")
    b = connect(h)
    try:
        assert backend(a) == backend(b)
        assert a.info.parameter_status("application_name") == "app-a"
        assert a.info.parameter_status("TimeZone") == "America/New_York"
        assert a.info.parameter_status("client_encoding") == "LATIN1"
        assert a.info.parameter_status("DateStyle").startswith("German")
        for _ in range(2):
            assert show(a, "application_name") == "app-a"
            assert show(a, "TimeZone") == "America/New_York"
            assert show(a, "client_encoding") == "LATIN1"
            assert show(a, "DateStyle").startswith("German")
            assert show(a, "IntervalStyle") == "sql_standard"
            assert a.execute("SELECT date '2024-01-02'::text").fetchone() == ("02.01.2024",)
            # LATIN1 on the wire: 'é' is one byte
            assert a.execute("SELECT octet_length(convert_to('é', 'UTF8')), 'é'").fetchone() == (
                2, "é")

            assert show(b, "application_name") == ""
            assert show(b, "TimeZone") == "UTC"
            assert show(b, "client_encoding") == "UTF8"
            assert show(b, "DateStyle") == "ISO, MDY"
            assert show(b, "IntervalStyle") == "postgres"
            assert b.execute("SELECT date '2024-01-02'::text").fetchone() == ("2024-01-02",)
        assert b.info.parameter_status("client_encoding") == "UTF8"
        assert b.info.parameter_status("DateStyle") == "ISO, MDY"
    finally:
        a.close()
        b.close()


def test_datestyle_encoding_standard_strings_by_set(pgherd):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    with connect(h) as a, connect(h) as b:
        assert backend(a) == backend(b)
        a.execute("SET DateStyle = 'SQL, DMY'")
        a.execute("SET client_encoding = 'LATIN1'")
        a.execute("SET standard_conforming_strings = off")
        assert show(b, "DateStyle") == "ISO, MDY"
        assert show(b, "client_encoding") == "UTF8"
        assert show(b, "standard_conforming_strings") == "on"
        assert b.execute(r"SELECT length('a\nb')").fetchone() == (4,)
        assert show(a, "DateStyle") == "SQL, DMY"
        assert show(a, "client_encoding") == "LATIN1"
        assert show(a, "standard_conforming_strings") == "off"
        assert a.execute("SELECT date '2024-01-02'::text").fetchone() == ("02/01/2024",)
        assert a.info.parameter_status("standard_conforming_strings") == "off"
        assert b.info.parameter_status("standard_conforming_strings") == "on"
        assert b.info.parameter_status("DateStyle") == "ISO, MDY"


def test_intervalstyle_tracked_by_default(pgherd):
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    with connect(h) as a, connect(h) as b:
        assert backend(a) == backend(b)
        a.execute("SET IntervalStyle = 'postgres_verbose'")
        for _ in range(2):
            assert show(b, "IntervalStyle") == "postgres"
            assert b.execute("SELECT interval '1 day'::text").fetchone() == ("1 day",)
            assert show(a, "IntervalStyle") == "postgres_verbose"
            assert a.execute("SELECT interval '1 day'::text").fetchone() == ("@ 1 day",)


def test_values_needing_quotes_survive_reapply(pgherd):
    """Values with a quote and a backslash are re-applied intact whatever
    standard_conforming_strings says."""
    h = pgherd(settings=TXN_ONE_SERVER, workers=1)
    name = "it's a \\path"
    with connect(h) as a, connect(h) as b:
        a.execute("SELECT set_config('application_name', %s, false)", [name])
        b.execute("SET standard_conforming_strings = off")
        for _ in range(2):
            assert show(b, "application_name") == ""
            assert show(a, "application_name") == name
        assert backend(a) == backend(b)


def test_database_connstr_parameters(pgherd):
    """timezone/datestyle/application_name of a [databases] entry go into the server's
    startup packet: they are the defaults clients of that database see and return to."""
    h = pgherd(
        settings=TXN_ONE_SERVER,
        databases={
            "p0": {"timezone": "Europe/Berlin", "datestyle": "'SQL, DMY'",
                   "application_name": "from-ini"},
        },
        workers=1,
    )
    with connect(h) as a, connect(h, application_name="mine") as b:
        assert backend(a) == backend(b)
        assert a.info.parameter_status("TimeZone") == "Europe/Berlin"
        assert a.info.parameter_status("application_name") == "from-ini"
        assert b.info.parameter_status("application_name") == "mine"
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        for _ in range(2):
            assert show(b, "TimeZone") == "Europe/Berlin"
            assert show(b, "DateStyle") == "SQL, DMY"
            assert show(b, "application_name") == "mine"
            assert show(a, "TimeZone") == "Asia/Tokyo"
            assert show(a, "application_name") == "from-ini"


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_startup_settings_are_honoured_and_taken_back(pgherd, mode):
    """Any setting PostgreSQL takes in a startup packet (asyncpg's server_settings, libpq's
    options) applies to that client -- and, in transaction mode, to no other client sharing
    its server (issue 12, item 8)."""
    h = pgherd(settings={"pool_mode": mode, "default_pool_size": 1}, workers=1)
    settings = {"client_min_messages": "warning", "statement_timeout": "1234ms",
                "idle_in_transaction_session_timeout": "5min", "jit": "off"}

    async def main():
        a = await asyncpg.connect(h.dsn(), server_settings=settings)
        try:
            async def shows(conn):
                return [await conn.fetchval("SHOW %s" % name) for name in settings]

            assert await shows(a) == ["warning", "1234ms", "5min", "off"]
            if mode == "session":
                return
            with connect(h, options="-c work_mem=8MB") as b, connect(h) as c:
                assert backend(b) == backend(c) == await a.fetchval("SELECT pg_backend_pid()")
                for _ in range(2):
                    assert (show(b, "work_mem"), show(b, "statement_timeout")) == ("8MB", "0")
                    assert await shows(a) == ["warning", "1234ms", "5min", "off"]
                    assert (show(c, "work_mem"), show(c, "jit")) == ("4MB", "on")
                    assert show(c, "client_min_messages") == "notice"
        finally:
            await a.close()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_startup_settings_refused_as_postgresql_refuses_them(pgherd, mode):
    h = pgherd(settings={"pool_mode": mode})
    err = login_error(h.dsn(statement_timeout="soon"))
    assert err is not None and err.sqlstate == "22023", err  # invalid_parameter_value
    err = login_error(h.dsn(nosuch_setting="1"))
    assert err is not None and err.sqlstate == "42704", err  # undefined_object
    assert 'unrecognized configuration parameter "nosuch_setting"' in str(err)
    # options are still only PgBouncer's two forms
    err = login_error(h.dsn(options="-X"))
    assert err is not None and "only '-c config=val' and '--config=val' are allowed" in str(err), err
    # and the pool still serves everyone else
    with connect(h, options="--TimeZone=Asia/Tokyo -c application_name=viaopt") as c:
        assert show(c, "TimeZone") == "Asia/Tokyo"
        assert show(c, "application_name") == "viaopt"


def test_ignore_startup_parameters(pgherd):
    """PgBouncer's meaning: accepted, and dropped."""
    h = pgherd(settings={"pool_mode": "transaction", "ignore_startup_parameters": "jit"})
    assert login_error(h.dsn(jit="off")) is None
    with connect(h, options="-c jit=off") as c:
        assert show(c, "jit") == "on"


def test_session_mode_reset_query_cleans_server(pgherd):
    """Session mode: server_reset_query (DISCARD ALL) runs when a client leaves, so the
    next client of the same backend starts clean."""
    h = pgherd(settings={"pool_mode": "session", "default_pool_size": 1}, workers=1)
    with connect(h) as a:
        pid = backend(a)
        a.execute("SET work_mem = '7MB'")
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        a.execute("CREATE TEMP TABLE leftover (x int)")
        a.execute("PREPARE stmt AS SELECT 1")
    with connect(h) as b:
        assert backend(b) == pid
        assert show(b, "work_mem") == "4MB"
        assert show(b, "TimeZone") == "UTC"
        assert b.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
        with pytest.raises(psycopg.errors.UndefinedTable):
            b.execute("SELECT * FROM leftover")
