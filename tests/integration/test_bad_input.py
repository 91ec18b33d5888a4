"""Malformed, oversized and truncated input from clients (DESIGN invariant 8).

Whatever a client sends, it gets an ErrorResponse and/or a closed connection -- promptly,
not at some login timeout -- and the worker survives: same worker pids, no traceback in the
log, a client connected before carries on, and the next client is served. One worker, so
the bad connection and the good ones certainly meet in the same process; transaction mode
with pool_size 1, so a server left dirty by the bad client would be handed to the next one.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest

from tests import wire

SETTINGS = {"pool_mode": "transaction", "default_pool_size": 1, "query_wait_timeout": 15}


@pytest.fixture
def h(pgherd):
    return pgherd(settings=SETTINGS, workers=1)


class Bystander:
    """A client logged in before the bad input; it must keep working afterwards."""

    def __init__(self, h) -> None:
        self.h = h
        self.pids = h.worker_pids()
        assert len(self.pids) == 1
        self.conn = h.connect(prepare_threshold=None)
        assert self.conn.execute("SELECT 1").fetchone() == (1,)

    def check(self) -> None:
        h = self.h
        assert h.worker_pids() == self.pids, "the worker died"
        assert self.conn.execute("SELECT 'still here'").fetchone() == ("still here",)
        self.conn.close()
        # a new client, over the wire with a deadline: a dirty server would not answer
        with wire.RawClient(h.host, h.port, timeout=10) as c:
            c.login("postgres", "p0")
            msgs = c.simple("SELECT 40 + 2")
            assert wire.data_rows(msgs) == [["42"]], msgs
            assert msgs[-1] == (b"Z", b"I")
        with h.connect(prepare_threshold=None) as conn:
            assert conn.execute("SELECT %s::int", [7]).fetchone() == (7,)
        assert h.worker_pids() == self.pids
        log = h.log()
        assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def refused(c: wire.RawClient) -> list[dict[str, str]]:
    """Read until pgherd closes; return the errors it sent (possibly none). Anything but
    ErrorResponse/NoticeResponse before the close is a failure."""
    msgs = c.read_until_eof()
    others = [m for m in msgs if m[0] not in (b"E", b"N")]
    assert not others, msgs
    errors = wire.errors_in(msgs)
    for e in errors:
        assert e.get("S") in ("FATAL", "ERROR"), e
    return errors


# --------------------------------------------------------------------------------------
# before login
# --------------------------------------------------------------------------------------


def test_garbage_instead_of_startup(h):
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: pgherd\r\n\r\n")
        refused(c)
    b.check()


def test_oversized_startup_length(h):
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        # announces 100 MB, sends a few bytes: must be refused now, not awaited
        c.send(struct.pack("!II", 100_000_000, wire.PROTOCOL_V3) + b"user\0postgres\0")
        refused(c)
    b.check()


@pytest.mark.parametrize("length", [0, 3, 7])
def test_startup_length_too_small(h, length):
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.send(struct.pack("!I", length) + b"\0" * 12)
        refused(c)
    b.check()


def test_truncated_startup_packet(h):
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.send(struct.pack("!II", 100, wire.PROTOCOL_V3) + b"us")  # 10 of 100 bytes
        c.sock.shutdown(socket.SHUT_WR)
        refused(c)
    b.check()


def test_startup_without_user(h):
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.send(wire.startup({"database": "p0"}))
        errors = refused(c)
        assert [e["M"] for e in errors] == ["no username supplied"]
        assert errors[0]["C"] == "08P01"
    b.check()


@pytest.mark.parametrize("version", [(2 << 16), (9 << 16) | 9, 1234])
def test_unsupported_protocol_version(h, version):
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.send(wire.startup({"user": "postgres", "database": "p0"}, version=version))
        refused(c)
    b.check()


def test_ssl_request_answered_n_then_login(h):
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.send(wire.untyped(wire.SSL_REQUEST))
        assert c.read_byte() == b"N"
        c.login("postgres", "p0")
        assert wire.data_rows(c.simple("SELECT 'plain'")) == [["plain"]]


def test_silent_client_after_ssl_request_hits_client_login_timeout(pgherd):
    """An SSLRequest answered, then nothing: the login ends at client_login_timeout with
    PgBouncer's error, and the worker carries on."""
    h = pgherd(settings={**SETTINGS, "client_login_timeout": 1}, workers=1)
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=10) as c:
        c.send(wire.untyped(wire.SSL_REQUEST))
        assert c.read_byte() == b"N"
        errors = refused(c)
    assert [e["M"] for e in errors] == ["client_login_timeout"]
    b.check()


def test_bogus_cancel_request(h):
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.send(wire.untyped(wire.CANCEL_REQUEST, struct.pack("!II", 12345, 67890)))
        assert c.read_until_eof() == []
    b.check()


def test_random_garbage_burst(h):
    b = Bystander(h)
    rnd = random.Random(20240601)
    for i in range(40):
        with wire.RawClient(h.host, h.port, timeout=5) as c:
            blob = rnd.randbytes(rnd.randint(1, 600))
            if i % 4 == 0:  # a plausible length in front of the garbage
                blob = struct.pack("!I", len(blob) + 4) + blob
            c.send(blob)
            c.sock.shutdown(socket.SHUT_WR)
            c.read_until_eof()
    b.check()


# --------------------------------------------------------------------------------------
# after login
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 2, 3])
def test_typed_message_length_below_four(h, length):
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.login("postgres", "p0")
        c.send(b"Q" + struct.pack("!I", length) + b"SELECT 1\0")
        refused(c)
    b.check()


def test_unknown_message_type(h):
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.login("postgres", "p0")
        c.send(b"\x01" + struct.pack("!I", 8) + b"junk")
        refused(c)
    b.check()


def test_truncated_message_then_close(h):
    """'Q' announces 100 bytes, 10 arrive, the client leaves: the server that may have seen
    the half message must not be handed to the next client."""
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.login("postgres", "p0")
        c.send(b"Q" + struct.pack("!I", 100) + b"SELECT")
        c.close()
    b.check()


def test_message_over_max_packet_size(pgherd):
    h = pgherd(settings={**SETTINGS, "max_packet_size": 100_000}, workers=1)
    b = Bystander(h)
    with wire.RawClient(h.host, h.port, timeout=5) as c:
        c.login("postgres", "p0")
        c.send(b"Q" + struct.pack("!I", 50_000_000) + b"SELECT '" + b"x" * 1000)
        refused(c)
    b.check()


def test_client_vanishes_mid_query(h, pg):
    b = Bystander(h)
    c = wire.RawClient(h.host, h.port, timeout=5)
    c.login("postgres", "p0")
    c.send(wire.query("SELECT pg_sleep(2)"))
    c.abort()  # RST while the query runs
    b.check()


def test_client_closes_with_unread_results(h):
    b = Bystander(h)
    c = wire.RawClient(h.host, h.port, timeout=5)
    c.login("postgres", "p0")
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.send(wire.query("SELECT repeat('x', 1000) FROM generate_series(1, 20000)"))
    c.abort()  # never reads the ~20 MB of results
    b.check()
