"""Attack round on session 9's staging log (``volume_core/staging.py``, the async
secondary keeping the arriving cycle's chunks apart from the volume until the commit).

Probed, on real files (a ``Crash`` BaseException stands for a power cut: nothing after
it runs in the receiver; failures are injected through os.fdatasync/os.pwritev and the
engine's methods):

- crash points in ``_apply_committed`` (after the COMMIT record, after the old image
  went, mid apply, after the volume flush, after the new image, after volume.json), and
  mid ``_spill`` followed by a restart in async or in sync mode;
- ``StagingLog.open`` on damaged or foreign files: torn header, data bit flip, a record
  running past the file end, huge/impossible length fields, unknown kinds, epoch 0, an
  applied cycle's committed log, an older longer cycle's COMMIT behind a shorter one,
  empty, zero-filled and random files, a size that is not a whole number of blocks;
- ordering: staged chunks then a direct write (sync mode, semi-async META/DATA, a
  recovery's REGION_DATA, a new primary's pass), chunks re-sent after a link loss with
  the same numbers, CYCLE_BEGIN of another cycle while one is staged, a repeated
  CYCLE_COMMIT, an empty cycle, ZERO with may_trim, unaligned lengths, the short last
  region;
- capacity: a cycle exactly at the capacity, a chunk bigger than the log, spills in the
  middle of a cycle with the rest of it landing directly (against a model);
- readers: a held view across a commit and across a crash mid apply, a reader opening
  during the apply, the "being replaced" error after a crash between the old image's
  delete and the new one;
- failures: log fdatasync (also from another thread's sweep), ENOSPC on the log, the
  COMMIT record's sync, engine.flush during the apply, the old image's delete;
- the region marks a staged cycle leaves behind.

It found four bugs, fixed in the same session (each test says so above it): a log
fdatasync failing in the sweep lost records the applier then acknowledged; a log
failing every write failed its cycle forever; a chunk after a failed apply of a
committed log hit an assert; a suspect region written whole by a staged chunk stayed
marked. The others held.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

import crc32c
import numpy as np
import pytest

from tests.unit.test_attack_async import Out
from tests.unit.test_attack_session8 import (
    RS,
    SIZE,
    TAIL,
    cycle_2,
    image,
    random_bytes,
    random_frames,
    read_all,
    receiver,
    send,
)
from tests.unit.test_staging import acked, fail_apply_at, fail_log_sync_once, failed, images
from volume_core import consistent, staging
from volume_core.errors import SnapshotError, VolumeError
from volume_core.replication import protocol as p
from volume_core.replication.secondary import (
    ASYNC,
    SEMI_ASYNC,
    SYNC,
    FaultInjector,
    Receiver,
)
from volume_core.snapshots import cycle_name
from volume_core.write_events import WRITE, ZERO, WriteEvent

pytestmark = pytest.mark.unit

BLOCK = staging.BLOCK


class Crash(BaseException):
    """A simulated power cut: not an OSError, so no handler of the receiver takes it."""


def log_path(engine) -> os.PathLike:
    return engine.volume.path / staging.DIR / staging.LOG


def one_region_chunks(rng: np.random.Generator, regions: list[int], first_seq: int = 2
                      ) -> list[p.Frame]:
    return [p.Write(first_seq + i, r * RS, random_bytes(rng, RS), fua=True)
            for i, r in enumerate(regions)]


def ten_chunks(rng: np.random.Generator, first_seq: int = 2) -> list[p.Frame]:
    """Scattered one-region writes, a three-region write, a zero run (10 records)."""
    frames = one_region_chunks(rng, [5 * i + 2 for i in range(8)], first_seq)
    frames.append(p.Write(first_seq + 8, 50 * RS, random_bytes(rng, 3 * RS), fua=True))
    frames.append(p.Zero(first_seq + 9, 60 * RS, 2 * RS, fua=True))
    return frames


def restart(rec: Receiver, mode: str = ASYNC, out: Out | None = None) -> Receiver:
    """The secondary's process dies (its log fd with it) and a new receiver starts."""
    rec._staging.close()
    return Receiver(rec.engine, mode, out or Out(), wake=lambda: None)


def staged_cycle_2(replica, seed: int):
    """Cycle 1 held, cycle 2's ten chunks staged and acknowledged: (rec, out, rng, old,
    model)."""
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, seed)
    frames = ten_chunks(rng)
    send(rec, model, frames)
    rec.drain()
    assert acked(out) >= {f.seq for f in frames}
    assert read_all(replica) == old
    return rec, out, rng, old, model


def later_cycle_works(rec: Receiver, model: bytearray, number: int, seed: int) -> None:
    """Cycle ``number`` is staged and committed on top of ``model`` (the volume now)."""
    rng = np.random.default_rng(seed)
    before = bytes(model)
    rec.handle(p.CycleBegin(number))
    frames = [p.Write(1, 3 * RS + 10, random_bytes(rng, RS), fua=True),
              p.Zero(2, 40 * RS, RS + 7, may_trim=True, fua=True),
              p.Write(3, SIZE - 100, random_bytes(rng, 100), fua=True)]
    send(rec, model, frames)
    rec.drain()
    assert read_all(rec.engine) == before
    rec.handle(p.CycleCommit(number, number * 1_000_000))
    assert read_all(rec.engine) == model
    assert image(rec.engine, number) == model
    assert rec.engine.volume.info.cycle == number
    assert images(rec.engine) == [cycle_name(number)]


