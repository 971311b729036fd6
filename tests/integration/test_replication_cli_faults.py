"""Issue 11's faults through the commands: `serve --replicate-to` (nbdkit) and `receive` as
real processes on loopback TCP, the faults made from outside them.

A fault is a signal (SIGKILL of either side), the fault proxy between the
two (delay, cut, corruption, stall), the secondary's disk (the test-only
NBDMIRROR_TEST_FAIL_WRITES), TLS certificates, or a wrong peer on the
receiver's port. After each: host writes kept completing, the two data files
end identical, and only out-of-sync regions travelled again (the primary's
status counts them). Workloads write inside SPAN, one aligned 4 MiB intent
extent of the 32 MiB volume, so "only what was out of sync" is a number well
below the volume's size.

The primary is `serve` in the foreground, a child of the test, so that its
SIGKILL and exit are the test's own (a background one is in
test_secondary_disk_failures_are_recovered_while_host_writes_complete).
Status is polled through the admin socket (what `status --json` prints,
without a process per poll); the counts asserted are read with `status --json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NBDMIRROR, run_cli, wait_until
from tests.fault_proxy import FaultProxy
from tests.integration.test_serve_cli import free_port
from volume_core import admin
from volume_core.errors import AdminError
from volume_core.replication import protocol as p
from volume_core.replication.receiver import TEST_FAIL_WRITES
from volume_core.server_files import pid_alive
from volume_core.volume import Volume

pytestmark = pytest.mark.integration

SIZE = 32 << 20
RS = 64 << 10
REGIONS = SIZE // RS
SPAN_OFFSET, SPAN_LENGTH = 8 << 20, 4 << 20
SPAN = range(SPAN_OFFSET // RS, (SPAN_OFFSET + SPAN_LENGTH) // RS)
#: the primary's acknowledgement timeout (session.Settings; the CLI does not set it)
ACK_TIMEOUT = 5.0
#: how far past ACK_TIMEOUT a host write may be held by a fault
MARGIN = 2.5


# ------------------------------------------------------------------------------- processes


def admin_status(vol: Path) -> dict:
    return admin.call(vol / "admin.sock", "status", timeout=5)


def status_json(vol: Path) -> dict:
    return run_cli("status", vol, "--json").json()["replication"]


class Primary:
    """`nbdmirror serve VOL --replicate-to PEER --mode MODE`, in the foreground as the test's
    child (or with --background); its output goes to VOL.log."""

    def __init__(self, vol: Path) -> None:
        self.vol = vol
        self.log = vol.with_suffix(".log")
        self.proc: subprocess.Popen | None = None
        self.background = False

    def start(self, peer: str, mode: str, *extra: str, background: bool = False,
              refused: bool = False) -> Primary:
        """Serve; return once the link is up (unless the secondary is to refuse it)."""
        args = ["serve", str(self.vol), "--replicate-to", peer, "--mode", mode, *extra]
        self.background = background
        if background:
            run_cli(*args, "--background")
        else:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([NBDMIRROR, *args], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log)
            wait_until(self._ready, 20, f"{self.vol.name} to serve", interval=0.05)
        if refused:
            wait_until(lambda: self.replication()["last_error"], 10, "the refusal",
                       interval=0.05)
        else:  # a host write before that would be resynced: tests count resyncs
            wait_until(lambda: self.replication()["connects"] >= 1, 10, "the link",
                       interval=0.02)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}:\n"
                                 f"{self.log.read_text()[-3000:]}")
        try:
            return admin_status(self.vol)["replication"] is not None
        except AdminError:
            return False

    @property
    def pid(self) -> int:
        return int((self.vol / "nbdkit.pid").read_text())

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        with contextlib.suppress(OSError, ValueError):
            return pid_alive(self.pid)
        return False

    def replication(self) -> dict:
        return admin_status(self.vol)["replication"]

    def connect(self):
        import nbd

        h = nbd.NBD()
        h.connect_unix(str(self.vol / "nbd.sock"))
        return h

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        run_cli("stop", self.vol)
        if self.proc is not None:
            self.proc.wait(10)

    def close(self) -> None:
        """Whatever state it is in: gone afterwards."""
        if not self.running():
            return
        if self.background:
            # A background primary's clean stop takes 10 s (see test_secondary_disk_failures_*):
            # this is a test's end, not a test of stopping.
            with contextlib.suppress(OSError, ValueError):
                os.kill(self.pid, signal.SIGKILL)
            return
        run_cli("stop", self.vol, "--force", check=False, timeout=60)
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Secondary:
    """`nbdmirror receive VOL --listen 127.0.0.1:PORT --background`."""

    def __init__(self, vol: Path) -> None:
        self.vol = vol
        self.port = free_port()
        self.address = ("127.0.0.1", self.port)
        self.pid: int | None = None

    def start(self, *extra: str, env: dict[str, str] | None = None) -> Secondary:
        res = run_cli("receive", self.vol, "--listen", f"127.0.0.1:{self.port}", "--background",
                      "--json", *extra, env=None if env is None else os.environ | env)
        self.pid = res.json()["pid"]
        return self

    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def replication(self) -> dict:
        return admin_status(self.vol)["replication"]

    def kill(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        wait_until(lambda: not self.alive(), 10, "the receiver to die")

    def stop(self) -> None:
        run_cli("stop", self.vol)

    def close(self) -> None:
        if self.alive():
            run_cli("stop", self.vol, "--force", check=False, timeout=60)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)


class Mirror:
    """A primary volume, its secondary (receiving) and, if asked, the fault proxy between."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.secondary = Secondary(Volume.create(where / "s", SIZE, RS).path)
        self.proxy: FaultProxy | None = None
        self.peer = f"127.0.0.1:{self.secondary.port}"  # where primaries dial
        self.primaries: list[Primary] = []
        self.primary = self.new_primary("p")

    def through_proxy(self) -> FaultProxy:
        self.proxy = FaultProxy(self.secondary.address).start()
        self.peer = "{}:{}".format(*self.proxy.address)
        return self.proxy

    def new_primary(self, name: str, size: int = SIZE) -> Primary:
        primary = Primary(Volume.create(self.where / name, size, RS).path)
        self.primaries.append(primary)
        return primary

    def differing_regions(self) -> list[int]:
        """Regions whose bytes differ between the primary's and the secondary's data file."""
        differ = []
        with open(self.primary.vol / "data.img", "rb") as a, \
                open(self.secondary.vol / "data.img", "rb") as b:
            for region in range(REGIONS):
                if a.read(RS) != b.read(RS):
                    differ.append(region)
        return differ

    def wait_in_sync(self, timeout: float = 30) -> dict:
        """Wait until the primary says in-sync, then check that it is: the bytes are equal."""
        wait_until(lambda: self.primary.replication()["state"] == "in-sync", timeout,
                   "the primary to say in-sync", interval=0.05)
        assert self.differing_regions() == [], "in-sync, but the data files differ"
        return status_json(self.primary.vol)

    def close(self) -> None:
        for primary in self.primaries:
            primary.close()
        if self.proxy is not None:
            self.proxy.close()
        self.secondary.close()


