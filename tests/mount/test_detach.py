"""Attached exports: stops refuse while a device reaches them; detach outlives a dead server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.test_serve_cli import one_line_error
from volume_core.server_files import pid_alive

pytestmark = pytest.mark.mount


def fuse_mounted(mountpoint: Path) -> bool:
    """In the mount table, dead or alive (os.path.ismount is false on a dead FUSE mount)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


def loop_backed(device: str) -> bool:
    return Path(f"/sys/block/{Path(device).name}/loop/backing_file").exists()


def test_detach_after_the_server_was_killed_leaves_no_dead_mount(serve, attach, cli):
    s = serve(size="16M")
    record = cli("attach", s.vol, "--json").json()
    attach.devices.append(record["device"])
    mountpoint = Path(record["fuse_mountpoint"])
    assert fuse_mounted(mountpoint) and loop_backed(record["device"])
    s.kill()
    # the next read fails and takes nbdfuse down: its mount stays, dead
    read = subprocess.run(["dd", f"if={record['device']}", "of=/dev/null", "bs=4096",
                           "count=1", "iflag=direct"], capture_output=True, timeout=60)
    assert read.returncode != 0
    wait_until(lambda: not pid_alive(record["nbdfuse_pid"]), 30, "nbdfuse to exit")
    assert fuse_mounted(mountpoint) and not os.path.ismount(mountpoint)

    cli("detach", record["device"])
    attach.devices.remove(record["device"])
    assert not fuse_mounted(mountpoint), "a dead FUSE mount was left behind"
    assert not loop_backed(record["device"])
    assert not mountpoint.exists()


def test_stop_refuses_while_attached_by_socket(serve, attach, cli):
    s = serve(size="16M")
    dev = attach(s.socket)  # attach --socket: the record names the export, not the volume
    line = one_line_error(cli("stop", s.vol, check=False))
    assert f"attached as {dev}" in line, line
    assert cli("info", s.vol, "--json").json()["served"] is True


def test_snapshot_stop_and_delete_refuse_while_its_export_is_attached(serve, attach, cli):
    s = serve(size="16M")
    cli("snapshot", "create", s.vol, "snap")
    cli("snapshot", "serve", s.vol, "snap", "--background")
    snap = s.vol / "snapshots" / "snap"
    try:
        dev = attach(snap / "nbd.sock")
        for args in (("stop",), ("delete",)):
            line = one_line_error(cli("snapshot", *args, s.vol, "snap", check=False))
            assert f"attached as {dev}" in line, line
        assert (snap / "server.json").exists()

        cli("detach", dev)
        attach.devices.remove(dev)
        cli("snapshot", "stop", s.vol, "snap")
        cli("snapshot", "delete", s.vol, "snap")
    finally:
        cli("snapshot", "stop", s.vol, "snap", "--force", check=False)
