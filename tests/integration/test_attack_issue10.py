"""Attacks on the fixes of issue 10 through the real CLI and nbdkit.

Each test shows a bug an attack found, fixed since.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import NBDMIRROR, _kill_server, run_cli
from volume_core.server_files import pid_alive

pytestmark = pytest.mark.integration


def _kill_nbdkits_of(vol: Path) -> None:
    """SIGKILL every nbdkit serving ``vol`` (found by its command line), and wait."""
    want = f"volume={vol}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"nbdkit") and want in args:
            pid = int(entry.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(500):
                if not pid_alive(pid):
                    break
                threading.Event().wait(0.01)


@pytest.fixture
def volume(tmp_path):
    vol = tmp_path / "vol"
    run_cli("create", vol, "--size", "8M", "--region-size", "4K")
    yield vol
    for name in ("server.json", "nbdkit.pid", "server.log"):  # FIFOs a test made
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.lstat(vol / name).st_mode):
                os.unlink(vol / name)
    with contextlib.suppress(subprocess.TimeoutExpired):
        run_cli("stop", vol, "--force", check=False, timeout=30)
    _kill_server(vol)
    _kill_nbdkits_of(vol)


def test_info_does_not_hang_on_a_fifo_in_place_of_the_server_file(volume):
    """Bug: ServerPlace.recorded() opens server.json without checking what it is.

    Reproduce: `mkfifo VOL/server.json; nbdmirror info VOL`: hangs (open(2) of
    a FIFO waits for a writer); so do `stop`, `serve --background` and
    `snapshot create`. Every command must answer (one line, or ignore the
    bogus file), never hang.
    """
    os.mkfifo(volume / "server.json")
    try:
        res = subprocess.run([NBDMIRROR, "info", str(volume)], capture_output=True, text=True,
                             timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("nbdmirror info hung on a FIFO at server.json")
    assert res.returncode in (0, 1), res


def test_the_loser_of_two_concurrent_serves_says_why_it_lost(volume):
    """Bug: _log_reason() takes the last line of the shared VOL/server.log.

    Reproduce: start `nbdmirror serve VOL --background` twice at the same
    moment. One serves; the other fails, most of the time with "nbdkit failed
    to start: serving VOL on unix:VOL/nbd.sock: pid N, 16 threads (log: ...)":
    the winner's start-up line, not its own reason (the volume is in use).
    The loser's nbdkit message is also written to server.log without a time
    stamp (it bypasses the log reader). Seen in 6 of 8 tries here; the test
    retries up to 8 times (a fixed bug would show in all but (2/8)^8 of runs).
    """
    bad = []
    for _ in range(8):
        results: dict[int, subprocess.CompletedProcess] = {}

        def start(i: int, results: dict = results) -> None:
            results[i] = subprocess.run([NBDMIRROR, "serve", str(volume), "--background"],
                                        capture_output=True, text=True, timeout=60)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        losers = [r for r in results.values() if r.returncode != 0]
        run_cli("stop", volume, "--force", check=False, timeout=30)
        for r in losers:
            if "serving " in r.stderr and "in use" not in r.stderr \
                    and "already being served" not in r.stderr:
                bad.append(r.stderr.strip())
        if bad:
            break
    assert not bad, f"the losing serve blamed the winner's start-up line: {bad[0]}"


@pytest.mark.parametrize("name", ["server.json", "nbdkit.pid", "server.log"])
def test_serve_and_stop_refuse_a_fifo_at_a_runtime_file_without_hanging(volume, name):
    os.mkfifo(volume / name)
    for args in (["serve", volume, "--background"], ["info", volume], ["stop", volume]):
        try:
            res = subprocess.run([NBDMIRROR, *map(str, args)], capture_output=True, text=True,
                                 timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"nbdmirror {args[0]} hung on a FIFO at {name}")
        if args[0] == "serve":
            assert res.returncode == 1 and name in res.stderr, res
            assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        else:
            assert res.returncode in (0, 1) and "Traceback" not in res.stderr, res
    # (stop may have cleared it: no server holds the volume, so it is a leftover)


def test_a_directory_at_the_lock_file_is_refused_in_one_line(volume):
    (volume / "lock").mkdir()
    res = run_cli("serve", volume, "--background", check=False)
    assert res.code == 1 and "lock" in res.err and "internal error" not in res.err, res
    assert len(res.err.strip().splitlines()) == 1


def test_stop_after_a_killed_server_clears_what_it_left(volume):
    run_cli("serve", volume, "--background")
    _kill_server(volume)
    _kill_nbdkits_of(volume)
    res = run_cli("stop", volume, check=False)
    assert res.code == 1 and "not being served" in res.err
    left = [n for n in ("server.json", "nbdkit.pid", "admin.sock", "nbd.sock")
            if os.path.lexists(volume / n)]
    assert left == []
