"""Attaching an NBD export as a block device, and detaching it.

Where the kernel has the ``nbd`` module, ``nbd-client`` gives ``/dev/nbdN``.
Elsewhere ``nbdfuse`` exposes the export as a file and ``losetup`` turns that
file into ``/dev/loopN``. Each attachment is recorded under
``/run/nbdmirror/attach/`` so ``detach DEVICE`` can undo it in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from volume_core.errors import DeviceError
from volume_core.server_files import ServerPlace, pid_alive

from .procs import require, run, wait_for
from .server import RUN_DIR, Endpoint, choose_endpoint

ATTACH_DIR = RUN_DIR / "attach"
FUSE_DIR = RUN_DIR / "fuse"
READY_TIMEOUT = 30.0


def kernel_nbd_available() -> bool:
    if Path("/sys/module/nbd").exists() and Path("/dev/nbd0").exists():
        return True
    if shutil.which("modprobe") is None:
        return False
    probe = subprocess.run(["modprobe", "nbd"], capture_output=True)
    return probe.returncode == 0 and wait_for(lambda: Path("/dev/nbd0").exists(), 5)


def _record_path(device: str) -> Path:
    return ATTACH_DIR / f"{Path(device).name}.json"


def _write_record(record: dict) -> None:
    ATTACH_DIR.mkdir(parents=True, exist_ok=True)
    _record_path(record["device"]).write_text(json.dumps(record, indent=2) + "\n")


def attachments() -> list[dict]:
    """Every attachment nbdmirror made that is still recorded."""
    out = []
    for path in sorted(ATTACH_DIR.glob("*.json")) if ATTACH_DIR.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out


def _endpoint_key(text: str | None) -> str | None:
    """An export address in one spelling: a unix socket by its real path."""
    if text and text.startswith("unix:"):
        return "unix:" + os.path.realpath(text[len("unix:"):])
    return text


def attached_to(place: ServerPlace) -> list[dict]:
    """The recorded attachments of the export of ``place`` (a volume, a snapshot, or the
    consistent images).

    An attachment matches by the export it reaches: the address the running
    server listens on, or the place's default socket (a server that died may
    have left a device behind). Attachments made with ``attach VOL`` also name
    the volume.
    """
    keys = {_endpoint_key(str(choose_endpoint(place, None, None, "127.0.0.1")))}
    state = place.read_state()
    if state and state.get("listen"):
        keys.add(_endpoint_key(state["listen"]))
    mine = str(place.volume.path.absolute())
    return [rec for rec in attachments()
            if _endpoint_key(rec.get("endpoint")) in keys
            or (place.live and rec.get("volume") == mine
                and rec.get("snapshot") is None)]


def ensure_not_attached(place: ServerPlace, hint: str) -> None:
    """DeviceError when a block device made by 'attach' still reaches ``place``'s export."""
    found = attached_to(place)
    if found:
        raise DeviceError(f"{place.what} is attached as {found[0]['device']}; detach it first"
                          f"{hint}")


def attach(endpoint: Endpoint, volume: str | None = None) -> dict:
    """Attach the export at ``endpoint``; return the attachment record (with 'device')."""
    if kernel_nbd_available():
        record = _attach_nbd(endpoint)
    else:
        record = _attach_loop(endpoint)
    record.update(endpoint=str(endpoint), volume=volume, attached=time.time())
    _write_record(record)
    return record


def _attach_nbd(endpoint: Endpoint) -> dict:
    client = require("nbd-client", "nbd-client")
    for dev in sorted(Path("/dev").glob("nbd[0-9]*"), key=lambda p: int(p.name[3:])):
        if Path(f"/sys/block/{dev.name}/pid").exists():
            continue
        if endpoint.socket is not None:
            args = [client, "-unix", str(endpoint.socket), str(dev)]
        else:
            args = [client, endpoint.host, str(endpoint.port), str(dev)]
        run(args + ["-block-size", "4096"], f"cannot attach {dev}", DeviceError)
        return {"device": str(dev), "method": "nbd-client"}
    raise DeviceError("no free /dev/nbdN device")


