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

from .errors import RangeError, SnapshotError
from .snapshots import (
    CHAIN_SEQ,
    LOCK,
    PRESERVED,
    STORE,
    read_info,
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
        self.key = (path, seq)  # a name reused by a later snapshot is another member
        self.store_fd = os.open(path / STORE, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(path / PRESERVED, "rb") as f:
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
        self.shift = volume.region_size.bit_length() - 1
        path = volume.snapshot_dir / name
        if not (path / STORE).is_file():
            raise SnapshotError(f"no snapshot named {name!r} in {volume.path}")
        self.path = path
        # A shared lock: several exports may serve it, delete must wait for all of them.
        self._lock_fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not try_flock(self._lock_fd, fcntl.LOCK_SH) or read_info(path).get("deleting"):
            os.close(self._lock_fd)
            raise SnapshotError(f"snapshot {name!r} is being deleted")
        self.live_fd = os.open(volume.data_path, os.O_RDONLY | os.O_CLOEXEC)
        with open(volume.snapshot_dir / CHAIN_SEQ, "rb") as f:
            self._seq_mm = mmap.mmap(f.fileno(), 8, prot=mmap.PROT_READ)
        self._seq = np.frombuffer(self._seq_mm, dtype=np.uint64, count=1)
        self.members: list[_Member] = []
        self._loaded_seq = -1
        self._lock = threading.Lock()  # members, _loaded_seq, _readers, _retired
        self._readers = 0
        self._retired: list[_Member] = []
        with self._lock:
            self._reload_locked()

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
                    member = current.get((path, seq))
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
        first = offset >> self.shift
        last = (offset + length - 1) >> self.shift
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
                lo = max(offset, (first + s) << self.shift)
                hi = min(offset + length, (first + e) << self.shift)
                fd = self.live_fd if src[s] == live else members[src[s]].store_fd
                _pread_full(fd, view[lo - offset:hi - offset], lo)
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


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)
            return
        done += n
