"""Listening sockets, bound once by the master and kept for the life of the service.

One SO_REUSEPORT TCP socket per worker slot and listen address: the kernel spreads new
connections over the slots, and a respawned worker inherits its slot's socket, so connections
queued in the kernel survive a worker's death. The Unix socket is shared by all workers.

SO_REUSEPORT would also let any other process of the same user join a port silently, so at
start :func:`check_free` refuses a TCP or HTTP address that something already listens on
("address already in use"), as PgBouncer does — unless ``so_reuseport = 1`` says sharing the
port is wanted (PgBouncer's meaning: several services on one port, a rolling restart). The
check is a bind without SO_REUSEPORT, so the kernel applies its own rules (wildcard
addresses, IPv6). Later binds of the same service (a slot added by a reload) skip it: the
port is the service's own by then. Two services started at the very same instant may both
pass the check; one started while another runs never does.
"""

from __future__ import annotations

import errno
import os
import socket

from .config import Config


class ListenError(Exception):
    pass


def _addresses(config: Config) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for addr in config.settings.listen_addr:
        if addr == "*":
            out.append((socket.AF_INET, "0.0.0.0"))
            if socket.has_ipv6:
                out.append((socket.AF_INET6, "::"))
        else:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            out.append((family, addr))
    return out


def check_free(config: Config) -> None:
    """Raise ListenError naming the first TCP or HTTP address another process listens on;
    nothing when ``so_reuseport`` allows sharing them."""
    s = config.settings
    if s.so_reuseport:
        return
    groups = [(_addresses(config), s.listen_port)]
    if s.http_listen_port:
        groups.append((_http_addresses(config), s.http_listen_port))
    for addresses, port in groups:
        for family, host in addresses:
            _bind(family, host, port, reuseport=False).close()


def bind_tcp(config: Config) -> list[socket.socket]:
    """The TCP listeners of ONE worker slot (one per listen address)."""
    s = config.settings
    socks = _bind_group(_addresses(config), s.listen_port, s.listen_backlog)
    if s.tcp_defer_accept and hasattr(socket, "TCP_DEFER_ACCEPT"):
        # As PgBouncer: a connection is accepted once its first packet is there, so a login
        # starts with data to read instead of a wait.
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 45)
    return socks


def bind_http(config: Config) -> list[socket.socket]:
    """ONE worker slot's listener for /metrics /health /ready (none when the port is 0):
    every worker reads the whole service's shared memory, so any of them can answer."""
    s = config.settings
    if not s.http_listen_port:
        return []
    return _bind_group(_http_addresses(config), s.http_listen_port, s.listen_backlog)


def _http_addresses(config: Config) -> list[tuple[int, str]]:
    host = config.settings.http_listen_addr
    if host == "*":
        return [(socket.AF_INET, "0.0.0.0")]
    return [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]


def _bind_group(addresses: list[tuple[int, str]], port: int, backlog: int) -> list[socket.socket]:
    """SO_REUSEPORT listeners, one per address; all or none."""
    socks: list[socket.socket] = []
    try:
        for family, host in addresses:
            sock = _bind(family, host, port, reuseport=True)
            socks.append(sock)
            try:
                sock.listen(backlog)
            except OSError as exc:
                raise ListenError("could not listen on %s: %s" % (
                    _where(host, port), exc.strerror)) from None
            sock.setblocking(False)
    except ListenError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind(family: int, host: str, port: int, reuseport: bool) -> socket.socket:
    """A TCP socket bound to (host, port); ListenError naming the address if it cannot be.
    SO_REUSEADDR as every server: connections of a previous run in TIME_WAIT do not count."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError("could not listen on %s: %s" % (_where(host, port),
                                                          exc.strerror)) from None
    return sock


def _where(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def unix_socket_path(config: Config) -> str | None:
    d = config.settings.unix_socket_dir
    if not d:
        return None
    return os.path.join(d, ".s.PGSQL.%d" % config.settings.listen_port)


def bind_unix(config: Config) -> socket.socket | None:
    """The shared Unix listener; refuses a socket another live process answers on."""
    path = unix_socket_path(config)
    if path is None:
        return None
    if os.path.exists(path + ".lock"):
        raise ListenError("unix port %d is in use (%s.lock exists)" % (
            config.settings.listen_port, path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
            raise ListenError("cannot check unix socket %s: %s" % (path, exc.strerror)) from None
        if exc.errno == errno.ECONNREFUSED:
            os.unlink(path)  # stale, left by a process that died
    else:
        raise ListenError("unix socket is in use, cannot continue: %s" % path)
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, config.settings.unix_socket_mode)
        sock.listen(config.settings.listen_backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError("could not listen on %s: %s" % (path, exc.strerror)) from None
    return sock
