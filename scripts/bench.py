"""Benchmark nbdmirror against a bare Python plugin, nbdkit's file plugin and raw file I/O.

    scripts/bench [--size 1G] [--runtime 15] [--repeat N] [--quick] [--json] [--profile]

Targets, each on a fresh sparse backing file of --size bytes under --workdir:

  nbdmirror            ``nbdmirror create`` + ``nbdmirror serve --background`` (the real CLI),
                       write-intent tracking on with durable marks
  nbdmirror-nodurable  the same nbdkit command line plus ``durable-marks=0`` (no fdatasync of
                       the write-intent map), started with cli.server.serve_background()
  passthrough          scripts/passthrough_plugin.py under nbdkit: the ceiling of a Python plugin
  file                 nbdkit's C file plugin
  raw                  the file itself, no NBD (dd, nbdcopy and fio on the file)

Per target and repetition, in this order on the same backing file:

  (priming)   before each seq write and seq read: --size bytes written + fdatasync'ed to a
              scratch file (see Bench.prime: without it, results depend on the phase before)
  seq write   sync + drop caches, pre-read the random source file into the page cache, then
              ``nbdcopy --flush SRC URI``; MiB/s of wall time. raw: ``nbdcopy --flush SRC
              FILE`` (it recycles the page cache as it goes: the disk's ceiling), and for
              reference ``dd bs=4M conv=fdatasync`` (one stream of buffered writes + fdatasync)
  seq read    sync + drop caches, then ``nbdcopy URI null:`` (raw: ``nbdcopy FILE null:``)
  randwrite   sync + drop caches, then fio 4 KiB random writes, one job, --iodepth deep,
              --runtime seconds after --ramp seconds (NBD: ioengine=nbd; raw: ioengine=libaio,
              buffered like the servers' pwrite). It runs after the seq write, so every region
              is already marked: it measures nbdmirror's steady-state write path. No flush at
              the end. (Caches are dropped first because 4 KiB writes into page-cache folios
              made by readahead cost the kernel far more, hiding the servers' differences.)
  randwrite fresh  (--fresh-randwrite) the same on a new, never-written backing file first:
              the price of first-touch marking.

Backing files stay until the end of the run (on a disk mounted with discard, deleting a
written GiB slows the writes that follow). --repeat N rotates the order of the targets on
each pass and reports medians; every measurement also records how much CPU other processes
used meanwhile, and warns when that was more than 10% of a CPU.

Results go to bench-results/latest.json and a timestamped copy; --json also prints them.
Every server started here is stopped on the way out, including on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from volume_core.server_files import pid_alive  # the project is installed (editable) in .venv

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
RESULTS_DIR = REPO / "bench-results"
PASSTHROUGH_PLUGIN = REPO / "scripts" / "passthrough_plugin.py"
DEFAULT_WORKDIR = Path("/var/tmp/nbdmirror-bench")
MIB = 1 << 20

ALL_TARGETS = ("nbdmirror", "nbdmirror-nodurable", "passthrough", "file", "raw")
METRICS = {
    # key: (label, unit)
    "seq_write": ("seq write", "MiB/s"),
    "seq_read": ("seq read (cold)", "MiB/s"),
    "randwrite_4k": ("4K randwrite", "IOPS"),
    "randwrite_4k_fresh": ("4K randwrite, fresh", "IOPS"),
}
# (numerator, denominator) target pairs reported as ratios when both ran.
RATIOS = (
    ("nbdmirror", "file"),
    ("nbdmirror", "passthrough"),
    ("passthrough", "file"),
    ("nbdmirror", "raw"),
    ("file", "raw"),
    ("nbdmirror", "nbdmirror-nodurable"),
    ("nbdmirror-nodurable", "passthrough"),
)
# (description, metric, numerator, denominator, minimum ratio)
GOALS = (
    ("nbdmirror seq write >= 70% of file", "seq_write", "nbdmirror", "file", 0.70),
    ("nbdmirror 4K randwrite IOPS >= 90% of passthrough", "randwrite_4k", "nbdmirror",
     "passthrough", 0.90),
)

START = time.monotonic()
#: other processes using more than this much of one CPU during a measurement get a warning
FOREIGN_WARN_PCT = 10.0
#: Backing files normally stay until the end of the run: on this kind of thin-provisioned
#: disk (ext4 mounted with discard) deleting a written GiB slows the writes of the next
#: several seconds, which would penalise whichever target comes next. Only when the disk
#: is too small for all of them are they deleted as we go.
DELETE_AS_WE_GO = False


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# -- output ------------------------------------------------------------------

def progress(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def show(tag: str, r: dict, unit: str) -> None:
    """One measurement's result line, with a warning when other work disturbed it."""
    extra = ""
    if r.get("foreign_cpu_pct", 0) > FOREIGN_WARN_PCT:
        who = ", ".join(f"{n} {p:g}%" for n, p in r.get("foreign_top", []))
        extra = f"  (warning: other processes used {r['foreign_cpu_pct']:g}% CPU: {who})"
    progress(f"{tag}:   {r['value']:,.0f} {unit}{extra}")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 128M, 1G)")
    size = int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))
    if size <= 0 or size % (1 << 20):
        raise argparse.ArgumentTypeError("the size must be a positive multiple of 1 MiB")
    return size


