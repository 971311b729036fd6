"""Region geometry: how a volume of ``size`` bytes is cut into regions.

One place for the arithmetic every map user needs (the region under a byte,
the regions a request touches, the short last region), and for the rules a
size and region size must obey. Hot paths copy ``shift`` into a local or an
attribute instead of calling in here per request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

SECTOR = 512
MIN_REGION_SIZE = 4 << 10
MAX_REGION_SIZE = 16 << 20
#: Keeps a map small enough to hold in memory and scan quickly (256 MiB at most).
MAX_REGIONS = 1 << 28


def region_size_problem(region_size: int) -> str | None:
    """What is wrong with a region size, or None."""
    if region_size & (region_size - 1) or not MIN_REGION_SIZE <= region_size <= MAX_REGION_SIZE:
        return f"invalid region size {region_size}: must be a power of two from 4K to 16M"
    return None


def size_problem(size: int) -> str | None:
    """What is wrong with a volume size, or None."""
    if size <= 0 or size % SECTOR:
        return f"invalid size {size}: must be a positive multiple of {SECTOR} bytes"
    return None


def geometry_problem(size: int, region_size: int) -> str | None:
    """What is wrong with this size and region size together, or None when they make a volume."""
    problem = region_size_problem(region_size) or size_problem(size)
    if problem is None and -(-size // region_size) > MAX_REGIONS:
        problem = (f"size {size} with region size {region_size} gives more than {MAX_REGIONS} "
                   "regions")
    return problem


def region_shift(region_size: int) -> int:
    """log2 of a (power of two) region size: the region of byte ``b`` is ``b >> shift``."""
    return region_size.bit_length() - 1


@dataclasses.dataclass(frozen=True)
class RegionGeometry:
    """``size`` bytes in regions of ``region_size`` (a power of two); the last may be short."""

    size: int
    region_size: int
    #: log2(region_size): the region of byte ``b`` is ``b >> shift``
    shift: int = dataclasses.field(init=False)
    #: number of regions, the short last one included
    regions: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shift", region_shift(self.region_size))
        object.__setattr__(self, "regions", -(-self.size // self.region_size))

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """Regions ``[first, stop)`` touched by ``length > 0`` bytes at ``offset``."""
        return offset >> self.shift, ((offset + length - 1) >> self.shift) + 1

    def span_at_least_one(self, offset: int, length: int) -> tuple[int, int]:
        """Like span(), but a zero-length request still names the region at ``offset``
        (a flush or an empty write still needs a place in the order)."""
        first = offset >> self.shift
        return first, max(first + 1, ((offset + length - 1) >> self.shift) + 1)

    def region_bytes(self, region: int) -> int:
        """Bytes of the volume in ``region``: region_size, less for the short last one."""
        return min(self.region_size, self.size - (region << self.shift))

    def byte_range(self, first: int, stop: int) -> tuple[int, int]:
        """(offset, length) of regions ``[first, stop)``, the short last one included."""
        offset = first << self.shift
        return offset, min(stop << self.shift, self.size) - offset

    def bytes_in(self, count: int, includes_last: bool) -> int:
        """Bytes covered by ``count`` regions, ``includes_last`` when the last one is among them."""
        nbytes = count << self.shift
        if count and includes_last:
            nbytes -= (self.regions << self.shift) - self.size
        return nbytes


def leading(mask: np.ndarray) -> int:
    """How many entries at the start of a boolean map are True (its first run's length,
    0 when it starts False)."""
    return len(mask) if mask.all() else int(np.argmin(mask))


def chunks(runs: Iterable[tuple[int, int]], step: int) -> Iterator[tuple[int, int]]:
    """Runs of regions (first, count) cut into ``[first, stop)`` pieces of at most
    ``step`` regions, in order (a resync and an async cycle send a piece a frame)."""
    for start, count in runs:
        for first in range(start, start + count, step):
            yield first, min(start + count, first + step)


def run_regions(runs: np.ndarray | list[tuple[int, int]]) -> np.ndarray:
    """The regions of ``runs`` ([first, stop) pairs or rows) as one index array (int64),
    without a Python step per region."""
    rows = np.array(runs, dtype=np.int64).reshape(-1, 2)
    counts = rows[:, 1] - rows[:, 0]
    before = np.cumsum(counts) - counts  # indexes before each run's first
    return np.repeat(rows[:, 0] - before, counts) + np.arange(int(counts.sum()))


def spans(regions: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """[lo, hi) stretches covering ``regions`` (ascending indexes), neighbours less than
    ``gap`` apart joined: one write each instead of one per run (what lies between is
    written as it already is)."""
    if not regions.size:
        return []
    breaks = np.flatnonzero(np.diff(regions) > gap) + 1
    los = regions[np.concatenate(([0], breaks))]
    his = regions[np.concatenate((breaks - 1, [regions.size - 1]))] + 1
    return list(zip(los.tolist(), his.tolist(), strict=True))


def cut_runs(runs: np.ndarray, step: int) -> np.ndarray:
    """Runs ((first, count) rows, ascending) cut into pieces of at most ``step`` regions,
    as [first, stop) rows, in order."""
    rows = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    pieces = -(-rows[:, 1] // step)
    firsts = np.repeat(rows[:, 0], pieces)
    ends = np.repeat(rows[:, 0] + rows[:, 1], pieces)
    before = np.cumsum(pieces) - pieces
    firsts += (np.arange(int(pieces.sum())) - np.repeat(before, pieces)) * step
    return np.stack((firsts, np.minimum(firsts + step, ends)), axis=1)


def join_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[first, stop) rows (ascending, not overlapping) with those that touch joined."""
    if not len(rows):
        return []
    starts = np.flatnonzero(np.concatenate(([True], rows[1:, 0] != rows[:-1, 1])))
    stops = np.concatenate((starts[1:], [len(rows)])) - 1
    return list(zip(rows[starts, 0].tolist(), rows[stops, 1].tolist(), strict=True))
