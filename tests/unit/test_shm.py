"""The shared-memory segment: rows, cells, limits arithmetic, seqlocked slots, and counters
that another process never sees half-written."""

import os
import time

import pytest

from ipc import shm


@pytest.fixture
def seg():
    segment = shm.Segment.create(max_workers=4, max_rows=16)
    yield segment
    segment.close()


def test_rows_are_found_by_every_process_and_created_once(seg):
    key = shm.row_key(shm.POOL, "db", "user")
    assert seg.find_row(key) is None
    row = seg.row(key)
    assert seg.row(key) == row
    other = shm.Segment(seg.fd, seg.mm, seg.max_workers, seg.max_rows)  # no cache yet
    assert other.find_row(key) == row
    with pytest.raises(ValueError):
        shm.row_key(shm.POOL, "x" * 100, "y" * 100)


def test_servers_total_counts_held_in_flight_and_ghosts(seg):
    row = seg.row(shm.row_key(shm.POOL, "db", "u"))
    seg.cell_add(row, 0, "servers", 3)
    seg.cell_add(row, 1, "servers", 2)
    assert seg.servers_total(row) == 5
    # Worker 0 hands one to worker 1: counted once while in flight, once after.
    seg.cell_add(row, 0, "sent", 1)
    seg.cell_add(row, 0, "servers", -1)
    assert seg.servers_total(row) == 5
    seg.cell_add(row, 1, "servers", 1)
    seg.cell_add(row, 1, "received", 1)
    assert seg.servers_total(row) == 5
    held = seg.retire_worker(1)  # worker 1 dies holding 3
    assert held == {row: 3} and seg.servers_total(row) == 5
    assert seg.cell_read(row, 1)["servers"] == 0
    seg.release_ghost(row, 3)
    assert seg.servers_total(row) == 2


def test_waiting_flags_name_the_oldest_other_worker(seg):
    row = seg.row(shm.row_key(shm.POOL, "db", "u"))
    now = time.monotonic_ns()
    for slot in range(3):
        seg.beat(slot, now)
    assert seg.oldest_waiter_elsewhere(row, 0) is None
    seg.set_waiting(row, 1, 2, 2000)
    seg.set_waiting(row, 2, 1, 1000)
    assert seg.oldest_waiter_elsewhere(row, 0) == (2, 1000)
    assert seg.oldest_waiter_elsewhere(row, 2) == (1, 2000)
    seg.set_waiting(row, 2, 0, 0)
    assert seg.oldest_waiter_elsewhere(row, 0) == (1, 2000)


def test_a_stalled_worker_is_never_the_oldest_waiter(seg):
    """Its clients wait longest of all once it stops: servers must not flow there."""
    row = seg.row(shm.row_key(shm.POOL, "db", "u"))
    now = time.monotonic_ns()
    seg.beat(0, now)
    seg.beat(1, now - shm.STALLED_AFTER_NS - 1)  # stopped
    seg.beat(2, now)
    seg.set_waiting(row, 1, 5, 1000)
    seg.set_waiting(row, 2, 1, 2000)
    assert seg.stalled(1, now) and not seg.stalled(2, now)
    assert seg.oldest_waiter_elsewhere(row, 0) == (2, 2000)
    seg.set_waiting(row, 2, 0, 0)
    assert seg.oldest_waiter_elsewhere(row, 0) is None
    seg.beat(1, time.monotonic_ns())  # running again
    assert seg.oldest_waiter_elsewhere(row, 0) == (1, 1000)


def test_handovers_sum_pool_rows_only(seg):
    """A hand-over is counted in the pool's row and again in its database and user rows;
    SHOW WORKERS counts it once."""
    for kind, names in ((shm.POOL, ("db", "u")), (shm.DATABASE, ("db",)), (shm.USER, ("u",))):
        row = seg.row(shm.row_key(kind, *names))
        seg.cell_add(row, 1, "sent", 2)
        seg.cell_add(row, 2, "received", 2)
    other = seg.row(shm.row_key(shm.POOL, "db2", "u"))
    seg.cell_add(other, 1, "sent", 1)
    seg.cell_add(other, 2, "received", 1)
    assert seg.handovers(1) == (3, 0)
    assert seg.handovers(2) == (0, 3)
    assert seg.handovers(0) == (0, 0)


def test_maxwait_is_never_negative(seg):
    row = shm.RowSnapshot("p", ("db", "u"), {}, max_wait_ns=5_000)
    assert row.wait_ns(8_000) == 3_000
    assert row.wait_ns(4_000) == 0  # sampled the clock before the wait began
    assert shm.RowSnapshot("p", ("db", "u"), {}, max_wait_ns=0).wait_ns(8_000) == 0


def test_admission_lock_excludes_another_description(seg):
    other = shm.Segment(seg.fd, seg.mm, seg.max_workers, seg.max_rows)
    other.attach()  # its own open file description, as a worker has
    try:
        assert seg.try_lock()
        assert not other.try_lock()
        seg.unlock()
        assert other.try_lock()
        other.unlock()
    finally:
        os.close(other.lock_fd)


def test_slots_read_consistently(seg):
    seg.write(2, pid=42, clients=7, state=shm.READY)
    snap = seg.read(2)
    assert (snap.pid, snap.clients, snap.state) == (42, 7, shm.READY)
    assert seg.total_clients() == 7


def test_a_reader_never_sees_a_counter_half_written(seg):
    """A writer flips a count between 255 and 256 (every byte changes); another process
    reading it must only ever see one of the two."""
    row = seg.row(shm.row_key(shm.POOL, "db", "u"))
    seg.cell_set(row, 0, servers=255)
    pid = os.fork()
    if pid == 0:
        try:
            for i in range(200_000):
                seg.cell_set(row, 0, servers=256 if i & 1 else 255)
        finally:
            os._exit(0)
    seen = set()
    while not os.waitpid(pid, os.WNOHANG)[0]:
        seen.add(seg.cell_get(row, 0, "servers"))
    assert seen <= {255, 256}


def test_history_ring_keeps_the_last_samples_oldest_first(seg):
    assert seg.history() == []
    for i in range(shm.HISTORY_LEN + 10):
        seg.history_append(at_ns=1000 + i, xact_count=i, maxwait_ns=2 * i)
    samples = seg.history()
    assert len(samples) == shm.HISTORY_LEN - 1  # the oldest slot is the next to be written
    assert [s["xact_count"] for s in samples] == list(range(11, shm.HISTORY_LEN + 10))
    last = samples[-1]
    assert set(last) == set(shm.HISTORY_FIELDS)
    assert last["at_ns"] == 1000 + shm.HISTORY_LEN + 9 and last["cl_waiting"] == 0


def test_history_reader_drops_a_sample_the_master_may_be_overwriting(seg):
    """A reader whose copy straddles a write keeps only samples whose slot was not reused."""
    for i in range(shm.HISTORY_LEN):
        seg.history_append(at_ns=i + 1, xact_count=i)
    count_word = seg.history_offset >> 3
    before = seg.q[count_word]

    class Racing:
        """The count as seen before and after copying the samples: the master wrote 3."""

        def __init__(self, q):
            self.q = q
            self.reads = 0

        def __getitem__(self, index):
            value = self.q[index]
            if index == count_word:
                self.reads += 1
                return value if self.reads == 1 else value + 3
            return value

    seg.q = Racing(seg.q)
    samples = seg.history()
    seg.q = seg.q.q
    assert [s["xact_count"] for s in samples][0] == before - shm.HISTORY_LEN + 4
    assert samples[-1]["xact_count"] == before - 1
