"""Attack round on session 5's link changes over real TCP (and TLS): a writer that holds
the socket drains what other threads queued, lent payloads, payloads received in place.

Each test either showed a bug (fixed in the same session) or probed something that held
up; all stay as regression tests."""

from __future__ import annotations

import contextlib
import itertools
import queue
import random
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.integration.test_link import (
    QUIET,
    Ends,
    client_tls,
    server_tls,
    wait_until,
)
from volume_core.errors import LinkError
from volume_core.replication import link
from volume_core.replication.protocol import (
    HEADER_SIZE,
    MAX_DATA,
    Data,
    Flush,
    Frame,
    Write,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_threads_left() -> Iterator[None]:
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith(("link-", "proxy-"))]
    assert not left, f"threads left running: {left}"


def hook_try_send(channel: link.Channel, before: Callable[[int], None]) -> list[int]:
    """Call ``before(n)`` at the start of the n-th direct write (``try_send``) of
    ``channel``, while its writer holds the socket; returns the list of calls."""
    real = channel._t.try_send
    calls: list[int] = []

    def try_send(parts):
        calls.append(len(calls) + 1)
        before(len(calls))
        return real(parts)

    channel._t.try_send = try_send
    return calls


def in_another_thread(fn: Callable[[], object]) -> None:
    """Run ``fn`` on a thread of its own, to its end (another sender, at this moment)."""
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


def first_frame_or_close(ends: Ends, timeout: float = 5.0) -> Frame:
    wait_until(lambda: not ends.frames.empty() or ends.closed.is_set(), timeout)
    assert ends.frames.qsize(), f"no frame; the channel closed: {ends.reason}"
    return ends.get()


# ----------------------------------------------------------------------- lent payloads


def test_a_lent_payload_sent_inside_corked_is_not_read_after_the_call(secondary, primary):
    sec = secondary(options=QUIET)
    ours = Ends(primary(sec.address, options=QUIET)).start()
    theirs = sec.end()
    buf = bytearray(b"\x11" * (256 << 10))
    with ours.channel.corked():
        ours.channel.send_bulk(Write(1, 0, memoryview(buf).toreadonly()), lent=True)
        buf[:] = b"\xee" * len(buf)  # the call returned: the buffer is the caller's again
    frame = first_frame_or_close(theirs)
    assert bytes(frame.data) == b"\x11" * len(buf)


def stalled_reader(secondary, **kw):
    """A secondary whose reader stops at the first frame until ``gate`` is set, and a
    function that sends that first frame on a channel and waits until the reader holds
    it: from then on the socket takes only what its buffers can (else the reader drains
    a whole large frame before it stops, and nothing is left unsent to look at)."""
    gate, holding = threading.Event(), threading.Event()

    def on_frame(frame):
        holding.set()
        gate.wait(10)

    sec = secondary(on_frame=on_frame, **kw)

    def stall(channel) -> None:
        channel.send_bulk(Write(99, 0, bytes(4096)))
        assert holding.wait(10), "the secondary's reader never took the first frame"

    return sec, gate, stall


def test_the_rest_of_a_lent_frame_over_tls_is_not_copied_again(secondary, primary, certs):
    sec, gate, stall = stalled_reader(secondary, tls_ctx=server_tls(certs))
    # not started: what the direct write leaves stays in the channel to look at
    channel = primary(sec.address, tls=client_tls(certs), options=QUIET)
    sec.end()
    stall(channel)
    wires: list[list[memoryview]] = []
    real = channel._t._wire

    def wire(parts):
        out = real(parts)
        wires.append(list(out))
        return out

    channel._t._wire = wire
    try:
        channel.send_bulk(Write(1, 0, bytes(16 * MiB)), lent=True)
        rest = channel._rest
        assert rest, "the socket took the whole frame: nothing left to look at"
        (ciphertext,) = wires
        assert all(view.obj is ciphertext[0].obj for view in rest), "the rest was copied"
    finally:
        gate.set()


