"""The ``pgherd`` command line: run, check, bench, --version."""

from __future__ import annotations

import logging
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("pgherd"), "-V", "--version", prog_name="pgherd")
def main() -> None:
    """pgherd: a PgBouncer-compatible PostgreSQL connection pooler that uses every core."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--workers", "-w", type=int, help="worker processes (overrides the config)")
@click.option("--quiet", "-q", is_flag=True, help="log nothing to stderr")
@click.option("--verbose", "-v", count=True, help="more detail in the log (repeatable)")
def run(config: str, workers: int | None, quiet: bool, verbose: int) -> None:
    """Run the pooler in the foreground with CONFIG (a pgbouncer.ini)."""
    import setproctitle

    from . import log
    from .listeners import ListenError
    from .master import Master
    from .pidfile import PidfileError

    overrides = {"workers": str(workers)} if workers is not None else {}
    cfg = _load(config, overrides)
    log.setup(cfg.settings.logfile, max(verbose, cfg.settings.verbose), quiet)
    logger = logging.getLogger("pgherd")
    for problem in cfg.warnings:
        logger.warning("%s", problem)
    setproctitle.setproctitle("pgherd: master")
    try:
        code = Master(cfg, overrides, verbose).run()
    except (ListenError, PidfileError) as exc:
        logger.error("%s", exc)
        click.echo("FATAL %s" % exc, err=True)
        raise SystemExit(1) from None
    sys.exit(code)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG; print every problem as file:line: key: message."""
    cfg = _load(config, {})
    for problem in cfg.warnings:
        click.echo("WARNING %s" % problem)
    click.echo("%s: OK (%d databases, %d users, %d workers)" % (
        config, len(cfg.databases), len(cfg.users), cfg.settings.workers))


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
              help="comma list of direct,pgherd,pgbouncer  [default: all available]")
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
