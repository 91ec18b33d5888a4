"""Shared fixtures for every pgherd test (unit and integration).

Fixtures
--------
``pg_bin``   (session)  PostgreSQL bin dir (Path).
``pg``       (session)  a throwaway PostgreSQL cluster, one per xdist worker
                        (`tests.helpers.PgCluster`).
``pgherd``   (function) factory starting pgherd services against ``pg``
                        (`tests.helpers.Pgherd`); each one is shut down and checked
                        for orphaned processes when the test ends.
``pgbouncer`` (function) factory starting the Debian PgBouncer against ``pg``
                        (`tests.helpers.PgBouncer`), stopped when the test ends.
``tmux``     (function) a terminal (`tests.helpers.Tmux`), killed when the test ends.
``chromium`` (function) headless Chromium driven through chromedriver (selenium),
                        its console log kept; quit when the test ends.
``artifacts`` (function) a directory for what a test leaves to look at (screenshots):
                        ``$PGHERD_TEST_ARTIFACTS`` or ``test-artifacts/`` in the
                        repository, one subdirectory per test; listed at the end of
                        the run.

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
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from tests.helpers import (
    REPO_ROOT,
    PgBouncer,
    PgCluster,
    Pgherd,
    Tmux,
    pg_bindir,
    read_text,
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
# PgBouncer, a terminal, a browser: the other side of side-by-side and person-like tests
# --------------------------------------------------------------------------------------


@pytest.fixture
def pgbouncer(pg: PgCluster) -> Iterator[Callable[..., PgBouncer]]:
    """Factory: ``b = pgbouncer(settings={...})`` starts the Debian PgBouncer in front of
    ``pg`` (every database, trust, admin_users = postgres) and waits until its console
    answers; ``b.host``, ``b.port``, ``b.admin_dsn``, ``b.admin_dicts(command)``."""
    started: list[PgBouncer] = []

    def start(settings: Mapping[str, Any] | None = None) -> PgBouncer:
        started.append(PgBouncer(pg, settings))
        return started[-1].start()

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def pgbouncer_setup(pg: PgCluster) -> Iterator[PgBouncer]:
    """A PgBouncer not started yet (``write_ini``, ``run``, ``start``): for tests of its
    command line and of the files it accepts."""
    bouncer = PgBouncer(pg)
    yield bouncer
    bouncer.stop()


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    """A 150x40 terminal: ``tmux.start(argv)``, ``screen()``, ``send(*keys)``,
    ``wait_screen(predicate)``, ``dead()``."""
    term = Tmux(tmp_path)
    yield term
    term.close()


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A selenium WebDriver for headless Chromium (Debian's chromium and chromium-driver,
    which ``make test`` installs): no network but loopback is used, a fresh profile, a
    1280x1000 window. ``driver.get_log("browser")`` returns the console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.fail("%s is missing: make test installs chromium and chromium-driver" % path)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path: selenium fetches nothing
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                "--user-data-dir=%s" % (tmp_path / "chromium-profile")):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    """This test's directory for things to look at afterwards, emptied first."""
    root = Path(os.environ.get("PGHERD_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    path = root / request.node.name.replace("/", "_")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    request.node.user_properties.append(("artifacts", str(path)))
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say where the tests left their artifacts (screenshots), pass or fail."""
    paths = sorted({value for reports in terminalreporter.stats.values() for r in reports
                    for name, value in getattr(r, "user_properties", ()) if name == "artifacts"})
    if paths:
        terminalreporter.section("test artifacts")
        for path in paths:
            terminalreporter.line(path)
