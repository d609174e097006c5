"""Cost and uptime warnings: one record per (instance, kind) in Redis, and the Slack
messages ("posts") that show them, several warnings to a post.

A warning is posted once per window (24 h). While the window lasts, later sweeps
refresh the post it is in; [Snooze 24h] and [Keep running] silence it until the
window ends. A record is created once per generation (SET NX claim), and posted
under a per-channel lock, so two sweeps running at once (rq cron re-fires on
restart, has no leader) post each warning once.
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
POSTING_TTL_MS = 120_000


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
    ts: str | None = None  # the post that shows it; None until posted
    thread_ts: str | None = None  # checkpoint warnings live in the run's thread; overflow posts in the head's
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


class WarningPost(BaseModel):
    """One Slack message listing warnings (in the order shown), rendered from their records."""

    channel: str
    ts: str
    thread_ts: str | None = None
    keys: list[str]
    in_thread: int = 0  # warnings in overflow posts in this one's thread
    later: int = 0  # warnings that did not fit this sweep's posts; the next sweep posts them

    @property
    def id(self) -> str:
        return post_id(self.channel, self.ts)


def post_id(channel: str, ts: str) -> str:
    return f"{channel}:{ts}"


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

    def unposted(self) -> list[WarningRecord]:
        """Open warnings not on Slack yet (new, or left over from a sweep that hit a limit)."""
        return [r for r in self.open() if r.ts is None and r.status is Status.OPEN]

    def save_post(self, post: WarningPost) -> WarningPost:
        self.redis.set(f"runctl:warn:post:{post.id}", post.model_dump_json(), ex=RECORD_TTL_SECONDS)
        return post

    def post(self, channel: str, ts: str) -> WarningPost | None:
        raw = self.redis.get(f"runctl:warn:post:{post_id(channel, ts)}")
        return WarningPost.model_validate_json(raw) if raw else None

    def records(self, post: WarningPost) -> list[WarningRecord]:
        """The post's warnings, in its order (a record that expired is left out)."""
        pairs = [key.rpartition(":") for key in post.keys]
        raws = self.redis.mget([self._key(iid, Kind(kind)) for iid, _, kind in pairs]) if pairs else []
        return [WarningRecord.model_validate_json(raw) for raw in raws if raw]

    def posting(self, channel: str, token: str) -> bool:
        """Take the channel's posting lock (one sweep posts in a channel at a time)."""
        return bool(self.redis.set(f"runctl:warn:posting:{channel}", token, nx=True, px=POSTING_TTL_MS))

    def posted(self, channel: str, token: str) -> None:
        self.redis.eval(_RELEASE, 1, f"runctl:warn:posting:{channel}", token)


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
