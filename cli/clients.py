"""The NBD clients connected to a running server: who they are, and cutting them off.

Why from outside: nbdkit (1.32) serves each connection on threads blocked in
read() on the client's socket, and checks its quit flag only between
requests. On SIGTERM it stops accepting, then waits for every connection
thread, so one idle client (an attached device, a forgotten libnbd handle)
keeps it alive; it never runs the plugin's cleanup. The plugin gets no call
it could react in, so ``stop`` does it: it takes a duplicate of each of the
server's accepted NBD sockets (pidfd_getfd(2), which needs the rights to
ptrace the server: root, or the same user without Yama restrictions) and
shuts it down, so that the blocked read() sees end-of-file and nbdkit goes on
to close the engine cleanly. The same duplicates name the peers (the pid
behind a unix socket via SO_PEERCRED, the address behind TCP).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from volume_core.errors import ServerError

if TYPE_CHECKING:
    from .server import Endpoint

_SYS_PIDFD_GETFD = 438  # the same on every architecture but MIPS (offset tables)
_libc = ctypes.CDLL(None, use_errno=True)


def _getfd(pidfd: int, fd: int) -> int | None:
    """A duplicate of the server's fd ``fd``; None when it was closed meanwhile."""
    got = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if got >= 0:
        return got
    err = ctypes.get_errno()
    if err in (errno.EBADF, errno.ESRCH):
        return None
    hint = " (it takes root, or CAP_SYS_PTRACE)" if err in (errno.EPERM, errno.EACCES) else ""
    raise ServerError(f"cannot look at the server's NBD connections: {os.strerror(err)}{hint}")


def _socket_fds(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    found.append(int(name))
    return found


def _is_connection_of(sock: socket.socket, endpoint: Endpoint) -> bool:
    """True for a socket the server accepted on ``endpoint`` (not a listener, not admin)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        local = sock.getsockname()
    except OSError:
        return False
    if endpoint.socket is not None:
        return (sock.family == socket.AF_UNIX and isinstance(local, str) and bool(local)
                and os.path.realpath(local) == os.path.realpath(endpoint.socket))
    return sock.family in (socket.AF_INET, socket.AF_INET6) and local[1] == endpoint.port


@contextlib.contextmanager
def _connections(pid: int, endpoint: Endpoint) -> Iterator[list[socket.socket]]:
    """Duplicates of the sockets of server ``pid``'s NBD clients, closed afterwards."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        yield []
        return
    found: list[socket.socket] = []
    try:
        for fd in _socket_fds(pid):
            dup = _getfd(pidfd, fd)
            if dup is None:
                continue
            sock = socket.socket(fileno=dup)
            if _is_connection_of(sock, endpoint):
                found.append(sock)
            else:
                sock.close()
        yield found
    finally:
        for sock in found:
            sock.close()  # closes our duplicate only; the server's fd stays open
        os.close(pidfd)


def _peer(sock: socket.socket) -> str | None:
    """Who is at the other end: ``pid N (name)`` for a unix socket, ``HOST:PORT`` for TCP."""
    if sock.family != socket.AF_UNIX:
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            return None  # already gone
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", cred)[0]
    if pid <= 0:
        return "a local process"
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid} (exited)"
    return f"pid {pid} ({name})"


def connected(pid: int, endpoint: Endpoint) -> list[str]:
    """The NBD clients of server ``pid`` listening on ``endpoint``, each named."""
    with _connections(pid, endpoint) as socks:
        return [p for p in map(_peer, socks) if p is not None]


def disconnect(pid: int, endpoint: Endpoint) -> int:
    """Shut down the sockets of server ``pid``'s NBD clients; return how many."""
    with _connections(pid, endpoint) as socks:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(socks)
