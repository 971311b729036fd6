"""A bare nbdkit Python plugin over one raw file: the ceiling of nbdmirror's architecture.

    nbdkit -U SOCK python scripts/passthrough_plugin.py file=PATH

Same shape as nbd_plugin/plugin.py (API v2, parallel threads, multi-conn,
pread into nbdkit's buffer, pwrite, flush = fdatasync) with nothing else:
no range checks, no write-intent tracking, no counters, no hooks. scripts/bench
compares nbdmirror against it to price the volume_core layer alone, so it runs
with the same process tuning as ``nbdmirror serve``: ``PYTHONMALLOC=malloc``
(the bench's environment), glibc keeping freed memory, and the interpreter's
frame stacks cached (``after_fork``: without it every request maps and unmaps
one, and a plain serve of nbdmirror ran 75% faster than this plugin).
"""

import errno
import os

import nbdkit

API_VERSION = 2

_path = None
_fd = -1
_size = 0


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r} (expected file=PATH)")
    _path = value


def config_complete():
    if _path is None:
        raise RuntimeError("missing file=PATH")


def get_ready():
    global _fd, _size
    _fd = os.open(_path, os.O_RDWR | os.O_CLOEXEC)
    _size = os.fstat(_fd).st_size


def after_fork():
    try:  # (on the bench's PYTHONPATH; elsewhere the plugin runs untuned)
        from volume_core.replication import memory
    except ImportError:
        return
    memory.keep_freed_buffers()
    memory.keep_stack_chunks()


def cleanup():
    if _fd >= 0:
        os.close(_fd)


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    n = os.preadv(_fd, [buf], offset)
    if n != len(buf):
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, f"short read at {offset}")


def pwrite(h, buf, offset, flags):
    n = os.pwrite(_fd, buf, offset)
    if n != len(buf):
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, f"short write at {offset}")


def flush(h, flags):
    os.fdatasync(_fd)
