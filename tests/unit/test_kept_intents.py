"""Kept intents (regions.py): a region an async cycle conveyed, in an extent written
lately, keeps a non-zero byte on disk (2) so the host's next write to it waits for no
fdatasync; in the boot that kept it the byte means clean (a SIGKILL and a restart send
nothing conveyed again), after a reboot it is an intent like any other."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from volume_core import boot, regions
from volume_core.regions import KEPT_BYTE, RegionTracker, load_marks
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 64 << 10
EXT = regions.INTENT_EXTENT // RS  # regions per intent extent (64)


@pytest.fixture
def vol(tmp_path):
    return Volume.create(tmp_path / "v", 3 * EXT * RS)  # three extents


def tracker(vol) -> RegionTracker:
    return RegionTracker(vol.marks_path, vol.regions, vol.region_size)


def on_disk(vol) -> np.ndarray:
    return np.fromfile(vol.marks_path, dtype=np.uint8)


def conveyed(t: RegionTracker, first: int, stop: int) -> None:
    """What an async cycle does: take the marks, convey [first, stop) (kept where hot)."""
    taken = t.swap_and_reset()
    t.release_runs([(first, stop)], keep_hot=True)
    return taken


def count_syncs(monkeypatch, t: RegionTracker) -> list[int]:
    real, calls = os.fdatasync, []

    def counting(fd):
        if fd == t._fd:
            calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


def test_a_conveyed_region_of_a_hot_extent_is_kept_and_written_again_without_a_sync(
        vol, monkeypatch):
    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.mark(5 * RS, RS)  # the extent is hot: written just now
    conveyed(t, 3, 4)
    assert on_disk(vol)[3] == KEPT_BYTE and t.marks[3] == 0
    assert (vol.path / regions.BOOT_FILE).read_text().strip() == boot.boot_id()
    syncs = count_syncs(monkeypatch, t)
    t.mark(3 * RS, RS)
    assert syncs == [] and on_disk(vol)[3] == 1 and t.marks[3] == 1
    t.close()


def test_a_conveyed_region_of_a_cold_extent_is_cleared(vol, monkeypatch):
    monkeypatch.setattr(regions, "HOT_SECONDS", 0.0)
    t = tracker(vol)
    t.mark(3 * RS, RS)
    conveyed(t, 3, 4)
    assert on_disk(vol)[3] == 0
    syncs = count_syncs(monkeypatch, t)
    t.mark(3 * RS, RS)
    assert len(syncs) == 1  # its intent made durable again
    t.close()


def test_a_restart_in_the_same_boot_takes_a_kept_region_for_clean(vol):
    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.mark(4 * RS, RS)
    taken = conveyed(t, 3, 4)  # region 4 taken, not conveyed yet
    t.mark(EXT * RS, RS)  # another extent, written after the take
    # SIGKILL: the tracker is never closed; a new one reads the map back
    again = tracker(vol)
    # (intent is persisted a whole extent at a time: its unwritten regions come back too)
    marked = set(np.flatnonzero(again.marks).tolist())
    assert 3 not in marked and {4, EXT} <= marked
    assert set(np.flatnonzero(load_marks(vol.marks_path, vol.regions)).tolist()) == marked
    del taken
    again.close()
    t._fd = -1  # (its descriptor: closed with the process)


def test_after_a_reboot_a_kept_region_is_an_intent_and_written_as_one(vol, monkeypatch):
    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.mark(5 * RS, RS)
    conveyed(t, 3, 4)
    assert on_disk(vol)[3] == KEPT_BYTE
    monkeypatch.setattr(boot, "boot_id", lambda: "another-boot")
    assert load_marks(vol.marks_path, vol.regions)[3] == 1
    again = tracker(vol)
    assert again.marks[3] == 1 and on_disk(vol)[3] == 1  # a 1 before anything is kept
    again.close()
    t._fd = -1


def test_a_failed_fdatasync_of_the_map_stops_trusting_kept_bytes(vol, monkeypatch):
    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.mark(5 * RS, RS)
    conveyed(t, 3, 4)
    real, fail = os.fdatasync, [True]

    def flaky(fd):
        if fd == t._fd and fail:
            fail.pop()
            raise OSError(errno.EIO, "test: map fdatasync failed")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", flaky)
    with pytest.raises(OSError):
        t.mark(2 * EXT * RS, RS)  # a new extent: its intent needs a sync, which fails
    assert not (vol.path / regions.BOOT_FILE).exists()
    # a restart in this boot takes the kept byte for an intent (its 1 may be lost)
    again = tracker(vol)
    assert again.marks[3] == 1
    again.close()
    t._fd = -1


def test_close_trims_kept_bytes_to_the_exact_marks(vol):
    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.mark(5 * RS, RS)
    taken = conveyed(t, 3, 4)
    t.release(taken, keep_hot=True)
    t.mark(6 * RS, RS)
    assert on_disk(vol)[3] == KEPT_BYTE
    t.close()
    assert np.flatnonzero(on_disk(vol)).tolist() == [6]


def test_a_write_over_a_kept_region_and_a_clear_neighbour_persists_its_extent(vol, monkeypatch):
    monkeypatch.setattr(regions, "HOT_SECONDS", 3600.0)
    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.mark(5 * RS, RS)
    taken = conveyed(t, 3, 6)
    t.release(taken, keep_hot=True)
    assert on_disk(vol)[3] == on_disk(vol)[5] == KEPT_BYTE
    t.mark(EXT * RS - RS, 2 * RS)  # the last region of extent 0 and the first of extent 1
    assert on_disk(vol)[EXT - 1] == 1 and on_disk(vol)[EXT] == 1
    again = tracker(vol)  # a restart: the kept ones are clean, the written ones marks
    marked = set(np.flatnonzero(again.marks).tolist())
    assert not {3, 4, 5} & marked and {EXT - 1, EXT} <= marked
    assert on_disk(vol)[3] == KEPT_BYTE  # the extent's intent was written around it
    again.close()
    t._fd = -1


def test_a_start_without_this_boot_recorded_writes_every_intent_as_1_and_syncs(
        vol, monkeypatch):
    """A page that said 1 may sit over a 2 on disk (a failed writeback): before kept bytes
    can be trusted again, every non-zero byte is written as 1 and synced."""
    raw = np.zeros(vol.regions, dtype=np.uint8)
    raw[[3, 4, EXT + 1]] = [1, KEPT_BYTE, 1]
    raw.tofile(vol.marks_path)
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    t = tracker(vol)
    assert np.flatnonzero(on_disk(vol)).tolist() == [3, 4, EXT + 1]
    assert set(on_disk(vol)[[3, 4, EXT + 1]].tolist()) == {1} and len(syncs) >= 2
    assert np.flatnonzero(t.marks).tolist() == [3, 4, EXT + 1]
    t.close()
