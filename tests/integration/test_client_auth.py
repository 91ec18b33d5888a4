"""Authentication through pgherd: clients against the auth_file (every auth_type and kind of
stored secret), and pgherd's own server logins (md5, SCRAM, cleartext; password from the
auth_file or the connection string; SCRAM passthrough).

Reference: reference/pgbouncer.md §4.6, §4.7, §4.10. Wrong password and unknown user must be
indistinguishable (same text, same SQLSTATE: 08P01, as PgBouncer sends it, not PostgreSQL's 28P01).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess

import psycopg
import pytest

from tests import wire
from tests.helpers import login_error

AUTH_CODE = {"plain": 3, "md5": 5, "scram": 10}


def md5_secret(user: str, password: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def scram_secret(pg, user: str) -> str:
    (secret,) = pg.sql("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                       dbname="postgres", params=[user])[0]
    assert secret.startswith("SCRAM-SHA-256$"), secret
    return secret


def first_auth_request(h, user: str) -> int:
    """The authentication request code pgherd answers a StartupMessage with."""
    with wire.RawClient(h.host, h.port) as c:
        c.send(wire.startup({"user": user, "database": "p0"}))
        msg = c.read_message()
        assert msg is not None and msg[0] == b"R", msg
        return struct.unpack_from("!I", msg[1])[0]


def current_user(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


# --------------------------------------------------------------------------------------
# client -> pgherd
# --------------------------------------------------------------------------------------


def test_trust(pgherd):
    h = pgherd(settings={"auth_type": "trust"})
    assert current_user(h.dsn(user="app")) == "app"
    assert current_user(h.dsn(user="app", password="whatever")) == "app"
    # trust still needs the user in the auth_file
    err = login_error(h.dsn(user="nobody_here"))
    assert err is not None
    assert '"trust" authentication failed' in str(err), err
    # a role that exists in PostgreSQL but not in the auth_file is just as unknown
    h2 = pgherd(settings={"auth_type": "trust"}, userlist={"app": None})
    err2 = login_error(h2.dsn(user="app"))
    assert err2 is not None and str(err2) == str(err) and err2.sqlstate == err.sqlstate


# (auth_type, how app's password is stored, the request code pgherd must send)
CASES = [
    ("plain", "plaintext", "plain"),
    ("plain", "md5", "plain"),
    ("plain", "scram", "plain"),
    ("md5", "plaintext", "md5"),
    ("md5", "md5", "md5"),
    ("md5", "scram", "scram"),  # PgBouncer: md5 falls back to SCRAM for a SCRAM secret
    ("scram-sha-256", "plaintext", "scram"),
    ("scram-sha-256", "scram", "scram"),
]


@pytest.mark.parametrize("auth_type,stored,method", CASES,
                         ids=[f"{a}-{s}" for a, s, _ in CASES])
def test_password_auth(pgherd, pg, auth_type, stored, method):
    secret = {"plaintext": "apppw", "md5": md5_secret("app", "apppw"),
              "scram": scram_secret(pg, "app")}[stored]
    h = pgherd(settings={"auth_type": auth_type}, userlist={"app": secret})
    assert first_auth_request(h, "app") == AUTH_CODE[method]

    assert login_error(h.dsn(user="app", password="apppw")) is None
    assert current_user(h.dsn(user="app", password="apppw")) == "app"

    wrong = login_error(h.dsn(user="app", password="not-the-password"))
    assert wrong is not None and wrong.sqlstate == "08P01", wrong
    assert "authentication failed" in str(wrong)

    unknown = login_error(h.dsn(user="nobody_here", password="apppw"))
    assert unknown is not None and unknown.sqlstate == "08P01", unknown
    if (auth_type, stored) != ("md5", "scram"):
        # an unknown user goes through the same exchange and fails the same way. (Not
        # with auth_type md5 and a SCRAM secret: PgBouncer's unknown user has no secret,
        # so it gets the MD5 exchange and its error text while a known one gets SCRAM.)
        assert first_auth_request(h, "nobody_here") == AUTH_CODE[method]
        assert (unknown.sqlstate, str(unknown)) == (wrong.sqlstate, str(wrong))

    # the stored secret itself is not a password
    if stored != "plaintext":
        err = login_error(h.dsn(user="app", password=secret))
        assert err is not None and err.sqlstate == "08P01", err

    # libpq (psycopg) too, over TCP and over the unix socket
    for dsn in (h.dsn(user="app", password="apppw"), h.unix_dsn(user="app", password="apppw")):
        assert current_user(dsn) == "app"
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(h.dsn(user="app", password="wrong")).close()


@pytest.mark.parametrize("auth_type", ["plain", "md5"])
def test_empty_stored_password_never_matches(pgherd, auth_type):
    """postgres has "" in the auth_file: an empty password must not log it in."""
    h = pgherd(settings={"auth_type": auth_type})
    with wire.RawClient(h.host, h.port) as c:
        c.send(wire.startup({"user": "postgres", "database": "p0"}))
        msg = c.read_message()
        assert msg[0] == b"R"
        code = struct.unpack_from("!I", msg[1])[0]
        if code == AUTH_CODE["plain"]:
            # PgBouncer refuses an empty cleartext password outright ("empty password
            # returned by client"); any refusal will do here
            c.send(wire.message(b"p", b"\0"))
        else:
            assert code == AUTH_CODE["md5"]
            salt = msg[1][4:8]
            inner = hashlib.md5(b"" + b"postgres").hexdigest().encode()
            c.send(wire.message(b"p", b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
                                + b"\0"))
        msgs = c.read_until_eof()
        errors = wire.errors_in(msgs)
        assert errors, msgs
        assert not [m for m in msgs if m[0] in (b"Z", b"K")], msgs
        if auth_type == "md5":
            assert errors[0]["C"] == "08P01", errors


def test_psql_with_password(pgherd, pg):
    h = pgherd(settings={"auth_type": "md5"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    cmd = [pg.psql_path, "-X", "-At", "-h", h.host, "-p", str(h.port), "-U", "u_md5", "-d", "p0",
           "-c", "SELECT current_user"]
    ok = subprocess.run(cmd, env={**env, "PGPASSWORD": "md5pw"}, capture_output=True, text=True,
                        timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "u_md5"
    bad = subprocess.run(cmd, env={**env, "PGPASSWORD": "nope"}, capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2
    assert "password authentication failed" in bad.stderr


# --------------------------------------------------------------------------------------
# pgherd -> PostgreSQL
# --------------------------------------------------------------------------------------

SERVER_USERS = [("u_md5", "md5pw", "md5"), ("u_scram", "scrampw", "scram-sha-256"),
                ("u_plain", "plainpw", "password")]


@pytest.mark.parametrize("user,password,method", SERVER_USERS, ids=[u for u, _, _ in SERVER_USERS])
def test_server_login_with_auth_file_password(pgherd, pg, user, password, method):
    # clients are trusted; the server demands the password, which pgherd takes from the
    # auth_file
    h = pgherd(settings={"auth_type": "trust"})
    offset = pg.log_size()
    assert current_user(h.dsn(user=user)) == user
    assert f'identity="{user}" method={method}' in pg.log(offset)


def test_server_login_md5_with_stored_md5_secret(pgherd):
    h = pgherd(settings={"auth_type": "trust"}, userlist={"u_md5": md5_secret("u_md5", "md5pw")})
    assert current_user(h.dsn(user="u_md5")) == "u_md5"


@pytest.mark.parametrize("user,password,method", SERVER_USERS, ids=[u for u, _, _ in SERVER_USERS])
def test_server_login_with_connstr_password(pgherd, pg, user, password, method):
    # forced user with its password in [databases]; it is not in the auth_file at all
    h = pgherd(
        settings={"auth_type": "trust"},
        databases={**pgherd.default_databases,
                   "forced": {"dbname": "p0", "user": user, "password": password}},
        userlist={user: None},
    )
    with psycopg.connect(h.dsn("forced", user="app"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user, session_user, current_database()").fetchone() == (
            user, user, "p0")


def test_server_login_wrong_password_reaches_client(pgherd):
    h = pgherd(settings={"auth_type": "trust"}, userlist={"u_md5": "not-md5pw"})
    err = login_error(h.dsn(user="u_md5"))
    assert err is not None
    assert err.sqlstate == "28P01", err  # the server's own error, passed on as PgBouncer does
    assert 'password authentication failed for user "u_md5"' in str(err)
    # the pooler itself is fine
    assert current_user(h.dsn(user="app")) == "app"


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5"])
def test_scram_passthrough(pgherd, pg, auth_type):
    """The auth_file holds u_scram's real SCRAM secret (no password anywhere): pgherd logs
    into PostgreSQL with the keys recovered from the client's own SCRAM exchange."""
    secret = scram_secret(pg, "u_scram")
    h = pgherd(settings={"auth_type": auth_type}, userlist={"u_scram": secret}, workers=1)
    offset = pg.log_size()
    dsn = h.dsn(user="u_scram", password="scrampw")
    a = psycopg.connect(dsn, autocommit=True)
    b = psycopg.connect(dsn, autocommit=True)
    try:
        # two clients in session mode: two server logins with the recovered keys
        assert a.execute("SELECT current_user").fetchone() == ("u_scram",)
        assert b.execute("SELECT current_user").fetchone() == ("u_scram",)
        pa = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        pb = b.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pa != pb
    finally:
        a.close()
        b.close()
    assert pg.log(offset).count('identity="u_scram" method=scram-sha-256') >= 2
    err = login_error(h.dsn(user="u_scram", password="wrong"))
    assert err is not None and err.sqlstate == "08P01"


def test_scram_secret_without_client_scram_cannot_log_in(pgherd, pg):
    """A SCRAM secret is not a password: with trust client auth there are no SCRAM keys,
    so the server login cannot succeed."""
    h = pgherd(settings={"auth_type": "trust"}, userlist={"u_scram": scram_secret(pg, "u_scram")})
    err = login_error(h.dsn(user="u_scram"))
    assert err is not None
    assert current_user(h.dsn(user="app")) == "app"
