"""The admin console: virtual database ``pgbouncer`` (also ``pgherd``), simple protocol only.

Access as in PgBouncer: ``admin_users`` may run everything, ``stats_users`` only SHOW (not
SHOW FDS); over the Unix socket the OS user running pgherd may log in as ``pgbouncer`` without a
password. Errors are ERROR 08P01 with the connection kept.

Every SHOW command of PgBouncer 1.25 (the version SHOW VERSION names) answers with that
version's columns, names and types in the order its ``src/admin.c`` and ``src/stats.c`` write
them; the admin database has its own database/pool/user/stats rows and its clients are listed,
as in PgBouncer. pgherd's own view is SHOW WORKERS. What does not apply to pgherd answers with
the right columns and what is true of pgherd: no peers, no DNS cache (every connect resolves
afresh), SHOW MEM counts objects instead of slab caches, SHOW FDS lists each worker's sockets
but passes no descriptors (there is no online restart to take them over).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
import time
from importlib.metadata import version
from typing import TYPE_CHECKING, Callable, Iterable


from ipc import shm
from prefork import log as plog
from prefork.settings import SETTINGS

from . import procstat, proto
from .login import ClientGone, LoginTimeout, Refused, authenticate, read_message, send_all
from .proto import MessageReader, ProtocolError

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("pgherd")

VERSION = version("pgherd")
_COMMAND = re.compile(r"^\s*(\w+)(?:\s+(\w+))?\s*;?\s*$")

I4, I8, NUM, TEXT, BYTEA = (proto.OID_INT4, proto.OID_INT8, proto.OID_NUMERIC, proto.OID_TEXT,
                            proto.OID_BYTEA)


class AdminError(Exception):
    def __init__(self, text: str, sqlstate: str = "08P01") -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


class AdminSession:
    """One console connection, listed in SHOW CLIENTS as PgBouncer lists its admin clients."""

    __slots__ = ("id", "user", "sock", "addr", "port", "connect_time", "request_time",
                 "application_name")

    def __init__(self, cid: int, user: str, sock: socket.socket, peer: tuple[str, int],
                 application_name: str) -> None:
        self.id = cid
        self.user = user
        self.sock = sock
        self.addr, self.port = peer
        self.connect_time = self.request_time = time.time()
        self.application_name = application_name


def admin_login(worker: Worker, sock: socket.socket, reader: MessageReader, deadline: float,
                user: str, dbname: str, cid: int, peer: tuple[str, int],
                params: dict[str, str]) -> None:
    """Greenlet: authenticate an admin/stats user, then serve console commands until EOF."""
    s = worker.settings
    session = None
    try:
        if _unix_peer_is_us(sock) and user == "pgbouncer":
            auth_ok = proto.auth_request(proto.AUTH_OK)
            admin = True
        else:
            admin = user in s.admin_users
            if not admin and user not in s.stats_users and s.auth_type != "any":
                raise Refused("not allowed")
            _, auth_ok = authenticate(worker, sock, reader, deadline, user, _ADMIN_DB)
        welcome = [("server_version", "%s/bouncer" % COMPAT), ("client_encoding", "UTF8"),
                   ("server_encoding", "UTF8"), ("DateStyle", "ISO"), ("TimeZone", "GMT"),
                   ("standard_conforming_strings", "on"), ("is_superuser", "on")]
        out = auth_ok + b"".join(proto.parameter_status(k, v) for k, v in welcome)
        send_all(sock, out + proto.backend_key_data(0, 0) + proto.ready_for_query(), deadline)
        reader.startup = False
        reader.max_size = proto.MAX_CONSOLE_MESSAGE
        session = worker.admins[cid] = AdminSession(cid, user, sock, peer,
                                                     params.get("application_name", ""))
        _serve(worker, session, reader, admin)
    except Refused as exc:
        try:
            sock.send(proto.error_response(exc.text, exc.sqlstate))
        except OSError:
            pass
        log.warning("%s pooler error: %s", plog.socket_prefix("C", cid, dbname, user, *peer),
                    exc.log_text)
    except (ClientGone, LoginTimeout, ProtocolError):
        pass
    finally:
        if session is not None:
            worker.admins.pop(cid, None)
        sock.close()


class _AdminDb:
    user = None


_ADMIN_DB = _AdminDb()


def _unix_peer_is_us(sock: socket.socket) -> bool:
    if sock.family != socket.AF_UNIX:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def _serve(worker: Worker, session: AdminSession, reader: MessageReader, admin: bool) -> None:
    sock = session.sock
    stats = worker.admin_stats
    while True:
        mtype, body = read_message(sock, reader, time.monotonic() + 1e9)
        if mtype == proto.F_TERMINATE:
            return
        if mtype != proto.F_QUERY:
            send_all(sock, proto.error_response(
                "extended query protocol not supported by admin console"), time.monotonic() + 10)
            return
        started = time.monotonic()
        session.request_time = time.time()
        text = body.rstrip(b"\x00").decode("utf-8", "replace")
        try:
            out = run_command(worker, text, admin)
        except AdminError as exc:
            out = proto.error_response(str(exc), exc.sqlstate, "ERROR")
        out += proto.ready_for_query()
        send_all(sock, out, time.monotonic() + 10)
        # The admin pool's stats, as PgBouncer counts its console: each command is a
        # transaction of one query (statement mode), its bytes both ways.
        elapsed = int((time.monotonic() - started) * 1e6)
        for field, add in (("server_assignment_count", 1), ("xact_count", 1),
                           ("query_count", 1), ("recv_bytes", len(body) + 5),
                           ("sent_bytes", len(out)), ("xact_time", elapsed),
                           ("query_time", elapsed)):
            stats[_STAT_INDEX[field]] += add


_SET = re.compile(r"^\s*SET\s+(\w+)\s*(?:=|\s+TO\s+)\s*(?:'((?:[^']|'')*)'|(\S+?))\s*;?\s*$",
                  re.IGNORECASE)
#: Session parameters drivers SHOW or SET on connect: answered here, as PgBouncer does.
_FAKE_PARAMS = {"client_encoding": "UTF-8", "default_transaction_isolation": "read committed",
                "standard_conforming_strings": "on", "datestyle": "ISO", "timezone": "GMT"}


def run_command(worker: Worker, text: str, admin: bool) -> bytes:
    """Execute one console command; returns the response messages (without ReadyForQuery)."""
    if not text.strip().rstrip(";"):
        return proto.EMPTY_QUERY_RESPONSE
    m = _SET.match(text)
    if m:
        key = m.group(1).lower()
        value = m.group(2).replace("''", "'") if m.group(2) is not None else m.group(3)
        if key in _FAKE_PARAMS:
            return proto.notice_response("SET ignored") + proto.command_complete("SET")
        if not admin:
            raise AdminError("admin access needed")
        _check(worker.exchange.command_master("SET", "%s=%s" % (key, value)))
        return proto.command_complete("SET %s=%s" % (key, value))
    m = _COMMAND.match(text)
    if not m:
        raise AdminError("invalid command '%s', use SHOW HELP;" % text.strip())
    verb, arg = m.group(1).upper(), m.group(2) or ""
    if verb in ("SHOW", "SELECT") and arg:
        what = arg.upper()
        if arg.lower() in _FAKE_PARAMS:
            return _table([(arg.lower(), TEXT)], [(_FAKE_PARAMS[arg.lower()],)], "SHOW")
        if what == "HELP":
            return proto.notice_response("Console usage", detail=_HELP) + \
                proto.command_complete("SHOW")
        show = _SHOW.get(what)
        if show is None:
            raise AdminError("invalid command '%s', use SHOW HELP;" % text.strip())
        if what == "FDS" and not admin:  # cancel keys of every client
            raise AdminError("admin access needed")
        columns, rows = show(worker)
        return _table(columns, rows, "SHOW")
    if not admin:
        raise AdminError("admin access needed")
    control = _CONTROL.get(verb)
    if control is None:
        raise AdminError("invalid command '%s', use SHOW HELP;" % text.strip())
    return control(worker, arg)


_HELP = """
	SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION
	SHOW PEERS|PEER_POOLS
	SHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE
	SHOW DNS_HOSTS|DNS_ZONES
	SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS
	SET key = arg
	RELOAD
	PAUSE [<db>]
	RESUME [<db>]
	DISABLE <db>
	ENABLE <db>
	RECONNECT [<db>]
	KILL [<db>]
	KILL_CLIENT <client_id>
	SUSPEND
	SHUTDOWN
	SHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS
	WAIT_CLOSE [<db>]
	SHOW WORKERS (pgherd)"""


def _table(columns: list[tuple[str, int]], rows: Iterable[Iterable[object]], tag: str) -> bytes:
    out = bytearray(proto.row_description(columns))
    for row in rows:
        out += proto.data_row(row)
    out += proto.command_complete(tag)
    return bytes(out)


#: The admin database's name in every view, whichever alias the console was reached by.
ADMIN_DB = "pgbouncer"
_STAT_INDEX = {name: i for i, name in enumerate(shm.STAT_FIELDS)}


# --------------------------------------------------------------------------- SHOW: service


#: What SHOW VERSION says: monitoring written for PgBouncer parses "PgBouncer x.y.z" to know
#: which columns to expect; pgherd serves PgBouncer 1.25's columns, and says what it is.
COMPAT = "1.25.2"


def _show_version(worker: Worker):
    return [("version", TEXT)], [("PgBouncer %s (pgherd %s)" % (COMPAT, VERSION),)]


def _show_config(worker: Worker):
    s = worker.settings
    rows = []
    for name in sorted(SETTINGS):
        setting = SETTINGS[name]
        rows.append((name, setting.render(getattr(s, name)), setting.render(setting.default),
                     "yes" if setting.reload else "no"))
    return [("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)], rows


def _show_state(worker: Worker):
    state = worker.state
    return [("key", TEXT), ("value", TEXT)], [
        ("active", "no" if state.paused else "yes"),
        ("paused", "yes" if state.paused else "no"),
        ("suspended", "no"),
    ]


def _admin_clients(worker: Worker) -> list[list]:
    """The console sessions of every worker, as SHOW CLIENTS rows."""
    return worker.exchange.gather("ADMIN")


def _show_lists(worker: Worker):
    rows = worker.segment.snapshot_rows()
    slots = [w for w in worker.segment.read_all() if w.pid]
    clients = sum(r.totals["clients"] for r in rows if r.kind == shm.POOL)
    servers = sum(r.totals["servers"] for r in rows if r.kind == shm.POOL)
    items = [  # the admin database, its user and its pool are counted, as in PgBouncer
        ("databases", len(database_names(worker))), ("users", len(user_names(worker))),
        ("peers", 0), ("pools", 1 + sum(1 for r in rows if r.kind == shm.POOL)),
        ("peer_pools", 0), ("free_clients", 0),
        ("used_clients", clients + len(_admin_clients(worker))),
        ("login_clients", sum(w.logins for w in slots)), ("free_servers", 0),
        ("used_servers", servers), ("dns_names", 0), ("dns_zones", 0), ("dns_queries", 0),
        ("dns_pending", 0),
    ]
    return [("list", TEXT), ("items", I4)], items


def _show_workers(worker: Worker):
    """pgherd's own: one row per worker slot (psutil for what the kernel knows).

    ``cpu_percent`` is the average over the worker's life; ``cpu_seconds`` lets a poller
    (``pgherd top``) work out the CPU of the last interval."""
    cols = [("slot", I4), ("pid", I4), ("state", TEXT), ("uptime", I8),
            ("heartbeat_age_ms", I8), ("clients", I4), ("servers", I4), ("rss", I8),
            ("cpu_percent", NUM), ("open_fds", I4), ("restarts", I4), ("epoch", I8),
            ("servers_sent", I8), ("servers_received", I8), ("waiting", I4),
            ("cpu_seconds", NUM)]
    now = time.monotonic_ns()
    rows = []
    for w in worker.segment.read_all(worker.settings.workers):
        use = procstat.usage(w.pid) if w.pid else None
        cpu = cpu_seconds = None
        if use is not None:
            cpu_seconds = round(use.cpu_seconds, 2)
            cpu = round(100.0 * use.cpu_seconds / max((now - w.started_ns) / 1e9, 1e-3), 1)
        state = "paused" if w.paused else shm.STATE_NAMES.get(w.state, "?")
        if state == "ready" and now - w.heartbeat_ns > shm.STALLED_AFTER_NS:
            state = "stalled"  # nothing is handed to it until it beats again
        rows.append((w.slot, w.pid or None, state if w.pid else "down",
                     (now - w.started_ns) // 1_000_000_000 if w.pid else 0,
                     (now - w.heartbeat_ns) // 1_000_000 if w.pid else None, w.clients,
                     w.servers, use.rss if use else None, cpu, use.open_fds if use else None,
                     w.restarts, w.epoch, *worker.segment.handovers(w.slot), w.waiting,
                     cpu_seconds))
    return cols, rows


def _object_size(objects: Iterable[object]) -> int:
    """Bytes of one object of a kind with its attribute storage (0 when none is at hand)."""
    for obj in objects:
        size = sys.getsizeof(obj)
        slots = getattr(type(obj), "__slots__", ())
        return size + sum(sys.getsizeof(getattr(obj, n, None)) for n in slots)
    return 0


def _show_mem(worker: Worker):
    """PgBouncer lists its slab caches; pgherd has none. Its rows: the objects the whole
    service holds of each kind (``used``), with this worker's size of one (``size``); nothing
    is kept on a free list (``free`` 0)."""
    rows = worker.segment.snapshot_rows()
    pools = [r for r in rows if r.kind == shm.POOL]
    servers = [s for p in worker.pools.values() for s in p.servers]
    kinds = [
        ("user_cache", worker.config.users.values(), len(user_names(worker))),
        ("db_cache", worker.config.databases.values(), len(database_names(worker))),
        ("pool_cache", worker.pools.values(), 1 + len(pools)),
        ("server_cache", servers, sum(r.totals["servers"] for r in pools)),
        ("client_cache", worker.clients.values(),
         sum(r.totals["clients"] for r in pools) + len(_admin_clients(worker))),
    ]
    out = []
    for name, objects, used in kinds:
        size = _object_size(objects)
        out.append((name, size, used, 0, min(size * used, 2**31 - 1)))
    return [("name", TEXT), ("size", I4), ("used", I4), ("free", I4), ("memtotal", I4)], out


def _show_dns_hosts(worker: Worker):
    # pgherd keeps no DNS cache: each server connect resolves its host afresh.
    return [("hostname", TEXT), ("ttl", I8), ("addrs", TEXT)], []


def _show_dns_zones(worker: Worker):
    return [("zonename", TEXT), ("serial", I8), ("count", I4)], []


def _show_peers(worker: Worker):
    return [("peer_id", I4), ("host", TEXT), ("port", I4), ("pool_size", I4)], []


def _show_peer_pools(worker: Worker):
    return [("peer_id", I4), ("cl_active_cancel_req", I4), ("cl_waiting_cancel_req", I4),
            ("sv_active_cancel", I4), ("sv_login", I4)], []


# --------------------------------------------------------------------------- SHOW: pools, stats


def _pool_rows(worker: Worker) -> list[shm.RowSnapshot]:
    """Every worker's share of every pool, fresh: each worker publishes before we read."""
    worker.exchange.publish_all()
    return [r for r in worker.segment.snapshot_rows() if r.kind == shm.POOL]


