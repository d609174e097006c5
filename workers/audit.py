"""The audit trail: one record per command, click and outcome.

Records go to the Redis stream ``runctl:audit`` (approximately capped at
``RUNCTL_AUDIT_MAXLEN``) and, as one JSON line each, to the ``runctl.audit`` log.
Writing a record never raises: an audit outage is logged, not turned into a
failed command.

The front door writes with a per-user cap (``RUNCTL_AUDIT_PER_MINUTE``), so one user
flooding requests cannot evict everyone else's records from the length-capped stream:
over the cap, a user's records are counted, not written; the first one dropped writes a
``dropped`` marker, and the user's first record of a later minute is preceded by
"N more from U… dropped". The log line is written for every record either way.
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

from workers.commands import Actor
from workers.errors import PermissionDenied, RateLimited, RunctlError

if TYPE_CHECKING:
    from workers.services import Services

STREAM = "runctl:audit"
log = logging.getLogger("runctl.audit")

Decision = Literal["allowed", "refused", "failed", "dropped"]  # dropped: the per-user cap
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


def of(actor: Actor, decision: Decision, outcome: str, run_id: str = "", instance: str = "") -> Record:
    """A record for a requester (worker side): user, channel and text come from the request."""
    return Record(
        user=actor.user_id,
        channel=actor.channel_id,
        text=f"/runctl {actor.text}" if actor.text else "",
        decision=decision,
        outcome=outcome,
        source="worker",
        run_id=run_id,
        instance=instance,
    )


def decision_of(error: RunctlError) -> Decision:
    return "refused" if isinstance(error, PermissionDenied | RateLimited) else "failed"


def refuse(svc: Services, actor: Actor, error: RunctlError, run_id: str = "", instance: str = "") -> str:
    """A worker-side refusal: tell the requester privately, audit it, and return "refused"."""
    svc.notifier.ephemeral(actor.channel_id, actor.user_id, error.as_text(), response_url=actor.response_url)
    record(svc.redis, svc.settings.RUNCTL_AUDIT_MAXLEN, of(actor, decision_of(error), error.what, run_id, instance))
    return "refused"


# The capped write as a Lua function, so that other scripts (the front door's, bot/guards.py)
# can write a record in their own round trip. a: maxlen, cap, minute, minute label, time,
# user, source, then the record as its JSON log line (one argument, not one per field: each
# costs redis-py an encoding, issue 28). The quota hash holds the current minute's count and
# drops; a new minute first writes the last one's "N more … dropped" record.
CAPPED_FUNCTION = """
local function capped_record(stream, quota, a)
  local function add(fields)
    redis.call('XADD', stream, 'MAXLEN', '~', a[1], '*', unpack(fields))
  end
  local function note(outcome)
    add({'time', a[5], 'user', a[6], 'channel', '', 'text', '', 'decision', 'dropped',
         'outcome', outcome, 'run_id', '', 'instance', '', 'source', a[7]})
  end
  local q = redis.call('HMGET', quota, 'minute', 'count', 'dropped', 'label')
  if q[1] ~= a[3] then
    if q[3] and tonumber(q[3]) > 0 then
      note(q[3] .. ' more from ' .. a[6] .. ' dropped in the minute from ' .. q[4] ..
           ' (over ' .. a[2] .. ' records a minute)')
    end
    redis.call('HSET', quota, 'minute', a[3], 'count', 0, 'dropped', 0, 'label', a[4])
    redis.call('EXPIRE', quota, 86400)
  end
  local count = redis.call('HINCRBY', quota, 'count', 1)
  if count > tonumber(a[2]) then
    redis.call('HINCRBY', quota, 'dropped', 1)
    if count == tonumber(a[2]) + 1 then
      note('over ' .. a[2] .. ' records a minute: more from ' .. a[6] .. ' in the minute from ' ..
           a[4] .. ' are dropped; their number follows with the next record')
    end
    return 0
  end
  local fields = {}
  for k, v in pairs(cjson.decode(a[8])) do
    fields[#fields + 1] = k
    fields[#fields + 1] = (type(v) == 'string') and v or ''
  end
  add(fields)
  return 1
end
"""
# KEYS: stream, the user's quota hash. ARGV: capped_args. One script, so the cap costs no extra round trip.
_CAPPED = CAPPED_FUNCTION + "return capped_record(KEYS[1], KEYS[2], ARGV)"


def quota_key(user: str) -> str:
    return f"runctl:audit:quota:{user}"


def line(entry: Record) -> str:
    """The record as its JSON log line (and as CAPPED_FUNCTION takes it)."""
    return json.dumps(entry.model_dump(mode="json"), ensure_ascii=False, sort_keys=True)


def log_record(text: str) -> None:
    """A record's JSON line (`line`) in the runctl.audit log, written for every record."""
    log.info(text)


def capped_args(maxlen: int, entry: Record, per_minute: int, text: str) -> list[EncodableT]:
    """CAPPED_FUNCTION's arguments for `entry`, whose line is `text`."""
    minute = int(entry.time.timestamp() // 60)
    label = f"{entry.time:%H:%M} UTC"
    when = entry.time.isoformat().replace("+00:00", "Z")  # as the line has it (pydantic's JSON)
    return [maxlen, per_minute, minute, label, when, entry.user, entry.source, text]


def record(redis: Redis, maxlen: int, entry: Record, per_minute: int = 0) -> None:
    """Log the record and add it to the stream; on a pipeline, the write goes when its owner executes it.

    per_minute > 0 caps the stream writes of entry.user (the front door passes
    RUNCTL_AUDIT_PER_MINUTE); the workers' outcome records are not capped."""
    text = line(entry)
    log_record(text)
    try:
        if per_minute <= 0:
            redis.xadd(STREAM, entry.fields(), maxlen=maxlen, approximate=True)
            return
        redis.eval(_CAPPED, 2, STREAM, quota_key(entry.user), *capped_args(maxlen, entry, per_minute, text))
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
