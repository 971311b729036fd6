"""nbdkit Python plugin: maps NBD callbacks onto volume_core.

    nbdkit python nbd_plugin/plugin.py volume=VOL [snapshot=NAME] [listen=WHERE]

Config keys:
  volume=PATH       the volume directory (required)
  snapshot=NAME     serve that snapshot, read-only, instead of the live volume
  listen=WHERE      how nbdkit was told to listen (unix:PATH or tcp:HOST:PORT); recorded
                    in server.json for `nbdmirror attach`
  durable-marks=0   skip fdatasync of the write-intent map (benchmarks only)

Thin on purpose: no tracking, snapshot or replication logic lives here.
The embedding process must have volume_core and numpy on sys.path
(``nbdmirror serve`` sets PYTHONPATH).
"""

from __future__ import annotations

import errno
import os

import nbdkit

API_VERSION = 2
_KEYS = ("volume", "snapshot", "listen", "durable-marks")

_FUA = nbdkit.FLAG_FUA
_config: dict[str, str] = {}
_engine = None  # volume_core.engine.Engine, or a SnapshotView for snapshot exports
_pread = _pwrite = None  # bound methods of _engine: one lookup less per request
_place = None
_admin = None


def _fail(err: BaseException) -> None:
    """Report an error to nbdkit as an errno and one readable line."""
    nbdkit.set_error(getattr(err, "errno", None) or errno.EIO)
    raise err


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    if key not in _KEYS:
        raise RuntimeError(f"unknown parameter {key!r} (expected one of {', '.join(_KEYS)})")
    _config[key] = value


def config_complete():
    if "volume" not in _config:
        raise RuntimeError("missing volume=PATH")


def get_ready():
    # Open (and lock) before nbdkit forks into the background, so that a failure is
    # reported to the command that started it.
    global _engine, _place, _pread, _pwrite
    from volume_core.errors import NbdMirrorError
    from volume_core.server_files import ServerPlace
    from volume_core.volume import Volume

    try:
        volume = Volume.open(_config["volume"])
        if "snapshot" in _config:
            from volume_core.snapshot_view import SnapshotView

            _engine = SnapshotView(volume, _config["snapshot"])
        else:
            from volume_core.engine import Engine

            _engine = Engine(volume, durable_marks=_config.get("durable-marks", "1") != "0")
        _place = ServerPlace(volume, _config.get("snapshot"))
    except NbdMirrorError as err:
        raise RuntimeError(str(err)) from None
    _pread = _engine.pread
    _pwrite = getattr(_engine, "pwrite", None)


def after_fork():
    # Threads must start after the fork; server.json (and, for a volume, the admin
    # socket) is the readiness signal.
    global _admin
    from volume_core import server_files

    if "snapshot" not in _config:
        from volume_core import operations
        from volume_core.admin import AdminServer

        _admin = AdminServer(server_files.admin_socket(_place.volume),
                             operations.handlers(_engine, listen=_config.get("listen", "")))
        _admin.start()
    _place.write_state({
        "pid": os.getpid(),
        "listen": _config.get("listen", ""),
        "volume": str(_place.volume.path.absolute()),
        "snapshot": _config.get("snapshot"),
        "uuid": _place.volume.info.uuid,
    })


def cleanup():
    if _admin is not None:
        _admin.close()
    if _engine is not None:
        _place.clear_state()
        _engine.close()


def open(readonly):
    return 1


def get_size(h):
    return _engine.size


def can_write(h):
    return "snapshot" not in _config


def can_flush(h):
    return True


def can_trim(h):
    return "snapshot" not in _config


def can_zero(h):
    return "snapshot" not in _config


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    # flush() syncs the whole data file, so a flush on one connection covers all.
    return True


def can_extents(h):
    return "snapshot" not in _config


def block_size(h):
    return (1, 4096, 32 * 1024 * 1024)


def pread(h, buf, offset, flags):
    try:
        _pread(buf, offset)
    except Exception as err:
        _fail(err)


def pwrite(h, buf, offset, flags):
    try:
        _pwrite(buf, offset, flags & _FUA)
    except Exception as err:
        _fail(err)


def flush(h, flags):
    if "snapshot" in _config:
        return
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
