"""The secondary's policy: frames from the primary in, acknowledgements out, no I/O of its own.

A ``Receiver`` wraps a replica ``Engine`` (opened with ``replica=True``). The
link decodes frames and hands each to ``Receiver.handle`` in arrival order; the
receiver applies writes through ``Engine.apply_replica`` and answers through an
``out`` object with ``send_urgent(frame)`` / ``send_bulk(frame)`` (the link's
channel). It opens no socket and starts no thread. Writes are applied by
``drain()``, outside the receiver's lock: by default in the thread that
delivered the frame that made them applicable; with ``wake``, the receiver
only calls ``wake()`` and the caller's applier thread runs ``drain()`` (what
``nbdmirror receive`` does), so the link's reader takes each META, and
acknowledges it, without waiting behind earlier writes' disk I/O. Data
received and not yet applied is bounded: past ``max_waiting`` bytes the
reader waits while the applier is busy. ``tick(now)`` (retries) and
``sweep()`` (clearing) are driven by the link's timer.

**The semi-async promise.** The secondary answers META_ACK only once the
write's regions are recorded as *pending* durably: the replica's region
tracker marks them (``RegionTracker.mark``: one map fdatasync when a region
turns pending, nothing when it is already marked) and counts the write as
unsettled, so no ``sweep`` can clear the mark before the write's data is
applied and synced. A region stays marked while it has a write announced and
not applied, a write that failed and is being recovered, or applied data not
yet fdatasync'ed; regions whose META arrived on a link that was lost before
their DATA, and regions marked before this receiver started, stay marked
until a later write covering each of them whole has landed. So at every
moment the secondary's marks (marks.map) name every region whose data may be
missing, and after losing the primary it can name exactly those. A primary
that connects is told them (``marked_runs``, sent in the handshake) and
resyncs them: a DATA_ACK goes before the fdatasync, so power lost here can
lose data the primary believes is here.

**Write order.** The primary numbers writes so that, of two writes sharing a
region, the lower number was applied first on the primary; META frames may
overtake earlier writes' DATA. Every write known to the receiver (a META, or
a WRITE/TRIM/ZERO with its data) is an entry kept in number order until it is
applied; an entry is applied only when no lower entry sharing a region is
still unapplied. A DATA that arrives early waits in that list (memory is
bounded by the primary's window); writes to other regions pass it.

**Recovery.** A write that fails on the secondary's disk is answered with
WRITE_FAILED; its regions (whole, at most ``MAX_DATA`` bytes per request)
become *recovering* and stay marked. The receiver asks the primary for their
current contents with READ_REGION and applies the REGION_DATA answer in the
same order as writes: after every write it knew of when it asked (the
primary reads the regions only once those have landed there, so its answer
holds them) and before every later write to those regions (which the answer
may or may not hold, so they are applied again on top of it). A region is
whole again, no longer recovering, when that answer has landed. When it fails
too, the receiver asks again from ``tick(now)`` after a backoff (doubling
from ``retry_base`` up to ``retry_max`` seconds, for as long as it takes).
A FLUSH that comes while recoveries are outstanding is answered once those
have landed and been fdatasync'ed, so a flush still covers every write
acknowledged before it (a WRITE_FAILED acknowledges one too).

Request ids: READ_REGION/REGION_DATA carry a request id in ``seq``, drawn
from the receiver's own counter with bit 63 set (``REQUEST_ID_BASE``): they
are matched only against outstanding requests, never against write numbers,
and the high bit keeps them apart from write numbers in logs. An answer to a
request abandoned after ``answer_timeout`` is ignored.

``FaultInjector`` is a TEST-ONLY way to make the secondary's disk writes fail
for chosen regions a chosen number of times. It is off by default (the
``faults`` argument is None) and consulted just before each local apply.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

import numpy as np

from .. import native, snapshots, staging
from ..engine import Engine
from ..errors import NbdMirrorError, ProtocolError, UsageError, VolumeError
from ..geometry import run_regions
from ..units import rate
from ..write_events import TRIM, WRITE, ZERO, WriteEvent
from . import protocol as p

log = logging.getLogger(__name__)

SYNC: Final = "sync"
SEMI_ASYNC: Final = "semi-async"
ASYNC: Final = "async"
MODES: Final = (SYNC, SEMI_ASYNC, ASYNC)
#: READ_REGION request ids: this bit set, then a counter (see the module docstring)
REQUEST_ID_BASE: Final = 1 << 63
#: flush held-back acks before applying a write at least this long
FLUSH_BEFORE: Final = 64 << 10
#: async chunks already here whose copies on write are made with the one being applied:
#: up to this many bytes of them (one store and map sync for the lot)
PRESERVE_AHEAD: Final = 32 << 20
_KINDS = {p.WriteKind.WRITE: WRITE, p.WriteKind.TRIM: TRIM, p.WriteKind.ZERO: ZERO}
_RECOVER = "recover"

Key = tuple[int, int, int]  # (write seq, 0, 0); a recovery: (last seq known, 1, request id)


class Outbox(Protocol):
    """Where the receiver's frames go (the link's channel)."""

    def send_urgent(self, frame: p.Frame) -> None: ...

    def send_bulk(self, frame: p.Frame) -> None: ...

    def flush(self) -> None:
        """Send what this thread holds back (acks wait for the end of a read)."""


class FaultInjector:
    """TEST ONLY: make the secondary's disk writes fail for chosen regions, a chosen number
    of times. Off unless passed to ``Receiver(faults=...)``; production never builds one.

    Each apply (write, trim, zero or recovered region) touching a region with
    failures left uses up one of them and fails with ``OSError(EIO)`` before
    anything is written.
    """

    def __init__(self) -> None:
        self._left: dict[int, int] = {}
        self._lock = threading.Lock()
        self.injected = 0

    def fail(self, first: int, count: int = 1, times: int = 1) -> None:
        """Regions ``first .. first+count-1`` fail their next ``times`` applies."""
        with self._lock:
            for region in range(first, first + count):
                self._left[region] = self._left.get(region, 0) + times

    def check(self, first: int, stop: int) -> None:
        """Raise OSError(EIO) if a region of [first, stop) has failures left."""
        with self._lock:
            hit = [r for r in self._left if first <= r < stop]
            if not hit:
                return
            for region in hit:
                self._left[region] -= 1
                if not self._left[region]:
                    del self._left[region]
            self.injected += 1
        raise OSError(errno.EIO, f"injected write failure (regions {hit})")


@dataclasses.dataclass(slots=True, eq=False)
class _Recovery:
    """Whole regions [first, stop) being recovered from the primary's current contents."""

    first: int
    stop: int
    offset: int
    length: int
    attempts: int = 0
    due: float | None = None  # when to ask (again); None while a request is out
    request: _Entry | None = None


