"""The secondary's policy (replication/secondary.py) on a real replica engine, no sockets:
acks and their order, durable pending marks, write order, recovery, clearing."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from volume_core.engine import Engine
from volume_core.errors import ProtocolError, UsageError
from volume_core.regions import load_marks
from volume_core.replication import protocol as p
from volume_core.replication.secondary import (
    REQUEST_ID_BASE,
    SEMI_ASYNC,
    SYNC,
    FaultInjector,
    Receiver,
)
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 4096
REGIONS = 64
SIZE = RS * REGIONS


class Out:
    """A recording channel; ``on_send`` sees each frame as it is sent."""

    def __init__(self) -> None:
        self.frames: list[p.Frame] = []
        self.paths: list[str] = []
        self.on_send = None
        self.lock = threading.Lock()

    def send_urgent(self, frame: p.Frame) -> None:
        self._record("urgent", frame)

    def send_bulk(self, frame: p.Frame) -> None:
        self._record("bulk", frame)

    def flush(self) -> None:
        pass

    def _record(self, path: str, frame: p.Frame) -> None:
        if self.on_send is not None:
            self.on_send(frame)
        with self.lock:
            self.frames.append(frame)
            self.paths.append(path)

    def of(self, cls: type) -> list:
        return [f for f in self.frames if isinstance(f, cls)]

    def take(self) -> list[p.Frame]:
        frames, self.frames = self.frames, []
        return frames


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def volume(tmp_path):
    vol = Volume.create(tmp_path / "sec", SIZE, RS)
    vol.update_info(role="secondary")
    return vol


@pytest.fixture
def engine(volume):
    eng = Engine(volume, replica=True)
    yield eng
    eng.close()


def make(engine, mode=SEMI_ASYNC, **kw) -> tuple[Receiver, Out]:
    out = Out()
    return Receiver(engine, mode, out, **kw), out


def read(engine: Engine, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    engine.pread(buf, offset)
    return bytes(buf)


def on_disk_marks(volume: Volume) -> np.ndarray:
    return load_marks(volume.marks_path, volume.regions)


def marked(engine: Engine) -> set[int]:
    return {int(r) for r in np.flatnonzero(engine.tracker.marks)}


# -- sync ----------------------------------------------------------------------


def test_sync_write_is_applied_then_data_acked(engine):
    rx, out = make(engine, SYNC)
    seen = []
    out.on_send = lambda f: seen.append((f, read(engine, 100, 5)))
    rx.handle(p.Write(1, 100, b"hello", fua=True))
    assert seen == [(p.DataAck(1), b"hello")]
    rx.handle(p.Trim(2, 0, RS))
    rx.handle(p.Zero(3, RS, RS, may_trim=False))
    assert out.of(p.DataAck) == [p.DataAck(1), p.DataAck(2), p.DataAck(3)]
    assert read(engine, 0, 2 * RS) == bytes(2 * RS)
    st = rx.status()
    assert (st["writes_applied"], st["bytes_applied"], st["pending_regions"]) == (3, 5 + 2 * RS, 0)
    assert set(out.paths) == {"urgent"}


def test_meta_in_sync_mode_is_refused(engine):
    rx, _ = make(engine, SYNC)
    with pytest.raises(ProtocolError, match="META"):
        rx.handle(p.Meta(1, 0, RS))


def test_an_unknown_mode_is_refused(engine):
    with pytest.raises(UsageError, match="mode"):
        Receiver(engine, "eventually", Out())


# -- semi-async ----------------------------------------------------------------


def test_semi_async_ack_precedes_data_and_the_region_is_durably_pending(engine, volume):
    rx, out = make(engine)
    region = 5
    at_ack = {}

    def look(frame):
        if isinstance(frame, p.MetaAck):
            at_ack["disk_mark"] = int(on_disk_marks(volume)[region])
            at_ack["data"] = read(engine, region * RS, RS)
            at_ack["status"] = rx.status()

    out.on_send = look
    assert on_disk_marks(volume)[region] == 0
    rx.handle(p.Meta(7, region * RS, RS))
    assert out.take() == [p.MetaAck(7)]
    assert at_ack["disk_mark"] == 1 and at_ack["data"] == bytes(RS)
    assert at_ack["status"]["pending_regions"] == 1
    rx.sweep()  # unsettled: never cleared
    assert region in marked(engine) and on_disk_marks(volume)[region] == 1
    rx.handle(p.Data(7, region * RS, b"x" * RS))
    assert out.take() == [p.DataAck(7)]
    assert read(engine, region * RS, RS) == b"x" * RS
    assert rx.status()["pending_regions"] == 0


def test_trim_and_zero_metas_are_applied_right_after_their_ack(engine):
    rx, out = make(engine)
    rx.handle(p.Write(1, 0, b"a" * (2 * RS)))
    rx.handle(p.Meta(2, 0, RS, p.WriteKind.TRIM))
    rx.handle(p.Meta(3, RS, 10, p.WriteKind.ZERO))
    assert out.take() == [p.DataAck(1), p.MetaAck(2), p.DataAck(2), p.MetaAck(3), p.DataAck(3)]
    assert read(engine, 0, RS + 20) == bytes(RS + 10) + b"a" * 10
    with pytest.raises(ProtocolError, match="no META waiting"):
        rx.handle(p.Data(2, 0, b"b" * RS))


def test_out_of_order_data_for_overlapping_writes_lands_in_seq_order(engine):
    rx, out = make(engine)
    rx.handle(p.Meta(1, 0, 2 * RS))
    rx.handle(p.Meta(2, RS, RS))  # shares region 1 with write 1
    out.take()
    rx.handle(p.Data(2, RS, b"2" * RS))  # overtook write 1's data: waits
    assert out.take() == [] and read(engine, RS, RS) == bytes(RS)
    assert rx.status()["waiting_writes"] == 1
    rx.handle(p.Data(1, 0, b"1" * (2 * RS)))
    assert out.take() == [p.DataAck(1), p.DataAck(2)]
    assert read(engine, 0, 2 * RS) == b"1" * RS + b"2" * RS
    assert rx.status()["waiting_writes"] == 0


def test_data_for_other_regions_does_not_wait(engine):
    rx, out = make(engine)
    rx.handle(p.Meta(1, 0, RS))
    rx.handle(p.Meta(2, 4 * RS, RS))
    out.take()
    rx.handle(p.Data(2, 4 * RS, b"b" * RS))
    assert out.take() == [p.DataAck(2)]
    rx.handle(p.Data(1, 0, b"a" * RS))
    assert out.take() == [p.DataAck(1)]


def _random_writes(rng: random.Random, n: int, span: int) -> list[tuple[int, int, bytes]]:
    writes = []
    for seq in range(1, n + 1):
        offset = rng.randrange(0, span - 1)
        length = rng.randrange(1, min(3 * RS, span - offset) + 1)
        writes.append((seq, offset, bytes([seq % 251 + 1]) * length))
    return writes


def _model(writes, size: int = SIZE) -> bytes:
    image = bytearray(size)
    for _, offset, data in writes:
        image[offset:offset + len(data)] = data
    return bytes(image)


def test_any_arrival_order_of_data_ends_as_the_primary_applied_it(engine):
    rng = random.Random(11)
    rx, out = make(engine)
    writes = _random_writes(rng, 200, 4 * RS)  # 4 regions: nearly every write overlaps
    for seq, offset, data in writes:
        rx.handle(p.Meta(seq, offset, len(data)))
    for seq, offset, data in rng.sample(writes, len(writes)):
        rx.handle(p.Data(seq, offset, data))
    assert read(engine, 0, SIZE) == _model(writes)
    assert len(out.of(p.DataAck)) == 200 and rx.status()["pending_writes"] == 0


def test_metas_and_data_from_two_reader_threads_end_as_the_primary_applied_it(engine):
    """The link's urgent and bulk readers call handle() at once."""
    rng = random.Random(5)
    rx, out = make(engine)
    writes = _random_writes(rng, 300, 6 * RS)
    acked = {seq: threading.Event() for seq, _, _ in writes}
    out.on_send = lambda f: acked[f.seq].set() if isinstance(f, p.MetaAck) else None
    order = writes[:]
    for i in range(0, len(order) - 8, 8):  # the bulk path delivers slightly out of order
        chunk = order[i:i + 8]
        rng.shuffle(chunk)
        order[i:i + 8] = chunk
    errors = []

    def bulk():
        try:
            for seq, offset, data in order:
                assert acked[seq].wait(10)
                rx.handle(p.Data(seq, offset, data))
        except (AssertionError, ProtocolError, OSError) as err:  # reported below
            errors.append(err)

    t = threading.Thread(target=bulk)
    t.start()
    for seq, offset, data in writes:
        rx.handle(p.Meta(seq, offset, len(data)))
    t.join(20)
    assert not t.is_alive() and not errors
    assert read(engine, 0, SIZE) == _model(writes)
    assert sorted(f.seq for f in out.of(p.DataAck)) == list(range(1, 301))


