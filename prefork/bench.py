"""``pgherd bench``: pgbench side by side against PostgreSQL directly, pgherd and PgBouncer.

One benchmark is a matrix: every workload (TPC-B-like, select-only) x every query protocol
(simple, extended) is run once against every target, target after target, so a drift of the
machine or of the tables (TPC-B bloats them) hits all targets alike. Each run is one
``pgbench -n -c C -j J -T D [-S] -M M [-C] -l`` and yields a `RunResult`; all of them print as
one table and go to a JSON file together with the settings, the machine and the versions.

Choices:

* The database is a throwaway cluster (``--throwaway``: initdb in /tmp, removed at the end), an
  existing server (``--dsn``) or the first non-``*`` database of a pgherd/PgBouncer ini
  (``--config``, whose pool settings become the defaults). pgbench's tables are created only
  when missing or on ``--init``.
* The poolers get a minimal config of their own (one database, trust for clients, the pool
  settings, no connection logging so logging does not dominate ``-C`` runs) in a temporary
  directory. The auth_file carries the pgbench user's secret so the pooler can log in to the
  server with it, like a production deployment would.
* PostgreSQL and PgBouncer refuse to run as root: when we are root they run as the ``postgres``
  OS user (``subprocess``'s ``user=``/``group=``, no helper binary), in directories it owns.
* Before its first measured run each target gets a short select-only run that is not
  reported: the first run after a pause measured ~2 µs per transaction more pooler CPU,
  whichever target came first (cold caches, the pool's servers still opening).
* pgherd is ready when its master sends ``READY=1`` to the NOTIFY_SOCKET we bind (it does so
  once all workers serve); PgBouncer when its port accepts connections.
* ``pgherd-split`` (on request: ``--targets``) is the baseline for what sharing costs: as
  many independent one-worker pgherd services as ``--workers``, on one port (SO_REUSEPORT
  spreads the clients), each with its share of the pool size — per-worker pools, as separate
  poolers would have. Its CPU and RSS are those of all of them (one launcher process runs them).
* Pooler CPU per transaction is the user+system CPU time of the pooler's process tree (master,
  workers, and anything they reaped) between just before and just after pgbench, divided by
  pgbench's transaction count. Peak RSS is sampled a few times per second during the run.
* tps is pgbench's "without initial connection time" figure; with ``-C`` the one that includes
  the connections (each transaction pays for one). p99 latency is computed from pgbench's
  per-transaction logs (nearest-rank), which are deleted afterwards.
* The exit status is 1 when any run had failed transactions or a pgbench error, or a target
  could not start or did not stop cleanly; the table is printed regardless. Ctrl-C, SIGTERM
  and SIGHUP stop everything that was started and exit 130, after the partial table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec
import psutil

from .config import load_config
from .pgtools import find_pgbouncer, pg_bindir, pg_tool

TARGETS = ("direct", "pgherd", "pgbouncer", "pgherd-split")
DEFAULT_TARGETS = TARGETS[:3]  # pgherd-split only when asked for
READY_TIMEOUT = 30.0  # seconds a pooler may take to start serving
STOP_TIMEOUT = 20.0  # seconds a pooler may take to exit once signalled
SCRATCH_PREFIX = "pgherd-bench-"  # /tmp/<prefix>XXXX: short, for unix socket paths
RSS_INTERVAL = 0.25  # seconds between RSS samples: often enough for a peak, cheap enough
WARMUP_SECONDS = 2  # an unmeasured select-only run per target before its first measured one
MIB = 1024 * 1024


class BenchError(Exception):
    """A problem that stops the whole benchmark (no database, no pgbench...)."""


class TargetStartError(BenchError):
    """A target did not become ready; the message carries its log."""


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


class BenchOptions(msgspec.Struct, frozen=True):
    """What the command line asked for. ``None`` means "resolve it" (config or default)."""

    workloads: tuple[str, ...] = ("tpcb-like",)
    protocols: tuple[str, ...] = ("simple",)
    clients: int = 32
    jobs: int = 2
    duration: int = 10
    scale: int = 10
    init: bool = False
    connect: bool = False
    workers: int = 2
    pool_size: int | None = None
    pool_mode: str | None = None
    targets: tuple[str, ...] | None = None
    json_path: str | None = None


class Endpoint(msgspec.Struct, frozen=True):
    """Where a client connects: host (name, address or socket directory), port, user, db."""

    host: str
    port: int
    user: str
    dbname: str

    def libpq_args(self) -> list[str]:
        """pgbench/psql connection arguments."""
        return ["-h", self.host, "-p", str(self.port), "-U", self.user, self.dbname]


class PoolSettings(msgspec.Struct, frozen=True):
    """The pool settings both poolers get."""

    pool_size: int
    pool_mode: str
    max_client_conn: int
    workers: int


class Database(msgspec.Struct, frozen=True):
    """The benchmarked database as resolved from --throwaway/--dsn/--config."""

    source: str  # "throwaway", "dsn" or "config <path>"
    endpoint: Endpoint
    password: str | None = None  # plain text, for pgbench/psql connecting directly
    secret: str = ""  # the auth_file secret the poolers log in to the server with
    pool_size: int | None = None  # the config's, when --config
    pool_mode: str | None = None


class PgbenchSummary(msgspec.Struct, frozen=True):
    """The numbers pgbench prints at the end of a run."""

    transactions: int
    failed: int
    tps: float
    tps_includes_connections: bool
    latency_avg_ms: float | None = None
    scaling_factor: int | None = None


class RunResult(msgspec.Struct):
    """One pgbench run against one target."""

    target: str
    workload: str
    protocol: str
    clients: int
    jobs: int
    duration: int
    connect: bool
    exit_code: int
    tps: float | None = None
    tps_includes_connections: bool = False
    transactions: int | None = None
    failed: int | None = None
    latency_avg_ms: float | None = None
    latency_p99_ms: float | None = None
    scaling_factor: int | None = None
    pooler_cpu_seconds: float | None = None
    pooler_cpu_us_per_xact: float | None = None
    pooler_rss_mib: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """No pgbench error and no failed transaction."""
        return self.error is None and not self.failed


class Machine(msgspec.Struct, frozen=True):
    """The host the numbers come from."""

    cpu_count: int | None
    cpus_usable: int
    cpu_model: str | None
    memory_mib: int
    load_average: tuple[float, float, float]  # at the start: other load skews everything
    platform: str
    python: str


class Versions(msgspec.Struct):
    """Versions of everything involved (None = not available)."""

    pgherd: str
    pgbench: str | None = None
    postgresql: str | None = None
    pgbouncer: str | None = None


class BenchReport(msgspec.Struct):
    """Everything written to the JSON file."""

    started_at: str
    finished_at: str
    source: str
    database: Endpoint
    options: BenchOptions
    pool: PoolSettings
    targets: tuple[str, ...]
    machine: Machine
    versions: Versions
    runs: list[RunResult]
    skipped: list[str]
    errors: list[str]


# --------------------------------------------------------------------------------------
# pure functions: parsing pgbench, percentiles, tables
# --------------------------------------------------------------------------------------

_TPS_RE = re.compile(r"^tps = ([0-9.]+) \(([^)]*)\)", re.M)
_XACTS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
_LATENCY_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_SCALE_RE = re.compile(r"^scaling factor: (\d+)", re.M)
# pgbench 14+ prints one tps line; older ones print both "including" and "excluding".
_TPS_STEADY = ("without initial connection time", "excluding connections establishing")
_TPS_CONNECT = ("including reconnection times", "including connections establishing")


def parse_pgbench_output(text: str, connect: bool) -> PgbenchSummary:
    """Parse the summary pgbench prints on stdout; ValueError when there is none.

    ``connect`` (a ``-C`` run) picks the tps figure that includes connection time, since
    every transaction opens a connection; otherwise the steady-state figure.
    """
    tps_lines = {label: float(value) for value, label in _TPS_RE.findall(text)}
    xacts = _XACTS_RE.search(text)
    if not tps_lines or xacts is None:
        raise ValueError("no pgbench summary (tps and transaction count) in the output")
    preferred = _TPS_CONNECT if connect else _TPS_STEADY
    label = next((p for p in preferred if p in tps_lines), next(iter(tps_lines)))
    failed = _FAILED_RE.search(text)  # pgbench < 15 has no such line: nothing could fail
    latency = _LATENCY_RE.search(text)
    scale = _SCALE_RE.search(text)
    return PgbenchSummary(
        transactions=int(xacts.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        tps=tps_lines[label],
        tps_includes_connections=label.startswith("including"),
        latency_avg_ms=float(latency.group(1)) if latency else None,
        scaling_factor=int(scale.group(1)) if scale else None,
    )


def pgbench_errors(stderr: str) -> list[str]:
    """pgbench's ``error:`` lines (client aborts, connection failures), in order."""
    return [line.split("error: ", 1)[1] for line in stderr.splitlines() if "error: " in line]


