"""Attack round of session 8's change (dfb88c6): the secondary's applier copies ahead, in
one copy-on-write commit into the held consistent image, for the chunk it is about to
apply and the ready chunks queued behind it (up to ``PRESERVE_AHEAD`` bytes), and marks
them ``ahead`` so they do not copy ahead again.

Each test checks one property of the held image (``SnapshotView`` of ``cycle_name(N)``)
or the live replica, on real files. Tests marked xfail(strict=True) show a bug found by
this round; the others probe what held.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest

from tests.unit.test_attack_async import Out, chunk_pieces
from volume_core import native, staging
from volume_core.engine import Engine
from volume_core.replication import protocol as p
from volume_core.replication import secondary as sec
from volume_core.replication.secondary import ASYNC, FaultInjector, Receiver
from volume_core.snapshot_view import SnapshotView
from volume_core.snapshots import Snapshot, cycle_name
from volume_core.volume import Volume

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _copy_on_write_path(monkeypatch):
    """These probe chunks applied to the volume with copies on write into the held image:
    what a cycle bigger than the staging log does (a log of 0 bytes: every cycle)."""
    monkeypatch.setattr(staging, "CAPACITY", 0)

RS = 4096
REGIONS = 64
TAIL = 1536  # the last region is short: the volume is not a multiple of the region size
SIZE = RS * REGIONS + TAIL


@pytest.fixture
def replica(tmp_path):
    vol = Volume.create(tmp_path / "s", SIZE, RS)
    vol.update_info(role="secondary")
    eng = Engine(vol, replica=True)
    yield eng
    eng.close()


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return bytes(rng.integers(0, 256, n, dtype=np.uint8))


def read_all(reader, size: int = SIZE) -> bytes:
    buf = bytearray(size)
    reader.pread(buf, 0)
    return bytes(buf)


def image(engine: Engine, cycle: int) -> bytes:
    """The held consistent image of ``cycle``, as a snapshot export reads it."""
    view = SnapshotView(engine.volume, cycle_name(cycle))
    try:
        return read_all(view, engine.size)
    finally:
        view.close()


def receiver(engine: Engine, out: Out | None = None) -> Receiver:
    """A receiver whose writes wait for ``drain()`` (the applier thread's call)."""
    return Receiver(engine, ASYNC, out or Out(), wake=lambda: None)


def hold_cycle_1(rec: Receiver, rng: np.random.Generator) -> bytes:
    """Cycle 1 fills the replica with random bytes and is committed: the held image."""
    old = random_bytes(rng, rec.engine.size)
    rec.handle(p.CycleBegin(1))
    rec.handle(p.Write(1, 0, old, fua=True))
    rec.drain()
    rec.handle(p.CycleCommit(1))
    return old


def cycle_2(rec: Receiver, seed: int) -> tuple[np.random.Generator, bytes, bytearray]:
    """Cycle 1 held (``hold_cycle_1``), cycle 2 begun: (its random source, the held
    image, a model of the replica for ``send``)."""
    rng = np.random.default_rng(seed)
    old = hold_cycle_1(rec, rng)
    rec.handle(p.CycleBegin(2))
    return rng, old, bytearray(old)


def send(rec: Receiver, model: bytearray, frames: list[p.Frame]) -> None:
    """Hand frames to the receiver (not applied yet) and apply them to the model."""
    for frame in frames:
        rec.handle(frame)
        for offset, data in chunk_pieces(frame) or ():
            model[offset:offset + len(data)] = data


def no_failures(out: Out) -> None:
    failed = [f for f in out.frames if isinstance(f, p.WriteFailed)]
    assert not failed


def commits(monkeypatch) -> list[tuple[str, int]]:
    """(snapshot, regions) of every copy-on-write commit from now on."""
    seen: list[tuple[str, int]] = []
    real = Snapshot.record_preserved

    def record(self, batch):
        seen.append((self.name, sum(int(runs[:, 1].sum()) for runs in batch)))
        return real(self, batch)

    monkeypatch.setattr(Snapshot, "record_preserved", record)
    return seen


def scattered_writes(rng: np.random.Generator, count: int, first_seq: int = 2,
                     stride: int = 3) -> list[p.Frame]:
    """One-region chunks, ``stride`` regions apart."""
    return [p.Write(first_seq + i, (stride * i + 1) % REGIONS * RS, random_bytes(rng, RS),
                    fua=True) for i in range(count)]


# -- the ahead copy fails: each chunk's own copy on write must still keep the image -------

def test_a_failed_ahead_commit_leaves_each_chunk_its_own_copy(replica, monkeypatch):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 1)
    send(rec, model, scattered_writes(rng, 16))
    real = Snapshot.record_preserved
    calls: list[int] = []

    def fail_once(self, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected: store sync failed")
        return real(self, batch)

    monkeypatch.setattr(Snapshot, "record_preserved", fail_once)
    rec.drain()
    no_failures(out)
    assert len(calls) == 1 + 16  # the batch failed: each chunk then made its own commit
    assert read_all(replica) == model
    assert image(replica, 1) == old


def test_a_failed_ahead_copy_leaves_each_chunk_its_own_copy(replica, monkeypatch):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 2)
    send(rec, model, scattered_writes(rng, 12))
    real = native.copy_runs
    calls = [0]

    def copy_fails_once(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            # half copied, then the failure: what reached the store is not recorded
            src, dst, runs, region_size, limit = args[:5]
            real(src, dst, runs[:1], region_size, limit)
            raise OSError(errno.EIO, "injected: copy failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "copy_runs", copy_fails_once)
    rec.drain()
    no_failures(out)
    assert read_all(replica) == model
    assert image(replica, 1) == old


def test_an_ahead_commit_failing_after_its_map_write_still_keeps_the_image(replica,
                                                                          monkeypatch):
    """The map bytes reached the file but its sync failed: not preserved in memory, so each
    chunk copies again (from the live volume, which still holds the image's bytes)."""
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 3)
    send(rec, model, scattered_writes(rng, 10))
    real = Snapshot.record_preserved
    calls = [0]

    def written_then_failed(self, batch):
        calls[0] += 1
        real(self, batch)
        if calls[0] == 1:
            raise OSError(errno.EIO, "injected: map sync failed")

    monkeypatch.setattr(Snapshot, "record_preserved", written_then_failed)
    rec.drain()
    no_failures(out)
    assert read_all(replica) == model
    assert image(replica, 1) == old


def test_an_ahead_copy_that_fails_every_time_fails_the_chunks_not_the_image(replica,
                                                                           monkeypatch):
    """The store cannot take copies at all: chunks must not land without their copy."""
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 4)
    send(rec, model, scattered_writes(rng, 6))

    def always_fails(self, batch):
        raise OSError(errno.EIO, "injected: store sync failed")

    monkeypatch.setattr(Snapshot, "record_preserved", always_fails)
    rec.drain()
    failed = [f for f in out.frames if isinstance(f, p.WriteFailed)]
    assert len(failed) == 6
    assert read_all(replica) == old  # nothing landed
    assert image(replica, 1) == old


