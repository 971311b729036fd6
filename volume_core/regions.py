"""Region maps and the write-intent tracker.

A volume is cut into fixed-size regions; a *map* holds one byte per region
(0 clear, 1 marked). The tracker marks every region a write, trim or zero
touches and persists the marks as a write-intent map: a region's mark is on
disk (written and fdatasync'ed) before the first write to it since it was
last clean is issued, so neither SIGKILL nor power loss can lose the mark of
an acknowledged write. Writes to a region already durably marked cost a
lock and two array look-ups, nothing more.

Concurrent first-touch writers share one fdatasync (group commit), and
intent is persisted a whole *extent* at a time (4 MiB of regions, aligned),
as DRBD's activity log does: a sequential writer pays one sync per extent,
not one per region. So after a crash the persisted map may hold a few
regions that were never written (resynced for nothing, never missed); a
clean close() trims it back to the exact marks.

Kept intents (async cycles: ``release``/``release_runs`` with ``keep_hot``):
a region an async cycle conveyed is clean, but if its extent was written in
the last ``HOT_SECONDS`` the host is likely to write it again soon, and
clearing its intent would make that write wait for an fdatasync to set it
again (with cycles run back to back, every write did). Its byte becomes 2
instead of 0 (*kept*): still an intent on disk, which after a reboot is
what it is (a 2 may hide a later 1 that never reached the disk), but in the
boot that wrote it (``marks.boot`` names it; the page cache is intact) it
means clean, so a SIGKILL and a restart still send nothing conveyed again.
A write to a kept region turns its byte back to 1 in the page cache before
it lands: a pwrite, no fdatasync (the disk holds a non-zero byte either
way). A failed fdatasync of the map forgets the boot: nothing kept is
trusted after a restart.

Written blocks (``blocks.py``): beside its marks the tracker keeps, in memory
only, a mask per region of the 4K blocks written since the last take
(``take()`` hands them over), so that an async cycle sends those blocks, not
whole regions. Where unknown (marks read at start, a map merged in, a take
given back, ``forget_blocks``) a region counts as written whole.
"""

from __future__ import annotations

import array
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import native
from .blockio import preallocate, pwrite_full
from .blocks import BlockGeometry
from .boot import forget_boot, record_this_boot, recorded_in_this_boot
from .errors import MarksTaken, VolumeCorrupt
from .geometry import region_shift, run_regions, spans

log = logging.getLogger(__name__)

# States of a region in the persisted map, as held in memory.
_CLEAR = 0  # 0 on disk
_WRITTEN = 1  # 1 written to the map file, not yet fdatasync'ed
_DURABLE = 2  # 1 on disk and synced
_KEPT = 3  # 2 on disk: a clean region's intent left in place (module docstring)
KEPT_BYTE = 2
#: the byte on disk (in the page cache) of each state
_ON_DISK = np.array([0, 1, 1, KEPT_BYTE], dtype=np.uint8)
#: map bytes between regions whose state changed, at most, written over as they are (one
#: write instead of one per region: ``_write_states``)
WRITE_GAP = 4096
#: seconds since an extent was last written for its clean regions' intent to be kept
HOT_SECONDS = 2.0
#: beside the map: the boot whose kept bytes mean clean
BOOT_FILE = "marks.boot"

#: regions per step of a whole-map pass (release, trim, clear): the lock every write
#: takes is held for one step (about a millisecond), not for the whole map
PASS_CHUNK = 1 << 18

#: bytes of volume covered by one persisted intent extent
INTENT_EXTENT = 4 << 20


class Take(NamedTuple):
    """What ``RegionTracker.take`` hands over."""

    #: the marks (uint8 map)
    marks: np.ndarray
    #: per region, the blocks written since the last take (uint16 masks, ``blocks.py``):
    #: the whole region where unknown; meaningful where ``marks`` is set
    blocks: np.ndarray


