"""Snapshots of served volumes, through real nbdkit processes and libnbd."""

from __future__ import annotations

import random
import struct
import subprocess
import threading

import nbd
import numpy as np
import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.integration

MiB = 1 << 20


def connect(socket):
    h = nbd.NBD()
    h.connect_unix(str(socket))
    return h


def read_all(h) -> bytes:
    size = h.get_size()
    return b"".join(h.pread(min(4 * MiB, size - off), off) for off in range(0, size, 4 * MiB))


@pytest.fixture
def snap_exports(cli):
    served = []

    def start(vol, name):
        cli("snapshot", "serve", vol, name, "--background")
        served.append((vol, name))
        return vol / "snapshots" / name / "nbd.sock"

    yield start
    for vol, name in served:
        cli("snapshot", "stop", vol, name, check=False)


def test_snapshot_export_reads_back_the_volume_at_creation(serve, cli, snap_exports, tmp_path):
    s = serve(size="32M", region_size="64K")
    h = s.connect()
    rng = np.random.default_rng(5)
    h.pwrite(rng.integers(0, 256, 20 * MiB, dtype=np.uint8).tobytes(), 3 * MiB)
    h.flush()
    made = cli("snapshot", "create", s.vol, "before", "--json").json()
    assert made["name"] == "before"
    image = read_all(h)
    (tmp_path / "before.raw").write_bytes(image)
    # overwrite: unaligned writes, trims and zeroes over preserved and fresh regions
    for _ in range(200):
        off = int(rng.integers(0, 32 * MiB - 70000))
        h.pwrite(rng.integers(0, 256, int(rng.integers(1, 70000)), dtype=np.uint8).tobytes(), off)
    h.trim(MiB, 4 * MiB)
    h.zero(MiB + 4096, 10 * MiB + 512)
    assert read_all(h) != image
    sock = snap_exports(s.vol, "before")
    sh = connect(sock)
    assert sh.is_read_only()
    assert read_all(sh) == image
    with pytest.raises(nbd.Error):
        sh.pwrite(b"no", 0)
    # qemu-img agrees byte for byte with the copy taken at creation
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                          str(tmp_path / "before.raw"), f"nbd+unix:///?socket={sock}"],
                         capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    listed = cli("snapshot", "list", s.vol, "--json").json()["snapshots"]
    assert [x["name"] for x in listed] == ["before"]
    assert listed[0]["served"] is True and listed[0]["bytes_preserved"] > 0
    st = cli("status", s.vol, "--json").json()
    assert st["snapshots"] == 1 and st["cow_regions_copied"] == listed[0]["preserved_regions"]
    sh.shutdown()


def test_snapshot_errors_are_one_line_and_change_nothing(serve, cli, snap_exports):
    s = serve(size="8M")
    cli("snapshot", "create", s.vol, "one")

    def listing():
        return [(x["name"], x["seq"]) for x in
                cli("snapshot", "list", s.vol, "--json").json()["snapshots"]]

    before = listing()
    snap_exports(s.vol, "one")
    cases = [
        (("snapshot", "create", s.vol, "one"), "already exists"),
        (("snapshot", "delete", s.vol, "nope"), "no snapshot named"),
        (("snapshot", "create", s.vol, "a/b"), "path separator"),
        (("snapshot", "create", s.vol, "chain.seq"), "reserved"),
        (("snapshot", "delete", s.vol, "chain.seq"), "reserved"),
        (("snapshot", "serve", s.vol, "chain.seq", "--background"), "reserved"),
        (("snapshot", "delete", s.vol, "../one"), "path separator"),
        (("snapshot", "serve", s.vol, "nope", "--background"), "no snapshot named"),
        (("snapshot", "delete", s.vol, "one"), "being served"),
        (("snapshot", "serve", s.vol, "one", "--background"), "already being served"),
    ]
    for args, message in cases:
        res = cli(*args, check=False)
        assert res.code == 1, args
        lines = res.err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, res.err)
        assert listing() == before
    cli("snapshot", "stop", s.vol, "one")
    cli("snapshot", "delete", s.vol, "one")
    assert listing() == []
    assert cli("snapshot", "list", s.vol, "--json").json()["snapshots"] == []


def test_snapshot_of_stopped_volume_and_chain_through_exports(make_volume, cli, snap_exports,
                                                               serve):
    vol = make_volume(size="8M", region_size="4K")
    images = {}
    s = serve(vol)
    h = s.connect()
    for i, name in enumerate(["a", "b", "c"]):
        h.pwrite(bytes([i + 1]) * (2 * MiB), i * MiB)
        h.flush()
        if name == "b":  # one snapshot taken while the volume is stopped
            h.shutdown()
            cli("stop", vol)
            cli("snapshot", "create", vol, name)
            s.start()
            h = s.connect()
        else:
            cli("snapshot", "create", vol, name)
        images[name] = read_all(h)
    h.pwrite(b"\xff" * (8 * MiB), 0)
    h.flush()
    cli("snapshot", "delete", vol, "b")
    for name in ("a", "c"):
        sh = connect(snap_exports(vol, name))
        assert read_all(sh) == images[name], name
        sh.shutdown()


