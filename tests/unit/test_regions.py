"""The write-intent tracker, on real files (no nbdkit)."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from volume_core import regions
from volume_core.errors import VolumeCorrupt
from volume_core.regions import RegionTracker, load_marks
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 64 << 10


@pytest.fixture
def vol(tmp_path):
    return Volume.create(tmp_path / "v", 100 * RS + 4096)  # 101 regions, the last one short


def tracker(vol, **kw):
    return RegionTracker(vol.marks_path, vol.regions, vol.region_size, **kw)


def test_mark_covers_every_touched_region_including_partial_overlaps(vol):
    t = tracker(vol)
    t.mark(RS - 1, 2)  # straddles regions 0 and 1
    t.mark(5 * RS, RS)  # exactly region 5
    t.mark(10 * RS + 100, 3 * RS)  # 10..13
    t.mark(vol.size - 1, 1)  # the short last region
    assert np.flatnonzero(t.marks).tolist() == [0, 1, 5, 10, 11, 12, 13, 100]
    assert t.runs().tolist() == [[0, 2], [5, 1], [10, 4], [100, 1]]
    assert t.count() == 8
    t.close()


def on_disk(vol):
    return set(np.flatnonzero(load_marks(vol.marks_path, vol.regions)).tolist())


def test_marks_are_on_disk_when_mark_returns_and_exact_after_close(vol):
    t = tracker(vol)
    t.mark(3 * RS, 10)
    # read the file independently of the tracker: intent covers the region's whole extent
    assert 3 in on_disk(vol)
    assert on_disk(vol) == set(range(0, t.extent))
    t.close()
    assert on_disk(vol) == {3}
    t2 = tracker(vol)
    assert np.flatnonzero(t2.marks).tolist() == [3]
    t2.close()


def test_second_write_in_a_persisted_extent_needs_no_sync(vol):
    t = tracker(vol)
    assert t.extent == 64  # 4 MiB of 64K regions
    t.mark(0, 10)
    syncs = t.syncs
    for i in range(100):
        t.mark(i * 7, 100)
    t.mark(63 * RS, RS)  # last region of the first extent: intent already durable
    assert t.syncs == syncs
    t.mark(64 * RS, 1)  # next extent
    assert t.syncs == syncs + 1
    assert np.flatnonzero(t.marks).tolist() == [0, 63, 64]  # only the written regions
    t.close()


def test_sequential_writer_pays_one_sync_per_extent(vol):
    t = tracker(vol)
    for off in range(0, 100 * RS, 256 << 10):
        t.mark(off, 256 << 10)
    assert t.syncs == 2  # 100 regions span two 64-region extents
    assert t.count() == 100
    t.close()


def test_concurrent_first_touches_share_syncs_and_all_land(vol):
    t = tracker(vol)
    barrier = threading.Barrier(8)

    def worker(k):
        barrier.wait()
        for r in range(k, 100, 8):
            t.mark(r * RS, 1)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.count() == 100
    assert load_marks(vol.marks_path, vol.regions)[:100].all()
    # A thread syncs only while synced_seq < its seq <= write_seq, and each sync raises
    # synced_seq to the write_seq it saw; write_seq counts map writes, one per extent
    # first touched (regions 0..99 span two 64-region extents). So 2 syncs at most, and
    # 1 when one sync happened to cover both extents' writes.
    assert 1 <= t.syncs <= 2
    t.close()


def test_swap_and_reset_takes_marks_and_keeps_them_durable_until_released(vol):
    t = tracker(vol)
    t.mark(0, 3 * RS)  # 0,1,2
    taken = t.swap_and_reset()
    assert np.flatnonzero(taken).tolist() == [0, 1, 2] and t.count() == 0
    t.mark(RS, 1)  # region 1 written again during the cycle
    t.mark(70 * RS, 1)
    # a crash now must still find 0,1,2 (taken, not yet transferred) and 70
    assert {0, 1, 2, 70} <= on_disk(vol)
    assert t.release(taken) == 2  # 0 and 2 are done; 1 was re-marked
    assert on_disk(vol) == {1, 70}  # release trims unneeded intent too
    assert np.flatnonzero(t.marks).tolist() == [1, 70]
    t.close()


def test_taken_marks_survive_close_until_released(vol):
    t = tracker(vol)
    t.mark(5 * RS, 1)
    t.swap_and_reset()
    t.close()  # a cycle was in progress: its regions must not be trimmed
    assert on_disk(vol) == {5}


def test_merge_gives_back_marks_of_a_failed_cycle(vol):
    t = tracker(vol)
    t.mark(0, 1)
    taken = t.swap_and_reset()
    t.mark(4 * RS, 1)
    t.merge(taken)
    assert np.flatnonzero(t.marks).tolist() == [0, 4]
    t.close()


def test_clear_all_and_some(vol):
    t = tracker(vol)
    t.mark(0, 10 * RS)
    sel = np.zeros(vol.regions, np.uint8)
    sel[2:4] = 1
    assert t.clear(sel) == 2
    assert on_disk(vol) == set(range(64)) - {2, 3}
    assert np.flatnonzero(t.marks).tolist() == [0, 1, 4, 5, 6, 7, 8, 9]
    t.clear()
    assert t.count() == 0 and not on_disk(vol)
    # cleared regions need a durable mark again
    syncs = t.syncs
    t.mark(0, 1)
    assert t.syncs == syncs + 1
    t.close()


def fail_once(real, error: int, calls: list | None = None):
    """A stand-in for ``real`` whose first call raises OSError(error)."""
    state = {"failed": False}

    def call(*args):
        if not state["failed"]:
            state["failed"] = True
            raise OSError(error, os.strerror(error))
        return real(*args)
    return call


def test_a_failed_map_write_does_not_lose_the_mark_of_the_next_write(vol, monkeypatch):
    t = tracker(vol)
    monkeypatch.setattr(regions, "pwrite_full", fail_once(regions.pwrite_full, errno.ENOSPC))
    with pytest.raises(OSError) as err:
        t.mark(70 * RS, 1)  # the write this was for fails: the client sees ENOSPC
    assert err.value.errno == errno.ENOSPC and 70 not in on_disk(vol)
    syncs = t.syncs
    t.mark(70 * RS, 1)  # space is back: the same write again must persist its mark
    assert 70 in on_disk(vol) and t.syncs == syncs + 1
    t.close()
    assert on_disk(vol) == {70}


def test_a_failed_sync_makes_every_writer_of_its_batch_persist_again(vol, monkeypatch):
    """B wrote its intent; A's sync, which covered it, failed: B must not return unsynced."""
    t = tracker(vol)
    real_sync = t._sync_upto
    real_fdatasync = os.fdatasync

    def a_fails_first(seq):  # runs in B's mark(), between its map write and its sync
        if not hasattr(a_fails_first, "done"):
            a_fails_first.done = True
            monkeypatch.setattr(os, "fdatasync", fail_once(real_fdatasync, errno.EIO))
            with pytest.raises(OSError):
                t.mark(0, 1)  # A: region 0, the same extent as B's region 5
            monkeypatch.setattr(os, "fdatasync", real_fdatasync)
        real_sync(seq)

    t._sync_upto = a_fails_first
    syncs = t.syncs
    t.mark(5 * RS, 1)  # B
    assert t._state[5] == regions._DURABLE  # durable when mark() returns
    # B's own sync found its write already taken (by A's failed batch); its retry wrote
    # the intent again and synced that
    assert t.syncs == syncs + 2
    t.close()


