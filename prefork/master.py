"""The master process: listeners, worker spawn/reap/respawn, signals, reload, shutdown.

It runs no pooling code and imports no gevent. Its loop waits on a self-pipe that Python's
``signal.set_wakeup_fd`` writes signal numbers into, so signal handlers do nothing themselves
and every signal is acted on in :meth:`Master._on_signal` — the one place where the master
handles a signal. Signals follow PgBouncer 1.23+: TERM waits for clients, INT waits for
servers, QUIT exits at once; a second TERM/INT also exits at once; HUP reloads; USR1/USR2
pause and resume.

Reload (:meth:`Master.reload`): the whole configuration is read and validated first; an
invalid one changes nothing. A valid one gets a new epoch and goes to every worker in a memfd
(it may be large), each applies it in place and acknowledges; systemd hears RELOADING=1 and,
once every worker has acknowledged, READY=1. Settings that need a restart keep their old
value and are logged as such, as PgBouncer does.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import socket
import time

from ipc import channel, shm

import msgspec
import psutil

from . import listeners, log as plog, pidfile, statslog, systemd
from .config import Config, ConfigError, load_config
from .history import HistorySampler
from .settings import SETTINGS

log = logging.getLogger("pgherd")

TICK = 0.05  # seconds between housekeeping rounds: a stopped worker is noticed within this
CHECK_EVERY = 5.0  # seconds between memory checks and systemd STATUS lines
STABLE_AFTER = 5.0  # a worker that lived this long resets its crash back-off
MAX_BACKOFF = 10.0
# A dead worker's server connections stay counted this long: its backends may outlive it for a
# moment (a backend notices the closed socket only when its query ends), and a limit must
# never be exceeded as PostgreSQL sees it.
DEAD_SERVERS_GRACE = 1.0

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
           signal.SIGUSR1, signal.SIGUSR2)


class Slot:
    """A worker slot: its listeners outlive the processes that serve them.

    They are bound before the slot's first worker is spawned and closed only when the
    worker count shrinks below the slot; a slot wanted again is bound anew before its next
    worker is spawned, so no worker ever runs without its listeners."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.bound = False
        self.tcp: list[socket.socket] = []
        self.http: list[socket.socket] = []  # /metrics /health /ready listener (if configured)
        self.pid = 0
        self.generation = 0
        self.started = 0.0
        self.crashes = 0
        self.respawn_at = 0.0
        self.restarts = 0
        # drained on purpose (max_worker_memory, or shrunk away): replaced at once if the
        # slot is still wanted when its worker exits
        self.recycling = False
        self.stalled = False  # its heartbeat stopped: what is handed to it goes elsewhere

    def bind(self, config: Config) -> None:
        """Bind this slot's listeners, all or none (ListenError)."""
        tcp = listeners.bind_tcp(config)
        try:
            http = listeners.bind_http(config)
        except listeners.ListenError:
            for sock in tcp:
                sock.close()
            raise
        self.tcp, self.http, self.bound = tcp, http, True

    def close(self) -> None:
        for sock in self.tcp + self.http:
            sock.close()
        self.tcp = []
        self.http = []
        self.bound = False


#: Connections the master takes per tick from one stalled worker's listener.
ACCEPT_BATCH = 256


