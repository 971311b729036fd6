"""A cycle's freeze with its written-block masks recorded: a host write that misses a
region's frozen blocks lands with no copy (the region noted as touched first), one that
hits them copies the region; what the conveyor reads of the frozen blocks is the volume
at the take either way; a restart finds the masks and the touched regions, or (none
recorded) copies on every write as before masks."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from tests.conftest import wait_until
from volume_core.blocks import BlockGeometry
from volume_core.cycle_freeze import BLOCKS, COPIED, DIR, FREE, KEEP, TOUCHED, CycleFreeze
from volume_core.engine import Engine
from volume_core.errors import VolumeCorrupt
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 64 << 10  # 16 blocks of 4K a region
K4 = 4096
REGIONS = 64
SIZE = RS * REGIONS


@pytest.fixture
def fresh(tmp_path):
    """(vol, engine, before): a volume full of random bytes; the engine closed after."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    before = np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    with open(vol.data_path, "r+b") as f:
        f.write(before)
    engine = Engine(vol)
    yield vol, engine, before
    engine.close()


def frozen(vol, engine, masks: dict[int, int], record: bool = True) -> CycleFreeze:
    """Cycle 1 taking the regions of ``masks`` (region -> its written blocks), its hook
    on, its masks recorded unless not ``record``."""
    taken = np.zeros(REGIONS, dtype=np.uint8)
    blocks = np.zeros(REGIONS, dtype=np.uint16)
    for region, mask in masks.items():
        taken[region], blocks[region] = 1, mask
    freeze = CycleFreeze.create(vol, engine.fd, 1, taken, blocks=blocks)
    engine.pre_write.append(freeze.preserve)
    if record:
        assert freeze.record_blocks()
    return freeze


def at(region: int, block: int = 0) -> int:
    return region * RS + block * K4


def frozen_block(freeze: CycleFreeze, region: int, block: int) -> bytes:
    buf = bytearray(K4)
    freeze.read_range(at(region, block), memoryview(buf))
    return bytes(buf)


def test_a_write_that_misses_the_frozen_blocks_is_not_copied_one_that_hits_them_is(fresh):
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 1 << 0, 9: 0b1010})
    engine.pwrite(b"\x11" * K4, at(8, 5))  # misses block 0
    engine.pwrite(b"\x12" * 512, at(9, 2) + 1024)  # inside block 2: misses 1 and 3
    assert freeze.preserved[8] == KEEP and freeze.preserved[9] == KEEP
    assert freeze.cow.copies == 0
    assert freeze.touched[8] == 1 and freeze.touched[9] == 1
    on_disk = np.fromfile(vol.path / DIR / TOUCHED, dtype=np.uint8)
    assert on_disk[8] == 1 and on_disk[9] == 1 and on_disk.sum() == 2
    assert frozen_block(freeze, 8, 0) == before[at(8):at(8, 1)]

    engine.pwrite(b"\x13" * 512, at(9, 3) + K4 - 512)  # the end of block 3: a hit
    assert freeze.preserved[9] == COPIED and freeze.cow.copies == 1
    assert frozen_block(freeze, 9, 3) == before[at(9, 3):at(9, 4)]
    assert frozen_block(freeze, 9, 1) == before[at(9, 1):at(9, 2)]


@pytest.mark.parametrize("offset, length", [
    (at(8, 15), 2 * K4),  # into the next region (not in the cycle): copied, as ever
    (at(8, 3), 0),  # nothing written: nothing to copy, nothing touched
])
def test_writes_over_two_regions_copy_and_empty_ones_do_nothing(fresh, offset, length):
    vol, engine, _ = fresh
    freeze = frozen(vol, engine, {8: 1 << 0})
    freeze.preserve(offset, length)
    assert freeze.touched.sum() == 0
    assert freeze.cow.copies == (1 if length else 0)


def test_a_region_taken_with_no_mask_counts_as_written_whole(fresh):
    vol, engine, _ = fresh
    freeze = frozen(vol, engine, {8: 0})
    engine.pwrite(b"\x14" * K4, at(8, 7))
    assert freeze.preserved[8] == COPIED and not freeze.touched[8]


def test_until_the_masks_are_recorded_every_write_copies(fresh):
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 1, 9: 1}, record=False)
    engine.pwrite(b"\x15" * K4, at(8, 5))
    assert freeze.preserved[8] == COPIED and not freeze.touched.any()
    assert not (vol.path / DIR / BLOCKS).exists()
    assert freeze.record_blocks()
    recorded = np.fromfile(vol.path / DIR / BLOCKS, dtype=np.uint16)
    assert recorded[8] == 1 and recorded[9] == 1 and recorded.sum() == 2
    engine.pwrite(b"\x16" * K4, at(9, 5))
    assert freeze.preserved[9] == KEEP and freeze.touched[9]
    assert frozen_block(freeze, 8, 0) == before[at(8):at(8, 1)]


