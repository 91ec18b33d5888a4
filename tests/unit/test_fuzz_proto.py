"""The sans-IO protocol code under seeded random input (tests/fuzzing.py's generator, plus
plain noise): startup packets, SASL exchanges and every frontend message type, with lengths
0, negative, huge and truncated, cut into chunks anywhere. Whatever comes in, the only
exception out is the module's own (ProtocolError, AuthFailed; ValueError for ``options``,
which is its documented refusal) -- anything else would be a bug that costs a connection."""

from __future__ import annotations

import random

import pytest

from tests.fuzzing import Generator
from workers import auth, proto
from workers.auth import AuthFailed
from workers.proto import BackendScanner, FrontendScanner, MessageReader, ProtocolError
from workers.varcache import parse_options

CASES = 3000
SEEDS = (1, 2, 3)


def _chunks(rnd: random.Random, data: bytes) -> list[bytes]:
    out = []
    while data:
        cut = rnd.randrange(1, len(data) + 1)
        out.append(data[:cut])
        data = data[cut:]
    return out


def _inputs(seed: int):
    """Byte streams: generated cases (login phase and post-login), and noise."""
    gen = Generator(seed)
    rnd = random.Random(seed)
    for case in gen.cases(CASES):
        yield b"".join(case.chunks)
        if rnd.random() < 0.1:
            yield rnd.randbytes(rnd.randrange(300))


@pytest.mark.parametrize("seed", SEEDS)
def test_frontend_scanner_and_reader_raise_only_protocol_errors(seed):
    rnd = random.Random(seed)
    for data in _inputs(seed):
        fs = FrontendScanner(max_size=1 << 20, watch_named=rnd.random() < 0.5)
        reader = MessageReader(max_size=1 << 16)
        startup = MessageReader(startup=True)
        try:
            for chunk in _chunks(rnd, data):
                buf = bytearray(chunk)
                fs.feed(buf, len(buf))
        except ProtocolError:
            pass
        for r in (reader, startup):
            try:
                for chunk in _chunks(rnd, data):
                    r.feed(chunk)
                    for mtype, body in r:
                        if r is startup and mtype == 0:
                            proto.parse_startup(body)
            except ProtocolError:
                pass


@pytest.mark.parametrize("seed", SEEDS)
def test_backend_scanner_raises_only_protocol_errors(seed):
    rnd = random.Random(seed)
    for data in _inputs(seed):  # frontend bytes are as good as any noise here
        bs = BackendScanner()
        bs.watch_discard(rnd.random() < 0.5)
        bs.count_replies(rnd.random() < 0.5)
        try:
            for chunk in _chunks(rnd, data):
                buf = bytearray(chunk)
                bs.feed(buf, len(buf))
        except ProtocolError:
            pass


@pytest.mark.parametrize("seed", SEEDS)
def test_scram_and_password_checks_refuse_only_with_auth_failed(seed):
    rnd = random.Random(seed)
    secret = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$" + "A" * 43 + "=:" + "B" * 43 + "="
    good_first = b"n,,n=,r=abcdefghijklmnop"
    for i in range(CASES // 3):
        server = auth.ScramServer("u", rnd.choice((secret, "plain", None, "md5" + "0" * 32)))
        noise = rnd.randbytes(rnd.randrange(80))
        mutated = bytearray(good_first)
        for _ in range(rnd.randrange(4)):
            mutated[rnd.randrange(len(mutated))] = rnd.randrange(256)
        try:
            server.handle_client_first(rnd.choice((noise, bytes(mutated), good_first)))
            final = b"c=biws,r=abcdefghijklmnop" + rnd.randbytes(rnd.randrange(40))
            server.handle_client_final(rnd.choice((final, noise, b"c=biws,r=x,p=" + noise)))
        except AuthFailed:
            pass
        try:
            auth.md5_verify("md5" + "0" * 32, "u", rnd.randbytes(4), noise)
            auth.parse_scram_secret(noise.decode("latin-1"))
        except AuthFailed:
            pass


@pytest.mark.parametrize("seed", SEEDS)
def test_startup_options_are_parsed_or_refused(seed):
    rnd = random.Random(seed)
    alphabet = "-c =\\ab_.x'\"\t"
    for _ in range(CASES):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(24)))
        try:
            for name, _value in parse_options(text):
                assert name
        except ValueError:
            pass
