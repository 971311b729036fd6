"""The snapshots topic of scripts/bench: copy-on-write cost and creation time.

- Sequential write (nbdcopy) over a volume already full of data, three ways:
  with no snapshot, right after a snapshot (every region needs copy-on-write),
  and once more (every region already preserved: no copies).
- 4K random-write IOPS (fio) with no snapshot and right after a snapshot.
- Snapshot creation time on a sparse 1 GiB and a sparse 1 TiB volume: the
  admin round trip measured in-process (median and minimum of seven) and the
  wall time of ``nbdmirror snapshot create`` (includes Python start-up).
  Creation is three fsyncs and no data, so its spread is the disk's fsync
  latency.
"""

from __future__ import annotations

import json
import statistics
import time

from benchlib.context import Context
from benchlib.procs import progress, run, tool
from benchlib.targets import serve_nbdmirror

TITLE = "snapshots"
GIB = 1 << 30
TIB = 1 << 40


def measure(ctx: Context) -> dict:
    bench, run_dir = ctx.bench, ctx.run_dir
    out: dict = {"cow": {}, "create": {}}
    nbdmirror = tool("nbdmirror")
    with serve_nbdmirror("snapbench", run_dir, ctx.size, threads=ctx.threads) as served:
        vol = served.volume
        progress("snapshots: filling the volume (unmeasured)")
        bench.seq_write(served)
        steps = [("seq_write_no_snapshot", None),
                 ("seq_write_cow", "s1"),
                 ("seq_write_preserved", None)]
        for key, snap in steps:
            if snap:
                run([nbdmirror, "snapshot", "create", str(vol), snap], "snapshot create")
            progress(f"snapshots: {key.replace('_', ' ')}")
            r = bench.seq_write(served)
            out["cow"][key] = r
            progress(f"snapshots:   {r['value']:,.0f} MiB/s")
        progress("snapshots: 4K randwrite, no new snapshot (regions preserved)")
        out["cow"]["randwrite_4k_no_cow"] = bench.randwrite(served)
        run([nbdmirror, "snapshot", "create", str(vol), "s2"], "snapshot create")
        progress("snapshots: 4K randwrite right after a snapshot (copy-on-write)")
        out["cow"]["randwrite_4k_cow"] = bench.randwrite(served)
        status = json.loads(run([nbdmirror, "status", str(vol), "--json"], "status").stdout)
        out["cow"]["cow_regions_copied"] = status["cow_regions_copied"]
        for key in ("randwrite_4k_no_cow", "randwrite_4k_cow"):
            progress(f"snapshots:   {key}: {out['cow'][key]['value']:,.0f} IOPS")

    from volume_core import admin
    from volume_core.server_files import admin_socket
    from volume_core.volume import Volume

    for label, vsize in (("1G", GIB), ("1T", TIB)):
        vol = run_dir / f"snapcreate-{label}"
        run([nbdmirror, "create", str(vol), "--size", label], "create")
        try:
            run([nbdmirror, "serve", str(vol), "--background", "--threads", str(ctx.threads)],
                "serve", timeout=120)
            sock = admin_socket(Volume.open(vol))
            times = []
            for i in range(7):
                t0 = time.perf_counter()
                admin.call(sock, "snapshot-create", name=f"t{i}")
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run([nbdmirror, "snapshot", "create", str(vol), "cli"], "snapshot create")
            cli_s = time.perf_counter() - t0
            allocated = sum(p.stat().st_blocks * 512
                            for p in (vol / "snapshots").rglob("store.img"))
        finally:
            run([nbdmirror, "stop", str(vol)], "stop", timeout=120)
        out["create"][label] = {"size": vsize, "admin_ms_median": statistics.median(times) * 1e3,
                                "admin_ms_min": min(times) * 1e3,
                                "admin_ms_all": [round(t * 1e3, 2) for t in times],
                                "cli_wall_ms": cli_s * 1e3,
                                "store_bytes_allocated": allocated}
        progress(f"snapshots: create on {label}: {statistics.median(times) * 1e3:.1f} ms "
                 f"(admin), {cli_s * 1e3:.0f} ms (CLI)")
    cow = out["cow"]
    out["ratios"] = {
        "seq_write_cow/no_snapshot": cow["seq_write_cow"]["value"]
        / cow["seq_write_no_snapshot"]["value"],
        "seq_write_preserved/no_snapshot": cow["seq_write_preserved"]["value"]
        / cow["seq_write_no_snapshot"]["value"],
        "randwrite_cow/no_cow": cow["randwrite_4k_cow"]["value"]
        / cow["randwrite_4k_no_cow"]["value"],
        "create_1T/1G": out["create"]["1T"]["admin_ms_median"]
        / out["create"]["1G"]["admin_ms_median"],
    }
    return out


def render(snap: dict) -> str:
    cow, create, ratios = snap["cow"], snap["create"], snap["ratios"]
    lines = [
        "snapshots (nbdmirror volume, 64K regions)",
        f"  seq write, no snapshot              "
        f"{cow['seq_write_no_snapshot']['value']:>9,.0f} MiB/s",
        f"  seq write, every region copied      {cow['seq_write_cow']['value']:>9,.0f} MiB/s"
        f"  ({100 * ratios['seq_write_cow/no_snapshot']:.0f}%)",
        f"  seq write, regions already copied   {cow['seq_write_preserved']['value']:>9,.0f} MiB/s"
        f"  ({100 * ratios['seq_write_preserved/no_snapshot']:.0f}%)",
        f"  4K randwrite, no copy-on-write      {cow['randwrite_4k_no_cow']['value']:>9,.0f} IOPS",
        f"  4K randwrite, after a snapshot      {cow['randwrite_4k_cow']['value']:>9,.0f} IOPS"
        f"  ({100 * ratios['randwrite_cow/no_cow']:.0f}%)",
    ]
    for label, c in create.items():
        lines.append(f"  snapshot create, sparse {label:<3}        {c['admin_ms_median']:>9.1f} ms"
                     f"  (min {c['admin_ms_min']:.1f} ms; CLI wall {c['cli_wall_ms']:.0f} ms)")
    return "\n".join(lines)
