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

from .volume import fsync_dir, write_atomic


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
    write_atomic(path, (boot_id() + "\n").encode())


def forget_boot(path: Path) -> None:
    """Remove ``path`` durably: nothing written unsynced is trusted any more."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fsync_dir(path.parent)
