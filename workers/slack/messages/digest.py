"""The daily digest as Slack blocks: spend per person, type and region, what runs and idles, open warnings."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from slack_sdk.models.blocks import Block, ContextBlock, MarkdownTextObject, SectionBlock

from workers.cost.fleetview import Row
from workers.cost.pricing import format_usd
from workers.slack.blocks import sections
from workers.slack.client import clamp
from workers.slack.escape import code, escape
from workers.slack.format import duration
from workers.slack.messages import Message
from workers.state.warnings import WarningRecord

LIST_LIMIT = 10
NOBODY = "nobody"  # running time with no run and no runctl:user tag


@dataclass
class Spend:
    """USD per person, per instance type and per region over one window."""

    person: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    type: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    region: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))

    @property
    def total(self) -> Decimal:
        return sum(self.type.values(), Decimal(0))


def render(
    rows: list[Row],
    yesterday: Spend,
    month: Spend,
    warnings: list[WarningRecord],
    now: datetime,
    names: dict[str, str] | None = None,
) -> Message:
    known = names or {}

    def named(person: str) -> str:  # by name: a daily digest must not ping everyone it lists
        return "_no owner_" if person == NOBODY else f"*{escape(known.get(person, person))}*"

    running = [r for r in rows if r.running]
    idle = sorted((r for r in running if r.idle), key=lambda r: -(r.cost_of(r.idle_seconds(now)) or 0))
    burn = sum((r.price.usd_per_hour or Decimal(0) for r in running), Decimal(0))
    head = (
        f":bar_chart: *runctl daily digest* · {now:%A %d %B %Y}\n"
        f"Yesterday *{format_usd(yesterday.total)}* · month to date *{format_usd(month.total)}* · "
        f"burning {format_usd(burn)}/h now ({format_usd(burn * 24)}/day)"
    )
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=clamp(head)))]

    top = sorted(yesterday.person.items(), key=lambda kv: -kv[1])[:3]
    medals = (":first_place_medal:", ":second_place_medal:", ":third_place_medal:")
    if top:
        line = "  ".join(f"{m} {named(p)} {format_usd(v)}" for m, (p, v) in zip(medals, top, strict=False))
        blocks += sections([f"*Top spenders yesterday*  {line}"], 1)
    blocks += _table("Per person", yesterday.person, month.person, named)
    blocks += _table("Per instance type", yesterday.type, month.type, lambda t: f"`{t}`")
    if len({r.instance.region for r in rows}) > 1:
        blocks += _table("Per region", yesterday.region, month.region, lambda r: f"*{r}*")
    blocks += _listing(
        f"Running now ({len(running)})",
        [_running_line(r, named) for r in sorted(running, key=lambda r: -(r.cost or 0))],
        "nothing is running",
    )
    blocks += _listing(
        f"Idle now ({len(idle)})",
        [
            f"*{r.instance.label}* idle {duration(r.idle_seconds(now))}, that cost "
            f"{format_usd(r.cost_of(r.idle_seconds(now)))} · `/runctl stop {r.id}`"
            for r in idle
        ],
        "nothing is idle",
    )
    blocks += _listing(
        f"Open warnings ({len(warnings)})",
        [
            f"{w.kind.value} · {w.label} · {w.status.value}" + (f" by {named(w.acted_by)}" if w.acted_by else "")
            for w in warnings
        ],
        "none",
    )
    unpriced = sum(1 for r in rows if not r.price.known)
    note = "Spend counts every running interval runctl has seen; a run's time goes to whoever started it."
    if unpriced:
        note += f" {unpriced} instance(s) have an unknown price and are left out."
    blocks.append(ContextBlock(elements=[MarkdownTextObject(text=note)]))
    return Message(f"runctl digest: yesterday {format_usd(yesterday.total)}, month {format_usd(month.total)}", blocks)


def _table(
    title: str, day: dict[str, Decimal], month: dict[str, Decimal], label: Callable[[str], str]
) -> list[SectionBlock]:
    zero = Decimal(0)
    keys = sorted(set(day) | set(month), key=lambda k: -month.get(k, zero))
    lines = [
        f"{label(k)} — yesterday {format_usd(day.get(k, zero))} · month {format_usd(month.get(k, zero))}" for k in keys
    ]
    return _listing(title, lines, "no spend")


def _listing(title: str, lines: list[str], empty: str) -> list[SectionBlock]:
    shown = lines[:LIST_LIMIT] or [f"_{empty}_"]
    if len(lines) > LIST_LIMIT:
        shown.append(f"…and {len(lines) - LIST_LIMIT} more (`/runctl resources --all` lists every instance)")
    return sections([f"*{title}*", *shown], 2)


def _running_line(row: Row, named: Callable[[str], str]) -> str:
    parts = [f"*{row.instance.label}* {row.instance.type}", f"{format_usd(row.cost)} so far"]
    if row.live_run:
        parts.append(f"{named(row.live_run.user_id)} training {code(row.live_run.script, 60)}")
    return " · ".join(parts)
