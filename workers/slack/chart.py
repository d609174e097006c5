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
ZERO_WIDTH = "\u200b"  # in DejaVu Sans, matplotlib's default font: nothing shows


def literal(text: str) -> str:
    """Untrusted text (a Slack display name) as matplotlib shows it, unparsed: every `$`
    escaped, so no mathtext is parsed (`$\\x$` raised ValueError and stopped the digest),
    and a leading `_` behind a zero-width space (matplotlib leaves such labels out of a legend)."""
    shown = text.replace("$", r"\$")
    return ZERO_WIDTH + shown if shown.startswith("_") else shown


def spend_chart(
    days: Sequence[date], spend: Mapping[str, Sequence[Decimal]], labels: Mapping[str, str] | None = None
) -> bytes | None:
    """Stacked bars: one bar per day, one colour per person; None without matplotlib.

    ``spend`` is keyed by person id (two people never merge); ``labels`` names them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import StrMethodFormatter
    except ImportError:
        return None
    names = labels or {}
    ranked = sorted(spend.items(), key=lambda item: (-sum(item[1]), item[0]))
    series = [(names.get(pid, pid), [float(v) for v in values]) for pid, values in ranked[:MAX_PEOPLE]]
    rest = ranked[MAX_PEOPLE:]
    if rest:
        others = [float(sum(vals)) for vals in zip(*(v for _, v in rest), strict=True)]
        series.append((f"{len(rest)} others", others))

    # Figure + Agg canvas, not pyplot: no global state, safe in a worker thread.
    figure = Figure(figsize=(9, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ticks = [f"{d:%a %d}" for d in days]
    bottom = [0.0] * len(days)
    for name, values in series:
        axes.bar(ticks, values, bottom=bottom, label=literal(name))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, total in enumerate(bottom):  # the day's total above its bar
        if total > 0:
            axes.annotate(
                f"${total:,.0f}",
                (x, total),
                ha="center",
                va="bottom",
                fontsize="small",
                xytext=(0, 2),
                textcoords="offset points",
            )
    axes.yaxis.set_major_formatter(StrMethodFormatter("${x:,.0f}"))
    axes.set_ylabel("EC2 spend (USD)")
    axes.set_ylim(0, max(bottom, default=0) * 1.12 or 1)
    axes.set_title("EC2 spend per person, last 7 days (UTC)")
    axes.spines[["top", "right"]].set_visible(False)
    if series:
        # Beside the plot, never over the bars; top to bottom as the segments are stacked.
        handles, names_shown = axes.get_legend_handles_labels()
        axes.legend(
            handles[::-1],
            names_shown[::-1],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            frameon=False,
        )
    figure.tight_layout()
    out = io.BytesIO()
    # The series, in legend order, as the PNG's description (for screen readers and tests).
    described = "; ".join(f"{name}: ${sum(values):,.2f}" for name, values in series)
    figure.savefig(out, format="png", metadata={"Description": f"EC2 spend per person, 7 days: {described}"})
    return out.getvalue()


MAX_SERIES = 12
X_LABELS = {"step": "step", "epoch": "epoch", "index": "report #"}


def run_chart(
    title: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    kinds: Mapping[str, str],
    sorts: Mapping[str, str],
) -> bytes | None:
    """A run's metric curves as a PNG: loss-like metrics (``sorts[name] == "loss"``) on one axes,
    accuracy-like (``"acc"``) on another, the rest on a third; None without matplotlib or with
    no series. Names are untrusted text (`literal`); every number is finite (the parser's word)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    chosen = list(series.items())[:MAX_SERIES]
    if not chosen:
        return None
    groups: dict[str, list[tuple[str, Sequence[tuple[float, float]]]]] = {}
    for name, points in chosen:
        groups.setdefault(sorts.get(name, "") or "other", []).append((name, points))
    order = [g for g in ("loss", "acc", "other") if g in groups]
    figure = Figure(figsize=(5.0 * len(order) + 1, 4), dpi=100)
    FigureCanvasAgg(figure)
    titles = {"loss": "Loss (lower is better)", "acc": "Accuracy (higher is better)", "other": "Other metrics"}
    for i, group in enumerate(order):
        axes = figure.add_subplot(1, len(order), i + 1)
        xkinds = {kinds.get(name, "index") for name, _ in groups[group]}
        for name, points in groups[group]:
            axes.plot([p[0] for p in points], [p[1] for p in points], label=literal(name), linewidth=1.4)
        axes.set_xlabel(X_LABELS.get(xkinds.pop(), "report #") if len(xkinds) == 1 else "step / epoch / report #")
        axes.set_title(titles[group], fontsize="medium")
        axes.grid(True, alpha=0.3)
        axes.spines[["top", "right"]].set_visible(False)
        axes.legend(fontsize="small", frameon=False)
    figure.suptitle(literal(title), fontsize="medium")
    figure.tight_layout()
    out = io.BytesIO()
    described = "; ".join(f"{name}: {len(points)} points" for name, points in chosen)
    figure.savefig(out, format="png", metadata={"Description": f"{len(chosen)} series: {described}"})
    return out.getvalue()


ALT_MAX = 1000  # files.getUploadURLExternal's alt_txt: alt_txt_too_large past 1,000 characters


def run_alt(title: str, series: Mapping[str, Sequence[tuple[float, float]]], sorts: Mapping[str, str]) -> str:
    """What `run_chart` draws, for a screen reader: each curve's first, last and best value."""
    parts = []
    for name, points in list(series.items())[:MAX_SERIES]:
        ys = [y for _, y in points]
        best = min(ys) if sorts.get(name) == "loss" else max(ys) if sorts.get(name) == "acc" else None
        part = f"{name}, {len(ys)} points, from {ys[0]:.4g} to {ys[-1]:.4g}"
        parts.append(part + (f" (best {best:.4g})" if best is not None else ""))
    text = f"Line chart of {title}: " + "; ".join(parts) + "."
    return text if len(text) <= ALT_MAX else text[: ALT_MAX - 1] + "…"
