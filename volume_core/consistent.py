"""An async secondary's consistent images, for readers (``serve --consistent``).

The secondary keeps each committed cycle N as the internal snapshot ``cycle-N``
and, at every commit, deletes the older ones no reader holds (a SnapshotView's
shared lock keeps a snapshot; delete needs it exclusively). While cycle N+1
arrives in the staging log (``staging``) the volume itself holds cycle N and
the snapshot no copies; at its commit the older images go before the log is
applied, and readers wait for that apply (``staging.applying``). So a reader opens
the newest image and keeps that point in time for as long as it reads, however
many cycles commit meanwhile; once it lets go, its image goes at the next commit.

One export per volume hands them out, each connection the newest at its start.
It keeps its runtime files in ``VOL/consistent/`` (server_files.ServerPlace),
apart from the receiver's in ``VOL/``, and holds the lock file there exclusively
for its whole life: a second export of the same volume is refused.
"""

from __future__ import annotations

import fcntl
import os

from . import staging
from .errors import SnapshotCorrupt, SnapshotError, VolumeBusy, VolumeError
from .server_files import CONSISTENT_DIR
from .snapshot_view import SnapshotView
from .snapshots import LOCK, cycle_number, snapshot_dirs, try_flock
from .volume import Volume

#: how many times a reader chooses again when the newest image went between its choice and
#: its open (each time a newer cycle committed: the race is lost only to a busy primary)
OPEN_TRIES = 5


def check_secondary(volume: Volume) -> None:
    """VolumeError unless ``volume`` is a secondary: only those keep consistent images."""
    if volume.info.role != "secondary":
        raise VolumeError(f"{volume.path} is not a secondary: --consistent serves the image "
                          "an async secondary keeps of its last cycle")


def newest_image(volume: Volume) -> str:
    """The name of the snapshot that holds ``volume``'s newest consistent image."""
    check_secondary(volume)
    images = [(n, info["name"]) for _seq, _path, info in snapshot_dirs(volume)
              if (n := cycle_number(info["name"])) is not None and not info.get("deleting")]
    if not images:
        if volume.info.cycle:  # its image went for the staged cycle's apply: see staging
            raise SnapshotError(f"the consistent image of {volume.path} is being replaced "
                                f"by cycle {volume.info.cycle + 1}'s, or that was interrupted "
                                "(it completes when 'nbdmirror receive' runs again)")
        raise SnapshotError(f"{volume.path} has no consistent image yet: no async cycle was "
                            "committed to it")
    return max(images)[1]


def open_newest(volume: Volume, tries: int = OPEN_TRIES) -> SnapshotView:
    """A view of the newest consistent image, held (not deleted) until it is closed.

    The secondary may delete the image chosen before the view holds it (a newer
    cycle committed meanwhile): then the choice is made again.
    """
    for _ in range(tries):
        try:
            with staging.applying(volume, shared=True):  # not while a cycle is applied
                name = newest_image(volume)
                return SnapshotView(volume, name)
        except SnapshotCorrupt:
            raise
        except SnapshotError as err:  # "being deleted", "no snapshot", "no longer exists"
            lost = err
    raise SnapshotError(f"the newest consistent image of {volume.path} was replaced "
                        f"{tries} times while it was opened ({lost})")


class ConsistentExport:
    """What ``serve --consistent`` serves: per connection, a view of the newest image.

    Holds the export's place for its whole life (``VOL/consistent/lock``,
    exclusively), and no image between connections.
    """

    def __init__(self, volume: Volume):
        check_secondary(volume)  # with no image yet it starts; connections fail until one is
        self.volume = volume
        where = volume.path / CONSISTENT_DIR
        where.mkdir(exist_ok=True)
        self._lock_fd = os.open(where / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not try_flock(self._lock_fd, fcntl.LOCK_EX):
            os.close(self._lock_fd)
            raise VolumeBusy(f"the consistent image of {volume.path} is already being served "
                             "(see 'nbdmirror stop VOL --consistent')")

    def open(self) -> SnapshotView:
        """A new connection's image: the newest; the caller closes it when it hangs up."""
        return open_newest(self.volume)

    def close(self) -> None:
        os.close(self._lock_fd)
