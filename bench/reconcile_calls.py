"""Benchmark 9: the reconcile's AWS calls per hour, for 1, 10 and 100 managed instances.

One simulated hour against the sandbox (moto + the shim, which really runs each
reconcile script): the real `reconcile()` every RUNCTL_RECONCILE_SECONDS with an
injected clock. Each instance holds one live run Redis knows (as when nothing was
lost: the common case, and the one that costs every pass). Every EC2/SSM call is
counted by a botocore `before-call` hook. The fleet is described at most every 10
minutes; each pass sends one SSM command per 50 instances and reads the results.

The monitor's own figure for comparison is benchmark 5 (`bench/aws_calls.py`):
54 calls per hour for 1 to 50 live runs.

    python bench/reconcile_calls.py [--instances 1,10,100] [--minutes 60] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/reconcile_calls.py`

import logging
import time
from datetime import UTC, datetime, timedelta

import boto3

from bench import harness
from bench.aws_calls import CallCounter, SimClock, instances, live_run
from runctl_sandbox.aws import Sandbox
from workers import services
from workers.aws.fleet import Fleet
from workers.jobs.reconcile import reconcile

MONITOR_PER_HOUR = 54  # bench/README.md, benchmark 5: 1, 10 and 50 live runs


logging.getLogger("workers.jobs.reconcile").setLevel(logging.ERROR)  # the bench's runs are not monitored


def only(box: Sandbox, keep: list[str]) -> None:
    ec2 = boto3.client("ec2", endpoint_url=box.endpoint_url, region_name=box.region)
    others = [
        i["InstanceId"]
        for page in ec2.get_paginator("describe_instances").paginate()
        for r in page["Reservations"]
        for i in r["Instances"]
        if i["InstanceId"] not in keep and i["State"]["Name"] != "terminated"
    ]
    if others:
        ec2.terminate_instances(InstanceIds=others)


def scenario(box: Sandbox, count: int, minutes: float) -> dict[str, harness.Figure]:
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
        ids = instances(box, count)
        only(box, ids)  # the fleet is exactly these: earlier scenarios' and the seed's others go
        for n, iid in enumerate(ids):
            live_run(svc, box, iid, n, clock.now)
        counter = CallCounter()
        counter.watch(svc.fleet)
        services.install(svc)
        every = timedelta(seconds=svc.settings.RUNCTL_RECONCILE_SECONDS)
        passes = 0
        try:
            end = clock.now + timedelta(minutes=minutes)
            moment = clock.now
            while moment < end:
                clock.now = max(clock.now, moment)
                reconcile()
                passes += 1
                moment += every
        finally:
            services.install(None)
            redis.flushdb()
            only(box, [])
    hours = minutes / 60
    figures: dict[str, harness.Figure] = {
        f"instances={count} calls_per_hour": round(counter.total / hours, 1),
        f"instances={count} calls_per_instance_hour": round(counter.total / hours / count, 2),
        f"instances={count} passes": passes,
    }
    for name, calls in sorted(counter.calls.items()):
        figures[f"instances={count} {name}"] = calls
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "1 and 3 instances over 6 simulated minutes")
    parser.add_argument("--instances", default="1,10,100", help="comma-separated numbers of managed instances")
    parser.add_argument("--minutes", type=float, default=60)
    args = parser.parse_args(argv)
    counts = [1, 3] if args.smoke else [int(c) for c in args.instances.split(",")]
    minutes = 6 if args.smoke else args.minutes
    figures: dict[str, harness.Figure] = {"simulated_minutes": minutes}
    with harness.sandbox() as box:
        for count in counts:
            figures.update(scenario(box, count, minutes))
    targets = {f"instances={c} calls_per_hour": f"≤ the monitor's {MONITOR_PER_HOUR}" for c in counts if c <= 50}
    harness.report("reconcile_calls", figures, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
