"""Where a server keeps its runtime files, and whether one is running.

A server of a volume keeps them in ``VOL/``; a server of a snapshot export in
``VOL/snapshots/NAME/``. It writes ``server.json`` once it accepts
connections; the file is believed only while the server's lock is held (a
SIGKILLed server leaves a stale file and a free lock).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from . import snapshots
from .volume import Volume, write_json_atomic

PID_FILE = "nbdkit.pid"
STATE_FILE = "server.json"
LOG_FILE = "server.log"
ADMIN_SOCKET = "admin.sock"
NBD_SOCKET = "nbd.sock"


def admin_socket(volume: Volume) -> Path:
    return volume.path / ADMIN_SOCKET


class ServerPlace:
    """The runtime files of one server: of a volume, or of one of its snapshots."""

    def __init__(self, volume: Volume, snapshot: str | None = None):
        self.volume = volume
        self.snapshot = snapshot
        self.dir = volume.path if snapshot is None else volume.snapshot_dir / snapshot

    @property
    def pid_file(self) -> Path:
        return self.dir / PID_FILE

    @property
    def log_file(self) -> Path:
        return self.dir / LOG_FILE

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def default_socket(self) -> Path:
        return self.dir.absolute() / NBD_SOCKET

    @property
    def what(self) -> str:
        if self.snapshot is None:
            return str(self.volume.path)
        return f"snapshot {self.snapshot!r} of {self.volume.path}"

    def held(self) -> bool:
        """True while a server (or another tool) holds the lock of this place."""
        if self.snapshot is None:
            return self.volume.is_locked_elsewhere()
        return snapshots.is_served(self.dir)

    def write_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state_file, state)

    def clear_state(self) -> None:
        for path in (self.state_file, self.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def read_state(self) -> dict[str, Any] | None:
        """The running server's state, or None when none holds this place."""
        if not self.held():
            return None
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}  # held but no state yet: starting, or another tool holds it
        return state if isinstance(state, dict) else {}

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def read_state(volume: Volume) -> dict[str, Any] | None:
    return ServerPlace(volume).read_state()


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
