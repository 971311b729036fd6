"""Where a served volume keeps its runtime files, and whether a server is running.

A server writes ``server.json`` once it accepts connections; it is only
believed while the volume's lock is held (a SIGKILLed server leaves a stale
file and a free lock).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from .volume import Volume, write_json_atomic

PID_FILE = "nbdkit.pid"
STATE_FILE = "server.json"
LOG_FILE = "server.log"
ADMIN_SOCKET = "admin.sock"
NBD_SOCKET = "nbd.sock"


def admin_socket(volume: Volume) -> Path:
    return volume.path / ADMIN_SOCKET


def default_nbd_socket(volume: Volume) -> Path:
    return volume.path.absolute() / NBD_SOCKET


def pid_file(volume: Volume) -> Path:
    return volume.path / PID_FILE


def log_file(volume: Volume) -> Path:
    return volume.path / LOG_FILE


def write_state(volume: Volume, state: dict[str, Any]) -> None:
    write_json_atomic(volume.path / STATE_FILE, state)


def clear_state(volume: Volume) -> None:
    for name in (STATE_FILE, PID_FILE):
        with contextlib.suppress(FileNotFoundError):
            (volume.path / name).unlink()


def read_state(volume: Volume) -> dict[str, Any] | None:
    """The running server's state, or None when no server holds the volume."""
    if not volume.is_locked_elsewhere():
        return None
    try:
        state = json.loads((volume.path / STATE_FILE).read_text())
    except (OSError, ValueError):
        # Locked but no state yet: a server is starting (or another tool holds the volume).
        return {}
    return state if isinstance(state, dict) else {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
