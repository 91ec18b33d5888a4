"""Pools: one per (database, user) in a worker — idle servers, waiting clients, hand-outs.

A pool here is this worker's share of a service-wide pool. Where a limit is checked:
:meth:`Pool.may_open` (pool_size + reserve, max_db_connections, max_user_connections), through
the worker's :class:`~workers.limits.Limits`, against the counts of ALL workers. Where a
client gets a server: :meth:`Pool.assign` (on a request) and :meth:`Pool.give` (a server
became free: it goes to the client that has waited longest — in this worker or, through
``workers/exchange.py``, in another one — else it goes idle). A server is linked in three
steps, each of which may have to wait for the server: health check (``server_check_query``
after ``server_check_delay`` idle), tracked-parameter SET, then the client's request.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING

import gevent
import gevent.event

from ipc import shm

from . import prepared, proto, startup

from .relay import SESSION, STATUS_IDLE, Client, Server

if TYPE_CHECKING:
    from prefork.config import Database

    from .worker import Worker

log = logging.getLogger("pgherd")
_monotonic = time.monotonic

#: See Pool._should_move: a hand-over costs far more than a short transaction, so servers
#: follow each worker's share of the clients; waits growing this far apart move one anyway.
FAIRNESS_FACTOR = 2.0
FAIRNESS_SLACK = 0.020
#: Asked for idle servers, a worker gives those idle at least this long (see offer_idle).
IDLE_OFFER_AFTER = 0.002
#: After a limit refused a new server, requests queue without asking again for this long:
#: under saturation every queued request would otherwise take the admission lock.
FULL_BACKOFF = 0.001
#: After a server login failed for a passing reason (connection refused, PostgreSQL starting
#: or shutting down: a restart), the next attempt comes this soon — server_login_retry, meant
#: to spare a server that refuses the login itself, would keep a restarted one unused.
TRANSIENT_LOGIN_RETRY = 0.5
WELCOMES_KEPT = 64


def narrows_gap(held: int, share: float, their_held: int, their_share: float) -> bool:
    """Should a worker holding ``held`` servers of a pool (``share`` being its fair part) give
    one to a worker holding ``their_held`` (fair part ``their_share``)? Only if it is above
    its share and the move narrows the gap between the two: at a gap of exactly one (shares
    7.5 and 8.5 held as 8 and 8, or as 7 and 9) either side would pass it straight back."""
    return held > share and (held - share) - (their_held - their_share) > 1


def evict_idle(pools, dbname: str, user: str, shared: str, idle_for: float) -> bool:
    """Close the least recently used server, idle at least ``idle_for`` seconds, of a pool
    other than (dbname, user) under the same max_db_connections ("db") or
    max_user_connections ("user"); False when there is none."""
    settled = _monotonic() - idle_for
    for pool in pools:
        related = pool.dbname == dbname if shared == "db" else pool.user == user
        if (related and (pool.dbname, pool.user) != (dbname, user) and pool.idle
                and pool.idle[0].last_used <= settled):
            return pool.close_idle("evicted by connection limit")
    return False


class PoolStats:
    """Counters of one pool in this worker, in PgBouncer's units (bytes, microseconds)."""

    __slots__ = shm.STAT_FIELDS

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class Pool:
    """Servers and clients of one (database, user) pair in this worker."""

    def __init__(self, worker: Worker, db: Database, user: str, password: str | None) -> None:
        self.worker = worker
        self.db = db
        self.dbname = db.name
        self.user = user
        self.password = password  # for server login: connstring password or auth_file secret
        self.scram_keys: tuple[bytes, bytes] | None = None  # SCRAM passthrough (ClientKey, ServerKey)
        self.rows: tuple[int, int, int] | None = None  # shared rows: pool, database, user
        self.idle: collections.deque[Server] = collections.deque()
        self.waiting: collections.deque[Client] = collections.deque()
        self.servers: set[Server] = set()
        self.clients: set[Client] = set()
        self.connecting = 0
        self.connecting_for: collections.Counter = collections.Counter()  # startup keys
        self.startup_known: dict[tuple[str, str], str] = {}  # see startup.known
        self.welcome: dict[str, str] | None = None  # server defaults, replayed to new clients
        self.welcome_static = b""  # ParameterStatus messages of the untracked defaults
        self.welcome_tracked: dict[str, str] = {}  # tracked defaults, overridable per client
        self._welcomes: dict[tuple, bytes] = {}  # see welcome_for
        self.welcome_ready = gevent.event.Event()
        self.login_error: dict[str, str] | None = None  # the last failed login, until one works
        self.login_transient = False  # ... and whether it failed for a passing reason
        self.retry_at = 0.0  # no new server login before then (server_login_retry)
        self.stats = PoolStats()
        self._grow_pending = False
        self.full_until = 0.0  # a limit refused a new server until then: do not ask again
        self.shares: list[float] = []  # servers each worker should hold (_refresh_shares)
        self.size = self.reserve = 0
        self.check_surplus = False
        self.apply_config()

    def apply_config(self) -> None:
        """Derive this pool's mode and sizes: user settings > database > global."""
        s = self.worker.settings
        u = self.worker.config.users.get(self.user)
        db = self.db

        def pick(name: str, default):
            for src in (u, db):
                value = getattr(src, name, None) if src is not None else None
                if value is not None:
                    return value
            return default

        self.mode = pick("pool_mode", s.pool_mode)
        size = pick("pool_size", s.default_pool_size)
        reserve = pick("reserve_pool_size", s.reserve_pool_size)
        # Fewer servers allowed than before: close the surplus as it is released.
        self.check_surplus = self.check_surplus or (size, reserve) != (self.size, self.reserve)
        self.size = size
        self.reserve = reserve
        self.min_size = db.min_pool_size if db.min_pool_size is not None else s.min_pool_size
        self.lifetime = db.server_lifetime if db.server_lifetime is not None else s.server_lifetime
        self.query_wait_timeout = pick("query_wait_timeout", s.query_wait_timeout)
        self.query_timeout = pick("query_timeout", s.query_timeout)
        self.idle_transaction_timeout = pick("idle_transaction_timeout", s.idle_transaction_timeout)
        self.transaction_timeout = pick("transaction_timeout", s.transaction_timeout)
        self.client_idle_timeout = pick("client_idle_timeout", s.client_idle_timeout)

    # -------------------------------------------------------------------- hand-outs

    def assign(self, client: Client) -> Server | None:
        """``client`` has a request: return a server it can use right now, or None.

        None means the client must park its request: it is queued, or a server is being
        checked or aligned for it, and :meth:`Client.resume` will be called when it is linked.
        """
        server = None if self.worker.is_paused(self.dbname) else self._take_idle(client)
        if server is not None:
            return server if self._link(client, server) else None
        failing = self.fast_fail()
        if failing is not None:
            client.disconnect(failing, error=failing)
            return None
        client.state = "waiting"
        client.wait_started = _monotonic()
        self.waiting.append(client)
        self.waiting_changed()
        self.grow()
        return None

    def _take_idle(self, client: Client) -> Server | None:
        idle = self.idle
        if not idle:
            return None
        if self.mode == SESSION:
            return self._take_idle_for(client.startup.key)
        round_robin = self.worker.settings.server_round_robin
        now = _monotonic()
        while idle:
            server = idle.popleft() if round_robin else idle.pop()
            if not self._retire(server, now):
                return server
        return None

    def _take_idle_for(self, key: tuple) -> Server | None:
        """Session mode: an idle server opened with these startup parameters (startup.py)."""
        idle = self.idle
        order = range(len(idle)) if self.worker.settings.server_round_robin else \
            range(len(idle) - 1, -1, -1)
        now = _monotonic()
        for i in order:
            server = idle[i]
            if server.startup == key:
                del idle[i]
                return self._take_idle_for(key) if self._retire(server, now) else server
        return None

    def _link(self, client: Client, server: Server) -> bool:
        """Link the pair; True when the server can take the request now.

        False when a health check or a SET runs first; its completion resumes the client.
        """
        client.server = server
        server.client = client
        client.state = "active"
        server.state = "active"
        now = server.link_time = _monotonic()
        self.stats.server_assignment_count += 1
        s = self.worker.settings
        if (s.server_check_query and s.server_check_delay >= 0
                and now - server.last_used > s.server_check_delay):
            server.state = "tested"
            query = "" if s.server_check_query == "<empty>" else s.server_check_query
            server.run_internal(query, self._checked)
            return False
        return self._align(client, server)

    def _align(self, client: Client, server: Server) -> bool:
        """Bring the server's tracked parameters and settings to the client's; True when
        none differ. In session mode the server was opened with the client's own startup
        parameters: its values are the client's (startup.py)."""
        if self.mode == SESSION:
            startup.adopt(client, server)
            return True
        if startup.aligned(client, server):
            return True
        sql = startup.link_query(client, server)
        if sql is None:
            return True
        if self.worker.settings.verbose:
            log.debug("%s applying %s", server.label(), sql)
        server.run_internal(sql, self._aligned)
        return False

    def _checked(self, server: Server, error: dict[str, str] | None) -> None:
        client = server.client
        if error is None:
            server.state = "active"
            if self._align(client, server):
                client.resume()
            return
        server.client = None
        client.server = None
        server.close("server check query failed: %s" % error.get("M", ""))
        if not client.closed and self.assign(client) is not None:
            client.resume()

    def _aligned(self, server: Server, error: dict[str, str] | None) -> None:
        client = server.client
        if error is not None:
            # The client's value, refused as PostgreSQL refuses it at login. The query ran
            # as one transaction: the server is as it was, and goes back to the pool.
            client.disconnect("invalid server parameter: %s" % error.get("M", ""),
                              error=error.get("M", "invalid server parameter"),
                              sqlstate=error.get("C", "08P01"))
            return
        server.extra = dict(client.extra)
        # Keep the server's canonical spelling ("utf8" is reported back as "UTF8").
        for name in client.params:
            if name in server.params:
                client.params[name] = server.params[name]
        client.params_changed()
        client.resume()

    def release(self, server: Server, now: float) -> None:
        """The linked client is done with ``server`` (transaction end or client gone)."""
        client = server.client
        if client is not None:
            client.server = None
            client.idle_since = now
            server.client = None
        server.last_used = now
        if self._retire(server, now):
            return
        if server.cancels:
            # A cancel request for this backend is still under way: PostgreSQL signals the
            # backend twice, and the second signal can come late enough to cancel whatever
            # the next client runs on it (PgBouncer #717). Reused once the request is done.
            server.state = "being_canceled"
            return
        self._reuse(server)

    def cancel_done(self, server: Server) -> None:
        """The last cancel request sent for ``server`` is complete: it may be reused now."""
        if server.state == "being_canceled" and not server.closed:
            self._reuse(server)

    def _reuse(self, server: Server) -> None:
        s = self.worker.settings
        if s.server_reset_query and (self.mode == SESSION or s.server_reset_query_always):
            server.state = "used"
            server.run_internal(s.server_reset_query, self._reset_done)
            return
        self.give(server)

    def _reset_done(self, server: Server, error: dict[str, str] | None) -> None:
        if error is not None:
            server.close("server_reset_query failed: %s" % error.get("M", ""))
            return
        server.extra = {}  # DISCARD ALL / RESET ALL took back what pgherd set
        if server.statements.prepared:  # DISCARD ALL (the usual reset) drops them
            prepared.forget_all(server)
        self.give(server)

    def give(self, server: Server) -> None:
        """A free server: to a client waiting here, or to another worker's client that has
        waited much longer, else idle (see FAIRNESS_FACTOR)."""
        waiting = self.waiting
        remote = self.worker.segment.oldest_waiter_elsewhere(self.rows[0], self.worker.slot)
        if remote is not None and self._should_move(remote, waiting):
            if self.worker.exchange.hand_over(server, remote[0]):
                return
        self._serve_here(server)

    def _serve_here(self, server: Server) -> None:
        """To the longest-waiting client of this worker, else idle."""
        client = self._waiter_for(server)
        if client is not None:
            self.waiting_changed()
            if self._link(client, server):
                client.resume()
            return
        server.state = "idle"
        self.idle.append(server)
        if self.waiting:  # for other startup parameters: room for theirs, if need be
            self.grow()

    def _waiter_for(self, server: Server) -> Client | None:
        """The longest-waiting client this server can serve (in session mode, one that asked
        for the startup parameters it was opened with), taken off the queue."""
        waiting = self.waiting
        if self.mode != SESSION:
            return waiting.popleft() if waiting else None
        for i, client in enumerate(waiting):
            if client.startup.key == server.startup:
                del waiting[i]
                return client
        return None

    def _should_move(self, remote: tuple[int, int], waiting) -> bool:
        """Does a freed server belong with the other worker whose client waits longest?

        Servers follow demand: each worker's share of the pool is proportional to its
        clients (published a few times a second), and a server moves only from a worker
        above its share to one further below its own. Waits then stay alike without servers
        changing hands at every release. As a safety valve against stale shares, a client that has
        waited FAIRNESS_FACTOR times as long as the oldest here plus FAIRNESS_SLACK gets it.
        """
        now = _monotonic()
        local_wait = now - waiting[0].wait_started if waiting else 0.0
        if now - remote[1] / 1e9 > FAIRNESS_FACTOR * local_wait + FAIRNESS_SLACK:
            return True
        shares, me, slot = self.shares, self.worker.slot, remote[0]
        if me >= len(shares) or slot >= len(shares):
            return False
        held = len(self.servers)  # this one included
        if held <= shares[me]:
            return False  # no need to read the other worker's count
        return narrows_gap(held, shares[me],
                           self.worker.segment.cell_get(self.rows[0], slot, "servers"), shares[slot])

    def _refresh_shares(self) -> None:
        """Each worker's share of this pool's servers, proportional to the clients every
        worker published. Those counts change only when their workers publish, so the
        shares are worked out here, not at every release of a server (under saturation
        that is every transaction end, and working them out there cost ~2 µs each)."""
        seg, row = self.worker.segment, self.rows[0]
        demand = [seg.cell_get(row, slot, "clients") for slot in range(self.worker.settings.workers)]
        total = sum(demand)
        size = self.size or seg.servers_total(row)
        self.shares = [size * d / total for d in demand] if total else []

    def waiting_changed(self) -> None:
        """Publish how many clients wait here and since when, for the other workers: at
        every change, since other workers decide by it whom a free server goes to."""
        waiting = self.waiting
        since = int(waiting[0].wait_started * 1e9) if waiting else 0
        self.worker.segment.set_waiting(self.rows[0], self.worker.slot, len(waiting), since)

    def _retire(self, server: Server, now: float) -> bool:
        """Close ``server`` instead of reusing it when it is marked, too old or surplus."""
        if server.close_needed:
            server.close("database configuration changed")
        elif self.worker.is_paused(self.dbname):
            server.close("pause")
        elif self.lifetime and now - server.born > self.lifetime:
            server.close("server lifetime over")
        elif self.check_surplus and self._surplus():
            server.close("pool size reduced")
        else:
            return False
        return True

    def trim(self) -> None:
        """After a reload made the pool smaller: close idle servers beyond the new size now,
        rather than when they next become free (an idle one may never)."""
        closing = sum(1 for s in self.worker.closing if s.pool is self)
        while self.idle and self.check_surplus and (
                self.worker.segment.servers_total(self.rows[0]) - closing
                > self.size + self.reserve):
            self.idle.popleft().close("pool size reduced")
            closing += 1

    def _surplus(self) -> bool:
        """More servers than the (reloaded, smaller) size allows, across all workers?"""
        if self.size and self.worker.segment.servers_total(self.rows[0]) > self.size + self.reserve:
            return True
        self.check_surplus = False
        return False

    # -------------------------------------------------------------------- growth

    def grow(self) -> None:
        """Open server connections for waiting clients, as far as the limits allow."""
        if self.worker.is_paused(self.dbname):
            return
        if self.login_error is not None and _monotonic() < self.retry_at:
            return
        keys = self._keys_to_open()
        want = len(keys)
        if self.welcome is None and not self.servers and not self.connecting:
            want = max(want, 1)
        if self.min_size:
            total = self.worker.segment.servers_total(self.rows[0])
            want = max(want, self.min_size - total - self.connecting)
        if want > 0 and _monotonic() < self.full_until:
            return  # refused a moment ago: the janitor and hand-overs take it from here
        while want > 0:
            admitted = self.may_open()
            if admitted is None:  # another worker holds the admission lock for a moment
                self._grow_later()
                return
            if not admitted:
                self.full_until = _monotonic() + FULL_BACKOFF
                if self.waiting or self.welcome is None:  # queries, or logins, wait for one
                    self._make_room()
                return
            key = keys.pop() if keys else ()
            self.connecting += 1
            self.connecting_for[key] += 1
            gevent.spawn(self._connect, key)
            want -= 1

    def _keys_to_open(self) -> list[tuple]:
        """The startup parameters of the servers waiting clients need (session mode: those
        of each client no server is being opened for yet), the longest waiting last."""
        if self.mode != SESSION:
            return [()] * (len(self.waiting) - self.connecting)
        pending = collections.Counter(self.connecting_for)
        keys = []
        for client in self.waiting:
            key = client.startup.key
            if pending[key] > 0:
                pending[key] -= 1
            else:
                keys.append(key)
        keys.reverse()
        return keys

    def _grow_later(self) -> None:
        if not self._grow_pending:
            self._grow_pending = True
            gevent.spawn_later(0.001, self._grow_retry)

    def _grow_retry(self) -> None:
        self._grow_pending = False
        self.grow()

    def may_open(self) -> bool | None:
        """The one place where a new server connection is allowed or refused (all workers).

        True: admitted and counted. False: a limit refuses. None: ask again in a moment.
        """
        limit = self.size
        if (limit and self.reserve and self.waiting and _monotonic() - self.waiting[0].wait_started
                >= self.worker.settings.reserve_pool_timeout):
            limit += self.reserve
        admitted = self.worker.limits.admit_server(self, limit)
        if admitted and self.size and limit > self.size and \
                self.worker.segment.servers_total(self.rows[0]) > self.size:
            log.info("%s/%s taking connection from reserve_pool", self.dbname, self.user)
        return admitted

    def _make_room(self) -> None:
        """At a limit with clients waiting: ask for idle servers of this pool elsewhere; when
        max_db/max_user_connections is what refuses, free an idle server of a sibling pool —
        here if there is one, else in whichever worker holds one (PgBouncer evicts the
        oldest idle connection of the other pools)."""
        if self.mode == SESSION and self.idle and self.waiting:
            # Idle while clients wait: opened with other startup parameters than theirs.
            self.idle.popleft().close("startup parameters of waiting clients differ")
            return
        shared = self.worker.limits.blocked_by_shared_limit(self)
        if shared is not None and evict_idle(self.worker.pools.values(), self.dbname, self.user,
                                             shared, 0.0):
            shared = None  # its backend's exit frees the room: room_freed() grows this pool
        self.worker.exchange.want(self, shared or "")

    def _connect(self, key: tuple) -> None:
        """Greenlet: log a new server in (in session mode with the startup parameters
        ``key``) and put it to work. Whatever goes wrong costs this attempt (and the server,
        if it got that far), never the admission count."""
        from .login import LoginFailed, open_server  # login imports pool's neighbours

        try:
            server = open_server(self, key)
        except Exception as exc:
            if not isinstance(exc, LoginFailed):
                log.error("%s/%s server login: internal error", self.dbname, self.user,
                          exc_info=exc)
                exc = LoginFailed("internal error")
            self._connected(key)
            self.worker.limits.server_closed(self.rows)
            self._login_failed(exc, key)
            return
        self._connected(key)
        self.login_error = None
        self.servers.add(server)
        try:
            if self.welcome is None and not key:  # the database's own defaults, for all
                self.set_welcome(dict(server.params))
                self.welcome_ready.set()
                self.worker.limits.publish_welcome(self, self.welcome)
            server.start()
            if self.db.connect_query:
                server.run_internal(self.db.connect_query, self._connect_query_done)
            else:
                self.give(server)
        except Exception as exc:
            server.fail(exc)

    def _connect_query_done(self, server: Server, error: dict[str, str] | None) -> None:
        if error is not None:
            log.warning("%s connect_query failed: %s", server.label(), error.get("M", ""))
        self.give(server)

    def _connected(self, key: tuple) -> None:
        self.connecting -= 1
        self.connecting_for[key] -= 1
        if not self.connecting_for[key]:
            del self.connecting_for[key]

    def _login_failed(self, exc, key: tuple = ()) -> None:
        log.warning("%s/%s server login failed: %s", self.dbname, self.user, exc.message)
        # Logins waiting for their server hear why, as PostgreSQL would have told them; a
        # value only some clients asked for is their problem, not the pool's. Through a
        # passing failure (a restart) they wait for the retry instead.
        fields = exc.fields
        own = bool(key) and fields.get("C") in startup.PARAMETER_ERRORS
        if own or not exc.transient:
            for client in [c for c in self.waiting if c.greeting is not None
                           and (not own or c.startup.key == key)]:
                client.disconnect("server login failed: %s" % exc.message,
                                  error=fields.get("M", exc.message),
                                  sqlstate=fields.get("C", "08P01"))
        if own:
            return
        self.login_error = exc.fields
        self.login_transient = exc.transient
        retry = self.worker.settings.server_login_retry
        self.retry_at = _monotonic() + (min(retry, TRANSIENT_LOGIN_RETRY) if exc.transient
                                        else retry)
        # Clients still in login wait for the welcome: a refusal of the login itself is
        # theirs now; through a passing failure they wait for the retry (client_login_timeout).
        if not exc.transient:
            self.welcome_ready.set()
            self.welcome_ready = gevent.event.Event()
        # Queued requests cannot be served before a login works: fail them now, as new ones
        # will be, rather than at query_wait_timeout.
        failing = self.fast_fail(retry_due=False)
        if failing is not None:
            for client in [c for c in self.waiting if c.greeting is None]:
                client.disconnect(failing, error=failing)

    def fast_fail(self, retry_due: bool = True) -> str | None:
        """PgBouncer's fast-fail text while server logins fail and the pool has no server
        anywhere; None when a client may wait (or a retry is due: it waits for that one)."""
        if self.login_error is None or self.connecting:
            return None
        if retry_due and _monotonic() >= self.retry_at:
            return None
        if self.worker.segment.servers_total(self.rows[0]):
            return None
        return "server login has been failing, cached error: %s (server_login_retry)" % (
            self.login_error.get("M", "unknown error"))

    # -------------------------------------------------------------------- bookkeeping

    def client_gone(self, client: Client) -> None:
        self.clients.discard(client)
        if client.state == "waiting":
            try:
                self.waiting.remove(client)
            except ValueError:
                pass
            self.waiting_changed()

    def set_welcome(self, params: dict[str, str]) -> None:
        """Server defaults greeting new clients; the untracked part is encoded once."""
        tracked = self.worker.tracked
        self.welcome = params
        self.welcome_tracked = {k: v for k, v in params.items() if tracked.canonical(k)}
        self.welcome_static = b"".join(proto.parameter_status(k, v) for k, v in params.items()
                                       if k not in self.welcome_tracked)
        self._welcomes = {}

    def welcome_for(self, params: dict[str, str]) -> bytes:
        """Every ParameterStatus a new client gets: the server's defaults with the client's
        tracked values. Most clients of a pool ask for the same values, so each distinct
        set is encoded once (a few dozen kept: application names may all differ)."""
        key = tuple(params.items())
        data = self._welcomes.get(key)
        if data is None:
            if len(self._welcomes) >= WELCOMES_KEPT:
                self._welcomes.clear()
            data = self._welcomes[key] = self.welcome_static + b"".join(
                proto.parameter_status(k, v) for k, v in params.items())
        return data

    def adopt(self, server: Server) -> None:
        """A server handed over by another worker (already in ``servers``) goes to work
        here: to the longest-waiting client of this worker, else idle. It is not passed on
        again at once: with every worker's queue moving, that would bounce it around."""
        if not self._retire(server, _monotonic()):
            self._serve_here(server)

    def offer_idle(self) -> None:
        """Another worker asked: hand over servers that sit idle here — idle for a while,
        not just between two transactions of a busy pool — as many as its clients wait."""
        seg = self.worker.segment
        budget: dict[int, int] = {}
        settled = _monotonic() - IDLE_OFFER_AFTER
        while self.idle and not self.waiting and self.idle[0].last_used < settled:
            remote = seg.oldest_waiter_elsewhere(self.rows[0], self.worker.slot)
            if remote is None:
                return
            slot = remote[0]
            if slot not in budget:
                budget[slot] = seg.cell_get(self.rows[0], slot, "cl_waiting")
            if budget[slot] <= 0:
                return
            server = self.idle.popleft()  # the one idle longest
            if self._retire(server, _monotonic()):
                continue
            if not self.worker.exchange.hand_over(server, slot):
                self.idle.appendleft(server)
                return
            budget[slot] -= 1

    def server_gone(self, server: Server) -> None:
        """``server`` left this pool (closing, or handed to another worker)."""
        self.servers.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass

    def room_freed(self) -> None:
        """A server of this pool stopped counting: waiting clients here may get one now, and
        so may those of pools sharing its max_db/max_user_connections."""
        for pool in self.worker.pools.values():
            if pool.waiting and (pool.dbname == self.dbname or pool.user == self.user):
                pool.full_until = 0.0
                pool.grow()

    def close_idle_all(self, reason: str) -> None:
        while self.idle:
            self.idle.popleft().close(reason)

    def mark_close_needed(self) -> None:
        """The database's connection settings changed: replace every server as it frees."""
        for server in list(self.servers):
            server.close_needed = True
        self.close_idle_all("database configuration changed")

    def kill(self, reason: str) -> None:
        """Disconnect every client and server of this pool (database removed, KILL)."""
        for client in list(self.clients):
            client.disconnect(reason, error=reason)
        for server in list(self.servers):
            server.close(reason)

    def close_idle(self, reason: str) -> bool:
        """Close one idle server (the least recently used); False when there is none."""
        if not self.idle:
            return False
        self.idle.popleft().close(reason)
        return True

    def janitor(self, now: float) -> None:
        """Timeouts of this pool; runs a few times a second."""
        s = self.worker.settings
        qwt = self.query_wait_timeout
        while qwt and self.waiting and now - self.waiting[0].wait_started > qwt:
            self.waiting[0].disconnect("query_wait_timeout", error="query_wait_timeout")
        self._session_timeouts(now)
        # Publishing at every release would cost the hot path; a few times a second is enough
        # for SHOW POOLS and metrics (and an admin command asks for a fresh publish anyway).
        self.publish()
        if s.server_idle_timeout:
            for server in [srv for srv in self.idle if now - srv.last_used > s.server_idle_timeout]:
                if len(self.servers) <= self.min_size:
                    break
                server.close("server idle timeout")
        if self.lifetime:
            for server in [srv for srv in self.idle if now - srv.born > self.lifetime]:
                server.close("server lifetime over")
        if self.waiting or (self.min_size and self.worker.segment.servers_total(self.rows[0])
                                + self.connecting < self.min_size):
            self.grow()

    def _session_timeouts(self, now: float) -> None:
        """query_timeout, idle_transaction_timeout, transaction_timeout, client_idle_timeout.

        Like PgBouncer, a timed-out server is closed and its client gets the reason as an error
        and is disconnected. Unlike PgBouncer, a query still running is cancelled first: a
        backend does not read our Terminate until its query ends, and the server stays counted
        against the limits until then.
        """
        qt, it = self.query_timeout, self.idle_transaction_timeout
        tt, ct = self.transaction_timeout, self.client_idle_timeout
        if not (qt or it or tt or ct):
            return
        if qt:
            # A request still waiting for a server counts too: it is the client's query time.
            for client in [c for c in self.waiting if now - c.request_time > qt]:
                client.disconnect("query_timeout", error="query_timeout")
        for server in [srv for srv in self.servers if srv.client is not None]:
            running = server.expect > 0
            if running and qt and now - server.query_start > qt:
                reason = "query timeout"
            elif (not running and it and server.bs.status != STATUS_IDLE
                  and now - server.query_start > it):
                reason = "idle transaction timeout"
            elif tt and server.xact_start and now - server.xact_start > tt:
                reason = "transaction timeout"
            else:
                continue
            server.close(reason)  # which cancels a running query first
        if ct:
            # Only clients without a server: one linked is in a transaction or a session that
            # the other timeouts govern (as in PgBouncer).
            for client in [c for c in self.clients if c.server is None and c.state == "active"
                           and c.pending is None and now - c.idle_since > ct]:
                client.disconnect("client_idle_timeout", error="client_idle_timeout")

    def publish(self) -> None:
        """Write this worker's share of the pool (states and stats) to its shared cell."""
        states = [s.state for s in self.servers]
        st = self.stats
        self.worker.segment.cell_set(
            self.rows[0], self.worker.slot,
            sv_active=states.count("active"), sv_idle=states.count("idle"),
            sv_used=states.count("used"), sv_tested=states.count("tested"),
            sv_being_canceled=states.count("being_canceled"),
            sv_login=self.connecting, cl_active=len(self.clients) - len(self.waiting),
            clients=len(self.clients),
            **{name: getattr(st, name) for name in PoolStats.__slots__})
        self._refresh_shares()