def test_snapshot_under_concurrent_writes_is_a_consistent_point(serve, cli, snap_exports):
    """Each 4K block carries (block, seq); one writer owns each block and writes it in order.

    The snapshot must hold, for every block, a write that was sent before the
    snapshot was acknowledged, and no older than the last write acknowledged
    before the snapshot was requested.
    """
    size = 16 * MiB
    blocks = size // 4096
    s = serve(size="16M", region_size="64K")
    writers = 4
    acked = np.zeros(blocks, dtype=np.int64)  # last acknowledged seq per block
    sent = np.zeros(blocks, dtype=np.int64)  # last sent seq per block
    stop = threading.Event()
    errors = []

    def writer(k):
        h = s.connect()
        rnd = random.Random(k)
        mine = list(range(k, blocks, writers))
        seq = 0
        try:
            while not stop.is_set():
                seq += 1
                b = rnd.choice(mine)
                sent[b] = seq
                h.pwrite(struct.pack("<QQ", b, seq) * 256, b * 4096)
                acked[b] = seq
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
        finally:
            h.shutdown()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    wait_until(lambda: int((acked > 0).sum()) >= blocks // 2 or errors, what="writes to land")
    floor = acked.copy()
    cli("snapshot", "create", s.vol, "mid")
    ceiling = sent.copy()
    # keep writing: copy-on-write must protect the snapshot
    wait_until(lambda: int((acked > ceiling).sum()) >= blocks // 4 or errors,
               what="writes after the snapshot")
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors
    sh = connect(snap_exports(s.vol, "mid"))
    data = read_all(sh)
    sh.shutdown()
    checked = 0
    for b in range(blocks):
        block = data[b * 4096:(b + 1) * 4096]
        if block == bytes(4096):
            assert floor[b] == 0, f"block {b} lost acknowledged write {floor[b]}"
            continue
        ident, seq = struct.unpack_from("<QQ", block)
        assert block == struct.pack("<QQ", ident, seq) * 256, f"block {b} is torn"
        assert ident == b
        assert floor[b] <= seq <= ceiling[b], (b, floor[b], seq, ceiling[b])
        checked += 1
    assert checked > blocks // 4
    assert int((acked > ceiling).sum()) > 0, "no write landed after the snapshot: test too weak"


def test_sigkill_during_copy_on_write_keeps_snapshots_and_live_exact(serve, cli, snap_exports):
    size = 64 * MiB
    s = serve(size="64M", region_size="256K")
    h = s.connect()
    rng = np.random.default_rng(11)
    h.pwrite(rng.integers(0, 256, size, dtype=np.uint8).tobytes(), 0)
    h.flush()
    images = {}
    for round_ in range(3):
        # a fresh snapshot each round, so the writes below start with copies to make
        name = f"r{round_}"
        cli("snapshot", "create", s.vol, name)
        images[name] = read_all(h)
        h.shutdown()
        acked: dict[int, bytes] = {}
        lock = threading.Lock()

        def writer(k, round_=round_, acked=acked, lock=lock):
            # every block is written at most once per round, so an acknowledged block must
            # read back exactly as written
            c = s.connect()
            mine = list(range(k, size // 4096, 4))
            random.Random(round_ * 10 + k).shuffle(mine)
            try:
                for block in mine:
                    payload = struct.pack("<QQ", round_, block) * 256
                    c.pwrite(payload, block * 4096)
                    with lock:
                        acked[block * 4096] = payload
            except nbd.Error:
                return

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        # kill while copies are being made: some, not all, blocks of this round written
        wait_until(lambda round_=round_, acked=acked: len(acked) >= 200 * (round_ + 1),
                   what="acknowledged writes")
        s.kill()
        for t in threads:
            t.join(30)
        assert acked, "no write was acknowledged before the kill"
        s.start()
        h = s.connect()
        for off, payload in acked.items():
            assert h.pread(4096, off) == payload, f"acknowledged write at {off} lost"
        for name, image in images.items():
            sh = connect(snap_exports(s.vol, name))
            assert read_all(sh) == image, f"snapshot {name} changed after SIGKILL {round_}"
            sh.shutdown()
            cli("snapshot", "stop", s.vol, name)


def test_deleting_snapshots_under_concurrent_writes_keeps_the_others_exact(serve, cli,
                                                                          snap_exports):
    size = 16 * MiB
    s = serve(size="16M", region_size="64K")
    h = s.connect()
    rng = np.random.default_rng(3)
    h.pwrite(rng.integers(0, 256, size, dtype=np.uint8).tobytes(), 0)
    h.flush()
    images = {}
    for name in ("a", "b", "c"):
        cli("snapshot", "create", s.vol, name)
        images[name] = read_all(h)
        for _ in range(50):
            h.pwrite(rng.integers(0, 256, 8192, dtype=np.uint8).tobytes(),
                     int(rng.integers(0, size // 4096 - 2)) * 4096)
    h.shutdown()
    stop = threading.Event()
    errors = []
    written = [0] * 4

    def writer(k):
        c = s.connect()
        r = random.Random(k)
        try:
            while not stop.is_set():
                c.pwrite(r.randbytes(4096), r.randrange(0, size // 4096) * 4096)
                written[k] += 1
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
        finally:
            c.shutdown()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    def some_writes() -> None:
        start = sum(written)
        wait_until(lambda: sum(written) >= start + 200 or errors, what="concurrent writes")

    try:
        some_writes()
        cli("snapshot", "delete", s.vol, "b")  # an older one: writes never pause
        some_writes()
        cli("snapshot", "delete", s.vol, "c")  # the newest: copies move while writes go on
        some_writes()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors
    sh = connect(snap_exports(s.vol, "a"))
    assert read_all(sh) == images["a"]
    sh.shutdown()
    assert [x["name"] for x in cli("snapshot", "list", s.vol, "--json").json()["snapshots"]] \
        == ["a"]
