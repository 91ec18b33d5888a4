"""The client's and the server's byte streams stay intact and complete through pgherd: a
request read in pieces while its client waits for a server, a cancel in the middle of an
unsynced batch, a server that dies with a FATAL, a client that leaves before its startup
packet (issue 12, items 1, 2, 6, 7)."""

from __future__ import annotations

import pytest

from tests import wire
from tests.helpers import wait_for

BIG = 300 * 1024


def _big_query(tag: str) -> bytes:
    """One Query message of about 300 KB: a client's socket delivers it in several reads."""
    return wire.query("SELECT '%s' || length('%s')" % (tag, "x" * BIG))


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_request_read_in_pieces_while_the_server_is_checked(pgherd, pg, mode):
    """The rest of a request that arrives while its server runs the health check (or a
    parameter SET) waits behind the part already parked, instead of overtaking it."""
    # A check that takes a while holds the link open long enough for the rest to arrive.
    h = pgherd(settings={"pool_mode": mode, "server_check_delay": 0,
                         "server_check_query": "SELECT pg_sleep(0.3)"}, workers=1)
    offset = pg.log_size()
    with wire.RawClient(h.host, h.port) as c:
        c.login("postgres", "p0", client_encoding="utf-8")  # a SET runs at the link too
        msg = _big_query("a")
        c.send(msg[:1000])
        c.send(msg[1000:])
        msgs = c.read_until_ready()
        assert wire.errors_in(msgs) == []
        assert wire.data_rows(msgs) == [["a%d" % BIG]]
        assert wire.data_rows(c.simple("SELECT 1")) == [["1"]]
    assert "invalid frontend message type" not in pg.log(offset)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancel_lands_inside_an_unsynced_batch(pgherd, pg, mode):
    """Extended-protocol messages ended by a Flush, no Sync yet (asyncpg's executemany while
    it waits to send the rest): the server is busy for this client, and a cancel must reach
    it as it does directly -- not be dropped as "for idle client"."""
    h = pgherd(settings={"pool_mode": mode}, workers=2)
    with wire.RawClient(h.host, h.port) as c:
        welcome = c.login("postgres", "p0", application_name="unsynced-%s" % mode)
        key = next(body for t, body in welcome if t == b"K")
        c.send(wire.parse("SELECT pg_sleep(5)") + wire.bind() + wire.execute() + wire.FLUSH)
        wait_for(lambda: pg.sql("SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND "
                                "application_name = 'unsynced-%s'" % mode))
        with wire.RawClient(h.host, h.port) as cancel:
            cancel.send(wire.untyped(wire.CANCEL_REQUEST, key))
            assert cancel.read_until_eof() == []
        msgs = c.read_types(b"1", b"2", b"E")
        assert wire.parse_fields(msgs[-1][1])["C"] == "57014"  # query_canceled
        c.send(wire.SYNC)
        assert c.read_until_ready()[-1] == (b"Z", b"I")
    assert "cancel request for idle client" not in h.log()
def test_one_fatal_for_a_terminated_backend(pgherd, pg):
    """PostgreSQL's own FATAL (57P01) is the client's last word; no second one from pgherd."""
    h = pgherd(settings={"pool_mode": "session"}, workers=1)
    with wire.RawClient(h.host, h.port) as c:
        c.login("postgres", "p0", application_name="to-terminate")
        assert wire.data_rows(c.simple("SELECT 1")) == [["1"]]
        pid = wait_for(lambda: pg.sql("SELECT pid FROM pg_stat_activity "
                                      "WHERE application_name = 'to-terminate'"))[0][0]
        pg.sql("SELECT pg_terminate_backend(%s)", params=[pid])
        errors = wire.errors_in(c.read_until_eof())
    assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "57P01")], errors


def test_terminate_before_startup_closes_silently(pgherd):
    """PostgreSQL (and PgBouncer) close without a word; no "bad packet"."""
    h = pgherd(workers=1)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.send(wire.TERMINATE)
        assert c.read_until_eof() == []
    assert "bad packet" not in h.log()
