"""Starting a secondary's receiving process (volume_core.replication.receiver).

It is stopped and asked like a server (``server.stop``, the admin socket):
it keeps the same runtime files in VOL. Starting differs: it is a Python
process of our own, not nbdkit, so in the background it is a child in a
session of its own, and the command waits for it to answer on its admin
socket, failing at once with its last word if it dies first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from volume_core.errors import ServerError
from volume_core.server_files import RECEIVER_MODULE, ServerPlace

from . import server
from .procs import wait_for
from .server import Endpoint


def command(place: ServerPlace, listen: str, files: dict[str, str | None]) -> list[str]:
    """The receiver's command line; ``files`` maps option names (``--secret-file``) to paths."""
    cmd = [sys.executable, "-m", RECEIVER_MODULE, str(place.volume.path.absolute()),
           "--listen", listen]
    for option, path in files.items():
        if path is not None:
            cmd += [option, str(Path(path).absolute())]
    return cmd


def receive_foreground(place: ServerPlace, endpoint: Endpoint, cmd: list[str]) -> None:
    """Replace this process with the receiver (Ctrl-C stops it cleanly)."""
    server._prepare(place, endpoint)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, server.python_env())


def receive_background(place: ServerPlace, endpoint: Endpoint, cmd: list[str]) -> dict:
    """Start the receiver detached; return its state once it listens and answers admin calls."""
    server._prepare(place, endpoint)
    with server._open_log(place) as log:
        log_start = log.tell()
        proc = subprocess.Popen(cmd, env=server.python_env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, cwd="/")
    timeout = server.READY_TIMEOUT
    if not wait_for(lambda: server._ready(place) or proc.poll() is not None, timeout):
        proc.kill()
        proc.wait()
        server._forget_failed_start(place, endpoint)
        raise ServerError(f"the receiver did not become ready within {timeout:g}s: "
                          f"{server._log_reason(place.log_file, log_start)}")
    if proc.poll() is not None:
        server._forget_failed_start(place, endpoint)
        raise ServerError(f"the receiver exited before it was ready: "
                          f"{server._start_failure(place, log_start)}")
    return place.read_state() or {}
