"""Run messages and warning posts updated within Slack's rate limits.

`chat.update` is Tier 3: about 50 a minute for the whole workspace (api.slack.com/docs/rate-limits).
Fifty runs polled every few seconds would ask for hundreds. So a run's message is updated at
most every RUNCTL_SLACK_UPDATE_SECONDS, the workspace's updates share one Redis token bucket
(RUNCTL_SLACK_UPDATES_PER_MINUTE, under Slack's 50), and whatever cannot go now waits in a
Redis set for the monitor's next tick. The message is rendered from the run record when it is
sent, so the last state always wins. A 429 never sleeps: it blocks updates for its Retry-After
and the update waits its turn, while the tick goes on polling.

Warning posts (the sweep's) go the same way, as pending members `post:<channel>:<ts>`, and
are only sent when what they show changed since the last update.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import Block

from workers.context import Context
from workers.slack.messages.run import run_blocks
from workers.slack.messages.warning import render_post
from workers.state.polls import ensure_tick
from workers.state.runs import Run
from workers.state.warnings import WarningStore, post_id

log = logging.getLogger(__name__)

PENDING = "runctl:slack:pending"  # zset: run id -> not before (unix time)
BLOCKED = "runctl:slack:blocked_until"  # a 429's Retry-After, for every update
BUCKET = "runctl:slack:bucket:chat.update"
POST = "post:"  # pending members that are warning posts, not run ids
POSTS_PER_SECOND = 1.0
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


def _sent_key(member: str) -> str:
    return f"runctl:slack:sent:{member}"


def _shown_key(member: str) -> str:
    return f"runctl:slack:shown:{member}"


def posted(svc: Context, run: Run) -> None:
    """The parent message was just posted: its first update waits the usual interval."""
    interval = svc.settings.RUNCTL_SLACK_UPDATE_SECONDS
    if interval > 0:
        svc.redis.set(_sent_key(run.run_id), repr(time.time()), ex=max(60, int(interval * 10)))


def show(svc: Context, run: Run) -> None:
    """Bring the run's message up to date: now if its interval and the budget allow, else soon."""
    _show(svc, run.run_id, run)


def show_post(svc: Context, channel: str, ts: str, shown: str | None = None) -> None:
    """Bring a warning post up to date if what it shows changed: now if allowed, else soon.
    `shown`: the post's rendering as just posted (its first content)."""
    member = POST + post_id(channel, ts)
    if shown is not None:
        svc.redis.set(_shown_key(member), shown, ex=30 * 86400)
        return
    _show(svc, member)


def _show(svc: Context, member: str, run: Run | None = None) -> None:
    now = time.time()
    not_before = max(_float(svc.redis.get(BLOCKED)), _last(svc, member) + svc.settings.RUNCTL_SLACK_UPDATE_SECONDS)
    if not_before > now:
        defer(svc, member, not_before)
        return
    if member.startswith(POST):
        message = _post_message(svc, member)
        if message is None:
            return  # unchanged (or gone): no call, no token
    wait = float(svc.redis.eval(_TAKE, 1, BUCKET, repr(now), repr(_rate(svc)), BURST))
    if wait > 0:
        defer(svc, member, now + wait)
        return
    if member.startswith(POST):
        _send_post(svc, member, now)
        return
    run = run or svc.runs.get(member)
    if run is not None:
        send(svc, run, now)


def send(svc: Context, run: Run, now: float) -> None:
    if run.message_ts is None:
        return
    text, blocks = run_blocks(run, svc.clock())
    _deliver(svc, run.run_id, run.channel_id, run.message_ts, text, blocks, now)


def _post_message(svc: Context, member: str) -> tuple[str, str, str, list[Block], str] | None:
    """(channel, ts, text, blocks, fingerprint) of a warning post whose content changed; else None."""
    channel, _, ts = member.removeprefix(POST).rpartition(":")
    store = WarningStore(svc.redis)
    post = store.post(channel, ts)
    if post is None:
        return None
    text, blocks = render_post(post, store.records(post))
    mark = fingerprint(text, blocks)
    if _text(svc.redis.get(_shown_key(member))) == mark:
        return None
    return channel, ts, text, blocks, mark


def _send_post(svc: Context, member: str, now: float) -> None:
    message = _post_message(svc, member)  # rendered again: the last state wins
    if message is None:
        return
    channel, ts, text, blocks, mark = message
    if _deliver(svc, member, channel, ts, text, blocks, now):
        svc.redis.set(_shown_key(member), mark, ex=30 * 86400)


def fingerprint(text: str, blocks: list[Block]) -> str:
    body = json.dumps([text, [b.to_dict() for b in blocks]], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _deliver(svc: Context, member: str, channel: str, ts: str, text: str, blocks: list[Block], now: float) -> bool:
    """chat.update without sleeping; True when Slack took it. A 429 blocks every update
    for its Retry-After and puts this one back in line."""
    try:
        svc.notifier.update(channel, ts, text, blocks, wait=False)
    except SlackApiError as exc:
        if exc.response.status_code == 429:
            retry = _float(exc.response.headers.get("Retry-After")) or 1.0
            log.info("chat.update rate-limited for %.0f s; %s waits", retry, member)
            svc.redis.set(BLOCKED, repr(now + retry), ex=int(retry) + 60)
            defer(svc, member, now + retry)
        else:
            log.warning("could not update %s: %s", member, exc.response.get("error"))
        return False
    if svc.settings.RUNCTL_SLACK_UPDATE_SECONDS > 0:
        svc.redis.set(_sent_key(member), repr(now), ex=max(60, int(svc.settings.RUNCTL_SLACK_UPDATE_SECONDS * 10)))
    return True


def defer(svc: Context, member: str, at: float) -> None:
    svc.redis.zadd(PENDING, {member: at}, lt=True)
    ensure_tick(svc, svc.clock().timestamp() + max(0.0, at - time.time()))


def flush(svc: Context) -> float | None:
    """Send the updates that are due (each message's newest state); the seconds until the
    next pending one, or None when nothing waits."""
    now = time.time()
    for raw in svc.redis.zrangebyscore(PENDING, "-inf", now):
        member = _text(raw)
        if not svc.redis.zrem(PENDING, member):
            continue  # another tick took it
        try:
            _show(svc, member)
        except Exception:  # one message's failure is its own: the others still go out
            log.exception("update of %s failed", member)
    upcoming = svc.redis.zrange(PENDING, 0, 0, withscores=True)
    return max(0.0, float(upcoming[0][1]) - time.time()) if upcoming else None


def may_post(svc: Context, channel: str, burst: int) -> bool:
    """Take one of the channel's chat.postMessage tokens (about 1 a second per channel,
    api.slack.com/docs/rate-limits), for posters that can leave the rest for later."""
    key = f"runctl:slack:bucket:chat.postMessage:{channel}"
    return float(svc.redis.eval(_TAKE, 1, key, repr(time.time()), repr(POSTS_PER_SECOND), burst)) == 0


def _rate(svc: Context) -> float:
    return svc.settings.RUNCTL_SLACK_UPDATES_PER_MINUTE / 60.0


def _last(svc: Context, member: str) -> float:
    if svc.settings.RUNCTL_SLACK_UPDATE_SECONDS <= 0:
        return 0.0
    return _float(svc.redis.get(_sent_key(member)))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: object) -> float:
    if value is None:
        return 0.0
    try:
        return float(value.decode() if isinstance(value, bytes) else str(value))
    except ValueError:
        return 0.0
