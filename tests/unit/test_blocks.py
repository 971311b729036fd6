"""Written blocks within regions (blocks.py): the tracker's masks and what a cycle conveys
of a region written in part."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import wait_until
from tests.unit.test_attack_async import (
    RS,
    S1,
    SIZE,
    FakeSecondary,
    mirrored,
    primary_engine,  # noqa: F401 (the engine fixture)
)
from tests.unit.test_attack_session7 import volume_bytes
from volume_core.blocks import POPCOUNT, RUNS, BlockGeometry
from volume_core.cycle_freeze import KEEP
from volume_core.live_pass import LivePass
from volume_core.regions import RegionTracker

pytestmark = pytest.mark.unit

K4 = 4096


@pytest.mark.parametrize(("region_size", "block", "full"), [
    (4 << 10, 4 << 10, 0x1), (8 << 10, 4 << 10, 0x3), (64 << 10, 4 << 10, 0xFFFF),
    (1 << 20, 64 << 10, 0xFFFF), (16 << 20, 1 << 20, 0xFFFF)])
def test_the_block_size_and_full_mask_follow_the_region_size(region_size, block, full):
    bg = BlockGeometry(100 * region_size, region_size.bit_length() - 1)
    assert (1 << bg.shift, bg.full) == (block, full)


def test_a_mask_names_every_block_a_write_touches():
    bg = BlockGeometry(4 * RS, 16)
    assert bg.mask(0, 1, 0) == 0x1
    assert bg.mask(K4 - 1, 2, 0) == 0x3  # two bytes across a block boundary
    assert bg.mask(RS - 512, 1024, 0) == 0x8000 and bg.mask(RS - 512, 1024, 1) == 0x1
    assert bg.mask(0, 3 * RS, 1) == 0xFFFF


def test_the_lookup_tables_count_bits_and_runs():
    for mask in (0, 1, 0xFFFF, 0x8001, 0x5555, 0x0FF0, 0x00F0 | 0x0003):
        bits = [(mask >> i) & 1 for i in range(16)]
        runs = sum(1 for i in range(16) if bits[i] and (i == 0 or not bits[i - 1]))
        assert (POPCOUNT[mask], RUNS[mask]) == (sum(bits), runs), hex(mask)


def _blocks_of(bg: BlockGeometry, regions: list[int], masks: list[int]) -> set[int]:
    per = bg.full.bit_length()
    return {r * per + i for r, m in zip(regions, masks, strict=True) for i in range(per)
            if m >> i & 1}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 40), st.integers(1, 0xFFFF), min_size=1, max_size=20),
       st.integers(0, 3 * K4 // 512))
def test_extents_are_the_written_blocks_joined_and_cut_at_the_end(masks, short):
    size = 41 * RS - short * 512  # a short last region too
    bg = BlockGeometry(size, 16)
    regions = sorted(masks)
    rows = bg.extents(np.array(regions), np.array([masks[r] for r in regions], np.uint16))
    want = sorted(b for b in _blocks_of(bg, regions, [masks[r] for r in regions])
                  if b * K4 < size)
    got = [b for offset, length in rows.tolist()
           for b in range(offset // K4, -(-(offset + length) // K4))]
    assert got == want
    ends = rows[:, 0] + rows[:, 1]
    assert (rows[1:, 0] > ends[:-1]).all(), "extents touching were not joined"
    assert int(ends.max()) <= size
    nbytes, extents = bg.weigh(np.array([masks[r] for r in regions], np.uint16))
    assert nbytes >= int(rows[:, 1].sum()) and extents >= len(rows)


def test_run_extents_of_whole_regions_and_of_masks():
    bg = BlockGeometry(10 * RS - 512, 16)
    whole = bg.run_extents(None, [(0, 2), (9, 10)])
    assert whole.tolist() == [[0, 2 * RS], [9 * RS, RS - 512]]
    blocks = np.zeros(10, np.uint16)
    blocks[1], blocks[9] = 0x8000, 0xFFFF
    blocks[0] = 0  # marked without a mask: whole
    assert bg.run_extents(blocks, [(0, 2), (9, 10)]).tolist() == [
        [0, RS], [2 * RS - K4, K4], [9 * RS, RS - 512]]
    assert bg.weigh_run(blocks, 1, 2) == (K4, 1) and bg.weigh_run(blocks, 0, 1) == (RS, 1)
    assert bg.weigh_run(None, 9, 10) == (RS - 512, 1)


# -- the tracker -----------------------------------------------------------------------

@pytest.fixture(name="tracker")
def a_tracker(tmp_path):
    path = tmp_path / "marks.map"
    path.write_bytes(bytes(64))
    t = RegionTracker(path, 64, RS)
    yield t
    t.close()


def test_marks_from_before_the_first_take_count_as_whole_regions(tracker):
    tracker.mark(0, 512)
    assert tracker.take().blocks[0] == 0xFFFF  # unknown before: the map's own marks
    tracker.release(np.zeros(64, np.uint8))


def test_a_take_hands_over_the_blocks_written_since_the_last(tracker):
    tracker.release(tracker.take().marks)
    tracker.mark(5 * RS + 3 * K4, 100)  # one block
    tracker.mark(7 * RS + K4 - 1, 2)  # two, across a block boundary
    tracker.mark(10 * RS - K4, RS + 3 * K4)  # the last block of 9, 10 whole, 11's first two
    taken = tracker.take()
    assert np.flatnonzero(taken.marks).tolist() == [5, 7, 9, 10, 11]
    assert [hex(int(taken.blocks[r])) for r in (5, 7, 9, 10, 11)] == [
        "0x8", "0x3", "0x8000", "0xffff", "0x3"]
    assert not tracker.blocks.any(), "a take starts the masks afresh"
    tracker.release(taken.marks)


def test_marks_that_come_as_a_map_or_are_given_back_count_as_whole(tracker):
    tracker.release(tracker.take().marks)
    tracker.mark(3 * RS, 512)
    taken = tracker.take()
    tracker.give_back(taken.marks)  # a failed cycle: its masks are not handed back
    other = np.zeros(64, np.uint8)
    other[20] = 1
    tracker.mark_map(other)
    again = tracker.take()
    assert again.blocks[3] == 0xFFFF and again.blocks[20] == 0xFFFF
    tracker.release(again.marks)


def test_forget_blocks_makes_every_mark_whole_and_a_later_write_cannot_narrow_it(tracker):
    tracker.release(tracker.take().marks)
    tracker.mark(2 * RS, 512)
    tracker.forget_blocks()
    tracker.mark(2 * RS + K4, 512)
    assert tracker.take().blocks[2] == 0xFFFF


# -- a cycle conveys the written blocks ------------------------------------------------

def _conveyed(sec: FakeSecondary) -> int:
    return sec.mirror.stats["bytes_conveyed"]


def test_a_cycle_after_scattered_small_writes_conveys_their_blocks_only(engine):
    engine.pwrite(random.Random(1).randbytes(SIZE), 0)
    with mirrored(engine) as mirror:
        sec = FakeSecondary(mirror, S1)
        mirror.connected(sec)
        wait_until(lambda: mirror.committed >= 1, 10, "the initial sync")
        before = _conveyed(sec)
        rng = random.Random(2)
        blocks = set()
        for _ in range(60):
            offset = rng.randrange(SIZE // 512) * 512
            length = rng.choice((512, K4, 3 * K4 + 512))
            length = min(length, SIZE - offset)
            engine.pwrite(rng.randbytes(length), offset)
            blocks |= set(range(offset // K4, -(-(offset + length) // K4)))
        want = mirror.run_now()
        wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
        assert _conveyed(sec) - before == len(blocks) * K4
        assert mirror.last_cycle["bytes"] == len(blocks) * K4
        assert sec.commits[want] == volume_bytes(engine)


def test_a_region_written_in_part_while_frozen_still_travels_as_it_was(engine):
    """The copy on write keeps the whole region; the cycle sends the blocks of the take,
    as they were at the take; the next one sends the new write."""
    engine.pwrite(random.Random(3).randbytes(SIZE), 0)
    with mirrored(engine) as mirror:
        sec = FakeSecondary(mirror, S1, hold=True)
        mirror.connected(sec)
        wait_until(lambda: sec.held, 10, "the initial sync's first chunk")
        sec.hold = False
        sec.release(len(sec.held))
        wait_until(lambda: mirror.committed >= 1, 10, "the initial sync")
        engine.pwrite(b"\x11" * K4, 4 * RS + 2 * K4)
        at_take = volume_bytes(engine)
        sec.hold = True
        want = mirror.run_now()
        wait_until(lambda: sec.held, 10, "the cycle's chunk")
        engine.pwrite(b"\x22" * K4, 4 * RS + 2 * K4)  # the same block, copied first
        engine.pwrite(b"\x33" * K4, 4 * RS + 9 * K4)  # another block of the region
        sec.hold = False
        sec.release(len(sec.held))
        wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
        assert sec.commits[want] == at_take
        nxt = mirror.run_now()
        wait_until(lambda: mirror.committed >= nxt, 10, f"cycle {nxt}")
        assert sec.commits[nxt] == volume_bytes(engine)


def test_a_region_the_initial_sync_skipped_travels_whole_in_cycle_1(engine, monkeypatch):
    """Written in part during the pass before the pass reached it: the pass skips it, so
    cycle 1 must carry all of it, not only the block written."""
    engine.pwrite(random.Random(4).randbytes(SIZE), 0)
    real = LivePass.read_range
    done: list[int] = []

    def read_range(self, offset, view):
        if not done:
            done.append(offset)
            engine.pwrite(b"\x44" * 512, 100 * RS + 5 * K4)  # a region the pass has not read
        real(self, offset, view)

    monkeypatch.setattr(LivePass, "read_range", read_range)
    with mirrored(engine) as mirror:
        sec = FakeSecondary(mirror, S1)
        mirror.connected(sec)
        wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
        assert done and mirror.initial_sync["skipped_regions"] >= 1
        assert sec.commits[1] == volume_bytes(engine)


def test_a_cycle_resumed_after_a_restart_conveys_its_recorded_blocks(tmp_path):
    """The masks are recorded (``blocks.map``): a cycle a previous run left open sends
    the blocks written before its take, as they were; a write after the take that
    missed them was not copied, and goes in the next cycle."""
    from volume_core.engine import Engine
    from volume_core.volume import Volume

    vol = Volume.create(tmp_path / "v", SIZE, RS)
    engine = Engine(vol)
    engine.pwrite(random.Random(5).randbytes(SIZE), 0)
    with mirrored(engine) as mirror:
        sec = FakeSecondary(mirror, S1)
        mirror.connected(sec)
        wait_until(lambda: mirror.committed >= 1, 10, "the initial sync")
        engine.pwrite(b"\x55" * K4, 7 * RS)
        at_take = volume_bytes(engine)
        sec.hold = True
        want = mirror.run_now()
        wait_until(lambda: sec.held, 10, "the cycle's chunk")
        engine.pwrite(b"\x66" * K4, 7 * RS + K4)  # after the take, another block: no copy
        assert mirror._freeze.preserved[7] == KEEP and mirror._freeze.touched[7]
        sec.closed = "the primary stops"
    engine.close()
    engine = Engine(Volume.open(tmp_path / "v"))
    try:
        with mirrored(engine) as mirror:
            assert mirror._freeze is not None and mirror._freeze.blocks[7] == 1
            assert not mirror._taken[7], "touched: marked for the next cycle"
            sec = FakeSecondary(mirror, S1)
            sec.image[:] = at_take  # what it held, but the block written before the take
            sec.image[7 * RS:7 * RS + K4] = bytes(K4)
            before = mirror.stats["bytes_conveyed"]
            mirror.connected(sec)
            wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
            assert mirror.stats["bytes_conveyed"] - before == K4
            assert sec.commits[want] == at_take
            nxt = mirror.run_now()
            wait_until(lambda: mirror.committed >= nxt, 10, f"cycle {nxt}")
            assert sec.commits[nxt] == volume_bytes(engine)
    finally:
        engine.close()


# -- the run helpers a frame's acknowledgement uses --------------------------------------

def _apart(steps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first, count) runs, ascending and apart, from (gap, count) steps."""
    rows, at = [], 0
    for skip, count in steps:
        at += skip + (1 if rows else 0)
        rows.append((at, count))
        at += count
    return rows


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4)), min_size=1, max_size=30),
       st.integers(1, 8))
