"""Attack on 7f3b1e0: ``native.copy_range`` (C ``nbm_copy_range`` and its numpy/os twin) and
``CycleFreeze._copy_blocks`` copying a region's frozen blocks with one ``copy_range``.

``copy_range`` is held against its twin and an obvious reference on random sparse
sources, destinations that hold other bytes, ranges past the source's end, both with
``copy_file_range`` and with pread/pwrite; against unusable descriptors (read-only or
append-only destination, write-only source, pipes, a directory, ``/dev/zero``,
``/proc``), offsets near 2**63, and one file as both ends.

Found (fixed): a destination opened ``O_APPEND`` (named in ``nbm_cfr_unsupported`` as a
case the pread/pwrite fallback handles) got the bytes appended at its end, not at the
offset: ``pwrite`` on Linux ignores the offset of an ``O_APPEND`` descriptor, and the call
said it copied them (C and twin, either mode; ``copy_runs`` too). Both now refuse such
a destination with EBADF, as ``copy_file_range`` does, before any byte moves.

The freeze side: random geometries and masks (the store holds exactly the take from the
first frozen block to the last, cut at the volume's end, and never grows), a sparse or
short live file over a store holding other bytes, a real EBADF from the store, and a
copy that wrote part of the store then failed; each followed by a retry and a restart.
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_attack_session13 import (
    Writer,
    disk_state,
    freeze_of,
    make,
    reopen,
    wrong_frozen,
)
from tests.unit.test_freeze_blocks import K4, RS, at, frozen, live_block
from tests.unit.test_native import run_copy_range
from volume_core import native
from volume_core.blocks import BlockGeometry
from volume_core.cycle_freeze import COPIED, DIR, KEEP, STORE
from volume_core.engine import Engine
from volume_core.native import twin
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

C = native.c_backend
needs_c = pytest.mark.skipif(C is None, reason="C extension not built")
IMPLS = {"c": C, "twin": twin}
CFR = pytest.mark.parametrize("use_cfr", [True, False], ids=["cfr", "pread_pwrite"])
FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["c", "twin"])
def impl(request):
    if IMPLS[request.param] is None:
        pytest.skip("C extension not built")
    return IMPLS[request.param]


# -- helpers ------------------------------------------------------------------------------

def sparse_file(path: Path, size: int, data: dict[int, bytes]) -> bytes:
    """A file of ``size`` bytes, holes but for ``data`` (offset -> bytes); its contents."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, chunk in data.items():
            f.seek(off)
            f.write(chunk)
        f.truncate(size)
    return path.read_bytes()


def reference(src: bytes, dst: bytes, offset: int, end: int) -> bytes:
    """What ``copy_range`` must leave in a destination holding ``dst``."""
    if end <= offset:
        return dst
    out = bytearray(dst) + bytes(max(0, end - len(dst)))
    out[offset:end] = (src + bytes(end))[offset:end]
    return bytes(out)


# -- copy_range: C, twin and the reference agree ----------------------------------------------

layouts = st.tuples(
    st.integers(0, 40 << 10),  # source size
    st.lists(st.tuples(st.integers(0, 9), st.integers(1, K4)), max_size=4),  # data islands
    st.integers(0, 48 << 10),  # destination size (all 0xEE)
    st.integers(0, 56 << 10), st.integers(0, 56 << 10),  # offset, end
    st.booleans(), st.integers(0, 2**32 - 1))


