"""The engine's write gate: counted, condition-based, bounded in time."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import wait_until
from volume_core.engine import Engine
from volume_core.errors import QuiesceTimeout
from volume_core.volume import Volume

pytestmark = pytest.mark.unit

RS = 4096


@pytest.fixture
def engine(tmp_path):
    e = Engine(Volume.create(tmp_path / "v", 64 * RS, RS))
    yield e
    e.close()


def _writer(engine: Engine, done: list[int]) -> threading.Thread:
    def run():
        engine.pwrite(b"w" * RS, 0)
        done.append(1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _stuck_write(engine: Engine) -> tuple[threading.Event, threading.Event, threading.Thread]:
    """A write held inside the write path (a pre-write hook waits) until released."""
    inside, release = threading.Event(), threading.Event()

    def hook(offset, length):
        if offset == 8 * RS:
            inside.set()
            release.wait(30)

    engine.pre_write.append(hook)
    t = threading.Thread(target=engine.pwrite, args=(b"s" * RS, 8 * RS), daemon=True)
    t.start()
    assert inside.wait(10)
    return inside, release, t


def test_gate_reopens_only_when_the_last_of_two_holders_leaves(engine):
    first, second = engine.quiesce(), engine.quiesce()
    first.__enter__()
    second.__enter__()
    done: list[int] = []
    t = _writer(engine, done)
    first.__exit__(None, None, None)  # the other holder still keeps writes out
    t.join(0.2)
    assert not done, "a write passed while the gate was still held"
    second.__exit__(None, None, None)
    t.join(10)
    assert done == [1]


def test_nested_quiesce_in_one_thread_does_not_deadlock(engine):
    with engine.quiesce(timeout=5), engine.quiesce(timeout=5):
        pass
    engine.pwrite(b"x" * RS, 0)  # and the gate is open again


def test_quiesce_waits_for_the_write_in_flight(engine):
    _inside, release, t = _stuck_write(engine)
    entered = threading.Event()

    def hold():
        with engine.quiesce(timeout=10):
            entered.set()

    q = threading.Thread(target=hold, daemon=True)
    q.start()
    q.join(0.2)
    assert not entered.is_set(), "quiesce returned while a write was in flight"
    release.set()
    wait_until(entered.is_set, 10, "quiesce after the write finished")
    t.join(10)
    q.join(10)


def test_a_stuck_write_times_quiesce_out_and_reopens_the_gate(engine):
    _inside, release, t = _stuck_write(engine)
    try:
        with pytest.raises(QuiesceTimeout, match="did not finish within"):
            with engine.quiesce(timeout=0.3):
                pass
        done: list[int] = []
        _writer(engine, done).join(10)
        assert done == [1], "the gate stayed closed after a timed-out quiesce"
    finally:
        release.set()
        t.join(10)


def test_snapshot_create_times_out_cleanly_behind_a_stuck_write(engine, monkeypatch):
    import volume_core.engine as engine_mod

    monkeypatch.setattr(engine_mod, "QUIESCE_TIMEOUT", 0.3)
    _inside, release, t = _stuck_write(engine)
    try:
        with pytest.raises(QuiesceTimeout):
            engine.create_snapshot("s")
        assert engine.list_snapshots() == []
    finally:
        release.set()
        t.join(10)
    engine.create_snapshot("s")  # works once the write is done
