"""The sans-IO protocol module: framing, builders, and the relay's stream scanners."""

import random
import struct

import pytest

from workers import proto
from workers.proto import BackendScanner, FrontendScanner, MessageReader, ProtocolError


def msg(t: bytes, body: bytes = b"") -> bytes:
    return proto.message(t, body)


def feed_in_pieces(scanner, data: bytes, seed: int) -> None:
    """Feed ``data`` split at random points, as TCP may deliver it."""
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        size = rng.choice([1, 2, 3, 4, 5, 6, 7, 64, 1000])
        chunk = bytearray(data[pos : pos + size])
        scanner.feed(chunk, len(chunk))
        pos += size


# A server reply to a pipelined extended query: two Syncs, an error in between.
REPLY = (
    msg(b"1") + msg(b"2") + msg(b"T", b"\x00\x01a\x00" + b"\x00" * 18)
    + msg(b"D", b"\x00\x01\x00\x00\x00\x011") + msg(b"C", b"SELECT 1\x00")
    + msg(b"S", b"TimeZone\x00Asia/Tokyo\x00") + msg(b"Z", b"T")
    + msg(b"E", b"SERROR\x00C42601\x00Mboom\x00\x00") + msg(b"Z", b"E")
    + msg(b"C", b"ROLLBACK\x00") + msg(b"Z", b"I")
)


@pytest.mark.parametrize("seed", range(40))
def test_backend_scanner_counts_whatever_the_chunking(seed):
    bs = BackendScanner()
    feed_in_pieces(bs, REPLY, seed)
    assert (bs.rfq, bs.rfq_idle, bs.status) == (3, 1, ord("I"))
    assert bs.params == [("TimeZone", "Asia/Tokyo")]
    assert bs.at_boundary()
    assert not bs.fatal  # an ERROR is not the end of the session


@pytest.mark.parametrize("seed", range(10))
def test_backend_scanner_notices_a_fatal_whatever_the_chunking(seed):
    bs = BackendScanner()
    feed_in_pieces(bs, REPLY + proto.error_response("terminating connection", "57P01"), seed)
    assert bs.fatal


def test_backend_scanner_reports_copy_in():
    bs = BackendScanner()
    data = bytearray(msg(b"G", b"\x00\x00\x00"))
    bs.feed(data, len(data))
    assert bs.copy_in == 1


REQUESTS = (
    msg(b"P", b"\x00select 1\x00\x00\x00") + msg(b"B", b"\x00\x00" + b"\x00" * 6)
    + msg(b"E", b"\x00\x00\x00\x00\x00") + msg(b"S")
    + proto.query("select 2") + msg(b"F", b"\x00" * 8) + msg(b"P", b"\x00x\x00\x00\x00")
)


@pytest.mark.parametrize("seed", range(40))
def test_frontend_scanner_counts_syncs_and_open_extended_messages(seed):
    fs = FrontendScanner()
    feed_in_pieces(fs, REQUESTS, seed)
    # Sync + Query + FunctionCall each earn one ReadyForQuery; the last Parse awaits a Sync.
    assert fs.syncs == 3
    assert fs.ext_open
    assert fs.simple_queries == 1
    assert not fs.terminate


def test_frontend_scanner_terminate_and_unknown_type():
    fs = FrontendScanner()
    data = bytearray(msg(b"X"))
    fs.feed(data, len(data))
    assert fs.terminate
    fs = FrontendScanner()
    data = bytearray(msg(b"z", b"abc"))
    with pytest.raises(ProtocolError):
        fs.feed(data, len(data))


def test_frontend_scanner_copy_in_ignores_syncs_like_the_server():
    fs = FrontendScanner()
    # libpq's extended-protocol COPY: P B D E S, then data, CopyDone, Sync.
    head = bytearray(msg(b"P", b"\x00c\x00\x00\x00") + msg(b"B", b"\x00" * 8)
                     + msg(b"E", b"\x00" + b"\x00" * 4) + msg(b"S"))
    fs.feed(head, len(head))
    assert fs.syncs == 1
    assert fs.copy_in_started() == 1  # the Sync already sent is ignored by the server
    tail = bytearray(msg(b"d", b"1\n") + msg(b"S") + msg(b"c") + msg(b"S"))
    fs.feed(tail, len(tail))
    assert fs.syncs == 1  # only the Sync after CopyDone will be answered
    assert not fs.copy_in


def test_bad_lengths_raise():
    fs = FrontendScanner(max_size=1000)
    data = bytearray(b"Q" + struct.pack("!I", 2))
    with pytest.raises(ProtocolError):
        fs.feed(data, len(data))
    fs = FrontendScanner(max_size=1000)
    data = bytearray(b"Q" + struct.pack("!I", 5000) + b"xx")
    with pytest.raises(ProtocolError):
        fs.feed(data, len(data))


