"""The monitor's next tick, shared by the poll schedule and the update line (issue 28): one
chain of tick jobs, on whole seconds, never started before what it was queued for; at 100
runs the chains had multiplied to 16,000 ticks in 3 minutes."""

from __future__ import annotations

import math
import time
from datetime import timedelta

from rq.job import Job
from rq.registry import ScheduledJobRegistry

from workers.queueing import QUEUES, JobPath
from workers.services import Services
from workers.state import polls


def scheduled_ticks(svc: Services) -> list[tuple[Job, float]]:
    """The tick jobs waiting in RQ's scheduled registries, earliest first, with their time."""
    found: list[tuple[Job, float]] = []
    for name in QUEUES:
        registry = ScheduledJobRegistry(name, connection=svc.redis)  # type: ignore[no-untyped-call]
        for job_id in registry.get_job_ids():
            job = Job.fetch(job_id, connection=svc.redis)
            score = svc.redis.zscore(registry.key, job_id)
            if job.func_name == JobPath.MONITOR_TICK.value and score is not None:
                found.append((job, float(score)))
    return sorted(found, key=lambda item: item[1])


def test_the_wishes_of_one_second_share_one_tick_which_never_starts_early(svc: Services) -> None:
    second = math.floor(time.time()) + 10
    for fraction in (0.2, 0.7, 0.5):  # three updates waiting for tokens within one second
        polls.ensure_tick(svc, second + fraction)
    # RQ starts a job once the clock reaches its whole-second score: the tick is at second + 1,
    # after every wish (a score of `second` would start it before them, to find nothing due).
    assert [score for _, score in scheduled_ticks(svc)] == [second + 1]


def test_a_tick_replaced_by_an_earlier_one_does_nothing_and_queues_nothing(svc: Services) -> None:
    polls.schedule(svc, "r-ticks-later", timedelta(seconds=60))  # tick A, in a minute
    polls.schedule(svc, "r-ticks-sooner", timedelta(0))  # tick B, now: the next tick
    (sooner, _), (later, _) = scheduled_ticks(svc)

    assert sooner.perform() == "polled 0"  # the run is gone; the tick ran and queued the next one
    queued = scheduled_ticks(svc)
    assert len(queued) == 3 and max(score for _, score in queued) >= time.time() + 55

    assert later.perform() == "replaced by an earlier tick"
    assert len(scheduled_ticks(svc)) == 3  # nothing more queued: still one chain


def test_a_tick_lost_with_its_worker_is_taken_over_by_the_next_one_that_starts(svc: Services) -> None:
    svc.settings.RUNCTL_POLL_MAX_SECONDS = 300  # the default's order: a lost tick is not waited for that long
    polls.schedule(svc, "r-ticks-orphan", timedelta(seconds=60))
    ((queued, _),) = scheduled_ticks(svc)
    # The recorded next tick is another job, overdue: its worker died before it ran.
    svc.redis.set(polls.TICK_AT, repr(time.time() - polls.TICK_OVERDUE - 5))
    svc.redis.set(polls.TICK_JOB, "a-lost-tick")
    assert queued.perform() == "polled 0"  # it polls (nothing is due) instead of standing down
