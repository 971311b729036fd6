"""Attacks on the replication core (issue 11), in process: each test is a bug, xfail strict."""

from __future__ import annotations

import pytest

from tests.conftest import wait_until
from tests.unit.test_primary import RecordingChannel, in_thread
from volume_core.engine import Engine
from volume_core.regions import load_marks
from volume_core.replication import protocol as p
from volume_core.replication.primary import PrimaryReplicator
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 4096
REGIONS = 32


def test_semi_async_sweep_keeps_marks_of_regions_with_data_in_flight(tmp_path):
    """Bug: in semi-async mode a host write settles on META_ACK, which ends its pending
    count in the tracker, while its region stays in ``_unapplied`` until DATA_ACK. ``sweep()``
    looks only at ``_acked & ~_out_of_sync``: if an earlier write to the same region was
    DATA_ACKed, the region is in ``_acked`` and sweep clears its durable mark although the
    later write's data has not reached the secondary. A primary crash now (SIGKILL, power)
    loses the fact that the region differs: after restart it is not marked, so it is never
    resynced and the secondary keeps the old bytes forever.

    How: write W1 to region 5, META_ACK + DATA_ACK; write W2 to region 5, META_ACK only (its
    DATA still on the wire); sweep(). Should: region 5 stays marked (in memory and on disk)
    until W2's DATA_ACK.
    """
    vol = Volume.create(tmp_path / "v", REGIONS * RS, RS)
    engine = Engine(vol)
    try:
        rep = PrimaryReplicator(engine, "semi-async", ack_timeout=10.0)
        ch = RecordingChannel()
        rep.connected(ch)
        engine.attach_replicator(rep)
        for seq, byte in ((1, b"1"), (2, b"2")):
            t = in_thread(engine.pwrite, byte * RS, 5 * RS)
            wait_until(lambda seq=seq: len(ch.sent) == 2 * seq, what="meta and data")
            rep.on_frame(p.MetaAck(seq))
            t.join(10)
            assert not t.is_alive()
            if seq == 1:
                rep.on_frame(p.DataAck(1))  # W1 applied on the secondary
        # W2: the host has its answer; its DATA has not been applied on the secondary yet
        assert rep.status()["in_flight_writes"] == 1
        rep.sweep()
        on_disk = load_marks(vol.marks_path, vol.regions)
        assert engine.tracker.marks[5] == 1 and on_disk[5] == 1, (
            "region 5 was cleared while write 2's data is unacknowledged: a crash now loses it")
    finally:
        engine.close()


def test_read_region_longer_than_a_frame_can_answer_is_refused_by_the_decoder():
    """Bug: READ_REGION is checked for whole regions inside the volume, not for its length:
    its answer (REGION_DATA, a DATA payload) can carry at most MAX_DATA bytes, but the
    decoder accepts a request for the whole volume. The primary then, on the link's receiver
    thread, holds every region (host writes wait), allocates and zero-fills a buffer the size
    of the volume (a 1 TiB volume: the OOM killer takes the server) and reads it all, only to
    fail encoding the answer and drop the link; a misbehaving or hostile secondary can repeat
    it on every reconnect.

    Should: a READ_REGION longer than MAX_DATA is refused as a protocol error on arrival.
    """
    size = 4 * p.MAX_DATA
    dec = p.Decoder(size, 1 << 20)
    dec.receive_data(p.encode(p.ReadRegion((1 << 63) | 1, 0, size)))
    with pytest.raises(p.ProtocolError):
        frame = dec.next_frame()
        assert not isinstance(frame, p.ReadRegion), frame
