"""Attack on written-block cycles (session 11): ``blocks.py`` (a region's 16-bit mask of
written blocks), the tracker's masks beside its marks (``take``, ``forget_blocks``, the
single and multi-region ``try_mark``, ``release_runs`` and its page-sized map writes),
``CycleFreeze.read_range``/``conveyed_runs``, the mirror conveying only written blocks,
and the rate cap (``pacing.py``, ``serve --max-rate``).

Real engines, files and trackers throughout; the secondary is the in-memory one of
``test_attack_async`` (it keeps its image at every commit). A SIGKILL is simulated by
closing the descriptors without any cleanup (the tracker's map is neither trimmed nor
synced; the page cache survives, as it does a killed process) and opening everything
again. Failures are injected by wrapping ``os.pwrite``.

Six bugs found, fixed (their tests below): a failed state-map write at an ack left
memory FREE over KEEP on disk (a later write, uncopied, could then reach the resumed
cycle's image); an empty write at the end of the volume raised in ``try_mark`` with the
write counted in flight (every later quiesce timed out), and one at offset 0 or inside a
region widened what the next cycle conveyed; a frame cut off while paused by the rate
cap was charged twice; a cycle's progress passed 100% (holes counted whole); a decimal
``--max-rate`` too large for a float gave an internal error. The others check what held.
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.main import cli
from tests.conftest import wait_until
from tests.unit.test_attack_async import (
    RS,
    S1,
    S2,
    SIZE,
    FakeSecondary,
    chunk_pieces,
    mirrored,
    primary_engine,  # noqa: F401 (the engine fixture)
)
from tests.unit.test_attack_kept_intents import check_consistent
from volume_core import regions as regions_mod
from volume_core.blocks import MIN_BLOCK, PER_REGION, BlockGeometry
from volume_core.cycle_freeze import COPIED, FREE, KEEP, CycleFreeze
from volume_core.engine import Engine
from volume_core.errors import UsageError
from volume_core.pacing import Pacer
from volume_core.regions import RegionTracker
from volume_core.replication import protocol as p
from volume_core.replication.mirror import CYCLE_CHUNK, AsyncMirror
from volume_core.replication.session import parse_rate
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

K4 = 4096
MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------------

class Sec(FakeSecondary):
    """A FakeSecondary of any volume size that logs every piece it receives, and can
    acknowledge one held frame out of order (``ack``)."""

    def __init__(self, mirror: AsyncMirror, uuid: str, size: int, *, image: bytes | None = None,
                 hold: bool = False) -> None:
        super().__init__(mirror, uuid, hold=hold)
        self.image = bytearray(size) if image is None else bytearray(image)
        self.received: list[tuple[type, list[tuple[int, int]]]] = []  # (kind, (offset, len))
        self.payload = 0  # bytes of WRITE/WRITEV payloads received
        self.hold_commit = False  # set: CYCLE_COMMIT goes unanswered (the cycle stays open)

    def send_urgent(self, frame):
        if self.hold_commit and isinstance(frame, p.CycleCommit):
            return
        super().send_urgent(frame)

    def send_bulk(self, frame, timeout=None, lent=False, window=None, handoff=False):
        pieces = chunk_pieces(frame)
        if pieces is not None and self.closed is None and self.block_bulk is None:
            with self.lock:
                self.received.append((type(frame), [(o, len(d)) for o, d in pieces]))
                if isinstance(frame, (p.Write, p.WriteV)):
                    self.payload += len(frame.data)
        super().send_bulk(frame, timeout, lent, window, handoff)

    def ack(self, index: int) -> None:
        """Apply and acknowledge the held frame at ``index`` alone."""
        with self.lock:
            frame, pieces = self.held.pop(index)
            for offset, data in pieces:
                self.image[offset:offset + len(data)] = data
        self.mirror.on_frame(p.DataAck(frame.seq))

    def bytes_received(self, since: int = 0) -> int:
        return sum(n for _, pieces in self.received[since:] for _, n in pieces)


def live(engine: Engine) -> bytes:
    buf = bytearray(engine.size)
    engine.pread(buf, 0)
    return bytes(buf)


def crash(engine: Engine, mirror: AsyncMirror | None = None) -> None:
    """SIGKILL: the cycle thread stops where it is; the tracker's map is neither trimmed
    nor synced (its descriptor just goes); the freeze's files stay as they are."""
    if mirror is not None:
        mirror.close()  # joins the cycle thread; closes the freeze's descriptors only
    tracker = engine.tracker
    if tracker._fd >= 0:
        os.close(tracker._fd)
        tracker._fd = -1
    engine.close()  # (syncs the data file: a killed process loses none of it either)


