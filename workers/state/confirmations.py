"""Confirmations (terminate, launch) kept in Redis.

A confirmation lives for 10 minutes under ``runctl:confirm:terminate:<nonce>`` and
is consumed atomically (GET+DEL in one Lua step), so of any number of clicks exactly
one gets it. A receipt (``runctl:confirm:receipt:<nonce>``) and the outcome
(``runctl:confirm:outcome:<nonce>``) outlive it by a week, so a late or second click
is told what became of the confirmation instead of "unknown".
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from redis import Redis

from workers.slack.escape import code

TTL = timedelta(minutes=10)
RECEIPT_TTL = timedelta(days=7)


class Shown(BaseModel):
    """What a confirmation told people would be lost; a click re-checks it."""

    state: str  # the instance's
    live_run_id: str | None = None
    checkpoint_runs: tuple[str, ...] | None = None  # runs with checkpoints; None: could not be listed

    def changes(self, now: Shown) -> list[str]:
        """What is different `now`, in words; empty when the confirmation still holds."""
        out: list[str] = []
        if now.live_run_id != self.live_run_id:
            out.append(
                f"run {code(now.live_run_id)} is live now"
                if now.live_run_id and not self.live_run_id
                else f"run {code(self.live_run_id)} is no longer live"
                if not now.live_run_id
                else f"the live run is {code(now.live_run_id)} now, not {code(self.live_run_id)}"
            )
        if now.state != self.state:
            out.append(f"the instance is `{now.state}` now, not `{self.state}`")
        elif now.checkpoint_runs is not None and now.checkpoint_runs != self.checkpoint_runs:
            new = sorted(set(now.checkpoint_runs) - set(self.checkpoint_runs or ()))
            out.append(
                f"run {', '.join(code(r) for r in new[:5])} has checkpoints now"
                if new
                else "checkpoints listed then are gone"
            )
        return out


class Confirmation(BaseModel):
    nonce: str
    instance_id: str = ""  # empty for a launch: there is no instance yet
    requester_id: str
    channel_id: str
    created_at: datetime
    message_ts: str | None = None
    kind: str = "terminate"
    command: str = ""  # what to run again once it expired; empty: `/runctl terminate <instance>`
    payload: dict[str, Any] = Field(default_factory=dict)  # what the click acts on (a launch's spec)
    shown: Shown | None = None

    @property
    def expires_at(self) -> datetime:
        return self.created_at + TTL


def new_nonce() -> str:
    return secrets.token_urlsafe(16)


# GETDEL and the claim in one step: a losing click never sees "gone" without
# also seeing who took it.
_CONSUME = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return value
"""


class ConfirmStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def _key(nonce: str) -> str:
        return f"runctl:confirm:terminate:{nonce}"

    @staticmethod
    def _receipt_key(nonce: str) -> str:
        return f"runctl:confirm:receipt:{nonce}"

    @staticmethod
    def _outcome_key(nonce: str) -> str:
        return f"runctl:confirm:outcome:{nonce}"

    def save(self, confirmation: Confirmation) -> None:
        raw = confirmation.model_dump_json()
        pipe = self.redis.pipeline()
        pipe.set(self._key(confirmation.nonce), raw, px=_ms(TTL))
        pipe.set(self._receipt_key(confirmation.nonce), raw, px=_ms(RECEIPT_TTL))
        pipe.execute()

    def peek(self, nonce: str) -> Confirmation | None:
        """The live confirmation, without consuming it."""
        raw = self.redis.get(self._key(nonce))
        return Confirmation.model_validate_json(raw) if raw else None

    def consume(self, nonce: str, claim: str) -> Confirmation | None:
        """Take the confirmation, recording `claim` as its outcome; None when it expired
        or another click took it (``outcome`` then says which)."""
        raw = self.redis.eval(_CONSUME, 2, self._key(nonce), self._outcome_key(nonce), claim, _ms(RECEIPT_TTL))
        return Confirmation.model_validate_json(raw) if raw else None

    def receipt(self, nonce: str) -> Confirmation | None:
        """The confirmation as it was asked, for a week, used or not."""
        raw = self.redis.get(self._receipt_key(nonce))
        return Confirmation.model_validate_json(raw) if raw else None

    def outcome(self, nonce: str) -> str | None:
        raw = self.redis.get(self._outcome_key(nonce))
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def settle(self, nonce: str, outcome: str) -> None:
        self.redis.set(self._outcome_key(nonce), outcome, px=_ms(RECEIPT_TTL))


def _ms(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1000)