@needs_c
@FAST
@given(layout=layouts)
def test_c_twin_and_reference_agree_on_random_sparse_ranges(layout):
    """A sparse source (4K holes between islands of data, its size anywhere), a
    destination of 0xEE bytes of any size, any range (inside, over holes, across or past
    the source's end, past the destination's, empty, backwards): C and twin return the
    same and leave the same bytes, those of the reference."""
    size, islands, dsize, offset, end, use_cfr, seed = layout
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        data = {i * K4: rnd.randbytes(n) for i, n in islands if i * K4 < size}
        src = sparse_file(tmp / "src", size, data)
        want = reference(src, b"\xee" * dsize, offset, end)
        for name, impl in IMPLS.items():
            (tmp / "dst").write_bytes(b"\xee" * dsize)
            n, got = run_copy_range(impl, tmp / "src", tmp / "dst", offset, end, use_cfr)
            assert n == max(0, end - offset), name
            assert got == want, (name, size, offset, end)


@CFR
def test_holes_of_a_large_source_come_out_as_zeros_over_other_bytes(impl, tmp_path, use_cfr):
    """3 MiB past the 1 MiB bounce buffer: a hole, 5K of data across a buffer boundary,
    a hole, the source's end 100 bytes into a page; the destination all 0xEE and shorter
    than the range. Every hole and the bytes past the source's end read as zeros."""
    island = os.urandom(5 << 10)
    size = (2 << 20) + 100
    src = sparse_file(tmp_path / "src", size, {(1 << 20) - 2048: island, size - 50: b"t" * 50})
    dst = b"\xee" * (3 << 20)
    (tmp_path / "dst").write_bytes(dst)
    offset, end = 1000, (3 << 20) + 777
    n, got = run_copy_range(impl, tmp_path / "src", tmp_path / "dst", offset, end, use_cfr)
    assert n == end - offset
    assert got == reference(src, dst, offset, end)


def test_the_same_file_as_source_and_destination_is_left_as_it_was(impl, tmp_path):
    """One descriptor both ends (copy_file_range refuses an overlap: EINVAL, the fallback
    copies each byte onto itself)."""
    body = os.urandom(3 * K4 + 11)
    path = tmp_path / "f"
    path.write_bytes(body)
    fd = os.open(path, os.O_RDWR)
    try:
        assert impl.copy_range(fd, fd, 5, 3 * K4) == 3 * K4 - 5
    finally:
        os.close(fd)
    assert path.read_bytes() == body


# -- copy_range: descriptors it cannot use ----------------------------------------------------

@CFR
@pytest.mark.parametrize("call", ["copy_range", "copy_runs"])
def test_an_append_only_destination_is_refused_with_ebadf_and_left_untouched(
        impl, tmp_path, use_cfr, call):
    """Found here: a destination opened O_APPEND. copy_file_range refuses it (EBADF, which
    ``nbm_cfr_unsupported`` and ``CFR_FALLBACK_ERRNOS`` take for "use pread/pwrite"),
    and Linux's pwrite on an O_APPEND descriptor appends at the end, whatever the
    offset: the bytes meant for [4K, 8K) landed at [16K, 20K), the file grew, and the
    call returned 4096 as if it had copied them (``copy_runs`` too). Now both refuse
    such a destination with EBADF before any byte moves."""
    src = os.urandom(4 * K4)
    dst = b"\xee" * (4 * K4)
    (tmp_path / "src").write_bytes(src)
    (tmp_path / "dst").write_bytes(dst)
    s = os.open(tmp_path / "src", os.O_RDONLY)
    d = os.open(tmp_path / "dst", os.O_WRONLY | os.O_APPEND)
    try:
        with pytest.raises(OSError) as err:
            if call == "copy_range":
                impl.copy_range(s, d, K4, 2 * K4, use_copy_file_range=use_cfr)
            else:
                impl.copy_runs(s, d, np.array([[1, 1]], np.int64), K4, 4 * K4,
                               use_copy_file_range=use_cfr)
        assert err.value.errno == errno.EBADF
    finally:
        os.close(s)
        os.close(d)
    assert (tmp_path / "dst").read_bytes() == dst, "refused, yet the destination changed"


def _fs_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (the longest mount point over it)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point, fs = line.split()[1:3]
            if (real == point or real.startswith(point.rstrip("/") + "/")) \
                    and len(point) > len(best):
                best, kind = point, fs
    return kind


