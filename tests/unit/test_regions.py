"""The write-intent tracker, on real files (no nbdkit)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

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
    assert t.syncs <= 100
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