# -- 1. crash points --------------------------------------------------------------------

def _crash_at(point: str, replica, m: pytest.MonkeyPatch) -> None:
    """Make the next ``_apply_committed`` die at ``point``."""
    if point == "after-commit-record":
        def refuse(*_a, **_k):
            raise Crash()
        m.setattr(staging, "applying", refuse)
        return
    if point in ("after-old-image-dropped", "mid-apply"):
        fail_apply_at(m, replica, 1 if point == "after-old-image-dropped" else 5, Crash())
        return
    target, name = {"after-flush": (replica, "flush"),
                    "after-new-image": (replica, "create_snapshot"),
                    "after-volume-json": (replica.volume, "update_info")}[point]
    real = getattr(target, name)

    def then_crash(*args, **kwargs):
        real(*args, **kwargs)
        raise Crash()
    m.setattr(target, name, then_crash)


@pytest.mark.parametrize("point", ["after-commit-record", "after-old-image-dropped",
                                   "mid-apply", "after-flush", "after-new-image",
                                   "after-volume-json"])
def test_a_crash_at_every_step_of_the_apply_ends_in_the_committed_cycle(
        replica, monkeypatch, point):
    rec, _out, _rng, _old, model = staged_cycle_2(replica, 1)
    with monkeypatch.context() as m:
        _crash_at(point, replica, m)
        with pytest.raises(Crash):
            rec.handle(p.CycleCommit(2, 2_000_000))
    again = restart(rec)
    assert read_all(replica) == model
    assert image(replica, 2) == model
    assert replica.volume.info.cycle == 2 and replica.volume.info.cycle_at == 2.0
    assert images(replica) == [cycle_name(2)]
    assert consistent.newest_image(replica.volume) == cycle_name(2)
    assert not again._staging.records and again._staging.committed is None
    # the primary did not get its CYCLE_ACK: it asks again, then goes on
    out = Out()
    again.out = out
    again.handle(p.CycleCommit(2, 2_000_000))
    assert [f.seq for f in out.frames if isinstance(f, p.CycleAck)] == [2]
    assert read_all(replica) == model and image(replica, 2) == model
    later_cycle_works(again, model, 3, 11)


def test_a_crash_twice_mid_apply_still_ends_in_the_cycle(replica, monkeypatch):
    """The replay at start dies too (mid apply, the new image not there): a third start
    finishes it."""
    rec, _out, _rng, _old, model = staged_cycle_2(replica, 2)
    with monkeypatch.context() as m:
        _crash_at("mid-apply", replica, m)
        with pytest.raises(Crash):
            rec.handle(p.CycleCommit(2))
    rec._staging.close()
    with monkeypatch.context() as m:
        _crash_at("after-new-image", replica, m)
        with pytest.raises(Crash):
            receiver(replica)
    # (the constructor died: its log fd leaked with it, as a dead process's would go)
    third = receiver(replica)
    assert read_all(replica) == model and image(replica, 2) == model
    assert replica.volume.info.cycle == 2
    later_cycle_works(third, model, 3, 12)


def _crash_mid_spill(replica, monkeypatch, seed: int):
    """A log of six blocks: chunks A (region 2) and B (region 7) are staged, C (region 12)
    does not fit and spills them, and the receiver dies in the spill: A landed, B did not,
    the log stays valid."""
    monkeypatch.setattr(staging, "CAPACITY", 6 * BLOCK)
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, seed)
    a, b, c = one_region_chunks(rng, [2, 7, 12])
    send(rec, model, [a, b])
    rec.drain()
    assert acked(out) >= {a.seq, b.seq} and len(rec._staging.records) == 2
    with monkeypatch.context() as m:
        fail_apply_at(m, replica, 2, Crash())
        rec.handle(c)
        with pytest.raises(Crash):
            rec.drain()
    return rec, rng, old, model, c


def test_a_crash_mid_spill_then_the_cycle_resumes_in_async(replica, monkeypatch):
    rec, rng, old, model, c = _crash_mid_spill(replica, monkeypatch, 3)
    live = bytearray(old)
    live[2 * RS:3 * RS] = model[2 * RS:3 * RS]
    assert read_all(replica) == live
    rec2 = restart(rec)
    assert len(rec2._staging.records) == 2 and rec2._staging.cycle == 2
    assert image(replica, 1) == old, "the held image lost what the spill overwrote"
    out = Out()
    rec2.out = out
    rec2.handle(p.CycleBegin(2))
    d = p.Write(2, 20 * RS, random_bytes(rng, RS), fua=True)
    model[c.offset:c.offset + RS] = bytes(c.data)
    send(rec2, model, [p.Write(1, c.offset, c.data, fua=True), d])  # renumbered from 1
    rec2.drain()
    assert acked(out) == {1, 2} and not failed(out)
    assert image(replica, 1) == old
    assert not rec2._staging.records  # C spilled A and B again; C and D landed directly
    assert rec2.status()["spills"] == 1
    rec2.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model
    assert images(replica) == [cycle_name(2)]
    later_cycle_works(rec2, model, 3, 13)