# -- protocol violations -------------------------------------------------------


@pytest.mark.parametrize("frames, match", [
    ([p.Data(9, 0, b"a" * RS)], "no META"),
    ([p.Meta(1, 0, RS), p.Data(1, RS, b"a" * RS)], "its META said"),
    ([p.Meta(1, 0, RS), p.Data(1, 0, b"a" * (RS - 1))], "its META said"),
    ([p.Meta(1, 0, RS), p.Meta(1, RS, RS)], "twice"),
    ([p.Meta(1, SIZE - RS, 2 * RS)], "inside the volume"),
    ([p.RegionData(REQUEST_ID_BASE | 1, 0, b"a" * RS)], "not outstanding"),
    ([p.MetaAck(1)], "does not take"),
])
def test_bad_frames_raise_protocol_error(engine, frames, match):
    rx, _ = make(engine)
    with pytest.raises(ProtocolError, match=match):
        for frame in frames:
            rx.handle(frame)


# -- recovery ------------------------------------------------------------------


def test_failed_write_is_reported_then_recovered_from_the_primary(engine, volume):
    faults = FaultInjector()
    faults.fail(2)
    rx, out = make(engine, faults=faults)
    rx.handle(p.Meta(1, 2 * RS + 100, 50))
    rx.handle(p.Data(1, 2 * RS + 100, b"w" * 50))
    ack, failed, ask = out.take()
    assert ack == p.MetaAck(1) and failed == p.WriteFailed(1, 2 * RS + 100, 50)
    assert isinstance(ask, p.ReadRegion) and (ask.offset, ask.length) == (2 * RS, RS)
    assert ask.seq & REQUEST_ID_BASE
    st = rx.status()
    assert (st["recovering_regions"], st["write_failures"]) == (1, 1)
    assert on_disk_marks(volume)[2] == 1
    rx.sweep()
    assert 2 in marked(engine)  # recovering: never cleared
    # A later write to the region waits for the answer (which may not hold it).
    rx.handle(p.Meta(2, 2 * RS, 10))
    rx.handle(p.Data(2, 2 * RS, b"n" * 10))
    assert out.take() == [p.MetaAck(2)]
    primary = bytearray(b"p" * RS)
    primary[100:150] = b"w" * 50
    rx.handle(p.RegionData(ask.seq, 2 * RS, bytes(primary)))
    assert out.take() == [p.DataAck(ask.seq), p.DataAck(2)]  # the recovery, then write 2
    assert read(engine, 2 * RS, RS) == b"n" * 10 + bytes(primary[10:])
    st = rx.status()
    assert (st["recovering_regions"], st["regions_recovered"]) == (0, 1)
    assert rx.sweep() >= 1 and 2 not in marked(engine)


