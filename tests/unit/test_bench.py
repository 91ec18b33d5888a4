"""``pgherd bench``: parsing pgbench's output and logs, percentiles, the table, option helpers;
and one short end-to-end run against a throwaway cluster.

The pgbench outputs below are real, captured from pgbench 15.18 (Debian) against PostgreSQL 15;
the pre-14 one is the sample printed in PostgreSQL 11's pgbench documentation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psutil
import pytest

from prefork import bench
from prefork.bench import (
    BenchOptions,
    Endpoint,
    RunResult,
    main,
    parse_dsn,
    parse_log_line,
    parse_pgbench_output,
    parse_targets,
    percentile,
    pg_bindir,
    pg_tool,
    pgbench_errors,
    ratio_lines,
    read_latencies,
    render_ini,
    render_table,
    userlist_line,
)

STEADY = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 2
query mode: simple
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 112913
number of failed transactions: 0 (0.000%)
latency average = 0.071 ms
initial connection time = 7.130 ms
tps = 56548.334495 (without initial connection time)
"""

CONNECT = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 2
query mode: simple
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 1 s
number of transactions actually processed: 445
number of failed transactions: 0 (0.000%)
latency average = 9.016 ms
average connection time = 4.432 ms
tps = 443.642454 (including reconnection times)
"""

# a REPEATABLE READ script updating one row from 4 clients: serialization failures
FAILURES = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: /tmp/benchscratch-isvo/ser.sql
scaling factor: 1
query mode: simple
number of clients: 4
number of threads: 1
maximum number of tries: 1
duration: 1 s
number of transactions actually processed: 4821
number of failed transactions: 7119 (59.623%)
latency average = 0.333 ms (including failures)
initial connection time = 8.288 ms
tps = 4847.891253 (without initial connection time)
"""

# pg_terminate_backend() on pgbench's connections mid-run: exit code 2, summary still printed
ABORTED_STDERR = """\
pgbench: error: client 0 script 0 aborted in command 1 query 0: FATAL:  terminating connection due to administrator command
pgbench: error: client 1 script 0 aborted in command 1 query 0: FATAL:  terminating connection due to administrator command
pgbench: error: Run was aborted; the above results are incomplete.
"""

# nothing listening: exit code 1, only the version line (or nothing) on stdout
NO_SERVER_STDOUT = ""
NO_SERVER_STDERR = """\
pgbench: error: connection to server at "127.0.0.1", port 1 failed: Connection refused
\tIs the server running on that host and accepting TCP/IP connections?
pgbench: error: could not create connection for setup
"""

# PostgreSQL <= 13 prints both figures (PostgreSQL 11 documentation sample)
PG11 = """\
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 10
query mode: simple
number of clients: 10
number of threads: 1
number of transactions per client: 1000
number of transactions actually processed: 10000/10000
tps = 85.184871 (including connections establishing)
tps = 85.296346 (excluding connections establishing)
"""

# two threads' -l logs (x.<pid> and x.<pid>.1), the second with serialization failures
LOG_THREAD0 = """\
0 1 879 0 1795310505 303565
0 2 704 0 1795310505 304283
1 1 1169 0 1795310505 304290
"""
LOG_THREAD1 = """\
2 1 failed 0 1795310900 564139
3 1 failed 0 1795310900 564225
2 2 208 0 1795310505 304116
"""


# --- pgbench summary -------------------------------------------------------------------------


def test_parse_steady_state_run() -> None:
    s = parse_pgbench_output(STEADY, connect=False)
    assert (s.transactions, s.failed, s.tps, s.latency_avg_ms, s.scaling_factor) == (
        112913, 0, 56548.334495, 0.071, 2)
    assert s.tps_includes_connections is False


def test_parse_connect_run_uses_the_figure_with_connections() -> None:
    s = parse_pgbench_output(CONNECT, connect=True)
    assert (s.transactions, s.failed, s.tps, s.latency_avg_ms) == (445, 0, 443.642454, 9.016)
    assert s.tps_includes_connections is True


def test_parse_failed_transactions() -> None:
    s = parse_pgbench_output(FAILURES, connect=False)
    assert (s.transactions, s.failed, s.latency_avg_ms) == (4821, 7119, 0.333)