def test_copying_a_lent_payload_that_must_wait_does_not_block_other_senders(
        secondary, primary, monkeypatch):
    sec, gate, stall = stalled_reader(secondary)
    channel = primary(sec.address, options=QUIET)  # not started: the rest below stays
    sec.end()
    stall(channel)
    real_kept = link._Pending.kept
    copying, release = threading.Event(), threading.Event()

    def slow_kept(self):  # a copy of a large payload takes a while
        if self.lent:
            copying.set()
            assert release.wait(10)
        return real_kept(self)

    monkeypatch.setattr(link._Pending, "kept", slow_kept)
    host = urgent = None
    try:
        channel.send_bulk(Write(1, 0, bytes(16 * MiB)))  # leaves a rest: the link is busy
        assert channel._rest
        host = threading.Thread(target=channel.send_bulk, args=(Write(2, 0, bytes(MiB)),),
                                kwargs={"lent": True})
        host.start()
        assert copying.wait(5)  # the host's frame must wait: its payload is being copied
        urgent = threading.Thread(target=channel.send_urgent, args=(Flush(3),))
        urgent.start()
        urgent.join(1.0)
        assert not urgent.is_alive(), "send_urgent waited for another thread's copy"
    finally:
        release.set()
        gate.set()
        for thread in (host, urgent):
            if thread is not None:
                thread.join(10)


# ---------------------------------------------------------- a writer drains the queue


def test_a_direct_writer_is_not_held_draining_other_threads_frames(secondary, primary):
    sec = secondary(options=QUIET)
    ours = Ends(primary(sec.address, options=QUIET)).start()
    theirs = sec.end()
    rounds = 40
    stream = iter(range(1001, 1001 + rounds))  # a steady stream of other senders' frames

    def another_thread_queues(call: int) -> None:
        seq = next(stream, None)
        if seq is not None:
            in_another_thread(lambda: ours.channel.send_urgent(Flush(seq)))

    calls = hook_try_send(ours.channel, another_thread_queues)
    ours.channel.send_bulk(Write(1, 0, b"w" * 4096))  # the host's write, written directly
    writes = len(calls)
    for seq in stream:  # the stream goes on after the host's call returned
        ours.channel.send_urgent(Flush(seq))
    got = sorted(theirs.get().seq for _ in range(rounds + 1))
    assert got == [1, *range(1001, 1001 + rounds)]  # every frame arrived either way
    assert writes <= 3, (f"send_bulk wrote {writes} times: it drained {writes - 1} rounds "
                         "of other threads' frames before returning")


def test_frames_a_direct_writer_took_from_the_queue_still_count_in_the_window(
        secondary, primary):
    gate = threading.Event()
    sec = secondary(on_frame=lambda frame: gate.wait(10))  # stops reading at the first frame
    window = 32 * MiB
    options = link.ChannelOptions(window=window, send_timeout=0.05, peer_timeout=20,
                                  ping_interval=10)
    channel = primary(sec.address, options=options)  # not started: nothing sends the rest
    sec.end()
    accepted = [0]  # bytes of every send_bulk that returned
    into_kernel = [0]  # bytes the socket took

    def send(seq: int, payload: bytes) -> None:
        channel.send_bulk(Write(seq, (seq % 64) * MiB, payload))
        accepted[0] += HEADER_SIZE + len(payload)

    def fill_the_window() -> None:
        with contextlib.suppress(LinkError):  # full: the last one times out
            for i in range(100):
                send(100 + i, b"q" * MiB)

    real = channel._t.try_send

    def try_send(parts):
        if not into_kernel[0] and not accepted[0]:  # the first direct write: others
            in_another_thread(fill_the_window)  # queue frames meanwhile
        rest = real(parts)
        into_kernel[0] += sum(map(len, parts)) - sum(map(len, rest))
        return rest

    channel._t.try_send = try_send
    try:
        send(1, b"w" * 4096)  # written directly; takes what was queued meanwhile
        fill_the_window()  # and more senders come
        held = accepted[0] - into_kernel[0]
        assert held <= window + MiB + HEADER_SIZE, (
            f"the link holds {held / MiB:.1f} MiB unsent, over its window of "
            f"{window / MiB:.0f} MiB")
    finally:
        gate.set()


