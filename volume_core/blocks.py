"""Written blocks within regions: what an async cycle conveys of a marked region.

A region (64K by default) is cut into up to ``PER_REGION`` blocks of at least
``MIN_BLOCK`` bytes; a 16-bit mask per region says which blocks were written
since the marks were last taken (bit i: block i). The tracker keeps the masks
in memory beside its marks (``RegionTracker.take``) and a cycle conveys only
the written blocks of each region it took: 4K random writes no longer carry
whole 64K regions to the secondary.

The masks are a refinement, never the record: the tracker does not persist
them (an open cycle records the ones it took: ``CycleFreeze.record_blocks``),
and wherever they are unknown (marks read from disk at start, a map merged in, a
take given back) a region's mask is ``full``: the whole region travels, as
before masks existed. A mask may say more than was written (harmless: more
bytes travel), never less.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .geometry import run_regions

#: blocks per region at most (a uint16 mask)
PER_REGION = 16
#: bytes per block at least (a region of 4K is one block)
MIN_BLOCK = 4096

_BITS = np.arange(PER_REGION, dtype=np.uint16)
_TABLE = (np.arange(1 << PER_REGION, dtype=np.uint32)[:, None] >> _BITS) & 1
#: set bits of each mask
POPCOUNT = _TABLE.sum(axis=1).astype(np.uint8)
#: runs of set bits in each mask (a run's start: a set bit after a clear one)
RUNS = (_TABLE[:, 0] + (np.diff(_TABLE, axis=1) == 1).sum(axis=1)).astype(np.uint8)
del _TABLE
_POPCOUNT, _RUNS = POPCOUNT.tolist(), RUNS.tolist()  # for one mask at a time


@dataclasses.dataclass(frozen=True)
class BlockGeometry:
    """The blocks of regions of ``1 << region_shift`` bytes in a volume of ``size``."""

    size: int
    region_shift: int
    #: log2 of the block size
    shift: int = dataclasses.field(init=False)
    #: the mask of a whole region
    full: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        per = max(1, min(PER_REGION, (1 << self.region_shift) // MIN_BLOCK))
        object.__setattr__(self, "shift", self.region_shift - (per.bit_length() - 1))
        object.__setattr__(self, "full", (1 << per) - 1)

    def mask(self, offset: int, length: int, region: int) -> int:
        """The blocks of ``region`` that ``length > 0`` bytes at ``offset`` touch."""
        base = region << self.region_shift
        lo = max(offset, base) - base
        hi = min(offset + length, base + (1 << self.region_shift)) - 1 - base
        return (2 << (hi >> self.shift)) - (1 << (lo >> self.shift))

    def known(self, masks: np.ndarray) -> np.ndarray:
        """``masks`` with none empty: a marked region without a mask (not expected: a
        write sets bits) counts as written whole."""
        return np.where(masks == 0, np.uint16(self.full), masks)

    def weigh_run(self, blocks: np.ndarray | None, first: int, stop: int) -> tuple[int, int]:
        """(bytes, extents) regions [first, stop) convey at most: their written
        ``blocks``, or (None) the whole regions."""
        if blocks is None:
            return min(stop << self.region_shift, self.size) - (first << self.region_shift), 1
        if stop - first == 1:
            mask = int(blocks[first]) or self.full
            return _POPCOUNT[mask] << self.shift, _RUNS[mask]
        return self.weigh(self.known(blocks[first:stop]))

    def weigh_runs(self, blocks: np.ndarray | None,
                   rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``weigh_run`` of each [first, stop) row at once: (bytes, extents) arrays."""
        counts = rows[:, 1] - rows[:, 0]
        if blocks is None:
            ends = np.minimum(rows[:, 1] << self.region_shift, self.size)
            return ends - (rows[:, 0] << self.region_shift), np.ones(len(rows), np.int64)
        masks = self.known(blocks[run_regions(rows)])
        at = np.cumsum(counts) - counts
        return (np.add.reduceat(POPCOUNT[masks].astype(np.int64), at) << self.shift,
                np.add.reduceat(RUNS[masks].astype(np.int64), at))

    def run_extents(self, blocks: np.ndarray | None, runs: list[tuple[int, int]]) -> np.ndarray:
        """The byte extents (uint64 (offset, length) rows) regions ``runs`` ([first,
        stop), ascending, apart) convey: their written ``blocks``, or (None) whole."""
        if blocks is None:
            rows = np.array(runs, dtype=np.int64).reshape(-1, 2) << self.region_shift
            rows[:, 1] = np.minimum(rows[:, 1], self.size) - rows[:, 0]
            return rows.astype(np.uint64)
        regions = run_regions(runs)
        return self.extents(regions, self.known(blocks[regions]))

    def weigh(self, masks: np.ndarray) -> tuple[int, int]:
        """(bytes, extents) that regions with ``masks`` convey, at most (a region's runs
        may join its neighbour's; a short last region counts whole)."""
        return (int(POPCOUNT[masks].sum(dtype=np.int64)) << self.shift,
                int(RUNS[masks].sum(dtype=np.int64)))

    def extents(self, regions: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """The written blocks of ``regions`` (ascending indexes) with ``masks``, as
        (offset, length) byte extents (uint64 rows): ascending, apart (blocks that touch,
        across regions too, are one extent), cut at the end of the volume."""
        runs = self.block_runs(regions, masks)
        starts = runs[:, 0] << self.shift
        ends = np.minimum(runs.sum(axis=1) << self.shift, self.size)
        keep = ends > starts
        return np.stack((starts[keep], (ends - starts)[keep]), axis=1).astype(np.uint64)

    def block_runs(self, regions: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """The blocks ``masks`` set in ``regions`` (ascending indexes), as (first block,
        count) int64 rows in units of blocks: ascending, apart (blocks that touch, across
        regions too, are one run); blocks past the end of the volume included."""
        per = self.full.bit_length()
        bits = ((masks.astype(np.uint32)[:, None] >> _BITS[:per]) & 1).astype(bool)
        blocks = (regions.astype(np.int64)[:, None] * per + np.arange(per))[bits]
        if not blocks.size:
            return np.zeros((0, 2), dtype=np.int64)
        breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
        firsts = blocks[np.concatenate(([0], breaks))]
        lasts = blocks[np.concatenate((breaks - 1, [blocks.size - 1]))]
        return np.stack((firsts, lasts + 1 - firsts), axis=1)

