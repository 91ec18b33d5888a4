"""PostgreSQL v3 wire protocol, sans-IO: message boundaries, message facts, message builders.

Nothing here owns a socket. The relay (``workers/relay.py``) walks message headers itself on
its hot path with the constants below; everything slower (login, admin console, internal
queries) uses :class:`MessageReader` and the builders.

Message layout: a one-byte type, a big-endian int32 length that counts itself but not the type
byte, then the body. The startup phase has no type byte (length + body).
"""

from __future__ import annotations

import functools
import struct
from typing import Iterable, Iterator

# Startup-phase request codes (the int32 after the length of an untyped packet).
PROTOCOL_V3 = 196608  # 3.0
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

# Startup packets are small; PostgreSQL itself refuses anything over 10000 bytes.
MAX_STARTUP_PACKET = 10000
# Any other message before authentication (password, SASL): a password is at most 65531
# bytes in PgBouncer. An unauthenticated client never makes pgherd hold more than this.
MAX_LOGIN_MESSAGE = 65536
# A query typed at the admin console.
MAX_CONSOLE_MESSAGE = 1 << 20

HEADER = struct.Struct("!cI")
INT32 = struct.Struct("!I")
INT16 = struct.Struct("!H")
_LEN = struct.Struct("!I")

# Frontend (client -> server) message types as byte values.
F_QUERY = ord("Q")
F_PARSE = ord("P")
F_BIND = ord("B")
F_DESCRIBE = ord("D")
F_EXECUTE = ord("E")
F_CLOSE = ord("C")
F_SYNC = ord("S")
F_FLUSH = ord("H")
F_FUNCTION_CALL = ord("F")
F_TERMINATE = ord("X")
F_COPY_DATA = ord("d")
F_COPY_DONE = ord("c")
F_COPY_FAIL = ord("f")
F_PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse

# Backend (server -> client) message types.
B_AUTH = ord("R")
B_PARAMETER_STATUS = ord("S")
B_BACKEND_KEY = ord("K")
B_READY = ord("Z")
B_ERROR = ord("E")
B_NOTICE = ord("N")
B_COPY_IN = ord("G")
B_COPY_OUT = ord("H")
B_COPY_BOTH = ord("W")
B_NEGOTIATE = ord("v")
B_COMMAND_COMPLETE = ord("C")

