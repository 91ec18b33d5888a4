"""The pidfile: refuse to start while another instance lives, write after setup, remove at exit."""

from __future__ import annotations

import os


class PidfileError(Exception):
    pass


def read(path: str) -> int | None:
    """The live process ``path`` names, or None (no file, garbage, or a dead pid)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or "0")
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user
    return pid


def check(path: str) -> None:
    """Raise if ``path`` names a live process; remove it if it is stale."""
    if not path or not os.path.exists(path):
        return
    if read(path) is not None:
        raise PidfileError("pidfile '%s' exists, another instance running?" % path)
    os.unlink(path)


def write(path: str) -> None:
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write("%d\n" % os.getpid())


def remove(path: str) -> None:
    if not path:
        return
    try:
        with open(path) as f:
            if int(f.read().strip() or "0") != os.getpid():
                return  # not ours any more
        os.unlink(path)
    except (OSError, ValueError):
        pass
