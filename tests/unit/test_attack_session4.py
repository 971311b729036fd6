"""Attack round on session 4's changes (the applier thread, corked sends, MARKED_RUNS):
each test showed a bug (fixed since)."""

from __future__ import annotations

import contextlib
import threading

import pytest

from volume_core.engine import Engine
from volume_core.errors import LinkError
from volume_core.replication import protocol as p
from volume_core.replication.secondary import SYNC, FaultInjector, Receiver
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 4096
REGIONS = 64
SIZE = RS * REGIONS
BIG = 64 << 10  # secondary.FLUSH_BEFORE: acks held so far are sent before applying it


class Link:
    """The receiver's outbox: records frames; once ``closed`` it raises as a closed
    ``link.Channel`` does."""

    def __init__(self) -> None:
        self.frames: list[p.Frame] = []
        self.closed = False

    def send_urgent(self, frame: p.Frame) -> None:
        if self.closed:
            raise LinkError("the link to 127.0.0.1:1 is closed: the peer closed the connection")
        self.frames.append(frame)

    send_bulk = send_urgent

    def flush(self) -> None:
        if self.closed:
            raise LinkError("the link to 127.0.0.1:1 is closed: the peer closed the connection")


@pytest.fixture
def engine(tmp_path):
    vol = Volume.create(tmp_path / "sec", SIZE, RS)
    vol.update_info(role="secondary")
    eng = Engine(vol, replica=True)
    yield eng
    eng.close()


def read(engine: Engine, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    engine.pread(buf, offset)
    return bytes(buf)


def _lose_the_link_between_two_applies(engine: Engine, **kw) -> tuple[Receiver, Link]:
    """An applier (wake=...) drains a small write then a long one; the link is lost
    before the drain: sending the small one's DATA_ACK before the long apply fails."""
    out = Link()
    rx = Receiver(engine, SYNC, out, wake=lambda: None, **kw)
    rx.handle(p.Write(1, 0, b"a" * RS))
    rx.handle(p.Write(2, 8 * RS, b"b" * BIG))
    out.closed = True  # the primary went away while the applier was busy
    with contextlib.suppress(LinkError):  # receiver.py's applier logs it and goes on
        rx.drain()
    return rx, out


def test_a_write_after_a_lost_ack_send_is_still_applied(engine):
    rx, _ = _lose_the_link_between_two_applies(engine)
    rx.link_lost()
    out = Link()  # the primary reconnects
    rx.out = out
    rx.handle(p.Write(3, 8 * RS, b"c" * RS))
    rx.drain()
    assert read(engine, 8 * RS, RS) == b"c" * RS
    assert p.DataAck(3) in out.frames
    assert rx.status()["pending_writes"] == 0


def test_the_reader_is_not_held_forever_after_a_lost_ack_send(engine):
    rx, _ = _lose_the_link_between_two_applies(engine, max_waiting=16 << 10)
    done = threading.Event()

    def reader() -> None:  # the old link's reader, handling a frame it had decoded
        with contextlib.suppress(LinkError):
            rx.handle(p.Write(3, 8 * RS, b"c" * RS))
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    rx.drain()  # what the applier does on the wake: nothing is applicable
    try:
        assert done.wait(2.0), "the reader is still throttled"
    finally:
        with rx._lock:  # let the stuck reader go (test clean-up only)
            rx._draining = False
            rx._progress.notify_all()
        thread.join(5)


class HeldApply(FaultInjector):
    """Holds the first apply touching ``region`` until ``release`` is set (the disk is slow)."""

    def __init__(self, region: int) -> None:
        super().__init__()
        self.region = region
        self.entered = threading.Event()
        self.release = threading.Event()

    def check(self, first: int, stop: int) -> None:
        if first <= self.region < stop and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        super().check(first, stop)


def test_an_apply_running_across_a_reconnect_does_not_ack_on_the_new_link(engine):
    faults = HeldApply(region=0)
    old = Link()
    rx = Receiver(engine, SYNC, old, wake=lambda: None, faults=faults)
    rx.handle(p.Write(1, 0, b"a" * RS))
    applier = threading.Thread(target=rx.drain, daemon=True)
    applier.start()
    assert faults.entered.wait(5)
    old.closed = True  # the first primary is gone (its process restarted)
    rx.link_lost()
    new = Link()
    rx.out = new  # the restarted primary connects; its writes are numbered from 1 again
    faults.release.set()
    applier.join(5)
    assert not applier.is_alive()
    assert p.DataAck(1) not in new.frames, new.frames


class Channel:
    """The primary's channel (send_urgent, send_bulk, corked, close), recording what is sent.
    With ``hold_region_data`` the first REGION_DATA blocks (a full window) until ``release``,
    then fails as a closed link does."""

    def __init__(self, hold_region_data: bool = False) -> None:
        self.sent: list[p.Frame] = []
        self.hold = hold_region_data
        self.holding = threading.Event()
        self.release = threading.Event()
        self.changed = threading.Condition()

    def send_urgent(self, frame: p.Frame) -> None:
        with self.changed:
            self.sent.append(frame)
            self.changed.notify_all()

    def send_bulk(self, frame: p.Frame, timeout: float | None = None,
                  lent: bool = False, window: int | None = None) -> None:
        if self.hold and isinstance(frame, p.RegionData):
            self.hold = False
            self.holding.set()
            assert self.release.wait(10)
            raise LinkError("the link to 127.0.0.1:1 is closed: cut")
        self.send_urgent(frame)

    def close(self, reason: str = "") -> None:
        pass

    def wait_for(self, predicate, timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.sent), timeout)


@pytest.fixture
def primary_engine(tmp_path):
    eng = Engine(Volume.create(tmp_path / "pri", SIZE, RS))
    yield eng
    eng.close()


def test_a_read_region_of_a_lost_link_is_not_answered_on_the_next_one(primary_engine):
    from volume_core.replication.primary import PrimaryReplicator
    from volume_core.replication.secondary import REQUEST_ID_BASE

    rep = PrimaryReplicator(primary_engine, SYNC, ack_timeout=5.0)
    first = Channel(hold_region_data=True)
    rep.connected(first)
    primary_engine.attach_replicator(rep)
    try:
        rep.on_frame(p.ReadRegion(REQUEST_ID_BASE | 1, 0, RS))
        rep.on_frame(p.ReadRegion(REQUEST_ID_BASE | 2, RS, RS))  # queued behind the first
        assert first.holding.wait(5)
        rep.disconnected("cut")  # the link is lost with request 2 still queued
        second = Channel()
        rep.connected(second)
        first.release.set()
        rep.on_frame(p.ReadRegion(REQUEST_ID_BASE | 9, 2 * RS, RS))  # asked on this link
        second.wait_for(lambda sent: p.RegionData in {type(f) for f in sent}
                        and any(f.seq == REQUEST_ID_BASE | 9 for f in sent))
        answered = [f.seq for f in second.sent if isinstance(f, p.RegionData)]
        assert answered == [REQUEST_ID_BASE | 9]
    finally:
        rep.close()


def test_a_late_region_data_from_before_a_reconnect_is_ignored(engine):
    faults = FaultInjector()
    faults.fail(1)
    out = Link()
    rx = Receiver(engine, SYNC, out, faults=faults)
    rx.handle(p.Write(1, RS, b"a" * RS))  # fails on this disk: WRITE_FAILED + READ_REGION
    (ask,) = [f for f in out.frames if isinstance(f, p.ReadRegion)]
    rx.link_lost()
    rx.out = Link()
    rx.handle(p.RegionData(ask.seq, ask.offset, b"a" * RS))
