"""The state files of a volume directory: their names, and the checks each passes before use.

    VOL/volume.json                    the description, checked field by field
    VOL/data.img                       exactly the volume's size
    VOL/marks.map                      one byte per region
    VOL/snapshots/chain.seq            absent, empty (cut short while first made) or 8 bytes
    VOL/snapshots/NAME/snapshot.json   name (= NAME), seq, created, deleting while deleted
    VOL/snapshots/NAME/store.img       the volume's size
    VOL/snapshots/NAME/preserved.map   one byte per region

Everything is checked when a volume is opened, before anything in it is
written (opening for serve removes leftovers and finishes interrupted
deletes): a damaged file is refused with one line naming it and what is
wrong, and the directory is left exactly as it was. Trusting a damaged file
does real harm: with a short preserved map, writes past its end skipped
copy-on-write and the snapshot silently took the new data.
"""

from __future__ import annotations

import json
import os
import stat
import uuid as _uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SnapshotCorrupt, VolumeCorrupt
from .geometry import RegionGeometry, geometry_problem

FORMAT_VERSION = 1
ROLES = ("primary", "secondary")

INFO_FILE = "volume.json"
DATA_FILE = "data.img"
MARKS_FILE = "marks.map"
SNAPSHOT_DIR = "snapshots"
LOCK_FILE = "lock"
CHAIN_SEQ = "chain.seq"
SNAPSHOT_INFO = "snapshot.json"
STORE = "store.img"
PRESERVED = "preserved.map"

#: the largest snapshot sequence number or chain counter accepted (one change a
#: nanosecond would take 146 years to get there)
MAX_SEQ = 1 << 62
#: times recorded (seconds since 1970) are below this: the year 5138, the bound of the
#: microseconds a CYCLE_COMMIT carries (protocol.MAX_TIME_US)
MAX_UNIX_TIME = 10**11

#: a description is a few hundred bytes; refuse to read a huge file as one
_MAX_JSON = 64 << 10

Check = tuple[Callable[[Any], bool], str]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_uuid(value: Any) -> bool:
    """A UUID in the canonical form create writes (peers compare the strings)."""
    try:
        return isinstance(value, str) and str(_uuid.UUID(value)) == value
    except ValueError:
        return False


