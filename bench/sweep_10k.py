"""Benchmark 4: the fleet sweep and `/runctl resources` over 10,000 managed instances.

moto cannot hold 10,000 instances quickly, so generated DescribeInstances pages
(1000 instances each) are answered from a botocore `before-call` hook: the real
client, paginator, `Fleet.iter_instances`, `fleetview`, the sweep and the
resources job all run as in production, against real Redis and a fake Slack.

    python bench/sweep_10k.py [--instances N] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/sweep_10k.py`

import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from botocore.awsrequest import AWSResponse, HTTPHeaders
from redis import Redis

from bench import harness
from runctl_sandbox.fake_slack import FakeSlack, block_problems
from workers import services
from workers.aws.fleet import Fleet
from workers.commands import Actor, ResourcesCommand
from workers.jobs.resources import resources
from workers.jobs.sweep import sweep

PAGE = 1000
TYPES = ("g5.xlarge", "p3.2xlarge", "t3.medium", "m5.large", "g4dn.xlarge")


def raw_instance(i: int, now: datetime) -> dict[str, Any]:
    # Launched 30 minutes ago and on-demand: a quiet fleet, so the sweep's time is
    # the scan itself rather than thousands of first-time Slack warnings.
    return {
        "InstanceId": f"i-{i:017x}",
        "InstanceType": TYPES[i % len(TYPES)],
        "State": {"Name": "stopped" if i % 10 == 9 else "running"},
        "LaunchTime": now - timedelta(minutes=30),
        "Placement": {"AvailabilityZone": "us-east-1a"},
        "Tags": [
            {"Key": "Name", "Value": f"box-{i:05d}"},
            {"Key": "runctl:managed", "Value": "true"},
            {"Key": "runctl:user", "Value": f"U0USER{i % 37:02d}"},
        ],
    }


class DescribePages:
    """Answers DescribeInstances from generated pages; counts every EC2 call."""

    def __init__(self, n: int, now: datetime) -> None:
        self.n = n
        self.now = now
        self.calls: dict[str, int] = {}

    def __call__(self, params: dict[str, Any], model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        self.calls[model.name] = self.calls.get(model.name, 0) + 1
        if model.name != "DescribeInstances":
            raise AssertionError(f"unexpected EC2 call {model.name}")
        body = params["body"]
        start = int(body.get("NextToken", 0))
        size = int(body.get("MaxResults", PAGE))
        end = min(self.n, start + size)
        page: dict[str, Any] = {
            "Reservations": [{"Instances": [raw_instance(i, self.now) for i in range(start, end)]}],
            "ResponseMetadata": {"HTTPStatusCode": 200},
        }
        if end < self.n:
            page["NextToken"] = str(end)
        return AWSResponse("https://ec2.bench.invalid", 200, HTTPHeaders(), None), page

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class EmptyPriceList:
    """Answers the Price List API with no products, so on-demand prices come from the
    shipped table, and counts the calls (one per region and type, then cached)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        self.calls += 1
        body = {"PriceList": [], "FormatVersion": "aws_v1", "ResponseMetadata": {"HTTPStatusCode": 200}}
        return AWSResponse("https://pricing.bench.invalid", 200, HTTPHeaders(), None), body


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "1,100 instances instead of 10,000 (two pages)")
    parser.add_argument("--instances", type=int, default=10_000)
    args = parser.parse_args(argv)
    n = 1_100 if args.smoke else args.instances
    now = datetime.now(UTC)
    redis = harness.bench_redis()
    with harness.fake_slack() as slack:
        svc = harness.services(harness.settings(slack), redis, slack)
        session = boto3.Session(aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1")
        prices = EmptyPriceList()
        # before the fleet makes its client; botocore-stubs type handlers as returning None,
        # but a before-call handler's return value is the call's answer
        session.events.register("before-call.pricing.*", prices)  # type: ignore[arg-type]
        fleet = Fleet(("runctl:managed", "true"), harness.BUCKET, session=session)
        pages = DescribePages(n, now)
        fleet.ec2.meta.events.register("before-call.ec2.*", pages)
        svc._fleet = fleet
        svc.clock = lambda: now
        services.install(svc)
        try:
            figures = measure(n, pages, slack, redis)
            figures["pricing_calls"] = prices.calls
        finally:
            services.install(None)
            redis.flushdb()
    harness.report(
        "sweep_10k",
        figures,
        {
            "sweep_seconds": "≤ 5",
            "peak_rss_mb": "≤ 300",
            "ec2_calls": f"= {figures['expected_calls']}",
            "resources_problems": "= 0",
        },
    )
    return 0


def count_round_trips(redis: Redis) -> list[int]:
    """Count what this client sends: one command, or one whole pipeline, is one round trip."""
    counter = [0]
    pool = redis.connection_pool
    checkout: Any = pool.get_connection

    def counted_checkout(*args: Any, **kwargs: Any) -> Any:
        conn = checkout(*args, **kwargs)
        if not getattr(conn, "_bench_counted", False):
            send: Any = conn.send_packed_command

            def counted_send(*a: Any, **k: Any) -> None:
                counter[0] += 1
                send(*a, **k)

            conn.send_packed_command = counted_send
            conn._bench_counted = True
        return conn

    pool.get_connection = counted_checkout  # type: ignore[method-assign]
    return counter


def round_trip_ms(redis: Redis, times: int = 2000) -> float:
    started = time.perf_counter()
    for _ in range(times):
        redis.ping()
    return (time.perf_counter() - started) * 1000 / times


def measure(n: int, pages: DescribePages, slack: FakeSlack, redis: Redis) -> dict[str, harness.Figure]:
    rtt = round_trip_ms(redis)
    trips = count_round_trips(redis)
    started = time.perf_counter()
    outcome = sweep()
    first = time.perf_counter() - started
    calls = pages.total
    round_trips = trips[0]

    started = time.perf_counter()
    sweep()
    second = time.perf_counter() - started

    requester = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
    started = time.perf_counter()
    resources(ResourcesCommand().model_dump(mode="json"), requester.model_dump(mode="json"))
    resources_seconds = time.perf_counter() - started
    # A 429 (the fake enforces Slack's per-channel posting rate) is waited out and retried by
    # the client: counted as a figure, not a problem.
    rejected = [c for c in slack.calls if c.error not in (None, "ratelimited")]
    ratelimited = sum(1 for c in slack.calls if c.error == "ratelimited")
    posted = [m for m in slack.messages("C0TRAIN") if m.thread_ts is None]
    blocks = posted[-1].blocks if posted else []
    problems = block_problems(blocks) if posted else ["nothing was posted"]
    problems += [f"{c.method}: {c.error}" for c in rejected]
    csv_rows = max((f.content.count(b"\n") - 1 for f in slack.files), default=0)
    return {
        "instances": n,
        "sweep_seconds": round(first, 3),
        "sweep_again_seconds": round(second, 3),
        "peak_rss_mb": round(harness.peak_rss_mb(), 1),
        "ec2_calls": calls,
        "expected_calls": math.ceil(n / PAGE),
        "sweep_outcome": outcome,
        "redis_round_trips": round_trips,
        "redis_round_trip_ms": round(rtt, 3),
        "seconds_waiting_on_redis": round(round_trips * rtt / 1000, 2),
        "resources_seconds": round(resources_seconds, 3),
        "resources_blocks": len(blocks),
        "resources_problems": len(problems),
        "slack_429s_waited_out": ratelimited,
        "resources_csv_rows": csv_rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
