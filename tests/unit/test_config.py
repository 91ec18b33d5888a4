"""Configuration loading: the settings table, pgbouncer.ini parsing, auth_file, the example file."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from prefork.config import (
    Config,
    ConfigError,
    companion_path,
    Database,
    Problem,
    User,
    load_config,
    load_userlist,
)
from prefork.settings import DATABASE_PARAMS, SETTINGS, USER_PARAMS, render_example_ini

REPO = Path(__file__).resolve().parents[2]
MD5_APP = "md56a422f785c9e20873908ce25d1736ae2"  # md5("secret" + "app")


@pytest.fixture
def write(tmp_path: Path):
    """write(text, name=...) -> path of a file in tmp_path; a userlist.txt is always there."""
    (tmp_path / "userlist.txt").write_text(f'"app" "{MD5_APP}"\n')

    def _write(text: str, name: str = "pgherd.ini") -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    return _write


def ini(body: str = "", pgbouncer: str = "", auth: bool = True) -> str:
    """A config text: a [pgbouncer] section (with a readable auth_file) plus ``body``."""
    head = "[pgbouncer]\nauth_type = trust\nauth_file = userlist.txt\n" if auth else "[pgbouncer]\n"
    return head + pgbouncer + body


def errors(exc: pytest.ExceptionInfo[ConfigError]) -> list[tuple[str, int, str]]:
    return [(os.path.basename(p.file), p.line, p.key) for p in exc.value.problems]


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # auth_file and %include are relative to the working directory, like PgBouncer.
    monkeypatch.chdir(tmp_path)


# --- the settings table ----------------------------------------------------------------------


REFERENCE_KEYS = """
listen_addr listen_port unix_socket_dir unix_socket_mode unix_socket_group listen_backlog
so_reuseport tcp_defer_accept tcp_socket_buffer tcp_keepalive tcp_keepcnt tcp_keepidle
tcp_keepintvl tcp_user_timeout user pidfile job_name service_name conffile peer_id
pool_mode max_client_conn default_pool_size min_pool_size reserve_pool_size reserve_pool_timeout
max_db_connections max_db_client_connections max_user_connections max_user_client_connections
server_round_robin max_prepared_statements track_extra_parameters ignore_startup_parameters
disable_pqexec application_name_add_host stats_period scram_iterations autodb_idle_timeout
pool_idle_timeout dns_max_ttl dns_nxdomain_ttl dns_zone_check_period resolv_conf pkt_buf
max_packet_size sbuf_loopcnt query_wait_notify login_notify_message
server_lifetime server_idle_timeout server_connect_timeout server_login_retry server_check_delay
server_check_query server_reset_query server_reset_query_always server_fast_close
client_login_timeout client_idle_timeout query_timeout query_wait_timeout cancel_wait_timeout
idle_transaction_timeout transaction_timeout suspend_timeout
auth_type auth_file auth_hba_file auth_ident_file auth_user auth_query auth_dbname auth_ldap_options
client_tls_sslmode client_tls_key_file client_tls_cert_file client_tls_ca_file client_tls_protocols
client_tls_ciphers client_tls13_ciphers client_tls_ecdhcurve client_tls_dheparams
server_tls_sslmode server_tls_ca_file server_tls_key_file server_tls_cert_file server_tls_protocols
server_tls_ciphers server_tls13_ciphers
logfile syslog syslog_ident syslog_facility log_connections log_disconnections log_pooler_errors
log_stats verbose admin_users stats_users
workers shutdown_timeout http_listen_addr http_listen_port heartbeat_timeout max_worker_memory
allow_root
""".split()

SUPPORTED = """
listen_addr listen_port unix_socket_dir unix_socket_mode listen_backlog so_reuseport pidfile
logfile verbose log_connections log_disconnections log_pooler_errors auth_type auth_file
admin_users stats_users pool_mode max_client_conn default_pool_size min_pool_size
reserve_pool_size reserve_pool_timeout max_db_connections max_user_connections server_round_robin
track_extra_parameters ignore_startup_parameters disable_pqexec application_name_add_host
server_lifetime server_idle_timeout server_connect_timeout server_login_retry server_check_delay
server_check_query server_reset_query server_reset_query_always client_login_timeout
client_idle_timeout query_timeout query_wait_timeout idle_transaction_timeout tcp_keepalive
pkt_buf max_packet_size stats_period conffile workers shutdown_timeout heartbeat_timeout
max_worker_memory http_listen_addr http_listen_port log_stats syslog syslog_ident syslog_facility
max_prepared_statements tcp_defer_accept transaction_timeout user allow_root
""".split()

RESTART = """
disable_pqexec job_name service_name listen_addr listen_backlog listen_port pidfile pkt_buf
resolv_conf so_reuseport track_extra_parameters unix_socket_dir unix_socket_group
unix_socket_mode user http_listen_addr http_listen_port tcp_defer_accept allow_root
""".split()


def test_table_has_every_key_and_nothing_else() -> None:
    assert sorted(SETTINGS) == sorted(REFERENCE_KEYS)
    assert {n for n, s in SETTINGS.items() if s.supported} == set(SUPPORTED)
    assert {n for n, s in SETTINGS.items() if not s.reload} == set(RESTART)


def test_defaults_round_trip_through_their_text_form() -> None:
    for s in [*SETTINGS.values(), *DATABASE_PARAMS.values(), *USER_PARAMS.values()]:
        assert s.doc and "\n" not in s.doc, s.name
        if s.default is not None:
            assert s.parse(s.render(s.default)) == s.default, s.name


def test_notable_defaults() -> None:
    d = {n: s.default for n, s in SETTINGS.items()}
    assert d["server_check_query"] == "<empty>"
    assert d["track_extra_parameters"] == ("IntervalStyle",)
    assert d["listen_addr"] == () and SETTINGS["listen_addr"].render(()) == ""
    assert d["unix_socket_dir"] == "/tmp"
    assert d["unix_socket_mode"] == 0o777 and SETTINGS["unix_socket_mode"].render(0o777) == "0777"
    assert d["auth_type"] == "md5"
    assert d["max_prepared_statements"] == 200
    assert d["server_reset_query"] == "DISCARD ALL"
    assert d["reserve_pool_timeout"] == 5.0 and isinstance(d["query_wait_timeout"], float)


def test_struct_fields_match_the_parameter_tables() -> None:
    assert set(Database.__struct_fields__) == {"name", *DATABASE_PARAMS}
    assert set(User.__struct_fields__) == {"name", *USER_PARAMS}


# --- values of every kind --------------------------------------------------------------------


def test_every_kind_parses(write) -> None:
    cfg = load_config(write(ini(pgbouncer="""
