"""The secondary's pending-write order (replication/secondary.py): ``_next_applicable``
picks exactly what the plain walk over every earlier span picked, without its O(n²)
work when thousands of entries wait; entries leave the order as they came."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_secondary import RS, SIZE, make, read
from volume_core.replication import protocol as p
from volume_core.replication.secondary import FaultInjector, Receiver, _Entry, _Held
from volume_core.write_events import WRITE

pytestmark = pytest.mark.unit

#: Deterministic like the rest of the suite; no example database left in the work tree.
#: The examples share one receiver (the ``engine`` fixture) and set only its order.
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


def reference(order: list[_Entry], applicable: int) -> _Entry | None:
    """``_next_applicable`` as it was, O(n²): the semantics the new one must keep."""
    left = applicable
    held: list[tuple[int, int]] = []
    for entry in order:
        if not left:
            break
        if entry.ready and entry.acked and not entry.applying:
            if not any(a < entry.stop and entry.first < b for a, b in held):
                return entry
            left -= 1
        held.append((entry.first, entry.stop))
    return None


def candidates(order: list[_Entry]) -> int:
    """What ``Receiver._applicable`` counts: entries ready and acked, not applying."""
    return sum(e.ready and e.acked and not e.applying for e in order)


def entry(seq: int, first: int, stop: int, *, ready: bool = True, acked: bool = True,
          applying: bool = False) -> _Entry:
    return _Entry((seq, 0, 0), WRITE, seq, first * RS, (stop - first) * RS, first, stop,
                  ready=ready, acked=acked, applying=applying)


@pytest.fixture
def rx(engine) -> Receiver:
    return make(engine)[0]


# -- the same choice as the plain walk -------------------------------------------

#: (first region, regions): mostly a few regions among few (so entries share them), some
#: TRIM or ZERO sized spans of millions, and some far away.
SPANS = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(1, 4)),
    st.tuples(st.integers(0, 40), st.integers(1, 10_000_000)),
    st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 30)),
)
#: (ready, acked, applying): every mix, entries that may be applied the likeliest.
FLAGS = st.one_of(st.just((True, True, False)),
                  st.tuples(st.booleans(), st.booleans(), st.booleans()))
ENTRIES = st.lists(st.tuples(st.integers(1, 80), SPANS, FLAGS), max_size=80)


def build_order(drawn) -> list[_Entry]:
    """Entries in key order; equal keys (a new link's writes beside an old link's) kept
    in arrival order, as ``bisect.insort`` keeps them."""
    order = [entry(seq, first, first + count, ready=r, acked=a, applying=ap)
             for seq, (first, count), (r, a, ap) in drawn]
    return sorted(order, key=lambda e: e.key)


@settings(FUZZ, max_examples=600)
@given(drawn=ENTRIES, data=st.data())
def test_the_pick_is_the_plain_walks(rx, drawn, data):
    order = build_order(drawn)
    n = candidates(order)
    # The counter as kept, and (the walk stops early on it) any other value.
    applicable = data.draw(st.one_of(st.just(n), st.integers(0, n + 2)), label="applicable")
    rx._order, rx._applicable = order, applicable
    assert rx._next_applicable() is reference(order, applicable)


@settings(FUZZ, max_examples=400)
@given(st.lists(st.tuples(st.booleans(), SPANS), max_size=120))
def test_held_answers_as_a_scan_of_every_span_would(steps):
    """``_Held`` on its own: any mix of adding and asking (the first question scans, the
    later ones take the spans added since into runs)."""
    held = _Held()
    for ask, (first, count) in steps:
        stop = first + count
        if ask:
            expected = any(a < stop and first < b for a, b in held.spans)
            assert held.overlaps(first, stop) == expected, (first, stop, held.spans)
        else:
            held.spans.append((first, stop))


def test_many_waiting_entries_take_no_quadratic_work(rx):
    """Thousands of METAs whose data has not come, thousands of writes waiting behind
    them, one write elsewhere: each pick compares region numbers O(n log n) times (the
    plain walk compared each waiting write with every span below it).

    Work is counted, not timed: region numbers that count the comparisons made with them.
    """
    n = 5000
    order = waiting_order(n)
    rx._order, rx._applicable = order, candidates(order)
    bound = 8 * n * n.bit_length()
    for _ in range(3):  # nothing changes between picks: each walks it all again
        Counted.seen = 0
        assert rx._next_applicable() is order[-1]
        assert Counted.seen <= bound
    # The measure would catch the old walk, already at a fifth of the size.
    small = waiting_order(n // 5)
    Counted.seen = 0
    assert reference(small, candidates(small)) is small[-1]
    assert Counted.seen > 8 * (n // 5) * (n // 5).bit_length()


def test_a_long_walk_to_the_one_applicable_write_stays_linear(rx):
    """5000 METAs without their data, then one write with it: one pass and one question,
    a scan, as cheap as the plain walk (no runs built for a walk that asks once)."""
    n = 5000
    order = [entry(seq, Counted(2 * seq), Counted(2 * seq + 1), ready=False)
             for seq in range(1, n + 1)]
    order.append(entry(n + 1, Counted(1), Counted(2)))
    rx._order, rx._applicable = order, 1
    for _ in range(3):
        Counted.seen = 0
        assert rx._next_applicable() is order[-1]
        assert Counted.seen <= 2 * (n + 1)


class Counted(int):
    """A region number that counts the comparisons made with it: a walk's work."""

    seen = 0

    def __lt__(self, other: object) -> bool:
        Counted.seen += 1
        return int.__lt__(self, other)

    def __le__(self, other: object) -> bool:
        Counted.seen += 1
        return int.__le__(self, other)

    def __gt__(self, other: object) -> bool:
        Counted.seen += 1
        return int.__gt__(self, other)

    def __ge__(self, other: object) -> bool:
        Counted.seen += 1
        return int.__ge__(self, other)


