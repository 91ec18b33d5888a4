"""Tests of the test harness itself: the PostgreSQL cluster, ports, and the pgherd
fixture's process machinery (driven by a tiny stand-in "server", not by pgherd)."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from tests.helpers import PgherdStartError, free_port, login_error, wait_for

PASSWORD_USERS = [
    ("u_md5", "md5pw", "md5"),
    ("u_scram", "scrampw", "scram-sha-256"),
    ("u_plain", "plainpw", "password"),
]


# --------------------------------------------------------------------------------------
# PostgreSQL cluster
# --------------------------------------------------------------------------------------


def test_cluster_is_up(pg):
    assert pg.host == "127.0.0.1"
    (version,) = pg.sql("SHOW server_version_num")[0]
    assert int(version) >= 120000
    settings = dict(pg.sql(
        "SELECT name, setting FROM pg_settings WHERE name IN "
        "('fsync', 'max_connections', 'log_connections', 'DateStyle', 'TimeZone', "
        "'listen_addresses', 'port', 'unix_socket_directories')"
    ))
    assert settings == {
        "fsync": "off",
        "max_connections": "300",
        "log_connections": "on",
        "DateStyle": "ISO, MDY",
        "TimeZone": "UTC",
        "listen_addresses": "127.0.0.1",
        "port": str(pg.port),
        "unix_socket_directories": pg.sockdir,
    }
    assert Path(pg.sockdir, f".s.PGSQL.{pg.port}").exists()
    assert pg.log_path.exists()
    # the server must not run as root (CI runs the tests as root)
    (datadir,) = pg.sql("SELECT current_setting('data_directory')")[0]
    assert Path(datadir) == pg.datadir
    if os.geteuid() == 0:
        assert pg.datadir.owner() == "postgres"


def test_databases_usable_by_everyone(pg):
    dbs = {r[0] for r in pg.sql("SELECT datname FROM pg_database")}
    assert {"p0", "p1", "p2"} <= dbs
    for db in ("p0", "p1", "p2"):
        with pg.connect(dbname=db, user="app") as conn:
            conn.execute("CREATE TABLE harness_probe (x int)")
            conn.execute("DROP TABLE harness_probe")


def test_unix_socket_connection(pg):
    with pg.connect(dbname="p1", host=pg.sockdir) as conn:
        row = conn.execute("SELECT current_database(), inet_server_addr() IS NULL").fetchone()
    assert row == ("p1", True)


def test_sql_helper(pg):
    assert pg.sql("SELECT 1, 'a'") == [(1, "a")]
    assert pg.sql("SELECT %s::int + 1", params=[41]) == [(42,)]
    assert pg.sql("SELECT current_database()", dbname="p2") == [("p2",)]
    assert pg.sql("SET application_name = 'x'") == []
    assert pg.backends(dbname="nonexistent") == 0


def test_secrets_stored_as_expected(pg):
    rows = dict(pg.sql(
        "SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ('u_md5', 'u_scram')"
    ))
    assert rows["u_md5"].startswith("md5")
    assert rows["u_scram"].startswith("SCRAM-SHA-256$")


@pytest.mark.parametrize("user,password,method", PASSWORD_USERS)
def test_password_roles(pg, user, password, method):
    offset = pg.log_size()
    with pg.connect(user=user, password=password) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    # PostgreSQL >= 14 logs the method that authenticated the connection
    wait_for(
        lambda: f'identity="{user}" method={method}' in pg.log(offset),
        timeout=10,
        message=lambda: f"auth method {method} in the log:\n{pg.log(offset)}",
    )
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        pg.connect(user=user, password="wrong").close()
    err = login_error(pg.dsn(user=user, password="wrong"))
    assert err is not None and err.sqlstate == "28P01", err


def test_trust_role(pg):
    assert login_error(pg.dsn(user="app")) is None
    assert login_error(pg.dsn(user="app", password="anything")) is None
    assert login_error(pg.dsn(user="app", password="apppw")) is None


def test_client_tools(pg):
    for tool in (pg.pgbench_path, pg.psql_path):
        assert tool and os.access(tool, os.X_OK), tool
    out = subprocess.run(
        [pg.psql_path, "-X", "-At", "-d", pg.dsn("p1"), "-c", "SELECT current_database()"],
        capture_output=True, text=True, check=True, timeout=30,
    )
    assert out.stdout.strip() == "p1"
    status = pg.run_as_pg([pg.bindir / "pg_ctl", "-D", pg.datadir, "status"])
    assert "server is running" in status.stdout


# --------------------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------------------


def test_free_port_distinct_and_locked():
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert 20000 <= port < 30000
        # another open file description (as another xdist worker would have) cannot
        # take the lock while we hold it
        fd = os.open(f"/tmp/pgherd-test-port-{port}.lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free for the server that will use it


def test_free_port_skips_busy_port():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert all(free_port() != busy for _ in range(5))


def test_free_port_exclusive_across_processes():
    mine = {free_port() for _ in range(5)}
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from tests.helpers import free_port
        print(" ".join(str(free_port()) for _ in range(5)))
    """)
    env = {**os.environ, "PYTEST_XDIST_WORKER": os.environ.get("PYTEST_XDIST_WORKER", "gw0")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parents[2])],
        capture_output=True, text=True, check=True, env=env, timeout=30,
    )
    theirs = {int(p) for p in out.stdout.split()}
    assert len(theirs) == 5 and not mine & theirs


