"""Native helpers for region maps and bulk range copies.

A *map* is a 1-D C-contiguous numpy uint8 array with one byte per region:
0 = clear, nonzero = marked.

Public API (identical in the C-backed wrappers and in ``twin``):

    count(m) -> int
    count_runs(m) -> int
    scan_runs(m) -> np.ndarray            # int64, shape (k, 2): (start, count)
    merge_or(dst, src) -> None            # dst |= src in place
    copy_runs(src_fd, dst_fd, runs, region_size, limit, *,
              use_copy_file_range=True) -> int
    copy_range(src_fd, dst_fd, offset, end, *,
               use_copy_file_range=True) -> int   # one range, no array
    punch_hole(fd, offset, length) -> None

The implementation is the compiled cffi module ``_regions_c`` (build it with
``python volume_core/native/build.py``).  If it cannot be imported, or
``NBDMIRROR_NATIVE=numpy`` is set, the pure numpy/os ``twin`` is served
instead.  ``NBDMIRROR_NATIVE=c`` makes a missing extension an ImportError.
``IMPLEMENTATION`` says which one is in use ("c" or "numpy"); ``c_backend``
is a namespace of the C-backed functions (None if the extension is missing)
so tests can compare both regardless of the selection.

Bad arguments raise ValueError; system-call failures raise OSError.  The C
functions run without the GIL (cffi API mode releases it around each call),
so callers must not mutate a map from another thread during a call.
"""

from __future__ import annotations

import os
import types

import numpy as np

from . import twin

__all__ = [
    "IMPLEMENTATION",
    "C_IMPORT_ERROR",
    "c_backend",
    "twin",
    "count",
    "count_runs",
    "scan_runs",
    "merge_or",
    "copy_runs",
    "copy_range",
    "punch_hole",
]

try:
    from ._regions_c import ffi as _ffi
    from ._regions_c import lib as _lib
    if not hasattr(_lib, "nbm_copy_range"):  # built before copy_range: stale
        raise ImportError("volume_core.native._regions_c lacks nbm_copy_range (stale build)")
except ImportError as _e:  # not built, or built for another Python/ABI
    _ffi = _lib = None
    C_IMPORT_ERROR: str | None = f"{type(_e).__name__}: {_e}"
else:
    C_IMPORT_ERROR = None


def _raise_errno(rc: int) -> None:
    err = -rc
    raise OSError(err, os.strerror(err))


def _u8(m: np.ndarray):
    # ffi.from_buffer keeps m alive for as long as the returned cdata lives.
    return _ffi.from_buffer("uint8_t[]", m)


def _c_count(m: np.ndarray) -> int:
    """Number of marked (nonzero) regions."""
    m = twin.check_map(m)
    if m.size == 0:
        return 0
    return int(_lib.nbm_count(_u8(m), m.size))


def _c_count_runs(m: np.ndarray) -> int:
    """Number of maximal runs of marked regions."""
    m = twin.check_map(m)
    if m.size == 0:
        return 0
    return int(_lib.nbm_count_runs(_u8(m), m.size))


def _c_scan_runs(m: np.ndarray) -> np.ndarray:
    """(k, 2) int64 array of (start, count) rows, one per maximal marked run."""
    m = twin.check_map(m)
    if m.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    buf = _u8(m)
    # Two passes so the result is allocated at its exact size.  The GIL is
    # released in between, so a map mutated concurrently can hold more runs
    # on the second pass (-ENOSPC): count again and retry.
    for _ in range(8):
        k = int(_lib.nbm_count_runs(buf, m.size))
        out = np.empty((k, 2), dtype=np.int64)
        got = int(_lib.nbm_scan_runs(buf, m.size, _ffi.from_buffer("int64_t[]", out), k))
        if got >= 0:
            return out if got == k else out[:got].copy()
    raise RuntimeError("scan_runs: map kept changing during the scan")


