"""The status page's pure parts: the master's history samples (prefork/history.py), the chart
series made of them, and the page's own promise to load nothing from elsewhere
(workers/statuspage.py)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from ipc import shm
from prefork import history as phistory
from workers import statuspage

SECOND = 1_000_000_000


@pytest.fixture
def seg():
    segment = shm.Segment.create(max_workers=2, max_rows=16)
    yield segment
    segment.close()


def test_a_sample_sums_the_pools_and_keeps_the_oldest_wait(seg):
    a = seg.row(shm.row_key(shm.POOL, "a", "u"))
    b = seg.row(shm.row_key(shm.POOL, "b", "u"))
    db = seg.row(shm.row_key(shm.DATABASE, "a"))
    seg.cell_set(a, 0, xact_count=10, cl_active=2, sv_idle=1)
    seg.cell_set(a, 1, xact_count=5, cl_active=1, sv_active=1)
    seg.cell_set(b, 0, xact_count=1, query_time=70)
    seg.cell_set(db, 0, xact_count=999)  # database rows repeat the pools: not summed
    seg.set_waiting(a, 1, 2, 40 * SECOND)
    seg.set_waiting(b, 0, 1, 45 * SECOND)
    s = phistory.service_sample(seg.snapshot_rows(), 50 * SECOND)
    assert (s["at_ns"], s["xact_count"], s["query_time"]) == (50 * SECOND, 16, 70)
    assert (s["cl_active"], s["cl_waiting"], s["sv_active"], s["sv_idle"]) == (3, 3, 1, 1)
    assert s["maxwait_ns"] == 10 * SECOND
    assert set(s) == set(shm.HISTORY_FIELDS)


def test_the_master_samples_once_per_interval_without_catching_up(seg):
    sampler = phistory.HistorySampler(seg)
    interval = phistory.INTERVAL
    for now in (100.0, 100.1, 100.0 + interval - 0.01):  # the loop ticks every 0.25 s
        sampler.tick(now)
    assert len(seg.history()) == 1
    sampler.tick(100.0 + interval)
    assert len(seg.history()) == 2
    sampler.tick(100.0 + 10 * interval)  # a stalled master: one sample, not eight
    sampler.tick(100.0 + 10 * interval + 0.5)
    assert len(seg.history()) == 3


def sample(t: float, **values: int) -> dict[str, int]:
    s = dict.fromkeys(shm.HISTORY_FIELDS, 0)
    s.update(values, at_ns=int(t * SECOND))
    return s


def test_series_are_rates_and_averages_between_samples():
    samples = [
        sample(100, xact_count=0, query_count=0),
        sample(102, xact_count=400, query_count=800, query_time=800 * 250,
               wait_time=400 * 30, server_assignment_count=400, cl_active=8, cl_waiting=2,
               sv_active=3, sv_idle=1, sv_used=1, maxwait_ns=SECOND // 2),
        sample(104, xact_count=400, query_count=800, query_time=800 * 250,
               wait_time=400 * 30, server_assignment_count=400),
        sample(106, xact_count=100),  # counters went back (cannot happen, must not hurt)
    ]
    h = statuspage.history(samples, 106 * SECOND)
    assert h["t"] == [-4.0, -2.0, 0.0]
    assert h["tps"] == [200.0, 0.0, 0.0] and h["qps"] == [400.0, 0.0, 0.0]
    assert h["query_ms"] == [0.25, 0.0, 0.0] and h["wait_ms"] == [0.03, 0.0, 0.0]
    assert (h["cl_active"][0], h["cl_waiting"][0], h["sv_active"][0]) == (8, 2, 3)
    assert h["sv_idle"][0] == 2  # idle and used are both idle servers
    assert h["maxwait"][0] == 0.5
    assert statuspage.history(samples[:1], 0) == {k: [] for k in h}


def test_the_page_loads_nothing_from_elsewhere():
    page = statuspage.PAGE.decode()
    # every URL the page names is its own (relative) or a data: URL
    for url in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page):
        assert url.startswith("data:") or not re.match(r"[a-z]+:|//", url), url
    assert "http://" not in page.replace('"http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    # the CSP lets exactly the inline style and script run, by their hashes
    _, _, _, headers = statuspage.respond(None, "/")
    csp = headers["Content-Security-Policy"]
    for tag, directive in (("style", "style-src"), ("script", "script-src")):
        (body,) = re.findall(r"<%s>(.*?)</%s>" % (tag, tag), page, re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert "%s 'sha256-%s'" % (directive, digest) in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
