"""A write that failed for lack of space must not cost a later write its mark.

A map write that fails (ENOSPC, EIO) used to leave its regions counted as
written: every later write to them skipped persisting, and the region was
never marked on disk although its data landed. These run the real CLI and a
real nbdkit against a small tmpfs that really fills up.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import nbd
import numpy as np
import pytest

from tests.conftest import Served, fill, mounted_tmpfs, run_cli

pytestmark = pytest.mark.integration

MiB = 1 << 20
RS = 4096
AT = 200 * MiB  # the write's offset in a 256 MiB volume
REGION = AT // RS


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A 64 MiB tmpfs for this test only; servers on it are stopped before it is unmounted."""
    with mounted_tmpfs(tmp_path / "tmpfs", "64M") as mnt:
        yield mnt


def refused_then_marked(vol, h, filler, data: bytes) -> None:
    """The write at AT fails on the full filesystem; with space freed it is written again;
    after a clean stop its region is marked, once, and holds the data."""
    write_fails_with_enospc(h, data, AT)
    filler.unlink()
    h.pwrite(data, AT)
    h.flush()
    h.shutdown()
    run_cli("stop", vol)
    assert_marked_once(vol, data)


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
    refused_then_marked(vol, h, fill(tmpfs), b"x" * RS)


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
    refused_then_marked(vol, s.connect(), filler, b"y" * RS)
