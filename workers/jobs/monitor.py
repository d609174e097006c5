"""Follow a live run: poll the instance with backoff, update the parent message,
renew the lock, and report the end."""

from __future__ import annotations

import logging
from datetime import timedelta

from workers import scripts
from workers.context import Services, services
from workers.errors import InstanceError, RunctlError, Throttled
from workers.jobs.runmsg import publish, reply
from workers.locks import train_lock
from workers.render import checkpoint_text, duration
from workers.runs import Run, RunState
from workers.snapshot import Snapshot
from workers.snapshot import parse as parse_snapshot

log = logging.getLogger(__name__)
LOG_TAIL_LINES = 15


def schedule(svc: Services, run_id: str, delay: timedelta) -> None:
    svc.queue.enqueue_in(delay, "workers.jobs.monitor.monitor", run_id, job_timeout=300)


def next_delay(svc: Services, polls: int) -> timedelta:
    low = svc.settings.RUNCTL_POLL_MIN_SECONDS
    high = svc.settings.RUNCTL_POLL_MAX_SECONDS
    return timedelta(seconds=min(high, low * (1.6**polls)))


def absorb(run: Run, snap: Snapshot) -> None:
    if snap.progress is not None:
        run.progress = snap.progress
    if snap.checkpoint is not None:
        run.checkpoint = snap.checkpoint
    if snap.log:
        run.log_tail = "\n".join(snap.log)


def monitor(run_id: str) -> str:
    svc = services()
    run = svc.runs.get(run_id)
    if run is None or run.state.ended:
        return "gone"
    try:
        out = svc.fleet.run(run.instance_id, scripts.run_status(svc.settings.RUNCTL_REMOTE_ROOT, run_id))
    except Throttled:
        schedule(svc, run_id, next_delay(svc, run.polls + 2))
        return "throttled"
    except InstanceError as exc:
        return lost(svc, run, exc)
    except RunctlError as exc:
        log.warning("monitor %s: %s", run_id, exc.what)
        run.polls += 1
        svc.runs.save(run)
        schedule(svc, run_id, next_delay(svc, run.polls))
        return "retry"
    snap = parse_snapshot(out.stdout)
    if snap.missing:
        return lost(svc, run, RunctlError(f"The run directory of `{run_id}` is gone from the instance."))
    absorb(run, snap)
    train_lock(svc.redis, run.instance_id).extend(run.lock_token)
    if snap.ended:
        finish(svc, run, snap)
        return run.state.value
    run.polls += 1
    if run.wait:
        publish(svc, run)
    else:
        svc.runs.save(run)
    schedule(svc, run_id, next_delay(svc, run.polls))
    return "running"


def finish(svc: Services, run: Run, snap: Snapshot) -> None:
    """The run ended on its own: record it, release the lock, tell the requester."""
    current = svc.runs.get(run.run_id)
    if current is not None and current.state.ended:
        return  # a stop flow already closed it
    run.exit_code = snap.exit_code if snap.exit_code is not None else -1
    run.ended_at = svc.clock()
    run.ended_by = run.ended_by or "exit"
    run.state = RunState.SUCCEEDED if run.exit_code == 0 else RunState.FAILED
    train_lock(svc.redis, run.instance_id).release(run.lock_token)
    publish(svc, run)
    took = duration((run.ended_at - (run.started_at or run.created_at)).total_seconds())
    ck = (
        "Newest checkpoint: " + checkpoint_text(run.checkpoint, run.ended_at)
        if run.checkpoint
        else "No checkpoint was written."
    )
    if run.exit_code == 0:
        reply(svc, run, f":white_check_mark: run `{run.run_id}` finished (exit 0) in {took}. {ck}")
    else:
        code = "unknown (the process vanished)" if snap.exit_code is None else str(run.exit_code)
        tail = "\n".join(snap.log[-LOG_TAIL_LINES:]) or "(training.log is empty)"
        reply(
            svc,
            run,
            f":x: run `{run.run_id}` failed with exit code {code} after {took}. {ck}\n"
            f"Last lines of training.log:\n```{tail[-2500:]}```",
        )


def lost(svc: Services, run: Run, exc: RunctlError) -> str:
    run.state = RunState.LOST
    run.ended_by = "lost"
    run.ended_at = svc.clock()
    run.error = exc.info()
    train_lock(svc.redis, run.instance_id).release(run.lock_token)
    publish(svc, run)
    reply(svc, run, f":grey_question: lost track of run `{run.run_id}`: {exc.what}")
    return run.state.value
