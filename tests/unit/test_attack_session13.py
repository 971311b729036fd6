"""Attack on session 13's two changes.

0e88cff: once a cycle's block masks are recorded, a host write inside one region still
KEEP that hits a frozen block copies it through ``CycleFreeze._copy_one`` (claim under
``cow.lock``, one read and one write from the first frozen block to the last, the COPIED
byte on disk, then memory); a write over several regions goes through
``CowStore.preserve_spans``, which now asks its target to ``copy_regions`` (a snapshot:
whole regions; a freeze: its frozen blocks). Attacked: the conveyor's ``read_range`` of a
region while it is copied and after; acks (``conveyed_runs``) at each point of a copy;
writers hitting, missing and spanning the same region at once; EIO at every step of a
copy, then retries; a SIGKILL (descriptors closed, nothing cleaned up) right after a
copy, at the freeze and at the mirror level; masks of one block (first, last), region
sizes 4K, 8K, 64K and 1M, short last regions; user snapshots beside an open cycle.

c0de4eb: ``native/arena.c`` (a caching arena allocator for CPython) installed by
``memory.keep_stack_chunks``. Its tests run in a child interpreter each: installed in
this process it would stay in for every later test. Found: the cache kept the first 16
blocks freed and never evicted one, so blocks of another size freed while the 16K
stacks were in use held every slot for good (fixed: the oldest freed block leaves).

Real engines, files, freezes and mirrors; faults are injected by wrapping the module's
``pwrite_full``/``native.copy_runs``/``native.copy_range`` for one descriptor and one thread,
and threads are held at a point the same way.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import wait_until
from tests.unit import test_freeze_blocks
from tests.unit.test_attack_session11 import crash, live, restarted, resume_and_check
from tests.unit.test_attack_skip_copy import after_record, filled, pair
from tests.unit.test_freeze_blocks import (
    K4,
    RS,
    at,
    frozen,
    live_block,
    store_block,
)
from volume_core import cycle_freeze as cf
from volume_core import native
from volume_core.blocks import BlockGeometry
from volume_core.cycle_freeze import COPIED, DIR, FREE, KEEP, STATE, CycleFreeze
from volume_core.engine import Engine
from volume_core.snapshot_view import SnapshotView
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
#: (vol, engine, before): 64 regions of 64K full of random bytes (test_freeze_blocks)
fresh = test_freeze_blocks.fresh


# -- helpers ------------------------------------------------------------------------------

def disk_state(vol: Volume) -> np.ndarray:
    return np.fromfile(vol.path / DIR / STATE, dtype=np.uint8)


def make(tmp_path, rs: int, regions: int, short: int = 0, seed: int = 1
         ) -> tuple[Volume, Engine, bytes]:
    """A volume of ``regions`` regions of ``rs`` bytes, the last ``short`` bytes short,
    full of random bytes; its engine; its contents."""
    vol = Volume.create(tmp_path / f"v{rs}", rs * regions - short, rs)
    engine = Engine(vol)
    before = random.Random(seed).randbytes(vol.size)
    engine.pwrite(before, 0)
    return vol, engine, before


def freeze_of(vol: Volume, engine: Engine, masks: dict[int, int]) -> CycleFreeze:
    """Cycle 1 taking the regions of ``masks`` (region -> frozen blocks), hook on, masks
    recorded (``test_freeze_blocks.frozen`` for any geometry)."""
    taken = np.zeros(vol.regions, dtype=np.uint8)
    blocks = np.zeros(vol.regions, dtype=np.uint16)
    for region, mask in masks.items():
        taken[region], blocks[region] = 1, mask
    freeze = CycleFreeze.create(vol, engine.fd, 1, taken, blocks=blocks)
    engine.pre_write.append(freeze.preserve)
    assert freeze.record_blocks()
    return freeze


def frozen_extents(freeze: CycleFreeze, region: int) -> list[tuple[int, int]]:
    bg = BlockGeometry(freeze.geometry.size, freeze.geometry.shift)
    return [tuple(e) for e in bg.run_extents(freeze.blocks, [(region, region + 1)]).tolist()]


def wrong_frozen(freeze: CycleFreeze, before: bytes, regions=None) -> list[tuple[int, int]]:
    """The frozen extents of ``regions`` (default: all still to convey) that do not read
    as at the take."""
    if regions is None:
        regions = np.flatnonzero(freeze.preserved != FREE).tolist()
    bad = []
    for region in regions:
        for offset, length in frozen_extents(freeze, region):
            buf = bytearray(length)
            freeze.read_range(offset, memoryview(buf))
            if bytes(buf) != before[offset:offset + length]:
                bad.append((region, offset))
    return bad


def reopen(vol: Volume, engine: Engine, freeze: CycleFreeze) -> CycleFreeze:
    """A SIGKILL and a restart: the freeze's descriptors go with nothing cleaned up or
    synced (the page cache keeps what was written), then ``CycleFreeze.open``."""
    freeze.close()
    engine.pre_write.clear()
    again = CycleFreeze.open(vol, engine.fd)
    assert again is not None
    engine.pre_write.append(again.preserve)
    return again


class Point:
    """Hold (and maybe fail) the first call of ``module.name`` that ``match`` accepts,
    made on a thread named ``thread``: ``reached`` once it is there, it goes on at
    ``go`` (``after``: held once the call is made). ``fail``: 'before' raises EIO
    instead of the call, 'after' makes the call then raises EIO (an error reported for
    a write that happened)."""

    def __init__(self, monkeypatch, module, name: str, thread: str, match=lambda *a: True,
                 fail: str | None = None, hold: bool = True, after: bool = False):
        self.reached, self.go = threading.Event(), threading.Event()
        if not hold:
            self.go.set()
        self._lock, self._done = threading.Lock(), False
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            mine = False
            if threading.current_thread().name == thread and match(*args):
                with self._lock:
                    mine, self._done = not self._done, True
            if not mine:
                return real(*args, **kwargs)
            out = real(*args, **kwargs) if after else None
            self.reached.set()
            assert self.go.wait(10), "never let go"
            if fail == "before":
                raise OSError(errno.EIO, "injected EIO")
            if not after:
                out = real(*args, **kwargs)
            if fail == "after":
                raise OSError(errno.EIO, "injected EIO after the write")
            return out

        monkeypatch.setattr(module, name, wrapper)


class Writer(threading.Thread):
    """``engine.pwrite(data, offset)`` on a thread named ``name``; its error kept."""

    def __init__(self, engine: Engine, name: str, data: bytes, offset: int):
        super().__init__(name=name, daemon=True)
        self.engine, self.data, self.offset = engine, data, offset
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.engine.pwrite(self.data, self.offset)
        except BaseException as err:  # noqa: BLE001 - looked at by the test
            self.error = err

    def finish(self) -> None:
        self.join(10)
        assert not self.is_alive(), f"{self.name} never finished"


# -- what one copy keeps, every geometry ------------------------------------------------------

GEOMS = {  # name: (region size, regions, bytes short of the last region)
    "4K": (4 << 10, 24, 0),
    "8K-short": (8 << 10, 24, 512),  # the last region 7.5K: its second block 3.5K
    "64K-short": (64 << 10, 8, 20 << 10),  # the last region 44K: 11 blocks
    "1M-short": (1 << 20, 3, 700 << 10),  # the last region 324K: 5 blocks and a piece
}


@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("kind", ["first", "last", "first+last", "scattered", "full"])
def test_a_copy_on_write_keeps_first_to_last_frozen_block_for_every_geometry(
        tmp_path, geom, kind):
    """Two regions frozen with the same kind of mask: one whole-size region in the
    middle and the (maybe short) last one. A 512-byte write on the highest frozen block
    inside the volume of each: ``_copy_one``. The store holds exactly the bytes from
    the first frozen block to the last (cut at the end of the volume) as at the take
    and nothing else of the region; the COPIED byte is on disk; the frozen blocks read
    as at the take; a second write to the region copies nothing."""
    rs, n, short = GEOMS[geom]
    vol, engine, before = make(tmp_path, rs, n, short)
    try:
        bg = BlockGeometry(vol.size, vol.geometry.shift)
        per, bs = bg.full.bit_length(), 1 << bg.shift
        last = vol.regions - 1
        in_last = -(-(vol.size - last * rs) // bs)  # blocks of the last region in the volume
        masks = {"first": 1, "last": 1 << (per - 1), "first+last": 1 | 1 << (per - 1),
                 "scattered": 0b0100_0010_0100_0110 & bg.full or 1, "full": bg.full}
        mask = masks[kind]
        lastmask = mask if kind != "last" else 1 << (in_last - 1)  # a block in the volume
        mid = 1
        freeze = freeze_of(vol, engine, {mid: mask, last: lastmask})
        for region, m in ((mid, mask), (last, lastmask)):
            base = region * rs
            top = max(b for b in range(per) if m >> b & 1 and base + b * bs < vol.size)
            engine.pwrite(b"\xa1" * 512, base + top * bs)
            assert freeze.preserved[region] == COPIED
            assert disk_state(vol)[region] == COPIED
            lo = base + ((m & -m).bit_length() - 1) * bs
            hi = min(base + m.bit_length() * bs, vol.size)
            end = min(base + rs, vol.size)
            store = os.pread(freeze.store_fd, end - base, base)
            want = bytes(lo - base) + before[lo:hi] + bytes(end - hi)
            assert store == want, (region, kind)
        assert freeze.cow.copies == 2 and not freeze.copying.any()
        engine.pwrite(b"\xa2" * 512, rs * mid)
        assert freeze.cow.copies == 2
        assert not wrong_frozen(freeze, before)
        freeze.drop()
    finally:
        engine.close()


def test_a_write_spanning_into_a_short_last_region_copies_frozen_blocks_up_to_the_end(
        tmp_path):
    """``copy_regions`` (writes over two regions): region 0 was taken with no mask (whole),
    region 1 with block 3; region 2 has only its last block frozen, the short last
    region (24K: 6 blocks) a full mask of 16 blocks, past the end. Region 0 is copied
    whole and block 3 of 1; then block 15 of region 2 and the 24K of region 3; all
    read as at the take; the store ends where the volume does."""
    rs = 64 << 10
    vol, engine, before = make(tmp_path, rs, 4, short=40 << 10)
    try:
        freeze = freeze_of(vol, engine, {0: 0, 1: 1 << 3, 2: 1 << 15, 3: 0xFFFF})
        engine.pwrite(b"\xa4" * 1024, rs - 512)  # over 0 (no mask: whole) and 1 (block 3)
        assert list(freeze.preserved[0:2]) == [COPIED, COPIED]
        assert os.pread(freeze.store_fd, 2 * rs, 0) == (before[:rs] + bytes(3 * K4)
                                                        + before[rs + 3 * K4:rs + 4 * K4]
                                                        + bytes(12 * K4))
        engine.pwrite(b"\xa3" * (3 * K4), 2 * rs + 15 * K4)  # block 15 of 2, 0-1 of 3
        assert list(freeze.preserved[2:4]) == [COPIED, COPIED]
        assert list(disk_state(vol)[2:4]) == [COPIED, COPIED]
        store = os.pread(freeze.store_fd, 2 * rs, 2 * rs)
        assert store == bytes(15 * K4) + before[2 * rs + 15 * K4:]
        assert os.fstat(freeze.store_fd).st_size == vol.size
        assert not wrong_frozen(freeze, before)
        freeze.drop()
    finally:
        engine.close()


# -- the conveyor and other writers while a copy is under way --------------------------------

def test_the_conveyor_and_three_writers_while_a_copy_is_held(fresh, monkeypatch):
    """Writer 'hit' hits frozen block 3 of region 8 (blocks 1 and 3 frozen); its copy is
    held just before it runs (one ``native.copy_range``, live file to store). Meanwhile:
    the conveyor reads the frozen blocks (as at the take); 'miss' (block 7) lands
    without waiting; 'hit2' (block 1) waits for the copy; 'span' (block 15 of 8 to block 0 of
    9, whose blocks 0 and 15 are frozen) copies region 9's frozen blocks through
    ``CowStore`` and then waits for region 8. Let go: every write lands, the store
    holds blocks 1-3 of region 8 and blocks 0 and 15 of region 9 as at the take, and
    the frozen blocks read as at the take."""
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 0b1010, 9: 1 | 1 << 15})
    point = Point(monkeypatch, native, "copy_range", "hit",
                  match=lambda src, dst, *a: dst == freeze.store_fd)
    hit = Writer(engine, "hit", b"\xb1" * 512, at(8, 3) + 512)
    hit.start()
    others = []
    try:
        assert point.reached.wait(10)
        assert freeze.copying[8] == 1 and freeze.preserved[8] == KEEP
        assert not wrong_frozen(freeze, before, [8, 9])
        miss = Writer(engine, "miss", b"\xb2" * K4, at(8, 7))
        miss.start()
        miss.finish()
        assert miss.error is None and freeze.touched[8] == 1
        assert live_block(engine, at(8, 7)) == b"\xb2" * K4
        assert not wrong_frozen(freeze, before, [8, 9])
        hit2 = Writer(engine, "hit2", b"\xb3" * 1024, at(8, 1) + 1024)
        span = Writer(engine, "span", b"\xb4" * (2 * K4), at(8, 15))
        others = [hit2, span]
        for w in others:
            w.start()
        wait_until(lambda: freeze.preserved[9] == COPIED, 10, "region 9 copied")
        for w in others:
            w.join(0.2)
            assert w.is_alive(), f"{w.name} landed over a frozen block before its copy"
        assert live_block(engine, at(8, 1)) == before[at(8, 1):at(8, 2)]
        assert not wrong_frozen(freeze, before, [8, 9])
    finally:
        point.go.set()
        hit.finish()
        for w in others:
            w.finish()
    assert [w.error for w in (hit, *others)] == [None] * 3
    assert freeze.preserved[8] == COPIED and freeze.cow.copies == 2
    assert list(disk_state(vol)[8:10]) == [COPIED, COPIED]
    store8 = os.pread(freeze.store_fd, RS, at(8))
    assert store8 == bytes(K4) + before[at(8, 1):at(8, 4)] + bytes(12 * K4)
    assert store_block(freeze, 9, 0) == before[at(9):at(9, 1)]
    assert store_block(freeze, 9, 15) == before[at(9, 15):at(10)]
    assert os.pread(freeze.store_fd, 14 * K4, at(9, 1)) == bytes(14 * K4)
    assert not wrong_frozen(freeze, before, [8, 9])
    assert live_block(engine, at(8, 1))[1024:2048] == b"\xb3" * 1024
    assert live_block(engine, at(8, 15)) == b"\xb4" * K4
    assert live_block(engine, at(9, 0)) == b"\xb4" * K4
    freeze.close()


@pytest.mark.parametrize("where", ["before-map", "after-map"])
@pytest.mark.parametrize("acked", ["itself", "neighbour"])
def test_an_ack_during_a_copy_keeps_free_and_never_leaves_keep_under_a_landed_write(
        fresh, monkeypatch, where, acked):
    """Region 8 is copied by ``_copy_one``, held after its copy but before its COPIED
    byte is written, or after it is written but before memory says so. Meanwhile an
    ack conveys region 8 itself, or its neighbours 7 and 9 (one page-sized stretch of
    the map, 8 inside).
    Then the copy finishes and the write lands, and a later write lands too.

    Memory: a FREE set meanwhile stays FREE; the neighbours' ack leaves 8 COPIED. Disk:
    never KEEP for region 8 (its later writes landed uncopied), the neighbours FREE,
    the other regions as memory has them. After a SIGKILL and a restart the frozen
    blocks of every region still to convey read as at the take."""
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {7: 1, 8: 0b1010, 9: 1, 10: 1 << 15, 12: 0b110})
    engine.pwrite(b"\xc0" * 512, at(12, 1))  # region 12 COPIED before the ack
    if where == "before-map":
        # (after the copy: the COPIED byte itself is written under the copy lock, which
        # the ack takes too)
        point = Point(monkeypatch, CycleFreeze, "_copy_blocks", "hit", after=True)
    else:
        point = Point(monkeypatch, CycleFreeze, "record_preserved", "hit", after=True)
    hit = Writer(engine, "hit", b"\xc1" * 512, at(8, 3) + 512)
    hit.start()
    try:
        assert point.reached.wait(10)
        # the neighbours 7 and 9: one stretch of the map from 7 to 10, region 8 in it
        runs = [(8, 9)] if acked == "itself" else [(7, 8), (9, 10)]
        freeze.conveyed_runs(runs)
        targets = [r for first, stop in runs for r in range(first, stop)]
        assert all(freeze.preserved[t] == FREE for t in targets)
        on_disk = disk_state(vol)
        assert all(on_disk[t] == FREE for t in targets)
        if where == "after-map" and acked == "neighbour":
            assert on_disk[8] == COPIED, "an ack wrote KEEP over a copy's COPIED byte"
        assert on_disk[12] == COPIED
    finally:
        point.go.set()
        hit.finish()
    assert hit.error is None
    assert freeze.preserved[8] == (FREE if acked == "itself" else COPIED)
    assert not freeze.copying.any()
    engine.pwrite(b"\xc2" * K4, at(8, 1))  # lands uncopied (FREE or COPIED)
    assert freeze.cow.copies == 2
    on_disk = disk_state(vol)
    assert on_disk[8] != KEEP, "region 8 written uncopied, yet KEEP on disk"
    others = np.ones(on_disk.size, dtype=bool)
    others[8] = False
    assert np.array_equal(on_disk[others], freeze.preserved[others])
    again = reopen(vol, engine, freeze)
    try:
        assert again.preserved[8] != KEEP
        assert not wrong_frozen(again, before)
    finally:
        again.close()


@pytest.mark.parametrize("extent", ["one-region", "two-regions"])
def test_a_copy_and_its_write_landing_while_the_conveyor_reads_live(fresh, monkeypatch,
                                                                     extent):
    """The conveyor reads a KEEP region's frozen blocks live; its read is held just
    before the system call while a host write hits them: copied (``_copy_one``, or a
    write over both regions: ``CowStore``) and landed. The read then sees the new data,
    and must see the region COPIED afterwards and read the store: the bytes it returns
    are the take's. One region (blocks 1-3 of 8) or an extent over two (block 15 of 8
    and block 0 of 9: ``read_range``'s several-region way)."""
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 0b1110 | 1 << 15, 9: 1})
    offset, length = (at(8, 1), 3 * K4) if extent == "one-region" else (at(8, 15), 2 * K4)
    point = Point(monkeypatch, cf, "pread_full", "conveyor",
                  match=lambda fd, *a: fd == freeze.live_fd)
    buf = bytearray(length)
    reader = threading.Thread(target=freeze.read_range, args=(offset, memoryview(buf)),
                              name="conveyor", daemon=True)
    reader.start()
    try:
        assert point.reached.wait(10)
        if extent == "one-region":
            engine.pwrite(b"\x91" * length, offset)  # inside region 8: _copy_one
        else:
            engine.pwrite(b"\x92" * length, offset)  # over 8 and 9: CowStore
        assert live_block(engine, offset) != before[offset:offset + K4]
    finally:
        point.go.set()
        reader.join(10)
    assert not reader.is_alive()
    assert bytes(buf) == before[offset:offset + length], "read the write that followed the take"
    freeze.close()


