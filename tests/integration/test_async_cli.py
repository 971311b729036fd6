"""Async mirroring through the commands: `serve --mode async` (nbdkit) and `receive` as real
processes on loopback TCP, `nbdmirror sync [--wait]`, faults made from outside (the proxy,
SIGKILL). The volumes and helpers are test_replication_cli_faults's (``mirror``)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NBDMIRROR, run_cli, wait_until
from tests.integration.test_replication_cli_faults import SIZE, fio_verified_randwrite
from volume_core.server_files import pid_alive
from volume_core.volume import Volume

pytestmark = pytest.mark.integration


def fill(m, seed: int) -> bytes:
    """The primary's whole volume written with random bytes, through NBD."""
    data = random.Random(seed).randbytes(SIZE)
    src = m.where / "src.img"
    src.write_bytes(data)
    subprocess.run(["nbdcopy", str(src), f"nbd+unix:///?socket={m.primary.vol / 'nbd.sock'}"],
                   check=True, timeout=60)
    return data


def cycle_under_way(m, seed: int, regions: int, initial: bool = False) -> bytes:
    """The primary serving async, filled, a cycle slowed by the proxy (20 ms each way)
    and at least ``regions`` of it conveyed; returns what was written. ``initial``: that
    is the initial sync (the live pass); otherwise cycle 2, after an initial sync and a
    second fill (a frozen cycle, VOL/cycle)."""
    m.primary.start(m.peer, "async", "--interval", "0")
    data = fill(m, seed)
    if not initial:
        sync(m, "--wait")
        data = fill(m, seed + 1000)
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


@pytest.mark.parametrize("initial", [True, False], ids=["initial-sync", "cycle"])
def test_a_primary_killed_mid_cycle_resumes_it_without_sending_conveyed_regions_again(
        mirror, initial):
    m = mirror(proxy=True)
    cycle_under_way(m, seed=3, regions=64, initial=initial)
    before = m.primary.replication()
    m.primary.kill()
    assert (m.primary.vol / "cycle").is_dir() != initial  # the pass freezes nothing
    m.proxy.delay(0)
    m.primary.start(m.peer, "async", "--interval", "0")
    sync(m, "--wait")  # the resumed pass and cycle 1, or the resumed cycle 2 and cycle 3
    after = m.primary.replication()
    assert m.differing_regions() == []
    assert after["committed_cycle"] >= (1 if initial else 3)
    before = before["cycle"]
    # the resumed cycle sent what had not been acknowledged before the kill, no more, and
    # the next one nothing (nothing was written after the take)
    assert after["regions_conveyed"] <= before["regions"] - before["conveyed_regions"], (
        before, after)
    assert not (m.primary.vol / "cycle").exists()


def test_status_of_both_sides_in_async_mode(mirror):
    m = mirror()
    m.primary.start(m.peer, "async", "--interval", "0", "--max-rate", "64M")
    fill(m, seed=4)
    sync(m, "--wait")
    text = run_cli("status", m.primary.vol).out
    assert "replication: async to" in text and "committed: cycle 1" in text, text
    assert "(cycles on request, at most 64 MiB/s)" in text, text
    rep = run_cli("status", m.primary.vol, "--json").json()["replication"]
    assert {"mode", "state", "committed_cycle", "last_consistent_at", "lag_s", "cycle",
            "bytes_conveyed", "marked_regions", "interval", "max_rate_bps"} <= set(rep), rep
    assert rep["max_rate_bps"] == 64 << 20
    assert rep["bytes_conveyed"] == SIZE and rep["cycle"]["state"] == "idle"
    last, initial = rep["last_cycle"], rep["initial_sync"]
    assert last["number"] == 1 and last["seconds"] > 0, last
    assert initial["bytes"] + last["bytes"] == SIZE and initial["seconds"] > 0, initial
    assert "the volume as of" in run_cli("status", m.primary.vol).out
    text = run_cli("status", m.secondary.vol).out
    assert "(async)" in text and "committed: cycle 1, the volume as of" in text, text
    theirs = run_cli("status", m.secondary.vol, "--json").json()["replication"]
    assert theirs["last_consistent_at"] == rep["last_consistent_at"], (theirs, rep)
    assert theirs["lag_s"] >= 0 and theirs["cycle_rate_bps"] is None, theirs


@pytest.mark.parametrize("args, message", [
    (["--mode", "sync", "--interval", "5"], "--interval is for --mode async only"),
    (["--mode", "async", "--interval", "-1"], "interval '-1'"),
    (["--mode", "async", "--interval", "soon"], "interval 'soon'"),
    (["--interval", "5"], "--interval needs --replicate-to"),
    (["--mode", "semi-async", "--max-rate", "10M"], "--max-rate is for --mode async only"),
    (["--mode", "async", "--max-rate", "fast"], "invalid rate 'fast'"),
    (["--mode", "async", "--max-rate", "512K"], "invalid rate '512K': at least 1M"),
    (["--max-rate", "10M"], "--max-rate needs --replicate-to"),
])
def test_bad_interval_and_rate_options_are_refused_in_one_line(tmp_path, args, message):
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
    sync(m, "--wait")  # the initial sync and cycle 1: cycle 2 is a frozen one
    fill(m, seed=6)
    m.proxy.stall()
    sync(m)
    wait_until(lambda: m.primary.replication()["cycle"]["state"] == "conveying", 30,
               "cycle 2 to start", interval=0.01)
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


