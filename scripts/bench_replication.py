"""The replication topic: what sync and semi-async replication cost the host, on two links.

Modes (--modes, default none,semi-async,sync): none is a plain ``nbdmirror serve``;
semi-async and sync are ``nbdmirror receive SEC --listen ... --background`` on a second
volume of the same size, then ``nbdmirror serve PRI --background --replicate-to ...
--mode MODE``. Every measurement starts once the primary's status says in-sync (polled,
never a fixed sleep); how long that took after it is kept as ``drain_s`` (the secondary
catching up: semi-async completes a write before its data is across), and
``replicated_mibs`` counts that time in.

Links (--links, default loopback,2ms):

  loopback  the secondary on 127.0.0.1, no proxy
  2ms       1 Gbit/s, 2 ms round trip: the primary and the secondary in two network
            namespaces, tests/fault_proxy.py between them adding 1 ms each way, the
            primary's data held to 1 Gbit/s (tc tbf) before it (see benchlib/netns.py);
            the round trip and bulk rate actually achieved are probed through the same
            path and reported

Mode none does not use a link: it is measured once, the baseline of both.

Per mode and link, on fresh volumes (fio over NBD to the primary's unix socket):

  seq write   fio 1 MiB sequential writes, iodepth 4, one pass over the volume and a
              flush (--end_fsync=1): MiB/s, the counterpart of the base topic's nbdcopy
              --flush and what the sequential goals compare
  1M qd4      the same writes for --runtime, no flush: the sustained rate (semi-async:
              once its window is full), and the reference for the resync's 1M load
  randwrite   fio 4 KiB random writes, iodepth --iodepth: IOPS, completion latency p50/p99
  1M qd1      fio 1 MiB sequential writes, iodepth 1, back to back: latency p50/p99 (in
              semi-async the data of one write is still on the link when the next comes)
  1M paced    the same at PACED_IOPS writes a second (well below the link): the latency
              of a 1 MiB write on its own, which the latency goals are about
  resync      (replicated modes) --resync-size bytes (default --size) written while the
              secondary is stopped, then the secondary started again, three times: the
              resync alone, then with 4K random writes, then with 1 MiB writes (iodepth
              4) into those same bytes: the resync's duration and rate from the primary's
              status (from the reconnect to no region out of sync), the host's IOPS or
              MiB/s over the writes that completed meanwhile (fio's per-write log), next
              to their in-sync figures

After each replicated mode both servers are stopped cleanly and ``qemu-img compare``
must find the two data files identical, or the bench fails. Thread counts: the serve
default per mode (1 unreplicated, more when replicating), --server-threads N for all,
or each of --thread-counts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import threading

from benchlib.context import Context
from benchlib.netns import Namespaces, Shape, clean_stale, probe, shaped_link
from benchlib.procs import BenchError, progress
from benchlib.replication import (
    MODES,
    POLL,
    Pair,
    ResyncWatch,
    fio_write,
    replicated_pair,
    window_stats,
)
from benchlib.report import MIB, fmt_size, median_entry, table

TITLE = "replication: none, semi-async and sync on loopback and a 2 ms link; resync"
LINKS = {"loopback": None, "2ms": Shape(rtt_ms=2.0, rate="1gbit")}
DEFAULT_MODES = MODES
DEFAULT_LINKS = tuple(LINKS)
#: 1 MiB writes a second in the paced run: 20 MiB/s, a sixth of the 2 ms link
PACED_IOPS = 20
#: seconds the primary may take to dial a restarted secondary again
RECONNECT_TIMEOUT = 30
#: the host's share during a resync, or the resync's while the host writes, below this
#: fraction of what it gets alone is called starved
STARVED = 0.10
# (key, progress text, unit): the in-sync measurements, in the order they run
MEASUREMENTS = (
    ("seq_write", "seq write: fio 1M sequential, iodepth 4, one pass + flush", "MiB/s"),
    ("write_1m_qd4", "1M sequential writes, iodepth 4, for --runtime", "MiB/s"),
    ("randwrite_4k", "4K randwrite", "IOPS"),
    ("write_1m_qd1", "1M writes, iodepth 1", "IOPS"),
    ("write_1m_paced", f"1M writes, iodepth 1, {PACED_IOPS}/s", "IOPS"),
)
RESYNC_LOADS = (
    ("alone", "resync alone", None),
    ("randwrite_4k", "resync + 4K randwrite", "randwrite_4k"),
    ("write_1m", "resync + 1M writes", "write_1m_qd4"),
)
# (text, link, mode, kind, threshold): ratio goals against mode none's seq write;
# latency goals on the paced 1 MiB writes' median, in round trips (+ transfer)
GOALS = (
    ("loopback: semi-async sequential write >= 60% of unreplicated", "loopback",
     "semi-async", "seq_ratio", 0.60),
    ("loopback: sync sequential write >= 50% of unreplicated", "loopback", "sync",
     "seq_ratio", 0.50),
    ("2 ms link: semi-async 1 MiB write median < 1.5 RTT", "2ms", "semi-async",
     "rtt", 1.5),
    ("2 ms link: sync 1 MiB write median pays RTT + transfer (< 1.5 RTT + transfer)",
     "2ms", "sync", "rtt+transfer", 1.5),
)


def thread_settings(ctx: Context) -> list[int | None]:
    """None: serve's own default for the mode."""
    args = ctx.args
    if getattr(args, "thread_counts_given", False):
        return list(args.thread_counts)
    if args.server_threads:
        return [args.server_threads]
    return [None]


