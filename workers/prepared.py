"""Named prepared statements in transaction and statement mode (PgBouncer's
``max_prepared_statements``).

A client's protocol-level named statements must survive its server being switched between
transactions. So, for a client that uses them, pgherd rewrites its stream:

* Parse "s1" becomes Close + Parse + Describe of an internal name derived from the statement's
  text and parameter types (``PGHERD_<hash>`` — a hash, not a counter, so servers handed
  between workers keep meaning the same thing). A client's Parse always makes a fresh server
  statement, as it does directly: never one prepared before a schema change. The Close's and
  the Describe's replies are dropped; the Describe tells pgherd the statement's parameter and
  result types (its *description*, kept with the :class:`Preparation`).
* Bind/Describe of "s1" name the internal statement. Clients preparing the same text share
  it, as long as it is the client's own preparation or one with the same description: if
  another client prepared the text again since, and the schema changed in between (the
  descriptions differ), the client meets the error it would meet on its own backend, "cached
  plan must not change result type" (the server fails in place of its Bind, so a transaction
  fails as it would; the wording is PostgreSQL's, which asyncpg recognises). If this server
  lacks the statement, or has an older preparation that differs, it is prepared there first
  (and the replies dropped).
* When the server itself finds a statement stale at Bind or Describe ("cached plan must not
  change result type", "cache lookup failed for ..."), the error reaches the client, and that
  preparation is marked stale: every client bound to another preparation of the text meets
  the same error there, until it prepares the text again — as each would on its own backend.
* Close of "s1" forgets the client's name and is answered here (CloseComplete injected).
* Each server keeps at most ``max_prepared_statements``, least recently used closed first.

Since a Parse is always preceded by a Close of the same name, pgherd never needs to know for
sure what a server has: forgetting a statement the server still has costs a Parse.

Left as PgBouncer leaves it: a statement prepared again on a server that lacked it, after a
schema change, has the new result type without an error (its description is known only once
the server answers, after the Bind has gone).

What a client sees in ``pg_prepared_statements`` in these modes: the statements of whichever
server runs its transaction, under pgherd's ``PGHERD_`` names, its own and those other clients
prepared there. In session mode nothing is rewritten: a client sees its own names.

Replies are matched to requests with a queue per server (:class:`Expect` entries): which reply
ends each request, and whether it is forwarded, dropped, synthesized or read. An ErrorResponse
ends the current request, and in the extended protocol the server skips every request up to
the next Sync: those get no reply, and a Parse among them leaves neither a server statement
nor a client name. Requests the client sends after such an error and before its Sync pass as
they are (the server skips them too).

Clients that never name a statement never come here: the relay's fast path only notices
that one did (``FrontendScanner.named``).
"""

from __future__ import annotations

import collections
import hashlib
import struct
import time
from typing import TYPE_CHECKING

from . import proto
from .proto import ProtocolError

if TYPE_CHECKING:
    from .relay import Client, Server

_LEN = struct.Struct("!I")
PARSE_COMPLETE = proto.message(b"1")
CLOSE_COMPLETE = proto.message(b"3")
#: What to do with a request's replies. READ: drop them, keeping the bytes of those that make
#: a description. STALE: its error is replaced by STALE_ERROR.
FORWARD, DROP, INJECT, READ, STALE = 0, 1, 2, 3, 4
_ASYNC = frozenset(b"NSA")  # NoticeResponse, ParameterStatus, Notification: any time
_ERROR, _READY = ord("E"), ord("Z")
_DESCRIPTION = frozenset(b"tTn")  # ParameterDescription, RowDescription, NoData
#: The description of a preparation the server found stale: equal to none.
STALE_DESCRIPTION = b"!"
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


class StatementError(Exception):
    """PgBouncer closes the client for these (FATAL 08P01)."""


class Preparation:
    """One Parse of a statement on a server: a client's named statement refers to the one its
    own Parse made; a server's entry to the one it has now (often the same object)."""

    __slots__ = ("ename", "parse", "time", "description")

    def __init__(self, ename: bytes, parse: bytes, prepared_at: int = 0,
                 description: bytes = b"") -> None:
        self.ename = ename  # the server-side name
        self.parse = parse  # the Parse message that makes it
        self.time = prepared_at or time.monotonic_ns()  # one clock for all workers
        self.description = description  # 't' and 'T'/'n' replies to Describe; b"": not yet