def test_a_crash_mid_spill_then_a_restart_in_sync_mode(replica, monkeypatch):
    rec, rng, old, model, c = _crash_mid_spill(replica, monkeypatch, 4)
    out = Out()
    rec2 = restart(rec, SYNC, out)
    late = random_bytes(rng, RS)
    rec2.handle(p.Write(1, 7 * RS, late))  # B's region: B lands first, then this
    rec2.drain()
    assert acked(out) == {1}
    model[7 * RS:8 * RS] = late  # (model holds A and B already; C was never acked)
    assert read_all(replica) == model
    assert image(replica, 1) == old
    rec2._staging.close()
    assert not staging.StagingLog.open(replica.volume).records  # invalidated


# -- 2. parsing the log -----------------------------------------------------------------

def forge(epoch: int, cycle: int, code: int, offset: int, length: int, dcrc: int = 0,
          magic: bytes = staging.MAGIC) -> bytes:
    """A record header whose own CRC is right."""
    block = bytearray(BLOCK)
    staging._HEADER.pack_into(block, 0, magic, epoch, cycle, code, 0, offset, length, 0,
                              dcrc, 0)
    hcrc = crc32c.crc32c(block[:staging._HEADER.size - 4])
    staging._HEADER.pack_into(block, 0, magic, epoch, cycle, code, 0, offset, length, 0,
                              dcrc, hcrc)
    return bytes(block)


def three_records(replica, cycle: int = 5, seed: int = 20) -> list[bytes]:
    """A log of cycle ``cycle``: three one-region writes (synced), closed."""
    rng = np.random.default_rng(seed)
    log = staging.StagingLog(replica.volume)
    log.begin(cycle)
    datas = [random_bytes(rng, RS) for _ in range(3)]
    for i, d in enumerate(datas):
        log.append(WRITE, i * 10 * RS, RS, memoryview(d))
    log.sync()
    log.close()
    return datas


def reopen(replica) -> staging.StagingLog:
    log = staging.StagingLog.open(replica.volume)
    try:
        return log
    finally:
        log.close()


