"""Cost and uptime warnings: one record per (instance, kind) in Redis, and its Slack message.

A warning is posted once per window (24 h). While the window lasts, later sweeps
update the same message; [Snooze 24h] and [Keep running] silence it until the
window ends. Posting is claimed with SET NX on a per-generation key, so two
sweeps running at once (rq cron re-fires on restart, has no leader) post once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel
from redis import Redis

WINDOW = timedelta(hours=24)
RECORD_TTL_SECONDS = 30 * 86400
CLAIM_TTL_SECONDS = 7 * 86400
OPEN_SET = "runctl:warn:open"


class Kind(StrEnum):
    UPTIME = "uptime"
    COST = "cost"
    IDLE = "idle"
    CHECKPOINT = "checkpoint"
    GPU_IDLE = "gpu-idle"  # a live run whose GPUs sit near 0 %


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