def fmt_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n / MIB:.0f}M"


# -- processes ---------------------------------------------------------------

def tool(name: str) -> str:
    for candidate in (VENV_BIN / name,):
        if candidate.exists():
            return str(candidate)
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (run scripts/setup)")
    return path


def run(args: list[str], what: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a command; raise BenchError with the end of its output if it fails."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: {args[0]} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise BenchError(f"{what}: {Path(args[0]).name} exited {proc.returncode}: {tail}")
    return proc


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def cpu_times(pid: int | None) -> tuple[float, float] | None:
    """User and system CPU seconds of a process (all its threads) so far."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def cpu_seconds(pid: int | None) -> float | None:
    t = cpu_times(pid)
    return None if t is None else t[0] + t[1]


def context_switches() -> int | None:
    """Context switches so far, machine-wide."""
    try:
        m = re.search(r"^ctxt (\d+)", Path("/proc/stat").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _process_times() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, CPU ticks including reaped children, name) of every user process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        name = text[text.find("(") + 1:text.rfind(")")]
        f = text[text.rfind(")") + 2:].split()
        ppid = int(f[1])
        if ppid == 2 or entry.name == "2":  # kernel threads (writeback is part of the work)
            continue
        # Reaped children count too (short-lived test processes), except for init's:
        # it reaps orphans, such as a daemonised server of ours.
        fields = f[11:13] if entry.name == "1" else f[11:15]
        table[int(entry.name)] = (ppid, sum(int(x) for x in fields), name)
    return table


class ForeignCpu:
    """CPU used by processes that are not ours (not this process, its children, or the
    server) while a measurement runs: other work on the machine skews the numbers."""

    def __init__(self, server_pid: int | None):
        self.ours = {os.getpid()} | ({server_pid} if server_pid else set())
        self.result: dict = {}

    def _foreign(self, table: dict[int, tuple[int, int, str]]) -> set[int]:
        out = set()
        for pid in table:
            p, seen = pid, 0
            while p in table and p not in self.ours and seen < 64:
                p, seen = table[p][0], seen + 1
            if p not in self.ours:
                out.add(pid)
        return out

    def __enter__(self) -> ForeignCpu:
        self.t0 = time.monotonic()
        self.before = _process_times()
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.monotonic() - self.t0
        after = _process_times()
        by_name: dict[str, int] = {}
        for pid in self._foreign(after):
            ppid, ticks, name = after[pid]
            old = self.before.get(pid)
            delta = ticks - old[1] if old and old[2] == name else ticks
            if delta > 0:
                by_name[name] = by_name.get(name, 0) + delta
        hz = os.sysconf("SC_CLK_TCK")
        total = sum(by_name.values()) / hz / max(elapsed, 1e-3)
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:4]
        self.result = {"foreign_cpu_pct": round(100 * total, 1),
                       "foreign_top": [[n, round(100 * t / hz / max(elapsed, 1e-3), 1)]
                                       for n, t in top]}


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C/SIGTERM while cleaning up, so a second Ctrl-C cannot leave a server."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def kill_pid(pid: int, timeout: float = 30) -> None:
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not pid_alive(pid), timeout):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 10)


def nbd_ready(uri: str) -> bool:
    import nbd

    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        h.shutdown()
        return True
    except nbd.Error:
        return False


def python_env() -> dict[str, str]:
    from cli.server import python_env as env

    return env()


# -- targets -----------------------------------------------------------------

@dataclass
class Served:
    """A running export (or, for raw, the file itself)."""

    uri: str | None  # NBD URI, or None for raw
    backing: Path  # the file the data lands in
    pid: int | None = None  # the server process, for CPU accounting and py-spy


@contextlib.contextmanager
def serve_nbdkit(name: str, workdir: Path, size: int, plugin_args: list[str]) -> Iterator[Served]:
    """nbdkit -f on a fresh sparse file; stopped (and its files removed) on exit."""
    backing = workdir / f"{name}.img"
    sock = workdir / f"{name}.sock"
    log = workdir / f"{name}.log"
    for p in (backing, sock):
        p.unlink(missing_ok=True)
    with open(backing, "wb") as f:
        f.truncate(size)
    args = plugin_args[:-1] + [plugin_args[-1].format(file=backing)]
    cmd = [tool("nbdkit"), "-f", "--exit-with-parent", "-U", str(sock), *args]
    uri = f"nbd+unix:///?socket={sock}"
    with open(log, "wb") as logf:
        # Own session: Ctrl-C reaches us, and we stop the server in order.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                env=python_env(), start_new_session=True)
    try:
        if not wait_until(lambda: proc.poll() is not None or
                          (sock.exists() and nbd_ready(uri)), 30):
            raise BenchError(f"{name}: nbdkit did not become ready within 30s (log: {log})")
        if proc.poll() is not None:
            raise BenchError(f"{name}: nbdkit exited {proc.returncode}: "
                             f"{log.read_text(errors='replace').strip()[-500:]}")
        yield Served(uri=uri, backing=backing, pid=proc.pid)
    finally:
        with shielded():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            sock.unlink(missing_ok=True)
            if DELETE_AS_WE_GO:
                backing.unlink(missing_ok=True)


@contextlib.contextmanager
def serve_nbdmirror(name: str, workdir: Path, size: int, durable: bool) -> Iterator[Served]:
    """A fresh nbdmirror volume, served by the CLI (durable) or with durable-marks=0."""
    vol = workdir / name
    sock = workdir / f"{name}.sock"
    shutil.rmtree(vol, ignore_errors=True)
    sock.unlink(missing_ok=True)
    nbdmirror = tool("nbdmirror")
    run([nbdmirror, "create", str(vol), "--size", str(size)], f"{name}: create")
    pid = None
    try:
        if durable:
            proc = run([nbdmirror, "serve", str(vol), "--background", "--socket", str(sock),
                        "--json"], f"{name}: serve", timeout=60)
            pid = json.loads(proc.stdout)["pid"]
        else:
            from cli.server import Endpoint, serve_background
            from volume_core.errors import NbdMirrorError
            from volume_core.server_files import ServerPlace
            from volume_core.volume import Volume

            try:
                state = serve_background(ServerPlace(Volume.open(vol)), Endpoint(socket=sock),
                                         extra=("durable-marks=0",))
            except NbdMirrorError as err:
                raise BenchError(f"{name}: serve: {err}") from None
            pid = state.get("pid")
        if not pid:
            with contextlib.suppress(OSError, ValueError):
                pid = int((vol / "nbdkit.pid").read_text())
        yield Served(uri=f"nbd+unix:///?socket={sock}", backing=vol / "data.img", pid=pid)
    finally:
        with shielded():
            if pid is None:  # serve failed half-way? a pid file may still exist
                with contextlib.suppress(OSError, ValueError):
                    pid = int((vol / "nbdkit.pid").read_text())
            if pid is not None and pid_alive(pid):
                try:
                    run([nbdmirror, "stop", str(vol)], f"{name}: stop", timeout=90)
                except BenchError as err:
                    progress(f"warning: {err}; killing pid {pid}")
                kill_pid(pid)
            sock.unlink(missing_ok=True)
            if DELETE_AS_WE_GO:
                shutil.rmtree(vol, ignore_errors=True)


@contextlib.contextmanager
def serve_raw(name: str, workdir: Path, size: int) -> Iterator[Served]:
    backing = workdir / f"{name}.img"
    backing.unlink(missing_ok=True)
    with open(backing, "wb") as f:
        f.truncate(size)
    try:
        yield Served(uri=None, backing=backing)
    finally:
        if DELETE_AS_WE_GO:
            backing.unlink(missing_ok=True)


def target_factory(target: str, workdir: Path, size: int):
    """``fresh(label)``: a context manager giving a fresh ``Served`` of ``target``, with its
    files named after ``label`` (unique per instance: they stay until the end of the run)."""
    if target == "nbdmirror":
        return lambda label: serve_nbdmirror(label, workdir, size, durable=True)
    if target == "nbdmirror-nodurable":
        return lambda label: serve_nbdmirror(label, workdir, size, durable=False)
    if target == "passthrough":
        return lambda label: serve_nbdkit(label, workdir, size,
                                          ["python", str(PASSTHROUGH_PLUGIN), "file={file}"])
    if target == "file":
        return lambda label: serve_nbdkit(label, workdir, size, ["file", "{file}"])
    if target == "raw":
        return lambda label: serve_raw(label, workdir, size)
    raise BenchError(f"unknown target {target!r}")


# -- measurements ------------------------------------------------------------

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
        with open(self.source, "rb", buffering=0) as f:
            buf = bytearray(8 * MIB)
            while f.readinto(buf):
                pass

    def prime(self) -> float:
        """Write --size bytes into a scratch file and fdatasync it; return the seconds taken.

        Makes the sequential measurements independent of what ran before. Here (a VM whose
        memory and disk are managed by the host) a GiB of buffered writes right after a
        random-write phase took 3.6s instead of 0.8s, every time; a full-size write and
        sync beforehand absorbs that (a small one does not). The scratch file is
        rewritten in place, so no blocks are freed (and discarded) in between.
        """
        self.drop_caches()
        self.warm_source()
        t0 = time.perf_counter()
        run(["dd", f"if={self.source}", f"of={self.scratch}", "bs=4M",
             "conv=fdatasync,notrunc", "iflag=fullblock", "status=none"], "priming write")
        return time.perf_counter() - t0

    def seq_write(self, served: Served) -> dict:
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

    def fio_command(self, served: Served, runtime: float | None = None,
                    ramp: float | None = None) -> list[str]:
        runtime = self.runtime if runtime is None else runtime
        ramp = self.ramp if ramp is None else ramp
        cmd = [tool("fio"), "--name=randwrite", "--rw=randwrite", "--bs=4k",
               f"--iodepth={self.iodepth}", "--numjobs=1", f"--size={self.size}",
               "--time_based", f"--runtime={runtime:g}", "--output-format=json"]
        if ramp > 0:
            cmd.append(f"--ramp_time={ramp:g}")
        if served.uri is not None:
            cmd += ["--ioengine=nbd", f"--uri={served.uri}"]
        else:
            # Buffered, like the servers' pwrite into the page cache.
            cmd += ["--ioengine=libaio", "--direct=0", f"--filename={served.backing}"]
        return cmd

    def randwrite(self, served: Served) -> dict:
        # Start every target from an empty page cache: 4 KiB writes into folios that
        # readahead or big writes created cost the kernel several times more (large folios,
        # seen on 6.x), which would bury the servers' own cost and depend on history.
        self.drop_caches()
        cmd = self.fio_command(served)
        cpu0, cs0 = cpu_times(served.pid), context_switches()
        with ForeignCpu(served.pid) as foreign:
            proc = run(cmd, "fio randwrite", timeout=self.runtime + self.ramp + 120)
        cpu1, cs1 = cpu_times(served.pid), context_switches()
        text = proc.stdout
        try:  # the nbd engine prints "fio: connected to NBD server" before the JSON
            data = json.loads(text[text.index("{"):])
            job = data["jobs"][0]
            w = job["write"]
        except (ValueError, KeyError, IndexError) as err:
            raise BenchError(f"fio randwrite: unreadable JSON output ({err})") from None
        if job.get("error"):
            raise BenchError(f"fio randwrite: job error {job['error']}")
        clat = w.get("clat_ns", {})
        pct = clat.get("percentile", {})
        out = {
            "value": w["iops"],
            "io_mib": w["io_bytes"] / MIB,
            "lat_mean_us": clat.get("mean", 0) / 1000,
            "lat_p99_us": pct.get("99.000000", 0) / 1000,
            "fio_cpu_pct": round(job.get("usr_cpu", 0) + job.get("sys_cpu", 0), 1),
            "ioengine": "nbd" if served.uri is not None else "libaio",
            **foreign.result,
        }
        # Per-op figures are over ramp + runtime at the measured rate: estimates.
        ops = w["iops"] * (self.runtime + self.ramp)
        if cpu0 is not None and cpu1 is not None and ops:
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            out["server_cpu_s"] = user + system
            out["server_cpu_us_per_op"] = (user + system) * 1e6 / ops
            out["server_sys_us_per_op"] = system * 1e6 / ops
        if cs0 is not None and cs1 is not None and ops:
            out["context_switches_per_op"] = (cs1 - cs0) / ops  # machine-wide
        return out

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
                read = lambda off: h.pread(chunk, off)
                self._compare(read, offsets, served)
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


def make_source(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


# -- profiling ----------------------------------------------------------------

PROFILED = ("nbdmirror", "passthrough")


def profile_randwrite(bench: Bench, target: str, served: Served, out_dir: Path, stamp: str,
                      duration: float) -> dict:
    """py-spy a target's server during an extra (unmeasured) fio randwrite.

    "all" samples every thread that is in Python code; "gil" only the one holding the GIL
    (a stack with no Python frame there is nbdkit's C glue around the callback)."""
    pyspy = tool("py-spy")
    result: dict = {}
    for mode, extra in (("all", []), ("gil", ["--gil"])):
        raw = out_dir / f"profile-{stamp}-{target}-randwrite-{mode}.txt"
        fio = subprocess.Popen(bench.fio_command(served, runtime=duration + 3, ramp=0),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            run([pyspy, "record", "--pid", str(served.pid), "--duration", f"{duration:g}",
                 "--rate", "250", "--format", "raw", "--nonblocking", "-o", str(raw), *extra],
                f"py-spy ({mode})", timeout=duration + 60)
        finally:
            fio.wait()
        result[mode] = summarize_profile(raw) | {"file": str(raw.relative_to(REPO))}
    return result


def summarize_profile(path: Path, top: int = 12) -> dict:
    """Self (by line) and inclusive (by function) shares from py-spy's raw output.

    Shares are of all samples; "(no Python frame)" is a thread inside nbdkit's C code."""
    self_ct: dict[str, int] = {}
    incl_ct: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f.strip()]
        if not frames:
            self_ct["(no Python frame)"] = self_ct.get("(no Python frame)", 0) + n
            continue
        self_ct[frames[-1]] = self_ct.get(frames[-1], 0) + n
        for fn in {re.sub(r":\d+\)$", ")", f) for f in frames}:  # once per stack
            incl_ct[fn] = incl_ct.get(fn, 0) + n
    share = lambda d: [[k, round(100 * v / max(total, 1), 1)]
                       for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "self_pct": share(self_ct), "inclusive_pct": share(incl_ct)}


# -- report -------------------------------------------------------------------

def environment(workdir: Path) -> dict:
    def out(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
            return (p.stdout or p.stderr).strip()
        except OSError:
            return ""

    cpu_model = ""
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu_model = m.group(1) if m else ""
    mem = ""
    with contextlib.suppress(OSError):
        m = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
        mem = f"{int(m.group(1)) // 1024} MiB" if m else ""
    try:
        import volume_core.native as native

        native_impl = native.IMPLEMENTATION
    except ImportError as err:
        native_impl = f"unavailable: {err}"
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host_kernel": os.uname().release,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory": mem,
        "nbdkit": out(["nbdkit", "--version"]).splitlines()[0] if shutil.which("nbdkit") else "",
        "nbdcopy": out(["nbdcopy", "--version"]).splitlines()[0]
        if shutil.which("nbdcopy") else "",
        "fio": out(["fio", "--version"]),
        "python": sys.version.split()[0],
        "native": native_impl,
        "git_commit": out(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(out(["git", "status", "--porcelain", "--untracked-files=no"])),
        "loadavg_at_start": load_average(),
        "workdir": str(workdir),
        "workdir_fs": out(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(workdir)]),
    }


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def cpu_busy(seconds: float) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return sum(f[:8]) - idle, sum(f[:8])
    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round((b1 - b0) / (t1 - t0), 3) if t1 > t0 else None


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if unit == "IOPS" or v >= 100 else f"{v:,.1f}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(report: dict) -> str:
    targets = report["config"]["targets"]
    metrics = [m for m in METRICS if any(m in report["results"][t] for t in targets)]
    res = report["results"]
    rows = [["metric"] + targets]
    for m in metrics:
        label, unit = METRICS[m]
        rows.append([f"{label} ({unit})"] + [fmt_value(res[t].get(m, {}).get("value"), unit)
                                             for t in targets])
    cpu_rows = []
    for m in metrics:
        if not m.startswith("randwrite"):
            continue
        for key, what, f in (("server_cpu_us_per_op", "server CPU (us/op)", "{:.1f}"),
                             ("server_sys_us_per_op", "server kernel CPU (us/op)", "{:.1f}"),
                             ("context_switches_per_op", "context switches/op", "{:.1f}")):
            vals = [res[t].get(m, {}).get(key) for t in targets]
            if any(v is not None for v in vals):
                cpu_rows.append([f"{METRICS[m][0]}: {what}"] +
                                ["-" if v is None else f.format(v) for v in vals])
        lat = [res[t].get(m, {}).get("lat_mean_us") for t in targets]
        cpu_rows.append([f"{METRICS[m][0]}: mean latency (us)"] +
                        ["-" if v is None else f"{v:.0f}" for v in lat])
    out = [f"nbdmirror benchmark: {fmt_size(report['config']['size'])}, "
           f"fio {report['config']['runtime']:g}s x{report['config']['repeat']} "
           f"(median), iodepth {report['config']['iodepth']}", "",
           table(rows + cpu_rows), ""]
    ratio_names = list(report["ratios"])
    if ratio_names:
        rrows = [["ratio"] + [METRICS[m][0] for m in metrics]]
        for name in ratio_names:
            rrows.append([name] + [
                "-" if report["ratios"][name].get(m) is None
                else f"{100 * report['ratios'][name][m]:.0f}%" for m in metrics])
        out += [table(rrows), ""]
    for g in report["goals"]:
        have = "n/a" if g["ratio"] is None else f"{100 * g['ratio']:.0f}%"
        out.append(f"{g['status']}: {g['goal']} (measured {have})")
    if report.get("snapshots"):
        from bench_snapshots import render_snapshots

        out += ["", render_snapshots(report["snapshots"])]
    for note in report.get("notes", []):
        out.append(f"note: {note}")
    out.append(f"took {report['duration_s']:.0f}s")
    return "\n".join(out)


def median_results(samples: dict[str, dict[str, list[dict]]]) -> dict:
    results: dict = {}
    for target, by_metric in samples.items():
        results[target] = {}
        for metric, runs in by_metric.items():
            if not runs:
                continue
            entry: dict = {"unit": METRICS[metric][1],
                           "value": statistics.median(r["value"] for r in runs),
                           "samples": [round(r["value"], 2) for r in runs]}
            for key in runs[0]:
                if key == "value":
                    continue
                vals = [r[key] for r in runs if isinstance(r.get(key), int | float)]
                if vals and len(vals) == len(runs):
                    entry[key] = round(statistics.median(vals), 3)
                elif key in ("command", "ioengine"):
                    entry[key] = runs[0][key]
            entry["runs"] = runs  # everything, per repetition
            results[target][metric] = entry
    return results


def compute_ratios(results: dict) -> dict:
    ratios = {}
    for num, den in RATIOS:
        if num not in results or den not in results:
            continue
        r = {}
        for m in METRICS:
            a = results[num].get(m, {}).get("value")
            b = results[den].get(m, {}).get("value")
            if a is not None and b:
                r[m] = round(a / b, 4)
        if r:
            ratios[f"{num}/{den}"] = r
    return ratios


def check_goals(results: dict) -> list[dict]:
    goals = []
    for text, metric, num, den, minimum in GOALS:
        a = results.get(num, {}).get(metric, {}).get("value")
        b = results.get(den, {}).get(metric, {}).get("value")
        ratio = round(a / b, 4) if a is not None and b else None
        status = "SKIP" if ratio is None else ("PASS" if ratio >= minimum else "MISS")
        goals.append({"goal": text, "metric": metric, "numerator": num, "denominator": den,
                      "minimum": minimum, "ratio": ratio, "status": status})
    return goals


# -- main ---------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--size", type=parse_size, help="backing size per target (default 1G; "
                   "128M with --quick)")
    p.add_argument("--runtime", type=float, help="seconds of fio randwrite (default 15; 4 "
                   "with --quick)")
    p.add_argument("--ramp", type=float, help="fio ramp seconds before measuring (default 2; "
                   "0 with --quick)")
    p.add_argument("--iodepth", type=int, default=16, help="fio iodepth (default 16)")
    p.add_argument("--repeat", type=int, default=1, help="run everything N times; report "
                   "medians (default 1)")
    p.add_argument("--quick", action="store_true", help="small smoke run: 128M, short fio")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated subset of {','.join(ALL_TARGETS)}")
    p.add_argument("--fresh-randwrite", action="store_true",
                   help="also measure randwrite on a never-written backing file")
    p.add_argument("--profile", action="store_true",
                   help="afterwards py-spy the nbdmirror and passthrough servers during an "
                   "extra randwrite each and add their top frames to the results")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help=f"where test data goes (default {DEFAULT_WORKDIR}; use a disk, "
                   "not tmpfs)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-snapshots", dest="snapshots", action="store_false",
                   help="skip the snapshot figures (copy-on-write cost, creation time)")
    p.add_argument("--json", action="store_true", help="print the JSON results to stdout")
    args = p.parse_args(argv)
    args.size = args.size or (128 * MIB if args.quick else 1 << 30)
    args.runtime = args.runtime if args.runtime is not None else (4 if args.quick else 15)
    args.ramp = args.ramp if args.ramp is not None else (0 if args.quick else 2)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad or not args.targets:
        p.error(f"unknown target(s) {', '.join(bad) or '(none)'}; "
                f"choose from {','.join(ALL_TARGETS)}")
    if args.repeat < 1 or args.runtime <= 0 or args.ramp < 0 or args.iodepth < 1:
        p.error("--repeat, --runtime and --iodepth must be positive, --ramp >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.early_notes = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    sys.path.insert(0, str(REPO))  # cli, volume_core (also installed editable)

    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = args.workdir / f"run-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    try:
        global DELETE_AS_WE_GO
        free = shutil.disk_usage(run_dir).free
        instances = len(args.targets) * args.repeat * (2 if args.fresh_randwrite else 1)
        need_min = 3 * args.size + 256 * MIB  # source + scratch + one target at a time
        need_all = (2 + instances) * args.size + 256 * MIB
        if free < need_min:
            raise BenchError(f"{run_dir}: {free // MIB} MiB free, need about "
                             f"{need_min // MIB} MiB")
        if free < need_all:
            DELETE_AS_WE_GO = True
            args.early_notes = [f"only {free // MIB} MiB free (all backing files need "
                                f"{need_all // MIB}): deleted each after use, which can slow "
                                "the next target's writes"]
        report = bench_all(args, run_dir)
    except KeyboardInterrupt:
        progress("interrupted; everything started has been stopped")
        return 130
    except BenchError as err:
        progress(f"error: {err}")
        return 1
    finally:
        with shielded():
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    args.workdir.rmdir()  # only if no other run is using it
    text = render(report)
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def bench_all(args: argparse.Namespace, run_dir: Path) -> dict:
    env = environment(args.workdir)
    busy = cpu_busy(1.0)
    env["cpu_busy_at_start"] = busy
    notes_early = []
    if busy is not None and busy > 0.15:
        note = (f"the CPUs were {100 * busy:.0f}% busy before the run: something else is "
                "running, numbers may be low and noisy")
        progress(f"warning: {note}")
        notes_early.append(note)
    started = time.monotonic()
    source = run_dir / "source.bin"
    progress(f"making {fmt_size(args.size)} of random source data in {source}")
    make_source(source, args.size)
    bench = Bench(size=args.size, runtime=args.runtime, ramp=args.ramp, iodepth=args.iodepth,
                  workdir=run_dir, source=source, scratch=run_dir / "scratch.img",
                  can_drop_caches=os.geteuid() == 0)
    bench.notes.extend(notes_early + args.early_notes)
    if not bench.can_drop_caches:
        bench.notes.append("not root: page caches were not dropped; reads may be warm")

    metrics = ["seq_write", "seq_read", "randwrite_4k"]
    if args.fresh_randwrite:
        metrics.append("randwrite_4k_fresh")
    samples: dict[str, dict[str, list[dict]]] = {t: {m: [] for m in metrics}
                                                 for t in args.targets}
    progress(f"making the {fmt_size(args.size)} scratch file for priming writes")
    bench.prime()
    for rep in range(args.repeat):
        # Rotate the order on each repetition so that no target is always first or last.
        order = args.targets[rep % len(args.targets):] + args.targets[:rep % len(args.targets)]
        for target in order:
            fresh = target_factory(target, run_dir, args.size)
            tag = f"{target}" + (f" (run {rep + 1}/{args.repeat})" if args.repeat > 1 else "")
            if args.fresh_randwrite:
                with fresh(f"{target}.fresh.{rep + 1}") as served:
                    progress(f"{tag}: 4K randwrite on a fresh backing file")
                    r = bench.randwrite(served)
                    samples[target]["randwrite_4k_fresh"].append(r)
                    show(tag, r, "IOPS")
            with fresh(f"{target}.{rep + 1}") as served:
                progress(f"{tag}: seq write {fmt_size(args.size)}")
                r = bench.seq_write(served)
                samples[target]["seq_write"].append(r)
                show(tag, r, "MiB/s")
                bench.verify(served)
                progress(f"{tag}: seq read {fmt_size(args.size)} (caches dropped)")
                r = bench.seq_read(served)
                samples[target]["seq_read"].append(r)
                show(tag, r, "MiB/s")
                progress(f"{tag}: 4K randwrite, iodepth {args.iodepth}, "
                         f"{args.ramp:g}+{args.runtime:g}s")
                r = bench.randwrite(served)
                samples[target]["randwrite_4k"].append(r)
                show(tag, r, "IOPS")
                progress(f"{tag}: stopping")

    snapshot_figures = None
    if args.snapshots:
        from bench_snapshots import bench_snapshots

        snapshot_figures = bench_snapshots(bench, run_dir, args.size, serve_nbdmirror, run, tool,
                                           progress)
    results = median_results(samples)
    for target, by_metric in samples.items():
        for metric, runs in by_metric.items():
            for r in runs:
                if r.get("foreign_cpu_pct", 0) > FOREIGN_WARN_PCT:
                    who = ", ".join(f"{n} {p:g}%" for n, p in r.get("foreign_top", []))
                    bench.notes.append(
                        f"{target} {metric}: other processes used {r['foreign_cpu_pct']:g}% "
                        f"of a CPU meanwhile ({who}); that number is suspect")
    report = {
        "schema": 1,
        "config": {"size": args.size, "runtime": args.runtime, "ramp": args.ramp,
                   "iodepth": args.iodepth, "repeat": args.repeat, "targets": args.targets,
                   "fresh_randwrite": args.fresh_randwrite, "quick": args.quick,
                   "caches_dropped_before": ["seq_write", "seq_read", "randwrite_4k"]},
        "env": env,
        "results": results,
        "ratios": compute_ratios(results),
        "goals": check_goals(results),
        "notes": bench.notes,
        "snapshots": snapshot_figures,
    }
    report["env"]["loadavg_at_end"] = load_average()
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.profile:
        report["profile"] = {}
        for target in [t for t in PROFILED if t in args.targets] or ["nbdmirror"]:
            with target_factory(target, run_dir, args.size)(f"{target}.profile") as served:
                progress(f"profile: filling {target} (seq write, unmeasured)")
                bench.seq_write(served)
                bench.drop_caches()
                progress(f"profile: py-spy on the {target} server during 4K randwrite")
                report["profile"][target] = profile_randwrite(
                    bench, target, served, RESULTS_DIR, stamp, duration=min(args.runtime, 10))
    report["duration_s"] = round(time.monotonic() - started, 1)
    body = json.dumps(report, indent=2) + "\n"
    (RESULTS_DIR / f"{stamp}.json").write_text(body)
    (RESULTS_DIR / "latest.json").write_text(body)
    progress(f"results: {RESULTS_DIR / 'latest.json'} and {stamp}.json")
    for target, modes in report.get("profile", {}).items():
        for mode, prof in modes.items():
            progress(f"profile {target} ({mode}, {prof['samples']} samples; {prof['file']}), "
                     "self %:")
            for frame, pct in prof["self_pct"][:8]:
                progress(f"  {pct:5.1f}%  {frame}")
    return report


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
