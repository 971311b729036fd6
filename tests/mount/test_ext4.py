"""A real block device: attach, mkfs.ext4, mount, write, and everything survives a restart."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.mount


def sh(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=120,
                          **kw)


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_files(root: Path) -> None:
    (root / "dir" / "deeper").mkdir(parents=True)
    (root / "hello.txt").write_text("hello, replicated world\n")
    for i in range(20):
        (root / "dir" / f"small-{i}").write_bytes(os.urandom(1000 + i * 517))
    (root / "dir" / "deeper" / "big.bin").write_bytes(os.urandom(12 << 20))


def ext4_with_files(serve, attach, mnt: Path):
    """Serve a new volume, attach it, make ext4, mount it on ``mnt`` and write files."""
    s = serve(size="128M")
    dev = attach(s.vol)
    assert dev.startswith("/dev/")
    assert Path(dev).is_block_device()
    sh("mkfs.ext4", "-q", "-F", dev)
    mnt.mkdir()
    sh("mount", dev, str(mnt))
    attach.mounts.append(mnt)
    write_files(mnt)
    return s, dev


def test_ext4_survives_detach_stop_serve_attach(serve, attach, cli, tmp_path):
    mnt = tmp_path / "mnt"
    s, dev = ext4_with_files(serve, attach, mnt)
    before = tree_digest(mnt)
    sh("sync", "-f", str(mnt / "hello.txt"))
    assert cli("status", s.vol, "--json").json()["stats"]["bytes_written"] > 12 << 20

    # detach refuses while mounted, and changes nothing
    res = cli("detach", dev, check=False)
    assert res.code == 1 and "mounted" in res.err and len(res.err.strip().splitlines()) == 1
    # stop refuses while attached
    res = cli("stop", s.vol, check=False)
    assert res.code == 1 and "attached" in res.err

    sh("umount", str(mnt))
    attach.mounts.remove(mnt)
    cli("detach", dev)
    attach.devices.remove(dev)
    cli("stop", s.vol)
    assert not (s.vol / "nbdkit.pid").exists()

    s.start()
    dev2 = attach(s.vol)
    fsck = subprocess.run(["e2fsck", "-fn", dev2], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    sh("mount", "-o", "ro", dev2, str(mnt))
    attach.mounts.append(mnt)
    assert tree_digest(mnt) == before
    assert (mnt / "hello.txt").read_text() == "hello, replicated world\n"


def test_detach_of_unknown_device_is_one_clear_line(cli):
    res = cli("detach", "/dev/loop999", check=False)
    assert res.code == 1 and "not attached by nbdmirror" in res.err
    assert len(res.err.strip().splitlines()) == 1


def test_attach_unserved_volume_fails_cleanly(make_volume, cli):
    vol = make_volume(size="16M")
    res = cli("attach", vol, check=False)
    assert res.code == 1 and "not being served" in res.err and "Traceback" not in res.err


def test_attach_over_tcp_gives_a_device_of_the_volume_size(make_volume, cli, attach):
    import socket as _socket

    vol = make_volume(size="24M")
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli("serve", vol, "--port", port, "--background")
    try:
        dev = attach(vol)
        size = int(sh("blockdev", "--getsize64", dev).stdout)
        assert size == 24 << 20
        with open(dev, "r+b", buffering=0) as f:
            f.seek(5 << 20)
            f.write(b"over tcp" * 512)
            os.fsync(f.fileno())
        cli("detach", dev)
        attach.devices.remove(dev)
        assert (vol / "data.img").read_bytes()[5 << 20:(5 << 20) + 8] == b"over tcp"
    finally:
        cli("stop", vol, "--force", check=False)
