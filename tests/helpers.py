"""Test-harness building blocks shared by every pgherd test (no pytest fixtures here).

`tests/conftest.py` turns these into fixtures; tests may import them directly
(``from tests.helpers import free_port, wait_for``).

What lives here:

* PostgreSQL binary discovery (`pg_bindir`, `pg_tool`).
* `free_port()`: a port no other xdist worker (or anything else on the host) can
  be handed at the same time.
* `PgCluster`: one throwaway PostgreSQL cluster (initdb, configure, start, roles,
  databases, stop). Runs every PostgreSQL command as the `postgres` OS user when the
  tests run as root, because initdb/pg_ctl/postgres refuse root.
* `Pgherd`: one pgherd service under test (config files, process, sd_notify readiness,
  admin console, orphan-checking teardown).
* `Bench`: pgbench through a pooler in the background; `WaitingClients`: a pool with
  clients queueing; `PgBouncer`: the Debian PgBouncer side by side; `Tmux`: a terminal to
  run a program in, type into and read.

Rule of the house: nothing here sleeps to synchronise; everything that waits polls a
condition against a deadline (`wait_for`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlencode

import psutil
import psycopg

from prefork import pgtools

REPO_ROOT = Path(__file__).resolve().parent.parent
_SIGTERM = signal.SIGTERM  # Pgherd.signal() shadows the module inside the class body

# --------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition",
) -> Any:
    """Poll ``predicate()`` until it returns a truthy value; return that value.

    Raises ``TimeoutError`` after ``timeout`` seconds. The polling interval grows
    gently (up to 0.2 s) so cheap conditions are checked often at first.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {text}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def read_text(path: str | os.PathLike, offset: int = 0, max_chars: int | None = None) -> str:
    """Read a (log) file as text from byte ``offset``; '' if it does not exist.

    With ``max_chars`` only the tail of that many characters is returned.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if max_chars is not None and len(text) > max_chars:
        text = "[... truncated ...]\n" + text[-max_chars:]
    return text


def file_size(path: str | os.PathLike) -> int:
    """Size of ``path`` in bytes, 0 if it does not exist."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _is_root() -> bool:
    return os.geteuid() == 0


def pg_bindir() -> Path:
    """Directory holding initdb, pg_ctl and postgres (see prefork.pgtools)."""
    found = pgtools.pg_bindir()
    if found is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
    return found


def pg_tool(name: str, bindir: Path | None = None) -> str | None:
    """Path of a PostgreSQL client tool (``pgbench``, ``psql``...), or None."""
    return pgtools.pg_tool(name, bindir or pg_bindir())


class Sampler(threading.Thread):
    """Polls pg_stat_activity every ``period`` seconds (``pg.backends(**filters)``) and keeps
    the largest count it saw: the ground truth for a limit. Use as a context manager.

    All samples go over one connection: with a connection per sample, the backend of the
    previous one can still be exiting under load and be counted as a server connection of
    user postgres (the likely cause of one sample of 4 for a limit of 3, in a clean-clone
    run of the suite)."""

    def __init__(self, pg: "PgCluster", period: float = 0.05, **filters: Any) -> None:
        super().__init__(daemon=True)
        self.pg = pg
        self.period = period
        self.filters = filters
        self.max = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._halt.is_set():
            try:
                if conn is None:
                    conn = self.pg.connect(dbname="postgres")
                self.max = max(self.max, self.pg.backends(**self.filters, conn=conn))
                self.samples += 1
            except psycopg.OperationalError:
                # PostgreSQL restarting (a test may do that): nothing to count
                if conn is not None:
                    conn.close()
                conn = None
            self._halt.wait(self.period)
        if conn is not None:
            conn.close()

    def __enter__(self) -> "Sampler":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join()


