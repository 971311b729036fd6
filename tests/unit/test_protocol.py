"""The sans-I/O wire protocol: frames, encoder, decoder, handshake. Bytes in, frames out."""

from __future__ import annotations

import random
import re
import struct

import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volume_core.errors import NbdMirrorError, PeerRefused, ProtocolError
from volume_core.replication import auth
from volume_core.replication.protocol import (
    FRAME_TYPES,
    HEADER_SIZE,
    MAGIC,
    MAX_DATA,
    MAX_EXTENTS,
    MAX_MARKED_RUNS,
    NEED_DATA,
    PEER_CLOSED,
    PROTOCOL_VERSION,
    RUNS_PER_FRAME,
    Auth,
    Connection,
    CycleAck,
    CycleBegin,
    CycleCommit,
    Data,
    DataAck,
    Decoder,
    Error,
    Flush,
    FlushAck,
    Hello,
    HelloReply,
    Identity,
    MarkedRuns,
    Meta,
    MetaAck,
    Ping,
    Pong,
    ReadRegion,
    RegionData,
    ResyncBegin,
    ResyncEnd,
    State,
    Trim,
    Write,
    WriteFailed,
    WriteKind,
    WriteV,
    Zero,
    coarsen_runs,
    encode,
    encode_parts,
    frame_name,
    hello_problem,
    reply_problem,
)

pytestmark = pytest.mark.unit
#: Deterministic like the rest of the suite; no example database left in the work tree.
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

SIZE = 256 << 20
REGION = 64 << 10
NONCE = bytes(range(32))

HELLO = Hello(PROTOCOL_VERSION, "primary", "p-uuid", SIZE, REGION, 3, "semi-async", NONCE, True)
REPLY = HelloReply(True, "", PROTOCOL_VERSION, "secondary", "s-uuid", SIZE, REGION, 1,
                   NONCE[::-1], False)
SAMPLES = [
    HELLO,
    REPLY,
    HelloReply(False, "volume size differs: primary 1 GiB, secondary 2 GiB", 1, "secondary",
               "s", 2 << 30, REGION, 1, NONCE, True),
    Auth(bytes(range(100, 132))),
    MarkedRuns(),
    MarkedRuns(((0, 1), (5, 3), (2**64 - 2, 1)), end=False),
    Write(1, 0, b"a" * 4096),
    Write(2**64 - 1, SIZE - 1, b"z", fua=True),
    Meta(3, 4096, 8192),
    Meta(4, 0, SIZE, WriteKind.TRIM, fua=True),
    Meta(5, 512, 512, WriteKind.ZERO, may_trim=True),
    Data(3, 4096, bytes(range(256)) * 32),
    Trim(6, REGION, 10 * REGION, fua=True),
    Zero(7, 0, SIZE, may_trim=False),
    Zero(8, 100, 1),
    Flush(9),
    WriteV.of(13, [(0, 4096), (REGION, 100), (3 * REGION, 1)], b"v" * 4197),
    WriteV.of(2**64 - 1, [(SIZE - 1, 1)], b"e"),
    MetaAck(3),
    MetaAck(10, count=500),
    DataAck(3, 2),
    WriteFailed(3, 4096, 8192),
    FlushAck(9),
    FlushAck(9, failed=True),
    ReadRegion(77, REGION, 2 * REGION),
    ReadRegion(78, SIZE - REGION, REGION),
    RegionData(77, REGION, b"r" * (2 * REGION)),
    ResyncBegin(11, 12, 12 * REGION),
    ResyncEnd(12, 12, 12 * REGION),
    Ping(123456789),
    Pong(123456789),
    Error("authentication failed: the primary does not know the shared secret"),
    Error(""),
    CycleBegin(1),
    CycleCommit(1),
    CycleCommit(7, 1_764_000_000_123_456),
    CycleAck(1),
]


def decoder() -> Decoder:
    return Decoder(SIZE, REGION)


def decode_all(data: bytes, dec: Decoder | None = None) -> list:
    dec = dec or decoder()
    dec.receive_data(data)
    frames = []
    while (frame := dec.next_frame()) is not NEED_DATA:
        frames.append(frame)
    return frames


def raw(code: int, *, flags: int = 0, reserved: int = 0, seq: int = 0, offset: int = 0,
        length: int = 0, payload: bytes = b"", payload_len: int | None = None,
        magic: bytes = MAGIC) -> bytes:
    """A frame with a valid header crc and whatever fields a test wants."""
    plen = len(payload) if payload_len is None else payload_len
    head = struct.pack("<4sBBHQQIII", magic, code, flags, reserved, seq, offset, length, plen,
                       crc32c(payload) if payload else 0)
    return head + struct.pack("<I", crc32c(head)) + payload


# ------------------------------------------------------------------------------ round trips


def test_samples_cover_every_frame_type():
    assert {frame_name(f) for f in SAMPLES} == set(FRAME_TYPES)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: frame_name(f))
def test_every_frame_round_trips(frame):
    data = encode(frame)
    assert data[:4] == MAGIC and len(data) >= HEADER_SIZE
    assert decode_all(data) == [frame]


def test_a_stream_of_every_frame_decodes_in_order():
    stream = b"".join(encode(f) for f in SAMPLES)
    assert decode_all(stream) == SAMPLES


