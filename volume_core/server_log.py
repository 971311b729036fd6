"""A server's log: everything it says on stderr, timestamped, in a file that cannot fill the disk.

A daemonised nbdkit has its stderr on /dev/null, and one started with stderr
on a plain file would grow it without bound and without dates; either way the
errors of a running server (EIO, ENOSPC, exceptions in the plugin) were lost
or unreadable. ``capture_stderr()`` runs in the server once it is started
(``after_fork``): it points fd 2 (and fd 1, if that was the log) at a pipe,
so nbdkit's own messages (which it writes to fd 2 from C) and Python's
stderr and logging all go there, and a small helper process (this module run
with ``-m``) turns each message into a timestamped record of ``server.log``,
rotated so that the file and its backups stay under a cap.

The reader is a process, not a thread: nbdkit's Python plugin writes a
callback's traceback to fd 2 while it holds the GIL, so a reader thread that
fell behind would find a full pipe, a writer blocked on it holding the GIL,
and no way to take the GIL to drain it. A process also outlives a crash: it
logs until the last writer is gone (EOF), so the last words of an aborting
server reach the file. Where fd 2 went somewhere other than /dev/null or the
log itself (a terminal, for ``nbdmirror serve`` in the foreground) every
message is echoed there too, without the timestamp.

Floods are throttled: at most ``THROTTLE_LIMIT`` alike messages (equal but for
their numbers) per second, then one line saying how many were suppressed.

The cap is 16 MiB over ``LOG_FILES`` files by default; the environment
variable ``NBDMIRROR_LOG_CAP`` (a size: ``64K``, ``1M``) of the process that
starts the server changes it, e.g. for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fcntl
import logging
import logging.handlers
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

CAP_ENV = "NBDMIRROR_LOG_CAP"
#: the reader runs as ``python -m READER_MODULE LOG --cap BYTES``
READER_MODULE = "volume_core.server_log"
DEFAULT_CAP = 16 << 20
#: server.log and its backups server.log.1 ... server.log.3
LOG_FILES = 4
THROTTLE_LIMIT = 10
THROTTLE_PERIOD = 1.0
#: a message longer than this is cut: one record must never be bigger than a file
MAX_MESSAGE = 64 << 10
MAX_LINES = 400
#: a message ends when another begins or nothing more arrives for this long
IDLE = 0.1
PIPE_SIZE = 1 << 20
#: how the server's own Python logging is written to fd 2 (the reader adds the time)
RECORD_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: where a message begins: an nbdkit message, or a record in RECORD_FORMAT
_MESSAGE_START = re.compile(r"^(nbdkit: |(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: )")
_NUMBER = re.compile(r"\d+")


def signature(message: str) -> str:
    """What makes messages alike: their first and last lines, numbers ignored."""
    lines = message.splitlines() or [""]
    return _NUMBER.sub("#", lines[0] + "\n" + lines[-1])


@dataclass
class _Window:
    start: float
    sample: str
    admitted: int = 1
    suppressed: int = 0


@dataclass
class Throttle:
    """Lets through at most ``limit`` alike messages per ``period`` seconds and counts the rest."""

    limit: int = THROTTLE_LIMIT
    period: float = THROTTLE_PERIOD
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, _Window] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def admit(self, message: str) -> tuple[bool, list[str]]:
        """Whether to log ``message``, and the suppression notes to log before it."""
        key = signature(message)
        notes = self.overdue()
        with self._lock:
            w = self._windows.get(key)
            if w is None:
                self._windows[key] = _Window(self.clock(), message.partition("\n")[0][:200])
                return True, notes
            if w.admitted < self.limit:
                w.admitted += 1
                return True, notes
            w.suppressed += 1
            return False, notes

    def overdue(self, everything: bool = False) -> list[str]:
        """Notes for windows that have ended with messages suppressed; forgets ended windows."""
        now = self.clock()
        notes = []
        with self._lock:
            for key, w in list(self._windows.items()):
                if everything or now - w.start >= self.period:
                    del self._windows[key]
                    if w.suppressed:
                        notes.append(f"suppressed {w.suppressed} more messages like: {w.sample}")
        return notes


def cap_from_env(environ: dict[str, str] | None = None) -> int:
    """The cap on a server's log files together, from NBDMIRROR_LOG_CAP or the default."""
    from .errors import NbdMirrorError
    from .units import parse_size

    text = (os.environ if environ is None else environ).get(CAP_ENV, "")
    if not text:
        return DEFAULT_CAP
    try:
        return max(parse_size(text, CAP_ENV), 4096)
    except NbdMirrorError:
        return DEFAULT_CAP


