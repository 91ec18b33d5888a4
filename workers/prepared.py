"""Named prepared statements in transaction and statement mode (PgBouncer's
``max_prepared_statements``).

A client's protocol-level named statements must survive its server being switched between
transactions. So, for a client that uses them, pgherd rewrites its stream:

* Parse "s1" becomes Parse of an internal name derived from the statement's text and
  parameter types (``PGHERD_<hash>`` — a hash, not a counter, so servers handed between
  workers keep meaning the same thing); if the server already has it, nothing is sent and a
  ParseComplete is injected in its place in the reply stream.
* Bind/Describe of "s1" name the internal statement; if this server lacks it, its Parse goes
  first and that Parse's ParseComplete is dropped from the reply.
* Close of "s1" forgets the client's name and is answered here (CloseComplete injected).
* Each server keeps at most ``max_prepared_statements``, least recently used closed first.

Replies are matched to requests with a queue per server (:class:`Expect` entries): which reply
ends each request, and whether it is forwarded, dropped or synthesized. An ErrorResponse ends
the current request and, in the extended protocol, every request up to the next Sync.

Clients that never name a statement never come here: the relay's fast path only notices
that one did (``FrontendScanner.named``).
"""

from __future__ import annotations

import collections
import hashlib
import struct
from typing import TYPE_CHECKING

from . import proto
from .proto import ProtocolError

if TYPE_CHECKING:
    from .relay import Client, Server

_LEN = struct.Struct("!I")
PARSE_COMPLETE = proto.message(b"1")
CLOSE_COMPLETE = proto.message(b"3")

FORWARD, DROP, INJECT = 0, 1, 2
_ASYNC = frozenset(b"NSA")  # NoticeResponse, ParameterStatus, Notification: any time


class StatementError(Exception):
    """PgBouncer closes the client for these (FATAL 08P01)."""


class Expect:
    """One request in flight: the reply types that end it and what to do with its replies."""

    __slots__ = ("ends", "action", "payload", "sync", "forget")

    def __init__(self, ends: bytes, action: int = FORWARD, payload: bytes = b"",
                 sync: bool = False, forget: bytes = b"") -> None:
        self.ends = ends  # reply types that complete this request ('Z' for Sync/Query/FC)
        self.action = action
        self.payload = payload  # INJECT: the reply to synthesize
        self.sync = sync  # an ErrorResponse skips requests up to one of these
        self.forget = forget  # a Parse: if it fails, the server does not have this name


class ServerStatements:
    """What one server has prepared, and the queue of requests awaiting replies."""

    __slots__ = ("prepared", "queue", "remaining", "head", "action")

    def __init__(self, names: list[str] = ()) -> None:
        self.prepared: collections.OrderedDict[bytes, None] = collections.OrderedDict(
            (n.encode(), None) for n in names)
        self.queue: collections.deque[Expect] = collections.deque()
        self.remaining = 0  # bytes left of the reply message being forwarded or dropped
        self.head = b""
        self.action = FORWARD

    def names(self) -> list[str]:
        return [n.decode() for n in self.prepared]


