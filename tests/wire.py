"""A tiny raw PostgreSQL v3 wire client for integration tests that real drivers cannot
express: malformed packets, FunctionCall, a client that vanishes at a chosen instant.

Independent of pgherd's own ``workers.proto`` on purpose: the tests must not share the code
they check. Only what the tests need is here; every read has a deadline.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Iterable

PROTOCOL_V3 = 196608
SSL_REQUEST = 80877103
CANCEL_REQUEST = 80877102


class WireError(AssertionError):
    """The peer did not answer as the test expected."""


# --------------------------------------------------------------------------- builders


def startup(params: dict[str, str], version: int = PROTOCOL_V3) -> bytes:
    body = struct.pack("!I", version)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def untyped(code: int, payload: bytes = b"") -> bytes:
    return struct.pack("!II", 8 + len(payload), code) + payload


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def function_call(oid: int, args: Iterable[bytes | None], result_format: int = 0) -> bytes:
    """FunctionCall ('F') with text-format arguments."""
    args = list(args)
    body = struct.pack("!IH", oid, 0)  # no argument format codes: all text
    body += struct.pack("!H", len(args))
    for a in args:
        if a is None:
            body += struct.pack("!i", -1)
        else:
            body += struct.pack("!i", len(a)) + a
    body += struct.pack("!H", result_format)
    return message(b"F", body)


def parse(sql: str, name: str = "") -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0))


def describe_statement(name: str = "") -> bytes:
    return message(b"D", b"S" + name.encode() + b"\0")


def bind(params: Iterable[bytes | None] = (), statement: str = "", portal: str = "") -> bytes:
    params = list(params)
    body = portal.encode() + b"\0" + statement.encode() + b"\0"
    body += struct.pack("!HH", 0, len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack("!H", 0)
    return message(b"B", body)


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", portal.encode() + b"\0" + struct.pack("!I", max_rows))


SYNC = message(b"S")
FLUSH = message(b"H")
TERMINATE = message(b"X")


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields: {'S': 'FATAL', 'C': '08P01', 'M': ...}."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.index(b"\0", pos + 1)
        out[code] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return out


# --------------------------------------------------------------------------- client


class RawClient:
    """One TCP (or unix) connection with a message reader; every read has a deadline."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""
        self.eof = False

    # -- raw I/O ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on EOF (or a reset, which is the same for the tests)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WireError(f"no answer within {self.timeout}s (buffered: {self.buf[:200]!r})")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise WireError(
                f"no answer within {self.timeout}s (buffered: {self.buf[:200]!r})"
            ) from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_byte(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while not self.buf:
            if not self._fill(deadline):
                raise WireError("connection closed while a byte was expected")
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def read_message(self) -> tuple[bytes, bytes] | None:
        """Next typed message as (type, body), or None at EOF."""
        deadline = time.monotonic() + self.timeout
        while True:
            if len(self.buf) >= 5:
                mtype = self.buf[:1]
                (length,) = struct.unpack_from("!I", self.buf, 1)
                if length < 4:
                    raise WireError(f"bad length {length} in a {mtype!r} from the server")
                if len(self.buf) >= 1 + length:
                    body = self.buf[5 : 1 + length]
                    self.buf = self.buf[1 + length :]
                    return mtype, body
            if not self._fill(deadline):
                if self.buf:
                    raise WireError(f"connection closed inside a message: {self.buf[:200]!r}")
                return None

    def read_until_eof(self) -> list[tuple[bytes, bytes]]:
        """Every message until the peer closes; raises WireError if it does not close in
        time."""
        out = []
        while True:
            msg = self.read_message()
            if msg is None:
                return out
            out.append(msg)

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        """Messages up to and including ReadyForQuery; WireError on EOF before it."""
        out = []
        while True:
            msg = self.read_message()
            if msg is None:
                raise WireError(f"connection closed before ReadyForQuery; got {out!r}")
            out.append(msg)
            if msg[0] == b"Z":
                return out

    # -- conveniences ----------------------------------------------------------

    def login(self, user: str, database: str, **params: str) -> list[tuple[bytes, bytes]]:
        """Startup with trust auth (AuthenticationOk expected) up to ReadyForQuery."""
        self.send(startup({"user": user, "database": database, **params}))
        msgs = self.read_until_ready()
        auth = [body for t, body in msgs if t == b"R"]
        errors = [parse_fields(body) for t, body in msgs if t == b"E"]
        if errors or not auth or struct.unpack_from("!I", auth[0])[0] != 0:
            raise WireError(f"login failed: {errors or msgs!r}")
        return msgs

    def read_types(self, *types: bytes) -> list[tuple[bytes, bytes]]:
        """Exactly the next messages, which must have these types in this order."""
        out = []
        for want in types:
            msg = self.read_message()
            if msg is None or msg[0] != want:
                raise WireError(f"expected {want!r}, got {msg!r} after {out!r}")
            out.append(msg)
        return out

    def simple(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(query(sql))
        return self.read_until_ready()

    def abort(self) -> None:
        """Vanish abruptly: RST instead of FIN (SO_LINGER 0), no Terminate."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def errors_in(msgs: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [parse_fields(body) for t, body in msgs if t == b"E"]


def data_rows(msgs: list[tuple[bytes, bytes]]) -> list[list[str | None]]:
    """DataRow values (text format) of a message list."""
    rows = []
    for t, body in msgs:
        if t != b"D":
            continue
        (n,) = struct.unpack_from("!H", body, 0)
        pos = 2
        row: list[str | None] = []
        for _ in range(n):
            (ln,) = struct.unpack_from("!i", body, pos)
            pos += 4
            if ln < 0:
                row.append(None)
            else:
                row.append(body[pos : pos + ln].decode())
                pos += ln
        rows.append(row)
    return rows
