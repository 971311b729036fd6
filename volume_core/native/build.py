"""cffi builder for volume_core.native._regions_c (API mode, out-of-line).

Used two ways:

* by setuptools, through ``cffi_modules=["volume_core/native/build.py:ffibuilder"]``
  in setup.py (cffi execs this file with ``__file__`` set to that path);
* by hand, ``python volume_core/native/build.py``, which compiles in place so
  the extension lands next to this file as ``_regions_c*.so`` whatever the
  current directory is.

The C sources, regions.c and arena.c, live next to this file and are located
through ``__file__``, never through the current directory.
"""

from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
# volume_core/native/build.py -> the directory that holds volume_core/.
ROOT = HERE.parent.parent
MODULE = "volume_core.native._regions_c"

CDEF = """
int64_t nbm_count(const uint8_t *m, size_t n);
int64_t nbm_count_runs(const uint8_t *m, size_t n);
int64_t nbm_scan_runs(const uint8_t *m, size_t n, int64_t *out, size_t cap);
void nbm_merge_or(uint8_t *dst, const uint8_t *src, size_t n);
int64_t nbm_copy_runs(int src_fd, int dst_fd, const int64_t *runs, size_t nruns,
                      int64_t region_size, int64_t limit, int use_cfr);
int64_t nbm_copy_range(int src_fd, int dst_fd, int64_t offset, int64_t end, int use_cfr);
int nbm_punch_hole(int fd, int64_t offset, int64_t length);
void *nbm_arena_allocator(void);
void nbm_arena_counts(uint64_t *reused, uint64_t *mapped);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
# API mode: cffi wraps each call in Py_BEGIN_ALLOW_THREADS/Py_END_ALLOW_THREADS
# (see the generated _regions_c.c), so the GIL is released while C runs.
ffibuilder.set_source(
    MODULE,
    # arena.c: a cache for the interpreter's arena allocator (memory.keep_stack_chunks)
    "\n".join((HERE / name).read_text(encoding="utf-8") for name in ("regions.c", "arena.c")),
    extra_compile_args=["-O2", "-std=gnu11"],
)


def build_in_place() -> str:
    """Compile into the source tree; returns the path of the built extension.

    With tmpdir=ROOT, cffi turns the dotted module name into
    ROOT/volume_core/native/_regions_c.{c,o,*.so}; the .c/.o intermediates are
    git-ignored.
    """
    return ffibuilder.compile(tmpdir=str(ROOT), verbose=False)


if __name__ == "__main__":
    print(build_in_place())