listen_port = 7000
query_timeout = 2.5
server_round_robin = yes
log_connections = OFF
disable_pqexec = True
so_reuseport = 1
server_reset_query = DISCARD ALL; SELECT 1
pool_mode = Transaction
admin_users = alice, bob ,,carol
listen_addr = *
unix_socket_mode = 0700
""")))
    s = cfg.settings
    assert s.listen_port == 7000
    assert s.query_timeout == 2.5
    assert s.server_round_robin is True and s.log_connections is False and s.disable_pqexec is True
    assert s.so_reuseport is True
    assert s.server_reset_query == "DISCARD ALL; SELECT 1"
    assert s.pool_mode == "transaction"
    assert s.admin_users == ("alice", "bob", "carol")
    assert s.listen_addr == ("*",)
    assert s.unix_socket_mode == 0o700
    assert s.server_connect_timeout == 15.0  # untouched default
    assert cfg.warnings == ()


@pytest.mark.parametrize("raw", ["0777", "777", "0o777"])
def test_octal_spellings(raw: str) -> None:
    assert SETTINGS["unix_socket_mode"].parse(raw) == 0o777


def test_settings_are_frozen_and_typed(write) -> None:
    cfg = load_config(write(ini()))
    with pytest.raises(AttributeError):
        cfg.settings.listen_port = 1  # type: ignore[misc]
    assert isinstance(cfg.settings.listen_port, int)
    assert isinstance(cfg.settings.server_lifetime, float)


def test_workers_zero_means_one_per_cpu(write) -> None:
    assert load_config(write(ini())).settings.workers == (os.cpu_count() or 1)
    assert load_config(write(ini(pgbouncer="workers = 3\n"))).settings.workers == 3


def test_a_set_value_resolves_as_the_same_value_in_the_file(write) -> None:
    """The console's SET workers = 0 is one worker per CPU too, not zero workers."""
    path = write(ini(pgbouncer="workers = 3\n"))
    config = load_config(path)
    assert config.with_setting("workers", 0).settings.workers == (os.cpu_count() or 1)
    assert config.with_setting("workers", 2).settings.workers == 2
    assert config.with_setting("conffile", "").settings.conffile == path


