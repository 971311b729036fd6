"""stop / snapshot stop: refused while clients are connected, clean when forced, never blind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import nbd
import pytest

from tests.conftest import Served, fill, mounted_tmpfs, run_cli, wait_until
from tests.integration.test_serve_cli import free_port, one_line_error
from volume_core.server_files import ServerPlace, pid_alive
from volume_core.volume import Volume

pytestmark = pytest.mark.integration

RUNTIME_FILES = ("nbd.sock", "admin.sock", "server.json", "nbdkit.pid", ".server.json.tmp")


def leftovers(path) -> list[str]:
    return [name for name in RUNTIME_FILES if os.path.lexists(path / name)]


def hang_up(h) -> None:
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def write_regions(h, count: int, region: int = 64 << 10) -> None:
    for i in range(count):
        h.pwrite(bytes([65 + i]) * 4096, i * 16 * region)
    h.flush()


def test_stop_refuses_while_a_client_is_connected_and_names_it(serve, cli):
    s = serve(size="64M")
    h = s.connect()
    try:
        write_regions(h, 4)
        line = one_line_error(cli("stop", s.vol, check=False))
        assert "1 NBD client is connected" in line and f"pid {os.getpid()} (" in line, line
        assert "--force" in line
        # still served, data unchanged, the client still works
        assert cli("info", s.vol, "--json").json()["served"] is True
        assert h.pread(4096, 16 * (64 << 10)) == b"B" * 4096
    finally:
        hang_up(h)


def test_stop_force_cuts_clients_off_and_still_closes_the_engine_cleanly(serve, cli):
    s = serve(size="64M")
    h = s.connect()
    try:
        write_regions(h, 4)
        pid = s.pid()
        started = time.monotonic()
        res = cli("stop", s.vol, "--force")
        assert time.monotonic() - started < 10, "stop waited for the client instead of cutting it"
        assert res.out.startswith("stopped") and not pid_alive(pid)
        # the clean close ran: the marks file holds exactly the 4 marked regions
        info = cli("info", s.vol, "--json").json()
        assert info["served"] is False and info["marked_regions"] == 4, info
        assert leftovers(s.vol) == []
        assert "closed cleanly" in (s.vol / "server.log").read_text()
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
    finally:
        hang_up(h)


def test_stop_names_a_tcp_client_by_its_address(make_volume, cli):
    vol = make_volume(size="16M")
    port = free_port()
    cli("serve", vol, "--port", port, "--background")
    h = nbd.NBD()
    try:
        h.connect_tcp("127.0.0.1", str(port))
        line = one_line_error(cli("stop", vol, check=False))
        assert "1 NBD client is connected" in line and "127.0.0.1:" in line, line
        cli("stop", vol, "--force")
    finally:
        hang_up(h)
        run_cli("stop", vol, "--force", check=False)
    assert leftovers(vol) == []


def test_a_stop_that_has_to_kill_the_server_says_so_and_fails(serve, cli):
    s = serve(size="16M")
    pid = s.pid()
    os.kill(pid, signal.SIGSTOP)  # a server that cannot act on SIGTERM
    try:
        res = cli("stop", s.vol, check=False, env=os.environ | {"NBDMIRROR_STOP_TIMEOUT": "1"})
        line = one_line_error(res)
        assert "SIGKILL" in line and str(pid) in line, line
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert not pid_alive(pid)
    assert leftovers(s.vol) == []


@pytest.fixture
def lock_holder():
    """Start a process that flocks a volume's lock file (as a stray tool would); kill it after."""
    procs: list[subprocess.Popen] = []

    def hold(vol) -> subprocess.Popen:
        code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)")
        proc = subprocess.Popen([sys.executable, "-c", code, str(vol / "lock")],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait(10)


def test_a_stale_server_file_is_never_trusted_to_signal_a_pid(serve, cli, lock_holder):
    s = serve(size="16M")
    s.kill()
    # the pid was reused by an unrelated process, and another tool holds the volume's lock
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        state = json.loads((s.vol / "server.json").read_text())
        state["pid"] = bystander.pid
        (s.vol / "server.json").write_text(json.dumps(state))
        lock_holder(s.vol)

        line = one_line_error(cli("stop", s.vol, check=False))
        assert "not stopping" in line and "not by an nbdmirror server" in line, line
        assert bystander.poll() is None, "stop signalled a process that is not the server"
        assert cli("info", s.vol, "--json").json()["served"] is False
        assert "served:      no" in cli("info", s.vol).out
        assert "not being served" in one_line_error(cli("status", s.vol, check=False))
        assert "in use by another process" in one_line_error(
            cli("serve", s.vol, "--background", check=False))
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(10)


def test_the_server_file_proves_its_pid_by_start_time(serve):
    s = serve(size="16M")
    place = ServerPlace(Volume.open(s.vol))
    state = place.recorded()
    assert state["pid"] == s.pid() and isinstance(state["started"], int)
    assert place.proves(state) and place.read_state() == state
    assert not place.proves(state | {"started": state["started"] + 1})
    assert not place.proves(state | {"pid": os.getpid(), "started": None})
    assert not ServerPlace(Volume.open(s.vol), "other").is_server_command(
        open(f"/proc/{s.pid()}/cmdline").read().split("\0"))


def test_a_killed_server_is_not_reported_as_served(serve, cli):
    s = serve(size="16M")
    s.kill()
    assert cli("info", s.vol, "--json").json()["served"] is False
    assert "not being served" in one_line_error(cli("stop", s.vol, check=False))
    # and serving again clears what the killed server left behind
    Served(s.vol).start()
    assert cli("info", s.vol, "--json").json()["served"] is True


def test_snapshot_stop_refuses_while_a_client_is_connected(serve, cli):
    s = serve(size="16M")
    cli("snapshot", "create", s.vol, "snap")
    cli("snapshot", "serve", s.vol, "snap", "--background")
    snap = s.vol / "snapshots" / "snap"
    h = nbd.NBD()
    try:
        h.connect_unix(str(snap / "nbd.sock"))
        line = one_line_error(cli("snapshot", "stop", s.vol, "snap", check=False))
        assert "1 NBD client is connected" in line and f"pid {os.getpid()} (" in line, line
        assert h.pread(512, 0) == bytes(512)
        assert "being served" in one_line_error(
            cli("snapshot", "delete", s.vol, "snap", check=False))
        started = time.monotonic()
        cli("snapshot", "stop", s.vol, "snap", "--force")
        assert time.monotonic() - started < 10
    finally:
        hang_up(h)
        run_cli("snapshot", "stop", s.vol, "snap", "--force", check=False)
    assert leftovers(snap) == []
    cli("snapshot", "delete", s.vol, "snap")


@pytest.fixture
def full_tmpfs(tmp_path):
    """A small tmpfs of our own (unmounted at the end, whatever happens)."""
    with mounted_tmpfs(tmp_path / "tmpfs", "2M") as mnt:
        yield mnt


@pytest.mark.parametrize("what", ["volume", "snapshot"])
def test_serve_on_a_full_disk_fails_at_once_and_leaves_nothing(full_tmpfs, cli, what):
    vol = full_tmpfs / "vol"
    cli("create", vol, "--size", "16M")
    cli("snapshot", "create", vol, "snap")
    place = vol if what == "volume" else vol / "snapshots" / "snap"
    def runtime_files() -> list[str]:
        # the log stays (it holds the reason); a lock file is made on first use and kept
        return sorted(n for n in os.listdir(place)
                      if not n.startswith("server.log") and n != "lock")

    before = runtime_files()
    fill(full_tmpfs)
    args = ("serve", vol) if what == "volume" else ("snapshot", "serve", vol, "snap")
    started = time.monotonic()
    res = cli(*args, "--background", check=False, timeout=60)
    line = one_line_error(res)
    assert time.monotonic() - started < 10, "serve waited out its timeout"
    assert "no space left" in line.lower(), line
    assert runtime_files() == before
    wait_until(lambda: not ServerPlace(Volume.open(vol), None if what == "volume" else "snap")
               .held(), 10, "the volume to be free")


def test_status_and_stop_work_when_a_file_was_damaged_while_served(serve, cli):
    s = serve(size="8M")
    cli("snapshot", "create", s.vol, "old")
    with open(s.vol / "snapshots" / "old" / "preserved.map", "r+b") as f:
        f.truncate(3)  # damaged while the server runs: it must still be stoppable
    assert "preserved.map" in one_line_error(cli("info", s.vol, check=False))
    assert cli("status", s.vol, "--json").json()["snapshots"] == 1
    cli("stop", s.vol)
    assert leftovers(s.vol) == []
    assert "preserved.map" in one_line_error(cli("serve", s.vol, "--background", check=False))
