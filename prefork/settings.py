"""Declarations of every configuration key pgherd knows, and how one value is read and written.

This module owns the tables; ``prefork.config`` owns reading files into them.

* ``SETTINGS``: every ``[pgbouncer]`` key of PgBouncer 1.25 (plus ``pool_idle_timeout`` and
  ``login_notify_message`` from later releases) and pgherd's own keys (group "pgherd"). Each
  entry says its kind, typed default, whether a reload applies it (``reload=False`` is
  PgBouncer's ``CF_NO_RELOAD`` list: needs a restart) and whether pgherd implements it yet
  (``supported=False``: accepted with a "not supported yet, ignored" warning).
* ``DATABASE_PARAMS`` / ``USER_PARAMS``: the connection-string keys of ``[databases]`` and
  ``[users]`` entries, declared with the same ``Setting`` type (default ``None`` = "use the
  global setting").
* ``render_example_ini()``: the text of ``etc/pgherd.ini``, generated from these tables (a
  unit test keeps the committed file equal to it).

Choices made when reading values (``Setting.parse``):

* Defaults are typed values. ``Setting.render`` turns a value back into PgBouncer's text form
  (for SHOW CONFIG and the example file); ``parse(render(v)) == v`` for every default.
* ``int``: decimal only. PgBouncer's ``strtol(..., 0)`` would read ``010`` as 8, which nobody
  writing a pool size means.
* ``octal`` (``unix_socket_mode``): the digits are octal with or without the leading zero
  (``0777``, ``777`` and ``0o777`` are all 0o777); a decimal reading of ``777`` is never meant.
* ``bool``: ``1/0, yes/no, on/off, true/false`` in any case. PgBouncer itself takes integers,
  so every PgBouncer file stays valid.
* ``time``: seconds, fractional allowed, never negative (``0.5``, ``1e3``; no ``inf``/``nan``).
* ``enum``: case-insensitive like PgBouncer, stored lower-case. ``implemented`` (when
  non-empty) lists the values pgherd can act on; another listed value is an error, not a
  warning, because silently running e.g. ``auth_type = cert`` as something else would be a
  security hole.
* ``list``: comma-separated, items stripped, empty items dropped.
* ``str``: verbatim; PgBouncer has no quoting in ``[pgbouncer]`` values.
* Ranges: numbers are at least 0 and at most INT_MAX unless the entry says otherwise.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import msgspec

from ipc.shm import MAX_WORKERS

Kind = Literal["int", "time", "bool", "str", "enum", "list", "octal"]

INT_MAX = 2**31 - 1

_TRUE = frozenset({"1", "yes", "on", "true"})
_FALSE = frozenset({"0", "no", "off", "false"})
_INT_RE = re.compile(r"[+-]?[0-9]+")
_OCTAL_RE = re.compile(r"(?:0[oO])?[0-7]+")
_TIME_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class Setting(msgspec.Struct, frozen=True):
    """One configuration key: its kind, typed default and what pgherd does with it."""

    name: str
    kind: Kind
    default: Any
    reload: bool
    supported: bool
    doc: str
    choices: tuple[str, ...] = ()
    implemented: tuple[str, ...] = ()
    minimum: int = 0
    maximum: int = INT_MAX
    group: str = ""

    def parse(self, raw: str) -> Any:
        """Return the typed value of ``raw``; raise ValueError with a one-line reason."""
        text = raw.strip()
        if self.kind == "str":
            return raw
        if self.kind == "list":
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if self.kind == "bool":
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"invalid value {raw!r} (expected 1/0, yes/no, on/off, true/false)")
        if self.kind == "enum":
            low = text.lower()
            if low not in self.choices:
                raise ValueError(f"invalid value {raw!r} (expected {', '.join(self.choices)})")
            if self.implemented and low not in self.implemented:
                raise ValueError(
                    f"{low!r} is not supported by pgherd (supported: {', '.join(self.implemented)})"
                )
            return low
        if self.kind == "int":
            if not _INT_RE.fullmatch(text):
                raise ValueError(f"invalid value {raw!r} (expected an integer)")
            return self._in_range(int(text))
        if self.kind == "octal":
            if not _OCTAL_RE.fullmatch(text):
                raise ValueError(f"invalid value {raw!r} (expected an octal mode such as 0777)")
            return self._in_range(int(text.lower().removeprefix("0o"), 8))
        if self.kind == "time":
            if not _TIME_RE.fullmatch(text):
                raise ValueError(f"invalid value {raw!r} (expected seconds, e.g. 30 or 0.5)")
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(f"invalid value {raw!r} (expected seconds, e.g. 30 or 0.5)")
            return float(self._in_range(value))
        raise AssertionError(f"unknown kind {self.kind!r}")

    def _in_range(self, value: int | float) -> int | float:
        if self.minimum <= value <= self.maximum:
            return value
        if self.maximum == INT_MAX:
            expected = f">= {self.minimum}"
        else:
            expected = f"{self.minimum}..{self.maximum}"
        shown = self.render(value) if self.kind != "octal" else oct(int(value))
        raise ValueError(f"value {shown} out of range (expected {expected})")

    def render(self, value: Any) -> str:
        """PgBouncer's text form of ``value`` (what SHOW CONFIG prints)."""
        if value is None:
            return ""
        if self.kind == "bool":
            return "1" if value else "0"
        if self.kind == "list":
            return ",".join(value)
        if self.kind == "octal":
            return f"0{value:o}" if value else "0"
        if self.kind == "time":
            return str(int(value)) if float(value).is_integer() else repr(float(value))
        return str(value)

    @property
    def python_type(self) -> Any:
        """The type of the typed value (the field type in ``prefork.config.Settings``)."""
        return {
            "int": int,
            "octal": int,
            "time": float,
            "bool": bool,
            "str": str,
            "enum": str,
            "list": tuple[str, ...],
        }[self.kind]