def _pool_mode(worker: Worker, dbname: str, user: str) -> str:
    pool = worker.pools.get((dbname, user))
    if pool is not None:
        return pool.mode
    u = worker.config.users.get(user)
    db = worker.database(dbname)
    for src in (u, db):
        if src is not None and src.pool_mode:
            return src.pool_mode
    return worker.settings.pool_mode


def _load_balance_hosts(worker: Worker, dbname: str) -> str | None:
    """Shown only for a database with several hosts, as PgBouncer does."""
    db = worker.database(dbname)
    if db is None or len(db.host) < 2:
        return None
    return db.load_balance_hosts or "round-robin"


def _show_pools(worker: Worker):
    cols = [("database", TEXT), ("user", TEXT), ("cl_active", I4), ("cl_waiting", I4),
            ("cl_active_cancel_req", I4), ("cl_waiting_cancel_req", I4), ("sv_active", I4),
            ("sv_active_cancel", I4), ("sv_being_canceled", I4), ("sv_idle", I4),
            ("sv_used", I4), ("sv_tested", I4), ("sv_login", I4), ("maxwait", I4),
            ("maxwait_us", I4), ("pool_mode", TEXT), ("load_balance_hosts", TEXT)]
    now = time.monotonic_ns()
    rows = [(ADMIN_DB, ADMIN_DB, len(_admin_clients(worker)), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
             0, 0, "statement", None)]
    for r in _pool_rows(worker):
        t = r.totals
        wait_us = r.wait_ns(now) // 1000
        rows.append((r.names[0], r.names[1], t["cl_active"], t["cl_waiting"], 0, 0,
                     t["sv_active"], 0, t["sv_being_canceled"], t["sv_idle"], t["sv_used"],
                     t["sv_tested"],
                     t["sv_login"], wait_us // 1_000_000, wait_us % 1_000_000,
                     _pool_mode(worker, *r.names), _load_balance_hosts(worker, r.names[0])))
    return cols, sorted(rows, key=lambda r: (r[0], r[1]))