def test_a_sync_under_way_does_not_promote_a_region_cleared_and_persisted_again(vol,
                                                                               monkeypatch):
    t = tracker(vol)
    t.mark(0, 10 * RS)  # regions 0..9 marked, their extent durable
    sel = np.zeros(vol.regions, np.uint8)
    sel[6] = 1
    t.clear(sel)  # region 6 clear again on disk
    real_fdatasync = os.fdatasync
    repersisted = []

    def meanwhile(fd):  # inside the sync for region 6's extent write
        real_fdatasync(fd)
        if not repersisted:
            sel5 = np.zeros(vol.regions, np.uint8)
            sel5[5] = 1
            t.clear(sel5)  # region 5 was durable, so that write did not cover it
            with t.lock:
                assert not t.try_mark(5 * RS, 1)
                repersisted.append(t._persist(5, 6))  # its writer has not synced yet

    monkeypatch.setattr(os, "fdatasync", meanwhile)
    t.mark(6 * RS, 1)
    monkeypatch.setattr(os, "fdatasync", real_fdatasync)
    with t.lock:  # a third writer to region 5 must still wait for its sync
        assert not t.try_mark(5 * RS, 1)
    t.mark(5 * RS, 1)
    with t.lock:
        assert t.try_mark(5 * RS, 1)
    t.close()


