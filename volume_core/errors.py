"""One error hierarchy for nbdmirror.

Every error carries a message a user can act on; the CLI prints ``str(err)``
as a single line and exits 1. Nothing here knows about click or nbdkit.
"""

from __future__ import annotations

import errno


class NbdMirrorError(Exception):
    """Base of every error nbdmirror raises on purpose."""

    #: errno an NBD client should see when this error ends a request.
    errno: int = errno.EIO


class UsageError(NbdMirrorError):
    """A value given by the user is not acceptable (a bad size, a bad name)."""

    errno = errno.EINVAL


class VolumeError(NbdMirrorError):
    """A volume cannot be created, opened or used as asked."""


class VolumeNotFound(VolumeError):
    """No volume at the given path."""


class VolumeExists(VolumeError):
    """Creating would overwrite something that already exists."""


class VolumeCorrupt(VolumeError):
    """The volume directory is damaged or of an unknown format."""


class VolumeBusy(VolumeError):
    """Another process holds the volume (it is being served)."""

    errno = errno.EBUSY


class RangeError(VolumeError):
    """A request reaches past the end of the volume."""

    errno = errno.EINVAL


class ReadOnlyError(VolumeError):
    """A write was sent to a read-only export."""

    errno = errno.EROFS


class MarksTaken(VolumeError):
    """The marks were taken for a cycle and not released before the next take."""


class QuiesceTimeout(VolumeError):
    """Writes in flight did not finish in time for an operation that needs them stopped."""

    errno = errno.ETIMEDOUT


class ServerError(NbdMirrorError):
    """Starting, reaching or stopping a server failed."""


class AdminError(NbdMirrorError):
    """The admin socket of a running server could not be used."""


class DeviceError(NbdMirrorError):
    """Attaching or detaching a block device failed."""


class SnapshotError(NbdMirrorError):
    """A snapshot cannot be created, read, served or deleted as asked."""


class SnapshotCorrupt(SnapshotError, VolumeCorrupt):
    """A snapshot's files are damaged: the volume directory is damaged too."""


class ProtocolError(NbdMirrorError):
    """A replication peer sent bytes that break the wire protocol, or a frame was misused.

    The connection is unusable afterwards: drop it and resync what it concerned.
    """


class PeerRefused(NbdMirrorError):
    """The replication handshake failed: the peer refused us, or we refused it."""


class LinkError(NbdMirrorError):
    """A replication link cannot be opened or kept: unreachable peer, timeout, TLS failure.

    Unlike ``PeerRefused`` nothing was decided by the peer: retry with backoff.
    """
