"""Adversarial tests of async mirroring (mirror.py, cycle_freeze.py, the tracker's retake /
release_runs, the secondary's cycle frames), on real engines with in-memory secondaries.

The tests that end in a bug fix were found by an attack round (session 6, all fixed); the
others check what held.
"""

from __future__ import annotations

import contextlib
import errno
import json
import threading
import types
import uuid as _uuid

import numpy as np
import pytest

from tests.conftest import wait_until
from volume_core.cycle_freeze import COPIED, KEEP, CycleFreeze
from volume_core.engine import Engine
from volume_core.errors import LinkError, ProtocolError, VolumeCorrupt
from volume_core.regions import load_marks
from volume_core.replication import protocol as p
from volume_core.replication.mirror import AsyncMirror
from volume_core.replication.secondary import ASYNC, SYNC, Receiver
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 64 << 10
REGIONS = 128
SIZE = RS * REGIONS
CHUNK_REGIONS = (1 << 20) // RS  # regions per cycle chunk
#: two secondaries (volume uuids)
S1, S2 = str(_uuid.uuid4()), str(_uuid.uuid4())


def chunk_pieces(frame: p.Frame) -> list[tuple[int, bytes]] | None:
    """What a cycle's chunk frame writes, as (offset, bytes) pieces; None for another frame."""
    if isinstance(frame, p.Write):
        return [(frame.offset, bytes(frame.data))]
    if isinstance(frame, p.Zero):
        return [(frame.offset, bytes(frame.length))]
    if isinstance(frame, p.WriteV):
        data, at, pieces = frame.data, 0, []
        for offset, length in frame.extents.tolist():
            pieces.append((offset, bytes(data[at:at + length])))
            at += length
        return pieces
    return None


class FakeSecondary:
    """A channel that is also the secondary: applies WRITE/ZERO chunks to ``image`` and
    acknowledges them (unless ``hold`` is set: then the acks wait in ``held``), answers
    CYCLE_COMMIT with CYCLE_ACK, and keeps a copy of its image at every commit."""

    def __init__(self, mirror: AsyncMirror, uuid: str, *, hold: bool = False) -> None:
        self.mirror = mirror
        self.reply = types.SimpleNamespace(uuid=uuid)
        self.peer_marks = None
        self.image = bytearray(SIZE)
        self.commits: dict[int, bytes] = {}
        self.begins: list[int] = []
        self.hold = hold
        self.held: list[p.Frame] = []
        self.chunks = 0
        self.closed: str | None = None
        self.lock = threading.Lock()
        self.block_bulk: threading.Event | None = None  # set: send_bulk waits, then fails
        self.in_bulk = threading.Event()

    def send_urgent(self, frame: p.Frame) -> None:
        if self.closed is not None:
            raise LinkError(f"closed: {self.closed}")
        if isinstance(frame, p.CycleBegin):
            self.begins.append(frame.seq)
        elif isinstance(frame, p.CycleCommit):
            with self.lock:
                self.commits[frame.seq] = bytes(self.image)
            self.mirror.on_frame(p.CycleAck(frame.seq))

    def send_bulk(self, frame: p.Frame, timeout: float | None = None, lent: bool = False,
                  window: int | None = None, handoff: bool = False) -> None:
        if self.block_bulk is not None:
            self.in_bulk.set()
            self.block_bulk.wait(10)
            raise LinkError("the link broke while the chunk was sent")
        if self.closed is not None:
            raise LinkError(f"closed: {self.closed}")
        pieces = chunk_pieces(frame)
        if pieces is None:
            return
        with self.lock:
            self.chunks += 1
            if self.hold:
                self.held.append((frame, pieces))
                return
            for offset, data in pieces:
                self.image[offset:offset + len(data)] = data
        self.mirror.on_frame(p.DataAck(frame.seq))

    def release(self, n: int) -> None:
        """Apply and acknowledge the first ``n`` held chunks."""
        with self.lock:
            todo, self.held = self.held[:n], self.held[n:]
            for _, pieces in todo:
                for offset, data in pieces:
                    self.image[offset:offset + len(data)] = data
        for frame, _ in todo:
            self.mirror.on_frame(p.DataAck(frame.seq))

    def close(self, reason: str = "") -> None:
        self.closed = reason


def region(data: bytes, r: int) -> bytes:
    return data[r * RS:(r + 1) * RS]