def test_a_recovery_that_fails_again_is_asked_again_after_a_backoff(engine):
    faults, clock = FaultInjector(), Clock()
    faults.fail(3, times=2)
    rx, out = make(engine, SYNC, faults=faults, clock=clock, retry_base=1.0)
    rx.handle(p.Write(1, 3 * RS, b"a" * RS))
    failed, ask = out.take()
    assert isinstance(failed, p.WriteFailed) and isinstance(ask, p.ReadRegion)
    rx.handle(p.RegionData(ask.seq, 3 * RS, b"a" * RS))  # fails on disk again
    assert out.take() == []
    assert rx.tick(clock.now + 0.5) == clock.now + 1.0 and out.take() == []
    assert rx.status()["recovering_regions"] == 1
    rx.tick(clock.now + 1.0)
    (again,) = out.take()
    assert isinstance(again, p.ReadRegion) and again.seq != ask.seq
    with pytest.raises(ProtocolError, match="not outstanding"):
        rx.handle(p.RegionData(ask.seq, 3 * RS, b"a" * RS))
    rx.handle(p.RegionData(again.seq, 3 * RS, b"a" * RS))
    assert read(engine, 3 * RS, RS) == b"a" * RS
    st = rx.status()
    assert (st["recovering_regions"], st["recovery_attempts"], faults.injected) == (0, 2, 2)
    assert rx.tick(clock.now + 100) is None


