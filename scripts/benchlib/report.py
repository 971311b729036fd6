"""Sizes, medians, text tables, the environment record and the results files."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import psutil

from .cpu import load_average
from .procs import REPO

RESULTS_DIR = REPO / "bench-results"
MIB = 1 << 20


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


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if unit == "IOPS" or v >= 100 else f"{v:,.1f}"


def table(rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def median_entry(runs: list[dict], unit: str) -> dict:
    """The median of each numeric figure over repetitions, and every run kept as is."""
    entry: dict = {"unit": unit, "value": statistics.median(r["value"] for r in runs),
                   "samples": [round(r["value"], 2) for r in runs]}
    for key in runs[0]:
        if key == "value":
            continue
        vals = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if vals and len(vals) == len(runs):
            entry[key] = round(statistics.median(vals), 3)
        elif key in ("command", "ioengine"):
            entry[key] = runs[0][key]
    entry["runs"] = runs
    return entry


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
    try:
        import volume_core.native as native

        native_impl = native.IMPLEMENTATION
    except ImportError as err:
        native_impl = f"unavailable: {err}"
    first = lambda cmd: out(cmd).splitlines()[0] if shutil.which(cmd[0]) else ""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host_kernel": os.uname().release,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory": f"{psutil.virtual_memory().total // MIB} MiB",
        "nbdkit": first(["nbdkit", "--version"]),
        "nbdcopy": first(["nbdcopy", "--version"]),
        "fio": out(["fio", "--version"]),
        "python": sys.version.split()[0],
        "native": native_impl,
        "git_commit": out(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(out(["git", "status", "--porcelain", "--untracked-files=no"])),
        "loadavg_at_start": load_average(),
        "workdir": str(workdir),
        "workdir_fs": out(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(workdir)]),
    }


def write_results(report: dict, stamp: str) -> Path:
    """bench-results/<stamp>.json and latest.json; returns the latter."""
    RESULTS_DIR.mkdir(exist_ok=True)
    body = json.dumps(report, indent=2) + "\n"
    (RESULTS_DIR / f"{stamp}.json").write_text(body)
    latest = RESULTS_DIR / "latest.json"
    latest.write_text(body)
    return latest


def timestamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")
