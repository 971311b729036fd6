"""nbdkit Python plugin: maps NBD callbacks onto volume_core.

    nbdkit python nbd_plugin/plugin.py volume=VOL [snapshot=NAME | consistent=1] [listen=WHERE]

Config keys:
  volume=PATH       the volume directory (required)
  snapshot=NAME     serve that snapshot, read-only, instead of the live volume
  consistent=1      serve an async secondary's consistent images, read-only: each
                    connection the newest at its start, held until it hangs up
                    (volume_core.consistent)
  listen=WHERE      how nbdkit was told to listen (unix:PATH or tcp:HOST:PORT); recorded
                    in server.json for `nbdmirror attach`
  durable-marks=0   skip fdatasync of the write-intent map (benchmarks only)
  replicate-to=HOST:PORT mode=sync|semi-async|async [secret-file=F] [tls-ca=A [tls-cert=C
  tls-key=K]] [ack-timeout=SECONDS] [interval=SECONDS] [max-rate=RATE]
                    replicate every write to the secondary there (volume_core.replication);
                    async: in cycles, every interval seconds (0: on request), conveying
                    at most RATE bytes a second (e.g. 100M; no cap unless given)

Once serving, everything the server says on stderr (nbdkit's messages, Python
tracebacks, the log lines below) goes to the export's server.log, timestamped,
rotated and capped (volume_core.server_log; NBDMIRROR_LOG_CAP in the
environment changes the cap). Every failed request is logged with its kind,
offset and length; repeats are throttled there.

Thin on purpose: no tracking, snapshot or replication logic lives here.
The embedding process must have volume_core and numpy on sys.path
(``nbdmirror serve`` sets PYTHONPATH).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import nbdkit

API_VERSION = 2
_KEYS = ("volume", "snapshot", "consistent", "listen", "durable-marks", "replicate-to",
         "mode", "secret-file", "tls-ca", "tls-cert", "tls-key", "ack-timeout", "interval",
         "max-rate")

_FUA = nbdkit.FLAG_FUA
_config: dict[str, str] = {}
_engine = None  # volume_core.engine.Engine, or a SnapshotView for snapshot exports
_images = None  # volume_core.consistent.ConsistentExport: a SnapshotView per connection
_readonly = False  # a snapshot or the consistent images: no writes, no admin socket
_place = None
_admin = None
_log_path: Path | None = None  # absolute: the server may run in another directory
_log_reader = None  # the process writing server.log (subprocess.Popen)
_session = None  # volume_core.replication.session.PrimarySession when replicating
log = logging.getLogger("nbdmirror.plugin")


def _fail(err: BaseException, kind: str, offset: int | None = None,
          length: int | None = None) -> None:
    """Report an error to nbdkit as an errno, and to the log with the request it ended."""
    request = kind if offset is None else f"{kind} of {length} bytes at offset {offset}"
    reason = str(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
    log.error("%s failed: %s", request, reason)
    nbdkit.set_error(getattr(err, "errno", None) or errno.EIO)
    raise err


def _nbdkit_threads() -> int | None:
    """nbdkit's -t (threads per connection), read from its command line, if given."""
    try:
        args = Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(args):
        value = None
        if arg in ("-t", "--threads") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--threads="):
            value = arg.partition("=")[2]
        elif arg.startswith("-t") and arg[2:].isdigit():
            value = arg[2:]
        if value is not None and value.isdigit():
            return int(value)
    return None


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    if key not in _KEYS:
        raise RuntimeError(f"unknown parameter {key!r} (expected one of {', '.join(_KEYS)})")
    _config[key] = value


def config_complete():
    global _readonly
    if "volume" not in _config:
        raise RuntimeError("missing volume=PATH")
    if "consistent" in _config:
        if _config["consistent"] != "1":
            raise RuntimeError("consistent=1 is the only value of consistent")
        if "snapshot" in _config or "replicate-to" in _config:
            raise RuntimeError("consistent=1 takes neither snapshot= nor replication keys")
    _readonly = "snapshot" in _config or "consistent" in _config


def get_ready():
    # Open (and lock) before nbdkit forks into the background, so that a failure is
    # reported to the command that started it.
    global _engine, _images, _place, _log_path, _session
    from volume_core.errors import NbdMirrorError
    from volume_core.server_files import ServerPlace
    from volume_core.volume import Volume

    try:
        volume = Volume.open(_config["volume"])
        if "consistent" in _config:
            from volume_core.consistent import ConsistentExport

            _images = ConsistentExport(volume)
        elif "snapshot" in _config:
            from volume_core.snapshot_view import SnapshotView

            _engine = SnapshotView(volume, _config["snapshot"])
        else:
            from volume_core.engine import Engine
            from volume_core.replication import session

            settings = session.Settings.from_config(_config)
            _engine = Engine(volume, durable_marks=_config.get("durable-marks", "1") != "0")
            if settings is None or settings.mode != session.ASYNC:
                _drop_open_cycle(volume)
            if settings is not None:
                _session = session.replicate(_engine, settings)
        _place = ServerPlace(volume, _config.get("snapshot"), consistent=_images is not None)
    except NbdMirrorError as err:
        raise RuntimeError(str(err)) from None
    _log_path = _place.log_file.absolute()


