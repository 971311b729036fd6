"""The engine's replication seam: numbered events, one order for overlapping writes,
local failures reported, unsettled regions kept marked, the replica's write path."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

import volume_core.engine as engine_mod
from volume_core.engine import Engine
from volume_core.errors import ReadOnlyError, UsageError, VolumeError
from volume_core.snapshot_view import SnapshotView
from volume_core.volume import Volume
from volume_core.write_events import FLUSH, TRIM, WRITE, ZERO, WriteEvent

pytestmark = pytest.mark.unit

RS = 4096
REGIONS = 64


class Recorder:
    """A replicator that records what it is given (copying the data, as it must)."""

    def __init__(self, engine: Engine | None = None):
        self.engine = engine
        self.events: list[WriteEvent] = []
        self.settled: list[tuple[int, bool]] = []
        self.seen_at_submit: list[bytes] = []
        self.lock = threading.Lock()

    def submit(self, event):
        data = bytes(event.data) if event.data is not None else None
        if self.engine is not None and event.kind == WRITE:
            buf = bytearray(event.length)
            self.engine.pread(buf, event.offset)
            self.seen_at_submit.append(bytes(buf))
        with self.lock:
            self.events.append(WriteEvent(event.seq, event.kind, event.offset, event.length,
                                          data, event.fua, event.may_trim))
        return event.seq

    def settle(self, ticket, landed):
        with self.lock:
            self.settled.append((ticket, landed))

    def flush(self, event):
        with self.lock:
            self.events.append(event)


@pytest.fixture
def engine(tmp_path):
    e = Engine(Volume.create(tmp_path / "v", REGIONS * RS, RS))
    yield e
    e.close()


def test_every_request_gets_the_next_number_and_a_typed_event(engine):
    rec = Recorder()
    engine.attach_replicator(rec)
    engine.pwrite(b"a" * 100, 10)
    engine.trim(RS, 2 * RS)
    engine.zero(RS, 3 * RS, may_trim=False, fua=True)
    engine.flush()
    kinds = [(e.seq, e.kind, e.offset, e.length) for e in rec.events]
    assert kinds == [(1, WRITE, 10, 100), (2, TRIM, 2 * RS, RS), (3, ZERO, 3 * RS, RS),
                     (4, FLUSH, 0, 0)]
    assert rec.events[0].data == b"a" * 100 and rec.events[2].fua
    assert not rec.events[2].may_trim
    assert rec.settled == [(1, True), (2, True), (3, True)]


def test_the_data_view_is_read_only_and_submit_runs_before_the_local_write(engine):
    views = []

    class Peek(Recorder):
        def submit(self, event):
            views.append(event.data)
            return super().submit(event)

    rec = Peek(engine)
    engine.attach_replicator(rec)
    engine.pwrite(b"new!", 0)
    with pytest.raises(TypeError):
        views[0][0] = 1
    assert rec.seen_at_submit == [bytes(4)]  # sending starts alongside, not after


def test_overlapping_writes_from_many_threads_apply_in_number_order(engine):
    class Jittery(Recorder):
        """Takes its time between numbering and the local write, as a real sender may."""

        def submit(self, event):
            ticket = super().submit(event)
            time.sleep(random.random() * 0.0003)
            return ticket

    rec = Jittery()
    engine.attach_replicator(rec)
    errors = []

    def writer(k):
        rnd = random.Random(k)
        try:
            for _ in range(150):
                off = rnd.randrange(0, 3 * RS)
                data = rnd.randbytes(rnd.randrange(1, 2 * RS))
                engine.pwrite(data, off)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    shadow = bytearray(REGIONS * RS)
    for e in sorted(rec.events, key=lambda e: e.seq):
        shadow[e.offset:e.offset + e.length] = e.data
    local = bytearray(REGIONS * RS)
    engine.pread(local, 0)
    assert local == shadow
    assert sorted(e.seq for e in rec.events) == list(range(1, 8 * 150 + 1))


def test_a_write_that_fails_locally_after_submit_is_settled_as_not_landed(engine, monkeypatch):
    rec = Recorder()
    engine.attach_replicator(rec)

    def enospc(fd, buf, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine_mod, "pwrite_full", enospc)
    with pytest.raises(OSError):
        engine.pwrite(b"x" * RS, 5 * RS)
    assert rec.settled == [(1, False)]
    assert engine.tracker.marks[5] == 1  # out of sync: it stays marked
    assert engine.tracker.pending() == 0


def test_clear_keeps_a_region_whose_write_is_not_settled(engine):
    inside, release = threading.Event(), threading.Event()

    class Slow(Recorder):
        def settle(self, ticket, landed):
            if ticket == 2:  # the second write stays unsettled until released
                inside.set()
                release.wait(10)
            super().settle(ticket, landed)

    engine.attach_replicator(Slow())
    engine.pwrite(b"y" * RS, 7 * RS)  # settled: may be cleared
    t = threading.Thread(target=engine.pwrite, args=(b"z" * RS, 9 * RS))
    t.start()
    assert inside.wait(10)
    assert engine.tracker.pending() == 1
    engine.tracker.clear()
    assert np.flatnonzero(engine.tracker.marks).tolist() == [9]  # 7 cleared, 9 kept
    release.set()
    t.join(10)
    engine.tracker.clear()
    assert engine.tracker.count() == 0


def test_replication_refuses_marks_that_are_not_durable(tmp_path):
    e = Engine(Volume.create(tmp_path / "v", REGIONS * RS, RS), durable_marks=False)
    try:
        with pytest.raises(UsageError, match="durable marks"):
            e.attach_replicator(Recorder())
        assert e.replicator is None
    finally:
        e.close()


def test_detach_stops_events(engine):
    rec = Recorder()
    engine.attach_replicator(rec)
    engine.pwrite(b"1", 0)
    engine.detach_replicator()
    engine.pwrite(b"2", 0)
    assert [e.seq for e in rec.events] == [1]


def test_a_secondary_is_written_only_through_its_replica_path(tmp_path):
    vol = Volume.create(tmp_path / "v", REGIONS * RS, RS)
    vol.update_info(role="secondary")
    with pytest.raises(VolumeError, match="is a secondary"):
        Engine(vol)
    Engine(vol, readonly=True).close()
    e = Engine(vol, replica=True)
    try:
        with pytest.raises(ReadOnlyError):
            e.pwrite(b"host", 0)
        e.apply_replica(WriteEvent(1, WRITE, RS, 5, memoryview(b"hello")))
        e.apply_replica(WriteEvent(2, ZERO, 3 * RS, RS, may_trim=True))
        e.create_snapshot("before")
        e.apply_replica(WriteEvent(3, WRITE, RS, 5, memoryview(b"HELLO")))
        buf = bytearray(5)
        e.pread(buf, RS)
        assert buf == b"HELLO"
        assert np.flatnonzero(e.tracker.marks).tolist() == [1, 3]
    finally:
        e.close()
    view = SnapshotView(Volume.open(vol.path), "before")
    try:
        buf = bytearray(5)
        view.pread(buf, RS)
        assert buf == b"hello"  # copied on write, like any write
    finally:
        view.close()
