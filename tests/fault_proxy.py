"""A TCP proxy on 127.0.0.1 that tests put between two peers to delay, cut, corrupt or stall.

This kernel has no netem, so link faults are made here. ``up`` is the
direction from the client (the one that connects to the proxy) to the
target, ``down`` the way back. Faults apply to the bytes of a direction
counted over all its connections (tests use one at a time):

- ``delay(seconds)``: every chunk is forwarded that long after it arrived
  (a delay line: throughput is kept, order too);
- ``stall()`` / ``resume()``: stop reading and forwarding (the peers' TCP
  buffers fill; nothing is lost);
- ``cut_after(n)``: forward ``n`` more bytes, then close both ends of every
  connection (a cut in the middle of a frame, when ``n`` says so);
- ``corrupt_at(n)``: flip the bits of the byte ``n`` bytes from now.

Use it as a context manager (or call ``close()``): every thread is joined.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

DIRECTIONS = ("up", "down")
_CHUNK = 64 << 10


class _Direction:
    """One direction's fault settings and byte count."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.stalled = False
        self.forwarded = 0
        self.cut_at: int | None = None
        self.corrupt: dict[int, int] = {}  # absolute byte position -> xor mask


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``target``, with faults switched on and off by a test."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._dirs = {name: _Direction() for name in DIRECTIONS}
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self.connections = 0
        self._listen = socket.create_server(("127.0.0.1", 0))
        self._listen.settimeout(0.05)
        self.address: tuple[str, int] = self._listen.getsockname()[:2]

    # -- control

    def _select(self, direction: str) -> list[_Direction]:
        if direction == "both":
            return list(self._dirs.values())
        return [self._dirs[direction]]

    def delay(self, seconds: float, direction: str = "both") -> None:
        with self._cond:
            for d in self._select(direction):
                d.delay = seconds

    def stall(self, direction: str = "both") -> None:
        with self._cond:
            for d in self._select(direction):
                d.stalled = True

    def resume(self, direction: str = "both") -> None:
        with self._cond:
            for d in self._select(direction):
                d.stalled = False
            self._cond.notify_all()

    def cut_after(self, nbytes: int, direction: str = "up") -> None:
        with self._cond:
            d = self._dirs[direction]
            d.cut_at = d.forwarded + nbytes

    def corrupt_at(self, nbytes: int, direction: str = "up", xor: int = 0xFF) -> None:
        with self._cond:
            d = self._dirs[direction]
            d.corrupt[d.forwarded + nbytes] = xor

    def forwarded(self, direction: str) -> int:
        with self._cond:
            return self._dirs[direction].forwarded

    # -- life

    def start(self) -> FaultProxy:
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def close(self) -> None:
        self._closing.set()
        if self._threads:
            self._threads[0].join()  # the accept loop: no new connections after this
        with self._cond:
            self._cond.notify_all()
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join()
        for sock in socks:
            sock.close()
        self._listen.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listen.accept()
            except TimeoutError:
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self._socks += [client, server]
                self.connections += 1
            pair = (client, server)
            for name, src, dst in (("up", client, server), ("down", server, client)):
                line: queue.Queue = queue.Queue()
                self._spawn(self._reader, f"proxy-{name}-read", src, line, self._dirs[name])
                self._spawn(self._writer, f"proxy-{name}-write", dst, line, self._dirs[name],
                            pair)

    # -- pumps

    def _wait_unstalled(self, d: _Direction) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: not d.stalled or self._closing.is_set())
        return not self._closing.is_set()

    def _reader(self, src: socket.socket, line: queue.Queue, d: _Direction) -> None:
        while self._wait_unstalled(d):
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            line.put((time.monotonic(), data))
            if not data:
                return
        line.put((0.0, b""))

    def _writer(self, dst: socket.socket, line: queue.Queue, d: _Direction,
                pair: tuple[socket.socket, socket.socket]) -> None:
        while True:
            arrived, data = line.get()
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            with self._cond:
                due = arrived + d.delay
            if self._closing.wait(max(0.0, due - time.monotonic())):
                return
            if not self._wait_unstalled(d):
                return
            data, cut = self._apply_faults(d, data)
            try:
                dst.sendall(data)
            except OSError:
                return
            if cut:
                for sock in pair:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return

    def _apply_faults(self, d: _Direction, data: bytes) -> tuple[bytes, bool]:
        with self._cond:
            start = d.forwarded
            cut = d.cut_at is not None and start + len(data) >= d.cut_at
            if cut:
                data = data[:max(0, d.cut_at - start)]
                d.cut_at = None
            hits = {p: x for p, x in d.corrupt.items() if start <= p < start + len(data)}
            if hits:
                buf = bytearray(data)
                for pos, xor in hits.items():
                    buf[pos - start] ^= xor
                    del d.corrupt[pos]
                data = bytes(buf)
            d.forwarded += len(data)
        return data, cut
