"""Keeps a primary connected to its secondary: connect, hand over, sweep, reconnect.

One thread per primary. It dials the secondary (link.connect), gives the
channel to the replicator (PrimaryReplicator.connected), sweeps acknowledged
regions out of the marks while the channel lives, and when the channel dies,
waits (jittered exponential backoff) and dials again. Host writes never wait
for any of this: while there is no channel they complete at once and their
regions stay marked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import LinkError, NbdMirrorError, PeerRefused, ProtocolError, UsageError
from ..units import parse_size
from . import link, tls
from .mirror import ASYNC, DEFAULT_INTERVAL, AsyncMirror
from .primary import MODES as REPLICATED_MODES
from .primary import PrimaryReplicator
from .protocol import Identity

#: every mode a primary can replicate in
MODES = (*REPLICATED_MODES, ASYNC)
#: the shortest and the longest interval between async cycles (a second, a day)
MIN_INTERVAL = 1.0
MAX_INTERVAL = 86400.0

log = logging.getLogger(__name__)


class PrimarySession:
    """The connection life cycle of one primary's replicator."""

    def __init__(self, replicator: PrimaryReplicator | AsyncMirror, host: str, port: int, *,
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
            # A last sweep while the link is up: what both sides hold the same is not
            # sent again by the next start (in any mode).
            with contextlib.suppress(NbdMirrorError, OSError):
                self.replicator.sweep()
            channel.close("the primary is stopping")
        self._thread.join(timeout)
        self.replicator.close()

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
        self.connects += 1  # counted once the replicator has it: writes from now are sent
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

    def status(self) -> dict[str, Any]:
        channel = self.channel
        stats = channel.stats() if channel is not None else None
        return self.replicator.status() | {
            "peer": f"{self.host}:{self.port}", "connects": self.connects,
            "last_error": self.last_error,
            "link_bytes_sent": stats.bytes_sent if stats else 0,
            "link_bytes_received": stats.bytes_received if stats else 0,
            "rtt": None if stats is None or stats.rtt is None else round(stats.rtt, 6)}


def parse_peer(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:7000`` for IPv6) -> (host, port); UsageError if malformed."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"invalid address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7000")
    return host, int(port)


def read_secret(path: str | Path) -> bytes:
    """The shared secret in ``path`` (surrounding whitespace ignored); one line if unusable."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as err:
        raise UsageError(f"cannot read the secret file {path}: {err.strerror}") from None
    if not secret:
        raise UsageError(f"the secret file {path} is empty")
    return secret


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a primary replicates, as the server was told (nbdkit config keys)."""

    host: str
    port: int
    mode: str
    secret: bytes | None = None
    tls: ssl.SSLContext | None = None
    ack_timeout: float = 5.0
    interval: float = DEFAULT_INTERVAL  # async: seconds between cycles (0: on request)
    max_rate: int | None = None  # async: bytes a second cycles may convey (None: no cap)

    KEYS = ("replicate-to", "mode", "secret-file", "tls-ca", "tls-cert", "tls-key",
            "ack-timeout", "interval", "max-rate")

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> Settings | None:
        """None when the config asks for no replication; UsageError when it is wrong."""
        if "replicate-to" not in config:
            if any(k in config for k in cls.KEYS):
                raise UsageError("replication options need replicate-to=HOST:PORT")
            return None
        host, port = parse_peer(config["replicate-to"])
        mode = config.get("mode", "")
        if mode not in MODES:
            raise UsageError(f"replication mode {mode!r}: expected one of {', '.join(MODES)}")
        secret = read_secret(config["secret-file"]) if "secret-file" in config else None
        context = None
        if "tls-ca" in config:
            context = tls.client_context(config["tls-ca"], config.get("tls-cert"),
                                         config.get("tls-key"))
        elif "tls-cert" in config or "tls-key" in config:
            raise UsageError("TLS needs tls-ca (the CA that signed the secondary's certificate)")
        try:
            ack_timeout = float(config.get("ack-timeout", 5.0))
        except ValueError:
            ack_timeout = -1.0
        if not 0 < ack_timeout <= 3600:
            raise UsageError(f"ack-timeout={config['ack-timeout']}: expected seconds, more "
                             "than 0 and at most 3600")
        interval, max_rate = DEFAULT_INTERVAL, None
        for key in ("interval", "max-rate"):
            if key in config and mode != ASYNC:
                raise UsageError(f"{key} is for mode=async only")
        if "interval" in config:
            interval = parse_interval(config["interval"])
        if "max-rate" in config:
            max_rate = parse_rate(config["max-rate"])
        return cls(host, port, mode, secret, context, ack_timeout, interval, max_rate)


def parse_interval(text: str) -> float:
    """Seconds between async cycles: 0 (only when asked) up to a day; UsageError if not."""
    try:
        interval = float(text)
    except ValueError:
        interval = -1.0
    if not (interval == 0 or MIN_INTERVAL <= interval <= MAX_INTERVAL):  # refuses nan too
        raise UsageError(f"interval {text!r}: expected 0 (cycles only on 'nbdmirror sync') "
                         f"or seconds from {MIN_INTERVAL:g} to {MAX_INTERVAL:g}")
    return interval


#: the lowest cap on an async cycle's rate (a 1 MiB frame a second)
MIN_RATE = 1 << 20


def parse_rate(text: str) -> int:
    """Bytes a second an async cycle may convey (``100M``: 100 MiB/s); UsageError if
    not a size of at least 1M."""
    rate = parse_size(text, "rate")
    if rate < MIN_RATE:
        raise UsageError(f"invalid rate {text!r}: at least 1M (bytes a second)")
    return rate


def replicate(engine: Any, settings: Settings) -> PrimarySession:
    """Attach a replicator to ``engine`` and return its session (start it after any fork).

    Async mirroring attaches nothing to the write path: host writes only mark
    (the engine does that anyway), and the cycles run beside them."""
    replicator: PrimaryReplicator | AsyncMirror
    if settings.mode == ASYNC:
        replicator = AsyncMirror(engine, interval=settings.interval,
                                 ack_timeout=settings.ack_timeout, max_rate=settings.max_rate)
    else:
        replicator = PrimaryReplicator(engine, settings.mode, ack_timeout=settings.ack_timeout)
        engine.attach_replicator(replicator)
    info = engine.volume.info
    return PrimarySession(replicator, settings.host, settings.port,
                          identity=lambda: Identity(info.uuid, info.size, info.region_size,
                                                    info.generation),
                          secret=settings.secret, tls=settings.tls)
