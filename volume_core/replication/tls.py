"""The byte streams under a replication link: plain TCP, or TLS over TCP.

A transport moves bytes and nothing else: ``recv(n)`` and ``send(parts, ...)``
on a socket whose timeout is a short *tick*, so that the callers (``link.py``)
can check their own deadlines between ticks. Timeouts surface as
``TimeoutError``; a dead socket as ``OSError``; every TLS failure as a
``LinkError`` whose one line says what to fix.

TLS runs through ``ssl.SSLObject`` and memory BIOs rather than ``SSLSocket``:
a channel reads on one thread and writes on another, and OpenSSL does not
allow one SSL object to be used by two threads at once. Here the SSL object
is touched only under a lock and only for in-memory work (encrypt, decrypt);
the socket I/O happens outside the lock, and only the sending thread ever
writes to the socket, so records leave in the order they were made.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ..errors import LinkError, UsageError

Buffer = bytes | bytearray | memoryview

#: The most one raw read takes from the socket.
RAW_CHUNK = 256 << 10
#: The most plaintext encrypted in one go (bounds the ciphertext held in memory).
_TLS_WRITE_CHUNK = 256 << 10
_MAX_IOV = 64
_T = TypeVar("_T")
# OpenSSL verify codes that mean "not signed by a CA we trust".
_UNTRUSTED = {2, 18, 19, 20, 21, 27}
_HOSTNAME_MISMATCH = 62
_EXPIRED = 10


class TlsContext(ssl.SSLContext):
    """An ``ssl.SSLContext`` that remembers its CA file, so errors can name it."""

    ca_file: str | None = None


def server_context(cert: str | Path, key: str | Path, ca: str | Path | None = None) -> TlsContext:
    """The secondary's context: its certificate, and with ``ca`` a required client certificate."""
    ctx = TlsContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key)
    if ca is not None:
        _load_ca(ctx, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None,
                   *, check_hostname: bool = False) -> TlsContext:
    """The primary's context: the secondary's certificate must be signed by ``ca``.

    Peers are addressed by IP, so the host name is checked only when asked
    (``connect`` then needs a ``server_name``).
    """
    ctx = TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, ca)
    if cert is not None:
        _load_chain(ctx, cert, key)
    return ctx


def _load_chain(ctx: TlsContext, cert: str | Path, key: str | Path | None) -> None:
    try:
        ctx.load_cert_chain(str(cert), None if key is None else str(key))
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"TLS: cannot load the certificate {cert} with key {key}: "
                         f"{_reason(err)}") from None


def _load_ca(ctx: TlsContext, ca: str | Path) -> None:
    try:
        ctx.load_verify_locations(str(ca))
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"TLS: cannot load the CA certificate {ca}: {_reason(err)}") from None
    ctx.ca_file = str(ca)


def _reason(err: BaseException) -> str:
    if isinstance(err, LinkError):
        return str(err)
    if isinstance(err, ssl.SSLError) and err.reason:
        return err.reason.lower().replace("_", " ")
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


def describe(err: BaseException) -> str:
    """A short lower-case phrase for a socket or TLS error (``connection reset by peer``)."""
    return _reason(err)


def tls_failure(err: ssl.SSLError, peer: str, ca_file: str | None) -> LinkError:
    """One line a user can act on, for a TLS error met while talking to ``peer``."""
    ca = f"the CA in {ca_file}" if ca_file else "a trusted CA"
    if isinstance(err, ssl.SSLCertVerificationError):
        code = err.verify_code
        if code in _UNTRUSTED:
            text = f"the {peer}'s certificate is not signed by {ca}"
        elif code == _HOSTNAME_MISMATCH:
            text = f"the {peer}'s certificate does not name the server name asked for"
        elif code == _EXPIRED:
            text = f"the {peer}'s certificate has expired"
        else:
            text = f"the {peer}'s certificate was not accepted: {err.verify_message}"
        return LinkError(f"TLS: {text}")
    reason = (err.reason or "").upper()
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        text = f"the {peer} sent no certificate (give it --tls-cert and --tls-key)"
    elif "CERTIFICATE_REQUIRED" in reason:
        text = f"the {peer} requires a certificate from this side (give --tls-cert and --tls-key)"
    elif "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
        text = f"the {peer} does not trust this side's certificate (is it signed by its CA?)"
    elif reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL"):
        text = f"the {peer} does not speak TLS (give the TLS options to both sides)"
    else:
        text = f"{_reason(err)} (with the {peer})"
    return LinkError(f"TLS: {text}")


def _advance(views: list[memoryview], n: int) -> None:
    while n:
        first = len(views[0])
        if n >= first:
            n -= first
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0


def send_now(sock: socket.socket, views: list[memoryview]) -> list[memoryview]:
    """Send what the kernel takes without waiting; return the views left (empty: all sent).

    ``sock`` must be non-blocking (timeout 0): no poll before the send, and
    ``BlockingIOError`` once the socket buffer is full.
    """
    while views:
        try:
            n = sock.sendmsg(views[:_MAX_IOV], (), socket.MSG_NOSIGNAL)
        except BlockingIOError:
            break
        _advance(views, n)
    return views


def send_all(sock: socket.socket, parts: Sequence[Buffer], stall: float,
             aborted: Callable[[], bool]) -> None:
    """Send every byte of ``parts`` (one ``sendmsg`` each time, no joining copy).

    ``sock`` has a short timeout; a send that makes no progress for ``stall``
    seconds raises ``LinkError``, and so does ``aborted()`` turning true.
    """
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    last = time.monotonic()
    while views:
        try:
            n = sock.sendmsg(views[:_MAX_IOV])
        except TimeoutError:
            if aborted():
                raise LinkError("the link was closed while sending") from None
            if time.monotonic() - last > stall:
                raise LinkError(f"the peer took no data for {stall:g} s") from None
            continue
        last = time.monotonic()
        _advance(views, n)