def measure(ctx: Context) -> dict:
    args = ctx.args
    modes = list(getattr(args, "modes", None) or DEFAULT_MODES)
    links = list(getattr(args, "links", None) or DEFAULT_LINKS)
    resync_size = min(getattr(args, "resync_size", None) or ctx.size, ctx.size)
    settings = thread_settings(ctx)
    replicated = [m for m in modes if m != "none"]
    pairs = len(settings) * (("none" in modes) + len(replicated) * len(links))
    free = shutil.disk_usage(ctx.run_dir).free
    delete_after = ctx.delete_after or free < pairs * 2 * ctx.size + 1024 * MIB
    if delete_after and not ctx.delete_after:
        ctx.bench.notes.append(f"replication: {free // MIB} MiB free: each pair of volumes "
                               "deleted after use")
    if any(LINKS[link] for link in links):
        if os.geteuid() != 0:
            raise BenchError("the replication topic's slow link needs root (ip netns, tc): "
                             "run as root or with --links loopback")
        clean_stale()
    section: dict = {"modes": modes, "links": links, "resync_size": resync_size,
                     "iodepth": args.iodepth, "paced_iops": PACED_IOPS,
                     "threads": ["default" if t is None else t for t in settings],
                     "link_info": {}, "runs": []}
    reps = range(args.repeat)
    if "none" in modes:
        for t in settings:
            section["runs"].append(measure_runs(ctx, reps, "none", "loopback", None, t,
                                                resync_size, delete_after))
    for link in links:
        shape = LINKS[link]
        with shaped_link(shape, link) if shape else contextlib.nullcontext() as ns:
            info: dict = {"label": shape.label if shape else "loopback (127.0.0.1)"}
            if ns is not None:
                progress(f"{link}: probing the link (ping and 64 MiB through the proxy)")
                info |= probe(ns, ctx.run_dir) | {"nominal_rtt_ms": shape.rtt_ms,
                                                  "rate": shape.rate,
                                                  "rate_mibs": shape.rate_bytes_per_s / MIB}
                progress(f"{link}: RTT {info['rtt_ms']:.2f} ms (min {info['rtt_min_ms']:.2f}),"
                         f" bulk {info['bulk_mibs']:.0f} MiB/s")
            section["link_info"][link] = info
            for mode in replicated:
                for t in settings:
                    section["runs"].append(measure_runs(ctx, reps, mode, link, ns, t,
                                                        resync_size, delete_after))
            keepalive = [r["keepalive_rtt_ms"] for r in section["runs"]
                         if r["link"] == link and r.get("keepalive_rtt_ms") is not None]
            if keepalive:
                info["keepalive_rtt_ms"] = statistics.median(keepalive)
    section["goals"] = check_goals(section)
    return section


