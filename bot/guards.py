"""Redis-backed request guards: once-only delivery and a per-user rate limit.

Both are decided by one Lua script, so admitting a request costs a single Redis
round trip (the ack path's budget is a few milliseconds of CPU per request).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from redis import Redis

from workers.errors import RateLimited

SEEN_TTL_SECONDS = 3600
WINDOW_SECONDS = 60

# KEYS: seen key, rate key. ARGV: seen ttl, count (0/1), now, window, limit, member.
# Returns {0} for a repeat; {1} when admitted; {1, count, oldest score} when over the limit.
# A repeat or an uncounted request never touches the window; a refused one is not added to it.
_ADMIT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {0} end
if ARGV[2] == '0' then return {1} end
local now, window = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, now - window)
local count = redis.call('ZCARD', KEYS[2])
if count >= tonumber(ARGV[5]) then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {1, count, oldest[2] or ARGV[3]}
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6])
redis.call('EXPIRE', KEYS[2], 2 * window)
return {1}
"""


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


def admit(redis: Redis, key: str, user_id: str, per_minute: int, count: bool = True, now: float | None = None) -> bool:
    """False for a replay or retry of `key` (seen within the hour). Otherwise True, after
    counting one request for user_id in a sliding 60 s window (when `count`);
    RateLimited, uncounted, when the user already sent per_minute in it."""
    now = time.time() if now is None else now
    member = f"{now:.6f}:{time.monotonic_ns()}"
    args = (SEEN_TTL_SECONDS, int(count), repr(now), WINDOW_SECONDS, per_minute, member)
    reply = redis.eval(_ADMIT, 2, f"runctl:seen:{key}", f"runctl:rate:{user_id}", *args)
    if not reply[0]:
        return False
    if len(reply) > 1:
        sent, oldest = int(reply[1]), float(reply[2])
        wait = max(1, int(WINDOW_SECONDS - (now - oldest) + 0.999))
        raise RateLimited(
            f"Slow down: you sent {sent} runctl requests in the last minute; the limit is {per_minute}.",
            why="The limit protects the AWS API quotas and the channel.",
            fix=f"Try again in {wait} s. (Admins can raise RUNCTL_RATE_PER_MINUTE.)",
        )
    return True
