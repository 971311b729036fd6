"""An async cycle's frozen image on real files: what the conveyor reads is the volume
at the take, whatever the host writes meanwhile; only regions still to convey are
copied; a restart finds the cycle where it was."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from volume_core.cycle_freeze import COPIED, FREE, KEEP, CycleFreeze
from volume_core.engine import Engine
from volume_core.errors import VolumeCorrupt
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 4096
REGIONS = 256
SIZE = RS * REGIONS - 512  # a short last region


@pytest.fixture
def fresh(tmp_path):
    """An engine over a volume full of random bytes, and those bytes: (vol, engine,
    before). The engine is closed afterwards."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    before = np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    with open(vol.data_path, "r+b") as f:
        f.write(before)
    engine = Engine(vol)
    yield vol, engine, before
    engine.close()


def freeze_with_hook(vol, engine, taken, number=1):
    freeze = CycleFreeze.create(vol, engine.fd, number, taken)
    engine.pre_write.append(freeze.preserve)
    return freeze, freeze.cow


def image(before: bytes, first: int, stop: int) -> bytes:
    return before[first * RS:min(stop * RS, SIZE)]


def test_the_conveyor_reads_the_volume_at_the_take_while_host_writes_land(fresh):
    vol, engine, before = fresh
    rng = np.random.default_rng(2)
    taken = (rng.random(REGIONS) < 0.6).astype(np.uint8)
    taken[-1] = 1  # the short last region too
    freeze, _ = freeze_with_hook(vol, engine, taken)
    stop_writing = threading.Event()
    errors: list[BaseException] = []

    def host(seed):
        r = np.random.default_rng(seed)
        try:
            while not stop_writing.is_set():
                off = int(r.integers(0, SIZE - 1))
                ln = int(r.integers(1, min(5 * RS, SIZE - off) + 1))
                engine.pwrite(r.integers(0, 256, ln, dtype=np.uint8).tobytes(), off)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    writers = [threading.Thread(target=host, args=(s,)) for s in (10, 11, 12)]
    for w in writers:
        w.start()
    got: dict[int, bytes] = {}
    try:
        for first in np.flatnonzero(taken).tolist():
            got[first] = bytes(freeze.read(first, first + 1))
            freeze.conveyed_runs([(first, first + 1)])
    finally:
        stop_writing.set()
        for w in writers:
            w.join(30)
    assert not errors, errors
    wrong = [r for r, data in got.items() if data != image(before, r, r + 1)]
    assert not wrong, f"regions read as written after the take: {wrong[:10]}"
    assert not freeze.remaining().any()
    freeze.drop()



def test_runs_of_regions_read_in_one_call_mix_store_and_live(fresh):
    vol, engine, before = fresh
    taken = np.ones(REGIONS, dtype=np.uint8)
    freeze, cow = freeze_with_hook(vol, engine, taken)
    engine.pwrite(b"x" * (3 * RS), 10 * RS)  # regions 10..12 copied, then overwritten
    assert list(freeze.preserved[9:14]) == [KEEP, COPIED, COPIED, COPIED, KEEP]
    assert cow.copies == 3
    assert bytes(freeze.read(8, 15)) == image(before, 8, 15)
    assert bytes(freeze.read(REGIONS - 2, REGIONS)) == image(before, REGIONS - 2, REGIONS)



def test_only_regions_the_cycle_still_needs_are_copied(fresh):
    vol, engine, _ = fresh
    taken = np.zeros(REGIONS, dtype=np.uint8)
    taken[100:110] = 1
    freeze, cow = freeze_with_hook(vol, engine, taken)
    engine.pwrite(b"a" * RS, 5 * RS)  # not in the cycle
    freeze.conveyed_runs([(100, 105)])
    engine.pwrite(b"b" * (5 * RS), 100 * RS)  # in the cycle, but conveyed already
    assert cow.copies == 0
    engine.pwrite(b"c" * RS, 107 * RS)  # still to convey: copied once
    engine.pwrite(b"d" * RS, 107 * RS)
    assert cow.copies == 1
    assert list(np.flatnonzero(freeze.remaining())) == list(range(105, 110))



def test_a_restart_finds_the_cycle_where_it_was(fresh):
    vol, engine, before = fresh
    vol.update_info(cycle=6)  # six cycles committed before this one
    taken = np.zeros(REGIONS, dtype=np.uint8)
    taken[20:40] = 1
    freeze, _ = freeze_with_hook(vol, engine, taken, number=7)
    engine.pwrite(b"n" * (2 * RS), 30 * RS)  # 30, 31 copied
    freeze.conveyed_runs([(20, 25)])
    freeze.close()  # the process dies here: no drop
    engine.close()
    engine = Engine(vol)
    try:
        again = CycleFreeze.open(vol, engine.fd)
        assert again is not None and again.number == 7
        assert list(np.flatnonzero(again.remaining())) == list(range(25, 40))
        assert list(again.preserved[29:33]) == [KEEP, COPIED, COPIED, KEEP]
        assert bytes(again.read(25, 40)) == image(before, 25, 40)
        again.drop()
        assert CycleFreeze.open(vol, engine.fd) is None
    finally:
        engine.close()