@pytest.mark.parametrize("where", ["before-copy", "after-copy", "after-map-write"])
def test_a_sigkill_in_the_middle_of_a_copy_resumes_the_take(fresh, monkeypatch, where):
    """A SIGKILL while ``_copy_one`` is held (claimed, before its copy from the live file
    to the store; after it; after it wrote the COPIED byte), a write that missed the frozen
    blocks landed meanwhile (touched): the files as the killed process left them are
    opened by a new freeze, whose frozen blocks read as at the take, and whose state is
    KEEP (untouched or touched) or COPIED (its store holding the take)."""
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 0b1010, 9: 1})
    if where in ("before-copy", "after-copy"):
        point = Point(monkeypatch, native, "copy_range", "hit",
                      match=lambda src, dst, *a: dst == freeze.store_fd,
                      after=where == "after-copy")
    else:
        point = Point(monkeypatch, cf, "pwrite_full", "hit",
                      match=lambda fd, *a: fd == freeze.map_fd, after=True)
    hit = Writer(engine, "hit", b"\x95" * 512, at(8, 3))
    hit.start()
    again = None
    try:
        assert point.reached.wait(10)
        engine.pwrite(b"\x96" * K4, at(8, 6))  # a miss: lands, touched
        assert freeze.touched[8] == 1
        monkeypatch.undo()
        again = CycleFreeze.open(vol, engine.fd)  # the files as the killed process left them
        assert again is not None and again.masks_recorded and again.touched[8] == 1
        want = COPIED if where == "after-map-write" else KEEP
        assert again.preserved[8] == want
        assert not wrong_frozen(again, before)
    finally:
        point.go.set()
        hit.finish()
        freeze.close()
        if again is not None:
            again.close()
    assert hit.error is None


