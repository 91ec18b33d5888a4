"""PgBouncer's errors, text and SQLSTATE: every error the pooler raises itself is 08P01
(protocol_violation), FATAL before a disconnect and ERROR on the console; a failed RELOAD is
F0000; a server's own login error is passed on with the server's SQLSTATE (test_client_auth).
Also the protocol corner PostgreSQL and PgBouncer 1.25 answer with NegotiateProtocolVersion:
a 3.x minor above 0 and unknown ``_pq_.`` startup options."""

from __future__ import annotations

import struct

import psycopg
import pytest

from tests import wire
from tests.helpers import login_error


def _raw_error(h, packet: bytes) -> dict[str, str]:
    """The ErrorResponse pgherd answers a raw startup packet with, and it closes."""
    with wire.RawClient(h.host, h.port) as c:
        c.send(packet)
        errors = wire.errors_in(c.read_until_eof())
    assert len(errors) == 1, errors
    return errors[0]


def _login(h, **kw) -> tuple[str, str, str]:
    err = login_error(h.dsn(**kw))
    assert err is not None, kw
    return err.severity, err.sqlstate, err.message


def test_errors_have_pgbouncers_text_and_sqlstate(pgherd):
    databases = {k: v for k, v in pgherd.default_databases.items() if k != "*"}
    h = pgherd(settings={"auth_type": "md5", "stats_users": "app"}, databases=databases,
               userlist={"postgres": "pgpw"}, workers=2)

    def admin(command: str, user: str = "postgres", password: str = "pgpw"):
        return h.admin(command, user=user, password=password)

    got: dict[str, tuple[str, str, str]] = {}

    got["unknown database"] = _login(h, dbname="nosuch", user="u_md5", password="md5pw")
    got["wrong password"] = _login(h, user="u_md5", password="wrong")
    got["unknown user"] = _login(h, user="nobody", password="x")
    for name, params in {
        # Other startup parameters go to PostgreSQL, which answers for them (test_params).
        "options form": {"user": "app", "database": "p0", "options": "-x"},
        "no user": {"database": "p0"},
    }.items():
        e = _raw_error(h, wire.startup(params))
        got[name] = (e["S"], e["C"], e["M"])
    e = _raw_error(h, wire.startup({"user": "app"}, version=2 << 16))
    got["protocol 2"] = (e["S"], e["C"], e["M"])
    got["console not allowed"] = _login(h, dbname="pgbouncer", user="u_md5",
                                        password="md5pw")

    def console_error(command: str, user: str = "postgres", password: str = "pgpw"):
        with pytest.raises(psycopg.Error) as info:
            admin(command, user=user, password=password)
        d = info.value.diag
        return d.severity, d.sqlstate, d.message_primary

    got["console command"] = console_error("FROBNICATE")
    got["console access"] = console_error("PAUSE", user="app", password="apppw")
    admin("DISABLE p1")
    got["disabled"] = _login(h, dbname="p1", user="u_md5", password="md5pw")
    admin("ENABLE p1")
    admin("SET auth_type = scram-sha-256")
    got["SASL"] = _login(h, user="u_scram", password="wrong")
    admin("SET auth_type = trust")
    got["trust"] = _login(h, user="nobody")
    admin("SET max_client_conn = 1")
    with h.connect("p0", user="app", password="apppw"):
        got["max_client_conn"] = _login(h, user="app")

    F, E = "FATAL", "ERROR"
    assert got == {
        "unknown database": (F, "08P01", "no such database: nosuch"),
        "wrong password": (F, "08P01", "password authentication failed"),
        "unknown user": (F, "08P01", "password authentication failed"),
        "options form": (F, "08P01", "unsupported options startup parameter: only "
                                     "'-c config=val' and '--config=val' are allowed"),
        "no user": (F, "08P01", "no username supplied"),
        "protocol 2": (F, "08P01", "old V2 protocol not supported"),
        "console not allowed": (F, "08P01", "not allowed"),
        "console command": (E, "08P01", "invalid command 'FROBNICATE', use SHOW HELP;"),
        "console access": (E, "08P01", "admin access needed"),
        "disabled": (F, "08P01", 'database "p1" is disabled'),
        "SASL": (F, "08P01", "SASL authentication failed"),
        "trust": (F, "08P01", '"trust" authentication failed'),
        "max_client_conn": (F, "08P01", "no more connections allowed (max_client_conn)"),
    }


# --------------------------------------------------------------------------- protocol 3.x


def _negotiation(messages: list[tuple[bytes, bytes]]) -> tuple[int, list[str]]:
    bodies = [body for t, body in messages if t == b"v"]
    assert len(bodies) == 1, messages
    version, count = struct.unpack_from("!II", bodies[0])
    names = bodies[0][8:].split(b"\0")[:count]
    return version, [n.decode() for n in names]


@pytest.mark.parametrize("database", ["p0", "pgbouncer"])
def test_newer_minor_and_unknown_options_get_negotiate_protocol_version(pgherd, database):
    """Protocol 3.2 (libpq 18's max_protocol_version=3.2) with a _pq_ option: the answer is
    NegotiateProtocolVersion(3.0, the option), then the login goes on in 3.0."""
    h = pgherd(settings={"auth_type": "trust"}, workers=1)
    with wire.RawClient(h.host, h.port) as c:
        c.send(wire.startup({"user": "postgres", "database": database,
                             "_pq_.test_option": "1"}, version=(3 << 16) | 2))
        messages = c.read_until_ready()
        assert messages[0][0] == b"v"  # before authentication, as PgBouncer sends it
        assert _negotiation(messages) == (wire.PROTOCOL_V3, ["_pq_.test_option"])
        assert not wire.errors_in(messages)
        if database == "pgbouncer":
            assert wire.data_rows(c.simple("SHOW VERSION"))[0][0].startswith("PgBouncer ")
        else:
            assert wire.data_rows(c.simple("SELECT 42")) == [["42"]]


def test_plain_3_0_gets_no_negotiation_and_a_newer_minor_alone_does(pgherd):
    h = pgherd(settings={"auth_type": "trust"}, workers=1)
    with wire.RawClient(h.host, h.port) as c:
        assert b"v" not in [t for t, _ in c.login("postgres", "p0")]
    with wire.RawClient(h.host, h.port) as c:
        c.send(wire.startup({"user": "postgres", "database": "p0"}, version=(3 << 16) | 1))
        messages = c.read_until_ready()
        assert _negotiation(messages) == (wire.PROTOCOL_V3, [])
        assert wire.data_rows(c.simple("SELECT 7")) == [["7"]]
