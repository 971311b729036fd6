"""CPU figures from psutil: a server's CPU time, context switches, and what other work used.

Other processes on the machine skew every figure here (two cores, tests of other
sessions); each measurement records how much CPU they took so a reader can discount it.
"""

from __future__ import annotations

import os
import time

import psutil

#: other processes using more than this much of one CPU during a measurement get a warning
FOREIGN_WARN_PCT = 10.0


def cpu_times(pid: int | None) -> tuple[float, float] | None:
    """User and system CPU seconds of a process (all its threads) so far."""
    if not pid:
        return None
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user, t.system


def cpu_seconds(pid: int | None) -> float | None:
    t = cpu_times(pid)
    return None if t is None else t[0] + t[1]


def context_switches() -> int:
    """Context switches so far, machine-wide."""
    return psutil.cpu_stats().ctx_switches


def thread_context_switches(pid: int | None) -> tuple[int, int] | None:
    """Voluntary and involuntary context switches of all the threads of a process so far.

    psutil's num_ctx_switches() counts the main thread only; nbdkit's work is in others.
    """
    if not pid:
        return None
    vol = invol = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            v, i = psutil.Process(int(tid)).num_ctx_switches()
        except psutil.Error:
            continue
        vol, invol = vol + v, invol + i
    return vol, invol


def cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs busy over ``seconds``."""
    return round(psutil.cpu_percent(interval=seconds) / 100, 3)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _process_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, CPU seconds including reaped children, name) of every user process."""
    table = {}
    for p in psutil.process_iter(["ppid", "name", "cpu_times"]):
        info = p.info
        if info["cpu_times"] is None or info["ppid"] is None:
            continue
        if info["ppid"] == 2 or p.pid == 2:  # kernel threads (writeback is part of the work)
            continue
        t = info["cpu_times"]
        # Reaped children count too (short-lived test processes), except for init's:
        # it reaps orphans, such as a daemonised server of ours.
        seconds = t.user + t.system
        if p.pid != 1:
            seconds += t.children_user + t.children_system
        table[p.pid] = (info["ppid"], seconds, info["name"])
    return table


class ForeignCpu:
    """CPU used by processes that are not ours (not this process, its children, or the
    server) while a measurement runs."""

    def __init__(self, server_pid: int | None):
        self.ours = {os.getpid()} | ({server_pid} if server_pid else set())
        self.result: dict = {}

    def _foreign(self, table: dict[int, tuple[int, float, str]]) -> set[int]:
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
        self.before = _process_table()
        return self

    def __exit__(self, *exc) -> None:
        elapsed = max(time.monotonic() - self.t0, 1e-3)
        after = _process_table()
        by_name: dict[str, float] = {}
        for pid in self._foreign(after):
            _, seconds, name = after[pid]
            old = self.before.get(pid)
            delta = seconds - old[1] if old and old[2] == name else seconds
            if delta > 0:
                by_name[name] = by_name.get(name, 0) + delta
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:4]
        self.result = {"foreign_cpu_pct": round(100 * sum(by_name.values()) / elapsed, 1),
                       "foreign_top": [[n, round(100 * s / elapsed, 1)] for n, s in top]}


def foreign_warning(r: dict) -> str:
    """A warning to append to a result line when other work disturbed it, else ''."""
    if r.get("foreign_cpu_pct", 0) <= FOREIGN_WARN_PCT:
        return ""
    who = ", ".join(f"{n} {p:g}%" for n, p in r.get("foreign_top", []))
    return f"other processes used {r['foreign_cpu_pct']:g}% CPU: {who}"
