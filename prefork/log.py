"""Logging for the master and the workers: PgBouncer's line format, one line per event.

``2026-11-22 01:10:22.123 UTC [4242] worker 1 LOG C-17: p0/app@127.0.0.1:50312 login attempt``
— the pid and the process's role name the worker. Workers inherit the handlers across fork;
a log file is opened with O_APPEND, so lines from different processes never interleave
mid-line.
"""

from __future__ import annotations

import logging
import sys
import time

_LEVELS = {logging.DEBUG: "DEBUG", logging.INFO: "LOG", logging.WARNING: "WARNING",
           logging.ERROR: "ERROR", logging.CRITICAL: "FATAL"}


class _Formatter(logging.Formatter):
    role = "master"

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", t) + ".%03d UTC" % record.msecs
        line = "%s [%d] %s %s %s" % (stamp, record.process, self.role,
                                     _LEVELS.get(record.levelno, record.levelname),
                                     record.getMessage())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_formatter = _Formatter()


def set_role(role: str) -> None:
    """Name this process in every later line (the master calls it in each forked worker)."""
    _Formatter.role = role


def reopen(logfile: str, verbose: int) -> None:
    """After a reload: a fresh handle on the (maybe rotated or renamed) log file, same stderr."""
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


def setup(logfile: str, verbose: int, quiet: bool) -> None:
    """Log to ``logfile`` (if set) and to stderr (unless quiet); replaces earlier handlers."""
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
    if not root.handlers:
        root.addHandler(logging.NullHandler())
