"""The status page at ``/`` of the HTTP endpoint, as an operator meets it.

The page is loaded in headless Chromium against a pgherd under pgbench, with a pool whose
clients queue; its figures are read from the page and checked against SHOW POOLS at the same
moment (the queued pool does not move; the busy one keeps its clients and servers), its charts
must have drawn the last minutes, and its console must be free of errors. A screenshot is left
in the test's artifacts directory (listed at the end of the run). Its data, ``/status.json``,
is checked the same way without a browser.
"""

from __future__ import annotations

import http.client
import json

import pytest

from tests.helpers import Bench, WaitingClients, free_port, wait_for

BENCH_CLIENTS = 4


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def status(port: int) -> dict:
    code, headers, body = get(port, "/status.json")
    assert code == 200 and headers["content-type"] == "application/json", body
    return json.loads(body)


@pytest.fixture
def service(pgherd, pgbench_db):
    """pgherd with the HTTP endpoint: p1 holds 2 servers, the bench database 4."""
    return pgherd(settings={"http_listen_port": free_port(), "pool_mode": "transaction"},
                  databases={**pgherd.default_databases,
                             "p1": {"dbname": "p1", "pool_size": 2},
                             pgbench_db: {"dbname": pgbench_db, "pool_size": BENCH_CLIENTS}})


def http_port(h) -> int:
    return int(h.settings["http_listen_port"])


def pools_by_name(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """SHOW POOLS by (database, user), but for the console's own row (PgBouncer 1.25 lists
    it; it has no servers, and the status page shows pools of servers)."""
    return {(r["database"], r["user"]): r for r in rows if r["database"] != "pgbouncer"}


def test_status_json_is_show_pools_and_show_workers(service):
    h = service
    with WaitingClients(h.dsn("p1"), holders=2, waiters=3):
        wait_for(lambda: pools_by_name(h.admin_dicts("SHOW POOLS"))[("p1", "postgres")]
                 ["cl_waiting"] == 3, message="3 clients waiting in p1")
        data = status(http_port(h))
        shown = pools_by_name(h.admin_dicts("SHOW POOLS"))
        ours = pools_by_name(data["pools"])
        assert set(ours) == set(shown)
        for key, row in shown.items():
            for col in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used",
                        "sv_tested", "sv_login"):
                assert ours[key][col] == row[col], (key, col, ours[key], row)
        p1 = ours[("p1", "postgres")]
        assert (p1["cl_active"], p1["cl_waiting"], p1["sv_active"]) == (2, 3, 2)
        # maxwait was read before SHOW POOLS: not later, and it runs (same clock)
        later = shown[("p1", "postgres")]
        assert 0 < p1["maxwait"] <= later["maxwait"] + later["maxwait_us"] / 1e6
        assert data["pools"][0]["database"] == "p1"  # waiting most first
        assert data["clients"] == {"active": sum(p["cl_active"] for p in data["pools"]),
                                   "waiting": 3}
        workers = h.admin_dicts("SHOW WORKERS")
        assert sorted(w["pid"] for w in data["workers"]) == sorted(w["pid"] for w in workers)
        assert sum(w["clients"] for w in data["workers"]) == sum(w["clients"] for w in workers)
        assert all(w["rss"] > 0 and w["cpu_seconds"] >= 0 for w in data["workers"])
    # the master samples every 2 s: the history fills, newest last, ending about now
    data = wait_for(lambda: (lambda d: d if len(d["history"]["t"]) >= 2 else None)(
        status(http_port(h))), timeout=15, message="two points of history")
    t = data["history"]["t"]
    assert t == sorted(t) and -5 < t[-1] <= 0
    assert set(data["history"]) >= {"tps", "qps", "cl_waiting", "wait_ms", "maxwait"}


def test_the_page_is_read_only_and_self_contained(service):
    port = http_port(service)
    code, headers, body = get(port, "/")
    assert code == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"<title>pgherd status</title>" in body
    assert "default-src 'none'" in headers["content-security-policy"]
    code, headers, body = get(port, "/", "HEAD")
    assert code == 200 and body == b"" and int(headers["content-length"]) > 1000
    for method in ("POST", "PUT", "DELETE"):
        for path in ("/", "/status.json"):
            code, headers, _ = get(port, path, method)
            assert code == 405 and headers["allow"] == "GET, HEAD"
    assert get(port, "/index.html")[0] == 404