def is_unix_time(value: Any) -> bool:
    """A time in seconds since 1970, before the year 5138 (as CYCLE_COMMIT's bound)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 <= value < MAX_UNIX_TIME)


#: every field of volume.json (VolumeInfo), with its check and the rule a user can read
VOLUME_FIELDS: dict[str, Check] = {
    "format": (lambda v: _is_int(v) and v == FORMAT_VERSION, f"must be {FORMAT_VERSION}"),
    "uuid": (_is_uuid, "must be a UUID like 12345678-9abc-def0-1234-56789abcdef0"),
    "size": (_is_int, "must be an integer number of bytes"),
    "region_size": (_is_int, "must be an integer number of bytes"),
    "role": (lambda v: isinstance(v, str) and v in ROLES, f"must be one of {', '.join(ROLES)}"),
    "generation": (lambda v: _is_int(v) and v >= 1, "must be an integer of at least 1"),
    "created": (lambda v: isinstance(v, str), "must be a string"),
    # A secondary's pairing: absent in volumes made before replication existed.
    "peer_uuid": (lambda v: v is None or _is_uuid(v), "must be null or a UUID"),
    "peer_generation": (lambda v: _is_int(v) and 0 <= v <= MAX_SEQ,
                        f"must be an integer from 0 to {MAX_SEQ}"),
    "cycle": (lambda v: _is_int(v) and 0 <= v <= MAX_SEQ,
              f"must be an integer from 0 to {MAX_SEQ}"),
    "cycle_at": (lambda v: v is None or is_unix_time(v), "must be null or a Unix time in seconds"),
}
_VOLUME_REQUIRED = ("uuid", "size", "region_size")

SNAPSHOT_FIELDS: dict[str, Check] = {
    "name": (lambda v: isinstance(v, str), "must be a string"),
    "seq": (lambda v: _is_int(v) and 1 <= v <= MAX_SEQ,
            f"must be an integer from 1 to {MAX_SEQ}"),
    "created": (lambda v: isinstance(v, str), "must be a string"),
    "deleting": (lambda v: isinstance(v, bool), "must be true or false"),
}
_SNAPSHOT_REQUIRED = ("name", "seq", "created")


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_json(path: Path, corrupt: type[Exception], what: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_JSON + 1)
    except FileNotFoundError:
        raise corrupt(f"{path}: missing") from None
    except OSError as err:
        raise corrupt(f"{path}: unreadable ({err.strerror})") from None
    if len(raw) > _MAX_JSON:
        raise corrupt(f"{path}: larger than {_MAX_JSON} bytes, not a {what}")
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise corrupt(f"{path}: not a {what} ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise corrupt(f"{path}: not a {what} (not a JSON object)")
    return data


def _check_fields(data: dict, fields: dict[str, Check], required: tuple[str, ...], where: Path,
                  corrupt: type[Exception]) -> None:
    for key in data:
        if key not in fields:
            raise corrupt(f"{where}: unknown field {key!r}")
    for key in required:
        if key not in data:
            raise corrupt(f"{where}: missing field {key!r}")
    for key, value in data.items():
        ok, rule = fields[key]
        if not ok(value):
            raise corrupt(f"{where}: {key} {_show(value)} is invalid: it {rule}")


def check_volume_fields(data: Any, where: Path) -> dict:
    """Check a parsed volume.json; return it. VolumeCorrupt names what is wrong."""
    if not isinstance(data, dict):
        raise VolumeCorrupt(f"{where}: not a volume description (not a JSON object)")
    if "format" not in data or not VOLUME_FIELDS["format"][0](data["format"]):
        raise VolumeCorrupt(f"{where}: unknown volume format {_show(data.get('format'))}")
    _check_fields(data, VOLUME_FIELDS, _VOLUME_REQUIRED, where, VolumeCorrupt)
    problem = geometry_problem(data["size"], data["region_size"])
    if problem:
        raise VolumeCorrupt(f"{where}: {problem}")
    return data


def read_volume_fields(root: Path) -> dict:
    """Read and check ``root/volume.json``."""
    where = root / INFO_FILE
    return check_volume_fields(_read_json(where, VolumeCorrupt, "volume description"), where)


def check_size(path: Path, expected: int, what: str, corrupt: type[Exception]) -> None:
    """Refuse ``path`` unless it is a regular file of exactly ``expected`` bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise corrupt(f"{path}: missing") from None
    except OSError as err:
        raise corrupt(f"{path}: unreadable ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise corrupt(f"{path}: not a regular file")
    if st.st_size != expected:
        raise corrupt(f"{path}: {st.st_size} bytes, expected {expected} ({what})")


def check_chain_seq(path: Path) -> None:
    """chain.seq is absent or empty (a crash while it was first made) or holds 8 bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_size not in (0, 8):
        raise SnapshotCorrupt(f"{path}: {st.st_size} bytes, expected 8 (a change counter)")
    if st.st_size:
        with open(path, "rb") as f:
            value = int.from_bytes(f.read(8), "little")
        if value > MAX_SEQ:
            raise SnapshotCorrupt(f"{path}: counter {value} is implausibly large "
                                  f"(at most {MAX_SEQ})")


def read_snapshot_info(path: Path) -> dict:
    """Read and check ``path/snapshot.json`` of snapshot directory ``path``."""
    where = path / SNAPSHOT_INFO
    info = _read_json(where, SnapshotCorrupt, "snapshot description")
    _check_fields(info, SNAPSHOT_FIELDS, _SNAPSHOT_REQUIRED, where, SnapshotCorrupt)
    if info["name"] != path.name:
        raise SnapshotCorrupt(f"{where}: name {_show(info['name'])} does not match its "
                              f"directory {path.name!r}")
    return info


def check_snapshot(path: Path, geometry: RegionGeometry) -> dict:
    """Check every file of snapshot directory ``path``; return its description."""
    info = read_snapshot_info(path)
    check_size(path / STORE, geometry.size, "the volume's size", SnapshotCorrupt)
    check_size(path / PRESERVED, geometry.regions, "one byte per region", SnapshotCorrupt)
    return info


def snapshot_entries(root: Path, geometry: RegionGeometry) -> list[tuple[int, Path, dict]]:
    """(seq, path, description) of every snapshot under ``root``, oldest first, all checked.

    Snapshots being deleted are included. A snapshot that vanishes while it is
    looked at (deleted by a running server) is left out; hidden directories are
    creates and deletes cut short, removed by the next server.
    """
    if not root.exists():
        return []
    if not root.is_dir():
        raise SnapshotCorrupt(f"{root}: not a directory")
    check_chain_seq(root / CHAIN_SEQ)
    out: list[tuple[int, Path, dict]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            info = check_snapshot(entry, geometry)
        except SnapshotCorrupt:
            if not entry.exists():
                continue
            raise
        out.append((info["seq"], entry, info))
    out.sort(key=lambda t: t[0])
    for (seq, a, _), (seq_b, b, _) in zip(out, out[1:], strict=False):
        if seq == seq_b:
            raise SnapshotCorrupt(f"{b / SNAPSHOT_INFO}: seq {seq} is also the seq of "
                                  f"snapshot {a.name!r}")
    return out


def check_volume_files(root: Path, geometry: RegionGeometry) -> list[tuple[int, Path, dict]]:
    """Check every file of volume directory ``root`` but volume.json; return its snapshots."""
    check_size(root / DATA_FILE, geometry.size, "the volume's size", VolumeCorrupt)
    check_size(root / MARKS_FILE, geometry.regions, "one byte per region", VolumeCorrupt)
    return snapshot_entries(root / SNAPSHOT_DIR, geometry)
