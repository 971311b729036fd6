"""Starting, finding and stopping the nbdkit processes that serve volumes, snapshots and a
secondary's consistent images."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import nbd_plugin
import volume_core
from volume_core import admin, server_log
from volume_core.errors import AdminError, ServerError, VolumeBusy
from volume_core.server_files import (
    ADMIN_SOCKET,
    RECEIVER_KIND,
    ServerPlace,
    admin_socket,
    pid_alive,
    process_args,
)

from . import clients
from .procs import require, wait_for

READY_TIMEOUT = 30.0
#: nbdkit threads per connection. nbdkit's own default (16) makes the plugin's threads
#: fight over the GIL; see the README's performance section for how this was chosen.
DEFAULT_THREADS = 1
#: with --replicate-to: a sync or semi-async write holds its thread for a round trip, so
#: one thread would serialise a connection's writes on the link (provisional: to be chosen
#: by scripts/bench per mode)
REPLICATED_THREADS = 4
MAX_THREADS = 64
#: how long stop waits for a server to exit before it kills it (tests shorten it)
STOP_TIMEOUT = float(os.environ.get("NBDMIRROR_STOP_TIMEOUT", "30"))
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
        # a snapshot's name never starts with '-': "--consistent" is no snapshot's suffix
        suffix = (f"-{place.snapshot}" if place.snapshot
                  else "--consistent" if place.consistent else "")
        path = short / f"{place.volume.info.uuid}{suffix}.sock"
    return Endpoint(socket=path)


def python_env() -> dict[str, str]:
    """Environment for nbdkit's embedded /usr/bin/python3 to import our code and the venv's.

    Python's objects go to glibc's malloc (``PYTHONMALLOC=malloc``, unless the
    environment says otherwise), which the server tunes to keep what it frees
    (``memory.keep_freed_buffers``): Python's own allocator gives a 1 MiB arena
    back with ``munmap`` whenever one empties and maps a fresh one for the next
    request; without it a plain serve's 4K random writes went 2-14% faster
    (three interleaved pairs, mean 8%). Most of the ``munmap`` per request that
    perf showed was the thread state's frame stack, though (session 13:
    ``memory.keep_stack_chunks``, +75%).
    """
    paths = [str(Path(volume_core.__file__).resolve().parent.parent)]
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in paths:
            paths.append(p)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONMALLOC", "malloc")
    return env


def nbdkit_command(place: ServerPlace, endpoint: Endpoint, *, foreground: bool,
                   extra: tuple[str, ...] = (), threads: int = DEFAULT_THREADS) -> list[str]:
    cmd = [require("nbdkit", "nbdkit nbdkit-plugin-python")]
    if foreground:
        cmd.append("-f")
    cmd += ["-P", str(place.pid_file.absolute()), "--log=stderr", "-t", str(threads)]
    if not place.live:
        cmd.append("--readonly")
    if endpoint.socket is not None:
        cmd += ["-U", str(endpoint.socket)]
    else:
        cmd += ["-i", endpoint.host, "-p", str(endpoint.port)]
    cmd += ["python", str(PLUGIN), f"volume={place.volume.path.absolute()}",
            f"listen={endpoint}"]
    if place.snapshot is not None:
        cmd.append(f"snapshot={place.snapshot}")
    if place.consistent:
        cmd.append("consistent=1")
    return cmd + list(extra)


def ensure_not_served(place: ServerPlace) -> None:
    state = place.read_state()
    if state is not None:
        where = f" on {state['listen']}" if state.get("listen") else ""
        pid = f" (pid {state['pid']})" if state.get("pid") else ""
        doing = "receiving replication" if is_receiver(state) else "being served"
        raise VolumeBusy(f"{place.what} is already {doing}{where}{pid}")
    if place.held():
        raise VolumeBusy(f"{place.what} is in use by another process (starting a server, or "
                         "another tool)")


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
    place.make_dir()
    for path in (place.pid_file, place.state_file, place.log_file):
        # nbdkit and the server open these by name: a FIFO there would hang them
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise ServerError(f"{path} is not a regular file; remove it")
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
    """Start nbdkit detached; return its state once it serves (and answers admin calls).

    nbdkit forks itself (with -f it would die with this command: 1.32 sets a
    parent-death signal unconditionally). The forked server holds the place's
    lock from before the fork; if the lock comes free before the server is
    ready, the server died (a full disk leaves not even a pid file), and the
    start fails at once instead of waiting out the timeout.
    """
    _prepare(place, endpoint)
    cmd = nbdkit_command(place, endpoint, foreground=False, extra=extra, threads=threads)
    with _open_log(place) as log:
        log_start = log.tell()
        # A session of its own: a Ctrl-C meant for the shell that started it is not its.
        proc = subprocess.run(cmd, env=python_env(), stdin=subprocess.DEVNULL,
                              stdout=log, stderr=log, timeout=READY_TIMEOUT, check=False,
                              start_new_session=True)
    if proc.returncode != 0:
        _forget_failed_start(place, endpoint)
        raise ServerError(f"nbdkit failed to start: {_start_failure(place, log_start)}")
    if not wait_for(lambda: _ready(place) or not place.held(), READY_TIMEOUT):
        _kill_unready(place)
        _forget_failed_start(place, endpoint)
        raise ServerError(f"the server did not become ready within {READY_TIMEOUT:g}s: "
                          f"{_log_reason(place.log_file, log_start)}")
    if not _ready(place):
        _forget_failed_start(place, endpoint)
        raise ServerError(f"the server exited before it was ready: "
                          f"{_start_failure(place, log_start)}")
    return place.read_state() or {}


def _open_log(place: ServerPlace):
    """Open the server's log for appending; refuse anything but a regular file (no blocking)."""
    try:
        fd = os.open(place.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ServerError(f"cannot open the log {place.log_file}: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ServerError(f"{place.log_file} is not a regular file; remove it")
    os.set_blocking(fd, True)
    return open(fd, "ab")


def _kill_unready(place: ServerPlace) -> None:
    """SIGKILL a server that never became ready, if its pid file names it for sure."""
    pid = place.read_pid()
    if pid and place.is_server_command(process_args(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 10)


def _ready(place: ServerPlace) -> bool:
    """A read-only export is ready once it recorded itself; a volume once it answers admin."""
    if place.read_state() is None:
        return False
    if not place.live:
        return True
    try:
        admin.call(admin_socket(place.volume), "status", timeout=2)
        return True
    except AdminError:
        return False


def _forget_failed_start(place: ServerPlace, endpoint: Endpoint) -> None:
    """Remove the runtime files a start that failed made, unless another server holds them.

    The log stays, as after any stop: it is where the reason is.
    """
    if not place.held():
        place.remove_runtime_files(str(endpoint))


def _start_failure(place: ServerPlace, log_start: int) -> str:
    """Why a server died starting: the log's last word, or a full disk (the log then is empty).

    If another server holds the place (this one lost the race for it), its log reader
    goes on writing the same log: not waited for."""
    serving = place.read_pid() if place.held() else None
    reason = _log_reason(place.log_file, log_start, serving)
    try:
        full = os.statvfs(place.dir).f_bavail == 0
    except OSError:
        full = False
    if full:  # the log could not take the server's last words either
        return f"no space left on device (the filesystem of {place.dir} is full)"
    return reason


#: how long a failed start waits for the dead server's log reader to write its last words
LOG_READER_TIMEOUT = 5.0
#: what volume_core.server_log puts before a message: a time, maybe a level and a logger
_ERROR_LINE = re.compile(r"error: | (ERROR|CRITICAL) |Error: ")
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d "
                         r"((DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: )?")


def _log_reason(log_path: Path, start: int, serving: int | None = None) -> str:
    """The last word of the log since ``start``, in one line, without its time stamp.

    Called once the server is gone: its log reader may still be writing its last
    words, so wait (briefly) for the reader to finish first (not for that of the
    server ``serving``, alive).
    """
    server_log.wait_for_readers(log_path.absolute(), LOG_READER_TIMEOUT, serving)
    try:
        with open(log_path, "rb") as f:
            if os.fstat(f.fileno()).st_size < start:  # rotated meanwhile: a new file
                start = 0
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        text = ""
    # Another server may have logged meanwhile (two serves racing share the log): the
    # reason is this server's last error line, else the last line of all.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if _ERROR_LINE.search(ln)]
    line = _LOG_PREFIX.sub("", (errors or lines or [""])[-1]) or "no output"
    # nbdkit prefixes plugin errors; the interesting part is after the last "error: ".
    return line.split("error: ")[-1] + f" (log: {log_path})"


def _clear_stale_files(place: ServerPlace) -> None:
    """Remove what a killed server left (no one holds the place): state, pid, sockets.

    A socket goes only if nothing listens on it any more.
    """
    listen = (place.recorded() or {}).get("listen")
    for where in (place.dir.absolute() / ADMIN_SOCKET,
                  Endpoint.parse(listen).socket if isinstance(listen, str) and
                  listen.startswith("unix:") else None):
        if where is not None:
            with contextlib.suppress(ServerError, OSError):
                clear_stale_socket(where)
    place.clear_state()


def running_server(place: ServerPlace) -> dict:
    """The state of the proven server of ``place``; ServerError saying why there is none."""
    state = place.read_state()
    if state is not None:
        return state
    if not place.held():
        _clear_stale_files(place)
        raise ServerError(f"{place.what} is not being served")
    pid = (place.recorded() or {}).get("pid")
    gone = f" (the recorded server, pid {pid}, is not running)" if pid else ""
    raise ServerError(f"{place.what} is in use by another process, not by an nbdmirror "
                      f"server{gone}; not stopping anything")


def is_receiver(state: dict) -> bool:
    """True when ``state`` (server.json) is a secondary's receiver: it has no NBD export."""
    return state.get("kind") == RECEIVER_KIND


def connected_clients(state: dict) -> list[str]:
    """The NBD clients of the running server ``state`` describes, each named."""
    if not state.get("listen") or is_receiver(state):
        return []
    return clients.connected(state["pid"], Endpoint.parse(state["listen"]))


def refuse_clients(place: ServerPlace, state: dict, action: str) -> None:
    """ServerError naming the NBD clients connected to the server, if there are any."""
    names = connected_clients(state)
    if names:
        many = "s are" if len(names) > 1 else " is"
        raise ServerError(f"{len(names)} NBD client{many} connected to {place.what}: "
                          f"{', '.join(names)}; disconnect first (or {action} --force)")


def stop(place: ServerPlace, force: bool = False) -> int:
    """Stop the server of ``place`` cleanly; return its pid.

    Refuses while NBD clients are connected unless ``force``. nbdkit alone
    would wait on SIGTERM for every client to hang up (see cli/clients.py), so
    after the signal the clients' connections are shut down until it exits. A
    server that still will not exit is killed, and that is an error: its
    engine did not close cleanly.
    """
    state = running_server(place)
    pid = state["pid"]
    if not force:
        refuse_clients(place, state, "stop")
    try:
        pidfd = os.pidfd_open(pid)  # signals through it cannot reach a reuse of the pid
    except ProcessLookupError:
        pidfd = None
    try:
        exited = pidfd is None or not place.proves(state)  # it went away meanwhile
        if not exited:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            listen = None if is_receiver(state) else state.get("listen")
            exited = _wait_exit(pid, listen, STOP_TIMEOUT)
        if not exited:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            if not wait_for(lambda: not pid_alive(pid), 10):
                raise ServerError(f"server pid {pid} did not exit, even on SIGKILL")
    finally:
        if pidfd is not None:
            os.close(pidfd)
    place.remove_runtime_files(state.get("listen"))
    if not exited:
        raise ServerError(f"the server of {place.what} (pid {pid}) did not stop within "
                          f"{STOP_TIMEOUT:g}s; killed it with SIGKILL: it did not close "
                          "cleanly (see its log)")
    return pid


def _wait_exit(pid: int, listen: str | None, timeout: float) -> bool:
    """Wait for ``pid`` to exit, cutting off NBD clients it still waits for meanwhile."""
    endpoint = Endpoint.parse(listen) if listen else None
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        if endpoint is not None:
            try:
                clients.disconnect(pid, endpoint)
            except ServerError:  # not allowed to reach its sockets: wait, then kill
                endpoint = None
        wait_for(lambda: not pid_alive(pid), min(0.5, max(0.0, deadline - time.monotonic())))
    return True


def find_endpoint(place: ServerPlace) -> Endpoint:
    state = place.read_state()
    if state and is_receiver(state):
        raise ServerError(f"{place.what} is a secondary receiving replication on "
                          f"{state.get('listen')}; it has no NBD export")
    if not state or not state.get("listen"):
        raise ServerError(f"{place.what} is not being served")
    return Endpoint.parse(state["listen"])