def test_conffile_defaults_to_the_loaded_path(write) -> None:
    path = write(ini())
    assert load_config(path).settings.conffile == path
    assert load_config(write(ini(pgbouncer="conffile = /other.ini\n"))).settings.conffile == "/other.ini"


def test_pgherd_section_name_and_later_duplicate_wins(write) -> None:
    cfg = load_config(write("[pgherd]\nauth_type = any\ndefault_pool_size = 5\ndefault_pool_size = 7\n"))
    assert cfg.settings.default_pool_size == 7
    assert cfg.warnings == ()


def test_comments_blank_lines_and_crlf(write) -> None:
    cfg = load_config(write("; c\r\n# c\r\n\r\n[pgbouncer]  ; trailing\r\nauth_type = any\r\n  ;indented\r\n"))
    assert cfg.settings.auth_type == "any"


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "fragment"),
    [
        ("pool_mode = sesion", "pool_mode", "invalid value 'sesion' (expected session, transaction, statement)"),
        ("listen_port = 70000", "listen_port", "out of range (expected 1..65535)"),
        ("listen_port = 0", "listen_port", "out of range"),
        ("default_pool_size = -1", "default_pool_size", "out of range (expected >= 0)"),
        ("default_pool_size = 20x", "default_pool_size", "expected an integer"),
        ("query_timeout = -5", "query_timeout", "out of range"),
        ("query_timeout = soon", "query_timeout", "expected seconds"),
        ("query_timeout = inf", "query_timeout", "expected seconds"),
        ("server_round_robin = maybe", "server_round_robin", "expected 1/0, yes/no, on/off, true/false"),
        ("unix_socket_mode = 0789", "unix_socket_mode", "octal"),
        ("pool_mod = session", "pool_mod", "unknown setting (did you mean pool_mode?)"),
        ("auth_type = kerberos", "auth_type", "invalid value 'kerberos'"),
    ],
)
def test_bad_values_name_file_line_and_key(write, line: str, key: str, fragment: str) -> None:
    path = write(ini(pgbouncer=line + "\n"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert errors(exc) == [("pgherd.ini", 4, key)]
    assert fragment in exc.value.problems[0].message
    assert str(exc.value).startswith(f"{path}:4: {key}: ")


@pytest.mark.parametrize("auth_type", ["cert", "hba", "ldap", "pam"])
def test_auth_types_pgherd_does_not_implement_are_errors(write, auth_type: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(f"[pgbouncer]\nauth_type = {auth_type}\n"))
    assert errors(exc) == [("pgherd.ini", 2, "auth_type")]
    message = exc.value.problems[0].message
    assert auth_type in message and "supported: trust, any, plain, md5, scram-sha-256" in message


def test_problem_renders_file_line_key_message() -> None:
    p = Problem("/etc/pgherd/pgherd.ini", 12, "pool_mode", "invalid value 'sesion'")
    assert str(p) == "/etc/pgherd/pgherd.ini:12: pool_mode: invalid value 'sesion'"
    assert str(Problem("f.ini", 0, "", "no [pgbouncer] section")) == "f.ini: no [pgbouncer] section"


def test_all_errors_are_reported_together(write) -> None:
    path = write(ini("""
[databases]
pgbouncer = host=x
good = host=x pool_size=many
[nonsense]
whatever = 1
""", pgbouncer="pool_mode = x\nlisten_port = -1\nbogus = 1\n"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert errors(exc) == [
        ("pgherd.ini", 4, "pool_mode"),
        ("pgherd.ini", 5, "listen_port"),
        ("pgherd.ini", 6, "bogus"),
        ("pgherd.ini", 9, "pgbouncer"),
        ("pgherd.ini", 10, "good"),
        ("pgherd.ini", 11, "[nonsense]"),
    ]
    assert str(exc.value).count("\n") == 5


def test_unknown_section_skips_its_lines(write) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(ini("[nonsense]\na = 1\nb = 2\n")))
    assert errors(exc) == [("pgherd.ini", 4, "[nonsense]")]
    assert "unknown section" in exc.value.problems[0].message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[pgbouncer\n", 1),
        ("[pgbouncer]\nthis is not a setting\n", 2),
        ("[pgbouncer]\n%inclde other.ini\n", 2),
        ("[pgbouncer] junk\n", 1),
    ],
)
def test_syntax_errors(write, text: str, line: int) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(text))
    assert ("pgherd.ini", line) in [(f, n) for f, n, _ in errors(exc)]
    assert any("syntax error" in p.message for p in exc.value.problems)


def test_setting_before_any_section(write) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write("listen_port = 1\n" + ini()))
    assert errors(exc) == [("pgherd.ini", 1, "listen_port")]


