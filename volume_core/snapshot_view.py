"""A read-only view of one snapshot, for a snapshot export.

It may run in another process than the live server, while the live volume
takes writes. A read decides, per region, where the snapshot's bytes are:
the snapshot's own copy, else the next newer snapshot's, ..., else the live
volume. The preserved maps are mmap()ed, so copies made by the live server
are seen at once. Because a region is marked preserved before the live write
to it lands, a read that took bytes from the live volume checks afterwards
that none of those regions became preserved meanwhile (and that the chain did
not change); if one did, it reads again.

nbdkit calls it from many threads: a chain change swaps in a new member list
under a lock, and members that left the chain are closed only once no read
is in flight (a read may still be using their file descriptors).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from .blockio import pread_full
from .errors import RangeError, SnapshotCorrupt, SnapshotError
from .snapshots import (
    CHAIN_SEQ,
    LOCK,
    PRESERVED,
    STORE,
    snapshot_dirs,
    try_flock,
    validate_name,
)
from .volume import Volume

_MAX_RETRIES = 1000


class _Member:
    """One snapshot of the chain as the view sees it: its store and its mapped map."""

    def __init__(self, path: Path, seq: int, regions: int):
        self.path = path
        self.store_fd = os.open(path / STORE, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # A name and seq reused by a later snapshot make another member: the store's
            # inode tells them apart (this one stays allocated while we hold it open).
            self.key = (path, seq, os.fstat(self.store_fd).st_ino)
            with open(path / PRESERVED, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != regions:
                    raise SnapshotCorrupt(f"{path / PRESERVED}: {size} bytes, expected "
                                          f"{regions} (one byte per region)")
                self._mm = mmap.mmap(f.fileno(), regions, prot=mmap.PROT_READ)
        except BaseException:
            os.close(self.store_fd)
            raise
        self.preserved = np.frombuffer(self._mm, dtype=np.uint8, count=regions)

    def close(self) -> None:
        self.preserved = None
        with contextlib.suppress(BufferError):
            self._mm.close()
        os.close(self.store_fd)


class SnapshotView:
    """Reads snapshot ``name`` of ``volume`` as it was at its creation."""

    def __init__(self, volume: Volume, name: str):
        validate_name(name)
        self.volume = volume
        self.name = name
        self.size = volume.size
        self.shift = volume.geometry.shift
        path = volume.snapshot_dir / name
        # Check the whole chain before touching anything (the lock file is created here).
        found = {p.name: info for _seq, p, info in snapshot_dirs(volume)}
        if name not in found:
            raise SnapshotError(f"no snapshot named {name!r} in {volume.path}")
        self.path = path
        # A shared lock: several exports may serve it, delete must wait for all of them.
        try:
            self._lock_fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # deleted since we looked
            raise SnapshotError(f"no snapshot named {name!r} in {volume.path}") from None
        if not try_flock(self._lock_fd, fcntl.LOCK_SH) or found[name].get("deleting"):
            os.close(self._lock_fd)
            raise SnapshotError(f"snapshot {name!r} is being deleted")
        try:
            self.live_fd = os.open(volume.data_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._seq_mm = _map_chain_seq(volume.snapshot_dir / CHAIN_SEQ)
            except BaseException:
                os.close(self.live_fd)
                raise
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._seq = np.frombuffer(self._seq_mm, dtype=np.uint64, count=1)
        self.members: list[_Member] = []
        self._loaded_seq = -1
        self._lock = threading.Lock()  # members, _loaded_seq, _readers, _retired
        self._readers = 0
        self._retired: list[_Member] = []
        try:
            with self._lock:
                self._reload_locked()  # "no longer exists" if deleted before we held it
        except BaseException:
            self.close()
            raise

    def _reload_locked(self) -> None:
        """Load the chain as it is now (lock held); keep members still in it open."""
        for _ in range(_MAX_RETRIES):
            seq = int(self._seq[0])
            try:
                members = self._open_chain()
            except FileNotFoundError:
                continue  # a snapshot vanished while we looked: look again
            kept = {id(m) for m in members}
            self._retired += [m for m in self.members if id(m) not in kept]
            self.members = members
            self._loaded_seq = seq
            if not self._readers:
                self._close_retired()
            return
        raise SnapshotError(f"the snapshot chain of {self.volume.path} keeps changing")

    def _close_retired(self) -> None:
        for m in self._retired:
            m.close()
        self._retired = []

    def _open_chain(self) -> list[_Member]:
        found = snapshot_dirs(self.volume)
        mine = [seq for seq, path, _ in found if path.name == self.name]
        if not mine:
            raise SnapshotError(f"snapshot {self.name!r} no longer exists")
        current = {m.key: m for m in self.members}
        members, opened = [], []
        try:
            for seq, path, _ in found:
                if seq >= mine[0]:
                    member = current.get((path, seq, os.stat(path / STORE).st_ino))
                    if member is None:
                        member = _Member(path, seq, self.volume.regions)
                        opened.append(member)
                    members.append(member)
        except BaseException:
            for m in opened:
                m.close()
            raise
        return members

    def pread(self, buf, offset: int) -> None:
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise RangeError(f"request of {length} bytes at offset {offset} reaches past the end "
                             f"of the snapshot ({self.size} bytes)")
        if length == 0:
            return
        with self._lock:
            self._readers += 1
        try:
            self._read(memoryview(buf), offset, length)
        finally:
            with self._lock:
                self._readers -= 1
                if not self._readers and self._retired:
                    self._close_retired()

    def _read(self, view: memoryview, offset: int, length: int) -> None:
        shift = self.shift
        first = offset >> shift
        last = (offset + length - 1) >> shift
        for _ in range(_MAX_RETRIES):
            with self._lock:
                if int(self._seq[0]) != self._loaded_seq:
                    self._reload_locked()
                members, loaded = self.members, self._loaded_seq
            # source index per region: the oldest member (from this snapshot on) holding a
            # copy; len(members) means the live volume
            live = len(members)
            src = np.full(last + 1 - first, live, dtype=np.int32)
            for i in range(len(members) - 1, -1, -1):
                src[members[i].preserved[first:last + 1] != 0] = i
            edges = np.flatnonzero(np.diff(src)) + 1
            starts = np.concatenate(([0], edges))
            stops = np.concatenate((edges, [src.size]))
            for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
                lo = max(offset, (first + s) << shift)
                hi = min(offset + length, (first + e) << shift)
                fd = self.live_fd if src[s] == live else members[src[s]].store_fd
                pread_full(fd, view[lo - offset:hi - offset], lo)
            from_live = src == live
            if not from_live.any():
                return
            if int(self._seq[0]) == loaded and not any(
                    (m.preserved[first:last + 1][from_live] != 0).any() for m in members):
                return
        raise SnapshotError("reads of the snapshot keep racing with live writes")

    def close(self) -> None:
        for m in self.members + self._retired:
            m.close()
        self.members = []
        self._retired = []
        self._seq = None
        with contextlib.suppress(BufferError):
            self._seq_mm.close()
        os.close(self.live_fd)
        os.close(self._lock_fd)


def _map_chain_seq(path: Path) -> mmap.mmap:
    """Map the chain's change counter, giving it its 8 bytes if it has none yet.

    Absent or empty is a valid state (a crash while the live server first made
    it). Extending it is safe against that server, whose first write makes it 8
    bytes anyway: ftruncate to the size it already has changes nothing.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            with open(path, "r+b") as f:
                os.ftruncate(f.fileno(), 8)
        elif size != 8:
            raise SnapshotCorrupt(f"{path}: {size} bytes, expected 8 (a change counter)")
        return mmap.mmap(fd, 8, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