def test_encode_parts_hands_the_payload_over_without_a_copy():
    data = memoryview(bytearray(b"q" * 4096))
    head, payload = encode_parts(Write(1, 0, data))
    assert payload is data and len(head) == HEADER_SIZE
    assert decode_all(head + bytes(payload)) == [Write(1, 0, b"q" * 4096)]


def test_a_large_payload_ending_the_buffer_is_handed_out_without_a_copy():
    frame = Write(1, 0, bytes(range(256)) * 4096)  # 1 MiB
    dec = decoder()
    head, payload = encode_parts(frame)
    dec.receive_data(head)
    assert dec.next_frame() is NEED_DATA
    assert dec.bytes_needed() == len(payload)
    dec.receive_data(payload)
    got = dec.next_frame()
    assert got == frame
    assert isinstance(got.data, memoryview) and got.data.readonly
    # The decoder goes on with a fresh buffer: the handed-out data stays intact.
    dec.receive_data(encode(Write(2, 0, b"\xff" * (1 << 20))))
    assert dec.next_frame().seq == 2
    assert got == frame


def test_many_small_frames_in_one_buffer_are_consumed_without_copying_the_rest():
    frames = [MetaAck(i) for i in range(50_000)]  # 2 MB of headers: compaction kicks in
    assert decode_all(b"".join(encode(f) for f in frames)) == frames


def test_error_reason_is_cut_to_4_kib_on_a_character_boundary():
    frame = decode_all(encode(Error("é" * 5000)))[0]
    assert frame.reason == "é" * 2048


def test_peer_closed_cleanly_between_frames():
    dec = decoder()
    dec.receive_data(encode(Ping(1)))
    dec.receive_data(b"")
    assert dec.next_frame() == Ping(1)
    assert dec.next_frame() is PEER_CLOSED


# ------------------------------------------------------------------------ malformed input

MALFORMED = [
    ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"." * 40, "bad magic b'GET '"),
    ("bad magic", raw(0x40, magic=b"NBMX"), "bad magic b'NBMX'"),
    ("unknown type", raw(0x99), "unknown frame type 0x99"),
    ("reserved bits", raw(0x40, reserved=1), "PING frame has reserved bits set (0x0001)"),
    ("flag not allowed", raw(0x10, flags=0x02, length=1, payload=b"x"),
     "WRITE frame has flags 0x02 it may not have"),
    ("payload over the limit", raw(0x10, length=MAX_DATA + 1, payload_len=MAX_DATA + 1),
     f"WRITE frame payload of {MAX_DATA + 1} bytes is over the limit of {MAX_DATA}"),
    ("WRITE payload not its length", raw(0x10, length=4096, payload=b"x" * 4095),
     "WRITE frame payload of 4095 bytes does not match its length 4096"),
    ("META with a payload", raw(0x11, length=1, payload=b"x"),
     "META frame has a payload of 1 bytes; it takes none"),
    ("AUTH of the wrong size", raw(0x03, payload=b"x" * 31),
     "AUTH frame payload of 31 bytes; it must be 32"),
    ("RESYNC counts short", raw(0x32, payload=b"x" * 8),
     "RESYNC_BEGIN frame payload of 8 bytes; it must be 16"),
    ("WRITE past the end", raw(0x10, offset=SIZE - 1, length=2, payload=b"xx"),
     f"WRITE frame range {SIZE - 1}+2 reaches past the end of the volume ({SIZE} bytes)"),
    ("TRIM past the end", raw(0x13, offset=SIZE, length=1),
     f"TRIM frame range {SIZE}+1 reaches past the end"),
    ("WRITE of nothing", raw(0x10, offset=0, length=0), "WRITE frame has length 0"),
    ("ZERO of nothing", raw(0x14, offset=0, length=0), "ZERO frame has length 0"),
    ("READ_REGION unaligned offset", raw(0x30, offset=512, length=REGION),
     f"READ_REGION frame range 512+{REGION} is not whole regions of {REGION} bytes"),
    ("READ_REGION part of a region", raw(0x30, offset=0, length=REGION + 512),
     "is not whole regions"),
    ("REGION_DATA unaligned", raw(0x31, offset=4096, length=4096, payload=b"x" * 4096),
     "REGION_DATA frame range 4096+4096 is not whole regions"),
    ("ack of no writes", raw(0x20, seq=5, length=0),
     "META_ACK frame must have offset 0 and a count of at least 1"),
    ("FLUSH with a range", raw(0x15, offset=4096), "FLUSH frame has a nonzero offset or length"),
    ("META of an unknown kind", raw(0x11, flags=0x30, length=1), "META kind 3 is unknown"),
    ("META write with MAY_TRIM", raw(0x11, flags=0x02, length=1),
     "META flag MAY_TRIM is only allowed on kind zero"),
    ("ERROR not UTF-8", raw(0x42, payload=b"\xff\xfe"), "ERROR reason is not UTF-8"),
    ("MARKED_RUNS part of a run", raw(0x04, flags=0x08, payload=b"x" * 17),
     "MARKED_RUNS payload of 17 bytes is not whole runs of 16 bytes"),
    ("MARKED_RUNS empty run", raw(0x04, payload=struct.pack("<QQ", 3, 0)),
     "MARKED_RUNS run 3+0 is empty, overlaps or comes before region 0"),
    ("MARKED_RUNS descending", raw(0x04, payload=struct.pack("<QQQQ", 5, 1, 2, 1)),
     "MARKED_RUNS run 2+1 is empty, overlaps or comes before region 6"),
    ("MARKED_RUNS overlapping", raw(0x04, payload=struct.pack("<QQQQ", 5, 2, 6, 1)),
     "MARKED_RUNS run 6+1 is empty, overlaps or comes before region 7"),
    ("MARKED_RUNS past 2**64", raw(0x04, payload=struct.pack("<QQ", 2**64 - 1, 1)),
     f"MARKED_RUNS run {2**64 - 1}+1 is out of range"),
    ("MARKED_RUNS flag", raw(0x04, flags=0x04), "MARKED_RUNS frame has flags 0x04"),
    ("MARKED_RUNS with a seq", raw(0x04, seq=1), "MARKED_RUNS frame has a nonzero sequence"),
    ("MARKED_RUNS with a range", raw(0x04, length=1),
     "MARKED_RUNS frame has a nonzero offset or length"),
    ("HELLO not JSON", raw(0x01, payload=b"{nope"), "HELLO payload is not valid JSON"),
    ("HELLO not an object", raw(0x01, payload=b"[1, 2]"), "HELLO payload is not a JSON object"),
    ("HELLO field missing", raw(0x01, payload=b'{"version": 1}'),
     "HELLO field 'role' is missing or not a str"),
    ("HELLO bool for an int",
     raw(0x01, payload=encode(HELLO)[HEADER_SIZE:].replace(b'"size":268435456', b'"size":true')),
     "HELLO field 'size' is missing or not a int"),
    ("HELLO bad nonce",
     raw(0x01, payload=encode(HELLO)[HEADER_SIZE:].replace(NONCE.hex().encode(), b'"ab"'[1:3])),
     "HELLO nonce is not 32 bytes of hex"),
]


