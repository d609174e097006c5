"""Redis-backed request guards: once-only delivery and a per-user rate limit.

Both are decided in Redis by one Lua script. A slash command's script also writes what
the front door decided (its audit record) and, when it is admitted, its job (the writes RQ
recorded on a pipeline): the ack costs one Redis round trip, as a bare enqueue does (issue 28).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError
from redis.typing import EncodableT

from workers import audit
from workers.errors import RateLimited

SEEN_TTL_SECONDS = 3600
WINDOW_SECONDS = 60
REPLAY, ADMITTED, BUSY, OVER = 0, 1, 2, 3  # the scripts' first reply

# KEYS[1], KEYS[2]: seen key, rate key. ARGV[1..6]: seen ttl, count (0/1), now, window, limit, member.
# nil when admitted; {REPLAY} for a repeat; {OVER, count, oldest score} over the limit.
# A repeat or an uncounted request never touches the window; a refused one is not added to it.
_GUARD = """
local function guard()
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {0} end
  if ARGV[2] == '0' then return nil end
  local now, window = tonumber(ARGV[3]), tonumber(ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, now - window)
  local count = redis.call('ZCARD', KEYS[2])
  if count >= tonumber(ARGV[5]) then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {3, count, oldest[2] or ARGV[3]}
  end
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6])
  redis.call('EXPIRE', KEYS[2], 2 * window)
  return nil
end
"""
_ADMIT = _GUARD + "return guard() or {1}"

# The slash command's door. KEYS[3..5]: audit stream, the user's audit quota, the train lock
# looked at (any key when none is). ARGV[7]: look at the lock (0/1); ARGV[8]: n, then n audit
# arguments (audit.capped_args), then the job's writes, each as: argc, its key's index in
# KEYS, the command, argc arguments. Once admitted, the audit record is written; {BUSY,
# holder} when the lock is held (the job is then not written); else the writes, and {ADMITTED}.
_DOOR = (
    _GUARD
    + audit.CAPPED_FUNCTION
    + """
local refused = guard()
if refused then return refused end
local n = tonumber(ARGV[8])
capped_record(KEYS[3], KEYS[4], {unpack(ARGV, 9, 8 + n)})
if ARGV[7] == '1' then
  local holder = redis.call('GET', KEYS[5])
  if holder then return {2, holder} end
end
local i = 9 + n
while i <= #ARGV do
  local argc = tonumber(ARGV[i])
  redis.call(ARGV[i + 2], KEYS[tonumber(ARGV[i + 1])], unpack(ARGV, i + 3, i + 2 + argc))
  i = i + 3 + argc
end
return {1}
"""
)
_DOOR_SHA = hashlib.sha1(_DOOR.encode()).hexdigest()
# What RQ writes when it queues a job on a pipeline: commands whose one key is their first argument.
_ONE_KEY = frozenset({"SADD", "HSET", "HMSET", "RPUSH", "LPUSH", "ZADD", "EXPIRE", "PERSIST", "SET", "DEL"})


def request_key(body: dict[str, Any], raw_body: str) -> str:
    """The idempotency key of a request: trigger_id for commands, action_ts + user for clicks."""
    actions = body.get("actions") or []
    if body.get("type") == "block_actions" and actions:
        user = (body.get("user") or {}).get("id", "")
        first = actions[0]
        return f"click:{user}:{first.get('action_id', '')}:{first.get('action_ts', '')}"
    trigger = body.get("trigger_id")
    if trigger:
        return f"trigger:{trigger}"
    return "body:" + hashlib.sha256(raw_body.encode()).hexdigest()


def _guard_args(key: str, user_id: str, per_minute: int, count: bool, now: float) -> tuple[list[str], list[EncodableT]]:
    member = f"{now:.6f}:{time.monotonic_ns()}"
    keys = [f"runctl:seen:{key}", f"runctl:rate:{user_id}"]
    return keys, [SEEN_TTL_SECONDS, int(count), repr(now), WINDOW_SECONDS, per_minute, member]


def _over(reply: list[Any], per_minute: int, now: float) -> RateLimited:
    sent, oldest = int(reply[1]), float(reply[2])
    wait = max(1, int(WINDOW_SECONDS - (now - oldest) + 0.999))
    return RateLimited(
        f"Slow down: you sent {sent} runctl requests in the last minute; the limit is {per_minute}.",
        why="The limit protects the AWS API quotas and the channel.",
        fix=f"Try again in {wait} s. (Admins can raise RUNCTL_RATE_PER_MINUTE.)",
    )


def admit(redis: Redis, key: str, user_id: str, per_minute: int, count: bool = True, now: float | None = None) -> bool:
    """False for a replay or retry of `key` (seen within the hour). Otherwise True, after
    counting one request for user_id in a sliding 60 s window (when `count`);
    RateLimited, uncounted, when the user already sent per_minute in it."""
    now = time.time() if now is None else now
    keys, args = _guard_args(key, user_id, per_minute, count, now)
    reply = redis.eval(_ADMIT, 2, *keys, *args)
    if reply[0] == OVER:
        raise _over(reply, per_minute, now)
    return bool(reply[0] == ADMITTED)


@dataclass(frozen=True)
class Passed:
    """An admitted request whose audit record is written; `holder`: the train lock's value
    when it was held (the job was then not written), else None (it was)."""

    holder: str | None = None


def admit_writing(
    redis: Redis,
    key: str,
    user_id: str,
    per_minute: int,
    count: bool,
    record: list[EncodableT],
    writes: Pipeline | None = None,
    lock: str | None = None,
    now: float | None = None,
) -> Passed | None:
    """`admit` (None for a replay, RateLimited over the limit; neither writes anything), then,
    in the same script: the audit record (`record`: audit.capped_args), and the commands
    queued on `writes` unless `lock` is given and held. One round trip; `writes` is not executed."""
    now = time.time() if now is None else now
    keys, args = _guard_args(key, user_id, per_minute, count, now)
    keys += [audit.STREAM, audit.quota_key(user_id), lock or keys[0]]
    args += [int(lock is not None), len(record), *record]
    index: dict[str, int] = {}
    for command, _options in writes.command_stack if writes is not None else ():
        name, target, *rest = command
        name = str(name).upper()
        if name not in _ONE_KEY:
            raise ValueError(f"the front door's script does not run {name}")
        target = target.decode() if isinstance(target, bytes) else str(target)
        if target not in index:
            keys.append(target)
            index[target] = len(keys)  # Lua's KEYS count from 1
        args += [len(rest), index[target], name, *rest]
    try:
        reply = redis.evalsha(_DOOR_SHA, len(keys), *keys, *args)
    except NoScriptError:
        reply = redis.eval(_DOOR, len(keys), *keys, *args)  # loads it into the script cache too
    if reply[0] == REPLAY:
        return None
    if reply[0] == OVER:
        raise _over(reply, per_minute, now)
    if reply[0] == BUSY:
        holder = reply[1]
        return Passed(holder.decode() if isinstance(holder, bytes) else str(holder))
    return Passed()
