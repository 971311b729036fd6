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
from .blockio import preallocate, pwrite_full
from .errors import SnapshotCorrupt, SnapshotError
from .state_files import CHAIN_SEQ, PRESERVED, STORE, check_chain_seq, snapshot_entries
from .state_files import SNAPSHOT_INFO as INFO
from .state_files import read_snapshot_info as read_info
from .volume import Volume, fsync_dir, write_json_atomic

LOCK = "lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@:+-]{0,99}$")


#: names of nbdmirror's own files among the snapshots (all others start with '.')
RESERVED_NAMES = frozenset({CHAIN_SEQ})
#: async mirroring's consistent images on a secondary: ``cycle-N``, never a user's
CYCLE_PREFIX = "cycle-"


def cycle_name(number: int) -> str:
    """The snapshot that holds a secondary's consistent image of cycle ``number``."""
    return f"{CYCLE_PREFIX}{number}"


def cycle_number(name: str) -> int | None:
    """``cycle_name``'s number, or None for any other name."""
    rest = name[len(CYCLE_PREFIX):] if name.startswith(CYCLE_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def validate_name(name: str) -> str:
    if "/" in name or "\\" in name:
        raise SnapshotError(f"invalid snapshot name {name!r}: it must not contain a path separator")
    if not _NAME_RE.match(name):
        raise SnapshotError(f"invalid snapshot name {name!r}: use up to 100 letters, digits and "
                            "._@:+- , not starting with '.' or '-'")
    if name in RESERVED_NAMES:
        raise SnapshotError(f"invalid snapshot name {name!r}: reserved for nbdmirror's own "
                            "files")
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
            if preserved.size != regions:  # a short map would let writes skip copy-on-write
                os.close(store_fd)
                os.close(map_fd)
                raise SnapshotCorrupt(f"{path / PRESERVED}: {preserved.size} bytes, expected "
                                      f"{regions} (one byte per region)")
            preserved = (preserved != 0).astype(np.uint8)
        return cls(info["name"], info["seq"], info["created"], path, store_fd, map_fd, preserved,
                   np.zeros(regions, dtype=np.uint8))

    def copy_regions(self, live_fd: int, runs: np.ndarray, volume: Volume) -> None:
        """Copy the regions of ``runs`` ((first, count) rows) of the live volume into the
        store, whole, at the same offsets (not yet durable: ``record_preserved``)."""
        native.copy_runs(live_fd, self.store_fd, runs, volume.region_size, volume.size)

    def record_preserved(self, batch: list[np.ndarray]) -> None:
        """Make copied runs durable: store synced, then their map bytes written and synced.

        Only after this may a caller mark them preserved in memory (and let live
        writes to them land)."""
        os.fdatasync(self.store_fd)
        for runs in batch:
            for start, count in runs.tolist():
                pwrite_full(self.map_fd, b"\x01" * count, start)
        os.fdatasync(self.map_fd)

    def close(self) -> None:
        for fd in (self.store_fd, self.map_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def snapshot_dirs(volume: Volume) -> list[tuple[int, Path, dict]]:
    """(seq, path, info) of every snapshot directory, oldest first (deleting ones included).

    Every snapshot's files are checked (state_files): SnapshotCorrupt names a damaged one.
    """
    return snapshot_entries(volume.snapshot_dir, volume.geometry)


def read_chain_seq(volume: Volume) -> int:
    """The chain's change counter (0 when it was never bumped)."""
    path = volume.snapshot_dir / CHAIN_SEQ
    check_chain_seq(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    return int.from_bytes(raw, "little") if len(raw) == 8 else 0


def bump_chain_seq(volume: Volume) -> None:
    """Tell readers in other processes that the chain changed."""
    path = volume.snapshot_dir / CHAIN_SEQ
    check_chain_seq(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        raw = os.pread(fd, 8, 0)
        value = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        pwrite_full(fd, (value + 1).to_bytes(8, "little"), 0)
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


class CowStore:
    """Copy-on-write into a store file: who copies which region, and the group commit.

    A target (a ``Snapshot``, or anything with ``preserved``, ``copying``,
    ``copy_regions`` and ``record_preserved``) needs a copy of a region while its
    ``preserved`` byte is 0; once the copy is durable the byte becomes 1 and the
    live write may land. One CowStore serves one target at a time (the chain
    switches targets only with writes quiesced).
    """

    def __init__(self, volume: Volume, live_fd: int):
        self.volume = volume
        self.live_fd = live_fd
        self.shift = volume.geometry.shift  # cached: preserve() runs on every write
        self._cow = threading.Condition()  # claims of regions being copied, the batch
        self._commit_lock = threading.Lock()  # one group commit at a time
        self._batch: list[np.ndarray] = []  # copied runs waiting for their commit
        self._batch_seq = 0
        self._synced_seq = 0
        self._failures = 0  # failed store/map syncs so far: copies made across one are redone
        self.copies = 0  # regions copied on write (for status)

    @property
    def lock(self) -> threading.Condition:
        """Held while a target's ``preserved`` and ``copying`` bytes change."""
        return self._cow

    def preserve(self, snap: Snapshot, offset: int, length: int) -> None:
        """Copy the regions under a write that ``snap`` does not hold yet into its store,
        durably, before the write may land.

        Concurrent writers copy their own regions in parallel (the C copy runs
        without the GIL) and share the syncs: one thread syncs the store, writes
        the map and syncs it for every copy finished so far (group commit).
        A writer whose regions another writer is copying waits for that copy.
        """
        if length <= 0:  # nothing written: nothing to keep
            return
        shift = self.shift
        first = offset >> shift
        stop = ((offset + length - 1) >> shift) + 1
        if stop - first == 1:
            if snap.preserved[first]:
                return
        elif 0 not in snap.preserved[first:stop].tobytes():  # (numpy's all() costs more)
            return
        self.preserve_spans(snap, [(first, stop)])

    def preserve_spans(self, snap: Snapshot, spans: list[tuple[int, int]]) -> None:
        """``preserve`` for several writes' regions ([first, stop) each) at once: their
        copies share one commit (a single writer about to land many writes)."""
        while True:
            claimed: list[np.ndarray] = []
            waiting = False
            with self._cow:
                for first, stop in spans:
                    seg = snap.preserved[first:stop]
                    if seg.all():
                        continue
                    busy = snap.copying[first:stop]
                    need = (seg == 0) & (busy == 0)
                    if not need.any():
                        waiting = True  # others are copying the rest
                        continue
                    busy[need] = 1
                    runs = native.scan_runs(need.view(np.uint8))
                    runs[:, 0] += first
                    claimed.append(runs)
                if not claimed:
                    if not waiting:
                        return
                    self._cow.wait()
                    continue
                failures = self._failures
            try:
                for runs in claimed:
                    snap.copy_regions(self.live_fd, runs, self.volume)
            except BaseException:
                self._unclaim(snap, claimed)
                raise
            with self._cow:
                if failures != self._failures:
                    # A store sync failed while we copied: our bytes may have been dropped
                    # with its write-back. Copy again (after letting others see the claim go).
                    self._release_claims(snap, claimed)
                    continue
                self._batch.extend(claimed)
                self._batch_seq += 1
                seq = self._batch_seq
            # Returns once our copies are committed, or once a failed sync dropped them (then
            # they are unclaimed, and the loop copies again); then what others were copying.
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
                # A failed fdatasync drops the store's dirty pages: every copy made before
                # it, committed by this batch or queued behind it, must be made again.
                with self._cow:
                    self._failures += 1
                    batch += self._batch
                    self._batch = []
                    self._release_claims(snap, batch)
                raise
            with self._cow:
                for runs in batch:
                    for start, count in runs.tolist():
                        # now the live writes may land; a target's higher "no copy needed"
                        # state set meanwhile (a cycle's FREE) stays
                        seg = snap.preserved[start:start + count]
                        np.maximum(seg, 1, out=seg)
                        snap.copying[start:start + count] = 0
                    self.copies += int(runs[:, 1].sum())
                self._synced_seq = target
                self._cow.notify_all()

    def _unclaim(self, snap: Snapshot, batch: list[np.ndarray]) -> None:
        with self._cow:
            self._release_claims(snap, batch)

    def _release_claims(self, snap: Snapshot, batch: list[np.ndarray]) -> None:
        """Give up claims on copies that were not committed (``_cow`` held)."""
        for runs in batch:
            for start, count in runs.tolist():
                snap.copying[start:start + count] = 0
        self._cow.notify_all()


class SnapshotChain:
    """The snapshots of a volume, for the one process that holds the volume's lock."""

    def __init__(self, volume: Volume, live_fd: int):
        self.volume = volume
        self.live_fd = live_fd
        self.cow = CowStore(volume, live_fd)  # copies into the newest snapshot
        found = snapshot_dirs(volume)  # every file checked before anything is written
        root = volume.snapshot_dir
        root.mkdir(exist_ok=True)
        for pattern in (".creating-*", ".deleting-*"):  # a create or delete cut short
            for leftover in root.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        self.chain: list[Snapshot] = []
        pending = []
        try:
            for _seq, path, info in found:
                snap = Snapshot.open(path, volume.regions, writable=True)
                self.chain.append(snap)
                # A SIGKILL between a pwrite and its fdatasync leaves bytes in the page
                # cache that are not on disk: sync before trusting the preserved map.
                os.fdatasync(snap.store_fd)
                os.fdatasync(snap.map_fd)
                if info.get("deleting"):
                    pending.append(snap)
            for snap in pending:  # a delete interrupted by a crash: finish it
                with contextlib.suppress(SnapshotError), exclusive(snap.path, "delete"):
                    self._finish_delete(snap)
        except BaseException:
            self.close()
            raise

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
        """Pre-write hook: copy the regions under the write into the newest snapshot once."""
        chain = self.chain
        if chain:
            self.cow.preserve(chain[-1], offset, length)

    def preserve_ahead(self, spans: list[tuple[int, int]]) -> None:
        """Copy now, in one commit, what writes about to land in ``spans`` (byte offset,
        length) will need copied: their own ``preserve`` then finds nothing to do."""
        chain = self.chain
        if chain and spans:
            span = self.volume.geometry.span
            self.cow.preserve_spans(chain[-1], [span(off, n) for off, n in spans if n])

    @property
    def copies(self) -> int:
        """Regions copied on write so far (for status)."""
        return self.cow.copies

    # -- create / delete -------------------------------------------------------
    def create(self, name: str | None, internal: bool = False) -> Snapshot:
        """Add a snapshot of the live volume as it is now. The caller quiesces writes.
        ``internal``: one of nbdmirror's own (a ``cycle_name``)."""
        name = self._new_name(name, internal)
        root = self.volume.snapshot_dir
        check_chain_seq(root / CHAIN_SEQ)  # refuse before making anything, not half-way
        # Never reuse a seq, not even a deleted snapshot's: a seq then names one snapshot
        # for good (an export in another process may still hold a deleted one open).
        seq = max(max((s.seq for s in self.chain), default=0), read_chain_seq(self.volume)) + 1
        tmp = root / f".creating-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._make_files(tmp, name, seq)
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
        except (OSError, SnapshotError) as err:
            # Undo, or live writes would land without copy-on-write for a snapshot on disk.
            if self.chain and self.chain[-1].path == root / name:
                self.chain.pop().close()
            self._remove_dir(root / name)
            raise SnapshotError(f"cannot create snapshot {name!r}: "
                                f"{getattr(err, 'strerror', None) or err}") from None
        return snap

    def _new_name(self, name: str | None, internal: bool = False) -> str:
        if name is not None and not internal and name.startswith(CYCLE_PREFIX):
            raise SnapshotError(f"invalid snapshot name {name!r}: names starting with "
                                f"{CYCLE_PREFIX!r} are async mirroring's consistent images")
        if name is None:
            name = default_name()
            taken = {s.name for s in self.chain}
            base, n = name, 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
        validate_name(name)
        if (self.volume.snapshot_dir / name).exists() or any(s.name == name for s in self.chain):
            raise SnapshotError(f"a snapshot named {name!r} already exists")
        return name

    def _make_files(self, tmp: Path, name: str, seq: int) -> None:
        """A complete snapshot directory at ``tmp``, to be renamed into place."""
        tmp.mkdir()
        with open(tmp / STORE, "wb") as f:
            f.truncate(self.volume.size)
        with open(tmp / PRESERVED, "wb") as f:
            f.truncate(self.volume.regions)
            preallocate(f.fileno(), self.volume.regions)  # copies then never fail to record
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
        write_json_atomic(tmp / INFO, {"name": name, "seq": seq, "created": created})

    def _remove_dir(self, path: Path) -> None:
        """Remove a snapshot directory out of sight first: a crash inside rmtree leaves no
        half snapshot (its hidden remains are removed by the next open)."""
        gone = self.volume.snapshot_dir / f".deleting-{path.name}"
        shutil.rmtree(gone, ignore_errors=True)
        try:
            os.rename(path, gone)
        except OSError:
            gone = path
        shutil.rmtree(gone, ignore_errors=True)

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
        # Out of sight in one rename, so a crash inside rmtree leaves no half snapshot; and
        # the chain in memory changes only once the disk did (a failed rename keeps both).
        gone = self.volume.snapshot_dir / f".deleting-{snap.name}"
        shutil.rmtree(gone, ignore_errors=True)
        os.rename(snap.path, gone)
        self.chain.remove(snap)
        snap.close()
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
    """What ``snapshot list`` shows of the snapshot at ``path`` (checked by the caller)."""
    info = read_info(path)
    if preserved is None:
        preserved = np.fromfile(path / PRESERVED, dtype=np.uint8, count=volume.regions)
    regions = int(native.count(preserved))
    nbytes = volume.geometry.bytes_in(regions, bool(regions and preserved[-1]))
    return {
        "name": info["name"],
        "seq": info["seq"],
        "created": info["created"],
        "preserved_regions": regions,
        "bytes_preserved": nbytes,
        "allocated_bytes": (path / STORE).stat().st_blocks * 512,
        "served": is_served(path),
        "internal": cycle_number(info["name"]) is not None,
    }


def list_offline(volume: Volume) -> list[dict]:
    """Describe the snapshots of a volume without opening it (any process may do this)."""
    return [describe(volume, path) for _seq, path, info in snapshot_dirs(volume)
            if not info.get("deleting")]
