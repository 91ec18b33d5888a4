"""Startup parameters: what pgherd honours, drops and refuses; what a server is given."""

from types import SimpleNamespace

import pytest

from workers import startup
from workers.varcache import Tracked


def worker(ignore=()):
    return SimpleNamespace(tracked=Tracked(["IntervalStyle"]),
                           settings=SimpleNamespace(ignore_startup_parameters=list(ignore)))


def test_every_setting_is_taken_tracked_ones_apart():
    s = startup.parse(worker(), {
        "user": "u", "database": "d", "application_name": "app", "statement_timeout": "5s",
        "options": "-c DateStyle=German -c work_mem=8MB --geqo=off", "_pq_.x": "1"})
    assert s.tracked == {"application_name": "app", "DateStyle": "German"}
    assert s.extra == {"statement_timeout": "5s", "work_mem": "8MB", "geqo": "off"}
    # the same parameters spelled otherwise make the same key (session-mode servers)
    again = startup.parse(worker(), {"datestyle": "German", "Work_Mem": "8MB", "geqo": "off",
                                     "statement_timeout": "5s", "application_name": "app"})
    assert again.key == s.key


def test_ignored_parameters_are_dropped_as_pgbouncer_drops_them():
    s = startup.parse(worker(["jit", "options"]), {
        "jit": "off", "options": "-c work_mem=8MB -c TimeZone=UTC", "geqo": "off"})
    assert s.tracked == {"TimeZone": "UTC"}  # tracked ones in options still count
    assert s.extra == {"geqo": "off"}
    assert startup.parse(worker(["options"]), {"options": "-X"}).key == ()


@pytest.mark.parametrize("params,text", [
    ({"options": "-X"}, "only '-c config=val' and '--config=val' are allowed"),
    ({"replication": "true"}, "replication connections are not supported yet"),
])
def test_refused(params, text):
    with pytest.raises(startup.StartupError, match=text):
        startup.parse(worker(), params)


def test_server_packet_puts_the_clients_values_over_the_databases():
    s = startup.parse(worker(), {"datestyle": "German", "work_mem": "8MB"})
    packet = startup.server_packet({"DateStyle": "ISO", "TimeZone": "UTC"}, s.key)
    assert packet == {"TimeZone": "UTC", "datestyle": "German", "work_mem": "8MB"}


def test_link_query_applies_settings_and_takes_back_the_last_clients():
    client = SimpleNamespace(params={"TimeZone": "UTC"},
                             extra={"search_path": "a, b", "work_mem": "8MB"})
    server = SimpleNamespace(params={"TimeZone": "UTC"},
                             extra={"work_mem": "8MB", "my.var": "x", "statement_timeout": "1s"})
    assert startup.link_query(client, server) == (
        "SELECT pg_catalog.set_config('search_path', 'a, b', false);"
        'RESET "my"."var";RESET "statement_timeout";')
    server.extra = dict(client.extra)
    assert startup.link_query(client, server) is None
