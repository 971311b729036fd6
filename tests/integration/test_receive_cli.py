"""`nbdmirror receive`: a secondary in a process of its own, paired, fed, asked and stopped.

The primary's end is made in the test (link.connect with another volume's
identity), so each refusal and each frame is under the test's control.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, wait_until
from volume_core.errors import PeerRefused
from volume_core.replication import link
from volume_core.replication import protocol as p
from volume_core.server_files import pid_alive
from volume_core.volume import Volume

pytestmark = pytest.mark.integration

SIZE = 8 << 20
RS = 64 << 10
RUNTIME = ("nbdkit.pid", "server.json", "admin.sock")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def identity(vol: Path) -> p.Identity:
    info = Volume.open(vol).info
    return p.Identity(info.uuid, info.size, info.region_size, info.generation)


@pytest.fixture
def receiving(tmp_path) -> Iterator:
    """Start `receive --background` on fresh volumes; stop (or kill) every one at the end."""
    started: list[Path] = []

    def start(*extra: str, size: int = SIZE) -> tuple[Path, int, dict]:
        vol = Volume.create(tmp_path / f"s{len(started)}", size, RS).path
        port = free_port()
        started.append(vol)
        res = run_cli("receive", vol, "--listen", f"127.0.0.1:{port}", "--background",
                      "--json", *extra)
        return vol, port, res.json()

    yield start
    for vol in started:
        run_cli("stop", vol, "--force", check=False, timeout=60)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((vol / "nbdkit.pid").read_text()), signal.SIGKILL)


def status(vol: Path) -> dict:
    return run_cli("status", vol, "--json").json()["replication"]


def volume_json(vol: Path) -> dict:
    return json.loads((vol / "volume.json").read_text())


def primary(tmp_path: Path, name: str, size: int = SIZE) -> Path:
    return Volume.create(tmp_path / name, size, RS).path


def test_receive_background_status_and_stop_leave_nothing_behind(receiving):
    vol, port, started = receiving()
    pid = started["pid"]
    assert started["listen"] == f"tcp:127.0.0.1:{port}" and pid_alive(pid)
    st = status(vol)
    assert (st["state"], st["listen"], st["peer"], st["primary_uuid"]) == (
        "listening", f"tcp:127.0.0.1:{port}", None, None)
    assert "receiving on" in run_cli("status", vol).out
    assert run_cli("stop", vol, "--json").json()["pid"] == pid
    assert not pid_alive(pid)
    assert [name for name in RUNTIME if (vol / name).exists()] == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert "closed cleanly" in (vol / "server.log").read_text()


def test_first_primary_pairs_and_its_write_lands(receiving, tmp_path):
    vol, port, _ = receiving()
    pvol = primary(tmp_path, "p")
    acks: queue.Queue = queue.Queue()
    channel = link.connect("127.0.0.1", port, identity=identity(pvol), mode="sync")
    try:
        # paired once the handshake is complete (the secret checked), before any frame
        wait_until(lambda: volume_json(vol)["peer_uuid"] is not None, 10, "the pairing")
        info = volume_json(vol)
        assert (info["role"], info["peer_uuid"], info["peer_generation"]) == (
            "secondary", identity(pvol).uuid, 1)
        channel.start(acks.put)
        data = os.urandom(3 * RS)
        channel.send_bulk(p.Write(1, RS + 512, data))
        ack = acks.get(timeout=10)
        assert ack == p.DataAck(1)
        with open(vol / "data.img", "rb") as f:
            f.seek(RS + 512)
            assert f.read(len(data)) == data
        st = status(vol)
        assert (st["state"], st["mode"], st["primary_uuid"]) == (
            "connected", "sync", identity(pvol).uuid)
        assert st["writes_applied"] == 1 and st["bytes_received"] >= len(data)
        # one primary at a time, even the same one
        with pytest.raises(PeerRefused, match="already has a primary connected"):
            link.connect("127.0.0.1", port, identity=identity(pvol), mode="sync").close()
    finally:
        channel.close()
    wait_until(lambda: status(vol)["state"] == "disconnected", 10, "the link to be seen lost")
    # paired: another primary is refused and nothing is written
    before = (vol / "volume.json").read_bytes()
    other = primary(tmp_path, "other")
    with pytest.raises(PeerRefused, match=f"paired with primary volume {identity(pvol).uuid}"):
        link.connect("127.0.0.1", port, identity=identity(other), mode="sync").close()
    assert (vol / "volume.json").read_bytes() == before
    # the paired one comes back
    link.connect("127.0.0.1", port, identity=identity(pvol), mode="semi-async").close()
    # a paired secondary is not writable through serve; one line says why
    run_cli("stop", vol)
    res = run_cli("serve", vol, "--background", check=False)
    assert res.code == 1 and "is a secondary" in res.err and len(res.err.splitlines()) == 1


def test_primary_of_another_size_is_refused_and_nothing_written(receiving, tmp_path):
    vol, port, _ = receiving()
    before = (vol / "volume.json").read_bytes()
    big = primary(tmp_path, "big", size=2 * SIZE)
    with pytest.raises(PeerRefused, match="volume size differs: primary 16 MiB, secondary "
                                          "8 MiB"):
        link.connect("127.0.0.1", port, identity=identity(big), mode="sync").close()
    assert (vol / "volume.json").read_bytes() == before
    st = status(vol)
    assert st["refused"] == 1 and "volume size differs" in st["last_refusal"]


def test_wrong_or_missing_secret_is_refused_and_does_not_pair(receiving, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("correct horse\n")
    vol, port, _ = receiving("--secret-file", str(secret))
    before = (vol / "volume.json").read_bytes()
    pvol = primary(tmp_path, "p")
    with pytest.raises(PeerRefused):
        link.connect("127.0.0.1", port, identity=identity(pvol), mode="sync",
                     secret=b"wrong").close()
    with pytest.raises(PeerRefused, match="requires a shared secret"):
        link.connect("127.0.0.1", port, identity=identity(pvol), mode="sync").close()
    assert (vol / "volume.json").read_bytes() == before
    link.connect("127.0.0.1", port, identity=identity(pvol), mode="sync",
                 secret=b"correct horse").close()
    wait_until(lambda: volume_json(vol)["peer_uuid"] == identity(pvol).uuid, 10,
               "the pairing")


def test_receive_refusals_are_one_line(receiving, tmp_path):
    def refused(*args: str) -> tuple[int, str]:
        res = run_cli("receive", *args, check=False, timeout=60)
        # one error line (a usage error has click's usage hint above it), no traceback
        errors = [ln for ln in res.err.splitlines() if ln.startswith("Error: ")]
        assert len(errors) == 1 and "Traceback" not in res.err, res.err
        return res.code, errors[0]

    code, err = refused(str(tmp_path / "missing"), "--listen", "127.0.0.1:7000")
    assert code == 1 and "no such directory" in err
    vol, port, started = receiving()
    code, err = refused(str(vol), "--listen", f"127.0.0.1:{free_port()}", "--background")
    assert code == 1 and f"already receiving replication on tcp:127.0.0.1:{port}" in err
    spare = Volume.create(tmp_path / "spare", SIZE, RS).path
    for listen in ("nowhere", "127.0.0.1:0", "127.0.0.1:99999", ":7000"):
        code, err = refused(str(spare), "--listen", listen)
        assert code == 2 and "invalid address" in err
    code, err = refused(str(spare), "--listen", "127.0.0.1:7000", "--tls-cert", "c")
    assert code == 2 and "--tls-key" in err
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    code, err = refused(str(spare), "--listen", "127.0.0.1:7000", "--secret-file", str(empty))
    assert code == 1 and "is empty" in err
    # the port is taken: the child dies at once and the command says why
    code, err = refused(str(spare), "--listen", f"127.0.0.1:{port}", "--background")
    assert code == 1 and "cannot listen on 127.0.0.1" in err and "in use" in err
    assert [name for name in RUNTIME if (spare / name).exists()] == []
    assert pid_alive(started["pid"])


def test_volume_json_without_pairing_fields_still_opens(tmp_path):
    vol = Volume.create(tmp_path / "old", SIZE, RS).path
    info = volume_json(vol)
    del info["peer_uuid"], info["peer_generation"]
    (vol / "volume.json").write_text(json.dumps(info))
    opened = Volume.open(vol).info
    assert (opened.peer_uuid, opened.peer_generation) == (None, 0)
