"""ext4 on an async primary through several cycles: at each boundary the secondary's
consistent image passes e2fsck, mounts, and holds that point's files; a secondary killed
mid-cycle still exports a clean filesystem, and resumes. One ``serve --consistent`` runs
throughout: each attach is a new connection, which sees the newest committed cycle."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli, wait_until
from tests.integration.test_async_cli import consistent  # noqa: F401 - fixture
from tests.integration.test_replication_cli_faults import mirror  # noqa: F401 - fixture
from tests.mount.test_ext4 import sh, tree_digest

pytestmark = pytest.mark.mount


def check_consistent_image(attach, sock: Path, where: Path, want: dict[str, str]) -> None:
    """Attach the consistent export (a new connection: the newest image), fsck it, mount
    it, compare its files."""
    dev = attach(sock)
    fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True,
                          timeout=120)
    assert fsck.returncode == 0, f"{fsck.stdout}{fsck.stderr}"
    mnt = where / f"mnt-{len(list(where.glob('mnt-*')))}"
    mnt.mkdir()
    sh("mount", "-o", "ro,noload", dev, str(mnt))
    attach.mounts.append(mnt)
    assert tree_digest(mnt) == want
    sh("umount", str(mnt))
    attach.mounts.remove(mnt)
    run_cli("detach", dev)
    attach.devices.remove(dev)


def cycle_at_a_clean_point(m, mnt: Path) -> dict[str, str]:
    """Freeze the filesystem, run a cycle to its commit, thaw; the files of that point."""
    sh("sync", "-f", str(mnt))
    sh("fsfreeze", "-f", str(mnt))
    try:
        want = tree_digest(mnt)  # reads only: fine on a frozen filesystem
        run_cli("sync", m.primary.vol, "--wait", "--timeout", "60")
    finally:
        sh("fsfreeze", "-u", str(mnt))
    return want


def test_ext4_through_cycles_and_a_secondary_killed_mid_cycle(mirror, consistent, attach,  # noqa: F811
                                                               tmp_path):
    m = mirror(proxy=True)
    m.primary.start(m.peer, "async", "--interval", "0")
    dev = attach(m.primary.vol)
    sh("mkfs.ext4", "-q", "-F", dev)
    mnt = tmp_path / "live"
    mnt.mkdir()
    sh("mount", dev, str(mnt))
    attach.mounts.append(mnt)

    (mnt / "dir").mkdir()
    for i in range(10):
        (mnt / "dir" / f"f{i}").write_bytes(os.urandom(5000 + 999 * i))
    points = [cycle_at_a_clean_point(m, mnt)]
    sock = tmp_path / "consistent.sock"
    consistent(m.secondary.vol, "--socket", sock)
    check_consistent_image(attach, sock, tmp_path, points[-1])

    # written, renamed, deleted between cycles
    (mnt / "dir" / "f3").rename(mnt / "renamed")
    (mnt / "dir" / "f5").unlink()
    (mnt / "big.bin").write_bytes(os.urandom(6 << 20))
    points.append(cycle_at_a_clean_point(m, mnt))
    check_consistent_image(attach, sock, tmp_path, points[-1])

    shutil.rmtree(mnt / "dir")
    (mnt / "big.bin").write_bytes(os.urandom(6 << 20))
    (mnt / "again").write_text("third point\n")
    sh("sync", "-f", str(mnt))
    # The secondary dies in the middle of the next cycle: its consistent image is still
    # the last committed point, a clean filesystem.
    m.proxy.delay(0.02)
    run_cli("sync", m.primary.vol)
    wait_until(lambda: m.primary.replication()["cycle"]["conveyed_regions"] > 0, 30,
               "the cycle to be under way", interval=0.01)
    m.secondary.kill()
    check_consistent_image(attach, sock, tmp_path, points[-1])
    # Restarted, it takes the rest of the cycle; then the newest point is there.
    m.proxy.delay(0)
    m.secondary.start()
    points.append(cycle_at_a_clean_point(m, mnt))
    check_consistent_image(attach, sock, tmp_path, points[-1])
    assert points[0] != points[1] != points[2]
