"""AsyncMirror's answers to the secondary, on a real engine, with a channel that records
what is sent (the link itself is tested in tests/integration/test_async_pair.py)."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import wait_until
from volume_core.engine import Engine
from volume_core.errors import ProtocolError, UsageError
from volume_core.replication import protocol as p
from volume_core.replication.mirror import AsyncMirror
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 64 << 10


class Recorder:
    """A channel that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[p.Frame] = []
        self.lock = threading.Lock()
        self.closed: str | None = None

    def send_urgent(self, frame: p.Frame) -> None:
        with self.lock:
            self.sent.append(frame)

    def send_bulk(self, frame: p.Frame, timeout: float | None = None, lent: bool = False,
                  window: int | None = None, handoff: bool = False) -> None:
        self.send_urgent(frame)

    def close(self, reason: str = "") -> None:
        self.closed = reason


@pytest.fixture
def mirrored(tmp_path):
    vol = Volume.create(tmp_path / "v", 4 << 20, RS)
    engine = Engine(vol)
    mirror = AsyncMirror(engine, interval=0)
    yield engine, mirror
    mirror.close()
    engine.close()


def test_a_recovery_request_is_answered_from_the_live_volume_and_marked(mirrored):
    engine, mirror = mirrored
    engine.pwrite(b"L" * RS, 3 * RS)
    engine.tracker.clear()  # as after a committed cycle
    channel = Recorder()
    mirror.connected(channel)
    mirror.on_frame(p.ReadRegion(0x8000_0001, 3 * RS, RS))
    wait_until(lambda: any(isinstance(f, p.RegionData) for f in channel.sent), 10,
               "the answer")
    answer = next(f for f in channel.sent if isinstance(f, p.RegionData))
    assert (answer.seq, answer.offset, bytes(answer.data)) == (0x8000_0001, 3 * RS, b"L" * RS)
    # the next cycle carries it too: marked, or already taken by the pass the connect
    # started (which then conveys it)
    assert engine.tracker.marks[3] == 1 or engine.tracker._outstanding[3] == 1
    assert channel.closed is None


def test_frames_a_primary_never_takes_are_refused(mirrored):
    _, mirror = mirrored
    with pytest.raises(ProtocolError, match="async primary does not expect"):
        mirror.on_frame(p.MetaAck(1))


def test_non_durable_marks_are_refused(tmp_path):
    vol = Volume.create(tmp_path / "v", 4 << 20, RS)
    engine = Engine(vol, durable_marks=False)
    try:
        with pytest.raises(UsageError, match="durable marks"):
            AsyncMirror(engine)
    finally:
        engine.close()


class Acking(Recorder):
    """A channel whose far end applies nothing and acknowledges everything at once."""

    def __init__(self, mirror: AsyncMirror) -> None:
        super().__init__()
        self.mirror = mirror

    def send_urgent(self, frame: p.Frame) -> None:
        super().send_urgent(frame)
        if isinstance(frame, p.CycleCommit):
            threading.Thread(target=self.mirror.on_frame, args=(p.CycleAck(frame.seq),)).start()

    def send_bulk(self, frame: p.Frame, timeout: float | None = None, lent: bool = False,
                  window: int | None = None, handoff: bool = False) -> None:
        super().send_urgent(frame)
        threading.Thread(target=self.mirror.on_frame, args=(p.DataAck(frame.seq),)).start()


def test_a_cycle_asked_for_while_the_link_is_down_runs_after_the_resumed_one(mirrored):
    """run_now() during an open cycle promises the next one; asked while disconnected, the
    resumed cycle must not count as the one promised."""
    engine, mirror = mirrored
    engine.pwrite(b"v" * RS, 8 * RS)
    mirror.connected(Acking(mirror))  # the initial sync, then cycle 1
    wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
    mirror.disconnected("test: the link broke")
    engine.pwrite(b"w" * (4 * RS), 0)
    silent = Recorder()  # takes the first chunks and never answers
    mirror.connected(silent)
    wait_until(lambda: any(isinstance(f, p.Write) for f in silent.sent), 10, "cycle 2")
    mirror.disconnected("test: the link broke")
    want = mirror.run_now()
    assert want == 3  # cycle 2 is open: what was written before this needs cycle 3
    mirror.connected(Acking(mirror))
    wait_until(lambda: mirror.committed >= 3, 10, f"cycle {want} to commit")


def test_the_initial_sync_reads_the_live_volume_and_the_first_cycle_follows(mirrored):
    """No consistent image yet: the first pass copies nothing on write (no VOL/cycle), a
    region written during it is carried by cycle 1, which follows at once; a cycle asked
    for during the pass is that cycle 1."""
    engine, mirror = mirrored
    engine.pwrite(b"a" * (8 * RS), 0)
    silent = Recorder()
    mirror.connected(silent)
    wait_until(lambda: any(isinstance(f, p.Write) for f in silent.sent), 10, "the pass")
    assert not any(isinstance(f, p.CycleBegin) for f in silent.sent)
    assert not (engine.volume.path / "cycle").exists() and not engine.pre_write
    assert mirror.status()["cycle"]["state"] == "initial-sync"
    engine.pwrite(b"b" * RS, 2 * RS)  # conveyed already, or about to be: marked again
    assert mirror.run_now() == 1
    mirror.disconnected("test: the link broke")
    acking = Acking(mirror)
    mirror.connected(acking)  # the pass resumes, then cycle 1
    wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
    writes = [f for f in acking.sent if isinstance(f, (p.Write, p.Zero))]
    begin = next(i for i, f in enumerate(acking.sent) if isinstance(f, p.CycleBegin))
    cycle_one = [f for f in acking.sent[begin:] if isinstance(f, p.Write)]
    assert [(f.offset, bytes(f.data)) for f in cycle_one] == [(2 * RS, b"b" * RS)]
    assert sum(f.length for f in writes) <= 8 * RS + RS  # nothing of the pass sent twice
    st = mirror.status()
    assert st["initial_sync"]["bytes"] + st["last_cycle"]["bytes"] == st["bytes_conveyed"]
    assert engine.tracker.count() == 0
