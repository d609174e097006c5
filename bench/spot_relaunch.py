"""Benchmark 10: what a month of a team loses to persistent spot requests left open (issue 25, item 2).

A persistent spot request outlives its instance: after a terminate that does not cancel it,
EC2 launches a new instance for it, without runctl's tags, so runctl never lists, autostops or
reports it; it bills until someone finds it in the console or on the bill. Model, deterministic
(seed 25): 10 people; on each workday each person launches a `--spot` instance with probability
0.35 (types and on-demand prices from the shipped price book, spot at ``SPOT_SHARE`` of
on-demand), trains 2 to 10 hours, and terminates it ([Terminate] or `--then terminate`). Before
the fix every terminate leaves the request open and EC2 relaunches after ``RELAUNCH_MINUTES``;
the replacement runs until it is found, ``FOUND_DAYS`` later (at most the month's end), and is
then terminated in the console, request cancelled. After: each terminate cancels the request
first, so nothing is relaunched (tests/test_spot_requests.py checks that on the sandbox).

An interrupted stop-type instance left behind by `--auto-resume` is counted apart: EC2 restarts
it when capacity returns (``RESTART_HOURS`` later) and, before the fix, it then runs idle until
someone notices (same ``FOUND_DAYS``, it is tagged but runctl said nothing); after, its request
is cancelled once the run resumed elsewhere.

Item 3, the root device: before the fix every launch mapped its disk to `/dev/sda1`; on an
AMI whose root is `/dev/xvda` (Amazon Linux, the AL2023 Deep Learning AMIs) EC2 then attaches
that mapping as a second, empty gp3 volume of the requested size, billed while the instance
exists, running or stopped (gp3 at $0.08/GB-month in us-east-1, workers/cost/disk.py, per the
EBS pricing page; a month is 730 hours). Counted on the same sessions, on EC2's relaunches and
restarts (a spot request relaunches with its launch specification, the extra mapping too), and
on ``KEPT`` instances per person launched once and kept all month (stopped at night: EBS still
bills). After: the disk is the AMI's own root (DescribeImages' RootDeviceName), no extra volume.

    python bench/spot_relaunch.py [--days 30] [--people 10] [--found-days 7] [--disk-gb 200] [--smoke]
"""

from __future__ import annotations

import random
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/spot_relaunch.py`

from bench import harness
from workers.cost.disk import GP3_USD_PER_GB_MONTH
from workers.cost.pricing import load_price_book

START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
TYPES = ("g5.xlarge", "g5.2xlarge", "g4dn.xlarge", "p3.2xlarge")
SPOT_SHARE = Decimal("0.35")  # a typical spot price as a share of on-demand (an assumption)
RELAUNCH_MINUTES = 5
RESTART_HOURS = 3
LAUNCH_CHANCE = 0.35
INTERRUPT_CHANCE = 0.05  # per spot session: an interruption that auto-resume continues elsewhere
KEPT = 1  # instances per person launched once with `/runctl launch` and kept all month (an assumption)
MONTH_HOURS = 730  # AWS's GB-month


def extra_volume_usd(disk_gb: int, hours: float) -> Decimal:
    """The empty second volume a `/dev/sda1` mapping adds on an AMI whose root is `/dev/xvda`."""
    return GP3_USD_PER_GB_MONTH["us-east-1"] * disk_gb * Decimal(hours) / MONTH_HOURS


def simulate(
    days: int, people: int, found_days: float, rng: random.Random, disk_gb: int = 200
) -> dict[str, harness.Figure]:
    book = load_price_book()
    end = START + timedelta(days=days)
    terminates = relaunched_hours = interrupted = restarted_hours = session_hours = 0.0
    before_usd = after_usd = leftover_usd = Decimal(0)
    for _person in range(people):
        for day in range(days):
            date = START + timedelta(days=day)
            if date.weekday() >= 5 or rng.random() >= LAUNCH_CHANCE:
                continue
            itype = rng.choice(TYPES)
            price = book.on_demand("us-east-1", itype)
            assert price is not None, itype
            spot = price * SPOT_SHARE
            done = date + timedelta(hours=9 + rng.uniform(2, 10))
            session_hours += (done - date).total_seconds() / 3600 - 9
            if rng.random() < INTERRUPT_CHANCE:
                interrupted += 1
                back = done + timedelta(hours=RESTART_HOURS)
                hours = max(0.0, (min(back + timedelta(days=found_days), end) - back).total_seconds() / 3600)
                restarted_hours += hours
                leftover_usd += spot * Decimal(hours)
            terminates += 1
            start = done + timedelta(minutes=RELAUNCH_MINUTES)
            hours = max(0.0, (min(start + timedelta(days=found_days), end) - start).total_seconds() / 3600)
            relaunched_hours += hours
            before_usd += spot * Decimal(hours)
    kept_hours = float(people * KEPT * days * 24)
    volume_hours = session_hours + kept_hours
    return {
        "days": days,
        "people": people,
        "spot_terminates": int(terminates),
        "found_after_days": found_days,
        "before_relaunched_instances": int(terminates),
        "before_relaunched_hours": round(relaunched_hours, 1),
        "before_relaunched_usd": round(float(before_usd), 2),
        "after_relaunched_instances": 0,
        "after_relaunched_usd": round(float(after_usd), 2),
        "auto_resume_interruptions": int(interrupted),
        "before_restarted_idle_hours": round(restarted_hours, 1),
        "before_restarted_idle_usd": round(float(leftover_usd), 2),
        "after_restarted_idle_usd": 0.0,
        "extra_volume_gb": disk_gb,
        "session_volume_hours": round(session_hours, 1),
        "kept_instances": people * KEPT,
        "before_extra_volumes_usd": round(float(extra_volume_usd(disk_gb, volume_hours)), 2),
        "before_extra_volumes_with_relaunches_usd": round(
            float(extra_volume_usd(disk_gb, volume_hours + relaunched_hours + restarted_hours)), 2
        ),
        "before_extra_volume_gb_months": round(disk_gb * volume_hours / MONTH_HOURS, 1),
        "after_extra_volumes_usd": 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "7 days, 3 people")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--people", type=int, default=10)
    parser.add_argument("--found-days", type=float, default=7.0, help="days until a relaunch is found")
    parser.add_argument("--disk-gb", type=int, default=200, help="the launches' disk (the example preset's)")
    args = parser.parse_args(argv)
    days, people = (7, 3) if args.smoke else (args.days, args.people)
    figures = simulate(days, people, args.found_days, random.Random(25), args.disk_gb)
    harness.report("spot_relaunch", figures, {"after_relaunched_instances": "0", "after_extra_volumes_usd": "0"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