def regions_of(pieces) -> set[int]:
    """The regions (of RS bytes) that (offset, data or length) pieces touch."""
    out = set()
    for offset, d in pieces:
        n = d if isinstance(d, int) else len(d)
        out.update(range(offset // RS, (offset + n - 1) // RS + 1))
    return out


def touched_blocks(offset: int, length: int, shift: int) -> set[int]:
    return set(range(offset >> shift, ((offset + length - 1) >> shift) + 1))


def block_bytes(blocks: set[int], shift: int, size: int) -> int:
    return sum(min((b + 1) << shift, size) - (b << shift) for b in blocks)


@pytest.fixture
def hot(monkeypatch):
    """Every extent written in the test counts as hot: conveyed regions are kept (2)."""
    monkeypatch.setattr(regions_mod, "HOT_SECONDS", 3600.0)


def committed_at(mirror: AsyncMirror, want: int) -> None:
    wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")


def restarted(vol: Volume) -> tuple[Engine, AsyncMirror]:
    """The primary started again on ``vol`` (after ``crash``): its engine and mirror."""
    engine = Engine(Volume.open(vol.path))
    try:
        return engine, AsyncMirror(engine, interval=0, ack_timeout=2.0)
    except BaseException:
        engine.close()
        raise


def resume_and_check(engine: Engine, mirror: AsyncMirror, image: bytes, want: int,
                     at_take: bytes) -> Sec:
    """A secondary holding ``image`` connects: the resumed cycle ``want`` commits
    ``at_take``; the next commits the live volume."""
    sec = Sec(mirror, S1, engine.size, image=image)
    mirror.connected(sec)
    committed_at(mirror, want)
    assert sec.commits[want] == at_take, f"cycle {want} is not the volume at its take"
    nxt = mirror.run_now()
    committed_at(mirror, nxt)
    assert sec.commits[nxt] == live(engine), "the next cycle is not the live volume"
    return sec


def start_pair(engine: Engine, **kw) -> tuple[AsyncMirror, Sec]:
    """A mirror and its secondary, past the initial sync and cycle 1."""
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0, **kw)
    sec = Sec(mirror, S1, engine.size)
    mirror.connected(sec)
    committed_at(mirror, 1)
    assert sec.commits[1] == live(engine)
    return mirror, sec


# -- BlockGeometry against a model ------------------------------------------------------

def model_extents(size: int, shift: int, masks: dict[int, int]) -> list[list[int]]:
    """The written blocks' bytes, joined where they touch, cut at ``size``."""
    bg = BlockGeometry(size, shift)
    per = bg.full.bit_length()
    byte = set()
    for r, m in masks.items():
        for i in range(per):
            if m >> i & 1:
                lo = (r << shift) + (i << bg.shift)
                byte.update(range(lo >> 9, min(lo + (1 << bg.shift), size) >> 9))
    rows: list[list[int]] = []
    for s in sorted(byte):  # in 512-byte sectors
        if rows and rows[-1][0] + rows[-1][1] == s << 9:
            rows[-1][1] += 512
        else:
            rows.append([s << 9, 512])
    return rows


geometries = st.sampled_from([12, 13, 15, 16, 20]).flatmap(
    lambda shift: st.tuples(st.just(shift), st.integers(1, 24),
                            st.integers(0, (1 << shift) // 512 - 1)))


@settings(max_examples=150, deadline=None)
@given(geometries, st.data())
def test_extents_and_weights_match_a_byte_model_for_every_region_size(geo, data):
    shift, count, short = geo
    size = (count << shift) - short * 512
    bg = BlockGeometry(size, shift)
    per = min(PER_REGION, max(1, (1 << shift) // MIN_BLOCK))
    assert bg.full == (1 << per) - 1 and (1 << bg.shift) * per == 1 << shift
    masks = data.draw(st.dictionaries(st.integers(0, count - 1), st.integers(1, bg.full),
                                      min_size=1))
    regions = sorted(masks)
    arr = np.array([masks[r] for r in regions], np.uint16)
    got = bg.extents(np.array(regions), arr).tolist()
    assert got == model_extents(size, shift, masks)
    nbytes, parts = bg.weigh(arr)
    assert nbytes >= sum(n for _, n in got) and parts >= len(got)
    # the frame's view: runs of regions over a blocks array (0 = unknown = whole)
    blocks = np.zeros(count, np.uint16)
    blocks[regions] = arr
    runs: list[tuple[int, int]] = []
    for r in regions:  # runs of adjacent marked regions
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    assert bg.run_extents(blocks, runs).tolist() == got
    whole = bg.run_extents(None, runs).tolist()
    assert whole == [[a << shift, min(b << shift, size) - (a << shift)] for a, b in runs]
    for a, b in runs:
        w = bg.weigh_run(blocks, a, b)
        assert w == bg.weigh(arr[[regions.index(r) for r in range(a, b)]])
        assert bg.weigh_run(None, a, b) == (min(b << shift, size) - (a << shift), 1)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([12, 13, 16, 20, 24]), st.integers(0, 1 << 24), st.integers(1, 3 << 20))
def test_a_mask_names_exactly_the_blocks_a_write_touches(shift, offset, length):
    bg = BlockGeometry(64 << 24, shift)
    for r in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
        base = r << shift
        lo, hi = max(offset, base), min(offset + length, base + (1 << shift))
        want = sum(1 << i for i in range((lo - base) >> bg.shift,
                                         ((hi - 1 - base) >> bg.shift) + 1))
        assert bg.mask(offset, length, r) == want


# -- the tracker's masks against a model -------------------------------------------------

#: the tracker model's operations (repeats weigh them)
KINDS = ["write", "write", "owner", "owner", "open", "open", "release", "give_back", "ack",
         "ack", "map", "forget"]
ops = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 1 << 30),
                         st.integers(1, 1 << 30)), min_size=1, max_size=30)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([12, 13, 16, 20]), st.integers(1, 9), st.integers(0, 7), ops)
def test_a_take_covers_every_byte_written_since_the_last_and_no_mark_is_lost(
        hot, shift, count, short_sectors, steps):
    """Random writes (512-byte aligned, straddling blocks and regions, into a short last
    region; through mark() or as the engine does, try_mark under the lock), takes
    released, given back or left open while frames are acknowledged (``release_runs``,
    kept where hot), maps marked, masks forgotten: every take's marks and masks cover
    every byte written since the take before, the map agrees with memory, and a SIGKILL
    keeps every mark and every region taken and not conveyed."""
    rs = 1 << shift
    size = count * rs - min(short_sectors * 512, rs - 512)
    bshift = BlockGeometry(size, shift).shift
    per = 1 << (shift - bshift)

    def whole(r: int) -> set[int]:
        return set(range(r * per, (r + 1) * per))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "marks.map"
        path.write_bytes(bytes(count))
        vol = types.SimpleNamespace(marks_path=path, regions=count)
        t = RegionTracker(path, count, rs)
        t.release(t.take().marks)  # start with exact masks
        written: dict[int, set[int]] = {}  # region -> blocks written since the last take
        open_take: np.ndarray | None = None
        conveyed: set[int] = set()
        try:
            for kind, a, b in steps:
                if kind in ("write", "owner"):
                    offset = (a % (size // 512)) * 512
                    length = min(size - offset, (b % (3 * rs // 512) + 1) * 512)
                    if kind == "write":
                        t.mark(offset, length)
                    else:
                        with t.lock:
                            durable = t.try_mark(offset, length)
                        if not durable:
                            t.mark(offset, length)
                    for blk in touched_blocks(offset, length, bshift):
                        written.setdefault(blk // per, set()).add(blk)
                elif kind == "map":
                    m = np.zeros(count, np.uint8)
                    m[a % count] = 1
                    t.mark_map(m)
                    written.setdefault(a % count, set()).update(whole(a % count))
                elif kind == "forget":
                    t.forget_blocks()
                elif kind == "ack":
                    if open_take is None:
                        continue
                    todo = sorted(r for r in np.flatnonzero(open_take).tolist()
                                  if r not in conveyed and (a >> r) & 1)
                    if todo:  # one frame's runs, apart
                        runs: list[tuple[int, int]] = []
                        for r in todo:
                            if runs and runs[-1][1] == r:
                                runs[-1] = (runs[-1][0], r + 1)
                            else:
                                runs.append((r, r + 1))
                        t.release_runs(runs, keep_hot=True)
                        conveyed.update(todo)
                else:  # a take, then: "release", "give_back" or left "open"
                    if open_take is not None:  # the open cycle commits first
                        t.release(open_take, keep_hot=True)
                        open_take, conveyed = None, set()
                    taken = t.take()
                    for r, blks in written.items():
                        assert taken.marks[r] == 1, f"region {r} written, not taken"
                        mask = int(taken.blocks[r]) or t.block_geometry.full
                        have = {r * per + i for i in range(per) if mask >> i & 1}
                        assert blks <= have, f"region {r}: blocks {blks - have} not handed over"
                    written = {}
                    if kind == "give_back":
                        t.give_back(taken.marks, keep_hot=True)
                        for r in np.flatnonzero(taken.marks).tolist():
                            written[r] = whole(r)
                    elif kind == "open":
                        open_take = taken.marks
                    else:
                        t.release(taken.marks, keep_hot=True)
                check_consistent(vol, t)
            must = set(written) | set(np.flatnonzero(t.marks).tolist())
            if open_take is not None:
                must |= set(np.flatnonzero(open_take).tolist()) - conveyed
        finally:
            os.close(t._fd)  # SIGKILL
            t._fd = -1
        again = RegionTracker(path, count, rs)
        try:
            found = set(np.flatnonzero(again.marks).tolist())
            assert must <= found, f"regions {must - found} lost their marks"
        finally:
            again.close()


# -- zero-length writes -------------------------------------------------------------------

def test_an_empty_write_at_the_end_of_the_volume_neither_fails_nor_wedges_the_gate(engine):
    try:
        engine.pwrite(b"", engine.size)  # NBD allows it; nothing to write
    finally:
        with engine._lock:
            inflight = engine._inflight
    assert inflight == 0, "the write stayed counted in flight: every quiesce times out"


def test_an_empty_write_does_not_widen_what_the_next_cycle_conveys(engine):
    t = engine.tracker
    t.release(t.take().marks)
    engine.pwrite(b"x" * 512, 5 * RS)  # one block of region 5
    engine.pwrite(b"", 0)
    taken = t.take()
    try:
        assert hex(int(taken.blocks[5])) == "0x1", "region 5 would travel whole"
    finally:
        t.release(taken.marks)
    engine.pwrite(b"", 7 * RS + K4)  # inside a region, on a block boundary
    taken = t.take()
    try:
        assert not taken.marks.any(), "an empty write marked a region (it travels whole)"
    finally:
        t.release(taken.marks)


# -- cycles of odd geometries: what travels, and the image it makes ---------------------

@pytest.mark.parametrize(("region_size", "size"), [
    (4 << 10, (4 << 10) * 300 - 512),  # one block a region, the last region 3.5K
    (8 << 10, (8 << 10) * 160 - 4608),  # two blocks, the last region 3.5K: one block
    (1 << 20, (1 << 20) * 5 - 69632),  # 64K blocks, the last region short by 68K
])
def test_unaligned_writes_convey_their_blocks_and_the_image_is_the_take(tmp_path, region_size,
                                                                        size):
    vol = Volume.create(tmp_path / "v", size, region_size)
    engine = Engine(vol)
    rng = random.Random(region_size)
    engine.pwrite(rng.randbytes(size), 0)
    bshift = BlockGeometry(size, vol.geometry.shift).shift
    try:
        mirror, sec = start_pair(engine)
        try:
            later: set[int] = set()  # blocks written while a cycle conveyed
            for _ in range(3):
                blocks, later = later, set()
                writes = [(size - 512, 512), (0, 512), (region_size - 512, 1024),
                          ((1 << bshift) - 512, 1024)]
                writes += [(rng.randrange(size // 512) * 512, rng.choice((512, 1536, 9216)))
                           for _ in range(25)]
                for offset, length in writes:
                    length = min(length, size - offset)
                    engine.pwrite(rng.randbytes(length), offset)
                    blocks |= touched_blocks(offset, length, bshift)
                at_take = live(engine)
                sec.hold = True
                want = mirror.run_now()
                wait_until(lambda: sec.held, 10, "the cycle's frames")
                # writes while it conveys: copied first, never seen in this cycle
                for _ in range(10):
                    offset = rng.randrange(size // 512) * 512
                    length = min(2048, size - offset)
                    engine.pwrite(rng.randbytes(length), offset)
                    later |= touched_blocks(offset, length, bshift)
                sec.hold = False
                sec.release(len(sec.held))
                committed_at(mirror, want)
                assert sec.commits[want] == at_take
                assert mirror.last_cycle["bytes"] == block_bytes(blocks, bshift, size)
            nxt = mirror.run_now()
            committed_at(mirror, nxt)
            assert sec.commits[nxt] == live(engine)
        finally:
            mirror.close()
    finally:
        engine.close()


def test_writes_racing_the_conveyor_read_and_its_ack_land_in_the_next_cycle(engine):
    """Writes to blocks of a frozen region: one after its frame was read, before its ack
    (the same block and another block); one straddling into the next region."""
    engine.pwrite(random.Random(7).randbytes(SIZE), 0)
    mirror, sec = start_pair(engine)
    try:
        engine.pwrite(b"\x10" * 512, 9 * RS + 3 * K4 + 512)
        engine.pwrite(b"\x11" * 1024, 12 * RS - 512)  # regions 11 and 12, one block each
        at_take = live(engine)
        sec.hold = True
        want = mirror.run_now()
        wait_until(lambda: sec.held, 10, "the frame")
        engine.pwrite(b"\x20" * 512, 9 * RS + 3 * K4)  # the same block, another sector
        engine.pwrite(b"\x21" * K4, 9 * RS + 15 * K4)  # another block of the region
        engine.pwrite(b"\x22" * 8192, 12 * RS - K4)  # across 11 and 12 again
        sec.hold = False
        sec.release(len(sec.held))
        committed_at(mirror, want)
        assert sec.commits[want] == at_take
        nxt = mirror.run_now()
        committed_at(mirror, nxt)
        assert sec.commits[nxt] == live(engine)
        assert mirror.last_cycle["bytes"] == 4 * K4  # 9's blocks 3 and 15, 11's 15, 12's 0
    finally:
        mirror.close()


def test_a_write_straddling_the_initial_syncs_position_travels_whole_in_cycle_1(
        engine, monkeypatch):
    """During the initial sync a write across two regions lands: the first is in a frame
    the pass built and has not read yet (read with the write, still marked), the second
    not reached yet (skipped). Cycle 1 must carry both, the skipped one whole (the pass
    never sent it)."""
    from volume_core.live_pass import LivePass

    engine.pwrite(random.Random(8).randbytes(SIZE), 0)
    real, done = LivePass.read_range, []

    def read_range(self, offset, view):
        real(self, offset, view)
        if offset == 48 * RS and not done:  # the frame of regions [48, 64) was read
            done.append(offset)
            # 79: in the next frame (built, not read yet); 80: not reached (skipped)
            engine.pwrite(b"\x5a" * K4, 80 * RS - 512)

    monkeypatch.setattr(LivePass, "read_range", read_range)
    with mirrored(engine) as mirror:
        sec = Sec(mirror, S1, SIZE)
        mirror.connected(sec)
        committed_at(mirror, 1)
        assert done and mirror.initial_sync["skipped_regions"] == 1
        assert sec.commits[1] == live(engine)


def test_a_new_secondary_mid_cycle_gets_everything_though_the_take_held_blocks(engine):
    engine.pwrite(random.Random(9).randbytes(SIZE), 0)
    mirror, old = start_pair(engine)
    try:
        for r in (3, 30, 70, 100):
            engine.pwrite(b"\x77" * 512, r * RS + 5 * K4)
        old.hold = True
        want = mirror.run_now()
        wait_until(lambda: old.held, 10, "the cycle's frame")
        old.closed = "replaced"
        mirror.disconnected("the old secondary went")
        engine.pwrite(b"\x78" * 512, 31 * RS)  # after the take, before the new one
        new = Sec(mirror, S2, SIZE)  # holds nothing
        mirror.connected(new)
        committed_at(mirror, want)
        done = min(n for n in new.commits if n >= want)
        assert new.commits[done] == live(engine)
    finally:
        mirror.close()


# -- SIGKILL mid-cycle ----------------------------------------------------------------------

def _open_cycle_with_frames(engine: Engine, mirror: AsyncMirror, sec: Sec) -> tuple[bytes, int]:
    """Writes in part and whole, taken by a cycle whose frames are held; returns the
    volume at the take and the cycle's number."""
    for r in (2, 60, 100):
        engine.pwrite(b"\x31" * 512, r * RS + 7 * K4 + 512)
    engine.pwrite(random.Random(10).randbytes(36 * RS), 10 * RS)  # 10..45, whole
    at_take = live(engine)
    sec.hold = True
    want = mirror.run_now()
    wait_until(lambda: len(sec.held) >= 3, 10, "the cycle's frames")
    return at_take, want


def test_a_sigkill_mid_cycle_resumes_its_blocks_and_sends_nothing_conveyed_again(
        tmp_path, hot):
    """The masks were recorded (``blocks.map``): the resumed cycle sends the written
    blocks; a write after the take that missed them (no copy, region touched) stays
    marked for the next cycle, and is not in the resumed cycle's image."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    engine = Engine(vol)
    engine.pwrite(random.Random(11).randbytes(SIZE), 0)
    mirror, sec = start_pair(engine)
    at_take, want = _open_cycle_with_frames(engine, mirror, sec)
    conveyed = regions_of(sec.held[0][1])
    sec.release(1)  # the first frame is acknowledged: FREE, its intents kept
    assert (mirror._freeze.preserved[sorted(conveyed)] == FREE).all()
    engine.pwrite(b"\x41" * 512, min(conveyed) * RS)  # conveyed: no copy, marked again
    engine.pwrite(b"\x42" * 512, 100 * RS + 9 * K4)  # not conveyed, misses block 7: no copy
    engine.pwrite(b"\x43" * 512, 120 * RS)  # not in the cycle
    assert mirror._freeze.preserved[100] == KEEP and mirror._freeze.touched[100] == 1
    crash(engine, mirror)

    engine = Engine(Volume.open(vol.path))
    try:
        mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
        try:
            freeze = mirror._freeze
            assert freeze is not None and freeze.blocks is not None
            assert freeze.touched[100] == 1 and mirror._taken[100] == 0
            assert (freeze.preserved[sorted(conveyed)] == FREE).all()
            remaining = set(np.flatnonzero(freeze.remaining()).tolist())
            assert not remaining & conveyed
            sec2 = Sec(mirror, S1, SIZE, image=sec.image)  # what it held: the first frame
            mirror.connected(sec2)
            committed_at(mirror, want)
            assert sec2.commits[want] == at_take
            got = regions_of([piece for _, pieces in sec2.received for piece in pieces])
            assert got == remaining, "a resumed cycle sends its remaining regions, no other"
            assert sec2.bytes_received() == sum(
                K4 if r in (2, 60, 100) else RS for r in remaining), "the written blocks"
            before = len(sec2.received)
            nxt = mirror.run_now()
            committed_at(mirror, nxt)
            assert sec2.commits[nxt] == live(engine)
            later = regions_of([piece for _, pieces in sec2.received[before:]
                                for piece in pieces])
            assert later == {min(conveyed), 100, 120}, "only what was written since"
            assert sec2.bytes_received(before) == 3 * RS  # marks from disk: whole
        finally:
            mirror.close()
    finally:
        engine.close()


# -- copy on write racing a frame's acknowledgement ----------------------------------------

def test_a_copy_recorded_while_a_neighbours_frame_is_acknowledged_survives_a_sigkill(
        tmp_path, monkeypatch):
    """Region 5 is a hole (a ZERO frame, still held), 4 and 6 hold data (one WRITEV). A
    host write to 5 copies it; between the copy's COPIED byte reaching the state map and
    memory saying so, the WRITEV's ack writes the map's stretch [4, 7): 5's byte must stay
    COPIED, or after a SIGKILL the resumed cycle reads 5 from the live volume (the later
    write) as if frozen."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    engine = Engine(vol)
    engine.pwrite(random.Random(12).randbytes(SIZE), 0)
    mirror, sec = start_pair(engine)
    engine.trim(RS, 5 * RS)  # 5: a hole, marked whole
    engine.pwrite(b"\x61" * 512, 4 * RS + 512)
    engine.pwrite(b"\x62" * 512, 6 * RS + 9 * K4)
    at_take = live(engine)
    sec.hold = True
    want = mirror.run_now()
    wait_until(lambda: len(sec.held) == 2, 10, "the ZERO frame and the WRITEV")
    assert [type(f) for f, _ in sec.held] == [p.Zero, p.WriteV]
    freeze = mirror._freeze
    real, seen = CycleFreeze.record_preserved, []

    def record_preserved(self, batch):
        real(self, batch)  # COPIED on the map; memory says so once this returns
        if not seen:
            seen.append(self.copying[5])
            sec.ack(1)  # the WRITEV of 4 and 6, acknowledged now

    monkeypatch.setattr(CycleFreeze, "record_preserved", record_preserved)
    engine.pwrite(b"\x63" * RS, 5 * RS)  # copies 5 (zeros) first
    assert seen == [1]
    on_disk = np.fromfile(freeze.path / "state.map", dtype=np.uint8)
    assert list(on_disk[4:7]) == [FREE, COPIED, FREE]
    crash(engine, mirror)

    engine, mirror = restarted(vol)
    try:
        try:
            assert list(mirror._freeze.preserved[4:7]) == [FREE, COPIED, FREE]
            resume_and_check(engine, mirror, sec.image, want, at_take)
        finally:
            mirror.close()
    finally:
        engine.close()


# -- failed map writes at an acknowledgement -----------------------------------------------

def _fail_pwrites_to(monkeypatch, fd: int) -> list[int]:
    """Every pwrite to ``fd`` raises EIO while the returned list's first item is True."""
    real, armed = os.pwrite, [False]

    def flaky(f, buf, off):
        if armed[0] and f == fd:
            raise OSError(errno.EIO, "test: pwrite failed")
        return real(f, buf, off)

    monkeypatch.setattr(os, "pwrite", flaky)
    return armed


def test_a_failed_marks_map_write_at_an_ack_loses_no_mark_across_a_sigkill(
        tmp_path, monkeypatch, hot):
    """release_runs cannot write the marks map (EIO) at a frame's ack: the link goes (the
    handler failed), nothing is lost; the map agrees with memory where it must; after a
    SIGKILL the resumed cycle and the next make the images of their takes."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    engine = Engine(vol)
    engine.pwrite(random.Random(13).randbytes(SIZE), 0)
    mirror, sec = start_pair(engine)
    at_take, want = _open_cycle_with_frames(engine, mirror, sec)
    conveyed = regions_of(sec.held[0][1])
    armed = _fail_pwrites_to(monkeypatch, engine.tracker._fd)
    armed[0] = True
    with pytest.raises(OSError):
        sec.release(1)
    armed[0] = False
    sec.closed = "the frame handler failed"
    mirror.disconnected("the frame handler failed", sec)
    t = engine.tracker
    d = np.fromfile(vol.marks_path, dtype=np.uint8)
    assert (d[sorted(conveyed)] == 1).all(), "not written: the intents are still there"
    assert not (t._persisted[sorted(conveyed)] == regions_mod._KEPT).any()
    engine.pwrite(b"\x51" * 512, min(conveyed) * RS + 512)  # conveyed: marked again
    assert t.marks[min(conveyed)] == 1
    crash(engine, mirror)

    engine, mirror = restarted(vol)
    try:
        try:
            assert engine.tracker.marks[min(conveyed)] == 1
            resume_and_check(engine, mirror, sec.image, want, at_take)
        finally:
            mirror.close()
    finally:
        engine.close()


def test_a_failed_state_map_write_at_an_ack_cannot_put_a_later_write_in_the_cycle(
        tmp_path, monkeypatch):
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    engine = Engine(vol)
    engine.pwrite(random.Random(14).randbytes(SIZE), 0)
    mirror, sec = start_pair(engine)
    at_take, want = _open_cycle_with_frames(engine, mirror, sec)
    conveyed = regions_of(sec.held[0][1])
    armed = _fail_pwrites_to(monkeypatch, mirror._freeze.map_fd)
    armed[0] = True
    with pytest.raises(OSError):
        sec.release(1)  # the first frame's ack: its state bytes cannot be written
    armed[0] = False
    sec.closed = "the frame handler failed"
    mirror.disconnected("the frame handler failed", sec)
    r = min(conveyed)
    engine.pwrite(b"\x52" * RS, r * RS)  # after the take: must not reach cycle `want`
    crash(engine, mirror)

    engine = Engine(Volume.open(vol.path))
    try:
        mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
        try:
            sec2 = Sec(mirror, S1, SIZE, image=sec.image)
            mirror.connected(sec2)
            committed_at(mirror, want)
            got = sec2.commits[want]
            assert got[r * RS:(r + 1) * RS] == at_take[r * RS:(r + 1) * RS], (
                f"cycle {want}'s image holds region {r} as written after its take")
            assert got == at_take
        finally:
            mirror.close()
    finally:
        engine.close()


# -- the rate cap ------------------------------------------------------------------------------

class Clock:
    """A clock that stands still (a Pacer's), counting how often it is read."""

    def __init__(self) -> None:
        self.now, self.reads = 100.0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_a_frame_cut_off_while_paused_is_not_charged_twice(engine):
    """At 1 MiB/s (the clock standing still) the third 1 MiB frame of the initial sync waits
    for the rate; the link goes meanwhile. On the next channel that frame is charged
    again: the bucket owes a frame that was never sent."""
    engine.pwrite(random.Random(15).randbytes(SIZE), 0)
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0, max_rate=MiB)
    clock = Clock()
    mirror._pacer = Pacer(MiB, burst=2 * CYCLE_CHUNK, clock=clock)
    try:
        old = Sec(mirror, S1, SIZE)
        mirror.connected(old)
        wait_until(lambda: clock.reads >= 4, 10, "the third frame's charge")  # (1: init)
        assert old.payload == 2 * MiB  # the burst went, the third waits
        old.closed = "cut"
        mirror.disconnected("cut", old)
        new = Sec(mirror, S1, SIZE, image=old.image)
        mirror.connected(new)
        wait_until(lambda: clock.reads >= 5, 10, "the frame charged on the new channel")
        sent = old.payload + new.payload
        owed = 2 * CYCLE_CHUNK - mirror._pacer._tokens
        assert owed <= sent + CYCLE_CHUNK, (
            f"{owed / MiB:g} MiB charged for {sent / MiB:g} MiB sent and one 1 MiB frame "
            "waiting")
    finally:
        mirror.close()


def test_a_link_lost_while_paused_resumes_paced_on_the_next_channel(engine):
    """The pause ends at once with the link; the next channel finishes the initial sync and
    cycle 1 with the image of the volume, still paced."""
    engine.pwrite(random.Random(16).randbytes(SIZE), 0)
    rate = 64 * MiB
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0, max_rate=rate)
    try:
        old = Sec(mirror, S1, SIZE)
        old.block_bulk = threading.Event()  # the third frame's send waits, then fails
        mirror.connected(old)
        assert old.in_bulk.wait(10)
        old.closed = "cut"
        mirror.disconnected("cut", old)
        old.block_bulk.set()
        new = Sec(mirror, S1, SIZE)
        t0 = time.monotonic()
        mirror.connected(new)
        committed_at(mirror, 1)
        assert new.commits[1] == live(engine)
        # the whole volume again (nothing was acknowledged), less the burst, at the rate
        assert time.monotonic() - t0 >= (SIZE - 2 * CYCLE_CHUNK) / rate * 0.9
        assert mirror.status()["max_rate_bps"] == rate
    finally:
        mirror.close()


@pytest.mark.parametrize("rate", [1, MiB + 1, (1 << 62) + 3])
def test_odd_rates_pace_or_stop_promptly(engine, rate):
    """A byte a second (not through the CLI: the mirror takes what it is given), a rate
    that divides nothing, a huge one: close() while paused returns at once, a huge rate
    never waits."""
    engine.pwrite(random.Random(17).randbytes(SIZE), 0)
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0, max_rate=rate)
    sec = Sec(mirror, S1, SIZE)
    mirror.connected(sec)
    if rate > SIZE:
        committed_at(mirror, 1)
        assert sec.commits[1] == live(engine)
    else:
        wait_until(lambda: sec.payload >= 2 * MiB, 10, "the burst")
    t0 = time.monotonic()
    mirror.close()
    assert time.monotonic() - t0 < 2


def test_a_rate_too_large_for_a_float_is_refused_in_one_line():
    text = "1" + "0" * 400 + ".5M"
    with pytest.raises(UsageError):
        parse_rate(text)


def test_serve_refuses_a_huge_decimal_max_rate_as_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "v"), "--replicate-to",
                                      "127.0.0.1:9", "--mode", "async", "--max-rate",
                                      "9" * 400 + ".5M"])
    assert "internal error" not in result.output, result.output
    assert result.exit_code == 2 and "invalid rate" in result.output


@pytest.mark.parametrize(("text", "ok"), [("1M", True), ("1048576", True), ("1023K", False),
                                          ("0.5G", True), ("1.0000001M", False), ("-1M", False),
                                          ("1M/s", False), ("", False), ("nan", False)])
def test_max_rate_values(text, ok):
    if ok:
        assert parse_rate(text) >= MiB
    else:
        with pytest.raises(UsageError):
            parse_rate(text)


# -- what status says while conveying ---------------------------------------------------------

def test_a_cycles_progress_never_passes_its_total(engine):
    """A region written in part that is a hole at the take travels as a ZERO frame of the
    whole region: the cycle's bytes to convey must count what actually travels."""
    engine.pwrite(random.Random(18).randbytes(SIZE), 0)
    mirror, sec = start_pair(engine)
    try:
        engine.trim(4 * RS, 20 * RS)  # 20..23: holes (marked whole: 4 regions)
        committed_at(mirror, mirror.run_now())
        engine.zero(K4, 21 * RS + K4)  # one block of a hole: a hole still
        engine.pwrite(b"\x71" * 512, 40 * RS)
        sec.hold = True
        want = mirror.run_now()
        wait_until(lambda: sec.held, 10, "the frames")
        progress = dict(mirror.status()["cycle"])
        sec.hold = False
        sec.release(len(sec.held))
        committed_at(mirror, want)
        assert sec.commits[want] == live(engine)
        assert mirror.last_cycle["bytes"] <= progress["bytes"], (
            f"{mirror.last_cycle['bytes']} bytes conveyed of {progress['bytes']} to convey")
    finally:
        mirror.close()


# -- a take given back, and random interleavings ------------------------------------------------

def test_a_take_that_fails_to_freeze_gives_its_blocks_back_whole(engine, monkeypatch):
    """CycleFreeze.create fails after the take (ENOSPC): the take goes back (marked again)
    and a later write to another block of the same region must not narrow what the next
    cycle carries to that block alone."""
    engine.pwrite(random.Random(19).randbytes(SIZE), 0)
    mirror, sec = start_pair(engine)
    try:
        real, failed = CycleFreeze.create.__func__, []

        def create(cls, *args, **kw):
            if not failed:
                failed.append(1)
                raise OSError(errno.ENOSPC, "test: no space for the cycle")
            return real(cls, *args, **kw)

        monkeypatch.setattr(CycleFreeze, "create", classmethod(create))
        engine.pwrite(b"\x81" * 512, 8 * RS + K4)  # block 1 of region 8
        want = mirror.run_now()
        wait_until(lambda: failed and sec.closed is not None, 10, "the failed take")
        engine.pwrite(b"\x82" * 512, 8 * RS + 9 * K4)  # block 9: after the take went back
        sec2 = Sec(mirror, S1, SIZE, image=sec.image)
        mirror.connected(sec2)
        committed_at(mirror, want)
        assert sec2.commits[want] == live(engine)
    finally:
        mirror.close()


@pytest.mark.parametrize("seed", range(3))
def test_random_writes_out_of_order_acks_and_a_sigkill_keep_every_image_the_take(tmp_path,
                                                                                seed):
    """Region size 8K (two blocks), a short last region; writes, trims and zeroes of odd
    sizes at 512-byte offsets; frames acknowledged out of order with host writes between
    the acks; every commit is the volume at its take. Then a SIGKILL with a cycle open
    (acknowledged in part, or all acknowledged and not committed) and a restart: the
    resumed cycle and the next still make the images of their takes."""
    rs, size = 8 << 10, (8 << 10) * 200 - 3584
    vol = Volume.create(tmp_path / "v", size, rs)
    engine = Engine(vol)
    rng = random.Random(seed)
    engine.pwrite(rng.randbytes(size), 0)

    def scribble(n: int) -> None:
        for _ in range(n):
            offset = rng.randrange(size // 512) * 512
            length = min(size - offset, rng.choice((512, 1024, 4096, 7680, 20480)))
            what = rng.random()
            if what < 0.15:
                engine.trim(length, offset)
            elif what < 0.25:
                engine.zero(length, offset, may_trim=rng.random() < 0.5)
            else:
                engine.pwrite(rng.randbytes(length), offset)

    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
    sec = Sec(mirror, S1, size)
    mirror.connected(sec)
    committed_at(mirror, 1)
    try:
        for _ in range(3):
            scribble(40)
            at_take = live(engine)
            sec.hold = True
            want = mirror.run_now()
            wait_until(lambda: sec.held, 10, "the cycle's frames")
            while sec.held:
                scribble(2)
                sec.ack(rng.randrange(len(sec.held)))
            sec.hold = False
            committed_at(mirror, want)
            assert sec.commits[want] == at_take
        scribble(60)
        at_take = live(engine)
        sec.hold = sec.hold_commit = True
        want = mirror.run_now()
        wait_until(lambda: sec.held, 10, "the cycle's frames")
        every = seed == 2
        if every:  # all its frames acknowledged (they may come one by one): it commits
            while mirror.progress["state"] != "committing":
                wait_until(lambda: sec.held or mirror.progress["state"] == "committing", 10,
                           "the cycle's frames")
                if sec.held:
                    sec.ack(rng.randrange(len(sec.held)))
                    scribble(2)
        else:
            for _ in range(len(sec.held) // 2):
                sec.ack(rng.randrange(len(sec.held)))
                scribble(2)
        scribble(5)
    finally:
        crash(engine, mirror)
    engine = Engine(Volume.open(vol.path))
    try:
        mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
        try:
            assert mirror._freeze is not None and mirror._freeze.number == want
            if every:
                assert not mirror._freeze.remaining().any()
            sec2 = Sec(mirror, S1, size, image=sec.image)
            mirror.connected(sec2)
            committed_at(mirror, want)
            assert sec2.commits[want] == at_take
            if every:
                assert sec2.bytes_received() == 0, "every region was acknowledged"
            scribble(10)
            nxt = mirror.run_now()
            committed_at(mirror, nxt)
            assert sec2.commits[nxt] == live(engine)
        finally:
            mirror.close()
    finally:
        engine.close()


def test_a_writer_hammering_frozen_regions_while_frames_are_acknowledged_then_a_sigkill(
        tmp_path, hot):
    """One block written in each of 100 regions, taken; a host thread writes 512 bytes at
    random over them (copies on write racing the acks' page-sized map writes, kept
    regions turned back to 1 by try_mark) while the frames are acknowledged one by one;
    a SIGKILL with half of them acknowledged. The resumed cycle is the take, the next
    is the volume."""
    vol = Volume.create(tmp_path / "v", SIZE, 4 << 10)  # 4K regions: one block each
    engine = Engine(vol)
    rng = random.Random(20)
    engine.pwrite(rng.randbytes(SIZE), 0)
    mirror, sec = start_pair(engine)
    regions = vol.regions
    for r in rng.sample(range(regions), 1500):
        engine.pwrite(rng.randbytes(512), r * K4 + 512 * rng.randrange(8))
    at_take = live(engine)
    sec.hold = sec.hold_commit = True
    want = mirror.run_now()
    wait_until(lambda: len(sec.held) >= 4, 10, "the cycle's frames")
    stop, errors = threading.Event(), []

    def writer():
        w = random.Random(21)
        try:
            while not stop.is_set():
                engine.pwrite(w.randbytes(512), w.randrange(SIZE // 512) * 512)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(len(sec.held) // 2):
            sec.ack(0)
    finally:
        stop.set()
        thread.join(10)
    assert not errors
    crash(engine, mirror)
    engine, mirror = restarted(vol)
    try:
        try:
            resume_and_check(engine, mirror, sec.image, want, at_take)
        finally:
            mirror.close()
    finally:
        engine.close()


def test_an_initial_sync_cut_by_a_sigkill_sends_only_what_it_had_not_conveyed(tmp_path, hot):
    """The pass's frames are released at their acks (release_runs, kept: hot): after a
    SIGKILL the new pass carries exactly the regions not acknowledged, whole, and cycle 1
    is the volume."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    engine = Engine(vol)
    engine.pwrite(random.Random(22).randbytes(SIZE), 0)
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
    sec = Sec(mirror, S1, SIZE, hold=True)
    mirror.connected(sec)
    wait_until(lambda: len(sec.held) == SIZE // CYCLE_CHUNK, 10, "the pass's frames")
    acked = set()
    for i in (5, 2, 0):
        acked |= regions_of(sec.held[i][1])
        sec.ack(i)
    engine.pwrite(b"\x91" * 512, min(acked) * RS + K4)  # conveyed, then written: again
    crash(engine, mirror)
    engine = Engine(Volume.open(vol.path))
    try:
        mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
        try:
            sec2 = Sec(mirror, S1, SIZE, image=sec.image)
            mirror.connected(sec2)
            committed_at(mirror, 1)
            assert sec2.commits[1] == live(engine)
            got = regions_of([x for _, pieces in sec2.received for x in pieces])
            want = (set(range(vol.regions)) - acked) | {min(acked)}
            assert got == want
            assert sec2.bytes_received() == len(want) * RS
        finally:
            mirror.close()
    finally:
        engine.close()