def test_missing_main_section_and_missing_file(write, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write("[databases]\na = host=x\n"))
    assert "no [pgbouncer] section" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(str(tmp_path / "absent.ini"))
    assert errors(exc) == [("absent.ini", 0, "")]
    assert "No such file" in str(exc.value)


# --- %include --------------------------------------------------------------------------------


def test_include_relative_to_cwd_then_to_the_including_file(write, tmp_path: Path) -> None:
    write("default_pool_size = 3\n", "conf.d/pool.ini")
    write("%include pool.ini\nmax_client_conn = 9\n", "conf.d/main-part.ini")
    path = write(ini(pgbouncer="%include conf.d/main-part.ini\n"))
    cfg = load_config(path)  # conf.d/main-part.ini from the cwd, pool.ini next to main-part.ini
    assert cfg.settings.default_pool_size == 3 and cfg.settings.max_client_conn == 9

    (tmp_path / "elsewhere").mkdir()
    os.chdir(tmp_path / "elsewhere")  # conf.d/ is now found next to pgherd.ini, not in the cwd
    cfg = load_config(path, {"auth_file": str(tmp_path / "userlist.txt")})
    assert cfg.settings.default_pool_size == 3


def test_include_keeps_and_passes_on_the_section(write) -> None:
    write("[databases]\nfromincluded = host=db1\n", "dbs.ini")
    cfg = load_config(write(ini("%include dbs.ini\nafter = host=db2\n")))
    assert set(cfg.databases) == {"fromincluded", "after"}


def test_missing_include_names_the_including_line(write) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(ini(pgbouncer="%include nowhere.ini\n")))
    assert errors(exc) == [("pgherd.ini", 4, "%include")]
    assert "nowhere.ini" in str(exc.value) and "No such file" in str(exc.value)


def test_include_cycle(write) -> None:
    write("%include b.ini\n", "a.ini")
    write("\n%include a.ini\n", "b.ini")
    with pytest.raises(ConfigError) as exc:
        load_config(write(ini(pgbouncer="%include a.ini\n")))
    assert errors(exc) == [("b.ini", 2, "%include")]
    assert "include cycle" in str(exc.value)


def test_include_nesting_limit(write) -> None:
    for level in range(1, 12):
        write(f"%include level{level + 1}.ini\n" if level < 11 else "max_client_conn = 5\n", f"level{level}.ini")
    with pytest.raises(ConfigError) as exc:
        load_config(write(ini(pgbouncer="%include level1.ini\n")))
    assert errors(exc) == [("level10.ini", 1, "%include")]
    assert "too deep" in str(exc.value)

    write("max_client_conn = 5\n", "level10.ini")  # ten levels are fine
    assert load_config(write(ini(pgbouncer="%include level1.ini\n"))).settings.max_client_conn == 5


# --- [databases] -----------------------------------------------------------------------------


def test_databases(write) -> None:
    cfg = load_config(write(ini(r"""
[databases]
plain = host=db1 port=5433 dbname=real user=u password='p w\'x\\y' pool_size=5 reserve_pool=2
sock = host=/var/run/postgresql
multi = host='a, b ,c' pool_mode=Statement query_wait_timeout=1.5 server_lifetime=-1
"my db" = connect_query='SELECT ''x''' application_name=app
fallback-ish.x = 
* = host=fallback
""")))
    d = cfg.databases
    assert d["plain"] == Database(
        name="plain", host=("db1",), port=5433, dbname="real", user="u", password="p w'x\\y",
        pool_size=5, reserve_pool_size=2,
    )
    assert d["sock"].host == ("/var/run/postgresql",) and d["sock"].port == 5432 and d["sock"].dbname is None
    assert d["multi"].host == ("a", "b", "c") and d["multi"].pool_mode == "statement"
    assert d["multi"].query_wait_timeout == 1.5 and d["multi"].server_lifetime is None
    assert d["my db"].connect_query == "SELECT 'x'" and d["my db"].application_name == "app"
    assert d["fallback-ish.x"] == Database(name="fallback-ish.x")
    assert cfg.database("plain") is d["plain"]
    assert cfg.database("anything") is d["*"]
    assert cfg.warnings == ()