def waiting_order(n: int) -> list[_Entry]:
    """n/2 METAs without data (regions 0, 2, 4, ...), then n/2 writes with data, each
    sharing the region of one of them, then one write with data on a region of its own."""
    rng = random.Random(n)
    half = n // 2
    metas = [entry(seq, Counted(2 * seq), Counted(2 * seq + 1), ready=False)
             for seq in range(half)]
    waiting = []
    for seq in range(half, 2 * half):
        region = 2 * rng.randrange(half)
        waiting.append(entry(seq, Counted(region), Counted(region + 1)))
    free = entry(2 * half, Counted(2 * half + 1), Counted(2 * half + 2))
    return metas + waiting + [free]


# -- through the frames --------------------------------------------------------


def check_every_pick(receiver: Receiver) -> list[_Entry | None]:
    """Compare each pick ``drain`` makes with the plain walk's, and the counter with the
    order it counts (lock held, as drain holds it)."""
    real = receiver._next_applicable
    picks: list[_Entry | None] = []

    def next_applicable() -> _Entry | None:
        assert receiver._applicable == candidates(receiver._order)
        got = real()
        assert got is reference(receiver._order, receiver._applicable)
        picks.append(got)
        return got

    receiver._next_applicable = next_applicable  # drain() looks it up on the instance
    return picks


def random_stream(rng: random.Random, n: int) -> tuple[list[p.Frame], bytes]:
    """n semi-async writes (WRITE, TRIM, ZERO; a few over the whole volume) as frames: the
    METAs in order, each DATA some time after its META; and the volume after them."""
    image = bytearray(SIZE)
    frames: list[p.Frame] = []
    late: list[p.Data] = []
    span = 16 * RS  # a quarter of the volume: most writes share regions
    for seq in range(1, n + 1):
        offset = rng.randrange(0, span - 1)
        length = rng.randrange(1, min(3 * RS, span - offset) + 1)
        what = rng.random()
        if what < 0.03:
            offset, length = 0, SIZE
        if what < 0.15:
            kind = rng.choice([p.WriteKind.TRIM, p.WriteKind.ZERO])
            frames.append(p.Meta(seq, offset, length, kind))
            image[offset:offset + length] = bytes(length)
        else:
            data = bytes([seq % 251 + 1]) * length
            frames.append(p.Meta(seq, offset, length))
            late.append(p.Data(seq, offset, data))
            image[offset:offset + length] = data
        while late and rng.random() < 0.5:
            frames.append(late.pop(rng.randrange(len(late))))
    rng.shuffle(late)
    return frames + late, bytes(image)


