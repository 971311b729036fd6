"""Async mirroring in one process, over real TCP on loopback: the primary's cycles (take,
freeze, convey, commit), the secondary's receiver, all real (see test_replication_pair)."""

from __future__ import annotations

import errno
import os
import random
import threading

import numpy as np
import pytest

from tests.conftest import wait_until
from tests.integration.test_replication_pair import RS, SIZE, Pair, hammer, pair
from volume_core.engine import Engine
from volume_core.errors import ProtocolError
from volume_core.replication import protocol as p
from volume_core.replication.mirror import CYCLE_CHUNK, CYCLE_WINDOW
from volume_core.volume import Volume

pytestmark = pytest.mark.integration


def cycle(pr: Pair, timeout: float = 30.0) -> int:
    """Ask for a cycle and wait until it (everything written before) is committed."""
    want = pr.replicator.run_now()
    wait_until(lambda: pr.replicator.committed >= want, timeout, f"cycle {want} to commit")
    return want


def test_the_initial_sync_conveys_what_the_primary_holds(tmp_path):
    data = random.Random(1).randbytes(SIZE // 2)
    with pair(tmp_path, "async", prefill=data) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "the initial sync")
        mine, theirs = pr.images()
        assert mine == theirs
        assert pr.secondary_cycle() == 1 == pr.primary.volume.info.cycle
        st = pr.replicator.status()
        assert st["state"] == "in-sync" and st["marked_regions"] == 0, st
        # Only what was written travelled: half the volume, not all of it.
        assert st["bytes_conveyed"] == SIZE // 2
        assert not (pr.primary.volume.path / "cycle").exists()


def test_a_cycle_holds_the_image_of_its_take_not_later_writes(tmp_path):
    """Writes landing while cycle n is conveyed are not in cycle n (they are in n + 1)."""
    began = threading.Event()
    go_on = threading.Event()

    def wrap(handle):
        def held(frame):
            if isinstance(frame, p.CycleBegin) and frame.seq == 2:
                began.set()
                go_on.wait(30)
            handle(frame)
        return held

    old = random.Random(2).randbytes(SIZE)
    new = random.Random(3).randbytes(SIZE)
    with pair(tmp_path, "async", wrap=wrap) as pr:
        assert cycle(pr) == 1  # nothing written: an empty cycle, asked for
        pr.primary.pwrite(old, 0)
        want = pr.replicator.run_now()
        assert want == 2
        assert began.wait(30)
        pr.primary.pwrite(new, 0)  # after the take: copied first, then landed
        go_on.set()
        wait_until(lambda: pr.replicator.committed >= 2, 30, "cycle 2")
        assert pr.secondary.volume.data_path.read_bytes() == old
        cycle(pr)
        assert pr.images() == (new, new)


