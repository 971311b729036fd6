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

The interpreter's arena allocator is the other half (``keep_stack_chunks``):
nbdkit's plugin makes a Python thread state per request, and with it a
16 KiB stack of frames mapped and unmapped each time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from .. import native

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


def keep_stack_chunks() -> bool:
    """Give the interpreter an arena allocator that keeps a few freed blocks for reuse
    (``native/arena.c``); False without the C helper, which only costs speed.

    nbdkit's Python plugin takes the GIL with ``PyGILState_Ensure`` on its own
    threads, so every request makes a thread state and deletes it; CPython 3.11
    gives each a 16 KiB frame stack from the arena allocator, by default an
    ``mmap`` and ``munmap`` per request (page faults, and a TLB shoot-down of
    every CPU running the process's other threads: the conveyor's, while a
    cycle runs). Safe at any time: the cache maps and unmaps as CPython does."""
    address = native.arena_allocator()
    if address is None:
        log.info("not caching the interpreter's arenas: no C helper")
        return False
    setter = ctypes.pythonapi.PyObject_SetArenaAllocator  # (a PyDLL: the GIL stays held)
    setter.argtypes = (ctypes.c_void_p,)
    setter.restype = None
    setter(address)
    return True
