"""Attack on copies only for frozen blocks (session 12, b417569): ``CycleFreeze``'s
``record_blocks`` (``blocks.map``), ``preserve``/``_touch`` (``touched.map``), ``check``
and ``open`` of both maps, the mirror retaking only untouched KEEP regions after a
restart, and ``CowStore.preserve`` of an empty write.

The invariant: the secondary's image for cycle N is exactly the primary's volume at
cycle N's take; no mark is ever lost; nothing conveyed in a cycle is sent again in it.
Real engines, files and trackers; the in-memory secondary of ``test_attack_session11``
(``Sec``); a SIGKILL is its ``crash()`` (descriptors closed, nothing trimmed or synced;
the page cache survives, as it does a killed process).
"""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import wait_until
from tests.unit.test_attack_async import S1
from tests.unit.test_attack_session11 import (
    Sec,
    committed_at,
    crash,
    live,
    regions_of,
    restarted,
    resume_and_check,
)
from volume_core.blocks import BlockGeometry
from volume_core.cycle_freeze import BLOCKS, COPIED, DIR, FREE, KEEP, TOUCHED, CycleFreeze
from volume_core.engine import Engine
from volume_core.errors import VolumeCorrupt
from volume_core.replication.mirror import AsyncMirror
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

K4 = 4096
RS = 64 << 10  # 16 blocks of 4K a region
REGIONS = 64
SIZE = RS * REGIONS


# -- helpers ---------------------------------------------------------------------------

def filled(tmp_path, size: int = SIZE, rs: int = RS, seed: int = 1) -> tuple[Volume, Engine]:
    """A volume full of random bytes (no holes), its engine."""
    vol = Volume.create(tmp_path / "v", size, rs)
    engine = Engine(vol)
    engine.pwrite(random.Random(seed).randbytes(size), 0)
    return vol, engine


def pair(engine: Engine) -> tuple[AsyncMirror, Sec]:
    """A mirror and its secondary past the initial sync and cycle 1 (any volume size)."""
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
    sec = Sec(mirror, S1, engine.size)
    mirror.connected(sec)
    committed_at(mirror, 1)
    assert sec.commits[1] == live(engine)
    return mirror, sec


def after_record(monkeypatch, then) -> None:
    """``then(freeze)`` runs on the cycle thread right after ``record_blocks`` (after the
    take, masks on disk, before the conveyor reads anything): host writes there are
    the writes a cycle meets while it conveys, made deterministic. Once: the next
    cycle's take goes by untouched."""
    original = CycleFreeze.record_blocks
    ran = []

    def record_then(self):
        done = original(self)
        if not ran:
            ran.append(self.number)
            then(self)
        return done

    monkeypatch.setattr(CycleFreeze, "record_blocks", record_then)


def first_diff(a: bytes, b: bytes) -> int | None:
    x = np.frombuffer(a, dtype=np.uint8) != np.frombuffer(b, dtype=np.uint8)
    where = np.flatnonzero(x)
    return int(where[0]) if where.size else None


# -- holes: a touched KEEP region is no longer what it was at the take -----------------------

def test_a_trim_of_a_keep_regions_other_blocks_does_not_zero_them_in_the_cycles_image(
        tmp_path, monkeypatch):
    """Region 5 is data but for block 0, trimmed before the take (its one frozen block,
    a hole). After the take the host trims blocks 1..15 (inside the region, missing
    block 0: no copy, touched): region 5 is now a hole of the live file, and KEEP.
    ``hole_end`` trusts KEEP to mean "not written since the take" and sends one ZERO
    frame for the whole region: the secondary's image of the cycle loses blocks 1..15,
    which held data at the take (before the change the trim copied the region, COPIED,
    read from the store)."""
    vol, engine = filled(tmp_path)
    try:
        mirror, sec = pair(engine)
        try:
            engine.trim(K4, 5 * RS)  # block 0 of region 5: a hole, the cycle's one block
            at_take = live(engine)
            seen = {}

            def trim_the_rest(freeze):
                engine.trim(RS - K4, 5 * RS + K4)  # misses block 0: no copy
                seen["state"] = (int(freeze.preserved[5]), int(freeze.touched[5]))

            after_record(monkeypatch, trim_the_rest)
            want = mirror.run_now()
            committed_at(mirror, want)
            assert seen["state"] == (KEEP, 1)  # the path under attack was taken
            got = sec.commits[want]
            assert got == at_take, f"first difference at {first_diff(got, at_take)}"
        finally:
            mirror.close()
    finally:
        engine.close()


