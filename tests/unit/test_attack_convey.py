"""Adversarial tests of the conveyor's fast path (session 11, second round):
``AsyncMirror._convey`` handing the runs of a cycle inside one stretch of the live file's
data to ``_send_runs``
(``geometry.cut_runs`` / ``join_runs``, ``BlockGeometry.weigh_runs``, the greedy frame
limits by ``searchsorted``), the pending batch across the fast path and the run-by-run
loop, holes and data appearing while a cycle conveys (the SEEK_HOLE cache going stale),
refused chunks, resumed cycles (no block masks), ``RegionTracker.prepare_take``, and the
log reader change (a failed start does not wait for the reader of the server that holds
the volume: ``server_log.wait_for_readers(..., serving)``). It found no bug.

Every frame a cycle sends is checked as it arrives (``Checker``): at most ``CYCLE_CHUNK``
bytes of data (unless it is one region, which cannot be split) and ``p.MAX_EXTENTS``
extents, none empty, no region in two frames of one pass (a region's blocks never
straddle two frames, nothing sent twice), and every committed image is the primary's
volume at the take.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import wait_until
from tests.unit.test_attack_async import S1, chunk_pieces
from tests.unit.test_attack_session11 import Sec, crash, live
from volume_core import server_log
from volume_core.blocks import POPCOUNT, RUNS, BlockGeometry
from volume_core.engine import Engine
from volume_core.geometry import cut_runs, join_runs
from volume_core.regions import RegionTracker
from volume_core.replication import protocol as p
from volume_core.replication.mirror import CYCLE_CHUNK, AsyncMirror
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

K4 = 4096
MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------------

class Checker(Sec):
    """A Sec that checks every data frame as it arrives (see the module docstring).

    ``refuse``: regions whose first frame is answered WRITE_FAILED (once each).
    ``gate_at``: the data frame (counted from 0 since ``arm()``) at which ``send_bulk``
    stops until ``gate`` is set (``at_gate`` says it got there)."""

    def __init__(self, mirror: AsyncMirror, size: int, region_size: int, **kw) -> None:
        super().__init__(mirror, S1, size, **kw)
        self.rs = region_size
        self.problems: list[str] = []
        self.cycle = 0
        self.seen: dict[int, int] = {}  # region -> frames it was in, this cycle
        self.frames: dict[int, list[list[int]]] = {}  # cycle -> each data frame's regions
        self.refuse: set[int] = set()
        self.refused: set[int] = set()
        self.gate = threading.Event()
        self.at_gate = threading.Event()
        self.gate_at: int | None = None
        self.count = 0

    def arm(self, at: int) -> None:
        self.count, self.gate_at = 0, at
        self.gate.clear()
        self.at_gate.clear()

    def send_urgent(self, frame):
        if isinstance(frame, p.CycleBegin):
            with self.lock:
                self.cycle, self.seen = frame.seq, {}
                self.frames.setdefault(frame.seq, [])
        super().send_urgent(frame)

    def _check(self, frame) -> list[int]:
        pieces = chunk_pieces(frame)
        if isinstance(frame, p.WriteV):
            n = len(frame.extents)
            if not 1 <= n <= p.MAX_EXTENTS:
                self.problems.append(f"a WRITEV of {n} extents")
        if isinstance(frame, (p.Write, p.WriteV)) and not len(frame.data):
            self.problems.append("an empty data frame")
        if any(len(d) == 0 for _, d in pieces):
            self.problems.append("an empty extent")
        regions = sorted({r for o, d in pieces for r in range(o // self.rs,
                                                               (o + len(d) - 1) // self.rs + 1)})
        payload = len(frame.data) if isinstance(frame, (p.Write, p.WriteV)) else 0
        if payload > CYCLE_CHUNK and len(regions) > 1:
            self.problems.append(f"a frame of {payload} bytes over {len(regions)} regions")
        return regions

    def send_bulk(self, frame, timeout=None, lent=False, window=None, handoff=False):
        if isinstance(frame, (p.Write, p.WriteV, p.Zero)) and self.closed is None:
            with self.lock:
                regions = self._check(frame)
                if isinstance(frame, (p.Write, p.WriteV)):
                    self.frames.setdefault(self.cycle, []).append(regions)
                again = [r for r in regions if self.seen.get(r)]
                twice = [r for r in again if r not in self.refused]
                if twice:
                    self.problems.append(f"cycle {self.cycle}: regions {twice[:8]} in two "
                                         "frames")
                self.refused.difference_update(again)
                for r in regions:
                    self.seen[r] = self.seen.get(r, 0) + 1
                refuse = bool(self.refuse & set(regions))
                if refuse:
                    self.refuse -= set(regions)
                    self.refused.update(regions)
                n, self.count = self.count, self.count + 1
            if self.gate_at is not None and n == self.gate_at:
                self.at_gate.set()
                self.gate.wait(10)
            if refuse:
                self.mirror.on_frame(p.WriteFailed(frame.seq, 5, "refused by the test"))
                return
        super().send_bulk(frame, timeout, lent, window, handoff)


def pair(engine: Engine, rs: int, **kw) -> tuple[AsyncMirror, Checker]:
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0, **kw)
    sec = Checker(mirror, engine.size, rs)
    mirror.connected(sec)
    wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
    assert sec.commits[1] == live(engine)
    return mirror, sec


def cycle(mirror: AsyncMirror, sec: Checker) -> int:
    """A cycle of what was written since the last; its image is the take."""
    at_take = live(mirror.engine)
    want = mirror.run_now()
    wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
    assert not sec.problems, sec.problems
    assert sec.commits[want] == at_take, f"cycle {want}'s image is not the take"
    return want


def loop_model(size: int, shift: int, masks: dict[int, int]) -> list[list[int]]:
    """The frames the run-by-run loop makes of regions ``masks`` (region -> written
    blocks) of an allocated volume: runs cut at a chunk, gathered greedily."""
    bg = BlockGeometry(size, shift)
    step = max(1, CYCLE_CHUNK >> shift)
    regions = sorted(masks)
    runs: list[tuple[int, int]] = []
    for r in regions:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    frames, batch, nbytes, extents = [], [], 0, 0
    for first, stop in runs:
        for at in range(first, stop, step):
            end = min(stop, at + step)
            more = sum(int(POPCOUNT[masks[r] or bg.full]) << bg.shift for r in range(at, end))
            parts = sum(int(RUNS[masks[r] or bg.full]) for r in range(at, end))
            if batch and (nbytes + more > CYCLE_CHUNK or extents + parts > p.MAX_EXTENTS):
                frames.append(batch)
                batch, nbytes, extents = [], 0, 0
            batch += list(range(at, end))
            nbytes += more
            extents += parts
    if batch:
        frames.append(batch)
    return frames


# -- geometry and weights, against their one-at-a-time forms -----------------------------

@pytest.mark.parametrize("step", [1, 2, 3, 16, 256])
def test_cut_runs_and_join_runs_cover_every_region_once(step):
    rng = random.Random(step)
    for _ in range(50):
        at, runs = 0, []
        for _ in range(rng.randrange(1, 12)):
            at += rng.randrange(0, 5) + (1 if runs else 0)
            n = rng.randrange(1, 40)
            runs.append((at, n))
            at += n
        rows = cut_runs(np.array(runs), step)
        assert (rows[:, 1] > rows[:, 0]).all() and (rows[:, 1] - rows[:, 0] <= step).all()
        want = [(f, min(f + step, s + n)) for s, n in runs for f in range(s, s + n, step)]
        assert [tuple(r) for r in rows.tolist()] == want
        assert join_runs(rows) == [(s, s + n) for s, n in runs]


@pytest.mark.parametrize("rs", [4 << 10, 8 << 10, 64 << 10, 1 << 20, 16 << 20])
def test_weigh_runs_is_weigh_run_of_each_row(rs):
    shift = rs.bit_length() - 1
    size = rs * 40 - 512
    bg = BlockGeometry(size, shift)
    rng = np.random.default_rng(shift)
    blocks = rng.integers(0, bg.full + 1, 40).astype(np.uint16)
    rows = cut_runs(np.array([[0, 7], [9, 20], [31, 9]]), 3)
    for b in (blocks, None):
        got_bytes, got_parts = bg.weigh_runs(b, rows)
        want = [bg.weigh_run(b, int(f), int(s)) for f, s in rows.tolist()]
        assert got_bytes.tolist() == [w for w, _ in want]
        assert got_parts.tolist() == [e for _, e in want]


# -- whole cycles, all region sizes, allocated and sparse --------------------------------

GEOMETRIES = [
    (4 << 10, (4 << 10) * 700 - 512),
    (8 << 10, (8 << 10) * 400 - 4608),
    (64 << 10, (64 << 10) * 100 - 512),
    (1 << 20, (1 << 20) * 6 - 69632),
    (16 << 20, (16 << 20) * 2 - (1 << 20) - 512),
]


@pytest.mark.parametrize(("rs", "size"), GEOMETRIES)
def test_an_allocated_volume_gathers_frames_as_the_loop_did_and_within_limits(tmp_path, rs,
                                                                               size):
    vol = Volume.create(tmp_path / "v", size, rs)
    engine = Engine(vol)
    rng = random.Random(rs)
    engine.pwrite(rng.randbytes(size), 0)
    shift = vol.geometry.shift
    bg = BlockGeometry(size, shift)
    try:
        mirror, sec = pair(engine, rs)
        try:
            for n in range(3):
                masks: dict[int, int] = {}
                writes = [(size - 512, 512), (0, 512)]
                if n == 1:  # long runs: cut at a chunk, run after run
                    writes += [(0, min(size, 3 * MiB + 5 * K4))]
                writes += [(rng.randrange(size // 512) * 512, rng.choice((512, 4096, 20480)))
                           for _ in range(60)]
                for offset, length in writes:
                    length = min(length, size - offset)
                    engine.pwrite(rng.randbytes(length), offset)
                    for r in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
                        masks[r] = masks.get(r, 0) | bg.mask(offset, length, r)
                want = cycle(mirror, sec)
                assert sec.frames[want] == loop_model(size, shift, masks), (
                    "the fast path's frames are not those the run-by-run loop makes")
                assert mirror.last_cycle["regions"] == len(masks)
        finally:
            mirror.close()
    finally:
        engine.close()


def _sparse(engine: Engine, rs: int, layout: list[tuple[int, int]], seed: int) -> None:
    """Data at the [first, stop) region stretches of ``layout``; the rest a hole."""
    rng = random.Random(seed)
    for first, stop in layout:
        off, n = first * rs, min(stop * rs, engine.size) - first * rs
        engine.pwrite(rng.randbytes(n), off)


@pytest.mark.parametrize(("rs", "size"), GEOMETRIES[:4])
def test_data_hole_data_with_runs_across_the_stretches(tmp_path, rs, size):
    vol = Volume.create(tmp_path / "v", size, rs)
    engine = Engine(vol)
    regions = vol.geometry.regions
    q = regions // 4
    _sparse(engine, rs, [(0, q), (2 * q, regions)], rs)  # data, hole, data to the end
    rng = random.Random(rs + 1)
    try:
        mirror, sec = pair(engine, rs)
        try:
            for _ in range(3):
                # a run over the end of the first stretch into the hole, runs in each
                # stretch, one that spans the hole entirely, the short last region
                off = max(0, q * rs - 512 - rs // 2)
                engine.pwrite(rng.randbytes(rs + 1024), off)
                engine.pwrite(rng.randbytes(512), (q + 1) * rs)  # fills a bit of the hole
                for _ in range(20):
                    off = rng.randrange(size // 512) * 512
                    engine.pwrite(rng.randbytes(min(4096, size - off)), off)
                engine.pwrite(rng.randbytes(512), size - 512)
                at = min(2 * q + 2, regions - 3) * rs
                engine.trim(2 * rs, at)  # a new hole in the second stretch
                engine.pwrite(b"\x5a" * 1024, at + rs)
                cycle(mirror, sec)
            engine.trim(size, 0)  # all of it a hole again: ZERO frames
            cycle(mirror, sec)
        finally:
            mirror.close()
    finally:
        engine.close()


@pytest.mark.parametrize("what", ["trim", "fill", "both"])
def test_holes_and_data_appearing_while_the_fast_path_conveys(tmp_path, what):
    """The stretch's end is cached (SEEK_HOLE) and frames are cut before the first goes:
    trims inside the cached stretch and writes filling the hole after it, while the
    first frame is on its way, must neither change the image nor lose a region."""
    rs, regions = 64 << 10, 160
    size = rs * regions
    vol = Volume.create(tmp_path / "v", size, rs)
    engine = Engine(vol)
    _sparse(engine, rs, [(0, 64), (96, 160)], 7)
    rng = random.Random(8)
    try:
        mirror, sec = pair(engine, rs)
        try:
            engine.pwrite(rng.randbytes(56 * rs), 4 * rs)  # regions 4..59 whole: 4 frames
            engine.pwrite(rng.randbytes(4096), 80 * rs)  # in the hole: data now
            engine.pwrite(rng.randbytes(30 * rs), 100 * rs)
            at_take = live(engine)
            sec.arm(0)
            want = mirror.run_now()
            assert sec.at_gate.wait(10), "the first frame"
            if what in ("trim", "both"):
                engine.trim(20 * rs, 30 * rs)  # regions 30..49: frozen, in the cache
                engine.zero(8 * rs, 104 * rs)
            if what in ("fill", "both"):
                engine.pwrite(rng.randbytes(10 * rs), 62 * rs)  # hole 64.. filled, frozen 62
                engine.pwrite(rng.randbytes(4096), 80 * rs + 8192)
            sec.gate.set()
            wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
            assert not sec.problems, sec.problems
            assert sec.commits[want] == at_take
            cycle(mirror, sec)
        finally:
            sec.gate.set()
            mirror.close()
    finally:
        engine.close()


def test_refused_chunks_are_sent_again_once_in_the_next_pass(tmp_path):
    rs, regions = 64 << 10, 120
    size = rs * regions
    vol = Volume.create(tmp_path / "v", size, rs)
    engine = Engine(vol)
    _sparse(engine, rs, [(0, 40), (60, 120)], 3)
    rng = random.Random(4)
    try:
        mirror, sec = pair(engine, rs)
        try:
            for r in (1, 2, 3, 17, 33, 39, 45, 61, 62, 90, 119):
                engine.pwrite(rng.randbytes(4096), r * rs + 8192)
            engine.pwrite(rng.randbytes(20 * rs), 64 * rs)
            sec.refuse = {2, 39, 45, 70, 119}
            cycle(mirror, sec)
            assert not sec.refuse, "a refused frame"
            assert not sec.refused, "a refused region was not sent again"
        finally:
            mirror.close()
    finally:
        engine.close()


def test_a_resumed_cycle_sends_whole_regions_in_full_frames(tmp_path):
    """blocks None (its masks not recorded: cut off before ``record_blocks``, or an older
    version's): each row weighs its whole regions (the short last one short)."""
    rs, regions = 64 << 10, 100
    size = rs * regions - 512
    vol = Volume.create(tmp_path / "v", size, rs)
    engine = Engine(vol)
    _sparse(engine, rs, [(0, 50), (70, regions)], 5)
    rng = random.Random(6)
    mirror, sec = pair(engine, rs)
    for r in (0, 1, 5, 30, 49, 50, 71, 80, regions - 1):
        engine.pwrite(rng.randbytes(512), min(r * rs + 4096, size - 512))
    engine.pwrite(rng.randbytes(40 * rs), 8 * rs)
    at_take = live(engine)
    sec.hold = True
    want = mirror.run_now()
    wait_until(lambda: len(sec.held) >= 2, 10, "the cycle's frames")
    sec.release(1)
    crash(engine, mirror)
    # no write since the take: as if the masks had never been recorded
    (vol.path / "cycle" / "blocks.map").unlink()
    engine = Engine(Volume.open(vol.path))
    try:
        mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0)
        try:
            assert mirror._freeze is not None and mirror._freeze.blocks is None
            remaining = set(np.flatnonzero(mirror._freeze.remaining()).tolist())
            sec2 = Checker(mirror, size, rs, image=bytes(sec.image))
            mirror.connected(sec2)
            wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
            assert not sec2.problems, sec2.problems
            assert sec2.commits[want] == at_take
            got = {r for f in sec2.frames.get(want, []) for r in f}
            assert got <= remaining
            cycle(mirror, sec2)
        finally:
            mirror.close()
    finally:
        engine.close()


