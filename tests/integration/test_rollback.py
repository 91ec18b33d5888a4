"""Rolling back to PgBouncer with the same configuration file: pgherd's own settings live in a
companion file PgBouncer never reads, because PgBouncer refuses what it does not know."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from tests.helpers import wait_for

PGHERD = str(Path(sys.executable).with_name("pgherd"))


def test_pgbouncer_refuses_a_pgherd_section_and_pgherd_keys(pgbouncer_setup):
    """Why a companion file: the installed PgBouncer will not start on a file with a
    [pgherd] section, nor with pgherd's keys in [pgbouncer]."""
    for extra, complaint in (("[pgherd]\nworkers = 3\n", 'invalid section "pgherd"'),
                             ("workers = 3\n", "parameter workers")):
        ini = pgbouncer_setup.write_ini(extra)
        proc = pgbouncer_setup.run("-q", ini)
        assert proc.wait(30) != 0
        assert complaint in pgbouncer_setup.log()


def test_one_file_for_both_with_pgherds_keys_beside_it(pgbouncer_setup):
    ini = pgbouncer_setup.write_ini()
    companion = Path(ini).with_name("pgbouncer.pgherd.ini")
    companion.write_text("; pgherd's own settings: PgBouncer does not read this file\n"
                         "[pgherd]\nworkers = 3\nallow_root = 1\n")
    pgbouncer_setup.start()  # PgBouncer is happy with the file
    pgbouncer_setup.proc.terminate()
    pgbouncer_setup.proc.wait(10)

    proc = subprocess.Popen([PGHERD, "-q", ini], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def workers():
            try:
                with psycopg.connect(pgbouncer_setup.dsn, autocommit=True,
                                     prepare_threshold=None) as conn:
                    return len(conn.execute("SHOW WORKERS").fetchall())
            except psycopg.OperationalError:
                assert proc.poll() is None, "pgherd exited"
                return 0

        assert wait_for(workers, timeout=20) == 3
        with psycopg.connect(pgbouncer_setup.dsn, autocommit=True,
                             prepare_threshold=None) as conn:
            config = {r[0]: r[1] for r in conn.execute("SHOW CONFIG")}
        assert config["workers"] == "3" and config["allow_root"] == "1"
    finally:
        os.killpg(proc.pid, signal.SIGQUIT)
        proc.wait(20)
