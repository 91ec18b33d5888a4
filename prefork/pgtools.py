"""Where the PostgreSQL and PgBouncer programs are on this machine (Debian's layout first).

Used by ``pgherd bench`` and by the test fixtures, which start their own clusters.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in path.name.split("."))


def pg_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl: initdb on PATH (symlinks resolved), else the
    highest /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        real = Path(os.path.realpath(found)).parent
        if (real / "pg_ctl").exists():
            return real
    candidates = [p / "bin" for p in Path("/usr/lib/postgresql").glob("*")
                  if (p / "bin" / "initdb").exists()]
    return max(candidates, key=lambda b: _version_key(b.parent)) if candidates else None


def pg_tool(name: str, bindir: Path | None = None) -> str | None:
    """A PostgreSQL client program: from ``bindir`` (same version as the server), PATH,
    or the highest /usr/lib/postgresql/<v>/bin."""
    if bindir is not None and (bindir / name).exists():
        return str(bindir / name)
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*"), key=_version_key, reverse=True):
        if (d / "bin" / name).exists():
            return str(d / "bin" / name)
    return None


def find_pgbouncer() -> str | None:
    """The ``pgbouncer`` binary on PATH or in /usr/sbin (not on a normal user's PATH)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