def _s(
    name: str,
    kind: Kind,
    default: Any,
    doc: str,
    *,
    restart: bool = False,
    supported: bool = False,
    choices: tuple[str, ...] = (),
    implemented: tuple[str, ...] = (),
    minimum: int = 0,
    maximum: int = INT_MAX,
) -> Setting:
    return Setting(
        name=name,
        kind=kind,
        default=default,
        reload=not restart,
        supported=supported,
        doc=doc,
        choices=choices,
        implemented=implemented,
        minimum=minimum,
        maximum=maximum,
    )


def _group(title: str, *settings: Setting) -> list[Setting]:
    return [msgspec.structs.replace(s, group=title) for s in settings]


POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("any", "trust", "plain", "md5", "scram-sha-256", "cert", "hba", "ldap", "pam")
AUTH_TYPES_IMPLEMENTED = ("trust", "any", "plain", "md5", "scram-sha-256")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)

_TABLE: list[Setting] = [
    *_group(
        "Listening and process",
        _s("listen_addr", "list", (), "comma-separated TCP addresses to listen on, * = all; empty = Unix socket only",
           restart=True, supported=True),
        _s("listen_port", "int", 6432, "port for TCP and for the Unix socket (.s.PGSQL.<port>)",
           restart=True, supported=True, minimum=1, maximum=65535),
        _s("unix_socket_dir", "str", "/tmp",
           "Unix socket directory (empty = no socket, @name = abstract); also the default for server Unix connections",
           restart=True, supported=True),
        _s("unix_socket_mode", "octal", 0o777, "file mode of the Unix socket",
           restart=True, supported=True, maximum=0o7777),
        _s("unix_socket_group", "str", "", "group owning the Unix socket", restart=True),
        _s("listen_backlog", "int", 128, "listen(2) backlog of each listening socket", restart=True, supported=True),
        _s("so_reuseport", "bool", False,
           "let other services share the TCP and HTTP ports (pgherd's workers always share "
           "them); 0 = refuse a port in use",
           restart=True, supported=True),
        _s("tcp_defer_accept", "bool", True, "TCP_DEFER_ACCEPT on listeners (45 s when on)",
           restart=True, supported=True),
        _s("tcp_socket_buffer", "int", 0, "SO_SNDBUF/SO_RCVBUF size in bytes (0 = OS default)"),
        _s("tcp_keepalive", "bool", True, "TCP keepalive on client and server sockets, with the OS timings",
           supported=True),
        _s("tcp_keepcnt", "int", 0, "keepalive probes before a connection is dropped (0 = OS default)"),
        _s("tcp_keepidle", "int", 0, "idle seconds before the first keepalive probe (0 = OS default)"),
        _s("tcp_keepintvl", "int", 0, "seconds between keepalive probes (0 = OS default)"),
        _s("tcp_user_timeout", "int", 0, "TCP_USER_TIMEOUT in milliseconds (0 = OS default)"),
        _s("user", "str", "", "Unix user to switch to at start (as -u); pgherd refuses to run as root",
           restart=True, supported=True),
        _s("pidfile", "str", "", "pid file of the master process (needed to daemonize)", restart=True, supported=True),
        _s("job_name", "str", "pgbouncer", "Windows service name", restart=True),
        _s("service_name", "str", "pgbouncer", "Windows service name (alias of job_name)", restart=True),
        _s("conffile", "str", "",
           "current config file; changing it makes the next reload read that file (empty = the command-line file)",
           supported=True),
        _s("peer_id", "int", 0, "id of this process in a peer group (0 = peering off)", maximum=16383),
    ),
    *_group(
        "Pooling and limits",
        _s("pool_mode", "enum", "session", "when a server connection goes back to the pool",
           supported=True, choices=POOL_MODES),
        _s("max_client_conn", "int", 100, "maximum client connections of the whole service", supported=True),
        _s("default_pool_size", "int", 20, "server connections per (database, user) pool; 0 = unlimited",
           supported=True),
        _s("min_pool_size", "int", 0, "keep at least this many server connections in each pool", supported=True),
        _s("reserve_pool_size", "int", 0, "extra connections for a pool whose clients waited reserve_pool_timeout",
           supported=True),
        _s("reserve_pool_timeout", "time", 5.0, "seconds a client waits before the reserve pool is used",
           supported=True),
        _s("max_db_connections", "int", 0, "server connections per database, all users (0 = unlimited)",
           supported=True),
        _s("max_db_client_connections", "int", 0, "client connections per database (0 = unlimited)"),
        _s("max_user_connections", "int", 0, "server connections per user, all databases (0 = unlimited)",
           supported=True),
        _s("max_user_client_connections", "int", 0, "client connections per user (0 = unlimited)"),
        _s("server_round_robin", "bool", False, "reuse idle server connections FIFO instead of LIFO",
           supported=True),
        _s("max_prepared_statements", "int", 200,
           "protocol-level prepared statements kept per server connection in transaction/statement mode (0 = off)",
           supported=True),
        _s("track_extra_parameters", "list", ("IntervalStyle",),
           "extra reported parameters tracked per client and restored on the server", restart=True, supported=True),
        _s("ignore_startup_parameters", "list", (), "startup parameters accepted and dropped", supported=True),
        _s("disable_pqexec", "bool", False, "reject the simple query protocol", restart=True, supported=True),
        _s("application_name_add_host", "bool", False, "append the client's host:port to application_name",
           supported=True),
        _s("stats_period", "int", 60, "seconds between stats averages (and stats log lines)",
           supported=True, minimum=1),
        _s("scram_iterations", "int", 4096, "iterations when pgherd builds SCRAM secrets", minimum=1),
        _s("autodb_idle_timeout", "time", 3600.0, "free databases created from * after this long unused"),
        _s("pool_idle_timeout", "time", 0.0, "free an empty (database, user) pool after this long (0 = never)"),
        _s("dns_max_ttl", "time", 15.0, "how long a DNS answer is cached"),
        _s("dns_nxdomain_ttl", "time", 15.0, "how long a failed DNS lookup is cached"),
        _s("dns_zone_check_period", "time", 0.0, "period of DNS zone serial checks (0 = off)"),
        _s("resolv_conf", "str", "", "custom resolv.conf for the DNS resolver", restart=True),
        _s("pkt_buf", "int", 4096, "packet buffer size in bytes", restart=True, supported=True, minimum=1),
        _s("max_packet_size", "int", INT_MAX, "largest PostgreSQL packet let through, in bytes",
           supported=True, minimum=1, maximum=2**32 - 1),
        _s("sbuf_loopcnt", "int", 5, "buffer reads per connection per loop round (fairness)"),
        _s("query_wait_notify", "int", 5, "seconds of waiting before a client gets a 'being queued' NOTICE"),
        _s("login_notify_message", "str", "", "NOTICE sent to clients after login (empty = none)"),
    ),
    *_group(
        "Timeouts (seconds; 0 = off unless said otherwise)",
        _s("server_lifetime", "time", 3600.0, "close an unused server connection older than this (0 = use once)",
           supported=True),
        _s("server_idle_timeout", "time", 600.0, "close a server connection idle longer than this", supported=True),
        _s("server_connect_timeout", "time", 15.0, "limit for a server connect and login", supported=True),
        _s("server_login_retry", "time", 15.0, "after a failed server login, fail new clients fast for this long",
           supported=True),
        _s("server_check_delay", "time", 30.0, "idle time after which server_check_query runs before reuse",
           supported=True),
        _s("server_check_query", "str", "<empty>",
           "health check query; <empty> sends an empty query, an empty value disables the check", supported=True),
        _s("server_reset_query", "str", "DISCARD ALL", "query run when a session-mode server is released",
           supported=True),
        _s("server_reset_query_always", "bool", False, "run server_reset_query in every pool mode", supported=True),
        _s("server_fast_close", "bool", False, "in session mode close servers marked close_needed at transaction end"),
        _s("client_login_timeout", "time", 60.0, "a client must finish logging in within this", supported=True),
        _s("client_idle_timeout", "time", 0.0, "close a client idle longer than this", supported=True),
        _s("query_timeout", "time", 0.0, "cancel and close a query running longer than this", supported=True),
        _s("query_wait_timeout", "time", 120.0, "disconnect a client waiting for a server longer than this",
           supported=True),
        _s("cancel_wait_timeout", "time", 10.0, "drop a cancel request not forwarded within this"),
        _s("idle_transaction_timeout", "time", 0.0, "close a session idle in transaction longer than this",
           supported=True),
        _s("transaction_timeout", "time", 0.0, "close a transaction open longer than this",
           supported=True),
        _s("suspend_timeout", "time", 10.0, "limit for flushing buffers during SUSPEND"),
    ),
    *_group(
        "Authentication",
        _s("auth_type", "enum", "md5", "how clients authenticate",
           supported=True, choices=AUTH_TYPES, implemented=AUTH_TYPES_IMPLEMENTED),
        _s("auth_file", "str", "", 'file of "user" "secret" lines, re-read on reload', supported=True),
        _s("auth_hba_file", "str", "", "pg_hba.conf-style rules for auth_type = hba"),
        _s("auth_ident_file", "str", "", "ident map for cert/peer map= options"),
        _s("auth_user", "str", "", "user that runs auth_query for users missing from auth_file"),
        _s("auth_query", "str", _AUTH_QUERY, "query returning (user, secret) for auth_user lookups"),
        _s("auth_dbname", "str", "", "database entry used to run auth_query"),
        _s("auth_ldap_options", "str", "", "LDAP options for auth_type = ldap"),
    ),
    *_group(
        "TLS (client_* = clients to pgherd, server_* = pgherd to PostgreSQL)",
        _s("client_tls_sslmode", "enum", "disable", "TLS toward clients", choices=SSL_MODES),
        _s("client_tls_key_file", "str", "", "private key presented to clients"),
        _s("client_tls_cert_file", "str", "", "certificate presented to clients"),
        _s("client_tls_ca_file", "str", "", "CA used to verify client certificates"),
        _s("client_tls_protocols", "str", "secure", "allowed TLS versions toward clients (secure = 1.2 and 1.3)"),
        _s("client_tls_ciphers", "str", "default", "OpenSSL cipher list toward clients (TLS 1.2 and older)"),
        _s("client_tls13_ciphers", "str", "", "TLS 1.3 cipher suites toward clients (empty = OpenSSL default)"),
        _s("client_tls_ecdhcurve", "str", "auto", "ECDH curve toward clients"),
        _s("client_tls_dheparams", "str", "auto", "DHE parameters toward clients (none, auto, legacy)"),
        _s("server_tls_sslmode", "enum", "prefer", "TLS toward PostgreSQL", choices=SSL_MODES),
        _s("server_tls_ca_file", "str", "", "CA used to verify PostgreSQL's certificate"),
        _s("server_tls_key_file", "str", "", "private key for client-certificate login to PostgreSQL"),
        _s("server_tls_cert_file", "str", "", "certificate for client-certificate login to PostgreSQL"),
        _s("server_tls_protocols", "str", "secure", "allowed TLS versions toward PostgreSQL"),
        _s("server_tls_ciphers", "str", "default", "OpenSSL cipher list toward PostgreSQL (TLS 1.2 and older)"),
        _s("server_tls13_ciphers", "str", "", "TLS 1.3 cipher suites toward PostgreSQL (empty = OpenSSL default)"),
    ),
    *_group(
        "Logging",
        _s("logfile", "str", "", "log file, reopened on reload (empty = stderr only)", supported=True),
        _s("syslog", "bool", False, "also log to syslog (/dev/log)", supported=True),
        _s("syslog_ident", "str", "pgbouncer", "syslog identity", supported=True),
        _s("syslog_facility", "str", "daemon",
           "syslog facility: auth, authpriv, daemon, user, local0..local7", supported=True),
        _s("log_connections", "bool", True, "log successful logins", supported=True),
        _s("log_disconnections", "bool", True, "log disconnections with their reason", supported=True),
        _s("log_pooler_errors", "bool", True, "log errors the pooler sends to clients", supported=True),
        _s("log_stats", "bool", True, "log aggregated stats every stats_period", supported=True),
        _s("verbose", "int", 0, "debug log level (like -v, repeated)", supported=True),
    ),
    *_group(
        "Admin console (database pgbouncer or pgherd)",
        _s("admin_users", "list", (), "users allowed every admin console command", supported=True),
        _s("stats_users", "list", (), "users allowed the read-only SHOW commands", supported=True),
    ),
    *_group(
        "pgherd's own settings (not in PgBouncer)",
        _s("workers", "int", 0, "worker processes (0 = one per CPU)", supported=True,
           maximum=MAX_WORKERS),
        _s("shutdown_timeout", "time", 60.0, "longest wait for clients to leave during a graceful shutdown",
           supported=True),
        _s("http_listen_addr", "str", "127.0.0.1",
           "address of the HTTP endpoint: status page /, /metrics, /health, /ready",
           restart=True, supported=True),
        _s("http_listen_port", "int", 0, "port of the HTTP endpoint (0 = off)", restart=True,
           supported=True, maximum=65535),
        _s("heartbeat_timeout", "time", 10.0,
           "a worker silent this long is taken for hung: killed and replaced", supported=True,
           minimum=1),
        _s("max_worker_memory", "int", 0,
           "MiB of RSS above which a worker is recycled gracefully (drained, replaced); 0 = off",
           supported=True),
        _s("allow_root", "bool", False,
           "run as root when started by root without user/-u (PgBouncer always refuses)",
           restart=True, supported=True),
    ),
]

