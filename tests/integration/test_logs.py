"""pgherd's log in PgBouncer's format: Debian's pgBadger detects it as a PgBouncer log on its own
and counts what a scripted workload did (logins, failed logins, errors); failed logins carry the
client's address, new server connections "(from ...)"."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.helpers import login_error, wait_for

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC \[(\d+)\] "
                  r"(LOG|WARNING|ERROR|FATAL|DEBUG) ")


@pytest.fixture(scope="module")
def pgbadger() -> str:
    path = shutil.which("pgbadger")
    if path is None:
        pytest.skip("pgbadger is not installed (make test installs it with apt)")
    return path


def test_pgbadger_reads_pgherds_log(pgherd, pgbadger, tmp_path):
    databases = {k: v for k, v in pgherd.default_databases.items() if k != "*"}
    h = pgherd(settings={"auth_type": "md5"}, databases=databases, workers=2)
    logins, failed, unknown_db = 6, 4, 2
    for _ in range(logins):
        with h.connect("p0", user="u_md5", password="md5pw") as conn:
            conn.execute("SELECT 1")
    for _ in range(failed):
        assert login_error(h.dsn("p0", user="u_md5", password="wrong")) is not None
    for _ in range(unknown_db):
        assert login_error(h.dsn("nosuch", user="u_md5", password="md5pw")) is not None

    # a refused client may read its error a moment before the line is written
    wait_for(lambda: h.log().count("pooler error: no such database: nosuch") == unknown_db)
    log = h.log()
    for line in log.splitlines():
        if line.strip() and not line.startswith(("Traceback", " ")):
            assert LINE.match(line), line  # PgBouncer's prefix, every line
    failures = [ln for ln in log.splitlines()
                if "pooler error: password authentication failed" in ln]
    assert len(failures) == failed
    assert all(re.search(r"WARNING C-0x[0-9a-f]+: p0/u_md5@127\.0\.0\.1:\d+ pooler error", ln)
               for ln in failures)  # with the client's address
    assert re.search(r"LOG S-0x[0-9a-f]+: p0/u_md5@127\.0\.0\.1:\d+ new connection to server "
                     r"\(from 127\.0\.0\.1:\d+\)", log)

    out = tmp_path / "report.json"
    run = subprocess.run([pgbadger, "-q", "-x", "json", "-o", str(out), str(h.log_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr  # detected as a PgBouncer log: no -f needed
    report = json.loads(out.read_text())
    assert report["pgb_connection_info"]["count"] == logins + failed + unknown_db
    assert report["pgb_connection_info"]["database"] == {"p0": logins + failed,
                                                          "nosuch": unknown_db}
    assert report["pgb_overall_stat"]["errors_number"] == failed + unknown_db
    errors = {k: v["count"] for k, v in report["pgb_error_info"].items()}
    assert sum(v for k, v in errors.items() if "password authentication failed" in k) == failed
    assert sum(v for k, v in errors.items() if "no such database" in k) == unknown_db