@pytest.mark.parametrize("data, message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_input_is_refused_with_a_clear_message(data, message):
    dec = decoder()
    dec.receive_data(data)
    with pytest.raises(ProtocolError, match=re.escape(message)) as info:
        dec.next_frame()
    assert "\n" not in str(info.value)
    assert isinstance(info.value, NbdMirrorError)


def test_header_crc_mismatch():
    data = bytearray(encode(Ping(1)))
    data[8] ^= 1  # the seq
    with pytest.raises(ProtocolError, match=r"^header checksum mismatch \(0x"):
        decode_all(bytes(data))


def test_payload_crc_mismatch():
    data = bytearray(encode(Write(1, 0, b"x" * 4096)))
    data[-1] ^= 0x80
    with pytest.raises(ProtocolError, match=r"^WRITE frame payload checksum mismatch"):
        decode_all(bytes(data))


def test_a_damaged_length_is_caught_before_waiting_for_the_payload():
    data = bytearray(encode(Write(1, 0, b"x" * 16)))
    data[28] = 0xFF  # payload_len: would make the decoder wait for 255 more bytes
    dec = decoder()
    dec.receive_data(bytes(data[:HEADER_SIZE]))
    with pytest.raises(ProtocolError, match="header checksum mismatch"):
        dec.next_frame()


def test_before_the_geometry_is_known_data_frames_and_large_payloads_are_refused():
    dec = Decoder()
    dec.receive_data(encode(Write(1, 0, b"x")))
    with pytest.raises(ProtocolError, match="^WRITE frame before the handshake completed"):
        dec.next_frame()
    dec = Decoder()
    dec.receive_data(raw(0x42, payload_len=17 << 10))
    with pytest.raises(ProtocolError, match="over the limit of 16384"):
        dec.next_frame()


def test_truncated_frame_at_the_end_of_the_stream():
    dec = decoder()
    dec.receive_data(encode(Write(1, 0, b"x" * 100))[:-1])
    assert dec.next_frame() is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(ProtocolError, match=r"peer closed in the middle of a frame \(139 bytes"):
        dec.next_frame()


def test_after_a_protocol_error_the_decoder_refuses_further_use():
    dec = decoder()
    dec.receive_data(b"garbage" * 10)
    with pytest.raises(ProtocolError, match="bad magic"):
        dec.next_frame()
    with pytest.raises(ProtocolError, match="^connection already failed: bad magic"):
        dec.receive_data(encode(Ping(1)))
    with pytest.raises(ProtocolError, match="^connection already failed"):
        dec.next_frame()


@pytest.mark.parametrize("size, region_size", [(0, REGION), (SIZE, 0), (SIZE, 3000)])
def test_an_impossible_geometry_is_refused(size, region_size):
    with pytest.raises(ProtocolError, match="impossible volume geometry"):
        Decoder().set_volume(size, region_size)
    primary, secondary = Connection("primary"), Connection("secondary")
    secondary.receive_data(primary.send(primary.make_hello(
        mode="sync", uuid="p", size=size, region_size=region_size, generation=1)))
    secondary.next_frame()
    with pytest.raises(ProtocolError, match="impossible volume geometry"):
        secondary.send(secondary.make_reply(accepted=True, reason="", **ID_S))
    assert secondary.state is State.BROKEN


def test_the_last_short_region_is_whole_regions():
    size = 10 * REGION + 4096
    dec = Decoder(size, REGION)
    frame = ReadRegion(1, 9 * REGION, REGION + 4096)
    assert decode_all(encode(frame), dec) == [frame]


# ------------------------------------------------------------------------------ chunking

STREAM_FRAMES = [f for f in SAMPLES if not isinstance(f, (Hello, HelloReply))][:12]
STREAM = b"".join(encode(f) for f in STREAM_FRAMES)


def feed_in_chunks(cuts: list[int]) -> list:
    dec = decoder()
    frames, last = [], 0
    for cut in [*sorted(set(cuts)), len(STREAM)]:
        dec.receive_data(STREAM[last:cut])
        last = cut
        while (frame := dec.next_frame()) is not NEED_DATA:
            frames.append(frame)
    return frames


def test_one_byte_at_a_time():
    assert feed_in_chunks(list(range(1, len(STREAM)))) == STREAM_FRAMES


def test_split_in_two_at_every_byte_boundary():
    small = b"".join(encode(f) for f in SAMPLES if len(encode(f)) < 200)
    expect = decode_all(small)
    for cut in range(1, len(small)):
        dec = decoder()
        dec.receive_data(small[:cut])
        got = []
        while (f := dec.next_frame()) is not NEED_DATA:
            got.append(f)
        dec.receive_data(small[cut:])
        while (f := dec.next_frame()) is not NEED_DATA:
            got.append(f)
        assert got == expect, cut


def test_random_chunkings():
    rng = random.Random(11)
    for _ in range(50):
        cuts = rng.sample(range(1, len(STREAM)), rng.randint(1, 60))
        assert feed_in_chunks(cuts) == STREAM_FRAMES


@settings(FUZZ, max_examples=150)
@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=40))
def test_any_chunking_gives_the_same_frames(cuts):
    assert feed_in_chunks(cuts) == STREAM_FRAMES


