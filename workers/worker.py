"""A worker process: its gevent hub, its listeners, its pools, clients and housekeeping.

``run()`` is what the master calls in a freshly forked child. The master imports no gevent,
so the hub is created here, after the fork, and no ``gevent.reinit()`` is needed.

Where a signal is handled in a worker: :meth:`Worker._install_signals` — SIGTERM waits for
clients to leave (PgBouncer's WAIT_FOR_CLIENTS), SIGINT for servers to be released
(WAIT_FOR_SERVERS), SIGQUIT exits at once. The master relays these; workers never decide
on their own to stop.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, NoReturn

import gevent
import gevent.event
import msgspec

from ipc import channel, shm
from prefork import log as plog
from prefork.config import Config

from .exchange import Exchange
from .limits import Limits
from .login import Login, forward_cancel
from .pool import Pool
from .relay import Client, Server
from .varcache import Tracked

if TYPE_CHECKING:
    from prefork.config import Database

log = logging.getLogger("pgherd")
_monotonic = time.monotonic

HOUSEKEEPING_PERIOD = 0.25  # janitor + heartbeat, seconds
PR_SET_PDEATHSIG = 1
CLOSE_WAIT = 10  # seconds a closed server stays counted at most, waiting for its backend


class Worker:
    """Everything one worker process owns."""

    def __init__(self, slot: int, config: Config, epoch: int, state: channel.ServiceState,
                 segment: shm.Segment, inboxes: channel.Inboxes,
                 listeners: list[socket.socket]) -> None:
        self.slot = slot
        self.segment = segment
        self.listeners = listeners
        self.loop = gevent.get_hub().loop
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients: dict[int, Client] = {}
        self.cancel_keys: dict[tuple[int, int], Client] = {}
        self._entropy = memoryview(b"")  # os.urandom read ahead for cancel keys
        self.auto_databases: dict[str, Database] = {}
        self.closing: dict = {}  # Server -> when its Terminate was sent (see Server.close)
        # Server -> until when it may drain, and until when it may stay silent meanwhile
        # (Server.client_left)
        self.drains: dict = {}
        self.handshakes: dict = {}  # Login -> its deadline, while no greenlet enforces it
        self.unauthenticated: dict = {}  # Login -> admitted at; a place, no auth yet; oldest first
        # SHOW STATS averages: per database, the last stats_period (every worker computes
        # the same from shared memory at the same wall-clock boundaries).
        self.averages: dict[str, list[float]] = {}
        self._stats_mark: tuple[int, dict[str, list[int]]] | None = None
        self.logins = 0
        self.admins: dict = {}  # console sessions (admin.AdminSession) by client id
        self.admin_stats = [0] * len(shm.STAT_FIELDS)  # the admin pool's, as PgBouncer's
        self.draining = False
        self.drainer = None  # a migrate.Drain while this worker moves its clients away
        self.state = state  # PAUSE/DISABLE/KILL as the master told every worker
        self.apply_config(config, epoch)
        self.limits = Limits(self)
        self.exchange = Exchange(self, inboxes)
        self.exchange.on(channel.Reload, self._on_reload)
        self.exchange.on(channel.Command, self._on_command)
        self._ids = itertools.count(1)
        self._hosts: dict[str, itertools.count] = {}
        self._accepting: list = []
        self.stopped = gevent.event.Event()

    def apply_config(self, config: Config, epoch: int) -> None:
        self.config = config
        self.config_epoch = epoch
        self.settings = config.settings
        self.tracked = Tracked(config.settings.track_extra_parameters)

    # ------------------------------------------------------------------ reload

    def _on_reload(self, message: channel.Reload, fds: list[int]) -> None:
        error = ""
        try:
            size = os.fstat(fds[0]).st_size
            config = msgspec.msgpack.decode(os.pread(fds[0], size, 0), type=Config)
            self.reload(config, message.epoch)
        except Exception as exc:  # the old configuration stays in force
            log.exception("worker %d could not apply configuration epoch %d", self.slot,
                          message.epoch)
            error = str(exc) or type(exc).__name__
        finally:
            for fd in fds:
                os.close(fd)
        self.exchange.post(self.exchange.inboxes.master, channel.Ack(message.epoch, self.slot,
                                                                     error))

    def reload(self, config: Config, epoch: int) -> None:
        """Apply a new configuration in place: no client is dropped for it.

        Pools re-derive modes and sizes; servers of a database whose connection settings
        changed are replaced as they are released (PgBouncer's close_needed); clients of a
        removed database are disconnected ("database removed").
        """
        old = self.config
        self.apply_config(config, epoch)
        plog.reopen(config.settings.logfile, config.settings.verbose, config.settings)
        self.auto_databases = {}
        for key, pool in list(self.pools.items()):
            db = self.database(pool.dbname)
            if db is None:
                pool.kill("database removed")
                del self.pools[key]
                continue
            if _connection(db) != _connection(pool.db):
                pool.mark_close_needed()
            pool.db = db
            pool.password = db.password or config.userlist.get(pool.user)
            pool.apply_config()
            pool.trim()
        if old.settings.max_client_conn != config.settings.max_client_conn:
            log.info("max_client_conn is now %d", config.settings.max_client_conn)
        self._publish_slot()
        log.info("worker %d: configuration epoch %d applied", self.slot, epoch)

    # ------------------------------------------------------------------ commands

    def _on_command(self, command: channel.Command, fds: list[int]) -> None:
        gevent.spawn(self._run_command, command)

    def _run_command(self, command: channel.Command) -> None:
        """A console command the master relays to every worker (the console checked it)."""
        name, arg = command.name, command.arg
        error = ""
        if name in ("PAUSE", "RESUME", "DISABLE", "ENABLE", "KILL"):
            self.state.apply(name, arg)
            self.segment.write(self.slot, paused=int(self.state.paused or
                                                     bool(self.state.paused_dbs)))
        pools = [p for p in self.pools.values() if not arg or p.dbname == arg]
        if name == "PAUSE":
            for pool in pools:
                pool.close_idle_all("pause")
            # PAUSE answers once no server of the paused pools is in use any more.
            while self.is_paused(arg) and any(p.servers for p in pools):
                gevent.sleep(0.02)
        elif name == "RESUME":
            for pool in self.pools.values():
                pool.full_until = 0.0
                if pool.waiting:
                    pool.grow()
        elif name == "KILL":
            for pool in pools:
                pool.kill("database removed")
        elif name == "RECONNECT":
            for pool in pools:
                pool.mark_close_needed()
        elif name == "WAIT_CLOSE":
            while any(s.close_needed for p in pools for s in p.servers):
                gevent.sleep(0.02)
        elif name == "DRAIN":
            self.drain(int(arg) if arg else self.settings.workers)
        elif name == "KILL_CLIENT":
            client = self.clients.get(int(arg))
            if client is None:
                error = "client not found"
            else:
                client.disconnect("admin forced disconnect", error="admin forced disconnect")
        elif name not in ("DISABLE", "ENABLE"):
            error = "unknown command %s" % name
        log.info("worker %d: %s %s done", self.slot, name, arg)
        if command.reply_to >= 0:
            self.exchange.post(command.reply_to, channel.Reply(command.req, self.slot, error))

    def drain(self, keep: int) -> None:
        """Stop accepting and move every client to the workers of slots below ``keep`` (the
        worker count after this drain), then exit."""
        if self.draining:
            return
        from .migrate import Drain

        self.draining = True
        self._stop_accepting()
        self.publish(shm.DRAINING)
        self.drainer = Drain(self, keep)
        gevent.spawn(self.drainer.run)

    def is_paused(self, dbname: str) -> bool:
        return self.state.paused or dbname in self.state.paused_dbs

    def is_disabled(self, dbname: str) -> bool:
        return dbname in self.state.disabled_dbs

    # ------------------------------------------------------------------ lookups and ids

    def next_id(self) -> int:
        """Connection ids unique across the service: the low bits name the worker slot."""
        return next(self._ids) * shm.MAX_WORKERS + self.slot

    def next_host_index(self, dbname: str) -> int:
        counter = self._hosts.get(dbname)
        if counter is None:
            counter = self._hosts[dbname] = itertools.count()
        return next(counter)

    def database(self, name: str) -> Database | None:
        db = self.config.databases.get(name)
        if db is not None:
            return db
        db = self.auto_databases.get(name)
        if db is None and "*" in self.config.databases:
            db = msgspec.structs.replace(self.config.databases["*"], name=name)
            self.auto_databases[name] = db
            log.info("registered new auto-database: db=%s", name)
        return db

    def pool_for(self, db: Database, user: str,
                 rows: tuple[int, int, int] | None = None) -> Pool:
        """This worker's pool of (db, user); a new one finds its shared rows first, which
        may wait for the admission lock unless ``rows`` are known (greenlet context)."""
        key = (db.name, user)
        pool = self.pools.get(key)
        if pool is None:
            password = db.password or self.config.userlist.get(user)
            pool = Pool(self, db, user, password)
            if rows is None:
                self.limits.ensure_rows(pool)
            else:
                pool.rows = rows
            pool = self.pools.setdefault(key, pool)  # another greenlet may have won
        return pool

    def client_count(self) -> int:
        return self.logins + len(self.clients)

    # ------------------------------------------------------------------ clients

    def new_cancel_key(self, client: Client, pid: int = 0) -> tuple[int, int]:
        """BackendKeyData for ``client``: the pid of its own backend (session mode), else one
        made up with this worker's slot in its top bits (where a CancelRequest is tried
        first, see :meth:`cancel`); and a secret of pgherd's own, always."""
        while True:
            if len(self._entropy) < 7:  # one getrandom() per 512 keys, not one per login
                self._entropy = memoryview(os.urandom(7 * 512))
            rand = int.from_bytes(self._entropy[:7], "big")
            self._entropy = self._entropy[7:]
            key = (pid or (self.slot << 24) | (rand >> 32), rand & 0xFFFFFFFF)
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                return key

    def client_ready(self, client: Client) -> None:
        self.clients[client.id] = client
        client.pool.clients.add(client)

    def client_gone(self, client: Client) -> None:
        self.clients.pop(client.id, None)
        self.cancel_keys.pop(client.cancel_key, None)
        self.limits.client_closed()

    def cancel(self, pid: int, key: int, request: socket.socket | None, tried: int = 0) -> None:
        """A CancelRequest, on whichever worker the kernel handed it: passed from worker to
        worker (``tried``: a bit per slot asked) until the client's own serves it. A made-up
        pid names the slot to try first; a session-mode client's is its backend's real pid.
        ``request`` is the connection it came on; it is closed when the cancel is done."""
        tried |= 1 << self.slot
        if (pid, key) in self.cancel_keys or (
                self.drainer is not None and (pid, key) in self.drainer.moved):
            self.cancel_local(pid, key, request)
            return
        live = self.exchange.live_slots()
        hint = pid >> 24
        untried = ([hint] if hint in live and not tried >> hint & 1 else []) + [
            slot for slot in live if not tried >> slot & 1]
        if not untried:
            log.info("cancel request for unknown key, ignored")
            if request is not None:
                request.close()
            return
        self.exchange.relay_cancel(untried[0], pid, key, request, tried)

    def cancel_local(self, pid: int, key: int, request: socket.socket | None = None) -> None:
        """Forward a cancel to the backend running that client's query, if it runs one."""
        client = self.cancel_keys.get((pid, key))
        server = client.server if client is not None else None
        if client is None and self.drainer is not None and \
                self.drainer.forward_cancel(pid, key, request):
            return
        if client is None:
            log.info("cancel request for unknown key, ignored")
        elif (server is None or server.internal is not None
              or (server.expect <= 0 and not client.fs.ext_open)):
            # PgBouncer: never cancel whatever a reused server may be running by now. A
            # server is this client's while it owes a ReadyForQuery or extended-protocol
            # messages wait for their Sync (a batch ended by Flush runs without one).
            log.info("%s cancel request for idle client, ignored", client.label())
        else:
            self.cancel_server(server, request)
            return
        if request is not None:
            request.close()

    def cancel_server(self, server: Server, request: socket.socket | None = None) -> None:
        """Cancel what ``server``'s backend runs now (in the background; never fails)."""
        server.cancels += 1  # now: the query may end before the greenlet runs
        gevent.spawn(forward_cancel, self, server, request)

    # ------------------------------------------------------------------ accepting

    def start(self) -> None:
        for lsock in self.listeners:
            lsock.setblocking(False)
            watcher = self.loop.io(lsock.fileno(), 1)
            self._accepting.append(watcher)
        self._resume_accepting()
        timer = self.loop.timer(HOUSEKEEPING_PERIOD, HOUSEKEEPING_PERIOD)
        timer.start(self._housekeeping)
        self._timer = timer
        # Its own timer: the others judge by it within ~0.1 s whether this worker still runs.
        beat = self.loop.timer(0, shm.HEARTBEAT_PERIOD)
        beat.start(self._beat)
        self._beat_timer = beat
        self.exchange.start()
        self._install_signals()
        self.publish(shm.READY)

    def _accept(self, lsock: socket.socket, family: int) -> None:
        """One connection per wakeup: the listener stays readable while more wait, and not
        trying again saves a failed accept() per connection (and keeps bursts fair).

        ``_accept`` and a socket made from the descriptor, rather than ``accept()``, which
        converts family and type to enums twice per connection."""
        try:
            fd, addr = lsock._accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it (the Unix socket is shared)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept() failed: %s; pausing for a second", exc.strerror)
                self._pause_accepting(1.0)
            return
        self.serve_accepted(socket.socket(family, socket.SOCK_STREAM, 0, fd), addr)

    def serve_accepted(self, sock: socket.socket, addr=None) -> None:
        """A new connection, from our listener or one the master took from a stalled
        worker's (``addr`` unknown then): its login starts."""
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            peer = ("unix", self.settings.listen_port)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.settings.tcp_keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            addr = addr or sock.getpeername()
            peer = (addr[0], addr[1])
        Login(self, sock, peer, self.next_id()).start()

    def _pause_accepting(self, seconds: float) -> None:
        for watcher in self._accepting:
            watcher.stop()
        gevent.spawn_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if not self.draining:
            for watcher, lsock in zip(self._accepting, self.listeners):
                watcher.start(self._accept, lsock, int(lsock.family))

    # ------------------------------------------------------------------ housekeeping

    def _housekeeping(self) -> None:
        now = _monotonic()
        try:
            for pool in list(self.pools.values()):
                pool.janitor(now)
            for login, deadline in list(self.handshakes.items()):
                if now > deadline:
                    login.timed_out()
            for server, (until, quiet_until) in list(self.drains.items()):
                if now > until:
                    server.close("client disconnect while server was not ready "
                                 "(not drained within cancel_wait_timeout)")
                elif now > quiet_until:
                    server.close("client disconnect while server was not ready "
                                 "(silent while drained)")
            for server, since in list(self.closing.items()):
                if now - since > CLOSE_WAIT:
                    log.warning("%s backend did not end within %ds of Terminate; "
                                "no longer counted", server.label(), CLOSE_WAIT)
                    server.gone()
            self._stats_period()
        except Exception:
            log.exception("janitor failed")
        self._publish_slot()

    def _beat(self) -> None:
        self.segment.beat(self.slot, time.monotonic_ns())

    def _stats_period(self) -> None:
        period = max(self.settings.stats_period, 1)
        bucket = int(time.time() // period)
        if self._stats_mark is not None and self._stats_mark[0] == bucket:
            return
        totals: dict[str, list[int]] = {}
        for row in self.segment.snapshot_rows():
            if row.kind == shm.POOL:
                acc = totals.setdefault(row.names[0], [0] * len(shm.STAT_FIELDS))
                for i, name in enumerate(shm.STAT_FIELDS):
                    acc[i] += row.totals[name]
        if self._stats_mark is not None:
            self.averages = {db: _averages(self._stats_mark[1].get(db), now, period)
                             for db, now in totals.items()}
        self._stats_mark = (bucket, totals)

    def publish(self, state: int | None = None) -> None:
        """Write this worker's counts and every pool's cell to shared memory."""
        for pool in self.pools.values():
            pool.publish()
        self._publish_slot(state)

    def _publish_slot(self, state: int | None = None) -> None:
        fields = dict(heartbeat_ns=time.monotonic_ns(), logins=self.logins,
                      servers=sum(len(p.servers) for p in self.pools.values()),
                      waiting=sum(len(p.waiting) for p in self.pools.values()),
                      epoch=self.config_epoch)
        if state is not None:
            fields["state"] = state
        self.segment.write(self.slot, **fields)

    def admin_rows(self, what: str) -> list[list]:
        """This worker's rows of a SHOW command that lists connections (admin gathers)."""
        from .admin import local_rows

        return local_rows(self, what)

    # ------------------------------------------------------------------ shutdown

    def _install_signals(self) -> None:
        gevent.signal_handler(signal.SIGTERM, self.shutdown, "clients")
        gevent.signal_handler(signal.SIGINT, self.shutdown, "servers")
        gevent.signal_handler(signal.SIGQUIT, self.exit_now)
        # Reload arrives over the control channel; a stray SIGHUP must not kill a worker.
        gevent.signal_handler(signal.SIGHUP, lambda: None)

    def _stop_accepting(self) -> None:
        for watcher in self._accepting:
            watcher.stop()
        for lsock in self.listeners:
            lsock.close()  # ours only: the master keeps the slot's listener for a successor

    def shutdown(self, wait_for: str) -> None:
        """Stop accepting; exit once no client is left ("clients") or no server is in use."""
        if self.draining:
            self.exit_now()
            return
        self.draining = True
        log.info("worker %d shutting down: waiting for %s", self.slot, wait_for)
        self._stop_accepting()
        self.publish(shm.DRAINING)
        gevent.spawn(self._drain, wait_for)

    def _drain(self, wait_for: str) -> None:
        while True:
            if wait_for == "clients":
                done = self.client_count() == 0
            else:
                done = not any(s.client is not None for p in self.pools.values()
                               for s in p.servers)
            if done:
                break
            gevent.sleep(0.05)
        self.exit_now()

    def exit_now(self) -> None:
        for client in list(self.clients.values()):
            client.disconnect("server shutting down", error="server shutting down")
        for pool in self.pools.values():
            for server in list(pool.servers):
                server.close("server shutting down")
        self.stopped.set()


_F = {name: i for i, name in enumerate(shm.STAT_FIELDS)}


def _averages(before: list[int] | None, now: list[int], period: int) -> list[float]:
    """PgBouncer's averages: counts and bytes per second; times per transaction, per query,
    per server assignment."""
    before = before or [0] * len(now)
    delta = [b - a for a, b in zip(before, now)]
    out = [d / period for d in delta]
    for time_field, count_field in (("xact_time", "xact_count"), ("query_time", "query_count"),
                                    ("wait_time", "server_assignment_count")):
        count = delta[_F[count_field]]
        out[_F[time_field]] = delta[_F[time_field]] / count if count else 0.0
    return out


def _connection(db: Database) -> tuple:
    """What a server connection depends on: a change means replacing the servers."""
    return (db.host, db.port, db.dbname, db.user, db.password, db.connect_query,
            db.client_encoding, db.datestyle, db.timezone, db.application_name)


def _die_with_parent(master_pid: int) -> None:
    """No worker may outlive the master: the kernel kills us if it dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != master_pid:  # it died before prctl took effect
        os._exit(1)


def run(slot: int, config: Config, epoch: int, state: channel.ServiceState,
        segment: shm.Segment, inboxes: channel.Inboxes, listeners: list[socket.socket],
        http_listeners: list[socket.socket], master_pid: int) -> NoReturn:
    """Entry point of a worker process, called right after fork()."""
    code = 0
    try:
        _die_with_parent(master_pid)
        segment.attach()
        inboxes.keep_only(slot)
        worker = Worker(slot, config, epoch, state, segment, inboxes, listeners)
        worker.start()
        if http_listeners:
            from .http import serve

            serve(worker, http_listeners)
        worker.stopped.wait()
    except BaseException:
        log.exception("worker %d failed", slot)
        code = 70
    finally:
        logging.shutdown()
    os._exit(code)