def test_message_reader_startup_and_typed():
    r = MessageReader(startup=True)
    packet = proto.startup_message({"user": "app", "database": "p0"})
    r.feed(packet[:3])
    assert r.next() is None
    r.feed(packet[3:])
    _, body = r.next()
    assert proto.parse_startup(body) == (proto.PROTOCOL_V3, {"user": "app", "database": "p0"})
    r = MessageReader()
    r.feed(proto.ready_for_query(b"T") + proto.parameter_status("a", "b"))
    assert list(r) == [(ord("Z"), b"T"), (ord("S"), b"a\x00b\x00")]


@pytest.mark.parametrize("body", [
    struct.pack("!I", 12345678),  # unknown code: returned, caller refuses
    struct.pack("!I", proto.CANCEL_REQUEST_CODE) + struct.pack("!II", 7, 9),
    struct.pack("!I", proto.SSL_REQUEST_CODE),
])
def test_parse_startup_special_codes(body):
    code, value = proto.parse_startup(body)
    assert code == struct.unpack("!I", body[:4])[0]
    if code == proto.CANCEL_REQUEST_CODE:
        assert value == (7, 9)


@pytest.mark.parametrize("body", [
    b"\x00\x03",  # too short
    struct.pack("!I", proto.PROTOCOL_V3) + b"user\x00app",  # not terminated
    struct.pack("!I", proto.PROTOCOL_V3) + b"user\x00\x00",  # odd strings
    struct.pack("!I", proto.CANCEL_REQUEST_CODE) + b"\x00",  # bad cancel length
])
def test_parse_startup_rejects_malformed(body):
    with pytest.raises(ProtocolError):
        proto.parse_startup(body)


def test_startup_reader_reads_a_terminate_sent_instead_of_a_startup_packet():
    r = MessageReader(startup=True)
    r.feed(proto.TERMINATE)
    assert r.next() == (proto.F_TERMINATE, b"")
    assert not r.buf


def test_startup_reader_rejects_oversized_length():
    r = MessageReader(startup=True)
    r.feed(struct.pack("!I", 1 << 20) + b"x")
    with pytest.raises(ProtocolError):
        r.next()


def test_builders_round_trip():
    err = proto.error_response("no such database: x", "08P01")
    r = MessageReader()
    r.feed(err + proto.data_row([1, None, "x"]) + proto.row_description([("a", proto.OID_TEXT)]))
    (t1, b1), (t2, b2), (t3, _) = list(r)
    assert t1 == ord("E") and proto.parse_fields(b1) == {
        "S": "FATAL", "V": "FATAL", "C": "08P01", "M": "no such database: x"}
    assert t2 == ord("D") and b2 == b"\x00\x03\x00\x00\x00\x011\xff\xff\xff\xff\x00\x00\x00\x01x"
    assert t3 == ord("T")


def test_frontend_scanner_lists_unsynced_messages_while_watching_names():
    fs = FrontendScanner(watch_named=True)
    data = bytearray(REQUESTS[:-len(msg(b"P", b"\x00x\x00\x00\x00"))]
                     + msg(b"P", b"\x00select 3\x00\x00\x00") + msg(b"B", b"\x00\x00" + b"\x00" * 6)
                     + msg(b"H"))
    fs.feed(data, len(data))
    assert fs.unsynced == [ord("P"), ord("B")]  # since the last Sync (or Query)
    before = fs.unsynced[:]
    fs.feed(bytearray(msg(b"E", b"\x00" * 5) + msg(b"S")), 15)
    assert fs.unsynced == []  # the Sync ended the pipeline
    fs.unsee(fs.syncs, fs.syncs_since_exec, before)  # ... but the chunk is to be fed again
    assert fs.unsynced == [ord("P"), ord("B")]


def test_backend_scanner_counts_the_replies_that_end_requests_only_when_asked():
    bs = BackendScanner()
    replies = bytearray(msg(b"1") + msg(b"2") + msg(b"T", b"\x00\x00") + msg(b"D", b"\x00\x00")
                        + msg(b"C", b"SELECT 1\x00"))
    bs.feed(replies, len(replies))
    assert bs.ext_done == 0  # off: the hot path pays nothing
    bs.count_replies(True)
    bs.feed(replies, len(replies))
    assert (bs.ext_done, bs.ext_failed) == (4, False)  # ParseComplete, BindComplete, T, C
    error = bytearray(msg(b"E", b"SERROR\x00C22012\x00Mdivision by zero\x00\x00"))
    bs.feed(error, len(error))
    assert bs.ext_failed
    ready = bytearray(msg(b"Z", b"I"))
    bs.feed(ready, len(ready))
    assert (bs.ext_done, bs.ext_failed) == (0, False)  # counts start again after a Sync