def test_a_cut_mid_cycle_resumes_without_sending_conveyed_chunks_again(tmp_path):
    seen: list[int] = []  # regions of every chunk the secondary received
    cut = threading.Event()

    def wrap(handle):
        def counting(frame):
            if isinstance(frame, (p.Write, p.WriteV, p.Zero)):
                seen.append(frame.length // RS)
                if sum(seen) >= (SIZE // RS) // 2 and not cut.is_set():
                    cut.set()
                    raise ProtocolError("test: the link breaks half-way through the cycle")
            handle(frame)
        return counting

    data = random.Random(4).randbytes(SIZE)
    with pair(tmp_path, "async", wrap=wrap, prefill=data) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "the initial sync, resumed")
        assert cut.is_set() and pr.replicator.stats["links_lost"] >= 1
        assert pr.images() == (data, data)
        extra = sum(seen) - SIZE // RS
        # at most the chunks in flight at the cut travel twice (a window's bytes)
        assert 0 <= extra <= (CYCLE_WINDOW + CYCLE_CHUNK) // RS, (extra, len(seen))


def test_a_restarted_primary_resumes_its_open_cycle(tmp_path):
    stop_after = (SIZE // RS) // 4
    got: list[int] = []
    armed = threading.Event()

    def wrap(handle):
        def stalling(frame):
            if isinstance(frame, (p.Write, p.WriteV, p.Zero)) and armed.is_set():
                if sum(got) >= stop_after:
                    return  # never answered: the cycle stays open
                got.append(frame.length // RS)
            handle(frame)
        return stalling

    first = random.Random(4).randbytes(SIZE)
    data = random.Random(5).randbytes(SIZE)
    with pair(tmp_path, "async", wrap=wrap, prefill=first, ack_timeout=30) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "the initial sync")
        armed.set()
        pr.primary.pwrite(data, 0)
        pr.replicator.run_now()
        wait_until(lambda: sum(got) >= stop_after, 30, "part of cycle 2")
        volumes = (pr.primary.volume, pr.secondary.volume)
        first_run = pr.replicator
        taken_at = first_run._freeze.taken_at
    conveyed = first_run.stats["regions_conveyed"] - SIZE // RS  # of cycle 2, until it stopped
    assert (volumes[0].path / "cycle").exists()  # left open by the stop
    with pair(tmp_path, "async", volumes=volumes) as pr:
        wait_until(lambda: pr.replicator.committed >= 2, 30, "the resumed cycle")
        assert pr.images() == (data, data)
        # its point in time is still the first run's take
        assert pr.replicator.last_consistent_at == taken_at == volumes[1].info.cycle_at
        # the resumed cycle sent only what the first run had not had acknowledged
        assert pr.replicator.stats["regions_conveyed"] == SIZE // RS - conveyed
        # Nothing was written after the take: what stays marked for the next cycle is
        # only what the secondary (restarted too, its marks not swept) names, at most
        # what it applied in the first run (acknowledged or not).
        left = pr.primary.tracker.count()
        assert left <= sum(got), np.flatnonzero(pr.primary.tracker.marks)
        cycle(pr)
        assert pr.replicator.stats["regions_conveyed"] == SIZE // RS - conveyed + left
        assert pr.primary.tracker.count() == 0
        assert pr.images() == (data, data)


def test_a_refused_chunk_is_sent_again(tmp_path):
    with pair(tmp_path, "async") as pr:
        assert cycle(pr) == 1
        pr.faults.fail(7, times=2)
        data = random.Random(6).randbytes(4 * RS)
        pr.primary.pwrite(data, 6 * RS)
        cycle(pr)
        assert pr.replicator.stats["chunks_refused"] == 2
        assert pr.images()[0] == pr.images()[1]
        st = pr.receiver.status()
        assert st["recovering_regions"] == 0 and st["committed_cycle"] == 2


def test_overlapping_writers_between_cycles_end_identical(tmp_path):
    with pair(tmp_path, "async") as pr:
        hammer(pr.primary, writers=6, writes=150, span=2 * RS)
        pr.primary.trim(RS, 4 * RS)
        pr.primary.zero(RS, 6 * RS, may_trim=False)
        cycle(pr)
        mine, theirs = pr.images()
        assert mine == theirs
        assert not np.any(pr.primary.tracker.marks)


def test_the_secondary_keeps_the_last_cycle_whole_while_the_next_arrives(tmp_path):
    """Its consistent image is a snapshot per commit: a reader of it sees cycle 1 while
    cycle 2's chunks land (in the staging log: the volume is cycle 1 too); a reader
    holding it keeps it past the next commit."""
    from volume_core.snapshot_view import SnapshotView
    from volume_core.volume import Volume

    in_cycle_2 = threading.Event()
    held = threading.Event()
    go_on = threading.Event()
    chunks = [0]

    def wrap(handle):
        def holding(frame):
            if isinstance(frame, p.CycleBegin) and frame.seq == 2:
                in_cycle_2.set()
            if in_cycle_2.is_set() and isinstance(frame, (p.Write, p.WriteV)):
                chunks[0] += 1
                if chunks[0] == 3:  # two chunks of cycle 2 have landed
                    held.set()
                    go_on.wait(30)
            handle(frame)
        return holding

    old = random.Random(7).randbytes(SIZE)
    new = random.Random(8).randbytes(SIZE)
    with pair(tmp_path, "async", wrap=wrap, prefill=old, ack_timeout=30) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "the initial sync")
        names = [s.name for s in pr.secondary.snapshots.chain]
        assert names == ["cycle-1"]
        pr.primary.pwrite(new, 0)
        pr.replicator.run_now()
        assert held.wait(30)
        live = pr.secondary.volume.data_path.read_bytes()
        assert live == old  # cycle 2 is half there, in the staging log...
        assert (pr.secondary.volume.path / "staging" / "log").stat().st_size > 0
        view = SnapshotView(Volume.open(pr.secondary.volume.path), "cycle-1")
        try:
            image = bytearray(SIZE)
            view.pread(image, 0)
            assert image == old  # ...and the consistent image is cycle 1, whole
            go_on.set()
            wait_until(lambda: pr.replicator.committed >= 2, 30, "cycle 2")
            view.pread(image, 0)
            assert image == old  # still, for the reader that holds it
            assert [s.name for s in pr.secondary.snapshots.chain] == ["cycle-1", "cycle-2"]
        finally:
            view.close()
        cycle(pr)  # cycle 3: nobody holds the old images any more
        # (deleted right after the commit is acknowledged)
        wait_until(lambda: [s.name for s in pr.secondary.snapshots.chain] == ["cycle-3"],
                   10, "the older images deleted")
        assert pr.images() == (new, new)


def test_users_cannot_take_or_delete_the_consistent_image_names(tmp_path):
    from volume_core.errors import SnapshotError

    with pair(tmp_path, "async", prefill=b"x" * RS) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "the initial sync")
        with pytest.raises(SnapshotError, match="consistent images"):
            pr.primary.create_snapshot("cycle-9")
        with pytest.raises(SnapshotError, match="replaced by the next cycle"):
            pr.secondary.delete_snapshot("cycle-1")
        listed = pr.secondary.list_snapshots()
        assert [(s["name"], s["internal"]) for s in listed] == [("cycle-1", True)]