def _errno_of(impl, src_fd, dst_fd, offset, end, use_cfr):
    try:
        return impl.copy_range(src_fd, dst_fd, offset, end, use_copy_file_range=use_cfr)
    except OSError as err:
        return errno.errorcode.get(err.errno, err.errno)


@needs_c
@CFR
def test_unusable_descriptors_fail_with_the_same_errno_in_c_and_twin(tmp_path, use_cfr):
    """Read-only destination and write-only source (EBADF), a pipe at either end
    (ESPIPE), a directory as source (EISDIR), a closed descriptor (EBADF): the same
    errno from both, and the destination file untouched."""
    body = os.urandom(2 * K4)
    (tmp_path / "src").write_bytes(body)
    (tmp_path / "dst").write_bytes(b"\xee" * K4)
    fds = {"src": os.open(tmp_path / "src", os.O_RDONLY),
           "src_wo": os.open(tmp_path / "src", os.O_WRONLY),
           "dst": os.open(tmp_path / "dst", os.O_RDWR),
           "dst_ro": os.open(tmp_path / "dst", os.O_RDONLY),
           "dir": os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)}
    fds["pipe_r"], fds["pipe_w"] = os.pipe()
    os.write(fds["pipe_w"], b"p" * 100)
    closed = os.open(tmp_path / "src", os.O_RDONLY)
    os.close(closed)
    cases = {"read-only dst": ("src", "dst_ro", "EBADF"),
             "write-only src": ("src_wo", "dst", "EBADF"),
             "pipe src": ("pipe_r", "dst", "ESPIPE"),
             "pipe dst": ("src", "pipe_w", "ESPIPE"),
             "directory src": ("dir", "dst", "EISDIR"),
             "closed src": (None, "dst", "EBADF")}
    try:
        for case, (s, d, want) in cases.items():
            s_fd = closed if s is None else fds[s]
            got = {name: _errno_of(impl, s_fd, fds[d], 0, K4, use_cfr)
                   for name, impl in IMPLS.items()}
            assert got == {"c": want, "twin": want}, case
            assert (tmp_path / "dst").read_bytes() == b"\xee" * K4, case
    finally:
        for fd in fds.values():
            os.close(fd)


@CFR
def test_character_device_and_proc_sources_are_read_not_skipped(impl, tmp_path, use_cfr):
    """/dev/zero (copy_file_range: EINVAL) gives zeros; /proc/version (size 0 to stat:
    copy_file_range copies nothing and says 0, as at EOF) gives its text, then zeros."""
    (tmp_path / "dst").write_bytes(b"\xee" * (3 * K4))
    version = Path("/proc/version").read_bytes()
    d = os.open(tmp_path / "dst", os.O_RDWR)
    try:
        z = os.open("/dev/zero", os.O_RDONLY)
        try:
            assert impl.copy_range(z, d, 100, K4 + 100, use_copy_file_range=use_cfr) == K4
        finally:
            os.close(z)
        p = os.open("/proc/version", os.O_RDONLY)
        try:
            assert impl.copy_range(p, d, 0, 50, use_copy_file_range=use_cfr) == 50
            assert impl.copy_range(p, d, 2 * K4, 2 * K4 + 7,
                                   use_copy_file_range=use_cfr) == 7
        finally:
            os.close(p)
    finally:
        os.close(d)
    got = (tmp_path / "dst").read_bytes()
    assert got[:50] == (version + bytes(50))[:50]
    assert got[50:100] == b"\xee" * 50
    assert got[100:K4 + 100] == bytes(K4)
    assert got[2 * K4:2 * K4 + 7] == bytes(7)
    assert len(got) == 3 * K4