# -- in the server -----------------------------------------------------------------------

def capture_stderr(path: Path, cap: int) -> subprocess.Popen | None:
    """Send this process's fd 2 to a reader process that writes it to ``path``.

    Call once in the server, once nbdkit has started it (``after_fork``) and
    before threads start. Also sends the server's Python logging (INFO and up) to
    fd 2. Returns the reader, or None when it could not start (fd 2 is then
    left alone: the server serves without a log rather than not at all).
    """
    echo = _worth_echoing(2, path)
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        # close_fds: the reader must hold nothing of the server (its volume lock above all).
        reader = subprocess.Popen(
            [_python(), "-m", READER_MODULE, str(path), "--cap", str(cap)],
            stdin=read_end, stdout=2 if echo else subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True, start_new_session=True, env=env, cwd="/")
    except OSError as err:
        os.close(read_end)
        os.close(write_end)
        reader = None
        print(f"nbdmirror: cannot start the log reader for {path}: {err}", file=sys.stderr)
    else:
        os.close(read_end)
        sys.stdout.flush()
        sys.stderr.flush()
        if _is_file(1, path):  # started with stdout on the log: keep the log all timestamped
            os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(RECORD_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return reader


def readers(path: Path) -> list[int]:
    """The pids of the reader processes that write the log ``path`` (an absolute path)."""
    want = [b"-m", READER_MODULE.encode(), os.fsencode(str(path))]
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args[1:4] == want:
            found.append(int(entry.name))
    return found


def _parent(pid: int) -> int | None:
    """Process ``pid``'s parent, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_for_readers(path: Path, timeout: float, serving: int | None = None) -> bool:
    """Wait until no reader writes ``path``: a server that died has then been logged in
    full. ``serving``: the pid of another server of the same log, alive: its reader
    (its child) goes on and is not waited for."""
    deadline = time.monotonic() + timeout
    while [pid for pid in readers(path) if serving is None or _parent(pid) != serving]:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def flush() -> None:
    """Push what the server logged so far into the pipe (at shutdown)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()


def _worth_echoing(fd: int, log_path: Path | None = None) -> bool:
    """True unless ``fd`` is closed, /dev/null (a daemon's stderr) or the log itself."""
    try:
        st = os.fstat(fd)
        null = os.stat(os.devnull)
    except OSError:
        return False
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev:
        return False
    return log_path is None or not _is_file(fd, log_path)


def _is_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _python() -> str:
    """A Python to run the reader with: the one this interpreter is embedded from, if any."""
    v = sys.version_info
    candidate = Path(sys.base_exec_prefix) / "bin" / f"python{v.major}.{v.minor}"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("python3") or sys.executable


# -- in the reader process ----------------------------------------------------------------

class _Formatter(logging.Formatter):
    """ISO 8601 local time with milliseconds and offset; messages cut to a size."""

    def __init__(self, max_message: int):
        super().__init__("%(asctime)s %(message)s")
        self.max_message = max_message

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        when = datetime.datetime.fromtimestamp(record.created).astimezone()
        return when.isoformat(timespec="milliseconds")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        text = super().formatMessage(record)
        if len(text) > self.max_message:
            cut = len(text) - self.max_message
            text = text[:self.max_message] + f" ... ({cut} characters cut)"
        return text


class _LogFile(logging.handlers.RotatingFileHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        # A full disk must not turn into tracebacks; the next record tries again.
        with contextlib.suppress(Exception):
            if self.stream is not None:
                self.stream.close()
        self.stream = None


def open_log(path: Path, cap: int) -> logging.Logger:
    """A logger that writes timestamped records to ``path``, rotated under ``cap`` in total."""
    per_file = max(cap // LOG_FILES, 1024)
    handler = _LogFile(path, maxBytes=per_file, backupCount=LOG_FILES - 1, encoding="utf-8",
                       errors="backslashreplace", delay=True)
    handler.setFormatter(_Formatter(min(MAX_MESSAGE, per_file // 4)))
    logger = logging.getLogger("nbdmirror.server-log")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


class _Pump:
    """Reads messages from a pipe and writes each once, throttled, to the log (and the echo)."""

    def __init__(self, fd: int, logger: logging.Logger, echo: TextIO | None):
        self.fd = fd
        self.logger = logger
        self.echo = echo
        self.throttle = Throttle()
        self.pending: list[str] = []
        self.arrived = 0.0  # when the first line of the pending message came

    def run(self) -> None:
        partial = b""
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], IDLE)
                if not ready:
                    if partial:
                        self._line(partial.decode(errors="replace"))
                        partial = b""
                    self._end_message()
                    self._notes(self.throttle.overdue())
                    continue
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    break
                *lines, partial = (partial + chunk).split(b"\n")
                if len(partial) > MAX_MESSAGE:  # no newline in sight: do not hoard it
                    lines.append(partial)
                    partial = b""
                for line in lines:
                    self._line(line.decode(errors="replace"))
            except OSError as err:
                if err.errno == errno.EBADF:  # no pipe to read: nothing will ever come
                    break
                time.sleep(IDLE)
            except Exception:  # noqa: BLE001 - the reader must outlive anything it is sent
                self.pending = []
                time.sleep(IDLE)
        if partial:
            self._line(partial.decode(errors="replace"))
        self._end_message()
        self._notes(self.throttle.overdue(everything=True))

    def _line(self, text: str) -> None:
        text = text.rstrip()
        if _MESSAGE_START.match(text) or len(self.pending) >= MAX_LINES:
            self._end_message()
        if text or self.pending:
            if not self.pending:
                self.arrived = time.time()
            self.pending.append(text)

    def _end_message(self) -> None:
        while self.pending and not self.pending[-1]:
            self.pending.pop()
        if not self.pending:
            return
        message = "\n".join(self.pending)
        self.pending = []
        admitted, notes = self.throttle.admit(message)
        self._notes(notes)
        if admitted:
            self._write(message, self.arrived)

    def _notes(self, notes: list[str]) -> None:
        for note in notes:
            self._write(note)

    def _write(self, message: str, when: float | None = None) -> None:
        record = self.logger.makeRecord(self.logger.name, logging.INFO, __file__, 0, message,
                                        None, None)
        if when is not None:  # stamped with its arrival, not with the end of its message
            record.created = when
        self.logger.handle(record)
        if self.echo is not None:
            with contextlib.suppress(Exception):
                self.echo.write(message + "\n")
                self.echo.flush()


def main(argv: list[str] | None = None) -> None:
    """The reader: stdin is the server's fd 2; stdout, if open, the terminal to echo to."""
    parser = argparse.ArgumentParser(prog=f"python -m {READER_MODULE}")
    parser.add_argument("path", type=Path)
    parser.add_argument("--cap", type=int, default=DEFAULT_CAP)
    args = parser.parse_args(argv)
    # It ends when the last writer closes the pipe, never on a signal meant for the server.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logger = open_log(args.path, args.cap)
    echo = sys.stdout if _worth_echoing(1) else None
    _Pump(0, logger, echo).run()
    logging.shutdown()


if __name__ == "__main__":
    main()
