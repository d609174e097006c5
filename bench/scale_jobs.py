"""The scale bench's AWS side (benchmark 12): its instances in the sandbox (moto + the
executing-SSM shim), each run's directory on its instance, and the digest, sweep and
reconcile run once each over them, counted.

The window's polls go through `FastFleet` (one local script for every instance: the monitor's
figures are about the scheduler, not SSM round trips); the jobs here go through a plain
`Fleet`, so every DescribeInstances, SendCommand and GetCommandInvocation really reaches
the sandbox, and each instance's script runs in its own directory.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from bench import harness
from bench.aws_calls import CallCounter, instances
from bench.reconcile_calls import only
from runctl_sandbox.aws import MANAGED_TAG, Sandbox
from runctl_sandbox.fake_slack import FakeSlack
from workers.aws.fleet import Fleet
from workers.jobs.digest import digest
from workers.jobs.reconcile import reconcile
from workers.jobs.sweep import sweep
from workers.services import Services
from workers.state import records
from workers.state.runs import Run, RunMeta
from workers.state.uptime import UptimeLedger

HISTORY = timedelta(days=8)  # the instances' uptime before the bench: the digest's 7-day chart has spend


def fleet_of(box: Sandbox, n: int) -> list[str]:
    """`n` managed running instances, and no others, in the sandbox."""
    ids = instances(box, n)
    only(box, ids)
    return ids


def fleet() -> Fleet:
    """A plain Fleet over the sandbox (harness.sandbox() points this process's AWS at it)."""
    return Fleet((MANAGED_TAG, "true"), harness.BUCKET)


def run_dir(box: Sandbox, fast_root: Path, run: Run) -> Path:
    """The run's directory on its instance, linked from the fast fleet's one shared root."""
    path = box.instance_dir(run.instance_id) / "runs" / run.run_id
    path.mkdir(parents=True)
    (fast_root / "runs").mkdir(exist_ok=True)
    (fast_root / "runs" / run.run_id).symlink_to(path)
    return path


def launched(svc: Services, run: Run, path: Path, now: datetime) -> None:
    """What a launch leaves: the signed meta.json (the reconcile reads it) and the instance's
    uptime since HISTORY ago (the sweep and digest cost it)."""
    meta = RunMeta.of(run, run.started_at or now)
    (path / "meta.json").write_text(records.signed_meta(records.record_key(svc.settings), meta))
    UptimeLedger(svc.redis, svc.clock).mark_running(run.instance_id, now - HISTORY)


def measure(svc: Services, slack: FakeSlack, count: int) -> dict[str, harness.Figure]:
    """The digest, sweep and reconcile, once each in this thread over `count` live runs: wall
    time, AWS calls by API, Slack calls by method. The sweep goes first (twice: the first
    finds every warning new): it folds the fleet into the uptime ledger, as it does every few
    minutes in production before a digest. With HISTORY of uptime every instance is over
    RUNCTL_WARN_UPTIME_HOURS and RUNCTL_WARN_COST_USD: two warnings each."""
    before = svc.fleet
    aws = fleet()
    counter = CallCounter()
    counter.watch(aws)
    aws.session.events.register("before-call.pricing.*", counter)  # the price client is made later
    svc._fleet = aws
    figures: dict[str, harness.Figure] = {"jobs_live_runs": count}
    jobs: list[tuple[str, Callable[[], str]]] = [
        ("sweep", sweep),  # the first: every warning is new (posted MAX_POSTS messages a channel at a time)
        ("sweep_again", sweep),  # the steady one: refreshes what it posted, posts the next
        ("digest", digest),
        ("reconcile", reconcile),
    ]
    try:
        for name, job in jobs:
            counter.calls.clear()
            seen = len(slack.calls)
            started = time.perf_counter()
            outcome = job()
            figures[f"{name}_seconds"] = round(time.perf_counter() - started, 2)
            figures[f"{name}_aws_calls"] = _by_name(counter.calls)
            slack_calls = Counter(c.method for c in slack.calls[seen:])
            figures[f"{name}_slack_calls"] = _by_name(slack_calls)
            figures[f"{name}_outcome"] = outcome[:120]
    finally:
        svc._fleet = before
    return figures


def _by_name(calls: Counter[str]) -> str:
    """`ec2:DescribeInstances=1 ssm:SendCommand=10`, or `none`."""
    return " ".join(f"{name}={n}" for name, n in sorted(calls.items())) or "none"
