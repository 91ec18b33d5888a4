"""Global limits: where a new server connection or a new client is admitted — for the whole
service, not for this worker.

Every limit is a check-and-increment on shared counters (``ipc/shm``): under the admission
lock a worker sums the counts of all workers for the pool's row, its database's row and its
user's row, and only if all are under their limits does it raise its own counts. Lowering a
count needs no lock. A server handed to another worker moves between the two workers' counts
through monotonic sent/received counters, so it is counted even while in flight.

The lock is never waited for: a busy lock answers ``None`` ("ask again in a moment") and the
caller retries from a timer or a greenlet — the hub never blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gevent
import msgspec

from ipc import shm

if TYPE_CHECKING:
    from .pool import Pool
    from .worker import Worker


class Limits:
    """This worker's side of the service-wide counts."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.segment = worker.segment
        self.slot = worker.slot
        self.clients = 0  # admitted clients of this worker (max_client_conn)

    # ------------------------------------------------------------------ rows

    def ensure_rows(self, pool: Pool) -> None:
        """Find or create the shared rows of a new pool (greenlet context: may wait)."""
        rows = self.find_rows(pool.dbname, pool.user)
        if rows is None:
            seg = self.segment
            while not seg.try_lock():
                gevent.sleep(0.0005)
            try:
                rows = tuple(seg.row(key) for key in _keys(pool.dbname, pool.user))
            finally:
                seg.unlock()
        pool.rows = rows

    def find_rows(self, dbname: str, user: str) -> tuple[int, int, int] | None:
        rows = tuple(self.segment.find_row(key) for key in _keys(dbname, user))
        return None if None in rows else rows  # type: ignore[return-value]

    # ------------------------------------------------------------------ servers

    def admit_server(self, pool: Pool, pool_limit: int) -> bool | None:
        """Count one more server for ``pool`` if no limit forbids it.

        ``pool_limit`` is the pool's size (plus reserve when that applies; 0 = unlimited).
        Returns True (admitted and counted), False (a limit refuses), None (lock busy).
        """
        seg = self.segment
        prow, drow, urow = pool.rows
        # Full is the common answer under saturation, and no lock is needed to see it: only
        # an admission (under the lock) raises the count.
        if pool_limit and seg.servers_total(prow) >= pool_limit:
            return False
        if not seg.try_lock():
            return None
        try:
            if pool_limit and seg.servers_total(prow) >= pool_limit:
                return False
            db_max, user_max = self._db_user_max(pool)
            if db_max and seg.servers_total(drow) >= db_max:
                return False
            if user_max and seg.servers_total(urow) >= user_max:
                return False
            for row in (prow, drow, urow):
                seg.cell_add(row, self.slot, "servers", 1)
            return True
        finally:
            seg.unlock()

    def _db_user_max(self, pool: Pool) -> tuple[int, int]:
        s = self.worker.settings
        db_max = pool.db.max_db_connections
        if db_max is None:
            db_max = s.max_db_connections
        user_cfg = self.worker.config.users.get(pool.user)
        user_max = user_cfg.max_user_connections if user_cfg is not None else None
        if user_max is None:
            user_max = s.max_user_connections
        return db_max, user_max

    def blocked_by_shared_limit(self, pool: Pool) -> str | None:
        """Which of max_db_connections / max_user_connections is full (no lock: a hint)."""
        db_max, user_max = self._db_user_max(pool)
        if db_max and self.segment.servers_total(pool.rows[1]) >= db_max:
            return "db"
        if user_max and self.segment.servers_total(pool.rows[2]) >= user_max:
            return "user"
        return None

    def server_closed(self, rows: tuple[int, int, int]) -> None:
        for row in rows:
            self.segment.cell_add(row, self.slot, "servers", -1)

    def handed_out(self, rows: tuple[int, int, int]) -> None:
        """A server left for another worker: counted as in flight until it arrives."""
        seg = self.segment
        for row in rows:
            seg.cell_add(row, self.slot, "sent", 1)
            seg.cell_add(row, self.slot, "servers", -1)

    def handed_in(self, dbname: str, user: str) -> tuple[int, int, int]:
        """A server arrived from another worker; returns its pool's rows."""
        rows = self.find_rows(dbname, user)
        if rows is None:  # the sender made them; only a corrupt segment lacks them
            raise RuntimeError("handed a server for an unknown pool %s/%s" % (dbname, user))
        seg = self.segment
        for row in rows:
            seg.cell_add(row, self.slot, "servers", 1)
            seg.cell_add(row, self.slot, "received", 1)
        return rows

    # ------------------------------------------------------------------ welcome

    def publish_welcome(self, pool: Pool, params: dict[str, str]) -> None:
        """Share a pool's server defaults once, so no worker waits for its own first login."""
        seg = self.segment
        if seg.get_welcome(pool.rows[0]) is not None:
            return
        while not seg.try_lock():
            gevent.sleep(0.0005)
        try:
            if seg.get_welcome(pool.rows[0]) is None:
                seg.set_welcome(pool.rows[0], msgspec.msgpack.encode(params))
        finally:
            seg.unlock()

    def shared_welcome(self, pool: Pool) -> dict[str, str] | None:
        data = self.segment.get_welcome(pool.rows[0])
        return None if data is None else msgspec.msgpack.decode(data, type=dict[str, str])

    # ------------------------------------------------------------------ clients

    def admit_client(self) -> bool | None:
        """max_client_conn for the whole service. True / False / None (lock busy)."""
        seg = self.segment
        if not seg.try_lock():
            return None
        try:
            if seg.total_clients() >= self.worker.settings.max_client_conn:
                return False
            self.clients += 1
            seg.write(self.slot, clients=self.clients)
            return True
        finally:
            seg.unlock()

    def client_moved_in(self) -> None:
        """A client from a draining worker: counted here too until that worker is gone (and
        its slot reset), so the total may read high for a moment, never low."""
        self.clients += 1
        self.segment.write(self.slot, clients=self.clients)

    def client_closed(self) -> None:
        self.clients -= 1
        self.segment.write(self.slot, clients=self.clients)


def _keys(dbname: str, user: str) -> tuple[bytes, bytes, bytes]:
    return (shm.row_key(shm.POOL, dbname, user), shm.row_key(shm.DATABASE, dbname),
            shm.row_key(shm.USER, user))