def test_parse_old_pgbench_picks_by_mode() -> None:
    steady = parse_pgbench_output(PG11, connect=False)
    connect = parse_pgbench_output(PG11, connect=True)
    assert (steady.tps, steady.tps_includes_connections) == (85.296346, False)
    assert (connect.tps, connect.tps_includes_connections) == (85.184871, True)
    assert steady.transactions == 10000
    assert steady.failed == 0 and steady.latency_avg_ms is None


def test_parse_without_summary_raises() -> None:
    with pytest.raises(ValueError):
        parse_pgbench_output(NO_SERVER_STDOUT, connect=False)
    with pytest.raises(ValueError):
        parse_pgbench_output("pgbench (15.18 (Debian 15.18-0+deb12u1))\n", connect=False)


def test_pgbench_errors() -> None:
    assert pgbench_errors(ABORTED_STDERR) == [
        "client 0 script 0 aborted in command 1 query 0: FATAL:  terminating connection due to "
        "administrator command",
        "client 1 script 0 aborted in command 1 query 0: FATAL:  terminating connection due to "
        "administrator command",
        "Run was aborted; the above results are incomplete.",
    ]
    assert pgbench_errors(NO_SERVER_STDERR)[-1] == "could not create connection for setup"
    assert pgbench_errors("") == []


# --- latency logs and p99 --------------------------------------------------------------------


def test_parse_log_line() -> None:
    assert parse_log_line("0 1 879 0 1795310505 303565") == 879
    assert parse_log_line("2 1 failed 0 1795310900 564139") is None
    assert parse_log_line("0 7 skipped 0 1795310900 564139") is None
    assert parse_log_line("") is None


def test_read_latencies_from_every_thread_log(tmp_path: Path) -> None:
    (tmp_path / "x.8345").write_text(LOG_THREAD0)
    (tmp_path / "x.8345.1").write_text(LOG_THREAD1)
    assert sorted(read_latencies(sorted(tmp_path.iterdir()))) == [208, 704, 879, 1169]


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 0.99) == 99
    assert percentile(values, 0.5) == 50
    assert percentile(values, 1.0) == 100
    assert percentile(list(reversed(values)), 0.99) == 99  # order does not matter
    assert percentile([7], 0.99) == 7
    assert percentile([208, 704, 879, 1169], 0.99) == 1169
    assert percentile([], 0.99) is None


# --- table -----------------------------------------------------------------------------------


def run(target: str, tps: float | None, cpu: float | None, **kw) -> RunResult:
    fields = dict(target=target, workload="select-only", protocol="simple", clients=32, jobs=2,
                  duration=10, connect=False, exit_code=0, tps=tps, transactions=100, failed=0,
                  latency_avg_ms=0.895, latency_p99_ms=4.406, pooler_cpu_us_per_xact=cpu,
                  pooler_rss_mib=None if cpu is None else 84.0)
    fields.update(kw)
    return RunResult(**fields)


def test_render_table() -> None:
    runs = [
        run("direct", 35766.2, None),
        run("pgherd", 16150.4, 24.93),
        run("pgbouncer", 23026.0, 16.2, connect=True, failed=3, latency_p99_ms=None),
        run("pgherd", None, None, failed=None, latency_avg_ms=None, latency_p99_ms=None,
            error="pgbench exit code 1: could not create connection for setup", exit_code=1),
    ]
    assert render_table(runs).splitlines() == [
        "target          mode            protocol  clients    tps  lat avg ms  lat p99 ms  "
        "failed  pooler CPU µs/xact  pooler RSS MiB",
        "--------------  --------------  --------  -------  -----  ----------  ----------  "
        "------  ------------------  --------------",
        "direct          select-only     simple         32  35766       0.895       4.406  "
        "     0                   -               -",
        "pgherd          select-only     simple         32  16150       0.895       4.406  "
        "     0                24.9            84.0",
        "pgbouncer       select-only -C  simple         32  23026       0.895           -  "
        "     3                16.2            84.0",
        "pgherd (error)  select-only     simple         32      -           -           -  "
        "     -                   -               -",
    ]


def test_ratio_lines_need_both_poolers_per_mode() -> None:
    runs = [run("direct", 35766, None), run("pgherd", 16150, 24.9),
            run("pgbouncer", 23026, 16.2),
            run("pgherd", 3030, 256.1, connect=True)]  # no PgBouncer -C run to compare
    assert ratio_lines(runs) == [
        "pgherd/PgBouncer (select-only, simple): tps 0.70x, CPU/xact 1.54x"]
    assert ratio_lines(runs[:2]) == []
    split = [run("pgherd", 16150, 24.9), run("pgherd-split", 17000, 23.4)]
    assert ratio_lines(split) == [
        "pgherd/pgherd-split (select-only, simple): tps 0.95x, CPU/xact 1.06x"]


