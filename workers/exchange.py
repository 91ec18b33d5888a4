"""Talking to the other workers: server hand-overs, requests for idle servers, relayed cancels,
and the admin console's gathers — over the inboxes of ``ipc/channel``.

Hand-over: an idle server connection moves to the worker whose client has waited longest (see
``Pool.give``), its socket as SCM_RIGHTS and its state (tracked parameters, backend key,
age) in a :class:`~ipc.channel.Handoff`. Counting follows ``workers/limits.py``: the sender
counts it as sent, the receiver as received, so it never leaves the limits while in flight.

Mail is read by a watcher callback in the hub; handlers never block. Replies that find the
receiver's queue full are retried by one greenlet (:meth:`Exchange.post`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import socket
import time
from typing import TYPE_CHECKING, Callable

import gevent
import gevent.event

from ipc import channel

from . import prepared
from .pool import IDLE_OFFER_AFTER, evict_idle
from .relay import Server

if TYPE_CHECKING:
    from .pool import Pool
    from .worker import Worker

log = logging.getLogger("pgherd")
_monotonic = time.monotonic

WANT_INTERVAL = 0.005  # a pool asks the other workers at most this often
GATHER_TIMEOUT = 2.0  # an admin view waits this long for a worker that does not answer
ROWS_PER_MESSAGE = 500


class _Pending:
    __slots__ = ("slots", "rows", "errors", "done")

    def __init__(self, slots: set[int]) -> None:
        self.slots = slots
        self.rows: list[list] = []
        self.errors: list[str] = []
        self.done = gevent.event.Event()
        if not slots:
            self.done.set()


class Exchange:
    """This worker's mailbox."""

    def __init__(self, worker: Worker, inboxes: channel.Inboxes) -> None:
        self.worker = worker
        self.inboxes = inboxes
        self.slot = worker.slot
        self._want_next: dict[Pool, float] = {}  # when a pool may ask again
        self._pending: dict[int, _Pending] = {}
        self._req = itertools.count(1)
        self._outbox: collections.deque[tuple[int, channel.Message]] = collections.deque()
        self._flusher: gevent.Greenlet | None = None
        self._handlers: dict[type, Callable] = {
            channel.Handoff: self._on_handoff, channel.Want: self._on_want,
            channel.ClientHandoff: self._on_client_handoff, channel.Accepted: self._on_accepted,
            channel.Cancel: self._on_cancel, channel.Gather: self._on_gather,
            channel.Rows: self._on_rows, channel.Publish: self._on_publish,
            channel.Done: self._on_done, channel.Reply: self._on_reply,
        }
        self._watcher = worker.loop.io(inboxes.rx[self.slot].fileno(), 1)
        self._lane_watcher = worker.loop.io(inboxes.lane_rx[self.slot].fileno(), 1)

    def start(self) -> None:
        self._watcher.start(self._on_mail, False)
        self._lane_watcher.start(self._on_mail, True)

    def on(self, kind: type, handler: Callable) -> None:
        """Register the handler of a message kind owned elsewhere (reload, commands)."""
        self._handlers[kind] = handler

    # ------------------------------------------------------------------ transport

    def _on_mail(self, lane: bool) -> None:
        for _ in range(64):
            got = self.inboxes.receive(self.slot, lane)
            if got is None:
                return
            message, fds = got
            try:
                self._handlers[type(message)](message, fds)
            except Exception:
                log.exception("control message %s failed", type(message).__name__)
            # A handler takes the descriptors it keeps out of ``fds`` (a connection object
            # owns it from then on, watchers and all); what is left was not taken.
            for fd in fds:
                try:
                    socket.close(fd)
                except OSError:
                    pass

    def post(self, slot: int, message: channel.Message) -> None:
        """Send without fds; a full inbox is retried by a greenlet, never by blocking."""
        if self._outbox or not self.inboxes.send(slot, message):
            self._outbox.append((slot, message))
            if self._flusher is None:
                self._flusher = gevent.spawn(self._flush)

    def _flush(self) -> None:
        try:
            while self._outbox:
                slot, message = self._outbox[0]
                if self.inboxes.send(slot, message):
                    self._outbox.popleft()
                else:
                    gevent.sleep(0.001)
        finally:
            self._flusher = None

    def live_slots(self) -> list[int]:
        """Slots with a worker process now (the master keeps pids current in shm)."""
        seg = self.worker.segment
        now_ns = time.monotonic_ns()
        # A stopped worker cannot answer: its shared counters are as current as they get.
        return [w.slot for w in seg.read_all() if w.pid and w.slot != self.slot
                and not seg.stalled(w.slot, now_ns)]

    # ------------------------------------------------------------------ hand-overs

    def hand_over(self, server: Server, to_slot: int) -> bool:
        """Move an idle ``server`` to worker ``to_slot``; False if its inbox is full."""
        if not self.inboxes.send(to_slot, self.describe(server), [server.fd]):
            return False
        self.worker.limits.handed_out(server.pool.rows)
        server.detach()
        return True

    def describe(self, server: Server) -> channel.Handoff:
        """What another worker needs to carry on with ``server``."""
        pool = server.pool
        family, address = server.target
        host, port = (address, 0) if isinstance(address, str) else address[:2]
        return channel.Handoff(pool.dbname, pool.user, server.params, server.backend_pid,
                               server.backend_key, family, host, port, server.born,
                               server.connect_time, server.close_needed, self.slot,
                               server.statements.describe(), server.extra, list(server.startup))

    def _on_handoff(self, m: channel.Handoff, fds: list[int]) -> None:
        server = self.receive_server(m, fds.pop(0))
        if server is not None:
            try:
                server.pool.adopt(server)
            except Exception as exc:
                server.fail(exc)

    def receive_server(self, m: channel.Handoff, fd: int) -> Server | None:
        """Take over a server another worker sent; None if its database went away."""
        worker = self.worker
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        target = (m.family, m.host if m.family == socket.AF_UNIX else (m.host, m.port))
        rows = worker.limits.handed_in(m.db, m.user)
        try:
            db = worker.database(m.db)
            if db is None:  # the database went away in between: counted in, now closed
                log.info("handed a server of unknown database %s: closing it", m.db)
                raise LookupError(m.db)
            pool = worker.pool_for(db, m.user, rows)
            server = Server(worker, sock, pool, dict(m.params), m.backend_pid, m.backend_key,
                            target)
        except Exception as exc:
            if not isinstance(exc, LookupError):
                log.exception("could not take over a server of %s/%s", m.db, m.user)
            worker.limits.server_closed(rows)
            sock.close()
            return None
        server.born = m.born
        server.connect_time = m.connect_time
        server.close_needed = m.close_needed
        server.statements = prepared.ServerStatements.from_description(m.prepared)
        server.extra = dict(m.extra)
        server.startup = tuple(tuple(pair) for pair in m.startup)
        server.bs.watch_discard(bool(m.prepared))
        pool.servers.add(server)
        server.start()
        return server

    def _on_client_handoff(self, m: channel.ClientHandoff, fds: list[int]) -> None:
        from .migrate import receive_client

        receive_client(self.worker, m, fds)

    def want(self, pool: Pool, evict: str = "") -> None:
        """Ask workers holding servers of ``pool`` to hand idle ones over (rate-limited);
        with ``evict`` (a shared limit refuses) every worker, to close a sibling's idle one.

        Not those with clients of their own waiting: they have no idle server to offer, and
        under saturation every worker would otherwise mail every other one all the time.
        """
        now = _monotonic()
        if now < self._want_next.get(pool, 0.0):
            return
        self._want_next[pool] = now + WANT_INTERVAL
        seg, row = self.worker.segment, pool.rows[0]
        message = channel.Want(pool.dbname, pool.user, self.slot, evict)
        now_ns = time.monotonic_ns()
        for slot in range(self.worker.settings.workers):
            if slot != self.slot and (evict or (seg.cell_get(row, slot, "servers")
                                                and not seg.cell_get(row, slot, "cl_waiting"))
                                      ) and not seg.stalled(slot, now_ns):
                self.inboxes.send(slot, message)  # best effort: releases check the flags

    def _on_want(self, m: channel.Want, fds: list[int]) -> None:
        worker = self.worker
        pool = worker.pools.get((m.db, m.user))
        if pool is not None:
            pool.offer_idle()
        if m.evict:
            # Settled idle servers only: one a busy pool just released is about to be used.
            evict_idle(worker.pools.values(), m.db, m.user, m.evict, IDLE_OFFER_AFTER)

    def _on_accepted(self, m: channel.Accepted, fds: list[int]) -> None:
        sock = socket.socket(m.family, socket.SOCK_STREAM, 0, fds.pop(0))
        try:
            self.worker.serve_accepted(sock)
        except OSError:  # gone already (getpeername): nothing of ours holds it yet
            sock.close()

    # ------------------------------------------------------------------ cancel

    def relay_cancel(self, slot: int, pid: int, key: int,
                     request: socket.socket | None = None, tried: int = 0) -> None:
        """Pass a CancelRequest to another worker (the client's, or the next to ask: see
        ``Worker.cancel``), with the connection it came on (closed there when the cancel is
        done; closed here at once if the inbox is full)."""
        message = channel.Cancel(pid, key, tried)
        if request is not None:
            sent = self.inboxes.send(slot, message, [request.fileno()])
            request.close()  # our descriptor; the other worker got its own
            if sent:
                return
        self.post(slot, message)

    def _on_cancel(self, m: channel.Cancel, fds: list[int]) -> None:
        request = socket.socket(fileno=fds.pop(0)) if fds else None
        if m.tried:
            self.worker.cancel(m.pid, m.key, request, m.tried)
        else:  # from a draining worker that knows where the client went
            self.worker.cancel_local(m.pid, m.key, request)

    # ------------------------------------------------------------------ admin gathers

    def gather(self, what: str) -> list[list]:
        """Rows of ``what`` from every worker, this one included (greenlet context)."""
        req, pending = self._ask(lambda req: channel.Gather(req, what, self.slot))
        rows = list(self.worker.admin_rows(what))
        pending.done.wait(GATHER_TIMEOUT)
        self._pending.pop(req, None)
        return rows + pending.rows

    def publish_all(self) -> None:
        """Have every worker write its counters to shared memory now (greenlet context)."""
        req, pending = self._ask(lambda req: channel.Publish(req, self.slot))
        self.worker.publish()
        pending.done.wait(GATHER_TIMEOUT)
        self._pending.pop(req, None)

    def command_master(self, name: str, arg: str = "", timeout: float = 60.0) -> str:
        """Ask the master (RELOAD, SHUTDOWN); its error text, empty on success."""
        master = self.inboxes.master
        req = next(self._req)
        pending = self._pending[req] = _Pending({master})
        self.post(master, channel.Command(req, self.slot, name, arg))
        if not pending.done.wait(timeout):
            self._pending.pop(req, None)
            return "no answer from the master"
        self._pending.pop(req, None)
        return "; ".join(pending.errors)

    def _ask(self, make: Callable[[int], channel.Message]) -> tuple[int, _Pending]:
        req = next(self._req)
        slots = set(self.live_slots())
        pending = self._pending[req] = _Pending(slots)
        for slot in slots:
            self.post(slot, make(req))
        return req, pending

    def _on_gather(self, m: channel.Gather, fds: list[int]) -> None:
        rows = [list(r) for r in self.worker.admin_rows(m.what)]
        for i in range(0, max(len(rows), 1), ROWS_PER_MESSAGE):
            chunk = rows[i : i + ROWS_PER_MESSAGE]
            self.post(m.reply_to, channel.Rows(m.req, self.slot, chunk,
                                               i + ROWS_PER_MESSAGE >= len(rows)))

    def _on_rows(self, m: channel.Rows, fds: list[int]) -> None:
        pending = self._pending.get(m.req)
        if pending is None:
            return
        pending.rows.extend(m.rows)
        if m.done:
            self._finish(pending, m.slot)

    def _on_publish(self, m: channel.Publish, fds: list[int]) -> None:
        self.worker.publish()
        self.post(m.reply_to, channel.Done(m.req, self.slot))

    def _on_reply(self, m: channel.Reply, fds: list[int]) -> None:
        pending = self._pending.get(m.req)
        if pending is not None:
            if m.error:
                pending.errors.append(m.error)
            self._finish(pending, m.slot)

    def _on_done(self, m: channel.Done, fds: list[int]) -> None:
        pending = self._pending.get(m.req)
        if pending is not None:
            self._finish(pending, m.slot)

    @staticmethod
    def _finish(pending: _Pending, slot: int) -> None:
        pending.slots.discard(slot)
        if not pending.slots:
            pending.done.set()

