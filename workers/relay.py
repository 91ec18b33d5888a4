"""Client and server connections after login: the relay, pgherd's hot path.

Design (see DESIGN.md "Hot path"): no greenlet per connection and no object per message. Each
connection has a read watcher on the worker's event loop whose callback reads into ONE shared
buffer, lets a scanner (``proto``) observe the message headers, and forwards the chunk with one
``send``. If the peer cannot take it all, the rest is kept on the connection and the source
stops being read until the peer drains (PgBouncer's sbuf back-pressure). Callbacks run in the
hub and never block; anything that has to wait (logins) runs in a greenlet elsewhere.

Where a transaction ends: :meth:`Server.on_read` — a ReadyForQuery with status 'I', no reply
outstanding (``Server.expect``), no extended-protocol message waiting for its Sync and no COPY
in progress releases the server to its pool (transaction and statement mode).

Where a connection dies: :meth:`Client.fail` / :meth:`Server.fail` turn any error on a
connection — bad input or a bug — into :meth:`Client.disconnect` / :meth:`Server.close`, which
never raise: they stop the watchers before the descriptor is closed, give back the client's
place and the server (clean to its pool, drained, or closed), and touch nothing else. Every
entry point from the event loop (read and write callbacks, :meth:`Client.resume`) ends there.

A client that leaves mid-request (:meth:`Server.client_left`): a server sent half a message is
closed without a Terminate that would complete it (shutdown of our side gives the backend EOF
at once); one with a request under way is cancelled and drained — its replies read and dropped
up to the ReadyForQuery a Sync of ours asks for — then rolled back if a transaction is open,
and reused; only a drain that overruns ``cancel_wait_timeout`` closes it.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Callable

from prefork import log as plog

from . import prepared, proto, startup
from .proto import BackendScanner, FrontendScanner, MessageReader, ProtocolError

if TYPE_CHECKING:
    from .pool import Pool
    from .worker import Worker

log = logging.getLogger("pgherd")

#: A server drained for a client that left, and silent this long, waits for something no one
#: will send: hostile input can throw the count of replies owed off (a Query after a failed
#: extended-protocol message is skipped by the server, unanswered). It is closed, not kept.
DRAIN_SILENCE = 1.0

BUF_SIZE = 256 * 1024
# One buffer for the whole worker: callbacks run one at a time, and a chunk is forwarded (or
# copied into the connection's backlog) before the callback returns.
_BUF = bytearray(BUF_SIZE)
_MV = memoryview(_BUF)

_monotonic = time.monotonic
_INT32 = proto.INT32

SESSION, TRANSACTION, STATEMENT = "session", "transaction", "statement"
STATUS_IDLE = 73  # ReadyForQuery 'I'
PARK_LIMIT = 64 * 1024  # a waiting client's requests kept before it is no longer read
SYNC = proto.message(b"S")
COPY_FAIL = proto.message(b"f", b"client disconnected\x00")


class Conn:
    """What clients and servers share: a non-blocking socket, watchers, an output backlog."""

    __slots__ = ("worker", "sock", "fd", "rw", "ww", "out", "closed", "addr", "port",
                 "connect_time", "id", "__weakref__")

    def __init__(self, worker: Worker, sock: socket.socket, cid: int = 0,
                 addr: tuple[str, int] | None = None, rw=None) -> None:
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        # A login hands over its read watcher; the write watcher is made when a send first
        # falls short (most connections never need it). Each new watcher costs a syscall.
        self.rw = rw or worker.loop.io(self.fd, 1)
        self.ww = None
        self.out: bytearray | None = None
        self.closed = False
        self.connect_time = time.time()
        self.id = cid or worker.next_id()
        self.addr, self.port = addr or _peer(sock)

    def local(self) -> tuple[str, int]:
        """Our end of the connection (asked only by SHOW CLIENTS/SERVERS)."""
        return _peer(self.sock, local=True) if not self.closed else ("", 0)

    def write(self, data: bytes | memoryview) -> bool:
        """Send or queue ``data``; True when it all left. Queuing stops the peer's reading."""
        if self.out is not None:
            self.out += data
            return False
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.on_io_error(exc)
            return False
        if sent == len(data):
            return True
        self.out = bytearray(data[sent:])
        if self.ww is None:
            self.ww = self.worker.loop.io(self.fd, 2)
        self.ww.start(self._on_writable)
        self.pause_peer()
        return False

    def _on_writable(self) -> None:
        try:
            out = self.out
            if out:
                sent = self.sock.send(out)
                del out[:sent]
                if out:
                    return
            self.out = None
            self.ww.stop()
            self.drained()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.on_io_error(exc)
        except Exception as exc:  # a bug must cost one connection, never the worker
            self.fail(exc)

    def stop_io(self) -> None:
        """Stop and free the watchers: always before the descriptor is closed (libev aborts
        the whole worker on a watched descriptor that was closed under it)."""
        for watcher in (self.rw, self.ww):
            if watcher is not None:
                watcher.stop()
                watcher.close()

    def release_socket(self) -> None:
        """Watchers off, then our descriptor closed; never raises."""
        self.stop_io()
        try:
            self.sock.close()
        except OSError:
            pass

    # Subclass hooks.
    def pause_peer(self) -> None:
        raise NotImplementedError

    def drained(self) -> None:
        raise NotImplementedError

    def on_io_error(self, exc: OSError | None) -> None:
        raise NotImplementedError

    def fail(self, exc: Exception) -> None:
        raise NotImplementedError