#: SHOW STATS counters, PgBouncer 1.25's (pgherd's client_login_count is not among them).
_STATS = shm.STAT_FIELDS[:11]


def _per_db(worker: Worker) -> dict[str, list[int]]:
    """Stats totals per database (PgBouncer sums its pools, the admin pool's included)."""
    per_db: dict[str, list[int]] = {ADMIN_DB: [0] * len(_STATS)}
    for row in worker.exchange.gather("ADMIN_STATS"):
        per_db[ADMIN_DB] = [a + b for a, b in zip(per_db[ADMIN_DB], row)]
    for r in _pool_rows(worker):
        acc = per_db.setdefault(r.names[0], [0] * len(_STATS))
        for i, name in enumerate(_STATS):
            acc[i] += r.totals[name]
    return per_db


def _averages(worker: Worker, databases: Iterable[str]) -> dict[str, list[int]]:
    """Per database, per second (counts, bytes) or per event (times) over the last period."""
    zero = [0.0] * len(_STATS)
    return {db: [int(v) for v in worker.averages.get(db, zero)[:len(_STATS)]]
            for db in databases}


_TOTAL_NAMES = ("server_assignment_count", "xact_count", "query_count", "received", "sent",
                "xact_time", "query_time", "wait_time", "client_parse_count",
                "server_parse_count", "bind_count")


def _show_stats(worker: Worker):
    cols = [("database", TEXT)] + [("total_" + n, NUM) for n in _TOTAL_NAMES] + \
        [("avg_" + n.replace("received", "recv"), NUM) for n in _TOTAL_NAMES]
    totals = _per_db(worker)
    avgs = _averages(worker, totals)
    return cols, [(db, *acc, *avgs[db]) for db, acc in sorted(totals.items())]


_BYTES = {"received": "bytes_received", "sent": "bytes_sent"}


def _show_stats_totals(worker: Worker):
    cols = [("database", TEXT)] + [(_BYTES.get(n, n), NUM) for n in _TOTAL_NAMES]
    return cols, [(db, *acc) for db, acc in sorted(_per_db(worker).items())]


def _show_stats_averages(worker: Worker):
    cols = [("database", TEXT)] + [
        (("avg_" + n) if n.endswith(("parse_count", "bind_count")) else _BYTES.get(n, n), NUM)
        for n in _TOTAL_NAMES]
    avgs = _averages(worker, _per_db(worker))
    return cols, [(db, *acc) for db, acc in sorted(avgs.items())]


def _show_totals(worker: Worker):
    names = ("server_assignment_count", "xact_count", "query_count", "client_bytes",
             "server_bytes", "xact_time", "query_time", "wait_time", "ps_client_parse_count",
             "ps_server_parse_count", "ps_bind_count")
    per_db = _per_db(worker)
    totals = [sum(column) for column in zip(*per_db.values())]
    avgs = [sum(column) for column in zip(*_averages(worker, per_db).values())]
    rows = [("total_" + n, v) for n, v in zip(names, totals)]
    rows += [("avg_" + n, v) for n, v in zip(names, avgs)]
    return [("name", TEXT), ("value", NUM)], rows