BIG_FRAMES = [Write(1, 0, bytes(range(256)) * 512), MetaAck(1), Ping(3),
              Data(2, 4 * REGION, b"\x07" * (64 << 10)), Write(3, 0, b"s" * 100),
              Data(4, 0, bytes(range(251)) * 700)]
BIG_STREAM = b"".join(encode(f) for f in BIG_FRAMES)


def feed_reading_in_place(steps: list[tuple[int, bool]]) -> list:
    """Feed BIG_STREAM in chunks of the given sizes, each received in place
    (receive_buffer/received, as the link does) when asked and offered."""
    dec, frames, pos = decoder(), [], 0
    steps = [*steps, (len(BIG_STREAM), True), (len(BIG_STREAM), False)]
    for size, in_place in steps:
        if pos == len(BIG_STREAM):
            break
        target = dec.receive_buffer() if in_place else None
        if target is not None:
            n = min(size, len(target), len(BIG_STREAM) - pos)
            target[:n] = BIG_STREAM[pos:pos + n]
            dec.received(n)
        else:
            n = min(size, len(BIG_STREAM) - pos)
            dec.receive_data(BIG_STREAM[pos:pos + n])
        pos += n
        while (frame := dec.next_frame()) is not NEED_DATA:
            frames.append(frame)
    dec.receive_data(b"")
    assert dec.next_frame() is PEER_CLOSED
    return frames


@settings(FUZZ, max_examples=150)
@given(st.lists(st.tuples(st.integers(1, 300_000), st.booleans()), max_size=40))
def test_payloads_received_in_place_or_not_give_the_same_frames(steps):
    assert feed_reading_in_place(steps) == BIG_FRAMES


def test_a_payload_received_in_place_is_handed_out_without_a_copy_and_checked():
    frame = Write(1, 0, b"\x5a" * (1 << 20))
    head, payload = encode_parts(frame)
    dec = decoder()
    assert dec.receive_buffer() is None  # no header yet
    dec.receive_data(head + payload[:1000])
    assert dec.next_frame() is NEED_DATA
    target = dec.receive_buffer()
    assert len(target) == len(payload) - 1000 == dec.bytes_needed()
    target[:] = payload[1000:]
    dec.received(len(target))
    got = dec.next_frame()
    assert got == frame and isinstance(got.data, memoryview) and got.data.readonly
    assert got.data.obj is target.obj  # the very buffer it was received into
    # a corrupted byte received in place fails the payload checksum
    dec.receive_data(head)
    assert dec.next_frame() is NEED_DATA
    target = dec.receive_buffer()
    target[:] = payload
    target[77] ^= 1
    dec.received(len(target))
    with pytest.raises(ProtocolError, match="payload checksum mismatch"):
        dec.next_frame()


def test_the_peer_closing_inside_a_payload_received_in_place_is_a_cut_frame():
    head, payload = encode_parts(Write(1, 0, b"\x5a" * (128 << 10)))
    dec = decoder()
    dec.receive_data(head)
    assert dec.next_frame() is NEED_DATA
    target = dec.receive_buffer()
    target[:10] = payload[:10]
    dec.received(10)
    with pytest.raises(ValueError):
        dec.received(len(target))  # more than is left
    dec.receive_data(b"")
    with pytest.raises(ProtocolError, match="in the middle of a frame"):
        dec.next_frame()


# --------------------------------------------------------------------------------- fuzzing


def drain(dec: Decoder, data: bytes) -> None:
    dec.receive_data(data)
    for _ in range(len(data) + 2):  # each frame consumes at least a header: this bounds it
        if dec.next_frame() in (NEED_DATA, PEER_CLOSED):
            return
    raise AssertionError("the decoder kept returning frames from finite input")


