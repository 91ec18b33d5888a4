"""The periodic stats log line (prefork/statslog.py) and syslog logging (prefork/log.py)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
import time
from types import SimpleNamespace

import pytest

from ipc import shm
from prefork import log as plog
from prefork.statslog import StatsLogger, service_totals, stats_line

ZERO = dict.fromkeys(shm.STAT_FIELDS, 0)
LINE_RE = re.compile(
    r"^stats: \d+ xacts/s, \d+ queries/s, \d+ client parses/s, \d+ server parses/s, "
    r"\d+ binds/s, in \d+ B/s, out \d+ B/s, xact \d+ us, query \d+ us, wait \d+ us$")


def totals(**values: int) -> dict[str, int]:
    return {**ZERO, **values}


# ----------------------------------------------------------------------------- stats_line


def test_line_is_pgbouncers_format_with_rates_and_averages() -> None:
    old = totals(xact_count=100, query_count=300, recv_bytes=1000, sent_bytes=5000,
                 xact_time=10_000, query_time=20_000, wait_time=0, server_assignment_count=50,
                 client_parse_count=1, server_parse_count=2, bind_count=3)
    new = totals(xact_count=700, query_count=2100, recv_bytes=61_000, sent_bytes=125_000,
                 xact_time=10_000 + 600 * 812, query_time=20_000 + 1800 * 301,
                 wait_time=150 * 15, server_assignment_count=200,
                 client_parse_count=61, server_parse_count=32, bind_count=123)
    line = stats_line(old, new, 60.0)
    assert line == ("stats: 10 xacts/s, 30 queries/s, 1 client parses/s, 0 server parses/s, "
                    "2 binds/s, in 1000 B/s, out 2000 B/s, xact 812 us, query 301 us, "
                    "wait 15 us")
    assert LINE_RE.match(line)


def test_rates_use_the_real_elapsed_time_and_integer_division() -> None:
    # PgBouncer: USEC * delta / dur_usec, truncated.
    line = stats_line(ZERO, totals(xact_count=10, query_count=10), 3.0)
    assert line.startswith("stats: 3 xacts/s, 3 queries/s,")
    line = stats_line(ZERO, totals(xact_count=10), 0.5)
    assert line.startswith("stats: 20 xacts/s,")


def test_idle_period_and_zero_duration_give_zeros() -> None:
    zeros = ("stats: 0 xacts/s, 0 queries/s, 0 client parses/s, 0 server parses/s, 0 binds/s, "
             "in 0 B/s, out 0 B/s, xact 0 us, query 0 us, wait 0 us")
    assert stats_line(ZERO, ZERO, 60.0) == zeros
    assert stats_line(ZERO, totals(xact_count=5, xact_time=50), 0.0).endswith(
        "xact 10 us, query 0 us, wait 0 us")


def test_averages_divide_by_their_own_counts() -> None:
    # xact time per transaction, query time per query, wait time per server assignment.
    new = totals(xact_count=4, xact_time=4000, query_count=10, query_time=1000,
                 server_assignment_count=5, wait_time=500)
    assert stats_line(ZERO, new, 1.0).endswith("xact 1000 us, query 100 us, wait 100 us")


def test_a_counter_going_backwards_counts_as_zero() -> None:
    line = stats_line(totals(xact_count=50, xact_time=100), totals(xact_count=10), 1.0)
    assert line.startswith("stats: 0 xacts/s,")
    assert "xact 0 us" in line


# ----------------------------------------------------------------------------- shm totals


@pytest.fixture
def seg() -> shm.Segment:
    segment = shm.Segment.create(max_workers=4, max_rows=32)
    yield segment
    segment.close()


def test_service_totals_sum_every_pool_and_worker_and_include_dead_workers(seg) -> None:
    a = seg.row(shm.row_key(shm.POOL, "db1", "alice"))
    b = seg.row(shm.row_key(shm.POOL, "db2", "bob"))
    d = seg.row(shm.row_key(shm.DATABASE, "db1"))
    seg.cell_set(a, 0, xact_count=3, query_count=6)
    seg.cell_set(a, 1, xact_count=4, query_count=8)
    seg.cell_set(b, 2, xact_count=5, recv_bytes=100)
    seg.cell_set(d, 0, xact_count=1000)  # database rows carry no stats of their own
    assert service_totals(seg) == totals(xact_count=12, query_count=14, recv_bytes=100)
    seg.retire_worker(1)  # a dead worker's stats move to the ghost counters
    assert service_totals(seg)["xact_count"] == 12


def test_stats_logger_logs_once_per_period(seg, caplog) -> None:
    row = seg.row(shm.row_key(shm.POOL, "db1", "alice"))
    settings = SimpleNamespace(stats_period=10, log_stats=True)
    logger = StatsLogger(seg, settings, now=100.0)
    seg.cell_set(row, 0, xact_count=200, query_count=400, xact_time=200 * 50,
                 query_time=400 * 20, server_assignment_count=200, wait_time=200 * 7)
    with caplog.at_level(logging.INFO, logger="pgherd"):
        assert logger.tick(100.25) is None
        assert logger.tick(109.9) is None
        line = logger.tick(110.0)
        assert line == ("stats: 20 xacts/s, 40 queries/s, 0 client parses/s, "
                        "0 server parses/s, 0 binds/s, in 0 B/s, out 0 B/s, xact 50 us, "
                        "query 20 us, wait 7 us")
        assert logger.tick(110.25) is None  # not again until the next period
        # the next period compares with the end of the last one, not with the start
        seg.cell_set(row, 1, xact_count=100)
        line = logger.tick(120.1)
    assert line is not None and line.startswith("stats: 9 xacts/s, 0 queries/s,")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stats:")]
    assert len(logged) == 2


def test_stats_logger_silent_when_log_stats_off_and_follows_reloads(seg, caplog) -> None:
    row = seg.row(shm.row_key(shm.POOL, "db1", "alice"))
    logger = StatsLogger(seg, SimpleNamespace(stats_period=5, log_stats=False), now=0.0)
    seg.cell_set(row, 0, xact_count=50)
    with caplog.at_level(logging.INFO, logger="pgherd"):
        assert logger.tick(5.0) is None  # period passes, nothing logged
        seg.cell_set(row, 0, xact_count=100)
        # a reload switches log_stats on and shortens the period (after the one in progress)
        on = SimpleNamespace(stats_period=1, log_stats=True)
        assert logger.tick(9.0, on) is None
        line = logger.tick(10.0, on)
        assert line is not None and line.startswith("stats: 10 xacts/s,")
        assert logger.tick(11.0, on) is not None  # now every second
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stats:")]
    assert len(logged) == 2 and logged[0].startswith("stats: 10 xacts/s,")


def test_stats_logger_catches_up_after_a_stall(seg) -> None:
    logger = StatsLogger(seg, SimpleNamespace(stats_period=1, log_stats=True), now=0.0)
    assert logger.tick(5.5) is not None  # one line for the whole stall, not five
    assert logger.tick(5.6) is None
    assert logger.tick(6.5) is not None


# ----------------------------------------------------------------------------- syslog


def test_facility_names_are_pgbouncers() -> None:
    H = logging.handlers.SysLogHandler
    assert plog.syslog_facility("daemon") == H.LOG_DAEMON
    assert plog.syslog_facility("auth") == H.LOG_AUTH
    assert plog.syslog_facility("authpriv") == H.LOG_AUTHPRIV
    assert plog.syslog_facility("user") == H.LOG_USER
    for i in range(8):
        assert plog.syslog_facility("local%d" % i) == getattr(H, "LOG_LOCAL%d" % i)
    assert plog.syslog_facility(" LOCAL3 ") == H.LOG_LOCAL3
    assert plog.syslog_facility("mail") is None
    assert plog.syslog_facility("local8") is None
    assert plog.syslog_facility("") is None
    assert sorted(plog.FACILITIES) == sorted(
        ["auth", "authpriv", "daemon", "user"] + ["local%d" % i for i in range(8)])


@pytest.fixture
def pgherd_logger():
    """The 'pgherd' logger's handlers and level, restored after the test."""
    root = logging.getLogger("pgherd")
    saved = (list(root.handlers), root.level, root.propagate)
    yield root
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]