def test_run_regions_and_spans_cover_exactly_the_runs(steps, gap):
    from volume_core.geometry import run_regions, spans

    runs = [(first, first + count) for first, count in _apart(steps)]
    regions = run_regions(runs)
    assert regions.tolist() == [r for a, b in runs for r in range(a, b)]
    cover = spans(regions, gap)
    assert all(hi > lo for lo, hi in cover)
    assert all(cover[i + 1][0] - cover[i][1] >= gap for i in range(len(cover) - 1))
    inside = {r for lo, hi in cover for r in range(lo, hi)}
    assert set(regions.tolist()) <= inside
    assert all(lo in set(regions.tolist()) and hi - 1 in set(regions.tolist())
               for lo, hi in cover)


def test_a_take_uses_the_masks_prepared_before_writes_paused(tracker):
    tracker.release(tracker.take().marks)
    tracker.prepare_take()
    spare = tracker._spare
    taken = tracker.take()
    assert tracker._blocks is spare and tracker._spare is None
    assert not tracker.blocks.any()
    tracker.release(taken.marks)
    taken = tracker.take()  # none prepared: made during the take, as before
    assert not tracker.blocks.any()
    tracker.release(taken.marks)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), min_size=1, max_size=20),
       st.integers(1, 16))
def test_cut_and_join_runs_keep_every_region_once(steps, step):
    from volume_core.geometry import cut_runs, join_runs

    rows = _apart(steps)
    pieces = cut_runs(np.array(rows), step)
    assert ((pieces[:, 1] - pieces[:, 0]) <= step).all() and (pieces[:, 1] > pieces[:, 0]).all()
    assert [r for a, b in pieces.tolist() for r in range(a, b)] == [
        r for first, count in rows for r in range(first, first + count)]
    joined = join_runs(pieces)
    assert joined == [(first, first + count) for first, count in rows]
    assert join_runs(pieces[:0]) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=12, max_size=12), st.booleans())