def test_a_second_cycle_is_refused_while_one_is_open(fresh):
    vol, engine, _ = fresh
    CycleFreeze.create(vol, engine.fd, 1, np.ones(REGIONS, dtype=np.uint8)).close()
    with pytest.raises(FileExistsError, match="cycle already open"):
        CycleFreeze.create(vol, engine.fd, 2, np.ones(REGIONS, dtype=np.uint8))



@pytest.mark.parametrize("damage", ["short map", "bad state", "bad number", "short store"])
def test_a_damaged_open_cycle_is_refused_naming_it(fresh, damage):
    vol, engine, _ = fresh
    CycleFreeze.create(vol, engine.fd, 3, np.ones(REGIONS, dtype=np.uint8)).close()
    root = vol.path / "cycle"
    if damage == "short map":
        (root / "state.map").write_bytes(b"\0" * (REGIONS - 1))
    elif damage == "bad state":
        (root / "state.map").write_bytes(b"\0" * (REGIONS - 1) + bytes([FREE + 1]))
    elif damage == "bad number":
        (root / "cycle.json").write_text('{"number": "three"}')
    else:
        with open(root / "store.img", "r+b") as f:
            f.truncate(SIZE - 1)
    with pytest.raises(VolumeCorrupt, match="damaged open cycle"):
        CycleFreeze.open(vol, engine.fd)



def test_a_write_landing_between_the_state_look_and_the_live_read_is_not_conveyed(
        fresh, monkeypatch):
    """The conveyor looked at region 5 (KEEP), then a host write copied it and landed
    before the conveyor read it live: the conveyor must see the region became COPIED
    and take the old bytes from the store."""
    import volume_core.cycle_freeze as cf

    vol, engine, before = fresh
    freeze, _ = freeze_with_hook(vol, engine, np.ones(REGIONS, dtype=np.uint8))
    real = cf.pread_full
    raced = []

    def pread_full(fd, view, offset):
        if fd == engine.fd and not raced:  # the conveyor's first live read
            raced.append(offset)
            writer = threading.Thread(target=engine.pwrite, args=(b"N" * RS, 5 * RS))
            writer.start()
            writer.join(10)
        return real(fd, view, offset)

    monkeypatch.setattr(cf, "pread_full", pread_full)
    assert bytes(freeze.read(4, 7)) == image(before, 4, 7)
    assert raced and freeze.preserved[5] == COPIED



@pytest.mark.parametrize("committed", [0, 5])
def test_an_open_cycle_numbered_out_of_step_with_the_committed_one_is_refused(fresh,
                                                                            committed):
    vol, engine, _ = fresh
    CycleFreeze.create(vol, engine.fd, 3, np.ones(REGIONS, dtype=np.uint8)).close()
    vol.update_info(cycle=committed)  # 3 is neither the next (1, 6) nor the last (0, 5)
    with pytest.raises(VolumeCorrupt, match="cycle 3, but cycle"):
        CycleFreeze.open(vol, engine.fd)


