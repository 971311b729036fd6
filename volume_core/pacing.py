"""A byte rate cap: a token bucket that says how long to wait before sending.

Async cycles (and the initial sync) may be told to convey at most so many bytes
a second (``serve --max-rate``), as DRBD caps its resync (``c-max-rate``): the
rest of the CPU, disks and link stay with the host's writes, and the recovery
point lags further behind while they are busy. Pure arithmetic over a clock:
no sleeping here, no sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Pacer:
    """At most ``rate`` bytes a second on average; up to ``burst`` bytes may go at once
    after a quiet spell. ``delay(n)`` charges n bytes and says how many seconds to wait
    before sending them."""

    def __init__(self, rate: int, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate {rate} and burst {burst} must be positive")
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._at = clock()

    def delay(self, nbytes: int) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - nbytes
        self._at = now
        return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def refund(self, nbytes: int) -> None:
        """``nbytes`` charged by ``delay`` were not sent after all (the link went)."""
        self._tokens = min(self.burst, self._tokens + nbytes)