def _c_merge_or(dst: np.ndarray, src: np.ndarray) -> None:
    """dst |= src, bytewise, in place."""
    dst, src = twin.check_merge(dst, src)
    if dst.size:
        _lib.nbm_merge_or(
            _ffi.from_buffer("uint8_t[]", dst, require_writable=True), _u8(src), dst.size
        )


def _c_copy_runs(
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
    src_fd, dst_fd, runs, region_size, limit = twin.check_copy_args(
        src_fd, dst_fd, runs, region_size, limit
    )
    if runs.shape[0] == 0:
        return 0
    rc = int(
        _lib.nbm_copy_runs(
            src_fd,
            dst_fd,
            _ffi.from_buffer("int64_t[]", runs),
            runs.shape[0],
            region_size,
            limit,
            1 if use_copy_file_range else 0,
        )
    )
    if rc < 0:
        _raise_errno(rc)
    return rc


def _c_copy_range(
    src_fd: int, dst_fd: int, offset: int, end: int, *, use_copy_file_range: bool = True
) -> int:
    """Copies bytes [offset, end) from src_fd to dst_fd at the same offset: copy_runs
    for one range, with no array. Bytes past the source's EOF are written as zeros.
    Returns the bytes covered (0 when end <= offset); raises OSError."""
    src_fd, dst_fd, offset, end = twin.check_range_args(src_fd, dst_fd, offset, end)
    rc = int(_lib.nbm_copy_range(src_fd, dst_fd, offset, end, 1 if use_copy_file_range else 0))
    if rc < 0:
        _raise_errno(rc)
    return rc


def _c_punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocates [offset, offset+length), keeping the file size; raises OSError."""
    fd, offset, length = twin.check_punch_args(fd, offset, length)
    rc = int(_lib.nbm_punch_hole(fd, offset, length))
    if rc < 0:
        _raise_errno(rc)


def arena_allocator() -> int | None:
    """The address of arena.c's caching arena allocator (a ``PyObjectArenaAllocator``
    for ``PyObject_SetArenaAllocator``), or None without the extension (no twin:
    Python's own allocator stays)."""
    if _lib is None:
        return None
    return int(_ffi.cast("uintptr_t", _lib.nbm_arena_allocator()))


def arena_counts() -> tuple[int, int] | None:
    """(blocks handed out again, blocks mapped) by that allocator so far; None without
    the extension."""
    if _lib is None:
        return None
    out = _ffi.new("uint64_t[2]")
    _lib.nbm_arena_counts(out, out + 1)
    return int(out[0]), int(out[1])


for _name in twin.__all__:
    _fn = globals()["_c_" + _name]
    _fn.__name__ = _fn.__qualname__ = _name

if _lib is not None:
    c_backend: types.SimpleNamespace | None = types.SimpleNamespace(
        count=_c_count,
        count_runs=_c_count_runs,
        scan_runs=_c_scan_runs,
        merge_or=_c_merge_or,
        copy_runs=_c_copy_runs,
        copy_range=_c_copy_range,
        punch_hole=_c_punch_hole,
    )
else:
    c_backend = None

_choice = os.environ.get("NBDMIRROR_NATIVE", "").strip().lower()
if _choice not in ("", "auto", "c", "numpy"):
    raise ValueError(f"NBDMIRROR_NATIVE must be 'c', 'numpy' or 'auto', got {_choice!r}")
if _choice == "c" and c_backend is None:
    raise ImportError(
        "NBDMIRROR_NATIVE=c but volume_core.native._regions_c is not available "
        f"({C_IMPORT_ERROR}); build it with: python volume_core/native/build.py"
    )

_impl = twin if _choice == "numpy" or c_backend is None else c_backend
IMPLEMENTATION = "numpy" if _impl is twin else "c"

count = _impl.count
count_runs = _impl.count_runs
scan_runs = _impl.scan_runs
merge_or = _impl.merge_or
copy_runs = _impl.copy_runs
copy_range = _impl.copy_range
punch_hole = _impl.punch_hole
