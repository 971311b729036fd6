"""A write that failed for lack of space must not cost a later write its mark.

A map write that fails (ENOSPC, EIO) used to leave its regions counted as
written: every later write to them skipped persisting, and the region was
never marked on disk although its data landed. These run the real CLI and a
real nbdkit against a small tmpfs that really fills up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nbd
import numpy as np
import pytest

from tests.conftest import Served, _kill_server, run_cli

pytestmark = pytest.mark.integration

MiB = 1 << 20
RS = 4096
AT = 200 * MiB  # the write's offset in a 256 MiB volume
REGION = AT // RS


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A 64 MiB tmpfs for this test only; servers on it are stopped before it is unmounted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        for vol in (p.parent for p in tmp_path.rglob("nbdkit.pid")):
            run_cli("stop", vol, "--force", check=False, timeout=60)
            _kill_server(vol)
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path) -> Path:
    """Fill the filesystem at ``mnt`` to the last byte; return the file that holds it."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (b"\xff" * MiB, b"\xff" * 4096, b"\xff"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
    finally:
        os.close(fd)
    return filler


def write_fails_with_enospc(h, data: bytes, offset: int) -> None:
    with pytest.raises(nbd.Error) as err:
        h.pwrite(data, offset)
    assert err.value.errnum == errno.ENOSPC, err.value


def assert_marked_once(vol: Path, data: bytes) -> None:
    info = run_cli("info", vol, "--json").json()
    assert info["marked_regions"] == 1, info
    marks = np.fromfile(vol / "marks.map", dtype=np.uint8)
    assert np.flatnonzero(marks).tolist() == [REGION]
    with open(vol / "data.img", "rb") as f:
        assert os.pread(f.fileno(), len(data), AT) == data


def test_a_write_refused_on_a_full_filesystem_is_marked_once_it_succeeds(tmpfs):
    """The tester's report: volume, map and data all on the filesystem that fills up."""
    vol = tmpfs / "v"
    run_cli("create", vol, "--size", "256M", "--region-size", "4K")
    s = Served(vol).start()
    h = s.connect()
    filler = fill(tmpfs)
    data = b"x" * RS
    write_fails_with_enospc(h, data, AT)
    filler.unlink()
    h.pwrite(data, AT)
    h.flush()
    h.shutdown()
    run_cli("stop", vol)
    assert_marked_once(vol, data)


def test_a_map_write_that_fails_with_enospc_is_tried_again_by_the_next_write(tmpfs, tmp_path):
    """The map alone on the full filesystem, sparse as an older create left it: the map
    write itself fails (preallocation at open cannot help), and must not be trusted."""
    vol = tmp_path / "v"
    run_cli("create", vol, "--size", "256M", "--region-size", "4K")
    marks = vol / "marks.map"
    regions = marks.stat().st_size
    marks.unlink()
    with open(tmpfs / "marks.map", "wb") as f:
        f.truncate(regions)  # sparse: the first write to each page needs space
    marks.symlink_to(tmpfs / "marks.map")
    filler = fill(tmpfs)
    s = Served(vol).start()
    h = s.connect()
    data = b"y" * RS
    write_fails_with_enospc(h, data, AT)
    filler.unlink()
    h.pwrite(data, AT)
    h.flush()
    h.shutdown()
    run_cli("stop", vol)
    assert_marked_once(vol, data)