class Expect:
    """One request in flight: the reply types that end it, what to do with its replies, and
    what to undo if the server fails or skips it."""

    __slots__ = ("ends", "action", "payload", "sync", "forget", "name", "prep", "created",
                 "bound")

    def __init__(self, ends: bytes, action: int = FORWARD, payload: bytes = b"",
                 sync: bool = False, forget: bytes = b"", name: bytes = b"",
                 prep: Preparation | None = None, created: bool = False,
                 bound: Preparation | None = None) -> None:
        self.ends = ends  # reply types that complete this request ('Z' for Sync/Query/FC)
        self.action = action
        self.payload = payload  # INJECT: the reply to synthesize
        self.sync = sync  # after an error the server skips requests up to one of these
        self.forget = forget  # a Parse: if it fails, the server does not have this name
        self.name = name  # the client's statement name this request makes (Parse) or drops
        self.prep = prep  # ... and what it refers to; READ: whose description this is
        self.created = created
        self.bound = bound  # a Bind/Describe of this preparation: its error may say stale


class ServerStatements:
    """What one server has prepared, and the queue of requests awaiting replies."""

    __slots__ = ("prepared", "queue", "remaining", "head", "action", "skipping", "reading",
                 "read_for", "read_error")

    def __init__(self, preps: list[Preparation] = ()) -> None:
        self.prepared: collections.OrderedDict[bytes, Preparation] = collections.OrderedDict(
            (p.ename, p) for p in preps)
        self.queue: collections.deque[Expect] = collections.deque()
        self.remaining = 0  # bytes left of the reply message being forwarded or dropped
        self.head = b""
        self.action = FORWARD
        self.skipping = False  # an error came back: the server ignores all until a Sync
        self.reading: bytearray | None = None  # a description, or an error, being read
        self.read_for: Preparation | None = None
        self.read_error = False

    def describe(self) -> list[tuple[str, int, bytes]]:
        """For a server handed to another worker."""
        return [(p.ename.decode(), p.time, p.description) for p in self.prepared.values()]

    @classmethod
    def from_description(cls, preps: list[tuple[str, int, bytes]]) -> ServerStatements:
        return cls([Preparation(name.encode(), b"", at, description)
                    for name, at, description in preps])


def internal_name(statement: bytes) -> bytes:
    """The server-side name of a statement: its text and parameter types, hashed."""
    return b"PGHERD_" + hashlib.blake2b(statement, digest_size=10).hexdigest().encode()


def is_stale_error(fields: dict[str, str]) -> bool:
    """The server's error to a Bind or Describe says the statement no longer matches."""
    code, text = fields.get("C"), fields.get("M", "")
    return ((code == "0A000" and text == "cached plan must not change result type")
            or (code == "XX000" and text.startswith("cache lookup failed for ")))


# --------------------------------------------------------------------------- client -> server


#: The messages rewritten for the server (statement names): they are needed whole. Any other
#: passes as it comes, so a huge Query or CopyData streams instead of being buffered.
REWRITTEN = frozenset((proto.F_PARSE, proto.F_BIND, proto.F_DESCRIBE, proto.F_CLOSE))


def rewrite(client: Client, server: Server, data: bytes | memoryview) -> bytes:
    """Rewrite a chunk of the client's stream for ``server``. A message to rewrite waits in
    ``client.ps_partial`` until it is whole (``client.ps_need`` bytes); the rest of one that
    passes untouched is forwarded as it arrives (``client.ps_through`` bytes still to come).
    Queues what each request expects back."""
    out = bytearray()
    through = client.ps_through
    if through:
        take = min(through, len(data))
        out += data[:take]
        client.ps_through = through - take
        data = data[take:]
    partial = client.ps_partial
    if partial:
        partial += data
        if len(partial) < client.ps_need:
            return bytes(out)  # not whole yet: nothing to look at again
        buf: bytes | bytearray | memoryview = partial
        client.ps_partial = bytearray()
    else:
        buf = data
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
            if st.skipping or mtype not in REWRITTEN:
                if not st.skipping:
                    _expect(st.queue, mtype)
                out += buf[pos:n]
                client.ps_through = end - n
                return bytes(out)
            client.ps_need = end - pos
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
    else:
        client.ps_need = 5
    if pos < n:
        client.ps_partial = bytearray(buf[pos:])
    return bytes(out)