def test_masks_that_cannot_be_recorded_leave_every_write_copying(fresh, monkeypatch):
    vol, engine, _ = fresh
    freeze = frozen(vol, engine, {8: 1}, record=False)

    def no_rename(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_rename)
    assert not freeze.record_blocks()
    monkeypatch.undo()
    assert not (vol.path / DIR / BLOCKS).exists()
    assert not list((vol.path / DIR).glob(".*"))
    engine.pwrite(b"\x17" * K4, at(8, 5))
    assert freeze.preserved[8] == COPIED


def test_a_region_that_cannot_be_noted_as_touched_is_copied(fresh):
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 1})
    os.close(freeze.touched_fd)
    freeze.touched_fd = os.open(vol.path / DIR / TOUCHED, os.O_RDONLY)  # writes fail
    engine.pwrite(b"\x18" * K4, at(8, 5))
    assert freeze.preserved[8] == COPIED and not freeze.touched[8]
    assert frozen_block(freeze, 8, 0) == before[at(8):at(8, 1)]


def test_the_conveyor_reads_frozen_blocks_at_the_take_while_writes_land_around_them(fresh):
    vol, engine, before = fresh
    rng = np.random.default_rng(3)
    masks = {int(r): int(m) for r, m in enumerate(rng.integers(0, 1 << 16, REGIONS))
             if rng.random() < 0.7}
    freeze = frozen(vol, engine, masks)
    geometry = BlockGeometry(SIZE, freeze.geometry.shift)
    stop = threading.Event()
    errors: list[BaseException] = []
    written = [0]

    def host(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                off = int(r.integers(0, SIZE // 512 - 1)) * 512
                ln = int(r.integers(1, min(3 * K4 // 512, (SIZE - off) // 512) + 1)) * 512
                engine.pwrite(r.integers(0, 256, ln, dtype=np.uint8).tobytes(), off)
                written[0] += 1
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    writers = [threading.Thread(target=host, args=(s,)) for s in (10, 11)]
    for w in writers:
        w.start()
    wrong = []
    try:
        # not before a write has missed frozen blocks (the path under test), and
        # writes land between the regions read (else the loop may outrun them)
        wait_until(lambda: freeze.touched.any() or errors, 30, "a write with no copy")
        for region in sorted(masks):
            seen = written[0]
            wait_until(lambda s=seen: written[0] > s or errors, 30, "a host write")
            extents = geometry.run_extents(freeze.blocks, [(region, region + 1)])
            for offset, length in extents.tolist():
                buf = bytearray(length)
                freeze.read_range(offset, memoryview(buf))
                if bytes(buf) != before[offset:offset + length]:
                    wrong.append((region, offset))
            freeze.conveyed_runs([(region, region + 1)])
    finally:
        stop.set()
        for w in writers:
            w.join(30)
    assert not errors, errors
    assert not wrong, f"frozen blocks read as written after the take: {wrong[:10]}"
    assert freeze.touched.any(), "no write missed the frozen blocks: the test proves nothing"


def test_a_restart_finds_the_masks_and_the_touched_regions(fresh):
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 1, 9: 1 << 4})
    engine.pwrite(b"\x19" * K4, at(8, 5))
    blocks = freeze.blocks.copy()
    freeze.close()  # as a SIGKILL leaves it (the page cache keeps what was written)
    engine.pre_write.clear()
    again = CycleFreeze.open(vol, engine.fd)
    assert again is not None and again.masks_recorded
    assert np.array_equal(again.blocks, blocks)
    assert again.touched[8] == 1 and again.touched.sum() == 1
    engine.pre_write.append(again.preserve)
    engine.pwrite(b"\x1a" * K4, at(9, 5))
    assert again.preserved[9] == KEEP and again.touched[9] == 1
    assert frozen_block(again, 9, 4) == before[at(9, 4):at(9, 5)]
    again.close()


def test_a_cycle_left_open_without_masks_or_touched_map_resumes_copying(fresh):
    """As one cut off before ``record_blocks``, or made by an older version."""
    vol, engine, _ = fresh
    freeze = frozen(vol, engine, {8: 1}, record=False)
    freeze.close()
    engine.pre_write.clear()
    (vol.path / DIR / TOUCHED).unlink()
    again = CycleFreeze.open(vol, engine.fd)
    assert again is not None and not again.masks_recorded and again.blocks is None
    assert not again.touched.any()
    assert os.path.getsize(vol.path / DIR / TOUCHED) == REGIONS
    engine.pre_write.append(again.preserve)
    engine.pwrite(b"\x1b" * K4, at(8, 5))
    assert again.preserved[8] == COPIED
    again.close()


@pytest.mark.parametrize("name, content, says", [
    (BLOCKS, b"\x01\x00" * (REGIONS - 1), "blocks.map"),
    (TOUCHED, b"\x00" * (REGIONS + 1), "touched.map"),
    (TOUCHED, b"\x02" + b"\x00" * (REGIONS - 1), "touched.map"),
])
def test_a_damaged_mask_or_touched_map_is_refused_naming_it(fresh, name, content, says):
    vol, engine, _ = fresh
    freeze = frozen(vol, engine, {8: 1})
    freeze.close()
    (vol.path / DIR / name).write_bytes(content)
    with pytest.raises(VolumeCorrupt, match=says):
        CycleFreeze.open(vol, engine.fd)


def test_a_mask_of_blocks_past_its_region_is_refused(tmp_path):
    vol = Volume.create(tmp_path / "v", 16 * (16 << 10), 16 << 10)  # 4 blocks a region
    engine = Engine(vol)
    try:
        taken = np.ones(16, dtype=np.uint8)
        freeze = CycleFreeze.create(vol, engine.fd, 1, taken,
                                    blocks=np.full(16, 0xF, dtype=np.uint16))
        assert freeze.record_blocks()
        freeze.close()
        masks = np.full(16, 0xF, dtype=np.uint16)
        masks[3] = 0x10
        masks.tofile(vol.path / DIR / BLOCKS)
        with pytest.raises(VolumeCorrupt, match="blocks.map: a mask of blocks past"):
            CycleFreeze.open(vol, engine.fd)
    finally:
        engine.close()


# -- a copy on write keeps only the frozen blocks ----------------------------------------

def live_block(engine: Engine, offset: int) -> bytes:
    buf = bytearray(K4)
    engine.pread(buf, offset)
    return bytes(buf)


def store_block(freeze: CycleFreeze, region: int, block: int) -> bytes:
    return os.pread(freeze.store_fd, K4, at(region, block))


def test_a_copy_on_write_keeps_only_the_frozen_blocks(fresh):
    """One region: from its first frozen block to its last (two system calls)."""
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {9: 0b10_0000_1010})
    engine.pwrite(b"\x21" * K4, at(9, 3))  # hits block 3: region 9 copied
    assert freeze.preserved[9] == COPIED and freeze.cow.copies == 1
    for block in range(16):
        want = before[at(9, block):at(9, block + 1)] if 1 <= block <= 9 else bytes(K4)
        assert store_block(freeze, 9, block) == want, block
    assert frozen_block(freeze, 9, 1) == before[at(9, 1):at(9, 2)]
    assert frozen_block(freeze, 9, 3) == before[at(9, 3):at(9, 4)]


def test_before_the_masks_are_recorded_a_copy_keeps_the_whole_region(fresh):
    """A cycle cut off now resumes without ``blocks.map`` and reads its regions whole."""
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {9: 0b1010}, record=False)
    engine.pwrite(b"\x22" * K4, at(9, 3))
    assert os.pread(freeze.store_fd, RS, at(9)) == before[at(9):at(10)]


def test_a_write_over_several_regions_copies_each_ones_frozen_blocks(fresh):
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {8: 1 << 15, 9: 1 | 1 << 9, 10: 0, 12: 1 << 2})
    engine.pwrite(b"\x23" * (3 * RS), at(8, 8))  # regions 8-11, up to block 8 of 11
    assert list(freeze.preserved[8:13]) == [COPIED, COPIED, COPIED, FREE, KEEP]
    kept = {(8, 15), (9, 0), (9, 9)} | {(10, b) for b in range(16)}  # 10: no mask, whole
    for region in (8, 9, 10, 11):
        for block in range(16):
            want = before[at(region, block):at(region, block + 1)] \
                if (region, block) in kept else bytes(K4)
            assert store_block(freeze, region, block) == want, (region, block)
    for region, block in sorted(kept):
        assert frozen_block(freeze, region, block) == before[at(region, block):
                                                             at(region, block + 1)]


def test_a_restart_reads_the_frozen_blocks_a_copy_kept(fresh):
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {9: 0b1010, 11: 1 << 15})
    engine.pwrite(b"\x24" * RS, at(9))  # both frozen blocks of 9 copied
    engine.pwrite(b"\x25" * 512, at(11, 15) + 512)
    freeze.close()  # as a SIGKILL leaves it
    engine.pre_write.clear()
    again = CycleFreeze.open(vol, engine.fd)
    try:
        assert again is not None and again.masks_recorded
        assert list(again.preserved[[9, 11]]) == [COPIED, COPIED]
        for region, block in ((9, 1), (9, 3), (11, 15)):
            assert frozen_block(again, region, block) == before[at(region, block):
                                                                at(region, block + 1)]
    finally:
        again.close()


