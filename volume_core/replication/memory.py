"""Keep freed memory in the process: replication allocates a buffer per frame, and a
served volume's Python objects come from malloc too (``PYTHONMALLOC=malloc``,
``cli.server.python_env``).

Every replicated write passes a payload buffer of up to 32 MiB through
Python (a frame received in place, a copy of a host write). glibc serves
allocations above its mmap threshold (128 KiB at first) with a fresh
``mmap`` and returns them with ``munmap``, so each buffer costs page faults
and zeroed pages, and in a VM where fresh guest pages are slow to get that
was a tenth of the secondary's CPU. Raising the mmap threshold to its
maximum and the trim threshold above it makes glibc keep and reuse that
memory instead (a 32 MiB frame, the largest, still gets its own mapping).
What stays allocated is bounded by what replication holds at once (the
link's window and the secondary's backlog), plus up to the trim threshold
per glibc arena (one per thread that allocates, at most 8 per core).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap kept for reuse rather than given back.
TRIM_THRESHOLD = 128 << 20


def keep_freed_buffers() -> bool:
    """Tune glibc's allocator for many large, short-lived buffers; False where it cannot
    (not glibc), which only costs speed."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("not tuning the allocator: no glibc mallopt")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("not tuning the allocator: mallopt refused")
    return ok