@pytest.fixture
def mirror(tmp_path) -> Iterator:
    """``mirror(*receive_options, env=..., proxy=False)``: a started secondary and a primary
    volume (``m.primary.start(m.peer, mode)``); every process is gone after the test."""
    made: list[Mirror] = []

    def make(*receive_options: str, env: dict[str, str] | None = None,
             proxy: bool = False) -> Mirror:
        where = tmp_path / f"m{len(made)}"
        where.mkdir()
        made.append(m := Mirror(where))
        m.secondary.start(*receive_options, env=env)
        if proxy:
            m.through_proxy()
        return m

    yield make
    for m in made:
        m.close()


class Writer:
    """A libnbd client writing random data into SPAN until stopped; times every write."""

    def __init__(self, primary: Primary, seed: int = 0) -> None:
        self.h = primary.connect()
        self.rng = random.Random(seed)
        self.writes = 0
        self.slowest = 0.0
        self.recent: deque[float] = deque(maxlen=10)
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="writer")
        self._thread.start()

    def _run(self) -> None:
        import nbd

        rng = self.rng
        try:
            while not self._stop.is_set():
                length = rng.choice((4 << 10, 16 << 10, 64 << 10, 68 << 10))
                offset = SPAN_OFFSET + rng.randrange(0, SPAN_LENGTH - length + 1, 4096)
                data = rng.randbytes(length)
                start = time.monotonic()
                self.h.pwrite(data, offset)
                took = time.monotonic() - start
                self.slowest = max(self.slowest, took)
                self.recent.append(took)
                self.writes += 1
        except nbd.Error as err:
            self.error = err

    def wait_for(self, n: int, what: str, timeout: float = 30) -> None:
        """Wait until ``n`` more writes have completed."""
        target = self.writes + n
        wait_until(lambda: self.writes >= target or self.error is not None, timeout,
                   f"{n} writes {what}", interval=0.01)
        assert self.error is None, f"a host write failed {what}: {self.error}"

    def stop(self, expect_error: bool = False) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "a host write never completed"
        if expect_error:
            assert self.error is not None
            with contextlib.suppress(Exception):
                self.h.close()
            return
        assert self.error is None, f"a host write failed: {self.error}"
        self.h.flush()
        self.h.shutdown()


