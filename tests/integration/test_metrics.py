"""The HTTP endpoint (/metrics, /health, /ready) and the stats log line, against a real service.

/metrics is parsed with prometheus_client's own parsers and compared with the admin console's
SHOW STATS / SHOW POOLS (the same shared memory, so the numbers must be equal); /ready must
flip to 503 during PAUSE and during a graceful shutdown. The Grafana dashboard is checked
against a live /metrics, and the community PgBouncer exporter's names against the console.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import time

import psycopg
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import REPO_ROOT, free_port, wait_for
from workers import http as pghttp

DASHBOARD = REPO_ROOT / "packaging" / "grafana" / "pgherd-dashboard.json"
NO_PREPARE = {"prepare_threshold": None}


# ----------------------------------------------------------------------------- helpers


def get(port: int, path: str, method: str = "GET", headers: dict | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


def try_get(port: int, path: str) -> tuple[int, str] | None:
    """(status, body), or None while nothing answers (e.g. a listener closing)."""
    try:
        status, _, body = get(port, path)
    except OSError:
        return None
    return status, body


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a text-format scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scrape: dict, metric: str, **labels: str) -> float:
    return scrape[(metric, frozenset(labels.items()))]


def scrape(port: int) -> dict:
    status, headers, body = get(port, "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(body)


@pytest.fixture
def service(pgherd):
    port = free_port()
    h = pgherd(settings={"http_listen_port": port}, workers=2)
    h.http_port = port
    return h


# ----------------------------------------------------------------------------- dashboard


def _panels(items: list) -> list:
    out = []
    for p in items:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


_SELECTOR = re.compile(r"\b((?:pgherd|pgbouncer)_[a-z0-9_]+)(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_ADDED_BY_PROMETHEUS = {"instance", "job"}


def _live_labels(body: str) -> dict[str, set[str]]:
    """{sample name: label names} of a live scrape."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_dashboard_queries_only_what_a_live_metrics_exports(service) -> None:
    """Every metric each panel (and template variable) queries is in a live /metrics, with
    the labels the expression selects or groups by."""
    h = service
    with h.connect("p0", **NO_PREPARE) as conn:  # a pool, a database and a user row
        conn.execute("SELECT 1")
        status, _, body = get(h.http_port, "/metrics")
    assert status == 200
    live = _live_labels(body)
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 40
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exprs = []
    for panel in _panels(dash["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        exprs += [(panel["title"], t["expr"]) for t in panel["targets"]]
    exprs += [(name, v["definition"]) for name, v in variables.items() if v.get("definition")]
    used = set()
    for title, expr in exprs:
        names = []
        for name, matchers in _SELECTOR.findall(expr):
            assert name in live, "%s: %s is not in /metrics" % (title, name)
            wanted = set(_MATCHER.findall(matchers)) - _ADDED_BY_PROMETHEUS
            assert wanted <= live[name], "%s: %s has no label %s" % (
                title, name, wanted - live[name])
            names.append(name)
        assert names, "%s queries no metric: %s" % (title, expr)
        for group in _BY.findall(expr):
            wanted = {g.strip() for g in group.split(",") if g.strip()} - _ADDED_BY_PROMETHEUS
            assert all(wanted <= live[n] for n in names), "%s: by (%s)" % (title, group)
        for label in re.findall(r"label_values\([^,]+,\s*([a-z_]+)\)", expr):
            assert label in _ADDED_BY_PROMETHEUS or any(label in live[n] for n in names)
        used.update(names)
    for wanted in ("pgherd_transactions_total", "pgherd_queries_total",
                   "pgherd_clients_active", "pgherd_clients_waiting", "pgherd_servers_active",
                   "pgherd_servers_idle", "pgherd_wait_time_seconds_total",
                   "pgherd_worker_rss_bytes", "pgherd_worker_cpu_seconds_total",
                   "pgherd_worker_clients", "pgherd_worker_restarts_total",
                   "pgherd_config_epoch", "pgherd_reload_failures_total"):
        assert wanted in used, wanted
    # every panel has its own id
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids))