class PlainTransport:
    """Bytes over a plain TCP socket."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.tls = False
        self._nowait: socket.socket | None = None

    def try_send(self, parts: Sequence[Buffer]) -> list[memoryview]:
        """Send what the socket takes at once, never waiting; return the bytes left.

        The caller sends the rest with ``send_rest`` before anything else.
        """
        return send_now(self._nowait_socket(), self._wire(parts))

    def send_rest(self, views: list[memoryview], stall: float,
                  aborted: Callable[[], bool]) -> None:
        """Send bytes ``try_send`` left (already in their wire form)."""
        send_all(self.sock, views, stall, aborted)

    def _wire(self, parts: Sequence[Buffer]) -> list[memoryview]:
        return [memoryview(p).cast("B") for p in parts if len(p)]

    def _nowait_socket(self) -> socket.socket:
        """A second handle on the connection with timeout 0 (``sock`` keeps its tick)."""
        if self._nowait is None:
            self._nowait = socket.socket(self.sock.family, self.sock.type,
                                         fileno=os.dup(self.sock.fileno()))
            self._nowait.setblocking(False)
        return self._nowait

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` once the peer closed. ``TimeoutError`` after a tick."""
        return self.sock.recv(n)

    def recv_into(self, buffer: memoryview) -> int:
        """Like ``recv``, into ``buffer``: how many bytes (0 once the peer closed)."""
        return self.sock.recv_into(buffer)

    def send(self, parts: Sequence[Buffer], stall: float, aborted: Callable[[], bool]) -> None:
        send_all(self.sock, parts, stall, aborted)

    def shutdown(self) -> None:
        """Wake any thread blocked on the socket; the peer sees the end of the stream."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self.sock.close()
        if self._nowait is not None:
            self._nowait.close()

    def close_gracefully(self, wait: float = 0.5) -> None:
        """Close after the peer has read what we sent: end our side, drain theirs, then close.

        Closing with unread input makes the kernel send a reset, which can
        destroy our last words (a TLS alert, an ERROR frame) before the peer
        reads them.
        """
        deadline = time.monotonic() + wait
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while time.monotonic() < deadline and self.sock.recv(RAW_CHUNK):
                pass
        except OSError:  # TimeoutError included: the peer is not closing; stop waiting
            pass
        self.close()


class TlsTransport(PlainTransport):
    """Bytes over TLS, through an ``SSLObject`` (see the module docstring)."""

    def __init__(self, sock: socket.socket, peer: str, context: ssl.SSLContext, *,
                 server_side: bool, server_name: str | None = None) -> None:
        super().__init__(sock, peer)
        self.tls = True
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_name)
        self._lock = threading.Lock()
        self._ca_file = getattr(context, "ca_file", None)
        self._peer_role = "primary" if server_side else "secondary"

    def handshake(self, deadline: float) -> None:
        """Run the TLS handshake, by ``deadline`` (a ``time.monotonic()`` value)."""
        while True:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush(deadline)
                self._feed(deadline)
                continue
            except ssl.SSLError as err:
                self._flush_quietly()  # the alert tells the peer why
                raise tls_failure(err, self._peer_role, self._ca_file) from None
            self._flush(deadline)
            return

    def _flush(self, deadline: float) -> None:
        data = self._out.read()
        if data:
            send_all(self.sock, [data], max(0.0, deadline - time.monotonic()), lambda: False)

    def _flush_quietly(self) -> None:
        try:
            self._flush(time.monotonic() + 0.2)
        except (OSError, LinkError):
            pass

    def _feed(self, deadline: float) -> None:
        while True:
            try:
                raw = self.sock.recv(RAW_CHUNK)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise LinkError(f"TLS: the {self._peer_role} did not finish the TLS "
                                    "handshake in time") from None
        if not raw:
            raise LinkError(f"TLS: the {self._peer_role} closed the connection during the TLS "
                            "handshake (does it use TLS, with a certificate this side trusts?)")
        self._in.write(raw)

    def recv(self, n: int) -> bytes:
        return self._read(lambda: self._obj.read(n), b"")

    def recv_into(self, buffer: memoryview) -> int:
        return self._read(lambda: self._obj.read(len(buffer), buffer), 0)

    def _read(self, read: Callable[[], _T], closed: _T) -> _T:
        while True:
            with self._lock:
                try:
                    return read()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return closed
                except ssl.SSLError as err:
                    raise tls_failure(err, self._peer_role, self._ca_file) from None
            raw = self.sock.recv(RAW_CHUNK)  # TimeoutError: the caller checks its deadline
            if not raw:
                return closed  # an end without close_notify: the decoder tells a cut frame
            with self._lock:
                self._in.write(raw)

    def _wire(self, parts: Sequence[Buffer]) -> list[memoryview]:
        """Encrypt ``parts``: the records, in the order they must go out."""
        with self._lock:
            for part in parts:
                view = memoryview(part).cast("B")
                for start in range(0, len(view), _TLS_WRITE_CHUNK):
                    self._obj.write(view[start:start + _TLS_WRITE_CHUNK])
            data = self._out.read()
        return [memoryview(data)] if data else []

    def send(self, parts: Sequence[Buffer], stall: float, aborted: Callable[[], bool]) -> None:
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), _TLS_WRITE_CHUNK):
                with self._lock:
                    self._obj.write(view[start:start + _TLS_WRITE_CHUNK])
                    data = self._out.read()
                send_all(self.sock, [data], stall, aborted)
