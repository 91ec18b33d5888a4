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
        code = Master(cfg).run()
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


if __name__ == "__main__":
    main()
