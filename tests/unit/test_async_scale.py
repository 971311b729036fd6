"""What a cycle does per chunk is bounded, never proportional to the run of regions it
is in: a new secondary's initial sync of a 1 TiB volume is one run of 16M regions
(session 8: the live pass looked at the whole rest of the run before every chunk)."""

from __future__ import annotations

import pytest

from tests.conftest import wait_until
from tests.unit.test_attack_async import (  # noqa: F401 - primary_engine: the fixture
    REGIONS,
    RS,
    S1,
    FakeSecondary,
    mirrored,
    primary_engine,
)
from tests.unit.test_attack_session7 import random_data
from volume_core.live_pass import LivePass
from volume_core.replication import mirror as mirror_mod

pytestmark = pytest.mark.unit


def test_the_pass_asks_what_to_skip_a_bounded_stretch_at_a_time(engine, monkeypatch):
    monkeypatch.setattr(mirror_mod, "ZERO_SPAN", RS)  # span = one chunk's regions
    span = mirror_mod.CYCLE_CHUNK // RS
    asked: list[int] = []
    real = LivePass.skip_end

    def skip_end(self, first, stop):
        asked.append(stop - first)
        return real(self, first, stop)

    monkeypatch.setattr(LivePass, "skip_end", skip_end)
    engine.pwrite(random_data(8), 0)  # every region marked: one run of them all
    with mirrored(engine) as mirror:
        mirror.connected(FakeSecondary(mirror, S1))
        wait_until(lambda: mirror.committed >= 1, 10, "cycle 1")
    assert asked and max(asked) <= span < REGIONS
    assert mirror.stats["regions_conveyed"] == REGIONS