def test_writes_racing_every_frame_of_a_sparse_cycle_keep_its_image_the_take(tmp_path):
    """A writer and a trimmer hammer frozen regions, holes and data, while every frame of
    the cycle waits a moment at the gate."""
    rs, regions = 8 << 10, 600
    size = rs * regions - 4608
    vol = Volume.create(tmp_path / "v", size, rs)
    engine = Engine(vol)
    _sparse(engine, rs, [(0, 150), (200, 380), (450, 520)], 9)
    rng = random.Random(10)
    try:
        mirror, sec = pair(engine, rs)
        try:
            for _ in range(3):
                for _ in range(150):
                    off = rng.randrange(size // 512) * 512
                    engine.pwrite(rng.randbytes(min(rng.choice((512, 4096, 3 * rs)),
                                                    size - off)), off)
                engine.pwrite(rng.randbytes(200 * rs), 100 * rs)
                at_take = live(engine)
                stop = threading.Event()

                def hammer(seed: float, stop: threading.Event) -> None:
                    r = random.Random(seed)
                    while not stop.is_set():
                        off = r.randrange(size // 512) * 512
                        n = min(r.choice((512, 4096, 2 * rs)), size - off)
                        if r.random() < 0.3:
                            engine.trim(n, off)
                        else:
                            engine.pwrite(r.randbytes(n), off)

                t = threading.Thread(target=hammer, args=(rng.random(), stop))
                sec.arm(0)
                want = mirror.run_now()
                assert sec.at_gate.wait(10), "the first frame"
                t.start()  # the take is made: every write from now on is the next cycle's
                try:
                    base = engine.stats.writes + engine.stats.trims
                    wait_until(lambda b=base: engine.stats.writes + engine.stats.trims > b + 40,
                               5, "writes racing the cycle")
                    sec.gate.set()
                    wait_until(lambda w=want: mirror.committed >= w, 10, f"cycle {want}")
                finally:
                    stop.set()
                    sec.gate.set()
                    t.join()
                assert not sec.problems, sec.problems
                assert sec.commits[want] == at_take
            cycle(mirror, sec)
        finally:
            mirror.close()
    finally:
        engine.close()


# -- prepare_take ------------------------------------------------------------------------

def test_a_prepared_take_that_failed_leaves_the_next_takes_masks_exact(tmp_path):
    """prepare_take, then a take refused (one is out): writes meanwhile go to the live
    masks, never into the spare; the next take hands over exactly what was written."""
    rs, regions = 64 << 10, 16
    vol = Volume.create(tmp_path / "v", rs * regions, rs)
    engine = Engine(vol)
    try:
        tracker: RegionTracker = engine.tracker
        bg = tracker.block_geometry
        first = tracker.take()
        tracker.prepare_take()
        engine.pwrite(b"\x01" * 512, 3 * rs + 5 * K4)
        with pytest.raises(Exception, match="taken"):
            tracker.take()
        engine.pwrite(b"\x02" * 512, 7 * rs)
        tracker.release(first.marks)
        taken = tracker.take()
        assert np.flatnonzero(taken.marks).tolist() == [3, 7]
        assert int(taken.blocks[3]) == bg.mask(3 * rs + 5 * K4, 512, 3)
        assert int(taken.blocks[7]) == bg.mask(7 * rs, 512, 7)
        assert not np.delete(taken.blocks, [3, 7]).any()
        engine.pwrite(b"\x03" * 512, 9 * rs + K4)
        assert np.flatnonzero(tracker.blocks).tolist() == [9], "the new take's masks"
        assert int(taken.blocks[9]) == 0, "a write after the take reached the taken masks"
    finally:
        engine.close()


# -- the log reader: a live server's reader is not waited for ----------------------------

FAKE_SERVER = r"""
import os, sys, time
from pathlib import Path
from volume_core import server_log
reader = server_log.capture_stderr(Path(sys.argv[1]), 1 << 20)
print("child", reader.pid, flush=True, file=open(sys.argv[2], "w"))
os.write(2, ("nbdkit: error: " + sys.argv[3] + "\n").encode())
if sys.argv[4] == "die":
    os._exit(1)
time.sleep(30)
"""


def _fake_nbdkit(tmp_path: Path, log: Path, word: str, how: str) -> subprocess.Popen:
    """A process whose argv[0] is ``nbdkit`` that starts a real log reader for ``log``,
    says ``word`` on stderr, then dies (``die``) or serves on (``live``)."""
    script = tmp_path / f"fake_{word}.py"
    script.write_text(FAKE_SERVER)
    note = tmp_path / f"note_{word}"
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.Popen(["bash", "-c", f'exec -a nbdkit "{sys.executable}" "$@"', "x",
                             str(script), str(log), str(note), word, how],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=root)
    wait_until(lambda: note.exists() and note.read_text().strip(), 5, "the reader")
    proc.reader_pid = int(note.read_text().split()[1])  # type: ignore[attr-defined]
    return proc


def test_a_dead_servers_reader_is_waited_for_a_live_ones_is_not(tmp_path):
    from cli.server import _log_reason

    log = (tmp_path / "server.log").absolute()
    winner = _fake_nbdkit(tmp_path, log, "winner", "live")
    try:
        wait_until(lambda: b"winner" in log.read_bytes() if log.exists() else False, 5,
                   "the winner's words")
        start = log.stat().st_size
        loser = _fake_nbdkit(tmp_path, log, "loser-says-why", "die")
        loser.wait(5)
        assert winner.reader_pid in server_log.readers(log)
        reason = _log_reason(log, start, winner.pid)
        assert "loser-says-why" in reason, reason
        assert server_log.wait_for_readers(log, 0.5, winner.pid), (
            "the live server's reader waited for")
        assert not server_log.wait_for_readers(log, 0.2), "any other reader is waited for"
    finally:
        winner.kill()
        winner.wait()
        wait_until(lambda: not server_log.readers(log), 5, "the readers")