def _page_pools(driver) -> dict[str, dict[str, str]]:
    rows = {}
    for tr in driver.find_elements("css selector", "#pools tbody tr"):
        rows[tr.get_attribute("data-pool")] = {
            td.get_attribute("data-k"): td.text for td in tr.find_elements("css selector", "td")}
    return rows


def _number(text: str) -> float:
    return float(text.replace(",", "").split()[0])


def test_the_page_in_chromium_matches_show_pools(service, pg, pgbench_db, chromium, artifacts):
    h = service
    with Bench(pg, h, "-S", "-c", str(BENCH_CLIENTS), "-j", "1", "-R", "300", "-T", "120",
               dbname=pgbench_db) as bench, WaitingClients(h.dsn("p1"), 2, 3):
        # some history to draw: the master samples every 2 s; three samples with traffic
        wait_for(lambda: sum(v > 0 for v in status(http_port(h))["history"]["tps"]) >= 3,
                 timeout=30, message="three history points with transactions")
        assert bench.running(), bench.finish().out
        chromium.get("http://127.0.0.1:%d/" % http_port(h))
        # two fetches: the second has rates (worked out between the two)
        wait_for(lambda: int(chromium.find_element("tag name", "body")
                             .get_attribute("data-fetches") or 0) >= 2,
                 timeout=15, message="the page to fetch status.json twice")
        page = _page_pools(chromium)
        shown = {"%s/%s" % key: r for key, r in pools_by_name(h.admin_dicts("SHOW POOLS")).items()}
        chromium.save_screenshot(str(artifacts / "status-page.png"))
        (artifacts / "status-page.html").write_text(chromium.page_source)

        assert set(page) == set(shown)
        p1, p1_now = page["p1/postgres"], shown["p1/postgres"]
        for col in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used"):
            assert _number(p1[col]) == p1_now[col], (col, p1, p1_now)
        assert 0 < _number(p1["maxwait"]) <= p1_now["maxwait"] + 1
        busy, busy_now = page[pgbench_db + "/postgres"], shown[pgbench_db + "/postgres"]
        # clients and servers of the busy pool move between states, never in number
        assert _number(busy["cl_active"]) + _number(busy["cl_waiting"]) == BENCH_CLIENTS
        assert busy_now["cl_active"] + busy_now["cl_waiting"] == BENCH_CLIENTS
        assert 0 < _number(busy["sv_active"]) + _number(busy["sv_idle"]) <= BENCH_CLIENTS
        assert _number(busy["tps"]) > 0 and _number(p1["tps"]) == 0
        # waiting most first: the queued pool heads the table
        rows = chromium.find_elements("css selector", "#pools tbody tr")
        assert rows[0].get_attribute("data-pool") == "p1/postgres"
        assert "waiting" in rows[0].get_attribute("class")
        # tiles: every client, by state
        clients = sum(r["cl_active"] + r["cl_waiting"] for r in shown.values())
        assert _number(chromium.find_element("id", "t-clients").text) == clients
        assert "3 waiting" in chromium.find_element("id", "t-clients-s").text
        # workers: one row per worker process, CPU worked out between the fetches
        workers = chromium.find_elements("css selector", "#workers tbody tr")
        pids = sorted(int(w.find_element("css selector", "[data-k=pid]").text) for w in workers)
        assert pids == sorted(h.worker_pids())
        assert all(w.find_element("css selector", "[data-k=cpu]").text.endswith("%")
                   for w in workers)
        # charts: the last minutes drawn, throughput above zero
        line = chromium.find_element("css selector", "#c-tps polyline[data-series=tps]")
        assert int(line.get_attribute("data-points")) >= 3
        waiting = chromium.find_element("css selector",
                                        "#c-clients polyline[data-series=cl_waiting]")
        assert int(waiting.get_attribute("data-points")) >= 3
        assert chromium.find_element("id", "error").is_displayed() is False
    problems = [e for e in chromium.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not problems, problems
