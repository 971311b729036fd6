"""Starting, finding and stopping the nbdkit processes that serve volumes and snapshots."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import nbd_plugin
import volume_core
from volume_core import admin
from volume_core.errors import AdminError, ServerError, VolumeBusy
from volume_core.server_files import ServerPlace, admin_socket

from .procs import last_line, require, wait_for

READY_TIMEOUT = 30.0
#: nbdkit threads per connection. nbdkit's own default (16) makes the plugin's threads
#: fight over the GIL; see the README's performance section for how this was chosen.
DEFAULT_THREADS = 16
MAX_THREADS = 64
STOP_TIMEOUT = 30.0
# The plugin imports nbdkit, which exists only inside nbdkit: locate it, never import it.
PLUGIN = Path(nbd_plugin.__file__).resolve().parent / "plugin.py"
RUN_DIR = Path(os.environ.get("NBDMIRROR_RUN_DIR", "/run/nbdmirror"))
_SUN_PATH_MAX = 100


@dataclass(frozen=True)
class Endpoint:
    """Where an NBD export listens: a unix socket, or a TCP host and port."""

    socket: Path | None = None
    host: str = "127.0.0.1"
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        kind, _, rest = text.partition(":")
        if kind == "unix" and rest:
            return cls(socket=Path(rest))
        if kind == "tcp" and rest:
            host, _, port = rest.rpartition(":")
            return cls(host=host.strip("[]") or "127.0.0.1", port=int(port))
        raise ServerError(f"unrecognised export address {text!r}")

    def __str__(self) -> str:
        if self.socket is not None:
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def uri(self) -> str:
        if self.socket is not None:
            return f"nbd+unix:///?socket={self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}"


def choose_endpoint(place: ServerPlace, socket_path: str | None, port: int | None,
                    address: str) -> Endpoint:
    """--port, else --socket, else the default socket inside the server's directory."""
    if port is not None:
        return Endpoint(host=address, port=port)
    if socket_path:
        path = Path(socket_path).absolute()
        if len(os.fsencode(str(path))) > _SUN_PATH_MAX:
            raise ServerError(f"socket path {path} is too long for a unix socket "
                              f"({_SUN_PATH_MAX} bytes at most)")
        return Endpoint(socket=path)
    path = place.default_socket
    if len(os.fsencode(str(path))) > _SUN_PATH_MAX:  # sun_path limit: a short path under /run
        short = RUN_DIR / "sockets"
        short.mkdir(parents=True, exist_ok=True)
        suffix = f"-{place.snapshot}" if place.snapshot else ""
        path = short / f"{place.volume.info.uuid}{suffix}.sock"
    return Endpoint(socket=path)


def python_env() -> dict[str, str]:
    """Environment for nbdkit's embedded /usr/bin/python3 to import our code and the venv's."""
    paths = [str(Path(volume_core.__file__).resolve().parent.parent)]
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in paths:
            paths.append(p)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def nbdkit_command(place: ServerPlace, endpoint: Endpoint, *, foreground: bool,
                   extra: tuple[str, ...] = (), threads: int = DEFAULT_THREADS) -> list[str]:
    cmd = [require("nbdkit", "nbdkit nbdkit-plugin-python")]
    if foreground:
        cmd.append("-f")
    cmd += ["-P", str(place.pid_file.absolute()), "--log=stderr", "-t", str(threads)]
    if place.snapshot is not None:
        cmd.append("--readonly")
    if endpoint.socket is not None:
        cmd += ["-U", str(endpoint.socket)]
    else:
        cmd += ["-i", endpoint.host, "-p", str(endpoint.port)]
    cmd += ["python", str(PLUGIN), f"volume={place.volume.path.absolute()}",
            f"listen={endpoint}"]
    if place.snapshot is not None:
        cmd.append(f"snapshot={place.snapshot}")
    return cmd + list(extra)


def ensure_not_served(place: ServerPlace) -> None:
    state = place.read_state()
    if state is not None:
        where = f" on {state['listen']}" if state.get("listen") else ""
        pid = f" (pid {state['pid']})" if state.get("pid") else ""
        raise VolumeBusy(f"{place.what} is already being served{where}{pid}")


def clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a killed server; refuse if something still listens there."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ServerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with admin.short_unix_path(path) as where:
            probe.connect(where)
    except ConnectionRefusedError:
        path.unlink()
        return
    except OSError as err:
        raise ServerError(f"cannot use {path}: {err.strerror}") from None
    finally:
        probe.close()
    raise ServerError(f"another server is listening on {path}")


def _prepare(place: ServerPlace, endpoint: Endpoint) -> None:
    ensure_not_served(place)
    if endpoint.socket is not None:
        clear_stale_socket(endpoint.socket)


def serve_foreground(place: ServerPlace, endpoint: Endpoint, extra: tuple[str, ...] = (),
                     threads: int = DEFAULT_THREADS) -> None:
    """Replace this process with nbdkit (Ctrl-C stops it)."""
    _prepare(place, endpoint)
    cmd = nbdkit_command(place, endpoint, foreground=True, extra=extra, threads=threads)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, python_env())


def serve_background(place: ServerPlace, endpoint: Endpoint, extra: tuple[str, ...] = (),
                     threads: int = DEFAULT_THREADS) -> dict:
    """Start nbdkit detached; return its state once it serves (and answers admin calls)."""
    _prepare(place, endpoint)
    cmd = nbdkit_command(place, endpoint, foreground=False, extra=extra, threads=threads)
    with open(place.log_file, "ab") as log:
        log_start = log.tell()
        proc = subprocess.run(cmd, env=python_env(), stdin=subprocess.DEVNULL,
                              stdout=log, stderr=log, timeout=READY_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise ServerError(f"nbdkit failed to start: {_log_reason(place.log_file, log_start)}")

    def ready() -> bool:
        if place.snapshot is not None:
            return bool(place.read_state())
        try:
            admin.call(admin_socket(place.volume), "status", timeout=2)
            return True
        except AdminError:
            return False

    if not wait_for(ready, READY_TIMEOUT):
        pid = place.read_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        raise ServerError(f"the server did not become ready within {READY_TIMEOUT:g}s: "
                          f"{_log_reason(place.log_file, log_start)}")
    return place.read_state() or {}


def _log_reason(log_path: Path, start: int) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        text = ""
    # nbdkit prefixes plugin errors; the interesting part is after the last "error: ".
    line = last_line(text) or "no output"
    return line.split("error: ")[-1] + f" (log: {log_path})"


def stop(place: ServerPlace) -> int:
    """Stop the server of ``place``; return its pid. Waits until it has let go."""
    state = place.read_state()
    if state is None:
        raise ServerError(f"{place.what} is not being served")
    pid = state.get("pid") or place.read_pid()
    if not pid:
        raise ServerError(f"{place.what} is held by a process that is not an nbdmirror server; "
                          "not stopping it")
    os.kill(pid, signal.SIGTERM)
    if not wait_for(lambda: not place.held(), STOP_TIMEOUT):
        os.kill(pid, signal.SIGKILL)
        if not wait_for(lambda: not place.held(), 10):
            raise ServerError(f"server pid {pid} did not exit")
    place.clear_state()
    return pid


def find_endpoint(place: ServerPlace) -> Endpoint:
    state = place.read_state()
    if not state or not state.get("listen"):
        raise ServerError(f"{place.what} is not being served")
    return Endpoint.parse(state["listen"])
