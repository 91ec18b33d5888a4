"""Service lifecycle (DESIGN invariant 5, issue "Service lifecycle"), 4 workers unless stated.

Live reload by SIGHUP and by the admin console's RELOAD under pgbench load (pool sizes, an
invalid file, the worker count), graceful and immediate shutdown (SIGTERM, SIGINT, SIGQUIT,
SHUTDOWN WAIT_FOR_CLIENTS), a PostgreSQL restart behind pgherd, a hung worker, and the
sd_notify conversation with systemd.

Reloads are synchronised on sd_notify: every reload sends RELOADING=1, then READY=1 once
every worker has acknowledged the new epoch (or at once when the file is invalid). The
fixture's teardown checks that no process of the service outlives it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import uuid

import psutil
import psycopg
import pytest

from tests.helpers import Bench, Sampler, wait_for

WORKERS = 4
TX = {"pool_mode": "transaction"}
# The loops below run one statement again and again; psycopg would PREPARE it after 5 runs,
# and named prepared statements are not what these tests are about.
NO_PREPARE = {"prepare_threshold": None}


# --------------------------------------------------------------------------- helpers


def slot_of(conn: psycopg.Connection) -> int:
    """The worker slot serving ``conn`` in transaction mode (pgherd puts it in the top bits of
    the pid it makes up for BackendKeyData, which libpq reports as the backend pid; in session
    mode that is the backend's real pid)."""
    return conn.info.backend_pid >> 24


def serving_slot(h, conn: psycopg.Connection) -> int:
    """The worker slot serving ``conn`` found by its TCP port (admin console connections
    carry no slot in their cancel key)."""
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        local_port = s.getsockname()[1]
    for pid in h.worker_pids():
        try:
            for c in psutil.Process(pid).net_connections("tcp"):
                if c.raddr and c.raddr.port == local_port:
                    return int(title(pid).rsplit(" ", 1)[1])
        except psutil.Error:
            continue
    raise AssertionError(f"no worker holds the client port {local_port}")


def title(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline()).strip()


def titles(h) -> list[str]:
    """The process titles of the master's children, sorted (a child forked a moment ago
    still has the master's title)."""
    out = []
    for pid in h.worker_pids():
        try:
            out.append(title(pid))
        except psutil.Error:
            continue
    return sorted(out)


def pid_of_slot(h, slot: int) -> int | None:
    for pid in h.worker_pids():
        try:
            if title(pid) == f"pgherd: worker {slot}":
                return pid
        except psutil.Error:
            continue
    return None


def config_everywhere(h, key: str, slots: int = WORKERS, tries: int = 80) -> dict[int, str]:
    """SHOW CONFIG's value of ``key`` as each worker slot answers it: admin connections are
    opened until every slot has answered (the kernel spreads them over the listeners)."""
    seen: dict[int, str] = {}
    for _ in range(tries):
        with psycopg.connect(h.dsn("pgbouncer"), autocommit=True, **NO_PREPARE) as conn:
            rows = conn.execute("SHOW CONFIG").fetchall()
            seen[serving_slot(h, conn)] = next(r[1] for r in rows if r[0] == key)
        if len(seen) >= slots:
            break
    assert len(seen) == slots, f"only slots {sorted(seen)} answered in {tries} connections"
    return seen


def served_by(h, slots: int, tries: int = 80) -> set[int]:
    """The worker slots that serve new clients: connect until ``slots`` of them answered."""
    seen: set[int] = set()
    for _ in range(tries):
        with h.connect(**NO_PREPARE) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            seen.add(slot_of(conn))
        if len(seen) >= slots:
            break
    return seen


def refused(h) -> bool:
    """True when a new client cannot connect any more (TCP)."""
    try:
        psycopg.connect(h.dsn(), connect_timeout=2).close()
    except psycopg.OperationalError:
        return True
    return False


def wait_started(pg, dbname: str) -> None:
    """pgbench has connected and runs transactions: PostgreSQL sees server connections."""
    wait_for(lambda: pg.backends(dbname=dbname) > 0, timeout=15,
             message="pgbench's first server connections")


def sighup_and_wait(h) -> int:
    """SIGHUP, then RELOADING=1 and READY=1 (every worker acknowledged); the index of the
    notification line just past that READY=1."""
    n = len(h.notifications())
    h.signal(signal.SIGHUP)
    n = h.wait_notification("RELOADING=1", since=n, timeout=10)
    return h.wait_notification("READY=1", since=n, timeout=10)


@pytest.fixture
def scratch_table(pg):
    """A table in p0 that a test writes to through pgherd; dropped afterwards."""
    name = "lifecycle_" + uuid.uuid4().hex[:8]
    pg.sql(f"CREATE TABLE {name} (i int)")
    yield name
    pg.sql(f"DROP TABLE IF EXISTS {name}")


# --------------------------------------------------------------------------- reload


RELOADS = 20


def test_sighup_storm_under_pgbench(pg, pgherd, pgbench_db):
    h = pgherd(settings={**TX, "default_pool_size": 4}, workers=WORKERS)
    sizes = [16 if i % 2 == 0 else 4 for i in range(RELOADS)]  # 16, 4, 16, ..., 4
    with Sampler(pg, dbname=pgbench_db) as sampler, \
            Bench(pg, h, "-c", "32", "-j", "4", "-T", "15") as bench:
        wait_started(pg, pgbench_db)
        start = time.monotonic()
        for i, size in enumerate(sizes):
            # Pacing, not synchronisation: spread the reloads over ~12 s of the 15 s run.
            time.sleep(max(0.0, start + i * 0.6 - time.monotonic()))
            h.rewrite_ini(settings={"default_pool_size": size})
            sighup_and_wait(h)
            assert bench.running(), "pgbench ended before reload %d" % (i + 1)
        bench.finish()
    bench.assert_clean()
    # never more than the largest pool size in force at any moment
    assert sampler.samples > 50
    assert 0 < sampler.max <= 16, "PostgreSQL saw %d server connections" % sampler.max
    # the surplus of the last shrink leaves as its servers are released
    wait_for(lambda: pg.backends(dbname=pgbench_db) <= 4, timeout=10,
             message=lambda: "at most 4 servers, PostgreSQL sees %d"
             % pg.backends(dbname=pgbench_db))
    assert set(config_everywhere(h, "default_pool_size").values()) == {"4"}
    assert "RELOAD failed" not in h.log()


def test_invalid_config_changes_nothing_under_load(pg, pgherd, pgbench_db):
    h = pgherd(settings={**TX, "default_pool_size": 5}, workers=WORKERS)
    good = h.ini_path.read_text()
    assert "default_pool_size = 5\n" in good
    # a valid change (pool size 50) and a bad value further down: nothing may change
    lines = good.replace("default_pool_size = 5\n", "default_pool_size = 50\n").splitlines()
    lines.append("min_pool_size = lots")
    bad_line = len(lines)
    with Sampler(pg, dbname=pgbench_db) as sampler, \
            Bench(pg, h, "-c", "16", "-j", "2", "-T", "6", "-S") as bench:
        wait_started(pg, pgbench_db)
        h.rewrite_ini(raw="\n".join(lines) + "\n")
        n, d0 = len(h.notifications()), len(h.datagrams())
        h.signal(signal.SIGHUP)
        h.wait_log(re.escape(f"{h.ini_path}:{bad_line}: min_pool_size"), timeout=10)
        i = h.wait_notification("RELOADING=1", since=n, timeout=10)
        h.wait_notification("READY=1", since=i, timeout=10)
        assert bench.running(), "pgbench ended before the reload was handled"
        # the READY=1 after a failed reload says so in its STATUS= line
        datagrams = [d.split("\n") for d in h.datagrams()[d0:]]
        reloading = next(k for k, d in enumerate(datagrams) if "RELOADING=1" in d)
        ready = next(d for d in datagrams[reloading + 1:] if "READY=1" in d)
        status = [ln for ln in ready if ln.startswith("STATUS=")]
        assert status and "fail" in status[0].lower(), datagrams
        # the admin console's RELOAD answers PgBouncer's error for the same file
        with pytest.raises(psycopg.Error, match="RELOAD failed"):
            h.admin("RELOAD")
        assert set(config_everywhere(h, "default_pool_size").values()) == {"5"}
        bench.finish()
    bench.assert_clean()
    assert 0 < sampler.max <= 5, "PostgreSQL saw %d server connections" % sampler.max
    assert h.running()


def test_worker_count_changes_live_under_load(pg, pgherd, pgbench_db):
    h = pgherd(settings={**TX, "default_pool_size": 8}, workers=2)
    assert len(h.worker_pids()) == 2
    with Bench(pg, h, "-c", "16", "-j", "2", "-T", "12") as bench:  # TPC-B: real transactions
        wait_started(pg, pgbench_db)

        # 2 -> 4: two new workers on new listener slots, and they serve
        h.rewrite_ini(settings={"workers": 4})
        sighup_and_wait(h)
        wait_for(lambda: titles(h) == [f"pgherd: worker {i}" for i in range(4)], timeout=5,
                 message=lambda: f"workers 0-3, have {titles(h)}")
        assert served_by(h, 4) == {0, 1, 2, 3}
        assert bench.running()

        # 4 -> 1: the removed workers hand their clients over and exit while pgbench
        # still runs (they must not wait for its connections to end)
        h.rewrite_ini(settings={"workers": 1})
        sighup_and_wait(h)
        wait_for(lambda: titles(h) == ["pgherd: worker 0"], timeout=5,
                 message=lambda: f"worker 0 alone while pgbench runs, have {titles(h)}")
        assert bench.running(), "pgbench ended before the shrink completed"
        assert served_by(h, 1, tries=10) == {0}
        bench.finish()
    bench.assert_clean()
    assert h.running()
    assert config_everywhere(h, "workers", slots=1) == {0: "1"}


def listening_sockets(h) -> int:
    """TCP listeners the master holds on the service's port (one per live worker slot)."""
    return sum(1 for c in psutil.Process(h.pid).net_connections("tcp")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == h.port)


def test_set_workers_0_means_one_per_cpu_as_in_the_ini(pg, pgherd):
    cpus = os.cpu_count() or 1
    h = pgherd(settings=TX, workers=1 if cpus > 1 else 2)
    h.admin("SET workers = 0")
    wait_for(lambda: titles(h) == [f"pgherd: worker {i}" for i in range(cpus)], timeout=10,
             message=lambda: f"one worker per CPU ({cpus}), have {titles(h)}")
    assert served_by(h, cpus) == set(range(cpus))
    assert listening_sockets(h) == cpus
    assert config_everywhere(h, "workers", slots=cpus) == {i: str(cpus) for i in range(cpus)}


def test_a_slot_grown_back_while_its_worker_drains_gets_its_listener(pg, pgherd,
                                                                     scratch_table):
    h = pgherd(settings=TX, workers=2)
    conns = []
    try:
        # a transaction open on worker 1 keeps it draining after the shrink
        while not conns or slot_of(conns[-1]) != 1:
            conns.append(h.connect(autocommit=False, **NO_PREPARE))
        conn = conns[-1]
        conn.execute(f"INSERT INTO {scratch_table} VALUES (1)")
        old = pid_of_slot(h, 1)
        h.admin("SET workers = 1")
        h.wait_log(r"worker 1 draining")
        h.admin("SET workers = 2")  # wanted again before its worker could leave
        assert pid_of_slot(h, 1) == old
        conn.commit()  # the client moves to worker 0, worker 1 exits and is replaced
        wait_for(lambda: pid_of_slot(h, 1) not in (None, old), timeout=10,
                 message=lambda: f"a new worker 1, have {titles(h)}")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.commit()
    finally:
        for c in conns:
            c.close()
    assert served_by(h, 2) == {0, 1}
    assert listening_sockets(h) == 2
    assert "worker 1 (pid %d) exited with status" % old not in h.log()  # not taken for a crash


def test_shrinking_keeps_the_stats_of_the_retiring_worker(pg, pgherd, pgbench_db):
    h = pgherd(settings={**TX, "default_pool_size": 8}, workers=2)
    with Bench(pg, h, "-c", "8", "-j", "2", "-T", "4", "-S") as bench:
        wait_started(pg, pgbench_db)
        h.admin("SET workers = 1")  # worker 1 drains while pgbench runs
        wait_for(lambda: titles(h) == ["pgherd: worker 0"], timeout=5,
                 message=lambda: f"worker 0 alone while pgbench runs, have {titles(h)}")
        assert bench.running(), "pgbench ended before the shrink completed"
        bench.finish()
    n = bench.assert_clean()

    def xacts() -> int:
        return sum(int(r["total_xact_count"]) for r in h.admin_dicts("SHOW STATS")
                   if r["database"] == pgbench_db)

    # pgbench runs two queries of its own before the run (see test_one_pooler)
    wait_for(lambda: xacts() == n + 2, timeout=5,
             message=lambda: f"SHOW STATS total_xact_count {xacts()} == pgbench's {n} + 2")


# --------------------------------------------------------------------------- shutdown


def test_sigterm_lets_an_open_transaction_commit(pg, pgherd, scratch_table):
    h = pgherd(settings={**TX, "shutdown_timeout": 60}, workers=WORKERS)
    conn = h.connect(autocommit=False, **NO_PREPARE)
    conn.execute(f"INSERT INTO {scratch_table} VALUES (1)")  # a transaction is open
    h.signal(signal.SIGTERM)
    wait_for(lambda: refused(h), timeout=10, message="new connections refused")
    assert h.running()
    conn.execute(f"INSERT INTO {scratch_table} VALUES (2)")
    conn.commit()
    assert pg.sql(f"SELECT count(*) FROM {scratch_table}")[0][0] == 2
    # the client is still connected: the service waits for it
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.commit()
    assert h.running()
    conn.close()
    assert h.wait_exit(20) == 0
    h.wait_notification("STOPPING=1", timeout=5)
    wait_for(lambda: not h.session_processes(), timeout=10,
             message=lambda: f"no process left: {h.session_processes()}")


def test_sigint_waits_for_the_transaction_then_exits(pg, pgherd, scratch_table):
    h = pgherd(settings={**TX, "shutdown_timeout": 60}, workers=WORKERS)
    busy = h.connect(autocommit=False, **NO_PREPARE)
    busy.execute(f"INSERT INTO {scratch_table} VALUES (1)")  # holds a server
    idle = h.connect(**NO_PREPARE)
    assert idle.execute("SELECT 1").fetchone() == (1,)  # holds none (transaction mode)
    try:
        h.signal(signal.SIGINT)
        wait_for(lambda: refused(h), timeout=10, message="new connections refused")
        assert h.running(), "exited while a server was still in use"
        busy.execute(f"INSERT INTO {scratch_table} VALUES (2)")
        busy.commit()  # releases the last server in use
        assert h.wait_exit(20) == 0
        assert pg.sql(f"SELECT count(*) FROM {scratch_table}")[0][0] == 2
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
    finally:
        busy.close()
        idle.close()
    wait_for(lambda: not h.session_processes(), timeout=10,
             message=lambda: f"no process left: {h.session_processes()}")


def test_sigquit_exits_at_once_with_clients(pg, pgherd, scratch_table):
    h = pgherd(settings={**TX, "shutdown_timeout": 60}, workers=WORKERS)
    conns = [h.connect(autocommit=False, **NO_PREPARE) for _ in range(8)]
    try:
        for c in conns:
            c.execute(f"INSERT INTO {scratch_table} VALUES (1)")  # all inside transactions
        t0 = time.monotonic()
        h.signal(signal.SIGQUIT)
        assert h.wait_exit(5) == 0
        assert time.monotonic() - t0 < 3
        for c in conns:
            with pytest.raises(psycopg.OperationalError):
                c.execute("SELECT 1")
    finally:
        for c in conns:
            c.close()
    wait_for(lambda: not h.session_processes(), timeout=10,
             message=lambda: f"no process left: {h.session_processes()}")
    # nothing was committed, and PostgreSQL's backends went away with the service
    assert pg.sql(f"SELECT count(*) FROM {scratch_table}")[0][0] == 0
    wait_for(lambda: pg.backends(dbname="p0") == 0, timeout=10,
             message=lambda: f"no backend of p0 left: {pg.backends(dbname='p0')}")


# --------------------------------------------------------------------------- PostgreSQL restart


def test_postgres_restart_under_load(pg, pgherd, pgbench_db):
    # server_login_retry = 1: after a failed server login PgBouncer fails new clients fast
    # for server_login_retry seconds (15 by default); logins fail while PostgreSQL restarts,
    # and this test wants recovery within a few seconds, not after that 15 s window.
    h = pgherd(settings={**TX, "default_pool_size": 8, "server_login_retry": 1},
               workers=WORKERS)
    workers_before = h.worker_pids()
    clients = 8
    last_ok = [0.0] * clients
    errors: list[tuple[float, BaseException]] = []
    halt = threading.Event()

    def loop(i: int) -> None:
        conn = None
        while not halt.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(h.dsn(pgbench_db), autocommit=True,
                                           connect_timeout=5, **NO_PREPARE)
                conn.execute("SELECT pg_sleep(0.05), count(*) FROM pgbench_branches")
                last_ok[i] = time.monotonic()
            except psycopg.Error as exc:
                errors.append((time.monotonic(), exc))
                if conn is not None:
                    conn.close()
                    conn = None
                halt.wait(0.05)  # no busy loop while nothing answers
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(last_ok), timeout=10, message="every client served once")
        assert not errors, errors
        t_restart = time.monotonic()
        pg.restart_server()
        t_up = time.monotonic()
        # every client gets served again within a few seconds, pgherd untouched
        wait_for(lambda: all(t > t_up for t in last_ok), timeout=5,
                 message=lambda: "every client served after the restart; errors since: "
                 + repr([str(e).strip() for t, e in errors[-5:]]))
    finally:
        halt.set()
        for t in threads:
            t.join(10)
    # the transactions in flight got an error, of the connection class
    in_flight = [e for t, e in errors if t >= t_restart]
    assert in_flight, "no client noticed the restart"
    assert all(isinstance(e, psycopg.OperationalError) for e in in_flight), \
        [(type(e).__name__, str(e)) for e in in_flight]
    assert h.running()
    assert h.worker_pids() == workers_before, "a worker died"
    with h.connect(pgbench_db, **NO_PREPARE) as conn:
        assert conn.execute("SELECT count(*) FROM pgbench_branches").fetchone() == (1,)


