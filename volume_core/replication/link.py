"""Replication links: sockets, TLS, authentication, keepalive and timeouts — no policy.

What to send, marks and resyncs belong to ``primary.py`` and ``secondary.py``.
This module gives them:

- ``Listener`` (secondary): accepts TCP (optionally TLS) connections, runs the
  handshake of ``protocol.Connection`` on each (HELLO, a ``decide`` callback,
  HELLO_REPLY, AUTH both ways when a secret is set, then MARKED_RUNS from a
  ``marks`` callback) and hands every authenticated connection to
  ``on_channel`` as a ``Channel``. A connection that sends garbage, half a
  frame, or nothing in time is dropped with a log line; the listener keeps
  serving.
- ``connect`` (primary): the same handshake from the other end; returns a
  ``Channel`` (with the secondary's marked runs in ``peer_marks``) or raises
  ``PeerRefused``, ``ProtocolError`` or ``LinkError``.
- ``Channel``: an established connection with two send priorities, a bounded
  bulk window, keepalive and counters (see its docstring for the design).
- ``Backoff``: jittered exponential delays for the primary's reconnect loop.

The TLS binding of the HMAC answers (``auth.answer(binding=...)``) is not
used: TLS authenticates the peers by certificate, the secret by HMAC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final

import numpy as np

from ..errors import LinkError, PeerRefused, ProtocolError
from . import protocol
from .protocol import (
    HEADER_SIZE,
    MAX_SMALL_PAYLOAD,
    NEED_DATA,
    PEER_CLOSED,
    Auth,
    Connection,
    Error,
    Frame,
    Hello,
    HelloReply,
    Identity,
    Ping,
    Pong,
    Role,
    State,
)
from .tls import PlainTransport, TlsTransport, describe, tls_failure

log = logging.getLogger(__name__)

#: Bulk frames should carry at most this much: an urgent frame waits for at most one.
BULK_FRAME_HINT: Final = 1 << 20
#: The most one read hands the decoder.
READ_CHUNK: Final = 256 << 10
# Between frames, read this much at once (small frames come in batches).
_SMALL_READ = 64 << 10
# Unsent bytes the kernel may hold for the socket (TCP_NOTSENT_LOWAT): beyond it a send
# blocks in the sender thread, where urgent frames can still overtake queued bulk frames.
_NOTSENT_LOWAT = 128 << 10
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
# How long close() waits for the farewell ERROR frame to leave.
_FAREWELL_WAIT = 0.5

Transport = PlainTransport  # TlsTransport is a PlainTransport too


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelOptions:
    """How a channel behaves; the defaults suit loopback and LAN links."""

    #: Bytes of bulk frames queued or being sent before ``send_bulk`` blocks.
    window: int = 64 << 20
    #: How long ``send_bulk`` may block on a full window before ``LinkError``.
    send_timeout: float = 10.0
    #: Send a PING after this long without hearing from the peer.
    ping_interval: float = 1.0
    #: Close the channel after this long without a byte from the peer, or with
    #: the peer taking none of ours.
    peer_timeout: float = 5.0
    #: Bytes of urgent frames queued before ``send_urgent`` raises ``LinkError``.
    urgent_limit: int = 16 << 20

    @property
    def tick(self) -> float:
        """The socket timeout: how often the threads look at the clock."""
        return max(0.02, min(self.ping_interval, self.peer_timeout) / 4)


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelStats:
    """A snapshot of a channel's counters (for ``status``)."""

    peer: str
    open: bool
    close_reason: str | None
    bytes_sent: int
    bytes_received: int
    frames_sent: int
    frames_received: int
    #: ``time.monotonic()`` of the last bytes from the peer.
    last_received: float
    #: Round trip of the last answered PING, in seconds (None before the first).
    rtt: float | None
    bulk_queued_bytes: int
    urgent_queued: int


# ---------------------------------------------------------------------------------- backoff


