"""The digest's chart: spend per person over the last days, as a PNG.

matplotlib is an optional extra (`pip install runctl-bot[chart]`); without it
there is no chart and the digest posts without one.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal

MAX_PEOPLE = 8  # the rest share one "others" bar segment


def spend_chart(days: Sequence[date], spend: Mapping[str, Sequence[Decimal]]) -> bytes | None:
    """Stacked bars: one bar per day, one colour per person; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ranked = sorted(spend.items(), key=lambda item: sum(item[1]), reverse=True)
    series = [(name, [float(v) for v in values]) for name, values in ranked[:MAX_PEOPLE]]
    rest = ranked[MAX_PEOPLE:]
    if rest:
        series.append(("others", [float(sum(vals)) for vals in zip(*(v for _, v in rest), strict=True)]))

    # Figure + Agg canvas, not pyplot: no global state, safe in a worker thread.
    figure = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels = [f"{d:%a %d}" for d in days]
    bottom = [0.0] * len(days)
    for name, values in series:
        axes.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes.set_ylabel("USD")
    axes.set_title("EC2 spend per person, last 7 days (UTC)")
    if series:
        axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