@settings(FUZZ, max_examples=400)
@given(st.binary(max_size=600), st.booleans())
def test_arbitrary_bytes_give_frames_or_protocol_error_and_never_hang(data, ready):
    try:
        drain(decoder() if ready else Decoder(), data)
    except ProtocolError:
        pass


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=200), st.integers(0, 255))
def test_arbitrary_bytes_behind_a_valid_magic_and_type(data, code):
    try:
        drain(decoder(), MAGIC + bytes([code]) + data)
    except ProtocolError:
        pass


_CODES = sorted(cls.CODE for cls in FRAME_TYPES.values())
_U32 = st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1), st.sampled_from([REGION, SIZE]))


@settings(FUZZ, max_examples=600)
@given(code=st.one_of(st.sampled_from(_CODES), st.integers(0, 255)),
       flags=st.one_of(st.just(0), st.integers(0, 255)),
       reserved=st.one_of(st.just(0), st.integers(0, 2**16 - 1)),
       seq=st.integers(0, 2**64 - 1),
       offset=st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.sampled_from([REGION, SIZE])),
       length=_U32, payload=st.binary(max_size=64), ready=st.booleans())
def test_well_checksummed_headers_with_any_fields(code, flags, reserved, seq, offset, length,
                                                  payload, ready):
    data = raw(code, flags=flags, reserved=reserved, seq=seq, offset=offset, length=length,
               payload=payload)
    dec = decoder() if ready else Decoder()
    dec.receive_data(data)
    try:
        frame = dec.next_frame()
    except ProtocolError:
        return
    # Whatever the decoder accepts is canonical: it encodes back to the same bytes.
    assert frame is not NEED_DATA
    if not isinstance(frame, (Hello, HelloReply)):
        assert encode(frame) == data


@settings(FUZZ, max_examples=400)
@given(st.sampled_from(SAMPLES), st.data())
def test_a_single_corrupted_byte_is_always_detected(frame, draw):
    data = bytearray(encode(frame))
    where = draw.draw(st.integers(0, len(data) - 1))
    data[where] ^= draw.draw(st.integers(1, 255))
    dec = decoder()
    dec.receive_data(bytes(data))
    with pytest.raises(ProtocolError):
        dec.next_frame()  # detected at once: no frame, and no waiting for more bytes


@settings(FUZZ, max_examples=300)
@given(st.lists(st.sampled_from(SAMPLES), max_size=8), st.sampled_from(["primary", "secondary"]),
       st.sampled_from([None, b"k"]))
def test_any_sequence_of_frames_is_taken_or_refused_cleanly(frames, role, secret):
    conn = Connection(role, secret)
    conn.receive_data(b"".join(encode(f) for f in frames))
    try:
        for _ in frames:
            if conn.next_frame() is NEED_DATA:
                break
    except (ProtocolError, PeerRefused):
        assert conn.state in (State.BROKEN, State.CLOSED)


# ------------------------------------------------------------------------------ handshake

ID_P = dict(uuid="p-uuid", size=SIZE, region_size=REGION, generation=1)
ID_S = dict(uuid="s-uuid", size=SIZE, region_size=REGION, generation=1)


def to_marks(secret: bytes | None = None, size: int = SIZE) -> tuple[Connection, Connection]:
    """Both ends through HELLO, HELLO_REPLY (and AUTH): the secondary's marks are next."""
    primary, secondary = Connection("primary", secret), Connection("secondary", secret)
    secondary.receive_data(primary.send(primary.make_hello(mode="sync", **{**ID_P,
                                                                           "size": size})))
    secondary.next_frame()
    primary.receive_data(secondary.send(secondary.make_reply(accepted=True, reason="",
                                                             **{**ID_S, "size": size})))
    primary.next_frame()
    if secret:
        secondary.receive_data(primary.send(primary.auth_frame()))
        secondary.next_frame()
        primary.receive_data(secondary.send(secondary.auth_frame()))
        primary.next_frame()
    assert primary.state is secondary.state is State.MARKS
    return primary, secondary


def send_marks(primary: Connection, secondary: Connection, runs=()) -> list:
    """The secondary's MARKED_RUNS frames for ``runs``, through to the primary."""
    frames = secondary.marked_runs_frames(runs)
    primary.receive_data(b"".join(secondary.send(f) for f in frames))
    assert [primary.next_frame() for _ in frames] == frames
    return frames


def connected(secret: bytes | None = None, runs=()) -> tuple[Connection, Connection]:
    primary, secondary = to_marks(secret)
    send_marks(primary, secondary, runs)
    assert primary.state is secondary.state is State.READY
    return primary, secondary


def test_without_a_secret_hello_and_reply_make_both_ready():
    primary, secondary = connected()
    for frame in (Meta(1, 0, 4096), Data(1, 0, b"d" * 4096), Flush(2)):
        secondary.receive_data(primary.send(frame))
        assert secondary.next_frame() == frame
    for frame in (MetaAck(1), DataAck(1), FlushAck(2), ReadRegion(1, 0, REGION)):
        primary.receive_data(secondary.send(frame))
        assert primary.next_frame() == frame


def test_send_parts_joined_equal_send():
    primary, _ = connected()
    head, payload = primary.send_parts(Write(1, 0, b"w" * 4096))
    assert head + payload == primary.send(Write(1, 0, b"w" * 4096))


@pytest.mark.parametrize("frame", [Write(1, 0, b"x"), Ping(1), Flush(1), Auth(b"\0" * 32),
                                   REPLY], ids=frame_name)
def test_a_secondary_refuses_anything_before_hello(frame):
    secondary = Connection("secondary")
    secondary.receive_data(encode(frame))
    with pytest.raises(ProtocolError):
        secondary.next_frame()
    assert secondary.state is State.BROKEN


