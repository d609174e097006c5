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

The workspace's update scheduler (issue 28: 500 live runs ask for 2,000 updates a minute,
the budget carries 40). What waits is sent in priority order, not first come:
- band 0, ends and answers: a run whose state ended (its final parent). Only these may take
  the bucket's last RESERVE tokens, so an end never waits behind progress;
- band 1, watched: a run someone looked at within WATCH_SECONDS (`watch`: status asked, or
  [Full log] clicked), whose message is WATCHED_EVERY old, and the sweep's warning posts;
- band 2, everything else, round-robin: the message updated longest ago goes first.
A new progress state for a run that is already waiting replaces it (the message is rendered
when sent): that is the stale progress the budget drops, counted in STATS. An end is never
dropped: it stays pending until Slack takes it. While others wait, a progress update joins
the line instead of taking a token ahead of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import Block

from workers.context import Context
from workers.slack.messages import Message
from workers.slack.messages.run import run_blocks
from workers.slack.messages.warning import render_post
from workers.state.polls import ensure_tick
from workers.state.run_queue import QueueStore
from workers.state.runs import Run
from workers.state.warnings import WarningStore, post_id

log = logging.getLogger(__name__)

PENDING = "runctl:slack:pending"  # zset: run id -> not before (unix time)
BLOCKED = "runctl:slack:blocked_until"  # a 429's Retry-After, for every update
BUCKET = "runctl:slack:bucket:chat.update"
POST = "post:"  # pending members that are warning posts, not run ids
POSTS_PER_SECOND = 1.0
BURST = 6  # updates that may go at once; with 40 a minute, at most 46 in any minute
RESERVE = 2  # tokens of the burst only ends and answers may take
WATCH_SECONDS = 300  # a run someone looked at is updated before the others this long
WATCHED = "runctl:slack:watched:"  # + run id: someone looked at it lately
WATCHED_EVERY = 60.0  # a watched message goes first once this old: watched runs never take the whole budget
SENT_TTL = 3600  # when each message was last updated, kept for the round-robin's order
STATS = "runctl:slack:stats"  # hash: sent:<band>, superseded (stale progress replaced while waiting)
END, WATCH, REST = 0, 1, 2  # the scheduler's bands, first served first

# KEYS: bucket. ARGV: now, rate per second, burst, reserve. Returns "0" when a token was
# taken (leaving at least `reserve` behind), else the seconds until one is there.
_TAKE = """
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local need = 1 + (tonumber(ARGV[4]) or 0)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if tokens < need then
  redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
  return tostring((need - tokens) / rate)
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
        svc.redis.set(_sent_key(run.run_id), repr(time.time()), ex=SENT_TTL)


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


def watch(svc: Context, run_id: str) -> None:
    """Someone is looking at the run (asked its status, clicked one of its buttons): its
    message goes before the unwatched ones for WATCH_SECONDS."""
    svc.redis.set(WATCHED + run_id, "1", ex=WATCH_SECONDS)


def band(svc: Context, member: str, run: Run | None = None) -> int:
    """The member's place in line: END for an ended run, WATCH for a watched run or a
    warning post, REST otherwise."""
    if member.startswith(POST):
        return WATCH
    run = run or svc.runs.get(member)
    if run is not None and run.state.ended:
        return END
    if svc.redis.exists(WATCHED + member) and time.time() - _float(svc.redis.get(_sent_key(member))) >= WATCHED_EVERY:
        return WATCH
    return REST


def _show(svc: Context, member: str, run: Run | None = None, place: int | None = None, queued: bool = False) -> float:
    """Send now if allowed, else defer; the seconds until a token is there (0: sent, or
    nothing to wait for). `queued`: flush's call, in priority order; from anywhere else a
    progress update joins the line when others wait for the budget."""
    now = time.time()
    place = band(svc, member, run) if place is None else place
    not_before = max(_float(svc.redis.get(BLOCKED)), _last(svc, member) + svc.settings.RUNCTL_SLACK_UPDATE_SECONDS)
    if place == END:
        not_before = _float(svc.redis.get(BLOCKED))  # an end is not held back by the message's interval
    if not_before > now:
        defer(svc, member, not_before, place)
        return 0.0
    if not queued and place != END and svc.redis.zcount(PENDING, "-inf", repr(now)):
        # Others are due and waiting for the budget (a tick is queued for them): join the
        # line, round-robin rather than first come, and queue no tick of its own.
        _join(svc, member, now)
        return 0.0
    if member.startswith(POST):
        message = _post_message(svc, member)
        if message is None:
            return 0.0  # unchanged (or gone): no call, no token
    reserve = 0 if place == END else RESERVE
    wait = float(svc.redis.eval(_TAKE, 1, BUCKET, repr(now), repr(_rate(svc)), BURST, reserve))
    if wait > 0:
        defer(svc, member, now + wait, place)
        return wait
    pipe = svc.redis.pipeline(transaction=False)
    pipe.hincrby(STATS, f"sent:{place}", 1)
    if not queued:
        pipe.zrem(PENDING, member)  # it waited (an end jumping the line): sent now, not again
    pipe.execute()
    if member.startswith(POST):
        _send_post(svc, member, now)
        return 0.0
    run = run or svc.runs.get(member)
    if run is not None:
        send(svc, run, now)
    return 0.0


def render(svc: Context, run: Run) -> Message:
    """The run's parent message as it stands, with the runs queued after it while it is live."""
    queued = 0 if run.state.ended else QueueStore(svc.redis).length(run.instance_id)
    return run_blocks(run, svc.clock(), queued)


