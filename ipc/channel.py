"""Control channels: one inbox per worker slot and one for the master; the messages they carry.

An inbox is an AF_UNIX datagram socketpair made by the master before it forks: the receiving
end stays with the master for the life of the service and is inherited by whichever process
serves the slot, the sending end is inherited by everyone. So any process can post to any
slot, a respawned worker finds its inbox where the dead one left it (messages included), and
nothing is addressable from outside the process tree. A datagram is one msgspec-msgpack
encoded message, optionally with file descriptors (SCM_RIGHTS): a server connection handed
from one worker to another travels that way, with its state.

Sending never blocks: :meth:`Inboxes.send` returns False when the receiver's queue is full and
the caller decides how to retry (workers retry in a greenlet; the master on its next tick).

Connections travel on a lane of their own (a second socketpair per worker slot): a worker that
stops taking its mail (SIGSTOP, a blocking bug) must not sit on servers other workers handed
it, so the master takes them out of that lane and passes them on. Any process may take a
hand-over from a lane — each is one datagram, read by one reader — while the control messages
stay in order in the inbox proper.
"""

from __future__ import annotations

import array
import logging
import socket
from typing import Union

import msgspec

log = logging.getLogger("pgherd")

MAX_DATAGRAM = 256 * 1024
MAX_FDS = 4


class Handoff(msgspec.Struct, tag=True, array_like=True):
    """An idle server connection moving to another worker (its socket rides along)."""

    db: str
    user: str
    params: dict[str, str]
    backend_pid: int
    backend_key: int
    family: int
    host: str
    port: int
    born: float  # CLOCK_MONOTONIC is one clock for all processes of a host
    connect_time: float
    close_needed: bool
    from_slot: int
    # the statements it has prepared: internal name, when, description (workers/prepared.py)
    prepared: list[tuple[str, int, bytes]] = []
    extra: dict[str, str] = {}  # settings pgherd applied for its last client (startup.py)
    startup: list[tuple[str, str]] = []  # client parameters of its startup packet


class ClientHandoff(msgspec.Struct, tag=True, array_like=True):
    """A logged-in client moving to another worker at a transaction boundary (its worker
    drains: fewer workers, or recycled). Its socket rides along; in session mode its server
    too, described by ``server`` (then a second fd)."""

    db: str
    user: str
    dbname: str
    params: dict[str, str]
    cancel_pid: int
    cancel_key: int
    addr: str
    port: int
    connect_time: float
    server: Handoff | None = None
    # its named statements: name, internal name, Parse, when prepared, description
    statements: list[tuple[bytes, bytes, bytes, int, bytes]] = []
    tracked: dict[str, str] = {}  # its startup parameters (workers/startup.py)
    extra: dict[str, str] = {}


class Want(msgspec.Struct, tag=True, array_like=True):
    """A worker has clients waiting for a pool that is at its limit: hand over an idle server
    of it — or, when ``evict`` names a shared limit ("db": max_db_connections, "user":
    max_user_connections), close an idle server of another pool under that limit."""

    db: str
    user: str
    from_slot: int
    evict: str = ""


class Accepted(msgspec.Struct, tag=True, array_like=True):
    """A new connection the master accepted from a stalled worker's listener, for a worker
    that runs (its socket rides along): the kernel keeps queueing connections for a worker
    that stopped (SIGSTOP, a blocking bug), and they would wait there until it runs again."""

    family: int


class Cancel(msgspec.Struct, tag=True, array_like=True):
    """A CancelRequest that the kernel handed to another worker than the client's."""

    pid: int
    key: int
    tried: int = 0  # a bit per worker slot that did not know the key (0: relayed by a drain)


class Gather(msgspec.Struct, tag=True, array_like=True):
    """Admin console: send me your rows of ``what`` (CLIENTS, SERVERS, ...)."""

    req: int
    what: str
    reply_to: int


class Rows(msgspec.Struct, tag=True, array_like=True):
    req: int
    slot: int
    rows: list[list]
    done: bool


class Publish(msgspec.Struct, tag=True, array_like=True):
    """Write your counters to shared memory now and tell me when done (exact SHOW STATS)."""

    req: int
    reply_to: int


class Done(msgspec.Struct, tag=True, array_like=True):
    req: int
    slot: int


