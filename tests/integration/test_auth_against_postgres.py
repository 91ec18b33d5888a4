"""workers.auth against a real PostgreSQL, no pooler: the server side of every login here is
PostgreSQL itself, spoken to over a raw v3 socket.

The module starts its own throwaway cluster (initdb + pg_ctl, run as ``postgres`` when the
tests run as root, since PostgreSQL refuses root) with:

* ``u_scram`` / 'sc pw'  -- SCRAM secret, pg_hba ``scram-sha-256``
* ``u_md5``   / 'md5pw'  -- md5 secret (created under password_encryption=md5), pg_hba ``md5``
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
import scramp

from workers.auth import (
    SCRAM_SHA_256,
    AuthFailed,
    ScramClient,
    ScramServer,
    md5_client_response,
    md5_secret,
    parse_scram_secret,
    plain_verify,
)

SCRAM_USER, SCRAM_PASSWORD = "u_scram", "sc pw"
MD5_USER, MD5_PASSWORD = "u_md5", "md5pw"

PG_HBA = f"""\
local all postgres trust
host all postgres 127.0.0.1/32 trust
host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256
host all {MD5_USER} 127.0.0.1/32 md5
"""

AUTH_OK, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 5, 10, 11, 12


@dataclass(frozen=True)
class Cluster:
    port: int
    secrets: dict[str, str]  # rolname -> pg_authid.rolpassword


def _pg_bindir() -> str | None:
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_cluster_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb) not found")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL")
    workdir = tempfile.mkdtemp(prefix="pgherd-auth-", dir="/tmp")
    if os.geteuid() == 0:
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
    datadir = os.path.join(workdir, "data")
    port = _free_port()

    def run(*argv: str) -> None:
        subprocess.run(_as_cluster_owner(list(argv)), check=True, capture_output=True, timeout=120)

    try:
        run(f"{bindir}/initdb", "-D", datadir, "-U", "postgres", "-A", "trust", "--no-sync", "--no-locale", "-E", "UTF8")
        with open(os.path.join(datadir, "pg_hba.conf"), "w") as hba:
            hba.write(PG_HBA)
        options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={workdir} -c fsync=off"
        run(f"{bindir}/pg_ctl", "-D", datadir, "-l", os.path.join(workdir, "log"), "-w", "-t", "60",
            "-o", options, "start")
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                 autocommit=True) as conn:
                conn.execute("SET password_encryption = 'md5'")
                conn.execute(f"CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'")
                conn.execute("SET password_encryption = 'scram-sha-256'")
                conn.execute(f"CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'")
                rows = conn.execute(
                    "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                    [[SCRAM_USER, MD5_USER]],
                ).fetchall()
            yield Cluster(port, dict(rows))
        finally:
            run(f"{bindir}/pg_ctl", "-D", datadir, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- a minimal PostgreSQL v3 frontend ----------------------------------------------------


class PgError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('C')}: {fields.get('M')}")
        self.sqlstate = fields.get("C")


class Wire:
    def __init__(self, port: int, user: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = struct.pack("!i", 196608) + b"user\0" + user.encode() + b"\0database\0postgres\0\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)

    def close(self) -> None:
        try:
            self.send(b"X", b"")
        except OSError:
            pass
        self.sock.close()

    def send(self, kind: bytes, payload: bytes) -> None:
        self.sock.sendall(kind + struct.pack("!i", len(payload) + 4) + payload)

    def _exact(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = self.sock.recv(size)
            if not chunk:
                raise ConnectionError("server closed the connection")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def recv(self) -> tuple[bytes, bytes]:
        header = self._exact(5)
        kind, payload = header[:1], self._exact(struct.unpack("!i", header[1:])[0] - 4)
        if kind == b"E":
            fields = {f[:1].decode(): f[1:].decode() for f in payload.split(b"\0") if f}
            raise PgError(fields)
        return kind, payload

    def auth(self) -> tuple[int, bytes]:
        kind, payload = self.recv()
        assert kind == b"R", kind
        return struct.unpack("!i", payload[:4])[0], payload[4:]

    def expect_login_complete(self) -> None:
        """AuthenticationOk, then ParameterStatus/BackendKeyData/NoticeResponse until ReadyForQuery."""
        assert self.auth()[0] == AUTH_OK
        while True:
            kind, payload = self.recv()
            if kind == b"Z":
                assert payload == b"I"
                return
            assert kind in (b"S", b"K", b"N"), kind


def scram_login(port: int, user: str, client: ScramClient) -> None:
    wire = Wire(port, user)
    try:
        code, data = wire.auth()
        assert code == AUTH_SASL
        assert SCRAM_SHA_256.encode() in data.split(b"\0")
        first = client.client_first()
        wire.send(b"p", SCRAM_SHA_256.encode() + b"\0" + struct.pack("!i", len(first)) + first)
        code, data = wire.auth()
        assert code == AUTH_SASL_CONTINUE
        wire.send(b"p", client.handle_server_first(data))
        code, data = wire.auth()
        assert code == AUTH_SASL_FINAL
        client.handle_server_final(data)
        wire.expect_login_complete()
    finally:
        wire.close()


def md5_login(port: int, user: str, stored: str) -> None:
    wire = Wire(port, user)
    try:
        code, salt = wire.auth()
        assert code == AUTH_MD5 and len(salt) == 4
        wire.send(b"p", md5_client_response(user, stored, salt) + b"\0")
        wire.expect_login_complete()
    finally:
        wire.close()


# --- tests ------------------------------------------------------------------------------


def test_real_secrets_are_understood(cluster: Cluster) -> None:
    scram = cluster.secrets[SCRAM_USER]
    assert parse_scram_secret(scram) is not None
    assert plain_verify(scram, SCRAM_USER, SCRAM_PASSWORD)
    assert not plain_verify(scram, SCRAM_USER, "nope")
    assert cluster.secrets[MD5_USER] == md5_secret(MD5_USER, MD5_PASSWORD)


def test_scram_client_password_login(cluster: Cluster) -> None:
    scram_login(cluster.port, SCRAM_USER, ScramClient(password=SCRAM_PASSWORD))


def test_scram_client_wrong_password(cluster: Cluster) -> None:
    with pytest.raises(PgError) as error:
        scram_login(cluster.port, SCRAM_USER, ScramClient(password="wrong"))
    assert error.value.sqlstate == "28P01"


def test_md5_login_with_plaintext(cluster: Cluster) -> None:
    md5_login(cluster.port, MD5_USER, MD5_PASSWORD)


def test_md5_login_with_md5_secret(cluster: Cluster) -> None:
    md5_login(cluster.port, MD5_USER, cluster.secrets[MD5_USER])


def test_md5_wrong_password(cluster: Cluster) -> None:
    with pytest.raises(PgError) as error:
        md5_login(cluster.port, MD5_USER, "wrong")
    assert error.value.sqlstate == "28P01"


def test_scram_passthrough(cluster: Cluster) -> None:
    """A client logs in to pgherd's ScramServer holding PostgreSQL's own secret; the keys
    recovered from that exchange then log in to PostgreSQL with no password known to pgherd."""
    front = ScramServer(SCRAM_USER, cluster.secrets[SCRAM_USER])
    app = scramp.ScramClient([SCRAM_SHA_256], SCRAM_USER, SCRAM_PASSWORD)
    server_first = front.handle_client_first(app.get_client_first().encode())
    app.set_server_first(server_first.decode())
    app.set_server_final(front.handle_client_final(app.get_client_final().encode()).decode())
    assert front.client_key is not None and front.server_key is not None

    scram_login(cluster.port, SCRAM_USER,
                ScramClient(client_key=front.client_key, server_key=front.server_key))


def test_scram_passthrough_after_wrong_client_password_has_no_keys(cluster: Cluster) -> None:
    front = ScramServer(SCRAM_USER, cluster.secrets[SCRAM_USER])
    app = ScramClient(password="wrong")
    server_first = front.handle_client_first(app.client_first())
    with pytest.raises(AuthFailed):
        front.handle_client_final(app.handle_server_first(server_first))
    assert front.client_key is None and front.server_key is None