@pytest.fixture(name="engine")
def primary_engine(tmp_path):
    """A primary's engine of these tests' size (``engine``; other modules import it)."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    eng = Engine(vol)
    yield eng
    eng.close()


@contextlib.contextmanager
def mirrored(engine: Engine):
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
    try:
        yield mirror
    finally:
        mirror.close()


def pattern(byte: int, n: int = 1) -> bytes:
    return bytes([byte]) * (n * RS)


# ------------------------------------------------------------------- bugs found (fixed)


def test_run_now_during_a_take_names_a_cycle_that_holds_writes_done_before_it(engine):
    with mirrored(engine) as mirror:
        real_quiesce = engine.quiesce
        paused, resume = threading.Event(), threading.Event()

        @contextlib.contextmanager
        def quiesce(timeout=None):
            with real_quiesce(timeout):
                yield
            # the cycle thread, just after the take's quiesce: a thread switch here
            if threading.current_thread().name == "async-cycles" and not paused.is_set():
                paused.set()
                resume.wait(10)

        engine.quiesce = quiesce
        engine.pwrite(pattern(0x11), 2 * RS)
        sec = FakeSecondary(mirror, S1)
        mirror.connected(sec)  # a cycle at once (cycle 1)
        assert paused.wait(10), "the take"
        engine.pwrite(pattern(0x22), 9 * RS)  # completes: the gate is open again
        want = mirror.run_now()  # `nbdmirror sync`: must name a cycle holding region 9's write
        resume.set()
        wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
        committed = min(n for n in sec.commits if n >= want)
        assert region(sec.commits[committed], 9) == pattern(0x22), (
            f"run_now() said {want}; the secondary's image at commit {committed} lacks the "
            "write done before run_now()")


def test_a_new_secondary_mid_cycle_does_not_commit_a_cycle_it_holds_only_part_of(engine):
    data = bytes(np.random.default_rng(1).integers(1, 256, SIZE, dtype=np.uint8))
    engine.pwrite(data, 0)
    with mirrored(engine) as mirror:
        want = mirror.run_now()  # everything written so far
        assert want == 1
        old = FakeSecondary(mirror, S1, hold=True)
        mirror.connected(old)
        wait_until(lambda: old.chunks >= 2, 10, "chunks to the first secondary")
        old.release(2)  # two chunks reach the first secondary
        wait_until(lambda: mirror.progress["conveyed_regions"] >= 2 * CHUNK_REGIONS, 10,
                   "the acks")
        old.close("replaced")
        mirror.disconnected("the first secondary is gone")
        new = FakeSecondary(mirror, S2)  # another volume: it holds nothing
        mirror.connected(new)
        wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
        done = [n for n in new.commits if n >= want]
        assert done, f"the primary says cycle {want} committed; the new secondary has not"
        committed = min(done)
        missing = [r for r in range(REGIONS)
                   if region(new.commits[committed], r) != region(data, r)]
        assert not missing, (f"the new secondary committed cycle {committed} without "
                             f"regions {missing}")


def test_a_failed_volume_json_update_at_the_end_of_a_cycle_does_not_wedge_mirroring(engine):
    vol = engine.volume
    real_update = vol.update_info
    failed = []

    def update_info(**changes):
        if "cycle" in changes and not failed:
            failed.append(changes)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_update(**changes)

    vol.update_info = update_info
    engine.pwrite(pattern(0x33), 4 * RS)
    with mirrored(engine) as mirror:
        first = FakeSecondary(mirror, S1)
        mirror.connected(first)
        wait_until(lambda: failed and first.closed is not None, 10, "the failed finish")
        second = FakeSecondary(mirror, S1)  # the session dials again
        mirror.connected(second)
        wait_until(lambda: mirror.committed >= 1, 5, "cycle 1, once volume.json can be "
                   "written again")
        engine.pwrite(pattern(0x44), 6 * RS)
        want = mirror.run_now()
        wait_until(lambda: mirror.committed >= want, 5, f"cycle {want}")
        assert region(second.image, 6) == pattern(0x44)


def test_a_failure_on_the_previous_channel_does_not_disconnect_the_new_one(engine):
    engine.pwrite(pattern(0x55), 0)
    with mirrored(engine) as mirror:
        old = FakeSecondary(mirror, S1)
        old.block_bulk = threading.Event()
        mirror.connected(old)
        assert old.in_bulk.wait(10), "the cycle sending its first chunk"
        # the link breaks; the session hands over a new channel at once
        old.closed = "cut"
        mirror.disconnected("cut")
        new = FakeSecondary(mirror, S1)
        mirror.connected(new)
        old.block_bulk.set()  # now the send on the old channel fails
        wait_until(lambda: mirror.committed >= 1, 5, "cycle 1 on the new channel")
        assert mirror.state == "connected"


def test_an_open_cycle_numbered_below_the_committed_cycle_is_refused(engine):
    vol = engine.volume
    vol.update_info(cycle=5)
    freeze = CycleFreeze.create(vol, engine.fd, 1, np.ones(REGIONS, dtype=np.uint8))
    freeze.close()
    with pytest.raises(VolumeCorrupt, match="cycle"):
        AsyncMirror(engine, interval=0).close()


# --------------------------------------------------------------------------- what held


def test_a_write_racing_release_runs_keeps_its_mark_durable(engine):
    """A host write to a taken region lands while the conveyor releases that region (the
    chunk's ack): the write's mark must survive on disk (release_runs trims only regions
    neither marked nor outstanding)."""
    tracker = engine.tracker
    engine.pwrite(pattern(1, 4), 0)
    taken = tracker.swap_and_reset()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            while not stop.is_set():
                engine.pwrite(b"w" * 512, 2 * RS + 100)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    t = threading.Thread(target=writer)
    t.start()
    wait_until(lambda: engine.stats.writes >= 2, 10, "the writer")
    try:
        for r in range(4):
            tracker.release_runs([(r, r + 1)])
    finally:
        stop.set()
        t.join(10)
    assert not errors
    tracker.release(taken)
    on_disk = load_marks(engine.volume.marks_path, REGIONS)
    assert on_disk[2] == 1 and tracker.marks[2] == 1
    assert not on_disk[[0, 1, 3]].any()


def test_a_resumed_cycle_retakes_keep_regions_and_leaves_copied_ones_marked(tmp_path):
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    engine = Engine(vol)
    try:
        engine.pwrite(pattern(7, REGIONS), 0)
        taken = engine.tracker.swap_and_reset()
        freeze = CycleFreeze.create(vol, engine.fd, 1, taken)
        engine.pre_write.append(freeze.preserve)
        engine.pwrite(pattern(8), 5 * RS)  # COPIED, marked for the next cycle
        freeze.conveyed_runs([(0, 2)])
        engine.tracker.release_runs([(0, 2)])
        freeze.close()
    finally:
        engine.close()
    engine = Engine(vol)
    try:
        mirror = AsyncMirror(engine, interval=0)
        try:
            assert mirror._freeze.preserved[5] == COPIED
            assert mirror._freeze.preserved[6] == KEEP
            assert list(np.flatnonzero(engine.tracker.marks)) == [5]
            assert mirror.run_now() == 2  # cycle 1 is open
            st = mirror.status()
            assert st["state"] == "disconnected" and st["marked_regions"] == 1
        finally:
            mirror.close()
    finally:
        engine.close()


# ---- the secondary's cycle frames


@pytest.fixture
def secondary(tmp_path):
    vol = Volume.create(tmp_path / "s", SIZE, RS)
    vol.update_info(role="secondary")
    eng = Engine(vol, replica=True)
    yield eng
    eng.close()


class Out:
    def __init__(self) -> None:
        self.frames: list[p.Frame] = []

    def send_urgent(self, frame: p.Frame) -> None:
        self.frames.append(frame)

    send_bulk = send_urgent

    def flush(self) -> None:
        pass


def test_the_secondary_refuses_a_lower_commit_and_takes_an_equal_one_again(secondary):
    out = Out()
    rec = Receiver(secondary, ASYNC, out)
    rec.handle(p.CycleBegin(3))
    rec.handle(p.CycleBegin(3))  # a duplicate (a resumed cycle): harmless
    rec.handle(p.CycleCommit(3))
    assert secondary.volume.info.cycle == 3
    rec.handle(p.CycleCommit(3))  # the ack was lost with a link: the primary asks again
    assert [f.seq for f in out.frames if isinstance(f, p.CycleAck)] == [3, 3]
    with pytest.raises(ProtocolError, match="committed already"):
        rec.handle(p.CycleCommit(2))
    assert json.loads((secondary.volume.path / "volume.json").read_text())["cycle"] == 3


def test_the_secondary_refuses_a_commit_while_chunks_are_unapplied(secondary):
    out = Out()
    rec = Receiver(secondary, ASYNC, out, wake=lambda: None)  # nothing is applied
    rec.handle(p.Write(1, 0, b"x" * RS, fua=True))
    with pytest.raises(ProtocolError, match="not acknowledged"):
        rec.handle(p.CycleCommit(1))
    assert secondary.volume.info.cycle == 0


@pytest.mark.parametrize("frame", [p.CycleBegin(1), p.CycleCommit(1)])
def test_cycle_frames_are_refused_in_sync_mode(secondary, frame):
    rec = Receiver(secondary, SYNC, Out())
    with pytest.raises(ProtocolError, match="sync mode"):
        rec.handle(frame)
    assert secondary.volume.info.cycle == 0
