"""Replication links over real TCP on 127.0.0.1: handshake, secret, TLS, priorities, faults."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fault_proxy import FaultProxy
from volume_core.errors import LinkError, PeerRefused
from volume_core.replication import link, protocol, tls
from volume_core.replication.protocol import (
    HEADER_SIZE,
    Flush,
    FlushAck,
    Frame,
    Identity,
    MetaAck,
    Write,
    hello_problem,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20
PRIMARY = Identity("11111111-aaaa-4aaa-8aaa-000000000001", 64 * MiB, 64 << 10, 3)
SECONDARY = Identity("22222222-bbbb-4bbb-8bbb-000000000002", 64 * MiB, 64 << 10, 0)
FAST = link.ChannelOptions(ping_interval=0.1, peer_timeout=0.6)
QUIET = link.ChannelOptions(ping_interval=10.0, peer_timeout=20.0)


# ---------------------------------------- certificates (the certs fixture: tests/conftest.py)


def server_tls(certs: Path, leaf: str = "server") -> tls.TlsContext:
    return tls.server_context(certs / f"{leaf}.pem", certs / f"{leaf}.key", certs / "ca.pem")


def client_tls(certs: Path, leaf: str | None = "client", ca: str = "ca") -> tls.TlsContext:
    cert = key = None
    if leaf is not None:
        cert, key = certs / f"{leaf}.pem", certs / f"{leaf}.key"
    return tls.client_context(certs / f"{ca}.pem", cert, key)


# ---------------------------------------------------------------------------------- helpers


class Ends:
    """What one started channel received, and why it closed."""

    def __init__(self, channel: link.Channel, on_frame: Callable[[Frame], None] | None = None):
        self.channel = channel
        self.frames: queue.Queue[Frame] = queue.Queue()
        self.closed = threading.Event()
        self.reason: str | None = None
        self._extra = on_frame

    def start(self) -> Ends:
        self.channel.start(self._frame, self._close)
        return self

    def _frame(self, frame: Frame) -> None:
        if self._extra is not None:
            self._extra(frame)
        self.frames.put(frame)

    def _close(self, reason: str) -> None:
        self.reason = reason
        self.closed.set()

    def get(self, timeout: float = 5.0) -> Frame:
        return self.frames.get(timeout=timeout)

    def wait_closed(self, timeout: float = 5.0) -> str:
        assert self.closed.wait(timeout), "the channel did not close"
        assert self.reason is not None
        return self.reason


class Secondary:
    """A Listener on 127.0.0.1 whose accepted channels are started and kept for the test."""

    def __init__(self, *, host: str = "127.0.0.1", secret: bytes | None = None, tls_ctx=None,
                 identity=SECONDARY,
                 on_frame: Callable[[Frame], None] | None = None,
                 on_channel: Callable[[link.Channel], None] | None = None, **kw) -> None:
        self.ends: list[Ends] = []
        self.accepted = threading.Event()
        self._on_frame = on_frame
        self._refuse = on_channel

        def decide(hello: protocol.Hello) -> str | None:
            return hello_problem(hello, identity, secret=secret is not None)

        self.listener = link.Listener(host, 0, identity=identity, decide=decide,
                                      on_channel=self._take, secret=secret, tls=tls_ctx, **kw)

    def _take(self, channel: link.Channel) -> None:
        if self._refuse is not None:
            self._refuse(channel)
        self.ends.append(Ends(channel, self._on_frame).start())
        self.accepted.set()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    def end(self, timeout: float = 5.0) -> Ends:
        assert self.accepted.wait(timeout), "no channel reached on_channel"
        return self.ends[0]

    def close(self) -> None:
        self.listener.close()
        for ends in self.ends:
            ends.channel.close()


@pytest.fixture
def secondary() -> Iterator[Callable[..., Secondary]]:
    made: list[Secondary] = []

    def make(**kw) -> Secondary:
        sec = Secondary(**kw)
        made.append(sec)
        sec.listener.start()
        return sec

    yield make
    for sec in made:
        sec.close()


@pytest.fixture
def primary() -> Iterator[Callable[..., link.Channel]]:
    """``connect`` to an address; every channel made is closed after the test."""
    made: list[link.Channel] = []

    def make(address: tuple[str, int], **kw) -> link.Channel:
        kw.setdefault("identity", PRIMARY)
        kw.setdefault("mode", "semi-async")
        channel = link.connect(*address, **kw)
        made.append(channel)
        return channel

    yield make
    for channel in made:
        channel.close()


@pytest.fixture
def proxy() -> Iterator[Callable[[tuple[str, int]], FaultProxy]]:
    made: list[FaultProxy] = []

    def make(target: tuple[str, int]) -> FaultProxy:
        p = FaultProxy(target).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture(autouse=True)
def no_threads_left() -> Iterator[None]:
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith(("link-", "proxy-"))]
    assert not left, f"threads left running: {left}"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    done = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        done.wait(0.01)


# ------------------------------------------------------------------------------ handshakes


@pytest.mark.parametrize("secret,use_tls", [(None, False), (b"s3cret", False), (None, True),
                                            (b"s3cret", True)],
                         ids=["plain", "secret", "tls", "tls+secret"])
def test_handshake_then_frames_flow_both_ways(secondary, primary, certs, secret, use_tls):
    sec = secondary(secret=secret, tls_ctx=server_tls(certs) if use_tls else None)
    channel = primary(sec.address, secret=secret, tls=client_tls(certs) if use_tls else None)
    assert channel.reply.uuid == SECONDARY.uuid
    ours = Ends(channel).start()
    theirs = sec.end()
    assert theirs.channel.hello.uuid == PRIMARY.uuid and theirs.channel.hello.mode == "semi-async"

    channel.send_bulk(Write(7, MiB, b"\xab" * MiB))
    channel.send_urgent(Flush(8))
    got = sorted((theirs.get(), theirs.get()), key=lambda f: f.seq)
    assert isinstance(got[0], Write) and bytes(got[0].data) == b"\xab" * MiB
    assert got[1] == Flush(8)
    theirs.channel.send_urgent(MetaAck(7))
    theirs.channel.send_urgent(FlushAck(8))
    assert [ours.get(), ours.get()] == [MetaAck(7), FlushAck(8)]
    stats = channel.stats()
    assert stats.open and stats.frames_sent >= 2 and stats.bytes_sent > MiB
    assert stats.frames_received >= 2


def test_the_secondarys_marked_runs_reach_the_primarys_channel(secondary, primary):
    runs = [(2 * i, 1) for i in range(300)] + [(900, 124)]  # up to the last of 1 024 regions
    asked = []

    def marks() -> list[tuple[int, int]]:
        asked.append(1)
        return runs

    sec = secondary(secret=b"k", marks=marks)
    channel = primary(sec.address, secret=b"k")
    assert channel.peer_marks.tolist() == [list(r) for r in runs]
    assert sec.end().channel.peer_marks.shape == (0, 2)  # the secondary's own: not its peer's
    with pytest.raises(PeerRefused):
        primary(sec.address, secret=b"wrong")
    assert len(asked) == 1  # never told to a peer that does not know the secret
    plain = secondary()
    assert primary(plain.address).peer_marks.shape == (0, 2)  # no marks: nothing missing


def test_a_wrong_secret_is_refused_before_any_channel(secondary, primary):
    sec = secondary(secret=b"right")
    with pytest.raises(PeerRefused, match="the primary does not know the shared secret"):
        primary(sec.address, secret=b"wrong")
    sec.listener.close()
    assert not sec.ends


@pytest.mark.parametrize("primary_secret,secondary_secret,message", [
    (None, b"k", "the secondary requires a shared secret"),
    (b"k", None, "the primary has a shared secret; the secondary has none"),
])
def test_a_secret_on_one_side_only_is_refused(secondary, primary, primary_secret,
                                              secondary_secret, message):
    sec = secondary(secret=secondary_secret)
    with pytest.raises(PeerRefused, match=message):
        primary(sec.address, secret=primary_secret)
    sec.listener.close()
    assert not sec.ends


@pytest.mark.parametrize("leaf,message", [
    (None, "requires a certificate from this side"),
    ("rogue-client", "does not trust this side's certificate"),
])
def test_a_tls_client_without_a_trusted_certificate_is_refused(secondary, primary, certs,
                                                                leaf, message):
    sec = secondary(tls_ctx=server_tls(certs))
    with pytest.raises(LinkError, match=f"TLS: the secondary {message}"):
        primary(sec.address, tls=client_tls(certs, leaf))
    sec.listener.close()
    assert not sec.ends


def test_a_secondary_certificate_from_another_ca_is_refused(secondary, primary, certs):
    sec = secondary(tls_ctx=server_tls(certs, "rogue-server"))
    with pytest.raises(LinkError, match=r"TLS: the secondary's certificate is not signed by "
                                        r"the CA in .*ca\.pem"):
        primary(sec.address, tls=client_tls(certs))
    sec.listener.close()
    assert not sec.ends


def test_plain_primary_against_a_tls_secondary_fails_with_a_link_error(secondary, primary,
                                                                      certs):
    sec = secondary(tls_ctx=server_tls(certs), handshake_timeout=1.0)
    with pytest.raises(LinkError, match="closed the connection during the handshake"):
        primary(sec.address, timeout=3.0)


def test_the_reason_from_decide_reaches_the_primary(secondary, primary):
    sec = secondary()
    bigger = Identity(PRIMARY.uuid, 2 * PRIMARY.size, PRIMARY.region_size, 1)
    with pytest.raises(PeerRefused, match="the secondary refused: volume size differs: "
                                          "primary 128 MiB, secondary 64 MiB"):
        primary(sec.address, identity=bigger)
    primary(sec.address)  # the listener still serves a good peer
    sec.end()


def test_on_channel_may_refuse_with_a_reason_the_primary_sees(secondary, primary):
    def refuse(channel: link.Channel) -> None:
        raise PeerRefused("already replicating from another primary")

    sec = secondary(on_channel=refuse)
    ours = Ends(primary(sec.address)).start()
    assert "already replicating from another primary" in ours.wait_closed()


def test_an_unreachable_secondary_is_a_one_line_link_error():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again before the connect: nobody listens there
    with pytest.raises(LinkError, match=f"cannot reach 127.0.0.1:{port}: connection refused"):
        link.connect("127.0.0.1", port, identity=PRIMARY, mode="sync", timeout=2.0)


def _read_to_end(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_garbage_half_frames_and_silence_are_dropped_and_the_listener_keeps_serving(
        secondary, primary, caplog):
    caplog.set_level(logging.WARNING, logger="volume_core.replication.link")
    sec = secondary(handshake_timeout=0.5)
    hello = protocol.encode(protocol.Connection("primary").make_hello(
        uuid=PRIMARY.uuid, size=PRIMARY.size, region_size=PRIMARY.region_size,
        generation=1, mode="sync"))
    probes = {"garbage": b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 4,
              "half frame": hello[:HEADER_SIZE + 10], "silence": b""}
    socks = {name: socket.create_connection(sec.address, timeout=5) for name in probes}
    try:
        for name, data in probes.items():
            socks[name].sendall(data)
        for name, sock in socks.items():
            answer = _read_to_end(sock, timeout=5)  # the listener hangs up on each
            if name == "garbage":
                assert b"bad magic" in answer  # an ERROR frame says why
    finally:
        for sock in socks.values():
            sock.close()
    primary(sec.address)
    sec.end()
    assert len(sec.ends) == 1
    logs = caplog.text
    assert "bad magic" in logs and logs.count("refused a connection from 127.0.0.1") == 3
    assert "did not complete the handshake in time" in logs


# ------------------------------------------------------------------------------- priorities


def test_urgent_frames_overtake_queued_bulk_frames(secondary, primary):
    gate = threading.Event()
    sec = secondary(on_frame=lambda frame: gate.wait(10))  # stops reading at the first frame
    channel = primary(sec.address)
    Ends(channel).start()
    theirs = sec.end()
    count = 16
    for i in range(count):
        channel.send_bulk(Write(i, i * MiB, bytes([i]) * MiB))
    wait_until(lambda: channel.stats().frames_sent >= 1)
    assert channel.stats().bulk_queued_bytes > 8 * MiB  # the peer holds the rest up
    channel.send_urgent(Flush(1000))
    gate.set()
    order = [theirs.get().seq for _ in range(count + 1)]
    position = order.index(1000)
    assert order[:position] + order[position + 1:] == list(range(count))  # bulk kept its order
    assert position <= count // 2, f"FLUSH arrived after {position} of {count} bulk frames"


def test_the_bulk_window_blocks_then_times_out_against_a_peer_that_stops_reading(
        secondary, primary):
    gate = threading.Event()
    sec = secondary(on_frame=lambda frame: gate.wait(10))
    options = link.ChannelOptions(window=4 * MiB, send_timeout=0.3, peer_timeout=20,
                                  ping_interval=10)
    channel = primary(sec.address, options=options)
    Ends(channel).start()
    sec.end()
    sent = 0
    try:
        with pytest.raises(LinkError, match="window of 4194304 bytes stayed full for 0.3 s"):
            for i in range(64):
                channel.send_bulk(Write(i, i * MiB, b"\0" * MiB))
                sent += 1
        assert 4 <= sent < 64  # the window took some, then blocked
        assert not channel.closed  # a full window is the caller's to handle, not a failure
        assert channel.stats().bulk_queued_bytes <= 4 * MiB + 2 * HEADER_SIZE
    finally:
        gate.set()




def test_a_smaller_window_for_a_frame_keeps_it_out_while_more_is_queued(secondary, primary):
    """send_bulk(window=N): that frame waits while more than N bytes are queued (and gives
    up after its timeout), while frames without it still use the whole window. The primary
    gives host data such a window while a resync runs, so resync chunks are not queued
    behind a whole window of host writes."""
    gate = threading.Event()
    sec = secondary(on_frame=lambda frame: gate.wait(10))  # stops reading at the first frame
    options = link.ChannelOptions(window=32 * MiB, send_timeout=0.3, peer_timeout=20,
                                  ping_interval=10)
    channel = primary(sec.address, options=options)
    Ends(channel).start()
    sec.end()
    try:
        seq = 0
        # More than the kernel's socket buffers can ever take (they grow as they fill):
        # at least 12 MiB stays queued, whatever they absorb.
        while channel.stats().bulk_queued_bytes < 24 * MiB:
            channel.send_bulk(Write(seq, 0, b"\0" * MiB), timeout=5)
            seq += 1
        with pytest.raises(LinkError, match="window of 2097152 bytes stayed full for 0.3 s"):
            channel.send_bulk(Write(seq, 0, b"\1" * MiB), window=2 * MiB)
        channel.send_bulk(Write(seq, 0, b"\2" * MiB), timeout=5)  # the whole window has room
        assert not channel.closed
    finally:
        gate.set()

def test_a_lent_payload_is_copied_when_it_must_wait_and_never_read_after_the_call(
        secondary, primary):
    """``send_bulk(lent=True)``: the caller reuses its buffer once the call returns (a
    host's write buffer). Whether the frame went out partly (its rest kept by the link)
    or was queued behind another, the peer gets the bytes as they were at the call."""
    gate = threading.Event()
    sec = secondary(on_frame=lambda frame: gate.wait(10))  # stops reading at the first frame
    channel = primary(sec.address, options=link.ChannelOptions(window=64 * MiB,
                                                                 peer_timeout=20))
    Ends(channel).start()
    theirs = sec.end()
    buf = bytearray(16 * MiB)  # more than the socket buffers take: a rest is left
    sent = []
    try:
        for seq in range(4):
            buf[:] = bytes([seq + 1]) * len(buf)
            channel.send_bulk(Write(seq, 0, memoryview(buf).toreadonly()), lent=True)
            sent.append(bytes([seq + 1]))
            buf[:] = b"\xee" * len(buf)  # the caller's next use of its buffer
        assert channel.stats().bulk_queued_bytes > 0  # some were queued, not written
    finally:
        gate.set()
    for seq, fill in enumerate(sent):
        frame = theirs.get(timeout=20)
        assert frame.seq == seq
        assert bytes(frame.data) == fill * (16 * MiB), f"frame {seq} carried reused bytes"


# ----------------------------------------------------------------------------------- faults


def _through_proxy(secondary, primary, proxy, options: link.ChannelOptions):
    sec = secondary(options=options)
    p = proxy(sec.address)
    ours = Ends(primary(p.address, options=options)).start()
    return p, ours, sec.end()


def test_keepalive_closes_a_stalled_link(secondary, primary, proxy):
    p, ours, theirs = _through_proxy(secondary, primary, proxy, FAST)
    wait_until(lambda: ours.channel.stats().rtt is not None)  # pings answered: alive
    p.stall()
    assert "no answer from the peer" in ours.wait_closed()
    assert "no answer from the peer" in theirs.wait_closed()


def test_a_delayed_link_keeps_working(secondary, primary, proxy):
    options = link.ChannelOptions(ping_interval=0.1, peer_timeout=1.0)
    sec = secondary(options=options)
    p = proxy(sec.address)
    p.delay(0.05)  # 100 ms round trip, twice the ping interval
    ours = Ends(primary(p.address, options=options)).start()
    theirs = sec.end()
    wait_until(lambda: (ours.channel.stats().rtt or 0) >= 0.1)
    for seq in range(5):
        ours.channel.send_bulk(Write(seq, seq * MiB, b"d" * 4096))
        assert theirs.get().seq == seq
        theirs.channel.send_urgent(MetaAck(seq))
        assert ours.get() == MetaAck(seq)
    assert not ours.channel.closed and not theirs.channel.closed


def test_a_cut_in_the_middle_of_a_frame_closes_the_channel_with_a_reason(secondary, primary,
                                                                         proxy):
    p, ours, theirs = _through_proxy(secondary, primary, proxy, QUIET)
    p.cut_after(HEADER_SIZE + 1000)
    ours.channel.send_bulk(Write(1, 0, b"c" * MiB))
    assert "the peer closed in the middle of a frame" in theirs.wait_closed()
    ours.wait_closed()
    assert theirs.frames.empty()


def test_a_corrupted_byte_is_a_protocol_error_that_closes_the_channel(secondary, primary,
                                                                      proxy):
    p, ours, theirs = _through_proxy(secondary, primary, proxy, QUIET)
    p.corrupt_at(HEADER_SIZE + 500)
    ours.channel.send_bulk(Write(1, 0, b"x" * 65536))
    reason = theirs.wait_closed()
    assert reason.startswith("protocol error: WRITE frame payload checksum mismatch")
    assert ours.wait_closed() == f"the peer closed the link: {reason}"  # told why
    assert theirs.frames.empty()


def test_close_is_idempotent_and_sends_nothing_after(secondary, primary):
    sec = secondary()
    ours = Ends(primary(sec.address)).start()
    theirs = sec.end()
    ours.channel.close()
    ours.channel.close()
    assert ours.wait_closed() == "closed locally"
    assert theirs.wait_closed() == "the peer closed the link: closed locally"
    with pytest.raises(LinkError, match="is closed: closed locally"):
        ours.channel.send_urgent(Flush(1))


def _has_ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_loopback_works_too(secondary, primary):
    sec = secondary(host="::1")
    channel = primary(sec.address)
    assert channel.peer.startswith("[::1]:")
    assert sec.end().channel.peer.startswith("[::1]:")