@needs_c
@CFR
def test_offsets_near_two_to_the_63_fail_alike_and_touch_nothing(tmp_path, use_cfr):
    """Past the filesystem's largest file: EFBIG from both (the source ends long before,
    so it is a zero fill), the destination's size unchanged; an empty range there is 0.
    ext4 only: its largest file is 16 TiB (tmpfs, XFS, btrfs take files up to 2**63)."""
    if _fs_type(tmp_path) != "ext4":
        pytest.skip("the EFBIG bound of this test is ext4's 16 TiB file limit")
    (tmp_path / "src").write_bytes(b"s" * K4)
    (tmp_path / "dst").write_bytes(b"\xee" * K4)
    s = os.open(tmp_path / "src", os.O_RDONLY)
    d = os.open(tmp_path / "dst", os.O_RDWR)
    top = (1 << 63) - 1
    try:
        for offset, end in ((top - K4, top), (top - 1, top), (1 << 44, (1 << 44) + 10)):
            got = {name: _errno_of(impl, s, d, offset, end, use_cfr)
                   for name, impl in IMPLS.items()}
            assert got == {"c": "EFBIG", "twin": "EFBIG"}, (offset, end)
        for impl in IMPLS.values():
            assert impl.copy_range(s, d, top, top, use_copy_file_range=use_cfr) == 0
    finally:
        os.close(s)
        os.close(d)
    assert (tmp_path / "dst").read_bytes() == b"\xee" * K4


# -- the freeze: what one copy keeps ----------------------------------------------------------

geoms = st.tuples(
    st.sampled_from([4 << 10, 16 << 10, 64 << 10, 128 << 10]),  # region size
    st.integers(2, 5),  # regions
    st.integers(0, 64),  # the last region short by this many 512-byte sectors (capped)
    st.integers(1, 0xFFFF),  # the mask (cut to the region's blocks; none left: whole)
    st.booleans())  # the last region (maybe short), or the first


@FAST
@given(geom=geoms)
def test_one_copy_keeps_first_to_last_frozen_block_and_the_store_never_grows(geom):
    """Random geometry and mask: a 512-byte write on the region's highest frozen block in
    the volume copies through ``_copy_one``. The region's store bytes are the take from
    its first frozen block to its last (cut at the volume's end), zeros around; the
    store is the volume's size; a restart opens it (``check``) and reads the take."""
    rs, n, short, mask, last = geom
    short = min(short * 512, rs - 512)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        vol, engine, before = make(Path(tmp), rs, n, short, seed=mask)
        try:
            bg = BlockGeometry(vol.size, vol.geometry.shift)
            bs, region = 1 << bg.shift, n - 1 if last else 0
            base = region * rs
            end = min(base + rs, vol.size)
            mask &= bg.full
            inside = [b for b in range(bg.full.bit_length())
                      if mask >> b & 1 and base + b * bs < vol.size]
            if not inside:
                mask = 0  # (recorded as none: the whole region)
            freeze = freeze_of(vol, engine, {region: mask})
            m = mask or bg.full
            top = max(b for b in range(bg.full.bit_length())
                      if m >> b & 1 and base + b * bs < vol.size)
            engine.pwrite(b"\xa9" * 512, base + top * bs)
            assert freeze.preserved[region] == COPIED and disk_state(vol)[region] == COPIED
            lo = base + ((m & -m).bit_length() - 1) * bs
            hi = min(base + m.bit_length() * bs, vol.size)
            assert os.pread(freeze.store_fd, end - base, base) == (
                bytes(lo - base) + before[lo:hi] + bytes(end - hi))
            assert os.fstat(freeze.store_fd).st_size == vol.size
            assert not wrong_frozen(freeze, before)
            again = reopen(vol, engine, freeze)
            assert again.preserved[region] == COPIED and not wrong_frozen(again, before)
            again.drop()
        finally:
            engine.close()


