"""NBD requests through a real nbdkit and the libnbd client, across regions and at the end."""

from __future__ import annotations

import os

import nbd
import numpy as np
import pytest

pytestmark = pytest.mark.integration

RS = 64 << 10
SIZE = 4 << 20
TAIL = 512  # volume size is not a multiple of the region size: the last region is short


@pytest.fixture
def served(serve):
    s = serve(size=str(SIZE + TAIL))
    h = s.connect()
    yield s, h
    h.shutdown()


def marked(cli, vol):
    return cli("status", vol, "--json").json()["marked_regions"]


def test_write_read_across_region_boundaries(served, cli):
    s, h = served
    size = h.get_size()
    assert size == SIZE + TAIL
    rng = np.random.default_rng(1)
    cases = [(0, 1), (RS - 3, 7), (RS - 4096, 3 * RS + 8192), (5 * RS, RS),
             (size - TAIL - 10, 10 + TAIL), (size - 1, 1)]
    shadow = bytearray(size)
    for off, ln in cases:
        data = rng.integers(0, 256, ln, dtype=np.uint8).tobytes()
        h.pwrite(data, off)
        shadow[off:off + ln] = data
    h.flush()
    assert h.pread(size, 0) == bytes(shadow)
    # the data file is the raw image
    assert (s.vol / "data.img").read_bytes() == bytes(shadow)
    touched = set()
    for off, ln in cases:
        touched.update(range(off // RS, (off + ln - 1) // RS + 1))
    assert marked(cli, s.vol) == len(touched)


def test_fua_write_is_acknowledged_and_counted(served, cli):
    s, h = served
    h.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA)
    st = cli("status", s.vol, "--json").json()["stats"]
    assert st["writes"] == 1 and st["bytes_written"] == 4096


def test_requests_past_the_end_are_refused_and_change_nothing(served):
    s, h = served
    size = h.get_size()
    h.pwrite(b"\xaa" * 512, size - 512)
    before = (s.vol / "data.img").read_bytes()
    for op in (lambda: h.pwrite(b"z" * 1024, size - 512),
               lambda: h.pwrite(b"z", size),
               lambda: h.pread(2, size - 1),
               lambda: h.trim(1024, size - 512),
               lambda: h.zero(4096, size)):
        with pytest.raises(nbd.Error):
            op()
    assert (s.vol / "data.img").read_bytes() == before
    assert h.pread(512, size - 512) == b"\xaa" * 512  # connection still usable


def test_trim_and_zero_read_back_zero_punch_holes_and_mark(served, cli):
    s, h = served
    h.pwrite(os.urandom(2 * RS), RS)  # regions 1,2
    h.pwrite(os.urandom(2 * RS), 8 * RS)  # regions 8,9
    h.flush()
    blocks_before = os.stat(s.vol / "data.img").st_blocks
    h.trim(RS, RS)
    h.zero(RS + 100, 8 * RS)  # may punch: NBD zero without NO_HOLE
    h.zero(4096, 20 * RS, nbd.CMD_FLAG_NO_HOLE)  # allocated zeros, region 20
    assert h.pread(RS, RS) == bytes(RS)
    assert h.pread(RS + 100, 8 * RS) == bytes(RS + 100)
    assert h.pread(4096, 20 * RS) == bytes(4096)
    h.flush()
    assert os.stat(s.vol / "data.img").st_blocks < blocks_before
    assert marked(cli, s.vol) == 5  # 1, 2, 8, 9, 20
    st = cli("status", s.vol, "--json").json()["stats"]
    assert st["trims"] == 1 and st["zeroes"] == 2 and st["flushes"] >= 2


def test_extents_report_holes_and_data(served):
    s, h = served
    h.pwrite(b"d" * RS, 2 * RS)
    h.pwrite(b"e" * 4096, SIZE - 4096)
    h.flush()
    seen = []

    def cb(metacontext, offset, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            seen.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    pos = 0
    size = h.get_size()
    layout = []
    while pos < size:
        seen.clear()
        h.block_status(size - pos, pos, cb)
        for length, flags in seen:
            layout.append((pos, length, flags))
            pos += length
    data = [(o, n) for o, n, f in layout if not f & nbd.STATE_HOLE]
    holes = [(o, n) for o, n, f in layout if f & nbd.STATE_HOLE]
    assert (2 * RS, RS) in data and (SIZE - 4096, 4096) in data
    assert holes[0] == (0, 2 * RS)
    assert all(f & nbd.STATE_ZERO for _, _, f in layout if f & nbd.STATE_HOLE)
    assert sum(n for _, n, _ in layout) == size


def test_multiple_connections_see_each_others_writes(served):
    s, h = served
    h2 = s.connect()
    assert h2.can_multi_conn()
    h.pwrite(b"q" * 4096, 4096)
    h.flush()
    assert h2.pread(4096, 4096) == b"q" * 4096
    h2.shutdown()
