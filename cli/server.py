"""Starting, finding and stopping the nbdkit process that serves a volume."""

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
from volume_core import admin, runtime
from volume_core.errors import AdminError, ServerError, VolumeBusy
from volume_core.volume import Volume

from .procs import last_line, require, wait_for

READY_TIMEOUT = 30.0
# The plugin imports nbdkit, which exists only inside nbdkit: locate it, never import it.
PLUGIN = Path(nbd_plugin.__file__).resolve().parent / "plugin.py"
STOP_TIMEOUT = 30.0


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


def nbdkit_command(volume: Volume, endpoint: Endpoint, *, foreground: bool,
                   extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [require("nbdkit", "nbdkit nbdkit-plugin-python")]
    if foreground:
        cmd.append("-f")
    cmd += ["-P", str(runtime.pid_file(volume).absolute()), "--log=stderr"]
    if endpoint.socket is not None:
        cmd += ["-U", str(endpoint.socket)]
    else:
        cmd += ["-i", endpoint.host, "-p", str(endpoint.port)]
    cmd += ["python", str(PLUGIN),
            f"volume={volume.path.absolute()}", f"listen={endpoint}", *extra]
    return cmd


def ensure_not_served(volume: Volume) -> None:
    state = runtime.read_state(volume)
    if state is not None:
        where = f" on {state['listen']}" if state.get("listen") else ""
        pid = f" (pid {state['pid']})" if state.get("pid") else ""
        raise VolumeBusy(f"{volume.path} is already being served{where}{pid}")


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


def _prepare(volume: Volume, endpoint: Endpoint) -> None:
    ensure_not_served(volume)
    if endpoint.socket is not None:
        clear_stale_socket(endpoint.socket)


def serve_foreground(volume: Volume, endpoint: Endpoint, extra: tuple[str, ...] = ()) -> None:
    """Replace this process with nbdkit serving the volume (Ctrl-C stops it)."""
    _prepare(volume, endpoint)
    cmd = nbdkit_command(volume, endpoint, foreground=True, extra=extra)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, python_env())


def serve_background(volume: Volume, endpoint: Endpoint,
                     extra: tuple[str, ...] = ()) -> dict:
    """Start nbdkit detached; return its state once the export and admin socket answer."""
    _prepare(volume, endpoint)
    cmd = nbdkit_command(volume, endpoint, foreground=False, extra=extra)
    log_path = runtime.log_file(volume)
    with open(log_path, "ab") as log:
        log_start = log.tell()
        proc = subprocess.run(cmd, env=python_env(), stdin=subprocess.DEVNULL,
                              stdout=log, stderr=log, timeout=READY_TIMEOUT)
    if proc.returncode != 0:
        raise ServerError(f"nbdkit failed to start: {_log_reason(log_path, log_start)}")

    def ready() -> bool:
        try:
            admin.call(runtime.admin_socket(volume), "status", timeout=2)
            return True
        except AdminError:
            return False

    if not wait_for(ready, READY_TIMEOUT):
        pid = _read_pid(volume)
        if pid and runtime.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        raise ServerError(f"the server did not become ready within {READY_TIMEOUT:g}s: "
                          f"{_log_reason(log_path, log_start)}")
    return runtime.read_state(volume) or {}


def _log_reason(log_path: Path, start: int) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        text = ""
    # nbdkit prefixes plugin errors; the interesting part is after the last "error: ".
    line = last_line(text) or "no output (see the log)"
    return line.split("error: ")[-1] + f" (log: {log_path})"


def _read_pid(volume: Volume) -> int | None:
    try:
        return int(runtime.pid_file(volume).read_text().strip())
    except (OSError, ValueError):
        return None


def stop(volume: Volume) -> int:
    """Stop the server of ``volume``; return its pid. Waits until the volume is released."""
    state = runtime.read_state(volume)
    if state is None:
        raise ServerError(f"{volume.path} is not being served")
    pid = state.get("pid") or _read_pid(volume)
    if not pid:
        raise ServerError(f"{volume.path} is held by another process that is not an "
                          "nbdmirror server; not stopping it")
    os.kill(pid, signal.SIGTERM)
    if not wait_for(lambda: not volume.is_locked_elsewhere(), STOP_TIMEOUT):
        os.kill(pid, signal.SIGKILL)
        if not wait_for(lambda: not volume.is_locked_elsewhere(), 10):
            raise ServerError(f"server pid {pid} did not exit")
    runtime.clear_state(volume)
    return pid


def find_endpoint(volume: Volume) -> Endpoint:
    state = runtime.read_state(volume)
    if not state or not state.get("listen"):
        raise ServerError(f"{volume.path} is not being served (start it with "
                          f"'nbdmirror serve {volume.path} --background')")
    return Endpoint.parse(state["listen"])


def status(volume: Volume) -> dict:
    if runtime.read_state(volume) is None:
        raise ServerError(f"{volume.path} is not being served")
    return admin.call(runtime.admin_socket(volume), "status")
