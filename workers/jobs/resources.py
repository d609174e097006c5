"""`/runctl resources`: the managed fleet with uptime, prices, cost so far, who is
training what, idle flags and inline warnings; a CSV of every row beyond the first 20."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from slack_sdk.errors import SlackApiError

from workers.commands import ResourcesCommand
from workers.cost import fleetview
from workers.cost.findings import Finding, detect
from workers.cost.fleetview import Row
from workers.jobs import funnel
from workers.jobs.funnel import Job
from workers.slack import people
from workers.slack.messages.resources import ROW_LIMIT, render
from workers.slack.reach import channel_error, refusal

STATE_ORDER = ("running", "pending", "stopping", "stopped", "shutting-down", "terminated")
SHOWN_BY_DEFAULT = frozenset({"running", "pending", "stopping"})


@funnel.command(ResourcesCommand)
def resources(job: Job, cmd: ResourcesCommand) -> str:
    svc, actor = job.svc, job.actor
    if cmd.user:
        cmd = cmd.model_copy(update={"user": people.resolve(svc.notifier.client, cmd.user, "resources")})
    now = svc.clock()
    everything = fleetview.view(svc, now)
    rows = select(everything, cmd)
    findings = detect(svc.settings, rows, now)
    text, blocks = render(cmd, rows, findings, now, hidden=len(everything) - len(rows))
    try:
        ts = svc.notifier.post(actor.channel_id, text, blocks)
    except SlackApiError as exc:
        error = channel_error(exc)
        if error is None:
            raise
        # The channel refuses the bot: the listing still reaches the person who asked.
        note = refusal(svc.settings, actor.channel_id, error, "post this listing there").as_text()
        if len(rows) > ROW_LIMIT:
            note += "\nThe full CSV needs me in the channel too."
        _, blocks = render(cmd, rows, findings, now, hidden=len(everything) - len(rows), note=note)
        svc.notifier.ephemeral(actor.channel_id, actor.user_id, text, blocks, response_url=actor.response_url)
        return f"{text} (privately: {error})"
    if len(rows) > ROW_LIMIT:
        try:
            svc.notifier.upload(
                actor.channel_id,
                f"runctl-resources-{now:%Y%m%d-%H%M}.csv",
                to_csv(rows, findings, now),
                title=f"runctl resources: all {len(rows)} instances",
                thread_ts=ts,
            )
        except SlackApiError as exc:
            error = channel_error(exc)
            if error is None:
                raise
            # chat:write.public posted the listing; sharing a file needs membership.
            refused = refusal(svc.settings, actor.channel_id, error, "share the CSV here")
            svc.notifier.post(actor.channel_id, f"<@{actor.user_id}> {refused.as_text()}", thread_ts=ts)
    return f"listed {len(rows)} instances"


def select(rows: list[Row], cmd: ResourcesCommand) -> list[Row]:
    chosen = [r for r in rows if cmd.all or r.instance.state in SHOWN_BY_DEFAULT]
    if cmd.user:
        chosen = [r for r in chosen if cmd.user in (r.owner, r.live_run.user_id if r.live_run else None)]
    key = _sort_key(cmd.sort)
    return sorted(chosen, key=lambda r: (r.instance.region, *key(r)))  # grouped by region


def _sort_key(sort: str) -> Callable[[Row], tuple[Any, ...]]:
    def state(row: Row) -> int:
        name = row.instance.state
        return STATE_ORDER.index(name) if name in STATE_ORDER else len(STATE_ORDER)

    if sort == "uptime":
        return lambda r: (state(r), -r.uptime_seconds, r.id)
    if sort == "type":
        return lambda r: (state(r), r.instance.type, r.id)
    # cost: highest first; unknown prices after every known one
    return lambda r: (state(r), r.cost is None, -(r.cost or Decimal(0)), r.id)


def to_csv(rows: list[Row], findings: list[Finding], now: datetime) -> bytes:
    warned: dict[str, list[str]] = {}
    for f in findings:
        warned.setdefault(f.instance_id, []).append(f.kind.value)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "state",
            "name",
            "instance_id",
            "type",
            "usd_per_hour",
            "uptime_hours",
            "cost_usd",
            "owner",
            "run_id",
            "script",
            "idle_minutes",
            "warnings",
            "region",
        ]
    )
    for r in rows:
        rate = r.price.usd_per_hour
        writer.writerow(
            [
                r.instance.state,
                cell(r.instance.name),
                r.id,
                r.instance.type,
                "" if rate is None else str(rate),
                f"{r.uptime_seconds / 3600:.2f}",
                "" if r.cost is None else f"{r.cost:.2f}",
                r.owner or "",
                r.live_run.run_id if r.live_run else "",
                cell(r.live_run.script) if r.live_run else "",
                f"{r.idle_seconds(now) / 60:.0f}" if r.idle else "",
                " ".join(warned.get(r.id, [])),
                r.instance.region,
            ]
        )
    return out.getvalue().encode()


def cell(text: str) -> str:
    """A spreadsheet cell that stays text: one starting with a formula character gets a `'`
    (OWASP, "CSV Injection"); names and scripts are written by whoever may tag or train."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