@pytest.fixture
def fake_syslog(tmp_path):
    """A Unix datagram socket standing in for /dev/log."""
    path = str(tmp_path / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def syslog_settings(**kw):
    return SimpleNamespace(**{"syslog": True, "syslog_ident": "pgherd-test",
                              "syslog_facility": "daemon", **kw})


def test_syslog_lines_carry_priority_ident_pid_and_role(pgherd_logger, fake_syslog) -> None:
    path, sock = fake_syslog
    plog.setup("", 0, True)
    plog.configure_syslog(syslog_settings(), address=path)
    pgherd_logger.info("hello %s", "world")
    data = sock.recv(4096)
    # daemon (3) * 8 + info (6) = 30; NUL-terminated like SysLogHandler's default
    assert data == b"<30>pgherd-test[%d]: LOG hello world\x00" % os.getpid()
    pgherd_logger.error("bad")
    assert sock.recv(4096).startswith(b"<27>pgherd-test[")  # daemon + err (3)


def test_syslog_facility_setting_and_unknown_facility_falls_back(pgherd_logger,
                                                                 fake_syslog) -> None:
    path, sock = fake_syslog
    plog.setup("", 0, True)
    plog.configure_syslog(syslog_settings(syslog_facility="local3"), address=path)
    pgherd_logger.warning("w")
    assert sock.recv(4096).startswith(b"<%d>" % (19 * 8 + 4))  # local3, warning
    plog.configure_syslog(syslog_settings(syslog_facility="nonsense"), address=path)
    warning = sock.recv(4096)  # the fallback is announced, on daemon
    assert warning.startswith(b"<28>") and b"unknown syslog_facility 'nonsense'" in warning
    syslogs = [h for h in pgherd_logger.handlers
               if isinstance(h, logging.handlers.SysLogHandler)]
    assert len(syslogs) == 1  # replaced, not added


def test_syslog_off_removes_the_handler_and_reopen_keeps_it(pgherd_logger, fake_syslog,
                                                            tmp_path) -> None:
    path, sock = fake_syslog
    plog.setup(str(tmp_path / "a.log"), 0, True)
    plog.configure_syslog(syslog_settings(), address=path)
    plog.reopen(str(tmp_path / "b.log"), 0)  # no settings: syslog untouched
    pgherd_logger.info("after reopen")
    assert b"after reopen" in sock.recv(4096)
    assert "after reopen" in (tmp_path / "b.log").read_text()
    plog.configure_syslog(syslog_settings(syslog=False))
    assert not [h for h in pgherd_logger.handlers
                if isinstance(h, logging.handlers.SysLogHandler)]


def test_setup_with_settings_adds_syslog(pgherd_logger, fake_syslog, monkeypatch) -> None:
    path, sock = fake_syslog
    monkeypatch.setattr(plog, "DEV_LOG", path)
    plog.setup("", 0, True, syslog_settings(syslog_ident="via-setup"))
    pgherd_logger.info("x")
    assert b"via-setup[" in sock.recv(4096)


def test_a_full_syslog_socket_drops_lines_instead_of_blocking(pgherd_logger,
                                                              fake_syslog) -> None:
    path, sock = fake_syslog  # nobody reads it: its queue fills up
    plog.setup("", 0, True)
    plog.configure_syslog(syslog_settings(), address=path)
    before = plog.SyslogHandler.dropped
    start = time.monotonic()
    for i in range(5000):
        pgherd_logger.info("line %d %s", i, "x" * 200)
    assert time.monotonic() - start < 5
    assert plog.SyslogHandler.dropped > before


def test_without_dev_log_syslog_goes_to_udp_514(pgherd_logger, monkeypatch, caplog) -> None:
    monkeypatch.setattr(plog, "DEV_LOG", "/nonexistent/dev/log")
    plog.setup("", 0, True)
    pgherd_logger.propagate = True
    with caplog.at_level(logging.INFO, logger="pgherd"):
        plog.configure_syslog(syslog_settings())
    handler = next(h for h in pgherd_logger.handlers
                   if isinstance(h, logging.handlers.SysLogHandler))
    assert handler.address == ("localhost", 514) and handler.socktype == socket.SOCK_DGRAM
    assert "no /nonexistent/dev/log, sending to localhost:514 (UDP)" in caplog.text