@pytest.mark.parametrize("live_size", ["sparse", "short"])
def test_holes_and_the_end_of_a_short_live_file_copy_as_zeros_over_a_dirty_store(
        tmp_path, live_size):
    """A live file with holes inside region 2's frozen range (blocks 1-14 frozen, data
    only in blocks 3 and 9), or (short) ending 1000 bytes into block 6 of region 2 with
    the rest of the volume past its end. The store's region 2 holds 0xEE (as if some
    earlier bytes were there). A write on block 14 copies: the store holds the take,
    zeros for the holes and past the live file's end, not 0xEE; the frozen blocks read
    as at the take, before and after a restart."""
    rs = 64 << 10
    vol = Volume.create(tmp_path / "v", 4 * rs, rs)
    with open(vol.data_path, "r+b") as f:
        f.seek(at(2, 3))
        f.write(os.urandom(K4))
        f.seek(at(2, 9) + 100)
        f.write(os.urandom(K4 - 200))
        if live_size == "short":
            f.seek(at(2, 5))
            f.write(os.urandom(K4 + 1000))
            f.truncate(at(2, 6) + 1000)
    before = vol.data_path.read_bytes().ljust(vol.size, b"\0")
    engine = Engine(vol)
    try:
        mask = sum(1 << b for b in range(1, 15))
        freeze = freeze_of(vol, engine, {2: mask})
        os.pwrite(freeze.store_fd, b"\xee" * rs, 2 * rs)
        engine.pwrite(b"\xab" * 512, at(2, 14) + 100)
        assert freeze.preserved[2] == COPIED
        store = os.pread(freeze.store_fd, rs, 2 * rs)
        assert store[K4:15 * K4] == before[at(2, 1):at(2, 15)]
        assert os.fstat(freeze.store_fd).st_size == vol.size
        assert not wrong_frozen(freeze, before)
        again = reopen(vol, engine, freeze)
        assert not wrong_frozen(again, before)
        again.drop()
    finally:
        engine.close()


# -- the freeze: copies that fail ----------------------------------------------------------------

@pytest.fixture
def fresh_vol(tmp_path):
    """(vol, engine, before): 64 regions of 64K of random bytes (``test_freeze_blocks``)."""
    vol = Volume.create(tmp_path / "v", RS * 64, RS)
    before = np.random.default_rng(15).integers(0, 256, vol.size, dtype=np.uint8).tobytes()
    with open(vol.data_path, "r+b") as f:
        f.write(before)
    engine = Engine(vol)
    yield vol, engine, before
    engine.close()


