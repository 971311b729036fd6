"""A slow link between two network namespaces: a rate (tc tbf) and a delay (the fault proxy).

This kernel has no netem, so the delay comes from tests/fault_proxy.py (run by
delayline.py), which listens on 127.0.0.1 only: it has to sit in the namespace of
the side that dials, next to the primary. The layout:

  namespace NAME-p:  the primary (nbdkit) and the proxy, on its 127.0.0.1
  veth pair          10.254.0.1 (NAME-p) <-> 10.254.0.2 (NAME-s), not shaped
  namespace NAME-s:  the secondary (``nbdmirror receive``) on 10.254.0.2

The rate is applied on NAME-p's ``lo`` to what goes *to* a proxy's port (``shape_port``:
an htb class holding a tbf, chosen by a u32 filter on the destination port), so:

- the primary's data is held to the rate before the proxy's delay line, whose queue
  then never holds more than rate x delay (the proxy reads as fast as it is given:
  shaped after it, it would hide an unbounded queue from the primary's TCP);
- the way back (acknowledgements, from the proxy's port) is not queued behind that
  data: each direction has the link to itself, as on a full-duplex wire.

Host writes reach the primary over its unix socket, which crosses namespaces. Both
namespaces are deleted on the way out; those of a bench that died are deleted by the
next one (``clean_stale``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from .procs import BenchError, progress, run, shielded

PREFIX = "nbdm-bench-"
PRIMARY_ADDR = "10.254.0.1"
SECONDARY_ADDR = "10.254.0.2"
DELAYLINE = Path(__file__).resolve().parent / "delayline.py"
_SHAPED_CLASS = "1:1"


@dataclass(frozen=True)
class Shape:
    """What the link is made to look like."""

    rtt_ms: float = 2.0
    rate: str = "1gbit"
    #: tbf's queue: about one bandwidth-delay product (2 ms at 1 Gbit/s = 250 KB)
    latency: str = "2ms"
    burst: str = "256kb"

    @property
    def rate_bytes_per_s(self) -> float:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", self.rate)
        if not m:
            raise ValueError(f"rate {self.rate!r}: expected e.g. 1gbit, 500mbit")
        return float(m.group(1)) * 1000 ** " kmg".index(m.group(2) or " ") / 8

    @property
    def delay_s(self) -> float:
        """The proxy's delay each way."""
        return self.rtt_ms / 2000

    @property
    def label(self) -> str:
        return f"{self.rtt_ms:g} ms RTT, {self.rate}/s"


@dataclass(frozen=True)
class Namespaces:
    primary: str
    secondary: str
    shape: Shape

    def exec_in(self, ns: str) -> list[str]:
        """The command prefix that runs a command inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def shape_port(self, port: int) -> None:
        """Hold what goes to ``port`` on the primary's 127.0.0.1 (a proxy) to the rate."""
        run(["tc", "-n", self.primary, "filter", "add", "dev", "lo", "parent", "1:",
             "protocol", "ip", "prio", "1", "u32", "match", "ip", "dport", str(port),
             "0xffff", "flowid", _SHAPED_CLASS], f"tc filter for port {port}", timeout=30)

    def proxy(self, target: str, what: str, log: Path) -> Helper:
        """A delay proxy on the primary's side to ``target``, its port shaped."""
        helper = Helper(self.exec_in(self.primary),
                        ["forward", "--target", target, "--delay", f"{self.shape.delay_s:g}"],
                        what, log)
        try:
            self.shape_port(helper.port)
        except BaseException:
            helper.close()
            raise
        return helper


def _ip(*args: str, what: str) -> None:
    run(["ip", *args], what, timeout=30)


