"""Pure numpy/os reference implementation of volume_core.native.

Same functions and signatures as the C-backed facade, written for clarity
rather than speed.  It is served when the C extension is not built (or when
NBDMIRROR_NATIVE=numpy), and the tests hold the two against each other.

The input checks (``check_map`` etc.) live here so that the facade and the
twin reject exactly the same inputs with exactly the same messages.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import operator
import os

import numpy as np

__all__ = [
    "count",
    "count_runs",
    "scan_runs",
    "merge_or",
    "copy_runs",
    "copy_range",
    "punch_hole",
]

# Errors meaning "copy_file_range can't handle these two files", after which
# we fall back to pread/pwrite for good.  A genuinely bad fd (EBADF) fails
# again in pread/pwrite and is reported from there; an O_APPEND destination
# is refused before (_Copier.copy_range).  Keep in step with
# nbm_cfr_unsupported() and nbm_check_dst() in regions.c.
CFR_FALLBACK_ERRNOS = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
)
BUF_SIZE = 1 << 20
_CFR_CHUNK = 1 << 30
_INT64_MAX = (1 << 63) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1


def _check_fd(fd: int, name: str) -> int:
    # Any value a C int can hold is passed on; the kernel judges validity
    # (a closed or negative fd fails with OSError(EBADF), not ValueError).
    if not _INT_MIN <= fd <= _INT_MAX:
        raise ValueError(f"{name} out of range for a file descriptor: {fd}")
    return fd


# ---- input checks (shared with the facade) --------------------------------


def check_map(m: object, name: str = "map", *, writable: bool = False) -> np.ndarray:
    """Returns m if it is a 1-D C-contiguous uint8 ndarray, else ValueError."""
    if not isinstance(m, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(m).__name__}")
    if m.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {m.dtype}")
    if m.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {m.shape}")
    if not m.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not m.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return m


def check_merge(dst: object, src: object) -> tuple[np.ndarray, np.ndarray]:
    d = check_map(dst, "dst", writable=True)
    s = check_map(src, "src")
    if d.shape != s.shape:
        raise ValueError(f"dst and src shapes differ: {d.shape} != {s.shape}")
    return d, s


def check_copy_args(
    src_fd: object, dst_fd: object, runs: object, region_size: object, limit: object
) -> tuple[int, int, np.ndarray, int, int]:
    """Validates copy_runs arguments; returns them normalized (runs C-contiguous)."""
    try:
        src_fd = operator.index(src_fd)
        dst_fd = operator.index(dst_fd)
        region_size = operator.index(region_size)
        limit = operator.index(limit)
    except TypeError as e:
        raise ValueError(f"fds, region_size and limit must be integers: {e}") from None
    _check_fd(src_fd, "src_fd")
    _check_fd(dst_fd, "dst_fd")
    if not isinstance(runs, np.ndarray):
        raise ValueError(f"runs must be a numpy.ndarray, got {type(runs).__name__}")
    if runs.dtype != np.int64:
        raise ValueError(f"runs must have dtype int64, got {runs.dtype}")
    if runs.ndim != 2 or runs.shape[1] != 2:
        raise ValueError(f"runs must have shape (k, 2), got {runs.shape}")
    if not 0 < region_size <= _INT64_MAX:
        raise ValueError(f"region_size must be > 0, got {region_size}")
    if not 0 <= limit <= _INT64_MAX:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if runs.size and (runs < 0).any():
        raise ValueError("runs must hold non-negative (start, count) pairs")
    # (start + count) * region_size must fit in int64; written so that no
    # intermediate can overflow.
    max_regions = _INT64_MAX // region_size
    if runs.size and (runs[:, 0] > max_regions - runs[:, 1]).any():
        raise ValueError("a run's byte range does not fit in int64")
    return src_fd, dst_fd, np.ascontiguousarray(runs), region_size, limit


def check_range_args(
    src_fd: object, dst_fd: object, offset: object, end: object
) -> tuple[int, int, int, int]:
    """Validates copy_range arguments; returns them as ints."""
    try:
        src_fd, dst_fd = operator.index(src_fd), operator.index(dst_fd)
        offset, end = operator.index(offset), operator.index(end)
    except TypeError as e:
        raise ValueError(f"fds, offset and end must be integers: {e}") from None
    _check_fd(src_fd, "src_fd")
    _check_fd(dst_fd, "dst_fd")
    if not 0 <= offset <= _INT64_MAX or not 0 <= end <= _INT64_MAX:
        raise ValueError(f"offset and end must be in [0, 2**63), got {offset}, {end}")
    return src_fd, dst_fd, offset, end


def check_punch_args(fd: object, offset: object, length: object) -> tuple[int, int, int]:
    try:
        fd = operator.index(fd)
        offset = operator.index(offset)
        length = operator.index(length)
    except TypeError as e:
        raise ValueError(f"fd, offset and length must be integers: {e}") from None
    _check_fd(fd, "fd")
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
    if offset + length > _INT64_MAX:
        raise ValueError("offset + length does not fit in int64")
    return fd, offset, length


# ---- maps -------------------------------------------------------------------


def count(m: np.ndarray) -> int:
    """Number of marked (nonzero) regions."""
    return int(np.count_nonzero(check_map(m)))


def count_runs(m: np.ndarray) -> int:
    """Number of maximal runs of marked regions."""
    b = check_map(m) != 0
    if b.size == 0:
        return 0
    # A run starts at each marked byte whose predecessor is clear.
    return int(b[0]) + int(np.count_nonzero(b[1:] & ~b[:-1]))


def scan_runs(m: np.ndarray) -> np.ndarray:
    """(k, 2) int64 array of (start, count) rows, one per maximal marked run."""
    b = check_map(m) != 0
    # Pad with a clear region on each side so every run has both edges.
    edges = np.diff(b.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    out = np.empty((starts.size, 2), dtype=np.int64)
    out[:, 0] = starts
    out[:, 1] = ends - starts
    return out


def merge_or(dst: np.ndarray, src: np.ndarray) -> None:
    """dst |= src, bytewise, in place."""
    d, s = check_merge(dst, src)
    np.bitwise_or(d, s, out=d)


# ---- copying ------------------------------------------------------------------


def _pwrite_all(fd: int, data: bytes | memoryview, off: int) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, off)
        except InterruptedError:
            continue
        if n == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]
        off += n


def _zero_fill(fd: int, pos: int, end: int) -> None:
    zeros = bytes(min(BUF_SIZE, end - pos))
    while pos < end:
        n = min(len(zeros), end - pos)
        _pwrite_all(fd, memoryview(zeros)[:n], pos)
        pos += n


class _Copier:
    def __init__(self, src_fd: int, dst_fd: int, use_cfr: bool) -> None:
        self.src = src_fd
        self.dst = dst_fd
        self.use_cfr = use_cfr
        self.dst_checked = False

    def _check_dst(self) -> None:
        """Refuse an O_APPEND destination (EBADF, as copy_file_range does) before any
        byte moves: pwrite on it ignores the offset and appends."""
        if not self.dst_checked:
            if fcntl.fcntl(self.dst, fcntl.F_GETFL) & os.O_APPEND:
                raise OSError(errno.EBADF, "destination is open for appending")
            self.dst_checked = True

    def copy_range(self, pos: int, end: int) -> None:
        self._check_dst()
        while self.use_cfr and pos < end:
            want = min(end - pos, _CFR_CHUNK)
            try:
                n = os.copy_file_range(self.src, self.dst, want, pos, pos)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno not in CFR_FALLBACK_ERRNOS:
                    raise
                self.use_cfr = False
                break
            if n == 0:
                # EOF, or a file copy_file_range silently can't handle:
                # pread below copies the rest or sees the real EOF.
                break
            pos += n
        while pos < end:
            try:
                data = os.pread(self.src, min(end - pos, BUF_SIZE), pos)
            except InterruptedError:
                continue
            if not data:
                _zero_fill(self.dst, pos, end)
                return
            _pwrite_all(self.dst, data, pos)
            pos += len(data)


def copy_runs(
    src_fd: int,
    dst_fd: int,
    runs: np.ndarray,
    region_size: int,
    limit: int,
    *,
    use_copy_file_range: bool = True,
) -> int:
    """Copies each run's bytes from src_fd to dst_fd at the same offset.

    Row (start, count) covers [start*region_size, min((start+count)*region_size,
    limit)).  Bytes past the source's EOF are written as zeros.  File positions
    are never used.  Returns the total number of bytes covered; raises OSError.
    """
    src_fd, dst_fd, runs, region_size, limit = check_copy_args(
        src_fd, dst_fd, runs, region_size, limit
    )
    copier = _Copier(src_fd, dst_fd, bool(use_copy_file_range))
    total = 0
    for start, cnt in runs.tolist():
        off = start * region_size
        end = min((start + cnt) * region_size, limit)
        if off >= end:
            continue
        copier.copy_range(off, end)
        total += end - off
    return total


def copy_range(
    src_fd: int, dst_fd: int, offset: int, end: int, *, use_copy_file_range: bool = True
) -> int:
    """Copies bytes [offset, end) from src_fd to dst_fd at the same offset: copy_runs
    for one range, with no array. Bytes past the source's EOF are written as zeros.
    Returns the bytes covered (0 when end <= offset); raises OSError."""
    src_fd, dst_fd, offset, end = check_range_args(src_fd, dst_fd, offset, end)
    if end <= offset:
        return 0
    _Copier(src_fd, dst_fd, bool(use_copy_file_range)).copy_range(offset, end)
    return end - offset


# ---- hole punching ------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_fallocate = None


def _libc_fallocate():
    global _fallocate
    if _fallocate is None:
        libc = ctypes.CDLL(None, use_errno=True)
        # fallocate64 takes a 64-bit off_t even on 32-bit builds.
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _fallocate = fn
    return _fallocate


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocates [offset, offset+length), keeping the file size; raises OSError."""
    fd, offset, length = check_punch_args(fd, offset, length)
    if length == 0:
        return
    fn = _libc_fallocate()
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    while fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))
