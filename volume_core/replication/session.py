"""Keeps a primary connected to its secondary: connect, hand over, sweep, reconnect.

One thread per primary. It dials the secondary (link.connect), gives the
channel to the replicator (PrimaryReplicator.connected), sweeps acknowledged
regions out of the marks while the channel lives, and when the channel dies,
waits (jittered exponential backoff) and dials again. Host writes never wait
for any of this: while there is no channel they complete at once and their
regions stay marked.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable

from ..errors import LinkError, PeerRefused, ProtocolError
from . import link
from .primary import PrimaryReplicator
from .protocol import Identity

log = logging.getLogger(__name__)


class PrimarySession:
    """The connection life cycle of one primary's replicator."""

    def __init__(self, replicator: PrimaryReplicator, host: str, port: int, *,
                 identity: Callable[[], Identity], secret: bytes | None = None,
                 tls: ssl.SSLContext | None = None, sweep_interval: float = 1.0,
                 options: link.ChannelOptions | None = None,
                 backoff: link.Backoff | None = None) -> None:
        self.replicator = replicator
        self.host, self.port = host, port
        self._identity = identity
        self._secret, self._tls, self._options = secret, tls, options
        self._sweep_interval = sweep_interval
        self._backoff = backoff or link.Backoff()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"replicate-to {host}:{port}")
        self.channel: link.Channel | None = None
        self.last_error: str | None = None
        self.connects = 0

    def start(self) -> PrimarySession:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop dialling and close the channel (writes from now on stay marked)."""
        self._stop.set()
        channel = self.channel
        if channel is not None:
            channel.close("the primary is stopping")
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            channel = self._dial()
            if channel is None:
                self._stop.wait(self._backoff.next_delay())
                continue
            self._backoff.reset()
            self._serve(channel)

    def _dial(self) -> link.Channel | None:
        try:
            channel = link.connect(self.host, self.port, identity=self._identity(),
                                   mode=self.replicator.mode, secret=self._secret,
                                   tls=self._tls, options=self._options)
        except (LinkError, PeerRefused, ProtocolError, OSError) as err:
            if str(err) != self.last_error:
                log.warning("cannot replicate to %s:%d: %s", self.host, self.port, err)
            self.last_error = str(err)
            return None
        self.last_error = None
        self.connects += 1
        return channel

    def _serve(self, channel: link.Channel) -> None:
        """Hand ``channel`` to the replicator and sweep until it closes."""
        closed = threading.Event()

        def on_close(reason: str) -> None:
            self.replicator.disconnected(reason)
            self.last_error = reason
            closed.set()

        self.channel = channel
        self.replicator.connected(channel)
        channel.start(self.replicator.on_frame, on_close)
        try:
            while not closed.wait(self._sweep_interval):
                if self._stop.is_set():
                    break
                self.replicator.sweep()
        finally:
            self.channel = None
            if not closed.is_set():
                channel.close("the primary is stopping")
            self.replicator.disconnected(channel.close_reason or "closed")

    def status(self) -> dict:
        return {"peer": f"{self.host}:{self.port}", "connects": self.connects,
                "last_error": self.last_error}