def test_an_unanswered_request_is_given_up_and_its_late_answer_ignored(engine):
    faults, clock = FaultInjector(), Clock()
    faults.fail(4)
    rx, out = make(engine, SYNC, faults=faults, clock=clock, answer_timeout=5.0)
    rx.handle(p.Write(1, 4 * RS, b"a" * RS))
    _, ask = out.take()
    rx.tick(clock.now + 5.0)
    (again,) = out.take()
    rx.handle(p.RegionData(ask.seq, 4 * RS, b"old" * 10 + bytes(RS - 30)))  # ignored
    rx.handle(p.RegionData(again.seq, 4 * RS, b"b" * RS))
    assert read(engine, 4 * RS, RS) == b"b" * RS
    assert rx.status()["stale_answers"] == 1


# -- flush, ping, clearing, link loss -------------------------------------------


def test_flush_syncs_and_acks_and_a_failed_sync_recovers_what_it_held(engine):
    rx, out = make(engine, SYNC)
    rx.handle(p.Write(1, 0, b"a" * 10))
    rx.handle(p.Flush(2))
    assert out.take() == [p.DataAck(1), p.FlushAck(2)]
    rx.handle(p.Write(3, 6 * RS, b"b" * 10))
    out.take()

    def broken_flush():
        raise OSError(5, "injected fdatasync failure")

    engine.flush = broken_flush  # the test's own stand-in for a failing disk
    rx.handle(p.Flush(4))
    ask, ack = out.take()
    assert isinstance(ask, p.ReadRegion) and (ask.offset, ask.length) == (6 * RS, RS)
    assert ack == p.FlushAck(4, failed=True)
    assert rx.status()["recovering_regions"] == 1


def counting_flushes(engine) -> list:
    """Record, at each fdatasync of the replica, how many regions were still recovering."""
    calls, real = [], engine.flush

    def flush():
        calls.append(1)
        real()

    engine.flush = flush  # the test's own spy on the replica's fdatasync
    return calls