def measure_runs(ctx: Context, reps: range, mode: str, link: str, ns: Namespaces | None,
                 threads: int | None, resync_size: int, delete_after: bool) -> dict:
    """Every repetition of one (mode, link, threads), each on fresh volumes; medians."""
    samples: list[dict] = []
    for rep in reps:
        tag = f"{mode} on {link}" if mode != "none" else "none"
        tag += f" -t {threads}" if threads is not None else ""
        tag += f" (run {rep + 1}/{len(reps)})" if len(reps) > 1 else ""
        label = f"repl-{mode}-{link}-t{threads or 'd'}-{rep + 1}"
        progress(f"{tag}: starting")
        with replicated_pair(ctx.run_dir, label, ctx.size, mode, threads=threads, ns=ns,
                             delete_after=delete_after,
                             keep_on_error=ctx.args.keep) as pair:
            samples.append(measure_pair(ctx, pair, tag, resync_size))
    out: dict = {"mode": mode, "link": link, "threads": samples[0]["threads"],
                 "threads_requested": threads}
    for key in samples[0]:
        if isinstance(samples[0][key], dict) and "value" in samples[0][key]:
            out[key] = median_entry([s[key] for s in samples], samples[0][key]["unit"])
    rtts = [s["keepalive_rtt_ms"] for s in samples if s.get("keepalive_rtt_ms") is not None]
    out["keepalive_rtt_ms"] = statistics.median(rtts) if rtts else None
    out["identical"] = all(s.get("identical") for s in samples) if mode != "none" else None
    return out


def measure_pair(ctx: Context, pair: Pair, tag: str, resync_size: int) -> dict:
    args, bench = ctx.args, ctx.bench
    replicated = pair.mode != "none"
    run = {"threads": pair.threads}
    if replicated:
        run["keepalive_rtt_ms"] = pair.keepalive_rtt()
    fio = {
        # one pass over the volume and a flush: the base topic's nbdcopy --flush
        "seq_write": dict(bs=MIB, iodepth=4, rw="write", runtime=0, time_based=False,
                          extra=("--end_fsync=1",)),
        "randwrite_4k": dict(bs=4096, iodepth=args.iodepth, rw="randwrite",
                             runtime=args.runtime, ramp=args.ramp),
        "write_1m_qd4": dict(bs=MIB, iodepth=4, rw="write", runtime=args.runtime),
        "write_1m_qd1": dict(bs=MIB, iodepth=1, rw="write", runtime=args.runtime),
        "write_1m_paced": dict(bs=MIB, iodepth=1, rw="write", runtime=args.runtime,
                               extra=(f"--rate_iops={PACED_IOPS}",)),
    }
    for key, what, unit in MEASUREMENTS:
        if key == "seq_write":
            # as the base topic does, and for two page caches (both sides on this machine),
            # whatever the mode: without it, "none" measured 371 or 785 MiB/s on one machine
            progress(f"{tag}: priming the page cache (2 x {fmt_size(ctx.size)} written)")
            bench.prime(copies=2)
        bench.drop_caches()
        progress(f"{tag}: {what}")
        r = fio_write(pair, size=ctx.size, what=f"{tag}: {what}", **fio[key])
        r["value"] = r["mibs"] if unit == "MiB/s" else r["value"]
        r["unit"] = unit
        if replicated:
            # semi-async completes writes before their data is across: how long the
            # secondary then still needs to catch up
            r["drain_s"] = round(pair.wait_state("in-sync", 300, f"after {what}"), 3)
            r["replicated_mibs"] = round(r["io_mib"] / (r["runtime_s"] + r["drain_s"]), 2)
        run[key] = r
        ctx.show(f"{tag} {what}", r, unit)
        progress(f"{tag}:   latency p50 {r['lat_p50_us'] / 1000:.2f} ms, "
                 f"p99 {r['lat_p99_us'] / 1000:.2f} ms"
                 + (f"; in-sync {r['drain_s']:.2f}s after it" if replicated else ""))
    if replicated:
        for key, what, load in RESYNC_LOADS:
            run[f"resync_{key}"] = resync_round(ctx, pair, tag, key, what, load, fio,
                                                resync_size, run)
        progress(f"{tag}: stopping both, comparing their data (qemu-img compare)")
        run |= pair.check_identical()
        progress(f"{tag}: identical")
    return run


