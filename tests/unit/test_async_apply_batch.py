"""The secondary's applier copies ahead for a batch of async chunks: one copy-on-write
commit into the held consistent image for all the chunks already queued, not one per
chunk (session 8: a rolling window of 32 chunks had made every commit after the first
hold a single chunk's regions)."""

from __future__ import annotations

import os

import pytest

from tests.unit.test_attack_async import RS, SIZE, Out
from tests.unit.test_attack_session8 import commits, cycle_2, image, read_all, receiver
from volume_core import staging
from volume_core.replication import protocol as p
from volume_core.replication import secondary as sec
from volume_core.replication.secondary import ASYNC, Receiver
from volume_core.snapshots import cycle_name

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _copy_on_write_path(monkeypatch):
    """These probe chunks applied to the volume with copies on write into the held image:
    what a cycle bigger than the staging log does (a log of 0 bytes: every cycle)."""
    monkeypatch.setattr(staging, "CAPACITY", 0)


@pytest.mark.parametrize("queued, limit, expect", [
    (40, None, [40]),  # every queued chunk in the first commit
    (40, 16 * RS, [16, 16, 8]),  # PRESERVE_AHEAD bytes at a time: full batches
])
def test_queued_chunks_share_copy_on_write_commits_and_the_image_holds(
        secondary, monkeypatch, queued, limit, expect):
    if limit is not None:
        monkeypatch.setattr(sec, "PRESERVE_AHEAD", limit)
    rec = receiver(secondary)  # applied by drain() below
    _, old, new = cycle_2(rec, 1)
    seen = commits(monkeypatch)
    for i in range(queued):  # scattered chunks, one region each
        region = 3 * i + 1
        data = os.urandom(RS)
        new[region * RS:(region + 1) * RS] = data
        rec.handle(p.Write(i + 2, region * RS, data, fua=True))
    rec.drain()
    assert seen == [(cycle_name(1), n) for n in expect]
    assert read_all(secondary, SIZE) == new
    assert image(secondary, 1) == old


class CorkedOut(Out):
    """Frames sent by a handler leave when it returns or flushes (as the link's receive
    loop corks them): ``flushed`` is what has left."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[p.Frame] = []

    def flush(self) -> None:
        self.flushed = list(self.frames)


def test_the_cycle_ack_leaves_before_the_older_image_is_deleted(secondary, monkeypatch):
    """Deleting the older image takes longer than the commit itself (rmtree, syncs): the
    primary's cycle must not wait for it (session 8: the ack was corked behind it)."""
    out = CorkedOut()
    rec = Receiver(secondary, ASYNC, out, wake=lambda: None)
    rec.handle(p.CycleCommit(1))
    seen: list[list[p.Frame]] = []
    real = type(secondary).delete_snapshot

    def delete(self, name, **kw):
        seen.append([f for f in out.flushed if isinstance(f, p.CycleAck)])
        return real(self, name, **kw)

    monkeypatch.setattr(type(secondary), "delete_snapshot", delete)
    rec.handle(p.CycleBegin(2))
    rec.handle(p.CycleCommit(2))
    assert seen == [[p.CycleAck(1), p.CycleAck(2)]]
    assert [s.name for s in secondary.snapshots.chain] == [cycle_name(2)]


def test_a_sync_takes_only_the_span_of_the_regions_landed_since_the_last():
    """``_Landed``: what a sync takes is the span written since the last one (a 1 TiB
    volume's map has 16M entries, and a sync comes every few chunks), cleared after."""
    from volume_core.replication.secondary import _Landed

    landed = _Landed(1 << 24)
    assert landed.take()[1].size == 0
    landed.note(100, 102)
    landed.note(5, 7)
    span, part = landed.take()
    assert span.start == 5 and part.size == 97
    assert sorted((part.nonzero()[0] + span.start).tolist()) == [5, 6, 100, 101]
    assert not landed.map.any() and landed.take()[1].size == 0