def test_a_flush_after_a_failed_write_is_answered_once_its_recovery_landed_durably(engine):
    faults = FaultInjector()
    faults.fail(2)
    rx, out = make(engine, SYNC, faults=faults)
    syncs = counting_flushes(engine)
    rx.handle(p.Write(1, 2 * RS, b"x" * RS))  # fails: acknowledged with WRITE_FAILED
    failed, ask = out.take()
    assert isinstance(failed, p.WriteFailed) and isinstance(ask, p.ReadRegion)
    rx.handle(p.Flush(2))
    assert out.take() == [] and syncs == []  # held, not waited for on this thread
    at_ack = {}

    def look(frame):
        if isinstance(frame, p.FlushAck):
            at_ack.update(syncs=len(syncs), data=read(engine, 2 * RS, RS),
                          recovering=rx.status()["recovering_regions"])

    out.on_send = look
    rx.handle(p.RegionData(ask.seq, 2 * RS, b"x" * RS))
    assert out.take() == [p.DataAck(ask.seq), p.FlushAck(2)]
    assert at_ack == {"syncs": 1, "data": b"x" * RS, "recovering": 0}
    rx.handle(p.Flush(3))  # nothing outstanding: answered at once
    assert out.take() == [p.FlushAck(3)]


def test_a_held_flush_waits_only_for_recoveries_outstanding_when_it_came(engine):
    faults = FaultInjector()
    faults.fail(2)
    faults.fail(4)
    rx, out = make(engine, SYNC, faults=faults)
    rx.handle(p.Write(1, 2 * RS, b"a" * RS))
    _, first = out.take()
    rx.handle(p.Flush(2))
    rx.handle(p.Write(3, 4 * RS, b"b" * RS))  # fails after the flush came: not waited for
    _, second = out.take()
    rx.handle(p.Flush(4))  # waits for both
    rx.handle(p.RegionData(first.seq, 2 * RS, b"a" * RS))
    assert out.take() == [p.DataAck(first.seq), p.FlushAck(2)]
    rx.handle(p.RegionData(second.seq, 4 * RS, b"b" * RS))
    assert out.take() == [p.DataAck(second.seq), p.FlushAck(4)]
    assert rx.status()["flushes"] == 2


def test_a_held_flush_whose_sync_fails_says_so(engine):
    faults = FaultInjector()
    faults.fail(2)
    rx, out = make(engine, SYNC, faults=faults)
    rx.handle(p.Write(1, 2 * RS, b"a" * RS))
    _, ask = out.take()
    rx.handle(p.Flush(2))

    def broken_flush():
        raise OSError(5, "injected fdatasync failure")

    engine.flush = broken_flush  # the test's own stand-in for a failing disk
    rx.handle(p.RegionData(ask.seq, 2 * RS, b"a" * RS))
    ack, again, flush_ack = out.take()
    assert ack == p.DataAck(ask.seq) and isinstance(again, p.ReadRegion)  # lost: recover again
    assert flush_ack == p.FlushAck(2, failed=True)
    assert rx.status()["flush_failures"] == 1


def test_a_flush_held_when_the_link_is_lost_is_never_answered(engine):
    faults, clock = FaultInjector(), Clock()
    faults.fail(2)
    rx, out = make(engine, SYNC, faults=faults, clock=clock)
    rx.handle(p.Write(1, 2 * RS, b"a" * RS))
    out.take()
    rx.handle(p.Flush(2))
    rx.link_lost()  # the primary's flush gave up with that link; a new one numbers afresh
    rx.tick(clock.now)
    (ask,) = out.take()
    rx.handle(p.RegionData(ask.seq, 2 * RS, b"a" * RS))
    assert out.take() == [p.DataAck(ask.seq)]


def test_marked_runs_for_a_primary_are_the_marks_once_swept(engine, volume):
    faults = FaultInjector()
    faults.fail(9)
    rx, out = make(engine, SYNC, faults=faults)
    rx.handle(p.Write(1, 3 * RS, b"a" * RS))  # landed: swept (fdatasync) before telling
    rx.handle(p.Write(2, 9 * RS, b"b" * RS))  # failed: recovering, stays marked
    rx.mode = SEMI_ASYNC
    rx.handle(p.Meta(3, 5 * RS, 2 * RS))  # announced, its data never came
    rx.link_lost()
    assert marked(engine) == {3, 5, 6, 9}
    assert rx.marked_runs().tolist() == [[5, 2], [9, 1]]
    assert on_disk_marks(volume)[[3, 5, 6, 9]].tolist() == [0, 1, 1, 1]


