"""The admin console for the whole service: views that span workers, control commands that
act on every worker, access rules, and PgBouncer's column names side by side with PgBouncer."""

from __future__ import annotations

import threading

import psycopg
import pytest

from tests.helpers import wait_for

WORKERS = 4
TXN = {"pool_mode": "transaction", "stats_users": "watcher"}
NO_PREPARE = {"prepare_threshold": None}


def _slot(conn: psycopg.Connection) -> int:
    """The worker slot of a transaction-mode client: the top bits of its made-up pid."""
    return conn.info.backend_pid >> 24


def _admin_error(h, command: str, user: str = "postgres") -> str:
    with pytest.raises(psycopg.Error) as info:
        h.admin(command, user=user)
    return str(info.value)


def test_show_clients_and_servers_span_all_workers(pgherd):
    h = pgherd(settings=TXN, workers=WORKERS)
    conns = [h.connect("p1", **NO_PREPARE) for _ in range(12)]
    assert len({_slot(c) for c in conns}) > 1
    clients = [r for r in h.admin_dicts("SHOW CLIENTS") if r["database"] == "p1"]
    assert len(clients) == 12
    assert len({r["id"] for r in clients}) == 12
    for c in conns:
        c.execute("SELECT 1")
    servers = [r for r in h.admin_dicts("SHOW SERVERS") if r["database"] == "p1"]
    pools = [r for r in h.admin_dicts("SHOW POOLS") if r["database"] == "p1"]
    assert pools[0]["cl_active"] == 12 and pools[0]["cl_waiting"] == 0
    assert pools[0]["sv_idle"] + pools[0]["sv_active"] == len(servers) > 0
    workers = h.admin_dicts("SHOW WORKERS")
    assert sorted(r["pid"] for r in workers) == sorted(h.worker_pids())
    assert sum(r["clients"] for r in workers) >= 12
    for c in conns:
        c.close()


def test_pause_holds_new_queries_until_resume(pgherd):
    h = pgherd(settings=TXN, workers=WORKERS)
    conn = h.connect("p1", **NO_PREPARE)
    conn.execute("SELECT 1")
    h.admin("PAUSE")
    assert dict(h.admin("SHOW STATE"))["paused"] == "yes"
    done = threading.Event()

    def query():
        conn.execute("SELECT 2")
        done.set()

    t = threading.Thread(target=query)
    t.start()
    wait_for(lambda: any(r["cl_waiting"] == 1 for r in h.admin_dicts("SHOW POOLS")))
    assert not done.is_set()
    assert _admin_error(h, "PAUSE").endswith("already suspended/paused")
    h.admin("RESUME")
    t.join(10)
    assert done.is_set()
    assert _admin_error(h, "RESUME").endswith("pooler is not paused/suspended")
    conn.close()


def test_kill_drops_the_database_clients_and_holds_new_ones(pgherd):
    h = pgherd(settings=TXN, workers=WORKERS)
    victims = [h.connect("p1", **NO_PREPARE) for _ in range(6)]
    bystander = h.connect("p2", **NO_PREPARE)
    for c in victims:
        c.execute("SELECT 1")
    h.admin("KILL p1")
    for c in victims:
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    assert bystander.execute("SELECT 3").fetchone() == (3,)
    late = h.connect("p1", **NO_PREPARE)  # logs in, but its queries wait: p1 is paused
    result = {}
    t = threading.Thread(target=lambda: result.update(v=late.execute("SELECT 4").fetchone()))
    t.start()
    wait_for(lambda: any(r["database"] == "p1" and r["cl_waiting"] == 1
                         for r in h.admin_dicts("SHOW POOLS")))
    h.admin("RESUME p1")
    t.join(10)
    assert result["v"] == (4,)
    for c in [late, bystander]:
        c.close()


def test_kill_alone_kills_every_database(pgherd):
    """PgBouncer 1.25: KILL without a database; each database stays paused until RESUME db."""
    h = pgherd(settings=TXN, workers=WORKERS)
    victims = [h.connect(db, **NO_PREPARE) for db in ("p1", "p2", "p1")]
    for c in victims:
        c.execute("SELECT 1")
    h.admin("KILL")
    for c in victims:
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    assert {r["name"] for r in h.admin_dicts("SHOW DATABASES") if r["paused"]} >= {"p1", "p2"}
    h.admin("RESUME p1")
    with h.connect("p1", **NO_PREPARE) as again:
        assert again.execute("SELECT 8").fetchone() == (8,)


