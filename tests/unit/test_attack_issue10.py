"""Attacks on the fixes of issue 10 (marks and copies under failed syncs, chain.seq damage).

Each test here shows a bug an attack found (fixed since).

The failed-sync tests model what Linux does when fdatasync(2) fails (the
"fsyncgate" semantics): the write-back of the file's dirty pages failed, those
pages are marked clean anyway, and the error is reported once per open file.
So every byte written to the file before the failed sync is unknown on disk,
and a later fdatasync on the same fd returns 0 without writing it again. The
only way to get such a byte on disk is to write it again. Both tests put the
other writer's bytes in the same page as the failed ones (the whole map is one
page), so its bytes certainly went down with the failed write-back.
"""

from __future__ import annotations

import errno
import os
import threading

import pytest

from volume_core import regions, snapshots
from volume_core.engine import Engine
from volume_core.errors import NbdMirrorError
from volume_core.regions import RegionTracker
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 64 << 10


def wait(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_failed_map_sync_loses_the_intent_of_a_write_it_did_not_batch(tmp_path, monkeypatch):
    """Bug: RegionTracker._sync_upto() rolls back only the batch it took.

    Thread A persists region 0 and, holding the sync lock, calls fdatasync.
    Meanwhile thread B persists region 600 (pwrite of its map byte, the same
    page) and waits for the sync lock. A's fdatasync fails (EIO): Linux marks
    the page clean without having written it. A rolls back region 0 and fails
    its write (right). B then takes the sync lock, its fdatasync returns 0 (the
    error was already reported on this fd, nothing is dirty), and B's region is
    promoted to DURABLE and B's write lands: an acknowledged write whose mark
    never reached the disk. Every map write made before a failed sync must be
    redone (all WRITTEN regions back to CLEAR, not just the failed batch's).
    """
    vol = Volume.create(tmp_path / "v", 1024 * RS, RS)  # 1024 regions: one page of map
    t = RegionTracker(vol.marks_path, vol.regions, vol.region_size)
    b_region = 600
    log: list[tuple[str, int, int]] = []  # ("write", start, stop) / ("sync-failed", 0, 0)
    real_pwrite = regions.pwrite_full
    real_fdatasync = os.fdatasync

    def pwrite(fd, buf, offset):
        if fd == t._fd:
            log.append(("write", offset, offset + len(buf)))
        return real_pwrite(fd, buf, offset)

    b_error: list[BaseException] = []

    def b_writes():
        try:
            t.mark(b_region * RS, 1)
        except BaseException as err:  # noqa: BLE001
            b_error.append(err)

    b = threading.Thread(target=b_writes)
    calls = []

    def fdatasync(fd):
        if fd != t._fd:
            return real_fdatasync(fd)
        calls.append(fd)
        if len(calls) == 1:  # A's sync: B writes its intent meanwhile, then the sync fails
            b.start()
            wait(lambda: any(s <= b_region < e for _, s, e in log if _ == "write"))
            log.append(("sync-failed", 0, 0))
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fdatasync(fd)

    monkeypatch.setattr(regions, "pwrite_full", pwrite)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        with pytest.raises(OSError):
            t.mark(0, 1)  # A: its write fails, the client sees EIO (right)
        b.join(10)
        assert not b.is_alive()
        if b_error:  # failing B's write too would be correct
            return
        # B's write would now land: its intent must have been written after the failure.
        failed = log.index(("sync-failed", 0, 0))
        rewritten = [e for e in log[failed + 1:] if e[0] == "write" and e[1] <= b_region < e[2]]
        assert rewritten, (f"region {b_region} reported durable, but its map byte was last "
                           f"written before the failed fdatasync: {log}")
    finally:
        monkeypatch.setattr(os, "fdatasync", real_fdatasync)
        t.close()


def test_a_failed_store_sync_loses_a_copy_on_write_it_did_not_batch(tmp_path, monkeypatch):
    """Bug: SnapshotChain._commit() unclaims only the batch it took.

    A snapshot exists; writer A's copy of region 1 is committed: its
    record_preserved() calls fdatasync(store) while holding the commit lock.
    Meanwhile writer B copies region 9 into the store (same file, written
    before the sync) and queues for the commit. A's fdatasync fails (EIO): the
    store's dirty pages, B's copy among them, are dropped. A's regions are
    unclaimed and A's write fails. B's commit then syncs (returns 0: nothing
    dirty, error already reported), writes the preserved map, and B's live
    write lands: the snapshot reads region 9 from a copy that never reached
    the disk (zeros after a reboot), silently. Every copy made before a failed
    store sync must be made again.
    """
    vol = Volume.create(tmp_path / "v", 16 * RS, RS)
    with open(vol.data_path, "r+b") as f:
        f.write(b"o" * vol.size)  # the "old" contents the snapshot must keep
    engine = Engine(vol)
    try:
        engine.create_snapshot("s")
        chain = engine.snapshots
        store_fd = chain.newest.store_fd
        copies: list[tuple[str, int]] = []
        real_copy = snapshots.native.copy_runs
        real_fdatasync = os.fdatasync

        class Native:  # snapshots.native, with copy_runs recorded
            def __getattr__(self, name):
                return getattr(regions.native, name)

            @staticmethod
            def copy_runs(src, dst, runs, region_size, size):
                if dst == store_fd:
                    for start, count in runs.tolist():
                        copies.extend(("copy", r) for r in range(start, start + count))
                return real_copy(src, dst, runs, region_size, size)

        b_error: list[BaseException] = []

        def b_writes():
            try:
                engine.pwrite(b"B" * 4096, 9 * RS)
            except BaseException as err:  # noqa: BLE001
                b_error.append(err)

        b = threading.Thread(target=b_writes)
        calls = []

        def fdatasync(fd):
            if fd != store_fd:
                return real_fdatasync(fd)
            calls.append(fd)
            if len(calls) == 1:  # A's commit: B copies meanwhile, then the sync fails
                b.start()
                wait(lambda: ("copy", 9) in copies and chain.cow._batch)
                copies.append(("sync-failed", -1))
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_fdatasync(fd)

        monkeypatch.setattr(snapshots, "native", Native())
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        with pytest.raises(OSError):
            engine.pwrite(b"A" * 4096, 1 * RS)  # A's write fails (right)
        b.join(10)
        assert not b.is_alive()
        monkeypatch.setattr(os, "fdatasync", real_fdatasync)
        if b_error:  # failing B's write too would be correct
            return
        assert chain.newest.preserved[9] == 1
        failed = copies.index(("sync-failed", -1))
        assert ("copy", 9) in copies[failed + 1:], (
            f"region 9 recorded preserved (and overwritten live) although its only copy was "
            f"made before the failed store fdatasync: {copies}")
    finally:
        monkeypatch.setattr(os, "fdatasync", real_fdatasync)
        engine.close()


def test_a_chain_counter_at_its_maximum_is_refused_before_anything_is_written(tmp_path):
    """chain.seq is checked for its value too, not only its size (8 bytes).

    Found by an attack: with b'\\xff' * 8 in VOL/snapshots/chain.seq, `snapshot
    create` failed with "internal error: OverflowError" after it had made the
    snapshot. A damaged counter must be refused, naming the file, before
    anything is written.
    """
    vol = Volume.create(tmp_path / "v", 16 * RS, RS)
    (vol.snapshot_dir / "chain.seq").write_bytes(b"\xff" * 8)
    before = sorted(p.name for p in vol.snapshot_dir.iterdir())
    with pytest.raises(NbdMirrorError, match="chain.seq.*implausibly large"):
        Engine(vol)
    with pytest.raises(NbdMirrorError, match="chain.seq"):
        Volume.open(vol.path)
    assert sorted(p.name for p in vol.snapshot_dir.iterdir()) == before
