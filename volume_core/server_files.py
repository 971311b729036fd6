"""Where a server keeps its runtime files, and whether one is running.

A server of a volume keeps them in ``VOL/``; a server of a snapshot export in
``VOL/snapshots/NAME/``; the export of an async secondary's consistent images
(``serve --consistent``, volume_core.consistent) in ``VOL/consistent/``. It
writes ``server.json`` once it accepts connections. A SIGKILLed server leaves
that file behind, and its pid may be reused by any process; so the file is
believed only while the place's lock is held *and* the recorded pid is proven
to be this place's server: alive, started at the recorded time
(``/proc/PID/stat`` field 22) and running nbdkit with this volume (and
snapshot, or ``consistent=1``) on its command line. Nothing may signal a pid
that is not proven so.

A secondary's receiving process (``nbdmirror receive``) keeps the same files
in ``VOL/``, so ``status`` and ``stop`` treat it like a server; its
server.json says ``"kind": "receiver"`` and its ``listen`` is the replication
address, not an NBD export.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from . import snapshots
from .volume import Volume, write_json_atomic

PID_FILE = "nbdkit.pid"
STATE_FILE = "server.json"
LOG_FILE = "server.log"
ADMIN_SOCKET = "admin.sock"
NBD_SOCKET = "nbd.sock"
#: a secondary's receiving process runs as ``python -m RECEIVER_MODULE VOL ...``
RECEIVER_MODULE = "volume_core.replication.receiver"
#: server.json's ``kind`` of a receiving process (an nbdkit server records none)
RECEIVER_KIND = "receiver"
#: where the export of a secondary's consistent images keeps its runtime files: apart from
#: ``VOL/``'s, which belong to the receiver of the same volume
CONSISTENT_DIR = "consistent"


def admin_socket(volume: Volume) -> Path:
    return volume.path / ADMIN_SOCKET


class ServerPlace:
    """The runtime files of one server: of a volume, of one of its snapshots, or of its
    consistent images (``consistent``: an async secondary's, newest per connection)."""

    def __init__(self, volume: Volume, snapshot: str | None = None, *,
                 consistent: bool = False):
        if snapshot is not None and consistent:
            raise ValueError("a place serves a snapshot or the consistent images, not both")
        self.volume = volume
        self.snapshot = snapshot
        self.consistent = consistent
        if consistent:
            self.dir = volume.path / CONSISTENT_DIR
        else:
            self.dir = volume.path if snapshot is None else volume.snapshot_dir / snapshot

    @property
    def live(self) -> bool:
        """True for the place of the volume itself: its writable engine, its admin socket."""
        return self.snapshot is None and not self.consistent

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
        return self.describe(self.volume.path)

    def describe(self, volume_path: Path) -> str:
        """What this place serves, naming the volume by ``volume_path``."""
        if self.consistent:
            return f"the consistent image of {volume_path}"
        if self.snapshot is None:
            return str(volume_path)
        return f"snapshot {self.snapshot!r} of {volume_path}"

    def held(self) -> bool:
        """True while a server (or another tool) holds the lock of this place."""
        if self.live:
            return self.volume.is_locked_elsewhere()
        # a snapshot's lock file, shared by its exports; the consistent export's own one
        return snapshots.is_served(self.dir)

    def make_dir(self) -> None:
        """Make the directory of the consistent export (a volume's and a snapshot's exist
        with them: never made here, or a deleted snapshot would come back empty)."""
        if self.consistent:
            self.dir.mkdir(exist_ok=True)

    def write_state(self, state: dict[str, Any]) -> None:
        """Record the running server, with what proves later that its pid is still it."""
        pid = state.get("pid")
        if isinstance(pid, int) and "started" not in state:
            state = state | {"started": process_start(pid)}
        write_json_atomic(self.state_file, state)

    def clear_state(self) -> None:
        """Remove the state and pid files, and the unix socket the state says it listens on.

        A server calls this as it exits, once nbdkit has closed its listening
        socket: nbdkit (1.32) leaves the socket file behind.
        """
        listen = (self.recorded() or {}).get("listen")
        for path in (self.state_file, self.pid_file, temp_of(self.state_file)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _remove_socket(listen)

    def remove_runtime_files(self, listen: str | None = None) -> None:
        """Remove what a server that is gone left behind: state, pid file and its sockets.

        Only for a server known to be gone (it exited, or never started): a live
        server's sockets would vanish under it.
        """
        self.clear_state()
        _remove_socket(f"unix:{self.dir / ADMIN_SOCKET}")
        _remove_socket(listen)

    def recorded(self) -> dict[str, Any] | None:
        """What server.json says, believed or not (None when absent or unreadable)."""
        try:
            state = json.loads(read_runtime_file(self.state_file))
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def proves(self, state: dict[str, Any]) -> bool:
        """True when the pid ``state`` records is this place's server, alive, not a reuse."""
        pid = state.get("pid")
        if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
            return False
        started = state.get("started")
        if started is not None and process_start(pid) != started:
            return False
        return self.is_server_command(process_args(pid))

    def is_server_command(self, args: list[str]) -> bool:
        """True when ``args`` (a command line) is nbdkit serving this very place, or the
        replication receiver of this volume (``python -m RECEIVER_MODULE VOL ...``)."""
        if self.live and args[1:3] == ["-m", RECEIVER_MODULE] and len(args) > 3:
            return os.path.realpath(args[3]) == os.path.realpath(self.volume.path)
        if not args or Path(args[0]).name != "nbdkit":
            return False
        values = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
        volume = values.get("volume")
        if volume is None or os.path.realpath(volume) != os.path.realpath(self.volume.path):
            return False
        return (values.get("snapshot") == self.snapshot
                and (values.get("consistent") == "1") == self.consistent)

    def read_state(self) -> dict[str, Any] | None:
        """The running server's state, or None unless a proven server holds this place."""
        state = self.recorded()
        if state is None or not self.proves(state) or not self.held():
            return None
        return state

    def read_pid(self) -> int | None:
        try:
            return int(read_runtime_file(self.pid_file).strip())
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


def temp_of(path: Path) -> Path:
    """The temporary name write_json_atomic writes ``path`` under before renaming it."""
    return path.with_name(f".{path.name}.tmp")


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (/proc/PID/stat field 22).

    Two processes that share a pid never share a start time, so this tells a
    reused pid from the process that was recorded.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])  # fields[0] is field 3 (the state)
    except (OSError, IndexError, ValueError):
        return None


def process_args(pid: int) -> list[str]:
    """The command line of process ``pid`` ([] when gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _remove_socket(listen: str | None) -> None:
    """Unlink the unix socket of ``listen`` (``unix:PATH``), if it is one."""
    if not isinstance(listen, str) or not listen.startswith("unix:"):
        return
    path = Path(listen[len("unix:"):])
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()


#: runtime files are a few hundred bytes
_RUNTIME_FILE_MAX = 64 << 10


def read_runtime_file(path: Path) -> str:
    """Read a small runtime file; OSError unless it is a regular file.

    Never blocks: a FIFO or device planted at its name is refused, not waited on.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        return os.read(fd, _RUNTIME_FILE_MAX).decode(errors="replace")
    finally:
        os.close(fd)
