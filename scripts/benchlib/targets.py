"""The things the bench measures, each served fresh on its own sparse backing file.

  nbdmirror            ``nbdmirror create`` + ``nbdmirror serve --background`` (the real CLI)
  nbdmirror-nodurable  the same nbdkit command line plus ``durable-marks=0``
  passthrough          scripts/passthrough_plugin.py: the ceiling of a Python plugin
  file                 nbdkit's C file plugin
  raw                  the file itself, no NBD

Every server is stopped on the way out of its context manager, including on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from .procs import REPO, BenchError, kill_pid, nbd_ready, progress, run, shielded, tool, wait_until

PASSTHROUGH_PLUGIN = REPO / "scripts" / "passthrough_plugin.py"
ALL_TARGETS = ("nbdmirror", "nbdmirror-nodurable", "passthrough", "file", "raw")


@dataclass
class Served:
    """A running export (or, for raw, the file itself)."""

    uri: str | None  # NBD URI, or None for raw
    backing: Path  # the file the data lands in
    pid: int | None = None  # the server process, for CPU accounting and py-spy
    volume: Path | None = None  # the nbdmirror volume directory, if any


def python_env() -> dict[str, str]:
    from cli.server import python_env as env

    return env()


def default_threads() -> int:
    """What ``nbdmirror serve`` uses when not told: the bench's default for every server."""
    from cli.server import DEFAULT_THREADS

    return DEFAULT_THREADS


@contextlib.contextmanager
def serve_nbdkit(name: str, workdir: Path, size: int, plugin_args: list[str], *,
                 threads: int, delete_after: bool = False, backing: Path | None = None,
                 readonly: bool = False) -> Iterator[Served]:
    """nbdkit -f -t THREADS on a fresh sparse file; stopped (and its socket removed) on exit.

    ``backing``: export this existing file as it is instead (never truncated; deleted
    afterwards only if ``delete_after``). ``readonly``: nbdkit -r."""
    sock = workdir / f"{name}.sock"
    log = workdir / f"{name}.log"
    sock.unlink(missing_ok=True)
    if backing is None:
        backing = workdir / f"{name}.img"
        backing.unlink(missing_ok=True)
        with open(backing, "wb") as f:
            f.truncate(size)
    elif not backing.is_file():
        raise BenchError(f"{name}: {backing} is not a file")
    args = plugin_args[:-1] + [plugin_args[-1].format(file=backing)]
    cmd = [tool("nbdkit"), "-f", "--exit-with-parent", "-t", str(threads), "-U", str(sock),
           *(["-r"] if readonly else []), *args]
    uri = f"nbd+unix:///?socket={sock}"
    with open(log, "wb") as logf:
        # Own session: Ctrl-C reaches us, and we stop the server in order.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                env=python_env(), start_new_session=True)
    try:
        if not wait_until(lambda: proc.poll() is not None or
                          (sock.exists() and nbd_ready(uri)), 30):
            raise BenchError(f"{name}: nbdkit did not become ready within 30s (log: {log})")
        if proc.poll() is not None:
            raise BenchError(f"{name}: nbdkit exited {proc.returncode}: "
                             f"{log.read_text(errors='replace').strip()[-500:]}")
        yield Served(uri=uri, backing=backing, pid=proc.pid)
    finally:
        with shielded():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            sock.unlink(missing_ok=True)
            if delete_after:
                backing.unlink(missing_ok=True)


@contextlib.contextmanager
def serve_nbdmirror(name: str, workdir: Path, size: int, *, durable: bool = True,
                    threads: int | None = None, delete_after: bool = False) -> Iterator[Served]:
    """A fresh nbdmirror volume, served by the CLI (durable) or with durable-marks=0."""
    vol = workdir / name
    sock = workdir / f"{name}.sock"
    shutil.rmtree(vol, ignore_errors=True)
    sock.unlink(missing_ok=True)
    nbdmirror = tool("nbdmirror")
    run([nbdmirror, "create", str(vol), "--size", str(size)], f"{name}: create")
    threads_args = [] if threads is None else ["--threads", str(threads)]
    pid = None
    try:
        if durable:
            proc = run([nbdmirror, "serve", str(vol), "--background", "--socket", str(sock),
                        "--json", *threads_args], f"{name}: serve", timeout=60)
            pid = json.loads(proc.stdout)["pid"]
        else:
            pid = _serve_nodurable(name, vol, sock, threads)
        if not pid:
            with contextlib.suppress(OSError, ValueError):
                pid = int((vol / "nbdkit.pid").read_text())
        yield Served(uri=f"nbd+unix:///?socket={sock}", backing=vol / "data.img", pid=pid,
                     volume=vol)
    finally:
        with shielded():
            if pid is None:  # serve failed half-way? a pid file may still exist
                with contextlib.suppress(OSError, ValueError):
                    pid = int((vol / "nbdkit.pid").read_text())
            if pid is not None:
                try:
                    run([nbdmirror, "stop", str(vol)], f"{name}: stop", timeout=90)
                except BenchError as err:
                    progress(f"warning: {err}; killing pid {pid}")
                kill_pid(pid)
            sock.unlink(missing_ok=True)
            if delete_after:
                shutil.rmtree(vol, ignore_errors=True)


def _serve_nodurable(name: str, vol: Path, sock: Path, threads: int | None) -> int | None:
    """The CLI's nbdkit command line plus durable-marks=0 (not a CLI option: bench only)."""
    from cli.server import Endpoint, serve_background
    from volume_core.errors import NbdMirrorError
    from volume_core.server_files import ServerPlace
    from volume_core.volume import Volume

    kw = {} if threads is None else {"threads": threads}
    try:
        state = serve_background(ServerPlace(Volume.open(vol)), Endpoint(socket=sock),
                                 extra=("durable-marks=0",), **kw)
    except NbdMirrorError as err:
        raise BenchError(f"{name}: serve: {err}") from None
    return state.get("pid")


@contextlib.contextmanager
def serve_raw(name: str, workdir: Path, size: int, *,
              delete_after: bool = False) -> Iterator[Served]:
    backing = workdir / f"{name}.img"
    backing.unlink(missing_ok=True)
    with open(backing, "wb") as f:
        f.truncate(size)
    try:
        yield Served(uri=None, backing=backing)
    finally:
        if delete_after:
            backing.unlink(missing_ok=True)


Fresh = Callable[[str], AbstractContextManager[Served]]


def target_factory(target: str, workdir: Path, size: int, *, threads: int,
                   delete_after: bool = False) -> Fresh:
    """``fresh(label)``: a context manager giving a fresh ``Served`` of ``target`` with nbdkit
    running ``threads`` threads, its files named after ``label`` (unique per instance)."""
    kw = {"delete_after": delete_after}
    if target in ("nbdmirror", "nbdmirror-nodurable"):
        durable = target == "nbdmirror"
        return lambda label: serve_nbdmirror(label, workdir, size, durable=durable,
                                             threads=threads, **kw)
    if target == "passthrough":
        return lambda label: serve_nbdkit(label, workdir, size,
                                          ["python", str(PASSTHROUGH_PLUGIN), "file={file}"],
                                          threads=threads, **kw)
    if target == "file":
        return lambda label: serve_nbdkit(label, workdir, size, ["file", "{file}"],
                                          threads=threads, **kw)
    if target == "raw":
        return lambda label: serve_raw(label, workdir, size, **kw)
    raise BenchError(f"unknown target {target!r}")