def parse_log_line(line: str) -> int | None:
    """Latency in microseconds of one ``-l`` log line, None for a failed/skipped one.

    Format: ``client_id transaction_no time script_no time_epoch time_us [...]`` where
    ``time`` is the latency in µs, or ``failed``/``skipped``.
    """
    fields = line.split()
    if len(fields) < 3 or not fields[2].isdigit():
        return None
    return int(fields[2])


def read_latencies(paths: Iterable[Path]) -> list[int]:
    """Every transaction latency (µs) found in pgbench ``-l`` log files."""
    latencies: list[int] = []
    for path in paths:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                value = parse_log_line(line)
                if value is not None:
                    latencies.append(value)
    return latencies


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (``fraction`` in (0, 1]); None for no values.

    Nearest-rank returns a latency some transaction really had, which is what p99 means in a
    latency report, rather than an interpolation between two of them.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _fmt(value: float | int | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_mode(run: RunResult) -> str:
    """The table's mode column: the workload, plus ``-C`` when connecting per transaction."""
    return run.workload + (" -C" if run.connect else "")


TABLE_COLUMNS = ("target", "mode", "protocol", "clients", "tps", "lat avg ms", "lat p99 ms",
                 "failed", "pooler CPU µs/xact", "pooler RSS MiB")


def render_table(runs: Sequence[RunResult]) -> str:
    """One aligned text table, a row per run (text columns left, numbers right)."""
    rows = [TABLE_COLUMNS] + [
        (
            run.target + ("" if run.error is None else " (error)"),
            run_mode(run),
            run.protocol,
            str(run.clients),
            _fmt(run.tps, 0),
            _fmt(run.latency_avg_ms, 3),
            _fmt(run.latency_p99_ms, 3),
            "-" if run.failed is None else str(run.failed),
            _fmt(run.pooler_cpu_us_per_xact, 1),
            _fmt(run.pooler_rss_mib, 1),
        )
        for run in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    text_columns = 3  # target, mode, protocol

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if i < text_columns else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule] + [line(r) for r in rows[1:]])