class Backoff:
    """Jittered exponential delays: ``initial``, doubling up to ``maximum``.

    Each delay is drawn in ``[base * (1 - jitter), base]`` so that primaries
    that lost the same secondary do not reconnect in step.
    """

    def __init__(self, initial: float = 0.1, maximum: float = 5.0, *, factor: float = 2.0,
                 jitter: float = 0.5, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("Backoff needs 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call backs off further."""
        base = min(self.maximum, self.initial * self.factor ** min(self._attempt, 64))
        self._attempt += 1
        return base * (1 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Start again from ``initial`` (after a connection that worked)."""
        self._attempt = 0


# ---------------------------------------------------------------------------------- channel

@dataclasses.dataclass(slots=True)
class _Pending:
    """An encoded frame on its way out: its path, its bytes on the wire, and how long a
    bulk one may wait for the window."""

    urgent: bool
    head: bytes
    payload: protocol.Buffer
    size: int
    timeout: float = 0.0
    lent: bool = False  # the payload is the caller's until its send call returns
    window: int = 0  # a bulk frame waits while more than this is queued (0: the window)

    @classmethod
    def of(cls, urgent: bool, parts: tuple[bytes, protocol.Buffer],
           timeout: float = 0.0, lent: bool = False, window: int = 0) -> _Pending:
        head, payload = parts
        return cls(urgent, head, payload, len(head) + len(payload), timeout, lent, window)

    def kept(self) -> _Pending:
        """This frame with a payload of its own (a copy, if it was lent)."""
        if not self.lent:
            return self
        return _Pending(self.urgent, self.head, bytes(self.payload), self.size, self.timeout,
                        window=self.window)


class Channel:
    """An established, authenticated connection: frames out with two priorities, frames in.

    Priorities, on one socket: ``send_urgent`` (META, acks, FLUSH, PING/PONG)
    and ``send_bulk`` (WRITE, DATA, REGION_DATA) only queue; one sender thread
    writes whole frames, and before each frame it takes the urgent queue first.
    An urgent frame therefore waits for at most the one bulk frame already on
    its way, plus what the kernel still holds unsent, which
    ``TCP_NOTSENT_LOWAT`` caps at 128 KiB. Callers keep bulk frames at or under
    ``BULK_FRAME_HINT`` (1 MiB) to keep that wait small. One socket was chosen
    over a control and a data connection because it needs no pairing of two
    connections in the handshake, keeps one TLS session and one keepalive, and
    because the bound above is small. Measured on loopback, secondary in its
    own process, 1 MiB bulk frames streaming at ~2 GiB/s: an urgent round trip
    (FLUSH -> FLUSH_ACK) takes a median 0.9-1.1 ms, p99 4-7 ms (idle: 0.3 ms);
    without the NOTSENT cap the median was 9.7 ms. The tail is the GIL and the
    peer's receive buffer, not the queue. Two sockets would remove the wait
    for the bulk frame in flight if a slow link ever needs it.

    Receiving: ``start(on_frame, on_close)`` starts the threads; a receiver
    thread calls ``on_frame(frame)`` for each frame in order (PING, PONG and
    ERROR are handled here). ``on_frame`` runs on that thread: while it blocks,
    nothing is read, and a peer waiting longer than its timeout drops the link.
    ``on_close(reason)`` is called once, whoever closed the channel.

    Memory is bounded: queued plus in-flight bulk frames stay under
    ``options.window`` bytes (one larger frame may pass alone); ``send_bulk``
    blocks while the window is full and raises ``LinkError`` after
    ``options.send_timeout``. A frame's payload is sent from the caller's
    buffer: leave it unchanged until the frame is sent. Keepalive: a PING after
    ``ping_interval`` without a byte from the peer; ``peer_timeout`` without
    one (or with the peer taking none of ours) closes the channel. Always call
    ``close()``: it is idempotent and joins the threads.
    """

    def __init__(self, transport: Transport, conn: Connection, *, hello: Hello,
                 reply: HelloReply, options: ChannelOptions) -> None:
        self.peer = transport.peer
        self.role = conn.role
        self.hello = hello
        self.reply = reply
        #: On a primary's channel: the regions whose data may be missing on the secondary,
        #: as (first region, count) rows (its MARKED_RUNS); empty on a secondary's.
        self.peer_marks = np.asarray(conn.marked_runs if conn.role is Role.PRIMARY else [],
                                     dtype=np.int64).reshape(-1, 2)
        self.options = options
        self._t = transport
        self._conn = conn
        self._cond = threading.Condition()
        self._encode_lock = threading.Lock()
        self._urgent: deque[_Pending] = deque()
        self._bulk: deque[_Pending] = deque()
        self._urgent_bytes = 0
        self._bulk_bytes = 0
        self._writing = False  # a thread is writing to the socket (a caller or the sender)
        self._rest: list[memoryview] | None = None  # what a direct write left: goes first
        self._rest_bulk = 0  # bytes of queued bulk frames in _rest (counted in the window)
        self._corks = threading.local()  # frames a thread holds back (corked())
        self._farewell: _Pending | None = None
        self._reason: str | None = None
        self._hard_stop = False
        self._reported = False
        self._threads: list[threading.Thread] = []
        self._on_frame: Callable[[Frame], None] = lambda frame: None
        self._on_close: Callable[[str], None] | None = None
        self._tokens = itertools.count(1)
        self._ping: tuple[int, float] | None = None  # token, sent at
        self._rtt: float | None = None
        self.bytes_sent = self.bytes_received = self.frames_sent = self.frames_received = 0
        self.last_received = time.monotonic()
        _tune_socket(transport.sock, options.tick)

    # -- life

    def start(self, on_frame: Callable[[Frame], None],
              on_close: Callable[[str], None] | None = None) -> None:
        """Start the sender and receiver threads. Call once."""
        if self._threads:
            raise RuntimeError("channel already started")
        self._on_frame, self._on_close = on_frame, on_close
        self.last_received = time.monotonic()
        threads = [threading.Thread(target=target, name=f"link-{name} {self.peer}",
                                    daemon=True)
                   for name, target in (("send", self._sender), ("recv", self._receiver))]
        with self._cond:  # close() sees all of them started, or none
            if self._reason is not None:  # closed before it started: nothing to run
                return
            self._threads = threads
            for thread in threads:
                thread.start()

    def close(self, reason: str = "closed locally") -> None:
        """Close the channel (telling the peer ``reason``) and join its threads. Idempotent."""
        first = self._begin_close(reason, farewell=True)
        if first:
            self._send_farewell_now_or_later()
        self._stop_hard()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self._t.close()
        if first:
            self._report_close(reason)

    @property
    def closed(self) -> bool:
        return self._reason is not None

    @property
    def close_reason(self) -> str | None:
        return self._reason

    def stats(self) -> ChannelStats:
        with self._cond:
            bulk, urgent = self._bulk_bytes, len(self._urgent)
        return ChannelStats(self.peer, self._reason is None, self._reason, self.bytes_sent,
                            self.bytes_received, self.frames_sent, self.frames_received,
                            self.last_received, self._rtt, bulk, urgent)

    # -- sending

    def send_urgent(self, frame: Frame) -> None:
        """Queue a small frame ahead of every queued bulk frame. Never blocks."""
        head, payload = self._encode(frame)
        if len(payload) > MAX_SMALL_PAYLOAD:
            raise ProtocolError(f"local: {protocol.frame_name(frame)} with a payload of "
                                f"{len(payload)} bytes is not urgent: use send_bulk")
        self._send(_Pending.of(True, (head, payload)))

    def send_bulk(self, frame: Frame, timeout: float | None = None, lent: bool = False,
                  window: int | None = None, handoff: bool = False) -> None:
        """Queue a data frame; blocks while the window is full, ``LinkError`` after ``timeout``.

        ``lent``: the payload is the caller's only until this call returns (a
        host's buffer). It is written straight from there when the link is idle,
        and copied only if it must wait (queued, or partly sent). ``window``: a
        smaller window for this frame (it waits while more is queued), so that
        frames from another source are not queued behind a whole window of these.
        ``handoff``: the sender thread writes it, never the caller, who goes on
        meanwhile (a stream of large frames: reading the next one overlaps
        writing this one, ~0.5 ms of kernel copy per MiB).
        """
        wait = self.options.send_timeout if timeout is None else timeout
        self._send(_Pending.of(False, self._encode(frame), wait, lent, window or 0),
                   handoff=handoff)

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Frames this thread sends inside the block go out together at its end.

        When the link is idle they leave in one write: one wake-up of the
        peer instead of one per frame (a META and its DATA; the acks of every
        frame a read brought in). Nested blocks join the outer one.
        """
        if self._corked() is not None:
            yield
            return
        self._corks.frames = []
        try:
            yield
        finally:
            self.flush()
            self._corks.frames = None

    def flush(self) -> None:
        """Send what this thread holds corked now (it stays corked)."""
        held = self._corked()
        if not held:
            return
        frames, self._corks.frames = held, []
        with self._cond:
            self._raise_if_closed()
            direct = self._take_socket()
        if direct:
            self._write_now(frames)
            return
        for frame in frames:
            self._send(frame, cork=False)

    def _corked(self) -> list[_Pending] | None:
        return getattr(self._corks, "frames", None)

    def _send(self, frame: _Pending, cork: bool = True, handoff: bool = False) -> None:
        """Write ``frame`` now if the link is idle (unless ``handoff``), else queue it
        (waiting for the window)."""
        if cork and (held := self._corked()) is not None:
            held.append(frame.kept())  # sent after the call that lent it returned
            return
        if frame.lent and (self._writing or self._rest is not None or self._bulk):
            frame = frame.kept()  # it will wait, most likely: copy before taking the lock
        size = frame.size
        with self._cond:
            if frame.urgent:
                self._raise_if_closed()
                if self._urgent_bytes + size > self.options.urgent_limit:
                    raise LinkError(f"the peer has not taken {self._urgent_bytes} bytes of "
                                    "urgent frames: the link is stuck")
            else:
                self._wait_window(size, frame.timeout, frame.window)
            if handoff or not self._take_socket():
                frame = frame.kept()  # it outlives the call
                if frame.urgent:
                    self._urgent.append(frame)
                    self._urgent_bytes += size
                else:
                    self._bulk.append(frame)
                    self._bulk_bytes += size
                if not self._writing:  # a writer takes the queue when it is done
                    self._cond.notify_all()
                return
        self._write_now([frame])

    def _wait_window(self, size: int, wait: float, window: int = 0) -> None:
        """(lock held) Until a bulk frame of ``size`` bytes fits the window (or the
        smaller ``window`` given)."""
        deadline = time.monotonic() + wait
        window = min(window, self.options.window) if window else self.options.window
        while True:
            self._raise_if_closed()
            if not self._bulk_bytes or self._bulk_bytes + size <= window:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkError(f"the link's window of {window} bytes stayed full for "
                                f"{wait:g} s: the peer is not taking data")
            self._cond.wait(left)

    def _take_socket(self) -> bool:
        """(lock held) With nothing queued and nobody writing, the caller may write itself."""
        if self._writing or self._rest is not None or self._urgent or self._bulk:
            return False
        self._writing = True
        return True

    def _write_now(self, frames: list[_Pending]) -> None:
        """Write frames from the caller's thread (the socket is ours), without waiting.

        Most writes go whole into the kernel's buffer: no hand-off to the
        sender thread, which would cost a thread wake-up and a GIL hand-off on
        every frame. What the socket does not take at once is left to the
        sender thread, ahead of everything queued. A bulk frame sent here
        never enters the window: it is in the kernel's buffer already, or
        (the rest of one frame) the next thing the sender writes.
        Frames other threads queued meanwhile go out with this thread's too,
        once, if the socket took everything: no wake-up of the sender thread for
        them either. Those stay in the window until they are in the kernel.
        """
        taken_bulk = 0  # bytes of queued bulk frames taken (still counted in the window)
        rounds = 0
        while frames:
            rounds += 1
            rest: list[memoryview] = []
            failure: BaseException | None = None
            try:
                rest = self._t.try_send([part for f in frames for part in (f.head, f.payload)])
                if rest:
                    rest = _keep_lent(rest, frames)
            except BaseException as err:  # noqa: BLE001 - OSError, or a bug (re-raised below)
                failure = err
            finally:
                with self._cond:
                    if failure is None:
                        self.bytes_sent += sum(f.size for f in frames)
                        self.frames_sent += len(frames)
                    frames = []
                    if failure is None and not rest and rounds == 1:
                        frames, bulk = self._take_queued()
                        taken_bulk += bulk
                    if not frames:
                        if self._reason is not None:  # closing zeroed the window's count
                            taken_bulk = 0
                        if rest and failure is None:
                            self._rest, self._rest_bulk = rest, taken_bulk
                        else:
                            self._bulk_bytes -= taken_bulk  # in the kernel (or lost)
                        self._writing = False
                        # wake the sender for what is left, window waiters, anyone closing
                        if (rest or taken_bulk or self._urgent or self._bulk
                                or self._reason is not None):
                            self._cond.notify_all()
            if failure is not None:  # as if the sender thread had failed: on_close tells
                what = describe(failure) if isinstance(failure, OSError) else repr(failure)
                self._fail(f"sending to the peer failed: {what}")
                if not isinstance(failure, OSError):
                    raise failure
                return

    def _take_queued(self) -> tuple[list[_Pending], int]:
        """(lock held, socket ours) Every queued frame, urgent first, out of the queues,
        and the bytes of the bulk ones (the caller keeps them in the window until sent)."""
        if self._reason is not None or not (self._urgent or self._bulk):
            return [], 0
        frames = [*self._urgent, *self._bulk]
        bulk = self._bulk_bytes
        self._urgent.clear()
        self._bulk.clear()
        self._urgent_bytes = 0
        return frames, bulk

    def _encode(self, frame: Frame) -> tuple[bytes, protocol.Buffer]:
        with self._encode_lock:
            return self._conn.send_parts(frame)

    def _raise_if_closed(self) -> None:
        if self._reason is not None:
            raise LinkError(f"the link to {self.peer} is closed: {self._reason}")

    # -- the sender thread

    def _sender(self) -> None:
        stall, stopped = self.options.peer_timeout, lambda: self._hard_stop
        try:
            while (item := self._next_out()) is not None:
                if isinstance(item, list):  # bytes a direct write left
                    self._t.send_rest(item, stall, stopped)
                else:
                    self._t.send((item.head, item.payload), stall, stopped)
                    self.bytes_sent += item.size
                    self.frames_sent += 1
                self._sent(item)
        except (LinkError, OSError) as err:
            self._fail(f"sending to the peer failed: {describe(err)}")

    def _next_out(self) -> _Pending | list[memoryview] | None:
        """The next thing to write (the socket is then the sender's), None to stop."""
        with self._cond:
            while True:
                if self._writing:  # a caller is writing directly: it does not wait long
                    self._cond.wait(self.options.tick)
                    continue
                item: _Pending | list[memoryview] | None
                if self._rest is not None:  # the end of a frame: before anything else
                    item, self._rest = self._rest, None
                elif self._reason is not None:
                    item, self._farewell = self._farewell, None
                    return item
                elif self._urgent:
                    item = self._urgent.popleft()
                    self._urgent_bytes -= item.size
                elif self._bulk:
                    item = self._bulk[0]  # leaves the queue once sent: counted in the window
                else:
                    wait = self._ping_wait(time.monotonic())
                    if wait <= 0:
                        self._queue_ping()
                    else:
                        self._cond.wait(wait)
                    continue
                self._writing = True
                return item

    def _sent(self, item: _Pending | list[memoryview]) -> None:
        """The socket is free again; a bulk frame leaves the window once it is sent."""
        with self._cond:
            self._writing = False
            if self._bulk and self._bulk[0] is item:
                self._bulk_bytes -= self._bulk.popleft().size
            elif isinstance(item, list):  # a rest: queued bulk frames in it leave the window
                self._bulk_bytes -= self._rest_bulk
                self._rest_bulk = 0
            self._cond.notify_all()

    def _ping_wait(self, now: float) -> float:
        """Seconds until a PING is due (<= 0: now). Called with the lock held."""
        interval = self.options.ping_interval
        due = self.last_received + interval
        if self._ping is not None:
            due = max(due, self._ping[1] + interval)
        return due - now

    def _queue_ping(self) -> None:
        token = next(self._tokens)
        ping = _Pending.of(True, self._encode(Ping(token)))
        self._ping = (token, time.monotonic())
        self._urgent.append(ping)
        self._urgent_bytes += ping.size

    # -- the receiver thread

    def _receiver(self) -> None:
        try:
            self._receive_loop()
        except ProtocolError as err:
            self._fail(f"protocol error: {err}", farewell=True)
        except (LinkError, OSError) as err:
            self._fail(f"receiving from the peer failed: {describe(err)}")
        except Exception as err:  # a bug in on_frame must not leave a half-dead channel
            log.exception("link %s: the frame handler failed", self.peer)
            self._fail(f"the frame handler failed: {err!r}")

    def _receive_loop(self) -> None:
        """Frames in; what the handlers send goes out together before the next read."""
        conn = self._conn
        with self.corked():
            while self._reason is None:
                frame = conn.next_frame()
                if frame is NEED_DATA:
                    self.flush()
                    self._read_some()
                elif frame is PEER_CLOSED:
                    self._fail("the peer closed the connection")
                else:
                    assert isinstance(frame, Frame)
                    self.frames_received += 1
                    self._dispatch(frame)

    def _read_some(self) -> None:
        conn = self._conn
        # The rest of a large payload goes straight into its own buffer (no copies
        # through the decoder's); between payloads, small frames come in batches.
        target = conn.receive_buffer()
        data = b""
        try:
            if target is not None:
                n = self._t.recv_into(target)
            else:
                want = conn.bytes_needed()
                data = self._t.recv(min(want, READ_CHUNK) if want > HEADER_SIZE
                                    else _SMALL_READ)
                n = len(data)
        except TimeoutError:
            quiet = time.monotonic() - self.last_received
            if quiet > self.options.peer_timeout:
                self._fail(f"no answer from the peer for {quiet:.1f} s (timeout "
                           f"{self.options.peer_timeout:g} s)")
            return
        if not n:
            conn.receive_data(b"")  # the peer closed
            return
        self.bytes_received += n
        self.last_received = time.monotonic()
        if target is not None:
            conn.received(n)
        else:
            conn.receive_data(data)

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, Ping):
            with contextlib.suppress(LinkError):
                self.send_urgent(Pong(frame.seq))
        elif isinstance(frame, Pong):
            ping = self._ping
            if ping is not None and ping[0] == frame.seq:
                self._rtt = time.monotonic() - ping[1]
        elif isinstance(frame, Error):
            self._fail(f"the peer closed the link: {frame.reason}")
        else:
            self._on_frame(frame)

    # -- closing

    def _begin_close(self, reason: str, farewell: bool) -> bool:
        """Mark the channel closed; False if it was already. Wakes every waiter."""
        with self._cond:
            if self._reason is not None:
                return False
            self._reason = reason
            self._urgent.clear()
            self._bulk.clear()
            self._urgent_bytes = self._bulk_bytes = self._rest_bulk = 0
            if farewell:
                # Past the state machine: after a protocol error the Connection refuses
                # to send, and an ERROR is what the peer may always receive.
                self._farewell = _Pending.of(True, protocol.encode_parts(Error(reason)))
            self._cond.notify_all()
            return True

    def _send_farewell_now_or_later(self) -> None:
        """Let the ERROR frame leave: by the sender thread if it runs, else from here."""
        if self._threads:
            sender = self._threads[0]
            if sender is not threading.current_thread():
                sender.join(_FAREWELL_WAIT)
            return
        # Not started: a caller may be writing directly, or have left the end of a frame
        # (_rest). The ERROR goes after that end, never inside the frame; if the end
        # cannot leave in time, the peer sees a cut frame instead of a farewell.
        with self._cond:
            while self._writing:  # a direct write never waits on the socket: it ends soon
                self._cond.wait(self.options.tick)
            self._writing = True  # the socket is this thread's until the farewell is out
            rest, self._rest = self._rest, None
            farewell, self._farewell = self._farewell, None
        try:
            if farewell is not None:
                with contextlib.suppress(LinkError, OSError):
                    if rest:
                        self._t.send_rest(rest, _FAREWELL_WAIT, lambda: False)
                    self._t.send((farewell.head, farewell.payload), _FAREWELL_WAIT,
                                 lambda: False)
        finally:
            with self._cond:  # threads started after this (a late start()) find nothing to do
                self._writing = False
                self._cond.notify_all()

    def _stop_hard(self) -> None:
        self._hard_stop = True
        self._t.shutdown()

    def _fail(self, reason: str, farewell: bool = False) -> None:
        """Close from one of the channel's own threads; the user's close() joins them."""
        if not self._begin_close(reason, farewell):
            return
        log.info("link %s closed: %s", self.peer, reason)
        if farewell:
            self._send_farewell_now_or_later()
        self._stop_hard()
        self._report_close(reason)

    def _report_close(self, reason: str) -> None:
        with self._cond:
            if self._reported:
                return
            self._reported = True
        if self._on_close is not None:
            try:
                self._on_close(reason)
            except Exception:  # the channel is closed either way
                log.exception("link %s: the close handler failed", self.peer)


def _keep_lent(rest: list[memoryview], frames: list[_Pending]) -> list[memoryview]:
    """``rest`` with the views into lent payloads copied (the rest outlives the call);
    headers, payloads the link owns and a TLS transport's ciphertext are kept as they are."""
    lent = {id(memoryview(f.payload).obj) for f in frames if f.lent}
    if not lent:
        return rest
    return [memoryview(bytes(view)) if id(view.obj) in lent else view for view in rest]


def _tune_socket(sock: socket.socket, tick: float) -> None:
    sock.settimeout(tick)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, _NOTSENT_LOWAT)


# -------------------------------------------------------------------------------- handshake


class _Handshake:
    """Frames in and out over a transport, on one thread, before a channel's threads start."""

    def __init__(self, transport: Transport, conn: Connection, deadline: float,
                 peer_role: str) -> None:
        self.t, self.conn, self.deadline, self.peer_role = transport, conn, deadline, peer_role

    def send(self, frame: Frame) -> None:
        head, payload = self.conn.send_parts(frame)
        self.t.send((head, payload), max(0.05, self.deadline - time.monotonic()), lambda: False)

    def receive(self) -> Frame:
        """The peer's next frame; ``Error`` from the peer becomes ``PeerRefused``."""
        while True:
            frame = self.conn.next_frame()
            if isinstance(frame, Error):
                raise PeerRefused(f"the {self.peer_role} refused: {frame.reason}")
            if isinstance(frame, Frame):
                return frame
            if frame is PEER_CLOSED:
                raise LinkError(f"the {self.peer_role} at {self.t.peer} closed the connection "
                                "during the handshake")
            self._read()

    def _read(self) -> None:
        try:
            data = self.t.recv(min(self.conn.bytes_needed(), READ_CHUNK))
        except TimeoutError:
            if time.monotonic() > self.deadline:
                raise LinkError(f"the {self.peer_role} at {self.t.peer} did not complete the "
                                "handshake in time") from None
            return
        except ssl.SSLError as err:
            raise tls_failure(err, self.peer_role, None) from None
        except OSError as err:
            raise LinkError(f"the connection to the {self.peer_role} at {self.t.peer} failed "
                            f"during the handshake: {describe(err)}") from None
        self.conn.receive_data(data)

    def farewell(self, reason: str) -> None:
        """Tell the peer why we drop it (best effort: the connection may be broken)."""
        with contextlib.suppress(LinkError, OSError, ProtocolError):
            self.t.send((protocol.encode(Error(reason)),), 0.2, lambda: False)


def _name(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _open(sock: socket.socket, peer: str, tls: ssl.SSLContext | None, *, server_side: bool,
          server_name: str | None, deadline: float, options: ChannelOptions) -> Transport:
    sock.settimeout(options.tick)
    if tls is None:
        return PlainTransport(sock, peer)
    transport = TlsTransport(sock, peer, tls, server_side=server_side, server_name=server_name)
    transport.handshake(deadline)
    return transport


def _dial(host: str, port: int, timeout: float) -> socket.socket:
    where = _name((host, port))
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise LinkError(f"cannot reach {where}: no answer within {timeout:g} s") from None
    except OSError as err:
        raise LinkError(f"cannot reach {where}: {describe(err)}") from None


def connect(host: str, port: int, *, identity: Identity, mode: str,
            secret: bytes | None = None, tls: ssl.SSLContext | None = None,
            server_name: str | None = None, timeout: float = 5.0,
            options: ChannelOptions | None = None) -> Channel:
    """Open a link from this primary to the secondary at ``host:port``; the channel is not started.

    Raises ``LinkError`` (unreachable, timeout, TLS), ``PeerRefused`` (the
    secondary refused us, a secret mismatch, or we refuse the secondary) or
    ``ProtocolError`` (the peer does not speak the protocol).
    """
    options = options or ChannelOptions()
    deadline = time.monotonic() + timeout
    sock = _dial(host, port, timeout)
    transport: Transport | None = None
    try:
        transport = _open(sock, _name((host, port)), tls, server_side=False,
                          server_name=server_name, deadline=deadline, options=options)
        return _primary_handshake(transport, identity, mode, secret, deadline, options)
    except BaseException:
        (transport or PlainTransport(sock, "")).close()
        raise


def _primary_handshake(transport: Transport, identity: Identity, mode: str,
                       secret: bytes | None, deadline: float,
                       options: ChannelOptions) -> Channel:
    conn = Connection("primary", secret)
    hs = _Handshake(transport, conn, deadline, "secondary")
    hello = conn.make_hello(uuid=identity.uuid, size=identity.size,
                            region_size=identity.region_size, generation=identity.generation,
                            mode=mode)
    hs.send(hello)
    reply = hs.receive()  # a refusal raises PeerRefused with the secondary's reason
    assert isinstance(reply, HelloReply)
    problem = protocol.reply_problem(reply, identity)
    if problem is not None:
        hs.farewell(f"the primary refuses this secondary: {problem}")
        raise PeerRefused(f"refusing the secondary at {transport.peer}: {problem}")
    if conn.state is State.AUTH:
        hs.send(conn.auth_frame())
        try:
            hs.receive()  # the secondary's AUTH, checked by conn
        except PeerRefused as err:
            hs.farewell(str(err))
            raise
    while conn.state is State.MARKS:
        hs.receive()  # MARKED_RUNS, checked and collected by conn (conn.marked_runs)
    return Channel(transport, conn, hello=hello, reply=reply, options=options)


# --------------------------------------------------------------------------------- listener


class Listener:
    """The secondary's end: accepts connections and hands authenticated ones to ``on_channel``.

    ``decide(hello)`` returns a refusal reason (sent to the primary in
    HELLO_REPLY) or None; the shared-secret settings of both ends are compared
    here as well. ``identity`` (or a function returning it, read after
    ``decide``) is what HELLO_REPLY says about this volume. ``marks()``,
    called once the primary is authenticated, returns the (first region,
    count) runs of this volume's marks, sent as MARKED_RUNS: the regions whose
    data may be missing here, which the primary resyncs (None: no marks, for
    tests of the link alone). ``on_channel``
    receives a channel that is not started yet; it may raise ``PeerRefused``
    to drop it with a reason the primary sees. Each handshake runs on a thread
    of its own, bounded by ``handshake_timeout``; at most ``max_handshakes``
    run at once, so ``decide`` and ``on_channel`` may be called concurrently.
    ``close()`` stops the listener; channels already handed over belong to
    whoever took them.
    """

    def __init__(self, host: str, port: int, *, identity: Identity | Callable[[], Identity],
                 decide: Callable[[Hello], str | None], on_channel: Callable[[Channel], None],
                 marks: Callable[[], Any] | None = None, secret: bytes | None = None,
                 tls: ssl.SSLContext | None = None,
                 handshake_timeout: float = 5.0, options: ChannelOptions | None = None,
                 max_handshakes: int = 16) -> None:
        self.host, self.port = host, port
        self._identity = identity if callable(identity) else (lambda: identity)
        self._decide, self._on_channel = decide, on_channel
        self._marks = marks
        self._secret, self._tls = secret or None, tls
        self._handshake_timeout = handshake_timeout
        self._options = options or ChannelOptions()
        self._slots = threading.BoundedSemaphore(max_handshakes)
        self._lock = threading.Lock()
        self._pending: dict[threading.Thread, socket.socket] = {}
        self._sock: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._closing = False

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when 0 was asked for)."""
        assert self._sock is not None, "listener not started"
        host, port = self._sock.getsockname()[:2]
        return host, port

    def start(self) -> Listener:
        """Bind and start accepting; ``LinkError`` if the address cannot be used."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._sock = socket.create_server((self.host, self.port), family=family)
        except OSError as err:
            raise LinkError(f"cannot listen on {_name((self.host, self.port))}: "
                            f"{describe(err)}") from None
        self._sock.settimeout(0.5)
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"link-listen {self.address}")
        self._accepter.start()
        return self

    def close(self) -> None:
        """Stop accepting, drop handshakes in progress, join every thread. Idempotent."""
        with self._lock:
            self._closing = True
            pending = list(self._pending.items())
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self._accepter is not None:
            self._accepter.join()
        for thread, sock in pending:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            thread.join()
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                sock, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if not self._closing:
                    log.error("listener %s stopped accepting: %s", self.address, describe(err))
                return
            self._spawn(sock, _name(addr))

    def _spawn(self, sock: socket.socket, peer: str) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("dropped a connection from %s: too many handshakes in progress", peer)
            sock.close()
            return
        thread = threading.Thread(target=self._serve, args=(sock, peer), daemon=True,
                                  name=f"link-handshake {peer}")
        with self._lock:
            if self._closing:
                self._slots.release()
                sock.close()
                return
            self._pending[thread] = sock
        thread.start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            channel = self._handshake(sock, peer)
            if channel is not None:
                self._hand_over(channel)
        finally:
            with self._lock:
                self._pending.pop(threading.current_thread(), None)
            self._slots.release()

    def _handshake(self, sock: socket.socket, peer: str) -> Channel | None:
        deadline = time.monotonic() + self._handshake_timeout
        transport: Transport | None = None
        hs: _Handshake | None = None
        try:
            transport = _open(sock, peer, self._tls, server_side=True, server_name=None,
                              deadline=deadline, options=self._options)
            hs = _Handshake(transport, Connection("secondary", self._secret), deadline,
                            "primary")
            return self._secondary_handshake(hs)
        except (ProtocolError, PeerRefused, LinkError) as err:
            log.warning("refused a connection from %s: %s", peer, err)
            if hs is not None and not isinstance(err, LinkError):
                hs.farewell(str(err))
        except Exception:  # a bug in decide() or identity() must not stop the listener
            log.exception("refused a connection from %s: the handshake failed", peer)
        (transport or PlainTransport(sock, peer)).close_gracefully()
        return None

    def _secondary_handshake(self, hs: _Handshake) -> Channel:
        conn = hs.conn
        hello = hs.receive()
        assert isinstance(hello, Hello)  # conn refuses anything else first
        reason = self._decide(hello) or protocol.auth_problem(hello.auth,
                                                             self._secret is not None)
        me = self._identity()
        reply = conn.make_reply(accepted=reason is None, reason=reason or "", uuid=me.uuid,
                                size=me.size, region_size=me.region_size,
                                generation=me.generation)
        hs.send(reply)
        if reason is not None:
            raise PeerRefused(f"refused primary volume {hello.uuid}: {reason}")
        if conn.state is State.AUTH:
            frame = hs.receive()  # the primary's AUTH; a wrong one raises PeerRefused
            assert isinstance(frame, Auth)
            hs.send(conn.auth_frame())
        # Read now, not earlier: only an authenticated primary learns them.
        for frame in conn.marked_runs_frames(self._marks() if self._marks is not None else []):
            hs.send(frame)
        log.info("link from %s established (primary volume %s, mode %s)", hs.t.peer,
                 hello.uuid, hello.mode)
        return Channel(hs.t, conn, hello=hello, reply=reply, options=self._options)

    def _hand_over(self, channel: Channel) -> None:
        try:
            self._on_channel(channel)
        except PeerRefused as err:
            log.warning("refused the link from %s: %s", channel.peer, err)
            channel.close(str(err))
        except Exception:
            log.exception("link from %s: on_channel failed", channel.peer)
            channel.close("the secondary failed to take the link")
