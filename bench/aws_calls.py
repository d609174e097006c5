"""Benchmark 5: AWS calls per monitored run-hour, for 1, 10 and 50 concurrent runs.

One simulated hour against the sandbox (moto + the shim, which really runs each
status script): the real `monitor.tick()` whenever a run is due and the real
sweep every RUNCTL_SWEEP_MINUTES, with an injected clock. Every EC2/SSM/S3 call
is counted by a botocore `before-call` hook.

The monitor's own short waits for a command's result (0.5 s, then 1 s, ...) are
real sleeps that also advance the simulated clock: a no-op there would spin on
ListCommandInvocations as fast as the shim answers and count the shim, not us.

    python bench/aws_calls.py [--runs 1,10,50] [--minutes 60] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/aws_calls.py`

import os
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3

from bench import harness
from runctl_sandbox.aws import Sandbox, seed
from workers import services
from workers.aws.fleet import Fleet
from workers.jobs import monitor
from workers.jobs.sweep import sweep
from workers.services import Services
from workers.state import polls
from workers.state.runs import Run, RunState


class SimClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class CallCounter:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, model: Any, **_: Any) -> None:
        self.calls[f"{model.service_model.service_name}:{model.name}"] += 1

    def watch(self, fleet: Fleet) -> None:
        for client in (fleet.ec2, fleet.ssm, fleet.s3):
            client.meta.events.register("before-call.*.*", self)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def instances(box: Sandbox, count: int) -> list[str]:
    """`count` managed, running instances in the sandbox."""
    ids = list(seed(box.endpoint_url, box.region, harness.BUCKET).instances.values())[:3]
    ec2 = boto3.client("ec2", endpoint_url=box.endpoint_url, region_name=box.region)
    while len(ids) < count:
        made = ec2.run_instances(
            ImageId="ami-12c6146b",
            InstanceType="g5.xlarge",
            MinCount=1,
            MaxCount=min(50, count - len(ids)),
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "runctl:managed", "Value": "true"}]}],
        )
        ids += [i["InstanceId"] for i in made["Instances"]]
    return ids[:count]


def live_run(svc: Services, box: Sandbox, iid: str, n: int, now: datetime) -> Run:
    """A run the status script sees as alive: its pid file names this (live) process."""
    run_id = f"r-bench-{n:03d}"
    run_dir = box.instance_dir(iid) / "runs" / run_id
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "pid").write_text(f"{os.getpid()}\n")
    (run_dir / "training.log").write_text("epoch 1/10 loss=0.5\n")
    run = Run(
        run_id=run_id,
        instance_id=iid,
        user_id="U0ALICE",
        channel_id="C0TRAIN",
        script="train.py",
        state=RunState.RUNNING,
        created_at=now,
        started_at=now,
        lock_token=f"token-{run_id}",
    )
    svc.runs.create(run)
    svc.runs.save(run)
    return run


def simulate(svc: Services, clock: SimClock, counter: CallCounter, runs: list[Run], minutes: float) -> None:
    start = clock.now
    end = start + timedelta(minutes=minutes)
    sweep_every = timedelta(minutes=svc.settings.RUNCTL_SWEEP_MINUTES)
    next_sweep = start
    for run in runs:
        polls.schedule(svc, run.run_id, timedelta(seconds=svc.settings.RUNCTL_POLL_MIN_SECONDS))
    while clock.now < end:
        due = svc.redis.zrange(polls.DUE, 0, 0, withscores=True)
        next_poll = start + timedelta(seconds=float(due[0][1]) - start.timestamp()) if due else end
        moment = min(next_poll, next_sweep, end)
        if moment >= end:
            break
        clock.now = max(clock.now, moment)
        if moment == next_sweep:
            sweep()
            next_sweep += sweep_every
        else:
            monitor.tick()
    still_live = [r for r in (svc.runs.get(run.run_id) for run in runs) if r and r.state is RunState.RUNNING]
    if len(still_live) != len(runs):
        raise SystemExit(f"only {len(still_live)} of {len(runs)} runs stayed live; see the run records")


def scenario(box: Sandbox, concurrent: int, minutes: float) -> dict[str, harness.Figure]:
    redis = harness.bench_redis()
    clock = SimClock(datetime.now(UTC))

    def sleep(seconds: float) -> None:
        clock.advance(seconds)
        time.sleep(seconds)

    with harness.fake_slack() as slack:
        svc = harness.services(harness.settings(slack), redis, slack)
        svc.clock = clock
        svc.sleep = sleep
        svc._fleet = Fleet(("runctl:managed", "true"), harness.BUCKET, sleep=sleep)
        ids = instances(box, concurrent)
        runs = [live_run(svc, box, iid, n, clock.now) for n, iid in enumerate(ids)]
        counter = CallCounter()
        counter.watch(svc.fleet)
        services.install(svc)
        try:
            simulate(svc, clock, counter, runs, minutes)
        finally:
            services.install(None)
            redis.flushdb()
    hours = minutes / 60
    per_run_hour = counter.total / hours / concurrent
    figures: dict[str, harness.Figure] = {
        f"runs={concurrent} calls_per_run_hour": round(per_run_hour, 1),
        f"runs={concurrent} calls_per_hour": round(counter.total / hours, 1),
    }
    for name, count in sorted(counter.calls.items()):
        figures[f"runs={concurrent} {name}"] = count
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "1 and 3 runs over 3 simulated minutes")
    parser.add_argument("--runs", default="1,10,50", help="comma-separated numbers of concurrent runs")
    parser.add_argument("--minutes", type=float, default=60)
    args = parser.parse_args(argv)
    counts = [1, 3] if args.smoke else [int(c) for c in args.runs.split(",")]
    minutes = 3 if args.smoke else args.minutes
    figures: dict[str, harness.Figure] = {"simulated_minutes": minutes}
    with harness.sandbox() as box:
        for concurrent in counts:
            figures.update(scenario(box, concurrent, minutes))
    harness.report("aws_calls", figures, {"runs=1 calls_per_run_hour": "≤ 60"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
