"""What ``pgherd top`` works out from admin-console rows (prefork/topview.py): rates between
two polls, PgBouncer's older columns, sorting, filtering, totals."""

from __future__ import annotations

from decimal import Decimal

import pytest

from prefork.topview import SORTS, Sample, compute, matches


def pool(db: str, user: str = "app", **values) -> dict:
    row = {"database": db, "user": user, "cl_active": 0, "cl_waiting": 0, "sv_active": 0,
           "sv_idle": 0, "sv_used": 0, "maxwait": 0, "maxwait_us": 0}
    row.update(values)
    return row


def stats(db: str, **values) -> dict:
    """A SHOW STATS row as pgherd sends it (numeric columns arrive as Decimal)."""
    row = {"database": db, "total_xact_count": 0, "total_query_count": 0,
           "total_query_time": 0, "total_wait_time": 0, "total_server_assignment_count": 0}
    row.update(values)
    return {k: Decimal(v) if k != "database" else v for k, v in row.items()}


def worker(slot: int, **values) -> dict:
    row = {"slot": slot, "pid": 100 + slot, "state": "ready", "clients": 0, "servers": 0,
           "rss": 50 << 20, "cpu_percent": Decimal("1.5"), "servers_sent": 0,
           "servers_received": 0, "waiting": 0, "cpu_seconds": Decimal("10")}
    row.update(values)
    return row


def test_rates_are_per_second_and_averages_per_event() -> None:
    old = Sample(10.0, [pool("a")], [stats("a", total_xact_count=100, total_query_count=300,
                                             total_query_time=9000, total_wait_time=0,
                                             total_server_assignment_count=100)], None)
    new = Sample(12.0, [pool("a", cl_active=4, cl_waiting=2, sv_active=3, sv_idle=1, sv_used=1,
                             maxwait=1, maxwait_us=500_000)],
                 [stats("a", total_xact_count=700, total_query_count=1500,
                        total_query_time=9000 + 1200 * 250, total_wait_time=600 * 40,
                        total_server_assignment_count=700)], None)
    view = compute(new, old)
    (p,) = view.pools
    assert (p.cl_active, p.cl_waiting, p.sv_active, p.sv_idle) == (4, 2, 3, 2)  # idle + used
    assert p.maxwait == 1.5
    assert p.tps == 300 and p.qps == 600
    assert p.query_ms == 0.25 and p.wait_ms == 0.04
    assert view.interval == 2.0
    assert view.workers is None  # PgBouncer: no SHOW WORKERS


def test_first_poll_has_counts_but_no_rates() -> None:
    view = compute(Sample(1.0, [pool("a", cl_active=3)], [stats("a", total_xact_count=5)],
                          None), None)
    assert view.pools[0].cl_active == 3
    assert view.pools[0].tps is None and view.totals.tps is None and view.interval is None


def test_pgbouncer_118_waits_per_transaction_and_a_reset_gives_no_rate() -> None:
    # 1.18's SHOW STATS has no total_server_assignment_count: wait per transaction instead
    def old_stats(**v):
        row = stats("a", **v)
        del row["total_server_assignment_count"]
        return row

    old = Sample(0.0, [pool("a")], [old_stats(total_xact_count=10, total_wait_time=0)], None)
    new = Sample(1.0, [pool("a")], [old_stats(total_xact_count=20, total_wait_time=5000)], None)
    assert compute(new, old).pools[0].wait_ms == 0.5
    restarted = Sample(2.0, [pool("a")], [old_stats(total_xact_count=3)], None)
    p = compute(restarted, new).pools[0]
    assert p.tps is None and p.wait_ms is None


def test_a_pool_shows_its_databases_rates_and_totals_count_each_database_once() -> None:
    old = Sample(0.0, [pool("a", "u1"), pool("a", "u2"), pool("b")],
                 [stats("a"), stats("b")], None)
    new = Sample(1.0, [pool("a", "u1", cl_active=1), pool("a", "u2", cl_active=2),
                       pool("b", cl_waiting=5, maxwait=3)],
                 [stats("a", total_xact_count=100, total_query_count=100,
                        total_query_time=100_000),
                  stats("b", total_xact_count=10, total_query_count=10,
                        total_query_time=100_000)], None)
    view = compute(new, old)
    assert [p.tps for p in view.pools if p.database == "a"] == [100, 100]
    t = view.totals
    assert (t.pools, t.cl_active, t.cl_waiting, t.maxwait) == (3, 3, 5, 3)
    assert t.tps == 110
    assert t.query_ms == pytest.approx(200_000 / 110 / 1000)  # weighted by query count
    only_a = compute(new, old, pattern="a")
    assert only_a.totals.tps == 100 and only_a.totals.pools == 2


def test_sorts_put_what_matters_first() -> None:
    old = Sample(0.0, [], [stats("busy"), stats("queue"), stats("idle")], None)
    new = Sample(1.0, [pool("idle"), pool("busy", cl_active=9, sv_active=4),
                       pool("queue", cl_active=1, cl_waiting=3, maxwait=2)],
                 [stats("busy", total_xact_count=500, total_query_count=500,
                        total_query_time=500),
                  stats("queue", total_xact_count=5, total_query_count=5,
                        total_query_time=50_000),
                  stats("idle")], None)

    def order(sort: str) -> list[str]:
        return [p.database for p in compute(new, old, sort).pools]

    assert order("waiting") == ["queue", "busy", "idle"]
    assert order("tps") == ["busy", "queue", "idle"]
    assert order("clients") == ["busy", "queue", "idle"]
    assert order("servers") == ["busy", "idle", "queue"]
    assert order("query") == ["queue", "busy", "idle"]
    assert order("name") == ["busy", "idle", "queue"]
    assert set(SORTS) == {"waiting", "tps", "clients", "servers", "query", "name"}


def test_workers_cpu_over_the_interval_and_hand_overs_per_second() -> None:
    old = Sample(0.0, [], [], [worker(0, cpu_seconds=Decimal("10.0"), servers_sent=5),
                               worker(1, cpu_seconds=Decimal("3.0"))])
    new = Sample(2.0, [], [], [worker(0, cpu_seconds=Decimal("11.0"), servers_sent=9,
                                      waiting=0, clients=3),
                               worker(1, cpu_seconds=Decimal("3.5"), waiting=4, clients=1)])
    view = compute(new, old)
    by_slot = {w.slot: w for w in view.workers}
    assert by_slot[0].cpu == 50.0 and by_slot[1].cpu == 25.0
    assert by_slot[0].sent_rate == 2.0 and by_slot[0].sent == 9
    assert [w.slot for w in view.workers] == [1, 0]  # waiting most first
    assert [w.slot for w in compute(new, old, "clients").workers] == [0, 1]
    # a respawned worker (new pid) starts without a rate; the first poll shows the
    # since-start average an older pgherd reports
    again = Sample(3.0, [], [], [worker(0, pid=999, cpu_seconds=Decimal("0.1"))])
    assert compute(again, new).workers[0].cpu == 1.5


def test_filter_is_a_part_of_the_name_or_a_pattern() -> None:
    assert matches("app_prod", "")
    assert matches("app_prod", "prod") and not matches("app_prod", "test")
    assert matches("app_prod", "app_*") and not matches("web_app", "app_*")
    assert matches("p1", "p?") and not matches("p10", "p?")
