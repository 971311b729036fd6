"""`nbdmirror serve --replicate-to`: a real nbdkit primary replicating to a secondary
(an in-test listener and receiver on a real replica engine, over loopback TCP)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, wait_until
from volume_core.engine import Engine
from volume_core.replication import link
from volume_core.replication import protocol as p
from volume_core.replication.secondary import Receiver
from volume_core.volume import Volume

pytestmark = pytest.mark.integration

RS = 64 << 10


@contextlib.contextmanager
def secondary(path: Path, size: str, port: int = 0) -> Iterator[tuple[int, Receiver]]:
    """A secondary on 127.0.0.1: its replica engine and receiver, in this process."""
    run_cli("create", path, "--size", size)
    vol = Volume.open(path)
    vol.update_info(role="secondary")
    engine = Engine(vol, replica=True)
    me = p.Identity(vol.info.uuid, vol.size, vol.region_size, vol.info.generation)
    receivers: list[Receiver] = []

    def on_channel(channel: link.Channel) -> None:
        if not receivers:
            receivers.append(Receiver(engine, channel.hello.mode, channel))
        receivers[0].out = channel
        channel.start(receivers[0].handle, lambda reason: receivers[0].link_lost())

    listener = link.Listener("127.0.0.1", port, identity=me, on_channel=on_channel,
                             decide=lambda hello: p.hello_problem(hello, me, secret=False),
                             marks=lambda: receivers[0].marked_runs() if receivers else [])
    listener.start()
    try:
        yield listener.address[1], receivers
    finally:
        listener.close()
        engine.close()


def replication(vol: Path) -> dict:
    return run_cli("status", vol, "--json").json()["replication"]


@pytest.mark.parametrize("mode", ["sync", "semi-async"])
def test_writes_through_nbd_reach_the_secondary_byte_for_byte(serve, tmp_path, mode):
    with secondary(tmp_path / "s", "16M") as (port, _receivers):
        s = serve(size="16M")
        run_cli("stop", s.vol)
        run_cli("serve", s.vol, "--background", "--replicate-to", f"127.0.0.1:{port}",
                "--mode", mode)
        wait_until(lambda: replication(s.vol)["state"] in ("in-sync", "out-of-sync"), 20,
                   "the link to come up")

        def writer(k: int) -> None:
            h = s.connect()
            for i in range(200):
                h.pwrite(bytes([k + 1]) * 4096 * (1 + i % 3), ((i * 7 + k) % 200) * 4096)
            h.flush()
            h.shutdown()

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        wait_until(lambda: replication(s.vol)["state"] == "in-sync", 30, "in-sync")
        assert (s.vol / "data.img").read_bytes() == (tmp_path / "s" / "data.img").read_bytes()
        rep = replication(s.vol)
        # 3 x 200 writes of 4-12 KiB: all on the wire (plus headers), the acks back
        assert rep["link_bytes_sent"] > rep["bytes_sent"] >= 3 * 200 * 4096
        assert rep["link_bytes_received"] > 0 and rep["in_flight_bytes"] == 0
        assert rep["out_of_sync_bytes"] == 0
        human = run_cli("status", s.vol).out
        assert f"replication: {mode} to 127.0.0.1:{port}: in-sync" in human
        run_cli("stop", s.vol)


def test_a_primary_without_its_secondary_serves_and_says_so(serve):
    s = serve(size="8M")
    run_cli("stop", s.vol)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_cli("serve", s.vol, "--background", "--replicate-to", f"127.0.0.1:{port}",
            "--mode", "sync")
    h = s.connect()
    h.pwrite(b"x" * 4096, 0)  # completes at once: the region stays marked
    h.flush()
    h.shutdown()
    wait_until(lambda: replication(s.vol)["last_error"], 10, "a connect error")
    rep = replication(s.vol)
    assert rep["state"] == "disconnected" and "connection refused" in rep["last_error"]
    assert run_cli("status", s.vol, "--json").json()["marked_regions"] >= 1
    run_cli("stop", s.vol)


@pytest.mark.parametrize("args, message", [
    (["--mode", "sync"], "--mode needs --replicate-to"),
    (["--replicate-to", "127.0.0.1:7"], "needs --mode"),
    (["--replicate-to", "nowhere", "--mode", "sync"], "HOST:PORT"),
    (["--replicate-to", "127.0.0.1:7", "--mode", "sync", "--tls-cert", "c"], "--tls-key"),
])
def test_replication_options_that_do_not_fit_are_usage_errors(make_volume, args, message):
    vol = make_volume(size="8M")
    res = run_cli("serve", vol, "--background", *args, check=False)
    assert res.code == 2 and message in res.err, res
