"""The primary's side of sync and semi-async replication: the engine's Replicator.

The engine numbers every write and calls ``submit`` before its local write
and ``settle`` after it (write_events.py). Here a write becomes frames on the
link to the secondary, and ``settle`` waits for the acknowledgement its mode
needs:

    sync        WRITE (TRIM, ZERO) on the bulk path; settle waits for DATA_ACK
    semi-async  META on the urgent path, then DATA on the bulk path; settle waits
                for META_ACK only (the secondary has the metadata, durably)

No wait is longer than ``ack_timeout``: a peer that does not answer in time
is dropped (the link reconnects), and the host's write completes anyway. A
write is never failed for the peer's sake: its regions simply stay marked in
the tracker, the durable out-of-sync map, and resync carries them later.

Regions leave the map only when every write to them was applied on both
sides: DATA_ACK (or a trim's/zero's ack) for a write that also landed here.
Such regions collect in ``_acked`` and ``sweep()`` clears them in one pass
(the tracker skips regions with a write still in flight). Regions that may
differ for another reason (a write sent but failed here, a write lost with a
link, everything marked when a link came up) are *out of sync* and are never
cleared by an acknowledgement; only resync clears them.

The secondary's own marks count too: a DATA_ACK goes before the secondary's
fdatasync, so its power loss can lose data this side already swept. A new
channel carries the secondary's marked runs (``peer_marks``, from the
handshake); ``connected`` marks them here, durably, and out of sync, so the
resync sends them. A sync-mode flush whose FLUSH_ACK says the secondary's
fdatasync failed keeps every region acknowledged since the last sweep out of
sync, and resyncs them (the secondary also recovers what it lost itself).

The link (link.py) owns sockets, threads and timers: it hands this object a
channel (``connected``), each frame the secondary sends (``on_frame``), and
the loss of the channel (``disconnected``). A channel needs only
``send_urgent(frame)``, ``send_bulk(frame)`` and ``close(reason)``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .. import native
from ..blockio import all_zero
from ..errors import NbdMirrorError, ProtocolError
from ..geometry import chunks
from ..write_events import TRIM, WRITE, ZERO, WriteEvent
from . import protocol as p

log = logging.getLogger(__name__)

#: bytes per resync frame: small enough that an urgent frame never waits long behind one
RESYNC_CHUNK = 1 << 20
#: resync frames sent and not yet acknowledged, at most: a host write queues behind these
#: (a sync write waits for them), so the resync may not fill the link's whole window
RESYNC_WINDOW = 4
#: Bytes of host data that may be queued on the link while a resync runs.
HOST_QUEUE_WHILE_RESYNCING = 4 * RESYNC_CHUNK

SYNC = "sync"
SEMI_ASYNC = "semi-async"
MODES = (SYNC, SEMI_ASYNC)


class Channel(Protocol):
    def send_urgent(self, frame: p.Frame) -> None: ...
    def send_bulk(self, frame: p.Frame, timeout: float | None = None, lent: bool = False,
                  window: int | None = None, handoff: bool = False) -> None: ...
    def close(self, reason: str = "") -> None: ...


class Answer:
    """A one-shot signal with one waiter: a lock taken at birth, released by ``set``.

    Cheaper than ``threading.Event`` on the hot path (one futex each way, no
    Python-level condition). ``set`` is called with the replicator's lock held;
    a second ``set`` does nothing.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """True once set (at most ``timeout`` seconds, none if <= 0); for the one waiter."""
        if self._set:
            return True
        if timeout <= 0:
            return self._lock.acquire(False)
        return self._lock.acquire(timeout=timeout)


@dataclass(eq=False)
class Ticket:
    """A write on its way to the secondary: what settle() waits for."""

    seq: int
    first: int
    stop: int
    answered: Answer = field(default_factory=lambda: Answer())
    ok: bool = False  # the answer was the one the mode needs (not a lost link)


def peer_marks_map(channel: Any, regions: int) -> np.ndarray | None:
    """The secondary's marked runs (``channel.peer_marks``, from the handshake) as a map
    of ``regions`` regions, or None when it named none."""
    runs = getattr(channel, "peer_marks", None)
    if runs is None or not len(runs):
        return None
    marks = np.zeros(regions, dtype=np.uint8)
    for first, count in np.asarray(runs).tolist():  # a run at a time (link.py bounds them)
        marks[first:first + count] = 1
    return marks


