"""Running commands and servers for the bench: one-line errors, clean stops, progress lines."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent.parent
VENV_BIN = REPO / ".venv" / "bin"
START = time.monotonic()


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def tool(name: str) -> str:
    """The venv's copy of a command if there is one, else the one on PATH."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (run scripts/setup)")
    return path


def run(args: list[str], what: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a command; raise BenchError with the end of its output if it fails."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: {args[0]} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise BenchError(f"{what}: {Path(args[0]).name} exited {proc.returncode}: {tail}")
    return proc


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C/SIGTERM while cleaning up, so a second Ctrl-C cannot leave a server."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def kill_pid(pid: int, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``timeout`` seconds."""
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            proc.wait(10)


def nbd_ready(uri: str) -> bool:
    import nbd

    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        h.shutdown()
        return True
    except nbd.Error:
        return False
