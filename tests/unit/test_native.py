"""volume_core.native: the C helpers, their numpy twin, and the facade.

Map functions are checked three ways: the twin against a tiny obvious
pure-Python reference (small maps), and the C backend against the twin (all
maps, up to 16M regions).  copy_runs/punch_hole run on real temp files.
C-backed cases skip only when the extension is not built.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import os

import numpy as np
import pytest

from volume_core import native
from volume_core.native import twin

pytestmark = pytest.mark.unit

C = native.c_backend
NOT_BUILT = (
    f"C extension volume_core.native._regions_c not built ({native.C_IMPORT_ERROR}); "
    "run: python volume_core/native/build.py"
)
needs_c = pytest.mark.skipif(C is None, reason=NOT_BUILT)
API = ["count", "count_runs", "scan_runs", "merge_or", "copy_runs", "copy_range", "punch_hole"]
BIG = 16 * 1024 * 1024


@pytest.fixture(params=["c", "numpy"])
def impl(request):
    """Each behaviour test runs against both implementations."""
    if request.param == "c":
        if C is None:
            pytest.skip(NOT_BUILT)
        return C
    return twin


# ---- map fixtures ------------------------------------------------------------


def _rand(n: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(n) < density).astype(np.uint8)


def _blocky(n: int, seed: int, mean_run: int) -> np.ndarray:
    """Alternating clear/marked runs of random length (exercises whole-word skips)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * mean_run, size=2 * n // mean_run + 2)
    ends = np.cumsum(lengths)
    ends = ends[ends < n]
    flags = np.zeros(n + 1, dtype=np.int8)
    flags[ends] = 1
    return (np.cumsum(flags)[:n] % 2).astype(np.uint8)


def _small_maps() -> dict[str, np.ndarray]:
    maps: dict[str, np.ndarray] = {
        "empty": np.zeros(0, np.uint8),
        "one_clear": np.zeros(1, np.uint8),
        "one_set": np.ones(1, np.uint8),
        "one_0xff": np.full(1, 0xFF, np.uint8),
        "values_other_than_1": np.array([0, 2, 0xFF, 0, 0x80, 0x7F, 0, 0, 0, 3, 1], np.uint8),
        "all_byte_values": np.arange(256, dtype=np.uint8),
        "high_bit_only_words": np.tile(np.array([0x80, 0], np.uint8), 40),
        "partial_last_word_set": np.r_[np.zeros(16, np.uint8), np.ones(5, np.uint8)],
        "partial_last_word_last_byte": np.r_[np.zeros(20, np.uint8), np.ones(1, np.uint8)],
        "run_across_word_boundary": np.r_[
            np.zeros(6, np.uint8), np.ones(4, np.uint8), np.zeros(13, np.uint8)
        ],
        "run_touching_first_and_last": np.r_[
            np.ones(3, np.uint8), np.zeros(10, np.uint8), np.full(4, 7, np.uint8)
        ],
    }
    for n in (1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000):
        maps[f"n{n}_clear"] = np.zeros(n, np.uint8)
        maps[f"n{n}_set"] = np.ones(n, np.uint8)
        maps[f"n{n}_0xff"] = np.full(n, 0xFF, np.uint8)
        maps[f"n{n}_alternating"] = (np.arange(n) % 2).astype(np.uint8)
        maps[f"n{n}_random"] = _rand(n, 0.5, seed=n)
        ends = np.zeros(n, np.uint8)
        ends[0] = ends[-1] = 2
        maps[f"n{n}_first_and_last"] = ends
        maps[f"n{n}_all_but_first_and_last"] = np.where(ends, 0, 9).astype(np.uint8)
    for d in (0.001, 0.1, 0.5, 0.9):
        maps[f"random_{d}_4096"] = _rand(4096, d, seed=int(d * 1000))
        maps[f"random_{d}_odd"] = _rand(10_003, d, seed=int(d * 1000) + 1)
    maps["random_0.5_values"] = np.random.default_rng(5).integers(0, 4, 5_001).astype(np.uint8)
    maps["blocky_odd"] = _blocky(9_999, seed=3, mean_run=20)
    return maps