SETTINGS: dict[str, Setting] = {s.name: s for s in _TABLE}
assert len(SETTINGS) == len(_TABLE), "duplicate setting name"


def _p(name: str, kind: Kind, doc: str, *, supported: bool = True, **kw: Any) -> Setting:
    return Setting(name=name, kind=kind, default=None, reload=True, supported=supported, doc=doc, **kw)


# Connection-string keys of a [databases] entry. "host" is a comma list parsed by the loader;
# "reserve_pool" is PgBouncer's old spelling of reserve_pool_size (see DATABASE_ALIASES).
DATABASE_PARAMS: dict[str, Setting] = {
    p.name: p
    for p in (
        _p("dbname", "str", "database name on the server (default: the name the client asked for)"),
        _p("host", "str", "host, IP, /socket/dir or @abstract; comma list = round robin (default: Unix socket)"),
        _p("port", "int", "server port (default 5432)", minimum=1, maximum=65535),
        _p("user", "str", "forced user: every client shares one pool logging in as this user"),
        _p("password", "str", "password of the forced user (default: from auth_file)"),
        _p("pool_size", "int", "overrides default_pool_size"),
        _p("min_pool_size", "int", "overrides min_pool_size"),
        _p("reserve_pool_size", "int", "overrides reserve_pool_size (alias: reserve_pool)"),
        _p("max_db_connections", "int", "overrides max_db_connections"),
        _p("pool_mode", "enum", "overrides pool_mode", choices=POOL_MODES),
        _p("connect_query", "str", "query run once after each server login"),
        _p("client_encoding", "str", "client_encoding put in the server startup packet"),
        _p("datestyle", "str", "DateStyle put in the server startup packet"),
        _p("timezone", "str", "TimeZone put in the server startup packet"),
        _p("application_name", "str", "application_name put in the server startup packet"),
        _p("query_wait_timeout", "time", "overrides query_wait_timeout"),
        _p("server_lifetime", "time", "overrides server_lifetime"),
        _p("auth_user", "str", "overrides auth_user", supported=False),
        _p("auth_query", "str", "overrides auth_query", supported=False),
        _p("auth_dbname", "str", "overrides auth_dbname", supported=False),
        _p("max_db_client_connections", "int", "overrides max_db_client_connections", supported=False),
        _p("load_balance_hosts", "enum", "choice among a host list", supported=False,
           choices=("round-robin", "disable")),
    )
}
DATABASE_ALIASES: dict[str, str] = {"reserve_pool": "reserve_pool_size"}

