"""Figures as people read them: durations, sizes, progress bars."""

from __future__ import annotations

import math

MAX_SECONDS = 100 * 365 * 86400  # longer reads as this: no figure is that long


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    seconds = int(min(max(0, seconds), MAX_SECONDS))
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def bar(fraction: float, width: int = 20) -> str:
    fraction = min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled) + f" {fraction:.0%}"
