"""Cost and uptime warnings: one record per (instance, kind) in Redis, and its Slack message.

A warning is posted once per window (24 h). While the window lasts, later sweeps
update the same message; [Snooze 24h] and [Keep running] silence it until the
window ends. Posting is claimed with SET NX on a per-generation key, so two
sweeps running at once (rq cron re-fires on restart, has no leader) post once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel
from redis import Redis
from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)

from workers.fleetview import Row
from workers.ids import ActionId, BlockId
from workers.notifier import clamp
from workers.pricing import format_usd
from workers.render import duration
from workers.runs import RunState
from workers.settings import Settings

WINDOW = timedelta(hours=24)
RECORD_TTL_SECONDS = 30 * 86400
CLAIM_TTL_SECONDS = 7 * 86400
OPEN_SET = "runctl:warn:open"


class Kind(StrEnum):
    UPTIME = "uptime"
    COST = "cost"
    IDLE = "idle"
    CHECKPOINT = "checkpoint"


class Status(StrEnum):
    OPEN = "open"
    SNOOZED = "snoozed"
    KEPT = "kept"
    STOPPING = "stopping"
    RESOLVED = "resolved"


class WarningRecord(BaseModel):
    instance_id: str
    kind: Kind
    generation: int
    channel: str
    ts: str | None = None
    thread_ts: str | None = None  # checkpoint warnings live in the run's thread
    owner: str | None = None
    label: str = ""
    headline: str = ""  # what is wrong, with numbers, refreshed by each sweep
    detail: str = ""
    run_id: str | None = None
    posted_at: datetime
    updated_at: datetime
    status: Status = Status.OPEN
    quiet_until: datetime | None = None  # snoozed or kept until then
    acted_by: str | None = None
    reason: str = ""

    @property
    def key(self) -> str:
        return f"{self.instance_id}:{self.kind.value}"

    def window_over(self, now: datetime) -> bool:
        """A new message may be posted: the warning's window (or its snooze) has passed."""
        if self.status is Status.RESOLVED:
            return True
        until = self.quiet_until or self.posted_at + WINDOW
        return now >= until

    def silenced(self, now: datetime) -> bool:
        return self.status in (Status.SNOOZED, Status.KEPT, Status.STOPPING) and not self.window_over(now)


def button_value(instance_id: str, kind: Kind) -> str:
    return f"{instance_id}|{kind.value}"


def parse_button_value(value: str) -> tuple[str, Kind]:
    instance_id, _, kind = value.partition("|")
    return instance_id, Kind(kind)


class WarningStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def _key(instance_id: str, kind: Kind) -> str:
        return f"runctl:warn:{instance_id}:{kind.value}"

    def get(self, instance_id: str, kind: Kind) -> WarningRecord | None:
        raw = self.redis.get(self._key(instance_id, kind))
        return WarningRecord.model_validate_json(raw) if raw else None

    def claim(self, instance_id: str, kind: Kind, generation: int) -> bool:
        """True for exactly one caller per (instance, kind, generation)."""
        key = f"runctl:warn:claim:{instance_id}:{kind.value}:{generation}"
        return bool(self.redis.set(key, "1", nx=True, ex=CLAIM_TTL_SECONDS))

    def save(self, record: WarningRecord) -> WarningRecord:
        pipe = self.redis.pipeline()
        pipe.set(self._key(record.instance_id, record.kind), record.model_dump_json(), ex=RECORD_TTL_SECONDS)
        if record.status is Status.RESOLVED:
            pipe.srem(OPEN_SET, record.key)
        else:
            pipe.sadd(OPEN_SET, record.key)
        pipe.execute()
        return record

    def open(self) -> list[WarningRecord]:
        members = sorted(_text(m) for m in self.redis.smembers(OPEN_SET))
        keys = [self._key(iid, Kind(kind)) for iid, _, kind in (m.rpartition(":") for m in members)]
        raws = self.redis.mget(keys) if keys else []
        found: list[WarningRecord] = []
        stale: list[str] = []
        for member, raw in zip(members, raws, strict=True):
            record = WarningRecord.model_validate_json(raw) if raw else None
            if record is None or record.status is Status.RESOLVED:
                stale.append(member)
            else:
                found.append(record)
        if stale:
            self.redis.srem(OPEN_SET, *stale)
        return found

    def for_instance(self, instance_id: str) -> list[WarningRecord]:
        found = (self.get(instance_id, kind) for kind in Kind)
        return [r for r in found if r is not None and r.status is not Status.RESOLVED]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- detection ----------------------------------------------------------------------


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
    return found


