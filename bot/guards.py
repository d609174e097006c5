"""Redis-backed request guards: once-only delivery and a per-user rate limit."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from redis import Redis

from workers.errors import RateLimited

SEEN_TTL_SECONDS = 3600
WINDOW_SECONDS = 60


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


def first_delivery(redis: Redis, key: str) -> bool:
    """True the first time a key is seen (within an hour); False for a replay or retry."""
    return bool(redis.set(f"runctl:seen:{key}", "1", nx=True, ex=SEEN_TTL_SECONDS))


def rate_limit(redis: Redis, user_id: str, per_minute: int, now: float | None = None) -> None:
    """Count one request for user_id in a sliding 60 s window; RateLimited past per_minute."""
    now = time.time() if now is None else now
    key = f"runctl:rate:{user_id}"
    pipe = redis.pipeline()
    pipe.zremrangebyscore(key, 0, now - WINDOW_SECONDS)
    pipe.zrange(key, 0, 0, withscores=True)
    pipe.zcard(key)
    oldest, count = pipe.execute()[1:]
    if count >= per_minute:
        wait = max(1, int(WINDOW_SECONDS - (now - float(oldest[0][1])) + 0.999)) if oldest else WINDOW_SECONDS
        raise RateLimited(
            f"Slow down: you sent {count} runctl requests in the last minute; the limit is {per_minute}.",
            why="The limit protects the AWS API quotas and the channel.",
            fix=f"Try again in {wait} s. (Admins can raise RUNCTL_RATE_PER_MINUTE.)",
        )
    pipe = redis.pipeline()
    pipe.zadd(key, {f"{now:.6f}:{time.monotonic_ns()}": now})
    pipe.expire(key, WINDOW_SECONDS * 2)
    pipe.execute()
