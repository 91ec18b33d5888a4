"""Seeded random PostgreSQL frontend input: valid, malformed, truncated and oversized.

One generator serves three users: the sans-IO fuzz test (``tests/unit/test_fuzz_proto.py``),
the live fuzz run against pgherd (``tests/integration/test_fuzz.py``, 5,000 cases in CI) and
``make fuzz`` (``python -m tests.fuzzing``, 100,000+ cases against a throwaway PostgreSQL and
pgherd of its own). A case is a list of chunks of
bytes; the same seed always gives the same cases, so a failure is replayed by its seed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import sys
import time
from dataclasses import dataclass, field

from tests import wire

_LENGTHS = (0, 1, 3, 4, 5, 7, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000000)
_FRONTEND_TYPES = b"QPBDECSHFXdcfp"
_STATEMENT_NAMES = ("", "s1", "s2", "a_long_statement_name_" + "x" * 40)
_QUERIES = ("SELECT 1", "SELECT pg_sleep(0.05)", "BEGIN", "COMMIT", "ROLLBACK",
            "SELECT 1/0", "COPY (SELECT 1) TO STDOUT", "CREATE TEMP TABLE t(x int)",
            "COPY pg_temp.t FROM STDIN", "SET application_name = 'fuzz'", "",
            "SELECT repeat('x', 100000)", "SELECT generate_series(1, 5000)")


def _u32(n: int) -> bytes:
    return struct.pack("!I", n & 0xFFFFFFFF)


@dataclass
class Case:
    """What one fuzz connection does: send ``chunks`` after login (``login`` False: the
    chunks are the whole conversation, startup phase included), then read or vanish."""

    seed: int
    login: bool
    chunks: list[bytes] = field(default_factory=list)
    vanish: bool = False  # close without reading the answer


class Generator:
    """Random cases from one seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rnd = random.Random(seed)

    # -- single messages ---------------------------------------------------------------

    def valid_message(self) -> bytes:
        r = self.rnd
        kind = r.randrange(12)
        name = r.choice(_STATEMENT_NAMES)
        if kind == 0:
            return wire.query(r.choice(_QUERIES))
        if kind == 1:
            return wire.parse(r.choice(_QUERIES[:2] + ("SELECT $1::int",)), name)
        if kind == 2:
            return wire.bind([b"1"] if r.random() < 0.5 else [], name)
        if kind == 3:
            return wire.describe_statement(name)
        if kind == 4:
            return wire.execute("", r.choice((0, 1)))
        if kind == 5:
            return wire.message(b"S")
        if kind == 6:
            return wire.message(b"H")
        if kind == 7:
            return wire.message(b"C", b"S" + name.encode() + b"\x00")
        if kind == 8:
            return wire.message(b"d", r.randbytes(r.randrange(64)))
        if kind == 9:
            return wire.message(r.choice((b"c", b"f")), b"fuzz\x00")
        if kind == 10:
            return wire.function_call(r.choice((0, 1, 1598)), [b"1"])
        return wire.message(b"X") if r.random() < 0.2 else wire.message(b"S")

    def malformed_message(self) -> bytes:
        r = self.rnd
        kind = r.randrange(8)
        mtype = bytes([r.choice(_FRONTEND_TYPES) if r.random() < 0.7 else r.randrange(256)])
        if kind == 0:  # a length field from the list of troublemakers, no body to match
            return mtype + _u32(r.choice(_LENGTHS)) + r.randbytes(r.randrange(16))
        if kind == 1:  # declared length and body disagree
            body = r.randbytes(r.randrange(64))
            return mtype + _u32(len(body) + 4 + r.choice((-3, -1, 1, 7, 1000))) + body
        if kind == 2:  # a valid message cut short (the rest never comes)
            msg = self.valid_message()
            return msg[: r.randrange(1, max(len(msg), 2))]
        if kind == 3:  # well framed, body of random bytes
            body = r.randbytes(r.randrange(200))
            return mtype + _u32(len(body) + 4) + body
        if kind == 4:  # Parse/Bind with absurd counts or missing terminators
            if r.random() < 0.5:
                body = b"s1\x00SELECT $1\x00" + struct.pack("!H", 0xFFFF)
                return wire.message(b"P", body)
            body = b"\x00s1\x00" + struct.pack("!HH", 1, 0) + struct.pack("!Hi", 1, 0x7FFFFFFF)
            return wire.message(b"B", body)
        if kind == 5:  # a named Parse whose name is not terminated
            return wire.message(b"P", b"s" * r.randrange(1, 80))
        if kind == 6:  # an announced huge message with some of its body
            return mtype + _u32(r.choice((1 << 20, 1 << 26, 0x7FFFFFF0))) + r.randbytes(
                r.randrange(1, 4096))
        return r.randbytes(r.randrange(1, 40))  # plain noise

    # -- startup phase -------------------------------------------------------------------

    def startup_phase(self) -> list[bytes]:
        r = self.rnd
        kind = r.randrange(9)
        if kind == 0:
            return [_u32(r.choice(_LENGTHS)) + r.randbytes(r.randrange(32))]
        if kind == 1:  # startup packet with garbage parameters
            body = _u32(196608) + r.randbytes(r.randrange(200))
            return [_u32(len(body) + 4) + body]
        if kind == 2:  # SSLRequest, then anything
            return [wire.untyped(80877103), self.valid_message() + self.malformed_message()]
        if kind == 3:  # cancel requests, well and badly formed
            return [wire.untyped(80877102, r.randbytes(r.choice((8, 8, 3, 20))))]
        if kind == 4:  # protocol versions pgherd does not speak
            return [wire.startup({"user": "postgres", "database": "p0"},
                                 r.choice((0x20000, 0x30001, 0x40000, 1234)))]
        if kind == 5:  # a startup packet cut short
            msg = wire.startup({"user": "postgres", "database": "p0", "x": "y" * 50})
            return [msg[: r.randrange(1, len(msg))]]
        if kind == 6:  # a password/SASL message before any was asked for
            return [wire.startup({"user": "u_scram", "database": "p0"}),
                    wire.message(b"p", r.randbytes(r.randrange(100)))]
        if kind == 7:  # SASL exchange with broken messages
            return [wire.startup({"user": "u_scram", "database": "p0"}),
                    wire.message(b"p", b"SCRAM-SHA-256\x00" + _u32(r.choice((0, 5, 0xFFFFFFFF)))
                                 + r.randbytes(r.randrange(50))),
                    self.malformed_message()]
        return [wire.startup({"user": r.choice(("postgres", "nobody", "")),
                              "database": r.choice(("p0", "nodb", "pgbouncer"))})]

    # -- cases ---------------------------------------------------------------------------

    def case(self) -> Case:
        r = self.rnd
        seed = r.getrandbits(32)
        sub = Generator(seed)
        if r.random() < 0.2:
            return Case(seed, login=False, chunks=sub.startup_phase(), vanish=r.random() < 0.3)
        messages = []
        for _ in range(r.randrange(1, 8)):
            messages.append(sub.valid_message() if sub.rnd.random() < 0.6
                            else sub.malformed_message())
        data = b"".join(messages)
        chunks = []
        while data:  # split anywhere: message boundaries and chunks need not agree
            cut = sub.rnd.randrange(1, len(data) + 1)
            chunks.append(data[:cut])
            data = data[cut:]
        return Case(seed, login=True, chunks=chunks, vanish=sub.rnd.random() < 0.3)

    def cases(self, n: int):
        for _ in range(n):
            yield self.case()