# -- failed copies, then retries ----------------------------------------------------------------

@pytest.mark.parametrize("fail", ["copy", "copy-made-then-eio", "pwrite-map",
                                  "map-written-then-eio"])
@pytest.mark.parametrize("waiter", [False, True])
def test_a_failed_single_region_copy_fails_its_write_and_a_retry_or_a_waiter_copies(
        fresh, monkeypatch, fail, waiter):
    """EIO at each step of ``_copy_one`` (the copy from the live file to the store, or a
    copy made and then reported failed; the COPIED byte, or one written and then
    reported failed). The
    write fails, the claim goes, nothing of it lands; a writer that waited on the
    claim (hitting block 1) then copies and lands; otherwise the region stays KEEP in
    memory and the write retried copies it. The frozen blocks read as at the take
    before and after a SIGKILL and a restart."""
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 0b1010, 9: 1})
    # (module, function, which argument is the descriptor written, that descriptor, when)
    module, name, arg, fd, when = {
        "copy": (native, "copy_range", 1, freeze.store_fd, "before"),  # (src, dst, ...)
        "copy-made-then-eio": (native, "copy_range", 1, freeze.store_fd, "after"),
        "pwrite-map": (cf, "pwrite_full", 0, freeze.map_fd, "before"),  # (fd, ...)
        "map-written-then-eio": (cf, "pwrite_full", 0, freeze.map_fd, "after")}[fail]
    point = Point(monkeypatch, module, name, "hit", match=lambda *a: a[arg] == fd,
                  fail=when, hold=waiter)
    hit = Writer(engine, "hit", b"\xd1" * 512, at(8, 3) + 512)
    hit.start()
    other = Writer(engine, "wait", b"\xd2" * 512, at(8, 1))
    if waiter:
        assert point.reached.wait(10)
        other.start()
        other.join(0.2)
        assert other.is_alive(), "a write over a frozen block landed during a copy"
        point.go.set()
        other.finish()
        assert other.error is None
    hit.finish()
    assert isinstance(hit.error, OSError) and hit.error.errno == errno.EIO
    assert live_block(engine, at(8, 3)) == before[at(8, 3):at(8, 4)], "a failed write landed"
    assert not freeze.copying.any()
    if waiter:
        assert freeze.preserved[8] == COPIED and disk_state(vol)[8] == COPIED
        assert live_block(engine, at(8, 1))[:512] == b"\xd2" * 512
    else:
        assert freeze.preserved[8] == KEEP
        assert disk_state(vol)[8] == (COPIED if fail == "map-written-then-eio" else KEEP)
    assert not wrong_frozen(freeze, before)
    if fail == "map-written-then-eio" and not waiter:  # a SIGKILL now: read from the store
        freeze = reopen(vol, engine, freeze)
        assert freeze.preserved[8] == COPIED
        assert not wrong_frozen(freeze, before)
    engine.pwrite(b"\xd3" * 512, at(8, 3) + 512)  # the retry
    assert freeze.preserved[8] == COPIED and disk_state(vol)[8] == COPIED
    assert live_block(engine, at(8, 3))[512:1024] == b"\xd3" * 512
    assert not wrong_frozen(freeze, before)
    again = reopen(vol, engine, freeze)
    try:
        assert again.preserved[8] == COPIED and not wrong_frozen(again, before)
    finally:
        again.close()