def internal_name(statement: bytes) -> bytes:
    """The server-side name of a statement: its text and parameter types, hashed."""
    return b"PGHERD_" + hashlib.blake2b(statement, digest_size=10).hexdigest().encode()


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
        ename = internal_name(statement)
        parse = proto.message(b"P", ename + b"\x00" + statement)
        client.statements[name] = (ename, parse)
        stats.client_parse_count += 1
        if ename in st.prepared:
            st.prepared.move_to_end(ename)
            queue.append(Expect(b"1", INJECT, PARSE_COMPLETE))
        else:
            _prepare(server, st, ename, parse, out, FORWARD)
    elif mtype == proto.F_BIND:
        portal, _, rest = body.partition(b"\x00")
        name, _, rest = rest.partition(b"\x00")
        if name:
            ename = _ensure(client, server, st, name, out)
            out += proto.message(b"B", portal + b"\x00" + ename + b"\x00" + rest)
            stats.bind_count += 1
        else:
            out += buf[pos:end]
        queue.append(Expect(b"2"))
    elif mtype == proto.F_DESCRIBE:
        if body[:1] == b"S" and len(body) > 2:
            ename = _ensure(client, server, st, body[1:-1], out)
            out += proto.message(b"D", b"S" + ename + b"\x00")
        else:
            out += buf[pos:end]
        queue.append(Expect(b"Tn"))
    elif mtype == proto.F_CLOSE:
        if body[:1] == b"S" and len(body) > 2:
            # The server keeps it for whoever prepares the same statement next.
            client.statements.pop(body[1:-1], None)
            queue.append(Expect(b"3", INJECT, CLOSE_COMPLETE))
        else:
            out += buf[pos:end]
            queue.append(Expect(b"3"))
    else:
        out += buf[pos:end]
        if mtype == proto.F_EXECUTE:
            queue.append(Expect(b"CIsE"))
        elif mtype == proto.F_SYNC:
            queue.append(Expect(b"Z", sync=True))
        elif mtype in (proto.F_QUERY, proto.F_FUNCTION_CALL):
            queue.append(Expect(b"Z"))
        # Flush, CopyData/Done/Fail, Terminate: no reply of their own.


def _ensure(client: Client, server: Server, st: ServerStatements, name: bytes,
            out: bytearray) -> bytes:
    """The internal name of the client's statement, prepared on this server first if need be."""
    known = client.statements.get(name)
    if known is None:
        raise StatementError("prepared statement did not exist")
    ename, parse = known
    if ename in st.prepared:
        st.prepared.move_to_end(ename)
    else:
        _prepare(server, st, ename, parse, out, DROP)
    return ename


def _prepare(server: Server, st: ServerStatements, ename: bytes, parse: bytes,
             out: bytearray, action: int) -> None:
    limit = server.worker.settings.max_prepared_statements
    while len(st.prepared) >= limit:
        old, _ = st.prepared.popitem(last=False)
        out += proto.message(b"C", b"S" + old + b"\x00")
        st.queue.append(Expect(b"3", DROP))
    out += parse
    if not st.prepared:
        server.bs.watch_discard(True)
    st.prepared[ename] = None
    st.queue.append(Expect(b"1", action, forget=ename))
    server.pool.stats.server_parse_count += 1


# --------------------------------------------------------------------------- server -> client


def filter_replies(st: ServerStatements, buf: bytearray | memoryview, n: int) -> bytes:
    """The server's reply chunk as the client must see it: our own Parses' and Closes'
    completions dropped, the completions of skipped Parses and Closes put in their place."""
    out = bytearray()
    pos = 0
    while pos < n:
        if st.remaining:
            take = min(st.remaining, n - pos)
            if st.action != DROP:
                out += buf[pos : pos + take]
            pos += take
            st.remaining -= take
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
        mtype = header[0]
        st.action = _reply(st, mtype, out)
        if st.action != DROP:
            out += header
        st.remaining = _LEN.unpack_from(header, 1)[0] - 4
    _inject(st, out)
    return bytes(out)


def _reply(st: ServerStatements, mtype: int, out: bytearray) -> int:
    """What to do with a reply of ``mtype``; advances the queue (injections come first)."""
    if mtype in _ASYNC:
        return FORWARD
    _inject(st, out)
    queue = st.queue
    if not queue:
        return FORWARD
    head = queue[0]
    if mtype == 69 and head.ends != b"Z":  # ErrorResponse in the extended protocol
        queue.popleft()
        if head.forget:
            st.prepared.pop(head.forget, None)
        # The server skips everything up to the next Sync: none of it gets a reply.
        while queue and not queue[0].sync:
            skipped = queue.popleft()
            if skipped.forget:
                st.prepared.pop(skipped.forget, None)
        return FORWARD  # even for a Parse of ours: the client must learn why it failed
    if mtype in head.ends:
        queue.popleft()
    return head.action if head.action != INJECT else FORWARD


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
