"""The audit trail: one record per command, click and outcome.

Records go to the Redis stream ``runctl:audit`` (approximately capped at
``RUNCTL_AUDIT_MAXLEN``) and, as one JSON line each, to the ``runctl.audit`` log.
Writing a record never raises: an audit outage is logged, not turned into a
failed command.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field
from redis import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from workers.commands import Requester
from workers.errors import PermissionDenied, RateLimited, RunctlError
from workers.state.runs import Run

if TYPE_CHECKING:
    from workers.services import Services

STREAM = "runctl:audit"
log = logging.getLogger("runctl.audit")

Decision = Literal["allowed", "refused", "failed"]
Source = Literal["command", "click", "worker"]


class Record(BaseModel):
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    user: str
    channel: str = ""
    text: str = ""  # the command text, or `click <action_id>`
    decision: Decision
    outcome: str = ""
    run_id: str = ""
    instance: str = ""
    source: Source = "command"

    def fields(self) -> dict[FieldT, EncodableT]:
        return {k: str(v) for k, v in self.model_dump(mode="json").items()}


def of(who: Requester, decision: Decision, outcome: str, run_id: str = "", instance: str = "") -> Record:
    """A record for a requester (worker side): user, channel and text come from the request."""
    return Record(
        user=who.user_id,
        channel=who.channel_id,
        text=f"/runctl {who.text}" if who.text else "",
        decision=decision,
        outcome=outcome,
        source="worker",
        run_id=run_id,
        instance=instance,
    )


def decision_of(error: RunctlError) -> Decision:
    return "refused" if isinstance(error, PermissionDenied | RateLimited) else "failed"


def of_run(who: Requester, run: Run) -> Record:
    """The outcome of a train job, from its run record."""
    outcome = run.state.value + (f": {run.error.what}" if run.error else "")
    decision: Decision = "allowed"
    if run.error:
        decision = "refused" if run.error.kind in ("PermissionDenied", "RateLimited") else "failed"
    return of(who, decision, outcome, run_id=run.run_id, instance=run.instance_id)


def refuse(svc: Services, who: Requester, error: RunctlError, run_id: str = "", instance: str = "") -> str:
    """A worker-side refusal: tell the requester privately, audit it, and return "refused"."""
    svc.notifier.ephemeral(who.channel_id, who.user_id, error.as_text())
    record(svc.redis, svc.settings.RUNCTL_AUDIT_MAXLEN, of(who, decision_of(error), error.what, run_id, instance))
    return "refused"


def record(redis: Redis, maxlen: int, entry: Record) -> None:
    """Log the record and add it to the stream; on a pipeline, the XADD goes when its owner executes it."""
    log.info(json.dumps(entry.model_dump(mode="json"), ensure_ascii=False, sort_keys=True))
    try:
        redis.xadd(STREAM, entry.fields(), maxlen=maxlen, approximate=True)
    except RedisError:
        log.exception("could not write the audit record to Redis")


def newest(
    redis: Redis, count: int, instance: str | None = None, user: str | None = None, scan_limit: int = 20_000
) -> list[Record]:
    """The newest `count` records, newest first, optionally filtered."""
    found: list[Record] = []
    for entry in _scan(redis, scan_limit):
        if instance and entry.instance != instance:
            continue
        if user and entry.user != user:
            continue
        found.append(entry)
        if len(found) >= count:
            break
    return found


def _scan(redis: Redis, limit: int, batch: int = 500) -> Iterator[Record]:
    upper, seen = "+", 0
    while seen < limit:
        rows = redis.xrevrange(STREAM, max=upper, min="-", count=batch)
        if not rows:
            return
        for entry_id, raw in rows:
            seen += 1
            data = {_s(k): _s(v) for k, v in (raw or {}).items()}
            try:
                yield Record.model_validate(data)
            except ValueError:
                log.warning("skipping unreadable audit entry %s", _s(entry_id))
        last = _s(rows[-1][0])
        upper = "(" + last
        if len(rows) < batch:
            return


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value
