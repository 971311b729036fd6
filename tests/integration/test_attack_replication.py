"""Attacks on the replication core (issue 11): a primary and a secondary in one process over
real TCP on loopback. Each test is a bug an attack found, fixed since."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import wait_until
from tests.integration.test_replication_pair import RS, Pair, identity
from tests.integration.test_replication_pair import pair as shared_pair
from volume_core.engine import Engine
from volume_core.replication import link
from volume_core.replication import protocol as p
from volume_core.replication.primary import RESYNC_WINDOW
from volume_core.replication.secondary import Receiver
from volume_core.replication.session import PrimarySession
from volume_core.volume import Volume

pytestmark = pytest.mark.integration

SIZE = 4 << 20


@contextlib.contextmanager
def pair(tmp_path, mode: str, **kw) -> Iterator[Pair]:
    """test_replication_pair's pair, on a smaller volume by default."""
    with shared_pair(tmp_path, mode, **{"size": SIZE, **kw}) as the_pair:
        yield the_pair


def gate(kind: type[p.Frame], opened: threading.Event):
    """A ``wrap`` for pair(): frames of ``kind`` wait (20 s at most) until ``opened``."""
    def wrap(handle):
        def gated(frame):
            if isinstance(frame, kind):
                opened.wait(20)
            handle(frame)
        return gated
    return wrap


