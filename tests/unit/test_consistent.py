"""An async secondary's consistent images for readers (volume_core.consistent), on real
files in-process: the newest is chosen, a choice deleted before it is held is made again,
one export per volume, and a view that loses its snapshot leaves nothing open."""

from __future__ import annotations

import os

import pytest

from volume_core import consistent, snapshot_view
from volume_core.consistent import ConsistentExport, newest_image, open_newest
from volume_core.errors import SnapshotError, VolumeBusy, VolumeError
from volume_core.snapshot_view import SnapshotView
from volume_core.snapshots import exclusive
from volume_core.volume import Volume

pytestmark = pytest.mark.unit


def open_fds() -> list[str]:
    """What this process has open (by path: a number may be reused)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the directory's own descriptor, closed by now
    return sorted(out)


def commit(engine, number: int) -> None:
    """What the secondary does at CYCLE_COMMIT: keep the image, drop the older unheld."""
    engine.create_snapshot(f"cycle-{number}", internal=True)
    for snap in list(engine.snapshots.chain):
        if snap.name != f"cycle-{number}":
            try:
                engine.delete_snapshot(snap.name, internal=True)
            except SnapshotError:
                pass  # held by a reader: kept for now


def test_the_newest_image_is_chosen_and_a_held_one_outlives_later_commits(engine):
    volume = Volume.open(engine.volume.path)
    with pytest.raises(SnapshotError, match="has no consistent image yet"):
        newest_image(volume)
    commit(engine, 1)
    held = open_newest(volume)
    try:
        commit(engine, 2)
        commit(engine, 3)
        assert [s.name for s in engine.snapshots.chain] == ["cycle-1", "cycle-3"]
        assert newest_image(volume) == "cycle-3"
    finally:
        held.close()
    commit(engine, 4)  # let go: it goes at the next commit
    assert [s.name for s in engine.snapshots.chain] == ["cycle-4"]


def test_a_choice_deleted_before_it_is_held_is_made_again(engine, monkeypatch):
    volume = Volume.open(engine.volume.path)
    commit(engine, 1)
    tried: list[str] = []

    def racing(vol, name):
        tried.append(name)
        if len(tried) == 1:  # cycle 2 commits between the choice and the open
            commit(engine, 2)
        return SnapshotView(vol, name)

    monkeypatch.setattr(consistent, "SnapshotView", racing)
    view = open_newest(volume)
    try:
        assert tried == ["cycle-1", "cycle-2"] and view.name == "cycle-2"
    finally:
        view.close()


def test_an_image_that_stays_out_of_reach_fails_in_one_clear_error(engine):
    volume = Volume.open(engine.volume.path)
    commit(engine, 1)
    before = open_fds()
    with exclusive(volume.snapshot_dir / "cycle-1", "delete"), \
            pytest.raises(SnapshotError, match=r"was replaced 2 times while it was opened "
                                               r"\(snapshot 'cycle-1' is being deleted\)"):
        open_newest(volume, tries=2)
    assert open_fds() == before


def test_a_view_of_a_snapshot_deleted_before_it_held_it_leaves_nothing_open(engine,
                                                                             monkeypatch):
    volume = Volume.open(engine.volume.path)
    commit(engine, 1)
    commit(engine, 2)
    real_flock = snapshot_view.try_flock

    def deleted_first(fd, how):  # the lock file is open, the delete wins the lock
        engine.delete_snapshot("cycle-2", internal=True)
        return real_flock(fd, how)

    monkeypatch.setattr(snapshot_view, "try_flock", deleted_first)
    before = open_fds()
    with pytest.raises(SnapshotError, match="'cycle-2' no longer exists"):
        SnapshotView(volume, "cycle-2")
    assert open_fds() == [f for f in before if "/cycle-2/" not in f]  # the engine's went

    monkeypatch.setattr(snapshot_view, "try_flock", real_flock)
    commit(engine, 3)
    stale = snapshot_view.snapshot_dirs(volume)
    engine.delete_snapshot("cycle-3", internal=True)  # gone before the view opens its lock
    monkeypatch.setattr(snapshot_view, "snapshot_dirs", lambda vol: stale)
    before = open_fds()
    with pytest.raises(SnapshotError, match="no snapshot named 'cycle-3'"):
        SnapshotView(volume, "cycle-3")
    assert open_fds() == before


def test_one_consistent_export_per_volume_and_only_of_a_secondary(engine, tmp_path):
    volume = Volume.open(engine.volume.path)
    first = ConsistentExport(volume)  # no image yet: it starts, connections fail
    try:
        with pytest.raises(SnapshotError, match="no consistent image yet"):
            first.open()
        with pytest.raises(VolumeBusy, match="is already being served"):
            ConsistentExport(volume)
    finally:
        first.close()
    ConsistentExport(volume).close()  # free again
    plain = Volume.create(tmp_path / "plain", 1 << 20, 64 << 10)
    with pytest.raises(VolumeError, match="is not a secondary"):
        ConsistentExport(plain)
    assert not (plain.path / "consistent").exists()
