"""A snapshot export read by many threads while another process changes the chain."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from volume_core.engine import Engine
from volume_core.snapshot_view import SnapshotView
from volume_core.volume import Volume

pytestmark = pytest.mark.integration

RS = 4096
N = 256
SIZE = RS * N

# The live side, in its own process: snapshots come and go while it writes.
LIVE = """
import sys
import numpy as np
from volume_core.engine import Engine
from volume_core.volume import Volume
e = Engine(Volume.open(sys.argv[1]))
rng = np.random.default_rng(2)
for i in range(80):
    e.create_snapshot(f"s{i}")
    e.pwrite(rng.integers(0, 256, 3 * 4096, dtype=np.uint8).tobytes(),
             4096 * int(rng.integers(0, 253)))
    if i % 2:
        e.delete_snapshot(f"s{i - 1}")
e.close()
"""


def test_parallel_readers_stay_exact_while_another_process_changes_the_chain(tmp_path):
    vol = Volume.create(tmp_path / "v", SIZE, RS)
    e = Engine(vol)
    rng = np.random.default_rng(1)
    e.pwrite(rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes(), 0)
    e.create_snapshot("base")
    image = bytearray(SIZE)
    e.pread(image, 0)
    e.close()
    view = SnapshotView(vol, "base")
    stop = threading.Event()
    results = {"ok": 0, "wrong": 0, "errors": []}

    def reader():
        buf = bytearray(SIZE)
        while not stop.is_set():
            try:
                view.pread(buf, 0)
            except Exception as err:  # noqa: BLE001
                results["errors"].append(repr(err))
                continue
            results["ok" if buf == image else "wrong"] += 1

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        subprocess.run([sys.executable, "-c", LIVE, str(vol.path)], check=True, timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        view.close()
    assert results["errors"] == [] and results["wrong"] == 0
    assert results["ok"] > 50
