"""The fleet view: each managed instance with its price, accumulated uptime and
cost, live run, owner and idle time. `/runctl resources`, the sweep and the
digest all read the fleet through here, so they never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import islice

from workers import policy
from workers.aws.instance import Instance
from workers.cost.pricing import Price, cost_of, hourly_price, load_price_book
from workers.services import Services
from workers.state.runs import Run
from workers.state.uptime import Sighting, UptimeLedger

PAGE = 1000  # instances per batch of Redis reads/writes: one describe page


@dataclass(frozen=True)
class Row:
    instance: Instance
    price: Price
    uptime_seconds: float  # accumulated over every running interval, not since the last start
    cost: Decimal | None  # None when the price is unknown
    live_run: Run | None
    last_run: Run | None
    owner: str | None  # Slack user id: who started the last run, else the runctl:user tag
    idle_since: datetime | None  # set only for a running instance with nothing training

    @property
    def id(self) -> str:
        return self.instance.id

    @property
    def running(self) -> bool:
        return self.instance.state == "running"

    @property
    def idle(self) -> bool:
        return self.idle_since is not None

    def idle_seconds(self, now: datetime) -> float:
        return max(0.0, (now - self.idle_since).total_seconds()) if self.idle_since else 0.0

    def cost_of(self, seconds: float) -> Decimal | None:
        return cost_of(self.price.usd_per_hour, int(seconds))


def ledger(svc: Services) -> UptimeLedger:
    return UptimeLedger(svc.redis, svc.clock)


def collect(svc: Services, instances: Iterable[Instance], now: datetime) -> list[Row]:
    """Fold each sighting into the uptime ledger, then build its row.

    Redis is read and written a page at a time (a handful of round trips per
    ``PAGE`` instances), never per instance: at 10,000 instances per-instance
    round trips alone took longer than the sweep's whole budget.
    """
    uptime = ledger(svc)
    live = {run.instance_id: run for run in svc.runs.live()}
    prices = _Prices(svc)
    rows: list[Row] = []
    for page in _pages(instances, PAGE):
        uptime.observe_many((Sighting(i.id, i.state, i.launch_time) for i in page), now)
        ids = [inst.id for inst in page]
        ledgers = uptime.read_many(ids)
        latest = svc.runs.latest_many(ids)
        for inst in page:
            price = prices.of(inst)
            last = latest.get(inst.id)
            run = live.get(inst.id)
            used = ledgers[inst.id]
            rows.append(
                Row(
                    instance=inst,
                    price=price,
                    uptime_seconds=used.running_seconds(now),
                    cost=used.cost(price.usd_per_hour, now),
                    live_run=run,
                    last_run=last,
                    owner=policy.owner(run, [last] if last else [], inst.tags),
                    idle_since=_idle_since(inst, run, last, used.running_since),
                )
            )
    return rows


def view(svc: Services, now: datetime | None = None) -> list[Row]:
    """The whole managed fleet: one paginated describe."""
    return collect(svc, svc.fleet.iter_instances(), now or svc.clock())


class _Prices:
    """``hourly_price`` memoised for one collect: a spot quote is one Redis GET per
    (zone, type), not one per instance."""

    def __init__(self, svc: Services) -> None:
        self._svc = svc
        self._book = load_price_book()
        self._seen: dict[tuple[str, str, str, str | None], Price] = {}

    def of(self, inst: Instance) -> Price:
        # Fleet reports plain on-demand as "on-demand"; pricing takes EC2's absent lifecycle.
        lifecycle = None if inst.lifecycle == "on-demand" else inst.lifecycle
        key = (inst.region, inst.availability_zone, inst.type, lifecycle)
        if key not in self._seen:
            self._seen[key] = hourly_price(
                self._book, self._svc.fleet, self._svc.redis, inst.region, inst.availability_zone, inst.type, lifecycle
            )
        return self._seen[key]


def _pages(instances: Iterable[Instance], size: int) -> Iterator[list[Instance]]:
    it = iter(instances)
    while page := list(islice(it, size)):
        yield page


def _idle_since(inst: Instance, live: Run | None, last: Run | None, running_since: datetime | None) -> datetime | None:
    if inst.state != "running" or live is not None:
        return None
    if last is not None and not last.state.ended:
        return None  # a run is queued or starting on it
    marks = [m for m in (running_since, last.ended_at if last else None) if m is not None]
    return max(marks) if marks else None