def test_order_violations_are_refused_on_both_ends():
    with pytest.raises(ProtocolError, match="local: cannot send WRITE .*before the handshake"):
        Connection("primary").send(Write(1, 0, b"x"))
    with pytest.raises(ProtocolError, match="local: cannot send HELLO from the secondary"):
        Connection("secondary").send(HELLO)
    primary = Connection("primary")
    primary.receive_data(encode(HELLO))
    with pytest.raises(ProtocolError, match="^received HELLO from the secondary: only a primary"):
        primary.next_frame()


def test_hello_twice_and_reply_without_hello_are_refused():
    primary = Connection("primary")
    primary.send(primary.make_hello(mode="sync", **ID_P))
    with pytest.raises(ProtocolError, match="local: cannot send HELLO twice"):
        primary.send(primary.make_hello(mode="sync", **ID_P))
    secondary = Connection("secondary")
    with pytest.raises(ProtocolError, match="local: cannot send HELLO_REPLY without a HELLO"):
        secondary.send(REPLY)


def test_frames_from_the_wrong_side_are_refused_when_ready():
    primary, secondary = connected()
    primary.receive_data(encode(Write(1, 0, b"x")))
    with pytest.raises(ProtocolError, match="^received WRITE from the secondary: only a primary"):
        primary.next_frame()
    with pytest.raises(ProtocolError, match="^local: cannot send META_ACK from the primary"):
        connected()[0].send(MetaAck(1))