def _attach_loop(endpoint: Endpoint) -> dict:
    nbdfuse = require("nbdfuse", "nbdfuse")
    losetup = require("losetup", "mount")
    require("fusermount3", "fuse3")
    FUSE_DIR.mkdir(parents=True, exist_ok=True)
    import tempfile

    mountpoint = Path(tempfile.mkdtemp(prefix="export-", dir=FUSE_DIR))
    pidfile = mountpoint.with_suffix(".pid")
    log = mountpoint.with_suffix(".log")
    if endpoint.socket is not None:
        target = ["--unix", str(endpoint.socket)]
    else:
        target = ["--tcp", endpoint.host, str(endpoint.port)]
    with open(log, "wb") as logf:
        proc = subprocess.Popen([nbdfuse, "-P", str(pidfile), str(mountpoint), *target],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    if not wait_for(lambda: pidfile.exists() or proc.poll() is not None, READY_TIMEOUT) \
            or proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        reason = log.read_text(errors="replace").strip().splitlines()
        _remove_quietly(mountpoint, pidfile, log)
        raise DeviceError(f"nbdfuse could not connect to {endpoint}: "
                          f"{reason[-1] if reason else 'no reason given'}")
    try:
        device = run([losetup, "-f", "--show", str(mountpoint / "nbd")],
                     "cannot set up a loop device", DeviceError).strip()
    except DeviceError:
        _unmount_fuse(mountpoint, proc.pid)
        _remove_quietly(mountpoint, pidfile, log)
        raise
    return {"device": device, "method": "nbdfuse+loop", "fuse_mountpoint": str(mountpoint),
            "nbdfuse_pid": proc.pid}


def mounted_at(device: str) -> list[str]:
    """Mount points of ``device`` (and of its partitions)."""
    real = os.path.realpath(device)
    points = []
    with open("/proc/mounts") as f:
        for line in f:
            src, target = line.split()[:2]
            if src == real or src.startswith(real + "p"):
                points.append(target.encode().decode("unicode_escape"))
    return points


def detach(device: str) -> dict:
    """Undo an attachment: device first, then what backs it. Refuses while mounted."""
    record_path = _record_path(device)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        raise DeviceError(f"{device} was not attached by nbdmirror (no record in "
                          f"{ATTACH_DIR})") from None
    points = mounted_at(record["device"])
    if points:
        raise DeviceError(f"{record['device']} is mounted on {points[0]}; unmount it first")
    if record["method"] == "nbd-client":
        run([require("nbd-client", "nbd-client"), "-d", record["device"]],
            f"cannot detach {record['device']}", DeviceError)
    else:
        dev = record["device"]
        backing = Path(f"/sys/block/{Path(dev).name}/loop/backing_file")
        if backing.exists():
            run(["losetup", "-d", dev], f"cannot detach {dev}", DeviceError)
            if not wait_for(lambda: not backing.exists(), 30):
                raise DeviceError(f"{dev} is still in use; it will detach when released")
        mountpoint = Path(record["fuse_mountpoint"])
        _unmount_fuse(mountpoint, record.get("nbdfuse_pid"))
        _remove_quietly(mountpoint, mountpoint.with_suffix(".pid"),
                        mountpoint.with_suffix(".log"))
    record_path.unlink()
    return record


def fuse_mounted(mountpoint: Path) -> bool:
    """True while anything is mounted on ``mountpoint``, dead or alive.

    A FUSE mount whose daemon died answers stat() with "Transport endpoint is
    not connected", so os.path.ismount() says no; the mount table still has it.
    """
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # field 5 is the mount point, with space, tab, newline and \\ escaped in octal
            point = line.split()[4].encode().decode("unicode_escape")
            if point == target:
                return True
    return False


def _unmount_fuse(mountpoint: Path, pid: int | None) -> None:
    if fuse_mounted(mountpoint):
        try:
            run(["fusermount3", "-u", str(mountpoint)], f"cannot unmount {mountpoint}",
                DeviceError)
        except DeviceError:
            if fuse_mounted(mountpoint):  # fusermount3 may fail on a dead mount: detach lazily
                run(["umount", "-l", str(mountpoint)], f"cannot unmount {mountpoint}",
                    DeviceError)
    if pid:
        wait_for(lambda: not pid_alive(pid), 30)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child


def _remove_quietly(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() else p.unlink()