def resync_round(ctx: Context, pair: Pair, tag: str, key: str, what: str,
                 load: str | None, fio: dict, resync_size: int, run: dict) -> dict:
    """Secondary stopped, ``resync_size`` written, secondary started; the resync followed
    through the primary's status.

    With a ``load``, fio writes into those same first ``resync_size`` bytes (so it adds
    nothing to the resync) from before the secondary is started until no region is out
    of sync; the host's figures are those of the writes that completed while the resync
    ran (fio's per-write log against the status polls' clock)."""
    pair.wait_state("in-sync", 300, f"before {what}")
    pair.stop_secondary()
    pair.wait_state("disconnected", 60, "after stopping the secondary")
    progress(f"{tag}: {what}: secondary stopped, writing {fmt_size(resync_size)}")
    fio_write(pair, bs=MIB, iodepth=4, rw="write", size=resync_size, time_based=False,
              runtime=0, what=f"{tag}: writing while the secondary is down")
    before = pair.link()
    ctx.bench.drop_caches()
    timeout = 120 + 4 * resync_size / MIB  # a resync slower than 0.25 MiB/s is a failure
    out: dict = {"out_of_sync_regions": before.get("out_of_sync_regions"),
                 "load": load or "none"}
    lat_log = ctx.run_dir / f"{pair.label}.resync-{key}"
    host: dict = {}
    failed: dict = {}  # what stopped the host load, if anything did
    with ResyncWatch(pair, before, timeout) as watch:
        loader = None
        if load is not None:
            # the same writes as in sync, but for as long as the resync runs
            spec = {k: v for k, v in fio[load].items() if k != "ramp"}
            spec["runtime"] = timeout  # until stopped
            aborted = threading.Event()
            stop = lambda: watch.synced.is_set() or watch.ended.is_set() or aborted.is_set()

            def run_load() -> None:
                try:
                    host.update(fio_write(pair, size=resync_size, stop=stop, lat_log=lat_log,
                                          what=f"{tag}: {what}", **spec))
                except BenchError as err:
                    failed["error"] = str(err)
                except KeyboardInterrupt:  # Ctrl-C reached fio: the main thread has it too
                    failed["ctrl-c"] = True

            loader = threading.Thread(target=run_load, daemon=True, name="host-load")
            loader.start()
        try:
            pair.start_secondary()
            # the primary redials at most 5 s apart (backoff)
            watch.wait(watch.begun, f"{what}: waiting for the primary to reconnect",
                       timeout=RECONNECT_TIMEOUT)
            watch.wait(watch.synced, f"{what}: waiting for the resync")
        finally:
            if loader is not None:
                aborted.set()
                loader.join()
        if failed.get("ctrl-c"):
            raise KeyboardInterrupt
        if "error" in failed:
            raise BenchError(failed["error"])
        watch.wait(watch.over, f"{what}: waiting for in-sync")
    out |= {f"resync_{k}": v for k, v in watch.summary().items()}
    out["value"] = out.get("resync_mibs") or 0.0
    out["unit"] = "MiB/s"
    if load is not None:
        # from the poll before the one that saw the resync begin, to the one that saw
        # it done: the writes that completed meanwhile shared the link with it
        w = window_stats(lat_log, watch.wall["begun_s"] - POLL, watch.wall["synced_s"])
        for p in lat_log.parent.glob(f"{lat_log.name}_*.log"):
            p.unlink()
        unit = "MiB/s" if load == "write_1m_qd4" else "IOPS"
        in_sync = run[load]["value"]
        out |= {"host_unit": unit, "host_in_sync": in_sync, "host_window": w,
                "host_fio_s": host.get("runtime_s"),
                "foreign_cpu_pct": host.get("foreign_cpu_pct"),
                "foreign_top": host.get("foreign_top")}
        if w is not None:
            value = w["mibs"] if unit == "MiB/s" else w["iops"]
            out |= {"host_value": value, "overlap_s": w["seconds"],
                    "host_share": round(value / in_sync, 3) if in_sync else None,
                    "host_lat_p50_us": w["lat_p50_us"], "host_lat_p99_us": w["lat_p99_us"]}
        alone = run.get("resync_alone", {}).get("resync_mibs")
        if alone:
            out["resync_share"] = round(out["value"] / alone, 3)
    line = (f"{tag}: {what}: {fmt_size(out.get('resync_bytes_sent') or 0)} in "
            f"{out.get('resync_s', 0):.2f}s = {out['value']:.0f} MiB/s")
    if load is not None:
        line += ("; host: no write completed during the resync" if "host_value" not in out
                 else f"; host {out['host_value']:,.0f} {out['host_unit']} over "
                 f"{out['overlap_s']:.2f}s ({100 * (out['host_share'] or 0):.0f}% of in-sync)")
    progress(line)
    return out


