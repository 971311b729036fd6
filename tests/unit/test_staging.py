"""The async secondary's staging log: a cycle's chunks kept apart from the volume (which
stays the consistent image) until its commit applies them; crash, resume, spill, readers."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from tests.unit.test_attack_async import Out
from tests.unit.test_attack_session8 import (
    REGIONS,
    RS,
    SIZE,
    cycle_2,
    image,
    random_bytes,
    read_all,
    receiver,
    send,
)
from volume_core import consistent, staging
from volume_core.errors import VolumeError
from volume_core.replication import protocol as p
from volume_core.replication.secondary import SYNC
from volume_core.snapshots import cycle_name
from volume_core.write_events import WRITE, ZERO

pytestmark = pytest.mark.unit


def chunks(rng: np.random.Generator, first_seq: int = 2) -> list[p.Frame]:
    """A cycle's chunks: scattered one-region writes, a three-region write, a zero run."""
    frames: list[p.Frame] = [p.Write(first_seq + i, (5 * i + 2) * RS, random_bytes(rng, RS),
                                     fua=True) for i in range(8)]
    frames.append(p.Write(first_seq + 8, 50 * RS, random_bytes(rng, 3 * RS), fua=True))
    frames.append(p.Zero(first_seq + 9, 60 * RS, 2 * RS, fua=True))
    return frames


def acked(out: Out) -> set[int]:
    return {f.seq for f in out.frames if isinstance(f, p.DataAck)}


def failed(out: Out) -> set[int]:
    return {f.seq for f in out.frames if isinstance(f, p.WriteFailed)}


def images(engine) -> list[str]:
    return [s.name for s in engine.snapshots.chain]


def fail_log_sync_once(patch, rec, what: str = "test: log fdatasync failed") -> list[bool]:
    """The next fdatasync of ``rec``'s staging log fails (EIO), once; -> a list that is
    emptied when it did. ``patch``: a monkeypatch (or its context)."""
    real, fail = os.fdatasync, [True]

    def flaky(fd):
        if fail and fd == rec._staging._fd:
            fail.pop()
            raise OSError(errno.EIO, what)
        real(fd)

    patch.setattr(os, "fdatasync", flaky)
    return fail


def fail_apply_at(patch, engine, at: int, error: BaseException) -> None:
    """``engine.apply_replica`` raises ``error`` on its ``at``-th call from now on."""
    real, calls = engine.apply_replica, []

    def failing(event, mark=True):
        calls.append(event)
        if len(calls) == at:
            raise error
        real(event, mark)

    patch.setattr(engine, "apply_replica", failing)


def test_a_cycle_is_staged_apart_and_applied_whole_at_its_commit(replica):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 1)
    frames = chunks(rng)
    send(rec, model, frames)
    rec.drain()
    assert acked(out) >= {f.seq for f in frames}  # each acknowledged once in the log
    assert read_all(replica) == old, "the volume changed before the cycle's commit"
    assert not replica.snapshots.chain[-1].preserved.any(), "copied on write while staged"
    assert image(replica, 1) == old
    rec.handle(p.CycleCommit(2, 2_000_000))
    assert read_all(replica) == model
    assert image(replica, 2) == model
    assert images(replica) == [cycle_name(2)]
    assert replica.volume.info.cycle == 2 and replica.volume.info.cycle_at == 2.0
    assert isinstance(out.frames[-1], p.CycleAck) and out.frames[-1].seq == 2
    assert rec.status()["cycles_applied"] == 1
    assert not staging.StagingLog.open(replica.volume).records  # stale: never applied again


def test_cycle_1_and_the_initial_pass_go_to_the_volume(replica):
    """No consistent image to keep yet: nothing to stage apart."""
    rec = receiver(replica)
    data = random_bytes(np.random.default_rng(2), SIZE)
    rec.handle(p.Write(1, 0, data[:RS * 10], fua=True))  # the pass: no cycle
    rec.handle(p.CycleBegin(1))
    rec.handle(p.Write(2, RS * 10, data[RS * 10:], fua=True))
    rec.drain()
    assert read_all(replica) == data and not rec._staging.records