def test_a_chunk_failing_on_disk_after_its_ahead_copy_is_resent_and_the_image_holds(replica):
    out = Out()
    faults = FaultInjector()
    rec = Receiver(replica, ASYNC, out, wake=lambda: None, faults=faults)
    rng, old, model = cycle_2(rec, 5)
    frames = scattered_writes(rng, 8)
    send(rec, model, frames)
    faults.fail(frames[3].offset // RS)
    rec.drain()
    failed = [f.seq for f in out.frames if isinstance(f, p.WriteFailed)]
    assert failed == [frames[3].seq]
    again = frames[3]
    rec.handle(p.Write(100, again.offset, again.data, fua=True))  # the primary sends it again
    rec.drain()
    assert read_all(replica) == model
    assert image(replica, 1) == old


# -- overlapping, partial, short-region and ZERO chunks -----------------------------------

def random_frames(rng: np.random.Generator, count: int) -> list[p.Frame]:
    """Chunks at any byte offset, overlapping, some sent twice, ZEROs among them, some
    reaching the short last region."""
    frames: list[p.Frame] = []
    seq = 2
    for _ in range(count):
        pick = rng.random()
        if pick < 0.15 and frames:  # the same range again (a chunk re-sent), new bytes
            prev = frames[int(rng.integers(len(frames)))]
            offset, length = prev.offset, prev.length
        elif pick < 0.3:  # reaching the end of the volume
            length = int(rng.integers(1, 2 * RS))
            offset = SIZE - length
        else:
            offset = int(rng.integers(0, SIZE - 1))
            length = int(rng.integers(1, min(3 * RS, SIZE - offset) + 1))
        if rng.random() < 0.2:
            frames.append(p.Zero(seq, offset, length, may_trim=bool(rng.integers(2)),
                                 fua=True))
        else:
            frames.append(p.Write(seq, offset, random_bytes(rng, length), fua=True))
        seq += 1
    return frames


@pytest.mark.parametrize("limit", [None, 3 * RS, 1], ids=["32MiB", "3-regions", "1-byte"])
@pytest.mark.parametrize("seed", range(4))
def test_overlapping_unaligned_and_zero_chunks_keep_image_and_replica(
        replica, monkeypatch, seed, limit):
    if limit is not None:
        monkeypatch.setattr(sec, "PRESERVE_AHEAD", limit)
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 100 + seed)
    for _ in range(3):  # batches queued while the applier is away
        send(rec, model, random_frames(rng, 25))
        rec.drain()
        no_failures(out)
        assert read_all(replica) == model
        assert image(replica, 1) == old