@pytest.fixture
def consistent() -> Iterator:
    """``consistent(VOL, *args, check=True)``: ``serve VOL --consistent --background --json``;
    every export it started is stopped (killed if need be) after the test."""
    started: list[Path] = []

    def start(vol: Path, *args: str, check: bool = True):
        res = run_cli("serve", vol, "--consistent", "--background", "--json", *args,
                      check=check)
        if res.code == 0:
            started.append(vol)
        return res

    yield start
    for vol in started:
        run_cli("stop", vol, "--consistent", "--force", check=False, timeout=60)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((vol / "consistent" / "nbdkit.pid").read_text()), signal.SIGKILL)


def read_all(h) -> bytes:
    return b"".join(h.pread(1 << 20, off) for off in range(0, SIZE, 1 << 20))


def connect(sock: Path):
    import nbd

    h = nbd.NBD()
    h.connect_unix(str(sock))
    return h


def images(vol: Path) -> dict[str, bool]:
    """The secondary's consistent images (name: held by a reader)."""
    found = run_cli("snapshot", "list", vol, "--json").json()["snapshots"]
    return {s["name"]: s["served"] for s in found if s["internal"]}


def test_each_consistent_connection_reads_the_newest_image_and_keeps_it_while_connected(
        mirror, consistent):
    m = mirror(proxy=True)
    m.primary.start(m.peer, "async", "--interval", "0")
    first = fill(m, seed=6)
    sync(m, "--wait")
    out = consistent(m.secondary.vol).json()
    sock = m.secondary.vol / "consistent" / "nbd.sock"
    assert out["consistent"] and out["snapshot"] is None, out
    assert out["listen"] == f"unix:{sock.absolute()}", out
    early = connect(sock)
    assert early.is_read_only()
    assert read_all(early) == first

    second = fill(m, seed=7)
    m.proxy.delay(0.02)
    assert sync(m, "--json").json()["cycle"] == 2  # its data lands in the staging log...
    wait_until(lambda: m.primary.replication()["cycle"]["conveyed_regions"] >= 64, 30,
               "part of cycle 2 to be conveyed", interval=0.01)
    m.proxy.stall()  # ...and cycle 2 cannot commit meanwhile
    assert m.primary.replication()["committed_cycle"] == 1
    assert (m.secondary.vol / "staging" / "log").stat().st_size >= 64 * 64 << 10
    assert (m.secondary.vol / "data.img").read_bytes() == first  # the volume is the image
    assert read_all(early) == first
    during = connect(sock)  # the newest committed is still cycle 1
    assert read_all(during) == first
    during.shutdown()
    m.proxy.delay(0)
    m.proxy.resume()
    wait_until(lambda: m.primary.replication()["committed_cycle"] == 2, 30, "cycle 2",
               interval=0.02)
    assert m.differing_regions() == []
    late = connect(sock)
    assert read_all(late) == second  # a connection after the commit: the new image
    assert read_all(early) == first  # the same point in time for as long as it is connected
    assert images(m.secondary.vol) == {"cycle-1": True, "cycle-2": True}, "cycle-1 is held"

    # Let go of cycle 1: it goes at the next commit; cycle 2 stays while `late` holds it.
    early.shutdown()
    wait_until(lambda: not images(m.secondary.vol)["cycle-1"], 10,
               "the export to close its view of cycle 1", interval=0.02)
    sync(m, "--wait")  # (older images go right after a commit is acknowledged)
    wait_until(lambda: images(m.secondary.vol) == {"cycle-2": True, "cycle-3": False}, 10,
               "cycle-1 deleted", interval=0.02)
    assert read_all(late) == second
    late.shutdown()
    wait_until(lambda: not images(m.secondary.vol)["cycle-2"], 10,
               "the export to close its view of cycle 2", interval=0.02)
    third = fill(m, seed=8)
    sync(m, "--wait")
    assert m.differing_regions() == []
    wait_until(lambda: images(m.secondary.vol) == {"cycle-4": False}, 10,
               "cycle-2 and cycle-3 deleted", interval=0.02)
    newest = connect(sock)
    assert read_all(newest) == third
    newest.shutdown()

    log = m.secondary.vol / "consistent" / "server.log"  # written by a process of its own
    wait_until(lambda: "a connection closed consistent image cycle-4" in log.read_text(), 10,
               "the last connection in the export's log", interval=0.02)
    assert "a connection opened consistent image cycle-1" in log.read_text()
    text = run_cli("status", m.secondary.vol).out
    assert f"consistent:  image served on unix:{sock.absolute()} by pid {out['pid']}" in text
    assert run_cli("status", m.secondary.vol, "--json").json()["consistent_export"] == {
        "listen": f"unix:{sock.absolute()}", "pid": out["pid"]}
    # The receiver runs beside it, in VOL/: the export stops alone, and leaves nothing behind.
    res = run_cli("stop", m.secondary.vol, "--consistent", "--json").json()
    assert res == {"volume": str(m.secondary.vol.absolute()), "consistent": True,
                   "pid": out["pid"]}
    assert not pid_alive(out["pid"])
    left = {p.name for p in (m.secondary.vol / "consistent").iterdir()}
    assert left <= {"server.log", "lock"}, left
    assert m.secondary.alive() and m.secondary.replication()["state"] == "connected"
    assert run_cli("status", m.secondary.vol, "--json").json()["consistent_export"] is None
    res = run_cli("stop", m.secondary.vol, "--consistent", check=False)
    assert res.code == 1 and res.err.strip().splitlines() == [
        f"Error: the consistent image of {m.secondary.vol} is not being served"], res.err