def test_a_crash_after_the_commit_record_applies_the_cycle_at_the_next_start(replica):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 3)
    send(rec, model, chunks(rng))
    rec.drain()
    rec._staging.commit(7_000_000)  # durable, then the "crash": nothing applied
    rec._staging.close()
    assert read_all(replica) == old
    again = receiver(replica)  # the receiver starting again
    assert read_all(replica) == model
    assert image(replica, 2) == model and replica.volume.info.cycle == 2
    assert cycle_name(1) not in images(replica)
    assert again.status()["cycles_applied"] == 1
    assert not staging.StagingLog.open(replica.volume).records


def test_a_crash_mid_apply_applies_the_cycle_again(replica, monkeypatch):
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 4)
    send(rec, model, chunks(rng))
    rec.drain()
    with monkeypatch.context() as m:
        fail_apply_at(m, replica, 4, OSError(errno.EIO, "test: the disk went away mid-apply"))
        with pytest.raises(VolumeError, match="cannot apply committed cycle 2"):
            rec.handle(p.CycleCommit(2))
    rec._staging.close()
    assert replica.volume.info.cycle == 1  # not recorded: the image is not there yet
    with pytest.raises(Exception, match="being replaced by cycle 2"):
        consistent.newest_image(replica.volume)  # the old image went before the apply
    receiver(replica)
    assert read_all(replica) == model and image(replica, 2) == model


def test_a_staged_cycle_resumes_after_a_restart_without_its_acknowledged_chunks(replica):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 5)
    frames = chunks(rng)
    send(rec, model, frames[:6])
    rec.drain()
    rec._staging.close()  # the secondary dies; its six chunks were acknowledged
    rec2 = receiver(replica)
    assert len(rec2._staging.records) == 6 and rec2._staging.cycle == 2
    rec2.handle(p.CycleBegin(2))  # the primary resumes: only what was not acknowledged
    send(rec2, model, frames[6:])
    rec2.drain()
    assert read_all(replica) == old
    rec2.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


def test_a_torn_tail_ends_the_log_and_what_was_acknowledged_stays(replica):
    out = Out()
    rec = receiver(replica, out)
    rng, _old, model = cycle_2(rec, 6)
    send(rec, model, chunks(rng)[:3])
    rec.drain()
    log = rec._staging
    end = log._end
    log.append(WRITE, 0, RS, memoryview(random_bytes(rng, RS)))  # never synced, then torn:
    with open(replica.volume.path / staging.DIR / staging.LOG, "r+b") as f:
        f.seek(end + staging.BLOCK + 100)
        f.write(b"\xff" * 10)
    log.close()
    assert len(staging.StagingLog.open(replica.volume).records) == 3


def test_a_shorter_later_cycle_does_not_take_an_earlier_ones_records(replica):
    """The log is reused: behind a short cycle's records lie a longer one's, whole."""
    rec = receiver(replica)
    rng, _old, model = cycle_2(rec, 7)
    send(rec, model, chunks(rng))
    rec.drain()
    rec.handle(p.CycleCommit(2))
    rec.handle(p.CycleBegin(3))
    send(rec, model, [p.Write(20, 0, random_bytes(rng, RS), fua=True)])
    rec.drain()
    rec._staging.close()
    again = staging.StagingLog.open(replica.volume)
    assert [(r.offset, r.length) for r in again.records] == [(0, RS)]
    assert again.cycle == 3


def test_a_write_of_another_mode_spills_the_staged_chunks_first(replica):
    """A primary back in sync mode with a cycle staged: the staged chunks land first (as
    they would have without the log), copied on write into the held image, then its
    write; the log is stale from then on."""
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 8)
    send(rec, model, chunks(rng))
    rec.drain()
    rec.link_lost()
    rec.mode = SYNC
    late = random_bytes(rng, RS)
    rec.handle(p.Write(1, 2 * RS, late))  # region 2: staged already, written after
    rec.drain()
    model[2 * RS:3 * RS] = late
    assert read_all(replica) == model
    assert image(replica, 1) == old  # the held image kept through copies on write
    assert rec.status()["spills"] == 1 and not rec._staging.records
    rec._staging.close()
    assert not staging.StagingLog.open(replica.volume).records