def test_the_short_last_region_is_copied_ahead_whole(replica, monkeypatch):
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 6)
    seen = commits(monkeypatch)
    send(rec, model, [p.Write(2, 0, random_bytes(rng, 10), fua=True),
                      p.Write(3, SIZE - 7, random_bytes(rng, 7), fua=True),
                      p.Zero(4, SIZE - TAIL, TAIL, may_trim=True, fua=True)])
    rec.drain()
    assert seen == [(cycle_name(1), 2)]  # one commit: region 0 and the short last region
    assert read_all(replica) == model
    assert image(replica, 1) == old


def test_a_large_zero_queued_behind_is_copied_ahead_with_the_batch(replica, monkeypatch):
    """A ZERO chunk is a chunk too: its regions are copied ahead (it would copy them
    itself anyway), and a budget smaller than it still lets it through once."""
    monkeypatch.setattr(sec, "PRESERVE_AHEAD", 4 * RS)
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 7)
    seen = commits(monkeypatch)
    send(rec, model, [p.Write(2, 0, random_bytes(rng, RS), fua=True),
                      p.Zero(3, 8 * RS, 40 * RS, may_trim=False, fua=True),
                      p.Write(4, 60 * RS, random_bytes(rng, RS), fua=True)])
    rec.drain()
    assert [n for _, n in seen] == [41, 1]  # room left after chunk 2: the ZERO joins
    assert read_all(replica) == model
    assert image(replica, 1) == old


# -- the link is lost with chunks copied ahead and never applied --------------------------

def test_chunks_copied_ahead_then_lost_with_the_link_leave_the_image_and_land_later(
        replica, monkeypatch):
    rng = np.random.default_rng(8)
    out = Out()
    rec = receiver(replica, out)
    old = hold_cycle_1(rec, rng)
    rec.handle(p.CycleBegin(2))
    frames = scattered_writes(rng, 10)
    for frame in frames:
        rec.handle(frame)
    real = replica.apply_replica
    applied: list[int] = []

    def lose_link_at_first(event, mark=True):
        applied.append(event.seq)
        if len(applied) == 1:
            rec.link_lost()  # the other nine were copied ahead and now go away unapplied
        return real(event, mark)

    monkeypatch.setattr(replica, "apply_replica", lose_link_at_first)
    rec.drain()
    assert applied == [frames[0].seq]
    live = bytearray(old)
    live[frames[0].offset:frames[0].offset + RS] = bytes(frames[0].data)
    assert read_all(replica) == live
    assert image(replica, 1) == old
    before = rec.status()["writes_applied"]
    # The primary connects again, resumes cycle 2 and sends every chunk again (from 1).
    out2 = Out()
    rec.out = out2
    rec.handle(p.CycleBegin(2))
    model = bytearray(old)
    again = [p.Write(i + 1, f.offset, f.data, fua=True) for i, f in enumerate(frames)]
    send(rec, model, again)
    rec.drain()
    assert rec.status()["pending_writes"] == 0
    assert rec.status()["writes_applied"] == before + len(again)
    no_failures(out2)
    assert read_all(replica) == model
    assert image(replica, 1) == old
    rec.handle(p.CycleCommit(2))
    assert image(replica, 2) == model


