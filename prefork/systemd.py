"""sd_notify for Type=notify units: one datagram to $NOTIFY_SOCKET, stdlib only.

Sending never blocks the master: a full or missing socket loses the message, which systemd
tolerates (it only waits for READY=1 up to its start timeout).
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines; False when not under a notify socket or the send failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.sendto("\n".join(lines).encode(), path)
        return True
    except OSError:
        return False
    finally:
        sock.close()
