"""The primary's replicator against a recording channel: what it sends, what it waits for."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from tests.conftest import wait_until
from volume_core.engine import Engine
from volume_core.replication import protocol as p
from volume_core.replication.primary import PrimaryReplicator
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 4096
REGIONS = 32


class RecordingChannel:
    def __init__(self):
        self.sent: list[tuple[str, p.Frame]] = []
        self.closed: str | None = None
        self.changed = threading.Condition()

    def send_urgent(self, frame):
        self._add("urgent", frame)

    def send_bulk(self, frame, timeout=None):
        self._add("bulk", frame)

    def corked(self):
        return contextlib.nullcontext()

    def _add(self, path, frame):
        with self.changed:
            self.sent.append((path, frame))
            self.changed.notify_all()

    def close(self, reason=""):
        self.closed = reason

    def frames(self):
        return [(path, type(f).__name__, getattr(f, "seq", None)) for path, f in self.sent]


@pytest.fixture
def engine(tmp_path):
    e = Engine(Volume.create(tmp_path / "v", REGIONS * RS, RS))
    yield e
    e.close()


def replicate(engine, mode, timeout=10.0):
    rep = PrimaryReplicator(engine, mode, ack_timeout=timeout)
    channel = RecordingChannel()
    rep.connected(channel)
    engine.attach_replicator(rep)
    return rep, channel


def in_thread(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def test_sync_write_waits_for_the_data_ack(engine):
    rep, ch = replicate(engine, "sync")
    t = in_thread(engine.pwrite, b"a" * RS, 2 * RS)
    wait_until(lambda: ch.sent, what="the write to be sent")
    assert ch.frames() == [("bulk", "Write", 1)] and ch.sent[0][1].data == b"a" * RS
    rep.on_frame(p.MetaAck(1))  # not what sync waits for
    t.join(0.2)
    assert t.is_alive()
    rep.on_frame(p.DataAck(1))
    t.join(10)
    assert not t.is_alive()
    assert rep.status()["state"] == "in-sync"


def test_semi_async_sends_metadata_first_and_waits_only_for_its_ack(engine):
    rep, ch = replicate(engine, "semi-async")
    t = in_thread(engine.pwrite, b"b" * RS, 3 * RS)
    wait_until(lambda: len(ch.sent) == 2, what="meta and data to be sent")
    assert ch.frames() == [("urgent", "Meta", 1), ("bulk", "Data", 1)]
    t.join(0.2)
    assert t.is_alive()
    rep.on_frame(p.MetaAck(1))
    t.join(10)
    assert not t.is_alive()  # completed before the data was acknowledged
    assert rep.status()["state"] == "out-of-sync"  # data not yet confirmed applied
    rep.on_frame(p.DataAck(1))
    assert rep.status()["state"] == "in-sync"
    t = in_thread(engine.trim, RS, 5 * RS)
    wait_until(lambda: len(ch.sent) == 3, what="the trim's metadata")
    rep.on_frame(p.MetaAck(2))
    t.join(10)
    assert ch.frames()[2] == ("urgent", "Meta", 2) and len(ch.sent) == 3  # no DATA for a trim
    assert ch.sent[2][1].kind == p.WriteKind.TRIM


def test_a_silent_peer_is_dropped_and_the_write_completes_out_of_sync(engine):
    rep, ch = replicate(engine, "sync", timeout=0.2)
    engine.pwrite(b"c" * RS, 4 * RS)  # returns after the timeout: never blocks the host
    assert ch.closed and "no acknowledgement" in ch.closed
    st = rep.status()
    assert st["state"] == "disconnected" and st["out_of_sync_regions"] == 1
    assert engine.tracker.marks[4] == 1
    assert rep.sweep() == 0 and engine.tracker.marks[4] == 1


def test_writes_while_disconnected_are_out_of_sync_once_connected_again(engine):
    rep = PrimaryReplicator(engine, "sync", ack_timeout=0.2)
    engine.attach_replicator(rep)
    engine.pwrite(b"d" * RS, 6 * RS)  # no channel: completes at once, stays marked
    assert rep.status()["out_of_sync_regions"] == 1 and engine.tracker.marks[6]
    assert rep.status()["state"] == "disconnected"
    rep.connected(RecordingChannel())
    assert rep.status()["out_of_sync_regions"] == 1
    assert rep.status()["state"] in ("resyncing", "out-of-sync")  # until the peer confirms


def test_sweep_clears_regions_applied_on_both_sides_only(engine):
    rep, ch = replicate(engine, "sync")
    for i, region in enumerate((1, 2)):
        t = in_thread(engine.pwrite, b"e" * RS, region * RS)
        wait_until(lambda i=i: len(ch.sent) == i + 1, what="a write to be sent")
        rep.on_frame(p.WriteFailed(1, RS, RS) if region == 1 else p.DataAck(2))
        t.join(10)
    assert np.flatnonzero(engine.tracker.marks).tolist() == [1, 2]
    assert rep.sweep() == 1
    assert np.flatnonzero(engine.tracker.marks).tolist() == [1]  # the failed one stays
    assert rep.status()["write_failures_reported"] == 1


def test_a_recovering_secondary_gets_the_current_region(engine):
    rep, ch = replicate(engine, "semi-async")
    engine.detach_replicator()
    engine.pwrite(b"f" * RS, 7 * RS)
    rep.on_frame(p.ReadRegion(1 << 62, 7 * RS, RS))
    wait_until(lambda: ch.sent, what="the answer")
    assert ch.frames() == [("bulk", "RegionData", 1 << 62)]
    assert ch.sent[0][1].data == b"f" * RS


def test_sync_flush_waits_for_the_secondary_flush(engine):
    rep, ch = replicate(engine, "sync")
    t = in_thread(engine.flush)
    wait_until(lambda: ch.sent, what="the flush to be sent")
    assert ch.frames() == [("bulk", "Flush", 1)]
    t.join(0.2)
    assert t.is_alive()
    rep.on_frame(p.FlushAck(1))
    t.join(10)
    assert not t.is_alive()


def test_a_lost_link_releases_every_waiting_write(engine):
    rep, ch = replicate(engine, "sync")
    t = in_thread(engine.pwrite, b"g" * RS, 8 * RS)
    wait_until(lambda: ch.sent, what="the write to be sent")
    rep.disconnected("connection reset")
    t.join(10)
    assert not t.is_alive()
    assert rep.status()["out_of_sync_regions"] == 1


def test_unexpected_frames_are_protocol_errors(engine):
    rep, _ch = replicate(engine, "sync")
    with pytest.raises(p.ProtocolError):
        rep.on_frame(p.Write(1, 0, b"x"))