def ratio_lines(runs: Sequence[RunResult]) -> list[str]:
    """pgherd's tps and CPU-per-transaction ratios to PgBouncer's and to pgherd-split's (what
    sharing pools across workers costs), one line per mode and protocol where both ran
    without error."""
    by_key = {(r.target, run_mode(r), r.protocol): r for r in runs if r.error is None}
    lines = []
    for run in runs:
        if run.target != "pgherd" or run.error is not None:
            continue
        for target, label in (("pgbouncer", "pgherd/PgBouncer"),
                              ("pgherd-split", "pgherd/pgherd-split")):
            other = by_key.get((target, run_mode(run), run.protocol))
            if other is None:
                continue
            parts = []
            if run.tps and other.tps:
                parts.append(f"tps {run.tps / other.tps:.2f}x")
            ours, theirs = run.pooler_cpu_us_per_xact, other.pooler_cpu_us_per_xact
            if ours and theirs:
                parts.append(f"CPU/xact {ours / theirs:.2f}x")
            if parts:
                lines.append(f"{label} ({run_mode(run)}, {run.protocol}): " + ", ".join(parts))
    return lines


def parse_targets(text: str) -> tuple[str, ...]:
    """``direct,pgherd`` -> ("direct", "pgherd"); ValueError naming an unknown target."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown target {', '.join(unknown) or '(none)'}: "
                         f"choose from {','.join(TARGETS)}")
    return names


_KEYWORD_RE = re.compile(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def parse_dsn(dsn: str) -> tuple[Endpoint, str | None]:
    """A libpq URL or ``key=value`` string -> (Endpoint, password or None).

    Missing parts default to 127.0.0.1, 5432, user postgres and dbname = user: a socket
    directory default would be wrong for the poolers, which resolve it against their own
    unix_socket_dir.
    """
    params: dict[str, str] = {}
    if dsn.startswith(("postgresql://", "postgres://")):
        url = urlsplit(dsn)
        if url.hostname:
            params["host"] = unquote(url.hostname)
        if url.port:
            params["port"] = str(url.port)
        if url.username:
            params["user"] = unquote(url.username)
        if url.password is not None:
            params["password"] = unquote(url.password)
        if url.path.strip("/"):
            params["dbname"] = unquote(url.path.lstrip("/"))
        params.update({k: v[-1] for k, v in parse_qs(url.query).items()})
    else:
        for key, value in _KEYWORD_RE.findall(dsn):
            if value.startswith("'"):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[key] = value
    user = params.get("user", "postgres")
    endpoint = Endpoint(
        host=params.get("host", "127.0.0.1").split(",")[0],
        port=int(params.get("port", "5432").split(",")[0]),
        user=user,
        dbname=params.get("dbname", user),
    )
    return endpoint, params.get("password")


def render_ini(database: Endpoint, settings: dict[str, Any]) -> str:
    """A pgbouncer.ini with ``database`` as the only [databases] entry (under its own name,
    so clients use the same dbname as directly) and ``settings`` in [pgbouncer]."""
    name = database.dbname
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        name = '"' + name.replace('"', '""') + '"'
    values = {"host": database.host, "port": database.port, "dbname": database.dbname}
    connstr = " ".join(f"{k}={_connstr_value(str(v))}" for k, v in values.items())
    lines = ["[databases]", f"{name} = {connstr}", "", "[pgbouncer]"]
    lines += [f"{k} = {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def _connstr_value(value: str) -> str:
    if value and re.fullmatch(r"[^\s'\\]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def userlist_line(user: str, secret: str) -> str:
    """One auth_file line, ``"user" "secret"`` with ``""`` for a quote."""
    def q(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'
    return f"{q(user)} {q(secret)}\n"


# --------------------------------------------------------------------------------------
# processes and binaries
# --------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on: the kernel's pick for port 0 (an
    ephemeral port, so it cannot collide with fixed-range ports tests hand out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres_kwargs() -> dict[str, Any]:
    """Popen arguments that run a command as the ``postgres`` OS user when we are root
    (PostgreSQL and PgBouncer refuse root); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise BenchError("running as root needs a 'postgres' OS user to run "
                         "PostgreSQL/PgBouncer as") from None
    return {"user": pw.pw_uid, "group": pw.pw_gid,
            "extra_groups": os.getgrouplist("postgres", pw.pw_gid)}


def give_to_postgres(path: Path) -> None:
    """chown ``path`` to the user PostgreSQL/PgBouncer will run as (when we are root)."""
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def clean_env(**extra: str | None) -> dict[str, str]:
    """Our environment without PG* variables (a stray PGDATABASE or PGOPTIONS would change
    what pgbench measures), plus ``extra`` (None values skipped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def pgherd_command() -> list[str]:
    """``pgherd`` next to our interpreter (the venv's console script), else ``-m``."""
    script = Path(sys.executable).parent / "pgherd"  # not resolved: keep the venv
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "prefork.cli"]


