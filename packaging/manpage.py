"""Render pgherd(1): packaging/pgherd.1.in with its @SYNOPSIS@ and @COMMANDS@ filled from the
CLI itself (click), so the page always documents every command and option there is.

    python packaging/manpage.py packaging/pgherd.1.in > pgherd.1

Run it with a Python that can import pgherd (the package's own venv at build time).
"""

from __future__ import annotations

import inspect
import sys
from importlib.metadata import version

import click

from prefork.cli import main as cli


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in ".'" else line for line in text.splitlines())


def paragraphs(text: str) -> list[str]:
    text = inspect.cleandoc(text or "").replace("\b\n", "")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def commands(ctx: click.Context) -> list[tuple[str, click.Command, click.Context]]:
    out = []
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        if command is not None and not command.hidden:
            out.append((name, command, click.Context(command, info_name=name, parent=ctx)))
    return out


def render(template: str) -> str:
    ctx = click.Context(cli, info_name="pgherd")
    synopsis, body = [], []
    for name, command, sub in commands(ctx):
        usage = " ".join(command.collect_usage_pieces(sub))
        synopsis += [".B pgherd %s" % roff(name), roff(usage), ".br"]
        body += [".TP", ".B %s" % roff(name)]
        for i, para in enumerate(paragraphs(command.help)):
            body += ([".IP"] if i else []) + [roff(para)]
        options = [rec for p in command.get_params(sub) if isinstance(p, click.Option)
                   and (rec := p.get_help_record(sub)) and "--help" not in rec[0]]
        if options:
            body.append(".RS")
            for opts, help_text in options:
                body += [".TP", ".B %s" % roff(opts), roff(help_text)]
            body.append(".RE")
    synopsis += [".B pgherd", "[\\-V | \\-\\-version] [\\-h | \\-\\-help]"]
    return (template.replace("@VERSION@", version("pgherd"))
            .replace("@SYNOPSIS@", "\n".join(synopsis))
            .replace("@COMMANDS@", "\n".join(body)))


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        sys.stdout.write(render(f.read()))
