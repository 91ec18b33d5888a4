"""The admin console: virtual database ``pgbouncer`` (also ``pgherd``), simple protocol only.

Access as in PgBouncer: ``admin_users`` may run everything, ``stats_users`` only SHOW; over the
Unix socket the OS user running pgherd may log in as ``pgbouncer`` without a password. Errors
are ERROR 08P01 with the connection kept; commands and column names are PgBouncer's.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import time
from importlib.metadata import version
from typing import TYPE_CHECKING, Callable, Iterable

import psutil

from ipc import shm
from prefork.settings import SETTINGS

from . import procstat, proto
from .login import ClientGone, LoginTimeout, Refused, authenticate, read_message, send_all
from .proto import MessageReader, ProtocolError

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("pgherd")

VERSION = version("pgherd")
_COMMAND = re.compile(r"^\s*(\w+)(?:\s+(\w+))?\s*;?\s*$")

I4, I8, NUM, TEXT = proto.OID_INT4, proto.OID_INT8, proto.OID_NUMERIC, proto.OID_TEXT


class AdminError(Exception):
    def __init__(self, text: str, sqlstate: str = "08P01") -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


def admin_login(worker: Worker, sock: socket.socket, reader: MessageReader, deadline: float,
                user: str, dbname: str, cid: int, addr: str) -> None:
    """Greenlet: authenticate an admin/stats user, then serve console commands until EOF."""
    s = worker.settings
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
        _serve(worker, sock, reader, admin)
    except Refused as exc:
        try:
            sock.send(proto.error_response(exc.text, exc.sqlstate))
        except OSError:
            pass
        log.warning("C-%d: %s/%s pooler error: %s", cid, dbname, user, exc.log_text)
    except (ClientGone, LoginTimeout, ProtocolError):
        pass
    finally:
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


def _serve(worker: Worker, sock: socket.socket, reader: MessageReader, admin: bool) -> None:
    while True:
        mtype, body = read_message(sock, reader, time.monotonic() + 1e9)
        if mtype == proto.F_TERMINATE:
            return
        if mtype != proto.F_QUERY:
            send_all(sock, proto.error_response(
                "extended query protocol not supported by admin console"), time.monotonic() + 10)
            return
        text = body.rstrip(b"\x00").decode("utf-8", "replace")
        try:
            out = run_command(worker, text, admin)
        except AdminError as exc:
            out = proto.error_response(str(exc), exc.sqlstate, "ERROR")
        send_all(sock, out + proto.ready_for_query(), time.monotonic() + 10)


_SET = re.compile(r"^\s*SET\s+(\w+)\s*(?:=|\s+TO\s+)\s*(?:'((?:[^']|'')*)'|(\S+?))\s*;?\s*$",
                  re.IGNORECASE)
#: Session parameters drivers SHOW or SET on connect: answered here, as PgBouncer does.
_FAKE_PARAMS = {"client_encoding": "UTF8", "default_transaction_isolation": "read committed",
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
	SHOW SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE|WORKERS
	SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS
	SET key = arg
	RELOAD
	PAUSE [<db>]
	RESUME [<db>]
	DISABLE <db>
	ENABLE <db>
	RECONNECT [<db>]
	KILL <db>
	KILL_CLIENT <id>
	SUSPEND
	SHUTDOWN [WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS]
	WAIT_CLOSE [<db>]"""


def _table(columns: list[tuple[str, int]], rows: Iterable[Iterable[object]], tag: str) -> bytes:
    out = bytearray(proto.row_description(columns))
    for row in rows:
        out += proto.data_row(row)
    out += proto.command_complete(tag)
    return bytes(out)


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
        ("active", "no" if worker.draining else "yes"),
        ("paused", "yes" if state.paused else "no"),
        ("suspended", "no"),
    ]