# --------------------------------------------------------------------------- SHOW: connections


SOCKET_COLS = [("type", TEXT), ("user", TEXT), ("database", TEXT), ("replication", TEXT),
                ("state", TEXT), ("addr", TEXT), ("port", I4), ("local_addr", TEXT),
                ("local_port", I4), ("connect_time", TEXT), ("request_time", TEXT),
                ("wait", I4), ("wait_us", I4), ("close_needed", I4), ("ptr", TEXT),
                ("link", TEXT), ("remote_pid", I4), ("tls", TEXT),
                ("application_name", TEXT), ("prepared_statements", I4), ("id", I4)]
_BUFFER_COLS = [("recv_pos", I4), ("pkt_pos", I4), ("pkt_remain", I4), ("send_pos", I4),
                ("send_remain", I4), ("pkt_avail", I4), ("send_avail", I4)]
_ID = 20  # the id column, what rows are sorted by
_SEND_AVAIL = len(SOCKET_COLS) + len(_BUFFER_COLS) - 1


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _ptr(conn_id: int) -> str:
    """PgBouncer shows its object's address; pgherd the connection id, in the same form (and
    as its log lines name the connection: C-0x<id>, S-0x<id>)."""
    return "0x%x" % conn_id


def _admin_rows(worker: Worker) -> list[list]:
    rows = []
    for a in worker.admins.values():
        local = _local(a.sock)
        # Not linked to a server: PgBouncer 1.25 shows its active but unlinked clients idle.
        rows.append(["C", a.user, ADMIN_DB, "none", "idle", a.addr, a.port, *local,
                     _stamp(a.connect_time), _stamp(a.request_time), 0, 0, 0,
                     _ptr(a.id), "", _remote_pid(a.sock), "", a.application_name, 0, a.id])
    return rows


def _local(sock: socket.socket) -> tuple[str, int]:
    try:
        name = sock.getsockname()
    except OSError:
        return "", 0
    return (name[0], name[1]) if isinstance(name, tuple) else ("unix", 0)


