"""Reconnect delays: jittered, exponential, capped, and reset after a good connection."""

from __future__ import annotations

import random

import pytest

from volume_core.replication.link import Backoff

pytestmark = pytest.mark.unit


def test_delays_grow_to_the_maximum_and_stay_within_the_jitter():
    backoff = Backoff(0.1, 5.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(20)]
    for n, delay in enumerate(delays):
        base = min(5.0, 0.1 * 2 ** n)
        assert base / 2 <= delay <= base
    assert max(delays) <= 5.0 and delays[-1] >= 2.5


def test_reset_starts_again_from_the_initial_delay():
    backoff = Backoff(0.2, 1.0, rng=random.Random(2))
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert 0.1 <= backoff.next_delay() <= 0.2


def test_jitter_spreads_reconnects():
    delays = {round(Backoff(1.0, 1.0).next_delay(), 6) for _ in range(20)}
    assert len(delays) > 10


def test_without_jitter_the_delays_are_exact():
    backoff = Backoff(0.5, 3.0, jitter=0)
    assert [backoff.next_delay() for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("kw", [{"initial": 0}, {"initial": 2, "maximum": 1}, {"factor": 0.5},
                                {"jitter": 1}])
def test_impossible_settings_are_refused(kw):
    with pytest.raises(ValueError):
        Backoff(**kw)
