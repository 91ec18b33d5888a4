"""The HTTP endpoint: ``GET /metrics`` (Prometheus), ``GET /health``, ``GET /ready``, and the
status page ``GET /`` with its data ``GET /status.json`` (``statuspage.py``).

Who serves it: every worker, on its own slot's SO_REUSEPORT listener (bound by the master, one
per worker slot, kept for the life of the service like the pooler's TCP listeners). Every
worker can read the whole service's shared memory, so whichever worker the kernel hands a
request to answers for the whole service. The master stays a small supervisor that runs no
request-handling code and imports no gevent; and an HTTP listener is not closed when its
worker starts draining, so ``/ready`` keeps answering 503 until that worker has exited.

How it serves: :class:`gevent.server.StreamServer` on the existing listener, in the worker's
hub, with a small handler (HTTP/1.1, ``Connection: close``, one request per connection).
Hostile or slow clients cannot hurt the pooler nor delay anyone's answer: the listener never
stops accepting, and a worker keeps at most :data:`MAX_CONNECTIONS` HTTP connections open —
a new one closes the oldest (:class:`_Connections`) rather than wait behind it, since a
request that is answered takes milliseconds and the oldest connection is the likeliest to
be idle or stalled. The request head must arrive within :data:`READ_TIMEOUT` seconds and fit
in :data:`MAX_HEAD` bytes; at most :data:`MAX_ANSWERS` requests whose head has arrived are
answered at once (each scrape sends every worker a message); the answer is written within
:data:`WRITE_TIMEOUT` seconds; request bodies are never read into memory. Nothing here
blocks the hub: sockets are gevent's, and the only other I/O is reading ``/proc`` through
psutil.

Freshness of ``/metrics``: each scrape first calls ``worker.exchange.publish_all()``, which
asks every worker to write its counters to shared memory now and waits for them
cooperatively (at most 2 s for a worker that does not answer). So a scrape sees exactly what
``SHOW STATS`` / ``SHOW POOLS`` would at that moment (the invariant "stats are exact"), not a
view up to 0.25 s old; at Prometheus' usual one scrape per 15 s, one control message per
worker per scrape costs nothing. ``/health`` and ``/ready`` only read worker slots and never
wait for another worker, so a probe is answered at once even when a worker hangs.

Metric names (all prefixed ``pgherd_``; times in seconds, sizes in bytes):

* per pool, labels ``database``, ``user``: gauges ``clients_active``, ``clients_waiting``,
  ``servers_active``, ``servers_idle``, ``servers_used``, ``servers_tested``,
  ``servers_login``, ``servers_being_canceled``, ``maxwait_seconds``; counters ``transactions_total``, ``queries_total``,
  ``received_bytes_total``, ``sent_bytes_total``, ``xact_time_seconds_total``,
  ``query_time_seconds_total``, ``wait_time_seconds_total``, ``client_logins_total``,
  ``server_assignments_total``, ``client_parses_total``, ``server_parses_total``,
  ``binds_total`` (PgBouncer's SHOW STATS totals; dead workers' shares included);
* per database (``database``): ``database_server_connections`` and
  ``database_max_server_connections`` (0 = unlimited); per user (``user``):
  ``user_server_connections`` and ``user_max_server_connections``;
* per worker slot (``worker``): ``worker_up``, ``worker_state`` (one series per state, 1 for
  the current one), ``worker_clients``, ``worker_servers``, ``worker_rss_bytes``,
  ``worker_cpu_seconds_total``, ``worker_open_fds``, ``worker_restarts_total``,
  ``worker_heartbeat_age_seconds``, ``worker_config_epoch``;
* service: ``info`` (label ``version``), ``workers_configured``, ``workers_live``,
  ``config_epoch``, ``reload_failures_total``, ``paused``.

Beside them, what the community exporter (prometheus-community/pgbouncer_exporter) makes of
PgBouncer 1.25's admin console, same names, labels and units, so that dashboards and alerts
written for it work unchanged (:meth:`Metrics.exporter`): ``pgbouncer_up``,
``pgbouncer_version_info``; from SHOW POOLS ``pgbouncer_pools_*`` (``database``, ``user``),
from SHOW STATS ``pgbouncer_stats_*_total`` (``database``), from SHOW DATABASES
``pgbouncer_databases_*`` (``name``, ``host``, ``port``, ``database``, ``force_user``,
``pool_mode``), from SHOW LISTS ``pgbouncer_databases``, ``_users``, ``_pools``,
``_free_clients``... , from SHOW CONFIG ``pgbouncer_config_max_client_connections`` and
``_max_user_connections``, from SHOW SERVERS ``pgbouncer_server_connections``. As the exporter
does against 1.25, there is no ``pgbouncer_databases_reserve_pool`` (1.24 renamed the column);
the admin console's own pool is left out (it pools nothing).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from importlib.metadata import version
from typing import TYPE_CHECKING, Callable, Iterator
from urllib.parse import urlsplit

import gevent
import gevent.lock
import gevent.server
import gevent.socket
import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from ipc import shm

from .admin import ADMIN_DB, COMPAT, SOCKET_COLS, database_names, user_names
from . import statuspage

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("pgherd")

MAX_CONNECTIONS = 64  # HTTP connections open at once per worker; a new one closes the oldest
MAX_ANSWERS = 16  # requests answered at once per worker; the others wait for their turn
MAX_HEAD = 8192  # request line + headers, bytes
READ_TIMEOUT = 5.0  # the request head must arrive within this
WRITE_TIMEOUT = 10.0  # the answer must be taken within this
DRAIN_LIMIT = 65536  # bytes of an unread request body swallowed before closing
HEARTBEAT_STALE = 5.0  # a worker whose heartbeat is older is not counted as live (at most
#                       heartbeat_timeout, after which the master replaces it anyway)

VERSION = version("pgherd")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_TEXT = "text/plain; charset=utf-8"

_servers: list[gevent.server.StreamServer] = []  # kept alive for the life of the worker


# --------------------------------------------------------------------------- serving


def serve(worker: Worker, listeners: list[socket.socket]) -> list[gevent.server.StreamServer]:
    """Start answering HTTP on ``listeners`` (already bound and listening) in this hub.

    Returns at once; the servers live until the worker process exits."""
    answering = gevent.lock.BoundedSemaphore(MAX_ANSWERS)
    connections = _Connections(functools.partial(_handle, worker, Metrics(worker), answering))
    servers = []
    for lsock in listeners:
        gsock = gevent.socket.socket(lsock.family, lsock.type, lsock.proto,
                                     fileno=lsock.detach())
        gsock.setblocking(False)
        server = gevent.server.StreamServer(gsock, connections)
        server.start()
        servers.append(server)
    _servers.extend(servers)
    return servers


class _Connections:
    """The worker's open HTTP connections, oldest first, each handled by ``handle`` in a
    greenlet of its own; at most :data:`MAX_CONNECTIONS`, by closing the oldest when a new
    one comes (its greenlet sees a hung-up client and ends)."""

    def __init__(self, handle: Callable[[gevent.socket.socket, object], None]) -> None:
        self.handle = handle
        self.open: dict[gevent.socket.socket, None] = {}  # insertion order: oldest first

    def __call__(self, sock: gevent.socket.socket, addr: object) -> None:
        self.open[sock] = None
        if len(self.open) > MAX_CONNECTIONS:
            oldest = next(iter(self.open))
            del self.open[oldest]
            oldest.close()
        try:
            self.handle(sock, addr)
        finally:
            self.open.pop(sock, None)


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _handle(worker: Worker, metrics: Metrics, answering: gevent.lock.BoundedSemaphore,
            sock: gevent.socket.socket, addr: object) -> None:
    """One connection: read one request, answer it, close."""
    try:
        method, headers = "GET", {}
        try:
            head = None
            with gevent.Timeout(READ_TIMEOUT, False):
                head = _read_head(sock)
            if head is None:  # timed out or hung up before a whole head arrived
                return
            method, target, headers = _parse_head(head)
            with answering:
                status, ctype, body, extra = respond(worker, metrics, method, target, headers)
        except _BadRequest as exc:
            status, ctype, body, extra = exc.status, _TEXT, (str(exc) + "\n").encode(), {}
        out = ["HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Unknown")),
               "Content-Type: " + ctype, "Content-Length: %d" % len(body),
               "Cache-Control: no-store", "Connection: close"]
        out += ["%s: %s" % kv for kv in extra.items()]
        data = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
        if method != "HEAD":
            data += body
        with gevent.Timeout(WRITE_TIMEOUT, False):
            sock.sendall(data)
            if status == 431 or _has_body(headers):
                # Unread request bytes would make close() send a RST that may destroy the
                # answer before the client reads it: let the client finish first.
                sock.shutdown(socket.SHUT_WR)
                left = DRAIN_LIMIT
                while left > 0:
                    chunk = sock.recv(min(left, 8192))
                    if not chunk:
                        break
                    left -= len(chunk)
    except OSError:
        pass  # the client went away
    except Exception:
        log.exception("HTTP request failed")
    finally:
        sock.close()


def _read_head(sock: gevent.socket.socket) -> bytes | None:
    """Bytes up to the blank line ending the request head; None if the client hung up."""
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")
        if end >= 0:
            if end > MAX_HEAD:
                break
            return buf[:end]
        if len(buf) > MAX_HEAD:
            break
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf += chunk
    raise _BadRequest(431, "request head larger than %d bytes" % MAX_HEAD)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _BadRequest(400, "malformed request line")
    method, target, proto = parts
    if not proto.startswith("HTTP/1."):
        raise _BadRequest(505, "only HTTP/1.x is served")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _has_body(headers: dict[str, str]) -> bool:
    if "transfer-encoding" in headers:
        return True
    try:
        return int(headers.get("content-length", "0")) > 0
    except ValueError:
        return True


def respond(worker: Worker, metrics: Metrics, method: str, target: str,
            headers: dict[str, str]) -> tuple[int, str, bytes, dict[str, str]]:
    """(status, content type, body, extra headers) of one request."""
    path = urlsplit(target).path or "/"
    if path not in ("/metrics", "/health", "/ready") + statuspage.PATHS:
        return 404, _TEXT, b"not found: try /, /metrics, /health or /ready\n", {}
    if method not in ("GET", "HEAD"):
        return 405, _TEXT, b"method not allowed\n", {"Allow": "GET, HEAD"}
    if path in statuspage.PATHS:
        return statuspage.respond(worker, path)
    if path == "/metrics":
        try:
            body, ctype = metrics.render(headers.get("accept", ""))
        except Exception:
            log.exception("rendering /metrics failed")
            return 500, _TEXT, b"internal error, see the log\n", {}
        return 200, ctype, body, {}
    status, text = (health if path == "/health" else ready)(worker)
    return status, _TEXT, (text + "\n").encode(), {}


# --------------------------------------------------------------------------- health, ready


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_after(worker: Worker) -> float:
    return min(HEARTBEAT_STALE, getattr(worker.settings, "heartbeat_timeout", HEARTBEAT_STALE))


def _live(slot: shm.WorkerSlot, now_ns: int, stale: float) -> bool:
    return (slot.pid != 0 and (now_ns - slot.heartbeat_ns) / 1e9 < stale
            and _pid_alive(slot.pid))


def health(worker: Worker) -> tuple[int, str]:
    """200 while the master and at least one worker live."""
    seg = worker.segment
    mpid = seg.master_pid
    if not _pid_alive(mpid):
        return 503, "unhealthy: master (pid %d) is not running" % mpid
    now = time.monotonic_ns()
    stale = _stale_after(worker)
    live = sum(1 for s in seg.read_all() if _live(s, now, stale))
    if not live:
        return 503, "unhealthy: no live worker"
    return 200, "ok: master pid %d, %d live worker%s" % (mpid, live, "" if live == 1 else "s")


def ready(worker: Worker) -> tuple[int, str]:
    """200 when every configured worker slot has a live READY worker, none paused."""
    seg = worker.segment
    mpid = seg.master_pid
    if not _pid_alive(mpid):
        return 503, "not ready: master (pid %d) is not running" % mpid
    wanted = worker.settings.workers
    now = time.monotonic_ns()
    problems = []
    for s in seg.read_all(min(wanted, seg.max_workers)):
        if not s.pid or not _pid_alive(s.pid):
            problems.append("worker %d not running" % s.slot)
        elif s.state == shm.DRAINING:
            problems.append("worker %d shutting down" % s.slot)
        elif s.state != shm.READY:
            problems.append("worker %d %s" % (s.slot, shm.STATE_NAMES.get(s.state, "unknown")))
        elif (now - s.heartbeat_ns) / 1e9 >= _stale_after(worker):
            problems.append("worker %d heartbeat %.0fs old" % (
                s.slot, (now - s.heartbeat_ns) / 1e9))
        elif s.paused:
            problems.append("worker %d paused" % s.slot)
    if problems:
        return 503, "not ready: " + "; ".join(problems)
    return 200, "ready: %d worker%s serving" % (wanted, "" if wanted == 1 else "s")


# --------------------------------------------------------------------------- /metrics

_POOL_GAUGES = (
    ("clients_active", "cl_active", "Clients linked to a server or idle (SHOW POOLS cl_active)"),
    ("clients_waiting", "cl_waiting", "Clients waiting for a server (SHOW POOLS cl_waiting)"),
    ("servers_active", "sv_active", "Server connections linked to a client"),
    ("servers_idle", "sv_idle", "Server connections idle and ready for a client"),
    ("servers_used", "sv_used", "Server connections idle longer than server_check_delay"),
    ("servers_tested", "sv_tested", "Server connections running a reset or check query"),
    ("servers_login", "sv_login", "Server connections logging in"),
    ("servers_being_canceled", "sv_being_canceled",
     "Server connections kept from reuse until a cancel request for them is done"),
)
#: (metric name without _total, STAT_FIELDS name, divisor, help)
_POOL_COUNTERS = (
    ("transactions", "xact_count", 1, "Transactions pooled (SHOW STATS total_xact_count)"),
    ("queries", "query_count", 1, "Queries pooled (SHOW STATS total_query_count)"),
    ("received_bytes", "recv_bytes", 1, "Bytes received from clients (total_received)"),
    ("sent_bytes", "sent_bytes", 1, "Bytes sent to clients (total_sent)"),
    ("xact_time_seconds", "xact_time", 1e6, "Time spent in transactions (total_xact_time)"),
    ("query_time_seconds", "query_time", 1e6, "Time spent in queries (total_query_time)"),
    ("wait_time_seconds", "wait_time", 1e6, "Time clients waited for a server (total_wait_time)"),
    ("client_logins", "client_login_count", 1, "Client logins (total_client_login_count)"),
    ("server_assignments", "server_assignment_count", 1,
     "Times a server was assigned to a client (total_server_assignment_count)"),
    ("client_parses", "client_parse_count", 1, "Parse messages from clients"),
    ("server_parses", "server_parse_count", 1, "Parse messages sent to servers"),
    ("binds", "bind_count", 1, "Bind messages from clients"),
)


#: SHOW POOLS column -> the exporter's pgbouncer_pools_<name> (a gauge per pool).
_EXPORTER_POOLS = (
    ("cl_active", "client_active_connections",
     "Client connections linked to server connection and able to process queries"),
    ("cl_active_cancel_req", "client_active_cancel_connections",
     "Client connections that have forwarded query cancellations to the server"),
    ("cl_waiting", "client_waiting_connections", "Client connections waiting on a server"),
    ("cl_waiting_cancel_req", "client_waiting_cancel_connections",
     "Client connections that have not forwarded query cancellations to the server yet"),
    ("sv_active", "server_active_connections", "Server connections linked to a client"),
    ("sv_active_cancel", "server_active_cancel_connections",
     "Server connections that are currently forwarding a cancel request"),
    ("sv_being_canceled", "server_being_canceled_connections",
     "Servers waiting until the cancel requests sent for them have completed"),
    ("sv_idle", "server_idle_connections", "Server connections idle and ready for a client"),
    ("sv_used", "server_used_connections",
     "Server connections idle more than server_check_delay, needing server_check_query"),
    ("sv_tested", "server_testing_connections",
     "Server connections running either server_reset_query or server_check_query"),
    ("sv_login", "server_login_connections", "Server connections logging in"),
)
#: SHOW STATS column (pgherd's STAT_FIELDS name) -> pgbouncer_stats_<name>, divisor.
_EXPORTER_STATS = (
    ("query_count", "queries_pooled_total", 1, "Total number of SQL queries pooled"),
    ("query_time", "queries_duration_seconds_total", 1e6,
     "Total number of seconds spent when actively connected to PostgreSQL, executing queries"),
    ("recv_bytes", "received_bytes_total", 1, "Total bytes of network traffic received"),
    ("sent_bytes", "sent_bytes_total", 1, "Total bytes of network traffic sent"),
    ("wait_time", "client_wait_seconds_total", 1e6,
     "Time spent by clients waiting for a server in seconds"),
    ("xact_count", "sql_transactions_pooled_total", 1, "Total number of SQL transactions pooled"),
    ("xact_time", "server_in_transaction_seconds_total", 1e6,
     "Total number of seconds spent connected to PostgreSQL in a transaction"),
)
#: SHOW LISTS row -> pgbouncer_<name>.
_EXPORTER_LISTS = (("databases", "databases"), ("users", "users"), ("pools", "pools"),
                   ("free_clients", "free_clients"), ("used_clients", "used_clients"),
                   ("login_clients", "login_clients"), ("free_servers", "free_servers"),
                   ("used_servers", "used_servers"), ("dns_names", "cached_dns_names"),
                   ("dns_zones", "cached_dns_zones"), ("dns_queries", "in_flight_dns_queries"))


class Metrics:
    """Renders the whole service's metrics from shared memory, one scrape at a time."""

    def __init__(self, worker: Worker, fresh: bool = True) -> None:
        self.worker = worker
        self.fresh = fresh  # publish_all() before reading (off in offline tests)
        self._procs: dict[int, psutil.Process] = {}

    def render(self, accept: str = "") -> tuple[bytes, str]:
        if self.fresh:
            self.worker.exchange.publish_all()
        encoder, ctype = choose_encoder(accept)
        return encoder(self), ctype

    # prometheus_client's Collector protocol: generate_latest(self) calls collect().
    def collect(self) -> Iterator[Metric]:
        worker = self.worker
        seg = worker.segment
        settings = worker.settings
        rows = seg.snapshot_rows()
        now_ns = time.monotonic_ns()
        p = "pgherd_"

        # ---- pools
        pools = sorted((r for r in rows if r.kind == shm.POOL), key=lambda r: r.names)
        labels = ["database", "user"]
        gauges = {name: GaugeMetricFamily(p + name, text, labels=labels)
                  for name, _, text in _POOL_GAUGES}
        maxwait = GaugeMetricFamily(p + "maxwait_seconds",
                                    "Age of the oldest waiting client (SHOW POOLS maxwait)",
                                    labels=labels)
        counters = {name: CounterMetricFamily(p + name, text, labels=labels)
                    for name, _, _, text in _POOL_COUNTERS}
        for r in pools:
            names = list(r.names[:2])
            t = r.totals
            for name, field, _ in _POOL_GAUGES:
                gauges[name].add_metric(names, t[field])
            maxwait.add_metric(names, r.wait_ns(now_ns) / 1e9)
            for name, field, div, _ in _POOL_COUNTERS:
                counters[name].add_metric(names, t[field] / div)
        yield from gauges.values()
        yield maxwait
        yield from counters.values()

        # ---- databases and users: server connections against max_db/max_user_connections
        db_cur = GaugeMetricFamily(p + "database_server_connections",
                                   "Server connections of a database, all users and workers",
                                   labels=["database"])
        db_max = GaugeMetricFamily(p + "database_max_server_connections",
                                   "max_db_connections of a database (0 = unlimited)",
                                   labels=["database"])
        user_cur = GaugeMetricFamily(p + "user_server_connections",
                                     "Server connections of a user, all databases and workers",
                                     labels=["user"])
        user_max = GaugeMetricFamily(p + "user_max_server_connections",
                                     "max_user_connections of a user (0 = unlimited)",
                                     labels=["user"])
        databases = worker.config.databases
        users = worker.config.users
        for r in sorted(rows, key=lambda r: (r.kind, r.names)):
            if r.kind == shm.DATABASE:
                name = r.names[0]
                db = databases.get(name) or databases.get("*")
                limit = db.max_db_connections if db is not None else None
                db_cur.add_metric([name], r.totals["servers"])
                db_max.add_metric([name], settings.max_db_connections if limit is None
                                  else limit)
            elif r.kind == shm.USER:
                name = r.names[0]
                u = users.get(name)
                limit = u.max_user_connections if u is not None else None
                user_cur.add_metric([name], r.totals["servers"])
                user_max.add_metric([name], settings.max_user_connections if limit is None
                                    else limit)
        yield from (db_cur, db_max, user_cur, user_max)

        # ---- workers
        wanted = settings.workers
        slots = [s for s in seg.read_all() if s.slot < wanted or s.pid]
        wl = ["worker"]
        up = GaugeMetricFamily(p + "worker_up", "1 while a worker process runs in the slot",
                               labels=wl)
        state = GaugeMetricFamily(p + "worker_state", "Worker state (1 for the current one)",
                                  labels=["worker", "state"])
        clients = GaugeMetricFamily(p + "worker_clients", "Clients of a worker (incl. logging in)",
                                    labels=wl)
        servers = GaugeMetricFamily(p + "worker_servers", "Server connections of a worker",
                                    labels=wl)
        rss = GaugeMetricFamily(p + "worker_rss_bytes", "Resident memory of a worker",
                                labels=wl)
        cpu = CounterMetricFamily(p + "worker_cpu_seconds", "CPU time (user+system) of a worker",
                                  labels=wl)
        fds = GaugeMetricFamily(p + "worker_open_fds", "Open file descriptors of a worker",
                                labels=wl)
        restarts = CounterMetricFamily(p + "worker_restarts",
                                       "Times the master respawned this worker slot", labels=wl)
        beat = GaugeMetricFamily(p + "worker_heartbeat_age_seconds",
                                 "Seconds since the worker's last heartbeat", labels=wl)
        epoch = GaugeMetricFamily(p + "worker_config_epoch",
                                  "Configuration epoch the worker has applied", labels=wl)
        live = 0
        paused = 0
        stale = _stale_after(worker)
        pids = set()
        for s in slots:
            w = [str(s.slot)]
            up.add_metric(w, 1 if s.pid else 0)
            for code, text in shm.STATE_NAMES.items():
                state.add_metric([w[0], text], 1 if s.state == code else 0)
            restarts.add_metric(w, s.restarts)
            if not s.pid:
                continue
            pids.add(s.pid)
            if _live(s, now_ns, stale):
                live += 1
            if s.paused:
                paused = 1
            clients.add_metric(w, s.logins + s.clients)
            servers.add_metric(w, s.servers)
            beat.add_metric(w, max(0, now_ns - s.heartbeat_ns) / 1e9)
            epoch.add_metric(w, s.epoch)
            usage = self._usage(s.pid)
            if usage is not None:
                rss.add_metric(w, usage[0])
                cpu.add_metric(w, usage[1])
                fds.add_metric(w, usage[2])
        for pid in list(self._procs):
            if pid not in pids:
                del self._procs[pid]
        yield from (up, state, clients, servers, rss, cpu, fds, restarts, beat, epoch)

        # ---- service
        info = GaugeMetricFamily(p + "info", "pgherd version", labels=["version"])
        info.add_metric([VERSION], 1)
        yield info
        yield GaugeMetricFamily(p + "workers_configured", "Worker processes configured",
                                value=wanted)
        yield GaugeMetricFamily(p + "workers_live", "Worker processes running with a fresh "
                                "heartbeat", value=live)
        yield GaugeMetricFamily(p + "config_epoch", "Configuration epoch (raised by each "
                                "successful reload)", value=seg.epoch)
        yield CounterMetricFamily(p + "reload_failures", "Reloads refused because the new "
                                  "configuration was invalid", value=seg.reload_failures)
        yield GaugeMetricFamily(p + "paused", "1 while the pooler is paused (PAUSE)",
                                value=paused)
        yield from self.exporter(pools, now_ns)

    def exporter(self, pools: list[shm.RowSnapshot], now_ns: int) -> Iterator[Metric]:
        """The community PgBouncer exporter's metrics, as it would scrape pgherd's console."""
        worker = self.worker
        settings = worker.settings
        p = "pgbouncer_"
        yield GaugeMetricFamily(p + "up", "The pgbouncer scrape succeeded", value=1)
        info = GaugeMetricFamily(p + "version_info", "The pgbouncer version info",
                                 labels=["version"])
        info.add_metric(["PgBouncer %s (pgherd %s)" % (COMPAT, VERSION)], 1)  # SHOW VERSION
        yield info

        labels = ["database", "user"]
        gauges = [(column, GaugeMetricFamily(p + "pools_" + name, text, labels=labels))
                  for column, name, text in _EXPORTER_POOLS]
        maxwait = GaugeMetricFamily(p + "pools_client_maxwait_seconds",
                                    "Age of oldest unserved client connection, in seconds",
                                    labels=labels)
        per_db: dict[str, list[int]] = {}
        for r in pools:
            names = list(r.names[:2])
            for column, family in gauges:
                family.add_metric(names, r.totals.get(column, 0))  # cancel lists: none
            maxwait.add_metric(names, r.wait_ns(now_ns) // 1_000_000_000)  # SHOW POOLS maxwait
            acc = per_db.setdefault(r.names[0], [0] * len(_EXPORTER_STATS))
            for i, (field, *_) in enumerate(_EXPORTER_STATS):
                acc[i] += r.totals[field]
        yield from (family for _, family in gauges)
        yield maxwait
        for i, (_, name, div, text) in enumerate(_EXPORTER_STATS):
            family = CounterMetricFamily(p + "stats_" + name, text, labels=["database"])
            for db, acc in sorted(per_db.items()):
                family.add_metric([db], acc[i] / div)
            yield family

        yield from self._exporter_databases(database_names(worker))
        lists = {"databases": len(database_names(worker)), "users": len(user_names(worker)),
                 "pools": 1 + len(pools), "free_clients": 0, "free_servers": 0,
                 "used_clients": sum(r.totals["clients"] for r in pools),
                 "login_clients": sum(s.logins for s in worker.segment.read_all() if s.pid),
                 "used_servers": sum(r.totals["servers"] for r in pools),
                 "dns_names": 0, "dns_zones": 0, "dns_queries": 0}
        for row, name in _EXPORTER_LISTS:
            yield GaugeMetricFamily(p + name, "Count of " + row.replace("_", " "),
                                    value=lists[row])
        yield GaugeMetricFamily(p + "config_max_client_connections",
                                "Config maximum number of client connections",
                                value=settings.max_client_conn)
        yield GaugeMetricFamily(p + "config_max_user_connections",
                                "Config maximum number of server connections per user",
                                value=settings.max_user_connections)

        columns = [name for name, _ in SOCKET_COLS]
        pick = [columns.index(c) for c in ("user", "database", "state", "addr", "port",
                                           "close_needed")]
        counts: dict[tuple, int] = {}
        for row in worker.exchange.gather("SERVERS"):
            user, db, state, addr, port, close_needed = (row[i] for i in pick)
            key = (user, db, state, "%s_%d" % (addr, port), "true" if close_needed else "false")
            counts[key] = counts.get(key, 0) + 1
        servers = GaugeMetricFamily(p + "server_connections",
                                    "Server connections with state information",
                                    labels=["user", "database", "state", "addr",
                                            "close_needed"])
        for key, n in sorted(counts.items()):
            servers.add_metric(list(key), n)
        yield servers

    def _exporter_databases(self, names: list[str]) -> Iterator[Metric]:
        """pgbouncer_databases_* per configured database, as SHOW DATABASES has them."""
        worker = self.worker
        s = worker.settings
        labels = ["name", "host", "port", "database", "force_user", "pool_mode"]
        text = {"pool_size": "Maximum number of server connections",
                "max_connections": "Maximum number of allowed connections for this database",
                "current_connections": "Current number of connections for this database",
                "paused": "1 if this database is currently paused, else 0",
                "disabled": "1 if this database is currently disabled, else 0"}
        families = {k: GaugeMetricFamily("pgbouncer_databases_" + k, v, labels=labels)
                    for k, v in text.items()}
        current = {r.names[0]: r.totals["servers"] for r in worker.segment.snapshot_rows()
                   if r.kind == shm.DATABASE}
        for name in names:
            db = None if name == ADMIN_DB else worker.database(name)
            if db is None:
                continue  # the admin console's entry: it pools nothing
            values = {
                "pool_size": s.default_pool_size if db.pool_size is None else db.pool_size,
                "max_connections": db.max_db_connections or s.max_db_connections,
                "current_connections": current.get(name, 0),
                "paused": int(worker.is_paused(name)),
                "disabled": int(worker.is_disabled(name))}
            label_values = [name, ",".join(db.host), str(db.port), db.dbname or name,
                            db.user or "", db.pool_mode or ""]
            for key, family in families.items():
                family.add_metric(label_values, values[key])
        yield from families.values()

    def _usage(self, pid: int) -> tuple[int, float, int] | None:
        """(rss, cpu seconds, open fds) of a worker; Process objects are cached per pid."""
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                return proc.memory_info().rss, times.user + times.system, proc.num_fds()
        except psutil.Error:
            self._procs.pop(pid, None)
            return None
