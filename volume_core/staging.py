"""An async secondary's staging log: the arriving cycle's chunks, kept apart from the volume.

docs/ASYNC.md ("The staging log") has the design. While cycle N+1 arrives,
its chunks are appended to ``VOL/staging/log`` instead of being written over
the volume, which therefore stays the consistent image of cycle N: nothing
has to be copied on write to keep it. The file is reused from cycle to cycle
(its blocks stay allocated, no metadata changes per cycle) and is written
sequentially; an acknowledgement waits for its fdatasync (``sync``).

At CYCLE_COMMIT a COMMIT record is appended and synced: from then on the
cycle is committed here, whatever happens. The records are then applied to
the volume in log order (``records`` / ``read``) and the volume fdatasync'ed;
the receiver records the cycle in ``volume.json``, which is what marks the
log applied: a log whose cycle is not above ``volume.info.cycle`` is stale.
A crash between the COMMIT record and that update leaves a log that ``open``
reports as ``committed``: the receiver applies it again (applying is
idempotent: the same bytes at the same places).

Each record is a 4 KiB header block and, for a write, its data padded to
4 KiB (so every write covers whole pages of the reused file, never read
first). The header has a CRC32C of itself and of the data, the cycle, and an
``epoch`` drawn at random when the log starts a cycle: ``open`` reads records
from the start while they are whole and of one epoch, so a torn tail, or a
longer earlier cycle's records behind a shorter one, end the log. A record
acknowledged was synced with all before it, so none is lost that way. A
WRITEV record (scattered ranges that came as one frame) has its extent table
behind the fixed header, covered by the header's CRC, in as many header
blocks as that takes; its data is the extents' data in order.

The log holds at most ``capacity`` bytes; a cycle that does not fit is
``spill``ed by the receiver: what is staged is applied to the volume the old
way (copied on write into the held image), and the rest of the cycle too.
A spilled or discarded log is made stale durably (``invalidate``): no later
``open`` may apply it over newer writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterator

import crc32c
import numpy as np

from .blockio import pread_full
from .errors import VolumeBusy
from .replication.protocol import MAX_EXTENTS, extents_problem
from .snapshots import try_flock
from .volume import Volume, fsync_dir
from .write_events import TRIM, WRITE, ZERO

DIR = "staging"
LOG = "log"
APPLY_LOCK = "apply.lock"
#: the most a log holds (a cycle bigger than that spills); never more than the volume.
#: Small on purpose: the log is for small cycles' latency (nothing copied on write). A
#: big cycle is throughput-bound: copies on write overlap its arrival, while an apply at
#: the commit holds the cycle up (bench, host writes under back-to-back cycles: 64 MiB
#: and 256 MiB as the old path, 48-49% / 25-31% of a plain serve; 1 GiB 24% / 12%)
CAPACITY = 64 << 20
BLOCK = 4096
#: how long a reader waits for an apply under way (seconds)
APPLY_WAIT = 60.0
MAGIC = b"NBDMSTG1"
# magic, epoch, cycle, kind, may_trim, offset, length, taken_us, data crc, header crc
_HEADER = struct.Struct("<8sQQBB6xQQQII")
_HCRC = struct.Struct("<I")  # the header crc, its last field
_EXTENT = struct.Struct("<QQ")  # a WRITEV record's extent: offset, length
COMMIT = "commit"
WRITEV = "writev"  # (a record kind only: each extent is a WRITE Staged)
_KIND_CODES = {WRITE: 1, ZERO: 2, TRIM: 3, WRITEV: 4, COMMIT: 9}
_KINDS = {v: k for k, v in _KIND_CODES.items()}


def _padded(length: int) -> int:
    return -(-length // BLOCK) * BLOCK


def _head_size(extents: int) -> int:
    """Bytes of a record's header blocks (a WRITEV record's table is in them)."""
    return _padded(_HEADER.size + _EXTENT.size * extents)


@dataclasses.dataclass(frozen=True, slots=True)
class Staged:
    """One staged chunk: what to do to the volume, and where its data is in the log."""

    kind: str  # WRITE, ZERO or TRIM
    offset: int
    length: int
    may_trim: bool
    at: int  # the log offset of its data (WRITE)


@dataclasses.dataclass(frozen=True, slots=True)
class Committed:
    """A log whose cycle was committed (its COMMIT record is durable) but maybe not applied."""

    cycle: int
    taken_us: int


class StagingLog:
    """The log file of one secondary volume (see the module docstring). Thread-safe."""

    def __init__(self, volume: Volume, capacity: int | None = None) -> None:
        self.volume = volume
        self.path = volume.path / DIR
        self.capacity = min(CAPACITY if capacity is None else capacity, max(volume.size, 1 << 20))
        self.lock = threading.Lock()
        self.cycle: int | None = None  # the cycle whose chunks are staged
        self.records: list[Staged] = []
        self.committed: Committed | None = None
        self._epoch = 0
        self._end = 0  # bytes of records written
        self._durable = (0, 0)  # (bytes, records) synced
        self._fd = -1
        self._header = bytearray(BLOCK)
        #: counts failed syncs: a record appended in an earlier generation may be lost
        self.generation = 0

    # -- opening -----------------------------------------------------------
    @classmethod
    def open(cls, volume: Volume, capacity: int | None = None) -> StagingLog:
        """The volume's log as a previous run left it: empty, a cycle staged (and maybe
        committed), or stale (a cycle ``volume.json`` already holds: empty)."""
        log = cls(volume, capacity)
        if (log.path / LOG).exists():
            log._ensure_open()
            try:
                log._load()
            except BaseException:
                log.close()
                raise
        return log

    def prepare(self) -> None:
        """Write the log file whole once (zeros up to its capacity, synced): appends then
        overwrite written blocks, and their fdatasync has no allocation to journal (a
        new secondary's first staged cycle took 80 ms to convey, later ones 30-40).
        OSError on failure (the log works without it)."""
        with self.lock:
            self._ensure_open()
            pos = os.fstat(self._fd).st_size
            if pos >= self.capacity:
                return
            zeros = bytes(min(1 << 20, self.capacity - pos))
            while pos < self.capacity:
                n = min(len(zeros), self.capacity - pos)
                _pwritev_full(self._fd, [zeros[:n]], pos, n)
                pos += n
            os.fdatasync(self._fd)

    def _ensure_open(self) -> None:
        if self._fd < 0:
            new = not self.path.exists()
            self.path.mkdir(exist_ok=True)
            if new:
                fsync_dir(self.volume.path)
            self._fd = os.open(self.path / LOG, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _load(self) -> None:
        pos, epoch, cycle = 0, 0, None
        records: list[Staged] = []
        committed = None
        size = os.fstat(self._fd).st_size
        while pos + BLOCK <= size:
            head = self._read_header(pos)
            if head is None or (epoch and (head[0], head[1]) != (epoch, cycle)):
                break
            its_epoch, its_cycle, kind, may_trim, offset, length, taken_us, dcrc, table = head
            if its_cycle <= self.volume.info.cycle:
                return  # a cycle applied already (what a log holds after a commit): unread
            at = pos + _head_size(len(table))
            if kind in (WRITE, WRITEV) and not self._data_whole(at, length, dcrc, size):
                break
            epoch, cycle = its_epoch, its_cycle
            if kind == COMMIT:
                committed = Committed(cycle, taken_us)
                pos += BLOCK
                break
            if kind == WRITEV:
                records += _extent_records(table, at)
            else:
                records.append(Staged(kind, offset, length, may_trim, at))
            pos = at + (_padded(length) if kind in (WRITE, WRITEV) else 0)
        if cycle is None:
            return  # nothing staged
        self._epoch, self.cycle, self.records, self.committed = epoch, cycle, records, committed
        self._end = pos
        self._durable = (pos, len(records))

    def _read_header(self, pos: int) -> tuple | None:
        """The record header at ``pos`` if it is whole and possible, else None; its last
        item is a WRITEV record's extent table ((offset, length) rows, else empty)."""
        block = bytearray(BLOCK)
        pread_full(self._fd, block, pos)
        magic, epoch, cycle, code, may_trim, offset, length, taken_us, dcrc, hcrc = (
            _HEADER.unpack_from(block))
        if magic != MAGIC:
            return None
        kind = _KINDS.get(code)
        table = np.zeros((0, 2), dtype=np.int64)
        check = crc32c.crc32c(block[:_HEADER.size - 4])
        if kind == WRITEV:  # ``offset`` counts its extents
            if not 0 < offset <= MAX_EXTENTS:
                return None
            if _head_size(offset) > BLOCK:
                block += bytearray(_head_size(offset) - BLOCK)
                pread_full(self._fd, memoryview(block)[BLOCK:], pos + BLOCK)
            rows = block[_HEADER.size:_HEADER.size + _EXTENT.size * offset]
            check = crc32c.crc32c(rows, check)
            raw = np.frombuffer(rows, dtype="<u8").reshape(-1, 2)  # (as int64 it could wrap)
            if (extents_problem(raw, length) is not None
                    or int(raw[-1, 0] + raw[-1, 1]) > self.volume.size):
                return None
            table = raw.astype(np.int64)
        elif offset + length > self.volume.size:
            return None
        if check != hcrc or kind is None or not epoch:
            return None
        return epoch, cycle, kind, bool(may_trim), offset, length, taken_us, dcrc, table

    def _data_whole(self, at: int, length: int, dcrc: int, size: int) -> bool:
        """Whether a WRITE record's data at ``at`` is all in the file and matches its CRC."""
        if at + length > size:
            return False
        data = bytearray(length)
        pread_full(self._fd, data, at)
        return crc32c.crc32c(data) == dcrc

    # -- staging -----------------------------------------------------------
    def begin(self, cycle: int) -> None:
        """Stage chunks of ``cycle`` from now on (the log must be empty or hold that cycle)."""
        with self.lock:
            if self.records and self.cycle != cycle:
                raise ValueError(f"the log holds cycle {self.cycle}, not {cycle}")
            if not self.records:
                self.cycle, self._epoch = cycle, secrets.randbits(63) | 1
                self._end, self._durable, self.committed = 0, (0, 0), None

    def fits(self, length: int, extents: int = 0) -> bool:
        """Whether a chunk of ``length`` bytes (``extents``: a WRITEV record's), and the
        COMMIT record after it, fits."""
        return self._end + _head_size(extents) + BLOCK + _padded(length) <= self.capacity

    def append(self, kind: str, offset: int, length: int, data: memoryview | None,
               may_trim: bool = False) -> int:
        """Write one chunk's record at the end of the log (no sync); -> the generation
        its durability is judged by (``generation``). OSError on failure: then nothing is
        staged of it."""
        if kind == WRITE:
            assert data is not None and len(data) == length
        return self._append(kind, offset, length, data if kind == WRITE else None, may_trim,
                            b"", lambda at: [Staged(kind, offset, length, may_trim, at)])

    def append_extents(self, extents: np.ndarray, data: memoryview) -> int:
        """Write one WRITEV record: scattered ranges (``extents``: (offset, length) rows,
        ascending, not overlapping) and their ``data`` in that order; as ``append``."""
        count = len(extents)
        if not 0 < count <= MAX_EXTENTS or int(extents[:, 1].sum()) != len(data):
            raise ValueError(f"{count} extents for {len(data)} bytes of data")
        return self._append(WRITEV, count, len(data), data, False,
                            np.asarray(extents, dtype="<u8").tobytes(),
                            lambda at: _extent_records(extents, at))

    def _append(self, kind: str, offset: int, length: int, data: memoryview | None,
                may_trim: bool, table: bytes, staged: Callable[[int], list[Staged]]) -> int:
        """Write a record at the end of the log: its header blocks, then ``data`` padded to
        whole blocks; ``staged(where its data starts)`` are its records in memory."""
        with self.lock:
            self._ensure_open()
            if self.cycle is None or self.committed is not None:
                raise ValueError("the staging log takes no chunks now (no cycle begun, or "
                                 "its cycle committed)")
            pos = self._end
            head = self._header_block(kind, offset, length, data, may_trim, table=table)
            parts: list = [head]
            size = len(head)
            if data is not None:
                parts.append(data)
                if length % BLOCK:
                    parts.append(bytes(BLOCK - length % BLOCK))
                size += _padded(length)
            _pwritev_full(self._fd, parts, pos, size)
            self._end = pos + size
            self.records += staged(pos + len(head))
            return self.generation

    def _header_block(self, kind: str, offset: int, length: int, data: memoryview | None,
                      may_trim: bool, taken_us: int = 0, table: bytes = b"") -> bytearray:
        """A record's header blocks: the fixed header, then ``table`` (a WRITEV record's
        extents), under one CRC."""
        block = bytearray(_head_size(len(table) // _EXTENT.size)) if table else self._header
        block[_HEADER.size:_HEADER.size + len(table)] = table
        dcrc = crc32c.crc32c(data) if data is not None else 0
        _HEADER.pack_into(block, 0, MAGIC, self._epoch, self.cycle, _KIND_CODES[kind],
                          may_trim, offset, length, taken_us, dcrc, 0)
        hcrc = crc32c.crc32c(table, crc32c.crc32c(block[:_HEADER.size - 4]))
        _HCRC.pack_into(block, _HEADER.size - 4, hcrc)
        return block

    def sync(self) -> None:
        """fdatasync what was appended; on failure forget what was appended since the last
        good sync (Linux may have dropped those pages) and raise OSError."""
        with self.lock:
            end, count = self._end, len(self.records)
            if self._fd < 0 or (end, count) == self._durable:
                return
            try:
                os.fdatasync(self._fd)
            except OSError:
                self._end, kept = self._durable
                del self.records[kept:]
                self.generation += 1  # whoever answers for those records must know
                raise
            self._durable = (end, count)

    def commit(self, taken_us: int) -> None:
        """Append and sync the COMMIT record: the staged cycle is committed here."""
        with self.lock:
            assert self.cycle is not None and self.committed is None
            _pwritev_full(self._fd, [self._header_block(COMMIT, 0, 0, None, False, taken_us)],
                          self._end, BLOCK)
            os.fdatasync(self._fd)
            self._end += BLOCK
            self._durable = (self._end, len(self.records))
            self.committed = Committed(self.cycle, taken_us)

    # -- reading back ------------------------------------------------------
    def read(self, record: Staged, buf: bytearray) -> memoryview:
        """A WRITE record's data (read into ``buf``, which is big enough)."""
        view = memoryview(buf)[:record.length]
        pread_full(self._fd, view, record.at)
        return view

    def chunks(self) -> Iterator[tuple[Staged, memoryview | None]]:
        """Every record in log order with its data (one buffer, reused: use each at once)."""
        buf = bytearray(max((r.length for r in self.records if r.kind == WRITE), default=0))
        for record in list(self.records):
            yield record, self.read(record, buf) if record.kind == WRITE else None

    @property
    def staged_bytes(self) -> int:
        return sum(r.length for r in self.records)

    # -- ending ------------------------------------------------------------
    def reset(self) -> None:
        """Forget the records (applied, and their cycle recorded in ``volume.json``)."""
        with self.lock:
            self.records, self.cycle, self.committed = [], None, None
            self._end, self._durable = 0, (0, 0)

    def invalidate(self) -> None:
        """Make the log stale durably (its records were applied some other way, or must
        never be): a zero header block where the first record was. OSError on failure."""
        with self.lock:
            if self._fd >= 0:
                _pwritev_full(self._fd, [bytes(BLOCK)], 0, BLOCK)
                os.fdatasync(self._fd)
        self.reset()

    def close(self) -> None:
        with self.lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _extent_records(extents: np.ndarray, at: int) -> list[Staged]:
    """A WRITEV record's extents as WRITE records, their data from ``at`` on in order."""
    records = []
    for offset, length in extents.tolist():
        records.append(Staged(WRITE, offset, length, False, at))
        at += length
    return records


def _pwritev_full(fd: int, parts: list, pos: int, size: int) -> None:
    """Write ``parts`` (``size`` bytes in all) at ``pos``, looping over short writes."""
    done = os.pwritev(fd, parts, pos)
    if done == size:
        return
    flat = memoryview(b"".join(bytes(p) for p in parts))
    while done < size:
        n = os.pwrite(fd, flat[done:], pos + done)
        if n <= 0:
            raise OSError(f"short write to the staging log at {pos + done}")
        done += n


@contextlib.contextmanager
def applying(volume: Volume, shared: bool = False, timeout: float = APPLY_WAIT
             ) -> Iterator[None]:
    """Hold the volume's apply lock: exclusively while a committed log is applied (the
    volume is no consistent image meanwhile), shared while a reader picks its image (it
    waits for an apply under way, ``timeout`` seconds at most: VolumeBusy)."""
    path = volume.path / DIR
    path.mkdir(exist_ok=True)
    fd = os.open(path / APPLY_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not shared:
            fcntl.flock(fd, fcntl.LOCK_EX)
        elif not try_flock(fd, fcntl.LOCK_SH, tries=max(1, int(timeout / 0.005))):
            raise VolumeBusy(f"{volume.path} has been applying a cycle for over "
                             f"{timeout:g}s; try again")
        yield
    finally:
        os.close(fd)
