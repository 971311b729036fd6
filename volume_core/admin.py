"""The admin socket: JSON lines over a unix socket, served from inside a running engine.

A request is one line ``{"op": "status", ...args}``; the reply is one line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``.
The CLI talks to a running server only through this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import AdminError, NbdMirrorError

Handler = Callable[..., Any]
log = logging.getLogger(__name__)
_MAX_LINE = 1 << 20
#: sun_path holds 108 bytes; longer paths are reached through /proc/self/fd/N/<name>.
_SUN_PATH_MAX = 100


@contextlib.contextmanager
def short_unix_path(path: Path) -> Iterator[str]:
    """Yield a path for bind()/connect() that fits sun_path, whatever the length of ``path``."""
    path = Path(path)
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        yield str(path)
        return
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dirfd}/{path.name}"
    finally:
        os.close(dirfd)


class AdminServer:
    """Accepts admin connections on a daemon thread and dispatches to handlers."""

    def __init__(self, path: Path, handlers: dict[str, Handler]):
        self.path = Path(path)
        self.handlers = handlers
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with short_unix_path(self.path) as where:
            self._sock.bind(where)
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="nbdmirror-admin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                reply = self.dispatch(line)
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError("expected an object with an 'op' field")
        except ValueError as err:
            return {"ok": False, "error": f"malformed admin request: {err}"}
        op = request.pop("op")
        handler = self.handlers.get(op)
        if handler is None:
            return {"ok": False, "error": f"unknown admin operation {op!r}"}
        try:
            return {"ok": True, "result": handler(**request)}
        except NbdMirrorError as err:
            log.warning("admin %s refused: %s", op, err)
            return {"ok": False, "error": str(err)}
        except TypeError as err:
            return {"ok": False, "error": f"bad arguments for {op!r}: {err}"}
        except Exception as err:  # noqa: BLE001 - the server must answer, not die
            log.exception("admin %s failed", op)  # a bug: keep its traceback in server.log
            return {"ok": False, "error": f"{op} failed: {type(err).__name__}: {err}"}


def call(path: Path, op: str, timeout: float = 30.0, **args: Any) -> Any:
    """Send one request to the admin socket at ``path``; return its result or raise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with short_unix_path(Path(path)) as where:
            sock.connect(where)
        sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline(_MAX_LINE)
    except FileNotFoundError:
        raise AdminError(f"no server is listening on {path}") from None
    except ConnectionRefusedError:
        raise AdminError(f"the server behind {path} is not running") from None
    except TimeoutError:
        raise AdminError(f"the server behind {path} did not answer within {timeout:g}s") from None
    except OSError as err:
        raise AdminError(f"cannot reach the server at {path}: {err.strerror or err}") from None
    finally:
        sock.close()
    if not line:
        raise AdminError(f"the server behind {path} closed the connection without answering")
    try:
        reply = json.loads(line)
    except ValueError:
        raise AdminError(f"the server behind {path} sent a malformed reply") from None
    if not reply.get("ok"):
        raise AdminError(reply.get("error") or "the server reported an unspecified error")
    return reply.get("result")