class Load:
    """Clients that run ``query`` in a loop through a pooler, reconnecting after an error
    as applications do, each in a thread; the measure of what a fault costs. Use as a
    context manager; ``done`` holds the monotonic time of every transaction that succeeded,
    ``errors`` (time, exception) of every one that failed."""

    def __init__(self, dsn: str, clients: int = 8,
                 query: str = "SELECT pg_sleep(0.002)", connect_timeout: int = 5) -> None:
        self.dsn = dsn
        self.query = query
        self.connect_timeout = connect_timeout
        self.done: list[float] = []
        self.done_by: list[list[float]] = [[] for _ in range(clients)]  # per client
        self.errors: list[tuple[float, BaseException]] = []
        self.last_ok = [0.0] * clients
        self._halt = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                         for i in range(clients)]

    def _loop(self, i: int) -> None:
        conn = None
        while not self._halt.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None,
                                           connect_timeout=self.connect_timeout)
                conn.execute(self.query)
                self.last_ok[i] = now = time.monotonic()
                self.done.append(now)
                self.done_by[i].append(now)
            except psycopg.Error as exc:
                self.errors.append((time.monotonic(), exc))
                if conn is not None:
                    conn.close()
                    conn = None
                self._halt.wait(0.02)  # no busy loop while nothing answers
        if conn is not None:
            conn.close()

    def count(self, start: float, end: float) -> int:
        """Transactions done in [start, end)."""
        return sum(1 for t in list(self.done) if start <= t < end)

    def failed(self, start: float = 0.0, end: float = float("inf")) -> list[BaseException]:
        return [e for t, e in list(self.errors) if start <= t < end]

    def all_served_after(self, t0: float) -> bool:
        return all(t > t0 for t in self.last_ok)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        wait_for(lambda: self.all_served_after(0.0), timeout=20,
                 message=lambda: f"every load client served once; errors {self.errors[-3:]}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        for t in self._threads:
            t.join(15)


# --------------------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------------------

PORT_RANGE = range(20000, 30000)  # below Linux's ephemeral range (32768-60999)
_port_mutex = threading.Lock()
_held_ports: dict[int, int] = {}  # port -> fd of its flock'ed lock file (held for the session)


def _port_bindable(port: int) -> bool:
    # A plain bind (no SO_REUSEADDR/SO_REUSEPORT) fails on any socket bound to the
    # port, including SO_REUSEPORT listeners and 0.0.0.0 binds, and on TIME_WAIT
    # leftovers -- all reasons to skip the port.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_read_by_peer(sock: socket.socket, timeout: float = 10.0) -> None:
    """Until the process at the other end of this loopback TCP connection has read all that
    was sent to it (its socket's receive queue in /proc/net/tcp is empty): the next send
    then reaches it as a read of its own."""
    def hexaddr(addr: tuple) -> str:
        return "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(addr[0]))[0], addr[1])

    theirs, ours = hexaddr(sock.getpeername()), hexaddr(sock.getsockname())

    def drained() -> bool:
        with open("/proc/net/tcp") as f:
            for line in f:
                fields = line.split()
                if fields[1] == theirs and fields[2] == ours:
                    return int(fields[4].split(":")[1], 16) == 0
        raise AssertionError("no such connection in /proc/net/tcp")

    wait_for(drained, timeout=timeout, message="the peer to read what was sent")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 reserved for this process until it exits.

    Walks PORT_RANGE (each xdist worker starts at its own offset), takes an exclusive
    non-blocking ``flock`` on ``/tmp/pgherd-test-port-<n>.lock`` and keeps that file
    open for the rest of the session, then probes with a plain ``bind``. The lock is
    what makes this safe under xdist: pgherd listens with SO_REUSEPORT, so two servers
    handed the same port would silently share it instead of failing. The kernel drops
    the lock when the process exits, however it exits.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    try:
        index = int(worker.lstrip("gw"))
    except ValueError:
        index = 0
    n = len(PORT_RANGE)
    start = (index * 500) % n
    with _port_mutex:
        for i in range(n):
            port = PORT_RANGE[(start + i) % n]
            if port in _held_ports:
                continue
            path = f"/tmp/pgherd-test-port-{port}.lock"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError:
                continue  # e.g. a lock file of another user we may not open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            if not _port_bindable(port):
                os.close(fd)
                continue
            _held_ports[port] = fd
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def release_port(port: int) -> None:
    """Give a port from `free_port()` back early (normally they are kept until exit)."""
    with _port_mutex:
        fd = _held_ports.pop(port, None)
    if fd is not None:
        os.close(fd)


def login_error(dsn: str, timeout: float = 10.0) -> Exception | None:
    """Try to log in with asyncpg; return the server's error (``.sqlstate``, e.g.
    '28P01', and ``str()`` the message) or None if the login succeeded.

    libpq (psycopg) does not expose the SQLSTATE of a failed connection attempt,
    asyncpg does -- use this to assert PgBouncer-compatible login errors.
    """
    import asyncio

    import asyncpg

    async def attempt() -> Exception | None:
        try:
            conn = await asyncpg.connect(dsn, timeout=timeout)
        except asyncpg.PostgresError as exc:
            return exc
        await conn.close()
        return None

    return asyncio.run(attempt())


# --------------------------------------------------------------------------------------
# PostgreSQL cluster
# --------------------------------------------------------------------------------------


def make_dsn(
    host: str, port: int, dbname: str, user: str, password: str | None = None, **params: Any
) -> str:
    """A ``postgresql://`` URL understood by libpq (psycopg, psql, pgbench) and asyncpg.

    A host that is a directory (unix socket) goes into the query string, where both
    libpq and asyncpg accept it.
    """
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    query = dict(params)
    if host.startswith("/"):
        query = {"host": host, "port": port, **query}
        netloc = auth + "@"
    else:
        netloc = f"{auth}@{host}:{port}"
    url = f"postgresql://{netloc}/{quote(dbname, safe='')}"
    if query:
        url += "?" + urlencode({k: str(v) for k, v in query.items()}, quote_via=quote)
    return url


PG_ROLES = {
    # role: (password, hba method)
    "u_md5": ("md5pw", "md5"),
    "u_scram": ("scrampw", "scram-sha-256"),
    "u_plain": ("plainpw", "password"),
    "app": ("apppw", "trust"),
}
PG_DATABASES = ("p0", "p1", "p2")


class PgCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (one per xdist worker).

    Attributes: ``host``, ``port``, ``sockdir``, ``datadir``, ``bindir``, ``log_path``,
    ``pgbench_path``, ``psql_path``, ``roles`` (name -> (password, hba method)),
    ``databases``.
    """

    host = "127.0.0.1"

    def __init__(self, port: int | None = None, bindir: Path | None = None) -> None:
        self.bindir = Path(bindir) if bindir else pg_bindir()
        self.pgbench_path = pg_tool("pgbench", self.bindir)
        self.psql_path = pg_tool("psql", self.bindir)
        self.port = port or free_port()
        self.datadir = Path(tempfile.mkdtemp(prefix="pgherd-pg-", dir="/tmp"))
        self.sockdir = str(self.datadir)
        self.log_path = self.datadir / "postgresql.log"
        self.roles = dict(PG_ROLES)
        self.databases = PG_DATABASES
        self._started = False

    # -- commands ----------------------------------------------------------------

    def run_as_pg(
        self, argv: list[str], check: bool = True, timeout: float = 120, **kwargs: Any
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` as the ``postgres`` OS user when we are root (via
        ``runuser -u postgres --``), else as ourselves. Output is captured; with
        ``check`` a non-zero exit raises RuntimeError carrying stdout/stderr.
        """
        cmd = list(map(str, argv))
        if _is_root():
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(kwargs.pop("env", {}) or {})
        proc = subprocess.run(
            cmd,
            cwd=kwargs.pop("cwd", "/tmp"),  # a cwd the postgres user can enter
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
                f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
            )
        return proc

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> "PgCluster":
        """initdb, write postgresql.conf / pg_hba.conf, start, create roles and dbs."""
        if _is_root():
            shutil.chown(self.datadir, "postgres", "postgres")
        self.run_as_pg(
            [
                self._bin("initdb"),
                "-D", self.datadir,
                "-A", "trust",
                "-U", "postgres",
                "--nosync",
                "-E", "UTF8",
                "--no-locale",
            ]
        )
        conf = {
            "port": self.port,
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.sockdir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": 300,
            "shared_buffers": "'32MB'",
            "logging_collector": "off",
            "log_destination": "'stderr'",
            "log_connections": "on",
            "log_disconnections": "on",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "datestyle": "'iso, mdy'",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# --- pgherd test harness ---\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        hba = [f"host all {role} 127.0.0.1/32 {method}" for role, (_, method) in self.roles.items()
               if method != "trust"]
        hba += ["host all all 127.0.0.1/32 trust", "local all all trust"]
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

        proc = self.run_as_pg(
            [self._bin("pg_ctl"), "-D", self.datadir, "-l", self.log_path, "-w", "-t", "60", "start"],
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL failed to start (pg_ctl exit {proc.returncode})\n"
                f"--- pg_ctl stdout ---\n{proc.stdout}\n--- pg_ctl stderr ---\n{proc.stderr}\n"
                f"--- {self.log_path} ---\n{read_text(self.log_path)}"
            )
        self._started = True
        try:
            self._provision()
        except Exception as exc:
            raise RuntimeError(
                f"PostgreSQL provisioning failed: {exc!r}\n"
                f"--- {self.log_path} ---\n{read_text(self.log_path, max_chars=20000)}"
            ) from exc
        return self

    def _provision(self) -> None:
        with self.connect(dbname="postgres") as conn:
            for role, (password, method) in self.roles.items():
                # the stored secret follows password_encryption at CREATE time
                enc = "md5" if method == "md5" else "scram-sha-256"
                conn.execute(f"SET password_encryption = '{enc}'")
                conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            conn.execute("RESET password_encryption")
            for db in self.databases:
                conn.execute(f"CREATE DATABASE {db} OWNER postgres")
                conn.execute(f"GRANT ALL ON DATABASE {db} TO PUBLIC")
        for db in self.databases:
            with self.connect(dbname=db) as conn:
                conn.execute("GRANT ALL ON SCHEMA public TO PUBLIC")

    # -- the server process, for tests of outages ---------------------------------

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``pg_ctl -D <datadir> -l <log> ARGS`` as the cluster's owner."""
        return self.run_as_pg([self._bin("pg_ctl"), "-D", self.datadir, "-l", self.log_path,
                               *args], check=check)

    def answers(self) -> bool:
        try:
            return self.sql("SELECT 1", dbname="postgres") == [(1,)]
        except psycopg.OperationalError:
            return False

    def stop_server(self, mode: str = "fast") -> None:
        """Stop PostgreSQL (the data stays); `start_server` brings it back."""
        self.ctl("-m", mode, "-w", "-t", "60", "stop")

    def start_server(self) -> None:
        """Start PostgreSQL again and wait until it answers. The cluster serves every later
        test of this xdist worker: whatever happened, it is up when this returns."""
        if self.ctl("status", check=False).returncode != 0:
            self.ctl("-w", "-t", "60", "start")
        wait_for(self.answers, timeout=30, message="PostgreSQL up again")

    def restart_server(self) -> None:
        """``pg_ctl restart -m fast``; up again when this returns, whatever happens."""
        try:
            self.ctl("-m", "fast", "-w", "-t", "60", "restart")
        finally:
            self.start_server()

    def stop(self) -> None:
        """``pg_ctl stop -m immediate`` and remove the data directory."""
        try:
            if self._started:
                self.run_as_pg(
                    [self._bin("pg_ctl"), "-D", self.datadir, "-m", "immediate", "-w", "stop"],
                    check=False,
                )
                self._started = False
        finally:
            shutil.rmtree(self.datadir, ignore_errors=True)

    # -- access ------------------------------------------------------------------

    def dsn(self, dbname: str = "p0", user: str = "postgres", password: str | None = None,
            **params: Any) -> str:
        """URL for a direct connection to this cluster (TCP; ``host=pg.sockdir`` for
        the unix socket); other ``params`` become URL query parameters."""
        host = params.pop("host", self.host)
        return make_dsn(host, self.port, dbname, user, password, **params)

    def connect(self, dbname: str = "p0", user: str = "postgres", password: str | None = None,
                autocommit: bool = True, **kw: Any) -> psycopg.Connection:
        """A direct psycopg connection (autocommit by default). Extra ``kw`` are libpq
        parameters or psycopg arguments; ``host=pg.sockdir`` connects over the unix socket.
        """
        return psycopg.connect(self.dsn(dbname, user, password), autocommit=autocommit, **kw)

    def sql(self, query: str, dbname: str = "p0", params: Any = None,
            user: str = "postgres") -> list[tuple]:
        """Run one statement on a fresh direct connection; rows as tuples ([] if none)."""
        with self.connect(dbname=dbname, user=user) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def log_size(self) -> int:
        """Current size of the server log (use as an offset for `log`)."""
        return file_size(self.log_path)

    def log(self, offset: int = 0) -> str:
        """The server log from byte ``offset``."""
        return read_text(self.log_path, offset)

    def backends(self, dbname: str | None = None, usename: str | None = None,
                 conn: psycopg.Connection | None = None) -> int:
        """Number of client backends in pg_stat_activity (excluding the querying one),
        optionally filtered by database and user -- the ground truth for pool limits.
        Asked on ``conn`` if given (autocommit), else on a fresh connection."""
        q = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
             "AND pid <> pg_backend_pid()")
        args: list[Any] = []
        if dbname is not None:
            q += " AND datname = %s"
            args.append(dbname)
        if usename is not None:
            q += " AND usename = %s"
            args.append(usename)
        if conn is not None:
            return conn.execute(q, args).fetchone()[0]
        return self.sql(q, dbname="postgres", params=args)[0][0]