class Master:
    def __init__(self, config: Config, overrides: dict[str, str] | None = None,
                 verbose: int = 0, daemon: bool = False) -> None:
        self.config = config
        self.daemon = daemon
        self.overrides = overrides or {}
        self.verbose = verbose
        self.epoch = 0
        self.pending_acks: set[int] = set()
        self.reload_failures = 0
        self.reload_waiters: list[tuple[int, int]] = []  # (slot, req) asking for RELOAD
        self.state = channel.ServiceState()  # PAUSE, DISABLE...: survives worker respawns
        self.fan_outs: dict[int, tuple[tuple[int, int], set[int], list[str]]] = {}
        self._req = itertools.count(1)
        self.slots: list[Slot] = []
        self.unix: socket.socket | None = None
        self._next_check = 0.0
        self._status_mark = (time.monotonic(), 0)
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if os.environ.get("WATCHDOG_PID") not in (None, "", str(os.getpid())):
            watchdog_usec = 0  # meant for another process
        self._watchdog_every = watchdog_usec / 2e6
        self._next_watchdog = 0.0
        self.segment: shm.Segment | None = None
        self.inboxes: channel.Inboxes | None = None
        self.ghosts: list[tuple[float, dict[int, int]]] = []  # (release time, {row: servers})
        self.stopping: str | None = None  # None, "clients", "servers", "now"
        self.stop_deadline = 0.0
        self.ready_sent = False
        self.exit_code = 0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        s = self.config.settings
        pidfile.check(s.pidfile)
        # Workers inherit the mock-auth key drawn at import: one key for all of them, so an
        # unknown user sees the same SCRAM salt whichever worker the kernel picks.
        import workers.auth  # noqa: F401

        self.unix = listeners.bind_unix(self.config)
        try:
            listeners.check_free(self.config)
            for i in range(s.workers):
                self.slots.append(Slot(i))
                self.slots[i].bind(self.config)
        except listeners.ListenError:
            self._close_listeners()
            raise
        if self.daemon:
            _daemonize()  # after binding: a port in use is reported to the terminal
        self.segment = shm.Segment.create()
        self.statslog = statslog.StatsLogger(self.segment, s)
        # the status page's charts (http_listen_port needs a restart, so this one check holds)
        self.history = HistorySampler(self.segment) if s.http_listen_port else None
        self.inboxes = channel.Inboxes(shm.MAX_WORKERS)
        pidfile.write(s.pidfile)
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in SIGNALS:
            signal.signal(signum, _noop)
        log.info("pgherd master started: %d workers, listening on %s port %d%s",
                 s.workers, ",".join(s.listen_addr) or "(unix only)", s.listen_port,
                 (", unix socket " + listeners.unix_socket_path(self.config)) if self.unix else "")
        for slot in self.slots:
            self._spawn(slot)
        try:
            self._loop()
        finally:
            self._cleanup()
        return self.exit_code

    def _loop(self) -> None:
        mail = self.inboxes.rx[self.inboxes.master]
        while True:
            try:
                readable, _, _ = select.select([self._wake_r, mail], [], [], TICK)
            except InterruptedError:
                readable = [self._wake_r]
            if self._wake_r in readable:
                try:
                    for signum in os.read(self._wake_r, 512):
                        self._on_signal(signum)
                except BlockingIOError:
                    pass
            if mail in readable:
                self._read_mail()
            self._reap()
            self._rescue_stalled()
            self._release_ghosts()
            self.statslog.tick(time.monotonic(), self.config.settings)
            if self.history is not None:
                self.history.tick(time.monotonic())
            if self.stopping:
                if not any(slot.pid for slot in self.slots):
                    return
                if time.monotonic() >= self.stop_deadline:
                    log.warning("shutdown_timeout reached: killing remaining workers")
                    self._signal_workers(signal.SIGKILL)
                    self.stop_deadline = time.monotonic() + 5.0
                continue
            self._supervise()

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # reaping happens on every round
        if signum == signal.SIGHUP:
            if self.stopping:
                log.info("got SIGHUP while shutting down, ignoring")
            else:
                self.reload()
            return
        if signum in (signal.SIGUSR1, signal.SIGUSR2):
            if self.stopping:
                log.info("got %s while shutting down, ignoring", signal.Signals(signum).name)
                return
            name = "PAUSE" if signum == signal.SIGUSR1 else "RESUME"
            self.state.apply(name, "")
            self._broadcast(channel.Command(0, -1, name))
            return
        if signum == signal.SIGQUIT or self.stopping:
            self._stop("now", signal.SIGQUIT, 2.0)
        elif signum == signal.SIGTERM:
            self._stop("clients", signal.SIGTERM, self.config.settings.shutdown_timeout)
        elif signum == signal.SIGINT:
            self._stop("servers", signal.SIGINT, self.config.settings.shutdown_timeout)

    def _stop(self, mode: str, worker_signal: int, timeout: float) -> None:
        log.info("shutting down (%s)", {"now": "immediate", "clients": "waiting for clients",
                                        "servers": "waiting for servers"}[mode])
        if not self.stopping:
            systemd.notify("STOPPING=1")
        self.stopping = mode
        self.stop_deadline = time.monotonic() + (timeout or 1e9)
        # New connections are refused from now on, not queued in a listener nobody accepts on.
        self._close_listeners()
        self._signal_workers(worker_signal)

    # ------------------------------------------------------------------ reload

    def reload(self, requester: tuple[int, int] | None = None) -> bool:
        """Re-read everything; apply it live if valid, change nothing if not."""
        systemd.notify("RELOADING=1", "MONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
        try:
            new = load_config(self.config.path, self.overrides)
        except ConfigError as exc:
            # logrotate's reload must get a fresh log file even when the config is broken.
            plog.reopen(self.config.settings.logfile,
                        max(self.verbose, self.config.settings.verbose), self.config.settings)
            self.reload_failures += 1
            self.segment.reload_failures = self.reload_failures
            for problem in exc.problems:
                log.error("RELOAD failed: %s", problem)
            log.error("RELOAD failed: configuration unchanged")
            systemd.notify("READY=1", "STATUS=reload failed, old configuration in force")
            if requester is not None:
                self._reply(requester, "RELOAD failed, see logs for additional details")
            return False
        for problem in new.warnings:
            log.warning("%s", problem)
        self._apply(self._keep_restart_settings(new), requester)
        return True

    def _apply(self, new: Config, requester: tuple[int, int] | None) -> None:
        """A new configuration epoch for every worker (reload, or SET on the console)."""
        old_workers = self.config.settings.workers
        self.config = new
        self.epoch += 1
        self.segment.epoch = self.epoch
        plog.reopen(new.settings.logfile, max(self.verbose, new.settings.verbose), new.settings)
        fd = os.memfd_create("pgherd-config", os.MFD_CLOEXEC)
        try:
            os.write(fd, msgspec.msgpack.encode(new))
            self.pending_acks = set()
            for slot in self.slots:
                if slot.pid and slot.index < new.settings.workers:
                    if self.inboxes.send(slot.index, channel.Reload(self.epoch), [fd]):
                        self.pending_acks.add(slot.index)
                    else:
                        log.error("worker %d: control channel full, reload not delivered",
                                  slot.index)
        finally:
            os.close(fd)
        if requester is not None:
            self.reload_waiters.append(requester)
        log.info("RELOAD: configuration epoch %d sent to %d workers", self.epoch,
                 len(self.pending_acks))
        if new.settings.workers != old_workers:
            self._resize(old_workers, new.settings.workers)
        self._maybe_reloaded()

    def _keep_restart_settings(self, new: Config) -> Config:
        """Settings that need a restart keep their running value; say so once per change."""
        kept = {}
        for name, setting in SETTINGS.items():
            old_value = getattr(self.config.settings, name)
            if not setting.reload and getattr(new.settings, name) != old_value:
                log.warning("setting %s changed but needs a restart: keeping %s", name,
                            setting.render(old_value))
                kept[name] = old_value
        if not kept:
            return new
        settings = msgspec.structs.replace(new.settings, **kept)
        return msgspec.structs.replace(new, settings=settings)

    def _resize(self, old: int, new: int) -> None:
        """Live worker-count change: slots below ``new`` without a worker get one (and their
        listeners) from :meth:`_supervise`; the others drain and lose their listeners."""
        log.info("workers: %d -> %d", old, new)
        self.slots.extend(Slot(index) for index in range(len(self.slots), new))
        for slot in self.slots[new:]:
            if slot.pid:  # moves its clients to slots below ``new``, then exits
                self.inboxes.send(slot.index, channel.Command(0, -1, "DRAIN", str(new)))
                slot.recycling = True
            slot.close()

    def _read_mail(self) -> None:
        while True:
            got = self.inboxes.receive(self.inboxes.master)
            if got is None:
                return
            message, fds = got
            for fd in fds:
                os.close(fd)
            if isinstance(message, channel.Ack):
                if message.error:
                    log.error("worker %d could not apply epoch %d: %s", message.slot,
                              message.epoch, message.error)
                if message.epoch == self.epoch:
                    self.pending_acks.discard(message.slot)
                    self._maybe_reloaded()
            elif isinstance(message, channel.Command):
                self._on_command(message)
            elif isinstance(message, channel.Reply):
                self._fan_in(message.req, message.slot, message.error)

    def _on_command(self, command: channel.Command) -> None:
        """Console commands for the whole service; the one place where they are routed."""
        requester = (command.reply_to, command.req)
        name, arg = command.name, command.arg
        if name == "RELOAD":
            self.reload(requester)
        elif name == "SET":
            self._set(requester, arg)
        elif name == "SHUTDOWN":
            mode = {"": "now", "WAIT_FOR_CLIENTS": "clients", "WAIT_FOR_SERVERS": "servers"}
            how = mode.get(arg, "now")
            self._reply(requester, "")
            self._stop(how, {"now": signal.SIGQUIT, "clients": signal.SIGTERM,
                             "servers": signal.SIGINT}[how],
                       2.0 if how == "now" else self.config.settings.shutdown_timeout)
        elif name == "KILL_CLIENT":
            slot = int(arg) % shm.MAX_WORKERS
            live = [s.index for s in self.slots if s.pid and s.index == slot]
            if not live:
                self._reply(requester, "client not found")
            else:
                self._fan_out(requester, name, arg, live)
        elif name in ("PAUSE", "RESUME", "DISABLE", "ENABLE", "KILL", "RECONNECT",
                      "WAIT_CLOSE"):
            self.state.apply(name, arg)
            self._fan_out(requester, name, arg, [s.index for s in self.slots if s.pid])
        else:
            self._reply(requester, "unknown command %s" % name)

    def _set(self, requester: tuple[int, int], assignment: str) -> None:
        """SET key = value: a reloadable setting changes for every worker at once."""
        key, _, raw = assignment.partition("=")
        setting = SETTINGS.get(key)
        try:
            if setting is None:
                raise ValueError("unknown setting")
            value = setting.parse(raw)
        except ValueError as exc:
            log.error("SET %s failed: %s", key, exc)
            self._reply(requester, "SET failed")
            return
        if not setting.reload:
            log.warning("SET %s: needs a restart, ignored", key)  # PgBouncer accepts these
            self._reply(requester, "")
            return
        self._apply(self.config.with_setting(key, value), requester)

    def _fan_out(self, requester: tuple[int, int], name: str, arg: str,
                 slots: list[int]) -> None:
        """Send a command to workers; answer the requester once every one has replied."""
        if not slots:
            self._reply(requester, "")
            return
        req = next(self._req)
        self.fan_outs[req] = (requester, set(slots), [])
        for slot in slots:
            if not self.inboxes.send(slot, channel.Command(req, self.inboxes.master, name, arg)):
                self._fan_in(req, slot, "worker %d: control channel full" % slot)

    def _fan_in(self, req: int, slot: int, error: str) -> None:
        entry = self.fan_outs.get(req)
        if entry is None:
            return
        requester, waiting, errors = entry
        waiting.discard(slot)
        if error and error not in errors:
            errors.append(error)
        if not waiting:
            del self.fan_outs[req]
            self._reply(requester, "; ".join(errors))

    def _reply(self, requester: tuple[int, int], error: str) -> None:
        slot, req = requester
        self.inboxes.send(slot, channel.Reply(req, self.inboxes.master, error))

    def _maybe_reloaded(self) -> None:
        live = {slot.index for slot in self.slots if slot.pid}
        self.pending_acks &= live
        if self.pending_acks:
            return
        systemd.notify("READY=1", "STATUS=%d workers serving, configuration epoch %d" % (
            len(live), self.epoch))
        for requester in self.reload_waiters:
            self._reply(requester, "")
        self.reload_waiters = []

    def _broadcast(self, message: channel.Message) -> None:
        for slot in self.slots:
            if slot.pid and not self.inboxes.send(slot.index, message):
                log.error("worker %d: control channel full, %s not delivered", slot.index,
                          type(message).__name__)

    def _signal_workers(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, signum)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ workers

    def _spawn(self, slot: Slot) -> None:
        slot.generation += 1
        self.segment.reset(slot.index, generation=slot.generation, state=shm.STARTING,
                           restarts=slot.restarts, started_ns=time.monotonic_ns(),
                           heartbeat_ns=time.monotonic_ns(), epoch=self.epoch)
        master_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # child
            self._become_worker(slot, master_pid)
        slot.pid = pid
        slot.started = time.monotonic()
        self.segment.write(slot.index, pid=pid)
        log.info("worker %d started (pid %d)", slot.index, pid)  # the [pid] of its lines

    def _become_worker(self, slot: Slot, master_pid: int) -> None:
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            # A session of its own, as every PostgreSQL backend has: with scheduler
            # autogroups (on in Debian's kernels) CPU is shared out per session first, so all
            # workers in the master's session would together get what one backend gets. A
            # terminal's Ctrl-C still reaches the master, which relays signals to workers,
            # and PR_SET_PDEATHSIG (workers/worker.py) ties each worker's life to the master.
            os.setsid()
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            os.close(self._wake_r)
            for other in self.slots:
                if other is not slot:
                    for sock in other.tcp + other.http:
                        sock.close()
            import setproctitle

            setproctitle.setproctitle("pgherd: worker %d" % slot.index)
            from workers.worker import run

            socks = list(slot.tcp) + ([self.unix] if self.unix else [])
            run(slot.index, self.config, self.epoch, self.state, self.segment, self.inboxes,
                socks, slot.http, master_pid)
        except BaseException:
            log.exception("worker %d could not start", slot.index)
        finally:
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            for req in list(self.fan_outs):  # a dead worker will not answer
                self._fan_in(req, slot.index, "")
            # Its share of every shared count is reclaimed before the slot can be reused.
            held = self.segment.retire_worker(slot.index)
            if held:
                self.ghosts.append((time.monotonic() + DEAD_SERVERS_GRACE, held))
            self.segment.reset(slot.index, generation=slot.generation, restarts=slot.restarts)
            if self.stopping:
                continue
            if os.WIFSIGNALED(status):
                how = "killed by signal %s" % signal.Signals(os.WTERMSIG(status)).name
            else:
                how = "exited with status %d" % os.WEXITSTATUS(status)
            lived = time.monotonic() - slot.started
            if slot.index >= self.config.settings.workers:
                slot.recycling = False
                log.info("worker %d (pid %d) exited: fewer workers configured", slot.index, pid)
                self._salvage_inbox(slot.index)
                continue
            if slot.recycling:
                slot.recycling = False
                slot.respawn_at = 0.0
                log.info("worker %d (pid %d) drained after %.0fs; replacing it", slot.index,
                         pid, lived)
                continue
            slot.crashes = 0 if lived > STABLE_AFTER else slot.crashes + 1
            delay = 0.0 if slot.crashes <= 1 else min(0.1 * 2 ** slot.crashes, MAX_BACKOFF)
            slot.respawn_at = time.monotonic() + delay
            log.warning("worker %d (pid %d) %s after %.1fs; respawning%s", slot.index, pid, how,
                        lived, " in %.1fs" % delay if delay else "")

    def _watchdog(self, now: float, now_ns: int) -> None:
        """WATCHDOG=1 for systemd's WatchdogSec, only while every worker's heartbeat is fresh:
        a hung worker the master cannot fix should become systemd's problem."""
        if not self._watchdog_every or now < self._next_watchdog:
            return
        limit = self.config.settings.heartbeat_timeout * 1e9
        for slot in self.slots:
            if slot.pid and now_ns - self.segment.read(slot.index).heartbeat_ns > limit:
                return
        self._next_watchdog = now + self._watchdog_every
        systemd.notify("WATCHDOG=1")

    def _status(self) -> None:
        slots = [self.segment.read(s.index) for s in self.slots if s.pid]
        xacts = sum(r.totals["xact_count"] for r in self.segment.snapshot_rows()
                    if r.kind == shm.POOL)
        now = time.monotonic()
        tps = (xacts - self._status_mark[1]) / max(now - self._status_mark[0], 1e-3)
        self._status_mark = (now, xacts)
        systemd.notify("STATUS=%d workers, %d clients, %d servers, %.0f tps" % (
            len(slots), sum(w.clients for w in slots), sum(w.servers for w in slots), tps))

    def _check_memory(self) -> None:
        """max_worker_memory: recycle a worker above it gracefully — it hands its clients to
        the others and exits, then is replaced — one at a time, never the last one."""
        limit = self.config.settings.max_worker_memory * 1024 * 1024
        live = [s for s in self.slots if s.pid]
        if not limit or len(live) < 2 or any(s.recycling for s in live):
            return
        for slot in live:
            try:
                rss = psutil.Process(slot.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                log.warning("worker %d (pid %d) uses %d MiB > max_worker_memory %d MiB: "
                            "recycling it", slot.index, slot.pid, rss >> 20,
                            self.config.settings.max_worker_memory)
                slot.recycling = True
                self.inboxes.send(slot.index, channel.Command(
                    0, -1, "DRAIN", str(self.config.settings.workers)))
                return

    def _salvage_inbox(self, index: int) -> None:
        """A slot that will not be served again may still hold connections (a client or
        server handed to it as it drained, a cancel's connection): pass the hand-overs on to
        a live worker; hang up the rest."""
        while (got := self.inboxes.receive(index)) is not None:
            for fd in got[1]:
                os.close(fd)
        self._pass_on(index, self._runnable())

    def _runnable(self) -> list[int]:
        """Worker slots that run now: alive, wanted, heartbeat fresh."""
        now_ns = time.monotonic_ns()
        return [s.index for s in self.slots if s.pid and s.index < self.config.settings.workers
                and not self.segment.stalled(s.index, now_ns)]

    def _rescue_stalled(self) -> None:
        """A worker that stopped running (SIGSTOP, a blocking bug) must not sit on servers
        and clients the others handed it: within a tick they go back to their sender or on to
        a worker that runs. The others stop handing it anything by the same heartbeat."""
        now_ns = time.monotonic_ns()
        runnable = None
        for slot in self.slots:
            if not slot.pid:
                continue
            if not self.segment.stalled(slot.index, now_ns):
                if slot.stalled:
                    slot.stalled = False
                    log.info("worker %d (pid %d) is running again", slot.index, slot.pid)
                continue
            if self.segment.read(slot.index).state != shm.READY:
                continue  # starting: no heartbeat yet, and nothing handed to it either
            if not slot.stalled:
                slot.stalled = True
                log.warning("worker %d (pid %d) stopped running (no heartbeat for %d ms): "
                            "its hand-overs go to the other workers", slot.index, slot.pid,
                            shm.STALLED_AFTER_NS // 1_000_000)
            if runnable is None:
                runnable = self._runnable()
            self._pass_on(slot.index, runnable)
            self._accept_for(slot, runnable)

    def _accept_for(self, slot: Slot, runnable: list[int]) -> None:
        """New connections the kernel queued on a stalled worker's listeners go to workers
        that run (a bounded batch per tick); when it runs again it accepts them itself."""
        if not runnable:
            return
        turn = 0
        for lsock in slot.tcp:
            for _ in range(ACCEPT_BATCH):
                try:
                    fd, _addr = lsock._accept()
                except OSError:  # nothing queued (or a transient error: next tick)
                    break
                target = runnable[turn % len(runnable)]
                turn += 1
                if not self.inboxes.send(target, channel.Accepted(lsock.family), [fd]):
                    log.warning("worker %d: a new connection could not be passed on", target)
                os.close(fd)  # the worker got its own copy

    def _pass_on(self, index: int, runnable: list[int]) -> None:
        """Move the hand-overs waiting in slot ``index``'s lane to runnable workers: a server
        back to the worker that sent it, a client to any. One that finds no taker stays (or
        is hung up if its slot is gone for good)."""
        gone = index >= self.config.settings.workers
        for turn in itertools.count():
            got = self.inboxes.receive(index, lane=True)
            if got is None:
                return
            message, fds = got
            targets = runnable
            if isinstance(message, channel.Handoff) and message.from_slot in runnable:
                targets = [message.from_slot]
            moved = bool(targets) and self.inboxes.send(targets[turn % len(targets)], message,
                                                        fds)
            back = not moved and not gone and self.inboxes.send(index, message, fds)
            for fd in fds:
                os.close(fd)  # sent ones travel on as copies; the rest are hung up
            if back:
                return  # no taker now: the next tick tries again
            if not moved:
                log.warning("worker %d: a connection handed to it was closed", index)

    def _bind(self, slot: Slot, now: float) -> bool:
        """A slot's listeners before its worker is spawned (a new slot, or one shrunk away
        and wanted again); a failure is retried a second later."""
        if slot.bound:
            return True
        try:
            slot.bind(self.config)
        except listeners.ListenError as exc:
            log.error("worker %d cannot start: %s", slot.index, exc)
            slot.respawn_at = now + 1.0
            return False
        return True

    def _release_ghosts(self) -> None:
        now = time.monotonic()
        while self.ghosts and self.ghosts[0][0] <= now:
            _, held = self.ghosts.pop(0)
            for row, servers in held.items():
                self.segment.release_ghost(row, servers)

    def _supervise(self) -> None:
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        all_ready = True
        wanted = self.config.settings.workers
        for slot in self.slots:
            if not slot.pid:
                if slot.index >= wanted:
                    continue  # shrunk away by a reload
                all_ready = False
                if now >= slot.respawn_at and self._bind(slot, now):
                    slot.restarts += 1
                    self._spawn(slot)
                continue
            state = self.segment.read(slot.index)
            if state.state != shm.READY:
                all_ready = False
            if (now_ns - state.heartbeat_ns) / 1e9 > self.config.settings.heartbeat_timeout:
                log.error("worker %d (pid %d) missed its heartbeat for %.0fs: killing it",
                          slot.index, slot.pid, (now_ns - state.heartbeat_ns) / 1e9)
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._watchdog(now, now_ns)
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY
            self._check_memory()
            self._status()
        if all_ready and not self.ready_sent and not self.pending_acks:
            self.ready_sent = True
            log.info("all %d workers ready", len(self.slots))
            systemd.notify("READY=1", "STATUS=%d workers serving" % len(self.slots),
                           "MAINPID=%d" % os.getpid())

    # ------------------------------------------------------------------ teardown

    def _close_listeners(self) -> None:
        for slot in self.slots:
            slot.close()
        if self.unix is not None:
            self.unix.close()
            self.unix = None
            path = listeners.unix_socket_path(self.config)
            try:
                os.unlink(path)
            except OSError:
                pass

    def _cleanup(self) -> None:
        self._signal_workers(signal.SIGKILL)
        for slot in self.slots:
            if slot.pid:
                try:
                    os.waitpid(slot.pid, 0)
                except ChildProcessError:
                    pass
        self._close_listeners()
        pidfile.remove(self.config.settings.pidfile)
        log.info("pgherd master exiting")


def _daemonize() -> None:
    """Detach like PgBouncer's -d: double fork, new session, stdio to /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _noop(signum: int, frame: object) -> None:
    """Signals are read from the wakeup fd; the handler only has to exist."""