@pytest.mark.parametrize("fail", ["copy-runs", "pwrite-map"])
def test_a_failed_copy_of_a_write_over_two_regions_then_a_retry(fresh, monkeypatch, fail):
    """The ``CowStore`` way (``copy_regions`` of frozen blocks, then ``record_preserved``),
    EIO from the copy or from the map write: the write fails, both regions stay KEEP,
    unclaimed, KEEP on disk, nothing lands; the retry copies both (their frozen blocks
    only) and lands; the image is the take, after a restart too."""
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 1 << 14 | 1 << 15, 9: 1 | 1 << 4})
    if fail == "copy-runs":
        Point(monkeypatch, native, "copy_runs", "span",
              match=lambda src, dst, *a: dst == freeze.store_fd, fail="before", hold=False)
    else:
        Point(monkeypatch, cf, "pwrite_full", "span",
              match=lambda fd, *a: fd == freeze.map_fd, fail="before", hold=False)
    span = Writer(engine, "span", b"\xe1" * (2 * K4), at(8, 15))
    span.start()
    span.finish()
    assert isinstance(span.error, OSError) and span.error.errno == errno.EIO
    assert list(freeze.preserved[8:10]) == [KEEP, KEEP] and not freeze.copying.any()
    assert list(disk_state(vol)[8:10]) == [KEEP, KEEP]
    assert live_block(engine, at(8, 15)) == before[at(8, 15):at(9)]
    assert not wrong_frozen(freeze, before)
    retry = Writer(engine, "span", b"\xe2" * (2 * K4), at(8, 15))
    retry.start()
    retry.finish()
    assert retry.error is None
    assert list(freeze.preserved[8:10]) == [COPIED, COPIED]
    assert list(disk_state(vol)[8:10]) == [COPIED, COPIED]
    assert os.pread(freeze.store_fd, 14 * K4, at(8)) == bytes(14 * K4)
    assert os.pread(freeze.store_fd, K4, at(9, 2)) == bytes(K4)
    assert not wrong_frozen(freeze, before)
    again = reopen(vol, engine, freeze)
    try:
        assert not wrong_frozen(again, before)
    finally:
        again.close()