def _one(client: Client, server: Server, st: ServerStatements, mtype: int, buf: bytes,
         pos: int, end: int, out: bytearray) -> None:
    body = bytes(buf[pos + 5 : end]) if mtype in REWRITTEN else b""
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
        prep = Preparation(ename, proto.message(b"P", ename + b"\x00" + statement))
        client.statements[name] = prep
        stats.client_parse_count += 1
        _prepare(server, st, prep, out, FORWARD, name)
    elif mtype == proto.F_BIND:
        portal, _, rest = body.partition(b"\x00")
        name, _, rest = rest.partition(b"\x00")
        if not name:
            out += buf[pos:end]
            queue.append(Expect(b"2"))
            return
        stats.bind_count += 1
        prep = _ensure(client, server, st, name, out)
        if prep is None:
            _stale_plan(st, out)
            return
        out += proto.message(b"B", portal + b"\x00" + prep.ename + b"\x00" + rest)
        queue.append(Expect(b"2", bound=prep))
    elif mtype == proto.F_DESCRIBE:
        if body[:1] != b"S" or len(body) <= 2:
            out += buf[pos:end]
            queue.append(Expect(b"Tn"))
            return
        prep = _ensure(client, server, st, body[1:-1], out)
        if prep is None:
            _stale_plan(st, out)
            return
        out += proto.message(b"D", b"S" + prep.ename + b"\x00")
        queue.append(Expect(b"Tn", bound=prep))
    elif mtype == proto.F_CLOSE and body[:1] == b"S" and len(body) > 2:
        name = body[1:-1]
        prep = client.statements.pop(name, None)
        queue.append(Expect(b"3", INJECT, CLOSE_COMPLETE, name=name, prep=prep))
    else:
        out += buf[pos:end]
        _expect(queue, mtype)


def _expect(queue: collections.deque, mtype: int) -> None:
    """What the server answers a message that passes unrewritten."""
    if mtype == proto.F_EXECUTE:
        queue.append(Expect(b"CIsE"))
    elif mtype == proto.F_SYNC:
        queue.append(Expect(b"Z", sync=True))
    elif mtype in (proto.F_QUERY, proto.F_FUNCTION_CALL):
        queue.append(Expect(b"Z"))
    elif mtype == proto.F_CLOSE:  # of a portal
        queue.append(Expect(b"3"))
    # Flush, CopyData/Done/Fail, Terminate: no reply of their own.


_REPLIES = {proto.F_PARSE: b"1", proto.F_BIND: b"2", proto.F_DESCRIBE: b"Tn",
            proto.F_EXECUTE: b"CIsE", proto.F_CLOSE: b"3"}


def in_flight(st: ServerStatements, syncs: int, unsynced: list[int]) -> None:
    """A client starts naming statements with requests of its still unanswered: ``syncs``
    requests ended by a Sync (or Query), then the extended-protocol messages ``unsynced`` of
    a pipeline. Their replies pass through as they are."""
    st.queue.extend(Expect(b"Z", sync=True) for _ in range(syncs))
    st.queue.extend(Expect(_REPLIES[mtype]) for mtype in unsynced)


def _ensure(client: Client, server: Server, st: ServerStatements, name: bytes,
            out: bytearray) -> Preparation | None:
    """The server's preparation to use for the client's statement, prepared on this server
    first if need be; None if the client's statement no longer matches the schema."""
    mine = client.statements.get(name)
    if mine is None:
        raise StatementError("prepared statement did not exist")
    here = st.prepared.get(mine.ename)
    if here is not None and (here is mine or here.time == mine.time):
        st.prepared.move_to_end(mine.ename)
        return here  # its own: if it is stale, the server says so itself
    if mine.description == STALE_DESCRIPTION:
        return None  # found stale elsewhere: it stays so until the client prepares anew
    if here is not None:
        if here.description != STALE_DESCRIPTION and (
                here.description == mine.description
                or not (here.description and mine.description)):
            st.prepared.move_to_end(mine.ename)
            return here  # the same statement, or as far as is known
        if here.time > mine.time:
            return None  # prepared again since, and the schema changed in between
    # Absent, or older than the client's and different (or stale): a fresh one.
    prep = Preparation(mine.ename, mine.parse)
    _prepare(server, st, prep, out, DROP)
    return prep


def _stale_plan(st: ServerStatements, out: bytearray) -> None:
    out += STALE_PLAN
    st.queue.extend((Expect(b"1", DROP), Expect(b"2", DROP), Expect(b"CIsE", STALE)))