USER_PARAMS: dict[str, Setting] = {
    p.name: p
    for p in (
        _p("pool_mode", "enum", "overrides the database and global pool_mode", choices=POOL_MODES),
        _p("pool_size", "int", "overrides the database pool_size and default_pool_size"),
        _p("reserve_pool_size", "int", "overrides the database and global reserve_pool_size"),
        _p("max_user_connections", "int", "overrides max_user_connections"),
        _p("query_timeout", "time", "overrides query_timeout"),
        _p("query_wait_timeout", "time", "overrides query_wait_timeout"),
        _p("idle_transaction_timeout", "time", "overrides idle_transaction_timeout"),
        _p("client_idle_timeout", "time", "overrides client_idle_timeout"),
        _p("max_user_client_connections", "int", "overrides max_user_client_connections", supported=False),
        _p("transaction_timeout", "time", "overrides transaction_timeout"),
    )
}

_NOT_YET = "(not supported yet) "


def _param_lines(params: dict[str, Setting]) -> list[str]:
    width = max(map(len, params))
    return [
        f";   {p.name:<{width}}  {_NOT_YET if not p.supported else ''}{p.doc}" for p in params.values()
    ]


def render_example_ini() -> str:
    """The text of ``etc/pgherd.ini``: a minimal working setup, then every setting commented out."""
    out = [
        "; pgherd example configuration.",
        ";",
        "; The format is PgBouncer's pgbouncer.ini: an existing pgbouncer.ini works unchanged. The main",
        "; section may also be called [pgherd]. pgherd's own settings (the last group below) may also",
        "; go in a [pgherd] section of a file beside this one, <name>.pgherd.ini for <name>.ini, which",
        "; PgBouncer never reads: a file PgBouncer must still accept (to roll back) cannot hold them, as",
        "; PgBouncer refuses sections and keys it does not know. Lines starting with ';' or '#' are",
        "; comments (only at the start of a line). '%include path' reads another file in place; a",
        "; relative path is looked up",
        "; in the working directory first, then next to the including file.",
        ";",
        "; Times are seconds and may be fractional. Settings marked [restart] are read at start only;",
        "; everything else takes effect on reload (SIGHUP, or RELOAD in the admin console).",
        ";",
        "; Generated by prefork.settings.render_example_ini(); a unit test keeps the two equal.",
        "",
        "[databases]",
        "; name = key=value ... (values with spaces in 'single quotes', \\' and \\\\ escape inside them).",
        "; Names other than [_0-9A-Za-z] go in double quotes. '*' is the fallback for any other name;",
        "; 'pgbouncer' and 'pgherd' are the admin console. Keys:",
        *_param_lines(DATABASE_PARAMS),
        "appdb = host=127.0.0.1 port=5432 dbname=appdb",
        ";* = host=127.0.0.1 port=5432",
        "",
        "[users]",
        "; user name = key=value ...  Keys:",
        *_param_lines(USER_PARAMS),
        ";app = pool_mode=transaction max_user_connections=50",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        "listen_port = 6432",
        "auth_type = md5",
        "auth_file = /etc/pgherd/userlist.txt",
    ]
    group = None
    for s in SETTINGS.values():
        if s.group != group:
            group = s.group
            out += ["", f";;;; {group}"]
        line = f";; {_NOT_YET if not s.supported else ''}{s.doc}"
        if s.choices:
            line += f" (one of: {', '.join(s.implemented or s.choices)})"
        if not s.reload:
            line += " [restart]"
        out += ["", line, f";{s.name} = {s.render(s.default)}".rstrip()]
    return "\n".join(out) + "\n"