def test_reconnect_replaces_servers(pg, pgherd):
    h = pgherd(settings={**TXN, "default_pool_size": 1}, workers=1)
    conn = h.connect("p1", **NO_PREPARE)
    before = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    h.admin("RECONNECT p1")
    h.admin("WAIT_CLOSE p1")
    after = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert after != before
    conn.close()


def test_disable_refuses_new_clients_with_pgbouncers_error(pgherd):
    databases = {k: v for k, v in pgherd.default_databases.items() if k != "*"}
    h = pgherd(settings=TXN, databases=databases, workers=WORKERS)
    existing = h.connect("p1", **NO_PREPARE)
    h.admin("DISABLE p1")
    with pytest.raises(psycopg.OperationalError, match='database "p1" is disabled'):
        h.connect("p1")
    assert existing.execute("SELECT 5").fetchone() == (5,)
    assert [r["disabled"] for r in h.admin_dicts("SHOW DATABASES") if r["name"] == "p1"] == [1]
    h.admin("ENABLE p1")
    with h.connect("p1") as again:
        assert again.execute("SELECT 6").fetchone() == (6,)
    existing.close()
    assert _admin_error(h, "DISABLE nosuchdb").endswith("no such database: nosuchdb")


def test_kill_client_by_id(pgherd):
    h = pgherd(settings=TXN, workers=WORKERS)
    target, other = h.connect("p1"), h.connect("p2")
    ids = [r["id"] for r in h.admin_dicts("SHOW CLIENTS") if r["database"] == "p1"]
    assert len(ids) == 1
    h.admin("KILL_CLIENT %d" % ids[0])
    with pytest.raises(psycopg.OperationalError):
        target.execute("SELECT 1")
    assert other.execute("SELECT 1").fetchone() == (1,)
    assert _admin_error(h, "KILL_CLIENT %d" % ids[0]).endswith("client not found")
    other.close()


def test_stats_users_may_look_but_not_touch(pgherd):
    h = pgherd(settings=TXN, userlist={"watcher": "watchpw"}, workers=2)
    assert h.admin("SHOW VERSION", user="watcher")[0][0].startswith("PgBouncer ")
    assert _admin_error(h, "PAUSE", user="watcher").endswith("admin access needed")
    with pytest.raises(psycopg.OperationalError, match="not allowed"):
        h.admin("SHOW POOLS", user="app")


def test_set_changes_every_worker(pg, pgherd):
    h = pgherd(settings={**TXN, "default_pool_size": 10}, workers=WORKERS)
    h.admin("SET default_pool_size = 2")
    assert dict((k, v) for k, v, *_ in h.admin("SHOW CONFIG"))["default_pool_size"] == "2"
    conns = [h.connect("p2", **NO_PREPARE) for _ in range(8)]
    threads = [threading.Thread(target=c.execute, args=("SELECT pg_sleep(0.2)",))
               for c in conns]
    for t in threads:
        t.start()
    peak = 0
    while any(t.is_alive() for t in threads):
        peak = max(peak, pg.backends(dbname="p2"))
    for t in threads:
        t.join()
    assert 0 < peak <= 2
    assert _admin_error(h, "SET no_such_key = 1").endswith("SET failed")
    for c in conns:
        c.close()


def test_failed_reload_answers_pgbouncers_error(pgherd):
    h = pgherd(settings=TXN, workers=2)
    h.rewrite_ini(settings={"pool_mode": "no-such-mode"})
    error = _admin_error(h, "RELOAD")
    assert "RELOAD failed, see logs for additional details" in error
    assert "pool_mode" in h.log()
    assert dict((k, v) for k, v, *_ in h.admin("SHOW CONFIG"))["pool_mode"] == "transaction"


def test_extended_protocol_is_refused(pgherd):
    h = pgherd(settings=TXN, workers=2)
    with psycopg.connect(h.dsn("pgbouncer"), autocommit=True) as conn:
        with pytest.raises(psycopg.Error,
                           match="extended query protocol not supported by admin console"):
            conn.execute("SHOW VERSION", prepare=True)
