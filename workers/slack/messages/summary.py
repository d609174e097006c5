"""The end of a run in words: its metrics (last and best), its checkpoints and outputs, its
trackers' links; and the link buttons on its parent message. Everything the instance wrote
(metric names, file names, directories, URLs) is escaped here; numbers are finite already."""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING

from slack_sdk.models.blocks import ButtonElement

from workers.slack.escape import code, escape
from workers.slack.format import size
from workers.slack.ids import LINK_ACTION_PREFIX
from workers.slack.links import LABELS
from workers.state.runs import Checkpoint, RunLink

if TYPE_CHECKING:  # the web process renders run messages and loads no AWS code (tests/test_layers.py)
    from workers.remote.checkpoints import CheckpointListing, FoundCheckpoint
    from workers.remote.summary import Metric, RunSummary

MAX_METRICS = 6
NO_CHECKPOINT = "No checkpoint was written."
_FINAL_WORDS = ("final", "best", "last")


def number(value: float) -> str:
    """A metric's value: 4 significant digits, never `nan`/`inf` (the parser keeps finite ones only)."""
    if not math.isfinite(value):
        return "?"
    return f"{value:.4g}"


def metric_line(m: Metric) -> str:
    at = f" ({escape(m.at)})" if m.at else ""
    text = f"{code(m.name, 64)} {number(m.last)}{at}"
    if m.best is not None and m.count > 1 and m.best != m.last:
        best_at = f" at {escape(m.best_at)}" if m.best_at else ""
        text += f", best {number(m.best)}{best_at}"
    return text


def metrics_text(summary: RunSummary) -> str:
    if not summary.metrics:
        return ""
    shown = summary.metrics[:MAX_METRICS]
    more = len(summary.metrics) - len(shown)
    lines = " · ".join(metric_line(m) for m in shown)
    return "Metrics (last, best): " + lines + (f" · {more} more" if more > 0 else "")


PROTOCOL_DIR = "the run's checkpoint directory"


def _place(name: str) -> str:
    head, _, _ = name.rpartition("/")
    return head + "/" if head else PROTOCOL_DIR


def files_text(listing: CheckpointListing | None, total_bytes: int | None, backed_up: set[str] | None) -> str:
    """Where the checkpoints and outputs are: the newest, any final/best file, the total."""
    found = [c for c in (listing.checkpoints if listing else []) if not c.is_dir or c.size > 0]
    if not found:
        return NO_CHECKPOINT
    newest = found[0]
    latest = max(found, key=lambda c: c.modified_at)
    named: list[FoundCheckpoint] = [newest]
    for c in found:
        base = c.name.rsplit("/", 1)[-1].lower()
        if c not in named and any(w in base for w in _FINAL_WORDS):
            named.append(c)
    if latest not in named:
        named.append(latest)
    places = sorted({_place(c.name) for c in found})
    total = total_bytes if total_bytes is not None else sum(c.size for c in found)
    count = len(found) + (listing.omitted if listing else 0)
    parts = ["Checkpoint: " + _one(newest)]
    if len(named) > 1:
        parts.append("Also: " + ", ".join(_one(c) for c in named[1:4]))
    summary = f"{count} file{'s' if count != 1 else ''}, {size(total)} in all, in " + ", ".join(
        p if p == PROTOCOL_DIR else code(p, 120) for p in places[:4]
    )
    if backed_up is not None:
        names = {c.name for c in found}
        saved = len(names & backed_up)
        summary += (
            "; backed up to S3"
            if saved == len(names)
            else f"; {saved} of {len(names)} backed up to S3"
            if saved
            else "; not backed up (`/runctl backup` copies them to S3)"
        )
    return "\n".join([*parts, summary + "."])


def _one(c: FoundCheckpoint) -> str:
    epoch = f", epoch {c.epoch}" if c.epoch is not None else ""
    return f"{code(c.name, 200)} ({size(c.size)}{epoch})"


def as_checkpoint(listing: CheckpointListing | None) -> Checkpoint | None:
    """The listing's newest, as the run record keeps it."""
    newest = listing.newest if listing else None
    if newest is None:
        return None
    return Checkpoint(name=newest.name, size=newest.size, modified_at=newest.modified_at, epoch=newest.epoch)


def tensorboard_text(dirs: list[str]) -> str:
    if not dirs:
        return ""
    return "TensorBoard logs: " + ", ".join(code(d, 200) for d in dirs[:3])


def link_buttons(links: list[RunLink]) -> list[ButtonElement]:
    """Link buttons (Slack opens the url; the click still reaches runctl, which only acks it)."""
    return [
        ButtonElement(text=LABELS.get(link.kind, "Link"), url=link.url, action_id=f"{LINK_ACTION_PREFIX}{link.kind}")
        for link in links
        if link.kind in LABELS
    ]


def at_text(at: datetime) -> str:
    return f"{at:%Y-%m-%d %H:%M} UTC"
