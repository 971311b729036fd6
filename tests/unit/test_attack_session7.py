"""Attack round of session 7's async work: the live initial pass (live_pass.py, the
mirror's _initial_pass), hole skipping, the point in time (taken_at / cycle_at /
CYCLE_COMMIT's offset), on real engines with in-memory secondaries (FakeSecondary of
test_attack_async).

Tests marked xfail(strict=True) show a bug found by this round; the others probe what held.
"""

from __future__ import annotations

import errno
import json
import math
import threading

import numpy as np
import pytest

from tests.conftest import wait_until
from tests.unit.test_attack_async import (
    REGIONS,
    RS,
    S1,
    S2,
    SIZE,
    FakeSecondary,
    Out,
    chunk_pieces,
    mirrored,
    pattern,
    primary_engine,  # noqa: F401 - the ``engine`` fixture
    region,
)
from volume_core import blockio
from volume_core.cycle_freeze import CycleFreeze
from volume_core.engine import Engine
from volume_core.errors import ProtocolError, VolumeCorrupt
from volume_core.live_pass import LivePass
from volume_core.replication import protocol as p
from volume_core.replication.mirror import AsyncMirror
from volume_core.replication.secondary import ASYNC, Receiver
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

CHUNK_REGIONS = (1 << 20) // RS


def random_data(seed: int, n: int = SIZE) -> bytes:
    return bytes(np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8))


def volume_bytes(engine: Engine) -> bytes:
    buf = bytearray(SIZE)
    engine.pread(buf, 0)
    return bytes(buf)


class GatedSecondary(FakeSecondary):
    """A FakeSecondary whose ``gate``-th chunk (1-based) waits in send_bulk, after the
    primary read it and before it is sent, until ``go`` is set; ``at_gate`` is set then."""

    def __init__(self, mirror: AsyncMirror, uuid: str, gate: int) -> None:
        super().__init__(mirror, uuid)
        self.gate = gate
        self.sent = 0
        self.at_gate = threading.Event()
        self.go = threading.Event()
        self.frames: list[p.Frame] = []

    def send_bulk(self, frame, timeout=None, lent=False, window=None, handoff=False):
        if isinstance(frame, (p.Write, p.WriteV, p.Zero)):
            self.sent += 1
            self.frames.append(frame)
            if self.sent == self.gate:
                self.at_gate.set()
                self.go.wait(10)
        super().send_bulk(frame, timeout, lent, window)


# ---------------------------------------------------------------------------------- bugs


def test_a_cycle_commit_with_an_impossible_time_is_refused_and_changes_nothing(secondary):
    rec = Receiver(secondary, ASYNC, Out())
    rec.handle(p.CycleBegin(1))
    before = (secondary.volume.path / "volume.json").read_bytes()
    with pytest.raises(ProtocolError, match="CYCLE_COMMIT"):
        rec.handle(p.CycleCommit(1, (1 << 64) - 1))
    assert (secondary.volume.path / "volume.json").read_bytes() == before
    assert [s.name for s in secondary.snapshots.chain] == [], "an image kept for a refused commit"
    assert not (secondary.volume.snapshot_dir / "cycle-1").exists()


def test_a_cycle_commit_with_time_zero_records_no_point_in_time(secondary):
    out = Out()
    rec = Receiver(secondary, ASYNC, out)
    rec.handle(p.CycleCommit(1, 0))
    assert secondary.volume.info.cycle == 1 and secondary.volume.info.cycle_at is None
    st = rec.status()
    assert st["last_consistent_at"] is None and st["lag_s"] is None
    rec.handle(p.CycleCommit(2, 1_700_000_000_123_456))
    assert secondary.volume.info.cycle_at == pytest.approx(1_700_000_000.123456, abs=1e-6)
    assert [f.seq for f in out.frames if isinstance(f, p.CycleAck)] == [1, 2]


