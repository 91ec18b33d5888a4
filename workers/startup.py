"""Startup parameters: what a client asks for when it connects, and how pgherd honours it.

PostgreSQL applies every parameter of a startup packet, and each ``-c name=value`` of its
``options``, as the session's own default: SHOW reports it, RESET returns to it. pgherd
honours them so:

* Session mode: a client's server is opened with the client's parameters in its own startup
  packet, and a server is only ever given to clients that asked for exactly the same ones
  (:attr:`Startup.key`). The client is linked at login and greeted with its server's own
  ParameterStatus values (canonical: ``UTF8`` for a ``utf-8`` asked for) and its backend's
  real pid in BackendKeyData (cancels still go through pgherd, by its own secret).
* Transaction and statement mode: tracked parameters (``varcache``) are SET on every link,
  as before; the others are set on every link with ``set_config()`` and RESET when the server
  next goes to a client without them (:func:`link_query`). A login whose values this pool
  has not seen accepted before runs them on a server first (the client is linked at login
  for that), so a bad value is refused at login, with PostgreSQL's own error, and values are
  reported as the server spells them.
* ``ignore_startup_parameters`` is PgBouncer's: listed parameters are accepted and dropped;
  with ``options`` listed, the settings in ``options`` that are not tracked are dropped.
* ``replication`` is refused; ``_pq_.*`` protocol options are ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import proto
from .varcache import parse_options, quote_literal, server_set_query

if TYPE_CHECKING:
    from .pool import Pool
    from .relay import Client, Server
    from .worker import Worker

KNOWN_KEPT = 4096  # (name, value) pairs a pool remembers as accepted, with their spelling
#: A server login failing with these, for a client's own parameters, fails that client only:
#: unrecognized parameter, invalid value, not settable now, not allowed for this user.
PARAMETER_ERRORS = frozenset(("42704", "22023", "55P02", "42501", "22P02"))


class StartupError(Exception):
    """A startup packet pgherd refuses (PgBouncer's wording, FATAL 08P01)."""


class Startup:
    """The parameters one client asked for, as pgherd applies them."""

    __slots__ = ("tracked", "extra", "key")

    def __init__(self, tracked: dict[str, str], extra: dict[str, str]) -> None:
        self.tracked = tracked  # tracked name (server's spelling) -> value as asked
        self.extra = extra  # any other setting, lower-case name -> value
        #: What a session-mode server must have been opened with to serve this client.
        self.key: tuple = tuple(sorted([(k.lower(), v) for k, v in tracked.items()]
                                       + list(extra.items())))


def parse(worker: Worker, params: dict[str, str]) -> Startup:
    """A client's startup packet (less user and database) as pgherd will honour it."""
    tracked = worker.tracked
    ignored = {p.lower() for p in worker.settings.ignore_startup_parameters}
    out: dict[str, str] = {}
    extra: dict[str, str] = {}

    def take(key: str, value: str, from_options: bool) -> None:
        name = tracked.canonical(key)
        if name is not None:
            out[name] = value
        elif not ((from_options and "options" in ignored) or key.lower() in ignored):
            extra[key.lower()] = value

    for key, value in params.items():
        if key in ("user", "database") or key.startswith("_pq_."):
            continue
        if key == "options":
            try:
                pairs = parse_options(value)
            except ValueError as exc:
                if "options" in ignored:
                    continue
                raise StartupError(str(exc)) from None
            for okey, ovalue in pairs:
                take(okey, ovalue, True)
        elif key == "replication":
            raise StartupError("replication connections are not supported yet")
        else:
            take(key, value, False)
    return Startup(out, extra)


def server_packet(base: dict[str, str], key: tuple) -> dict[str, str]:
    """The startup packet of a session-mode server for clients whose :attr:`Startup.key` is
    ``key``: the database's own parameters (``base``), the clients' over them."""
    mine = dict(key)
    packet = {k: v for k, v in base.items() if k.lower() not in mine}
    packet.update(mine)
    return packet


# --------------------------------------------------------------------------- transaction mode


def aligned(client: Client, server: Server) -> bool:
    """Does the server already have the client's tracked values and settings?"""
    return client.params_key == server.params_key and client.extra == server.extra


def link_query(client: Client, server: Server) -> str | None:
    """The query that gives ``server`` the client's tracked values and settings, and takes
    back settings of earlier clients that this one did not ask for; None if none differ.

    One simple query: its statements run in one implicit transaction, so a value the server
    refuses leaves the server as it was."""
    parts = [server_set_query(client.params, server.params) or ""]
    wanted, applied = client.extra, server.extra
    sets = ["pg_catalog.set_config(%s, %s, false)" % (quote_literal(k), quote_literal(v))
            for k, v in wanted.items() if applied.get(k) != v]
    if sets:
        parts.append("SELECT %s;" % ", ".join(sets))
    parts += ["RESET %s;" % _ident(k) for k in applied if k not in wanted]
    return "".join(parts) or None


def _ident(name: str) -> str:
    return ".".join('"%s"' % part.replace('"', '""') for part in name.split("."))


def known(pool: Pool, startup: Startup) -> dict[str, str] | None:
    """The client's tracked values as the server spells them, if this pool has seen every
    value it asks for accepted; None if a server must try them first."""
    seen = pool.startup_known
    defaults = pool.welcome_tracked
    values: dict[str, str] = {}
    for name, value in startup.tracked.items():
        if defaults.get(name) == value:
            values[name] = value
        else:
            spelled = seen.get((name, value))
            if spelled is None:
                return None
            values[name] = spelled
    for pair in startup.extra.items():
        if pair not in seen:
            return None
    return values


def learn(pool: Pool, startup: Startup, client: Client) -> None:
    """A server accepted the client's values: remember them, and how it spells them."""
    seen = pool.startup_known
    if len(seen) > KNOWN_KEPT:
        seen.clear()
    for name, value in startup.tracked.items():
        seen[(name, value)] = client.params.get(name, value)
    for name, value in startup.extra.items():
        seen[(name, value)] = value


# --------------------------------------------------------------------------- greeting


def greet(client: Client, server: Server) -> None:
    """The end of a login that waited for a server: AuthenticationOk, the parameters,
    BackendKeyData, ReadyForQuery -- in session mode the server's own, with its real pid."""
    worker = client.worker
    pool = client.pool
    greeting, client.greeting = client.greeting, None
    if client.mode == "session":
        client.cancel_key = worker.new_cancel_key(client, server.backend_pid)
        params = b"".join(proto.parameter_status(k, v) for k, v in server.params.items())
    else:
        # Aligned: the server has the client's values, in its own spelling (no SET ran for a
        # value that differed only in case, "utf8" for "UTF8").
        for name in client.params:
            if name in server.params:
                client.params[name] = server.params[name]
        client.params_changed()
        learn(pool, client.startup, client)
        client.cancel_key = worker.new_cancel_key(client)
        params = pool.welcome_for(client.params)
    client.write(b"".join((greeting, params, proto.backend_key_data(*client.cancel_key),
                           proto.READY_IDLE)))


def adopt(client: Client, server: Server) -> None:
    """A session-mode client linked at login to a server opened with its own parameters:
    the server's values are the client's."""
    tracked = client.worker.tracked
    client.params = {k: v for k, v in server.params.items() if tracked.canonical(k)}
    client.params_changed()
