"""The HTTP status page: ``GET /`` draws the service, ``GET /status.json`` is what it draws.

The page (:data:`PAGE`) is one self-contained HTML document — its style and script inline, no
external asset, so it works on a host without internet — that fetches ``/status.json`` every
second and redraws: tiles with clients and servers by state, throughput and wait; small SVG
charts of the last minutes; a table of pools (waiting most first) and one of workers. It only
reads: the endpoint answers GET and HEAD like ``/metrics``, on the same listener and behind
the same rules, and the page's Content-Security-Policy allows nothing but its own inline code
(by hash) and fetches from the same origin.

``/status.json`` is exact for the moment it is asked, like ``/metrics`` and the admin
console: it first has every worker publish (``exchange.publish_all()``), then reads shared
memory — so its pools agree with ``SHOW POOLS`` at the same moment. It carries cumulative
counters (per pool and per worker), not rates: the page works out the rates between two
fetches (a request may land on any worker, and none of them keeps per-request state).

History comes from the ring the master fills in shared memory (``prefork/history.py``): every
worker reads the same samples, so every answer has the same last minutes. This module turns
consecutive samples into rates per second and averages per event.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import msgspec

from ipc import shm
from prefork.history import INTERVAL

from . import procstat

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("pgherd")

PATHS = ("/", "/status.json")
VERSION = version("pgherd")

_POOL_GAUGES = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested",
                "sv_login", "sv_being_canceled")
#: Counters per pool the page turns into rates between two fetches.
_POOL_COUNTERS = ("xact_count", "query_count", "query_time", "wait_time",
                  "server_assignment_count")


def respond(worker: Worker, path: str) -> tuple[int, str, bytes, dict[str, str]]:
    """(status, content type, body, extra headers) of ``GET path`` for a path in PATHS."""
    if path == "/":
        return 200, "text/html; charset=utf-8", PAGE, _PAGE_HEADERS
    try:
        body = msgspec.json.encode(status(worker))
    except Exception:
        log.exception("rendering /status.json failed")
        return 500, "text/plain; charset=utf-8", b"internal error, see the log\n", {}
    return 200, "application/json", body, {}


def status(worker: Worker) -> dict[str, Any]:
    """The whole service now, and its last minutes: what ``/status.json`` answers."""
    worker.exchange.publish_all()
    seg = worker.segment
    now_ns = time.monotonic_ns()
    pools = []
    for r in seg.snapshot_rows():
        if r.kind != shm.POOL:
            continue
        t = r.totals
        pool: dict[str, Any] = {"database": r.names[0], "user": r.names[1]}
        pool.update((name, t[name]) for name in _POOL_GAUGES + _POOL_COUNTERS)
        pool["maxwait"] = round(r.wait_ns(now_ns) / 1e9, 3)
        pools.append(pool)
    pools.sort(key=lambda p: (-p["cl_waiting"], -p["maxwait"], p["database"], p["user"]))
    workers = []
    for w in seg.read_all(worker.settings.workers):
        use = procstat.usage(w.pid) if w.pid else None
        sent, received = seg.handovers(w.slot)
        workers.append({
            "slot": w.slot, "pid": w.pid or None,
            "state": ("paused" if w.paused else shm.STATE_NAMES.get(w.state, "?"))
            if w.pid else "down",
            "clients": w.clients, "servers": w.servers, "waiting": w.waiting,
            "rss": use.rss if use else None,
            "cpu_seconds": round(use.cpu_seconds, 3) if use else None,
            "servers_sent": sent, "servers_received": received, "restarts": w.restarts})
    return {
        "version": VERSION,
        "at": now_ns / 1e9,  # monotonic seconds: the clock of the history's samples too
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "paused": bool(worker.state.paused),
        "workers_configured": worker.settings.workers,
        "clients": {k[3:]: sum(p[k] for p in pools) for k in _POOL_GAUGES if k[:3] == "cl_"},
        "servers": {k[3:]: sum(p[k] for p in pools) for k in _POOL_GAUGES if k[:3] == "sv_"},
        "pools": pools,
        "workers": workers,
        "history": history(seg.history(), now_ns),
        "history_interval": INTERVAL,
    }


def history(samples: list[dict[str, int]], now_ns: int) -> dict[str, list[float]]:
    """Chart series from consecutive ring samples, oldest first.

    ``t`` is seconds before ``now_ns``; ``tps``/``qps`` are per second over the interval
    ending at the point; ``query_ms`` is time per query, ``wait_ms`` wait per server
    assignment over that interval (0 when there was none); the rest are the gauges at the
    point, ``maxwait`` in seconds. A counter going backwards gives 0, not a negative rate."""
    series: dict[str, list[float]] = {k: [] for k in (
        "t", "tps", "qps", "query_ms", "wait_ms", "cl_active", "cl_waiting", "sv_active",
        "sv_idle", "maxwait")}
    for a, b in zip(samples, samples[1:]):
        seconds = (b["at_ns"] - a["at_ns"]) / 1e9
        if seconds <= 0:
            continue

        def delta(name: str) -> int:
            return max(0, b[name] - a[name])

        def per(name: str, count: str) -> float:
            n = delta(count)
            return round(delta(name) / n / 1000, 3) if n else 0.0

        series["t"].append(round((b["at_ns"] - now_ns) / 1e9, 2))
        series["tps"].append(round(delta("xact_count") / seconds, 1))
        series["qps"].append(round(delta("query_count") / seconds, 1))
        series["query_ms"].append(per("query_time", "query_count"))
        series["wait_ms"].append(per("wait_time", "server_assignment_count"))
        series["cl_active"].append(b["cl_active"])
        series["cl_waiting"].append(b["cl_waiting"])
        series["sv_active"].append(b["sv_active"])
        series["sv_idle"].append(b["sv_idle"] + b["sv_used"])
        series["maxwait"].append(round(b["maxwait_ns"] / 1e9, 3))
    return series


# --------------------------------------------------------------------------- the page

_STYLE = """
:root { --fg:#1d2430; --dim:#6b7686; --line:#e3e7ee; --bg:#f6f8fb; --card:#fff;
  --active:#2f6fde; --waiting:#d9412b; --idle:#2e9d5b; --other:#8a5cc7; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
  color:var(--fg); background:var(--bg); }