def _peer(sock: socket.socket, local: bool = False) -> tuple[str, int]:
    try:
        name = sock.getsockname() if local else sock.getpeername()
    except OSError:
        return "", 0
    if isinstance(name, tuple):
        return name[0], name[1]
    return "unix", 0


# ------------------------------------------------------------------------------------ client


class Client(Conn):
    """A logged-in client connection (login itself is ``workers/login.py``)."""

    __slots__ = ("pool", "server", "fs", "params", "params_key", "cancel_key", "user", "dbname",
                 "state", "pending", "pending_syncs", "request_time", "wait_started",
                 "idle_since", "login_time", "mode", "ps_mode", "statements", "ps_partial",
                 "ps_need", "ps_through", "held",
                 "startup", "extra", "greeting")

    def __init__(self, worker: Worker, sock: socket.socket, pool: Pool,
                 params: dict[str, str], user: str, dbname: str, cid: int,
                 addr: tuple[str, int], rw=None) -> None:
        super().__init__(worker, sock, cid, addr, rw)
        self.pool = pool
        self.server: Server | None = None
        self.mode = pool.mode
        # Named statements are rewritten only where servers change hands between requests.
        self.fs = FrontendScanner(worker.settings.max_packet_size,
                                  watch_named=bool(worker.settings.max_prepared_statements
                                                   and self.mode != SESSION))
        self.ps_mode = False
        self.statements: dict[bytes, prepared.Preparation] = {}  # its named statements
        self.ps_partial = bytearray()  # a message to rewrite, not whole yet (prepared.rewrite)
        self.ps_need = 5  # the bytes ps_partial must hold before it is looked at again
        self.ps_through = 0  # the rest of a message forwarded as it comes
        self.held = b""  # a header cut by a chunk, held back (see _relay)
        self.params = params  # tracked parameter values this client expects
        self.params_key = worker.tracked.key(params)
        self.startup = None  # its startup parameters (workers/startup.py)
        self.extra: dict[str, str] = {}  # other settings its servers get on every link
        self.greeting: bytes | None = None  # a login waiting for its server (startup.greet)
        self.cancel_key: tuple[int, int] = (0, 0)
        self.user = user
        self.dbname = dbname
        self.state = "active"  # active | waiting | closed
        self.pending: bytes | None = None  # a request read while no server was linked
        self.pending_syncs = 0  # what ``pending`` will be answered with, in ReadyForQuery
        self.request_time = 0.0
        self.wait_started = 0.0
        self.login_time = _monotonic()
        self.idle_since = self.login_time  # since its last server was released

    def start(self) -> None:
        """Login is done: from now on the event loop drives this client."""
        self.rw.start(self.on_read)

    def params_changed(self) -> None:
        self.params_key = self.worker.tracked.key(self.params)

    def on_read(self) -> None:
        try:
            n = self.sock.recv_into(_BUF, BUF_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.disconnect("client read failed: %s" % exc.strerror)
            return
        try:
            if n == 0:
                self.disconnect("client unexpected eof")
                return
            self._relay(n)
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        """The one place where an error on this client ends it: bad input gets its text,
        a bug "internal error" and a traceback in the log."""
        if isinstance(exc, (ProtocolError, prepared.StatementError)):
            self.disconnect(str(exc), error=str(exc))
        else:
            log.error("%s internal error", self.label(), exc_info=exc)
            self.disconnect("internal error", error="internal error")

    def forwarded_partial(self) -> bool:
        """Has its server been sent the start of a message whose rest has not followed?"""
        fs = self.fs
        return bool(fs.remaining or (fs.head and not fs.watch_named))

    def _relay(self, n: int) -> None:
        if self.ps_mode:
            self._relay_statements(bytes(_MV[:n]))
            return
        fs = self.fs
        if (n > 5 and _BUF[0] == proto.F_QUERY and not fs.remaining and not fs.head
                and _INT32.unpack_from(_BUF, 1)[0] == n - 1):
            # One whole simple Query, the most common request: counted without a scan.
            if self.worker.settings.disable_pqexec:
                self.disconnect("PQexec disallowed", error="PQexec disallowed")
                return
            fs.query()
            synced = 1
            watch = False
        else:
            syncs = fs.syncs
            queries = fs.simple_queries
            watch = fs.watch_named
            if watch:
                since, raw, unsynced = fs.syncs_since_exec, fs.remaining, fs.unsynced[:]
            fs.feed(_BUF, n)
            if fs.named:
                fs.unsee(syncs, since, unsynced)
                self._enter_statements(raw, n)
                return
            if fs.terminate:
                self.disconnect("client close request", clean=True)
                return
            if fs.simple_queries != queries and self.worker.settings.disable_pqexec:
                self.disconnect("PQexec disallowed", error="PQexec disallowed")
                return
            synced = fs.syncs - syncs
        server = self.server
        now = _monotonic()
        data = _MV[:n]
        if watch and (self.held or fs.head):
            # A header cut by the chunk could start a named Parse: never forward half of it.
            data = self.held + bytes(data[: n - len(fs.head)])
            self.held = fs.head
        if self.pending is not None:
            # Still waiting, unlinked or linked to a server still being checked or aligned:
            # what comes meanwhile queues behind what is parked, never overtakes it.
            self._park_more(data, synced)
            return
        if server is None:
            self.request_time = now
            server = self.pool.assign(self)
            if server is None:
                # Parked until a server is linked and ready: see resume(). Reading goes on
                # (a hang-up is noticed), up to PARK_LIMIT bytes.
                self.pending = bytes(data)
                self.pending_syncs = synced
                return
        if watch and server.bs.counting is not bool(fs.unsynced):
            server.bs.count_replies(bool(fs.unsynced))  # see _enter_statements
        server.forward(data, synced, now)

    def _park_more(self, data: bytes | memoryview, syncs: int) -> None:
        self.pending += data
        self.pending_syncs += syncs
        if len(self.pending) > PARK_LIMIT:
            self.rw.stop()  # resume() starts it again

    # -- named prepared statements (workers/prepared.py) ----------------------------------

    def _enter_statements(self, raw: int, n: int) -> None:
        """This chunk names a prepared statement: from now on the stream is rewritten.

        ``raw`` bytes at its start finish a message already on its way: they go as they are.
        """
        fs = self.fs
        fs.watch_named = False
        self.ps_mode = True
        server = self.server
        if self.pending is not None:
            # Parked (see _relay): all of it is rewritten when its server is ready.
            self._park_more(self.held + bytes(_MV[:n]), 0)
            self.held = b""
            fs.unsynced.clear()
            return
        if server is not None:
            # Requests still in flight were sent unrewritten: their replies pass through.
            # Those of a pipeline not synced yet may have been answered already (a Flush, a
            # full send buffer): only the rest are owed. Once the server has failed one, it
            # skips the rest up to the Sync, answering nothing.
            bs = server.bs
            owed = fs.unsynced
            if bs.counting and not server.expect:
                owed = [] if bs.ext_failed else owed[bs.ext_done:]
                if bs.ext_failed:
                    server.statements.skipping = True
            bs.count_replies(False)
            prepared.in_flight(server.statements, server.expect, owed)
            if raw:
                server.forward(bytes(_MV[:raw]), 0, _monotonic())
        fs.unsynced.clear()
        self.ps_partial = bytearray(self.held)
        self.held = b""
        self._relay_statements(bytes(_MV[raw:n]))

    def _relay_statements(self, data: bytes) -> None:
        server = self.server
        now = _monotonic()
        if self.pending is not None:  # parked: see _relay
            self._park_more(data, 0)
            return
        if server is None:
            self.request_time = now
            server = self.pool.assign(self)
            if server is None:
                self.pending = data
                return
        self._send_statements(server, data, now)

    def _send_statements(self, server: Server, data: bytes, now: float) -> None:
        out = prepared.rewrite(self, server, data)
        owed = prepared.pending_injections(server.statements)
        if owed:
            self.write(owed)  # a Close answered here, with nothing of the server's before it
        fs = self.fs
        syncs = fs.syncs
        if out:
            fs.feed(out, len(out))
        if fs.terminate:
            self.disconnect("client close request", clean=True)
            return
        if out:
            server.forward(out, fs.syncs - syncs, now)

    def resume(self) -> None:
        """A server is linked and ready: forward the parked request and read on.

        Called from whatever linked the server (a release, a hand-over, a login): an error in
        this client's request costs this client, never the caller."""
        try:
            self._resume()
        except Exception as exc:
            self.fail(exc)

    def _resume(self) -> None:
        server = self.server
        if server is None or self.closed:
            return
        now = _monotonic()
        if self.wait_started:
            self.pool.stats.wait_time += int((now - self.wait_started) * 1e6)
            self.wait_started = 0.0
        if self.greeting is not None:
            startup.greet(self, server)
        data, self.pending = self.pending, None
        if data and self.ps_mode:
            self._send_statements(server, data, now)
        elif data:
            if self.fs.watch_named:
                server.bs.count_replies(bool(self.fs.unsynced))  # see _enter_statements
            server.forward(data, self.pending_syncs, now)
        elif self.mode != SESSION and server.clean_for_release(self):
            self.pool.release(server, now)  # linked only to be greeted (startup.greet)
        if not self.closed and server.out is None:
            self.rw.start(self.on_read)

    # Back-pressure: a slow client stops its server's reading and vice versa.
    def pause_peer(self) -> None:
        if self.server is not None:
            self.server.rw.stop()

    def drained(self) -> None:
        server = self.server
        if server is None:
            return
        server.rw.start(server.on_read)
        if server.release_on_drain:
            server.release_on_drain = False
            self.pool.release(server, _monotonic())

    def on_io_error(self, exc: OSError | None) -> None:
        self.disconnect("client write failed: %s" % (exc.strerror if exc else "internal error"))

    def send_error(self, text: str, sqlstate: str = "08P01", severity: str = "FATAL") -> None:
        """Best effort: a closing client may not read it, and must not block us."""
        try:
            self.sock.send(proto.error_response(text, sqlstate, severity))
        except OSError:
            pass

    def disconnect(self, reason: str, error: str | None = None, clean: bool = False,
                   sqlstate: str = "08P01") -> None:
        """Close this client; its server goes back clean, drained or closed
        (:meth:`Server.client_left`). Never raises: every step runs whatever the others do."""
        if self.closed:
            return
        self.closed = True
        if error is not None:
            self.send_error(error, sqlstate)
            if self.worker.settings.log_pooler_errors:
                log.warning("%s pooler error: %s", self.label(), error)
        self.release_socket()
        server, self.server = self.server, None
        if server is not None:
            server.client = None
            server.release_on_drain = False
            server.client_left(self)
        self.pool.client_gone(self)
        self.worker.client_gone(self)
        self.state = "closed"
        if self.worker.settings.log_disconnections:
            log.info("%s closing because: %s (age=%ds)", self.label(), reason,
                     int(_monotonic() - self.login_time))

    def detach(self) -> None:
        """Forget this client without closing it: another worker serves it now."""
        self.closed = True
        self.state = "moved"
        self.release_socket()  # our descriptor only: the connection travels in the message
        self.pool.client_gone(self)
        self.worker.clients.pop(self.id, None)
        self.worker.cancel_keys.pop(self.cancel_key, None)

    def label(self) -> str:
        return plog.socket_prefix("C", self.id, self.dbname, self.user, self.addr, self.port)


# ------------------------------------------------------------------------------------ server


class Server(Conn):
    """A server connection that finished login, owned by one pool of this worker."""

    __slots__ = ("pool", "client", "bs", "params", "params_key", "backend_pid", "backend_key",
                 "statements", "state", "cancels", "extra", "startup",
                 "expect", "release_on_drain", "close_needed", "last_used", "link_time",
                 "query_start", "xact_start", "internal", "reader", "internal_error",
                 "target", "born", "draining")

    def __init__(self, worker: Worker, sock: socket.socket, pool: Pool,
                 params: dict[str, str], backend_pid: int, backend_key: int,
                 target: tuple) -> None:
        super().__init__(worker, sock)
        self.pool = pool
        self.client: Client | None = None
        self.bs = BackendScanner()
        self.statements = prepared.ServerStatements()
        self.params = params  # every ParameterStatus this server reported, latest value
        self.params_key = worker.tracked.key(params)
        self.extra: dict[str, str] = {}  # other settings pgherd applied (workers/startup.py)
        self.startup: tuple = ()  # the client parameters of its startup packet (session mode)
        self.backend_pid = backend_pid
        self.backend_key = backend_key
        self.target = target  # where it is connected, for cancel requests
        self.state = "idle"  # idle | active | used | tested | being_canceled
        self.cancels = 0  # cancel requests for its backend still under way (forward_cancel)
        self.expect = 0  # ReadyForQuery messages still owed for forwarded requests
        self.release_on_drain = False
        self.close_needed = False
        now = _monotonic()
        self.born = now
        self.last_used = now
        self.link_time = 0.0
        self.query_start = 0.0
        self.xact_start = 0.0
        self.internal: Callable[[Server, dict[str, str] | None], None] | None = None
        self.reader: MessageReader | None = None
        self.internal_error: dict[str, str] | None = None
        self.draining = False  # reading out what a vanished client asked for (client_left)

    def start(self) -> None:
        # An idle server is watched too: that is how a backend's death or an admin's
        # pg_terminate_backend is noticed before the server is handed out.
        self.rw.start(self.on_read)

    def forward(self, data: bytes | memoryview, syncs: int, now: float) -> None:
        """Client -> server. Opens the query/transaction clocks when the server was idle."""
        if self.expect == 0:
            self.query_start = now
            if self.bs.status == STATUS_IDLE and not self.xact_start:
                self.xact_start = now
        self.expect += syncs
        self.pool.stats.recv_bytes += len(data)
        self.write(data)

    def on_read(self) -> None:
        try:
            n = self.sock.recv_into(_BUF, BUF_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close("server conn crashed? (%s)" % exc.strerror,
                       client_error="server conn crashed?", crashed=True)
            return
        try:
            if n == 0:
                self.close("server conn crashed?", client_error="server conn crashed?",
                           crashed=True)
            elif self.internal is not None:
                self._internal_read(n)
            elif self.client is not None:
                self._relay(n)
            elif self.draining:
                self._drain_read(n)
            else:
                self._unexpected(n)
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        """The one place where an error on this server ends it (and its client with it)."""
        if isinstance(exc, ProtocolError):
            self.close("bad packet from server: %s" % exc, client_error="server conn crashed?")
        else:
            log.error("%s internal error", self.label(), exc_info=exc)
            self.close("internal error", client_error="server conn crashed?")

    def _relay(self, n: int) -> None:
        client = self.client
        bs = self.bs
        rfq = bs.rfq
        rfq_idle = bs.rfq_idle
        bs.feed(_BUF, n)
        if bs.params is not None:
            self._take_params(bs.params, client)
            bs.params = None
        if bs.discarded:
            bs.discarded = False
            prepared.forget_all(self)
        z = bs.rfq - rfq
        if bs.copy_in:
            bs.copy_in = 0
            self.expect -= client.fs.copy_in_started()
            client.fs.copy_in = bs.copy_open
        elif z:
            # After an error in COPY IN the server answers ReadyForQuery and drops whatever
            # CopyData the client still sends: the client's COPY is over too.
            client.fs.copy_in = False
        stats = self.pool.stats
        stats.sent_bytes += n
        # A client with named statements sees the replies as if it had its own server.
        data = (prepared.filter_replies(self.statements, client, _BUF, n) if client.ps_mode
                else _MV[:n])
        if not z:
            client.write(data)
            return
        idle = bs.rfq_idle - rfq_idle
        # Account before writing: a write error tears the client down, and its server must
        # then be judged on the state after this chunk.
        now = _monotonic()
        self.expect -= z
        if client.mode == STATEMENT and idle != z:
            client.disconnect("transaction blocks not allowed in statement pooling mode",
                              error="transaction blocks not allowed in statement pooling mode")
            return
        stats.query_count += z
        stats.query_time += int((now - self.query_start) * 1e6)
        self.query_start = now
        if idle:
            stats.xact_count += idle
            if self.xact_start:
                stats.xact_time += int((now - self.xact_start) * 1e6)
            self.xact_start = 0.0
        sent = client.write(data)
        if client.mode != SESSION and self.client is client and self.clean_for_release(client):
            if sent:
                self.pool.release(self, now)
            else:
                self.release_on_drain = True

    def clean_for_release(self, client: Client | None) -> bool:
        """At a transaction boundary with nothing in flight in either direction."""
        return (self.expect <= 0 and self.bs.status == STATUS_IDLE and self.internal is None
                and self.out is None and self.bs.at_boundary() and not self.statements.queue
                and (client is None or (not client.fs.ext_open and not client.fs.copy_in
                                        and client.fs.at_boundary() and not client.ps_partial
                                        and not client.ps_through)))

    # -- a client that left ------------------------------------------------------------------

    def client_left(self, client: Client) -> None:
        """``client`` (already unlinked) is gone: this server goes back to its pool clean,
        is drained first, or is closed. Never raises."""
        try:
            if self.clean_for_release(client):
                self.pool.release(self, _monotonic())
            elif client.forwarded_partial():
                # The backend waits for the rest of a message: no Terminate (it would be
                # read as that rest), just EOF, which ends the backend at once.
                self.close("client disconnect while server was not ready", partial=True)
            elif self.internal is not None or self.out is not None:
                self.close("client disconnect while server was not ready")
            else:
                self._drain(client)
        except Exception as exc:
            self.fail(exc)

    def _drain(self, client: Client) -> None:
        """Have the backend finish what the client asked (a Sync ends any batch; a CopyFail
        any COPY IN; a cancel a running query), reading its replies to no one."""
        running = self.expect > 0 and not client.fs.copy_in
        self.expect += 1
        self.draining = True
        self.state = "active"
        now = _monotonic()
        self.worker.drains[self] = (now + self.worker.settings.cancel_wait_timeout,
                                    now + DRAIN_SILENCE)
        self.write(COPY_FAIL + SYNC if client.fs.copy_in else SYNC)
        if running and not self.closed and not self.cancels:
            self.worker.cancel_server(self)
        if not self.closed:
            self.rw.start(self.on_read)  # it may have been paused by the client's backlog

    def _drain_read(self, n: int) -> None:
        drains = self.worker.drains
        if self in drains:
            drains[self] = (drains[self][0], _monotonic() + DRAIN_SILENCE)
        bs = self.bs
        rfq = bs.rfq
        bs.feed(_BUF, n)
        bs.params = None  # the next client's SETs are worked out from self.params anyway
        if bs.copy_in:  # a COPY queued behind the rest: no data will come for it
            self.close("client disconnect while server was not ready")
            return
        self.expect -= bs.rfq - rfq
        if self.expect > 0 or not bs.at_boundary():
            return
        self.draining = False
        self.worker.drains.pop(self, None)
        if bs.status == STATUS_IDLE:
            self.pool.release(self, _monotonic())
        elif self.cancels:
            self.close("client disconnect while server was not ready")
        else:
            self.run_internal("ROLLBACK", self._rolled_back)

    def _rolled_back(self, server: Server, error: dict[str, str] | None) -> None:
        if error is not None or self.bs.status != STATUS_IDLE:
            self.close("rollback after client disconnect failed")
        else:
            self.pool.release(self, _monotonic())

    def _take_params(self, params: list[tuple[str, str]], client: Client | None) -> None:
        """ParameterStatus while linked: a SET by the client changes both sides alike."""
        tracked = self.worker.tracked
        for name, value in params:
            self.params[name] = value
            if client is not None and tracked.canonical(name) is not None:
                client.params[name] = value
        self.params_key = tracked.key(self.params)
        if client is not None:
            client.params_changed()

    def _unexpected(self, n: int) -> None:
        # Idle servers only speak to announce their end (FATAL, then EOF); never hand those out.
        reader = MessageReader()
        reader.feed(_MV[:n])
        text = "server sent data while idle"
        for mtype, body in reader:
            if mtype == proto.B_ERROR:
                text = "server error while idle: " + proto.parse_fields(body).get("M", "")
            elif mtype == proto.B_PARAMETER_STATUS:
                name, value = proto.parse_parameter_status(body)
                self.params[name] = value
                self.params_key = self.worker.tracked.key(self.params)
                continue
            elif mtype == proto.B_NOTICE:
                continue
            self.close(text)
            return

    # -- internal queries (server_check_query, tracked-parameter SETs, reset query) ---------

    def run_internal(self, sql: str,
                     done: Callable[[Server, dict[str, str] | None], None]) -> None:
        """Run ``sql`` on this server for pgherd itself; ``done(server, error_fields)`` after."""
        self.internal = done
        self.internal_error = None
        self.reader = MessageReader()
        self.write(proto.query(sql))

    def _internal_read(self, n: int) -> None:
        reader = self.reader
        reader.feed(_MV[:n])
        for mtype, body in reader:
            if mtype == proto.B_READY:
                done = self.internal
                self.internal = None
                self.reader = None
                self.bs.status = body[0] if body else STATUS_IDLE
                self.params_key = self.worker.tracked.key(self.params)
                done(self, self.internal_error)
                return
            if mtype == proto.B_PARAMETER_STATUS:
                name, value = proto.parse_parameter_status(body)
                self.params[name] = value
            elif mtype == proto.B_ERROR:
                self.internal_error = proto.parse_fields(body)

    # -- back-pressure and teardown ----------------------------------------------------------

    def pause_peer(self) -> None:
        if self.client is not None:
            self.client.rw.stop()

    def drained(self) -> None:
        client = self.client
        if client is not None and client.pending is None and not client.closed:
            client.rw.start(client.on_read)

    def on_io_error(self, exc: OSError | None) -> None:
        self.close("server write failed: %s" % (exc.strerror if exc else "internal error"),
                   client_error="server conn crashed?")

    def detach(self) -> None:
        """Forget this idle server without closing it: another worker owns it now."""
        self.closed = True
        self.release_socket()  # our descriptor only: the connection travels in the message
        self.pool.server_gone(self)

    def label(self) -> str:
        pool = self.pool
        return plog.socket_prefix("S", self.id, pool.dbname, pool.user, self.addr, self.port)

    def close(self, reason: str, client_error: str | None = None, crashed: bool = False,
              partial: bool = False) -> None:
        """Close this server; a linked client cannot continue without it and is closed too.
        Never raises.

        The server leaves its pool at once but stays counted against the limits until its
        backend is gone (EOF after our Terminate): PostgreSQL must never see more servers
        than a limit allows, not even while one of them is still exiting. A backend with a
        query under way would read the Terminate only when the query ends: unless the
        server itself failed (``crashed``), the query is cancelled. ``partial``: the backend
        was sent half a message, so it gets no Terminate, only the end of our stream.
        """
        if self.closed:
            return
        self.closed = True
        client, self.client = self.client, None
        partial = partial or (client is not None and client.forwarded_partial())
        busy = self.expect > 0 and not crashed
        self.draining = False
        self.worker.drains.pop(self, None)
        if self.worker.settings.log_disconnections:
            log.info("%s closing because: %s (age=%ds)", self.label(), reason,
                     int(_monotonic() - self.born))
        self.pool.server_gone(self)
        self.rw.stop()
        if self.ww is not None:
            self.ww.stop()
        try:
            if not partial and self.out is None:
                self.sock.send(proto.TERMINATE)
            self.sock.shutdown(socket.SHUT_WR)
            self.rw.start(self._on_closing)
            self.worker.closing[self] = _monotonic()
        except OSError:
            self.gone()
        if busy and not self.cancels:
            self.worker.cancel_server(self)
        if client is not None:
            client.server = None
            # After the server's own FATAL (passed on already), a second one would be a lie.
            client.disconnect(reason, error=None if self.bs.fatal else client_error or reason)

    def _on_closing(self) -> None:
        try:
            if self.sock.recv_into(_BUF, BUF_SIZE):
                return  # whatever it still had to say; we only wait for its end
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.gone()

    def gone(self) -> None:
        """The backend is gone (or given up on): stop counting this server."""
        self.worker.closing.pop(self, None)
        self.release_socket()
        self.worker.limits.server_closed(self.pool.rows)
        self.pool.room_freed()
