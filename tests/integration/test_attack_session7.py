"""Attack round of session 7's async work over real TCP (the in-process ``pair``) and
through the commands (``mirror``: real `serve --mode async` and `receive` processes, the
fault proxy; `serve --consistent`).

Tests marked xfail(strict=True) show a bug found by this round; the others probe what held.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

from tests.conftest import run_cli, wait_until
from tests.integration.test_async_cli import connect, fill, read_all, sync
from tests.integration.test_replication_cli_faults import SIZE as CLI_SIZE
from tests.integration.test_replication_pair import RS, SIZE, hammer, pair
from volume_core.replication import protocol as p
from volume_core.replication.mirror import AsyncMirror
from volume_core.snapshot_view import SnapshotView
from volume_core.volume import Volume

pytestmark = pytest.mark.integration


def image_of(vol: Volume, name: str) -> bytes:
    view = SnapshotView(Volume.open(vol.path), name)
    try:
        buf = bytearray(vol.size)
        view.pread(buf, 0)
        return bytes(buf)
    finally:
        view.close()


def test_a_primary_restarted_between_the_pass_and_cycle_1_takes_cycle_1(tmp_path,
                                                                         monkeypatch):
    data = random.Random(1).randbytes(SIZE)
    real_take = AsyncMirror._take
    stopped, restarted = threading.Event(), threading.Event()

    def take(self):
        if not restarted.is_set():  # the primary stops right here (a stop or a SIGKILL):
            stopped.set()  # no take of the first primary's (a retry) may come before it
            raise OSError("test: the primary stops between the pass and cycle 1")
        return real_take(self)

    monkeypatch.setattr(AsyncMirror, "_take", take)
    with pair(tmp_path, "async", prefill=data) as pr:
        wait_until(stopped.is_set, 20, "the end of the initial pass")
        assert pr.replicator.initial_sync is not None
        volumes = (pr.primary.volume, pr.secondary.volume)
    assert volumes[0].info.cycle == 0 and volumes[1].info.cycle == 0
    restarted.set()
    with pair(tmp_path, "async", volumes=volumes, interval=0.1) as pr:
        wait_until(lambda: pr.replicator.committed >= 1
                   or pr.replicator.status()["state"] == "in-sync", 10,
                   "cycle 1 or a claim of in-sync")
        st = pr.replicator.status()
        assert pr.replicator.committed >= 1, (
            f"no consistent image on the secondary, yet the primary says {st['state']!r} "
            f"at committed cycle {st['committed_cycle']}")
        assert image_of(pr.secondary.volume, "cycle-1") == data


def test_writers_and_trims_during_the_live_pass_end_identical_and_cycle_1_is_whole(
        tmp_path):
    """Real TCP; the pass's 2nd chunk waits at the secondary until writers, trims and zero
    writes are under way, and every chunk after it a little, so they run all through the
    rest of the pass and cycle 1. After a cycle asked for at the end, the secondary's data
    and its consistent image equal the primary's, byte for byte."""
    import time

    gate, go = threading.Event(), threading.Event()
    seen = [0]

    def wrap(handle):
        def slow(frame):
            if isinstance(frame, (p.Write, p.WriteV, p.Zero)):
                seen[0] += 1
                if seen[0] == 2:
                    gate.set()
                    go.wait(30)
                time.sleep(0.003)
            handle(frame)
        return slow

    size = 48 << 20  # three times the window of chunks: most is read after the gate
    data = random.Random(2).randbytes(size)
    with pair(tmp_path, "async", prefill=data, wrap=wrap, ack_timeout=30, size=size) as pr:
        assert gate.wait(20), "the pass's 2nd chunk"
        stop = threading.Event()
        errors: list[BaseException] = []

        def trimmer() -> None:
            rnd = random.Random(9)
            try:
                while not stop.is_set():
                    r = rnd.randrange(size // RS - 2)
                    if rnd.random() < 0.5:
                        pr.primary.trim(2 * RS, r * RS)
                    else:
                        pr.primary.zero(RS + 512, r * RS + 100, may_trim=rnd.random() < 0.5)
                    time.sleep(0.0005)
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        def writers() -> None:
            try:
                hammer(pr.primary, writers=3, writes=300, span=size - RS, scatter=0.1)
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        threads_ = [threading.Thread(target=trimmer), threading.Thread(target=writers)]
        for t in threads_:
            t.start()
        wait_until(lambda: pr.primary.stats.writes >= 50, 20, "the writers")
        assert pr.replicator._pass is not None  # still in the pass
        go.set()
        threads_[1].join(60)
        stop.set()
        threads_[0].join(10)
        assert not errors
        wait_until(lambda: pr.replicator.initial_sync is not None, 30, "the end of the pass")
        assert pr.replicator.initial_sync["skipped_regions"] >= 1, pr.replicator.initial_sync
        want = pr.replicator.run_now()
        wait_until(lambda: pr.replicator.committed >= want, 30, f"cycle {want}")
        mine, theirs = pr.images()
        assert mine == theirs
        assert image_of(pr.secondary.volume, f"cycle-{pr.replicator.committed}") == mine
        assert pr.primary.tracker.count() == 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def test_many_consistent_connections_leak_nothing_and_each_holds_its_image(mirror,
                                                                         consistent):
    """60 connections one after another, 8 at once, one held across three commits: the
    export's open files and threads come back to where they were, the held one reads its
    point in time throughout, and the images nobody holds any more go."""
    import nbd

    m = mirror()
    m.primary.start(m.peer, "async", "--interval", "0")
    first = fill(m, seed=11)
    sync(m, "--wait")
    pid = consistent(m.secondary.vol).json()["pid"]
    sock = m.secondary.vol / "consistent" / "nbd.sock"
    h = connect(sock)
    assert h.pread(RS, 0) == first[:RS]
    h.shutdown()
    wait_until(lambda: not run_cli("snapshot", "list", m.secondary.vol, "--json").json()[
        "snapshots"][0]["served"], 10, "the first connection to let go", interval=0.02)
    base_fds, base_threads = fds(pid), threads(pid)
    for i in range(60):
        h = connect(sock)
        assert h.pread(4096, i * RS) == first[i * RS:i * RS + 4096]
        h.shutdown()
    many = [connect(sock) for _ in range(8)]
    for k, h in enumerate(many):
        off = k * (CLI_SIZE // 8)
        assert h.pread(RS, off) == first[off:off + RS]
    held = many.pop()
    for h in many:
        h.shutdown()
    for seed in (12, 13, 14):
        newest = fill(m, seed=seed)
        sync(m, "--wait")
        assert read_all(held) == first
    late = connect(sock)
    assert read_all(late) == newest
    late.shutdown()
    res = run_cli("stop", m.secondary.vol, "--consistent", check=False)
    assert res.code == 1 and "connected" in res.err, res.err
    held.shutdown()
    wait_until(lambda: fds(pid) <= base_fds, 10,
               f"the export's open files back to {base_fds} (now {fds(pid)})", interval=0.05)
    assert threads(pid) <= base_threads + 1
    sync(m, "--wait")  # the next commit drops what nobody holds any more (right after)

    def names() -> list[str]:
        return [s["name"] for s in run_cli("snapshot", "list", m.secondary.vol,
                                           "--json").json()["snapshots"]]

    wait_until(lambda: names() == ["cycle-5"], 10, "only cycle-5 left")
    with pytest.raises(nbd.Error):
        held.pread(RS, 0)
    run_cli("stop", m.secondary.vol, "--consistent")


def test_the_consistent_export_serves_while_the_receiver_is_down_and_restarts(mirror,
                                                                            consistent):
    m = mirror()
    m.primary.start(m.peer, "async", "--interval", "0")
    first = fill(m, seed=21)
    sync(m, "--wait")
    consistent(m.secondary.vol)
    sock = m.secondary.vol / "consistent" / "nbd.sock"
    m.secondary.stop()
    h = connect(sock)  # no receiver: the image is on disk all the same
    assert read_all(h) == first
    m.secondary.start()  # beside a held image and the export's lock
    second = fill(m, seed=22)
    res = sync(m, "--wait", "--timeout", "60")
    assert res.code == 0
    assert m.differing_regions() == []
    assert read_all(h) == first
    late = connect(sock)
    assert read_all(late) == second
    late.shutdown()
    h.shutdown()


@pytest.mark.parametrize("where", [p.CycleBegin, p.CycleCommit])
def test_a_cut_at_the_boundary_of_the_pass_and_cycle_1_resumes_and_sends_no_data_again(
        tmp_path, where):
    """The link breaks as cycle 1's first frame (or its commit) reaches the secondary, right
    after the pass: cycle 1 resumes on the next link and commits; the pass's regions are not
    conveyed again."""
    cut = threading.Event()
    data_frames = [0]

    def wrap(handle):
        def cutting(frame):
            if isinstance(frame, where) and frame.seq == 1 and not cut.is_set():
                cut.set()
                raise p.ProtocolError("test: the link breaks at the boundary")
            if isinstance(frame, (p.Write, p.WriteV, p.Zero)):
                data_frames[0] += 1
            handle(frame)
        return cutting

    data = random.Random(3).randbytes(SIZE)
    with pair(tmp_path, "async", prefill=data, wrap=wrap) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "cycle 1, resumed")
        assert cut.is_set() and pr.replicator.stats["links_lost"] >= 1
        assert pr.images() == (data, data)
        assert pr.replicator.stats["regions_conveyed"] == SIZE // RS
        assert image_of(pr.secondary.volume, "cycle-1") == data
        assert pr.replicator.status()["state"] == "in-sync"


def test_a_secondary_killed_mid_pass_restarts_and_the_pass_and_cycle_1_complete(mirror,
                                                                            consistent):
    from tests.integration.test_async_cli import cycle_under_way

    m = mirror(proxy=True)
    data = cycle_under_way(m, seed=31, regions=64, initial=True)
    assert m.primary.replication()["cycle"]["state"] == "initial-sync"
    m.secondary.kill()
    m.proxy.delay(0)
    m.secondary.start()
    sync(m, "--wait", "--timeout", "60")
    assert m.differing_regions() == []
    st = m.primary.replication()
    assert st["committed_cycle"] >= 1 and st["state"] == "in-sync", st
    consistent(m.secondary.vol)
    h = connect(m.secondary.vol / "consistent" / "nbd.sock")
    assert read_all(h) == data
    h.shutdown()


@pytest.mark.parametrize("value", ['"soon"', "-1", "1e300", "NaN", "true"])
def test_a_damaged_cycle_at_is_refused_in_one_line_by_the_commands(tmp_path, value):
    vol = tmp_path / "v"
    run_cli("create", vol, "--size", "4M")
    path = vol / "volume.json"
    text = path.read_text()
    assert '"cycle_at"' not in text or '"cycle_at": null' in text
    if '"cycle_at"' in text:
        text = text.replace('"cycle_at": null', f'"cycle_at": {value}')
    else:
        text = text.rstrip().rstrip("}").rstrip() + f', "cycle_at": {value}}}'
    path.write_text(text)
    for args in (("info", vol), ("serve", vol, "--replicate-to", "127.0.0.1:9",
                                 "--mode", "async", "--background")):
        res = run_cli(*args, check=False)
        lines = res.err.strip().splitlines()
        assert res.code == 1 and len(lines) == 1 and "cycle_at" in lines[0], res.err
        assert "Traceback" not in res.err
    assert path.read_text() == text
    assert not (vol / "nbdkit.pid").exists()


def test_consistent_readers_racing_commits_and_deletes_always_see_one_point_in_time(
        tmp_path):
    """Each cycle k fills the whole volume with byte k; readers keep opening the newest
    image (ConsistentExport, as each NBD connection does), reading it whole and letting
    go, while cycles commit and older images are deleted: every read is one cycle's bytes,
    never a mix, and no open fails."""
    from volume_core.consistent import ConsistentExport

    with pair(tmp_path, "async") as pr:
        pr.primary.pwrite(bytes([1]) * SIZE, 0)
        want = pr.replicator.run_now()
        wait_until(lambda: pr.replicator.committed >= want, 30, "the first cycle")
        export = ConsistentExport(Volume.open(pr.secondary.volume.path))
        stop = threading.Event()
        errors: list[str] = []
        seen: set[int] = set()

        def reader() -> None:
            buf = bytearray(SIZE)
            while not stop.is_set():
                try:
                    view = export.open()
                except Exception as err:  # noqa: BLE001
                    errors.append(f"open: {err!r}")
                    return
                try:
                    view.pread(buf, 0)
                finally:
                    view.close()
                first = buf[0]
                if buf.count(first) != SIZE:
                    errors.append(f"{view.name}: a mix of cycles (starts with {first})")
                    return
                seen.add(first)

        readers = [threading.Thread(target=reader) for _ in range(3)]
        for t in readers:
            t.start()
        try:
            for k in range(2, 14):
                pr.primary.pwrite(bytes([k]) * SIZE, 0)
                want = pr.replicator.run_now()
                wait_until(lambda w=want: pr.replicator.committed >= w or errors, 30,
                           f"cycle {want}")
                if errors:
                    break
        finally:
            stop.set()
            for t in readers:
                t.join(30)
            export.close()
        assert not errors, errors
        assert len(seen) >= 3, seen
        want = pr.replicator.run_now()  # nobody reads now: only the newest stays
        wait_until(lambda: pr.replicator.committed >= want, 30, "the last cycle")
        wait_until(lambda: [s.name for s in pr.secondary.snapshots.chain] == [f"cycle-{want}"]
                   and not [n for n in os.listdir(pr.secondary.volume.snapshot_dir)
                            if n.startswith(".")], 10, "only the newest image left")