def patch_file(path, pos: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(data)


def test_a_torn_second_header_keeps_the_first_record(replica):
    three_records(replica)
    patch_file(log_path(replica), 2 * BLOCK + 40, b"\x00\x01\x02")
    log = reopen(replica)
    assert [r.offset for r in log.records] == [0] and log.committed is None


def test_a_bit_flip_in_the_data_ends_the_log_there(replica):
    three_records(replica)
    path = log_path(replica)
    with open(path, "r+b") as f:
        f.seek(3 * BLOCK + 1000)  # the second record's data
        byte = f.read(1)
        f.seek(3 * BLOCK + 1000)
        f.write(bytes([byte[0] ^ 0x10]))
    assert [r.offset for r in reopen(replica).records] == [0]


def test_a_record_running_past_the_file_end_ends_the_log(replica):
    three_records(replica)
    os.truncate(log_path(replica), 5 * BLOCK + 100)  # the third record's data cut
    log = reopen(replica)
    assert [r.offset for r in log.records] == [0, 10 * RS]
    assert log._end == 4 * BLOCK  # the next record goes over the cut one


@pytest.mark.parametrize("header", [
    forge(7, 5, 1, 0, 1 << 62),  # a huge length
    forge(7, 5, 1, 0, SIZE),  # a length inside the volume, past the file end
    forge(7, 5, 2, SIZE - 10, 11),  # a ZERO past the volume's end
    forge(7, 5, 1, (1 << 64) - 1, 1),  # an offset at the top of its field
    forge(7, 5, 7, 0, RS),  # an unknown kind
    forge(0, 5, 9, 0, 0),  # epoch 0 (a zeroed-out log's first header has none)
    forge(7, 5, 1, 0, RS, magic=b"NBDMSTG0"),  # another format
], ids=["huge-length", "past-file-end", "zero-past-volume", "top-offset", "unknown-kind",
        "epoch-0", "other-magic"])
def test_impossible_headers_with_a_right_crc_end_the_log(replica, header):
    path = log_path(replica)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(header + bytes(2 * BLOCK))
    log = reopen(replica)
    assert not log.records and log.cycle is None and log.committed is None


@pytest.mark.parametrize("seed", range(4))
def test_random_zero_and_empty_files_are_an_empty_log(replica, seed):
    rng = np.random.default_rng(seed)
    path = log_path(replica)
    path.parent.mkdir(exist_ok=True)
    for content in (b"", bytes(1 << 20), random_bytes(rng, 1 << 20),
                    random_bytes(rng, 3 * BLOCK + 17), staging.MAGIC * 512):
        path.write_bytes(content)
        log = reopen(replica)
        assert not log.records and log.cycle is None and log.committed is None
    rec = receiver(replica)  # and a receiver starts on it, touching nothing
    assert read_all(replica) == bytes(SIZE)
    rec._staging.close()


def test_garbage_behind_whole_records_is_not_a_record(replica):
    three_records(replica)
    rng = np.random.default_rng(21)
    with open(log_path(replica), "ab") as f:
        f.write(random_bytes(rng, 5 * BLOCK + 333))
    assert len(reopen(replica).records) == 3


def test_a_committed_log_of_an_applied_cycle_is_never_applied_again(replica):
    """A crash after volume.json took cycle 5 leaves its committed log; newer data went
    to the volume since (a direct write): a start must not put the log over it."""
    three_records(replica, cycle=5)
    log = staging.StagingLog.open(replica.volume)
    log.commit(5_000_000)
    log.close()
    assert reopen(replica).committed is not None
    for cycle in (5, 6):
        replica.volume.update_info(cycle=cycle)
        newer = random_bytes(np.random.default_rng(cycle), SIZE)
        replica.apply_replica(WriteEvent(1, WRITE, 0, SIZE, memoryview(newer)))
        log = reopen(replica)
        assert not log.records and log.committed is None
        rec = receiver(replica)
        assert read_all(replica) == newer and replica.volume.info.cycle == cycle
        rec._staging.close()


def test_an_older_longer_cycles_commit_behind_a_shorter_one_is_not_its_commit(replica):
    """Cycle 2 (two one-region records, COMMIT at 16 KiB) is applied; cycle 3's first record
    (three regions) ends exactly at 16 KiB, where cycle 2's COMMIT record lies, whole."""
    rng = np.random.default_rng(22)
    log = staging.StagingLog(replica.volume)
    log.begin(2)
    for i in range(2):
        log.append(WRITE, i * RS, RS, memoryview(random_bytes(rng, RS)))
    log.sync()
    log.commit(1)
    assert log._end == 5 * BLOCK
    replica.volume.update_info(cycle=2)
    log.reset()
    log.begin(3)
    log.append(WRITE, 30 * RS, 3 * RS, memoryview(random_bytes(rng, 3 * RS)))
    log.sync()
    assert log._end == 4 * BLOCK  # cycle 2's COMMIT header is the next block
    log.close()
    again = reopen(replica)
    assert again.cycle == 3 and [r.offset for r in again.records] == [30 * RS]
    assert again.committed is None


def test_a_zeroed_first_header_hides_a_whole_committed_log(replica):
    """What ``invalidate`` leaves: every other record of the log still whole behind it."""
    three_records(replica)
    log = staging.StagingLog.open(replica.volume)
    log.commit(1)
    log.invalidate()
    log.close()
    log = reopen(replica)
    assert not log.records and log.committed is None


# -- 3. ordering --------------------------------------------------------------------------

def test_staged_chunks_land_before_a_semi_async_write_to_their_region(replica):
    rec, _out, rng, old, model = staged_cycle_2(replica, 30)
    rec.link_lost()
    rec.mode = SEMI_ASYNC
    out = Out()
    rec.out = out
    late = random_bytes(rng, RS + 5)
    rec.handle(p.Meta(1, 7 * RS - 5, RS + 5))
    rec.handle(p.Data(1, 7 * RS - 5, late))
    rec.drain()
    model[7 * RS - 5:8 * RS] = late
    assert acked(out) == {1}
    assert read_all(replica) == model
    assert image(replica, 1) == old


def test_a_recovery_answer_lands_after_the_staged_chunks_of_its_region(replica):
    """Sync mode after async: a write fails, the recovery's REGION_DATA comes; the chunk
    staged in that region must land before it, not over it."""
    faults = FaultInjector()
    out = Out()
    rec = Receiver(replica, ASYNC, out, wake=lambda: None, faults=faults)
    rng, old, model = cycle_2(rec, 31)
    send(rec, model, one_region_chunks(rng, [4, 9]))
    rec.drain()
    rec.link_lost()
    rec.mode = SYNC
    faults.fail(4)
    rec.handle(p.Write(1, 4 * RS, random_bytes(rng, RS)))
    rec.drain()
    asks = [f for f in out.frames if isinstance(f, p.ReadRegion)]
    assert failed(out) == {1} and len(asks) == 1
    primary_has = random_bytes(rng, RS)
    rec.handle(p.RegionData(asks[0].seq, asks[0].offset, primary_has))
    rec.drain()
    model[4 * RS:5 * RS] = primary_has
    assert read_all(replica) == model
    assert image(replica, 1) == old


def test_a_new_primarys_pass_after_a_restart_spills_first(replica):
    rec, _out, rng, old, model = staged_cycle_2(replica, 32)
    rec2 = restart(rec)
    assert rec2.cycle_in_progress is None
    pass_data = random_bytes(rng, 4 * RS)
    send(rec2, model, [p.Write(1, 1 * RS, pass_data, fua=True)])  # no CYCLE_BEGIN
    rec2.drain()
    assert read_all(replica) == model
    assert image(replica, 1) == old
    rec2.handle(p.CycleBegin(2))
    rec2.handle(p.CycleCommit(2))
    assert image(replica, 2) == model


def test_a_new_primarys_pass_on_the_same_receiver_lands_after_the_staged_chunks(replica):
    """The link is lost mid-cycle; a new primary's pass (no CYCLE_BEGIN: the receiver
    still has cycle 2 in progress) overwrites staged regions; then cycle 2 commits."""
    rec, _out, rng, old, model = staged_cycle_2(replica, 33)
    rec.link_lost()
    rec.out = Out()
    send(rec, model, [p.Write(1, 1 * RS, random_bytes(rng, 4 * RS), fua=True),
                      p.Zero(2, 50 * RS, RS, may_trim=True, fua=True)])
    rec.drain()
    assert image(replica, 1) == old
    rec.handle(p.CycleBegin(2))
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


def test_chunks_resent_with_the_same_numbers_after_a_link_loss(replica):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 34)
    frames = ten_chunks(rng, first_seq=1)
    send(rec, model, frames)
    real = rec._staging.append
    calls = [0]

    def lose_link_at_third(*args, **kwargs):
        calls[0] += 1
        generation = real(*args, **kwargs)
        if calls[0] == 3:
            rec.link_lost()
        return generation

    rec._staging.append = lose_link_at_third
    rec.drain()
    del rec._staging.append
    assert len(rec._staging.records) == 3
    out2 = Out()
    rec.out = out2
    rec.handle(p.CycleBegin(2))
    send(rec, model, frames)  # the restarted primary sends all again, numbered from 1
    rec.drain()
    assert acked(out2) == {f.seq for f in frames} and not failed(out2)
    assert read_all(replica) == old
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