def command_version(argv: list[str]) -> str | None:
    """First line of ``argv``'s output (``pgbench --version``), None if it cannot run."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except OSError:
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def tail(path: Path, max_chars: int = 4000) -> str:
    """The last whole lines of a log file within ``max_chars`` ('' if missing), for
    failure messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    if len(text) <= max_chars:
        return text
    return "[...]\n" + text[-max_chars:].split("\n", 1)[-1]


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and its live descendants."""
    try:
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(root: psutil.Process) -> float:
    """User+system CPU seconds of ``root``'s process tree, including descendants already
    reaped (counted in their parent's children_* times), so a worker respawned during the
    run is not lost."""
    total = 0.0
    for proc in process_tree(root):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_rss(root: psutil.Process) -> int:
    """Resident memory of ``root``'s process tree in bytes (shared pages counted in every
    process, as a per-process RSS sum does; fork()ed workers share a lot, so this is an
    upper bound)."""
    total = 0
    for proc in process_tree(root):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


class PoolerMeter:
    """CPU time and peak RSS of a pooler's process tree around one pgbench run.

    ``with PoolerMeter(root) as m: run()`` then ``m.cpu_seconds``, ``m.peak_rss``. RSS is
    sampled by a thread every RSS_INTERVAL seconds; CPU times are read once on each side.
    """

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.cpu_seconds = 0.0
        self.peak_rss = 0
        self._cpu_before = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="pooler-rss", daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, tree_rss(self.root))
            if self._done.wait(RSS_INTERVAL):
                return

    def __enter__(self) -> PoolerMeter:
        self._cpu_before = tree_cpu_seconds(self.root)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_seconds = tree_cpu_seconds(self.root) - self._cpu_before
        self._done.set()
        self._thread.join()


def wait_port(host: str, port: int, proc: subprocess.Popen, deadline: float) -> bool:
    """Poll until ``host:port`` accepts a TCP connection; False if ``proc`` exits first or
    the deadline passes."""
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------------
# the database
# --------------------------------------------------------------------------------------


class ThrowawayCluster:
    """A temporary PostgreSQL cluster tuned for benchmarking, not durability.

    initdb -A trust in ``workdir`` (owned by postgres), fsync and synchronous_commit off,
    max_connections=400 (direct runs with many clients plus both poolers' pools), listening
    on 127.0.0.1:<free port> with its socket in its own directory.
    """

    def __init__(self, bindir: Path, workdir: Path) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.log_path = workdir / "postgresql.log"
        self.port = free_port()

    def _run(self, argv: list[str | Path]) -> None:
        proc = subprocess.run([str(a) for a in argv], cwd=self.workdir, env=clean_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120, **as_postgres_kwargs())
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(map(str, argv))} failed (exit {proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}{tail(self.log_path)}")

    def start(self) -> Endpoint:
        """initdb, configure, start; return the superuser endpoint (db ``postgres``)."""
        self.workdir.mkdir()
        give_to_postgres(self.workdir)
        self._run([self.bindir / "initdb", "-D", self.datadir, "-A", "trust", "-U", "postgres",
                   "--nosync", "-E", "UTF8", "--no-locale"])
        conf = {
            "port": self.port,
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.workdir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": 400,
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# pgherd bench\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))
        self._run([self.bindir / "pg_ctl", "-D", self.datadir, "-l", self.log_path,
                   "-w", "-t", "60", "start"])
        return Endpoint(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")

    def stop(self) -> None:
        """Stop at once (the data is thrown away with the directory), if it runs at all:
        the pid file also covers a start that was interrupted."""
        if (self.datadir / "postmaster.pid").exists():
            self._run([self.bindir / "pg_ctl", "-D", self.datadir, "-m", "immediate", "-w",
                       "stop"])


def database_from_dsn(dsn: str) -> Database:
    """The database of ``--dsn``; its password serves both pgbench and the poolers."""
    try:
        endpoint, password = parse_dsn(dsn)
    except ValueError as exc:  # a port that is not a number
        raise BenchError(f"--dsn {dsn!r}: {exc}") from None
    return Database(source="dsn", endpoint=endpoint, password=password, secret=password or "")


def database_from_config(path: str) -> Database:
    """The first non-``*`` [databases] entry of a pgherd/PgBouncer ini, its pool settings
    and its user: the entry's forced user, else the auth_file's first user, else postgres.
    A plain-text secret (not md5/SCRAM) doubles as the password for direct connections."""
    cfg = load_config(path)
    entry = next((db for name, db in cfg.databases.items() if name != "*"), None)
    if entry is None:
        raise BenchError(f"{path}: no [databases] entry other than '*'")
    user = entry.user or next(iter(cfg.userlist), "postgres")
    secret = entry.password or cfg.userlist.get(user, "")
    hashed = secret.startswith("md5") and len(secret) == 35 or secret.startswith("SCRAM-")
    endpoint = Endpoint(
        host=entry.host[0] if entry.host else cfg.settings.unix_socket_dir,
        port=entry.port,
        user=user,
        dbname=entry.dbname or entry.name,
    )
    cfg_user = cfg.users.get(user)
    return Database(
        source=f"config {path}",
        endpoint=endpoint,
        password=None if hashed or not secret else secret,
        secret=secret,
        pool_size=(cfg_user and cfg_user.pool_size) or entry.pool_size
        or cfg.settings.default_pool_size,
        pool_mode=(cfg_user and cfg_user.pool_mode) or entry.pool_mode or cfg.settings.pool_mode,
    )


class Psql:
    """psql against the database directly: the few queries bench needs."""

    def __init__(self, psql: str, database: Database) -> None:
        self.psql = psql
        self.database = database

    def value(self, query: str) -> str:
        """The single value ``query`` returns, as text."""
        argv = [self.psql, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", query,
                *self.database.endpoint.libpq_args()]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL,
                              env=clean_env(PGPASSWORD=self.database.password,
                                            PGCONNECT_TIMEOUT="10"))
        if proc.returncode != 0:
            raise BenchError(f"psql {query!r} failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def has_pgbench_tables(self) -> bool:
        """True when all four pgbench tables exist (visible on the search path)."""
        return self.value(
            "SELECT count(*) FROM pg_class WHERE relkind IN ('r', 'p') AND "
            "pg_table_is_visible(oid) AND relname IN "
            "('pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history')"
        ) == "4"


def pgbench_init(pgbench: str, database: Database, scale: int) -> None:
    """``pgbench -i -s scale`` directly against the database."""
    proc = subprocess.run(
        [pgbench, "-i", "-q", "-s", str(scale), *database.endpoint.libpq_args()],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=3600,
        env=clean_env(PGPASSWORD=database.password),
    )
    if proc.returncode != 0:
        raise BenchError(f"pgbench -i failed (exit {proc.returncode}):\n{proc.stderr}")


# --------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------


class Target:
    """What pgbench runs against. The base class is PostgreSQL itself (nothing to start)."""

    name = "direct"

    def __init__(self, database: Database) -> None:
        self.database = database
        self.endpoint = database.endpoint
        self.password = database.password

    def start(self) -> None:
        """Make ``endpoint`` serve (raise TargetStartError otherwise)."""

    def stop(self) -> list[str]:
        """Stop; return problems (processes that would not exit...)."""
        return []

    def root_process(self) -> psutil.Process | None:
        """The process whose tree is the pooler, for CPU/RSS accounting (None: no pooler)."""
        return None


class PoolerTarget(Target):
    """A pooler process (tree) in front of the database, with its own config and files in
    ``workdir``; subclasses say how to start it and when it is ready."""

    stop_signal = signal.SIGTERM

    def __init__(self, database: Database, workdir: Path, pool: PoolSettings) -> None:
        super().__init__(database)
        self.workdir = workdir
        self.pool = pool
        self.port = free_port()
        self.endpoint = Endpoint(host="127.0.0.1", port=self.port,
                                 user=database.endpoint.user, dbname=database.endpoint.dbname)
        self.password = None  # auth_type trust between pgbench and the pooler
        self.ini_path = workdir / f"{self.name}.ini"
        self.log_path = workdir / f"{self.name}.log"
        self.output_path = workdir / f"{self.name}.out"
        self.proc: subprocess.Popen | None = None
        self._seen: dict[int, psutil.Process] = {}  # every process of the tree ever seen

    def settings(self) -> dict[str, Any]:
        """[pgbouncer] settings common to both poolers."""
        return {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": str(self.workdir),
            "auth_type": "trust",
            "auth_file": str(self.workdir / "userlist.txt"),
            "pool_mode": self.pool.pool_mode,
            "default_pool_size": self.pool.pool_size,
            "max_client_conn": self.pool.max_client_conn,
            "logfile": str(self.log_path),
            "log_connections": 0,
            "log_disconnections": 0,
        }

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict[str, Any]:
        """Extra Popen arguments (user switching, environment)."""
        return {"env": clean_env()}

    def wait_ready(self, deadline: float) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create ``workdir`` and write the config and auth_file."""
        self.workdir.mkdir()
        self.ini_path.write_text(render_ini(self.database.endpoint, self.settings()))
        (self.workdir / "userlist.txt").write_text(
            userlist_line(self.database.endpoint.user, self.database.secret))

    def start(self) -> None:
        """Write the files, spawn the pooler in its own session, wait until it serves."""
        self.prepare()
        try:
            with open(self.output_path, "ab") as out:
                self.proc = subprocess.Popen(self.command(), cwd=self.workdir,
                                             stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             **self.popen_kwargs())
        except OSError as exc:
            raise TargetStartError(f"{self.name}: cannot run {self.command()[0]}: {exc}") from None
        self._remember()
        if not self.wait_ready(time.monotonic() + READY_TIMEOUT):
            why = (f"exited with code {self.proc.returncode}" if self.proc.poll() is not None
                   else f"not ready within {READY_TIMEOUT:.0f}s")
            self._kill_all()
            raise TargetStartError(
                f"{self.name} {why}: {' '.join(self.command())}\n"
                f"--- {self.output_path} ---\n{tail(self.output_path)}\n"
                f"--- {self.log_path} ---\n{tail(self.log_path)}")
        self._remember()

    def root_process(self) -> psutil.Process | None:
        if self.proc is None:
            return None
        try:
            return psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return None

    def _remember(self) -> None:
        root = self.root_process()
        for proc in process_tree(root) if root else []:
            self._seen.setdefault(proc.pid, proc)

    def _leftovers(self) -> list[psutil.Process]:
        """Live processes of the pooler: every one seen in its tree, plus anything still in
        its process group (a pooler under runuser orphaned before we saw it; pgherd's workers
        have sessions of their own but die with their master, PR_SET_PDEATHSIG)."""
        candidates = dict(self._seen)
        if self.proc is not None:
            for proc in psutil.process_iter():
                with contextlib.suppress(OSError, psutil.Error):
                    if os.getpgid(proc.pid) == self.proc.pid:
                        candidates.setdefault(proc.pid, proc)
        alive = []
        for proc in candidates.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    def _kill_all(self) -> None:
        """SIGKILL the whole tree: its process group (we started it as a session leader)
        and every process ever seen; pgherd's workers die with their master."""
        self._remember()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for proc in self._leftovers():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self) -> list[str]:
        """Signal the pooler, wait for it and its children; kill and report leftovers."""
        if self.proc is None:
            return []
        problems: list[str] = []
        self._remember()
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.name} (pid {self.proc.pid}) still running "
                                f"{STOP_TIMEOUT:.0f}s after {self.stop_signal.name}: killed")
        else:
            problems.append(f"{self.name} had exited by itself with code "
                            f"{self.proc.returncode}:\n{tail(self.log_path)}")
        deadline = time.monotonic() + 5
        while self._leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = self._leftovers()
        if leftovers:
            problems.append(f"{self.name} left processes running after it exited: "
                            + ", ".join(f"pid {p.pid}" for p in leftovers) + " (killed)")
        self._kill_all()
        return problems