class Reload(msgspec.Struct, tag=True, array_like=True):
    """From the master: apply this configuration (it rides in a memfd: it may be large)."""

    epoch: int


class Ack(msgspec.Struct, tag=True, array_like=True):
    """To the master: a worker applied (or refused) configuration ``epoch``."""

    epoch: int
    slot: int
    error: str = ""


class Command(msgspec.Struct, tag=True, array_like=True):
    """Admin console control commands that act on every worker (PAUSE, KILL, ...), or on
    the master (RELOAD, SHUTDOWN)."""

    req: int
    reply_to: int
    name: str
    arg: str = ""


class ServiceState(msgspec.Struct, array_like=True):
    """What the admin console set for the whole service; the master keeps it and hands it
    to every worker it forks, so a respawned worker is paused or disabled like the rest."""

    paused: bool = False
    paused_dbs: list[str] = []
    disabled_dbs: list[str] = []

    def apply(self, name: str, db: str) -> None:
        """The effect of a console command on the state (used by master and workers alike)."""
        if name == "PAUSE":
            if db:
                _add(self.paused_dbs, db)
            else:
                self.paused = True
        elif name == "RESUME":
            if db:
                _remove(self.paused_dbs, db)
            else:
                self.paused = False
                self.paused_dbs.clear()
        elif name == "KILL":
            _add(self.paused_dbs, db)
        elif name == "DISABLE":
            _add(self.disabled_dbs, db)
        elif name == "ENABLE":
            _remove(self.disabled_dbs, db)


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _remove(items: list[str], item: str) -> None:
    if item in items:
        items.remove(item)


class Reply(msgspec.Struct, tag=True, array_like=True):
    """The answer to a Command: ``error`` is empty on success."""

    req: int
    slot: int
    error: str = ""


Message = Union[Handoff, ClientHandoff, Accepted, Want, Cancel, Gather, Rows, Publish, Done,
                Reload, Ack, Command, Reply]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


#: Messages that carry a connection: they travel on the hand-over lane.
HANDOVERS = (Handoff, ClientHandoff, Accepted)


def _pair() -> tuple[socket.socket, socket.socket]:
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (rx, tx):
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    return rx, tx


class Inboxes:
    """The inboxes of all worker slots plus the master's (index ``master``), and each worker
    slot's hand-over lane (``lane_rx``/``lane_tx``)."""

    def __init__(self, slots: int) -> None:
        self.master = slots
        self.rx, self.tx = (list(ends) for ends in zip(*(_pair() for _ in range(slots + 1))))
        self.lane_rx, self.lane_tx = (list(ends) for ends in zip(*(_pair()
                                                                    for _ in range(slots))))

    def keep_only(self, index: int) -> None:
        """In a worker: close the receiving ends of every inbox and lane but its own."""
        for i, (rx, lane) in enumerate(zip(self.rx, self.lane_rx)):
            if i != index:
                rx.close()
                lane.close()
        self.rx[self.master].close()

    def send(self, index: int, message: Message, fds: list[int] = ()) -> bool:
        """Post ``message`` (and ``fds``) to inbox ``index`` — a hand-over to its lane;
        False when it is full."""
        data = _encoder.encode(message)
        if len(data) > MAX_DATAGRAM:
            raise ValueError("control message too large (%d bytes)" % len(data))
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        tx = self.lane_tx[index] if isinstance(message, HANDOVERS) else self.tx[index]
        try:
            tx.sendmsg([data], ancillary)
        except (BlockingIOError, InterruptedError):
            return False
        return True

    def receive(self, index: int, lane: bool = False) -> tuple[Message, list[int]] | None:
        """The next message of inbox ``index`` (``lane``: of its hand-over lane) and the fds
        that came with it, or None.

        A datagram that does not decode (a bug, never the normal case) is logged and dropped
        with its fds, so that no reader of an inbox can be stopped by one.
        """
        rx = self.lane_rx[index] if lane else self.rx[index]
        while True:
            try:
                data, ancdata, flags, _ = rx.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
            except (BlockingIOError, InterruptedError):
                return None
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            try:
                return _decoder.decode(data), fds
            except msgspec.DecodeError as exc:
                log.error("undecodable control message dropped: %s", exc)
                for fd in fds:
                    socket.close(fd)
