"""WRITEV on the secondary: a cycle's scattered chunks as one frame, one entry, one
staging record; each range lands where it says and nothing between them changes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_attack_async import Out
from tests.unit.test_attack_session8 import (
    REGIONS,
    RS,
    SIZE,
    cycle_2,
    hold_cycle_1,
    image,
    random_bytes,
    read_all,
    receiver,
    send,
)
from tests.unit.test_attack_session9 import restart
from tests.unit.test_staging import acked, failed
from volume_core import staging
from volume_core.errors import ProtocolError
from volume_core.replication import protocol as p
from volume_core.replication.secondary import SEMI_ASYNC, FaultInjector, Receiver
from volume_core.write_events import WRITE

pytestmark = pytest.mark.unit


def scattered(rng: np.random.Generator, seq: int, regions: list[int],
              length: int = RS) -> p.WriteV:
    """One WRITEV of ``length`` bytes at the start of each region (ascending)."""
    extents = [(r * RS, length) for r in regions]
    return p.WriteV.of(seq, extents, random_bytes(rng, length * len(regions)))


def test_a_staged_writev_lands_at_its_ranges_only_and_only_at_the_commit(replica):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 1)
    frames = [scattered(rng, 1, [3, 9, 10, 40]), scattered(rng, 2, [41, REGIONS - 1], 100)]
    send(rec, model, frames)
    rec.drain()
    assert acked(out) == {1, 2} and not failed(out)
    assert read_all(replica) == old, "the volume changed before the cycle's commit"
    log_ = rec._staging
    assert [(r.offset, r.length) for r in log_.records] == [
        (3 * RS, RS), (9 * RS, RS), (10 * RS, RS), (40 * RS, RS), (41 * RS, 100),
        ((REGIONS - 1) * RS, 100)]
    assert rec.status()["cycle_bytes_staged"] == 4 * RS + 200
    rec.handle(p.CycleCommit(2, 2_000_000))
    assert read_all(replica) == model and image(replica, 2) == model
    assert model[4 * RS:9 * RS] == old[4 * RS:9 * RS]  # (the model: nothing between)


def test_a_writev_of_cycle_1_lands_at_its_ranges_and_nowhere_between(replica):
    rec = receiver(replica)
    rng = np.random.default_rng(2)
    model = bytearray(SIZE)
    rec.handle(p.CycleBegin(1))
    send(rec, model, [scattered(rng, 1, [0, 2, 5, 6, REGIONS - 3], 1000)])
    rec.drain()
    assert read_all(replica) == model and not rec._staging.records
    assert rec.status()["bytes_applied"] == 5000


def test_a_staged_writev_is_applied_after_a_restart(replica):
    out = Out()
    rec = receiver(replica, out)
    rng, old, model = cycle_2(rec, 3)
    send(rec, model, [scattered(rng, 1, [1, 7, 30])])
    rec.drain()
    rec = restart(rec, out=out)  # staged, not committed: resumes with it
    assert [r.offset // RS for r in rec._staging.records] == [1, 7, 30]
    rec.handle(p.CycleBegin(2))
    send(rec, model, [scattered(rng, 1, [31, 33])])
    rec.drain()
    rec._staging.commit(2_000_000)  # the COMMIT record; then the crash, before the apply
    rec = restart(rec, out=out)
    assert read_all(replica) == model and replica.volume.info.cycle == 2
    assert image(replica, 2) == model and read_all(replica) != old


def test_a_writev_record_with_a_table_over_one_block_round_trips(replica):
    """More extents than one 4 KiB header block holds (252): the table takes two."""
    log_ = staging.StagingLog.open(replica.volume)
    log_.begin(2)
    rng = np.random.default_rng(4)
    extents = np.array([(i * 400, 100 + i % 7) for i in range(300)], dtype=np.int64)
    data = random_bytes(rng, int(extents[:, 1].sum()))
    log_.append_extents(extents, memoryview(data))
    log_.commit(7)
    log_.close()
    again = staging.StagingLog.open(replica.volume)
    try:
        assert again.committed == staging.Committed(2, 7)
        assert [[r.offset, r.length] for r in again.records] == extents.tolist()
        got = b"".join(bytes(d) for _, d in again.chunks())
        assert got == data
    finally:
        again.close()


def test_a_damaged_writev_table_ends_the_log_there(replica):
    log_ = staging.StagingLog.open(replica.volume)
    log_.begin(2)
    rng = np.random.default_rng(5)
    log_.append(WRITE, 0, RS, memoryview(random_bytes(rng, RS)))
    at = log_._end
    log_.append_extents(np.array([(RS, 10), (3 * RS, 10)]), memoryview(random_bytes(rng, 20)))
    log_.sync()
    log_.close()
    with open(replica.volume.path / "staging" / "log", "r+b") as f:
        f.seek(at + 64 + 16)  # the second extent's offset
        f.write(b"\x01")
    again = staging.StagingLog.open(replica.volume)
    try:
        assert [(r.offset, r.length) for r in again.records] == [(0, RS)]
    finally:
        again.close()


def test_a_writev_failing_on_one_range_is_refused_whole_and_lands_when_sent_again(replica):
    out = Out()
    faults = FaultInjector()
    rec = Receiver(replica, "async", out, faults=faults, wake=lambda: None)
    rng = np.random.default_rng(6)
    old = hold_cycle_1(rec, rng)
    rec.handle(p.CycleBegin(2))
    faults.fail(20)
    model = bytearray(old)
    frame = scattered(rng, 5, [10, 20, 30])
    rec.handle(frame)
    rec.drain()
    assert failed(out) == {5} and 5 not in acked(out)
    assert not rec._staging.records
    send(rec, model, [p.WriteV(6, frame.count, frame.payload)])  # the primary, again
    rec.drain()
    assert 6 in acked(out)
    rec.handle(p.CycleCommit(2))
    assert read_all(replica) == model


def test_a_marked_region_between_writev_ranges_stays_marked(replica):
    """A region the secondary holds marked (a write of an earlier run failed there) lies
    between a WRITEV's ranges: landing and syncing the frame must not clear it."""
    rec = receiver(replica)
    rng = np.random.default_rng(7)
    rec.handle(p.CycleBegin(1))
    rec.handle(p.WriteV.of(1, [(0, SIZE)], random_bytes(rng, SIZE)))
    rec.drain()
    rec.handle(p.CycleCommit(1))
    rec.sweep()
    replica.tracker.mark(5 * RS, RS)
    rec._suspect[5] = False  # known, not suspect: only its landing may clear it
    rec.handle(p.CycleBegin(2))
    rec.handle(scattered(rng, 2, [4, 6]))
    rec.drain()
    rec.handle(p.CycleCommit(2))
    rec.sweep()
    assert rec.missing_runs() == [(5, 1)]


