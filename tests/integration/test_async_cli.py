"""Async mirroring through the commands: `serve --mode async` (nbdkit) and `receive` as real
processes on loopback TCP, `nbdmirror sync [--wait]`, faults made from outside (the proxy,
SIGKILL). The volumes and helpers are test_replication_cli_faults's (``mirror``)."""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from tests.conftest import NBDMIRROR, run_cli, wait_until
from tests.integration.test_replication_cli_faults import SIZE, fio_verified_randwrite

pytestmark = pytest.mark.integration


def fill(m, seed: int) -> bytes:
    """The primary's whole volume written with random bytes, through NBD."""
    data = random.Random(seed).randbytes(SIZE)
    src = m.where / "src.img"
    src.write_bytes(data)
    subprocess.run(["nbdcopy", str(src), f"nbd+unix:///?socket={m.primary.vol / 'nbd.sock'}"],
                   check=True, timeout=60)
    return data


def cycle_under_way(m, seed: int, regions: int) -> bytes:
    """The primary serving async, filled, a cycle slowed by the proxy (20 ms each way)
    and at least ``regions`` of it conveyed; returns what was written."""
    m.primary.start(m.peer, "async", "--interval", "0")
    data = fill(m, seed)
    m.proxy.delay(0.02)
    sync(m)
    wait_until(lambda: m.primary.replication()["cycle"]["conveyed_regions"] >= regions, 30,
               "part of the cycle to be conveyed", interval=0.01)
    return data


def sync(m, *args: str, check: bool = True):
    return run_cli("sync", m.primary.vol, *args, check=check, timeout=120)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
def test_the_initial_sync_runs_under_fio_and_sync_wait_leaves_them_identical(mirror):
    m = mirror()
    m.primary.start(m.peer, "async", "--interval", "0")
    fill(m, seed=1)
    assert sync(m, "--json").json()["cycle"] == 1  # the initial sync starts
    fio_verified_randwrite(m.primary)
    res = sync(m, "--wait", "--json").json()
    assert res["committed"] and res["committed_cycle"] >= res["cycle"] >= 2
    rep = m.primary.replication()
    assert rep["state"] == "in-sync" and rep["marked_regions"] == 0, rep
    assert m.differing_regions() == []
    assert m.secondary.replication()["committed_cycle"] == res["committed_cycle"]


def test_sync_wait_shows_plain_progress_and_gives_up_after_its_timeout(mirror):
    m = mirror(proxy=True)
    m.primary.start(m.peer, "async", "--interval", "0")
    fill(m, seed=2)
    m.proxy.stall()  # the cycle cannot finish while the link takes nothing
    res = sync(m, "--wait", "--timeout", "1.5", check=False)
    assert res.code == 1
    lines = res.err.strip().splitlines()
    assert lines[0].startswith("cycle 1: "), res.err  # a plain line, not a bar
    assert lines[-1].startswith("Error: cycle 1 did not commit within 1.5s"), res.err
    m.proxy.resume()
    sync(m, "--wait")  # the link may have been dropped meanwhile: it resumes
    assert m.differing_regions() == []


def test_a_primary_killed_mid_cycle_resumes_it_without_sending_conveyed_regions_again(mirror):
    m = mirror(proxy=True)
    cycle_under_way(m, seed=3, regions=64)
    before = m.primary.replication()["cycle"]
    m.primary.kill()
    assert (m.primary.vol / "cycle").is_dir()
    m.proxy.delay(0)
    m.primary.start(m.peer, "async", "--interval", "0")
    sync(m, "--wait")  # the resumed cycle 1, then cycle 2
    after = m.primary.replication()
    assert m.differing_regions() == []
    assert after["committed_cycle"] == 2
    # the resumed cycle sent what had not been acknowledged before the kill, no more, and
    # the next one nothing (nothing was written after the take)
    assert after["regions_conveyed"] <= before["regions"] - before["conveyed_regions"], (
        before, after)
    assert not (m.primary.vol / "cycle").exists()