def test_a_failed_sync_of_a_batch_of_chunks_sends_them_again(tmp_path):
    """The secondary syncs the chunks it applied together before acknowledging them
    (here, with no applier thread, a batch is one chunk); when that sync fails (its
    disk), the batch is answered WRITE_FAILED and the primary sends it again."""
    data = random.Random(9).randbytes(SIZE)
    with pair(tmp_path, "async") as pr:
        assert cycle(pr) == 1
        engine = pr.secondary
        real_flush = engine.flush
        calls = {"syncs": 0, "failed": 0}

        def flush() -> None:
            calls["syncs"] += 1
            if calls["failed"] == 0:
                calls["failed"] = 1
                raise OSError(errno.EIO, "test: the secondary's disk")
            real_flush()

        engine.flush = flush
        pr.primary.pwrite(data, 0)
        cycle(pr)
        assert pr.replicator.stats["chunks_refused"] >= 1 and calls["failed"] == 1
        assert pr.images() == (data, data)


def test_a_delta_after_one_percent_changed_conveys_those_regions_only(tmp_path):
    """The bytes on the wire, not only the chunks counted: the link's own byte count."""
    size = 64 << 20
    regions = size // RS
    with pair(tmp_path, "async", size=size, prefill=random.Random(10).randbytes(size)) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "the initial sync")
        changed = random.Random(11).sample(range(regions), max(1, regions // 100))
        for r in changed:
            pr.primary.pwrite(random.Random(r).randbytes(RS), r * RS)
        before = pr.session.channel.stats().bytes_sent
        conveyed = pr.replicator.stats["bytes_conveyed"]
        cycle(pr)
        assert pr.replicator.stats["bytes_conveyed"] - conveyed == len(changed) * RS
        on_wire = pr.session.channel.stats().bytes_sent - before
        # the data plus headers (cycle frames, chunk headers, a keepalive or two)
        assert len(changed) * RS <= on_wire <= len(changed) * RS + 4096, on_wire
        mine, theirs = pr.images()
        assert mine == theirs


def test_a_delta_of_small_writes_conveys_their_4k_blocks_not_whole_regions(tmp_path):
    """Scattered 4K writes, a 512-byte one and one across two regions: the cycle carries
    the 4K blocks they touched (on the wire too), and the images match."""
    size = 16 << 20
    with pair(tmp_path, "async", size=size, prefill=random.Random(12).randbytes(size)) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 30, "the initial sync")
        rng = random.Random(13)
        writes = [(rng.randrange(size // 4096) * 4096, 4096) for _ in range(40)]
        writes += [(5 * RS + 700, 512), (9 * RS - 2048, 4096)]
        for offset, length in writes:
            pr.primary.pwrite(rng.randbytes(length), offset)
        blocks = {b for offset, length in writes
                  for b in range(offset // 4096, -(-(offset + length) // 4096))}
        before = pr.session.channel.stats().bytes_sent
        conveyed = pr.replicator.stats["bytes_conveyed"]
        cycle(pr)
        assert pr.replicator.stats["bytes_conveyed"] - conveyed == len(blocks) * 4096
        on_wire = pr.session.channel.stats().bytes_sent - before
        # data, each extent's 16 bytes in a WRITEV table, headers
        assert len(blocks) * 4096 <= on_wire <= len(blocks) * (4096 + 16) + 4096, on_wire
        mine, theirs = pr.images()
        assert mine == theirs


def test_a_sparse_volume_syncs_in_proportion_to_its_data(tmp_path):
    """64 GiB, every region marked (as for a new secondary), 3 MiB of data: the holes
    travel as a few large ZERO frames, unread; the data as data."""
    size = 64 << 30
    pvol = Volume.create(tmp_path / "p", size, RS)
    svol = Volume.create(tmp_path / "s", size, RS)
    svol.update_info(role="secondary")
    data = {0: random.Random(20).randbytes(RS), 5 << 30: random.Random(21).randbytes(1 << 20),
            size - 2 * RS: random.Random(22).randbytes(2 * RS)}
    engine = Engine(pvol)
    for offset, buf in data.items():
        engine.pwrite(buf, offset)
    engine.tracker.mark(0, size)
    engine.close()
    frames: list[p.Frame] = []

    def wrap(handle):
        def counting(frame):
            if isinstance(frame, (p.Write, p.WriteV, p.Zero)):
                frames.append(frame)
            handle(frame)
        return counting

    with pair(tmp_path, "async", size=size, volumes=(pvol, svol), wrap=wrap) as pr:
        wait_until(lambda: pr.replicator.committed >= 1, 60, "the initial sync")
        assert pr.replicator.stats["bytes_conveyed"] == size
        written = [f for f in frames if isinstance(f, (p.Write, p.WriteV))]
        assert sum(f.length for f in written) == sum(map(len, data.values()))
        assert len(frames) < len(written) + 2 * (size >> 30), len(frames)
        with open(svol.data_path, "rb") as f:
            for offset, buf in data.items():
                f.seek(offset)
                assert f.read(len(buf)) == buf
        assert os.stat(svol.data_path).st_blocks * 512 < 16 << 20  # still sparse


def test_the_point_in_time_of_a_commit_is_its_take_on_both_sides(tmp_path):
    """last_consistent_at (and volume.json cycle_at) is when the cycle's marks were taken,
    not when it committed: a commit held up 0.5 s does not make the image look newer."""
    import time

    def wrap(handle):
        def slow_commit(frame):
            if isinstance(frame, p.CycleCommit):
                time.sleep(0.5)  # the secondary's commit is slow; nothing to wait for
            handle(frame)
        return slow_commit

    with pair(tmp_path, "async", wrap=wrap) as pr:
        pr.primary.pwrite(b"x" * RS, 0)
        asked = time.time()
        cycle(pr)
        done = time.time()
        at = pr.replicator.status()["last_consistent_at"]
        assert asked <= at <= done - 0.4, (asked, at, done)
        theirs = pr.receiver.status()
        assert abs(theirs["last_consistent_at"] - at) < 1e-5, (theirs, at)
        assert theirs["lag_s"] >= 0.4 and theirs["cycle_in_progress"] is None
        pr.applied()
        assert pr.secondary.volume.info.cycle_at == theirs["last_consistent_at"]
        assert pr.primary.volume.info.cycle_at == at