def test_a_real_ebadf_from_the_store_fails_the_write_then_a_retry_copies(fresh_vol):
    """Not a wrapper: the freeze's store descriptor is, for one write, a read-only one of
    the same file, so the C copy_file_range and its pread/pwrite fallback both fail
    (EBADF). The write fails and lands nothing; region 8 stays KEEP, unclaimed, KEEP on
    disk, its frozen blocks the take; with the store writable again the retried write
    copies and lands, and a restart reads the take from the store."""
    vol, engine, before = fresh_vol
    freeze = frozen(vol, engine, {8: 0b0110_0000_0000_0010})
    rw = freeze.store_fd
    freeze.store_fd = os.open(vol.path / DIR / STORE, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as err:
            engine.pwrite(b"\xc1" * 512, at(8, 13))
        assert err.value.errno == errno.EBADF
    finally:
        os.close(freeze.store_fd)
        freeze.store_fd = rw
    assert live_block(engine, at(8, 13)) == before[at(8, 13):at(8, 14)], "a failed write landed"
    assert freeze.preserved[8] == KEEP and disk_state(vol)[8] == KEEP
    assert not freeze.copying.any() and freeze.cow.copies == 0
    assert not wrong_frozen(freeze, before)
    engine.pwrite(b"\xc2" * 512, at(8, 13))
    assert freeze.preserved[8] == COPIED and disk_state(vol)[8] == COPIED
    assert live_block(engine, at(8, 13))[:512] == b"\xc2" * 512
    assert os.pread(freeze.store_fd, 14 * K4, at(8, 1)) == before[at(8, 1):at(8, 15)]
    again = reopen(vol, engine, freeze)
    try:
        assert again.preserved[8] == COPIED and not wrong_frozen(again, before)
    finally:
        again.close()


def test_a_copy_that_wrote_half_the_store_then_failed_leaves_the_take_live(
        fresh_vol, monkeypatch):
    """``copy_range`` on thread 'hit' copies the first half of region 8's frozen range to
    the store (real), then fails with EIO. The write fails; the region is KEEP and
    unclaimed, so the half-copied store is never read: the frozen blocks read live as
    at the take, after a restart too (KEEP on disk). A write missing the frozen blocks
    lands meanwhile (touched); the retry copies the whole range again."""
    vol, engine, before = fresh_vol
    freeze = frozen(vol, engine, {8: 1 | 1 << 15})
    real = native.copy_range

    def half(src, dst, offset, end, **kw):
        if threading.current_thread().name == "hit" and dst == freeze.store_fd:
            real(src, dst, offset, (offset + end) // 2, **kw)
            raise OSError(errno.EIO, "injected EIO half way")
        return real(src, dst, offset, end, **kw)

    monkeypatch.setattr(native, "copy_range", half)
    hit = Writer(engine, "hit", b"\xd5" * K4, at(8, 15))
    hit.start()
    hit.finish()
    assert isinstance(hit.error, OSError) and hit.error.errno == errno.EIO
    assert os.pread(freeze.store_fd, K4, at(8)) == before[at(8):at(8, 1)], \
        "the half copy is in the store (never read: KEEP)"
    assert freeze.preserved[8] == KEEP and disk_state(vol)[8] == KEEP
    assert not freeze.copying.any()
    assert live_block(engine, at(8, 15)) == before[at(8, 15):at(9)], "a failed write landed"
    engine.pwrite(b"\xd6" * K4, at(8, 7))  # a miss: lands with no copy
    assert freeze.touched[8] == 1 and freeze.preserved[8] == KEEP
    assert not wrong_frozen(freeze, before)
    again = reopen(vol, engine, freeze)
    assert again.preserved[8] == KEEP and again.touched[8] == 1
    assert not wrong_frozen(again, before)
    monkeypatch.undo()
    engine.pwrite(b"\xd7" * K4, at(8, 15))
    assert again.preserved[8] == COPIED and disk_state(vol)[8] == COPIED
    assert live_block(engine, at(8, 15)) == b"\xd7" * K4
    assert os.pread(again.store_fd, K4, at(8, 15)) == before[at(8, 15):at(9)]
    assert not wrong_frozen(again, before)
    again.close()


def test_a_freeze_left_with_a_copy_made_but_no_copied_byte_opens_keep(fresh_vol):
    """The copy made (``_copy_blocks``) and nothing after it (a SIGKILL before the COPIED
    byte): the restart finds KEEP and reads the take live; a later write copies again
    (the store overwritten with the same take) and the image still is the take."""
    vol, engine, before = fresh_vol
    freeze = frozen(vol, engine, {8: 0b1000_0000_0001_0000, 9: 1})
    freeze._copy_blocks(8)
    assert os.pread(freeze.store_fd, 12 * K4, at(8, 4)) == before[at(8, 4):at(8, 16)]
    again = reopen(vol, engine, freeze)
    try:
        assert again.preserved[8] == KEEP and disk_state(vol)[8] == KEEP
        engine.pwrite(b"\xe9" * K4, at(8, 6))  # misses blocks 4 and 15: touched
        assert again.preserved[8] == KEEP and again.touched[8] == 1
        assert not wrong_frozen(again, before)
        engine.pwrite(b"\xea" * K4, at(8, 4))
        assert again.preserved[8] == COPIED
        assert not wrong_frozen(again, before)
    finally:
        again.close()