def test_ping_is_answered_with_pong(engine):
    rx, out = make(engine)
    rx.handle(p.Ping(42))
    assert out.take() == [p.Pong(42)]
    assert rx.status()["last_frame_age"] == 0


def test_sweep_clears_only_settled_regions(engine, volume):
    faults = FaultInjector()
    faults.fail(5)
    rx, out = make(engine, faults=faults)
    rx.handle(p.Write(1, 1 * RS, b"a" * RS))  # landed
    rx.handle(p.Meta(2, 3 * RS, RS))  # pending: no data yet
    rx.handle(p.Write(3, 5 * RS, b"c" * RS))  # failed: recovering
    assert marked(engine) == {1, 3, 5}
    assert rx.sweep() == 1
    assert marked(engine) == {3, 5}
    assert rx.missing_runs() == [(3, 1), (5, 1)]
    engine.close()  # trims the persisted map to the exact marks
    assert set(np.flatnonzero(on_disk_marks(volume))) == {3, 5}


def test_after_a_lost_link_announced_regions_stay_marked_until_written_whole(engine):
    rx, out = make(engine)
    rx.handle(p.Meta(1, 3 * RS, 100))
    rx.link_lost()
    assert rx.status()["pending_writes"] == 0 and rx.status()["suspect_regions"] == 1
    rx.sweep()
    assert marked(engine) == {3}
    rx.handle(p.Meta(1, 3 * RS, 10))  # a restarted primary numbers from 1 again
    rx.handle(p.Data(1, 3 * RS, b"x" * 10))
    rx.sweep()
    assert marked(engine) == {3}  # part of the region is still unknown
    rx.handle(p.Write(2, 3 * RS, b"y" * RS))  # the primary's resync: the whole region
    rx.sweep()
    assert marked(engine) == set()


def test_marks_left_from_an_earlier_run_stay_until_written_whole(volume):
    eng = Engine(volume, replica=True)
    rx, _ = make(eng)
    rx.handle(p.Meta(1, 2 * RS, RS))
    eng.close()  # as if the process died: the data never came
    eng = Engine(volume, replica=True)
    try:
        rx, _ = make(eng)
        rx.handle(p.Write(1, 2 * RS + 1, b"z"))
        rx.sweep()
        assert marked(eng) == {2} and rx.missing_runs() == [(2, 1)]
    finally:
        eng.close()


def test_a_failed_sync_recovers_what_landed_while_it_ran_and_a_sweep_beside_it_waits(engine):
    """fsyncgate with two syncs: a FLUSH's fdatasync fails (Linux drops the dirty pages and
    reports it to that call only) while a write lands and a sweep starts; the sweep must
    not call that write durable and clear its mark."""
    rx, out = make(engine, SYNC)
    rx.handle(p.Write(1, 2 * RS, b"a" * RS))
    assert out.take() == [p.DataAck(1)]
    real, entered, release = engine.flush, threading.Event(), threading.Event()
    calls = []

    def flaky_flush():  # the test's own disk: the first fdatasync fails, later ones succeed
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)
            raise OSError(5, "injected fdatasync failure")
        real()

    engine.flush = flaky_flush
    flusher = threading.Thread(target=rx.handle, args=(p.Flush(2),))
    flusher.start()
    assert entered.wait(10)
    rx.handle(p.Write(3, 5 * RS, b"b" * RS))  # lands while the failing sync runs
    sweeper = threading.Thread(target=rx.sweep)
    sweeper.start()
    try:
        sweeper.join(0.2)  # a bounded look: it must still be waiting
        assert sweeper.is_alive() and len(calls) == 1  # waits for the running sync
    finally:
        release.set()
    flusher.join(10)
    sweeper.join(10)
    asks = {(f.offset, f.length) for f in out.of(p.ReadRegion)}
    assert asks == {(2 * RS, RS), (5 * RS, RS)}  # both may have lost their pages
    assert {2, 5} <= marked(engine)
    assert p.FlushAck(2, failed=True) in out.frames