def test_a_second_consistent_export_of_a_volume_is_refused_in_one_line(mirror, consistent):
    m = mirror()
    m.primary.start(m.peer, "async", "--interval", "0")
    fill(m, seed=9)
    sync(m, "--wait")
    out = consistent(m.secondary.vol, "--socket", m.where / "one.sock").json()
    for args in ((), ("--socket", m.where / "two.sock")):
        res = consistent(m.secondary.vol, *args, check=False)
        assert res.code == 1, res
        assert res.err.strip().splitlines() == [
            f"Error: the consistent image of {m.secondary.vol} is already being served on "
            f"unix:{m.where / 'one.sock'} (pid {out['pid']})"], res.err
    assert not (m.where / "two.sock").exists()
    h = connect(m.where / "one.sock")  # the first one serves on, untouched
    assert h.get_size() == SIZE
    res = run_cli("stop", m.secondary.vol, "--consistent", check=False)
    assert res.code == 1 and "1 NBD client is connected to the consistent image" in res.err
    h.shutdown()
    run_cli("stop", m.secondary.vol, "--consistent")
    assert not (m.where / "one.sock").exists()


def test_serve_consistent_refuses_what_has_no_consistent_image(mirror, tmp_path):
    run_cli("create", tmp_path / "plain", "--size", "4M")
    res = run_cli("serve", tmp_path / "plain", "--consistent", check=False)
    assert res.code == 1 and res.err.strip().splitlines() == [
        f"Error: {tmp_path / 'plain'} is not a secondary: --consistent serves the image an "
        "async secondary keeps of its last cycle"], res.err
    assert not (tmp_path / "plain" / "consistent").exists()
    m = mirror()
    m.primary.start(m.peer, "semi-async")  # paired: a secondary, with no cycle
    res = run_cli("serve", m.secondary.vol, "--consistent", "--background", check=False)
    assert res.code == 1 and res.err.strip().splitlines() == [
        f"Error: {m.secondary.vol} has no consistent image yet: no async cycle was committed "
        "to it"], res.err
    assert not (m.secondary.vol / "consistent").exists()
    res = run_cli("serve", m.secondary.vol, "--consistent", "--mode", "async", check=False)
    assert res.code == 2, res.err


def test_a_consistent_connection_before_the_first_cycle_fails_with_the_reason_logged(mirror):
    """nbdkit started by hand (the CLI refuses with no image): the export runs, and each
    connection fails until a cycle is committed, saying why in its log."""
    import nbd

    from cli import server
    from volume_core.server_files import ServerPlace

    m = mirror()
    m.primary.start(m.peer, "semi-async")  # paired: a secondary, with no cycle
    volume = Volume.open(m.secondary.vol)
    assert volume.info.role == "secondary" and volume.info.cycle == 0
    place = ServerPlace(volume, consistent=True)
    sock = m.where / "c.sock"
    state = server.serve_background(place, server.Endpoint(socket=sock))
    try:
        with pytest.raises(nbd.Error):
            connect(sock)
        log = place.log_file
        wait_until(lambda: "has no consistent image yet" in log.read_text(), 10,
                   "the reason in the log", interval=0.02)
        m.primary.stop()
        m.primary.start(m.peer, "async", "--interval", "0")
        fill(m, seed=10)
        sync(m, "--wait")
        h = connect(sock)
        assert read_all(h) == (m.primary.vol / "data.img").read_bytes()
        h.shutdown()
    finally:
        server.stop(place, force=True)
    assert not pid_alive(state["pid"])


@pytest.mark.parametrize("other", ["semi-async", "sync"])
def test_restarting_in_another_mode_carries_on_without_a_full_copy(mirror, other):
    """semi-async (or sync) -> async -> back on the same pair: after each switch only
    what was written meanwhile travels (counted by the primary), never the whole volume."""
    m = mirror()
    m.primary.start(m.peer, other)
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
    m.primary.start(m.peer, other)
    h = m.primary.connect()
    h.pwrite(b"B" * 65536, 65536 * 10)
    h.flush()
    h.shutdown()
    rep = m.wait_in_sync()
    assert rep["resync"]["regions"] <= 4, rep["resync"]  # nothing left over from async
