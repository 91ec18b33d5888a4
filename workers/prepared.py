"""Named prepared statements in transaction and statement mode (PgBouncer's
``max_prepared_statements``).

A client's protocol-level named statements must survive its server being switched between
transactions. So, for a client that uses them, pgherd rewrites its stream:

* Parse "s1" becomes Parse of an internal name derived from the statement's text and
  parameter types (``PGHERD_<hash>`` — a hash, not a counter, so servers handed between
  workers keep meaning the same thing); if the server already has it, nothing is sent and a
  ParseComplete is injected in its place in the reply stream. Clients preparing the same
  text share one server statement.
* Bind/Describe of "s1" name the internal statement; if this server lacks it, its Parse goes
  first and that Parse's ParseComplete is dropped from the reply.
* Close of "s1" forgets the client's name and is answered here (CloseComplete injected); the
  server keeps the statement for the other clients bound to it.
* Each server keeps at most ``max_prepared_statements``, least recently used closed first.

Schema changes. A server statement prepared before an ALTER TABLE ... TYPE (or whose types
were dropped and made again) fails at Bind: "cached plan must not change result type"
(0A000), or "cache lookup failed for ..." (XX000). Directly, a client then Closes it and
prepares the text again (asyncpg does so by itself) and gets a fresh statement. Through
pgherd the text must then not map to the stale name any more, on any server, in any worker:

* Such an error makes the name *stale* in every worker (:class:`Versions`, the other workers
  are told with a ``StaleStatement``): new Parses of the text get a new versioned name
  (``PGHERD_<hash>_<random>``), prepared afresh on every server.
* A client still bound to a stale name meets, on a server that lacks it, the error it would
  meet on its own backend directly — pgherd does not prepare it again there, which would
  silently change the statement's result under the client (PgBouncer does). The server
  fails in place of the Bind (a DO block raising 0A000), so a transaction fails just as it
  would, and the client gets PostgreSQL's own wording of that error.
* A client's own Close makes its next Parse of the text (in this worker) a fresh statement
  too, as it is directly; other clients keep theirs.

What a client sees in ``pg_prepared_statements`` in these modes: the statements of whichever
server runs its transaction, under pgherd's ``PGHERD_`` names, its own and those other clients
prepared there. In session mode nothing is rewritten: a client sees its own names.

Replies are matched to requests with a queue per server (:class:`Expect` entries): which reply
ends each request, and whether it is forwarded, dropped or synthesized. An ErrorResponse ends
the current request, and in the extended protocol the server skips every request up to the
next Sync: those get no reply, and a Parse among them leaves neither a server statement nor a
client name. Requests the client sends after such an error and before its Sync pass as they
are (the server skips them too).

Clients that never name a statement never come here: the relay's fast path only notices
that one did (``FrontendScanner.named``).
"""

from __future__ import annotations

import collections
import hashlib
import os
import struct
from typing import TYPE_CHECKING

from . import proto
from .proto import ProtocolError

if TYPE_CHECKING:
    from .relay import Client, Server

_LEN = struct.Struct("!I")
PARSE_COMPLETE = proto.message(b"1")
CLOSE_COMPLETE = proto.message(b"3")
FORWARD, DROP, INJECT, STALE = 0, 1, 2, 3  # STALE: its error is replaced by STALE_ERROR
_ASYNC = frozenset(b"NSA")  # NoticeResponse, ParameterStatus, Notification: any time
_ERROR, _READY = ord("E"), ord("Z")
_PREFIX = b"PGHERD_"
_BASE_LEN = len(_PREFIX) + 20  # a versioned name adds "_" and 8 hex digits
#: In place of a Bind of a stale statement: the server fails as it would on the client's own
#: backend (so a transaction fails too), and its error reaches the client as PostgreSQL words
#: it when it finds a statement's result changed (asyncpg knows it by its routine field).
STALE_PLAN = (
    proto.message(b"P", b"\x00DO $pgherd$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', "
                  b"MESSAGE = 'cached plan must not change result type'; END$pgherd$\x00\x00\x00")
    + proto.message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    + proto.message(b"E", b"\x00\x00\x00\x00\x00"))
STALE_ERROR = proto.message(b"E", b"SERROR\x00VERROR\x00C0A000\x00"
                            b"Mcached plan must not change result type\x00"
                            b"Fplancache.c\x00RRevalidateCachedQuery\x00\x00")
VERSIONS_KEPT = 10000