# --------------------------------------------------------------------------------------
# pgherd service under test
# --------------------------------------------------------------------------------------


class PgherdStartError(RuntimeError):
    """pgherd exited or did not send READY=1 in time (message carries its output)."""


def _ini_value(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def _connstr(value: str | Mapping[str, Any], base: Mapping[str, Any]) -> str:
    if isinstance(value, str):
        return value
    merged = {**base, **value}
    return " ".join(f"{k}={_ini_value(v)}" for k, v in merged.items() if v is not None)


def _merge(base: dict, changes: Mapping | None) -> dict:
    out = dict(base)
    for k, v in (changes or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _socket_links(pid: int) -> set[str]:
    """``socket:[inode]`` of every socket ``pid`` holds (empty if it is gone)."""
    links = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:"):
                    links.add(link)
    except OSError:
        pass
    return links


def _pids_holding(links: set[str]) -> list[int]:
    """Other processes holding any of these sockets."""
    if not links:
        return []
    me = os.getpid()
    return [pid for pid in psutil.pids() if pid != me and _socket_links(pid) & links]


class Pgherd:
    """One pgherd service under test. Usually made by the ``pgherd`` fixture.

    Files live in ``workdir`` (ini, userlist, log, pid, captured stdout+stderr); the
    unix sockets (pgherd's and the NOTIFY_SOCKET) live in a short /tmp directory
    because sun_path is limited to 107 bytes and pytest's tmp paths can be longer.

    Lifecycle: ``start(wait_ready)``, ``wait_ready()``, ``signal(sig)``,
    ``stop(sig, timeout)`` -> exit code, ``wait_exit()``, ``shutdown()`` (teardown,
    returns problems), ``worker_pids()``, ``session_processes()``.
    sd_notify: ``notifications()``, ``datagrams()``, ``wait_notification(line, since)``.
    Config: ``ini_path``, ``settings``, ``rewrite_ini(...)``, ``write_userlist(...)``,
    ``pg_connstr(**opts)``. Clients: ``host``, ``port``, ``unix_dir``, ``dsn()``,
    ``unix_dsn()``, ``connect()``, ``admin()``, ``admin_dicts()``.
    Logs: ``log()``, ``output()``, ``wait_log(regex)``, ``diagnostics()``.
    """

    host = "127.0.0.1"
    READY_TIMEOUT = 20.0

    def __init__(
        self,
        pg: PgCluster,
        workdir: Path,
        settings: Mapping[str, Any] | None = None,
        databases: Mapping[str, str | Mapping[str, Any]] | None = None,
        users: Mapping[str, str | Mapping[str, Any]] | None = None,
        userlist: Mapping[str, str | None] | None = None,
        workers: int = 2,
        command: list[str] | None = None,
    ) -> None:
        self.pg = pg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockdir = tempfile.mkdtemp(prefix="pgh-", dir="/tmp")
        reserved_port = free_port()
        self.ini_path = self.workdir / "pgherd.ini"
        self.userlist_path = self.workdir / "userlist.txt"
        self.log_path = self.workdir / "pgherd.log"
        self.pidfile_path = self.workdir / "pgherd.pid"
        self.output_path = self.workdir / "pgherd.out"
        self.notify_path = os.path.join(self.sockdir, "notify.sock")
        self.pg_log_offset = pg.log_size()

        self._settings: dict[str, Any] = {
            "listen_addr": "127.0.0.1",
            "listen_port": reserved_port,
            "unix_socket_dir": self.sockdir,
            "logfile": str(self.log_path),
            "pidfile": str(self.pidfile_path),
            "auth_type": "trust",
            "auth_file": str(self.userlist_path),
            "admin_users": "postgres",
            "workers": workers,
            # The tests run as root, and so does the pgherd under test (pgherd's own
            # setting; as PgBouncer, it refuses root otherwise).
            "allow_root": 1 if os.geteuid() == 0 else None,
        }
        self._settings = _merge(self._settings, settings)
        self._databases: dict[str, Any] = (
            dict(databases) if databases is not None else self.default_databases(pg)
        )
        self._users: dict[str, Any] = dict(users or {})
        self._userlist: dict[str, str] = _merge(
            {"postgres": "", **{r: pw for r, (pw, _) in pg.roles.items()}}, userlist
        )
        self.write_ini()
        self.write_userlist()

        self.command = command or self.default_command(self.ini_path)
        self.proc: subprocess.Popen | None = None
        self._known: dict[int, psutil.Process] = {}
        self._sockets: set[str] = set()  # the master's listeners and inboxes (orphan check)
        self._datagrams: list[str] = []
        self._cond = threading.Condition()
        self._stop_reader = threading.Event()
        self._notify_sock: socket.socket | None = None
        self._reader: threading.Thread | None = None

    # -- configuration -----------------------------------------------------------

    @staticmethod
    def default_databases(pg: PgCluster) -> dict[str, str]:
        """p0, p1, p2 and the ``*`` fallback, all pointing at ``pg``."""
        target = f"host={pg.host} port={pg.port}"
        return {**{db: target for db in pg.databases}, "*": target}

    def pg_connstr(self, **options: Any) -> str:
        """A [databases] value pointing at the test cluster plus ``options``
        (e.g. ``h.pg_connstr(dbname="p1", pool_size=2)``)."""
        return _connstr(options, {"host": self.pg.host, "port": self.pg.port})

    @staticmethod
    def default_command(ini: Path) -> list[str]:
        """``<venv>/bin/pgherd run <ini>``, or ``python -m prefork.cli run <ini>``."""
        script = Path(sys.executable).parent / "pgherd"  # not resolved: keep the venv
        if script.exists():
            return [str(script), "run", str(ini)]
        return [sys.executable, "-m", "prefork.cli", "run", str(ini)]

    @property
    def port(self) -> int:
        """The TCP port pgherd listens on (``listen_port`` of the current ini)."""
        return int(self._settings["listen_port"])

    @property
    def unix_dir(self) -> str:
        """Directory of pgherd's unix socket (``unix_socket_dir`` of the current ini)."""
        return str(self._settings.get("unix_socket_dir", "/tmp"))  # PgBouncer's default

    @property
    def settings(self) -> dict[str, Any]:
        """The current [pgbouncer] settings as written to the ini (a copy)."""
        return dict(self._settings)

    def render_ini(self) -> str:
        """The ini text for the current settings/databases/users."""
        base = {"host": self.pg.host, "port": self.pg.port}
        lines = ["[databases]"]
        lines += [f"{name} = {_connstr(v, base)}" for name, v in self._databases.items()]
        lines += ["", "[pgbouncer]"]
        lines += [f"{k} = {_ini_value(v)}" for k, v in self._settings.items()]
        if self._users:
            lines += ["", "[users]"]
            lines += [f"{name} = {_connstr(v, {})}" for name, v in self._users.items()]
        return "\n".join(lines) + "\n"

    def write_ini(self, raw: str | None = None) -> None:
        """(Re)write the ini atomically: the rendered config, or ``raw`` text verbatim."""
        tmp = self.ini_path.with_suffix(".ini.tmp")
        tmp.write_text(self.render_ini() if raw is None else raw)
        os.replace(tmp, self.ini_path)

    def rewrite_ini(
        self,
        settings: Mapping[str, Any] | None = None,
        databases: Mapping[str, Any] | None = None,
        users: Mapping[str, Any] | None = None,
        raw: str | None = None,
    ) -> None:
        """Change the same ini file for reload tests (then send SIGHUP / RELOAD).

        ``settings``, ``databases`` and ``users`` are merged into the current ones; a
        value of None removes that key. ``raw`` writes the given text verbatim instead
        (e.g. a broken config) without touching the remembered settings.
        """
        if raw is not None:
            self.write_ini(raw)
            return
        self._settings = _merge(self._settings, settings)
        self._databases = _merge(self._databases, databases)
        self._users = _merge(self._users, users)
        self.write_ini()

    def write_userlist(self, changes: Mapping[str, str | None] | None = None) -> None:
        """(Re)write the auth_file in PgBouncer's ``"user" "secret"`` format, after
        merging ``changes`` (None removes a user)."""
        self._userlist = _merge(self._userlist, changes)

        def q(s: str) -> str:
            return '"' + s.replace('"', '""') + '"'

        text = "".join(f"{q(u)} {q(pw)}\n" for u, pw in self._userlist.items())
        tmp = self.userlist_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.userlist_path)

    # -- process -----------------------------------------------------------------

    def start(self, wait_ready: bool = True, timeout: float | None = None) -> "Pgherd":
        """Bind the notify socket, spawn pgherd in its own session, optionally wait
        for READY=1."""
        self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify_sock.bind(self.notify_path)
        os.chmod(self.notify_path, 0o666)
        self._notify_sock.settimeout(0.1)
        self._reader = threading.Thread(
            target=self._read_notify, name=f"pgherd-notify-{self.port}", daemon=True
        )
        self._reader.start()

        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = self.notify_path
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONFAULTHANDLER"] = "1"
        with open(self.output_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._remember(self.proc.pid)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _read_notify(self) -> None:
        sock = self._notify_sock
        while not self._stop_reader.is_set():
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self._datagrams.append(data.decode("utf-8", errors="replace"))
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        """The master's pid."""
        assert self.proc is not None, "pgherd was not started"
        return self.proc.pid

    def running(self) -> bool:
        """True while the master process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def datagrams(self) -> list[str]:
        """Every raw sd_notify datagram received so far, in order."""
        with self._cond:
            return list(self._datagrams)

    def notifications(self) -> list[str]:
        """Every ``KEY=VALUE`` line received on NOTIFY_SOCKET so far, in order
        (datagrams are split on newlines), e.g. ["READY=1", "RELOADING=1",
        "MONOTONIC_USEC=...", "READY=1", "STOPPING=1"]."""
        return [line for d in self.datagrams() for line in d.split("\n") if line]

    def wait_notification(self, line: str, since: int = 0, timeout: float = 20.0) -> int:
        """Wait until ``line`` (e.g. "READY=1") is among notifications()[since:].

        Returns the index just past it, usable as the next ``since``. Typical reload
        test: ``n = len(h.notifications()); h.signal(SIGHUP);
        h.wait_notification("READY=1", since=n)``. Fails early if pgherd exits.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                lines = [ln for d in self._datagrams for ln in d.split("\n") if ln]
                for i in range(since, len(lines)):
                    if lines[i] == line:
                        return i + 1
                if self.proc is not None and self.proc.poll() is not None:
                    # one last look: a message may have been sent just before exiting
                    self._cond.wait(0.2)
                    lines = [ln for d in self._datagrams for ln in d.split("\n") if ln]
                    for i in range(since, len(lines)):
                        if lines[i] == line:
                            return i + 1
                    raise PgherdStartError(
                        f"pgherd exited with code {self.proc.returncode} before sending "
                        f"{line!r}\n{self.diagnostics()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PgherdStartError(
                        f"no {line!r} from pgherd within {timeout:.0f}s "
                        f"(got {lines[since:]})\n{self.diagnostics()}"
                    )
                self._cond.wait(min(remaining, 0.1))

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the first READY=1 (20 s by default); raise PgherdStartError with
        pgherd's output and log if it exits or the deadline passes."""
        try:
            self.wait_notification("READY=1", 0, timeout or self.READY_TIMEOUT)
        except PgherdStartError:
            if self.running():
                self._kill_all(signal.SIGKILL)
            raise
        self.worker_pids()  # remember the workers for the orphan check

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the master to exit; return its exit code (negative = signal)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"pgherd (pid {self.pid}) still running after {timeout}s\n{self.diagnostics()}"
            ) from None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the master only."""
        self._snapshot()
        os.kill(self.pid, sig)

    def stop(self, sig: int = _SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` to the master and wait for it to exit; return the exit code."""
        if self.running():
            self.signal(sig)
        return self.wait_exit(timeout)

    def worker_pids(self) -> list[int]:
        """Pids of the master's direct children (the workers), sorted."""
        try:
            children = psutil.Process(self.pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return []
        self._snapshot()
        return sorted(c.pid for c in children if _alive(c))

    # -- process bookkeeping (orphan check) --------------------------------------

    def _remember(self, pid: int) -> None:
        if pid not in self._known:
            try:
                self._known[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass

    def _snapshot(self) -> None:
        """Remember every descendant of the master (pid + create time, so pid reuse
        cannot fool the orphan check), and the sockets every worker inherits from it."""
        if self.proc is None:
            return
        self._sockets |= _socket_links(self.proc.pid)
        try:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                self._remember(c.pid)
        except psutil.NoSuchProcess:
            pass

    def session_processes(self) -> list[psutil.Process]:
        """Live processes that belong to this service: every descendant ever seen, plus
        anything holding the master's sockets (a worker forked after we last looked; workers
        run in sessions of their own, so the process group does not find them)."""
        if self.proc is None:
            return []
        self._snapshot()
        found = {pid: p for pid, p in self._known.items() if _alive(p)}
        for pid in _pids_holding(self._sockets):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if pid not in found and _alive(p):
                    found[pid] = p
        return list(found.values())

    def _kill_all(self, sig: int) -> None:
        for p in self.session_processes():
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def shutdown(self, timeout: float = 20.0, orphan_grace: float = 10.0) -> list[str]:
        """Teardown: SIGQUIT the master if it still runs and wait, then make sure no
        process of its session is left. Returns a list of problems (empty = clean);
        anything left over is SIGKILLed so later tests start clean."""
        problems: list[str] = []
        if self.proc is not None:
            if self.proc.poll() is None:
                self._snapshot()
                try:
                    os.kill(self.proc.pid, signal.SIGQUIT)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    problems.append(f"master pid {self.proc.pid} ignored SIGQUIT for {timeout}s")
                    self._kill_all(signal.SIGKILL)
            leftovers: list[psutil.Process] = []

            def settled() -> bool:
                nonlocal leftovers
                leftovers = self.session_processes()
                return not leftovers

            try:
                wait_for(settled, timeout=orphan_grace, message="pgherd processes to exit")
            except TimeoutError:
                desc = []
                for p in leftovers:
                    try:
                        desc.append(f"pid {p.pid} ({' '.join(p.cmdline())!r}, {p.status()})")
                    except psutil.Error:
                        desc.append(f"pid {p.pid}")
                problems.append(
                    f"orphaned processes {orphan_grace}s after the master exited: "
                    + "; ".join(desc)
                )
                for p in leftovers:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
        self._stop_reader.set()
        if self._reader is not None:
            self._reader.join(5)
        if self._notify_sock is not None:
            self._notify_sock.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        return problems

    # -- client side -------------------------------------------------------------

    def dsn(self, dbname: str = "p0", user: str = "postgres", password: str | None = None,
            **params: Any) -> str:
        """URL to pgherd over TCP; ``params`` become URL query parameters (libpq
        keywords such as application_name, sslmode, or host=<unix_dir>)."""
        host = params.pop("host", self.host)
        return make_dsn(host, self.port, dbname, user, password, **params)

    def unix_dsn(self, dbname: str = "p0", user: str = "postgres",
                 password: str | None = None, **params: Any) -> str:
        """URL to pgherd over its unix socket."""
        return self.dsn(dbname, user, password, host=self.unix_dir, **params)

    def connect(self, dbname: str = "p0", user: str = "postgres", password: str | None = None,
                autocommit: bool = True, **kw: Any) -> psycopg.Connection:
        """A psycopg connection through pgherd. ``kw`` are libpq parameters (e.g.
        ``host=h.unix_dir``, ``application_name``) or psycopg arguments."""
        return psycopg.connect(self.dsn(dbname, user, password), autocommit=autocommit, **kw)

    def _admin_cursor_run(self, command: str, user: str, password: str | None):
        # autocommit: no BEGIN; prepare_threshold=None: never PREPARE. A query without
        # parameters in text format goes out as one simple-protocol 'Q' message.
        with psycopg.connect(self.dsn("pgbouncer", user, password), autocommit=True,
                             prepare_threshold=None) as conn:
            cur = conn.execute(command)
            cols = [c.name for c in cur.description] if cur.description else []
            rows = cur.fetchall() if cur.description else []
            return cols, rows

    def admin(self, command: str, user: str = "postgres",
              password: str | None = None) -> list[tuple]:
        """Run one admin-console command (virtual db ``pgbouncer``) with the simple
        query protocol; rows as tuples, values typed by the column OIDs pgherd sends."""
        return self._admin_cursor_run(command, user, password)[1]

    def admin_dicts(self, command: str, user: str = "postgres",
                    password: str | None = None) -> list[dict[str, Any]]:
        """Like `admin` but each row is a dict keyed by column name."""
        cols, rows = self._admin_cursor_run(command, user, password)
        return [dict(zip(cols, r)) for r in rows]

    # -- logs --------------------------------------------------------------------

    def log(self) -> str:
        """pgherd's logfile so far ('' if not created yet)."""
        return read_text(self.log_path)

    def output(self) -> str:
        """pgherd's captured stdout+stderr."""
        return read_text(self.output_path)

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """Wait until the regex ``pattern`` matches pgherd's log; return the match."""
        rx = re.compile(pattern)
        return wait_for(lambda: rx.search(self.log()), timeout,
                        message=lambda: f"{pattern!r} in pgherd log:\n{self.log()[-4000:]}")

    def diagnostics(self, max_chars: int = 30000) -> str:
        """Command, exit status, notifications, stdout/stderr, log and this test's
        slice of the PostgreSQL log -- for failure messages."""
        rc = None if self.proc is None else self.proc.poll()
        parts = [
            f"command: {' '.join(self.command)}",
            f"port: {self.port}  exit code: {rc}",
            f"notifications: {self.notifications()}",
            f"--- {self.output_path} (stdout+stderr) ---\n"
            + read_text(self.output_path, max_chars=max_chars),
            f"--- {self.log_path} ---\n" + read_text(self.log_path, max_chars=max_chars),
            f"--- {self.pg.log_path} (since this pgherd started) ---\n"
            + read_text(self.pg.log_path, self.pg_log_offset, max_chars=max_chars // 2),
        ]
        return "\n".join(parts)


# --------------------------------------------------------------------------------------
# load: pgbench in the background
# --------------------------------------------------------------------------------------


def pgbench_env() -> dict[str, str]:
    """The environment for pgbench/psql children: ours without PG* variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class Bench:
    """pgbench through a pooler (anything with ``host`` and ``port``) in the background
    (``with Bench(...) as b``); killed on exit from the block if it still runs, so a failing
    test leaves no pgbench behind."""

    def __init__(self, pg: PgCluster, h: Any, *args: str, dbname: str = "bench") -> None:
        self.cmd = [pg.pgbench_path, "-n", "-h", h.host, "-p", str(h.port), "-U", "postgres",
                    *args, dbname]
        self.proc: subprocess.Popen | None = None
        self.out = self.err = ""

    def __enter__(self) -> "Bench":
        self.proc = subprocess.Popen(self.cmd, env=pgbench_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 60) -> "Bench":
        self.out, self.err = self.proc.communicate(timeout=timeout)
        return self

    def assert_clean(self) -> int:
        """Exit 0, no failed transaction, some processed; returns the processed count."""
        text = self.out + self.err
        assert self.proc.returncode == 0, text
        assert "number of failed transactions: 0" in self.out, text
        m = re.search(r"number of transactions actually processed: (\d+)", self.out)
        assert m and int(m.group(1)) > 0, text
        return int(m.group(1))


class WaitingClients:
    """A pool with clients queueing for it (``with WaitingClients(h.dsn("p1"), 2, 3)``):
    ``holders`` connections each inside a transaction — holding a server each in transaction
    mode, so a pool of that size is full — and ``waiters`` threads whose ``SELECT 1`` waits
    for a server, all connecting to ``dsn``. On exit the holders roll back, the waiters are
    served, and every connection closes."""

    def __init__(self, dsn: str, holders: int, waiters: int) -> None:
        self.dsn = dsn
        self.holders: list[psycopg.Connection] = []
        self.threads = [threading.Thread(target=self._wait, daemon=True) for _ in range(waiters)]
        self.errors: list[BaseException] = []
        self.count = holders

    def _wait(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None) as conn:
                conn.execute("SELECT 1")
        except BaseException as exc:  # reported by __exit__
            self.errors.append(exc)

    def __enter__(self) -> "WaitingClients":
        for _ in range(self.count):
            conn = psycopg.connect(self.dsn, prepare_threshold=None)  # not autocommit
            conn.execute("SELECT 1")  # BEGIN went first: the server stays linked
            self.holders.append(conn)
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for conn in self.holders:
            conn.close()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


# --------------------------------------------------------------------------------------
# PgBouncer, side by side
# --------------------------------------------------------------------------------------


class PgBouncer:
    """The Debian PgBouncer (1.18 on Debian 12) in front of ``pg``, as the ``postgres`` OS
    user (PgBouncer refuses to run as root): ``[databases] * =`` the test cluster, trust,
    admin_users = postgres, on a free port of 127.0.0.1 and a Unix socket in ``workdir``.
    ``settings`` are added to ``[pgbouncer]``. Nothing runs until ``start()`` (or ``run``
    for a command line of one's own); ``write_ini(extra)`` appends raw ini text."""

    def __init__(self, pg: PgCluster, settings: Mapping[str, Any] | None = None) -> None:
        binary = pgtools.find_pgbouncer()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed (make test installs it with apt)")
        self.binary = binary
        self.pg = pg
        self.settings = dict(settings or {})
        self.host = "127.0.0.1"
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="pgb-", dir="/tmp")
        self.ini = os.path.join(self.workdir, "pgbouncer.ini")
        self.logfile = os.path.join(self.workdir, "pgbouncer.log")
        self.proc: subprocess.Popen | None = None
        self.admin_dsn = self.dsn = make_dsn(self.host, self.port, "pgbouncer", "postgres")
        self.write_ini()

    def write_ini(self, extra: str = "") -> str:
        pg = self.pg
        lines = ["[databases]", f"* = host={pg.host} port={pg.port}", "[pgbouncer]",
                 f"listen_addr = {self.host}", f"listen_port = {self.port}",
                 f"unix_socket_dir = {self.workdir}", "auth_type = trust",
                 f"auth_file = {self.workdir}/userlist.txt", "admin_users = postgres",
                 f"logfile = {self.logfile}"]
        lines += [f"{k} = {_ini_value(v)}" for k, v in self.settings.items()]
        Path(self.ini).write_text("\n".join(lines) + "\n" + extra)
        Path(self.workdir, "userlist.txt").write_text('"postgres" ""\n')
        if _is_root():
            for name in os.listdir(self.workdir):
                shutil.chown(os.path.join(self.workdir, name), "postgres")
            shutil.chown(self.workdir, "postgres")
        return self.ini

    def run(self, *args: str) -> subprocess.Popen:
        """PgBouncer with these arguments, as ``postgres`` when we are root."""
        argv = [self.binary, *args]
        if _is_root():
            argv = ["runuser", "-u", "postgres", "--"] + argv
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> PgBouncer:
        self.proc = self.run("-q", self.ini)
        try:
            wait_for(self._version, timeout=10, message="PgBouncer to answer SHOW VERSION")
        except BaseException:
            self.stop()
            raise
        return self

    def _version(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("pgbouncer exited: %s" % self.log())
        try:
            with psycopg.connect(self.admin_dsn, autocommit=True, prepare_threshold=None) as c:
                return c.execute("SHOW VERSION").fetchone()[0]
        except psycopg.OperationalError:
            return None

    def log(self) -> str:
        return read_text(self.logfile) if os.path.exists(self.logfile) else ""

    def admin_dicts(self, command: str) -> list[dict[str, Any]]:
        """One admin-console command, rows as dicts keyed by column name."""
        with psycopg.connect(self.admin_dsn, autocommit=True, prepare_threshold=None) as c:
            cur = c.execute(command)
            return [dict(zip([d.name for d in cur.description], r)) for r in cur.fetchall()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # runuser passes SIGTERM on to PgBouncer
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# a terminal: tmux
# --------------------------------------------------------------------------------------


class Tmux:
    """A terminal a test can look at and type into: one detached tmux session on a tmux
    server of its own (socket in ``workdir``), ``width`` x ``height`` cells. The pane stays
    after its program exits, so its last screen can still be read."""

    def __init__(self, workdir: Path, width: int = 150, height: int = 40) -> None:
        self.binary = shutil.which("tmux")
        if self.binary is None:
            raise RuntimeError("tmux is not installed (make test installs it with apt)")
        self.socket = str(workdir / "tmux.sock")
        conf = workdir / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g status off\n"
                        "set -g default-terminal screen-256color\n")
        self.width, self.height = width, height
        self.conf = str(conf)
        self.started = False

    def _tmux(self, *args: str) -> str:
        # The server's environment becomes the programs': a COLUMNS/LINES of ours (pytest's
        # terminal) would override the pane's size, a TMUX of ours would look like nesting.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
        return subprocess.run([self.binary, "-S", self.socket, "-f", self.conf, *args],
                              capture_output=True, text=True, check=True, timeout=10,
                              env=env).stdout

    def start(self, argv: list[str], cwd: str | Path = REPO_ROOT) -> None:
        """Run ``argv`` in the terminal."""
        self._tmux("new-session", "-d", "-s", "t", "-x", str(self.width), "-y",
                   str(self.height), "-c", str(cwd), "--", *argv)
        self.started = True

    def screen(self) -> str:
        """What the terminal shows now, as text."""
        return self._tmux("capture-pane", "-p", "-t", "t")

    def screen_ansi(self) -> str:
        """What the terminal shows now, with its colours (ANSI escape sequences)."""
        return self._tmux("capture-pane", "-p", "-e", "-t", "t")

    def send(self, *keys: str) -> None:
        """Type ``keys`` (tmux key names: "q", "Enter", "Escape"...)."""
        self._tmux("send-keys", "-t", "t", *keys)

    def dead(self) -> bool:
        """True once the program in the pane has exited."""
        return self._tmux("display-message", "-p", "-t", "t", "#{pane_dead}").strip() == "1"

    def wait_screen(self, predicate: Callable[[str], Any], timeout: float = 15.0,
                    message: str = "the screen") -> str:
        """Poll the screen until ``predicate(screen)`` holds; return that screen."""
        last = [""]

        def check() -> str | None:
            last[0] = self.screen()
            return last[0] if predicate(last[0]) else None

        return wait_for(check, timeout=timeout,
                        message=lambda: f"{message}; the screen was:\n{last[0]}")

    def close(self) -> None:
        if self.started:
            subprocess.run([self.binary, "-S", self.socket, "kill-server"],
                           capture_output=True, timeout=10)
            self.started = False


__all__ = [
    "Bench",
    "PG_DATABASES",
    "PG_ROLES",
    "PgBouncer",
    "PgCluster",
    "Pgherd",
    "PgherdStartError",
    "Tmux",
    "WaitingClients",
    "file_size",
    "free_port",
    "login_error",
    "make_dsn",
    "pg_bindir",
    "pg_tool",
    "pgbench_env",
    "read_text",
    "release_port",
    "wait_for",
]