def _remote_pid(sock: socket.socket) -> int:
    """The peer's pid over a Unix socket (SO_PEERCRED), as PgBouncer shows it."""
    if sock.family != socket.AF_UNIX:
        return 0
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def local_rows(worker: Worker, what: str) -> list[list]:
    """This worker's part of a gathered view: connections for SHOW CLIENTS / SERVERS /
    SOCKETS / FDS, its console sessions (ADMIN), its admin pool's counters (ADMIN_STATS)."""
    if what == "ADMIN":
        return _admin_rows(worker)
    if what == "ADMIN_STATS":
        return [worker.admin_stats[:len(_STATS)]]
    if what == "FDS":
        return _fd_rows(worker)
    rows: list[list] = []
    now = time.monotonic()
    with_buffers = what in ("SOCKETS", "ACTIVE_SOCKETS")
    state_prefix = {"SOCKETS": "cl_", "ACTIVE_SOCKETS": "cl_"}.get(what, "")
    if what in ("CLIENTS", "SOCKETS", "ACTIVE_SOCKETS"):
        for c in worker.clients.values():
            wait = now - c.wait_started if c.state == "waiting" else 0.0
            state = c.state if c.server is not None or c.state != "active" else "idle"
            if state_prefix:
                state = "cl_active" if c.state == "active" else "cl_" + c.state
            row = ["C", c.user, c.dbname, "none", state, c.addr, c.port, *c.local(),
                   _stamp(c.connect_time), _stamp(_request_wall(c)),
                   int(wait), int(wait % 1 * 1e6), 0, _ptr(c.id),
                   _ptr(c.server.id) if c.server else "", 0, "",
                   c.params.get("application_name", ""), len(c.statements), c.id]
            rows.append(row + _buffers(c) if with_buffers else row)
        if what == "CLIENTS":
            rows += _admin_rows(worker)
        elif with_buffers:
            rows += [r[:4] + ["cl_active"] + r[5:] + [0] * len(_BUFFER_COLS)
                     for r in _admin_rows(worker)]
    if what in ("SERVERS", "SOCKETS", "ACTIVE_SOCKETS"):
        for pool in worker.pools.values():
            for s in pool.servers:
                state = ("sv_" + s.state) if state_prefix else s.state
                row = ["S", pool.user, pool.dbname, "none", state, s.addr, s.port,
                       *s.local(), _stamp(s.connect_time), _stamp(s.connect_time), 0, 0,
                       int(s.close_needed), _ptr(s.id),
                       _ptr(s.client.id) if s.client else "", s.backend_pid, "",
                       s.params.get("application_name", ""), len(s.statements.prepared), s.id]
                rows.append(row + _buffers(s) if with_buffers else row)
    if what == "ACTIVE_SOCKETS":
        rows = [r for r in rows if r[_SEND_AVAIL]]  # only sockets with data waiting to be sent
    return rows


def _request_wall(c) -> float:
    """The wall-clock time of a client's latest request (the relay keeps monotonic time)."""
    if not c.request_time:
        return c.connect_time
    return c.connect_time + (c.request_time - c.login_time)


def _buffers(conn) -> list[int]:
    """The relay keeps no receive buffer per connection; only a backlog to send."""
    pending = len(conn.out) if conn.out else 0
    return [0, 0, 0, 0, pending, 0, pending]


def _show_clients(worker: Worker):
    return SOCKET_COLS, sorted(worker.exchange.gather("CLIENTS"), key=lambda r: r[_ID])


def _show_servers(worker: Worker):
    return SOCKET_COLS, sorted(worker.exchange.gather("SERVERS"), key=lambda r: r[_ID])


def _show_sockets(worker: Worker, what: str = "SOCKETS"):
    return SOCKET_COLS + _BUFFER_COLS, sorted(worker.exchange.gather(what),
                                              key=lambda r: r[_ID])


_FDS_COLS = [("fd", I4), ("task", TEXT), ("user", TEXT), ("database", TEXT), ("addr", TEXT),
             ("port", I4), ("cancel", I8), ("link", I4), ("client_encoding", TEXT),
             ("std_strings", TEXT), ("datestyle", TEXT), ("timezone", TEXT),
             ("password", TEXT), ("scram_client_key", BYTEA), ("scram_server_key", BYTEA)]


def _fd_rows(worker: Worker) -> list[list]:
    """This worker's listening sockets, clients and servers with their descriptors (which
    are this worker's: each worker is its own process)."""
    rows: list[list] = []
    for sock in worker.listeners:
        addr = _local(sock)
        rows.append([sock.fileno(), "pooler", None, None, addr[0], addr[1] or
                     worker.settings.listen_port, 0, 0, None, None, None, None, None, None,
                     None])

    def params(conn) -> list:
        p = conn.params
        return [p.get("client_encoding"), p.get("standard_conforming_strings"),
                p.get("DateStyle"), p.get("TimeZone")]

    for c in worker.clients.values():
        pid, key = c.cancel_key or (0, 0)
        rows.append([c.fd, "client", c.user, c.dbname, c.addr, c.port, pid << 32 | key,
                     c.server.fd if c.server else 0, *params(c), None, None, None])
    for pool in worker.pools.values():
        for s in pool.servers:
            cancel = (s.backend_pid or 0) << 32 | (s.backend_key or 0)
            rows.append([s.fd, "server", pool.user, pool.dbname, s.addr, s.port, cancel,
                         s.client.fd if s.client else 0, *params(s), None, None, None])
    return rows


