"""Fixtures that start real processes and always clean them up."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from volume_core.server_files import pid_alive

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NBDMIRROR = str(BIN / "nbdmirror")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def run_cli(*args: str, check: bool = True, timeout: float = 120, **kw) -> Result:
    """Run the real ``nbdmirror`` command."""
    proc = subprocess.run([NBDMIRROR, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)
    res = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"nbdmirror {' '.join(map(str, args))} failed ({proc.returncode}):"
                             f"\n{proc.stderr}")
    return res


@pytest.fixture
def cli():
    return run_cli


def _kill_server(vol: Path) -> None:
    pidfile = vol / "nbdkit.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGKILL)


class Served:
    """A volume served in the background on a unix socket for one test."""

    def __init__(self, vol: Path):
        self.vol = vol
        self.socket = vol / "nbd.sock"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def start(self) -> Served:
        run_cli("serve", self.vol, "--background")
        return self

    def stop(self) -> None:
        run_cli("stop", self.vol, "--force")

    def pid(self) -> int:
        return int((self.vol / "nbdkit.pid").read_text())

    def kill(self) -> None:
        """SIGKILL the server and wait until the volume is released."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid):
            assert time.monotonic() < deadline, f"nbdkit pid {pid} did not die"
            time.sleep(0.02)

    def connect(self):
        import nbd

        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_unix(str(self.socket))
        return h


@pytest.fixture
def make_volume(tmp_path):
    def make(size: str = "64M", region_size: str = "64K", name: str = "vol") -> Path:
        vol = tmp_path / name
        run_cli("create", vol, "--size", size, "--region-size", region_size)
        return vol
    return make


@pytest.fixture
def serve(make_volume) -> Iterator:
    started: list[Served] = []

    def start(vol: Path | None = None, **create_kw) -> Served:
        s = Served(vol if vol is not None else make_volume(**create_kw))
        started.append(s)
        return s.start()

    yield start
    for s in started:
        with contextlib.suppress(Exception):
            run_cli("stop", s.vol, "--force", check=False, timeout=60)
        _kill_server(s.vol)


@pytest.fixture
def attach() -> Iterator:
    """Attach exports as block devices; unmount and detach whatever is left at the end."""
    devices: list[str] = []
    mounts: list[Path] = []

    def do_attach(target: Path) -> str:
        args = ("--socket", target) if str(target).endswith(".sock") else (target,)
        dev = run_cli("attach", *args).out.strip()
        devices.append(dev)
        return dev

    do_attach.mounts = mounts
    do_attach.devices = devices
    yield do_attach
    for m in reversed(mounts):
        subprocess.run(["umount", str(m)], capture_output=True)
    for dev in devices:
        run_cli("detach", dev, check=False)


def wait_until(condition, timeout: float = 30.0, what: str = "condition",
               interval: float = 0.005) -> None:
    """Wait for ``condition()`` to hold (polling every ``interval``); fail the test after
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``where`` for one test; skip where mounting is not allowed.

    On the way out every server with a pid file on it is stopped (killed if it
    will not stop) and the tmpfs is unmounted, whatever happened.
    """
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        for pidfile in where.rglob("nbdkit.pid"):
            run_cli("stop", pidfile.parent, "--force", check=False, timeout=60)
            _kill_server(pidfile.parent)
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(mnt: Path) -> Path:
    """Fill the filesystem at ``mnt`` to the last byte; return the file that holds it."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (b"\xff" * (1 << 20), b"\xff" * 4096, b"\xff"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
    finally:
        os.close(fd)
    return filler


def _cert(name: str, key, issuer_name: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, cert: x509.Certificate, key=None) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """ca.pem signs server and client; other-ca.pem signs rogue-client and rogue-server
    (each NAME.pem with its NAME.key; the leaves name localhost and 127.0.0.1)."""
    d = tmp_path_factory.mktemp("certs")
    for ca_name, leaves in (("ca", ("server", "client")),
                            ("other-ca", ("rogue-server", "rogue-client"))):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        _write_pem(d / ca_name, _cert(ca_name, ca_key, ca_name, ca_key, ca=True))
        for leaf in leaves:
            key = ec.generate_private_key(ec.SECP256R1())
            _write_pem(d / leaf, _cert(leaf, key, ca_name, ca_key, ca=False), key)
    return d