def test_database_lookup_without_fallback(write) -> None:
    cfg = load_config(write(ini("[databases]\nonly = host=x\n")))
    assert cfg.database("other") is None


@pytest.mark.parametrize("name", ["pgbouncer", "pgherd"])
def test_reserved_database_names(write, name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(ini(f"[databases]\n{name} = host=x\n")))
    assert errors(exc) == [("pgherd.ini", 5, name)]
    assert "reserved" in str(exc.value)


@pytest.mark.parametrize(
    ("connstr", "fragment"),
    [
        ("host='unterminated", "unterminated quoted value for host"),
        ("host='a'port=1", "after the quoted value of host"),
        ("host", "expected key=value"),
        ("=x", "expected key=value"),
        ("host=", "empty value for host"),
        ("host=x colour=blue", "colour: unrecognized connection parameter"),
        ("host=x port=0", "port: value 0 out of range"),
        ("host=x pool_size=-2", "pool_size: value -2 out of range"),
        ("host=a,,b", "empty host name"),
        ("pool_mode=sometimes", "pool_mode: invalid value 'sometimes'"),
    ],
)
def test_bad_connection_strings(write, connstr: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(ini(f"[databases]\nmydb = {connstr}\n")))
    assert errors(exc) == [("pgherd.ini", 5, "mydb")]
    assert fragment in str(exc.value)


def test_unsupported_database_keys_warn(write) -> None:
    cfg = load_config(write(ini("[databases]\nd = host=x auth_user=a load_balance_hosts=disable\n")))
    assert cfg.databases["d"].auth_user == "a" and cfg.databases["d"].load_balance_hosts == "disable"
    assert [(p.line, p.key, p.message, p.severity) for p in cfg.warnings] == [
        (5, "d", "auth_user: not supported yet, ignored", "warning"),
        (5, "d", "load_balance_hosts: not supported yet, ignored", "warning"),
    ]


# --- [users] and [peers] ---------------------------------------------------------------------


def test_users(write) -> None:
    cfg = load_config(write(ini("""
[users]
app = pool_mode=transaction pool_size=3 max_user_connections=10 query_timeout=2 client_idle_timeout=60
"me@example.com" = query_wait_timeout=-1 transaction_timeout=5
""")))
    assert cfg.users["app"] == User(
        name="app", pool_mode="transaction", pool_size=3, max_user_connections=10,
        query_timeout=2.0, client_idle_timeout=60.0,
    )
    other = cfg.users["me@example.com"]
    assert other.query_wait_timeout is None and other.transaction_timeout == 5.0
    assert not cfg.warnings


def test_bad_user_entry(write) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(ini("[users]\napp = host=x\n")))
    assert errors(exc) == [("pgherd.ini", 5, "app")]
    assert "unrecognized user parameter" in str(exc.value)


def test_peers_section_is_warned_once_and_ignored(write) -> None:
    cfg = load_config(write(ini("[peers]\n1 = host=a\n2 = whatever\n")))
    assert [(p.line, p.key, p.message) for p in cfg.warnings] == [(4, "[peers]", "not supported yet, ignored")]


def test_unsupported_settings_warn_but_load(write) -> None:
    cfg = load_config(write(ini(pgbouncer="server_tls_sslmode = require\ntcp_user_timeout = 5\n")))
    assert cfg.settings.server_tls_sslmode == "require" and cfg.settings.tcp_user_timeout == 5
    assert [(p.line, p.key, p.message, p.severity) for p in cfg.warnings] == [
        (4, "server_tls_sslmode", "not supported yet, ignored", "warning"),
        (5, "tcp_user_timeout", "not supported yet, ignored", "warning"),
    ]
    assert str(cfg.warnings[0]).endswith("pgherd.ini:4: server_tls_sslmode: not supported yet, ignored")


# --- command-line overrides ------------------------------------------------------------------


def test_overrides_win_and_are_validated(write) -> None:
    path = write(ini(pgbouncer="workers = 2\n"))
    assert load_config(path, {"workers": "4", "pool_mode": "statement"}).settings.workers == 4
    with pytest.raises(ConfigError) as exc:
        load_config(path, {"workers": "four", "nope": "1"})
    assert [str(p).split(":")[0:2] for p in exc.value.problems] == [
        ["<command line>", " workers"],
        ["<command line>", " nope"],
    ]


# --- auth_file -------------------------------------------------------------------------------


def test_userlist_is_loaded_when_auth_type_needs_it(write) -> None:
    assert load_config(write(ini())).userlist == {"app": MD5_APP}
    assert load_config(write("[pgbouncer]\nauth_type = any\nauth_file = userlist.txt\n")).userlist == {}