def _prepare(server: Server, st: ServerStatements, prep: Preparation, out: bytearray,
             action: int, name: bytes = b"") -> None:
    """Close, Parse and Describe ``prep`` on this server: a fresh statement, whatever it had
    under that name (pgherd forgets a statement sooner than a server does)."""
    ename = prep.ename
    st.prepared.pop(ename, None)
    limit = server.worker.settings.max_prepared_statements
    while len(st.prepared) >= limit:
        old, _ = st.prepared.popitem(last=False)
        out += _close(old)
        st.queue.append(Expect(b"3", DROP))
    out += _close(ename) + prep.parse + proto.message(b"D", b"S" + ename + b"\x00")
    if not st.prepared:
        server.bs.watch_discard(True)
    st.prepared[ename] = prep
    st.queue.extend((Expect(b"3", DROP),
                     Expect(b"1", action, forget=ename, name=name, prep=prep, created=True),
                     Expect(b"Tn", READ, prep=prep)))
    server.pool.stats.server_parse_count += 1


def _close(ename: bytes) -> bytes:
    return proto.message(b"C", b"S" + ename + b"\x00")


# --------------------------------------------------------------------------- server -> client


def filter_replies(st: ServerStatements, client: Client, buf: bytearray | memoryview,
                   n: int) -> bytes:
    """The server's reply chunk as the client must see it: the replies to pgherd's own
    requests dropped (descriptions read on the way), those of requests answered here put
    in their place."""
    out = bytearray()
    pos = 0
    while pos < n:
        if st.remaining:
            take = min(st.remaining, n - pos)
            if st.action != DROP and st.action != READ:
                out += buf[pos : pos + take]
            if st.reading is not None:
                st.reading += buf[pos : pos + take]
            pos += take
            st.remaining -= take
            if not st.remaining:
                _read_done(st, client)
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
        st.action = _reply(st, client, header, out)
        if st.action != DROP and st.action != READ:
            out += header
        st.remaining = _LEN.unpack_from(header, 1)[0] - 4
        if not st.remaining:
            _read_done(st, client)
    _inject(st, out)
    return bytes(out)


def _reply(st: ServerStatements, client: Client, header: bytes, out: bytearray) -> int:
    """What to do with a reply of this header's type; advances the queue (injections come
    first). Starts reading a description, or an error that may say a statement is stale."""
    mtype = header[0]
    if mtype in _ASYNC:
        return FORWARD
    _inject(st, out)
    queue = st.queue
    if not queue:
        return FORWARD
    head = queue[0]
    if mtype == _ERROR and head.ends != b"Z":  # in the extended protocol
        if head.bound is not None:
            st.reading, st.read_for, st.read_error = bytearray(), head.bound, True
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
    if head.action == READ and mtype in _DESCRIPTION:
        if mtype == ord("t"):
            head.prep.description = b""  # a description starts afresh
        st.reading, st.read_for, st.read_error = bytearray(header), head.prep, False
    if mtype in head.ends:
        queue.popleft()
    return head.action if head.action != INJECT else FORWARD


def _read_done(st: ServerStatements, client: Client) -> None:
    """A message being read is complete: a part of a description, or an error."""
    data, prep = st.reading, st.read_for
    if data is None:
        return
    st.reading = st.read_for = None
    if not st.read_error:
        prep.description += _row_types(data) if data[:1] == b"T" else bytes(data)
    elif is_stale_error(proto.parse_fields(bytes(data))):
        prep.description = STALE_DESCRIPTION


def _row_types(row_description: bytearray) -> bytes:
    """What of a RowDescription PostgreSQL compares when it checks a statement's result
    (column names, types, type modifiers) -- not the table's OID, which a table dropped and
    made again with the same columns changes."""
    out = bytearray(row_description[:7])  # type, length, column count
    pos = 7
    for _ in range(struct.unpack_from("!H", row_description, 5)[0]):
        end = row_description.index(0, pos) + 1
        out += row_description[pos:end]  # name
        out += row_description[end + 6 : end + 10]  # type OID (after table OID, attnum)
        out += row_description[end + 12 : end + 16]  # type modifier (after the length)
        pos = end + 18
    return bytes(out)


def _undo(entry: Expect, st: ServerStatements, client: Client) -> None:
    """The server failed or skipped this request: what it would have made does not exist."""
    if entry.forget:
        st.prepared.pop(entry.forget, None)
    if entry.name:
        if entry.created:
            if client.statements.get(entry.name) is entry.prep:
                del client.statements[entry.name]
        elif entry.prep is not None:  # a Close the server skipped: the name lives on
            client.statements.setdefault(entry.name, entry.prep)


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