def test_another_cycle_begun_while_one_is_staged_spills_it_into_the_held_image(replica):
    rec, _out, rng, old, model = staged_cycle_2(replica, 35)
    rec.handle(p.CycleBegin(3))  # the primary gave cycle 2 up and took 3 (2's regions too)
    send(rec, model, one_region_chunks(rng, [2, 40], first_seq=100))
    rec.drain()
    assert rec.status()["spills"] == 1
    assert rec._staging.cycle == 3 and len(rec._staging.records) == 2
    assert image(replica, 1) == old
    rec.handle(p.CycleCommit(3))
    assert read_all(replica) == model and image(replica, 3) == model
    assert images(replica) == [cycle_name(3)]


def test_a_commit_of_another_cycle_with_nothing_of_its_own_spills_the_staged_one(replica):
    rec, _out, _rng, _old, model = staged_cycle_2(replica, 36)
    rec.handle(p.CycleBegin(3))
    rec.handle(p.CycleCommit(3))
    assert read_all(replica) == model and image(replica, 3) == model
    assert replica.volume.info.cycle == 3 and not rec._staging.records


def test_a_repeated_commit_after_its_ack_was_lost_changes_nothing(replica):
    rec, out, _rng, _old, model = staged_cycle_2(replica, 37)
    rec.handle(p.CycleCommit(2, 5_000_000))
    applied = rec.status()["cycles_applied"]
    rec.link_lost()
    rec.handle(p.CycleBegin(2))
    rec.handle(p.CycleCommit(2, 5_000_000))
    assert [f.seq for f in out.frames if isinstance(f, p.CycleAck)] == [1, 2, 2]
    assert rec.status()["cycles_applied"] == applied
    assert read_all(replica) == model and image(replica, 2) == model
    assert images(replica) == [cycle_name(2)]
    later_cycle_works(rec, model, 3, 14)


def test_an_empty_cycle_keeps_the_image_as_it_is(replica):
    rec = receiver(replica)
    _rng, old, _model = cycle_2(rec, 38)
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == old and image(replica, 2) == old
    assert images(replica) == [cycle_name(2)] and replica.volume.info.cycle == 2


def test_zero_may_trim_unaligned_and_the_short_last_region_through_the_log(replica):
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 39)
    send(rec, model, [p.Write(2, SIZE - TAIL + 3, random_bytes(rng, TAIL - 3), fua=True),
                      p.Zero(3, SIZE - 2 * RS, 2 * RS, may_trim=True, fua=True),
                      p.Write(4, SIZE - 1, b"\x7f", fua=True),
                      p.Write(5, 1, random_bytes(rng, RS + 1), fua=True),
                      p.Zero(6, RS + 1, 17, may_trim=True, fua=True),
                      p.Zero(7, 0, RS, may_trim=False, fua=True)])
    rec.drain()
    assert read_all(replica) == old
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


def renumbered(frames: list[p.Frame], first: int) -> list[p.Frame]:
    out: list[p.Frame] = []
    for i, f in enumerate(frames):
        if isinstance(f, p.Write):
            out.append(p.Write(first + i, f.offset, f.data, fua=True))
        else:
            out.append(p.Zero(first + i, f.offset, f.length, f.may_trim, fua=True))
    return out


@pytest.mark.parametrize("capacity", [None, 8 * BLOCK, 3 * BLOCK],
                         ids=["default", "8-blocks", "3-blocks"])
@pytest.mark.parametrize("seed", range(3))
def test_random_cycles_through_the_log_match_a_model(replica, monkeypatch, capacity, seed):
    """Overlapping, unaligned, ZERO chunks, the tail region; a log big enough, one that
    spills in the middle of each cycle and stages again after, one that holds one
    region-sized chunk at a time."""
    if capacity is not None:
        monkeypatch.setattr(staging, "CAPACITY", capacity)
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 200 + seed)
    seq = 2
    for number in (2, 3, 4):
        if number > 2:
            rec.handle(p.CycleBegin(number))
        held = bytes(model)
        frames = renumbered(random_frames(rng, 30), seq)
        seq += len(frames)
        for batch in (frames[:12], frames[12:]):
            send(rec, model, batch)
            rec.drain()
            assert image(replica, number - 1) == held
        assert not failed(out)
        rec.handle(p.CycleCommit(number))
        assert read_all(replica) == model, f"cycle {number}"
        assert image(replica, number) == model
        assert images(replica) == [cycle_name(number)]
    assert old != bytes(model)


# -- 4. capacity --------------------------------------------------------------------------

