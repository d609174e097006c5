"""The clock process: `rq cron workers/cron.py` really queues the sweep and the digest."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis as redis_mod
from rq import Queue
from rq.cron import CronScheduler

from workers.queueing import QUEUE

from .conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def clock_process(**env: str) -> Iterator[subprocess.Popen[bytes]]:
    """The Procfile's clock command, against the test Redis."""
    rq = [sys.executable, "-c", "from rq.cli import main; main()"]
    proc = subprocess.Popen(
        [*rq, "cron", "workers/cron.py", "--url", REDIS_URL],
        cwd=ROOT,
        # Only the schedule given here: none of the RUNCTL_* settings of the shell running the tests.
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RUNCTL_")}, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def queued(redis: redis_mod.Redis) -> list[str | None]:
    return [job.func_name for job in Queue(QUEUE, connection=redis).get_jobs()]


def wait_for(
    redis: redis_mod.Redis, names: set[str], proc: subprocess.Popen[bytes], timeout: float = 20
) -> list[str | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = queued(redis)
        if names <= set(found):
            return found
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"the clock process exited early:\n{out}")
        time.sleep(0.1)
    raise AssertionError(f"only {queued(redis)} queued after {timeout} s")


def test_clock_queues_the_sweep_at_once_and_the_digest_on_its_cron(real_redis: redis_mod.Redis) -> None:
    # A six-field cron fires every second, so the digest is due while we watch.
    with clock_process(RUNCTL_DIGEST_CRON="* * * * * *", RUNCTL_SWEEP_MINUTES="7") as proc:
        found = wait_for(real_redis, {"workers.jobs.sweep.sweep", "workers.jobs.digest.digest"}, proc)
        [scheduler] = CronScheduler.all(real_redis)
        jobs = {job.name: job for job in scheduler.get_jobs()}
    assert found.count("workers.jobs.sweep.sweep") == 1  # every 7 minutes: once while we watched
    assert jobs["sweep"].interval == 7 * 60
    assert jobs["digest"].cron == "* * * * * *"


def test_default_schedule_is_every_5_minutes_and_9_utc(real_redis: redis_mod.Redis) -> None:
    with clock_process() as proc:
        found = wait_for(real_redis, {"workers.jobs.sweep.sweep"}, proc)
        [scheduler] = CronScheduler.all(real_redis)
        jobs = {job.name: job for job in scheduler.get_jobs()}
    assert "workers.jobs.digest.digest" not in found
    assert jobs["sweep"].interval == 300
    assert jobs["digest"].cron == "0 9 * * *"
    next_digest = jobs["digest"].next_enqueue_time
    assert next_digest is not None and (next_digest.hour, next_digest.minute) == (9, 0)  # UTC