def _show_fds(worker: Worker):
    return _FDS_COLS, worker.exchange.gather("FDS")


# --------------------------------------------------------------------------- SHOW: config views


def database_names(worker: Worker) -> list[str]:
    """Configured databases, auto-databases in use and the admin database, sorted."""
    current = {r.names[0] for r in worker.segment.snapshot_rows() if r.kind == shm.DATABASE}
    names = {n for n in worker.config.databases if n != "*"} | current | {ADMIN_DB}
    return sorted(names)


def user_names(worker: Worker) -> list[str]:
    current = {r.names[0] for r in worker.segment.snapshot_rows() if r.kind == shm.USER}
    return sorted(set(worker.config.userlist) | set(worker.config.users) | current
                  | {ADMIN_DB})


def _show_databases(worker: Worker):
    cols = [("name", TEXT), ("host", TEXT), ("port", I4), ("database", TEXT),
            ("force_user", TEXT), ("pool_size", I4), ("min_pool_size", I4),
            ("reserve_pool_size", I4), ("server_lifetime", I4), ("pool_mode", TEXT),
            ("load_balance_hosts", TEXT), ("max_connections", I4),
            ("current_connections", I4), ("max_client_connections", I4),
            ("current_client_connections", I4), ("paused", I4), ("disabled", I4)]
    s = worker.settings
    current = {r.names[0]: r.totals for r in worker.segment.snapshot_rows()
               if r.kind == shm.DATABASE}
    clients: dict[str, int] = {ADMIN_DB: len(_admin_clients(worker))}
    for r in _pool_rows(worker):
        clients[r.names[0]] = clients.get(r.names[0], 0) + r.totals["clients"]
    rows: list[tuple] = []
    for name in database_names(worker):
        if name == ADMIN_DB:  # the console's own entry, as PgBouncer's admin_setup makes it
            rows.append((ADMIN_DB, None, s.listen_port, ADMIN_DB, ADMIN_DB, 2,
                         s.min_pool_size, s.reserve_pool_size, int(s.server_lifetime),
                         "statement", None, s.max_db_connections, 0,
                         s.max_db_client_connections, clients[ADMIN_DB], 0, 0))
            continue
        db = worker.database(name)
        if db is None:
            continue

        def pick(value, default):
            return default if value is None else value

        rows.append((name, ",".join(db.host) or None, db.port, db.dbname or name, db.user,
                     pick(db.pool_size, s.default_pool_size),
                     pick(db.min_pool_size, s.min_pool_size),
                     pick(db.reserve_pool_size, s.reserve_pool_size),
                     int(pick(db.server_lifetime, s.server_lifetime)), db.pool_mode,
                     _load_balance_hosts(worker, name),
                     db.max_db_connections or s.max_db_connections,
                     current.get(name, {}).get("servers", 0),
                     db.max_db_client_connections or s.max_db_client_connections,
                     clients.get(name, 0),
                     int(worker.is_paused(name)), int(worker.is_disabled(name))))
    return cols, rows


def _show_users(worker: Worker):
    cols = [("name", TEXT), ("pool_size", TEXT), ("reserve_pool_size", TEXT),
            ("pool_mode", TEXT), ("max_user_connections", I4), ("current_connections", I4),
            ("max_user_client_connections", I4), ("current_client_connections", I4)]
    s = worker.settings
    current = {r.names[0]: r.totals for r in worker.segment.snapshot_rows()
               if r.kind == shm.USER}
    admins = len(_admin_clients(worker))

    def pad(value):  # PgBouncer writes these with "%9d", blank when unset
        return "" if value is None else "%9d" % value

    rows = []
    for name in user_names(worker):
        u = worker.config.users.get(name)
        clients = current.get(name, {}).get("clients", 0) + (admins if name == ADMIN_DB
                                                              else 0)
        rows.append((name, pad(u.pool_size if u else None),
                     pad(u.reserve_pool_size if u else None), u.pool_mode if u else None,
                     (u.max_user_connections if u and u.max_user_connections is not None
                      else s.max_user_connections),
                     current.get(name, {}).get("servers", 0),
                     (u.max_user_client_connections
                      if u and u.max_user_client_connections is not None
                      else s.max_user_client_connections), clients))
    return cols, rows


# --------------------------------------------------------------------------- control commands


