"""ipc/channel.py: control messages with fds through the inboxes."""

from __future__ import annotations

import array
import os
import socket

from ipc import channel


def test_message_and_fd_arrive_together() -> None:
    inboxes = channel.Inboxes(1)
    r, w = os.pipe()
    try:
        assert inboxes.send(0, channel.Cancel(pid=7, key=9), [w])
        message, fds = inboxes.receive(0)
        assert message == channel.Cancel(pid=7, key=9) and len(fds) == 1
        os.write(fds[0], b"x")  # the received fd is the same pipe
        assert os.read(r, 1) == b"x"
        os.close(fds[0])
        assert inboxes.receive(0) is None
    finally:
        os.close(r)
        os.close(w)


def test_undecodable_datagram_is_dropped_with_its_fds() -> None:
    inboxes = channel.Inboxes(1)
    r, w = os.pipe()
    try:
        inboxes.tx[0].sendmsg([b"\xc1 not msgpack"],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
        os.close(w)
        w = -1
        assert inboxes.send(0, channel.Cancel(pid=1, key=2))
        assert inboxes.receive(0) == (channel.Cancel(pid=1, key=2), [])
        # The fd that came with the bad datagram was closed: the pipe's last writer is gone.
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
