"""Running external tools (nbdkit, nbdfuse, losetup, ...) with one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Sequence

from volume_core.errors import NbdMirrorError


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise NbdMirrorError(f"{tool} is not installed (apt-get install {package}, or run "
                             "scripts/setup)")
    return path


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run(args: Sequence[str], what: str, error: type[NbdMirrorError] = NbdMirrorError,
        timeout: float = 60) -> str:
    """Run a command; return its stdout, or raise ``error`` with its last stderr line."""
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise error(f"{what}: {args[0]} did not finish within {timeout:g}s") from None
    except OSError as err:
        raise error(f"{what}: cannot run {args[0]}: {err.strerror}") from None
    if proc.returncode != 0:
        detail = last_line(proc.stderr) or last_line(proc.stdout) or f"exit {proc.returncode}"
        raise error(f"{what}: {detail}")
    return proc.stdout


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