# --------------------------------------------------------------------------- live runner


@dataclass
class Outcome:
    cases: int = 0
    login_failures: int = 0  # a login that should have worked did not (the oracle decides)
    timeouts: int = 0  # pgherd still sending at the deadline (a case that never ends)
    seeds_timed_out: list[int] = field(default_factory=list)


async def _run_case(host: str, port: int, case: Case, deadline: float, out: Outcome,
                    database: str = "p0", user: str = "postgres") -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), deadline)
    except (OSError, asyncio.TimeoutError):
        out.login_failures += 1
        return
    try:
        if case.login:
            writer.write(wire.startup({"user": user, "database": database}))
            buf = b""
            while b"Z\x00\x00\x00\x05" not in buf:
                data = await asyncio.wait_for(reader.read(65536), deadline)
                if not data:
                    out.login_failures += 1
                    return
                buf += data
        for chunk in case.chunks:
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), deadline)
            except (OSError, asyncio.TimeoutError):
                return
        if case.vanish:
            return
        # Read until pgherd closes, or until it goes quiet (it waits for the rest of a
        # message we will never send, or the conversation is simply over).
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.3)
            except asyncio.TimeoutError:
                return
            if not data:
                return
        out.timeouts += 1  # still talking at the deadline
        out.seeds_timed_out.append(case.seed)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()
        out.cases += 1