def test_an_unexpected_error_in_a_direct_write_does_not_wedge_the_channel(secondary, primary):
    sec = secondary(options=QUIET)
    ours = Ends(primary(sec.address, options=QUIET)).start()
    theirs = sec.end()
    channel = ours.channel
    real = channel._t.try_send

    def broken(parts):
        channel._t.try_send = real  # once
        in_another_thread(lambda: channel.send_urgent(Flush(2)))  # queued meanwhile
        raise ValueError("a bug in the transport")

    channel._t.try_send = broken
    with pytest.raises(ValueError):
        channel.send_urgent(Flush(1))
    closer = threading.Thread(target=channel.close, args=("the primary gives up",))
    problems = []
    try:
        with contextlib.suppress(LinkError):  # (a channel closed for the bug is fine too)
            channel.send_urgent(Flush(3))
        with contextlib.suppress(AssertionError):
            wait_until(lambda: theirs.frames.qsize() >= 2 or theirs.closed.is_set(), 1.0)
        if not (theirs.frames.qsize() >= 2 or theirs.closed.is_set()):
            problems.append("nothing more leaves: the socket stays taken")
        closer.start()
        closer.join(1.0)
        if closer.is_alive():
            problems.append("close() hangs")
        assert not problems
    finally:
        with channel._cond:  # unwedge (test clean-up only)
            channel._writing = False
            channel._cond.notify_all()
        if closer.ident is not None:
            closer.join(10)


