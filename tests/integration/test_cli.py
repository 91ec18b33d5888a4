"""The service commands: run --daemon, status, reload, stop — found through the pidfile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.helpers import free_port, wait_for

PGHERD = [str(Path(sys.executable).with_name("pgherd"))]


def _pgherd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(PGHERD + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ini(pg):
    """A config for a daemon: pidfile and logfile set, unix socket in a short /tmp dir; all in
    a /tmp dir another user can reach (pytest's tmp_path is root's alone)."""
    import shutil

    tmp_path = Path(tempfile.mkdtemp(prefix="pgh-cli-", dir="/tmp"))
    sockdir = tempfile.mkdtemp(prefix="pgh-", dir="/tmp")
    port = free_port()
    path = tmp_path / "pgherd.ini"
    path.write_text(
        "[databases]\np0 = host=%s port=%d\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
        "listen_port = %d\nunix_socket_dir = %s\nauth_type = trust\nauth_file = %s\n"
        "pidfile = %s\nlogfile = %s\nworkers = 2\nallow_root = 1\n"
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
    shutil.rmtree(tmp_path, ignore_errors=True)
    shutil.rmtree(sockdir, ignore_errors=True)


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
    assert bad.returncode == 1 and "pgherd.ini:13: pool_mode" in bad.stderr
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


# --------------------------------------------------------------------------- PgBouncer's form


def _as_pgbouncer_user(path: Path) -> None:
    """Let the unprivileged ``postgres`` user write where the daemon writes."""
    import shutil

    sockdir = re.search(r"unix_socket_dir = (\S+)", path.read_text()).group(1)
    for p in [path.parent, *path.parent.iterdir(), Path(sockdir)]:
        shutil.chown(p, "postgres")


@pytest.fixture
def root():
    if os.geteuid() != 0:
        pytest.skip("switching users needs root (CI runs the tests as root)")


def test_pgbouncer_command_line_daemon_as_another_user(ini, root):
    """``pgherd -d -q -v -u USER INI``, as a PgBouncer unit or script runs ``pgbouncer``."""
    path, port = ini
    path.write_text(path.read_text().replace("allow_root = 1\n", ""))
    _as_pgbouncer_user(path)
    started = _pgherd("-d", "-q", "-v", "-u", "postgres", str(path))
    assert started.returncode == 0, started.stderr
    pid_file = path.parent / "pgherd.pid"
    wait_for(pid_file.exists, timeout=15)
    master = psutil.Process(int(pid_file.read_text()))
    assert master.username() == "postgres"
    wait_for(lambda: len(master.children()) == 2, timeout=15)
    assert {c.username() for c in master.children()} == {"postgres"}
    with psycopg.connect("host=127.0.0.1 port=%d user=postgres dbname=p0" % port) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert _pgherd("stop", str(path)).returncode == 0
    assert "DEBUG" in (path.parent / "pgherd.log").read_text()  # -v


def test_root_is_refused_as_pgbouncer_refuses_it(ini, root, pgbouncer_setup):
    path, _ = ini
    path.write_text(path.read_text().replace("allow_root = 1\n", ""))
    ours = _pgherd(str(path))
    assert ours.returncode == 1 and "should not run as root" in ours.stderr
    bouncer_ini = pgbouncer_setup.write_ini()
    theirs = subprocess.run([pgbouncer_setup.binary, "-q", bouncer_ini], capture_output=True,
                            text=True, timeout=30)
    assert theirs.returncode != 0
    assert "should not run as root" in pgbouncer_setup.log()
    # the user setting is as good as -u
    path.write_text(path.read_text() + "user = postgres\n")
    _as_pgbouncer_user(path)
    assert _pgherd("-d", str(path)).returncode == 0
    assert _pgherd("stop", str(path)).returncode == 0


def test_unknown_user_and_online_restart_are_refused_clearly(ini):
    path, _ = ini
    nobody = _pgherd("-u", "no_such_user_here", str(path))
    assert nobody.returncode == 1 and "could not find user 'no_such_user_here'" in nobody.stderr
    reboot = _pgherd("-R", str(path))
    assert reboot.returncode == 1 and "online restart (-R) is not supported" in reboot.stderr
    assert _pgherd("-V").stdout.startswith("pgherd, version")
