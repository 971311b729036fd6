"""Adversarial tests of async mirroring over real TCP (the in-process ``pair`` of
test_replication_pair) and through the commands.

The tests that end in a bug fix were found by an attack round (session 6, all fixed); the
others check what held.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading

import numpy as np
import pytest

from tests.conftest import NBDMIRROR, run_cli, wait_until
from tests.integration.test_replication_pair import RS, SIZE, pair
from volume_core.cycle_freeze import COPIED, CycleFreeze
from volume_core.errors import ProtocolError
from volume_core.replication import protocol as p

pytestmark = pytest.mark.integration

REGIONS = SIZE // RS


def differing(pr) -> list[int]:
    mine, theirs = pr.images()
    return [r for r in range(REGIONS) if mine[r * RS:(r + 1) * RS] != theirs[r * RS:(r + 1) * RS]]


def drop_chunks(handle):
    """The secondary never sees a cycle's chunks: the cycle stays open."""
    def dropping(frame):
        if isinstance(frame, (p.Write, p.WriteV, p.Zero)):
            return
        handle(frame)
    return dropping


def test_an_open_cycle_dropped_by_a_semi_async_server_leaves_no_stale_data(tmp_path):
    """What the plugin does for a server that does not mirror async (CycleFreeze.discard):
    the open cycle goes, its regions stay marked; the semi-async resync and a later async
    server then leave both sides identical. (PrimaryReplicator / session.replicate do not
    drop the cycle themselves: only the plugin does.)"""
    first = random.Random(0).randbytes(SIZE)
    old = random.Random(1).randbytes(SIZE)
    new = random.Random(2).randbytes(RS)
    dropping = threading.Event()

    def wrap(handle):
        dropped = drop_chunks(handle)
        return lambda frame: (dropped if dropping.is_set() else handle)(frame)

    # 1. async: after the initial sync, cycle 2 is taken (everything marked) and stays
    #    open; region 3 is written after the take, so its old bytes are copied into the
    #    freeze (COPIED).
    with pair(tmp_path, "async", wrap=wrap, prefill=first, ack_timeout=30) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 20, "the initial sync")
        dropping.set()
        pr.primary.pwrite(old, 0)
        pr.replicator.run_now()
        wait_until(lambda: pr.replicator._freeze is not None, 20, "cycle 2 to be taken")
        pr.primary.pwrite(new, 3 * RS)
        assert pr.replicator._freeze.preserved[3] == COPIED
        volumes = (pr.primary.volume, pr.secondary.volume)
    assert CycleFreeze.discard(volumes[0])  # as nbd_plugin.get_ready does
    # 2. the same volumes, semi-async: the resync makes both sides identical and clears
    #    the marks on both sides.
    with pair(tmp_path, "semi-async", volumes=volumes) as pr:
        pr.wait_in_sync()
        wait_until(lambda: pr.primary.tracker.count() == 0, 20, "the primary's sweep")
        pr.receiver.sweep()  # what the secondary's timer does (`receive`)
        assert differing(pr) == []
    # 3. async again: no cycle to resume; one asked for sends nothing stale.
    with pair(tmp_path, "async", volumes=volumes) as pr:
        want = pr.replicator.run_now()
        wait_until(lambda: pr.replicator.committed >= want, 30, f"cycle {want}")
        pr.wait_in_sync()
        assert differing(pr) == [], pr.replicator.status()


def test_a_link_cut_before_the_commit_reaches_the_secondary_resumes_and_commits(tmp_path):
    cut = threading.Event()

    def wrap(handle):
        def cutting(frame):
            if isinstance(frame, p.CycleCommit) and not cut.is_set():
                cut.set()
                raise ProtocolError("test: the link breaks as the commit arrives")
            handle(frame)
        return cutting

    data = random.Random(3).randbytes(SIZE)
    with pair(tmp_path, "async", wrap=wrap, prefill=data) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "cycle 1 after the cut")
        assert cut.is_set()
        assert pr.images() == (data, data)
        assert pr.secondary_cycle() == 1
        # the resumed cycle conveyed nothing again
        assert pr.replicator.stats["regions_conveyed"] == REGIONS


def test_a_commit_whose_ack_is_lost_is_committed_again(tmp_path):
    cut = threading.Event()

    def wrap(handle):
        def after(frame):
            handle(frame)
            if isinstance(frame, p.CycleCommit) and not cut.is_set():
                cut.set()  # committed there; the link breaks before the ack leaves
                raise ProtocolError("test: the link breaks after the commit")
        return after

    data = random.Random(4).randbytes(SIZE)
    with pair(tmp_path, "async", wrap=wrap, prefill=data) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "cycle 1 after the cut")
        assert cut.is_set() and pr.secondary_cycle() == 1
        assert not (pr.primary.volume.path / "cycle").exists()
        pr.primary.pwrite(b"z" * RS, 5 * RS)
        want = pr.replicator.run_now()
        assert want == 2
        wait_until(lambda: pr.replicator.committed >= want, 30, "cycle 2")
        assert differing(pr) == []
        assert pr.secondary_cycle() == 2


