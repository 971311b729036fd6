"""The threads topic: what nbdkit's thread count (-t) does to a Python plugin.

For each target (default nbdmirror and the pass-through plugin) and each thread count
(--thread-counts, default 1,2,4,8,16), on a fresh backing file:

  seq write     nbdcopy --flush, MiB/s (as in the base topic)
  randwrite     fio 4K random writes, iodepth --iodepth: IOPS, latency median and p99
  randread      fio 4K random reads from a cold page cache: with one thread per connection
                the disk sees one read at a time
  + flush       4K random writes with a flush (NBD_CMD_FLUSH, fdatasync in the server) after
                every --flush-every writes (fio --fsync=N) on the same connection: with
                one thread, the flush blocks every request queued behind it; with more,
                the others go on while it syncs. A FUA write is a write plus the same
                fdatasync inside one request (fio's nbd engine cannot send FUA).

The Python plugin runs every request under the GIL; nbdkit's threads contend for it, and
each hand-off costs context switches. --repeat N rotates the order and reports medians.
"""

from __future__ import annotations

from benchlib.context import Context
from benchlib.procs import progress
from benchlib.report import fmt_size, median_entry, table

TITLE = "nbdkit threads per connection"
DEFAULT_TARGETS = ("nbdmirror", "passthrough")
DEFAULT_COUNTS = (1, 2, 4, 8, 16)
#: a thread count is acceptable only if its sequential write is at least this share of
#: the baseline's (single runs scatter by about 5%)
SEQ_TOLERANCE = 0.95
METRICS = {
    "seq_write": ("seq write", "MiB/s"),
    "randwrite_4k": ("4K randwrite", "IOPS"),
    "randwrite_4k_flush": ("4K randwrite + flush", "IOPS"),
    "randread_4k": ("4K randread, cold", "IOPS"),
}


def measure(ctx: Context) -> dict:
    args, bench = ctx.args, ctx.bench
    targets = [t for t in (args.targets or DEFAULT_TARGETS) if t != "raw"]
    counts = args.thread_counts
    flush_opt = (f"--fsync={args.flush_every}",)
    # (metric, progress line, result label, measurement), in the order they run
    runs = (
        ("seq_write", f"seq write {fmt_size(ctx.size)}", "seq write", bench.seq_write),
        ("randwrite_4k", f"4K randwrite, iodepth {args.iodepth}", "randwrite",
         bench.randwrite),
        ("randwrite_4k_flush", f"4K randwrite, flush every {args.flush_every} writes",
         "randwrite + flush", lambda served: bench.randwrite(served, extra=flush_opt)),
        ("randread_4k", "4K randread, caches dropped", "randread", bench.randread),
    )
    samples = {t: {n: {m: [] for m in METRICS} for n in counts} for t in targets}
    for rep in range(args.repeat):
        k = rep % len(counts)
        for n in counts[k:] + counts[:k]:
            for target in targets if rep % 2 == 0 else targets[::-1]:
                tag = f"{target} -t {n}" + (f" (run {rep + 1}/{args.repeat})"
                                            if args.repeat > 1 else "")
                with ctx.fresh(target, threads=n)(f"{target}.t{n}.{rep + 1}") as served:
                    for metric, what, shown, run in runs:
                        progress(f"{tag}: {what}")
                        r = run(served)
                        samples[target][n][metric].append(r)
                        ctx.show(f"{tag} {shown}", r, METRICS[metric][1])
    results = {t: {str(n): {m: median_entry(runs, METRICS[m][1])
                            for m, runs in by_metric.items() if runs}
                   for n, by_metric in by_count.items()}
               for t, by_count in samples.items()}
    baseline = ctx.threads if ctx.threads in counts else max(counts)
    return {"targets": targets, "counts": counts, "flush_every": args.flush_every,
            "baseline": baseline, "results": results,
            "best": {t: best_count(results[t], baseline) for t in targets}}


def best_count(by_count: dict, baseline: int) -> dict:
    """The count with the most 4K IOPS among those whose seq write holds up against the
    baseline's, with both ratios to the baseline."""
    base = by_count[str(baseline)]
    seq0 = base["seq_write"]["value"]
    ok = {n: r for n, r in by_count.items()
          if r["seq_write"]["value"] >= SEQ_TOLERANCE * seq0}
    n, r = max(ok.items(), key=lambda kv: kv[1]["randwrite_4k"]["value"])
    return {"threads": int(n),
            "randwrite_vs_baseline": round(r["randwrite_4k"]["value"]
                                           / base["randwrite_4k"]["value"], 3),
            "seq_write_vs_baseline": round(r["seq_write"]["value"] / seq0, 3)}


def render(section: dict) -> str:
    rows = [["target", "-t", "4K IOPS", "p50 us", "p99 us", "CPU us/op", "seq MiB/s",
             "+flush IOPS", "+flush p99 us", "flush ms", "randread IOPS"]]
    for t in section["targets"]:
        for n in section["counts"]:
            r = section["results"][t][str(n)]
            w, f, s, rr = (r["randwrite_4k"], r["randwrite_4k_flush"], r["seq_write"],
                           r["randread_4k"])
            rows.append([t, str(n), f"{w['value']:,.0f}", f"{w['lat_p50_us']:,.0f}",
                         f"{w['lat_p99_us']:,.0f}", f"{w.get('server_cpu_us_per_op', 0):.1f}",
                         f"{s['value']:,.0f}", f"{f['value']:,.0f}", f"{f['lat_p99_us']:,.0f}",
                         f"{f.get('flush_lat_mean_us', 0) / 1000:.2f}", f"{rr['value']:,.0f}"])
    out = [f"flush every {section['flush_every']} writes in '+flush'; medians", table(rows)]
    for t, b in section["best"].items():
        out.append(f"{t}: most 4K IOPS with seq write >= {SEQ_TOLERANCE:.0%} of -t "
                   f"{section['baseline']}: -t {b['threads']} "
                   f"({b['randwrite_vs_baseline']:.2f}x IOPS, "
                   f"{b['seq_write_vs_baseline']:.2f}x seq write)")
    return "\n".join(out)
