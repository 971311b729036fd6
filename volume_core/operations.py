"""The operations a volume offers, in one place, whether or not a server holds it.

A running server answers them over its admin socket (``handlers()`` is the
table it serves); with no server, the operations that make sense offline run
here on a locally opened Engine. The CLI asks ``run()`` and never chooses
between the two itself, and never reads a volume's map or snapshot files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import admin, snapshots
from .errors import AdminError, ServerError
from .regions import load_marks
from .server_files import ServerPlace, admin_socket
from .volume import Volume

if TYPE_CHECKING:
    from .engine import Engine

Handler = Callable[..., Any]

#: operations that also run with no server, on an Engine opened for the call
OFFLINE = ("snapshot-create", "snapshot-delete", "snapshot-list")


def handlers(engine: Engine, more: dict[str, Handler] | None = None,
             **status_extra: Any) -> dict[str, Handler]:
    """The operations of an open engine, by name (the admin socket's table); ``more``:
    those of what runs beside it (an async mirror's ``cycle-now``)."""

    def status() -> dict[str, Any]:
        # a callable extra is asked each time (the replication link's state)
        return engine.status() | {key: value() if callable(value) else value
                                  for key, value in status_extra.items()}

    return {
        "status": status,
        "snapshot-create": lambda name=None: engine.create_snapshot(name),
        "snapshot-delete": lambda name: engine.delete_snapshot(name),
        "snapshot-list": lambda: engine.list_snapshots(),
        **(more or {}),
    }


def is_served(volume: Volume) -> bool:
    return ServerPlace(volume).read_state() is not None


def call(volume: Volume, op: str, **args: Any) -> Any:
    """Ask the running server of ``volume``; ServerError when none runs."""
    if not is_served(volume):
        raise ServerError(f"{volume.path} is not being served")
    return admin.call(admin_socket(volume), op, **args)


def run(volume: Volume, op: str, **args: Any) -> Any:
    """Run ``op`` in the running server, or locally when none serves ``volume``."""
    if is_served(volume):
        return admin.call(admin_socket(volume), op, **args)
    if op not in OFFLINE:
        raise ServerError(f"{volume.path} is not being served")
    from .engine import Engine  # the engine imports this module's neighbours, not this one

    engine = Engine(volume)
    try:
        return handlers(engine)[op](**args)
    finally:
        engine.close()


def list_snapshots(volume: Volume) -> list[dict[str, Any]]:
    """The user's snapshots, oldest first; read from their files (any process may)."""
    return snapshots.list_offline(volume)


def describe(volume: Volume) -> dict[str, Any]:
    """What ``info`` shows: the description, marks, allocation, and whether it is served."""
    info = volume.info
    state = ServerPlace(volume).read_state()
    marked = None
    if state is not None:  # the server knows the exact marks; the file may hold whole extents
        try:
            marked = admin.call(admin_socket(volume), "status", timeout=5)["marked_regions"]
        except (ServerError, AdminError):
            marked = None
    if marked is None:
        marked = int(load_marks(volume.marks_path, info.regions).sum())
    return info.to_json() | {
        "path": str(volume.path.absolute()),
        "regions": info.regions,
        "marked_regions": marked,
        "allocated_bytes": volume.data_path.stat().st_blocks * 512,
        "served": state is not None,
        "listen": (state or {}).get("listen"),
    }
