"""Whole-buffer reads and writes at an offset of a file descriptor; preallocation.

pread/pwrite may move fewer bytes than asked (a signal, a filesystem's
limits); every caller that means "all of it" uses these two, so none of
them forgets the loop. Each first tries one plain call, so the common case
costs a single system call.
"""

from __future__ import annotations

import errno
import os


def pread_full(fd: int, buf, offset: int) -> None:
    """Fill the writable buffer ``buf`` with the bytes at ``offset``.

    Past end of file the rest of ``buf`` is zero-filled: a data file shorter
    than its volume reads as zeros there, like a sparse hole. Raises OSError.
    """
    length = len(buf)
    done = os.preadv(fd, [buf], offset)
    if done < length:
        view = memoryview(buf).cast("B")
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                view[done:] = bytes(length - done)
                return
            done += n


def pwrite_full(fd: int, buf, offset: int) -> None:
    """Write all of ``buf`` at ``offset``, looping over short writes.

    Raises OSError (ENOSPC, EIO, ...); the bytes before the failure may have been
    written, so a caller must treat the whole range as unknown on error.
    """
    length = len(buf)
    done = os.pwrite(fd, buf, offset)
    if done < length:
        view = memoryview(buf).cast("B")
        while done < length:
            n = os.pwrite(fd, view[done:], offset + done)
            if n == 0:  # never seen on a regular file; do not spin on it
                raise OSError(errno.EIO, "write made no progress")
            done += n


def preallocate(fd: int, length: int) -> None:
    """Allocate a map file's blocks now, so that marking a region never meets ENOSPC.

    Best effort (a full or an unusual filesystem may refuse): a failed map write
    is rolled back and reported anyway, this only makes it rarer. Changes
    neither the file's contents nor its size.
    """
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError:
        pass


def next_data(fd: int, offset: int) -> int | None:
    """Where the file's next data at or after ``offset`` starts (SEEK_DATA), or None
    when there is none up to its end. A file system that cannot tell says ``offset``
    (all data). Moves the descriptor's file position: for pread/pwrite users only."""
    return _seek(fd, offset, os.SEEK_DATA, None)


def next_hole(fd: int, offset: int) -> int:
    """Where the file's next hole at or after ``offset`` starts (SEEK_HOLE; its end
    counts as one). A file system that cannot tell says the end; past the end, offset."""
    return _seek(fd, offset, os.SEEK_HOLE, offset)


def hole_end(fd: int, region_size: int, first: int, stop: int) -> int:
    """How far from region ``first`` (at most ``stop``) the file is a hole: regions
    [first, result) hold no data (``first``: region ``first`` holds some)."""
    data = next_data(fd, first * region_size)
    return stop if data is None else max(first, min(stop, data // region_size))


def data_end(fd: int, region_size: int, first: int, stop: int) -> int:
    """Where (at most ``stop``, at least ``first + 1``) the data from region ``first`` on
    gives way to a hole: a read from ``first`` need not go further."""
    hole = next_hole(fd, first * region_size)
    return max(first + 1, min(stop, -(-hole // region_size)))


class Extents:
    """``hole_end`` / ``data_end`` of one file for a pass that moves forward through it,
    remembering how far the last SEEK_HOLE found data: a run of scattered regions inside
    one stretch of data costs no system call each (a 1% delta cycle of 2 GiB: ~1000
    lseeks, 3-8 ms). A hole filled meanwhile only makes it ask again; data punched
    out meanwhile (a trim) is then read as zeros instead of skipped: never wrong."""

    __slots__ = ("fd", "region_size", "_data_from", "_data_to")

    def __init__(self, fd: int, region_size: int) -> None:
        self.fd, self.region_size = fd, region_size
        self._data_from = self._data_to = 0  # bytes [from, to) known to be data

    def known_data(self, first: int) -> bool:
        """Region ``first`` is in the stretch of data the last SEEK_HOLE found."""
        return self._data_from <= first * self.region_size < self._data_to

    def hole_end(self, first: int, stop: int) -> int:
        if self.known_data(first):
            return first
        return hole_end(self.fd, self.region_size, first, stop)

    def data_end(self, first: int, stop: int) -> int:
        rs = self.region_size
        if not self.known_data(first):
            self._data_from = first * rs
            self._data_to = next_hole(self.fd, self._data_from)
        return max(first + 1, min(stop, -(-self._data_to // rs)))


def _seek(fd: int, offset: int, whence: int, past_end: int | None) -> int | None:
    try:
        return os.lseek(fd, offset, whence)
    except OSError as err:
        if err.errno == errno.ENXIO:
            return past_end
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return offset if whence == os.SEEK_DATA else os.fstat(fd).st_size
        raise


#: compared against, a piece at a time (memcmp: stops at the first non-zero byte)
_ZEROS = bytes(1 << 20)


def all_zero(buf) -> bool:
    """True when every byte of ``buf`` (any buffer) is zero.

    ``bytes.startswith`` compares with memcmp and returns at the first
    difference: a chunk of data costs next to nothing, a zero MiB ~30 us
    (``bytearray.count(0)`` takes ~0.9 ms per MiB).
    """
    view = memoryview(buf).cast("B")
    step = len(_ZEROS)
    return all(_ZEROS.startswith(view[lo:lo + step]) for lo in range(0, len(view), step))
