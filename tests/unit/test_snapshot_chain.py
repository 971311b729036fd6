"""Snapshot chains on real files, in-process: every deletion order keeps the others exact."""

from __future__ import annotations

import itertools
import os
import zlib

import numpy as np
import pytest

from volume_core.engine import Engine
from volume_core.errors import SnapshotError
from volume_core.snapshot_view import SnapshotView
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 4096
REGIONS = 64
SIZE = RS * REGIONS - 512  # a short last region


def read_all(reader, size=SIZE) -> bytes:
    buf = bytearray(size)
    reader.pread(buf, 0)
    return bytes(buf)


def scribble(engine, rng, n=20):
    for _ in range(n):
        off = int(rng.integers(0, SIZE - 1))
        ln = int(rng.integers(1, min(3 * RS, SIZE - off) + 1))
        engine.pwrite(rng.integers(0, 256, ln, dtype=np.uint8).tobytes(), off)


def build_chain(tmp_path, seed):
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    rng = np.random.default_rng(seed)
    e = Engine(vol)
    scribble(e, rng)
    images = {}
    for name in ("s1", "s2", "s3"):
        e.create_snapshot(name)
        images[name] = read_all(e)
        scribble(e, rng)
        e.trim(RS * 2, RS * int(rng.integers(0, REGIONS - 2)))
    images["live"] = read_all(e)
    return vol, e, images


def check(vol, e, images, names):
    for name in names:
        view = SnapshotView(vol, name)
        try:
            assert read_all(view) == images[name], f"snapshot {name} changed"
        finally:
            view.close()
    assert read_all(e) == images["live"]


@pytest.mark.parametrize("order", list(itertools.permutations(["s1", "s2", "s3"])))
def test_chain_of_three_deleted_in_every_order_stays_exact(tmp_path, order):
    # str hashes are salted per process: crc32 gives every order the same data in every run
    vol, e, images = build_chain(tmp_path, seed=zlib.crc32(",".join(order).encode()))
    check(vol, e, images, ["s1", "s2", "s3"])
    left = ["s1", "s2", "s3"]
    for name in order:
        e.delete_snapshot(name)
        left.remove(name)
        assert not (vol.snapshot_dir / name).exists()
        check(vol, e, images, left)
        # writes after a deletion still preserve what the remaining snapshots need
        rng = np.random.default_rng(len(left))
        scribble(e, rng, 5)
        images["live"] = read_all(e)
        check(vol, e, images, left)
    e.close()


def test_snapshot_survives_engine_restart(tmp_path):
    vol, e, images = build_chain(tmp_path, seed=7)
    e.close()
    e2 = Engine(Volume.open(vol.path))
    check(vol, e2, images, ["s1", "s2", "s3"])
    e2.close()


def test_creation_copies_no_data_and_first_write_copies_one_region(tmp_path):
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    e = Engine(vol)
    e.pwrite(b"x" * SIZE, 0)
    e.create_snapshot("s")
    store = vol.snapshot_dir / "s" / "store.img"
    assert os.stat(store).st_blocks == 0
    e.pwrite(b"y", 5 * RS + 7)
    assert e.snapshots.copies == 1
    e.pwrite(b"z" * 100, 5 * RS + 100)  # same region again: nothing more to copy
    assert e.snapshots.copies == 1
    assert 0 < os.stat(store).st_blocks * 512 <= 2 * RS
    e.close()


def test_interrupted_delete_is_finished_on_next_open(tmp_path):
    vol, e, images = build_chain(tmp_path, seed=3)
    import json

    info = vol.snapshot_dir / "s2" / "snapshot.json"
    # simulate a crash right after the delete was recorded
    info.write_text(json.dumps(json.loads(info.read_text()) | {"deleting": True}))
    e.close()
    e2 = Engine(Volume.open(vol.path))
    assert not (vol.snapshot_dir / "s2").exists()
    check(vol, e2, images, ["s1", "s3"])
    e2.close()


@pytest.mark.parametrize("name", ["a/b", "../x", "", ".hidden", "-x", "x" * 101, "sp ace"])
def test_bad_snapshot_names_are_refused(tmp_path, name):
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    e = Engine(vol)
    with pytest.raises(SnapshotError):
        e.create_snapshot(name)
    assert [p.name for p in vol.snapshot_dir.iterdir() if p.name != "chain.seq"] == []
    e.close()