def test_a_link_lost_between_the_ahead_copy_and_a_new_cycle_copies_into_the_new_image(
        replica, monkeypatch):
    """Chunks of cycle 2 copied ahead into cycle 1's image are lost with the link; the
    primary starts over and commits; cycle 3's chunks must copy into cycle 2's image."""
    rng = np.random.default_rng(9)
    rec = receiver(replica)
    old = hold_cycle_1(rec, rng)
    rec.handle(p.CycleBegin(2))
    lost = scattered_writes(rng, 6)
    for frame in lost:
        rec.handle(frame)
    real = replica.apply_replica
    n = [0]

    def lose(event, mark=True):
        n[0] += 1
        if n[0] == 1:
            rec.link_lost()
        return real(event, mark)

    monkeypatch.setattr(replica, "apply_replica", lose)
    rec.drain()
    monkeypatch.setattr(replica, "apply_replica", real)
    rec.out = Out()
    model = bytearray(old)
    model[lost[0].offset:lost[0].offset + RS] = bytes(lost[0].data)
    rec.handle(p.CycleBegin(2))
    send(rec, model, [p.Write(1, 5 * RS, random_bytes(rng, RS), fua=True)])
    rec.drain()
    rec.handle(p.CycleCommit(2))
    held = bytes(model)
    assert image(replica, 2) == held
    seen = commits(monkeypatch)
    rec.handle(p.CycleBegin(3))
    send(rec, model, [p.Write(i + 2, f.offset, random_bytes(rng, RS), fua=True)
                      for i, f in enumerate(lost)])
    rec.drain()
    assert {name for name, _ in seen} == {cycle_name(2)}
    assert read_all(replica) == model
    assert image(replica, 2) == held


# -- cycles: the ahead copies go into the newest held image ----------------------------

def test_the_next_cycles_chunks_copy_ahead_into_its_new_image(replica, monkeypatch):
    rng = np.random.default_rng(10)
    rec = receiver(replica)
    old = hold_cycle_1(rec, rng)
    model = bytearray(old)
    seq = 2
    for cycle in (2, 3, 4):
        seen = commits(monkeypatch)
        rec.handle(p.CycleBegin(cycle))
        held = bytes(model)
        frames = [p.Write(seq + i, int(r) * RS, random_bytes(rng, RS), fua=True)
                  for i, r in enumerate(rng.choice(REGIONS, 20, replace=False))]
        seq += len(frames)
        send(rec, model, frames)
        rec.drain()
        assert seen == [(cycle_name(cycle - 1), 20)]
        assert image(replica, cycle - 1) == held
        rec.handle(p.CycleCommit(cycle))
        assert image(replica, cycle) == model
        monkeypatch.undo()
    names = [s.name for s in replica.snapshots.chain]
    assert names == [cycle_name(4)]


# -- the budget --------------------------------------------------------------------------

def test_a_budget_smaller_than_one_chunk_copies_each_chunk_alone(replica, monkeypatch):
    monkeypatch.setattr(sec, "PRESERVE_AHEAD", RS // 2)
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 11)
    seen = commits(monkeypatch)
    send(rec, model, [p.Write(2 + i, 2 * i * RS, random_bytes(rng, 2 * RS), fua=True)
                      for i in range(8)])
    rec.drain()
    assert [n for _, n in seen] == [2] * 8
    assert read_all(replica) == model
    assert image(replica, 1) == old


def test_each_chunk_is_copied_once(replica, monkeypatch):
    """Chunks overlapping each other: a region is copied into the image once, whatever
    batch it falls in (a second copy would be taken of bytes a chunk already changed)."""
    monkeypatch.setattr(sec, "PRESERVE_AHEAD", 5 * RS)
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 12)
    seen = commits(monkeypatch)
    frames = [p.Write(2 + i, (i % 7) * RS + 100, random_bytes(rng, 2 * RS), fua=True)
              for i in range(30)]
    send(rec, model, frames)
    rec.drain()
    assert sum(n for _, n in seen) == 9  # regions 0..8
    assert int(replica.snapshots.newest.preserved.sum()) == 9
    assert read_all(replica) == model
    assert image(replica, 1) == old