def clean_stale() -> None:
    """Delete the namespaces of benches that are no longer running (``nbdm-bench-PID-*``)."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-[ps]", name)
        if m and not psutil.pid_exists(int(m.group(1))):
            progress(f"deleting the namespace {name} left by an earlier bench")
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@contextlib.contextmanager
def shaped_link(shape: Shape, tag: str) -> Iterator[Namespaces]:
    """Two fresh namespaces joined by a veth pair, the primary's ``lo`` ready to shape."""
    base = f"{PREFIX}{os.getpid()}-"
    ns = Namespaces(primary=base + "p", secondary=base + "s", shape=shape)
    made: list[str] = []
    try:
        for name in (ns.primary, ns.secondary):
            _ip("netns", "add", name, what=f"{tag}: netns add")
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up", what=f"{tag}: lo up")
        _ip("-n", ns.primary, "link", "add", "wan0", "type", "veth", "peer", "name", "wan0",
            "netns", ns.secondary, what=f"{tag}: veth pair")
        for name, addr in ((ns.primary, PRIMARY_ADDR), (ns.secondary, SECONDARY_ADDR)):
            _ip("-n", name, "addr", "add", f"{addr}/30", "dev", "wan0", what=f"{tag}: address")
            _ip("-n", name, "link", "set", "wan0", "up", what=f"{tag}: veth up")
        # htb only sorts: unclassified packets (default 0) pass straight through; the
        # class that shape_port's filters choose holds the tbf.
        tc = ["tc", "-n", ns.primary]
        for cmd in (["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"],
                    ["class", "add", "dev", "lo", "parent", "1:", "classid", _SHAPED_CLASS,
                     "htb", "rate", "100gbit", "burst", "4mb", "cburst", "4mb",
                     "quantum", "200000"],
                    ["qdisc", "add", "dev", "lo", "parent", _SHAPED_CLASS, "handle", "10:",
                     "tbf", "rate", shape.rate, "burst", shape.burst, "latency",
                     shape.latency]):
            run(tc + cmd, f"{tag}: tc {cmd[0]} {cmd[1]}", timeout=30)
        yield ns
    finally:
        with shielded():
            for name in made:
                # Processes still inside keep a namespace alive; ours are stopped by now.
                pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True, timeout=30).stdout.split()
                if pids:
                    progress(f"warning: processes {' '.join(pids)} still in {name}")
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


class Helper:
    """A delayline.py process (proxy or sink) in a namespace: started, its port read from
    its first line, stopped (SIGTERM, then SIGKILL) on close."""

    def __init__(self, prefix: list[str], args: list[str], what: str, log: Path) -> None:
        self.what = what
        self.log = log
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, str(DELAYLINE), *args], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=logf, start_new_session=True)
        line = self.proc.stdout.readline()
        try:
            self.port = int(json.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            self.close()
            raise BenchError(f"{what} did not start: "
                             f"{log.read_text(errors='replace').strip()[-300:]}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> dict:
        """Stop it; return what it said last (the proxy's byte counts), if anything."""
        rest = b""
        with shielded():
            if self.proc.poll() is None:
                self.proc.terminate()
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            with contextlib.suppress(OSError, ValueError):
                rest = self.proc.stdout.read()
                self.proc.stdout.close()
        with contextlib.suppress(ValueError, IndexError):
            return json.loads(rest.strip().splitlines()[-1])
        return {}


def probe(ns: Namespaces, log_dir: Path, pings: int = 50, bulk: int = 64 << 20) -> dict:
    """Round trip and bulk rate from the primary's namespace through a delay proxy (shaped
    as the replication's will be) to a sink in the secondary's: the replication's path."""
    sink = Helper(ns.exec_in(ns.secondary), ["sink", "--listen", f"{SECONDARY_ADDR}:0"],
                  "link probe sink", log_dir / "probe-sink.log")
    try:
        proxy = ns.proxy(f"{SECONDARY_ADDR}:{sink.port}", "link probe proxy",
                         log_dir / "probe-proxy.log")
        try:
            out = run([*ns.exec_in(ns.primary), sys.executable, str(DELAYLINE), "ping",
                       "--target", f"127.0.0.1:{proxy.port}", "--pings", str(pings),
                       "--bulk", str(bulk)], "link probe", timeout=120)
        finally:
            proxy.close()
    finally:
        sink.close()
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"link probe: unreadable output {out.stdout[-200:]!r}") from None
