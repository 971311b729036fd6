"""A damaged state file is refused by every command with one line naming it, and nothing is written.

Each case damages one file of a volume that has two snapshots, then runs the
commands that open a volume through the real CLI.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import run_cli
from volume_core.engine import Engine
from volume_core.volume import Volume

pytestmark = pytest.mark.integration

RS = 4096
SIZE = 64 * RS - 512  # 64 regions, the last one short


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A volume with data and two snapshots, s1 holding copies; built once, copied per case."""
    vol = Volume.create(tmp_path_factory.mktemp("pristine") / "v", SIZE, RS)
    e = Engine(vol)
    try:
        e.pwrite(b"a" * SIZE, 0)
        e.create_snapshot("s1")
        e.pwrite(b"b" * 8 * RS, 0)  # regions 0..7 copied into s1
        e.create_snapshot("s2")
    finally:
        e.close()
    return vol.path


def edit_json(rel: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(vol: Path) -> None:
        data = json.loads((vol / rel).read_text())
        result = change(data)
        (vol / rel).write_text(json.dumps(data if result is None else result))
    return damage


def setkey(rel: str, key: str, value) -> Callable[[Path], None]:
    return edit_json(rel, lambda d: d.__setitem__(key, value))


def delkey(rel: str, key: str) -> Callable[[Path], None]:
    return edit_json(rel, lambda d: d.__delitem__(key))


def resize(rel: str, delta: int | None = None, to: int | None = None) -> Callable[[Path], None]:
    def damage(vol: Path) -> None:
        path = vol / rel
        os.truncate(path, to if to is not None else path.stat().st_size + delta)
    return damage


def write(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda vol: (vol / rel).write_bytes(data)


def remove(rel: str) -> Callable[[Path], None]:
    return lambda vol: (vol / rel).unlink()


INFO = "volume.json"
S1 = "snapshots/s1"
S1_INFO = f"{S1}/snapshot.json"
S2_INFO = "snapshots/s2/snapshot.json"

# (case id, damage, the file the error must name)
CASES = [
    ("size-a-string", setkey(INFO, "size", "4M"), INFO),
    ("size-a-bool", setkey(INFO, "size", True), INFO),
    ("size-not-sectors", setkey(INFO, "size", SIZE + 1), INFO),
    ("region-size-not-power-of-two", setkey(INFO, "region_size", 5000), INFO),
    ("region-size-a-float", setkey(INFO, "region_size", 4096.0), INFO),
    ("generation-a-string", setkey(INFO, "generation", "x"), INFO),
    ("generation-zero", setkey(INFO, "generation", 0), INFO),
    ("uuid-a-number", setkey(INFO, "uuid", 5), INFO),
    ("uuid-not-a-uuid", setkey(INFO, "uuid", "not-a-uuid"), INFO),
    ("role-unknown", setkey(INFO, "role", "tertiary"), INFO),
    ("created-a-number", setkey(INFO, "created", 7), INFO),
    ("format-unknown", setkey(INFO, "format", 2), INFO),
    ("unknown-field", setkey(INFO, "colour", "blue"), INFO),
    ("size-missing", delkey(INFO, "size"), INFO),
    ("info-a-list", write(INFO, b"[1, 2]"), INFO),
    ("info-cut-short", write(INFO, b'{"format": 1, "uu'), INFO),
    ("data-short", resize("data.img", -512), "data.img"),
    ("data-long", resize("data.img", +4096), "data.img"),
    ("marks-short", resize("marks.map", -1), "marks.map"),
    ("marks-long", resize("marks.map", +1), "marks.map"),
    ("marks-missing", remove("marks.map"), "marks.map"),
    ("chain-seq-short", resize("snapshots/chain.seq", to=3), "snapshots/chain.seq"),
    ("chain-seq-long", resize("snapshots/chain.seq", to=16), "snapshots/chain.seq"),
    ("snapshot-name-other", setkey(S1_INFO, "name", "other"), S1_INFO),
    ("snapshot-seq-a-string", setkey(S1_INFO, "seq", "1"), S1_INFO),
    ("snapshot-seq-zero", setkey(S1_INFO, "seq", 0), S1_INFO),
    ("snapshot-seq-a-bool", setkey(S1_INFO, "seq", True), S1_INFO),
    ("snapshot-seq-duplicate", setkey(S2_INFO, "seq", 1), "snapshots/s"),
    ("snapshot-created-a-number", setkey(S1_INFO, "created", 5), S1_INFO),
    ("snapshot-deleting-a-string", setkey(S1_INFO, "deleting", "yes"), S1_INFO),
    ("snapshot-name-missing", delkey(S1_INFO, "name"), S1_INFO),
    ("snapshot-info-garbage", write(S1_INFO, b"\x00\xff garbage"), S1_INFO),
    ("snapshot-info-missing", remove(S1_INFO), S1_INFO),
    ("store-short", resize(f"{S1}/store.img", -512), f"{S1}/store.img"),
    ("store-missing", remove(f"{S1}/store.img"), f"{S1}/store.img"),
    ("preserved-short", resize(f"{S1}/preserved.map", -1), f"{S1}/preserved.map"),
    ("preserved-empty", resize(f"{S1}/preserved.map", to=0), f"{S1}/preserved.map"),
    ("preserved-long", resize(f"{S1}/preserved.map", +1), f"{S1}/preserved.map"),
    ("preserved-missing", remove(f"{S1}/preserved.map"), f"{S1}/preserved.map"),
]

COMMANDS = [
    ("info", "{vol}"),
    ("serve", "{vol}", "--background"),
    ("snapshot", "serve", "{vol}", "s1", "--background"),
    ("snapshot", "list", "{vol}"),
    ("snapshot", "create", "{vol}"),
]


def fingerprint(vol: Path) -> dict[str, str]:
    """Every file and directory under ``vol`` with a hash of its bytes."""
    out = {}
    for root, dirs, files in os.walk(vol):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), vol) + "/"] = "dir"
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, vol)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("damage, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_command_refuses_a_damaged_file_in_one_line_and_writes_nothing(
        pristine, tmp_path, damage, names):
    vol = tmp_path / "v"
    shutil.copytree(pristine, vol, symlinks=True)
    damage(vol)
    before = fingerprint(vol)
    try:
        # read-only and refused at once, so they may run side by side (a CLI start is slow)
        with concurrent.futures.ThreadPoolExecutor(len(COMMANDS)) as pool:
            runs = [(args, pool.submit(run_cli, *args, check=False, timeout=60))
                    for args in ([a.format(vol=vol) for a in c] for c in COMMANDS)]
        for args, future in runs:
            res = future.result()
            lines = res.err.strip().splitlines()
            assert res.code == 1, (args, res)
            assert len(lines) == 1, (args, res.err)
            assert str(vol / names) in lines[0], (args, lines[0])
            assert "internal error" not in res.err and "Traceback" not in res.err, res.err
        assert fingerprint(vol) == before
    finally:
        for pidfile in vol.rglob("nbdkit.pid"):  # a server that should not have started
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_the_pristine_volume_passes_every_command(pristine, tmp_path):
    vol = tmp_path / "v"
    shutil.copytree(pristine, vol, symlinks=True)
    assert run_cli("info", vol, "--json").json()["size"] == SIZE
    assert [s["name"] for s in run_cli("snapshot", "list", vol, "--json").json()["snapshots"]] \
        == ["s1", "s2"]
