"""blockio.all_zero against the obvious definition, across its 1 MiB pieces; Extents against
the plain hole/data probes."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from volume_core import blockio
from volume_core.blockio import all_zero

MIB = 1 << 20


@given(size=st.integers(0, 3 * MIB), where=st.none() | st.floats(0, 1, exclude_max=True),
       value=st.integers(1, 255))
def test_all_zero_is_true_only_without_a_nonzero_byte(size, where, value):
    buf = bytearray(size)
    if where is not None and size:
        buf[int(where * size)] = value
    assert all_zero(buf) == (buf.count(0) == size)
    assert all_zero(memoryview(buf)) == all_zero(bytes(buf))


def test_a_nonzero_byte_at_each_piece_boundary_is_seen():
    for at in (0, MIB - 1, MIB, 2 * MIB - 1, 2 * MIB):
        buf = bytearray(2 * MIB + 1)
        buf[at] = 1
        assert not all_zero(buf), at


def test_extents_answers_as_the_plain_probes_with_a_system_call_per_stretch(tmp_path,
                                                                             monkeypatch):
    rs = 4096
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(64 * rs)
        for first, stop in ((0, 3), (10, 30), (40, 41)):
            f.seek(first * rs)
            f.write(b"d" * (stop - first) * rs)
    fd = os.open(path, os.O_RDONLY)
    try:
        probes = [(r, 64) for r in (0, 1, 2, 3, 10, 11, 20, 29, 30, 40, 41, 63)]
        want = [(blockio.hole_end(fd, rs, a, b), blockio.data_end(fd, rs, a, b))
                for a, b in probes]
        real, calls = os.lseek, []

        def counting(*args):
            calls.append(args)
            return real(*args)

        monkeypatch.setattr(os, "lseek", counting)
        ext = blockio.Extents(fd, rs)
        got = []
        for a, b in probes:
            end = ext.hole_end(a, b)
            got.append((end, ext.data_end(a, b)))
        assert got == want
        # regions 11, 20 and 29 lie in the stretch region 10's SEEK_HOLE found: none asked
        assert len(calls) < 2 * len(probes) - 6, calls
    finally:
        os.close(fd)
