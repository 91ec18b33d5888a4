"""PgBouncer's periodic stats log line, for the whole service (``log_stats``, ``stats_period``).

Once per ``stats_period`` the master logs::

    stats: 12 xacts/s, 30 queries/s, 0 client parses/s, 0 server parses/s, 0 binds/s,
    in 2345 B/s, out 67890 B/s, xact 812 us, query 301 us, wait 15 us

(one line), computed as PgBouncer's ``refresh_stats``/``calc_average`` do (``src/stats.c``,
1.21+ text; 1.18 had no parse/bind fields): the totals of every pool of the service at the end
of the period minus those at its start; rates are per second of the real elapsed time (integer
division); ``xact``/``query`` are the average time per transaction/query and ``wait`` the
average wait per server assignment in the period, in microseconds.

The master computes it (it already reads shared memory every loop and must stay free of
gevent); it sees what workers publish (every 0.25 s), which is exact enough for a 60 s average.
Totals include dead workers' shares (the ghost counters), so a worker restart never makes a
counter go backwards; a negative delta (which should not happen) counts as 0.

Deliberate difference from PgBouncer: ``stats_period`` changed by a reload takes effect
after the period in progress (PgBouncer reads it only at start). ``log_stats`` toggles at
once, as there.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from ipc import shm

log = logging.getLogger("pgherd")

USEC = 1_000_000

FORMAT = ("stats: %d xacts/s, %d queries/s, %d client parses/s, %d server parses/s, "
          "%d binds/s, in %d B/s, out %d B/s, xact %d us, query %d us, wait %d us")


def service_totals(segment: shm.Segment) -> dict[str, int]:
    """The stats counters (``shm.STAT_FIELDS``) summed over every pool of the service."""
    totals = dict.fromkeys(shm.STAT_FIELDS, 0)
    for row in segment.snapshot_rows():
        if row.kind == shm.POOL:
            for name in shm.STAT_FIELDS:
                totals[name] += row.totals[name]
    return totals


def stats_line(old: Mapping[str, int], new: Mapping[str, int], seconds: float) -> str:
    """PgBouncer's stats line for the period of ``seconds`` between two totals snapshots."""
    dur = int(seconds * USEC)

    def delta(name: str) -> int:
        return max(0, new.get(name, 0) - old.get(name, 0))

    def rate(name: str) -> int:
        return USEC * delta(name) // dur if dur > 0 else 0

    def per(name: str, count: str) -> int:
        n = delta(count)
        return delta(name) // n if n > 0 else 0

    return FORMAT % (
        rate("xact_count"), rate("query_count"), rate("client_parse_count"),
        rate("server_parse_count"), rate("bind_count"), rate("recv_bytes"),
        rate("sent_bytes"), per("xact_time", "xact_count"), per("query_time", "query_count"),
        per("wait_time", "server_assignment_count"))


class StatsLogger:
    """Called by the master on every loop tick; logs the line when a period has elapsed."""

    def __init__(self, segment: shm.Segment, settings: Any, now: float | None = None) -> None:
        self.segment = segment
        self.settings = settings
        start = time.monotonic() if now is None else now
        self.last_at = start
        self.last = service_totals(segment)
        self.next_at = start + self._period()

    def _period(self) -> float:
        return max(1, int(self.settings.stats_period))

    def tick(self, now: float, settings: Any = None) -> str | None:
        """Log (and return) the stats line if a period has elapsed at ``now`` (monotonic s).

        ``settings``: the configuration now in force (after a reload), if it may have changed.
        """
        if settings is not None:
            self.settings = settings
        if now < self.next_at:
            return None
        totals = service_totals(self.segment)
        line = stats_line(self.last, totals, now - self.last_at)
        self.last, self.last_at = totals, now
        period = self._period()
        self.next_at += period
        if self.next_at <= now:  # fell behind (or the period changed): start afresh
            self.next_at = now + period
        if not self.settings.log_stats:
            return None
        log.info("%s", line)
        return line
