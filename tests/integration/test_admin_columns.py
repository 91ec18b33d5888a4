"""The admin console column for column and type for type: PgBouncer 1.25's (the version SHOW
VERSION names), and the columns pgherd shares with the installed PgBouncer (1.18) by name,
relative position and type. Also the admin database's own rows, as PgBouncer lists them."""

from __future__ import annotations

import psycopg
import pytest

I, Q, N, S, B = 23, 20, 1700, 25, 17  # int4, int8, numeric, text, bytea (PgBouncer's i q N s b)


def _cols(spec: str, names: str) -> list[tuple[str, int]]:
    """PgBouncer's own notation: a type letter per column ('T', a timestamp, is sent as text)."""
    types = {"i": I, "q": Q, "N": N, "s": S, "T": S, "b": B}
    names_list = names.split()
    assert len(spec) == len(names_list)
    return [(n, types[t]) for t, n in zip(spec, names_list)]


_SOCKET = ("type user database replication state addr port local_addr local_port connect_time "
           "request_time wait wait_us close_needed ptr link remote_pid tls application_name "
           "prepared_statements id")
_SKF_STD = "ssssssisiTTiiississii"  # admin.c's SKF_STD and SKF_DBG
_SKF_DBG = _SKF_STD + "iiiiiii"
_DEBUG = " recv_pos pkt_pos pkt_remain send_pos send_remain pkt_avail send_avail"
_STATS = ("server_assignment_count xact_count query_count {recv} {sent} xact_time query_time "
          "wait_time {ps}client_parse_count {ps}server_parse_count {ps}bind_count")

#: Written from PgBouncer 1.25's src/admin.c and src/stats.c (RowDescription calls).
PGBOUNCER_125 = {
    "SHOW VERSION": _cols("s", "version"),
    "SHOW CONFIG": _cols("ssss", "key value default changeable"),
    "SHOW DATABASES": _cols(
        "ssissiiiissiiiiii",
        "name host port database force_user pool_size min_pool_size reserve_pool_size "
        "server_lifetime pool_mode load_balance_hosts max_connections current_connections "
        "max_client_connections current_client_connections paused disabled"),
    "SHOW PEERS": _cols("isii", "peer_id host port pool_size"),
    "SHOW POOLS": _cols(
        "ssiiiiiiiiiiiiiss",
        "database user cl_active cl_waiting cl_active_cancel_req cl_waiting_cancel_req "
        "sv_active sv_active_cancel sv_being_canceled sv_idle sv_used sv_tested sv_login "
        "maxwait maxwait_us pool_mode load_balance_hosts"),
    "SHOW PEER_POOLS": _cols("iiiii", "peer_id cl_active_cancel_req cl_waiting_cancel_req "
                                      "sv_active_cancel sv_login"),
    "SHOW CLIENTS": _cols(_SKF_STD, _SOCKET),
    "SHOW SERVERS": _cols(_SKF_STD, _SOCKET),
    "SHOW SOCKETS": _cols(_SKF_DBG, _SOCKET + _DEBUG),
    "SHOW ACTIVE_SOCKETS": _cols(_SKF_DBG, _SOCKET + _DEBUG),
    "SHOW USERS": _cols("ssssiiii", "name pool_size reserve_pool_size pool_mode "
                                    "max_user_connections current_connections "
                                    "max_user_client_connections current_client_connections"),
    "SHOW LISTS": _cols("si", "list items"),
    "SHOW MEM": _cols("siiii", "name size used free memtotal"),
    "SHOW DNS_HOSTS": _cols("sqs", "hostname ttl addrs"),
    "SHOW DNS_ZONES": _cols("sqi", "zonename serial count"),
    "SHOW STATE": _cols("ss", "key value"),
    "SHOW FDS": _cols("issssiqisssssbb", "fd task user database addr port cancel link "
                                         "client_encoding std_strings datestyle timezone "
                                         "password scram_client_key scram_server_key"),
    "SHOW STATS": _cols("s" + "N" * 22, "database " + " ".join(
        ["total_" + c for c in _STATS.format(recv="received", sent="sent", ps="").split()]
        + ["avg_" + c for c in _STATS.format(recv="recv", sent="sent", ps="").split()])),
    "SHOW STATS_TOTALS": _cols("s" + "N" * 11, "database " + _STATS.format(
        recv="bytes_received", sent="bytes_sent", ps="")),
    "SHOW STATS_AVERAGES": _cols("s" + "N" * 11, "database " + _STATS.format(
        recv="bytes_received", sent="bytes_sent", ps="avg_")),
    "SHOW TOTALS": _cols("sN", "name value"),
}

#: SHOW LISTS rows and SHOW TOTALS rows, in 1.25's order.
LISTS_125 = ["databases", "users", "peers", "pools", "peer_pools", "free_clients",
             "used_clients", "login_clients", "free_servers", "used_servers", "dns_names",
             "dns_zones", "dns_queries", "dns_pending"]
_TOTALS = ("server_assignment_count xact_count query_count client_bytes server_bytes "
           "xact_time query_time wait_time ps_client_parse_count ps_server_parse_count "
           "ps_bind_count").split()
TOTALS_125 = ["total_" + n for n in _TOTALS] + ["avg_" + n for n in _TOTALS]

#: Columns 1.18 had that 1.25 renamed (pgherd follows 1.25; see the README).
RENAMED_SINCE_118 = {("SHOW DATABASES", "reserve_pool"): "reserve_pool_size"}