class RegionTracker:
    """Marks of regions written since they were last clean, persisted as a write-intent map."""

    def __init__(self, path: Path, regions: int, region_size: int, *, durable: bool = True):
        self.regions = regions
        self.region_size = region_size
        self.shift = region_shift(region_size)  # cached: try_mark() runs on every write
        self.block_geometry = BlockGeometry(regions * region_size, self.shift)
        self._block_shift = self.block_geometry.shift
        self._durable_sync = durable
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            if size != regions:
                raise VolumeCorrupt(f"{path}: {size} bytes, expected {regions} "
                                    "(one byte per region)")
            self._boot_file = path.with_name(BOOT_FILE)
            # What is in the page cache may not be on disk yet (a SIGKILL between pwrite and
            # fdatasync): sync before trusting it as durable. If that fails, a page that
            # said 1 again may be lost under a kept 2: trust no kept byte any more (Linux
            # reports the failure once: the next start's sync would succeed).
            try:
                os.fdatasync(self._fd)
            except OSError:
                forget_boot(self._boot_file)
                raise
            on_disk = np.fromfile(path, dtype=np.uint8, count=regions)
            if on_disk.size != regions:
                raise VolumeCorrupt(f"{path}: shrank to {on_disk.size} bytes while read")
            self._boot_recorded = recorded_in_this_boot(self._boot_file)
            kept = on_disk == KEPT_BYTE
            if not self._boot_recorded and on_disk.any():
                # Kept in another boot (or trust withdrawn): a 2 may hide a 1 that never
                # reached the disk, and a 1 read from the page cache may sit over a 2 on
                # disk. Every intent written again as 1 and synced, before this boot's
                # kept bytes could be taken for clean.
                intents = (on_disk != 0).view(np.uint8)
                for start, count in native.scan_runs(intents).tolist():
                    pwrite_full(self._fd, b"\x01" * count, start)
                os.fdatasync(self._fd)
                on_disk[kept] = 1
                kept[:] = False
            # A volume made before maps were preallocated, or a copied one, may be sparse.
            preallocate(self._fd, regions)
        except BaseException:
            os.close(self._fd)
            raise
        # Each map is a bytearray (cheap to index on the hot path) with a numpy view of the
        # same memory (for bulk work).
        # What a crash would recover: the persisted marks (and their state in memory).
        self._state = bytearray(np.where(kept, _KEPT, np.where(on_disk != 0, _DURABLE, _CLEAR)
                                         ).astype(np.uint8))
        self._persisted = np.frombuffer(self._state, dtype=np.uint8)
        # The logical marks: regions written since the last swap_and_reset()/clear().
        self._marks = bytearray(((on_disk != 0) & ~kept).astype(np.uint8))
        self.marks = np.frombuffer(self._marks, dtype=np.uint8)
        # The blocks written per region (blocks.py), whole where unknown (marks from disk).
        self._set_blocks(array.array("H", np.full(regions, self.block_geometry.full,
                                                  np.uint16).tobytes()))
        self._spare: array.array | None = None  # the next take's (prepare_take)
        # Taken by swap_and_reset() and not yet released: must stay persisted.
        self._outstanding = np.zeros(regions, dtype=np.uint8)
        self._taken = False  # a swap_and_reset() not yet released
        # Unsettled writes per region, counted only while replicating (see begin()).
        self._pending: np.ndarray | None = None
        self.extent = max(1, INTENT_EXTENT // region_size)
        # time.monotonic() each extent was last written (kept intents: HOT_SECONDS)
        self._touched = np.full(-(-regions // self.extent), -np.inf)
        self._keeping = durable  # kept intents in use (off after a failed fdatasync)
        #: guards the maps; an owner may share it (see try_mark)
        self.lock = self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        # Regions written to the map file and not yet synced, one index array per write.
        self._unsynced: list[np.ndarray] = []
        self._write_seq = 0
        self._synced_seq = 0
        self.syncs = 0

    # -- the hot path ------------------------------------------------------
    def mark(self, offset: int, length: int) -> None:
        """Mark the regions under ``[offset, offset+length)``; durable when this returns."""
        if length <= 0:
            return
        shift = self.shift
        start, stop = offset >> shift, ((offset + length - 1) >> shift) + 1
        while True:
            with self._lock:
                if self.try_mark(offset, length):
                    return
                seq = self._persist(start, stop)
            # Returns once the writes up to seq were synced, or raises. Another thread's
            # failed sync may have rolled our regions back meanwhile: then look again.
            self._sync_upto(seq)

    def mark_map(self, regions: np.ndarray) -> None:
        """Mark every region set in the ``regions`` map; durable when this returns.

        For marks that come in bulk, not from a write (a secondary's, when it
        connects): a pass over the map a chunk at a time, then one fdatasync.
        """
        while True:
            seq = 0
            for a, b in self._chunks():
                want = regions[a:b] != 0
                if not want.any():
                    continue
                with self._lock:
                    self.marks[a:b][want] = 1
                    self.blocks[a:b][want] = self.block_geometry.full
                    todo = (want & (self._persisted[a:b] != _DURABLE)).astype(np.uint8)
                    for start, count in native.scan_runs(todo).tolist():
                        seq = max(seq, self._persist(a + start, a + start + count))
            if not seq:
                return
            # As in mark(): another thread's failed sync may have rolled ours back.
            self._sync_upto(seq)

    def try_mark(self, offset: int, length: int) -> bool:
        """Mark with ``self.lock`` already held by the caller; no I/O but one pwrite to
        the page cache (a kept region's 1, written again: no sync).

        Returns True when the regions' intent is already durable, False when the
        caller must call mark() (after releasing the lock) before the write lands.
        Lets an owner fold marking into a critical section of its own.
        """
        if length <= 0:  # nothing written, nothing to mark
            return True
        shift = self.shift
        first = offset >> shift
        last = (offset + length - 1) >> shift
        bs = self._block_shift
        if first == last:
            self._touched[first // self.extent] = time.monotonic()
            self._marks[first] = 1
            rel = offset - (first << shift)
            self._blocks[first] |= (2 << ((rel + length - 1) >> bs)) - (1 << (rel >> bs))
            state = self._state[first]
            if state == _KEPT:
                return self._say_again(first, 1)
            return state == _DURABLE
        self._touched[first // self.extent:last // self.extent + 1] = time.monotonic()
        n = last + 1 - first
        self._marks[first:last + 1] = b"\x01" * n
        full = self.block_geometry.full
        self._blocks[first] |= full & -(1 << ((offset - (first << shift)) >> bs))
        self._blocks[last] |= (2 << ((offset + length - 1 - (last << shift)) >> bs)) - 1
        self.blocks[first + 1:last] = full
        # (bytes work, not numpy's: a 1 MiB write spans 16 regions of 64K)
        states = self._state[first:last + 1]
        durable = states.count(_DURABLE)
        if durable == n:
            return True
        if durable + states.count(_KEPT) < n:
            return False  # a region with no intent on disk yet: mark() persists it
        return self._say_again(first, n)  # durable and kept ones only (1s stay 1s)

    def _say_again(self, first: int, n: int) -> bool:
        """Regions [first, first + n), each durable or kept, say 1 again: one pwrite to
        the page cache, no sync (module docstring), then durable in memory (lock held).
        False when the write fails: mark() tries again, and raises."""
        try:
            pwrite_full(self._fd, b"\x01" * n, first)
        except OSError:
            return False
        self._state[first:first + n] = bytes((_DURABLE,)) * n
        return True

    def _persist(self, start: int, stop: int) -> int:
        """Persist intent for [start, stop), widened to whole extents (lock held).

        Returns the write sequence number the caller must see synced. The regions
        count as written only once the map write succeeded: a failed one (ENOSPC,
        EIO) leaves them CLEAR, so the next writer tries again, and at worst leaves
        extra 1s on disk (intent for nothing, never a missed mark).
        """
        ext, first, last = self.extent, start, stop
        # Kept regions hold an intent on disk already: it need only say so again (in the
        # page cache: see the module docstring), never wait for a sync.
        if last - first == 1:  # (most writes: no array work)
            if self._state[first] == _KEPT:
                pwrite_full(self._fd, b"\x01", first)
                self._state[first] = _DURABLE
        else:
            kept = (self._persisted[first:last] == _KEPT).view(np.uint8)
            for run, count in native.scan_runs(kept).tolist():
                pwrite_full(self._fd, b"\x01" * count, first + run)
                self._persisted[first + run:first + run + count] = _DURABLE
        start = start // ext * ext
        stop = min(self.regions, -(-stop // ext) * ext)
        clear = np.flatnonzero(self._persisted[start:stop] == _CLEAR)
        if clear.size:
            if clear.size == stop - start:
                pwrite_full(self._fd, b"\x01" * (stop - start), start)
            else:  # around kept (and durable) ones, which stay as they are
                todo = (self._persisted[start:stop] == _CLEAR).view(np.uint8)
                for run, count in native.scan_runs(todo).tolist():
                    pwrite_full(self._fd, b"\x01" * count, start + run)
            written = clear + start
            self._persisted[written] = _WRITTEN
            self._write_seq += 1
            self._unsynced.append(written)
        # Regions already written by another thread still need that thread's sync to finish.
        if not (self._persisted[first:last] == _WRITTEN).any():
            return 0
        return self._write_seq

    def _sync_upto(self, seq: int) -> None:
        """Return once every map write up to ``seq`` is on disk (one fdatasync serves many).

        Each batch entry holds the exact regions its write set to WRITTEN, so only
        they change state: a region of the same extent cleared and persisted again
        while this sync ran belongs to a later batch, and is not promoted by it.
        """
        with self._sync_lock:
            if self._synced_seq >= seq:
                return
            with self._lock:
                target = self._write_seq
                batch, self._unsynced = self._unsynced, []
            try:
                if self._durable_sync:
                    os.fdatasync(self._fd)
            except BaseException:
                # A failed fdatasync drops the file's dirty pages (Linux marks them clean and
                # reports the error once): every map write made before it, in this batch or
                # queued behind it, is unknown on disk. All of them must be written again.
                with self._lock:
                    self._persisted[self._persisted == _WRITTEN] = _CLEAR
                    self._unsynced = []
                    self._stop_keeping()
                raise
            self.syncs += 1
            self._settle(batch, _DURABLE)
            with self._lock:
                self._synced_seq = target

    def _settle(self, batch: list[np.ndarray], state: int) -> None:
        """Move the WRITTEN regions of ``batch`` to ``state`` once their sync is over."""
        with self._lock:
            for written in batch:
                states = self._persisted[written]
                self._persisted[written[states == _WRITTEN]] = state

    # -- cycle operations --------------------------------------------------
    def count(self) -> int:
        with self._lock:
            return native.count(self.marks)

    def runs(self) -> np.ndarray:
        """Marked regions as (start, count) rows."""
        with self._lock:
            return native.scan_runs(self.marks)

    def swap_and_reset(self) -> np.ndarray:
        """``take()``'s marks alone."""
        return self.take().marks

    def take(self) -> Take:
        """Atomically take the current marks and written blocks and start afresh.

        The taken regions stay marked on disk until ``release(taken)``: a crash
        before the caller has finished with them must still find them. Call it
        with writes quiesced (Engine.quiesce), so that no write marked before the
        swap lands after it. One take at a time: a second one before the first is
        released raises MarksTaken (a failed cycle merges its take back, then
        releases it).
        """
        with self._lock:
            if self._taken:
                raise MarksTaken("the marks were taken and not released yet; release that "
                                 "take before taking again")
            taken = Take(self.marks, self.blocks)
            self._marks = bytearray(self.regions)
            self.marks = np.frombuffer(self._marks, dtype=np.uint8)
            spare, self._spare = self._spare, None
            self._set_blocks(spare if spare is not None else _zero_blocks(self.regions))
            native.merge_or(self._outstanding, taken.marks)
            self._taken = True
        return taken

    def prepare_take(self) -> None:
        """Make the next take's fresh block masks now, before writes pause for it (2
        bytes a region: 32 MiB for 1 TiB of 64K regions, ~50 ms of fresh memory here)."""
        spare = _zero_blocks(self.regions)
        with self._lock:
            self._spare = spare

    def _set_blocks(self, blocks: array.array) -> None:
        """The written blocks' masks from now on (lock held, or not shared yet)."""
        # an array.array for the hot path (a third of numpy's indexing time), and a view
        self._blocks = blocks
        self.blocks = np.frombuffer(blocks, dtype=np.uint16)

    def forget_blocks(self) -> None:
        """Every region counts as written whole: what is marked now travels whole (a
        pass that skipped regions written meanwhile conveyed none of them)."""
        with self._lock:
            self.blocks[:] = self.block_geometry.full

    def retake(self, regions: np.ndarray) -> None:
        """After a restart: ``regions`` were taken by a take that was never released (an
        async cycle left open) and not written since. As if ``swap_and_reset`` had just
        taken them: unmarked here, their intent still durable, outstanding until
        ``release``."""
        with self._lock:
            if self._taken:
                raise MarksTaken("the marks were taken and not released yet; release that "
                                 "take before taking again")
            self.marks[regions != 0] = 0
            native.merge_or(self._outstanding, regions)
            self._taken = True

    def release_runs(self, runs: list[tuple[int, int]], keep_hot: bool = False) -> None:
        """The regions of ``runs`` ([first, stop), ascending, apart: an async cycle's
        frame) of the outstanding take are done with (the cycle conveyed them): their
        intent goes now, unless marked again since, so that a write from now on records
        its mark durably again (``release`` does the rest). ``keep_hot``: kept instead
        where their extent was written lately (module docstring). Array work over
        their regions alone."""
        regions = run_regions(runs)
        with self._lock:
            self._outstanding[regions] = 0
            extra = (self._persisted[regions] != _CLEAR) & (self.marks[regions] == 0)
            if extra.any():
                self._drop_intents(regions[extra], keep_hot)

    def _drop_intents(self, regions: np.ndarray, keep_hot: bool) -> None:
        """The persisted intents of ``regions`` (ascending; neither marked nor outstanding)
        go: cleared, or kept where ``keep_hot`` and their extent was written lately (lock
        held). Safe: a write in flight has set its mark before it checked the persisted
        state.

        As in ``_clear_persisted``, CLEAR before the write and WRITTEN ones left for
        their sync; kept ones turn KEPT once written (``_write_states``).
        """
        persisted = self._persisted[regions]
        keep = np.zeros(regions.size, dtype=bool)
        drop = np.ones(regions.size, dtype=bool)
        if keep_hot and self._keeping:
            hot = self._touched[regions // self.extent] > time.monotonic() - HOT_SECONDS
            if hot.any():
                keep = hot & (persisted == _DURABLE)  # (kept ones stay as they are)
                if not keep.any() or self._keep_boot():
                    drop = ~hot
                else:  # this boot cannot be recorded: cleared, as without keeping
                    keep[:] = False
        clear = drop & ((persisted == _DURABLE) | (persisted == _KEPT))
        self._persisted[regions[clear]] = _CLEAR
        changed = keep | clear
        self._write_states(regions[changed], keep[changed])

    def _write_states(self, regions: np.ndarray, kept: np.ndarray) -> None:
        """Write the map bytes of ``regions`` (ascending) as their states say, those where
        ``kept`` is set as kept bytes; they turn KEPT once written (lock held: every map
        write is made under it, so the bytes between them are written as they already
        are, and a page-sized stretch takes one write, not one per region)."""
        for lo, hi in spans(regions, WRITE_GAP):
            out = _ON_DISK[self._persisted[lo:hi]]
            a, b = np.searchsorted(regions, (lo, hi))
            these = regions[a:b][kept[a:b]]
            out[these - lo] = KEPT_BYTE
            pwrite_full(self._fd, out, lo)
            self._persisted[these] = _KEPT

    def merge(self, other: np.ndarray) -> None:
        """OR ``other`` into the marks (e.g. give back marks a failed cycle took); their
        regions count as written whole."""
        with self._lock:
            native.merge_or(self.marks, other)
            self.blocks[np.asarray(other) != 0] = self.block_geometry.full

    def give_back(self, taken: np.ndarray, keep_hot: bool = False) -> int:
        """A take whose regions were not all conveyed (a failed or abandoned cycle): mark
        them all again, then release it."""
        self.merge(taken)
        return self.release(taken, keep_hot)

    def release(self, taken: np.ndarray, keep_hot: bool = False) -> int:
        """Clear on disk the regions of ``taken`` not marked again since; return how many.

        Intent persisted for unmarked neighbours (whole extents) is trimmed too;
        ``keep_hot``: kept instead in extents written lately (module docstring).
        A pass over the whole map, a chunk at a time: every write takes the same
        lock, so it is held for one chunk, never for the whole map.
        """
        count = 0
        for a, b in self._chunks():
            part = taken[a:b] != 0
            with self._lock:
                self._outstanding[a:b][part] = 0
                done = part & (self.marks[a:b] == 0) & (self._persisted[a:b] != _CLEAR)
                count += int(np.count_nonzero(done))
                self._trim_range(a, b, keep_hot)
        with self._lock:
            self._taken = False
        return count

    def _chunks(self) -> Iterator[tuple[int, int]]:
        for a in range(0, self.regions, PASS_CHUNK):
            yield a, min(self.regions, a + PASS_CHUNK)

    def _trim_range(self, a: int, b: int, keep_hot: bool = False) -> None:
        """Drop the persisted intents of regions of [a, b) neither marked nor outstanding
        (lock held; ``_drop_intents``)."""
        persisted = self._persisted[a:b]
        if not persisted.any():
            return
        extra = (persisted != _CLEAR) & (self.marks[a:b] == 0) & (self._outstanding[a:b] == 0)
        if extra.any():
            self._drop_intents(a + np.flatnonzero(extra), keep_hot)

    def _keep_boot(self) -> bool:
        """This boot recorded as the one whose kept bytes mean clean (once; lock held);
        False when it cannot be (nothing is kept from then on)."""
        if not self._boot_recorded:
            try:
                record_this_boot(self._boot_file)
            except OSError as err:  # (ENOSPC): clear them instead, as without keeping
                log.warning("cannot record this boot in %s: %s; conveyed regions' intents "
                            "are cleared, not kept", self._boot_file, err)
                self._keeping = False
                return False
            self._boot_recorded = True
        return True

    def _stop_keeping(self) -> None:
        """(lock held) After a failed fdatasync of the map: kept bytes are trusted no more
        (a page that said 1 again may be lost, leaving the disk's 2); from now on only
        durable intents, as they are on disk."""
        self._keeping = False
        self._persisted[self._persisted == _KEPT] = _DURABLE  # non-zero on disk: an intent
        try:
            forget_boot(self._boot_file)
        except OSError as err:  # then a restart in this boot trusts them: say so loudly
            log.error("cannot remove %s after a failed fdatasync of the marks: %s; restart "
                      "nothing in this boot before removing it", self._boot_file, err)
        self._boot_recorded = False

    def _trim_intent(self) -> None:
        """Trim the whole persisted map to the marks and takes, a chunk at a time."""
        for a, b in self._chunks():
            with self._lock:
                self._trim_range(a, b)

    def clear(self, regions: np.ndarray | None = None) -> int:
        """Forget marks: all of them, or those set in the ``regions`` map (a chunk at a time).

        A region with a write not yet settled (see begin()) keeps its mark: that
        write may still fail to reach the peer.
        """
        count = 0
        for a, b in self._chunks():
            with self._lock:
                sel = np.ones(b - a, dtype=bool) if regions is None else regions[a:b] != 0
                if self._pending is not None:
                    sel &= self._pending[a:b] == 0
                self.marks[a:b][sel] = 0
                done = sel & (self._persisted[a:b] != _CLEAR)
                count += self._clear_persisted(done, a)
        return count

    # -- writes not yet settled with a peer (replication) ---------------------
    def track_pending(self) -> None:
        """Start counting unsettled writes per region (a replicator is attaching)."""
        with self._lock:
            if self._pending is None:
                self._pending = np.zeros(self.regions, dtype=np.uint32)

    def begin(self, first: int, stop: int) -> None:
        """A write to regions [first, stop) is under way (lock held, after try_mark)."""
        self._pending[first:stop] += 1

    def end(self, first: int, stop: int) -> None:
        """That write is settled: acknowledged by the peer, or its regions left marked."""
        with self._lock:
            self._pending[first:stop] -= 1

    def pending(self) -> int:
        """Regions with at least one unsettled write."""
        with self._lock:
            return 0 if self._pending is None else int(np.count_nonzero(self._pending))

    @property
    def durable(self) -> bool:
        """False when marks are not fdatasync'ed (``durable-marks=0``, benchmarks only)."""
        return self._durable_sync

    def _clear_persisted(self, done: np.ndarray, base: int = 0) -> int:
        """Zero the persisted marks in ``done`` (regions from ``base``; lock held).

        Losing this write is harmless.

        The memory state turns CLEAR before the write, on purpose: CLEAR is right
        whether the zeros reach the disk or not (a 1 left on disk is intent for
        nothing), while DURABLE over a zeroed byte would let a later write skip
        persisting its mark. Regions whose intent was written but is not yet
        synced are left alone: their sync must settle them.
        """
        persisted = self._persisted[base:base + done.size]
        regions = base + np.flatnonzero(done & ((persisted == _DURABLE) | (persisted == _KEPT)))
        self._persisted[regions] = _CLEAR
        self._write_states(regions, np.zeros(regions.size, dtype=bool))
        return int(regions.size)

    def close(self) -> None:
        """Trim the persisted map to the exact marks and close it."""
        if self._fd >= 0:
            try:
                self._trim_intent()
                try:
                    os.fdatasync(self._fd)
                except OSError:  # as in _sync_upto: a lost 1 may leave a kept 2 on disk
                    with self._lock:
                        self._stop_keeping()
                    raise
            finally:
                os.close(self._fd)
                self._fd = -1


def _zero_blocks(regions: int) -> array.array:
    """Block masks of ``regions`` regions, all clear."""
    return array.array("H", bytes(2 * regions))


def load_marks(path: Path, regions: int) -> np.ndarray:
    """Read a persisted map without opening a tracker (for offline inspection): kept
    bytes count as marks unless this boot kept them (module docstring)."""
    on_disk = np.fromfile(path, dtype=np.uint8, count=regions)
    if on_disk.size != regions:
        raise VolumeCorrupt(f"{path}: {on_disk.size} bytes, expected {regions} "
                            "(one byte per region)")
    if recorded_in_this_boot(path.with_name(BOOT_FILE)):
        return ((on_disk != 0) & (on_disk != KEPT_BYTE)).astype(np.uint8)
    return (on_disk != 0).astype(np.uint8)
