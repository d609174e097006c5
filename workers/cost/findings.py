"""What the sweep warns about: conditions that hold right now, found in the fleet view."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from workers.cost.fleetview import Row
from workers.cost.pricing import format_usd
from workers.settings import Settings
from workers.slack.escape import code, escape
from workers.slack.format import duration
from workers.state.runs import Run, RunState
from workers.state.warnings import Kind


@dataclass(frozen=True)
class Finding:
    """A warning condition that holds right now."""

    instance_id: str
    kind: Kind
    owner: str | None
    label: str
    headline: str
    detail: str
    summary: str  # a few words for inline lists: "idle 2h 05m ($2.10)"
    run_id: str | None = None
    channel: str | None = None  # None: RUNCTL_CHANNEL
    thread_ts: str | None = None

    @property
    def key(self) -> str:
        return f"{self.instance_id}:{self.kind.value}"


def detect(settings: Settings, rows: list[Row], now: datetime) -> list[Finding]:
    found: list[Finding] = []
    for row in rows:
        if row.running:
            found.extend(_instance_findings(settings, row, now))
        if row.live_run is not None:
            found.extend(_checkpoint_findings(settings, row, now))
            found.extend(_gpu_findings(settings, row, now))
    return found


def _detail(row: Row) -> str:
    inst = row.instance
    return (
        f"`{inst.id}` · {inst.type} · {inst.region} · {row.price.describe()} · "
        f"up {duration(row.uptime_seconds)} in total · cost so far {format_usd(row.cost)} · "
        f"stop it: `/runctl stop {inst.id}`"
    )


def _instance_findings(settings: Settings, row: Row, now: datetime) -> list[Finding]:
    label = f"*{escape(row.instance.name or row.id)}* ({row.instance.type})"
    found: list[Finding] = []

    def add(kind: Kind, headline: str, summary: str) -> None:
        found.append(Finding(row.id, kind, row.owner, row.instance.label, headline, _detail(row), summary))

    limit_hours = settings.RUNCTL_WARN_UPTIME_HOURS
    if row.uptime_seconds > limit_hours * 3600:
        add(
            Kind.UPTIME,
            f"{label} has been running for {duration(row.uptime_seconds)} in total, "
            f"over the {limit_hours:g} h limit. It costs {row.price.describe()}.",
            f"up {duration(row.uptime_seconds)} (limit {limit_hours:g} h)",
        )
    limit_usd = Decimal(str(settings.RUNCTL_WARN_COST_USD))
    if row.cost is not None and row.cost > limit_usd:
        add(
            Kind.COST,
            f"{label} has cost {format_usd(row.cost)} so far, over the {format_usd(limit_usd)} limit "
            f"({row.price.describe()}).",
            f"cost {format_usd(row.cost)} (limit {format_usd(limit_usd)})",
        )
    idle = row.idle_seconds(now)
    if row.idle and idle > settings.RUNCTL_IDLE_MINUTES * 60:
        last = row.last_run
        since = f"since run `{last.run_id}` ended" if last and last.ended_at == row.idle_since else "since it started"
        idle_cost = row.cost_of(idle)
        cost_text = f"that idle time cost {format_usd(idle_cost)}" if idle_cost is not None else "its price is unknown"
        add(
            Kind.IDLE,
            f"{label} has been idle for {duration(idle)} with nothing training ({since}); {cost_text}. "
            f"Stop it if nobody needs it.",
            f"idle {duration(idle)}" + (f" ({format_usd(idle_cost)})" if idle_cost is not None else ""),
        )
    return found


def _checkpoint_findings(settings: Settings, row: Row, now: datetime) -> list[Finding]:
    run = row.live_run
    if run is None or not row.running or run.state is not RunState.RUNNING:
        return []
    newest = run.checkpoint.modified_at if run.checkpoint else run.started_at or run.created_at
    quiet = (now - newest).total_seconds()
    if quiet <= settings.RUNCTL_CHECKPOINT_WARN_MINUTES * 60:
        return []
    what = f"the newest is {code(run.checkpoint.name)}" if run.checkpoint else "it has written none since it started"
    headline = (
        f"Run `{run.run_id}` ({code(run.script)}) on *{row.instance.label}* has written no new checkpoint for "
        f"{duration(quiet)} ({what}). If it crashes now, that work is lost; check `training.log` with "
        f"`/runctl status {row.id}`."
    )
    return [_in_run_thread(row, run, Kind.CHECKPOINT, headline, f"no checkpoint for {duration(quiet)}")]


def _in_run_thread(row: Row, run: Run, kind: Kind, headline: str, summary: str) -> Finding:
    """A finding about a live run, owned by its person and told in its thread."""
    return Finding(
        row.id,
        kind,
        run.user_id,
        row.instance.label,
        headline,
        _detail(row),
        summary,
        run_id=run.run_id,
        channel=run.channel_id,
        thread_ts=run.message_ts,
    )


def _gpu_findings(settings: Settings, row: Row, now: datetime) -> list[Finding]:
    """A live run whose GPUs have sat near 0 % for RUNCTL_GPU_IDLE_MINUTES: stuck, or CPU-bound?"""
    run = row.live_run
    if run is None or not row.running or run.state is not RunState.RUNNING or run.gpu_idle_since is None:
        return []
    quiet = (now - run.gpu_idle_since).total_seconds()
    if quiet <= settings.RUNCTL_GPU_IDLE_MINUTES * 60:
        return []
    headline = (
        f"Run `{run.run_id}` ({code(run.script)}) on *{row.instance.label}* has kept its GPUs at or below "
        f"{settings.RUNCTL_GPU_IDLE_PERCENT:g} % for {duration(quiet)}: stuck or CPU-bound? "
        f"It costs {row.price.describe()}; look at `training.log` with `/runctl status {row.id}`."
    )
    return [_in_run_thread(row, run, Kind.GPU_IDLE, headline, f"GPUs idle for {duration(quiet)}")]