def _reload(worker: Worker, arg: str) -> bytes:
    if worker.exchange.command_master("RELOAD"):
        raise AdminError("RELOAD failed, see logs for additional details", "F0000")
    return proto.command_complete("RELOAD")


def _db_arg(worker: Worker, command: str, arg: str, required: bool) -> None:
    if required and not arg:
        raise AdminError("invalid command '%s', use SHOW HELP;" % command)
    if arg and worker.database(arg) is None:
        raise AdminError("no such database: %s" % arg)
    if arg in ("pgbouncer", "pgherd"):
        raise AdminError("cannot %s admin db" % command.lower())


def _pause(worker: Worker, arg: str) -> bytes:
    _db_arg(worker, "PAUSE", arg, False)
    if worker.state.paused or (arg and arg in worker.state.paused_dbs):
        raise AdminError("already suspended/paused")
    return _everywhere(worker, "PAUSE", arg)


def _resume(worker: Worker, arg: str) -> bytes:
    _db_arg(worker, "RESUME", arg, False)
    if arg and arg not in worker.state.paused_dbs:
        raise AdminError("database %s is not paused" % arg)
    if not arg and not (worker.state.paused or worker.state.paused_dbs):
        raise AdminError("pooler is not paused/suspended")
    return _everywhere(worker, "RESUME", arg)


def _on_database(name: str, required: bool) -> Callable[[Worker, str], bytes]:
    """DISABLE, ENABLE, KILL (a database required), RECONNECT, WAIT_CLOSE ([db])."""

    def command(worker: Worker, arg: str) -> bytes:
        _db_arg(worker, name, arg, required)
        return _everywhere(worker, name, arg)

    return command


def _kill(worker: Worker, arg: str) -> bytes:
    """KILL db, or (PgBouncer 1.25) KILL alone: every database, each paused until its own
    RESUME db, as PgBouncer pauses each one."""
    if arg:
        return _on_database("KILL", True)(worker, arg)
    for name in database_names(worker):
        if name != ADMIN_DB:
            _check(worker.exchange.command_master("KILL", name, timeout=1e9))
    return proto.command_complete("KILL")


def _kill_client(worker: Worker, arg: str) -> bytes:
    if not arg.isdigit():
        raise AdminError("invalid client pointer supplied")
    return _everywhere(worker, "KILL_CLIENT", arg)


def _suspend(worker: Worker, arg: str) -> bytes:
    raise AdminError("SUSPEND is not supported: pgherd has no online restart to suspend for; "
                     "use PAUSE")


def _shutdown(worker: Worker, arg: str) -> bytes:
    arg = arg.upper()
    if arg not in ("", "WAIT_FOR_CLIENTS", "WAIT_FOR_SERVERS"):
        raise AdminError("invalid command 'SHUTDOWN %s', use SHOW HELP;" % arg)
    return _everywhere(worker, "SHUTDOWN", arg)


def _everywhere(worker: Worker, name: str, arg: str) -> bytes:
    """Run a command on the whole service (the master relays it to every worker)."""
    _check(worker.exchange.command_master(name, arg, timeout=1e9))
    return proto.command_complete(name)


def _check(error: str) -> None:
    if error:
        raise AdminError(error)


_CONTROL: dict[str, Callable[[Worker, str], bytes]] = {
    "RELOAD": _reload, "PAUSE": _pause, "RESUME": _resume,
    "DISABLE": _on_database("DISABLE", True), "ENABLE": _on_database("ENABLE", True),
    "KILL": _kill, "RECONNECT": _on_database("RECONNECT", False),
    "WAIT_CLOSE": _on_database("WAIT_CLOSE", False),
    "KILL_CLIENT": _kill_client, "SUSPEND": _suspend, "SHUTDOWN": _shutdown,
}

_SHOW: dict[str, Callable] = {
    "VERSION": _show_version, "CONFIG": _show_config, "STATE": _show_state,
    "LISTS": _show_lists, "WORKERS": _show_workers, "MEM": _show_mem,
    "DNS_HOSTS": _show_dns_hosts, "DNS_ZONES": _show_dns_zones, "PEERS": _show_peers,
    "PEER_POOLS": _show_peer_pools, "FDS": _show_fds,
    "POOLS": _show_pools, "STATS": _show_stats, "STATS_TOTALS": _show_stats_totals,
    "STATS_AVERAGES": _show_stats_averages, "TOTALS": _show_totals,
    "CLIENTS": _show_clients, "SERVERS": _show_servers, "SOCKETS": _show_sockets,
    "ACTIVE_SOCKETS": lambda w: _show_sockets(w, "ACTIVE_SOCKETS"),
    "DATABASES": _show_databases, "USERS": _show_users,
}