def test_a_failed_take_right_after_the_initial_pass_still_leads_to_cycle_1(engine):
    data = random_data(1)
    engine.pwrite(data, 0)
    mirror = AsyncMirror(engine, interval=0.05, ack_timeout=2.0)
    real_take = mirror._take
    failed: list[int] = []

    def take():
        if not failed:
            failed.append(1)
            raise OSError(errno.ENOSPC, "test: no space for VOL/cycle")
        return real_take()

    mirror._take = take
    try:
        first = FakeSecondary(mirror, S1)
        mirror.connected(first)
        wait_until(lambda: failed and first.closed is not None, 10, "the failed take")
        assert mirror.initial_sync is not None  # the pass was done
        second = FakeSecondary(mirror, S1)  # the session dials the same secondary again
        second.image[:] = first.image  # (its disk: what the pass wrote there)
        mirror.connected(second)
        wait_until(lambda: mirror.committed >= 1 or mirror.status()["state"] == "in-sync",
                   5, "cycle 1 or a claim of in-sync")
        st = mirror.status()
        assert mirror.committed >= 1, (
            f"the secondary holds no consistent image, yet state {st['state']!r}, "
            f"committed {st['committed_cycle']}")
        assert bytes(second.commits[1]) == data
    finally:
        mirror.close()


def test_status_does_not_claim_a_consistent_image_for_a_new_secondary_being_synced(engine):
    engine.pwrite(pattern(3, 4), 0)
    with mirrored(engine) as mirror:
        old = FakeSecondary(mirror, S1)
        mirror.connected(old)
        want = mirror.run_now()  # 1, or 2 once the pass and cycle 1 beat this thread to it
        wait_until(lambda: mirror.committed >= want, 10, "a cycle on the first secondary")
        old.close("replaced")
        mirror.disconnected("replaced")
        new = FakeSecondary(mirror, S2, hold=True)  # nothing acknowledged: stays in the pass
        mirror.connected(new)
        wait_until(lambda: new.chunks >= 1, 10, "the new secondary's initial sync")
        st = mirror.status()
        assert st["state"] == "cycling"
        assert not new.commits
        assert st["last_consistent_at"] is None and st["lag_s"] is None, (
            f"the new secondary holds nothing, status says cycle {st['committed_cycle']} "
            f"as of {st['lag_s']}s ago")


# ---------------------------------------------------------------------------- what held


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 1e11, "1700000000", True,
                                   None, [1]])
def test_a_damaged_taken_at_in_cycle_json_is_refused_naming_it(engine, value):
    vol = engine.volume
    freeze = CycleFreeze.create(vol, engine.fd, 1, np.ones(REGIONS, dtype=np.uint8))
    freeze.close()
    info = json.loads((vol.path / "cycle" / "cycle.json").read_text())
    info["taken_at"] = value
    (vol.path / "cycle" / "cycle.json").write_text(json.dumps(info))
    files = {f.name: f.read_bytes() for f in (vol.path / "cycle").iterdir()}
    marks = engine.tracker.count()
    with pytest.raises(VolumeCorrupt, match="damaged open cycle"):
        AsyncMirror(engine, interval=0)
    assert {f.name: f.read_bytes() for f in (vol.path / "cycle").iterdir()} == files
    assert engine.tracker.count() == marks and not engine.pre_write


@pytest.mark.parametrize("value", ["yesterday", -5, 1e11, True, [0], {"a": 1}])
def test_a_damaged_cycle_at_in_volume_json_refuses_to_open_the_volume(tmp_path, value):
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    path = vol.path / "volume.json"
    info = json.loads(path.read_text())
    info["cycle_at"] = value
    path.write_text(json.dumps(info))
    with pytest.raises(VolumeCorrupt, match="cycle_at"):
        Volume.open(vol.path)


def test_a_nan_cycle_at_in_volume_json_refuses_to_open_the_volume(tmp_path):
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    path = vol.path / "volume.json"
    text = path.read_text()
    info = json.loads(text)
    info["cycle_at"] = math.nan
    path.write_text(json.dumps(info))  # NaN: json.loads takes it
    with pytest.raises(VolumeCorrupt, match="cycle_at"):
        Volume.open(vol.path)