class PgherdTarget(PoolerTarget):
    """pgherd: ``pgherd run -q ini`` with ``workers``; ready on sd_notify ``READY=1``."""

    name = "pgherd"

    #: services that each send READY=1 once they serve
    instances = 1

    def __init__(self, database: Database, workdir: Path, pool: PoolSettings) -> None:
        super().__init__(database, workdir, pool)
        self.notify_path = workdir / "notify.sock"
        self._notify: socket.socket | None = None

    def settings(self) -> dict[str, Any]:
        # Run by root (make demo), the benchmarked pgherd stays root, as it was asked to.
        root = {"allow_root": 1} if os.geteuid() == 0 else {}
        return {**super().settings(), "workers": self.pool.workers, **root}

    def command(self) -> list[str]:
        # -q: the logfile has everything; stderr (our .out file) keeps only crashes
        return [*pgherd_command(), "run", "-q", str(self.ini_path)]

    def popen_kwargs(self) -> dict[str, Any]:
        return {"env": clean_env(NOTIFY_SOCKET=str(self.notify_path))}

    def prepare(self) -> None:
        super().prepare()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self.notify_path))

    def wait_ready(self, deadline: float) -> bool:
        assert self._notify is not None and self.proc is not None
        self._notify.settimeout(0.1)  # short, to notice pgherd exiting early
        ready = 0
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(socket.timeout):
                    lines = self._notify.recv(65536).decode(errors="replace").split("\n")
                    ready += lines.count("READY=1")
                    if ready >= self.instances:
                        return True
            return False
        finally:
            self._notify.close()  # later notifications (STOPPING=1) are dropped