def test_a_failed_copy_fails_its_write_and_leaves_the_region_to_copy_again(fresh, monkeypatch):
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {9: 0b1010})
    real = CycleFreeze._copy_blocks

    def fails(self, region):
        raise OSError(5, "injected: the copy failed")

    monkeypatch.setattr(CycleFreeze, "_copy_blocks", fails)
    with pytest.raises(OSError, match="injected"):
        engine.pwrite(b"\x26" * K4, at(9, 1))
    assert freeze.preserved[9] == KEEP and freeze.copying[9] == 0
    assert live_block(engine, at(9, 1)) == before[at(9, 1):at(9, 2)]  # the write did not land
    monkeypatch.setattr(CycleFreeze, "_copy_blocks", real)
    engine.pwrite(b"\x27" * K4, at(9, 1))
    assert freeze.preserved[9] == COPIED
    assert frozen_block(freeze, 9, 1) == before[at(9, 1):at(9, 2)]


def test_a_second_writer_on_a_region_being_copied_waits_for_that_copy(fresh, monkeypatch):
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {9: 0b1010})
    real, copying, go = CycleFreeze._copy_blocks, threading.Event(), threading.Event()

    def held(self, region):
        copying.set()
        assert go.wait(10)
        real(self, region)

    monkeypatch.setattr(CycleFreeze, "_copy_blocks", held)
    a = threading.Thread(target=engine.pwrite, args=(b"\x28" * K4, at(9, 1)))
    a.start()
    assert copying.wait(10)
    b = threading.Thread(target=engine.pwrite, args=(b"\x29" * K4, at(9, 3)))
    b.start()
    b.join(0.3)
    assert b.is_alive(), "a write over a frozen block landed before the region was copied"
    go.set()
    a.join(10)
    b.join(10)
    assert not a.is_alive() and not b.is_alive()
    assert freeze.preserved[9] == COPIED and freeze.cow.copies == 1
    assert frozen_block(freeze, 9, 3) == before[at(9, 3):at(9, 4)]
    assert live_block(engine, at(9, 3)) == b"\x29" * K4


