"""The ``pgherd`` command line: PgBouncer's (``pgherd [-d] [-q] [-v]... [-u USER] INI``, the same
as ``pgherd run``), and pgherd's sub-commands: run, check, reload, stop, status,
top, bench.

As PgBouncer, pgherd switches to ``-u USER`` (or the ``user`` setting) before it binds or
writes anything, and refuses to go on as root; pgherd's own ``allow_root`` says otherwise.
PgBouncer's online restart (``-R``) is refused: pgherd replaces workers one at a time instead.
"""

from __future__ import annotations

import logging
import os
import pwd
import sys
from importlib.metadata import version

import click

from .config import ConfigError, load_config


def _load(config_path: str, overrides: dict[str, str]):
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo("ERROR %s" % problem, err=True)
        raise SystemExit(1) from None
    return config


class _PgBouncerCompatible(click.Group):
    """``pgherd [OPTIONS] INI``, PgBouncer's form, is ``pgherd run [OPTIONS] INI``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        group_options = ("-h", "--help", "-V", "--version")
        if args and args[0] not in self.commands and args[0] not in group_options:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_PgBouncerCompatible, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("pgherd"), "-V", "--version", prog_name="pgherd")
def main() -> None:
    """pgherd: a PgBouncer-compatible PostgreSQL connection pooler that uses every core.

    \b
    PgBouncer's command line works as is:
      pgherd [-d] [-q] [-v]... [-u USER] CONFIG    (the same as: pgherd run ...)
    """


def _load_code() -> None:
    """Import what the master and the workers import later, while still privileged: the new
    user may not be able to read the installation (a virtualenv under /root, say). Importing
    creates no gevent hub; workers still make theirs after the fork."""
    import gevent
    import setproctitle  # noqa: F401

    for name in ("loop", "format_context", "resolver", "threadpool"):
        getattr(gevent.config, name)  # gevent imports these when a hub is made
    import workers.admin  # noqa: F401
    import workers.http  # noqa: F401
    import workers.migrate  # noqa: F401
    import workers.worker  # noqa: F401


def switch_user(name: str) -> None:
    """Become ``name`` (its uid, gid and groups), as PgBouncer's -u / user setting."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise click.ClickException("could not find user '%s' to switch to" % name) from None
    try:
        if os.getuid() == 0:
            os.initgroups(name, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise click.ClickException("could not switch to user '%s': %s"
                                   % (name, exc.strerror)) from None
    os.environ.update(HOME=entry.pw_dir, USER=name, LOGNAME=name)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--workers", "-w", type=int, help="worker processes (overrides the config)")
@click.option("--daemon", "-d", is_flag=True,
              help="detach into the background (needs pidfile and logfile, like PgBouncer's -d)")
@click.option("--quiet", "-q", is_flag=True, help="log nothing to stderr")
@click.option("--verbose", "-v", count=True, help="more detail in the log (repeatable)")
@click.option("--user", "-u", "user", metavar="USERNAME",
              help="assume the identity of USERNAME (overrides the user setting)")
@click.option("--reboot", "-R", is_flag=True, hidden=True)
def run(config: str, workers: int | None, daemon: bool, quiet: bool, verbose: int,
        user: str | None, reboot: bool) -> None:
    """Run the pooler with CONFIG (a pgbouncer.ini), in the foreground unless --daemon."""
    import setproctitle

    from . import log
    from .listeners import ListenError
    from .master import Master
    from .pidfile import PidfileError

    if reboot:
        raise click.ClickException(
            "online restart (-R) is not supported by pgherd: it cannot take over a running "
            "pooler's connections. RELOAD (SIGHUP) applies a new configuration live, and pgherd "
            "replaces its workers one at a time without dropping clients")
    overrides = {"workers": str(workers)} if workers is not None else {}
    cfg = _load(config, overrides)
    user = user or cfg.settings.user
    if user:
        _load_code()
        switch_user(user)
    if os.getuid() == 0 and not cfg.settings.allow_root:
        raise click.ClickException(
            "pgherd should not run as root (as PgBouncer, which refuses to): run it with "
            "-u USER or set user = USER; allow_root = 1 runs it as root anyway")
    if daemon and not (cfg.settings.pidfile and cfg.settings.logfile):
        raise click.ClickException("--daemon needs pidfile and logfile in %s" % config)
    try:
        log.setup(cfg.settings.logfile, max(verbose, cfg.settings.verbose), quiet or daemon,
                  cfg.settings)
    except OSError as exc:
        raise click.ClickException("cannot open logfile %s: %s"
                                   % (cfg.settings.logfile, exc.strerror)) from None
    logger = logging.getLogger("pgherd")
    logger.debug("loaded %s: %d databases, %d users, %d workers, running as %s", config,
                 len(cfg.databases), len(cfg.userlist), cfg.settings.workers,
                 pwd.getpwuid(os.getuid()).pw_name)
    for problem in cfg.warnings:
        logger.warning("%s", problem)
    setproctitle.setproctitle("pgherd: master")
    try:
        code = Master(cfg, overrides, verbose, daemon).run()
    except (ListenError, PidfileError) as exc:
        logger.error("%s", exc)
        click.echo("FATAL %s" % exc, err=True)
        raise SystemExit(1) from None
    sys.exit(code)


def _master_pid(config: str) -> int:
    """The running master of CONFIG, found through its pidfile; exits 3 (LSB: not running)."""
    from .pidfile import read

    cfg = _load(config, {})
    if not cfg.settings.pidfile:
        raise click.ClickException("%s sets no pidfile: cannot find the master" % config)
    pid = read(cfg.settings.pidfile)
    if pid is None:
        click.echo("pgherd is not running (no live pid in %s)" % cfg.settings.pidfile, err=True)
        raise SystemExit(3)
    return pid


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def reload(config: str) -> None:
    """Validate CONFIG, then have the running master reload it (SIGHUP)."""
    import signal

    pid = _master_pid(config)  # validates CONFIG first: a bad file is reported, not sent
    os.kill(pid, signal.SIGHUP)
    click.echo("reload requested (pid %d); the log says when every worker applied it" % pid)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--fast", is_flag=True, help="exit at once (SIGQUIT) instead of waiting")
@click.option("--servers", is_flag=True,
              help="wait only for servers to be released (SIGINT) instead of for clients")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="seconds to wait for the master to exit")
