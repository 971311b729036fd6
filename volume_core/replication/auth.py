"""Shared-secret challenge-response between a primary and a secondary. Pure functions, no I/O.

Each side sends a fresh random nonce in its HELLO / HELLO_REPLY. Each side then
proves it knows the secret with

    HMAC-SHA256(secret, LABEL || direction || 0x00 || primary_nonce || secondary_nonce || binding)

where ``direction`` is the prover's role (``b"primary"`` or ``b"secondary"``).
Both nonces are in every answer, so an answer is good for one connection only;
the direction label means an answer cannot be reflected back to the side that
made it. The nonces have a fixed size, so the concatenation is unambiguous.
``binding`` is optional channel binding (e.g. TLS channel-binding data) that
ties the answers to one TLS session; both sides must pass the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_SIZE = 32
MAC_SIZE = 32
DIRECTIONS = ("primary", "secondary")
_LABEL = b"nbdmirror-auth-v1\x00"


def make_nonce() -> bytes:
    """A fresh random nonce of NONCE_SIZE bytes (from the OS's CSPRNG)."""
    return secrets.token_bytes(NONCE_SIZE)


def answer(secret: bytes, direction: str, primary_nonce: bytes, secondary_nonce: bytes,
           binding: bytes = b"") -> bytes:
    """The MAC the side named by ``direction`` sends to prove it knows ``secret``."""
    if not secret:
        raise ValueError("an empty shared secret cannot authenticate anything")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'primary' or 'secondary', not {direction!r}")
    if len(primary_nonce) != NONCE_SIZE or len(secondary_nonce) != NONCE_SIZE:
        raise ValueError(f"nonces must be {NONCE_SIZE} bytes")
    message = b"".join((_LABEL, direction.encode(), b"\x00", primary_nonce, secondary_nonce,
                        binding))
    return hmac.new(secret, message, hashlib.sha256).digest()


def check(secret: bytes, mac: bytes, direction: str, primary_nonce: bytes,
          secondary_nonce: bytes, binding: bytes = b"") -> bool:
    """True when ``mac`` is the answer of ``direction``'s side; compared in constant time."""
    expected = answer(secret, direction, primary_nonce, secondary_nonce, binding)
    return hmac.compare_digest(expected, bytes(mac))
