"""py-spy a server during an extra (unmeasured) fio run and summarise where it spent time."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from .measure import Bench
from .procs import REPO, run, tool
from .targets import Served


def profile_randwrite(bench: Bench, target: str, served: Served, out_dir: Path, stamp: str,
                      duration: float) -> dict:
    """py-spy the server of ``served`` during 4K random writes.

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


def render_profile(profiles: dict) -> list[str]:
    lines = []
    for target, modes in profiles.items():
        for mode, prof in modes.items():
            lines.append(f"profile {target} ({mode}, {prof['samples']} samples; "
                         f"{prof['file']}), self %:")
            lines += [f"  {pct:5.1f}%  {frame}" for frame, pct in prof["self_pct"][:8]]
    return lines
