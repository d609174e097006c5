"""Each run's pending event: at most one event job per run waits in the queue at a time.

The web process (bot/events.py) records what a verified event of a live run says in the
run's pending hash (its newest progress; that its training exited) and queues a job only
when none is pending (the marker, SET NX). The job (workers/jobs/events.py) takes the
marker and the hash in one transaction, so an event that arrives while it runs queues the
next job; none is lost and none is queued twice. The same script checks the event's nonce
(a replay) and its budgets, so a refused event counts in no window.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

from redis import Redis
from rq import Queue

from workers.queueing import EVENTS_QUEUE, SYSTEM, JobPath, RunArgs, enqueue
from workers.remote.events import loads

SEEN_SECONDS = 3600  # a nonce is kept an hour, longer than a timestamp stays fresh
WINDOW_SECONDS = 60
MARKER_SECONDS = 300  # a job lost with its worker: the run's events queue a new one after this


class Offer(Enum):
    REPLAY = "replay"
    MERGED = "merged"  # into the job already pending
    QUEUED = "queued"  # the caller queues the job: `queue_job`


@dataclass(frozen=True)
class Window:
    """A sliding one-minute budget: `name` is what a refusal says is over it."""

    key: str
    limit: int
    name: str


@dataclass(frozen=True)
class Pending:
    exited: bool = False
    progress: dict[str, Any] | None = None


# KEYS: seen, pending, marker, windows... ARGV: seen ttl, now, window, member, exited (0/1),
# progress ('' for none), marker ttl, count ('always', or 'new': only when no job is pending), limits...
# Returns {0}: a replay; {-1, i}: over window i (nothing counted); {1}: merged; {2}: queue a job.
_OFFER = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {0} end
local now, window = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[8] == 'always' or redis.call('EXISTS', KEYS[3]) == 0 then
  for i = 4, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, now - window)
    if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[i + 5]) then return {-1, i - 3} end
  end
  for i = 4, #KEYS do
    redis.call('ZADD', KEYS[i], now, ARGV[4])
    redis.call('EXPIRE', KEYS[i], 2 * window)
  end
end
if ARGV[5] == '1' then redis.call('HSET', KEYS[2], 'exit', '1') end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'progress', ARGV[6]) end
redis.call('EXPIRE', KEYS[2], math.max(tonumber(ARGV[7]), redis.call('TTL', KEYS[3])))
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[7]) then return {2} end
return {1}
"""


def _pending(run_id: str) -> str:
    return f"runctl:events:pending:{run_id}"


def _marker(run_id: str) -> str:
    return f"runctl:events:queued:{run_id}"


def offer(
    redis: Redis,
    run_id: str,
    nonce: str,
    exited: bool,
    progress: dict[str, Any] | None,
    windows: list[Window],
    now: float,
    always_counted: bool = True,
) -> Offer | Window:
    """Record a verified event; the Window it is over (counted nowhere), or what to do next."""
    args = [
        SEEN_SECONDS,
        repr(now),
        WINDOW_SECONDS,
        nonce,
        int(exited),
        json.dumps(progress) if progress is not None else "",
        MARKER_SECONDS,
        "always" if always_counted else "new",
        *(w.limit for w in windows),
    ]
    keys = [f"runctl:seen:event:{run_id}:{nonce}", _pending(run_id), _marker(run_id), *(w.key for w in windows)]
    reply = redis.eval(_OFFER, len(keys), *keys, *args)
    if reply[0] == 0:
        return Offer.REPLAY
    if reply[0] == -1:
        return windows[int(reply[1]) - 1]
    return Offer.QUEUED if reply[0] == 2 else Offer.MERGED


def queue_job(redis: Redis, run_id: str, delay: float = 0.0) -> None:
    """The run's event job, now or after `delay` s; the caller holds the marker."""
    queue = Queue(EVENTS_QUEUE, connection=redis)
    try:
        enqueue(
            queue,
            JobPath.RUN_EVENT,
            RunArgs(run_id=run_id),
            SYSTEM,
            delay=timedelta(seconds=delay) if delay > 0 else None,
            job_id=f"runctl-event-{uuid.uuid4().hex}",
        )
    except Exception:
        redis.delete(_marker(run_id))  # the next event queues one
        raise


def take(redis: Redis, run_id: str) -> Pending:
    """What the run's events said since the last job took them (and the marker with them)."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(_marker(run_id))
    pipe.hgetall(_pending(run_id))
    pipe.delete(_pending(run_id))
    fields: dict[bytes, bytes] = pipe.execute()[1]
    progress: Any = None
    with contextlib.suppress(ValueError):
        progress = loads(fields.get(b"progress") or b"null")
    return Pending(exited=fields.get(b"exit") == b"1", progress=progress if isinstance(progress, dict) else None)


def defer_exit(redis: Redis, run_id: str, delay: float) -> bool:
    """Act on the run's exit after `delay` s (events meanwhile merge into that job); False
    when a job is pending already (it finds the exit)."""
    ttl = int(delay) + MARKER_SECONDS
    pipe = redis.pipeline(transaction=True)
    pipe.hset(_pending(run_id), "exit", "1")
    pipe.expire(_pending(run_id), ttl)
    pipe.set(_marker(run_id), "1", nx=True, ex=ttl)
    if not pipe.execute()[2]:
        return False
    queue_job(redis, run_id, delay)
    return True
