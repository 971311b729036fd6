"""blockio.all_zero against the obvious definition, across its 1 MiB pieces."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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
