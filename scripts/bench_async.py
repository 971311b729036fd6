"""The async topic: what async mirroring costs and how fast its cycles carry data, on loopback.

One pair of volumes of --async-size (default 2G; 256M with --quick): ``nbdmirror receive
SEC --listen 127.0.0.1:PORT --background`` and ``nbdmirror serve PRI --background
--replicate-to 127.0.0.1:PORT --mode async --interval 0`` (cycles only when asked: ``sync
--wait`` or the admin socket's ``cycle-now``), every server at the same --server-threads
(default: serve's default, which async serve shares with a plain serve).

  initial sync  PRI is filled first with --async-size random bytes (the run's random
                source file, ``nbdcopy --flush`` through a plain ``serve`` of PRI, which
                marks every region), then stopped; the receiver starts, then the async
                serve, whose initial sync carries every region: a pass over the live
                volume, then cycle 1 with what was written meanwhile (nothing here),
                whose commit is the secondary's first consistent image. Timed by the
                primary (status ``initial_sync.seconds`` + cycle 1's
                ``last_cycle.seconds``; a server without the pass: cycle 1's alone) and
                by the wall clock (from starting ``serve`` to the poll that sees cycle 1
                committed). Against: ``nbdcopy
                --flush`` of the same bytes (the source file itself, exported read-only)
                into a fresh file, between two nbdkit ``file`` exports at the same -t.
  delta         Once the initial sync's dirty pages are written back (``os.sync()``: the
                delta's syncs are not to share the disk with gigabytes of writeback),
                1% of the regions (``region_size`` from status), scattered, each written
                whole with new random bytes through NBD, then ``nbdmirror sync PRI --wait
                --json``: the bytes the cycle conveyed must be exactly those regions'
                (``last_cycle.bytes``); its time (``last_cycle.seconds``) against the
                initial sync's. The wall time of ``sync --wait`` is reported too (a CLI
                process and 0.2 s status polls: most of it is not the cycle).
  host writes   fio over NBD to PRI's unix socket: 1 MiB sequential writes (iodepth 4)
                and 4 KiB random writes (--iodepth), each for --runtime, while cycles run
                back to back (a thread asks ``cycle-now`` as soon as the previous cycle
                has committed; it counts the cycles and the fraction of fio's run one was
                under way, from the server's ``last_cycle.seconds``); then the same fio
                on the same async serve, connected, with no cycle under way (what being
                mirrored costs a write between cycles; the 1M run marks every region
                first, so the 4K run meets no first mark), then one cycle to carry
                what they marked. Then, after the
                last cycle, both sides are stopped and compared (below), and the same fio
                runs on the same volume under a plain ``nbdmirror serve`` (no
                replication): the same file, data and page cache, the only difference the
                mirroring. The ratios are async / plain. Before the plain runs the async
                ones are made again with the primary restarted with ``serve --max-rate``
                (--async-max-rate, default 20M: DRBD's default c-max-rate, 100M, does
                not bind for 4K writes, whose cycles convey 50-70 MiB/s here), the
                cycles capped at that rate: what the host gets when replication may not
                take all the CPU it could, at the price of a recovery point that falls
                behind while the host writes faster than the cap (both are reported,
                with the bytes conveyed). Last, the plain serve again beside a process
                spinning at SCHED_IDLE (``IdleBusyLoop``: it gets only CPU time nothing
                else wants): no goal, a reference. On this 2-vCPU VM it alone takes
                24-45% of a plain serve's 4K IOPS (sessions 13-15), and a cycle's
                conveyor and secondary must run beside the host here.
  bitmap scan   ``scan_runs`` of a 16M-entry map (a 1 TiB volume of 64K regions) by the C
                helper and by its numpy twin (volume_core/native): 1% of the entries in
                scattered runs, 1% as single entries, none, all; median of SCAN_REPEAT.

Fair priming (this VM returns free memory to its host, virtio-balloon free page
reporting: the first touch of a page-cache page freed a moment ago costs about 2.5 ms
per MiB, which makes copies swing widely; and a DAMON pageout scheme, as configured
here, reclaims memory idle for about a minute). Right before each measured copy, in
both the async and the nbdcopy case, the destination data file has been written once
whole (zeros, ``dd conv=fdatasync,notrunc`` over the secondary's ``data.img`` / the
fresh destination file: every block allocated, every page touched) and the source read
once whole (``cat > /dev/null`` of PRI's ``data.img`` / of the source file). Before
each fio run, PRI's (and SEC's) ``data.img`` is read once again, in 4 KiB pages
(``read_once_in_pages``: its cached pages dropped, then read with readahead off). A
sequential read leaves a file in 2 MiB folios on this VM's kernel, and a 4K write
into one costs the kernel a walk of its 512 buffer heads: a plain serve's 4K IOPS
fell from 68-82K to 26K, and most of every write's CPU was that walk, the same with
or without replication (session 14; Debian 12's 6.1 kernel caches ext4 files in
4 KiB pages). No other page cache is dropped in this topic: dropping it is exactly
what makes the next copy pay for fresh pages. What a cycle adds (its copy-on-write
store on the primary, the secondary's snapshot of the previous cycle) is new pages,
paid for as async mirroring pays them.

After the async runs a last cycle is asked for, the secondary must report the same
committed cycle as the primary, both sides are stopped cleanly and ``qemu-img compare``
must find the two data files identical, or the bench fails. One run: --repeat does not
apply to this topic.

Goals: the initial sync at >= 80% of nbdcopy's rate; the 1% delta in under 3% of the
initial sync's time; host writes (MiB/s, IOPS) under back-to-back cycles at >= 80% of
the plain serve's (uncapped, and at --max-rate). Checks: the delta conveyed exactly the
changed regions; identical.
Where the server does not report ``last_cycle`` (an older nbdmirror), the difference of
``bytes_conveyed`` and wall times stand in, and the table says so.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchlib.context import Context
from benchlib.cpu import ForeignCpu, cpu_seconds
from benchlib.measure import make_source, read_once, read_once_in_pages, write_zeros
from benchlib.procs import BenchError, progress, run, tool
from benchlib.replication import ASYNC, BackToBackCycles, Pair, fio_write, replicated_pair
from benchlib.report import MIB, fmt_size, table
from benchlib.targets import serve_nbdkit

TITLE = ("async mirroring: initial sync against nbdcopy, a 1% delta cycle, host writes "
         "under back-to-back cycles, bitmap scan")
#: the delta cycle's share of the regions
DELTA_FRACTION = 0.01
#: entries of the scanned map: 16M regions, a 1 TiB volume of 64K regions
SCAN_REGIONS = 16 << 20
SCAN_REPEAT = 5
# (key, text, kind, bound)
GOALS = (
    ("initial", "initial sync >= 80% of nbdcopy between two nbdkit file exports",
     "ratio", 0.80),
    ("delta_time", "1% delta cycle takes < 3% of the initial sync's time", "below", 0.03),
    ("write_1m", "host 1 MiB sequential writes under back-to-back cycles >= 80% of a plain "
     "serve", "ratio", 0.80),
    ("randwrite_4k", "host 4K random writes under back-to-back cycles >= 80% of a plain "
     "serve", "ratio", 0.80),
)
HOST_LOADS = (
    ("write_1m", "1M sequential writes, iodepth 4", "MiB/s"),
    ("randwrite_4k", "4K random writes", "IOPS"),
)


def _max_rate(ctx: Context) -> str | None:
    """--async-max-rate, or None for 'none'."""
    rate = getattr(ctx.args, "async_max_rate", None) or "none"
    return None if rate.lower() in ("none", "0", "") else rate


def async_size(ctx: Context) -> int:
    return getattr(ctx.args, "async_size", None) or ctx.size


def measure(ctx: Context) -> dict:
    size = async_size(ctx)
    source = ctx.bench.source
    if not source.exists() or source.stat().st_size != size:
        source = ctx.run_dir / "async-source.bin"
        progress(f"async: making {fmt_size(size)} of random source data in {source}")
        make_source(source, size)
    section: dict = {"size": size, "threads": ctx.threads, "runtime": ctx.args.runtime,
                     "ramp": ctx.args.ramp, "iodepth": ctx.args.iodepth,
                     "delta_fraction": DELTA_FRACTION}
    section["nbdcopy"] = nbdcopy_baseline(ctx, source, size)
    fill: dict = {}
    with replicated_pair(ctx.run_dir, "async", size, ASYNC, threads=ctx.threads, interval=0,
                         prepare=lambda pair: fill_and_prime(ctx, pair, source, size, fill),
                         wait=False, delete_after=ctx.delete_after,
                         keep_on_error=ctx.args.keep) as pair:
        section["fill"] = fill
        section["initial"] = initial_sync(ctx, pair, size, section["nbdcopy"])
        section["delta"] = d = delta_cycle(ctx, pair, size)
        init_s = section["initial"]["seconds"]
        d["vs_initial"] = round(d["seconds"] / init_s, 4) if init_s else None
        section["async_threads"] = pair.threads
        section["host_async"] = host_writes(ctx, pair, size, cycles=True)
        progress("async: the same primary, connected, with no cycle under way")
        section["host_idle_mirror"] = host_writes(ctx, pair, size, cycles=False,
                                                  idle_mirror=True)
        # what it marked travels now, uncapped (not at the cap after the restart below)
        pair.sync_wait(120 + size / MIB / 10, "after the no-cycle runs")
        section["max_rate"] = capped = _max_rate(ctx)
        if capped is not None:
            progress(f"async: the primary again, with serve --max-rate {capped}")
            pair.stop_primary()
            pair.max_rate = capped
            pair.serve(ctx.threads)
            pair.sync_wait(120 + size / MIB / 10, "the restarted primary")
            section["host_capped"] = host_writes(ctx, pair, size, cycles=True)
            pair.stop_primary()
            pair.max_rate = None
            pair.serve(ctx.threads)
        progress("async: a last cycle, then both stopped and compared (qemu-img compare)")
        last = pair.sync_wait(120 + size / MIB / 10, "the last cycle")
        committed = (pair.status("secondary").get("replication") or {}).get("committed_cycle")
        section["compare"] = {"primary_committed": last["link"]["committed_cycle"],
                              "secondary_committed": committed}
        if committed != last["link"]["committed_cycle"]:
            raise BenchError(f"async: the primary says cycle {last['link']['committed_cycle']} "
                             f"is committed, the secondary {committed}")
        section["compare"] |= pair.check_identical()
        progress("async: identical")
        progress("async: the same volume under a plain serve (no replication)")
        pair.serve(ctx.threads, replicate=False)
        section["plain_threads"] = pair.threads
        section["host_plain"] = host_writes(ctx, pair, size, cycles=False)
        progress("async: the plain serve again, beside an idle-priority busy loop")
        section["host_plain_busy"] = host_writes(ctx, pair, size, cycles=False, busy=True)
        pair.stop_primary()
    if section["plain_threads"] != section["async_threads"]:
        raise BenchError(f"async: the async serve ran -t {section['async_threads']}, the "
                         f"plain one -t {section['plain_threads']}: not comparable")
    section["bitmap"] = bitmap_scan()
    section["goals"] = check_goals(section)
    return section


# -- initial sync ------------------------------------------------------------------------

def nbdcopy_baseline(ctx: Context, source: Path, size: int) -> dict:
    """nbdcopy --flush of ``source`` (a read-only file export) into a fresh file written
    once with zeros (a file export), primed like the async case."""
    dst = ctx.run_dir / "async-nbdcopy-dst.img"
    dst.unlink(missing_ok=True)
    with open(dst, "wb") as f:
        f.truncate(size)
    progress(f"async: nbdcopy baseline: priming (zeros over the {fmt_size(size)} "
             "destination, the source read once)")
    zero_s = write_zeros(dst, size)
    read_s = read_once(source)
    with serve_nbdkit("async-nbdcopy-src", ctx.run_dir, size, ["file", "{file}"],
                      threads=ctx.threads, backing=source, readonly=True) as src, \
         serve_nbdkit("async-nbdcopy-dst", ctx.run_dir, size, ["file", "{file}"],
                      threads=ctx.threads, backing=dst) as dest:
        progress(f"async: nbdcopy --flush between two nbdkit file exports (-t {ctx.threads})")
        cmd = [tool("nbdcopy"), "--flush", src.uri, dest.uri]
        foreign = ForeignCpu(src.pid)
        foreign.ours.add(dest.pid)
        with foreign:
            t0 = time.perf_counter()
            run(cmd, "nbdcopy between two file exports")
            elapsed = time.perf_counter() - t0
    r = {"value": round(size / MIB / elapsed, 1), "unit": "MiB/s", "seconds": round(elapsed, 3),
         "command": "nbdcopy --flush SRC_URI DST_URI", "primed_zero_s": round(zero_s, 2),
         "primed_read_s": round(read_s, 2), **foreign.result}
    ctx.show("async: nbdcopy file -> file", r, "MiB/s")
    if ctx.delete_after:
        dst.unlink(missing_ok=True)
    return r


def fill_and_prime(ctx: Context, pair: Pair, source: Path, size: int, out: dict) -> None:
    """Before the secondary starts: PRI filled with ``source`` through a plain serve (every
    region marked), stopped; SEC's data.img written once with zeros; PRI's read once."""
    progress(f"async: filling the primary ({fmt_size(size)}: nbdcopy --flush through a "
             "plain serve)")
    pair.serve(ctx.threads, replicate=False)
    read_once(source)
    t0 = time.perf_counter()
    run([tool("nbdcopy"), "--flush", str(source), pair.uri], "filling the primary")
    out["fill_mibs"] = round(size / MIB / (time.perf_counter() - t0), 1)
    pair.stop_primary()
    progress(f"async:   filled at {out['fill_mibs']:,.0f} MiB/s; priming (zeros over the "
             "secondary's data.img, the primary's read once)")
    assert pair.secondary is not None
    out["primed_zero_s"] = round(write_zeros(pair.secondary / "data.img", size), 2)
    os.sync()
    out["primed_read_s"] = round(read_once(pair.primary / "data.img"), 2)


def initial_sync(ctx: Context, pair: Pair, size: int, nbdcopy: dict) -> dict:
    """What the async serve starts once it is connected, followed to the commit of cycle 1
    (the secondary's first consistent image): a pass over every marked region from the
    live volume (status ``initial_sync``) and then cycle 1 with what was written meanwhile
    (nothing, here); or, from a server without that pass, cycle 1 carrying everything."""
    progress(f"async: initial sync of {fmt_size(size)} (until cycle 1 commits)")
    foreign = ForeignCpu(pair.primary_pid)
    foreign.ours |= set(pair.pids)
    with foreign:
        rep = pair.wait_committed(1, 120 + size / MIB / 10, "the initial sync")
        seen = time.monotonic()
    assert pair.serve_began is not None and pair.served_at is not None
    wall = seen - pair.serve_began
    last = rep.get("last_cycle")
    r: dict = {"wall_s": round(wall, 3), "serve_s": round(pair.served_at - pair.serve_began, 3),
               "committed_cycle": rep.get("committed_cycle"), **_link_facts(rep),
               **foreign.result,
               "primary_cpu_s": cpu_seconds(pair.primary_pid),
               "secondary_cpu_s": cpu_seconds(pair.receiver_pid)}
    init = rep.get("initial_sync")
    c1 = last if last and last.get("number") == 1 else None
    # a cut link resumes: the server's figures would cover only the last stretch
    resumed = (rep.get("links_lost") or 0) > 0 or (rep.get("connects") or 0) > 1
    if c1 is not None and init and not resumed:
        r |= {"timed_by": "server", "how": "initial_sync.seconds + cycle 1's "
              "last_cycle.seconds", "seconds": round(init["seconds"] + c1["seconds"], 6),
              "bytes": init["bytes"] + c1["bytes"],
              "regions": init["regions"] + c1["regions"], "pass_s": init["seconds"],
              "pass_bytes": init["bytes"], "skipped_regions": init.get("skipped_regions"),
              "cycle1_s": c1["seconds"], "cycle1_bytes": c1["bytes"]}
    elif c1 is not None and "initial_sync" not in rep and not resumed:
        r |= {"timed_by": "server", "how": "cycle 1's last_cycle.seconds",
              "seconds": c1["seconds"], "bytes": c1["bytes"], "regions": c1["regions"]}
    else:  # what was conveyed in all, over the wall time
        r |= {"timed_by": "wall", "how": "WALL time (no initial_sync/last_cycle from the "
              "server" + (", or the link was cut and resumed" if resumed else "") + ")",
              "seconds": round(wall, 3), "bytes": rep["bytes_conveyed"],
              "regions": rep.get("regions_conveyed")}
    r["value"] = round(r["bytes"] / MIB / r["seconds"], 1) if r["seconds"] else 0.0
    r["unit"] = "MiB/s"
    r["wall_mibs"] = round(r["bytes"] / MIB / wall, 1)
    r["vs_nbdcopy"] = round(r["value"] / nbdcopy["value"], 3)
    r["all_bytes"] = r["bytes"] == size
    ctx.show("async: initial sync", r, "MiB/s")
    progress(f"async:   {fmt_size(r['bytes'])} in {r['seconds']:.2f}s ({r['timed_by']}); "
             f"wall {wall:.2f}s from starting serve; {100 * r['vs_nbdcopy']:.0f}% of nbdcopy")
    if not r["all_bytes"]:
        progress(f"async:   warning: the initial sync conveyed {r['bytes']} bytes, not {size}")
    return r


def _link_facts(rep: dict) -> dict:
    """What says whether a cycle ran in one go: a link lost and resumed shows here."""
    return {k: rep.get(k) for k in ("connects", "links_lost", "last_error", "cycles",
                                    "bytes_conveyed", "regions_conveyed", "chunks_refused",
                                    "last_cycle")}


# -- the delta ---------------------------------------------------------------------------

def delta_cycle(ctx: Context, pair: Pair, size: int) -> dict:
    import nbd

    pair.wait_state("in-sync", 60, "before the delta")
    # Steady state: the initial sync left gigabytes dirty in the page cache on both sides;
    # their writeback would share the disk with the delta's syncs (runs swung 0.17-0.92 s)
    t0 = time.perf_counter()
    os.sync()
    synced_s = time.perf_counter() - t0
    st = pair.status()
    region_size, regions = st["region_size"], st["regions"]
    k = max(1, round(regions * DELTA_FRACTION))
    chosen = sorted(random.Random(12).sample(range(regions), k))
    progress(f"async: delta: writing {k} of {regions} regions ({_size(region_size)} each, "
             "scattered) with new random bytes")
    expected = 0
    h = nbd.NBD()
    h.connect_uri(pair.uri)
    try:
        for region in chosen:
            off = region * region_size
            n = min(region_size, size - off)
            h.pwrite(os.urandom(n), off)
            expected += n
        h.flush()
    finally:
        h.shutdown()
    before = pair.link()
    cow0 = pair.status("secondary").get("cow_regions_copied")
    progress("async: delta: nbdmirror sync --wait")
    s = pair.sync_wait(120, "the delta cycle")
    rep, number = s["link"], int(s["sync"]["cycle"])
    last = rep.get("last_cycle")
    r: dict = {"regions_changed": k, "regions": regions, "region_size": region_size,
               "marked_before": before.get("marked_regions"), "cycle": number,
               "expected_bytes": expected, "sync_wall_s": s["wall_s"],
               "writeback_before_s": round(synced_s, 2),
               "sync_json": s["sync"]}
    if last and last.get("number") == number:
        r |= {"timed_by": "server", "seconds": last["seconds"], "bytes": last["bytes"],
              "conveyed_regions": last["regions"]}
    else:
        r |= {"timed_by": "wall", "seconds": s["wall_s"],
              "bytes": rep["bytes_conveyed"] - before.get("bytes_conveyed", 0),
              "conveyed_regions": rep.get("regions_conveyed", 0)
              - before.get("regions_conveyed", 0)}
    if (rep.get("links_lost") or 0) > (before.get("links_lost") or 0) and \
            r["timed_by"] == "server":  # resumed: the server's figures cover the last stretch
        r |= {"timed_by": "wall", "seconds": s["wall_s"],
              "bytes": rep["bytes_conveyed"] - before.get("bytes_conveyed", 0)}
    r["bytes_match"] = r["bytes"] == expected
    # the same again with nothing written: what any cycle costs (take, commit, the
    # secondary's snapshot of it)
    e = pair.sync_wait(60, "an empty cycle")
    last = e["link"].get("last_cycle")
    if last and last.get("number") == int(e["sync"]["cycle"]):
        r["empty_cycle_s"], r["empty_cycle_bytes"] = last["seconds"], last["bytes"]
    else:
        r["empty_cycle_s"], r["empty_cycle_bytes"] = None, None
    cow1 = pair.status("secondary").get("cow_regions_copied")
    if cow0 is not None and cow1 is not None:  # into its snapshot of the previous cycle
        r["secondary_cow_regions"] = cow1 - cow0
    progress(f"async:   cycle {number}: {r['bytes']:,} bytes conveyed (expected "
             f"{expected:,}: {'match' if r['bytes_match'] else 'MISMATCH'}) in "
             f"{r['seconds']:.3f}s ({r['timed_by']}); sync --wait {s['wall_s']:.2f}s wall"
             + ("" if r["empty_cycle_s"] is None
                else f"; an empty cycle after it: {r['empty_cycle_s']:.3f}s"))
    return r


# -- host writes -------------------------------------------------------------------------

class IdleBusyLoop:
    """A process spinning at SCHED_IDLE (it runs only on a CPU nothing else wants) while
    the block runs: what anything running beside the host costs on this machine, a
    reference for the rows under cycles (whose conveyor and secondary run beside it)."""

    CODE = ("import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
            "while True:\n    pass\n")

    def __enter__(self) -> IdleBusyLoop:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def host_writes(ctx: Context, pair: Pair, size: int, cycles: bool,
                busy: bool = False, idle_mirror: bool = False) -> dict:
    args = ctx.args
    specs = {
        "write_1m": dict(bs=MIB, iodepth=4, rw="write", runtime=args.runtime),
        "randwrite_4k": dict(bs=4096, iodepth=args.iodepth, rw="randwrite",
                             runtime=args.runtime, ramp=args.ramp),
    }
    how = ("async, cycles back to back" if cycles else
           "async, no cycle under way" if idle_mirror else
           "plain serve beside an idle busy loop" if busy else "plain serve")
    out: dict = {}
    for key, what, unit in HOST_LOADS:
        tag = f"async: {what} ({how})"
        os.sync()
        read_once_in_pages(pair.primary / "data.img")
        if (cycles or idle_mirror) and pair.secondary is not None:
            read_once_in_pages(pair.secondary / "data.img")
        progress(tag)
        driver = (BackToBackCycles(pair) if cycles else IdleBusyLoop() if busy
                  else contextlib.nullcontext())
        link0 = pair.link() if cycles else {}
        cow0 = pair.status("secondary").get("cow_regions_copied") if cycles else None
        with driver:
            t0 = time.monotonic()
            r = fio_write(pair, size=size, what=tag, **specs[key])
            t1 = time.monotonic()
        stopped = time.monotonic()  # the cycle under way when fio ended has committed
        r["value"] = r["mibs"] if unit == "MiB/s" else r["value"]
        r["unit"] = unit
        if cycles:
            assert isinstance(driver, BackToBackCycles)
            if driver.error:
                raise BenchError(f"async: {what}: the cycles: {driver.error}")
            r["cycles"] = driver.summary(t0, t1)
            r["cycles"]["total_bytes_conveyed"] = (pair.link().get("bytes_conveyed", 0)
                                                   - link0.get("bytes_conveyed", 0))
            cow1 = pair.status("secondary").get("cow_regions_copied")
            if cow0 is not None and cow1 is not None:
                r["cycles"]["secondary_cow_regions"] = cow1 - cow0
        ctx.show(tag, r, unit)
        if cycles:
            c = r["cycles"]
            # what fio wrote since the last cycle took its marks: one more, before the next
            t2 = time.monotonic()
            pair.sync_wait(120 + size / MIB / 10, f"after {what}")
            c["last_cycle_after_fio_s"] = round(stopped - t1, 2)
            c["catch_up_s"] = round(time.monotonic() - t2, 2)
            progress(f"async:   {c['cycles']} cycles, one under way {100 * c['busy_fraction']:.0f}"
                     f"% of fio's run, {fmt_size(c['bytes_conveyed'])} conveyed; after fio: "
                     f"{c['last_cycle_after_fio_s']:.1f}s until the cycle under way "
                     f"committed, {c['catch_up_s']:.1f}s for one more (sync --wait)")
        out[key] = r
    return out


# -- the bitmap scan ---------------------------------------------------------------------

def scan_maps(n: int) -> dict[str, np.ndarray]:
    # np.full, not np.zeros: every page written, as a real map's are (an untouched
    # np.zeros array reads the shared zero page)
    rng = np.random.default_rng(7)
    runs = np.full(n, 0, dtype=np.uint8)
    want = n // 100
    while int(np.count_nonzero(runs)) < want:  # runs of 1..64 entries at random places
        starts = rng.integers(0, n, size=max(1, (want - int(np.count_nonzero(runs))) // 32))
        lengths = rng.integers(1, 65, size=starts.size)
        for s, ln in zip(starts.tolist(), lengths.tolist(), strict=True):
            runs[s:s + ln] = 1
    singles = np.full(n, 0, dtype=np.uint8)
    singles[rng.choice(n, size=want, replace=False)] = 1
    return {"1% in runs": runs, "1% single entries": singles,
            "all clear": np.full(n, 0, dtype=np.uint8), "all set": np.full(n, 1, dtype=np.uint8)}


def bitmap_scan() -> dict:
    from volume_core import native

    progress(f"async: bitmap scan of {SCAN_REGIONS >> 20}M-entry maps, C and numpy")
    out: dict = {"regions": SCAN_REGIONS, "repeat": SCAN_REPEAT, "maps": [],
                 "c_available": native.c_backend is not None,
                 "c_import_error": native.C_IMPORT_ERROR}
    impls = [("numpy", native.twin.scan_runs)]
    if native.c_backend is not None:
        impls.insert(0, ("c", native.c_backend.scan_runs))
    for name, m in scan_maps(SCAN_REGIONS).items():
        row: dict = {"map": name, "set": int(np.count_nonzero(m))}
        results = {}
        for impl, fn in impls:
            fn(m)  # once untimed: the result's pages, the code
            times = []
            for _ in range(SCAN_REPEAT):
                t0 = time.perf_counter()
                got = fn(m)
                times.append(time.perf_counter() - t0)
            results[impl] = got
            row[f"{impl}_ms"] = round(1000 * statistics.median(times), 3)
            row[f"{impl}_min_ms"] = round(1000 * min(times), 3)
        row["runs"] = int(results["numpy"].shape[0])
        if "c" in results:
            if not np.array_equal(results["c"], results["numpy"]):
                raise BenchError(f"bitmap scan: C and numpy disagree on the {name!r} map")
            row["speedup"] = round(row["numpy_ms"] / max(row["c_ms"], 1e-6), 1)
        out["maps"].append(row)
        progress(f"async:   {name}: {row['runs']:,} runs; "
                 + (f"C {row['c_ms']:.2f} ms, " if "c_ms" in row else "")
                 + f"numpy {row['numpy_ms']:.2f} ms")
    return out


# -- goals and the table -----------------------------------------------------------------

def check_goals(section: dict) -> list[dict]:
    goals: list[dict] = []
    later: list[dict] = []  # the capped runs' goals, after the uncapped ones
    for key, text, kind, bound in GOALS:
        g: dict = {"goal": text, "key": key, "bound": bound, "measured": None,
                   "status": "SKIP"}
        if key == "initial":
            g["measured"] = section["initial"]["vs_nbdcopy"]
            g["timed_by"] = section["initial"]["timed_by"]
        elif key == "delta_time":
            g["measured"] = section["delta"]["vs_initial"]
            g["timed_by"] = section["delta"]["timed_by"]
        else:
            plain = section["host_plain"][key]["value"]
            g["measured"] = round(section["host_async"][key]["value"] / plain, 3) if plain \
                else None
            capped = section.get("host_capped")
            if capped is not None and plain:
                later.append({
                    "goal": text.replace("cycles", f"cycles at --max-rate "
                                         f"{section['max_rate']}"),
                    "key": f"{key}_capped", "bound": bound, "status": "PASS"
                    if capped[key]["value"] / plain >= bound else "MISS",
                    "measured": round(capped[key]["value"] / plain, 3)})
        if g["measured"] is not None:
            ok = g["measured"] >= bound if kind == "ratio" else g["measured"] < bound
            g["status"] = "PASS" if ok else "MISS"
        goals.append(g)
    goals += later
    i = section["initial"]
    goals.append({"goal": "the initial sync conveyed the whole volume",
                  "key": "initial_bytes", "status": "PASS" if i["all_bytes"] else "FAIL",
                  "measured": i["bytes"], "bound": section["size"]})
    d = section["delta"]
    goals.append({"goal": "the 1% delta cycle conveyed exactly the changed regions' bytes",
                  "key": "delta_bytes", "status": "PASS" if d["bytes_match"] else "FAIL",
                  "measured": d["bytes"], "bound": d["expected_bytes"]})
    return goals


def _size(n: int) -> str:
    return fmt_size(n) if n >= MIB else f"{n >> 10}K"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def render(section: dict) -> str:
    size = section["size"]
    i, n, d = section["initial"], section["nbdcopy"], section["delta"]
    out = [f"{fmt_size(size)} volume, loopback, every server -t {section['threads']}; async "
           f"serve --interval 0 (cycles on request)"]
    srv = i["how"]
    if "pass_s" in i:
        srv += (f": pass {i['pass_s']:.2f}s, {i['pass_bytes'] / MIB:,.0f} MiB; cycle 1 "
                f"{i['cycle1_s']:.3f}s, {i['cycle1_bytes'] / MIB:,.0f} MiB")
    rows = [["copy", "MiB", "s", "MiB/s", "vs nbdcopy", "wall s", "wall MiB/s"],
            ["nbdcopy, file -> file exports", f"{size / MIB:,.0f}", f"{n['seconds']:.2f}",
             f"{n['value']:,.0f}", "-", f"{n['seconds']:.2f}", f"{n['value']:,.0f}"],
            ["async initial sync", f"{i['bytes'] / MIB:,.0f}", f"{i['seconds']:.2f}",
             f"{i['value']:,.0f}", _pct(i["vs_nbdcopy"]), f"{i['wall_s']:.2f}",
             f"{i['wall_mibs']:,.0f}"]]
    out += ["", f"initial sync (s: primary's {srv}; wall: from starting serve to the commit "
            "of cycle 1 seen, "
            f"serve itself {i['serve_s']:.2f}s; both primed: destination written once, "
            f"source read once; CPU s since start: primary {i['primary_cpu_s'] or 0:.1f}, "
            f"secondary {i['secondary_cpu_s'] or 0:.1f}):", table(rows)]
    rows = [["delta", "regions", "of", "region", "expected B", "conveyed B", "match",
             "cycle s", "vs initial", "sync --wait wall s", "empty cycle s"],
            [f"cycle {d['cycle']}", f"{d['regions_changed']:,}", f"{d['regions']:,}",
             _size(d["region_size"]),
             f"{d['expected_bytes']:,}", f"{d['bytes']:,}",
             "yes" if d["bytes_match"] else "NO", f"{d['seconds']:.3f}",
             "-" if d["vs_initial"] is None else f"{100 * d['vs_initial']:.1f}%",
             f"{d['sync_wall_s']:.2f}",
             "-" if d.get("empty_cycle_s") is None else f"{d['empty_cycle_s']:.3f}"]]
    out += ["", f"delta after {100 * section['delta_fraction']:g}% of the regions changed "
            f"(cycle s: {'last_cycle.seconds' if d['timed_by'] == 'server' else 'WALL time'}"
            "; vs initial: of the initial sync's s; empty cycle: one more right after, with "
            "nothing written):", table(rows)]
    rows = [["host writes", "plain", "async", "async/plain", "cycles", "cycle under way",
             "conveyed MiB", "p50 ms plain/async", "p99 ms plain/async",
             "CPU% plain/async pri+sec"]]
    runs = [("host_async", "")]
    if section.get("host_capped") is not None:
        runs.append(("host_capped", f", --max-rate {section['max_rate']}"))
    for (key, _, unit), (which, how) in itertools.product(HOST_LOADS, runs):
        p, a = section["host_plain"][key], section[which][key]
        c = a["cycles"]
        label = (f"1M seq qd4 ({unit})" if key == "write_1m"
                 else f"4K rand qd{section['iodepth']} ({unit})") + how
        rows.append([label, f"{p['value']:,.0f}", f"{a['value']:,.0f}",
                     _pct(a["value"] / p["value"] if p["value"] else None),
                     str(c["cycles"]), _pct(c["busy_fraction"]),
                     f"{c['bytes_conveyed'] / MIB:,.0f}",
                     f"{p['lat_p50_us'] / 1000:.2f}/{a['lat_p50_us'] / 1000:.2f}",
                     f"{p['lat_p99_us'] / 1000:.2f}/{a['lat_p99_us'] / 1000:.2f}",
                     f"{p.get('primary_cpu_pct', 0):.0f}/{a.get('primary_cpu_pct', 0):.0f}"
                     f"+{a.get('secondary_cpu_pct', 0):.0f}"])
    others = (("host_idle_mirror", ", async with no cycle under way", True),
              ("host_plain_busy", ", plain beside an idle busy loop", False))
    for (which, how, sec), (key, _, unit) in itertools.product(others, HOST_LOADS):
        if not section.get(which):
            continue
        p, a = section["host_plain"][key], section[which][key]
        label = (f"1M seq qd4 ({unit})" if key == "write_1m"
                 else f"4K rand qd{section['iodepth']} ({unit})")
        rows.append([label + how, f"{p['value']:,.0f}",
                     f"{a['value']:,.0f}", _pct(a["value"] / p["value"] if p["value"] else None),
                     "-", "-", "-",
                     f"{p['lat_p50_us'] / 1000:.2f}/{a['lat_p50_us'] / 1000:.2f}",
                     f"{p['lat_p99_us'] / 1000:.2f}/{a['lat_p99_us'] / 1000:.2f}",
                     f"{p.get('primary_cpu_pct', 0):.0f}/{a.get('primary_cpu_pct', 0):.0f}"
                     + (f"+{a.get('secondary_cpu_pct', 0):.0f}" if sec else "")])
    busy_from = section["host_async"]["randwrite_4k"]["cycles"]["busy_from"]
    out += ["", f"host writes, fio {section['runtime']:g}s each (4K: after a "
            f"{section['ramp']:g}s ramp), same volume: async with cycles back to back, then "
            f"a plain serve (cycle under way: share of fio's run, from {busy_from}); the "
            "async serve connected with no cycle under way (run before the plain serve: "
            "what being mirrored costs a write between cycles); last, the plain serve "
            "beside a process spinning at SCHED_IDLE (it runs only where nothing else "
            "wants the CPU): what anything running beside the host costs on this machine, "
            "a reference for the rows under cycles:",
            table(rows)]
    b = section["bitmap"]
    rows = [["map", "set", "runs", "C ms", "numpy ms", "speedup"]]
    for m in b["maps"]:
        rows.append([m["map"], f"{m['set']:,}", f"{m['runs']:,}",
                     f"{m['c_ms']:.2f}" if "c_ms" in m else "n/a", f"{m['numpy_ms']:.2f}",
                     f"{m['speedup']:.1f}x" if "speedup" in m else "-"])
    out += ["", f"bitmap scan_runs, {b['regions'] >> 20}M-entry map (median of {b['repeat']}; "
            "C and numpy results checked equal)"
            + ("" if b["c_available"] else f"; C helper unavailable: {b['c_import_error']}")
            + ":", table(rows)]
    out += ["", "secondary == primary after the last cycle (both stopped, qemu-img compare "
            "of the data files): " + ("yes" if section["compare"].get("identical") else "NO")]
    for g in section["goals"]:
        if g["key"] in ("delta_bytes", "initial_bytes"):
            have = f"conveyed {g['measured']:,} B, expected {g['bound']:,} B"
        elif g["measured"] is None:
            have = "n/a"
        else:
            have = f"measured {100 * g['measured']:.1f}%" if g["key"] == "delta_time" else \
                f"measured {100 * g['measured']:.0f}%"
            if g.get("timed_by") == "wall":
                have += ", from WALL times: the server gave no last_cycle"
        out.append(f"{g['status']}: {g['goal']} ({have})")
    return "\n".join(out)