def test_writes_during_every_phase_of_cycles_reach_the_secondary(tmp_path):
    """Writers never stop; cycles run back to back; whenever status says in-sync the bytes
    are equal, and after the writers stop one cycle brings them together."""
    stop = threading.Event()
    errors: list[BaseException] = []
    with pair(tmp_path, "async") as pr:
        def writer(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                while not stop.is_set():
                    off = rnd.randrange(0, SIZE - 2 * RS)
                    pr.primary.pwrite(rnd.randbytes(rnd.randrange(1, 2 * RS)), off)
                    if rnd.random() < 0.05:
                        pr.primary.trim(RS, rnd.randrange(0, REGIONS - 1) * RS)
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        try:
            for _ in range(5):
                want = pr.replicator.run_now()
                wait_until(lambda w=want: pr.replicator.committed >= w, 30, f"cycle {want}")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors[0]
        want = pr.replicator.run_now()
        wait_until(lambda: pr.replicator.committed >= want, 30, f"cycle {want}")
        pr.wait_in_sync()
        assert differing(pr) == []
        assert not np.any(pr.primary.tracker.marks)
        assert pr.secondary_cycle() == want


# ---------------------------------------------------------------- through the commands


def _damage(vol, how: str) -> None:
    root = vol / "cycle"
    if how == "file":
        root.write_text("not a directory")
        return
    root.mkdir()
    (root / "cycle.json").write_text('{"number": 1}')  # no state.map, no store.img


@pytest.mark.parametrize("how", ["dir", "file"])
def test_serve_in_the_foreground_refuses_a_damaged_open_cycle_in_one_line(tmp_path, how):
    vol = tmp_path / "v"
    run_cli("create", vol, "--size", "4M")
    _damage(vol, how)
    res = run_cli("serve", vol, "--replicate-to", "127.0.0.1:9", "--mode", "async",
                  check=False, timeout=60)
    assert res.code != 0
    assert "Traceback" not in res.err, res.err
    errors = [line for line in res.err.splitlines() if "cycle" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), res.err


@pytest.mark.parametrize("how", ["dir", "file"])
def test_serve_in_the_background_refuses_a_damaged_open_cycle(tmp_path, how):
    vol = tmp_path / "v"
    run_cli("create", vol, "--size", "4M")
    _damage(vol, how)
    before = sorted(p.name for p in (vol / "cycle").iterdir()) if how == "dir" else None
    res = run_cli("serve", vol, "--replicate-to", "127.0.0.1:9", "--mode", "async",
                  "--background", check=False, timeout=60)
    assert res.code == 1 and "damaged open cycle" in res.err, res.err
    assert "Traceback" not in res.err
    if how == "dir":
        assert sorted(p.name for p in (vol / "cycle").iterdir()) == before
    assert not (vol / "nbdkit.pid").exists()


def test_sync_timeout_nan_is_refused(tmp_path):
    vol = tmp_path / "v"
    run_cli("create", vol, "--size", "4M")
    res = run_cli("sync", vol, "--wait", "--timeout", "nan", check=False)
    assert res.code == 2 and "--timeout" in res.err, res.err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5", "86401", "1e999", "",
                                   "0.5"])
def test_bad_interval_values_are_refused(tmp_path, value):
    vol = tmp_path / "v"
    run_cli("create", vol, "--size", "4M")
    res = run_cli("serve", vol, "--replicate-to", "127.0.0.1:9", "--mode", "async",
                  "--interval", value, check=False)
    assert res.code == 2 and "interval" in res.err, res.err
    assert "Traceback" not in res.err


def test_cli_async_kill_then_semi_async_then_async_sends_no_stale_data(mirror):
    """An async primary killed mid-cycle (a COPIED region in its freeze), served in
    semi-async mode (resync; nothing marked on either side), then async again: no stale
    byte of the old cycle may reach the secondary (the semi-async server drops the cycle)."""
    from tests.integration.test_async_cli import cycle_under_way, sync
    from tests.integration.test_replication_cli_faults import REGIONS as CLI_REGIONS
    from tests.integration.test_replication_cli_faults import RS as CLI_RS
    from tests.integration.test_replication_cli_faults import status_json

    m = mirror(proxy=True)
    cycle_under_way(m, seed=11, regions=32)
    m.proxy.stall()  # the rest of cycle 2 waits
    last = CLI_REGIONS - 1
    h = m.primary.connect()
    try:
        h.pwrite(b"N" * CLI_RS, last * CLI_RS)  # not conveyed yet: copied into the freeze
        h.flush()
    finally:
        h.shutdown()
    state = (m.primary.vol / "cycle" / "state.map").read_bytes()
    assert state[last] == COPIED
    m.primary.kill()
    m.proxy.delay(0)
    m.proxy.resume()
    m.primary.start(m.peer, "semi-async")
    m.wait_in_sync(60)  # the bytes are equal here
    wait_until(lambda: m.primary.replication()["marked_regions"] == 0, 30, "primary marks")
    wait_until(lambda: m.secondary.replication()["marked_regions"] == 0, 30,
               "secondary marks")
    assert not (m.primary.vol / "cycle").exists()  # dropped by the semi-async server
    m.primary.stop()
    m.primary.start(m.peer, "async", "--interval", "0")
    sync(m, "--wait")
    wait_until(lambda: m.primary.replication()["state"] == "in-sync", 30, "in-sync",
               interval=0.05)
    assert m.differing_regions() == [], status_json(m.primary.vol)


