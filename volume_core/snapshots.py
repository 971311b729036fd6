"""Copy-on-write snapshots, per region.

A snapshot ``VOL/snapshots/NAME/`` holds:

    snapshot.json   name, sequence number, creation time (and ``deleting`` while deleted)
    store.img       a sparse file the size of the volume; a preserved region sits at its
                    own offset
    preserved.map   one byte per region: 1 once the region's old contents are in store.img
    lock            shared-flock()ed while the snapshot is served (delete refuses)

Only the newest snapshot receives copies: the first write to a region after
it was taken copies the region (C bulk copy), syncs the copy, marks it
preserved (synced), and only then lets the live write land. So snapshot S at
region R reads S's copy if it has one, else the next newer snapshot's, and so
on, else the live volume. Deleting S hands the copies its next older
snapshot still needs to that snapshot before S goes away.

``VOL/snapshots/chain.seq`` counts changes to the chain, so a reader in
another process (a snapshot export) notices a snapshot created or deleted
under it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from . import native
from .errors import SnapshotError
from .volume import Volume, fsync_dir, write_json_atomic

INFO = "snapshot.json"
STORE = "store.img"
PRESERVED = "preserved.map"
LOCK = "lock"
CHAIN_SEQ = "chain.seq"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@:+-]{0,99}$")


def validate_name(name: str) -> str:
    if "/" in name or "\\" in name:
        raise SnapshotError(f"invalid snapshot name {name!r}: it must not contain a path separator")
    if not _NAME_RE.match(name):
        raise SnapshotError(f"invalid snapshot name {name!r}: use up to 100 letters, digits and "
                            "._@:+- , not starting with '.' or '-'")
    return name


def default_name() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("snap-%Y%m%d-%H%M%S")


@dataclasses.dataclass
class Snapshot:
    """One snapshot's files, opened."""

    name: str
    seq: int
    created: str
    path: Path
    store_fd: int
    map_fd: int
    preserved: np.ndarray
    #: regions whose copy is under way (only the newest snapshot receives copies)
    copying: np.ndarray = dataclasses.field(default=None)

    @classmethod
    def open(cls, path: Path, regions: int, *, writable: bool, fresh: bool = False) -> Snapshot:
        """Open a snapshot's files; ``fresh`` (just created) skips reading its empty map."""
        info = read_info(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        store_fd = os.open(path / STORE, flags)
        try:
            map_fd = os.open(path / PRESERVED, flags)
        except OSError:
            os.close(store_fd)
            raise
        if fresh:  # calloc'ed lazily: creation costs the same for 1 GiB and 1 TiB
            preserved = np.zeros(regions, dtype=np.uint8)
        else:
            preserved = np.fromfile(path / PRESERVED, dtype=np.uint8, count=regions)
            preserved = (preserved != 0).astype(np.uint8)
        return cls(info["name"], info["seq"], info["created"], path, store_fd, map_fd, preserved,
                   np.zeros(regions, dtype=np.uint8))

    def record_preserved(self, batch: list[np.ndarray]) -> None:
        """Make copied runs durable: store synced, then their map bytes written and synced.

        Only after this may a caller mark them preserved in memory (and let live
        writes to them land)."""
        os.fdatasync(self.store_fd)
        for runs in batch:
            for start, count in runs.tolist():
                os.pwrite(self.map_fd, b"\x01" * count, start)
        os.fdatasync(self.map_fd)

    def close(self) -> None:
        for fd in (self.store_fd, self.map_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def read_info(path: Path) -> dict:
    try:
        info = json.loads((path / INFO).read_text())
        if not isinstance(info, dict) or not {"name", "seq", "created"} <= info.keys():
            raise ValueError("incomplete")
        return info
    except (OSError, ValueError) as err:
        raise SnapshotError(f"{path}: unreadable snapshot description ({err})") from None


def snapshot_dirs(volume: Volume) -> list[tuple[int, Path, dict]]:
    """(seq, path, info) of every snapshot directory, oldest first (deleting ones included)."""
    out = []
    root = volume.snapshot_dir
    for entry in root.iterdir() if root.is_dir() else []:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        with contextlib.suppress(SnapshotError):
            info = read_info(entry)
            out.append((info["seq"], entry, info))
    return sorted(out, key=lambda t: t[0])


def bump_chain_seq(volume: Volume) -> None:
    """Tell readers in other processes that the chain changed."""
    path = volume.snapshot_dir / CHAIN_SEQ
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        raw = os.pread(fd, 8, 0)
        value = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        os.pwrite(fd, (value + 1).to_bytes(8, "little"), 0)
    finally:
        os.close(fd)


def try_flock(fd: int, how: int, tries: int = 20) -> bool:
    """flock without blocking, retrying briefly: another process may hold it for a moment
    just to look (is_served), which must not make a real taker fail."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.005)
    return False


@contextlib.contextmanager
def exclusive(path: Path, what: str, tries: int = 20):
    """Hold a snapshot exclusively (no export may serve it meanwhile)."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not try_flock(fd, fcntl.LOCK_EX, tries):
            raise SnapshotError(f"snapshot {path.name!r} is being served; stop its export before "
                                f"you {what} it")
        yield
    finally:
        os.close(fd)


def is_served(path: Path) -> bool:
    try:
        with exclusive(path, "check", tries=1):
            return False
    except SnapshotError:
        return True
    except OSError:
        return False


class SnapshotChain:
    """The snapshots of a volume, for the one process that holds the volume's lock."""

    def __init__(self, volume: Volume, live_fd: int):
        self.volume = volume
        self.live_fd = live_fd
        self.shift = volume.region_size.bit_length() - 1
        self._cow = threading.Condition()  # claims of regions being copied, the batch
        self._commit_lock = threading.Lock()  # one group commit at a time
        self._batch: list[np.ndarray] = []  # copied runs waiting for their commit
        self._batch_seq = 0
        self._synced_seq = 0
        self.copies = 0  # regions copied on write (for status)
        root = volume.snapshot_dir
        root.mkdir(exist_ok=True)
        for pattern in (".creating-*", ".deleting-*"):  # a create or delete cut short
            for leftover in root.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        self.chain: list[Snapshot] = []
        pending = []
        try:
            for _seq, path, info in snapshot_dirs(volume):
                snap = Snapshot.open(path, volume.regions, writable=True)
                self.chain.append(snap)
                # A SIGKILL between a pwrite and its fdatasync leaves bytes in the page
                # cache that are not on disk: sync before trusting the preserved map.
                os.fdatasync(snap.store_fd)
                os.fdatasync(snap.map_fd)
                if info.get("deleting"):
                    pending.append(snap)
        except BaseException:
            self.close()
            raise
        for snap in pending:  # a delete interrupted by a crash: finish it
            with contextlib.suppress(SnapshotError), exclusive(snap.path, "delete"):
                self._finish_delete(snap)

    @property
    def newest(self) -> Snapshot | None:
        return self.chain[-1] if self.chain else None

    def find(self, name: str) -> Snapshot:
        validate_name(name)
        for snap in self.chain:
            if snap.name == name:
                return snap
        raise SnapshotError(f"no snapshot named {name!r} in {self.volume.path}")

    # -- the write path ------------------------------------------------------
    def preserve(self, offset: int, length: int) -> None:
        """Pre-write hook: copy the regions under the write into the newest snapshot once.

        Concurrent writers copy their own regions in parallel (the C copy runs
        without the GIL) and share the syncs: one thread syncs the store, writes
        the map and syncs it for every copy finished so far (group commit).
        A writer whose regions another writer is copying waits for that copy.
        """
        chain = self.chain
        if not chain:
            return
        snap = chain[-1]
        first = offset >> self.shift
        stop = ((offset + length - 1) >> self.shift) + 1
        if stop - first == 1:
            if snap.preserved[first]:
                return
        elif snap.preserved[first:stop].all():
            return
        while True:
            with self._cow:
                seg = snap.preserved[first:stop]
                if seg.all():
                    return
                busy = snap.copying[first:stop]
                need = (seg == 0) & (busy == 0)
                if not need.any():
                    self._cow.wait()  # others are copying the rest
                    continue
                busy[need] = 1
            runs = native.scan_runs(need.view(np.uint8))
            runs[:, 0] += first
            try:
                native.copy_runs(self.live_fd, snap.store_fd, runs, self.volume.region_size,
                                 self.volume.size)
            except BaseException:
                self._unclaim(snap, [runs])
                raise
            with self._cow:
                self._batch.append(runs)
                self._batch_seq += 1
                seq = self._batch_seq
            self._commit(snap, seq)

    def _commit(self, snap: Snapshot, seq: int) -> None:
        """Make copies up to ``seq`` durable and preserved: store synced, then map synced."""
        with self._commit_lock:
            if self._synced_seq >= seq:
                return
            with self._cow:
                batch, self._batch = self._batch, []
                target = self._batch_seq
            try:
                snap.record_preserved(batch)
            except BaseException:
                self._unclaim(snap, batch)  # their writers will copy again
                raise
            with self._cow:
                for runs in batch:
                    for start, count in runs.tolist():
                        snap.preserved[start:start + count] = 1  # now the live writes may land
                        snap.copying[start:start + count] = 0
                    self.copies += int(runs[:, 1].sum())
                self._synced_seq = target
                self._cow.notify_all()

    def _unclaim(self, snap: Snapshot, batch: list[np.ndarray]) -> None:
        with self._cow:
            for runs in batch:
                for start, count in runs.tolist():
                    snap.copying[start:start + count] = 0
            self._cow.notify_all()

    # -- create / delete -------------------------------------------------------
    def create(self, name: str | None) -> Snapshot:
        """Add a snapshot of the live volume as it is now. The caller quiesces writes."""
        if name is None:
            name = default_name()
            taken = {s.name for s in self.chain}
            base, n = name, 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
        validate_name(name)
        root = self.volume.snapshot_dir
        if (root / name).exists() or any(s.name == name for s in self.chain):
            raise SnapshotError(f"a snapshot named {name!r} already exists")
        seq = max((s.seq for s in self.chain), default=0) + 1
        tmp = root / f".creating-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            with open(tmp / STORE, "wb") as f:
                f.truncate(self.volume.size)
            with open(tmp / PRESERVED, "wb") as f:
                f.truncate(self.volume.regions)
            created = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
            write_json_atomic(tmp / INFO, {"name": name, "seq": seq, "created": created})
            os.fdatasync(self.live_fd)  # the snapshot point is durable, not just visible
            os.rename(tmp, root / name)
            fsync_dir(root)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SnapshotError(f"cannot create snapshot {name!r}: {err.strerror or err}") from None
        try:
            snap = Snapshot.open(root / name, self.volume.regions, writable=True, fresh=True)
            self.chain.append(snap)
            bump_chain_seq(self.volume)
        except OSError as err:
            # Undo, or live writes would land without copy-on-write for a snapshot on disk.
            if self.chain and self.chain[-1].path == root / name:
                self.chain.pop().close()
            shutil.rmtree(root / name, ignore_errors=True)
            raise SnapshotError(f"cannot create snapshot {name!r}: {err.strerror or err}") from None
        return snap

    def delete(self, name: str, quiesce: Callable[[], AbstractContextManager] | None = None
               ) -> None:
        """Remove a snapshot; its copies that the next older snapshot needs move there.

        Only the newest snapshot receives copies, so an older one is deleted while
        writes go on. The newest has its copies moved while writes go on, and only
        the last few (made meanwhile) and its removal happen under ``quiesce()``.
        """
        snap = self.find(name)
        with exclusive(snap.path, "delete"):
            info = read_info(snap.path)
            write_json_atomic(snap.path / INFO, info | {"deleting": True})
            if quiesce is not None and snap is self.chain[-1]:
                self._move_to_older(snap)
                with quiesce():
                    self._finish_delete(snap)
            else:
                self._finish_delete(snap)

    def _move_to_older(self, snap: Snapshot) -> None:
        """Give the next older snapshot the copies of ``snap`` it reads through to."""
        index = self.chain.index(snap)
        if index > 0:
            older = self.chain[index - 1]
            need = (snap.preserved != 0) & (older.preserved == 0)
            runs = native.scan_runs(need.astype(np.uint8))
            if runs.shape[0]:
                native.copy_runs(snap.store_fd, older.store_fd, runs, self.volume.region_size,
                                 self.volume.size)
                older.record_preserved([runs])
                older.preserved[need] = 1

    def _finish_delete(self, snap: Snapshot) -> None:
        self._move_to_older(snap)
        self.chain.remove(snap)
        snap.close()
        # Out of sight in one rename, so a crash inside rmtree leaves no half snapshot.
        gone = self.volume.snapshot_dir / f".deleting-{snap.name}"
        shutil.rmtree(gone, ignore_errors=True)
        os.rename(snap.path, gone)
        fsync_dir(self.volume.snapshot_dir)
        bump_chain_seq(self.volume)
        shutil.rmtree(gone, ignore_errors=True)

    # -- reporting ---------------------------------------------------------------
    def describe(self) -> list[dict]:
        return [describe(self.volume, s.path, s.preserved) for s in self.chain]

    def close(self) -> None:
        for snap in self.chain:
            snap.close()
        self.chain = []


def describe(volume: Volume, path: Path, preserved: np.ndarray | None = None) -> dict:
    info = read_info(path)
    if preserved is None:
        preserved = np.fromfile(path / PRESERVED, dtype=np.uint8, count=volume.regions)
    regions = int(native.count(preserved))
    nbytes = regions * volume.region_size
    if regions and preserved[-1]:
        nbytes -= volume.regions * volume.region_size - volume.size  # the short last region
    return {
        "name": info["name"],
        "seq": info["seq"],
        "created": info["created"],
        "preserved_regions": regions,
        "bytes_preserved": nbytes,
        "allocated_bytes": (path / STORE).stat().st_blocks * 512,
        "served": is_served(path),
    }


def list_offline(volume: Volume) -> list[dict]:
    """Describe the snapshots of a volume without opening it (any process may do this)."""
    return [describe(volume, path) for _seq, path, info in snapshot_dirs(volume)
            if not info.get("deleting")]
