"""The volume directory: its description, its raw data file, its lock.

Layout of a volume ``VOL/``::

    volume.json     description: format, uuid, size, region size, role, generation
    data.img        the live data, a raw sparse image (qemu-img, cmp, losetup read it)
    marks.map       the persisted write-intent map, one byte per region
    snapshots/      copy-on-write snapshots
    lock            flock()ed by whichever process has the volume open for writing

Creation happens in a hidden sibling directory that is renamed into place, so
a failed ``create`` leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import json
import os
import shutil
import tempfile
import uuid as _uuid
from pathlib import Path

from .errors import UsageError, VolumeBusy, VolumeCorrupt, VolumeError, VolumeExists, VolumeNotFound

FORMAT_VERSION = 1
SECTOR = 512
MIN_REGION_SIZE = 4 << 10
MAX_REGION_SIZE = 16 << 20
DEFAULT_REGION_SIZE = 64 << 10
#: Keeps a map small enough to hold in memory and scan quickly (256 MiB at most).
MAX_REGIONS = 1 << 28
ROLES = ("primary", "secondary")

INFO_FILE = "volume.json"
DATA_FILE = "data.img"
MARKS_FILE = "marks.map"
SNAPSHOT_DIR = "snapshots"
LOCK_FILE = "lock"


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    """What a volume is. A peer checks ``uuid`` and ``generation`` before replicating."""

    uuid: str
    size: int
    region_size: int
    role: str = "primary"
    generation: int = 1
    created: str = ""
    format: int = FORMAT_VERSION

    @property
    def regions(self) -> int:
        return -(-self.size // self.region_size)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: Path) -> VolumeInfo:
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise VolumeCorrupt(f"{where}: unknown volume format {data.get('format')!r}"
                                if isinstance(data, dict) else f"{where}: not a volume description")
        try:
            info = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except TypeError as err:
            raise VolumeCorrupt(f"{where}: incomplete volume description ({err})") from None
        validate_geometry(info.size, info.region_size)
        if info.role not in ROLES:
            raise VolumeCorrupt(f"{where}: unknown role {info.role!r}")
        return info


def validate_region_size(region_size: int) -> None:
    """Raise UsageError unless ``region_size`` is a power of two from 4K to 16M."""
    if region_size & (region_size - 1) or not MIN_REGION_SIZE <= region_size <= MAX_REGION_SIZE:
        raise UsageError(f"invalid region size {region_size}: must be a power of two "
                         "from 4K to 16M")


def validate_size(size: int) -> None:
    """Raise UsageError unless ``size`` is a positive multiple of the sector size."""
    if size <= 0 or size % SECTOR:
        raise UsageError(f"invalid size {size}: must be a positive multiple of {SECTOR} bytes")


def validate_geometry(size: int, region_size: int) -> None:
    """Raise UsageError unless size and region size make a valid volume."""
    validate_region_size(region_size)
    validate_size(size)
    if -(-size // region_size) > MAX_REGIONS:
        raise UsageError(f"size {size} with region size {region_size} gives more than "
                         f"{MAX_REGIONS} regions; choose a larger --region-size")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Volume:
    """A volume directory on disk. Cheap to construct; opens no file descriptors."""

    def __init__(self, path: Path, info: VolumeInfo):
        self.path = path
        self.info = info
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
        return self.info.regions

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
    def open(cls, path: str | os.PathLike) -> Volume:
        """Read a volume's description; raise VolumeNotFound/VolumeCorrupt with a clear line."""
        path = Path(path)
        info_path = path / INFO_FILE
        if not path.is_dir() or not info_path.is_file():
            what = "no such directory" if not path.exists() else "not an nbdmirror volume"
            raise VolumeNotFound(f"{path}: {what}")
        try:
            data = json.loads(info_path.read_text())
        except (OSError, ValueError) as err:
            raise VolumeCorrupt(f"{info_path}: unreadable volume description ({err})") from None
        info = VolumeInfo.from_json(data, info_path)
        vol = cls(path, info)
        for name in (DATA_FILE, MARKS_FILE):
            if not (path / name).is_file():
                raise VolumeCorrupt(f"{path}: missing {name}")
        actual = vol.data_path.stat().st_size
        if actual != info.size:
            raise VolumeCorrupt(f"{vol.data_path}: size {actual} does not match the volume's "
                                f"{info.size}")
        return vol

    def update_info(self, **changes) -> None:
        """Persist a changed description (role, generation) atomically."""
        self.info = dataclasses.replace(self.info, **changes)
        write_json_atomic(self.path / INFO_FILE, self.info.to_json())

    # -- exclusive use -----------------------------------------------------
    def lock(self) -> None:
        """Take the volume for exclusive use by this process; VolumeBusy if someone has it."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