def test_a_cycle_exactly_at_the_capacity_is_staged_whole(replica, monkeypatch):
    """Two one-region records (4 blocks) and the COMMIT: five blocks, the capacity."""
    monkeypatch.setattr(staging, "CAPACITY", 5 * BLOCK)
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 40)
    send(rec, model, one_region_chunks(rng, [3, 8]))
    rec.drain()
    assert len(rec._staging.records) == 2 and read_all(replica) == old
    rec.handle(p.CycleCommit(2))
    assert rec.status()["spills"] == 0
    assert os.path.getsize(log_path(replica)) == 5 * BLOCK
    assert read_all(replica) == model and image(replica, 2) == model


def test_one_block_over_the_capacity_spills(replica, monkeypatch):
    monkeypatch.setattr(staging, "CAPACITY", 5 * BLOCK)
    rec = receiver(replica)
    rng, old, model = cycle_2(rec, 41)
    send(rec, model, one_region_chunks(rng, [3, 8]) + [
        p.Write(4, 9 * RS, random_bytes(rng, 1), fua=True)])
    rec.drain()
    assert rec.status()["spills"] == 1 and not rec._staging.records
    assert image(replica, 1) == old
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


def test_a_chunk_bigger_than_the_log_lands_directly_and_the_image_holds(replica,
                                                                      monkeypatch):
    monkeypatch.setattr(staging, "CAPACITY", 4 * BLOCK)
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 42)
    send(rec, model, [p.Write(2, 10 * RS, random_bytes(rng, 3 * RS), fua=True)])
    rec.drain()
    assert not rec._staging.records and rec.status()["spills"] == 0
    assert acked(out) >= {2}
    assert image(replica, 1) == old
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


def test_the_rest_of_a_cycle_that_spilled_lands_directly_and_survives_a_crash(
        replica, monkeypatch):
    monkeypatch.setattr(staging, "CAPACITY", 6 * BLOCK)
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 43)
    # 1 and 2 staged; 3 does not fit: spills them, lands directly, and so do 5 and 6 (the
    # rest of a cycle that spilled streams through copies on write)
    frames = one_region_chunks(rng, [1, 2, 3]) + [
        p.Write(5, 2 * RS, random_bytes(rng, 2 * RS), fua=True)] + one_region_chunks(
        rng, [3], first_seq=6)
    send(rec, model, frames)
    rec.drain()
    assert not failed(out) and rec.status()["spills"] == 1
    assert not rec._staging.records
    assert image(replica, 1) == old and read_all(replica) == model
    rec2 = restart(rec)
    assert not rec2._staging.records  # the spill made the log stale
    assert image(replica, 1) == old
    rec2.handle(p.CycleBegin(2))
    rec2.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


# -- 5. readers ---------------------------------------------------------------------------

def test_a_reader_holding_the_image_keeps_it_across_a_crash_mid_apply(replica,
                                                                     monkeypatch):
    rec, _out, _rng, old, model = staged_cycle_2(replica, 50)
    view = consistent.open_newest(replica.volume)
    try:
        with monkeypatch.context() as m:
            _crash_at("mid-apply", replica, m)
            with pytest.raises(Crash):
                rec.handle(p.CycleCommit(2))
        assert read_all(view) == old
        other = consistent.open_newest(replica.volume)  # a new reader meanwhile
        try:
            assert other.name == cycle_name(1) and read_all(other) == old
        finally:
            other.close()
        rec2 = restart(rec)
        assert read_all(view) == old
        assert read_all(replica) == model and image(replica, 2) == model
    finally:
        view.close()
    rec2.handle(p.CycleBegin(3))
    rec2.handle(p.CycleCommit(3))
    assert images(replica) == [cycle_name(3)]


def test_a_reader_opening_during_the_apply_waits_and_gets_the_new_image(replica,
                                                                       monkeypatch):
    rec, _out, _rng, _old, model = staged_cycle_2(replica, 51)
    trying = threading.Event()
    got: list[tuple[str, bytes]] = []
    errors: list[BaseException] = []
    real_flock = staging.try_flock

    def flock_seen(fd, how, tries=20):
        if how == fcntl.LOCK_SH:
            trying.set()
        return real_flock(fd, how, tries)

    def read_newest():
        try:
            view = consistent.open_newest(replica.volume)
            try:
                got.append((view.name, read_all(view)))
            finally:
                view.close()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    reader = threading.Thread(target=read_newest, daemon=True)
    real_apply, calls = replica.apply_replica, []

    def apply(event, mark=True):
        calls.append(event)
        if len(calls) == 3:  # mid apply: the reader comes and must wait
            reader.start()
            assert trying.wait(5)
            with pytest.raises(Exception, match="applying a cycle"):
                with staging.applying(replica.volume, shared=True, timeout=0.001):
                    pass
            assert not got and not errors
        real_apply(event, mark)

    monkeypatch.setattr(staging, "try_flock", flock_seen)
    monkeypatch.setattr(replica, "apply_replica", apply)
    rec.handle(p.CycleCommit(2))
    reader.join(10)
    assert not errors and got == [(cycle_name(2), bytes(model))]


def test_between_the_old_images_delete_and_the_new_one_readers_are_refused(replica,
                                                                          monkeypatch):
    rec, _out, _rng, _old, model = staged_cycle_2(replica, 52)
    with monkeypatch.context() as m:
        _crash_at("after-flush", replica, m)  # the volume is cycle 2, no image names it
        with pytest.raises(Crash):
            rec.handle(p.CycleCommit(2))
    assert images(replica) == [] and replica.volume.info.cycle == 1
    with pytest.raises(SnapshotError, match="being replaced by cycle 2"):
        consistent.newest_image(replica.volume)
    with pytest.raises(SnapshotError, match="being replaced by cycle 2"):
        consistent.open_newest(replica.volume)
    restart(rec)
    view = consistent.open_newest(replica.volume)
    try:
        assert view.name == cycle_name(2) and read_all(view) == model
    finally:
        view.close()


