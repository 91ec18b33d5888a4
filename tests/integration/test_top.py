"""``pgherd top`` as an operator meets it: in a terminal (tmux) against a live pooler under
pgbench, with a pool whose clients queue — pgherd, and the Debian PgBouncer's console.

What is read is the screen (``tmux capture-pane``), what is done is typing keys. The last
screen is left in the test's artifacts directory (as text, with colours, and as SVG).
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from tests.helpers import Bench, WaitingClients, free_port, make_dsn, wait_for

PGHERD = [str(Path(sys.executable).with_name("pgherd"))]
BENCH_CLIENTS = 4
POOL_COLUMNS = ("database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle",
                "maxwait", "tps", "qps", "query", "wait")


def _heading(line: str) -> list[str]:
    return [cell for cell in line.split() if cell != "▼"]  # the sorted column's mark


def pools(screen: str) -> list[dict]:
    """The pool rows on the screen, top to bottom (the totals row left out)."""
    lines = screen.splitlines()
    heads = [i for i, line in enumerate(lines) if _heading(line)[:2] == ["database", "user"]]
    if not heads:
        return []
    rows = []
    for line in lines[heads[0] + 1:]:
        cells = line.split()
        if not cells or cells[0] == "total":
            break
        if len(cells) == len(POOL_COLUMNS):
            rows.append(dict(zip(POOL_COLUMNS, cells)))
    return rows


def workers(screen: str) -> list[dict]:
    lines = screen.splitlines()
    heads = [i for i, line in enumerate(lines) if _heading(line)[:2] == ["slot", "pid"]]
    rows = []
    for line in lines[heads[0] + 1:] if heads else []:
        cells = line.split()
        if not cells or cells[0] == "total":
            break
        rows.append({"slot": int(cells[0]), "pid": int(cells[1]), "clients": int(cells[3])})
    return rows


def number(text: str) -> float:
    return float(text.rstrip("s").replace(",", "")) if text != "–" else -1.0


def by_db(screen: str) -> dict[str, dict]:
    return {r["database"]: r for r in pools(screen)}


def order(screen: str) -> list[str]:
    """The pools in the order shown, but for the console's own (as in SHOW POOLS)."""
    return [r["database"] for r in pools(screen) if r["database"] != "pgbouncer"]


def assert_steady(tmux, seconds: float) -> str:
    """The screen does not change for ``seconds`` (more than two refreshes)."""
    first = tmux.screen()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = tmux.screen()
        assert now == first, "the screen changed while paused:\n%s\n---\n%s" % (first, now)
        time.sleep(0.2)  # an observation window, not a synchronisation
    return first


def keep_screen(tmux, artifacts: Path, name: str) -> None:
    """The screen as text, with its colours (ANSI), and drawn as SVG."""
    ansi = tmux.screen_ansi()
    (artifacts / (name + ".txt")).write_text(tmux.screen())
    (artifacts / (name + ".ansi")).write_text(ansi)
    console = Console(record=True, width=tmux.width, file=io.StringIO(), color_system="256")
    console.print(Text.from_ansi(ansi), end="")
    console.save_svg(str(artifacts / (name + ".svg")), title="pgherd top")


def test_top_follows_pgherd_under_pgbench(pgherd, pg, pgbench_db, tmux, artifacts):
    h = pgherd(settings={"pool_mode": "transaction"},
               databases={**pgherd.default_databases, "p1": {"dbname": "p1", "pool_size": 2},
                          pgbench_db: {"dbname": pgbench_db, "pool_size": BENCH_CLIENTS}})
    with Bench(pg, h, "-S", "-c", str(BENCH_CLIENTS), "-j", "1", "-R", "300", "-T", "120",
               dbname=pgbench_db) as bench, WaitingClients(h.dsn("p1"), 2, 3):
        wait_for(lambda: any(r["database"] == "p1" and r["cl_waiting"] == 3
                             for r in h.admin_dicts("SHOW POOLS")), message="3 waiting in p1")
        tmux.start(PGHERD + ["top", str(h.ini_path)])
        screen = tmux.wait_screen(
            lambda s: number(by_db(s).get(pgbench_db, {}).get("tps", "–")) > 0,
            message="both pools, with transactions per second for %s" % pgbench_db)
        assert "pgherd" in screen.splitlines()[0] and "sort: waiting" in screen
        rows = by_db(screen)
        assert order(screen) == ["p1", pgbench_db]  # waiting most first
        p1 = rows["p1"]
        assert (p1["cl_active"], p1["cl_waiting"], p1["sv_active"], p1["tps"]) == \
            ("2", "3", "2", "0")
        busy = rows[pgbench_db]
        assert int(busy["cl_active"]) + int(busy["cl_waiting"]) == BENCH_CLIENTS
        # numbers move: the queued clients' wait grows from one refresh to the next
        waited = number(p1["maxwait"])
        tmux.wait_screen(lambda s: number(by_db(s)["p1"]["maxwait"]) >= waited + 1,
                         message="p1's maxwait to grow past %.1fs" % (waited + 1))
        shown_workers = workers(tmux.screen())
        assert sorted(w["pid"] for w in shown_workers) == sorted(h.worker_pids())
        assert sum(w["clients"] for w in shown_workers) >= BENCH_CLIENTS + 5
        keep_screen(tmux, artifacts, "top")

        # keys: sort by tps, back to waiting, filter, pause
        tmux.send("t")
        tmux.wait_screen(lambda s: "sort: tps" in s and order(s) == [pgbench_db, "p1"],
                         message="sorted by tps")
        tmux.send("w")
        tmux.wait_screen(lambda s: "sort: waiting" in s and order(s) == ["p1", pgbench_db],
                         message="sorted by waiting")
        filter_box = "Enter applies, empty shows all"
        tmux.send("f")
        tmux.wait_screen(lambda s: filter_box in s, message="the filter box")
        tmux.send("-l", pgbench_db[:3])  # a part of the name
        tmux.send("Enter")
        tmux.wait_screen(lambda s: order(s) == [pgbench_db] and "filter: " + pgbench_db[:3] in s,
                         message="only %s" % pgbench_db)
        tmux.send("f")
        tmux.wait_screen(lambda s: filter_box in s, message="the filter box")
        tmux.send("Enter")  # empty: every database again
        tmux.wait_screen(lambda s: order(s) == ["p1", pgbench_db], message="both pools again")
        tmux.send("p")
        tmux.wait_screen(lambda s: "PAUSED" in s, message="PAUSED")
        paused = assert_steady(tmux, 2.5)
        tmux.send("p")
        tmux.wait_screen(lambda s: "PAUSED" not in s and s != paused, message="resumed")
        assert bench.running(), bench.finish().out
        tmux.send("q")
        wait_for(tmux.dead, message="pgherd top to exit on q")


