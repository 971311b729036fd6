"""Attack round on session 4's link changes, over real TCP: each test showed a bug (fixed)."""

from __future__ import annotations

import threading

import pytest

from tests.fault_proxy import FaultProxy
from tests.integration.test_link import PRIMARY, SECONDARY, Ends
from volume_core.replication import link
from volume_core.replication.protocol import Write, hello_problem

pytestmark = pytest.mark.integration

MiB = 1 << 20


def test_a_close_before_start_does_not_put_the_farewell_inside_a_frame():
    ends: list[Ends] = []
    accepted = threading.Event()

    def on_channel(channel: link.Channel) -> None:
        ends.append(Ends(channel).start())
        accepted.set()

    listener = link.Listener("127.0.0.1", 0, identity=SECONDARY, on_channel=on_channel,
                             decide=lambda hello: hello_problem(hello, SECONDARY, secret=False))
    listener.start()
    proxy = FaultProxy(listener.address).start()
    channel = link.connect(*proxy.address, identity=PRIMARY, mode="sync")
    try:
        assert accepted.wait(5)
        proxy.stall("up")  # the secondary takes nothing for now: a direct write leaves a rest
        channel.send_bulk(Write(1, 0, b"\x5a" * (24 * MiB)))  # written from here: not started
        closer = threading.Thread(target=channel.close, args=("the primary is stopping",))
        closer.start()
        proxy.resume("up")
        closer.join(10)
        reason = ends[0].wait_closed(10)
        assert reason == "the peer closed the link: the primary is stopping", reason
    finally:
        channel.close()
        proxy.close()
        listener.close()
        for end in ends:
            end.channel.close()