# --------------------------------------------------------------------------- supervision


def test_hung_worker_is_detected_and_replaced(pg, pgherd):
    # heartbeat_timeout is pgherd's own setting (10 s by default)
    h = pgherd(settings={**TX, "heartbeat_timeout": 2}, workers=WORKERS)
    victim_slot = 1
    victim = pid_of_slot(h, victim_slot)
    assert victim
    results: list[object] = []

    def client() -> None:
        try:
            with h.connect(connect_timeout=15, **NO_PREPARE) as conn:
                results.append(conn.execute("SELECT 1").fetchone())
        except psycopg.Error as exc:
            results.append(exc)

    os.kill(victim, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        # connections the kernel hands to the hung worker's listener wait in its queue
        threads = [threading.Thread(target=client, daemon=True) for _ in range(12)]
        for t in threads:
            t.start()
        wait_for(lambda: (pid_of_slot(h, victim_slot) or victim) != victim, timeout=6,
                 message=lambda: f"a new worker {victim_slot} (workers "
                 f"{[(p, title(p)) for p in h.worker_pids()]})")
        detected = time.monotonic() - t0
        assert victim not in h.worker_pids()
        for t in threads:
            t.join(20)
        assert results == [(1,)] * 12, results
    finally:
        if psutil.pid_exists(victim):
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert detected >= 1.5, f"replaced after {detected:.1f}s: not for a stale heartbeat"
    assert re.search(r"worker %d \(pid %d\) missed its heartbeat" % (victim_slot, victim),
                     h.log()), h.log()[-3000:]
    assert len(h.worker_pids()) == WORKERS
    # the replacement serves on the same slot, and so do the others
    assert served_by(h, WORKERS) == set(range(WORKERS))


# --------------------------------------------------------------------------- systemd


def test_sd_notify_conversation(pgherd):
    h = pgherd(workers=WORKERS)
    before = time.monotonic_ns() // 1000
    n = sighup_and_wait(h)
    after = time.monotonic_ns() // 1000
    assert h.stop(signal.SIGTERM) == 0
    h.wait_notification("STOPPING=1", since=n, timeout=5)
    keys = [ln for ln in h.notifications()
            if ln in ("READY=1", "RELOADING=1", "STOPPING=1")]
    assert keys == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], h.notifications()
    # systemd wants MONOTONIC_USEC in the same message as RELOADING=1 (CLOCK_MONOTONIC)
    (reloading,) = [d.split("\n") for d in h.datagrams() if "RELOADING=1" in d.split("\n")]
    stamps = [int(ln.split("=", 1)[1]) for ln in reloading if ln.startswith("MONOTONIC_USEC=")]
    assert len(stamps) == 1, reloading
    assert before <= stamps[0] <= after
    ready = [d.split("\n") for d in h.datagrams() if "READY=1" in d.split("\n")]
    assert any(ln == "MAINPID=%d" % h.pid for ln in ready[0]), ready[0]


