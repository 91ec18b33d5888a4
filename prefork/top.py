"""``pgherd top``: a live terminal view of a pgherd (or PgBouncer) admin console.

Once a second it polls the console (``SHOW POOLS``, ``SHOW STATS``, and ``SHOW WORKERS`` where
the console is pgherd's) and redraws: a summary line with totals; a table of pools — clients
active/waiting, servers active/idle, the oldest wait, and their database's transactions and
queries per second, average query time and average wait — sorted by what is waiting most; a
table of workers — clients, servers, waiting clients, CPU over the last interval, memory,
servers handed over per second. Keys sort (w t c s l n), filter by database (f), pause (p)
and quit (q). What is computed from the rows lives in ``topview.py``.

Why Textual: it is a maintained terminal UI framework (on top of Rich) that owns the screen,
key handling, tables and resizing, on every terminal that tmux or a terminal emulator offers
— so none of that is hand-written here. Why psycopg: the maintained PostgreSQL driver (the
one the tests already use), with libpq's handling of hosts, Unix sockets, passwords,
``.pgpass`` and TLS; its queries without parameters go out as simple-protocol messages, all
that an admin console accepts.

Which console: ``--dsn`` names any (a libpq connection string or URL, ``dbname`` defaulting to
``pgbouncer``). With CONFIG, pgherd's own: its Unix socket when there is one, else its first
listen address; as user ``pgbouncer`` when the socket belongs to us (pgherd and PgBouncer let
their own OS user in so, without a password), else the first of ``stats_users`` and
``admin_users``; a plain-text password for that user in the auth_file is used.
"""

from __future__ import annotations

import getpass
import os
import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.text import Text
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Input, Static

from .config import Config
from .topview import SORTS, PoolLine, Sample, View, WorkerLine, compute

CONNECT_TIMEOUT = 5  # seconds


# --------------------------------------------------------------------------- which console


def conninfo_from_dsn(dsn: str, user: str | None = None) -> str:
    """``dsn`` as a libpq connection string, ``dbname`` defaulting to the admin console."""
    params = conninfo_to_dict(dsn)
    params.setdefault("dbname", "pgbouncer")
    if user is not None:
        params["user"] = user
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    return make_conninfo(**params)


def conninfo_from_config(config: Config, user: str | None = None) -> str:
    """The admin console of the pgherd (or PgBouncer) that ``config`` describes."""
    s = config.settings
    params: dict[str, Any] = {"dbname": "pgbouncer", "port": s.listen_port,
                              "connect_timeout": CONNECT_TIMEOUT}
    socket_path = os.path.join(s.unix_socket_dir, ".s.PGSQL.%d" % s.listen_port) \
        if s.unix_socket_dir and not s.unix_socket_dir.startswith("@") else None
    try:
        ours = socket_path is not None and os.stat(socket_path).st_uid == os.getuid()
        have_socket = socket_path is not None
    except FileNotFoundError:
        ours = have_socket = False
    if have_socket:
        params["host"] = s.unix_socket_dir
    elif s.listen_addr:
        addr = s.listen_addr[0]
        params["host"] = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(addr, addr)
    else:
        raise ValueError("%s: no listen_addr and no Unix socket to reach the admin console"
                         % config.path)
    if user is None:
        user = os.environ.get("PGUSER")
    if user is None:
        if ours:
            user = "pgbouncer"
        else:
            named = list(s.stats_users) + list(s.admin_users)
            user = named[0] if named else getpass.getuser()
    params["user"] = user
    secret = config.userlist.get(user, "")
    if secret and not secret.startswith(("md5", "SCRAM-SHA-256$")):
        params["password"] = secret
    return make_conninfo(**params)


def describe(conninfo: str) -> str:
    """Where ``conninfo`` points, for the screen (never the password)."""
    p = conninfo_to_dict(conninfo)
    return "%s@%s:%s" % (p.get("user", getpass.getuser()), p.get("host", "/tmp"),
                         p.get("port", 5432))


# --------------------------------------------------------------------------- polling