def test_a_zero_that_punches_a_keep_regions_other_blocks_keeps_them_in_the_image(
        tmp_path, monkeypatch):
    """The same through ``engine.zero(may_trim=True)``, region size 16K (4 blocks): the
    frozen block 2 was zeroed (punched) before the take, blocks 0, 1 and 3 are punched
    after it by two zero calls (each inside the region, each missing block 2)."""
    rs = 16 << 10
    vol, engine = filled(tmp_path, size=rs * 256, rs=rs, seed=2)
    try:
        mirror, sec = pair(engine)
        try:
            r = 77
            engine.zero(K4, r * rs + 2 * K4, may_trim=True)
            at_take = live(engine)

            def punch(freeze):
                engine.zero(2 * K4, r * rs, may_trim=True)
                engine.zero(K4, r * rs + 3 * K4, may_trim=True)
                assert freeze.preserved[r] == KEEP and freeze.touched[r]

            after_record(monkeypatch, punch)
            want = mirror.run_now()
            committed_at(mirror, want)
            got = sec.commits[want]
            assert got == at_take, f"first difference at {first_diff(got, at_take)}"
        finally:
            mirror.close()
    finally:
        engine.close()


def test_a_region_in_a_hole_at_the_take_written_afterwards_reads_zeros_in_its_frozen_blocks(
        tmp_path, monkeypatch):
    """A sparse volume: region 9 is a hole at the take (its block 3 trimmed: the frozen
    block). After the take the host writes data into blocks 0 and 10 (no copy,
    touched): the live file now holds data there, so the conveyor reads block 3 live
    (zeros, as at the take) instead of sending a ZERO frame; the next cycle carries
    the new blocks. Also the first regions are holes both times (ZERO frames)."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    engine = Engine(vol)
    try:
        rng = random.Random(3)
        engine.pwrite(rng.randbytes(RS * 8), 30 * RS)  # some data; the rest holes
        mirror, sec = pair(engine)
        try:
            engine.trim(K4, 9 * RS + 3 * K4)
            engine.trim(K4, 0)  # region 0: a hole before and after
            engine.pwrite(rng.randbytes(K4), 31 * RS + 5 * K4)
            at_take = live(engine)

            def fill(freeze):
                engine.pwrite(b"\x5a" * K4, 9 * RS)
                engine.pwrite(b"\x5b" * 512, 9 * RS + 10 * K4 + 512)
                assert freeze.preserved[9] == KEEP and freeze.touched[9]

            after_record(monkeypatch, fill)
            want = mirror.run_now()
            committed_at(mirror, want)
            assert sec.commits[want] == at_take
            nxt = mirror.run_now()
            committed_at(mirror, nxt)
            assert sec.commits[nxt] == live(engine)
        finally:
            mirror.close()
    finally:
        engine.close()


# -- odd files at open ------------------------------------------------------------------

def _open_cycle_with_a_touched_region(tmp_path, monkeypatch):
    """Cycle 2 taking block 0 of regions 8 and 9, its frames held (none acknowledged);
    after the take block 5 of region 8 is written (no copy, touched). Then a SIGKILL.
    Returns (vol, image the secondary held, the cycle's number, volume at the take,
    volume at the crash)."""
    vol, engine = filled(tmp_path)
    mirror, sec = pair(engine)
    engine.pwrite(b"\x21" * K4, 8 * RS)
    engine.pwrite(b"\x22" * K4, 9 * RS)
    at_take = live(engine)

    def write_after(freeze):
        engine.pwrite(b"\x23" * K4, 8 * RS + 5 * K4)
        assert freeze.preserved[8] == KEEP and freeze.touched[8]

    after_record(monkeypatch, write_after)
    sec.hold = sec.hold_commit = True
    want = mirror.run_now()
    wait_until(lambda: sec.held, 10, "the cycle's frames")
    monkeypatch.undo()
    now = live(engine)
    image = bytes(sec.image)
    crash(engine, mirror)
    return vol, image, want, at_take, now


@pytest.mark.parametrize("gone", [TOUCHED, BLOCKS])
def test_one_map_without_the_other_is_refused_naming_it(tmp_path, monkeypatch, gone):
    """A region is touched only once ``blocks.map`` is in place, and both files exist
    from then on. ``touched.map`` gone: resumed as none touched, region 8 (written after
    the take with no copy) would be retaken and its mark released at the resumed
    commit, the write never conveyed. ``blocks.map`` gone: resumed "as before masks",
    region 8 (KEEP) would be read whole from the live volume, block 5 as written after
    the take. Either is damage: refused, naming the missing file."""
    vol, *_ = _open_cycle_with_a_touched_region(tmp_path, monkeypatch)
    (vol.path / DIR / gone).unlink()
    engine = Engine(Volume.open(vol.path))
    try:
        with pytest.raises(VolumeCorrupt, match=gone):
            AsyncMirror(engine, interval=0, ack_timeout=2.0)
    finally:
        engine.close()


def test_a_sigkill_after_a_touched_write_resumes_the_take_and_carries_the_write_next(
        tmp_path, monkeypatch):
    """The regression the above breaks: with both maps, region 8 is not retaken, the
    resumed cycle is the take and the next cycle carries block 5 of region 8."""
    vol, image, want, at_take, now = _open_cycle_with_a_touched_region(tmp_path, monkeypatch)
    engine, mirror = restarted(vol)
    try:
        freeze = mirror._freeze
        assert freeze is not None and freeze.masks_recorded
        assert freeze.touched[8] == 1 and mirror._taken[8] == 0 and mirror._taken[9] == 1
        assert live(engine) == now
        sec = resume_and_check(engine, mirror, image, want, at_take)
        assert sec.bytes_received() >= 2 * K4
    finally:
        mirror.close()
        engine.close()


def test_a_blocks_map_left_as_its_temporary_file_resumes_whole_regions_copying(
        tmp_path, monkeypatch):
    """A SIGKILL inside ``record_blocks`` (after the temporary file, before the rename):
    ``open`` ignores ``.blocks.map.tmp`` (safe: no write skipped a copy, since none could
    before the rename), the cycle resumes with whole regions and copies on every
    write; its image is the take, the next cycle the live volume."""
    vol, engine = filled(tmp_path)
    mirror, sec = pair(engine)
    engine.pwrite(b"\x31" * K4, 8 * RS)
    engine.pwrite(b"\x32" * 512, 20 * RS + 7 * K4)
    at_take = live(engine)
    original_rename = os.rename
    cut = threading.Event()

    def cut_before_rename(src, dst, *a, **kw):
        if str(dst).endswith(BLOCKS):
            cut.set()
            raise OSError(4, "killed")  # the process stops here: the tmp file stays
        return original_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", cut_before_rename)
    sec.hold = sec.hold_commit = True
    want = mirror.run_now()
    wait_until(lambda: sec.held, 10, "the cycle's frames")
    monkeypatch.undo()
    assert cut.is_set()
    # a write after the take, masks not recorded: copied
    engine.pwrite(b"\x33" * K4, 8 * RS + 5 * K4)
    assert mirror._freeze.preserved[8] == COPIED
    tmp_map = vol.path / DIR / f".{BLOCKS}.tmp"
    # what the killed process left: the temporary file, whole
    mirror._freeze.blocks.view(np.uint8).tofile(tmp_map)
    image = bytes(sec.image)
    crash(engine, mirror)
    engine, mirror = restarted(vol)
    try:
        freeze = mirror._freeze
        assert freeze is not None and freeze.blocks is None and not freeze.masks_recorded
        engine.pwrite(b"\x34" * K4, 20 * RS + 2 * K4)  # after the restart: copied
        assert freeze.preserved[20] == COPIED
        at_take_region20 = at_take[20 * RS:21 * RS]
        buf = bytearray(RS)
        freeze.read_range(20 * RS, memoryview(buf))
        assert bytes(buf) == at_take_region20
        resume_and_check(engine, mirror, image, want, at_take)
    finally:
        mirror.close()
        engine.close()


@pytest.mark.parametrize("name, content, says", [
    (BLOCKS, b"", "blocks.map"),
    (BLOCKS, b"\x01\x00" * REGIONS + b"\x00", "blocks.map"),
    (BLOCKS, b"\x01\x00" * REGIONS * 2, "blocks.map"),
    (TOUCHED, b"", "touched.map"),
    (TOUCHED, b"\x00" * (REGIONS - 1), "touched.map"),
    (TOUCHED, b"\x00" * (REGIONS - 1) + b"\xff", "touched.map"),
])
def test_more_damaged_maps_are_refused_in_one_error_naming_the_file(tmp_path, name, content,
                                                                     says):
    vol, engine = filled(tmp_path)
    try:
        taken = np.zeros(REGIONS, dtype=np.uint8)
        taken[8] = 1
        freeze = CycleFreeze.create(vol, engine.fd, 1, taken,
                                    blocks=np.where(taken, 1, 0).astype(np.uint16))
        assert freeze.record_blocks()
        freeze.close()
        (vol.path / DIR / name).write_bytes(content)
        with pytest.raises(VolumeCorrupt, match=says):
            CycleFreeze.open(vol, engine.fd)
        with pytest.raises(VolumeCorrupt, match=says):
            AsyncMirror(engine, interval=0, ack_timeout=2.0)
    finally:
        engine.close()


@pytest.mark.parametrize("what", ["blocks-dir", "touched-dir"])
def test_a_map_that_is_a_directory_is_refused_naming_it(tmp_path, what):
    vol, engine = filled(tmp_path)
    try:
        taken = np.ones(REGIONS, dtype=np.uint8)
        freeze = CycleFreeze.create(vol, engine.fd, 1, taken,
                                    blocks=np.ones(REGIONS, dtype=np.uint16))
        assert freeze.record_blocks()
        freeze.close()
        name = BLOCKS if what == "blocks-dir" else TOUCHED
        (vol.path / DIR / name).unlink()
        (vol.path / DIR / name).mkdir()
        with pytest.raises(VolumeCorrupt, match=name):
            CycleFreeze.open(vol, engine.fd)
    finally:
        engine.close()


def test_full_masks_on_a_short_last_region_are_accepted_and_cut_at_the_end(tmp_path,
                                                                          monkeypatch):
    """Handled safely, not refused: the tracker itself gives the short last region a full
    mask (16 bits, past the volume's end) wherever it does not know its blocks
    (``forget_blocks``, ``merge``, ``mark_map``), so ``check`` must take it; the
    conveyor cuts the extents at the end of the volume. Region size 64K, the last
    region 12K (3 blocks)."""
    size = RS * 20 - (RS - 3 * K4)
    vol, engine = filled(tmp_path, size=size, seed=4)
    try:
        mirror, sec = pair(engine)
        last = vol.regions - 1
        engine.tracker.forget_blocks()  # every mask full, the short last region's too
        engine.pwrite(b"\x41" * K4, last * RS + K4)
        engine.pwrite(b"\x42" * 512, 3 * RS + 512)
        at_take = live(engine)
        sec.hold = sec.hold_commit = True
        want = mirror.run_now()
        wait_until(lambda: sec.held, 10, "the cycle's frames")
        assert mirror._freeze.blocks[last] == 0xFFFF
        engine.pwrite(b"\x43" * 512, last * RS + 2 * K4)  # hits the full mask: copied
        assert mirror._freeze.preserved[last] == COPIED
        image = bytes(sec.image)
        crash(engine, mirror)
        assert np.fromfile(vol.path / DIR / BLOCKS, dtype=np.uint16)[last] == 0xFFFF
        engine, mirror = restarted(vol)
        try:
            resume_and_check(engine, mirror, image, want, at_take)
        finally:
            mirror.close()
    finally:
        engine.close()


# -- which writes skip the copy: a byte model, every region size ---------------------------

GEOMETRIES = [  # (region size, regions, bytes short of the last region)
    (4 << 10, 24, 0),
    (16 << 10, 12, 512),
    (64 << 10, 6, 20 << 10),
    (1 << 20, 3, (1 << 20) - (200 << 10)),  # the last region 200K: 3 blocks and a piece
]


def model_skips(rs: int, size: int, mask: int, offset: int, length: int) -> bool:
    """Byte by byte: the write lies inside one region and no byte of it is in a frozen
    block (blocks of rs/16, at least 4K; an empty mask: the whole region)."""
    per = max(1, min(16, rs // K4))
    bs = rs // per
    region = offset // rs
    if (offset + length - 1) // rs != region or not mask:
        return False
    blocks = {(b - region * rs) // bs for b in range(offset, offset + length)}
    return not any(mask >> b & 1 for b in blocks)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_write_skips_the_copy_exactly_when_it_touches_no_frozen_block(tmp_path, data):
    """Region sizes 4K (one block a region: never a skip), 16K, 64K, 1M (16 blocks of
    64K), a short last region; writes of 512-byte multiples at 512-byte offsets, inside
    a block, straddling blocks, straddling regions. Each write copies (COPIED) or
    skips (KEEP, touched) as the byte model says; then every frozen block reads as it
    was at the take, and what touched.map holds is what memory holds."""
    rs, n, short = data.draw(st.sampled_from(GEOMETRIES))
    size = rs * n - short
    root = tmp_path / f"ex{len(list(tmp_path.iterdir()))}"
    root.mkdir()
    vol = Volume.create(root / "v", size, rs)
    engine = Engine(vol)
    try:
        before = random.Random(5).randbytes(size)
        engine.pwrite(before, 0)
        regions = vol.regions
        bg = BlockGeometry(size, vol.geometry.shift)
        taken = np.array(data.draw(st.lists(st.booleans(), min_size=regions,
                                            max_size=regions)), dtype=np.uint8)
        masks = np.array([data.draw(st.integers(0, bg.full)) if t else 0 for t in taken],
                         dtype=np.uint16)
        freeze = CycleFreeze.create(vol, engine.fd, 1, taken, blocks=masks)
        engine.pre_write.append(freeze.preserve)
        assert freeze.record_blocks()
        expect = np.where(taken != 0, KEEP, FREE).astype(np.uint8)
        touched = np.zeros(regions, dtype=np.uint8)
        for _ in range(data.draw(st.integers(1, 8))):
            offset = data.draw(st.integers(0, size // 512 - 1)) * 512
            length = data.draw(st.integers(1, min(size - offset, 2 * rs + 8192) // 512)) * 512
            first, last = offset // rs, (offset + length - 1) // rs
            if first == last and expect[first] == KEEP and model_skips(
                    rs, size, int(masks[first]), offset, length):
                touched[first] = 1
            else:
                for r in range(first, last + 1):
                    if expect[r] == KEEP:
                        expect[r] = COPIED
            engine.pwrite(random.Random(offset).randbytes(length), offset)
            assert np.array_equal(freeze.preserved, expect), (offset, length)
            assert np.array_equal(freeze.touched, touched), (offset, length)
        on_disk = np.fromfile(vol.path / DIR / TOUCHED, dtype=np.uint8)
        assert np.array_equal(on_disk, touched)
        for r in np.flatnonzero(taken).tolist():
            for off, ln in bg.run_extents(freeze.blocks, [(r, r + 1)]).tolist():
                buf = bytearray(ln)
                freeze.read_range(off, memoryview(buf))
                assert bytes(buf) == before[off:off + ln], (r, off)
        freeze.drop()
    finally:
        engine.close()


# -- crash points -------------------------------------------------------------------------

def test_a_sigkill_between_the_touched_byte_and_the_write_loses_nothing(tmp_path,
                                                                        monkeypatch):
    """The write is marked and its region noted as touched, then the process dies before
    the data lands: the region is not retaken (it stays marked: the next cycle sends
    it again, harmless), the resumed cycle is the take."""
    vol, engine = filled(tmp_path, seed=6)
    mirror, sec = pair(engine)
    engine.pwrite(b"\x51" * K4, 12 * RS + 3 * K4)
    engine.pwrite(b"\x52" * K4, 13 * RS)
    at_take = live(engine)
    sec.hold = sec.hold_commit = True
    want = mirror.run_now()
    wait_until(lambda: sec.held, 10, "the cycle's frames")
    freeze = mirror._freeze
    assert freeze.masks_recorded
    offset, length = 12 * RS + 9 * K4, 512
    engine.tracker.mark(offset, length)  # the engine's order: marked, the hook, the data
    freeze.preserve(offset, length)
    assert freeze.preserved[12] == KEEP and freeze.touched[12]
    image = bytes(sec.image)
    crash(engine, mirror)  # ... and the data write never happens
    engine, mirror = restarted(vol)
    try:
        assert mirror._taken[12] == 0 and mirror._taken[13] == 1
        assert live(engine) == at_take
        resume_and_check(engine, mirror, image, want, at_take)
    finally:
        mirror.close()
        engine.close()


def test_two_sigkills_keep_regions_touched_after_the_first_restart_marked(tmp_path,
                                                                          monkeypatch):
    """Cycle 2 open, region 8 touched, SIGKILL. The restarted primary (no secondary yet)
    retakes region 9; a write to an unfrozen block of 9 touches it; region 10 is
    written on a frozen block (copied); SIGKILL again. The second restart retakes
    neither 8 nor 9 nor 10 (all stay marked); the resumed cycle is the first take and
    sends each of its regions once; the next cycle is the live volume."""
    vol, engine = filled(tmp_path, seed=7)
    mirror, sec = pair(engine)
    for r in (8, 9, 10, 11):
        engine.pwrite(bytes([0x60 + r]) * K4, r * RS + K4)
    at_take = live(engine)

    def write_after(freeze):
        engine.pwrite(b"\x71" * K4, 8 * RS + 7 * K4)

    after_record(monkeypatch, write_after)
    sec.hold = sec.hold_commit = True
    want = mirror.run_now()
    wait_until(lambda: sec.held, 10, "the cycle's frames")
    image = bytes(sec.image)
    crash(engine, mirror)
    monkeypatch.undo()

    engine, mirror = restarted(vol)
    assert mirror._taken[8] == 0 and mirror._taken[9] == 1
    engine.pwrite(b"\x72" * 512, 9 * RS + 12 * K4)  # unfrozen block: touched, no copy
    engine.pwrite(b"\x73" * 512, 10 * RS + K4 + 1024)  # frozen block 1: copied
    assert mirror._freeze.touched[9] and mirror._freeze.preserved[9] == KEEP
    assert mirror._freeze.preserved[10] == COPIED
    crash(engine, mirror)

    engine, mirror = restarted(vol)
    try:
        assert list(mirror._taken[8:12]) == [0, 0, 0, 1]
        sec2 = resume_and_check(engine, mirror, image, want, at_take)
        assert regions_of([piece for _, pieces in sec2.received[:4] for piece in pieces]) \
            >= {8, 9, 10, 11}
    finally:
        mirror.close()
        engine.close()


def test_a_sigkill_before_the_masks_are_recorded_resumes_whole_regions(tmp_path,
                                                                        monkeypatch):
    """Killed between the take and ``record_blocks``: a write meanwhile copied its
    region; no ``blocks.map``: the resumed cycle sends whole regions, and every write
    copies; the image is the take."""
    vol, engine = filled(tmp_path, seed=8)
    mirror, sec = pair(engine)
    engine.pwrite(b"\x81" * 512, 20 * RS + 512)
    engine.pwrite(b"\x82" * 512, 21 * RS + 512)
    at_take = live(engine)
    blocked, go = threading.Event(), threading.Event()
    original = CycleFreeze.record_blocks

    def late(self):
        blocked.set()
        go.wait(10)
        raise RuntimeError("killed before the masks were recorded")  # the thread stops

    monkeypatch.setattr(CycleFreeze, "record_blocks", late)
    sec.hold = sec.hold_commit = True
    want = mirror.run_now()
    wait_until(blocked.is_set, 10, "the take")
    engine.pwrite(b"\x83" * K4, 20 * RS + 8 * K4)  # not recorded yet: copied
    assert mirror._freeze.preserved[20] == COPIED and not mirror._freeze.touched.any()
    image = bytes(sec.image)
    go.set()
    wait_until(lambda: sec.closed is not None, 10, "the cycle thread stopping")
    assert not (vol.path / DIR / BLOCKS).exists() and not sec.held
    crash(engine, mirror)
    monkeypatch.undo()
    assert original is CycleFreeze.record_blocks
    engine, mirror = restarted(vol)
    try:
        freeze = mirror._freeze
        assert freeze is not None and freeze.blocks is None and not freeze.masks_recorded
        assert mirror._taken[20] == 0 and mirror._taken[21] == 1
        engine.pwrite(b"\x84" * K4, 21 * RS + 9 * K4)
        assert freeze.preserved[21] == COPIED
        sec2 = resume_and_check(engine, mirror, image, want, at_take)
        assert sec2.bytes_received() >= 2 * RS
    finally:
        mirror.close()
        engine.close()


# -- races ----------------------------------------------------------------------------------

def _writers(engine: Engine, size: int, bs: int, seeds, go: threading.Event,
             stop: threading.Event, errors: list) -> list[threading.Thread]:
    """Host threads writing (and trimming, zeroing) at random 512-byte offsets, a few
    bytes to two blocks, from ``go`` until ``stop``."""
    def host(seed: int) -> None:
        w = random.Random(seed)
        try:
            if not go.wait(10):
                raise AssertionError("never started")
            while not stop.is_set():
                offset = w.randrange(size // 512) * 512
                length = min(size - offset, w.choice((512, 1024, K4, bs, 2 * bs + 512)))
                what = w.random()
                if what < 0.1:
                    engine.trim(length, offset)
                elif what < 0.2:
                    engine.zero(length, offset, may_trim=w.random() < 0.5)
                else:
                    engine.pwrite(w.randbytes(length), offset)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    return [threading.Thread(target=host, args=(s,), daemon=True) for s in seeds]


@pytest.mark.parametrize("rs, size, crash_it", [
    (16 << 10, 4 << 20, True),
    (64 << 10, (4 << 20) - 12288, True),
    (64 << 10, 4 << 20, False),
    (1 << 20, (8 << 20) - (300 << 10), True),
])
def test_host_writers_racing_the_conveyor_and_its_acks_keep_the_take(tmp_path, monkeypatch,
                                                                     rs, size, crash_it):
    """Blocks written here and there (data: no frozen block is a hole), taken; three host
    threads write, trim and zero at random from right after the masks are recorded,
    while the frames are read and acknowledged out of order. Then either every frame
    is acknowledged and the cycle commits the take, or a SIGKILL with half of them
    acknowledged and a restart: the resumed cycle commits the take. The next cycle is
    the live volume."""
    vol, engine = filled(tmp_path, size=size, rs=rs, seed=9)
    rng = random.Random(10)
    bs = rs // max(1, min(16, rs // K4))
    mirror, sec = pair(engine)
    for _ in range(vol.regions * 2):
        engine.pwrite(rng.randbytes(512), rng.randrange(size // 512) * 512)
    at_take = live(engine)
    stop, errors, go = threading.Event(), [], threading.Event()
    threads = _writers(engine, size, bs, (11, 12, 13), go, stop, errors)
    frozen: list[CycleFreeze] = []
    after_record(monkeypatch, lambda freeze: (frozen.append(freeze), go.set()))
    for t in threads:
        t.start()
    sec.hold = True
    sec.hold_commit = crash_it

    def writes_past(n: int) -> None:
        base = engine.stats.writes
        wait_until(lambda: engine.stats.writes >= base + n or errors, 10, "host writes")

    want = mirror.run_now()
    try:
        go.wait(10)
        wait_until(lambda: sec.held, 10, "the cycle's frames")
        writes_past(50)
        acked = 0
        while True:
            wait_until(lambda: sec.held or mirror.committed >= want
                       or mirror.progress["state"] == "committing", 10, "frames")
            if not sec.held:
                break
            writes_past(3)
            sec.ack(rng.randrange(len(sec.held)))
            acked += 1
            if crash_it and acked >= 2 and len(sec.held) <= acked:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert frozen[0].touched.any(), "no write skipped a copy: the test proves nothing"
    if not crash_it:
        sec.hold = False
        committed_at(mirror, want)
        assert sec.commits[want] == at_take
        nxt = mirror.run_now()
        committed_at(mirror, nxt)
        assert sec.commits[nxt] == live(engine)
        mirror.close()
        engine.close()
        return
    image = bytes(sec.image)
    crash(engine, mirror)
    engine, mirror = restarted(vol)
    try:
        assert mirror._freeze is not None and mirror._freeze.number == want
        resume_and_check(engine, mirror, image, want, at_take)
    finally:
        mirror.close()
        engine.close()


def test_a_copy_of_a_region_hit_on_a_frozen_block_while_another_writer_skips_it(
        tmp_path, monkeypatch):
    """Writer A hits frozen block 0 of region 8: its copy (``_copy_blocks``: its reads
    and writes release the GIL) is held mid-way. Meanwhile writer B writes block 9 of
    region 8, a miss: it must not wait for A's copy (no copy needed) and lands,
    touching the region. The copy then finishes, A's write lands.
    The cycle's frozen block 0 is the take; after a SIGKILL the region (COPIED and
    touched) stays marked and the resumed cycle is the take."""
    vol, engine = filled(tmp_path, seed=14)
    mirror, sec = pair(engine)
    engine.pwrite(b"\x91" * K4, 8 * RS)
    at_take = live(engine)
    sec.hold = sec.hold_commit = True
    want = mirror.run_now()
    wait_until(lambda: sec.held, 10, "the cycle's frames")
    freeze = mirror._freeze
    copying, b_done = threading.Event(), threading.Event()
    real_copy = CycleFreeze._copy_blocks

    def held_copy(self, region):
        copying.set()
        b_done.wait(10)
        return real_copy(self, region)

    monkeypatch.setattr(CycleFreeze, "_copy_blocks", held_copy)
    a = threading.Thread(target=engine.pwrite, args=(b"\x92" * 512, 8 * RS + 1024))
    a.start()
    try:
        assert copying.wait(10)
        assert freeze.copying[8] == 1 and freeze.preserved[8] == KEEP
        b = threading.Thread(target=engine.pwrite, args=(b"\x93" * K4, 8 * RS + 9 * K4))
        b.start()
        b.join(10)
        assert not b.is_alive(), "a write missing the frozen blocks waited for a copy"
        assert freeze.touched[8] == 1
    finally:
        b_done.set()
        a.join(10)
    monkeypatch.undo()
    assert freeze.preserved[8] == COPIED
    buf = bytearray(K4)
    freeze.read_range(8 * RS, memoryview(buf))
    assert bytes(buf) == at_take[8 * RS:8 * RS + K4]
    image = bytes(sec.image)
    crash(engine, mirror)
    engine, mirror = restarted(vol)
    try:
        assert mirror._taken[8] == 0
        resume_and_check(engine, mirror, image, want, at_take)
    finally:
        mirror.close()
        engine.close()


# -- a random mix against the model: every commit is its take ---------------------------------

@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(geometry=st.sampled_from([(16 << 10, 160, 3584), (64 << 10, 48, 40 << 10),
                                 (1 << 20, 5, 700 << 10)]),
       seed=st.integers(0, 1 << 30), acked=st.floats(0, 1), every=st.booleans())
def test_writes_takes_acks_sigkills_and_restarts_keep_every_image_the_take(
        tmp_path, geometry, seed, acked, every):
    """A sparse volume (some data, the rest holes), region sizes 16K, 64K and 1M, a short
    last region; host writes, zeroes written out and zeroes punched (``may_trim``,
    the holes of the tests above) of 512 bytes to two blocks at 512-byte offsets,
    before each take and between out-of-order acknowledgements; two cycles commit,
    a third is cut by a SIGKILL with a share of its frames acknowledged (or all, not
    committed), more writes while it is down (none: the process is dead) and right
    after the restart before the secondary is back; the resumed cycle and the next
    are the volumes at their takes."""
    rs, n, short = geometry
    size = rs * n - short
    root = tmp_path / f"ex{len(list(tmp_path.iterdir()))}"
    root.mkdir()
    vol = Volume.create(root / "v", size, rs)
    engine = Engine(vol)
    rng = random.Random(seed)
    bs = rs // max(1, min(16, rs // K4))
    for _ in range(4):
        at = rng.randrange(size // rs) * rs
        engine.pwrite(rng.randbytes(min(size - at, 3 * rs)), at)

    def scribble(k: int) -> None:
        for _ in range(k):
            offset = rng.randrange(size // 512) * 512
            length = min(size - offset, rng.choice((512, 1024, K4, bs, 2 * bs)))
            if rng.random() < 0.15:
                engine.zero(length, offset, may_trim=rng.random() < 0.5)
            else:
                engine.pwrite(rng.randbytes(length), offset)

    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
    sec = Sec(mirror, S1, size)
    try:
        mirror.connected(sec)
        committed_at(mirror, 1)
        assert sec.commits[1] == live(engine)
        for _ in range(2):
            scribble(30)
            at_take = live(engine)
            sec.hold = True
            want = mirror.run_now()
            wait_until(lambda: sec.held, 10, "the cycle's frames")
            while sec.held:
                scribble(3)
                sec.ack(rng.randrange(len(sec.held)))
                wait_until(lambda w=want: sec.held or mirror.committed >= w
                           or mirror.progress["state"] == "committing", 10, "frames")
            sec.hold = False
            committed_at(mirror, want)
            assert sec.commits[want] == at_take
        scribble(40)
        at_take = live(engine)
        sec.hold = sec.hold_commit = True
        want = mirror.run_now()
        wait_until(lambda: sec.held, 10, "the cycle's frames")
        if every:
            while mirror.progress["state"] != "committing":
                wait_until(lambda: sec.held or mirror.progress["state"] == "committing", 10,
                           "the cycle's frames")
                if sec.held:
                    scribble(2)
                    sec.ack(rng.randrange(len(sec.held)))
        else:
            for _ in range(int(len(sec.held) * acked)):
                scribble(2)
                sec.ack(rng.randrange(len(sec.held)))
        scribble(5)
    finally:
        image = bytes(sec.image)
        crash(engine, mirror)
    engine, mirror = restarted(vol)
    try:
        assert mirror._freeze is not None and mirror._freeze.number == want
        conveyed = set(np.flatnonzero(mirror._freeze.preserved == FREE).tolist())
        scribble(5)  # after the restart, before the secondary is back
        sec2 = Sec(mirror, S1, size, image=image)
        mirror.connected(sec2)
        committed_at(mirror, want)
        assert sec2.commits[want] == at_take
        got = {r for _, pieces in sec2.received for o, ln in pieces
               for r in range(o // rs, (o + ln - 1) // rs + 1)}
        assert not got & conveyed, "a region conveyed before the SIGKILL was sent again"
        scribble(10)
        nxt = mirror.run_now()
        committed_at(mirror, nxt)
        assert sec2.commits[nxt] == live(engine)
    finally:
        mirror.close()
        engine.close()


def test_scattered_masks_round_trip_through_blocks_map(tmp_path):
    """More than ``MAX_RUN_WRITES`` runs (the whole map in one write) and a few (run by
    run): ``open`` reads back exactly the masks, zeros where none, and a write after
    the restart skips or copies by them."""
    rs, regions = 16 << 10, 4000
    vol = Volume.create(tmp_path / "v", rs * regions, rs)
    engine = Engine(vol)
    try:
        rng = np.random.default_rng(15)
        for scattered in (True, False):
            taken = (rng.random(regions) < (0.5 if scattered else 0.001)).astype(np.uint8)
            masks = np.where(taken != 0, rng.integers(0, 16, regions), 0).astype(np.uint16)
            freeze = CycleFreeze.create(vol, engine.fd, 1, taken, blocks=masks.copy())
            assert freeze.record_blocks()
            freeze.close()
            again = CycleFreeze.open(vol, engine.fd)
            assert again is not None and again.masks_recorded
            assert np.array_equal(again.blocks, masks)
            r = int(np.flatnonzero((masks != 0) & (masks != 0xF))[0])
            miss = int(np.flatnonzero([not masks[r] >> b & 1 for b in range(4)])[0])
            engine.pre_write.append(again.preserve)
            engine.pwrite(b"\x01" * 512, r * rs + miss * K4)
            assert again.preserved[r] == KEEP and again.touched[r]
            engine.pre_write.clear()
            again.drop()
    finally:
        engine.close()