def stop(config: str, fast: bool, servers: bool, timeout: float) -> None:
    """Stop the running master: SIGTERM (wait for clients), SIGINT (--servers), SIGQUIT (--fast)."""
    import signal
    import time

    pid = _master_pid(config)
    sig = signal.SIGQUIT if fast else signal.SIGINT if servers else signal.SIGTERM
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            click.echo("stopped (pid %d)" % pid)
            return
        time.sleep(0.05)
    raise click.ClickException("pid %d still running after %.0fs" % (pid, timeout))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def status(config: str) -> None:
    """Is the master of CONFIG running? Exit 0 if so, 3 if not (LSB)."""
    import psutil

    pid = _master_pid(config)
    proc = psutil.Process(pid)
    workers = [c for c in proc.children() if c.is_running()]
    click.echo("pgherd is running: master pid %d, %d workers (%s)" % (
        pid, len(workers), ", ".join(str(w.pid) for w in workers)))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG; print every problem as file:line: key: message."""
    cfg = _load(config, {})
    for problem in cfg.warnings:
        click.echo("WARNING %s" % problem)
    click.echo("%s: OK (%d databases, %d users, %d workers)" % (
        config, len(cfg.databases), len(cfg.users), cfg.settings.workers))


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--dsn", help="any pgherd or PgBouncer admin console instead of CONFIG's (libpq "
              "connection string or URL; dbname defaults to pgbouncer)")
@click.option("--user", "-U", help="log in as this user  [default with CONFIG: pgbouncer over "
              "our own Unix socket, else the first of stats_users/admin_users]")
@click.option("--interval", "-i", type=click.FloatRange(0.2), default=1.0, show_default=True,
              help="seconds between refreshes")
def top(config: str | None, dsn: str | None, user: str | None, interval: float) -> None:
    """Live view of pools and workers, waiting most first (keys: w t c s l n sort, f filter,
    p pause, q quit)."""
    import psycopg

    from .top import check, conninfo_from_config, conninfo_from_dsn, run

    if (config is None) == (dsn is None):
        raise click.UsageError("give CONFIG or --dsn")
    try:
        conninfo = (conninfo_from_dsn(dsn, user) if dsn is not None
                    else conninfo_from_config(_load(config, {}), user))
    except (ValueError, psycopg.ProgrammingError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        check(conninfo)
    except psycopg.Error as exc:
        raise click.ClickException("cannot reach the admin console: %s" % str(exc).strip()) \
            from None
    run(conninfo, interval)


def _targets(ctx: click.Context, param: click.Parameter,
             value: str | None) -> tuple[str, ...] | None:
    """--targets: the comma list, checked (None = all available)."""
    from .bench import parse_targets

    try:
        return None if value is None else parse_targets(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("bench")
@click.option("--throwaway", is_flag=True,
              help="benchmark a temporary PostgreSQL cluster (initdb in /tmp, removed after)")
@click.option("--dsn", help="benchmark an existing PostgreSQL (URL or key=value string)")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="benchmark the first database of a pgherd/pgbouncer ini, with its pool settings")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True,
              help="pgherd worker processes")
@click.option("--clients", "-c", type=click.IntRange(1), default=32, show_default=True,
              help="pgbench clients (-c)")
@click.option("--jobs", "-j", type=click.IntRange(1), default=2, show_default=True,
              help="pgbench threads (-j)")
@click.option("--duration", "-T", type=click.IntRange(1), default=10, show_default=True,
              help="seconds per run (-T)")
@click.option("--scale", "-s", type=click.IntRange(1), default=10, show_default=True,
              help="pgbench -i scale, when the tables are created")
@click.option("--init", is_flag=True, help="(re)create the pgbench tables even if present")
@click.option("--tpcb", "workload", flag_value="tpcb", default=True,
              help="TPC-B-like transactions (default)")
@click.option("--select-only", "-S", "workload", flag_value="select-only",
              help="select-only transactions (-S)")
@click.option("--both", "workload", flag_value="both", help="TPC-B-like and select-only")
@click.option("--protocol", "-M", type=click.Choice(["simple", "extended", "both"]),
              default="simple", show_default=True, help="query protocol (-M)")
@click.option("--pool-size", type=click.IntRange(1),
              help="default_pool_size  [default: the config's, else 20]")
@click.option("--pool-mode", type=click.Choice(["session", "transaction", "statement"]),
              help="pool_mode  [default: the config's, else transaction]")
@click.option("--connect", "-C", is_flag=True, help="a new connection per transaction (-C)")
@click.option("--targets", callback=_targets, metavar="LIST",
              help="comma list of direct,pgherd,pgbouncer,pgherd-split (per-worker pools: "
                   "what sharing costs)  [default: direct,pgherd,pgbouncer if installed]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="results file  [default: bench-results/bench-<UTC time>.json]")
def bench_command(throwaway: bool, dsn: str | None, config_path: str | None, workload: str,
                  protocol: str, **options) -> None:
    """pgbench side by side: PostgreSQL directly, pgherd, and PgBouncer when installed.

    Prints one table (tps, latency average and p99, failed transactions, pooler CPU per
    transaction and RSS) and writes everything as JSON. Exits 1 when a run failed.
    """
    from .bench import BenchOptions
    from .bench import main as run_bench

    if sum((throwaway, dsn is not None, config_path is not None)) != 1:
        raise click.UsageError("choose one database: --throwaway, --dsn or --config")
    workloads = {"tpcb": ("tpcb-like",), "select-only": ("select-only",),
                 "both": ("tpcb-like", "select-only")}[workload]
    protocols = ("simple", "extended") if protocol == "both" else (protocol,)
    opts = BenchOptions(workloads=workloads, protocols=protocols, **options)
    sys.exit(run_bench(opts, throwaway=throwaway, dsn=dsn, config_path=config_path))


if __name__ == "__main__":
    main()
