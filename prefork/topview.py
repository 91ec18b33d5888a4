"""What ``pgherd top`` shows, worked out from the admin console: samples, rates, sort, filter.

A :class:`Sample` is one poll of an admin console — ``SHOW POOLS``, ``SHOW STATS`` and, on
pgherd, ``SHOW WORKERS`` — as rows keyed by column name, so it reads pgherd and every
PgBouncer version alike (columns are looked up by name; a column a version lacks is simply
absent). :func:`compute` turns two consecutive samples into a :class:`View`: per pool its
clients and servers, per database its rates (PgBouncer's ``SHOW STATS`` is per database, so a
pool shows its database's rates), per worker its CPU over the interval and its hand-overs,
and totals. Everything here is pure: the terminal UI (``top.py``) polls and draws.

Rates: transactions and queries per second; average query time per query and average wait
per server assignment over the interval (PgBouncer before 1.21 has no
``total_server_assignment_count``: per transaction there). A counter that went backwards (a
restart) gives no rate rather than a negative one.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

Row = dict[str, Any]

#: Sort orders. Pools waiting most come first by default; workers sort by what applies to
#: them (waiting, clients, servers, slot), else by CPU.
SORTS = ("waiting", "tps", "clients", "servers", "query", "name")


@dataclass(frozen=True)
class Sample:
    """One poll of an admin console; ``at`` is a monotonic time in seconds."""

    at: float
    pools: list[Row]
    stats: list[Row]
    workers: list[Row] | None  # None where SHOW WORKERS does not exist (PgBouncer)


@dataclass
class PoolLine:
    database: str
    user: str
    cl_active: int
    cl_waiting: int
    sv_active: int
    sv_idle: int  # idle and ready, or idle awaiting a check (sv_idle + sv_used)
    maxwait: float  # seconds the oldest waiting client has waited
    tps: float | None  # of the pool's database, per second
    qps: float | None
    query_ms: float | None  # average query time of the database over the interval
    wait_ms: float | None  # average wait per server assignment (or transaction)


@dataclass
class WorkerLine:
    slot: int
    pid: int | None
    state: str
    clients: int
    servers: int
    waiting: int | None
    cpu: float | None  # percent of one core over the interval (or since start)
    rss: int | None
    sent: int
    received: int
    sent_rate: float | None  # servers handed to other workers per second
    received_rate: float | None


@dataclass
class Totals:
    pools: int = 0
    cl_active: int = 0
    cl_waiting: int = 0
    sv_active: int = 0
    sv_idle: int = 0
    maxwait: float = 0.0
    tps: float | None = None
    qps: float | None = None
    query_ms: float | None = None
    wait_ms: float | None = None


@dataclass
class View:
    pools: list[PoolLine]  # filtered and sorted
    workers: list[WorkerLine] | None  # sorted; None on PgBouncer
    totals: Totals  # of the pools shown
    interval: float | None  # seconds between the two samples, None for the first


def _int(row: Row, name: str) -> int:
    value = row.get(name)
    return int(value) if value is not None else 0


def _num(row: Row, name: str) -> float | None:
    value = row.get(name)
    return float(value) if value is not None else None


class _Delta:
    """Differences of the counters of one row between two samples."""

    def __init__(self, new: Row, old: Row | None, seconds: float) -> None:
        self.new, self.old, self.seconds = new, old, seconds

    def __call__(self, name: str) -> int | None:
        if self.old is None or self.seconds <= 0 or name not in self.new:
            return None
        d = _int(self.new, name) - _int(self.old, name)
        return d if d >= 0 else None

    def rate(self, name: str) -> float | None:
        d = self(name)
        return None if d is None else d / self.seconds

    def per(self, name: str, *counts: str) -> float | None:
        """Average ``name`` (microseconds) per event of the first count present, in ms."""
        d = self(name)
        for count in counts:
            if count in self.new:
                n = self(count)
                if d is None or n is None:
                    return None
                return d / n / 1000 if n else 0.0
        return None


def _rates(d: _Delta) -> tuple[float | None, ...]:
    return (d.rate("total_xact_count"), d.rate("total_query_count"),
            d.per("total_query_time", "total_query_count"),
            d.per("total_wait_time", "total_server_assignment_count", "total_xact_count"))


def _maxwait(row: Row) -> float:
    return _int(row, "maxwait") + _int(row, "maxwait_us") / 1e6


def compute(new: Sample, old: Sample | None, sort: str = "waiting", pattern: str = "") -> View:
    """The view of ``new`` with rates since ``old`` (none when ``old`` is None): pools of the
    databases matching ``pattern``, both tables sorted by ``sort`` (one of :data:`SORTS`)."""
    pools, workers = _lines(new, old)
    pools = sorted((p for p in pools if matches(p.database, pattern)), key=_POOL_ORDER[sort])
    if workers is not None:
        workers.sort(key=_WORKER_ORDER.get(sort, lambda w: (_desc(w.cpu), w.slot)))
    return View(pools, workers, totals(pools, new, old),
                new.at - old.at if old is not None else None)


def _lines(new: Sample, old: Sample | None) -> tuple[list[PoolLine], list[WorkerLine] | None]:
    seconds = new.at - old.at if old is not None else 0.0
    old_stats = {r["database"]: r for r in old.stats} if old is not None else {}
    by_db = {}
    for row in new.stats:
        by_db[row["database"]] = _rates(_Delta(row, old_stats.get(row["database"]), seconds))
    pools = []
    for row in new.pools:
        tps, qps, query_ms, wait_ms = by_db.get(row["database"], (None,) * 4)
        pools.append(PoolLine(
            row["database"], row["user"], _int(row, "cl_active"), _int(row, "cl_waiting"),
            _int(row, "sv_active"), _int(row, "sv_idle") + _int(row, "sv_used"),
            _maxwait(row), tps, qps, query_ms, wait_ms))
    workers = None
    if new.workers is not None:
        old_workers = {r.get("pid"): r for r in old.workers or []} if old is not None else {}
        workers = []
        for row in new.workers:
            d = _Delta(row, old_workers.get(row.get("pid")) if row.get("pid") else None,
                       seconds)
            cpu = None
            if "cpu_seconds" in row and d.old is not None and seconds > 0:
                spent = (_num(row, "cpu_seconds") or 0.0) - (_num(d.old, "cpu_seconds") or 0.0)
                cpu = max(0.0, 100 * spent / seconds)
            if cpu is None:
                cpu = _num(row, "cpu_percent")  # since start: all an older pgherd tells
            workers.append(WorkerLine(
                _int(row, "slot"), row.get("pid"), row.get("state") or "?",
                _int(row, "clients"), _int(row, "servers"),
                _int(row, "waiting") if "waiting" in row else None, cpu,
                row.get("rss"), _int(row, "servers_sent"), _int(row, "servers_received"),
                d.rate("servers_sent"), d.rate("servers_received")))
    return pools, workers


def totals(pools: list[PoolLine], new: Sample, old: Sample | None) -> Totals:
    """Totals of the pools shown: counts summed, the longest wait, and the rates of their
    databases together (averages weighted by their own counts)."""
    t = Totals(pools=len(pools))
    for p in pools:
        t.cl_active += p.cl_active
        t.cl_waiting += p.cl_waiting
        t.sv_active += p.sv_active
        t.sv_idle += p.sv_idle
        t.maxwait = max(t.maxwait, p.maxwait)
    if old is None:
        return t
    shown = {p.database for p in pools}
    names = {"total_xact_count", "total_query_count", "total_query_time", "total_wait_time",
             "total_server_assignment_count"}

    def summed(sample: Sample) -> Row:
        acc: Row = {}
        for row in sample.stats:
            if row["database"] in shown:
                for name in names & row.keys():
                    acc[name] = acc.get(name, 0) + _int(row, name)
        return acc

    t.tps, t.qps, t.query_ms, t.wait_ms = _rates(_Delta(summed(new), summed(old),
                                                        new.at - old.at))
    return t


def matches(database: str, pattern: str) -> bool:
    """The filter: a shell pattern (``app_*``) or, without wildcards, a part of the name."""
    if not pattern:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(database, pattern)
    return pattern in database


def _desc(value: float | None) -> float:
    return -(value if value is not None else -1.0)


_POOL_ORDER: dict[str, Callable[[PoolLine], tuple]] = {
    "waiting": lambda p: (-p.cl_waiting, -p.maxwait, p.database, p.user),
    "tps": lambda p: (_desc(p.tps), p.database, p.user),
    "clients": lambda p: (-(p.cl_active + p.cl_waiting), p.database, p.user),
    "servers": lambda p: (-(p.sv_active + p.sv_idle), p.database, p.user),
    "query": lambda p: (_desc(p.query_ms), p.database, p.user),
    "name": lambda p: (p.database, p.user),
}
_WORKER_ORDER: dict[str, Callable[[WorkerLine], tuple]] = {
    "waiting": lambda w: (-(w.waiting or 0), _desc(w.cpu), w.slot),
    "clients": lambda w: (-w.clients, w.slot),
    "servers": lambda w: (-w.servers, w.slot),
    "name": lambda w: (w.slot,),
}

