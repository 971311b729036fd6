"""The base topic: nbdmirror against a bare Python plugin, nbdkit's file plugin and raw I/O.

Per target and repetition, on one fresh backing file: seq write (nbdcopy), a spot
check of the data, seq read from a cold cache (nbdcopy), 4K random writes (fio),
after the seq write so every region is already marked (steady state). With
--fresh-randwrite, also 4K random writes on a never-written file first (the price of
first-touch marking). --repeat N rotates the order of the targets on each pass and
reports medians. Its figures sit at the top level of the results (schema 1).
"""

from __future__ import annotations

from benchlib.context import Context
from benchlib.procs import progress
from benchlib.profile import profile_randwrite, render_profile
from benchlib.report import RESULTS_DIR, fmt_size, fmt_value, median_entry, table
from benchlib.targets import ALL_TARGETS

TITLE = "base targets"
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
PROFILED = ("nbdmirror", "passthrough")


def measure(ctx: Context) -> dict:
    args, bench = ctx.args, ctx.bench
    targets = list(args.targets or ALL_TARGETS)
    metrics = ["seq_write", "seq_read", "randwrite_4k"]
    if args.fresh_randwrite:
        metrics.append("randwrite_4k_fresh")
    samples: dict[str, dict[str, list[dict]]] = {t: {m: [] for m in metrics}
                                                 for t in targets}
    for rep in range(args.repeat):
        # Rotate the order on each repetition so that no target is always first or last.
        k = rep % len(targets)
        for target in targets[k:] + targets[:k]:
            fresh = ctx.fresh(target)
            tag = target + (f" (run {rep + 1}/{args.repeat})" if args.repeat > 1 else "")
            if args.fresh_randwrite:
                with fresh(f"{target}.fresh.{rep + 1}") as served:
                    progress(f"{tag}: 4K randwrite on a fresh backing file")
                    r = bench.randwrite(served)
                    samples[target]["randwrite_4k_fresh"].append(r)
                    ctx.show(f"{tag} randwrite fresh", r, "IOPS")
            with fresh(f"{target}.{rep + 1}") as served:
                progress(f"{tag}: seq write {fmt_size(ctx.size)}")
                r = bench.seq_write(served)
                samples[target]["seq_write"].append(r)
                ctx.show(f"{tag} seq write", r, "MiB/s")
                bench.verify(served)
                progress(f"{tag}: seq read {fmt_size(ctx.size)} (caches dropped)")
                r = bench.seq_read(served)
                samples[target]["seq_read"].append(r)
                ctx.show(f"{tag} seq read", r, "MiB/s")
                progress(f"{tag}: 4K randwrite, iodepth {args.iodepth}, "
                         f"{args.ramp:g}+{args.runtime:g}s")
                r = bench.randwrite(served)
                samples[target]["randwrite_4k"].append(r)
                ctx.show(f"{tag} randwrite", r, "IOPS")
                progress(f"{tag}: stopping")
    results = {t: {m: median_entry(runs, METRICS[m][1]) for m, runs in by_metric.items()
                   if runs}
               for t, by_metric in samples.items()}
    section = {"targets": targets, "results": results, "ratios": compute_ratios(results),
               "goals": check_goals(results)}
    if args.profile:
        section["profile"] = profile(ctx)
    return section


def profile(ctx: Context) -> dict:
    out = {}
    targets = ctx.args.targets or ALL_TARGETS
    for target in [t for t in PROFILED if t in targets] or ["nbdmirror"]:
        with ctx.fresh(target)(f"{target}.profile") as served:
            progress(f"profile: filling {target} (seq write, unmeasured)")
            ctx.bench.seq_write(served)
            ctx.bench.drop_caches()
            progress(f"profile: py-spy on the {target} server during 4K randwrite")
            out[target] = profile_randwrite(ctx.bench, target, served, RESULTS_DIR, ctx.stamp,
                                            duration=min(ctx.args.runtime, 10))
    return out


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


def render(section: dict) -> str:
    targets, res = section["targets"], section["results"]
    metrics = [m for m in METRICS if any(m in res[t] for t in targets)]
    rows = [["metric"] + targets]
    for m in metrics:
        label, unit = METRICS[m]
        rows.append([f"{label} ({unit})"] + [fmt_value(res[t].get(m, {}).get("value"), unit)
                                             for t in targets])
    for m in [m for m in metrics if m.startswith("randwrite")]:
        for key, what, f in (("server_cpu_us_per_op", "server CPU (us/op)", "{:.1f}"),
                             ("server_sys_us_per_op", "server kernel CPU (us/op)", "{:.1f}"),
                             ("context_switches_per_op", "context switches/op", "{:.1f}"),
                             ("lat_p50_us", "median latency (us)", "{:.0f}"),
                             ("lat_p99_us", "p99 latency (us)", "{:.0f}")):
            vals = [res[t].get(m, {}).get(key) for t in targets]
            if any(v is not None for v in vals):
                rows.append([f"{METRICS[m][0]}: {what}"] +
                            ["-" if v is None else f.format(v) for v in vals])
    out = [table(rows), ""]
    if section["ratios"]:
        rrows = [["ratio"] + [METRICS[m][0] for m in metrics]]
        for name, r in section["ratios"].items():
            rrows.append([name] + ["-" if r.get(m) is None else f"{100 * r[m]:.0f}%"
                                   for m in metrics])
        out += [table(rrows), ""]
    for g in section["goals"]:
        have = "n/a" if g["ratio"] is None else f"{100 * g['ratio']:.0f}%"
        out.append(f"{g['status']}: {g['goal']} (measured {have})")
    if section.get("profile"):
        out += [""] + render_profile(section["profile"])
    return "\n".join(out)