def test_top_reads_pgbouncers_console(pg, pgbouncer, pgbench_db, tmux, artifacts):
    b = pgbouncer({"pool_mode": "transaction", "default_pool_size": 2})
    with Bench(pg, b, "-S", "-c", str(BENCH_CLIENTS), "-j", "1", "-R", "300", "-T", "120",
               dbname=pgbench_db) as bench, \
            WaitingClients(make_dsn(b.host, b.port, "p1", "postgres"), 2, 2):
        wait_for(lambda: any(r["database"] == "p1" and r["cl_waiting"] == 2
                             for r in b.admin_dicts("SHOW POOLS")), message="2 waiting in p1")
        tmux.start(PGHERD + ["top", "--dsn", b.admin_dsn])
        screen = tmux.wait_screen(
            lambda s: number(by_db(s).get(pgbench_db, {}).get("tps", "–")) > 0,
            message="both pools, with transactions per second for %s" % pgbench_db)
        assert "PgBouncer 1." in screen.splitlines()[0]
        assert "SHOW WORKERS is pgherd's" in screen
        rows = by_db(screen)
        assert (rows["p1"]["cl_active"], rows["p1"]["cl_waiting"], rows["p1"]["sv_active"]) == \
            ("2", "2", "2")
        busy = rows[pgbench_db]
        assert int(busy["cl_active"]) + int(busy["cl_waiting"]) == BENCH_CLIENTS
        keep_screen(tmux, artifacts, "top-pgbouncer")
        tmux.send("n")
        tmux.wait_screen(lambda s: "sort: name" in s and order(s) == sorted(order(s))
                         and len(order(s)) >= 2, message="sorted by name")
        tmux.send("t")
        tmux.wait_screen(lambda s: order(s)[:1] == [pgbench_db], message="sorted by tps")
        assert bench.running(), bench.finish().out
        tmux.send("q")
        wait_for(tmux.dead, message="pgherd top to exit on q")


def test_top_says_what_is_wrong_before_taking_the_screen():
    usage = subprocess.run(PGHERD + ["top"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "give CONFIG or --dsn" in usage.stderr
    nobody = subprocess.run(PGHERD + ["top", "--dsn", "host=127.0.0.1 port=%d" % free_port()],
                            capture_output=True, text=True, timeout=30)
    assert nobody.returncode == 1
    assert "cannot reach the admin console" in nobody.stderr and "refused" in nobody.stderr


def test_top_rides_out_a_restart_of_the_pooler(pgherd, tmux):
    first = pgherd(workers=1)
    tmux.start(PGHERD + ["top", "--dsn", first.dsn("pgbouncer")])
    tmux.wait_screen(lambda s: [w["pid"] for w in workers(s)] == first.worker_pids(),
                     message="the worker of the first pgherd")
    first.stop(signal.SIGINT)  # as systemctl stop: SIGTERM would wait for top to leave
    tmux.wait_screen(lambda s: "(retrying)" in s, message="the lost console, said")
    second = pgherd(workers=2, settings={"listen_port": first.port})
    screen = tmux.wait_screen(
        lambda s: sorted(w["pid"] for w in workers(s)) == sorted(second.worker_pids()),
        message="the workers of the second pgherd")
    assert "(retrying)" not in screen
