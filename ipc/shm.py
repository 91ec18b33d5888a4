"""The shared-memory segment: layout, accessors and the admission lock.

A memfd created by the master before it forks, mapped shared, so every worker (and every
respawned worker) sees the same pages. Layout, at fixed offsets:

* header (64 bytes): magic, layout version, slots, rows, master pid, config epoch;
* one 256-byte **worker slot** per worker slot (pid, heartbeat, state, client count, totals);
* a **row table**: one row per pool ``(database, user)``, per database and per user. A row
  has a header (its key, the master's *ghost* counters, one waiting flag byte per worker) and
  one **cell** per worker with that worker's counts and stats for the row;
* a **history ring**: the last ``HISTORY_LEN - 1`` samples of the service's totals
  (:data:`HISTORY_FIELDS`), written by the master alone, read by whoever draws charts of the
  last minutes (the HTTP status page). A sample is published by raising the sample count after
  its words are written; a reader keeps only samples the master cannot have been overwriting.

Every counter is read and written as one aligned 8-byte word (``Segment.q``, a memoryview cast
to "Q"): ``struct.pack_into`` writes byte by byte, and a reader in another process could see
a count half-written — briefly zero — and admit one connection too many.

Single writer everywhere: a worker writes only its own slot, its own cells and its own waiting
flag bytes; the master writes a slot or cell only while no worker owns it (before a fork,
after a reap), and the ghost counters. Readers sum over workers. Slots are read under a seqlock
(``seq`` odd while writing) for consistent snapshots.

Admission (may a server connection or a client be added under a global limit?) must be a
check-and-increment across processes. It runs under one byte-range **OFD lock** on the memfd
(``fcntl(F_OFD_SETLK)``), taken without blocking — a busy lock is retried cooperatively by
the caller — and released by the kernel if its holder dies, at any instant. Each process opens
the memfd anew (``/proc/self/fd/N``) because OFD locks belong to an open file description and
a description inherited across fork would be shared, i.e. not exclusive.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
import zlib
from array import array

import msgspec

MAGIC = b"PGHERD\x00\x02"
LAYOUT_VERSION = 4
MAX_WORKERS = 64
MAX_ROWS = 1024

# magic, layout version, slots, rows, (pad), master pid, config epoch, reload failures
_HEADER = struct.Struct("<8sIIIIQQQ")
HEADER_SIZE = 64
SLOT_SIZE = 256

# ---------------------------------------------------------------- worker slots

SLOT_FIELDS = (
    "seq", "pid", "generation", "state", "heartbeat_ns", "started_ns", "restarts",
    "clients", "servers", "logins", "waiting", "epoch", "paused",
)
assert 8 * len(SLOT_FIELDS) <= SLOT_SIZE
_SLOT_OFFSET = {name: i * 8 for i, name in enumerate(SLOT_FIELDS)}

# Worker slot states.
EMPTY, STARTING, READY, DRAINING = 0, 1, 2, 3

#: A worker writes its heartbeat this often; one whose heartbeat is older than STALLED_AFTER
#: is taken for stopped (SIGSTOP, a blocking bug): nothing is handed to it meanwhile.
HEARTBEAT_PERIOD = 0.02
STALLED_AFTER_NS = 100_000_000
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
    epoch: int
    paused: int


# ---------------------------------------------------------------- rows and cells

#: Stats counters, PgBouncer's totals (bytes and microseconds).
STAT_FIELDS = (
    "server_assignment_count", "xact_count", "query_count", "recv_bytes", "sent_bytes",
    "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count",
    "bind_count", "client_login_count",
)
#: Per-worker state of a row. ``servers`` are open or opening server connections held;
#: ``sent``/``received`` count servers handed to / taken from other workers (monotonic), so
#: that a server in flight between two workers is still counted against the limits.
CELL_FIELDS = (
    "servers", "sent", "received", "sv_active", "sv_idle", "sv_used", "sv_tested",
    "sv_being_canceled",
    "sv_login", "cl_active", "cl_waiting", "waiting_since_ns", "clients",
) + STAT_FIELDS
CELL_SIZE = 8 * len(CELL_FIELDS)
_CELL_WORDS = len(CELL_FIELDS)
_CL_WAITING = CELL_FIELDS.index("cl_waiting")
_WAITING_SINCE = CELL_FIELDS.index("waiting_since_ns")
_CELL_OFFSET = {name: i * 8 for i, name in enumerate(CELL_FIELDS)}

KEY_SIZE = 160
GHOST_FIELDS = ("ghost_servers", "ghost_sent", "ghost_received") + tuple(
    "ghost_" + f for f in STAT_FIELDS)
_ROW_HEAD = struct.Struct("<Q%ds%dQ" % (KEY_SIZE, len(GHOST_FIELDS)))
_GHOST_OFFSET = {name: 8 + KEY_SIZE + i * 8 for i, name in enumerate(GHOST_FIELDS)}
FLAGS_OFFSET = (_ROW_HEAD.size + 7) // 8 * 8
#: A pool's server defaults (ParameterStatus of its first login), msgpack, written once.
WELCOME_OFFSET = FLAGS_OFFSET + MAX_WORKERS
WELCOME_SIZE = 2048
CELLS_OFFSET = WELCOME_OFFSET + 8 + WELCOME_SIZE

# Row kinds, the first part of a row key.
POOL, DATABASE, USER = "p", "d", "u"


def row_key(kind: str, *names: str) -> bytes:
    key = "\x00".join((kind,) + names).encode()
    if len(key) > KEY_SIZE:
        raise ValueError("name too long for the shared pool table: %r" % (names,))
    return key


class RowSnapshot(msgspec.Struct, frozen=True):
    """One row summed over all workers (ghosts included), for the admin console and metrics."""

    kind: str
    names: tuple[str, ...]
    totals: dict[str, int]
    max_wait_ns: int  # oldest waiting_since_ns over workers, 0 when nobody waits

    def wait_ns(self, now_ns: int) -> int:
        """How long the oldest client has waited (never negative: a reader's clock sample
        may predate a wait that began while it read)."""
        return max(0, now_ns - self.max_wait_ns) if self.max_wait_ns else 0


class TableFull(Exception):
    pass


# ---------------------------------------------------------------- history ring

#: One sample of the whole service: when (monotonic ns), the stats counters summed over every
#: pool, the pools' client and server gauges summed, and the oldest waiting client's wait.
HISTORY_FIELDS = ("at_ns",) + STAT_FIELDS + (
    "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login",
    "sv_being_canceled", "maxwait_ns")
HISTORY_LEN = 301  # 300 samples readable: the slot of the oldest is the one being rewritten
_HISTORY_WORDS = len(HISTORY_FIELDS)
HISTORY_SIZE = 8 + HISTORY_LEN * _HISTORY_WORDS * 8  # sample count, then the samples


_LOCK = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
_UNLOCK = struct.pack("hhqqi4x", fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0)


class Segment:
    """The mapped segment; create it in the master, :meth:`attach` it in each worker."""

    def __init__(self, fd: int, mm: mmap.mmap, max_workers: int, max_rows: int) -> None:
        self.fd = fd
        self.mm = mm
        self.max_workers = max_workers
        self.max_rows = max_rows
        self.slots_offset = HEADER_SIZE
        self.rows_offset = HEADER_SIZE + SLOT_SIZE * max_workers
        self.row_size = CELLS_OFFSET + CELL_SIZE * max_workers
        self.history_offset = self.rows_offset + self.row_size * max_rows
        self.lock_fd = -1
        self._rows: dict[bytes, int] = {}  # this process's cache of key -> row index
        # servers, sent, received of every cell of a row in one unpack: the admission check
        # runs it under the lock, so it must be quick.
        self._no_flags = bytes(max_workers)
        self.q = memoryview(mm).cast("Q")  # the whole segment as aligned 8-byte words

    @classmethod
    def create(cls, max_workers: int = MAX_WORKERS, max_rows: int = MAX_ROWS) -> Segment:
        if max_workers > MAX_WORKERS:
            raise ValueError("at most %d workers" % MAX_WORKERS)
        row_size = CELLS_OFFSET + CELL_SIZE * max_workers
        size = HEADER_SIZE + SLOT_SIZE * max_workers + row_size * max_rows + HISTORY_SIZE
        fd = os.memfd_create("pgherd-shm", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        _HEADER.pack_into(mm, 0, MAGIC, LAYOUT_VERSION, max_workers, max_rows, 0,
                          os.getpid(), 0, 0)
        seg = cls(fd, mm, max_workers, max_rows)
        seg.attach()
        return seg

    def close(self) -> None:
        """Unmap and close (tests; the service keeps its segment for life)."""
        self.q.release()
        self.mm.close()
        for fd in (self.fd, self.lock_fd):
            if fd >= 0:
                os.close(fd)

    def attach(self) -> None:
        """Open this process's own description of the memfd, for the admission lock."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
        self.lock_fd = os.open("/proc/self/fd/%d" % self.fd, os.O_RDWR | os.O_CLOEXEC)
        self._rows = {}

    # -- header ------------------------------------------------------------------------

    def _header_set(self, index: int, value: int) -> None:
        fields = list(_HEADER.unpack_from(self.mm, 0))
        fields[index] = value
        _HEADER.pack_into(self.mm, 0, *fields)

    @property
    def master_pid(self) -> int:
        return _HEADER.unpack_from(self.mm, 0)[5]

    @property
    def epoch(self) -> int:
        """The configuration epoch the master last sent (master writes, all read)."""
        return _HEADER.unpack_from(self.mm, 0)[6]

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._header_set(6, value)

    @property
    def reload_failures(self) -> int:
        return _HEADER.unpack_from(self.mm, 0)[7]

    @reload_failures.setter
    def reload_failures(self, value: int) -> None:
        self._header_set(7, value)

    # -- admission lock ----------------------------------------------------------------

    def try_lock(self) -> bool:
        """Take the admission lock without waiting; False when another process holds it."""
        try:
            fcntl.fcntl(self.lock_fd, fcntl.F_OFD_SETLK, _LOCK)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def unlock(self) -> None:
        fcntl.fcntl(self.lock_fd, fcntl.F_OFD_SETLK, _UNLOCK)

    # -- worker slots ------------------------------------------------------------------

    def _slot(self, slot: int) -> int:
        if not 0 <= slot < self.max_workers:
            raise IndexError("worker slot %d out of range" % slot)
        return self.slots_offset + slot * SLOT_SIZE

    def write(self, slot: int, **fields: int) -> None:
        """Update some fields of ``slot`` under its seqlock (the slot's single writer only)."""
        q = self.q
        base = self._slot(slot) >> 3
        seq = q[base]
        q[base] = seq + 1
        for name, value in fields.items():
            q[base + (_SLOT_OFFSET[name] >> 3)] = value
        q[base] = seq + 2

    def reset(self, slot: int, **fields: int) -> None:
        """Zero a slot (keeping its seq moving) and set ``fields``: the master, after a reap."""
        values = dict.fromkeys(SLOT_FIELDS[1:], 0)
        values.update(fields)
        self.write(slot, **values)

    def read(self, slot: int) -> WorkerSlot:
        """A consistent snapshot; retries while the owner is in the middle of a write."""
        q = self.q
        base = self._slot(slot) >> 3
        while True:
            values = q[base : base + len(SLOT_FIELDS)].tolist()
            seq = values[0]
            if seq & 1 == 0 and q[base] == seq:
                return WorkerSlot(slot, *values[1:])
            os.sched_yield()

    def beat(self, slot: int, now_ns: int) -> None:
        """The worker's heartbeat: one aligned word, no seqlock needed to write or read it."""
        self.q[(self._slot(slot) + _SLOT_OFFSET["heartbeat_ns"]) >> 3] = now_ns

    def stalled(self, slot: int, now_ns: int) -> bool:
        """Has the worker of ``slot`` missed its heartbeats for STALLED_AFTER_NS?"""
        return now_ns - self.q[(self._slot(slot) + _SLOT_OFFSET["heartbeat_ns"]) >> 3] \
            > STALLED_AFTER_NS

    def read_all(self, count: int | None = None) -> list[WorkerSlot]:
        return [self.read(i) for i in range(count if count is not None else self.max_workers)]

    def total_clients(self) -> int:
        """Admitted clients of all workers (max_client_conn runs this under the lock)."""
        start = (self.slots_offset + _SLOT_OFFSET["clients"]) >> 3
        return sum(self.q[start : start + self.max_workers * SLOT_SIZE // 8 : SLOT_SIZE // 8])

    # -- rows --------------------------------------------------------------------------

    def _row_base(self, row: int) -> int:
        return self.rows_offset + row * self.row_size

    def find_row(self, key: bytes) -> int | None:
        """The row of ``key`` if some process created it (no lock needed to look)."""
        row = self._rows.get(key)
        if row is not None:
            return row
        mm = self.mm
        start = zlib.crc32(key) % self.max_rows
        padded = key.ljust(KEY_SIZE, b"\x00")
        for i in range(self.max_rows):
            row = (start + i) % self.max_rows
            base = self._row_base(row)
            if not self.q[base >> 3]:
                return None
            if mm[base + 8 : base + 8 + KEY_SIZE] == padded:
                self._rows[key] = row
                return row
        return None

    def row(self, key: bytes) -> int:
        """Find or create the row of ``key``; the caller holds the admission lock."""
        row = self.find_row(key)
        if row is not None:
            return row
        mm = self.mm
        start = zlib.crc32(key) % self.max_rows
        for i in range(self.max_rows):
            row = (start + i) % self.max_rows
            base = self._row_base(row)
            if not self.q[base >> 3]:
                mm[base + 8 : base + 8 + KEY_SIZE] = key.ljust(KEY_SIZE, b"\x00")
                self.q[base >> 3] = 1  # published last: readers never see half a key
                self._rows[key] = row
                return row
        raise TableFull("the shared pool table is full (%d rows)" % self.max_rows)

    def _cell(self, row: int, slot: int) -> int:
        return self._row_base(row) + CELLS_OFFSET + slot * CELL_SIZE

    def cell_get(self, row: int, slot: int, field: str) -> int:
        return self.q[(self._cell(row, slot) + _CELL_OFFSET[field]) >> 3]

    def cell_add(self, row: int, slot: int, field: str, delta: int) -> None:
        i = (self._cell(row, slot) + _CELL_OFFSET[field]) >> 3
        self.q[i] += delta  # the cell's single writer: no other process changes it

    def cell_set(self, row: int, slot: int, **fields: int) -> None:
        base = self._cell(row, slot)
        q = self.q
        for name, value in fields.items():
            q[(base + _CELL_OFFSET[name]) >> 3] = value

    def cell_read(self, row: int, slot: int) -> dict[str, int]:
        start = self._cell(row, slot) >> 3
        return dict(zip(CELL_FIELDS, self.q[start : start + len(CELL_FIELDS)].tolist()))

    def _ghost(self, row: int, name: str) -> int:
        return self.q[(self._row_base(row) + _GHOST_OFFSET[name]) >> 3]

    def servers_total(self, row: int) -> int:
        """Server connections counted against a row's limits: held, in flight between
        workers, and those of dead workers still inside their grace period.

        The fields are read in an order that can only overcount while other processes move
        a server (hand-over: the receiver adds ``servers`` then ``received``, the sender adds
        ``sent`` then subtracts ``servers``; a reap raises ghosts before zeroing cells and
        zeroes ``received`` before raising its ghost): every ``received`` first (ghost before
        cells), then every ``servers``, then every ``sent`` (cells before ghosts). Reading
        them in any other order can undercount by one — and admit one server too many.
        """
        q = self.q
        cells = q[(self._row_base(row) + CELLS_OFFSET) >> 3 :][: self.max_workers * _CELL_WORDS]
        g = (self._row_base(row) + _GHOST_OFFSET["ghost_servers"]) >> 3
        received = q[g + 2]
        received += sum(cells[2::_CELL_WORDS])
        servers = sum(cells[0::_CELL_WORDS])
        servers += q[g]
        sent = sum(cells[1::_CELL_WORDS])
        sent += q[g + 1]
        return servers + sent - received

    def get_welcome(self, row: int) -> bytes | None:
        base = self._row_base(row) + WELCOME_OFFSET
        length = self.q[base >> 3]
        return bytes(self.mm[base + 8 : base + 8 + length]) if length else None

    def set_welcome(self, row: int, data: bytes) -> None:
        """Write a row's welcome once; the caller holds the admission lock."""
        if len(data) > WELCOME_SIZE:
            return  # unusual parameter sets stay per worker
        base = self._row_base(row) + WELCOME_OFFSET
        self.mm[base + 8 : base + 8 + len(data)] = data
        self.q[base >> 3] = len(data)  # length last: readers see all or nothing

    # -- waiting flags: who has clients waiting for a pool, and since when -------------

    def set_waiting(self, row: int, slot: int, count: int, since_ns: int) -> None:
        """Publish a worker's waiting clients of a pool (called at every queue change)."""
        base = self._row_base(row)
        cell = (base + CELLS_OFFSET + slot * CELL_SIZE) >> 3
        self.q[cell + _CL_WAITING] = count
        self.q[cell + _WAITING_SINCE] = since_ns
        self.mm[base + FLAGS_OFFSET + slot] = 1 if count else 0

    def oldest_waiter_elsewhere(self, row: int, slot: int) -> tuple[int, int] | None:
        """(slot, waiting_since_ns) of the longest-waiting other worker that is not stalled,
        or None.

        Runs at every release of a server: the common answer (nobody waits) costs one
        comparison; the flags are then searched in C, not in a Python loop.
        """
        base = self._row_base(row) + FLAGS_OFFSET
        flags = self.mm[base : base + self.max_workers]
        if flags == self._no_flags:
            return None
        best = None
        cells = (self._row_base(row) + CELLS_OFFSET + _CELL_OFFSET["waiting_since_ns"]) >> 3
        q = self.q
        now_ns = time.monotonic_ns()
        other = flags.find(1)
        while other >= 0:
            if other != slot:
                since = q[cells + other * _CELL_WORDS]
                # A stopped worker's clients wait longest of all: never send servers there.
                if since and (best is None or since < best[1]) and not self.stalled(
                        other, now_ns):
                    best = (other, since)
            other = flags.find(1, other + 1)
        return best

    # -- master: reclaiming a dead worker's share -------------------------------------

    def retire_worker(self, slot: int) -> dict[int, int]:
        """Move a dead worker's cells into the ghost counters and zero them.

        Returns {row: servers} the caller must later :meth:`release_ghost`: the backends of a
        dead worker may outlive it for a moment, so its servers stay counted a little longer.
        Each step may only raise what :meth:`servers_total` reads, until the last restores it.
        """
        held: dict[int, int] = {}
        q = self.q
        for row in range(self.max_rows):
            base = self._row_base(row)
            if not q[base >> 3]:
                continue
            cell = self.cell_read(row, slot)
            at = self._cell(row, slot) >> 3
            ghost = lambda name: (base + _GHOST_OFFSET["ghost_" + name]) >> 3  # noqa: E731
            for name in ("servers", "sent") + STAT_FIELDS:
                q[ghost(name)] += cell[name]
            self.mm[base + FLAGS_OFFSET + slot] = 0
            for i, name in enumerate(CELL_FIELDS):
                if name != "received":
                    q[at + i] = 0
            q[at + CELL_FIELDS.index("received")] = 0
            q[ghost("received")] += cell["received"]
            if cell["servers"]:
                held[row] = cell["servers"]
        return held

    def release_ghost(self, row: int, servers: int) -> None:
        self.q[(self._row_base(row) + _GHOST_OFFSET["ghost_servers"]) >> 3] -= servers

    # -- readers for the admin console and metrics -------------------------------------

    def handovers(self, slot: int) -> tuple[int, int]:
        """(sent, received): servers a worker slot handed to / took from other workers, over
        its pool rows (database and user rows repeat the same moves)."""
        sent = received = 0
        pool_prefix = row_key(POOL) + b"\x00"
        for row in range(self.max_rows):
            base = self._row_base(row)
            if self.q[base >> 3] and self.mm[base + 8 : base + 10] == pool_prefix:
                sent += self.cell_get(row, slot, "sent")
                received += self.cell_get(row, slot, "received")
        return sent, received

    def snapshot_rows(self) -> list[RowSnapshot]:
        out = []
        mm = self.mm
        for row in range(self.max_rows):
            base = self._row_base(row)
            if not self.q[base >> 3]:
                continue
            raw = bytes(mm[base + 8 : base + 8 + KEY_SIZE]).rstrip(b"\x00").decode()
            kind, *names = raw.split("\x00")
            totals = dict.fromkeys(CELL_FIELDS, 0)
            oldest = 0
            for slot in range(self.max_workers):
                start = self._cell(row, slot) >> 3
                cell = self.q[start : start + len(CELL_FIELDS)].tolist()
                for name, value in zip(CELL_FIELDS, cell):
                    totals[name] += value
                since = cell[_CELL_OFFSET["waiting_since_ns"] // 8]
                if cell[_CELL_OFFSET["cl_waiting"] // 8] and since and (not oldest or since < oldest):
                    oldest = since
            for f in STAT_FIELDS:
                totals[f] += self._ghost(row, "ghost_" + f)
            totals["servers"] = self.servers_total(row)
            del totals["waiting_since_ns"]
            out.append(RowSnapshot(kind, tuple(names), totals, oldest))
        return out

    # -- history ring: the master samples, any process reads ---------------------------

    def history_append(self, **values: int) -> None:
        """Add one sample (fields of :data:`HISTORY_FIELDS`, missing ones 0); master only."""
        q = self.q
        count_at = self.history_offset >> 3
        count = q[count_at]
        start = count_at + 1 + (count % HISTORY_LEN) * _HISTORY_WORDS
        q[start : start + _HISTORY_WORDS] = array("Q", [values.get(name, 0)
                                                        for name in HISTORY_FIELDS])
        q[count_at] = count + 1  # published last: the sample is whole before it is counted

    def history(self) -> list[dict[str, int]]:
        """The samples of the ring, oldest first.

        Lock-free against the master's writes: the sample being written is the one after
        the last counted, in the slot of the oldest; samples whose slot the master may have
        reused while we read (count moved on meanwhile) are dropped."""
        q = self.q
        count_at = self.history_offset >> 3
        count = q[count_at]
        words = q[count_at + 1 : count_at + 1 + HISTORY_LEN * _HISTORY_WORDS].tolist()
        after = q[count_at]
        first = max(0, after - HISTORY_LEN + 1)
        out = []
        for n in range(first, count):
            at = (n % HISTORY_LEN) * _HISTORY_WORDS
            out.append(dict(zip(HISTORY_FIELDS, words[at : at + _HISTORY_WORDS])))
        return out
