"""A run's events, verified by the web process (bot/events.py) and merged into the run's
one pending job (workers/state/event_queue.py): show its progress now, or poll it now when
its training exited. The event is a hint: the end itself (exit code, log tail,
checkpoint) is read from the instance, as every poll reads it.

An exit event costs an SSM poll, and anyone root on the instance can read the run's key:
one exit event acts at a time (a hold, SET NX), and a poll-now never follows another
within RUNCTL_POLL_MIN_SECONDS, a gap that doubles with each exit that found the run
still alive, up to RUNCTL_POLL_MAX_SECONDS. An exit within the hold is not dropped: its
job waits for the hold's end, so a run's real end is still told by its event.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from workers.jobs import funnel, monitor
from workers.remote.status import progress_from_file
from workers.services import Services, current
from workers.slack.thread import publish
from workers.state import event_keys, event_queue, polls
from workers.state.event_queue import Pending
from workers.state.runs import Run, RunState

log = logging.getLogger(__name__)
CLAIM_SECONDS = 15.0  # how long an exit event waits for a tick that is polling the run right now
# The exit is on disk already: read it back after 0.1 s (then 0.15, 0.225 s, ...) rather than
# the monitor's 1 s. A couple more GetCommandInvocation calls per run, once.
EXIT_FIRST_POLL = 0.1


@funnel.system("run event")
def event(run_id: str, kind: str | None = None, progress: dict[str, Any] | None = None) -> str:
    """What the run's events said since the last job (or, in a job an older version queued,
    the one event it carries)."""
    svc = current()
    if kind is None:
        pending = event_queue.take(svc.redis, run_id)
    else:
        pending = Pending(exited=kind == "exit", progress=progress if isinstance(progress, dict) else None)
    what = "exit" if pending.exited else "progress"
    run = _followed(svc, run_id)
    if run is None:
        return f"{what}: ignored, the run is not followed"
    event_keys.renew(svc.redis, run_id)
    if pending.exited:
        return f"{what}: {poll_now(svc, run_id)}"  # the poll reads the progress too
    return f"{what}: {show_progress(svc, run, pending.progress)}"


def _followed(svc: Services, run_id: str) -> Run | None:
    run = svc.runs.get(run_id)
    if run is None or run.state.ended or run.state is RunState.STOPPING:
        return None  # ended, or a stop flow owns it
    return run


def show_progress(svc: Services, run: Run, progress: dict[str, Any] | None) -> str:
    try:
        parsed = progress_from_file(json.dumps(progress, allow_nan=False)) if progress is not None else None
    except (ValueError, TypeError, OverflowError, AttributeError) as exc:  # no shape a sender chose crashes the job
        log.info("run %s: progress not shown: %s", run.run_id, exc)
        parsed = None
    if parsed is None:
        return "ignored: no progress"
    run.progress = parsed
    if run.wait:
        publish(svc, run)  # within Slack's update budget; the newest state wins
    else:
        svc.runs.save(run)
    return "progress shown"


def poll_now(svc: Services, run_id: str) -> str:
    """Take the run from the monitor's schedule and poll it: the monitor's own poll, which
    finishes and reports the run (or reschedules it when it is, after all, alive). Within
    the hold of the last exit that polled, the job waits for the hold's end instead."""
    wait, earlier = exit_hold(svc, run_id)
    if wait > 0:
        event_queue.defer_exit(svc.redis, run_id, wait)
        return f"deferred {wait:.1f} s: the run was polled for an exit event just now"
    deadline = time.monotonic() + CLAIM_SECONDS
    while not (claimed := polls.claim(svc, math.inf, only=run_id))[0]:
        # A tick claimed it and is polling it (its result may predate the exit): once that
        # tick puts it back on the schedule, take it.
        if _followed(svc, run_id) is None:
            return "ignored: the run ended meanwhile"
        if time.monotonic() >= deadline:
            return "ignored: not on the monitor's schedule"
        time.sleep(0.2)
    lease = claimed[1]  # leased like a tick's claim: if this job dies, the next tick polls it
    try:
        run = _followed(svc, run_id)
        if run is None:
            return "ignored: the run ended meanwhile"
        try:
            # After an exit event that found the run alive, the next reads at the monitor's pace.
            monitor.poll(svc, [run], first_poll=EXIT_FIRST_POLL if not earlier else monitor.POLL_FIRST_WAIT)
        except Exception:
            if svc.redis.zscore(polls.DUE, run_id) is None:  # claimed but not rescheduled
                polls.schedule(svc, run_id, monitor.next_delay(svc, run.polls + 1))
            raise
    finally:
        polls.release(svc, [run_id], lease)
    return "polled"


def _hold_key(run_id: str) -> str:
    return f"runctl:events:exit:{run_id}"


def exit_hold(svc: Services, run_id: str) -> tuple[float, int]:
    """0 when this exit event may poll now (it took the hold), else the seconds until it may;
    and how many exit events of the run polled before."""
    polls_key = f"runctl:events:exit_polls:{run_id}"
    polls = int(svc.redis.get(polls_key) or 0)
    low, high = svc.settings.RUNCTL_POLL_MIN_SECONDS, svc.settings.RUNCTL_POLL_MAX_SECONDS
    hold = min(high, low * 2 ** min(polls, 30))
    if svc.redis.set(_hold_key(run_id), "1", nx=True, px=max(1, int(hold * 1000))):
        pipe = svc.redis.pipeline(transaction=False)
        pipe.incr(polls_key)
        pipe.expire(polls_key, 86400)
        pipe.execute()
        return 0.0, polls
    left = svc.redis.pttl(_hold_key(run_id))
    return (max(0.05, left / 1000) if left > 0 else 0.05), polls