def test_writes_trims_and_zeroes_during_the_live_pass_reach_cycle_1(engine):
    """The pass's 3rd chunk (regions 32-47) is read and held before it is sent; meanwhile
    the host writes into that chunk (already read: conveyed stale, stays marked), into
    regions the pass has not reached (skipped), trims and zeroes some of each. Cycle 1,
    which follows, holds the volume exactly as it is."""
    engine.pwrite(random_data(2), 0)
    with mirrored(engine) as mirror:
        sec = GatedSecondary(mirror, S1, gate=3)
        mirror.connected(sec)
        assert sec.at_gate.wait(10), "the pass at its 3rd chunk"
        engine.pwrite(pattern(0xA1), 33 * RS)  # in the chunk read, not yet sent
        engine.trim(RS, 40 * RS)  # ditto, a hole now
        engine.pwrite(pattern(0xA2), 100 * RS)  # not reached yet
        engine.trim(2 * RS, 110 * RS)  # not reached: holes now (ZERO, skipped)
        engine.zero(RS, 120 * RS, may_trim=False)
        engine.pwrite(pattern(0xA3), 5 * RS)  # conveyed before: marked again
        want = mirror.run_now()
        assert want == 1  # the pass commits nothing: cycle 1 holds what came before
        sec.go.set()
        wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
        now = volume_bytes(engine)
        got = sec.commits[1]
        bad = [r for r in range(REGIONS) if region(got, r) != region(now, r)]
        assert not bad, f"cycle 1's image differs from the primary in regions {bad}"
        assert mirror.initial_sync["skipped_regions"] >= 1, mirror.initial_sync
        assert engine.tracker.count() == 0
        assert not (engine.volume.path / "cycle").exists()


