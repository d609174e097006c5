"""The monitor's poll schedule in Redis: when each live run is next due, which tick holds it
(a lease that lapses if the tick dies), and when the next tick job runs. The tick itself,
which polls the instances, is workers/jobs/monitor.py."""

from __future__ import annotations

import math
import uuid
from datetime import timedelta

from workers.context import Context
from workers.queueing import SYSTEM, JobPath, NoArgs, enqueue

DUE = "runctl:monitor:due"  # zset: run id -> when it should next be polled
LEASED = "runctl:monitor:leased"  # zset: run id -> when the claim of the tick polling it lapses
TICK_AT = "runctl:monitor:tick_at"  # when the next tick job is scheduled
TICK_JOB = "runctl:monitor:tick_job"  # that job's id: the one tick that is the next

# Record the tick ARGV[1] (job ARGV[3]) unless an earlier one, not overdue, is recorded.
_SET_IF_EARLIER = """
local cur = tonumber(redis.call('GET', KEYS[1]))
if cur == nil or cur > tonumber(ARGV[1]) or cur < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', 86400)
  redis.call('SET', KEYS[2], ARGV[3], 'EX', 86400)
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


# A tick called outside a job (tests, benchmarks) is the recorded one if due by now + this.
TICK_SLACK = 2.0
# A recorded tick this overdue was lost (its worker died before it ran, or queues were
# emptied): the next tick that starts takes its place rather than standing down.
TICK_OVERDUE = 30.0
# Forget the recorded tick when it is this one: its job (ARGV[2]), or outside a job one due by
# ARGV[1]; or when it is overdue (ARGV[3]: its worker died). 1: this tick runs; 0: another is
# the next tick, this one was replaced by an earlier one.
_TICK_STARTED = """
local cur = tonumber(redis.call('GET', KEYS[1]))
if cur == nil then return 1 end
local mine
if ARGV[2] == '' then mine = cur <= tonumber(ARGV[1]) else mine = redis.call('GET', KEYS[2]) == ARGV[2] end
if mine or cur < tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""


def tick_started(svc: Context, now: float, job_id: str = "") -> bool:
    """A scheduled tick begins; False when it is not the next tick. A tick replaced by an
    earlier one (an update waiting for Slack's budget, a run due sooner) stays queued in RQ;
    the earlier one, when it ran, recorded the next tick from everything that waits (the
    poll schedule and the update line, both in Redis), so the replaced one has nothing to
    do and queues nothing: one chain of ticks, never parallel ones (at 100 runs there were
    16,000 ticks in 3 minutes; issue 28)."""
    stale = now - min(TICK_OVERDUE, svc.settings.RUNCTL_POLL_MAX_SECONDS)
    args = (repr(now + TICK_SLACK), job_id, repr(stale))
    return bool(svc.redis.eval(_TICK_STARTED, 2, TICK_AT, TICK_JOB, *args))


def ensure_tick(svc: Context, at: float, exact: bool = False) -> None:
    """One tick at `at`, unless one is recorded no later. The poll schedule and the update
    line share it. `at` is rounded up to the whole second: RQ schedules on whole seconds (it
    drops the fraction), so a tick for T.4 started at T.0, found nothing due yet and queued
    itself again, many times a second (16,000 ticks in 3 minutes at 100 runs; issue 28).
    Rounded up, every wish within one second is one tick, and none starts early. `exact`:
    an end waiting for the budget, which is never held back to the second (it may start
    early and queue itself again, for at most a second)."""
    now = svc.clock().timestamp()
    if not exact:
        at = float(math.ceil(at))
    # A recorded tick overdue by more than one poll interval belongs to a dead worker (or
    # its job was lost with Redis' keys): replace it.
    stale = now - svc.settings.RUNCTL_POLL_MAX_SECONDS
    job_id = uuid.uuid4().hex
    if svc.redis.eval(_SET_IF_EARLIER, 2, TICK_AT, TICK_JOB, repr(at), repr(stale), job_id):
        delay = timedelta(seconds=max(0.0, at - now))
        enqueue(svc.queue, JobPath.MONITOR_TICK, NoArgs(), SYSTEM, delay=delay, job_id=job_id)
