"""The master process: titles, respawn, signals, pidfile, ``pgherd check``
(reference/pgbouncer.md §3; DESIGN "Processes", invariant 4).

Every pgherd started here is also checked by the fixture's teardown for orphaned processes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.helpers import Pgherd, free_port, wait_for

PGHERD = str(Path(sys.executable).parent / "pgherd")


def title(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline()).strip()


def worker_index(pid: int) -> int:
    m = re.fullmatch(r"pgherd: worker (\d+)", title(pid))
    assert m, title(pid)
    return int(m.group(1))


def worker_of(h: Pgherd, conn: psycopg.Connection) -> int:
    """The pid of the worker serving this client connection (by its TCP port)."""
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        local_port = s.getsockname()[1]
    for pid in h.worker_pids():
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.raddr and c.raddr.port == local_port and c.status == psutil.CONN_ESTABLISHED:
                return pid
    raise AssertionError(f"no worker holds the client port {local_port}")


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    cmd = [PGHERD] if os.path.exists(PGHERD) else [sys.executable, "-m", "prefork.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------


def test_process_titles(pgherd):
    h = pgherd(workers=3)
    assert title(h.pid) == "pgherd: master"
    pids = h.worker_pids()
    assert len(pids) == 3
    assert sorted(worker_index(p) for p in pids) == [0, 1, 2]


def test_each_worker_leads_its_own_session(pgherd):
    """Scheduler autogroups share CPU per session: each worker gets its own share."""
    h = pgherd(workers=2)
    for pid in h.worker_pids():
        assert os.getsid(pid) == pid


def test_workers_die_with_a_killed_master(pgherd):
    """In sessions of their own, workers still never outlive the master."""
    h = pgherd(workers=2)
    workers = h.worker_pids()
    os.kill(h.pid, signal.SIGKILL)

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(p) for p in workers), timeout=10,
             message="workers to die with the master")


def test_kill9_worker_is_respawned(pgherd):
    h = pgherd(settings={"pool_mode": "session"}, workers=2)
    pids = h.worker_pids()
    assert len(pids) == 2
    # clients on both workers (the kernel spreads connections over the two listeners)
    conns: dict[int, list[psycopg.Connection]] = {p: [] for p in pids}
    opened = []
    try:
        for _ in range(60):
            c = h.connect()
            opened.append(c)
            conns[worker_of(h, c)].append(c)
            if all(len(v) >= 2 for v in conns.values()):
                break
        assert all(conns.values()), {p: len(v) for p, v in conns.items()}
        victim, survivor = pids
        slot = worker_index(victim)

        os.kill(victim, signal.SIGKILL)
        def replaced() -> list[int] | None:
            now = h.worker_pids()  # one sample: two could straddle the victim's death
            return now if len(now) == 2 and victim not in now else None

        new_pids = wait_for(replaced, timeout=10,
                            message=lambda: f"a new worker (now {h.worker_pids()})")
        assert survivor in new_pids
        (newcomer,) = set(new_pids) - {survivor}
        assert worker_index(newcomer) == slot
        wait_for(lambda: title(newcomer) == f"pgherd: worker {slot}", timeout=5)

        # the survivor's clients did not notice; the victim's lost their connection
        for c in conns[survivor]:
            assert c.execute("SELECT 'alive'").fetchone() == ("alive",)
        for c in conns[victim]:
            with pytest.raises(psycopg.OperationalError):
                c.execute("SELECT 1")
        assert h.running()

        # new connections are served, by both workers again
        seen = set()
        for _ in range(40):
            with h.connect() as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
                seen.add(worker_of(h, c))
            if seen == set(new_pids):
                break
        assert seen == set(new_pids)
    finally:
        for c in opened:
            c.close()


def test_sigterm_without_clients_exits_cleanly(pgherd):
    h = pgherd(workers=2)
    workers = h.worker_pids()
    sock = Path(h.unix_dir, f".s.PGSQL.{h.port}")
    assert sock.exists() and h.pidfile_path.exists()
    assert h.pidfile_path.read_text().strip() == str(h.pid)
    assert h.stop(signal.SIGTERM, timeout=20) == 0
    assert "STOPPING=1" in h.notifications()
    wait_for(lambda: not h.session_processes(), timeout=10,
             message=lambda: f"no process left: {h.session_processes()}")
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in workers)
    assert not h.pidfile_path.exists()
    assert not sock.exists()


def test_sigterm_waits_for_clients(pgherd):
    h = pgherd(settings={"pool_mode": "session", "shutdown_timeout": 60}, workers=2)
    conn = h.connect()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    h.signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            psycopg.connect(h.dsn(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return True
        return False

    # no new clients...
    wait_for(refused, timeout=10, message="new connections refused")
    # ...but the connected one carries on, and pgherd waits for it
    for i in range(3):
        assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)
    assert h.running()
    conn.close()
    assert h.wait_exit(20) == 0


def test_sigquit_exits_at_once(pgherd):
    h = pgherd(settings={"pool_mode": "session", "shutdown_timeout": 60}, workers=2)
    conn = h.connect(autocommit=False)
    conn.execute("SELECT 1")  # inside a transaction
    h.signal(signal.SIGQUIT)
    h.wait_exit(5)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    wait_for(lambda: not h.session_processes(), timeout=10,
             message=lambda: f"no process left: {h.session_processes()}")


def test_second_instance_with_same_pidfile_refuses(pgherd):
    h = pgherd(workers=1)
    h2 = pgherd(settings={"pidfile": str(h.pidfile_path)}, workers=1, wait_ready=False)
    code = h2.wait_exit(20)
    assert code != 0
    assert "pidfile" in (h2.output() + h2.log())
    # the first one is untouched
    assert h.running()
    assert h.pidfile_path.read_text().strip() == str(h.pid)
    with h.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_second_instance_on_same_unix_socket_refuses(pgherd):
    h = pgherd(workers=1)
    h2 = pgherd(settings={"listen_port": h.port, "unix_socket_dir": h.unix_dir}, workers=1,
                wait_ready=False)
    assert h2.wait_exit(20) != 0
    assert "in use" in (h2.output() + h2.log())
    assert h.running()
    with psycopg.connect(h.unix_dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def listeners_on(port: int) -> int:
    """Listening TCP sockets on ``port``, whoever holds them."""
    return sum(1 for c in psutil.net_connections("tcp")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == port)


def serving_workers(h: Pgherd, want: int, tries: int = 80) -> set[int]:
    """Pids of the workers new TCP clients reach: connect until ``want`` of them answered."""
    seen: set[int] = set()
    for _ in range(tries):
        with h.connect() as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
            seen.add(worker_of(h, c))
        if len(seen) >= want:
            break
    return seen


def test_second_instance_on_same_tcp_or_http_port_refuses(pgherd):
    http_port = free_port()
    h = pgherd(settings={"http_listen_port": http_port}, workers=2)
    for taken, port in (("listen_port", h.port), ("http_listen_port", http_port)):
        other = {"listen_port": h.port if taken == "listen_port" else free_port(),
                 "http_listen_port": http_port if taken == "http_listen_port" else 0}
        h2 = pgherd(settings=other, workers=1, wait_ready=False)
        assert h2.wait_exit(20) != 0
        text = h2.output() + h2.log()
        assert re.search(r"127\.0\.0\.1:%d: address already in use" % port, text, re.I), text
    assert listeners_on(h.port) == 2 and listeners_on(http_port) == 2
    # the first one's own sockets still serve: a respawned worker, a slot added by a reload
    victim = h.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(h.worker_pids()) == 2 and victim not in h.worker_pids(), timeout=10,
             message=lambda: f"a new worker (now {h.worker_pids()})")
    h.admin("SET workers = 3")
    wait_for(lambda: len(h.worker_pids()) == 3, timeout=10,
             message=lambda: f"3 workers (now {h.worker_pids()})")
    assert serving_workers(h, 3) == set(h.worker_pids())
    assert listeners_on(h.port) == 3 and listeners_on(http_port) == 3


def test_so_reuseport_lets_services_share_a_port(pgherd):
    """PgBouncer's so_reuseport = 1: several services on one port, on purpose."""
    h = pgherd(settings={"so_reuseport": 1}, workers=1)
    h2 = pgherd(settings={"so_reuseport": 1, "listen_port": h.port}, workers=1)
    assert h.running() and h2.running()
    assert listeners_on(h.port) == 2
    for service in (h, h2):  # each its own unix socket
        with psycopg.connect(service.unix_dsn(), autocommit=True) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)


def test_check_reports_file_and_line(tmp_path, pg):
    good = tmp_path / "good.ini"
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('"app" "apppw"\n')
    good.write_text(
        "[databases]\n"
        f"p0 = host=127.0.0.1 port={pg.port}\n"
        "\n"
        "[pgbouncer]\n"
        "listen_port = 6432\n"
        f"auth_file = {userlist}\n"
    )
    ok = run_cli("check", str(good))
    assert ok.returncode == 0, ok.stdout + ok.stderr

    bad = tmp_path / "bad.ini"
    bad.write_text(good.read_text() + "pool_mode = sometimes\nno_such_setting = 1\n")
    res = run_cli("check", str(bad))
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert f"{bad}:7" in out and "pool_mode" in out, out
    assert f"{bad}:8" in out and "no_such_setting" in out, out

    missing = run_cli("check", str(tmp_path / "nope.ini"))
    assert missing.returncode == 1

    # `run` refuses the same file, the same way, before starting anything
    res = run_cli("run", str(bad), timeout=30)
    assert res.returncode == 1
    assert f"{bad}:7" in res.stdout + res.stderr


def test_version():
    res = run_cli("--version")
    assert res.returncode == 0
    assert re.search(r"\d+\.\d+", res.stdout), res.stdout
