"""Server-connection limits that span pools: max_db_connections and max_user_connections.

:class:`Limits` counts the server connections (open or opening) per database and per user and
answers whether a pool may open one more. When a limit is reached and another pool of the same
database (or user) has an idle server, that server is closed to make room, as PgBouncer does.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import Pool
    from .worker import Worker


class Limits:
    """Per-database and per-user server counts of this worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.per_db: collections.Counter[str] = collections.Counter()
        self.per_user: collections.Counter[str] = collections.Counter()

    def opened(self, pool: Pool) -> None:
        self.per_db[pool.dbname] += 1
        self.per_user[pool.user] += 1

    def closed(self, pool: Pool) -> None:
        self.per_db[pool.dbname] -= 1
        self.per_user[pool.user] -= 1

    def may_open(self, pool: Pool) -> bool:
        s = self.worker.settings
        db_max = pool.db.max_db_connections
        if db_max is None:
            db_max = s.max_db_connections
        user_cfg = self.worker.config.users.get(pool.user)
        user_max = getattr(user_cfg, "max_user_connections", None) if user_cfg else None
        if user_max is None:
            user_max = s.max_user_connections
        if db_max and self.per_db[pool.dbname] >= db_max:
            if not self._evict(pool, lambda p: p.dbname == pool.dbname):
                return False
        if user_max and self.per_user[pool.user] >= user_max:
            if not self._evict(pool, lambda p: p.user == pool.user):
                return False
        return True

    def _evict(self, pool: Pool, related) -> bool:
        for other in self.worker.pools.values():
            if other is not pool and related(other) and other.close_idle("evicted by connection limit"):
                return True
        return False
