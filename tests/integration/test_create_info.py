"""create/info through the real CLI: good volumes, and every kind of bad input."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.integration


def test_create_makes_sparse_volume_with_identity(cli, tmp_path):
    vol = tmp_path / "v"
    out = cli("create", vol, "--size", "100M", "--region-size", "1M", "--json").json()
    assert out["size"] == 100 << 20 and out["region_size"] == 1 << 20
    assert out["regions"] == 100 and out["generation"] == 1 and out["role"] == "primary"
    desc = json.loads((vol / "volume.json").read_text())
    assert desc["uuid"] == out["uuid"] and desc["format"] == 1
    data = vol / "data.img"
    assert data.stat().st_size == 100 << 20
    assert data.stat().st_blocks == 0  # sparse
    assert (vol / "marks.map").stat().st_size == 100
    assert (vol / "snapshots").is_dir()
    info = cli("info", vol, "--json").json()
    assert info["uuid"] == out["uuid"] and info["served"] is False
    assert info["marked_regions"] == 0


def test_size_not_multiple_of_region_size_gives_short_last_region(cli, tmp_path):
    vol = tmp_path / "v"
    out = cli("create", vol, "--size", "1000K", "--json").json()  # 15.6 regions of 64K
    assert out["regions"] == 16
    assert cli("info", vol).out.count("16 of 64 KiB") == 1


def test_two_volumes_get_distinct_uuids(cli, tmp_path):
    a = cli("create", tmp_path / "a", "--size", "1M", "--json").json()["uuid"]
    b = cli("create", tmp_path / "b", "--size", "1M", "--json").json()["uuid"]
    assert a != b


@pytest.mark.parametrize("args, message", [
    (["--size", "0"], "invalid size"),
    (["--size", "-5M"], "invalid size"),
    (["--size", "banana"], "invalid size"),
    (["--size", "1000"], "multiple of 512"),
    (["--size", "10X"], "invalid size"),
    (["--size", "1G", "--region-size", "3K"], "power of two"),
    (["--size", "1G", "--region-size", "2K"], "power of two"),
    (["--size", "1G", "--region-size", "32M"], "power of two"),
    (["--size", "1G", "--region-size", "nope"], "invalid region size"),
    (["--size", "1P", "--region-size", "4K"], "more than"),
])
def test_create_rejects_bad_sizes_as_usage_errors_and_creates_nothing(cli, tmp_path, args,
                                                                     message):
    vol = tmp_path / "v"
    res = cli("create", vol, *args, check=False)
    assert res.code == 2, res  # a usage error, as click reports them
    errors = [ln for ln in res.err.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.err
    assert not vol.exists()
    assert os.listdir(tmp_path) == []  # no half-made temporary directory either


def test_create_without_size_is_a_usage_error(cli, tmp_path):
    res = cli("create", tmp_path / "v", check=False)
    assert res.code == 2 and "--size" in res.err


def test_create_refuses_to_overwrite_volume_file_or_directory(cli, tmp_path):
    vol = tmp_path / "v"
    first = cli("create", vol, "--size", "4M", "--json").json()
    before = {p.name: p.stat().st_mtime_ns for p in vol.iterdir()}
    res = cli("create", vol, "--size", "8M", check=False)
    assert res.code == 1 and "already exists" in res.err and len(res.err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in vol.iterdir()} == before
    assert cli("info", vol, "--json").json()["uuid"] == first["uuid"]
    (tmp_path / "file").write_text("precious")
    assert cli("create", tmp_path / "file", "--size", "4M", check=False).code == 1
    assert (tmp_path / "file").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    assert cli("create", tmp_path / "empty", "--size", "4M", check=False).code == 1
    assert list((tmp_path / "empty").iterdir()) == []


def test_create_in_missing_parent_fails_cleanly(cli, tmp_path):
    res = cli("create", tmp_path / "nope" / "v", "--size", "4M", check=False)
    assert res.code == 1 and "does not exist" in res.err and "Traceback" not in res.err


@pytest.mark.parametrize("setup", [
    "missing", "plain_dir", "bad_json", "wrong_format", "short_data"])
def test_info_on_bad_volume_is_one_clear_line(cli, tmp_path, setup):
    vol = tmp_path / "v"
    if setup != "missing":
        if setup == "plain_dir":
            vol.mkdir()
        else:
            cli("create", vol, "--size", "4M")
            if setup == "bad_json":
                (vol / "volume.json").write_text("{not json")
            elif setup == "wrong_format":
                desc = json.loads((vol / "volume.json").read_text())
                (vol / "volume.json").write_text(json.dumps(desc | {"format": 99}))
            else:
                os.truncate(vol / "data.img", 1 << 20)
    before = sorted(p.name for p in vol.iterdir()) if vol.exists() else None
    res = cli("info", vol, check=False)
    assert res.code == 1 and len(res.err.strip().splitlines()) == 1, res.err
    assert "Traceback" not in res.err and str(vol) in res.err
    assert (sorted(p.name for p in vol.iterdir()) if vol.exists() else None) == before


def test_help_explains_commands(cli):
    out = cli("--help").out
    for cmd in ("create", "info", "serve", "attach", "detach", "status", "stop"):
        assert cmd in out
    assert "power of two" in cli("create", "--help").out
