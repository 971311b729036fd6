"""The measurements every topic shares: sequential write and read (nbdcopy), 4K random
writes (fio), with the server's CPU and what other processes used meanwhile.

Caches are dropped (and a scratch file primed) before each measurement, so that one
phase does not leave the next a different page cache; see Bench.prime and randwrite.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cpu import ForeignCpu, context_switches, cpu_seconds, cpu_times, thread_context_switches
from .procs import BenchError, progress, run, tool
from .targets import Served

MIB = 1 << 20


def make_source(path: Path, size: int) -> None:
    """``size`` bytes of random data, synced: what the sequential writes copy."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def read_once(path: Path) -> float:
    """Read a whole file (``cat FILE > /dev/null``): its pages in the page cache. Returns
    the seconds taken."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MIB)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def read_once_in_pages(path: Path) -> float:
    """Put a whole file in the page cache in 4 KiB pages, as random I/O leaves it, not in
    the large folios a sequential read makes: what it has cached is dropped (written
    back first: ``os.sync()`` before this), then it is read with readahead off
    (``POSIX_FADV_RANDOM``). Returns the seconds taken.

    Why: on kernels whose ext4 caches files in large folios (this VM's 6.18; not
    Debian 12's 6.1), ``cat FILE`` leaves 2 MiB folios, and every 4 KiB write into
    one then walks all of its 512 buffer heads (``ext4_block_write_begin``): a
    plain serve's 4K random writes ran at 26K IOPS after a ``cat``, 45K after
    ``dd bs=1M``, 68-82K from 4 KiB pages (session 14). Measured that way, most of
    a write's CPU is the kernel's, the same for every target, and what
    replication adds is lost in it."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        buf = bytearray(MIB)
        offset = 0
        while n := os.preadv(fd, [buf], offset):
            offset += n
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def write_zeros(path: Path, size: int) -> float:
    """Write ``size`` bytes of zeros over the start of an existing file, in place, and
    fdatasync it (``dd if=/dev/zero conv=fdatasync,notrunc``): every block allocated and
    every page of the page cache touched once. Returns the seconds taken."""
    t0 = time.perf_counter()
    block = 4 * MIB if size % (4 * MIB) == 0 else MIB
    run(["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={size // block}",
         "conv=fdatasync,notrunc", "status=none"], f"writing zeros over {path.name}")
    return time.perf_counter() - t0


@dataclass
class Bench:
    size: int
    runtime: float
    ramp: float
    iodepth: int
    workdir: Path
    source: Path
    scratch: Path
    can_drop_caches: bool = True
    notes: list[str] = field(default_factory=list)

    def drop_caches(self) -> None:
        os.sync()
        if not self.can_drop_caches:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as err:
            self.can_drop_caches = False
            self.notes.append(f"cannot drop caches ({err.strerror}): reads may be warm")
            progress(f"warning: cannot drop caches ({err.strerror}); reads may hit the cache")

    def warm_source(self) -> None:
        read_once(self.source)

    def prime(self, copies: int = 1) -> float:
        """Write --size bytes (``copies`` times, one after the other) into a scratch file
        and fdatasync it; return the seconds taken.

        Makes the sequential measurements independent of what ran before. Here (a VM whose
        memory and disk are managed by the host) a GiB of buffered writes right after a
        random-write phase took 3.6s instead of 0.8s, every time; a full-size write and
        sync beforehand absorbs that (a small one does not). The scratch file is
        rewritten in place, so no blocks are freed (and discarded) in between. Two
        copies for a replicated pair on one machine: both sides fill a page cache.
        """
        self.drop_caches()
        self.warm_source()
        t0 = time.perf_counter()
        block = 4 * MIB
        for k in range(copies):
            run(["dd", f"if={self.source}", f"of={self.scratch}", f"bs={block}",
                 f"seek={k * self.size // block}", "conv=fdatasync,notrunc",
                 "iflag=fullblock", "status=none"], "priming write")
        return time.perf_counter() - t0

    # -- sequential ----------------------------------------------------------
    def seq_write(self, served: Served) -> dict:
        """``nbdcopy --flush SOURCE URI``: MiB/s of wall time, flush included."""
        primed = self.prime()
        self.drop_caches()
        self.warm_source()
        if served.uri is not None:
            out = self._timed([tool("nbdcopy"), "--flush", str(self.source), served.uri],
                              "seq write", served)
            return out | {"primed_s": primed}
        # raw: nbdcopy file -> file, the same client and threads as the NBD targets. It
        # recycles the page cache as it goes (sync_file_range + fadvise), so it is the
        # disk's ceiling rather than the servers' syscall pattern.
        out = self._timed([tool("nbdcopy"), "--flush", str(self.source), str(served.backing)],
                          "seq write", served)
        # For reference: dd, buffered writes and one fdatasync as the servers do, but a
        # single stream; where fresh page-cache pages are slow to get (first touch in a
        # VM) it falls below the servers.
        self.drop_caches()
        self.warm_source()
        ref = self._timed(["dd", f"if={self.source}", f"of={served.backing}", "bs=4M",
                           "conv=fdatasync,notrunc", "iflag=fullblock", "status=none"],
                          "seq write (dd)", served)
        out["dd_mibs"] = ref["value"]
        return out | {"primed_s": primed}

    def seq_read(self, served: Served) -> dict:
        """``nbdcopy URI null:`` from a cold page cache."""
        primed = self.prime()
        self.drop_caches()
        src = served.uri if served.uri is not None else str(served.backing)
        return self._timed([tool("nbdcopy"), src, "null:"], "seq read", served) | {
            "primed_s": primed}

    def _timed(self, cmd: list[str], what: str, served: Served) -> dict:
        cpu0 = cpu_seconds(served.pid)
        with ForeignCpu(served.pid) as foreign:
            t0 = time.perf_counter()
            run(cmd, what)
            elapsed = time.perf_counter() - t0
        cpu1 = cpu_seconds(served.pid)
        out = {"value": self.size / MIB / elapsed, "elapsed_s": elapsed,
               "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
               **foreign.result}
        if cpu0 is not None and cpu1 is not None:
            out["server_cpu_s"] = cpu1 - cpu0
        return out

    # -- random writes ---------------------------------------------------------
    def fio_command(self, served: Served, runtime: float | None = None,
                    ramp: float | None = None, extra: tuple[str, ...] = (),
                    rw: str = "randwrite") -> list[str]:
        runtime = self.runtime if runtime is None else runtime
        ramp = self.ramp if ramp is None else ramp
        cmd = [tool("fio"), f"--name={rw}", f"--rw={rw}", "--bs=4k",
               f"--iodepth={self.iodepth}", "--numjobs=1", f"--size={self.size}",
               "--time_based", f"--runtime={runtime:g}", "--output-format=json",
               "--percentile_list=50:99:99.9", *extra]
        if ramp > 0:
            cmd.append(f"--ramp_time={ramp:g}")
        if served.uri is not None:
            cmd += ["--ioengine=nbd", f"--uri={served.uri}"]
        else:
            # Buffered, like the servers' pwrite into the page cache.
            cmd += ["--ioengine=libaio", "--direct=0", f"--filename={served.backing}"]
        return cmd

    def randwrite(self, served: Served, extra: tuple[str, ...] = ()) -> dict:
        """fio 4 KiB random writes: IOPS, latency percentiles and the server's CPU per write.

        ``extra`` adds fio options (``--fsync=N`` for a flush every N writes).
        """
        return self._fio(served, "randwrite", extra)

    def randread(self, served: Served) -> dict:
        """fio 4 KiB random reads from a cold page cache: every read waits for the disk."""
        return self._fio(served, "randread", ())

    def _fio(self, served: Served, rw: str, extra: tuple[str, ...]) -> dict:
        # Start every target from an empty page cache: 4 KiB writes into folios that
        # readahead or big writes created cost the kernel several times more (large folios,
        # seen on 6.x), which would bury the servers' own cost and depend on history.
        self.drop_caches()
        cmd = self.fio_command(served, extra=extra, rw=rw)
        cpu0, cs0 = cpu_times(served.pid), context_switches()
        tcs0 = thread_context_switches(served.pid)
        with ForeignCpu(served.pid) as foreign:
            proc = run(cmd, f"fio {rw}", timeout=self.runtime + self.ramp + 120)
        cpu1, cs1 = cpu_times(served.pid), context_switches()
        tcs1 = thread_context_switches(served.pid)
        out = fio_summary(proc.stdout, "read" if rw.endswith("read") else "write") | {
            "ioengine": "nbd" if served.uri is not None else "libaio",
            "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            **foreign.result}
        # Per-op figures are over ramp + runtime at the measured rate: estimates.
        ops = out["value"] * (self.runtime + self.ramp)
        if cpu0 is not None and cpu1 is not None and ops:
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            out["server_cpu_s"] = user + system
            out["server_cpu_us_per_op"] = (user + system) * 1e6 / ops
            out["server_sys_us_per_op"] = system * 1e6 / ops
        if ops:
            out["context_switches_per_op"] = (cs1 - cs0) / ops  # machine-wide
        if tcs0 is not None and tcs1 is not None and ops:
            # nbdkit's connection threads end with fio's connection: whatever they did is
            # lost from the count, so this is a lower bound (the threads of -t 1 are idle).
            out["server_voluntary_cs_per_op"] = max(0, tcs1[0] - tcs0[0]) / ops
        return out

    # -- checks ------------------------------------------------------------------
    def verify(self, served: Served, samples: int = 8) -> None:
        """Spot-check that the target holds the source data (not timed)."""
        chunk = MIB
        rng = random.Random(1)
        offsets = [0, self.size - chunk] + [rng.randrange(self.size // chunk) * chunk
                                           for _ in range(samples - 2)]
        if served.uri is not None:
            import nbd

            h = nbd.NBD()
            h.connect_uri(served.uri)
            try:
                self._compare(lambda off: h.pread(chunk, off), offsets, served)
            finally:
                h.shutdown()
        else:
            with open(served.backing, "rb") as f:
                self._compare(lambda off: os.pread(f.fileno(), chunk, off), offsets, served)

    def _compare(self, read, offsets: list[int], served: Served) -> None:
        with open(self.source, "rb") as src:
            for off in offsets:
                if read(off) != os.pread(src.fileno(), MIB, off):
                    raise BenchError(f"data check failed at offset {off} "
                                     f"({served.uri or served.backing})")


def fio_summary(text: str, direction: str = "write") -> dict:
    """IOPS and latencies of the first job in fio's JSON output."""
    try:  # the nbd engine prints "fio: connected to NBD server" before the JSON
        job = json.loads(text[text.index("{"):])["jobs"][0]
        w = job[direction]
    except (ValueError, KeyError, IndexError) as err:
        raise BenchError(f"fio: unreadable JSON output ({err})") from None
    if job.get("error"):
        raise BenchError(f"fio: job error {job['error']}")
    clat = w.get("clat_ns", {})
    pct = clat.get("percentile", {})
    out = {
        "value": w["iops"],
        "io_mib": w["io_bytes"] / MIB,
        "lat_mean_us": clat.get("mean", 0) / 1000,
        "lat_p50_us": pct.get("50.000000", 0) / 1000,
        "lat_p99_us": pct.get("99.000000", 0) / 1000,
        "lat_p999_us": pct.get("99.900000", 0) / 1000,
        "fio_cpu_pct": round(job.get("usr_cpu", 0) + job.get("sys_cpu", 0), 1),
    }
    sync = job.get("sync", {})
    if sync.get("total_ios"):
        lat = sync.get("lat_ns", {})
        out["flushes"] = sync["total_ios"]
        out["flush_lat_mean_us"] = lat.get("mean", 0) / 1000
        out["flush_lat_p99_us"] = lat.get("percentile", {}).get("99.000000", 0) / 1000
    return out
