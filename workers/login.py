"""Logins, one greenlet each: a client's startup and authentication, a server's connect and
authentication, and the short connections that carry CancelRequests.

These are the slow, multi-step dialogues, written as straight-line cooperative code; when a
login ends the connection is handed to the event-driven relay (``workers/relay.py``).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import time
from typing import TYPE_CHECKING

import gevent
from gevent.socket import getaddrinfo, wait_read, wait_write

from prefork import log as plog

from . import auth, proto, startup
from .proto import MessageReader, ProtocolError
from .relay import SESSION, Client, Server

if TYPE_CHECKING:
    from prefork.config import Database

    from .pool import Pool
    from .worker import Worker

log = logging.getLogger("pgherd")
_monotonic = time.monotonic

ADMIN_DATABASES = ("pgbouncer", "pgherd")
AUTH_OK = proto.auth_request(proto.AUTH_OK)


class LoginTimeout(Exception):
    pass


class ClientGone(Exception):
    """The client went away during login; the argument is the reason logged."""


class Refused(Exception):
    """Refuse a client login with PgBouncer's text and SQLSTATE."""

    def __init__(self, text: str, sqlstate: str = "08P01", log_text: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.sqlstate = sqlstate
        self.log_text = log_text or text


#: Server login errors that pass by themselves (PostgreSQL restarting, shutting down, full).
TRANSIENT_SQLSTATES = frozenset(("57P01", "57P02", "57P03", "53300", "53400"))


class LoginFailed(Exception):
    """A server login failed; ``fields`` are the ErrorResponse to pass on to clients.
    ``transient``: the server could not be reached or is restarting, rather than refusing
    this login (the pool retries sooner, see ``pool.TRANSIENT_LOGIN_RETRY``)."""

    def __init__(self, message: str, fields: dict[str, str] | None = None,
                 transient: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or {"S": "FATAL", "C": "08P01", "M": message}
        self.transient = (transient if transient is not None
                          else self.fields.get("C", "") in TRANSIENT_SQLSTATES)


# --------------------------------------------------------------------------- cooperative I/O


def _receive(sock: socket.socket, reader: MessageReader) -> bool:
    """Feed ``reader`` what the socket has now; False if it has nothing yet."""
    try:
        data = sock.recv(16384)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        raise ClientGone(exc.strerror) from exc
    if not data:
        raise ClientGone("unexpected eof")
    reader.feed(data)
    return True


def read_message(sock: socket.socket, reader: MessageReader, deadline: float) -> tuple[int, bytes]:
    while True:
        msg = reader.next()
        if msg is not None:
            return msg
        if not _receive(sock, reader):
            remaining = deadline - _monotonic()
            if remaining <= 0:
                raise LoginTimeout()
            wait_read(sock.fileno(), timeout=remaining, timeout_exc=LoginTimeout())


def send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, InterruptedError):
            remaining = deadline - _monotonic()
            if remaining <= 0:
                raise LoginTimeout()
            wait_write(sock.fileno(), timeout=remaining, timeout_exc=LoginTimeout())
            continue
        except OSError as exc:
            raise ClientGone(exc.strerror) from exc
        view = view[sent:]


# --------------------------------------------------------------------------- client login


class _Wait(Exception):
    """This login must wait for something (a password, a server, a lock): a greenlet takes
    it from where it stopped."""


class Login:
    """One client's login: startup packet, authentication, welcome; then the relay.

    It starts without a greenlet, on a read watcher: with TCP_DEFER_ACCEPT the first packet
    is there at accept, an SSLRequest gets its 'N' at once, and a trust login with a known
    pool finishes in one callback. Anything that has to wait raises :class:`_Wait` and
    the same steps go on in a greenlet; steps already done are not redone.
    """

    __slots__ = ("worker", "sock", "peer", "cid", "deadline", "reader", "watcher", "params",
                 "admitted", "user", "dbname", "negotiate", "greenlet")

    def __init__(self, worker: Worker, sock: socket.socket, peer: tuple[str, int],
                 cid: int) -> None:
        self.worker = worker
        self.sock = sock
        self.peer = peer
        self.cid = cid
        self.deadline = _monotonic() + (worker.settings.client_login_timeout or 1e9)
        self.reader = MessageReader(startup=True)
        self.watcher = None
        self.params: dict[str, str] | None = None
        self.admitted = False  # holds one of the service's max_client_conn places
        self.user = self.dbname = ""  # not known yet: "(nouser)", "(nodb)" in the log
        self.negotiate = b""  # a NegotiateProtocolVersion owed to the client
        self.greenlet: gevent.Greenlet | None = None
        worker.logins += 1

    @property
    def label(self) -> str:
        return plog.socket_prefix("C", self.cid, self.dbname, self.user, *self.peer)

    def start(self) -> None:
        """From the accept callback: read what is there, wait for more on a watcher."""
        self.worker.handshakes[self] = self.deadline  # its janitor enforces the timeout
        self.watcher = self.worker.loop.io(self.sock.fileno(), 1)
        self.watcher.start(self._readable)
        self._readable()

    def _readable(self) -> None:
        self._guarded(self._step, False)

    def _step(self, can_wait: bool) -> bool:
        """Advance as far as possible; True when the login is over (either way)."""
        if self.params is None:
            self.params = self._startup(can_wait)
            if self.params is None:
                return False  # more to read (the watcher calls again) or a cancel served
        self._stop_watching(close=False)  # the client takes the watcher over
        self._finish(can_wait)
        return True

    def _guarded(self, step, can_wait: bool) -> None:
        """Run ``step`` turning every failure into PgBouncer's answer; the one place where a
        login ends badly."""
        done = True
        try:
            done = step(can_wait)
        except _Wait:
            self._stop_watching()
            self.greenlet = gevent.spawn(self._guarded, self._step, True)
            return
        except Refused as exc:
            self._refuse(exc)
        except LoginTimeout:
            self._refuse(Refused("client_login_timeout"))
        except ProtocolError as exc:
            self._refuse(Refused("bad packet", log_text="bad packet: %s" % exc))
        except ClientGone as exc:
            self._close()
            if self.worker.settings.log_disconnections:
                log.info("%s closing because: %s (age=0s)", self.label,
                         "client close request" if exc.args == ("close request",)
                         else "client unexpected eof")
        except Exception:  # a bug costs this login, never the worker or the admission count
            log.exception("%s: login failed", self.label)
            self._refuse(Refused("internal error"))
        if done:
            self._over()

    def timed_out(self) -> None:
        """The janitor: no startup packet within client_login_timeout."""
        self._refuse(Refused("client_login_timeout"))
        self._over()

    # -- the steps -----------------------------------------------------------------------

    def _startup(self, can_wait: bool) -> dict[str, str] | None:
        """Read until a StartupMessage; answer SSL/GSSENC with 'N'; serve a CancelRequest."""
        sock, reader, worker = self.sock, self.reader, self.worker
        while True:
            if can_wait:
                msg = read_message(sock, reader, self.deadline)
            else:
                msg = _read_available(sock, reader)
                if msg is None:
                    return None
            mtype, body = msg
            if mtype == proto.F_TERMINATE:
                raise ClientGone("close request")
            code, params = proto.parse_startup(body)
            if code >> 16 == 3:
                if reader.buf:
                    raise ProtocolError("data after startup packet")
                # As PostgreSQL and PgBouncer 1.25: a newer minor or protocol options we do
                # not know get NegotiateProtocolVersion (3.0, the options), not a refusal.
                unknown = [k for k in params if k.startswith("_pq_.")]
                if code != proto.PROTOCOL_V3 or unknown:
                    self.negotiate = proto.negotiate_protocol_version(unknown)
                return params
            if code in (proto.SSL_REQUEST_CODE, proto.GSSENC_REQUEST_CODE):
                if reader.buf:
                    raise Refused("received unencrypted data after SSL request")
                send_all(sock, b"N", self.deadline)  # one byte into an empty buffer
                if not can_wait:
                    return None  # its startup packet comes only after our answer: no recv now
                continue
            if code == proto.CANCEL_REQUEST_CODE:
                self._stop_watching()
                worker.cancel(*params, sock)  # which closes sock once the request is done
                self._over()
                return None
            if code >> 16 < 3:
                raise Refused("old V2 protocol not supported")
            raise Refused("unsupported protocol version %d.%d" % (code >> 16, code & 0xFFFF))

    def _finish(self, can_wait: bool) -> None:
        worker, sock, params = self.worker, self.sock, self.params
        s = worker.settings
        user = self.user = params.get("user", "")
        if not user:
            raise Refused("no username supplied")
        dbname = self.dbname = params.get("database", "") or user
        if dbname in ADMIN_DATABASES:
            if not can_wait:
                raise _Wait()
            from .admin import admin_login

            self._log_attempt()
            self._negotiate()
            admin_login(worker, sock, self.reader, self.deadline, user, dbname, self.cid,
                        self.peer, params)
            return
        if not self.admitted:
            self.admitted = _admit(worker, can_wait) or self._evict_unauthenticated()
            if not self.admitted:
                raise Refused("no more connections allowed (max_client_conn)")
            worker.unauthenticated[self] = _monotonic()
            self._log_attempt()
        self._negotiate()
        if worker.draining:
            raise Refused("pooler is shutting down")
        db = worker.database(dbname)
        if db is None:
            raise Refused("no such database: %s" % dbname)
        if worker.is_disabled(dbname):
            raise Refused('database "%s" is disabled' % dbname)
        try:
            asked = startup.parse(worker, params)
        except startup.StartupError as exc:
            raise Refused(str(exc)) from None
        pool_user = db.user or user
        if not can_wait and (s.auth_type not in ("trust", "any")
                             or (db.name, pool_user) not in worker.pools):
            raise _Wait()  # a password exchange, or a new pool's shared rows
        keys, auth_ok = authenticate(worker, sock, self.reader, self.deadline, user, db)
        worker.unauthenticated.pop(self, None)
        pool = worker.pool_for(db, pool_user)
        if keys is not None and pool.scram_keys is None:
            pool.scram_keys = keys
        session = pool.mode == SESSION
        if not session and pool.welcome is None:
            if not can_wait:
                raise _Wait()
            _wait_welcome(pool, self.deadline)
        else:
            failing = pool.fast_fail()
            if failing is not None and session:  # as PostgreSQL refused the client's login
                fields = pool.login_error or {}
                raise Refused(fields.get("M", failing), fields.get("C", "08P01"),
                              log_text=failing)
            if failing is not None:
                raise Refused(failing)
        tracked = None if session else startup.known(pool, asked)
        client = Client(worker, sock, pool, {**pool.welcome_tracked, **(tracked or asked.tracked)},
                        user, dbname, self.cid, self.peer, self.watcher)
        self.watcher = None
        client.startup = asked
        if not session:
            client.extra = asked.extra
        pool.stats.client_login_count += 1
        worker.client_ready(client)
        self.admitted = False  # the client owns its place now; Client.disconnect gives it back
        if tracked is None:
            # Its server first: in session mode the client's own (its pid, its parameters),
            # else one that tries values this pool has not seen accepted. startup.greet ends
            # the login once it is linked; meanwhile a hang-up is noticed.
            client.greeting = auth_ok
            client.pending = b""
            client.request_time = _monotonic()
            client.start()
            if pool.assign(client) is not None:
                client.resume()
            return
        client.cancel_key = worker.new_cancel_key(client)
        # Everything the client waits for in one packet: AuthenticationOk, the server's
        # parameters (its own tracked values), BackendKeyData, ReadyForQuery.
        out = [auth_ok, pool.welcome_for(client.params),
               proto.backend_key_data(*client.cancel_key), proto.READY_IDLE]
        client.start()
        client.write(b"".join(out))  # a fresh socket takes it; else the backlog does

    def _evict_unauthenticated(self) -> bool:
        """max_client_conn is reached: take the place of this worker's oldest login still
        in authentication, if any. A flood of logins that never finish (a SCRAM exchange
        left hanging) then cannot keep legitimate clients out until client_login_timeout."""
        waiting = self.worker.unauthenticated
        for victim, since in waiting.items():
            if victim.greenlet is not None:
                del waiting[victim]
                victim.admitted = False  # its place is ours now
                victim.greenlet.kill(Refused("no more connections allowed (max_client_conn)"),
                                     block=False)
                log.info("%s: still authenticating after %.1fs: evicted for a new login",
                         victim.label, _monotonic() - since)
                return True
        return False

    def _negotiate(self) -> None:
        """Send the NegotiateProtocolVersion owed, once: where PgBouncer does, after the
        max_client_conn check and before authentication."""
        if self.negotiate:
            send_all(self.sock, self.negotiate, self.deadline)
            self.negotiate = b""

    # -- endings -------------------------------------------------------------------------

    def _log_attempt(self) -> None:
        if self.worker.settings.log_connections:
            log.info("%s login attempt: db=%s user=%s tls=no replication=no", self.label,
                     self.dbname, self.user)

    def _stop_watching(self, close: bool = True) -> None:
        self.worker.handshakes.pop(self, None)
        watcher = self.watcher
        if watcher is not None:
            watcher.stop()
            if close:
                watcher.close()
                self.watcher = None

    def _refuse(self, exc: Refused) -> None:
        self._stop_watching()
        _refuse(self.worker, self.sock, exc, self.label)

    def _close(self) -> None:
        self.sock.close()

    def _over(self) -> None:
        self._stop_watching()
        if self.worker is None:
            return  # already over
        self.worker.unauthenticated.pop(self, None)
        self.worker.logins -= 1
        if self.admitted:
            self.worker.limits.client_closed()
        self.worker = None


def _read_available(sock: socket.socket, reader: MessageReader) -> tuple[int, bytes] | None:
    """The next complete packet from what the socket has now; None if it has not."""
    msg = reader.next()
    if msg is not None or not _receive(sock, reader):
        return msg
    return reader.next()


def _admit(worker: Worker, can_wait: bool) -> bool:
    """max_client_conn across all workers; waits (cooperatively) for a busy admission lock."""
    while True:
        admitted = worker.limits.admit_client()
        if admitted is not None:
            return admitted
        if not can_wait:
            raise _Wait()
        gevent.sleep(0.0002)


def _refuse(worker: Worker, sock: socket.socket, exc: Refused, label: str) -> None:
    """Send PgBouncer's error and close; logged as PgBouncer logs a failed login, with the
    client's address (``label``)."""
    try:
        sock.send(proto.error_response(exc.text, exc.sqlstate))
    except OSError:
        pass
    sock.close()
    if worker.settings.log_disconnections:
        log.info("%s closing because: %s (age=0s)", label, exc.text)
    if worker.settings.log_pooler_errors:
        log.warning("%s pooler error: %s", label, exc.log_text)


def _wait_welcome(pool: Pool, deadline: float) -> None:
    """Until the pool knows the server parameters new clients are greeted with: from its
    first login in any worker (shared memory), else from a login this worker starts."""
    while pool.welcome is None:
        shared = pool.worker.limits.shared_welcome(pool)
        if shared is not None:
            pool.set_welcome(shared)
            break
        # The server refused the login itself: its error is the client's too. Through a
        # passing failure (a restart) the client waits for the retry, up to its timeout.
        failing = pool.fast_fail()
        if failing is not None and not pool.login_transient:
            fields = pool.login_error
            raise Refused(fields.get("M", failing), fields.get("C", "08P01"), log_text=failing)
        event = pool.welcome_ready
        pool.grow()
        remaining = deadline - _monotonic()
        if remaining <= 0:
            raise Refused("client_login_timeout (server down)")
        # Another worker may publish the welcome meanwhile: look again now and then.
        event.wait(min(remaining, 0.05))


# --------------------------------------------------------------------------- authentication


def authenticate(worker: Worker, sock: socket.socket, reader: MessageReader, deadline: float,
                 user: str, db: Database) -> tuple[tuple[bytes, bytes] | None, bytes]:
    """Check the client's credentials per auth_type.

    Returns the SCRAM keys for passthrough (or None) and the final authentication messages,
    which the caller sends together with the rest of the welcome, in one packet. Unknown
    users are run through the same exchange as known ones and fail the same way.
    """
    s = worker.settings
    method = s.auth_type
    stored = worker.config.userlist.get(user)
    reader.startup = False
    reader.max_size = proto.MAX_LOGIN_MESSAGE
    if method == "any":
        if not db.user:
            raise Refused("bouncer config error", log_text="auth_type=any requires a forced user")
    elif method == "trust":
        if stored is None:
            raise Refused('"trust" authentication failed')
    elif method == "plain":
        send_all(sock, proto.auth_request(proto.AUTH_CLEARTEXT), deadline)
        password = _password(sock, reader, deadline)
        if stored is None or not auth.plain_verify(stored, user, password.rstrip(b"\x00")):
            raise Refused("password authentication failed")
    elif method == "md5" and not (stored and auth.parse_scram_secret(stored)):
        salt = secrets.token_bytes(4)
        send_all(sock, proto.auth_request(proto.AUTH_MD5, salt), deadline)
        response = _password(sock, reader, deadline).rstrip(b"\x00")
        if stored is None or not auth.md5_verify(stored, user, salt, response):
            raise Refused("password authentication failed")
    else:  # scram-sha-256, or md5 with a SCRAM secret stored
        return _scram(worker, sock, reader, deadline, user, stored)
    return None, AUTH_OK


def _password(sock: socket.socket, reader: MessageReader, deadline: float) -> bytes:
    mtype, body = read_message(sock, reader, deadline)
    if mtype != proto.F_PASSWORD:
        raise ProtocolError("expected password packet, got %r" % chr(mtype))
    return body


def _scram(worker: Worker, sock: socket.socket, reader: MessageReader, deadline: float,
           user: str, stored: str | None) -> tuple[tuple[bytes, bytes] | None, bytes]:
    usable = stored if stored and not auth.is_md5_secret(stored) else None
    server = auth.ScramServer(user, usable, worker.settings.scram_iterations)
    send_all(sock, proto.auth_sasl(server.mechanisms()), deadline)
    body = _password(sock, reader, deadline)
    try:
        mechanism, pos = proto.parse_cstring(body)
        if mechanism != auth.SCRAM_SHA_256 or len(body) < pos + 4:
            raise auth.AuthFailed("unsupported SASL mechanism %r" % mechanism)
        length = proto.INT32.unpack_from(body, pos)[0]
        first = body[pos + 4 : pos + 4 + length]
        send_all(sock, proto.auth_request(proto.AUTH_SASL_CONTINUE,
                                          server.handle_client_first(first)), deadline)
        final = _password(sock, reader, deadline)
        server_final = server.handle_client_final(final)
    except (auth.AuthFailed, ValueError) as exc:
        raise Refused("SASL authentication failed",
                      log_text="SASL authentication failed: %s" % exc) from None
    done = proto.auth_request(proto.AUTH_SASL_FINAL, server_final) + AUTH_OK
    if server.client_key is not None and server.server_key is not None:
        return (server.client_key, server.server_key), done
    return None, done


# --------------------------------------------------------------------------- server login


def server_target(worker: Worker, db: Database) -> tuple:
    """(family, address) of the database's server, round-robin over a host list."""
    hosts = db.host or (worker.settings.unix_socket_dir,)
    host = hosts[worker.next_host_index(db.name) % len(hosts)]
    if host.startswith("/"):
        return socket.AF_UNIX, "%s/.s.PGSQL.%d" % (host, db.port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, db.port)


def connect(target: tuple, deadline: float) -> socket.socket:
    family, address = target
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            address = getaddrinfo(address[0], address[1], family, socket.SOCK_STREAM)[0][4]
        err = sock.connect_ex(address)
        if err in (115, 11):  # EINPROGRESS, EAGAIN (unix sockets with a full backlog)
            remaining = deadline - _monotonic()
            wait_write(sock.fileno(), timeout=max(remaining, 0.001), timeout_exc=LoginTimeout())
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


def open_server(pool: Pool, key: tuple = ()) -> Server:
    """Connect and log in a new server connection for ``pool``, with a session-mode client's
    startup parameters ``key`` (``startup.Startup.key``); raises LoginFailed."""
    worker = pool.worker
    db = pool.db
    deadline = _monotonic() + (worker.settings.server_connect_timeout or 1e9)
    target = server_target(worker, db)
    try:
        sock = connect(target, deadline)
    except LoginTimeout:
        raise LoginFailed("connect timeout", transient=True) from None
    except OSError as exc:
        raise LoginFailed("connect failed: %s" % exc.strerror, transient=True) from None
    try:
        params, pid, secret = _server_startup(pool, sock, deadline, key)
    except LoginTimeout:
        sock.close()
        raise LoginFailed("connect timeout", transient=True) from None
    except (ClientGone, ProtocolError) as exc:
        sock.close()
        raise LoginFailed("server closed the connection during login: %s" % exc,
                          transient=True) from None
    except BaseException:
        sock.close()
        raise
    server = Server(worker, sock, pool, params, pid, secret, target)
    server.startup = key
    if worker.settings.log_connections:
        local = server.local()
        log.info("%s new connection to server (from %s:%d)", server.label(), *local)
    return server


def _server_startup(pool: Pool, sock: socket.socket, deadline: float,
                    key: tuple) -> tuple[dict[str, str], int, int]:
    db = pool.db
    base = {}
    for attr, name in (("client_encoding", "client_encoding"), ("datestyle", "DateStyle"),
                       ("timezone", "TimeZone"), ("application_name", "application_name")):
        value = getattr(db, attr)
        if value:
            base[name] = value
    packet = {"user": pool.user, "database": db.dbname or db.name,
              **startup.server_packet(base, key)}
    send_all(sock, proto.startup_message(packet), deadline)
    reader = MessageReader()
    params: dict[str, str] = {}
    pid = secret = 0
    scram: auth.ScramClient | None = None
    while True:
        mtype, body = read_message(sock, reader, deadline)
        if mtype == proto.B_AUTH:
            code = proto.INT32.unpack_from(body, 0)[0]
            if code == proto.AUTH_OK:
                continue
            try:
                reply, scram = _server_auth(pool, code, body[4:], scram)
            except auth.AuthFailed as exc:
                raise LoginFailed("server login failed: %s" % exc) from None
            if reply:
                send_all(sock, reply, deadline)
        elif mtype == proto.B_PARAMETER_STATUS:
            name, value = proto.parse_parameter_status(body)
            params[name] = value
        elif mtype == proto.B_BACKEND_KEY:
            pid, secret = struct.unpack_from("!II", body, 0)
        elif mtype == proto.B_READY:
            return params, pid, secret
        elif mtype == proto.B_ERROR:
            fields = proto.parse_fields(body)
            raise LoginFailed(fields.get("M", "server error"), fields)
        elif mtype in (proto.B_NOTICE, proto.B_NEGOTIATE):
            continue
        else:
            raise ProtocolError("unexpected message %r during server login" % chr(mtype))


def _server_auth(pool: Pool, code: int, data: bytes,
                 scram: auth.ScramClient | None) -> tuple[bytes, auth.ScramClient | None]:
    """Answer one authentication request of the server."""
    password = pool.password
    if code == proto.AUTH_CLEARTEXT:
        if not password or auth.is_md5_secret(password) or auth.parse_scram_secret(password):
            raise auth.AuthFailed("wrong password type")
        return proto.password_message(password.encode() + b"\x00"), None
    if code == proto.AUTH_MD5:
        if not password:
            raise auth.AuthFailed("no password for server login")
        return proto.password_message(auth.md5_client_response(pool.user, password, data[:4])
                                      + b"\x00"), None
    if code == proto.AUTH_SASL:
        mechanisms = [m.decode() for m in data.split(b"\x00") if m]
        if auth.SCRAM_SHA_256 not in mechanisms:
            raise auth.AuthFailed("none of the server's SASL authentication mechanisms are supported")
        if password and auth.parse_scram_secret(password) and pool.scram_keys:
            client = auth.ScramClient(client_key=pool.scram_keys[0], server_key=pool.scram_keys[1])
        else:
            client = auth.ScramClient(password=password or "")
        return proto.sasl_initial_response(auth.SCRAM_SHA_256, client.client_first()), client
    if code == proto.AUTH_SASL_CONTINUE and scram is not None:
        return proto.password_message(scram.handle_server_first(data)), scram
    if code == proto.AUTH_SASL_FINAL and scram is not None:
        scram.handle_server_final(data)
        return b"", None
    raise auth.AuthFailed("unsupported authentication method %d" % code)


# --------------------------------------------------------------------------- cancel


def forward_cancel(worker: Worker, server: Server,
                   request: socket.socket | None = None) -> None:
    """Greenlet: send a CancelRequest for ``server``'s backend over a new connection.

    Until PostgreSQL has closed that connection (it has then signalled the backend) the
    server is not reused (see ``Pool.release``; the spawner counts it in ``server.cancels``
    at once, before this runs), and the client's own cancel connection, ``request``, stays
    open: like PostgreSQL, pgherd answers a cancel when it is done."""
    deadline = _monotonic() + (worker.settings.server_connect_timeout or 15)
    try:
        sock = connect(server.target, deadline)
    except (OSError, LoginTimeout) as exc:
        log.warning("%s cancel request failed: %s", server.label(), exc)
        _cancel_over(server, request)
        return
    try:
        send_all(sock, proto.cancel_request(server.backend_pid, server.backend_key), deadline)
        # The server closes the connection when it has processed the request.
        wait_read(sock.fileno(), timeout=max(deadline - _monotonic(), 0.001))
    except Exception as exc:  # a failed cancel is logged, never fatal
        log.warning("%s cancel request failed: %s", server.label(), exc)
    finally:
        sock.close()
        _cancel_over(server, request)


def _cancel_over(server: Server, request: socket.socket | None) -> None:
    if request is not None:
        request.close()
    server.cancels -= 1
    if not server.cancels:
        server.pool.cancel_done(server)