#: Runs one ``pgherd run -q INI`` per ini and relays SIGTERM/SIGINT to them all:
#: ``python -c SPLIT_LAUNCHER <pgherd command...> -- <ini>...``
SPLIT_LAUNCHER = """
import signal, subprocess, sys
sep = sys.argv.index("--")
procs = [subprocess.Popen(sys.argv[1:sep] + ["run", "-q", ini]) for ini in sys.argv[sep + 1:]]
def relay(signum, frame):
    for proc in procs:
        proc.send_signal(signum)
signal.signal(signal.SIGTERM, relay)
signal.signal(signal.SIGINT, relay)
sys.exit(max(proc.wait() for proc in procs))
"""


class SplitPgherdTarget(PgherdTarget):
    """Per-worker pools: ``workers`` one-worker pgherd services sharing the port, each with
    ``ceil(pool_size / workers)`` servers — what pgherd's shared pools are measured against."""

    name = "pgherd-split"

    def __init__(self, database: Database, workdir: Path, pool: PoolSettings) -> None:
        super().__init__(database, workdir, pool)
        self.instances = pool.workers
        self.ini_paths = [workdir / f"{self.name}-{i}.ini" for i in range(self.instances)]

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "workers": 1, "so_reuseport": 1,
                "default_pool_size": math.ceil(self.pool.pool_size / self.instances)}

    def command(self) -> list[str]:
        return [sys.executable, "-c", SPLIT_LAUNCHER, *pgherd_command(), "--",
                *map(str, self.ini_paths)]

    def prepare(self) -> None:
        super().prepare()
        for i, path in enumerate(self.ini_paths):
            sockets = self.workdir / f"s{i}"  # each service its own unix socket and log
            sockets.mkdir()
            path.write_text(render_ini(self.database.endpoint, {
                **self.settings(), "unix_socket_dir": str(sockets),
                "logfile": str(self.workdir / f"{self.name}-{i}.log")}))


class PgbouncerTarget(PoolerTarget):
    """PgBouncer: one process (as postgres when we are root); ready when its port accepts."""

    name = "pgbouncer"

    def __init__(self, binary: str, database: Database, workdir: Path,
                 pool: PoolSettings) -> None:
        super().__init__(database, workdir, pool)
        self.binary = binary

    def command(self) -> list[str]:
        return [self.binary, "-q", str(self.ini_path)]

    def popen_kwargs(self) -> dict[str, Any]:
        return {"env": clean_env(), **as_postgres_kwargs()}

    def prepare(self) -> None:
        super().prepare()
        for path in (self.workdir, self.ini_path, self.workdir / "userlist.txt"):
            give_to_postgres(path)

    def wait_ready(self, deadline: float) -> bool:
        assert self.proc is not None
        return wait_port("127.0.0.1", self.port, self.proc, deadline)


# --------------------------------------------------------------------------------------
# running pgbench
# --------------------------------------------------------------------------------------


class RunSpec(msgspec.Struct, frozen=True):
    """One cell of the matrix."""

    workload: str
    protocol: str
    clients: int
    jobs: int
    duration: int
    connect: bool


