"""What faults and hostile clients cost, pgherd and PgBouncer side by side (docs/reliability.md).

``make reliability`` (``python -m tests.reliability [--rounds N]``) starts a throwaway
PostgreSQL, then for each scenario pgherd (transaction mode) and, where the scenario applies
to it, the installed PgBouncer with the same settings, ``--rounds`` times each, and prints a
table of min–max figures (and JSON with ``--json``). Scenarios that need several processes
(a worker stopped or killed) run against pgherd only. Figures, not pass/fail: the suite holds
the assertions (tests/integration/test_reliability.py, test_faults.py, test_fuzz.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil
import psycopg
from psycopg.conninfo import make_conninfo

from tests import fuzzing, wire
from tests.helpers import Load, PgBouncer, PgCluster, Pgherd, wait_for

TX1 = {"pool_mode": "transaction", "default_pool_size": 1, "query_wait_timeout": 30}
TX = {"pool_mode": "transaction", "default_pool_size": 4, "query_wait_timeout": 30}


class Target:
    """One pooler under test: its address and the processes whose memory counts."""

    def __init__(self, name: str, host: str, port: int, pids: Callable[[], list[int]],
                 stop: Callable[[], object], workers: Callable[[], list[int]]) -> None:
        self.name, self.host, self.port = name, host, port
        self.pids, self.stop, self.workers = pids, stop, workers

    def dsn(self, dbname: str = "p0", user: str = "postgres", **kw: object) -> str:
        extra = "".join(" %s=%s" % kv for kv in kw.items())
        return "host=%s port=%d dbname=%s user=%s%s" % (self.host, self.port, dbname, user,
                                                         extra)

    def rss(self) -> int:
        return sum(psutil.Process(p).memory_info().rss for p in self.pids())


def start(kind: str, pg: PgCluster, settings: dict, workers: int = 2,
          userlist: str = "") -> Target:
    if kind == "pgherd":
        h = Pgherd(pg, Path(tempfile.mkdtemp(prefix="pgherd-rel-")), settings=settings,
                   workers=workers)
        h.start()
        return Target("pgherd", h.host, h.port, lambda: [h.pid] + h.worker_pids(), h.shutdown,
                      h.worker_pids)
    # Debian's PgBouncer is 1.18: no prepared statements in transaction mode (1.21+)
    b = PgBouncer(pg, {k: v for k, v in settings.items() if k != "max_prepared_statements"})
    if userlist:
        Path(b.workdir, "userlist.txt").write_text(userlist)
        b.admin_dsn = make_conninfo(b.admin_dsn, password="pgpw")  # the console asks too
    b.start()
    proc = psutil.Process(b.proc.pid)
    bouncer = [c.pid for c in proc.children(recursive=True)] or [proc.pid]
    return Target("pgbouncer", b.host, b.port, lambda: bouncer, b.stop, lambda: bouncer)


def _served_after(target: Target) -> float:
    t0 = time.monotonic()
    with psycopg.connect(target.dsn(), prepare_threshold=None, connect_timeout=60) as conn:
        conn.execute("SELECT 1")
    return time.monotonic() - t0


def _linked(pg: PgCluster, n: int = 1) -> None:
    wait_for(lambda: pg.backends("p0", "postgres") >= n, message="a server linked")


# --------------------------------------------------------------------------- scenarios


def left_mid_query(pg: PgCluster, t: Target) -> dict:
    """Pool of 1; a client sends a third of a 300 kB Query and vanishes: when is the next
    client served?"""
    query = wire.query("SELECT '" + "x" * 300_000 + "'")
    with wire.RawClient(t.host, t.port, timeout=10) as c:
        c.login("postgres", "p0")
        c.send(query[: len(query) // 3])
        _linked(pg)
        c.abort()
    return {"next client served after (s)": _served_after(t)}


def left_mid_sleep(pg: PgCluster, t: Target) -> dict:
    """Pool of 1; a client vanishes while its pg_sleep(30) runs."""
    with wire.RawClient(t.host, t.port, timeout=10) as c:
        c.login("postgres", "p0")
        c.send(wire.query("SELECT pg_sleep(30)"))
        wait_for(lambda: pg.sql("SELECT 1 FROM pg_stat_activity WHERE query = "
                                "'SELECT pg_sleep(30)'", dbname="postgres"))
        c.abort()
    served = _served_after(t)
    return {"next client served after (s)": served,
            "backends of the pool afterwards": pg.backends("p0", "postgres")}


def postgres_stopped(pg: PgCluster, t: Target) -> dict:
    """PostgreSQL stopped for 10 s: how long a new client waits for its error meanwhile, and
    when the first query succeeds once it is back."""
    _served_after(t)
    pg.stop_server()
    try:
        waits = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                _served_after(t)
            except psycopg.Error:
                pass
            waits.append(time.monotonic() - t0)
            time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
    finally:
        pg.start_server()
    t_up = time.monotonic()
    while True:
        try:
            _served_after(t)
            break
        except psycopg.Error:
            time.sleep(0.02)
    return {"client waits for its error while down (s, max)": max(waits),
            "first query after PostgreSQL is back (s)": time.monotonic() - t_up}


def postgres_restart(pg: PgCluster, t: Target) -> dict:
    """pg_ctl restart -m fast under 8 reconnecting clients."""
    with Load(t.dsn(), clients=8) as load:
        t0 = time.monotonic()
        pg.restart_server()
        t_up = time.monotonic()
        wait_for(lambda: load.all_served_after(t_up), timeout=120)
        back = time.monotonic() - t_up
    return {"failed transactions": len(load.failed(t0)),
            "every client served again after (s)": back}


def unauthenticated_stream(pg: PgCluster, t: Target) -> dict:
    """A client asks for a password exchange, announces a 2 GB message and streams into it."""
    before = t.rss()
    sent = 0
    with wire.RawClient(t.host, t.port, timeout=10) as c:
        c.send(wire.startup({"user": "u_scram", "database": "p0"}))
        c.read_message()
        c.send(b"p" + struct.pack("!I", 0x7FFF_FFF0))
        chunk = b"x" * 65536
        try:
            while sent < 200 << 20:
                c.sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        peak = t.rss()
    return {"bytes taken before hanging up (MB)": sent / 1e6,
            "pooler memory growth (MB)": (peak - before) / 1e6}


def stalled_logins(pg: PgCluster, t: Target) -> dict:
    """max_client_conn = 100 held by SCRAM exchanges that never finish (120 tried): does a
    client with the right password get in?"""
    stalled = []
    try:
        for _ in range(120):
            c = wire.RawClient(t.host, t.port, timeout=10)
            c.send(wire.startup({"user": "u_scram", "database": "p0"}))
            stalled.append(c)
        for c in stalled:
            try:
                c.read_message()
            except (OSError, wire.WireError):
                pass
        t0 = time.monotonic()
        try:
            with psycopg.connect(t.dsn(user="u_scram", password="scrampw"), connect_timeout=5,
                                 prepare_threshold=None) as conn:
                conn.execute("SELECT 1")
            got_in = "yes"
        except psycopg.Error as exc:
            got_in = "no: " + (exc.diag.message_primary or str(exc).strip().split(": ")[-1])
        return {"a legitimate client gets in": got_in, "after (s)": time.monotonic() - t0}
    finally:
        for c in stalled:
            c.close()


def fuzz(pg: PgCluster, t: Target) -> dict:
    """5,000 hostile cases (tests/fuzzing.py), 24 at a time."""
    pids, before = t.workers(), t.rss()
    out = asyncio.run(fuzzing.run_live(t.host, t.port, 7, 5000))
    alive = [p for p in pids if psutil.pid_exists(p)]
    return {"cases": out.cases, "processes that died": len(pids) - len(alive),
            "memory growth (%)": 100.0 * (t.rss() - before) / before}


def worker_stopped(pg: PgCluster, t: Target) -> dict:
    """SIGSTOP of one of 4 workers for 5 s under 16 reconnecting clients: throughput of the
    clients the other workers serve, during the stop against the 5 s before."""
    with Load(t.dsn(), clients=16) as load:
        time.sleep(5)
        victim = t.workers()[-1]
        t_stop = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        time.sleep(5)
        os.kill(victim, signal.SIGCONT)
        t_cont = time.monotonic()
        wait_for(lambda: load.all_served_after(t_cont), timeout=20)
    moving = [d for d in load.done_by if any(t_stop < x < t_cont for x in d)]
    before = sum(sum(1 for x in d if t_stop - 5 <= x < t_stop) for d in moving)
    during = sum(sum(1 for x in d if t_stop <= x < t_cont) for d in moving)
    return {"clients served during the stop": "%d of 16" % len(moving),
            "their throughput kept (%)": 100.0 * during / max(before, 1),
            "failed transactions": len(load.failed())}


def worker_killed(pg: PgCluster, t: Target) -> dict:
    """kill -9 of one of 4 workers under 16 reconnecting clients."""
    with Load(t.dsn(), clients=16) as load:
        victim = t.workers()[-1]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        t_k = time.monotonic()
        wait_for(lambda: load.all_served_after(t_k), timeout=20)
        back = time.monotonic() - t0
    return {"failed transactions": len(load.failed(t0)),
            "every client served again after (s)": back}


SCRAM_USERLIST = '"postgres" "pgpw"\n"u_scram" "scrampw"\n'
#: (scenario, settings, workers, also against PgBouncer)
SCENARIOS = [
    (left_mid_query, TX1, 2, True),
    (left_mid_sleep, TX1, 2, True),
    (postgres_stopped, {**TX, "server_login_retry": 15}, 2, True),
    (postgres_restart, TX, 2, True),
    (unauthenticated_stream, {"auth_type": "scram-sha-256"}, 2, True),
    (stalled_logins, {"auth_type": "scram-sha-256", "max_client_conn": 100,
                      "client_login_timeout": 60}, 2, True),
    (fuzz, fuzzing.SETTINGS, 2, True),
    (worker_stopped, TX, 4, False),
    (worker_killed, TX, 4, False),
]


def _clean_slate(pg: PgCluster) -> None:
    """No backend left over from the last round (PgBouncer leaves a cancelled-by-disconnect
    pg_sleep(30) running): each round counts only its own."""
    pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'p0'",
           dbname="postgres")
    wait_for(lambda: pg.backends("p0") == 0, message="p0's backends gone")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    results: dict[str, dict[str, dict[str, list]]] = {}
    pg = PgCluster().start()
    try:
        for scenario, settings, workers, bouncer_too in SCENARIOS:
            if only and scenario.__name__ not in only:
                continue
            kinds = ["pgherd", "pgbouncer"] if bouncer_too else ["pgherd"]
            for _ in range(args.rounds):
                for kind in kinds:  # alternating, on the same cluster
                    _clean_slate(pg)
                    t = start(kind, pg, settings, workers,
                              SCRAM_USERLIST if "auth_type" in settings else "")
                    try:
                        figures = scenario(pg, t)
                    finally:
                        t.stop()
                    row = results.setdefault(scenario.__name__, {}).setdefault(kind, {})
                    for k, v in figures.items():
                        row.setdefault(k, []).append(v)
                    print(scenario.__name__, kind, figures, flush=True)
    finally:
        pg.stop()
    print()
    print("| scenario | figure | pgherd | PgBouncer |")
    print("|---|---|---|---|")
    for name, by_kind in results.items():
        for figure in by_kind["pgherd"]:
            cells = [_span(by_kind[k].get(figure, [])) if k in by_kind else "n/a"
                     for k in ("pgherd", "pgbouncer")]
            print("| %s | %s | %s | %s |" % (name.replace("_", " "), figure, *cells))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _span(values: list) -> str:
    if not values:
        return "n/a"
    if all(isinstance(v, (int, float)) for v in values):
        lo, hi = min(values), max(values)
        fmt = "%.0f" if all(isinstance(v, int) for v in values) else "%.2f"
        return fmt % lo if lo == hi else (fmt + "–" + fmt) % (lo, hi)
    return " / ".join(sorted(set(map(str, values))))


if __name__ == "__main__":
    sys.exit(main())