@pytest.mark.parametrize("span", [K4, 2 * RS], ids=["one region", "two regions"])
def test_a_region_acknowledged_while_its_copy_is_under_way_stays_free_on_disk(
        fresh, monkeypatch, span):
    """A copy claims region 9, then (before it reads the live file) the region's ack
    makes it FREE and a second writer's block lands in it with no copy; the copy then
    reads that write. Its COPIED byte must not go over the FREE on disk, or a restart
    would send the later write as the take (found by a CI run of the attack suite)."""
    vol, engine, before = fresh
    freeze = frozen(vol, engine, {9: 0b1010, 10: 0b1})
    real_one, real_many = CycleFreeze._copy_blocks, CycleFreeze.copy_regions

    def ack_and_write_first() -> None:
        freeze.conveyed_runs([(9, 10)])
        w = threading.Thread(target=engine.pwrite, args=(b"\x31" * K4, at(9, 1)))
        w.start()
        w.join(10)
        assert live_block(engine, at(9, 1)) == b"\x31" * K4  # landed, uncopied

    def one(self, region):
        ack_and_write_first()
        real_one(self, region)

    def many(self, live_fd, runs, volume):
        ack_and_write_first()
        real_many(self, live_fd, runs, volume)

    monkeypatch.setattr(CycleFreeze, "_copy_blocks", one)
    monkeypatch.setattr(CycleFreeze, "copy_regions", many)
    engine.pwrite(b"\x30" * span, at(9, 3))
    on_disk = np.fromfile(vol.path / DIR / "state.map", dtype=np.uint8)
    assert freeze.preserved[9] == FREE and on_disk[9] == FREE
    if span > RS:  # region 10, copied in the same claim, is COPIED on both
        assert freeze.preserved[10] == COPIED and on_disk[10] == COPIED
        assert frozen_block(freeze, 10, 0) == before[at(10):at(10, 1)]