header { display:flex; align-items:baseline; gap:1em; padding:.8em 1.2em; background:#1d2430;
  color:#fff; }
header h1 { font-size:18px; margin:0; }
header .meta { color:#b8c2d3; font-size:13px; }
header #state { margin-left:auto; font-size:13px; }
main { padding:1em 1.2em; }
.tiles { display:grid; grid-template-columns:repeat(auto-fit, minmax(150px, 1fr)); gap:.7em; }
.tile { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:.5em .8em; }
.tile .k { color:var(--dim); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.tile .v { font-size:22px; font-variant-numeric:tabular-nums; }
.tile .s { color:var(--dim); font-size:12px; }
.charts { display:grid; grid-template-columns:repeat(auto-fit, minmax(280px, 1fr)); gap:.7em;
  margin-top:.9em; }
.chart { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:.5em .7em; }
.chart h2 { font-size:13px; margin:0 0 .2em; font-weight:600; }
.chart .legend span { margin-right:.9em; font-size:12px; font-variant-numeric:tabular-nums; }
.chart svg { width:100%; height:auto; display:block; }
.chart svg text { font-size:9px; fill:var(--dim); }
h2.section { font-size:15px; margin:1.2em 0 .4em; }
table { border-collapse:collapse; width:100%; background:var(--card); border:1px solid var(--line); }
th, td { padding:.3em .6em; text-align:right; border-bottom:1px solid var(--line);
  font-variant-numeric:tabular-nums; white-space:nowrap; }
th { color:var(--dim); font-weight:600; font-size:12px; background:#fafbfd; }
th.l, td.l { text-align:left; }
tr.waiting td.cl_waiting, tr.waiting td.maxwait { color:var(--waiting); font-weight:600; }
tfoot td { font-weight:600; background:#fafbfd; }
#error { display:none; margin:0 0 .8em; padding:.5em .8em; background:#fde8e4; color:#8a1c0c;
  border:1px solid #f3b6aa; border-radius:6px; }
.c-active { color:var(--active); } .c-waiting { color:var(--waiting); }
.c-idle { color:var(--idle); } .c-other { color:var(--other); }
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = {active: "#2f6fde", waiting: "#d9412b", idle: "#2e9d5b", other: "#8a5cc7"};
let prev = null;      // the previous answer, for rates between two fetches
let fetches = 0;

function num(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "\\u2013";
  return v.toLocaleString("en-US", {maximumFractionDigits: digits || 0,
                                    minimumFractionDigits: digits || 0});
}
function ms(v) { return v === null ? "\\u2013" : num(v, v < 10 ? 2 : 1) + " ms"; }
function secs(v) { return num(v, v < 10 ? 1 : 0) + " s"; }
function mib(v) { return v === null ? "\\u2013" : num(v / 1048576, 1) + " MiB"; }
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Rates of counters between two answers: per second, and time per event in ms.
function rates(cur, old, seconds) {
  if (!old || seconds <= 0) return {tps: null, qps: null, query_ms: null, wait_ms: null};
  const d = (k) => Math.max(0, cur[k] - old[k]);
  const per = (t, n) => d(n) ? d(t) / d(n) / 1000 : 0;
  return {tps: d("xact_count") / seconds, qps: d("query_count") / seconds,
          query_ms: per("query_time", "query_count"),
          wait_ms: per("wait_time", "server_assignment_count")};
}
function sumCounters(pools) {
  const s = {xact_count: 0, query_count: 0, query_time: 0, wait_time: 0,
             server_assignment_count: 0};
  for (const p of pools) for (const k of Object.keys(s)) s[k] += p[k];
  return s;
}

function tiles(data, total) {
  const c = data.clients, s = data.servers;
  $("t-clients").textContent = num(c.active + c.waiting);
  $("t-clients-s").textContent = num(c.active) + " active \\u00b7 " + num(c.waiting) + " waiting";
  $("t-servers").textContent = num(s.active + s.idle + s.used + s.tested + s.login
                                   + s.being_canceled);
  $("t-servers-s").textContent = num(s.active) + " active \\u00b7 " + num(s.idle + s.used) +
    " idle \\u00b7 " + num(s.tested) + " tested \\u00b7 " + num(s.login) + " login \\u00b7 " +
    num(s.being_canceled) + " canceling";
  $("t-tps").textContent = num(total.tps);
  $("t-tps-s").textContent = num(total.qps) + " queries/s";
  $("t-query").textContent = ms(total.query_ms);
  $("t-wait").textContent = ms(total.wait_ms);
  const maxwait = Math.max(0, ...data.pools.map((p) => p.maxwait));
  $("t-maxwait").textContent = secs(maxwait);
}

function cells(tr, values) {
  for (const [key, text, cls] of values) tr.append(el("td", {"data-k": key, class: cls || key}, text));
}

function pools(data, seconds) {
  const old = new Map((prev ? prev.pools : []).map((p) => [p.database + "/" + p.user, p]));
  const body = el("tbody");
  for (const p of data.pools) {
    const key = p.database + "/" + p.user;
    const r = rates(p, old.get(key), seconds);
    const tr = el("tr", {"data-pool": key});
    if (p.cl_waiting) tr.className = "waiting";
    cells(tr, [["database", p.database, "l"], ["user", p.user, "l"],
      ["cl_active", num(p.cl_active)], ["cl_waiting", num(p.cl_waiting)],
      ["sv_active", num(p.sv_active)], ["sv_idle", num(p.sv_idle)], ["sv_used", num(p.sv_used)],
      ["sv_tested", num(p.sv_tested)], ["sv_login", num(p.sv_login)],
      ["maxwait", secs(p.maxwait)], ["tps", num(r.tps)], ["qps", num(r.qps)],
      ["query_ms", ms(r.query_ms)], ["wait_ms", ms(r.wait_ms)]]);
    body.append(tr);
  }
  $("pools").replaceChild(body, $("pools").tBodies[0]);
  const sum = (k) => data.pools.reduce((a, p) => a + p[k], 0);
  const foot = el("tr");
  const total = rates(sumCounters(data.pools), prev && sumCounters(prev.pools), seconds);
  cells(foot, [["database", data.pools.length + " pools", "l"], ["user", "", "l"],
    ["cl_active", num(sum("cl_active"))], ["cl_waiting", num(sum("cl_waiting"))],
    ["sv_active", num(sum("sv_active"))], ["sv_idle", num(sum("sv_idle"))],
    ["sv_used", num(sum("sv_used"))], ["sv_tested", num(sum("sv_tested"))],
    ["sv_login", num(sum("sv_login"))],
    ["maxwait", secs(Math.max(0, ...data.pools.map((p) => p.maxwait)))],
    ["tps", num(total.tps)], ["qps", num(total.qps)], ["query_ms", ms(total.query_ms)],
    ["wait_ms", ms(total.wait_ms)]]);
  $("pools").tFoot.replaceChildren(foot);
  return total;
}

function workers(data, seconds) {
  const old = new Map((prev ? prev.workers : []).map((w) => [w.pid, w]));
  const body = el("tbody");
  for (const w of data.workers) {
    const o = old.get(w.pid);
    const cpu = o && w.cpu_seconds !== null && o.cpu_seconds !== null && seconds > 0
      ? 100 * (w.cpu_seconds - o.cpu_seconds) / seconds : null;
    const tr = el("tr", {"data-worker": String(w.slot)});
    cells(tr, [["slot", String(w.slot)], ["pid", w.pid === null ? "\\u2013" : String(w.pid)],
      ["state", w.state, "l"], ["clients", num(w.clients)], ["servers", num(w.servers)],
      ["waiting", num(w.waiting)], ["cpu", cpu === null ? "\\u2013" : num(cpu, 1) + " %"],
      ["rss", mib(w.rss)], ["servers_sent", num(w.servers_sent)],
      ["servers_received", num(w.servers_received)], ["restarts", num(w.restarts)]]);
    body.append(tr);
  }
  $("workers").replaceChild(body, $("workers").tBodies[0]);
}

// A small line chart of the last minutes: series share the y axis, 0 at the bottom.
function chart(id, h, lines, unit) {
  const W = 320, H = 110, L = 34, R = 6, T = 6, B = 16;
  const svg = $(id);
  svg.replaceChildren();
  const span = Math.max(60, data_span(h));
  let top = 0;
  for (const [key] of lines) for (const v of h[key]) top = Math.max(top, v);
  top = nice(top);
  const x = (t) => L + (W - L - R) * (1 + t / span);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  for (const frac of [0, 0.5, 1]) {
    const gy = y(top * frac);
    const g = document.createElementNS(SVGNS, "line");
    for (const [k, v] of [["x1", L], ["x2", W - R], ["y1", gy], ["y2", gy]]) g.setAttribute(k, v);
    g.setAttribute("stroke", "#e3e7ee");
    svg.append(g);
    const label = document.createElementNS(SVGNS, "text");
    label.setAttribute("x", L - 4); label.setAttribute("y", gy + 3);
    label.setAttribute("text-anchor", "end");
    label.textContent = short(top * frac) + (frac === 1 ? unit : "");
    svg.append(label);
  }
  for (const [t, anchor, text] of [[-span, "start", ago(span)], [0, "end", "now"]]) {
    const label = document.createElementNS(SVGNS, "text");
    label.setAttribute("x", x(t)); label.setAttribute("y", H - 3);
    label.setAttribute("text-anchor", anchor);
    label.textContent = text;
    svg.append(label);
  }
  const legend = $(id + "-legend");
  legend.replaceChildren();
  for (const [key, name, color] of lines) {
    const pts = h.t.map((t, i) => x(t).toFixed(1) + "," + y(h[key][i]).toFixed(1));
    const line = document.createElementNS(SVGNS, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", color);
    line.setAttribute("stroke-width", "1.6");
    line.setAttribute("data-series", key);
    line.setAttribute("data-points", String(pts.length));
    svg.append(line);
    const last = h[key].length ? h[key][h[key].length - 1] : null;
    const item = el("span", {}, name + " " + (last === null ? "\\u2013" : short(last) + unit));
    item.style.color = color;
    legend.append(item);
  }
}
function data_span(h) { return h.t.length ? -h.t[0] : 0; }
function nice(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}
function short(v) {
  if (v >= 1e6) return num(v / 1e6, 1) + "M";
  if (v >= 1e4) return num(v / 1e3, 0) + "k";
  if (v >= 1000) return num(v / 1e3, 1) + "k";
  return num(v, v < 10 && v % 1 ? 1 : 0);
}
function ago(s) { return s >= 120 ? Math.round(s / 60) + " min ago" : Math.round(s) + " s ago"; }

function draw(data) {
  const seconds = prev ? data.at - prev.at : 0;
  const total = pools(data, seconds);
  workers(data, seconds);
  const h = data.history;
  if (total.tps === null && h.t.length) {  // first answer: the last interval of the history
    const i = h.t.length - 1;
    Object.assign(total, {tps: h.tps[i], qps: h.qps[i], query_ms: h.query_ms[i],
                          wait_ms: h.wait_ms[i]});
  }
  tiles(data, total);
  chart("c-tps", h, [["tps", "transactions/s", COLORS.active], ["qps", "queries/s", COLORS.other]], "");
  chart("c-clients", h, [["cl_active", "active", COLORS.active], ["cl_waiting", "waiting", COLORS.waiting]], "");
  chart("c-servers", h, [["sv_active", "active", COLORS.active], ["sv_idle", "idle", COLORS.idle]], "");
  chart("c-wait", h, [["wait_ms", "avg wait", COLORS.waiting], ["query_ms", "avg query", COLORS.active]], " ms");
  const live = data.workers.filter((w) => w.state !== "down").length;
  $("version").textContent = "pgherd " + data.version;
  $("state").textContent = (data.paused ? "PAUSED \\u00b7 " : "") + live + "/" +
    data.workers_configured + " workers \\u00b7 " + data.time;
  prev = data;
  fetches += 1;
  document.body.dataset.fetches = String(fetches);
}

async function refresh() {
  try {
    const r = await fetch("status.json", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    draw(await r.json());
    $("error").style.display = "none";
  } catch (e) {
    $("error").textContent = "cannot read status.json: " + e.message + " (retrying)";
    $("error").style.display = "block";
  }
  setTimeout(refresh, 1000);
}
refresh();
"""

_BODY = """
<header><h1>pgherd</h1><span class="meta" id="version"></span><span id="state"></span></header>
<main>
<div id="error"></div>
<div class="tiles">
  <div class="tile"><div class="k">Clients</div><div class="v" id="t-clients">&ndash;</div><div class="s" id="t-clients-s"></div></div>
  <div class="tile"><div class="k">Servers</div><div class="v" id="t-servers">&ndash;</div><div class="s" id="t-servers-s"></div></div>
  <div class="tile"><div class="k">Transactions/s</div><div class="v" id="t-tps">&ndash;</div><div class="s" id="t-tps-s"></div></div>
  <div class="tile"><div class="k">Avg query</div><div class="v" id="t-query">&ndash;</div><div class="s">per query, last interval</div></div>
  <div class="tile"><div class="k">Avg wait</div><div class="v" id="t-wait">&ndash;</div><div class="s">per server assignment</div></div>
  <div class="tile"><div class="k">Max wait</div><div class="v" id="t-maxwait">&ndash;</div><div class="s">oldest waiting client</div></div>
</div>
<div class="charts">
  <div class="chart"><h2>Throughput</h2><div class="legend" id="c-tps-legend"></div><svg id="c-tps" viewBox="0 0 320 110"></svg></div>
  <div class="chart"><h2>Clients</h2><div class="legend" id="c-clients-legend"></div><svg id="c-clients" viewBox="0 0 320 110"></svg></div>
  <div class="chart"><h2>Servers</h2><div class="legend" id="c-servers-legend"></div><svg id="c-servers" viewBox="0 0 320 110"></svg></div>
  <div class="chart"><h2>Wait and query time</h2><div class="legend" id="c-wait-legend"></div><svg id="c-wait" viewBox="0 0 320 110"></svg></div>
</div>
<h2 class="section">Pools <span class="meta">(waiting most first)</span></h2>
<table id="pools"><thead><tr><th class="l">database</th><th class="l">user</th>
<th>cl_active</th><th>cl_waiting</th><th>sv_active</th><th>sv_idle</th><th>sv_used</th>
<th>sv_tested</th><th>sv_login</th><th>maxwait</th><th>tps</th><th>queries/s</th>
<th>avg query</th><th>avg wait</th></tr></thead><tbody></tbody><tfoot></tfoot></table>
<h2 class="section">Workers</h2>
<table id="workers"><thead><tr><th>slot</th><th>pid</th><th class="l">state</th>
<th>clients</th><th>servers</th><th>waiting</th><th>CPU</th><th>memory</th>
<th>servers sent</th><th>servers received</th><th>restarts</th></tr></thead><tbody></tbody></table>
</main>
"""


def _sha256(text: str) -> str:
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


PAGE = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<title>pgherd status</title><link rel=\"icon\" href=\"data:,\">"
        "<style>%s</style></head><body>%s<script>%s</script></body></html>\n"
        % (_STYLE, re.sub(r"\n\s*", "\n", _BODY), _SCRIPT)).encode()
#: Nothing runs or loads but this page's own inline style and script, and its fetches.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src %s; script-src %s; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'" % (_sha256(_STYLE), _sha256(_SCRIPT)),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