# -- a SIGKILL right after a copy ----------------------------------------------------------------

@pytest.mark.parametrize("geom", list(GEOMS))
def test_a_sigkill_right_after_copies_resumes_the_frozen_blocks_as_at_the_take(
        tmp_path, geom):
    """Every region frozen, masks of every kind (first block only, last only, first and
    last, scattered, none: whole); single-region writes hit the highest frozen block
    of half of them (``_copy_one``), a write spans two more (``CowStore``), one misses
    (touched). A SIGKILL at once, a restart: the COPIED bytes are on disk, the masks
    read back, every frozen block reads as at the take; then, on the resumed freeze,
    more hits copy (and read right) and writes to the COPIED regions copy nothing."""
    rs, n, short = GEOMS[geom]
    vol, engine, before = make(tmp_path, rs, n, short, seed=2)
    try:
        bg = BlockGeometry(vol.size, vol.geometry.shift)
        per, bs = bg.full.bit_length(), 1 << bg.shift
        kinds = [1, 1 << (per - 1), 1 | 1 << (per - 1), 0b1001_0000_0110_0100 & bg.full, 0]
        masks = {r: kinds[r % len(kinds)] for r in range(vol.regions)}
        masks[vol.regions - 1] = bg.full
        freeze = freeze_of(vol, engine, masks)

        def top(region: int) -> int:
            m = masks[region] or bg.full
            base = region * rs
            return base + max(b for b in range(per) if m >> b & 1 and base + b * bs < vol.size
                              ) * bs

        hits = list(range(0, vol.regions, 2))
        for r in hits:
            engine.pwrite(b"\xf1" * 512, top(r))
        engine.pwrite(b"\xf2" * 1024, 2 * rs - 512)  # over 1 and 2 (2 copied: 1 is)
        misses = [r for r in range(vol.regions) if masks[r] and masks[r] != bg.full
                  and freeze.preserved[r] == KEEP]
        if misses and per > 1:
            r = misses[0]
            gap = next(b for b in range(per) if not masks[r] >> b & 1)
            engine.pwrite(b"\xf3" * 512, r * rs + gap * bs)
            assert freeze.touched[r] == 1 and freeze.preserved[r] == KEEP
        for r in hits + [1, 2]:
            assert freeze.preserved[r] == COPIED
        memory = freeze.preserved.copy()
        again = reopen(vol, engine, freeze)
        try:
            assert again.masks_recorded
            assert np.array_equal(again.preserved, memory)
            assert not wrong_frozen(again, before)
            copies = again.cow.copies
            keep = [r for r in range(vol.regions) if again.preserved[r] == KEEP]
            for r in keep:
                engine.pwrite(b"\xf4" * 512, top(r))
                assert again.preserved[r] == COPIED
            assert again.cow.copies == copies + len(keep)
            for r in hits:
                engine.pwrite(b"\xf5" * 512, top(r))
            assert again.cow.copies == copies + len(keep)
            assert not wrong_frozen(again, before)
        finally:
            again.close()
    finally:
        engine.close()