class StatementError(Exception):
    """PgBouncer closes the client for these (FATAL 08P01)."""


class Expect:
    """One request in flight: the reply types that end it, what to do with its replies, and
    what to undo if the server fails or skips it."""

    __slots__ = ("ends", "action", "payload", "sync", "forget", "name", "mapping", "created",
                 "bound")

    def __init__(self, ends: bytes, action: int = FORWARD, payload: bytes = b"",
                 sync: bool = False, forget: bytes = b"", name: bytes = b"",
                 mapping: tuple | None = None, created: bool = False,
                 bound: bytes = b"") -> None:
        self.ends = ends  # reply types that complete this request ('Z' for Sync/Query/FC)
        self.action = action
        self.payload = payload  # INJECT: the reply to synthesize
        self.sync = sync  # after an error the server skips requests up to one of these
        self.forget = forget  # a Parse: if it fails, the server does not have this name
        self.name = name  # the client's statement name this request makes (Parse) or drops
        self.mapping = mapping  # ... and what it maps to
        self.created = created
        self.bound = bound  # a Bind/Describe of this statement: its error may say it is stale


class ServerStatements:
    """What one server has prepared, and the queue of requests awaiting replies."""

    __slots__ = ("prepared", "queue", "remaining", "head", "action", "skipping", "error",
                 "error_for")

    def __init__(self, names: list[str] = ()) -> None:
        self.prepared: collections.OrderedDict[bytes, None] = collections.OrderedDict(
            (n.encode(), None) for n in names)
        self.queue: collections.deque[Expect] = collections.deque()
        self.remaining = 0  # bytes left of the reply message being forwarded or dropped
        self.head = b""
        self.action = FORWARD
        self.skipping = False  # an error came back: the server ignores all until a Sync
        self.error: bytearray | None = None  # the body of an error to a Bind, being read
        self.error_for = b""

    def names(self) -> list[str]:
        return [n.decode() for n in self.prepared]


class Versions:
    """One worker's view of which server-side name each statement text has now."""

    __slots__ = ("current", "stale")

    def __init__(self) -> None:
        self.current: dict[bytes, bytes] = {}  # base name -> versioned name (if renewed)
        self.stale: dict[bytes, None] = {}  # names never to prepare again (ordered: trimmed)

    def name_of(self, statement: bytes) -> bytes:
        base = internal_name(statement)
        return self.current.get(base, base)

    def renew(self, ename: bytes) -> None:
        """From now on new Parses of this statement's text get a name of their own."""
        base = ename[:_BASE_LEN]
        if self.current.get(base, base) == ename:
            self.current[base] = base + b"_" + os.urandom(4).hex().encode()
            _trim(self.current)

    def mark_stale(self, ename: bytes) -> None:
        self.renew(ename)
        self.stale[ename] = None
        _trim(self.stale)


def _trim(d: dict) -> None:
    while len(d) > VERSIONS_KEPT:
        del d[next(iter(d))]


def internal_name(statement: bytes) -> bytes:
    """The server-side name of a statement: its text and parameter types, hashed."""
    return _PREFIX + hashlib.blake2b(statement, digest_size=10).hexdigest().encode()


def is_stale_error(fields: dict[str, str]) -> bool:
    """The server's error to a Bind says the statement no longer matches the schema."""
    code, text = fields.get("C"), fields.get("M", "")
    return ((code == "0A000" and text == "cached plan must not change result type")
            or (code == "XX000" and text.startswith("cache lookup failed for ")))


# --------------------------------------------------------------------------- client -> server


def rewrite(client: Client, server: Server, data: bytes | memoryview) -> bytes:
    """Rewrite a chunk of the client's stream for ``server``; complete messages only (a
    partial one waits in ``client.ps_partial``). Queues what each request expects back."""
    buf = client.ps_partial + bytes(data) if client.ps_partial else bytes(data)
    out = bytearray()
    pos = 0
    n = len(buf)
    limit = client.worker.settings.max_packet_size
    st = server.statements
    while n - pos >= 5:
        mtype = buf[pos]
        (length,) = _LEN.unpack_from(buf, pos + 1)
        if length < 4 or length > limit:
            raise ProtocolError("invalid packet length %d (type %r)" % (length, chr(mtype)))
        end = pos + 1 + length
        if end > n:
            break
        if st.skipping:
            # After an error, up to the client's Sync: the server ignores these, so do we.
            out += buf[pos:end]
            if mtype == proto.F_SYNC:
                st.skipping = False
                st.queue.append(Expect(b"Z", sync=True))
        else:
            _one(client, server, st, mtype, buf, pos, end, out)
        pos = end
    client.ps_partial = buf[pos:]
    return bytes(out)


