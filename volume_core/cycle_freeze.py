"""The frozen image of an async cycle: the regions it has yet to convey, as they were.

docs/ASYNC.md has the design. At the take (writes quiesced) the cycle's
regions are those the tracker handed over (``swap_and_reset``). Until one is
conveyed, a host write to it first copies its old contents into ``store.img``
(at the same offset), through the snapshots' ``CowStore``; regions outside
the cycle, and regions already conveyed, are never copied: the host pays only
for what the cycle still needs. One byte per region in ``state.map``:

    KEEP    in the cycle, not conveyed; its old contents are still live
    COPIED  in the cycle, not conveyed; its old contents are in store.img
    FREE    not in the cycle, or conveyed

``CowStore`` treats any non-zero byte as "no copy needed" and writes COPIED
(1) once a copy is made, so the freeze is a copy-on-write target like a
snapshot. Everything lives in ``VOL/cycle/``, created whole (a temporary
directory renamed into place), so a primary that restarts mid-cycle finds it
and resumes (``open``).

Of a frozen region only the blocks written before the take travel
(``blocks``: the tracker's masks, handed over at the take). Once the masks are
in ``blocks.map``
(``record_blocks``, right after the take; written whole to a temporary file
and renamed, so a restart finds all of them or none), a host write that
touches none of its region's frozen blocks lands with no copy at all: the
cycle never reads the blocks it writes. Such a region stays KEEP, so its
byte in ``touched.map`` is set first (a page-cache write, once per region a
cycle): it was written since the take, and a restart must leave it marked
for the next cycle (``touched``), as it leaves a COPIED one. A cycle resumed
without ``blocks.map`` (cut off before it was written, or made by an older
version) sends whole regions and copies on every write, as before masks.
From then on, too, a copy on write keeps only the region's frozen blocks:
for a write inside one region, from its first frozen block to its last in
one ``native.copy_range`` (``copy_file_range``), claimed and recorded without the snapshots' group
commit (``_copy_one``: a freeze syncs nothing); for a write over several,
their frozen blocks through ``CowStore`` (``copy_regions``). Before, it
keeps whole regions.

Unlike a snapshot's, a freeze's copies are not synced (no fdatasync on the
host's write path): the freeze is only a buffer for one transfer, and the
page cache survives anything but a reboot. ``cycle.json`` records the boot
it was made in (``/proc/sys/kernel/random/boot_id``); after a reboot ``open``
discards it. Nothing is lost then: every region it had not conveyed is
still marked durably (the take is released only at the commit), and those
it conveyed are on the secondary; the next take (the same cycle number: it
was never committed) carries them again with what was written since. For
the same reason the take itself syncs nothing while writes pause: ``prepare``
writes and syncs the files and ``cycle.json`` (with this boot) beforehand,
``create`` only writes the taken regions' state bytes and renames the
directory into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import native
from .blockio import Extents, pread_full, preallocate, pwrite_full
from .blocks import BlockGeometry
from .boot import boot_id
from .errors import VolumeCorrupt
from .geometry import RegionGeometry, leading, run_regions, spans
from .regions import WRITE_GAP
from .snapshots import CowStore
from .state_files import is_unix_time
from .volume import Volume, fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

KEEP, COPIED, FREE = 0, 1, 2
#: runs of taken regions written one by one into a prepared state map, at most (more:
#: the whole map in one write)
MAX_RUN_WRITES = 256
DIR = "cycle"
STORE = "store.img"
STATE = "state.map"
INFO = "cycle.json"
#: the take's written-block masks (uint16 a region), once ``record_blocks`` wrote them
BLOCKS = "blocks.map"
#: a byte a region: written since the take with no copy (it missed the frozen blocks)
TOUCHED = "touched.map"


class LeftOpen(NamedTuple):
    """A cycle a previous run left open, as ``check`` read it."""

    number: int
    taken_at: float
    boot_id: str | None  # the boot that made it (None: made before it was recorded)
    state: np.ndarray
    #: the take's block masks (None: not recorded; whole regions travel)
    blocks: np.ndarray | None = None
    #: regions written since the take with no copy (None: no such file, none were)
    touched: np.ndarray | None = None


class Prepared(NamedTuple):
    """What ``CycleFreeze.prepare`` made: its temporary directory, its state map, and the
    cycle number and time of its ``cycle.json`` (written and synced already)."""

    path: Path
    state: np.ndarray
    number: int
    taken_at: float


@dataclasses.dataclass
class CycleFreeze:
    """One open cycle's frozen image (see the module docstring)."""

    number: int
    path: Path
    live_fd: int
    store_fd: int
    map_fd: int
    geometry: RegionGeometry
    #: the state map (``CowStore`` calls it ``preserved``: non-zero = no copy needed)
    preserved: np.ndarray
    #: regions whose copy is under way (``CowStore``'s claims)
    copying: np.ndarray
    #: the copy-on-write machinery (the snapshots'), for this freeze alone
    cow: CowStore
    #: Unix time of the take: the point in time the cycle's image holds
    taken_at: float = 0.0
    #: per region, the blocks written before the take (``blocks.py``): only those are
    #: conveyed; None (a cycle resumed without ``blocks.map``): whole regions
    blocks: np.ndarray | None = None
    #: per region, 1 = written since the take with no copy (the write missed its frozen
    #: blocks): it stays marked for the next cycle across a restart (module docstring)
    touched: np.ndarray | None = None
    #: ``touched.map``, open while a write may set a byte of it
    touched_fd: int = -1
    #: ``blocks`` is on disk (``blocks.map``): a write that misses them needs no copy
    masks_recorded: bool = False
    #: where the live file holds data (the conveyor's ``hole_end``/``data_end``)
    _extents: Extents = dataclasses.field(init=False, repr=False)
    _block_geometry: BlockGeometry = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._extents = Extents(self.live_fd, self.geometry.region_size)
        self._block_geometry = BlockGeometry(self.geometry.size, self.geometry.shift)
        if self.touched is None:
            self.touched = np.zeros(self.preserved.size, dtype=np.uint8)

    def copy_regions(self, live_fd: int, runs: np.ndarray, volume: Volume) -> None:
        """``CowStore``'s copy of regions ``runs`` ((first, count) rows) into the store:
        only their frozen blocks once the masks are recorded (the conveyor reads no
        other block of a frozen region, and a cycle resumed from its files reads what
        ``blocks.map`` says), else whole regions (a cycle resumed without its masks
        reads them whole)."""
        if not self.masks_recorded:
            native.copy_runs(live_fd, self.store_fd, runs, volume.region_size, volume.size)
            return
        geometry = self._block_geometry
        regions = run_regions(np.stack((runs[:, 0], runs.sum(axis=1)), axis=1))
        blocks = geometry.block_runs(regions, geometry.known(self.blocks[regions]))  # type: ignore[index]
        native.copy_runs(live_fd, self.store_fd, blocks, 1 << geometry.shift, volume.size)

    def record_preserved(self, batch: list[np.ndarray] | list[tuple[tuple[int, int]]]) -> None:
        """Copies made (``CowStore``, ``_copy_one``): their map bytes, unsynced (see the
        module docstring: a freeze is trusted only in the boot that made it).

        Only for regions memory still says KEEP, checked and written under the
        copy lock (``conveyed_runs`` holds it): a region acknowledged while its
        copy was under way is FREE, and a later write may have landed in it with
        no copy before the copy read it, so the store may hold that write. A
        COPIED byte over its FREE would make a restart send it as the take."""
        with self.cow.lock:
            for runs in batch:  # arrays, or ``_copy_one``'s one run as a tuple
                for start, count in (runs.tolist() if isinstance(runs, np.ndarray) else runs):
                    if count == 1:  # (``_copy_one``'s, on a host write: no array work)
                        if self.preserved[start] == KEEP:
                            pwrite_full(self.map_fd, b"\x01", start)
                        continue
                    keep = (self.preserved[start:start + count] == KEEP).view(np.uint8)
                    for first, n in native.scan_runs(keep).tolist():
                        pwrite_full(self.map_fd, b"\x01" * n, start + first)

    @staticmethod
    def prepare(volume: Volume, number: int, taken_at: float | None = None) -> Prepared:
        """The files of cycle ``number``'s freeze with nothing in it yet (every region
        FREE), synced, in a temporary directory, and its state map in memory: the slow
        part of ``create`` (in this VM fresh memory alone costs ~2.5 ms per MiB), done
        before writes pause. Its ``cycle.json`` too: the cycle, this boot, and the time
        of its take, ``taken_at`` (Unix time; now by default: a take follows at once,
        and its image holds every write acknowledged before it, so the point in time
        it claims is at most that early). ``create`` then syncs nothing: writes pause
        for a few page-cache writes and a rename."""
        root = volume.path / DIR
        if root.exists():
            raise FileExistsError(f"{root}: cycle already open; finish or drop it first")
        tmp = _clear_leftover(volume)
        state = np.full(volume.regions, FREE, dtype=np.uint8)
        try:
            tmp.mkdir()
            with open(tmp / STORE, "wb") as f:
                f.truncate(volume.size)
            with open(tmp / STATE, "wb") as f:
                preallocate(f.fileno(), volume.regions)  # copies then never fail to record
                pwrite_full(f.fileno(), state, 0)
                os.fdatasync(f.fileno())
            with open(tmp / TOUCHED, "wb") as f:  # sparse: all zeros (none touched)
                f.truncate(volume.regions)
            taken_at = _whole_us(time.time() if taken_at is None else taken_at)
            write_json_atomic(tmp / INFO, {"number": number, "taken_at": taken_at,
                                           "boot_id": boot_id()})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Prepared(tmp, state, number, taken_at)

    @classmethod
    def create(cls, volume: Volume, live_fd: int, number: int, taken: np.ndarray,
               taken_at: float | None = None,
               prepared: Prepared | None = None,
               blocks: np.ndarray | None = None) -> CycleFreeze:
        """Freeze the regions set in ``taken`` for cycle ``number`` (writes quiesced), in
        the files ``prepare`` made (made now if not given, its point in time
        ``taken_at``). Only the taken regions' bytes of the state map are written
        here, and nothing is synced: a freeze is trusted only in the boot that made
        it (the module docstring), and a SIGKILL keeps what is in the page cache.
        ``blocks``: the take's written blocks (``RegionTracker.take``), if only they
        are to travel. After a power loss ``open`` finds the boot of the synced ``cycle.json`` gone,
        or no ``cycle`` directory at all (the rename lost): either way it is taken
        again."""
        root = volume.path / DIR
        prepared = prepared or cls.prepare(volume, number, taken_at)
        tmp, state = prepared.path, prepared.state
        try:
            if prepared.number != number:
                raise ValueError(f"prepared for cycle {prepared.number}, not {number}")
            if root.exists():
                raise FileExistsError(f"{root}: cycle already open; finish or drop it first")
            with open(tmp / STATE, "r+b") as f:
                runs = native.scan_runs(np.asarray(taken, dtype=np.uint8))
                state[np.asarray(taken) != 0] = KEEP
                _write_runs(f.fileno(), state, runs)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls._open(volume, live_fd, root, number, prepared.taken_at, state, sync=False,
                         blocks=blocks)

    @classmethod
    def open(cls, volume: Volume, live_fd: int) -> CycleFreeze | None:
        """The cycle a previous run left open, or None. A damaged one is refused."""
        _clear_leftover(volume)
        found = cls.check(volume)
        if found is None:
            return None
        if found.boot_id is not None and found.boot_id != boot_id():
            log.warning("the open cycle in %s was made before a reboot: its unsynced "
                        "copies cannot be trusted, so it is taken again", volume.path)
            cls.discard(volume)
            return None
        return cls._open(volume, live_fd, volume.path / DIR, found.number, found.taken_at,
                         found.state, blocks=found.blocks, touched=found.touched,
                         recorded=found.blocks is not None)

    @staticmethod
    def check(volume: Volume) -> LeftOpen | None:
        """The cycle left open, or None; VolumeCorrupt, naming it, for a damaged one (for
        a command to refuse before it starts a server)."""
        root = volume.path / DIR
        if not os.path.lexists(root):
            return None
        try:
            if root.is_symlink() or not root.is_dir():
                raise ValueError("not a directory")
            info = json.loads((root / INFO).read_text())
            number = info["number"]
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise ValueError(f"cycle number {number!r}")
            made_in = info.get("boot_id")
            if made_in is not None and not isinstance(made_in, str):
                raise ValueError(f"boot id {made_in!r}")
            taken_at = info.get("taken_at", 0.0)  # absent: made before it was recorded
            if not is_unix_time(taken_at):
                raise ValueError(f"time of the take {taken_at!r}")
            committed = volume.info.cycle  # open: the next, or the last not yet closed
            if not committed <= number <= committed + 1:
                raise ValueError(f"cycle {number}, but cycle {committed} was committed")
            state = np.fromfile(root / STATE, dtype=np.uint8)
            if state.size != volume.regions:
                raise ValueError(f"{STATE}: {state.size} bytes, expected {volume.regions}")
            if state.size and int(state.max()) > FREE:
                raise ValueError(f"{STATE}: a region in state {int(state.max())}")
            if os.stat(root / STORE).st_size != volume.size:
                raise ValueError(f"{STORE}: not {volume.size} bytes")
            blocks = touched = None
            if os.path.lexists(root / BLOCKS):
                blocks = np.fromfile(root / BLOCKS, dtype=np.uint8)
                if blocks.size != 2 * volume.regions:
                    raise ValueError(f"{BLOCKS}: {blocks.size} bytes, expected "
                                     f"{2 * volume.regions}")
                blocks = blocks.view(np.uint16)
                full = BlockGeometry(volume.size, volume.geometry.shift).full
                if (blocks & np.uint16(~full & 0xFFFF)).any():
                    raise ValueError(f"{BLOCKS}: a mask of blocks past its region")
            if os.path.lexists(root / TOUCHED):
                touched = np.fromfile(root / TOUCHED, dtype=np.uint8)
                if touched.size != volume.regions:
                    raise ValueError(f"{TOUCHED}: {touched.size} bytes, expected "
                                     f"{volume.regions}")
                if touched.size and int(touched.max()) > 1:
                    raise ValueError(f"{TOUCHED}: a byte {int(touched.max())}")
            # a region is touched only once the masks are on disk (record_blocks), and
            # both files exist from then on: one without the other is damage
            if blocks is not None and touched is None:
                raise ValueError(f"{TOUCHED} missing beside {BLOCKS}")
            if blocks is None and touched is not None and touched.any():
                raise ValueError(f"{BLOCKS} missing, yet {TOUCHED} has regions written")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise VolumeCorrupt(f"{root}: damaged open cycle ({err})") from None
        return LeftOpen(number, float(taken_at), made_in, state, blocks, touched)

    @staticmethod
    def discard(volume: Volume) -> bool:
        """Drop a cycle a previous run left open, if any (True then): for a server that
        will not mirror async, whose writes would not copy on write (the image would go
        stale). Its regions stay marked in the tracker: they are sent again."""
        root = volume.path / DIR
        _clear_leftover(volume)
        if not os.path.lexists(root):
            return False
        if root.is_dir() and not root.is_symlink():
            shutil.rmtree(root)
        else:  # not what nbdmirror makes: nothing of ours to keep either way
            root.unlink()
        fsync_dir(volume.path)
        return True

    @classmethod
    def _open(cls, volume: Volume, live_fd: int, root: Path, number: int, taken_at: float,
              state: np.ndarray, sync: bool = True, blocks: np.ndarray | None = None,
              touched: np.ndarray | None = None, recorded: bool = False) -> CycleFreeze:
        """``blocks``/``touched`` as ``check`` read them (a cycle left open: ``recorded``
        when its masks were), or the take's masks (a new one: ``record_blocks``)."""
        fds: list[int] = []
        try:
            for name in (STORE, STATE):
                fds.append(os.open(root / name, os.O_RDWR | os.O_CLOEXEC))
            # (a cycle an older version left open has none: made here, all zeros)
            fds.append(os.open(root / TOUCHED, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            if touched is None:
                os.ftruncate(fds[2], volume.regions)
            if sync:  # (one left open) what a previous run left in the page cache, on disk
                for fd in fds:
                    os.fdatasync(fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        store_fd, map_fd, touched_fd = fds
        return cls(number, root, live_fd, store_fd, map_fd, volume.geometry, state,
                   np.zeros(state.size, dtype=np.uint8), CowStore(volume, live_fd), taken_at,
                   blocks, touched, touched_fd, masks_recorded=recorded)

    def record_blocks(self) -> bool:
        """Write the take's block masks to ``blocks.map`` (after the take, writes going
        on): from then on a write that misses its region's frozen blocks lands with no
        copy (``preserve``). Written whole to a temporary file, then renamed: a restart
        finds every mask or none. False (and copies on every write, as before) when
        there are no masks or writing them failed."""
        if self.blocks is None or self.masks_recorded:
            return self.masks_recorded
        tmp = self.path / f".{BLOCKS}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.truncate(2 * self.blocks.size)
                runs = native.scan_runs((self.blocks != 0).view(np.uint8))
                _write_runs(f.fileno(), self.blocks, runs)
            os.rename(tmp, self.path / BLOCKS)
        except OSError as err:
            log.warning("cycle %d: not recording its written blocks (%s): every write to "
                        "a region it has yet to convey copies it first", self.number, err)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        self.masks_recorded = True
        return True

    # -- the host's side --------------------------------------------------------
    def preserve(self, offset: int, length: int) -> None:
        """Pre-write hook: keep the old contents of regions the cycle still needs.

        A write inside one region still to convey that touches none of its
        frozen blocks needs no copy once the masks are recorded: the cycle
        never reads what it writes. The region is noted as touched first
        (module docstring). Anything else goes to the copy-on-write machinery.
        """
        if self.masks_recorded and length > 0:
            shift = self.geometry.shift
            first = offset >> shift
            if first == (offset + length - 1) >> shift:
                if self.preserved[first]:  # COPIED or FREE: no copy needed
                    return
                frozen = int(self.blocks[first])  # type: ignore[index]
                # (an empty mask counts as the whole region: blocks.known)
                if frozen and not frozen & self._block_geometry.mask(offset, length, first) \
                        and self._touch(first):
                    return
                if self._copy_one(first):
                    return
        self.cow.preserve(self, offset, length)

    def _copy_one(self, region: int) -> bool:
        """``CowStore.preserve`` for one KEEP region no one else is copying, without its
        group commit (a freeze syncs nothing: ``record_preserved``): claim it, copy
        its frozen blocks, write its COPIED byte, then say so in memory. False (the
        caller goes the general way) when it is not KEEP or another copy is under way.

        The same steps and lock as ``CowStore``'s, so ``conveyed_runs`` and ``read_range``
        see a copy the same way: claimed (``copying``) while under way, COPIED on disk
        before in memory, and a FREE set meanwhile stays FREE."""
        cow = self.cow
        with cow.lock:
            if self.preserved[region] != KEEP or self.copying[region]:
                return False
            self.copying[region] = 1
        try:
            self._copy_blocks(region)
            self.record_preserved([((region, 1),)])
        except BaseException:
            with cow.lock:
                self.copying[region] = 0
                cow.lock.notify_all()
            raise
        with cow.lock:
            if self.preserved[region] == KEEP:
                self.preserved[region] = COPIED
            self.copying[region] = 0
            cow.copies += 1
            cow.lock.notify_all()
        return True

    def _copy_blocks(self, region: int) -> None:
        """Copy ``region``'s frozen blocks (masks recorded; else all of it) into the store,
        at the same offsets: ``copy_regions`` for one region, without array work, in
        one range from its first frozen block to its last (what lies between is
        copied too, and never read: one ``copy_file_range``, not one a run; in the
        kernel, so no bytes pass through Python and the GIL is free meanwhile)."""
        geometry = self._block_geometry
        mask = geometry.full
        if self.masks_recorded:
            mask = int(self.blocks[region]) or mask  # type: ignore[index]
        base = region << self.geometry.shift
        lo = base + (((mask & -mask).bit_length() - 1) << geometry.shift)
        hi = min(base + (mask.bit_length() << geometry.shift), self.geometry.size)
        native.copy_range(self.live_fd, self.store_fd, lo, hi)

    def _touch(self, region: int) -> bool:
        """Note ``region`` as written since the take with no copy, before the write lands
        (page cache, as the state map: a freeze is trusted in its own boot only);
        False when that fails (the caller copies instead)."""
        touched = self.touched
        if not touched[region]:  # type: ignore[index]
            try:
                pwrite_full(self.touched_fd, b"\x01", region)
            except OSError as err:
                log.warning("cycle %d: cannot note region %d as written (%s); copying it",
                            self.number, region, err)
                return False
            touched[region] = 1  # type: ignore[index]
        return True

    # -- the conveyor's side ----------------------------------------------------
    def remaining(self) -> np.ndarray:
        """A map (uint8, 1 = still to convey) of the cycle's regions not yet conveyed."""
        return (self.preserved != FREE).view(np.uint8)

    def read(self, first: int, stop: int) -> bytearray:
        """The frozen contents of regions [first, stop) (the last one may be short), whole:
        right only without recorded masks (a copy keeps just the frozen blocks; the
        conveyor reads those alone, ``read_range``)."""
        offset, length = self.geometry.byte_range(first, stop)
        buf = bytearray(length)
        self.read_range(offset, memoryview(buf))
        return buf

    def read_range(self, offset: int, view: memoryview) -> None:
        """The frozen contents of ``len(view)`` bytes at ``offset`` (inside regions still
        to convey), into ``view``.

        A KEEP region is read live, then its state looked at again: a host
        write lands only after its region became COPIED, so a region still
        KEEP after the read was read before any write to it; one that became
        COPIED meanwhile is read again from the store.
        """
        first, stop = self.geometry.span(offset, len(view))
        if stop - first == 1:  # (most extents of small writes: no array work)
            state = self.preserved[first]
            if state == KEEP:
                pread_full(self.live_fd, view, offset)
                state = self.preserved[first]  # COPIED meanwhile: read again
            if state == COPIED:
                pread_full(self.store_fd, view, offset)
            return
        state = self.preserved[first:stop].copy()
        if not (state != state[0]).any():  # one source (most chunks)
            whole = state[0]
            if whole in (KEEP, COPIED):
                pread_full(self.live_fd if whole == KEEP else self.store_fd, view, offset)
        else:
            for fd, want in ((self.store_fd, COPIED), (self.live_fd, KEEP)):
                self._read_runs(fd, state == want, first, offset, view)
        moved = (state == KEEP) & (self.preserved[first:stop] == COPIED)
        if moved.any():
            self._read_runs(self.store_fd, moved, first, offset, view)

    def skip_end(self, first: int, stop: int) -> int:
        """A cycle skips nothing it froze (``LivePass`` skips what was written since)."""
        return first

    def hole_end(self, first: int, stop: int) -> int:
        """How far from ``first`` (at most ``stop``) the frozen image is a hole of the
        live file: regions KEEP and not touched before and after SEEK_DATA looked (as
        ``read`` does: a write lands only after its region became COPIED or touched),
        so they read as zeros without reading them. ``first`` when it is not one.

        A touched region is never taken for a hole: a trim of blocks the cycle
        does not convey may have made it one since the take, and a ZERO frame
        covers whole regions; read, its frozen blocks come out as they were."""
        if self._extents.known_data(first):  # (no array work, no system call)
            return first
        before = self._untouched_keep(first, stop)
        end = self._extents.hole_end(first, stop)
        if end <= first:
            return first
        return first + leading(before[:end - first] & self._untouched_keep(first, end))

    def _untouched_keep(self, first: int, stop: int) -> np.ndarray:
        """Of regions [first, stop): KEEP and not touched (unwritten since the take)."""
        return (self.preserved[first:stop] == KEEP) & (
            self.touched[first:stop] == 0)  # type: ignore[index]

    def data_stretch(self, first: int) -> int | None:
        """Where the stretch of data of the live file that holds region ``first`` ends (a
        region index), or None when ``first`` is in a hole: the regions of a cycle in
        it are all read, none looked at for holes."""
        end = self._extents.data_end(first, self.geometry.regions)
        return end if self._extents.known_data(first) else None

    def data_end(self, first: int, stop: int) -> int:
        """Where (at most ``stop``, at least ``first + 1``) the data of the live volume
        from region ``first`` on next gives way to a hole: a chunk read from ``first``
        need not go further (what follows is for ``hole_end``)."""
        return self._extents.data_end(first, stop)

    def _read_runs(self, fd: int, where: np.ndarray, first: int, offset: int,
                   view: memoryview) -> None:
        """From ``fd``, the bytes of ``view`` (``offset`` on) in the regions ``where``
        (a map of the regions from ``first``) sets."""
        shift, end = self.geometry.shift, offset + len(view)
        for start, count in native.scan_runs(where.view(np.uint8)).tolist():
            lo = max((first + start) << shift, offset)
            hi = min((first + start + count) << shift, end)
            pread_full(fd, view[lo - offset:hi - offset], lo)

    def conveyed_runs(self, runs: list[tuple[int, int]]) -> None:
        """The regions of ``runs`` (ascending, apart) are on the secondary: no copy needed
        from now on.

        Written without fdatasync: after a crash a lost FREE only sends them again.
        A page-sized stretch of the map at a time, as memory has it but for the
        regions turning FREE, where no copy is under way in it (a copy writes its
        COPIED byte before memory says so), else run by run. Memory says FREE only
        once the byte is written: a region FREE in memory takes host writes without
        a copy, so its KEEP on disk would let a restart read a later write into
        this cycle's image.
        """
        regions = run_regions(runs)
        with self.cow.lock:  # not between a copy's commit reading and setting the bytes
            for lo, hi in spans(regions, WRITE_GAP):
                a, b = np.searchsorted(regions, (lo, hi))
                these = regions[a:b]
                if self.copying[lo:hi].any():
                    for first, stop in spans(these, 1):
                        pwrite_full(self.map_fd, bytes([FREE]) * (stop - first), first)
                else:
                    stretch = self.preserved[lo:hi].copy()
                    stretch[these - lo] = FREE
                    pwrite_full(self.map_fd, stretch, lo)
                self.preserved[these] = FREE

    # -- the end ------------------------------------------------------------------
    def close(self) -> None:
        for fd in (self.store_fd, self.map_fd, self.touched_fd):
            if fd < 0:
                continue
            with contextlib.suppress(OSError):
                os.close(fd)

    def drop(self) -> None:
        """The cycle is committed on the secondary: close and remove its files. Not
        synced (it cost the cycle 2-10 ms): after a power loss the directory may be
        back, but made in another boot, so ``open`` discards it."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _write_runs(fd: int, items: np.ndarray, runs: np.ndarray) -> None:
    """Write the items of ``items`` (a map, one item a region) in ``runs`` ((first,
    count) rows) at their places in ``fd``; when they are scattered (more than
    ``MAX_RUN_WRITES`` runs) the whole map in one write."""
    size, raw = items.itemsize, items.view(np.uint8)
    if len(runs) > MAX_RUN_WRITES:
        pwrite_full(fd, raw, 0)
        return
    for first, count in runs.tolist():
        pwrite_full(fd, raw[first * size:(first + count) * size], first * size)


def _whole_us(unix_time: float) -> float:
    """Whole microseconds: what CYCLE_COMMIT carries, so both sides record one value."""
    return round(unix_time * 1e6) / 1e6


def _clear_leftover(volume: Volume) -> Path:
    """Remove what a create cut short left (its temporary directory); return its path."""
    tmp = volume.path / f".{DIR}-creating"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp
