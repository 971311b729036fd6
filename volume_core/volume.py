"""The volume directory: its description, its raw data file, its lock.

Layout of a volume ``VOL/``::

    volume.json     description: format, uuid, size, region size, role, generation,
                    and on a secondary the uuid and generation of its primary
    data.img        the live data, a raw sparse image (qemu-img, cmp, losetup read it)
    marks.map       the persisted write-intent map, one byte per region (regions.py)
    marks.boot      the boot whose kept intents (2s in marks.map) mean clean
    snapshots/      copy-on-write snapshots
    lock            flock()ed by whichever process has the volume open for writing

Creation happens in a hidden sibling directory that is renamed into place, so
a failed ``create`` leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import shutil
import tempfile
import uuid as _uuid
from pathlib import Path

from .blockio import preallocate
from .errors import (
    UsageError,
    VolumeBusy,
    VolumeCorrupt,
    VolumeError,
    VolumeExists,
    VolumeNotFound,
)
from .geometry import (
    MAX_REGION_SIZE,
    MAX_REGIONS,
    MIN_REGION_SIZE,
    SECTOR,
    RegionGeometry,
    geometry_problem,
    region_size_problem,
    size_problem,
)
from .state_files import (
    DATA_FILE,
    FORMAT_VERSION,
    INFO_FILE,
    LOCK_FILE,
    MARKS_FILE,
    ROLES,
    SNAPSHOT_DIR,
    check_volume_fields,
    check_volume_files,
    read_volume_fields,
)

__all__ = ["DATA_FILE", "DEFAULT_REGION_SIZE", "FORMAT_VERSION", "INFO_FILE", "LOCK_FILE",
           "MARKS_FILE", "MAX_REGIONS", "MAX_REGION_SIZE", "MIN_REGION_SIZE", "ROLES", "SECTOR",
           "SNAPSHOT_DIR", "Volume", "VolumeInfo", "fsync_dir",
           "validate_geometry", "validate_region_size", "validate_size", "write_json_atomic"]

DEFAULT_REGION_SIZE = 64 << 10


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    """What a volume is. A peer checks ``uuid`` and ``generation`` before replicating.

    Every field needs a check in ``state_files.VOLUME_FIELDS``: volume.json is
    checked field by field whenever a volume is opened.
    """

    uuid: str
    size: int
    region_size: int
    role: str = "primary"
    generation: int = 1
    created: str = ""
    format: int = FORMAT_VERSION
    #: a secondary's primary: its uuid (None until the first primary pairs with it)
    peer_uuid: str | None = None
    #: the highest generation of that primary seen so far (0 before pairing)
    peer_generation: int = 0
    #: async mirroring: the last cycle committed (a primary: conveyed and acknowledged;
    #: a secondary: held whole); 0 before the first
    cycle: int = 0
    #: the point in time that cycle holds: Unix time of its take on the primary (the
    #: primary's clock), None before the first
    cycle_at: float | None = None

    @property
    def regions(self) -> int:
        return RegionGeometry(self.size, self.region_size).regions

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: Path) -> VolumeInfo:
        """Build from a parsed volume.json; VolumeCorrupt names the bad field."""
        return cls(**check_volume_fields(data, where))


def validate_size(size: int) -> None:
    """Raise UsageError unless ``size`` can be a volume's size."""
    problem = size_problem(size)
    if problem:
        raise UsageError(problem)


def validate_region_size(region_size: int) -> None:
    """Raise UsageError unless ``region_size`` can be a volume's region size."""
    problem = region_size_problem(region_size)
    if problem:
        raise UsageError(problem)


def validate_geometry(size: int, region_size: int) -> None:
    """Raise UsageError unless size and region size make a valid volume."""
    problem = geometry_problem(size, region_size)
    if problem:
        hint = "; choose a larger --region-size" if problem.endswith(" regions") else ""
        raise UsageError(problem + hint)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never half."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover (of any kind: opening a FIFO would block) is ours to replace
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Volume:
    """A volume directory on disk. Cheap to construct; opens no file descriptors."""

    def __init__(self, path: Path, info: VolumeInfo):
        self.path = path
        self.info = info
        #: how the volume is cut into regions (size and region size never change)
        self.geometry = RegionGeometry(info.size, info.region_size)
        self._lock_fd: int | None = None

    # -- paths -------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return self.path / DATA_FILE

    @property
    def marks_path(self) -> Path:
        return self.path / MARKS_FILE

    @property
    def snapshot_dir(self) -> Path:
        return self.path / SNAPSHOT_DIR

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def region_size(self) -> int:
        return self.info.region_size

    @property
    def regions(self) -> int:
        return self.geometry.regions

    # -- life cycle --------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, size: int,
               region_size: int = DEFAULT_REGION_SIZE) -> Volume:
        """Make a new volume directory at ``path``; refuse to touch anything existing."""
        path = Path(path)
        validate_geometry(size, region_size)
        if path.exists() or path.is_symlink():
            raise VolumeExists(f"{path} already exists; refusing to overwrite it")
        parent = path.absolute().parent
        if not parent.is_dir():
            raise VolumeError(f"cannot create {path}: directory {parent} does not exist")
        info = VolumeInfo(
            uuid=str(_uuid.uuid4()), size=size, region_size=region_size,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.creating-", dir=parent))
        except OSError as err:
            raise VolumeError(f"cannot create {path}: {err.strerror}") from None
        try:
            with open(tmp / DATA_FILE, "wb") as f:
                f.truncate(size)
            with open(tmp / MARKS_FILE, "wb") as f:
                f.truncate(info.regions)
                preallocate(f.fileno(), info.regions)
            (tmp / SNAPSHOT_DIR).mkdir()
            write_json_atomic(tmp / INFO_FILE, info.to_json())
            os.chmod(tmp, 0o755)
            try:
                # rename() silently replaces an empty directory, so look once more.
                if path.exists():
                    raise VolumeExists(f"{path} already exists; refusing to overwrite it")
                os.rename(tmp, path)
            except OSError as err:
                raise VolumeExists(f"cannot create {path}: {err.strerror}") from None
            fsync_dir(parent)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise VolumeError(f"cannot create {path}: {err.strerror or err}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, info)

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_files: bool = True) -> Volume:
        """Open a volume directory after checking every state file in it (state_files).

        Raises VolumeNotFound, or VolumeCorrupt (SnapshotCorrupt for a snapshot's
        files) with one line naming the damaged file. Reads only: a damaged
        volume is left exactly as it was. ``check_files=False`` checks only the
        description: enough to ask or stop a running server, whose other files
        may have been damaged while it ran.
        """
        path = Path(path)
        info_path = path / INFO_FILE
        if not path.is_dir() or not info_path.is_file():
            what = "no such directory" if not path.exists() else "not an nbdmirror volume"
            raise VolumeNotFound(f"{path}: {what}")
        vol = cls(path, VolumeInfo(**read_volume_fields(path)))
        if check_files:
            check_volume_files(path, vol.geometry)
        return vol

    def update_info(self, **changes) -> None:
        """Persist a changed description (role, generation) atomically.

        Never writes what open() would refuse, and changes the description in
        memory only once the file holds it.
        """
        info = dataclasses.replace(self.info, **changes)
        if (info.size, info.region_size) != (self.info.size, self.info.region_size):
            raise VolumeError(f"{self.path}: size and region size cannot change")
        check_volume_fields(info.to_json(), self.path / INFO_FILE)
        write_json_atomic(self.path / INFO_FILE, info.to_json())
        self.info = info

    # -- exclusive use -----------------------------------------------------
    def lock(self) -> None:
        """Take the volume for exclusive use by this process; VolumeBusy if someone has it."""
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise VolumeCorrupt(f"{self.path / LOCK_FILE}: cannot open the lock file: "
                                f"{err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VolumeBusy(f"{self.path} is in use by another process "
                             "(is it being served? see 'nbdmirror status')") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def is_locked_elsewhere(self) -> bool:
        """True when another process holds the volume (a running server)."""
        if self._lock_fd is not None:
            return False
        try:
            self.lock()
        except VolumeBusy:
            return True
        self.unlock()
        return False