SMALL = _small_maps()


@pytest.fixture(scope="module")
def big_maps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(16)
    sparse = np.zeros(BIG, np.uint8)
    sparse[rng.choice(BIG, 2_000, replace=False)] = 1
    sparse[0] = sparse[-1] = 0xFF
    dense = (rng.integers(0, 256, BIG, dtype=np.uint8) < 230).astype(np.uint8)
    random = rng.integers(0, 2, BIG, dtype=np.uint8) * np.uint8(0x81)
    return {
        "sparse": sparse,
        "dense": dense,
        "random_half": random,
        "blocky": _blocky(BIG, seed=17, mean_run=300),
        "all_set": np.ones(BIG, np.uint8),
        "all_clear": np.zeros(BIG, np.uint8),
    }


def py_runs(m) -> list[list[int]]:
    """The obvious reference: walk the bytes."""
    runs: list[list[int]] = []
    for i, v in enumerate(m.tolist()):
        if v:
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1][1] += 1
            else:
                runs.append([i, 1])
    return runs


# ---- the map functions -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
def test_twin_matches_python_reference_on_small_maps(name):
    m = SMALL[name]
    ref = py_runs(m)
    runs = twin.scan_runs(m)
    assert runs.dtype == np.int64 and runs.shape == (len(ref), 2)
    assert runs.tolist() == ref
    assert twin.count_runs(m) == len(ref)
    assert twin.count(m) == sum(1 for v in m.tolist() if v)


@needs_c
@pytest.mark.parametrize("name", sorted(SMALL))
def test_c_matches_twin_on_small_maps(name):
    m = SMALL[name]
    assert C.count(m) == twin.count(m)
    assert C.count_runs(m) == twin.count_runs(m)
    c_runs, t_runs = C.scan_runs(m), twin.scan_runs(m)
    assert c_runs.dtype == np.int64 and c_runs.shape == t_runs.shape
    assert c_runs.flags.c_contiguous
    np.testing.assert_array_equal(c_runs, t_runs)


@needs_c
@pytest.mark.parametrize("name", sorted(SMALL))
def test_c_merge_or_matches_twin_and_keeps_byte_values(name):
    src = SMALL[name]
    rng = np.random.default_rng(src.size)
    dst0 = (rng.integers(0, 4, src.size) * (rng.random(src.size) < 0.3)).astype(np.uint8)
    d_c, d_t = dst0.copy(), dst0.copy()
    assert C.merge_or(d_c, src) is None
    twin.merge_or(d_t, src)
    np.testing.assert_array_equal(d_c, dst0 | src)  # plain OR, not normalised to 0/1
    np.testing.assert_array_equal(d_t, dst0 | src)


@needs_c
@pytest.mark.parametrize(
    "name", ["sparse", "dense", "random_half", "blocky", "all_set", "all_clear"]
)
def test_c_matches_twin_on_16m_maps(big_maps, name):
    m = big_maps[name]
    assert C.count(m) == twin.count(m)
    assert C.count_runs(m) == twin.count_runs(m)
    np.testing.assert_array_equal(C.scan_runs(m), twin.scan_runs(m))


@needs_c
def test_c_merge_or_matches_twin_on_16m_maps(big_maps):
    src = big_maps["sparse"]
    d_c, d_t = big_maps["blocky"].copy(), big_maps["blocky"].copy()
    C.merge_or(d_c, src)
    twin.merge_or(d_t, src)
    np.testing.assert_array_equal(d_c, d_t)


def test_scan_runs_of_unmarked_map_is_empty_k_by_2(impl):
    for m in (np.zeros(0, np.uint8), np.zeros(100, np.uint8)):
        runs = impl.scan_runs(m)
        assert runs.shape == (0, 2) and runs.dtype == np.int64