def test_many_threads_lending_buffers_keep_order_content_counts_and_window(secondary,
                                                                          primary):
    """Host threads, each reusing one buffer it lends to the link, send bulk DATA and
    urgent FLUSH frames at once, and another one queues frames during the first direct
    writes (so that writers drain the queue): every frame arrives with the bytes of its
    call, in its thread's order per priority, never a bulk frame before an urgent one its
    thread sent earlier (a META before its DATA); the counters add up, the window empties."""
    sec = secondary(options=QUIET)
    ours = Ends(primary(sec.address, options=link.ChannelOptions(
        window=256 * MiB, ping_interval=10, peer_timeout=20))).start()  # never blocks
    theirs = sec.end()
    channel = ours.channel
    threads, per, injected = 4, 60, 30
    sizes: dict[int, int] = {}
    total_bytes = [0]
    lock = threading.Lock()

    def send(t: int, i: int, rng: random.Random, buf: bytearray) -> None:
        seq = t * 10_000 + i
        if rng.random() < 0.3:
            channel.send_urgent(Flush(seq))
            size = 0
        else:
            size = rng.choice([512, 4096, 16 << 10, 64 << 10, (64 << 10) + 1])
            view = memoryview(buf)[:size]
            view[:] = bytes([seq % 251]) * size
            channel.send_bulk(Data(seq, t * 4 * MiB, view.toreadonly()), lent=True)
            view[:] = b"\xee" * size  # the caller's buffer, reused
        with lock:
            sizes[seq] = size
            total_bytes[0] += HEADER_SIZE + size

    def host(t: int) -> None:
        rng, buf = random.Random(t), bytearray(256 << 10)
        for i in range(per):
            send(t, i, rng, buf)

    other = iter(range(injected))
    other_rng, other_buf = random.Random(99), bytearray(256 << 10)

    def queue_meanwhile(call: int) -> None:  # thread number `threads`, while one writes
        def three() -> None:
            for i in [*itertools.islice(other, 3)]:
                send(threads, i, other_rng, other_buf)

        in_another_thread(three)

    hook_try_send(channel, queue_meanwhile)
    workers = [threading.Thread(target=host, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    for i in other:  # what the hook did not send (few direct writes)
        send(threads, i, other_rng, other_buf)
    count = threads * per + injected
    got: list[Frame] = []
    with contextlib.suppress(queue.Empty):
        while len(got) < count:
            got.append(theirs.get(timeout=10))
    assert len(got) == count and not theirs.closed.is_set()
    for frame in got:
        if isinstance(frame, Data):
            assert bytes(frame.data) == bytes([frame.seq % 251]) * sizes[frame.seq], frame.seq
    for t in range(threads + 1):
        mine = [f for f in got if f.seq // 10_000 == t]
        for kind in (Data, Flush):
            seqs = [f.seq for f in mine if isinstance(f, kind)]
            assert seqs == sorted(seqs), f"thread {t}: its {kind.__name__} frames reordered"
        for pos, frame in enumerate(mine):  # no bulk frame overtook an earlier urgent one
            if isinstance(frame, Data):
                late = [f.seq for f in mine[pos + 1:] if isinstance(f, Flush)
                        and f.seq < frame.seq]
                assert not late, f"DATA {frame.seq} arrived before FLUSH {late} sent earlier"
    # the sender thread counts a frame (and lets it leave the window) after its send returns
    wait_until(lambda: (st := channel.stats()).bulk_queued_bytes == 0
               and st.frames_sent >= count)
    stats = channel.stats()
    assert stats.frames_sent == count and stats.bytes_sent == total_bytes[0]
    assert stats.urgent_queued == 0


@pytest.mark.parametrize("length", [64 << 10, (64 << 10) + 1, MAX_DATA],
                         ids=["64KiB", "64KiB+1", "MAX_DATA"])
def test_large_payloads_over_tls_are_received_in_place_intact(secondary, primary, certs,
                                                              length):
    sec = secondary(tls_ctx=server_tls(certs), options=QUIET)
    ours = Ends(primary(sec.address, tls=client_tls(certs), options=QUIET)).start()
    theirs = sec.end()
    payload = bytes(range(251)) * (length // 251) + bytes(length % 251)
    ours.channel.send_bulk(Write(1, 0, payload), lent=True)
    ours.channel.send_urgent(Flush(2))
    ours.channel.send_bulk(Write(3, 0, payload[:4096]))
    frames = [theirs.get(timeout=10) for _ in range(3)]
    assert [f.seq for f in frames] in ([1, 2, 3], [2, 1, 3])
    big = next(f for f in frames if f.seq == 1)
    assert len(big.data) == length and bytes(big.data) == payload
    assert theirs.channel.stats().bytes_received == 3 * HEADER_SIZE + length + 4096


def test_a_channel_closed_before_start_and_started_later_still_closes(secondary, primary):
    """Found by the suite (a 300 s hang): PrimarySession hands a channel to the replicator
    before start(); a resync that fails in between closes it, unstarted. The farewell path
    took the socket (_writing) for good, so the sender thread that start() then ran waited
    for it forever, and the session's close() joined that thread forever."""
    sec = secondary()
    channel = primary(sec.address)
    channel.close("the resync failed before the channel started")
    channel.start(lambda frame: None)  # as PrimarySession does, after connected()
    closer = threading.Thread(target=channel.close, daemon=True)
    closer.start()
    closer.join(5)
    assert not closer.is_alive(), "close() hangs joining a sender that waits for the socket"


def test_a_close_racing_start_joins_only_threads_that_were_started(secondary, primary):
    """Found with async mirroring (session 6): the cycle thread closed a channel the
    session was still starting; close() joined a thread start() had listed but not started
    yet ("cannot join thread before it is started"). Threads are now listed and started
    under the channel's lock, and not at all once it is closed."""
    sec = secondary()
    errors: list[BaseException] = []
    for _ in range(30):
        channel = primary(sec.address)
        go = threading.Barrier(2)

        def close(ch: link.Channel = channel, go: threading.Barrier = go) -> None:
            go.wait()
            try:
                ch.close("closed while starting")
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        closer = threading.Thread(target=close)
        closer.start()
        go.wait()
        channel.start(lambda frame: None)
        closer.join(10)
        assert not closer.is_alive()
        channel.close()
    assert not errors, errors[0]
