"""Benchmark nbdmirror against a bare Python plugin, nbdkit's file plugin and raw file I/O.

    scripts/bench [--topics base,snapshots,threads,replication,async] [--size 1G]
                  [--async-size 2G] [--repeat N] [--quick] [--json]

Topics (--topics, default base,snapshots), each a scripts/bench_<topic>.py module:

  base       nbdmirror, nbdmirror-nodurable, passthrough, file and raw: seq write and cold
             seq read (nbdcopy), 4K random writes (fio); ratios and goals
  snapshots  copy-on-write cost and snapshot creation time
  threads    nbdkit -t 1..16 for nbdmirror and the pass-through plugin: 4K random-write
             IOPS and latency, seq write, and 4K random writes with periodic flushes
             (--threads-sweep is short for --topics threads)
  replication
             none, semi-async and sync (--modes) on loopback and on a 1 Gbit/s, 2 ms RTT
             link between network namespaces (--links): seq write, 4K random writes,
             1 MiB write latency; a resync (--resync-size) alone and sharing the link with
             host writes; the replication goals; both volumes compared after each mode
             (needs root: ip netns, tc)
  async      async mirroring on loopback (serve --mode async --interval 0), one pair of
             --async-size volumes: the initial sync against nbdcopy between two nbdkit
             file exports, a delta cycle after 1% of the regions changed (bytes conveyed
             checked), fio 1M and 4K writes under back-to-back cycles against the same
             volume served plain, the C and numpy bitmap scan of a 16M-entry map; goals;
             both volumes compared (run alone, --size defaults to --async-size)

Targets, each on a fresh sparse backing file of --size bytes under --workdir:

  nbdmirror            ``nbdmirror create`` + ``nbdmirror serve --background`` (the real CLI)
  nbdmirror-nodurable  the same nbdkit command line plus ``durable-marks=0``
  passthrough          scripts/passthrough_plugin.py under nbdkit: the ceiling of a Python plugin
  file                 nbdkit's C file plugin
  raw                  the file itself, no NBD (dd, nbdcopy and fio on the file)

Every nbdkit runs --server-threads threads (default: nbdmirror serve's default) unless the
topic varies them. Caches are dropped before every measurement, and the sequential ones
start after writing and syncing --size bytes to a scratch file (see benchlib/measure.py).
Every measurement records how much CPU other processes used meanwhile and warns when that
was more than 10% of a CPU: decide with --repeat 3 and medians.

Results go to bench-results/latest.json and a timestamped copy; --json also prints them.
Every server started here is stopped on the way out, including on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import bench_async
import bench_base
import bench_replication
import bench_snapshots
import bench_threads
from benchlib.context import Context
from benchlib.cpu import cpu_busy, load_average
from benchlib.measure import Bench, make_source
from benchlib.procs import REPO, BenchError, progress, shielded
from benchlib.report import MIB, fmt_size, parse_size, timestamp, write_results
from benchlib.targets import ALL_TARGETS, default_threads

#: name -> module with TITLE, measure(ctx) -> section, render(section) -> str
TOPICS = {"base": bench_base, "snapshots": bench_snapshots, "threads": bench_threads,
          "replication": bench_replication, "async": bench_async}
DEFAULT_TOPICS = ("base", "snapshots")
DEFAULT_WORKDIR = Path("/var/tmp/nbdmirror-bench")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--topics", default=None,
                   help=f"comma-separated subset of {','.join(TOPICS)} "
                   f"(default {','.join(DEFAULT_TOPICS)})")
    p.add_argument("--threads-sweep", action="store_true", help="short for --topics threads")
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
    p.add_argument("--targets", default=None,
                   help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default: all for "
                   f"base, {','.join(bench_threads.DEFAULT_TARGETS)} for threads)")
    p.add_argument("--server-threads", type=int, default=None,
                   help="nbdkit threads per connection for every server (default: nbdmirror "
                   "serve's default); the threads topic varies them")
    p.add_argument("--thread-counts", default=None,
                   help="threads topic: the nbdkit -t values to measure (default "
                   f"{','.join(map(str, bench_threads.DEFAULT_COUNTS))}); replication "
                   "topic: the serve --threads values to measure per mode (default: "
                   "serve's own default for each mode, or --server-threads)")
    p.add_argument("--flush-every", type=int, default=256,
                   help="threads topic: writes between flushes in the '+flush' run "
                   "(default 256)")
    p.add_argument("--modes", default=",".join(bench_replication.DEFAULT_MODES),
                   help="replication topic: modes to measure, a subset of "
                   f"{','.join(bench_replication.MODES)} (default all)")
    p.add_argument("--links", default=",".join(bench_replication.DEFAULT_LINKS),
                   help="replication topic: links to measure on, a subset of "
                   f"{','.join(bench_replication.LINKS)} (default all)")
    p.add_argument("--resync-size", type=parse_size,
                   help="replication topic: bytes written while the secondary is down, "
                   "then resynced (default --size)")
    p.add_argument("--async-size", type=parse_size,
                   help="async topic: size of the mirrored volume (default 2G; 256M with "
                   "--quick); when async is the only topic it is also --size's default")
    p.add_argument("--async-max-rate", default="20M",
                   help="async topic: host writes under back-to-back cycles are measured "
                        "again with serve --max-rate this (default 20M: a cap that binds "
                        "for both loads here; DRBD's default c-max-rate, 100M, does not "
                        "bind for 4K writes, whose cycles convey 50-70 MiB/s; 'none' "
                        "skips that run)")
    p.add_argument("--fresh-randwrite", action="store_true",
                   help="base: also measure randwrite on a never-written backing file")
    p.add_argument("--profile", action="store_true",
                   help="base: afterwards py-spy the nbdmirror and passthrough servers during "
                   "an extra randwrite each and add their top frames to the results")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help=f"where test data goes (default {DEFAULT_WORKDIR}; use a disk, "
                   "not tmpfs)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-snapshots", dest="snapshots", action="store_false",
                   help="skip the snapshots topic")
    p.add_argument("--json", action="store_true", help="print the JSON results to stdout")
    args = p.parse_args(argv)
    args.async_size = args.async_size or (256 * MIB if args.quick else 2 << 30)
    topics = args.topics or ("threads" if args.threads_sweep else ",".join(DEFAULT_TOPICS))
    if args.size is None and [t.strip() for t in topics.split(",") if t.strip()] == ["async"]:
        args.size = args.async_size  # one random source file for the run, not two
    args.size = args.size or (128 * MIB if args.quick else 1 << 30)
    args.runtime = args.runtime if args.runtime is not None else (4 if args.quick else 15)
    args.ramp = args.ramp if args.ramp is not None else (0 if args.quick else 2)
    args.topics = [t.strip() for t in topics.split(",") if t.strip()]
    if not args.snapshots and "snapshots" in args.topics:
        args.topics.remove("snapshots")
    bad = [t for t in args.topics if t not in TOPICS]
    if bad or not args.topics:
        p.error(f"unknown topic(s) {', '.join(bad) or '(none)'}; choose from {','.join(TOPICS)}")
    if args.targets is not None:
        args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        bad = [t for t in args.targets if t not in ALL_TARGETS]
        if bad or not args.targets:
            p.error(f"unknown target(s) {', '.join(bad) or '(none)'}; "
                    f"choose from {','.join(ALL_TARGETS)}")
    args.thread_counts_given = args.thread_counts is not None
    if args.thread_counts is None:
        args.thread_counts = ",".join(map(str, bench_threads.DEFAULT_COUNTS))
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.links = [x.strip() for x in args.links.split(",") if x.strip()]
    for what, given, known in (("mode", args.modes, bench_replication.MODES),
                               ("link", args.links, bench_replication.LINKS)):
        bad = [x for x in given if x not in known]
        if bad or not given:
            p.error(f"unknown {what}(s) {', '.join(bad) or '(none)'}; "
                    f"choose from {','.join(known)}")
    if args.resync_size is not None and args.resync_size > args.size:
        p.error("--resync-size cannot exceed --size")
    try:
        args.thread_counts = [int(n) for n in args.thread_counts.split(",") if n.strip()]
    except ValueError:
        p.error(f"--thread-counts: not a list of numbers: {args.thread_counts!r}")
    if (args.repeat < 1 or args.runtime <= 0 or args.ramp < 0 or args.iodepth < 1
            or args.flush_every < 1 or not args.thread_counts
            or min(args.thread_counts) < 1 or (args.server_threads or 1) < 1):
        p.error("--repeat, --runtime, --iodepth, --flush-every and thread counts must be "
                "positive, --ramp >= 0")
    return args


def backing_files(args: argparse.Namespace) -> int:
    """How many --size backing files the chosen topics make."""
    n = 0
    if "base" in args.topics:
        n += len(args.targets or ALL_TARGETS) * args.repeat * (2 if args.fresh_randwrite else 1)
        n += 2 if args.profile else 0
    if "snapshots" in args.topics:
        n += 2  # the volume and its snapshots' copies
    if "threads" in args.topics:
        n += (len(args.targets or bench_threads.DEFAULT_TARGETS) * len(args.thread_counts)
              * args.repeat)
    return n


def main(argv: list[str]) -> int:
    args = parse_args(argv)

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
    notes = []
    free = shutil.disk_usage(run_dir).free
    # source + scratch + one target at a time; replication: a scratch of two copies and
    # a primary and a secondary volume
    need_min = (5 if "replication" in args.topics else 3) * args.size + 256 * MIB
    need_all = (2 + backing_files(args)) * args.size + 256 * MIB
    if "async" in args.topics:
        # its own source (unless --size is --async-size), a primary, a secondary, the
        # nbdcopy destination, and a cycle's copies on both sides
        mine = (4 + (args.async_size != args.size)) * args.async_size + 256 * MIB
        need_min, need_all = max(need_min, 2 * args.size + mine), need_all + mine
    if free < need_min:
        raise BenchError(f"{run_dir}: {free // MIB} MiB free, need about {need_min // MIB} MiB")
    # Backing files normally stay until the end of the run: on this kind of thin-provisioned
    # disk (ext4 mounted with discard) deleting a written GiB slows the writes of the next
    # several seconds, which would penalise whichever target comes next.
    delete_after = free < need_all
    if delete_after:
        notes.append(f"only {free // MIB} MiB free (all backing files need "
                     f"{need_all // MIB}): deleted each after use, which can slow the next "
                     "target's writes")
    from benchlib.report import environment

    env = environment(args.workdir)
    env["cpu_busy_at_start"] = busy = cpu_busy(1.0)
    if busy > 0.15:
        note = (f"the CPUs were {100 * busy:.0f}% busy before the run: something else is "
                "running, numbers may be low and noisy")
        progress(f"warning: {note}")
        notes.append(note)
    started = time.monotonic()
    source = run_dir / "source.bin"
    progress(f"making {fmt_size(args.size)} of random source data in {source}")
    make_source(source, args.size)
    bench = Bench(size=args.size, runtime=args.runtime, ramp=args.ramp, iodepth=args.iodepth,
                  workdir=run_dir, source=source, scratch=run_dir / "scratch.img",
                  can_drop_caches=os.geteuid() == 0, notes=notes)
    if not bench.can_drop_caches:
        bench.notes.append("not root: page caches were not dropped; reads may be warm")
    if set(args.topics) - {"async"}:  # the async topic primes its own files
        progress(f"making the {fmt_size(args.size)} scratch file for priming writes")
        bench.prime()
    threads = args.server_threads or default_threads()
    ctx = Context(args=args, bench=bench, run_dir=run_dir, threads=threads,
                  delete_after=delete_after, stamp=timestamp())
    report: dict = {
        "schema": 1,
        "config": {"topics": args.topics, "size": args.size, "runtime": args.runtime,
                   "ramp": args.ramp, "iodepth": args.iodepth, "repeat": args.repeat,
                   "targets": args.targets, "server_threads": threads,
                   "fresh_randwrite": args.fresh_randwrite, "quick": args.quick,
                   "caches_dropped_before": ["seq_write", "seq_read", "randwrite_4k"]},
        "env": env,
    }
    for name in args.topics:
        progress(f"topic: {TOPICS[name].TITLE}")
        section = TOPICS[name].measure(ctx)
        if name == "base":  # schema 1: results, ratios and goals at the top level
            report.update(section)
        else:
            report[name] = section
    disturbed = ctx.disturbance_note()
    report["notes"] = bench.notes + ([disturbed] if disturbed else [])
    report["env"]["loadavg_at_end"] = load_average()
    report["duration_s"] = round(time.monotonic() - started, 1)
    latest = write_results(report, ctx.stamp)
    progress(f"results: {latest} and {ctx.stamp}.json")
    return report


def render(report: dict) -> str:
    c = report["config"]
    out = [f"nbdmirror benchmark: {fmt_size(c['size'])}, fio {c['runtime']:g}s "
           f"x{c['repeat']} (median), iodepth {c['iodepth']}, nbdkit -t {c['server_threads']} "
           "unless varied"]
    for name in c["topics"]:
        section = report if name == "base" else report.get(name)
        if section:
            out += ["", f"== {TOPICS[name].TITLE}", TOPICS[name].render(section)]
    out.append("")
    out += [f"note: {note}" for note in report.get("notes", [])]
    out.append(f"took {report['duration_s']:.0f}s")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
