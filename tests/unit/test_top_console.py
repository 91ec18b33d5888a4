"""Which admin console ``pgherd top`` logs in to (prefork/top.py): from a config, from a DSN."""

from __future__ import annotations

import socket
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from prefork.config import load_config
from prefork.top import conninfo_from_config, conninfo_from_dsn


def config(tmp_path: Path, settings: str, userlist: str = '"watcher" "s3cret"\n'):
    (tmp_path / "userlist.txt").write_text(userlist)
    (tmp_path / "pgherd.ini").write_text(
        "[databases]\n[pgbouncer]\nauth_type = md5\nauth_file = %s\nlisten_port = 6544\n%s"
        % (tmp_path / "userlist.txt", settings))
    return load_config(str(tmp_path / "pgherd.ini"))


def test_our_own_unix_socket_logs_in_as_pgbouncer(tmp_path, monkeypatch):
    monkeypatch.delenv("PGUSER", raising=False)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / ".s.PGSQL.6544"))  # as the running pooler would have
        params = conninfo_to_dict(conninfo_from_config(config(
            tmp_path, "unix_socket_dir = %s\nstats_users = watcher\n" % tmp_path)))
    assert (params["host"], params["port"], params["dbname"], params["user"]) == \
        (str(tmp_path), "6544", "pgbouncer", "pgbouncer")


def test_without_our_socket_tcp_as_a_stats_user_with_its_plain_password(tmp_path, monkeypatch):
    monkeypatch.delenv("PGUSER", raising=False)
    cfg = config(tmp_path, "unix_socket_dir = %s/none\nlisten_addr = *\n"
                           "stats_users = watcher\nadmin_users = boss\n" % tmp_path)
    params = conninfo_to_dict(conninfo_from_config(cfg))
    assert (params["host"], params["user"], params["password"]) == \
        ("127.0.0.1", "watcher", "s3cret")
    # a hashed secret cannot be sent as a password: libpq asks .pgpass / PGPASSWORD instead
    cfg = config(tmp_path, "unix_socket_dir =\nlisten_addr = 10.1.2.3\nadmin_users = boss\n",
                 '"boss" "md5%s"\n' % ("0" * 32))
    params = conninfo_to_dict(conninfo_from_config(cfg, user=None))
    assert (params["host"], params["user"]) == ("10.1.2.3", "boss") and "password" not in params
    assert conninfo_to_dict(conninfo_from_config(cfg, user="other"))["user"] == "other"


def test_a_dsn_defaults_to_the_admin_database():
    params = conninfo_to_dict(conninfo_from_dsn("postgresql://stats@db1:6432"))
    assert (params["host"], params["port"], params["user"], params["dbname"]) == \
        ("db1", "6432", "stats", "pgbouncer")
    params = conninfo_to_dict(conninfo_from_dsn("host=db1 dbname=pgherd", user="watcher"))
    assert (params["dbname"], params["user"]) == ("pgherd", "watcher")
