"""This boot of the machine: what the page cache is trusted for.

A SIGKILL leaves what a process wrote to the page cache in place (a process
restarted in the same boot reads it back); a reboot does not. State that is
written without fdatasync on purpose (a cycle's frozen image, the tracker's
kept intents) records the boot it was written in and is trusted only in it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .volume import fsync_dir


def boot_id() -> str:
    """This boot of the machine (a reboot changes it; the page cache does not outlive it)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def recorded_in_this_boot(path: Path) -> bool:
    """Whether the file ``path`` names this boot (written by ``record_this_boot``)."""
    try:
        return path.read_text().strip() == boot_id() != "unknown"
    except (OSError, UnicodeDecodeError):
        return False


def record_this_boot(path: Path) -> None:
    """Write this boot's id to ``path`` durably (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, (boot_id() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def forget_boot(path: Path) -> None:
    """Remove ``path`` durably: nothing written unsynced is trusted any more."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fsync_dir(path.parent)