# --------------------------------------------------------------------------------------
# pgherd fixture machinery, driven by a stand-in server (pgherd itself is not used)
# --------------------------------------------------------------------------------------

FAKE_SERVER = r'''
"""Stand-in for pgherd: forks workers, speaks sd_notify, obeys HUP/TERM/QUIT."""
import os, signal, socket, sys, time

mode = sys.argv[1]
ini = sys.argv[2]
assert os.path.exists(ini)

def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(msg.encode(), os.environ["NOTIFY_SOCKET"])
    s.close()

if mode == "crash":
    print("fake: bad config, exiting", flush=True)
    sys.exit(3)

workers = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
        while True:
            signal.pause()
    workers.append(pid)

if mode == "silent":
    while True:
        signal.pause()

stopping = []
def on_hup(*a):
    notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
    notify("READY=1")
def on_stop(*a):
    stopping.append(1)
signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, on_stop)
signal.signal(signal.SIGQUIT, on_stop)
notify("READY=1\nSTATUS=fake ready")
while not stopping:
    signal.pause()
notify("STOPPING=1")
if mode == "orphan":
    os._exit(0)  # leaves its workers behind
for pid in workers:
    os.kill(pid, signal.SIGTERM)
for pid in workers:
    os.waitpid(pid, 0)
sys.exit(0)
'''


@pytest.fixture
def fake_server(tmp_path):
    path = tmp_path / "fake_server.py"
    path.write_text(FAKE_SERVER)

    def command(mode: str, ini: Path) -> list[str]:
        return [sys.executable, str(path), mode, str(ini)]

    return command


def test_fixture_files(pgherd, fake_server, pg, tmp_path):
    h = pgherd(
        settings={"pool_mode": "transaction", "server_lifetime": None},
        users={"app": {"pool_mode": "session"}},
        userlist={"weird\"user": "pw", "u_plain": None},
        command=fake_server("normal", tmp_path / "pgherd.ini"),
    )
    ini = h.ini_path.read_text()
    assert h.ini_path == tmp_path / "pgherd.ini"
    assert f"p0 = host=127.0.0.1 port={pg.port}" in ini
    assert f"* = host=127.0.0.1 port={pg.port}" in ini
    assert f"listen_port = {h.port}" in ini
    assert f"unix_socket_dir = {h.unix_dir}" in ini
    assert "workers = 2" in ini and "pool_mode = transaction" in ini
    assert "[users]\napp = pool_mode=session" in ini
    userlist = h.userlist_path.read_text()
    assert '"postgres" ""' in userlist and '"u_md5" "md5pw"' in userlist
    assert '"weird""user" "pw"' in userlist and "u_plain" not in userlist
    assert h.dsn() == f"postgresql://postgres@127.0.0.1:{h.port}/p0"
    assert h.dsn("p1", "app", "a b", application_name="t") == (
        f"postgresql://app:a%20b@127.0.0.1:{h.port}/p1?application_name=t"
    )
    assert h.unix_dsn().startswith("postgresql://postgres@/p0?host=%2Ftmp%2F")

    h.rewrite_ini(settings={"default_pool_size": 7}, databases={"p2": None, "x": {"dbname": "p1"}})
    ini = h.ini_path.read_text()
    assert "default_pool_size = 7" in ini and "pool_mode = transaction" in ini
    assert "p2 =" not in ini and f"x = host=127.0.0.1 port={pg.port} dbname=p1" in ini


def test_fixture_lifecycle(pgherd, fake_server, tmp_path):
    h = pgherd(command=fake_server("normal", tmp_path / "pgherd.ini"))
    assert h.notifications() == ["READY=1", "STATUS=fake ready"]
    workers = h.worker_pids()
    assert len(workers) == 2 and h.pid not in workers

    n = len(h.notifications())
    h.signal(signal.SIGHUP)
    after = h.wait_notification("READY=1", since=n)
    assert h.notifications()[n] == "RELOADING=1"
    assert h.notifications()[n + 1].startswith("MONOTONIC_USEC=")

    assert h.stop() == 0
    h.wait_notification("STOPPING=1", since=after)
    assert not h.session_processes()


def test_fixture_start_failure_reports_output(pgherd, fake_server, tmp_path):
    with pytest.raises(PgherdStartError, match=r"(?s)exit.* 3.*fake: bad config"):
        pgherd(command=fake_server("crash", tmp_path / "pgherd.ini"))


def test_fixture_ready_timeout(pgherd, fake_server, tmp_path):
    with pytest.raises(PgherdStartError, match="no 'READY=1'"):
        pgherd(command=fake_server("silent", tmp_path / "pgherd.ini"), ready_timeout=1)


def test_fixture_detects_orphans(pg, fake_server, tmp_path):
    from tests.helpers import Pgherd

    h = Pgherd(pg, tmp_path, command=fake_server("orphan", tmp_path / "pgherd.ini"))
    h.start()
    workers = h.worker_pids()
    problems = h.shutdown(orphan_grace=1)
    assert len(problems) == 1 and "orphaned processes" in problems[0]
    for pid in workers:
        assert str(pid) in problems[0]
    # the leftovers were killed
    wait_for(lambda: not h.session_processes(), timeout=10, message="leftovers to die")