def _one(client: Client, server: Server, st: ServerStatements, mtype: int, buf: bytes,
         pos: int, end: int, out: bytearray) -> None:
    body = buf[pos + 5 : end]
    queue = st.queue
    stats = client.pool.stats
    if mtype == proto.F_PARSE:
        name, _, statement = body.partition(b"\x00")
        if not name:
            out += buf[pos:end]
            queue.append(Expect(b"1"))
            return
        if name in client.statements:
            raise StatementError("prepared statement name is already in use")
        ename = client.worker.statement_versions.name_of(statement)
        mapping = (ename, proto.message(b"P", ename + b"\x00" + statement))
        client.statements[name] = mapping
        stats.client_parse_count += 1
        if ename in st.prepared:
            st.prepared.move_to_end(ename)
            queue.append(Expect(b"1", INJECT, PARSE_COMPLETE, name=name, mapping=mapping,
                                created=True))
        else:
            _prepare(server, st, ename, mapping[1], out, FORWARD, name, mapping)
    elif mtype == proto.F_BIND:
        portal, _, rest = body.partition(b"\x00")
        name, _, rest = rest.partition(b"\x00")
        if not name:
            out += buf[pos:end]
            queue.append(Expect(b"2"))
            return
        stats.bind_count += 1
        ename = _ensure(client, server, st, name, out)
        if ename is None:
            _stale_plan(st, out)
            return
        out += proto.message(b"B", portal + b"\x00" + ename + b"\x00" + rest)
        queue.append(Expect(b"2", bound=ename))
    elif mtype == proto.F_DESCRIBE:
        if body[:1] != b"S" or len(body) <= 2:
            out += buf[pos:end]
            queue.append(Expect(b"Tn"))
            return
        ename = _ensure(client, server, st, body[1:-1], out)
        if ename is None:
            _stale_plan(st, out)
            return
        out += proto.message(b"D", b"S" + ename + b"\x00")
        queue.append(Expect(b"Tn", bound=ename))
    elif mtype == proto.F_CLOSE and body[:1] == b"S" and len(body) > 2:
        name = body[1:-1]
        mapping = client.statements.pop(name, None)
        if mapping is not None:  # its next Parse of the text is a fresh statement
            client.worker.statement_versions.renew(mapping[0])
        queue.append(Expect(b"3", INJECT, CLOSE_COMPLETE, name=name, mapping=mapping))
    else:
        out += buf[pos:end]
        if mtype == proto.F_EXECUTE:
            queue.append(Expect(b"CIsE"))
        elif mtype == proto.F_SYNC:
            queue.append(Expect(b"Z", sync=True))
        elif mtype in (proto.F_QUERY, proto.F_FUNCTION_CALL):
            queue.append(Expect(b"Z"))
        elif mtype == proto.F_CLOSE:  # of a portal
            queue.append(Expect(b"3"))
        # Flush, CopyData/Done/Fail, Terminate: no reply of their own.


def _ensure(client: Client, server: Server, st: ServerStatements, name: bytes,
            out: bytearray) -> bytes | None:
    """The internal name of the client's statement, prepared on this server first if need
    be; None if it is stale and this server lacks it."""
    known = client.statements.get(name)
    if known is None:
        raise StatementError("prepared statement did not exist")
    ename, parse = known
    if ename in st.prepared:
        st.prepared.move_to_end(ename)
    elif ename in client.worker.statement_versions.stale:
        return None
    else:
        _prepare(server, st, ename, parse, out, DROP)
    return ename


def _stale_plan(st: ServerStatements, out: bytearray) -> None:
    out += STALE_PLAN
    st.queue.extend((Expect(b"1", DROP), Expect(b"2", DROP), Expect(b"CIsE", STALE)))


def _prepare(server: Server, st: ServerStatements, ename: bytes, parse: bytes,
             out: bytearray, action: int, name: bytes = b"",
             mapping: tuple | None = None) -> None:
    limit = server.worker.settings.max_prepared_statements
    while len(st.prepared) >= limit:
        old, _ = st.prepared.popitem(last=False)
        out += _close(old)
        st.queue.append(Expect(b"3", DROP))
    # Whatever the server may still have under this name (pgherd forgets a statement sooner
    # than a server does), the Parse makes it anew.
    out += _close(ename)
    st.queue.append(Expect(b"3", DROP))
    out += parse
    if not st.prepared:
        server.bs.watch_discard(True)
    st.prepared[ename] = None
    st.queue.append(Expect(b"1", action, forget=ename, name=name, mapping=mapping,
                           created=True))
    server.pool.stats.server_parse_count += 1


