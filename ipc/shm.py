"""The shared-memory segment: layout and accessors.

An anonymous shared ``mmap`` created by the master before it forks, so every worker (and every
respawned worker) maps the same pages; no name, nothing to clean up. Layout, at fixed offsets:

* header (64 bytes): magic, layout version, number of slots, master pid, config epoch;
* one 256-byte slot per worker slot: written only by the worker that owns it (the master
  writes a slot only while no worker process owns it: before a fork and after a reap).

Writers wrap each update in a seqlock (``seq`` odd while writing) so readers on other
processes get consistent snapshots without locks: a reader retries when ``seq`` was odd or
changed under it. Used for stats and liveness only — never for admission decisions.
"""

from __future__ import annotations

import mmap
import os
import struct

import msgspec

MAGIC = b"PGHERD\x00\x01"
LAYOUT_VERSION = 1
MAX_WORKERS = 128

_HEADER = struct.Struct("<8sIIQQ")
HEADER_SIZE = 64
SLOT_SIZE = 256

# Slot fields, in order; every one is an unsigned 64-bit integer.
SLOT_FIELDS = (
    "seq", "pid", "generation", "state", "heartbeat_ns", "started_ns", "restarts",
    "clients", "servers", "logins", "waiting",
    "xact_count", "query_count", "recv_bytes", "sent_bytes", "xact_time", "query_time",
    "wait_time", "client_login_count", "server_assignment_count",
)
_SLOT = struct.Struct("<%dQ" % len(SLOT_FIELDS))
assert _SLOT.size <= SLOT_SIZE
_SEQ = struct.Struct("<Q")
_FIELD_OFFSET = {name: i * 8 for i, name in enumerate(SLOT_FIELDS)}

# Worker slot states.
EMPTY, STARTING, READY, DRAINING = 0, 1, 2, 3
STATE_NAMES = {EMPTY: "empty", STARTING: "starting", READY: "ready", DRAINING: "draining"}


class WorkerSlot(msgspec.Struct, frozen=True):
    """A consistent snapshot of one worker slot."""

    slot: int
    pid: int
    generation: int
    state: int
    heartbeat_ns: int
    started_ns: int
    restarts: int
    clients: int
    servers: int
    logins: int
    waiting: int
    xact_count: int
    query_count: int
    recv_bytes: int
    sent_bytes: int
    xact_time: int
    query_time: int
    wait_time: int
    client_login_count: int
    server_assignment_count: int


class Segment:
    """The mapped segment; create it in the master, use it in every process."""

    def __init__(self, mm: mmap.mmap, max_workers: int) -> None:
        self.mm = mm
        self.max_workers = max_workers

    @classmethod
    def create(cls, max_workers: int = MAX_WORKERS) -> Segment:
        size = HEADER_SIZE + SLOT_SIZE * max_workers
        mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        _HEADER.pack_into(mm, 0, MAGIC, LAYOUT_VERSION, max_workers, os.getpid(), 0)
        return cls(mm, max_workers)

    # -- header ------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return _HEADER.unpack_from(self.mm, 0)[4]

    @epoch.setter
    def epoch(self, value: int) -> None:
        magic, version, nslots, master, _ = _HEADER.unpack_from(self.mm, 0)
        _HEADER.pack_into(self.mm, 0, magic, version, nslots, master, value)

    # -- slots -------------------------------------------------------------------------

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.max_workers:
            raise IndexError("worker slot %d out of range" % slot)
        return HEADER_SIZE + slot * SLOT_SIZE

    def write(self, slot: int, **fields: int) -> None:
        """Update some fields of ``slot`` under its seqlock (the slot's single writer only)."""
        mm = self.mm
        base = self._offset(slot)
        (seq,) = _SEQ.unpack_from(mm, base)
        _SEQ.pack_into(mm, base, seq + 1)
        for name, value in fields.items():
            _SEQ.pack_into(mm, base + _FIELD_OFFSET[name], value)
        _SEQ.pack_into(mm, base, seq + 2)

    def reset(self, slot: int, **fields: int) -> None:
        """Zero a slot (keeping its seq moving) and set ``fields``: the master, after a reap."""
        values = dict.fromkeys(SLOT_FIELDS[1:], 0)
        values.update(fields)
        self.write(slot, **values)

    def read(self, slot: int) -> WorkerSlot:
        """A consistent snapshot; retries while the owner is in the middle of a write."""
        mm = self.mm
        base = self._offset(slot)
        while True:
            values = _SLOT.unpack_from(mm, base)
            seq = values[0]
            if seq & 1 == 0 and _SEQ.unpack_from(mm, base)[0] == seq:
                return WorkerSlot(slot, *values[1:])
            os.sched_yield()

    def read_all(self, count: int | None = None) -> list[WorkerSlot]:
        return [self.read(i) for i in range(count if count is not None else self.max_workers)]