def test_status_of_both_sides_in_async_mode(mirror):
    m = mirror()
    m.primary.start(m.peer, "async", "--interval", "0")
    fill(m, seed=4)
    sync(m, "--wait")
    text = run_cli("status", m.primary.vol).out
    assert "replication: async to" in text and "committed: cycle 1" in text, text
    rep = run_cli("status", m.primary.vol, "--json").json()["replication"]
    assert {"mode", "state", "committed_cycle", "last_consistent_at", "lag_s", "cycle",
            "bytes_conveyed", "marked_regions", "interval"} <= set(rep), rep
    assert rep["bytes_conveyed"] == SIZE and rep["cycle"]["state"] == "idle"
    last = rep["last_cycle"]
    assert last["number"] == 1 and last["bytes"] == SIZE and last["seconds"] > 0, last
    text = run_cli("status", m.secondary.vol).out
    assert "(async)" in text and "committed: cycle 1" in text, text


@pytest.mark.parametrize("args, message", [
    (["--mode", "sync", "--interval", "5"], "--interval is for --mode async only"),
    (["--mode", "async", "--interval", "-1"], "interval '-1'"),
    (["--mode", "async", "--interval", "soon"], "interval 'soon'"),
    (["--interval", "5"], "--interval needs --replicate-to"),
])
def test_bad_interval_options_are_refused_in_one_line(tmp_path, args, message):
    run_cli("create", tmp_path / "v", "--size", "4M")
    extra = [] if "--mode" not in args else ["--replicate-to", "127.0.0.1:9"]
    res = run_cli("serve", tmp_path / "v", *extra, *args, check=False)
    assert res.code == 2 and message in res.err, res.err
    assert "Traceback" not in res.err


def test_sync_refuses_volumes_not_mirrored_async(mirror, tmp_path):
    run_cli("create", tmp_path / "idle", "--size", "4M")
    res = run_cli("sync", tmp_path / "idle", check=False)
    assert res.code == 1 and "is not being served" in res.err, res.err
    m = mirror()
    m.primary.start(m.peer, "semi-async")
    res = sync(m, check=False)
    assert res.code == 1 and "not mirrored in async mode (semi-async mode)" in res.err
    res = run_cli("sync", m.secondary.vol, check=False)
    assert res.code == 1 and "not mirrored in async mode" in res.err, res.err
    res = sync(m, "--timeout", "3", check=False)
    assert res.code == 2 and "--timeout needs --wait" in res.err
    assert NBDMIRROR  # the real command ran every time


def test_a_cycle_left_open_is_dropped_by_a_server_in_another_mode(mirror):
    """Served in semi-async mode, writes would not copy on write into the open cycle's
    image: it is dropped (its regions stay marked, and the resync carries them), never
    resumed stale by a later async server."""
    m = mirror(proxy=True)
    m.primary.start(m.peer, "async", "--interval", "0")
    fill(m, seed=5)
    m.proxy.stall()
    sync(m)
    wait_until(lambda: m.primary.replication()["cycle"]["state"] == "conveying", 30,
               "the cycle to start", interval=0.01)
    m.primary.kill()
    assert (m.primary.vol / "cycle").is_dir()
    m.proxy.resume()
    m.primary.start(m.peer, "semi-async")
    assert not (m.primary.vol / "cycle").exists()
    h = m.primary.connect()
    for i in range(64):  # new data over what the open cycle had frozen
        h.pwrite(bytes([i + 1]) * 65536, i * 65536 * 3)
    h.flush()
    h.shutdown()
    m.wait_in_sync()
    m.primary.stop()
    m.primary.start(m.peer, "async", "--interval", "0")
    sync(m, "--wait")
    assert m.differing_regions() == []
    assert "left open; dropped" in m.primary.log.read_text()  # said at start, on stderr


