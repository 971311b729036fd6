"""server.log: a running server's errors, start and stop reach it, timestamped and capped."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from cli.server import DEFAULT_THREADS
from tests.conftest import Served, _kill_server, fill, mounted_tmpfs, run_cli, wait_until
from volume_core import server_log
from volume_core.server_files import pid_alive

pytestmark = pytest.mark.integration

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
WRITE_FAILED = re.compile(
    rf"^{STAMP} ERROR nbdmirror\.plugin: pwrite of 4096 bytes at offset \d+ failed: "
    r".*No space left on device", re.MULTILINE)
SUPPRESSED = re.compile(rf"^{STAMP} suppressed \d+ more messages like: ", re.MULTILINE)


@pytest.fixture
def full_disk(tmp_path) -> Iterator[Path]:
    """A tiny tmpfs, mounted for this test only and filled up."""
    with mounted_tmpfs(tmp_path / "tmpfs", "1M") as mnt:
        fill(mnt)
        yield mnt


def data_on(vol: Path, mnt: Path) -> None:
    """Put the volume's (sparse, empty) data file on the full ``mnt``: every write gets ENOSPC."""
    data = vol / "data.img"
    size = data.stat().st_size
    data.unlink()
    with open(mnt / "data.img", "wb") as f:
        f.truncate(size)
    data.symlink_to(mnt / "data.img")


def failing_writes(s: Served, count: int) -> int:
    h = s.connect()
    failed = 0
    try:
        for i in range(count):
            try:
                h.pwrite(b"x" * 4096, (i % 256) * 65536)
            except nbd.Error as err:
                assert err.errnum is None or err.errnum == 28, err
                failed += 1
    finally:
        h.shutdown()
    return failed


def log_text(vol: Path) -> str:
    return (vol / "server.log").read_text(errors="replace")


def test_a_failed_write_is_logged_with_a_timestamp_while_the_server_runs(
        full_disk, make_volume, serve):
    vol = make_volume(size="16M")
    data_on(vol, full_disk)
    s = serve(vol)
    assert failing_writes(s, 1) == 1
    wait_until(lambda: WRITE_FAILED.search(log_text(vol)), 10, "the error in server.log")
    # nbdkit's own report (the plugin's traceback, written by nbdkit to fd 2) is there too
    wait_until(lambda: re.search(rf"^{STAMP} nbdkit: .*pwrite: error: Traceback",
                                 log_text(vol), re.MULTILINE), 10, "nbdkit's traceback")
    assert pid_alive(s.pid())
    text = log_text(vol)
    assert re.search(rf"^{STAMP} INFO nbdmirror\.plugin: serving {re.escape(str(vol))} on "
                     rf"unix:{re.escape(str(s.socket))}: pid {s.pid()}, "
                     rf"threads per connection: {DEFAULT_THREADS}", text), text


def test_repeated_errors_are_throttled_with_a_count_of_the_suppressed(
        full_disk, make_volume, serve):
    vol = make_volume(size="16M")
    data_on(vol, full_disk)
    s = serve(vol)
    assert failing_writes(s, 300) == 300
    wait_until(lambda: SUPPRESSED.search(log_text(vol)), 10, "a line counting suppressed errors")
    assert len(WRITE_FAILED.findall(log_text(vol))) < 300


def test_status_names_the_log_and_a_stop_is_logged(serve):
    s = serve(size="4M")
    st = run_cli("status", s.vol, "--json").json()
    assert st["log"] == str(s.vol / "server.log")
    assert f"log:         {s.vol / 'server.log'}" in run_cli("status", s.vol).out
    pid = s.pid()
    s.stop()
    wait_until(lambda: re.search(rf"^{STAMP} INFO nbdmirror\.plugin: stopped serving ",
                                 log_text(s.vol), re.MULTILINE), 10, "the stop line")
    wait_until(lambda: not pid_alive(pid), 10, "nbdkit to exit")


def test_the_log_files_stay_under_the_cap(full_disk, make_volume):
    cap = 8192
    vol = make_volume(size="16M")
    data_on(vol, full_disk)
    s = Served(vol)
    run_cli("serve", vol, "--background", env=os.environ | {"NBDMIRROR_LOG_CAP": str(cap)})
    try:
        def rotated_through() -> bool:
            failing_writes(s, 20)
            return (vol / "server.log.3").exists()

        wait_until(rotated_through, 60, "the log to rotate through all its files")
        failing_writes(s, 100)
        run_cli("stop", vol, "--force")
        wait_until(lambda: not server_log.readers(vol / "server.log"), 10, "the log's reader")
        files = sorted(vol.glob("server.log*"))
        assert [f.name for f in files] == ["server.log"] + [f"server.log.{i}" for i in (1, 2, 3)]
        assert sum(f.stat().st_size for f in files) <= cap, [f.stat().st_size for f in files]
    finally:
        run_cli("stop", vol, "--force", check=False)
        _kill_server(vol)


def test_a_start_that_fails_once_serving_is_explained_from_the_log(make_volume):
    vol = make_volume(size="4M")
    (vol / "admin.sock").mkdir()  # the admin socket cannot be made: after_fork fails
    (vol / "admin.sock" / "keep").touch()
    res = run_cli("serve", vol, "--background", check=False)
    assert res.code == 1, res
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "Is a directory" in lines[0] and "server.log" in lines[0], res.err
    assert not re.search(STAMP, lines[0]), lines[0]


def test_the_reason_of_a_failed_start_is_one_line_without_the_time_stamp(tmp_path):
    from cli.server import _log_reason

    log = tmp_path / "server.log"
    log.write_text("old news\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("2026-01-02T03:04:05.678+01:00 INFO nbdmirror.plugin: serving x on y\n"
                "2026-01-02T03:04:05.912+01:00 ERROR nbdmirror.plugin: the disk is on fire\n")
    assert _log_reason(log, start) == f"the disk is on fire (log: {log})"
    assert _log_reason(log, start + 10_000) == f"the disk is on fire (log: {log})"  # rotated