def pgbench_argv(pgbench: str, spec: RunSpec, endpoint: Endpoint, log_prefix: Path) -> list[str]:
    """The pgbench command line of one run (no vacuum: it would need the tables' owner and
    differs per target)."""
    argv = [pgbench, "-n", "-c", str(spec.clients), "-j", str(spec.jobs),
            "-T", str(spec.duration), "-M", spec.protocol]
    if spec.workload == "select-only":
        argv.append("-S")
    if spec.connect:
        argv.append("-C")
    argv += ["-l", "--log-prefix", str(log_prefix)]
    return argv + endpoint.libpq_args()


def run_pgbench(pgbench: str, target: Target, spec: RunSpec, scratch: Path) -> RunResult:
    """Run pgbench once against ``target``, measuring the pooler around it. A pgbench that
    fails is reported in the result (``error``), never raised."""
    result = RunResult(target=target.name, workload=spec.workload, protocol=spec.protocol,
                       clients=spec.clients, jobs=spec.jobs, duration=spec.duration,
                       connect=spec.connect, exit_code=0)
    root = target.root_process()
    meter = PoolerMeter(root) if root is not None else None
    timeout = 2 * spec.duration + 120  # pgbench stops itself after -T; this catches hangs
    logdir = Path(tempfile.mkdtemp(prefix="pgbench-log-", dir=scratch))
    try:
        with meter if meter is not None else contextlib.nullcontext():
            proc = subprocess.run(pgbench_argv(pgbench, spec, target.endpoint, logdir / "x"),
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  env=clean_env(PGPASSWORD=target.password), timeout=timeout)
        latencies = read_latencies(sorted(logdir.iterdir()))
    except subprocess.TimeoutExpired:
        result.exit_code = -1
        result.error = f"pgbench did not finish within {timeout}s (killed)"
        return result
    finally:
        shutil.rmtree(logdir, ignore_errors=True)

    result.exit_code = proc.returncode
    if proc.returncode != 0:
        errors = pgbench_errors(proc.stderr)
        result.error = f"pgbench exit code {proc.returncode}: " + (
            "; ".join(errors[:5]) or proc.stderr.strip()[-500:])
    try:
        summary = parse_pgbench_output(proc.stdout, spec.connect)
    except ValueError as exc:
        result.error = result.error or f"{exc}: {proc.stderr.strip()[-500:]}"
        return result
    p99 = percentile(latencies, 0.99)
    result.tps = summary.tps
    result.tps_includes_connections = summary.tps_includes_connections
    result.transactions = summary.transactions
    result.failed = summary.failed
    result.latency_avg_ms = summary.latency_avg_ms
    result.latency_p99_ms = None if p99 is None else p99 / 1000
    result.scaling_factor = summary.scaling_factor
    if meter is not None:
        result.pooler_cpu_seconds = round(meter.cpu_seconds, 3)
        result.pooler_rss_mib = round(meter.peak_rss / MIB, 1)
        if summary.transactions:
            result.pooler_cpu_us_per_xact = round(meter.cpu_seconds * 1e6 / summary.transactions, 2)
    return result


# --------------------------------------------------------------------------------------
# the whole benchmark
# --------------------------------------------------------------------------------------


def machine_info() -> Machine:
    """CPU, memory and OS of this host."""
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return Machine(
        cpu_count=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)),
        cpu_model=model,
        memory_mib=psutil.virtual_memory().total // MIB,
        load_average=os.getloadavg(),
        platform=platform.platform(),
        python=platform.python_version(),
    )


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def default_json_path(now: dt.datetime) -> Path:
    """``bench-results/bench-<UTC timestamp>.json`` under the working directory."""
    return Path("bench-results") / f"bench-{now.strftime('%Y%m%dT%H%M%SZ')}.json"


def say(message: str) -> None:
    """Progress on stderr, so stdout carries only the table."""
    print(message, file=sys.stderr, flush=True)