TXN = {"pool_mode": "transaction", "stats_users": "watcher"}


def _describe(dsn: str, command: str) -> tuple[list[tuple[str, int]], list[tuple]]:
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        cur = conn.execute(command)
        return [(c.name, c.type_code) for c in cur.description], cur.fetchall()


def test_every_show_command_has_pgbouncer_125s_columns(pgherd):
    h = pgherd(settings=TXN, workers=2)
    with h.connect("p1") as client:  # something in every view
        client.execute("SELECT 1")
        wrong = {}
        for command, expected in PGBOUNCER_125.items():
            got, rows = _describe(h.dsn("pgbouncer"), command)
            if got != expected:
                wrong[command] = got
            for row in rows:
                assert len(row) == len(expected), command
    assert not wrong, wrong
    assert [r[0] for r in h.admin("SHOW LISTS")] == LISTS_125
    assert [r[0] for r in h.admin("SHOW TOTALS")] == TOTALS_125


def test_show_help_lists_pgbouncers_commands(pgherd):
    h = pgherd(settings=TXN, workers=1)
    notices = []
    with psycopg.connect(h.dsn("pgbouncer"), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_detail))
        conn.execute("SHOW HELP")
    assert "SHOW DNS_HOSTS|DNS_ZONES" in notices[0]
    assert "KILL_CLIENT <client_id>" in notices[0]


def test_admin_database_has_its_own_rows(pgherd):
    h = pgherd(settings=TXN, workers=2)
    with psycopg.connect(h.dsn("pgbouncer"), autocommit=True,
                         application_name="console") as console:
        console.execute("SHOW VERSION")
        me = console.info.backend_pid
        dbs = {r["name"]: r for r in h.admin_dicts("SHOW DATABASES")}
        assert dbs["pgbouncer"]["pool_size"] == 2 and dbs["pgbouncer"]["pool_mode"] == "statement"
        assert dbs["pgbouncer"]["force_user"] == "pgbouncer"
        assert dbs["pgbouncer"]["current_client_connections"] == 2  # console + this query's
        pools = [r for r in h.admin_dicts("SHOW POOLS") if r["database"] == "pgbouncer"]
        assert [(p["user"], p["cl_active"], p["pool_mode"]) for p in pools] == [
            ("pgbouncer", 2, "statement")]
        assert "pgbouncer" in [r["name"] for r in h.admin_dicts("SHOW USERS")]
        clients = [r for r in h.admin_dicts("SHOW CLIENTS") if r["database"] == "pgbouncer"]
        assert len(clients) == 2
        assert "console" in [c["application_name"] for c in clients]
        assert all(c["state"] == "idle" and c["user"] == "postgres" for c in clients)
        assert me == 0  # the console's BackendKeyData, as PgBouncer's
        stats = {r["database"]: r for r in h.admin_dicts("SHOW STATS")}
        assert stats["pgbouncer"]["total_query_count"] >= 2  # SHOW VERSION, SHOW DATABASES...
        lists = dict(h.admin("SHOW LISTS"))
        assert lists["pools"] >= 1 and lists["used_clients"] >= 2


def test_show_fds_is_for_admins_only(pgherd):
    h = pgherd(settings=TXN, userlist={"watcher": "watchpw"}, workers=2)
    with h.connect("p1") as client:
        client.execute("SELECT 1")
        rows = h.admin_dicts("SHOW FDS")
        assert sum(r["task"] == "pooler" for r in rows) >= 2  # every worker's listeners
        assert [r["database"] for r in rows if r["task"] == "client"] == ["p1"]
        assert [r["database"] for r in rows if r["task"] == "server"] == ["p1"]
    with pytest.raises(psycopg.Error, match="admin access needed"):
        h.admin("SHOW FDS", user="watcher")


@pytest.mark.parametrize("command", sorted(c for c in PGBOUNCER_125
                                           if c not in ("SHOW PEERS", "SHOW PEER_POOLS",
                                                        "SHOW STATE")))
def test_columns_shared_with_pgbouncer_118(pgherd, pgbouncer, command):
    """The installed PgBouncer (Debian's 1.18) side by side: every column it has is in
    pgherd's answer (or renamed by 1.25), in the same relative order, with the same type."""
    h = pgherd(settings=TXN, workers=2)
    theirs, _ = _describe(pgbouncer().admin_dsn, command)
    ours, _ = _describe(h.dsn("pgbouncer"), command)
    ours_by_name = dict(ours)
    theirs = [(RENAMED_SINCE_118.get((command, n), n), t) for n, t in theirs]
    missing = [n for n, _ in theirs if n not in ours_by_name]
    assert not missing, "%s lacks %s" % (command, missing)
    shared = [n for n, _ in ours if n in dict(theirs)]
    assert shared == [n for n, _ in theirs], "shared columns out of PgBouncer's order"
    assert [(n, ours_by_name[n]) for n, _ in theirs] == theirs, "types differ"


def test_config_keys_cover_pgbouncers(pgherd, pgbouncer):
    h = pgherd(settings=TXN, workers=2)
    with psycopg.connect(pgbouncer().admin_dsn, autocommit=True, prepare_threshold=None) as conn:
        theirs = {r[0] for r in conn.execute("SHOW CONFIG")}
    ours = {r[0] for r in h.admin("SHOW CONFIG")}
    assert theirs <= ours, sorted(theirs - ours)
