"""What the kernel knows about a worker process, read through psutil: memory, CPU, files.

Shared by the admin console's SHOW WORKERS and the HTTP status page. A reader in any worker
may ask about any other worker: they all run as the same user.
"""

from __future__ import annotations

from typing import NamedTuple

import psutil


class Usage(NamedTuple):
    rss: int  # resident memory, bytes
    cpu_seconds: float  # user + system CPU time since the process started
    open_fds: int


def usage(pid: int) -> Usage | None:
    """The usage of process ``pid``, None if it is gone (or not ours to look at)."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            times = proc.cpu_times()
            return Usage(proc.memory_info().rss, times.user + times.system, proc.num_fds())
    except psutil.Error:
        return None
