"""fio's nbd engine: random writes verified with crc32c through the export."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
def test_fio_randwrite_verifies_crc32c(serve, cli):
    s = serve(size="64M")
    proc = subprocess.run(
        ["fio", "--name=verify", "--ioengine=nbd", f"--uri={s.uri}", "--rw=randwrite",
         "--bs=4k", "--iodepth=16", "--size=32M", "--offset=16M", "--verify=crc32c",
         "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
         "--output-format=json"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 32 << 20
    assert job["read"]["io_bytes"] >= 32 << 20  # the verify pass read everything back
    st = cli("status", s.vol, "--json").json()
    assert st["marked_regions"] == 32 * 1024 // 64  # exactly the 32M written, in 64K regions
    assert st["stats"]["bytes_written"] >= 32 << 20