def test_a_refused_hello_raises_peer_refused_with_the_reason():
    primary = Connection("primary")
    secondary = Connection("secondary")
    secondary.receive_data(primary.send(primary.make_hello(mode="sync", **ID_P)))
    hello = secondary.next_frame()
    reason = hello_problem(hello, Identity("s-uuid", SIZE // 2, REGION, 1), secret=False)
    assert reason == "volume size differs: primary 256 MiB, secondary 128 MiB"
    reply = secondary.make_reply(accepted=False, reason=reason, **ID_S)
    primary.receive_data(secondary.send(reply))
    assert secondary.state is State.CLOSED
    with pytest.raises(PeerRefused, match="^the secondary refused: volume size differs"):
        primary.next_frame()
    assert primary.state is State.CLOSED
    with pytest.raises(ProtocolError, match="after the connection was closed"):
        primary.send(Ping(1))


def test_error_closes_the_connection_from_any_state():
    primary, secondary = connected()
    secondary.receive_data(primary.send(Error("disk on fire")))
    assert secondary.next_frame() == Error("disk on fire")
    assert primary.state is secondary.state is State.CLOSED
    secondary.receive_data(encode(Ping(1)))
    with pytest.raises(ProtocolError, match="received PING after the connection was closed"):
        secondary.next_frame()
    fresh = Connection("secondary")
    fresh.receive_data(encode(Error("go away")))
    assert fresh.next_frame() == Error("go away")


def test_a_connection_checks_ranges_it_sends():
    primary, _ = connected()
    with pytest.raises(ProtocolError, match="local: cannot send WRITE: WRITE frame range"):
        primary.send(Write(1, SIZE, b"x"))
    with pytest.raises(ProtocolError, match="connection already failed"):
        primary.send(Ping(1))


def writev_raw(rows: list[tuple[int, int]], data_len: int, count: int | None = None) -> bytes:
    payload = b"".join(struct.pack("<QQ", o, n) for o, n in rows) + b"d" * data_len
    return raw(WriteV.CODE, flags=0x01, seq=1, length=len(rows) if count is None else count,
               payload=payload)


@pytest.mark.parametrize("rows, data_len, count, message", [
    ([(0, 10), (5, 10)], 20, None, "extents overlap or do not ascend"),
    ([(REGION, 10), (0, 10)], 20, None, "extents overlap or do not ascend"),
    ([(0, 10), (20, 0)], 10, None, "empty extent"),
    ([(0, 10), (20, 10)], 21, None, "extents hold 20 bytes of data; its payload carries 21"),
    ([(SIZE - 10, 11)], 11, None, "reaches past the end of the volume"),
    ([(2**63, 1)], 1, None, "out of range"),
    ([(0, 10)], 10, 0, "1 to 1024 extents"),
    ([(0, 10)], 10, MAX_EXTENTS + 1, "not 1025 extents"),
    ([(0, 10), (20, 10)], 0, None, "is not 2 extents"),
])
def test_a_malformed_writev_is_refused(rows, data_len, count, message):
    with pytest.raises(ProtocolError, match=message):
        decode_all(writev_raw(rows, data_len, count))


def test_writev_hands_out_its_extents_and_data_without_a_copy():
    buf = bytearray(2 * 16 + 300)
    WriteV.table(buf, 2)[:] = [(4096, 100), (8192, 200)]
    buf[32:] = b"a" * 100 + b"b" * 200
    frame = WriteV(5, 2, buf)
    assert frame.extents.tolist() == [[4096, 100], [8192, 200]]
    assert frame.span == (4096, 8192 + 200 - 4096)
    assert bytes(frame.data) == b"a" * 100 + b"b" * 200
    (got,) = decode_all(encode(frame))
    assert got == frame and got.extents.tolist() == frame.extents.tolist()
    primary, _ = connected()
    with pytest.raises(ProtocolError, match="local: cannot send WRITEV: WRITEV frame range"):
        primary.send(WriteV.of(1, [(SIZE - 1, 2)], b"xy"))


def test_a_connection_is_broken_after_garbage():
    _, secondary = connected()
    secondary.receive_data(b"\0" * 64)
    with pytest.raises(ProtocolError, match="bad magic"):
        secondary.next_frame()
    assert secondary.state is State.BROKEN
    with pytest.raises(ProtocolError, match="connection already failed: bad magic"):
        secondary.send(MetaAck(1))


# ------------------------------------------------------------------- handshake decisions

LOCAL_S = Identity("s-uuid", SIZE, REGION, 1)


def hello(**changes) -> Hello:
    fields = dict(version=PROTOCOL_VERSION, role="primary", uuid="p-uuid", size=SIZE,
                  region_size=REGION, generation=5, mode="semi-async", nonce=NONCE, auth=False)
    return Hello(**{**fields, **changes})


@pytest.mark.parametrize("changes, kwargs, reason", [
    ({}, {}, None),
    ({}, {"paired_uuid": "p-uuid", "paired_generation": 5}, None),
    ({"version": 1}, {}, f"protocol version differs: primary speaks 1, secondary "
                         f"{PROTOCOL_VERSION}"),
    ({"role": "secondary"}, {}, "the peer is not a primary (it says it is a 'secondary')"),
    ({"uuid": "s-uuid"}, {}, "the peer is this same volume (s-uuid): refusing to replicate "
                             "onto itself"),
    ({"size": SIZE * 2}, {}, "volume size differs: primary 512 MiB, secondary 256 MiB"),
    ({"size": SIZE + 512}, {}, f"volume size differs: primary {SIZE + 512} bytes, "
                               "secondary 256 MiB"),
    ({"size": 3 << 29}, {}, "volume size differs: primary 1536 MiB, secondary 256 MiB"),
    ({"region_size": 4096}, {}, "region size differs: primary 4 KiB, secondary 64 KiB"),
    ({"mode": "eventually"}, {}, "unknown replication mode 'eventually' (expected sync, "
                                 "semi-async, async)"),
    ({}, {"paired_uuid": "other"}, "the secondary is paired with primary volume other; this "
                                   "primary is volume p-uuid"),
    ({}, {"paired_uuid": "p-uuid", "paired_generation": 6},
     "stale primary: generation 5, the secondary has seen generation 6"),
    ({"auth": True}, {}, "the primary has a shared secret; the secondary has none (give it "
                         "--secret-file)"),
    ({}, {"secret": True}, "the secondary requires a shared secret (--secret-file); the primary "
                           "has none"),
])
def test_hello_problem_names_what_differs(changes, kwargs, reason):
    kwargs = {"secret": False, **kwargs}
    assert hello_problem(hello(**changes), LOCAL_S, **kwargs) == reason


@pytest.mark.parametrize("changes, reason", [
    ({}, None),
    ({"role": "primary"}, "the peer is not a secondary (it says it is a 'primary')"),
    ({"size": SIZE // 2}, "volume size differs: primary 256 MiB, secondary 128 MiB"),
    ({"uuid": "p-uuid"}, "the peer is this same volume (p-uuid): refusing to replicate onto "
                         "itself"),
    ({"version": 7}, f"protocol version differs: primary speaks {PROTOCOL_VERSION}, "
                     "secondary 7"),
])
def test_reply_problem_names_what_differs(changes, reason):
    import dataclasses
    reply = dataclasses.replace(REPLY, **changes)
    assert reply_problem(reply, Identity("p-uuid", SIZE, REGION, 1)) == reason


def test_an_auth_frame_is_the_mac_size():
    primary, secondary = Connection("primary", b"k"), Connection("secondary", b"k")
    secondary.receive_data(primary.send(primary.make_hello(mode="sync", **ID_P)))
    secondary.next_frame()
    primary.receive_data(secondary.send(secondary.make_reply(accepted=True, reason="", **ID_S)))
    primary.next_frame()
    assert len(primary.auth_frame().mac) == auth.MAC_SIZE


def test_a_sequence_number_on_a_frame_that_has_none_is_refused():
    """Found by the fuzzer: ERROR with seq 1 decoded, then encoded back with seq 0."""
    dec = decoder()
    dec.receive_data(raw(Error.CODE, seq=1, payload=b"bye"))
    with pytest.raises(ProtocolError, match="nonzero sequence number"):
        dec.next_frame()


# ---------------------------------------------------------------- the secondary's marks

REGIONS = SIZE // REGION


@pytest.mark.parametrize("secret", [None, b"k"])
def test_the_secondarys_marked_runs_end_the_handshake_and_reach_the_primary(secret):
    primary, secondary = to_marks(secret)
    runs = [(0, 2), (7, 1), (REGIONS - 3, 3)]
    for frame in (Write(1, 0, b"x"), Flush(1)):  # nothing flows before the marks are in
        with pytest.raises(ProtocolError, match="before the handshake completed"):
            to_marks(secret)[0].send(frame)
    assert send_marks(primary, secondary, runs) == [MarkedRuns(tuple(runs))]
    assert primary.state is secondary.state is State.READY
    assert primary.marked_runs == secondary.marked_runs == runs


def test_no_marks_is_one_empty_end_frame():
    primary, secondary = to_marks()
    assert send_marks(primary, secondary) == [MarkedRuns((), end=True)]
    assert primary.state is State.READY and primary.marked_runs == []


def test_many_runs_take_several_frames_and_only_the_last_ends():
    primary, secondary = to_marks(size=1 << 40)
    runs = [(2 * i, 1) for i in range(RUNS_PER_FRAME * 2 + 5)]
    frames = send_marks(primary, secondary, runs)
    assert [len(f.runs) for f in frames] == [RUNS_PER_FRAME, RUNS_PER_FRAME, 5]
    assert [f.end for f in frames] == [False, False, True]
    assert all(len(encode(f)) <= HEADER_SIZE + (16 << 10) for f in frames)
    assert primary.marked_runs == runs and primary.state is State.READY


def test_more_runs_than_a_handshake_carries_are_joined_never_dropped():
    primary, secondary = to_marks(size=1 << 40)
    many = [(3 * i, 1 + i % 2) for i in range(MAX_MARKED_RUNS + 100)]
    send_marks(primary, secondary, many)
    assert len(primary.marked_runs) == MAX_MARKED_RUNS
    sent = set()
    for first, count in primary.marked_runs:
        sent.update(range(first, first + count))
    assert all(r in sent for first, count in many for r in range(first, first + count))


@pytest.mark.parametrize("runs, message", [
    ([(REGIONS - 1, 2)], f"reaches past the end of the volume ({REGIONS} regions)"),
    ([(REGIONS, 1)], "reaches past the end of the volume"),
])
def test_runs_outside_the_volume_are_refused(runs, message):
    primary, _ = to_marks()
    primary.receive_data(encode(MarkedRuns(tuple(runs))))
    with pytest.raises(ProtocolError, match=re.escape(message)):
        primary.next_frame()
    assert primary.state is State.BROKEN


def test_runs_must_ascend_across_frames_too():
    primary, _ = to_marks()
    primary.receive_data(encode(MarkedRuns(((10, 5),), end=False)) +
                         encode(MarkedRuns(((12, 1),))))
    assert primary.next_frame() == MarkedRuns(((10, 5),), end=False)
    with pytest.raises(ProtocolError, match="run 12\\+1 is empty, overlaps or comes before "
                                            "region 15"):
        primary.next_frame()


def test_a_flood_of_marked_runs_frames_is_refused():
    primary, _ = to_marks(size=1 << 40)
    frame = MarkedRuns(tuple((i, 1) for i in range(0, 2 * RUNS_PER_FRAME, 2)), end=False)
    with pytest.raises(ProtocolError, match=f"more than {MAX_MARKED_RUNS} MARKED_RUNS runs"):
        for k in range(MAX_MARKED_RUNS // RUNS_PER_FRAME + 1):
            shifted = tuple((a + k * 2 * RUNS_PER_FRAME, n) for a, n in frame.runs)
            primary.receive_data(encode(MarkedRuns(shifted, end=False)))
            primary.next_frame()


@pytest.mark.parametrize("where", ["before the reply", "before auth", "after the end"])
def test_marked_runs_out_of_turn_are_refused(where):
    if where == "before the reply":
        primary = Connection("primary")
        primary.send(primary.make_hello(mode="sync", **ID_P))
    elif where == "before auth":
        primary = Connection("primary", b"k")
        secondary = Connection("secondary", b"k")
        secondary.receive_data(primary.send(primary.make_hello(mode="sync", **ID_P)))
        secondary.next_frame()
        primary.receive_data(secondary.send(secondary.make_reply(accepted=True, reason="",
                                                                 **ID_S)))
        primary.next_frame()
        assert primary.state is State.AUTH
    else:
        primary, _ = connected()
    primary.receive_data(encode(MarkedRuns()))
    with pytest.raises(ProtocolError, match="MARKED_RUNS outside the marks step"):
        primary.next_frame()


def test_only_a_secondary_sends_marked_runs():
    primary, _ = to_marks()
    with pytest.raises(ProtocolError, match="cannot send MARKED_RUNS from the primary"):
        primary.send(MarkedRuns())
    secondary = Connection("secondary")
    secondary.receive_data(encode(MarkedRuns()))
    with pytest.raises(ProtocolError, match="received MARKED_RUNS from the primary"):
        secondary.next_frame()


@settings(FUZZ, max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 20)), max_size=60),
       st.integers(1, 30))
def test_coarsened_runs_cover_every_region_in_at_most_the_limit(gaps_counts, limit):
    runs, at = [], 0
    for gap, count in gaps_counts:
        runs.append((at + gap + (1 if runs else 0), count))
        at = runs[-1][0] + count
    out = coarsen_runs(runs, limit).tolist()
    assert len(out) == min(len(runs), limit)
    covered = {r for a, n in out for r in range(a, a + n)}
    assert {r for a, n in runs for r in range(a, a + n)} <= covered
    assert all(n >= 1 for _, n in out)
    assert all(a2 > a1 + n1 - 1 for (a1, n1), (a2, _) in zip(out, out[1:], strict=False))


def test_a_cycle_commit_with_an_impossible_time_does_not_decode():
    from volume_core.replication.protocol import MAX_TIME_US

    with pytest.raises(ProtocolError, match="impossible time"):
        decode_all(raw(CycleCommit.CODE, seq=3, offset=MAX_TIME_US))
    assert decode_all(raw(CycleCommit.CODE, seq=3, offset=MAX_TIME_US - 1)) == [
        CycleCommit(3, MAX_TIME_US - 1)]
