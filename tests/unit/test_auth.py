"""Shared-secret challenge-response: the pure functions, and the handshake that uses them."""

from __future__ import annotations

import pytest

from volume_core.errors import PeerRefused, ProtocolError
from volume_core.replication import auth
from volume_core.replication.protocol import (
    Auth,
    Connection,
    Identity,
    State,
    Write,
    encode,
    hello_problem,
)

pytestmark = pytest.mark.unit

SECRET = b"correct horse battery staple"
P_NONCE, S_NONCE = auth.make_nonce(), auth.make_nonce()


def test_nonces_are_fresh_and_full_size():
    nonces = {auth.make_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == auth.NONCE_SIZE for n in nonces)


def test_right_secret_passes_both_ways():
    for direction in auth.DIRECTIONS:
        mac = auth.answer(SECRET, direction, P_NONCE, S_NONCE)
        assert len(mac) == auth.MAC_SIZE
        assert auth.check(SECRET, mac, direction, P_NONCE, S_NONCE)


def test_wrong_secret_fails():
    mac = auth.answer(b"wrong", "primary", P_NONCE, S_NONCE)
    assert not auth.check(SECRET, mac, "primary", P_NONCE, S_NONCE)


def test_reflected_answer_fails():
    # The secondary's own answer, sent back to it as the primary's, must not pass.
    mac = auth.answer(SECRET, "secondary", P_NONCE, S_NONCE)
    assert not auth.check(SECRET, mac, "primary", P_NONCE, S_NONCE)


def test_answer_is_bound_to_both_nonces_and_the_channel():
    mac = auth.answer(SECRET, "primary", P_NONCE, S_NONCE)
    assert not auth.check(SECRET, mac, "primary", P_NONCE, auth.make_nonce())
    assert not auth.check(SECRET, mac, "primary", auth.make_nonce(), S_NONCE)
    assert not auth.check(SECRET, mac, "primary", S_NONCE, P_NONCE)
    bound = auth.answer(SECRET, "primary", P_NONCE, S_NONCE, binding=b"tls-session-1")
    assert not auth.check(SECRET, bound, "primary", P_NONCE, S_NONCE, binding=b"tls-session-2")
    assert auth.check(SECRET, bound, "primary", P_NONCE, S_NONCE, binding=b"tls-session-1")


@pytest.mark.parametrize("args", [
    (b"", "primary", P_NONCE, S_NONCE),
    (SECRET, "sideways", P_NONCE, S_NONCE),
    (SECRET, "primary", P_NONCE[:5], S_NONCE),
])
def test_answer_refuses_bad_arguments(args):
    with pytest.raises(ValueError):
        auth.answer(*args)


# --------------------------------------------------------------------- in the handshake

IDENTITY = dict(size=1 << 30, region_size=64 << 10, generation=1)


def _hello_exchange(primary_secret, secondary_secret):
    primary = Connection("primary", primary_secret)
    secondary = Connection("secondary", secondary_secret)
    hello = primary.make_hello(uuid="p-uuid", mode="sync", **IDENTITY)
    secondary.receive_data(primary.send(hello))
    assert secondary.next_frame() == hello
    reply = secondary.make_reply(accepted=True, reason="", uuid="s-uuid", **IDENTITY)
    primary.receive_data(secondary.send(reply))
    assert primary.next_frame() == reply
    return primary, secondary


def test_handshake_with_the_right_secret_reaches_ready_on_both_sides():
    primary, secondary = _hello_exchange(SECRET, SECRET)
    assert primary.state is secondary.state is State.AUTH
    secondary.receive_data(primary.send(primary.auth_frame()))
    assert isinstance(secondary.next_frame(), Auth)
    primary.receive_data(secondary.send(secondary.auth_frame()))
    assert isinstance(primary.next_frame(), Auth)
    assert primary.state is secondary.state is State.MARKS  # then the secondary's marks
    (marks,) = secondary.marked_runs_frames([])
    primary.receive_data(secondary.send(marks))
    assert primary.next_frame() == marks
    assert primary.state is secondary.state is State.READY
    secondary.receive_data(primary.send(Write(1, 0, b"x" * 512)))
    assert secondary.next_frame() == Write(1, 0, b"x" * 512)