def _close(ename: bytes) -> bytes:
    return proto.message(b"C", b"S" + ename + b"\x00")


# --------------------------------------------------------------------------- server -> client


def filter_replies(st: ServerStatements, client: Client, buf: bytearray | memoryview,
                   n: int) -> bytes:
    """The server's reply chunk as the client must see it: our own Parses' and Closes'
    completions dropped, the completions of skipped Parses and Closes put in their place."""
    out = bytearray()
    pos = 0
    while pos < n:
        if st.remaining:
            take = min(st.remaining, n - pos)
            if st.action != DROP:
                out += buf[pos : pos + take]
            if st.error is not None:
                st.error += buf[pos : pos + take]
            pos += take
            st.remaining -= take
            if not st.remaining and st.error is not None:
                _read_error(st, client)
            continue
        if st.head or n - pos < 5:
            take = min(5 - len(st.head), n - pos)
            st.head += bytes(buf[pos : pos + take])
            pos += take
            if len(st.head) < 5:
                break
            header, st.head = st.head, b""
        else:
            header = bytes(buf[pos : pos + 5])
            pos += 5
        st.action = _reply(st, client, header[0], out)
        if st.action != DROP:
            out += header
        st.remaining = _LEN.unpack_from(header, 1)[0] - 4
        if not st.remaining and st.error is not None:
            _read_error(st, client)
    _inject(st, out)
    return bytes(out)


def _reply(st: ServerStatements, client: Client, mtype: int, out: bytearray) -> int:
    """What to do with a reply of ``mtype``; advances the queue (injections come first)."""
    if mtype in _ASYNC:
        return FORWARD
    _inject(st, out)
    queue = st.queue
    if not queue:
        return FORWARD
    head = queue[0]
    if mtype == _ERROR and head.ends != b"Z":  # in the extended protocol
        if head.bound:
            st.error, st.error_for = bytearray(), head.bound
        _undo(queue.popleft(), st, client)
        # The server skips everything up to the next Sync: none of it gets a reply.
        while queue and not queue[0].sync:
            _undo(queue.popleft(), st, client)
        if not queue:
            st.skipping = True  # the client's Sync is yet to come
        if head.action == STALE:
            out += STALE_ERROR
            return DROP
        return FORWARD  # even for a Parse of ours: the client must learn why it failed
    if mtype == _READY:
        # Whatever is still queued before the request this ends was skipped after an error.
        while queue and queue[0].ends != b"Z":
            _undo(queue.popleft(), st, client)
        if queue:
            queue.popleft()
        return FORWARD
    if mtype in head.ends:
        queue.popleft()
    return head.action if head.action != INJECT else FORWARD


def _undo(entry: Expect, st: ServerStatements, client: Client) -> None:
    """The server failed or skipped this request: what it would have made does not exist."""
    if entry.forget:
        st.prepared.pop(entry.forget, None)
    if entry.name:
        if entry.created:
            if client.statements.get(entry.name) is entry.mapping:
                del client.statements[entry.name]
        elif entry.mapping is not None:  # a Close the server skipped: the name lives on
            client.statements.setdefault(entry.name, entry.mapping)


def _read_error(st: ServerStatements, client: Client) -> None:
    """An error to a Bind or Describe, read whole: does it say the statement is stale?"""
    fields = proto.parse_fields(bytes(st.error))
    ename = st.error_for
    st.error, st.error_for = None, b""
    if is_stale_error(fields):
        st.prepared.pop(ename, None)
        client.worker.statement_stale(ename)


def _inject(st: ServerStatements, out: bytearray) -> None:
    """Synthesized replies whose turn has come (nothing before them awaits the server)."""
    queue = st.queue
    while queue and queue[0].action == INJECT:
        out += queue.popleft().payload


def pending_injections(st: ServerStatements) -> bytes:
    """Replies owed to the client right now, with nothing of the server's before them."""
    out = bytearray()
    _inject(st, out)
    return bytes(out)


def forget_all(server: Server) -> None:
    """DISCARD ALL / DEALLOCATE ALL ran on this server: it has nothing prepared any more."""
    server.statements.prepared.clear()
    server.bs.watch_discard(False)
