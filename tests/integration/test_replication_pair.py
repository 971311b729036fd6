"""A primary and a secondary in one process, over real TCP on loopback: the engines, the
primary's replicator and session, the link, and the secondary's receiver, all real."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from tests.conftest import wait_until
from tests.fault_proxy import FaultProxy
from volume_core import staging
from volume_core.engine import Engine
from volume_core.errors import NbdMirrorError
from volume_core.replication import link
from volume_core.replication import protocol as p
from volume_core.replication.mirror import AsyncMirror
from volume_core.replication.primary import PrimaryReplicator
from volume_core.replication.secondary import FaultInjector, Receiver
from volume_core.replication.session import PrimarySession
from volume_core.volume import Volume

pytestmark = pytest.mark.integration

RS = 64 << 10
SIZE = 8 << 20


def identity(vol: Volume) -> p.Identity:
    return p.Identity(vol.info.uuid, vol.size, vol.region_size, vol.info.generation)


@dataclass
class Pair:
    primary: Engine
    secondary: Engine
    replicator: PrimaryReplicator | AsyncMirror
    receiver: Receiver
    session: PrimarySession
    listener: link.Listener
    faults: FaultInjector
    proxy: FaultProxy | None = None

    def wait_in_sync(self, timeout: float = 30.0) -> None:
        wait_until(lambda: self.replicator.status()["state"] == "in-sync", timeout,
                   "the primary to say in-sync")

    def applied(self) -> None:
        """Wait for the secondary's apply under way (a staged cycle's, after its CYCLE_ACK):
        as a reader of its consistent image does."""
        with staging.applying(self.secondary.volume, shared=True):
            pass

    def secondary_cycle(self) -> int:
        """The cycle the secondary's volume holds, once its apply is over."""
        self.applied()
        return self.secondary.volume.info.cycle

    def images(self) -> tuple[bytes, bytes]:
        self.applied()
        return (self.primary.volume.data_path.read_bytes(),
                self.secondary.volume.data_path.read_bytes())


Handler = Callable[[p.Frame], None]


@contextlib.contextmanager
def pair(tmp_path, mode: str, *, via_proxy: bool = False, ack_timeout: float = 2.0,
         wrap: Callable[[Handler], Handler] | None = None,
         options: link.ChannelOptions | None = None, size: int = SIZE,
         prefill: bytes | None = None, interval: float = 0,
         volumes: tuple[Volume, Volume] | None = None) -> Iterator[Pair]:
    """A replicating pair in this process. ``wrap`` may wrap the secondary's frame handler
    (test harness); ``prefill`` is written to the primary before the replicator is
    attached (all marked); ``via_proxy`` puts a FaultProxy on the link. A timer
    thread ticks the receiver (recovery retries), as receiver.py's does. Mode async:
    cycles every ``interval`` seconds (0: when asked, and once at each connect).
    ``volumes``: (primary, secondary) made by an earlier pair, instead of new ones."""
    if volumes is None:
        pvol = Volume.create(tmp_path / "p", size, RS)
        svol = Volume.create(tmp_path / "s", size, RS)
        svol.update_info(role="secondary")
    else:
        pvol, svol = volumes
    primary, secondary = Engine(pvol), Engine(svol, replica=True)
    if prefill is not None:
        primary.pwrite(prefill, 0)
    faults = FaultInjector()
    receiver = Receiver(secondary, mode, None, faults=faults)

    def on_channel(channel: link.Channel) -> None:
        receiver.out = channel
        handle = wrap(receiver.handle) if wrap else receiver.handle
        channel.start(handle, lambda reason: receiver.link_lost())

    listener = link.Listener(
        "127.0.0.1", 0, identity=identity(svol), on_channel=on_channel, options=options,
        decide=lambda hello: p.hello_problem(hello, identity(svol), secret=False),
        marks=receiver.marked_runs).start()
    target = listener.address
    proxy = FaultProxy(target).start() if via_proxy else None
    host, port = proxy.address if proxy else target
    replicator: PrimaryReplicator | AsyncMirror
    if mode == "async":
        replicator = AsyncMirror(primary, interval=interval, ack_timeout=ack_timeout)
    else:
        replicator = PrimaryReplicator(primary, mode, ack_timeout=ack_timeout)
        primary.attach_replicator(replicator)
    session = PrimarySession(replicator, host, port, identity=lambda: identity(pvol),
                             sweep_interval=0.2, options=options,
                             backoff=link.Backoff(initial=0.05, maximum=0.2)).start()
    stop_ticking = threading.Event()

    def tick() -> None:
        while not stop_ticking.wait(0.05):
            with contextlib.suppress(NbdMirrorError):  # a link closing: as receiver.py's timer
                receiver.tick()

    ticker = threading.Thread(target=tick, daemon=True, name="receiver-tick")
    ticker.start()
    try:
        wait_until(lambda: replicator.state == "connected", 20, "the link to come up")
        yield Pair(primary, secondary, replicator, receiver, session, listener, faults, proxy)
    finally:
        stop_ticking.set()
        ticker.join()
        session.close()
        listener.close()
        if proxy:
            proxy.close()
        primary.close()
        secondary.close()


