"""Logging for the master and the workers: PgBouncer's line format, one line per event.

``2026-11-22 01:10:22.123 UTC [4242] LOG C-0x11: p0/app@127.0.0.1:50312 login attempt: ...``
— exactly PgBouncer's, so tools that read PgBouncer logs (pgBadger) read pgherd's. The pid in
brackets names the worker (each is a process; the master logs "worker N started (pid P)" and
SHOW WORKERS lists them); client and server ids are pgherd's connection ids in hex, as
PgBouncer prints its pointers (:func:`socket_prefix`). Workers inherit the handlers across
fork; a log file is opened with O_APPEND, so lines from different processes never interleave
mid-line.

Syslog (``syslog = 1``): a :class:`logging.handlers.SysLogHandler` on ``/dev/log`` (UDP to
localhost:514 where there is no ``/dev/log``) with ``syslog_facility`` (PgBouncer's names:
auth, authpriv, daemon, user, local0..local7; an unknown name falls back to daemon, as in
PgBouncer, with a warning) and lines ``<ident>[<pid>]: <LEVEL> <message>`` (syslog adds
the time). Its socket is non-blocking: when the syslog daemon cannot keep up, lines are
dropped rather than stalling a worker's hub. The handler is (re)built by :func:`setup` and by
:func:`reopen` when they are given the settings, so a reload can switch it on or off.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys
import time
from typing import Any

_LEVELS = {logging.DEBUG: "DEBUG", logging.INFO: "LOG", logging.WARNING: "WARNING",
           logging.ERROR: "ERROR", logging.CRITICAL: "FATAL"}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", t) + ".%03d UTC" % record.msecs
        line = "%s [%d] %s %s" % (stamp, record.process,
                                  _LEVELS.get(record.levelno, record.levelname),
                                  record.getMessage())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_formatter = _Formatter()


def socket_prefix(kind: str, conn_id: int, dbname: str, user: str, addr: str,
                  port: int) -> str:
    """PgBouncer's prefix of a line about one connection: ``C-0x1f: db/user@addr:port``
    (``C`` a client, ``S`` a server; ``(nodb)``/``(nouser)`` before they are known)."""
    return "%s-0x%x: %s/%s@%s:%d" % (kind, conn_id, dbname or "(nodb)", user or "(nouser)",
                                     addr, port)


class _SyslogFormatter(logging.Formatter):
    def __init__(self, ident: str) -> None:
        super().__init__()
        self.ident = ident

    def format(self, record: logging.LogRecord) -> str:
        line = "%s[%d]: %s %s" % (self.ident, record.process,
                                  _LEVELS.get(record.levelno, record.levelname),
                                  record.getMessage())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_H = logging.handlers.SysLogHandler
#: PgBouncer's syslog_facility names (lib/usual/logging.c).
FACILITIES = {
    "auth": _H.LOG_AUTH, "authpriv": _H.LOG_AUTHPRIV, "daemon": _H.LOG_DAEMON,
    "user": _H.LOG_USER, **{"local%d" % i: _H.LOG_LOCAL0 + i for i in range(8)},
}
DEV_LOG = "/dev/log"


def syslog_facility(name: str) -> int | None:
    """The syslog facility code of a ``syslog_facility`` value; None if unknown."""
    return FACILITIES.get(name.strip().lower())


class SyslogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler that never blocks: a full syslog socket drops the line."""

    dropped = 0

    def _connect_unixsocket(self, address: Any) -> None:
        super()._connect_unixsocket(address)
        self.socket.setblocking(False)

    def createSocket(self) -> None:
        super().createSocket()
        if self.socket is not None:
            self.socket.setblocking(False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if self.append_nul:
                msg += "\000"
            prio = "<%d>" % self.encodePriority(self.facility, self.mapPriority(record.levelname))
            data = prio.encode() + msg.encode("utf-8")
            if not self.socket:
                self.createSocket()
            if self.unixsocket:
                try:
                    self.socket.send(data)
                except BlockingIOError:
                    raise
                except OSError:  # syslog restarted: reconnect once
                    self.socket.close()
                    self._connect_unixsocket(self.address)
                    self.socket.send(data)
            elif self.socktype == socket.SOCK_DGRAM:
                self.socket.sendto(data, self.address)
            else:
                self.socket.sendall(data)
        except BlockingIOError:
            SyslogHandler.dropped += 1
        except Exception:
            self.handleError(record)


def configure_syslog(settings: Any, address: Any = None) -> None:
    """Add, replace or remove the syslog handler as ``settings`` (syslog, syslog_ident,
    syslog_facility) say. ``address``: where to send (default /dev/log, else UDP 514)."""
    root = logging.getLogger("pgherd")
    for handler in list(root.handlers):
        if isinstance(handler, logging.handlers.SysLogHandler):
            root.removeHandler(handler)
            handler.close()
    if not getattr(settings, "syslog", False):
        return
    facility = syslog_facility(settings.syslog_facility)
    unknown = facility is None
    if unknown:
        facility = _H.LOG_DAEMON
    fallback = address is None and not os.path.exists(DEV_LOG)
    if address is None:
        address = ("localhost", 514) if fallback else DEV_LOG
    try:
        handler = SyslogHandler(address, facility)
    except OSError as exc:
        root.warning("cannot log to syslog at %s: %s", address, exc.strerror or exc)
        return
    handler.setFormatter(_SyslogFormatter(settings.syslog_ident or "pgbouncer"))
    root.addHandler(handler)
    if fallback:
        root.warning("syslog: no %s, sending to localhost:514 (UDP)", DEV_LOG)
    if unknown:
        root.warning("unknown syslog_facility %r: using daemon", settings.syslog_facility)


def reopen(logfile: str, verbose: int, settings: Any = None) -> None:
    """After a reload: a fresh handle on the (maybe rotated or renamed) log file, same stderr;
    with ``settings``, the syslog handler is rebuilt from them too."""
    root = logging.getLogger("pgherd")
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if logfile:
        handler = logging.FileHandler(logfile, mode="a", encoding="utf-8")
        handler.setFormatter(_formatter)
        root.addHandler(handler)
    if settings is not None:
        configure_syslog(settings)


def setup(logfile: str, verbose: int, quiet: bool, settings: Any = None) -> None:
    """Log to ``logfile`` (if set), to stderr (unless quiet) and to syslog (if ``settings``
    say ``syslog = 1``); replaces earlier handlers."""
    root = logging.getLogger("pgherd")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    if logfile:
        handler: logging.Handler = logging.FileHandler(logfile, mode="a", encoding="utf-8")
        handler.setFormatter(_formatter)
        root.addHandler(handler)
    if not quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_formatter)
        root.addHandler(handler)
    if settings is not None:
        configure_syslog(settings)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
