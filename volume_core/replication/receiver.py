"""The secondary as a process: a replica engine, a listener, the receiver, an admin socket.

``nbdmirror receive`` runs this module, in the foreground or as a detached
child::

    python -m volume_core.replication.receiver VOL --listen HOST:PORT
        [--secret-file F] [--tls-cert C --tls-key K --tls-ca A]

That command line is how ``stop`` and ``status`` prove a pid is this volume's
receiver (``ServerPlace.is_server_command``); the process keeps a server's
runtime files in VOL (server.json with ``"kind": "receiver"``, nbdkit.pid,
admin.sock, server.log), so both commands treat it like a served volume.

Pairing: the first primary whose HELLO is acceptable (same size and region
size, not this volume) and that passes the shared-secret check pairs: its
uuid and generation go into volume.json and the role becomes ``secondary``,
before its channel starts, so before any data frame is taken. It is recorded
once the handshake is complete rather than in ``decide`` (which runs before
the HMAC exchange): a peer without the secret must not be able to pair the
volume to a uuid of its choosing and lock the real primary out. Later
primaries with another uuid are refused, and only one primary is connected at
a time.

TEST ONLY: ``NBDMIRROR_TEST_FAIL_WRITES=FIRST:COUNT:TIMES[,...]`` in the
environment makes this secondary's disk writes to regions FIRST..FIRST+COUNT-1
fail TIMES times each (a ``FaultInjector``), so that tests can drive recovery
through the real process. Off unless set; logged as a warning at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import ssl
import sys
import threading
import time
from typing import Any

from .. import operations, server_log
from ..admin import AdminServer
from ..engine import Engine
from ..errors import LinkError, NbdMirrorError, PeerRefused, UsageError, VolumeError
from ..server_files import RECEIVER_KIND, ServerPlace, admin_socket
from ..volume import Volume
from . import link, memory, tls
from .protocol import Frame, Hello, Identity, hello_problem
from .secondary import ASYNC, MODES, SEMI_ASYNC, FaultInjector, Receiver
from .session import parse_peer, read_secret

log = logging.getLogger("nbdmirror.receiver")

#: how often the timer retries recoveries and notices lost links
TICK = 0.1
#: how often regions applied durably are cleared from the marks
SWEEP_INTERVAL = 1.0
#: TEST ONLY: the environment variable that makes disk writes fail (see the module docstring)
TEST_FAIL_WRITES = "NBDMIRROR_TEST_FAIL_WRITES"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where and how a secondary listens."""

    host: str
    port: int
    secret: bytes | None = None
    tls: ssl.SSLContext | None = None

    @classmethod
    def load(cls, listen: str, secret_file: str | None = None, tls_cert: str | None = None,
             tls_key: str | None = None, tls_ca: str | None = None) -> Settings:
        """Parse and read everything the options name; UsageError in one line."""
        host, port = parse_peer(listen)
        given = [x is not None for x in (tls_cert, tls_key, tls_ca)]
        if any(given) and not all(given):
            raise UsageError("TLS needs all of --tls-cert, --tls-key and --tls-ca (the CA "
                             "that signed the primaries' certificates)")
        secret = read_secret(secret_file) if secret_file is not None else None
        context = tls.server_context(tls_cert, tls_key, tls_ca) if all(given) else None
        return cls(host, port, secret, context)


def faults_from_env(value: str | None) -> FaultInjector | None:
    """TEST ONLY: the FaultInjector ``NBDMIRROR_TEST_FAIL_WRITES`` asks for, or None."""
    if not value:
        return None
    faults = FaultInjector()
    try:
        for item in value.split(","):
            first, count, times = (int(x) for x in item.split(":"))
            if first < 0 or count < 1 or times < 1:
                raise ValueError(item)
            faults.fail(first, count, times)
    except ValueError:
        raise UsageError(f"{TEST_FAIL_WRITES}={value!r}: expected FIRST:COUNT:TIMES[,...] "
                         "(regions, all numbers, COUNT and TIMES at least 1)") from None
    return faults


class _Offline:
    """The receiver's outbox while no primary is connected."""

    def send_urgent(self, frame: Frame) -> None:
        raise LinkError("no primary is connected")

    send_bulk = send_urgent

    def flush(self) -> None:
        pass