@pytest.fixture
def holey(tmp_path):
    """An engine over a sparse volume with data in regions 10-11 and 200 only."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    with open(vol.data_path, "r+b") as f:
        for region in (10, 11, 200):
            f.seek(region * RS)
            f.write(b"D" * RS)
    engine = Engine(vol)
    yield vol, engine
    engine.close()


def test_holes_of_the_live_volume_are_found_and_data_ends_at_the_next_hole(holey):
    vol, engine = holey
    freeze, _ = freeze_with_hook(vol, engine, np.ones(REGIONS, dtype=np.uint8))
    assert freeze.hole_end(0, REGIONS) == 10
    assert freeze.hole_end(0, 4) == 4
    assert freeze.hole_end(10, REGIONS) == 10  # data there
    assert freeze.data_end(10, REGIONS) == 12
    assert freeze.data_end(10, 11) == 11
    assert freeze.hole_end(12, REGIONS) == 200
    assert freeze.hole_end(201, REGIONS) == REGIONS
    freeze.preserved[50] = FREE  # conveyed: not part of a hole to send
    assert freeze.hole_end(12, REGIONS) == 50


def test_a_zero_write_landing_while_a_hole_is_looked_for_is_not_taken_for_a_hole(
        holey, monkeypatch):
    """Region 10 holds data at the take. A host write zeroes it (a hole now) after the
    conveyor looked at its state and before SEEK_DATA: the frozen image still holds the
    data, so the region must not be sent as part of a hole."""
    import volume_core.blockio as bio

    vol, engine = holey
    freeze, _ = freeze_with_hook(vol, engine, np.ones(REGIONS, dtype=np.uint8))
    real = bio.next_data
    raced = []

    def next_data(fd, offset):
        if not raced:
            raced.append(offset)
            writer = threading.Thread(target=engine.trim, args=(2 * RS, 10 * RS))
            writer.start()
            writer.join(10)
        return real(fd, offset)

    monkeypatch.setattr(bio, "next_data", next_data)
    assert freeze.hole_end(0, REGIONS) == 10
    assert raced and freeze.preserved[10] == COPIED
    assert real(engine.fd, 0) is None or real(engine.fd, 0) >= 200 * RS  # live: a hole
    assert bytes(freeze.read(10, 12)) == b"D" * 2 * RS


@pytest.mark.parametrize("max_runs", [0, 1 << 20], ids=["whole-map", "run-by-run"])
def test_a_prepared_freeze_records_exactly_the_taken_regions(fresh, monkeypatch, max_runs):
    """prepare() writes a map of FREE before writes pause; create() then writes KEEP for
    the taken runs (one by one, or the whole map when they are many): on disk and in
    memory the same, and a restart reads it back."""
    import volume_core.cycle_freeze as cf

    vol, engine, _ = fresh
    monkeypatch.setattr(cf, "MAX_RUN_WRITES", max_runs)
    taken = (np.random.default_rng(7).random(REGIONS) < 0.3).astype(np.uint8)
    prepared = CycleFreeze.prepare(vol, 1)
    freeze = CycleFreeze.create(vol, engine.fd, 1, taken, prepared=prepared)
    want = np.where(taken != 0, KEEP, FREE)
    on_disk = np.fromfile(vol.path / "cycle" / "state.map", dtype=np.uint8)
    assert (on_disk == want).all() and (freeze.preserved == want).all()
    freeze.close()
    again = CycleFreeze.open(vol, engine.fd)
    assert again is not None and (again.preserved == want).all()
    again.close()


def test_a_cycle_left_open_before_a_reboot_is_taken_again_not_resumed(fresh):
    """Its copies were never synced: after a reboot (another boot id) the freeze is
    dropped, and its regions, still marked durably, go with the next take; in the same
    boot (a killed process: the page cache survives) it resumes."""
    import json

    vol, engine, _ = fresh
    taken = np.zeros(REGIONS, dtype=np.uint8)
    taken[3:9] = 1
    engine.tracker.mark(3 * RS, 6 * RS)
    CycleFreeze.create(vol, engine.fd, 1, engine.tracker.swap_and_reset()).close()
    again = CycleFreeze.open(vol, engine.fd)  # same boot: resumed
    assert again is not None and (again.remaining()[3:9] == 1).all()
    again.close()
    info = vol.path / "cycle" / "cycle.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"boot_id": "another-boot"}))
    assert CycleFreeze.open(vol, engine.fd) is None
    assert not (vol.path / "cycle").exists()
    engine.close()
    reopened = Engine(Volume.open(vol.path))  # the marks, as a restarted server loads them
    try:
        assert (reopened.tracker.marks[3:9] == 1).all()
    finally:
        reopened.close()


def _count_pwrites(monkeypatch, fd: int) -> list[tuple[int, int]]:
    """(offset, length) of every pwrite to ``fd`` from now on."""
    import os

    real, seen = os.pwrite, []

    def counting(f, buf, off):
        if f == fd:
            seen.append((off, len(buf)))
        return real(f, buf, off)

    monkeypatch.setattr(os, "pwrite", counting)
    return seen


def test_a_frame_of_scattered_runs_is_recorded_conveyed_in_one_write(fresh, monkeypatch):
    vol, engine, _ = fresh
    taken = np.zeros(REGIONS, dtype=np.uint8)
    taken[::3] = 1
    freeze, _ = freeze_with_hook(vol, engine, taken)
    engine.pwrite(b"c" * RS, 9 * RS)  # 9 copied: its byte is COPIED on disk and in memory
    runs = [(r, r + 1) for r in range(0, 60, 6)]
    seen = _count_pwrites(monkeypatch, freeze.map_fd)
    freeze.conveyed_runs(runs)
    assert seen == [(0, 55)], "one write over the frame's stretch of the map"
    on_disk = np.fromfile(vol.path / "cycle" / "state.map", dtype=np.uint8)
    assert (on_disk == freeze.preserved).all()
    assert on_disk[9] == COPIED and on_disk[6] == FREE and on_disk[3] == KEEP
    freeze.close()


def test_a_copy_under_way_in_the_stretch_is_not_written_over(fresh, monkeypatch):
    """A copy writes its COPIED byte before memory says so: a stretch with a copy under
    way is written run by run, so that byte is never put back to KEEP."""
    vol, engine, _ = fresh
    taken = np.zeros(REGIONS, dtype=np.uint8)
    taken[:40] = 1
    freeze, _ = freeze_with_hook(vol, engine, taken)
    freeze.copying[5] = 1  # claimed: its copy is being recorded
    with open(vol.path / "cycle" / "state.map", "r+b") as f:
        f.seek(5)
        f.write(bytes([COPIED]))  # what the copy wrote (memory still says KEEP)
    seen = _count_pwrites(monkeypatch, freeze.map_fd)
    freeze.conveyed_runs([(2, 4), (8, 10)])
    assert seen == [(2, 2), (8, 2)]
    on_disk = np.fromfile(vol.path / "cycle" / "state.map", dtype=np.uint8)
    assert on_disk[5] == COPIED and list(on_disk[2:4]) == [FREE, FREE]
    freeze.copying[5] = 0
    freeze.close()
