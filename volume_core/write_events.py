"""The replication seam: what the write path hands a replicator, and in what order.

Every write-like request (write, trim, zero) and every flush takes a sequence
number under the engine's lock. While a replicator is attached, writes that
touch a common region run one at a time (``RegionLocks``), and a write takes
its number only once it holds its regions: so for any two overlapping writes
the lower number is the one applied first on the primary, and a secondary
that applies overlapping writes in number order ends with the same bytes.

The engine calls the replicator twice per write:

    submit(event)          before the local write: sending starts alongside it,
                           so a sync write costs max(local, remote), not the sum
    settle(ticket, landed) after the local write, outside the region locks: waits
                           for the peer's acknowledgement as the mode requires

A replicator never raises for trouble with its peer: it keeps the regions
marked (out of sync) and lets the host's write complete. ``event.data`` is a
read-only view of the host's buffer, valid only until ``settle`` returns:
whatever outlives that must be copied.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Protocol

WRITE = "write"
TRIM = "trim"
ZERO = "zero"
FLUSH = "flush"


@dataclasses.dataclass(frozen=True, slots=True)
class WriteEvent:
    """One request on its way to the volume, numbered in the order it is applied."""

    seq: int
    kind: str  # WRITE, TRIM, ZERO or FLUSH
    offset: int
    length: int
    data: memoryview | None = None  # WRITE only; valid until settle() returns
    fua: bool = False
    may_trim: bool = False  # ZERO only: the range may become a hole


class Replicator(Protocol):
    """What the engine needs of a replicator (sync, semi-async; see replication/)."""

    def submit(self, event: WriteEvent) -> Any:
        """Start sending ``event``; return a ticket for settle(). Must not block for long."""

    def settle(self, ticket: Any, landed: bool) -> None:
        """Wait as the mode requires; ``landed`` says whether the local write succeeded."""

    def flush(self, event: WriteEvent) -> None:
        """After a local flush: in sync mode, wait until the peer has flushed too."""


class RegionLocks:
    """Regions held by a write in flight; a write touching a held region waits.

    Used only while replicating (one byte per region, allocated then). Every
    method runs with the engine's lock held; waiting releases it.
    """

    def __init__(self, regions: int, lock: threading.Lock):
        self._held = bytearray(regions)
        self._free = threading.Condition(lock)
        self._waiters = 0

    def busy(self, first: int, stop: int) -> bool:
        if stop - first == 1:
            return bool(self._held[first])
        return any(self._held[first:stop])

    def wait(self) -> None:
        """Wait until some region is let go (lock held)."""
        self._waiters += 1
        try:
            self._free.wait()
        finally:
            self._waiters -= 1

    def take(self, first: int, stop: int) -> None:
        self._held[first:stop] = b"\x01" * (stop - first)

    def let_go(self, first: int, stop: int) -> None:
        self._held[first:stop] = bytes(stop - first)
        if self._waiters:
            self._free.notify_all()
