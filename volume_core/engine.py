"""What a served volume is: the data file, its region tracker, and the write path.

Every write-like request (pwrite, trim, zero) goes through one path:

    check range -> gate -> mark regions (durable) -> pre-write hooks -> apply

Snapshots hook in before the data lands (copy-on-write). A replicator, when
one is attached, gets every request as a numbered ``WriteEvent`` (see
write_events.py): submitted before the local write, settled after it, with
overlapping writes applied one at a time so both sides see one order. Reads
only count themselves.

Writes pass a gate: ``quiesce()`` closes it and waits for the writes in
flight, so a snapshot is atomic with respect to writes: every write
acknowledged before it is in it, none acknowledged after it. The gate is
counted: several holders (a mirror cycle, a user's snapshot) may close it at
once and it reopens when the last lets go; waiting for the writes in flight
is bounded, so one stuck write cannot hold every other write at the gate.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import native
from .blockio import pread_full, pwrite_full
from .errors import (
    NbdMirrorError,
    QuiesceTimeout,
    RangeError,
    ReadOnlyError,
    SnapshotError,
    UsageError,
    VolumeCorrupt,
    VolumeError,
)
from .regions import RegionTracker
from .snapshots import SnapshotChain, cycle_number
from .volume import Volume
from .write_events import FLUSH, TRIM, WRITE, ZERO, RegionLocks, Replicator, WriteEvent

#: extent types, as NBD (and nbdkit.EXTENT_*) number them
EXTENT_DATA = 0
EXTENT_HOLE = 1
EXTENT_ZERO = 2

_ZERO_CHUNK = bytes(1 << 20)
_MAX_EXTENTS = 1024
log = logging.getLogger(__name__)

#: how long quiesce() waits for the writes in flight before it gives up
QUIESCE_TIMEOUT = 30.0

#: (offset, length) -> None, called after marking and before the data lands
PreWriteHook = Callable[[int, int], None]


class Stats:
    """Request counters of an engine (one lock; a few hundred ns per request)."""

    FIELDS = ("reads", "writes", "trims", "zeroes", "flushes", "bytes_read", "bytes_written",
              "bytes_trimmed", "bytes_zeroed")

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self._lock = lock or threading.Lock()
        for name in self.FIELDS:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {name: getattr(self, name) for name in self.FIELDS}


class Engine:
    """A volume opened for serving: exclusive, with marks tracked on every write."""

    def __init__(self, volume: Volume, *, readonly: bool = False, durable_marks: bool = True,
                 replica: bool = False):
        """Open ``volume`` for serving (locked). ``replica``: it takes writes from its
        primary only (apply_replica); host writes are refused."""
        if volume.info.role == "secondary" and not (readonly or replica):
            raise VolumeError(f"{volume.path} is a secondary: it takes writes from its primary "
                              "only; serve it read-only, or promote it first")
        self.volume = volume
        self.size = volume.size
        self.readonly = readonly or replica
        self.replica = replica
        with contextlib.ExitStack() as undo:  # on failure, let go of what was taken
            volume.lock()
            undo.callback(volume.unlock)
            try:
                self.fd = os.open(volume.data_path, (os.O_RDONLY if readonly else os.O_RDWR)
                                  | os.O_CLOEXEC)
                undo.callback(os.close, self.fd)
                self.tracker = RegionTracker(volume.marks_path, volume.regions,
                                             volume.region_size, durable=durable_marks)
                undo.callback(self.tracker.close)
                self.snapshots = SnapshotChain(volume, self.fd)
            except VolumeCorrupt:
                raise  # already names the damaged file
            except (OSError, ValueError, NbdMirrorError) as err:
                raise VolumeError(f"cannot open {volume.path}: {err}") from None
            undo.pop_all()
        # One lock for the write gate, the stats and the tracker's fast path, so a write
        # takes it once to enter and once to leave.
        self._lock = self.tracker.lock
        self.stats = Stats(self._lock)
        self.pre_write: list[PreWriteHook] = []
        self.replicator: Replicator | None = None
        self._seq = 0  # numbers every write and flush while replicating
        self._region_locks: RegionLocks | None = None
        # The write gate: closed while _gate_holders > 0; _drained is signalled when the
        # last write in flight leaves a closed gate, _reopened when the gate opens again.
        self._gate_holders = 0
        self._inflight = 0
        self._drained = threading.Condition(self._lock)
        self._reopened = threading.Condition(self._lock)
        self._admin_lock = threading.Lock()  # one snapshot create/delete at a time
        if self.snapshots.chain:  # no snapshot, no hook: nothing on the hot path
            self.pre_write.append(self.snapshots.preserve)
        self.started = time.time()
        log.info("opened %s: %d bytes, %d regions, %d marked, %d snapshot(s)%s", volume.path,
                 self.size, volume.regions, self.tracker.count(), len(self.snapshots.chain),
                 " (read-only)" if readonly else "")
        self._closed = False

    # -- checks ------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RangeError(f"request of {length} bytes at offset {offset} reaches past the end "
                             f"of the volume ({self.size} bytes)")

    def _refuse(self, offset: int, length: int) -> None:
        if self.readonly:
            raise ReadOnlyError("the volume is open read-only")
        self._check(offset, length)

    def _enter(self) -> None:
        """Pass the write gate (waiting while it is closed)."""
        with self._lock:
            while self._gate_holders:
                self._reopened.wait()
            self._inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._gate_holders and not self._inflight:
                self._drained.notify_all()

    def _write_op(self, kind: str, offset: int, length: int, apply: Callable[[], None],
                  fua: bool, may_trim: bool = False) -> None:
        """The write path for trim and zero (pwrite has an inlined copy of it)."""
        if offset < 0 or length < 0 or offset + length > self.size or self.readonly:
            self._refuse(offset, length)
        if self.replicator is not None:
            self._replicated(WriteEvent(0, kind, offset, length, None, fua, may_trim), apply)
            return
        self._apply_locally(offset, length, apply, fua)

    def _apply_locally(self, offset: int, length: int, apply: Callable[[], None],
                       fua: bool, mark: bool = True) -> None:
        self._enter()
        try:
            if mark:
                self.tracker.mark(offset, length)
            for hook in self.pre_write:
                hook(offset, length)
            apply()
            if fua:
                os.fdatasync(self.fd)
        finally:
            self._leave()

    # -- replication ---------------------------------------------------------
    def check_replicable(self) -> None:
        """Refuse replication (any mode) of what cannot keep its promises."""
        if not self.tracker.durable:
            raise UsageError("replication needs durable marks: durable-marks=0 is for "
                             "benchmarks only")
        if self.readonly:
            raise ReadOnlyError(f"{self.volume.path} is open read-only: nothing to replicate")

    def attach_replicator(self, replicator: Replicator) -> None:
        """Hand every write from now on to ``replicator`` (writes quiesced meanwhile)."""
        self.check_replicable()
        self.tracker.track_pending()
        with self.quiesce():
            if self._region_locks is None:
                self._region_locks = RegionLocks(self.volume.regions, self._lock)
            self.replicator = replicator

    def detach_replicator(self) -> None:
        with self.quiesce():
            self.replicator = None

    def _replicated(self, event: WriteEvent, apply: Callable[[], None]) -> None:
        """The write path with a replicator: numbered, ordered, submitted, applied, settled."""
        first, stop = self.volume.geometry.span_at_least_one(event.offset, event.length)
        regions = self._region_locks
        tracker = self.tracker
        with self._lock:
            while self._gate_holders or regions.busy(first, stop):
                if self._gate_holders:
                    self._reopened.wait()
                else:
                    regions.wait()
            rep = self.replicator  # re-read: a detach may have happened while we waited
            self._inflight += 1
            regions.take(first, stop)
            durable = event.length == 0 or tracker.try_mark(event.offset, event.length)
            tracker.begin(first, stop)
            self._seq += 1
            event = WriteEvent(self._seq, event.kind, event.offset, event.length, event.data,
                               event.fua, event.may_trim)
        ticket = submitted = landed = None
        try:
            try:
                if not durable:
                    tracker.mark(event.offset, event.length)
                for hook in self.pre_write:
                    hook(event.offset, event.length)
                if rep is not None:
                    ticket, submitted = rep.submit(event), True
                apply()
                if event.fua:
                    os.fdatasync(self.fd)
                landed = True
            finally:
                with self._lock:
                    regions.let_go(first, stop)
            if submitted:
                rep.settle(ticket, True)
        except BaseException:
            if submitted and not landed:  # sent, but not applied here: keep it out of sync
                rep.settle(ticket, False)
            raise
        finally:
            tracker.end(first, stop)
            self._leave()

    def read_ordered(self, offset: int, length: int,
                     send: Callable[[int, bytearray], None]) -> None:
        """Read a range and hand it, numbered, to ``send(seq, data)``, with no replicated
        write to it in between.

        For a resync or a recovering secondary: holding the range's regions (as a
        write does) orders the read with the host's writes, so what ``send``
        queues goes out after the frames of every write the read saw, and before
        those of every write it did not; ``seq`` (from the writes' counter) tells
        the secondary where it stands among them.
        """
        self._check(offset, length)
        first, stop = self.volume.geometry.span_at_least_one(offset, length)
        regions = self._region_locks
        with self._lock:
            if regions is not None:
                while regions.busy(first, stop):
                    regions.wait()
                regions.take(first, stop)
            self._seq += 1
            seq = self._seq
        try:
            buf = bytearray(length)
            pread_full(self.fd, buf, offset)
            send(seq, buf)
        finally:
            if regions is not None:
                with self._lock:
                    regions.let_go(first, stop)

    def preserve_ahead(self, spans: list[tuple[int, int]]) -> None:
        """Copy on write now, in one group commit, for writes about to land in ``spans``
        ((offset, length) each): a single writer landing many writes (a secondary's
        applier) then pays one store and map sync for all, not one per write."""
        self._enter()
        try:
            if self.snapshots.preserve in self.pre_write:
                self.snapshots.preserve_ahead(spans)
        finally:
            self._leave()

    def apply_replica(self, event: WriteEvent, mark: bool = True) -> None:
        """Apply a write received from the primary (a replica engine only).

        The same path as a host's write, less the replicator: marked, copied on
        write into the newest snapshot, then applied. ``mark=False``: not marked
        (an async cycle's chunk: the primary sends it again until its ack says it
        is on disk, so a mark would say nothing the primary does not know).
        """
        if not self.replica:
            raise ReadOnlyError(f"{self.volume.path} is not open as a replica")
        self._check(event.offset, event.length)
        if event.kind == WRITE:
            data = event.data

            def apply() -> None:
                pwrite_full(self.fd, data, event.offset)
        elif event.kind == TRIM or (event.kind == ZERO and event.may_trim):
            def apply() -> None:
                self._discard(event.offset, event.length)
        elif event.kind == ZERO:
            def apply() -> None:
                self._write_zeros(event.offset, event.length)
        else:
            raise UsageError(f"cannot apply a {event.kind!r} request to a replica")
        if event.length:
            self._apply_locally(event.offset, event.length, apply, event.fua, mark)

    @contextlib.contextmanager
    def quiesce(self, timeout: float | None = None) -> Iterator[None]:
        """Hold new writes at the gate and wait (``timeout`` s at most) for those in flight.

        Re-entrant and counted: the gate reopens when the last holder leaves. Raises
        QuiesceTimeout, with the gate reopened if no one else holds it, when the
        writes in flight do not finish in time.
        """
        timeout = QUIESCE_TIMEOUT if timeout is None else timeout
        with self._lock:
            self._gate_holders += 1
            drained = self._drained.wait_for(lambda: not self._inflight, timeout)
            if not drained:
                stuck = self._inflight
                self._release_gate()
        if not drained:
            log.warning("%d write(s) in flight did not finish within %gs; gate reopened",
                        stuck, timeout)
            raise QuiesceTimeout(f"{stuck} write(s) in flight did not finish within "
                                 f"{timeout:g}s; try again")
        try:
            yield
        finally:
            with self._lock:
                self._release_gate()

    def _release_gate(self) -> None:
        """Let go of one hold of the gate (lock held); the last one reopens it."""
        self._gate_holders -= 1
        if not self._gate_holders:
            self._reopened.notify_all()

    # -- requests ----------------------------------------------------------
    def pread(self, buf, offset: int) -> None:
        """Fill ``buf`` (a writable buffer) with the bytes at ``offset``."""
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            self._check(offset, length)
        pread_full(self.fd, buf, offset)
        st = self.stats
        with self._lock:
            st.reads += 1
            st.bytes_read += length

    def pwrite(self, buf, offset: int, fua: bool = False) -> None:
        # The hot path: _write_op() inlined, one lock to enter and one to leave.
        length = len(buf)
        if offset < 0 or offset + length > self.size or self.readonly:
            self._refuse(offset, length)
        if self.replicator is not None:
            self._replicated(WriteEvent(0, WRITE, offset, length, memoryview(buf).toreadonly(),
                                        fua), lambda: pwrite_full(self.fd, buf, offset))
            with self._lock:
                self.stats.writes += 1
                self.stats.bytes_written += length
            return
        lock = self._lock
        with lock:
            closed = self._gate_holders
            if not closed:
                self._inflight += 1
                durable = self.tracker.try_mark(offset, length)
        if closed:
            self._enter()
            durable = False
        done = 0
        try:
            if not durable:
                self.tracker.mark(offset, length)
            if self.pre_write:
                for hook in self.pre_write:
                    hook(offset, length)
            pwrite_full(self.fd, buf, offset)
            if fua:
                os.fdatasync(self.fd)
            done = length
        finally:
            st = self.stats
            with lock:
                self._inflight -= 1
                if self._gate_holders and not self._inflight:
                    self._drained.notify_all()
                if done == length:  # count what was written, not what failed
                    st.writes += 1
                    st.bytes_written += length

    def trim(self, length: int, offset: int, fua: bool = False) -> None:
        """Discard a range; it reads back as zeros (a hole where the filesystem allows)."""
        self._write_op(TRIM, offset, length, lambda: self._discard(offset, length), fua)
        with self._lock:
            self.stats.trims += 1
            self.stats.bytes_trimmed += length

    def zero(self, length: int, offset: int, may_trim: bool = True, fua: bool = False) -> None:
        """Make a range read back as zeros; punch a hole when ``may_trim`` allows it."""
        apply = self._discard if may_trim else self._write_zeros
        self._write_op(ZERO, offset, length, lambda: apply(offset, length), fua, may_trim)
        with self._lock:
            self.stats.zeroes += 1
            self.stats.bytes_zeroed += length

    def _discard(self, offset: int, length: int) -> None:
        try:
            native.punch_hole(self.fd, offset, length)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            pwrite_full(self.fd, memoryview(_ZERO_CHUNK)[:n], offset)
            offset += n

    def flush(self) -> None:
        """Make every completed write durable (marks already are); with a replicator in
        sync mode, on the peer too."""
        os.fdatasync(self.fd)
        rep = self.replicator
        with self._lock:
            self.stats.flushes += 1
            if rep is not None:
                self._seq += 1
                event = WriteEvent(self._seq, FLUSH, 0, 0)
        if rep is not None:
            rep.flush(event)

    def extents(self, length: int, offset: int) -> list[tuple[int, int, int]]:
        """Allocated data and holes in ``[offset, offset+length)`` as (offset, length, type)."""
        self._check(offset, length)
        end = offset + length
        out: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end and len(out) < _MAX_EXTENTS:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
                data = self.size
            if data > pos:
                stop = min(data, end)
                out.append((pos, stop - pos, EXTENT_HOLE | EXTENT_ZERO))
            else:
                stop = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
                out.append((pos, stop - pos, EXTENT_DATA))
            pos = stop
        return out

    # -- snapshots -----------------------------------------------------------
    def create_snapshot(self, name: str | None = None, internal: bool = False
                        ) -> dict[str, Any]:
        """Take a snapshot atomically with respect to writes; no data is copied.
        ``internal``: one of nbdmirror's own (an async secondary's consistent image)."""
        with self._admin_lock, self.quiesce():
            # Hook first: if create fails half-way, copy-on-write is on anyway (it
            # returns at once while the chain is empty).
            if self.snapshots.preserve not in self.pre_write:
                self.pre_write.append(self.snapshots.preserve)
            snap = self.snapshots.create(name, internal)
        log.info("snapshot %s created (seq %d)", snap.name, snap.seq)
        return {"name": snap.name, "seq": snap.seq, "created": snap.created}

    def delete_snapshot(self, name: str, internal: bool = False) -> None:
        """Delete a snapshot; writes pause only for the last step of deleting the newest.
        An async secondary's consistent image goes only ``internal``ly (a newer one came)."""
        if not internal and cycle_number(name) is not None:
            raise SnapshotError(f"snapshot {name!r} is the consistent image of async "
                                "mirroring: it is replaced by the next cycle, not deleted")
        with self._admin_lock:
            self.snapshots.delete(name, quiesce=self.quiesce)
            log.info("snapshot %s deleted", name)
            if not self.snapshots.chain and self.snapshots.preserve in self.pre_write:
                with self.quiesce():
                    self.pre_write.remove(self.snapshots.preserve)

    def list_snapshots(self) -> list[dict[str, Any]]:
        with self._admin_lock:
            return self.snapshots.describe()

    # -- state -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        info = self.volume.info
        return {
            "volume": str(self.volume.path.absolute()),
            "uuid": info.uuid,
            "generation": info.generation,
            "role": info.role,
            "size": info.size,
            "region_size": info.region_size,
            "regions": info.regions,
            "marked_regions": self.tracker.count(),
            "readonly": self.readonly,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "native": native.IMPLEMENTATION,
            "snapshots": len(self.snapshots.chain),
            "cow_regions_copied": self.snapshots.copies,
            "stats": self.stats.snapshot(),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.readonly or self.replica:
                os.fdatasync(self.fd)
        finally:
            self.snapshots.close()
            os.close(self.fd)
            try:
                self.tracker.close()
            finally:
                self.volume.unlock()
