"""The primary's side of async mirroring: cycles of marked regions, from a frozen image.

docs/ASYNC.md has the design. Host writes complete after the local write
alone; the engine marks their regions durably, as always. A cycle, on its own
thread, while a channel to the secondary is up:

    take      with writes quiesced: the tracker's marks are taken
              (``swap_and_reset``) and frozen (``CycleFreeze``: a region still to
              convey is copied before a host write lands on it)
    convey    the frozen regions (of each, the blocks written: ``blocks.py``), at
              most ``max_rate`` bytes a second if capped (``pacing.py``),
              in frames of up to 1 MiB of data: WRITE for one
              run (ZERO when it is all zeros), WRITEV for up to ``MAX_EXTENTS``
              scattered ones (a hole of the live volume goes unread as ZERO, up to
              1 GiB a frame), with FUA:
              the secondary's DATA_ACK means the frame is durable there;
              the region is then FREE (never copied again). At most
              ``CYCLE_WINDOW`` bytes of data (``CYCLE_WINDOW_CHUNKS`` chunks)
              unacknowledged. WRITE_FAILED: sent again.
    commit    CYCLE_COMMIT(n) -> the secondary records cycle n -> CYCLE_ACK(n)
    finish    the freeze is dropped, the taken marks released; volume.json
              ``cycle`` = n

The first cycle with a new secondary carries every region (``note_peer`` marks
them all): the initial sync, from the live volume while writes go on, writes
landing meanwhile marking the next cycle. A cycle cut short (the link, a
restart) resumes where its freeze says; regions conveyed are not sent again.

Marks across a restart: a conveyed region's intent is cleared at its ack
(``release_runs``), so a later write records it durably again; a region still
KEEP in the freeze and not touched was not written since the take (a write
copies it first, or, missing its frozen blocks, notes it touched); a COPIED
or touched one was. So a restarted primary knows which marks are the open
cycle's (``retake``) and which the next cycle's, and sends nothing twice.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import native
from ..blocks import BlockGeometry
from ..cycle_freeze import KEEP, CycleFreeze
from ..errors import NbdMirrorError, ProtocolError
from ..geometry import cut_runs, join_runs
from ..live_pass import LivePass
from ..pacing import Pacer
from ..units import rate
from . import protocol as p
from .primary import Channel, chunk_frame, note_peer, peer_marks_map

log = logging.getLogger(__name__)

ASYNC = "async"
#: bytes of data per frame of a cycle (scattered runs are gathered up to this)
CYCLE_CHUNK = 1 << 20
#: bytes of a hole of the live volume sent as one ZERO frame, at most
ZERO_SPAN = 1 << 30
#: chunks sent and not yet acknowledged, at most (the secondary syncs them as a batch)
CYCLE_WINDOW = 16 << 20
#: ...and chunks (the secondary syncs what it holds as one batch: scattered small chunks
#: must not make every batch small)
CYCLE_WINDOW_CHUNKS = 256
#: seconds between cycles, unless told
DEFAULT_INTERVAL = 30.0
#: how long the secondary may take to commit a cycle
COMMIT_TIMEOUT = 60.0
#: passes over a cycle's regions in which the secondary refuses a chunk every time
MAX_PASSES = 5


def _gather(image: CycleFreeze | LivePass, extents: np.ndarray,
            seq: int) -> p.WriteV | p.Write | p.Zero:
    """A WRITEV frame of ``extents`` ((offset, length) rows, ascending, apart), read from
    ``image`` straight into its payload, behind its extent table; for one extent, WRITE
    (ZERO when it is all zeros)."""
    if len(extents) == 1:
        offset, length = (int(x) for x in extents[0])
        buf = bytearray(length)
        image.read_range(offset, memoryview(buf))
        return chunk_frame(seq, offset, buf, fua=True)
    table = p.WriteV.table_size(len(extents))
    buf = bytearray(table + int(extents[:, 1].sum()))
    p.WriteV.table(buf, len(extents))[:] = extents
    view, at = memoryview(buf), table
    for offset, length in extents.tolist():
        image.read_range(offset, view[at:at + length])
        at += length
    return p.WriteV(seq, len(extents), buf)


class _Lost(Exception):
    """The channel a cycle was using went away (the cycle resumes on the next)."""


class AsyncMirror:
    """Runs the cycles of one primary (see the module docstring)."""

    mode = ASYNC

    def __init__(self, engine: Any, *, interval: float = DEFAULT_INTERVAL,
                 ack_timeout: float = 5.0, max_rate: int | None = None) -> None:
        engine.check_replicable()
        self.engine = engine
        self.interval = interval
        self.ack_timeout = ack_timeout
        #: bytes a second the cycles may convey (None: no cap); data frames wait for it
        self.max_rate = max_rate
        self._pacer = None if max_rate is None else Pacer(max_rate, burst=CYCLE_CHUNK * 2)
        self._geometry = engine.volume.geometry
        self._blocks = BlockGeometry(engine.size, self._geometry.shift)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._channel: Channel | None = None
        # seq -> the region runs a frame carries, its payload's bytes, the volume's bytes
        # it covers
        self._sent: dict[int, tuple[list[tuple[int, int]], int, int]] = {}
        self._inflight = 0  # data bytes in ``_sent``
        self._next_seq = 0
        self._cycle_acked = 0
        self._wanted = 0  # the highest cycle number ``run_now`` promised
        self._due: float | None = None  # time.monotonic() of the next cycle (None: on request)
        self._stopping = False
        self.state = "disconnected"
        self.committed = int(engine.volume.info.cycle)
        #: the point in time the secondary holds (Unix time of the committed cycle's take)
        self.last_consistent_at: float | None = engine.volume.info.cycle_at
        self.stats = {"cycles": 0, "bytes_conveyed": 0, "regions_conveyed": 0,
                      "chunks_refused": 0, "links_lost": 0}
        self.progress = self._progress(None)
        #: the last committed cycle: number, seconds from its take (or resume) to its
        #: commit, and the regions and bytes conveyed in that run
        self.last_cycle: dict[str, Any] | None = None
        #: the last initial sync (a ``LivePass``) of this run: seconds, regions, bytes,
        #: skipped_regions (written meanwhile: the first cycle carried them), rate_bps
        self.initial_sync: dict[str, Any] | None = None
        self._pass: LivePass | None = None  # an initial sync under way (resumed after a cut)
        self._image: CycleFreeze | LivePass | None = None  # what acks are credited to
        # A cycle a previous run left open: resumed first, its hook on before any write.
        self._freeze = CycleFreeze.open(engine.volume, engine.fd)
        self._taken: np.ndarray | None = None
        self._taking: int | None = None  # the number of a take under way
        self._new_peer = False  # the open cycle is for another secondary: start afresh
        if self._freeze is not None:
            # Its KEEP regions not touched were not written since the take (a write copies
            # first, or notes the region touched, before it lands): taken again, released
            # at its commit. COPIED and touched ones were written: they stay marked for
            # the next cycle.
            self._taken = ((self._freeze.preserved == KEEP)
                           & (self._freeze.touched == 0)).view(np.uint8)
            engine.tracker.retake(self._taken)
            engine.pre_write.append(self._freeze.preserve)
            log.info("async: cycle %d was left open; it resumes once the secondary is "
                     "connected", self._freeze.number)
        # No consistent image on the secondary yet: the first pass reads the live volume.
        self._need_pass = self._freeze is None and self.committed == 0
        # Started with the first channel: nbdkit forks after building this object.
        self._thread = threading.Thread(target=self._run, daemon=True, name="async-cycles")

    # -- link events (PrimarySession) --------------------------------------------------
    def connected(self, channel: Channel) -> None:
        new = note_peer(self.engine, channel)
        if new:
            # its image is not ours: no point in time is held there until a commit
            self.engine.volume.update_info(cycle_at=None)
            # Another secondary: an open cycle's (or pass's) conveyed regions are not
            # there, so it must not commit there. Every region is marked already
            # (note_peer): the cycle thread drops what is open and starts afresh with an
            # initial sync.
            if self._freeze is not None or self._pass is not None:
                log.warning("async: a new secondary in the middle of %s: starting again "
                            "with everything", "the initial sync" if self._pass else
                            f"cycle {self._freeze.number}")  # type: ignore[union-attr]
            with self._lock:
                self._new_peer = True
                self.last_consistent_at = None
        theirs = peer_marks_map(channel, self.engine.volume.regions)
        if theirs is not None:  # left by another mode: the next cycle carries them
            self.engine.tracker.mark_map(theirs)
        with self._lock:
            self._channel = channel
            self._sent.clear()
            self._inflight = 0
            self.state = "connected"
            self._due = time.monotonic()  # a cycle at once: the initial sync, or what waited
            if self.committed == 0 and not new:
                # A secondary we sent to (an earlier run's pass, another mode) holds no
                # consistent image of ours: one at once (a first pairing waits for the
                # first writes: their pass is the initial sync).
                self._wanted = max(self._wanted, 1)
            self._changed.notify_all()
        if self._thread.ident is None:
            self._thread.start()
        log.info("async: connected to the secondary")

    def disconnected(self, reason: str, channel: Channel | None = None) -> None:
        """The channel is gone (``channel``: only if it is still the current one)."""
        with self._lock:
            if self._channel is None or (channel is not None and channel is not self._channel):
                return
            self._channel = None
            self.state = "disconnected"
            self.stats["links_lost"] += 1
            self._sent.clear()
            self._inflight = 0
            self._changed.notify_all()
        log.warning("async: lost the secondary: %s", reason)

    def sweep(self) -> int:
        """Nothing to sweep: marks leave when a cycle that carried them commits."""
        return 0

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        if self._thread.ident is not None:
            self._thread.join(10)
        if self._freeze is not None:
            self._freeze.close()  # stays on disk: the next run resumes it

    def run_now(self) -> int:
        """Ask for a cycle now; returns the number that will commit everything written
        before this call."""
        with self._lock:
            # An open cycle took its marks already: what was written since needs the next.
            open_cycle = self._freeze.number if self._freeze is not None else self._taking
            target = (open_cycle or self.committed) + 1
            self._wanted = max(self._wanted, target)
            self._changed.notify_all()
            return target

    # -- frames from the secondary ----------------------------------------------------
    def on_frame(self, frame: p.Frame) -> None:
        if isinstance(frame, p.DataAck):
            self._acked(frame.seq, frame.count, ok=True)
        elif isinstance(frame, p.WriteFailed):
            self._acked(frame.seq, 1, ok=False)
        elif isinstance(frame, p.CycleAck):
            with self._lock:
                self._cycle_acked = frame.seq
                self._changed.notify_all()
        elif isinstance(frame, p.ReadRegion):
            self._read_region(frame)
        elif not isinstance(frame, (p.Pong, p.Ping)):
            raise ProtocolError(f"an async primary does not expect {p.frame_name(frame)} "
                                "frames")

    def _acked(self, seq: int, count: int, ok: bool) -> None:
        with self._lock:
            image = self._image
            for s in range(seq, seq + count):
                sent = self._sent.pop(s, None)
                if sent is None:
                    continue
                runs, payload, nbytes = sent
                self._inflight -= payload
                if not ok:
                    self.stats["chunks_refused"] += 1
                elif image is not None:
                    image.conveyed_runs(runs)
                    self.engine.tracker.release_runs(runs, keep_hot=True)
                    regions = sum(stop - first for first, stop in runs)
                    self.progress["conveyed_regions"] += regions
                    self.stats["regions_conveyed"] += regions
                    self.progress["conveyed_bytes"] += nbytes
                    self.stats["bytes_conveyed"] += nbytes
            self._changed.notify_all()

    def _read_region(self, frame: p.ReadRegion) -> None:
        """The secondary lost data it had (a failed fdatasync of its disk) and asks for it.

        Answered from the live volume, newer than the cycle it held (which that
        failure spoiled anyway), and marked here, so the next cycle carries the
        regions as well: the image it commits is whole again. Answered on a
        thread of its own: reading and queueing data must not hold the link's
        receiver (the acks that free the window come through it).
        """
        channel = self._channel
        if channel is None:
            return
        self.engine.tracker.mark(frame.offset, frame.length)

        def answer() -> None:
            buf = bytearray(frame.length)
            try:
                self.engine.pread(buf, frame.offset)
                channel.send_bulk(p.RegionData(frame.seq, frame.offset, buf),
                                  timeout=self.ack_timeout)
            except (NbdMirrorError, OSError) as err:
                self._drop(channel, f"answering READ_REGION failed: {err}")

        threading.Thread(target=answer, daemon=True, name="read-region").start()

    # -- the cycle thread -----------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                channel = self._wait_for_work()
                if channel is None:
                    return
                forced = self.committed < self._wanted
            try:
                ran = self._cycle(channel, forced=forced)
            except _Lost:
                continue
            except (NbdMirrorError, OSError) as err:
                log.warning("async: cycle failed: %s", err)
                self._drop(channel, f"cycle failed: {err}")
                continue
            except Exception as err:  # a bug: the link goes, the host never notices
                log.exception("async: cycle failed")
                self._drop(channel, f"cycle failed: {err!r}")
                continue
            finally:
                with self._lock:  # a take that failed leaves nothing open
                    self._taking = None
                    if self._freeze is None:
                        self.progress["state"] = "idle"
            with self._lock:
                self._due = time.monotonic() + self.interval if self.interval > 0 else None
            if ran:
                log.info("async: cycle %d committed", self.committed)

    def _wait_for_work(self) -> Channel | None:
        """(lock held) The channel to run a cycle on, once one is due; None to stop."""
        while not self._stopping:
            channel = self._channel
            if channel is not None:
                if self._freeze is not None or self.committed < self._wanted:
                    return channel
                if self._due is not None:
                    wait = self._due - time.monotonic()
                    if wait <= 0:
                        return channel
                    self._changed.wait(wait)
                    continue
            self._changed.wait()
        return None

    def _cycle(self, channel: Channel, forced: bool) -> bool:
        """Take (or resume), convey, commit; False when there was nothing to do."""
        since = self._since()
        freeze = self._freeze
        with self._lock:
            new_peer, self._new_peer = self._new_peer, False
        if new_peer:  # what it conveyed is not there
            self._need_pass = True
            if freeze is not None:
                self._close_cycle(freeze, give_back=True)
                freeze = None
            if self._pass is not None:
                self._end_pass(self._pass, give_back=True)
        if freeze is None and self._need_pass and (
                self._pass is not None or self.engine.tracker.count()):
            self._initial_pass(channel)
            forced = True  # the first consistent image, at once, written to meanwhile or not
            since = self._since()
        if freeze is None:
            if not forced and not self.engine.tracker.count():
                return False
            with self._lock:  # from here status never says in-sync: the marks move
                self.progress = self._progress(None) | {"state": "taking"}
                self._taking = self.committed + 1  # run_now() promises the next one
            freeze = self._take()
        self.progress = self._progress(freeze, freeze.number)
        channel.send_urgent(p.CycleBegin(freeze.number))
        self._convey(channel, freeze, f"cycle {freeze.number}")
        self.progress["state"] = "committing"
        channel.send_urgent(p.CycleCommit(freeze.number, round(freeze.taken_at * 1e6)))
        self._wait(channel, lambda: self._cycle_acked >= freeze.number, COMMIT_TIMEOUT,
                   f"the secondary did not commit cycle {freeze.number}")
        self._finish(freeze, since)
        return True

    def _since(self) -> tuple[float, int, int]:
        """Where a run starts: the clock, regions and bytes conveyed so far (``_summary``)."""
        return time.monotonic(), self.stats["regions_conveyed"], self.stats["bytes_conveyed"]

    def _summary(self, since: tuple[float, int, int]) -> dict[str, Any]:
        """What was conveyed since ``since``, and how fast (lock held)."""
        seconds = time.monotonic() - since[0]
        nbytes = self.stats["bytes_conveyed"] - since[2]
        return {"seconds": round(seconds, 6), "regions": self.stats["regions_conveyed"] - since[1],
                "bytes": nbytes, "rate_bps": rate(nbytes, seconds)}

    def _initial_pass(self, channel: Channel) -> None:
        """Convey what the marks hold from the live volume (``LivePass``); writes landing
        meanwhile mark their regions for the first cycle, which follows at once."""
        engine = self.engine
        lp = self._pass
        if lp is None:
            engine.tracker.prepare_take()
            with engine.quiesce():  # no write marked before the take lands after it
                lp = self._pass = LivePass(engine, engine.tracker.swap_and_reset())
            log.info("async: initial sync of %d regions", int(native.count(lp.pending)))
        since = self._since()
        with self._lock:
            self.progress = self._progress(lp, self.committed + 1, "initial-sync")
        self._convey(channel, lp, "the initial sync")
        with self._lock:  # the first consistent image follows, whatever fails meanwhile
            self._wanted = max(self._wanted, self.committed + 1)
        self._end_pass(lp)
        self._need_pass = False
        with self._lock:
            self.initial_sync = {**self._summary(since), "skipped_regions": lp.skipped}
        log.info("async: initial sync done (%d regions written meanwhile go with the first "
                 "cycle)", lp.skipped)

    def _end_pass(self, lp: LivePass, give_back: bool = False) -> None:
        """The pass is over: its take goes; what it did not convey is still marked, or was
        marked again, whole (it may have skipped a region written in part). ``give_back``
        (given up for a new secondary): all of it is marked again first."""
        self.engine.tracker.forget_blocks()
        if give_back:
            self.engine.tracker.give_back(lp.taken)
        else:
            self.engine.tracker.release(lp.taken, keep_hot=True)
        self._pass = None

    def _take(self) -> CycleFreeze:
        engine = self.engine
        number = self.committed + 1
        prepared = CycleFreeze.prepare(engine.volume, number)  # before writes pause
        engine.tracker.prepare_take()
        with engine.quiesce():
            taken, blocks = engine.tracker.take()
            try:
                freeze = CycleFreeze.create(engine.volume, engine.fd, number, taken,
                                            prepared=prepared, blocks=blocks)
            except BaseException:
                engine.tracker.give_back(taken)
                raise
            engine.pre_write.append(freeze.preserve)
            with self._lock:  # before writes go on: run_now() must see the cycle open
                self._freeze, self._taken, self._taking = freeze, taken, None
        freeze.record_blocks()  # writes going on: from now on, fewer copies
        log.info("async: cycle %d takes %d regions", number, int(native.count(taken)))
        return freeze

    def _convey(self, channel: Channel, image: CycleFreeze | LivePass, what: str) -> None:
        """Every region the image still holds, a window of chunks at a time; each pass
        waits for every ack, and the next sends again what the secondary refused.

        A stretch that is a hole of the live volume goes as one ZERO frame of up to
        ``ZERO_SPAN`` bytes, unread: a sparse volume syncs in proportion to its data.
        Data runs are gathered into WRITEV frames of up to ``CYCLE_CHUNK`` bytes (a
        run longer than that is cut), scattered ones up to ``p.MAX_EXTENTS`` a frame:
        one header, one acknowledgement and one staging record for all of them. Of a
        frozen region only the blocks written before the take travel
        (``image.blocks``); a region's blocks never straddle two frames.
        """
        step = max(1, CYCLE_CHUNK // self._geometry.region_size)
        span = max(step, ZERO_SPAN // self._geometry.region_size)
        weigh, blocks = self._blocks.weigh_run, image.blocks
        with self._lock:
            self._image = image
        for _ in range(MAX_PASSES):
            batch: list[tuple[int, int]] = []
            nbytes = extents = 0
            runs = native.scan_runs(image.remaining())
            stops = runs[:, 0] + runs[:, 1]
            k = 0
            while k < len(runs):
                first, count = int(runs[k, 0]), int(runs[k, 1])
                data = image.data_stretch(first) if isinstance(image, CycleFreeze) else None
                if data is not None:  # runs inside one stretch of data: no step per run
                    last = int(np.searchsorted(stops, data, side="right"))
                    if last > k:
                        batch, nbytes, extents = self._send_runs(
                            channel, image, runs[k:last], step, batch, nbytes, extents)
                        k = last
                        continue
                at, stop = first, first + count
                k += 1
                while at < stop:
                    # bounded: a run may be the whole volume (16M regions of 1 TiB)
                    end = image.skip_end(at, min(stop, at + span))
                    if end > at:
                        self._skipped(at, end)
                        at = end
                        continue
                    end = image.hole_end(at, min(stop, at + span))
                    if end > at:
                        offset, length = self._geometry.byte_range(at, end)
                        # counted as what the cycle had to convey there (its blocks)
                        self._send(channel, [(at, end)], functools.partial(
                            p.Zero, offset=offset, length=length, may_trim=True, fua=True),
                            min(length, weigh(blocks, at, end)[0]))
                        at = end
                        continue
                    end = image.data_end(at, min(stop, at + step))
                    more, parts = weigh(blocks, at, end)
                    if batch and (nbytes + more > CYCLE_CHUNK
                                  or extents + parts > p.MAX_EXTENTS):
                        self._send_data(channel, image, batch)
                        batch, nbytes, extents = [], 0, 0
                    if batch and batch[-1][1] == at:  # runs that touch: joined
                        batch[-1] = (batch[-1][0], end)
                    else:
                        batch.append((at, end))
                    nbytes += more
                    extents += parts
                    at = end
            if batch:
                self._send_data(channel, image, batch)
            self._wait(channel, lambda: not self._sent, self.ack_timeout * 4,
                       f"the secondary did not acknowledge the last chunks of {what}")
            if not image.remaining().any():
                return
        raise NbdMirrorError(f"the secondary refused chunks of {what} {MAX_PASSES} times")

    def _send_runs(self, channel: Channel, image: CycleFreeze, runs: np.ndarray, step: int,
                   batch: list[tuple[int, int]], nbytes: int,
                   extents: int) -> tuple[list[tuple[int, int]], int, int]:
        """Runs ((first, count) rows) of data, cut at ``step`` regions, gathered after
        ``batch`` (``nbytes`` and ``extents`` in it) into frames as the loop in
        ``_convey`` gathers them (greedy: up to ``CYCLE_CHUNK`` bytes and
        ``p.MAX_EXTENTS`` extents a frame), with array work: a step per frame, not per
        run. The last frame, perhaps not full, is not sent: returned as the batch."""
        rows = cut_runs(runs, step)
        weights, parts = self._blocks.weigh_runs(image.blocks, rows)
        # item 0: the batch so far (maybe empty), then one item per row
        cum_bytes = np.concatenate(([0, nbytes], nbytes + np.cumsum(weights)))
        cum_parts = np.concatenate(([0, extents], extents + np.cumsum(parts)))
        i = 0
        while True:
            j = min(int(np.searchsorted(cum_bytes, cum_bytes[i] + CYCLE_CHUNK, side="right")),
                    int(np.searchsorted(cum_parts, cum_parts[i] + p.MAX_EXTENTS,
                                        side="right"))) - 1
            j = max(j, i + 1)  # one item at least (a row never is over the limits)
            frame = join_runs(rows[max(i, 1) - 1:j - 1])
            if i == 0 and batch:  # after the batch so far; a run that touches its last joined
                if frame and frame[0][0] == batch[-1][1]:
                    frame[0] = (batch[-1][0], frame[0][1])
                    frame = batch[:-1] + frame
                else:
                    frame = batch + frame
            if j >= len(cum_bytes) - 1:  # the rest: the batch the loop goes on with
                return (frame, int(cum_bytes[-1] - cum_bytes[i]),
                        int(cum_parts[-1] - cum_parts[i]))
            if frame:
                self._send_data(channel, image, frame)
            i = j

    def _skipped(self, first: int, stop: int) -> None:
        """Regions [first, stop) leave this pass unsent (the next cycle carries them)."""
        with self._lock:
            self.progress["regions"] -= stop - first
            self.progress["bytes"] -= self._geometry.byte_range(first, stop)[1]

    def _send_data(self, channel: Channel, image: CycleFreeze | LivePass,
                   runs: list[tuple[int, int]]) -> None:
        """What ``image`` conveys of the regions of ``runs``, as one frame (``_send``)."""
        extents = self._blocks.run_extents(image.blocks, runs)
        self._send(channel, runs, functools.partial(_gather, image, extents))

    def _send(self, channel: Channel, runs: list[tuple[int, int]],
              frame: Callable[..., p.Frame], nbytes: int | None = None) -> None:
        """The regions of ``runs`` as ``frame(seq)``, once the window has room;
        acknowledged in ``_acked``, counted as ``nbytes`` conveyed (default: the bytes
        of the volume the frame writes)."""
        self._wait(channel, lambda: (self._inflight < CYCLE_WINDOW
                                     and len(self._sent) < CYCLE_WINDOW_CHUNKS),
                   self.ack_timeout, "the secondary stopped acknowledging chunks")
        made = frame(0)  # read before the seq is taken: reads may fail
        payload = len(made.data) if isinstance(made, (p.Write, p.WriteV)) else 0
        if self._pacer is not None and payload:
            try:
                self._pause(channel, self._pacer.delay(payload))
            except _Lost:
                self._pacer.refund(payload)  # sent again on the next channel, charged then
                raise
        with self._lock:
            if self._channel is not channel:
                raise _Lost
            self._next_seq += 1
            self._sent[self._next_seq] = (runs, payload,
                                          made.length if nbytes is None else nbytes)
            self._inflight += payload
            made = dataclasses.replace(made, seq=self._next_seq)
        channel.send_bulk(made, timeout=self.ack_timeout, handoff=True)

    def _pause(self, channel: Channel, seconds: float) -> None:
        """Wait ``seconds`` (the rate cap); _Lost if the channel goes meanwhile."""
        until = time.monotonic() + seconds
        with self._lock:
            while True:
                if self._channel is not channel or self._stopping:
                    raise _Lost
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)

    def _wait(self, channel: Channel, done: Any, timeout: float, what: str) -> None:
        """Until ``done()`` (lock held while asked); _Lost with the channel, and the
        channel dropped when nothing changes for ``timeout`` seconds."""
        with self._lock:
            while True:
                # first: a channel lost meanwhile cleared what done() looks at
                if self._channel is not channel or self._stopping:
                    raise _Lost
                if done():
                    return
                if not self._changed.wait(timeout) and not done():
                    break
        self._drop(channel, f"{what} within {timeout:g}s")
        raise _Lost

    def _finish(self, freeze: CycleFreeze, since: tuple[float, int, int]) -> None:
        """The secondary holds cycle ``freeze.number``: record it, then close the cycle.

        volume.json first: a crash after it resumes a cycle numbered as the one
        committed, which commits again (the secondary takes a repeated commit),
        never a later cycle under a number already used. ``committed`` (what
        ``sync --wait`` waits for) and ``last_cycle`` follow once the cycle is
        closed (its files removed), or closing it failed (closed again later).
        """
        self.engine.volume.update_info(cycle=freeze.number, cycle_at=freeze.taken_at or None)
        try:
            self._close_cycle(freeze)
        finally:  # committed either way: a cycle left open is closed again later
            with self._lock:
                self.committed = freeze.number
                self._need_pass = False  # the secondary holds a consistent image
                self.last_consistent_at = freeze.taken_at or None
                self.stats["cycles"] += 1
                self.last_cycle = {"number": freeze.number, **self._summary(since)}

    def _close_cycle(self, freeze: CycleFreeze, give_back: bool = False) -> None:
        """Stop copying on write for ``freeze``, release its take, remove its files.
        ``give_back``: its regions are marked again first (a new secondary has none of
        them; and the take may hold marks ``note_peer`` set for it).

        If the hook cannot be taken off (writes would not quiesce), nothing
        changes: the cycle is still open and is closed again later.
        """
        engine = self.engine
        with engine.quiesce():
            if freeze.preserve in engine.pre_write:
                engine.pre_write.remove(freeze.preserve)
        try:
            if self._taken is not None:
                if give_back:
                    engine.tracker.give_back(self._taken)
                else:
                    engine.tracker.release(self._taken, keep_hot=True)
            freeze.drop()
        finally:
            with self._lock:
                self._freeze, self._taken = None, None
                self.progress["state"] = "idle"

    def _drop(self, channel: Channel, reason: str) -> None:
        try:
            channel.close(reason)
        finally:
            self.disconnected(reason, channel)

    # -- status -------------------------------------------------------------------
    def _progress(self, image: CycleFreeze | LivePass | None, number: int | None = None,
                  state: str = "conveying") -> dict[str, Any]:
        if image is None:
            return {"number": None, "state": "idle", "regions": 0, "bytes": 0,
                    "conveyed_regions": 0, "conveyed_bytes": 0, "started": None}
        remaining = image.remaining()
        regions = int(native.count(remaining))
        if image.blocks is None:
            nbytes = min(regions * self._geometry.region_size, self.engine.size)
        else:
            nbytes = self._blocks.weigh(self._blocks.known(image.blocks[remaining != 0]))[0]
        return {"number": number, "state": state, "regions": regions, "bytes": nbytes,
                "conveyed_regions": 0,
                "conveyed_bytes": 0, "started": time.time()}

    def status(self) -> dict[str, Any]:
        with self._lock:
            progress = dict(self.progress)
            state = self.state
            committed, at, owed = self.committed, self.last_consistent_at, self._wanted
            last, initial = self.last_cycle, self.initial_sync
        marked = self.engine.tracker.count()
        running = progress["state"] != "idle" and progress["started"]
        progress["rate_bps"] = (rate(progress["conveyed_bytes"], time.time() - progress["started"])
                                if running else None)
        if state == "connected":
            if progress["state"] != "idle":
                state = "cycling"
            elif marked == 0 and self._freeze is None and committed >= owed:
                state = "in-sync"
            else:
                state = "waiting"
        return {"mode": ASYNC, "state": state, "interval": self.interval,
                "max_rate_bps": self.max_rate,
                "committed_cycle": committed, "last_consistent_at": at,
                "lag_s": None if at is None else round(time.time() - at, 3),
                "marked_regions": marked, "cycle": progress, "last_cycle": last,
                "initial_sync": initial,
                **self.stats}
