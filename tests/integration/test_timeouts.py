"""The janitor's timeouts on logged-in clients and their servers: query_timeout (running and
waiting requests), idle_transaction_timeout, transaction_timeout, client_idle_timeout, and
their [users] overrides.

Each test reads the raw wire: the reason must arrive as an ErrorResponse before the pooler
closes the connection, with PgBouncer's text (reference/pgbouncer.md §1.2 and the error
table). The clocks are short (1 s); the janitor runs a few times a second, so every wait below
is a poll with a generous deadline, never a sleep.
"""

from __future__ import annotations

import time

import pytest

from tests import wire
from tests.helpers import wait_for


def _messages_of(c: wire.RawClient) -> list[str]:
    """Everything the pooler still says until it closes: the error messages."""
    return [e.get("M", "") for e in wire.errors_in(c.read_until_eof())]


def _backend_gone(pg, marker: str) -> bool:
    rows = pg.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
                  params=(f"%{marker}%",))
    return rows[0][0] == 0


def _raw(h, user: str = "postgres") -> wire.RawClient:
    c = wire.RawClient(h.host, h.port, timeout=20)
    c.login(user, "p0")
    return c


def test_query_timeout_closes_server_and_client(pg, pgherd) -> None:
    h = pgherd(settings={"pool_mode": "transaction", "query_timeout": 1}, workers=1)
    with _raw(h) as c:
        c.send(wire.query("SELECT pg_sleep(60) /* qt_running */"))
        assert "query timeout" in _messages_of(c)
    # The server was closed, not left running the query: its backend is gone.
    wait_for(lambda: _backend_gone(pg, "qt_running"), timeout=15, message="backend of the timed-out query")
    h.wait_log(r"closing because: query timeout")
    # A quick query is not affected and the pool still serves.
    with _raw(h) as c:
        assert wire.data_rows(c.simple("SELECT 42")) == [["42"]]


def test_query_timeout_applies_to_waiting_request(pgherd) -> None:
    """A request that waits for a server counts its wait as query time (PgBouncer does)."""
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 1, "query_timeout": 1},
               workers=1)
    with _raw(h) as holder, _raw(h) as waiter:
        holder.simple("BEGIN")  # holds the only server, idle in transaction: no query runs
        waiter.send(wire.query("SELECT 1"))
        assert "query_timeout" in _messages_of(waiter)
        # The holder's transaction had no query running: it survives.
        assert wire.data_rows(holder.simple("SELECT 7")) == [["7"]]
        holder.simple("COMMIT")


def test_idle_transaction_timeout(pgherd) -> None:
    h = pgherd(settings={"pool_mode": "transaction", "idle_transaction_timeout": 1}, workers=1)
    with _raw(h) as idle_in_xact, _raw(h) as idle_outside:
        idle_in_xact.simple("BEGIN")
        idle_in_xact.simple("SELECT 1")
        idle_outside.simple("SELECT 1")
        assert "idle transaction timeout" in _messages_of(idle_in_xact)
        # A client idle outside a transaction is not touched by this timeout.
        assert wire.data_rows(idle_outside.simple("SELECT 2")) == [["2"]]


def test_transaction_timeout_ends_a_busy_transaction(pgherd) -> None:
    """Unlike idle_transaction_timeout, it counts from BEGIN even while queries keep coming."""
    h = pgherd(settings={"pool_mode": "session", "transaction_timeout": 1}, workers=1)
    with _raw(h) as c:
        c.simple("BEGIN")
        errors: list[str] = []

        def closed() -> bool:
            c.send(wire.query("SELECT pg_sleep(0.05)"))
            msgs = []
            while (msg := c.read_message()) is not None:
                msgs.append(msg)
                if msg[0] == b"Z":
                    return False
            errors.extend(e.get("M", "") for e in wire.errors_in(msgs))
            return True

        wait_for(closed, timeout=15, interval=0.01, message="transaction_timeout to close the client")
        assert "transaction timeout" in errors


def test_transaction_timeout_spares_short_transactions(pgherd) -> None:
    """Queries outside a transaction, for longer than the limit in all: none is cut."""
    h = pgherd(settings={"pool_mode": "session", "transaction_timeout": 1}, workers=1)
    with _raw(h) as c:
        c.simple("BEGIN")
        c.simple("COMMIT")
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            assert wire.data_rows(c.simple("SELECT 1 FROM pg_sleep(0.05)")) == [["1"]]


def test_client_idle_timeout(pgherd) -> None:
    h = pgherd(settings={"pool_mode": "transaction", "client_idle_timeout": 1}, workers=1)
    with _raw(h) as c:
        assert wire.data_rows(c.simple("SELECT 1")) == [["1"]]
        assert "client_idle_timeout" in _messages_of(c)
    h.wait_log(r"client_idle_timeout")
    # The server it used stays in the pool: only the client was idle.
    assert sum(int(r["sv_idle"]) for r in h.admin_dicts("SHOW POOLS") if r["database"] == "p0") == 1


@pytest.mark.parametrize("key, sql, reason", [
    ("query_timeout", "SELECT pg_sleep(60)", "query timeout"),
    ("client_idle_timeout", None, "client_idle_timeout"),
])
def test_user_override(pgherd, key: str, sql: str | None, reason: str) -> None:
    """[users] sets the timeout for one user; the global 0 leaves the others alone."""
    h = pgherd(settings={"pool_mode": "transaction"}, users={"app": {key: 1}}, workers=1)
    with _raw(h, "app") as app, _raw(h, "postgres") as other:
        if sql:
            app.send(wire.query(sql))
        assert reason in _messages_of(app)
        assert wire.data_rows(other.simple("SELECT 3")) == [["3"]]