# -- many queued chunks: the scan must stay cheap ---------------------------------------

def drain_time(tmp_path, monkeypatch, count: int, limit: int | None) -> tuple[float, int]:
    vol = Volume.create(tmp_path / f"big-{count}-{limit}", RS * (2 * count + 2), RS)
    vol.update_info(role="secondary")
    eng = Engine(vol, replica=True)
    try:
        with monkeypatch.context() as m:
            if limit is not None:
                m.setattr(sec, "PRESERVE_AHEAD", limit)
            rec = receiver(eng)
            rec.handle(p.CycleBegin(1))
            rec.handle(p.CycleCommit(1))
            rec.handle(p.CycleBegin(2))
            data = os.urandom(RS)
            for i in range(count):
                rec.handle(p.Write(i + 1, (2 * i + 1) * RS, data, fua=True))
            seen = commits(m)
            start = time.perf_counter()
            rec.drain()
            took = time.perf_counter() - start
        assert len(rec._order) == 0
        return took, len(seen)
    finally:
        eng.close()


def test_draining_thousands_of_queued_chunks_is_not_quadratic(tmp_path, monkeypatch):
    """3000 queued one-region chunks: one commit, a drain well under a second here (the
    rolling window of 32 chunks it replaced took ~2.6 s: a scan of the whole queue, and
    one commit, per chunk)."""
    took, n = drain_time(tmp_path, monkeypatch, 3000, None)
    assert n == 1
    assert took < 2.0
    small, n_small = drain_time(tmp_path, monkeypatch, 3000, 64 * RS)
    assert n_small == -(-3000 // 64)
    assert small < 2.0


# -- a reader and an applier thread, as ``nbdmirror receive`` runs them -------------------

def test_an_applier_thread_and_a_reader_keep_every_cycles_image(replica, monkeypatch):
    monkeypatch.setattr(sec, "PRESERVE_AHEAD", 6 * RS)
    rng = np.random.default_rng(13)
    wake = threading.Event()
    stop = threading.Event()
    out = Out()
    rec = Receiver(replica, ASYNC, out, wake=wake.set)
    errors: list[BaseException] = []

    def applier():
        while not stop.is_set():
            if wake.wait(0.05):
                wake.clear()
                try:
                    rec.drain()
                except BaseException as err:  # noqa: BLE001 - reported by the test
                    errors.append(err)
                    return

    thread = threading.Thread(target=applier, daemon=True)
    thread.start()
    try:
        model = bytearray(SIZE)
        seq = 1
        for cycle in range(1, 6):
            held = bytes(model)
            rec.handle(p.CycleBegin(cycle))
            frames = random_frames(rng, 60)
            renumbered: list[p.Frame] = []
            for f in frames:
                if isinstance(f, p.Write):
                    renumbered.append(p.Write(seq, f.offset, f.data, fua=True))
                else:
                    renumbered.append(p.Zero(seq, f.offset, f.length, f.may_trim, fua=True))
                seq += 1
            send(rec, model, renumbered)
            deadline = time.monotonic() + 5
            while rec.status()["pending_writes"]:  # the applier thread has applied them
                assert time.monotonic() < deadline, "chunks not applied"
                assert not errors
                time.sleep(0.002)
            if cycle > 1:
                assert image(replica, cycle - 1) == held
            rec.handle(p.CycleCommit(cycle))
            assert image(replica, cycle) == model
        assert not errors
        assert read_all(replica) == model
    finally:
        stop.set()
        thread.join(5)


def test_a_reader_of_the_held_image_sees_it_unchanged_while_a_batch_lands(replica,
                                                                        monkeypatch):
    """``serve --consistent``: an export reading the image while chunks copied ahead (in
    batches of a few regions) land under it reads the image's bytes every time."""
    monkeypatch.setattr(sec, "PRESERVE_AHEAD", 8 * RS)
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 14)
    send(rec, model, random_frames(rng, 160))
    view = SnapshotView(replica.volume, cycle_name(1))
    done = threading.Event()
    reads: list[bool] = []

    def reader():
        while not done.is_set():
            reads.append(read_all(view) == old)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        rec.drain()
    finally:
        done.set()
        thread.join(5)
        view.close()
    assert reads and all(reads)
    assert read_all(replica) == model
    assert image(replica, 1) == old
