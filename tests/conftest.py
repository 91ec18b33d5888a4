"""Shared fixtures for every pgherd test (unit and integration).

Fixtures
--------
``pg_bin``   (session)  PostgreSQL bin dir (Path).
``pg``       (session)  a throwaway PostgreSQL cluster, one per xdist worker
                        (`tests.helpers.PgCluster`).
``pgherd``   (function) factory starting pgherd services against ``pg``
                        (`tests.helpers.Pgherd`); each one is shut down and checked
                        for orphaned processes when the test ends.

Non-fixture helpers (``free_port``, ``wait_for``, ``make_dsn``...) live in
``tests/helpers.py``.

Ground rules: real PostgreSQL, no mocks; tests run under ``pytest -n auto``; nothing
sleeps to synchronise -- wait with ``wait_for`` / ``Pgherd.wait_notification``.
When a test fails, the report gets extra sections: each pgherd's output, log and
notifications, and the PostgreSQL log lines written during the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from tests.helpers import (
    PgCluster,
    Pgherd,
    free_port,
    pg_bindir,
    read_text,
    wait_for,
)

# --------------------------------------------------------------------------------------
# reporting: remember each phase's report on the item, attach logs to failures
# --------------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Store ``item.rep_setup`` / ``rep_call`` / ``rep_teardown`` and, on a failed
    setup or call, append pgherd's and PostgreSQL's logs to the report."""
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed and rep.when in ("setup", "call"):
        for h in getattr(item, "_pgherd_instances", []):
            rep.sections.append((f"pgherd :{h.port} ({h.workdir})", h.diagnostics()))
        pg = getattr(item, "_pg_cluster", None)
        if pg is not None and not getattr(item, "_pgherd_instances", None):
            offset = getattr(item, "_pg_log_offset", 0)
            rep.sections.append(
                ("postgresql log (this test)", read_text(pg.log_path, offset, max_chars=20000))
            )
    return rep


# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_bin() -> Path:
    """Directory with initdb/pg_ctl/postgres: ``initdb`` on PATH (symlinks resolved),
    else the highest /usr/lib/postgresql/<v>/bin."""
    return pg_bindir()


@pytest.fixture(scope="session")
def pg(pg_bin: Path) -> Iterator[PgCluster]:
    """A running PostgreSQL cluster for this xdist worker (session scope).

    127.0.0.1:<free port>, unix socket in the data dir (a mkdtemp under /tmp owned by
    the ``postgres`` OS user; all PostgreSQL commands run via ``runuser -u postgres``
    when the tests run as root). fsync off, max_connections=300, log_connections on,
    DateStyle 'iso, mdy', TimeZone UTC; log at ``pg.log_path``.

    pg_hba: u_md5 -> md5, u_scram -> scram-sha-256, u_plain -> password, everyone
    else trust (TCP and local). Roles: u_md5/md5pw (md5-stored secret),
    u_scram/scrampw, u_plain/plainpw, app/apppw (trust). Databases p0, p1, p2 owned by
    postgres, usable (incl. CREATE in schema public) by everyone.

    API: ``host``, ``port``, ``sockdir``, ``datadir``, ``bindir``, ``log_path``,
    ``pgbench_path``, ``psql_path``, ``dsn(dbname='p0', user='postgres',
    password=None)``, ``connect(**kw)`` (autocommit psycopg connection),
    ``sql(query, dbname='p0', params=None)`` -> list[tuple], ``backends(dbname,
    usename)`` (count in pg_stat_activity), ``log(offset)``, ``log_size()``,
    ``run_as_pg(argv)``. Tests must leave the roles/databases as they found them.
    """
    cluster = PgCluster(bindir=pg_bin)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pgbench_db(pg: PgCluster) -> str:
    """Databases ``bench`` and ``bench_b`` with pgbench's tables (scale 1), made once per
    cluster; returns ``"bench"``. Tests only read them (pgbench -S) or run TPC-B on them."""
    for name in ("bench", "bench_b"):
        pg.sql("CREATE DATABASE %s" % name, dbname="postgres")
        subprocess.run([pg.pgbench_path, "-i", "-q", "-s", "1", "-h", pg.host, "-p",
                        str(pg.port), "-U", "postgres", name], check=True,
                       capture_output=True, timeout=120)
        pg.sql("GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC", dbname=name)
    return "bench"