def start(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def test_primary_returns_to_in_sync_after_the_secondary_recovers_a_failed_write(tmp_path):
    """Bug: WRITE_FAILED marks the region *out of sync* on the primary, and only a resync
    frame's ack clears that; resync runs only when a link comes up. The secondary recovers
    the region itself (READ_REGION / REGION_DATA), and the primary is never told: while the
    link stays up, status says out-of-sync forever and the region's mark is never swept,
    although both sides hold the same bytes.

    How: semi-async pair, the secondary's disk fails region 3 once; write it; wait until the
    secondary has recovered it and the two images are equal. Should: the primary returns to
    in-sync (the issue: "status showed them pending, then recovered") and sweeps the mark.
    """
    with pair(tmp_path, "semi-async") as pr:
        pr.faults.fail(3)
        pr.primary.pwrite(b"x" * RS, 3 * RS)
        wait_until(lambda: pr.receiver.status()["regions_recovered"] >= 1, 10,
                   "the secondary to recover region 3")
        wait_until(lambda: pr.receiver.status()["recovering_regions"] == 0, 10, "recovery")
        pr.primary.flush()
        assert (pr.primary.volume.data_path.read_bytes()
                == pr.secondary.volume.data_path.read_bytes())
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and pr.replicator.status()["state"] != "in-sync":
            time.sleep(0.05)
        st = pr.replicator.status()
        assert st["state"] == "in-sync", st
        assert pr.replicator.stats["links_lost"] == 0


def test_a_failing_send_while_the_receiver_answers_read_region_does_not_deadlock(tmp_path):
    """Fixed bug: the primary answered READ_REGION on the link's receiver thread with
    ``Engine.read_ordered``, which waits (no timeout) for the regions held by a host write.
    A host write holds its regions through ``submit``, and when a send fails there (the channel
    closed meanwhile, or a full window's send timeout) ``submit`` calls ``_drop`` ->
    ``Channel.close()``, which joins the receiver thread. The receiver waits for the region,
    the writer waits for the receiver: both hang forever, and with them every later write to
    that region, every write whose ack timeout also tries to close the channel, ``quiesce``
    (snapshots) and the reconnect.

    How (made deterministic with a pre-write hook on the primary and a gate on the
    secondary's DATA frames): write W0 to region 2, the secondary's disk fails it; host
    write W1 to region 2 holds the region (paused in the hook); the secondary's WRITE_FAILED
    and READ_REGION arrive and the primary's receiver blocks in read_ordered; meanwhile a
    write to region 9 gets no ack (the receiver is stuck) and its ack timeout closes the
    channel; then W1 goes on, its send fails on the closed channel, and it joins the
    receiver. Should: W1 completes within about the ack timeout (out of sync), no thread hangs.
    """
    opened = threading.Event()
    wrap = gate(p.Data, opened)

    armed, held, release = threading.Event(), threading.Event(), threading.Event()
    region = 2

    def hook(offset: int, length: int) -> None:
        if armed.is_set() and offset // RS == region:
            held.set()
            release.wait(20)

    with pair(tmp_path, "semi-async", ack_timeout=1.0, wrap=wrap) as pr:
        eng, rep = pr.primary, pr.replicator
        pr.faults.fail(region)
        eng.pre_write.append(hook)
        eng.pwrite(b"0" * RS, region * RS)  # W0: META acked; its DATA waits at the gate
        armed.set()
        w1 = start(eng.pwrite, b"1" * RS, region * RS)
        assert held.wait(10)
        opened.set()  # W0's DATA fails on the secondary: WRITE_FAILED, READ_REGION
        wait_until(lambda: rep.stats["write_failures_reported"] >= 1, 10, "WRITE_FAILED")
        wait_until(lambda: eng._region_locks._waiters >= 1, 10,
                   "the receiver thread to wait for region 2 in read_ordered")
        w2 = start(eng.pwrite, b"2" * RS, 9 * RS)
        w2.join(5)  # acked: READ_REGION waits on a worker, not on the link's receiver thread
        stuck_receiver = w2.is_alive()
        release.set()  # W1 goes on
        w1.join(5)
        hung = w1.is_alive()
        if hung:  # unblock everything so the test cleans up: let go of region 2 by hand
            with eng._lock:
                eng._region_locks.let_go(region, region + 1)
        w1.join(10)
        w2.join(10)
        assert not stuck_receiver, "a write elsewhere waited on the stuck receiver thread"
        assert not hung, "host write W1 deadlocked with the link's receiver thread"


def test_a_host_write_never_waits_past_the_ack_timeout_behind_a_stuck_resync(tmp_path):
    """Bug: a resync chunk is read and queued with ``read_ordered``, which holds the chunk's
    regions while ``send_bulk`` waits for room in the window. When the secondary stops taking
    data, that wait lasts until the channel gives up (``peer_timeout``: the sender sees no
    progress; or ``send_timeout``, 10 s by default), and a host write to any of those regions
    waits as long at the region lock, whatever ``ack_timeout`` says. (``submit`` has the same
    shape: a host write blocked in ``send_bulk`` holds its regions for ``send_timeout``.)

    How: 16 MiB marked on the primary before it connects; the secondary's frame handler
    stops at the first resync WRITE (the harness: a disk or a receiver stuck), so TCP and the
    window fill and the resync thread blocks in ``send_bulk`` holding a chunk. A host write
    to that chunk, ack timeout 0.5 s, peer timeout 3 s. Should: the host write completes in
    about the ack timeout (its region stays out of sync). It takes about 3 s.
    """
    opened = threading.Event()
    wrap = gate(p.Write, opened)

    size = 16 << 20
    data = random.Random(5).randbytes(size)
    options = link.ChannelOptions(window=1 << 20, peer_timeout=3.0)
    with pair(tmp_path, "semi-async", ack_timeout=0.5, wrap=wrap, options=options, size=size,
              prefill=data) as pr:
        eng = pr.primary
        try:
            # the resync stalls: its window full (blocked in send_bulk), or (when the socket
            # buffers took every chunk it may send) all RESYNC_WINDOW chunks unacknowledged
            def stalled() -> bool:
                channel = pr.session.channel
                return channel is not None and (
                    channel.stats().bulk_queued_bytes >= (1 << 20)
                    or len(pr.replicator._resync_sent) >= RESYNC_WINDOW)

            wait_until(stalled, 10, "the resync to stall")
            time.sleep(0.2)
            # (the resync now keeps at most RESYNC_WINDOW chunks unacknowledged and waits
            # for room holding no region: a chunk may or may not be held here)
            held = [i for i, h in enumerate(eng._region_locks._held) if h] or [0]
            t0 = time.monotonic()
            eng.pwrite(b"h" * 512, held[0] * RS)
            took = time.monotonic() - t0
        finally:
            opened.set()
        assert took < 1.5, f"a host write took {took:.1f} s with an ack timeout of 0.5 s"


def test_a_new_secondary_gets_everything_before_the_primary_says_in_sync(tmp_path):
    """Fixed bug: the primary did not remember which secondary it replicated to. Its marks say
    what may differ from *that* secondary; a different secondary volume (the old disk
    replaced, the volume re-created empty at the same address, another host) pairs with it
    as "the first primary to connect", the primary resyncs only its current marks (after a
    sweep: none), and status says in-sync while the new secondary holds none of the data.

    How: a semi-async pair replicates 1 MiB and sweeps; then the primary's session is pointed
    at a fresh, empty secondary volume. Should: the primary sees an unknown secondary uuid in
    HELLO_REPLY and copies everything (or refuses it); status says in-sync only once the
    two hold the same bytes.
    """
    data = random.Random(7).randbytes(1 << 20)
    with pair(tmp_path, "semi-async") as pr:
        rep = pr.replicator
        pr.primary.pwrite(data, 0)
        pr.primary.flush()
        wait_until(lambda: rep.status()["state"] == "in-sync"
                   and pr.primary.tracker.count() == 0, 10, "in-sync and swept")
        pr.session.close()
        vol2 = Volume.create(tmp_path / "s2", SIZE, RS)
        vol2.update_info(role="secondary")
        eng2 = Engine(vol2, replica=True)
        rx2 = Receiver(eng2, "semi-async", None)

        def on_channel(channel: link.Channel) -> None:
            rx2.out = channel
            channel.start(rx2.handle, lambda reason: rx2.link_lost())

        listener2 = link.Listener(
            "127.0.0.1", 0, identity=identity(vol2), on_channel=on_channel,
            decide=lambda hello: p.hello_problem(hello, identity(vol2), secret=False)).start()
        host, port = listener2.address
        pvol = pr.primary.volume
        session2 = PrimarySession(rep, host, port, identity=lambda: identity(pvol),
                                  sweep_interval=0.2,
                                  backoff=link.Backoff(initial=0.05, maximum=0.2)).start()
        try:
            wait_until(lambda: session2.connects >= 1, 10, "the link to the new secondary")
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and rep.status()["state"] != "in-sync":
                time.sleep(0.05)
            said = rep.status()["state"]
            same = pr.primary.volume.data_path.read_bytes() == vol2.data_path.read_bytes()
            assert same or said != "in-sync", "in-sync while the new secondary has no data"
            assert same, f"the new secondary never got the data (primary says {said})"
        finally:
            session2.close()
            listener2.close()
            eng2.close()