#: What prometheus-community/pgbouncer_exporter exports from PgBouncer 1.25's console.
EXPORTER = {
    "pgbouncer_up": set(), "pgbouncer_version_info": {"version"},
    **{"pgbouncer_pools_" + n: {"database", "user"} for n in (
        "client_active_connections", "client_active_cancel_connections",
        "client_waiting_connections", "client_waiting_cancel_connections",
        "server_active_connections", "server_active_cancel_connections",
        "server_being_canceled_connections", "server_idle_connections",
        "server_used_connections", "server_testing_connections", "server_login_connections",
        "client_maxwait_seconds")},
    **{"pgbouncer_stats_" + n: {"database"} for n in (
        "queries_pooled_total", "queries_duration_seconds_total", "received_bytes_total",
        "sent_bytes_total", "client_wait_seconds_total", "sql_transactions_pooled_total",
        "server_in_transaction_seconds_total")},
    **{"pgbouncer_databases_" + n: {"name", "host", "port", "database", "force_user",
                                    "pool_mode"}
       for n in ("pool_size", "max_connections", "current_connections", "paused",
                 "disabled")},
    **{"pgbouncer_" + n: set() for n in (
        "databases", "users", "pools", "free_clients", "used_clients", "login_clients",
        "free_servers", "used_servers", "cached_dns_names", "cached_dns_zones",
        "in_flight_dns_queries", "config_max_client_connections",
        "config_max_user_connections")},
    "pgbouncer_server_connections": {"user", "database", "state", "addr", "close_needed"},
}


def test_community_exporter_names_and_values(service) -> None:
    h = service
    with h.connect("p1", **NO_PREPARE) as conn:
        for _ in range(3):
            conn.execute("SELECT 1")
        status, _, body = get(h.http_port, "/metrics")
        m = samples(body)
        live = _live_labels(body)
        stats = {r["database"]: r for r in h.admin_dicts("SHOW STATS")}
        pools = {(r["database"], r["user"]): r for r in h.admin_dicts("SHOW POOLS")}
        lists = dict(h.admin("SHOW LISTS"))
        dbs = {r["name"]: r for r in h.admin_dicts("SHOW DATABASES")}
        servers = h.admin_dicts("SHOW SERVERS")
    for name, labels in EXPORTER.items():
        assert name in live, name
        assert live[name] == labels, (name, live[name])
    p = pools[("p1", "postgres")]
    pool = {"database": "p1", "user": "postgres"}
    assert value(m, "pgbouncer_pools_client_active_connections", **pool) == p["cl_active"] == 1
    assert value(m, "pgbouncer_pools_server_idle_connections", **pool) == p["sv_idle"]
    assert value(m, "pgbouncer_stats_sql_transactions_pooled_total", database="p1") == \
        stats["p1"]["total_xact_count"] >= 3
    assert value(m, "pgbouncer_stats_queries_duration_seconds_total", database="p1") == \
        pytest.approx(float(stats["p1"]["total_query_time"]) / 1e6)
    d = dbs["p1"]
    assert value(m, "pgbouncer_databases_pool_size", name="p1", host=d["host"],
                 port=str(d["port"]), database="p1", force_user="", pool_mode="") == \
        d["pool_size"]
    # the console's own rows are in SHOW LISTS, as PgBouncer counts them
    for row in ("databases", "users", "pools", "used_servers"):
        assert value(m, "pgbouncer_" + row) == lists[row], row
    assert sum(v for (n, _), v in m.items() if n == "pgbouncer_server_connections") == \
        len(servers)
    assert value(m, "pgbouncer_version_info", version=h.admin("SHOW VERSION")[0][0]) == 1


# ----------------------------------------------------------------------------- /metrics