@pytest.fixture(autouse=True)
def _pg_log_mark(request: pytest.FixtureRequest) -> None:
    """For tests that use ``pg`` (directly or via ``pgherd``): remember where the
    PostgreSQL log stood when the test began, so a failure shows only its lines."""
    if "pg" in request.fixturenames:
        cluster = request.getfixturevalue("pg")
        request.node._pg_cluster = cluster
        request.node._pg_log_offset = cluster.log_size()


# --------------------------------------------------------------------------------------
# pgherd
# --------------------------------------------------------------------------------------


class PgherdFactory:
    """The ``pgherd`` fixture's value: call it to start a pgherd service.

    ``pgherd(settings=None, databases=None, users=None, userlist=None, workers=2,
    wait_ready=True, command=None, ready_timeout=20) -> Pgherd``

    * ``settings``: [pgbouncer] overrides on top of listen_addr=127.0.0.1,
      listen_port=<free_port()>, unix_socket_dir=<short /tmp dir>, logfile, pidfile,
      auth_type=trust, auth_file=<userlist.txt>, admin_users=postgres,
      workers=<workers>. A value of None removes the key; booleans become 1/0.
    * ``databases``: replaces the default [databases] (p0, p1, p2 and ``*``, all
      ``host=127.0.0.1 port=<pg.port>``). A value is a connection string, or a dict of
      options added to ``host=... port=...`` of the test cluster. Extend the defaults
      with ``{**pgherd.default_databases, "x": {...}}``.
    * ``users``: the [users] section (values as for databases, without host/port).
    * ``userlist``: merged into the default auth_file entries postgres "" and
      app/u_md5/u_scram/u_plain with their cluster passwords (None removes).
    * ``command``: run something else than ``pgherd run <ini>`` (harness tests).

    Files go to ``tmp_path`` (the 2nd, 3rd... instance of a test to
    ``tmp_path/pgherd<n>``). Readiness is ``READY=1`` on NOTIFY_SOCKET; if pgherd exits
    first or 20 s pass, `PgherdStartError` is raised with its output and log.
    """

    def __init__(self, pg: PgCluster, tmp_path: Path, node: pytest.Item) -> None:
        self.pg = pg
        self.tmp_path = tmp_path
        self.node = node
        self.instances: list[Pgherd] = []
        node._pgherd_instances = self.instances

    @property
    def default_databases(self) -> dict[str, str]:
        """The default [databases] mapping (p0, p1, p2, *)."""
        return Pgherd.default_databases(self.pg)

    def __call__(
        self,
        settings: Mapping[str, Any] | None = None,
        databases: Mapping[str, Any] | None = None,
        users: Mapping[str, Any] | None = None,
        userlist: Mapping[str, str | None] | None = None,
        workers: int = 2,
        wait_ready: bool = True,
        command: list[str] | None = None,
        ready_timeout: float | None = None,
    ) -> Pgherd:
        n = len(self.instances)
        workdir = self.tmp_path if n == 0 else self.tmp_path / f"pgherd{n}"
        h = Pgherd(
            self.pg,
            workdir,
            settings=settings,
            databases=databases,
            users=users,
            userlist=userlist,
            workers=workers,
            command=command,
        )
        self.instances.append(h)
        h.start(wait_ready=wait_ready, timeout=ready_timeout)
        return h

    def shutdown_all(self) -> list[str]:
        """Stop every instance (SIGQUIT + wait) and collect orphan/exit problems."""
        problems: list[str] = []
        for h in reversed(self.instances):
            for p in h.shutdown():
                problems.append(f"pgherd :{h.port}: {p}\n{h.diagnostics()}")
        return problems


