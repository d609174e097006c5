"""A run's event, verified by the web process (bot/events.py): show its progress now,
or poll it now when its training exited. The event is a hint: the end itself (exit code,
log tail, checkpoint) is read from the instance, as every poll reads it."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from workers.jobs import funnel, monitor
from workers.remote.status import progress_from_file
from workers.services import Services, current
from workers.slack.thread import publish
from workers.state.runs import Run, RunState

CLAIM_SECONDS = 15.0  # how long an exit event waits for a tick that is polling the run right now
# The exit is on disk already: read it back after 0.1 s (then 0.15, 0.225 s, ...) rather than
# the monitor's 1 s. A couple more GetCommandInvocation calls per run, once.
EXIT_FIRST_POLL = 0.1


@funnel.system("run event")
def event(run_id: str, kind: str, progress: dict[str, Any] | None = None) -> str:
    svc = current()
    run = _followed(svc, run_id)
    if run is None:
        return "ignored: the run is not followed"
    if kind == "progress":
        return show_progress(svc, run, progress)
    if kind == "exit":
        return poll_now(svc, run_id)
    return f"ignored: kind {kind!r}"


def _followed(svc: Services, run_id: str) -> Run | None:
    run = svc.runs.get(run_id)
    if run is None or run.state.ended or run.state is RunState.STOPPING:
        return None  # ended, or a stop flow owns it
    return run


def show_progress(svc: Services, run: Run, progress: dict[str, Any] | None) -> str:
    parsed = progress_from_file(json.dumps(progress)) if progress is not None else None
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
    finishes and reports the run (or reschedules it when it is, after all, alive)."""
    deadline = time.monotonic() + CLAIM_SECONDS
    while not (claimed := monitor.claim(svc, math.inf, only=run_id))[0]:
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
            monitor.poll(svc, [run], first_poll=EXIT_FIRST_POLL)
        except Exception:
            if svc.redis.zscore(monitor.DUE, run_id) is None:  # claimed but not rescheduled
                monitor.schedule(svc, run_id, monitor.next_delay(svc, run.polls + 1))
            raise
    finally:
        monitor.release(svc, [run_id], lease)
    return "polled"