def logged(secondary: Secondary, text: str) -> None:
    """Wait for ``text`` in the receiver's server.log (written by a process of its own)."""
    log = secondary.vol / "server.log"
    wait_until(lambda: text in log.read_text(), 10, f"{text!r} in {log}", interval=0.02)


def digest(vol: Path) -> str:
    return hashlib.sha256((vol / "data.img").read_bytes()).hexdigest()


def assert_resent_only_out_of_sync(rep: dict, faults: int) -> None:
    """The last resync sent whole out-of-sync regions, all in SPAN, and every resync since
    the start (one per fault) together no more than SPAN each."""
    resync = rep["resync"]
    assert not resync["running"] and resync["regions_sent"] == resync["regions"]
    assert 1 <= resync["regions"] <= len(SPAN), resync
    assert resync["bytes_sent"] == resync["regions"] * RS
    assert rep["resync_bytes"] <= faults * SPAN_LENGTH, rep


# -------------------------------------------------------------------------------- the tests


def fio_verified_randwrite(primary: Primary) -> None:
    """fio 4K random writes over SPAN on ``primary``, each read back and checked (crc32c)."""
    uri = f"nbd+unix:///?socket={primary.vol / 'nbd.sock'}"
    done = subprocess.run(
        ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
         "--bs=4k", "--iodepth=16", f"--size={SPAN_LENGTH}", f"--offset={SPAN_OFFSET}",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
         "--output-format=terse"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
@pytest.mark.parametrize("mode", ["sync", "semi-async"])
def test_fio_verified_randwrite_ends_byte_for_byte_on_the_secondary(mirror, mode):
    m = mirror()
    m.primary.start(m.peer, mode)
    fio_verified_randwrite(m.primary)
    rep = m.wait_in_sync()
    assert rep["writes_sent"] >= SPAN_LENGTH // 4096 and rep["links_lost"] == 0
    assert rep["resync"]["regions"] == 0
    m.primary.stop()
    m.secondary.stop()
    assert m.differing_regions() == []


def writing(m, mode: str, *start_args: str, writes: int = 200,
            what: str = "with the link up") -> Writer:
    """The primary started in ``mode`` and a writer going, ``writes`` of its writes done."""
    m.primary.start(m.peer, mode, *start_args)
    writer = Writer(m.primary)
    writer.wait_for(writes, what)
    return writer


def test_receiver_killed_mid_workload_restarts_and_only_out_of_sync_regions_travel(mirror):
    m = mirror()
    writer = writing(m, "semi-async")
    m.secondary.kill()
    wait_until(lambda: m.primary.replication()["state"] == "disconnected", 10,
               "the primary to see the link lost", interval=0.02)
    writer.wait_for(100, "while the secondary is down")
    m.secondary.start()
    wait_until(lambda: m.primary.replication()["connects"] == 2, 20, "the primary to reconnect",
               interval=0.05)
    writer.wait_for(100, "after the secondary came back")
    writer.stop()
    rep = m.wait_in_sync()
    assert (rep["connects"], rep["links_lost"]) == (2, 1)
    assert_resent_only_out_of_sync(rep, faults=1)
    assert writer.slowest < ACK_TIMEOUT + MARGIN
    assert status_json(m.secondary.vol)["state"] == "connected"


def test_primary_killed_mid_workload_restarts_and_resyncs_what_was_marked(mirror):
    m = mirror()
    writer = writing(m, "sync")
    m.primary.kill()
    writer.stop(expect_error=True)
    marks = (m.primary.vol / "marks.map").read_bytes()
    marked = [region for region, mark in enumerate(marks) if mark]
    assert marked and set(marked) <= set(SPAN), marked
    m.primary.start(m.peer, "sync")
    rep = m.wait_in_sync()
    # everything marked at the restart, and nothing else, travelled again
    assert rep["resync"]["regions"] == len(marked)
    assert rep["resync"]["bytes_sent"] == len(marked) * RS
    m.primary.stop()
    assert m.differing_regions() == []


def test_secondary_power_loss_its_marks_bring_back_what_the_primary_had_cleared(mirror):
    """A DATA_ACK goes before the secondary's fdatasync and the primary clears its marks on
    it: power lost then may lose data the primary believes is there. The secondary's
    durable marks name it, and the handshake carries them. Simulated: both stopped
    cleanly (the primary with nothing marked), then some regions of the secondary's data
    changed and exactly those marked in its marks.map (one never written: zeros there)."""
    m = mirror()
    m.primary.start(m.peer, "sync")
    h = m.primary.connect()
    h.pwrite(random.Random(7).randbytes(SPAN_LENGTH), SPAN_OFFSET)
    h.flush()
    h.shutdown()
    m.wait_in_sync()
    wait_until(lambda: m.primary.replication()["marked_regions"] == 0, 10,
               "the primary to clear its marks", interval=0.05)
    m.primary.stop()
    m.secondary.stop()
    lost = [2, SPAN[3], SPAN[4], SPAN[40]]
    marks = bytearray((m.secondary.vol / "marks.map").read_bytes())
    assert not any(marks)
    with open(m.secondary.vol / "data.img", "r+b") as data:
        for region in lost:
            data.seek(region * RS)
            data.write(b"\xee" * RS)
            marks[region] = 1
    (m.secondary.vol / "marks.map").write_bytes(marks)
    assert m.differing_regions() == lost
    m.secondary.start()
    m.primary.start(m.peer, "sync")
    rep = m.wait_in_sync()
    assert rep["peer_marked_regions"] == len(lost)
    assert (rep["resync"]["regions"], rep["resync"]["bytes_sent"]) == (len(lost), len(lost) * RS)
    assert rep["resync_bytes"] == (len(lost) - 1) * RS  # region 2 went as a ZERO frame
    m.primary.stop()
    m.secondary.stop()
    assert m.differing_regions() == []


FAULTS = {
    # fault: (mode, what it does to the proxy)
    "delay": ("sync", lambda proxy: proxy.delay(0.02)),
    "cut": ("semi-async", lambda proxy: proxy.cut_after(100_000, "up")),
    "corrupt": ("sync", lambda proxy: proxy.corrupt_at(100_000, "up")),
    "stall": ("semi-async", lambda proxy: proxy.stall()),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_link_fault_through_the_proxy_keeps_host_writes_going_and_resyncs(mirror, fault):
    mode, inject = FAULTS[fault]
    m = mirror(proxy=True)
    assert m.proxy is not None
    writer = writing(m, mode, writes=100, what="before the fault")
    inject(m.proxy)
    if fault == "delay":
        writer.wait_for(20, "through the delay")
        # a sync write waits for its data's acknowledgement: a round trip through the delay
        assert min(writer.recent) >= 0.04, list(writer.recent)
        m.proxy.delay(0)
    else:
        wait_until(lambda: m.primary.replication()["links_lost"] >= 1,
                   ACK_TIMEOUT + MARGIN + 5, "the primary to drop the link", interval=0.02)
        writer.wait_for(50, "while the link is down")
        if fault == "stall":
            m.proxy.resume()
        wait_until(lambda: m.primary.replication()["connects"] >= 2, 20,
                   "the primary to reconnect", interval=0.05)
    writer.wait_for(50, "after the fault")
    writer.stop()
    rep = m.wait_in_sync()
    assert writer.slowest < ACK_TIMEOUT + MARGIN, writer.slowest
    if fault == "delay":
        assert (rep["links_lost"], rep["resync_bytes"]) == (0, 0)  # nothing was resent
    else:
        assert_resent_only_out_of_sync(rep, faults=rep["connects"] - 1)
    if fault == "stall":  # a write was held until the timeout let it go, and no longer
        assert writer.slowest >= ACK_TIMEOUT - 1, writer.slowest
    if fault == "corrupt":
        reason = status_json(m.secondary.vol)["last_close_reason"]
        assert "checksum mismatch" in reason or "bad magic" in reason, reason


@pytest.mark.parametrize("background", [
    False,
    True,  # nbdkit forks after building the replicator: its threads must start after
], ids=["foreground", "background"])
def test_secondary_disk_failures_are_recovered_while_host_writes_complete(mirror, background):
    # regions 130-131 fail once (the write), region 140 five times (the write and four
    # recoveries, about 1.5 s of backoff): long enough for status to show it recovering
    m = mirror(env={TEST_FAIL_WRITES: "130:2:1,140:1:5"})
    logged(m.secondary, f"TEST ONLY: {TEST_FAIL_WRITES}=130:2:1,140:1:5")
    m.primary.start(m.peer, "semi-async", background=background)
    h = m.primary.connect()
    for offset, length in ((130 * RS, 2 * RS), (140 * RS + 4096, 8192), (150 * RS, RS)):
        start = time.monotonic()
        h.pwrite(os.urandom(length), offset)
        assert time.monotonic() - start < 1.0  # semi-async: the metadata's ack, not the disk's
    h.flush()
    h.shutdown()

    seen = {"recovering_regions": 0, "marked_regions": 0}

    def recovered() -> bool:
        st = m.secondary.replication()
        for key in seen:
            seen[key] = max(seen[key], st[key])
        return st["regions_recovered"] >= 3 and st["recovering_regions"] == 0

    wait_until(recovered, 8, "the secondary to recover regions 130, 131 and 140", interval=0.02)
    st = status_json(m.secondary.vol)
    assert (st["write_failures"], st["regions_recovered"], st["recovery_attempts"]) == (2, 3, 6)
    assert seen["recovering_regions"] >= 1 and seen["marked_regions"] >= 1, seen
    rep = m.wait_in_sync(10)
    assert (rep["write_failures_reported"], rep["regions_read"], rep["links_lost"]) == (2, 6, 0)


def test_tls_through_the_commands_and_an_untrusted_primary_is_refused(mirror, certs):
    m = mirror("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
               "--tls-ca", str(certs / "ca.pem"))
    before = digest(m.secondary.vol)
    rogue = m.primary.start(m.peer, "sync", "--tls-ca", str(certs / "ca.pem"),
                            "--tls-cert", str(certs / "rogue-client.pem"),
                            "--tls-key", str(certs / "rogue-client.key"), refused=True)
    rep = status_json(rogue.vol)
    assert rep["state"] == "disconnected" and rep["connects"] == 0
    assert "TLS: the secondary does not trust this side's certificate" in rep["last_error"]
    rogue.stop()
    assert m.secondary.alive() and digest(m.secondary.vol) == before
    logged(m.secondary, "TLS: the primary's certificate is not signed by the CA in")
    assert status_json(m.secondary.vol)["primary_uuid"] is None  # not paired
    writer = writing(m, "sync", "--tls-ca", str(certs / "ca.pem"),
                     "--tls-cert", str(certs / "client.pem"),
                     "--tls-key", str(certs / "client.key"), writes=100, what="over TLS")
    writer.stop()
    m.wait_in_sync()


# ------------------------------------------------------------------ the receiver's port


def answers(sock: socket.socket) -> list[p.Frame]:
    """The frames the receiver sends on ``sock`` until it closes the connection."""
    decoder = p.Decoder()
    frames: list[p.Frame] = []
    while chunk := sock.recv(1 << 16):
        decoder.receive_data(chunk)
        while isinstance(frame := decoder.next_frame(), p.Frame):
            frames.append(frame)
    return frames


def talk(port: int, data: bytes) -> list[p.Frame]:
    """Send ``data`` to the receiver and end the stream; what it answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return answers(sock)


def handshake(port: int, vol: Path) -> tuple[socket.socket, p.Connection]:
    """A raw primary with ``vol``'s identity: a plain socket past the handshake."""
    info = Volume.open(vol, check_files=False).info
    conn = p.Connection("primary")
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(conn.send(conn.make_hello(uuid=info.uuid, size=info.size,
                                               region_size=info.region_size,
                                               generation=info.generation, mode="sync")))
        while conn.state is not p.State.READY:  # HELLO_REPLY, MARKED_RUNS; refused: raises
            frame = conn.next_frame()
            assert isinstance(frame, (p.NeedData, p.HelloReply, p.MarkedRuns)), frame
            if isinstance(frame, p.NeedData):
                conn.receive_data(sock.recv(1 << 16))
    except BaseException:
        sock.close()
        raise
    return sock, conn


def test_garbage_and_half_frames_on_the_receivers_port_write_nothing(mirror):
    m = mirror()
    port = m.secondary.port
    before = digest(m.secondary.vol)
    # bytes from something that is not a primary: refused with the reason, at once
    frames = talk(port, random.Random(1).randbytes(300))
    assert len(frames) == 1 and "not an nbdmirror peer" in frames[0].reason
    # half a HELLO, then the end of the stream
    hello = p.Connection("primary").make_hello(
        uuid=Volume.open(m.primary.vol).info.uuid, size=SIZE, region_size=RS, generation=1,
        mode="sync")
    half = p.encode(hello)[:60]
    frames = talk(port, half)
    assert len(frames) == 1 and "closed in the middle of a frame" in frames[0].reason
    # half a HELLO from a peer that then says nothing: the right primary is not kept out
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stuck:
        stuck.sendall(half)
        writer = writing(m, "sync", writes=50, what="while a half HELLO waits")
        writer.stop()
        m.wait_in_sync()
        m.primary.stop()
    assert m.secondary.alive() and digest(m.secondary.vol) != before
    before = digest(m.secondary.vol)
    applied = status_json(m.secondary.vol)["writes_applied"]

    taken = [m.secondary.replication()["connects"]]  # channels the receiver has taken

    def dropped() -> None:  # one primary at a time: the last one must be gone first
        def gone() -> bool:  # counted first: else "disconnected" may be from before it came
            st = m.secondary.replication()
            return st["connects"] >= taken[0] and st["state"] == "disconnected"

        wait_until(gone, 10, "the receiver to let the last primary go", interval=0.02)
        taken[0] += 1  # the next raw primary's

    dropped()
    # past the handshake (the paired primary's identity): half a WRITE, then the end
    sock, conn = handshake(port, m.primary.vol)
    with sock:
        sock.sendall(conn.send(p.Write(1, SPAN_OFFSET, b"\xee" * RS))[:RS // 2])
    dropped()
    # past the handshake: a WRITE whose payload does not match its checksum
    sock, conn = handshake(port, m.primary.vol)
    frame = bytearray(conn.send(p.Write(1, SPAN_OFFSET, b"\xee" * RS)))
    frame[-1] ^= 0xFF
    with sock:
        sock.sendall(frame)
        reasons = [f.reason for f in answers(sock) if isinstance(f, p.Error)]
    assert len(reasons) == 1 and "payload checksum mismatch" in reasons[0], reasons
    dropped()
    assert m.secondary.alive() and digest(m.secondary.vol) == before
    st = status_json(m.secondary.vol)
    assert st["writes_applied"] == applied and st["pending_writes"] == 0
    # and the primary still comes back
    m.primary.start(m.peer, "sync")
    writer = Writer(m.primary, seed=2)
    writer.wait_for(20, "after the garbage")
    writer.stop()
    m.wait_in_sync()


def test_wrong_primaries_through_the_commands_are_refused_and_the_right_one_still_pairs(
        mirror, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("correct horse\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    m = mirror("--secret-file", str(secret))
    before = digest(m.secondary.vol)

    def refused(primary: Primary, secret_file: Path, reason: str) -> None:
        primary.start(m.peer, "semi-async", "--secret-file", str(secret_file), refused=True)
        h = primary.connect()  # the host is served meanwhile
        h.pwrite(b"\x01" * RS, SPAN_OFFSET)
        h.shutdown()
        rep = status_json(primary.vol)
        assert rep["connects"] == 0 and f"the secondary refused: {reason}" in rep["last_error"]
        logged(m.secondary, reason)
        primary.stop()
        assert m.secondary.alive() and digest(m.secondary.vol) == before

    # (the secondary's status counts no failed authentication: its log names it)
    refused(m.primary, wrong, "authentication failed: the primary does not know the shared "
                              "secret")
    refused(m.new_primary("big", 2 * SIZE), secret,
            "volume size differs: primary 64 MiB, secondary 32 MiB")
    assert status_json(m.secondary.vol)["primary_uuid"] is None
    # the right one: pairs, and its refused write travels
    m.primary.start(m.peer, "semi-async", "--secret-file", str(secret))
    m.wait_in_sync()
    m.primary.stop()
    before = digest(m.secondary.vol)
    uuid = Volume.open(m.primary.vol).info.uuid
    other = m.new_primary("other")
    refused(other, secret, f"the secondary is paired with primary volume {uuid}; this primary "
                           f"is volume {Volume.open(other.vol).info.uuid}")
    st = status_json(m.secondary.vol)
    assert st["refused"] >= 2 and st["primary_uuid"] == uuid
    m.primary.start(m.peer, "semi-async", "--secret-file", str(secret))
    m.wait_in_sync()