def test_a_cycle_bigger_than_the_log_spills_and_the_image_holds(replica, monkeypatch):
    monkeypatch.setattr(staging, "CAPACITY", 6 * staging.BLOCK)  # two one-region chunks
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 9)
    send(rec, model, chunks(rng))
    rec.drain()
    assert image(replica, 1) == old
    assert rec.status()["spills"] >= 1
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model
    assert not [f for f in out.frames if isinstance(f, p.WriteFailed)]


def test_a_reader_holding_the_image_at_the_commit_keeps_its_point_in_time(replica):
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 10)
    send(rec, model, chunks(rng))
    rec.drain()
    view = consistent.open_newest(replica.volume)  # serve --consistent's connection
    try:
        rec.handle(p.CycleCommit(2))
        assert read_all(view) == old  # copied on write for it
        assert read_all(replica) == model and image(replica, 2) == model
    finally:
        view.close()
    rec.handle(p.CycleBegin(3))
    rec.handle(p.CycleCommit(3))
    assert images(replica) == [cycle_name(3)]  # let go: gone at the next commit


def test_a_reader_waits_for_an_apply_under_way(replica):
    rec = receiver(replica)
    rng, _old, model = cycle_2(rec, 11)
    send(rec, model, chunks(rng))
    rec.drain()
    got: list[bytes] = []
    with staging.applying(replica.volume):  # what the commit holds while it applies
        reader = threading.Thread(target=lambda: got.append(
            read_all(consistent.open_newest(replica.volume))), daemon=True)
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not got, "a reader chose an image during an apply"
    reader.join(10)
    assert len(got) == 1


def test_a_failed_log_sync_fails_the_chunks_since_the_last_good_one(replica, monkeypatch):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 12)
    frames = chunks(rng)
    send(rec, model, frames[:2])
    rec.drain()
    fail_log_sync_once(monkeypatch, rec)
    send(rec, model, frames[2:4])
    rec.drain()
    assert failed(out) == {frames[2].seq, frames[3].seq}
    assert len(rec._staging.records) == 2
    for frame in frames[2:4]:  # the primary sends the failed ones again
        rec.handle(frame)
    send(rec, model, frames[4:])
    rec.drain()
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model
    assert old != model


def test_records_round_trip_with_zero_runs_and_unaligned_lengths(replica):
    log = staging.StagingLog(replica.volume)
    log.begin(5)
    data = random_bytes(np.random.default_rng(13), 3 * RS + 100)
    log.append(WRITE, RS, len(data), memoryview(data))
    log.append(ZERO, 30 * RS, 4 * RS, None, may_trim=True)
    log.sync()
    log.close()
    again = staging.StagingLog.open(replica.volume)
    got = [(r.kind, r.offset, r.length, r.may_trim, bytes(d) if d is not None else None)
           for r, d in again.chunks()]
    assert got == [(WRITE, RS, len(data), False, data), (ZERO, 30 * RS, 4 * RS, True, None)]
    assert again.committed is None and again.cycle == 5
    again.close()
    assert REGIONS * RS < SIZE


def test_prepare_writes_the_log_whole_once_and_keeps_what_it_holds(replica):
    """Zeros up to its capacity (appends then overwrite written blocks), behind the records a
    previous run left, which still load."""
    rec = receiver(replica)
    rng, _old, model = cycle_2(rec, 30)
    send(rec, model, chunks(rng))
    rec.drain()
    staged = [(r.offset, r.length) for r in rec._staging.records]
    end = rec._staging._end
    rec._staging.close()
    path = replica.volume.path / "staging" / "log"
    os.truncate(path, end)  # as a log no receiver prepared (an older version) is
    before = os.stat(path).st_size
    log_ = staging.StagingLog.open(replica.volume)
    try:
        log_.prepare()
        size = os.stat(path).st_size
        assert size == log_.capacity > before
        assert os.stat(path).st_blocks * 512 >= size  # written, not a hole
        log_.prepare()  # whole already: nothing more
        assert os.stat(path).st_size == size
    finally:
        log_.close()
    again = staging.StagingLog.open(replica.volume)
    try:
        assert [(r.offset, r.length) for r in again.records] == staged
    finally:
        again.close()
