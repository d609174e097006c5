"""The `/runctl resources` listing: the fleet by region and state, its burn and warnings, as Slack blocks."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from slack_sdk.models.blocks import Block, ContextBlock, MarkdownTextObject, SectionBlock

from workers.commands import ResourcesCommand
from workers.cost.findings import Finding
from workers.cost.fleetview import Row
from workers.cost.pricing import format_usd, load_price_book
from workers.slack.blocks import sections
from workers.slack.client import clamp
from workers.slack.escape import code, escape
from workers.slack.format import duration
from workers.slack.messages import Message

ROW_LIMIT = 20
MAX_BLOCKS = 50
HOURS_PER_MONTH = 730  # AWS's own convention for monthly estimates


def totals(rows: list[Row]) -> tuple[Decimal, int]:
    """Hourly burn of the running rows, and how many running rows have no known price."""
    running = [r for r in rows if r.running]
    burn = sum((r.price.usd_per_hour for r in running if r.price.usd_per_hour is not None), Decimal(0))
    return burn, sum(1 for r in running if not r.price.known)


def row_line(row: Row, warnings: list[Finding], now: datetime) -> str:
    inst = row.instance
    parts = [f"*{escape(inst.name or '(no name)')}* `{inst.id}` {inst.type}"]
    if row.uptime_seconds:
        parts.append(f"up {duration(row.uptime_seconds)}")
    parts += [row.price.describe(), f"{format_usd(row.cost)} so far"]
    if row.live_run:
        run = row.live_run
        parts.append(f"<@{run.user_id}> training {code(run.script, 80)} (`{run.run_id}`)")
    elif row.owner:
        parts.append(f"owner <@{row.owner}>")
    if row.idle:
        parts.append(f":zzz: idle {duration(row.idle_seconds(now))}")
    line = " · ".join(parts)
    if warnings:
        line += "\n    :warning: " + "; ".join(f.summary for f in warnings)
    return line


def region_line(region: str, rows: list[Row]) -> str:
    burn, _ = totals(rows)
    running = sum(1 for r in rows if r.running)
    return f"*{region}* · {running} running of {len(rows)} · {format_usd(burn)}/h"


def render(
    cmd: ResourcesCommand, rows: list[Row], findings: list[Finding], now: datetime, hidden: int, note: str = ""
) -> Message:
    burn, unpriced = totals(rows)
    running = sum(1 for r in rows if r.running)
    head = (
        f":bar_chart: *Fleet* · {running} running of {len(rows)} shown · burn *{format_usd(burn)}/h* · "
        f"{format_usd(burn * 24)}/day · {format_usd(burn * HOURS_PER_MONTH)}/month"
    )
    if unpriced:
        head += f"\n:grey_question: {unpriced} running instance(s) have an unknown price and are not in the totals."
    if findings:
        head += f"\n:warning: {len(findings)} warning(s) below."
    if hidden and not cmd.all:
        head += f"\n{hidden} stopped/terminated or filtered out; `/runctl resources --all` lists them."
    if note:
        head = f"{note}\n\n{head}"
    by_instance: dict[str, list[Finding]] = {}
    for f in findings:
        by_instance.setdefault(f.instance_id, []).append(f)
    lines: list[str] = []
    regional = len({r.instance.region for r in rows}) > 1
    region, state = "", ""
    for row in rows[:ROW_LIMIT]:
        if regional and row.instance.region != region:
            region, state = row.instance.region, ""
            lines.append(region_line(region, [r for r in rows if r.instance.region == region]))
        if row.instance.state != state:
            state = row.instance.state
            lines.append(f"*{state.capitalize()}*" if not regional else f"_{state.capitalize()}_")
        lines.append(row_line(row, by_instance.get(row.id, []), now))
    if not rows:
        lines.append("No managed instances match." + ("" if cmd.all else " Try `/runctl resources --all`."))
    if len(rows) > ROW_LIMIT:
        lines.append(f"…and {len(rows) - ROW_LIMIT} more: the full list is attached as CSV in the thread.")
    book = load_price_book()
    footer = (
        f"sorted by {cmd.sort} · cost so far sums every running interval runctl has seen · "
        "on-demand prices from the AWS Price List (refreshed daily), else from runctl's table "
        f"of {book.as_of:%Y-%m-%d} where marked; spot prices from AWS, refreshed hourly"
    )
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=clamp(head)))]
    blocks += sections(lines, MAX_BLOCKS - 2)
    blocks.append(ContextBlock(elements=[MarkdownTextObject(text=clamp(footer))]))
    summary = f"Fleet: {running} running, burn {format_usd(burn)}/h"
    return Message(summary, blocks)
