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


def test_marks_are_on_disk_when_mark_returns(vol):
    t = tracker(vol)
    t.mark(3 * RS, 10)
    # read the file independently of the tracker
    assert np.flatnonzero(load_marks(vol.marks_path, vol.regions)).tolist() == [3]
    t.close()
    t2 = tracker(vol)
    assert np.flatnonzero(t2.marks).tolist() == [3]
    t2.close()


def test_second_write_to_marked_region_needs_no_sync(vol):
    t = tracker(vol)
    t.mark(0, 10)
    syncs = t.syncs
    for i in range(100):
        t.mark(i * 7, 100)
    assert t.syncs == syncs
    t.mark(50 * RS, 1)
    assert t.syncs == syncs + 1
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
    t.mark(7 * RS, 1)
    # a crash now must still find 0,1,2 (taken, not yet transferred) and 7
    assert np.flatnonzero(load_marks(vol.marks_path, vol.regions)).tolist() == [0, 1, 2, 7]
    assert t.release(taken) == 2  # 0 and 2 are done; 1 was re-marked
    assert np.flatnonzero(load_marks(vol.marks_path, vol.regions)).tolist() == [1, 7]
    assert np.flatnonzero(t.marks).tolist() == [1, 7]
    t.close()


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
    assert np.flatnonzero(load_marks(vol.marks_path, vol.regions)).tolist() == [0, 1, 4, 5, 6, 7,
                                                                                 8, 9]
    t.clear()
    assert t.count() == 0 and not load_marks(vol.marks_path, vol.regions).any()
    # cleared regions need a durable mark again
    syncs = t.syncs
    t.mark(0, 1)
    assert t.syncs == syncs + 1
    t.close()
