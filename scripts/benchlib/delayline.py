"""A process around tests/fault_proxy.py's delay, for links the bench builds in namespaces.

Run as a script (``python scripts/benchlib/delayline.py COMMAND``), usually through
``ip netns exec``, since the proxy listens on the 127.0.0.1 of the namespace it runs in:

  forward --target HOST:PORT --delay S   forward a port of 127.0.0.1 to HOST:PORT, every
                                         chunk held S seconds each way; prints
                                         {"port": N} once it listens, runs until SIGTERM
                                         or its stdin closes
  sink --listen HOST:PORT                the far end of ``ping``: echoes a ping, swallows
                                         a bulk transfer and answers its last byte
  ping --target HOST:PORT                round trips of one byte, then one bulk transfer,
                                         to a sink (through a ``forward``); prints JSON

Standard library only (it runs outside the venv's site-packages if need be); the proxy
is imported from tests/fault_proxy.py by path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

FAULT_PROXY = Path(__file__).resolve().parents[2] / "tests" / "fault_proxy.py"
_PING = b"P"
_BULK = b"B"


def fault_proxy_class():
    spec = importlib.util.spec_from_file_location("nbdm_bench_fault_proxy", FAULT_PROXY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FaultProxy


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def wait_for_end() -> None:
    """Until SIGTERM/SIGINT or EOF on stdin (the bench going away)."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())

    def watch_stdin() -> None:
        while sys.stdin.buffer.read(4096):
            pass
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not done.wait(0.5):
        pass


def forward(args: argparse.Namespace) -> None:
    proxy = fault_proxy_class()(parse_address(args.target))
    proxy.delay(args.delay)
    with proxy:
        print(json.dumps({"port": proxy.address[1]}), flush=True)
        wait_for_end()
        print(json.dumps({"connections": proxy.connections, "up": proxy.forwarded("up"),
                          "down": proxy.forwarded("down")}), flush=True)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def _sink_client(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    try:
        while True:
            kind = _recv_exact(conn, 1)
            if kind == _PING:
                conn.sendall(_PING)
            elif kind == _BULK:
                left = struct.unpack("!Q", _recv_exact(conn, 8))[0]
                while left:
                    n = conn.recv_into(buf, min(left, len(buf)))
                    if not n:
                        return
                    left -= n
                conn.sendall(_BULK)
            else:
                return
    except OSError:
        return
    finally:
        conn.close()


def sink(args: argparse.Namespace) -> None:
    server = socket.create_server(parse_address(args.listen))
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_sink_client, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    wait_for_end()
    server.close()


def ping(args: argparse.Namespace) -> None:
    with socket.create_connection(parse_address(args.target), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(args.pings):
            t0 = time.perf_counter()
            sock.sendall(_PING)
            _recv_exact(sock, 1)
            rtts.append(time.perf_counter() - t0)
            time.sleep(0.01)
        payload = memoryview(bytes(1 << 20))
        t0 = time.perf_counter()
        sock.sendall(_BULK + struct.pack("!Q", args.bulk))
        left = args.bulk
        while left:
            n = min(left, len(payload))
            sock.sendall(payload[:n])
            left -= n
        _recv_exact(sock, 1)
        bulk_s = time.perf_counter() - t0
        sock.sendall(b"Q")
    rtt = statistics.median(rtts)
    print(json.dumps({
        "rtt_ms": round(rtt * 1000, 3), "rtt_min_ms": round(min(rtts) * 1000, 3),
        "rtt_max_ms": round(max(rtts) * 1000, 3), "pings": len(rtts),
        "bulk_bytes": args.bulk, "bulk_s": round(bulk_s, 4),
        # the last byte's trip back is one more half round trip than the data needs
        "bulk_mibs": round(args.bulk / (1 << 20) / max(bulk_s - rtt / 2, 1e-6), 1),
    }), flush=True)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="delayline.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("forward")
    f.add_argument("--target", required=True)
    f.add_argument("--delay", type=float, required=True)
    s = sub.add_parser("sink")
    s.add_argument("--listen", required=True)
    pr = sub.add_parser("ping")
    pr.add_argument("--target", required=True)
    pr.add_argument("--pings", type=int, default=50)
    pr.add_argument("--bulk", type=int, default=64 << 20)
    args = p.parse_args(argv)
    {"forward": forward, "sink": sink, "ping": ping}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
