"""The primary's replicator against a recording channel: what it sends, what it waits for."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np
import pytest

from tests.conftest import wait_until
from volume_core.engine import Engine
from volume_core.regions import load_marks
from volume_core.replication import protocol as p
from volume_core.replication.primary import (
    HOST_QUEUE_WHILE_RESYNCING,
    RESYNC_WINDOW,
    PrimaryReplicator,
)
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 4096
REGIONS = 32


class RecordingChannel:
    def __init__(self):
        self.sent: list[tuple[str, p.Frame]] = []
        self.closed: str | None = None
        self.changed = threading.Condition()
        self.windows: dict[int, int | None] = {}  # seq -> the window asked for

    def send_urgent(self, frame):
        self._add("urgent", frame)

    def send_bulk(self, frame, timeout=None, lent=False, window=None):
        if lent:  # as the link does when it keeps a lent payload
            frame = dataclasses.replace(frame, data=bytes(frame.data))
        self.windows[frame.seq] = window
        self._add("bulk", frame)

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
    assert st["out_of_sync_bytes"] == RS and st["in_flight_bytes"] == 0
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


def test_a_recovered_region_is_cleared_by_the_next_sweep(engine):
    # WRITE_FAILED, then the secondary recovers the region (READ_REGION answered,
    # DATA_ACK of the request id): both sides hold it, so no restart resends it.
    rep, ch = replicate(engine, "sync")
    t = in_thread(engine.pwrite, b"r" * RS, 9 * RS)
    wait_until(lambda: ch.sent, what="the write to be sent")
    rep.on_frame(p.WriteFailed(1, 9 * RS, RS))
    t.join(10)
    assert rep.sweep() == 0 and engine.tracker.marks[9] == 1  # out of sync until recovered
    rid = (1 << 63) | 1
    rep.on_frame(p.ReadRegion(rid, 9 * RS, RS))
    wait_until(lambda: len(ch.sent) == 2, what="the answer")
    rep.on_frame(p.DataAck(rid))
    assert rep.status()["out_of_sync_regions"] == 0
    assert rep.sweep() == 1 and engine.tracker.marks[9] == 0


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


def marked_on_disk(engine) -> list[int]:
    return np.flatnonzero(load_marks(engine.volume.marks_path, REGIONS)).tolist()


def resent(ch, after: int = 0) -> list[tuple[str, int, int]]:
    return [(type(f).__name__, f.offset // RS, f.length) for _, f in ch.sent[after:]
            if isinstance(f, (p.Write, p.Zero))]


def test_the_secondarys_marks_are_marked_here_durably_and_resynced_where_acks_said_same(
        engine):
    rep, ch = replicate(engine, "sync")
    for seq, region in enumerate((2, 3, 4), start=1):
        t = in_thread(engine.pwrite, bytes([region]) * RS, region * RS)
        wait_until(lambda seq=seq: len(ch.sent) == seq, what="a write to be sent")
        rep.on_frame(p.DataAck(seq))
        t.join(10)
        if region == 3:
            assert rep.sweep() == 2  # regions 2 and 3 leave the marks: "the same"
    assert rep.status()["state"] == "in-sync"
    assert np.flatnonzero(engine.tracker.marks).tolist() == [4]
    assert {2, 3}.isdisjoint(marked_on_disk(engine))  # (intent is a whole extent: the rest)
    rep.disconnected("the secondary lost power")  # before its fdatasync of 2..4
    again = RecordingChannel()
    again.peer_marks = np.array([[2, 3], [9, 2]])  # what its marks.map names after reboot
    rep.connected(again)
    assert np.flatnonzero(engine.tracker.marks).tolist() == [2, 3, 4, 9, 10]
    assert {2, 3, 4, 9, 10} <= set(marked_on_disk(engine))  # durably, before any resync
    st = rep.status()
    assert st["out_of_sync_regions"] == 5 and st["peer_marked_regions"] == 5
    assert rep.sweep() == 0
    wait_until(lambda: len(resent(again)) == 2, what="the resync")
    assert resent(again) == [("Write", 2, 3 * RS), ("Zero", 9, 2 * RS)]


def test_a_failed_secondary_flush_keeps_what_it_acked_out_of_sync_and_resends_it(engine):
    rep, ch = replicate(engine, "sync")
    t = in_thread(engine.pwrite, b"h" * RS, 5 * RS)
    wait_until(lambda: ch.sent, what="the write to be sent")
    rep.on_frame(p.DataAck(1))
    t.join(10)
    t = in_thread(engine.flush)
    wait_until(lambda: len(ch.sent) == 2, what="the flush to be sent")
    assert ch.frames()[1] == ("bulk", "Flush", 2)
    rep.on_frame(p.FlushAck(2, failed=True))
    t.join(10)
    assert not t.is_alive()  # the host's flush is not failed for the peer's sake
    st = rep.status()
    assert (st["flush_failures"], st["out_of_sync_regions"]) == (1, 1)
    assert st["state"] != "in-sync"
    assert rep.sweep() == 0 and engine.tracker.marks[5] == 1
    wait_until(lambda: len(resent(ch)) == 2, what="the region to be resent")  # after write 1
    frame = ch.sent[-1][1]
    assert isinstance(frame, p.Write) and frame.seq > 2
    assert (frame.offset, bytes(frame.data)) == (5 * RS, b"h" * RS)
    rep.on_frame(p.DataAck(frame.seq))
    assert rep.status()["state"] == "in-sync"
    assert rep.sweep() == 1 and not engine.tracker.marks.any()


def test_a_region_the_secondary_recovers_is_out_of_sync_until_its_answer_lands(engine):
    rep, ch = replicate(engine, "semi-async")
    t = in_thread(engine.pwrite, b"r" * RS, 7 * RS)
    wait_until(lambda: len(ch.sent) == 2, what="meta and data")
    rep.on_frame(p.MetaAck(1))
    rep.on_frame(p.DataAck(1))
    t.join(10)
    assert rep.status()["state"] == "in-sync"
    rid = 1 << 63 | 5  # e.g. after the secondary's fdatasync failed: no WRITE_FAILED
    rep.on_frame(p.ReadRegion(rid, 7 * RS, RS))
    assert rep.status()["out_of_sync_regions"] == 1
    wait_until(lambda: len(ch.sent) == 3, what="the answer")
    rep.on_frame(p.DataAck(rid))
    assert rep.status()["state"] == "in-sync"


@contextlib.contextmanager
def resync_waiting(tmp_path, mode: str):
    """An 8 MiB volume, every region marked, and a replicator that has just connected: its
    resync has sent a window of frames (RESYNC_WINDOW) and waits for their acks."""
    big = Engine(Volume.create(tmp_path / "big", 8 << 20, 64 << 10))
    try:
        big.pwrite(b"\x01" * (8 << 20), 0)  # every region marked: all of it to resync
        rep = PrimaryReplicator(big, mode, ack_timeout=10.0)
        ch = RecordingChannel()
        rep.connected(ch)
        wait_until(lambda: len(ch.sent) == RESYNC_WINDOW, what="a window of resync frames")
        yield big, rep, ch
    finally:
        big.close()


def test_a_resync_keeps_at_most_its_window_unacknowledged(tmp_path):
    # Host writes queue behind resync frames (a sync write waits for them): the resync
    # sends RESYNC_WINDOW chunks, then one more per acknowledgement.
    with resync_waiting(tmp_path, "sync") as (_, rep, ch):
        assert not wait_for_more(ch, RESYNC_WINDOW)
        rep.on_frame(p.DataAck(ch.sent[0][1].seq))
        wait_until(lambda: len(ch.sent) == RESYNC_WINDOW + 1, what="one more after an ack")
        for k in range(1, 8):
            wait_until(lambda k=k: len(ch.sent) > k, what="the next resync frame")
            rep.on_frame(p.DataAck(ch.sent[k][1].seq))
        wait_until(lambda: rep.status()["out_of_sync_regions"] == 0, what="resync done")
        assert len(ch.sent) == 8


def test_while_a_resync_runs_host_data_queues_in_a_smaller_window(tmp_path):
    # A semi-async writer waits for META_ACK only: unchecked, its data would fill the link's
    # window and every resync chunk would wait behind all of it (the bench: 7 MiB/s of
    # resync against 111 MiB/s of host writes at 1 Gbit/s).
    with resync_waiting(tmp_path, "semi-async") as (big, rep, ch):
        big.attach_replicator(rep)
        assert rep.status()["state"] == "resyncing"

        def host_write(offset: int) -> int:
            before = len(ch.sent)
            writer = in_thread(big.pwrite, b"h" * 4096, offset)
            wait_until(lambda: any(isinstance(f, p.Meta) for _, f in ch.sent[before:]),
                       what="the host write's META")
            meta = next(f for _, f in ch.sent[before:] if isinstance(f, p.Meta))
            rep.on_frame(p.MetaAck(meta.seq))
            writer.join(5)
            assert not writer.is_alive()
            return meta.seq

        seq = host_write(0)
        assert ch.windows[seq] == HOST_QUEUE_WHILE_RESYNCING
        for k in range(8):  # acknowledge the resync to its end
            wait_until(lambda k=k: len(resync_frames(ch)) > k, what="the next resync frame")
            rep.on_frame(p.DataAck(resync_frames(ch)[k].seq))
        wait_until(lambda: not rep.status()["resync"]["running"], what="the resync's end")
        seq = host_write(4096)
        assert ch.windows[seq] is None  # the whole window again


def resync_frames(ch) -> list:
    return [f for _, f in ch.sent if isinstance(f, (p.Write, p.Zero))]


def wait_for_more(ch, count, seconds=0.3):
    """True if the channel gets more than ``count`` frames within ``seconds``."""
    with ch.changed:
        return ch.changed.wait_for(lambda: len(ch.sent) > count, seconds)


def test_a_bug_in_sending_drops_the_link_and_the_write_still_completes(engine):
    rep, ch = replicate(engine, "sync")

    def broken(frame, timeout=None, lent=False, window=None):
        raise TypeError("a bug in the link")

    ch.send_bulk = broken
    engine.pwrite(b"b" * RS, 3 * RS)  # no exception: landed here, kept out of sync
    assert "a bug in the link" in ch.closed
    assert rep.status()["out_of_sync_regions"] == 1 and engine.tracker.marks[3] == 1
