"""Draining a worker without dropping its clients: they move to the other workers.

When the worker count shrinks on reload, or a worker is recycled (``max_worker_memory``),
the master sends it DRAIN. It stops accepting, then hands every client over to a live worker
at a transaction boundary — its socket with SCM_RIGHTS, its state in a
:class:`~ipc.channel.ClientHandoff` (tracked parameters, cancel key); in session mode its
server travels with it — and hands its idle servers over too. When nothing is left it
publishes its last stats and exits, and the master reaps it like any other worker, keeping
those stats in the rows' ghost counters. The client notices nothing.

A moved client keeps its cancel key: a CancelRequest for it that lands on the old worker is
forwarded to where the client went (:meth:`Drain.forward_cancel`); once that worker is gone,
the workers pass it on until the one that knows the key serves it (``Worker.cancel``).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

import gevent

from ipc import channel, shm

from . import prepared, startup
from .relay import SESSION, Client

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("pgherd")

POLL = 0.005  # how often a draining worker looks for clients at a transaction boundary


class Drain:
    """The state of a draining worker."""

    def __init__(self, worker: Worker, keep: int) -> None:
        self.worker = worker
        self.keep = keep  # slots below this stay; the others drain too
        self.moved: dict[tuple[int, int], int] = {}  # cancel key -> slot the client went to
        self._next = 0

    def run(self) -> None:
        """Greenlet: move clients and servers away until none is left, then exit."""
        worker = self.worker
        log.info("worker %d draining: moving its clients to the other workers", worker.slot)
        while worker.clients or worker.logins:
            for client in list(worker.clients.values()):
                if self._movable(client):
                    self.move(client)
            gevent.sleep(POLL)
        for pool in worker.pools.values():
            while pool.idle:
                target = self.target()
                server = pool.idle.pop()
                if target is None or not worker.exchange.hand_over(server, target):
                    server.close("worker drained")
        log.info("worker %d drained: %d clients moved", worker.slot, len(self.moved))
        # The service lives on and counts what this worker did: its last stats must reach
        # shared memory, where the master keeps them (ghost counters) once it has exited.
        worker.publish()
        worker.exit_now()

    def target(self) -> int | None:
        """A live worker that is not draining, round robin."""
        live = [w.slot for w in self.worker.segment.read_all(self.keep)
                if w.pid and w.state == shm.READY and w.slot != self.worker.slot]
        if not live:
            return None
        self._next += 1
        return live[self._next % len(live)]

    @staticmethod
    def _movable(client: Client) -> bool:
        """At a transaction boundary, with nothing in flight in either direction."""
        if client.closed or client.pending is not None or client.out is not None:
            return False
        if client.ps_partial or client.ps_through or client.held:
            return False
        if not client.fs.at_boundary() or client.state != "active":
            return False
        server = client.server
        if server is None:
            return True
        # Session mode: the client keeps its server; both go once the server is idle.
        return client.mode == SESSION and server.clean_for_release(client) and server.out is None

    def move(self, client: Client) -> bool:
        target = self.target()
        if target is None:
            return False
        worker = self.worker
        server = client.server
        message = channel.ClientHandoff(
            client.pool.dbname, client.pool.user, client.dbname, client.params,
            client.cancel_key[0], client.cancel_key[1], client.addr, client.port,
            client.connect_time, worker.exchange.describe(server) if server else None,
            [(name, p.ename, p.parse, p.time, p.description)
             for name, p in client.statements.items()],
            client.startup.tracked, client.startup.extra)
        fds = [client.fd] + ([server.fd] if server else [])
        if not worker.exchange.inboxes.send(target, message, fds):
            return False
        self.moved[client.cancel_key] = target
        if server is not None:
            worker.limits.handed_out(server.pool.rows)
            server.client = None
            client.server = None
            server.detach()
        client.detach()
        return True

    def forward_cancel(self, pid: int, key: int, request: socket.socket | None) -> bool:
        slot = self.moved.get((pid, key))
        if slot is None:
            return False
        self.worker.exchange.relay_cancel(slot, pid, key, request)
        return True


def receive_client(worker: Worker, m: channel.ClientHandoff, fds: list[int]) -> None:
    """Take over a client (and its session server) that a draining worker sent."""
    sock = socket.socket(fileno=fds.pop(0))
    sock.setblocking(False)
    server = worker.exchange.receive_server(m.server, fds.pop(0)) if m.server else None
    db = worker.database(m.db)
    rows = server.pool.rows if server else worker.limits.find_rows(m.db, m.user)
    if db is None or rows is None:  # rows: the sender's pool made them, unless corrupt
        sock.close()
        if server is not None:
            server.close("database removed")
        return
    pool = worker.pool_for(db, m.user, rows)
    client = Client(worker, sock, pool, dict(m.params), m.user, m.dbname, worker.next_id(),
                    (m.addr, m.port))
    client.connect_time = m.connect_time
    client.startup = startup.Startup(dict(m.tracked), dict(m.extra))
    if client.mode != SESSION:
        client.extra = client.startup.extra
    client.cancel_key = (m.cancel_pid, m.cancel_key)
    if m.statements:
        client.statements = {name: prepared.Preparation(ename, parse, at, description)
                             for name, ename, parse, at, description in m.statements}
        client.ps_mode = True
        client.fs.watch_named = False
    worker.cancel_keys[client.cancel_key] = client
    worker.limits.client_moved_in()
    worker.client_ready(client)
    if server is not None:
        client.server = server
        server.client = client
        client.state = server.state = "active"
        server.link_time = time.monotonic()
    client.start()