def test_delete_cut_short_inside_rmtree_leaves_an_openable_volume(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    vol, e, images = build_chain(tmp_path, seed=5)
    real_rmtree = shutil.rmtree

    def dies_half_way(path, ignore_errors=False):
        path = Path(path)
        if path.name.startswith(".deleting-") and path.exists():
            (path / "store.img").unlink()
            raise KeyboardInterrupt("killed inside rmtree")
        return real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        e.delete_snapshot("s2")
    monkeypatch.undo()
    e.volume.unlock()  # the process is gone: its lock with it
    assert (vol.snapshot_dir / ".deleting-s2").exists()
    e2 = Engine(Volume.open(vol.path))
    assert not (vol.snapshot_dir / ".deleting-s2").exists()
    check(vol, e2, images, ["s1", "s3"])
    e2.close()


def test_deleting_the_newest_moves_copies_made_while_writes_went_on(tmp_path):
    import contextlib

    vol = Volume.create(tmp_path / "v", SIZE, RS)
    e = Engine(vol)
    e.pwrite(np.random.default_rng(9).integers(0, 256, SIZE, dtype=np.uint8).tobytes(), 0)
    e.create_snapshot("a")
    image_a = read_all(e)
    e.create_snapshot("c")

    @contextlib.contextmanager
    def write_then_quiesce():
        # a write lands after the copies were moved and before writes pause: its
        # copy-on-write goes into "c", which "a" reads through to
        e.pwrite(b"z" * RS, 7 * RS)
        with e.quiesce():
            yield

    e.snapshots.delete("c", quiesce=write_then_quiesce)
    check(vol, e, {"a": image_a, "live": read_all(e)}, ["a"])
    e.close()


def test_an_export_tells_a_recreated_snapshot_from_the_deleted_one_of_the_same_name(tmp_path):
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    e = Engine(vol)
    e.pwrite(b"a" * SIZE, 0)
    e.create_snapshot("s1")
    view = SnapshotView(vol, "s1")
    try:
        e.create_snapshot("s2")
        assert read_all(view) == b"a" * SIZE  # the view now holds s2 open
        e.delete_snapshot("s2")
        e.create_snapshot("s2")  # same name, same place in the chain: another snapshot
        e.pwrite(b"b" * RS, 3 * RS)  # copied into the new s2 only, which s1 reads through to
        assert read_all(view) == b"a" * SIZE
    finally:
        view.close()
        e.close()


def test_a_failed_copy_record_leaves_the_region_unpreserved_and_the_write_retried(tmp_path,
                                                                                  monkeypatch):
    from volume_core import snapshots

    vol = Volume.create(tmp_path / "v", SIZE, RS)
    e = Engine(vol)
    e.pwrite(b"a" * SIZE, 0)
    e.create_snapshot("s")
    real = snapshots.pwrite_full

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshots, "pwrite_full", full)
    with pytest.raises(OSError):
        e.pwrite(b"b" * RS, 2 * RS)
    assert not e.snapshots.newest.preserved[2] and not e.snapshots.newest.copying[2]
    monkeypatch.setattr(snapshots, "pwrite_full", real)
    e.pwrite(b"b" * RS, 2 * RS)
    assert e.snapshots.newest.preserved[2]
    e.close()
    e2 = Engine(Volume.open(vol.path))
    check(vol, e2, {"s": b"a" * SIZE, "live": b"a" * 2 * RS + b"b" * RS + b"a" * (SIZE - 3 * RS)},
          ["s"])
    e2.close()


def test_copies_made_ahead_for_many_writes_share_one_commit(tmp_path, monkeypatch):
    """Engine.preserve_ahead (a secondary's applier, before a batch of chunks): the
    regions of every span are copied with one store sync and one map sync; the writes
    then copy nothing, and the snapshot still reads as it was."""
    import volume_core.snapshots as snapshots

    vol = Volume.create(tmp_path / "v", SIZE, RS)
    e = Engine(vol)
    before = np.random.default_rng(3).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    e.pwrite(before, 0)
    e.create_snapshot("s")
    spans = [(r * RS, RS) for r in (1, 5, 6, 20, 40)] + [(50 * RS + 10, 3 * RS)]
    syncs = []
    real = snapshots.os.fdatasync
    monkeypatch.setattr(snapshots.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    e.preserve_ahead(spans)
    assert len(syncs) == 2, syncs  # the store, then the map: once for all six spans
    assert e.snapshots.copies == 1 + 3 + 1 + 1 + 3
    for off, n in spans:
        e.pwrite(b"n" * n, off)
    assert e.snapshots.copies == 9 and len(syncs) == 2  # nothing copied twice
    view = SnapshotView(vol, "s")
    try:
        assert read_all(view) == before
    finally:
        view.close()
    e.close()