def test_serve_consistent_exports_the_last_committed_cycle_while_the_next_arrives(mirror):
    import nbd

    m = mirror(proxy=True)
    m.primary.start(m.peer, "async", "--interval", "0")
    first = fill(m, seed=6)
    sync(m, "--wait")
    sock = m.where / "consistent.sock"
    out = run_cli("serve", m.secondary.vol, "--consistent", "--socket", sock, "--background",
                  "--json").json()
    try:
        second = random.Random(7).randbytes(SIZE)
        src = m.where / "second.img"
        src.write_bytes(second)
        subprocess.run(["nbdcopy", str(src),
                        f"nbd+unix:///?socket={m.primary.vol / 'nbd.sock'}"],
                       check=True, timeout=60)
        m.proxy.delay(0.01)
        sync(m)  # cycle 2 arrives while a reader reads cycle 1
        h = nbd.NBD()
        h.connect_unix(str(sock))
        assert h.is_read_only()
        got = b"".join(h.pread(1 << 20, off) for off in range(0, SIZE, 1 << 20))
        assert got == first
        m.proxy.delay(0)
        sync(m, "--wait")
        got = b"".join(h.pread(1 << 20, off) for off in range(0, SIZE, 1 << 20))
        assert got == first  # the same point in time, for as long as it is connected
        h.shutdown()
        assert m.differing_regions() == []
    finally:
        run_cli("snapshot", "stop", m.secondary.vol, "cycle-1", "--force", check=False)
    assert out["snapshot"] == "cycle-1"
    # a new export shows the newest cycle
    newest = m.primary.replication()["committed_cycle"]
    out = run_cli("serve", m.secondary.vol, "--consistent", "--socket", sock, "--background",
                  "--json").json()
    run_cli("snapshot", "stop", m.secondary.vol, out["snapshot"])
    assert out["snapshot"] == f"cycle-{newest}" and newest >= 2


def test_serve_consistent_refuses_what_has_no_consistent_image(mirror, tmp_path):
    run_cli("create", tmp_path / "plain", "--size", "4M")
    res = run_cli("serve", tmp_path / "plain", "--consistent", check=False)
    assert res.code == 1 and "is not a secondary" in res.err, res.err
    m = mirror()
    m.primary.start(m.peer, "semi-async")  # paired: a secondary, with no cycle
    res = run_cli("serve", m.secondary.vol, "--consistent", check=False)
    assert res.code == 1 and "no consistent image yet" in res.err, res.err
    res = run_cli("serve", m.secondary.vol, "--consistent", "--mode", "async", check=False)
    assert res.code == 2, res.err


def test_restarting_in_another_mode_carries_on_without_a_full_copy(mirror):
    """semi-async -> async -> semi-async on the same pair: after each switch only what was
    written meanwhile travels (counted by the primary), never the whole volume."""
    m = mirror()
    m.primary.start(m.peer, "semi-async")
    fill(m, seed=12)
    m.wait_in_sync()
    m.primary.stop()
    wait_until(lambda: m.secondary.replication()["marked_regions"] == 0, 30,
               "the secondary to sweep what it applied", interval=0.05)
    m.primary.start(m.peer, "async", "--interval", "0")
    h = m.primary.connect()
    h.pwrite(b"A" * 65536 * 4, 0)  # 4 regions written in async mode
    h.shutdown()
    sync(m, "--wait")
    rep = m.primary.replication()
    assert rep["bytes_conveyed"] <= 4 * 65536, rep  # not the 32 MiB volume again
    assert m.differing_regions() == []
    m.primary.stop()
    m.primary.start(m.peer, "semi-async")
    h = m.primary.connect()
    h.pwrite(b"B" * 65536, 65536 * 10)
    h.flush()
    h.shutdown()
    rep = m.wait_in_sync()
    assert rep["resync"]["regions"] <= 4, rep["resync"]  # nothing left over from async
