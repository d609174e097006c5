"""The monitor's poll schedule in Redis: when each live run is next due, which tick holds it
(a lease that lapses if the tick dies), and when the next tick job runs. The tick itself,
which polls the instances, is workers/jobs/monitor.py."""

from __future__ import annotations

import math
from datetime import timedelta

from workers.context import Context
from workers.queueing import SYSTEM, JobPath, NoArgs, enqueue

DUE = "runctl:monitor:due"  # zset: run id -> when it should next be polled
LEASED = "runctl:monitor:leased"  # zset: run id -> when the claim of the tick polling it lapses
TICK_AT = "runctl:monitor:tick_at"  # when the next tick job is scheduled

# Set TICK_AT to ARGV[1] unless an earlier tick, still in the future, is already scheduled.
_SET_IF_EARLIER = """
local cur = tonumber(redis.call('GET', KEYS[1]))
if cur == nil or cur > tonumber(ARGV[1]) or cur < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', 86400)
  return 1
end
return 0
"""


# A claim: runs whose lease lapsed (their tick died) are due again; then the due runs
# move from DUE to LEASED until ARGV[3], atomically, so each is claimed by one tick.
_CLAIM = """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], 'NX', ARGV[1], id)
end
local due = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])) do
  if ARGV[4] == '' or id == ARGV[4] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    table.insert(due, id)
  end
end
return due
"""
# Drop this tick's leases (those still at ARGV[1]: a lapsed one may be another tick's now).
_RELEASE = """
for i, id in ipairs(ARGV) do
  if i > 1 and tonumber(redis.call('ZSCORE', KEYS[1], id)) == tonumber(ARGV[1]) then redis.call('ZREM', KEYS[1], id) end
end
return 0
"""


def schedule(svc: Context, run_id: str, delay: timedelta) -> None:
    """Poll run_id after delay. All due runs are polled together by one tick job."""
    at = svc.clock() + delay
    svc.redis.zadd(DUE, {run_id: at.timestamp()})
    ensure_tick(svc, at.timestamp())


def claim(svc: Context, horizon: float, only: str = "") -> tuple[list[str], str]:
    """The runs due by `horizon` (or just `only`, if due), leased to the caller; and the lease."""
    now = svc.clock().timestamp()
    lease = repr(float(int((now + svc.settings.RUNCTL_MONITOR_LEASE_SECONDS) * 1000) / 1000))
    until = repr(horizon) if math.isfinite(horizon) else "+inf"
    ids = svc.redis.eval(_CLAIM, 2, DUE, LEASED, repr(now), until, lease, only)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids], lease


def renew(svc: Context, run_ids: list[str], lease: str) -> str:
    """Extend this tick's leases on `run_ids` (before each batch: a tick may poll many)."""
    fresh = repr(float(int((svc.clock().timestamp() + svc.settings.RUNCTL_MONITOR_LEASE_SECONDS) * 1000) / 1000))
    if run_ids:
        svc.redis.zadd(LEASED, dict.fromkeys(run_ids, float(fresh)), xx=True)
    return fresh


def release(svc: Context, run_ids: list[str], lease: str) -> None:
    if run_ids:
        svc.redis.eval(_RELEASE, 1, LEASED, lease, *run_ids)


def followed(svc: Context, run_id: str) -> bool:
    """On the monitor's schedule, or being polled by a live tick."""
    pipe = svc.redis.pipeline(transaction=False)
    pipe.zscore(DUE, run_id)
    pipe.zscore(LEASED, run_id)
    return any(score is not None for score in pipe.execute())


# RQ's scheduler moves a delayed job to its queue on whole seconds: a tick may start up to
# this much before the time recorded for it, and is still that tick.
TICK_SLACK = 2.0
# Forget TICK_AT when it is this tick's (due by ARGV[1]); a later recorded tick stays.
_TICK_STARTED = """
local cur = tonumber(redis.call('GET', KEYS[1]))
if cur == nil or cur <= tonumber(ARGV[1]) then redis.call('DEL', KEYS[1]) end
"""


def tick_started(svc: Context, now: float) -> None:
    """A scheduled tick begins: the recorded next tick is gone only if it was this one (or
    overdue). An extra, earlier tick (an update waiting for Slack's budget asked for one)
    leaves the later one recorded, so its own next tick is queued only when earlier: ticks
    never multiply into parallel chains (at 500 runs they did, thousands a minute; issue 28)."""
    svc.redis.eval(_TICK_STARTED, 1, TICK_AT, repr(now + TICK_SLACK))


def ensure_tick(svc: Context, at: float) -> None:
    now = svc.clock().timestamp()
    # A recorded tick overdue by more than one poll interval belongs to a dead worker (or
    # its job was lost with Redis' keys): replace it.
    stale = now - svc.settings.RUNCTL_POLL_MAX_SECONDS
    if svc.redis.eval(_SET_IF_EARLIER, 1, TICK_AT, repr(at), repr(stale)):
        enqueue(svc.queue, JobPath.MONITOR_TICK, NoArgs(), SYSTEM, delay=timedelta(seconds=max(0.0, at - now)))