def test_a_writev_outside_async_mode_is_refused(replica):
    rec = Receiver(replica, SEMI_ASYNC, Out(), wake=lambda: None)
    with pytest.raises(ProtocolError, match="WRITEV 1 in semi-async mode"):
        rec.handle(scattered(np.random.default_rng(8), 1, [1, 3]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8 * 16 - 1), st.integers(1, 3 * 16)), min_size=1,
                max_size=12), st.booleans())
def test_landed_ranges_at_once_note_what_one_at_a_time_would(tmp_path_factory, rows, tail):
    """_landed_extents (a WRITEV's or a staged cycle's ranges at once) leaves the landed
    map, its span and the suspect regions as _landed_whole range by range would."""
    from volume_core.engine import Engine
    from volume_core.replication.secondary import ASYNC
    from volume_core.volume import Volume

    k4 = 4096
    size = 8 * (64 << 10) - (k4 if tail else 0)  # 8 regions, the last short or not
    vol = Volume.create(tmp_path_factory.mktemp("v") / "v", size, 64 << 10)
    vol.update_info(role="secondary")
    engine = Engine(vol, replica=True)
    try:
        recs = [Receiver(engine, ASYNC, Out(), wake=lambda: None) for _ in range(2)]
        pairs = [(o * k4, min(n * k4, size - o * k4)) for o, n in rows if o * k4 < size]
        if not pairs:
            return
        for rec in recs:
            rec._suspect[:] = True
        for offset, length in pairs:
            recs[0]._landed_whole(offset, length)
        recs[1]._landed_extents(np.array(pairs, dtype=np.int64))
        a, b = recs
        assert (a._suspect == b._suspect).all()
        assert (a._landed.map == b._landed.map).all()
        assert (a._landed.lo, a._landed.hi) == (b._landed.lo, b._landed.hi)
    finally:
        engine.close()