def chunk_frame(seq: int, offset: int, buf: bytearray, fua: bool = False) -> p.Write | p.Zero:
    """A chunk of a volume's contents as a frame: ZERO (no payload) when it is all zeros."""
    if all_zero(buf):
        return p.Zero(seq, offset, len(buf), may_trim=True, fua=fua)
    return p.Write(seq, offset, buf, fua=fua)


def note_peer(engine: Any, channel: Any) -> bool:
    """Remember the secondary (volume.json ``peer_uuid``); True when it is a new one.

    The marks say what may differ from *the* secondary this volume replicated
    to. Another one (a replaced disk, a re-created volume) may hold nothing:
    every region is marked (durably, before the old peer is forgotten), so
    everything is sent again (a resync, or an async cycle).
    """
    peer = getattr(getattr(channel, "reply", None), "uuid", None)
    volume = engine.volume
    if peer is None or volume.info.peer_uuid == peer:
        return False
    if volume.info.peer_uuid is not None:
        log.warning("secondary %s replaces %s: copying the whole volume", peer,
                    volume.info.peer_uuid)
        engine.tracker.mark(0, engine.size)
    volume.update_info(peer_uuid=peer)
    return True


class PrimaryReplicator:
    """Sends the engine's writes to a secondary and waits as the mode requires."""

    def __init__(self, engine: Any, mode: str, *, ack_timeout: float = 5.0):
        if mode not in MODES:
            raise NbdMirrorError(f"unknown replication mode {mode!r} (expected sync or "
                                 "semi-async)")
        self.engine = engine
        self.mode = mode
        self.ack_timeout = ack_timeout
        self._geometry = engine.volume.geometry
        regions = engine.volume.regions
        self._lock = threading.Lock()
        self._resync_acked = threading.Condition(self._lock)
        self._channel: Channel | None = None
        self._waiting: dict[int, Ticket] = {}  # answer the host's write waits for
        self._unapplied: dict[int, tuple[int, int]] = {}  # seq -> regions, until DATA_ACK
        self._flushes: dict[int, Ticket] = {}
        self._acked = np.zeros(regions, dtype=np.uint8)  # may be cleared by sweep()
        self._out_of_sync = np.zeros(regions, dtype=np.uint8)  # only resync clears these
        # Bumped whenever a region turns out of sync: a resync frame acknowledged later
        # clears only the regions that did not turn out of sync again after it was read.
        self._oos_gen = np.zeros(regions, dtype=np.uint32)
        self._resync_sent: dict[int, tuple[int, int, np.ndarray]] = {}  # seq -> regions, gens
        # READ_REGION answers sent: the secondary acknowledges a recovery with DATA_ACK of
        # its request id, and then the regions match again (unless written meanwhile).
        self._region_answers: dict[int, tuple[int, int, np.ndarray]] = {}
        self.resync = {"regions": 0, "regions_sent": 0, "bytes_sent": 0, "running": False}
        self.stats = {"writes_sent": 0, "bytes_sent": 0, "acks": 0, "timeouts": 0,
                      "links_lost": 0, "write_failures_reported": 0, "regions_read": 0,
                      "resync_bytes": 0, "flush_failures": 0, "peer_marked_regions": 0}
        self.last_ack: float | None = None
        self.state = "disconnected"
        # (the channel it came on, the request): answered on that channel only
        self._region_requests: queue.SimpleQueue[tuple[Channel, p.ReadRegion] | None] = (
            queue.SimpleQueue())
        # Started with the first channel, not here: nbdkit forks into the background
        # after building this object, and a thread started before the fork is not in
        # the server.
        self._region_worker = threading.Thread(target=self._answer_regions, daemon=True,
                                               name="read-region")

    # -- link events ------------------------------------------------------------
    def connected(self, channel: Channel) -> None:
        """A channel to the secondary is up: everything marked now, on either side, may
        differ."""
        new_peer = note_peer(self.engine, channel)
        theirs = self._peer_marks(channel)
        if self._region_worker.ident is None:
            self._region_worker.start()
        with self._lock:
            if new_peer:  # acknowledgements of another secondary say nothing of this one
                self._acked[:] = 0
            if theirs is not None:
                # Durably, before anything could sweep them: they may differ even where
                # an acknowledgement said they match (its data lost with the secondary's
                # power before its fdatasync).
                try:
                    self.engine.tracker.mark_map(theirs)
                except OSError as err:  # the secondary keeps them marked until resynced
                    log.warning("cannot record the secondary's marked regions durably: %s",
                                err)
                    self.engine.tracker.merge(theirs)
                self._acked[theirs != 0] = 0
            self._channel = channel
            with self.engine.tracker.lock:
                # Marked and not known to match: regions acknowledged since the last
                # sweep match, everything else marked may not (written while no link
                # was up, or before this process started, or marked by the secondary).
                marked = (self.engine.tracker.marks != 0) & (self._acked == 0)
            self._mark_out_of_sync_where(marked)
            self.state = "connected"
        log.info("connected to the secondary (%s mode)", self.mode)
        self._start_resync(channel)

    def _peer_marks(self, channel: Channel) -> np.ndarray | None:
        """The secondary's marked runs (``channel.peer_marks``) as a region map, or None."""
        regions = peer_marks_map(channel, self._out_of_sync.size)
        count = 0 if regions is None else int(native.count(regions))
        self.stats["peer_marked_regions"] = count
        if count:
            log.info("the secondary names %d regions whose data may be missing there", count)
        return regions

    def _start_resync(self, channel: Channel) -> None:
        threading.Thread(target=self._resync, args=(channel,), daemon=True,
                         name="resync").start()

    def disconnected(self, reason: str) -> None:
        """The channel is gone: every unanswered write stays out of sync."""
        with self._lock:
            lost = self._forget(self._channel)
        if lost:
            log.warning("lost the secondary: %s", reason)

    def _forget(self, channel: Channel | None) -> bool:
        """(lock held) ``channel``, if still the current one, is gone: every unanswered
        write stays out of sync. True when it was the current one."""
        if channel is None or self._channel is not channel:
            return False
        self._channel = None
        self.state = "disconnected"
        self.stats["links_lost"] += 1
        self._lose_unanswered()
        return True

    def _mark_out_of_sync(self, first: int, stop: int) -> None:
        """(lock held) The two sides may differ in [first, stop) until a resync."""
        self._mark_out_of_sync_where(slice(first, stop))

    def _mark_out_of_sync_where(self, where: slice | np.ndarray) -> None:
        """(lock held) The two sides may differ where ``where`` (a slice or a region mask)
        says, until a resync; a resync ack of what was read before does not clear it."""
        self._out_of_sync[where] = 1
        self._oos_gen[where] += 1

    def _lose_unanswered(self) -> None:
        """(lock held) Writes and flushes in the air will never be answered."""
        for first, stop in self._unapplied.values():
            self._mark_out_of_sync(first, stop)
        self._unapplied.clear()
        self._resync_sent.clear()
        self._resync_acked.notify_all()
        self._region_answers.clear()
        for ticket in list(self._waiting.values()) + list(self._flushes.values()):
            ticket.answered.set()
        self._waiting.clear()
        self._flushes.clear()

    # -- the engine's Replicator ---------------------------------------------------
    def submit(self, event: WriteEvent) -> Ticket | None:
        # While a resync runs, host data may queue only so much ahead of its chunks: a
        # semi-async writer (which waits for META_ACK only) would otherwise fill the
        # window and each chunk would wait behind all of it (7 MiB/s of resync against
        # 111 MiB/s of host writes on a 1 Gbit/s link).
        window = HOST_QUEUE_WHILE_RESYNCING if self.resync["running"] else None
        with self._lock:
            channel = self._channel
            first, stop = self._geometry.span_at_least_one(event.offset, event.length)
            if channel is None:  # marked by the engine; the next resync carries it
                self._mark_out_of_sync(first, stop)
                return None
            ticket = Ticket(event.seq, first, stop)
            self._waiting[event.seq] = ticket
            self._unapplied[event.seq] = (first, stop)
        with self._or_drop(channel, f"write {event.seq}"):
            # Each frame is written as soon as it is ready: a META leaves before its
            # DATA is copied into the socket (which takes a while for a large write).
            for urgent, frame in self._frames(event):
                if urgent:
                    channel.send_urgent(frame)
                else:  # a full window may not hold the host past the ack timeout
                    channel.send_bulk(frame, timeout=self.ack_timeout, lent=True,
                                      window=window)
        self.stats["writes_sent"] += 1
        self.stats["bytes_sent"] += event.length if event.kind == WRITE else 0
        return ticket

    def _frames(self, event: WriteEvent) -> list[tuple[bool, p.Frame]]:
        """The frames of ``event`` for this mode, each with its path (urgent or bulk)."""
        seq, off, length = event.seq, event.offset, event.length
        # The host's buffer is lent: the link copies it only if it has to keep it.
        data = event.data if event.kind == WRITE else b""
        if self.mode == SYNC:
            if event.kind == WRITE:
                return [(False, p.Write(seq, off, data, event.fua))]
            if event.kind == TRIM:
                return [(False, p.Trim(seq, off, length, event.fua))]
            return [(False, p.Zero(seq, off, length, event.may_trim, event.fua))]
        kind = {WRITE: p.WriteKind.WRITE, TRIM: p.WriteKind.TRIM, ZERO: p.WriteKind.ZERO}
        frames: list[tuple[bool, p.Frame]] = [
            (True, p.Meta(seq, off, length, kind[event.kind], event.fua,
                          event.kind == ZERO and event.may_trim))]
        if event.kind == WRITE:
            frames.append((False, p.Data(seq, off, data)))
        return frames

    def settle(self, ticket: Ticket | None, landed: bool) -> None:
        if ticket is None:
            return
        if not landed:  # sent, but not written here: the two sides may differ
            with self._lock:
                self._mark_out_of_sync(ticket.first, ticket.stop)
        if not ticket.answered.wait(self.ack_timeout):
            self.stats["timeouts"] += 1
            channel = self._channel
            if channel is not None:
                self._drop(channel, f"no acknowledgement within {self.ack_timeout:g}s")
        with self._lock:
            self._waiting.pop(ticket.seq, None)

    def flush(self, event: WriteEvent) -> None:
        """Sync mode: return once the secondary flushed every write it acknowledged."""
        if self.mode != SYNC:
            return
        with self._lock:
            channel = self._channel
            if channel is None:
                return
            ticket = Ticket(event.seq, 0, 0)
            self._flushes[event.seq] = ticket
        with self._or_drop(channel, f"flush {event.seq}"):
            channel.send_bulk(p.Flush(event.seq), timeout=self.ack_timeout)  # behind its data
        if not ticket.answered.wait(self.ack_timeout):
            self.stats["timeouts"] += 1
            self._drop(channel, f"no flush acknowledgement within {self.ack_timeout:g}s")
        with self._lock:
            self._flushes.pop(event.seq, None)

    @contextlib.contextmanager
    def _or_drop(self, channel: Channel, what: str) -> Iterator[None]:
        """Sending ``what`` for the host: trouble drops the link (the regions stay out of
        sync), it never fails the host's request, not even a bug in sending."""
        try:
            yield
        except (NbdMirrorError, OSError) as err:
            self._drop(channel, f"sending failed: {err}")
        except Exception as err:  # a bug; still, the host's request does not fail for it
            log.exception("sending %s failed", what)
            self._drop(channel, f"sending failed: {err!r}")

    def _drop(self, channel: Channel, reason: str) -> None:
        try:
            channel.close(reason)
        finally:
            with self._lock:
                self._forget(channel)
        log.warning("dropped the link to the secondary: %s", reason)

    # -- frames from the secondary ------------------------------------------------
    def on_frame(self, frame: p.Frame) -> None:
        """Handle one frame the secondary sent (the link's receiver thread)."""
        if isinstance(frame, p.MetaAck):
            self._answer(frame.seq, frame.count, applied=False)
        elif isinstance(frame, p.DataAck):
            self._answer(frame.seq, frame.count, applied=True)
        elif isinstance(frame, p.WriteFailed):
            self._write_failed(frame)
        elif isinstance(frame, p.FlushAck):
            self._flush_answered(frame)
        elif isinstance(frame, p.ReadRegion):
            # The secondary is missing these regions until its answer lands (and that
            # answer's DATA_ACK clears them: it is read after this).
            first, stop = self._geometry.span_at_least_one(frame.offset, frame.length)
            with self._lock:
                self._mark_out_of_sync(first, stop)
            # Not on the link's receiver thread: reading waits for the regions' writes,
            # and a write that drops the link joins that thread.
            channel = self._channel
            if channel is not None:
                self._region_requests.put((channel, frame))
        elif not isinstance(frame, (p.Pong, p.Ping)):
            raise ProtocolError(f"a primary does not expect {p.frame_name(frame)} frames")

    def _answer(self, seq: int, count: int, applied: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self.last_ack = now
            self.stats["acks"] += count
            for s in range(seq, seq + count):
                if applied:
                    regions = self._unapplied.pop(s, None)
                    if regions is not None:
                        self._acked[regions[0]:regions[1]] = 1
                    resent = self._resync_sent.pop(s, None) or self._region_answers.pop(s, None)
                    if resent is not None:
                        self._resynced(*resent)
                        self._resync_acked.notify_all()
                # sync waits for the data, semi-async for the metadata (a trim or zero
                # is acknowledged as applied at once in either mode)
                if applied or self.mode == SEMI_ASYNC:
                    ticket = self._waiting.get(s)
                    if ticket is not None:
                        ticket.ok = True
                        ticket.answered.set()

    def _write_failed(self, frame: p.WriteFailed) -> None:
        """The secondary could not write: it recovers the region itself (READ_REGION)."""
        first, stop = self._geometry.span_at_least_one(frame.offset, frame.length)
        with self._lock:
            self.stats["write_failures_reported"] += 1
            self._unapplied.pop(frame.seq, None)
            # Until it has recovered, the secondary differs there (only resync clears this).
            self._mark_out_of_sync(first, stop)
            ticket = self._waiting.get(frame.seq)
            if ticket is not None:  # answered: the secondary knows of the write
                ticket.ok = True
                ticket.answered.set()

    def _flush_answered(self, frame: p.FlushAck) -> None:
        with self._lock:
            ticket = self._flushes.get(frame.seq)
            channel = self._channel
            if frame.failed:
                # The secondary's fdatasync failed: what it acknowledged since its last
                # good one may be lost there. It recovers that itself; here, regions
                # acknowledged since the last sweep stay marked, out of sync, and resync.
                self.stats["flush_failures"] += 1
                self._mark_out_of_sync_where(self._acked != 0)
            if ticket is not None:
                ticket.ok = not frame.failed
                ticket.answered.set()
        if frame.failed:
            log.warning("the secondary's flush %d failed (its fdatasync): its recent writes "
                        "stay out of sync and are resent", frame.seq)
            if channel is not None:
                self._start_resync(channel)

    def _answer_regions(self) -> None:
        """The worker that answers READ_REGION requests, one at a time."""
        while True:
            request = self._region_requests.get()
            if request is None:
                return
            channel, frame = request
            if channel is not self._channel:  # asked on a link that is gone
                continue
            try:
                self._send_region(channel, frame)
            except (NbdMirrorError, OSError) as err:
                self._drop(channel, f"answering READ_REGION failed: {err}")

    def close(self) -> None:
        """Stop the READ_REGION worker (the engine may close after this)."""
        self._region_requests.put(None)
        if self._region_worker.ident is not None:
            self._region_worker.join(10)

    def _send_region(self, channel: Channel, frame: p.ReadRegion) -> None:
        """Answer a recovering secondary with the region's current contents, in order."""

        first, stop = self._geometry.span_at_least_one(frame.offset, frame.length)

        def send(_seq: int, buf: bytearray) -> None:
            with self._lock:  # read holding the regions: later writes bump their generation
                self._region_answers[frame.seq] = (first, stop,
                                                   self._oos_gen[first:stop].copy())
            channel.send_bulk(p.RegionData(frame.seq, frame.offset, buf),
                              timeout=self.ack_timeout)

        self.engine.read_ordered(frame.offset, frame.length, send)
        self.stats["regions_read"] += 1

    # -- resync -----------------------------------------------------------------
    def _resync(self, channel: Channel) -> None:
        """Send the regions out of sync when the link came up, read live, in order.

        Runs of regions found with the C helper, sent a chunk at a time (never a
        Python step per region); an all-zero chunk travels as a ZERO frame.
        Host writes go on meanwhile: each chunk is read holding its regions, so
        it is numbered among the writes and the secondary applies it in order.
        """
        with self._lock:
            todo = self._out_of_sync.copy()
        runs = native.scan_runs(todo)
        step = max(1, RESYNC_CHUNK // self.engine.volume.region_size)
        # Each resync has its own progress: one left over from a dropped link may still
        # be finishing and must not write over this one's.
        progress = {"regions": int(runs[:, 1].sum()) if len(runs) else 0, "regions_sent": 0,
                    "bytes_sent": 0, "running": True}
        self.resync = progress
        log.info("resync: %d regions out of sync", progress["regions"])
        try:
            for first, stop in chunks(runs.tolist(), step):
                if self._channel is not channel:
                    return
                self._resync_chunk(channel, first, stop)
                progress["regions_sent"] += stop - first
                progress["bytes_sent"] += self._geometry.byte_range(first, stop)[1]
        except (NbdMirrorError, OSError) as err:
            self._drop(channel, f"resync failed: {err}")
        finally:
            progress["running"] = False

    def _resync_chunk(self, channel: Channel, first: int, stop: int) -> None:
        offset, length = self._geometry.byte_range(first, stop)
        with self._lock:  # host writes must not queue behind the whole window of resync
            while len(self._resync_sent) >= RESYNC_WINDOW and self._channel is channel:
                self._resync_acked.wait(self.ack_timeout)

        def send(seq: int, buf: bytearray) -> None:
            with self._lock:
                if self._channel is not channel:
                    return
                self._unapplied[seq] = (first, stop)
                self._resync_sent[seq] = (first, stop, self._oos_gen[first:stop].copy())
            # bounded: host writes to these regions wait behind this chunk
            frame = chunk_frame(seq, offset, buf)
            channel.send_bulk(frame, timeout=self.ack_timeout)
            if isinstance(frame, p.Write):
                self.stats["resync_bytes"] += length

        self.engine.read_ordered(offset, length, send)

    def _resynced(self, first: int, stop: int, gens: np.ndarray) -> None:
        """(lock held) A resync frame was applied: those regions match, unless they
        turned out of sync again after it was read."""
        same = self._oos_gen[first:stop] == gens
        self._out_of_sync[first:stop][same] = 0
        self._acked[first:stop][same] = 1  # the next sweep clears their marks

    # -- clearing and status -------------------------------------------------------
    def sweep(self) -> int:
        """Clear from the marks the regions both sides hold the same; return how many.

        Not a region whose data is still on its way (semi-async settles a write on
        META_ACK, before its data is applied): its mark is what a crash now would
        resync. The clear runs under this object's lock, so no write can be
        submitted into a region between choosing it and clearing it.
        """
        with self._lock:
            done = self._acked & (self._out_of_sync == 0)
            self._acked[:] = 0
            for first, stop in self._unapplied.values():
                done[first:stop] = 0
            return self.engine.tracker.clear(done) if done.any() else 0

    def status(self) -> dict[str, Any]:
        rs = self.engine.volume.region_size
        with self._lock:
            out_of_sync = int(native.count(self._out_of_sync))
            in_flight = len(self._unapplied)
            in_flight_bytes = sum(stop - first for first, stop in self._unapplied.values()) * rs
        marked = self.engine.tracker.count()
        age = None if self.last_ack is None else round(time.monotonic() - self.last_ack, 3)
        state = self.state
        if state == "connected":
            # Never "in-sync" while a region may differ: one out of sync, or a write
            # the secondary has not confirmed applying.
            if out_of_sync == 0 and in_flight == 0:
                state = "in-sync"
            else:
                state = "resyncing" if self.resync["running"] else "out-of-sync"
        return {"mode": self.mode, "state": state, "out_of_sync_regions": out_of_sync,
                "out_of_sync_bytes": min(out_of_sync * rs, self.engine.size),
                "marked_regions": marked, "in_flight_writes": in_flight,
                "in_flight_bytes": in_flight_bytes,
                "last_ack_age": age, "resync": dict(self.resync), **self.stats}
