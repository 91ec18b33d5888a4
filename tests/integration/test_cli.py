"""The service commands: run --daemon, status, reload, stop — found through the pidfile."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.helpers import free_port, wait_for

PGHERD = [str(Path(sys.executable).with_name("pgherd"))]


def _pgherd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(PGHERD + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ini(pg, tmp_path):
    """A config for a daemon: pidfile and logfile set, unix socket in a short /tmp dir."""
    sockdir = tempfile.mkdtemp(prefix="pgh-", dir="/tmp")
    port = free_port()
    path = tmp_path / "pgherd.ini"
    path.write_text(
        "[databases]\np0 = host=%s port=%d\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
        "listen_port = %d\nunix_socket_dir = %s\nauth_type = trust\nauth_file = %s\n"
        "pidfile = %s\nlogfile = %s\nworkers = 2\n"
        % (pg.host, pg.port, port, sockdir, tmp_path / "users.txt", tmp_path / "pgherd.pid",
           tmp_path / "pgherd.log"))
    (tmp_path / "users.txt").write_text('"postgres" ""\n')
    yield path, port
    pid_file = tmp_path / "pgherd.pid"
    if pid_file.exists():  # a failed test must not leave a daemon behind
        try:
            os.kill(int(pid_file.read_text()), 9)
        except (ProcessLookupError, ValueError):
            pass


def test_daemon_status_reload_stop(ini):
    path, port = ini
    started = _pgherd("run", "--daemon", str(path))
    assert started.returncode == 0, started.stderr
    dsn = "host=127.0.0.1 port=%d user=postgres dbname=p0" % port

    def serves():
        try:
            with psycopg.connect(dsn) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)
        except psycopg.OperationalError:
            return False

    wait_for(serves, timeout=15)
    status = _pgherd("status", str(path))
    assert status.returncode == 0 and "2 workers" in status.stdout
    second = _pgherd("run", str(path))  # same pidfile: refused while the first lives
    assert second.returncode == 1 and "another instance running" in second.stderr

    good = path.read_text()
    path.write_text(good + "pool_mode = sideways\n")
    bad = _pgherd("reload", str(path))
    assert bad.returncode == 1 and "pgherd.ini:12: pool_mode" in bad.stderr
    path.write_text(good)
    assert _pgherd("reload", str(path)).returncode == 0
    wait_for(lambda: "configuration epoch 1 applied" in (path.parent / "pgherd.log").read_text(),
             timeout=10)

    stopped = _pgherd("stop", str(path))
    assert stopped.returncode == 0, stopped.stderr
    assert not serves()
    assert _pgherd("status", str(path)).returncode == 3
    assert not (path.parent / "pgherd.pid").exists()


def test_daemon_needs_pidfile_and_logfile(ini):
    path, _ = ini
    path.write_text(path.read_text().replace("pidfile =", "; pidfile ="))
    result = _pgherd("run", "--daemon", str(path))
    assert result.returncode != 0 and "needs pidfile and logfile" in result.stderr