def test_run_ok() -> None:
    assert run("pgherd", 1.0, 1.0).ok
    assert not run("pgherd", 1.0, 1.0, failed=1).ok
    assert not run("pgherd", 1.0, 1.0, error="pgbench exit code 2: ...").ok


# --- option helpers --------------------------------------------------------------------------


def test_parse_targets() -> None:
    assert parse_targets("direct, pgherd,direct") == ("direct", "pgherd")
    assert parse_targets("pgherd,pgherd-split") == ("pgherd", "pgherd-split")
    with pytest.raises(ValueError, match="pgpool"):
        parse_targets("pgherd,pgpool")
    with pytest.raises(ValueError):
        parse_targets(" , ")


def test_parse_dsn() -> None:
    assert parse_dsn("postgresql://app:s%40cret@db.example:6543/shop?application_name=x") == (
        Endpoint(host="db.example", port=6543, user="app", dbname="shop"), "s@cret")
    assert parse_dsn("postgresql:///shop?host=/run/postgresql&user=app") == (
        Endpoint(host="/run/postgresql", port=5432, user="app", dbname="shop"), None)
    assert parse_dsn("host=10.0.0.5 port=5433 user=app password='it\\'s x' dbname=shop") == (
        Endpoint(host="10.0.0.5", port=5433, user="app", dbname="shop"), "it's x")
    assert parse_dsn("user = app") == (
        Endpoint(host="127.0.0.1", port=5432, user="app", dbname="app"), None)
    assert parse_dsn("")[0] == Endpoint(host="127.0.0.1", port=5432, user="postgres",
                                       dbname="postgres")


def test_render_ini_and_userlist() -> None:
    db = Endpoint(host="/run/my sockets", port=5432, user="app", dbname="my-db")
    text = render_ini(db, {"listen_port": 6432, "workers": 2})
    assert text == ("[databases]\n"
                    "\"my-db\" = host='/run/my sockets' port=5432 dbname=my-db\n"
                    "\n[pgbouncer]\nlisten_port = 6432\nworkers = 2\n")
    assert userlist_line('a"b', "") == '"a""b" ""\n'


# --- end to end ------------------------------------------------------------------------------


def _can_run_throwaway() -> bool:
    bindir = pg_bindir()
    return bindir is not None and pg_tool("pgbench", bindir) is not None and pg_tool(
        "psql", bindir) is not None


@pytest.mark.skipif(not _can_run_throwaway(), reason="PostgreSQL (initdb, pgbench) not found")
def test_bench_throwaway_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """3 s of select-only per target against a throwaway cluster: every target runs without
    error, the JSON has the numbers, and nothing is left behind (processes, /tmp dirs)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    prefix = f"pgherd-bench-test{os.getpid()}-"  # tell our scratch dir from other benches'
    monkeypatch.setattr(bench, "SCRATCH_PREFIX", prefix)
    out = tmp_path / "bench.json"
    pgbouncer = ["pgbouncer"] if shutil.which("pgbouncer") or os.access(
        "/usr/sbin/pgbouncer", os.X_OK) else []
    expected = ["direct", "pgherd"] + pgbouncer + ["pgherd-split"]
    options = BenchOptions(workloads=("select-only",), clients=4, jobs=1, duration=3, scale=1,
                           targets=tuple(expected), json_path=str(out))
    code = main(options, throwaway=True)
    printed = capsys.readouterr()
    assert code == 0, printed.err

    report = json.loads(out.read_text())
    assert report["targets"] == expected
    assert [r["target"] for r in report["runs"]] == expected
    for r in report["runs"]:
        assert r["error"] is None and r["failed"] == 0 and r["transactions"] > 0
        assert r["tps"] > 0 and r["latency_p99_ms"] > 0
        if r["target"] != "direct":
            assert r["pooler_cpu_us_per_xact"] > 0 and r["pooler_rss_mib"] > 0
    assert report["versions"]["postgresql"] and report["machine"]["cpu_count"]
    assert printed.out.splitlines()[0].startswith("target ")

    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert not list(Path("/tmp").glob(prefix + "*"))
