"""Listening sockets, bound once by the master and kept for the life of the service.

One SO_REUSEPORT TCP socket per worker slot and listen address: the kernel spreads new
connections over the slots, and a respawned worker inherits its slot's socket, so connections
queued in the kernel survive a worker's death. The Unix socket is shared by all workers.
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
    host = s.http_listen_addr
    if host == "*":
        return _bind_group([(socket.AF_INET, "0.0.0.0")], s.http_listen_port, s.listen_backlog)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _bind_group([(family, host)], s.http_listen_port, s.listen_backlog)


def _bind_group(addresses: list[tuple[int, str]], port: int, backlog: int) -> list[socket.socket]:
    """SO_REUSEPORT listeners, one per address; all or none."""
    socks: list[socket.socket] = []
    for family, host in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            for other in socks:
                other.close()
            raise ListenError("could not listen on %s:%d: %s" % (host, port,
                                                                  exc.strerror)) from None
        socks.append(sock)
    return socks


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