def test_map_functions_accept_read_only_maps(impl):
    m = np.frombuffer(bytes([0, 1, 1, 0, 5]), dtype=np.uint8)
    assert not m.flags.writeable
    assert impl.count(m) == 3
    assert impl.scan_runs(m).tolist() == [[1, 2], [4, 1]]
    dst = np.zeros(5, np.uint8)
    impl.merge_or(dst, m)
    assert dst.tolist() == [0, 1, 1, 0, 5]


def test_merge_or_with_dst_aliasing_src(impl):
    m = np.array([0, 3, 0, 1] * 5, np.uint8)
    impl.merge_or(m, m)
    assert m.tolist() == [0, 3, 0, 1] * 5


# ---- input validation ---------------------------------------------------------------

BAD_MAPS = {
    "list": [0, 1, 0],
    "bytes": b"\x00\x01",
    "int16": np.zeros(8, np.int16),
    "bool": np.zeros(8, bool),
    "2d": np.zeros((2, 4), np.uint8),
    "0d": np.zeros((), np.uint8),
    "non_contiguous": np.zeros(16, np.uint8)[::2],
}


@pytest.mark.parametrize("fn", ["count", "count_runs", "scan_runs"])
@pytest.mark.parametrize("bad", sorted(BAD_MAPS))
def test_map_functions_reject_bad_maps_with_value_error(impl, fn, bad):
    with pytest.raises(ValueError):
        getattr(impl, fn)(BAD_MAPS[bad])


def test_merge_or_rejects_bad_arguments(impl):
    ok = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        impl.merge_or(ok, np.zeros(9, np.uint8))
    ro = np.zeros(8, np.uint8)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        impl.merge_or(ro, ok)
    with pytest.raises(ValueError, match="uint8"):
        impl.merge_or(np.zeros(8, np.int8), ok)
    with pytest.raises(ValueError, match="contiguous"):
        impl.merge_or(np.zeros(16, np.uint8)[::2], ok)
    with pytest.raises(ValueError):
        impl.merge_or(ok, BAD_MAPS["list"])


BAD_COPY = {
    "runs_int32": dict(runs=np.zeros((1, 2), np.int32)),
    "runs_1d": dict(runs=np.zeros(2, np.int64)),
    "runs_k_by_3": dict(runs=np.zeros((1, 3), np.int64)),
    "runs_list": dict(runs=[[0, 1]]),
    "negative_start": dict(runs=np.array([[-1, 1]], np.int64)),
    "negative_count": dict(runs=np.array([[0, -1]], np.int64)),
    "overflowing_run": dict(runs=np.array([[2**62, 2**62]], np.int64)),
    "overflowing_bytes": dict(runs=np.array([[2**40, 1]], np.int64), region_size=2**30),
    "region_size_zero": dict(region_size=0),
    "region_size_negative": dict(region_size=-4096),
    "limit_negative": dict(limit=-1),
    "region_size_float": dict(region_size=4096.0),
    "fd_str": dict(src_fd="0"),
    "fd_huge": dict(dst_fd=2**40),
}