def test_secondary_refuses_a_primary_with_the_wrong_secret_before_any_data():
    primary, secondary = _hello_exchange(b"not the secret", SECRET)
    secondary.receive_data(primary.send(primary.auth_frame()))
    with pytest.raises(PeerRefused, match="authentication failed: the primary does not know"):
        secondary.next_frame()
    assert secondary.state is State.BROKEN
    with pytest.raises(ProtocolError):
        secondary.next_frame()


def test_primary_refuses_a_secondary_with_the_wrong_secret():
    primary, secondary = _hello_exchange(SECRET, b"impostor")
    secondary._primary_authed = True  # an impostor secondary skips its check
    primary.send(primary.auth_frame())
    primary.receive_data(secondary.send(secondary.auth_frame()))
    with pytest.raises(PeerRefused, match="the secondary does not know the shared secret"):
        primary.next_frame()
    with pytest.raises(ProtocolError):
        primary.send(Write(1, 0, b"x"))


def test_reflected_auth_frame_is_refused():
    primary, secondary = _hello_exchange(SECRET, SECRET)
    secondary.receive_data(primary.send(primary.auth_frame()))
    secondary.next_frame()
    own = secondary.auth_frame()
    # An attacker playing primary on a second connection cannot use the secondary's answer:
    # it binds the direction "secondary".
    other = Connection("secondary", SECRET)
    other.hello, other.reply, other.state = secondary.hello, secondary.reply, State.AUTH
    wire = Connection("primary", SECRET)
    wire.hello, wire.reply, wire.state = secondary.hello, secondary.reply, State.AUTH
    other.receive_data(wire.send(own))
    with pytest.raises(PeerRefused, match="authentication failed"):
        other.next_frame()


@pytest.mark.parametrize("primary_secret, secondary_secret, message", [
    (None, SECRET, "the secondary requires a shared secret"),
    (SECRET, None, "the primary has a shared secret; the secondary has none"),
])
def test_a_missing_secret_on_either_side_is_refused(primary_secret, secondary_secret, message):
    primary = Connection("primary", primary_secret)
    secondary = Connection("secondary", secondary_secret)
    hello = primary.make_hello(uuid="p-uuid", mode="sync", **IDENTITY)
    secondary.receive_data(primary.send(hello))
    secondary.next_frame()
    assert hello_problem(hello, Identity("s-uuid", **IDENTITY),
                         secret=secondary_secret is not None) == message_of(message)
    # A secondary that accepts anyway is stopped by its own connection...
    accept = secondary.make_reply(accepted=True, reason="", uuid="s-uuid", **IDENTITY)
    with pytest.raises(ProtocolError, match=f"local: cannot accept: {message}"):
        secondary.send(accept)
    # ...and the primary refuses such a reply by itself.
    primary.receive_data(encode(accept))
    with pytest.raises(PeerRefused, match=message):
        primary.next_frame()
    assert primary.state is State.BROKEN


def message_of(prefix):
    return {
        "the secondary requires a shared secret":
            "the secondary requires a shared secret (--secret-file); the primary has none",
        "the primary has a shared secret; the secondary has none":
            "the primary has a shared secret; the secondary has none (give it --secret-file)",
    }[prefix]


def test_data_before_authentication_is_refused():
    primary, secondary = _hello_exchange(SECRET, SECRET)
    raw = encode(Write(1, 0, b"x" * 512))
    secondary.receive_data(raw)
    with pytest.raises(ProtocolError, match="WRITE frame before the handshake completed"):
        secondary.next_frame()
    with pytest.raises(ProtocolError, match="local: cannot send WRITE"):
        primary.send(Write(1, 0, b"x" * 512))


def test_auth_out_of_turn_is_refused():
    primary, secondary = _hello_exchange(SECRET, SECRET)
    with pytest.raises(ProtocolError, match="AUTH from the secondary out of turn"):
        secondary.send(secondary.auth_frame())
    primary2, _ = _hello_exchange(SECRET, SECRET)
    primary2.receive_data(encode(Auth(b"\0" * 32)))
    with pytest.raises(ProtocolError, match="AUTH from the secondary out of turn"):
        primary2.next_frame()