def test_a_region_written_ahead_of_the_pass_is_not_sent_by_the_pass(engine):
    engine.pwrite(random_data(7), 0)
    with mirrored(engine) as mirror:
        sec = GatedSecondary(mirror, S1, gate=2)
        mirror.connected(sec)
        assert sec.at_gate.wait(10), "the pass at its 2nd chunk"
        n = len(sec.frames)
        engine.pwrite(pattern(0xB1), 100 * RS)  # mid-chunk (regions 96-111), not reached
        sec.go.set()
        wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
        assert sec.commits[1] == volume_bytes(engine)
        in_pass = sec.frames[n:len(sec.frames) - 1]  # the last frame: cycle 1's region 100
        carried = [(offset // RS, -(-len(data) // RS)) for f in in_pass
                   for offset, data in chunk_pieces(f)
                   if offset // RS <= 100 < (offset + len(data) + RS - 1) // RS]
        assert not carried, f"the pass sent region 100, written before it got there: {carried}"


def test_a_write_landing_in_a_hole_just_after_the_pass_looked_is_carried_by_cycle_1(
        engine, monkeypatch):
    """A sparse volume; right after the pass found regions 20.. to be a hole (SEEK_DATA) and
    before their ZERO frame goes, the host writes region 20: the ZERO is sent, the region
    stays marked, cycle 1 carries the data."""
    engine.pwrite(pattern(0x11), 2 * RS)
    engine.pwrite(pattern(0x12), 90 * RS)
    real = blockio.hole_end
    hit: list[int] = []

    def hole_end(fd, region_size, first, stop):
        end = real(fd, region_size, first, stop)
        if not hit and threading.current_thread().name == "async-cycles" and first <= 20 < end:
            hit.append(first)
            engine.pwrite(pattern(0x77), 20 * RS)
        return end

    monkeypatch.setattr(blockio, "hole_end", hole_end)
    engine.tracker.mark(0, SIZE)  # as for a new secondary: every region
    with mirrored(engine) as mirror:
        sec = FakeSecondary(mirror, S1)
        mirror.connected(sec)
        wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
        assert hit, "the pass never looked for the hole"
        assert region(sec.commits[1], 20) == pattern(0x77)
        assert sec.commits[1] == volume_bytes(engine)


def test_a_trim_right_after_the_pass_read_a_region_is_carried_by_cycle_1(engine,
                                                                          monkeypatch):
    engine.pwrite(random_data(3), 0)
    real = LivePass.read_range
    hit: list[int] = []

    def read_range(self, offset, view):
        real(self, offset, view)
        first, stop = offset // RS, (offset + len(view)) // RS
        if not hit and first <= 50 < stop:
            hit.append(first)
            engine.trim(RS, 50 * RS)  # data read; a hole now
            engine.zero(RS, (first + 1) * RS, may_trim=True)

    monkeypatch.setattr(LivePass, "read_range", read_range)
    with mirrored(engine) as mirror:
        sec = FakeSecondary(mirror, S1)
        mirror.connected(sec)
        wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
        assert hit
        assert region(sec.commits[1], 50) == bytes(RS)
        assert sec.commits[1] == volume_bytes(engine)


def test_a_cut_pass_resumes_from_pending_and_conveys_each_region_once(engine):
    """The link goes after 2 chunks were acknowledged; on the next channel the pass goes on
    with the rest (no region of the first two chunks again), then cycle 1 (empty)."""
    engine.pwrite(random_data(4), 0)
    with mirrored(engine) as mirror:
        first = FakeSecondary(mirror, S1, hold=True)
        mirror.connected(first)
        wait_until(lambda: first.chunks >= 4, 10, "chunks of the pass")
        first.release(2)
        wait_until(lambda: mirror.progress["conveyed_regions"] >= 2 * CHUNK_REGIONS, 10,
                   "two acks")
        first.close("cut")
        mirror.disconnected("cut")
        second = GatedSecondary(mirror, S1, gate=0)
        mirror.connected(second)
        wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
        offsets = sorted(f.offset // RS for f in second.frames)
        assert offsets and min(offsets) >= 2 * CHUNK_REGIONS, offsets
        assert mirror.stats["regions_conveyed"] == REGIONS
        assert second.image[2 * CHUNK_REGIONS * RS:] == volume_bytes(engine)[
            2 * CHUNK_REGIONS * RS:]


def note_peer_spy(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """(armed, marked): once ``armed`` is set, ``marked`` is set when AsyncMirror's
    note_peer has marked everything for a new secondary (``connected()``)."""
    import volume_core.replication.mirror as mirror_module

    armed, marked = threading.Event(), threading.Event()
    real = mirror_module.note_peer

    def note_peer(eng, channel):
        new = real(eng, channel)
        if armed.is_set():
            marked.set()
        return new

    monkeypatch.setattr(mirror_module, "note_peer", note_peer)
    return armed, marked


def test_a_new_secondary_connecting_as_the_pass_waits_for_its_last_acks_gets_everything(
        engine, monkeypatch):
    data = random_data(8)
    engine.pwrite(data, 0)
    armed, marked = note_peer_spy(monkeypatch)
    real_remaining = LivePass.remaining

    def remaining(self):
        # the cycle thread, woken by the disconnect: it goes on once connected() has
        # marked everything for the new secondary (a thread switch at this point)
        if armed.is_set() and threading.current_thread().name == "async-cycles":
            marked.wait(5)
        return real_remaining(self)

    monkeypatch.setattr(LivePass, "remaining", remaining)
    with mirrored(engine) as mirror:
        old = FakeSecondary(mirror, S1, hold=True)
        mirror.connected(old)
        wait_until(lambda: old.chunks >= REGIONS // CHUNK_REGIONS, 10, "the whole pass sent")
        old.release(3)
        wait_until(lambda: mirror.progress["conveyed_regions"] >= 3 * CHUNK_REGIONS, 10,
                   "three acks")
        armed.set()
        old.close("replaced")
        mirror.disconnected("replaced")
        new = FakeSecondary(mirror, S2)  # another volume: it holds nothing
        mirror.connected(new)
        wait_until(lambda: mirror.committed >= 1 or mirror.status()["state"] == "in-sync",
                   10, "cycle 1 or a claim of in-sync")
        want = mirror.run_now()  # `nbdmirror sync --wait`
        wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
        missing = [r for r in range(REGIONS) if region(new.commits[want], r) != region(data, r)]
        assert not missing, (f"the new secondary committed cycle {want} without "
                             f"{len(missing)} of {REGIONS} regions")


def test_a_new_secondary_connecting_while_a_cycle_is_prepared_gets_everything(
        engine, monkeypatch):
    data = random_data(9)
    engine.pwrite(data, 0)
    armed, marked = note_peer_spy(monkeypatch)
    preparing = threading.Event()
    real_prepare = CycleFreeze.prepare

    def prepare(volume, *args, **kw):
        if armed.is_set():
            preparing.set()
            marked.wait(5)  # the slow part of a take (1 TiB: tens of ms)
        return real_prepare(volume, *args, **kw)

    monkeypatch.setattr(CycleFreeze, "prepare", staticmethod(prepare))
    with mirrored(engine) as mirror:
        old = FakeSecondary(mirror, S1)
        mirror.connected(old)
        wait_until(lambda: mirror.committed >= 1, 10, "cycle 1 on the first secondary")
        engine.pwrite(pattern(0x66), 0)
        armed.set()
        assert mirror.run_now() == 2
        assert preparing.wait(10), "cycle 2's take"
        old.close("replaced")
        mirror.disconnected("replaced")
        new = FakeSecondary(mirror, S2)  # another volume: it holds nothing
        mirror.connected(new)
        wait_until(lambda: mirror.committed >= 2, 10, "cycle 2")
        want = mirror.run_now()
        wait_until(lambda: mirror.committed >= want, 10, f"cycle {want}")
        now = volume_bytes(engine)
        missing = [r for r in range(REGIONS) if region(new.commits[want], r) != region(now, r)]
        assert not missing, (f"the new secondary committed cycle {want} without "
                             f"{len(missing)} of {REGIONS} regions")


def test_run_now_during_the_pass_promises_cycle_1_holding_a_write_made_meanwhile(engine):
    engine.pwrite(random_data(6), 0)
    with mirrored(engine) as mirror:
        sec = GatedSecondary(mirror, S1, gate=2)
        mirror.connected(sec)
        assert sec.at_gate.wait(10)
        engine.pwrite(pattern(0x5A, 3), 8 * RS)  # in the chunk sent first: conveyed already
        assert mirror.run_now() == 1
        assert mirror.status()["cycle"]["state"] == "initial-sync"
        sec.go.set()
        wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
        assert sec.commits[1][8 * RS:11 * RS] == pattern(0x5A, 3)
        assert sec.commits[1] == volume_bytes(engine)


def test_prepare_refuses_while_a_cycle_is_open_and_leaves_it_alone(engine):
    vol = engine.volume
    freeze = CycleFreeze.create(vol, engine.fd, 1, np.ones(REGIONS, dtype=np.uint8))
    try:
        files = {f.name: f.read_bytes() for f in freeze.path.iterdir()}
        with pytest.raises(FileExistsError):
            CycleFreeze.prepare(vol, 2)
        assert {f.name: f.read_bytes() for f in freeze.path.iterdir()} == files
        assert not (vol.path / ".cycle-creating").exists()
    finally:
        freeze.close()


def test_a_prepared_freeze_made_before_a_write_freezes_what_was_taken_after_it(engine):
    """prepare() runs before writes pause: a write between prepare and the take is in the
    take (KEEP), and its region's bytes at the take are what the freeze reads."""
    vol = engine.volume
    prepared = CycleFreeze.prepare(vol, 1)
    engine.pwrite(pattern(0x31, 2), 7 * RS)  # after prepare, before the take
    with engine.quiesce():
        taken = engine.tracker.swap_and_reset()
        freeze = CycleFreeze.create(vol, engine.fd, 1, taken, prepared=prepared)
        engine.pre_write.append(freeze.preserve)
    try:
        assert list(np.flatnonzero(freeze.remaining())) == [7, 8]
        engine.pwrite(pattern(0x32, 2), 7 * RS)  # after the take: copied first
        assert bytes(freeze.read(7, 9)) == pattern(0x31, 2)
        on_disk = np.fromfile(freeze.path / "state.map", dtype=np.uint8)
        assert list(np.flatnonzero(on_disk != 2)) == [7, 8]
    finally:
        engine.pre_write.remove(freeze.preserve)
        engine.tracker.release(taken)
        freeze.drop()