def test_metrics_equal_show_stats_and_show_pools(service, pg) -> None:
    h = service
    port = h.http_port
    conns = [h.connect("p0", **NO_PREPARE) for _ in range(6)]
    other = h.connect("p1", user="app", password="apppw", **NO_PREPARE)
    try:
        n = 0
        for i in range(5):
            for c in conns:
                c.execute("SELECT 1")
                n += 1
            with conns[0].transaction():
                conns[0].execute("SELECT 1")
                conns[0].execute("SELECT 2")
            n += 1
        other.execute("SELECT 1")

        m = scrape(port)
        stats = {r["database"]: r for r in h.admin_dicts("SHOW STATS")}
        pools = {(r["database"], r["user"]): r for r in h.admin_dicts("SHOW POOLS")}
        m2 = scrape(port)  # nothing ran in between: the counters must not have moved

        def total(name: str, db: str) -> float:
            return sum(v for (n_, labels), v in m.items()
                       if n_ == name and ("database", db) in labels)

        assert total("pgherd_transactions_total", "p0") == n
        for db in ("p0", "p1"):
            s = stats[db]
            assert total("pgherd_transactions_total", db) == s["total_xact_count"]
            assert total("pgherd_queries_total", db) == s["total_query_count"]
            assert total("pgherd_received_bytes_total", db) == s["total_received"]
            assert total("pgherd_sent_bytes_total", db) == s["total_sent"]
            assert total("pgherd_server_assignments_total", db) == \
                s["total_server_assignment_count"]
            # PgBouncer 1.25's SHOW STATS has no login counter: the connections made above.
            assert total("pgherd_client_logins_total", db) == (len(conns) if db == "p0" else 1)
            assert total("pgherd_xact_time_seconds_total", db) == \
                pytest.approx(float(s["total_xact_time"]) / 1e6)
            assert total("pgherd_query_time_seconds_total", db) == \
                pytest.approx(float(s["total_query_time"]) / 1e6)
            assert total("pgherd_wait_time_seconds_total", db) == \
                pytest.approx(float(s["total_wait_time"]) / 1e6)
        for (db, user), p in pools.items():
            if db == "pgbouncer":
                continue  # the admin console's pool: the console is not pooled
            lab = {"database": db, "user": user}
            assert value(m, "pgherd_clients_active", **lab) == p["cl_active"]
            assert value(m, "pgherd_clients_waiting", **lab) == p["cl_waiting"]
            assert value(m, "pgherd_servers_active", **lab) == p["sv_active"]
            assert value(m, "pgherd_servers_idle", **lab) == p["sv_idle"]
            assert value(m, "pgherd_servers_used", **lab) == p["sv_used"]
            assert value(m, "pgherd_servers_tested", **lab) == p["sv_tested"]
            assert value(m, "pgherd_servers_login", **lab) == p["sv_login"]
            assert value(m, "pgherd_servers_being_canceled", **lab) == p["sv_being_canceled"]
            assert value(m, "pgherd_maxwait_seconds", **lab) == 0
        assert value(m, "pgherd_clients_active", database="p0", user="postgres") == 6
        assert value(m, "pgherd_clients_active", database="p1", user="app") == 1
        servers_p0 = value(m, "pgherd_database_server_connections", database="p0")
        assert servers_p0 == pg.backends("p0", "postgres") == 6  # session mode: one each
        assert value(m, "pgherd_database_max_server_connections", database="p0") == 0
        counters = {k: v for k, v in m.items() if k[0].endswith("_total")
                    and not k[0].startswith("pgherd_worker_")}
        assert counters == {k: v for k, v in m2.items() if k in counters}

        # per worker and service
        pids = h.worker_pids()
        assert value(m, "pgherd_workers_configured") == 2
        assert value(m, "pgherd_workers_live") == 2
        assert value(m, "pgherd_paused") == 0
        assert value(m, "pgherd_config_epoch") == 0
        assert value(m, "pgherd_reload_failures_total") == 0
        assert value(m, "pgherd_info", version=pghttp.VERSION) == 1
        for w in ("0", "1"):
            assert value(m, "pgherd_worker_up", worker=w) == 1
            assert value(m, "pgherd_worker_state", worker=w, state="ready") == 1
            assert value(m, "pgherd_worker_state", worker=w, state="draining") == 0
            assert value(m, "pgherd_worker_rss_bytes", worker=w) > 10_000_000
            assert value(m, "pgherd_worker_cpu_seconds_total", worker=w) > 0
            assert value(m, "pgherd_worker_open_fds", worker=w) > 3
            assert value(m, "pgherd_worker_restarts_total", worker=w) == 0
            assert 0 <= value(m, "pgherd_worker_heartbeat_age_seconds", worker=w) < 2
        assert len(pids) == 2
        # clients per worker add up to the open connections (admin sessions have ended)
        wait_for(lambda: sum(value(scrape(port), "pgherd_worker_clients", worker=w)
                             for w in ("0", "1")) == 7,
                 message="7 clients over the workers")
        # CPU counters keep working across scrapes (cached psutil.Process per worker pid)
        for c in conns:
            c.execute("SELECT count(*) FROM generate_series(1, 200000)")
        later = scrape(port)
        assert sum(value(later, "pgherd_worker_cpu_seconds_total", worker=w) for w in "01") > \
            sum(value(m, "pgherd_worker_cpu_seconds_total", worker=w) for w in "01")
    finally:
        for c in conns + [other]:
            c.close()