class Bench:
    """One ``pgherd bench`` invocation: owns the scratch directory, the throwaway cluster
    and the targets, and guarantees they are all gone when `run` returns."""

    def __init__(self, options: BenchOptions, throwaway: bool, dsn: str | None,
                 config_path: str | None) -> None:
        self.options = options
        self.throwaway = throwaway
        self.dsn = dsn
        self.config_path = config_path
        self.started = utc_now()
        self.machine = machine_info()  # now, so the load average is not our own
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.runs: list[RunResult] = []
        self.targets: list[Target] = []  # started or starting: each is stopped at the end
        self.versions = Versions(pgherd=package_version("pgherd"))

    def run(self) -> int:
        """Run the matrix, print the table, write the JSON; return the exit status."""
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir="/tmp"))
        os.chmod(scratch, 0o755)  # the postgres user must reach its subdirectories
        cluster: ThrowawayCluster | None = None
        database: Database | None = None
        pool: PoolSettings | None = None
        interrupted = False
        try:
            bindir = pg_bindir()
            if self.throwaway:
                if bindir is None:
                    raise BenchError("--throwaway needs PostgreSQL's initdb/pg_ctl: not found")
                cluster = ThrowawayCluster(bindir, scratch / "pg")
                say(f"starting a throwaway PostgreSQL on 127.0.0.1:{cluster.port}")
                database = Database(source="throwaway", endpoint=cluster.start())
            elif self.dsn is not None:
                database = database_from_dsn(self.dsn)
            else:
                assert self.config_path is not None
                database = database_from_config(self.config_path)
            pgbench = pg_tool("pgbench", bindir)
            psql = pg_tool("psql", bindir)
            if pgbench is None or psql is None:
                raise BenchError("pgbench and psql are needed: install the PostgreSQL client")
            self.versions.pgbench = command_version([pgbench, "--version"])
            self._prepare_tables(pgbench, Psql(psql, database))
            pool = self._pool_settings(database)
            self._start(self._make_targets(database, scratch, pool))
            self._run_matrix(pgbench, scratch)
        except BenchError as exc:
            self._error(str(exc))
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGHUP (see main)
            interrupted = True
            self._error("interrupted")
        finally:
            for target in reversed(self.targets):
                for problem in target.stop():
                    self._error(problem)
            if cluster is not None:
                try:
                    cluster.stop()
                except BenchError as exc:
                    self._error(str(exc))
            shutil.rmtree(scratch, ignore_errors=True)
        self._report(database, pool)
        if interrupted:
            return 130
        return 1 if self.errors or any(not r.ok for r in self.runs) else 0

    def _error(self, message: str) -> None:
        self.errors.append(message)
        say(f"ERROR {message}")

    def _prepare_tables(self, pgbench: str, psql: Psql) -> None:
        self.versions.postgresql = psql.value("SHOW server_version")
        if self.options.init or not psql.has_pgbench_tables():
            say(f"pgbench -i -s {self.options.scale}")
            pgbench_init(pgbench, psql.database, self.options.scale)

    def _pool_settings(self, database: Database) -> PoolSettings:
        o = self.options
        return PoolSettings(
            pool_size=o.pool_size or database.pool_size or 20,
            pool_mode=o.pool_mode or database.pool_mode or "transaction",
            # room for every pgbench client plus a few (-C clients reconnect constantly)
            max_client_conn=max(100, o.clients + 20),
            workers=o.workers,
        )

    def _make_targets(self, database: Database, scratch: Path, pool: PoolSettings) -> list[Target]:
        wanted = self.options.targets or DEFAULT_TARGETS
        targets: list[Target] = []
        if "direct" in wanted:
            targets.append(Target(database))
        if "pgherd" in wanted:
            targets.append(PgherdTarget(database, scratch / "pgherd", pool))
        if "pgbouncer" in wanted:
            binary = find_pgbouncer()
            if binary is None:
                self.skipped.append("pgbouncer: not installed")
                say("PgBouncer not installed: skipped")
            else:
                self.versions.pgbouncer = command_version([binary, "--version"])
                targets.append(PgbouncerTarget(binary, database, scratch / "pgbouncer", pool))
        if "pgherd-split" in wanted:
            targets.append(SplitPgherdTarget(database, scratch / "pgherd-split", pool))
        return targets

    def _start(self, targets: list[Target]) -> None:
        """Start every target into ``self.targets``; one that fails is reported and left out.
        Each is listed before it starts, so an interrupted start is still stopped."""
        for target in targets:
            if isinstance(target, PoolerTarget):
                say(f"starting {target.name} on 127.0.0.1:{target.port}")
            self.targets.append(target)
            try:
                target.start()
            except TargetStartError as exc:
                self.targets.remove(target)  # start() killed what it had started
                self._error(str(exc))

    def _run_matrix(self, pgbench: str, scratch: Path) -> None:
        o = self.options
        warmup = RunSpec(workload="select-only", protocol="simple", clients=o.clients,
                         jobs=o.jobs, duration=min(WARMUP_SECONDS, o.duration), connect=False)
        for target in self.targets:
            say(f"{target.name}: warm-up, {warmup.duration}s (not reported)")
            run_pgbench(pgbench, target, warmup, scratch)  # a failure shows in the real runs
        for workload in o.workloads:
            for protocol in o.protocols:
                spec = RunSpec(workload=workload, protocol=protocol, clients=o.clients,
                               jobs=o.jobs, duration=o.duration, connect=o.connect)
                for target in self.targets:
                    say(f"{target.name}: {workload}{' -C' if o.connect else ''}, {protocol}, "
                        f"{o.clients} clients, {o.duration}s")
                    result = run_pgbench(pgbench, target, spec, scratch)
                    if result.error:
                        say(f"ERROR {target.name}: {result.error}")
                    self.runs.append(result)

    def _report(self, database: Database | None, pool: PoolSettings | None) -> None:
        if self.runs:
            print(render_table(self.runs))
            for line in ratio_lines(self.runs):
                print(line)
        if database is None or pool is None:
            return  # nothing was measured: no JSON
        now = utc_now()
        path = Path(self.options.json_path) if self.options.json_path else default_json_path(
            self.started)
        report = BenchReport(
            started_at=self.started.isoformat(timespec="seconds"),
            finished_at=now.isoformat(timespec="seconds"),
            source=database.source,
            database=database.endpoint,
            options=self.options,
            pool=pool,
            targets=tuple(t.name for t in self.targets),
            machine=self.machine,
            versions=self.versions,
            runs=self.runs,
            skipped=self.skipped,
            errors=self.errors,
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
        except OSError as exc:
            self._error(f"cannot write {path}: {exc}")
            return
        say(f"results written to {path}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(options: BenchOptions, throwaway: bool = False, dsn: str | None = None,
         config_path: str | None = None) -> int:
    """Run ``pgherd bench`` against one database source; return the exit status.

    SIGTERM and SIGHUP (a closed terminal) interrupt like Ctrl-C does, so the poolers and
    the throwaway cluster are stopped rather than left running.
    """
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return Bench(options, throwaway, dsn, config_path).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