def _serve_foreground(vol, *args: str) -> tuple[int | None, str]:
    """`serve VOL ARGS` in the foreground: (exit code, stderr) if it exits, else (None,
    stderr) once it serves (then it is stopped)."""
    err_path = vol.with_suffix(".err")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([NBDMIRROR, "serve", str(vol), *args], stdin=subprocess.DEVNULL,
                                stdout=err, stderr=err)
    try:
        wait_until(lambda: proc.poll() is not None or (vol / "server.json").exists(), 30,
                   "serve to exit or serve", interval=0.05)
        if proc.poll() is None:
            run_cli("stop", vol, "--force", check=False, timeout=60)
            proc.wait(20)
            return None, err_path.read_text()
        return proc.returncode, err_path.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_plain_serve_with_a_non_directory_cycle_entry_serves_or_refuses_in_one_line(
        tmp_path, kind):
    vol = tmp_path / "v"
    run_cli("create", vol, "--size", "4M")
    if kind == "file":
        (vol / "cycle").write_text("not a cycle")
    else:
        (tmp_path / "elsewhere").mkdir()
        (vol / "cycle").symlink_to(tmp_path / "elsewhere")
    code, err = _serve_foreground(vol)
    assert "Traceback" not in err, err
    if code is not None:  # refused: one clear line
        assert code != 0
        errors = [line for line in err.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "cycle" in errors[0], err


def test_a_cycle_number_reused_after_a_crash_in_finish_updates_the_consistent_image(tmp_path):
    from volume_core.snapshot_view import SnapshotView
    from volume_core.snapshots import cycle_name

    old = random.Random(5).randbytes(SIZE)
    new = random.Random(6).randbytes(4 * RS)
    # 1. cycle 1 commits on the secondary; the primary "dies" right after dropping its
    #    freeze, before volume.json says cycle 1 (update_info fails there, then it stops).
    go = threading.Event()
    tried = threading.Event()

    def gate(handle):
        def held(frame):
            go.wait(30)  # nothing reaches the secondary before update_info is replaced
            handle(frame)
        return held

    with pair(tmp_path, "async", prefill=old, wrap=gate) as pr:
        pvol = pr.primary.volume
        real_update = pvol.update_info

        def update_info(**changes):
            if "cycle" in changes:
                tried.set()
                raise OSError(5, "test: the primary dies here")
            real_update(**changes)

        pvol.update_info = update_info
        go.set()
        wait_until(lambda: pr.secondary_cycle() >= 1 and tried.is_set(), 30,
                   "cycle 1 on the secondary, and the primary's attempt to record it")
        volumes = (pvol, pr.secondary.volume)
    del pvol.update_info
    assert volumes[0].info.cycle == 0 and volumes[1].info.cycle == 1
    # 2. restarted, with new writes made before the link is up: the open cycle 1 (its
    #    number recorded nowhere yet here) commits again, the next carries the writes;
    #    once it is committed the secondary's consistent image holds them.
    image = old[:8 * RS] + new + old[12 * RS:]
    with pair(tmp_path, "async", volumes=volumes, prefill=image) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "cycle 1, again")
        # cycle 1 is what it was; the new writes are the next cycle's, still marked
        assert pr.primary.tracker.marks[8:12].all()
        want = pr.replicator.run_now()
        wait_until(lambda: pr.replicator.committed >= want, 30, f"cycle {want}")
        wait_until(lambda: pr.replicator.status()["state"] == "in-sync", 30, "in-sync")
        assert differing(pr) == []
        number = pr.secondary_cycle()
        view = SnapshotView(pr.secondary.volume, cycle_name(number))
        try:
            buf = bytearray(4 * RS)
            view.pread(buf, 8 * RS)
        finally:
            view.close()
        assert bytes(buf) == new, (f"the secondary says cycle {number} is committed, but its "
                                   f"consistent image {cycle_name(number)} is the old one")
