"""nbdkit Python plugin: maps NBD callbacks onto a volume_core.Engine.

    nbdkit python nbd_plugin/plugin.py volume=VOL [listen=unix:PATH|tcp:HOST:PORT]

Config keys:
  volume=PATH       the volume directory (required)
  listen=WHERE      how nbdkit was told to listen; recorded in VOL/server.json
  durable-marks=0   skip fdatasync of the write-intent map (benchmarks only)

Thin on purpose: no tracking, snapshot or replication logic lives here.
The importing process must have volume_core and numpy on sys.path
(``nbdmirror serve`` sets PYTHONPATH).
"""

from __future__ import annotations

import errno
import os

import nbdkit

API_VERSION = 2

_config: dict[str, str] = {}
_engine = None
_admin = None


def _fail(err: BaseException) -> None:
    """Report an error to nbdkit as an errno and one readable line."""
    nbdkit.set_error(getattr(err, "errno", None) or errno.EIO)
    raise err


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    if key not in ("volume", "listen", "durable-marks"):
        raise RuntimeError(f"unknown parameter {key!r} (expected volume=, listen=, durable-marks=)")
    _config[key] = value


def config_complete():
    if "volume" not in _config:
        raise RuntimeError("missing volume=PATH")


def get_ready():
    # Open (and lock) before nbdkit forks into the background, so a failure is
    # reported to the command that started it.
    global _engine
    from volume_core.engine import Engine
    from volume_core.errors import NbdMirrorError
    from volume_core.volume import Volume

    try:
        _engine = Engine(Volume.open(_config["volume"]),
                         durable_marks=_config.get("durable-marks", "1") != "0")
    except NbdMirrorError as err:
        raise RuntimeError(str(err)) from None


def after_fork():
    # Threads must start after the fork; the admin socket is the readiness signal.
    global _admin
    from volume_core import runtime
    from volume_core.admin import AdminServer

    volume = _engine.volume
    _admin = AdminServer(runtime.admin_socket(volume), {"status": _status})
    _admin.start()
    runtime.write_state(volume, {
        "pid": os.getpid(),
        "listen": _config.get("listen", ""),
        "admin": str(runtime.admin_socket(volume).absolute()),
        "volume": str(volume.path.absolute()),
        "uuid": volume.info.uuid,
    })


def _status():
    status = _engine.status()
    status["listen"] = _config.get("listen", "")
    return status


def cleanup():
    from volume_core import runtime

    if _admin is not None:
        _admin.close()
    if _engine is not None:
        runtime.clear_state(_engine.volume)
        _engine.close()


def open(readonly):
    return 1


def get_size(h):
    return _engine.size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    # flush() syncs the whole data file, so a flush on one connection covers all.
    return True


def can_extents(h):
    return True


def block_size(h):
    return (1, 4096, 32 * 1024 * 1024)


def pread(h, buf, offset, flags):
    try:
        _engine.pread(buf, offset)
    except Exception as err:
        _fail(err)


def pwrite(h, buf, offset, flags):
    try:
        _engine.pwrite(buf, offset, flags & nbdkit.FLAG_FUA)
    except Exception as err:
        _fail(err)


def flush(h, flags):
    try:
        _engine.flush()
    except Exception as err:
        _fail(err)


def trim(h, count, offset, flags):
    try:
        _engine.trim(count, offset, flags & nbdkit.FLAG_FUA)
    except Exception as err:
        _fail(err)


def zero(h, count, offset, flags):
    try:
        _engine.zero(count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM), flags & nbdkit.FLAG_FUA)
    except Exception as err:
        _fail(err)


def extents(h, count, offset, flags):
    try:
        found = _engine.extents(count, offset)
    except Exception as err:
        _fail(err)
    if flags & nbdkit.FLAG_REQ_ONE:
        return found[:1]
    return found
