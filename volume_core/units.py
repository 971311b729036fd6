"""Parsing and printing byte sizes (``64K``, ``1G``, ``1.5T``; binary units)."""

from __future__ import annotations

import math
import re

from .errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "size") -> int:
    """Turn ``"64K"`` into 65536. Raises UsageError with a one-line reason."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise UsageError(
                f"invalid {what} {text!r}: expected a number with an optional K, M, G or T suffix"
            )
        number, unit = match.groups()
        scaled = float(number) * _UNITS[unit.upper()] if "." in number else int(number) * _UNITS[
            unit.upper()
        ]
        if not math.isfinite(scaled):
            raise UsageError(f"invalid {what} {text!r}: too large")
        if scaled != int(scaled):
            raise UsageError(f"invalid {what} {text!r}: not a whole number of bytes")
        value = int(scaled)
    if value <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be greater than zero")
    return value


def rate(nbytes: int, seconds: float) -> int | None:
    """Bytes per second, whole; None when no time has passed."""
    return round(nbytes / seconds) if seconds > 0 else None


def format_size(n: int) -> str:
    """Print 65536 as ``64 KiB`` (exact when possible, else one decimal)."""
    for unit, factor in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                         ("KiB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if n % factor == 0 else f"{value:.1f} {unit}"
    return f"{n} B"