MIRROR_GEOMS = {
    "4K": (4 << 10, 64, 0),
    "8K": (8 << 10, 64, 0),
    "64K-short": (64 << 10, 16, 12 << 10),
    "1M-short": (1 << 20, 12, 300 << 10),
}


@pytest.mark.parametrize("geom", list(MIRROR_GEOMS))
def test_a_mirror_killed_right_after_copies_resumes_the_take(tmp_path, monkeypatch, geom):
    """A pair past cycle 1; blocks written in several regions (cycle 2's masks: the
    first block of 3, the last of 5, the first and last of 7, the last of 8 and 10,
    the first of 9, the last 512 bytes of the short last region). Right after the
    take's masks are recorded the host hits a frozen block of 3, 5, 7 and the last
    region (``_copy_one``), writes over 8 and 9 (``CowStore``) and misses 10's frozen
    block. The frames are held; a SIGKILL; a restart: the copied regions are COPIED,
    10 touched and not retaken; the resumed cycle commits the take, the next one the
    live volume."""
    rs, n, short = MIRROR_GEOMS[geom]
    vol, engine = filled(tmp_path, size=rs * n - short, rs=rs, seed=21)
    mirror, sec = pair(engine)
    bs = rs // max(1, min(16, rs // K4))
    size, last = vol.size, vol.regions - 1
    edges = {3: [0], 5: [rs - bs], 7: [0, rs - bs], 8: [rs - bs], 9: [0], 10: [rs - bs]}
    for r, offsets in edges.items():
        for o in offsets:
            engine.pwrite(bytes([0x30 + r]) * 512, r * rs + o)
    engine.pwrite(b"\x3f" * 512, size - 512)
    at_take = live(engine)
    seen = {}
    copied = (3, 5, 7, 8, 9, last)

    def after_take(freeze):
        if bs < rs:
            engine.pwrite(b"\x61" * 512, 10 * rs)  # misses region 10's last block
            seen["touched"] = (int(freeze.preserved[10]), int(freeze.touched[10]))
        for r in (3, 5, 7):
            engine.pwrite(bytes([0x50 + r]) * 512, r * rs + edges[r][-1] + 512 % bs)
        engine.pwrite(b"\x5f" * 512, size - 512)
        engine.pwrite(b"\x60" * 1024, 9 * rs - 512)  # over regions 8 and 9
        seen["copied"] = [int(freeze.preserved[r]) for r in copied]

    after_record(monkeypatch, after_take)
    sec.hold = sec.hold_commit = True
    want = mirror.run_now()
    wait_until(lambda: sec.held, 10, "the cycle's frames")
    monkeypatch.undo()
    assert seen["copied"] == [COPIED] * len(copied)
    if bs < rs:
        assert seen["touched"] == (KEEP, 1)
    image = bytes(sec.image)
    crash(engine, mirror)
    engine, mirror = restarted(vol)
    try:
        freeze = mirror._freeze
        assert freeze is not None and freeze.masks_recorded
        assert [int(freeze.preserved[r]) for r in copied] == [COPIED] * len(copied)
        if bs < rs:
            assert freeze.touched[10] == 1 and mirror._taken[10] == 0
        resume_and_check(engine, mirror, image, want, at_take)
    finally:
        mirror.close()
        engine.close()


# -- everything at once --------------------------------------------------------------------------

