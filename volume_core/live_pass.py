"""The initial sync's source: the live volume itself, no copy on write.

docs/ASYNC.md has the design. Before the first consistent image exists on a
secondary there is nothing to keep consistent, so the first pass over the
regions (every region ever written, or all of them for a new secondary) reads
the live volume while host writes go on: no frozen image, no copies, no store
growing with what the host writes meanwhile. A write landing during the pass
marks its region in the tracker as always; such a region is skipped when the
pass reaches it, and if it was already conveyed it stays marked: the first
cycle after the pass (a frozen one) carries it. That cycle's commit is the
first consistent image.

The pass has the interface of a ``CycleFreeze`` as the conveyor sees it:
``remaining``, ``skip_end``, ``hole_end``, ``data_end``, ``read_range``,
``conveyed_runs``, ``blocks`` (None: whole regions travel).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import blockio
from .geometry import RegionGeometry, leading, run_regions


class LivePass:
    """Conveys the regions of ``taken`` from the live volume (see the module docstring)."""

    number = None  # not a cycle: nothing commits at its end
    blocks = None  # whole regions travel

    def __init__(self, engine: Any, taken: np.ndarray) -> None:
        self.tracker = engine.tracker
        self.fd: int = engine.fd
        self.geometry: RegionGeometry = engine.volume.geometry
        #: the take (released when the pass ends or is given up)
        self.taken = taken
        #: 1 = still to convey in this pass
        self.pending = (np.asarray(taken) != 0).view(np.uint8).copy()
        self.skipped = 0  # regions written during the pass before it reached them
        self._extents = blockio.Extents(self.fd, self.geometry.region_size)

    def remaining(self) -> np.ndarray:
        return self.pending

    def skip_end(self, first: int, stop: int) -> int:
        """Past the regions from ``first`` (before ``stop``) written since the take: they
        are marked for the next cycle, which carries them; not sent now."""
        n = leading(self.tracker.marks[first:stop] != 0)
        if n:
            self.pending[first:first + n] = 0
            self.skipped += n
        return first + n

    def hole_end(self, first: int, stop: int) -> int:
        """How far from ``first`` the live volume is a hole (zeros, not read). A write
        landing there meanwhile marks its region: the next cycle carries it."""
        return self._extents.hole_end(first, stop)

    def data_end(self, first: int, stop: int) -> int:
        """Where a chunk read from ``first`` ends: at the next hole, or at the next region
        written since the take (the next cycle carries it; ``skip_end`` passes it)."""
        end = self._extents.data_end(first, stop)
        return first + 1 + leading(self.tracker.marks[first + 1:end] == 0)

    def read_range(self, offset: int, view: memoryview) -> None:
        blockio.pread_full(self.fd, view, offset)

    def conveyed_runs(self, runs: list[tuple[int, int]]) -> None:
        self.pending[run_regions(runs)] = 0
