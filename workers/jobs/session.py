"""What the instance flows share: the operation lock's holder and a session's cost."""

from __future__ import annotations

from datetime import datetime

from workers.aws.instance import Instance
from workers.commands import Actor
from workers.cost.pricing import cost_of, format_usd, hourly_price, load_price_book
from workers.services import Services
from workers.slack.messages.lifecycle import Cost
from workers.state.locks import Holder


def holder(svc: Services, actor: Actor, what: str) -> Holder:
    return Holder(run_id="-", user_id=actor.user_id, since=svc.clock(), operation=what)


def session_cost(svc: Services, inst: Instance, until: datetime) -> Cost:
    """Uptime since the last start (LaunchTime) and its cost where a price is known."""
    seconds = (until - inst.launch_time).total_seconds() if inst.launch_time else None
    lifecycle = None if inst.lifecycle == "on-demand" else inst.lifecycle
    price = hourly_price(
        load_price_book(), svc.fleet, svc.redis, inst.region, inst.availability_zone, inst.type, lifecycle
    )
    rate = price.usd_per_hour
    amount = None if seconds is None else cost_of(rate, seconds)
    return Cost(seconds, format_usd(amount), price.describe())