def test_writers_hitting_missing_and_spanning_while_the_conveyor_reads_and_acks(tmp_path,
                                                                                request):
    """16K regions (4 blocks), 48 frozen with random masks. Three host threads: one hits
    frozen blocks (``_copy_one``), one misses them (touched), one writes over two
    regions (``CowStore``); the conveyor reads each region's frozen extents and acks it,
    in random order, some in pairs. Every read is the take; memory and disk agree
    (COPIED in memory is COPIED on disk, FREE is FREE or a lost-FREE COPIED, KEEP is
    KEEP); after a SIGKILL the regions left read as at the take."""
    rs, n = 16 << 10, 48
    vol, engine, before = make(tmp_path, rs, n, seed=3)
    request.addfinalizer(engine.close)
    rng = random.Random(4)
    masks = {r: rng.randrange(1, 16) for r in range(n)}
    freeze = freeze_of(vol, engine, masks)
    stop, errors, count = threading.Event(), [], [0]

    def host(kind: str, seed: int) -> None:
        w = random.Random(seed)
        try:
            while not stop.is_set():
                r = w.randrange(n - 1)
                m = masks[r]
                if kind == "hit":
                    b = w.choice([b for b in range(4) if m >> b & 1])
                    off, ln = r * rs + b * K4 + w.randrange(8) * 512, 512
                elif kind == "miss":
                    gaps = [b for b in range(4) if not m >> b & 1]
                    if not gaps:
                        continue
                    off, ln = r * rs + w.choice(gaps) * K4, K4
                else:
                    off, ln = (r + 1) * rs - 1024, 2048
                engine.pwrite(w.randbytes(ln), off)
                count[0] += 1
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=host, args=(k, s), daemon=True)
               for s, k in enumerate(("hit", "miss", "span"))]
    # the miss writer first: copies are quick, and once the hit writer has copied every
    # region no write can skip a copy any more (the path under test)
    threads[1].start()
    wait_until(lambda: freeze.touched.any() or errors, 30, "a write with no copy")
    for t in (threads[0], threads[2]):
        t.start()
    wrong = []
    order = list(range(n))
    rng.shuffle(order)
    conveyed = order[:n * 2 // 3]
    try:
        # not before a write has copied (on a loaded machine the loop below could
        # otherwise outrun the writers)
        wait_until(lambda: freeze.cow.copies > 0 or errors, 30, "a copy")
        i = 0
        while i < len(conveyed):
            seen = count[0]
            wait_until(lambda s=seen: count[0] > s + 3 or errors, 10, "host writes")
            these = sorted(set(conveyed[i:i + rng.choice((1, 2))]))
            wrong += wrong_frozen(freeze, before, these)
            freeze.conveyed_runs([(r, r + 1) for r in these])
            i += len(these)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert not wrong, f"frozen blocks read as written after the take: {wrong[:5]}"
    assert freeze.cow.copies > 0 and freeze.touched.any()
    mem, disk = freeze.preserved, disk_state(vol)
    assert np.array_equal(disk[mem == COPIED], mem[mem == COPIED])
    assert not (disk[mem == FREE] == KEEP).any(), "conveyed, FREE in memory, KEEP on disk"
    assert np.array_equal(disk[mem == KEEP], mem[mem == KEEP])
    left = [r for r in range(n) if mem[r] != FREE]
    assert left
    again = reopen(vol, engine, freeze)
    try:
        assert not wrong_frozen(again, before, left)
    finally:
        again.close()


# -- user snapshots beside an open cycle ---------------------------------------------------------

@pytest.mark.parametrize("snapshot_first", [False, True])
def test_a_user_snapshot_beside_an_open_cycle_still_copies_whole_regions(fresh,
                                                                         snapshot_first):
    """A snapshot taken before or after the cycle's take. Writes: a hit on one frozen
    region (the freeze's ``_copy_one``), one over two regions (the freeze's
    ``copy_regions``), a miss (no copy for the freeze). The snapshot's store holds every
    region written, whole, and reads back as the volume at its creation; the freeze's
    store only the frozen blocks, which read as at the take; after the cycle is dropped
    the snapshot still reads right."""
    vol, engine, before = fresh
    if snapshot_first:
        engine.create_snapshot("s1")
    freeze = frozen(vol, engine, {8: 1, 9: 0b1010, 10: 1 << 15, 11: 1})
    if not snapshot_first:
        engine.create_snapshot("s1")
    engine.pwrite(b"\x71" * K4, at(9, 3))  # freeze: _copy_one
    engine.pwrite(b"\x72" * (2 * K4), at(10, 15))  # freeze: CowStore, 10 and 11
    engine.pwrite(b"\x73" * K4, at(8, 5))  # freeze: a miss
    assert list(freeze.preserved[8:12]) == [KEEP, COPIED, COPIED, COPIED]
    snap = engine.snapshots.find("s1")
    assert list(snap.preserved[8:12]) == [1, 1, 1, 1]
    assert os.pread(snap.store_fd, 4 * RS, at(8)) == before[at(8):at(12)]
    assert os.pread(freeze.store_fd, RS, at(9)) == (bytes(K4) + before[at(9, 1):at(9, 4)]
                                                    + bytes(12 * K4))
    assert os.pread(freeze.store_fd, RS, at(11)) == before[at(11):at(11, 1)] + bytes(15 * K4)
    assert not wrong_frozen(freeze, before)

    def snapshot_reads_right() -> None:
        view = SnapshotView(vol, "s1")
        try:
            buf = bytearray(vol.size)
            view.pread(buf, 0)
            assert bytes(buf) == before
        finally:
            view.close()

    snapshot_reads_right()
    engine.pre_write.remove(freeze.preserve)
    freeze.drop()
    engine.pwrite(b"\x74" * RS, at(12))
    snapshot_reads_right()


# -- native/arena.c: the interpreter's arena allocator, cached ------------------------------------

def run_child(script: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """``script`` in a fresh interpreter of this venv (the arena cache installed there
    only); its stdout; its failure as the test's."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    print(proc.stdout)
    return proc.stdout


needs_c = pytest.mark.skipif(native.arena_counts() is None, reason="no C extension")

ARENA_PRELUDE = """
    import sys, threading
    from volume_core import native
    from volume_core.replication import memory

    def delta(before):
        now = native.arena_counts()
        return now[0] - before[0], now[1] - before[1]

    def churn(n):
        before = native.arena_counts()
        for _ in range(n):
            t = threading.Thread(target=sum, args=(range(10),))
            t.start()
            t.join()
        return delta(before)
"""


@needs_c
def test_arena_cache_under_many_short_lived_threads_with_deep_frames():
    """Eight threads each start 200 short-lived threads one after another (1,600 thread
    states made and deleted, up to 9 at once); each recurses 2,000 deep (frames over
    several 16K chunks), drives generators and a coroutine by hand, raises and catches
    at depth. Every result is right, nothing crashes, and most chunks come from the
    cache. Installing twice changes nothing; a fork after it (threads running) can
    still make threads in the child."""
    out = run_child(ARENA_PRELUDE + """
    import os, time
    sys.setrecursionlimit(10000)
    assert memory.keep_stack_chunks()

    def deep(n):
        return 0 if n == 0 else deep(n - 1) + 1

    def gen(n):
        for i in range(n):
            yield from (i, -i)

    def chain(n):  # nested generators, each a frame
        if n == 0:
            yield 1
        else:
            yield from chain(n - 1)
            yield n

    async def coro(n):
        return n * 2 if n == 0 else await coro(n - 1) + 2

    class Boom(Exception):
        pass

    def raiser(n):
        if n == 0:
            raise Boom(n)
        return raiser(n - 1)

    def work(k):
        assert deep(2000) == 2000
        assert sum(gen(50)) == 0
        assert sum(chain(80)) == 1 + 80 * 81 // 2
        c = coro(500)
        try:
            c.send(None)
        except StopIteration as stop:
            assert stop.value == 1000
        else:
            raise AssertionError("the coroutine did not finish")
        try:
            raiser(1500)
        except Boom:
            pass
        else:
            raise AssertionError("no exception")
        if k % 7 == 0:
            raise Boom("uncaught in a thread")  # the thread ends with it
        return k

    errors, results = [], []
    threading.excepthook = lambda args: None  # the uncaught Booms, expected

    def outer(i):
        try:
            for k in range(200):
                box = []
                t = threading.Thread(target=lambda: box.append(work(k)))
                t.start()
                t.join()
                results.append(box[0] if box else ("raised", k))
        except BaseException as err:
            errors.append(err)

    before = native.arena_counts()
    ts = [threading.Thread(target=outer, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert len(results) == 1600, len(results)
    assert sorted(r for r in results if isinstance(r, int)) == sorted(
        k for _ in range(8) for k in range(200) if k % 7), "wrong results"
    assert sum(1 for r in results if not isinstance(r, int)) == 8 * len(range(0, 200, 7))
    reused, mapped = delta(before)
    print("stress", reused, mapped)
    assert reused > 20 * mapped and reused > 10000, (reused, mapped)

    assert memory.keep_stack_chunks()  # again: nothing changes
    reused, mapped = churn(100)
    assert reused >= 95 and mapped <= 5, (reused, mapped)

    go = threading.Event()
    busy = [threading.Thread(target=lambda: [deep(300) for _ in range(2000)])
            for _ in range(3)]
    for t in busy:
        t.start()
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(50):
                t = threading.Thread(target=deep, args=(500,))
                t.start()
                t.join()
            os._exit(0)
        except BaseException:
            os._exit(3)
    for t in busy:
        t.join()
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung making threads")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0, status
    print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_c
def test_arena_cache_keeps_at_most_16_blocks():
    """With 24 thread states alive at once then gone, the next 24 at once find 16 of
    their stacks kept (fresh interpreter: nothing else in the cache), no more."""
    out = run_child(ARENA_PRELUDE + """
    assert memory.keep_stack_chunks()

    def wave(n):
        go, ready = threading.Event(), threading.Barrier(n + 1)

        def hold():
            ready.wait()
            go.wait()

        before = native.arena_counts()
        ts = [threading.Thread(target=hold) for _ in range(n)]
        for t in ts:
            t.start()
        ready.wait()
        got = delta(before)
        go.set()
        for t in ts:
            t.join()
        return got

    wave(24)
    reused, mapped = wave(24)
    assert 12 <= reused <= 16 and mapped >= 8, (reused, mapped)
    print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_c
def test_arena_blocks_over_1_mib_are_unmapped_and_1_mib_ones_kept():
    """A frame needing a 2 MiB chunk maps a fresh one at every call (freed blocks over
    1 MiB are not kept); one needing a 1 MiB chunk is handed out again."""
    out = run_child(ARENA_PRELUDE + """
    def frame_of(slots):
        n = slots // 2
        names = ",".join(f"a{i}" for i in range(n))
        ns = {}
        exec(f"def f():\\n {names} = [0]*{n}\\n return a0\\n", ns)
        return ns["f"]

    assert memory.keep_stack_chunks()
    big = frame_of(140_000)  # ~1.1 MB of frame: a 2 MiB chunk
    one = frame_of(100_000)  # ~0.8 MB: a 1 MiB chunk
    big(); one()
    before = native.arena_counts()
    for _ in range(4):
        big()
    reused, mapped = delta(before)
    assert mapped >= 4, ("a block over 1 MiB was kept", reused, mapped)
    before = native.arena_counts()
    for _ in range(4):
        one()
    reused, mapped = delta(before)
    assert reused >= 4, ("a 1 MiB block was not kept", reused, mapped)
    print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_c
@pytest.mark.parametrize("filler", ["pymalloc-arenas", "big-frames-malloc"])
def test_arena_cache_keeps_reusing_thread_stacks_after_other_blocks_were_freed(filler):
    """20 thread states hold their 16K stacks (as 20 requests in flight); meanwhile the
    process frees 16 or more blocks of another size: 1 MiB pymalloc arenas (a big list
    of small objects dropped), or, with ``PYTHONMALLOC=malloc`` (the served default),
    32K frame chunks (a function with 3,000 frame slots recursing 16 deep). The 20
    threads end; then 200 short-lived threads should reuse their stacks as before. (The
    cache kept the first 16 blocks freed for good: every later thread mapped its stack.)"""
    env = {"PYTHONMALLOC": "pymalloc" if filler == "pymalloc-arenas" else "malloc"}
    out = run_child(ARENA_PRELUDE + f"""
    assert memory.keep_stack_chunks()
    reused, mapped = churn(50)
    assert reused >= 45, ("no reuse to begin with", reused, mapped)
    n = 1500
    names = ",".join(f"a{{i}}" for i in range(n))
    ns = {{}}
    exec(f"def big(k):\\n {{names}} = [0]*{{n}}\\n return big(k - 1) if k else 0\\n", ns)
    go = threading.Event()
    held = [threading.Thread(target=go.wait) for _ in range(20)]
    for t in held:
        t.start()
    if {filler!r} == "pymalloc-arenas":
        junk = [object() for _ in range(2_000_000)]
        del junk
    else:
        ns["big"](16)
    go.set()
    for t in held:
        t.join()
    reused, mapped = churn(200)
    print("after", reused, mapped)
    assert reused >= 190, ("thread stacks no longer reused", reused, mapped)
    print("ok")
    """, env=env)
    assert out.strip().endswith("ok")