# -- goals and the table -----------------------------------------------------------------

def _find(section: dict, mode: str, link: str, threads: int | None) -> dict | None:
    for r in section["runs"]:
        if r["mode"] == mode and r["link"] == link and r["threads_requested"] == threads:
            return r
    return None


def check_goals(section: dict) -> list[dict]:
    goals = []
    for text, link, mode, kind, k in GOALS:
        found = [r for t in section["threads"]
                 if (r := _find(section, mode, link, None if t == "default" else t))]
        if not found:
            goals.append({"goal": text, "mode": mode, "link": link, "threads": None,
                          "status": "SKIP", "measured": None, "bound": None})
        for r in found:
            t = r["threads_requested"]
            g = {"goal": text, "mode": mode, "link": link, "threads": r["threads"],
                 "status": "SKIP", "measured": None, "bound": None}
            if kind == "seq_ratio":
                base = _find(section, "none", "loopback", t)
                if base is not None:
                    g["measured"] = round(r["seq_write"]["value"]
                                          / base["seq_write"]["value"], 3)
                    g["bound"] = k
                    g["status"] = "PASS" if g["measured"] >= k else "MISS"
            else:
                info = section["link_info"].get(link, {})
                rtt = info.get("rtt_ms")
                if rtt:
                    bound = k * rtt
                    if kind == "rtt+transfer":
                        g["transfer_ms"] = round(MIB / (info["rate_mibs"] * MIB) * 1000, 2)
                        bound += g["transfer_ms"]
                    g["rtt_ms"] = rtt
                    g["measured"] = round(r["write_1m_paced"]["lat_p50_us"] / 1000, 2)
                    g["back_to_back_ms"] = round(r["write_1m_qd1"]["lat_p50_us"] / 1000, 2)
                    g["bound"] = round(bound, 2)
                    g["status"] = "PASS" if g["measured"] < bound else "MISS"
            goals.append(g)
    return goals


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def render(section: dict) -> str:
    out = []
    for link, info in section["link_info"].items():
        line = f"link {link}: {info['label']}"
        if "rtt_ms" in info:
            line += (f"; measured through the proxy: RTT {info['rtt_ms']:.2f} ms (min "
                     f"{info['rtt_min_ms']:.2f}, max {info['rtt_max_ms']:.2f}), bulk "
                     f"{info['bulk_mibs']:.0f} MiB/s")
        if info.get("keepalive_rtt_ms") is not None:
            line += f"; replication keepalive RTT {info['keepalive_rtt_ms']:.2f} ms"
        out.append(line)
    none = {r["threads_requested"]: r for r in section["runs"] if r["mode"] == "none"}
    trows = [["link", "mode", "-t", "seq MiB/s", "vs none", "in-sync after s",
              "1M qd4 MiB/s", "4K IOPS", "identical"]]
    lrows = [["link", "mode", "-t", "4K p50", "4K p99", "1M qd1 p50", "1M qd1 p99",
              "1M paced p50", "1M paced p99"]]
    for r in section["runs"]:
        base = none.get(r["threads_requested"])
        s, w, q, p = r["seq_write"], r["randwrite_4k"], r["write_1m_qd1"], r["write_1m_paced"]
        ratio = (f"{100 * s['value'] / base['seq_write']['value']:.0f}%"
                 if base and r["mode"] != "none" else "-")
        who = [r["link"] if r["mode"] != "none" else "-", r["mode"], str(r["threads"])]
        trows.append(who + [f"{s['value']:,.0f}", ratio,
                            "-" if s.get("drain_s") is None else f"{s['drain_s']:.2f}",
                            f"{r['write_1m_qd4']['value']:,.0f}", f"{w['value']:,.0f}",
                            {True: "yes", False: "NO", None: "-"}[r["identical"]]])
        lrows.append(who + [_ms(w["lat_p50_us"]), _ms(w["lat_p99_us"]), _ms(q["lat_p50_us"]),
                            _ms(q["lat_p99_us"]), _ms(p["lat_p50_us"]), _ms(p["lat_p99_us"])])
    out += ["", "in sync, medians (seq: one pass + flush; vs none: at the same --threads "
            "setting; in-sync after: how long the secondary still needed after the seq "
            f"write; 4K at iodepth {section['iodepth']}; identical: qemu-img compare "
            "afterwards):", table(trows),
            "", f"latency, ms (1M qd1: back to back; paced: {section['paced_iops']} "
            "writes/s):", table(lrows)]
    rrows = [["link", "mode", "-t", "resync MiB", "alone s", "alone MiB/s",
              "+4K IOPS", "(in-sync)", "resync MiB/s", "over s",
              "+1M MiB/s", "(in-sync)", "resync MiB/s", "over s"]]
    starved, shares = [], 0
    for r in section["runs"]:
        if r["mode"] == "none":
            continue
        a, k, m = r["resync_alone"], r["resync_randwrite_4k"], r["resync_write_1m"]
        row = [r["link"], r["mode"], str(r["threads"]),
               f"{(a.get('resync_bytes_sent') or 0) / MIB:.0f}",
               f"{a.get('resync_s', 0):.2f}", f"{a['value']:.0f}"]
        for x, load in ((k, "4K random writes"), (m, "1M writes")):
            have = x.get("host_value") is not None
            row += [f"{x['host_value']:,.0f}" if have else "-",
                    f"{100 * (x.get('host_share') or 0):.0f}%" if have else "-",
                    f"{x['value']:.0f}", f"{x.get('overlap_s', 0):.2f}" if have else "-"]
            for share, what in ((x.get("host_share"), "the host's {load} got {pct} of "
                                 "their in-sync rate during the resync"),
                                (x.get("resync_share"), "the resync got {pct} of its rate "
                                 "alone during {load}")):
                shares += share is not None
                if share is not None and share < STARVED:
                    starved.append(f"{r['mode']} on {r['link']} -t {r['threads']}: "
                                   + what.format(load=load, pct=f"{100 * share:.0f}%"))
        rrows.append(row)
    if len(rrows) > 1:
        out += ["", f"resync of {fmt_size(section['resync_size'])} written while the "
                "secondary was down, alone and sharing the link with host writes (over s: "
                "how long they ran together; (in-sync): the host's share of its in-sync "
                "rate, 4K: randwrite, 1M: 1M qd4):", table(rrows)]
        if starved:
            out.append("STARVED: " + "; ".join(starved))
        elif shares:
            out.append(f"nobody starved (each side kept >= {STARVED:.0%} of its rate alone)")
        else:
            out.append("no host write completed while a resync ran: too short to tell (a "
                       "larger --size or --resync-size makes it longer)")
    out.append("")
    for g in section["goals"]:
        t = f" -t {g['threads']}" if g["threads"] is not None else ""
        if g["measured"] is None:
            have = "n/a"
        elif g["goal"].startswith("loopback"):
            have = f"measured {100 * g['measured']:.0f}%"
        else:
            have = (f"measured {g['measured']:.2f} ms, bound {g['bound']:.2f} ms with RTT "
                    f"{g['rtt_ms']:.2f} ms" + (f" + transfer {g['transfer_ms']:.2f} ms"
                                              if "transfer_ms" in g else "")
                    + f"; back to back {g['back_to_back_ms']:.2f} ms")
        out.append(f"{g['status']}: {g['goal']}{t} ({have})")
    return "\n".join(out)