def hammer(engine: Engine, writers: int, writes: int, span: int, scatter: float = 0.2) -> None:
    """Many threads writing over one small overlapping range, and some scattered writes."""
    errors = []

    def writer(k: int) -> None:
        rnd = random.Random(k)
        try:
            for _ in range(writes):
                if rnd.random() >= scatter:
                    off = rnd.randrange(0, span)
                else:
                    off = rnd.randrange(0, SIZE - 2 * RS)
                engine.pwrite(rnd.randbytes(rnd.randrange(1, 3 * 4096)), off)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]


@pytest.mark.parametrize("mode", ["sync", "semi-async"])
def test_concurrent_overlapping_writers_end_identical_on_both_sides(tmp_path, mode):
    with pair(tmp_path, mode) as pr:
        hammer(pr.primary, writers=6, writes=150, span=2 * RS)
        pr.primary.trim(RS, 4 * RS)
        pr.primary.zero(RS, 6 * RS, may_trim=False)
        pr.primary.flush()
        pr.wait_in_sync()
        mine, theirs = pr.images()
        assert mine == theirs
        st = pr.receiver.status()
        assert st["writes_applied"] >= 6 * 150 and st["recovering_regions"] == 0


def test_status_never_says_in_sync_while_regions_differ_after_a_cut(tmp_path):
    with pair(tmp_path, "semi-async", via_proxy=True) as pr:
        hammer(pr.primary, writers=2, writes=50, span=SIZE // 2)
        pr.wait_in_sync()
        pr.proxy.cut_after(200_000)  # the link breaks in the middle of a frame
        hammer(pr.primary, writers=2, writes=100, span=SIZE // 2)
        mine, theirs = pr.images()
        differ = {i for i in range(SIZE // RS)
                  if mine[i * RS:(i + 1) * RS] != theirs[i * RS:(i + 1) * RS]}
        wait_until(lambda: pr.replicator.stats["links_lost"] >= 1, 10, "the cut to be noticed")
        st = pr.replicator.status()
        if differ:
            assert st["state"] != "in-sync", (st, sorted(differ))
        marked = set(np.flatnonzero(pr.primary.tracker.marks).tolist())
        assert differ <= marked, f"regions differ but are not marked: {sorted(differ - marked)}"


@pytest.mark.parametrize("mode", ["sync", "semi-async"])
def test_after_a_cut_the_primary_reconnects_and_resends_only_what_is_out_of_sync(tmp_path,
                                                                                   mode):
    with pair(tmp_path, mode, via_proxy=True) as pr:
        hammer(pr.primary, writers=2, writes=50, span=SIZE // 2)
        pr.primary.flush()
        pr.wait_in_sync()
        pr.proxy.cut_after(100_000)  # mid-frame, while the writes below go on
        hammer(pr.primary, writers=2, writes=80, span=SIZE // 4, scatter=0)
        wait_until(lambda: pr.replicator.stats["links_lost"] >= 1, 10, "the cut")
        wait_until(lambda: pr.session.connects >= 2, 20, "a reconnect")
        pr.primary.flush()
        pr.wait_in_sync()
        mine, theirs = pr.images()
        assert mine == theirs
        resync = pr.replicator.status()["resync"]
        regions = SIZE // RS
        # only regions written around the cut travel again, never the whole volume
        assert 0 < resync["regions"] <= regions // 4 + 4, resync
        assert resync["bytes_sent"] == resync["regions"] * RS


def test_sync_flush_after_a_failed_secondary_write_returns_once_it_recovered(tmp_path):
    with pair(tmp_path, "sync") as pr:
        region = 5
        pr.faults.fail(region, times=2)  # the write, then the first recovery (a retry follows)
        data = random.Random(5).randbytes(RS)
        pr.primary.pwrite(data, region * RS)  # completes on WRITE_FAILED
        assert pr.replicator.stats["write_failures_reported"] == 1
        started = time.monotonic()
        pr.primary.flush()
        took = time.monotonic() - started
        # The flush covers the failed write: the secondary holds it, durably, by now.
        st = pr.receiver.status()
        assert (st["recovering_regions"], st["regions_recovered"]) == (0, 1), st
        held = bytearray(RS)
        pr.secondary.pread(held, region * RS)
        assert held == data
        assert took < 2.0 and pr.replicator.stats["timeouts"] == 0
        assert pr.replicator.stats["links_lost"] == 0
        pr.wait_in_sync()
        mine, theirs = pr.images()
        assert mine == theirs


def test_sync_flush_waiting_for_a_recovery_is_bounded_by_the_ack_timeout(tmp_path):
    with pair(tmp_path, "sync", ack_timeout=0.5) as pr:
        region = 6
        pr.faults.fail(region, times=5)  # recovery keeps failing for longer than the timeout
        pr.primary.pwrite(b"t" * RS, region * RS)
        started = time.monotonic()
        pr.primary.flush()  # returns (never fails) once the timeout has dropped the link
        took = time.monotonic() - started
        assert 0.4 < took < 2.0, took
        assert pr.replicator.stats["timeouts"] == 1
        wait_until(lambda: pr.replicator.stats["links_lost"] >= 1, 5, "the link to be dropped")
        pr.primary.flush()
        pr.wait_in_sync()  # reconnected, the region resynced
        mine, theirs = pr.images()
        assert mine == theirs
