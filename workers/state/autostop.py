"""Autostop: per-instance settings in Redis, and the decision the sweep (and bench/waste.py) makes.

An instance with autostop set to N minutes is stopped once it has had no live run (and,
where nvidia-smi exists, busy GPUs) for N minutes, and only after its owner had a
heads-up ``RUNCTL_AUTOSTOP_HEADSUP_MINUTES`` earlier. ``decide`` is pure: the idle clock
comes in, a verdict goes out, so a month can be simulated through the very same code.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel
from redis import Redis

KEY = "runctl:autostop"  # hash: instance id -> Setting JSON
KEEP = timedelta(hours=1)


class Verdict(StrEnum):
    WAIT = "wait"  # nothing to do yet
    HEADS_UP = "heads-up"  # tell the owner it stops soon
    STOP = "stop"  # stop it now
    RESET = "reset"  # it is busy again: withdraw the heads-up


def due_at(minutes: float, idle_since: datetime, kept_until: datetime | None) -> datetime:
    """When an instance idle since ``idle_since`` is stopped, [Keep running 1h] included."""
    due = idle_since + timedelta(minutes=minutes)
    return max(due, kept_until) if kept_until else due


def decide(
    minutes: float,
    headsup_minutes: float,
    idle_since: datetime | None,
    now: datetime,
    headsup_at: datetime | None,
    kept_until: datetime | None = None,
) -> Verdict:
    """``idle_since`` is None while a run is live (or the GPUs are busy, or it is not running):
    then it never stops. A stop comes no earlier than ``headsup_minutes`` after the heads-up
    for this idle stretch, however late a sweep posted it."""
    if idle_since is None:
        return Verdict.RESET if headsup_at is not None else Verdict.WAIT
    due = due_at(minutes, idle_since, kept_until)
    warn_at = due - timedelta(minutes=headsup_minutes)
    if headsup_at is None or headsup_at < warn_at:  # none yet for this stretch
        return Verdict.HEADS_UP if now >= warn_at else Verdict.WAIT
    stop_at = max(due, headsup_at + timedelta(minutes=headsup_minutes))
    return Verdict.STOP if now >= stop_at else Verdict.WAIT


class Setting(BaseModel):
    instance_id: str
    minutes: int
    set_by: str
    channel: str  # where the heads-up goes: the owner's thread there
    thread_ts: str | None = None
    owner: str | None = None
    kept_until: datetime | None = None
    gpu_busy_at: datetime | None = None  # the last sweep that saw the GPUs busy
    headsup_at: datetime | None = None
    headsup_ts: str | None = None

    def idle_since(self, run_idle_since: datetime | None) -> datetime | None:
        """The training-aware idle clock: no live run, and busy GPUs reset it too."""
        if run_idle_since is None:
            return None
        return max(run_idle_since, self.gpu_busy_at) if self.gpu_busy_at else run_idle_since


class AutostopStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def get(self, instance_id: str) -> Setting | None:
        raw = self.redis.hget(KEY, instance_id)
        return Setting.model_validate_json(raw) if raw else None

    def save(self, setting: Setting) -> None:
        self.redis.hset(KEY, setting.instance_id, setting.model_dump_json())

    def delete(self, instance_id: str) -> bool:
        return bool(self.redis.hdel(KEY, instance_id))

    def all(self) -> list[Setting]:
        return [Setting.model_validate_json(raw) for raw in self.redis.hgetall(KEY).values()]

    def claim_stop(self, instance_id: str, seconds: int = 900) -> bool:
        """One stop job per instance at a time, however many sweeps decide STOP."""
        return bool(self.redis.set(f"runctl:autostop:stopping:{instance_id}", "1", nx=True, ex=seconds))

    def release_stop(self, instance_id: str) -> None:
        self.redis.delete(f"runctl:autostop:stopping:{instance_id}")
