"""Numbers an instance reports, checked where they are parsed: finite and within bounds,
else absent (None). Nothing it writes may crash the code that shows it."""

from __future__ import annotations

import math
from datetime import UTC, datetime

MAX_COUNT = 10**15  # bytes, steps, epochs, pids: far beyond any real one
MAX_SECONDS = 100 * 365 * 86400  # a duration (an ETA)
MAX_EPOCH_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last instant datetime holds
MAX_ABS = 1e300  # a metric: finite, with room for arithmetic


def count(text: str) -> int | None:
    """A non-negative whole number (ASCII digits only)."""
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 16:
        return None
    value = int(text)
    return value if value <= MAX_COUNT else None


def instant(text: str) -> datetime | None:
    """Epoch seconds as a UTC time."""
    value = count(text)
    if value is None or value > MAX_EPOCH_SECONDS:
        return None
    return datetime.fromtimestamp(value, UTC)


def finite(value: object, limit: float = MAX_ABS) -> float | None:
    """A number (or its text) as a float with |x| <= limit; not bool, inf or NaN."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int):
        if abs(value) > limit:
            return None
        value = float(value)
    if not isinstance(value, float) or not math.isfinite(value) or abs(value) > limit:
        return None
    return value