class Secondary:
    """A volume receiving replication: one Receiver, one primary channel at a time.

    Opening it takes the volume's lock (VolumeBusy if taken); ``start`` binds
    the listener (LinkError if the address cannot be used). ``close`` is
    idempotent: link, final sweep, engine.
    """

    def __init__(self, volume: Volume, settings: Settings, *,
                 options: link.ChannelOptions | None = None,
                 faults: FaultInjector | None = None) -> None:
        self.volume, self.settings = volume, settings
        self.engine = Engine(volume, replica=True)
        try:
            # Data is applied on a thread of its own, so that the link's reader takes
            # each META (and acknowledges it) without waiting for earlier writes' disk I/O.
            self._apply_wanted = threading.Event()
            self.receiver = Receiver(self.engine, SEMI_ASYNC, _Offline(), faults=faults,
                                     wake=self._apply_wanted.set)
        except BaseException:
            self.engine.close()
            raise
        # marks: what may be missing here, told to each primary once it is authenticated
        self.listener = link.Listener(settings.host, settings.port, identity=self._identity,
                                      decide=self._decide, on_channel=self._on_channel,
                                      marks=self.receiver.marked_runs,
                                      secret=settings.secret, tls=settings.tls, options=options)
        self.listen = ""
        self._lock = threading.Lock()  # the channel, the pairing, the counters
        self._channel: link.Channel | None = None
        self._mode: str | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._run, daemon=True, name="receiver-timer")
        self._applier = threading.Thread(target=self._apply_loop, daemon=True,
                                         name="receiver-apply")
        self._closed = False
        self.connects = self.refused = 0
        self.last_refusal: str | None = None
        self.last_close_reason: str | None = None
        self._bytes = [0, 0]  # received, sent: over channels already closed

    def start(self) -> Secondary:
        self.listener.start()
        host, port = self.listener.address
        self.listen = f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
        self._timer.start()
        self._applier.start()
        return self

    # -- the handshake -------------------------------------------------------
    def _identity(self) -> Identity:
        info = self.volume.info
        return Identity(info.uuid, info.size, info.region_size, info.generation)

    def _refusal(self, hello: Hello) -> str | None:
        """Why this primary cannot be taken now, or None (lock held)."""
        info = self.volume.info
        problem = hello_problem(hello, self._identity(), secret=self.settings.secret is not None,
                                paired_uuid=info.peer_uuid,
                                paired_generation=info.peer_generation)
        if problem is None and hello.mode not in MODES:
            problem = f"this secondary takes {' or '.join(MODES)} mode, not {hello.mode!r}"
        if problem is None and self._channel is not None:
            problem = (f"the secondary already has a primary connected (from "
                       f"{self._channel.peer}); one primary at a time")
        if problem is not None:
            self.refused += 1
            self.last_refusal = problem
        return problem

    def _decide(self, hello: Hello) -> str | None:
        self._forget_closed_channel()  # a primary that just left is not "connected"
        with self._lock:
            return self._refusal(hello)

    def _on_channel(self, channel: link.Channel) -> None:
        """Pair (if new), then give the receiver this channel; PeerRefused drops it."""
        hello = channel.hello
        self._forget_closed_channel()
        with self._lock:
            problem = self._refusal(hello)  # another primary may have come meanwhile
            if problem is not None:
                raise PeerRefused(problem)
            self._pair(hello)
            self._channel, self._mode = channel, hello.mode
            self.connects += 1
            self.receiver.mode = hello.mode
            if hello.mode == ASYNC:
                self.receiver.prepare_staging()
            self.receiver.out = channel
            channel.start(self.receiver.handle, lambda reason: self._lost.set())
        log.info("primary volume %s connected from %s (%s)", hello.uuid, channel.peer,
                 hello.mode)

    def _pair(self, hello: Hello) -> None:
        info = self.volume.info
        changes: dict[str, Any] = {}
        if info.role != "secondary":
            changes["role"] = "secondary"
        if info.peer_uuid != hello.uuid:
            changes["peer_uuid"] = hello.uuid
        if hello.generation > info.peer_generation:
            changes["peer_generation"] = hello.generation
        if not changes:
            return
        try:
            self.volume.update_info(**changes)
        except (VolumeError, OSError) as err:
            raise PeerRefused(f"the secondary cannot record its pairing: {err}") from None
        if "peer_uuid" in changes:
            log.info("paired with primary volume %s (generation %d)", hello.uuid,
                     hello.generation)

    # -- the timer -----------------------------------------------------------
    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while not self._stop.is_set():
            if self._lost.wait(TICK):
                self._lost.clear()
                self._forget_closed_channel()
            try:
                if self._channel is not None:
                    self.receiver.tick()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_INTERVAL
                    if self.engine.tracker.count():  # else nothing to clear: no fdatasync
                        self.receiver.sweep()
            except (NbdMirrorError, OSError) as err:
                log.warning("receiver timer: %s", err)

    def _apply_loop(self) -> None:
        """Apply what the receiver found applicable, until the link is closed for good."""
        while True:
            self._apply_wanted.wait()
            self._apply_wanted.clear()
            if self._stop.is_set():
                return
            try:
                self.receiver.drain()
            except Exception:  # keep applying: the entry's regions stay marked
                log.exception("applying replicated writes failed")

    def _forget_closed_channel(self, reason: str | None = None) -> None:
        """Join a closed (or, with ``reason``, a live) channel's threads and tell the receiver."""
        with self._lock:
            channel = self._channel
            if channel is None or (reason is None and not channel.closed):
                return
            channel.close(reason or "closed")
            stats = channel.stats()
            self._bytes[0] += stats.bytes_received
            self._bytes[1] += stats.bytes_sent
            self.receiver.link_lost()
            self.receiver.out = _Offline()
            self._channel = None
            self.last_close_reason = channel.close_reason
        log.info("link from %s closed: %s", channel.peer, channel.close_reason)

    # -- state and end -------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The link and the receiver, for ``status`` (under its ``replication`` key)."""
        with self._lock:
            channel = self._channel
            stats = channel.stats() if channel is not None else None
            received, sent = self._bytes
            counts = {"connects": self.connects, "refused": self.refused,
                      "last_refusal": self.last_refusal,
                      "last_close_reason": self.last_close_reason}
            mode = self._mode
        if stats is not None and stats.open:
            state = "connected"
        else:
            state = "disconnected" if self.connects else "listening"
        info = self.volume.info
        return self.receiver.status() | counts | {
            "role": "secondary", "state": state, "listen": self.listen,
            "peer": stats.peer if stats is not None and stats.open else None,
            "mode": mode,
            "primary_uuid": info.peer_uuid, "primary_generation": info.peer_generation,
            "bytes_received": received + (stats.bytes_received if stats else 0),
            "bytes_sent": sent + (stats.bytes_sent if stats else 0),
            "rtt": None if stats is None or stats.rtt is None else round(stats.rtt, 6),
        }

    def close_link(self) -> None:
        """Stop listening, drop the primary, make the final sweep (the engine stays open).

        Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.listener.close()
        if self._timer.is_alive():
            self._timer.join()
        self._forget_closed_channel("the secondary is stopping")
        self._apply_wanted.set()
        if self._applier.is_alive():
            self._applier.join()
        self.receiver.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.close_link()
        finally:
            self.engine.close()


# ----------------------------------------------------------------------------- the process


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}",
                                     description="A secondary's receiving process "
                                     "(started by 'nbdmirror receive').")
    parser.add_argument("volume")
    parser.add_argument("--listen", required=True)
    for name in ("--secret-file", "--tls-cert", "--tls-key", "--tls-ca"):
        parser.add_argument(name)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, stop: threading.Event) -> None:
    """Receive into the volume until ``stop`` is set; NbdMirrorError if it cannot start."""
    settings = Settings.load(args.listen, args.secret_file, args.tls_cert, args.tls_key,
                             args.tls_ca)
    faults = faults_from_env(os.environ.get(TEST_FAIL_WRITES))
    memory.keep_freed_buffers()
    volume = Volume.open(args.volume)
    place = ServerPlace(volume)
    secondary = Secondary(volume, settings, faults=faults)  # the volume's lock from here on
    admin = None
    try:
        secondary.start()
        log_path = place.log_file.absolute()
        server_log.capture_stderr(log_path, server_log.cap_from_env())
        if faults is not None:
            log.warning("TEST ONLY: %s=%s: disk writes to those regions will fail on purpose",
                        TEST_FAIL_WRITES, os.environ[TEST_FAIL_WRITES])
        engine = secondary.engine
        extra = {"listen": secondary.listen, "log": str(log_path)}
        table = operations.handlers(engine) | {
            "status": lambda: engine.status() | extra | {"replication": secondary.status()}}
        admin = AdminServer(admin_socket(volume), table)
        admin.start()
        place.pid_file.write_text(f"{os.getpid()}\n")
        place.write_state({"pid": os.getpid(), "kind": RECEIVER_KIND,
                           "listen": secondary.listen, "volume": str(volume.path.absolute()),
                           "snapshot": None, "uuid": volume.info.uuid, "log": str(log_path)})
        log.info("receiving replication into %s on %s: pid %d", volume.path.absolute(),
                 secondary.listen, os.getpid())
        while not stop.wait(0.5):
            pass
        log.info("stopping: closing the link and the volume")
    finally:
        if admin is not None:
            admin.close()
        try:
            secondary.close_link()
        finally:
            place.clear_state()  # before the lock goes: a new receiver's files are its own
            secondary.close()
    log.info("stopped receiving into %s: closed cleanly", volume.path.absolute())
    server_log.flush()


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run(args, stop)
    except NbdMirrorError as err:
        if logging.getLogger().handlers:  # capture_stderr has run: the log takes it
            log.error("%s", err)
        else:
            print(f"nbdmirror receive: error: {err}", file=sys.stderr)
        server_log.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
