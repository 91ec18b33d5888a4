"""pgbench through pgherd in transaction mode with 2 workers: select-only and the default
TPC-B-like script, simple and extended query protocol; zero failed transactions.

The pgbench tables live in a database of their own, created (and initialised directly on
PostgreSQL) once per xdist worker that runs these tests, and dropped afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest

CLIENTS, THREADS, SECONDS = 8, 2, 3


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


@pytest.fixture(scope="module")
def bench_db(pg):
    name = "bench_" + uuid.uuid4().hex[:8]
    pg.sql(f"CREATE DATABASE {name}", dbname="postgres")
    try:
        proc = subprocess.run(
            [pg.pgbench_path, "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port),
             "-U", "postgres", name],
            env=_env(), capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        yield name
    finally:
        pg.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", dbname="postgres")


def run_pgbench(pg, h, db: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [pg.pgbench_path, "-n", "-c", str(CLIENTS), "-j", str(THREADS), "-T", str(SECONDS),
           "-h", h.host, "-p", str(h.port), "-U", "postgres", *args, db]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                          timeout=SECONDS + 60)
    out = proc.stdout
    facts = {}
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    facts["processed"] = int(m.group(1)) if m else None
    m = re.search(r"number of failed transactions: (\d+)", out)
    facts["failed"] = int(m.group(1)) if m else None
    return proc, facts


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("script", ["select-only", "tpcb-like"])
def test_pgbench_through_pgherd(pgherd, pg, bench_db, script, protocol):
    # pool_size 3 per worker for 8 clients: clients queue and servers change hands
    h = pgherd(settings={"pool_mode": "transaction", "default_pool_size": 3}, workers=2)
    pg.sql("TRUNCATE pgbench_history", dbname=bench_db)
    before = pg.sql("SELECT sum(abalance) FROM pgbench_accounts", dbname=bench_db)[0][0]
    proc, facts = run_pgbench(pg, h, bench_db, "-b", script, "-M", protocol)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert facts["failed"] == 0, proc.stdout
    assert facts["processed"] and facts["processed"] > 0, proc.stdout
    assert "error" not in proc.stderr.lower(), proc.stderr
    hist, delta = pg.sql("SELECT count(*), coalesce(sum(delta), 0) FROM pgbench_history",
                         dbname=bench_db)[0]
    after = pg.sql("SELECT sum(abalance) FROM pgbench_accounts", dbname=bench_db)[0][0]
    if script == "tpcb-like":
        # every transaction pgbench counted committed exactly once: one history row each,
        # and the balances moved by the sum of the history deltas
        assert hist == facts["processed"], (hist, proc.stdout)
        assert after - before == delta
    else:
        assert (hist, after) == (0, before)
    # no server was left inside a transaction
    assert not pg.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in%%'",
        dbname="postgres", params=[bench_db])