def test_weigh_runs_is_weigh_run_of_each(masks, whole):
    bg = BlockGeometry(12 * RS - 512, 16)
    blocks = None if whole else np.array(masks, np.uint16)
    rows = np.array([(0, 3), (3, 4), (5, 9), (11, 12)])
    nbytes, parts = bg.weigh_runs(blocks, rows)
    assert list(zip(nbytes.tolist(), parts.tolist(), strict=True)) == [
        bg.weigh_run(blocks, a, b) for a, b in rows.tolist()]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 127), min_size=1, max_size=120, unique=True),
       st.integers(0, 2**32 - 1))
def test_frames_of_a_cycle_are_full_greedy_and_within_the_limits(tmp_path_factory, regions,
                                                                  seed):
    """However the written blocks lie (the volume all data: one stretch, gathered with
    array work), every frame holds at most 1 MiB and 1024 extents, each but the last
    is full (the next run would not fit), and the commit equals the volume."""
    from volume_core.engine import Engine
    from volume_core.replication import protocol as p
    from volume_core.replication.mirror import CYCLE_CHUNK
    from volume_core.volume import Volume

    vol = Volume.create(tmp_path_factory.mktemp("v") / "v", SIZE, RS)
    engine = Engine(vol)
    rng = random.Random(seed)
    engine.pwrite(rng.randbytes(SIZE), 0)
    frames: list = []
    try:
        with mirrored(engine) as mirror:
            sec = FakeSecondary(mirror, S1)
            mirror.connected(sec)
            wait_until(lambda: mirror.committed >= 1, 10, "the initial sync")
            for r in sorted(regions):
                for b in rng.sample(range(16), rng.randint(1, 16)):
                    engine.pwrite(rng.randbytes(K4), r * RS + b * K4)
            real = sec.send_bulk

            def record(frame, *args, **kw):
                if isinstance(frame, (p.Write, p.WriteV)):
                    frames.append(frame)
                return real(frame, *args, **kw)

            sec.send_bulk = record
            want = mirror.run_now()
            wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
            assert sec.commits[want] == volume_bytes(engine)
    finally:
        engine.close()
    sizes = [f.length for f in frames]
    counts = [len(f.extents) if isinstance(f, p.WriteV) else 1 for f in frames]
    assert max(sizes) <= CYCLE_CHUNK and max(counts) <= p.MAX_EXTENTS
    # greedy: a frame was closed because the next run would not fit, so any two frames in
    # a row hold more than a chunk (at most 960 extents here: bytes are what binds)
    for a, b in zip(sizes, sizes[1:], strict=False):
        assert a + b > CYCLE_CHUNK, sizes


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([12, 13, 16, 20]), st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 0xFFFF)), min_size=1, max_size=12,
    unique_by=lambda t: t[0]))
def test_block_runs_are_the_set_blocks_joined(shift, items):
    bg = BlockGeometry(41 << shift, shift)
    items.sort()
    regions = np.array([r for r, _ in items], dtype=np.int64)
    masks = np.array([m & bg.full for _, m in items], dtype=np.uint16)
    per = bg.full.bit_length()
    want = sorted(r * per + b for r, m in zip(regions.tolist(), masks.tolist(), strict=True)
                  for b in range(per) if m >> b & 1)
    runs = bg.block_runs(regions, masks)
    assert runs.dtype == np.int64 and runs.shape[1] == 2
    assert [s + i for s, c in runs.tolist() for i in range(c)] == want
    assert all(a + c < b for (a, c), (b, _) in itertools.pairwise(runs.tolist()))