def test_missing_auth_file_names_the_auth_file_line(write) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write("[pgbouncer]\nauth_type = md5\n\nauth_file = /nonexistent/users.txt\n"))
    assert errors(exc) == [("pgherd.ini", 4, "auth_file")]
    assert "/nonexistent/users.txt" in str(exc.value)


def test_unset_auth_file_is_a_warning(write) -> None:
    cfg = load_config(write("[pgbouncer]\n"))
    assert [(p.key, p.severity) for p in cfg.warnings] == [("auth_file", "warning")]


def test_userlist_format(write) -> None:
    path = write(
        '; comment\n# comment\n\n"app" "md5abc"\n  "we""ird" "pa""ss" trailing junk ignored\n'
        '"app" "later wins"\n"scram" "SCRAM-SHA-256$4096:c2FsdA==$a:b"\n"empty" ""\n',
        "users.txt",
    )
    assert load_userlist(path) == {
        "app": "later wins",
        'we"ird': 'pa"ss',
        "scram": "SCRAM-SHA-256$4096:c2FsdA==$a:b",
        "empty": "",
    }


def test_userlist_malformed_lines_are_all_reported(write) -> None:
    path = write('"ok" "x"\napp secret\n"app" \n"unterminated\n"a" "b\n"" "x"\n', "users.txt")
    with pytest.raises(ConfigError) as exc:
        load_userlist(path)
    assert [(p.line, p.key) for p in exc.value.problems] == [(2, ""), (3, ""), (4, ""), (5, ""), (6, "")]
    assert all(str(p).startswith(f"{path}:") and "malformed line" in p.message for p in exc.value.problems)


def test_malformed_userlist_fails_load_config(write) -> None:
    write('"app" "x"\nbroken\n', "userlist.txt")
    with pytest.raises(ConfigError) as exc:
        load_config(write(ini()))
    assert errors(exc) == [("userlist.txt", 2, "")]


def test_missing_userlist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_userlist(str(tmp_path / "none.txt"))
    assert "No such file" in str(exc.value)


# --- the Config as a whole and the example file ----------------------------------------------


def test_config_survives_msgpack(write) -> None:
    cfg = load_config(write(ini("[databases]\nd = host=a,b pool_size=3\n[users]\napp = pool_size=1\n")))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(cfg), type=Config) == cfg


def test_example_ini_is_the_rendered_text() -> None:
    assert (REPO / "etc" / "pgherd.ini").read_text() == render_example_ini()


def test_example_ini_loads(tmp_path: Path) -> None:
    cfg = load_config(str(REPO / "etc" / "pgherd.ini"), {"auth_file": str(REPO / "etc" / "userlist.txt")})
    s = cfg.settings
    assert (s.listen_addr, s.listen_port, s.auth_type) == (("127.0.0.1",), 6432, "md5")
    assert cfg.databases["appdb"].host == ("127.0.0.1",)
    assert cfg.userlist == {"app": MD5_APP}
    assert cfg.warnings == ()


def test_example_ini_mentions_every_setting() -> None:
    text = render_example_ini()
    for name, s in SETTINGS.items():
        assert f"\n;{name} = " in text or f"\n;{name} =\n" in text, name
    assert text.count("(not supported yet)") >= sum(not s.supported for s in SETTINGS.values())


# --- pgherd's own settings beside a PgBouncer file ------------------------------------------


def test_companion_file_holds_pgherds_settings(write) -> None:
    path = write(ini(pgbouncer="workers = 2\npool_mode = session\n"), name="pgbouncer.ini")
    assert companion_path(path).endswith("/pgbouncer.pgherd.ini")
    write("[pgherd]\nworkers = 5\npool_mode = transaction\n", name="pgbouncer.pgherd.ini")
    s = load_config(path).settings
    assert (s.workers, s.pool_mode) == (5, "transaction")  # the companion wins


def test_companion_file_takes_only_a_pgherd_section(write) -> None:
    path = write(ini(), name="pgbouncer.ini")
    write("[pgherd]\nworkers = x\n[databases]\nx = host=h\n", name="pgbouncer.pgherd.ini")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert [(Path(p.file).name, p.line, p.key) for p in exc.value.problems] == [
        ("pgbouncer.pgherd.ini", 2, "workers"), ("pgbouncer.pgherd.ini", 3, "[databases]")]