def _show_lists(worker: Worker):
    rows = worker.segment.snapshot_rows()
    slots = [w for w in worker.segment.read_all() if w.pid]
    clients = sum(r.totals["clients"] for r in rows if r.kind == shm.POOL)
    servers = sum(r.totals["servers"] for r in rows if r.kind == shm.POOL)
    items = [
        ("databases", len(worker.config.databases)), ("users", len(worker.config.userlist)),
        ("peers", 0), ("pools", sum(1 for r in rows if r.kind == shm.POOL)),
        ("peer_pools", 0), ("free_clients", 0), ("used_clients", clients),
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
        rows.append((w.slot, w.pid or None, state if w.pid else "down",
                     (now - w.started_ns) // 1_000_000_000 if w.pid else 0,
                     (now - w.heartbeat_ns) // 1_000_000 if w.pid else None, w.clients,
                     w.servers, use.rss if use else None, cpu, use.open_fds if use else None,
                     w.restarts, w.epoch, *worker.segment.handovers(w.slot), w.waiting,
                     cpu_seconds))
    return cols, rows


def _show_mem(worker: Worker):
    """pgherd's meaning: memory per worker process (there are no slab caches to show)."""
    cols = [("name", TEXT), ("size", I8), ("used", I8), ("free", I8), ("memtotal", I8)]
    rows = []
    for w in worker.segment.read_all(worker.settings.workers):
        if not w.pid:
            continue
        try:
            info = psutil.Process(w.pid).memory_full_info()
        except psutil.Error:
            continue
        rows.append(("worker %d" % w.slot, info.rss, info.uss, info.rss - info.uss, info.rss))
    return cols, rows


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


def _show_pools(worker: Worker):
    cols = [("database", TEXT), ("user", TEXT), ("cl_active", I4), ("cl_waiting", I4),
            ("cl_active_cancel_req", I4), ("cl_waiting_cancel_req", I4), ("sv_active", I4),
            ("sv_active_cancel", I4), ("sv_being_canceled", I4), ("sv_idle", I4),
            ("sv_used", I4), ("sv_tested", I4), ("sv_login", I4), ("maxwait", I4),
            ("maxwait_us", I4), ("pool_mode", TEXT), ("load_balance_hosts", TEXT)]
    now = time.monotonic_ns()
    rows = []
    for r in sorted(_pool_rows(worker), key=lambda r: r.names):
        t = r.totals
        wait_us = r.wait_ns(now) // 1000
        rows.append((r.names[0], r.names[1], t["cl_active"], t["cl_waiting"], 0, 0,
                     t["sv_active"], 0, t["sv_being_canceled"], t["sv_idle"], t["sv_used"],
                     t["sv_tested"],
                     t["sv_login"], wait_us // 1_000_000, wait_us % 1_000_000,
                     _pool_mode(worker, *r.names), None))
    return cols, rows


_TOTALS = ("server_assignment_count", "xact_count", "query_count", "received", "sent",
           "xact_time", "query_time", "wait_time", "client_parse_count",
           "server_parse_count", "bind_count", "client_login_count")


def _per_db(worker: Worker) -> dict[str, list[int]]:
    """Stats totals per database (PgBouncer sums its pools), in STAT_FIELDS order."""
    per_db: dict[str, list[int]] = {}
    for r in _pool_rows(worker):
        acc = per_db.setdefault(r.names[0], [0] * len(shm.STAT_FIELDS))
        for i, name in enumerate(shm.STAT_FIELDS):
            acc[i] += r.totals[name]
    return per_db


def _averages(worker: Worker) -> dict[str, list[float]]:
    """Per database, per second (counts, bytes) or per event (times) over the last period."""
    return {db: worker.averages.get(db, [0.0] * len(shm.STAT_FIELDS))
            for db in _per_db(worker)}


def _show_stats(worker: Worker):
    cols = [("database", TEXT)] + [("total_" + n, NUM) for n in _TOTALS] + \
        [("avg_" + n.replace("received", "recv"), NUM) for n in _TOTALS]
    totals = _per_db(worker)
    avgs = _averages(worker)
    return cols, [(db, *acc, *[int(v) for v in avgs[db]]) for db, acc in sorted(totals.items())]


def _show_stats_totals(worker: Worker):
    names = [n.replace("received", "bytes_received").replace("sent", "bytes_sent")
             if n in ("received", "sent") else n for n in _TOTALS]
    cols = [("database", TEXT)] + [(n, NUM) for n in names]
    return cols, [(db, *acc) for db, acc in sorted(_per_db(worker).items())]


def _show_stats_averages(worker: Worker):
    names = [("avg_" + n) if "parse" in n or "bind" in n or "login" in n else
             n.replace("received", "bytes_received").replace("sent", "bytes_sent")
             for n in _TOTALS]
    cols = [("database", TEXT)] + [(n, NUM) for n in names]
    return cols, [(db, *[int(v) for v in acc]) for db, acc in sorted(_averages(worker).items())]


def _show_totals(worker: Worker):
    names = ("server_assignment_count", "xact_count", "query_count", "client_bytes",
             "server_bytes", "xact_time", "query_time", "wait_time", "ps_client_parse_count",
             "ps_server_parse_count", "ps_bind_count", "client_login_count")
    totals = [0] * len(names)
    for acc in _per_db(worker).values():
        totals = [a + b for a, b in zip(totals, acc)]
    avgs = [0.0] * len(names)
    for acc in _averages(worker).values():
        avgs = [a + b for a, b in zip(avgs, acc)]
    rows = [("total_" + n, v) for n, v in zip(names, totals)]
    rows += [("avg_" + n, int(v)) for n, v in zip(names, avgs)]
    return [("name", TEXT), ("value", NUM)], rows


# --------------------------------------------------------------------------- SHOW: connections


_SOCKET_COLS = [("type", TEXT), ("user", TEXT), ("database", TEXT), ("replication", TEXT),
                ("state", TEXT), ("addr", TEXT), ("port", I4), ("local_addr", TEXT),
                ("local_port", I4), ("connect_time", TEXT), ("request_time", TEXT),
                ("wait", I4), ("wait_us", I4), ("close_needed", I4), ("ptr", TEXT),
                ("link", TEXT), ("remote_pid", I4), ("tls", TEXT),
                ("application_name", TEXT), ("prepared_statements", I4), ("id", I8)]
_BUFFER_COLS = [("recv_pos", I4), ("pkt_pos", I4), ("pkt_remain", I4), ("send_pos", I4),
                ("send_remain", I4), ("pkt_avail", I4), ("send_avail", I4)]


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def local_rows(worker: Worker, what: str) -> list[list]:
    """This worker's connections for SHOW CLIENTS / SERVERS / SOCKETS (gathered from all)."""
    rows: list[list] = []
    now = time.monotonic()
    with_buffers = what in ("SOCKETS", "ACTIVE_SOCKETS")
    if what in ("CLIENTS", "SOCKETS", "ACTIVE_SOCKETS"):
        for c in worker.clients.values():
            wait = now - c.wait_started if c.state == "waiting" else 0.0
            row = ["C", c.user, c.dbname, "none", c.state, c.addr, c.port, *c.local(),
                   _stamp(c.connect_time), _stamp(c.connect_time), int(wait),
                   int(wait % 1 * 1e6), 0, "C-%d" % c.id,
                   "S-%d" % c.server.id if c.server else "", 0, "",
                   c.params.get("application_name", ""), len(c.statements), c.id]
            rows.append(row + _buffers(c) if with_buffers else row)
    if what in ("SERVERS", "SOCKETS", "ACTIVE_SOCKETS"):
        for pool in worker.pools.values():
            for s in pool.servers:
                row = ["S", pool.user, pool.dbname, "none", s.state, s.addr, s.port,
                       *s.local(), _stamp(s.connect_time), _stamp(s.connect_time), 0, 0,
                       int(s.close_needed), "S-%d" % s.id,
                       "C-%d" % s.client.id if s.client else "", s.backend_pid, "",
                       s.params.get("application_name", ""), len(s.statements.prepared), s.id]
                rows.append(row + _buffers(s) if with_buffers else row)
    if what == "ACTIVE_SOCKETS":
        rows = [r for r in rows if r[-3]]  # only sockets with data waiting to be sent
    return rows


def _buffers(conn) -> list[int]:
    """The relay keeps no receive buffer per connection; only a backlog to send."""
    pending = len(conn.out) if conn.out else 0
    return [0, 0, 0, 0, pending, 0, pending]


def _show_clients(worker: Worker):
    return _SOCKET_COLS, sorted(worker.exchange.gather("CLIENTS"), key=lambda r: r[-1])


def _show_servers(worker: Worker):
    return _SOCKET_COLS, sorted(worker.exchange.gather("SERVERS"), key=lambda r: r[-1])


def _show_sockets(worker: Worker, what: str = "SOCKETS"):
    return _SOCKET_COLS + _BUFFER_COLS, sorted(worker.exchange.gather(what),
                                              key=lambda r: r[20])


# --------------------------------------------------------------------------- SHOW: config views


def _show_databases(worker: Worker):
    # reserve_pool is the column's name before PgBouncer 1.24; both, for old dashboards.
    cols = [("name", TEXT), ("host", TEXT), ("port", I4), ("database", TEXT),
            ("force_user", TEXT), ("pool_size", I4), ("min_pool_size", I4),
            ("reserve_pool_size", I4), ("reserve_pool", I4), ("server_lifetime", I4),
            ("pool_mode", TEXT),
            ("load_balance_hosts", TEXT), ("max_connections", I4), ("current_connections", I4),
            ("max_client_connections", I4), ("current_client_connections", I4),
            ("paused", I4), ("disabled", I4)]
    s = worker.settings
    current = {r.names[0]: r.totals for r in worker.segment.snapshot_rows()
               if r.kind == shm.DATABASE}
    clients: dict[str, int] = {}
    for r in _pool_rows(worker):
        clients[r.names[0]] = clients.get(r.names[0], 0) + r.totals["clients"]
    # The admin console's own row, as PgBouncer lists it.
    rows: list[tuple] = [("pgbouncer", None, s.listen_port, "pgbouncer", "pgbouncer", 2, 0, 0,
                          0, 0, "statement", None, 0, 0, 0, 0, 0, 0)]
    names = [n for n in worker.config.databases if n != "*"] + [
        n for n in current if n not in worker.config.databases]  # auto-databases in use
    for name in names:
        db = worker.database(name)
        if db is None:
            continue
        reserve = db.reserve_pool_size if db.reserve_pool_size is not None \
            else s.reserve_pool_size
        rows.append((name, ",".join(db.host) or None, db.port, db.dbname or name,
                     db.user, db.pool_size if db.pool_size is not None else s.default_pool_size,
                     db.min_pool_size or 0, reserve, reserve,
                     int(db.server_lifetime if db.server_lifetime is not None
                         else s.server_lifetime), db.pool_mode, None,
                     db.max_db_connections or s.max_db_connections,
                     current.get(name, {}).get("servers", 0), 0, clients.get(name, 0),
                     int(worker.is_paused(name)), int(worker.is_disabled(name))))
    return cols, rows


def _show_users(worker: Worker):
    cols = [("name", TEXT), ("pool_size", TEXT), ("reserve_pool_size", TEXT),
            ("pool_mode", TEXT), ("max_user_connections", I4), ("current_connections", I4),
            ("max_user_client_connections", I4), ("current_client_connections", I4)]
    current = {r.names[0]: r.totals for r in worker.segment.snapshot_rows()
               if r.kind == shm.USER}
    names = sorted(set(worker.config.userlist) | set(worker.config.users) | set(current))
    rows = []
    for name in names:
        u = worker.config.users.get(name)

        def pad(value):  # PgBouncer shows these space-padded, blank when unset
            return "" if value is None else "%5d" % value

        rows.append((name, pad(u.pool_size if u else None),
                     pad(u.reserve_pool_size if u else None), u.pool_mode if u else None,
                     (u.max_user_connections if u and u.max_user_connections is not None
                      else worker.settings.max_user_connections),
                     current.get(name, {}).get("servers", 0), 0,
                     current.get(name, {}).get("clients", 0)))
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
    "KILL": _on_database("KILL", True), "RECONNECT": _on_database("RECONNECT", False),
    "WAIT_CLOSE": _on_database("WAIT_CLOSE", False),
    "KILL_CLIENT": _kill_client, "SUSPEND": _suspend, "SHUTDOWN": _shutdown,
}

_SHOW: dict[str, Callable] = {
    "VERSION": _show_version, "CONFIG": _show_config, "STATE": _show_state,
    "LISTS": _show_lists, "WORKERS": _show_workers, "MEM": _show_mem,
    "POOLS": _show_pools, "STATS": _show_stats, "STATS_TOTALS": _show_stats_totals,
    "STATS_AVERAGES": _show_stats_averages, "TOTALS": _show_totals,
    "CLIENTS": _show_clients, "SERVERS": _show_servers, "SOCKETS": _show_sockets,
    "ACTIVE_SOCKETS": lambda w: _show_sockets(w, "ACTIVE_SOCKETS"),
    "DATABASES": _show_databases, "USERS": _show_users,
}
