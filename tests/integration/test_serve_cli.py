"""serve / stop / status / attach through the real CLI: the life cycle and its errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import nbd
import pytest

from tests.conftest import NBDMIRROR

pytestmark = pytest.mark.integration


def one_line_error(res, code=1):
    assert res.code == code, res
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.err, res.err
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_background_serve_accepts_connections_on_return_and_refuses_a_second(serve, cli):
    s = serve(size="16M")
    # no waiting: --background returned only once the export accepts connections
    h = s.connect()
    assert h.get_size() == 16 << 20
    h.shutdown()
    line = one_line_error(cli("serve", s.vol, "--background", check=False))
    assert "already being served" in line
    assert s.pid() > 0 and (s.vol / "server.json").exists()
    info = cli("info", s.vol, "--json").json()
    assert info["served"] is True and info["listen"] == f"unix:{s.socket}"
    # in a session of its own: a Ctrl-C to the shell that started it does not reach it
    assert os.getsid(s.pid()) != os.getsid(0)


def test_the_server_allocates_with_malloc_unless_told_otherwise(serve, make_volume, cli,
                                                               monkeypatch):
    """PYTHONMALLOC=malloc (cli.server.python_env): Python's arenas were mapped and
    unmapped per request; a setting in the environment is kept."""
    def environ(pid: int) -> dict[str, str]:
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
        return {k.decode(): v.decode() for k, v in pairs}

    s = serve(size="16M")
    assert environ(s.pid())["PYTHONMALLOC"] == "malloc"
    h = s.connect()
    h.pwrite(b"m" * 4096, 0)
    assert h.pread(4096, 0) == b"m" * 4096
    h.shutdown()
    vol = make_volume(size="16M", name="told")
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc")
    cli("serve", vol, "--background")
    try:
        pid = json.loads((vol / "server.json").read_text())["pid"]
        assert environ(pid)["PYTHONMALLOC"] == "pymalloc"
    finally:
        cli("stop", vol)


def test_requests_map_no_memory_per_request(serve):
    """nbdkit makes a Python thread state per request, and CPython 3.11 maps a 16 KiB
    frame stack for each and unmaps it after (memory.keep_stack_chunks): under strace,
    400 writes must not make hundreds of mmap/munmap calls."""
    s = serve(size="16M")
    h = s.connect()
    h.pwrite(b"w" * 4096, 0)  # the connection's first requests map what they keep
    out = s.vol.parent / "strace.out"
    tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=mmap,munmap", "-o", str(out),
                               "-p", str(s.pid())], stderr=subprocess.PIPE, text=True)
    try:
        assert "attached" in tracer.stderr.readline()  # strace is tracing now
        for i in range(400):
            h.pwrite(bytes([i % 256]) * 4096, (i % 64) * 4096)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.communicate(timeout=30)
    h.shutdown()
    calls = {line.split()[-1]: int(line.split()[-2]) for line in out.read_text().splitlines()
             if line.split() and line.split()[-1] in ("mmap", "munmap")}
    assert calls.get("munmap", 0) < 40 and calls.get("mmap", 0) < 40, calls


def test_serve_on_tcp_port(make_volume, cli):
    vol = make_volume(size="16M")
    port = free_port()
    out = cli("serve", vol, "--port", port, "--background", "--json").json()
    try:
        assert out["listen"] == f"tcp:127.0.0.1:{port}"
        h = nbd.NBD()
        h.connect_uri(out["uri"])
        h.pwrite(b"tcp!", 0)
        assert h.pread(4, 0) == b"tcp!"
        h.shutdown()
        st = cli("status", vol, "--json").json()
        assert st["listen"] == f"tcp:127.0.0.1:{port}" and st["stats"]["writes"] == 1
    finally:
        cli("stop", vol)


def test_status_reports_counters_and_uptime(serve, cli):
    s = serve(size="16M", region_size="1M")
    h = s.connect()
    h.pwrite(b"a" * 8192, (1 << 20) - 4096)  # straddles regions 0 and 1
    h.pread(4096, 0)
    h.flush()
    h.shutdown()
    st = cli("status", s.vol, "--json").json()
    assert st["size"] == 16 << 20 and st["region_size"] == 1 << 20 and st["regions"] == 16
    assert st["marked_regions"] == 2
    assert st["stats"]["writes"] == 1 and st["stats"]["bytes_written"] == 8192
    assert st["stats"]["reads"] >= 1 and st["stats"]["flushes"] == 1
    assert st["uptime"] >= 0 and st["native"] == "c"
    human = cli("status", s.vol).out
    assert "marked:      2 regions" in human


def test_foreground_serve_stops_on_sigint(make_volume, cli):
    vol = make_volume(size="16M")
    proc = subprocess.Popen([NBDMIRROR, "serve", str(vol)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (vol / "server.json").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        h = nbd.NBD()
        h.connect_unix(str(vol / "nbd.sock"))
        h.pwrite(b"fg", 0)
        h.shutdown()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert cli("info", vol, "--json").json()["served"] is False
    assert (vol / "data.img").read_bytes()[:2] == b"fg"
    # nbdkit leaves its socket file behind; the server's own clean-up removes it
    leftovers = [n for n in ("nbd.sock", "admin.sock", "server.json", "nbdkit.pid")
                 if (vol / n).exists()]
    assert leftovers == []


@pytest.mark.parametrize("args, message, code", [
    (("stop", "{vol}"), "not being served", 1),
    (("status", "{vol}"), "not being served", 1),
    (("attach", "{vol}"), "not being served", 1),
    (("serve", "{vol}", "--socket", "/tmp/x.sock", "--port", "10809"), "not both", 2),
    (("attach",), "exactly one", 2),
    (("serve", "{missing}", "--background"), "no such directory", 1),
    (("status", "{missing}"), "no such directory", 1),
    (("attach", "--socket", "{missing}"), "no export is listening", 1),
])
def test_lifecycle_errors_are_one_line(make_volume, cli, tmp_path, args, message, code):
    vol = make_volume(size="4M")
    args = [a.format(vol=vol, missing=tmp_path / "missing") for a in args]
    res = cli(*args, check=False)
    assert res.code == code and message in res.err, res.err
    if code == 1:
        one_line_error(res)
    assert cli("info", vol, "--json").json()["served"] is False


def test_serve_refuses_a_socket_path_that_is_not_a_socket(make_volume, cli, tmp_path):
    vol = make_volume(size="4M")
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    line = one_line_error(cli("serve", vol, "--socket", precious, "--background", check=False))
    assert "not a socket" in line and precious.read_text() == "keep me"
