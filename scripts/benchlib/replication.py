"""A primary and its secondary for the bench, started by the real CLI, and what runs on them.

``replicated_pair`` creates two volumes of one size, starts ``nbdmirror receive`` on
one and ``nbdmirror serve --replicate-to`` on the other (mode "none": a plain serve,
no secondary; "async": ``--mode async --interval N``), on loopback or across a shaped
link (netns.py), and waits, by polling the primary's status, until it says in-sync.
Everything it started is stopped on the way out, in order (primary, secondary, proxy),
including on Ctrl-C.

``Pair.check_identical`` stops both cleanly and compares their data files.
``fio_write`` runs one fio write job against the primary; ``ResyncWatch`` follows a
resync through the primary's status while something else runs. Async mode:
``Pair.cycle_now``/``wait_committed``/``sync_wait`` start a cycle and follow it to its
commit, ``BackToBackCycles`` runs cycles one after the other while something else runs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .cpu import ForeignCpu, cpu_seconds
from .measure import MIB, fio_summary
from .netns import SECONDARY_ADDR, Helper, Namespaces
from .procs import BenchError, kill_pid, progress, run, shielded, tool, wait_until

MODES = ("none", "semi-async", "sync")
#: async mirroring: cycles (the bench's async topic; not one of the replication topic's modes)
ASYNC = "async"
PAIR_MODES = (*MODES, ASYNC)
#: the secondary's port inside its own namespace (nothing else listens there)
NETNS_PORT = 7000
#: how often the primary's status is asked while waiting or watching a resync
POLL = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin_call(volume: Path, op: str, timeout: float = 10.0):
    """One operation on the running server's admin socket (what the CLI does, without
    starting a process); BenchError if it fails."""
    from volume_core import admin
    from volume_core.errors import NbdMirrorError
    from volume_core.server_files import ADMIN_SOCKET

    try:
        return admin.call(volume / ADMIN_SOCKET, op, timeout=timeout)
    except NbdMirrorError as err:
        raise BenchError(f"{op} of {volume.name}: {err}") from None


def admin_status(volume: Path, timeout: float = 10.0) -> dict:
    """``nbdmirror status VOL --json`` without starting a process: the admin socket."""
    return admin_call(volume, "status", timeout)


@dataclass
class Pair:
    label: str
    mode: str
    primary: Path
    secondary: Path | None
    sock: Path
    ns: Namespaces | None
    run_dir: Path
    threads: int | None = None  # what serve reports it runs
    primary_pid: int | None = None
    receiver_pid: int | None = None
    proxy: Helper | None = None
    listen: str = ""  # where the secondary listens
    dial: str = ""  # where the primary connects (the proxy, on the slow link)
    interval: float | None = None  # async: serve --interval (None: serve's default)
    max_rate: str | None = None  # async: serve --max-rate (None: no cap)
    serve_began: float | None = None  # time.monotonic() when the last serve was started
    served_at: float | None = None  # ... and when it returned (the export accepting)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pids(self) -> list[int]:
        """Every process of ours serving this pair (for CPU accounting)."""
        return [p for p in (self.primary_pid, self.receiver_pid,
                            self.proxy.pid if self.proxy else None) if p]

    def _prefix(self, side: str) -> list[str]:
        if self.ns is None:
            return []
        return self.ns.exec_in(self.ns.primary if side == "primary" else self.ns.secondary)

    # -- the secondary -----------------------------------------------------------
    def start_secondary(self) -> None:
        assert self.secondary is not None
        try:
            proc = run([*self._prefix("secondary"), tool("nbdmirror"), "receive",
                        str(self.secondary), "--listen", self.listen, "--background",
                        "--json"], f"{self.label}: receive", timeout=60)
        finally:
            with contextlib.suppress(OSError, ValueError):  # even if it failed half-way
                self.receiver_pid = int((self.secondary / "nbdkit.pid").read_text())
        self.receiver_pid = json.loads(proc.stdout)["pid"]

    def stop_secondary(self) -> None:
        if self.receiver_pid is None:
            return
        _stop(self.secondary, self.receiver_pid, f"{self.label}: stop the secondary")
        self.receiver_pid = None

    # -- the primary ---------------------------------------------------------------
    def serve(self, threads: int | None, replicate: bool = True) -> None:
        """``serve --background`` on the primary; ``replicate=False``: a plain serve
        whatever the pair's mode (to fill or measure the volume without a secondary)."""
        cmd = [*self._prefix("primary"), tool("nbdmirror"), "serve", str(self.primary),
               "--background", "--socket", str(self.sock), "--json"]
        if self.mode != "none" and replicate:
            cmd += ["--replicate-to", self.dial, "--mode", self.mode]
            if self.mode == ASYNC and self.interval is not None:
                cmd += ["--interval", f"{self.interval:g}"]
            if self.mode == ASYNC and self.max_rate is not None:
                cmd += ["--max-rate", self.max_rate]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        self.serve_began = time.monotonic()
        try:
            # A session of its own, as the receiver has: nbdkit stays in the process group
            # of whoever ran serve --background, and Ctrl-C would reach it before our stop.
            proc = run(cmd, f"{self.label}: serve", timeout=60, start_new_session=True)
        finally:
            with contextlib.suppress(OSError, ValueError):  # even if serve failed half-way
                self.primary_pid = int((self.primary / "nbdkit.pid").read_text())
        out = json.loads(proc.stdout)
        self.primary_pid, self.threads = out["pid"], out["threads"]
        self.served_at = time.monotonic()

    def stop_primary(self) -> None:
        if self.primary_pid is None:
            return
        _stop(self.primary, self.primary_pid, f"{self.label}: stop the primary")
        self.primary_pid = None

    # -- state ---------------------------------------------------------------------
    def status(self, side: str = "primary") -> dict:
        return admin_status(self.primary if side == "primary" else self.secondary)

    def link(self) -> dict:
        """The primary's ``replication`` status (empty for mode none)."""
        return self.status().get("replication") or {}

    def wait_state(self, want: str, timeout: float, what: str) -> float:
        """Poll until the primary's link state is ``want``; return the seconds it took."""
        t0 = time.monotonic()
        last: dict = {}

        def reached() -> bool:
            nonlocal last
            last = self.link()
            return last.get("state") == want

        if not wait_until(reached, timeout, POLL):
            raise BenchError(f"{self.label}: {what}: still {last.get('state')!r} after "
                             f"{timeout:g}s (out of sync {last.get('out_of_sync_regions')}, "
                             f"in flight {last.get('in_flight_writes')}, last error "
                             f"{last.get('last_error')!r}; logs: {self.primary}/server.log, "
                             f"{self.secondary}/server.log)")
        return time.monotonic() - t0

    # -- async cycles -----------------------------------------------------------------
    def cycle_now(self) -> int:
        """The admin socket's ``cycle-now`` (what ``nbdmirror sync`` asks): the number of
        the cycle that commits everything written before it."""
        return int(admin_call(self.primary, "cycle-now"))

    def wait_committed(self, number: int, timeout: float, what: str,
                       abort: threading.Event | None = None) -> dict:
        """Poll the primary until cycle ``number`` is committed (and, once the server
        reports it, ``last_cycle`` is that cycle's or a later one's); its replication
        status. BenchError if ``abort`` is set meanwhile."""
        last: dict = {}

        def done() -> bool:
            nonlocal last
            if abort is not None and abort.is_set():
                raise BenchError(f"{self.label}: {what}: abandoned")
            last = self.link()
            if last.get("committed_cycle", 0) < number:
                return False
            # the server sets last_cycle just after the commit: one poll may see neither
            return "last_cycle" not in last or (last["last_cycle"] or {}).get(
                "number", 0) >= number

        if not wait_until(done, timeout, POLL):
            raise BenchError(f"{self.label}: {what}: cycle {number} not committed after "
                             f"{timeout:g}s (state {last.get('state')!r}, committed "
                             f"{last.get('committed_cycle')}, cycle {last.get('cycle')}, last "
                             f"error {last.get('last_error')!r}; logs: "
                             f"{self.primary}/server.log, {self.secondary}/server.log)")
        return last

    def sync_wait(self, timeout: float, what: str) -> dict:
        """``nbdmirror sync PRI --wait --json``, timed: its JSON plus ``wall_s`` and the
        primary's replication status once the cycle it named is committed."""
        t0 = time.monotonic()
        proc = run([tool("nbdmirror"), "sync", str(self.primary), "--wait", "--json",
                    "--timeout", f"{timeout:g}"], f"{self.label}: {what}",
                   timeout=timeout + 30)
        wall = time.monotonic() - t0
        out = json.loads(proc.stdout)
        rep = self.wait_committed(int(out["cycle"]), 10, what)
        return {"sync": out, "wall_s": round(wall, 3), "link": rep}

    def keepalive_rtt(self, timeout: float = 3.0) -> float | None:
        """The secondary's last PING round trip in ms (it pings after 1 s of quiet)."""
        rtt = None

        def have() -> bool:
            nonlocal rtt
            rtt = (self.status("secondary").get("replication") or {}).get("rtt")
            return rtt is not None

        wait_until(have, timeout, 0.2)
        return None if rtt is None else round(rtt * 1000, 3)

    def check_identical(self) -> dict:
        """Stop both cleanly, then ``qemu-img compare`` their data files; BenchError if not."""
        self.stop_primary()
        self.stop_secondary()
        a, b = self.primary / "data.img", self.secondary / "data.img"
        t0 = time.monotonic()
        proc = subprocess.run([tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(a),
                               str(b)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            said = (proc.stdout + proc.stderr).strip().splitlines()
            raise BenchError(f"{self.label}: the primary and the secondary DIFFER after "
                             f"replication: qemu-img compare exited {proc.returncode}: "
                             f"{said[-1] if said else ''} ({a} vs {b}; --keep keeps them)")
        return {"identical": True, "compare_s": round(time.monotonic() - t0, 2)}

    def close(self) -> None:
        with shielded():
            for stop in (self.stop_primary, self.stop_secondary):
                try:
                    stop()
                except BenchError as err:
                    progress(f"warning: {err}")
            if self.proxy is not None:
                self.proxy.close()
                self.proxy = None


def _stop(volume: Path, pid: int, what: str) -> None:
    """``nbdmirror stop``; --force if refused; kill if even that fails (reported)."""
    nbdmirror = tool("nbdmirror")
    try:
        run([nbdmirror, "stop", str(volume)], what, timeout=90)
        return
    except BenchError as err:
        progress(f"warning: {err}; trying --force")
    try:
        run([nbdmirror, "stop", "--force", str(volume)], what + " (--force)", timeout=90)
    except BenchError as err:
        progress(f"warning: {err}; killing pid {pid}")
        kill_pid(pid)
        raise BenchError(f"{what}: it would not stop; killed pid {pid}") from None


@contextlib.contextmanager
def replicated_pair(run_dir: Path, label: str, size: int, mode: str, *,
                    threads: int | None = None, ns: Namespaces | None = None,
                    delete_after: bool = True, keep_on_error: bool = False,
                    sync_timeout: float = 120, interval: float | None = None,
                    prepare: Callable[[Pair], None] | None = None,
                    wait: bool = True) -> Iterator[Pair]:
    """Fresh volumes, secondary (unless mode none), proxy (on a shaped link), primary;
    yields once the primary says in-sync. The volumes are deleted afterwards if
    ``delete_after``, unless something failed and ``keep_on_error``.

    ``interval``: async mode's ``serve --interval``. ``prepare(pair)``: runs once the
    volumes exist, before the secondary starts (e.g. fills the primary through
    ``pair.serve(threads, replicate=False)``; whatever it starts it must stop, or leave
    to the pair's own stop on the way out). ``wait=False``: yield as soon as the primary
    is served (``pair.served_at``), for a caller who times the first sync itself."""
    if mode not in PAIR_MODES:
        raise BenchError(f"unknown replication mode {mode!r}")
    primary = run_dir / f"{label}.pri"
    secondary = None if mode == "none" else run_dir / f"{label}.sec"
    pair = Pair(label=label, mode=mode, primary=primary, secondary=secondary,
                sock=run_dir / f"{label}.sock", ns=ns, run_dir=run_dir, interval=interval)
    nbdmirror = tool("nbdmirror")
    try:
        for vol in filter(None, (primary, secondary)):
            shutil.rmtree(vol, ignore_errors=True)
            run([nbdmirror, "create", str(vol), "--size", str(size)], f"{label}: create")
        if prepare is not None:
            prepare(pair)
        if secondary is not None:
            if ns is None:
                pair.listen = pair.dial = f"127.0.0.1:{free_port()}"
            else:
                pair.listen = f"{SECONDARY_ADDR}:{NETNS_PORT}"
            pair.start_secondary()
            if ns is not None:
                pair.proxy = ns.proxy(pair.listen, f"{label}: delay proxy",
                                      run_dir / f"{label}.proxy.log")
                pair.dial = f"127.0.0.1:{pair.proxy.port}"
        pair.serve(threads)
        if secondary is not None and wait:
            pair.wait_state("in-sync", sync_timeout, "waiting for the first in-sync")
        yield pair
    except BaseException:
        delete_after = delete_after and not keep_on_error
        raise
    finally:
        pair.close()
        if delete_after:
            for vol in filter(None, (primary, secondary)):
                shutil.rmtree(vol, ignore_errors=True)


# -- measurements -----------------------------------------------------------------------

def fio_write(pair: Pair, *, bs: int, iodepth: int, runtime: float, ramp: float = 0,
              rw: str = "randwrite", size: int | None = None, extra: tuple[str, ...] = (),
              time_based: bool = True, stop: Callable[[], bool] | None = None,
              lat_log: Path | None = None, what: str = "fio") -> dict:
    """One fio write job on the primary over NBD; fio_summary's figures plus MiB/s, the CPU
    of the primary, the secondary and the proxy, and what other processes used.

    ``stop``: once it returns true, fio is interrupted (SIGINT: it still reports what it did, if it
    had begun) and ``runtime_s`` says how long it ran. ``lat_log``: also log every
    write's completion time (Unix epoch, ms) and latency to LAT_LOG_clat.1.log, for
    ``window_stats``."""
    cmd = [tool("fio"), f"--name={rw}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}",
           "--numjobs=1", "--output-format=json", "--percentile_list=50:99:99.9",
           "--ioengine=nbd", f"--uri={pair.uri}", *extra]
    if size is not None:
        cmd.append(f"--size={size}")
    if time_based:
        cmd += ["--time_based", f"--runtime={runtime:g}"]
    if ramp > 0:
        cmd.append(f"--ramp_time={ramp:g}")
    if lat_log is not None:
        cmd += [f"--write_lat_log={lat_log}", "--log_unix_epoch=1"]
    cpu0 = {p: cpu_seconds(p) for p in pair.pids}
    foreign = ForeignCpu(pair.primary_pid)
    foreign.ours |= set(pair.pids)
    interrupted = False
    with foreign:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        try:
            deadline = t0 + (runtime + ramp if time_based else 3600) + 120
            while proc.poll() is None:
                if stop is not None and not interrupted and stop():
                    proc.send_signal(signal.SIGINT)
                    interrupted = True
                if time.monotonic() > deadline:
                    raise BenchError(f"{what}: fio did not finish in time")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.02)
            out, err = proc.communicate()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        elapsed = time.monotonic() - t0
    if proc.returncode != 0 and not interrupted:
        if "terminating on signal 2" in err or proc.returncode == -signal.SIGINT:
            raise KeyboardInterrupt("fio was interrupted")  # Ctrl-C reached it first
        tail = "\n".join(err.strip().splitlines()[-5:])
        raise BenchError(f"{what}: fio exited {proc.returncode}: {tail} (the server's log: "
                         f"{pair.primary}/server.log)")
    try:
        summary = fio_summary(out)
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (BenchError, ValueError):
        if not interrupted:
            raise
        # interrupted before it began: nothing done
        summary, job = {"value": 0.0, "lat_p50_us": None, "lat_p99_us": None}, {}
    result = summary | {"mibs": round(summary["value"] * bs / MIB, 2),
                        "runtime_s": round(job.get("job_runtime", 0) / 1000, 3),
                        "elapsed_s": round(elapsed, 3), "interrupted": interrupted,
                        "command": " ".join(["fio", *cmd[1:]]), **foreign.result}
    for name, pid in (("primary", pair.primary_pid), ("secondary", pair.receiver_pid),
                      ("proxy", pair.proxy.pid if pair.proxy else None)):
        c0, c1 = cpu0.get(pid), cpu_seconds(pid)
        if c0 is not None and c1 is not None:
            result[f"{name}_cpu_pct"] = round(100 * (c1 - c0) / max(elapsed, 1e-3), 1)
    return result


def window_stats(lat_log: Path, start: float, end: float) -> dict | None:
    """The writes fio logged (``fio_write(lat_log=...)``) as completing between ``start``
    and ``end`` (Unix time, seconds): how many, their rate and latency; None if none."""
    lats, nbytes = [], 0
    first = last = None
    path = Path(f"{lat_log}_clat.1.log")
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            fields = line.split(",")
            if len(fields) < 4:
                continue
            t = int(fields[0]) / 1000
            first = t if first is None else min(first, t)
            last = t if last is None else max(last, t)
            if start <= t <= end:
                lats.append(int(fields[1]))
                nbytes += int(fields[3])
    if first is None:
        return None
    start = max(start, first)  # fio began after the resync did
    end = min(end, last)  # or ended (--runtime) before it was over
    seconds = end - start
    if not lats or seconds <= 0:
        return None
    lats.sort()
    pick = lambda q: lats[min(len(lats) - 1, int(q * len(lats)))] / 1000
    return {"ios": len(lats), "seconds": round(seconds, 3),
            "iops": round(len(lats) / seconds, 1), "mibs": round(nbytes / MIB / seconds, 2),
            "lat_p50_us": pick(0.50), "lat_p99_us": pick(0.99)}


class ResyncWatch:
    """Follows a resync from the primary's status, on a thread, until it is over.

    ``begun``: the primary reconnected (the resync starts with the link) and the new
    resync has sent something; ``sent``: it has handed every region to the link (which
    queues up to its window); ``synced``: no region is out of sync any more (the
    secondary applied them all: the resync's end); ``over``: the primary says in-sync,
    which also needs no host write in flight (under a steady host load it may come only
    after the load stops).
    """

    def __init__(self, pair: Pair, before: dict, timeout: float) -> None:
        self.pair = pair
        self.connects0 = before.get("connects", 0)
        self.resync_bytes0 = before.get("resync_bytes", 0)
        self.timeout = timeout
        self.t0 = time.monotonic()
        self.begun = threading.Event()
        self.sent = threading.Event()
        self.synced = threading.Event()
        self.over = threading.Event()
        self.times: dict[str, float] = {}  # seconds since t0
        self.wall: dict[str, float] = {}  # Unix time, to set against fio's logs
        self.last: dict = {}
        self.error: str | None = None
        self._quit = threading.Event()
        self.ended = threading.Event()  # the watch is over, whatever the reason
        self._thread = threading.Thread(target=self._watch, daemon=True, name="resync-watch")

    def __enter__(self) -> ResyncWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._quit.set()
        self._thread.join()

    def _mark(self, event: threading.Event, name: str) -> None:
        if not event.is_set():
            self.times[name] = time.monotonic() - self.t0
            self.wall[name] = time.time()
            event.set()

    def _watch(self) -> None:
        try:
            self._follow()
        finally:
            self.ended.set()

    def _follow(self) -> None:
        deadline = self.t0 + self.timeout
        while not self._quit.is_set() and not self.over.is_set():
            try:
                r = self.pair.link()
            except BenchError as err:
                self.error = str(err)
                return
            self.last = r
            rs = r.get("resync") or {}
            reconnected = r.get("connects", 0) > self.connects0
            if reconnected and (rs.get("running") or r.get("resync_bytes", 0)
                                > self.resync_bytes0 or r.get("state") == "in-sync"):
                self._mark(self.begun, "begun_s")
            if self.begun.is_set() and not rs.get("running") and (
                    rs.get("regions_sent", 0) >= rs.get("regions", 0)):
                self._mark(self.sent, "sent_s")
                if r.get("out_of_sync_regions", 1) == 0:
                    self._mark(self.synced, "synced_s")
            if self.synced.is_set() and r.get("state") == "in-sync":
                self._mark(self.over, "over_s")
            if time.monotonic() > deadline:
                self.error = (f"the resync was not over after {self.timeout:g}s (state "
                              f"{r.get('state')!r}, resync {rs})")
                return
            self._quit.wait(POLL)

    def wait(self, event: threading.Event, what: str, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not event.wait(0.1):
            if deadline is not None and time.monotonic() > deadline:
                self.error = (f"not after {timeout:g}s (state {self.last.get('state')!r}, "
                              f"last error {self.last.get('last_error')!r})")
            if self.error or self.ended.is_set():
                raise BenchError(f"{self.pair.label}: {what}: {self.error or 'watch ended'}")

    def summary(self) -> dict:
        rs = self.last.get("resync") or {}
        t = self.times
        begun = t.get("begun_s")
        out = {"regions": rs.get("regions"), "bytes_sent": rs.get("bytes_sent"),
               "data_bytes": self.last.get("resync_bytes", 0) - self.resync_bytes0,
               "reconnect_s": None if begun is None else round(begun, 2)}
        if begun is None:
            return out
        # each is seen up to one poll late: count from the poll before the first sight
        for key, name in (("sent_s", "handed_s"), ("synced_s", "s"),
                          ("over_s", "to_in_sync_s")):
            if key in t:
                out[name] = round(max(t[key] - begun + POLL, POLL), 3)
        if "s" in out:
            out["mibs"] = round((rs.get("bytes_sent") or 0) / MIB / out["s"], 1)
        return out


class BackToBackCycles:
    """Async: a cycle asked for (``cycle-now``) whenever the previous one has committed,
    on a thread, from ``__enter__`` until ``stop()`` (which lets the cycle under way
    commit, so every cycle asked for is counted whole).

    ``cycles``: one dict per cycle: ``number``, ``asked`` and ``seen`` (time.monotonic()
    of the request and of the poll that saw it committed), and the server's own
    ``seconds`` (take to commit), ``bytes`` and ``regions`` from ``last_cycle``, or None
    where the server does not report it (then ``bytes`` is the difference of
    ``bytes_conveyed``). ``error``: what stopped the thread early, if anything.
    """

    def __init__(self, pair: Pair, commit_timeout: float = 120) -> None:
        self.pair = pair
        self.commit_timeout = commit_timeout
        self.cycles: list[dict] = []
        self.error: str | None = None
        self._quit = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cycles")

    def __enter__(self) -> BackToBackCycles:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.stop()
        else:  # on the way out (Ctrl-C, a failure): not waiting for any commit
            self._abort.set()
            self._quit.set()
            self._thread.join(5)

    def stop(self) -> None:
        self._quit.set()
        self._thread.join(self.commit_timeout + 30)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(5)

    def _run(self) -> None:
        try:
            conveyed = self.pair.link().get("bytes_conveyed", 0)
            while not self._quit.is_set():
                asked = time.monotonic()
                number = self.pair.cycle_now()
                rep = self.pair.wait_committed(number, self.commit_timeout,
                                               "back-to-back cycles", abort=self._abort)
                seen = time.monotonic()
                last = rep.get("last_cycle") or {}
                mine = last.get("number") == number
                self.cycles.append({
                    "number": number, "asked": asked, "seen": seen,
                    "seconds": last.get("seconds") if mine else None,
                    "bytes": last.get("bytes") if mine else rep.get("bytes_conveyed", 0)
                    - conveyed,
                    "regions": last.get("regions") if mine else None})
                conveyed = rep.get("bytes_conveyed", 0)
        except BenchError as err:
            self.error = str(err)

    def summary(self, start: float, end: float) -> dict:
        """The cycles that overlapped [start, end] (time.monotonic()): how many, and for
        what fraction of that time one was under way. A cycle runs from ``seen -
        seconds`` (server-measured) to ``seen``, or, where the server does not say, from
        ``asked`` to ``seen`` (wall: up to a poll longer)."""
        busy, n, server_timed, nbytes = 0.0, 0, True, 0
        for c in self.cycles:
            if c["seconds"] is not None:
                a, b = max(c["asked"], c["seen"] - c["seconds"]), c["seen"]
            else:
                a, b = c["asked"], c["seen"]
                server_timed = False
            overlap = min(b, end) - max(a, start)
            if overlap > 0:
                busy += overlap
                n += 1
                nbytes += c["bytes"] or 0
        span = max(end - start, 1e-9)
        return {"cycles": n, "busy_fraction": round(busy / span, 3),
                "busy_from": "server last_cycle.seconds" if server_timed
                else "wall time between cycle-now and the commit seen",
                "bytes_conveyed": nbytes,
                "cycle_s_median": round(statistics.median(
                    [c["seen"] - c["asked"] for c in self.cycles]), 3) if self.cycles else None}
