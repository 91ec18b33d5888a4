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

from ipc import shm
from prefork.settings import SETTINGS

from . import proto
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
        welcome = [("server_version", "%s/bouncer" % VERSION), ("client_encoding", "UTF8"),
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


def run_command(worker: Worker, text: str, admin: bool) -> bytes:
    """Execute one console command; returns the response messages (without ReadyForQuery)."""
    if not text.strip().rstrip(";"):
        return proto.EMPTY_QUERY_RESPONSE
    m = _COMMAND.match(text)
    if not m:
        raise AdminError("invalid command '%s', use SHOW HELP;" % text.strip())
    verb, arg = m.group(1).upper(), (m.group(2) or "").upper()
    if verb in ("SHOW", "SELECT") and arg:
        show = _SHOW.get(arg)
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


def _table(columns: list[tuple[str, int]], rows: Iterable[Iterable[object]], tag: str) -> bytes:
    out = bytearray(proto.row_description(columns))
    for row in rows:
        out += proto.data_row(row)
    out += proto.command_complete(tag)
    return bytes(out)


# --------------------------------------------------------------------------- SHOW commands


def _show_version(worker: Worker):
    return [("version", TEXT)], [("pgherd %s" % VERSION,)]


def _show_config(worker: Worker):
    s = worker.settings
    rows = []
    for name in sorted(SETTINGS):
        setting = SETTINGS[name]
        rows.append((name, setting.render(getattr(s, name)), setting.render(setting.default),
                     "yes" if setting.reload else "no"))
    return [("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)], rows


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
        wait_us = (now - r.max_wait_ns) // 1000 if r.max_wait_ns else 0
        rows.append((r.names[0], r.names[1], t["cl_active"], t["cl_waiting"], 0, 0,
                     t["sv_active"], 0, 0, t["sv_idle"], t["sv_used"], t["sv_tested"],
                     t["sv_login"], wait_us // 1_000_000, wait_us % 1_000_000,
                     _pool_mode(worker, *r.names), None))
    return cols, rows


def _show_stats(worker: Worker):
    cols = [("database", TEXT)] + [(n, NUM) for n in (
        "total_server_assignment_count", "total_xact_count", "total_query_count",
        "total_received", "total_sent", "total_xact_time", "total_query_time",
        "total_wait_time", "total_client_parse_count", "total_server_parse_count",
        "total_bind_count", "total_client_login_count")]
    per_db: dict[str, list[int]] = {}
    for r in _pool_rows(worker):
        acc = per_db.setdefault(r.names[0], [0] * len(shm.STAT_FIELDS))
        for i, name in enumerate(shm.STAT_FIELDS):
            acc[i] += r.totals[name]
    return cols, [(db, *acc) for db, acc in sorted(per_db.items())]


_SOCKET_COLS = [("type", TEXT), ("user", TEXT), ("database", TEXT), ("replication", TEXT),
                ("state", TEXT), ("addr", TEXT), ("port", I4), ("local_addr", TEXT),
                ("local_port", I4), ("connect_time", TEXT), ("request_time", TEXT),
                ("wait", I4), ("wait_us", I4), ("close_needed", I4), ("ptr", TEXT),
                ("link", TEXT), ("remote_pid", I4), ("tls", TEXT),
                ("application_name", TEXT), ("prepared_statements", I4), ("id", I8)]


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def local_rows(worker: Worker, what: str) -> list[list]:
    """This worker's connections for SHOW CLIENTS / SHOW SERVERS (gathered from all)."""
    rows: list[list] = []
    now = time.monotonic()
    if what == "CLIENTS":
        for c in worker.clients.values():
            wait = now - c.wait_started if c.state == "waiting" else 0.0
            rows.append(["C", c.user, c.dbname, "none", c.state, c.addr, c.port,
                         *c.local(), _stamp(c.connect_time),
                         _stamp(c.connect_time), int(wait), int(wait % 1 * 1e6), 0,
                         "C-%d" % c.id, "S-%d" % c.server.id if c.server else "", 0, "",
                         c.params.get("application_name", ""), 0, c.id])
    elif what == "SERVERS":
        for pool in worker.pools.values():
            for s in pool.servers:
                rows.append(["S", pool.user, pool.dbname, "none", s.state, s.addr, s.port,
                             *s.local(), _stamp(s.connect_time),
                             _stamp(s.connect_time), 0, 0, int(s.close_needed),
                             "S-%d" % s.id, "C-%d" % s.client.id if s.client else "",
                             s.backend_pid, "", s.params.get("application_name", ""), 0, s.id])
    return rows


def _show_clients(worker: Worker):
    return _SOCKET_COLS, sorted(worker.exchange.gather("CLIENTS"), key=lambda r: r[-1])


def _show_servers(worker: Worker):
    return _SOCKET_COLS, sorted(worker.exchange.gather("SERVERS"), key=lambda r: r[-1])


def _show_databases(worker: Worker):
    cols = [("name", TEXT), ("host", TEXT), ("port", I4), ("database", TEXT),
            ("force_user", TEXT), ("pool_size", I4), ("min_pool_size", I4),
            ("reserve_pool_size", I4), ("server_lifetime", I4), ("pool_mode", TEXT),
            ("load_balance_hosts", TEXT), ("max_connections", I4), ("current_connections", I4),
            ("max_client_connections", I4), ("current_client_connections", I4),
            ("paused", I4), ("disabled", I4)]
    s = worker.settings
    current = {r.names[0]: r.totals for r in worker.segment.snapshot_rows()
               if r.kind == shm.DATABASE}
    clients: dict[str, int] = {}
    for r in _pool_rows(worker):
        clients[r.names[0]] = clients.get(r.names[0], 0) + r.totals["clients"]
    rows = []
    for db in worker.config.databases.values():
        rows.append((db.name, ",".join(db.host) or None, db.port, db.dbname or db.name,
                     db.user, db.pool_size if db.pool_size is not None else s.default_pool_size,
                     db.min_pool_size or 0, db.reserve_pool_size or 0,
                     int(db.server_lifetime if db.server_lifetime is not None
                         else s.server_lifetime), db.pool_mode, None,
                     db.max_db_connections or 0, current.get(db.name, {}).get("servers", 0),
                     0, clients.get(db.name, 0), 0, 0))
    return cols, rows


# --------------------------------------------------------------------------- control commands


def _reload(worker: Worker, arg: str) -> bytes:
    if worker.exchange.command_master("RELOAD"):
        raise AdminError("RELOAD failed, see logs for additional details", "F0000")
    return proto.command_complete("RELOAD")


def _whole_pooler_only(command: str, arg: str) -> None:
    if arg:
        raise AdminError("%s of a single database is not supported yet" % command)


def _pause(worker: Worker, arg: str) -> bytes:
    _whole_pooler_only("PAUSE", arg)
    if worker.paused:
        raise AdminError("already suspended/paused")
    _check(worker.exchange.command_all("PAUSE", arg))
    return proto.command_complete("PAUSE")


def _resume(worker: Worker, arg: str) -> bytes:
    _whole_pooler_only("RESUME", arg)
    if not worker.paused:
        raise AdminError("pooler is not paused/suspended")
    _check(worker.exchange.command_all("RESUME", arg))
    return proto.command_complete("RESUME")


def _shutdown(worker: Worker, arg: str) -> bytes:
    if arg not in ("", "WAIT_FOR_CLIENTS", "WAIT_FOR_SERVERS"):
        raise AdminError("invalid command 'SHUTDOWN %s', use SHOW HELP;" % arg)
    _check([e for e in [worker.exchange.command_master("SHUTDOWN", arg)] if e])
    return proto.command_complete("SHUTDOWN")


def _check(errors: list[str]) -> None:
    if errors:
        raise AdminError("; ".join(errors))


_CONTROL: dict[str, Callable[[Worker, str], bytes]] = {
    "RELOAD": _reload, "PAUSE": _pause, "RESUME": _resume, "SHUTDOWN": _shutdown,
}

_SHOW: dict[str, Callable] = {
    "VERSION": _show_version, "CONFIG": _show_config, "POOLS": _show_pools,
    "STATS": _show_stats, "CLIENTS": _show_clients, "SERVERS": _show_servers,
    "DATABASES": _show_databases,
}