# -- 6. failures --------------------------------------------------------------------------

def test_a_failed_log_sync_then_the_resent_chunks_and_a_restart(replica, monkeypatch):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 60)
    frames = ten_chunks(rng)
    send(rec, model, frames[:3])
    rec.drain()
    fail_log_sync_once(monkeypatch, rec)
    send(rec, model, frames[3:7])
    rec.drain()
    assert failed(out) == {f.seq for f in frames[3:7]}
    assert len(rec._staging.records) == 3
    rec2 = restart(rec)  # the failed ones may be on disk after the good ones: same cycle
    out2 = Out()
    rec2.out = out2
    rec2.handle(p.CycleBegin(2))
    send(rec2, model, renumbered(frames[3:], 1))
    rec2.drain()
    assert not failed(out2)
    assert read_all(replica) == old
    rec2.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


class SweepBeforeApply(FaultInjector):
    """The link's timer runs ``sweep()`` just before the applier's ``at``-th apply (so
    between the earlier chunks' staging and their acknowledgement)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0
        self.rec: Receiver | None = None

    def check(self, first: int, stop: int) -> None:
        self.calls += 1
        if self.calls == self.at and self.rec is not None:
            self.rec.sweep()
        super().check(first, stop)


# Was a bug (fixed): the sweep's failed log sync lost records the applier then acked.
def test_a_log_sync_failing_in_the_sweep_does_not_acknowledge_the_lost_chunks(
        replica, monkeypatch):
    out = Out()
    faults = SweepBeforeApply(at=3)
    rec = Receiver(replica, ASYNC, out, wake=lambda: None, faults=faults)
    rng, _old, model = cycle_2(rec, 61)
    faults.calls = 0
    faults.rec = rec
    frames = ten_chunks(rng)
    fail = fail_log_sync_once(monkeypatch, rec, "test: log fdatasync failed (in the sweep)")
    send(rec, model, frames)
    rec.drain()
    assert not fail, "the sweep's log sync was not reached"
    lost = {f.seq for f in frames[:2]}
    # Either the two chunks staged before the failed sync are answered WRITE_FAILED
    # (and sent again), or they are still in the log:
    answered_ok = lost & acked(out)
    if answered_ok:
        rec.handle(p.CycleCommit(2))
        assert read_all(replica) == model, "acknowledged chunks are missing"


def test_enospc_on_the_log_fails_the_chunk_and_the_rest_of_its_cycle_lands_directly(
        replica, monkeypatch):
    """A log that failed a write is not used again in that cycle (a full filesystem would
    fail every resend: see the next test): what it staged spills, and the rest of the cycle
    lands on the volume, copied on write into the held image."""
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 62)
    frames = ten_chunks(rng)
    real_pwritev, hits = os.pwritev, [0]

    def full_once(fd, parts, pos):
        if fd == rec._staging._fd and pos > 0 and not hits[0]:
            hits[0] += 1
            raise OSError(errno.ENOSPC, "test: no space left for the log")
        return real_pwritev(fd, parts, pos)

    monkeypatch.setattr(os, "pwritev", full_once)
    send(rec, model, frames)
    rec.drain()
    assert failed(out) == {frames[1].seq}
    assert not rec._staging.records and rec.status()["spills"] == 1
    rec.handle(p.Write(100, frames[1].offset, frames[1].data, fua=True))
    rec.drain()
    assert 100 in acked(out) and image(replica, 1) == old
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


# Was a bug (fixed): a log failing every write failed the cycle's chunks forever.
def test_a_log_that_cannot_grow_does_not_fail_the_cycle_forever(replica, monkeypatch):
    out = Out()
    rec = receiver(replica, out)
    rng, _old, model = cycle_2(rec, 63)
    chunk = one_region_chunks(rng, [6])[0]
    real_pwritev = os.pwritev

    def full(fd, parts, pos):
        if fd == rec._staging._fd:
            raise OSError(errno.ENOSPC, "test: no space left for the log")
        return real_pwritev(fd, parts, pos)

    monkeypatch.setattr(os, "pwritev", full)
    send(rec, model, [chunk])
    rec.drain()
    for seq in range(100, 103):  # the primary sends it again, and again
        rec.handle(p.Write(seq, chunk.offset, chunk.data, fua=True))
        rec.drain()
    assert acked(out) & {100, 101, 102}, "every resend failed: the cycle cannot finish"


def test_a_failed_commit_record_sync_is_retried_by_the_repeated_commit(replica, monkeypatch):
    rec, out, _rng, old, model = staged_cycle_2(replica, 64)
    fail_log_sync_once(monkeypatch, rec, "test: COMMIT record not synced")
    with pytest.raises(VolumeError, match="cannot commit cycle 2"):
        rec.handle(p.CycleCommit(2))
    assert rec._staging.committed is None and read_all(replica) == old
    assert image(replica, 1) == old
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model
    assert replica.volume.info.cycle == 2


@pytest.mark.parametrize("then", ["repeated-commit", "restart"])
def test_a_failed_flush_during_the_apply_is_finished_later(replica, monkeypatch, then):
    rec, out, _rng, _old, model = staged_cycle_2(replica, 65)

    def fails():
        raise OSError(errno.EIO, "test: volume fdatasync failed")

    with monkeypatch.context() as m:
        m.setattr(replica, "flush", fails)
        with pytest.raises(VolumeError, match="cannot apply committed cycle 2"):
            rec.handle(p.CycleCommit(2))
    assert replica.volume.info.cycle == 1 and rec._staging.committed is not None
    # acknowledged before the apply: the durable COMMIT record is the commit
    assert [f.seq for f in out.frames if isinstance(f, p.CycleAck)] == [1, 2]
    assert rec.status()["committed_cycle"] == 2 and rec.status()["cycle_applying"] == 2
    if then == "restart":
        rec = restart(rec, out=out)
    else:  # the ack lost with the link: the primary commits again
        rec.link_lost()
        rec.handle(p.CycleBegin(2))
        rec.handle(p.CycleCommit(2))
        assert [f.seq for f in out.frames if isinstance(f, p.CycleAck)] == [1, 2, 2]
    assert rec.status()["cycle_applying"] is None
    assert read_all(replica) == model and image(replica, 2) == model
    assert replica.volume.info.cycle == 2 and not rec._staging.records
    later_cycle_works(rec, model, 3, 15)


# Was a bug (fixed): a chunk after a failed apply of a committed log hit an assert.
def test_a_chunk_resent_after_a_failed_apply_is_answered(replica, monkeypatch):
    rec, out, _rng, _old, model = staged_cycle_2(replica, 66)

    def fails():
        raise OSError(errno.EIO, "test: volume fdatasync failed")

    with monkeypatch.context() as m:
        m.setattr(replica, "flush", fails)
        with pytest.raises(VolumeError):
            rec.handle(p.CycleCommit(2))
    rec.link_lost()
    out2 = Out()
    rec.out = out2
    rec.handle(p.CycleBegin(2))
    again = p.Write(1, 2 * RS, bytes(model[2 * RS:3 * RS]), fua=True)  # chunk 2, again
    rec.handle(again)
    rec.drain()
    assert acked(out2) | failed(out2) == {1}
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model and image(replica, 2) == model


def test_a_failed_delete_of_the_old_image_keeps_it_whole(replica, monkeypatch):
    rec, _out, _rng, old, model = staged_cycle_2(replica, 67)
    real, calls = replica.delete_snapshot, []

    def fails_first(name, internal=False):
        calls.append(name)
        if len(calls) == 1:  # in the apply (the next commit's apply deletes it)
            raise OSError(errno.EIO, "test: cannot delete")
        real(name, internal)

    monkeypatch.setattr(replica, "delete_snapshot", fails_first)
    rec.handle(p.CycleCommit(2))
    assert images(replica) == [cycle_name(1), cycle_name(2)]
    assert image(replica, 1) == old, "the apply did not copy on write into the kept image"
    assert read_all(replica) == model and image(replica, 2) == model
    assert consistent.newest_image(replica.volume) == cycle_name(2)
    later_cycle_works(rec, model, 3, 16)


# -- the marks ------------------------------------------------------------------------

# Was a bug (fixed): a suspect region written whole by a staged chunk stayed marked.
def test_a_suspect_region_written_whole_by_a_staged_cycle_is_cleared(replica):
    rec = receiver(replica)
    rng, _old, model = cycle_2(rec, 70)
    rec.handle(p.CycleCommit(2))
    replica.tracker.mark(5 * RS, RS)  # e.g. a failed write of an earlier run
    rec = restart(rec)
    assert rec.missing_runs() == [(5, 1)]
    rec.handle(p.CycleBegin(3))
    send(rec, model, [p.Write(1, 5 * RS, random_bytes(rng, RS), fua=True)])
    rec.drain()
    rec.handle(p.CycleCommit(3))
    assert read_all(replica) == model
    rec.sweep()
    assert rec.missing_runs() == []


def test_the_direct_path_clears_a_suspect_region_written_whole(replica, monkeypatch):
    """The control for the test above: the same with a log of 0 bytes."""
    monkeypatch.setattr(staging, "CAPACITY", 0)
    rec = receiver(replica)
    rng, _old, model = cycle_2(rec, 71)
    rec.handle(p.CycleCommit(2))
    replica.tracker.mark(5 * RS, RS)
    rec = restart(rec)
    rec.handle(p.CycleBegin(3))
    send(rec, model, [p.Write(1, 5 * RS, random_bytes(rng, RS), fua=True)])
    rec.drain()
    rec.handle(p.CycleCommit(3))
    rec.sweep()
    assert rec.missing_runs() == []


def test_records_of_zero_kind_round_trip_through_a_restart(replica):
    """(may_trim is kept in the header: a ZERO that may trim stays one after a restart)"""
    log = staging.StagingLog(replica.volume)
    log.begin(9)
    log.append(ZERO, 0, SIZE, None, may_trim=True)
    log.append(ZERO, RS, 1, None, may_trim=False)
    log.sync()
    log.close()
    again = reopen(replica)
    assert [(r.kind, r.offset, r.length, r.may_trim) for r in again.records] == [
        (ZERO, 0, SIZE, True), (ZERO, RS, 1, False)]