def send(svc: Context, run: Run, now: float) -> None:
    if run.message_ts is None:
        return
    text, blocks = render(svc, run)
    _deliver(svc, run.run_id, run.channel_id, run.message_ts, text, blocks, now, END if run.state.ended else REST)


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


def _deliver(
    svc: Context, member: str, channel: str, ts: str, text: str, blocks: list[Block], now: float, place: int = REST
) -> bool:
    """chat.update without sleeping; True when Slack took it. A 429 blocks every update
    for its Retry-After and puts this one back in line."""
    try:
        svc.notifier.update(channel, ts, text, blocks, wait=False)
    except SlackApiError as exc:
        if exc.response.status_code == 429:
            retry = _float(exc.response.headers.get("Retry-After")) or 1.0
            log.info("chat.update rate-limited for %.0f s; %s waits", retry, member)
            svc.redis.set(BLOCKED, repr(now + retry), ex=int(retry) + 60)
            defer(svc, member, now + retry, place)
        else:
            log.warning("could not update %s: %s", member, exc.response.get("error"))
        return False
    if svc.settings.RUNCTL_SLACK_UPDATE_SECONDS > 0:
        svc.redis.set(_sent_key(member), repr(now), ex=SENT_TTL)
    return True


def defer(svc: Context, member: str, at: float, place: int = REST) -> None:
    pipe = svc.redis.pipeline(transaction=False)
    pipe.zadd(PENDING, {member: at}, lt=True)
    pipe.zadd(PENDING, {member: at}, nx=True)
    added = pipe.execute()
    if not member.startswith(POST) and not (added[0] or added[1]):
        svc.redis.hincrby(STATS, "superseded", 1)  # it was waiting: its older state is never sent
    ensure_tick(svc, svc.clock().timestamp() + max(0.0, at - time.time()), exact=place == END)


def _join(svc: Context, member: str, at: float) -> None:
    """Wait in line (no earlier than a place it already has), counting a replaced state."""
    if not svc.redis.zadd(PENDING, {member: at}, nx=True):
        svc.redis.hincrby(STATS, "superseded", 1)
    ensure_tick(svc, svc.clock().timestamp())  # one EVAL when a tick is already queued for the line


def flush(svc: Context) -> float | None:
    """Send the updates that are due, in the scheduler's order (ends, watched, then the
    message updated longest ago), each message's newest state; once the budget says wait,
    the progress still in line waits for the next token in one write, while ends may still
    take the reserve. The seconds until the next pending one, or None when nothing waits."""
    now = time.time()
    line = _in_order(svc, [_text(raw) for raw in svc.redis.zrangebyscore(PENDING, "-inf", now)])
    for i, (place, member, run) in enumerate(line):
        if not svc.redis.zrem(PENDING, member):
            continue  # another tick took it
        try:
            wait = _show(svc, member, run, place, queued=True)
        except Exception:  # one message's failure is its own: the others still go out
            log.exception("update of %s failed", member)
            continue
        if wait > 0 and place != END:
            # The budget is spent: the rest of the line waits for the next token, keeping its
            # order (ends, already first, were tried before any of it).
            rest = [m for _, m, _ in line[i + 1 :]]
            if rest:
                svc.redis.zadd(PENDING, dict.fromkeys(rest, now + wait), xx=True, gt=True)
            break
    upcoming = svc.redis.zrange(PENDING, 0, 0, withscores=True)
    return max(0.0, float(upcoming[0][1]) - time.time()) if upcoming else None


def _in_order(svc: Context, members: list[str]) -> list[tuple[int, str, Run | None]]:
    """(band, member, run) in the order the scheduler serves them; three round trips for any number."""
    if not members:
        return []
    run_ids = [m for m in members if not m.startswith(POST)]
    runs = svc.runs.get_many(run_ids)
    pipe = svc.redis.pipeline(transaction=False)
    pipe.mget([WATCHED + m for m in members])
    pipe.mget([_sent_key(m) for m in members])
    watched, sent = pipe.execute()
    order: list[tuple[int, float, str, Run | None]] = []
    now = time.time()
    for member, seen, last in zip(members, watched, sent, strict=True):
        run = runs.get(member)
        if member.startswith(POST) or (
            seen is not None and not (run and run.state.ended) and now - _float(last) >= WATCHED_EVERY
        ):
            place = WATCH
        elif run is not None and run.state.ended:
            place = END
        else:
            place = REST
        order.append((place, _float(last), member, run))
    order.sort(key=lambda item: (item[0], item[1]))
    return [(place, member, run) for place, _, member, run in order]


def may_post(svc: Context, channel: str, burst: int) -> bool:
    """Take one of the channel's chat.postMessage tokens (about 1 a second per channel,
    api.slack.com/docs/rate-limits), for posters that can leave the rest for later."""
    key = f"runctl:slack:bucket:chat.postMessage:{channel}"
    return float(svc.redis.eval(_TAKE, 1, key, repr(time.time()), repr(POSTS_PER_SECOND), burst, 0)) == 0


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