def test_metrics_in_openmetrics_format_on_request(service) -> None:
    with service.connect("p0", **NO_PREPARE) as conn:
        conn.execute("SELECT 1")
    status, headers, body = get(
        service.http_port, "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body)}
    assert families["pgherd_transactions"].type == "counter"
    xacts = [s for s in families["pgherd_transactions"].samples
             if s.name == "pgherd_transactions_total" and s.labels["database"] == "p0"]
    assert xacts and xacts[0].value == 1
    assert families["pgherd_reload_failures"].type == "counter"


def test_config_epoch_and_reload_failures(service) -> None:
    h = service
    port = h.http_port
    h.admin("RELOAD")
    m = scrape(port)
    assert value(m, "pgherd_config_epoch") == 1
    wait_for(lambda: all(value(scrape(port), "pgherd_worker_config_epoch", worker=w) == 1
                         for w in "01"), message="workers at epoch 1")
    h.rewrite_ini(settings={"default_pool_size": "lots"})
    with pytest.raises(psycopg.Error, match="RELOAD failed"):
        h.admin("RELOAD")
    m = scrape(port)
    assert value(m, "pgherd_reload_failures_total") == 1
    assert value(m, "pgherd_config_epoch") == 1
    h.rewrite_ini(settings={"default_pool_size": None})


# ----------------------------------------------------------------------------- /health /ready


def test_health_ready_and_unknown_paths(service) -> None:
    port = service.http_port
    status, headers, body = get(port, "/health")
    assert status == 200 and body.startswith("ok"), body
    assert "2 live workers" in body
    assert headers["connection"] == "close"
    status, _, body = get(port, "/ready")
    assert status == 200 and body.startswith("ready"), body
    status, _, body = get(port, "/ready?verbose=1")  # a query string is ignored
    assert status == 200
    assert get(port, "/nope")[0] == 404
    assert get(port, "/index.html")[0] == 404  # / is the status page (test_statuspage)
    assert get(port, "/metrics/x")[0] == 404
    status, headers, _ = get(port, "/metrics", method="POST", body=b"x" * 100_000)
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert get(port, "/ready", method="DELETE")[0] == 405
    status, headers, body = get(port, "/health", method="HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 0


def test_ready_is_503_while_paused(service) -> None:
    h = service
    port = h.http_port
    assert get(port, "/ready")[0] == 200
    h.admin("PAUSE")
    try:
        status, _, body = get(port, "/ready")
        assert status == 503
        assert "worker 0 paused" in body and "worker 1 paused" in body
        assert get(port, "/health")[0] == 200  # paused is alive
        assert value(scrape(port), "pgherd_paused") == 1
    finally:
        h.admin("RESUME")
    status, _, body = get(port, "/ready")
    assert status == 200, body
    assert value(scrape(port), "pgherd_paused") == 0


def test_ready_is_503_while_shutting_down(service) -> None:
    h = service
    port = h.http_port
    conn = h.connect("p0", **NO_PREPARE)  # the service waits for this client to leave
    try:
        conn.execute("SELECT 1")
        h.signal(signal.SIGTERM)
        got = wait_for(lambda: (r := try_get(port, "/ready")) and r[0] == 503 and r,
                       message="/ready to answer 503")
        assert "shutting down" in got[1] or "not running" in got[1], got
        # still 503 (never 200 again) while the client keeps the service alive
        for _ in range(5):
            r = try_get(port, "/ready")
            assert r is None or r[0] == 503, r
        assert h.running()
        health = try_get(port, "/health")
        assert health is None or health[0] == 200
        conn.execute("SELECT 1")  # the client is still served
    finally:
        conn.close()
    assert h.wait_exit() == 0


# ----------------------------------------------------------------------------- hostile clients


def test_slow_and_oversized_http_clients_do_not_hurt_the_pooler(service) -> None:
    h = service
    port = h.http_port
    pids = h.worker_pids()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    partial = socket.create_connection(("127.0.0.1", port))
    partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
    try:
        start = time.monotonic()
        with h.connect("p0", **NO_PREPARE) as conn:
            assert conn.execute("SELECT 42").fetchone() == (42,)
        assert get(port, "/health")[0] == 200
        assert scrape(port)
        assert time.monotonic() - start < pghttp.READ_TIMEOUT

        big = socket.create_connection(("127.0.0.1", port))
        big.settimeout(10)
        big.sendall(b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * (pghttp.MAX_HEAD + 100))
        reply = big.recv(200)
        assert reply.startswith(b"HTTP/1.1 431 "), reply
        big.close()

        garbage = socket.create_connection(("127.0.0.1", port))
        garbage.settimeout(10)
        garbage.sendall(b"\x00\x01\x02 hello\r\n\r\n")
        assert garbage.recv(200).startswith(b"HTTP/1.1 400 ")
        garbage.close()

        # a client that never finishes its request is cut off after READ_TIMEOUT
        partial.settimeout(pghttp.READ_TIMEOUT + 5)
        assert partial.recv(100) == b""
        assert time.monotonic() - start >= pghttp.READ_TIMEOUT - 0.5
        with h.connect("p0", **NO_PREPARE) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for s in silent + [partial]:
            s.close()
    assert h.worker_pids() == pids  # no worker died or was replaced
    assert get(port, "/ready")[0] == 200


def _hung_up(sock: socket.socket) -> bool:
    """The server closed this connection (without our reading anything from it)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_http_clients_never_delay_an_answer(service) -> None:
    h = service
    port = h.http_port
    pids = h.worker_pids()
    # idle connections, more than either worker may keep: they arrive first, so each worker
    # has its full share open before the probes come
    extra = 40
    idle = [socket.create_connection(("127.0.0.1", port))
            for _ in range(2 * pghttp.MAX_CONNECTIONS + extra)]
    try:
        for _ in range(10):
            conn = http.client.HTTPConnection("127.0.0.1", port,
                                              timeout=pghttp.READ_TIMEOUT / 2)
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                assert resp.status == 200, resp.read()
            finally:
                conn.close()
        # bounded: each worker closed its oldest idle connections to stay within its limit
        wait_for(lambda: sum(map(_hung_up, idle)) >= extra, timeout=pghttp.READ_TIMEOUT / 2,
                 message=lambda: f"{extra} idle connections closed, "
                 f"{sum(map(_hung_up, idle))} are")
        assert not any(map(_hung_up, idle[-pghttp.MAX_CONNECTIONS // 2:]))  # the newest stay
        assert h.admin("SHOW VERSION")  # the pooler serves
    finally:
        for s in idle:
            s.close()
    assert h.worker_pids() == pids
    assert get(port, "/ready")[0] == 200


# ----------------------------------------------------------------------------- stats log line


def test_log_stats_writes_one_service_line_per_period(pgherd) -> None:
    h = pgherd(settings={"stats_period": 1, "log_stats": 1}, workers=2)
    conns = [h.connect("p0", **NO_PREPARE) for _ in range(4)]
    try:
        for _ in range(10):
            for c in conns:
                c.execute("SELECT 1")
        rx = re.compile(r"\[%d\] LOG stats: (\d+) xacts/s, (\d+) queries/s, \d+ client " % h.pid +
                        r"parses/s, \d+ server parses/s, \d+ binds/s, in \d+ B/s, out \d+ B/s, "
                        r"xact \d+ us, query \d+ us, wait \d+ us")
        # the 40 transactions show up in some line's rate (one line per second, whole service)
        wait_for(lambda: any(int(m.group(1)) > 0 for m in rx.finditer(h.log())), timeout=10,
                 message=lambda: "a stats line with transactions:\n" + h.log()[-3000:])
        # workers do not log it: every stats line is the master's
        assert set(re.findall(r"\[(\d+)\] LOG stats:", h.log())) == {str(h.pid)}
    finally:
        for c in conns:
            c.close()


def test_log_stats_off_writes_no_line(pgherd) -> None:
    h = pgherd(settings={"stats_period": 1, "log_stats": 0}, workers=1)
    with h.connect("p0", **NO_PREPARE) as conn:
        conn.execute("SELECT 1")
    # An absent line cannot be polled for: give it one and a half periods.
    deadline = time.monotonic() + 1.5
    wait_for(lambda: time.monotonic() >= deadline, timeout=5)
    assert "stats:" not in h.log()
