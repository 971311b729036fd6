"""ext4 on the live volume, snapshot, keep writing: the snapshot export mounts as it was."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.mount.test_ext4 import ext4_with_files, sh, tree_digest

pytestmark = pytest.mark.mount


def test_snapshot_of_mounted_ext4_is_clean_and_reads_back(serve, attach, cli, tmp_path):
    mnt = tmp_path / "live"
    s, _dev = ext4_with_files(serve, attach, mnt)
    before = tree_digest(mnt)

    # freeze the filesystem around the snapshot, as one would for a backup
    sh("fsfreeze", "-f", str(mnt))
    try:
        cli("snapshot", "create", s.vol, "backup")
    finally:
        sh("fsfreeze", "-u", str(mnt))

    # keep writing: change, delete and add files on the live filesystem
    (mnt / "hello.txt").write_text("changed after the snapshot\n")
    shutil.rmtree(mnt / "dir" / "deeper")
    (mnt / "new.bin").write_bytes(os.urandom(8 << 20))
    sh("sync")
    assert tree_digest(mnt) != before

    cli("snapshot", "serve", s.vol, "backup", "--background")
    try:
        snap_dev = attach(s.vol / "snapshots" / "backup" / "nbd.sock")
        fsck = subprocess.run(["e2fsck", "-fn", snap_dev], capture_output=True, text=True,
                              timeout=120)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        smnt = tmp_path / "snap"
        smnt.mkdir()
        sh("mount", "-o", "ro,noload", snap_dev, str(smnt))
        attach.mounts.append(smnt)
        assert tree_digest(smnt) == before
        assert (smnt / "hello.txt").read_text() == "hello, replicated world\n"
        sh("umount", str(smnt))
        attach.mounts.remove(smnt)
        cli("detach", snap_dev)
        attach.devices.remove(snap_dev)
    finally:
        cli("snapshot", "stop", s.vol, "backup", check=False)