def _detail(row: Row) -> str:
    inst = row.instance
    return (
        f"`{inst.id}` · {inst.type} · {row.price.describe()} · up {duration(row.uptime_seconds)} in total · "
        f"cost so far {format_usd(row.cost)} · stop it: `/runctl stop {inst.id}`"
    )


def _instance_findings(settings: Settings, row: Row, now: datetime) -> list[Finding]:
    label = f"*{row.instance.name or row.id}* ({row.instance.type})"
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
    what = (
        f"the newest is `{run.checkpoint.name}`" if run.checkpoint else "it has written none since it started"
    )
    headline = (
        f"Run `{run.run_id}` (`{run.script}`) on *{row.instance.label}* has written no new checkpoint for "
        f"{duration(quiet)} ({what}). If it crashes now, that work is lost; check `training.log` with "
        f"`/runctl status {row.id}`."
    )
    return [
        Finding(
            row.id,
            Kind.CHECKPOINT,
            run.user_id,
            row.instance.label,
            headline,
            _detail(row),
            f"no checkpoint for {duration(quiet)}",
            run_id=run.run_id,
            channel=run.channel_id,
            thread_ts=run.message_ts,
        )
    ]


# --- rendering ----------------------------------------------------------------------

ICON = {Kind.UPTIME: ":clock3:", Kind.COST: ":moneybag:", Kind.IDLE: ":zzz:", Kind.CHECKPOINT: ":floppy_disk:"}


def render(record: WarningRecord) -> tuple[str, list[Block]]:
    """The warning message; buttons only while someone still needs to decide."""
    mention = f"<@{record.owner}> " if record.owner else ""
    head = f"{ICON[record.kind]} {mention}{record.headline}"
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=clamp(head)))]
    if record.detail:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=clamp(record.detail))]))
    outcome = _outcome(record)
    if outcome:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=clamp(outcome))]))
    if record.status is Status.OPEN:
        blocks.append(_buttons(record))
    return clamp(f"{mention}{record.headline}", 300), blocks


def _outcome(record: WarningRecord) -> str:
    who = f"<@{record.acted_by}>" if record.acted_by else "someone"
    until = f"{record.quiet_until:%Y-%m-%d %H:%M} UTC" if record.quiet_until else ""
    if record.status is Status.SNOOZED:
        return f":mute: Snoozed by {who} until {until}."
    if record.status is Status.KEPT:
        reason = f": “{record.reason}”" if record.reason else " (no reason given)"
        return f":white_check_mark: Kept running by {who}{reason}. Quiet until {until}."
    if record.status is Status.STOPPING:
        return f":octagonal_sign: Stop requested by {who}; progress in the thread."
    if record.status is Status.RESOLVED:
        return ":heavy_check_mark: Resolved" + (f" ({record.reason})." if record.reason else ".")
    return ""


def _buttons(record: WarningRecord) -> ActionsBlock:
    value = button_value(record.instance_id, record.kind)
    stop = ButtonElement(
        text="Stop now",
        action_id=ActionId.WARN_STOP_NOW,
        value=value,
        style="danger",
        confirm=ConfirmObject(
            title="Stop the instance?",
            text=f"Stop {record.label}? A live run saves a checkpoint first.",
            confirm="Stop it",
            deny="Cancel",
        ),
    )
    snooze = ButtonElement(text="Snooze 24h", action_id=ActionId.WARN_SNOOZE, value=value)
    keep = ButtonElement(text="Keep running", action_id=ActionId.WARN_KEEP, value=value)
    return ActionsBlock(block_id=BlockId.WARNING_ACTIONS, elements=[stop, snooze, keep])