# Authentication request codes inside 'R'.
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Type OIDs used by the admin console's RowDescription.
OID_INT4 = 23
OID_INT8 = 20
OID_NUMERIC = 1700
OID_TEXT = 25
OID_BYTEA = 17


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid message where one was expected."""


# --------------------------------------------------------------------------- reading


class MessageReader:
    """Accumulates bytes and yields whole messages; for the slow paths only.

    ``startup`` readers expect untyped packets (length + body); the others typed messages.
    """

    __slots__ = ("buf", "startup", "max_size")

    def __init__(self, *, startup: bool = False, max_size: int = 0x7FFFFFFF) -> None:
        self.buf = bytearray()
        self.startup = startup
        self.max_size = max_size

    def feed(self, data: bytes | memoryview) -> None:
        self.buf += data

    def next(self) -> tuple[int, bytes] | None:
        """Return ``(type, body)`` of the next complete message or None; type is 0 for startup
        packets (and F_TERMINATE for a Terminate sent instead of one)."""
        buf = self.buf
        if self.startup:
            if buf[:5] == TERMINATE:
                # A client may say goodbye before its startup packet (PgBouncer reads it as
                # a typed message too): the caller closes without a word, as PostgreSQL does.
                del buf[:5]
                return F_TERMINATE, b""
            if len(buf) < 4:
                return None
            (length,) = _LEN.unpack_from(buf, 0)
            if length < 8 or length > MAX_STARTUP_PACKET:
                raise ProtocolError("bad startup packet length %d" % length)
            if len(buf) < length:
                return None
            body = bytes(buf[4:length])
            del buf[:length]
            return 0, body
        if len(buf) < 5:
            return None
        mtype = buf[0]
        (length,) = _LEN.unpack_from(buf, 1)
        if length < 4 or length > self.max_size:
            raise ProtocolError("bad message length %d for type %r" % (length, chr(mtype)))
        end = 1 + length
        if len(buf) < end:
            return None
        body = bytes(buf[5:end])
        del buf[:end]
        return mtype, body

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        while (msg := self.next()) is not None:
            yield msg


def parse_startup(body: bytes) -> tuple[int, dict[str, str] | tuple[int, int]]:
    """Decode an untyped startup-phase packet body (after the length).

    Returns ``(code, params)`` for a StartupMessage of protocol 3.x (any minor: the caller
    answers a minor above 0 with NegotiateProtocolVersion), ``(CANCEL_REQUEST_CODE, (pid,
    key))`` for a CancelRequest, and ``(code, {})`` for SSL/GSSENC requests and other versions.
    """
    if len(body) < 4:
        raise ProtocolError("startup packet too short")
    (code,) = INT32.unpack_from(body, 0)
    if code == CANCEL_REQUEST_CODE:
        if len(body) != 12:
            raise ProtocolError("bad cancel request length")
        pid, key = struct.unpack_from("!II", body, 4)
        return code, (pid, key)
    if code >> 16 != 3:
        return code, {}
    params: dict[str, str] = {}
    parts = body[4:].split(b"\x00")
    # A well-formed list ends with an empty name followed by the split's trailing empty item.
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolError("startup packet is not NUL terminated")
    items = parts[:-2]
    if len(items) % 2:
        raise ProtocolError("startup packet has an odd number of strings")
    for i in range(0, len(items), 2):
        try:
            params[items[i].decode()] = items[i + 1].decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("startup parameter is not valid UTF-8") from exc
    return code, params


def parse_fields(body: bytes) -> dict[str, str]:
    """Decode an ErrorResponse/NoticeResponse body into ``{field_code: value}``."""
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def parse_parameter_status(body: bytes | memoryview) -> tuple[str, str]:
    parts = bytes(body).split(b"\x00", 2)
    if len(parts) != 3:
        raise ProtocolError("bad ParameterStatus")
    name, value, _ = parts
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_cstring(body: bytes, offset: int = 0) -> tuple[str, int]:
    """Return the NUL-terminated string at ``offset`` and the offset after its NUL."""
    end = body.index(b"\x00", offset)
    return body[offset:end].decode("utf-8", "replace"), end + 1


# --------------------------------------------------------------------------- building


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + _LEN.pack(len(body) + 4) + body


def _cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def startup_message(params: dict[str, str]) -> bytes:
    body = INT32.pack(PROTOCOL_V3) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items())
    body += b"\x00"
    return _LEN.pack(len(body) + 4) + body


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, pid, key)


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", INT32.pack(code) + data)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\x00")


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", _cstr(mechanism) + INT32.pack(len(data)) + data)


@functools.lru_cache(maxsize=4096)
def parameter_status(name: str, value: str) -> bytes:
    """Cached: every login replays the same few server parameters."""
    return message(b"S", _cstr(name) + _cstr(value))


def negotiate_protocol_version(options: Iterable[str]) -> bytes:
    """NegotiateProtocolVersion: protocol 3.0 is the newest we speak; ``options`` are the
    ``_pq_.`` startup options we do not know (PostgreSQL sends the full version code)."""
    names = list(options)
    return message(b"v", INT32.pack(PROTOCOL_V3) + INT32.pack(len(names))
                   + b"".join(_cstr(n) for n in names))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", struct.pack("!II", pid, key))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def query(sql: str) -> bytes:
    return message(b"Q", _cstr(sql))


TERMINATE = message(b"X")
READY_IDLE = ready_for_query(b"I")


def _fields(severity: str, sqlstate: str, text: str, detail: str | None) -> bytes:
    body = b"S" + _cstr(severity) + b"V" + _cstr(severity) + b"C" + _cstr(sqlstate)
    body += b"M" + _cstr(text)
    if detail:
        body += b"D" + _cstr(detail)
    return body + b"\x00"


def error_response(
    text: str, sqlstate: str = "08P01", severity: str = "FATAL", detail: str | None = None
) -> bytes:
    return message(b"E", _fields(severity, sqlstate, text, detail))


def notice_response(text: str, sqlstate: str = "00000", severity: str = "NOTICE",
                    detail: str | None = None) -> bytes:
    return message(b"N", _fields(severity, sqlstate, text, detail))


def row_description(columns: Iterable[tuple[str, int]]) -> bytes:
    cols = list(columns)
    body = INT16.pack(len(cols))
    for name, oid in cols:
        # table oid, column no, type oid, type size, type modifier, format (text)
        body += _cstr(name) + struct.pack("!IhIhih", 0, 0, oid, -1, -1, 0)
    return message(b"T", body)


def data_row(values: Iterable[object]) -> bytes:
    vals = list(values)
    body = INT16.pack(len(vals))
    for v in vals:
        if v is None:
            body += b"\xff\xff\xff\xff"
        else:
            raw = str(v).encode()
            body += INT32.pack(len(raw)) + raw
    return message(b"D", body)


def command_complete(tag: str) -> bytes:
    return message(b"C", _cstr(tag))


EMPTY_QUERY_RESPONSE = message(b"I")


# --------------------------------------------------------------------------- stream scanning
#
# The relay forwards whole chunks as they arrive and only *observes* them through these
# scanners: they keep the framing state across chunk boundaries and count the facts that decide
# when a server may be released. No object is built per message; a message body is copied only
# when it is both interesting (ReadyForQuery, ParameterStatus) and split across two chunks.


class _Scanner:
    """Message framing across chunks, shared by both directions."""

    __slots__ = ("remaining", "head", "mtype", "body", "max_size", "want", "report")

    #: message types whose body the subclass needs; others are reported by type only
    WANT_BODY: bytes = b""
    #: message types reported to ``_message`` at all (None: every type)
    REPORT: frozenset | None = None

    def __init__(self, max_size: int = 0x7FFFFFFF) -> None:
        self.remaining = 0  # body bytes of the current message not yet seen
        self.head = b""  # a header split across chunks
        self.mtype = 0
        self.body: bytearray | None = None
        self.max_size = max_size
        self.want = self.WANT_BODY
        self.report = self.REPORT

    def at_boundary(self) -> bool:
        """True when no message is half-way through (safe to switch servers)."""
        return self.remaining == 0 and not self.head

    def feed(self, buf: bytearray | memoryview, n: int) -> None:
        """Observe ``buf[:n]``; calls ``_message`` once per message, in stream order."""
        pos = 0
        want = self.want
        report = self.report
        on_message = self._message
        while pos < n:
            if self.remaining:
                take = self.remaining if self.remaining <= n - pos else n - pos
                if self.body is not None:
                    self.body += buf[pos : pos + take]
                pos += take
                self.remaining -= take
                if self.remaining == 0 and self.body is not None:
                    body, self.body = self.body, None
                    on_message(self.mtype, body, 0, len(body))
                continue
            if self.head or n - pos < 5:
                take = min(5 - len(self.head), n - pos)
                self.head += bytes(buf[pos : pos + take])
                pos += take
                if len(self.head) < 5:
                    return
                mtype = self.head[0]
                (length,) = _LEN.unpack_from(self.head, 1)
                self.head = b""
                self._check(mtype, length)
                self._start(mtype, length - 4, want)
                continue
            mtype = buf[pos]
            (length,) = _LEN.unpack_from(buf, pos + 1)
            end = pos + 1 + length
            if end <= n and length >= 4:
                if length > self.max_size:
                    self._check(mtype, length)
                if report is None or mtype in report:
                    on_message(mtype, buf, pos + 5, end)
                pos = end
                continue
            self._check(mtype, length)
            pos += 5
            self._start(mtype, length - 4, want)

    def _start(self, mtype: int, body_len: int, want: bytes) -> None:
        """A message whose body continues past this chunk (or is empty after a split header)."""
        self.mtype = mtype
        if body_len == 0:
            self._message(mtype, b"", 0, 0)
            return
        self.remaining = body_len
        if mtype in want:
            self.body = bytearray()
        elif self.report is None or mtype in self.report:
            # Reported at their start; bodies of uninteresting ones are skipped.
            self._message(mtype, b"", 0, -1)

    def _check(self, mtype: int, length: int) -> None:
        if length < 4 or length > self.max_size:
            raise ProtocolError("invalid packet length %d (type %r)" % (length, chr(mtype)))

    def _message(self, mtype: int, buf, start: int, end: int) -> None:  # pragma: no cover
        raise NotImplementedError


class FrontendScanner(_Scanner):
    """Client -> server stream: what will the server answer with a ReadyForQuery?

    ``syncs`` counts Query, Sync and FunctionCall messages (each gets exactly one
    ReadyForQuery, except Syncs sent during COPY IN, which the server ignores: see
    :meth:`copy_in_started`). ``ext_open`` is true while extended-protocol messages wait for
    their Sync: the server holds an unnamed statement or portal for this client then.
    """

    __slots__ = ("syncs", "ext_open", "syncs_since_exec", "copy_in", "terminate", "simple_queries",
                 "watch_named", "named", "unsynced")

    def __init__(self, max_size: int = 0x7FFFFFFF, watch_named: bool = False) -> None:
        super().__init__(max_size)
        self.syncs = 0
        self.ext_open = False
        self.syncs_since_exec = 0
        self.copy_in = False
        self.terminate = False
        self.simple_queries = 0
        # Named prepared statements need rewriting (workers/prepared.py): when watched,
        # ``named`` says one was seen (or a Parse/Bind/Describe/Close too split to tell).
        self.watch_named = watch_named
        self.named = False
        # While watched: the extended-protocol messages since the last Sync, in order (a
        # pipeline's replies still owed when rewriting begins: see Client._enter_statements).
        self.unsynced: list[int] = []

    def unsee(self, syncs: int, syncs_since_exec: int, unsynced: list[int]) -> None:
        """Forget a chunk whose messages will be fed again (rewritten): its counts go back
        (``unsynced`` is the list as it was: a Sync in the chunk emptied it); the rest of
        what it changed the second feed sets alike."""
        self.syncs = syncs
        self.syncs_since_exec = syncs_since_exec
        self.unsynced = unsynced
        self.remaining = 0
        self.head = b""
        self.body = None
        self.named = False

    def query(self) -> None:
        """A Query: one ReadyForQuery owed. It also ends whatever Parse/Bind/Describe left
        unsynced: the server drops the unnamed statement and portal when it starts one."""
        self.syncs += 1
        self.syncs_since_exec = 0
        self.simple_queries += 1
        self.ext_open = False
        if self.unsynced:
            self.unsynced.clear()

    def _message(self, mtype: int, buf, start: int, end: int) -> None:
        if mtype == F_QUERY:
            self.query()
        elif mtype == F_SYNC:
            self.ext_open = False
            if not self.copy_in:
                self.syncs += 1
                self.syncs_since_exec += 1
            if self.unsynced:
                self.unsynced.clear()
        elif mtype == F_COPY_DATA:
            pass
        elif mtype == F_EXECUTE:
            self.ext_open = True
            self.syncs_since_exec = 0
            if self.watch_named:
                self.unsynced.append(mtype)
        elif mtype in _EXTENDED:
            if not (mtype == F_FLUSH and self.copy_in):
                self.ext_open = True
            if self.watch_named and mtype != F_FLUSH:
                self.unsynced.append(mtype)
                if names_statement(mtype, buf, start, end):
                    self.named = True
        elif mtype == F_COPY_DONE or mtype == F_COPY_FAIL:
            self.copy_in = False
        elif mtype == F_FUNCTION_CALL:
            self.syncs += 1
        elif mtype == F_TERMINATE:
            self.terminate = True
        else:
            raise ProtocolError("unknown client message type %r" % chr(mtype))

    def copy_in_started(self) -> int:
        """The server entered COPY IN: return how many counted Syncs it will ignore."""
        self.copy_in = True
        ignored = self.syncs_since_exec
        self.syncs -= ignored
        self.syncs_since_exec = 0
        return ignored


_EXTENDED = frozenset((F_PARSE, F_BIND, F_DESCRIBE, F_CLOSE, F_FLUSH))


def names_statement(mtype: int, buf, start: int, end: int) -> bool:
    """Does this Parse/Bind/Describe/Close refer to a NAMED prepared statement?

    True also when the body is not at hand (``end < 0``): the caller must then look closer.
    """
    if end < 0:
        return True
    if end == start:
        return False
    if mtype == F_PARSE:
        return buf[start] != 0
    if mtype == F_BIND:
        portal_end = buf.find(b"\x00", start, end)
        return 0 <= portal_end < end - 1 and buf[portal_end + 1] != 0
    # Describe/Close: 'S' + statement name (portals live only inside a transaction).
    return buf[start] == 83 and end - start > 1 and buf[start + 1] != 0


class BackendScanner(_Scanner):
    """Server -> client stream: ReadyForQuery statuses, ParameterStatus, COPY IN starts.

    ``rfq`` counts ReadyForQuery messages, ``rfq_idle`` those with status 'I' (a transaction
    ended), ``status`` is the last status byte. ``params`` collects ParameterStatus reports
    and ``copy_in`` counts CopyInResponse messages; the relay drains both. ``copy_open`` says
    whether the server is in COPY IN after everything seen so far.
    """

    __slots__ = ("rfq", "rfq_idle", "status", "params", "copy_in", "copy_open", "discarded",
                 "fatal", "discard_watched", "counting", "ext_done", "ext_failed")

    # ErrorResponse bodies are read for their severity only (errors are not the hot path).
    WANT_BODY = bytes((B_READY, B_PARAMETER_STATUS, B_ERROR))
    REPORT = frozenset((B_READY, B_PARAMETER_STATUS, B_COPY_IN, B_ERROR))

    def __init__(self) -> None:
        super().__init__()
        self.discarded = False
        self.fatal = False  # a FATAL or PANIC went by: the server is ending the session
        self.rfq = 0
        self.rfq_idle = 0
        self.status = 73  # 'I'
        self.params: list[tuple[str, str]] | None = None
        self.copy_in = 0
        self.copy_open = False  # in COPY IN after the last message seen
        self.discard_watched = False
        # While its client has extended-protocol requests not synced yet: their replies
        # since the last ReadyForQuery (see prepared.in_flight), and whether one failed.
        self.counting = False
        self.ext_done = 0
        self.ext_failed = False

    def watch_discard(self, on: bool) -> None:
        """While a server has prepared statements: notice DISCARD ALL / DEALLOCATE ALL."""
        self.discard_watched = on
        self._choose_reports()

    def count_replies(self, on: bool) -> None:
        """Count the replies that end an extended-protocol request (off on the hot path)."""
        self.counting = on
        self._choose_reports()

    def _choose_reports(self) -> None:
        on = self.discard_watched
        report = _REPORT_WITH_COMPLETE if on else BackendScanner.REPORT
        self.report = report | _REQUEST_ENDS if self.counting else report
        self.want = _WANT_WITH_COMPLETE if on else BackendScanner.WANT_BODY

    def _message(self, mtype: int, buf, start: int, end: int) -> None:
        if self.counting and mtype in _REQUEST_ENDS:
            self.ext_done += 1
        if mtype == B_READY:
            if end - start != 1:
                raise ProtocolError("bad ReadyForQuery")
            status = buf[start]
            self.status = status
            self.copy_open = False  # a failed COPY ends with ReadyForQuery, not CopyDone
            self.rfq += 1
            if status == 73:
                self.rfq_idle += 1
            self.ext_done = 0
            self.ext_failed = False
        elif mtype == B_PARAMETER_STATUS:
            if end >= 0:
                pair = parse_parameter_status(buf[start:end])
                if self.params is None:
                    self.params = [pair]
                else:
                    self.params.append(pair)
        elif mtype == B_COPY_IN:
            self.copy_in += 1
            self.copy_open = True
        elif mtype == B_ERROR:
            self.ext_failed = True  # the server skips the rest up to the client's Sync
            if end >= 0 and error_severity(buf, start, end) in (b"FATAL", b"PANIC"):
                self.fatal = True
        elif mtype == B_COMMAND_COMPLETE and end >= 0:
            tag = bytes(buf[start : start + 14])
            if tag.startswith(b"DISCARD ALL") or tag.startswith(b"DEALLOCATE ALL"):
                self.discarded = True


def error_severity(buf, start: int, end: int) -> bytes:
    """The severity of an ErrorResponse body in ``buf[start:end]``: its non-localized 'V'
    field, else 'S' (servers before 9.6)."""
    fields = bytes(buf[start:end]).split(b"\x00")
    for tag in (b"V", b"S"):
        for field in fields:
            if field[:1] == tag:
                return field[1:]
    return b""


_REPORT_WITH_COMPLETE = BackendScanner.REPORT | {B_COMMAND_COMPLETE}
#: The one reply that ends each extended-protocol request: ParseComplete, BindComplete,
#: CloseComplete, NoData or RowDescription (Describe), CommandComplete, EmptyQueryResponse or
#: PortalSuspended (Execute).
_REQUEST_ENDS = frozenset(b"123nTCIs")
_WANT_WITH_COMPLETE = BackendScanner.WANT_BODY + bytes((B_COMMAND_COMPLETE,))
