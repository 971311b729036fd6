"""Attack round on session 5's changes (one fdatasync at a time on the secondary, the
primary's Answer, the decoder receiving payloads in place).

Each test either showed a bug (fixed in the same session) or probed something that held
up; all stay as regression tests."""

from __future__ import annotations

import errno
import threading

import pytest

from tests.unit.test_secondary import RS, Out, marked
from volume_core.replication import protocol as p
from volume_core.replication.primary import Answer
from volume_core.replication.secondary import SYNC, Receiver

pytestmark = pytest.mark.unit

# ------------------------------------------------------------- the secondary's fdatasync


def test_a_write_applied_before_a_failed_sync_but_noted_after_it_is_not_swept(engine):
    """fsyncgate, the applier's side: the applier has written region 3 (its page is dirty
    in the page cache) and not yet taken the entry out when a FLUSH's fdatasync fails.
    Linux may have dropped that page and reports the failure to that one call only, so a
    later fdatasync succeeds: region 3 must stay marked (or be recovered), never swept."""
    out = Out()
    rx = Receiver(engine, SYNC, out, wake=lambda: None)  # applied on our "applier" thread
    real_apply, real_flush = engine.apply_replica, engine.flush
    written, release = threading.Event(), threading.Event()

    def apply_then_pause(event, mark: bool = True) -> None:  # descheduled after its pwrite
        real_apply(event, mark)
        written.set()
        assert release.wait(10)

    engine.apply_replica = apply_then_pause
    rx.handle(p.Write(1, 3 * RS, b"a" * RS))
    applier = threading.Thread(target=rx.drain, daemon=True)
    applier.start()
    try:
        assert written.wait(5)
        failures = [OSError(errno.EIO, "injected fdatasync failure")]

        def flaky_flush() -> None:  # the first fdatasync from now fails, later ones succeed
            if failures:
                raise failures.pop()
            real_flush()

        engine.flush = flaky_flush
        rx.handle(p.Flush(2))  # the reader's FLUSH: its sync fails
        assert p.FlushAck(2, failed=True) in out.frames
    finally:
        release.set()
        applier.join(10)
    assert not applier.is_alive()
    assert p.DataAck(1) in out.frames
    rx.sweep()  # the timer's sweep: this fdatasync succeeds
    asked = {(f.offset, f.length) for f in out.frames if isinstance(f, p.ReadRegion)}
    assert 3 in marked(engine) or (3 * RS, RS) in asked, (
        "region 3 was swept although its page may have been dropped by the failed sync")


# --------------------------------------------------------------------- the primary's Answer


def test_an_answer_set_late_or_twice_never_blocks_or_raises_and_wakes_its_waiter():
    """Answer replaced threading.Event in Ticket: a late set after a timed-out wait, a
    second set (an ack, then the link lost), and a wait after the set all behave as an
    Event's would; a waiter blocked on it is woken by set()."""
    answer = Answer()
    assert not answer.wait(0.0) and not answer.is_set()
    answer.set()
    answer.set()  # a second set (the link lost after the ack) does nothing
    assert answer.is_set() and answer.wait(0.0) and answer.wait(0.0)

    waiting = Answer()
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(waiting.wait(10)))
    waiter.start()
    waiting.set()
    waiter.join(5)
    assert woke == [True]


def test_an_answer_waited_with_a_negative_timeout_returns_false_at_once_as_an_event_did():
    results: dict[float, object] = {}

    def wait(answer: Answer, timeout: float) -> None:
        try:
            results[timeout] = answer.wait(timeout)
        except ValueError as err:
            results[timeout] = err

    answers = {timeout: Answer() for timeout in (-0.5, -1.0)}
    waiters = [threading.Thread(target=wait, args=(a, t), daemon=True)
               for t, a in answers.items()]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(1.0)
    hung = [t for t, a in answers.items() if t not in results]
    for answer in answers.values():  # clean-up: let a stuck waiter go
        answer.set()
    assert not hung, f"wait({hung[0]}) blocks (Event.wait returned False at once)"
    assert results == {-0.5: False, -1.0: False}, results


# --------------------------------------------------------------- the decoder, in place


def _stream(frames: list[p.Frame]) -> bytes:
    return b"".join(p.encode(f) for f in frames)


def _decoder() -> p.Decoder:
    return p.Decoder(size=64 << 20, region_size=64 << 10)


def test_max_data_and_exactly_64_kib_payloads_received_in_place_byte_by_byte_at_the_edges():
    """A MAX_DATA payload and one of exactly _HANDOFF_MIN bytes, received in place with
    one-byte steps around every boundary and a frame's header arriving with the tail of
    the payload before it (receive_data while a payload is being received in place)."""
    frames = [p.Write(1, 0, bytes(range(256)) * (p.MAX_DATA // 256)),
              p.Data(2, 0, b"\x07" * (64 << 10)), p.MetaAck(3),
              p.Write(4, 0, b"\x01" * ((64 << 10) + 1))]
    stream = _stream(frames)
    dec, got, pos = _decoder(), [], 0
    sizes = [p.HEADER_SIZE - 1, 1, 1] + [p.MAX_DATA - 3] + [1] * 4 + [1 << 20] * 40
    while pos < len(stream):
        size = sizes.pop(0) if sizes else 1 << 20
        target = dec.receive_buffer()
        if target is not None and len(target) > 2:  # keep 2 bytes for receive_data
            n = min(size, len(target) - 2)
            target[:n] = stream[pos:pos + n]
            dec.received(n)
            assert dec.bytes_needed() == len(target) - n
        else:
            n = min(size, len(stream) - pos)
            dec.receive_data(stream[pos:pos + n])
        pos += n
        while (frame := dec.next_frame()) is not p.NEED_DATA:
            got.append(frame)
    dec.receive_data(b"")
    assert dec.next_frame() is p.PEER_CLOSED and dec.buffered == 0
    assert got == frames


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "soon", "nan", "1e9"])
def test_an_ack_timeout_that_is_not_a_positive_number_of_seconds_is_refused(value):
    """ack-timeout reaches Answer.wait and the link's waits: refused in the plugin's config
    (one usage error line), never a hang or a traceback at the first write."""
    from volume_core.errors import UsageError
    from volume_core.replication.session import Settings

    config = {"replicate-to": "127.0.0.1:9", "mode": "sync", "ack-timeout": value}
    with pytest.raises(UsageError, match=f"ack-timeout={value}: expected seconds"):
        Settings.from_config(config)
    assert Settings.from_config(config | {"ack-timeout": "2.5"}).ack_timeout == 2.5