@pytest.mark.parametrize("size", [0, 100, 102])
def test_a_map_of_the_wrong_size_is_refused_naming_the_file(vol, size):
    os.truncate(vol.marks_path, size)
    with pytest.raises(VolumeCorrupt, match=f"{vol.marks_path}: {size} bytes, expected 101"):
        tracker(vol)
    if size < 101:
        with pytest.raises(VolumeCorrupt, match="marks.map"):
            load_marks(vol.marks_path, vol.regions)


def test_a_sparse_map_is_preallocated_at_open(vol):
    os.truncate(vol.marks_path, 0)
    os.truncate(vol.marks_path, vol.regions)
    assert os.stat(vol.marks_path).st_blocks == 0
    t = tracker(vol)
    assert os.stat(vol.marks_path).st_blocks * 512 >= vol.regions
    assert not on_disk(vol)  # contents unchanged
    t.close()


def test_a_second_take_before_release_is_refused(vol):
    from volume_core.errors import MarksTaken

    t = tracker(vol)
    t.mark(0, 1)
    taken = t.swap_and_reset()
    t.mark(3 * RS, 1)
    with pytest.raises(MarksTaken, match="not released"):
        t.swap_and_reset()
    assert np.flatnonzero(t.marks).tolist() == [3]  # the refused take changed nothing
    t.release(taken)
    assert np.flatnonzero(t.swap_and_reset()).tolist() == [3]
    t.close()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 18])
def test_whole_map_passes_give_the_same_result_in_any_chunking(vol, monkeypatch, chunk):
    monkeypatch.setattr(regions, "PASS_CHUNK", chunk)
    t = tracker(vol)
    t.mark(0, 3 * RS)  # 0,1,2 (intent persisted for the whole first extent)
    taken = t.swap_and_reset()
    t.mark(RS, 1)
    t.mark(70 * RS, 1)
    assert t.release(taken) == 2
    assert on_disk(vol) == {1, 70}
    sel = np.zeros(vol.regions, np.uint8)
    sel[[1, 99]] = 1
    assert t.clear(sel) == 1
    assert on_disk(vol) == {70} and np.flatnonzero(t.marks).tolist() == [70]
    t.close()
    assert on_disk(vol) == {70}


def test_whole_map_passes_let_go_of_the_write_lock_between_chunks(vol, monkeypatch):
    monkeypatch.setattr(regions, "PASS_CHUNK", 16)
    t = tracker(vol)
    t.mark(0, vol.size)
    taken = t.swap_and_reset()
    chunks = t._chunks
    held_between = []

    def watched():
        for span in chunks():
            held_between.append(t.lock.locked())
            yield span

    monkeypatch.setattr(t, "_chunks", watched)
    t.release(taken)
    t.clear()
    assert len(held_between) == 2 * -(-vol.regions // 16) and not any(held_between)
    t.close()
