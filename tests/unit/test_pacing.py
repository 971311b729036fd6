"""The rate cap of async cycles: the token bucket (pacing.py), the config that sets it,
and a capped mirror that conveys no faster than told."""

from __future__ import annotations

import random
import time

import pytest

from tests.conftest import wait_until
from tests.unit.test_attack_async import (
    S1,
    SIZE,
    FakeSecondary,
    primary_engine,  # noqa: F401 (the engine fixture)
)
from volume_core.errors import UsageError
from volume_core.pacing import Pacer
from volume_core.replication.mirror import CYCLE_CHUNK, AsyncMirror
from volume_core.replication.session import Settings

pytestmark = pytest.mark.unit

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_at_once_then_bytes_wait_for_the_rate():
    clock = Clock()
    pacer = Pacer(10 * MiB, burst=2 * MiB, clock=clock)
    assert pacer.delay(MiB) == 0 and pacer.delay(MiB) == 0  # the burst
    assert pacer.delay(MiB) == pytest.approx(0.1)  # 1 MiB owed at 10 MiB/s
    clock.now += 0.1  # waited it out
    assert pacer.delay(5 * MiB) == pytest.approx(0.5)


def test_over_a_long_run_the_average_is_the_rate():
    clock, sent = Clock(), 0
    pacer = Pacer(3 * MiB, burst=MiB, clock=clock)
    start = clock.now
    for size in random.Random(1).choices([4096, 65536, MiB], k=500):
        clock.now += pacer.delay(size)
        sent += size
    assert sent / (clock.now - start) == pytest.approx(3 * MiB, rel=0.05)


def test_a_quiet_spell_earns_no_more_than_the_burst():
    clock = Clock()
    pacer = Pacer(MiB, burst=MiB, clock=clock)
    pacer.delay(MiB)
    clock.now += 3600
    assert pacer.delay(MiB) == 0 and pacer.delay(MiB) == pytest.approx(1.0)


@pytest.mark.parametrize("rate, burst", [(0, 1), (1, 0), (-5, 10)])
def test_a_pacer_needs_a_positive_rate_and_burst(rate, burst):
    with pytest.raises(ValueError):
        Pacer(rate, burst)


@pytest.mark.parametrize("value, message", [
    ("fast", "invalid rate 'fast'"), ("512K", "at least 1M"), ("0", "greater than zero")])
def test_a_bad_max_rate_is_refused_in_the_config(value, message):
    config = {"replicate-to": "127.0.0.1:9", "mode": "async", "max-rate": value}
    with pytest.raises(UsageError, match=message):
        Settings.from_config(config)


def test_max_rate_is_for_async_only_and_parsed_as_a_size():
    base = {"replicate-to": "127.0.0.1:9", "max-rate": "100M"}
    with pytest.raises(UsageError, match="max-rate is for mode=async only"):
        Settings.from_config(base | {"mode": "sync"})
    assert Settings.from_config(base | {"mode": "async"}).max_rate == 100 * MiB
    assert Settings.from_config({"replicate-to": "127.0.0.1:9", "mode": "async"}).max_rate is None


def test_a_capped_mirror_conveys_no_faster_than_its_rate(engine):
    """The initial sync of the whole volume (8 MiB) at 16 MiB/s: after the burst of two
    chunks, 6 MiB at that rate take 0.375 s at least (uncapped: a few ms)."""
    engine.pwrite(random.Random(2).randbytes(SIZE), 0)
    rate = 16 * MiB
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0, max_rate=rate)
    try:
        sec = FakeSecondary(mirror, S1)
        t0 = time.monotonic()
        mirror.connected(sec)
        wait_until(lambda: mirror.committed >= 1, 10, "the initial sync")
        took = time.monotonic() - t0
        assert took >= (SIZE - 2 * CYCLE_CHUNK) / rate * 0.95, took
        assert mirror.status()["max_rate_bps"] == rate
        assert sec.commits[1] == bytes(sec.image)
    finally:
        mirror.close()


def test_a_mirror_waiting_for_its_rate_stops_at_once_when_closed(engine):
    engine.pwrite(random.Random(3).randbytes(SIZE), 0)
    mirror = AsyncMirror(engine, interval=0, ack_timeout=2.0, max_rate=MiB)
    sec = FakeSecondary(mirror, S1)
    mirror.connected(sec)
    wait_until(lambda: sec.chunks >= 2, 10, "the burst")
    t0 = time.monotonic()
    mirror.close()  # 6 MiB still to pace at 1 MiB/s
    assert time.monotonic() - t0 < 2
    assert mirror.committed == 0 and sec.chunks < SIZE // CYCLE_CHUNK