def after_fork():
    # Threads (and the log's reader process) must start after the fork; server.json
    # (and, for a volume, the admin socket) is the readiness signal.
    global _admin, _log_reader
    from volume_core import server_files, server_log
    from volume_core.replication import memory

    _log_reader = server_log.capture_stderr(_log_path, server_log.cap_from_env())
    if not _readonly:
        from volume_core import operations
        from volume_core.admin import AdminServer

        _admin = AdminServer(server_files.admin_socket(_place.volume),
                             operations.handlers(_engine, _session_ops(),
                                                 listen=_config.get("listen", ""),
                                                 log=str(_log_path),
                                                 replication=_replication_status))
        _admin.start()
    memory.keep_freed_buffers()  # every request's objects come from malloc (python_env)
    memory.keep_stack_chunks()  # every request's thread state: no mmap/munmap
    if _session is not None:
        _session.start()
    _place.write_state({
        "pid": os.getpid(),
        "listen": _config.get("listen", ""),
        "volume": str(_place.volume.path.absolute()),
        "snapshot": _config.get("snapshot"),
        "consistent": _images is not None,
        "uuid": _place.volume.info.uuid,
        "log": str(_log_path),
    })
    threads = _nbdkit_threads()
    log.info("serving %s on %s: pid %d, threads per connection: %s", _what(),
             _config.get("listen") or "?", os.getpid(), threads or "nbdkit's default")


def _drop_open_cycle(volume) -> None:
    """Writes served without async mirroring would not keep an open cycle's image."""
    from volume_core.cycle_freeze import CycleFreeze

    if CycleFreeze.discard(volume):
        log.warning("an async cycle of %s was left open; dropped (not mirroring async): "
                    "its regions stay marked and are sent again", volume.path)


def _replication_status():
    return None if _session is None else _session.status()


def _session_ops() -> dict:
    """Admin operations of the replication session (async: ``cycle-now``)."""
    run_now = getattr(getattr(_session, "replicator", None), "run_now", None)
    return {} if run_now is None else {"cycle-now": run_now}


def _what() -> str:
    return _place.describe(_place.volume.path.absolute())


def cleanup():
    if _session is not None:
        _session.close()
    if _admin is not None:
        _admin.close()
    served = _engine if _images is None else _images
    if served is not None:
        _place.clear_state()
        served.close()
        log.info("stopped serving %s: closed cleanly", _what())
    from volume_core import server_log

    server_log.flush()  # the reader logs what reached the pipe until nbdkit has exited


def open(readonly):
    """The handle every request of the connection reads: the engine or snapshot everyone
    shares, or, for consistent images, the newest at this moment, held until close()."""
    if _images is None:
        return _engine
    from volume_core.errors import NbdMirrorError

    try:
        view = _images.open()
    except NbdMirrorError as err:  # no image yet, a damaged one: the connection is refused
        log.error("a new connection was refused: %s", err)
        raise RuntimeError(str(err)) from None
    log.info("a connection opened consistent image %s", view.name)
    return view


def close(h):
    if h is not _engine:
        log.info("a connection closed consistent image %s", h.name)
        h.close()


def get_size(h):
    return h.size


def can_write(h):
    return not _readonly


def can_flush(h):
    return True


def can_trim(h):
    return not _readonly


def can_zero(h):
    return not _readonly


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    # flush() syncs the whole data file, so a flush on one connection covers all.
    return True


def can_extents(h):
    return not _readonly


def block_size(h):
    return (1, 4096, 32 * 1024 * 1024)


def pread(h, buf, offset, flags):
    try:
        h.pread(buf, offset)
    except Exception as err:
        _fail(err, "pread", offset, len(buf))


def pwrite(h, buf, offset, flags):
    try:
        h.pwrite(buf, offset, flags & _FUA)
    except Exception as err:
        _fail(err, "pwrite", offset, len(buf))


def flush(h, flags):
    if _readonly:
        return
    try:
        h.flush()
    except Exception as err:
        _fail(err, "flush")


def trim(h, count, offset, flags):
    try:
        h.trim(count, offset, flags & nbdkit.FLAG_FUA)
    except Exception as err:
        _fail(err, "trim", offset, count)


def zero(h, count, offset, flags):
    try:
        h.zero(count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM), flags & nbdkit.FLAG_FUA)
    except Exception as err:
        _fail(err, "zero", offset, count)


def extents(h, count, offset, flags):
    try:
        found = h.extents(count, offset)
    except Exception as err:
        _fail(err, "extents", offset, count)
    if flags & nbdkit.FLAG_REQ_ONE:
        return found[:1]
    return found