@dataclasses.dataclass(slots=True, eq=False)
class _Entry:
    """A write (or a recovery's answer) waiting to be applied in order."""

    key: Key
    kind: str  # WRITE, TRIM, ZERO or _RECOVER
    seq: int  # the write's number, or the request id
    offset: int
    length: int
    first: int
    stop: int
    fua: bool = False
    may_trim: bool = False
    data: p.Buffer | None = None
    ready: bool = False  # its data is here (or it needs none)
    acked: bool = True  # its META_ACK is sent: only then may it be applied
    applying: bool = False
    ahead: bool = False  # an async chunk whose copies on write were made ahead of it
    staged: int = -1  # an async chunk kept in the staging log: the log's generation then
    recovery: _Recovery | None = None
    sent_at: float = 0.0
    link: int = 0  # the connection it came on (Receiver._link): answers go on that one only
    #: a WRITEV's scattered (offset, length) ranges, within [offset, offset + length);
    #: None: the one range [offset, offset + length)
    extents: np.ndarray | None = None
    nbytes: int = 0  # bytes of data it writes (a WRITEV's: less than its span)

    def ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of each range it writes."""
        if self.extents is None:
            return [(self.offset, self.length)]
        return [(int(o), int(n)) for o, n in self.extents.tolist()]


class _Landed:
    """Regions applied since the last fdatasync: a map, and the span it is set within.

    A sync takes only that span: on a 1 TiB volume the map has 16M entries, and
    an async initial sync syncs every few chunks (taking the whole map each time
    had made a 1 MiB chunk cost 2.9 ms there against 1.2 on a 2 GiB volume).
    """

    def __init__(self, regions: int) -> None:
        self.map = np.zeros(regions, dtype=bool)
        self.lo, self.hi = regions, 0

    def note(self, first: int, stop: int) -> None:
        self.map[first:stop] = True
        self.lo, self.hi = min(self.lo, first), max(self.hi, stop)

    def note_regions(self, regions: np.ndarray) -> None:
        """``note`` of every region in ``regions`` (indexes, any order) at once."""
        if regions.size:
            self.map[regions] = True
            self.lo = min(self.lo, int(regions.min()))
            self.hi = max(self.hi, int(regions.max()) + 1)

    def take(self) -> tuple[slice, np.ndarray]:
        """(the span, what was set in it), cleared here."""
        span = slice(self.lo, max(self.lo, self.hi))
        self.lo, self.hi = self.map.size, 0
        part = self.map[span].copy()
        self.map[span] = False
        return span, part


def _entry_key(entry: _Entry) -> Key:
    """What the order is sorted by."""
    return entry.key


class _Held:
    """The regions [first, stop) of the entries a walk of the order has passed.

    ``_next_applicable`` asks, for each applicable entry it meets, whether an
    entry below shares a region with it; the order may hold thousands of
    entries (METAs whose data has not come yet, writes waiting behind them),
    so asking each against every span below would make one walk O(n²). Most
    walks end at the first entry they ask about, so the walk only appends
    each span to ``spans`` (as cheap as the plain walk was) and the first
    question scans them. From the second question on, the spans are taken
    into sorted runs, neither overlapping nor touching, each span once, and
    a question is a bisection: a walk is O(n log n) at worst. Runs, never
    single regions: a TRIM or ZERO may cover millions of them.
    """

    __slots__ = ("spans", "_taken", "_starts", "_stops")

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []  # appended to by the walk
        self._taken = -1  # spans[:_taken] are in the runs (-1: nothing asked yet)
        self._starts: list[int] = []  # run i covers [_starts[i], _stops[i])
        self._stops: list[int] = []

    def overlaps(self, first: int, stop: int) -> bool:
        """Whether [first, stop) shares a region with a span in ``spans``."""
        if self._taken < 0:  # the first question, most often the only one: a scan
            self._taken = 0
            return any(a < stop and first < b for a, b in self.spans)
        for a, b in self.spans[self._taken:]:
            self._take(a, b)
        self._taken = len(self.spans)
        i = bisect.bisect_right(self._stops, first)  # the first run ending past ``first``
        return i < len(self._stops) and self._starts[i] < stop

    def _take(self, first: int, stop: int) -> None:
        """Add [first, stop) to the runs."""
        starts, stops = self._starts, self._stops
        i = bisect.bisect_left(stops, first)  # the first run reaching up to the span
        j = bisect.bisect_right(starts, stop, i)  # past the last run starting by its end
        if i < j:  # runs i .. j-1 overlap or touch the span: one run with it
            first, stop = min(first, starts[i]), max(stop, stops[j - 1])
        starts[i:j] = [first]
        stops[i:j] = [stop]


@dataclasses.dataclass(slots=True, eq=False)
class _HeldFlush:
    """A FLUSH to answer once the recoveries outstanding when it came have landed."""

    seq: int
    recoveries: set[_Recovery]


@dataclasses.dataclass(frozen=True, slots=True)
class _FlushDue:
    """In a list of frames to send: FLUSH_ACK ``seq``, after an fdatasync (see ``_send``)."""

    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class _DurableAck:
    """In a list of frames to send: DATA_ACK of an async cycle's chunk once it is on disk.

    Chunks are written without a sync each; ``_send`` makes one fdatasync for every
    such ack in the list (group commit), and answers WRITE_FAILED instead if it fails
    (the primary sends those chunks again)."""

    seq: int
    offset: int
    length: int
    #: a staged chunk: the log's generation when it was appended (a failed log sync
    #: in any thread, a later generation, may have lost it); -1: landed on the volume
    generation: int = -1


Answer = p.Frame | _FlushDue | _DurableAck


def _same_range(frame: p.Data | p.RegionData, entry: _Entry, what: str, said: str) -> None:
    """ProtocolError unless ``frame`` covers the range its ``entry`` announced."""
    if (frame.offset, frame.length) != (entry.offset, entry.length):
        raise ProtocolError(f"{what} covers {frame.offset}+{frame.length}; {said} "
                            f"{entry.offset}+{entry.length}")


@dataclasses.dataclass(slots=True)
class _Counters:
    writes_applied: int = 0
    bytes_applied: int = 0
    write_failures: int = 0
    regions_recovered: int = 0
    recovery_attempts: int = 0
    flushes: int = 0
    flush_failures: int = 0
    stale_answers: int = 0
    resyncs_begun: int = 0
    resyncs_ended: int = 0
    cycles_applied: int = 0  # async: committed cycles applied from the staging log
    spills: int = 0  # async: staging logs applied before their commit (see _spill)


class Receiver:
    """The secondary's replication policy over a replica engine (see the module docstring).

    ``handle(frame)`` is thread-safe: the link may call it from an urgent reader
    and a bulk reader at once, each in its connection's arrival order. It raises
    ``ProtocolError`` when the primary broke the protocol, and ``VolumeError``
    when this side cannot keep its promise (pending regions could not be
    recorded durably): either way, drop the connection and call ``link_lost()``.
    ``out`` may be replaced when the link reconnects.
    """

    def __init__(self, engine: Engine, mode: str, out: Outbox, *,
                 faults: FaultInjector | None = None, clock: Callable[[], float] = time.monotonic,
                 retry_base: float = 0.1, retry_max: float = 10.0,
                 answer_timeout: float = 30.0, wake: Callable[[], None] | None = None,
                 max_waiting: int = 64 << 20) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown replication mode {mode!r} for a secondary "
                             f"(expected {' or '.join(MODES)})")
        if not engine.replica:
            raise UsageError(f"{engine.volume.path} is not open as a replica")
        self.engine = engine
        self.mode = mode
        self.out = out
        self.faults = faults
        self.clock = clock
        self.retry_base, self.retry_max, self.answer_timeout = retry_base, retry_max, answer_timeout
        self.tracker = engine.tracker
        self.tracker.track_pending()
        self._shift = self.tracker.shift
        self._rs = engine.volume.region_size
        self._regions = engine.volume.regions
        self._lock = threading.Lock()  # the receiver's state; taken before the tracker's lock
        self._progress = threading.Condition(self._lock)  # an apply finished
        # With ``wake``, an applier thread of the caller's runs drain() (module docstring).
        self._wake = wake
        self.max_waiting = max_waiting
        self._waiting_bytes = 0  # data received and not applied yet
        self._draining = False  # drain() is applying an entry
        self._link = 0  # counts lost connections: a write's answer goes on its own only
        self._sweep_lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one fdatasync of the replica at a time
        self._order: list[_Entry] = []  # unapplied entries, by key
        self._by_seq: dict[int, _Entry] = {}
        self._requests: dict[int, _Entry] = {}  # request id -> its entry
        self._abandoned: set[int] = set()
        self._recoveries: list[_Recovery] = []
        self._held_flushes: list[_HeldFlush] = []  # in arrival order
        self._applicable = 0  # entries ready and acked, not applying (0: nothing to scan)
        self._max_seq = 0  # the highest write number known on this connection
        self._next_request = 0
        # Applied since the last data fdatasync; synced since the last sweep; may be missing.
        self._landed = _Landed(self._regions)
        self._synced = np.zeros(self._regions, dtype=bool)
        # Marked before we started: unknown, so kept until written whole.
        self._suspect = self.tracker.marks != 0
        self._counts = _Counters()
        self._last_frame: float | None = None
        self.cycle_in_progress: int | None = None  # async: the cycle arriving
        # async: the arriving cycle's chunks, kept apart from the volume until its commit
        self._staging = staging.StagingLog.open(engine.volume)
        if mode == ASYNC:
            self.prepare_staging()
        self._volume_dirty = False  # written to since its last fdatasync
        self._unstaged_cycle: int | None = None  # a cycle that spilled: the rest is direct
        if self._staging.committed is not None:  # committed before a crash, maybe not applied
            self._apply_committed()
        #: async: (clock, bytes applied) when the arriving cycle began (its throughput)
        self._cycle_from: tuple[float, int] | None = None

    def prepare_staging(self) -> None:
        """For async mode: the staging log written whole ahead of its first cycle (see
        ``StagingLog.prepare``); best effort."""
        try:
            self._staging.prepare()
        except OSError as err:
            log.warning("cannot write the staging log whole ahead of use: %s", err)

    # -- frames in -----------------------------------------------------------
    def handle(self, frame: p.Frame) -> None:
        """Act on one frame from the primary (see the module docstring)."""
        self._last_frame = self.clock()
        handler = self._HANDLERS.get(type(frame))
        if handler is None:
            raise ProtocolError(f"a secondary does not take {p.frame_name(frame)} frames here")
        handler(self, frame)

    def _on_write(self, frame: p.Write) -> None:
        entry = self._write_entry(frame.seq, WRITE, frame.offset, frame.length, frame.fua)
        entry.data, entry.ready = frame.data, True
        self._admit(entry)

    def _on_write_v(self, frame: p.WriteV) -> None:
        """Async: a cycle's scattered chunks in one frame, applied (or staged) and
        acknowledged as one."""
        self._async_only(frame)
        offset, length = frame.span
        entry = self._write_entry(frame.seq, WRITE, offset, length, fua=True)
        entry.extents, entry.data, entry.ready = frame.extents, frame.data, True
        entry.nbytes = len(entry.data)
        self._admit(entry)

    def _on_trim(self, frame: p.Trim) -> None:
        entry = self._write_entry(frame.seq, TRIM, frame.offset, frame.length, frame.fua)
        entry.ready = True
        self._admit(entry)

    def _on_zero(self, frame: p.Zero) -> None:
        entry = self._write_entry(frame.seq, ZERO, frame.offset, frame.length, frame.fua,
                                  frame.may_trim)
        entry.ready = True
        self._admit(entry)

    def _on_meta(self, frame: p.Meta) -> None:
        """Record the regions as pending durably, then META_ACK at once."""
        if self.mode != SEMI_ASYNC:
            raise ProtocolError(f"META for write {frame.seq} in {self.mode} mode")
        kind = _KINDS[frame.kind]
        entry = self._write_entry(frame.seq, kind, frame.offset, frame.length, frame.fua,
                                  frame.may_trim)
        entry.ready, entry.acked = kind != WRITE, False
        self._admit(entry)  # registered (counted unsettled) before the mark: no sweep clears it
        try:
            self.tracker.mark(frame.offset, frame.length)
        except OSError as err:
            raise VolumeError(f"cannot record regions of write {frame.seq} as pending durably: "
                              f"{err}; the primary keeps them out of sync") from err
        self.out.send_urgent(p.MetaAck(frame.seq))
        with self._lock:
            entry.acked = True
            if entry.ready:
                self._applicable += 1
        self._kick()

    def _on_data(self, frame: p.Data) -> None:
        with self._lock:
            entry = self._by_seq.get(frame.seq)
            if entry is None or entry.kind != WRITE or entry.ready:
                raise ProtocolError(f"DATA for write {frame.seq}, which has no META waiting "
                                    "for its data")
            _same_range(frame, entry, f"DATA for write {frame.seq}", "its META said")
            entry.data, entry.ready = frame.data, True
            self._applicable += entry.acked
            self._waiting_bytes += entry.nbytes
        self._kick()
        self._throttle()

    def _on_region_data(self, frame: p.RegionData) -> None:
        with self._lock:
            entry = self._requests.pop(frame.seq, None)
            if entry is None:
                if frame.seq in self._abandoned:  # a late answer to a request given up on
                    self._abandoned.discard(frame.seq)
                    self._counts.stale_answers += 1
                    return
                raise ProtocolError(f"REGION_DATA for request {frame.seq}, which is not "
                                    "outstanding")
            _same_range(frame, entry, f"REGION_DATA for request {frame.seq}",
                        "the request was")
            entry.data, entry.ready = frame.data, True
            self._applicable += 1
            self._waiting_bytes += entry.nbytes
        self._kick()

    def _on_flush(self, frame: p.Flush) -> None:
        """fdatasync what has been applied, then FLUSH_ACK (failed if the sync failed).

        A write answered with WRITE_FAILED is not here until its recovery lands,
        and a flush covers every write acknowledged before it: while recoveries
        are outstanding the flush is held, and answered (after its fdatasync)
        by the thread that applies the last of them (``_recovery_done``), never
        waited for on this one. The primary bounds its wait.
        """
        with self._lock:
            self._counts.flushes += 1
            if self._recoveries:
                self._held_flushes.append(_HeldFlush(frame.seq, set(self._recoveries)))
                return
        self._send([_FlushDue(frame.seq)])

    def _on_ping(self, frame: p.Ping) -> None:
        self.out.send_urgent(p.Pong(frame.seq))

    def _on_pong(self, frame: p.Pong) -> None:
        pass  # the link's keepalive reads the time of the last frame

    def _on_resync_begin(self, frame: p.ResyncBegin) -> None:
        self._counts.resyncs_begun += 1

    def _on_resync_end(self, frame: p.ResyncEnd) -> None:
        self._counts.resyncs_ended += 1

    def _on_cycle_begin(self, frame: p.CycleBegin) -> None:
        self._async_only(frame)
        self.cycle_in_progress = frame.seq
        self._cycle_from = (self.clock(), self._counts.bytes_applied)

    def _on_cycle_commit(self, frame: p.CycleCommit) -> None:
        """Every chunk of cycle ``seq`` was acknowledged (each once on disk): keep the
        image, record the cycle as held whole, CYCLE_ACK.

        A staged cycle is committed once its COMMIT record is durable: CYCLE_ACK
        goes then, with the apply lock held (a reader opening later waits for the
        apply), and the apply follows (see ``_apply_committed``)."""
        self._async_only(frame)
        with self._lock:
            if self._by_seq:
                raise ProtocolError(f"CYCLE_COMMIT {frame.seq} with {len(self._by_seq)} "
                                    "of its chunks not acknowledged yet")
        if not 0 <= frame.taken_us < p.MAX_TIME_US:  # (the decoder refuses it already)
            raise ProtocolError(f"CYCLE_COMMIT {frame.seq} carries an impossible time "
                                f"({frame.taken_us} us since 1970)")
        if frame.seq < self.engine.volume.info.cycle:
            raise ProtocolError(f"CYCLE_COMMIT {frame.seq}: cycle "
                                f"{self.engine.volume.info.cycle} was committed already")
        log_ = self._staging
        if log_.records and log_.cycle == frame.seq:
            if log_.committed is None:
                try:
                    log_.commit(frame.taken_us)
                except OSError as err:
                    raise VolumeError(f"cannot commit cycle {frame.seq}: {err}") from err
            self._apply_committed(ack=True)
            return
        self._spill()  # another cycle's, if any (never: a CYCLE_BEGIN spilled it)
        self._record_cycle(frame.seq, frame.taken_us)
        self._ack_cycle(frame.seq)
        self._drop_older_images(frame.seq)

    def _ack_cycle(self, number: int) -> None:
        """CYCLE_ACK ``number``: it is committed here (durably)."""
        self.cycle_in_progress = self._cycle_from = None
        self.out.send_urgent(p.CycleAck(number))
        with contextlib.suppress(NbdMirrorError):  # not held back (corked) for what follows:
            self.out.flush()  # deleting an image, an apply, take longer than the commit

    def _record_cycle(self, number: int, taken_us: int) -> None:
        """The volume holds cycle ``number`` whole (durably): keep it as the consistent
        image, then record it in volume.json."""
        self._hold_image(number)
        try:
            self.engine.volume.update_info(cycle=number, cycle_at=taken_us / 1e6 or None)
        except OSError as err:
            raise VolumeError(f"cannot record cycle {number} as committed: {err}") from err

    def _apply_committed(self, ack: bool = False) -> None:
        """Apply the staging log's committed cycle to the volume, which becomes its image.

        Readers wait meanwhile (``staging.applying``). ``ack``: CYCLE_ACK once that
        lock is held, before the apply: the durable COMMIT record is the commit (a
        crash from here on applies the log again at start-up), and a reader that
        opens after the primary heard of it waits for the image it names. The
        previous image goes first, unless a reader holds it: then the apply copies
        on write into it, as chunks applied directly do. A failure leaves the log
        committed: applied again before anything else lands, or when the receiver
        starts again.
        """
        log_ = self._staging
        done = log_.committed
        assert done is not None
        try:
            with staging.applying(self.engine.volume):
                if ack:
                    self._ack_cycle(done.cycle)
                self._drop_older_images(done.cycle)
                self._land_staged()
                self._record_cycle(done.cycle, done.taken_us)
        except (OSError, NbdMirrorError) as err:
            raise VolumeError(f"cannot apply committed cycle {done.cycle} to the volume: {err}; "
                              "it is applied again when the receiver restarts") from err
        self._counts.cycles_applied += 1
        log_.reset()

    def _spill(self) -> None:
        """Apply what the staging log holds as chunks applied directly are (copied on write
        into the held image), make it durable, and empty the log: for a cycle bigger than
        the log, or before anything else lands on the volume. OSError/NbdMirrorError on
        failure (the log is kept: spilled again later)."""
        log_ = self._staging
        if log_.committed is not None:  # its apply failed: finish it (it is committed)
            self._apply_committed()
            return
        if not log_.records:
            return
        with contextlib.suppress(OSError, NbdMirrorError):  # else each write copies its own
            self.engine.preserve_ahead([(r.offset, r.length) for r in log_.records])
        self._land_staged()
        log_.invalidate()  # never applied again over what lands next
        self._counts.spills += 1

    def _land_staged(self) -> None:
        """Every staged chunk, in log order, to the volume, then its fdatasync: landed
        then, as chunks applied directly are (their whole regions no longer suspect)."""
        try:
            for record, data in self._staging.chunks():
                self.engine.apply_replica(WriteEvent(0, record.kind, record.offset,
                                                     record.length, data,
                                                     may_trim=record.may_trim), mark=False)
            self.engine.flush()
        except BaseException:
            self._volume_dirty = True  # what landed before the failure: the next sync's
            raise
        records = self._staging.records
        if records:
            rows = np.array([(r.offset, r.length) for r in records], dtype=np.int64)
            with self._lock:
                self._landed_extents(rows)

    def _stages(self, entry: _Entry) -> bool:
        """Whether an async chunk goes to the staging log: it belongs to a cycle that
        replaces an image this volume holds, and fits. A chunk that does not fit spills
        the log, and it and the rest of its cycle go to the volume: a big cycle streams
        through copies on write (staging it again 64 MiB at a time would write each
        byte twice more)."""
        cycle, log_ = self.cycle_in_progress, self._staging
        if log_.committed is not None:  # a committed cycle whose apply failed: finish it
            self._apply_committed()
        if cycle is None or self.engine.volume.info.cycle < 1 or cycle == self._unstaged_cycle:
            return False  # the initial pass, cycle 1 (no image to keep), or one that spilled
        if log_.records and log_.cycle != cycle:
            self._spill()  # an earlier, abandoned cycle's chunks
        extents = 0 if entry.extents is None else len(entry.extents)
        if not log_.fits(entry.nbytes, extents):
            self._unstaged_cycle = cycle
            return False
        log_.begin(cycle)
        return True

    def _hold_image(self, number: int) -> None:
        """Keep the replica as it is now (cycle ``number``, whole) as a snapshot: the
        consistent image while the next cycle's data lands (copy on write)."""
        name = snapshots.cycle_name(number)
        if any(s.name == name for s in self.engine.snapshots.chain):
            return  # a commit asked again (its CYCLE_ACK was lost with the link)
        try:
            self.engine.create_snapshot(name, internal=True)
        except (OSError, NbdMirrorError) as err:
            raise VolumeError(f"cannot keep cycle {number} as the consistent image: "
                              f"{err}") from err

    def _drop_older_images(self, number: int) -> None:
        """Older consistent images go, unless a reader still holds one (``serve
        --consistent``): that one goes at a later commit."""
        for snap in list(self.engine.snapshots.chain):
            older = snapshots.cycle_number(snap.name)
            if older is not None and older < number:
                if snapshots.is_served(self.engine.volume.snapshot_dir / snap.name):
                    continue  # held by a reader: not worth delete's wait for its lock
                try:
                    self.engine.delete_snapshot(snap.name, internal=True)
                except (OSError, NbdMirrorError) as err:
                    log.info("consistent image %s kept for now: %s", snap.name, err)

    def _async_only(self, frame: p.Frame) -> None:
        if self.mode != ASYNC:
            raise ProtocolError(f"{p.frame_name(frame)} {frame.seq} in {self.mode} mode")

    _HANDLERS: dict[type, Callable[[Receiver, Any], None]] = {
        p.Write: _on_write, p.WriteV: _on_write_v, p.Trim: _on_trim, p.Zero: _on_zero,
        p.Meta: _on_meta,
        p.Data: _on_data, p.RegionData: _on_region_data, p.Flush: _on_flush,
        p.Ping: _on_ping, p.Pong: _on_pong, p.ResyncBegin: _on_resync_begin,
        p.ResyncEnd: _on_resync_end, p.CycleBegin: _on_cycle_begin,
        p.CycleCommit: _on_cycle_commit,
    }

    # -- entries and their order ---------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """The regions [first, stop) under a byte range."""
        return offset >> self._shift, ((offset + length - 1) >> self._shift) + 1

    def _region_spans(self, entry: _Entry) -> list[tuple[int, int]]:
        """The regions [first, stop) under each range an entry writes (a WRITEV's span
        also covers regions between its ranges, which it does not write)."""
        if entry.extents is None:
            return [(entry.first, entry.stop)]
        return [self._span(offset, length) for offset, length in entry.ranges()]

    def _write_entry(self, seq: int, kind: str, offset: int, length: int, fua: bool,
                     may_trim: bool = False) -> _Entry:
        if length <= 0 or offset < 0 or offset + length > self.engine.size:
            raise ProtocolError(f"write {seq} covers {offset}+{length}, not a range inside "
                                f"the volume ({self.engine.size} bytes)")
        first, stop = self._span(offset, length)
        entry = _Entry((seq, 0, 0), kind, seq, offset, length, first, stop, fua, may_trim)
        entry.link, entry.nbytes = self._link, length
        return entry

    def _admit(self, entry: _Entry) -> None:
        """Register a write: in order, counted unsettled in its regions; apply what can be."""
        with self._lock:
            if entry.seq in self._by_seq:
                raise ProtocolError(f"write {entry.seq} announced twice")
            self._by_seq[entry.seq] = entry
            self._max_seq = max(self._max_seq, entry.seq)
            self._insert(entry)
            with self.tracker.lock:
                self.tracker.begin(entry.first, entry.stop)
        if entry.acked:
            self._kick()
        if entry.data is not None:
            self._throttle()

    def _remove(self, entry: _Entry) -> None:
        """Take an entry out of the order, and its data out of memory (lock held)."""
        order = self._order
        i = bisect.bisect_left(order, entry.key, key=_entry_key)
        while order[i] is not entry:  # keys repeat: a new link's write beside an old one's
            i += 1
        del order[i]
        if entry.data is not None:
            self._waiting_bytes -= entry.nbytes
            entry.data = None
        self._unindex(entry)

    def _unindex(self, entry: _Entry) -> None:
        """Forget the entry's write number (not another entry's: a restarted primary
        numbers from 1 again while an apply of the last link may still run)."""
        if self._by_seq.get(entry.seq) is entry:
            del self._by_seq[entry.seq]

    def _insert(self, entry: _Entry) -> None:
        bisect.insort(self._order, entry, key=_entry_key)
        if entry.data is not None:
            self._waiting_bytes += entry.nbytes
        if entry.ready and entry.acked:
            self._applicable += 1

    def _next_applicable(self) -> _Entry | None:
        """The lowest entry with its data whose regions no lower unapplied entry shares.

        One walk up the order, stopping once every applicable entry was looked
        at; ``_Held`` keeps the overlap test cheap when thousands of entries
        wait (see there).
        """
        left = self._applicable
        held = _Held()
        spans = held.spans
        for entry in self._order:
            if not left:
                break
            if entry.ready and entry.acked and not entry.applying:
                if not held.overlaps(entry.first, entry.stop):
                    return entry
                left -= 1
            spans.append((entry.first, entry.stop))
        return None

    def _kick(self) -> None:
        """Something may have become applicable: apply it here, or wake the applier."""
        if self._wake is None:
            self.drain()
        else:
            self._wake()

    def _throttle(self) -> None:
        """With an applier, hold the frame reader while too much data waits to be applied.

        Only while the applier is busy: data waiting for an earlier write's data
        (still to be read by this very thread) must not stop the reading.
        """
        if self._wake is None:
            return
        out = self.out
        with self._lock:
            while (self._waiting_bytes > self.max_waiting and self._draining
                   and not getattr(out, "closed", False)):
                self._progress.wait(0.1)

    def drain(self) -> None:
        """Apply every entry that has become applicable, one at a time, in this thread.

        The acknowledgements go out together: before each long write (so they
        need not wait for it) and at the end; those that wait for a sync
        (``_DurableAck``) all at the end, after one.
        """
        frames: list[Answer] = []
        durable: list[Answer] = []
        try:
            while True:
                with self._lock:
                    entry = self._next_applicable()
                    if entry is None:
                        return
                    entry.applying = True
                    self._draining = True
                    self._applicable -= 1
                    # Landed from now on, for a failed fdatasync (fsyncgate): one that
                    # fails once this write may be in the page cache must recover it.
                    # _finish notes it again, so only a sync after that clears it.
                    if entry.extents is None:
                        self._landed.note(entry.first, entry.stop)
                    else:
                        self._landed.note_regions(self._under(entry.extents))
                ok = False
                try:
                    if entry.nbytes >= FLUSH_BEFORE:  # earlier acks need not wait for it
                        self._send(frames)
                        frames = []
                        with contextlib.suppress(NbdMirrorError):
                            self.out.flush()  # what the link holds back for this thread
                    ok = self._apply(entry)
                finally:
                    with self._lock:
                        answer = self._finish(entry, ok)
                        if entry.kind != _RECOVER and entry.link != self._link:
                            # Its link is gone (the write stays marked, suspect): a new
                            # primary numbers from 1 again, so an answer would be taken
                            # for another write's. Recovery requests still go out.
                            answer = [f for f in answer if isinstance(f, p.ReadRegion)]
                        for frame in answer:
                            (durable if isinstance(frame, _DurableAck) else frames).append(frame)
                        self._draining = False
                        self._progress.notify_all()
        finally:
            self._send(frames + durable)

    def _preserve_ahead(self, entry: _Entry) -> None:
        """Before an async chunk lands: the copies on write into the held consistent image
        for it and the chunks already here behind it (up to ``PRESERVE_AHEAD`` bytes), in
        one commit (one store and map sync for the lot instead of one per chunk); the
        chunks of that batch then land without copying. Copying early is always right: a
        region not yet copied still holds the image's bytes. A failure here is left to
        each write's own copy, which reports it."""
        if entry.ahead:
            return
        spans = entry.ranges()
        with self._lock:
            entry.ahead = True
            room = PRESERVE_AHEAD - entry.nbytes
            for e in self._order:
                if room <= 0:
                    break
                if e.ready and not e.applying and not e.ahead and self._is_chunk(e):
                    e.ahead = True
                    spans += e.ranges()
                    room -= e.nbytes
        try:
            self.engine.preserve_ahead(spans)
        except (OSError, NbdMirrorError) as err:
            log.debug("copying ahead for the held image failed: %s", err)

    def _apply(self, entry: _Entry) -> bool:
        """Apply one entry to the replica; False (logged) when the disk refused it."""
        kind = WRITE if entry.kind == _RECOVER else entry.kind
        data = memoryview(entry.data) if entry.data is not None else None
        chunk = self._is_chunk(entry)
        try:
            if self.faults is not None:
                for first, stop in self._region_spans(entry):
                    self.faults.check(first, stop)
            if chunk and self._stages(entry):
                try:
                    if entry.extents is not None:
                        assert data is not None
                        entry.staged = self._staging.append_extents(entry.extents, data)
                    else:
                        entry.staged = self._staging.append(kind, entry.offset, entry.length,
                                                            data, entry.may_trim)
                except OSError:
                    self._unstaged_cycle = self.cycle_in_progress  # its resend lands directly
                    raise
            else:
                self._spill()  # staged chunks land first
                if chunk:
                    self._preserve_ahead(entry)
                # Dirty before (a sync meanwhile must fdatasync: fsyncgate, see drain) and
                # after (a sync that took the flag while this write ran does not cover it).
                self._volume_dirty = True
                try:
                    at = 0
                    for offset, length in entry.ranges():
                        part = None if data is None else data[at:at + length]
                        at += length if data is not None else 0
                        self.engine.apply_replica(
                            WriteEvent(entry.seq, kind, offset, length, part,
                                       entry.fua and not chunk, entry.may_trim),
                            mark=not chunk)
                finally:
                    self._volume_dirty = True
        except (OSError, NbdMirrorError) as err:
            what = "recovery of" if entry.kind == _RECOVER else f"{entry.kind} {entry.seq} to"
            log.warning("%s %d+%d failed on the secondary's disk: %s", what, entry.offset,
                        entry.length, err)
            self._keep_marked(entry)
            return False
        return True

    def _is_chunk(self, entry: _Entry) -> bool:
        """An async cycle's chunk: applied without a sync of its own and acknowledged
        with its batch (``_DurableAck``), and not marked: the primary sends it again
        until its ack says it is on disk."""
        return entry.fua and self.mode == ASYNC and entry.kind != _RECOVER

    def _keep_marked(self, entry: _Entry) -> None:
        """A failed apply may have failed before its mark was durable: make sure it is."""
        try:
            for offset, length in entry.ranges():
                self.tracker.mark(offset, length)
        except OSError as err:  # still counted unsettled: at least never cleared in this run
            log.error("cannot mark regions %d..%d of a failed write durably: %s", entry.first,
                      entry.stop - 1, err)

    def _finish(self, entry: _Entry, ok: bool) -> list[Answer]:
        """Take an applied (or failed) entry out of the order; what to send (lock held)."""
        self._remove(entry)
        if entry.kind == _RECOVER:
            return self._recovery_done(entry, ok)
        if ok:
            self._counts.writes_applied += 1
            self._counts.bytes_applied += entry.nbytes
            if entry.staged < 0:  # (a staged chunk: whole on the volume once applied)
                if entry.extents is None:
                    self._landed_whole(entry.offset, entry.length)
                else:
                    self._landed_extents(entry.extents)
            answer: list[Answer] = [
                _DurableAck(entry.seq, entry.offset, entry.length, entry.staged)
                if self._is_chunk(entry) else p.DataAck(entry.seq)]
        else:
            self._counts.write_failures += 1
            answer = [p.WriteFailed(entry.seq, entry.offset, entry.length)]
            if self.mode != ASYNC:  # async: the primary sends the chunk again
                answer += self._start_recovery(entry.first, entry.stop)  # before end()
        self.tracker.end(entry.first, entry.stop)
        return answer

    def _landed_whole(self, offset: int, length: int) -> None:
        """Note regions applied; those covered whole are no longer of unknown content."""
        self._landed.note(*self._span(offset, length))
        rs = self._rs
        whole_first = -(-offset // rs)
        end = offset + length
        whole_stop = self._regions if end == self.engine.size else end // rs
        if whole_stop > whole_first:
            self._suspect[whole_first:whole_stop] = False

    def _under(self, rows: np.ndarray) -> np.ndarray:
        """The regions under (offset, length) ``rows`` (any order), as indexes."""
        offsets = rows[:, 0].astype(np.int64)
        ends = offsets + rows[:, 1].astype(np.int64)
        return run_regions(np.stack((offsets >> self._shift,
                                     ((ends - 1) >> self._shift) + 1), axis=1))

    def _landed_extents(self, rows: np.ndarray) -> None:
        """``_landed_whole`` of every (offset, length) of ``rows`` (any order) at once:
        array work, not a step per range (a WRITEV frame's or a staged cycle's)."""
        self._landed.note_regions(self._under(rows))
        offsets = rows[:, 0].astype(np.int64)
        ends = offsets + rows[:, 1].astype(np.int64)
        whole = np.stack((-(-offsets // self._rs),
                          np.where(ends == self.engine.size, self._regions, ends // self._rs)),
                         axis=1)
        whole = whole[whole[:, 1] > whole[:, 0]]
        if whole.size:
            self._suspect[run_regions(whole)] = False

    def _send(self, frames: Iterable[Answer]) -> None:
        """Send answers; on a link that broke meanwhile they are lost, as the link is
        (link_lost() keeps what they concerned marked)."""
        frames = list(frames)
        durable: bool | None = None
        if any(isinstance(f, _DurableAck) for f in frames):
            durable = self._sync_landed()  # one fdatasync for all of them, outside the lock
        for frame in frames:
            if isinstance(frame, _FlushDue):  # its fdatasync here, outside the lock
                frame = p.FlushAck(frame.seq, failed=not self._sync_landed())
            elif isinstance(frame, _DurableAck):
                kept = frame.generation < 0 or frame.generation == self._staging.generation
                frame = (p.DataAck(frame.seq) if durable and kept
                         else p.WriteFailed(frame.seq, frame.offset, frame.length))
            try:
                self.out.send_urgent(frame)
            except NbdMirrorError as err:
                log.info("answer %s lost with the link: %s", p.frame_name(frame), err)

    # -- recovery ------------------------------------------------------------
    def _start_recovery(self, first: int, stop: int) -> list[p.Frame]:
        """Regions [first, stop) become recovering, asked for at once (lock held)."""
        per = max(1, p.MAX_DATA // self._rs)
        frames: list[p.Frame] = []
        for a in range(first, stop, per):
            b = min(stop, a + per)
            offset, length = self.engine.volume.geometry.byte_range(a, b)
            rec = _Recovery(a, b, offset, length)
            self._recoveries.append(rec)
            with self.tracker.lock:
                self.tracker.begin(a, b)  # unsettled until whole: no sweep clears it
            frames.append(self._request(rec))
        return frames

    def _request(self, rec: _Recovery) -> p.ReadRegion:
        """Ask for a recovering range; its answer goes after every write known now."""
        self._next_request += 1
        rid = REQUEST_ID_BASE | self._next_request
        entry = _Entry((self._max_seq, 1, rid), _RECOVER, rid, rec.offset, rec.length,
                       rec.first, rec.stop, recovery=rec, sent_at=self.clock(),
                       nbytes=rec.length)
        rec.request, rec.due = entry, None
        rec.attempts += 1
        self._counts.recovery_attempts += 1
        self._requests[rid] = entry
        self._insert(entry)
        return p.ReadRegion(rid, rec.offset, rec.length)

    def _recovery_done(self, entry: _Entry, ok: bool) -> list[Answer]:
        rec = entry.recovery
        assert rec is not None
        rec.request = None
        if ok:
            self._recoveries.remove(rec)
            self._counts.regions_recovered += rec.stop - rec.first
            self._landed_whole(entry.offset, entry.length)
            self.tracker.end(rec.first, rec.stop)
            log.info("regions %d..%d recovered from the primary", rec.first, rec.stop - 1)
            # Tell the primary (DATA_ACK of the request id): the regions match again there.
            return [p.DataAck(entry.seq), *self._flushes_due(rec)]
        rec.due = self.clock() + self._backoff(rec.attempts)
        return []

    def _flushes_due(self, landed: _Recovery) -> list[_FlushDue]:
        """Held flushes that waited for ``landed`` and for nothing else now (lock held)."""
        for held in self._held_flushes:
            held.recoveries.discard(landed)
        due = [_FlushDue(h.seq) for h in self._held_flushes if not h.recoveries]
        if due:
            self._held_flushes = [h for h in self._held_flushes if h.recoveries]
        return due

    def _backoff(self, attempts: int) -> float:
        return min(self.retry_max, self.retry_base * 2 ** max(0, attempts - 1))

    def tick(self, now: float | None = None) -> float | None:
        """Ask again for recoveries that are due, and give up on unanswered requests.

        For the link's timer thread. Returns when the next retry is due, or None.
        """
        now = self.clock() if now is None else now
        frames: list[p.Frame] = []
        with self._lock:
            for rec in self._recoveries:
                req = rec.request
                if req is not None and not req.applying and (
                        now - req.sent_at >= self.answer_timeout):
                    self._abandon(req)
                    rec.due = now
                if rec.request is None and rec.due is not None and rec.due <= now:
                    frames.append(self._request(rec))
            next_due = min((r.due for r in self._recoveries if r.due is not None), default=None)
        self._send(frames)
        self._kick()  # an abandoned request may have held later writes
        return next_due

    def _abandon(self, req: _Entry) -> None:
        """Give up on an unanswered (or unapplied) request (lock held)."""
        self._remove(req)
        if req.ready:
            self._applicable -= 1
        if self._requests.pop(req.seq, None) is not None:
            self._abandoned.add(req.seq)
        assert req.recovery is not None
        req.recovery.request = None

    # -- the link ------------------------------------------------------------
    def link_lost(self) -> None:
        """The connection is gone: writes whose data never came stay marked, and suspect.

        Call once no ``handle`` is running. Recoveries are asked for again by the
        next ``tick`` (over the next connection).
        """
        now = self.clock()
        with self._lock:
            self._link += 1
            for entry in list(self._order):
                if entry.applying:  # finished by drain(); its answer is dropped there
                    self._unindex(entry)
                    for first, stop in self._region_spans(entry):
                        self._suspect[first:stop] = True
                    continue
                if entry.kind == _RECOVER:
                    self._abandon(entry)
                    assert entry.recovery is not None
                    entry.recovery.due = now
                    continue
                self._remove(entry)
                for first, stop in self._region_spans(entry):  # before end(): kept marked
                    self._suspect[first:stop] = True
                self.tracker.end(entry.first, entry.stop)
            self._applicable = 0
            # (abandoned request ids are kept: a late answer may still come, ids never repeat)
            self._progress.notify_all()
            self._held_flushes.clear()  # their answers would go to a link that is gone
            self._max_seq = 0  # a restarted primary numbers from 1 again

    def close(self) -> None:
        """Forget the link and clear what is settled (the engine stays open: the caller's)."""
        self.link_lost()
        try:
            self.sweep()
        except OSError as err:
            log.warning("final sweep failed: %s", err)
        self._staging.close()

    # -- clearing ------------------------------------------------------------
    def _sync_landed(self) -> bool:
        """fdatasync the data applied so far; on failure recover it (fsyncgate). -> ok

        One at a time (a FLUSH on the reader, a held flush on the applier, the
        sweep on the timer): Linux reports a failed writeback to one fdatasync
        only, so a second one running beside it could succeed and call synced
        data whose pages the failure dropped.
        """
        with self._sync_lock:
            with self._lock:
                span, taken = self._landed.take()
            try:
                with self._lock:
                    dirty, self._volume_dirty = self._volume_dirty, False
                if dirty:
                    self.engine.flush()
            except OSError as err:
                # Linux drops the dirty pages of a failed sync: whatever was applied
                # before it reported may be lost, also what landed while it ran.
                log.warning("fdatasync of the replica failed: %s; recovering what it held",
                            err)
                with self._lock:
                    self._counts.flush_failures += 1
                    lost = np.zeros(self._regions, dtype=bool)
                    lost[span] = taken
                    since, more = self._landed.take()  # landed while it ran
                    lost[since] |= more
                    frames = self._recover_map(lost)
                self._send(frames)
                return False
            try:
                self._staging.sync()
            except OSError as err:  # the log forgot what it held unsynced: nothing to recover
                log.warning("fdatasync of the staging log failed: %s; its latest chunks are "
                            "answered WRITE_FAILED (the primary sends them again)", err)
                with self._lock:
                    self._counts.flush_failures += 1
                return False
            with self._lock:
                self._synced[span] |= taken
            return True

    def _recover_map(self, regions: np.ndarray) -> list[p.Frame]:
        """Start recovering every run of set regions (lock held)."""
        frames: list[p.Frame] = []
        for start, count in native.scan_runs(regions.astype(np.uint8)).tolist():
            frames += self._start_recovery(start, start + count)
        return frames

    def sweep(self) -> int:
        """Clear the marks of regions whose data has landed durably and that have no
        unapplied, recovering or lost write; return how many were cleared.

        One fdatasync of the data file, then one pass over the map with the
        receiver's lock held (so no write can land unsynced between the choice
        and the clearing).
        """
        with self._sweep_lock:
            if not self._sync_landed():
                return 0
            with self._lock:
                chosen = self._synced & ~self._landed.map & ~self._suspect
                self._synced = np.zeros(self._regions, dtype=bool)
                return self.tracker.clear(chosen)

    # -- state ---------------------------------------------------------------
    def marked_runs(self) -> np.ndarray:
        """For a primary connecting (the handshake's MARKED_RUNS): every region whose data
        may be missing here, as (first region, count) rows.

        One sweep first, so that regions whose data is durable by now are not
        resent; the marks are a superset of what may be missing either way.
        """
        try:
            self.sweep()
        except (OSError, NbdMirrorError) as err:  # the marks are a superset either way
            log.warning("sweep before the handshake failed: %s", err)
        return self.tracker.runs()

    def missing_runs(self) -> list[tuple[int, int]]:
        """Regions whose data may be missing, as (first region, count): the marks."""
        return [(int(a), int(n)) for a, n in self.tracker.runs().tolist()]

    def status(self) -> dict[str, Any]:
        """What the secondary's status shows of replication (field names are the README's)."""
        with self._lock:
            pending = [(e.first, e.stop) for e in self._order if e.kind != _RECOVER]
            recovering = [(r.first, r.stop) for r in self._recoveries]
            waiting = sum(1 for e in self._order if e.kind != _RECOVER and e.ready
                          and not e.applying)
            counts = dataclasses.asdict(self._counts)
            suspect = int(np.count_nonzero(self._suspect))
            last = self._last_frame
            arriving = self._cycle_from
        info = self.engine.volume.info
        cycle, cycle_at = info.cycle, info.cycle_at
        staged = self._staging.committed  # committed (and acknowledged), being applied
        if staged is not None and staged.cycle > cycle:
            cycle, cycle_at = staged.cycle, staged.taken_us / 1e6 or None
        received = per_second = None
        if arriving is not None:
            received = counts["bytes_applied"] - arriving[1]
            per_second = rate(received, self.clock() - arriving[0])
        return {
            "mode": self.mode,
            "pending_regions": _union_count(pending),
            "pending_writes": len(pending),
            "waiting_writes": waiting,
            "recovering_regions": _union_count(recovering),
            "suspect_regions": suspect,
            "marked_regions": self.tracker.count(),
            **counts,
            "last_frame_age": None if last is None else round(self.clock() - last, 3),
            "committed_cycle": cycle,
            "last_consistent_at": cycle_at,
            "lag_s": None if cycle_at is None else round(time.time() - cycle_at, 3),
            "cycle_applying": None if staged is None else staged.cycle,
            "cycle_in_progress": self.cycle_in_progress,
            "cycle_bytes_staged": self._staging.staged_bytes,
            "cycle_bytes_received": received,
            "cycle_rate_bps": per_second,
        }


def _union_count(spans: list[tuple[int, int]]) -> int:
    """How many regions a list of [first, stop) spans covers together."""
    total, reach = 0, -1
    for first, stop in sorted(spans):
        first = max(first, reach)
        if stop > first:
            total += stop - first
            reach = stop
    return total
