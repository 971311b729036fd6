"""``nbdmirror sync``: start an async cycle now, and follow it until it commits.

The running server does the work (its admin socket's ``cycle-now``); this only
asks and reads ``status``. On a terminal the wait shows a progress bar (tqdm)
over the bytes of the cycle; otherwise one plain line every few seconds, so a
script's log stays readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from volume_core import operations
from volume_core.errors import ServerError
from volume_core.units import format_size
from volume_core.volume import Volume

#: how often the wait looks at the server's status
POLL = 0.2
#: how often a plain (not a terminal) wait prints a line
PLAIN_EVERY = 5.0


def async_status(volume: Volume) -> dict[str, Any]:
    """The server's async mirroring status; ServerError when it does not mirror async."""
    rep = operations.call(volume, "status").get("replication")
    if not rep or rep.get("mode") != "async" or rep.get("role") == "secondary":
        mode = "no replication" if not rep else (
            "a secondary" if rep.get("role") == "secondary" else f"{rep.get('mode')} mode")
        raise ServerError(f"{volume.path} is not mirrored in async mode ({mode}); serve it "
                          "with --replicate-to HOST:PORT --mode async")
    return rep


def request(volume: Volume) -> int:
    """Start a cycle now; the number of the cycle that commits what is written by now."""
    async_status(volume)
    return int(operations.call(volume, "cycle-now"))


def wait(volume: Volume, number: int, timeout: float | None,
         out: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> dict:
    """Until cycle ``number`` is committed (ServerError after ``timeout`` s); the last
    status. Shows progress on ``out`` (stderr by default)."""
    out = out or sys.stderr
    show = _Bar(out, number) if out.isatty() else _Lines(out, number, clock)
    deadline = None if timeout is None else clock() + timeout
    try:
        while True:
            rep = async_status(volume)
            if rep["committed_cycle"] >= number:
                return rep
            show.update(rep)
            if deadline is not None and clock() > deadline:
                raise ServerError(f"cycle {number} did not commit within {timeout:g}s "
                                  f"(state: {rep['state']}; last error: "
                                  f"{rep.get('last_error') or 'none'})")
            time.sleep(POLL)
    finally:
        show.close()


def _current(rep: dict, number: int) -> dict | None:
    cyc = rep.get("cycle") or {}
    return cyc if cyc.get("number") == number and cyc.get("state") != "idle" else None


class _Bar:
    """A tqdm bar over the bytes of the cycle being waited for."""

    def __init__(self, out: TextIO, number: int) -> None:
        from tqdm import tqdm  # only on a terminal

        self.number = number
        self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=out,
                        desc=f"cycle {number}: waiting", leave=True)

    def update(self, rep: dict) -> None:
        cyc = _current(rep, self.number)
        if cyc is None:
            self.bar.set_description(f"cycle {self.number}: {rep['state']}")
            return
        self.bar.set_description(f"cycle {self.number}: {cyc['state']}")
        self.bar.total = cyc["bytes"]
        self.bar.n = cyc["conveyed_bytes"]
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """A plain line every few seconds: regions, bytes, rate, time left."""

    def __init__(self, out: TextIO, number: int, clock: Callable[[], float]) -> None:
        self.out, self.number, self.clock = out, number, clock
        self.last = clock() - PLAIN_EVERY  # the first update prints
        self.seen: tuple[float, int] | None = None  # (when, conveyed bytes)

    def update(self, rep: dict) -> None:
        now = self.clock()
        if now - self.last < PLAIN_EVERY:
            return
        self.last = now
        cyc = _current(rep, self.number)
        if cyc is None:
            print(f"cycle {self.number}: {rep['state']}", file=self.out, flush=True)
            return
        done, total = cyc["conveyed_bytes"], cyc["bytes"]
        rate = left = ""
        if self.seen is not None and now > self.seen[0]:
            speed = (done - self.seen[1]) / (now - self.seen[0])
            if speed > 0:
                rate = f", {format_size(int(speed))}/s"
                left = f", about {max(0, total - done) / speed:.0f}s left"
        self.seen = (now, done)
        print(f"cycle {self.number}: {cyc['state']}, {cyc['conveyed_regions']} of "
              f"{cyc['regions']} regions, {format_size(done)} of {format_size(total)}"
              f"{rate}{left}", file=self.out, flush=True)

    def close(self) -> None:
        pass