@pytest.mark.parametrize("seed", range(4))
def test_writes_failures_and_recoveries_pick_as_the_plain_walk(engine, seed):
    """Out-of-order data, failed writes whose recoveries hold later writes back, and
    every entry leaving the order: each pick is the plain walk's, the end is the image."""
    rng = random.Random(seed)
    faults = FaultInjector()
    for region in rng.sample(range(16), 4):
        faults.fail(region)
    receiver, out = make(engine, faults=faults)
    picks = check_every_pick(receiver)
    frames, image = random_stream(rng, 300)
    for frame in frames:
        receiver.handle(frame)
    answered: set[int] = set()
    while asks := [f for f in out.of(p.ReadRegion) if f.seq not in answered]:
        for ask in asks:  # the primary's current contents: every write is in them
            answered.add(ask.seq)
            receiver.handle(p.RegionData(ask.seq, ask.offset,
                                         image[ask.offset:ask.offset + ask.length]))
    assert faults.injected and answered  # one apply may hit several at once
    assert read(engine, 0, SIZE) == image
    assert receiver._order == [] and receiver._applicable == 0
    done = {f.seq for f in out.of(p.DataAck)} | {f.seq for f in out.of(p.WriteFailed)}
    assert set(range(1, 301)) <= done
    assert sum(1 for e in picks if e is not None) == 300 + len(answered)


def test_an_old_links_write_still_applying_leaves_the_order_not_the_new_one(engine):
    """A restarted primary numbers from 1 again while the lost link's write 1 applies:
    two entries with one key. Each one's removal takes itself out."""
    hook = ApplyHook()
    receiver, out = make(engine, faults=hook)

    def meanwhile() -> None:  # in write 1's apply, outside the receiver's lock
        receiver.link_lost()
        receiver.handle(p.Meta(1, 5 * RS, RS))  # the new link's write 1: another region
        receiver.handle(p.Meta(2, 0, RS))  # and its write 2 (the old write 1's region)
        keys = [e.key for e in receiver._order]
        assert keys == [(1, 0, 0), (1, 0, 0), (2, 0, 0)]
        receiver.handle(p.Data(1, 5 * RS, b"n" * RS))  # drains the new write 1 here
        # It left; the old write 1, still applying, stayed (both have one key).
        assert [(e.seq, e.offset) for e in receiver._order] == [(1, 0), (2, 0)]

    hook.meanwhile = meanwhile
    receiver.handle(p.Meta(1, 0, RS))
    receiver.handle(p.Data(1, 0, b"o" * RS))  # applies the old write 1, calling meanwhile
    assert [e.seq for e in receiver._order] == [2]  # the new write 2, waiting for its data
    assert read(engine, 0, RS) == b"o" * RS and read(engine, 5 * RS, RS) == b"n" * RS
    receiver.handle(p.Data(2, 0, b"2" * RS))
    assert receiver._order == [] and read(engine, 0, RS) == b"2" * RS
    # The old link's answer is dropped; the new link's writes are answered.
    assert out.of(p.DataAck) == [p.DataAck(1), p.DataAck(2)]


class ApplyHook(FaultInjector):
    """Runs ``meanwhile`` once, in the first apply (where the receiver checks faults)."""

    def __init__(self) -> None:
        super().__init__()
        self.meanwhile = None

    def check(self, first: int, stop: int) -> None:
        run, self.meanwhile = self.meanwhile, None
        if run is not None:
            run()
