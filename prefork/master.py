"""The master process: listeners, worker spawn/reap/respawn, signals, shutdown, readiness.

It runs no pooling code and imports no gevent. Its loop waits on a self-pipe that Python's
``signal.set_wakeup_fd`` writes signal numbers into, so signal handlers do nothing themselves
and every signal is acted on in :meth:`Master._on_signal` — the one place where the master
handles a signal. Signals follow PgBouncer 1.23+: TERM waits for clients, INT waits for
servers, QUIT exits at once; a second TERM/INT also exits at once.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time

from ipc import channel, shm

from . import listeners, log as plog, pidfile, systemd
from .config import Config

log = logging.getLogger("pgherd")

TICK = 0.25  # seconds between housekeeping rounds when no signal arrives
HEARTBEAT_LIMIT = 10.0  # a worker silent this long is hung: killed and replaced
STABLE_AFTER = 5.0  # a worker that lived this long resets its crash back-off
MAX_BACKOFF = 10.0
# A dead worker's server connections stay counted this long: its backends may outlive it for a
# moment (a backend notices the closed socket only when its query ends), and a limit must
# never be exceeded as PostgreSQL sees it.
DEAD_SERVERS_GRACE = 1.0

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
           signal.SIGUSR1, signal.SIGUSR2)


class Slot:
    """A worker slot: its listeners outlive the processes that serve them."""

    def __init__(self, index: int, tcp: list[socket.socket]) -> None:
        self.index = index
        self.tcp = tcp
        self.pid = 0
        self.generation = 0
        self.started = 0.0
        self.crashes = 0
        self.respawn_at = 0.0
        self.restarts = 0


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.slots: list[Slot] = []
        self.unix: socket.socket | None = None
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
            for i in range(s.workers):
                self.slots.append(Slot(i, listeners.bind_tcp(self.config)))
        except listeners.ListenError:
            self._close_listeners()
            raise
        if s.workers > shm.MAX_WORKERS:
            raise listeners.ListenError("workers = %d: at most %d are supported" % (
                s.workers, shm.MAX_WORKERS))
        self.segment = shm.Segment.create()
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
        while True:
            try:
                readable, _, _ = select.select([self._wake_r], [], [], TICK)
            except InterruptedError:
                readable = [self._wake_r]
            if readable:
                try:
                    for signum in os.read(self._wake_r, 512):
                        self._on_signal(signum)
                except BlockingIOError:
                    pass
            self._reap()
            self._release_ghosts()
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
            log.info("got SIGHUP: live reload is not available yet; configuration unchanged")
            return
        if signum in (signal.SIGUSR1, signal.SIGUSR2):
            log.info("got %s: PAUSE/RESUME is not available yet", signal.Signals(signum).name)
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
                           heartbeat_ns=time.monotonic_ns())
        master_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # child
            self._become_worker(slot, master_pid)
        slot.pid = pid
        slot.started = time.monotonic()
        self.segment.write(slot.index, pid=pid)

    def _become_worker(self, slot: Slot, master_pid: int) -> None:
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            os.close(self._wake_r)
            for other in self.slots:
                if other is not slot:
                    for sock in other.tcp:
                        sock.close()
            import setproctitle

            setproctitle.setproctitle("pgherd: worker %d" % slot.index)
            plog.set_role("worker %d" % slot.index)
            from workers.worker import run

            socks = list(slot.tcp) + ([self.unix] if self.unix else [])
            run(slot.index, self.config, self.segment, self.inboxes, socks, master_pid)
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
            slot.crashes = 0 if lived > STABLE_AFTER else slot.crashes + 1
            delay = 0.0 if slot.crashes <= 1 else min(0.1 * 2 ** slot.crashes, MAX_BACKOFF)
            slot.respawn_at = time.monotonic() + delay
            log.warning("worker %d (pid %d) %s after %.1fs; respawning%s", slot.index, pid, how,
                        lived, " in %.1fs" % delay if delay else "")

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
        for slot in self.slots:
            if not slot.pid:
                all_ready = False
                if now >= slot.respawn_at:
                    slot.restarts += 1
                    self._spawn(slot)
                continue
            state = self.segment.read(slot.index)
            if state.state != shm.READY:
                all_ready = False
            if (now_ns - state.heartbeat_ns) / 1e9 > HEARTBEAT_LIMIT:
                log.error("worker %d (pid %d) missed its heartbeat for %.0fs: killing it",
                          slot.index, slot.pid, (now_ns - state.heartbeat_ns) / 1e9)
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if all_ready and not self.ready_sent:
            self.ready_sent = True
            log.info("all %d workers ready", len(self.slots))
            systemd.notify("READY=1", "STATUS=%d workers serving" % len(self.slots),
                           "MAINPID=%d" % os.getpid())

    # ------------------------------------------------------------------ teardown

    def _close_listeners(self) -> None:
        for slot in self.slots:
            for sock in slot.tcp:
                sock.close()
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


def _noop(signum: int, frame: object) -> None:
    """Signals are read from the wakeup fd; the handler only has to exist."""