class AdminConsole:
    """One connection to an admin console, opened again after it breaks."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.conn: psycopg.AsyncConnection | None = None
        self.version = ""
        self.pgherd = False  # SHOW WORKERS exists

    async def _show(self, command: str) -> list[dict[str, Any]]:
        assert self.conn is not None
        cur = await self.conn.execute(command)
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row)) for row in await cur.fetchall()]

    async def sample(self) -> Sample:
        """Poll the console once; raises psycopg.Error when it cannot be reached."""
        try:
            if self.conn is None or self.conn.closed:
                # autocommit: no BEGIN; prepare_threshold None: nothing but simple queries.
                self.conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, prepare_threshold=None)
                self.version = (await self._show("SHOW VERSION"))[0]["version"]
                self.pgherd = "pgherd" in self.version
            pools = await self._show("SHOW POOLS")
            stats = await self._show("SHOW STATS")
            at = time.monotonic()
            workers = await self._show("SHOW WORKERS") if self.pgherd else None
        except psycopg.Error:
            await self.close()
            raise
        return Sample(at, pools, stats, workers)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


# --------------------------------------------------------------------------- drawing


def _right(text: str, style: str = "") -> Text:
    return Text(text, style=style, justify="right")


def _n(value: float | None, digits: int = 0) -> Text:
    return _right("–" if value is None else "{:,.{}f}".format(value, digits))


def _ms(value: float | None) -> Text:
    return _right("–" if value is None else "%.*f" % (2 if value < 10 else 1, value))


def _wait(seconds: float) -> Text:
    text = "%.1fs" % seconds if seconds < 100 else "%.0fs" % seconds
    return _right(text, "bold red" if seconds >= 1 else "")


def _waiting(count: int | None) -> Text:
    return _right("–" if count is None else str(count), "bold red" if count else "")


def _mib(value: int | None) -> Text:
    return _right("–" if value is None else "%.1f" % (value / 1048576))


POOL_COLUMNS = ("database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle",
                "maxwait", "tps", "qps", "query ms", "wait ms")
WORKER_COLUMNS = ("slot", "pid", "state", "clients", "servers", "waiting", "cpu %", "rss MiB",
                  "sent/s", "recv/s", "sent", "received")
_TEXT_COLUMNS = ("database", "user", "state")
#: The column each sort order is marked on.
_SORTED_COLUMN = {"waiting": ("cl_waiting", "waiting"), "tps": ("tps", "cpu %"),
                  "clients": ("cl_active", "clients"), "servers": ("sv_active", "servers"),
                  "query": ("query ms", "cpu %"), "name": ("database", "slot")}
SORT_KEYS = {"w": "waiting", "t": "tps", "c": "clients", "s": "servers", "l": "query",
             "n": "name"}
assert set(SORT_KEYS.values()) == set(SORTS)


def pool_cells(p: PoolLine) -> tuple:
    return (Text(p.database), Text(p.user), _n(p.cl_active), _waiting(p.cl_waiting),
            _n(p.sv_active), _n(p.sv_idle), _wait(p.maxwait), _n(p.tps), _n(p.qps),
            _ms(p.query_ms), _ms(p.wait_ms))


def worker_cells(w: WorkerLine) -> tuple:
    return (_n(w.slot), _right(str(w.pid or "–")), Text(w.state), _n(w.clients),
            _n(w.servers), _waiting(w.waiting), _n(w.cpu, 1), _mib(w.rss),
            _n(w.sent_rate, 1), _n(w.received_rate, 1), _n(w.sent), _n(w.received))


def worker_total_cells(ws: list[WorkerLine]) -> tuple:
    def total(values) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    return (Text("total"), _right("%d" % len(ws)), Text(""), _n(sum(w.clients for w in ws)),
            _n(sum(w.servers for w in ws)), _waiting(total(w.waiting for w in ws)),
            _n(total(w.cpu for w in ws), 1), _mib(total(w.rss for w in ws)),
            _n(total(w.sent_rate for w in ws), 1), _n(total(w.received_rate for w in ws), 1),
            _n(sum(w.sent for w in ws)), _n(sum(w.received for w in ws)))


def _bold(cells: tuple) -> tuple:
    for cell in cells:
        cell.stylize("bold")
    return cells


class Top(App):
    """The terminal view; ``admin`` is polled every ``interval`` seconds."""

    TITLE = "pgherd top"
    AUTO_FOCUS = "#pools"  # not the hidden filter box: it would swallow the keys
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #summary { height: auto; padding: 0 1; background: $panel; }
    #pools { height: auto; max-height: 1fr; }
    #workers-title { height: 1; padding: 0 1; margin-top: 1; text-style: bold; }
    #workers { height: auto; max-height: 45%; }
    #filter { display: none; }
    #filter.shown { display: block; }
    """
    BINDINGS = [
        Binding("w", "sort('waiting')", "waiting"),
        Binding("t", "sort('tps')", "tps"),
        Binding("c", "sort('clients')", "clients"),
        Binding("s", "sort('servers')", "servers"),
        Binding("l", "sort('query')", "query time"),
        Binding("n", "sort('name')", "name"),
        Binding("f", "filter", "filter db"),
        Binding("p,space", "pause", "pause"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, admin: AdminConsole, interval: float = 1.0) -> None:
        super().__init__()
        self.admin = admin
        self.interval = interval
        self.sort = "waiting"
        self.pattern = ""
        self.paused = False
        self.error: str | None = None
        self.samples: tuple[Sample | None, Sample | None] = (None, None)  # (newest, before)
        self._polling = False

    def compose(self) -> ComposeResult:
        yield Static(id="summary")
        yield Input(placeholder="filter by database: part of the name or a pattern like "
                    "app_*; Enter applies, empty shows all, Esc cancels", id="filter")
        yield DataTable(id="pools", cursor_type="none", zebra_stripes=True)
        yield Static(id="workers-title")
        yield DataTable(id="workers", cursor_type="none", zebra_stripes=True)
        yield Footer()

    async def on_mount(self) -> None:
        self.draw()
        await self.poll()
        self.set_interval(self.interval, self.poll)

    async def on_unmount(self) -> None:
        await self.admin.close()

    async def poll(self) -> None:
        if self.paused or self._polling:
            return
        self._polling = True
        reconnecting = self.admin.conn is None  # maybe another service now: no rates across
        try:
            sample = await self.admin.sample()
        except psycopg.Error as exc:
            self.error = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        else:
            self.error = None
            self.samples = (sample, None if reconnecting else self.samples[0])
        finally:
            self._polling = False
        self.draw()

    # -- keys

    def action_sort(self, key: str) -> None:
        self.sort = key
        self.draw()

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.draw()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.add_class("shown")
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.pattern = event.value.strip()
        self._close_filter()

    def on_key(self, event: events.Key) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_class("shown"):
            self._close_filter()
            event.stop()

    def _close_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("shown")
        self.query_one("#pools", DataTable).focus()
        self.draw()

    # -- drawing

    def draw(self) -> None:
        new, old = self.samples
        view = compute(new, old, self.sort, self.pattern) if new is not None else None
        self.query_one("#summary", Static).update(self._summary(view))
        pools = self.query_one("#pools", DataTable)
        workers = self.query_one("#workers", DataTable)
        for table, columns, marked in ((pools, POOL_COLUMNS, _SORTED_COLUMN[self.sort][0]),
                                       (workers, WORKER_COLUMNS, _SORTED_COLUMN[self.sort][1])):
            table.clear(columns=True)
            table.add_columns(*(Text(name + (" ▼" if name == marked else ""),
                                     justify="left" if name in _TEXT_COLUMNS else "right")
                                for name in columns))
        title = self.query_one("#workers-title", Static)
        if view is None:
            title.update("")
            return
        for p in view.pools:
            pools.add_row(*pool_cells(p))
        t = view.totals
        label = "%d pool%s" % (t.pools, "" if t.pools == 1 else "s")
        pools.add_row(*_bold(pool_cells(PoolLine(
            "total", label, t.cl_active, t.cl_waiting, t.sv_active, t.sv_idle, t.maxwait,
            t.tps, t.qps, t.query_ms, t.wait_ms))))
        if view.workers is None:
            title.update("workers: none to show (SHOW WORKERS is pgherd's; this console is "
                         "%s)" % (self.admin.version or "not pgherd"))
            workers.display = False
            return
        workers.display = True
        title.update("workers")
        for w in view.workers:
            workers.add_row(*worker_cells(w))
        workers.add_row(*_bold(worker_total_cells(view.workers)))

    def _summary(self, view: View | None) -> Text:
        head = Text()
        head.append("pgherd top", style="bold")
        head.append("  %s  %s  every %gs  " % (
            self.admin.version or "connecting…", describe(self.admin.conninfo),
            self.interval))
        head.append(time.strftime("%H:%M:%S"))
        if self.paused:
            head.append("  PAUSED", style="bold reverse")
        head.append("\nsort: %s   filter: %s" % (self.sort, self.pattern or "all databases"))
        if self.error is not None:
            head.append("\n%s (retrying)" % self.error, style="bold red")
        if view is not None:
            t = view.totals
            head.append("\nclients %d active, " % t.cl_active)
            head.append("%d waiting" % t.cl_waiting,
                        style="bold red" if t.cl_waiting else "")
            head.append("   servers %d active, %d idle   %s tps   %s queries/s   "
                        "query %s ms   wait %s ms   max wait " % (
                            t.sv_active, t.sv_idle, _n(t.tps), _n(t.qps), _ms(t.query_ms),
                            _ms(t.wait_ms)))
            head.append(_wait(t.maxwait))
        return head


def check(conninfo: str) -> str:
    """Log in to the console once, before the screen is taken: its SHOW VERSION, or
    psycopg.Error saying why not."""
    with psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
        return conn.execute("SHOW VERSION").fetchone()[0]


def run(conninfo: str, interval: float = 1.0) -> None:
    """Run the view until the user quits."""
    Top(AdminConsole(conninfo), interval).run()
