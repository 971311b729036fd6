"""Attack on kept intents (regions.py, commit 78ef502): a region an async cycle conveyed
(``release_runs``/``release`` with ``keep_hot``) in an extent written lately keeps a 2
in the marks map instead of a 0; in the boot named by ``marks.boot`` a 2 means clean,
after a reboot it is an intent.

Real files and real trackers throughout. A SIGKILL is simulated by never closing the
tracker (its descriptor is closed without a sync) and opening a new one on the same
files; a reboot by making ``volume_core.boot.boot_id`` answer another id. Failures are
injected by wrapping ``os.fdatasync``/``os.pwrite``/``os.open``. Where a failed
fdatasync's lost page matters, the test writes what the disk would hold back into the
file (a regular file's page cache *is* what a reader sees, so the loss is spelled out).

Seven tests showed five bugs, fixed the same session: ``mark_map`` kept only its last
run's sync number (a clear run before a kept one returned unsynced); a failed fdatasync
in ``close()`` or at a tracker's start left ``marks.boot`` trusted; a ``marks.boot``
that could not be written (ENOSPC, a directory) broke ``release``; an extent never
written counted as hot in the first seconds after boot. The others probe what held.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import types

import numpy as np
import pytest

from tests.unit.test_kept_intents import count_syncs
from volume_core import boot, regions
from volume_core.regions import (
    _CLEAR,
    _DURABLE,
    _KEPT,
    _WRITTEN,
    BOOT_FILE,
    KEPT_BYTE,
    RegionTracker,
    load_marks,
)
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 64 << 10
EXT = regions.INTENT_EXTENT // RS  # 64 regions per intent extent


# -- helpers ---------------------------------------------------------------------------
@pytest.fixture
def vol(tmp_path):
    return Volume.create(tmp_path / "v", 3 * EXT * RS)  # three whole extents


@pytest.fixture
def short_vol(tmp_path):
    # three extents and 5 regions more, the last of them short (4 KiB)
    return Volume.create(tmp_path / "s", (3 * EXT + 4) * RS + 4096)


@pytest.fixture
def hot(monkeypatch):
    """Every extent written in the test counts as hot."""
    monkeypatch.setattr(regions, "HOT_SECONDS", 3600.0)


def tracker(vol, **kw) -> RegionTracker:
    return RegionTracker(vol.marks_path, vol.regions, vol.region_size, **kw)


def disk(vol) -> np.ndarray:
    return np.fromfile(vol.marks_path, dtype=np.uint8)


def kill(t: RegionTracker) -> None:
    """SIGKILL: the descriptor goes, nothing is synced or trimmed."""
    if t._fd >= 0:
        os.close(t._fd)
        t._fd = -1


def restart(vol, old: RegionTracker) -> RegionTracker:
    kill(old)
    return tracker(vol)


def reboot(monkeypatch, name: str = "another-boot") -> None:
    monkeypatch.setattr(boot, "boot_id", lambda: name)


def marked(t: RegionTracker) -> set[int]:
    return set(np.flatnonzero(t.marks).tolist())


def offline(vol) -> set[int]:
    return set(np.flatnonzero(load_marks(vol.marks_path, vol.regions)).tolist())


def keep(t: RegionTracker, *rs: int) -> np.ndarray:
    """Write ``rs`` (their extents turn hot), take, convey exactly ``rs`` (kept)."""
    for r in rs:
        t.mark(r * RS, RS)
    taken = t.swap_and_reset()
    for r in rs:
        t.release_runs([(r, r + 1)], keep_hot=True)
    return taken


def poke(vol, region: int, value: int) -> None:
    """Put ``value`` in a region's map byte behind the tracker's back (what a disk that
    lost a page would give back once the page cache dropped it)."""
    fd = os.open(vol.marks_path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([value]), region)
    finally:
        os.close(fd)


def fail_fdatasync(monkeypatch, times: int = 1, fd: int | None = None) -> list[int]:
    """The next ``times`` fdatasyncs (of ``fd``, or of any descriptor) raise EIO."""
    real, failed = os.fdatasync, []

    def flaky(f):
        if (fd is None or f == fd) and len(failed) < times:
            failed.append(f)
            raise OSError(errno.EIO, "test: fdatasync failed")
        real(f)

    monkeypatch.setattr(os, "fdatasync", flaky)
    return failed


def check_consistent(vol, t: RegionTracker) -> None:
    """Memory states agree with the map file: KEPT <-> 2, DURABLE -> 1, a marked region
    is durable, an outstanding one is not clear; nothing left unsynced."""
    d = disk(vol)
    st = t._persisted
    assert not (st == _WRITTEN).any()
    assert ((st == _KEPT) == (d == KEPT_BYTE)).all()
    assert (d[st == _DURABLE] == 1).all()
    assert (st[t.marks != 0] == _DURABLE).all()
    assert (st[t._outstanding != 0] != _CLEAR).all()
    assert (d[st == _CLEAR] == 0).all()


# -- what held: the basic contract -------------------------------------------------------
def test_kept_region_written_again_is_marked_after_sigkill(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)
    assert disk(vol)[3] == KEPT_BYTE
    syncs = count_syncs(monkeypatch, t)
    t.mark(3 * RS, 10)  # a partial write into the kept region
    assert syncs == [] and disk(vol)[3] == 1
    again = restart(vol, t)
    assert 3 in marked(again) and 5 not in marked(again)
    assert offline(vol) == marked(again)
    again.close()


def test_kept_region_written_again_is_marked_after_reboot(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)
    t.mark(3 * RS, RS)
    poke(vol, 3, KEPT_BYTE)  # power lost: the unsynced 1 never reached the disk
    kill(t)
    reboot(monkeypatch)
    assert {3, 5} <= offline(vol)
    again = tracker(vol)
    assert {3, 5} <= marked(again)
    assert disk(vol)[3] == disk(vol)[5] == 1  # written back as 1s first
    assert again._persisted[3] == _DURABLE
    again.close()


def test_conveyed_regions_not_written_again_are_clean_after_sigkill(vol):
    t = tracker(vol)
    keep(t, 3, 5, EXT + 1)
    again = restart(vol, t)
    assert not {3, 5, EXT + 1} & marked(again)
    assert again._persisted[3] == _KEPT
    assert offline(vol) == marked(again)
    again.close()


def test_load_marks_agrees_with_a_tracker_in_both_boots(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)
    t.mark(EXT * RS, RS)
    t.mark(5 * RS, RS)
    kill(t)
    assert offline(vol) == marked(tracker(vol))
    reboot(monkeypatch)
    want = offline(vol)
    again = tracker(vol)
    assert want == marked(again)
    assert 3 in want
    again.close()


def test_write_spanning_kept_regions_and_a_clear_extent_syncs_once(vol, monkeypatch, hot):
    t = tracker(vol)
    taken = keep(t, EXT - 2, EXT - 1)
    t.release(taken, keep_hot=True)
    assert (disk(vol)[:EXT] == KEPT_BYTE).all()  # the whole extent's intent kept
    syncs = count_syncs(monkeypatch, t)
    t.mark((EXT - 1) * RS, 2 * RS)  # a kept region and the first one of extent 1
    assert len(syncs) == 1
    assert disk(vol)[EXT - 1] == 1 and disk(vol)[EXT - 2] == KEPT_BYTE
    assert (disk(vol)[EXT:2 * EXT] == 1).all()
    check_consistent(vol, t)
    again = restart(vol, t)
    assert {EXT - 1, EXT} <= marked(again) and EXT - 2 not in marked(again)
    again.close()


def test_write_over_only_kept_regions_needs_no_sync(vol, monkeypatch, hot):
    t = tracker(vol)
    taken = keep(t, 1, 2, 3)
    t.release(taken, keep_hot=True)
    syncs = count_syncs(monkeypatch, t)
    t.mark(RS, 3 * RS)
    assert syncs == []
    check_consistent(vol, t)
    again = restart(vol, t)
    assert {1, 2, 3} <= marked(again)
    again.close()


def test_cold_extent_is_cleared_hot_one_kept_in_one_release_runs(vol, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(regions, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    t = tracker(vol)
    t.mark((EXT - 1) * RS, RS)  # extent 0 written at 1000
    clock[0] = 1001.5
    t.mark(EXT * RS, RS)  # extent 1 written at 1001.5
    taken = t.swap_and_reset()
    clock[0] = 1002.0  # extent 0: exactly HOT_SECONDS ago (cold); extent 1: 0.5 s (hot)
    t.release_runs([(EXT - 1, EXT + 1)], keep_hot=True)
    assert disk(vol)[EXT - 1] == 0 and disk(vol)[EXT] == KEPT_BYTE
    clock[0] = 1003.49
    t.release(taken, keep_hot=True)
    assert (disk(vol)[EXT:2 * EXT] == KEPT_BYTE).all()  # 1.99 s: still hot
    clock[0] = 1003.5
    t.release(t.swap_and_reset(), keep_hot=True)
    assert not disk(vol).any()  # 2 s: cold, the kept bytes go too
    check_consistent(vol, t)
    t.close()


def test_hot_seconds_zero_never_keeps(vol, monkeypatch):
    monkeypatch.setattr(regions, "HOT_SECONDS", 0.0)
    t = tracker(vol)
    taken = keep(t, 3)
    t.release(taken, keep_hot=True)
    assert not disk(vol).any()
    assert not (vol.path / BOOT_FILE).exists()  # nothing kept: the boot never recorded
    t.close()


def test_short_last_region_and_extent_boundaries(short_vol, hot):
    vol = short_vol
    last = vol.regions - 1
    t = tracker(vol)
    taken = keep(t, last, 3 * EXT - 1)
    assert disk(vol)[last] == KEPT_BYTE and disk(vol)[3 * EXT - 1] == KEPT_BYTE
    t.release(taken, keep_hot=True)
    assert (disk(vol)[2 * EXT:] == KEPT_BYTE).all()
    t.mark(vol.size - 1, 1)  # the last byte of the short last region
    t.mark(3 * EXT * RS - 1, 2)  # straddles the extent boundary
    check_consistent(vol, t)
    again = restart(vol, t)
    assert {last, 3 * EXT - 1, 3 * EXT} <= marked(again)
    assert not {3 * EXT + 1, 2 * EXT} & marked(again)
    again.close()


def test_region_as_large_as_an_extent(tmp_path):
    vol = Volume.create(tmp_path / "big", 5 * (8 << 20) - 4096, 8 << 20)  # extent = 1
    t = tracker(vol)
    assert t.extent == 1
    big = 8 << 20
    t.mark(big, 1)
    t.mark(vol.size - 1, 1)
    t.swap_and_reset()
    t.release_runs([(1, 2)], keep_hot=True)
    t.release_runs([(4, 5)], keep_hot=True)
    assert disk(vol).tolist() == [0, 2, 0, 0, 2]
    t.mark(4 * big, 1)
    again = restart(vol, t)
    assert marked(again) == {4}
    again.close()


def test_close_trims_kept_bytes_and_reopen_in_another_boot_has_none(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)
    t.mark(7 * RS, RS)
    t.close()
    assert set(np.flatnonzero(disk(vol)).tolist()) == {7}
    reboot(monkeypatch)
    again = tracker(vol)
    assert marked(again) == {7}
    again.close()


def test_durable_false_never_keeps(vol, hot):
    t = tracker(vol, durable=False)
    taken = keep(t, 3)
    t.release(taken, keep_hot=True)
    assert KEPT_BYTE not in disk(vol)
    t.close()


# -- marks.boot damaged ------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"garbage\n", b"\xff\xfe\x00", b"unknown\n"])
def test_damaged_boot_file_makes_kept_bytes_intents(vol, content):
    t = tracker(vol)
    keep(t, 3)
    kill(t)
    (vol.path / BOOT_FILE).write_bytes(content)
    assert 3 in offline(vol)
    again = tracker(vol)
    assert 3 in marked(again) and disk(vol)[3] == 1
    again.close()


def test_boot_file_a_directory_makes_kept_bytes_intents(vol):
    t = tracker(vol)
    keep(t, 3)
    kill(t)
    (vol.path / BOOT_FILE).unlink()
    (vol.path / BOOT_FILE).mkdir()
    assert 3 in offline(vol)
    again = tracker(vol)
    assert 3 in marked(again)
    again.close()


def test_unknown_boot_id_keeps_but_trusts_nothing_after_a_restart(vol, monkeypatch):
    """(b), conservative: with no boot id, a restart sends the conveyed regions again."""
    reboot(monkeypatch, "unknown")
    t = tracker(vol)
    keep(t, 3)
    assert disk(vol)[3] == KEPT_BYTE
    again = restart(vol, t)
    assert 3 in marked(again)
    again.close()


def test_boot_file_cannot_be_written_release_still_completes(vol):
    (vol.path / BOOT_FILE).mkdir()  # damaged: os.replace onto it fails (EISDIR)
    t = tracker(vol)
    t.mark(3 * RS, RS)
    taken = t.swap_and_reset()
    try:
        t.release(taken, keep_hot=True)  # raises IsADirectoryError
    finally:
        check_consistent(vol, t)
    t.mark(4 * RS, RS)
    t.swap_and_reset()  # MarksTaken: the failed release left the take open
    t.close()


def test_enospc_recording_the_boot_falls_back_to_clearing(vol, monkeypatch):
    real_open = os.open

    def full(path, flags, *a, **kw):
        if str(path).endswith(f".{BOOT_FILE}.tmp"):
            raise OSError(errno.ENOSPC, "test: no space left")
        return real_open(path, flags, *a, **kw)

    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.swap_and_reset()
    monkeypatch.setattr(os, "open", full)
    t.release_runs([(3, 4)], keep_hot=True)
    assert disk(vol)[3] == 0
    t.close()


# -- failed pwrite -----------------------------------------------------------------------
def _failing_pwrite(monkeypatch, data: bytes, times: int = 1, offset: int | None = None):
    """The next ``times`` pwrites of bytes starting with ``data`` (at ``offset``, if
    given) raise EIO."""
    real, failed = os.pwrite, []

    def flaky(fd, buf, off):
        if (bytes(buf[:1]) == data and (offset is None or off == offset)
                and len(failed) < times):
            failed.append(off)
            raise OSError(errno.EIO, "test: pwrite failed")
        return real(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", flaky)
    return failed


def test_failed_pwrite_turning_kept_to_one_fails_the_write_and_retries(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)
    # try_mark writes it under the lock; a failure there is tried once more by mark()
    failed = _failing_pwrite(monkeypatch, b"\x01", times=2)
    with pytest.raises(OSError):
        t.mark(3 * RS, RS)
    assert len(failed) == 2 and t._persisted[3] == _KEPT and disk(vol)[3] == KEPT_BYTE
    t.mark(3 * RS, RS)  # the next try writes it
    check_consistent(vol, t)
    again = restart(vol, t)
    assert 3 in marked(again)
    again.close()


def test_one_failed_pwrite_turning_kept_to_one_is_tried_again_at_once(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)
    with t.lock:
        failed = _failing_pwrite(monkeypatch, b"\x01")
        assert not t.try_mark(3 * RS, RS)  # no exception under an owner's lock
    assert failed and t._persisted[3] == _KEPT and disk(vol)[3] == KEPT_BYTE
    t.mark(3 * RS, RS)
    assert t._persisted[3] == _DURABLE and disk(vol)[3] == 1
    check_consistent(vol, t)


def test_failed_pwrite_of_the_extent_around_kept_regions(vol, monkeypatch, hot):
    t = tracker(vol)
    t.release(keep(t, 3), keep_hot=True)  # extent 0 kept whole
    others = np.ones(vol.regions, dtype=np.uint8)
    others[3] = 0
    t.clear(others)  # all clear but region 3
    assert disk(vol)[3] == KEPT_BYTE and np.count_nonzero(disk(vol)) == 1
    failed = _failing_pwrite(monkeypatch, b"\x01", offset=0)  # the run [0, 3) of extent 0
    with pytest.raises(OSError):
        t.mark(3 * RS, 2 * RS)  # regions 3 (kept) and 4 (clear)
    assert failed == [0]
    assert t._persisted[3] == _DURABLE and disk(vol)[3] == 1  # 3 said 1 again
    assert (t._persisted[:3] == _CLEAR).all() and t._persisted[4] == _CLEAR
    t.mark(3 * RS, 2 * RS)
    check_consistent(vol, t)
    again = restart(vol, t)
    assert {3, 4} <= marked(again)
    again.close()


def test_failed_pwrite_of_the_kept_byte_leaves_the_intent_durable(vol, monkeypatch):
    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.swap_and_reset()
    _failing_pwrite(monkeypatch, bytes([KEPT_BYTE]))
    with pytest.raises(OSError):
        t.release_runs([(3, 4)], keep_hot=True)
    assert t._persisted[3] == _DURABLE and disk(vol)[3] == 1
    again = restart(vol, t)
    assert 3 in marked(again)  # (b), conservative: sent again
    again.close()


# -- failed fdatasync --------------------------------------------------------------------
def test_failed_sync_forgets_the_boot_and_stops_keeping(vol, monkeypatch, hot):
    t = tracker(vol)
    t.release(keep(t, 3, 5), keep_hot=True)
    t.mark(3 * RS, RS)  # kept -> 1, unsynced
    fail_fdatasync(monkeypatch, fd=t._fd)
    with pytest.raises(OSError):
        t.mark(2 * EXT * RS, RS)
    assert not (vol.path / BOOT_FILE).exists()
    assert not (t._persisted == _KEPT).any()
    t.mark(2 * EXT * RS, RS)
    # keeping is off: a conveyed region is cleared, the boot never recorded again
    t.release(t.swap_and_reset(), keep_hot=True)
    assert not (vol.path / BOOT_FILE).exists()
    poke(vol, 3, KEPT_BYTE)  # the lost page: the disk had the 2
    again = restart(vol, t)
    assert 3 in marked(again)
    again.close()


def test_failed_sync_of_the_reboot_rewrite_keeps_the_kept_bytes_intents(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3)
    kill(t)
    reboot(monkeypatch)
    fail_fdatasync(monkeypatch, times=2)  # the first sync of the map, then the rewrite's
    with pytest.raises(OSError):
        tracker(vol)
    with pytest.raises(OSError):
        tracker(vol)
    poke(vol, 3, KEPT_BYTE)  # the rewritten 1 lost with the failed sync
    again = tracker(vol)
    assert 3 in marked(again)
    again.close()


def test_failed_fdatasync_in_close_forgets_the_boot(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)
    t.mark(3 * RS, RS)  # the host writes region 3 again: its 1 only in the page cache
    fail_fdatasync(monkeypatch, fd=t._fd)
    with pytest.raises(OSError):
        t.close()
    poke(vol, 3, KEPT_BYTE)  # the failed writeback dropped the page: the disk had the 2
    again = tracker(vol)  # restarted in the same boot
    assert 3 in marked(again)  # lost: region 3 taken for clean
    again.close()


def test_failed_fdatasync_at_start_forgets_the_boot(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)
    t.mark(3 * RS, RS)  # written again: its 1 unsynced
    kill(t)  # SIGKILL; then the writeback of that page fails
    poke(vol, 3, KEPT_BYTE)
    fail_fdatasync(monkeypatch)  # the new descriptor's first fdatasync reports it
    with pytest.raises(OSError):
        tracker(vol)
    again = tracker(vol)  # the next start: the error was reported already
    assert 3 in marked(again)
    again.close()


def test_failed_forget_boot_is_logged_not_raised(vol, monkeypatch, caplog):
    t = tracker(vol)
    keep(t, 3)
    real_unlink = os.unlink

    def no_unlink(p, *a, **kw):
        if str(p).endswith(BOOT_FILE):
            raise OSError(errno.EROFS, "test: read-only")
        return real_unlink(p, *a, **kw)

    monkeypatch.setattr(os, "unlink", no_unlink)
    fail_fdatasync(monkeypatch, fd=t._fd)
    with pytest.raises(OSError, match="fdatasync"):
        t.mark(2 * EXT * RS, RS)
    assert "restart nothing in this boot" in caplog.text
    assert not t._keeping
    t.close()


# -- mark_map ----------------------------------------------------------------------------
def test_mark_map_over_only_kept_regions_needs_no_sync(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, EXT + 3)
    syncs = count_syncs(monkeypatch, t)
    want = np.zeros(vol.regions, dtype=np.uint8)
    want[[3, EXT + 3]] = 1
    t.mark_map(want)
    assert syncs == []
    check_consistent(vol, t)
    again = restart(vol, t)
    assert {3, EXT + 3} <= marked(again)
    again.close()


def test_mark_map_of_a_clear_region_then_a_kept_one_is_durable(vol, monkeypatch):
    t = tracker(vol)
    keep(t, EXT + 3)  # a kept region in extent 1; extent 0 all clear
    syncs = count_syncs(monkeypatch, t)
    want = np.zeros(vol.regions, dtype=np.uint8)
    want[[0, EXT + 3]] = 1  # the secondary's marks
    t.mark_map(want)
    try:
        assert t._persisted[0] == _DURABLE  # "durable when this returns"
        assert len(syncs) == 1
    finally:
        t.close()


def test_an_extent_never_written_is_cold_just_after_boot(vol, monkeypatch):
    monkeypatch.setattr(regions, "time", types.SimpleNamespace(monotonic=lambda: 1.0))
    t = tracker(vol)
    want = np.zeros(vol.regions, dtype=np.uint8)
    want[3] = 1
    t.mark_map(want)  # the secondary's marks: no host write touched extent 0
    t.swap_and_reset()
    t.release_runs([(3, 4)], keep_hot=True)
    try:
        assert disk(vol)[3] == 0
    finally:
        t.close()


def test_mark_map_across_chunks_is_durable(vol, monkeypatch):
    monkeypatch.setattr(regions, "PASS_CHUNK", EXT)
    t = tracker(vol)
    keep(t, 2 * EXT + 1)
    want = np.zeros(vol.regions, dtype=np.uint8)
    want[[5, 2 * EXT + 1]] = 1
    t.mark_map(want)
    try:
        assert t._persisted[5] == _DURABLE
    finally:
        t.close()


# -- cycle operations with kept regions --------------------------------------------------
def test_give_back_after_part_conveyed(vol):
    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.mark(4 * RS, RS)
    taken = t.swap_and_reset()
    t.release_runs([(3, 4)], keep_hot=True)
    t.give_back(taken)
    assert {3, 4} <= marked(t)
    t.mark(3 * RS, RS)  # a later write to the kept region still says 1 first
    assert disk(vol)[3] == 1 and disk(vol)[4] == 1
    again = restart(vol, t)
    assert {3, 4} <= marked(again)
    again.close()


def test_clear_over_kept_regions_and_a_write_after(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)
    assert t.clear() >= 2
    assert KEPT_BYTE not in disk(vol)
    syncs = count_syncs(monkeypatch, t)
    t.mark(3 * RS, RS)
    assert len(syncs) == 1  # clear means clear: the intent made durable again
    check_consistent(vol, t)
    t.close()


def test_retake_after_a_restart_then_release(vol, monkeypatch):
    t = tracker(vol)
    t.mark(3 * RS, RS)
    t.mark(4 * RS, RS)
    taken = t.swap_and_reset()
    t.release_runs([(3, 4)], keep_hot=True)  # 3 conveyed (kept), 4 not yet
    again = restart(vol, t)
    assert 3 not in marked(again) and 4 in marked(again)
    again.retake(taken)  # the open cycle resumes
    assert not marked(again) & {3, 4}
    again.mark(3 * RS, RS)  # written since (copied first): stays marked
    again.release(taken, keep_hot=True)
    assert 3 in marked(again) and disk(vol)[3] == 1
    third = restart(vol, again)
    assert 3 in marked(third) and 4 not in marked(third)
    third.close()


def test_kept_in_one_boot_rewritten_then_kept_in_the_next(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3)
    kill(t)
    reboot(monkeypatch, "boot-b")
    b = tracker(vol)
    assert 3 in marked(b)
    keep(b, EXT + 1)  # records boot-b
    assert (vol.path / BOOT_FILE).read_text().strip() == "boot-b"
    again = restart(vol, b)
    assert 3 in marked(again) and EXT + 1 not in marked(again)
    again.close()


# -- races -------------------------------------------------------------------------------
def test_writers_race_cycles_marks_stay_durable(vol, hot):
    t = tracker(vol, durable=False)  # no real fdatasync: fast; the logic is the same
    t._keeping = True
    rounds = 1500
    errors: list[str] = []
    stop = threading.Event()

    def writer(k: int) -> None:
        rng = random.Random(k)
        for _ in range(rounds):
            r = rng.randrange(0, vol.regions // 2) * 2 + k  # its own regions only
            n = 1 if rng.random() < 0.8 else 2
            if r + n > vol.regions:
                n = 1
            t.mark(r * RS, n * RS)
            with t.lock:
                for x in range(r, r + n):
                    if t.marks[x] and (t._persisted[x] != _DURABLE or
                                       os.pread(t._fd, 1, x) != b"\x01"):
                        errors.append(f"region {x}: state {t._persisted[x]}, "
                                      f"byte {os.pread(t._fd, 1, x)!r}")

    def cycler() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            taken = t.swap_and_reset()
            runs = np.flatnonzero(taken).tolist()
            for r in runs:
                if rng.random() < 0.7:
                    t.release_runs([(r, r + 1)], keep_hot=True)
            t.release(taken, keep_hot=rng.random() < 0.9)

    ws = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    c = threading.Thread(target=cycler)
    c.start()
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    stop.set()
    c.join()
    assert errors == []
    check_consistent(vol, t)
    live = marked(t)
    again = restart(vol, t)
    assert live <= marked(again)
    again.close()


def test_writer_on_a_kept_region_races_release_runs(vol, hot):
    """One region written over and over while a cycle takes and conveys it over and
    over: whenever it is marked, its byte is 1 (and a restart finds it)."""
    t = tracker(vol)
    t.mark(3 * RS, RS)
    done = threading.Event()
    bad: list[str] = []

    def writer() -> None:
        for _ in range(3000):
            t.mark(3 * RS, 100)
            with t.lock:
                if t.marks[3] and os.pread(t._fd, 1, 3) != b"\x01":
                    bad.append(f"marked over {os.pread(t._fd, 1, 3)!r}")
        done.set()

    w = threading.Thread(target=writer)
    w.start()
    while not done.is_set():
        taken = t.swap_and_reset()
        t.release_runs([(3, 4)], keep_hot=True)
        t.release(taken, keep_hot=True)
    w.join()
    assert bad == []
    check_consistent(vol, t)
    t.mark(3 * RS, 1)
    again = restart(vol, t)
    assert 3 in marked(again)
    again.close()


# -- a model: random operations, restarts and reboots ------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_never_lose_a_mark(vol, monkeypatch, seed):
    rng = random.Random(seed)
    boot_no = [0]
    monkeypatch.setattr(boot, "boot_id", lambda: f"boot-{boot_no[0]}")
    real_sync, fail_next = os.fdatasync, [False]

    def sync(fd):
        if fail_next[0]:
            fail_next[0] = False
            raise OSError(errno.EIO, "test: fdatasync failed")
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", sync)
    t = tracker(vol)
    must: set[int] = set()  # written and not conveyed since
    taken: np.ndarray | None = None
    since: set[int] = set()  # written since the take
    for _ in range(250):
        op = rng.random()
        monkeypatch.setattr(regions, "HOT_SECONDS", rng.choice([0.0, 3600.0, 3600.0]))
        if op < 0.45:
            r = rng.randrange(vol.regions)
            n = min(rng.choice([1, 1, 2, 70]), vol.regions - r)
            fail_next[0] = rng.random() < 0.05
            try:
                t.mark(r * RS, n * RS)
            except OSError:
                continue
            finally:
                fail_next[0] = False
            must |= set(range(r, r + n))
            since |= set(range(r, r + n))
        elif op < 0.55 and taken is None:
            taken, since = t.swap_and_reset(), set()
        elif op < 0.75 and taken is not None:
            a = rng.randrange(vol.regions)
            b = min(vol.regions, a + rng.randrange(1, 80))
            t.release_runs([(a, b)], keep_hot=True)
            must -= {x for x in range(a, b) if taken[x] and x not in since}
        elif op < 0.85 and taken is not None:
            if rng.random() < 0.2:
                t.give_back(taken)
            else:
                t.release(taken, keep_hot=rng.random() < 0.8)
                must -= {x for x in np.flatnonzero(taken).tolist() if x not in since}
            taken = None
        elif op < 0.95:
            if rng.random() < 0.3:
                boot_no[0] += 1  # a reboot
            t, taken = restart(vol, t), None
            assert must <= marked(t), sorted(must - marked(t))
            assert offline(vol) == marked(t)
        else:
            t.close()
            t, taken = tracker(vol), None
            assert must <= marked(t)
        if rng.random() < 0.2:
            with t.lock:
                st = t._persisted.copy()
                d = np.frombuffer(os.pread(t._fd, vol.regions, 0), dtype=np.uint8)
            assert ((st == _KEPT) == (d == KEPT_BYTE)).all()
            assert (d[st == _DURABLE] == 1).all()
            assert (d[sorted(must)] == 1).all()  # what a SIGKILL now must find
    t = restart(vol, t)
    assert must <= marked(t)
    t.close()


def test_a_frame_of_scattered_runs_is_released_in_few_writes(vol, monkeypatch, hot):
    """release_runs: one write per page of the map, the bytes between the runs written as
    they are; the map agrees with memory after, kept and cleared alike."""
    t = tracker(vol)
    rs = list(range(1, 3 * EXT, 5))
    for r in rs:
        t.mark(r * RS, RS)
    taken = t.swap_and_reset()
    t.mark(2 * RS, RS)  # after the take: stays marked
    monkeypatch.setattr(regions, "HOT_SECONDS", 0.0)  # nothing hot: cleared ...
    t.release_runs([(r, r + 1) for r in rs[:10]], keep_hot=True)
    monkeypatch.setattr(regions, "HOT_SECONDS", 3600.0)  # ... then all hot: kept
    real, writes = os.pwrite, []

    def counting(fd, buf, off):
        writes.append((off, len(buf)))
        return real(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", counting)
    t.release_runs([(r, r + 1) for r in rs[10:]], keep_hot=True)
    assert len(writes) == 1, writes
    d = disk(vol)
    assert (d[rs[:10]] == 0).all() and (d[rs[10:]] == KEPT_BYTE).all() and d[2] == 1
    check_consistent(vol, t)
    t.release(taken, keep_hot=True)
    again = restart(vol, t)
    assert marked(again) == {2}
    again.close()


# -- try_mark over several regions (session 12: a 1 MiB write spans 16) ------------------
def test_a_write_over_kept_and_durable_regions_is_marked_in_try_mark(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 5)  # 3 and 5 kept
    t.mark(4 * RS, RS)  # 4 durable
    syncs = count_syncs(monkeypatch, t)
    with t.lock:
        assert t.try_mark(3 * RS + 512, 3 * RS - 1024)  # 3, 4 and 5: no mark() needed
    assert syncs == [] and (disk(vol)[3:6] == 1).all()
    assert (t._persisted[3:6] == _DURABLE).all() and (t.marks[3:6] == 1).all()
    check_consistent(vol, t)
    again = restart(vol, t)
    assert {3, 4, 5} <= marked(again)
    again.close()


def test_a_write_over_kept_and_clear_regions_leaves_try_mark_to_mark(vol):
    t = tracker(vol)
    keep(t, EXT - 1)  # kept; EXT and EXT + 1 (extent 1) never written: clear
    assert t._persisted[EXT - 1] == _KEPT and t._persisted[EXT + 1] == regions._CLEAR
    with t.lock:
        assert not t.try_mark((EXT - 1) * RS, 3 * RS)
    assert t._persisted[EXT - 1] == _KEPT, "nothing written when mark() must persist"
    t.mark((EXT - 1) * RS, 3 * RS)
    assert (t._persisted[EXT - 1:EXT + 2] == _DURABLE).all()
    check_consistent(vol, t)


def test_a_failed_pwrite_over_several_kept_regions_leaves_them_kept(vol, monkeypatch):
    t = tracker(vol)
    keep(t, 3, 4)
    with t.lock:
        failed = _failing_pwrite(monkeypatch, b"\x01")
        assert not t.try_mark(3 * RS, 2 * RS)
    assert failed == [3] and (t._persisted[3:5] == _KEPT).all()
    assert (disk(vol)[3:5] == KEPT_BYTE).all()
    t.mark(3 * RS, 2 * RS)
    assert (disk(vol)[3:5] == 1).all()
    check_consistent(vol, t)
