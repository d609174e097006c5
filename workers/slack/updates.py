"""Run messages updated within Slack's rate limits.

`chat.update` is Tier 3: about 50 a minute for the whole workspace (api.slack.com/docs/rate-limits).
Fifty runs polled every few seconds would ask for hundreds. So a run's message is updated at
most every RUNCTL_SLACK_UPDATE_SECONDS, the workspace's updates share one Redis token bucket
(RUNCTL_SLACK_UPDATES_PER_MINUTE, under Slack's 50), and whatever cannot go now waits in a
Redis set for the monitor's next tick. The message is rendered from the run record when it is
sent, so the last state always wins. A 429 never sleeps: it blocks updates for its Retry-After
and the update waits its turn, while the tick goes on polling.
"""

from __future__ import annotations

import logging
import time

from slack_sdk.errors import SlackApiError

from workers.services import Services
from workers.slack.messages.run import run_blocks
from workers.state.runs import Run

log = logging.getLogger(__name__)

PENDING = "runctl:slack:pending"  # zset: run id -> not before (unix time)
BLOCKED = "runctl:slack:blocked_until"  # a 429's Retry-After, for every update
BUCKET = "runctl:slack:bucket:chat.update"
BURST = 6  # updates that may go at once; with 40 a minute, at most 46 in any minute

# KEYS: bucket. ARGV: now, rate per second, burst. Returns "0" when a token was taken,
# else the seconds until one is there.
_TAKE = """
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if tokens < 1 then
  redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
  return tostring((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens - 1, 'at', now)
redis.call('EXPIRE', KEYS[1], 3600)
return '0'
"""


def _sent_key(run_id: str) -> str:
    return f"runctl:slack:sent:{run_id}"


def posted(svc: Services, run: Run) -> None:
    """The parent message was just posted: its first update waits the usual interval."""
    interval = svc.settings.RUNCTL_SLACK_UPDATE_SECONDS
    if interval > 0:
        svc.redis.set(_sent_key(run.run_id), repr(time.time()), ex=max(60, int(interval * 10)))


def show(svc: Services, run: Run) -> None:
    """Bring the run's message up to date: now if its interval and the budget allow, else soon."""
    now = time.time()
    not_before = max(_float(svc.redis.get(BLOCKED)), _last(svc, run.run_id) + svc.settings.RUNCTL_SLACK_UPDATE_SECONDS)
    if not_before > now:
        defer(svc, run.run_id, not_before)
        return
    wait = float(svc.redis.eval(_TAKE, 1, BUCKET, repr(now), repr(_rate(svc)), BURST))
    if wait > 0:
        defer(svc, run.run_id, now + wait)
        return
    send(svc, run, now)


def send(svc: Services, run: Run, now: float) -> None:
    if run.message_ts is None:
        return
    text, blocks = run_blocks(run, svc.clock())
    try:
        svc.notifier.update(run.channel_id, run.message_ts, text, blocks, wait=False)
    except SlackApiError as exc:
        if exc.response.status_code == 429:
            retry = _float(exc.response.headers.get("Retry-After")) or 1.0
            log.info("chat.update rate-limited for %.0f s; run %s waits", retry, run.run_id)
            svc.redis.set(BLOCKED, repr(now + retry), ex=int(retry) + 60)
            defer(svc, run.run_id, now + retry)
        else:
            log.warning("could not update run %s: %s", run.run_id, exc.response.get("error"))
        return
    if svc.settings.RUNCTL_SLACK_UPDATE_SECONDS > 0:
        svc.redis.set(_sent_key(run.run_id), repr(now), ex=max(60, int(svc.settings.RUNCTL_SLACK_UPDATE_SECONDS * 10)))


def defer(svc: Services, run_id: str, at: float) -> None:
    from workers.jobs.monitor import ensure_tick

    svc.redis.zadd(PENDING, {run_id: at}, lt=True)
    ensure_tick(svc, svc.clock().timestamp() + max(0.0, at - time.time()))


def flush(svc: Services) -> float | None:
    """Send the updates that are due (each run's newest state); the seconds until the next
    pending one, or None when nothing waits."""
    now = time.time()
    for raw in svc.redis.zrangebyscore(PENDING, "-inf", now):
        run_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not svc.redis.zrem(PENDING, run_id):
            continue  # another tick took it
        run = svc.runs.get(run_id)
        if run is not None:
            show(svc, run)
    upcoming = svc.redis.zrange(PENDING, 0, 0, withscores=True)
    return max(0.0, float(upcoming[0][1]) - time.time()) if upcoming else None


def _rate(svc: Services) -> float:
    return svc.settings.RUNCTL_SLACK_UPDATES_PER_MINUTE / 60.0


def _last(svc: Services, run_id: str) -> float:
    if svc.settings.RUNCTL_SLACK_UPDATE_SECONDS <= 0:
        return 0.0
    return _float(svc.redis.get(_sent_key(run_id)))


def _float(value: object) -> float:
    if value is None:
        return 0.0
    try:
        return float(value.decode() if isinstance(value, bytes) else str(value))
    except ValueError:
        return 0.0