async def run_live(host: str, port: int, seed: int, n: int, concurrency: int = 24,
                   deadline: float = 5.0) -> Outcome:
    """Play ``n`` cases of ``seed`` against a pooler, ``concurrency`` connections at once."""
    out = Outcome()
    gen = Generator(seed)
    queue = iter(gen.cases(n))

    async def lane() -> None:
        for case in queue:
            await _run_case(host, port, case, deadline, out)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return out


#: pgherd as the live fuzz runs meet it: transaction mode, a small pool (so clients wait and
#: servers move between clients and workers), short timeouts (so stuck cases end).
SETTINGS = {"pool_mode": "transaction", "default_pool_size": 2, "query_wait_timeout": 5,
            "client_login_timeout": 5, "max_prepared_statements": 10}
WARM_UP = 500  # cases played before the memory baseline is taken


@dataclass
class Report:
    """What a live fuzz run did to the service."""

    outcome: Outcome
    seconds: float
    pids_before: list[int]
    pids_after: list[int]
    rss_warm: dict[int, int]  # per worker, after the warm-up
    rss_after: dict[int, int]
    bystander_queries: int
    bystander_errors: list[str]

    def rss_growth(self) -> float:
        """The largest relative growth of a worker's RSS since the warm-up."""
        return max((self.rss_after.get(p, 0) - r) / r for p, r in self.rss_warm.items())

    def lines(self) -> list[str]:
        return ["%d cases in %.0f s (%d logins refused, %d timed out)" % (
                    self.outcome.cases, self.seconds, self.outcome.login_failures,
                    self.outcome.timeouts),
                "worker pids before %s, after %s" % (self.pids_before, self.pids_after),
                "worker RSS after warm-up %s MiB, after %s MiB (largest growth %+.1f %%)" % (
                    [r >> 20 for r in self.rss_warm.values()],
                    [r >> 20 for r in self.rss_after.values()], 100 * self.rss_growth()),
                "bystander: %d queries, %d errors %s" % (
                    self.bystander_queries, len(self.bystander_errors),
                    self.bystander_errors[:3])]


def fuzz_service(pooler, seed: int, n: int, concurrency: int = 24) -> Report:
    """Play ``n`` cases against a running ``tests.helpers.Pgherd`` while a bystander client
    runs queries on its own connection, and report what the service went through."""
    import threading

    import psutil
    import psycopg

    def rss() -> dict[int, int]:
        return {p: psutil.Process(p).memory_info().rss for p in pooler.worker_pids()}

    asyncio.run(run_live(pooler.host, pooler.port, seed + 1, WARM_UP, concurrency))
    pids = pooler.worker_pids()
    warm = rss()
    stop = threading.Event()
    queries = [0]
    errors: list[str] = []

    def bystander() -> None:  # in a pool of its own: the fuzz cases fill theirs on purpose
        try:
            with pooler.connect("p1", prepare_threshold=None, connect_timeout=10) as conn:
                while not stop.is_set():
                    if conn.execute("SELECT 41 + 1").fetchone() != (42,):
                        errors.append("wrong answer")
                    queries[0] += 1
        except psycopg.Error as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=bystander, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        outcome = asyncio.run(run_live(pooler.host, pooler.port, seed, n, concurrency))
    finally:
        stop.set()
        thread.join(30)
    return Report(outcome, time.monotonic() - started, pids, pooler.worker_pids(), warm, rss(),
                  queries[0], errors)


def main(argv: list[str] | None = None) -> int:
    """``make fuzz``: a throwaway PostgreSQL and pgherd (2 workers), ``--cases`` cases; exit 1
    if a worker died, the bystander failed, memory grew more than 10 % or a bug was logged."""
    import tempfile
    from pathlib import Path

    from tests.helpers import PgCluster, Pgherd

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    pg = PgCluster().start()
    try:
        pooler = Pgherd(pg, Path(tempfile.mkdtemp(prefix="pgherd-fuzz-")), settings=SETTINGS,
                        workers=args.workers)
        pooler.start()
        try:
            report = fuzz_service(pooler, args.seed, args.cases, args.concurrency)
            log = pooler.log()
        finally:
            pooler.shutdown()
    finally:
        pg.stop()
    bugs = log.count("Traceback") + log.count("internal error")
    print("\n".join(report.lines() + ["bugs logged: %d" % bugs]))
    ok = (report.pids_before == report.pids_after and not report.bystander_errors
          and report.rss_growth() <= 0.10 and not bugs)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