# --------------------------------------------------------------------------- admin console


def test_admin_reload_under_load(pg, pgherd, pgbench_db):
    h = pgherd(settings={**TX, "default_pool_size": 4}, workers=WORKERS)
    with Bench(pg, h, "-c", "16", "-j", "2", "-T", "8", "-S") as bench:
        wait_started(pg, pgbench_db)
        for size in ("12", "4"):
            h.rewrite_ini(settings={"default_pool_size": size})
            n = len(h.notifications())
            assert bench.running(), "pgbench ended before RELOAD to %s" % size
            h.admin("RELOAD")
            # RELOAD answers once every worker has applied the new configuration
            assert set(config_everywhere(h, "default_pool_size").values()) == {size}
            i = h.wait_notification("RELOADING=1", since=n, timeout=10)
            h.wait_notification("READY=1", since=i, timeout=10)
        bench.finish()
    bench.assert_clean()
    wait_for(lambda: pg.backends(dbname=pgbench_db) <= 4, timeout=10,
             message=lambda: "at most 4 servers, PostgreSQL sees %d"
             % pg.backends(dbname=pgbench_db))


def test_admin_shutdown_wait_for_clients(pg, pgherd, scratch_table):
    h = pgherd(settings={**TX, "shutdown_timeout": 60}, workers=WORKERS)
    conn = h.connect(autocommit=False, **NO_PREPARE)
    try:
        conn.execute(f"INSERT INTO {scratch_table} VALUES (1)")  # a transaction is open
        h.admin("SHUTDOWN WAIT_FOR_CLIENTS")
        wait_for(lambda: refused(h), timeout=10, message="new connections refused")
        h.wait_notification("STOPPING=1", timeout=5)
        assert h.running()
        conn.execute(f"INSERT INTO {scratch_table} VALUES (2)")
        conn.commit()
        assert pg.sql(f"SELECT count(*) FROM {scratch_table}")[0][0] == 2
        assert h.running(), "exited while a client was still connected"
    finally:
        conn.close()
    assert h.wait_exit(20) == 0
    wait_for(lambda: not h.session_processes(), timeout=10,
             message=lambda: f"no process left: {h.session_processes()}")