@pytest.fixture
def pgherd(pg: PgCluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PgherdFactory]:
    """Factory fixture: ``h = pgherd(settings={...}, workers=2)`` starts a pgherd
    service against ``pg`` and waits for READY=1 (see `PgherdFactory`).

    The returned `tests.helpers.Pgherd` offers: ``host``, ``port``, ``unix_dir``,
    ``ini_path``, ``log_path``, ``proc``, ``pid``, ``dsn(dbname='p0', user='postgres',
    password=None, **params)``, ``unix_dsn(...)``, ``connect(dbname, user, password,
    autocommit=True, **kw)``, ``admin(command, user='postgres')`` -> list[tuple] and
    ``admin_dicts(command)`` (simple query protocol on db ``pgbouncer``), ``log()``,
    ``output()``, ``wait_log(regex)``, ``worker_pids()``, ``signal(sig)``,
    ``stop(sig=SIGTERM, timeout=20)`` -> exit code, ``wait_exit()``,
    ``rewrite_ini(settings=, databases=, users=, raw=)``, ``write_userlist(changes)``,
    ``notifications()`` (all KEY=VALUE lines so far), ``wait_notification(line,
    since=0)``, ``wait_ready()``, ``diagnostics()``.

    Teardown: any instance still running gets SIGQUIT and must exit within 20 s; then
    no process of its session may remain (checked by every descendant pid ever seen
    and by process group, for 10 s). A hang or an orphan fails the test (as a teardown
    error) after the leftovers are SIGKILLed.
    """
    factory = PgherdFactory(pg, tmp_path, request.node)
    yield factory
    problems = factory.shutdown_all()
    if problems:
        pytest.fail("pgherd teardown problems:\n" + "\n\n".join(problems), pytrace=False)



# --------------------------------------------------------------------------------------
# PgBouncer, side by side
# --------------------------------------------------------------------------------------


class PgBouncer:
    """The installed PgBouncer (Debian's 1.18), run as the unprivileged ``postgres`` user
    (it refuses root): ``dsn`` reaches its admin console over TCP as ``postgres``."""

    def __init__(self, pg: PgCluster) -> None:
        self.binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.workdir = tempfile.mkdtemp(prefix="pgb-", dir="/tmp")
        self.port = free_port()
        self.ini = os.path.join(self.workdir, "pgbouncer.ini")
        self.logfile = os.path.join(self.workdir, "pgbouncer.log")
        self.pg = pg
        self.proc: subprocess.Popen | None = None
        self.dsn = "host=127.0.0.1 port=%d user=postgres dbname=pgbouncer" % self.port

    def write_ini(self, extra: str = "") -> str:
        with open(self.ini, "w") as f:
            f.write("[databases]\np1 = host=%s port=%d\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
                    "listen_port = %d\nunix_socket_dir = %s\nauth_type = trust\n"
                    "auth_file = %s/userlist.txt\nadmin_users = postgres\nlogfile = %s\n%s"
                    % (self.pg.host, self.pg.port, self.port, self.workdir, self.workdir,
                       self.logfile, extra))
        with open(os.path.join(self.workdir, "userlist.txt"), "w") as f:
            f.write('"postgres" ""\n')
        for name in os.listdir(self.workdir):
            shutil.chown(os.path.join(self.workdir, name), "postgres")
        shutil.chown(self.workdir, "postgres")
        return self.ini

    def run(self, *args: str) -> subprocess.Popen:
        argv = [self.binary, *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def start(self) -> None:
        import psycopg

        self.proc = self.run("-q", self.ini)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("pgbouncer exited: %s" % self.log())
            try:
                with psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None) as c:
                    return c.execute("SHOW VERSION").fetchone()
            except psycopg.OperationalError:
                return None

        wait_for(ready, timeout=10)

    def log(self) -> str:
        return read_text(self.logfile) if os.path.exists(self.logfile) else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def pgbouncer_setup(pg: PgCluster) -> Iterator[PgBouncer]:
    """A PgBouncer not started yet (write_ini, run, start): for tests of its command line and
    config handling. Skipped when PgBouncer is not installed (make test installs it)."""
    bouncer = PgBouncer(pg)
    if not os.path.exists(bouncer.binary):
        pytest.skip("pgbouncer is not installed (make test installs it with apt)")
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pgbouncer(pgbouncer_setup: PgBouncer) -> str:
    """The installed PgBouncer running against ``pg`` (database p1): its admin DSN."""
    pgbouncer_setup.write_ini()
    pgbouncer_setup.start()
    return pgbouncer_setup.dsn
