"""State files are checked before anything trusts or writes them, at every library entry point."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from volume_core import snapshots, state_files
from volume_core.engine import Engine
from volume_core.errors import SnapshotCorrupt, VolumeCorrupt, VolumeError
from volume_core.geometry import RegionGeometry
from volume_core.snapshot_view import SnapshotView
from volume_core.volume import Volume, VolumeInfo

pytestmark = pytest.mark.unit

RS = 4096
REGIONS = 64
SIZE = RS * REGIONS - 512


def fingerprint(vol: Path) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(vol):
        out |= {os.path.join(root, d): "dir" for d in dirs}
        out |= {os.path.join(root, f): hashlib.sha256(Path(root, f).read_bytes()).hexdigest()
                for f in files}
    return out


@pytest.fixture
def vol(tmp_path) -> Volume:
    """s1 holds copies and is being deleted (a crash cut the delete short); s2 is fine; a
    create was cut short too. Opening for serve would finish and clean up all of that."""
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    e = Engine(vol)
    e.pwrite(b"a" * SIZE, 0)
    e.create_snapshot("s1")
    e.pwrite(b"b" * 4 * RS, 0)
    e.create_snapshot("s2")
    e.close()
    info = vol.snapshot_dir / "s1" / "snapshot.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"deleting": True}))
    (vol.snapshot_dir / ".creating-s3").mkdir()
    return Volume.open(vol.path)


def test_every_volume_info_field_has_a_check():
    assert set(state_files.VOLUME_FIELDS) == {f.name for f in dataclasses.fields(VolumeInfo)}


def test_a_short_preserved_map_is_refused_by_every_entry_point_before_anything_is_written(vol):
    """It used to let writes past its end skip copy-on-write: the snapshot took new data."""
    os.truncate(vol.snapshot_dir / "s2" / "preserved.map", REGIONS // 2)
    before = fingerprint(vol.path)
    with pytest.raises(SnapshotCorrupt, match="s2/preserved.map: 32 bytes, expected 64"):
        Volume.open(vol.path)
    with pytest.raises(VolumeError, match="s2/preserved.map"):
        Engine(vol)  # would finish deleting s1 and remove .creating-s3
    with pytest.raises(SnapshotCorrupt, match="s2/preserved.map"):
        SnapshotView(vol, "s2")
    with pytest.raises(SnapshotCorrupt, match="s2/preserved.map"):
        snapshots.list_offline(vol)
    with pytest.raises(SnapshotCorrupt, match="s2/preserved.map"):
        snapshots.Snapshot.open(vol.snapshot_dir / "s2", REGIONS, writable=False)
    assert fingerprint(vol.path) == before


def test_a_damaged_description_of_a_snapshot_being_deleted_stops_the_open(vol):
    info = vol.snapshot_dir / "s1" / "snapshot.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"seq": "1"}))
    before = fingerprint(vol.path)
    with pytest.raises(VolumeError, match=r"s1/snapshot.json: seq \"1\" is invalid"):
        Engine(vol)
    assert fingerprint(vol.path) == before


def test_a_valid_volume_is_opened_and_its_leftovers_cleaned(vol):
    e = Engine(vol)
    assert [s.name for s in e.snapshots.chain] == ["s2"]
    assert sorted(p.name for p in vol.snapshot_dir.iterdir()) == ["chain.seq", "s2"]
    e.close()


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_chain_counter_cut_short_is_accepted_and_an_export_still_follows_changes(vol, state):
    seq = vol.snapshot_dir / "chain.seq"
    if state == "missing":
        seq.unlink()
    else:
        os.truncate(seq, 0)
    Volume.open(vol.path)
    view = SnapshotView(vol, "s2")
    try:
        assert seq.stat().st_size == 8
        e = Engine(vol)
        e.create_snapshot("s3")
        e.pwrite(b"c" * RS, 10 * RS)  # copied into s3, which s2 reads through to
        buf = bytearray(RS)
        view.pread(buf, 10 * RS)
        assert buf == b"a" * RS
        e.close()
    finally:
        view.close()


@pytest.mark.parametrize("fields, message", [
    ({"uuid": "6F9619FF-8B86-D011-B42D-00C04FC964FF"}, "uuid"),  # not as create writes it
    ({"region_size": 3 << 12}, "power of two"),
    ({"size": 1 << 41, "region_size": 4096}, "more than"),
    ({"generation": 1.0}, "generation"),
    ({"role": ["primary"]}, "role"),
])
def test_volume_fields_are_checked_for_type_and_range(vol, fields, message):
    path = vol.path / "volume.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    with pytest.raises(VolumeCorrupt, match=message):
        Volume.open(vol.path)


def test_geometry_spans_and_the_short_last_region():
    g = RegionGeometry(SIZE, RS)
    assert (g.shift, g.regions) == (12, REGIONS)
    assert g.span(RS - 1, 2) == (0, 2)
    assert g.span(5 * RS, RS) == (5, 6)
    assert g.region_bytes(0) == RS and g.region_bytes(REGIONS - 1) == RS - 512
    assert g.bytes_in(3, includes_last=False) == 3 * RS
    assert g.bytes_in(3, includes_last=True) == 3 * RS - 512
    assert g.bytes_in(0, includes_last=True) == 0


def test_pread_full_reads_past_the_end_of_a_short_file_as_zeros(vol):
    from volume_core.blockio import pread_full

    path = vol.path / "short"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(b"?" * 20)
        pread_full(fd, buf, 5)
        assert buf == b"x" * 5 + bytes(15)
    finally:
        os.close(fd)


def test_update_info_writes_nothing_open_would_refuse_and_memory_follows_the_disk(vol,
                                                                                  monkeypatch):
    import volume_core.volume as volume_module

    with pytest.raises(VolumeCorrupt, match="generation"):
        vol.update_info(generation=0)

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volume_module, "write_json_atomic", disk_full)
    with pytest.raises(OSError):
        vol.update_info(generation=2)
    assert vol.info.generation == 1
    monkeypatch.undo()
    vol.update_info(generation=2)
    assert Volume.open(vol.path).info.generation == 2
