"""Benchmark 6: how much idle cost autostop and `train --then stop` remove.

A month of a 10-person team's fleet, simulated at the sweep's cadence (every 5 minutes),
deterministic (seed 18). Each person has one or two instances (types and on-demand prices
from the shipped price book). On workdays they run trainings of 20 min to 5 h with gaps of
5 to 90 min between, from about 9:00 until they leave at about 18:30; a run started before
leaving may end at night. People stop their instance by hand when they leave, if no run is
live, 60 % of the time (50 % on Fridays); in one week of ten an instance is forgotten and
never stopped by hand that week. A stopped instance is started again for its next run.

Idle cost is cost while an instance runs with no live run. The policies on top of the same
people:
- `--then stop`: the last run before leaving (a run that ends after the person left, or
  with more than 2 h until the next one) is started with `--then stop`.
- autostop (60 min, heads-up 10 min before): the real ``workers.state.autostop.decide``
  at every sweep. At a heads-up the owner clicks [Keep running 1h] when they are at work
  and their next run starts within the hour.

A live run interrupted is a stop while a run is live; it must be 0.

    python bench/waste.py [--days 30] [--people 10] [--smoke]
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/waste.py`

from bench import harness
from workers.cost.pricing import load_price_book
from workers.state.autostop import KEEP, Verdict, decide

STEP = timedelta(minutes=5)
START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
TYPES = ("g5.xlarge", "g4dn.xlarge", "p3.2xlarge", "g5.2xlarge", "t3.medium")
AUTOSTOP_MINUTES, HEADSUP_MINUTES = 60, 10


@dataclass
class Run:
    start: datetime
    end: datetime
    then_stop: bool = False


@dataclass
class Box:
    name: str
    price: Decimal
    runs: list[Run] = field(default_factory=list)
    leaves: list[tuple[datetime, bool]] = field(default_factory=list)  # (when, stops by hand)


def generate(days: int, people: int, rng: random.Random) -> list[Box]:
    book = load_price_book()
    boxes: list[Box] = []
    for person in range(people):
        for k in range(1 + (rng.random() < 0.4)):
            itype = rng.choice(TYPES)
            price = book.on_demand("us-east-1", itype)
            assert price is not None, itype
            box = Box(f"p{person}-{k}-{itype}", price)
            forgotten_week = rng.random() < 0.1
            for day in range(days):
                date = START + timedelta(days=day)
                if day % 7 == 0:
                    forgotten_week = rng.random() < 0.1
                weekend = date.weekday() >= 5
                if (weekend and rng.random() > 0.15) or (not weekend and rng.random() < 0.2):
                    continue
                t = date + timedelta(hours=9, minutes=rng.randrange(0, 60, 5))
                leave = date + timedelta(hours=18, minutes=rng.randrange(0, 60, 5))
                if weekend:
                    t, leave = t + timedelta(hours=2), t + timedelta(hours=5)
                while t < leave:
                    run = Run(t, t + timedelta(minutes=rng.randrange(20, 300, 5)))
                    box.runs.append(run)
                    t = run.end + timedelta(minutes=rng.randrange(5, 90, 5))
                by_hand = 0.5 if date.weekday() == 4 else 0.6
                box.leaves.append((leave, not forgotten_week and rng.random() < by_hand))
            for i, run in enumerate(box.runs):
                gap = box.runs[i + 1].start - run.end if i + 1 < len(box.runs) else timedelta(days=1)
                left = next((t for t, _ in box.leaves if t >= run.start), None)
                run.then_stop = gap > timedelta(hours=2) or (left is not None and run.end > left)
            boxes.append(box)
    return boxes


@dataclass
class Tally:
    idle_usd: Decimal = Decimal(0)
    busy_usd: Decimal = Decimal(0)
    interrupted: int = 0
    headsups: int = 0
    keeps: int = 0
    autostops: int = 0
    then_stops: int = 0


def simulate(boxes: list[Box], days: int, then_stop: bool, autostop: bool) -> Tally:
    tally = Tally()
    step_hours = Decimal(STEP.total_seconds()) / Decimal(3600)
    end = START + timedelta(days=days)
    for box in boxes:
        running = False
        running_since: datetime | None = None
        last_end: datetime | None = None
        headsup_at: datetime | None = None
        kept_until: datetime | None = None
        runs = sorted(box.runs, key=lambda r: r.start)
        leaves = dict(box.leaves)
        now = START
        while now < end:
            live = next((r for r in runs if r.start <= now < r.end), None)
            if live is not None and not running:  # the owner starts it for the run
                running, running_since, headsup_at, kept_until = True, now, None, None
            ended = [r for r in runs if now - STEP < r.end <= now]
            if ended:
                last_end = ended[-1].end
                if then_stop and ended[-1].then_stop and live is None:
                    running = False
                    tally.then_stops += 1
            if now in leaves and leaves[now] and live is None and running:
                running = False  # stopped by hand on the way out
            if running and autostop:
                marks = [m for m in (running_since, last_end) if m is not None]
                idle_since = None if live is not None else max(marks)
                verdict = decide(AUTOSTOP_MINUTES, HEADSUP_MINUTES, idle_since, now, headsup_at, kept_until)
                if verdict is Verdict.HEADS_UP:
                    headsup_at = now
                    tally.headsups += 1
                    upcoming = next((r.start for r in runs if r.start > now), None)
                    at_work = now.weekday() < 5 and 9 <= now.hour < 18
                    if at_work and upcoming is not None and upcoming - now <= timedelta(hours=1):
                        kept_until, headsup_at = now + KEEP, None
                        tally.keeps += 1
                elif verdict is Verdict.RESET:
                    headsup_at = None
                elif verdict is Verdict.STOP:
                    if live is not None:
                        tally.interrupted += 1
                    running, headsup_at, kept_until = False, None, None
                    tally.autostops += 1
            if running:
                cost = box.price * step_hours
                if live is None:
                    tally.idle_usd += cost
                else:
                    tally.busy_usd += cost
            now += STEP
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "7 days, 3 people")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--people", type=int, default=10)
    args = parser.parse_args(argv)
    days, people = (7, 3) if args.smoke else (args.days, args.people)
    boxes = generate(days, people, random.Random(18))
    base = simulate(boxes, days, then_stop=False, autostop=False)
    policies = {
        "then_stop": simulate(boxes, days, then_stop=True, autostop=False),
        "autostop": simulate(boxes, days, then_stop=False, autostop=True),
        "both": simulate(boxes, days, then_stop=True, autostop=True),
    }
    total = base.idle_usd + base.busy_usd
    figures: dict[str, harness.Figure] = {
        "days": days,
        "people": people,
        "instances": len(boxes),
        "runs": sum(len(b.runs) for b in boxes),
        "baseline_cost_usd": round(float(total), 2),
        "baseline_idle_usd": round(float(base.idle_usd), 2),
        "baseline_idle_share": round(float(base.idle_usd / total), 3) if total else 0.0,
    }
    for name, tally in policies.items():
        removed = (base.idle_usd - tally.idle_usd) / base.idle_usd if base.idle_usd else Decimal(0)
        figures[f"{name}_idle_usd"] = round(float(tally.idle_usd), 2)
        figures[f"{name}_idle_removed_share"] = round(float(removed), 3)
        figures[f"{name}_live_runs_interrupted"] = tally.interrupted
        figures[f"{name}_busy_usd_unchanged"] = tally.busy_usd == base.busy_usd
    figures["autostop_headsups"] = policies["autostop"].headsups
    figures["autostop_keeps"] = policies["autostop"].keeps
    figures["autostop_stops"] = policies["autostop"].autostops
    figures["then_stop_stops"] = policies["then_stop"].then_stops
    harness.report("waste", figures, {f"{n}_live_runs_interrupted": "0" for n in policies})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