@pytest.mark.parametrize("case", sorted(BAD_COPY))
def test_copy_runs_rejects_bad_arguments_with_value_error(impl, case, tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        args = dict(
            src_fd=fd, dst_fd=fd, runs=np.array([[0, 1]], np.int64), region_size=4096, limit=4096
        )
        args.update(BAD_COPY[case])
        with pytest.raises(ValueError):
            impl.copy_runs(**args)
    finally:
        os.close(fd)


def test_punch_hole_rejects_bad_arguments_with_value_error(impl):
    for args in ((0, -1, 10), (0, 0, -1), (0, 1.5, 10), (0, 2**63 - 1, 10)):
        with pytest.raises(ValueError):
            impl.punch_hole(*args)


# ---- copy_runs ------------------------------------------------------------------------

RS = 4096


def _make_files(tmp_path, src_size: int, dst_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, src_size, dtype=np.uint8).tobytes()
    dst = rng.integers(0, 256, dst_size, dtype=np.uint8).tobytes()
    (tmp_path / "src").write_bytes(src)
    (tmp_path / "dst").write_bytes(dst)
    return src, dst


def _expected(src: bytes, dst: bytes, runs, region_size: int, limit: int) -> bytes:
    out = bytearray(dst)
    padded = src + bytes(max(0, limit - len(src)))
    for start, cnt in runs:
        off, end = start * region_size, min((start + cnt) * region_size, limit)
        if off < end:
            if end > len(out):
                out.extend(bytes(end - len(out)))
            out[off:end] = padded[off:end]
    return bytes(out)


def _run_copy(impl, tmp_path, runs, region_size, limit, use_cfr, src_name="src"):
    """Runs copy_runs on the files; returns (result, dst bytes); checks fd positions."""
    src_fd = os.open(tmp_path / src_name, os.O_RDONLY)
    dst_fd = os.open(tmp_path / "dst", os.O_RDWR)
    try:
        os.lseek(src_fd, 123, os.SEEK_SET)
        os.lseek(dst_fd, 77, os.SEEK_SET)
        n = impl.copy_runs(
            src_fd,
            dst_fd,
            np.array(runs, np.int64).reshape(-1, 2),
            region_size,
            limit,
            use_copy_file_range=use_cfr,
        )
        assert os.lseek(src_fd, 0, os.SEEK_CUR) == 123, "source file position moved"
        assert os.lseek(dst_fd, 0, os.SEEK_CUR) == 77, "destination file position moved"
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    return n, (tmp_path / "dst").read_bytes()


# limit is not a multiple of the region size: region 10 is 1000 bytes long.
LIMIT = 10 * RS + 1000
COPY_CASES = {
    # first region; adjacent runs 2-3 and 4; run 9.. extends past limit (covers
    # the short last region); run entirely past limit; zero-length run.
    "mixed": [[0, 1], [2, 2], [4, 1], [9, 5], [20, 3], [7, 0]],
    "first_region_only": [[0, 1]],
    "short_last_region_only": [[10, 1]],
    "everything": [[0, 11]],
    "past_limit_only": [[11, 4], [100, 1]],
    "none": [],
    "unsorted_overlapping": [[5, 3], [1, 2], [6, 4]],
}


@pytest.mark.parametrize("use_cfr", [True, False], ids=["copy_file_range", "pread_pwrite"])
@pytest.mark.parametrize("case", sorted(COPY_CASES))
def test_copy_runs_copies_run_ranges_and_leaves_the_rest(impl, tmp_path, case, use_cfr):
    runs = COPY_CASES[case]
    src, dst = _make_files(tmp_path, LIMIT, LIMIT + 500)  # dst has bytes past limit too
    n, got = _run_copy(impl, tmp_path, runs, RS, LIMIT, use_cfr)
    want = _expected(src, dst, runs, RS, LIMIT)
    assert got == want
    assert n == sum(max(0, min((s + c) * RS, LIMIT) - s * RS) for s, c in runs)


@pytest.mark.parametrize("use_cfr", [True, False], ids=["copy_file_range", "pread_pwrite"])
def test_copy_runs_multi_mib_ranges_odd_region_size(impl, tmp_path, use_cfr):
    # Ranges bigger than the 1 MiB bounce buffer, region size not a power of 2.
    rs, limit = 1_000_003, 5_000_000
    runs = [[0, 2], [3, 4]]
    src, dst = _make_files(tmp_path, limit, limit, seed=1)
    n, got = _run_copy(impl, tmp_path, runs, rs, limit, use_cfr)
    assert got == _expected(src, dst, runs, rs, limit)
    assert n == 2 * rs + (limit - 3 * rs)


@pytest.mark.parametrize("use_cfr", [True, False], ids=["copy_file_range", "pread_pwrite"])
def test_copy_runs_source_shorter_than_limit_reads_as_zeros(impl, tmp_path, use_cfr):
    limit = 10 * RS
    runs = [[0, 10]]
    src, dst = _make_files(tmp_path, 5 * RS + 100, limit, seed=2)
    n, got = _run_copy(impl, tmp_path, runs, RS, limit, use_cfr)
    assert n == limit
    assert got == src + bytes(limit - len(src))
    # A run lying wholly past the source's EOF zeroes its range too.
    (tmp_path / "dst").write_bytes(dst)
    n, got = _run_copy(impl, tmp_path, [[7, 2]], RS, limit, use_cfr)
    assert n == 2 * RS
    assert got == dst[: 7 * RS] + bytes(2 * RS) + dst[9 * RS :]


@pytest.mark.parametrize("use_cfr", [True, False], ids=["copy_file_range", "pread_pwrite"])
def test_copy_runs_extends_a_short_destination(impl, tmp_path, use_cfr):
    src, dst = _make_files(tmp_path, LIMIT, 2 * RS, seed=3)
    runs = [[1, 1], [9, 2]]
    n, got = _run_copy(impl, tmp_path, runs, RS, LIMIT, use_cfr)
    assert got == _expected(src, dst, runs, RS, LIMIT)
    assert len(got) == LIMIT


@pytest.mark.parametrize("use_cfr", [True, False], ids=["copy_file_range", "pread_pwrite"])
def test_copy_runs_same_fd_is_a_no_op_copy(impl, tmp_path, use_cfr):
    data, _ = _make_files(tmp_path, LIMIT, 0, seed=4)
    fd = os.open(tmp_path / "src", os.O_RDWR)
    try:
        n = impl.copy_runs(
            fd, fd, np.array([[0, 11]], np.int64), RS, LIMIT, use_copy_file_range=use_cfr
        )
    finally:
        os.close(fd)
    assert n == LIMIT
    assert (tmp_path / "src").read_bytes() == data


def test_copy_runs_across_filesystems(impl, tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to copy from")
    src_path = os.path.join(shm, f"nbdmirror-test-{os.getpid()}")
    src, dst = _make_files(tmp_path, LIMIT, LIMIT, seed=5)
    with open(src_path, "wb") as f:
        f.write(src)
    try:
        runs = COPY_CASES["mixed"]
        n, got = _run_copy(impl, tmp_path, runs, RS, LIMIT, True, src_name=src_path)
    finally:
        os.unlink(src_path)
    assert got == _expected(src, dst, runs, RS, LIMIT)


@needs_c
@pytest.mark.parametrize("use_cfr", [True, False], ids=["copy_file_range", "pread_pwrite"])
def test_c_and_twin_copy_runs_give_identical_files(tmp_path, use_cfr):
    rng = np.random.default_rng(6)
    limit = 200 * RS + 17
    m = (rng.random(201) < 0.4).astype(np.uint8)
    runs = twin.scan_runs(m)
    runs = np.vstack([runs, [[195, 50]]])  # and one past the limit
    src, dst = _make_files(tmp_path, limit - 3 * RS, limit, seed=7)
    results = {}
    for name, mod in (("c", C), ("numpy", twin)):
        (tmp_path / "dst").write_bytes(dst)
        results[name] = _run_copy(mod, tmp_path, runs, RS, limit, use_cfr)
    assert results["c"] == results["numpy"]
    assert results["c"][1] == _expected(src, dst, runs.tolist(), RS, limit)


# ---- copy_range: one range, no array ----------------------------------------------------

RANGE_CASES = {  # (offset, end) against a source of LIMIT bytes
    "inside": (100, 3 * RS + 7),
    "to_the_source_end": (5 * RS, LIMIT),
    "past_the_source_end": (LIMIT - 50, LIMIT + 2 * RS),  # the tail reads as zeros
    "wholly_past_it": (LIMIT + RS, LIMIT + 2 * RS),
    "empty": (RS, RS),
    "backwards": (2 * RS, RS),
}


def run_copy_range(impl, src_path, dst_path, offset: int, end: int, use_cfr: bool):
    """(returned, destination bytes) of one copy_range call; checks no file position
    moved."""
    s = os.open(src_path, os.O_RDONLY)
    d = os.open(dst_path, os.O_RDWR)
    try:
        os.lseek(s, 3, os.SEEK_SET)
        os.lseek(d, 7, os.SEEK_SET)
        n = impl.copy_range(s, d, offset, end, use_copy_file_range=use_cfr)
        assert os.lseek(s, 0, os.SEEK_CUR) == 3, "source file position moved"
        assert os.lseek(d, 0, os.SEEK_CUR) == 7, "destination file position moved"
    finally:
        os.close(s)
        os.close(d)
    return n, dst_path.read_bytes()


@pytest.mark.parametrize("use_cfr", [True, False], ids=["copy_file_range", "pread_pwrite"])
@pytest.mark.parametrize("case", sorted(RANGE_CASES))
def test_copy_range_copies_that_range_and_leaves_the_rest(impl, tmp_path, case, use_cfr):
    offset, end = RANGE_CASES[case]
    src, dst = _make_files(tmp_path, LIMIT, LIMIT + 3 * RS, seed=8)
    want = bytearray(dst)
    if end > offset:
        want[offset:end] = (src + bytes(end))[offset:end]
    n, got = run_copy_range(impl, tmp_path / "src", tmp_path / "dst", offset, end, use_cfr)
    assert n == max(0, end - offset)
    assert got == bytes(want)


@pytest.mark.parametrize("args", [
    dict(offset=-1, end=RS), dict(offset=0, end=-RS), dict(offset=1 << 63, end=1 << 63),
    dict(offset=0.5, end=RS), dict(offset=0, end=RS, src_fd=1 << 40),
], ids=["negative_offset", "negative_end", "past_int64", "float", "fd_range"])
def test_copy_range_rejects_bad_arguments_with_value_error(impl, tmp_path, args):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(ValueError):
            impl.copy_range(**{"src_fd": fd, "dst_fd": fd, **args})
    finally:
        os.close(fd)


def test_copy_range_bad_fd_raises_oserror(impl, tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"x" * RS)
    closed = os.open(tmp_path / "g", os.O_RDWR | os.O_CREAT)
    os.close(closed)
    try:
        with pytest.raises(OSError) as ei:
            impl.copy_range(fd, closed, 0, RS)
        assert ei.value.errno == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.parametrize("use_cfr", [True, False], ids=["copy_file_range", "pread_pwrite"])
def test_copy_runs_bad_fd_raises_oserror(impl, tmp_path, use_cfr):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"x" * RS)
    closed = os.open(tmp_path / "g", os.O_RDWR | os.O_CREAT)
    os.close(closed)
    runs = np.array([[0, 1]], np.int64)
    try:
        with pytest.raises(OSError) as ei:
            impl.copy_runs(closed, fd, runs, RS, RS, use_copy_file_range=use_cfr)
        assert ei.value.errno == errno.EBADF
        with pytest.raises(OSError) as ei:
            impl.copy_runs(fd, closed, runs, RS, RS, use_copy_file_range=use_cfr)
        assert ei.value.errno == errno.EBADF
    finally:
        os.close(fd)


# ---- punch_hole ---------------------------------------------------------------------


def test_punch_hole_zeroes_range_keeps_size_frees_blocks(impl, tmp_path):
    size = 1 << 20
    data = np.random.default_rng(8).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, data)
        os.fsync(fd)
        blocks_before = os.fstat(fd).st_blocks
        off, length = 256 * 1024, 512 * 1024
        try:
            impl.punch_hole(fd, off, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                pytest.skip(f"filesystem at {tmp_path} cannot punch holes")
            raise
        st = os.fstat(fd)
    finally:
        os.close(fd)
    assert st.st_size == size
    got = path.read_bytes()
    assert got[:off] == data[:off]
    assert got[off : off + length] == bytes(length)
    assert got[off + length :] == data[off + length :]
    assert st.st_blocks < blocks_before


def test_punch_hole_zero_length_is_a_no_op(impl, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDWR)
    try:
        impl.punch_hole(fd, 0, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc"


def test_punch_hole_bad_fd_raises_oserror(impl, tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError) as ei:
        impl.punch_hole(fd, 0, 4096)
    assert ei.value.errno == errno.EBADF


# ---- the facade --------------------------------------------------------------------


@pytest.mark.parametrize("name", API)
def test_facade_c_backend_and_twin_have_the_same_signatures(name):
    sig = inspect.signature(getattr(twin, name))
    assert inspect.signature(getattr(native, name)) == sig
    if C is not None:
        assert inspect.signature(getattr(C, name)) == sig
        assert getattr(C, name).__name__ == name


def test_facade_serves_c_when_built_else_twin():
    if C is None:
        assert native.IMPLEMENTATION == "numpy"
        assert native.count is twin.count
    elif os.environ.get("NBDMIRROR_NATIVE", "").strip().lower() == "numpy":
        assert native.IMPLEMENTATION == "numpy"
    else:
        assert native.IMPLEMENTATION == "c"
        for name in API:  # native.c_backend: another test may have reloaded native
            assert getattr(native, name) is getattr(native.c_backend, name)


def test_facade_env_var_selects_implementation(monkeypatch):
    try:
        monkeypatch.setenv("NBDMIRROR_NATIVE", "numpy")
        importlib.reload(native)
        assert native.IMPLEMENTATION == "numpy"
        for name in API:
            assert getattr(native, name) is getattr(twin, name)
        monkeypatch.setenv("NBDMIRROR_NATIVE", "fast please")
        with pytest.raises(ValueError, match="NBDMIRROR_NATIVE"):
            importlib.reload(native)
        if C is not None:
            monkeypatch.setenv("NBDMIRROR_NATIVE", "c")
            importlib.reload(native)
            assert native.IMPLEMENTATION == "c"
    finally:
        monkeypatch.undo()
        importlib.reload(native)


@needs_c
def test_c_scan_runs_reports_enospc_when_buffer_too_small():
    # The facade's two-pass scan relies on this to detect a map that gained
    # runs between the passes (the GIL is released during both).
    from volume_core.native._regions_c import ffi, lib

    m = np.array([1, 0, 1, 0, 1] + [0] * 11 + [1], np.uint8)
    out = np.full((4, 2), -1, np.int64)
    buf = ffi.from_buffer("int64_t[]", out)
    assert lib.nbm_scan_runs(ffi.from_buffer("uint8_t[]", m), m.size, buf, 3) == -errno.ENOSPC
    assert lib.nbm_scan_runs(ffi.from_buffer("uint8_t[]", m), m.size, buf, 4) == 4
    assert out.tolist() == [[0, 1], [2, 1], [4, 1], [16, 1]]


# -- arena.c: the interpreter's arena allocator, cached ------------------------------

@needs_c
def test_the_arena_cache_hands_thread_stacks_out_again():
    """Each thread's frame stack comes from the arena allocator and goes back when the
    thread ends; once the cache is in (memory.keep_stack_chunks) the next thread's comes
    from the cache, not from a fresh mmap. Installed for the rest of this process: it
    maps and unmaps as CPython does, so blocks from before are freed correctly."""
    import threading

    from volume_core.replication import memory

    def deep(n: int) -> int:  # frames enough to need a stack chunk of their own
        return n if n == 0 else deep(n - 1) + 1

    assert memory.keep_stack_chunks()
    before = native.arena_counts()
    for _ in range(50):
        t = threading.Thread(target=deep, args=(50,))
        t.start()
        t.join()
    reused, mapped = (a - b for a, b in zip(native.arena_counts(), before, strict=True))
    assert reused >= 45 and mapped <= 5, (reused, mapped)
